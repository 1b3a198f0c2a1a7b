"""Files in and out: geometry survives round trips, Slicer segment metadata is written, nothing is lost."""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LensSegCalibLib import io
from LensSegCalibLib.errors import InputError, OutputError

OBLIQUE = np.array(
    [[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, 1.0]]
)  # 30 degrees about z


def _geometry() -> io.Geometry:
    return io.Geometry(spacing=(2.5, 0.4, 0.3), origin=(-12.0, 30.5, 7.25), direction=tuple(OBLIQUE.ravel()))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_volume_round_trip_keeps_voxels_and_geometry(tmp_path: Path, suffix: str):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    geometry = _geometry()
    path = io.write_volume(tmp_path / f"vol{suffix}", array, geometry)
    image = io.read_image(path)
    np.testing.assert_array_equal(image.array, array)
    np.testing.assert_allclose(image.geometry.spacing, geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(image.geometry.origin, geometry.origin, atol=1e-5)
    np.testing.assert_allclose(image.geometry.direction_matrix(), OBLIQUE, atol=1e-5)


def test_ijk_to_lps_maps_voxel_indices_like_simpleitk():
    geometry = _geometry()
    image = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    geometry.apply_to_sitk(image)
    for ijk in [(0, 0, 0), (5, 0, 0), (2, 3, 1), (5, 4, 3)]:
        expected = image.TransformIndexToPhysicalPoint(ijk)
        got = geometry.ijk_to_lps() @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(got[:3], expected, atol=1e-9)
    ras = geometry.ijk_to_ras() @ np.array([2, 3, 1, 1.0])
    lps = geometry.ijk_to_lps() @ np.array([2, 3, 1, 1.0])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]])


@pytest.mark.parametrize("slab_values", [None, 6 * 7])  # 6 * 7: extents reduced one k-slice at a time
def test_segmentation_round_trip_has_names_colours_and_labels(tmp_path: Path, monkeypatch, slab_values):
    if slab_values:
        monkeypatch.setattr(io, "_WRITE_SLAB_VALUES", slab_values)
    import slicerio

    labels = np.zeros((3, 6, 7), np.uint8)
    labels[1, 1:4, 2:5] = 2
    labels[1, 2, 3] = 3
    labels[2, 4, 1] = 1
    classes = [
        {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
        {"value": 1, "key": "capsule", "name": "Lens capsule", "color": [255, 200, 0]},
        {"value": 2, "key": "cortex", "name": "Lens cortex", "color": [0, 128, 255]},
        {"value": 3, "key": "nucleus", "name": "Lens nucleus", "color": [255, 0, 0],
         "terminology": "Segmentation category and type - LensSegCalib~SCT^123037004^Anatomical Structure"
                        "~SCT^78076003^Lens~^^~~^^~^^"},
    ]
    geometry = _geometry()
    path = io.write_segmentation(tmp_path / "case.seg.nrrd", labels, geometry, classes)
    back, back_geometry, segments = io.read_segmentation(path)
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(back_geometry.spacing, geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(back_geometry.origin, geometry.origin, atol=1e-6)
    names = {s["name"]: s for s in segments}
    assert set(names) == {"Lens capsule", "Lens cortex", "Lens nucleus"}
    np.testing.assert_allclose(names["Lens capsule"]["color"], [1.0, 200 / 255, 0.0], atol=1e-6)
    assert names["Lens nucleus"]["terminology"]["type"][1] == "78076003"
    seg = slicerio.read_segmentation(str(path))  # Slicer's own reader sees the same label values
    assert sorted(s["labelValue"] for s in seg["segments"]) == [1, 2, 3]
    # Slicer's per-segment extent (IJK: i = x, j = y, k = z, inclusive), computed slab by slab
    extents = {s["labelValue"]: s["extent"] for s in seg["segments"]}
    assert extents == {1: [1, 1, 4, 4, 2, 2], 2: [2, 4, 1, 3, 1, 1], 3: [3, 3, 2, 2, 1, 1]}


def test_existing_output_is_never_overwritten_without_being_asked(tmp_path: Path):
    path = tmp_path / "out.nrrd"
    geometry = io.Geometry((1.0, 1.0, 1.0))
    io.write_volume(path, np.zeros((2, 2, 2), np.float32), geometry)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="overwrite"):
        io.write_volume(path, np.ones((2, 2, 2), np.float32), geometry)
    assert path.read_bytes() == before
    io.write_volume(path, np.ones((2, 2, 2), np.float32), geometry, overwrite=True)
    assert io.read_image(path).array.max() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["out.nrrd"]  # no temporaries left


def test_full_disk_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    """SimpleITK writer (MHA) and the streamed NRRD writer both die half-way: no file, a clear error."""
    def failing_write(image, name, *args):
        Path(name).write_bytes(b"half")  # a writer that dies half-way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(OutputError, match="disk is full"):
        io.write_volume(tmp_path / "x.mha", np.zeros((2, 2, 2), np.float32), io.Geometry((1, 1, 1)))
    assert list(tmp_path.iterdir()) == []

    real_open = open

    class FillsUp:  # the header fits, the first slab of voxels does not
        def __init__(self, *args, **kwargs):
            self._fh = real_open(*args, **kwargs)
            self._writes = 0

        def write(self, data):
            self._writes += 1
            if self._writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    monkeypatch.setattr(io, "open", FillsUp, raising=False)
    with pytest.raises(OutputError, match="disk is full"):
        io.write_volume(tmp_path / "x.nrrd", np.zeros((4, 5, 6), np.float16), io.Geometry((1, 1, 1)))
    assert list(tmp_path.iterdir()) == []


def test_race_for_the_same_output_has_one_winner(tmp_path: Path):
    final = tmp_path / "r.nrrd"
    with pytest.raises(OutputError, match="another run"):
        with io.atomic_path(final) as tmp:
            tmp.write_bytes(b"mine")
            final.write_bytes(b"theirs")  # another process finished first
    assert final.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["r.nrrd"]


def test_output_folder_that_cannot_be_created_is_named(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where the folder should go: fails for root too
    with pytest.raises(OutputError, match="Cannot create output folder"):
        io.ensure_output_dir(blocker / "sub")
    with pytest.raises(OutputError):
        io.write_volume(blocker / "sub" / "v.nrrd", np.zeros((2, 2, 2), np.float32), io.Geometry((1, 1, 1)))


def test_bad_files_get_clear_errors(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        io.read_image(tmp_path / "missing.nrrd")
    text = tmp_path / "notes.nrrd"
    text.write_text("this is not an image\n")
    with pytest.raises(InputError, match="Cannot read"):
        io.read_image(text)
    good = io.write_volume(tmp_path / "good.nrrd", np.zeros((4, 8, 8), np.float32), io.Geometry((1, 1, 1)),
                           compress=False)
    truncated = tmp_path / "truncated.nrrd"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InputError):
        io.read_image(truncated)
    rgb = sitk.Image([4, 4, 2], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="components"):
        io.read_image(tmp_path / "rgb.nrrd")
    with pytest.raises(InputError, match="DICOM"):
        io.read_image(tmp_path)  # a folder with no DICOM series


def test_invalid_spacing_is_refused(tmp_path: Path):
    with pytest.raises(InputError, match="positive"):
        io.Geometry((1.0, 0.0, 1.0)).validate()
    with pytest.raises(InputError, match="positive"):
        io.Geometry((1.0, float("nan"), 1.0)).validate()


def test_sha256_of_array_detects_a_changed_voxel():
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    h = io.sha256_array(a)
    b = a.copy()
    b[1, 2, 3] += 1
    assert io.sha256_array(b) != h and io.sha256_array(a.copy()) == h


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path: Path, suffix: str):
    rng = np.random.default_rng(1)
    array = rng.normal(size=(3, 40, 48)).astype(np.float32)
    good = io.write_volume(tmp_path / f"good{suffix}", array, io.Geometry((1, 1, 1)))
    np.testing.assert_array_equal(io.read_image(good).array, array)  # complete files still read
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        io.read_image(cut)


def test_itk_write_error_on_a_full_disk_says_disk_full(tmp_path: Path, monkeypatch):
    def itk_failure(image, name, *args):
        Path(name).write_bytes(b"part")
        raise RuntimeError("itk::ERROR: NrrdImageIO: couldn't write gzip data")

    monkeypatch.setattr(sitk, "WriteImage", itk_failure)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OutputError, match="disk is full"):
        io.write_volume(tmp_path / "x.mha", np.zeros((2, 2, 2), np.float32), io.Geometry((1, 1, 1)))
    assert list(tmp_path.iterdir()) == []


