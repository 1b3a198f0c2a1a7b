"""Write the complete output set of one case (used by the CLI and by the Slicer module's "Export report").

Per case ``<name>`` in ``out_dir``:

==============================  =========================================================================
``<name>.seg.nrrd``             predicted segments (names, colours, terminology) for Slicer (slicerio)
``<name>_confidence.nrrd``      float32 top-label confidence in [0, 1]
``<name>_boundary.nrrd``        float32 boundary map in the band, 0 outside (a Slicer layer needs finite
                                voxels): label-free entropy map, or with a reference the signed map when
                                ``boundary="signed"``
``<name>_report.json/.csv``     :class:`~LensSegCalibLib.report.CalibrationReport`
``<name>_report.html``          one self-contained HTML file
``<name>_preview.png``          optional slice preview (demo)
==============================  =========================================================================

Every file is written atomically (``io.atomic_path``); existing files are never replaced unless
``overwrite=True``, and that is checked for the whole set *before* anything is written. The JSON report is
written last, so its presence marks a finished case (:func:`case_is_done`); a failure or cancel part-way removes
the files already written by that call.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import OutputError

if TYPE_CHECKING:
    from .inference import Prediction
    from .io import Geometry
    from .report import CalibrationReport

__all__ = ["OUTPUT_KINDS", "case_name", "output_paths", "case_is_done", "write_case_outputs", "volume_geometry"]

#: Output kinds in writing order (the JSON report last: it marks a finished case).
OUTPUT_KINDS = ("segmentation", "confidence", "boundary", "report_csv", "report_html", "report_json")


def case_name(path: str | os.PathLike) -> str:
    """Output base name of an input: file name without its (multi-part) image suffix, or the DICOM folder name."""
    from .io import full_suffix

    p = Path(path)
    if p.is_dir():
        return p.name or "case"
    suffix = full_suffix(p)
    name = p.name[: len(p.name) - len(suffix)] if suffix and p.name.lower().endswith(suffix) else p.stem
    return name or "case"


def output_paths(out_dir: str | os.PathLike, name: str, *, preview: bool = False) -> dict[str, Path]:
    """Paths of every output of case ``name`` (keys: :data:`OUTPUT_KINDS`, plus ``preview`` when asked)."""
    d = Path(out_dir)
    paths = {
        "segmentation": d / f"{name}.seg.nrrd",
        "confidence": d / f"{name}_confidence.nrrd",
        "boundary": d / f"{name}_boundary.nrrd",
        "report_csv": d / f"{name}_report.csv",
        "report_html": d / f"{name}_report.html",
        "report_json": d / f"{name}_report.json",
    }
    if preview:
        paths["preview"] = d / f"{name}_preview.png"
    return paths


def case_is_done(out_dir: str | os.PathLike, name: str) -> bool:
    """True when every output of ``name`` exists (a finished case; a rerun skips it without ``overwrite``)."""
    return all(p.is_file() for p in output_paths(out_dir, name).values())


def volume_geometry(geometry: "Geometry", ndim: int) -> "Geometry":
    """A 3D geometry for writing: a 2D geometry gets a unit slice axis (files and Slicer want volumes)."""
    from .io import Geometry

    if geometry.ndim == 3 or ndim != 2:
        return geometry
    d2 = geometry.direction_matrix()
    d3 = np.eye(3)
    d3[:2, :2] = d2
    return Geometry((1.0,) + tuple(geometry.spacing), tuple(geometry.origin) + (0.0,), tuple(d3.ravel()))


def write_case_outputs(
    out_dir: str | os.PathLike,
    name: str,
    prediction: "Prediction",
    geometry: "Geometry",
    report: "CalibrationReport",
    *,
    overwrite: bool = False,
    preview: bool = False,
    boundary: str = "label_free",
    cancel: Any = None,
) -> dict[str, Path]:
    """Write every output of one case; returns ``{kind: path}``.

    Args:
        out_dir: output folder (created if needed).
        name: case base name (see :func:`case_name`).
        prediction: the case's :class:`~LensSegCalibLib.inference.Prediction` (input grid).
        geometry: the input's :class:`~LensSegCalibLib.io.Geometry` (spacing, origin, direction copied).
        report: its :class:`~LensSegCalibLib.report.CalibrationReport`.
        overwrite: replace existing files; otherwise any existing output raises before anything is written.
        preview: also write ``<name>_preview.png`` (the report's slice figure).
        boundary: ``"label_free"`` (entropy in the predicted-boundary band) or ``"signed"`` (the report's
            reference-based signed map; needs a report made with a reference).
        cancel: optional ``threading.Event`` checked before each file; raises ``Cancelled``.

    A failure or cancel part-way removes the files this call wrote, so a case is either complete (its JSON
    exists) or absent. With ``overwrite`` the old JSON is removed first for the same reason, and on a failure
    the earlier outputs not yet rewritten are removed too (never a mix of old and new files).

    Raises:
        OutputError: outputs exist (without ``overwrite``), folder not writable, disk full.
    """
    from .io import ensure_output_dir, write_segmentation, write_volume

    ensure_output_dir(out_dir)
    paths = output_paths(out_dir, name, preview=preview)
    if not overwrite:
        existing = [p.name for p in paths.values() if p.exists()]
        if existing:
            raise OutputError(
                f"Outputs of {name} already exist in {out_dir} ({', '.join(existing)}); pass overwrite=True "
                "(CLI: --overwrite) to replace them, or choose another output folder."
            )
    labels = np.asarray(prediction.labels)
    geo = volume_geometry(geometry, labels.ndim)

    def vol(a: np.ndarray) -> np.ndarray:
        return a[None] if a.ndim == 2 else a

    if boundary == "signed":
        boundary_map = report.preview.get("signed_map")
        if boundary_map is None:
            raise OutputError("boundary='signed' needs a report made with a reference; use 'label_free'.")
    elif boundary == "label_free":
        boundary_map = prediction.boundary
    else:
        raise OutputError(f"boundary must be 'label_free' or 'signed', got {boundary!r}.")
    boundary_map = np.asarray(boundary_map)

    written: list[Path] = []

    def step(kind: str, write: Any) -> None:
        _check_cancel(cancel)
        write(paths[kind])
        written.append(paths[kind])

    try:
        if overwrite:
            # the JSON marks a finished case: remove it first, so an interrupted rewrite never looks finished
            paths["report_json"].unlink(missing_ok=True)
        step("segmentation", lambda p: write_segmentation(p, vol(labels), geo, prediction.classes,
                                                          overwrite=overwrite))
        # float32 files converted slab by slab from the float16 maps (no full-size copy); NaN outside the band
        # becomes 0 because Slicer layers need finite voxels (0 = no boundary)
        step("confidence", lambda p: write_volume(p, vol(np.asarray(prediction.confidence)), geo, dtype=np.float32,
                                                  overwrite=overwrite))
        step("boundary", lambda p: write_volume(p, vol(boundary_map), geo, dtype=np.float32, nan_fill=0.0,
                                                overwrite=overwrite))
        step("report_csv", lambda p: _write_text(p, report.to_csv(), overwrite))
        step("report_html", lambda p: report.to_html(p, overwrite=overwrite))
        if preview:
            step("preview", lambda p: _write_preview(p, report, overwrite))
        step("report_json", lambda p: _write_text(p, report.to_json(), overwrite))  # last: the case is finished
    except BaseException:
        # a failure or cancel leaves no partial set: remove what this call wrote (each file was complete); when
        # overwriting, the earlier files not rewritten yet go too (the user asked to replace them, and old and
        # new files must never form one case), so the plain rerun starts clean
        for path in written + (list(paths.values()) if overwrite else []):
            path.unlink(missing_ok=True)
        raise
    return paths


def _check_cancel(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        from .errors import Cancelled

        raise Cancelled("Export cancelled by the user; the files written so far were removed.")


def _write_text(path: Path, text: str, overwrite: bool) -> None:
    from .io import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _write_preview(path: Path, report: "CalibrationReport", overwrite: bool) -> None:
    import base64

    from .io import atomic_path
    from .report_html import _slice_figure

    b64 = _slice_figure(report)
    if b64 is None:
        raise OutputError(f"No preview available for {path.name}: the report has no slice.")
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_bytes(base64.b64decode(b64))


def describe(paths: dict[str, Path]) -> dict[str, Any]:
    """``{kind: file name}`` for logs and summaries."""
    return {k: p.name for k, p in paths.items()}
