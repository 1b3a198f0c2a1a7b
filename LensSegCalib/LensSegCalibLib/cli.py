"""Command-line entry point ``lenssegcalib``: segment, demo, models, phantom, train.

    lenssegcalib segment scan1.nrrd scan2.nii.gz dicom_dir/ --model asoct-lens-acw --out results/
    lenssegcalib segment scan.nrrd --reference scan_ref.seg.nrrd --model asoct-lens-acw --out results/
    lenssegcalib segment data/*.nrrd --model ct-lens-acw --out results/ --shard $SLURM_ARRAY_TASK_ID/8
    lenssegcalib demo --out demo_out/
    lenssegcalib models
    lenssegcalib phantom --task asoct --seed 3 --out phantoms/
    lenssegcalib train --config LensSegCalib/LensSegCalibLib/training/configs/asoct-lens-acw.json

Exit codes: 0 success; 1 some inputs of a batch failed (each is listed in ``summary.csv``); 2 a usage or
LensSegCalib error (the message says what to do; ``--debug`` shows the traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import csv
import io as _io
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .errors import Cancelled, InputError, LensSegCalibError

__all__ = ["build_parser", "main", "segment_case", "parse_shard", "select_shard", "DEMO_SEED", "DEMO_SHAPE"]

log = logging.getLogger("lenssegcalib")

#: The demo's sample AS-OCT phantom: fixed seed; 8 radial B-scans of 800 x 800 (the model's own grid, 13 x 16 mm,
#: so no resampling), i.e. half a CASIA2-style 16-meridian scan to stay within ~60 s on 2 CPU cores.
DEMO_SEED = 7
DEMO_SHAPE = (8, 800, 800)
DEMO_MODEL = "asoct-lens-acw"

# Errors that mean "this one input failed" in a batch; anything else (a bug) still stops the batch.
_CASE_ERRORS: tuple[type[BaseException], ...] = (LensSegCalibError, OSError, ValueError, RuntimeError, MemoryError)


# ----------------------------------------------------------------------------------------------- helpers
def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``i/n`` (0-based shard ``i`` of ``n``, e.g. ``$SLURM_ARRAY_TASK_ID/8``); None passes through."""
    if text is None:
        return None
    try:
        i_text, n_text = str(text).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError as exc:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}.") from exc
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text}: need n >= 1 and 0 <= i < n (shards are numbered 0..n-1).")
    return i, n


def select_shard(inputs: Sequence[str], shard: tuple[int, int] | None) -> list[int]:
    """Indices of the inputs this shard processes: input k (in the given order) goes to shard ``k % n``."""
    if shard is None:
        return list(range(len(inputs)))
    i, n = shard
    return [k for k in range(len(inputs)) if k % n == i]


def _case_names(inputs: Sequence[str]) -> list[str]:
    """Unique output base names (a duplicate gets ``_2``, ``_3``... in input order)."""
    from .outputs import case_name

    names: list[str] = []
    seen: dict[str, int] = {}
    for path in inputs:
        base = case_name(path)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def _map_reference(labels: np.ndarray, segments: list[dict], classes: list[dict], path: Path) -> np.ndarray:
    """Map a reference's label values to the model's by segment id/name (a plain label map is used as is)."""
    if not segments:
        return labels
    lookup: dict[str, int] = {}
    for c in classes:
        for k in (c.get("key"), c.get("name")):
            if k:
                lookup[str(k).strip().lower()] = int(c["value"])
    out = np.zeros(labels.shape, dtype=np.uint8)
    unknown = []
    for seg in segments:
        value = int(seg.get("labelValue", 0))
        if value == 0:
            continue
        target = None
        for k in (seg.get("id"), seg.get("name")):
            if k and str(k).strip().lower() in lookup:
                target = lookup[str(k).strip().lower()]
                break
        if target is None:
            unknown.append(str(seg.get("name", seg.get("id", value))))
            continue
        out[labels == value] = target
    if unknown:
        known = ", ".join(str(c.get("name")) for c in classes if int(c["value"]) > 0)
        raise InputError(
            f"Reference {path.name} has segments the model does not know: {', '.join(unknown)}. Rename them to "
            f"the model's segments ({known}) or remove them, then retry."
        )
    return out


