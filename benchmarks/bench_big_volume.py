#!/usr/bin/env python3
"""Big volumes: wall time and peak resident memory of inference (and optionally the CLI's full case) per size.

Each size runs in its own child process (fresh allocator, ``VmHWM`` of that run only) under an address-space
limit, so a size that does not fit fails cleanly instead of swapping the machine. The model is a tiny random
2D UNet (the shipped models' layout: slicewise2d, 4 classes, float16 probabilities) unless ``--catalog`` and
``--model`` name a real one; the network's compute is not what this measures, the data path is.

Usage::

    .venv/bin/python benchmarks/bench_big_volume.py                      # 3 sizes up to 32 x 1024 x 1024
    .venv/bin/python benchmarks/bench_big_volume.py --shape 512 1024 1024 --write   # the issue's full size

Sizes are ``Z Y X`` (array order: 1024 x 1024 x 512 in-plane-first notation is ``--shape 512 1024 1024``).
A size whose estimated peak (from the smaller runs' bytes per voxel) exceeds the memory available is skipped
with a message unless ``--force``. Results go to ``benchmarks/results/bench_big_volume.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_big_volume.json"
DEFAULT_SHAPES = [(8, 1024, 1024), (16, 1024, 1024), (32, 1024, 1024)]
FULL_SHAPE = (512, 1024, 1024)
SPACING = (0.05, 0.02, 0.02)

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(int(sys.argv[6]))
from LensSegCalibLib.inference import Segmenter

def rss():
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) * 1024

catalog, model = sys.argv[1], sys.argv[2]
shape = tuple(int(v) for v in sys.argv[3].split("x"))
write_dir = sys.argv[4]
spacing = tuple(float(v) for v in sys.argv[5].split(","))
seg = Segmenter.from_catalog(model, "cpu", catalog=catalog)
vol = np.empty(shape, dtype=np.int16)  # filled slab by slab: no float64 temporaries of the whole volume
rng = np.random.default_rng(0)
yy, xx = np.meshgrid(np.linspace(-1, 1, shape[1], dtype=np.float32), np.linspace(-1, 1, shape[2], dtype=np.float32),
                     indexing="ij")
lens = (xx**2 / 0.5 + yy**2 / 0.2 < 1).astype(np.float32)
for k in range(shape[0]):
    vol[k] = (400 + 500 * lens + rng.normal(0, 50, shape[1:]).astype(np.float32)).astype(np.int16)
del yy, xx, lens
def peak_rss():
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec (it would include the parent's RSS).
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmHWM:")[1].split()[0]) * 1024

seg.predict(vol[:1, :64, :64], spacing[:3])  # warm-up
base = rss()
t0 = time.perf_counter()
# as the CLI without a reference: the probabilities are not kept (C x 2 bytes per voxel saved)
pred = seg.predict(vol, spacing, probabilities_dtype=None)
t_pred = time.perf_counter() - t0
peak_pred = peak_rss()
out = {"voxels": int(vol.size), "base_bytes": base, "predict_seconds": t_pred, "predict_peak_bytes": peak_pred,
       "stages": pred.seconds}
if write_dir:
    from LensSegCalibLib.io import Geometry
    from LensSegCalibLib.outputs import write_case_outputs
    from LensSegCalibLib.report import calibration_report
    t1 = time.perf_counter()
    report = calibration_report(pred, spacing, image=vol, case="big")
    write_case_outputs(write_dir, "big", pred, Geometry(spacing), report, overwrite=True)
    out["write_seconds"] = time.perf_counter() - t1
    out["write_peak_bytes"] = peak_rss()
print(json.dumps(out))
"""


