"""Synthetic AS-OCT and head-CT lens phantoms with ground truth (docs/PHANTOMS.md).

- ``asoct_volume(seed, *, shape=None, **variation)``: radial swept-source AS-OCT B-scans, labels
  0 background / 1 capsule / 2 cortex / 3 nucleus, beam-visibility mask.
- ``ct_head_volume(seed, *, shape=None, **variation)``: head CT in HU, labels 0 / 1 right lens / 2 left lens.
- ``write_phantom(task, seed, out_dir, ...)``: NRRD + ``.seg.nrrd`` + visibility + JSON for Slicer.
- Seeds >= ``HELDOUT_SEED_START`` are reserved for evaluation.

>>> from LensSegCalibLib.phantom import asoct_volume
>>> ph = asoct_volume(0, shape=(4, 128, 128))
>>> ph.labels.dtype.name, ph.class_names
('uint8', ('background', 'capsule', 'cortex', 'nucleus'))
"""
from __future__ import annotations

from .asoct import asoct_volume
from .base import HELDOUT_SEED_START, Phantom
from .ct import ct_head_volume
from .writers import CLASSES, write_phantom

#: Bumped whenever a seed's phantom changes (geometry or appearance): lets caches key on it.
PHANTOM_VERSION = "1.5"

__all__ = ["Phantom", "asoct_volume", "ct_head_volume", "write_phantom", "CLASSES", "HELDOUT_SEED_START",
           "PHANTOM_VERSION"]
