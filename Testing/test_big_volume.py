"""Memory of a big volume (issue 6): how much resident memory ``Segmenter.predict`` needs per input voxel,
measured in child processes (``VmHWM``, reset after setup) under an address-space limit.

The slope between two volume sizes is the per-voxel cost, free of fixed overheads (allocator pools, one slab of
temporaries): the labels (1 byte) and the float16 confidence, entropy and boundary maps (2 bytes each) = 7 B/voxel;
B-scans are normalised slab by slab and the boundary band is streamed, so nothing else grows with the volume.
The band slab is scaled down to 2^18 voxels (the shipped value is 2^24, for volumes ~32x larger) so these test
volumes are streamed the same way, and the probabilities are not kept (``probabilities_dtype=None``, what the CLI
does without a reference). At 7 B/voxel, 1024 x 1024 x 512 needs ~3.8 GB besides the input
(``benchmarks/bench_big_volume.py`` measures the full CLI run).
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import ASOCT_CLASSES, tiny_entry, unet, write_catalog

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "LensSegCalib"
#: Per-voxel memory of predict (slope between two sizes), bytes per input voxel. Expected 7 (labels + three float16
#: maps); measured 2026-11-23: ~7.0. One more float32 copy of the volume (+4) or float32 maps (+6) fails this.
BYTES_PER_VOXEL_BOUND = 8.5
#: Fixed part allowed on top of the per-voxel part for the larger volume (allocator pools, one slab of temporaries).
FIXED_ALLOWANCE = 32 << 20
#: Boundary-band slab of the child (the shipped value is 2^24 voxels, for volumes ~32x larger than this one).
SLAB_VOXELS = 1 << 18
#: Address-space limit of the child: a runaway allocation fails there instead of swapping the CI machine.
ADDRESS_SPACE_LIMIT = 6 << 30

CHILD = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from LensSegCalibLib import LensSegCalibError, heatmaps
from LensSegCalibLib.inference import Segmenter

assert hasattr(heatmaps, "_BAND_SLAB_VOXELS"), "heatmaps no longer streams the band in slabs: update this test"
heatmaps._BAND_SLAB_VOXELS = int(sys.argv[5])

def rss():
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) * 1024

def hwm():
    # Peak RSS of this process image. Not ru_maxrss: Linux keeps that across fork+exec, so it would include
    # the RSS of the pytest worker that started this child (hundreds of MB after the Slicer tests).
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmHWM:")[1].split()[0]) * 1024

catalog, shape = sys.argv[1], tuple(int(v) for v in sys.argv[2:5])
seg = Segmenter.from_catalog("big", "cpu", catalog=catalog)
rng = np.random.default_rng(0)
z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
vol = (400 + 500 * (x**2 / 0.5 + y**2 / 0.2 < 1) + rng.normal(0, 50, shape)).astype(np.int16)
del z, y, x
seg.predict(vol[:1, :64, :64], (0.5, 0.02, 0.02))   # warm-up: allocator pools, lazy imports
base = rss()
# Reset the peak to the current RSS (Linux >= 4.0): otherwise VmHWM keeps the peak of building `vol` above,
# which for larger shapes exceeds the peak of predict itself.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
t0 = time.perf_counter()
pred = seg.predict(vol, (0.5, 0.02, 0.02), probabilities_dtype=None)
seconds = time.perf_counter() - t0
peak = hwm()
pred_labels = pred.labels.max()
del pred
# a volume that cannot fit (4096^3 voxels, a zero-copy view): must fail at once with a clear error, not hang
huge = np.broadcast_to(np.int16(7), (4096, 4096, 4096))
t1 = time.perf_counter()
try:
    seg.predict(huge, (0.5, 0.02, 0.02))
    too_big = "no error"
except (MemoryError, LensSegCalibError) as exc:
    too_big = f"{type(exc).__name__}: {exc}"
print(json.dumps({"voxels": int(vol.size), "base": base, "peak": peak, "seconds": seconds,
                  "labels": int(pred_labels) + 1, "too_big": too_big, "too_big_seconds": time.perf_counter() - t1}))
"""


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big-catalog")
    entry = tiny_entry(folder, "big", net=unet(2, 4), classes=ASOCT_CLASSES,
                       input={"spacing_mm": [0.5, 0.02, 0.02], "dims": 2, "mode": "slicewise2d",
                              "patch_size": [128, 128], "normalization": {"kind": "percentile"}})
    return write_catalog(folder, [entry])


def _run_child(catalog: Path, shape: tuple[int, int, int]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PACKAGE_ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, str(catalog), *map(str, shape), str(SLAB_VOXELS)],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=_limit)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_per_voxel_stays_bounded_and_an_impossible_volume_fails_fast(catalog: Path) -> None:
    small = _run_child(catalog, (16, 256, 256))
    result = _run_child(catalog, (64, 256, 256))  # 4.2 M voxels = 16 band slabs
    grown = result["peak"] - result["base"]
    slope = (grown - (small["peak"] - small["base"])) / (result["voxels"] - small["voxels"])
    assert result["labels"] >= 1
    assert slope <= BYTES_PER_VOXEL_BOUND, f"{slope:.1f} B/voxel grow with the volume ({small}, {result})"
    assert grown <= BYTES_PER_VOXEL_BOUND * result["voxels"] + FIXED_ALLOWANCE, \
        f"{grown / result['voxels']:.1f} B/voxel above baseline ({result})"
    # 4096^3 voxels under the address-space limit: refused within seconds, the process survives
    assert re.match(r"InputError: Not enough memory .* needs about [0-9.]+ GiB", result["too_big"]), result
    assert result["too_big_seconds"] < 30