def _reference_on_grid(path: Path, geometry: Any, shape: tuple[int, ...], classes: list[dict]) -> np.ndarray:
    """Read a reference and place it on the image grid (same spacing/direction; a cropped .seg.nrrd is padded).

    Raises:
        InputError: another grid (spacing, direction or non-integer offset) or outside the image.
    """
    from .io import read_segmentation

    labels, ref_geo, segments = read_segmentation(path)
    labels = _map_reference(np.asarray(labels), segments, classes, path)
    if labels.ndim == 3 and len(shape) == 2 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != len(shape):
        raise InputError(
            f"Reference {path.name} is {labels.ndim}D but the image is {len(shape)}D; use a matching file."
        )
    img_sp = np.asarray(geometry.spacing, dtype=float)
    ref_sp = np.asarray(ref_geo.spacing, dtype=float)[-len(shape):]
    img_dir = np.asarray(geometry.direction, dtype=float)
    ref_dir = np.asarray(ref_geo.direction, dtype=float)[: img_dir.size]
    same_axes = np.allclose(img_sp, ref_sp, rtol=1e-4, atol=1e-6) and np.allclose(img_dir, ref_dir, atol=1e-4)
    offset = np.zeros(len(shape))
    if same_axes and len(shape) == 3:
        # index offset of the reference's voxel (0,0,0) in the image grid (i, j, k -> array order reversed)
        m = geometry.direction_matrix() * np.asarray(geometry.spacing[::-1])[None, :]
        ijk = np.linalg.solve(m, np.asarray(ref_geo.origin, dtype=float) - np.asarray(geometry.origin, dtype=float))
        offset = ijk[::-1]
    rounded = np.rint(offset)
    if not same_axes or not np.allclose(offset, rounded, atol=1e-3):
        ref_mm, img_mm = (tuple(round(float(v), 6) for v in sp) for sp in (ref_sp, img_sp))  # no numpy reprs
        raise InputError(
            f"Reference {path.name} lies on another grid (spacing {ref_mm} vs {img_mm} mm, or a "
            "different direction/origin). Resample it onto the image first (Slicer: Segmentations > Export to "
            "labelmap with the image as reference geometry) and retry."
        )
    start = rounded.astype(int)
    stop = start + np.asarray(labels.shape)
    if labels.shape == tuple(shape) and not start.any():
        return labels
    if np.any(start < 0) or np.any(stop > np.asarray(shape)):
        raise InputError(f"Reference {path.name} extends outside the image grid {shape}; export it with the "
                         "image as reference geometry.")
    out = np.zeros(shape, dtype=labels.dtype)
    out[tuple(slice(a, b) for a, b in zip(start, stop))] = labels
    return out


