"""LensSegCalibLib — the pure-Python core of the LensSegCalib 3D Slicer extension.

Calibration-aware segmentation of the crystalline lens (AS-OCT and head CT): losses, calibration and
segmentation metrics, phantoms, training, inference with confidence/boundary heatmaps, and reports.

Importing this package is cheap on purpose: Slicer imports every module at start-up, so torch, monai and
scipy are imported only by the submodules that need them (``LensSegCalibLib.losses``, ``.metrics``, ...).
"""
from __future__ import annotations

from .errors import (  # noqa: F401  (light, no heavy imports)
    Cancelled,
    CatalogError,
    ChecksumError,
    InputError,
    LensSegCalibError,
    ModelError,
    OutputError,
)

__version__ = "0.1.0"
