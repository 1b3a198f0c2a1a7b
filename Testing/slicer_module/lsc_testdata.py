"""Constants and geometry shared by the Slicer-module tests (imported by conftest.py and the test files)."""
from __future__ import annotations

from importlib import util as _importlib_util
from pathlib import Path as _Path

import numpy as np

# Testing/ is not on sys.path for these tests (only this folder is): load the shared module by path
_spec = _importlib_util.spec_from_file_location("tiny_models", _Path(__file__).resolve().parents[1] / "tiny_models.py")
_TINY_MODELS = _importlib_util.module_from_spec(_spec)
_spec.loader.exec_module(_TINY_MODELS)

TINY_MODEL = "test-asoct-tiny"
# Spacing of the test volumes (array order, mm). The tiny model uses the same grid: no resampling cost.
TEST_SPACING = (0.5, 0.02, 0.03)
ASOCT_CLASSES = _TINY_MODELS.ASOCT_CLASSES  # the class list every test model uses (Testing/tiny_models.py)


def obliqueIJKToRAS(shape_kji: object = None) -> np.ndarray:
    """IJK-to-RAS with TEST_SPACING, an origin off zero and a rotated, reflected direction (30 deg about S)."""
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, -1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.asarray(TEST_SPACING[::-1])[None, :]  # column i scaled by the spacing of i
    matrix[:3, 3] = (12.5, -40.0, 7.25)
    return matrix
