"""Tests of LensSegCalibLib.losses against the known-answer vectors of METHODS.md sections 1, 4–8.

Expected values come from the official code (METHODS.md tables); tolerance 2e-6 (float32, METHODS.md 0.6).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from LensSegCalibLib.errors import InputError
from LensSegCalibLib.losses import (
    LOSSES,
    ACWLoss,
    ACWThresholdScheduler,
    CALFLoss,
    CELoss,
    DiceCELoss,
    NACLLoss,
    RegionWiseLoss,
    SDCLoss,
    SVLSLoss,
    build_loss,
    exact_quantile,
    rrw_maps,
    sam_targets,
    sdc_targets,
    svls_targets,
)
from LensSegCalibLib.losses._utils import masks_edt
from methods_cases import case

TOL = 2e-6


# ----------------------------------------------------------------------------------------------------------
# METHODS.md 0.6 cases
def case_a() -> tuple[torch.Tensor, torch.Tensor]:
    return case("A")


def case_b() -> tuple[torch.Tensor, torch.Tensor]:
    return case("B")


def case_c() -> tuple[torch.Tensor, torch.Tensor]:
    return case("C")


def case_e() -> tuple[torch.Tensor, torch.Tensor]:
    return case("E")


CASES = {"A": case_a, "B": case_b, "C": case_c, "E": case_e}


def value(loss: torch.nn.Module, case: str, scale: float = 1.0) -> float:
    logits, labels = CASES[case]()
    return float(loss(logits * scale, labels))


def test_case_e_has_the_documented_errors():
    logits, labels = case_e()
    wrong = (logits.argmax(1) != labels).nonzero()[:, 1:].tolist()
    assert int(labels.sum()) == 32 and wrong == [[2, 4], [2, 7], [8, 5], [9, 4], [9, 7]]


# ----------------------------------------------------------------------------------------------------------
# Baselines
@pytest.mark.parametrize("case, expected", [("A", 0.270131), ("B", 0.494237), ("C", 0.437520)])
def test_ce_matches_methods_case_values(case, expected):
    assert value(CELoss(), case) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("case", ["B", "C"])
def test_dicece_equals_monai_dicece(case):
    from monai.losses import DiceCELoss as MonaiDiceCE

    logits, labels = CASES[case]()
    ref = MonaiDiceCE(to_onehot_y=True, softmax=True)(logits, labels[:, None])
    assert float(DiceCELoss()(logits, labels)) == pytest.approx(float(ref), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# ACW (METHODS.md section 1)
@pytest.mark.parametrize(
    "case, q, alpha, scale, expected",
    [("A", 0.5, 0.5, 1, 0.746962), ("B", 0.3, 0.8, 1, 1.337941), ("B", 0.5, 1.0, 1, 0.988473),
     ("C", 0.7, 0.4, 1, 0.993479), ("A", 0.5, 0.5, 40, 1.511036), ("E", 0.5, 0.5, 1, 0.552515)],
)
def test_acw_matches_official_vectors(case, q, alpha, scale, expected):
    assert value(ACWLoss(q=q, alpha=alpha), case, scale) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("case, expected", [("A", 0.700772), ("B", 1.180574)])
def test_acw_per_class_vectors(case, expected):
    assert value(ACWLoss(q=0.5, alpha=0.5, per_class=True), case) == pytest.approx(expected, abs=TOL)


def test_acw_threshold_of_case_a_and_defaults():
    logits, labels = case_a()
    p_y = torch.softmax(logits, 1).gather(1, labels[:, None]).flatten()
    assert float(exact_quantile(p_y, 0.5)) == pytest.approx(0.846544, abs=TOL)
    loss = build_loss("acw")
    assert (loss.q, loss.alpha, loss.per_class, loss.eps) == (0.5, 0.5, False, 1e-7)


def test_acw_alpha_one_median_is_twice_ce():
    logits, labels = case_b()
    # 36 voxels, q = 0.5: 18 per group, so α = β = 1 gives 2 × mean NLL (up to the 1e-7 inside the log).
    assert value(ACWLoss(q=0.5, alpha=1.0), "B") == pytest.approx(2 * 0.494237, abs=1e-5)


def test_acw_saturated_softmax_empty_high_group_has_finite_gradient():
    logits, labels = case_a()
    z = (logits * 40).requires_grad_()
    loss = ACWLoss(q=0.5, alpha=0.5)(z, labels)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(1.511036, abs=TOL)
    assert torch.isfinite(z.grad).all()


def test_acw_gradient_matches_autograd_of_the_official_formula():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 6, 5))
    ACWLoss(q=0.3, alpha=0.7)(z, y).backward()
    z2 = z.detach().clone().requires_grad_()
    p_y = torch.softmax(z2, 1).gather(1, y[:, None]).flatten()
    high = p_y > torch.quantile(p_y.detach(), 0.3)
    nll = -torch.log(p_y + 1e-7)
    (0.7 * nll[high].mean() + 1.3 * nll[~high].mean()).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 65536, 100003])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_exact_quantile_is_bit_identical_to_torch_quantile(n, q):
    g = torch.Generator().manual_seed(n)
    for x in (torch.rand(n, generator=g), torch.randint(0, 4, (n,), generator=g).float() / 3):  # incl. ties
        assert torch.equal(exact_quantile(x, q), torch.quantile(x, q))


def test_exact_quantile_is_exact_when_the_sample_bracket_misses():
    # the strided sample sees only zeros, so its bracket cannot contain the median: full-selection fallback
    n = 2**17
    x = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5
    x[:: n // 16384] = 0.0
    for q in (0.05, 0.5, 0.93):
        assert torch.equal(exact_quantile(x, q), torch.quantile(x, q))


def test_exact_quantile_above_torch_limit_matches_float64_reference():
    n = 2**24 + 1
    x = torch.rand(n, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x, 0.3)
    rank = 0.3 * (n - 1)
    lo = int(np.floor(rank))
    part = np.partition(x.numpy(), [lo, lo + 1])[lo:lo + 2].astype(np.float64)  # exact order statistics
    expected = part[0] + (rank - lo) * (part[1] - part[0])
    assert float(exact_quantile(x, 0.3)) == pytest.approx(expected, abs=1e-7)


def test_acw_runs_on_more_than_2_to_the_24_voxels():
    # (1, 2, 4097, 4097): 16,785,409 voxels > 2^24; logits from a smooth ramp so the answer is checkable.
    side = 4097
    ramp = torch.linspace(-3.0, 3.0, side)
    z1 = (ramp[:, None] + 0.5 * ramp[None, :]).float()
    logits = torch.stack([torch.zeros_like(z1), z1])[None]
    labels = (z1 > 0.7).long()[None]
    loss = float(ACWLoss(q=0.5, alpha=0.5)(logits, labels))
    p_y = torch.where(labels[0] == 1, torch.sigmoid(z1), torch.sigmoid(-z1)).double().flatten().numpy()
    n = p_y.size
    rank = 0.5 * (n - 1)
    lo = int(rank)
    part = np.partition(p_y, [lo, lo + 1])
    t = part[lo] + (rank - lo) * (part[lo + 1] - part[lo])
    nll = -np.log(p_y + 1e-7)
    high = p_y > t
    expected = 0.5 * nll[high].mean() + 1.5 * nll[~high].mean()
    assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-4)


@given(st.integers(1, 3), st.integers(2, 4), st.integers(2, 9), st.integers(2, 9), st.integers(0, 10**6),
       st.booleans())
def test_acw_is_invariant_to_voxel_permutation(b, c, h, w, seed, per_class):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b, h, w), generator=g)
    perm = torch.randperm(b * h * w, generator=g)
    zp = z.movedim(1, -1).reshape(-1, c)[perm].reshape(b, h, w, c).movedim(-1, 1)
    yp = y.reshape(-1)[perm].reshape(b, h, w)
    loss = ACWLoss(q=0.37, alpha=0.6, per_class=per_class)
    assert float(loss(zp, yp)) == pytest.approx(float(loss(z, y)), rel=1e-12, abs=1e-12)


def test_acw_threshold_scheduler_follows_the_hill_climb_rule():
    acw = ACWLoss()
    sched = ACWThresholdScheduler(acw)
    ious = [0.5, 0.6, 0.7, 0.65, 0.66, 0.60, 0.61, 0.60, 0.5, 0.9]
    # worked by hand from METHODS.md 1.2: flips at epochs 3, 5, 7 (δ 0.05, 0.025, 0.0125), freeze at 8.
    expected = [0.5, 0.6, 0.7, 0.65, 0.60, 0.625, 0.65, 0.6375, 0.6375, 0.6375]
    got = [sched.step(j) for j in ious]
    assert got == pytest.approx(expected, abs=1e-12)
    assert acw.q == pytest.approx(0.6375) and sched.frozen and sched.history[8]["frozen"]
    clipped = ACWThresholdScheduler(q=0.85)
    assert [clipped.step(j) for j in (0.1, 0.2)] == pytest.approx([0.85, 0.9])


def test_acw_threshold_scheduler_resumes_from_its_state():
    first = ACWThresholdScheduler()
    for j in (0.5, 0.6, 0.55):
        first.step(j)
    resumed_loss = ACWLoss()
    resumed = ACWThresholdScheduler(resumed_loss)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed_loss.q == pytest.approx(0.55)
    assert resumed.step(0.56) == pytest.approx(first.step(0.56)) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------
# SDC (METHODS.md section 4)
@pytest.mark.parametrize(
    "case, official, fixed", [("A", 0.301917, 0.301140), ("B", 0.515768, 0.515016), ("C", 0.467350, 0.466638)]
)
def test_sdc_matches_official_and_sign_fixed_vectors(case, official, fixed):
    assert value(SDCLoss(official_sign=True), case) == pytest.approx(official, abs=TOL)
    assert value(SDCLoss(), case) == pytest.approx(fixed, abs=TOL)
    assert value(build_loss("sdc"), case) == pytest.approx(fixed, abs=TOL)


@pytest.mark.parametrize("case, lc", [("A", 0.306273), ("B", 0.204588), ("C", 0.287253)])
def test_sdc_local_calibration_term(case, lc):
    # with alpha = 1 and lam = 0 the loss is CE + L_LC
    ce = value(CELoss(), case)
    assert value(SDCLoss(alpha=1.0, lam_sdf=0.0), case) - ce == pytest.approx(lc, abs=TOL)


def test_sdc_targets_case_a_and_e():
    _, labels_a = case_a()
    s = 2**0.5 / (2 + 1e-6)
    official = torch.tensor([[s, 0.5, 0.5, s], [0.5, -0.5, -0.5, 0.5], [0.5, -0.5, -s, -0.5], [s, 0.5, -0.5, -1.0]])
    torch.testing.assert_close(sdc_targets(labels_a, 2, official_sign=True)[0, 1], official, atol=TOL, rtol=0)
    torch.testing.assert_close(sdc_targets(labels_a, 2)[0, 1], -official, atol=TOL, rtol=0)
    assert torch.equal(sam_targets(labels_a, 2)[0, 1], torch.full((4, 4), 0.5))
    _, labels_e = case_e()
    sam_row = torch.tensor([0] + [0.5] * 10 + [0])
    torch.testing.assert_close(sam_targets(labels_e, 2)[0, 1, 5], sam_row, atol=TOL, rtol=0)
    sdf_row = torch.tensor([-0.6, -0.4, -0.2, 0.2, 0.4, 0.565685, 0.565685, 0.4, 0.2, -0.2, -0.4, -0.6])
    torch.testing.assert_close(sdc_targets(labels_e, 2)[0, 1, 5], sdf_row, atol=TOL, rtol=0)


def test_sdc_targets_of_absent_and_full_classes_are_constant():
    labels = torch.zeros(2, 5, 6, dtype=torch.long)
    labels[1, 1:3, 2:4] = 2  # case 0: class 0 fills the patch; case 1: class 1 absent
    t = sdc_targets(labels, 3)
    assert torch.equal(t[0, 0], torch.ones(5, 6)) and torch.equal(t[0, 1], -torch.ones(5, 6))
    assert torch.equal(t[1, 1], -torch.ones(5, 6)) and float(t[1, 2].abs().max()) == pytest.approx(1.0, abs=1e-5)
    assert float(t[1, 2, 1, 2]) > 0 > float(t[1, 2, 0, 0])  # positive inside the class, negative outside
    assert torch.equal(sdc_targets(labels, 3, official_sign=True), -t)


def test_sdc_targets_with_spacing_match_scipy_per_mask():
    _, labels = case_c()
    spacing = (2.0, 0.5, 0.5)
    t = sdc_targets(labels, 2, spacing_mm=spacing)
    for c in range(2):
        m = labels[0].numpy() == c
        s = ndimage.distance_transform_edt(m, sampling=spacing) - ndimage.distance_transform_edt(~m, sampling=spacing)
        s = s.astype(np.float32)
        np.testing.assert_allclose(t[0, c].numpy(), s / (np.abs(s).max() + np.float32(1e-6)), atol=TOL)


def test_stacked_edt_equals_one_scipy_call_per_mask():
    g = np.random.default_rng(5)
    masks = g.random((5, 9, 11)) > 0.6
    spacing = (0.7, 1.3)
    ref = np.stack([ndimage.distance_transform_edt(m, sampling=spacing) for m in masks])
    np.testing.assert_allclose(masks_edt(masks, spacing), ref, rtol=0, atol=1e-12)


def test_sdc_targets_accept_numpy_label_batches_including_flipped_views():
    _, labels = case_b()
    flipped = np.flip(labels.numpy(), axis=2)  # negative strides, as a flip augmentation makes
    expected = torch.flip(sdc_targets(labels, 3), dims=[3])
    assert torch.equal(sdc_targets(flipped, 3), expected)


def test_sdc_precomputed_targets_give_the_same_loss_and_are_validated():
    logits, labels = case_c()
    loss = SDCLoss()
    sdf = sdc_targets(labels[:, None], 2, spatial_dims=3)  # a (B, 1, D, H, W) label batch, as a loader gives
    assert float(loss(logits, labels, sdf=sdf)) == pytest.approx(0.466638, abs=TOL)
    with pytest.raises(InputError, match="shaped like the logits"):
        loss(logits, labels, sdf=sdf[:, :1])


def _sam_reference(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Official SAM with OpenCV's calls replaced by scipy: 3×3 gradient (nearest border = OpenCV's default
    morphology border for a 3×3 square), then a 3×3 mean with a reflect-101 ("mirror") border."""
    square = np.ones((3, 3), bool)
    maps = []
    for c in range(num_classes):
        m = (labels == c).astype(np.uint8)
        grad = ndimage.grey_dilation(m, footprint=square, mode="nearest") - ndimage.grey_erosion(
            m, footprint=square, mode="nearest")
        maps.append(ndimage.uniform_filter(grad.astype(np.float64), size=3, mode="mirror"))
    a = np.stack(maps)
    return a / np.maximum(a.sum(0), 1e-6)


