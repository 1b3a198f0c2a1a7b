"""Segmenter / Prediction: shapes and dtypes, equality with plain MONAI inference, resampling, temperature,
reorientation, progress and cancel, bad inputs, model loading from files, CUDA-OOM fallback logic.

Models here are tiny randomly initialised UNets saved into a temporary catalog (``make_catalog``), so the
tests never depend on the shipped weights. Other test files import ``make_catalog`` from here.
"""
from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from LensSegCalibLib import heatmaps
from LensSegCalibLib.errors import Cancelled, ChecksumError, InputError, ModelError
from LensSegCalibLib.inference import Prediction, Segmenter, resolve_device
from tiny_models import ASOCT_CLASSES, tiny_entry, unet, write_catalog

CT_CLASSES = [
    {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
    {"value": 1, "key": "lens", "name": "Lens", "color": [250, 210, 60]},
]


def make_catalog(folder: Path) -> Path:
    """Write ``catalog.json`` with ``tiny-asoct`` (2D, 4 classes, T = 1.5) and ``tiny-ct`` (3D, 2 classes)."""
    asoct_input = {"spacing_mm": [1.0, 0.1, 0.1], "dims": 2, "mode": "slicewise2d", "patch_size": [64, 64],
                   "normalization": {"kind": "percentile", "lower": 0.5, "upper": 99.5}}
    ct_input = {"spacing_mm": [2.0, 1.0, 1.0], "dims": 3, "mode": "sliding3d", "patch_size": [8, 24, 24],
                "normalization": {"kind": "hu_window", "min": -200, "max": 300}}
    # a visible bias towards foreground so the labels are not all background
    entries = [tiny_entry(folder, "tiny-asoct", net=unet(2, 4), classes=ASOCT_CLASSES, input=asoct_input,
                          temperature=1.5, task="test", foreground_bias=0.3),
               tiny_entry(folder, "tiny-ct", net=unet(3, 2), classes=CT_CLASSES, input=ct_input, modality="CT",
                          task="test", foreground_bias=0.3)]
    return write_catalog(folder, entries)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return make_catalog(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def asoct(catalog) -> Segmenter:
    return Segmenter.from_catalog("tiny-asoct", device="cpu", catalog=catalog)


@pytest.fixture(scope="module")
def ct(catalog) -> Segmenter:
    return Segmenter.from_catalog("tiny-ct", device="cpu", catalog=catalog)


def _volume(shape=(3, 40, 50), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (0.6 * (y**2 + x**2 < 0.4) + 0.1 * rng.random(shape)).astype(np.float32)


def _plain_monai(seg: Segmenter, image: np.ndarray, spacing, model_shape, temperature: float) -> torch.Tensor:
    """Reference pipeline written with plain torch/MONAI: resize, sliding window, softmax(logits/T), resize back."""
    from LensSegCalibLib.preprocessing import normalize_intensity

    x = torch.from_numpy(normalize_intensity(image, seg.spec.normalization))
    cval = -1.0  # normalised 'nothing' for percentile/hu_window with default shift/scale
    with torch.no_grad():
        if seg.spec.mode == "slicewise2d":
            x = F.interpolate(x[:, None], size=model_shape, mode="bilinear", align_corners=False)
            logits = sliding_window_inference(x, list(seg.spec.patch_size), 4, seg.network, overlap=0.25,
                                              mode="gaussian", cval=cval)
            probs = torch.softmax(logits / temperature, dim=1)
            return F.interpolate(probs, size=image.shape[1:], mode="bilinear", align_corners=False).transpose(0, 1)
        x = F.interpolate(x[None, None], size=model_shape, mode="trilinear", align_corners=False)
        logits = sliding_window_inference(x, list(seg.spec.patch_size), 1, seg.network, overlap=0.25,
                                          mode="gaussian", cval=cval)
        probs = torch.softmax(logits / temperature, dim=1)
        return F.interpolate(probs, size=image.shape, mode="trilinear", align_corners=False)[0]


def test_slicewise_prediction_contract_and_plain_monai_equality(asoct):
    image = _volume()
    before = image.copy()
    spacing = (0.5, 0.13, 0.17)  # -> model grid (52, 85) per slice: both directions resampled
    pred = asoct.predict(image, spacing)
    assert isinstance(pred, Prediction)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert pred.labels.dtype == np.uint8 and pred.labels.shape == image.shape
    assert pred.probabilities.dtype == np.float16 and pred.probabilities.shape == (4, *image.shape)
    # float16 maps (7 bytes per voxel with the labels: big volumes fit); confidence = max of the float16 probs
    assert pred.confidence.dtype == np.float16 and pred.entropy.dtype == np.float16
    assert pred.boundary.dtype == np.float16
    np.testing.assert_array_equal(pred.confidence, pred.probabilities.max(axis=0))
    ref = _plain_monai(asoct, image, spacing, (52, 85), 1.5)
    np.testing.assert_allclose(pred.probabilities.astype(np.float32), ref.numpy(), atol=1e-3)  # float16 storage
    p32 = ref.numpy()
    margin = np.sort(p32, axis=0)[-1] - np.sort(p32, axis=0)[-2]
    clear = margin > 1e-4  # argmax of the float32 probabilities on the input grid, away from ties
    np.testing.assert_array_equal(pred.labels[clear], p32.argmax(0)[clear])
    # float16 resolution: half a unit in the last place near 1 is 2^-12
    np.testing.assert_allclose(pred.confidence, p32.max(0), atol=2.5e-4)
    np.testing.assert_allclose(pred.entropy, heatmaps.normalized_entropy(p32), atol=2.5e-4)
    expected_boundary = heatmaps.label_free_boundary_map(pred.labels, pred.entropy, spacing)
    np.testing.assert_array_equal(np.isnan(pred.boundary), np.isnan(expected_boundary))
    band = ~np.isnan(expected_boundary)
    np.testing.assert_array_equal(pred.boundary[band], pred.entropy[band])
    assert pred.band_mm == pytest.approx(2 * 0.13)
    assert pred.model_id == "tiny-asoct" and len(pred.weights_sha256) == 64 and pred.temperature == 1.5
    assert pred.class_names == ["Background", "Lens capsule", "Lens cortex", "Lens nucleus"]


def test_sliding3d_prediction_equals_plain_monai_trilinear(ct):
    image = (_volume((10, 30, 36), seed=1) * 400 - 100).astype(np.int16)  # int16 HU
    spacing = (3.0, 0.8, 0.7)  # -> model grid (15, 24, 25)
    pred = ct.predict(image, spacing, probabilities_dtype=np.float32)
    assert pred.probabilities.dtype == np.float32
    ref = _plain_monai(ct, image.astype(np.float32), spacing, (15, 24, 25), 1.0).numpy()
    np.testing.assert_allclose(pred.probabilities, ref, atol=2e-6)
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)


def test_temperature_is_applied_and_can_be_disabled(asoct):
    image = _volume((2, 64, 64))
    spacing = (1.0, 0.1, 0.1)  # already the model grid: no resampling, the relation is exact
    scaled = asoct.predict(image, spacing, probabilities_dtype=np.float32)
    plain = asoct.predict(image, spacing, probabilities_dtype=np.float32, apply_temperature=False)
    assert plain.temperature == 1.0 and scaled.temperature == 1.5
    log_ratio_scaled = np.log(scaled.probabilities[1]) - np.log(scaled.probabilities[0])
    log_ratio_plain = np.log(plain.probabilities[1]) - np.log(plain.probabilities[0])
    np.testing.assert_allclose(log_ratio_scaled, log_ratio_plain / 1.5, atol=1e-4)
    np.testing.assert_array_equal(scaled.labels, plain.labels)  # temperature never changes the argmax


def test_mirror_tta_is_the_normalised_geometric_mean_and_mirror_equivariant(catalog, tmp_path):
    asoct_input = {"spacing_mm": [1.0, 0.1, 0.1], "dims": 2, "mode": "slicewise2d", "patch_size": [64, 64],
                   "normalization": {"kind": "percentile", "lower": 0.5, "upper": 99.5}, "tta_flip_axes": [1]}
    cat = write_catalog(tmp_path, [tiny_entry(tmp_path, "tiny-mirror", net=unet(2, 4), classes=ASOCT_CLASSES,
                                              input=asoct_input, task="test", foreground_bias=0.3)])
    plain = Segmenter.from_catalog("tiny-mirror", device="cpu", catalog=cat)
    tta = Segmenter.from_catalog("tiny-mirror", device="cpu", catalog=cat, mirror_tta=True)
    image = _volume((2, 64, 64), seed=3)
    image[:, :, :20] += 0.3  # not mirror-symmetric
    spacing = (1.0, 0.1, 0.1)  # the model grid and one window: no resampling, so the relations are exact
    a = plain.predict(image, spacing, probabilities_dtype=np.float32).probabilities
    b = plain.predict(image[..., ::-1].copy(), spacing, probabilities_dtype=np.float32).probabilities[..., ::-1]
    pred = tta.predict(image, spacing, probabilities_dtype=np.float32)
    assert pred.mirror_tta and not plain.predict(image, spacing).mirror_tta
    # mean of the logits = softmax of the mean log-probabilities = normalised geometric mean of the two passes
    g = np.sqrt(a * b)
    np.testing.assert_allclose(pred.probabilities, g / g.sum(0, keepdims=True), atol=1e-5)
    assert np.abs(a - b).max() > 1e-3  # the two passes differ, so the check above is not trivial
    mirrored = tta.predict(image[..., ::-1].copy(), spacing, probabilities_dtype=np.float32)
    np.testing.assert_allclose(mirrored.probabilities[..., ::-1], pred.probabilities, atol=1e-5)
    with pytest.raises(ModelError, match="right and left"):  # CT: mirroring would swap the lenses
        Segmenter.from_catalog("tiny-ct", device="cpu", catalog=catalog, mirror_tta=True)


def test_ct_reorients_a_permuted_flipped_volume(ct):
    image = (_volume((12, 30, 26), seed=2) * 400 - 100).astype(np.float32)
    spacing = (2.0, 0.9, 0.8)
    base = ct.predict(image, spacing, direction=np.eye(3), probabilities_dtype=np.float32)
    # The same patient stored with axes (x, z, y) and x reversed: array axes (k, j, i) = (X, Z, Y) flipped.
    stored = np.ascontiguousarray(np.flip(image.transpose(2, 0, 1), axis=0))
    stored_spacing = (0.8, 2.0, 0.9)
    # direction columns = LPS direction of i, j, k: i runs along +y (P), j along +z (S), k along -x (-L)
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], dtype=float)
    moved = ct.predict(stored, stored_spacing, direction=direction, probabilities_dtype=np.float32)
    back = np.flip(moved.labels, axis=0).transpose(1, 2, 0)
    np.testing.assert_array_equal(back, base.labels)
    np.testing.assert_allclose(np.flip(moved.confidence, axis=0).transpose(1, 2, 0), base.confidence, atol=1e-6)


