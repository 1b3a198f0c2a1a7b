"""Loss study: the same AS-OCT recipe trained with CE, ACW, SDC, NACL, SVLS, RRW and CALF; held-out metrics.

Two modes, both using the shipped AS-OCT config (network, data, augmentation, schedule) and changing only the
loss and the seed:

* **fine-tuning** (``--init-from asoct-lens-ce`` or a ``.safetensors`` path): every variant starts from the
  same converged weights and is fine-tuned with its own loss for ``--steps`` (default 400) steps on the
  shipped config's training phantoms, 192 x 192 patches, LR 3e-4; the seed changes only the data order and
  augmentation. This is a *calibration fine-tuning* study (how each loss moves a converged network), not the
  papers' from-scratch setting, and docs/RESULTS.md says so.
* **from scratch** (no ``--init-from``): the old reduced budget (300 steps, 128 x 128 patches, 24 phantoms);
  the networks stay far from converged.

Held-out phantoms: seeds >= 10000 (``--eval-n`` per set, "standard" and "hard"), scored with the shipped
inference path (``training.evaluate``) with and without the fitted temperature.

Resumable and splittable: each run (loss, seed) writes ``<run-dir>/<loss>-s<seed>/result.json`` (metrics,
reliability counts and the budget it ran with) when done; a rerun skips every run whose result.json records
the same budget. Two processes can share the study (``--losses ce,acw,sdc`` / ``--losses nacl,svls,rrw,calf``);
``--markdown-only`` with the same budget options then gathers every matching result.json into
``benchmarks/results/study_losses.json``, the reliability diagrams ``docs/figures/reliability_<loss>.png`` and
``docs/RESULTS.md`` (a hand-written ``## Findings`` section already in that file is kept).

    python benchmarks/study_losses.py --init-from asoct-lens-ce --losses ce,acw,sdc --seeds 0,1,2
    python benchmarks/study_losses.py --init-from asoct-lens-ce --losses nacl,svls,rrw,calf --seeds 0,1,2
    python benchmarks/study_losses.py --init-from asoct-lens-ce --seeds 0,1,2 --markdown-only
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LensSegCalib"))

CONFIG = ROOT / "LensSegCalib/LensSegCalibLib/training/configs/asoct-lens-ce.json"
LOSS_ORDER = "ce acw sdc nacl svls rrw calf".split()
N_BINS = 15
CLAIMS = {
    "acw": "ACW vs CE (U-Net, paper): IoU +6.13 %, DSC +4.33 %, BECE -4.79 %",
    "sdc": "SDC vs CE (paper): Dice +0.8 %, pECE -32 %",
}
#: defaults that differ between the two modes: (from scratch, fine-tuning); None on the command line = these
MODE_DEFAULTS = {"steps": (300, 400), "patch": (128, 192), "eval_n": (2, 3), "train_volumes": (24, None)}
FINETUNE_LR = 3e-4


def _atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (``io.atomic_path``): a reader never sees a half-written file."""
    from LensSegCalibLib.io import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _loss_params(name: str, cfg: dict) -> dict:
    """Loss-specific constructor parameters derived from the run's config (``cfg``: loaded training config)."""
    if name == "calf":  # CALF picks its transform from the training set's foreground sizes (once)
        from LensSegCalibLib.training.trainer import _volumes

        vols = _volumes(cfg, "train", rank=0)
        return {"foreground_sizes": [float((np.asarray(v.labels) > 0).sum()) for v in vols]}
    if name == "nacl":
        return {"num_classes": len(cfg["classes"])}
    return {}


def _extra_metrics(probs: np.ndarray, ref: np.ndarray, vis: np.ndarray) -> dict:
    """IoU (visible), class-wise ECE, pECE and NLL per B-scan (whole image), averaged over B-scans.

    probs ``(C, Z, H, W)`` float, ref ``(Z, H, W)`` labels, vis ``(Z, H, W)`` bool.
    """
    import torch

    from LensSegCalibLib import metrics as M

    p = torch.from_numpy(np.ascontiguousarray(probs.transpose(1, 0, 2, 3)))  # (Z, C, H, W): B-scans as cases
    y = torch.from_numpy(ref.astype(np.int64))
    pred = p.argmax(1)
    c = probs.shape[0]
    pv = torch.where(torch.from_numpy(vis), pred, torch.zeros_like(pred))
    yv = torch.where(torch.from_numpy(vis), y, torch.zeros_like(y))
    return {"iou": [float(v) for v in M.iou(pv, yv, c)], "cw_ece": float(M.classwise_ece(p, y)),
            "pece": float(M.pece(p, y)), "nll": float(M.nll(p, y))}


