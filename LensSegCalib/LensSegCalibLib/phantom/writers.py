"""Write phantoms so that anyone can open them in 3D Slicer: image NRRD, ``.seg.nrrd``, visibility, JSON meta."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .asoct import asoct_volume
from .base import Phantom
from .ct import ct_head_volume

__all__ = ["CLASSES", "TASKS", "write_phantom", "phantom_geometry", "meta_to_json"]

_CONTEXT = "Segmentation category and type - LensSegCalib"
_ANAT = "SCT^123037004^Anatomical Structure"


def _term(type_code: str, modifier: str = "") -> str:
    # context~category~type~typeModifier~regionContext~region~regionModifier (SLICER.md 3.2)
    return f"{_CONTEXT}~{_ANAT}~{type_code}~{modifier or '^^'}~~^^~^^"


#: Segment table per task (value, key, name, colour 0..255, terminology), copied by the model catalog.
#: Colours match Resources/SegmentationCategoryTypeModifier-LensSegCalib.term.json.
CLASSES: dict[str, list[dict[str, Any]]] = {
    "asoct": [
        {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
        {"value": 1, "key": "capsule", "name": "Lens capsule", "color": [255, 220, 80],
         "terminology": _term("99LSC^1001^Lens capsule")},
        {"value": 2, "key": "cortex", "name": "Lens cortex", "color": [100, 180, 255],
         "terminology": _term("99LSC^1002^Lens cortex")},
        {"value": 3, "key": "nucleus", "name": "Lens nucleus", "color": [230, 90, 60],
         "terminology": _term("99LSC^1003^Lens nucleus")},
    ],
    "ct": [
        {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
        {"value": 1, "key": "right_lens", "name": "Right lens", "color": [110, 200, 250],
         "terminology": _term("SCT^78076003^Lens", "SCT^24028007^Right")},
        {"value": 2, "key": "left_lens", "name": "Left lens", "color": [250, 170, 90],
         "terminology": _term("SCT^78076003^Lens", "SCT^7771000^Left")},
    ],
}
TASKS = {"asoct": asoct_volume, "ct": ct_head_volume}


def phantom_geometry(phantom: Phantom) -> Any:
    """``io.Geometry`` of a phantom (spacing in array order, LPS origin and direction)."""
    from ..io import Geometry

    return Geometry(tuple(phantom.spacing), tuple(phantom.origin), tuple(phantom.direction))


def meta_to_json(meta: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of a phantom's ``meta`` without array entries (``visible`` is written as an image)."""

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return {k: conv(v) for k, v in meta.items() if not isinstance(v, np.ndarray)}


def write_phantom(
    task: str,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    shape: tuple[int, int, int] | None = None,
    overwrite: bool = False,
    **variation: Any,
) -> dict[str, Path]:
    """Generate one phantom and write it for Slicer.

    Files (in ``out_dir``, created if needed): ``<task>_<seed>.nrrd`` (image with geometry; float32 display
    intensity for AS-OCT, int16 HU for CT),
    ``<task>_<seed>.seg.nrrd`` (labels as named, coloured segments with terminology),
    ``<task>_<seed>_visible.nrrd`` (uint8 0/1 beam-visibility mask), ``<task>_<seed>.json`` (metadata).

    Args:
        task: ``"asoct"`` or ``"ct"``.
        seed, shape, **variation: passed to ``asoct_volume`` / ``ct_head_volume``.
        overwrite: replace existing files; without it an existing file raises OutputError and nothing is written.

    Returns:
        ``{"image", "segmentation", "visible", "meta"}`` -> written paths.

    Raises:
        InputError: unknown task (or bad generator arguments). OutputError: file exists / not writable.
    """
    from ..io import atomic_path, ensure_output_dir, write_segmentation, write_volume

    if task not in TASKS:
        raise InputError(f"Unknown phantom task {task!r}; use one of {sorted(TASKS)}.")
    out = ensure_output_dir(out_dir)
    stem = f"{task}_{int(seed)}"
    paths = {"image": out / f"{stem}.nrrd", "segmentation": out / f"{stem}.seg.nrrd",
             "visible": out / f"{stem}_visible.nrrd", "meta": out / f"{stem}.json"}
    if not overwrite:  # refuse before the (slower) generation and before writing anything
        from ..errors import OutputError

        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise OutputError(f"{existing[0]} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    phantom = TASKS[task](seed, shape=shape, **variation)
    geometry = phantom_geometry(phantom)
    # CT is integer HU in [-1024, 3071]: store it as int16 like a scanner series (exact, half the size)
    image = phantom.image.astype(np.int16) if task == "ct" else phantom.image
    write_volume(paths["image"], image, geometry, overwrite=overwrite)
    write_segmentation(paths["segmentation"], phantom.labels, geometry, CLASSES[task], overwrite=overwrite)
    write_volume(paths["visible"], phantom.visible.astype(np.uint8), geometry, overwrite=overwrite)
    meta = meta_to_json(phantom.meta)
    meta["files"] = {k: p.name for k, p in paths.items()}
    meta["classes"] = CLASSES[task]
    with atomic_path(paths["meta"], overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    return paths