def test_2d_image_runs_on_a_slicewise_model_and_is_refused_by_a_3d_model(asoct, ct):
    image = _volume((1, 40, 50))[0]
    pred = asoct.predict(image, (0.12, 0.12))
    assert pred.labels.shape == (40, 50) and pred.probabilities.shape == (4, 40, 50)
    with pytest.raises(InputError, match="3D"):
        ct.predict(image, (1.0, 1.0))


def test_progress_is_monotone_and_ends_at_one(asoct):
    seen: list[tuple[float, str]] = []
    asoct.predict(_volume((6, 40, 50)), (0.5, 0.05, 0.05), progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert any("slices" in m for _, m in seen) and len(seen) > 4


def test_cancel_before_start_and_during_patches(ct):
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        ct.predict(np.zeros((8, 24, 24), np.float32), (2.0, 1.0, 1.0), cancel=event)
    event = threading.Event()
    stamps: list[float] = []

    def progress(fraction: float, message: str) -> None:
        if fraction > 0.1 and not event.is_set():
            event.set()
            stamps.append(time.perf_counter())

    with pytest.raises(Cancelled, match="cancelled"):
        ct.predict((_volume((40, 60, 60)) * 300).astype(np.float32), (2.0, 1.0, 1.0), cancel=event,
                   progress=progress)
    assert stamps and time.perf_counter() - stamps[0] < 1.0


def test_cancel_from_another_thread_within_a_second(asoct):
    event = threading.Event()
    set_at: list[float] = []

    def fire() -> None:
        set_at.append(time.perf_counter())
        event.set()

    timer = threading.Timer(0.05, fire)
    started: list[bool] = []

    def progress(fraction: float, message: str) -> None:
        # start the clock once the run is under way (first report), so that a fast machine cannot finish the
        # volume before the other thread cancels; 200 B-scans take well over 0.05 s on any CPU
        if not started:
            started.append(True)
            timer.start()

    try:
        with pytest.raises(Cancelled):
            asoct.predict(_volume((200, 80, 80)), (0.5, 0.05, 0.05), cancel=event, progress=progress)
        assert set_at and time.perf_counter() - set_at[0] < 1.0
    finally:
        timer.cancel()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64])