def segment_case(
    input_path: str | os.PathLike,
    segmenter: Any,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    reference_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    preview: bool = False,
    progress: Callable[[float, str], None] | None = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """Read one input, segment it, build its report and write all outputs; returns a summary row.

    Raises:
        LensSegCalibError: unreadable input/reference, bad geometry, outputs that exist, cancel.
    """
    from .io import read_image, sha256_file
    from .outputs import case_name, write_case_outputs
    from .report import calibration_report

    t0 = time.perf_counter()
    p = Path(input_path)
    case = name or case_name(p)
    image = read_image(p)
    geometry = image.geometry
    reference = None
    if reference_path is not None:
        reference = _reference_on_grid(Path(reference_path), geometry, image.array.shape, segmenter.classes)
    if not overwrite:
        _refuse_existing(out_dir, case, preview)  # before the expensive part, not after it
    prediction = segmenter.predict(
        image.array, geometry.spacing, direction=geometry.direction, progress=progress, cancel=cancel,
        # the probabilities are only needed for reference metrics: skipping them saves C x 2 bytes per voxel
        probabilities_dtype=np.float16 if reference is not None else None,
    )
    _check_cancel(cancel)
    report = calibration_report(
        prediction, geometry.spacing, reference=reference, image=image.array, case=case,
        input_sha256=sha256_file(p), input_path=p, reference_path=reference_path,
    )
    del image, reference  # the report kept one slice: free the input volume before writing (big volumes)
    _check_cancel(cancel)
    paths = write_case_outputs(out_dir, case, prediction, geometry, report, overwrite=overwrite,
                               preview=preview, cancel=cancel)
    return _summary_row(case, p, "done", "", time.perf_counter() - t0, report.to_dict(), paths["report_json"])


def _check_cancel(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Segmentation cancelled by the user; no output of this case was written.")


def _refuse_existing(out_dir: str | os.PathLike, case: str, preview: bool) -> None:
    from .errors import OutputError
    from .outputs import output_paths

    existing = [q.name for q in output_paths(out_dir, case, preview=preview).values() if q.exists()]
    if existing:
        raise OutputError(
            f"Outputs of {case} already exist in {out_dir} ({', '.join(existing)}); pass --overwrite "
            "(overwrite=True) to replace them, or choose another output folder."
        )


def _refuse_outputs_over_inputs(out_dir: Path, names: Sequence[str], inputs: Sequence[str], preview: bool) -> None:
    """Refuse a batch in which an output file would be an input (``scan.nrrd`` + ``scan_confidence.nrrd`` with
    ``--out`` = the input folder): inputs are never written, not even with ``--overwrite``."""
    from .outputs import output_paths

    given = {Path(p).resolve(): p for p in inputs}
    for name in names:
        for path in output_paths(out_dir, name, preview=preview).values():
            if path.resolve() in given:
                raise InputError(
                    f"Output {path.name} of {name} would replace the input {given[path.resolve()]}; "
                    "choose another --out folder."
                )
    summary = (out_dir / "summary.csv").resolve()
    if summary in given:
        raise InputError(f"{summary.name} in {out_dir} is an input; choose another --out folder.")


def _summary_row(case: str, path: Path, status: str, message: str, seconds: float, report: dict | None,
                 json_path: Path | None) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "input": str(path), "status": status, "message": message,
                           "seconds": round(seconds, 3), "report": json_path.name if json_path else ""}
    if report:
        summary = report.get("summary", {})
        for key in ("mean_confidence", "ece", "classwise_ece", "bece", "pece", "nll", "brier"):
            if key in summary:
                row[key] = summary[key]
        for seg in report.get("segments", []):
            for key in ("volume_ml", "mean_confidence", "dice", "hd95_mm"):
                if key in seg:
                    row[f"{seg['key']}_{key}"] = seg[key]
    return row


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    from .io import atomic_path

    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("nan" if v is None else v) for k, v in row.items()})
    # the summary describes this run (skipped inputs included): it is rewritten on every run
    with atomic_path(path, overwrite=True) as tmp:
        Path(tmp).write_text(buf.getvalue(), encoding="utf-8")


