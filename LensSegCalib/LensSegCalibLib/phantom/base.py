"""The `Phantom` record shared by the AS-OCT and CT generators, seed policy and variation handling."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["Phantom", "HELDOUT_SEED_START", "check_seed", "check_shape", "apply_overrides"]

#: Seeds >= this value are reserved for evaluation (held-out phantoms); training code must stay below it.
HELDOUT_SEED_START = 10000


@dataclass
class Phantom:
    """One synthetic volume with its ground truth.

    Attributes:
        image: float32 ``(Z, Y, X)``. AS-OCT: display intensity in [0, 1] (log-compressed, like an 8-bit scan
            divided by 255), B-scans along Z, Y = physical depth (anterior -> posterior), X = lateral.
            CT: Hounsfield units, Z = axial slices (inferior -> superior), Y = anterior -> posterior,
            X = patient right -> patient left (image left = patient right in radiological display).
        labels: uint8 ``(Z, Y, X)``, values of ``class_names`` (index = label value).
        spacing: voxel size in mm, array order ``(sz, sy, sx)``.
        meta: every sampled parameter (JSON-serialisable scalars/lists) plus ``visible`` (bool ``(Z, Y, X)``):
            True where the imaging beam reaches the tissue (AS-OCT: not behind the iris/eyelid and not lost to
            attenuation; CT: everywhere).
        task: ``"asoct"`` or ``"ct"``.
        class_names: label keys, index = label value (``("background", "capsule", "cortex", "nucleus")``).
        lens_fraction: float32 ``(Z, Y, X)`` fraction of each voxel inside the lens (from a supersampled
            raster; the partial-volume "soft" lens map), or None.
        origin: LPS position (mm, x-y-z) of voxel (0, 0, 0), as SimpleITK gives it.
        direction: row-major 3x3 direction cosines (SimpleITK order, 9 floats).
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any]
    task: str
    class_names: tuple[str, ...]
    lens_fraction: np.ndarray | None = None
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    @property
    def visible(self) -> np.ndarray:
        """Shortcut for ``meta["visible"]`` (bool, same shape as ``image``)."""
        return self.meta["visible"]

    @property
    def seed(self) -> int:
        """The seed the phantom was generated from."""
        return int(self.meta["seed"])

    @property
    def is_heldout(self) -> bool:
        """True for evaluation seeds (>= HELDOUT_SEED_START)."""
        return self.seed >= HELDOUT_SEED_START


def check_seed(seed: Any) -> int:
    """Return ``seed`` as a non-negative int or raise InputError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(
            f"seed must be a non-negative integer, got {seed!r}. Use seeds < {HELDOUT_SEED_START} for training "
            f"and >= {HELDOUT_SEED_START} for evaluation."
        )
    return int(seed)


def check_shape(shape: Any, minimum: tuple[int, int, int]) -> tuple[int, int, int]:
    """Validate a ``(nz, ny, nx)`` shape (positive ints, at least ``minimum``)."""
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise InputError(f"shape must be three integers (nz, ny, nx), got {shape!r}.") from e
    if len(out) != 3 or any(s < m for s, m in zip(out, minimum)):
        raise InputError(
            f"shape must be three integers (nz, ny, nx) of at least {minimum}, got {shape!r}. "
            "Pass e.g. shape=(4, 256, 256) for a small volume."
        )
    return out  # type: ignore[return-value]


def apply_overrides(params: dict[str, Any], variation: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Replace sampled values by the caller's ``variation`` (in place on the private ``params`` dict).

    Raises:
        InputError: for an unknown keyword (lists the valid ones).
    """
    allowed = set(allowed)
    unknown = sorted(set(variation) - allowed)
    if unknown:
        raise InputError(
            f"Unknown phantom variation keyword(s) {unknown}. Valid keywords: {sorted(allowed)}."
        )
    for key, value in variation.items():
        if value is not None:
            params[key] = value
