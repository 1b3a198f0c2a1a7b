"""Synthetic AS-OCT and head-CT lens phantoms with ground truth (see docs/PHANTOMS.md).

>>> from LensSegCalibLib.phantom import asoct_volume
>>> ph = asoct_volume(0, shape=(4, 128, 128))
>>> ph.labels.dtype.name, ph.class_names
('uint8', ('background', 'capsule', 'cortex', 'nucleus'))
"""
from __future__ import annotations

from .asoct import asoct_volume
from .base import HELDOUT_SEED_START, Phantom
from .ct import ct_head_volume

__all__ = ["Phantom", "asoct_volume", "ct_head_volume", "HELDOUT_SEED_START"]
