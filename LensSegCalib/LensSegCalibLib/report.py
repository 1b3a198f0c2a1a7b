"""Per-segment calibration reports: ``calibration_report(...) -> CalibrationReport`` with JSON / CSV / HTML.

Without a reference the report describes the prediction itself (per segment: voxels, volume, confidence
statistics, confidence and entropy in the boundary band). With a reference segmentation on the same grid it
adds overlap, surface-distance and calibration metrics, every number computed by ``LensSegCalibLib.metrics``
(METHODS.md 2, 3, 9) on exactly ``prediction.probabilities`` / ``prediction.labels``. Field meanings are listed
in ``docs/heatmaps.md`` ("Report fields").

Example::

    >>> rep = calibration_report(pred, pred.spacing, reference=ref)   # doctest: +SKIP
    >>> rep.segments[0].dice, rep.summary["ece"]                       # doctest: +SKIP
    >>> Path("case_report.json").write_text(rep.to_json())             # doctest: +SKIP
    >>> rep.to_html("case_report.html")                                # doctest: +SKIP
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .inference import Prediction

__all__ = ["SegmentReport", "CalibrationReport", "calibration_report", "package_versions", "REPORT_BINS"]

#: Bins of ECE / class-wise ECE / BECE and of the reliability diagrams (METHODS.md 9 defaults).
REPORT_BINS = 15
#: Bins of pECE (official definition, METHODS.md 3).
PECE_BINS = 10


@dataclass
class SegmentReport:
    """Numbers for one segment (label value ``value`` >= 1).

    Prediction-only fields are always present; reference fields are NaN without a reference.
    Volumes in mL, distances in mm, calibration errors as fractions (x100 for %).
    """

    value: int
    key: str
    name: str
    color: tuple[int, int, int]
    voxels: int
    volume_ml: float
    mean_confidence: float
    median_confidence: float
    p5_confidence: float
    fraction_below_0_5: float
    fraction_below_0_9: float
    band_voxels: int
    band_mean_confidence: float
    band_mean_entropy: float
    # with a reference
    reference_voxels: int = -1
    reference_volume_ml: float = math.nan
    dice: float = math.nan
    iou: float = math.nan
    hd95_mm: float = math.nan
    assd_mm: float = math.nan
    ece: float = math.nan
    classwise_ece: float = math.nan
    bece: float = math.nan
    pece: float = math.nan
    nll: float = math.nan
    brier: float = math.nan
    reliability: dict[str, list[float]] | None = None
    confidence_histogram: list[int] = field(default_factory=list)


@dataclass
class CalibrationReport:
    """A report for one case: per-segment rows, a case summary, provenance, and a small preview for HTML."""

    segments: list[SegmentReport]
    summary: dict[str, Any]
    meta: dict[str, Any]
    preview: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: NaN -> null, +/-inf -> "inf"/"-inf" strings (JSON has no such numbers)."""
        return _jsonable({"meta": self.meta, "summary": self.summary, "segments": [asdict(s) for s in self.segments]})

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON text (model id, weights sha256, package versions, input sha256, time, numbers)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_csv(self) -> str:
        """One row per segment (prediction and reference fields; reliability bins left to the JSON)."""
        skip = {"reliability", "confidence_histogram", "color"}
        names = [f for f in SegmentReport.__dataclass_fields__ if f not in skip]
        buf = _io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case", "model_id"] + names)
        case = str(self.meta.get("case", ""))
        model = str(self.meta.get("model", {}).get("id", ""))
        for seg in self.segments:
            row = [case, model]
            for n in names:
                v = getattr(seg, n)
                row.append(_csv_value(v))
            writer.writerow(row)
        return buf.getvalue()

    def to_html(self, path: str | Path | None = None, *, overwrite: bool = True) -> str:
        """Render one self-contained HTML file (PNG figures inlined as base64; user text escaped).

        Args:
            path: where to write it (atomically); ``None`` only returns the text.
            overwrite: replace an existing file.

        Returns:
            The HTML text.
        """
        from .report_html import render_html

        text = render_html(self)
        if path is not None:
            from .io import atomic_path

            with atomic_path(path, overwrite=overwrite) as tmp:
                Path(tmp).write_text(text, encoding="utf-8")
        return text

    def segment(self, key_or_name: str) -> SegmentReport:
        """The row of a segment by key or display name."""
        for s in self.segments:
            if key_or_name in (s.key, s.name):
                return s
        raise KeyError(f"No segment {key_or_name!r}; have {[s.key for s in self.segments]}.")


