#!/usr/bin/env python3
"""Render the README/Extensions-Index screenshots offscreen, with Slicer's own slice logic and displayable managers.

Runs the module Logic headless (``Testing/headless_slicer.py``) on the generated AS-OCT phantom, then renders
the Red slice view offscreen (EGL, or OSMesa with ``VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow``):

- ``1_outlines.png``    B-scan with the predicted segments (fill + outline) and the reference outlines,
- ``2_confidence.png``  confidence heatmap (Inferno, low confidence is hot) with its colour legend,
- ``3_boundary.png``    boundary-calibration heatmap (signed error against the phantom's ground truth) + legend,

and the module icon ``LensSegCalib/Resources/Icons/LensSegCalib.png`` (128x128, matplotlib) with ``--icon``.
OpenGL is probed in a child process first: a missing backend makes VTK segfault instead of raising.

Usage:  .venv/bin/python Screenshots/make_screenshots.py [--model asoct-lens-acw] [--seed 3] [--icon]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ICON = ROOT / "LensSegCalib" / "Resources" / "Icons" / "LensSegCalib.png"


def _harness():
    """Load Testing/headless_slicer.py by path (Testing/ is not a package)."""
    spec = importlib.util.spec_from_file_location("headless_slicer", ROOT / "Testing" / "headless_slicer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["headless_slicer"] = module
    spec.loader.exec_module(module)
    return module


def make_icon(path: Path = ICON) -> Path:
    """128x128 PNG: a lens cross-section (capsule, cortex, nucleus) over a confidence-like colour gradient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Ellipse

    figure = plt.figure(figsize=(1.28, 1.28), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(-1, 1)
    axes.set_ylim(-1, 1)
    axes.axis("off")
    y, x = np.mgrid[-1:1:256j, -1:1:256j]
    halo = np.clip(1.0 - np.abs(np.hypot(x / 0.88, y / 0.56) - 1.0) * 4.0, 0, 1)  # "uncertain" at the boundary
    axes.imshow(halo, extent=(-1, 1, -1, 1), cmap="inferno", vmin=0, vmax=1.15, origin="lower")
    for width, height, color in ((1.76, 1.12, "#ffdc50"), (1.62, 0.98, "#64b4ff"), (1.0, 0.56, "#e65a3c")):
        axes.add_patch(Ellipse((0, 0), width, height, facecolor=color, edgecolor="white", linewidth=1.2))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, transparent=False, facecolor="black")
    plt.close(figure)
    return path


def make_screenshots(out: Path, model: str, catalog: str | None, seed: int, shape: tuple, size: tuple) -> list:
    """Run segment() on the phantom and write the three PNGs; returns their paths."""
    harness = _harness()
    glClass = harness.opengl_available()
    if glClass is None:
        raise SystemExit("No offscreen OpenGL (EGL/OSMesa): install libegl1 libegl-mesa0 libgl1-mesa-dri.")
    harness.start()
    import slicer
    import vtk

    import LensSegCalib

    logic = LensSegCalib.LensSegCalibLogic(catalogPath=catalog)
    logic.loadTerminology()
    # The view first: its displayable managers then see the legend nodes that segment() creates.
    view = harness.OffscreenSliceView("Red", size=size)
    started = time.perf_counter()
    volume, reference = logic.loadSampleData("asoct", seed=seed, shape=shape)
    result = logic.segment(volume, model=model, reference=reference, device="auto")
    seconds = time.perf_counter() - started
    view.sliceNode.SetOrientation("Axial")
    composite = view.sliceLogic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(volume.GetID())
    reference.GetDisplayNode().SetVisibility(True)
    reference.GetDisplayNode().SetVisibility2DFill(False)
    reference.GetDisplayNode().SetSliceIntersectionThickness(1)
    ras = volume.GetOrigin()
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    middle = matrix.MultiplyPoint((0, 0, shape[0] // 2, 1))[2]  # S of the middle B-scan
    header = f"LensSegCalib - {result.report.meta['model']['id']} - AS-OCT phantom seed {seed}"
    out.mkdir(parents=True, exist_ok=True)
    shots = []

    bounds = [0.0] * 6
    reference.GetRASBounds(bounds)  # zoom on the lens
    lensCenter = tuple((bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3))
    predicted = result.segmentation.GetDisplayNode()

    def shot(name: str, heatmap: str, text: str, fill: bool, zoom: float, legend: str) -> None:
        logic.showHeatmap(result, heatmap, opacity=0.8 if heatmap != "none" else 0.0, threshold=0.95)
        composite.SetBackgroundVolumeID(volume.GetID())
        predicted.SetVisibility2DFill(fill)  # over a heatmap, outlines only: the colours stay readable
        path = out / name
        view.save_png(path, {vtk.vtkCornerAnnotation.UpperLeft: f"{header}\n{text}",
                             vtk.vtkCornerAnnotation.LowerLeft: legend},
                      sliceOffset=middle, zoom=zoom,
                      center=(lensCenter[0], lensCenter[1], middle) if zoom > 1 else None)
        shots.append(path)

    both = "prediction: fill + outline; ground truth: thin outline"
    shot("1_outlines.png", "none", "Segments: capsule (yellow), cortex (blue), nucleus (red)", True, 1.0, both)
    shot("2_confidence.png", "confidence", "Confidence (top-label probability), shown where < 0.95", False, 1.25,
         "prediction and ground truth: outlines")
    shot("3_boundary.png", "boundary", "Boundary calibration error vs ground truth (in the boundary band)",
         False, 1.25, "red: over-confident, blue: under-confident; outlines: prediction, ground truth")
    segments = ", ".join(f"{s.name} Dice {s.dice:.2f}" for s in result.report.segments)
    print(f"segment() {seconds:.1f} s ({result.prediction.device}, {glClass}); {segments}; origin {ras}")
    return shots


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "Screenshots")
    parser.add_argument("--model", default="asoct-lens-acw")
    parser.add_argument("--catalog", default=None, help="another catalog.json (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(8, 800, 800), metavar=("Z", "Y", "X"))
    parser.add_argument("--size", type=int, nargs=2, default=(800, 520), metavar=("W", "H"))
    parser.add_argument("--icon", action="store_true", help="also (re)draw the 128x128 module icon")
    parser.add_argument("--icon-only", action="store_true", help="only draw the icon")
    args = parser.parse_args(argv)
    if args.icon or args.icon_only:
        print(f"icon: {make_icon()}")
    if not args.icon_only:
        for path in make_screenshots(args.out, args.model, args.catalog, args.seed, tuple(args.shape),
                                     tuple(args.size)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
