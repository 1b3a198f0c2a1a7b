"""End-to-end ``lenssegcalib`` on small inputs with tiny test models: every output reloaded (geometry with
non-identity spacing/origin/oblique direction, segment names/colours/terminology, value ranges, report numbers
= metrics on the reloaded arrays), rerun skip / --overwrite, --shard, a failing input in a batch, exit codes."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_inference import make_catalog  # tiny random-weight models in a temporary catalog
from tiny_models import ASOCT_CLASSES

from LensSegCalibLib import metrics as M
from LensSegCalibLib.cli import main, parse_shard, select_shard
from LensSegCalibLib.errors import InputError
from LensSegCalibLib.io import Geometry, read_image, read_segmentation, write_segmentation, write_volume

_C, _S = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
OBLIQUE = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)  # rotated 20 degrees about z
GEOMETRY = Geometry((0.9, 0.11, 0.13), (-7.5, 3.25, 12.0), OBLIQUE)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return make_catalog(tmp_path_factory.mktemp("cli_models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, catalog) -> dict[str, Path]:
    """Three inputs (NRRD, NIfTI, NRRD), a reference for the first, a corrupt file, and a misplaced reference."""
    from LensSegCalibLib.phantom import asoct_volume

    d = tmp_path_factory.mktemp("cli_data")
    ph = asoct_volume(3, shape=(3, 64, 64))
    classes = json.loads(catalog.read_text())["models"][0]["classes"]
    write_volume(d / "eye_a.nrrd", ph.image, GEOMETRY)
    write_segmentation(d / "eye_a_ref.seg.nrrd", ph.labels, GEOMETRY, classes)
    rng = np.random.default_rng(1)
    write_volume(d / "eye_b.nii.gz", (rng.random((2, 48, 56)) * 255).astype(np.uint8),
                 Geometry((1.2, 0.1, 0.1), (1.0, 2.0, 3.0)))
    write_volume(d / "eye_c.nrrd", rng.random((2, 40, 40)).astype(np.float32), Geometry((1.0, 0.12, 0.12)))
    (d / "broken.nrrd").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 9 9 9\nencoding: raw\n\nxx")
    shifted = Geometry(GEOMETRY.spacing, (0.0, 0.0, 0.0), OBLIQUE)
    write_segmentation(d / "eye_a_shifted.seg.nrrd", ph.labels, shifted, classes)
    return {"a": d / "eye_a.nrrd", "ref": d / "eye_a_ref.seg.nrrd", "b": d / "eye_b.nii.gz",
            "c": d / "eye_c.nrrd", "broken": d / "broken.nrrd", "shifted": d / "eye_a_shifted.seg.nrrd",
            "labels": ph.labels, "image": ph.image}


def _run(args: list[str], catalog: Path) -> int:
    return main(["segment", *args, "--catalog", str(catalog), "--quiet"])


def _summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_segment_with_reference_writes_every_output_with_the_input_geometry(tmp_path, catalog, data):
    out = tmp_path / "out"
    code = _run([str(data["a"]), "--model", "tiny-asoct", "--out", str(out), "--reference", str(data["ref"]),
                 "--device", "cpu"], catalog)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["eye_a.seg.nrrd", "eye_a_boundary.nrrd", "eye_a_confidence.nrrd", "eye_a_report.csv",
                     "eye_a_report.html", "eye_a_report.json", "summary.csv"]
    labels, seg_geo, segments = read_segmentation(out / "eye_a.seg.nrrd")
    assert labels.shape == (3, 64, 64)
    for geo in (seg_geo, read_image(out / "eye_a_confidence.nrrd").geometry,
                read_image(out / "eye_a_boundary.nrrd").geometry):
        np.testing.assert_allclose(geo.spacing, GEOMETRY.spacing, rtol=1e-6)
        np.testing.assert_allclose(geo.origin, GEOMETRY.origin, atol=1e-6)
        np.testing.assert_allclose(geo.direction, GEOMETRY.direction, atol=1e-6)
    assert [(s["id"], s["name"], s["labelValue"]) for s in segments] == [
        ("capsule", "Lens capsule", 1), ("cortex", "Lens cortex", 2), ("nucleus", "Lens nucleus", 3)]
    np.testing.assert_allclose(segments[0]["color"], np.array(ASOCT_CLASSES[1]["color"]) / 255, atol=1e-4)
    assert "Lens capsule" in str(segments[0].get("terminology", ""))
    conf = read_image(out / "eye_a_confidence.nrrd").array
    boundary = read_image(out / "eye_a_boundary.nrrd").array
    assert conf.dtype == np.float32 and conf.min() >= 0.25 - 1e-6 and conf.max() <= 1.0  # 4 classes: max p >= 1/4
    assert np.isfinite(boundary).all() and boundary.min() >= 0 and boundary.max() <= 1
    assert (boundary > 0).any() and (boundary == 0).any()  # band only
    report = json.loads((out / "eye_a_report.json").read_text())
    assert report["meta"]["model"]["id"] == "tiny-asoct" and len(report["meta"]["input"]["sha256"]) == 64
    assert report["meta"]["model"]["mirror_tta"] is False
    ref = data["labels"][None].astype(np.int64)
    seg_m = M.segmentation_metrics(labels[None].astype(np.int64), ref, 4, spacing=GEOMETRY.spacing)
    for seg in report["segments"]:
        c = seg["value"]
        assert seg["voxels"] == int((labels == c).sum())
        if seg["voxels"]:
            assert seg["mean_confidence"] == pytest.approx(conf[labels == c].mean(dtype=np.float64), abs=1e-6)
        assert seg["dice"] == pytest.approx(seg_m.dice[0, c], abs=1e-12)
        hd = seg_m.hd95[0, c]
        assert seg["hd95_mm"] == ("inf" if np.isinf(hd) else pytest.approx(hd, abs=1e-9))
    rows = _summary(out / "summary.csv")
    assert rows[0]["status"] == "done" and rows[0]["case"] == "eye_a"
    assert float(rows[0]["capsule_dice"]) == pytest.approx(report["segments"][0]["dice"])


def test_rerun_skips_finished_inputs_and_overwrite_redoes_them(tmp_path, catalog, data, capsys):
    out = tmp_path / "out"
    args = [str(data["c"]), "--model", "tiny-asoct", "--out", str(out)]
    assert _run(args, catalog) == 0
    report = out / "eye_c_report.json"
    old = report.stat().st_mtime_ns - 10**9
    os.utime(report, ns=(old, old))
    assert _run(args, catalog) == 0
    assert "skipped" in capsys.readouterr().err
    assert report.stat().st_mtime_ns == old  # untouched
    assert [r["status"] for r in _summary(out / "summary.csv")] == ["skipped"]
    assert _summary(out / "summary.csv")[0]["capsule_volume_ml"] != ""  # numbers come from the finished report
    assert _run(args + ["--overwrite"], catalog) == 0
    assert report.stat().st_mtime_ns > old
    assert [r["status"] for r in _summary(out / "summary.csv")] == ["done"]


def test_a_failing_input_is_reported_and_the_batch_goes_on(tmp_path, catalog, data, capsys):
    out = tmp_path / "out"
    code = _run([str(data["broken"]), str(data["c"]), "--model", "tiny-asoct", "--out", str(out)], catalog)
    assert code == 1
    err = capsys.readouterr().err
    assert "broken: FAILED" in err and "Traceback" not in err
    rows = {r["case"]: r for r in _summary(out / "summary.csv")}
    assert rows["broken"]["status"] == "failed" and "Cannot read" in rows["broken"]["message"]
    assert rows["eye_c"]["status"] == "done" and (out / "eye_c.seg.nrrd").is_file()
    assert not any(p.name.startswith("broken") for p in out.iterdir())  # nothing half-written


def test_reference_on_another_grid_fails_that_input_clearly(tmp_path, catalog, data):
    out = tmp_path / "out"
    code = _run([str(data["a"]), "--model", "tiny-asoct", "--out", str(out), "--reference", str(data["shifted"])],
                catalog)
    assert code == 1
    row = _summary(out / "summary.csv")[0]
    assert row["status"] == "failed" and "another grid" in row["message"]


def test_shards_split_the_batch(tmp_path, catalog, data):
    out = tmp_path / "out"
    inputs = [str(data["a"]), str(data["b"]), str(data["c"])]
    assert _run(inputs + ["--model", "tiny-asoct", "--out", str(out), "--shard", "1/2"], catalog) == 0
    assert sorted(p.name for p in out.glob("*_report.json")) == ["eye_b_report.json"]
    assert _run(inputs + ["--model", "tiny-asoct", "--out", str(out), "--shard", "0/2"], catalog) == 0
    assert sorted(p.name for p in out.glob("*_report.json")) == ["eye_a_report.json", "eye_b_report.json",
                                                                  "eye_c_report.json"]
    assert [r["case"] for r in _summary(out / "summary_shard0of2.csv")] == ["eye_a", "eye_c"]
    assert [r["case"] for r in _summary(out / "summary_shard1of2.csv")] == ["eye_b"]


def test_shard_parsing():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    assert select_shard(["a", "b", "c", "d", "e"], (1, 2)) == [1, 3]
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(InputError, match="shard"):
            parse_shard(bad)


def test_errors_exit_2_with_message_and_traceback_only_with_debug(tmp_path, catalog, data, capsys):
    args = [str(data["c"]), "--model", "no-such-model", "--out", str(tmp_path / "o")]
    assert _run(args, catalog) == 2
    err = capsys.readouterr().err
    assert "Unknown model id 'no-such-model'" in err and "tiny-asoct" in err and "Traceback" not in err
    assert _run(args + ["--debug"], catalog) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "segment", *args, "--catalog", str(catalog), "--quiet"]) == 2  # before the command
    assert "Traceback" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run([str(data["c"]), "--model", "tiny-asoct", "--out", str(blocker / "sub")], catalog) == 2
    assert "Cannot create output folder" in capsys.readouterr().err
    assert _run([str(data["c"]), str(data["b"]), "--model", "tiny-asoct", "--out", str(tmp_path / "o"),
                 "--reference", str(data["ref"])], catalog) == 2
    assert "one reference per input" in capsys.readouterr().err


def test_models_lists_the_catalog(catalog, capsys):
    assert main(["models", "--catalog", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert "tiny-asoct" in out and "tiny-ct" in out and "Lens nucleus" in out


def test_demo_writes_all_outputs_and_a_preview(tmp_path, catalog, monkeypatch):
    from LensSegCalibLib import cli

    monkeypatch.setattr(cli, "DEMO_SHAPE", (4, 96, 120))  # the full-size demo is timed by `make demo`, not here
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", "tiny-asoct", "--catalog", str(catalog), "--quiet"]) == 0
    for name in ("sample_asoct.nrrd", "sample_asoct_reference.seg.nrrd", "sample_asoct.seg.nrrd",
                 "sample_asoct_confidence.nrrd", "sample_asoct_boundary.nrrd", "sample_asoct_report.json",
                 "sample_asoct_report.csv", "sample_asoct_report.html", "sample_asoct_preview.png", "summary.csv"):
        assert (out / name).is_file(), name
    assert (out / "sample_asoct_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "sample_asoct_report.json").read_text())
    assert report["meta"]["reference"]["used"] is True and report["summary"]["ece"] is not None


def test_tta_on_a_model_without_mirror_symmetry_is_refused_before_any_output(tmp_path, catalog, data, capsys):
    out = tmp_path / "out"
    code = _run([str(data["a"]), "--model", "tiny-asoct", "--out", str(out), "--tta", "--device", "cpu"], catalog)
    assert code != 0
    assert "tta_flip_axes" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_phantom_writes_image_and_segments_for_slicer(tmp_path, capsys):
    assert main(["phantom", "--task", "asoct", "--seed", "2", "--out", str(tmp_path), "--shape", "2", "48", "48"]) == 0
    printed = capsys.readouterr().out
    image = read_image(tmp_path / "asoct_2.nrrd")
    labels, geo, segments = read_segmentation(tmp_path / "asoct_2.seg.nrrd")
    assert image.array.shape == labels.shape == (2, 48, 48) and "segmentation" in printed
    np.testing.assert_allclose(geo.spacing, image.geometry.spacing, rtol=1e-6)
    assert {s["name"] for s in segments} >= {"Lens nucleus"}
    assert main(["phantom", "--task", "asoct", "--seed", "2", "--out", str(tmp_path), "--shape", "2", "48", "48"]) == 2
    assert "already exists" in capsys.readouterr().err  # never overwritten silently


def test_a_failure_while_writing_leaves_no_partial_case(tmp_path, catalog, data, monkeypatch):
    from LensSegCalibLib import report_html

    out = tmp_path / "out"

    def broken(report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_html, "render_html", broken)
    assert _run([str(data["c"]), "--model", "tiny-asoct", "--out", str(out)], catalog) == 1
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # seg/confidence/boundary/csv removed again
    assert "No space left" in _summary(out / "summary.csv")[0]["message"]


def test_cancel_in_segment_case_writes_nothing(tmp_path, catalog, data):
    import threading

    from LensSegCalibLib.cli import segment_case
    from LensSegCalibLib.errors import Cancelled
    from LensSegCalibLib.inference import Segmenter

    seg = Segmenter.from_catalog("tiny-asoct", device="cpu", catalog=catalog)
    event = threading.Event()

    def progress(fraction, message):
        if fraction >= 1.0:
            event.set()  # cancel after inference: the report/writing stages must notice it

    with pytest.raises(Cancelled):
        segment_case(data["c"], seg, tmp_path / "out", progress=progress, cancel=event)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_outputs_never_replace_inputs_even_with_overwrite(tmp_path, catalog, data):
    folder = tmp_path / "in"
    folder.mkdir()
    scan = folder / "scan.nrrd"
    victim = folder / "scan_confidence.nrrd"  # another input, named like the first input's output
    scan.write_bytes(data["c"].read_bytes())
    victim.write_bytes(data["c"].read_bytes())
    before = victim.read_bytes()
    code = _run([str(scan), str(victim), "--model", "tiny-asoct", "--out", str(folder), "--overwrite"], catalog)
    assert code == 2 and victim.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["scan.nrrd", "scan_confidence.nrrd"]
