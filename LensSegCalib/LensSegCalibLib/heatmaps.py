"""Voxel-wise heat maps shown in Slicer: confidence, normalised entropy and boundary calibration (METHODS.md 10).

Formulas and colour conventions: ``docs/heatmaps.md``. All maps are float32 arrays on the input grid
(``(*S)``, array-axis order ``(Z, Y, X)`` or ``(Y, X)``); ``spacing`` is in mm per array axis, same order.

- :func:`confidence_map` -- ``max_c p`` (10.1).
- :func:`normalized_entropy` -- ``-sum_c p ln p / ln C`` in [0, 1] (10.1).
- :func:`label_free_boundary_map` -- normalised entropy inside the band around the *predicted* interfaces,
  ``fill`` (NaN by default, 0 for a Slicer volume layer) elsewhere (10.3).
- :func:`boundary_calibration_map` -- signed, reference-based: Gaussian-smoothed ``conf - hit`` (10.2);
  > 0 over-confident, < 0 under-confident.

The band (``band_mm`` around interfaces, default ``2 x min(spacing)``) comes from
``LensSegCalibLib.metrics.boundary_band`` (the BECE band, METHODS.md 2). The signed map is smoothed only on the
band's bounding box grown by the kernel radius (exact for every band voxel, far cheaper on a whole CT).
"""
from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np
import numpy.typing as npt

from .errors import InputError

__all__ = [
    "confidence_map",
    "normalized_entropy",
    "boundary_band_mask",
    "boundary_band_slabs",
    "label_free_boundary_map",
    "boundary_calibration_map",
    "default_band_mm",
    "default_sigma_mm",
]

# Voxels per chunk when reducing over classes: bounds the float32 temporaries for float16 inputs.
_CHUNK_VOXELS = 1 << 22
# Voxels per slab of the band computation (the EDT needs ~20 bytes per voxel: ~320 MiB per slab).
_BAND_SLAB_VOXELS = 1 << 24


