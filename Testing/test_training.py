"""Training pipeline: temperature scaling, patch sampling, a few steps that lower the loss, resume, seeds, DDP."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from LensSegCalibLib.errors import InputError
from LensSegCalibLib.models import load_catalog, load_model
from LensSegCalibLib.training import fit_temperature, load_config, train_from_config
from LensSegCalibLib.training.data import (PatchSampler, degrade_resolution, prepare_volume, rotate_scale_patch,
                                           toy_volume)
from LensSegCalibLib.training.temperature import temperature_nll
from LensSegCalibLib.training.trainer import register_model

TOY = "LensSegCalibLib.training.data:toy_volume"


def _config(tmp: Path, loss: str = "ce", **optim) -> dict:
    return {
        "model_id": "toy-test", "title": "Toy", "task": "asoct-lens", "modality": "AS-OCT",
        "classes": [{"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
                    {"value": 1, "key": "capsule", "name": "Capsule", "color": [255, 0, 0]},
                    {"value": 2, "key": "cortex", "name": "Cortex", "color": [0, 255, 0]},
                    {"value": 3, "key": "nucleus", "name": "Nucleus", "color": [0, 0, 255]}],
        "input": {"spacing_mm": [1.0, 0.1, 0.1], "dims": 2, "mode": "slicewise2d", "patch_size": [32, 32],
                  "normalization": {"kind": "percentile", "lower": 0.5, "upper": 99.5}},
        "network": {"name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 4,
                    "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "loss": {"name": loss, "params": {}},
        "data": {"generator": TOY, "train_seeds": [0, 1, 2], "val_seeds": [100], "cache_dir": str(tmp / "cache"),
                 "flip_axes": [1]},
        "optim": {"epochs": 2, "steps_per_epoch": 12, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, **optim},
        "output": {"dir": str(tmp / "run")},
    }


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ---- temperature scaling ---------------------------------------------------------------------------------
def test_fit_temperature_recovers_known_overconfidence() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(60_000, 4, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]  # labels drawn from softmax(z): T = 1
    t = fit_temperature(z * 2.0, y)  # logits twice too sharp -> T = 2
    assert t == pytest.approx(2.0, abs=0.05)
    nll = temperature_nll(z * 2.0, y, t)
    assert nll < temperature_nll(z * 2.0, y, t * 1.1) and nll < temperature_nll(z * 2.0, y, t / 1.1)
    assert nll < temperature_nll(z * 2.0, y, 1.0) - 0.05


def test_fit_temperature_accepts_volumes_and_masks() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 40, 40, generator=g)
    y = torch.softmax(z, 1).argmax(1)
    mask = torch.zeros(2, 40, 40, dtype=torch.bool)
    mask[:, :20] = True
    t_all, t_half = fit_temperature(z, y), fit_temperature(z, y, mask=mask)
    zf = z.movedim(1, -1)[mask]
    assert t_half == pytest.approx(fit_temperature(zf, y[mask]), rel=1e-4)
    assert t_all < 1.0  # labels = argmax: the model is under-confident, T < 1 sharpens


# ---- data --------------------------------------------------------------------------------------------------
def test_heldout_seeds_are_refused_for_training(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg["data"]["val_seeds"] = [10001]
    with pytest.raises(InputError, match="10000"):
        load_config(cfg)
    with pytest.raises(InputError, match="reserved"):
        prepare_volume(TOY, 10000, shape=None, variation={}, spacing_mm=None,
                       normalization={"kind": "none"}, cache_dir=None)


def test_cache_round_trip_and_sampler_keeps_image_and_labels_aligned(tmp_path: Path) -> None:
    kw = dict(shape=(2, 48, 48), variation={"noise": 0.0}, spacing_mm=None, normalization={"kind": "none"},
              cache_dir=tmp_path)
    v1 = prepare_volume(TOY, 3, **kw)
    v2 = prepare_volume(TOY, 3, **kw)  # from the cache (memory-mapped)
    assert isinstance(v2.image, np.memmap)
    np.testing.assert_array_equal(np.asarray(v1.image), np.asarray(v2.image))
    np.testing.assert_array_equal(np.asarray(v2.labels), toy_volume(3, shape=(2, 48, 48)).labels)
    sampler = PatchSampler([v2], (24, 24), fg_fraction=1.0, flip_axes=(1,), augment=None)
    levels = {0: 0.0, 1: 0.9, 2: 0.65, 3: 0.4}  # toy intensities per label (noise 0)
    x, y, sdf = sampler.sample(np.random.default_rng(0), 16)
    assert x.shape == (16, 1, 24, 24) and y.shape == (16, 24, 24) and sdf is None
    inside = x[:, 0] != -1.0  # -1 = padding outside the volume
    for c, lev in levels.items():
        np.testing.assert_allclose(x[:, 0][(y == c) & inside], lev, atol=1e-6)
    assert (y > 0).mean() > 0.3  # foreground-centred patches


def test_sampler_is_reproducible_per_seed(tmp_path: Path) -> None:
    v = prepare_volume(TOY, 1, shape=None, variation={}, spacing_mm=None, normalization={"kind": "percentile"},
                       cache_dir=None)
    s = PatchSampler([v], (16, 16), augment={"p": 1.0})
    a = s.sample(np.random.default_rng([0, 1, 0]), 4)
    b = s.sample(np.random.default_rng([0, 1, 0]), 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_degrade_resolution_blurs_keeps_edges_registered_and_coarsens_noise() -> None:
    # a vertical step edge between columns 19 and 20 of a 64 x 64 patch (0.5-crossing at x = 19.5; off-centre,
    # so a resampling that is not corner-aligned would move it)
    x = np.zeros((64, 64), np.float32)
    x[:, 20:] = 1.0
    for seed in range(5):
        y = degrade_resolution(x, np.random.default_rng(seed), {"scale": [0.4, 0.6]})
        assert y.shape == x.shape and y.dtype == np.float32
        row = y[32]
        cross = np.flatnonzero(np.diff(np.sign(row - 0.5)))[0]
        pos = cross + (0.5 - row[cross]) / (row[cross + 1] - row[cross])  # linear 0.5-crossing
        assert abs(pos - 19.5) < 0.2, pos  # no systematic shift against the (unresampled) labels
        assert 0.02 < row[19] < 0.5 < row[20] < 0.98  # the edge is blurred
    np.testing.assert_allclose(degrade_resolution(np.full((40, 30), 0.3, np.float32), np.random.default_rng(0),
                                                  {}), 0.3, atol=1e-6)  # flat stays flat
    # white noise added on the coarse grid comes back coarse-grained: neighbouring pixels correlate
    noisy = degrade_resolution(np.zeros((96, 96), np.float32), np.random.default_rng(1), {"scale": [0.5, 0.5]},
                               at_low_res=lambda a: a + np.random.default_rng(2).normal(0, 1, a.shape))
    corr = np.corrcoef(noisy[:, :-1].ravel(), noisy[:, 1:].ravel())[0, 1]
    assert corr > 0.4, corr
    with pytest.raises(InputError, match="lowres.scale"):
        degrade_resolution(x, np.random.default_rng(0), {"scale": [0.05, 1.0]})


def test_sampler_lowres_keeps_labels_and_is_off_by_default(tmp_path: Path) -> None:
    v = prepare_volume(TOY, 2, shape=(2, 64, 64), variation={"noise": 0.0}, spacing_mm=None,
                       normalization={"kind": "none"}, cache_dir=None)
    plain = PatchSampler([v], (32, 32), fg_fraction=1.0, augment={"p": 1.0})
    off = PatchSampler([v], (32, 32), fg_fraction=1.0, augment={"p": 1.0}, lowres={})
    a, b = plain.sample(np.random.default_rng(3), 6), off.sample(np.random.default_rng(3), 6)
    np.testing.assert_array_equal(a[0], b[0])  # old configs draw exactly the same patches
    big = prepare_volume(TOY, 2, shape=(2, 128, 128), variation={"noise": 0.0}, spacing_mm=None,
                         normalization={"kind": "none"}, cache_dir=None)
    low = PatchSampler([big], (48, 48), fg_fraction=1.0, augment=None, lowres={"p": 1.0, "scale": [0.5, 0.5]})
    xl, yl, _ = low.sample(np.random.default_rng(4), 8)
    assert len(np.unique(xl)) > 20  # blurred: many intermediate values (the sharp toy has 4 levels + padding)
    # inside each lens class (4 px from any other label, so also from the padding) the degraded image keeps
    # that class's level: image and labels stay registered (labels are never resampled)
    from scipy import ndimage

    for c, lev in {1: 0.9, 2: 0.65, 3: 0.4}.items():
        core = ndimage.binary_erosion(yl == c, np.ones((1, 9, 9), bool))
        assert core.any()
        np.testing.assert_allclose(xl[:, 0][core], lev, atol=0.02)


def test_rotate_scale_patch_moves_image_and_labels_together_and_keeps_the_capsule_closed() -> None:
    from scipy import ndimage

    w = 130
    yy, xx = np.mgrid[:w, :w].astype(float)
    lab = np.zeros((w, w), np.uint8)
    r = np.hypot(yy - 72.0, (xx - 62.0) * 0.8)  # off-centre ellipse: a wrong rotation sense would show
    lab[r < 30] = 2
    lab[(r >= 30) & (r < 32)] = 1  # a 2-pixel capsule ring
    lab[r < 12] = 3
    lab[100:110, 100:115] = 3  # an asymmetric block outside the ring
    img = np.array([0.0, 0.9, 0.5, 0.2], np.float32)[lab]
    # no rotation, no scaling: exactly the central crop
    i0, l0 = rotate_scale_patch(img, lab, np.random.default_rng(0), {"rotate_deg": 0, "scale": [1, 1]}, (96, 96))
    np.testing.assert_array_equal(l0, lab[17:113, 17:113])
    np.testing.assert_allclose(i0, img[17:113, 17:113], atol=1e-6)
    for seed in range(4):
        im, lb = rotate_scale_patch(img, lab, np.random.default_rng(seed), {"rotate_deg": 15, "scale": [0.95, 1.15]},
                                    (96, 96))
        assert lb.dtype == np.uint8 and im.dtype == np.float32 and im.shape == lb.shape == (96, 96)
        for c, lev in enumerate([0.0, 0.9, 0.5, 0.2]):  # registered: the image shows each label's level inside it
            core = ndimage.binary_erosion(lb == c, np.ones((3, 3), bool))
            if core.any():
                np.testing.assert_allclose(im[core], lev, atol=1e-5)
        caps = ndimage.binary_dilation(lb == 1)  # a closed band: one component that separates cortex from outside
        assert ndimage.label(caps)[1] == 1
        outside = ndimage.label(lb != 1)[0]
        assert set(np.unique(outside[lb == 2])).isdisjoint(np.unique(outside[lb == 0]))
    with pytest.raises(InputError, match="spatial.scale"):
        rotate_scale_patch(img, lab, np.random.default_rng(0), {"scale": [0.2, 1.0]}, (96, 96))


def test_sampler_spatial_augmentation_is_reproducible_and_aligned(tmp_path: Path) -> None:
    from scipy import ndimage

    v = prepare_volume(TOY, 2, shape=(2, 128, 128), variation={"noise": 0.0}, spacing_mm=None,
                       normalization={"kind": "none"}, cache_dir=None)
    s = PatchSampler([v], (48, 48), fg_fraction=1.0, augment=None, spatial={"p": 1.0, "rotate_deg": 20})
    a, b = s.sample(np.random.default_rng(5), 6), s.sample(np.random.default_rng(5), 6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    x, y, _ = a
    for c, lev in {1: 0.9, 2: 0.65, 3: 0.4}.items():
        core = ndimage.binary_erosion(y == c, np.ones((1, 3, 3), bool))
        assert core.any()
        np.testing.assert_allclose(x[:, 0][core], lev, atol=1e-5)


def test_sampler_hidden_mask_moves_with_the_labels_and_keeps_the_same_draws(tmp_path: Path) -> None:
    from scipy import ndimage

    v = prepare_volume(TOY, 2, shape=(2, 96, 96), variation={"noise": 0.0, "shadow": 0.4}, spacing_mm=None,
                       normalization={"kind": "none"}, cache_dir=tmp_path)
    assert not np.asarray(v.visible)[..., -10:].any() and np.asarray(v.visible)[..., :40].all()
    s = PatchSampler([v], (40, 40), fg_fraction=0.8, flip_axes=(1,), augment=None,
                     spatial={"p": 0.5, "rotate_deg": 20})
    x0, y0, _ = s.sample(np.random.default_rng(7), 12)
    x, y, sdf, hid = s.sample(np.random.default_rng(7), 12, with_hidden=True)
    np.testing.assert_array_equal(x0, x)  # asking for the mask changes no draw
    np.testing.assert_array_equal(y0, y)
    assert sdf is None and hid.dtype == bool and hid.shape == y.shape
    assert (hid & (y > 0)).sum() > 100 and (~hid & (y > 0)).sum() > 100
    # noise 0: the shadow carries no signal, the visible lens does; compare away from the interpolated edges
    inside = x[:, 0] != -1.0  # -1 = padding outside the volume
    core_hidden = ndimage.binary_erosion(hid, np.ones((1, 3, 3), bool)) & inside
    core_lens = ndimage.binary_erosion(~hid & (y > 0), np.ones((1, 3, 3), bool)) & inside
    np.testing.assert_allclose(x[:, 0][core_hidden], 0.0, atol=1e-5)
    assert x[:, 0][core_lens].min() > 0.39


def test_hidden_penalty_has_the_stated_optimum_and_spares_visible_and_far_voxels() -> None:
    import torch.nn.functional as F

    from LensSegCalibLib.training.trainer import hidden_confidence_penalty

    y = torch.full((1, 1, 1), 2, dtype=torch.long)
    hid = torch.ones(1, 1, 1, dtype=torch.bool)
    for w in (0.5, 1.0, 3.0):  # CE + w * penalty on one hidden lens voxel: p_true = (1 + w / C) / (1 + w)
        z = torch.zeros(1, 4, 1, 1, requires_grad=True)
        opt = torch.optim.LBFGS([z], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z, y) + w * hidden_confidence_penalty(z, y, hid, margin_px=0)
            loss.backward()
            return loss

        opt.step(closure)
        p = torch.softmax(z.detach(), 1)[0, :, 0, 0]
        assert float(p[2]) == pytest.approx((1 + w / 4) / (1 + w), abs=1e-4)
        assert int(p.argmax()) == 2  # the label is still the argmax
    logits = torch.zeros(1, 4, 32, 32)
    logits[:, 0] = 8.0  # confident everywhere
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, 8:16, 8:16] = 3
    far = torch.zeros(1, 32, 32, dtype=torch.bool)
    far[:, :, 26:] = True  # hidden, but 11 px from the lens (last lens column 15)
    assert float(hidden_confidence_penalty(logits, labels, far, margin_px=10)) == 0.0
    assert float(hidden_confidence_penalty(logits, labels, far, margin_px=11)) > 0.0
    assert float(hidden_confidence_penalty(logits, labels, torch.zeros_like(far), margin_px=30)) == 0.0


def test_hidden_penalty_lowers_confidence_in_the_shadow_only(tmp_path: Path) -> None:
    import json

    from LensSegCalibLib.models import build_network
    from LensSegCalibLib.preprocessing import normalize_intensity

    torch.set_num_threads(1)
    conf = {}
    for name, hp in (("plain", None), ("penalty", {"weight": 3.0, "margin_px": 2})):
        cfg = _config(tmp_path / name, epochs=4, steps_per_epoch=25)
        cfg["data"]["variation"] = {"shadow": 0.3}
        if hp:
            cfg["loss"]["hidden_penalty"] = hp
        weights = train_from_config(cfg, progress=False, device="cpu")
        entry = json.loads((tmp_path / name / "run" / "catalog_entry.json").read_text())
        assert entry["loss"].get("hidden_penalty") == hp  # the catalog says how the model was trained
        net = build_network(cfg["network"]).eval()
        net.load_state_dict(load_file(str(weights)))
        ph = toy_volume(200, shape=(2, 48, 48), shadow=0.3)
        x = torch.from_numpy(normalize_intensity(ph.image, cfg["input"]["normalization"])[:, None])
        with torch.no_grad():
            p = torch.softmax(net(x), 1).numpy()
        top = p.max(1)
        lens, vis = ph.labels > 0, ph.meta["visible"]
        conf[name] = (float(top[lens & ~vis].mean()), float(top[lens & vis].mean()))
    drop_hidden, drop_visible = conf["plain"][0] - conf["penalty"][0], conf["plain"][1] - conf["penalty"][1]
    assert drop_hidden > 0.1 and drop_hidden > 2 * drop_visible, conf  # the shadow is where it gets less sure
    with pytest.raises(InputError, match="hidden_penalty"):
        bad = _config(tmp_path / "bad")
        bad["loss"]["hidden_penalty"] = {"weight": -1}
        train_from_config(bad, progress=False, device="cpu")


def test_per_seed_shape_renders_that_phantom_on_its_own_grid(tmp_path: Path) -> None:
    from LensSegCalibLib.training.trainer import _volumes

    cfg = _config(tmp_path)
    cfg["data"].update(shape=[2, 48, 48], per_seed={"1": {"shape": [2, 24, 32], "noise": 0.0}})
    vols = _volumes(load_config(cfg), "train", rank=0)
    assert [tuple(v.labels.shape) for v in vols] == [(2, 48, 48), (2, 24, 32), (2, 48, 48)]


def test_evaluate_reports_robustness_sets_apart_from_the_heldout_sets() -> None:
    from LensSegCalibLib.models import build_network, spec_from_dict
    from LensSegCalibLib.training.evaluate import ROBUSTNESS_SETS, evaluate_model

    assert ROBUSTNESS_SETS["asoct"][0]["shape"] == [4, 384, 384]
    entry = load_catalog().get("asoct-lens-acw").to_dict()
    entry["network"] = {**entry["network"], "channels": [4, 8], "strides": [2]}
    spec = spec_from_dict(entry)
    torch.manual_seed(0)
    net = build_network(spec.network).eval()
    res = evaluate_model(net, spec, sets=[{"name": "std", "seeds": [10000], "variation": {}}],
                         shape=(1, 64, 64), progress=False, cache_dir=None,
                         robustness=[{"name": "coarse", "seeds": [10000], "variation": {}, "shape": [1, 48, 48]}])
    assert res["all"]["raw"]["cases"] == 1  # the robustness case is not pooled into "all"
    rob = res["robustness"]["coarse"]
    assert rob["shape"] == [1, 48, 48] and rob["raw"]["cases"] == 1 and len(rob["raw"]["dice"]) == 3
    assert "shape" not in res["sets"]["std"]


# ---- training ----------------------------------------------------------------------------------------------
def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``folder``: ``{tag: [(step, value), ...]}``.

    Read record by record (uint64 length, uint32 CRC, Event protobuf, uint32 CRC), so the test checks the file
    format TensorBoard reads, not the writer's own API.
    """
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {folder}"
    for path in files:
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out


