"""Loss study: the same AS-OCT recipe trained with CE, ACW, SDC, NACL, SVLS, RRW and CALF; held-out metrics.

Every variant uses the shipped AS-OCT config (network, data, augmentation, schedule) and changes only the loss
and the seed; the budget is reduced (``--steps``, smaller patches) so the study fits a shared 2-core machine —
the numbers are therefore a *reduced-budget* study, stated as such in docs/RESULTS.md. Held-out phantoms:
seeds >= 10000 (``--eval-n`` per set, "standard" and "hard"), scored with the shipped inference path
(``training.evaluate``) with and without the fitted temperature. Writes ``benchmarks/results/study_losses.json``,
reliability diagrams ``docs/figures/reliability_<loss>.png`` and ``docs/RESULTS.md``.

    python benchmarks/study_losses.py --losses ce,acw,sdc,nacl,svls,rrw,calf --seeds 0,1,2 --steps 300
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LensSegCalib"))

CONFIG = ROOT / "LensSegCalib/LensSegCalibLib/training/configs/asoct-lens-ce.json"
CLAIMS = {
    "acw": "ACW vs CE (U-Net, paper): IoU +6.13 %, DSC +4.33 %, BECE -4.79 %",
    "sdc": "SDC vs CE (paper): Dice +0.8 %, pECE -32 %",
}


def _loss_params(name: str, cfg: dict) -> dict:
    if name == "calf":  # CALF picks its transform from the training set's foreground sizes (once)
        from LensSegCalibLib.training.trainer import _volumes

        vols = _volumes(cfg, "train", rank=0)
        return {"foreground_sizes": [float((np.asarray(v.labels) > 0).sum()) for v in vols]}
    if name == "nacl":
        return {"num_classes": len(cfg["classes"])}
    return {}


def _extra_metrics(probs: np.ndarray, ref: np.ndarray, vis: np.ndarray) -> dict:
    """IoU (visible), class-wise ECE, pECE and NLL per B-scan (whole image), averaged over B-scans."""
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


def run(args: argparse.Namespace) -> dict:
    import torch

    from LensSegCalibLib.inference import Segmenter
    from LensSegCalibLib.metrics import reliability
    from LensSegCalibLib.models import build_network, spec_from_dict
    from LensSegCalibLib.phantom import asoct_volume
    from LensSegCalibLib.training import load_config, train_from_config
    from LensSegCalibLib.training.evaluate import _mean_rows, _temper, evaluate_prediction
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    base = load_config(CONFIG)
    results: dict = {"budget": {"steps": args.steps, "patch": args.patch, "batch": args.batch,
                                "train_seeds": args.train_volumes, "eval_n": args.eval_n}, "runs": {}}
    eval_cases = [(s, {}) for s in range(10000, 10000 + args.eval_n)] + \
                 [(s, {"split": "heldout"}) for s in range(10100, 10100 + args.eval_n)]
    phantoms = [asoct_volume(s, shape=(2, 800, 800), **v) for s, v in eval_cases]
    rel_store: dict = {}
    for loss in args.losses:
        for seed in args.seeds:
            tag = f"{loss}-s{seed}"
            t0 = time.perf_counter()
            ov = {"model_id": f"study-{tag}", "seed": seed,
                  "loss": {"name": loss, "params": _loss_params(loss, base)},
                  "input": {"patch_size": [args.patch, args.patch]},
                  "data": {"train_seeds": {"start": 0, "stop": args.train_volumes}, "val_seeds": [5000]},
                  "optim": {"epochs": 2, "steps_per_epoch": args.steps // 2, "batch_size": args.batch,
                            "warmup_steps": max(1, args.steps // 10), "threads": args.threads},
                  "output": {"dir": f"runs/study/{tag}"}}
            wpath = train_from_config(CONFIG, overrides=ov, progress=False, device="cpu")
            entry = json.loads((wpath.parent / "catalog_entry.json").read_text())
            spec = spec_from_dict(entry, wpath.parent)
            net = build_network(spec.network)
            net.load_state_dict(load_file(str(wpath)))
            seg = Segmenter(net.eval(), spec, device="cpu", apply_temperature=False)
            raw_rows, ts_rows = [], []
            for ph in phantoms:
                pr = seg.predict(ph.image, ph.spacing, probabilities_dtype=np.float32).probabilities
                for rows, probs in ((raw_rows, pr), (ts_rows, _temper(pr, spec.temperature))):
                    r = evaluate_prediction(probs, ph.labels, ph.visible, ph.spacing, slicewise=True)
                    r.update(_extra_metrics(probs, ph.labels, ph.visible))
                    rows.append(r)
                    if seed == args.seeds[0]:
                        rel = reliability(torch.from_numpy(probs[None]), torch.from_numpy(ph.labels[None].astype(np.int64)),
                                          n_bins=15, mask=torch.from_numpy(ph.visible[None]))
                        key = (loss, rows is ts_rows)
                        acc = rel_store.setdefault(key, {"count": np.zeros(15), "conf": np.zeros(15), "hit": np.zeros(15)})
                        cnt = np.nan_to_num(np.asarray(rel.count, dtype=float))
                        acc["count"] += cnt
                        acc["conf"] += cnt * np.nan_to_num(np.asarray(rel.mean_confidence, dtype=float))
                        acc["hit"] += cnt * np.nan_to_num(np.asarray(rel.accuracy, dtype=float))
            results["runs"][tag] = {"loss": loss, "seed": seed, "temperature": spec.temperature,
                                    "seconds": round(time.perf_counter() - t0, 1),
                                    "raw": _mean_rows(raw_rows), "ts": _mean_rows(ts_rows)}
            print(f"[study] {tag}: dice {results['runs'][tag]['raw']['dice']} ece {results['runs'][tag]['raw']['ece']} "
                  f"({results['runs'][tag]['seconds']} s)", flush=True)
    _plots(rel_store, ROOT / "docs" / "figures")
    return results


def _plots(store: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for loss in sorted({k[0] for k in store}):
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, ts in zip(axes, (False, True)):
            s = store.get((loss, ts))
            if s is None:
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                acc = s["hit"] / s["count"]
                conf = s["conf"] / s["count"]
            centres = (np.arange(15) + 0.5) / 15
            ax.bar(centres, np.nan_to_num(acc), width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
            ax.bar(centres, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=1 / 15, color="r",
                   alpha=0.3, label="gap (conf - acc)")
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_title(f"{loss.upper()} {'+ temperature' if ts else 'raw'} (visible voxels)")
            ax2 = ax.twinx()
            ax2.semilogy(centres, np.maximum(s["count"], 1), "g.-", lw=0.8)
            ax2.set_ylabel("voxels (log)", color="g")
        axes[0].set_ylabel("accuracy")
        axes[0].legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"reliability_{loss}.png", dpi=90)
        plt.close(fig)


def _fmt(vals: list, pct: bool = False, idx: int | None = None) -> str:
    v = [x[idx] if idx is not None else x for x in vals]
    v = np.array([np.nan if x is None else x for x in v], dtype=float)
    if pct:
        v = v * 100
    if np.all(np.isnan(v)):
        return "–"
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if not pct else f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}"


def _shipped_section() -> list[str]:
    """Held-out metrics of the shipped models (full recipe) from the catalog: CE vs ACW vs SDC at 1000 steps."""
    from LensSegCalibLib.errors import CatalogError
    from LensSegCalibLib.models import load_catalog

    out = ["## Shipped models (full recipe, from catalog.json `heldout_metrics`)", "",
           "Same network, data and recipe (steps per model in the table); only the loss differs (AS-OCT). "
           "Held-out: 6 standard + 6 hard "
           "phantoms (seeds 10000-10005, 10100-10105; 4 B-scans at 800 x 800), inside `visible`; hidden = behind "
           "the iris / lost to attenuation. raw = T 1, TS = the model's fitted temperature.", "",
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
        for name, st in hm.get("sets", {}).items():
            r, t = st["raw"], st.get("temperature_scaled", st["raw"])
            steps = int(spec.training.get("epochs", 0)) * int(spec.training.get("steps_per_epoch", 0))
            out.append(f"| {spec.id} | {steps} | {name} ({r['cases']}) | {spec.temperature:.3f} | {f(r['dice'])} | {f(r['dice_lens'])} | "
                       f"{f(r['hd95_mm'])} | {f(r['ece'], True)} / {f(t['ece'], True)} | {f(r['ece_fg'], True)} / "
                       f"{f(t['ece_fg'], True)} | {f(r['bece'], True)} / {f(t['bece'], True)} | "
                       f"{f(r.get('hidden_dice_lens'))} | {f(r.get('hidden_accuracy'))} / {f(r.get('hidden_confidence'))}"
                       f" / {f(t.get('hidden_confidence'))} | {f(r.get('hidden_ece'), True)} / {f(t.get('hidden_ece'), True)} |")
    return out + [""]


def write_markdown(res: dict, path: Path) -> None:
    b = res["budget"]
    losses = sorted({r["loss"] for r in res["runs"].values()}, key=lambda x: "ce acw sdc nacl svls rrw calf".split().index(x))
    lines = ["# Loss study (reduced budget)", "",
             f"**Budget (reduced, stated):** {b['steps']} steps of batch {b['batch']} on {b['patch']}x{b['patch']} "
             f"B-scan patches, {b['train_seeds']} training phantoms (8 B-scans each), seeds "
             f"{sorted({r['seed'] for r in res['runs'].values()})}; held-out: {b['eval_n']} standard + {b['eval_n']} "
             "hard AS-OCT phantoms (seeds >= 10000, 2 B-scans each at the native 800 x 800 grid). At this budget the "
             "networks are far from converged (Dice well below the shipped models): the tables compare losses early in "
             "training only. The shipped models' section below is the full-recipe comparison of CE, ACW and SDC.",
             "", "Metrics inside `visible` (Dice, IoU, ECE, BECE; HD95 per B-scan), class-wise ECE / pECE / NLL over "
             "the whole B-scan; mean ± sd over training seeds. ECE-type values in %.", ""]
    for mode, title in (("raw", "Without temperature scaling"), ("ts", "With post-hoc temperature scaling")):
        lines += [f"## {title}", "",
                  "| loss | Dice caps | Dice cort | Dice nucl | IoU mean | HD95 mean (mm) | ECE % | CW-ECE % | BECE % | pECE % | NLL | hidden acc / conf |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for loss in losses:
            runs = [r[mode] for r in res["runs"].values() if r["loss"] == loss]
            iou_mean = [float(np.nanmean([np.nan if v is None else v for v in r["iou"]])) for r in runs]
            hd_mean = [float(np.nanmean([np.nan if v is None else v for v in r["hd95_mm"]])) for r in runs]
            lines.append(
                f"| {loss} | {_fmt([r['dice'] for r in runs], idx=0)} | {_fmt([r['dice'] for r in runs], idx=1)} | "
                f"{_fmt([r['dice'] for r in runs], idx=2)} | {_fmt(iou_mean)} | {_fmt(hd_mean)} | "
                f"{_fmt([r['ece'] for r in runs], True)} | {_fmt([r['cw_ece'] for r in runs], True)} | "
                f"{_fmt([r['bece'] for r in runs], True)} | {_fmt([r['pece'] for r in runs], True)} | "
                f"{_fmt([r['nll'] for r in runs])} | {_fmt([r.get('hidden_accuracy') for r in runs])} / "
                f"{_fmt([r.get('hidden_confidence') for r in runs])} |")
        lines.append("")
    lines += _shipped_section()
    lines += ["## The papers' claims beside ours", ""]
    ce = [r["raw"] for r in res["runs"].values() if r["loss"] == "ce"]
    for loss, claim in CLAIMS.items():
        runs = [r["raw"] for r in res["runs"].values() if r["loss"] == loss]
        if not runs or not ce:
            lines.append(f"- {claim}. Ours: not run.")
            continue

        def rel(key: str, fn) -> str:
            a = np.nanmean([fn(r) for r in runs])
            c = np.nanmean([fn(r) for r in ce])
            return f"{100 * (a - c) / c:+.2f} %" if c and math.isfinite(c) else "–"
        dsc = rel("dice", lambda r: np.nanmean(r["dice"]))
        iou = rel("iou", lambda r: np.nanmean(r["iou"]))
        bece = rel("bece", lambda r: r["bece"])
        pece = rel("pece", lambda r: r["pece"])
        lines.append(f"- {claim}. Ours (relative to CE, mean foreground): DSC {dsc}, IoU {iou}, BECE {bece}, pECE {pece}.")
    lines += ["", "Reliability diagrams (seed " + str(min(r["seed"] for r in res["runs"].values())) +
              ", visible voxels of all held-out cases): " +
              ", ".join(f"[{loss}](figures/reliability_{loss}.png)" for loss in losses), ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--losses", default="ce,acw,sdc,nacl,svls,rrw,calf")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-volumes", type=int, default=24)
    ap.add_argument("--eval-n", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite RESULTS.md from benchmarks/results/study_losses.json (+ the current catalog)")
    args = ap.parse_args()
    out_json = ROOT / "benchmarks" / "results" / "study_losses.json"
    if args.markdown_only:
        write_markdown(json.loads(out_json.read_text()), Path(args.out))
        print(f"wrote {args.out}")
        return 0
    args.losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    res = run(args)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2))
    write_markdown(res, Path(args.out))
    print(f"wrote {out_json} and {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
