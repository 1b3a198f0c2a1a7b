"""Rendering of one AS-OCT B-scan: eye geometry, labels, tissue layers and image formation (DATA.md 3.2-3.4).

A B-scan is built as a `_Scene` on the output grid: the lens is rasterised analytically in a crop around it
(2 x 2 supersampling for the fraction, Euclidean distance for the capsule band), then cornea/sclera, iris,
ciliary body, lens tissue and eyelids paint a display-level map ``b`` (0..1) plus attenuation ``mu`` (1/mm) and
group index; `_form_image` turns these into a speckled, log-compressed image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, special

from .geometry import LensProfile, lens_profile, rotation_to_axis
from .speckle import log_compress, speckle_intensity

__all__ = ["Eye", "render_bscan", "FIELD_OF_VIEW_MM"]

#: (depth, width) of every B-scan in mm, whatever the sampling.
FIELD_OF_VIEW_MM = (13.0, 16.0)
_DB_PER_MU_MM = float(20.0 / np.log(10.0))  # two-way: 10 log10(exp(-2 mu s)) = -8.686 mu s


class Eye:
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
        centre = (dec * np.cos(daz), dec * np.sin(daz), self.endothelium + float(p["acd_mm"]) + h_a)
        self.lens_center = tuple(float(c) for c in centre)
        self.rot = rotation_to_axis(float(p["tilt_deg"]), float(p["tilt_azimuth_deg"]))
        # the radial scans rotate about a centre that may miss the optical axis (alignment on the corneal reflex)
        s, saz = float(p["lateral_shift_mm"]), np.deg2rad(float(p["lateral_shift_azimuth_deg"]))
        self.scan_offset = (s * np.cos(saz), s * np.sin(saz))

    def offset_in(self, theta_deg: float) -> tuple[float, float]:
        """Scan-centre offset from the optical axis (mm) along and across the meridian ``theta_deg``."""
        th = np.deg2rad(theta_deg)
        dx, dy = self.scan_offset
        return float(dx * np.cos(th) + dy * np.sin(th)), float(-dx * np.sin(th) + dy * np.cos(th))

    def lens_frame(self, theta_deg: float) -> np.ndarray:
        """Affine map (3x3: rows u, v, w; columns x, depth, 1) from B-scan (x, depth) to lens frame.

        B-scan point (x, depth) is the eye point scan_offset + x (cos theta, sin theta) at that depth.
        """
        th = np.deg2rad(theta_deg)
        cx, cy, cz = self.lens_center
        cx, cy = cx - self.scan_offset[0], cy - self.scan_offset[1]
        m = np.empty((3, 3))
        for i in range(3):
            m[i, 0] = self.rot[0, i] * np.cos(th) + self.rot[1, i] * np.sin(th)
            m[i, 1] = self.rot[2, i]
            m[i, 2] = -(self.rot[0, i] * cx + self.rot[1, i] * cy + self.rot[2, i] * cz)
        return m

    def cornea(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anterior and posterior corneo-scleral surface depths (mm) at distance ``r`` (mm) from the axis.

        Anterior: conic (radius R, asphericity Q) out to the limbus, then a flatter tangent (sclera). Posterior:
        anterior + a thickness profile growing towards the limbus (DATA 3.1: not a second conic).
        """
        p = self.p
        rc, q, rl = float(p["cornea_radius_mm"]), float(p["cornea_asphericity"]), float(p["limbus_radius_mm"])

        def sag(rr: np.ndarray) -> np.ndarray:
            return rr**2 / (rc * (1 + np.sqrt(np.clip(1 - (1 + q) * rr**2 / rc**2, 1e-6, None))))

        def slope(rr: np.ndarray) -> np.ndarray:
            return rr / (rc * np.sqrt(np.clip(1 - (1 + q) * rr**2 / rc**2, 1e-3, None)))

        rin = np.minimum(r, rl)
        ant = self.apex + sag(rin) + 0.7 * slope(np.float64(rl)) * np.maximum(r - rl, 0.0)
        cct, tper = float(p["cornea_thickness_mm"]), float(p["cornea_peripheral_thickness_mm"])
        thick = cct + (tper - cct) * (rin / rl) ** 2 + 0.35 * np.clip((r - rl) / 0.6, 0.0, 1.0)
        post = ant + thick * np.sqrt(1 + np.minimum(slope(rin), 2.5) ** 2)
        return ant, post


