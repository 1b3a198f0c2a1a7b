"""benchmarks/study_losses.py without training: gathering result.json files, the markdown, the skip rule.

The script is imported by path. Result files are fabricated in the format ``run()`` writes (its budget from the
script's own ``resolve_args``/``study_budget``, metrics through the library's ``_mean_rows``), so a change of the
format on either side shows here. Everything is written under ``tmp_path``; the live study (runs/study/),
docs/RESULTS.md, benchmarks/results/ and docs/figures/ are never touched (every output path is passed).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "study_losses.py"

#: per (loss, seed): the per-run means of the raw (T = 1) metrics; acw-s1 is written with another budget and
#: its extreme values must never reach the tables. Pairs differ by an even last digit: no rounding ties below.
RAW = {
    ("ce", 0): {"dice": [0.80, 0.90, 0.95], "iou": [0.70, 0.82, 0.90], "hd95_mm": [0.30, 0.20, 0.10],
                "ece": 0.0100, "cw_ece": 0.0120, "bece": 0.1200, "pece": 0.2600, "nll": 0.090,
                "hidden_accuracy": 0.600, "hidden_confidence": 0.780},
    ("ce", 1): {"dice": [0.84, 0.92, 0.97], "iou": [0.74, 0.86, 0.94], "hd95_mm": [0.50, 0.40, 0.30],
                "ece": 0.0140, "cw_ece": 0.0160, "bece": 0.1600, "pece": 0.3000, "nll": 0.110,
                "hidden_accuracy": 0.640, "hidden_confidence": 0.820},
    ("acw", 0): {"dice": [0.86, 0.94, 0.96], "iou": [0.76, 0.88, 0.92], "hd95_mm": [0.20, 0.20, 0.20],
                 "ece": 0.0080, "cw_ece": 0.0100, "bece": 0.1000, "pece": 0.2000, "nll": 0.080,
                 "hidden_accuracy": 0.700, "hidden_confidence": 0.700},
    ("acw", 1): {"dice": [0.10, 0.10, 0.10], "iou": [0.10, 0.10, 0.10], "hd95_mm": [9.0, 9.0, 9.0],
                 "ece": 0.5000, "cw_ece": 0.5000, "bece": 0.5000, "pece": 0.5000, "nll": 5.000,
                 "hidden_accuracy": 0.100, "hidden_confidence": 0.100},
}
CALIBRATION_KEYS = ("ece", "cw_ece", "bece", "pece", "nll")
COLUMNS = ["loss", "n", "dice caps", "dice cort", "dice nucl", "iou mean", "hd95 mean", "ece", "cw_ece", "bece",
           "pece", "nll", "hidden acc / conf"]


def ts_means(raw: dict) -> dict:
    """The temperature-scaled means of a run: calibration halved, the rest as raw (the tables must not mix them)."""
    return {k: (v / 2 if k in CALIBRATION_KEYS else v) for k, v in raw.items()}


@pytest.fixture(scope="module")
def study() -> ModuleType:
    """benchmarks/study_losses.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("study_losses_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def init_file(tmp_path: Path) -> Path:
    """Stand-in init weights: resolve_init only hashes a .safetensors path (the runs never load it here)."""
    p = tmp_path / "init.safetensors"
    p.write_bytes(b"stand-in weights: hashed, never loaded")
    return p


def make_budget(study: ModuleType, init: Path) -> dict:
    """The fine-tuning budget the CLI computes for ``--init-from init`` and otherwise default options."""
    from LensSegCalibLib.training import load_config

    # the CLI's defaults: None = resolved from the mode, batch 8
    args = argparse.Namespace(init_from=str(init), train_volumes=None, patch=None, steps=None, lr=None,
                              eval_n=None, batch=8)
    base = load_config(study.CONFIG)
    study.resolve_args(args, base)
    return study.study_budget(args, base)


def case_rows(means: dict) -> list[dict]:
    """Two per-case rows whose mean is ``means`` (each value -/+ 0.01), as evaluate_prediction would give."""
    def shift(v, d):
        return [x + d for x in v] if isinstance(v, list) else v + d
    return [{k: shift(v, -0.01) for k, v in means.items()}, {k: shift(v, 0.01) for k, v in means.items()}]


def make_result(study: ModuleType, loss: str, seed: int, budget: dict) -> dict:
    """A result.json as run() writes it: budget, metrics per mode (via _mean_rows), reliability counts."""
    from LensSegCalibLib.training.evaluate import _mean_rows

    raw = RAW[(loss, seed)]
    n = study.N_BINS
    count = [0.0] * (n - 3) + [50.0, 150.0, 800.0]
    centres = [(i + 0.5) / n for i in range(n)]
    rel = {"count": count, "conf": [c * x for c, x in zip(count, centres)],
           "hit": [c * min(1.0, x + 0.02) for c, x in zip(count, centres)]}
    return {"loss": loss, "seed": seed, "budget": copy.deepcopy(budget), "temperature": 1.1, "seconds": 12.0,
            "train_seconds": 10.0, "seconds_per_step": round(10.0 / budget["steps"], 3),
            "final_validation": {"epoch": budget["epochs"], "step": budget["steps"], "mean_dice": 0.8},
            "raw": _mean_rows(case_rows(raw)), "ts": _mean_rows(case_rows(ts_means(raw))),
            "reliability": {"raw": rel, "ts": copy.deepcopy(rel)}}


def write_runs(study: ModuleType, run_dir: Path, budget: dict) -> dict[str, dict]:
    """ce-s0, ce-s1, acw-s0 with ``budget``; acw-s1 with 200 steps (another budget). Returns tag -> result."""
    other = dict(budget, steps=200, warmup=20)
    out = {}
    for (loss, seed) in RAW:
        res = make_result(study, loss, seed, other if (loss, seed) == ("acw", 1) else budget)
        path = run_dir / f"{loss}-s{seed}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(res, indent=2), encoding="utf-8")
        out[f"{loss}-s{seed}"] = res
    return out


def fmt(vals: list[float], pct: bool = False) -> str:
    """mean ± population sd as the tables print it (% with 2 decimals, else 3)."""
    v = [100 * x for x in vals] if pct else list(vals)
    m, sd = statistics.fmean(v), statistics.pstdev(v)
    return f"{m:.2f} ± {sd:.2f}" if pct else f"{m:.3f} ± {sd:.3f}"


def expected_row(loss: str, runs: list[dict]) -> list[str]:
    """The table cells for ``loss`` from the fabricated per-run means (computed here, not by the script)."""
    return [loss, str(len(runs)),
            *(fmt([r["dice"][i] for r in runs]) for i in range(3)),
            fmt([statistics.fmean(r["iou"]) for r in runs]), fmt([statistics.fmean(r["hd95_mm"]) for r in runs]),
            *(fmt([r[k] for r in runs], pct=True) for k in ("ece", "cw_ece", "bece", "pece")),
            fmt([r["nll"] for r in runs]),
            f"{fmt([r['hidden_accuracy'] for r in runs])} / {fmt([r['hidden_confidence'] for r in runs])}"]


def table_rows(md: str, title: str) -> dict[str, list[str]]:
    """loss -> cells of the table under ``## title`` (up to the next section)."""
    lines = md.splitlines()
    start = lines.index(f"## {title}")
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| loss") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


# ----------------------------------------------------------------------------------------------------------
# 1. gathering
# ----------------------------------------------------------------------------------------------------------
def test_gather_keeps_matching_runs_and_reports_the_rest(study, init_file, tmp_path):
    budget = make_budget(study, init_file)
    written = write_runs(study, tmp_path / "runs", budget)
    res, missing = study.gather(tmp_path / "runs", ["ce", "acw", "sdc"], [0, 1], budget)
    assert res["budget"] == budget
    assert res["runs"] == {t: written[t] for t in ("ce-s0", "ce-s1", "acw-s0")}
    assert missing == ["acw-s1 (other budget)", "sdc-s0", "sdc-s1"]
    # only the requested losses and seeds are gathered, even when other result.json files match
    res, missing = study.gather(tmp_path / "runs", ["ce"], [1], budget)
    assert list(res["runs"]) == ["ce-s1"] and missing == []


# ----------------------------------------------------------------------------------------------------------
# 2. --markdown-only end to end: JSON, diagrams, markdown (title, budget, mean ± sd rows, Findings kept)
# ----------------------------------------------------------------------------------------------------------
def test_markdown_only_writes_tables_from_matching_runs_and_keeps_findings(study, init_file, tmp_path,
                                                                           monkeypatch, capsys):
    budget = make_budget(study, init_file)
    write_runs(study, tmp_path / "runs", budget)
    out, json_out, fig_dir = tmp_path / "docs" / "RESULTS.md", tmp_path / "study.json", tmp_path / "figs"
    findings = ("## Findings\n\nHand-written: ACW moves ECE *down* by 0.2 points.\n\n"
                "- kept byte for byte, | pipes | and ± too  \n\n")  # trailing spaces + blank line too
    out.parent.mkdir()
    out.write_text("# Loss study (stale generated text)\n\nOLD TABLE 0.999\n\n\n" + findings, encoding="utf-8")
    monkeypatch.setattr(sys, "argv", [
        str(SCRIPT), "--init-from", str(init_file), "--losses", "ce,acw,sdc", "--seeds", "0,1",
        "--run-dir", str(tmp_path / "runs"), "--out", str(out), "--json-out", str(json_out),
        "--fig-dir", str(fig_dir), "--markdown-only"])
    assert study.main() == 0
    printed = capsys.readouterr().out
    assert "left out of the tables: acw-s1 (other budget), sdc-s0, sdc-s1" in printed

    gathered = json.loads(json_out.read_text(encoding="utf-8"))
    assert sorted(gathered["runs"]) == ["acw-s0", "ce-s0", "ce-s1"]
    assert gathered["budget"] == json.loads(json.dumps(budget))
    for loss in ("ce", "acw"):  # one diagram per gathered loss, none for sdc
        assert (fig_dir / f"reliability_{loss}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in fig_dir.iterdir()) == ["reliability_acw.png", "reliability_ce.png"]

    md = out.read_text(encoding="utf-8")
    # title and the stated fine-tuning budget, naming the init weights by their sha256 (hashed here)
    assert md.startswith("# Loss study (fine-tuning from shared weights)\n")
    sha = hashlib.sha256(init_file.read_bytes()).hexdigest()
    assert (budget["steps"], budget["patch"], budget["lr"], budget["eval_n"]) == (400, 192, 3e-4, 3)  # documented
    assert ("every loss starts from the same converged network, "
            f"`init.safetensors` (sha256 `{sha[:12]}`), and is fine-tuned with its own loss for 400 steps of "
            "batch 8 on 192x192 B-scan patches at LR 0.0003") in md
    assert "training seeds [0, 1] change only the data order" in md
    assert "held-out: 3 standard + 3 hard AS-OCT phantoms" in md
    # one row per gathered loss, mean ± sd over its matching seeds (acw-s1's values must not enter)
    for title, means in (("Without temperature scaling", RAW),
                         ("With post-hoc temperature scaling", {k: ts_means(v) for k, v in RAW.items()})):
        rows = table_rows(md, title)
        assert sorted(rows) == ["acw", "ce"], rows
        for loss, seeds in (("ce", (0, 1)), ("acw", (0,))):
            expected = expected_row(loss, [means[(loss, s)] for s in seeds])
            assert dict(zip(COLUMNS, rows[loss])) == dict(zip(COLUMNS, expected)), (title, loss)
    raw_ce = dict(zip(COLUMNS, table_rows(md, "Without temperature scaling")["ce"]))
    assert (raw_ce["dice caps"], raw_ce["ece"], raw_ce["nll"]) == ("0.820 ± 0.020", "1.20 ± 0.20", "0.100 ± 0.010")
    ts_acw = dict(zip(COLUMNS, table_rows(md, "With post-hoc temperature scaling")["acw"]))
    assert (ts_acw["n"], ts_acw["ece"]) == ("1", "0.40 ± 0.00")
    assert "[ce](../figs/reliability_ce.png)" in md and "[acw](../figs/reliability_acw.png)" in md
    # the hand-written Findings carried over unchanged at the end; the stale generated text replaced
    assert md.endswith("\n\n\n" + findings)
    assert md.count("## Findings") == 1
    assert "OLD TABLE" not in md and "stale generated" not in md


# ----------------------------------------------------------------------------------------------------------
# 3. the skip rule (shared by run() and gather())
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"steps": 200}, {"lr": 1e-4}, {"patch": 256}, {"batch": 4}, {"eval_n": 2}, {"recipe_sha": "0" * 12},
    {"mode": "scratch"}, {"init_sha256": "f" * 64}, {"init_from": None}])
