"""Per-eye parameter sampling for the AS-OCT phantom (DATA.md 3.1, 3.2, 3.5).

All random numbers are drawn up front in a fixed order, whatever the caller overrides, so that overriding
one parameter (``age=80``) leaves every other draw of that seed unchanged. Quantities that follow from
others (lens thickness from age and grade, ACD from age, ...) are computed *after* the overrides from
per-eye residuals, so ``age=80`` really gives an 80-year-old lens.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ..errors import InputError
from .base import apply_overrides

__all__ = ["VARIATION_KEYS", "HELDOUT_SHIFTS", "sample_asoct_params"]

#: Held-out shifts of DATA.md 3.5 (each alone or combined when ``split="heldout"``).
HELDOUT_SHIFTS = ("old_age", "dense_cataract", "strong_tilt", "small_pupil", "low_dynamic_range", "n_bscans")

#: Keywords accepted by ``asoct_volume(**variation)`` besides every sampled parameter name in ``meta``
#: (each overrides the sampled value of that name).
VARIATION_KEYS = (
    # contract keywords
    "age", "cataract_grade", "tilt_deg", "decentration_mm", "pupil_mm", "dynamic_range_db", "looks",
    "n_bscans", "rolloff_db",
    # anatomy
    "lens_thickness_mm", "lens_diameter_mm", "ra_mm", "rp_mm", "acd_mm", "anterior_fraction",
    "nucleus_thickness_mm", "nucleus_diameter_ratio", "tilt_azimuth_deg", "decentration_azimuth_deg",
    "cornea_thickness_mm", "cornea_radius_mm", "cornea_asphericity", "corneal_apex_depth_mm",
    "iris_thickness_mm", "iris_gap_mm",
    # appearance
    "cortex_level", "nucleus_ratio", "capsule_level", "psf_fwhm_axial_px", "psf_fwhm_lateral_px",
    "floor_level", "gamma", "gain", "axial_jitter_mm", "specular_streak", "eyelids", "cortical_cataract",
    "posterior_subcapsular", "quantize_8bit", "iris_shadow_db",
)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_asoct_params(
    rng: np.random.Generator,
    split: Literal["train", "heldout"],
    variation: dict[str, Any],
    shape_given: bool,
) -> dict[str, Any]:
    """Sample every per-eye parameter, apply ``variation`` overrides, derive dependent anatomy.

    Args:
        rng: the eye's generator (consumed in a fixed order).
        split: ``"train"`` (DATA.md 3.5 train ranges) or ``"heldout"`` (one or more held-out shifts).
        variation: caller overrides (keys in ``VARIATION_KEYS``).
        shape_given: True when the caller fixed the shape (then the ``n_bscans`` shift is not drawn).

    Returns:
        Flat dict of JSON-serialisable parameters (mm, degrees, dB; display levels in [0, 1]).
    """
    if split not in ("train", "heldout"):
        raise InputError(f"split must be 'train' or 'heldout', got {split!r}.")
    # ---- fixed-order draws (do not reorder: seeds must keep their eyes) ----
    z = rng.standard_normal(16)
    u = rng.random(48)
    shifts: list[str] = []
    if split == "heldout":
        options = [s for s in HELDOUT_SHIFTS if not (s == "n_bscans" and shape_given)]
        if u[0] < 0.5:  # one shift alone
            shifts = [options[int(u[1] * len(options)) % len(options)]]
        else:  # a random combination of at least two
            pick = u[2:2 + len(options)] < 0.5
            shifts = [s for s, p in zip(options, pick) if p]
            if len(shifts) < 2:
                n = len(options)
                shifts = [options[int(u[1] * n) % n], options[int(u[8] * n) % n]]
                shifts = sorted(set(shifts), key=options.index)

    p: dict[str, Any] = {"split": split, "heldout_shifts": shifts}
    p["age"] = 71 + 14 * u[10] if "old_age" in shifts else 20 + 50 * u[10]
    p["cataract_grade"] = (4 + int(u[11] < 0.5)) if "dense_cataract" in shifts else int(u[11] * 4) % 4
    if "strong_tilt" in shifts:
        p["tilt_deg"] = 6 + 3 * u[12]
        p["decentration_mm"] = 0.4 + 0.6 * u[13]
    else:
        p["tilt_deg"] = float(min(abs(4.3 + 1.5 * z[0]), 6.0))
        p["decentration_mm"] = float(min(abs(0.17 + 0.12 * z[1]), 0.4))
    p["tilt_azimuth_deg"] = 360 * u[14]
    p["decentration_azimuth_deg"] = 360 * u[15]
    p["pupil_mm"] = 2.4 + 0.2 * u[16] if "small_pupil" in shifts else 3.0 + 3.5 * u[16]
    if "low_dynamic_range" in shifts:
        p["dynamic_range_db"], p["looks"] = 30 + 5 * u[17], 1
    else:
        p["dynamic_range_db"], p["looks"] = 40 + 15 * u[17], 1 + int(u[18] * 4) % 4
    p["n_bscans"] = (8 if u[19] < 0.5 else 64) if "n_bscans" in shifts else 16
    p["rolloff_db"] = 2 + 8 * u[20]
    # cornea / chamber / iris [DATA 3.1, unverified ranges]
    p["cornea_thickness_mm"] = 0.50 + 0.10 * u[21]
    p["cornea_radius_mm"] = 7.4 + 0.8 * u[22]
    p["cornea_asphericity"] = -0.4 + 0.4 * u[23]
    p["cornea_peripheral_thickness_mm"] = 0.65 + 0.10 * u[24]
    p["limbus_radius_mm"] = 5.4 + 0.5 * u[25]
    p["iris_root_offset_mm"] = 0.2 + 0.4 * u[26]
    p["corneal_apex_depth_mm"] = 0.3 + 1.3 * u[27]
    p["iris_thickness_mm"] = 0.3 + 0.3 * u[28]
    p["iris_gap_mm"] = 0.05 + 0.3 * u[29]
    p["iris_bow_mm"] = -0.25 + 0.4 * u[30]
    p["anterior_fraction"] = 0.38 + 0.07 * u[31]
    p["nucleus_diameter_ratio"] = 0.65 + 0.10 * u[32]
    p["nucleus_anterior_fraction"] = 0.38 + 0.08 * u[33]
    p["nucleus_radius_a_mm"] = 6.5 + 3.0 * u[34]
    p["nucleus_radius_p_mm"] = 4.8 + 2.2 * u[35]
    # appearance [DATA 3.2, 3.3; design ranges widened for robustness]
    p["cortex_level_base"] = 0.15 + 0.20 * u[36]
    p["nucleus_ratio_jitter"] = -0.05 + 0.10 * u[37]
    p["capsule_level"] = 0.70 + 0.30 * u[38]
    p["psf_fwhm_axial_px"] = 1.0 + 1.5 * u[39]
    p["psf_fwhm_lateral_px"] = 1.2 + 1.8 * u[40]
    p["floor_level"] = 0.02 + 0.04 * u[41]
    p["gamma"] = float(np.exp(np.log(0.8) + (np.log(1.25) - np.log(0.8)) * u[42]))
    p["gain"] = 0.85 + 0.3 * u[43]
    p["axial_jitter_mm"] = 0.05 * u[44]
    p["specular_streak"] = bool(u[45] < 0.6)
    p["eyelids"] = bool(u[46] < 0.4)
    p["quantize_8bit"] = bool(u[47] < 0.5)
    # residuals used for derived anatomy
    res = {
        "lt": 0.2 * z[2], "d": 0.3 * z[3], "ra": 1.0 * z[4], "rp": z[5], "acd": 0.25 * z[6], "nt": 0.25 * z[7],
        "cat": z[8], "cortex_age": z[9],
    }
    u2 = rng.random(24)  # second block, fixed order too (append new draws at the end only)
    p["cortical_cataract"] = bool(u2[0] < 0.25)
    p["posterior_subcapsular"] = bool(u2[1] < 0.1)
    p["iris_shadow_db"] = 35 + 25 * u2[2]
    p["capsule_posterior_drop"] = 0.05 + 0.15 * u2[3]
    p["cornea_level"] = 0.40 + 0.20 * u2[4]
    p["epithelium_level"] = 0.70 + 0.20 * u2[5]
    p["iris_level"] = 0.60 + 0.30 * u2[6]
    p["sclera_level"] = 0.55 + 0.30 * u2[7]
    p["sclera_mu_per_mm"] = 1.5 + 1.5 * u2[8]
    p["upper_lid_mm"] = 3.5 + 3.5 * u2[9]
    p["lower_lid_mm"] = 4.5 + 3.5 * u2[10]
    p["focus_db"] = 3.0 * u2[11]
    p["focus_range_mm"] = 3.0 + 3.0 * u2[12]
    p["vitreous_level"] = 0.04 * u2[13]
    p["streak_level"] = 0.3 + 0.5 * u2[14]
    p["streak_width_mm"] = 0.006 + 0.024 * u2[15]
    p["lid_thickness_mm"] = 1.5 + 1.5 * u2[16]
    p["lid_mu_per_mm"] = 2.0 + 2.0 * u2[17]
    p["lid_level"] = 0.35 + 0.25 * u2[18]
    p["iris_pigment_level"] = 0.65 + 0.3 * u2[19]
    p["iris_roughness_mm"] = 0.02 + 0.06 * u2[20]
    # appearance robustness: K-distributed speckle (0 = fully developed), display despeckling, lateral roll-off
    p["k_shape"] = 0.0 if u2[21] < 0.5 else float(np.exp(np.log(1.5) + (np.log(20) - np.log(1.5)) * u2[22]))
    p["despeckle_sigma_px"] = 0.5 + 1.0 * u2[23] if u2[22] < 0.3 else 0.0
    u3 = rng.random(8)  # third block (append only)
    p["lateral_rolloff_db"] = 6.0 * u3[0]
    p["lateral_shift_mm"] = 0.3 * u3[1]  # scan centre -> optical axis distance, direction below
    p["lateral_shift_azimuth_deg"] = 360 * u3[5]
    p["fixed_pattern_lines"] = bool(u3[2] < 0.25)
    p["cornea_angle_falloff"] = 0.5 * u3[3]   # oblique surfaces send less light back [design]
    p["capsule_angle_falloff"] = 0.5 * u3[4]
    p["rp_mm"] = 5.5 + 2.0 * (0.5 + 0.5 * np.tanh(res["rp"]))  # U-like spread over [5.5, 7.5]

    # ---- overrides ----
    # any sampled parameter may be overridden, plus the derived anatomy keys listed in VARIATION_KEYS
    allowed = (set(p) | set(VARIATION_KEYS)) - {"split", "heldout_shifts"}
    apply_overrides(p, {k: v for k, v in variation.items() if k not in ("cortex_level", "nucleus_ratio")},
                    allowed)
    _check_ranges(p)

    # ---- derived anatomy (after overrides so age/grade drive it) ----
    age, g = float(p["age"]), float(p["cataract_grade"])
    cat_extra = 0.5 * float(np.clip((g - 2) / 3, 0, 1)) * (0.5 + 0.5 * float(np.tanh(res["cat"]) + 1) / 2)
    p.setdefault("lens_thickness_mm", float(np.clip(3.31 + 0.018 * age + res["lt"] + cat_extra, 3.0, 6.2)))
    p.setdefault("lens_diameter_mm", float(np.clip(9.3 + res["d"], 8.6, 10.4)))
    p.setdefault("ra_mm", float(np.clip(12.5 - 0.05 * (age - 20) + res["ra"], 8.5, 15.0)))
    p.setdefault("acd_mm", float(np.clip(3.4 - 0.012 * (age - 20) + res["acd"], 2.2, 4.0)))
    lt = float(p["lens_thickness_mm"])
    p.setdefault("nucleus_thickness_mm", float(min(3.0 + res["nt"], lt - 0.6)))
    decades_over_40 = max(age - 40.0, 0.0) / 10.0
    cortex = p["cortex_level_base"] + (0.035 + 0.015 * float(np.tanh(res["cortex_age"]))) * decades_over_40
    p["cortex_level"] = float(variation.get("cortex_level", min(cortex, 0.5)))
    p["nucleus_ratio"] = float(variation.get("nucleus_ratio", 0.6 + 0.15 * g + p["nucleus_ratio_jitter"]))
    p["capsule_thickness_um"] = {
        "anterior": float(min(11 + 0.07 * (age - 20), 16.0)), "posterior": 3.5, "equator": 7.0,
    }
    p["mu_nucleus_per_mm"] = 0.05 + 0.15 * g
    p["mu_cortex_per_mm"] = 0.05 + 0.08 * g
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in p.items()}


def _check_ranges(p: dict[str, Any]) -> None:
    """Reject overrides that cannot give a valid eye (message says the accepted range)."""
    limits = {
        "age": (1, 110), "cataract_grade": (0, 5), "tilt_deg": (0, 20), "decentration_mm": (0, 2.0),
        "pupil_mm": (1.0, 9.0), "dynamic_range_db": (10, 90), "looks": (1, 64), "n_bscans": (1, 512),
        "rolloff_db": (0, 40), "lens_thickness_mm": (2.5, 6.5), "lens_diameter_mm": (7.5, 11.0),
        "acd_mm": (1.5, 5.0), "ra_mm": (5.0, 20.0), "rp_mm": (4.0, 12.0),
    }
    for key, (lo, hi) in limits.items():
        if key in p and not (lo <= float(p[key]) <= hi):
            raise InputError(f"AS-OCT phantom: {key}={p[key]!r} is outside the supported range [{lo}, {hi}].")