def test_streamed_nrrd_equals_the_simpleitk_file_for_an_oblique_volume(tmp_path: Path, monkeypatch):
    """3D .nrrd files are written slab by slab (big volumes); ITK, pynrrd and slicerio must read exactly what the
    whole-array SimpleITK writer would have written: voxels (float16 -> float32, NaN -> fill) and geometry."""
    import nrrd

    monkeypatch.setattr(io, "_WRITE_SLAB_VALUES", 7 * 9)  # one row per slab: 5 slabs
    rotation = np.array([[0.0, -0.6, 0.8], [1.0, 0.0, 0.0], [0.0, 0.8, 0.6]])
    geometry = io.Geometry((2.5, 0.4, 0.3), (-12.5, 30.25, 7.0), tuple(rotation.ravel()))
    rng = np.random.default_rng(5)
    array = rng.random((5, 9, 7)).astype(np.float16)
    array[1, 2, 3] = np.nan
    before = array.copy()
    for compress in (True, False):
        streamed = io.write_volume(tmp_path / f"s{compress}.nrrd", array, geometry, compress=compress, nan_fill=0.0)
        expected = np.nan_to_num(array.astype(np.float32), nan=0.0)
        whole = io.write_volume(tmp_path / f"w{compress}.mha", expected, geometry, compress=compress)
        a, b = io.read_image(streamed), io.read_image(whole)
        assert a.array.dtype == np.float32
        np.testing.assert_array_equal(a.array, expected)
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_allclose(a.geometry.spacing, b.geometry.spacing, rtol=1e-12)
        np.testing.assert_allclose(a.geometry.origin, b.geometry.origin, rtol=1e-12)
        np.testing.assert_allclose(a.geometry.direction, b.geometry.direction, atol=1e-12)
        data, header = nrrd.read(str(streamed))  # pynrrd (what slicerio uses): IJK order
        np.testing.assert_array_equal(data.transpose(2, 1, 0), expected)
        assert header["space"] == "left-posterior-superior"
    np.testing.assert_array_equal(array, before)  # the caller's array is untouched (NaN stays NaN)
    kept = io.read_image(io.write_volume(tmp_path / "nan.nrrd", array, geometry)).array  # no fill: NaN kept
    assert np.isnan(kept[1, 2, 3]) and np.isfinite(np.delete(kept.ravel(), 1 * 63 + 2 * 7 + 3)).all()