def _as_numpy(array: object) -> np.ndarray:
    """Return a numpy view of a numpy array or a (possibly CUDA) torch tensor, without copying numpy input."""
    if isinstance(array, np.ndarray):
        return array
    detach = getattr(array, "detach", None)
    if detach is not None:  # torch tensor: move to host once, here, not in the callers
        return detach().cpu().numpy()
    return np.asarray(array)


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Validate ``spacing`` (mm, array order) for an ``ndim``-D grid; ``None`` means 1 mm per axis."""
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(
            f"spacing must be {ndim} finite positive values in mm (array order); got {spacing!r}. "
            "Pass the voxel size of the image, e.g. (sz, sy, sx)."
        )
    return values


def _check_probabilities(probabilities: np.ndarray) -> np.ndarray:
    if probabilities.ndim < 2 or probabilities.shape[0] < 1:
        raise InputError(
            f"probabilities must have shape (C, *S) with C >= 1; got {probabilities.shape}. "
            "Pass one case, not a batch."
        )
    return probabilities


def _slab_slices(shape: Sequence[int], channels: int) -> list[slice]:
    """Slices along the first spatial axis so that one slab of (C, slab, ...) stays under ~4 M values."""
    per_row = int(np.prod(shape[1:], dtype=np.int64)) * max(channels, 1)
    step = max(1, _CHUNK_VOXELS // max(per_row, 1))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


def confidence_map(probabilities: object) -> np.ndarray:
    """Top-label confidence ``max_c p`` (METHODS.md 10.1).

    Args:
        probabilities: ``(C, *S)`` class probabilities (numpy or torch, any float dtype), summing to 1 over C.

    Returns:
        float32 ``(*S)`` in [0, 1].
    """
    probs = _check_probabilities(_as_numpy(probabilities))
    out = np.empty(probs.shape[1:], dtype=np.float32)
    for sl in _slab_slices(probs.shape[1:], probs.shape[0]):
        out[sl] = probs[:, sl].max(axis=0)
    return out


def normalized_entropy(probabilities: object) -> np.ndarray:
    """Normalised Shannon entropy ``-sum_c p ln p / ln C`` (METHODS.md 10.1), ``0 ln 0 = 0``.

    Args:
        probabilities: ``(C, *S)`` class probabilities (numpy or torch).

    Returns:
        float32 ``(*S)`` in [0, 1] (0 = one class certain, 1 = uniform). C = 1 gives zeros.
    """
    probs = _check_probabilities(_as_numpy(probabilities))
    channels = probs.shape[0]
    out = np.zeros(probs.shape[1:], dtype=np.float32)
    if channels < 2:
        return out
    scale = np.float32(1.0 / np.log(channels))
    for sl in _slab_slices(probs.shape[1:], channels):
        p = probs[:, sl].astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).astype(np.float32)
        # clip: float16-rounded probabilities can push the sum a hair outside [0, 1]
        out[sl] = np.clip(-terms.sum(axis=0) * scale, 0.0, 1.0)
    return out


def default_band_mm(spacing: Sequence[float]) -> float:
    """Default band half-width: ``2 x min(spacing)`` mm (two voxels on the finest axis, METHODS.md 2).

    The rule lives in ``metrics.default_band_mm`` (the BECE band), so heat maps and BECE cannot drift apart.
    """
    from .metrics import default_band_mm as bece_default_band_mm

    return float(bece_default_band_mm(spacing, len(spacing)))


def default_sigma_mm(spacing: Sequence[float]) -> float:
    """Default smoothing of the signed calibration map: ``sigma = 2 x min(spacing)`` mm (METHODS.md 10.2)."""
    return 2.0 * float(min(spacing))


def boundary_band_slabs(labels: object, spacing: Sequence[float] | None, band_mm: float | None = None, *,
                        value: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """The band of :func:`boundary_band_mask` one slab at a time: yields ``(rows, mask)`` pairs.

    ``rows`` is a slice of axis 0 and ``mask`` the bool band of those rows (shape ``(rows, *S[1:])``); the slabs
    tile axis 0 in order. Each slab is computed with a halo of ``band_mm`` (+1 voxel for the interface test), so
    it is exactly that part of the whole-volume band while the distance transform's memory (~20 bytes per voxel)
    stays bounded by the slab size. Small or 2D inputs come as one slab.

    ``value``: the band of one segment only (the interfaces of the binary mask ``labels == value``), without
    a full-size copy of that mask.
    """
    from .metrics import boundary_band

    lab = _as_numpy(labels)
    spacing_t = _check_spacing(spacing, lab.ndim)
    band = default_band_mm(spacing_t) if band_mm is None else float(band_mm)
    if not np.isfinite(band) or band < 0:
        raise InputError(f"band_mm must be a finite value >= 0 mm; got {band_mm!r}.")
    per_row = int(np.prod(lab.shape[1:], dtype=np.int64))
    rows = max(1, _BAND_SLAB_VOXELS // max(per_row, 1))

    def select(part: np.ndarray) -> np.ndarray:
        return part if value is None else (part == value).view(np.uint8)

    if lab.ndim < 3 or lab.shape[0] <= rows:
        yield slice(0, lab.shape[0]), np.asarray(boundary_band(select(lab), spacing_t, band), dtype=bool)
        return
    halo = int(np.ceil(band / spacing_t[0])) + 1  # band reach along axis 0, +1 so halo voxels see neighbours
    for z0 in range(0, lab.shape[0], rows):
        z1 = min(z0 + rows, lab.shape[0])
        lo, hi = max(z0 - halo, 0), min(z1 + halo, lab.shape[0])
        part = np.asarray(boundary_band(select(lab[lo:hi]), spacing_t, band), dtype=bool)
        yield slice(z0, z1), part[z0 - lo:z1 - lo]


def boundary_band_mask(labels: object, spacing: Sequence[float] | None, band_mm: float | None = None) -> np.ndarray:
    """Voxels within ``band_mm`` of an interface of ``labels`` (the BECE band, METHODS.md 2), as a bool mask.

    Uses ``LensSegCalibLib.metrics.boundary_band`` (face-connected interfaces, Euclidean distance in mm between
    voxel centres, inclusive), so the heat maps and BECE can never disagree about the band. Large 3D volumes
    are processed in slabs along axis 0 (:func:`boundary_band_slabs`), which gives exactly the whole-volume band.

    Args:
        labels: integer ``(*S)`` label map.
        spacing: mm per array axis (``None`` = 1 mm).
        band_mm: band half-width in mm (``0`` = interface voxels only); ``None`` = ``2 x min(spacing)``.

    Returns:
        bool ``(*S)``; all False when there is no interface.
    """
    lab = _as_numpy(labels)
    out = np.zeros(lab.shape, dtype=bool)
    for rows, mask in boundary_band_slabs(lab, spacing, band_mm):
        out[rows] = mask
    return out


def label_free_boundary_map(
    labels: object,
    entropy: object,
    spacing: Sequence[float] | None,
    *,
    band_mm: float | None = None,
    fill: float = float("nan"),
    dtype: npt.DTypeLike = np.float32,
) -> np.ndarray:
    """Boundary uncertainty without a reference (METHODS.md 10.3).

    Normalised entropy inside the band of ``band_mm`` around the predicted interfaces, ``fill`` elsewhere.
    Built slab by slab: no full-size band mask or temporary exists besides the result.

    Args:
        labels: integer ``(*S)`` predicted labels (argmax).
        entropy: ``(*S)`` normalised entropy in [0, 1] (:func:`normalized_entropy`).
        spacing: mm per array axis.
        band_mm: band half-width in mm; ``None`` = ``2 x min(spacing)``.
        fill: value outside the band: NaN (analysis; the default) or 0 (a Slicer volume layer).
        dtype: float dtype of the result (float32 by default; the segmenter keeps float16 maps).

    Returns:
        ``dtype`` ``(*S)``: entropy in the band, ``fill`` outside.
    """
    lab = _as_numpy(labels)
    ent = _as_numpy(entropy)
    if ent.shape != lab.shape:
        raise InputError(f"entropy {ent.shape} and labels {lab.shape} must share one grid; pass maps of one case.")
    out = np.full(lab.shape, fill, dtype=dtype)
    for rows, mask in boundary_band_slabs(lab, spacing, band_mm):
        view = out[rows]
        view[mask] = ent[rows][mask]
    return out


def boundary_calibration_map(
    probabilities: object,
    reference: object,
    spacing: Sequence[float] | None,
    *,
    sigma_mm: float | None = None,
    band_mm: float | None = None,
    region: Literal["band", "everywhere"] = "band",
    fill: float = float("nan"),
) -> np.ndarray:
    """Signed local calibration error against a reference (METHODS.md 10.2).

    ``G = g_sigma * (conf - hit) / g_sigma * 1`` with ``conf = max_c p``, ``hit = [argmax p = reference]``,
    Gaussian ``sigma_mm`` (per axis ``sigma_mm / spacing`` voxels), truncated at 3 sigma, nearest-value
    border (so the denominator is 1). Positive = over-confident, negative = under-confident.

    Args:
        probabilities: ``(C, *S)`` probabilities (numpy or torch).
        reference: integer ``(*S)`` reference labels on the same grid.
        spacing: mm per array axis.
        sigma_mm: Gaussian sigma in mm; ``None`` = ``2 x min(spacing)``.
        band_mm: half-width of the BECE band around the *reference* interfaces; ``None`` = ``2 x min(spacing)``.
        region: ``"band"`` (``fill`` outside the band) or ``"everywhere"``.
        fill: value outside the band when ``region="band"``: NaN (default) or 0 for a Slicer layer.

    Returns:
        float32 ``(*S)`` in [-1, 1].
    """
    from scipy.ndimage import gaussian_filter

    probs = _check_probabilities(_as_numpy(probabilities))
    ref = _as_numpy(reference)
    if ref.shape != probs.shape[1:]:
        raise InputError(
            f"reference {ref.shape} must be on the probabilities' grid {probs.shape[1:]}; "
            "resample the reference segmentation onto the image first."
        )
    if region not in ("band", "everywhere"):
        raise InputError(f"region must be 'band' or 'everywhere'; got {region!r}.")
    spacing_t = _check_spacing(spacing, ref.ndim)
    sigma = default_sigma_mm(spacing_t) if sigma_mm is None else float(sigma_mm)
    if not np.isfinite(sigma) or sigma < 0:
        raise InputError(f"sigma_mm must be a finite value >= 0 mm; got {sigma_mm!r}.")
    sigma_vox = tuple(sigma / s for s in spacing_t)
    radius = tuple(int(3.0 * sv + 0.5) for sv in sigma_vox)  # scipy's truncate=3 rule

    if region == "band":
        band = boundary_band_mask(ref, spacing_t, band_mm)
        out = np.full(ref.shape, fill, dtype=np.float32)
        if not band.any():
            return out
        # Smooth only the band's bounding box grown by the kernel radius: values inside the band are exact
        # (every voxel they see is in the crop, and the crop stops at the image border where 'nearest' agrees).
        box = []
        for axis, size in enumerate(ref.shape):
            other = tuple(a for a in range(ref.ndim) if a != axis)
            hits = np.flatnonzero(band.any(axis=other))
            box.append(slice(max(int(hits[0]) - radius[axis], 0), min(int(hits[-1]) + radius[axis] + 1, size)))
        crop = tuple(box)
    else:
        crop = tuple(slice(0, n) for n in ref.shape)

    p = probs[(slice(None),) + crop].astype(np.float32)
    gap = p.max(axis=0) - (p.argmax(axis=0) == ref[crop]).astype(np.float32)
    smoothed = gaussian_filter(gap, sigma_vox, mode="nearest", truncate=3.0).astype(np.float32)
    if region == "everywhere":
        return smoothed
    inner = band[crop]
    view = out[crop]
    view[inner] = smoothed[inner]
    return out
