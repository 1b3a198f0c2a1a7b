#!/usr/bin/env python3
"""Child-process entry of LensSegCalib: segment image files and write the CLI's outputs, streaming progress.

Run by ``LensSegCalibLogic.batch(..., inProcess=False)`` with Slicer's own interpreter (``PythonSlicer``), so a
long batch neither blocks nor bloats the Slicer process, and Cancel simply ends this process. Needs only
``LensSegCalibLib`` (found beside this folder), never ``slicer``.

Protocol on stdout, one line each (anything else is log text):

    PROGRESS <fraction 0..1> <message>
    CASE <json: {"input", "status": "done"|"skipped"|"failed", "error", "outputs"}>

Exit codes: 0 all inputs done or skipped; 1 some input failed; 2 bad arguments or model; 130 cancelled (SIGINT
or SIGTERM; finished cases keep their outputs, the running one leaves no half-written file).

Usage:
    PythonSlicer run_inference.py --out DIR --model asoct-lens-acw [--catalog catalog.json] [--device auto]
                                  [--overwrite] INPUT [INPUT ...]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

# LensSegCalibLib lives next to Scripts/ in the module folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _emit(line: str) -> None:
    print(line, flush=True)  # flush: the parent reads lines as they come


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment files; print PROGRESS/CASE lines (LensSegCalib).")
    parser.add_argument("inputs", nargs="+", help="image files (NRRD, NIfTI, MHA) or DICOM folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", required=True, help="catalog model id")
    parser.add_argument("--catalog", default=None, help="catalog.json (default: the shipped one)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    args = parser.parse_args(argv)

    cancel = threading.Event()

    def onSignal(signum: int, frame: object) -> None:
        cancel.set()  # honoured by the segmenter within one batch of slices/patches

    signal.signal(signal.SIGTERM, onSignal)
    signal.signal(signal.SIGINT, onSignal)

    from LensSegCalibLib import Cancelled, LensSegCalibError
    from LensSegCalibLib.inference import Segmenter
    from LensSegCalibLib.mrml import batch_files  # MRML-free helper; imports slicer only inside other functions

    _emit(f"PROGRESS 0.0 Loading model {args.model}")
    try:
        segmenter = Segmenter.from_catalog(args.model, args.device, catalog=args.catalog)
    except LensSegCalibError as error:
        print(f"ERROR {error}", file=sys.stderr, flush=True)
        return 2
    _emit(f"PROGRESS 0.02 Model {args.model} on {segmenter.device}")

    def progress(fraction: float, message: str) -> None:
        _emit(f"PROGRESS {0.02 + 0.98 * float(fraction):.4f} {message}")

    try:
        rows = batch_files(args.inputs, args.out, segmenter, overwrite=args.overwrite, progress=progress,
                           cancel=cancel)
    except Cancelled:
        _emit("PROGRESS 1.0 Cancelled")
        return 130
    for row in rows:
        _emit("CASE " + json.dumps(row))
    return 1 if any(row["status"] == "failed" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