def test_sam_targets_equal_the_official_morphology_on_random_label_maps():
    g = np.random.default_rng(2)
    labels = ndimage.zoom(g.integers(0, 4, (5, 7)), 3, order=0)[:13, :17]  # blocky 4-class map, 13×17
    labels[0, 0] = 3  # a one-voxel island in a corner
    ours = sam_targets(torch.from_numpy(labels)[None].long(), 4)[0].double().numpy()
    np.testing.assert_allclose(ours, _sam_reference(labels, 4), atol=1e-6)
    # the cat-based reflect padding (used off CPU and for size-1 axes) gives the same box sums
    from LensSegCalibLib.losses.sdc import _box_sum, _pad_reflect101_small

    x = torch.from_numpy(labels.astype(np.uint8))[None, None]
    via_cat = _pad_reflect101_small(x, 2)
    assert torch.equal(via_cat, F.pad(x, (1, 1, 1, 1), mode="reflect"))
    assert torch.equal(_box_sum(x, 2, "reflect101"), F.avg_pool2d(via_cat.float(), 3, 1).mul(9).round().byte())


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_sdc_fused_gradient_equals_autograd_of_the_formula(distance):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 7, 6), generator=g)
    SDCLoss(distance=distance, alpha=0.3, lam_sdf=5.0)(z, y).backward()
    z2 = z.detach().clone().requires_grad_()
    p = torch.softmax(z2, 1)
    u, s = sam_targets(y, 3).double(), sdc_targets(y, 3).double()
    dist = (lambda a, b: (a - b).abs().mean()) if distance == "l1" else (lambda a, b: (a - b).square().mean())
    (F.cross_entropy(z2, y) + 0.3 * dist(u, p) + 0.05 * dist(2 * p - 1, s)).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["acw", "sdc", "nacl", "svls", "rrw"])