def _tiny_catalog(folder: Path) -> Path:
    import torch

    from LensSegCalibLib.models import build_network, save_weights

    net = {"name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 4, "channels": [8, 16],
           "strides": [2], "num_res_units": 0}
    torch.manual_seed(0)
    sha, size = save_weights(build_network(net), folder / "bench.safetensors")
    classes = [{"value": v, "key": k, "name": k.title(), "color": [60 * v, 0, 0]}
               for v, k in enumerate(["background", "capsule", "cortex", "nucleus"])]
    entry = {"id": "bench-tiny", "title": "bench", "version": "0.0.1", "task": "asoct-lens", "modality": "AS-OCT",
             "classes": classes, "network": net, "loss": {"name": "ce"}, "temperature": 1.0,
             "input": {"spacing_mm": list(SPACING), "dims": 2, "mode": "slicewise2d", "patch_size": [256, 256],
                       "overlap": 0.0, "normalization": {"kind": "percentile"}},
             "weights": {"file": "bench.safetensors", "sha256": sha, "bytes": size}}
    path = folder / "catalog.json"
    path.write_text(json.dumps({"catalog_version": 1, "models": [entry]}), encoding="utf-8")
    return path


def _available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _run(catalog: Path, model: str, shape: tuple[int, ...], write: bool, threads: int, limit: int) -> dict:
    def apply_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "LensSegCalib"))
    with tempfile.TemporaryDirectory(prefix="bench-big-") as out:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(catalog), model, "x".join(map(str, shape)), out if write else "",
             ",".join(map(str, SPACING)), str(threads)],
            capture_output=True, text=True, env=env, preexec_fn=apply_limit)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
        return {"shape": list(shape), "error": tail[0], "wall_seconds": wall}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(shape=list(shape), wall_seconds=wall)
    peak = result.get("write_peak_bytes", result["predict_peak_bytes"])
    result["bytes_per_voxel_above_base"] = (peak - result["base_bytes"]) / result["voxels"]
    predict_grown = result["predict_peak_bytes"] - result["base_bytes"]
    result["predict_bytes_per_voxel_above_base"] = predict_grown / result["voxels"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=3, type=int, action="append", metavar=("Z", "Y", "X"),
                        help="volume size (repeatable); default: 8/16/32 x 1024 x 1024")
    parser.add_argument("--full", action="store_true", help=f"add the issue's full size {FULL_SHAPE}")
    parser.add_argument("--write", action="store_true", help="also build the report and write every output file")
    parser.add_argument("--catalog", type=Path, help="a catalog.json (default: a tiny random model)")
    parser.add_argument("--model", default="bench-tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-gb", type=float, default=None, help="address-space limit of each child")
    parser.add_argument("--force", action="store_true", help="run sizes whose estimate exceeds free memory")
    args = parser.parse_args(argv)
    shapes = [tuple(s) for s in args.shape] if args.shape else list(DEFAULT_SHAPES)
    if args.full:
        shapes.append(FULL_SHAPE)
    limit = int((args.limit_gb or max(_available_bytes() / 2**30 - 1, 2)) * 2**30)
    with tempfile.TemporaryDirectory(prefix="bench-big-cat-") as tmp:
        catalog = args.catalog or _tiny_catalog(Path(tmp))
        rows: list[dict] = []
        per_voxel = None
        for shape in shapes:
            voxels = shape[0] * shape[1] * shape[2]
            if per_voxel is not None and not args.force:
                estimate = 450e6 + per_voxel * voxels
                if estimate > min(_available_bytes(), limit):
                    row = {"shape": list(shape), "skipped": f"estimated peak {estimate / 2**30:.1f} GiB "
                           f"({per_voxel:.0f} B/voxel) exceeds the {min(_available_bytes(), limit) / 2**30:.1f} GiB "
                           "available; --force to try", "estimated_peak_gib": estimate / 2**30}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    continue
            row = _run(catalog, args.model, shape, args.write, args.threads, limit)
            if "error" not in row:
                per_voxel = row["bytes_per_voxel_above_base"]
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "stages"}), flush=True)
            rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "memory_available_gib": _available_bytes() / 2**30},
        "spacing_mm": SPACING, "write": args.write, "runs": rows,
    }, indent=1) + "\n", encoding="utf-8")
    print(f"-> {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
