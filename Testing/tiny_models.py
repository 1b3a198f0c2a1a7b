"""Tiny random-weight catalog models for tests: real safetensors files, real sha256, a real catalog.json.

The tests that need a model but not a *trained* one (inference contract, determinism, bad input, memory) build
it here, so weights, checksums and catalog entries are made one way. Each test still chooses its own network,
input block and classes: those are what it tests.

    entry = tiny_entry(folder, "tiny2d", net=unet(2, 4), classes=ASOCT_CLASSES,
                       input={"spacing_mm": [1.0, 0.1, 0.1], "dims": 2, "mode": "slicewise2d",
                              "patch_size": [64, 64], "normalization": {"kind": "percentile"}})
    path = write_catalog(folder, [entry])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from LensSegCalibLib.models import build_network, save_weights

ASOCT_CLASSES = [
    {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
    {"value": 1, "key": "capsule", "name": "Lens capsule", "color": [255, 220, 80],
     "terminology": "Segmentation category and type - LensSegCalib~SCT^123037004^Anatomical Structure"
                    "~99LSC^1001^Lens capsule~^^~~^^~^^"},
    {"value": 2, "key": "cortex", "name": "Lens cortex", "color": [100, 180, 255]},
    {"value": 3, "key": "nucleus", "name": "Lens nucleus", "color": [230, 90, 60]},
]


def unet(spatial_dims: int, out_channels: int, *, channels: Sequence[int] = (4, 8), res_units: int = 0) -> dict:
    """Network block of a two-level MONAI UNet (a few thousand parameters: fast on CPU)."""
    return {"name": "UNet", "spatial_dims": spatial_dims, "in_channels": 1, "out_channels": out_channels,
            "channels": list(channels), "strides": [2] * (len(channels) - 1), "num_res_units": res_units}


def tiny_entry(folder: Path, model_id: str, *, net: dict, classes: list[dict], input: dict, seed: int = 0,
               temperature: float = 1.0, modality: str = "AS-OCT", task: str = "asoct-lens",
               foreground_bias: float = 0.0, **extra: Any) -> dict:
    """Build ``net`` with ``torch.manual_seed(seed)``, save ``<folder>/<model_id>.safetensors``, return its entry.

    ``foreground_bias``: add ``linspace(-b, b, C)`` to the last bias, so random weights do not label everything
    background. ``extra`` fields (e.g. ``description``) are copied into the entry.
    """
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = build_network(net)
    if foreground_bias:
        with torch.no_grad():
            last_bias = [p for n, p in module.named_parameters() if n.endswith("bias")][-1]
            last_bias.add_(torch.linspace(-foreground_bias, foreground_bias, net["out_channels"]))
    sha, nbytes = save_weights(module, folder / f"{model_id}.safetensors")
    return {"id": model_id, "title": f"test {model_id}", "version": "0.0.1", "task": task, "modality": modality,
            "classes": classes, "input": input, "network": net, "loss": {"name": "ce"}, "temperature": temperature,
            "weights": {"file": f"{model_id}.safetensors", "sha256": sha, "bytes": nbytes}, **extra}


def write_catalog(folder: Path, entries: list[dict]) -> Path:
    """Write ``<folder>/catalog.json`` holding ``entries``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "catalog.json"
    path.write_text(json.dumps({"catalog_version": 1, "models": entries}, indent=1), encoding="utf-8")
    return path