def test_large_batch_value_matches_a_float64_evaluation(name):
    # float32 accumulation over 2·4·192·192 = 295k elements must stay at float32 accuracy (a float32
    # vector_norm once lost 2e-3 relative here); the float64 run of the same loss is the reference.
    g = torch.Generator().manual_seed(9)
    z = 2 * torch.randn(2, 4, 192, 192, generator=g)
    i, j = torch.meshgrid(torch.arange(192), torch.arange(192), indexing="ij")
    y = (((i - 96) ** 2 / 70**2 + (j - 90) ** 2 / 50**2) <= torch.tensor([1.0, 0.6, 0.3])[:, None, None]).sum(0)
    y = y.expand(2, -1, -1)
    loss = _instances()[name]
    assert loss(z, y).item() == pytest.approx(loss(z.double(), y).item(), rel=2e-6)


def test_sam_slicewise_3d_is_per_slice_2d_and_volumetric_option_differs():
    d, i, j = torch.meshgrid(torch.arange(6), torch.arange(9), torch.arange(9), indexing="ij")
    labels = (((d - 3) ** 2 + (i - 4) ** 2 + (j - 4) ** 2) <= 4).long()[None]  # ball in slices 1..5
    per_slice = torch.stack([sam_targets(labels[:, k], 2) for k in range(6)], dim=2)
    assert torch.equal(sam_targets(labels, 2), per_slice)
    volumetric = sam_targets(labels, 2, slicewise_3d=False)
    # slice 0 has no interface in 2D (u = 0) but lies within the 3×3×3 band of the ball below it
    assert float(per_slice[0, :, 0].abs().sum()) == 0 and float(volumetric[0, 1, 0, 4, 4]) == 0.5
    logits = torch.randn(1, 2, 6, 9, 9, generator=torch.Generator().manual_seed(0))
    volumetric_loss = float(SDCLoss(slicewise_3d=False)(logits, labels))
    assert volumetric_loss != pytest.approx(float(SDCLoss()(logits, labels)), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# CALF (METHODS.md section 5)
@pytest.mark.parametrize(
    "areas, skew, kurt, branch, expected",
    [([900, 950, 1000, 1000, 980, 100], -1.744712, 1.117781, "fisher", -1.301078),
     ([10, 30, 50, 60, 70, 75, 80], -0.673602, -0.882212, "logit", -1.756250),
     ([40, 50, 55, 60, 65, 70, 75], -0.283360, -0.959755, "arcsine", -1.129820),
     ([100, 100, 120, 110, 900], 1.497956, 0.247252, "log10", 0.117316),
     ([10, 20, 30, 40, 60, 90, 120], 0.641532, -0.919296, "ln", 0.270131),
     ([10, 20, 30, 40, 50, 60, 75], 0.139327, -1.121399, "log10", 0.117316),
     ([40, 50, 50, 50, 50, 50, 62], 0.361670, 0.546618, "bce_dice", 0.526493)],
)
def test_calf_vectors(areas, skew, kurt, branch, expected):
    loss = build_loss("calf", foreground_sizes=areas)
    assert (loss.skewness, loss.kurtosis) == pytest.approx((skew, kurt), abs=TOL)
    assert loss.branch == branch
    assert value(loss, "A") == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("skew, kurt, branch", [(0.5, -1.0, "ln"), (-0.5, 0.0, "logit"), (-1.0, 0.0, "fisher"),
                                                (0.0, -1.0, "bce_dice"), (0.2, 0.0, "bce_dice"), (1.0, 5.0, "log10")])
def test_calf_branch_boundaries(skew, kurt, branch):
    assert CALFLoss(skewness=skew, kurtosis=kurt).branch == branch


def test_calf_constant_sizes_and_argument_errors():
    assert CALFLoss(foreground_sizes=[5, 5, 5]).branch == "bce_dice"
    with pytest.raises(InputError, match="exactly one"):
        CALFLoss()
    with pytest.raises(InputError, match="valid"):
        CALFLoss(branch="tanh")


# ----------------------------------------------------------------------------------------------------------
# NACL (METHODS.md section 6)
@pytest.mark.parametrize(
    "case, params, expected",
    [("A", {}, 0.361138), ("A", {"distance_type": "l2"}, 0.394060), ("B", {}, 0.584772),
     ("B", {"distance_type": "l2"}, 0.616563), ("C", {}, 0.525240), ("B", {"kernel_ops": "gaussian"}, 0.578485)],
)
def test_nacl_official_border_vectors(case, params, expected):
    assert value(NACLLoss(border="official", **params), case) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("case, params, expected", [("A", {}, 0.371902), ("B", {}, 0.588887), ("C", {}, 0.541621),
                                                    ("B", {"kernel_ops": "gaussian"}, 0.587952)])
def test_nacl_default_monai_border_vectors(case, params, expected):
    assert value(build_loss("nacl", **params), case) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 4, 3, 5, 6)])
