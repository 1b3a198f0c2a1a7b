"""Shared input handling for every loss: validation, label layout, float32 compute, distance transforms.

Conventions (docs/ARCHITECTURE.md, METHODS.md 0.1): logits are float ``(B, C, *S)`` with ``S = (H, W)`` or
``(D, H, W)``; labels are integers ``(B, *S)`` or ``(B, 1, *S)`` in ``0..C-1``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = [
    "prepare_inputs",
    "float32_compute",
    "one_hot",
    "check_spacing",
    "masks_edt",
]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop tensor subclasses (MONAI ``MetaTensor``): their ``__torch_function__`` slows every op down."""
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def prepare_inputs(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``(logits, labels)`` and return ``(logits as float32, labels as int64 (B, *S))``.

    Args:
        logits: float tensor ``(B, C, H, W)`` or ``(B, C, D, H, W)`` (raw network output, no softmax).
        labels: integer tensor ``(B, *S)`` or ``(B, 1, *S)`` with values in ``0..C-1``; a floating tensor
            holding whole numbers (MONAI loaders produce those) is accepted.
        num_classes: expected ``C``; ``None`` accepts whatever the logits have.

    Returns:
        ``(z, y)``: ``z`` the logits as float32 (float64 kept; differentiable), ``y`` int64 ``(B, *S)`` on the
        logits' device. The inputs are never modified.

    Raises:
        InputError: wrong rank, mismatching shapes, non-integer or out-of-range labels, wrong ``C``.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InputError(
            f"logits and labels must be torch tensors; got {type(logits).__name__} and {type(labels).__name__}. "
            "Convert with torch.as_tensor(...) first."
        )
    logits, labels = _plain(logits), _plain(labels)
    if logits.ndim not in (4, 5) or not logits.is_floating_point():
        raise InputError(
            f"logits must be a float tensor (B, C, H, W) or (B, C, D, H, W); got dtype {logits.dtype} and shape "
            f"{tuple(logits.shape)}. Pass the raw network output (no argmax)."
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise InputError(
            f"logits have {logits.shape[1]} channels but the loss was built for num_classes={num_classes}. "
            "Build the loss with the network's out_channels."
        )
    if labels.ndim == logits.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise InputError(
            f"labels must have shape (B, *S) or (B, 1, *S) matching logits (B, C, *S); got labels "
            f"{tuple(labels.shape)} and logits {tuple(logits.shape)}. Resample the reference onto the image grid."
        )
    if labels.is_floating_point():
        if not torch.equal(labels, torch.round(labels)):
            raise InputError("labels hold non-integer values; pass a label map (class indices), not probabilities.")
    elif labels.is_complex():
        raise InputError("labels must be an integer tensor of class indices; got a complex tensor.")
    y = labels.to(device=logits.device, dtype=torch.int64)
    if y.numel():
        lo, hi = torch.aminmax(y)
        if int(lo) < 0 or int(hi) >= logits.shape[1]:
            raise InputError(
                f"labels must lie in 0..{logits.shape[1] - 1} (C = {logits.shape[1]} logit channels); got values "
                f"{int(lo)}..{int(hi)}. Map the reference's label values to consecutive class indices."
            )
    # float16/bfloat16 -> float32 (softmax and log saturate in half precision); float64 stays float64.
    return (logits if logits.dtype == torch.float64 else logits.float()), y


@contextlib.contextmanager
def float32_compute(device: torch.device) -> Iterator[None]:
    """Turn autocast off inside a loss: softmax/log in fp16 saturate (1 + 1e-7 == 1 in fp16)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, *S)`` int64 -> contiguous ``(B, C, *S)`` one-hot in ``dtype`` on the same device.

    A broadcast comparison writes the channel-first layout directly (``F.one_hot(...).movedim`` builds an
    int64 channel-last tensor and a strided view: several times slower on CPU).
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, *([1] * (labels.ndim - 1)))
    return (labels.unsqueeze(1) == classes).to(dtype)


def check_spacing(spacing_mm: Sequence[float] | None, spatial_dims: int) -> tuple[float, ...] | None:
    """Validate ``spacing_mm`` (mm per spatial axis, array-axis order) for ``spatial_dims`` axes."""
    if spacing_mm is None:
        return None
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != spatial_dims or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(
            f"spacing_mm must hold {spatial_dims} positive values (mm per axis, array-axis order (sz, sy, sx)); "
            f"got {spacing_mm!r}."
        )
    return spacing


def masks_edt(masks: np.ndarray, spacing_mm: Sequence[float] | None = None) -> np.ndarray:
    """Exact Euclidean distance transform of each binary mask of a stack (scipy, one C call per mask).

    For every True voxel of ``masks[n]`` the distance (mm when ``spacing_mm`` is given, else voxels) to the
    nearest False voxel of the same mask; 0 on False voxels. Masks without any False voxel get scipy's
    meaningless all-True values; callers replace them (METHODS.md 4.5 / section 8). (One scipy call on the
    whole stack with a huge spacing along the stack axis gives the same numbers but measured 4× slower.)

    Args:
        masks: bool ``(N, *S)``.
        spacing_mm: one value per spatial axis of ``S`` (array-axis order) or ``None`` (1.0 each).

    Returns:
        float64 ``(N, *S)``.
    """
    from scipy import ndimage

    spacing = None if spacing_mm is None else [float(s) for s in spacing_mm]
    out = np.empty(masks.shape, dtype=np.float64)
    for n, mask in enumerate(masks):
        ndimage.distance_transform_edt(mask, sampling=spacing, distances=out[n])
    return out
