"""Interfaces, boundary bands and the boundary ECE (BECE), METHODS.md section 2 (a LensSegCalib definition).

- ``interface_mask``: voxels with a (face) neighbour of a different label, both sides, image border excluded.
- ``class_interface_masks``: per class c, voxels with a face neighbour such that exactly one of the two is c.
- ``boundary_band``: voxels within ``band_mm`` (inclusive, +1e-9) of an interface voxel centre, Euclidean in
  mm (scipy EDT with ``sampling=spacing``); ``band_mm = 0`` gives the interface itself.
- ``bece`` / ``bece_classwise`` / ``boundary_calibration``: ECE restricted to the band of the *reference*
  interfaces (top-label) or to the band of each class's interfaces (BECE_c).

The heat-map module reuses ``interface_mask``/``boundary_band`` on *predicted* labels (METHODS.md 10.3).
Bands are computed on the CPU with scipy (one EDT per case and class); the binning itself runs on the
probabilities' device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError
from ._binning import case_slot_stats, check_prob_range, serial_cpu_ops
from ._utils import Reduction, as_tensor, check_n_bins, check_probs_labels, check_reduction, check_spacing, nanmean
from .calibration import _classwise, _top

__all__ = [
    "BoundaryCalibration",
    "bece",
    "bece_classwise",
    "boundary_band",
    "boundary_calibration",
    "class_interface_masks",
    "default_band_mm",
    "interface_mask",
]

Connectivity = Literal["face", "full"]
_BAND_EPS = 1e-9  # inclusive band edge despite float rounding of the EDT


def _labels_numpy(labels: np.ndarray | torch.Tensor, name: str = "labels") -> np.ndarray:
    y = as_tensor(labels, name)
    if torch.is_floating_point(y) or y.is_complex():
        raise InputError(f"{name} must be an integer label map; got dtype {y.dtype}. Use labels.astype(int).")
    if y.ndim < 1 or y.ndim > 3:
        raise InputError(
            f"{name} must be one case with 1 to 3 spatial axes (*S); got shape {tuple(y.shape)}. "
            "Call the function once per case (labels[b])."
        )
    return y.detach().cpu().numpy()


def _offsets(ndim: int, connectivity: str) -> list[tuple[int, ...]]:
    """Half of the neighbour offsets (each pair +-o once): face = unit axes, full = all of {-1,0,1}^d."""
    if connectivity == "face":
        return [tuple(1 if a == d else 0 for a in range(ndim)) for d in range(ndim)]
    if connectivity == "full":
        offs = [o for o in product((-1, 0, 1), repeat=ndim) if any(o)]
        return [o for o in offs if o > tuple(-v for v in o)]  # one of each +-o pair
    raise InputError(f"connectivity must be 'face' or 'full'; got {connectivity!r}.")


def _pair_slices(offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(a, b)`` such that ``x[a]`` and ``x[b]`` are neighbours at ``offset`` (inside the image)."""
    a = tuple(slice(o, None) if o > 0 else slice(None, o if o < 0 else None) for o in offset)
    b = tuple(slice(None, -o) if o > 0 else slice(-o, None) if o < 0 else slice(None) for o in offset)
    return a, b


def interface_mask(labels: np.ndarray | torch.Tensor, connectivity: Connectivity = "face") -> np.ndarray:
    """Voxels with a neighbour (inside the image) of a different label, on both sides (METHODS.md 2.1).

    Args:
        labels: ``(*S)`` integer label map of ONE case (1 to 3 spatial axes), numpy or torch.
        connectivity: "face" (4-neighbours in 2D, 6 in 3D; the BECE definition) or "full" (8 / 26).

    Returns:
        ``(*S)`` bool numpy array; the image border is not an interface.
    """
    return _interfaces(_labels_numpy(labels), connectivity)


def _interfaces(y: np.ndarray, connectivity: str = "face") -> np.ndarray:
    """``(*S)`` bool: voxels with a neighbour (inside the image) whose value differs (numpy, no checks)."""
    out = np.zeros(y.shape, dtype=bool)
    for off in _offsets(y.ndim, connectivity):
        a, b = _pair_slices(off)
        diff = y[a] != y[b]
        out[a] |= diff
        out[b] |= diff
    return out


def class_interface_masks(
    labels: np.ndarray | torch.Tensor, num_classes: int, connectivity: Connectivity = "face"
) -> np.ndarray:
    """Per-class interfaces: for class c, voxels with a neighbour such that exactly one of the two is c.

    Args:
        labels: ``(*S)`` integer label map of one case.
        num_classes: C; row c of the result belongs to class c (row 0 = background).
        connectivity: "face" or "full".

    Returns:
        ``(C, *S)`` bool numpy array. A class that is absent, or fills the image, has no interface.
    """
    y = _labels_numpy(labels)
    return np.stack([_class_interface(y, c, connectivity) for c in range(num_classes)])


