"""Benchmark: top-label + class-wise ECE in one accumulator pass vs MONAI and torchmetrics.

Times, side by side in one run (interleaved repeats, median), on float32 probabilities ``(1, 4, S, S, S)``:

- ours: ``CalibrationAccumulator(15)`` -> ``update`` -> ``compute`` (top-label ECE *and* class-wise ECE);
- MONAI ``CalibrationErrorMetric(num_bins=15)`` (class-wise ECE, mean over channels; its one-hot target is
  built outside the timed region, as its API requires one-hot input);
- torchmetrics ``multiclass_calibration_error(n_bins=15, norm="l1", validate_args=False)`` (top-label only);
- the floor: one read pass ``probs.sum()``.

Checks that the values agree (ours top-label vs torchmetrics, ours class-wise vs MONAI, tolerance 1e-5) and
measures the extra peak memory of each method (peak RSS above the RSS with the inputs allocated, in a fresh
subprocess per method so freed memory of one method cannot hide another's peak), relative to the size of the
probability tensor.

Usage: ``.venv/bin/python benchmarks/bench_metrics.py [--sizes 128 192] [--repeats 5]``; prints a table and
writes ``benchmarks/results/bench_metrics.json``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LensSegCalib"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

N_BINS = 15
N_CLASSES = 4


def make_inputs(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities (1, 4, S, S, S) float32 from smooth-ish random logits, labels (1, S, S, S) int64, one-hot."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, N_CLASSES, size, size, size, generator=gen) * 2.0
    probs = torch.softmax(logits, dim=1)
    del logits
    # Labels: mostly the argmax (a decent model), 30 % resampled uniformly -> realistic mixed calibration.
    labels = probs.argmax(dim=1)
    flip = torch.rand(labels.shape, generator=gen) < 0.3
    labels = torch.where(flip, torch.randint(0, N_CLASSES, labels.shape, generator=gen), labels)
    onehot = torch.nn.functional.one_hot(labels, N_CLASSES).movedim(-1, 1).float().contiguous()
    return probs.contiguous(), labels.contiguous(), onehot


def reference_float64(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Plain numpy float64 ECE (rule 0.3 evaluated in float64) -- the exact values, independent of all three."""

    def binned(conf: np.ndarray, hit: np.ndarray) -> float:
        conf = conf.astype(np.float64).ravel()
        idx = np.clip(np.ceil(conf * N_BINS) - 1, 0, N_BINS - 1).astype(np.int64)
        s_conf = np.bincount(idx, weights=conf, minlength=N_BINS)
        s_hit = np.bincount(idx, weights=hit.astype(np.float64).ravel(), minlength=N_BINS)
        return float(np.abs(s_hit - s_conf).sum() / conf.size)

    conf, pred = probs.max(dim=1)
    top = binned(conf.numpy(), (pred == labels).numpy())
    per_class = [binned(probs[:, c].numpy(), (labels == c).numpy()) for c in range(probs.shape[1])]
    return {"ece": top, "classwise_ece": float(np.mean(per_class))}


def run_ours(probs: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor) -> dict[str, float]:
    from LensSegCalibLib.metrics import CalibrationAccumulator

    acc = CalibrationAccumulator(n_bins=N_BINS)
    acc.update(probs, labels)
    res = acc.compute()
    return {"ece": res.ece, "classwise_ece": res.classwise_ece}


def run_monai(probs: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor) -> dict[str, float]:
    from monai.metrics import CalibrationErrorMetric

    metric = CalibrationErrorMetric(num_bins=N_BINS)
    metric(y_pred=probs, y=onehot)
    return {"classwise_ece": float(metric.aggregate())}


def run_torchmetrics(probs: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor) -> dict[str, float]:
    from torchmetrics.functional.classification import multiclass_calibration_error

    val = multiclass_calibration_error(
        probs, labels, N_CLASSES, n_bins=N_BINS, norm="l1", validate_args=False
    )
    return {"ece": float(val)}


def run_read_pass(probs: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor) -> dict[str, float]:
    return {"sum": float(probs.sum())}