class _Bar:
    """A tqdm bar over cases that advances fractionally inside a case (stderr; quiet when not a terminal)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        # disable=None: tqdm hides itself when stderr is not a terminal (logs of cluster jobs stay clean)
        self._bar = tqdm(total=total, unit="case", file=sys.stderr, disable=True if quiet else None,
                         bar_format="{l_bar}{bar}| {n:.2f}/{total} [{elapsed}<{remaining}] {postfix}")
        self._base = 0

    def case_progress(self, label: str) -> Callable[[float, str], None]:
        def update(fraction: float, message: str) -> None:
            self._bar.n = self._base + min(max(fraction, 0.0), 1.0)
            self._bar.set_postfix_str(f"{label}: {message}", refresh=False)
            self._bar.refresh()

        return update

    def next_case(self) -> None:
        self._base += 1
        self._bar.n = self._base
        self._bar.refresh()

    def write(self, text: str) -> None:
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


# ----------------------------------------------------------------------------------------------- commands
def _cmd_segment(args: argparse.Namespace) -> int:
    from .inference import Segmenter
    from .io import ensure_output_dir
    from .outputs import case_is_done, output_paths

    shard = parse_shard(args.shard)
    inputs = [str(p) for p in args.inputs]
    refs = list(args.reference or [])
    if refs and len(refs) != len(inputs):
        raise InputError(
            f"Got {len(refs)} --reference file(s) for {len(inputs)} inputs; give one reference per input, "
            "in the same order."
        )
    out_dir = ensure_output_dir(args.out)
    names = _case_names(inputs)
    selected = select_shard(inputs, shard)
    _refuse_outputs_over_inputs(out_dir, [names[k] for k in selected], inputs + refs, args.preview)
    segmenter = Segmenter.from_catalog(args.model, device=args.device, catalog=args.catalog,
                                       apply_temperature=not args.no_temperature, mirror_tta=args.tta)
    rows: list[dict[str, Any]] = []
    failed = 0
    bar = _Bar(len(selected), quiet=args.quiet)
    try:
        for k in selected:
            path, case = Path(inputs[k]), names[k]
            if not args.overwrite and case_is_done(out_dir, case):
                import json

                json_path = output_paths(out_dir, case)["report_json"]
                try:
                    previous = json.loads(json_path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    previous = None
                rows.append(_summary_row(case, path, "skipped", "outputs exist (use --overwrite to redo)", 0.0,
                                         previous, json_path))
                bar.write(f"{case}: skipped, outputs exist (use --overwrite to redo)")
                bar.next_case()
                continue
            t0 = time.perf_counter()
            try:
                row = segment_case(path, segmenter, out_dir, name=case, reference_path=refs[k] if refs else None,
                                   overwrite=args.overwrite, preview=args.preview,
                                   progress=bar.case_progress(case))
                rows.append(row)
                bar.write(f"{case}: done in {row['seconds']:.1f} s")
            except _CASE_ERRORS as exc:
                if isinstance(exc, Cancelled):
                    raise
                failed += 1
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if not isinstance(exc, LensSegCalibError):
                    message = f"{type(exc).__name__}: {message}"
                rows.append(_summary_row(case, path, "failed", message, time.perf_counter() - t0, None, None))
                bar.write(f"{case}: FAILED: {message}")
                if args.debug:
                    bar.write(traceback.format_exc())
            bar.next_case()
    finally:
        bar.close()
        summary_name = "summary.csv" if shard is None else f"summary_shard{shard[0]}of{shard[1]}.csv"
        if rows:
            _write_summary(out_dir / summary_name, rows)
    done = sum(r["status"] == "done" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    print(f"{done} segmented, {skipped} skipped, {failed} failed; outputs in {out_dir}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .inference import Segmenter
    from .io import Geometry, ensure_output_dir, write_segmentation, write_volume
    from .phantom import asoct_volume

    t0 = time.perf_counter()
    out_dir = ensure_output_dir(args.out)
    phantom = asoct_volume(DEMO_SEED, shape=DEMO_SHAPE)
    geometry = Geometry(tuple(phantom.spacing), tuple(phantom.origin), tuple(phantom.direction))
    sample = out_dir / "sample_asoct.nrrd"
    reference = out_dir / "sample_asoct_reference.seg.nrrd"
    segmenter = Segmenter.from_catalog(args.model, device=args.device, catalog=args.catalog)
    if args.overwrite or not sample.exists():
        write_volume(sample, phantom.image, geometry, overwrite=True)
    if args.overwrite or not reference.exists():
        write_segmentation(reference, phantom.labels, geometry, segmenter.classes, overwrite=True)
    print(f"sample AS-OCT phantom (seed {DEMO_SEED}, {DEMO_SHAPE}) -> {sample.name}", file=sys.stderr)
    bar = _Bar(1, quiet=args.quiet)
    try:
        row = segment_case(sample, segmenter, out_dir, name="sample_asoct", reference_path=reference,
                           overwrite=True, preview=True, progress=bar.case_progress("sample_asoct"))
    finally:
        bar.close()
    _write_summary(out_dir / "summary.csv", [row])
    seconds = time.perf_counter() - t0
    print(f"demo finished in {seconds:.1f} s on {segmenter.device}; open {out_dir / 'sample_asoct_report.html'} "
          f"and {out_dir / 'sample_asoct_preview.png'}", file=sys.stderr)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import load_catalog

    catalog = load_catalog(args.catalog)
    print(f"{'id':<22} {'modality':<8} {'mode':<12} {'loss':<6} {'T':>5}  segments")
    for spec in catalog:
        segments = ", ".join(c["name"] for c in sorted(spec.classes, key=lambda c: c["value"]) if c["value"] > 0)
        print(f"{spec.id:<22} {spec.modality:<8} {spec.mode:<12} {spec.loss.get('name', ''):<6} "
              f"{spec.temperature:>5.2f}  {segments}")
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import write_phantom

    shape = tuple(args.shape) if args.shape else None
    written = write_phantom(args.task, args.seed, args.out, shape=shape, overwrite=args.overwrite)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``lenssegcalib`` argument parser (subcommands segment, demo, models, phantom, train)."""
    # --debug works before or after the command: the subcommands' copy has no default (SUPPRESS), so it never
    # resets a --debug given before the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    parser = argparse.ArgumentParser(prog="lenssegcalib",
                                     description="Calibration-aware crystalline-lens segmentation (AS-OCT, CT).",
                                     epilog="Exit codes: 0 ok, 1 some inputs failed, 2 error.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"lenssegcalib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser("segment", parents=[common], help="segment images and write heat maps and reports",
                         description="Segment NRRD/NIfTI files or DICOM series folders; per input write "
                                     "<name>.seg.nrrd, <name>_confidence.nrrd, <name>_boundary.nrrd, "
                                     "<name>_report.{json,csv,html}, and summary.csv for the batch.")
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or DICOM folders")
    seg.add_argument("--model", required=True, help="catalog model id (see `lenssegcalib models`)")
    seg.add_argument("--out", required=True, help="output folder (created if needed)")
    seg.add_argument("--reference", nargs="+", metavar="SEG",
                     help="reference segmentation(s) on the image grid, one per input (adds Dice, HD95, ECE...)")
    seg.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    seg.add_argument("--shard", metavar="i/n", help="process only inputs k with k %% n == i (cluster array jobs)")
    seg.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs exist")
    seg.add_argument("--preview", action="store_true", help="also write <name>_preview.png")
    seg.add_argument("--catalog", default=None, help="another catalog.json (default: the shipped one)")
    seg.add_argument("--no-temperature", action="store_true", help="do not apply the catalog's temperature")
    seg.add_argument("--tta", action="store_true",
                     help="mirror test-time augmentation (AS-OCT models: also segment the mirrored B-scans and "
                          "average; twice the time)")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(func=_cmd_segment)

    demo = sub.add_parser("demo", parents=[common], help="segment the sample AS-OCT phantom (all outputs + preview)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--model", default=DEMO_MODEL, help=f"default: {DEMO_MODEL}")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--catalog", default=None, help=argparse.SUPPRESS)
    demo.add_argument("--overwrite", action="store_true", help="regenerate the sample files too")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    models = sub.add_parser("models", parents=[common], help="list the model catalog")
    models.add_argument("--catalog", default=None, help="another catalog.json")
    models.set_defaults(func=_cmd_models)

    ph = sub.add_parser("phantom", parents=[common], help="write a synthetic phantom (image + labels) for Slicer")
    ph.add_argument("--task", required=True, choices=["asoct", "ct"])
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--out", required=True)
    ph.add_argument("--shape", type=int, nargs=3, metavar=("NZ", "NY", "NX"),
                    help="array size (default: the generator's, e.g. 16 x 800 x 800 for AS-OCT)")
    ph.add_argument("--overwrite", action="store_true", help="replace existing files")
    ph.set_defaults(func=_cmd_phantom)

    try:
        from .training.cli import add_train_subcommand
    except ImportError:  # training package not installed in a trimmed deployment: no `train` command
        pass
    else:
        train = add_train_subcommand(sub)
        train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except LensSegCalibError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"lenssegcalib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished cases are kept, rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
