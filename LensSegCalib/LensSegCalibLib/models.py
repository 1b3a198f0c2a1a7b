"""Model catalog, network construction and sha256-verified safetensors weights.

The catalog (``LensSegCalib/Resources/Models/catalog.json``) is data: one entry per model with its classes,
input spacing (array order, mm), intensity normalisation, network configuration, loss, post-hoc temperature,
training command, held-out metrics and weights file (name, sha256, size). It is validated against
``catalog.schema.json`` (beside it) with jsonschema before anything is used.

Weights are ``.safetensors`` only (no pickle, so a weights file can never execute code). :func:`load_model`
checks the file size and the sha256 *before* reading a tensor and refuses a mismatch with
:class:`~LensSegCalibLib.errors.ChecksumError`.

Example::

    >>> from LensSegCalibLib.models import load_catalog, load_model
    >>> cat = load_catalog()
    >>> cat.ids()                                   # doctest: +SKIP
    ['asoct-lens-acw', 'asoct-lens-ce', 'asoct-lens-sdc', 'ct-lens-acw']
    >>> net, spec = load_model("asoct-lens-acw")    # doctest: +SKIP
    >>> spec.class_names                            # doctest: +SKIP
    ['Background', 'Lens capsule', 'Lens cortex', 'Lens nucleus']

Logits of ``net`` divided by ``spec.temperature`` give the temperature-scaled probabilities (optional).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .errors import CatalogError, ChecksumError, ModelError

if TYPE_CHECKING:  # torch is imported lazily: importing this module must stay cheap for Slicer
    import torch

__all__ = [
    "MODELS_DIR",
    "DEFAULT_CATALOG",
    "SCHEMA_PATH",
    "ModelSpec",
    "Catalog",
    "load_catalog",
    "spec_from_dict",
    "validate_catalog_dict",
    "build_network",
    "load_model",
    "save_weights",
    "sha256_file",
    "verify_weights",
    "update_catalog_entry",
]

#: Folder with catalog.json, catalog.schema.json and the ``*.safetensors`` files.
MODELS_DIR: Path = Path(__file__).resolve().parents[1] / "Resources" / "Models"
DEFAULT_CATALOG: Path = MODELS_DIR / "catalog.json"
SCHEMA_PATH: Path = MODELS_DIR / "catalog.schema.json"

_HASH_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------------
# schema validation
# ----------------------------------------------------------------------------------------------------------
def _load_schema(schema_path: Path | None = None) -> dict:
    path = Path(schema_path) if schema_path is not None else SCHEMA_PATH
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CatalogError(
            f"Catalog schema {path} is missing. Reinstall LensSegCalib (the schema ships beside catalog.json)."
        ) from exc
    except json.JSONDecodeError as exc:
        raise CatalogError(f"Catalog schema {path} is not valid JSON ({exc}). Reinstall LensSegCalib.") from exc


def _field_path(parts: Sequence[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validate_catalog_dict(data: Mapping[str, Any], *, source: str = "catalog", schema_path: Path | None = None,
                          definition: str | None = None) -> None:
    """Validate a parsed catalog (or, with ``definition="model"``, one model entry) against the schema.

    Raises:
        CatalogError: naming the first failing field as a JSON path (e.g. ``$.models[0].weights.sha256``),
            the reason, and the fix.
    """
    import jsonschema  # light, but keep the package import cheap

    schema = _load_schema(schema_path)
    if definition is not None:
        defs = schema.get("$defs", {})
        if definition not in defs:
            raise CatalogError(f"Catalog schema has no definition {definition!r}. Reinstall LensSegCalib.")
        schema = {"$schema": schema.get("$schema"), "$defs": defs, "$ref": f"#/$defs/{definition}"}
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        # best_match picks the most relevant error of a oneOf/anyOf tree; fall back to the shallowest one.
        err = jsonschema.exceptions.best_match(errors) or errors[0]
        where = _field_path(list(err.absolute_path))
        raise CatalogError(
            f"{source}: field {where} is invalid: {err.message}. Fix that field so it matches "
            f"catalog.schema.json (see docs/TRAINING.md for the catalog format)."
        )


# ----------------------------------------------------------------------------------------------------------
# ModelSpec / Catalog
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry, resolved.

    Attributes:
        id, title, version, task, modality, description: identification (``task`` e.g. ``"asoct-lens"``).
        classes: list of dicts ``{value, key, name, color: [r, g, b] 0..255, terminology}``; value 0 = background.
        input: ``spacing_mm`` (model grid, array order ``(sz, sy, sx)``, mm), ``dims`` (2 or 3), ``mode``
            (``"slicewise2d"``: every slice along axis 0 is one 2D sample; ``"sliding3d"``), ``patch_size``
            (``roi_size`` accepted as an alias) in voxels of the model grid, ``normalization`` (see
            :func:`LensSegCalibLib.preprocessing.normalize_intensity`).
        network: kwargs of :func:`build_network`. loss: ``{"name": ..., "params": {...}}``.
        temperature: post-hoc temperature T > 0 (probabilities = softmax(logits / T)); 1.0 = none.
        weights: ``{"file", "sha256", "bytes"}``; ``weights_path``: the resolved file path.
        training, heldout_metrics: provenance and held-out numbers (free-form dicts).
    """

    id: str
    title: str
    version: str
    task: str
    modality: str
    description: str
    classes: list[dict]
    input: dict
    network: dict
    loss: dict
    temperature: float
    weights: dict
    weights_path: Path
    training: dict = field(default_factory=dict)
    heldout_metrics: dict = field(default_factory=dict)

    # -- helpers -------------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Display names ordered by label value (index = label value)."""
        return [c["name"] for c in sorted(self.classes, key=lambda c: c["value"])]

    @property
    def class_keys(self) -> list[str]:
        """Machine keys (``"capsule"``, ``"right_lens"``...) ordered by label value."""
        return [c["key"] for c in sorted(self.classes, key=lambda c: c["value"])]

    @property
    def num_classes(self) -> int:
        """Number of output channels, background included."""
        return len(self.classes)

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Model-grid spacing in mm, array order."""
        return tuple(float(s) for s in self.input["spacing_mm"])

    @property
    def mode(self) -> str:
        return str(self.input["mode"])

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Patch / ROI size in voxels of the model grid (2 values for slicewise2d, 3 for sliding3d)."""
        ps = self.input.get("patch_size", self.input.get("roi_size"))
        return tuple(int(v) for v in ps)

    @property
    def normalization(self) -> dict:
        return dict(self.input["normalization"])

    def to_dict(self) -> dict:
        """The JSON catalog entry (without the resolved path)."""
        return {
            "id": self.id, "title": self.title, "version": self.version, "task": self.task,
            "modality": self.modality, "description": self.description,
            "classes": copy.deepcopy(self.classes), "input": copy.deepcopy(self.input),
            "network": copy.deepcopy(self.network), "loss": copy.deepcopy(self.loss),
            "temperature": float(self.temperature), "training": copy.deepcopy(self.training),
            "heldout_metrics": copy.deepcopy(self.heldout_metrics), "weights": copy.deepcopy(self.weights),
        }


