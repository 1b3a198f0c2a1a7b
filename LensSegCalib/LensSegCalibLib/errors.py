"""One exception hierarchy for every user-facing failure.

Each message says what was wrong *and* what to do about it. The CLI prints the message without a traceback
(``--debug`` shows it), the Slicer module shows it in a dialog; both leave inputs untouched.
"""
from __future__ import annotations

__all__ = [
    "LensSegCalibError",
    "InputError",
    "ModelError",
    "ChecksumError",
    "CatalogError",
    "OutputError",
    "Cancelled",
]


class LensSegCalibError(Exception):
    """Base class: an error the user can act on (bad input, bad model, unwritable output, ...)."""


class InputError(LensSegCalibError, ValueError):
    """The input image, reference segmentation or argument cannot be used (shape, dtype, spacing, file)."""


class ModelError(LensSegCalibError):
    """A model cannot be found, loaded or run (unknown id, missing weights, wrong architecture)."""


class ChecksumError(ModelError):
    """A weights file does not match the sha256 recorded in the catalog: refuse to load it."""


class CatalogError(ModelError):
    """The model catalog is missing, unreadable, or fails its JSON schema."""


class OutputError(LensSegCalibError, OSError):
    """An output cannot be written (exists without overwrite, folder not writable, disk full)."""


class Cancelled(LensSegCalibError):
    """The user cancelled a running job; nothing half-made was left behind."""
