"""Inference engine: ``Segmenter`` -> ``Prediction`` (labels, probabilities, confidence, entropy, boundary).

Pipeline of :meth:`Segmenter.predict` (all on the segmenter's device, torch):

1. Validate the image (2D ``(Y, X)`` or 3D ``(Z, Y, X)``, real-valued, non-empty) and its spacing (mm, array
   order). A CT model reorients an oblique/permuted volume to the nearest axis-aligned LPS order when a
   ``direction`` is given, and maps every output back.
2. Normalise intensities with the catalog's ``input.normalization`` (``preprocessing.normalize_intensity``, the
   same function training used).
3. ``slicewise2d``: slices along axis 0 in small batches, each resized (bilinear) to the model's in-plane spacing,
   run through ``monai.inferers.sliding_window_inference`` with the catalog's patch size, softmax(logits / T),
   resized back to the input grid. ``sliding3d``: the volume is resized (trilinear) to the model spacing, run
   through the 3D sliding window (Gaussian blending), softmax(logits / T) in place, and resampled back to the
   input grid slab by slab (separable trilinear = ``F.interpolate(..., align_corners=False)``).
   Labels are the argmax of the probabilities *on the input grid* (interpolate probabilities, then argmax).
4. Confidence (max p) and normalised entropy are computed per slab while storing; the label-free boundary map
   (``heatmaps.label_free_boundary_map``) at the end.

Memory stays bounded: B-scans are normalised and segmented a few at a time (normalisation statistics come from
the whole volume first, so the values equal normalising it at once); the outputs are uint8 labels and float16
maps (7 bytes per input voxel, plus 2 per class when the probabilities are kept); the boundary band is streamed
in slabs. The 3D path also holds the float32 volume and the model-grid logits.

AMP (float16 autocast) on CUDA. On CUDA out-of-memory the batch is halved down to 1, then the run moves to the
CPU, each time with a ``RuntimeWarning``. ``progress(fraction, message)`` is called
as work advances; ``cancel`` (a ``threading.Event``) is polled before every batch/patch (well under a second
apart on 2 CPU cores for the shipped models) and raises :class:`~LensSegCalibLib.errors.Cancelled`.

Example::

    >>> from LensSegCalibLib.inference import Segmenter
    >>> seg = Segmenter.from_catalog("asoct-lens-acw", device="auto")        # doctest: +SKIP
    >>> pred = seg.predict(volume, spacing=(0.5, 0.02, 0.02))              # doctest: +SKIP
    >>> pred.labels.dtype, pred.probabilities.shape                          # doctest: +SKIP
    (dtype('uint8'), (4, 16, 640, 800))
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import Cancelled, InputError, ModelError

if TYPE_CHECKING:  # heavy imports stay inside the functions
    import threading

    import torch

    from .models import ModelSpec

__all__ = ["Segmenter", "Prediction", "resolve_device", "ProgressCallback"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

# Voxels of the input grid handled per output slab in the 3D path (bounds float32 temporaries to ~C x 16 MB).
_SLAB_VOXELS = 1 << 22


# ----------------------------------------------------------------------------------------------- result
@dataclass
class Prediction:
    """Result of :meth:`Segmenter.predict`, everything on the input grid ``S`` (array-axis order).

    Attributes:
        labels: uint8 ``(*S)``, argmax of the probabilities (0 = background).
        probabilities: ``(C, *S)`` temperature-scaled softmax, float16 unless asked otherwise (None when
            ``predict(..., probabilities_dtype=None)``).
        confidence: float16 ``(*S)``, top-label probability ``max_c p`` in [0, 1].
        entropy: float16 ``(*S)``, normalised entropy ``-sum p ln p / ln C`` in [0, 1].
        boundary: float16 ``(*S)``, label-free boundary map (METHODS.md 10.3): entropy inside the band of
            ``band_mm`` around the predicted interfaces, ``boundary_fill`` (NaN by default) elsewhere.

    The maps are float16 (resolution 2^-11 near 1, far below any visible or reported difference) so that a
    1024 x 1024 x 512 volume fits in a few GB: labels + three maps take 7 bytes per voxel. Files and Slicer layers
    get them as float32; the probabilities were float16 already, and ``confidence`` equals their maximum.
        spacing: mm per array axis of the input grid.
        classes: catalog class dicts (``value``, ``key``, ``name``, ``color``, ``terminology``), by value.
        model_id, model_version, weights_sha256: provenance.
        temperature: the temperature that was applied (1.0 when disabled).
        mirror_tta: whether the logits were averaged with those of the mirrored input (test-time augmentation).
        band_mm: band half-width used for ``boundary``.
        device: device the network ran on (after any fallback).
        seconds: wall-clock seconds per stage (``prepare``, ``inference``, ``heatmaps``, ``total``).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    confidence: np.ndarray
    entropy: np.ndarray
    boundary: np.ndarray
    spacing: tuple[float, ...]
    classes: list[dict]
    model_id: str = ""
    model_version: str = ""
    weights_sha256: str = ""
    temperature: float = 1.0
    mirror_tta: bool = False
    band_mm: float = float("nan")
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """Display names by label value (index = value)."""
        return [str(c.get("name", c.get("key", c["value"]))) for c in sorted(self.classes, key=lambda c: c["value"])]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------- helpers
