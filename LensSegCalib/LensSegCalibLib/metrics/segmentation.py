"""Overlap and surface-distance metrics on label maps (METHODS.md 9.1-9.4): Dice, IoU, HD95, ASSD.

Each function takes ``(pred, ref, num_classes, spacing=None)`` with label maps ``(B, *S)`` (numpy or torch),
computes one value per case and class, and returns the foreground classes ``1..C-1`` (``include_background``
adds class 0): ``reduction="mean"`` gives the NaN-skipping mean over cases ``(C-1,)`` float64, ``"none"``
gives ``(B, C-1)``.

Empty-set rules (9.1, 9.3, 9.4): Dice/IoU both empty -> 1.0, one empty -> 0.0; HD95/ASSD both empty -> NaN,
exactly one empty -> +inf (a missed or hallucinated structure; MONAI returns NaN for HD95 there, which
silently drops the failure from a nan-mean). A +inf case makes the mean over cases +inf, on purpose.

Surfaces (9.2): mask voxels with a face neighbour outside the mask, the image border counting as outside.
Distances: Euclidean in mm between voxel centres (scipy EDT with ``sampling=spacing``, on the bounding box of
both surfaces, which is exact and avoids any O(N^2) pairing).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError
from ._utils import Reduction, as_tensor, check_reduction, check_spacing, nanmean

__all__ = ["SegmentationMetrics", "assd", "dice", "hd95", "iou", "segmentation_metrics"]


def _label_maps(
    pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label maps ``(B, *S)`` and return them as integer numpy arrays (CPU, dtype kept: no copy of
    a numpy input, so a uint8 512^3 label map never turns into 1 GiB of int64)."""
    p = as_tensor(pred, "pred")
    r = as_tensor(ref, "ref")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2 (background + classes); got {num_classes!r}.")
    if tuple(p.shape) != tuple(r.shape) or p.ndim < 2 or p.ndim > 4:
        raise InputError(
            f"pred and ref must be label maps of the same shape (B, *S) with 1 to 3 spatial axes; got pred "
            f"{tuple(p.shape)} and ref {tuple(r.shape)}. Pass argmax(probs, dim=1), not probabilities, and keep "
            "the batch axis (x[None] for one case)."
        )
    for name, t in (("pred", p), ("ref", r)):
        if torch.is_floating_point(t) or t.is_complex():
            raise InputError(f"{name} must be an integer label map; got dtype {t.dtype}. Use argmax over C first.")
    p_np = p.detach().cpu().numpy()
    r_np = r.detach().cpu().numpy()
    for name, a in (("pred", p_np), ("ref", r_np)):
        if a.dtype == np.bool_:
            continue
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise InputError(
                f"{name} labels must lie in 0..{num_classes - 1}; found {a.min()}..{a.max()}. "
                "Check num_classes or remap the labels."
            )
    return p_np, r_np


def _select(per_case: np.ndarray, include_background: bool, reduction: str) -> np.ndarray:
    """``(B, C)`` per case and class -> classes kept, then reduced over cases."""
    vals = per_case if include_background else per_case[:, 1:]
    if check_reduction(reduction) == "none":
        return vals
    return np.atleast_1d(nanmean(vals, axis=0))


