"""OCT image formation: coherent speckle, noise floor and log compression (DATA.md 1.3, 3.3 steps 5-6).

A B-scan is formed as a coherent sum: each pixel carries a complex circular-Gaussian scatterer amplitude
scaled by the square root of the local reflectivity, the field is convolved with a Gaussian PSF whose kernel is
normalised to unit energy (so a uniform reflectivity R keeps mean intensity R), complex Gaussian noise of unit
mean power is added (Rayleigh noise floor), and the intensity ``|field|^2`` is averaged over ``looks``
independent realisations. Fully developed speckle therefore has amplitude contrast 0.52 for one look.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["gaussian_energy_kernel", "speckle_intensity", "log_compress"]


def gaussian_energy_kernel(sigma_px: float) -> np.ndarray:
    """1-D Gaussian kernel (float32) with sum of squares 1, so filtering white noise keeps its power.

    Args:
        sigma_px: standard deviation in pixels (FWHM = 2.355 sigma); <= 0.05 gives the identity kernel.
    """
    if sigma_px <= 0.05:
        return np.ones(1, dtype=np.float32)
    half = max(1, int(np.ceil(3.0 * sigma_px)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    return (k / np.sqrt(np.sum(k**2))).astype(np.float32)


def speckle_intensity(
    reflectivity: np.ndarray,
    rng: np.random.Generator,
    *,
    psf_sigma_px: tuple[float, float],
    looks: int,
    noise_power: float = 1.0,
) -> np.ndarray:
    """Speckled intensity of one B-scan (linear scale, mean noise-floor power ``noise_power``).

    Args:
        reflectivity: ``(Y, X)`` mean backscattered intensity (linear, >= 0), in units of the noise power.
        rng: random generator (consumed).
        psf_sigma_px: Gaussian PSF sigma (axial, lateral) in pixels of this grid.
        looks: number of independent speckle realisations averaged (>= 1).
        noise_power: mean power of the additive complex Gaussian noise.

    Returns:
        float32 ``(Y, X)`` intensity; E[I] = reflectivity + noise_power where the reflectivity is smooth.
    """
    amp = np.sqrt(np.maximum(reflectivity, 0.0)).astype(np.float32)
    ky, kx = gaussian_energy_kernel(psf_sigma_px[0]), gaussian_energy_kernel(psf_sigma_px[1])
    noise_sd = np.float32(np.sqrt(noise_power / 2.0))
    inv_sqrt2 = np.float32(1.0 / np.sqrt(2.0))
    out = np.zeros(reflectivity.shape, dtype=np.float32)
    for _ in range(int(looks)):
        # real and imaginary parts stacked on axis 0 so each 1-D filter is one call
        field = rng.standard_normal((2, *reflectivity.shape), dtype=np.float32)
        field *= amp * inv_sqrt2
        if ky.size > 1:
            field = ndimage.correlate1d(field, ky, axis=1, mode="nearest")
        if kx.size > 1:
            field = ndimage.correlate1d(field, kx, axis=2, mode="nearest")
        field += noise_sd * rng.standard_normal(field.shape, dtype=np.float32)
        out += field[0] ** 2 + field[1] ** 2
    out /= np.float32(looks)
    return out


def log_compress(
    intensity: np.ndarray, *, dynamic_range_db: float, floor_level: float, noise_power: float = 1.0
) -> np.ndarray:
    """Map linear intensity to display [0, 1]: the median noise floor -> ``floor_level``, +DR dB -> 1.

    ``display = floor + (1 - floor) * (10 log10(I) - noise_median_dB) / DR``, clipped to [0, 1].
    The median of exponential noise of mean P is P ln 2.
    """
    noise_db = 10.0 * np.log10(noise_power * np.log(2.0))
    db = np.float32(10.0) * np.log10(np.maximum(intensity, np.float32(1e-6)))
    disp = np.float32(floor_level) + np.float32((1.0 - floor_level) / dynamic_range_db) * (db - np.float32(noise_db))
    return np.clip(disp, 0.0, 1.0).astype(np.float32)