@dataclass
class _Scene:
    """One B-scan under construction: grid, ground truth, and the maps the layers paint."""

    eye: Eye
    theta: float
    xs: np.ndarray            # (X,) lateral mm, 0 on the optical axis (float64, geometry)
    ys: np.ndarray            # (Y,) depth mm in the eye frame (float64, geometry)
    spacing: tuple[float, float]
    rng: np.random.Generator
    ycol: np.ndarray = field(init=False)  # (Y, 1) float32 depth for image maths
    b: np.ndarray = field(init=False)     # display level 0..1
    mu: np.ndarray = field(init=False)    # attenuation 1/mm
    n_idx: np.ndarray = field(init=False)  # group index (roll-off along the optical path)
    shadow_db: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)
    frac: np.ndarray = field(init=False)
    hidden: np.ndarray = field(init=False)  # behind the iris

    def __post_init__(self) -> None:
        shape = (self.ys.size, self.xs.size)
        self.ycol = self.ys.astype(np.float32).reshape(-1, 1)  # float32: float64 would double the cost
        self.b = np.zeros(shape, np.float32)
        self.mu = np.zeros(shape, np.float32)
        self.n_idx = np.ones(shape, np.float32)
        self.shadow_db = np.zeros(shape, np.float32)
        self.labels = np.zeros(shape, np.uint8)
        self.frac = np.zeros(shape, np.float32)
        self.hidden = np.zeros(shape, bool)
        along, across = self.eye.offset_in(self.theta)
        self.r_abs = np.sqrt((self.xs + along) ** 2 + across**2)  # distance of each A-scan from the optical axis
        self.ant, self.post = (v.astype(np.float32) for v in self.eye.cornea(self.r_abs))

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape


def render_bscan(eye: Eye, theta: float, jitter: float, shape: tuple[int, int], spacing: tuple[float, float],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One B-scan at meridian ``theta`` (deg): (display image, labels, lens fraction, visible), each ``shape``.

    ``jitter`` (mm) shifts the whole eye along depth (axial motion); labels move with it.
    """
    ny, nx = shape
    sy, sx = spacing
    xs = (np.arange(nx) + 0.5) * sx - FIELD_OF_VIEW_MM[1] / 2  # 0 at the scan centre
    ys = (np.arange(ny) + 0.5) * sy - jitter
    sc = _Scene(eye, theta, xs, ys, spacing, rng)
    lens = _lens_labels(sc)
    _cornea_layer(sc)
    tex = _iris_layer(sc, lens)
    _lens_layer(sc, lens)
    _eyelid_layer(sc, tex)
    image, visible = _form_image(sc)
    return image, sc.labels, sc.frac, visible


@dataclass
class _LensCrop:
    """The lens crop: index box, lens-frame coordinates, fractions, masks, distance to the outside (px)."""

    box: tuple[slice, slice]
    cy: np.ndarray
    r2: np.ndarray
    w: np.ndarray
    az: np.ndarray
    lfrac: np.ndarray
    nfrac: np.ndarray
    mask: np.ndarray
    capsule: np.ndarray
    dist: np.ndarray


def _lens_labels(sc: _Scene) -> _LensCrop:
    """Rasterise lens and nucleus in a crop around the lens; write labels and lens fraction (DATA 3.4)."""
    eye, p = sc.eye, sc.eye.p
    sy, sx = sc.spacing
    m = eye.lens_frame(sc.theta)
    lens = eye.lens
    tilt, th = np.deg2rad(float(p["tilt_deg"])), np.deg2rad(sc.theta)
    rel_x, rel_y = eye.lens_center[0] - eye.scan_offset[0], eye.lens_center[1] - eye.scan_offset[1]
    x_c = rel_x * np.cos(th) + rel_y * np.sin(th)  # lens centre along this meridian
    half_w = lens.a + max(lens.h_a, lens.h_p) * np.sin(tilt) + 0.2
    top = eye.lens_center[2] - lens.h_a * np.cos(tilt) - lens.a * np.sin(tilt) - 0.2
    bot = eye.lens_center[2] + lens.h_p * np.cos(tilt) + lens.a * np.sin(tilt) + 0.2
    i0, i1 = _index_range(sc.ys, top - 4 * sy, bot + 4 * sy)
    j0, j1 = _index_range(sc.xs, x_c - half_w - 4 * sx, x_c + half_w + 4 * sx)
    cy, cx = sc.ys[i0:i1], sc.xs[j0:j1]
    lfrac = _inside_fraction(lens, m, cx, cy, 0.0, 2, sx, sy)
    nfrac = _inside_fraction(eye.nucleus, m, cx, cy, eye.nucleus_offset, 2, sx, sy)
    mask = lfrac >= 0.5
    r2, w, az = _lens_coords(m, cx.reshape(1, -1), cy.reshape(-1, 1))
    dist = ndimage.distance_transform_edt(mask).astype(np.float32)  # px to the nearest outside pixel
    # capsule band: max(true thickness, 2 px) [BARRAQUER06]
    rho2 = np.clip(r2 / np.float32(lens.a**2), 0, 1)
    cap_um = p["capsule_thickness_um"]
    pole = np.where(w < 0, cap_um["anterior"], cap_um["posterior"]).astype(np.float32)
    cap_mm = (cap_um["equator"] + (pole - cap_um["equator"]) * (1 - rho2)) * 1e-3
    cap_px = np.maximum(2.0, cap_mm / min(sx, sy))
    capsule = mask & (dist <= cap_px + 1e-4)
    nucleus = (nfrac >= 0.5) & mask & (dist > cap_px + 1.0)  # >= 1 px of cortex between
    lab = np.where(mask, np.uint8(2), np.uint8(0))
    lab[nucleus] = 3
    lab[capsule] = 1
    box = (slice(i0, i1), slice(j0, j1))
    sc.labels[box] = lab
    sc.frac[box] = lfrac
    return _LensCrop(box, cy, r2, w, az, lfrac, nfrac, mask, capsule, dist)


def _cornea_layer(sc: _Scene) -> None:
    """Cornea (stroma, epithelium and endothelium lines) continuing into the bright, opaque sclera."""
    p, y = sc.eye.p, sc.ycol
    sy = sc.spacing[0]
    ant, post = sc.ant, sc.post
    in_cornea = (y >= ant) & (y < post)
    sclera = np.clip((sc.r_abs - float(p["limbus_radius_mm"])) / 0.5, 0.0, 1.0)  # 0 cornea .. 1 sclera
    epi = np.exp(-0.5 * ((y - ant - 0.025) / max(0.012, 0.7 * sy)) ** 2)
    endo = np.exp(-0.5 * ((y - post + 0.01) / max(0.012, 0.7 * sy)) ** 2)
    cos_inc = 1.0 / np.sqrt(1.0 + np.gradient(ant.astype(np.float64), sc.xs) ** 2)  # beam vs surface normal
    dim = (1.0 - float(p["cornea_angle_falloff"]) * (1.0 - cos_inc)).astype(np.float32)
    stroma = p["cornea_level"] * dim * (1 - 0.15 * (y - ant) / np.maximum(post - ant, 1e-3))
    level = (1 - sclera) * stroma + sclera * p["sclera_level"]
    sc.b += np.where(in_cornea, level, 0).astype(np.float32)
    sc.b = np.maximum(sc.b, (p["epithelium_level"] * epi * (1 - 0.5 * sclera)).astype(np.float32))
    sc.b = np.maximum(sc.b, ((p["cornea_level"] + 0.12) * endo * (1 - sclera)).astype(np.float32))
    sc.mu += np.where(in_cornea, 0.3 + (p["sclera_mu_per_mm"] - 0.3) * sclera, 0).astype(np.float32)
    sc.n_idx = np.where(y >= ant, np.float32(1.336), sc.n_idx)
    sc.n_idx = np.where(in_cornea, np.float32(1.376), sc.n_idx)


def _iris_layer(sc: _Scene, lens: _LensCrop) -> np.ndarray:
    """Iris from the pupil margin to its root in the angle (shadows all behind it), ciliary body beyond.

    Returns the smooth texture field reused by other soft tissues.
    """
    eye, p, y = sc.eye, sc.eye.p, sc.ycol
    sy, sx = sc.spacing
    first = _first_true(lens.mask, axis=0)
    lens_top = np.full(sc.xs.size, np.inf)
    has = first >= 0
    lens_top[lens.box[1]][has] = lens.cy[first[has]]
    rp, rl = float(p["pupil_mm"]) / 2, float(p["limbus_radius_mm"])
    r_root = rl + float(p["iris_root_offset_mm"])
    th0 = float(p["iris_thickness_mm"])
    s = np.clip((sc.r_abs - rp) / max(r_root - rp, 1e-3), 0, 1)  # 0 pupil margin .. 1 root
    sag_pm = -eye.lens.h_a * (1 - min(rp / eye.lens.a, 0.99) ** 2) ** eye.lens.p_a
    y_pm = eye.lens_center[2] + sag_pm - float(p["iris_gap_mm"])  # iris back surface at the pupil margin
    y_root = eye.cornea(np.array([r_root]))[1][0] + 0.15 + th0 / 2
    thick = th0 * (0.55 + 0.45 * np.exp(-(((s - 0.35) / 0.3) ** 2))) * np.minimum(1.0, 0.45 + s * 6)
    mid = (1 - s) * (y_pm - thick / 2) + s * y_root + float(p["iris_bow_mm"]) * np.sin(np.pi * s)
    back = np.minimum(mid + thick / 2, lens_top - 0.03)  # never through the lens
    # anterior stroma surface with crypts/folds: smooth random relief along the meridian
    knots = np.arange(-8.5, 8.6, 0.3)
    relief = np.interp(sc.xs, knots, sc.rng.standard_normal(knots.size)) * float(p["iris_roughness_mm"])
    front = np.maximum(back - np.maximum(thick + relief, 0.5 * thick), sc.post + 0.05)
    cols = (sc.r_abs >= rp) & (sc.r_abs <= r_root)
    in_iris = cols & (y >= front) & (y <= back)
    tex = _smooth_noise(sc.rng, sc.shape, (0.08 / sy, 0.05 / sx)) * 0.15
    stroma = p["iris_level"] * (1 - 0.3 * (y - front) / np.maximum(back - front, 1e-3)) + tex
    pigment = y > back - max(0.06, 1.5 * sy)  # bright posterior pigment epithelium
    level = np.where(pigment, p["iris_pigment_level"] + 0.5 * tex, stroma)
    sc.b = np.where(in_iris, np.clip(level, 0.1, 1.0), sc.b).astype(np.float32)
    sc.hidden = cols & (y > back)
    sc.shadow_db += np.where(sc.hidden, np.float32(p["iris_shadow_db"]), 0).astype(np.float32)
    # ciliary body under the sclera beyond the iris root: grey, strongly attenuating
    cil = (sc.r_abs > r_root) & (y > sc.post) & (y < sc.post + 1.8)
    sc.b = np.where(cil, np.float32(0.3) + tex, sc.b).astype(np.float32)
    sc.mu += np.where(cil, np.float32(1.2), 0).astype(np.float32)
    return tex


def _lens_layer(sc: _Scene, lens: _LensCrop) -> None:
    """Lens tissue levels and attenuation in the crop; faint vitreous behind the lens."""
    eye, p = sc.eye, sc.eye.p
    b_crop = _lens_levels(eye, lens, sc.spacing, sc.rng)
    mu_c, mu_n = p["mu_cortex_per_mm"], p["mu_nucleus_per_mm"]
    mu_crop = np.where(lens.mask, mu_c + (mu_n - mu_c) * ndimage.gaussian_filter(lens.nfrac, 1.0), 0)
    box = lens.box
    sc.b[box] = np.where(lens.mask, b_crop, sc.b[box])
    sc.mu[box] += mu_crop.astype(np.float32)
    sc.n_idx[box] = np.where(lens.mask, np.float32(1.42), sc.n_idx[box])
    below = sc.ycol > eye.lens_center[2]
    sc.b = np.where((sc.b == 0) & below & ~sc.hidden, np.float32(p["vitreous_level"]), sc.b)


def _eyelid_layer(sc: _Scene, tex: np.ndarray) -> None:
    """Eyelids over the peripheral cornea in superior/inferior meridians, rounded margin; their attenuation
    (mu x thickness) makes the shadow, partial near the margin."""
    p, y = sc.eye.p, sc.ycol
    if not p["eyelids"]:
        return
    vert = sc.eye.scan_offset[1] + sc.xs * np.sin(np.deg2rad(sc.theta))  # superior coordinate of each A-scan
    over = np.maximum(vert - float(p["upper_lid_mm"]), -vert - float(p["lower_lid_mm"]))
    lid_th = (float(p["lid_thickness_mm"]) * np.sqrt(np.clip(over / 0.8, 0.0, 1.0))).astype(np.float32)
    lid = (y < sc.ant - 0.03) & (y > sc.ant - 0.03 - lid_th)
    sc.b = np.where(lid, np.float32(p["lid_level"]) + tex, sc.b).astype(np.float32)
    sc.mu += np.where(lid, np.float32(p["lid_mu_per_mm"]), 0).astype(np.float32)


def _form_image(sc: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation/roll-off/focus, speckle, noise floor, log compression and display mapping (DATA 3.3).

    Returns (display image float32 in [0, 1], visible bool).
    """
    eye, p, y = sc.eye, sc.eye.p, sc.ycol
    sy, sx = sc.spacing
    loss = _DB_PER_MU_MM * np.cumsum(sc.mu, axis=0) * sy + sc.shadow_db
    zopt = np.cumsum(sc.n_idx, axis=0) * sy
    loss += p["rolloff_db"] * zopt / (FIELD_OF_VIEW_MM[0] * 1.36)
    loss += p["focus_db"] * np.minimum(((y - eye.lens_center[2]) / p["focus_range_mm"]) ** 2, 1.0)
    x_scan = sc.xs / (FIELD_OF_VIEW_MM[1] / 2)
    loss += (float(p["lateral_rolloff_db"]) * x_scan**2).astype(np.float32)  # dimmer towards the frame edges
    dr, f0, looks = float(p["dynamic_range_db"]), float(p["floor_level"]), int(p["looks"])
    visible = (loss < 0.6 * dr) & ~sc.hidden
    bias = float(-10 * np.log10(np.e) * (special.digamma(looks) - np.log(looks)))  # speckle log bias (dB)
    noise_db = float(10 * np.log10(np.log(2.0)))
    sig_db = (sc.b - f0) / (1 - f0) * dr + noise_db + bias - loss
    refl = np.where(sc.b > 0, np.power(np.float32(10.0), sig_db / 10), 0).astype(np.float32)
    if p["k_shape"] > 0:  # few scatterers per cell: K-distributed speckle, heavier tails than Rayleigh [GE21]
        k = float(p["k_shape"])
        refl *= sc.rng.gamma(k, 1.0 / k, refl.shape).astype(np.float32)
    fwhm = (float(p["psf_fwhm_axial_px"]) / 2.3548, float(p["psf_fwhm_lateral_px"]) / 2.3548)
    inten = speckle_intensity(refl, sc.rng, psf_sigma_px=fwhm, looks=looks)
    if p["specular_streak"]:
        apex_x = -eye.offset_in(sc.theta)[0]  # A-scan nearest the corneal apex
        prof = np.exp(-0.5 * ((sc.xs - apex_x) / max(p["streak_width_mm"], sx)) ** 2)
        streak = np.power(10.0, (p["streak_level"] * dr + noise_db) / 10) * prof * np.exp(-(y - eye.apex) / 6.0)
        flicker = sc.rng.uniform(0.5, 1.5, (y.size, 1)).astype(np.float32)  # not uniform along depth
        inten += np.where(y > eye.apex - 0.3, streak, 0).astype(np.float32) * flicker
    disp = log_compress(inten, dynamic_range_db=dr, floor_level=f0)
    if p["fixed_pattern_lines"]:  # horizontal fixed-pattern lines at the same depths in every B-scan
        fp = np.random.default_rng([int(p["seed"]), 4])
        rows = fp.integers(0, disp.shape[0], int(fp.integers(2, 7)))
        disp[rows] += fp.uniform(0.02, 0.08, (rows.size, 1)).astype(np.float32)
    if p["despeckle_sigma_px"] > 0:  # some devices display smoothed (despeckled) images
        disp = ndimage.gaussian_filter(disp, float(p["despeckle_sigma_px"]))
    disp = np.clip(p["gain"] * np.power(np.clip(disp, 0, 1), p["gamma"]), 0, 1)
    if p["quantize_8bit"]:
        disp = np.round(disp * 255) / 255
    return disp.astype(np.float32), visible


def _lens_levels(eye: Eye, lens: _LensCrop, spacing: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Display levels inside the lens crop: cortex with OSD bands, nucleus, capsule, cataract features."""
    p, prof = eye.p, eye.lens
    sy, sx = spacing
    r2, w = lens.r2, lens.w
    wa, wp = prof.surfaces(r2)
    # depth fraction towards the surface: 0 on the equatorial plane, 1 on the capsule
    t = np.where(w < 0, w / np.minimum(wa, -1e-3), w / np.maximum(wp, 1e-3))
    t_n = np.where(w < 0, 1 - eye.cortex_ant / prof.h_a, 1 - eye.cortex_post / prof.h_p)
    uc = np.clip((1 - t) / np.maximum(1 - t_n, 1e-3), 0, 1.5)  # 0 capsule .. 1 nucleus (on the axis)
    cortex = np.full(r2.shape, p["cortex_level"], np.float32)
    band_rng = np.random.default_rng([int(p["seed"]), 2])  # same bands in every B-scan of the eye
    for _ in range(int(band_rng.integers(2, 5))):  # OSD zones parallel to the surfaces [EV23]
        pos, width = band_rng.uniform(0.08, 0.9), band_rng.uniform(0.04, 0.12)
        amp = band_rng.uniform(0.04, 0.12) * band_rng.choice([-1.0, 1.0])
        cortex += np.float32(amp) * np.exp(-(((uc - pos) / width) ** 2)).astype(np.float32)
    cortex += np.float32(0.08) * np.exp(-((uc / 0.06) ** 2)).astype(np.float32)  # bright C1 under the capsule
    g = float(p["cataract_grade"])
    het = _smooth_noise(rng, r2.shape, (0.15 / sy, 0.15 / sx)) * (0.01 + 0.02 * g) / 0.3
    rn2 = r2 / np.float32(max(eye.nucleus.a, 1e-3) ** 2)
    nucleus = p["cortex_level"] * p["nucleus_ratio"] * (1 + 0.08 * g * np.exp(-rn2 * 2)) + het
    # soft nuclear boundary (a transition zone, not a line) while labels stay sharp
    mix = ndimage.gaussian_filter(lens.nfrac, (0.04 / sy, 0.04 / sx))
    out = cortex * (1 - mix) + nucleus * mix
    out *= np.float32(1.0) + _smooth_noise(rng, r2.shape, (0.05 / sy, 0.05 / sx))
    if p["cortical_cataract"]:  # radial hyperreflective spokes from the equator inwards
        spokes = np.zeros(r2.shape, np.float32)
        for phi in np.deg2rad(np.linspace(0, 360, 6, endpoint=False) + 23 * g + 11):
            dphi = (lens.az - phi + np.pi) % (2 * np.pi) - np.pi
            radial = np.clip((r2 / prof.a**2 - 0.12) / 0.2, 0, 1)
            spokes = np.maximum(spokes, np.exp(-((dphi / 0.12) ** 2)) * radial)
        out = np.maximum(out, (0.4 + 0.25 * spokes) * spokes * (uc < 1.0))
    if p["posterior_subcapsular"]:  # bright plaque on the posterior capsule
        psc = (w > 0) & (w > wp - 0.25) & (r2 < 1.2**2)
        out = np.where(psc, np.maximum(out, 0.5), out)
    cap = p["capsule_level"] - np.where(w > 0, p["capsule_posterior_drop"], 0.0)
    cap = cap + 0.15 * np.exp(-r2 / 0.5)  # specular peak where the surface faces the beam
    # dimmer where the capsule is oblique to the beam (towards the equator)
    q = np.clip(1.0 - r2 / np.float32(prof.a**2), 1e-3, 1.0)
    dwdr = 2 * np.sqrt(r2) / prof.a**2 * np.where(w < 0, prof.h_a * prof.p_a * q ** (prof.p_a - 1),
                                                   prof.h_p * prof.p_p * q ** (prof.p_p - 1))
    cap = cap * (1.0 - float(p["capsule_angle_falloff"]) * (1.0 - 1.0 / np.sqrt(1.0 + dwdr**2)))
    out = np.where(lens.capsule, np.maximum(out, cap), out)
    return np.where(lens.mask, np.clip(out, 0.02, 1.0), 0).astype(np.float32)


def _lens_coords(m: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r^2, w, azimuth) in the lens frame for B-scan coordinates ``xs`` (1, W) and depths ``ys`` (H, 1)."""
    u = (m[0, 0] * xs + m[0, 1] * ys + m[0, 2]).astype(np.float32)
    v = (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]).astype(np.float32)
    w = (m[2, 0] * xs + m[2, 1] * ys + m[2, 2]).astype(np.float32)
    return u * u + v * v, w, np.arctan2(v, u)


def _inside_fraction(prof: LensProfile, m: np.ndarray, xs: np.ndarray, ys: np.ndarray, dw: float,
                     ss: int, sx: float, sy: float) -> np.ndarray:
    """Fraction of each pixel inside ``prof`` (shifted by ``dw`` along w) from ``ss x ss`` sub-samples."""
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    xsub = (xs.reshape(1, -1, 1) + offs.reshape(1, 1, -1) * sx).reshape(1, -1)
    ysub = (ys.reshape(-1, 1, 1) + offs.reshape(1, -1, 1) * sy).reshape(-1, 1)
    r2, w, _ = _lens_coords(m, xsub, ysub)
    inside = prof.inside(r2, w - np.float32(dw))
    return inside.reshape(ys.size, ss, xs.size, ss).mean(axis=(1, 3), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], corr_px: tuple[float, float]) -> np.ndarray:
    """Zero-mean smooth random field, SD ~0.3, correlation lengths ``corr_px`` (pixels).

    Drawn on a coarse grid and interpolated (smoothstep), so the cost does not grow with the correlation length.
    """
    step = (max(1.0, corr_px[0]), max(1.0, corr_px[1]))
    coarse = (int(np.ceil(shape[0] / step[0])) + 2, int(np.ceil(shape[1] / step[1])) + 2)
    c = rng.standard_normal(coarse).astype(np.float32) * np.float32(0.3)
    yi = np.arange(shape[0], dtype=np.float32) / np.float32(step[0]) + 0.5
    xi = np.arange(shape[1], dtype=np.float32) / np.float32(step[1]) + 0.5
    y0, x0 = np.floor(yi).astype(int), np.floor(xi).astype(int)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = c[y0][:, x0] * (1 - fx) + c[y0][:, x0 + 1] * fx
    bottom = c[y0 + 1][:, x0] * (1 - fx) + c[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _index_range(coords: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Index range [i0, i1) of sorted pixel-centre ``coords`` within [lo, hi], never empty."""
    i0 = int(np.clip(np.searchsorted(coords, lo), 0, coords.size - 1))
    i1 = int(np.clip(np.searchsorted(coords, hi, side="right"), i0 + 1, coords.size))
    return i0, i1


def _first_true(mask: np.ndarray, axis: int) -> np.ndarray:
    """Index of the first True along ``axis`` (-1 where none)."""
    idx = np.argmax(mask, axis=axis)
    return np.where(mask.any(axis=axis), idx, -1)