# ----------------------------------------------------------------------------------------------------------
# budget: the mode-dependent defaults, resolved once, and the record a result.json must match to be reused
# ----------------------------------------------------------------------------------------------------------
def resolve_init(value: str | None) -> dict | None:
    """The shared initial weights: ``{"id", "version", "path", "sha256", "patch", "network"}`` or None.

    ``value``: a catalog model id (its weights are size- and sha256-checked by the library) or a path to a
    ``.safetensors`` file (hashed here). An unknown id raises ModelError listing the known ids.
    """
    if not value:
        return None
    from LensSegCalibLib.errors import InputError
    from LensSegCalibLib.models import load_catalog, sha256_file, verify_weights

    p = Path(value)
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise InputError(f"--init-from {value}: no such file; pass an existing .safetensors file or a "
                             "catalog model id (`lenssegcalib models` lists them).")
        return {"id": None, "version": None, "path": str(p.resolve()), "sha256": sha256_file(p),
                "patch": None, "network": None}
    spec = load_catalog().get(value)
    path = verify_weights(spec)
    return {"id": spec.id, "version": spec.version, "path": str(path), "sha256": str(spec.weights["sha256"]).lower(),
            "patch": list(spec.patch_size), "network": spec.network}


def resolve_args(args: argparse.Namespace, base: dict) -> None:
    """Fill the ``None`` defaults from the mode (in place) and check the init weights fit the study network.

    Sets ``args.init`` (see :func:`resolve_init`); fine-tuning keeps the config's training seeds, so
    ``--train-volumes`` is refused there.
    """
    from LensSegCalibLib.errors import InputError

    args.init = resolve_init(args.init_from)
    ft = args.init is not None
    if ft and args.train_volumes is not None:
        raise InputError("--train-volumes only applies from scratch: fine-tuning keeps the shipped config's "
                         "training phantoms (data.train_seeds and per_seed). Drop --train-volumes.")
    if ft and args.patch is None and args.init["patch"] is not None:
        args.patch = int(args.init["patch"][-1])  # the patch the init weights were trained and infer with
    for key, (scratch, finetune) in MODE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, finetune if ft else scratch)
    if args.lr is None:
        args.lr = FINETUNE_LR if ft else float(base["optim"]["lr"])
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}.")
    if ft and args.init["network"] is not None and args.init["network"] != base["network"]:
        raise InputError(f"--init-from {args.init_from}: its network {args.init['network']} differs from the study "
                         f"config's {base['network']} ({CONFIG.name}); pick an AS-OCT model with the same network.")
    if ft and args.init["patch"] is not None and list(args.init["patch"][-2:]) != [args.patch, args.patch]:
        print(f"[study] note: --patch {args.patch} differs from the patch {args.init['patch']} the init weights "
              "were trained on; the fine-tuned models will infer with the new patch.", flush=True)


