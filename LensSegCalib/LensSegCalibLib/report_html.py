"""Self-contained HTML rendering of a :class:`~LensSegCalibLib.report.CalibrationReport`.

One file, no external resources: matplotlib (Agg) figures are PNGs inlined as ``data:image/png;base64``.
Every user-provided string (case, file and segment names, model id) goes through ``html.escape``.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .report import CalibrationReport, SegmentReport

__all__ = ["render_html", "figure_png"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}h1{font-size:150%}h2{font-size:125%;margin-top:1.5em}
.meta td{text-align:left}figure{margin:0.5em 0}figcaption{font-size:85%;color:#555}.swatch{display:inline-block;
width:0.9em;height:0.9em;border:1px solid #555;margin-right:0.3em;vertical-align:middle}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return _esc(value)


def figure_png(fig: Any) -> str:
    """Render a matplotlib figure to a base64 PNG string and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)  # fixed layout: no extra layout draw passes
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps a running Slicer/Qt backend untouched
    import matplotlib.pyplot as plt

    return plt


def _slice_figure(report: "CalibrationReport") -> str | None:
    """Image with predicted (solid) and reference (dashed) outlines, confidence and heat map with colour bars.

    The base64 PNG is cached in ``report.preview`` (the HTML and the demo's preview PNG share one rendering).
    """
    pv = report.preview
    if not pv or pv.get("labels") is None:
        return None
    if pv.get("_slice_png"):
        return str(pv["_slice_png"])
    pv["_slice_png"] = _render_slice_figure(report)
    return str(pv["_slice_png"])


