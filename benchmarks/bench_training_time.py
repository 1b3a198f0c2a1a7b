"""How long the shipped training recipes take on this machine: seconds per step of every stage, and the total.

The catalog's ``training.seconds`` are wall times of the runs that produced the weights, taken on a shared
machine with several runs side by side, so they overstate what one run alone costs. This benchmark runs
``--steps`` steps of each stage config alone (``--threads`` torch threads, random initial weights: the step
time does not depend on the weights), times one validation pass per stage, and estimates a full recipe as

    sum over stages of (steps x seconds per step + epochs x validation seconds) + phantom generation,

where phantom generation (the training cache, once per machine) is measured by ``--cache-seconds`` or given.
Stages that share a patch size and grid (AS-OCT stages 1-3) are timed once, on stage 3, whose augmentation
is the heaviest of the three.

    .venv/bin/python benchmarks/bench_training_time.py            # writes benchmarks/results/bench_training_time.json
    .venv/bin/python benchmarks/bench_training_time.py --quick    # 5 steps, one loss: a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "LensSegCalib" / "LensSegCalibLib" / "training" / "configs"
RESULTS = ROOT / "benchmarks" / "results" / "bench_training_time.json"


def _chain(loss: str) -> list[str]:
    return [f"asoct-lens-{loss}-stage{i}" for i in (1, 2, 3, 4)] + [f"asoct-lens-{loss}"]


def _time_stage(name: str, steps: int, threads: int, work: Path) -> dict:
    """Seconds per training step (no validation) and per validation pass of one stage config."""
    import torch

    from LensSegCalibLib.models import build_network
    from LensSegCalibLib.training import load_config, train_from_config
    from LensSegCalibLib.training.trainer import _val_cases, _validate, _volumes

    torch.set_num_threads(threads)
    over = {"optim": {"epochs": 1, "steps_per_epoch": steps, "threads": threads, "warmup_steps": 1},
            "output": {"dir": str(work / name)}, "temperature_scaling": False}
    cfg = load_config(CONFIGS / f"{name}.json", over)
    cfg["init_from"] = None  # random weights: the previous stage need not exist
    train_from_config(cfg, progress=False, resume=False)
    row = [json.loads(line) for line in (work / name / "log.jsonl").read_text().splitlines()][-1]
    cases = _val_cases(_volumes(cfg, "val", rank=0), cfg)
    net = build_network(cfg["network"]).eval()
    t0 = time.perf_counter()
    _validate(net, cases, cfg, torch.device("cpu"))
    return {"seconds_per_step": row["seconds"] / steps, "validation_seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--losses", nargs="+", default=["ce", "acw", "sdc"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-seconds", type=float, default=None,
                    help="phantom generation seconds for the training cache (default: measure 4 volumes, scale)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.losses, args.steps = ["ce"], 5
    os.chdir(ROOT)  # configs use runs/cache relative to the repository root
    from LensSegCalibLib.training import load_config

    if args.cache_seconds is None:
        from LensSegCalibLib.phantom import asoct_volume

        t0 = time.perf_counter()
        for seed in range(4):
            asoct_volume(seed, shape=(8, 800, 800))
        from LensSegCalibLib.training.trainer import _seed_list

        data = load_config(CONFIGS / "asoct-lens-acw.json")["data"]
        n_vol = len(_seed_list(data["train_seeds"])) + len(_seed_list(data["val_seeds"]))
        cache_seconds = (time.perf_counter() - t0) / 4 * n_vol
    else:
        cache_seconds = args.cache_seconds
    work = Path(tempfile.mkdtemp(prefix="bench_training_time_"))
    result: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                    "threads": args.threads, "steps_timed": args.steps, "cache_seconds": round(cache_seconds, 1),
                    "recipes": {}}
    try:
        for loss in args.losses:
            chain = _chain(loss)
            timed = {chain[2]: _time_stage(chain[2], args.steps, args.threads, work),
                     chain[3]: _time_stage(chain[3], args.steps, args.threads, work),
                     chain[4]: _time_stage(chain[4], args.steps, args.threads, work)}
            stages, total = [], cache_seconds
            for i, name in enumerate(chain):
                opt = load_config(CONFIGS / f"{name}.json")["optim"]
                t = timed[chain[2]] if i < 3 else timed[name]
                secs = opt["epochs"] * opt["steps_per_epoch"] * t["seconds_per_step"] + opt["epochs"] * t[
                    "validation_seconds"]
                stages.append({"config": name, "steps": opt["epochs"] * opt["steps_per_epoch"],
                               "seconds_per_step": round(t["seconds_per_step"], 4),
                               "validation_seconds": round(t["validation_seconds"], 2), "seconds": round(secs, 1)})
                total += secs
            result["recipes"][f"asoct-lens-{loss}"] = {"stages": stages, "total_seconds": round(total, 1),
                                                      "total_minutes": round(total / 60, 1)}
            print(f"asoct-lens-{loss}: {total / 60:.1f} min", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
