"""Property tests (hypothesis) for every loss and metric over random shapes, dtypes and values, and a small fuzz
test of the image/segmentation readers with corrupted headers and truncated payloads (issue 6).

Properties are ones a user relies on whatever the data: finite values in the documented range, no change to
the inputs, invariance to the order of cases in a batch, numpy and torch giving the same numbers, and
the known limits (a perfect prediction scores ECE 0, Dice 1, HD95 0). Readers must either return a valid
image or raise ``InputError`` -- never another exception, never silently wrong data. The hypothesis profile
``ci`` (Testing/conftest.py) is derandomized, so a failure reproduces.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from LensSegCalibLib import InputError, metrics
from LensSegCalibLib.io import Geometry, read_image, read_segmentation, write_segmentation, write_volume
from LensSegCalibLib.losses import LOSSES, build_loss

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


@st.composite
def cases(draw: st.DrawFn, max_side: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(logits (B, C, *S) float64, labels (B, *S) int64)`` with 2 or 3 spatial axes."""
    dims = draw(st.sampled_from([2, 3]))
    batch = draw(st.integers(1, 3))
    classes = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(2, max_side), min_size=dims, max_size=dims)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 8.0, 40.0]))  # from near-uniform to saturated softmax
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, (batch, classes, *shape))
    labels = rng.integers(0, classes, (batch, *shape))
    if draw(st.booleans()):  # structured labels: a block of one class (interfaces, boundary bands)
        labels[(slice(None),) + tuple(slice(0, max(1, n // 2)) for n in shape)] = classes - 1
    return logits, labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ============================================================================================ losses
from LensSegCalibLib.losses import CALF_BRANCHES  # noqa: E402

# every loss; CALF once per branch (the branch is chosen from the training set's size statistics)
LOSS_NAMES = sorted(set(LOSSES) - {"calf"}) + [f"calf:{b}" for b in CALF_BRANCHES]


def _loss(name: str):
    base, _, branch = name.partition(":")
    return build_loss(base, branch=branch) if branch else build_loss(base)


LABEL_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.float32]  # MONAI loaders give float labels


@pytest.mark.parametrize("name", LOSS_NAMES)
@FAST
@given(case=cases(), logit_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       label_dtype=st.sampled_from(LABEL_DTYPES))
def test_loss_is_finite_differentiable_and_leaves_inputs_alone(name, case, logit_dtype, label_dtype) -> None:
    logits_np, labels_np = case
    loss = _loss(name)
    logits = torch.tensor(logits_np, dtype=logit_dtype, requires_grad=True)
    labels = torch.tensor(labels_np).to(label_dtype)
    before = (logits.detach().clone(), labels.clone())
    value = loss(logits, labels)
    assert value.ndim == 0 and value.dtype in (torch.float32, torch.float64)
    assert math.isfinite(float(value.detach()))
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert torch.equal(logits.detach(), before[0]) and torch.equal(labels, before[1])


@pytest.mark.parametrize("name", LOSS_NAMES)
@FAST
@given(case=cases())
def test_loss_does_not_depend_on_the_order_of_cases(name, case) -> None:
    logits_np, labels_np = case
    loss = _loss(name)
    logits, labels = torch.tensor(logits_np, dtype=torch.float64), torch.tensor(labels_np)
    order = torch.arange(logits.shape[0]).flip(0)
    a = float(loss(logits, labels))
    b = float(loss(logits[order], labels[order]))
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "nacl"])  # NACL penalises raw logits
@FAST
@given(case=cases(), shift=st.floats(-50, 50))
def test_softmax_losses_ignore_a_constant_added_to_all_logits(name, case, shift) -> None:
    logits_np, labels_np = case
    loss = _loss(name)
    labels = torch.tensor(labels_np)
    a = float(loss(torch.tensor(logits_np), labels))
    b = float(loss(torch.tensor(logits_np + shift), labels))
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=10, deadline=None)
@given(case=cases(max_side=4), bad=st.sampled_from(["label too big", "negative label", "fractional label",
                                                    "shape mismatch", "integer logits"]))
