"""Input handling shared by the metric modules: numpy/torch conversion, shape checks, chunking.

Everything here is private. Conversions never copy a whole volume: numpy arrays are wrapped with
``torch.from_numpy`` (zero copy) and chunks are converted one at a time, so the inputs are never modified
and extra memory stays a small fraction of the probability tensor.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from ..errors import InputError

Reduction = Literal["mean", "none"]

#: Elements (voxels x classes) per chunk. 2**18 float64 temporaries are 2 MiB each: small next to any real
#: volume, large enough that per-chunk Python overhead stays negligible (~1 % of the run time).
CHUNK_ELEMENTS = 2**17


def as_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Wrap a numpy array as a tensor without copying (a tensor is returned as is).

    Args:
        x: numpy array or torch tensor.
        name: argument name used in error messages.

    Raises:
        InputError: ``x`` is neither a numpy array nor a tensor.
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_:
            x = x.view(np.uint8)
        if not x.flags.writeable:  # from_numpy warns on read-only arrays; we never write into it anyway
            return torch.as_tensor(np.array(x, copy=True))
        return torch.from_numpy(x)
    raise InputError(
        f"{name} must be a numpy array or a torch tensor; got {type(x).__name__}. "
        "Convert it with numpy.asarray(...) first."
    )


def check_probs_labels(
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate probabilities ``(B, C, *S)``, labels ``(B, *S)`` (or ``(B, 1, *S)``) and an optional mask.

    Returns tensors on ``probs``' device: probs as given (float), labels (integer, channel axis dropped),
    mask (bool, ``(B, *S)``) or None. Nothing is copied unless a device move or dtype change is needed for
    labels/mask (both are one byte to eight bytes per voxel, never the probability tensor).

    Raises:
        InputError: wrong dimensionality, mismatching shapes, non-float probabilities, non-integer labels,
            labels outside ``0..C-1`` (where ``mask`` is True).
    """
    p = as_tensor(probs, "probs").detach()  # metrics are not differentiable; out= ops refuse autograd inputs
    y = as_tensor(labels, "labels").detach()
    if p.ndim < 3:
        raise InputError(
            f"probs must have shape (B, C, *S) with 1 to 3 spatial axes; got shape {tuple(p.shape)}. "
            "Add the batch axis with probs[None] for a single case."
        )
    if not torch.is_floating_point(p):
        raise InputError(
            f"probs must be floating point probabilities; got dtype {p.dtype}. Pass softmax(logits, dim=1)."
        )
    if y.ndim == p.ndim and y.shape[1] == 1:
        y = y[:, 0]
    if tuple(y.shape) != (p.shape[0], *p.shape[2:]):
        raise InputError(
            f"labels must have shape (B, *S) matching probs (B, C, *S); got labels {tuple(y.shape)} and "
            f"probs {tuple(p.shape)}. Resample the reference onto the image grid and keep the batch axis."
        )
    if torch.is_floating_point(y) or y.is_complex():
        raise InputError(f"labels must be integers 0..C-1; got dtype {y.dtype}. Use labels.astype(int).")
    if y.dtype == torch.bool:
        y = y.view(torch.uint8)
    elif y.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few CPU kernels for these: widen (a copy)
        y = y.to(torch.int64)
    y = y.to(p.device)
    m: torch.Tensor | None = None
    if mask is not None:
        m = as_tensor(mask, "mask")
        if m.ndim == p.ndim and m.shape[1] == 1:
            m = m[:, 0]
        if tuple(m.shape) != tuple(y.shape):
            raise InputError(
                f"mask must have the labels' shape {tuple(y.shape)} (B, *S); got {tuple(m.shape)}. "
                "Pass one boolean mask per case."
            )
        m = m.to(device=p.device, dtype=torch.bool)
    check_label_range(y, p.shape[1], m)
    return p, y, m


def check_label_range(labels: torch.Tensor, num_classes: int, mask: torch.Tensor | None = None) -> None:
    """Raise InputError if a label (inside ``mask``) is outside ``0..num_classes-1``; one pass over labels."""
    if labels.numel() == 0:
        return
    y = labels if mask is None else labels.masked_fill(~mask, 0)
    lo, hi = torch.aminmax(y)
    lo_i, hi_i = int(lo), int(hi)
    if lo_i < 0 or hi_i >= num_classes:
        raise InputError(
            f"labels must lie in 0..{num_classes - 1} (C = {num_classes} channels in probs); found values "
            f"{lo_i}..{hi_i}. Map ignore values to a class and exclude them with mask=..."
        )


def check_n_bins(n_bins: int) -> int:
    """Validate a bin count (a positive int)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"n_bins must be an integer >= 1; got {n_bins!r}. Use e.g. n_bins=15.")
    return int(n_bins)


def check_reduction(reduction: str) -> str:
    """Validate ``reduction`` ("mean" or "none")."""
    if reduction not in ("mean", "none"):
        raise InputError(f"reduction must be 'mean' or 'none'; got {reduction!r}.")
    return reduction


def check_spacing(spacing: Sequence[float] | np.ndarray | None, ndim: int) -> tuple[float, ...]:
    """Return spacing in mm per spatial axis (array order); None -> 1.0 per axis.

    Raises:
        InputError: wrong length, or a value that is not a positive finite number.
    """
    if spacing is None:
        return (1.0,) * ndim
    try:
        sp = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError) as err:
        raise InputError(f"spacing must be numbers in mm, one per spatial axis; got {spacing!r}.") from err
    if len(sp) != ndim:
        raise InputError(
            f"spacing must have one value per spatial axis ({ndim}, array order e.g. (sz, sy, sx)); got "
            f"{spacing!r}. Reverse SimpleITK/Slicer GetSpacing() (x, y, z) to array order."
        )
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing values must be positive finite mm; got {spacing!r}.")
    return sp


def aligned_chunks(
    tensors: Sequence[torch.Tensor | None], n_voxels: int
) -> Iterator[list[torch.Tensor | None]]:
    """Yield aligned chunks ``(k_i, n)`` of several tensors ``(k_i, *S)`` of one case (None passes through).

    Contiguous inputs are viewed, never copied (flat chunks of ``n_voxels`` voxels); if any input is not
    contiguous, all are walked in slabs of the first spatial axis and each slab is copied (small), so the
    whole case is never duplicated.
    """
    present = [t for t in tensors if t is not None]
    spatial = tuple(present[0].shape[1:])
    total = int(np.prod(spatial, dtype=np.int64)) if spatial else 1
    if all(t.is_contiguous() for t in present):
        flats = [None if t is None else t.reshape(t.shape[0], total) for t in tensors]
        for start in range(0, total, n_voxels):
            sl = slice(start, min(start + n_voxels, total))
            yield [None if f is None else f[:, sl] for f in flats]
        return
    rows = spatial[0] if spatial else 1
    inner = max(total // max(rows, 1), 1)
    step = max(1, n_voxels // inner)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        yield [None if t is None else t[:, r0:r1].reshape(t.shape[0], -1) for t in tensors]


def nanmean(values: np.ndarray, axis: int = 0) -> np.ndarray | float:
    """Mean skipping NaN, without numpy's all-NaN RuntimeWarning (an all-NaN slice gives NaN)."""
    v = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(v)
    count = valid.sum(axis=axis)
    total = np.where(valid, v, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    if np.ndim(out) == 0:
        return float(out)
    return out