def _overlap_counts(p: np.ndarray, r: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """Per case: ``|P_c|``, ``|R_c|``, ``|P_c & R_c|`` as ``(B, C)`` int64 from one confusion bincount per case.

    The pair index ``pred * C + ref`` is built in the smallest dtype that holds ``C^2`` (uint8 for C <= 16), one
    case at a time, so the temporary is 1-4 bytes per voxel of one case.
    """
    n_pairs = num_classes**2
    dtype = np.uint8 if n_pairs <= 256 else np.int32 if n_pairs < 2**31 else np.int64
    conf = np.zeros((p.shape[0], num_classes, num_classes), dtype=np.int64)
    for i in range(p.shape[0]):
        # astype always copies: the caller's arrays are never written to
        pair = p[i].astype(dtype) * dtype(num_classes) + r[i].astype(dtype)
        counts = torch.bincount(torch.from_numpy(pair.reshape(-1)), minlength=n_pairs)
        conf[i] = counts.numpy().reshape(num_classes, num_classes)
    return conf.sum(axis=2), conf.sum(axis=1), np.diagonal(conf, axis1=1, axis2=2)


def _dice_iou(p: np.ndarray, r: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    size_p, size_r, inter = (x.astype(np.float64) for x in _overlap_counts(p, r, num_classes))
    union = size_p + size_r - inter
    both_empty = (size_p + size_r) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(both_empty, 1.0, 2.0 * inter / np.maximum(size_p + size_r, 1))
        j = np.where(both_empty, 1.0, inter / np.maximum(union, 1))
    return d, j


def dice(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    reduction: Reduction = "mean",
    include_background: bool = False,
) -> np.ndarray:
    """Dice ``2|P & R| / (|P| + |R|)`` per class (METHODS.md 9.1); both empty -> 1, one empty -> 0.

    Args:
        pred: ``(B, *S)`` predicted labels (argmax over C).
        ref: ``(B, *S)`` reference labels.
        num_classes: C (background included).
        spacing: accepted for a uniform signature; overlap does not depend on it.
        reduction: "mean" (over cases, NaN-skipping) -> ``(C-1,)``; "none" -> ``(B, C-1)``.
        include_background: also return class 0 (first column).

    Returns:
        float64 array in [0, 1].
    """
    p, r = _label_maps(pred, ref, num_classes)
    return _select(_dice_iou(p, r, num_classes)[0], include_background, reduction)


def iou(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    reduction: Reduction = "mean",
    include_background: bool = False,
) -> np.ndarray:
    """IoU (Jaccard) ``|P & R| / |P | R|`` per class (METHODS.md 9.1); both empty -> 1, one empty -> 0.

    Arguments and returns as in ``dice``.
    """
    p, r = _label_maps(pred, ref, num_classes)
    return _select(_dice_iou(p, r, num_classes)[1], include_background, reduction)


_CROSS: dict[int, np.ndarray] = {}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask; the image border counts as outside (9.2)."""
    if mask.ndim not in _CROSS:
        _CROSS[mask.ndim] = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS[mask.ndim], border_value=0)


def _directed_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Surface distances pred->ref and ref->pred in mm, or None when either mask is empty."""
    if not pred_mask.any() or not ref_mask.any():
        return None
    # Crop to the bounding box of both masks: surfaces are unchanged (everything outside is background)
    # and the EDT to the nearest surface voxel is exact inside the box.
    both = pred_mask | ref_mask
    box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(both))
    sp_, sr_ = _surface(pred_mask[box]), _surface(ref_mask[box])
    d_to_ref = ndimage.distance_transform_edt(~sr_, sampling=spacing)
    d_to_pred = ndimage.distance_transform_edt(~sp_, sampling=spacing)
    return d_to_ref[sp_], d_to_pred[sr_]


def _surface_table(
    p: np.ndarray,
    r: np.ndarray,
    num_classes: int,
    spacing: tuple[float, ...],
    percentile: float,
    include_background: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per case and class ``(B, C)``: (HD at ``percentile``, ASSD), with the empty-set rules.

    Class 0 is left NaN unless ``include_background`` (its surfaces span the whole image: the costliest EDT).
    """
    b = p.shape[0]
    hd = np.full((b, num_classes), np.nan)
    sd = np.full((b, num_classes), np.nan)
    for i in range(b):  # per case and class: each step is one pair of scipy EDTs on a cropped box
        for c in range(0 if include_background else 1, num_classes):
            pm, rm = p[i] == c, r[i] == c
            dists = _directed_distances(pm, rm, spacing)
            if dists is None:
                if pm.any() != rm.any():  # exactly one empty
                    hd[i, c] = sd[i, c] = np.inf
                continue
            d_pr, d_rp = dists
            hd[i, c] = max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile))
            sd[i, c] = (d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size)
    return hd, sd


def hd95(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    reduction: Reduction = "mean",
    include_background: bool = False,
    percentile: float = 95.0,
) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance in mm (METHODS.md 9.3).

    ``max(P95(d(P->R)), P95(d(R->P)))`` over surface voxels, linear-interpolated percentile; equals MONAI
    ``HausdorffDistanceMetric(percentile=95)`` when both masks are non-empty.

    Args:
        pred, ref, num_classes, reduction, include_background: as in ``dice``.
        spacing: mm per spatial axis in array order; None = 1.0 (voxel units).
        percentile: 95 by default; 100 gives the Hausdorff distance.

    Returns:
        float64 array in mm; NaN where both masks are empty, +inf where exactly one is.
    """
    p, r = _label_maps(pred, ref, num_classes)
    if not 0 <= float(percentile) <= 100:
        raise InputError(f"percentile must be in [0, 100]; got {percentile!r}.")
    sp = check_spacing(spacing, p.ndim - 1)
    table = _surface_table(p, r, num_classes, sp, float(percentile), include_background)[0]
    return _select(table, include_background, reduction)


def assd(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    reduction: Reduction = "mean",
    include_background: bool = False,
) -> np.ndarray:
    """Average symmetric surface distance in mm (METHODS.md 9.4):
    ``(sum d(P->R) + sum d(R->P)) / (|S_P| + |S_R|)`` (= MONAI ``SurfaceDistanceMetric(symmetric=True)``).

    Arguments as in ``hd95``. Returns float64 mm; NaN where both masks are empty, +inf where exactly one is.
    """
    p, r = _label_maps(pred, ref, num_classes)
    sp = check_spacing(spacing, p.ndim - 1)
    return _select(_surface_table(p, r, num_classes, sp, 95.0, include_background)[1], include_background, reduction)


@dataclass(frozen=True)
class SegmentationMetrics:
    """All four overlap/surface metrics per case and class, ``(B, C)`` arrays (class 0 first; the class-0
    HD95/ASSD columns are NaN unless computed with ``include_background=True``).

    Use ``mean(name)`` for the NaN-skipping mean over cases of the foreground classes.
    """

    dice: np.ndarray
    iou: np.ndarray
    hd95: np.ndarray
    assd: np.ndarray
    spacing: tuple[float, ...]

    def mean(self, name: str, include_background: bool = False) -> np.ndarray:
        """NaN-skipping mean over cases of metric ``name`` ("dice", "iou", "hd95", "assd")."""
        if name not in ("dice", "iou", "hd95", "assd"):
            raise InputError(f"unknown metric {name!r}; choose dice, iou, hd95 or assd.")
        return _select(getattr(self, name), include_background, "mean")


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    include_background: bool = False,
) -> SegmentationMetrics:
    """Dice, IoU, HD95 and ASSD at once (one pair of EDTs per case and class serves both distances).

    Args:
        pred, ref: ``(B, *S)`` label maps; num_classes: C; spacing: mm per axis (array order), None = 1.0.
        include_background: also compute the class-0 surface distances (slow on large images).

    Returns:
        SegmentationMetrics with ``(B, C)`` arrays.
    """
    p, r = _label_maps(pred, ref, num_classes)
    sp = check_spacing(spacing, p.ndim - 1)
    d, j = _dice_iou(p, r, num_classes)
    hd, sd = _surface_table(p, r, num_classes, sp, 95.0, include_background)
    return SegmentationMetrics(dice=d, iou=j, hd95=hd, assd=sd, spacing=sp)
