"""Head-CT phantom in Hounsfield units with both eye lenses labelled (DATA.md 4).

Orientation (LPS, like a DICOM axial series, direction = identity): array ``(Z, Y, X)`` =
(axial slices, inferior -> superior; anterior -> posterior; patient right -> patient left). Column 0 is the
patient's right, so in radiological display (X to the right of the screen) the patient's right lens appears on
the image *left*. Labels: 0 background, 1 right lens, 2 left lens.

Forward model: the head is painted (later structures over earlier ones) on a fine z grid at the output
in-plane sampling, averaged into slices with a box slice profile of the slice thickness, the lens is mixed in
through its exact partial-volume fraction (supersampled 3 x 3 in-plane and ~0.3 mm in z), then an in-plane
Gaussian blur (FWHM 0.6-1.2 mm), correlated Gaussian noise (SD 3-15 HU, more for held-out) and rounding to
integer HU (int16 values stored as float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from .base import Phantom, check_seed, check_shape
from .ct_params import sample_ct_params
from .geometry import LensProfile, lens_profile

__all__ = ["ct_head_volume", "CT_CLASS_NAMES", "DEFAULT_CT_SHAPE"]

CT_CLASS_NAMES = ("background", "right_lens", "left_lens")
#: 64 slices x 256 x 256 over a 220-245 mm field of view (0.86-0.96 mm pixels).
DEFAULT_CT_SHAPE = (64, 256, 256)


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def ct_head_volume(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    split: Literal["train", "heldout"] = "train",
    hard: bool = False,
    **variation: Any,
) -> Phantom:
    """Axial head CT (HU) of one synthetic head, lenses labelled 1 (right) and 2 (left).

    Args:
        seed: generator seed (>= 0); seeds >= ``HELDOUT_SEED_START`` are for evaluation only.
        shape: ``(nz, ny, nx)``; defaults to (64, 256, 256). The in-plane field of view stays 220-245 mm
            unless ``pixel_mm`` is given; a field of view smaller than the head is centred on the eyes.
            The slab (nz x slice thickness) is centred near the lenses.
        split: ``"train"`` or ``"heldout"`` (0.625/5 mm slices, noise 15-25 HU, traumatic/calcified cataract,
            pose +-20 deg with gantry tilt +-30 deg; one or two shifts, in ``meta["heldout_shifts"]``).
        hard: same as ``split="heldout"``.
        **variation: overrides (``ct_params.CT_VARIATION_KEYS``), e.g. ``ipd_mm=60``, ``slice_mm=3``,
            ``pixel_mm=0.8``, ``noise_sd_hu=10``, ``lens_hu=115``, ``gantry_tilt_deg=0``.

    Returns:
        Phantom with ``image`` float32 HU, ``labels`` uint8, ``spacing`` (slice, pixel, pixel) mm,
        ``lens_fraction`` float32 (either lens), ``origin``/``direction`` (LPS), ``meta["visible"]`` all True.

    Example:
        >>> ph = ct_head_volume(1, shape=(16, 96, 96), pixel_mm=0.9)
        >>> sorted(set(ph.labels.ravel().tolist()))
        [0, 1, 2]
    """
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    p = sample_ct_params(rng, "heldout" if hard else split, dict(variation))
    p["seed"] = seed
    nz, ny, nx = check_shape(shape if shape is not None else DEFAULT_CT_SHAPE, (1, 16, 16))
    px = float(p.get("pixel_mm", p["fov_mm"] / max(nx, ny)))
    dz = float(p["slice_mm"])
    head = _Head(p)
    # scan frame = head frame rotated (pose + gantry tilt); S = R @ H
    rot = _rot(0, p["gantry_tilt_deg"]) @ _rot(2, p["yaw_deg"]) @ _rot(0, p["pitch_deg"]) @ _rot(1, p["roll_deg"])
    lens_scan = np.array([rot @ e.lens_center for e in head.eyes])
    mid = lens_scan.mean(axis=0)
    fov_x, fov_y, extent = nx * px, ny * px, nz * dz
    if fov_y >= p["head_length_mm"] + 10 and fov_x >= p["head_width_mm"] + 10:
        cx, cy = 0.0, 0.0
    else:  # small field of view: keep the eyes in, near the front
        cx, cy = float(mid[0]), float(mid[1] + max(0.0, min(fov_y / 2 - 25.0, p["head_length_mm"] / 2)))
    cz = float(mid[2] + p["z_offset_frac"] * max(0.0, extent / 2 - 12.0))
    x0, y0, z0 = cx - fov_x / 2 + px / 2, cy - fov_y / 2 + px / 2, cz - extent / 2 + dz / 2
    xs, ys, zs = x0 + px * np.arange(nx), y0 + px * np.arange(ny), z0 + dz * np.arange(nz)

    sub = int(np.clip(np.ceil(dz / 1.5), 1, 3))  # z samples per slice (the lens has its own fine raster)
    # in-plane 2 x 2 supersampling: partial volume at tissue edges instead of staircases
    off = np.array([-0.25, 0.25]) * px
    xf, yf = (xs[:, None] + off).ravel(), (ys[:, None] + off).ravel()
    image = np.empty((nz, ny, nx), np.float32)
    for k in range(nz):
        zf = zs[k] + ((np.arange(sub) + 0.5) / sub - 0.5) * dz
        fine = head.paint(rot.T, xf, yf, zf)
        image[k] = fine.reshape(sub, ny, 2, nx, 2).mean(axis=(0, 2, 4))

    labels = np.zeros((nz, ny, nx), np.uint8)
    frac = np.zeros((nz, ny, nx), np.float32)
    for value, eye in enumerate(head.eyes, start=1):
        f, box = _lens_fraction(eye, rot, xs, ys, zs, dz)
        hu = np.full(f.shape, eye.lens_hu, np.float32)
        if p["calcified_lens"] and value == 1:
            spots = rng.random(f.shape) < 0.12
            hu = hu + spots * rng.uniform(30, 130, f.shape).astype(np.float32)
        image[box] = image[box] * (1 - f) + hu * f
        labels[box] = np.where(f >= 0.5, np.uint8(value), labels[box])
        frac[box] = np.maximum(frac[box], f)

    sig = float(p["blur_fwhm_mm"]) / 2.3548 / px
    image = ndimage.gaussian_filter(image, (0, sig, sig), mode="nearest")
    if p["sharp_kernel"]:  # edge-enhancing (bone-like) kernel: unsharp mask in-plane
        image += np.float32(p["sharpen_amount"]) * (image - ndimage.gaussian_filter(image, (0, 1.0, 1.0)))
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    c = float(p["noise_corr_px"])
    noise = ndimage.gaussian_filter(noise, (0, c, c))
    noise *= np.float32(p["noise_sd_hu"] / max(float(noise.std()), 1e-6))
    image = np.round(image + noise + np.float32(p["hu_offset"])).clip(-1024, 3071).astype(np.float32)

    p.update(seed=seed, task="ct", shape=[nz, ny, nx], spacing_mm=[dz, px, px], pixel_mm=px,
             slice_profile="box", fine_samples_per_slice=sub,
             orientation="LPS; Z inferior->superior, Y anterior->posterior, X patient right->left; "
                         "label 1 = patient right lens (low X index, image left in radiological display)",
             lens_centers_lps_mm=[[float(v) for v in lc] for lc in lens_scan],
             globe_centers_lps_mm=[[float(v) for v in rot @ e.center] for e in head.eyes],
             eyes=[e.as_dict() for e in head.eyes])
    p["visible"] = np.ones((nz, ny, nx), bool)
    return Phantom(image=image, labels=labels, spacing=(dz, px, px), meta=p, task="ct",
                   class_names=CT_CLASS_NAMES, lens_fraction=frac, origin=(float(x0), float(y0), float(z0)))


class _EyeCT:
    """One globe with its lens and orbit, in the head frame (mm)."""

    def __init__(self, p: dict[str, Any], side: int) -> None:
        self.side = side  # -1 patient right (-x in LPS), +1 left
        name = "right" if side < 0 else "left"
        self.name = name
        r = float(p["globe_radius_mm"])
        x = side * float(p["ipd_mm"]) / 2
        zc = float(p["eye_level_mm"])
        a_x, a_y, a_z = p["head_width_mm"] / 2, p["head_length_mm"] / 2, p["head_height_mm"] / 2
        y_skin = -a_y * np.sqrt(max(1 - (x / a_x) ** 2 - (zc / a_z) ** 2, 0.05))
        self.center = np.array([x, y_skin + float(p["globe_recess_mm"]), zc])
        self.radius = r
        gy, gz = np.deg2rad(p["gaze_deg"])
        ax = np.array([np.sin(gy) * side, -np.cos(gy) * np.cos(gz), np.sin(gz)])  # optical axis, anterior
        self.axis = ax / np.linalg.norm(ax)
        lt, d = float(p["lens_thickness_mm"]), float(p["lens_diameter_mm"])
        h_a = 0.41 * lt
        self.lens: LensProfile = lens_profile(d / 2, h_a, lt - h_a, float(p["lens_ra_mm"]), float(p["lens_rp_mm"]))
        apex = self.center + self.axis * (r + 1.0)
        self.lens_center = apex - self.axis * (float(p["anterior_lens_depth_mm"]) + h_a)
        self.lens_hu = float(p[f"lens_hu_{name}"])
        div = np.deg2rad(p["orbit_divergence_deg"])
        e = np.array([side * np.sin(div), -np.cos(div), 0.05])
        self.orbit_axis = e / np.linalg.norm(e)
        depth = float(p["orbit_depth_mm"])
        self.apex = self.center - self.orbit_axis * (depth - 0.6 * r)
        self.orbit_len = depth + 2.0
        self.tan = (r + 3.5) / (depth - 0.6 * r)
        self.wall_len = depth - 0.6 * r + 3.0  # bony walls end a little in front of the globe centre
        mid = (self.apex + self.center) / 2
        self.bound = (mid, float(np.linalg.norm(self.apex - self.center) / 2 + r + 8.0))

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.name, "globe_center_head_mm": self.center.round(3).tolist(),
                "globe_radius_mm": self.radius, "lens_hu": self.lens_hu, "lens": self.lens.as_dict(),
                "lens_center_head_mm": np.round(self.lens_center, 3).tolist()}


@dataclass
class _Grid:
    """Head-frame coordinates (mm, float32) of the voxels being painted."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def ell(self, c: tuple[float, ...], s: tuple[float, ...]) -> np.ndarray:
        """Ellipsoid quadric ((x-c)/s)^2 summed over axes; <= 1 inside."""
        # python floats keep the float32 arrays float32 (NumPy scalars would promote to float64)
        c0, c1, c2 = (float(v) for v in c)
        i0, i1, i2 = (1.0 / float(v) for v in s)
        a, b, d = (self.x - c0) * i0, (self.y - c1) * i1, (self.z - c2) * i2
        return a * a + b * b + d * d