@pytest.mark.parametrize("loss", ["acw", "sdc"])
def test_a_few_steps_lower_the_loss_and_produce_a_loadable_model(tmp_path: Path, loss: str) -> None:
    torch.set_num_threads(1)
    cfg = _config(tmp_path, loss)
    weights = train_from_config(cfg, progress=False, device="cpu")
    rows = _csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 2
    assert float(rows[1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert float(rows[1]["mean_dice"]) > 0.3
    # the same per-epoch numbers as TensorBoard scalars (event files from tensorboardX, the `train` extra)
    scalars = _tensorboard_scalars(tmp_path / "run" / "tb")
    for name in ("mean_dice", "ece", "bece", "train_loss", "dice_nucleus"):
        assert [step for step, _ in scalars[name]] == [int(r["step"]) for r in rows], name
        if name in rows[0]:
            np.testing.assert_allclose([v for _, v in scalars[name]], [float(r[name]) for r in rows], rtol=1e-6)
    # register into a private models folder and load it back through the catalog with checksum verification
    import json

    entry = json.loads((tmp_path / "run" / "catalog_entry.json").read_text())
    assert entry["loss"]["name"] == loss and entry["temperature"] > 0
    assert entry["training"]["temperature_fit"]["nll_after"] <= entry["training"]["temperature_fit"]["nll_before"]
    models = tmp_path / "models"
    models.mkdir()
    register_model(weights, entry, models_dir=models)
    net, spec = load_model("toy-test", catalog=load_catalog(models / "catalog.json"))
    assert spec.temperature == pytest.approx(entry["temperature"])
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_resume_gives_bit_identical_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    full = train_from_config(_config(tmp_path / "a"), progress=False, device="cpu")
    cfg = _config(tmp_path / "b", stop_after_epoch=1)
    ck = train_from_config(cfg, progress=False, device="cpu")
    assert ck.name == "checkpoint.pt" and not (tmp_path / "b" / "run" / "toy-test.safetensors").exists()
    resumed = train_from_config(cfg, progress=False, device="cpu")  # same command again: resumes at epoch 2
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(_csv(tmp_path / "b" / "run" / "metrics.csv")) == 2


def test_acw_scheduler_moves_q_by_validation_iou_and_resumes_exactly(tmp_path: Path) -> None:
    import json

    from LensSegCalibLib.losses import ACWThresholdScheduler

    torch.set_num_threads(1)

    def cfg(sub: str, **optim) -> dict:
        c = _config(tmp_path / sub, "acw", epochs=4, steps_per_epoch=6, **optim)
        c["loss"]["params"] = {"q": 0.5}
        c["acw_scheduler"] = {"delta": 0.1, "min_delta": 0.01}
        return c

    full = train_from_config(cfg("a"), progress=False, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    # replay the hill climb on the logged validation Dice (IoU = D / (2 - D)): the trainer's q must follow it
    ref = ACWThresholdScheduler(q=0.5, delta=0.1, min_delta=0.01)
    expected_q = []
    for r in rows:
        expected_q.append(ref.q)
        ref.step(float(np.mean([r[f"dice_{k}"] / (2 - r[f"dice_{k}"]) for k in ("capsule", "cortex", "nucleus")])))
    assert [r["acw_q"] for r in rows] == pytest.approx(expected_q)
    assert len(set(round(q, 6) for q in expected_q)) > 1  # q did move
    entry = json.loads((tmp_path / "a" / "run" / "catalog_entry.json").read_text())
    assert entry["training"]["acw_scheduler"]["q"] == pytest.approx(ref.q)
    assert len(entry["training"]["acw_scheduler"]["history"]) == 4 and entry["loss"]["params"]["q"] == 0.5
    # interrupted after epoch 2 and resumed: the scheduler state comes back with the checkpoint
    train_from_config(cfg("b", stop_after_epoch=2), progress=False, device="cpu")
    resumed = train_from_config(cfg("b"), progress=False, device="cpu")  # stop_after_epoch is not in the key
    a, b = load_file(str(full)), load_file(str(resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    bad = cfg("c")
    bad["loss"] = {"name": "ce", "params": {}}
    with pytest.raises(InputError, match="acw_scheduler"):
        train_from_config(bad, progress=False, device="cpu")


def test_ddp_two_gloo_processes(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():  # pragma: no cover - torchrun ships with torch
        pytest.skip("torchrun not found next to the interpreter")
    import json

    cfg = _config(tmp_path, "ce")
    cfg["optim"].update(epochs=1, steps_per_epoch=6, batch_size=4)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "LensSegCalibLib.training",
         "--config", str(path), "--no-progress", "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((tmp_path / "run" / "catalog_entry.json").read_text())
    assert entry["training"]["processes"] == 2
    rows = _csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 1  # only rank 0 validates and logs


def test_a_new_phantom_version_does_not_reuse_cached_volumes(tmp_path: Path, monkeypatch) -> None:
    import LensSegCalibLib.phantom as phantom

    kw = dict(shape=(2, 32, 32), variation={"noise": 0.0}, spacing_mm=None, normalization={"kind": "none"},
              cache_dir=tmp_path)
    prepare_volume(TOY, 5, **kw)
    assert isinstance(prepare_volume(TOY, 5, **kw).image, np.memmap)  # same generator: cache hit
    monkeypatch.setattr(phantom, "PHANTOM_VERSION", str(phantom.PHANTOM_VERSION) + "-changed")
    assert not isinstance(prepare_volume(TOY, 5, **kw).image, np.memmap)  # changed generator: regenerated


def test_exit_worker_flushes_and_keeps_the_exit_code() -> None:
    # a torchrun worker leaves through os._exit after its work: buffered output must still arrive, and the code
    # must be the command's (torchrun reports the job as failed otherwise)
    code = ("import sys, logging; from LensSegCalibLib.training import ddp; "
            "print('weights path', end=''); sys.stderr.write('last words'); ddp.exit_worker(3)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "LensSegCalib"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 3
    assert proc.stdout == "weights path" and proc.stderr == "last words"