def resolve_device(device: "str | torch.device" = "auto") -> "torch.device":
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` as given.

    Raises:
        InputError: CUDA requested but not available, or an unknown device string.
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise InputError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {device!r} was requested but CUDA is not available here; use --device cpu or auto.")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"Device {device!r} is not supported; use 'auto', 'cpu' or 'cuda'.")
    return dev


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    errors: list[type[BaseException]] = []
    for owner, name in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        cls = getattr(owner, name, None)
        if isinstance(cls, type) and cls not in errors:
            errors.append(cls)
    return tuple(errors)


def _check_cancel(cancel: "threading.Event | None") -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Segmentation cancelled by the user; no output was written.")


def _validate_image(image: Any, spacing: Sequence[float] | None, direction: Any) -> tuple[np.ndarray, tuple, Any]:
    """Return (array, spacing tuple, direction) after checking them; accepts an ``io.Image``."""
    if hasattr(image, "array") and hasattr(image, "geometry"):
        geometry = image.geometry
        spacing = geometry.spacing if spacing is None else spacing
        direction = geometry.direction if direction is None else direction
        image = image.array
    detach = getattr(image, "detach", None)
    arr = detach().cpu().numpy() if detach is not None else np.asarray(image)
    if arr.dtype == object or np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"The image has dtype {arr.dtype}; pass a real-valued scalar volume (int or float voxels).")
    if arr.ndim not in (2, 3):
        raise InputError(
            f"The image has shape {arr.shape} ({arr.ndim}D); pass a 3D volume (Z, Y, X) or one 2D slice (Y, X). "
            "Vector/RGB or 4D images must be converted to one scalar volume first."
        )
    if arr.size == 0:
        raise InputError(f"The image is empty (shape {arr.shape}); nothing to segment.")
    if spacing is None:
        raise InputError("spacing is required: pass the voxel size in mm per array axis, e.g. (sz, sy, sx).")
    try:
        sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    except (TypeError, ValueError) as exc:
        raise InputError(f"spacing must be numbers in mm (array order); got {spacing!r}.") from exc
    if len(sp) != arr.ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(
            f"spacing {spacing!r} does not fit a {arr.ndim}D image: give {arr.ndim} finite positive values "
            "in mm, array order (sz, sy, sx). Fix the image header if it is wrong."
        )
    if direction is not None:
        d = np.asarray(direction, dtype=float).ravel()
        n = arr.ndim
        if d.size != n * n or not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d.reshape(n, n))) - 1) > 1e-3:
            raise InputError(
                f"direction {tuple(round(float(v), 6) for v in d)} is not a {n}x{n} rotation/reflection matrix; "
                "fix the image header."
            )
        direction = d.reshape(n, n)
    return arr, sp, direction


def _canonical_axes(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Permutation and flips that bring a 3D (Z, Y, X) array to nearest axis-aligned LPS order.

    ``direction`` columns are the LPS directions of the i, j, k axes (= array axes 2, 1, 0). After
    ``np.flip(a.transpose(perm), flips)`` array axis 0 runs along +S, 1 along +P, 2 along +L.
    """
    columns = {2 - j: direction[:, j] for j in range(3)}  # array axis -> LPS direction vector
    perm = [0, 0, 0]
    flips = [False, False, False]
    used: set[int] = set()
    # assign each array axis to its dominant physical axis, largest components first (stable for oblique)
    order = sorted(range(3), key=lambda a: -float(np.max(np.abs(columns[a]))))
    for a in order:
        comps = np.abs(columns[a]).copy()
        for u in used:
            comps[u] = -1.0
        phys = int(np.argmax(comps))  # 0 = L (x), 1 = P (y), 2 = S (z)
        used.add(phys)
        target = 2 - phys  # array axis that should run along this physical axis
        perm[target] = a
        flips[target] = bool(columns[a][phys] < 0)
    return tuple(perm), tuple(flips)


def _orient(a: np.ndarray, perm: Sequence[int], flips: Sequence[bool], lead: int = 0) -> np.ndarray:
    """Apply (perm, flips) to the spatial axes of ``a`` (after ``lead`` leading axes)."""
    axes = list(range(lead)) + [lead + p for p in perm]
    out = a.transpose(axes)
    flip_axes = tuple(lead + i for i, f in enumerate(flips) if f)
    return np.flip(out, flip_axes) if flip_axes else out


def _unorient(a: np.ndarray, perm: Sequence[int], flips: Sequence[bool], lead: int = 0) -> np.ndarray:
    """Inverse of :func:`_orient`."""
    flip_axes = tuple(lead + i for i, f in enumerate(flips) if f)
    out = np.flip(a, flip_axes) if flip_axes else a
    inverse = np.argsort(perm)
    axes = list(range(lead)) + [lead + int(p) for p in inverse]
    return np.ascontiguousarray(out.transpose(axes))


def _window_count(image_size: Sequence[int], roi: Sequence[int], overlap: float, batch: int) -> int:
    """Number of windows ``sliding_window_inference`` will run (for progress), batch items included."""
    try:
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        size = [max(int(s), int(r)) for s, r in zip(image_size, roi)]
        interval = _get_scan_interval(size, list(roi), len(size), overlap)
        return max(1, len(dense_patch_slices(size, list(roi), interval, return_slice=False)) * batch)
    except (ImportError, TypeError, ValueError):  # private MONAI helpers moved: estimate instead
        n = 1
        for s, r in zip(image_size, roi):
            step = max(1, int(r * (1 - overlap)))
            n *= 1 if s <= r else math.ceil((s - r) / step) + 1
        return n * batch


# ----------------------------------------------------------------------------------------------- Segmenter
class Segmenter:
    """A loaded catalog model ready to segment volumes.

    Args:
        network: the MONAI module (logits out), e.g. from ``models.load_model``.
        spec: its :class:`~LensSegCalibLib.models.ModelSpec`.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
        sw_batch_size: windows per forward pass (3D: default 4 on CUDA, 1 on CPU; 2D: 32 on CUDA, 8 on CPU).
        overlap: sliding-window overlap; default the catalog's ``input.overlap`` or 0.25.
        apply_temperature: divide logits by the catalog temperature (post-hoc calibration); default True.
        amp: float16 autocast on CUDA.
        slice_batch: 2D models: slices resampled and inferred together (default 16 on CUDA, 4 on CPU).
        mirror_tta: average each window's logits with those of its mirror image along the model's
            ``input.tta_flip_axes`` (the axes it was trained to be symmetric under: the lateral axis of an
            AS-OCT B-scan; none for CT, whose labels are the patient's sides). Twice the inference time;
            on the 30 hard held-out eyes ACW 1.5.0 gains +0.007 / +0.003 / +0.001 Dice (docs/RESULTS.md).
    """

    def __init__(
        self,
        network: "torch.nn.Module",
        spec: "ModelSpec",
        *,
        device: "str | torch.device" = "auto",
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        apply_temperature: bool = True,
        amp: bool = True,
        slice_batch: int | None = None,
        mirror_tta: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.network = network.to(self.device).eval()
        self.spec = spec
        cuda = self.device.type == "cuda"
        default_batch = (32 if cuda else 8) if spec.mode == "slicewise2d" else (4 if cuda else 1)
        self.batch_size = int(sw_batch_size) if sw_batch_size else default_batch
        if self.batch_size < 1:
            raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        # slices resampled and sent to the sliding window together (2D models); bounds host/device memory
        self.slice_batch = int(slice_batch) if slice_batch else (16 if cuda else 4)
        if self.slice_batch < 1:
            raise InputError(f"slice_batch must be >= 1, got {slice_batch}.")
        self.overlap = float(spec.input.get("overlap", 0.25) if overlap is None else overlap)
        if not 0 <= self.overlap < 1:
            raise InputError(f"overlap must lie in [0, 1), got {self.overlap}.")
        self.apply_temperature = bool(apply_temperature)
        self.amp = bool(amp)
        self.weights_sha256 = str(spec.weights.get("sha256", ""))
        self.mirror_tta = bool(mirror_tta)
        self._flip_dims: tuple[int, ...] = ()
        if self.mirror_tta:
            axes = [int(a) for a in (spec.input.get("tta_flip_axes") or [])]
            n_sp = len(spec.patch_size) if spec.mode != "slicewise2d" else 2
            if not axes:
                raise ModelError(
                    f"Model {spec.id!r} declares no mirror symmetry (catalog input.tta_flip_axes), so mirror "
                    "test-time augmentation is not available for it; run without mirror_tta (CLI: without --tta). "
                    "CT models never have it: their labels are the patient's right and left.")
            if any(not 0 <= a < n_sp for a in axes):
                raise ModelError(f"Model {spec.id!r}: input.tta_flip_axes {axes} must be spatial axes 0..{n_sp - 1}.")
            self._flip_dims = tuple(2 + a for a in axes)  # network input is (B, 1, *spatial)

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_catalog(cls, model_id: str, device: "str | torch.device" = "auto", *,
                     catalog: "str | Path | Any | None" = None, **options: Any) -> "Segmenter":
        """Load ``model_id`` from the shipped catalog (or ``catalog``: a path or a ``models.Catalog``).

        The weights' size and sha256 are verified before loading (``ChecksumError`` on mismatch).
        """
        from .models import Catalog, load_catalog, load_model

        cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        dev = resolve_device(device)
        network, spec = load_model(cat.get(model_id), dev)
        return cls(network, spec, device=dev, **options)

    @classmethod
    def from_file(cls, path: str | Path, device: "str | torch.device" = "auto", *, model_id: str | None = None,
                  **options: Any) -> "Segmenter":
        """Load a model from files outside the shipped catalog.

        ``path`` is one of:

        - a catalog JSON (``{"models": [...]}``): the model ``model_id``, or its only model;
        - a single catalog-entry JSON (``{"id": ..., "weights": {"file": ...}, ...}``), weights resolved
          beside it;
        - a ``.safetensors`` file with its catalog entry beside it, as ``<stem>.json`` or inside a
          ``catalog.json`` in the same folder (matched by ``weights.file``).

        Raises:
            ModelError / CatalogError / ChecksumError: missing, invalid or tampered files.
        """
        import json

        from .errors import CatalogError
        from .models import load_catalog, load_model, spec_from_dict

        p = Path(path)
        if not p.exists():
            raise ModelError(f"Model file {p} does not exist; pass a catalog .json or a .safetensors file.")
        dev = resolve_device(device)
        spec = None
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise CatalogError(f"{p} is not a readable JSON file ({exc}); pass a catalog or model entry.") from exc
            if isinstance(data, dict) and "models" in data:
                cat = load_catalog(p)
                if model_id is None and len(cat) != 1:
                    raise ModelError(f"{p} lists {len(cat)} models ({', '.join(cat.ids())}); pass model_id=...")
                spec = cat.get(model_id) if model_id is not None else cat.models[0]
            else:
                spec = spec_from_dict(data, p.parent)
        elif p.suffix.lower() == ".safetensors":
            entry = p.with_suffix(".json")
            if entry.is_file():
                spec = spec_from_dict(json.loads(entry.read_text(encoding="utf-8")), p.parent)
            elif (p.parent / "catalog.json").is_file():
                cat = load_catalog(p.parent / "catalog.json")
                matches = [m for m in cat if Path(m.weights["file"]).name == p.name]
                if matches:
                    spec = matches[0]
            if spec is None:
                raise ModelError(
                    f"No catalog entry found for {p.name}: put its entry beside it as {entry.name} "
                    "or in a catalog.json in the same folder."
                )
        else:
            raise ModelError(f"{p.name}: expected a .json catalog/entry or a .safetensors file.")
        network, spec = load_model(spec, dev)
        return cls(network, spec, device=dev, **options)

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.spec.id

    @property
    def classes(self) -> list[dict]:
        return sorted(self.spec.classes, key=lambda c: c["value"])

    @property
    def temperature(self) -> float:
        return float(self.spec.temperature) if self.apply_temperature else 1.0

    # -- prediction ---------------------------------------------------------------------------------------
    def predict(
        self,
        image: Any,
        spacing: Sequence[float] | None = None,
        *,
        direction: Any = None,
        progress: ProgressCallback | None = None,
        cancel: "threading.Event | None" = None,
        probabilities_dtype: Any = np.float16,
        apply_temperature: bool | None = None,
        band_mm: float | None = None,
        boundary_fill: float = float("nan"),
    ) -> Prediction:
        """Segment one image.

        Args:
            image: ``(Z, Y, X)`` or ``(Y, X)`` array (numpy/torch, any real dtype), or an ``io.Image`` (its
                geometry then gives spacing and direction). Never modified.
            spacing: mm per array axis, array order.
            direction: optional ``(3, 3)`` (or 9 values) direction cosines as SimpleITK gives them; a CT model
                uses it to reorient to axis-aligned LPS (outputs come back on the input's array grid).
            progress: ``progress(fraction in [0, 1], message)``.
            cancel: ``threading.Event``; when set, raises ``Cancelled`` within one batch/patch.
            probabilities_dtype: dtype of ``Prediction.probabilities`` (default float16; float32 on request;
                None = do not keep them, saving ``C x 2`` bytes per voxel when no reference metrics are needed).
            apply_temperature: override the segmenter's setting for this call.
            band_mm: band half-width for the boundary map; default ``2 x min(spacing)``.
            boundary_fill: value of the boundary map outside the band (NaN, or 0 for a Slicer layer).

        Returns:
            :class:`Prediction` on the input grid.

        Raises:
            InputError: bad image/spacing/direction, or too little memory for this volume (the message gives
                the estimate). Cancelled: ``cancel`` was set. ModelError: inference failed.
        """
        try:
            return self._predict(image, spacing, direction=direction, progress=progress, cancel=cancel,
                                 probabilities_dtype=probabilities_dtype, apply_temperature=apply_temperature,
                                 band_mm=band_mm, boundary_fill=boundary_fill)
        except MemoryError as exc:
            shape = tuple(getattr(getattr(image, "array", image), "shape", ()))
            voxels = int(np.prod(shape)) if shape else 0
            # labels + three float16 maps (7 B/voxel, measured: Testing/test_big_volume.py), the float32 volume
            # the 3D window needs, and the probabilities when kept
            per_voxel = 7 + (0 if self.spec.mode == "slicewise2d" else 4) + (
                0 if probabilities_dtype is None else np.dtype(probabilities_dtype).itemsize * self.spec.num_classes)
            raise InputError(
                f"Not enough memory to segment a volume of shape {shape} ({voxels:,} voxels): it needs about "
                f"{voxels * per_voxel / 2**30:.1f} GiB. Crop the volume to the eye (Slicer: Crop Volume), "
                "segment fewer slices at a time, or use a machine with more memory."
            ) from exc

    def _predict(
        self,
        image: Any,
        spacing: Sequence[float] | None,
        *,
        direction: Any,
        progress: ProgressCallback | None,
        cancel: "threading.Event | None",
        probabilities_dtype: Any,
        apply_temperature: bool | None,
        band_mm: float | None,
        boundary_fill: float,
    ) -> Prediction:
        """:meth:`predict` without the out-of-memory translation."""
        import torch

        from .heatmaps import default_band_mm, label_free_boundary_map
        from .preprocessing import apply_normalization, normalization_parameters

        t0 = time.perf_counter()
        report = progress if progress is not None else (lambda f, m: None)
        report(0.0, "preparing")
        _check_cancel(cancel)
        arr, spacing_t, direction_m = _validate_image(image, spacing, direction)
        input_shape = arr.shape
        input_spacing = spacing_t
        if arr.ndim == 2:
            if self.spec.mode != "slicewise2d":
                raise InputError(
                    f"Model {self.model_id!r} segments 3D volumes but the image is 2D {arr.shape}; "
                    "pass the whole volume."
                )
            arr = arr[None]
            spacing_t = (1.0,) + spacing_t
        perm, flips = (0, 1, 2), (False, False, False)
        if direction_m is not None and direction_m.shape == (3, 3) and self._reorients():
            perm, flips = _canonical_axes(direction_m)
            arr = _orient(arr, perm, flips)
            spacing_t = tuple(spacing_t[p] for p in perm)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            warnings.warn("The image has NaN/Inf voxels; they are treated as the lowest intensity.", RuntimeWarning,
                          stacklevel=2)
        # statistics from the whole volume; the values are applied slab by slab (2D) so no float32 copy of a
        # big volume exists, with exactly the values of normalising the whole volume at once
        norm_params = normalization_parameters(arr, self.spec.normalization)
        temperature = float(self.spec.temperature) if (
            self.apply_temperature if apply_temperature is None else apply_temperature) else 1.0
        if not (math.isfinite(temperature) and temperature > 0):
            raise ModelError(f"Model {self.model_id!r} has temperature {temperature}; it must be > 0. Fix the catalog.")
        t_prep = time.perf_counter()

        num_classes = self.spec.num_classes
        shape = arr.shape
        out = _Outputs(
            labels=np.empty(shape, dtype=np.uint8),
            probabilities=None if probabilities_dtype is None else np.empty(
                (num_classes,) + shape, dtype=np.dtype(probabilities_dtype)),
            confidence=np.empty(shape, dtype=np.float16),
            entropy=np.empty(shape, dtype=np.float16),
        )
        with torch.inference_mode():
            if self.spec.mode == "slicewise2d":
                self._run_slicewise(arr, norm_params, spacing_t, temperature, out, report, cancel)
            else:
                norm = apply_normalization(arr, norm_params)  # the 3D window needs the whole (model-grid) volume
                self._run_sliding3d(norm, spacing_t, temperature, out, report, cancel)
                del norm
        t_inf = time.perf_counter()

        report(0.92, "heat maps")
        _check_cancel(cancel)
        labels, probs, conf, ent = out.labels, out.probabilities, out.confidence, out.entropy
        if perm != (0, 1, 2) or any(flips):
            labels = _unorient(labels, perm, flips)
            conf = _unorient(conf, perm, flips)
            ent = _unorient(ent, perm, flips)
            probs = None if probs is None else _unorient(probs, perm, flips, lead=1)
        if len(input_shape) == 2:
            labels, conf, ent = labels[0], conf[0], ent[0]
            probs = None if probs is None else probs[:, 0]
        band = default_band_mm(input_spacing) if band_mm is None else float(band_mm)
        boundary = label_free_boundary_map(labels, ent, input_spacing, band_mm=band, fill=boundary_fill,
                                           dtype=np.float16)
        t_end = time.perf_counter()
        report(1.0, "done")
        return Prediction(
            labels=labels, probabilities=probs, confidence=conf, entropy=ent, boundary=boundary,
            spacing=input_spacing, classes=self.classes, model_id=self.model_id,
            model_version=str(getattr(self.spec, "version", "")), weights_sha256=self.weights_sha256,
            temperature=temperature, mirror_tta=self.mirror_tta, band_mm=band, device=str(self.device),
            seconds={"prepare": t_prep - t0, "inference": t_inf - t_prep, "heatmaps": t_end - t_inf,
                     "total": t_end - t0},
        )

    # -- internals ----------------------------------------------------------------------------------------
    def _reorients(self) -> bool:
        """CT models are trained axis-aligned in LPS; AS-OCT B-scan stacks keep their own array order."""
        explicit = self.spec.input.get("reorient")
        return bool(explicit) if explicit is not None else str(self.spec.modality).upper() == "CT"

    def _cval(self) -> float:
        """Padding value = the normalised intensity of 'nothing' (air / noise floor), not mid-grey 0."""
        norm = self.spec.normalization
        if norm.get("kind") in ("percentile", "hu_window"):
            return -float(norm.get("shift", 0.5)) / float(norm.get("scale", 0.5))
        return 0.0

    def _forward(self, cancel: "threading.Event | None", tick: Callable[[int], None]) -> Callable:
        """The predictor handed to MONAI: checks cancel, runs the network (autocast on CUDA), counts windows."""
        import torch

        def predictor(x: "torch.Tensor") -> "torch.Tensor":
            _check_cancel(cancel)
            if self.amp and x.device.type == "cuda":
                with torch.autocast(device_type="cuda", dtype=torch.float16):
                    y = self._logits(x)
            else:
                y = self._logits(x)
            tick(int(x.shape[0]))
            return y

        return predictor

    def _logits(self, x: "torch.Tensor") -> "torch.Tensor":
        """The network's float32 logits; with mirror TTA the mean over the input and its mirror images."""
        y = self.network(x).float()
        for dim in self._flip_dims:
            y = y + self.network(x.flip(dim)).float().flip(dim)
        return y / (1 + len(self._flip_dims)) if self._flip_dims else y

    def _fallback(self, exc: BaseException) -> None:
        """After a CUDA OOM: halve the batch, or move to the CPU when the batch is already 1."""
        import torch

        if self.device.type != "cuda":
            raise ModelError(f"Out of memory on {self.device} ({exc}); close other programs or use a smaller "
                             "volume.") from exc
        torch.cuda.empty_cache()
        slices_matter = self.spec.mode == "slicewise2d"
        if self.batch_size > 1 or (slices_matter and self.slice_batch > 1):
            self.batch_size = max(1, self.batch_size // 2)
            self.slice_batch = max(1, self.slice_batch // 2)
            msg = f"CUDA out of memory; retrying with batch size {self.batch_size}" + (
                f" ({self.slice_batch} slices at once)." if slices_matter else ".")
        else:
            self.device = torch.device("cpu")
            self.network.to(self.device)
            msg = "CUDA out of memory even with batch size 1; continuing on the CPU (slower)."
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _sliding(self, x: "torch.Tensor", roi: Sequence[int], cancel: Any,
                 tick: Callable[[int], None]) -> "torch.Tensor":
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            x, roi_size=list(roi), sw_batch_size=self.batch_size, predictor=self._forward(cancel, tick),
            overlap=self.overlap, mode="gaussian", cval=self._cval(), sw_device=self.device, device=self.device,
        )

    def _run_slicewise(self, image: np.ndarray, norm_params: dict, spacing: tuple, temperature: float,
                       out: "_Outputs", report: ProgressCallback, cancel: Any) -> None:
        """2D models: B-scans (axis 0 of ``image``, raw intensities) normalised and segmented a few at a time."""
        import torch
        import torch.nn.functional as F

        from .preprocessing import apply_normalization, resampled_shape

        depth, height, width = image.shape
        model_hw = resampled_shape((height, width), spacing[1:], self.spec.spacing_mm[1:])
        roi = tuple(self.spec.patch_size[-2:])  # a 3-value patch size of a 2D model: its in-plane part
        per_slice = _window_count(model_hw, roi, self.overlap, 1)
        total = max(1, per_slice * depth)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            report(0.05 + 0.85 * min(done[0] / total, 1.0), "segmenting slices")

        z0 = 0
        while z0 < depth:
            _check_cancel(cancel)
            z1 = min(z0 + self.slice_batch, depth)
            try:
                x = torch.from_numpy(apply_normalization(image[z0:z1], norm_params)).to(self.device)[:, None]
                if tuple(model_hw) != (height, width):
                    x = F.interpolate(x, size=tuple(model_hw), mode="bilinear", align_corners=False)
                logits = self._sliding(x, roi, cancel, tick)
                probs = torch.softmax(logits.float() / temperature, dim=1)
                del logits, x
                if tuple(model_hw) != (height, width):
                    probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
                out.store(probs.transpose(0, 1), slice(z0, z1))
            except _oom_errors() as exc:
                self._fallback(exc)
                continue
            z0 = z1

    def _run_sliding3d(self, norm: np.ndarray, spacing: tuple, temperature: float, out: "_Outputs",
                       report: ProgressCallback, cancel: Any) -> None:
        import torch
        import torch.nn.functional as F

        from .preprocessing import resampled_shape

        shape = norm.shape
        model_shape = resampled_shape(shape, spacing, self.spec.spacing_mm)
        roi = tuple(self.spec.patch_size)
        if len(roi) != 3:
            raise ModelError(
                f"Model {self.model_id!r} is sliding3d but its patch_size {roi} is not 3D; fix the catalog."
            )
        while True:
            total = _window_count(model_shape, roi, self.overlap, 1)
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                report(0.05 + 0.8 * min(done[0] / total, 1.0), "segmenting patches")

            try:
                x = torch.from_numpy(norm).to(self.device)[None, None]
                if tuple(model_shape) != tuple(shape):
                    x = F.interpolate(x, size=tuple(model_shape), mode="trilinear", align_corners=False)
                logits = self._sliding(x, roi, cancel, tick)[0]
                del x
                # softmax in place, slab by slab along z, so no second model-grid copy exists
                step = max(1, _SLAB_VOXELS // max(1, int(np.prod(model_shape[1:]))))
                for d0 in range(0, model_shape[0], step):
                    _check_cancel(cancel)
                    sl = logits[:, d0:d0 + step]
                    sl.copy_(torch.softmax(sl / temperature, dim=0))
                self._resample_back(logits, shape, out, report, cancel)
                return
            except _oom_errors() as exc:
                self._fallback(exc)

    def _resample_back(self, probs: "torch.Tensor", shape: tuple, out: "_Outputs", report: ProgressCallback,
                       cancel: Any) -> None:
        """Model-grid probabilities ``(C, D', H', W')`` -> input grid, slab by slab (separable trilinear)."""
        import torch
        import torch.nn.functional as F

        depth, height, width = shape
        src_depth = probs.shape[1]
        same_plane = tuple(probs.shape[2:]) == (height, width)
        step = max(1, _SLAB_VOXELS // max(1, height * width))
        for z0 in range(0, depth, step):
            _check_cancel(cancel)
            z1 = min(z0 + step, depth)
            if src_depth == depth:
                planes = probs[:, z0:z1]
            else:
                # align_corners=False source positions, clamped like torch's trilinear
                pos = (torch.arange(z0, z1, device=probs.device, dtype=torch.float64) + 0.5) * (src_depth / depth) - 0.5
                pos = pos.clamp(min=0)
                i0 = pos.floor().long().clamp(max=src_depth - 1)
                i1 = (i0 + 1).clamp(max=src_depth - 1)
                w = (pos - i0.to(pos.dtype)).to(probs.dtype).view(1, -1, 1, 1)
                planes = probs[:, i0] * (1 - w) + probs[:, i1] * w
            if not same_plane:
                planes = F.interpolate(planes.transpose(0, 1), size=(height, width), mode="bilinear",
                                       align_corners=False).transpose(0, 1)
            out.store(planes, slice(z0, z1))
            report(0.85 + 0.05 * z1 / depth, "resampling to the input grid")


@dataclass
class _Outputs:
    """Preallocated host arrays filled slab by slab along axis 0."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    confidence: np.ndarray
    entropy: np.ndarray

    def store(self, probs: "torch.Tensor", index: slice) -> None:
        """Store ``probs`` ``(C, z, Y, X)`` (float32, any device) into the rows ``index`` of every output."""
        import torch

        from .metrics._binning import top_label

        probs = probs.float()
        num_classes = probs.shape[0]
        conf, arg = top_label(probs)  # torch.argmax over the class axis is ~40x slower on CPU
        self.labels[index] = arg.to(torch.uint8).cpu().numpy()
        self.confidence[index] = conf.cpu().numpy()
        if num_classes > 1:
            ent = -torch.special.xlogy(probs, probs).sum(dim=0) / math.log(num_classes)
            self.entropy[index] = ent.clamp_(0.0, 1.0).cpu().numpy()
        else:
            self.entropy[index] = 0.0
        if self.probabilities is None:
            return
        torch_dtype = torch.float16 if self.probabilities.dtype == np.float16 else torch.float32
        self.probabilities[:, index] = probs.to(torch_dtype).cpu().numpy().astype(self.probabilities.dtype, copy=False)
