"""Calibration and segmentation metrics (METHODS.md sections 0, 2, 3, 9).

Public API (inputs: torch tensors or numpy arrays; probabilities ``(B, C, *S)``, labels ``(B, *S)``; spacing in
mm per spatial axis in array order; every metric per case, then NaN-skipping mean over cases):

- calibration: ``ece``, ``classwise_ece``, ``pece``, ``nll``, ``brier``, ``reliability``,
  ``CalibrationAccumulator`` (+ result types ``Reliability``, ``CalibrationResult``)
- boundary: ``bece``, ``bece_classwise``, ``boundary_calibration`` (+ ``BoundaryCalibration``),
  ``interface_mask``, ``class_interface_masks``, ``boundary_band``, ``default_band_mm``
- segmentation: ``dice``, ``iou``, ``hd95``, ``assd``, ``segmentation_metrics`` (+ ``SegmentationMetrics``)
"""
from __future__ import annotations

from .boundary import (
    BoundaryCalibration,
    bece,
    bece_classwise,
    boundary_band,
    boundary_calibration,
    class_interface_masks,
    default_band_mm,
    interface_mask,
)
from .calibration import (
    CalibrationAccumulator,
    CalibrationResult,
    Reliability,
    brier,
    classwise_ece,
    ece,
    nll,
    pece,
    reliability,
)
from .segmentation import SegmentationMetrics, assd, dice, hd95, iou, segmentation_metrics

__all__ = [
    "SegmentationMetrics",
    "assd",
    "dice",
    "hd95",
    "iou",
    "segmentation_metrics",
    "BoundaryCalibration",
    "bece",
    "bece_classwise",
    "boundary_band",
    "boundary_calibration",
    "class_interface_masks",
    "default_band_mm",
    "interface_mask",
    "CalibrationAccumulator",
    "CalibrationResult",
    "Reliability",
    "brier",
    "classwise_ece",
    "ece",
    "nll",
    "pece",
    "reliability",
]