def spec_from_dict(entry: Mapping[str, Any], base_dir: str | os.PathLike | None = None, *,
                   validate: bool = True) -> ModelSpec:
    """Build a :class:`ModelSpec` from one catalog entry (a dict as in catalog.json).

    Args:
        entry: the model entry. It is deep-copied, never modified.
        base_dir: folder the weights file name is resolved against (default: the shipped models folder).
        validate: check the entry against the schema's ``model`` definition first.
    """
    if validate:
        validate_catalog_dict(entry, source=f"model entry {entry.get('id', '?')!r}", definition="model")
    e = copy.deepcopy(dict(entry))
    base = Path(base_dir) if base_dir is not None else MODELS_DIR
    values = sorted(c["value"] for c in e["classes"])
    if values != list(range(len(values))):
        raise CatalogError(
            f"model {e['id']!r}: class values must be 0..C-1 without gaps, got {values}. Renumber the classes."
        )
    out_ch = e["network"].get("out_channels")
    if out_ch is not None and int(out_ch) != len(values):
        raise CatalogError(
            f"model {e['id']!r}: network.out_channels={out_ch} but {len(values)} classes are listed. "
            "Make them agree."
        )
    return ModelSpec(
        id=e["id"], title=e["title"], version=e["version"], task=e["task"], modality=e["modality"],
        description=e.get("description", ""), classes=e["classes"], input=e["input"], network=e["network"],
        loss=e.get("loss", {"name": "unknown", "params": {}}), temperature=float(e.get("temperature", 1.0)),
        weights=e["weights"], weights_path=(base / e["weights"]["file"]).resolve(),
        training=e.get("training", {}), heldout_metrics=e.get("heldout_metrics", {}),
    )