def _render_slice_figure(report: "CalibrationReport") -> str:
    pv = report.preview
    plt = _pyplot()
    labels = pv["labels"]
    sy, sx = pv.get("spacing", (1.0, 1.0))
    extent = (0, labels.shape[1] * sx, labels.shape[0] * sy, 0)  # mm, so anisotropic voxels look right
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    fig.subplots_adjust(left=0.04, right=0.97, bottom=0.12, top=0.9, wspace=0.25)
    base = pv.get("image")
    ax = axes[0]
    ax.imshow(base if base is not None else np.zeros(labels.shape), cmap="gray", extent=extent, interpolation="nearest")
    for seg in report.segments:
        color = tuple(c / 255.0 for c in seg.color)
        if (labels == seg.value).any():
            ax.contour((labels == seg.value).astype(float), levels=[0.5], colors=[color], linewidths=1.2,
                       extent=(0, extent[1], 0, extent[2]), origin="upper")
        ref = pv.get("reference")
        if ref is not None and (ref == seg.value).any():
            ax.contour((ref == seg.value).astype(float), levels=[0.5], colors=[color], linewidths=1.0,
                       linestyles="dashed", extent=(0, extent[1], 0, extent[2]), origin="upper")
    ax.set_title(f"slice {pv.get('slice_index', 0)}: prediction (solid), reference (dashed)", fontsize=9)
    im = axes[1].imshow(pv["confidence"], cmap="inferno", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    axes[1].set_title("confidence (max p)", fontsize=9)
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    heat = np.asarray(pv["heatmap"], dtype=float)
    signed = pv.get("heatmap_kind", "").startswith("signed")
    masked = np.ma.masked_invalid(heat)
    if signed:
        im2 = axes[2].imshow(masked, cmap="RdBu_r", vmin=-0.5, vmax=0.5, extent=extent, interpolation="nearest")
        axes[2].set_title("signed calibration in band (red: over-confident)", fontsize=9)
    else:
        im2 = axes[2].imshow(masked, cmap="viridis", vmin=0, vmax=1, extent=extent, interpolation="nearest")
        axes[2].set_title("boundary uncertainty (entropy in band)", fontsize=9)
    fig.colorbar(im2, ax=axes[2], shrink=0.8)
    for a in axes:
        a.set_xlabel("mm")
    return figure_png(fig)


def _segment_figure(seg: "SegmentReport") -> str:
    """Reliability diagram (with a reference) and the confidence histogram of one segment."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.85, wspace=0.3)
    ax = axes[0]
    rel = seg.reliability
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    if rel:
        conf = np.asarray(rel.get("mean_confidence", []), dtype=float)
        acc = np.asarray(rel.get("accuracy", []), dtype=float)
        n = len(acc)
        centres = (np.arange(n) + 0.5) / max(n, 1)
        ok = np.isfinite(acc)
        ax.bar(centres[ok], acc[ok], width=1.0 / max(n, 1), edgecolor="k", color="#4c78a8", alpha=0.8,
               label="accuracy")
        okc = ok & np.isfinite(conf)
        # the gap as a hatched outline between accuracy and mean confidence (no colour mixing with the bars)
        ax.bar(centres[okc], conf[okc] - acc[okc], bottom=acc[okc], width=1.0 / max(n, 1), color="none",
               edgecolor="#d62728", hatch="//", linewidth=0.8, label="gap to mean confidence")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"reliability: p({seg.name}) vs reference", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no reference:\nreliability needs one", ha="center", va="center", fontsize=9)
        ax.set_title("reliability", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    hist = np.asarray(seg.confidence_histogram, dtype=float)
    edges = np.linspace(0, 1, len(hist) + 1) if len(hist) else np.linspace(0, 1, 2)
    if len(hist):
        axes[1].bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#72b7b2", edgecolor="k")
        if hist.max() > 0:
            axes[1].set_yscale("log")
    axes[1].set_title(f"confidence of the {seg.voxels} predicted voxels", fontsize=9)
    axes[1].set_xlabel("confidence (max p)")
    axes[1].set_ylabel("voxels")
    axes[1].set_xlim(0, 1)
    fig.suptitle(seg.name, fontsize=10)
    return figure_png(fig)


_COLUMNS = [
    ("voxels", "Voxels"), ("volume_ml", "Volume (mL)"), ("mean_confidence", "Mean conf."),
    ("median_confidence", "Median conf."), ("p5_confidence", "P5 conf."), ("fraction_below_0_5", "Frac. < 0.5"),
    ("fraction_below_0_9", "Frac. < 0.9"), ("band_mean_confidence", "Band conf."),
    ("band_mean_entropy", "Band entropy"),
]
_REF_COLUMNS = [
    ("dice", "Dice"), ("iou", "IoU"), ("hd95_mm", "HD95 (mm)"), ("assd_mm", "ASSD (mm)"), ("ece", "ECE"),
    ("classwise_ece", "CW-ECE"), ("bece", "BECE"), ("pece", "pECE"), ("nll", "NLL"), ("brier", "Brier"),
]


def render_html(report: "CalibrationReport") -> str:
    """The complete HTML document of one report (a string)."""
    meta = report.meta
    model = meta.get("model", {})
    has_ref = bool(meta.get("reference", {}).get("used"))
    cols = _COLUMNS + (_REF_COLUMNS if has_ref else [])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>LensSegCalib report {_esc(meta.get('case', ''))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Calibration report: {_esc(meta.get('case', ''))}</h1>",
        '<table class="meta">',
        f"<tr><th class='l'>Model</th><td>{_esc(model.get('id', ''))} {_esc(model.get('version', ''))} "
        f"(temperature {_fmt(model.get('temperature', math.nan))}"
        f"{', mirror test-time augmentation' if model.get('mirror_tta') else ''})</td></tr>",
        f"<tr><th class='l'>Weights sha256</th><td><code>{_esc(model.get('weights_sha256', ''))}</code></td></tr>",
        f"<tr><th class='l'>Input</th><td>{_esc(meta.get('input', {}).get('path', ''))} "
        f"<code>{_esc(meta.get('input', {}).get('sha256', ''))}</code></td></tr>",
        f"<tr><th class='l'>Grid</th><td>{_esc(meta.get('input', {}).get('shape', ''))} voxels, spacing "
        f"{_esc(meta.get('input', {}).get('spacing_mm', ''))} mm (array order z, y, x)</td></tr>",
        f"<tr><th class='l'>Reference</th><td>{_esc(meta.get('reference', {}).get('path', '') or 'none')}</td></tr>",
        f"<tr><th class='l'>Device, time</th><td>{_esc(meta.get('device', ''))}, {_esc(meta.get('created', ''))}"
        "</td></tr>",
        "</table>",
        "<h2>Segments</h2><table><tr><th class='l'>Segment</th>"
        + "".join(f"<th>{_esc(label)}</th>" for _, label in cols) + "</tr>",
    ]
    for seg in report.segments:
        swatch = "#%02x%02x%02x" % tuple(int(c) for c in seg.color)
        cells = "".join(f"<td>{_fmt(getattr(seg, key))}</td>" for key, _ in cols)
        parts.append(f"<tr><td class='l'><span class='swatch' style='background:{swatch}'></span>{_esc(seg.name)}"
                     f"</td>{cells}</tr>")
    parts.append("</table>")
    parts.append("<h2>Case summary</h2><table>")
    for key, value in report.summary.items():
        if isinstance(value, (dict, list)):
            continue
        parts.append(f"<tr><th class='l'>{_esc(key)}</th><td>{_fmt(value)}</td></tr>")
    parts.append("</table><p>Calibration errors are fractions (x100 = %). Band = voxels within "
                 f"{_fmt(report.summary.get('band_mm', math.nan))} mm of a boundary. Definitions: docs/heatmaps.md."
                 "</p>")
    slice_png = _slice_figure(report)
    if slice_png:
        parts.append("<h2>Slice</h2><figure>" + _img(slice_png, "slice with outlines and heat maps")
                     + "<figcaption>Left: input with predicted (solid) and reference (dashed) outlines. Middle: "
                     "confidence. Right: boundary heat map.</figcaption></figure>")
    parts.append("<h2>Per segment</h2>")
    for seg in report.segments:
        parts.append(f"<h3>{_esc(seg.name)}</h3><figure>"
                     + _img(_segment_figure(seg), f"reliability and confidence histogram of {seg.name}")
                     + "</figure>")
    versions = ", ".join(f"{_esc(k)} {_esc(v)}" for k, v in meta.get("package_versions", {}).items())
    parts.append(f"<p style='font-size:80%;color:#666'>Packages: {versions}</p></body></html>")
    return "\n".join(parts)