def test_integer_and_double_inputs(asoct, dtype):
    image = (_volume((2, 32, 32)) * 200).astype(dtype)
    pred = asoct.predict(image, (1.0, 0.1, 0.1))
    assert np.isfinite(pred.confidence).all() and pred.labels.max() < 4


def test_constant_and_nan_volumes_give_finite_maps(asoct):
    const = asoct.predict(np.full((2, 32, 32), 7.0, np.float32), (1.0, 0.1, 0.1))
    assert np.isfinite(const.probabilities.astype(np.float32)).all()
    bad = _volume((2, 32, 32))
    bad[0, :4, :4] = np.nan
    bad[1, 5, 5] = np.inf
    with pytest.warns(RuntimeWarning, match="NaN"):
        pred = asoct.predict(bad, (1.0, 0.1, 0.1))
    assert np.isfinite(pred.confidence).all() and np.isfinite(pred.entropy).all()


@pytest.mark.parametrize(
    "image, spacing, fragment",
    [
        (np.zeros((0, 4, 4), np.float32), (1, 1, 1), "empty"),
        (np.zeros((2, 3, 4, 4), np.float32), (1, 1, 1, 1), "4D"),
        (np.zeros((2, 8, 8), np.complex64), (1, 1, 1), "dtype"),
        (np.zeros((2, 8, 8), np.float32), (1, 0, 1), "spacing"),
        (np.zeros((2, 8, 8), np.float32), (1, -1, 1), "spacing"),
        (np.zeros((2, 8, 8), np.float32), (1, np.nan, 1), "spacing"),
        (np.zeros((2, 8, 8), np.float32), (1, 1), "spacing"),
        (np.zeros((2, 8, 8), np.float32), None, "spacing is required"),
    ],
)
def test_bad_inputs_raise_input_error(asoct, image, spacing, fragment):
    with pytest.raises(InputError, match=fragment):
        asoct.predict(image, spacing)


