"""Phantom data for training: generation, disk cache, patch sampling with augmentation.

Every phantom is generated once per (generator, seed, shape, variation, model spacing, normalisation),
normalised with :func:`LensSegCalibLib.preprocessing.normalize_intensity` on the *whole* volume (exactly as
inference does), resampled to the model spacing and cached as ``.npy`` files in ``runs/cache/`` so several
runs (CE/ACW/SDC...) share the generation cost. The arrays are memory-mapped when read back.

Seed policy: seeds >= ``HELDOUT_SEED_START`` (10000) are reserved for evaluation; :func:`prepare_volume`
refuses them unless ``heldout=True`` (only the held-out evaluation passes that).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..preprocessing import normalize_intensity, resample_to_spacing

__all__ = [
    "HELDOUT_SEED_START",
    "CachedVolume",
    "phantom_generator",
    "prepare_volume",
    "PatchSampler",
    "augment_intensity",
    "degrade_resolution",
    "rotate_scale_patch",
    "toy_volume",
]

HELDOUT_SEED_START = 10000


def _phantom_version() -> str:
    """The phantom generator's version: part of the cache key, so a changed generator never reuses old data."""
    from ..phantom import PHANTOM_VERSION

    return str(PHANTOM_VERSION)


def phantom_generator(kind: str) -> Callable[..., Any]:
    """``"asoct"`` -> ``phantom.asoct_volume``; ``"ct"`` -> ``phantom.ct_head_volume``; ``"pkg.mod:func"`` ->
    any callable with the same signature ``func(seed, *, shape=None, **variation) -> Phantom``-like object
    (``image``, ``labels``, ``spacing``, ``meta``)."""
    if ":" in kind:
        import importlib

        mod, _, fn = kind.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"Phantom generator {kind!r} cannot be imported ({exc}); use 'asoct', 'ct' or "
                             "'package.module:function'.") from exc
    from .. import phantom

    if kind == "asoct":
        return phantom.asoct_volume
    if kind == "ct":
        return phantom.ct_head_volume
    raise InputError(f"Unknown phantom generator {kind!r}: use 'asoct' or 'ct' in the config's data.generator.")


@dataclass
class CachedVolume:
    """One phantom at the model spacing.

    Attributes:
        image: float32 ``(Z, Y, X)``, normalised (memory-mapped from the cache).
        labels: uint8 ``(Z, Y, X)``.
        visible: bool ``(Z, Y, X)``.
        spacing: model spacing (mm, array order).
        seed: phantom seed.
        meta: the phantom's scalar metadata (JSON), without ``visible``.
    """

    image: np.ndarray
    labels: np.ndarray
    visible: np.ndarray
    spacing: tuple[float, float, float]
    seed: int
    meta: dict