def test_loss_refuses_bad_labels_and_logits_with_input_error(name, case, bad) -> None:
    logits_np, labels_np = case
    logits, labels = torch.tensor(logits_np, dtype=torch.float32), torch.tensor(labels_np)
    if bad == "label too big":
        labels = labels.clone()
        labels.view(-1)[0] = logits.shape[1]
    elif bad == "negative label":
        labels = labels.clone()
        labels.view(-1)[-1] = -1
    elif bad == "fractional label":
        labels = labels.float() + 0.5
    elif bad == "shape mismatch":
        labels = labels[..., :-1]
    else:
        logits = logits.round().long()
    with pytest.raises(InputError):
        _loss(name)(logits, labels)


# ============================================================================================ metrics
@FAST
@given(case=cases(), prob_dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       label_dtype=st.sampled_from([np.int64, np.int32, np.uint8, np.int16]))
def test_calibration_metrics_lie_in_their_ranges_and_leave_inputs_alone(case, prob_dtype, label_dtype) -> None:
    logits, labels_i = case
    probs = _softmax(logits).astype(prob_dtype)
    labels = labels_i.astype(label_dtype)
    before = (probs.copy(), labels.copy())
    ece = metrics.ece(probs, labels, reduction="none")
    cw = metrics.classwise_ece(probs, labels, reduction="none")
    nll = metrics.nll(probs, labels, reduction="none")
    brier = metrics.brier(probs, labels, reduction="none")
    pece = metrics.pece(probs, labels, reduction="none")
    for values, lo, hi in ((ece, 0, 1), (cw, 0, 1), (nll, 0, -math.log(1e-12) + 1e-9), (brier, 0, 2 + 1e-6),
                           (pece, 0, 3 + 1e-6)):
        values = np.asarray(values, dtype=float)
        assert values.shape == (labels.shape[0],)
        assert np.all(np.isfinite(values)) and np.all(values >= -1e-12) and np.all(values <= hi), values
    np.testing.assert_array_equal(probs, before[0])
    np.testing.assert_array_equal(labels, before[1])


@FAST
@given(case=cases())
def test_metrics_give_the_same_numbers_for_numpy_and_torch_and_any_case_order(case) -> None:
    logits, labels = case
    probs = _softmax(logits)
    order = np.arange(labels.shape[0])[::-1].copy()
    for fn in (metrics.ece, metrics.classwise_ece, metrics.nll, metrics.brier, metrics.pece):
        a = np.asarray(fn(probs, labels, reduction="none"))
        b = np.asarray(fn(torch.from_numpy(probs), torch.from_numpy(labels), reduction="none"))
        c = np.asarray(fn(probs[order], labels[order], reduction="none"))
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-6, err_msg=fn.__name__)
        np.testing.assert_allclose(c, a[order], rtol=0, atol=2e-6, err_msg=fn.__name__)