@dataclass(frozen=True)
class Catalog:
    """The parsed, validated catalog. ``models`` keeps the file order."""

    models: tuple[ModelSpec, ...]
    path: Path | None = None

    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def get(self, model_id: str) -> ModelSpec:
        """The spec of ``model_id``; unknown id -> ModelError listing the known ids."""
        for m in self.models:
            if m.id == model_id:
                return m
        raise ModelError(
            f"Unknown model id {model_id!r}. Known models: {', '.join(self.ids()) or '(none)'}. "
            "Use one of these (`lenssegcalib models` lists them)."
        )

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, model_id: object) -> bool:
        return any(m.id == model_id for m in self.models)


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    """Read and validate a catalog file (default: the shipped ``Resources/Models/catalog.json``).

    Weights file names are resolved relative to the catalog's folder.

    Raises:
        CatalogError: missing/unreadable file, invalid JSON, schema violation (with the failing field),
            duplicate ids.
    """
    p = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CatalogError(f"Model catalog {p} does not exist. Pass the path of a catalog.json "
                           "or reinstall LensSegCalib to restore the shipped one.") from exc
    except OSError as exc:
        raise CatalogError(f"Model catalog {p} cannot be read ({exc}). Check its permissions.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"Model catalog {p} is not valid JSON (line {exc.lineno}: {exc.msg}). "
                           "Fix the syntax or restore the shipped file.") from exc
    validate_catalog_dict(data, source=str(p))
    specs = tuple(spec_from_dict(m, p.parent, validate=False) for m in data["models"])
    ids = [s.id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise CatalogError(f"Model catalog {p} lists ids more than once: {dup}. Give every model a unique id.")
    return Catalog(models=specs, path=p.resolve())


def update_catalog_entry(entry: Mapping[str, Any], path: str | os.PathLike | None = None) -> Catalog:
    """Insert or replace (by id) one model entry and rewrite the catalog atomically; returns the new catalog.

    The entry is validated first, so a bad entry never reaches the file.
    """
    p = Path(path) if path is not None else DEFAULT_CATALOG
    validate_catalog_dict(entry, source=f"model entry {entry.get('id', '?')!r}", definition="model")
    if p.exists():
        data = json.loads(p.read_text(encoding="utf-8"))
    else:
        data = {"catalog_version": 1, "models": []}
    models = [m for m in data.get("models", []) if m.get("id") != entry["id"]]
    models.append(copy.deepcopy(dict(entry)))
    models.sort(key=lambda m: m["id"])
    data["models"] = models
    validate_catalog_dict(data, source=str(p))
    _atomic_write_bytes(p, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    return load_catalog(p)


# ----------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------
_UNET_KEYS = {"spatial_dims", "in_channels", "out_channels", "channels", "strides", "kernel_size",
              "up_kernel_size", "num_res_units", "act", "norm", "dropout", "bias", "adn_ordering"}
_DYNUNET_KEYS = {"spatial_dims", "in_channels", "out_channels", "kernel_size", "strides", "upsample_kernel_size",
                 "filters", "dropout", "norm_name", "act_name", "res_block", "trans_bias"}


def _jsonable_to_monai(v: Any) -> Any:
    # JSON has no tuples; MONAI accepts lists for (name, kwargs) pairs only as tuples.
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], dict):
        return (v[0], v[1])
    return v