def _key(payload: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def _json_meta(meta: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in meta.items():
        if isinstance(v, np.ndarray):
            continue
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def prepare_volume(generator: str, seed: int, *, shape: Sequence[int] | None, variation: Mapping[str, Any],
                   spacing_mm: Sequence[float] | None, normalization: Mapping[str, Any],
                   cache_dir: str | os.PathLike | None, heldout: bool = False,
                   resample_axis0: bool = True) -> CachedVolume:
    """Generate (or read from the cache) one phantom, normalised and at the model spacing.

    Args:
        generator: ``"asoct"`` or ``"ct"``.
        seed: training/validation seeds < 10000; held-out seeds >= 10000 only with ``heldout=True``.
        shape: phantom shape ``(Z, Y, X)`` or None (the generator's default).
        variation: keyword overrides passed to the generator (e.g. ``{"cataract_grade": 4}``).
        spacing_mm: model spacing (array order); None keeps the phantom's spacing.
        normalization: the model's ``input.normalization``.
        cache_dir: folder for the ``.npy`` cache; None disables caching.
        resample_axis0: False keeps axis 0 as is (2D slice-wise models: B-scans are never interpolated).
    """
    seed = int(seed)
    if not heldout and seed >= HELDOUT_SEED_START:
        raise InputError(
            f"Seed {seed} is reserved for held-out evaluation (>= {HELDOUT_SEED_START}); use seeds below "
            f"{HELDOUT_SEED_START} for training and validation."
        )
    if heldout and seed < HELDOUT_SEED_START:
        raise InputError(f"Held-out evaluation needs seeds >= {HELDOUT_SEED_START}, got {seed}.")
    payload = {"g": generator, "seed": seed, "shape": list(shape) if shape else None, "var": dict(variation),
               "sp": list(spacing_mm) if spacing_mm else None, "norm": dict(normalization),
               "ax0": resample_axis0, "v": 2, "phantom": _phantom_version()}
    key = _key(payload)
    paths = None
    if cache_dir is not None:
        cdir = Path(cache_dir)
        cdir.mkdir(parents=True, exist_ok=True)
        stem = f"{generator}-{seed}-{key}"
        paths = {n: cdir / f"{stem}-{n}.npy" for n in ("image", "labels", "visible")}
        meta_path = cdir / f"{stem}-meta.json"
        if all(p.exists() for p in paths.values()) and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            return CachedVolume(
                image=np.load(paths["image"], mmap_mode="r"), labels=np.load(paths["labels"], mmap_mode="r"),
                visible=np.load(paths["visible"], mmap_mode="r"), spacing=tuple(meta["model_spacing"]),
                seed=seed, meta=meta)
    gen = phantom_generator(generator)
    ph = gen(seed, shape=tuple(shape) if shape else None, **dict(variation))
    img = normalize_intensity(ph.image, normalization)
    lab = np.asarray(ph.labels, dtype=np.uint8)
    vis = np.asarray(ph.meta.get("visible", np.ones(lab.shape, bool)), dtype=bool)
    src_sp = tuple(float(s) for s in ph.spacing)
    tgt_sp = tuple(float(s) for s in spacing_mm) if spacing_mm else src_sp
    if not resample_axis0:
        tgt_sp = (src_sp[0],) + tgt_sp[1:]
    if tgt_sp != src_sp:
        img = resample_to_spacing(img, src_sp, tgt_sp, order=1)
        lab = resample_to_spacing(lab, src_sp, tgt_sp, order=0)
        vis = resample_to_spacing(vis.astype(np.uint8), src_sp, tgt_sp, order=0).astype(bool)
    meta = _json_meta(ph.meta)
    meta["model_spacing"] = list(tgt_sp)
    meta["source_spacing"] = list(src_sp)
    meta["source_shape"] = list(ph.labels.shape)
    if paths is not None:
        _save_npy_atomic(paths["image"], img.astype(np.float32))
        _save_npy_atomic(paths["labels"], lab)
        _save_npy_atomic(paths["visible"], vis)
        tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)
    return CachedVolume(image=img.astype(np.float32), labels=lab, visible=vis, spacing=tgt_sp, seed=seed, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# augmentation (numpy, on one patch; rng passed in so runs are reproducible)
# ----------------------------------------------------------------------------------------------------------
def augment_intensity(x: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any]) -> np.ndarray:
    """Intensity augmentation of one normalised patch (values ~[-1, 1]); returns a new float32 array.

    gamma (on the [0, 1] view), contrast/brightness jitter, Gaussian noise; probabilities and ranges from
    ``cfg`` (keys ``gamma``, ``contrast``, ``brightness``, ``noise_sd``, ``p``).
    """
    p = float(cfg.get("p", 0.8))
    y = x.astype(np.float32, copy=True)
    if rng.random() < p:
        g_lo, g_hi = cfg.get("gamma", [0.7, 1.5])
        g = float(np.exp(rng.uniform(np.log(g_lo), np.log(g_hi))))
        u = np.clip((y + 1.0) * 0.5, 0.0, 1.0)
        y = (u ** g) * 2.0 - 1.0
    if rng.random() < p:
        c_lo, c_hi = cfg.get("contrast", [0.75, 1.25])
        b = float(cfg.get("brightness", 0.1))
        y = y * rng.uniform(c_lo, c_hi) + rng.uniform(-b, b)
    if rng.random() < p:
        sd = rng.uniform(0.0, float(cfg.get("noise_sd", 0.05)))
        y = y + rng.normal(0.0, sd, size=y.shape).astype(np.float32)
    return y.astype(np.float32, copy=False)


def degrade_resolution(x: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any],
                       at_low_res: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Simulate a coarser acquisition grid that inference resampled to the model grid (2D or 3D patch).

    Per axis a scale ``s`` is drawn from ``cfg["scale"]`` (default ``[0.4, 1.0]``; 0.48 = an 800-sample
    B-scan acquired with 384 samples); the patch is low-pass filtered (Gaussian, SD ``U(cfg["blur"]) / s``
    fine pixels: the coarse pixel's area plus the device PSF in coarse pixels), sampled at ``s`` times the
    resolution, optionally transformed there by ``at_low_res`` (intensity augmentation, so the noise is
    coarse-grained as on a coarse grid), and interpolated back linearly. Both resamplings keep the corners
    of the extent aligned (``grid_mode``, as :func:`LensSegCalibLib.preprocessing.resample_to_spacing`), so
    the label map of the fine patch stays registered to the degraded image.

    Args:
        x: float32 patch ``(*patch)`` (normalised intensities).
        rng: random generator (consumed: one scale and one blur per axis, then what ``at_low_res`` draws).
        cfg: ``{"scale": [lo, hi], "blur": [lo, hi]}``; ``lo >= 0.1``.
        at_low_res: applied to the coarse patch before upsampling (e.g. ``augment_intensity``).

    Returns:
        New float32 array of ``x.shape``.
    """
    from scipy import ndimage

    s_lo, s_hi = (float(v) for v in cfg.get("scale", [0.4, 1.0]))
    b_lo, b_hi = (float(v) for v in cfg.get("blur", [0.3, 0.7]))
    if not 0.1 <= s_lo <= s_hi:
        raise InputError(f"data.lowres.scale must be [lo, hi] with 0.1 <= lo <= hi, got {[s_lo, s_hi]}.")
    scales = [float(rng.uniform(s_lo, s_hi)) for _ in x.shape]
    sigmas = [float(rng.uniform(b_lo, b_hi)) / s for s in scales]
    y = ndimage.gaussian_filter(np.asarray(x, np.float32), sigmas, mode="nearest")
    small_shape = tuple(max(4, int(round(n * s))) for n, s in zip(x.shape, scales))
    y = ndimage.zoom(y, [m / n for m, n in zip(small_shape, x.shape)], order=1, mode="nearest", grid_mode=True,
                     prefilter=False)
    if at_low_res is not None:
        y = at_low_res(y)
    y = ndimage.zoom(y, [n / m for n, m in zip(x.shape, y.shape)], order=1, mode="nearest", grid_mode=True,
                     prefilter=False)
    if y.shape != x.shape:  # zoom rounds the output shape
        from ..preprocessing import crop_or_pad

        y = crop_or_pad(y, x.shape, value=float(y.min()))
    return y.astype(np.float32, copy=False)


def rotate_scale_patch(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any],
                       out_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rotate (in the last two axes) and magnify a window about its centre; return the central ``out_shape``.

    The window must be larger than ``out_shape`` by enough margin that the rotated, scaled output stays
    inside it (:class:`PatchSampler` takes 35 % of the patch on each side). The image is interpolated
    linearly; the labels per class as linearly interpolated one-hot maps, then argmax, so a 2-voxel band
    (the capsule) stays a closed band instead of breaking up as nearest-neighbour sampling would leave it.

    Args:
        image: float32 window ``(*W)``; labels: integer window ``(*W)`` (same shape).
        rng: consumed: one angle, one scale.
        cfg: ``{"rotate_deg": 10, "scale": [0.95, 1.15]}``: angle ~ U(-r, r) degrees (a lens tilted against
            the beam, a rotated head), scale ~ U(lo, hi) (> 1 magnifies: a larger eye or a finer grid).
        out_shape: patch shape.

    Returns:
        ``(image float32 out_shape, labels of labels.dtype out_shape)``.
    """
    from scipy import ndimage

    r = float(cfg.get("rotate_deg", 10.0))
    s_lo, s_hi = (float(v) for v in cfg.get("scale", [0.95, 1.15]))
    if not 0.5 <= s_lo <= s_hi <= 2.0:
        raise InputError(f"data.spatial.scale must be [lo, hi] with 0.5 <= lo <= hi <= 2, got {[s_lo, s_hi]}.")
    theta = np.deg2rad(float(rng.uniform(-r, r)))
    scale = float(rng.uniform(s_lo, s_hi))
    nd = image.ndim
    m = np.eye(nd)
    c, s_ = np.cos(theta), np.sin(theta)
    m[-2:, -2:] = np.array([[c, -s_], [s_, c]]) / scale  # output step -> input step
    c_in = (np.array(image.shape, float) - 1.0) / 2.0
    c_out = (np.array(out_shape, float) - 1.0) / 2.0
    offset = c_in - m @ c_out
    kw = dict(matrix=m, offset=offset, output_shape=tuple(int(v) for v in out_shape), order=1, mode="nearest")
    img = ndimage.affine_transform(np.asarray(image, np.float32), **kw)
    classes = np.unique(labels)
    if classes.size == 1:
        return img.astype(np.float32, copy=False), np.full(tuple(out_shape), classes[0], labels.dtype)
    soft = np.stack([ndimage.affine_transform((labels == k).astype(np.float32), **kw) for k in classes])
    lab = classes[np.argmax(soft, axis=0)].astype(labels.dtype, copy=False)
    return img.astype(np.float32, copy=False), lab


#: added to a label to mark a hidden (not ``visible``) voxel while a patch is cut, rotated and flipped
_HIDDEN_CODE = 64


class PatchSampler:
    """Random patches from cached volumes: 2D B-scan patches (``patch_size`` of 2) or 3D patches (3).

    A fraction ``fg_fraction`` of the patches is centred on a random foreground (label > 0) voxel, jittered
    by up to half a patch, so the lens dominates training; the rest are centred anywhere, so the network also
    sees cornea, iris and empty vitreous as it will in a sliding window. Patches reaching outside the volume
    are padded with the image minimum / label 0. ``flip_axes``: spatial axes (of the patch) that may be
    mirrored (the lateral axis of a B-scan; never left-right on CT, where the label *is* the side).
    ``lowres`` (``{"p": 0.35, "scale": [0.4, 1.0], "blur": [0.3, 0.7]}``): with probability ``p`` a patch goes
    through :func:`degrade_resolution` (a coarser acquisition grid resampled to the model grid); the intensity
    augmentation then runs on the coarse patch; labels are never resampled. ``spatial``
    (``{"p": 0.3, "rotate_deg": 10, "scale": [0.95, 1.15]}``): with probability ``p`` the patch is cut from a
    35 % larger window and rotated/magnified by :func:`rotate_scale_patch` (image and labels together).
    """

    def __init__(self, volumes: Sequence[CachedVolume], patch_size: Sequence[int], *, fg_fraction: float = 0.7,
                 flip_axes: Sequence[int] = (), augment: Mapping[str, Any] | None = None,
                 sdf_classes: int | None = None, class_balanced: bool = False, jitter: float = 0.5,
                 lowres: Mapping[str, Any] | None = None, spatial: Mapping[str, Any] | None = None) -> None:
        if not volumes:
            raise InputError("No training volumes: give at least one seed in data.train_seeds.")
        self.volumes = list(volumes)
        self.patch = tuple(int(v) for v in patch_size)
        self.fg_fraction = float(fg_fraction)
        self.flip_axes = tuple(flip_axes)
        self.augment = dict(augment or {})
        self.sdf_classes = sdf_classes
        self.class_balanced = bool(class_balanced)
        self.jitter = float(jitter)
        self.lowres = dict(lowres or {})
        self.spatial = dict(spatial or {})
        # foreground coordinates per volume (small: a few % of the voxels), computed once; with class_balanced
        # the centre class is drawn uniformly among the foreground classes present, so a thin class (the
        # 2-voxel capsule) is as often at a patch centre as the large ones (nnU-Net-style oversampling)
        self._fg = [np.argwhere(np.asarray(v.labels) > 0) for v in self.volumes]
        self._fg_cls = []
        for v, fg in zip(self.volumes, self._fg):
            lab = np.asarray(v.labels)[tuple(fg.T)] if fg.size else np.zeros(0, np.uint8)
            self._fg_cls.append({int(c): np.flatnonzero(lab == c) for c in np.unique(lab)})
        if len(self.patch) == 2:
            self._slices = [(i, z) for i, v in enumerate(self.volumes) for z in range(v.labels.shape[0])]

    def _window(self, arr: np.ndarray, start: Sequence[int], fill: float,
                shape: Sequence[int] | None = None) -> np.ndarray:
        shape = self.patch if shape is None else tuple(shape)
        out = np.full(shape, fill, dtype=arr.dtype)
        src, dst = [], []
        for s, p, n in zip(start, shape, arr.shape[-len(shape):]):
            a, b = max(s, 0), min(s + p, n)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        out[tuple(dst)] = arr[tuple(src)]
        return out

    def sample(self, rng: np.random.Generator, batch_size: int, *, with_hidden: bool = False) -> tuple:
        """Returns ``(images (B, 1, *patch) float32, labels (B, *patch) int64, sdf)``.

        ``sdf`` is None unless ``sdf_classes`` was given: then the SDC loss's signed-distance targets
        ``(B, C, *patch)`` float32 tensor from :func:`LensSegCalibLib.losses.sdc.sdc_targets`, computed here in the
        data pipeline once per sample (per patch, as the official SDC code does for its training crops), so the
        loss never runs an EDT in its hot path.

        ``with_hidden``: also return a fourth array, ``hidden (B, *patch) bool``: true where the phantom's
        ``visible`` mask is false (behind the iris, lost to attenuation), moved with the same crop, rotation and
        flips as the labels (padding outside the volume counts as visible). The random draws are the same as
        without it, so a run with and without the mask sees the same patches.
        """
        nd = len(self.patch)
        imgs = np.empty((batch_size, 1) + self.patch, np.float32)
        labs = np.empty((batch_size,) + self.patch, np.int64)
        hids = np.zeros((batch_size,) + self.patch, bool) if with_hidden else None
        for b in range(batch_size):
            vi = int(rng.integers(len(self.volumes)))
            vol = self.volumes[vi]
            fg = self._fg[vi]
            use_fg = fg.shape[0] > 0 and rng.random() < self.fg_fraction
            if use_fg:
                if self.class_balanced:
                    groups = self._fg_cls[vi]
                    keys = sorted(groups)
                    idx = groups[keys[int(rng.integers(len(keys)))]]
                    pick = fg[idx[int(rng.integers(idx.size))]]
                else:
                    pick = fg[int(rng.integers(fg.shape[0]))]
            if nd == 2:
                if use_fg:
                    zc = pick
                    z, centre = int(zc[0]), zc[1:]
                else:
                    z = int(rng.integers(vol.labels.shape[0]))
                    centre = np.array([rng.integers(n) for n in vol.labels.shape[1:]])
                img_src, lab_src = vol.image[z], vol.labels[z]
                vis_src = vol.visible[z] if with_hidden else None
            else:
                if use_fg:
                    centre = pick
                else:
                    centre = np.array([rng.integers(n) for n in vol.labels.shape])
                img_src, lab_src = vol.image, vol.labels
                vis_src = vol.visible if with_hidden else None
            if with_hidden:
                # the hidden flag rides on the label as +HIDDEN_CODE, so crops, rotations (per-value one-hot
                # interpolation) and flips move it exactly as they move the labels; split again below
                lab_src = np.asarray(lab_src).astype(np.int16) + _HIDDEN_CODE * ~np.asarray(vis_src, bool)
            jit = [int(p * self.jitter) for p in self.patch]
            jitter = np.array([int(rng.integers(-j, j + 1)) for j in jit]) if use_fg else 0
            start = (np.asarray(centre) + jitter - np.array(self.patch) // 2).tolist()
            if self.spatial and rng.random() < float(self.spatial.get("p", 0.3)):
                # a larger window around the same centre, so the rotated/magnified patch has no empty corners
                margin = [int(np.ceil(0.35 * p)) for p in self.patch]
                big = [p + 2 * mg for p, mg in zip(self.patch, margin)]
                bstart = [st - mg for st, mg in zip(start, margin)]
                im, lb = rotate_scale_patch(self._window(img_src, bstart, float(-1.0), big),
                                            self._window(lab_src, bstart, 0, big), rng, self.spatial, self.patch)
            else:
                im = self._window(img_src, start, float(-1.0))
                lb = self._window(lab_src, start, 0)
            for ax in self.flip_axes:
                if rng.random() < 0.5:
                    im = np.flip(im, axis=ax)
                    lb = np.flip(lb, axis=ax)
            aug = (lambda a: augment_intensity(a, rng, self.augment)) if self.augment else None
            if self.lowres and rng.random() < float(self.lowres.get("p", 0.35)):
                im = degrade_resolution(im, rng, self.lowres, at_low_res=aug)
            elif aug is not None:
                im = aug(im)
            imgs[b, 0] = im
            if with_hidden:
                hids[b] = lb >= _HIDDEN_CODE
                lb = lb % _HIDDEN_CODE
            labs[b] = lb
        sdf = None
        if self.sdf_classes:
            from ..losses.sdc import sdc_targets

            sdf = sdc_targets(labs, int(self.sdf_classes))  # one batched C-level EDT call, no per-case loop
        if with_hidden:
            return imgs, labs, sdf, hids
        return imgs, labs, sdf


@dataclass
class ToyPhantom:
    """Minimal phantom-like record returned by :func:`toy_volume`."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict


def toy_volume(seed: int, *, shape: Sequence[int] | None = None, num_classes: int = 4, **variation: Any) -> ToyPhantom:
    """A tiny nested-ellipse phantom for smoke tests and DDP tests (not a realistic scan).

    ``(Z, Y, X)`` float32 image with classes 1..C-1 as nested ellipses of different brightness plus Gaussian
    noise; deterministic per seed; generator name ``"LensSegCalibLib.training.data:toy_volume"``.
    ``shadow`` (variation, default 0): the right-most fraction of the columns carries no signal (noise only)
    and is marked not ``visible``, a stand-in for the iris shadow; the labels there are unchanged.
    """
    nz, ny, nx = tuple(shape) if shape else (2, 48, 48)
    rng = np.random.default_rng(int(seed))
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    image = np.zeros((nz, ny, nx), np.float32)
    levels = np.linspace(0.9, 0.4, num_classes - 1)
    for z in range(nz):
        cy, cx = ny / 2 + rng.uniform(-3, 3), nx / 2 + rng.uniform(-3, 3)
        ry, rx = ny * rng.uniform(0.25, 0.35), nx * rng.uniform(0.3, 0.4)
        for c in range(1, num_classes):
            f = 1.0 - 0.28 * (c - 1)
            m = ((yy - cy) / (ry * f)) ** 2 + ((xx - cx) / (rx * f)) ** 2 <= 1.0
            labels[z][m] = c
            image[z][m] = levels[c - 1]
    visible = np.ones(labels.shape, bool)
    shadow = float(variation.get("shadow", 0.0))
    if shadow > 0:
        visible[..., int(round(nx * (1.0 - shadow))):] = False
        image[~visible] = 0.0
    image += rng.normal(0, float(variation.get("noise", 0.08)), image.shape).astype(np.float32)
    return ToyPhantom(image=image, labels=labels, spacing=(1.0, 0.1, 0.1), meta={"seed": int(seed), "visible": visible})
