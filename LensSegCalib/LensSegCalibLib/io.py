"""Reading and writing images and segmentations, with their geometry, and atomic file output.

Array-axis order is ``(Z, Y, X)`` (= ``(K, J, I)``) for 3D and ``(Y, X)`` for 2D; ``Geometry.spacing`` follows
the array order. Origin and direction stay in SimpleITK's LPS convention (x, y, z). Only this module converts
between the two orders.

Outputs are written to a temporary file in the destination folder and moved into place at the end, so a crash
or a full disk never leaves a half-written file, and an existing file is never replaced unless
``overwrite=True`` (the check and the move are one atomic step, so two runs racing for one file cannot both
win).
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InputError, OutputError

__all__ = [
    "Geometry",
    "Image",
    "IMAGE_SUFFIXES",
    "read_image",
    "read_segmentation",
    "write_volume",
    "write_segmentation",
    "atomic_path",
    "ensure_output_dir",
    "sha256_file",
    "sha256_array",
    "full_suffix",
]

#: File name endings we read and write as images (DICOM is read from a folder).
IMAGE_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of an array lie in patient space.

    Attributes:
        spacing: voxel size in mm, one value per array axis, array order (``(sz, sy, sx)`` for 3D).
        origin: physical position of voxel (0, 0, 0) in mm, LPS, ``(x, y, z)`` as SimpleITK gives it.
        direction: row-major direction cosines (9 values for 3D, 4 for 2D) as SimpleITK gives them: column j is
            the LPS direction of image axis j (i, then j, then k).
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...] = field(default=())
    direction: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        dims = len(self.spacing)
        if dims not in (2, 3):
            raise InputError(f"Geometry needs 2 or 3 spacing values, got {self.spacing!r}.")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        origin = tuple(float(v) for v in self.origin) if len(self.origin) else (0.0,) * dims
        direction = (
            tuple(float(v) for v in self.direction) if len(self.direction) else tuple(np.eye(dims).ravel().tolist())
        )
        if len(origin) != dims or len(direction) != dims * dims:
            raise InputError(
                f"Geometry: origin {origin!r} / direction {direction!r} do not fit {dims} spacing values."
            )
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    def validate(self) -> None:
        """Raise InputError unless every spacing is finite and > 0 and the direction is a rotation/reflection."""
        sp = np.asarray(self.spacing)
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(
                f"Voxel spacing must be finite and positive, got {self.spacing} mm. Fix the image header "
                "(e.g. in Slicer: Volumes module > Volume Information > Image Spacing) and try again."
            )
        d = self.direction_matrix()
        if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1.0) > 1e-3:
            raise InputError(f"The direction matrix {self.direction} is not orthonormal; fix the image header.")

    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as an ``(ndim, ndim)`` array (column j = LPS direction of image axis j, i first)."""
        return np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 (3D) or 3x3 (2D) homogeneous matrix from voxel index ``(i, j, k)`` to LPS mm."""
        n = self.ndim
        m = np.eye(n + 1)
        m[:n, :n] = self.direction_matrix() * np.asarray(self.spacing[::-1])[None, :]
        m[:n, n] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """Same as :meth:`ijk_to_lps` in Slicer's RAS convention (first two physical axes negated)."""
        m = self.ijk_to_lps()
        flip = np.eye(m.shape[0])
        flip[0, 0] = flip[1, 1] = -1.0
        return flip @ m

    @classmethod
    def from_sitk(cls, image: Any) -> Geometry:
        return cls(tuple(image.GetSpacing())[::-1], tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to_sitk(self, image: Any) -> None:
        image.SetSpacing(tuple(self.spacing[::-1]))
        image.SetOrigin(tuple(self.origin))
        image.SetDirection(tuple(self.direction))


@dataclass
class Image:
    """An image array (array-axis order) with its geometry and the file it came from (if any)."""

    array: np.ndarray
    geometry: Geometry
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.geometry.spacing


# ----------------------------------------------------------------------------------------------- reading


def full_suffix(path: str | os.PathLike) -> str:
    """The recognised multi-part suffix of a file name (``.seg.nrrd``, ``.nii.gz``), else its last suffix."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (``vox_offset + voxels·bitpix/8``) from its header, or None if unknown."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1 : ndim + 1]):
        return None
    voxels = 1
    for d in dims[1 : ndim + 1]:
        voxels *= max(int(d), 1)
    return int(offset) + voxels * bitpix // 8


def _check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI: ITK's reader zero-fills a short payload without any error."""
    suffix = full_suffix(path)
    if suffix not in (".nii", ".nii.gz"):
        return
    truncated = False
    if suffix == ".nii":
        with open(path, "rb") as fh:
            expected = _nifti_expected_bytes(fh.read(540))
        truncated = expected is not None and path.stat().st_size < expected
    else:
        try:
            with gzip.open(path, "rb") as fh:
                expected = _nifti_expected_bytes(fh.read(540))
            if expected is None:
                return
            with open(path, "rb") as raw:  # fast path: gzip trailer holds the size (mod 2^32) of one member
                raw.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", raw.read(4))[0]
            if isize != expected % 2**32:
                total = 0  # slow path (multi-member or damaged file): decompress and count
                with gzip.open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        total += len(chunk)
                truncated = total < expected
        except (EOFError, OSError, zlib.error):
            truncated = True
    if truncated:
        raise InputError(
            f"{path} is truncated (its header promises more voxel data than the file holds). Copy or export "
            "the file again; a partial download or a full disk usually causes this."
        )


def _read_sitk(path: Path) -> Any:
    import SimpleITK as sitk

    if not path.exists():
        raise InputError(f"Input not found: {path}. Check the path (and that the drive is mounted).")
    if path.is_file():
        _check_nifti_complete(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(
                    f"No DICOM series in folder {path}. Give an image file (.nrrd, .nii.gz, .mha) or a folder "
                    "that holds one DICOM series."
                )
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK reports unreadable/corrupt files as RuntimeError
        first = str(exc).strip().splitlines()
        detail = first[-1] if first else "unknown reader error"
        raise InputError(
            f"Cannot read {path} as an image ({detail}). The file may be truncated, corrupt or of another "
            "type; re-export it as NRRD or NIfTI (in Slicer: right-click > Export to file)."
        ) from exc


def read_image(path: str | os.PathLike, *, allow_2d: bool = True) -> Image:
    """Read a scalar image (NRRD, NIfTI, MHA or a DICOM series folder) with its geometry.

    Args:
        path: image file, or a folder holding one DICOM series.
        allow_2d: accept a single 2D image (returned as a 2D array with 2D geometry).

    Returns:
        ``Image`` with ``array`` in array-axis order (``(Z, Y, X)``), dtype as stored.

    Raises:
        InputError: missing/corrupt file, vector/RGB/4D image, empty image, or invalid geometry.
    """
    import SimpleITK as sitk

    p = Path(path)
    img = _read_sitk(p)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{p.name} has {img.GetNumberOfComponentsPerPixel()} components per voxel (vector or RGB image). "
            "Convert it to a single-channel scalar volume first (Slicer: Vector to Scalar Volume module)."
        )
    if img.GetDimension() not in (2, 3):
        raise InputError(
            f"{p.name} is a {img.GetDimension()}D image; LensSegCalib needs a 3D volume (or a 2D B-scan). "
            "Extract one 3D frame first (Slicer: Sequences module)."
        )
    if img.GetDimension() == 2 and not allow_2d:
        raise InputError(f"{p.name} is a 2D image; this model needs a 3D volume.")
    array = sitk.GetArrayFromImage(img)
    if array.size == 0 or 0 in array.shape:
        raise InputError(f"{p.name} is empty (size {array.shape}); nothing to segment.")
    if img.GetDimension() == 3 and array.shape[0] == 1 and allow_2d:
        pass  # a one-slice volume stays 3D: the geometry along k is still meaningful
    geometry = Geometry.from_sitk(img)
    geometry.validate()
    return Image(array=array, geometry=geometry, path=p)


def read_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, Geometry, list[dict[str, Any]]]:
    """Read a label map: a Slicer ``.seg.nrrd`` (via slicerio) or a plain label volume (NRRD/NIfTI).

    Returns:
        ``(labels, geometry, segments)``: labels ``(Z, Y, X)`` uint8/uint16 with the file's label values,
        geometry, and the segment descriptions (``id``, ``name``, ``labelValue``, ``color`` 0..1) when known.

    Raises:
        InputError: unreadable file, overlapping segments (4D layers), or non-integer labels.
    """
    p = Path(path)
    if full_suffix(p) == ".seg.nrrd":
        import slicerio

        if not p.exists():
            raise InputError(f"Segmentation not found: {p}.")
        if p.is_file() and p.stat().st_size == 0:
            raise InputError(f"Segmentation {p} is empty (0 bytes); copy or export it again from Slicer.")
        try:
            seg = slicerio.read_segmentation(str(p))
        # pynrrd ends a header that stops early with StopIteration (an Exception here, not a loop signal)
        except (OSError, ValueError, KeyError, IndexError, StopIteration) as exc:
            raise InputError(f"Cannot read segmentation {p} ({exc}); re-save it from Slicer as .seg.nrrd.") from exc
        voxels = np.asarray(seg["voxels"])
        if voxels.ndim == 4:
            raise InputError(
                f"{p.name} has overlapping segments (several layers); a reference must be one label map. "
                "In Slicer, export it as a labelmap volume and use that file."
            )
        ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
        spacing_ijk = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
        direction = ijk_to_lps[:3, :3] / spacing_ijk[None, :]
        geometry = Geometry(tuple(spacing_ijk[::-1]), tuple(ijk_to_lps[:3, 3]), tuple(direction.ravel()))
        labels = np.ascontiguousarray(voxels.transpose(2, 1, 0))  # IJK -> KJI
        offset = seg.get("referenceImageExtentOffset")
        if offset is not None and any(int(o) != 0 for o in offset):
            # Slicer may crop the labelmap; shift the origin so the array still maps to the right place.
            off = np.asarray([int(o) for o in offset], dtype=float)
            origin = ijk_to_lps[:3, 3] + ijk_to_lps[:3, :3] @ off
            geometry = Geometry(geometry.spacing, tuple(origin), geometry.direction)
        segments = [dict(s) for s in seg.get("segments", [])]
        return labels, geometry, segments
    image = read_image(p)
    if not np.issubdtype(image.array.dtype, np.integer):
        rounded = np.rint(image.array)
        if not np.array_equal(rounded, image.array):
            raise InputError(f"{p.name} has non-integer voxel values; a label map must hold integer labels.")
        image.array = rounded.astype(np.int32)
    return image.array, image.geometry, []


