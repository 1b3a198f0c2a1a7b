"""Bad input, faults and "nothing lost" (issue 6), through the Python API and the ``lenssegcalib`` CLI.

Every row of the inputs table in ``docs/RELIABILITY.md`` has a test here (or in ``test_fuzz.py`` for the
reader fuzzing, ``test_big_volume.py`` for memory, ``slicer/test_slicer_reliability.py`` for the module).
The models are tiny random UNets written to a temporary catalog (seeded: same weights every run), so the
real ``Segmenter`` / CLI code runs in well under a second per call. The CLI is called in-process through
``cli.main`` (same code path as the console script) except where a separate process is the point: a file-size
limit that simulates a full disk, and two runs racing for one output folder.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import resource
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from LensSegCalibLib import Cancelled, CatalogError, ChecksumError, InputError, ModelError, OutputError, cli
from LensSegCalibLib.inference import Segmenter
from LensSegCalibLib.io import (
    Geometry,
    atomic_path,
    read_image,
    read_segmentation,
    sha256_array,
    sha256_file,
    write_segmentation,
    write_volume,
)
from tiny_models import ASOCT_CLASSES, tiny_entry, unet, write_catalog

PACKAGE = Path(__file__).resolve().parents[1] / "LensSegCalib" / "LensSegCalibLib"
SPACING = (0.5, 0.02, 0.03)  # array order (sz, sy, sx), mm; the 2D model's own grid: no resampling
SHAPE = (3, 40, 48)
CLASSES = ASOCT_CLASSES
CT_CLASSES = [
    {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
    {"value": 1, "key": "right_lens", "name": "Right lens", "color": [255, 0, 0]},
    {"value": 2, "key": "left_lens", "name": "Left lens", "color": [0, 255, 0]},
]
NET2D = unet(2, 4)
NET3D = unet(3, 3)


def _entry(folder: Path, model_id: str, net: dict, classes: list, **input_: Any) -> dict:
    return tiny_entry(folder, model_id, net=net, classes=classes, description="random weights, tests only",
                      input={"spacing_mm": list(SPACING), "dims": 2, "mode": "slicewise2d", "patch_size": [32, 32],
                             "normalization": {"kind": "percentile"}, **input_})


def make_catalog(folder: Path, *, asoct_name: str | None = None) -> Path:
    """catalog.json with ``tiny2d`` (AS-OCT, slicewise2d) and ``tiny3d`` (CT, sliding3d, reorients)."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = [dict(c) for c in CLASSES]
    if asoct_name is not None:
        classes[1]["name"] = asoct_name
    e2 = _entry(folder, "tiny2d", NET2D, classes)
    e3 = _entry(folder, "tiny3d", NET3D, CT_CLASSES, spacing_mm=[1.0, 1.0, 1.0], dims=3,
                mode="sliding3d", patch_size=[16, 16, 16], normalization={"kind": "hu_window"})
    e3["modality"], e3["task"] = "CT", "ct-lens"
    return write_catalog(folder, [e2, e3])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="module")
def seg2d(catalog: Path) -> Segmenter:
    return Segmenter.from_catalog("tiny2d", "cpu", catalog=catalog)


@pytest.fixture(scope="module")
def seg3d(catalog: Path) -> Segmenter:
    return Segmenter.from_catalog("tiny3d", "cpu", catalog=catalog)