def study_budget(args: argparse.Namespace, base: dict) -> dict:
    """The budget every run of this invocation trains with (stored in result.json and study_losses.json).

    ``recipe_sha``: hash of the config parts a run inherits (data incl. per-seed variations and augmentation,
    network, input normalisation, optimiser beyond the stated LR/steps), so a changed config is never mixed
    with results trained on the old one.
    """
    from LensSegCalibLib.training.trainer import _seed_list

    ft = args.init is not None
    train_seeds = base["data"]["train_seeds"] if ft else {"start": 0, "stop": int(args.train_volumes)}
    # fine-tuning refits the temperature on the shipped validation phantoms; from scratch keeps one (cheap)
    val_seeds = base["data"]["val_seeds"] if ft else [5000]
    epochs = 2 if args.steps >= 2 and args.steps % 2 == 0 else 1  # 2 epochs: a checkpoint half-way
    data = {k: v for k, v in base["data"].items() if k != "cache_dir"}
    data.update(train_seeds=train_seeds, val_seeds=val_seeds)
    optim = {k: v for k, v in base["optim"].items()
             if k not in ("threads", "lr", "epochs", "steps_per_epoch", "batch_size", "warmup_steps")}
    inp = {k: v for k, v in base["input"].items() if k != "patch_size"}
    recipe = json.dumps({"data": data, "network": base["network"], "input": inp, "optim": optim,
                         "temperature_scaling": base.get("temperature_scaling", True)}, sort_keys=True, default=str)
    init = None
    if ft:
        init = {"id": args.init["id"], "version": args.init["version"], "sha256": args.init["sha256"],
                "path": args.init["path"]}
    return {"mode": "finetune" if ft else "scratch", "steps": epochs * (args.steps // epochs), "epochs": epochs,
            "patch": int(args.patch), "batch": int(args.batch), "lr": float(args.lr),
            "warmup": max(1, args.steps // 10), "train_seeds": len(_seed_list(train_seeds)),
            "train_seed_spec": train_seeds, "val_seeds": _seed_list(val_seeds), "eval_n": int(args.eval_n),
            "init_from": init, "config": CONFIG.name,
            "recipe_sha": hashlib.sha1(recipe.encode()).hexdigest()[:12]}


def _budget_key(budget: dict) -> dict:
    """What two budgets must share for a result to be reused: everything but the init weights' location."""
    key = copy.deepcopy(budget)
    if key.get("init_from"):
        key["init_from"] = key["init_from"]["sha256"]  # same bytes = same start, wherever the file lies
    return key


def _budget_matches(result: dict | None, budget: dict) -> bool:
    """True when ``result`` (a result.json's content, None when missing) was run with ``budget``: reuse it."""
    return result is not None and _budget_key(result.get("budget", {})) == _budget_key(budget)


def _read_result(path: Path) -> dict | None:
    """A result.json's content, or None when it is missing or unreadable (a rerun then redoes the run)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        print(f"[study] {path} unreadable ({exc}); the run will be redone.", flush=True)
        return None


# ----------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------
def _eval_phantoms(eval_n: int) -> list:
    """Held-out phantoms: ``eval_n`` standard (seeds 10000..) + ``eval_n`` hard (10100..), 2 x 800 x 800 each."""
    from LensSegCalibLib.phantom import asoct_volume

    cases = [(s, {}) for s in range(10000, 10000 + eval_n)] + \
            [(s, {"split": "heldout"}) for s in range(10100, 10100 + eval_n)]
    return [asoct_volume(s, shape=(2, 800, 800), **v) for s, v in cases]


def run(args: argparse.Namespace, base: dict, budget: dict, run_dir: Path) -> None:
    """Train and score every requested (loss, seed) whose result.json is missing or from another budget."""
    import torch

    from LensSegCalibLib.inference import Segmenter
    from LensSegCalibLib.metrics import reliability
    from LensSegCalibLib.models import build_network, spec_from_dict
    from LensSegCalibLib.training import load_config, train_from_config
    from LensSegCalibLib.training.evaluate import _mean_rows, _temper, evaluate_prediction
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    cache = Path(base["data"].get("cache_dir") or "runs/cache")
    cache = cache if cache.is_absolute() else ROOT / cache  # the shared phantom cache, whatever the cwd
    common = {"input": {"patch_size": [budget["patch"], budget["patch"]]},
              "data": {"train_seeds": budget["train_seed_spec"], "val_seeds": budget["val_seeds"],
                       "cache_dir": str(cache)},
              "optim": {"epochs": budget["epochs"], "steps_per_epoch": budget["steps"] // budget["epochs"],
                        "batch_size": budget["batch"], "lr": budget["lr"], "warmup_steps": budget["warmup"],
                        "threads": args.threads},
              # from scratch must say so: the shipped config itself fine-tunes from its previous stage
              "init_from": budget["init_from"]["path"] if budget["init_from"] else None}
    run_cfg = load_config(CONFIG, overrides=common)
    phantoms = None
    for loss in args.losses:
        for seed in args.seeds:
            tag = f"{loss}-s{seed}"
            res_path = run_dir / tag / "result.json"
            old = _read_result(res_path)
            if _budget_matches(old, budget):
                print(f"[study] {tag}: done already ({res_path}), skipped", flush=True)
                continue
            if old is not None:
                print(f"[study] {tag}: {res_path} is from another budget; rerunning", flush=True)
            if phantoms is None:  # only when something runs
                phantoms = _eval_phantoms(budget["eval_n"])
            t0 = time.perf_counter()
            ov = copy.deepcopy(common)
            ov.update({"model_id": f"study-{tag}", "seed": seed,
                       "loss": {"name": loss, "params": _loss_params(loss, run_cfg)},
                       "output": {"dir": str(run_dir / tag), "register": False}})
            wpath = train_from_config(CONFIG, overrides=ov, progress=False, device="cpu")
            entry = json.loads((wpath.parent / "catalog_entry.json").read_text())
            spec = spec_from_dict(entry, wpath.parent)
            net = build_network(spec.network)
            net.load_state_dict(load_file(str(wpath)))
            seg = Segmenter(net.eval(), spec, device="cpu", apply_temperature=False)
            rows: dict[str, list] = {"raw": [], "ts": []}
            rel = {m: {"count": np.zeros(N_BINS), "conf": np.zeros(N_BINS), "hit": np.zeros(N_BINS)} for m in rows}
            for ph in phantoms:
                pr = seg.predict(ph.image, ph.spacing, probabilities_dtype=np.float32).probabilities
                for mode, probs in (("raw", pr), ("ts", _temper(pr, spec.temperature))):
                    r = evaluate_prediction(probs, ph.labels, ph.visible, ph.spacing, slicewise=True)
                    r.update(_extra_metrics(probs, ph.labels, ph.visible))
                    rows[mode].append(r)
                    # pooled bin sums over all held-out cases (count, sum conf, sum hit) -> diagrams later
                    rb = reliability(torch.from_numpy(probs[None]), torch.from_numpy(ph.labels[None].astype(np.int64)),
                                     n_bins=N_BINS, mask=torch.from_numpy(ph.visible[None]))
                    cnt = np.nan_to_num(np.asarray(rb.count, dtype=float))
                    rel[mode]["count"] += cnt
                    rel[mode]["conf"] += cnt * np.nan_to_num(np.asarray(rb.mean_confidence, dtype=float))
                    rel[mode]["hit"] += cnt * np.nan_to_num(np.asarray(rb.accuracy, dtype=float))
            train_s = float(entry["training"]["seconds"])
            result = {"loss": loss, "seed": seed, "budget": budget, "temperature": spec.temperature,
                      "seconds": round(time.perf_counter() - t0, 1), "train_seconds": train_s,
                      "seconds_per_step": round(train_s / budget["steps"], 3),
                      "final_validation": entry["training"].get("final_validation", {}),
                      "raw": _mean_rows(rows["raw"]), "ts": _mean_rows(rows["ts"]),
                      "reliability": {m: {k: [float(x) for x in v] for k, v in d.items()} for m, d in rel.items()}}
            _atomic_write_text(res_path, json.dumps(result, indent=2))
            print(f"[study] {tag}: dice {result['raw']['dice']} ece {result['raw']['ece']} "
                  f"({result['seconds']} s, {result['seconds_per_step']} s/step) -> {res_path}", flush=True)


def gather(run_dir: Path, losses: list[str], seeds: list[int], budget: dict) -> tuple[dict, list[str]]:
    """Every result.json under ``run_dir`` for the requested losses x seeds that matches ``budget``.

    Returns ``({"budget", "runs": {tag: result}}, missing tags)``.
    """
    out: dict = {"budget": budget, "runs": {}}
    missing = []
    for loss in losses:
        for seed in seeds:
            tag = f"{loss}-s{seed}"
            res = _read_result(run_dir / tag / "result.json")
            if not _budget_matches(res, budget):
                missing.append(tag + ("" if res is None else " (other budget)"))
                continue
            out["runs"][tag] = res
    return out, missing


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------
def _plot_seeds(res: dict) -> dict[str, int]:
    """Per loss, the smallest seed that has reliability counts (its diagram is drawn)."""
    seeds: dict[str, int] = {}
    for r in res["runs"].values():
        if "reliability" in r and (r["loss"] not in seeds or r["seed"] < seeds[r["loss"]]):
            seeds[r["loss"]] = r["seed"]
    return seeds


def _plots(res: dict, out: Path) -> list[str]:
    """Reliability diagrams ``reliability_<loss>.png`` (raw and temperature-scaled) from the runs' counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LensSegCalibLib.io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    seeds = _plot_seeds(res)
    for loss, seed in seeds.items():
        rel = res["runs"][f"{loss}-s{seed}"]["reliability"]
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, mode in zip(axes, ("raw", "ts")):
            s = {k: np.asarray(v, dtype=float) for k, v in rel[mode].items()}
            with np.errstate(invalid="ignore", divide="ignore"):
                acc = s["hit"] / s["count"]
                conf = s["conf"] / s["count"]
            centres = (np.arange(N_BINS) + 0.5) / N_BINS
            ax.bar(centres, np.nan_to_num(acc), width=1 / N_BINS, edgecolor="k", alpha=0.7, label="accuracy")
            ax.bar(centres, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=1 / N_BINS, color="r",
                   alpha=0.3, label="gap (conf - acc)")
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_title(f"{loss.upper()} {'+ temperature' if mode == 'ts' else 'raw'} (visible voxels)")
            ax2 = ax.twinx()
            ax2.semilogy(centres, np.maximum(s["count"], 1), "g.-", lw=0.8)
            ax2.set_ylabel("voxels (log)", color="g")
        axes[0].set_ylabel("accuracy")
        axes[0].legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        with atomic_path(out / f"reliability_{loss}.png", overwrite=True) as tmp:  # keeps the .png suffix
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
    return sorted(seeds, key=_loss_rank)


def _loss_rank(name: str) -> int:
    return LOSS_ORDER.index(name) if name in LOSS_ORDER else len(LOSS_ORDER)


def _fmt(vals: list, pct: bool = False, idx: int | None = None) -> str:
    v = [x[idx] if idx is not None else x for x in vals]
    v = np.array([np.nan if x is None else x for x in v], dtype=float)
    if pct:
        v = v * 100
    if np.all(np.isnan(v)):
        return "–"
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if not pct else f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}"


def _shipped_section() -> list[str]:
    """Held-out metrics of the shipped models (full recipe) from the catalog: CE vs ACW vs SDC (and CT)."""
    from LensSegCalibLib.errors import CatalogError
    from LensSegCalibLib.models import load_catalog

    out = ["## Shipped models (full recipe, from catalog.json `heldout_metrics`)", "",
           "Same network, data and recipe (steps per model in the table); only the loss differs (AS-OCT). "
           "Held-out: the catalog's sets (case counts in the table; standard = seeds 10000.., hard = 10100.. "
           "with the generator's held-out ranges; AS-OCT 4 B-scans at 800 x 800), inside `visible`; hidden = "
           "behind the iris / lost to attenuation. raw = T 1, TS = the model's temperature (T 1: no scaling, "
           "TS = raw).", "",
           "| model | steps | set | T | Dice caps / cort / nucl (or R / L lens) | whole-lens Dice | HD95 mm | ECE % raw / TS | "
           "ECE_fg % raw / TS | BECE % raw / TS | hidden lens Dice | hidden acc / conf raw / conf TS | hidden ECE % raw / TS |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    try:
        cat = load_catalog()
    except CatalogError as exc:  # the study still writes its own tables
        return out + [f"(catalog unavailable: {exc})", ""]

    def f(v, pct=False):
        if v is None:
            return "–"
        if isinstance(v, list):
            return " / ".join(f(x, pct) for x in v)
        return f"{100 * v:.2f}" if pct else f"{v:.3f}"

    for spec in cat:
        hm = spec.heldout_metrics
        tr = spec.training
        # staged recipes: the earlier stages' steps (training.stage1..4) + this run's epochs x steps
        stages = [int(tr[k]["steps"]) for k in ("stage1", "stage2", "stage3", "stage4")
                  if isinstance(tr.get(k), dict) and "steps" in tr[k]]
        stages.append(int(tr.get("epochs", 0)) * int(tr.get("steps_per_epoch", 0)))
        steps = " + ".join(str(n) for n in stages)
        sets = list(hm.get("sets", {}).items()) + [(f"{k} (robustness)", v) for k, v in hm.get("robustness", {}).items()]
        for name, st in sets:
            r, t = st["raw"], st.get("temperature_scaled", st["raw"])
            out.append(f"| {spec.id} | {steps} | {name} ({r['cases']}) | {spec.temperature:.3f} | {f(r['dice'])} | {f(r['dice_lens'])} | "
                       f"{f(r['hd95_mm'])} | {f(r['ece'], True)} / {f(t['ece'], True)} | {f(r['ece_fg'], True)} / "
                       f"{f(t['ece_fg'], True)} | {f(r['bece'], True)} / {f(t['bece'], True)} | "
                       f"{f(r.get('hidden_dice_lens'))} | {f(r.get('hidden_accuracy'))} / {f(r.get('hidden_confidence'))}"
                       f" / {f(t.get('hidden_confidence'))} | {f(r.get('hidden_ece'), True)} / {f(t.get('hidden_ece'), True)} |")
    return out + [""]


def _init_label(init: dict) -> str:
    """``asoct-lens-ce`` 1.3.0 (sha256 `0123456789ab`) or the file name for a path."""
    name = f"`{init['id']}` {init.get('version') or ''}".rstrip() if init.get("id") else f"`{Path(init['path']).name}`"
    return f"{name} (sha256 `{init['sha256'][:12]}`)"


def _budget_lines(res: dict) -> list[str]:
    """Title and budget paragraph; they name the mode (fine-tuning from shared weights or from scratch)."""
    b = res["budget"]
    seeds = sorted({r["seed"] for r in res["runs"].values()})
    heldout = (f"held-out: {b['eval_n']} standard + {b['eval_n']} hard AS-OCT phantoms (seeds >= 10000, 2 B-scans "
               "each at the native 800 x 800 grid)")
    if b.get("mode") == "finetune":
        init = b["init_from"]
        return ["# Loss study (fine-tuning from shared weights)", "",
                f"**Budget (calibration fine-tuning, stated):** every loss starts from the same converged network, "
                f"{_init_label(init)}, and is fine-tuned with its own loss for {b['steps']} steps of batch {b['batch']} "
                f"on {b['patch']}x{b['patch']} B-scan patches at LR {b['lr']:g} ({b['warmup']} warm-up steps, cosine "
                f"decay), on the shipped config's {b['train_seeds']} training phantoms (8 B-scans each, with its per-seed "
                f"variations and augmentation); training seeds {seeds} change only the data order and augmentation, "
                f"not the initial weights. Each variant refits its temperature on the {len(b['val_seeds'])} validation "
                f"phantoms; {heldout}. This measures how {b['steps']} steps of each loss move an already converged "
                "network (calibration fine-tuning), not the papers' from-scratch training; the shipped models' "
                "section below is the full-recipe comparison of CE, ACW and SDC."]
    return ["# Loss study (reduced budget)", "",
            f"**Budget (reduced, stated):** {b['steps']} steps of batch {b['batch']} on {b['patch']}x{b['patch']} "
            f"B-scan patches, {b['train_seeds']} training phantoms (8 B-scans each), seeds "
            f"{seeds}; {heldout}. At this budget the "
            "networks are far from converged (Dice well below the shipped models): the tables compare losses early in "
            "training only. The shipped models' section below is the full-recipe comparison of CE, ACW and SDC."]


def write_markdown(res: dict, path: Path, figures: list[str] | None = None, fig_dir: Path | None = None) -> None:
    """docs/RESULTS.md from the gathered study (``res``: ``{"budget", "runs"}``) and the current catalog.

    ``figures``: losses with a reliability diagram in ``fig_dir`` (linked relative to ``path``). A hand-written
    ``## Findings`` section already at the end of ``path`` is carried over unchanged.
    """
    b = res["budget"]
    losses = sorted({r["loss"] for r in res["runs"].values()}, key=_loss_rank)
    lines = _budget_lines(res)
    lines += ["", "Metrics inside `visible` (Dice, IoU, ECE, BECE; HD95 per B-scan), class-wise ECE / pECE / NLL over "
              "the whole B-scan; mean ± sd over training seeds (n = runs per loss). ECE-type values in %.", ""]
    for mode, title in (("raw", "Without temperature scaling"), ("ts", "With post-hoc temperature scaling")):
        lines += [f"## {title}", "",
                  "| loss | n | Dice caps | Dice cort | Dice nucl | IoU mean | HD95 mean (mm) | ECE % | CW-ECE % | BECE % | pECE % | NLL | hidden acc / conf |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for loss in losses:
            runs = [r[mode] for r in res["runs"].values() if r["loss"] == loss]
            iou_mean = [float(np.nanmean([np.nan if v is None else v for v in r["iou"]])) for r in runs]
            hd_mean = [float(np.nanmean([np.nan if v is None else v for v in r["hd95_mm"]])) for r in runs]
            lines.append(
                f"| {loss} | {len(runs)} | {_fmt([r['dice'] for r in runs], idx=0)} | {_fmt([r['dice'] for r in runs], idx=1)} | "
                f"{_fmt([r['dice'] for r in runs], idx=2)} | {_fmt(iou_mean)} | {_fmt(hd_mean)} | "
                f"{_fmt([r['ece'] for r in runs], True)} | {_fmt([r['cw_ece'] for r in runs], True)} | "
                f"{_fmt([r['bece'] for r in runs], True)} | {_fmt([r['pece'] for r in runs], True)} | "
                f"{_fmt([r['nll'] for r in runs])} | {_fmt([r.get('hidden_accuracy') for r in runs])} / "
                f"{_fmt([r.get('hidden_confidence') for r in runs])} |")
        lines.append("")
    lines += _shipped_section()
    lines += ["## The papers' claims beside ours", ""]
    if b.get("mode") == "finetune":
        start = f"`{b['init_from']['id']}`" if b["init_from"].get("id") else "the same"
        lines += [f"The papers train each loss from scratch; here every loss fine-tunes {start} weights for "
                  f"{b['steps']} steps, so only the direction of a change relative to CE is comparable, not its size.",
                  ""]
    ce = [r["raw"] for r in res["runs"].values() if r["loss"] == "ce"]
    for loss, claim in CLAIMS.items():
        runs = [r["raw"] for r in res["runs"].values() if r["loss"] == loss]
        if not runs or not ce:
            lines.append(f"- {claim}. Ours: not run.")
            continue

        def rel(fn) -> str:
            a = np.nanmean([fn(r) for r in runs])
            c = np.nanmean([fn(r) for r in ce])
            return f"{100 * (a - c) / c:+.2f} %" if c and math.isfinite(c) else "–"
        dsc = rel(lambda r: np.nanmean(np.array(r["dice"], dtype=float)))
        iou = rel(lambda r: np.nanmean(np.array(r["iou"], dtype=float)))
        bece = rel(lambda r: np.nan if r["bece"] is None else r["bece"])
        pece = rel(lambda r: np.nan if r["pece"] is None else r["pece"])
        lines.append(f"- {claim}. Ours (relative to CE, mean foreground): DSC {dsc}, IoU {iou}, BECE {bece}, pECE {pece}.")
    if figures:
        seeds = _plot_seeds(res)
        first = min(r["seed"] for r in res["runs"].values())  # old JSON without counts: drawn from the first seed
        shown = sorted({seeds.get(x, first) for x in figures})
        which = f"seed {shown[0]}" if len(shown) == 1 else "smallest seed of each loss"
        rel_dir = Path(os.path.relpath(fig_dir, path.resolve().parent)).as_posix()
        lines += ["", f"Reliability diagrams ({which}, visible voxels of all held-out cases): " +
                  ", ".join(f"[{loss}]({rel_dir}/reliability_{loss}.png)" for loss in figures)]
    lines.append("")
    text = "\n".join(lines) + "\n"
    # the lead's hand-written findings live below the generated tables: keep them
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = ""
    at = old.find("\n## Findings")
    if at >= 0:
        text = text.rstrip("\n") + "\n\n\n" + old[at:].lstrip("\n")
    _atomic_write_text(path, text)


def write_outputs(res: dict, args: argparse.Namespace) -> None:
    """study_losses.json, the reliability diagrams (when the runs carry counts) and the markdown."""
    if not res["runs"]:
        raise SystemExit(f"No result.json under {args.run_dir} matches this budget for losses {args.losses} and "
                         f"seeds {args.seeds}: run the study first, or pass the same --init-from/--steps/--patch/"
                         "--batch/--lr/--eval-n as the runs (see each result.json's 'budget').")
    json_out = Path(args.json_out)
    _atomic_write_text(json_out, json.dumps(res, indent=2))
    fig_dir = Path(args.fig_dir).resolve()
    figures = _plots(res, fig_dir) if any("reliability" in r for r in res["runs"].values()) else []
    write_markdown(res, Path(args.out), figures, fig_dir)
    print(f"wrote {json_out}, {args.out}" + (f" and {len(figures)} diagrams in {fig_dir}" if figures else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--losses", default=",".join(LOSS_ORDER))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--init-from", default=None,
                    help="fine-tune from these weights: a catalog model id (e.g. asoct-lens-ce) or a .safetensors "
                         "path; default: train from scratch")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 400 fine-tuning, 300 scratch)")
    ap.add_argument("--patch", type=int, default=None, help="square patch side (default 192 fine-tuning, 128 scratch)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default 3e-4 fine-tuning, the config's from scratch)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-volumes", type=int, default=None, help="from scratch only: training phantoms 0..N-1 (24)")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out phantoms per set (default 3 fine-tuning, 2 scratch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "study"), help="per-run folders with result.json")
    ap.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
    ap.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "study_losses.json"))
    ap.add_argument("--fig-dir", default=str(ROOT / "docs" / "figures"), help="reliability diagrams")
    ap.add_argument("--markdown-only", action="store_true",
                    help="train nothing: gather the result.json files matching this budget (same options as the runs) "
                         "into --json-out, the diagrams and --out")
    ap.add_argument("--from-json", action="store_true",
                    help="with --markdown-only: rewrite --out from the existing --json-out instead (old behaviour)")
    args = ap.parse_args()
    if args.from_json:
        if not args.markdown_only:
            ap.error("--from-json only goes with --markdown-only")
        res = json.loads(Path(args.json_out).read_text())
        fig_dir = Path(args.fig_dir).resolve()  # link the diagrams drawn earlier, if any
        figures = sorted({r["loss"] for r in res["runs"].values() if (fig_dir / f"reliability_{r['loss']}.png").is_file()},
                         key=_loss_rank)
        write_markdown(res, Path(args.out), figures, fig_dir)
        print(f"wrote {args.out}")
        return 0
    args.losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    unknown = [x for x in args.losses if x not in LOSS_ORDER]
    if unknown:
        ap.error(f"unknown loss(es) {unknown}; choose from {','.join(LOSS_ORDER)}")
    try:
        args.seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")

    from LensSegCalibLib.errors import LensSegCalibError
    from LensSegCalibLib.training import load_config

    base = load_config(CONFIG)
    try:
        resolve_args(args, base)
    except LensSegCalibError as exc:
        ap.error(str(exc))
    budget = study_budget(args, base)
    run_dir = Path(args.run_dir).resolve()
    if not args.markdown_only:
        run(args, base, budget, run_dir)
    res, missing = gather(run_dir, args.losses, args.seeds, budget)
    if missing:
        print(f"[study] not (yet) done with this budget, left out of the tables: {', '.join(missing)}", flush=True)
    write_outputs(res, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