# ----------------------------------------------------------------------------------------------- writing


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check it is writable; raise OutputError with the fix otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create output folder {p} ({exc.strerror}); choose a folder you can write to.") from exc
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"Output folder {p} is not writable; choose another folder or fix its permissions.")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    The temporary file keeps the final suffix (writers choose the format by suffix). Without ``overwrite`` an
    existing destination raises OutputError before any work, and again at the end if another process created it
    meanwhile (hard-link = atomic no-clobber rename). Any failure (including a full disk) removes the temporary.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise OutputError(f"{final} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    ensure_output_dir(final.parent)
    suffix = full_suffix(final)
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    tmp = final.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"Writing {final} produced no file.")
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError as exc:
                raise OutputError(
                    f"{final} was created by another run while this one was writing; nothing was overwritten."
                ) from exc
            except OSError as exc:  # file systems without hard links: fall back to a checked rename
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if final.exists():
                    raise OutputError(f"{final} already exists; nothing was overwritten.") from exc
                os.replace(tmp, final)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputError(f"Could not write {final}: {reason}. Nothing was left half-written.") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _sitk_from_array(array: np.ndarray, geometry: Geometry) -> Any:
    import SimpleITK as sitk

    if array.ndim != geometry.ndim:
        raise InputError(f"Array has {array.ndim} dimensions but the geometry has {geometry.ndim}.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to_sitk(image)
    return image


#: NRRD type names of the dtypes the streamed writer handles.
_NRRD_TYPES = {"int8": "signed char", "uint8": "uchar", "int16": "short", "uint16": "ushort", "int32": "int",
               "uint32": "uint", "int64": "longlong", "uint64": "ulonglong", "float32": "float", "float64": "double"}
#: Values per slab of the streamed writer (16 MiB of float32).
_WRITE_SLAB_VALUES = 1 << 22


def _row_slabs(shape: Sequence[int]) -> Iterator[slice]:
    """Slices of axis 0 holding at most ``_WRITE_SLAB_VALUES`` values each (at least one row)."""
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    rows = max(1, _WRITE_SLAB_VALUES // per_row)
    for z0 in range(0, shape[0], rows):
        yield slice(z0, min(z0 + rows, shape[0]))


def _nrrd_vector(values: Sequence[float]) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def _write_nrrd_streamed(path: Path, array: np.ndarray, geometry: Geometry, dtype: np.dtype, nan_fill: float | None,
                         compress: bool) -> None:
    """Write a 3D ``(Z, Y, X)`` array as NRRD slab by slab: no full-size converted copy is ever made.

    Header fields as Slicer and ITK write them (LPS space, space directions = direction columns x spacing,
    little-endian, gzip level 1 or raw). The C-order bytes of a ``(Z, Y, X)`` array are exactly NRRD's order
    (fastest axis first = i = x), so each slab is converted and appended as it comes.
    """
    m = geometry.ijk_to_lps()
    header = [
        "NRRD0004",
        "# written by LensSegCalib (streamed)",
        f"type: {_NRRD_TYPES[dtype.name]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in array.shape[::-1]),
        "space directions: " + " ".join(_nrrd_vector(m[:3, j]) for j in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: " + _nrrd_vector(m[:3, 3]),
    ]
    packer = zlib.compressobj(1, zlib.DEFLATED, 31) if compress else None  # wbits 31: gzip container
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n\n").encode("ascii"))
        for rows in _row_slabs(array.shape):
            slab = np.asarray(array[rows]).astype(dtype.newbyteorder("<"), copy=True)
            if nan_fill is not None and slab.dtype.kind == "f":
                np.nan_to_num(slab, copy=False, nan=nan_fill)
            data = memoryview(np.ascontiguousarray(slab)).cast("B")
            fh.write(packer.compress(data) if packer is not None else data)
        if packer is not None:
            fh.write(packer.flush())


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    geometry: Geometry,
    *,
    overwrite: bool = False,
    compress: bool = True,
    dtype: npt.DTypeLike | None = None,
    nan_fill: float | None = None,
) -> Path:
    """Write a scalar volume (array-axis order) with its geometry to NRRD/NIfTI/MHA, atomically.

    Args:
        path: output file; the suffix picks the format. A 3D ``.nrrd`` is written slab by slab (constant memory
            whatever the volume); other formats go through SimpleITK.
        array: ``(Z, Y, X)`` or ``(Y, X)`` voxels (any real dtype, e.g. the segmenter's float16 maps).
        geometry: spacing/origin/direction of the array.
        overwrite: replace an existing file (otherwise OutputError).
        compress: gzip the voxels.
        dtype: voxel type of the file (default: the array's; float16 becomes float32, which NRRD and VTK need).
        nan_fill: value written for NaN voxels (e.g. 0 for a Slicer layer); None keeps NaN.

    Returns the final path. Raises OutputError (exists, unwritable, disk full).
    """
    arr = array if isinstance(array, np.ndarray) else np.asarray(array)
    out_dtype = np.dtype(dtype) if dtype is not None else (np.dtype(np.float32) if arr.dtype == np.float16
                                                           else arr.dtype)
    if arr.ndim != geometry.ndim:
        raise InputError(f"Array has {arr.ndim} dimensions but the geometry has {geometry.ndim}.")
    streamed = arr.ndim == 3 and full_suffix(Path(path)) == ".nrrd" and out_dtype.name in _NRRD_TYPES
    with atomic_path(path, overwrite=overwrite) as tmp:
        if streamed:
            _write_nrrd_streamed(tmp, arr, geometry, out_dtype, nan_fill, compress)
        else:
            _write_sitk(tmp, arr, geometry, out_dtype, nan_fill, compress)
    return Path(path)


def _write_sitk(path: Path, array: np.ndarray, geometry: Geometry, dtype: np.dtype, nan_fill: float | None,
                compress: bool) -> None:
    """Whole-array write through SimpleITK (2D images, NIfTI, MHA)."""
    import SimpleITK as sitk

    converted = array.astype(dtype, copy=False)
    if nan_fill is not None and converted.dtype.kind == "f" and np.isnan(converted).any():
        converted = np.nan_to_num(converted, nan=nan_fill)  # a copy: the caller's array stays as it was
    image = _sitk_from_array(converted, geometry)
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as exc:
        # ITK reports a full disk as a generic write error: tell the two apart by the free space left.
        if shutil.disk_usage(path.parent).free < max(converted.nbytes // 4, 1 << 20):
            raise OSError(errno.ENOSPC, "No space left on device") from exc
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise OSError(errno.EIO, f"SimpleITK could not write the file ({lines[0] if lines else exc})") from exc


def _label_extent(labels: np.ndarray, value: int) -> list[int] | None:
    """IJK extent ``[i_min, i_max, j_min, j_max, k_min, k_max]`` of ``labels == value`` (None when absent).

    Reduced slab by slab along k: one bool slab at a time instead of ``np.nonzero``'s three int64 index arrays
    (24 bytes per segment voxel on a big volume).
    """
    k_hits, j_any, i_any = [], np.zeros(labels.shape[1], bool), np.zeros(labels.shape[2], bool)
    for rows in _row_slabs(labels.shape):
        mask = labels[rows] == value
        k_hits.extend(rows.start + np.flatnonzero(mask.any(axis=(1, 2))))
        j_any |= mask.any(axis=(0, 2))
        i_any |= mask.any(axis=(0, 1))
    if not k_hits:
        return None
    i, j = np.flatnonzero(i_any), np.flatnonzero(j_any)
    return [int(i[0]), int(i[-1]), int(j[0]), int(j[-1]), int(k_hits[0]), int(k_hits[-1])]


def write_segmentation(
    path: str | os.PathLike,
    labels: np.ndarray,
    geometry: Geometry,
    classes: Sequence[dict[str, Any]],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a label map as a Slicer ``.seg.nrrd`` with segment names, colours and terminology.

    Args:
        labels: integer label map ``(Z, Y, X)``; 0 = background (not written as a segment).
        geometry: 3D geometry of the label map.
        classes: one dict per class: ``value`` (label), ``key`` (segment id), ``name``, ``color`` (RGB 0..255),
            optional ``terminology`` (Slicer terminology string). Classes with value 0 are skipped.
    """
    import slicerio

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"A .seg.nrrd needs a 3D label map, got shape {labels.shape}.")
    if labels.max(initial=0) > 255 or labels.min(initial=0) < 0:
        raise InputError("Label values must lie in 0..255 for a segmentation file.")
    segments = []
    for cls in classes:
        value = int(cls["value"])
        if value == 0:
            continue
        color = [float(c) / 255.0 for c in cls.get("color", (128, 128, 128))]
        segment: dict[str, Any] = {
            "id": str(cls.get("key", f"segment_{value}")),
            "name": str(cls.get("name", cls.get("key", value))),
            "labelValue": value,
            "layer": 0,
            "color": color,
        }
        terminology = cls.get("terminology")
        if terminology:
            segment["terminology"] = slicerio.segmentation.terminology_entry_from_string(terminology)
        extent = _label_extent(labels, value)
        if extent is not None:
            segment["extent"] = extent
        segments.append(segment)
    segmentation = {
        # KJI -> IJK as a view: it is Fortran-contiguous, so pynrrd's tobytes(order="F") is the only copy made
        "voxels": labels.astype(np.uint8, copy=False).transpose(2, 1, 0),
        "ijkToLPS": geometry.ijk_to_lps(),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    with atomic_path(path, overwrite=overwrite) as tmp:
        # Level 1: label maps compress almost as well as at 9, at a fraction of the time.
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=1)
    return Path(path)


# ----------------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file (or, for a folder such as a DICOM series, of its sorted files' contents)."""
    p = Path(path)
    digest = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(chunk_bytes), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """Hex sha256 of an array's shape, dtype and bytes (to prove an input was not modified)."""
    a = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
    digest.update(memoryview(a.reshape(-1)).cast("B"))  # the bytes in place: no copy of a big volume
    return digest.hexdigest()
