"""Memory of a big volume (issue 6): peak resident memory of ``Segmenter.predict`` per input voxel, measured in a
child process (``ru_maxrss``) under an address-space limit, on a volume small enough for the suite.

The per-voxel figure is what scales: ``benchmarks/bench_big_volume.py`` runs the same measurement on large
volumes and extrapolates to 1024 x 1024 x 512 (``docs/RELIABILITY.md``). The bound asserted here is the
*current* one (a regression guard), not yet the issue's ~6 GB target for 1024 x 1024 x 512 (= 11 B/voxel):
see the memory defect in ``docs/RELIABILITY.md``.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from LensSegCalibLib.models import build_network, save_weights

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "LensSegCalib"
#: Peak RSS above the baseline (process with model and input loaded), bytes per input voxel. Measured 2026-11:
#: ~26 B/voxel for inference and its in-RAM outputs + ~63 B/voxel of boundary-band temporaries; 100-104 B/voxel
#: at the test size (24 x 256 x 256), where fixed overheads (conv workspaces, allocator pools) still show.
BYTES_PER_VOXEL_BOUND = 100.0
FIXED_ALLOWANCE = 32 << 20
#: Address-space limit of the child: a runaway allocation fails there instead of swapping the CI machine.
ADDRESS_SPACE_LIMIT = 6 << 30

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from LensSegCalibLib.inference import Segmenter

def rss():
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) * 1024

catalog, shape = sys.argv[1], tuple(int(v) for v in sys.argv[2:5])
seg = Segmenter.from_catalog("big", "cpu", catalog=catalog)
rng = np.random.default_rng(0)
z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
vol = (400 + 500 * (x**2 / 0.5 + y**2 / 0.2 < 1) + rng.normal(0, 50, shape)).astype(np.int16)
del z, y, x
seg.predict(vol[:1, :64, :64], (0.5, 0.02, 0.02))   # warm-up: allocator pools, lazy imports
base = rss()
t0 = time.perf_counter()
pred = seg.predict(vol, (0.5, 0.02, 0.02))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"voxels": int(vol.size), "base": base, "peak": peak, "seconds": seconds,
                  "labels": int(pred.labels.max()) + 1}))
"""


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big-catalog")
    net = {"name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
           "strides": [2], "num_res_units": 0}
    torch.manual_seed(0)
    sha, size = save_weights(build_network(net), folder / "big.safetensors")
    classes = [{"value": v, "key": k, "name": k.title(), "color": [60 * v, 0, 0]}
               for v, k in enumerate(["background", "capsule", "cortex", "nucleus"])]
    entry = {"id": "big", "title": "big", "version": "0.0.1", "task": "asoct-lens", "modality": "AS-OCT",
             "classes": classes, "network": net, "loss": {"name": "ce"}, "temperature": 1.0,
             "input": {"spacing_mm": [0.5, 0.02, 0.02], "dims": 2, "mode": "slicewise2d", "patch_size": [128, 128],
                       "normalization": {"kind": "percentile"}},
             "weights": {"file": "big.safetensors", "sha256": sha, "bytes": size}}
    path = folder / "catalog.json"
    path.write_text(json.dumps({"catalog_version": 1, "models": [entry]}), encoding="utf-8")
    return path


@pytest.mark.slow
def test_peak_memory_per_voxel_stays_bounded(catalog: Path) -> None:
    shape = (24, 256, 256)  # 1.6 M voxels: large enough that per-voxel memory dominates fixed overheads
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PACKAGE_ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, str(catalog), *map(str, shape)], capture_output=True,
                          text=True, env=env, timeout=300, preexec_fn=_limit)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    grown = result["peak"] - result["base"]
    assert result["labels"] >= 1
    assert grown <= BYTES_PER_VOXEL_BOUND * result["voxels"] + FIXED_ALLOWANCE, \
        f"{grown / result['voxels']:.1f} B/voxel above baseline ({result})"