class _Head:
    """Painter's-algorithm head model; ``paint`` rasterises one stack of fine slices."""

    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        self.eyes = [_EyeCT(p, -1), _EyeCT(p, +1)]
        self.semi = np.array([p["head_width_mm"], p["head_length_mm"], p["head_height_mm"]]) / 2
        yg = float(np.mean([e.center[1] for e in self.eyes]))
        self.y_orbit_back = yg + float(p["orbit_depth_mm"]) - 8.0
        self.z_roof = float(p["eye_level_mm"]) + float(p["globe_radius_mm"]) + 4.0
        self.y_globe = yg
        self.x_face = float(p["ipd_mm"]) / 2 + float(p["globe_radius_mm"]) + 6.0
        wr = np.random.default_rng([int(p["seed"]), 3])  # texture/distractors: fixed per head
        self.waves = [tuple(float(v) for v in (*wr.normal(0, 0.25, 3), wr.uniform(0, 2 * np.pi))) for _ in range(3)]
        self.calcs = []
        for _ in range(int(wr.integers(0, 4))):
            side = wr.choice([-1.0, 1.0])
            centre = (side * wr.uniform(8, 20), wr.uniform(10, 35), wr.uniform(5, 25))
            self.calcs.append((centre, float(wr.uniform(1.0, 3.0)), float(wr.uniform(80, 300))))

    def paint(self, rt: np.ndarray, xs: np.ndarray, ys: np.ndarray, zf: np.ndarray) -> np.ndarray:
        """HU on the grid ``(len(zf), len(ys), len(xs))`` of scan coordinates; ``rt`` maps scan -> head."""
        X, Y, Z = xs.reshape(1, 1, -1), ys.reshape(1, -1, 1), zf.reshape(-1, 1, 1)
        grid = _Grid(*((rt[i, 0] * X + rt[i, 1] * Y + rt[i, 2] * Z).astype(np.float32) for i in range(3)))
        img = np.full(grid.x.shape, -1000.0, np.float32)
        skin, outer = self._paint_cranium(img, grid)
        img = self._paint_face(img, grid, skin, outer)
        self._paint_air(img, grid)
        for eye in self.eyes:  # only inside the eye's bounding sphere (speed)
            (cx, cy, cz), rad = eye.bound[0].tolist(), eye.bound[1]
            near = (grid.x - cx) ** 2 + (grid.y - cy) ** 2 + (grid.z - cz) ** 2 < rad**2
            if not near.any():
                continue
            jj, ii = np.nonzero(near.any(axis=(0, 2)))[0], np.nonzero(near.any(axis=(0, 1)))[0]
            box = (slice(None), slice(jj[0], jj[-1] + 1), slice(ii[0], ii[-1] + 1))
            self._paint_eye(img[box], grid.x[box], grid.y[box], grid.z[box], eye)
        return img

    def _paint_cranium(self, img: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
        """Scalp, skull (tables + diploe), brain (grey/white, ventricles, gyral texture, calcifications).

        Returns the masks inside the skin and inside the outer skull table.
        """
        p, sa = self.p, self.semi
        hx, hy, hz = grid.x, grid.y, grid.z
        # head "radius" g (1 on the skin): superellipsoid of exponent 3 in front (flatter face), ellipsoid behind;
        # inner surfaces are the level sets g = 1 - depth / mean semi-axis (one evaluation for all shells)
        ax, ay, az = np.abs(hx) / np.float32(sa[0]), hy / np.float32(sa[1]), np.abs(hz) / np.float32(sa[2])
        g = np.where(hy < 0, np.cbrt(ax * ax * ax - ay * ay * ay + az * az * az), np.sqrt(ax * ax + ay * ay + az * az))
        scale = float(np.mean(sa))
        scalp, skull = float(p["scalp_mm"]), float(p["skull_thickness_mm"])

        def level(depth_mm: float) -> float:
            return 1.0 - depth_mm / scale

        skin, outer = g <= 1, g <= level(scalp)
        img[skin] = p["soft_hu"]
        img[outer] = p["bone_hu"]
        img[(g <= level(scalp + skull / 3)) & (g > level(scalp + 2 * skull / 3))] = p["diploe_hu"]
        brain = g <= level(scalp + skull)
        img[brain] = p["brain_hu"] + p["grey_white_hu"] / 2
        white = grid.ell((0, 8, 12), tuple((sa - scalp - skull) * 0.72)) <= 1
        img[white & brain] = p["brain_hu"] - p["grey_white_hu"] / 2
        vs = float(p["ventricle_scale"])
        for sx in (-1, 1):
            img[grid.ell((sx * 7 * vs, 5, 18), (5 * vs, 22 * vs, 9 * vs)) <= 1] = p["csf_hu"]
        # gyral texture: a few fixed random waves (3-D consistent, cheap)
        wave = sum(np.sin(kx * hx + ky * hy + kz * hz + ph) for kx, ky, kz, ph in self.waves)
        img += np.float32(1.5) * wave * brain
        # distractors: calcified choroid plexus / pineal (bright dots in the brain)
        for centre, r, hu in self.calcs:
            img[grid.ell(centre, (r, r, r)) <= 1] = hu
        return skin, outer

    def _paint_face(self, img: np.ndarray, grid: _Grid, skin: np.ndarray, outer: np.ndarray) -> np.ndarray:
        """Face block in front of the middle cranial fossa and below the orbital roof, bony plates, temporalis,
        nose. Returns the (possibly new) image array."""
        p, hx, hy, hz = self.p, grid.x, grid.y, grid.z
        # the middle fossa's front runs obliquely from the lateral orbital wall to the orbital apex (sphenoid wings)
        narrow = np.abs(hx) < self.x_face
        y_back = self.y_orbit_back - 0.8 * np.maximum(np.abs(hx) - 12.0, 0.0)
        img[(hy < y_back) & (hz < self.z_roof) & skin & narrow] = p["soft_hu"]
        in_skull = outer & narrow
        img[(hy >= y_back) & (hy < y_back + 3) & (hz < self.z_roof + 3) & in_skull] = p["bone_hu"]
        img[(hz >= self.z_roof) & (hz < self.z_roof + 3) & (hy < y_back) & in_skull] = p["bone_hu"]
        # lateral to the face: temporalis muscle over the skull at eye level, fading out in z
        temporal = skin & ~outer & ~narrow
        weight = np.clip((45.0 - np.abs(hz - float(p["eye_level_mm"]))) / 15.0, 0.0, 1.0)
        img = np.where(temporal, p["soft_hu"] + (p["muscle_hu"] - p["soft_hu"]) * weight, img).astype(np.float32)
        # nose: soft-tissue wedge in front of the face, longer further down, nasal bones at the top
        ze = float(p["eye_level_mm"])
        length = np.clip((ze + 8 - hz) * 0.55, 0, float(p["nose_length_mm"]))
        ahead = -float(self.semi[1]) * 0.97 - hy  # mm in front of the face plane
        nose = (hz < ze + 8) & (hz > ze - 55) & (ahead > -5) & (ahead < length) & \
            (np.abs(hx) < 0.45 * (length - ahead) + 1.5)
        img[nose] = p["soft_hu"]
        img[nose & (hz > ze - 22) & (ahead > length - 4) & (ahead < length - 2)] = p["bone_hu"] * 0.7
        return img

    def _paint_air(self, img: np.ndarray, grid: _Grid) -> None:
        """Paranasal air: ethmoid cells (with septa) between the orbits, sphenoid, nasal cavity, maxillary and
        frontal sinuses."""
        p, hx, hy, hz = self.p, grid.x, grid.y, grid.z
        ze, yg = float(p["eye_level_mm"]), self.y_globe
        half = float(p["ipd_mm"]) / 2 - float(p["globe_radius_mm"])
        eth = (np.abs(hx) < max(half - 5.0, 4.0)) & (hy > yg - 6) & (hy < yg + 28) & (np.abs(hz - ze) < 12)
        septa = (np.abs(np.sin(0.9 * hx + 0.3 * hz)) < 0.12) | (np.abs(np.sin(0.7 * hy + 1.0)) < 0.12)
        img[eth] = np.where(septa[eth], np.float32(250.0), np.float32(-950.0))
        sph = (np.abs(hx) < 11) & (hy > yg + 30) & (hy < self.y_orbit_back - 3) & (np.abs(hz - ze + 4) < 11)
        img[sph & (np.abs(hx) > 0.8)] = -1000.0
        img[(np.abs(hx) < 7) & (hy > yg - 10) & (hy < yg + 35) & (hz < ze - 10) & (hz > ze - 55)] = -1000.0
        for sx in (-1, 1):
            img[grid.ell((sx * (half + 14), yg + 8, ze - 32), (13, 16, 15)) <= 1] = -1000.0
        img[grid.ell((0, yg - 6, ze + 26), (14, 5, 8)) <= 1] = -1000.0

    def _paint_eye(self, img: np.ndarray, hx: np.ndarray, hy: np.ndarray, hz: np.ndarray, eye: _EyeCT) -> None:
        p = self.p
        # python floats keep the float32 arrays float32
        ax_, ay_, az_ = eye.apex.tolist()
        ex, ey, ez = eye.orbit_axis.tolist()
        dx, dy, dz = hx - ax_, hy - ay_, hz - az_
        t = dx * ex + dy * ey + dz * ez
        rho = np.sqrt(np.maximum(dx * dx + dy * dy + dz * dz - t * t, 0))
        along = (t > 0) & (t < eye.orbit_len)
        cone = t * eye.tan
        img[along & (t < eye.wall_len) & (rho < cone + 1.5)] = p["orbit_wall_hu"]
        fat = along & (rho < cone)
        img[fat] = p["fat_hu"]
        # four recti: bands along the orbital wall, up/down/medial/lateral of the axis
        f1 = np.cross(eye.orbit_axis, np.array([0.0, 0.0, 1.0]))
        f1 /= np.linalg.norm(f1)
        f2 = np.cross(f1, eye.orbit_axis)
        (f1x, f1y, f1z), (f2x, f2y, f2z) = f1.tolist(), f2.tolist()
        musc = fat & (t > 4) & (t < eye.orbit_len - eye.radius * 0.9) & (rho > 0.6 * cone) & (rho < 0.92 * cone)
        if musc.any():
            ang = np.arctan2(dx * f2x + dy * f2y + dz * f2z, dx * f1x + dy * f1y + dz * f1z)
            for a0 in (0.0, np.pi / 2, np.pi, -np.pi / 2):
                dang = np.abs((ang - a0 + np.pi) % (2 * np.pi) - np.pi)
                img[musc & (dang < 0.3)] = p["muscle_hu"]
        # optic nerve: from the posterior pole to the orbital apex
        pole = eye.center - eye.axis * eye.radius
        seg = eye.apex - pole
        inv_l2 = 1.0 / float(seg @ seg)
        (px_, py_, pz_), (sx_, sy_, sz_) = pole.tolist(), seg.tolist()
        qx, qy, qz = hx - px_, hy - py_, hz - pz_
        s = np.clip((qx * sx_ + qy * sy_ + qz * sz_) * inv_l2, 0, 1)
        dn = (qx - s * sx_) ** 2 + (qy - s * sy_) ** 2 + (qz - s * sz_) ** 2
        img[dn < 2.2**2] = p["nerve_hu"]
        # globe: sclera, cornea cap, vitreous, aqueous, eyelids
        cx_, cy_, cz_ = eye.center.tolist()
        gax, gay, gaz = eye.axis.tolist()
        gx, gy, gz = hx - cx_, hy - cy_, hz - cz_
        d2 = gx * gx + gy * gy + gz * gz
        proj = gx * gax + gy * gay + gz * gaz
        r = eye.radius
        lid_r = r + 1.3
        lids = (d2 > lid_r**2) & (d2 < (lid_r + p["eyelid_mm"]) ** 2) & (proj > 0.55 * np.sqrt(d2))
        img[lids] = p["soft_hu"]
        cc = r + 1.0 - 7.8  # cornea sphere centre along the axis
        dc2 = (gx - cc * gax) ** 2 + (gy - cc * gay) ** 2 + (gz - cc * gaz) ** 2
        img[d2 < r * r] = p["sclera_hu"]
        img[(dc2 < 7.8**2) & (proj > 0)] = p["sclera_hu"]
        img[d2 < (r - 1.0) ** 2] = p["vitreous_hu"]
        img[(dc2 < 7.2**2) & (proj > 0)] = p["vitreous_hu"]


def _lens_fraction(eye: _EyeCT, rot: np.ndarray, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray,
                   dz: float) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Partial-volume fraction of the lens in its bounding box of output voxels, and that box."""
    c = rot @ eye.lens_center
    rad = float(np.hypot(eye.lens.a, max(eye.lens.h_a, eye.lens.h_p))) + 0.5
    px = float(xs[1] - xs[0]) if xs.size > 1 else 1.0

    def rng_idx(v: np.ndarray, lo: float, hi: float, half: float) -> slice:
        i0 = int(np.clip(np.searchsorted(v + half, lo), 0, v.size))
        i1 = int(np.clip(np.searchsorted(v - half, hi, side="right"), i0, v.size))
        return slice(i0, i1)

    box = (rng_idx(zs, c[2] - rad, c[2] + rad, dz / 2), rng_idx(ys, c[1] - rad, c[1] + rad, px / 2),
           rng_idx(xs, c[0] - rad, c[0] + rad, px / 2))
    shape = tuple(s.stop - s.start for s in box)
    if min(shape) == 0:
        return np.zeros(shape, np.float32), box
    sxy, sz = 3, int(np.clip(np.ceil(dz / 0.3), 2, 17))
    oxy = ((np.arange(sxy) + 0.5) / sxy - 0.5) * px
    oz = ((np.arange(sz) + 0.5) / sz - 0.5) * dz
    Z = (zs[box[0]].reshape(-1, 1) + oz).reshape(-1, 1, 1)
    Y = (ys[box[1]].reshape(-1, 1) + oxy).reshape(1, -1, 1)
    X = (xs[box[2]].reshape(-1, 1) + oxy).reshape(1, 1, -1)
    # scan -> lens frame: head coords = rot.T @ scan, then relative to the lens centre along the eye axis
    rt = rot.T
    hx = rt[0, 0] * X + rt[0, 1] * Y + rt[0, 2] * Z - eye.lens_center[0]
    hy = rt[1, 0] * X + rt[1, 1] * Y + rt[1, 2] * Z - eye.lens_center[1]
    hz = rt[2, 0] * X + rt[2, 1] * Y + rt[2, 2] * Z - eye.lens_center[2]
    w = -(hx * eye.axis[0] + hy * eye.axis[1] + hz * eye.axis[2])  # posterior-positive lens axis
    r2 = hx * hx + hy * hy + hz * hz - w * w
    inside = eye.lens.inside(r2.astype(np.float32), w.astype(np.float32))
    f = inside.reshape(shape[0], sz, shape[1], sxy, shape[2], sxy).mean(axis=(1, 3, 5), dtype=np.float32)
    return f, box
