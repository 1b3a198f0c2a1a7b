"""Per-head parameter sampling for the head-CT phantom (DATA.md 4).

Like the AS-OCT sampler, every random number is drawn first in a fixed order, then the caller's overrides are
applied, so overriding one parameter keeps the rest of that seed's head.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ..errors import InputError
from .base import apply_overrides

__all__ = ["CT_VARIATION_KEYS", "CT_HELDOUT_SHIFTS", "sample_ct_params"]

#: Held-out shifts: thick slices, noisy low-dose scans, cataract HU, strong pose/gantry tilt.
CT_HELDOUT_SHIFTS = ("thick_slices", "high_noise", "cataract", "strong_pose")

CT_VARIATION_KEYS = (
    "ipd_mm", "globe_radius_mm", "lens_thickness_mm", "lens_diameter_mm", "lens_hu", "lens_hu_left",
    "lens_hu_right", "slice_mm", "pixel_mm", "noise_sd_hu", "blur_fwhm_mm", "yaw_deg", "pitch_deg", "roll_deg",
    "gantry_tilt_deg", "head_width_mm", "head_length_mm", "skull_thickness_mm", "bone_hu", "brain_hu",
    "fat_hu", "vitreous_hu", "calcified_lens", "z_offset_mm", "age", "anterior_lens_depth_mm",
)

_SLICES_TRAIN = (1.0, 1.5, 2.0, 2.5, 3.0)
_SLICES_HELDOUT = (0.625, 5.0)


def sample_ct_params(rng: np.random.Generator, split: Literal["train", "heldout"],
                     variation: dict[str, Any]) -> dict[str, Any]:
    """Sample every per-head parameter (mm, degrees, HU), then apply ``variation`` overrides."""
    if split not in ("train", "heldout"):
        raise InputError(f"split must be 'train' or 'heldout', got {split!r}.")
    z = rng.standard_normal(8)
    u = rng.random(48)
    shifts: list[str] = []
    if split == "heldout":
        n = len(CT_HELDOUT_SHIFTS)
        shifts = [CT_HELDOUT_SHIFTS[int(u[0] * n) % n]]
        if u[1] < 0.5:
            shifts.append(CT_HELDOUT_SHIFTS[int(u[2] * n) % n])
        shifts = sorted(set(shifts), key=CT_HELDOUT_SHIFTS.index)
    p: dict[str, Any] = {"split": split, "heldout_shifts": shifts}
    p["age"] = 20 + 65 * u[3]
    p["ipd_mm"] = float(np.clip(63 + 3.5 * z[0], 52, 74))               # [DODGSON04]
    p["globe_radius_mm"] = 11 + 2 * u[4]
    lt = 3.31 + 0.018 * p["age"] + 0.2 * z[1]                             # [JONES07]
    p["lens_thickness_mm"] = float(np.clip(lt, 3.5, 5.0))
    p["lens_diameter_mm"] = float(np.clip(9.3 + 0.3 * z[2], 8.6, 10.4))
    p["anterior_lens_depth_mm"] = 2.5 + 1.0 * u[5]
    p["lens_hu"] = float(115 + 8 * z[3])                                  # [JCR-CN]
    p["lens_hu_asymmetry"] = float(4 * z[4])
    cat = "cataract" in shifts
    # one lens traumatic (70-90 HU) or calcific speckles; rare in train, common in the cataract shift
    p["traumatic_side"] = ("right" if u[6] < 0.5 else "left") if u[7] < (0.6 if cat else 0.05) else "none"
    p["traumatic_hu"] = 70 + 20 * u[8]
    p["calcified_lens"] = bool(u[9] < (0.4 if cat else 0.03))
    choices = _SLICES_HELDOUT if "thick_slices" in shifts else _SLICES_TRAIN
    p["slice_mm"] = float(choices[int(u[10] * len(choices)) % len(choices)])
    p["fov_mm"] = 220 + 25 * u[11]
    p["noise_sd_hu"] = 15 + 10 * u[12] if "high_noise" in shifts else 3 + 12 * u[12]
    p["noise_corr_px"] = 0.5 + 0.5 * u[13]
    p["blur_fwhm_mm"] = 0.6 + 0.6 * u[14]
    big = 20.0 if "strong_pose" in shifts else 10.0
    p["yaw_deg"], p["pitch_deg"], p["roll_deg"] = (float(big * (2 * u[i] - 1)) for i in (15, 16, 17))
    p["gantry_tilt_deg"] = float((30.0 if "strong_pose" in shifts else 20.0) * (2 * u[18] - 1))
    p["head_width_mm"] = 150 + 15 * u[19]
    p["head_length_mm"] = 185 + 15 * u[20]
    p["head_height_mm"] = 200 + 20 * u[21]
    p["skull_thickness_mm"] = 5 + 3 * u[22]
    p["scalp_mm"] = 4 + 3 * u[23]
    p["bone_hu"] = 900 + 600 * u[24]
    p["diploe_hu"] = 450 + 300 * u[25]
    p["brain_hu"] = 25 + 15 * u[26]
    p["grey_white_hu"] = 4 + 6 * u[27]
    p["csf_hu"] = 0 + 10 * u[28]
    p["soft_hu"] = 20 + 40 * u[29]
    p["fat_hu"] = -100 + 40 * u[30]
    p["vitreous_hu"] = 0 + 20 * u[31]
    p["sclera_hu"] = 40 + 30 * u[32]
    p["muscle_hu"] = 40 + 20 * u[33]
    p["nerve_hu"] = 30 + 10 * u[34]
    p["orbit_wall_hu"] = 400 + 500 * u[35]
    p["eye_level_mm"] = -15 + 10 * u[36]
    p["globe_recess_mm"] = 10 + 5 * u[37]
    p["orbit_depth_mm"] = 40 + 8 * u[38]
    p["orbit_divergence_deg"] = 18 + 8 * u[39]
    p["z_offset_frac"] = 2 * u[40] - 1
    p["eyelid_mm"] = 1 + 1 * u[41]
    p["gaze_deg"] = [float(8 * (2 * u[42] - 1)), float(8 * (2 * u[43] - 1))]
    p["ventricle_scale"] = 0.8 + 0.5 * u[44]
    p["quantize"] = True
    u3 = rng.random(8)  # later additions: appended, never reordered
    p["nose_length_mm"] = 18 + 12 * u3[0]
    p["lens_ra_mm"] = 9.0 + 4.0 * u3[1]                                   # [ORTIZ12]
    p["lens_rp_mm"] = 5.5 + 2.0 * u3[2]
    p["hu_offset"] = 16 * u3[3] - 8                                       # scanner calibration spread [design]
    p["sharp_kernel"] = bool(u3[4] < 0.3)                                 # edge-enhancing reconstruction
    p["sharpen_amount"] = 0.3 + 0.5 * u3[5]
    apply_overrides(p, variation, (set(p) | set(CT_VARIATION_KEYS)) - {"split", "heldout_shifts"})
    for key, (lo, hi) in {"ipd_mm": (40, 90), "slice_mm": (0.3, 10), "noise_sd_hu": (0, 200),
                          "globe_radius_mm": (8, 16), "lens_thickness_mm": (2, 7), "lens_diameter_mm": (6, 12),
                          "pixel_mm": (0.1, 5), "gantry_tilt_deg": (-45, 45)}.items():
        if key in p and not lo <= float(p[key]) <= hi:
            raise InputError(f"CT phantom: {key}={p[key]!r} is outside the supported range [{lo}, {hi}].")
    base = float(p["lens_hu"])
    p.setdefault("lens_hu_right", base + p["lens_hu_asymmetry"] / 2)
    p.setdefault("lens_hu_left", base - p["lens_hu_asymmetry"] / 2)
    if p["traumatic_side"] != "none" and f"lens_hu_{p['traumatic_side']}" not in variation:
        p[f"lens_hu_{p['traumatic_side']}"] = float(p["traumatic_hu"])
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in p.items()}