def test_bad_direction_is_refused(ct):
    with pytest.raises(InputError, match="direction"):
        ct.predict(np.zeros((8, 24, 24), np.float32), (1, 1, 1), direction=np.ones((3, 3)))


def test_from_file_variants_and_tampered_weights(catalog, tmp_path):
    seg = Segmenter.from_file(catalog, device="cpu", model_id="tiny-ct")
    assert seg.model_id == "tiny-ct"
    with pytest.raises(ModelError, match="model_id"):
        Segmenter.from_file(catalog, device="cpu")  # two models: which one?
    entry = next(m for m in json.loads(catalog.read_text())["models"] if m["id"] == "tiny-asoct")
    folder = tmp_path / "single"
    folder.mkdir()
    weights = folder / "tiny-asoct.safetensors"
    weights.write_bytes((catalog.parent / "tiny-asoct.safetensors").read_bytes())
    (folder / "tiny-asoct.json").write_text(json.dumps(entry))
    assert Segmenter.from_file(weights, device="cpu").model_id == "tiny-asoct"
    assert Segmenter.from_file(folder / "tiny-asoct.json", device="cpu").model_id == "tiny-asoct"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        Segmenter.from_file(weights, device="cpu")
    with pytest.raises(ModelError, match="Unknown model id"):
        Segmenter.from_catalog("no-such-model", device="cpu", catalog=catalog)


