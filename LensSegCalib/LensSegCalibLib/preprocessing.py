"""Intensity normalisation and resampling shared by training and inference.

One place, so training and inference can never disagree: the catalog's ``input.normalization`` dict is passed
to :func:`normalize_intensity` by the trainer *and* by the segmenter.

Normalisation kinds (all return float32, same shape as the input, input never modified):

``{"kind": "percentile", "lower": 0.5, "upper": 99.5, "shift": 0.5, "scale": 0.5}`` (AS-OCT)
    ``x = clip((img - P_lower) / (P_upper - P_lower), 0, 1)`` with percentiles over the finite voxels of the
    *whole* array (deterministic stride subsample above 4 M voxels), then ``(x - shift) / scale``
    (defaults map [0, 1] to [-1, 1], zero-centred). Robust to the device's 8-bit / dB / linear display scale.
``{"kind": "hu_window", "min": -200, "max": 300, "shift": 0.5, "scale": 0.5}`` (CT, HU)
    ``x = clip((img - min) / (max - min), 0, 1)``, then ``(x - shift) / scale``. Absolute HU, no image
    statistics, so a crop or a different field of view gives the same numbers.
``{"kind": "zscore"}``: ``(img - mean) / std`` over finite voxels.  ``{"kind": "none"}``: cast only.

Non-finite voxels (NaN/Inf) are ignored by the statistics and set to the low end of the range
(``(0 - shift) / scale``, or 0 for zscore/none) so one bad voxel cannot poison a volume.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

__all__ = [
    "normalize_intensity",
    "normalization_parameters",
    "apply_normalization",
    "resample_to_spacing",
    "resampled_shape",
    "crop_or_pad",
    "bbox_of_mask",
]

_PCT_SAMPLE_MAX = 4_000_000  # above this many voxels percentiles come from a fixed-stride subsample


def _finite_values(a: np.ndarray) -> np.ndarray:
    """The finite float32 values the statistics use (fixed-stride subsample above 4 M voxels), as float64.

    Finite *as float32*: a float64 voxel of 1e300 is Inf to the network, so it is not counted either.
    """
    if a.size > _PCT_SAMPLE_MAX:
        # fixed stride over the C-order voxels, no RNG: deterministic and identical between training and
        # inference; .flat picks them without a full copy of a non-contiguous (e.g. reoriented) volume
        flat = a.flat[:: int(np.ceil(a.size / _PCT_SAMPLE_MAX))]
    else:
        flat = a.reshape(-1)
    flat = flat.astype(np.float32)
    return flat[np.isfinite(flat)].astype(np.float64)


def _finish_unit_range(x: np.ndarray, finite: np.ndarray, all_finite: bool, shift: float, scale: float) -> np.ndarray:
    """Non-finite voxels to 0 (the low end), then ``(x - shift) / scale``, in place on ``x`` (float32)."""
    if not all_finite:
        x[~finite] = 0.0
    x -= np.float32(shift)
    x /= np.float32(scale)
    return x


def normalization_parameters(image: np.ndarray, normalization: Mapping[str, Any]) -> dict[str, Any]:
    """The image statistics a normalisation needs, from the whole image (no full-size copy of it).

    Computing them once and applying them slab by slab (:func:`apply_normalization`) gives exactly the values of
    :func:`normalize_intensity` on the whole volume, so a big volume never needs a float32 copy of itself.

    Args:
        image: any real array; not modified.
        normalization: the catalog's ``input.normalization`` dict.

    Returns:
        ``{"kind", "lo", "span", "shift", "scale"}``: the affine map ``clip((x - lo) / span, 0, 1)`` (percentile,
        hu_window) or ``(x - lo) / span`` (zscore: lo = mean, span = std), then ``(x - shift) / scale``;
        ``span = 0`` marks a constant image (everything maps to the low end).

    Raises:
        InputError: unknown kind, bad parameters, non-numeric or empty image, no finite voxel.
    """
    a = np.asarray(image)
    if a.size == 0:
        raise InputError("Cannot normalise an empty image: pass an image with at least one voxel.")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
        raise InputError(f"Cannot normalise an image of dtype {a.dtype}: pass a real-valued (int/float) image.")
    kind = normalization.get("kind")
    shift = float(normalization.get("shift", 0.5))
    scale = float(normalization.get("scale", 0.5))
    if kind in ("percentile", "hu_window") and not scale > 0:
        raise InputError(f"normalization.scale must be > 0, got {scale}. Fix the model's normalization.")
    params: dict[str, Any] = {"kind": kind, "lo": 0.0, "span": 1.0, "shift": shift, "scale": scale}
    if kind == "percentile":
        lo_p = float(normalization.get("lower", 0.5))
        hi_p = float(normalization.get("upper", 99.5))
        if not 0 <= lo_p < hi_p <= 100:
            raise InputError(f"Percentiles must satisfy 0 <= lower < upper <= 100, got {lo_p}, {hi_p}.")
        vals = _finite_values(a)
        if vals.size == 0:
            raise InputError("The image has no finite voxel (all NaN/Inf): check the file or its rescaling.")
        lo, hi = np.percentile(vals, [lo_p, hi_p])
        params.update(lo=float(lo), span=float(hi - lo) if hi - lo > 0 else 0.0)
    elif kind == "hu_window":
        lo = float(normalization.get("min", -200.0))
        hi = float(normalization.get("max", 300.0))
        if not hi > lo:
            raise InputError(f"hu_window needs max > min, got min={lo}, max={hi}. Fix the model's normalization.")
        params.update(lo=lo, span=hi - lo)
    elif kind == "zscore":
        vals = _finite_values(a)
        if vals.size == 0:
            raise InputError("The image has no finite voxel (all NaN/Inf): check the file or its rescaling.")
        sd = float(vals.std())
        params.update(lo=float(vals.mean()), span=sd if sd > 0 else 1.0)
    elif kind != "none":
        raise InputError(
            f"Unknown normalization kind {kind!r}: use 'percentile', 'hu_window', 'zscore' or 'none'.")
    return params


def apply_normalization(part: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Normalise ``part`` (the whole image or one slab of it) with :func:`normalization_parameters`' result.

    Returns a new float32 array of ``part``'s shape (``part`` is not modified). Non-finite voxels go to the low
    end of the range (``(0 - shift) / scale``; 0 for zscore/none).
    """
    a = np.asarray(part).astype(np.float32, copy=True)  # copy: never touch the caller's array
    finite = np.isfinite(a)
    all_finite = bool(finite.all())
    kind = params["kind"]
    if kind == "none":
        if not all_finite:
            a[~finite] = 0.0
        return a
    if kind == "zscore":
        x = (a - np.float32(params["lo"])) / np.float32(params["span"])
        if not all_finite:
            x[~finite] = 0.0
        return x.astype(np.float32, copy=False)
    # percentile / hu_window: in place on our own float32 copy (no further full-size temporaries)
    if not params["span"] > 0:  # constant image: everything maps to the low end, no division by zero
        a.fill(0.0)
    else:
        a -= np.float32(params["lo"])
        a /= np.float32(params["span"])
        np.clip(a, 0.0, 1.0, out=a)
    return _finish_unit_range(a, finite, all_finite, params["shift"], params["scale"])