def build_network(network: Mapping[str, Any]) -> "torch.nn.Module":
    """Build a MONAI network from its catalog configuration.

    ``network["name"]`` is ``"UNet"`` (``monai.networks.nets.UNet``: spatial_dims, in_channels, out_channels,
    channels, strides, num_res_units, norm, dropout, ...) or ``"DynUNet"`` (``kernel_size``, ``strides``,
    ``upsample_kernel_size``, ``filters``, ``norm_name``, ``res_block``; deep supervision is always off).
    The module maps ``(B, in_channels, *S)`` to logits ``(B, out_channels, *S)``.

    Raises:
        ModelError: unknown name or unknown/invalid keyword.
    """
    from monai.networks.nets import DynUNet, UNet

    cfg = dict(network)
    name = cfg.pop("name", None)
    if name == "UNet":
        allowed, cls = _UNET_KEYS, UNet
    elif name == "DynUNet":
        allowed, cls = _DYNUNET_KEYS, DynUNet
    else:
        raise ModelError(f"Unknown network name {name!r}: use 'UNet' or 'DynUNet' in the catalog's network.name.")
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ModelError(f"Network {name}: unknown parameter(s) {unknown}. Allowed: {sorted(allowed)}.")
    kwargs = {k: _jsonable_to_monai(v) for k, v in cfg.items()}
    if name == "DynUNet":
        kwargs["deep_supervision"] = False
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(f"Network {name} cannot be built from {dict(network)} ({exc}). Fix the network "
                         "configuration in the catalog/config.") from exc


# ----------------------------------------------------------------------------------------------------------
# weights I/O
# ----------------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a catalog/weights file must be readable by every user
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(module: "torch.nn.Module", path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Write ``module.state_dict()`` as safetensors, atomically (temp file + rename). Returns (sha256, bytes).

    Tensors are copied to CPU and made contiguous; the module is not modified. A ``DistributedDataParallel``
    wrapper is unwrapped (its ``module.`` prefix never reaches the file).
    """
    from safetensors.torch import save

    inner = getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in inner.state_dict().items()}
    meta = {"format": "pt", "producer": "LensSegCalib"}
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    blob = save(state, metadata=meta)
    p = Path(path)
    _atomic_write_bytes(p, blob)
    return hashlib.sha256(blob).hexdigest(), len(blob)


def verify_weights(spec: ModelSpec) -> Path:
    """Check that the weights file exists and matches the catalog's size and sha256; return its path.

    Raises:
        ModelError: the file is missing. ChecksumError: size or hash differ (names file, expected, actual).
    """
    p = spec.weights_path
    if not p.is_file():
        raise ModelError(
            f"Weights of model {spec.id!r} not found: {p}. Reinstall LensSegCalib, or retrain with "
            f"`{spec.training.get('command', 'lenssegcalib train --config ...')}`."
        )
    expected_bytes = int(spec.weights["bytes"])
    actual_bytes = p.stat().st_size
    expected = str(spec.weights["sha256"]).lower()
    if actual_bytes != expected_bytes:
        raise ChecksumError(
            f"Weights file {p} of model {spec.id!r} has {actual_bytes} bytes, the catalog expects "
            f"{expected_bytes} (sha256 {expected}). The file is truncated or replaced: restore the shipped "
            "file (reinstall) or retrain the model; it was not loaded."
        )
    actual = sha256_file(p)
    if actual != expected:
        raise ChecksumError(
            f"Weights file {p} of model {spec.id!r} fails its checksum: expected sha256 {expected}, "
            f"got {actual}. The file was modified or corrupted: restore the shipped file (reinstall) or "
            "retrain the model; it was not loaded."
        )
    return p


def load_model(spec_or_id: ModelSpec | str, device: "str | torch.device" = "cpu",
               catalog: Catalog | None = None) -> tuple["torch.nn.Module", ModelSpec]:
    """Build the network of a catalog model, verify and load its weights, return ``(module, spec)``.

    The module is in eval mode on ``device`` and returns raw logits (apply ``/ spec.temperature`` for the
    temperature-scaled probabilities). Size and sha256 are verified before any tensor is read, and only
    safetensors are read (no pickle).

    Raises:
        ModelError: unknown id (lists the known ids), missing file, weights that do not fit the network.
        ChecksumError: size/sha256 mismatch.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if isinstance(spec_or_id, ModelSpec):
        spec = spec_or_id
    else:
        spec = (catalog if catalog is not None else load_catalog()).get(str(spec_or_id))
    path = verify_weights(spec)
    net = build_network(spec.network)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"Weights file {path} of model {spec.id!r} is not a readable safetensors file ({exc}). "
                         "Restore the shipped file or retrain.") from exc
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"Weights file {path} does not fit the network of model {spec.id!r} ({str(exc).splitlines()[0]}). "
            "The catalog's network configuration and the weights disagree: retrain or fix the catalog."
        ) from exc
    net = net.to(torch.device(device))
    net.eval()
    return net, spec
