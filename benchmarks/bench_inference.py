"""Inference benchmark: LensSegCalib's full path vs plain MONAI sliding-window inference, same network, same run.

Scenarios (phantoms, generated once in the parent and handed to workers as .npy files):

- ``asoct``: a real-device-size radial AS-OCT scan, 16 B-scans x 800 x 800 (CASIA2-like), model ``asoct-lens-acw``.
- ``ct``: a head CT of 256 x 256 x 128 voxels (array (128, 256, 256), 0.9 mm pixels, 2 mm slices), model
  ``ct-lens-acw``.

Variants, each in a fresh subprocess (so ``VmHWM`` is that variant's own peak):

- ``monai``: bare inference written with plain torch/MONAI: normalise, resample to the model grid,
  ``sliding_window_inference`` (same roi, overlap, Gaussian blending), softmax, resample back, argmax.
- ``lenssegcalib``: ``Segmenter.predict`` (labels, float16 probabilities, confidence, entropy, label-free
  boundary map) + ``calibration_report`` without a reference (what ``lenssegcalib segment`` computes), then the
  report with the phantom's reference and the HTML (reported separately: they are optional extras).

Overhead = (predict + report - bare) / bare; target <= 20 %. Peak memory = max RSS minus the RSS after loading
the input and the network (MiB). Uses the shipped catalog models when present, otherwise the same architectures
from ``training/configs`` with random weights (timing does not depend on the weights' values, only the label
maps' boundary lengths do a little).

    .venv/bin/python benchmarks/bench_inference.py            # writes benchmarks/results/bench_inference.json
    .venv/bin/python benchmarks/bench_inference.py --quick    # small sizes, smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_inference.json"
CONFIGS = ROOT / "LensSegCalib" / "LensSegCalibLib" / "training" / "configs"
SCENARIOS = {
    "asoct": {"model": "asoct-lens-acw", "shape": (16, 800, 800), "quick": (2, 400, 400)},
    "ct": {"model": "ct-lens-acw", "shape": (128, 256, 256), "quick": (32, 128, 128)},
}


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mib() -> float:
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: Linux keeps that across fork+exec, so it would
    include the parent's RSS."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _catalogs(tmp: Path) -> dict[str, str | None]:
    """Per model: None = the shipped catalog has it; else a temporary catalog with a random-weight network of
    the architecture in ``training/configs`` (timing does not depend on the weights' values)."""
    from LensSegCalibLib import models

    try:
        shipped = models.load_catalog().ids()
    except models.CatalogError:
        shipped = []
    out: dict[str, str | None] = {}
    entries = []
    for scenario in SCENARIOS.values():
        name = scenario["model"]
        if name in shipped:
            out[name] = None
            continue
        cfg = json.loads((CONFIGS / f"{name}.json").read_text())
        net = models.build_network(cfg["network"])
        sha, nbytes = models.save_weights(net, tmp / f"{name}.safetensors")
        entries.append({k: cfg[k] for k in ("title", "version", "task", "modality", "description", "classes",
                                            "input", "network", "loss")}
                       | {"id": name, "temperature": 1.0,
                          "weights": {"file": f"{name}.safetensors", "sha256": sha, "bytes": nbytes}})
        out[name] = str(tmp / "catalog.json")
    if entries:
        (tmp / "catalog.json").write_text(json.dumps({"catalog_version": 1, "models": entries}))
    return out


def _phantom(name: str, shape: tuple[int, int, int], folder: Path) -> dict:
    from LensSegCalibLib.phantom import asoct_volume, ct_head_volume

    if name == "asoct":
        ph = asoct_volume(11, shape=shape)  # 13 x 16 mm B-scans: 800 x 800 is the model's own grid
    else:  # 0.9 mm pixels (230 mm field of view at 256), 2 mm slices: resampled to the model's 1.5 mm in z
        ph = ct_head_volume(11, shape=shape, pixel_mm=0.9, slice_mm=2.0)
    np.save(folder / f"{name}_image.npy", ph.image)
    np.save(folder / f"{name}_labels.npy", ph.labels)
    return {"shape": list(ph.image.shape), "spacing_mm": list(ph.spacing)}


# ------------------------------------------------------------------------------------------------- workers
def _worker(variant: str, name: str, folder: Path, spacing: list[float], catalog: str | None, device: str) -> dict:
    import torch

    from LensSegCalibLib.inference import Segmenter

    image = np.load(folder / f"{name}_image.npy")
    reference = np.load(folder / f"{name}_labels.npy")
    seg = Segmenter.from_catalog(SCENARIOS[name]["model"], device=device, catalog=catalog)
    sync = torch.cuda.synchronize if seg.device.type == "cuda" else (lambda: None)
    base = _rss_mib()
    out: dict = {"variant": variant, "device": str(seg.device), "threads": torch.get_num_threads()}
    if variant == "monai":
        t0 = time.perf_counter()
        labels = _bare_monai(seg, image, tuple(spacing))
        sync()
        out["seconds"] = time.perf_counter() - t0
        out["foreground_voxels"] = int((labels > 0).sum())
    else:
        from LensSegCalibLib.report import calibration_report

        t0 = time.perf_counter()
        pred = seg.predict(image, spacing)
        sync()
        t1 = time.perf_counter()
        calibration_report(pred, spacing, image=image)
        t2 = time.perf_counter()
        out |= {"seconds": t2 - t0, "predict_seconds": t1 - t0, "report_seconds": t2 - t1,
                "stages": pred.seconds, "foreground_voxels": int((pred.labels > 0).sum())}
        peak_core = _peak_mib()
        t3 = time.perf_counter()
        rep = calibration_report(pred, spacing, reference=reference, image=image)
        t4 = time.perf_counter()
        rep.to_html(None)
        t5 = time.perf_counter()
        out |= {"report_with_reference_seconds": t4 - t3, "html_seconds": t5 - t4,
                "peak_mib_without_reference_report": peak_core - base,
                "dice": {s.key: s.dice for s in rep.segments}}
    out["peak_mib"] = _peak_mib() - base
    out["baseline_rss_mib"] = base
    return out


def _bare_monai(seg, image: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Plain torch/MONAI inference with the segmenter's network and catalog settings (labels only)."""
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from LensSegCalibLib.preprocessing import normalize_intensity, resampled_shape

    spec, dev = seg.spec, seg.device
    norm = normalize_intensity(image, spec.normalization)
    labels = np.empty(image.shape, dtype=np.uint8)
    amp = torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), amp:
        if spec.mode == "slicewise2d":
            size = resampled_shape(image.shape[1:], spacing[1:], spec.spacing_mm[1:])
            for z0 in range(0, image.shape[0], 4):
                x = torch.from_numpy(norm[z0:z0 + 4]).to(dev)[:, None]
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                logits = sliding_window_inference(x, list(spec.patch_size), seg.batch_size, seg.network,
                                                  overlap=seg.overlap, mode="gaussian", cval=-1.0)
                probs = torch.softmax(logits.float(), dim=1)
                probs = F.interpolate(probs, size=image.shape[1:], mode="bilinear", align_corners=False)
                labels[z0:z0 + 4] = probs.argmax(1).to(torch.uint8).cpu().numpy()
        else:
            size = resampled_shape(image.shape, spacing, spec.spacing_mm)
            x = F.interpolate(torch.from_numpy(norm).to(dev)[None, None], size=size, mode="trilinear",
                              align_corners=False)
            logits = sliding_window_inference(x, list(spec.patch_size), seg.batch_size, seg.network,
                                              overlap=seg.overlap, mode="gaussian", cval=-1.0)
            probs = torch.softmax(logits.float(), dim=1)
            probs = F.interpolate(probs, size=image.shape, mode="trilinear", align_corners=False)
            labels[:] = probs[0].argmax(0).to(torch.uint8).cpu().numpy()
    return labels


# ------------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small volumes (smoke test); does not write results")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        variant, name, folder, spacing, catalog, device = args.worker
        result = _worker(variant, name, Path(folder), json.loads(spacing), None if catalog == "-" else catalog,
                         device)
        print("RESULT " + json.dumps(result))
        return 0

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    report: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "load_average_at_start": os.getloadavg()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": "heatmaps + report add <= 20 % on top of bare MONAI inference",
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        folder = Path(tmp)
        catalogs = _catalogs(folder)
        report["weights"] = {m: "shipped" if c is None else "random init (architecture of training/configs)"
                             for m, c in catalogs.items()}
        for name in args.scenarios:
            catalog = catalogs[SCENARIOS[name]["model"]]
            shape = SCENARIOS[name]["quick" if args.quick else "shape"]
            info = _phantom(name, shape, folder)
            entry = {"model": SCENARIOS[name]["model"], **info, "runs": {}}
            for device in devices:
                runs = {}
                for variant in ("monai", "lenssegcalib"):
                    cmd = [sys.executable, __file__, "--worker", variant, name, str(folder),
                           json.dumps(info["spacing_mm"]), str(catalog) if catalog else "-", device]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode != 0 or not line:
                        raise SystemExit(f"worker {variant}/{name}/{device} failed:\n{proc.stderr[-3000:]}")
                    runs[variant] = json.loads(line[0][7:])
                    print(f"{name:6s} {device:4s} {variant:13s} {runs[variant]['seconds']:8.2f} s  "
                          f"peak {runs[variant]['peak_mib']:8.1f} MiB", flush=True)
                bare = runs["monai"]["seconds"]
                full = runs["lenssegcalib"]
                runs["overhead_fraction"] = (full["predict_seconds"] + full["report_seconds"] - bare) / bare
                runs["heatmap_seconds"] = full["stages"]["heatmaps"]
                print(f"{name:6s} {device:4s} overhead {100 * runs['overhead_fraction']:+.1f} % "
                      f"(predict {full['predict_seconds']:.2f} s incl. heat maps {full['stages']['heatmaps']:.2f} s, "
                      f"report {full['report_seconds']:.2f} s; "
                      f"with reference {full['report_with_reference_seconds']:.2f} s, "
                      f"HTML {full['html_seconds']:.2f} s)", flush=True)
                entry["runs"][device] = runs
            report["scenarios"][name] = entry
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = RESULTS.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(report, indent=2) + "\n")
        tmp_path.replace(RESULTS)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