# ----------------------------------------------------------------------------------------------- helpers
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _csv_value(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else repr(float(v))
    return str(v)


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers (for the report's provenance)."""
    from importlib import metadata

    from . import __version__

    out = {"lenssegcalib": __version__, "python": platform.python_version()}
    for dist in ("torch", "monai", "numpy", "scipy", "SimpleITK", "slicerio", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class _ConfidenceValues:
    """Collects one segment's confidences slab by slab and gives the report's statistics of all of them.

    float16 confidences (what the segmenter produces) are counted per bit pattern (65,536 counters), which
    holds all of them exactly in 512 KiB whatever the volume; other dtypes keep the values themselves.
    The statistics equal those of the concatenated values (``np.percentile``'s linear rule; ``np.histogram``).
    """

    def __init__(self) -> None:
        self._counts: np.ndarray | None = None  # float16 bit-pattern counts
        self._parts: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        if values.dtype == np.float16:
            counts = np.bincount(values.view(np.uint16), minlength=1 << 16)
            self._counts = counts if self._counts is None else self._counts + counts
        else:
            self._parts.append(values.astype(np.float64))

    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct values (float64) and their counts (one source: a map has one dtype)."""
        if self._counts is not None:
            bits = np.flatnonzero(self._counts)
            v, c = bits.astype(np.uint16).view(np.float16).astype(np.float64), self._counts[bits]
            order = np.argsort(v, kind="stable")  # bit-pattern order is value order only for values >= 0
            return v[order], c[order].astype(np.int64)
        if self._parts:
            v, c = np.unique(np.concatenate(self._parts), return_counts=True)
            return v, c.astype(np.int64)
        return np.zeros(0), np.zeros(0, dtype=np.int64)

    def stats(self, edges: np.ndarray) -> tuple[tuple[float, float, float, float, float], list[int]]:
        """(mean, median, P5, fraction < 0.5, fraction < 0.9) and the histogram over ``edges``; NaN when empty."""
        v, c = self._table()
        n = int(c.sum())
        if n == 0:
            return (math.nan,) * 5, [0] * (len(edges) - 1)
        cum = np.cumsum(c)

        def order_statistic(k: int) -> float:  # k-th smallest (0-based)
            return float(v[int(np.searchsorted(cum, k, side="right"))])

        def percentile(q: float) -> float:  # numpy's default 'linear' method
            pos = q / 100.0 * (n - 1)
            k = int(math.floor(pos))
            lo, hi = order_statistic(k), order_statistic(min(k + 1, n - 1))
            return float(np.percentile(np.array([lo, hi]), 100.0 * (pos - k)))

        below = lambda t: float(c[v < t].sum() / n)  # noqa: E731
        mean = float(np.dot(v, c) / n)
        hist = np.histogram(v, bins=edges, weights=c)[0]
        return (mean, percentile(50), percentile(5), below(0.5), below(0.9)), [int(h) for h in hist]


def _preview(prediction: "Prediction", image: np.ndarray | None, reference: np.ndarray | None,
             heatmap: np.ndarray | None) -> dict[str, Any]:
    """The slice (axis 0) with the most foreground, small enough to keep in the report for the HTML figures."""
    labels = prediction.labels
    if labels.ndim == 2:
        index = 0
        take = lambda a: None if a is None else np.asarray(a)  # noqa: E731
    else:
        fg = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
        index = int(np.argmax(fg)) if fg.max(initial=0) > 0 else labels.shape[0] // 2
        # a copy of the one slice, not a view: the report must not keep a big input volume alive
        take = lambda a: None if a is None else np.array(a[index])  # noqa: E731
    return {
        "slice_index": index,
        "image": take(image),
        "labels": take(labels),
        "reference": take(reference),
        "confidence": take(prediction.confidence),
        "heatmap": take(heatmap if heatmap is not None else prediction.boundary),
        "heatmap_kind": "signed boundary calibration" if heatmap is not None else "boundary uncertainty",
        "spacing": tuple(prediction.spacing[-2:]),
    }


# ----------------------------------------------------------------------------------------------- main API
def calibration_report(
    prediction: "Prediction",
    spacing: Sequence[float] | None = None,
    reference: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    *,
    band_mm: float | None = None,
    n_bins: int = REPORT_BINS,
    image: np.ndarray | None = None,
    case: str = "",
    input_sha256: str = "",
    input_path: str | Path | None = None,
    reference_path: str | Path | None = None,
) -> CalibrationReport:
    """Build the per-segment calibration report of one prediction.

    Args:
        prediction: a :class:`~LensSegCalibLib.inference.Prediction` (labels, probabilities, confidence,
            entropy on one grid ``S``).
        spacing: mm per array axis (default ``prediction.spacing``).
        reference: optional integer ``(*S)`` reference labels on the prediction's grid (same label values).
        class_names: display names by label value (default: the model's names).
        band_mm: boundary band half-width in mm (default ``2 x min(spacing)``).
        n_bins: bins of ECE / class-wise ECE / BECE / reliability (pECE keeps its official 10).
        image: optional input image (``(*S)``) for the HTML slice figure.
        case, input_sha256, input_path, reference_path: provenance written into the JSON.

    Returns:
        :class:`CalibrationReport`.

    Raises:
        InputError: reference on another grid, or with labels the model does not have.
    """
    from . import heatmaps

    spacing_t = tuple(float(s) for s in (prediction.spacing if spacing is None else spacing))
    labels = np.asarray(prediction.labels)
    if len(spacing_t) != labels.ndim:
        raise InputError(f"spacing {spacing_t} does not fit the {labels.ndim}D prediction; give one value per axis.")
    classes = sorted(prediction.classes, key=lambda c: c["value"])
    names = list(class_names) if class_names is not None else [str(c["name"]) for c in classes]
    if len(names) != len(classes):
        raise InputError(f"class_names has {len(names)} names for {len(classes)} classes; give one per label value.")
    band = heatmaps.default_band_mm(spacing_t) if band_mm is None else float(band_mm)
    voxel_ml = float(np.prod(spacing_t)) / 1000.0
    ref = None
    if reference is not None:
        ref = np.asarray(reference)
        if ref.shape != labels.shape:
            raise InputError(
                f"The reference has shape {ref.shape} but the prediction {labels.shape}; resample the reference "
                "onto the image grid (Slicer: Resample Scalar/Vector/DWI Volume, nearest neighbour) and retry."
            )
        if ref.size and (ref.min() < 0 or ref.max() >= len(classes)):
            raise InputError(
                f"The reference holds label values {int(ref.min())}..{int(ref.max())} but model "
                f"{prediction.model_id!r} has {len(classes)} classes (0..{len(classes) - 1}); map its labels to "
                "the model's classes first."
            )
        if prediction.probabilities is None:
            raise InputError(
                "Reference metrics need the probabilities, but this prediction was made with "
                "probabilities_dtype=None; predict again with the default (float16)."
            )
    conf = np.asarray(prediction.confidence)
    ent = np.asarray(prediction.entropy)
    edges = np.linspace(0.0, 1.0, 21)

    ref_metrics = _reference_metrics(prediction, ref, spacing_t, band, n_bins) if ref is not None else None
    segments: list[SegmentReport] = []
    for cls, name in zip(classes, names):
        value = int(cls["value"])
        if value == 0:
            continue
        # One pass of slabs per segment (the heat maps' band helper: the BECE band, streamed with a halo), so a
        # big volume never needs a full-size mask, band or copy of its confidences.
        values = _ConfidenceValues()
        voxels = nb = 0
        band_conf = band_ent = 0.0
        for rows, seg_band in heatmaps.boundary_band_slabs(labels, spacing_t, band, value=value):
            inside = labels[rows] == value
            values.add(conf[rows][inside])
            voxels += int(np.count_nonzero(inside))
            nb += int(np.count_nonzero(seg_band))
            band_conf += float(conf[rows][seg_band].sum(dtype=np.float64))
            band_ent += float(ent[rows][seg_band].sum(dtype=np.float64))
        (mean, median, p5, below5, below9), histogram = values.stats(edges)
        row = SegmentReport(
            value=value, key=str(cls.get("key", value)), name=str(name),
            color=tuple(int(c) for c in cls.get("color", (128, 128, 128))),  # type: ignore[arg-type]
            voxels=voxels, volume_ml=voxels * voxel_ml,
            mean_confidence=mean, median_confidence=median, p5_confidence=p5,
            fraction_below_0_5=below5, fraction_below_0_9=below9, band_voxels=nb,
            band_mean_confidence=band_conf / nb if nb else math.nan,
            band_mean_entropy=band_ent / nb if nb else math.nan,
            confidence_histogram=histogram,
        )
        if ref_metrics is not None:
            for k, v in ref_metrics["segments"][value].items():
                setattr(row, k, v)
            row.reference_voxels = int((ref == value).sum())
            row.reference_volume_ml = row.reference_voxels * voxel_ml
        segments.append(row)

    summary: dict[str, Any] = {
        "voxels": int(labels.size),
        "foreground_voxels": int(np.count_nonzero(labels)),
        "mean_confidence": float(conf.mean(dtype=np.float64)) if conf.size else math.nan,
        "mean_entropy": float(ent.mean(dtype=np.float64)) if ent.size else math.nan,
        "band_mm": band,
        "n_bins": int(n_bins),
        "pece_bins": PECE_BINS,
    }
    heatmap = None
    if ref_metrics is not None:
        summary.update(ref_metrics["summary"])
        heatmap = heatmaps.boundary_calibration_map(prediction.probabilities, ref, spacing_t, band_mm=band)
    meta = {
        "case": case,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"id": prediction.model_id, "version": prediction.model_version,
                  "weights_sha256": prediction.weights_sha256, "temperature": prediction.temperature,
                  "mirror_tta": bool(getattr(prediction, "mirror_tta", False))},
        "input": {"path": str(input_path) if input_path else "", "sha256": input_sha256,
                  "shape": list(labels.shape), "spacing_mm": list(spacing_t)},
        "reference": {"path": str(reference_path) if reference_path else "", "used": ref is not None},
        "device": prediction.device,
        "seconds": dict(prediction.seconds),
        "package_versions": package_versions(),
        "classes": [{"value": int(c["value"]), "key": str(c.get("key", "")), "name": n}
                    for c, n in zip(classes, names)],
    }
    preview = _preview(prediction, image, ref, heatmap)
    preview["signed_map"] = heatmap  # full grid (reference only): outputs may write it as the boundary volume
    return CalibrationReport(segments=segments, summary=summary, meta=meta, preview=preview)


def _reference_metrics(prediction: "Prediction", ref: np.ndarray, spacing: tuple[float, ...], band_mm: float,
                       n_bins: int) -> dict[str, Any]:
    """All reference-based numbers from ``LensSegCalibLib.metrics`` (one case, batch axis added here).

    Case level: top-label ECE (all voxels and reference foreground), class-wise ECE, BECE (top-label and
    BECE_cw), pECE (official), NLL, Brier, top-label reliability bins. Per segment c: Dice, IoU, HD95, ASSD,
    ECE over the reference voxels of c, class-wise ECE_c, BECE_c, one-vs-rest pECE of ``p_c``, NLL and Brier
    over the reference voxels of c, per-class reliability bins (``p_c`` vs ``[reference = c]``).
    """
    from . import metrics as M

    probs = np.asarray(prediction.probabilities)[None]  # the very array the user gets, (1, C, *S)
    y = np.ascontiguousarray(ref)[None].astype(np.int64, copy=False)
    pred = np.asarray(prediction.labels)[None]
    num_classes = probs.shape[1]

    acc = M.CalibrationAccumulator(n_bins=n_bins, scores=True)
    acc.update(probs, y)
    cal = acc.compute()
    bc = M.boundary_calibration(probs, y, spacing, band_mm, n_bins, classwise=True)
    fg = y != 0
    summary = {
        "ece": cal.ece,
        "ece_fg": float(M.ece(probs, y, n_bins, mask=fg)) if fg.any() else math.nan,
        "classwise_ece": cal.classwise_ece,
        "bece": bc.bece,
        "bece_cw": bc.bece_cw,
        "pece": float(M.pece(probs, y)),
        "nll": cal.nll,
        "brier": cal.brier,
        "reliability": _reliability_dict(cal.reliability),
        "band_voxels_reference": int(bc.band_voxels[0]),
    }
    seg_metrics = _segmentation_metrics(pred, y, num_classes, spacing)
    per_class_rel = cal.classwise_reliability
    segments: dict[int, dict[str, Any]] = {}
    for c in range(1, num_classes):
        mask = y == c
        present = bool(mask.any())
        one_vs_rest = np.stack([1.0 - probs[:, c].astype(np.float32), probs[:, c].astype(np.float32)], axis=1)
        inside = math.nan, math.nan, math.nan
        if present:  # one pass gives top-label ECE, NLL and Brier over the reference voxels of c
            acc_c = M.CalibrationAccumulator(n_bins=n_bins, scores=True)
            acc_c.update(probs, y, mask=mask)
            res_c = acc_c.compute()
            inside = res_c.ece, res_c.nll, res_c.brier
        segments[c] = {
            **seg_metrics[c],
            "ece": float(inside[0]),
            "classwise_ece": float(cal.classwise_ece_per_class[c]),
            "bece": float(bc.bece_classwise[c - 1]),
            "pece": float(M.pece(one_vs_rest, mask.astype(np.uint8))),
            "nll": float(inside[1]),
            "brier": float(inside[2]),
            "reliability": _reliability_dict(per_class_rel, row=c),
        }
    return {"summary": summary, "segments": segments}


def _reliability_dict(rel: Any, row: int | None = None) -> dict[str, list[float]]:
    """Reliability bins as plain lists (one class row of per-class bins when ``row`` is given)."""
    pick = (lambda a: np.asarray(a)[row]) if row is not None else np.asarray  # noqa: E731
    return {
        "edges": np.asarray(rel.edges, dtype=float).tolist(),
        "count": pick(rel.count).astype(int).tolist(),
        "mean_confidence": pick(rel.mean_confidence).astype(float).tolist(),
        "accuracy": pick(rel.accuracy).astype(float).tolist(),
        "gap": pick(rel.gap).astype(float).tolist(),
    }


def _segmentation_metrics(pred: np.ndarray, ref: np.ndarray, num_classes: int,
                          spacing: tuple[float, ...]) -> dict[int, dict[str, float]]:
    """Dice, IoU, HD95 and ASSD (mm) per foreground class from ``LensSegCalibLib.metrics``."""
    from . import metrics as M

    # metrics never write into their inputs (Testing/test_report.py checks the labels stay as they were)
    res = M.segmentation_metrics(pred, ref, num_classes, spacing=spacing)  # (1, C), class 0 first
    out: dict[int, dict[str, float]] = {}
    for c in range(1, num_classes):
        out[c] = {"dice": float(res.dice[0, c]), "iou": float(res.iou[0, c]), "hd95_mm": float(res.hd95[0, c]),
                  "assd_mm": float(res.assd[0, c])}
    return out