def _volume(seed: int = 0, shape: tuple = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    lens = ((i - shape[2] / 2) / (shape[2] / 3.5)) ** 2 + ((j - shape[1] / 2) / (shape[1] / 4.5)) ** 2 < 1
    return (200 + 800 * lens + rng.normal(0, 40, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good NRRD, good NIfTI and a zoo of bad files, written once."""
    d = tmp_path_factory.mktemp("inputs")
    geo = Geometry(SPACING, (1.0, 2.0, 3.0))
    img = _volume()
    out = {"good": write_volume(d / "good.nrrd", img, geo), "good_nii": write_volume(d / "good2.nii.gz", img, geo)}
    raw = out["good"].read_bytes()
    nii = out["good_nii"].read_bytes()
    (d / "truncated_gz.nii.gz").write_bytes(nii[: len(nii) // 2])
    out["truncated_gz"] = d / "truncated_gz.nii.gz"
    plain = write_volume(d / "plain.nii", img, geo, compress=False).read_bytes()
    (d / "truncated_nii.nii").write_bytes(plain[: len(plain) - 100])  # ITK would zero-fill the missing end
    out["truncated_nii"] = d / "truncated_nii.nii"
    for name, data in {
        "truncated_nrrd": raw[: len(raw) // 2],
        "corrupt_header": raw.replace(b"sizes:", b"sizez:", 1),
        "not_an_image": b"patient notes, not an image\n" * 3,
        "empty_file": b"",
    }.items():
        (d / f"{name}.nrrd").write_bytes(data)
        out[name] = d / f"{name}.nrrd"
    import SimpleITK as sitk

    rgb = sitk.GetImageFromArray(np.zeros((3, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(d / "rgb.nrrd"))
    out["rgb"] = d / "rgb.nrrd"
    four = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 8, 8), np.float32))] * 2)
    sitk.WriteImage(four, str(d / "four_d.nrrd"))
    out["four_d"] = d / "four_d.nrrd"
    two = sitk.GetImageFromArray(img[0])
    two.SetSpacing(SPACING[:0:-1])
    sitk.WriteImage(two, str(d / "bscan2d.nrrd"))
    out["two_d"] = d / "bscan2d.nrrd"
    bad_spacing = sitk.GetImageFromArray(img)
    sitk.WriteImage(bad_spacing, str(d / "zero_spacing.nrrd"))
    text = (d / "zero_spacing.nrrd").read_bytes().replace(b"space directions: (1,0,0) (0,1,0) (0,0,1)",
                                                          b"space directions: (0,0,0) (0,1,0) (0,0,1)")
    (d / "zero_spacing.nrrd").write_bytes(text)
    out["zero_spacing"] = d / "zero_spacing.nrrd"
    labels = (img > 600).astype(np.uint8)
    labels[:, :, :20] *= 2
    out["ref_ok"] = write_segmentation(d / "ref_ok.seg.nrrd", labels, geo, CLASSES)
    out["ref_grid"] = write_segmentation(d / "ref_grid.seg.nrrd", labels, Geometry((0.5, 0.04, 0.03), geo.origin),
                                         CLASSES)
    renamed = [dict(c) for c in CLASSES]
    renamed[1].update(key="lesion", name="Lesion")
    out["ref_names"] = write_segmentation(d / "ref_names.seg.nrrd", labels, geo, renamed)
    out["ref_values"] = write_volume(d / "ref_values.nrrd", labels * 7, geo)  # plain label map, values 0/7/14
    return out


def _hashes(paths: dict[str, Path]) -> dict[str, str]:
    return {k: sha256_file(p) for k, p in paths.items()}


def _summary(folder: Path, name: str = "summary.csv") -> list[dict[str, str]]:
    with open(folder / name, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _segment(catalog: Path, out: Path, *inputs: Any, extra: tuple = ()) -> int:
    return cli.main(["segment", *map(str, inputs), "--model", "tiny2d", "--catalog", str(catalog), "--out",
                     str(out), "--device", "cpu", "--quiet", *extra])


def _case_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "summary.csv")


# ============================================================================================ Python API
BAD_ARRAYS = [
    ("empty volume", np.zeros((0, 40, 48), np.float32), SPACING, r"empty"),
    ("1D array", np.zeros(48, np.float32), (0.03,), r"\(48,\) \(1D\).*3D volume"),
    ("4D volume", np.zeros((2, 3, 8, 8), np.float32), SPACING, r"4D.*scalar volume"),
    ("RGB volume (Z, Y, X, 3)", np.zeros((3, 8, 8, 3), np.uint8), SPACING, r"Vector/RGB"),
    ("complex voxels", np.zeros(SHAPE, np.complex64), SPACING, r"complex64.*real-valued"),
    ("text voxels", np.array([["a", "b"]]), (1.0, 1.0), r"real-valued"),
    ("all voxels NaN", np.full(SHAPE, np.nan, np.float32), SPACING, r"no finite voxel"),
    ("zero spacing", np.ones(SHAPE, np.float32), (0.0, 0.02, 0.03), r"finite positive values in mm"),
    ("negative spacing", np.ones(SHAPE, np.float32), (-0.5, 0.02, 0.03), r"finite positive"),
    ("NaN spacing", np.ones(SHAPE, np.float32), (float("nan"), 0.02, 0.03), r"finite positive"),
    ("Inf spacing", np.ones(SHAPE, np.float32), (0.5, float("inf"), 0.03), r"finite positive"),
    ("spacing missing", np.ones(SHAPE, np.float32), None, r"spacing is required"),
    ("text spacing", np.ones(SHAPE, np.float32), ("a", "b", "c"), r"spacing must be numbers in mm"),
    ("scalar spacing", np.ones(SHAPE, np.float32), 0.5, r"does not fit a 3D image"),
    ("2 spacings for 3D", np.ones(SHAPE, np.float32), (0.02, 0.03), r"does not fit a 3D image"),
    ("3 spacings for 2D", np.ones(SHAPE[1:], np.float32), SPACING, r"does not fit a 2D image"),
]


@pytest.mark.filterwarnings("ignore:The image has NaN/Inf voxels")  # the all-NaN row warns, then refuses
@pytest.mark.parametrize("array, spacing, pattern", [b[1:] for b in BAD_ARRAYS], ids=[b[0] for b in BAD_ARRAYS])
def test_bad_arrays_raise_input_error_and_leave_the_array_untouched(seg2d, array, spacing, pattern) -> None:
    before = sha256_array(array)
    with pytest.raises(InputError, match=pattern):
        seg2d.predict(array, spacing)
    assert sha256_array(array) == before


def test_non_orthonormal_direction_is_refused(seg3d) -> None:
    vol = np.zeros((16, 16, 16), np.float32)
    with pytest.raises(InputError, match="rotation/reflection"):
        seg3d.predict(vol, (1.0, 1.0, 1.0), direction=np.diag([1.0, 2.0, 1.0]))


def test_2d_image_for_a_3d_model_is_refused_and_3d_for_a_2d_model_runs_slice_by_slice(seg2d, seg3d) -> None:
    with pytest.raises(InputError, match="segments 3D volumes but the image is 2D"):
        seg3d.predict(np.zeros((16, 16), np.float32), (1.0, 1.0))
    vol = _volume()
    _assert_valid(seg2d.predict(vol, SPACING), SHAPE, 4)
    one = seg2d.predict(vol[1], SPACING[1:])  # a single 2D B-scan = a one-slice volume (same statistics)
    np.testing.assert_array_equal(one.labels, seg2d.predict(vol[1:2], SPACING).labels[0])
    assert one.labels.shape == SHAPE[1:] and one.probabilities.shape == (4, *SHAPE[1:])


def _assert_valid(pred, shape: tuple, num_classes: int) -> None:
    assert pred.labels.shape == shape and pred.labels.dtype == np.uint8
    assert pred.labels.max() < num_classes
    probs = pred.probabilities.astype(np.float32)
    assert probs.shape == (num_classes, *shape) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=4e-3)  # float16 storage
    for m in (pred.confidence, pred.entropy):
        assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1


def test_nan_and_inf_voxels_warn_and_give_finite_outputs(seg2d) -> None:
    vol = _volume()
    bad = vol.copy()
    bad[0, :5, :5] = np.nan
    bad[1, 10, 10] = np.inf
    bad[2, 0, 0] = -np.inf
    before = sha256_array(bad)
    with pytest.warns(RuntimeWarning, match="NaN/Inf voxels"):
        pred = seg2d.predict(bad, SPACING)
    assert sha256_array(bad) == before
    _assert_valid(pred, SHAPE, 4)


def test_constant_volume_gives_valid_outputs(seg2d) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero or NaN warnings either
        pred = seg2d.predict(np.full(SHAPE, 7.0, np.float32), SPACING)
    _assert_valid(pred, SHAPE, 4)
    # every slice sees the same normalised input, so every slice gets the same labels
    assert all(np.array_equal(pred.labels[0], pred.labels[k]) for k in range(1, SHAPE[0]))


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64, np.uint16, np.int32, bool])
def test_integer_and_float64_voxels_give_the_same_labels_as_float32(seg2d, dtype) -> None:
    vol = np.clip(np.rint(_volume() / 8), 0, 255)  # whole numbers that every dtype above holds exactly
    if dtype is bool:
        vol = (vol > 60).astype(np.float32)
    typed = vol.astype(dtype)
    typed.setflags(write=False)  # a read-only input (e.g. a memory-mapped file) must work too
    ref = seg2d.predict(vol.astype(np.float32), SPACING)
    pred = seg2d.predict(typed, SPACING)
    np.testing.assert_array_equal(pred.labels, ref.labels)
    np.testing.assert_array_equal(pred.confidence, ref.confidence)


def test_torch_tensor_input_is_accepted_and_not_modified(seg2d) -> None:
    vol = _volume()
    tensor = torch.from_numpy(vol.copy())
    pred = seg2d.predict(tensor, SPACING)
    np.testing.assert_array_equal(pred.labels, seg2d.predict(vol, SPACING).labels)
    assert torch.equal(tensor, torch.from_numpy(vol))


def test_oblique_direction_maps_outputs_back_to_the_input_grid(seg3d) -> None:
    """A CT volume stored flipped along x with a matching direction is the same anatomy: same labels."""
    vol = np.random.default_rng(3).normal(0, 150, (16, 16, 16)).astype(np.float32)
    plain = seg3d.predict(vol, (1.0, 1.0, 1.0), direction=np.eye(3))
    flipped = np.ascontiguousarray(vol[:, :, ::-1])
    direction = np.diag([-1.0, 1.0, 1.0])  # column i = LPS direction of the i axis: now -x
    before = sha256_array(flipped)
    pred = seg3d.predict(flipped, (1.0, 1.0, 1.0), direction=direction)
    assert sha256_array(flipped) == before
    np.testing.assert_array_equal(pred.labels, plain.labels[:, :, ::-1])
    # an oblique (30 degree) direction runs and keeps the input's array grid
    a = np.deg2rad(30)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    _assert_valid(seg3d.predict(vol[:, :12], (1.0, 1.0, 1.0), direction=rot), (16, 12, 16), 3)


def test_io_image_input_uses_its_geometry(seg2d, files) -> None:
    image = read_image(files["good"])
    pred = seg2d.predict(image)
    assert pred.spacing == pytest.approx(SPACING)
    np.testing.assert_array_equal(pred.labels, seg2d.predict(image.array, SPACING).labels)


# ------------------------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("model, stage", [("2d", "preparing"), ("2d", "segmenting slices"), ("2d", "heat maps"),
                                          ("3d", "segmenting patches"), ("3d", "resampling to the input grid")])
def test_cancel_during_each_stage_raises_cancelled(seg2d, seg3d, model, stage) -> None:
    segmenter, vol, sp = (seg2d, _volume(), SPACING) if model == "2d" else (
        seg3d, np.zeros((20, 20, 20), np.float32), (0.8, 0.8, 0.8))  # 0.8 mm: the 3D path resamples back
    cancel = threading.Event()
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if message == stage:
            cancel.set()

    with pytest.raises(Cancelled, match="cancelled"):
        segmenter.predict(vol, sp, progress=progress, cancel=cancel)
    assert stage in seen and "done" not in seen
    # the stop comes within one batch/slab: at most the next stage's first message is reported
    later = seen[seen.index(stage):]
    assert len(set(later)) <= 2, later


def test_cancel_inside_segment_case_writes_nothing(seg2d, files, tmp_path) -> None:
    cancel = threading.Event()
    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        cli.segment_case(files["good"], seg2d, out, cancel=cancel,
                         progress=lambda f, m: cancel.set() if m == "segmenting slices" else None)
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_in_the_cli_keeps_finished_cases_and_exits_130(catalog, files, tmp_path, monkeypatch, capsys) -> None:
    real = cli.segment_case
    calls = []

    def interrupt_second(*args: Any, **kwargs: Any) -> dict:
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "segment_case", interrupt_second)
    out = tmp_path / "out"
    assert _segment(catalog, out, files["good"], files["good_nii"]) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    assert [r["status"] for r in _summary(out)] == ["done"]
    assert "good_report.json" in _case_files(out) and not any("good2" in n for n in _case_files(out))


# ============================================================================================ models
def test_unknown_model_id_lists_the_known_ones(catalog, files, tmp_path, capsys) -> None:
    with pytest.raises(ModelError, match=r"Unknown model id 'nope'. Known models: tiny2d, tiny3d"):
        Segmenter.from_catalog("nope", "cpu", catalog=catalog)
    rc = cli.main(["segment", str(files["good"]), "--model", "nope", "--catalog", str(catalog), "--out",
                   str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Known models: tiny2d, tiny3d" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["flip one byte", "truncate", "delete"])
def test_tampered_or_missing_weights_are_refused(catalog, tmp_path, damage, capsys) -> None:
    folder = tmp_path / "cat"
    folder.mkdir()
    for f in catalog.parent.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "tiny2d.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip one byte":
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
        error, pattern = ChecksumError, "fails its checksum: expected sha256 .*it was not loaded"
    elif damage == "truncate":
        weights.write_bytes(bytes(data[:-10]))
        error, pattern = ChecksumError, "truncated or replaced.*it was not loaded"
    else:
        weights.unlink()
        error, pattern = ModelError, "not found.*Reinstall LensSegCalib, or retrain"
    with pytest.raises(error, match=pattern):
        Segmenter.from_catalog("tiny2d", "cpu", catalog=folder / "catalog.json")
    rc = cli.main(["segment", "x.nrrd", "--model", "tiny2d", "--catalog", str(folder / "catalog.json"), "--out",
                   str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(pattern, err) and "Traceback" not in err


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["models"][0].pop("weights"), "$.models[0]"),
    (lambda d: d["models"][0]["weights"].update(sha256="xyz"), "$.models[0].weights.sha256"),
    (lambda d: d.update(catalog_version=2), "$.catalog_version"),
])
def test_catalog_failing_its_schema_names_the_field(catalog, tmp_path, capsys, mutate, where) -> None:
    data = json.loads(catalog.read_text(encoding="utf-8"))
    mutate(data)
    bad = tmp_path / "catalog.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CatalogError, match=re.escape(where)):
        Segmenter.from_catalog("tiny2d", "cpu", catalog=bad)
    assert cli.main(["models", "--catalog", str(bad)]) == 2
    err = capsys.readouterr().err
    assert where in err and "catalog.schema.json" in err and "Traceback" not in err


def test_cli_shows_a_traceback_only_with_debug(catalog, tmp_path, capsys) -> None:
    bad = tmp_path / "catalog.json"
    bad.write_text("{not json", encoding="utf-8")
    assert cli.main(["models", "--catalog", str(bad)]) == 2
    plain = capsys.readouterr().err
    assert "not valid JSON" in plain and "Traceback" not in plain
    assert cli.main(["models", "--debug", "--catalog", str(bad)]) == 2
    assert "Traceback" in capsys.readouterr().err


# ============================================================================================ files
def test_batch_goes_on_past_bad_files_and_lists_them_in_summary(catalog, files, tmp_path, capsys) -> None:
    bad = ["truncated_nrrd", "truncated_gz", "truncated_nii", "corrupt_header", "not_an_image", "empty_file", "rgb",
           "four_d", "zero_spacing"]
    not_dicom = tmp_path / "not_dicom"  # a folder is read as a DICOM series
    not_dicom.mkdir()
    (not_dicom / "notes.txt").write_text("no DICOM here")
    inputs = [files["good"], *(files[k] for k in bad), tmp_path / "missing.nrrd", not_dicom, files["two_d"]]
    before = _hashes({k: files[k] for k in ["good", *bad, "two_d"]})
    out = tmp_path / "out"
    assert _segment(catalog, out, *inputs) == 1  # 1 = some inputs failed
    rows = {r["case"]: r for r in _summary(out)}
    assert [r["status"] for r in _summary(out)] == ["done"] + ["failed"] * 11 + ["done"]
    expected = {
        "truncated_nrrd": "expected 23040 bytes but received",
        "truncated_gz": "is truncated",
        "truncated_nii": "is truncated",
        "corrupt_header": "failed to parse",
        "not_an_image": "Unable to determine ImageIO reader",
        "empty_file": "Cannot read",
        "rgb": "3 components per voxel (vector or RGB image)",
        "four_d": "is a 4D image",
        "zero_spacing": "spacing",
        "missing": "Input not found",
        "not_dicom": "No DICOM series in folder",
    }
    for case, text in expected.items():
        assert text in rows[case]["message"], (case, rows[case]["message"])
        assert not any(n.startswith(case) for n in _case_files(out)), case
    assert rows["bscan2d"]["status"] == "done"  # a single 2D B-scan is a valid input for a 2D model
    assert _hashes({k: files[k] for k in ["good", *bad, "two_d"]}) == before  # inputs never modified
    assert not [n for n in os.listdir(out) if ".partial" in n]
    assert "11 failed" in capsys.readouterr().err


def test_no_overwrite_without_flag_and_overwrite_with_it(catalog, files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert _segment(catalog, out, files["good"]) == 0
    first = {n: sha256_file(out / n) for n in _case_files(out)}
    report = json.loads((out / "good_report.json").read_text(encoding="utf-8"))
    assert report["meta"]["input"]["sha256"] == sha256_file(files["good"])
    assert _segment(catalog, out, files["good"]) == 0
    assert _summary(out)[0]["status"] == "skipped"
    assert {n: sha256_file(out / n) for n in _case_files(out)} == first
    # one stray output (e.g. the user's own file with that name) blocks the case instead of being replaced
    (out / "good_report.json").unlink()
    assert _segment(catalog, out, files["good"]) == 1
    assert "already exist" in _summary(out)[0]["message"]
    assert {n: sha256_file(out / n) for n in _case_files(out)} == {k: v for k, v in first.items()
                                                                     if k != "good_report.json"}
    assert _segment(catalog, out, files["good"], extra=("--overwrite",)) == 0
    assert _summary(out)[0]["status"] == "done" and (out / "good_report.json").is_file()


def test_output_folder_that_cannot_be_created_is_a_clear_error(catalog, files, tmp_path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _segment(catalog, blocker / "out", files["good"]) == 2
    err = capsys.readouterr().err
    assert "Cannot create output folder" in err and "choose a folder you can write to" in err
    assert "Traceback" not in err and blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_folder_is_a_clear_error(catalog, files, tmp_path, capsys) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert _segment(catalog, out, files["good"]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        out.chmod(0o755)


def test_atomic_write_on_a_full_disk_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "report.json"
    with pytest.raises(OutputError, match="the disk is full. Nothing was left half-written"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes beyond ``limit`` bytes per file fail with EFBIG, as on a full disk (soft limit; restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_full_disk_in_a_real_run_leaves_no_half_written_file(catalog, files, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with _file_size_limit(12_000):
        code = _segment(catalog, out, files["good"])
    assert code == 1
    row = _summary(out)[0]
    assert row["status"] == "failed" and "Could not write" in row["message"]
    assert not [n for n in os.listdir(out) if ".partial" in n]  # no temporary left behind
    for name in _case_files(out):  # whatever exists is complete and readable
        read_image(out / name) if name.endswith(".nrrd") else json.loads((out / name).read_text())


def test_a_case_that_fails_half_way_leaves_none_of_its_files_and_reruns_cleanly(catalog, files, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with _file_size_limit(12_000):  # the segmentation fits, the confidence map does not
        assert _segment(catalog, out, files["good"]) == 1
    assert _case_files(out) == []  # all or nothing per case
    assert _segment(catalog, out, files["good"]) == 0  # the plain rerun the CLI suggests works
    assert _summary(out)[0]["status"] == "done"


def test_ctrl_c_while_writing_leaves_none_of_the_cases_files(catalog, files, tmp_path, monkeypatch) -> None:
    from LensSegCalibLib import report as report_module

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module.CalibrationReport, "to_html", interrupted)
    out = tmp_path / "out"
    assert _segment(catalog, out, files["good"]) == 130
    assert _case_files(out) == [] and not [n for n in os.listdir(out) if ".partial" in n]



def test_a_failed_overwrite_leaves_no_mix_of_old_and_new_files(catalog, files, tmp_path, monkeypatch) -> None:
    from LensSegCalibLib import report as report_module

    out = tmp_path / "out"
    assert _segment(catalog, out, files["good"]) == 0
    assert len(_case_files(out)) >= 6

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the new segmentation, confidence and CSV are written, the HTML fails
        m.setattr(report_module.CalibrationReport, "to_html", broken)
        assert _segment(catalog, out, files["good"], extra=("--overwrite",)) == 1
    assert _case_files(out) == []  # neither the new files nor the old HTML/JSON: the case is absent
    assert _segment(catalog, out, files["good"]) == 0  # so the plain rerun (no --overwrite) works
    assert _summary(out)[0]["status"] == "done"


def test_two_runs_writing_to_one_folder_never_mix_files(catalog, files, tmp_path) -> None:
    """Two runs started at the same moment on the same input and folder (threads: the race is per file)."""
    out = tmp_path / "out"
    start = threading.Barrier(2)
    codes: list[int] = []

    def run() -> None:
        start.wait()
        codes.append(_segment(catalog, out, files["good"]))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(codes) in ([0, 0], [0, 1]), codes  # both done/skipped, or one lost the race cleanly
    assert not [n for n in os.listdir(out) if ".partial" in n]
    report = json.loads((out / "good_report.json").read_text(encoding="utf-8"))
    assert report["meta"]["input"]["sha256"] == sha256_file(files["good"])
    assert read_image(out / "good_confidence.nrrd").array.shape == SHAPE
    assert _summary(out)[0]["status"] in ("done", "skipped", "failed")


def test_atomic_path_lets_only_the_first_of_two_racing_writers_win(tmp_path) -> None:
    target = tmp_path / "case_report.json"
    with pytest.raises(OutputError, match="created by another run while this one was writing"):
        with atomic_path(target) as slow_tmp:  # run A starts writing ...
            slow_tmp.write_text("run A")
            with atomic_path(target) as fast_tmp:  # ... run B starts later and finishes first
                fast_tmp.write_text("run B")
    assert target.read_text() == "run B"  # A's late result did not replace B's
    assert [p.name for p in tmp_path.iterdir()] == ["case_report.json"]  # and A's temporary is gone


@pytest.mark.parametrize("model", ["tiny2d", "tiny3d"])
def test_oblique_file_gives_outputs_on_its_exact_geometry(catalog, tmp_path, model) -> None:
    a = np.deg2rad(30)
    rot = np.array([[np.cos(a), 0, -np.sin(a)], [0, -1, 0], [np.sin(a), 0, np.cos(a)]])  # rotated + reflected
    spacing = SPACING if model == "tiny2d" else (1.0, 1.2, 0.9)
    geometry = Geometry(spacing, (-12.5, 40.0, 7.25), tuple(rot.ravel()))
    vol = _volume(shape=(3, 40, 48) if model == "tiny2d" else (12, 18, 20))
    src = write_volume(tmp_path / "oblique.nrrd", vol, geometry)
    before = sha256_file(src)
    out = tmp_path / "out"
    assert cli.main(["segment", str(src), "--model", model, "--catalog", str(catalog), "--out", str(out),
                     "--device", "cpu", "--quiet"]) == 0
    for name in ("oblique_confidence.nrrd", "oblique_boundary.nrrd"):
        image = read_image(out / name)
        assert image.array.shape == vol.shape
        np.testing.assert_allclose(image.geometry.spacing, spacing, rtol=1e-6)
        np.testing.assert_allclose(image.geometry.origin, geometry.origin, atol=1e-6)
        np.testing.assert_allclose(image.geometry.direction, geometry.direction, atol=1e-6)
    labels, seg_geometry, _ = read_segmentation(out / "oblique.seg.nrrd")
    assert labels.shape == vol.shape
    np.testing.assert_allclose(seg_geometry.ijk_to_lps(), geometry.ijk_to_lps(), atol=1e-6)
    assert sha256_file(src) == before


# ----------------------------------------------------------------------------------------- references
def test_reference_on_the_same_grid_adds_measured_numbers(catalog, files, tmp_path) -> None:
    out = tmp_path / "out"
    assert _segment(catalog, out, files["good"], extra=("--reference", str(files["ref_ok"]))) == 0
    report = json.loads((out / "good_report.json").read_text(encoding="utf-8"))
    assert report["meta"]["reference"]["used"] is True
    assert all(0 <= s["dice"] <= 1 for s in report["segments"])


@pytest.mark.parametrize("ref, message", [
    ("ref_grid", "lies on another grid (spacing (0.5, 0.04, 0.03) vs (0.5, 0.02, 0.03) mm"),
    ("ref_names", "has segments the model does not know: Lesion"),
    ("ref_values", "holds label values 0..14 but model 'tiny2d' has 4 classes"),
    ("not_an_image", "Cannot read"),
])
def test_bad_reference_fails_that_case_with_the_fix(catalog, files, tmp_path, ref, message) -> None:
    out = tmp_path / "out"
    before = sha256_file(files[ref])
    assert _segment(catalog, out, files["good"], extra=("--reference", str(files[ref]))) == 1
    row = _summary(out)[0]
    assert row["status"] == "failed" and message in row["message"]
    assert _case_files(out) == [] and sha256_file(files[ref]) == before


def test_reference_count_must_match_inputs(catalog, files, tmp_path, capsys) -> None:
    assert _segment(catalog, tmp_path / "o", files["good"], files["good_nii"],
                    extra=("--reference", str(files["ref_ok"]))) == 2
    assert "give one reference per input" in capsys.readouterr().err


# ============================================================================================ security
def _sources() -> dict[Path, str]:
    root = PACKAGE.parent
    paths = list(PACKAGE.rglob("*.py")) + [root / "LensSegCalib.py"]
    return {p: p.read_text(encoding="utf-8") for p in paths if p.is_file()}


def test_no_pickle_no_shell_no_network_in_the_code() -> None:
    offenders = []
    for path, text in _sources().items():
        for pattern in (r"\bimport pickle\b", r"\bfrom pickle\b", r"\bcPickle\b", r"\bdill\b", r"shell\s*=\s*True",
                        r"\bos\.system\(", r"\burllib\b", r"\brequests\b", r"\bhttp\.client\b", r"\bsocket\b",
                        r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            for m in re.finditer(pattern, text):
                offenders.append(f"{path.name}: {m.group(0)}")
    assert offenders == []


def test_segmentation_runs_with_the_network_switched_off(catalog, files, tmp_path, monkeypatch) -> None:
    import socket

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert _segment(catalog, tmp_path / "out", files["good"]) == 0


def test_html_report_escapes_user_controlled_names(tmp_path, files) -> None:
    evil = "<script>alert(1)</script>"
    catalog = make_catalog(tmp_path / "cat", asoct_name=evil)
    out = tmp_path / "out"
    name = '<img src=x onerror=alert(2)>'
    src = tmp_path / f"{name}.nrrd"
    src.write_bytes(files["good"].read_bytes())
    assert _segment(catalog, out, src) == 0
    html = (out / f"{name}_report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    # self-contained: no script at all, nothing fetched from the network when the report is opened
    assert "<script" not in html.lower() and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)


def test_torch_load_is_only_used_with_weights_only() -> None:
    offenders = [f"{path.name}: torch.load({m.group(1)})" for path, text in _sources().items()
                 for m in re.finditer(r"torch\.load\(([^)]*)\)", text) if "weights_only=True" not in m.group(1)]
    assert offenders == []


def test_outputs_never_replace_an_input_file(catalog, files, tmp_path, capsys) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    scan = folder / "scan.nrrd"
    clash = folder / "scan_confidence.nrrd"  # an input whose name is another input's output name
    scan.write_bytes(files["good"].read_bytes())
    clash.write_bytes(files["good"].read_bytes())
    before = {p.name: sha256_file(p) for p in (scan, clash)}
    assert _segment(catalog, folder, clash, scan, extra=("--overwrite",)) == 2
    err = capsys.readouterr().err
    assert "would replace the input" in err and "Traceback" not in err
    assert {p.name: sha256_file(p) for p in (scan, clash)} == before
    assert sorted(p.name for p in folder.iterdir()) == ["scan.nrrd", "scan_confidence.nrrd"]