METHODS = {
    "ours (top-label + classwise, accumulator)": run_ours,
    "MONAI CalibrationErrorMetric (classwise)": run_monai,
    "torchmetrics MulticlassCalibrationError (top-label)": run_torchmetrics,
    "read pass (probs.sum)": run_read_pass,
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(method: str, size: int) -> None:
    """Subprocess: allocate inputs, reset the peak-RSS mark, run ``method`` once, print the peak above base."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    probs, labels, onehot = make_inputs(size)
    METHODS[method](probs[:, :, :8], labels[:, :8], onehot[:, :, :8])  # import + warm-up on a small slab
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap so the baseline is the live inputs
    except OSError:
        pass
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    METHODS[method](probs, labels, onehot)
    peak = _status_kb("VmHWM")
    print(json.dumps({"extra_peak_bytes": (peak - base) * 1024}))


def measure_memory(method: str, size: int) -> float | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--worker-size", str(size)],
        check=True, capture_output=True, text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_metrics.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.worker_size)
        return

    results: dict = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "loadavg_1min_before": os.getloadavg()[0]},
        "n_bins": N_BINS, "repeats": args.repeats, "sizes": {},
    }
    for size in args.sizes:
        probs, labels, onehot = make_inputs(size)
        prob_bytes = probs.numel() * probs.element_size()
        values: dict[str, dict[str, float]] = {}
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        for name, fn in METHODS.items():  # warm-up (imports, first-touch allocations)
            values[name] = fn(probs, labels, onehot)
        for _ in range(args.repeats):  # interleaved: machine load hits every method alike
            for name, fn in METHODS.items():
                t0 = time.perf_counter()
                fn(probs, labels, onehot)
                times[name].append(time.perf_counter() - t0)
        exact = reference_float64(probs, labels)
        ours = values["ours (top-label + classwise, accumulator)"]
        monai_cw = values["MONAI CalibrationErrorMetric (classwise)"]["classwise_ece"]
        tm_top = values["torchmetrics MulticlassCalibrationError (top-label)"]["ece"]
        rows = {}
        for name in METHODS:
            mem = measure_memory(name, size)
            rows[name] = {
                "median_s": statistics.median(times[name]),
                "all_s": times[name],
                "extra_peak_bytes": mem,
                "extra_peak_fraction_of_probs": None if mem is None else mem / prob_bytes,
                "values": values[name],
            }
        t_ours = rows["ours (top-label + classwise, accumulator)"]["median_s"]
        entry = {
            "shape": [1, N_CLASSES, size, size, size],
            "probs_bytes": prob_bytes,
            "methods": rows,
            "speedup_vs_monai": rows["MONAI CalibrationErrorMetric (classwise)"]["median_s"] / t_ours,
            "speedup_vs_torchmetrics": rows["torchmetrics MulticlassCalibrationError (top-label)"]["median_s"] / t_ours,
            "reference_float64": exact,
            "abs_diff_ours_vs_reference": max(abs(ours["ece"] - exact["ece"]),
                                              abs(ours["classwise_ece"] - exact["classwise_ece"])),
            "abs_diff_classwise_vs_monai": abs(ours["classwise_ece"] - monai_cw),
            "abs_diff_toplabel_vs_torchmetrics": abs(ours["ece"] - tm_top),
            "abs_diff_monai_vs_reference": abs(monai_cw - exact["classwise_ece"]),
            "abs_diff_torchmetrics_vs_reference": abs(tm_top - exact["ece"]),
        }
        # MONAI and torchmetrics sum in float32 (scatter_add): their error grows with the voxel count, so the
        # exact float64 reference decides; the anchors are reported next to it.
        entry["values_equal_1e-5"] = bool(
            entry["abs_diff_classwise_vs_monai"] < 1e-5 and entry["abs_diff_toplabel_vs_torchmetrics"] < 1e-5
        )
        entry["ours_exact_1e-9"] = bool(entry["abs_diff_ours_vs_reference"] < 1e-9)
        results["sizes"][str(size)] = entry
        del probs, labels, onehot

    results["machine"]["loadavg_1min_after"] = os.getloadavg()[0]
    print(f"threads={results['machine']['threads']} cpus={results['machine']['cpus']} bins={N_BINS} "
          f"repeats={args.repeats} (median wall time, interleaved); load average before/after "
          f"{results['machine']['loadavg_1min_before']:.1f}/{results['machine']['loadavg_1min_after']:.1f}")
    header = f"{'shape':>20} | {'method':<52} | {'median s':>9} | {'extra peak':>10} | values"
    print(header)
    print("-" * len(header))
    for size, entry in results["sizes"].items():
        for name, row in entry["methods"].items():
            frac = row["extra_peak_fraction_of_probs"]
            mem = "n/a" if frac is None else f"{100 * frac:8.1f} %"
            vals = ", ".join(f"{k}={v:.6f}" for k, v in row["values"].items())
            print(f"{'1x4x' + size + '^3':>20} | {name:<52} | {row['median_s']:9.4f} | {mem:>10} | {vals}")
        print(f"{'':>20} | speed-up vs MONAI {entry['speedup_vs_monai']:.1f}x, vs torchmetrics "
              f"{entry['speedup_vs_torchmetrics']:.1f}x; |ours - float64 reference| "
              f"{entry['abs_diff_ours_vs_reference']:.1e}; |MONAI - ref| {entry['abs_diff_monai_vs_reference']:.1e}, "
              f"|torchmetrics - ref| {entry['abs_diff_torchmetrics_vs_reference']:.1e} (float32 sums); "
              f"anchors equal to ours within 1e-5: {entry['values_equal_1e-5']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2), encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
