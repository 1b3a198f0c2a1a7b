"""Fixtures for the Slicer-module tests: real MRML from slicer-core through ``Testing/headless_slicer.py``.

- ``slicerEnv`` (session): the headless scene + module logics, built once per test process.
- ``cleanScene`` (autouse): every test starts and ends with an empty data scene (colour tables stay).
- ``tinyCatalog`` (session): a temporary model catalog holding one tiny, randomly initialised 2D UNet with
  the AS-OCT classes, so the Logic runs the real ``Segmenter`` path in well under a second per call.
- ``logic``: ``LensSegCalibLogic`` reading ``tinyCatalog``; ``obliqueVolume``: a volume node with non-identity
  spacing, origin and direction.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest


def _loadHarness():
    """Import Testing/headless_slicer.py by path (pytest puts only this folder on sys.path, not Testing/)."""
    if "headless_slicer" in sys.modules:
        return sys.modules["headless_slicer"]
    path = Path(__file__).resolve().parents[1] / "headless_slicer.py"
    spec = importlib.util.spec_from_file_location("headless_slicer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["headless_slicer"] = module
    spec.loader.exec_module(module)
    return module


headless_slicer = _loadHarness()
from lsc_testdata import ASOCT_CLASSES, TEST_SPACING, TINY_MODEL, obliqueIJKToRAS  # noqa: E402


@pytest.fixture(scope="session")
def slicerEnv(tmp_path_factory: pytest.TempPathFactory):
    """One headless Slicer per test process (module logics keep references to the scene)."""
    scene = headless_slicer.start(str(tmp_path_factory.mktemp("slicer-temp")))
    return scene


@pytest.fixture(autouse=True)
def cleanScene(slicerEnv):
    headless_slicer.reset()
    yield slicerEnv
    headless_slicer.reset()


@pytest.fixture(scope="session")
def tinyCatalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    """catalog.json + safetensors of a tiny random UNet (seeded: the same weights in every run)."""
    import torch

    from LensSegCalibLib.models import build_network, save_weights

    folder = tmp_path_factory.mktemp("tiny-catalog")
    network = {"name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
               "strides": [2], "num_res_units": 0}
    torch.manual_seed(0)
    sha256, size = save_weights(build_network(network), folder / "tiny.safetensors")
    entry = {
        "id": TINY_MODEL, "title": "Tiny test model", "version": "0.0.1", "task": "asoct-lens",
        "modality": "AS-OCT", "description": "Random weights, for tests only.", "classes": ASOCT_CLASSES,
        "input": {"spacing_mm": list(TEST_SPACING), "dims": 2, "mode": "slicewise2d", "patch_size": [32, 32],
                  "normalization": {"kind": "percentile"}},
        "network": network, "loss": {"name": "ce"}, "temperature": 1.0,
        "weights": {"file": "tiny.safetensors", "sha256": sha256, "bytes": size},
    }
    path = folder / "catalog.json"
    path.write_text(json.dumps({"catalog_version": 1, "models": [entry]}, indent=1))
    return str(path)


@pytest.fixture
def logic(slicerEnv, tinyCatalog):
    import LensSegCalib

    return LensSegCalib.LensSegCalibLogic(catalogPath=tinyCatalog)


@pytest.fixture
def obliqueVolume(slicerEnv):
    """Volume node (K, J, I) = (3, 40, 48) int16: a bright ellipse (the 'lens') on noise; oblique geometry."""
    import slicer

    rng = np.random.default_rng(1)
    k, j, i = np.meshgrid(np.arange(3), np.arange(40), np.arange(48), indexing="ij")
    lens = ((i - 24) / 14.0) ** 2 + ((j - 20) / 9.0) ** 2 < 1
    image = (200 + 800 * lens + rng.normal(0, 40, lens.shape)).astype(np.int16)
    return slicer.util.addVolumeFromArray(image, obliqueIJKToRAS(image.shape), name="oblique scan")