def _class_interface(y: np.ndarray, c: int, connectivity: str = "face") -> np.ndarray:
    """``(*S)`` bool: voxels with a neighbour such that exactly one of the two is labelled ``c``."""
    return _interfaces(y == c, connectivity)


def default_band_mm(spacing: Sequence[float] | None, ndim: int) -> float:
    """Default band half-width: two voxels on the finest axis, ``2 * min(spacing)`` mm (1.0 spacing if None)."""
    return 2.0 * min(check_spacing(spacing, ndim))


#: Largest structuring element (voxels) for which the band is computed by dilation instead of an EDT.
_MAX_DILATION_ELEMENTS = 343


def _ball(spacing: tuple[float, ...], band_mm: float) -> np.ndarray:
    """Offsets within ``band_mm`` (inclusive, +1e-9) of the centre, Euclidean in mm: an anisotropic ball."""
    radius = [int(np.floor((band_mm + _BAND_EPS) / s)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(radius, spacing)], indexing="ij")
    return sum(g * g for g in grids) <= (band_mm + _BAND_EPS) ** 2


def _band_from_interface(iface: np.ndarray, spacing: tuple[float, ...], band_mm: float) -> np.ndarray:
    """Voxels within ``band_mm`` of an interface voxel centre, ``(*S)`` bool.

    Exact either way: for a small band, a binary dilation of the interface by the voxel offsets within the
    band (1 byte per voxel); otherwise scipy's EDT (float64 distances plus an int32 feature transform, ~20
    bytes per voxel of the cropped box). Both work on the interface bounding box grown by the band.
    """
    if band_mm == 0 or not iface.any():
        return iface.copy()
    grow = [int(np.ceil((band_mm + _BAND_EPS) / s)) for s in spacing]
    bounds: list[slice] = []
    for axis, (g, n) in enumerate(zip(grow, iface.shape)):
        # per-axis any() instead of np.nonzero: no 8-byte index per interface voxel and axis on big slabs
        hits = np.flatnonzero(iface.any(axis=tuple(a for a in range(iface.ndim) if a != axis)))
        bounds.append(slice(max(int(hits[0]) - g, 0), min(int(hits[-1]) + g + 1, n)))
    box = tuple(bounds)
    out = np.zeros_like(iface)
    ball = _ball(spacing, band_mm)
    if ball.size <= _MAX_DILATION_ELEMENTS:
        out[box] = ndimage.binary_dilation(iface[box], structure=ball)
    else:
        out[box] = ndimage.distance_transform_edt(~iface[box], sampling=spacing) <= band_mm + _BAND_EPS
    return out


def _check_band(band_mm: float | None, spacing: tuple[float, ...]) -> float:
    if band_mm is None:
        return 2.0 * min(spacing)
    value = float(band_mm)
    if not np.isfinite(value) or value < 0:
        raise InputError(f"band_mm must be a finite distance >= 0 in mm (or None for the default); got {band_mm!r}.")
    return value


def boundary_band(
    labels: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    band_mm: float | None = None,
    connectivity: Connectivity = "face",
) -> np.ndarray:
    """Voxels whose centre lies within ``band_mm`` mm (inclusive) of an interface voxel centre (METHODS.md 2.2).

    Args:
        labels: ``(*S)`` integer label map of one case.
        spacing: mm per spatial axis in array order; None = 1.0 per axis.
        band_mm: half-width in mm; 0 = interface voxels only; None = ``2 * min(spacing)``.
        connectivity: interface connectivity ("face" is the BECE definition).

    Returns:
        ``(*S)`` bool numpy array (all False when the labels have no interface).
    """
    y = _labels_numpy(labels)
    sp = check_spacing(spacing, y.ndim)
    return _band_from_interface(interface_mask(y, connectivity), sp, _check_band(band_mm, sp))


@dataclass(frozen=True)
class BoundaryCalibration:
    """BECE results (METHODS.md 2). Values are fractions (multiply by 100 for %).

    Attributes:
        bece: top-label BECE, NaN-skipping mean over cases.
        bece_per_case: ``(B,)`` top-label BECE per case (NaN: case without interfaces).
        bece_classwise: ``(C - 1,)`` BECE_c per foreground class, mean over cases (NaN: never a band).
        bece_classwise_per_case: ``(B, C - 1)``.
        bece_cw: mean over cases of the per-case mean over foreground classes with a non-empty band.
        band_mm: band half-width used (mm).
        band_voxels: ``(B,)`` voxels in the top-label band per case.
    """

    bece: float
    bece_per_case: np.ndarray
    bece_classwise: np.ndarray
    bece_classwise_per_case: np.ndarray
    bece_cw: float
    band_mm: float
    band_voxels: np.ndarray