def test_changed_budget_is_not_done(study, init_file, change):
    budget = make_budget(study, init_file)
    old = copy.deepcopy(budget)
    if "init_sha256" in change:
        old["init_from"]["sha256"] = change["init_sha256"]
    else:
        old.update(change)
    assert old != budget
    assert not study._budget_matches({"budget": old}, budget)


def test_matching_budget_is_done_wherever_the_init_file_lies(study, init_file, tmp_path):
    budget = make_budget(study, init_file)
    path = tmp_path / "ce-s0" / "result.json"
    path.parent.mkdir()
    path.write_text(json.dumps(make_result(study, "ce", 0, budget)), encoding="utf-8")
    assert study._budget_matches(study._read_result(path), budget)
    moved = copy.deepcopy(budget)
    moved["init_from"]["path"] = "/elsewhere/same-bytes.safetensors"  # same sha256: the same start
    assert study._budget_matches({"budget": moved}, budget)
    assert not study._budget_matches(None, budget)  # no result.json
    assert not study._budget_matches({"loss": "ce"}, budget)  # a result without a budget
    path.write_text('{"budget": ', encoding="utf-8")  # half-written / corrupt: redone, not crashed
    assert not study._budget_matches(study._read_result(path), budget)


class WouldTrain(Exception):
    """Raised by the patched training entry points: run() decided to (re)train."""


def test_run_skips_done_runs_and_reruns_a_changed_budget(study, init_file, tmp_path, monkeypatch, capsys):
    import LensSegCalibLib.training as training

    from LensSegCalibLib.training import load_config

    def refuse(*_a, **_k):
        raise WouldTrain

    monkeypatch.setattr(training, "train_from_config", refuse)
    monkeypatch.setattr(study, "_eval_phantoms", refuse)
    budget = make_budget(study, init_file)
    run_dir = tmp_path / "runs"
    write_runs(study, run_dir, budget)
    args = argparse.Namespace(losses=["ce"], seeds=[0, 1], threads=1)
    base = load_config(study.CONFIG)
    study.run(args, base, budget, run_dir)  # both ce runs match: nothing trains
    printed = capsys.readouterr().out
    assert printed.count("done already") == 2 and "ce-s0: done already" in printed and "ce-s1: done already" in printed
    args.losses = ["acw"]  # acw-s0 matches, acw-s1 has another budget: retrained
    with pytest.raises(WouldTrain):
        study.run(args, base, budget, run_dir)
    printed = capsys.readouterr().out
    assert "acw-s0: done already" in printed and "acw-s1: " in printed and "from another budget; rerunning" in printed
