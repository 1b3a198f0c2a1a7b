"""The core package imports without Slicer and without pulling heavy libraries at import time."""
import subprocess
import sys


def test_import_is_light():
    code = "import sys, LensSegCalibLib; print(sorted(m for m in ('torch','monai','scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_carry_messages():
    from LensSegCalibLib import ChecksumError, LensSegCalibError, ModelError

    err = ChecksumError("weights x do not match; reinstall")
    assert isinstance(err, ModelError) and isinstance(err, LensSegCalibError)
    assert "reinstall" in str(err)
