"""Constants and geometry shared by the Slicer-module tests (imported by conftest.py and the test files)."""
from __future__ import annotations

import numpy as np

TINY_MODEL = "test-asoct-tiny"
# Spacing of the test volumes (array order, mm). The tiny model uses the same grid: no resampling cost.
TEST_SPACING = (0.5, 0.02, 0.03)
ASOCT_CLASSES = [
    {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
    {"value": 1, "key": "capsule", "name": "Lens capsule", "color": [255, 220, 80],
     "terminology": "Segmentation category and type - LensSegCalib~SCT^123037004^Anatomical Structure"
                    "~99LSC^1001^Lens capsule~^^~~^^~^^"},
    {"value": 2, "key": "cortex", "name": "Lens cortex", "color": [100, 180, 255]},
    {"value": 3, "key": "nucleus", "name": "Lens nucleus", "color": [230, 90, 60]},
]


def obliqueIJKToRAS(shape_kji: object = None) -> np.ndarray:
    """IJK-to-RAS with TEST_SPACING, an origin off zero and a rotated, reflected direction (30 deg about S)."""
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, -1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.asarray(TEST_SPACING[::-1])[None, :]  # column i scaled by the spacing of i
    matrix[:3, 3] = (12.5, -40.0, 7.25)
    return matrix
