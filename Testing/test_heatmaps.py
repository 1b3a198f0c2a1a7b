"""Heat maps against the METHODS.md section 10 known-answer vectors (case E) and their basic contracts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from LensSegCalibLib import heatmaps
from LensSegCalibLib.errors import InputError
from methods_cases import case

TOL = 2e-6


def case_e() -> tuple[np.ndarray, np.ndarray]:
    """METHODS.md case E as ``(probabilities (2, 12, 12), labels (12, 12))``."""
    logits, labels = case("E")
    return torch.softmax(logits[0], dim=0).numpy(), labels[0].numpy()


def test_case_e_has_the_documented_disk_and_errors():
    probs, label = case_e()
    assert label.sum() == 32
    wrong = np.argwhere(probs.argmax(0) != label)
    assert sorted(map(tuple, wrong)) == [(2, 4), (2, 7), (8, 5), (9, 4), (9, 7)]


def test_signed_boundary_map_matches_methods_10_2_everywhere():
    probs, label = case_e()
    g = heatmaps.boundary_calibration_map(probs, label, (0.5, 0.5), region="everywhere")
    assert g.dtype == np.float32 and g.shape == (12, 12)
    assert abs(float(g.mean(dtype=np.float64)) - (-0.158606)) < TOL
    assert abs(float(g[2, 4]) - (-0.155698)) < TOL
    assert abs(float(g[0, 0]) - (-0.124191)) < TOL


def test_signed_map_in_band_equals_everywhere_map_inside_and_fill_outside():
    probs, label = case_e()
    full = heatmaps.boundary_calibration_map(probs, label, (0.5, 0.5), region="everywhere")
    banded = heatmaps.boundary_calibration_map(probs, label, (0.5, 0.5))  # default band 1.0 mm
    inside = np.isfinite(banded)
    assert inside.sum() == 104  # the BECE band of E at the default band (METHODS.md 2 table)
    np.testing.assert_allclose(banded[inside], full[inside], atol=1e-7)
    zero_fill = heatmaps.boundary_calibration_map(probs, label, (0.5, 0.5), fill=0.0)
    assert np.all(zero_fill[~inside] == 0.0)


def test_signed_map_crop_is_exact_on_a_larger_anisotropic_volume():
    rng = np.random.default_rng(3)
    ref = np.zeros((6, 40, 50), dtype=np.int64)
    ref[2:5, 12:30, 15:35] = 1
    logits = torch.from_numpy(rng.normal(size=(2, 6, 40, 50)) + 3 * np.stack([1 - ref, ref]))
    probs = torch.softmax(logits.float(), dim=0).numpy()
    full = heatmaps.boundary_calibration_map(probs, ref, (1.5, 0.3, 0.4), region="everywhere")
    banded = heatmaps.boundary_calibration_map(probs, ref, (1.5, 0.3, 0.4))
    inside = np.isfinite(banded)
    assert 0 < inside.sum() < ref.size
    np.testing.assert_allclose(banded[inside], full[inside], atol=1e-6)


def test_label_free_map_matches_methods_10_3():
    probs, _ = case_e()
    entropy = heatmaps.normalized_entropy(probs)
    pred = probs.argmax(0)
    b = heatmaps.label_free_boundary_map(pred, entropy, (0.5, 0.5))
    inside = np.isfinite(b)
    assert inside.sum() == 116
    assert abs(float(b[inside].mean(dtype=np.float64)) - 0.670126) < TOL
    b0 = heatmaps.label_free_boundary_map(pred, entropy, (0.5, 0.5), fill=0.0)
    assert np.all(b0[~inside] == 0) and np.array_equal(b0[inside], b[inside])


def test_confidence_and_entropy_definitions():
    probs = np.array([[0.5, 1.0, 0.25], [0.5, 0.0, 0.25], [0.0, 0.0, 0.5]], dtype=np.float32)[:, None, :]
    conf = heatmaps.confidence_map(probs)
    ent = heatmaps.normalized_entropy(probs)
    np.testing.assert_allclose(conf[0], [0.5, 1.0, 0.5])
    # -(0.5 ln 0.5 * 2) / ln 3 ; certain -> 0 ; -(2 * .25 ln .25 + .5 ln .5) / ln 3
    np.testing.assert_allclose(ent[0], [np.log(2) / np.log(3), 0.0, 1.5 * np.log(2) / np.log(3)], atol=1e-6)
    uniform = np.full((4, 3, 3), 0.25, dtype=np.float16)
    np.testing.assert_allclose(heatmaps.normalized_entropy(uniform), 1.0, atol=1e-6)


def test_torch_input_and_inputs_not_modified():
    probs, label = case_e()
    before = probs.copy()
    t = torch.from_numpy(probs)
    np.testing.assert_array_equal(heatmaps.confidence_map(t), heatmaps.confidence_map(probs))
    heatmaps.boundary_calibration_map(probs, label, (0.5, 0.5))
    np.testing.assert_array_equal(probs, before)


def test_no_interface_gives_all_fill():
    probs = np.stack([np.full((5, 5), 0.9), np.full((5, 5), 0.1)]).astype(np.float32)
    labels = np.zeros((5, 5), dtype=np.int64)
    out = heatmaps.label_free_boundary_map(labels, heatmaps.normalized_entropy(probs), (1.0, 1.0))
    assert np.isnan(out).all()


def test_errors_name_the_problem():
    probs, label = case_e()
    with pytest.raises(InputError, match="reference"):
        heatmaps.boundary_calibration_map(probs, label[:6], (0.5, 0.5))
    with pytest.raises(InputError, match="spacing"):
        heatmaps.boundary_calibration_map(probs, label, (0.5, -1.0))
    with pytest.raises(InputError, match="region"):
        heatmaps.boundary_calibration_map(probs, label, (0.5, 0.5), region="inside")  # type: ignore[arg-type]


def test_slabbed_band_equals_the_whole_volume_band(monkeypatch):
    from LensSegCalibLib.metrics import boundary_band

    rng = np.random.default_rng(5)
    labels = np.zeros((23, 20, 18), dtype=np.uint8)
    labels[3:19, 4:15, 5:14] = 1
    labels[8:12, 7:11, 6:10] = 2
    labels[rng.random(labels.shape) < 0.01] = 3  # scattered specks: interfaces near every slab edge
    spacing = (0.7, 0.5, 0.6)
    whole = boundary_band(labels, spacing, 1.3)
    monkeypatch.setattr(heatmaps, "_BAND_SLAB_VOXELS", 20 * 18 * 4)  # 4 rows per slab, halo of 3 rows
    np.testing.assert_array_equal(heatmaps.boundary_band_mask(labels, spacing, 1.3), whole)
