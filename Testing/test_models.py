"""Model catalog, sha256-verified safetensors loading, normalisation; the shipped models' quality floors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from LensSegCalibLib.errors import CatalogError, ChecksumError, InputError, ModelError
from LensSegCalibLib.models import (
    DEFAULT_CATALOG,
    build_network,
    load_catalog,
    load_model,
    save_weights,
    sha256_file,
    spec_from_dict,
    update_catalog_entry,
)
from LensSegCalibLib.preprocessing import crop_or_pad, normalize_intensity, resample_to_spacing

TINY_NET = {"name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
            "channels": [4, 8], "strides": [2], "num_res_units": 0}


def _entry(weights_file: str = "tiny.safetensors", sha: str = "0" * 64, nbytes: int = 1) -> dict:
    return {
        "id": "tiny-test", "title": "Tiny", "version": "0.0.1", "task": "asoct-lens", "modality": "AS-OCT",
        "description": "test",
        "classes": [{"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
                    {"value": 1, "key": "cortex", "name": "Lens cortex", "color": [200, 100, 50]},
                    {"value": 2, "key": "nucleus", "name": "Lens nucleus", "color": [50, 100, 200],
                     "terminology": "SCT^12345^Nucleus"}],
        "input": {"spacing_mm": [1.0, 0.02, 0.02], "dims": 2, "mode": "slicewise2d", "patch_size": [32, 32],
                  "normalization": {"kind": "percentile", "lower": 0.5, "upper": 99.5}},
        "network": dict(TINY_NET), "loss": {"name": "ce", "params": {}}, "temperature": 1.3,
        "weights": {"file": weights_file, "sha256": sha, "bytes": nbytes},
    }


@pytest.fixture()
def tiny_catalog(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = build_network(TINY_NET)
    sha, nbytes = save_weights(net, tmp_path / "tiny.safetensors")
    update_catalog_entry(_entry(sha=sha, nbytes=nbytes), tmp_path / "catalog.json")
    return tmp_path / "catalog.json"


def test_safetensors_round_trip_gives_identical_outputs(tiny_catalog: Path) -> None:
    torch.manual_seed(0)
    ref = build_network(TINY_NET).eval()
    cat = load_catalog(tiny_catalog)
    net, spec = load_model("tiny-test", catalog=cat)
    assert not net.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    assert spec.num_classes == 3 and spec.class_names == ["Background", "Lens cortex", "Lens nucleus"]
    assert spec.temperature == pytest.approx(1.3)
    assert spec.weights_path == (tiny_catalog.parent / "tiny.safetensors").resolve()
    assert spec.weights["sha256"] == sha256_file(spec.weights_path)
    assert spec.patch_size == (32, 32) and spec.spacing_mm == (1.0, 0.02, 0.02)


def test_save_weights_returns_hash_and_size_of_the_file(tmp_path: Path) -> None:
    net = build_network(TINY_NET)
    sha, nbytes = save_weights(net, tmp_path / "w.safetensors")
    assert nbytes == os.path.getsize(tmp_path / "w.safetensors")
    assert sha == sha256_file(tmp_path / "w.safetensors")
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no temp file left behind


def test_tampered_weights_raise_checksum_error_naming_file_and_hashes(tiny_catalog: Path) -> None:
    w = tiny_catalog.parent / "tiny.safetensors"
    expected = sha256_file(w)
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as ei:
        load_model("tiny-test", catalog=load_catalog(tiny_catalog))
    msg = str(ei.value)
    assert str(w) in msg and expected in msg and sha256_file(w) in msg


def test_truncated_weights_raise_checksum_error(tiny_catalog: Path) -> None:
    w = tiny_catalog.parent / "tiny.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ChecksumError, match="bytes"):
        load_model("tiny-test", catalog=load_catalog(tiny_catalog))


def test_missing_weights_raise_model_error(tiny_catalog: Path) -> None:
    (tiny_catalog.parent / "tiny.safetensors").unlink()
    with pytest.raises(ModelError, match="not found"):
        load_model("tiny-test", catalog=load_catalog(tiny_catalog))


def test_unknown_id_lists_known_ids(tiny_catalog: Path) -> None:
    with pytest.raises(ModelError, match="tiny-test"):
        load_catalog(tiny_catalog).get("no-such-model")


def test_weights_of_another_architecture_are_refused(tiny_catalog: Path) -> None:
    other = dict(TINY_NET, channels=[8, 16])
    p = tiny_catalog.parent / "tiny.safetensors"
    sha, nbytes = save_weights(build_network(other), p)
    cat = update_catalog_entry(_entry(sha=sha, nbytes=nbytes), tiny_catalog)
    with pytest.raises(ModelError, match="does not fit"):
        load_model("tiny-test", catalog=cat)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda e: e["weights"].update(sha256="XYZ"), "$.models[0].weights.sha256"),
        (lambda e: e["classes"][1].update(color=[300, 0, 0]), "$.models[0].classes[1].color[0]"),
        (lambda e: e["input"].update(mode="whole3d"), "$.models[0].input.mode"),
        (lambda e: e.pop("temperature"), "$.models[0]"),
    ],
)
def test_schema_violation_names_the_failing_field(tmp_path: Path, mutate, field: str) -> None:
    e = _entry(sha="a" * 64, nbytes=10)
    mutate(e)
    p = tmp_path / "catalog.json"
    p.write_text(json.dumps({"catalog_version": 1, "models": [e]}))
    with pytest.raises(CatalogError) as ei:
        load_catalog(p)
    assert f"field {field} " in str(ei.value)


def test_invalid_json_and_missing_catalog_raise_catalog_error(tmp_path: Path) -> None:
    p = tmp_path / "catalog.json"
    p.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        load_catalog(p)
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "nope.json")


def test_class_count_must_match_network_outputs() -> None:
    e = _entry()
    e["network"]["out_channels"] = 4
    with pytest.raises(CatalogError, match="out_channels"):
        spec_from_dict(e)


def test_unknown_network_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="UNet"):
        build_network({"name": "ResNet"})
    with pytest.raises(ModelError, match="unknown parameter"):
        build_network(dict(TINY_NET, depth=3))


def test_dynunet_builds_and_keeps_the_spatial_shape() -> None:
    net = build_network({"name": "DynUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                         "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                         "filters": [4, 8, 16], "norm_name": "instance"})
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 3, 8, 16, 16)


# ---- normalisation -----------------------------------------------------------------------------------------
def test_percentile_normalisation_maps_robust_range_to_minus1_plus1_without_touching_input() -> None:
    img = np.arange(1000, dtype=np.float64).reshape(10, 100)
    img[0, 0] = 1e9  # an outlier must not squash the range
    before = img.copy()
    out = normalize_intensity(img, {"kind": "percentile", "lower": 1.0, "upper": 99.0})
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_array_equal(img, before)
    lo, hi = np.percentile(img, [1.0, 99.0])
    exp = (np.clip((img - lo) / (hi - lo), 0, 1) - 0.5) / 0.5
    np.testing.assert_allclose(out, exp, atol=2e-6)
    assert out.min() == -1.0 and out.max() == 1.0


def test_percentile_normalisation_is_scale_invariant() -> None:
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 10.0, size=(4, 32, 32))
    a = normalize_intensity(img, {"kind": "percentile"})
    b = normalize_intensity(img * 255.0 + 7.0, {"kind": "percentile"})
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_hu_window_known_values_and_nan_handling() -> None:
    img = np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0, np.nan])
    out = normalize_intensity(img, {"kind": "hu_window", "min": -200, "max": 300})
    np.testing.assert_allclose(out, [-1.0, -1.0, 0.0, 1.0, 1.0, -1.0], atol=2e-6)


def test_unknown_normalization_kind_is_an_input_error() -> None:
    with pytest.raises(InputError, match="percentile"):
        normalize_intensity(np.zeros((4, 4)), {"kind": "minmax"})


def test_resample_keeps_extent_and_labels_stay_integral() -> None:
    lab = np.zeros((2, 20, 30), np.uint8)
    lab[:, 5:15, 10:20] = 3
    out = resample_to_spacing(lab, (1.0, 0.1, 0.1), (1.0, 0.05, 0.2), order=0)
    assert out.shape == (2, 40, 15) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 3}
    # the box of 10 x 10 voxels at 0.1 mm = 1 mm x 1 mm stays 1 mm x 1 mm: 20 x 5 voxels
    assert (out[0] == 3).sum() == 20 * 5
    img = np.linspace(0, 1, 30, dtype=np.float32)[None, None, :].repeat(4, 1)
    up = resample_to_spacing(img, (1, 1, 1), (1, 1, 0.5))
    assert up.shape == (1, 4, 60) and up.dtype == np.float32
    assert crop_or_pad(np.ones((3, 3)), (5, 1)).shape == (5, 1)


# ---- the shipped models --------------------------------------------------------------------------------------
# Regression floors on 2 small held-out phantoms each (seeds >= 10000, one with the phantom's "hard" shifts),
# measured inside `visible` as the catalog's held-out metrics are. They sit ~0.05 below what the shipped weights
# reach on exactly these phantoms (AS-OCT 1.5.0: acw 0.810 / 0.882 / 0.945, ce 0.749 / 0.880 / 0.944,
# sdc 0.770 / 0.876 / 0.943; capsule / cortex / nucleus; CT 1.3.0: 0.854 / 0.916 right / left lens), so a broken
# model, loader or preprocessing fails them.
# The issue's floors (ISSUE_FLOORS) are checked on the catalog's stored evaluation of 18 + 30 held-out cases
# (mean over all of them; test_stored_heldout_metrics_...): ACW 1.5.0 0.768 / 0.906 / 0.963, CT 1.3.0
# 0.872 / 0.903. On the 30 hard eyes alone ACW is 0.747 / 0.897 / 0.962 (docs/RESULTS.md).
ISSUE_FLOORS = {
    "asoct-lens-acw": {"capsule": 0.75, "cortex": 0.90, "nucleus": 0.95},
    "ct-lens-acw": {"right_lens": 0.85, "left_lens": 0.85},
}
FLOORS = {
    "asoct-lens-acw": {"capsule": 0.76, "cortex": 0.82, "nucleus": 0.89},
    "asoct-lens-ce": {"capsule": 0.70, "cortex": 0.83, "nucleus": 0.89},
    "asoct-lens-sdc": {"capsule": 0.72, "cortex": 0.83, "nucleus": 0.89},
    "ct-lens-acw": {"right_lens": 0.80, "left_lens": 0.87},
}


def test_shipped_catalog_validates_and_lists_the_required_models() -> None:
    cat = load_catalog()
    assert set(FLOORS) <= set(cat.ids())
    for spec in cat:
        assert spec.weights_path.stat().st_size <= 20 * 1024 * 1024
        assert spec.temperature > 0 and spec.heldout_metrics, spec.id
        assert spec.network["out_channels"] == spec.num_classes
    # CE, ACW and SDC share the recipe: only the loss differs
    a, c, s = (cat.get(f"asoct-lens-{k}").to_dict() for k in ("acw", "ce", "sdc"))
    for d in (a, c, s):
        for k in ("id", "title", "description", "loss", "temperature", "weights", "training", "heldout_metrics"):
            d.pop(k)
    assert a == c == s


def test_stored_heldout_metrics_belong_to_the_shipped_weights_and_meet_the_issue_floors() -> None:
    """The issue's quality floor on the catalog's held-out evaluation (``training.evaluate``, not re-run here):
    mean Dice inside `visible` over all held-out cases, standard and hard together (``heldout_metrics.all``),
    measured on exactly the shipped weights."""
    cat = load_catalog()
    for spec in cat:
        hm = spec.heldout_metrics
        assert hm.get("weights_sha256") == spec.weights["sha256"], f"{spec.id}: metrics of other weights"
        assert hm["sets"]["standard"]["raw"]["cases"] >= 18 and hm["sets"]["hard"]["raw"]["cases"] >= 30, spec.id
        assert hm["temperature"] == pytest.approx(spec.temperature), spec.id
    for model_id, floors in ISSUE_FLOORS.items():
        spec = cat.get(model_id)
        mean = dict(zip(spec.class_keys[1:], spec.heldout_metrics["all"]["raw"]["dice"]))
        for key, floor in floors.items():
            assert mean[key] >= floor, f"{model_id}: held-out mean Dice {key} {mean[key]:.4f} < {floor}"


def test_each_shipped_model_names_the_configs_that_reproduce_it() -> None:
    from LensSegCalibLib.training import load_config

    root = Path(__file__).resolve().parents[1]
    for spec in load_catalog():
        entry = spec.to_dict()
        t = entry["training"]
        cfg = load_config(root / t["config"])
        assert (cfg["model_id"], cfg["version"]) == (entry["id"], entry["version"]), entry["id"]
        for key in ("loss", "network", "input", "classes"):
            assert cfg[key] == entry[key], f"{entry['id']}: config and catalog differ in '{key}'"
        if not cfg.get("temperature_scaling", True):
            assert entry["temperature"] == 1.0, entry["id"]
        stages = [part.split("--config ")[1].split()[0] for part in t["command"].split(" && ")]
        assert stages[-1] == t["config"] and all((root / s).is_file() for s in stages), stages
        # each stage starts from the weights the previous stage writes
        for prev, nxt in zip(stages, stages[1:]):
            prev_cfg, next_cfg = load_config(root / prev), load_config(root / nxt)
            assert next_cfg["init_from"] == f"runs/{prev_cfg['model_id']}/{prev_cfg['model_id']}.safetensors", nxt


@pytest.mark.slow
@pytest.mark.parametrize("model_id", sorted(FLOORS))
def test_shipped_model_loads_verified_and_reaches_its_floor(model_id: str) -> None:
    from LensSegCalibLib.inference import Segmenter
    from LensSegCalibLib.phantom import asoct_volume, ct_head_volume
    from LensSegCalibLib.training.evaluate import evaluate_prediction

    torch.set_num_threads(1)
    net, spec = load_model(model_id)  # verifies size + sha256 first
    assert not net.training
    seg = Segmenter(net, spec, device="cpu")
    if spec.modality == "AS-OCT":
        phantoms = [asoct_volume(10001, shape=(2, 800, 800)), asoct_volume(10101, shape=(2, 800, 800), split="heldout")]
    else:
        phantoms = [ct_head_volume(10001, shape=(40, 160, 256)),
                    ct_head_volume(10101, shape=(40, 160, 256), split="heldout")]
    dices = []
    for ph in phantoms:
        pred = seg.predict(ph.image, ph.spacing, probabilities_dtype=np.float32)
        r = evaluate_prediction(pred.probabilities, ph.labels, ph.visible, ph.spacing,
                                slicewise=spec.mode == "slicewise2d")
        dices.append(r["dice"])
    mean = dict(zip(spec.class_keys[1:], np.mean(dices, axis=0)))
    for key, floor in FLOORS[model_id].items():
        assert mean[key] >= floor, f"{model_id}: mean Dice {key} {mean[key]:.4f} < {floor} ({dices})"
