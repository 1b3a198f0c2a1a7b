"""Determinism (issue 6): the same input, model and device (CPU) give identical labels, maps and report numbers
-- within one process, across two loads of the model, across CPU thread counts, and in a fresh process.

Only the provenance fields that must change between runs (creation time, stage timings) may differ.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from LensSegCalibLib import cli
from LensSegCalibLib.inference import Prediction, Segmenter
from LensSegCalibLib.io import Geometry, read_image, read_segmentation, write_segmentation, write_volume
from tiny_models import ASOCT_CLASSES, tiny_entry, unet, write_catalog
from LensSegCalibLib.report import calibration_report

SPACING = (0.5, 0.02, 0.03)
CLASSES = ASOCT_CLASSES
# Fields that record *when* and *how long*, not *what*: allowed to differ between runs.
VOLATILE = {"created", "seconds"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D (slicewise, resampling in-plane) and a 3D (sliding window, Gaussian blending) tiny model."""
    folder = tmp_path_factory.mktemp("det-catalog")
    entries = [
        tiny_entry(folder, model_id, net=unet(dims, len(classes), res_units=1), classes=classes, seed=1,
                   temperature=1.7, input={"spacing_mm": spacing, "dims": dims, "mode": mode, "patch_size": patch,
                                           "overlap": 0.5, "normalization": {"kind": "percentile"}})
        for model_id, dims, mode, patch, spacing, classes in (
            ("det2d", 2, "slicewise2d", [32, 32], [0.5, 0.025, 0.025], CLASSES),
            ("det3d", 3, "sliding3d", [16, 16, 16], [0.5, 0.04, 0.04], CLASSES[:3]),
        )
    ]
    return write_catalog(folder, entries)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(5)
    k, j, i = np.meshgrid(np.arange(4), np.arange(44), np.arange(52), indexing="ij")
    lens = ((i - 26) / 15.0) ** 2 + ((j - 22) / 9.0) ** 2 < 1
    return (300 + 600 * lens + rng.normal(0, 60, lens.shape)).astype(np.int16)


@pytest.fixture(scope="module")
def reference(volume: np.ndarray) -> np.ndarray:
    return (volume > 600).astype(np.uint8) * np.where(np.arange(52) < 26, 1, 2)[None, None, :].astype(np.uint8)


def _assert_same_prediction(a: Prediction, b: Prediction) -> None:
    for name in ("labels", "probabilities", "confidence", "entropy", "boundary"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)  # NaN == NaN here (outside the boundary band)


def _stable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the fields that record when / how long."""
    if isinstance(report, dict):
        return {k: _stable(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [_stable(v) for v in report]
    return report


@pytest.mark.parametrize("model_id", ["det2d", "det3d"])
def test_same_input_gives_identical_outputs_and_report_numbers(catalog, volume, reference, model_id) -> None:
    first = Segmenter.from_catalog(model_id, "cpu", catalog=catalog)
    second = Segmenter.from_catalog(model_id, "cpu", catalog=catalog)  # a fresh load of the same weights
    a = first.predict(volume, SPACING)
    b = first.predict(volume, SPACING)
    c = second.predict(volume, SPACING)
    _assert_same_prediction(a, b)
    _assert_same_prediction(a, c)
    ref = np.minimum(reference, a.num_classes - 1)
    ra = calibration_report(a, reference=ref, image=volume, case="x").to_dict()
    rc = calibration_report(c, reference=ref, image=volume, case="x").to_dict()
    assert _stable(ra) == _stable(rc)
    assert ra["summary"]["ece"] is not None and ra["segments"][0]["dice"] is not None  # real numbers compared


def test_cpu_thread_count_does_not_change_the_labels(catalog, volume) -> None:
    seg = Segmenter.from_catalog("det3d", "cpu", catalog=catalog)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = seg.predict(volume, SPACING)
        torch.set_num_threads(2)
        two = seg.predict(volume, SPACING)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one.labels, two.labels)
    np.testing.assert_allclose(one.confidence, two.confidence, rtol=0, atol=1e-6)


def test_a_fresh_process_writes_the_same_labels_maps_and_report(catalog, volume, reference, tmp_path) -> None:
    geometry = Geometry(SPACING, (4.0, -3.0, 2.5))
    image = write_volume(tmp_path / "case.nrrd", volume, geometry)
    ref = write_segmentation(tmp_path / "ref.seg.nrrd", reference, geometry, CLASSES)
    args = ["segment", str(image), "--reference", str(ref), "--model", "det2d", "--catalog", str(catalog),
            "--device", "cpu", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "here")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "LensSegCalib"))
    done = subprocess.run([sys.executable, "-m", "LensSegCalibLib.cli", *args, "--out", str(tmp_path / "there")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    here, there = tmp_path / "here", tmp_path / "there"
    np.testing.assert_array_equal(read_segmentation(here / "case.seg.nrrd")[0],
                                  read_segmentation(there / "case.seg.nrrd")[0])
    for name in ("case_confidence.nrrd", "case_boundary.nrrd"):
        np.testing.assert_array_equal(read_image(here / name).array, read_image(there / name).array)
    a = json.loads((here / "case_report.json").read_text(encoding="utf-8"))
    b = json.loads((there / "case_report.json").read_text(encoding="utf-8"))
    assert _stable(a) == _stable(b)
    assert (here / "case_report.csv").read_text() == (there / "case_report.csv").read_text()


@pytest.mark.parametrize("model_id", ["asoct-lens-acw", "ct-lens-acw"])
def test_shipped_models_are_deterministic_on_cpu(model_id) -> None:
    """The shipped weights (real network sizes) on a small input: two loads, two runs, identical outputs."""
    rng = np.random.default_rng(11)
    if model_id.startswith("ct"):
        vol = (rng.normal(0, 40, (12, 40, 120)) - 100).astype(np.int16)  # one sliding-window patch on the model grid
        spacing = (1.5, 0.9, 0.9)
    else:
        vol = rng.normal(100, 30, (1, 200, 200)).astype(np.float32)  # one B-scan near the model's patch size
        spacing = (1.0, 0.01625, 0.02)
    a = Segmenter.from_catalog(model_id, "cpu").predict(vol, spacing)
    b = Segmenter.from_catalog(model_id, "cpu").predict(vol, spacing)
    _assert_same_prediction(a, b)