@pytest.mark.parametrize("distance_type", ["l1", "l2"])
def test_nacl_equals_monai_nacl(shape, distance_type):
    from monai.losses import NACLLoss as MonaiNACL

    g = torch.Generator().manual_seed(len(shape))
    z = torch.randn(*shape, generator=g)
    y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    ref = MonaiNACL(classes=shape[1], dim=len(shape) - 2, distance_type=distance_type)(z, y)
    ours = NACLLoss(distance_type=distance_type)(z, y[:, None])
    assert float(ours) == pytest.approx(float(ref), abs=1e-5)


def test_nacl_official_border_counts_outside_as_background():
    _, labels = case_b()
    row = NACLLoss(border="official").official_targets(labels, 3)[0, 0, 0]
    expected = torch.tensor([0.888889, 0.777778, 0.666667, 0.666667, 0.777778, 0.888889])
    torch.testing.assert_close(row, expected, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# SVLS (METHODS.md section 7)
@pytest.mark.parametrize("case, expected", [("A", 0.524117), ("B", 0.837794), ("C", 0.581468)])
def test_svls_vectors(case, expected):
    assert value(SVLSLoss(), case) == pytest.approx(expected, abs=TOL)


def test_svls_target_row_and_uniform_regions_stay_hard():
    _, labels = case_b()
    row = svls_targets(labels, 3)[0, 1, 1]
    expected = torch.tensor([0.125, 0.655615, 0.702807, 0.702807, 0.655615, 0.125])
    torch.testing.assert_close(row, expected, atol=TOL, rtol=0)
    _, labels_e = case_e()
    t = svls_targets(labels_e, 2)
    assert torch.allclose(t[0, 0, 0, 0], torch.tensor(1.0)) and torch.allclose(t.sum(1), torch.ones(1, 12, 12))


# ----------------------------------------------------------------------------------------------------------
# Region-wise loss (METHODS.md section 8)
@pytest.mark.parametrize("case, rw, equal, gradual", [("A", -0.174205, 0.095926, 0.136830),
                                                      ("B", -0.037874, 0.456363, 0.334603),
                                                      ("C", -0.124924, 0.312596, 0.268787)])
def test_region_wise_vectors(case, rw, equal, gradual):
    logits, labels = CASES[case]()
    maps = rrw_maps(labels, logits.shape[1])
    assert float((torch.softmax(logits, 1) * maps).mean()) == pytest.approx(rw, abs=TOL)
    assert value(build_loss("rrw"), case) == pytest.approx(equal, abs=TOL)
    assert value(RegionWiseLoss(mode="gradual", epoch=30), case) == pytest.approx(gradual, abs=TOL)


def test_rrw_maps_case_a_and_degenerate_classes():
    _, labels = case_a()
    s = 0.707107
    cls1 = torch.tensor([[1, 1, 1, 1], [1, -0.5, -0.5, 1], [1, -0.5, -s, -0.5], [1, 1, -0.5, -1]])
    cls0 = torch.tensor([[-1, -s, -s, -1], [-s, 1, 1, -s], [-s, 1, 1, 1], [-1, -s, 1, 1]])
    maps = rrw_maps(labels, 2)[0]
    torch.testing.assert_close(maps[1], cls1, atol=TOL, rtol=0)
    torch.testing.assert_close(maps[0], cls0, atol=TOL, rtol=0)
    full = rrw_maps(torch.zeros(1, 4, 5, dtype=torch.long), 2)[0]
    assert torch.equal(full[0], -torch.ones(4, 5)) and torch.equal(full[1], torch.ones(4, 5))


def test_region_wise_gradual_weight_floor():
    loss = RegionWiseLoss(mode="gradual", epoch=150)
    assert loss.ce_weight == 0.01
    loss.epoch = 30
    assert loss.ce_weight == pytest.approx(0.7)


# ----------------------------------------------------------------------------------------------------------
# Every loss: the shared call contract
def _instances() -> dict[str, torch.nn.Module]:
    made = {name: build_loss(name) for name in LOSSES if name != "calf"}
    made["calf"] = build_loss("calf", foreground_sizes=[10, 30, 50, 60, 70, 75, 80])  # logit branch
    made["acw_per_class"] = ACWLoss(per_class=True)
    made["sdc_volumetric"] = SDCLoss(slicewise_3d=False)
    return made


@pytest.mark.parametrize("name", ["ce", "dicece", "acw", "acw_per_class", "sdc", "sdc_volumetric", "rrw", "calf"])
def test_2d_equals_3d_with_one_slice(name):
    # NACL and SVLS are excluded on purpose: their 3D kernels (3×3×3) differ from the 2D ones by definition.
    logits, labels = case_b()
    loss = _instances()[name]
    assert float(loss(logits[:, :, None], labels[:, None])) == pytest.approx(float(loss(logits, labels)), abs=1e-6)


@pytest.mark.parametrize("name", [*LOSSES, "acw_per_class"])
@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (2, 3, 3, 5, 4)])
def test_scalar_finite_gradient_and_channel_axis(name, shape):
    g = torch.Generator().manual_seed(11)
    z = (3 * torch.randn(*shape, generator=g)).requires_grad_()
    y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    loss = _instances()[name]
    out = loss(z, y)
    out.backward()
    assert out.ndim == 0 and out.dtype == torch.float32 and out.device == z.device
    assert torch.isfinite(out) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with torch.no_grad():
        assert loss(z, y[:, None]).item() == pytest.approx(out.item(), abs=1e-6)
        assert loss(z, y[:, None].float()).item() == pytest.approx(out.item(), abs=1e-6)


