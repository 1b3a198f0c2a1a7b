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
from scipy import ndimage, special

from ..errors import InputError
from .asoct_params import sample_asoct_params
from .base import Phantom, check_seed, check_shape
from .geometry import LensProfile, lens_profile, rotation_to_axis
from .speckle import log_compress, speckle_intensity

__all__ = ["asoct_volume", "ASOCT_CLASS_NAMES", "DEFAULT_ASOCT_SHAPE", "FIELD_OF_VIEW_MM", "NOMINAL_EQUATOR_MM"]

ASOCT_CLASS_NAMES = ("background", "capsule", "cortex", "nucleus")
#: Default like a CASIA2 lens scan: 16 radial B-scans, 800 depth samples (16.25 um), 800 A-scans (20 um).
DEFAULT_ASOCT_SHAPE = (16, 800, 800)
#: (depth, width) of every B-scan in mm, whatever the sampling.
FIELD_OF_VIEW_MM = (13.0, 16.0)
#: Radius (mm) at which the z spacing is measured as arc length between meridians.
NOMINAL_EQUATOR_MM = 4.65
_DB_PER_MU_MM = float(20.0 / np.log(10.0))  # two-way: 10 log10(exp(-2 mu s)) = -8.686 mu s


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
        >>> ph.image.shape, ph.labels.max() <= 3
        ((4, 128, 128), True)
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
    eye = _Eye(params)
    render_rng = np.random.default_rng([seed, 1])  # image noise apart from anatomy draws
    jitter = render_rng.normal(0.0, float(params["axial_jitter_mm"]), nz) if nz > 1 else np.zeros(1)

    image = np.empty((nz, ny, nx), np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    frac = np.zeros((nz, ny, nx), np.float32)
    visible = np.zeros((nz, ny, nx), bool)
    for k in range(nz):
        out = _render_bscan(eye, float(angles[k]), float(jitter[k]), (ny, nx), (sy, sx), render_rng)
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


class _Eye:
    """Derived per-eye geometry (mm, eye frame: x/y transverse, z = depth from the top of the frame)."""

    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        lt, d = float(p["lens_thickness_mm"]), float(p["lens_diameter_mm"])
        h_a = float(p["anterior_fraction"]) * lt
        self.lens = lens_profile(d / 2, h_a, lt - h_a, float(p["ra_mm"]), float(p["rp_mm"]))
        # nucleus: keeps its size with age; anterior cortex carries 60 % of the growth [SHAMMAS15, DUBBELMAN03]
        nt = float(np.clip(p["nucleus_thickness_mm"], 1.5, lt - 0.6))
        extra = max(lt - nt - 0.83, 0.0)
        ac = min(0.35 + 0.6 * extra, lt - nt - 0.25)
        n_a = float(p["nucleus_anterior_fraction"]) * nt
        self.nucleus_offset = float(-h_a + ac + n_a)  # nucleus equatorial plane, lens frame w
        self.nucleus = lens_profile(float(p["nucleus_diameter_ratio"]) * d / 2, n_a, nt - n_a,
                                    float(p["nucleus_radius_a_mm"]), float(p["nucleus_radius_p_mm"]))
        self.cortex_ant, self.cortex_post = ac, lt - nt - ac
        self.apex = float(p["corneal_apex_depth_mm"])
        self.endothelium = self.apex + float(p["cornea_thickness_mm"])
        dec, daz = float(p["decentration_mm"]), np.deg2rad(float(p["decentration_azimuth_deg"]))
        self.lens_center = (dec * np.cos(daz), dec * np.sin(daz), self.endothelium + float(p["acd_mm"]) + h_a)
        self.rot = rotation_to_axis(float(p["tilt_deg"]), float(p["tilt_azimuth_deg"]))
        self.lens_center = tuple(float(c) for c in self.lens_center)

    def lens_frame(self, theta_deg: float) -> np.ndarray:
        """Affine map (3x3: rows u, v, w; columns x, depth, 1) from B-scan (x, depth) to lens frame."""
        th = np.deg2rad(theta_deg)
        cx, cy, cz = self.lens_center
        m = np.empty((3, 3))
        for i in range(3):
            m[i, 0] = self.rot[0, i] * np.cos(th) + self.rot[1, i] * np.sin(th)
            m[i, 1] = self.rot[2, i]
            m[i, 2] = -(self.rot[0, i] * cx + self.rot[1, i] * cy + self.rot[2, i] * cz)
        return m


def _lens_coords(m: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r^2, w, azimuth) in the lens frame for B-scan coordinates ``xs`` (1, W) and depths ``ys`` (H, 1)."""
    u = (m[0, 0] * xs + m[0, 1] * ys + m[0, 2]).astype(np.float32)
    v = (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]).astype(np.float32)
    w = (m[2, 0] * xs + m[2, 1] * ys + m[2, 2]).astype(np.float32)
    return u * u + v * v, w, np.arctan2(v, u)


def _inside_fraction(prof: LensProfile, m: np.ndarray, xs: np.ndarray, ys: np.ndarray, dw: float,
                     ss: int, sx: float, sy: float) -> np.ndarray:
    """Fraction of each pixel inside ``prof`` from ``ss x ss`` sub-samples (pixel centres ``xs``, ``ys``)."""
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    xsub = (xs.reshape(1, -1, 1) + offs.reshape(1, 1, -1) * sx).reshape(1, -1)
    ysub = (ys.reshape(-1, 1, 1) + offs.reshape(1, -1, 1) * sy).reshape(-1, 1)
    r2, w, _ = _lens_coords(m, xsub, ysub)
    inside = prof.inside(r2, w - np.float32(dw))
    h, wd = ys.size, xs.size
    return inside.reshape(h, ss, wd, ss).mean(axis=(1, 3), dtype=np.float32)


def _cornea(eye: _Eye, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anterior and posterior corneo-scleral surface depths (mm) at distance ``r`` from the axis."""
    p = eye.p
    rc, q = float(p["cornea_radius_mm"]), float(p["cornea_asphericity"])
    rl = float(p["limbus_radius_mm"])

    def sag(rr: np.ndarray) -> np.ndarray:
        return rr**2 / (rc * (1 + np.sqrt(np.clip(1 - (1 + q) * rr**2 / rc**2, 1e-6, None))))

    def slope(rr: np.ndarray) -> np.ndarray:
        return rr / (rc * np.sqrt(np.clip(1 - (1 + q) * rr**2 / rc**2, 1e-3, None)))

    rin = np.minimum(r, rl)
    # beyond the limbus the sclera continues tangentially but flatter (0.7 of the limbal slope)
    ant = eye.apex + sag(rin) + 0.7 * slope(np.float64(rl)) * np.maximum(r - rl, 0.0)
    cct, tper = float(p["cornea_thickness_mm"]), float(p["cornea_peripheral_thickness_mm"])
    thick = cct + (tper - cct) * (rin / rl) ** 2 + 0.35 * np.clip((r - rl) / 0.6, 0.0, 1.0)
    post = ant + thick * np.sqrt(1 + np.minimum(slope(rin), 2.5) ** 2)
    return ant, post


def _render_bscan(eye: _Eye, theta: float, jitter: float, shape: tuple[int, int], spacing: tuple[float, float],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One B-scan: (display image, labels, lens fraction, visible), each ``shape``."""
    p = eye.p
    ny, nx = shape
    sy, sx = spacing
    xs = (np.arange(nx) + 0.5) * sx - FIELD_OF_VIEW_MM[1] / 2          # lateral (mm), 0 on the optical axis
    ys = (np.arange(ny) + 0.5) * sy - jitter                            # depth in the eye frame (mm)
    m = eye.lens_frame(theta)
    lens, nuc = eye.lens, eye.nucleus

    # ---- lens crop (the lens never leaves a box around its centre) ----
    tilt = np.deg2rad(float(p["tilt_deg"]))
    x_c = eye.lens_center[0] * np.cos(np.deg2rad(theta)) + eye.lens_center[1] * np.sin(np.deg2rad(theta))
    half_w = lens.a + max(lens.h_a, lens.h_p) * np.sin(tilt) + 0.2
    top = eye.lens_center[2] - lens.h_a * np.cos(tilt) - lens.a * np.sin(tilt) - 0.2
    bot = eye.lens_center[2] + lens.h_p * np.cos(tilt) + lens.a * np.sin(tilt) + 0.2
    i0, i1 = _index_range(ys, top - 4 * sy, bot + 4 * sy)
    j0, j1 = _index_range(xs, x_c - half_w - 4 * sx, x_c + half_w + 4 * sx)
    cy, cx = ys[i0:i1], xs[j0:j1]
    ss = 2
    lfrac = _inside_fraction(lens, m, cx, cy, 0.0, ss, sx, sy)
    nfrac = _inside_fraction(nuc, m, cx, cy, eye.nucleus_offset, ss, sx, sy)
    lens_mask = lfrac >= 0.5
    r2, w, az = _lens_coords(m, cx.reshape(1, -1), cy.reshape(-1, 1))
    dist = ndimage.distance_transform_edt(lens_mask).astype(np.float32)  # px to the nearest outside pixel
    rho2 = np.clip(r2 / np.float32(lens.a**2), 0, 1)
    cap_um = p["capsule_thickness_um"]
    pole = np.where(w < 0, cap_um["anterior"], cap_um["posterior"]).astype(np.float32)
    cap_mm = (cap_um["equator"] + (pole - cap_um["equator"]) * (1 - rho2)) * 1e-3
    cap_px = np.maximum(2.0, cap_mm / min(sx, sy))
    capsule = lens_mask & (dist <= cap_px + 1e-4)
    nucleus = (nfrac >= 0.5) & lens_mask & (dist > cap_px + 1.0)
    lab_crop = np.where(lens_mask, np.uint8(2), np.uint8(0))
    lab_crop[nucleus] = 3
    lab_crop[capsule] = 1

    labels = np.zeros(shape, np.uint8)
    frac = np.zeros(shape, np.float32)
    labels[i0:i1, j0:j1] = lab_crop
    frac[i0:i1, j0:j1] = lfrac

    # ---- display-level tissue map b (0..1) and attenuation mu (1/mm) ----
    b = np.zeros(shape, np.float32)
    mu = np.zeros(shape, np.float32)
    n_idx = np.ones(shape, np.float32)  # group index, for roll-off along the optical path
    ycol = ys.astype(np.float32).reshape(-1, 1)  # float32 image maths (float64 would double the cost)
    r_abs = np.abs(xs)
    ant, post = (v.astype(np.float32) for v in _cornea(eye, r_abs))
    rl = float(p["limbus_radius_mm"])
    in_cornea = (ycol >= ant) & (ycol < post)
    sclera_col = np.clip((r_abs - rl) / 0.5, 0.0, 1.0)  # 0 cornea .. 1 sclera, per column
    epi = np.exp(-0.5 * ((ycol - ant - 0.025) / max(0.012, 0.7 * sy)) ** 2)
    endo = np.exp(-0.5 * ((ycol - post + 0.01) / max(0.012, 0.7 * sy)) ** 2)
    stroma = p["cornea_level"] * (1 - 0.15 * (ycol - ant) / np.maximum(post - ant, 1e-3))
    level = (1 - sclera_col) * stroma + sclera_col * p["sclera_level"]
    b += np.where(in_cornea, level, 0).astype(np.float32)
    b = np.maximum(b, (p["epithelium_level"] * epi * (1 - 0.5 * sclera_col)).astype(np.float32))
    b = np.maximum(b, ((p["cornea_level"] + 0.12) * endo * (1 - sclera_col)).astype(np.float32))
    mu += np.where(in_cornea, 0.3 + (p["sclera_mu_per_mm"] - 0.3) * sclera_col, 0).astype(np.float32)
    n_idx = np.where(ycol >= ant, np.float32(1.336), n_idx)
    n_idx = np.where(in_cornea, np.float32(1.376), n_idx)

    # ---- iris: from the pupil margin to the root in the angle; shadows everything behind it ----
    lens_top = _first_true(lens_mask, axis=0)
    lens_top_mm = np.full(nx, np.inf)
    has = lens_top >= 0
    lens_top_mm[j0:j1][has] = cy[lens_top[has]]
    rp = float(p["pupil_mm"]) / 2
    r_root = rl + float(p["iris_root_offset_mm"])
    th0 = float(p["iris_thickness_mm"])
    s = np.clip((r_abs - rp) / max(r_root - rp, 1e-3), 0, 1)  # 0 pupil margin .. 1 root
    sag_pm = -lens.h_a * (1 - min(rp / lens.a, 0.99) ** 2) ** lens.p_a
    y_pm = eye.lens_center[2] + sag_pm - float(p["iris_gap_mm"])  # iris back surface at the pupil margin
    y_root = _cornea(eye, np.array([r_root]))[1][0] + 0.15 + th0 / 2
    thick = th0 * (0.55 + 0.45 * np.exp(-(((s - 0.35) / 0.3) ** 2))) * np.minimum(1.0, 0.45 + s * 6)
    mid = (1 - s) * (y_pm - thick / 2) + s * y_root + float(p["iris_bow_mm"]) * np.sin(np.pi * s)
    back = np.minimum(mid + thick / 2, lens_top_mm - 0.03)  # never through the lens
    # anterior stroma surface with crypts/folds: smooth random relief along the meridian
    knots = np.arange(-8.5, 8.6, 0.3)
    relief = np.interp(xs, knots, rng.standard_normal(knots.size)) * float(p["iris_roughness_mm"])
    front = np.maximum(back - np.maximum(thick + relief, 0.5 * thick), post + 0.05)
    iris_col = (r_abs >= rp) & (r_abs <= r_root)
    in_iris = iris_col & (ycol >= front) & (ycol <= back)
    tex = _smooth_noise(rng, shape, (0.08 / sy, 0.05 / sx)) * 0.15
    stroma_level = p["iris_level"] * (1 - 0.3 * (ycol - front) / np.maximum(back - front, 1e-3)) + tex
    pigment = ycol > back - max(0.06, 1.5 * sy)  # bright posterior pigment epithelium
    iris_level = np.where(pigment, p["iris_pigment_level"] + 0.5 * tex, stroma_level)
    b = np.where(in_iris, np.clip(iris_level, 0.1, 1.0), b).astype(np.float32)
    behind_iris = iris_col & (ycol > back)
    # ciliary body under the sclera beyond the iris root: grey, strongly attenuating
    cil = (r_abs > r_root) & (ycol > post) & (ycol < post + 1.8)
    b = np.where(cil, np.float32(0.3) + tex, b).astype(np.float32)
    mu += np.where(cil, np.float32(1.2), 0).astype(np.float32)

    # ---- lens tissue ----
    b_crop = _lens_levels(eye, r2, w, az, nfrac, lens_mask, capsule, dist, (sy, sx), rng)
    mu_crop = np.where(lens_mask, p["mu_cortex_per_mm"] + (p["mu_nucleus_per_mm"] - p["mu_cortex_per_mm"]) *
                       ndimage.gaussian_filter(nfrac, 1.0), 0).astype(np.float32)
    sub = (slice(i0, i1), slice(j0, j1))
    b[sub] = np.where(lens_mask, b_crop, b[sub])
    mu[sub] += mu_crop
    n_idx[sub] = np.where(lens_mask, np.float32(1.42), n_idx[sub])
    below_lens = ycol > eye.lens_center[2]
    b = np.where((b == 0) & below_lens & ~behind_iris, np.float32(p["vitreous_level"]), b)

    # ---- eyelids: tissue over the peripheral cornea in superior/inferior meridians, rounded margin;
    # their attenuation (mu * thickness) makes the shadow, partial near the margin ----
    lid_th = np.zeros(nx)
    if p["eyelids"]:
        vert = xs * np.sin(np.deg2rad(theta))  # superior coordinate of each A-scan (mm)
        over = np.maximum(vert - float(p["upper_lid_mm"]), -vert - float(p["lower_lid_mm"]))
        lid_th = float(p["lid_thickness_mm"]) * np.sqrt(np.clip(over / 0.8, 0.0, 1.0))
    lid_tissue = (ycol < ant - 0.03) & (ycol > ant - 0.03 - lid_th)
    b = np.where(lid_tissue, np.float32(p["lid_level"]) + tex, b).astype(np.float32)
    mu += np.where(lid_tissue, np.float32(p["lid_mu_per_mm"]), 0).astype(np.float32)

    # ---- attenuation, shadows, roll-off, focus (dB) ----
    loss = _DB_PER_MU_MM * np.cumsum(mu, axis=0) * sy
    loss += np.where(behind_iris, np.float32(p["iris_shadow_db"]), 0)
    zopt = np.cumsum(n_idx, axis=0) * sy
    loss += p["rolloff_db"] * zopt / (FIELD_OF_VIEW_MM[0] * 1.36)
    loss += p["focus_db"] * np.minimum(((ycol - eye.lens_center[2]) / p["focus_range_mm"]) ** 2, 1.0)
    dr, f0, looks = float(p["dynamic_range_db"]), float(p["floor_level"]), int(p["looks"])
    visible = (loss < 0.6 * dr) & ~behind_iris
    bias = float(-10 * np.log10(np.e) * (special.digamma(looks) - np.log(looks)))  # speckle log bias (dB)
    noise_db = float(10 * np.log10(np.log(2.0)))
    sig_db = (b - f0) / (1 - f0) * dr + noise_db + bias - loss
    refl = np.where(b > 0, np.power(np.float32(10.0), sig_db / 10), 0).astype(np.float32)

    fwhm = np.array([p["psf_fwhm_axial_px"], p["psf_fwhm_lateral_px"]]) / 2.3548
    inten = speckle_intensity(refl, rng, psf_sigma_px=(float(fwhm[0]), float(fwhm[1])), looks=looks)
    if p["specular_streak"]:
        prof = np.exp(-0.5 * (xs / max(p["streak_width_mm"], sx)) ** 2)
        streak = np.power(10.0, (p["streak_level"] * dr + noise_db) / 10) * prof * np.exp(-(ycol - eye.apex) / 6.0)
        flicker = rng.uniform(0.5, 1.5, (ny, 1)).astype(np.float32)  # the streak is not uniform along depth
        inten += np.where(ycol > eye.apex - 0.3, streak, 0).astype(np.float32) * flicker
    disp = log_compress(inten, dynamic_range_db=dr, floor_level=f0)
    disp = np.clip(p["gain"] * np.power(disp, p["gamma"]), 0, 1)
    if p["quantize_8bit"]:
        disp = np.round(disp * 255) / 255
    return disp.astype(np.float32), labels, frac, visible


def _lens_levels(eye: _Eye, r2: np.ndarray, w: np.ndarray, az: np.ndarray, nfrac: np.ndarray,
                 lens_mask: np.ndarray, capsule: np.ndarray, dist: np.ndarray, spacing: tuple[float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """Display levels inside the lens crop: cortex with OSD bands, nucleus, capsule, cataract features."""
    p, lens = eye.p, eye.lens
    sy, sx = spacing
    wa, wp = lens.surfaces(r2)
    # depth fraction towards the surface: 0 on the equatorial plane, 1 on the capsule
    t = np.where(w < 0, w / np.minimum(wa, -1e-3), w / np.maximum(wp, 1e-3))
    t_n = np.where(w < 0, 1 - eye.cortex_ant / lens.h_a, 1 - eye.cortex_post / lens.h_p)
    uc = np.clip((1 - t) / np.maximum(1 - t_n, 1e-3), 0, 1.5)  # 0 capsule .. 1 nucleus (on the axis)
    cortex = np.full(r2.shape, p["cortex_level"], np.float32)
    band_rng = np.random.default_rng([int(p["seed"]), 2])  # same bands in every B-scan of the eye
    n_bands = int(band_rng.integers(2, 5))
    for _ in range(n_bands):
        pos, width = band_rng.uniform(0.08, 0.9), band_rng.uniform(0.04, 0.12)
        amp = band_rng.uniform(0.04, 0.12) * band_rng.choice([-1.0, 1.0])
        cortex += np.float32(amp) * np.exp(-(((uc - pos) / width) ** 2)).astype(np.float32)
    cortex += np.float32(0.08) * np.exp(-((uc / 0.06) ** 2)).astype(np.float32)  # bright C1 under the capsule
    g = float(p["cataract_grade"])
    nuc_level = p["cortex_level"] * p["nucleus_ratio"]
    het = _smooth_noise(rng, r2.shape, (0.15 / sy, 0.15 / sx)) * (0.01 + 0.02 * g) / 0.3
    rn2 = r2 / np.float32(max(eye.nucleus.a, 1e-3) ** 2)
    nucleus = nuc_level * (1 + 0.08 * g * np.exp(-rn2 * 2)) + het
    # soft nuclear boundary (a transition zone, not a line) while labels stay sharp
    mix = ndimage.gaussian_filter(nfrac, (0.04 / sy, 0.04 / sx))
    out = cortex * (1 - mix) + nucleus * mix
    out *= np.float32(1.0) + _smooth_noise(rng, r2.shape, (0.05 / sy, 0.05 / sx))
    if p["cortical_cataract"]:
        spokes = 0.0
        for k, phi in enumerate(np.deg2rad(np.linspace(0, 360, 6, endpoint=False) + 23 * g + 11)):
            dphi = np.angle(np.exp(1j * (az - phi)))
            spokes = np.maximum(spokes, np.exp(-((dphi / 0.12) ** 2)) * np.clip((r2 / lens.a**2 - 0.12) / 0.2, 0, 1))
        out = np.maximum(out, (0.4 + 0.25 * spokes) * spokes * (uc < 1.0))
    if p["posterior_subcapsular"]:
        psc = (w > 0) & (w > wp - 0.25) & (r2 < 1.2**2)
        out = np.where(psc, np.maximum(out, 0.5), out)
    cap = p["capsule_level"] - np.where(w > 0, p["capsule_posterior_drop"], 0.0)
    cap = cap + 0.15 * np.exp(-r2 / 0.5)  # specular peak where the surface faces the beam
    out = np.where(capsule, np.maximum(out, cap), out)
    return np.where(lens_mask, np.clip(out, 0.02, 1.0), 0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], corr_px: tuple[float, float]) -> np.ndarray:
    """Zero-mean smooth random field with SD ~0.3 and correlation lengths ``corr_px`` (pixels), cheap.

    Drawn on a coarse grid and interpolated, so cost does not grow with the correlation length.
    """
    step = (max(1.0, corr_px[0]), max(1.0, corr_px[1]))
    coarse = (int(np.ceil(shape[0] / step[0])) + 2, int(np.ceil(shape[1] / step[1])) + 2)
    c = rng.standard_normal(coarse).astype(np.float32) * np.float32(0.3)
    yi = np.arange(shape[0], dtype=np.float32) / np.float32(step[0]) + 0.5
    xi = np.arange(shape[1], dtype=np.float32) / np.float32(step[1]) + 0.5
    y0, x0 = np.floor(yi).astype(int), np.floor(xi).astype(int)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no visible grid
    a = c[y0][:, x0] * (1 - fx) + c[y0][:, x0 + 1] * fx
    bb = c[y0 + 1][:, x0] * (1 - fx) + c[y0 + 1][:, x0 + 1] * fx
    return (a * (1 - fy) + bb * fy).astype(np.float32)


def _index_range(coords: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Index range [i0, i1) of sorted pixel-centre ``coords`` within [lo, hi], never empty."""
    i0 = int(np.clip(np.searchsorted(coords, lo), 0, coords.size - 1))
    i1 = int(np.clip(np.searchsorted(coords, hi, side="right"), i0 + 1, coords.size))
    return i0, i1


def _first_true(mask: np.ndarray, axis: int) -> np.ndarray:
    """Index of the first True along ``axis`` (-1 where none)."""
    idx = np.argmax(mask, axis=axis)
    return np.where(mask.any(axis=axis), idx, -1)