def normalize_intensity(image: np.ndarray, normalization: Mapping[str, Any]) -> np.ndarray:
    """Normalise an image for the network (see the module docstring for the kinds).

    Equal to ``apply_normalization(image, normalization_parameters(image, normalization))``.

    Args:
        image: any real array, e.g. ``(Z, Y, X)`` or ``(Y, X)``; any dtype; not modified.
        normalization: the catalog's ``input.normalization`` dict.

    Returns:
        float32 array of the same shape.

    Raises:
        InputError: unknown kind, bad parameters, non-numeric or empty image.
    """
    return apply_normalization(image, normalization_parameters(image, normalization))


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling ``shape`` from ``spacing`` to ``target_spacing`` (array order, mm), at least 1."""
    if not (len(shape) == len(spacing) == len(target_spacing)):
        raise InputError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target {tuple(target_spacing)} "
                         "must have one value per array axis.")
    if any(float(s) <= 0 for s in list(spacing) + list(target_spacing)):
        raise InputError(f"Spacings must be > 0 mm, got {tuple(spacing)} -> {tuple(target_spacing)}.")
    return tuple(max(1, int(round(n * float(s) / float(t)))) for n, s, t in zip(shape, spacing, target_spacing))


def resample_to_spacing(array: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float], *,
                        order: int = 1, shape: Sequence[int] | None = None) -> np.ndarray:
    """Resample an array to a new voxel spacing (array order, mm), keeping the physical extent.

    Args:
        array: ``(Z, Y, X)`` or ``(Y, X)``; not modified.
        spacing, target_spacing: mm per array axis. An axis whose spacing does not change is copied, not
            interpolated (e.g. the B-scan axis of a radial AS-OCT stack).
        order: 1 (linear) for images, 0 (nearest) for label maps (dtype kept).
        shape: explicit output shape (e.g. to go back exactly to an original grid); default
            :func:`resampled_shape`.

    Returns:
        The resampled array: float32 for order > 0, the input dtype for order 0. Voxel centres are aligned
        by the scale ``in / out`` per axis (``grid_mode``-style; the corners of the extent coincide).
    """
    from scipy import ndimage

    a = np.asarray(array)
    out_shape = tuple(int(v) for v in shape) if shape is not None else resampled_shape(a.shape, spacing, target_spacing)
    if len(out_shape) != a.ndim:
        raise InputError(f"Output shape {out_shape} does not match the array's {a.ndim} axes.")
    if out_shape == a.shape:
        return a.astype(np.float32) if order > 0 else a.copy()
    src = a.astype(np.float32, copy=False) if order > 0 else a
    zoom = [o / i for o, i in zip(out_shape, a.shape)]
    out = ndimage.zoom(src, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
    if out.shape != out_shape:  # zoom rounds; make the shape exact
        out = crop_or_pad(out, out_shape)
    return out.astype(np.float32, copy=False) if order > 0 else out.astype(a.dtype, copy=False)


def crop_or_pad(array: np.ndarray, shape: Sequence[int], *, value: float = 0) -> np.ndarray:
    """Centre-crop or pad (constant ``value``) ``array`` to ``shape``; returns a new array."""
    a = np.asarray(array)
    out = np.full(tuple(shape), value, dtype=a.dtype)
    src, dst = [], []
    for n, m in zip(a.shape, shape):
        if n >= m:
            s = (n - m) // 2
            src.append(slice(s, s + m))
            dst.append(slice(0, m))
        else:
            s = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(s, s + n))
    out[tuple(dst)] = a[tuple(src)]
    return out


def bbox_of_mask(mask: np.ndarray, margin: Sequence[int] | int = 0) -> tuple[slice, ...] | None:
    """Bounding box of the true voxels as slices, grown by ``margin`` voxels and clipped to the array.

    Returns None for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    margins = [int(margin)] * m.ndim if np.isscalar(margin) else [int(v) for v in margin]  # type: ignore[arg-type]
    out = []
    for ax in range(m.ndim):
        other = tuple(i for i in range(m.ndim) if i != ax)
        idx = np.flatnonzero(m.any(axis=other))
        out.append(slice(max(0, idx[0] - margins[ax]), min(m.shape[ax], idx[-1] + 1 + margins[ax])))
    return tuple(out)