def test_device_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="device"):
        resolve_device("tpu")


def test_cuda_oom_halves_the_batch_then_falls_back_to_cpu(catalog):
    seg = Segmenter.from_catalog("tiny-ct", device="cpu", catalog=catalog, sw_batch_size=2)
    oom = torch.OutOfMemoryError("simulated")
    seg.device = torch.device("cuda")  # pretend the run was on a GPU (the logic only looks at the type)
    with pytest.warns(RuntimeWarning, match="batch size 1"):
        seg._fallback(oom)
    assert seg.batch_size == 1 and seg.device.type == "cuda"
    with pytest.warns(RuntimeWarning, match="CPU"):
        seg._fallback(oom)
    assert seg.device.type == "cpu" and next(seg.network.parameters()).device.type == "cpu"
    with pytest.raises(ModelError, match="Out of memory"):  # on the CPU there is nowhere left to go
        seg._fallback(oom)


def test_oom_during_inference_retries_and_finishes(catalog, monkeypatch):
    seg = Segmenter.from_catalog("tiny-asoct", device="cpu", catalog=catalog, sw_batch_size=4)
    forward = seg.network.forward
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("simulated")
        return forward(x)

    monkeypatch.setattr(seg.network, "forward", flaky)
    fallbacks: list[str] = []
    monkeypatch.setattr(seg, "_fallback", lambda exc: fallbacks.append(str(exc)))
    image = _volume((2, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = seg.predict(image, (1.0, 0.1, 0.1))
    assert fallbacks == ["simulated"] and pred.labels.shape == image.shape


def test_same_input_gives_identical_outputs_on_cpu(asoct):
    image = _volume()
    a = asoct.predict(image, (0.5, 0.1, 0.1))
    b = asoct.predict(image, (0.5, 0.1, 0.1))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)


def test_probabilities_can_be_skipped_to_save_memory(asoct):
    image = _volume((2, 32, 32))
    lean = asoct.predict(image, (1.0, 0.1, 0.1), probabilities_dtype=None)
    full = asoct.predict(image, (1.0, 0.1, 0.1))
    assert lean.probabilities is None and lean.num_classes == 4
    np.testing.assert_array_equal(lean.labels, full.labels)
    np.testing.assert_array_equal(lean.confidence, full.confidence)


@pytest.mark.parametrize("normalization", [
    {"kind": "percentile", "lower": 0.5, "upper": 99.5}, {"kind": "hu_window", "min": -200, "max": 300},
    {"kind": "zscore"}, {"kind": "none"}])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_slab_normalisation_equals_whole_volume_normalisation(normalization, dtype) -> None:
    """Big B-scan stacks are normalised slab by slab with whole-volume statistics: the values must not change."""
    from LensSegCalibLib.preprocessing import apply_normalization, normalization_parameters, normalize_intensity

    rng = np.random.default_rng(3)
    image = rng.normal(100, 80, (7, 33, 41)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        image[2, 5, :3] = [np.nan, np.inf, -np.inf]  # non-finite voxels go to the low end either way
    before = image.copy()
    whole = normalize_intensity(image, normalization)
    params = normalization_parameters(image, normalization)
    slabs = np.concatenate([apply_normalization(image[z:z + 3], params) for z in range(0, 7, 3)])
    np.testing.assert_array_equal(slabs, whole)
    np.testing.assert_array_equal(image, before)
    assert whole.dtype == np.float32 and np.all(np.isfinite(whole))
