"""Analytic crystalline-lens shape used by both phantoms (DATA.md 3.1).

The lens (and its nucleus) is a solid of revolution about its own optical axis ``w``. With ``r`` the distance
from that axis and ``a`` the equatorial radius, the two surfaces are

    anterior  w_a(r) = -h_a * (1 - (r/a)^2) ** p_a
    posterior w_p(r) = +h_p * (1 - (r/a)^2) ** p_p,    p = a^2 / (2 h R)

so the apex radii of curvature equal ``R_a`` / ``R_p`` and, for ``p <= 1``, the equator is rounded (vertical
tangent). ``w = 0`` is the equatorial plane. All lengths are in mm.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LensProfile", "lens_profile", "rotation_to_axis"]

# Exponent bounds: p > 1 gives a sharp rim at the equator, p < 0.3 a flat-topped "drum"; neither is a lens.
_P_MIN, _P_MAX = 0.3, 1.0


@dataclass(frozen=True)
class LensProfile:
    """One biconvex profile (whole lens or nucleus), in its own frame, lengths in mm.

    Attributes:
        a: equatorial radius (mm).
        h_a: anterior height, equatorial plane -> anterior apex (mm).
        h_p: posterior height, equatorial plane -> posterior apex (mm).
        p_a: anterior exponent (dimensionless).
        p_p: posterior exponent (dimensionless).
    """

    a: float
    h_a: float
    h_p: float
    p_a: float
    p_p: float

    @property
    def thickness(self) -> float:
        """Axial thickness h_a + h_p (mm)."""
        return self.h_a + self.h_p

    @property
    def apex_radii(self) -> tuple[float, float]:
        """Apex radii of curvature (anterior, posterior) in mm, a^2 / (2 h p)."""
        return (self.a**2 / (2 * self.h_a * self.p_a), self.a**2 / (2 * self.h_p * self.p_p))

    @property
    def volume_ml(self) -> float:
        """Volume in mL: pi a^2 (h_a/(p_a+1) + h_p/(p_p+1)) mm^3 / 1000."""
        return float(np.pi * self.a**2 * (self.h_a / (self.p_a + 1) + self.h_p / (self.p_p + 1)) / 1000.0)

    def surfaces(self, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anterior and posterior surface heights ``w_a <= 0 <= w_p`` (mm) at squared radius ``r2`` (mm^2).

        Outside the equator (r > a) both are 0, so nothing is inside there.
        """
        q = np.clip(1.0 - r2 / np.float32(self.a**2), 0.0, None)
        return (-self.h_a * np.power(q, self.p_a), self.h_p * np.power(q, self.p_p))

    def inside(self, r2: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Boolean mask, True where (r^2, w) lies inside the profile. Shapes broadcast."""
        wa, wp = self.surfaces(r2)
        return (r2 < self.a**2) & (w >= wa) & (w <= wp)

    def as_dict(self) -> dict[str, float]:
        """Parameters plus derived apex radii, thickness and volume (for metadata)."""
        out = {k: float(v) for k, v in asdict(self).items()}
        out["apex_radius_anterior_mm"], out["apex_radius_posterior_mm"] = map(float, self.apex_radii)
        out["thickness_mm"] = float(self.thickness)
        out["volume_ml"] = self.volume_ml
        return out


def lens_profile(a: float, h_a: float, h_p: float, radius_a: float, radius_p: float) -> LensProfile:
    """Profile whose apex radii are ``radius_a``/``radius_p`` (mm), exponents clipped to [0.3, 1.0].

    Args:
        a: equatorial radius (mm). h_a, h_p: anterior/posterior heights (mm).
        radius_a, radius_p: wanted apex radii of curvature (mm); the clip keeps the equator rounded, so the
            realised radii (``LensProfile.apex_radii``) may differ slightly for extreme combinations.
    """
    p_a = float(np.clip(a**2 / (2 * h_a * radius_a), _P_MIN, _P_MAX))
    p_p = float(np.clip(a**2 / (2 * h_p * radius_p), _P_MIN, _P_MAX))
    return LensProfile(a=float(a), h_a=float(h_a), h_p=float(h_p), p_a=p_a, p_p=p_p)


def rotation_to_axis(tilt_deg: float, azimuth_deg: float) -> np.ndarray:
    """3x3 rotation taking the z axis to a direction tilted by ``tilt_deg`` towards azimuth ``azimuth_deg``.

    Rows/columns are (x, y, z) with z the optical (depth) axis. Rodrigues' formula about the axis
    (-sin(az), cos(az), 0), which lies in the transverse plane.
    """
    t, az = np.deg2rad(tilt_deg), np.deg2rad(azimuth_deg)
    k = np.array([-np.sin(az), np.cos(az), 0.0])
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * (kx @ kx)
