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
from LensSegCalibLib.training.data import PatchSampler, prepare_volume, toy_volume
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


# ---- training ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["acw", "sdc"])
def test_a_few_steps_lower_the_loss_and_produce_a_loadable_model(tmp_path: Path, loss: str) -> None:
    torch.set_num_threads(1)
    cfg = _config(tmp_path, loss)
    weights = train_from_config(cfg, progress=False, device="cpu")
    rows = _csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 2
    assert float(rows[1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert float(rows[1]["mean_dice"]) > 0.3
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
