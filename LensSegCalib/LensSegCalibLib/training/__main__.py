"""``python -m LensSegCalibLib.training --config FILE`` (see :mod:`.cli`)."""
from .cli import main

raise SystemExit(main())
