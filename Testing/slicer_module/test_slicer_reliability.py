"""Reliability of the module logic on real MRML (issue 6): a failure or a cancel keeps the scene as it was,
the input node is never modified, and no half-made node is left behind.

"The scene as it was" = the same node IDs, classes and names, and the input volume's voxels and IJK-to-RAS
matrix bit for bit. Fixtures (headless scene, tiny catalog, oblique volume) come from ``conftest.py``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import slicer
from conftest import ASOCT_CLASSES, TINY_MODEL, obliqueIJKToRAS

from LensSegCalibLib import Cancelled, ChecksumError, InputError, ModelError, OutputError, mrml


def _scene() -> list[tuple[str, str, str]]:
    nodes = slicer.mrmlScene.GetNodes()
    return sorted((n.GetID(), n.GetClassName(), n.GetName() or "") for n in
                  (nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())))


def _assert_scene(before: list[tuple[str, str, str]]) -> None:
    now = _scene()
    assert {"left behind": sorted(set(now) - set(before)), "removed": sorted(set(before) - set(now))} == \
        {"left behind": [], "removed": []}


def _state(volume: Any) -> tuple:
    """Everything of the input node a run could touch: voxels, geometry, name, display, transform."""
    return (mrml.volume_voxel_sha256(volume), slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume)).tobytes(),
            volume.GetName(), volume.GetDisplayNodeID(), volume.GetParentTransformNode())


def _ijk_to_ras(volume: Any) -> Any:
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m


def _add(array: np.ndarray, name: str = "scan", matrix: np.ndarray | None = None) -> Any:
    return slicer.util.addVolumeFromArray(array, obliqueIJKToRAS(array.shape) if matrix is None else matrix,
                                          name=name)


def _lens(dtype: Any = np.int16, shape: tuple = (2, 40, 48)) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    lens = ((i - 24) / 14.0) ** 2 + ((j - 20) / 9.0) ** 2 < 1
    noise = np.random.default_rng(2).normal(0, 20, shape)
    return np.rint(np.clip(60 + 120 * lens + noise, 0, 255)).astype(dtype)  # whole numbers: exact in any dtype


# --------------------------------------------------------------------------------------------- bad input
def _vector_volume() -> Any:
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb scan")
    slicer.util.updateVolumeFromArray(node, np.zeros((2, 8, 8, 3), np.uint8))
    return node


def _empty_volume() -> Any:
    return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty scan")


def _zero_spacing() -> Any:
    node = _add(_lens())
    node.SetSpacing(0.03, 0.0, 0.5)
    return node


def _under_transform() -> Any:
    node = _add(_lens())
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def _labelmap() -> Any:
    return slicer.util.addVolumeFromArray((_lens(np.uint8) > 100).astype(np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")


BAD_NODES = [
    ("vector/RGB volume", _vector_volume, "scalar volume"),
    ("volume without voxels", _empty_volume, "has no voxels"),
    ("zero spacing", _zero_spacing, "finite and positive"),
    ("volume under a transform", _under_transform, "Harden the transform"),
    ("label map as input", _labelmap, "scalar volume"),
]


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD_NODES], ids=[b[0] for b in BAD_NODES])
def test_bad_input_raises_input_error_and_keeps_the_scene(logic, make, message) -> None:
    node = make()
    before, state = _scene(), _state(node) if node.GetImageData() is not None else None
    with pytest.raises(InputError, match=message):
        logic.segment(node, model=TINY_MODEL, device="cpu")
    _assert_scene(before)
    if state is not None:
        assert _state(node) == state


def test_nothing_selected_is_an_input_error(logic) -> None:
    before = _scene()
    with pytest.raises(InputError, match="Expected a scalar volume node, got nothing"):
        logic.segment(None, model=TINY_MODEL, device="cpu")
    _assert_scene(before)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64])
def test_voxel_types_give_the_same_segmentation(logic, dtype) -> None:
    reference = logic.segment(_add(_lens(np.float32), "float32"), model=TINY_MODEL, device="cpu")
    node = _add(_lens(dtype), str(np.dtype(dtype)))
    state = _state(node)
    result = logic.segment(node, model=TINY_MODEL, device="cpu")
    np.testing.assert_array_equal(result.prediction.labels, reference.prediction.labels)
    assert _state(node) == state


def test_nan_voxels_and_a_constant_volume_still_give_valid_layers(logic) -> None:
    nan = _lens(np.float32)
    nan[0, :4, :4] = np.nan
    node = _add(nan, "nan scan")
    state = _state(node)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        result = logic.segment(node, model=TINY_MODEL, device="cpu")
    assert _state(node) == state
    for kind, layer in result.heatmaps.items():
        assert np.isfinite(slicer.util.arrayFromVolume(layer)).all(), kind  # Slicer layers need finite voxels
    flat = logic.segment(_add(np.full((2, 40, 48), 50, np.int16), "flat"), model=TINY_MODEL, device="cpu")
    assert flat.prediction.labels.shape == (2, 40, 48)
    assert all(np.isfinite(slicer.util.arrayFromVolume(n)).all() for n in flat.heatmaps.values())


def test_unknown_model_and_tampered_weights_keep_the_scene(logic, obliqueVolume, tinyCatalog, tmp_path) -> None:
    import LensSegCalib

    before, state = _scene(), _state(obliqueVolume)
    with pytest.raises(ModelError, match=f"Unknown model id 'nope'. Known models: {TINY_MODEL}"):
        logic.segment(obliqueVolume, model="nope", device="cpu")
    folder = tmp_path / "tampered"
    folder.mkdir()
    for f in Path(tinyCatalog).parent.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "tiny.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    tampered = LensSegCalib.LensSegCalibLogic(catalogPath=str(folder / "catalog.json"))
    with pytest.raises(ChecksumError, match="it was not loaded"):
        tampered.segment(obliqueVolume, model=TINY_MODEL, device="cpu")
    _assert_scene(before)
    assert _state(obliqueVolume) == state


# ------------------------------------------------------------------------------------------------- cancel
STAGES = ["Segmenting", "segmenting slices", "heat maps", "Computing the calibration report"]


@pytest.mark.parametrize("stage", STAGES)
def test_cancel_at_every_stage_leaves_the_scene_as_it_was(logic, obliqueVolume, stage) -> None:
    before, state = _scene(), _state(obliqueVolume)
    cancel = threading.Event()
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if message.startswith(stage):
            cancel.set()

    with pytest.raises(Cancelled):
        logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", progress=progress, cancel=cancel)
    assert any(m.startswith(stage) for m in seen)
    _assert_scene(before)
    assert _state(obliqueVolume) == state


def test_cancel_once_nodes_are_being_created_finishes_the_whole_result(logic, obliqueVolume) -> None:
    """Node creation is one short main-thread step: a late cancel gets a complete result, never half of one."""
    cancel = threading.Event()
    result = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", cancel=cancel,
                           progress=lambda f, m: cancel.set() if m.startswith("Creating segments") else None)
    assert cancel.is_set()
    assert set(result.heatmaps) == {"confidence", "boundary", "entropy"} and result.table is not None
    assert result.segmentation.GetSegmentation().GetNumberOfSegments() == 3


# ------------------------------------------------------------------------------------------ failing publish
# ------------------------------------------------------------------------------------------ failing publish
def test_failure_while_creating_nodes_removes_the_half_made_ones(logic, obliqueVolume, monkeypatch) -> None:
    before = _scene()

    def broken_table(*args: Any, **kwargs: Any) -> None:
        raise OutputError("simulated failure after the segmentation and heatmaps were created")

    monkeypatch.setattr(mrml, "add_table", broken_table)
    with pytest.raises(OutputError, match="simulated"):
        logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu")
    _assert_scene(before)


# ------------------------------------------------------------------------------------------------ export
def test_export_never_overwrites_without_the_choice_and_reports_unwritable_folders(logic, obliqueVolume,
                                                                                   tmp_path) -> None:
    result = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu")
    folder = tmp_path / "export"
    written = [Path(p) for p in logic.export_report(result, str(folder), overwrite=False)]
    stamps = {p: p.read_bytes() for p in written}
    with pytest.raises(OutputError, match="already exist"):
        logic.export_report(result, str(folder), overwrite=False)
    assert {p: p.read_bytes() for p in written} == stamps
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="Cannot create output folder"):
        logic.export_report(result, str(blocker / "sub"), overwrite=True)


def test_exported_html_escapes_node_and_segment_names(logic, tmp_path) -> None:
    node = _add(_lens(), "<script>alert(1)</script>")
    result = logic.segment(node, model=TINY_MODEL, device="cpu")
    written = logic.export_report(result, str(tmp_path / "export"))
    html = Path(next(p for p in written if p.endswith(".html"))).read_text(encoding="utf-8")
    assert "<script>alert(1)" not in html  # the node name reaches the report only escaped or made file-safe
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html or "script_alert_1___script" in html


def test_batch_goes_on_past_a_bad_file(logic, tmp_path) -> None:
    good = _add(_lens(), "good")
    assert slicer.util.saveNode(good, str(tmp_path / "good.nrrd"))
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\n")
    before = _scene()
    rows = logic.batch([str(tmp_path / "broken.nrrd"), str(tmp_path / "good.nrrd")], str(tmp_path / "out"),
                       model=TINY_MODEL, device="cpu")
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert "Cannot read" in rows[0]["error"]
    _assert_scene(before)  # batch files are never loaded into the scene
    assert (tmp_path / "out" / "good_report.json").is_file()
    assert ASOCT_CLASSES[1]["name"] in (tmp_path / "out" / "good_report.html").read_text(encoding="utf-8")
