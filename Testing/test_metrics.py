"""Tests of LensSegCalibLib.metrics: METHODS.md known-answer vectors (sections 2, 3, 9), properties, MONAI parity.

Known answers are METHODS.md's 6-decimal values (tolerance 2e-6). Parity with MONAI 1.6.1 is checked to 1e-5
where METHODS.md says it computes the same quantity, including the documented differences (one empty mask:
our HD95 is +inf, MONAI's NaN).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from LensSegCalibLib.errors import InputError
from LensSegCalibLib.metrics import (
    CalibrationAccumulator,
    assd,
    bece,
    bece_classwise,
    boundary_band,
    boundary_calibration,
    brier,
    class_interface_masks,
    classwise_ece,
    dice,
    ece,
    hd95,
    interface_mask,
    iou,
    nll,
    pece,
    reliability,
    segmentation_metrics,
)
from LensSegCalibLib.metrics import _binning
from methods_cases import case, case_d

TOL = 2e-6


# ------------------------------------------------------------------------------------------------------------
# METHODS.md section 0.6 test inputs (logits written out; probabilities = softmax over C)
# ------------------------------------------------------------------------------------------------------------
_case = case


def _probs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = _case(name)
    return torch.softmax(logits, dim=1), labels


_case_d = case_d


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Smooth random label map (compact regions, realistic surfaces)."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal((num_classes, *shape)), sigma=[0] + [2] * len(shape))
    return field.argmax(axis=0)


def _reference_ece(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> float:
    """Plain numpy ECE with rule 0.3 evaluated in float64 (independent of the byte-slot kernel)."""
    conf = conf.astype(np.float64).ravel()
    hit = hit.astype(np.float64).ravel()
    idx = np.clip(np.ceil(conf * n_bins) - 1, 0, n_bins - 1).astype(int)
    total = 0.0
    for m in range(n_bins):
        sel = idx == m
        if sel.any():
            total += sel.sum() * abs(hit[sel].mean() - conf[sel].mean())
    return total / conf.size


# ------------------------------------------------------------------------------------------------------------
# Known answers: METHODS.md 9.5-9.8 (ECE, ECE_fg, CW-ECE, NLL, Brier, reliability) and 3 (pECE)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, ece15, ece_fg, cw, per_class, nll_v, brier_v",
    [
        ("A", 0.164742, 0.189543, 0.211935, (0.211935, 0.211935), 0.270131, 0.153880),
        ("B", 0.220280, 0.310267, 0.192049, (0.235677, 0.161296, 0.179175), 0.494237, 0.265815),
        ("C", 0.094352, 0.265648, 0.174448, (0.174448, 0.174448), 0.437520, 0.273180),
        ("E", 0.159997, 0.199795, 0.159997, None, 0.233813, 0.108740),
    ],
)
def test_calibration_metrics_match_methods_vectors(name, ece15, ece_fg, cw, per_class, nll_v, brier_v):
    probs, labels = _probs(name)
    assert ece(probs, labels) == pytest.approx(ece15, abs=TOL)
    assert ece(probs, labels, mask=labels != 0) == pytest.approx(ece_fg, abs=TOL)
    assert classwise_ece(probs, labels) == pytest.approx(cw, abs=TOL)
    if per_class is not None:
        np.testing.assert_allclose(classwise_ece(probs, labels, per_class=True), per_class, atol=TOL)
    assert nll(probs, labels) == pytest.approx(nll_v, abs=TOL)
    assert brier(probs, labels) == pytest.approx(brier_v, abs=TOL)


@pytest.mark.parametrize("name, expected", [("A", 0.131227), ("B", 0.220280), ("C", 0.074647)])
def test_ece_with_ten_bins_matches_official_values(name, expected):
    probs, labels = _probs(name)
    assert ece(probs, labels, n_bins=10) == pytest.approx(expected, abs=TOL)


def test_reliability_of_case_e_with_five_bins():
    probs, labels = _probs("E")
    rel = reliability(probs, labels, n_bins=5)
    np.testing.assert_array_equal(rel.count, [0, 0, 19, 34, 91])
    np.testing.assert_allclose(rel.mean_confidence[2:], [0.566462, 0.749231, 0.878281], atol=TOL)
    np.testing.assert_allclose(rel.accuracy[2:], [0.736842, 1.0, 1.0], atol=TOL)
    np.testing.assert_allclose(rel.gap[2:], [-0.170380, -0.250769, -0.121719], atol=TOL)
    assert np.isnan(rel.mean_confidence[:2]).all() and np.isnan(rel.gap[:2]).all()  # empty bins
    np.testing.assert_allclose(rel.edges, np.linspace(0, 1, 6))
    assert rel.ece == pytest.approx(ece(probs, labels, n_bins=5), abs=1e-12)


def test_classwise_reliability_rows_are_one_vs_rest_bins():
    probs, labels = _probs("B")
    rel = reliability(probs, labels, n_bins=15, classwise=True)
    assert rel.count.shape == (3, 15)
    np.testing.assert_array_equal(rel.count.sum(axis=1), [36, 36, 36])
    np.testing.assert_allclose(rel.ece, [0.235677, 0.161296, 0.179175], atol=TOL)
    # hits of class c are the voxels labelled c
    hits = np.nansum(rel.accuracy * rel.count, axis=1)
    np.testing.assert_allclose(hits, [np.sum(labels.numpy() == c) for c in range(3)])


def test_argmax_ties_go_to_the_lowest_class_index():
    # Both voxels tie between classes 0 and 1 (conf 0.45, bin 6); the reference label is 0 in both.
    probs = torch.tensor([[0.45, 0.45], [0.45, 0.45], [0.1, 0.1]]).view(1, 3, 1, 2)
    labels = torch.zeros(1, 1, 2, dtype=torch.int64)
    # lowest index -> both hits: |1 - 0.45| = 0.55 (the highest-index rule would give 0.45)
    assert ece(probs, labels) == pytest.approx(0.55, abs=1e-6)
    assert ece(probs, labels + 1) == pytest.approx(0.45, abs=1e-6)


@pytest.mark.parametrize(
    "name, w2, w0",
    [("A", 0.336338, 0.170458), ("B", 0.989332, 0.197745), ("C", 0.774894, 0.150020), ("E", 0.495713, None)],
)
def test_pece_matches_official_values(name, w2, w0):
    probs, labels = _probs(name)
    assert pece(probs, labels) == pytest.approx(w2, abs=TOL)
    if w0 is not None:
        assert pece(probs, labels, fp_weight=0.0) == pytest.approx(w0, abs=TOL)


def test_pece_keeps_zero_confidence_out_of_every_bin_but_in_n():
    # Two voxels with foreground confidence exactly 0 (probs[0] == 1) and two calibrated-looking voxels.
    probs = torch.tensor([[[1.0, 1.0, 0.3, 0.3], [0.0, 0.0, 0.7, 0.7]]]).view(1, 2, 1, 4)
    labels = torch.tensor([[[0, 0, 1, 0]]])
    # Bin of p = 0.7: a = 0.7, b = 0.5, f = 0.7 -> |0.7 - 0.5 + 2 * 0.7| = 1.6, weight 2/4.
    assert pece(probs, labels) == pytest.approx(0.8, abs=1e-6)  # float32 0.7
    # ECE puts p = 0 into bin 0 instead (rule 0.3): top-label conf there is probs[0] = 1 -> no error.
    assert ece(probs, labels) == pytest.approx(0.5 * abs(0.5 - 0.7), abs=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Known answers: METHODS.md section 2 (BECE)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, spacing, band_mm, n_band, expected, per_class",
    [
        ("A", (1, 1), 0, 11, 0.150343, (0.150343,)),
        ("B", (0.8, 0.5), 0.6, 35, 0.212550, (0.162659, 0.220060)),
        ("C", (2, 0.5, 0.5), 0.5, 46, 0.095699, None),
        ("E", (0.5, 0.5), 0, 36, 0.221631, None),
        ("E", (0.5, 0.5), 0.5, 72, 0.183984, None),
        ("E", (0.5, 0.5), None, 104, 0.164931, (0.164931,)),
    ],
)
def test_bece_matches_methods_vectors(name, spacing, band_mm, n_band, expected, per_class):
    probs, labels = _probs(name)
    res = boundary_calibration(probs, labels, spacing=spacing, band_mm=band_mm)
    assert int(res.band_voxels[0]) == n_band
    assert res.bece == pytest.approx(expected, abs=TOL)
    assert bece(probs, labels, spacing=spacing, band_mm=band_mm) == pytest.approx(expected, abs=TOL)
    if per_class is not None:
        np.testing.assert_allclose(bece_classwise(probs, labels, spacing, band_mm), per_class, atol=TOL)
        assert res.bece_cw == pytest.approx(np.mean(per_class), abs=TOL)
    if band_mm is None:
        assert res.band_mm == pytest.approx(2 * min(spacing))


def test_bece_with_band_covering_everything_equals_ece():
    probs, labels = _probs("B")
    assert bece(probs, labels, spacing=(0.8, 0.5), band_mm=100.0) == pytest.approx(ece(probs, labels), abs=1e-12)


def test_bece_of_case_without_interface_is_nan_and_skipped_in_the_mean():
    probs, labels = _probs("A")
    flat = torch.zeros_like(labels)  # one label everywhere: no interface
    both_probs = torch.cat([probs, probs])
    both_labels = torch.cat([labels, flat])
    per_case = bece(both_probs, both_labels, band_mm=0, reduction="none")
    assert per_case[0] == pytest.approx(0.150343, abs=TOL) and math.isnan(per_case[1])
    assert bece(both_probs, both_labels, band_mm=0) == pytest.approx(0.150343, abs=TOL)


def test_interface_and_band_helpers_on_case_e():
    _, labels = _case("E")
    lab = labels[0].numpy()
    face = interface_mask(lab)
    assert face.sum() == 36 and face.dtype == bool
    assert interface_mask(lab, connectivity="full").sum() > face.sum()  # 8-connectivity is thicker
    assert not face[0].any() and not face[:, 0].any()  # the image border is not an interface
    np.testing.assert_array_equal(boundary_band(lab, (0.5, 0.5), 0), face)
    assert boundary_band(lab, (0.5, 0.5), 0.5).sum() == 72
    assert boundary_band(labels[0], (0.5, 0.5)).sum() == 104  # torch input, default band 1.0 mm
    per_class = class_interface_masks(lab, 2)
    np.testing.assert_array_equal(per_class[1], face)  # binary: class-1 interface = the interface
    assert not boundary_band(np.zeros((5, 5), dtype=int), (1, 1), 2.0).any()
    assert lab.sum() == 32  # input untouched


@given(seed=st.integers(0, 2**31 - 1), band=st.sampled_from([0.3, 0.5, 0.8, 1.0, 1.5, 2.2]),
       spacing=st.sampled_from([(1.0, 1.0, 1.0), (2.0, 0.5, 0.5), (0.7, 0.3, 0.45)]))
def test_band_by_dilation_equals_band_by_edt(seed, band, spacing):
    from LensSegCalibLib.metrics import boundary as bmod

    rng = np.random.default_rng(seed)
    lab = _blobs(rng, (7, 16, 15), 3)
    fast = boundary_band(lab, spacing, band)
    saved = bmod._MAX_DILATION_ELEMENTS
    bmod._MAX_DILATION_ELEMENTS = 0  # force the EDT path
    try:
        slow = boundary_band(lab, spacing, band)
    finally:
        bmod._MAX_DILATION_ELEMENTS = saved
    np.testing.assert_array_equal(fast, slow)


def test_band_is_measured_in_mm_on_anisotropic_grids():
    lab = np.zeros((9, 9), dtype=np.int64)
    lab[:, 5:] = 1  # vertical interface between columns 4 and 5
    band = boundary_band(lab, spacing=(1.0, 0.25), band_mm=0.5)
    # along x the band reaches 0.5 mm = 2 columns on each side of the two interface columns
    np.testing.assert_array_equal(np.nonzero(band[0])[0], [2, 3, 4, 5, 6, 7])


# ------------------------------------------------------------------------------------------------------------
# Known answers: METHODS.md 9.1-9.4 (Dice, IoU, HD95, ASSD)
# ------------------------------------------------------------------------------------------------------------
def test_case_d_overlap_and_surface_distances():
    pred, ref = _case_d()
    assert dice(pred, ref, 2) == pytest.approx([1 / 3], abs=TOL)
    assert iou(pred, ref, 2) == pytest.approx([0.2], abs=TOL)
    assert hd95(pred, ref, 2, spacing=(1, 0.5)) == pytest.approx([1.605971], abs=TOL)
    assert hd95(pred, ref, 2, spacing=(1, 0.5), percentile=100) == pytest.approx([1.802776], abs=TOL)
    assert assd(pred, ref, 2, spacing=(1, 0.5)) == pytest.approx([0.860280], abs=TOL)
    assert hd95(pred, ref, 2, spacing=(1, 1)) == pytest.approx([3.056797], abs=TOL)
    assert assd(pred, ref, 2) == pytest.approx([1.440878], abs=TOL)  # None = 1 mm


@pytest.mark.parametrize(
    "name, spacing, dice_v, iou_v, hd_v, assd_v",
    [
        ("B", (0.8, 0.5), (0.894737, 0.916667, 0.8), (0.809524, 0.846154, 0.666667), (0.8, 0.5, 1.210469),
         (0.084211, 0.041667, 0.228062)),
        ("C", (2, 0.5, 0.5), (0.861111, 0.583333), (0.756098, 0.411765), (0.5, 0.892024), (0.069444, 0.242714)),
        ("E", (0.5, 0.5), (0.977376, 0.925373), None, (0.5, 0.5), (0.048872, 0.083333)),
    ],
)
def test_segmentation_metrics_of_argmax_match_methods_vectors(name, spacing, dice_v, iou_v, hd_v, assd_v):
    logits, labels = _case(name)
    pred = logits.argmax(dim=1)
    c = logits.shape[1]
    kw = {"spacing": spacing, "include_background": True}
    np.testing.assert_allclose(dice(pred, labels, c, **kw), dice_v, atol=TOL)
    if iou_v is not None:
        np.testing.assert_allclose(iou(pred, labels, c, **kw), iou_v, atol=TOL)
    np.testing.assert_allclose(hd95(pred, labels, c, **kw), hd_v, atol=TOL)
    np.testing.assert_allclose(assd(pred, labels, c, **kw), assd_v, atol=TOL)
    both = segmentation_metrics(pred, labels, c, spacing, include_background=True)
    np.testing.assert_allclose(both.hd95[0], hd_v, atol=TOL)
    np.testing.assert_allclose(both.mean("dice"), dice_v[1:], atol=TOL)
    # foreground only by default
    assert dice(pred, labels, c).shape == (c - 1,)


def test_empty_set_rules():
    empty = np.zeros((1, 6, 6), dtype=np.int64)
    blob = empty.copy()
    blob[0, 2:4, 2:4] = 1
    assert dice(empty, empty, 2)[0] == 1.0 and iou(empty, empty, 2)[0] == 1.0
    assert dice(empty, blob, 2)[0] == 0.0 and iou(blob, empty, 2)[0] == 0.0
    assert math.isnan(hd95(empty, empty, 2)[0]) and math.isnan(assd(empty, empty, 2)[0])
    assert hd95(empty, blob, 2)[0] == math.inf and assd(blob, empty, 2)[0] == math.inf
    # a missed structure in one case is not averaged away: the mean over cases is +inf
    assert hd95(np.concatenate([blob, empty]), np.concatenate([blob, blob]), 2)[0] == math.inf
    # both-empty (NaN) cases are skipped in the mean
    assert hd95(np.concatenate([blob, empty]), np.concatenate([blob, empty]), 2)[0] == 0.0
    per_case = dice(np.concatenate([blob, empty]), np.concatenate([blob, blob]), 2, reduction="none")
    np.testing.assert_array_equal(per_case, [[1.0], [0.0]])


# ------------------------------------------------------------------------------------------------------------
# Aggregation, masks, dtypes, errors
# ------------------------------------------------------------------------------------------------------------
def test_batch_is_mean_of_per_case_values_not_pooled():
    pa, la = _probs("A")
    pe, le = _probs("E")
    pa_big = torch.nn.functional.pad(pa, (0, 8, 0, 8), value=0.5)  # same grid as E, constant 0.5 outside
    la_big = torch.nn.functional.pad(la, (0, 8, 0, 8), value=0)
    probs, labels = torch.cat([pa_big, pe]), torch.cat([la_big, le])
    for fn in (ece, classwise_ece, nll, brier, pece):
        per_case = fn(probs, labels, reduction="none")
        assert per_case.shape == (2,)
        assert per_case[1] == pytest.approx(fn(pe, le), abs=1e-12)
        assert fn(probs, labels) == pytest.approx(per_case.mean(), abs=1e-12)


def test_mask_equals_metric_on_selected_voxels():
    rng = np.random.default_rng(3)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, 3, 20, 30)) * 2).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, 3, (1, 20, 30)))
    mask = torch.from_numpy(rng.random((1, 20, 30)) < 0.4)
    sel_p = probs.permute(0, 2, 3, 1)[mask].T[None, :, :, None]  # (1, C, n, 1)
    sel_y = labels[mask][None, :, None]
    for fn in (ece, classwise_ece, nll, brier):
        assert fn(probs, labels, mask=mask) == pytest.approx(fn(sel_p, sel_y), abs=1e-12)
    assert math.isnan(ece(probs, labels, mask=torch.zeros_like(mask)))  # no voxel -> NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_bin_the_stored_values(dtype):
    probs, labels = _probs("B")
    low = probs.to(dtype)
    conf, pred = low.float().max(dim=1)
    expected = _reference_ece(conf.numpy(), (pred == labels).numpy(), 15)
    assert ece(low, labels) == pytest.approx(expected, abs=1e-6)


def test_non_contiguous_and_read_only_inputs_give_the_same_result():
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((2, 3, 9, 40, 50))).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, 3, (2, 9, 40, 50)))
    expected = classwise_ece(probs, labels, reduction="none")
    transposed = probs.transpose(3, 4).contiguous().transpose(3, 4)  # same values, non-contiguous
    assert not transposed.is_contiguous()
    np.testing.assert_allclose(classwise_ece(transposed, labels, reduction="none"), expected, atol=1e-12)
    fortran = np.asfortranarray(probs.numpy())
    fortran.setflags(write=False)
    np.testing.assert_allclose(classwise_ece(fortran, labels.numpy(), reduction="none"), expected, atol=1e-12)
    assert labels.shape == (2, 9, 40, 50)  # untouched


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int32, np.int64])
def test_label_dtypes_are_accepted_and_inputs_are_never_modified(dtype):
    logits, labels = _case("B")
    probs = torch.softmax(logits, dim=1).numpy()
    lab = labels.numpy().astype(dtype)
    pred = logits.argmax(dim=1).numpy().astype(dtype)
    copies = [probs.copy(), lab.copy(), pred.copy()]
    assert ece(probs, lab) == pytest.approx(0.220280, abs=TOL)
    assert bece(probs, lab, (0.8, 0.5), 0.6) == pytest.approx(0.212550, abs=TOL)
    assert pece(probs, lab) == pytest.approx(0.989332, abs=TOL)
    np.testing.assert_allclose(dice(pred, lab, 3, include_background=True), (0.894737, 0.916667, 0.8), atol=TOL)
    np.testing.assert_array_equal(dice(lab, lab, 3), [1.0, 1.0])  # same array twice (aliasing)
    np.testing.assert_allclose(hd95(pred, lab, 3, (0.8, 0.5)), (0.5, 1.210469), atol=TOL)
    for before, after in zip(copies, (probs, lab, pred)):
        np.testing.assert_array_equal(before, after)


def test_invalid_inputs_raise_input_error_with_the_fix():
    probs, labels = _probs("B")
    with pytest.raises(InputError, match="labels must lie in 0..2"):
        ece(probs, labels + 1)
    with pytest.raises(InputError, match="softmax"):
        ece(torch.log(probs) * 3, labels)  # logits, not probabilities
    with pytest.raises(InputError, match="softmax"):
        classwise_ece(probs * 2.0, labels)
    slightly_off = probs.clone()
    slightly_off[0, 0, 3, 3] = 1.2  # one voxel, any position: still caught
    for fn in (ece, classwise_ece, nll, brier):
        with pytest.raises(InputError, match="softmax"):
            fn(slightly_off, labels)
    with_nan = probs.clone()
    with_nan[0, :, 2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        ece(with_nan, labels)
    with pytest.raises(InputError, match="NaN"):
        classwise_ece(with_nan, labels)
    with pytest.raises(InputError, match="must have shape"):
        ece(probs, labels[:, :5])
    with pytest.raises(InputError, match="n_bins"):
        ece(probs, labels, n_bins=0)
    with pytest.raises(InputError, match="spacing"):
        bece(probs, labels, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="integer label map"):
        dice(probs[:, 0], labels, 3)
    with pytest.raises(InputError, match="reduction"):
        ece(probs, labels, reduction="sum")
    # an ignore value outside 0..C-1 is fine where the mask excludes it
    ignored = labels.clone()
    ignored[0, 0, 0] = 255
    keep = ignored != 255
    assert ece(probs, ignored, mask=keep) == pytest.approx(ece(probs, labels, mask=keep), abs=1e-12)


def test_probabilities_that_require_grad_are_accepted():
    logits, labels = _case("B")
    probs = torch.softmax(logits.requires_grad_(), dim=1)  # e.g. validation inside a training step
    assert ece(probs, labels) == pytest.approx(0.220280, abs=TOL)
    assert bece(probs, labels, (0.8, 0.5), 0.6) == pytest.approx(0.212550, abs=TOL)
    acc = CalibrationAccumulator()
    acc.update(probs, labels)
    assert acc.compute().classwise_ece == pytest.approx(0.192049, abs=TOL)


def test_results_and_probabilities_stay_on_the_input_device_cpu():
    probs, labels = _probs("A")
    acc = CalibrationAccumulator()
    acc.update(probs, labels)
    assert acc._stats.cw_prob.device == probs.device and acc._stats.cw_prob.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (index_add_ path)")
def test_cuda_matches_cpu():
    probs, labels = _probs("B")
    assert ece(probs.cuda(), labels.cuda()) == pytest.approx(ece(probs, labels), abs=1e-12)
    assert classwise_ece(probs.cuda(), labels.cuda()) == pytest.approx(classwise_ece(probs, labels), abs=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), num_classes=st.integers(2, 5))
def test_perfectly_calibrated_sampler_has_ece_near_zero(seed, num_classes):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((1, num_classes, 128, 128)) * rng.uniform(0.5, 3.0)
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=1)
    # labels drawn from the predicted distribution: calibrated by construction
    cum = probs[0].cumsum(dim=0).numpy()
    u = rng.random((1, 128, 128))
    labels = torch.from_numpy((u[:, None] > cum[None]).sum(axis=1).clip(0, num_classes - 1))
    assert ece(probs, labels) < 0.02
    assert classwise_ece(probs, labels) < 0.02
    # the same probabilities against their own argmax are under-confident (always right): far from 0
    assert ece(probs, probs.argmax(dim=1)) > 0.05


@given(seed=st.integers(0, 2**31 - 1))
def test_voxel_permutation_does_not_change_calibration_metrics(seed):
    rng = np.random.default_rng(seed)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, 3, 17, 23)) * 2).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, 3, (1, 17, 23)))
    perm = torch.from_numpy(rng.permutation(17 * 23))
    p2 = probs.reshape(1, 3, -1)[:, :, perm].reshape(1, 3, 17, 23)
    y2 = labels.reshape(1, -1)[:, perm].reshape(1, 17, 23)
    for fn in (ece, classwise_ece, nll, brier, pece):
        assert fn(p2, y2) == pytest.approx(fn(probs, labels), abs=1e-12)


@given(seed=st.integers(0, 2**31 - 1), sy=st.sampled_from([0.3, 0.5, 1.0]), sx=st.sampled_from([0.4, 1.0]))
def test_2d_equals_3d_with_one_slice(seed, sy, sx):
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(_blobs(rng, (14, 15), 3)[None])
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, 3, 14, 15)) * 2).float(), dim=1)
    p3, y3 = probs[:, :, None], labels[:, None]
    assert ece(p3, y3) == pytest.approx(ece(probs, labels), abs=1e-12)
    assert classwise_ece(p3, y3) == pytest.approx(classwise_ece(probs, labels), abs=1e-12)
    b2 = boundary_calibration(probs, labels, spacing=(sy, sx))
    b3 = boundary_calibration(p3, y3, spacing=(2.0, sy, sx), band_mm=2 * min(sy, sx))
    assert b3.bece == pytest.approx(b2.bece, abs=1e-12, nan_ok=True)
    np.testing.assert_allclose(b3.bece_classwise, b2.bece_classwise, atol=1e-12)
    pred = probs.argmax(dim=1)
    np.testing.assert_array_equal(dice(pred[:, None], y3, 3), dice(pred, labels, 3))
    # (HD95/ASSD differ by definition: in a one-slice volume every mask voxel touches the image border along D,
    # so every voxel is a surface voxel, exactly as in MONAI.)


@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(1, 15), min_size=0, max_size=4))
def test_accumulator_over_random_slabs_equals_whole_volume(seed, cuts):
    rng = np.random.default_rng(seed)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, 4, 16, 12, 10)) * 2).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, 4, (1, 16, 12, 10)))
    mask = torch.from_numpy(rng.random((1, 16, 12, 10)) < 0.8)
    edges = [0, *sorted(set(cuts)), 16]
    acc = CalibrationAccumulator(n_bins=15, scores=True)
    for z0, z1 in zip(edges[:-1], edges[1:]):
        acc.update(probs[:, :, z0:z1], labels[:, z0:z1], mask[:, z0:z1])
    res = acc.compute()
    assert res.ece == pytest.approx(ece(probs, labels, mask=mask), abs=1e-12)
    assert res.classwise_ece == pytest.approx(classwise_ece(probs, labels, mask=mask), abs=1e-12)
    np.testing.assert_allclose(res.classwise_ece_per_class, classwise_ece(probs, labels, mask=mask, per_class=True),
                               atol=1e-12)
    whole = reliability(probs, labels, mask=mask)
    np.testing.assert_array_equal(res.reliability.count, whole.count)
    np.testing.assert_allclose(res.reliability.accuracy, whole.accuracy, atol=1e-12)
    np.testing.assert_array_equal(res.classwise_reliability.count,
                                  reliability(probs, labels, mask=mask, classwise=True).count)
    assert res.n_voxels == int(mask.sum())
    assert res.nll == pytest.approx(nll(probs, labels, mask=mask), abs=1e-12)
    assert res.brier == pytest.approx(brier(probs, labels, mask=mask), abs=1e-12)


@given(seed=st.integers(0, 2**31 - 1))
def test_numpy_and_torch_inputs_agree(seed):
    rng = np.random.default_rng(seed)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((2, 3, 8, 9)) * 2).float(), dim=1)
    labels = torch.from_numpy(np.stack([_blobs(rng, (8, 9), 3) for _ in range(2)]))
    pn, yn = probs.numpy(), labels.numpy()
    for fn in (ece, classwise_ece, nll, brier, pece, bece):
        assert fn(pn, yn) == pytest.approx(fn(probs, labels), abs=1e-12, nan_ok=True)
    pred = probs.argmax(dim=1)
    for fn in (dice, iou, hd95, assd):
        np.testing.assert_array_equal(fn(pred.numpy(), yn, 3), fn(pred, labels, 3))


def test_chunked_kernel_matches_plain_numpy_reference_on_a_multi_chunk_volume(monkeypatch):
    rng = np.random.default_rng(11)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, 3, 40, 48, 50)) * 2).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, 3, (1, 40, 48, 50)))
    conf, pred = probs.max(dim=1)
    expected_top = _reference_ece(conf.numpy(), (pred == labels).numpy(), 15)
    expected_cw = np.mean([_reference_ece(probs[:, c].numpy(), (labels == c).numpy(), 15) for c in range(3)])
    assert ece(probs, labels) == pytest.approx(expected_top, abs=1e-9)
    assert classwise_ece(probs, labels) == pytest.approx(expected_cw, abs=1e-9)
    # the worker-thread split (used on idle cores) gives the same numbers, and the caller's torch thread
    # setting (lowered to 1 during the call) comes back
    threads = torch.get_num_threads()
    monkeypatch.setattr(_binning, "_n_workers", lambda device, n_chunks: 3)
    try:
        torch.set_num_threads(2)
        assert ece(probs, labels) == pytest.approx(expected_top, abs=1e-9)
        assert classwise_ece(probs, labels) == pytest.approx(expected_cw, abs=1e-9)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("num_classes, n_bins", [(20, 15), (3, 200), (2, 1)])
def test_many_classes_or_bins_use_wider_indices_and_stay_exact(num_classes, n_bins):
    rng = np.random.default_rng(num_classes * n_bins)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, num_classes, 30, 37)) * 3).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, num_classes, (1, 30, 37)))
    conf, pred = probs.max(dim=1)
    assert ece(probs, labels, n_bins=n_bins) == pytest.approx(
        _reference_ece(conf.numpy(), (pred == labels).numpy(), n_bins), abs=1e-9
    )
    expected = [_reference_ece(probs[:, c].numpy(), (labels == c).numpy(), n_bins) for c in range(num_classes)]
    np.testing.assert_allclose(classwise_ece(probs, labels, n_bins=n_bins, per_class=True), expected, atol=1e-9)


def test_pece_matches_a_plain_reimplementation_on_random_data():
    rng = np.random.default_rng(5)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, 3, 30, 41)) * 3).float(), dim=1)
    probs[0, :, :3] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # exact zeros: in no bin
    labels = torch.from_numpy(rng.integers(0, 3, (1, 30, 41)))
    p = 1.0 - probs[0, 0].double().numpy().ravel()
    y = (labels[0].numpy().ravel() != 0).astype(float)
    total = 0.0
    for m in range(10):
        sel = (p > m / 10) & (p <= (m + 1) / 10)
        if sel.any():
            f = p[sel & (y == 0)].mean() if (sel & (y == 0)).any() else 0.0
            total += sel.sum() * abs(p[sel].mean() - y[sel].mean() + 2.0 * f)
    assert pece(probs, labels) == pytest.approx(total / p.size, abs=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Parity with MONAI 1.6.1
# ------------------------------------------------------------------------------------------------------------
def _onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("shape", [(2, 4, 20, 24), (1, 3, 6, 10, 12)])
def test_calibration_parity_with_monai(shape):
    from monai.metrics import CalibrationErrorMetric

    rng = np.random.default_rng(sum(shape))
    probs = torch.softmax(torch.from_numpy(rng.standard_normal(shape) * 2).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, shape[1], (shape[0], *shape[2:])))
    metric = CalibrationErrorMetric(num_bins=15, metric_reduction="none")
    per_case_class = metric(y_pred=probs, y=_onehot(labels, shape[1])).numpy()
    np.testing.assert_allclose(classwise_ece(probs, labels, reduction="none", per_class=True), per_case_class,
                               atol=1e-5)
    # top-label ECE = MONAI on the single channel (max p, hit)
    conf, pred = probs.max(dim=1)
    top = CalibrationErrorMetric(num_bins=15, metric_reduction="none")(
        y_pred=conf[:, None], y=(pred == labels).float()[:, None]
    ).numpy()[:, 0]
    np.testing.assert_allclose(ece(probs, labels, reduction="none"), top, atol=1e-5)
    # per-class reliability bins = MONAI calibration_binning
    from monai.metrics import calibration_binning

    mean_p, mean_gt, counts = calibration_binning(probs[:1], _onehot(labels[:1], shape[1]), num_bins=15)
    rel = reliability(probs[:1], labels[:1], classwise=True)
    np.testing.assert_array_equal(rel.count, counts[0].numpy())
    np.testing.assert_allclose(rel.mean_confidence, mean_p[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(rel.accuracy, mean_gt[0].numpy(), atol=1e-5)


@pytest.mark.filterwarnings("ignore:the prediction of class:UserWarning")  # MONAI on the empty mask (intended)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated argument, inside MONAI
@pytest.mark.parametrize(
    "shape, spacing", [((2, 24, 26), (0.7, 0.3)), ((1, 9, 14, 13), (2.0, 0.5, 0.6))]
)
def test_surface_and_overlap_parity_with_monai(shape, spacing):
    from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric, compute_dice, compute_iou

    rng = np.random.default_rng(len(shape))
    num_classes = 4
    ref = np.stack([_blobs(rng, shape[1:], num_classes) for _ in range(shape[0])])
    pred = np.stack([_blobs(rng, shape[1:], num_classes) for _ in range(shape[0])])
    pred[0][pred[0] == 3] = 2  # class 3 missing from the prediction of case 0: one empty mask
    pt, rt = _onehot(torch.from_numpy(pred), num_classes), _onehot(torch.from_numpy(ref), num_classes)
    ours_hd = hd95(pred, ref, num_classes, spacing, reduction="none")
    ours_sd = assd(pred, ref, num_classes, spacing, reduction="none")
    monai_hd = HausdorffDistanceMetric(percentile=95, reduction="none")(pt, rt, spacing=spacing).numpy()
    monai_sd = SurfaceDistanceMetric(symmetric=True, reduction="none")(pt, rt, spacing=spacing).numpy()
    finite = np.isfinite(ours_hd)
    assert not finite[0, 2]  # the documented difference: ours +inf ...
    assert ours_hd[0, 2] == math.inf and np.isnan(monai_hd[0, 2])  # ... MONAI NaN (drops out of a nan-mean)
    np.testing.assert_allclose(ours_hd[finite], monai_hd[finite], atol=1e-5)
    np.testing.assert_allclose(ours_sd, monai_sd, atol=1e-5)  # ASSD: same empty rule (+inf) as MONAI
    kw = {"include_background": False, "ignore_empty": False}
    np.testing.assert_allclose(dice(pred, ref, num_classes, reduction="none"), compute_dice(pt, rt, **kw).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(iou(pred, ref, num_classes, reduction="none"), compute_iou(pt, rt, **kw).numpy(),
                               atol=1e-5)


def test_top_label_parity_with_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification", reason="torchmetrics is a bench extra")
    rng = np.random.default_rng(21)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((1, 4, 18, 20, 22)) * 2).float(), dim=1)
    labels = torch.from_numpy(rng.integers(0, 4, (1, 18, 20, 22)))
    expected = float(tm.multiclass_calibration_error(probs, labels, 4, n_bins=15, norm="l1"))
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-5)
