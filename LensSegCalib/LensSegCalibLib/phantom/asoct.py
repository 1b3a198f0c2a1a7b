"""Swept-source AS-OCT phantom of the anterior eye with capsule/cortex/nucleus labels (DATA.md 1, 3).

Geometry of one volume: ``N`` radial B-scans through the optical axis at meridian angles ``k * 180 / N`` deg.
Each B-scan is 16 mm wide (X, lateral, centred on the optical axis) and 13 mm deep (Y, physical depth from the
top of the frame, anterior -> posterior), sampled with parallel (telecentric) A-scans. The image is the
refraction- and index-corrected display a clinical device shows (physical depth, not optical path). The
z spacing is the arc spacing of neighbouring meridians at the mean lens equator (radius 4.65 mm),
``pi * 4.65 / N`` mm, so that 3-D metrics (HD95, volumes) have a meaningful scale; the exact angles are in
``meta["bscan_angles_deg"]``.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ..errors import InputError
from .asoct_params import sample_asoct_params
from .asoct_render import FIELD_OF_VIEW_MM, Eye, render_bscan
from .base import Phantom, check_seed, check_shape

__all__ = ["asoct_volume", "ASOCT_CLASS_NAMES", "DEFAULT_ASOCT_SHAPE", "FIELD_OF_VIEW_MM", "NOMINAL_EQUATOR_MM"]

ASOCT_CLASS_NAMES = ("background", "capsule", "cortex", "nucleus")
#: Default like a CASIA2 lens scan: 16 radial B-scans, 800 depth samples (16.25 um), 800 A-scans (20 um).
DEFAULT_ASOCT_SHAPE = (16, 800, 800)
#: Radius (mm) at which the z spacing is measured as arc length between meridians.
NOMINAL_EQUATOR_MM = 4.65


def asoct_volume(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    split: Literal["train", "heldout"] = "train",
    hard: bool = False,
    **variation: Any,
) -> Phantom:
    """Radial AS-OCT volume of one synthetic eye, with labels and visibility.

    Args:
        seed: generator seed (>= 0). Seeds >= ``HELDOUT_SEED_START`` (10000) are for evaluation only.
        shape: ``(nz, ny, nx)`` = (B-scans, depth samples, A-scans); the field of view stays 13 x 16 mm.
            Defaults to ``(n_bscans, 800, 800)`` with ``n_bscans`` 16 (or the sampled held-out value).
        split: ``"train"`` (DATA.md 3.5 train ranges) or ``"heldout"`` (age 71-85, grade 4-5, tilt 6-9 deg
            with decentration 0.4-1 mm, pupil 2.5 mm, DR 30-35 dB with one look, 8/64 B-scans; one alone or
            combined, listed in ``meta["heldout_shifts"]``).
        hard: same as ``split="heldout"``.
        **variation: overrides of sampled parameters (``asoct_params.VARIATION_KEYS``), e.g. ``age=75``,
            ``cataract_grade=5``, ``tilt_deg=8``, ``decentration_mm=0.5``, ``pupil_mm=2.5``,
            ``dynamic_range_db=35``, ``looks=1``, ``n_bscans=8``, ``rolloff_db=6``.

    Returns:
        Phantom with ``image`` float32 ``(nz, ny, nx)`` in [0, 1], ``labels`` uint8 (0 background, 1 capsule,
        2 cortex, 3 nucleus), ``spacing`` ``(pi*4.65/nz, 13/ny, 16/nx)`` mm, ``lens_fraction`` float32, and
        ``meta`` with every parameter and ``visible`` (bool).

    Raises:
        InputError: bad seed/shape, unknown variation keyword, or a value outside its supported range.

    Example:
        >>> ph = asoct_volume(3, shape=(4, 128, 128))
        >>> ph.image.shape, sorted(np.unique(ph.labels).tolist())
        ((4, 128, 128), [0, 1, 2, 3])
    """
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    params = sample_asoct_params(rng, "heldout" if hard else split, dict(variation), shape is not None)
    if shape is None:
        shape = (int(params["n_bscans"]), DEFAULT_ASOCT_SHAPE[1], DEFAULT_ASOCT_SHAPE[2])
    nz, ny, nx = check_shape(shape, (1, 32, 32))
    if "n_bscans" in variation and int(variation["n_bscans"]) != nz:
        raise InputError(f"n_bscans={variation['n_bscans']} contradicts shape[0]={nz}; give one or the other.")
    params["n_bscans"] = nz
    depth_mm, width_mm = FIELD_OF_VIEW_MM
    sy, sx = depth_mm / ny, width_mm / nx
    sz = float(np.pi * NOMINAL_EQUATOR_MM / nz)
    angles = np.arange(nz) * 180.0 / nz
    params["seed"] = seed
    eye = Eye(params)
    render_rng = np.random.default_rng([seed, 1])  # image noise apart from anatomy draws
    jitter = render_rng.normal(0.0, float(params["axial_jitter_mm"]), nz) if nz > 1 else np.zeros(1)

    image = np.empty((nz, ny, nx), np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    frac = np.zeros((nz, ny, nx), np.float32)
    visible = np.zeros((nz, ny, nx), bool)
    for k in range(nz):
        out = render_bscan(eye, float(angles[k]), float(jitter[k]), (ny, nx), (sy, sx), render_rng)
        image[k], labels[k], frac[k], visible[k] = out
    params.update(
        seed=seed, task="asoct", shape=[nz, ny, nx], spacing_mm=[sz, sy, sx], bscan_angles_deg=angles.tolist(),
        axial_jitter_per_bscan_mm=np.round(jitter, 5).tolist(), field_of_view_mm=list(FIELD_OF_VIEW_MM),
        lens=eye.lens.as_dict(), nucleus=eye.nucleus.as_dict(), nucleus_offset_mm=eye.nucleus_offset,
        lens_center_depth_mm=eye.lens_center[2], depth_axis="physical (refraction/index corrected)",
        z_spacing_meaning=f"arc length between meridians at radius {NOMINAL_EQUATOR_MM} mm",
    )
    params["visible"] = visible
    return Phantom(image=image, labels=labels, spacing=(sz, sy, sx), meta=params, task="asoct",
                   class_names=ASOCT_CLASS_NAMES, lens_fraction=frac, origin=(-width_mm / 2 + sx / 2, sy / 2, 0.0))