@pytest.mark.parametrize("name", [*LOSSES, "acw_per_class"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_half_precision_is_finite_and_close(name, dtype):
    logits, labels = case_b()
    loss = _instances()[name]
    reference = float(loss(logits, labels))
    conv = torch.nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])
    for scale in (1.0, 40.0):  # 40× saturates fp16 softmax if it were computed in fp16
        conv.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            z = conv(logits * scale)  # an autocast layer output, as in training
            out = loss(z, labels)
        out.backward()
        assert z.dtype == dtype and out.dtype == torch.float32 and torch.isfinite(out)
        assert torch.isfinite(conv.weight.grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = loss(conv(logits), labels)
    assert out.item() == pytest.approx(reference, abs=0.05 * (1 + abs(reference)))


@given(st.sampled_from([*LOSSES]), st.integers(1, 2), st.integers(2, 4), st.lists(st.integers(1, 6), min_size=2,
       max_size=3), st.floats(0.1, 30.0), st.integers(0, 10**6))
def test_random_shapes_give_finite_losses(name, b, c, spatial, scale, seed):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(b, c, *spatial, generator=g)).requires_grad_()
    y = torch.randint(0, c, (b, *spatial), generator=g)
    out = _instances()[name](z, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [*LOSSES])
def test_cuda_matches_cpu(name):
    logits, labels = case_c()
    loss = _instances()[name]
    out = loss(logits.cuda(), labels.cuda())
    assert out.device.type == "cuda" and float(out) == pytest.approx(float(loss(logits, labels)), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Errors
def test_build_loss_rejects_unknown_names_and_parameters():
    with pytest.raises(InputError, match="ce, dicece, acw, sdc, nacl, svls, rrw, calf"):
        build_loss("focal")
    with pytest.raises(InputError, match="beta"):
        build_loss("acw", beta=1.5)
    assert isinstance(build_loss("ACW", num_classes=2), ACWLoss)


def test_bad_inputs_raise_clear_errors():
    logits, labels = case_a()
    loss = ACWLoss()
    with pytest.raises(InputError, match="matching logits"):
        loss(logits, labels[:, :3])
    with pytest.raises(InputError, match=r"0\.\.1"):
        loss(logits, labels + 1)
    with pytest.raises(InputError, match="num_classes=3"):
        ACWLoss(num_classes=3)(logits, labels)
    with pytest.raises(InputError, match="non-integer"):
        loss(logits, labels.float() + 0.5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ACWLoss(q=1.5)
    assert torch.equal(logits, case_a()[0])  # inputs untouched