@FAST
@given(case=cases())
def test_one_hot_correct_predictions_are_perfectly_calibrated(case) -> None:
    _, labels = case
    classes = int(labels.max()) + 1
    assume(classes >= 2)
    probs = np.moveaxis(np.eye(classes)[labels], -1, 1)  # (B, C, *S) one-hot of the labels
    assert metrics.ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.classwise_ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.brier(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.nll(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.pece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    bece = metrics.bece(probs, labels)
    assert math.isnan(bece) or bece == pytest.approx(0.0, abs=1e-12)  # NaN: no interface at all


@FAST
@given(case=cases(), spacing_scale=st.floats(0.05, 4.0),
       label_dtype=st.sampled_from([np.uint8, np.int16, np.int32, np.int64, np.uint16]))
def test_overlap_and_surface_metrics_lie_in_their_ranges(case, spacing_scale, label_dtype) -> None:
    logits, ref = case
    pred = logits.argmax(axis=1).astype(label_dtype)
    ref = ref.astype(label_dtype)
    before = (pred.copy(), ref.copy())
    classes = logits.shape[1]
    spacing = tuple(spacing_scale * (k + 1) for k in range(ref.ndim - 1))
    dice = metrics.dice(pred, ref, classes, reduction="none")
    iou = metrics.iou(pred, ref, classes, reduction="none")
    assert dice.shape == (ref.shape[0], classes - 1)
    assert np.all((dice >= 0) & (dice <= 1)) and np.all((iou >= 0) & (iou <= 1))
    np.testing.assert_allclose(iou, dice / (2 - dice), atol=1e-12)  # J = D / (2 - D) for every class
    hd = metrics.hd95(pred, ref, classes, spacing, reduction="none")
    assd = metrics.assd(pred, ref, classes, spacing, reduction="none")
    extent = math.sqrt(sum((n * s) ** 2 for n, s in zip(ref.shape[1:], spacing)))
    for values in (hd, assd):  # NaN (one side empty) or a distance within the image's diagonal
        finite = values[np.isfinite(values)]
        assert np.all(finite >= 0) and np.all(finite <= extent + 1e-9)
    # a perfect prediction: Dice 1, HD95 0 wherever the class is present
    assert np.all(metrics.dice(ref, ref, classes, reduction="none") == 1.0)
    hd_self = metrics.hd95(ref, ref, classes, spacing, reduction="none")
    assert np.all(hd_self[np.isfinite(hd_self)] == 0.0)
    np.testing.assert_array_equal(pred, before[0])  # label maps are never modified, whatever their dtype
    np.testing.assert_array_equal(ref, before[1])


METRICS = [metrics.ece, metrics.classwise_ece, metrics.nll, metrics.brier, metrics.pece, metrics.bece]


@pytest.mark.parametrize("fn", METRICS, ids=lambda f: f.__name__)
@settings(max_examples=10, deadline=None)
@given(case=cases(max_side=4), bad=st.sampled_from(["label too big", "negative label", "integer probs",
                                                    "shape mismatch", "no batch axis"]))
def test_metrics_refuse_bad_inputs_with_input_error(fn, case, bad) -> None:
    logits, labels = case
    probs = _softmax(logits)
    if bad == "label too big":
        labels = labels.copy()
        labels.reshape(-1)[0] = probs.shape[1]
    elif bad == "negative label":
        labels = labels.copy()
        labels.reshape(-1)[-1] = -1
    elif bad == "integer probs":
        probs = (probs > 0.5).astype(np.int64)
    elif bad == "shape mismatch":
        labels = labels[..., :-1]
    else:
        probs, labels = probs[0, :, 0], labels[0, 0]  # drops the batch axis of a 2D case
    with pytest.raises(InputError):
        fn(probs, labels)


# ============================================================================================ readers
@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Bytes of small valid files in every format we read (NRRD raw/gzip, NIfTI, NIfTI-gz, MHA, .seg.nrrd)."""
    d = tmp_path_factory.mktemp("fuzz-src")
    geo = Geometry((0.5, 0.02, 0.03), (1.0, 2.0, 3.0))
    img = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)
    out = {}
    for name, compress in (("raw.nrrd", False), ("gz.nrrd", True), ("plain.nii", False), ("gz.nii.gz", True),
                           ("img.mha", False)):
        out[name] = write_volume(d / name, img, geo, compress=compress).read_bytes()
    labels = (img % 3).astype(np.uint8)
    classes = [{"value": v, "key": k, "name": k.title(), "color": [v * 60, 0, 0]}
               for v, k in enumerate(["background", "cortex", "nucleus"])]
    out["ref.seg.nrrd"] = write_segmentation(d / "ref.seg.nrrd", labels, geo, classes).read_bytes()
    return out


def _header_length(name: str, data: bytes) -> int:
    if name.endswith(".nii"):
        return 352
    if name.endswith((".nrrd", ".mha")) and b"\n\n" in data[:2000]:
        return data.index(b"\n\n") + 2
    return min(len(data), 200)  # gzip NIfTI: the compressed stream begins with the header


def _check_read(path: Path, reference: np.ndarray | None) -> None:
    """Reading must give a sane image or an InputError; an untouched header must still give the same voxels."""
    reader = read_segmentation if path.name.endswith(".seg.nrrd") else read_image
    try:
        result = reader(path)
    except InputError as exc:
        assert str(exc).strip(), "empty error message"
        return
    array = result[0] if isinstance(result, tuple) else result.array
    geometry = result[1] if isinstance(result, tuple) else result.geometry
    assert array.size > 0 and array.ndim in (2, 3)
    geometry.validate()  # read_* never returns a zero/negative/non-finite spacing
    if reference is not None and array.shape == reference.shape:
        np.testing.assert_array_equal(array, reference)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["raw.nrrd", "gz.nrrd", "plain.nii", "gz.nii.gz", "img.mha", "ref.seg.nrrd"]),
       data=st.data())
def test_readers_survive_corrupted_headers(image_files, tmp_path_factory, name, data) -> None:
    original = image_files[name]
    buf = bytearray(original)
    end = _header_length(name, original)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        pos = data.draw(st.integers(0, end - 1), label="position")
        buf[pos] = data.draw(st.integers(0, 255), label="byte")
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(bytes(buf))
    _check_read(path, None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["raw.nrrd", "gz.nrrd", "plain.nii", "gz.nii.gz", "img.mha", "ref.seg.nrrd"]),
       fraction=st.floats(0.0, 0.999))
def test_truncated_files_are_refused_never_zero_filled(image_files, tmp_path_factory, name, fraction) -> None:
    """A cut file is refused -- unless only a gzip trailer was lost and every voxel is still exactly right."""
    original = image_files[name]
    cut = int(len(original) * fraction)
    assume(cut < len(original))
    folder = tmp_path_factory.mktemp("trunc")
    (folder / f"whole_{name}").write_bytes(original)
    (folder / name).write_bytes(original[:cut])
    reader = read_segmentation if name.endswith(".seg.nrrd") else read_image
    whole = reader(folder / f"whole_{name}")
    try:
        cut_read = reader(folder / name)
    except InputError:
        return
    assert original[:cut].startswith(original[: len(original) - 8]) and name.endswith(".nrrd"), \
        f"{name} cut to {cut} of {len(original)} bytes was read without an error"
    got = cut_read[0] if isinstance(cut_read, tuple) else cut_read.array
    np.testing.assert_array_equal(got, whole[0] if isinstance(whole, tuple) else whole.array)


@pytest.mark.parametrize("fn", [metrics.ece, metrics.classwise_ece], ids=lambda f: f.__name__)
@settings(max_examples=10, deadline=None)
@given(case=cases(max_side=4))
def test_binned_metrics_refuse_logits_passed_as_probabilities(fn, case) -> None:
    logits, labels = case
    with pytest.raises(InputError, match="probabilities in \\[0, 1\\]"):
        fn(logits * 10 + 3, labels)  # some values far outside [0, 1]: the commonest mistake


@pytest.mark.parametrize("fn", [metrics.nll, metrics.brier, metrics.pece], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["logits", "negative background probability"])
@settings(max_examples=10, deadline=None)
@given(case=cases(max_side=4))
def test_score_metrics_refuse_values_that_are_not_probabilities(fn, kind, case) -> None:
    logits, labels = case
    if kind == "logits":
        probs = logits * 10 + 3  # some values far outside [0, 1]
    else:
        probs = _softmax(logits)
        probs[0, 0].reshape(-1)[0] = -0.5  # class 0 of one voxel: read by all three
    with pytest.raises(InputError, match="probabilities in \\[0, 1\\]"):
        fn(probs, labels)