def boundary_calibration(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    band_mm: float | None = None,
    n_bins: int = 15,
    classwise: bool = True,
) -> BoundaryCalibration:
    """Top-label and class-wise BECE in one pass per case (bands from the reference labels).

    Args:
        probs: ``(B, C, *S)`` probabilities.
        labels: ``(B, *S)`` reference labels.
        spacing: mm per spatial axis (array order); None = 1.0.
        band_mm: band half-width in mm; None = ``2 * min(spacing)``; 0 = interface voxels only.
        n_bins: M. Defaults to 15.
        classwise: also compute BECE_c (one more EDT per foreground class). Defaults to True.

    Returns:
        BoundaryCalibration.
    """
    n_bins = check_n_bins(n_bins)
    with serial_cpu_ops(as_tensor(probs, "probs").device):
        return _boundary_calibration(probs, labels, spacing, band_mm, n_bins, classwise)


def _boundary_calibration(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None,
    band_mm: float | None,
    n_bins: int,
    classwise: bool,
) -> BoundaryCalibration:
    p, y, _ = check_probs_labels(probs, labels)
    num_classes = int(p.shape[1])
    sp = check_spacing(spacing, p.ndim - 2)
    band = _check_band(band_mm, sp)
    top_vals, cw_vals, counts = [], [], []
    for b in range(p.shape[0]):
        y_np = y[b].detach().cpu().numpy()
        band_top = _band_from_interface(interface_mask(y_np), sp, band)
        counts.append(int(band_top.sum()))
        class_band = None
        if classwise:  # one class at a time: never more than one (*S) interface mask alive
            class_band = np.zeros((num_classes, *y_np.shape), dtype=bool)  # row 0 stays False (foreground only)
            for c in range(1, num_classes):
                class_band[c] = _band_from_interface(_class_interface(y_np, c), sp, band)
        st_top = case_slot_stats(
            p[b], y[b], n_bins, torch.from_numpy(band_top).to(p.device), top=True, classwise=False
        )
        check_prob_range(st_top, class_mask_used=True)
        top_vals.append(float(_top(st_top).ece))
        if classwise:
            st_cw = case_slot_stats(
                p[b], y[b], n_bins, None, torch.from_numpy(class_band).to(p.device), top=False, classwise=True
            )
            check_prob_range(st_cw, class_mask_used=True)
            cw_vals.append(np.atleast_1d(_classwise(st_cw).ece)[1:])
        else:
            cw_vals.append(np.full(num_classes - 1, np.nan))
    per_case_cw = np.array(cw_vals, dtype=np.float64).reshape(len(cw_vals), num_classes - 1)
    per_case_top = np.array(top_vals, dtype=np.float64)
    cw_case_mean = nanmean(per_case_cw, axis=1) if num_classes > 1 else np.full(len(top_vals), np.nan)
    return BoundaryCalibration(
        bece=float(nanmean(per_case_top)),
        bece_per_case=per_case_top,
        bece_classwise=np.atleast_1d(nanmean(per_case_cw, axis=0)),
        bece_classwise_per_case=per_case_cw,
        bece_cw=float(nanmean(np.atleast_1d(cw_case_mean))),
        band_mm=band,
        band_voxels=np.array(counts, dtype=np.int64),
    )


def bece(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    band_mm: float | None = None,
    n_bins: int = 15,
    reduction: Reduction = "mean",
) -> float | np.ndarray:
    """Top-label boundary ECE (METHODS.md 2.3): ECE over the band around the reference interfaces.

    Args:
        probs: ``(B, C, *S)`` probabilities.
        labels: ``(B, *S)`` reference labels.
        spacing: mm per spatial axis (array order); None = 1.0.
        band_mm: band half-width in mm; None = ``2 * min(spacing)``; 0 = interface voxels only.
        n_bins: M. Defaults to 15.
        reduction: "mean" (NaN-skipping mean over cases) or "none" (``(B,)``).

    Returns:
        float; NaN for a case without interfaces.
    """
    res = boundary_calibration(probs, labels, spacing, band_mm, n_bins, classwise=False)
    return res.bece if check_reduction(reduction) == "mean" else res.bece_per_case


def bece_classwise(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    band_mm: float | None = None,
    n_bins: int = 15,
    reduction: Reduction = "mean",
) -> np.ndarray:
    """Class-wise BECE_c (METHODS.md 2.4) for the foreground classes 1..C-1.

    ECE of ``p_c`` against ``[label == c]`` over the band of the class-c interfaces.

    Returns:
        ``(C - 1,)`` mean over cases (NaN-skipping), or ``(B, C - 1)`` for reduction "none"; NaN where a class
        has no interface. ``BoundaryCalibration.bece_cw`` gives the summary BECE_cw.
    """
    res = boundary_calibration(probs, labels, spacing, band_mm, n_bins, classwise=True)
    return res.bece_classwise if check_reduction(reduction) == "mean" else res.bece_classwise_per_case
