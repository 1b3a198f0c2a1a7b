"""A rerun into an existing result on real MRML (issue 6): after a failure or a cancel at any stage the earlier
result is intact, value for value; after success the new one is complete. Never a mix of the two.

"Intact" = every node of the scene with the same ID, class, name and attributes, and the same content: voxels and
IJK-to-RAS matrix of volumes, segments (IDs, names, colours, binary labelmaps), table cells and units, plot series
columns and tables, chart titles and series, heatmap display (colour table, window, threshold).
The rerun segments a *different* volume (other voxels, name and grid) into the same output, so every node it
would touch gets other content: a half-done swap cannot hide behind equal values.
Also here: float16 maps of a ``Prediction`` become float32 volume nodes (VTK has no half type).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import numpy as np
import pytest
import slicer
from lsc_testdata import ASOCT_CLASSES, TINY_MODEL, obliqueIJKToRAS

from LensSegCalibLib import Cancelled, OutputError, mrml


# ------------------------------------------------------------------------------------------- scene content
def _attributes(node: Any) -> tuple:
    return tuple(sorted((name, node.GetAttribute(name)) for name in node.GetAttributeNames()))


def _matrix(node: Any) -> bytes:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).tobytes()


def _segments(node: Any) -> tuple:
    """(ID, name, colour, label value, hash of the segment's voxels in its labelmap) per segment, in order."""
    import hashlib

    from vtk.util.numpy_support import vtk_to_numpy

    segmentation = node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        image = segment.GetRepresentation(labelmap)
        digest = "no labelmap"
        if image is not None and image.GetPointData().GetScalars() is not None:
            voxels = vtk_to_numpy(image.GetPointData().GetScalars()) == segment.GetLabelValue()
            digest = hashlib.sha256(str(image.GetExtent()).encode() + np.packbits(voxels).tobytes()).hexdigest()
        out.append((segmentation.GetNthSegmentID(index), segment.GetName(), tuple(segment.GetColor()),
                    segment.GetLabelValue(), digest))
    return tuple(out)


def _table(node: Any) -> tuple:
    columns = tuple(node.GetColumnName(c) for c in range(node.GetNumberOfColumns()))
    cells = tuple(tuple(node.GetCellText(r, c) for c in range(len(columns))) for r in range(node.GetNumberOfRows()))
    return columns, cells, tuple(node.GetColumnUnitLabel(c) for c in columns)


def _content(node: Any) -> tuple:
    """Everything of one node that a rerun could change, by value."""
    parts: list = [node.GetID(), node.GetClassName(), node.GetName() or "", _attributes(node)]
    if node.IsA("vtkMRMLScalarVolumeNode") and node.GetImageData() is not None:
        parts += [mrml.volume_voxel_sha256(node), _matrix(node)]
    if node.IsA("vtkMRMLSegmentationNode"):
        parts.append(_segments(node))
    if node.IsA("vtkMRMLTableNode"):
        parts.append(_table(node))
    if node.IsA("vtkMRMLPlotSeriesNode"):
        parts.append((node.GetTableNodeID(), node.GetXColumnName(), node.GetYColumnName()))
    if node.IsA("vtkMRMLPlotChartNode"):
        parts.append((node.GetTitle(), tuple(node.GetNthPlotSeriesNodeID(i)
                                            for i in range(node.GetNumberOfPlotSeriesNodes()))))
    if node.IsA("vtkMRMLScalarVolumeDisplayNode"):
        parts.append((node.GetColorNodeID(), node.GetWindowLevelMin(), node.GetWindowLevelMax(),
                      node.GetLowerThreshold(), node.GetUpperThreshold(), node.GetInvertDisplayScalarRange()))
    if node.IsA("vtkMRMLSegmentationDisplayNode"):
        parts.append((node.GetOpacity2DFill(), node.GetVisibility2DOutline(), node.GetSliceIntersectionThickness()))
    return tuple(parts)


def _scene() -> list:
    nodes = slicer.mrmlScene.GetNodes()
    return sorted((_content(nodes.GetItemAsObject(i)) for i in range(nodes.GetNumberOfItems())), key=lambda c: c[0])


def _assert_same_scene(before: list) -> None:
    now = _scene()
    ids, idsBefore = {c[0] for c in now}, {c[0] for c in before}
    assert {"added": sorted(ids - idsBefore), "removed": sorted(idsBefore - ids)} == {"added": [], "removed": []}
    changed = [(b, n) for b, n in zip(before, now) if b != n]
    assert not changed, f"{len(changed)} node(s) of the earlier result changed, first: {changed[0]}"


# ---------------------------------------------------------------------------------------------- inputs
def _reference(volume: Any) -> Any:
    """Reference segmentation on ``volume``'s grid: an ellipse ring as capsule, its core as nucleus."""
    shape = slicer.util.arrayFromVolume(volume).shape
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    r = ((i - shape[2] / 2) / (shape[2] / 3.4)) ** 2 + ((j - shape[1] / 2) / (shape[1] / 4.4)) ** 2
    labels = np.zeros(shape, np.uint8)
    labels[r < 1.0] = 1
    labels[r < 0.6] = 3
    return mrml.update_segmentation(labels, volume, ASOCT_CLASSES, name=f"{volume.GetName()} truth", show3D=False)


def _second_volume() -> Any:
    """Other voxels, name, size and grid than ``obliqueVolume``: every rerun output differs from the first."""
    rng = np.random.default_rng(7)
    k, j, i = np.meshgrid(np.arange(2), np.arange(36), np.arange(44), indexing="ij")
    lens = ((i - 18) / 12.0) ** 2 + ((j - 19) / 8.0) ** 2 < 1
    image = (150 + 600 * lens + rng.normal(0, 60, lens.shape)).astype(np.int16)
    matrix = obliqueIJKToRAS(image.shape)
    matrix[:3, 3] += (3.0, 1.5, -2.0)
    return slicer.util.addVolumeFromArray(image, matrix, name="second scan")


@dataclasses.dataclass
class _Failure:
    """Make ``mrml.<name>`` raise OutputError on its ``nth`` matching call, after doing its work (worst case)."""

    name: str
    nth: int = 1
    match: Callable[..., bool] = lambda *args, **kwargs: True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> list:
        owner, attribute = (mrml._Swap, self.name[6:]) if self.name.startswith("_Swap.") else (mrml, self.name)
        real = getattr(owner, attribute)
        calls: list = []

        def failing(*args: Any, **kwargs: Any) -> Any:
            value = real(*args, **kwargs)
            if self.match(*args, **kwargs):
                calls.append(attribute)
                if len(calls) == self.nth:
                    raise OutputError(f"simulated failure in {self.name} (call {self.nth})")
            return value

        monkeypatch.setattr(owner, attribute, failing)
        return calls


# Every stage of building a result, and every step of swapping it into the earlier one.
FAILURES = {
    "second segment imported": _Failure("_import_mask", 2),
    "segmentation built": _Failure("update_segmentation"),
    "second heatmap built": _Failure("add_heatmap", 2),
    "report table built": _Failure("add_table", match=lambda *a, **k: k.get("role", "report") == "report"),
    "report rows": _Failure("report_rows"),
    "second reliability diagram built": _Failure("add_reliability_chart", 2),
    "built result checked": _Failure("_check_built"),
    "segmentation swapped in": _Failure("_Swap.segmentation"),
    "second heatmap swapped in": _Failure("_Swap.volume", 2),
    "report table swapped in": _Failure("_Swap.table", match=lambda swap, old, new: old.GetAttribute(
        mrml.ROLE_ATTRIBUTE) == "report"),
    "reliability chart swapped in": _Failure("_Swap.plot", 2),
}
#: (reference for the first run, reference for the rerun): diagrams updated, added, or dropped by the rerun.
REFERENCES = {"with reference": (True, True), "reference added": (False, True), "reference dropped": (True, False),
              "no reference": (False, False)}


def _reaches(stage: str, firstReference: bool, rerunReference: bool) -> bool:
    """Diagrams are built only with a reference, and swapped only into the diagrams of a first run with one."""
    return "reliability" not in stage or (rerunReference and (firstReference or "swapped" not in stage))


RERUN_CASES = [(stage, references) for stage in FAILURES for references in REFERENCES
               if _reaches(stage, *REFERENCES[references])]
FIRST_RUN_CASES = [(stage, withReference) for stage in FAILURES if "swapped" not in stage
                   for withReference in (False, True) if _reaches(stage, False, withReference)]


@pytest.mark.parametrize("stage, references", RERUN_CASES, ids=[f"{s}-{r}" for s, r in RERUN_CASES])
def test_failed_rerun_keeps_the_earlier_result(logic, obliqueVolume, monkeypatch, stage, references) -> None:
    firstReference, rerunReference = REFERENCES[references]
    first = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu",
                          reference=_reference(obliqueVolume) if firstReference else None)
    second = _second_volume()
    reference = _reference(second) if rerunReference else None
    before = _scene()
    calls = FAILURES[stage].install(monkeypatch)
    with pytest.raises(OutputError, match="simulated failure"):
        logic.segment(second, model=TINY_MODEL, device="cpu", output=first.segmentation, reference=reference)
    assert calls, "the failure was not injected: the stage was never reached"
    _assert_same_scene(before)
    assert all(slicer.mrmlScene.IsNodePresent(node) for node in first.nodes)
    # Nothing is stuck: the plain rerun then updates the same nodes in place.
    monkeypatch.undo()
    again = logic.segment(second, model=TINY_MODEL, device="cpu", output=first.segmentation, reference=reference)
    assert again.segmentation is first.segmentation
    assert {k: n.GetID() for k, n in again.heatmaps.items()} == {k: n.GetID() for k, n in first.heatmaps.items()}
    assert again.table.GetID() == first.table.GetID()
    _assert_complete(again, second, reference is not None)


def _assert_complete(result: Any, volume: Any, withReference: bool) -> None:
    """Every node of ``result`` holds this run's numbers, nothing of an earlier run."""
    prediction = result.prediction
    labels = mrml.labels_from_segmentation(result.segmentation, volume, ASOCT_CLASSES)
    np.testing.assert_array_equal(labels, prediction.labels)
    for name, node in result.heatmaps.items():
        assert node.GetName() == f"{volume.GetName()} {'boundary calibration' if name == 'boundary' else name}"
        assert _matrix(node) == _matrix(volume), name
        values = slicer.util.arrayFromVolume(node)
        if name == "boundary" and withReference:
            expected = np.asarray(result.report.preview["signed_map"], dtype=np.float32)
        else:
            expected = np.nan_to_num(np.asarray(getattr(prediction, name), dtype=np.float32), nan=0.0)
        np.testing.assert_array_equal(values, expected, err_msg=name)
    signed = result.heatmaps["boundary"].GetAttribute(mrml.KIND_ATTRIBUTE) == "boundary_signed"
    assert signed == withReference
    assert result.table.GetName() == f"{volume.GetName()} calibration report"
    assert [result.table.GetCellText(r, 0) for r in range(result.table.GetNumberOfRows())] == \
        [s.name for s in result.report.segments]
    assert ("dice" in _table(result.table)[0]) == withReference
    assert bool(result.plots) == withReference
    charts = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode")
    assert charts == len(result.plots)  # no chart of the earlier run left over
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 2 * charts
    for chart in result.plots:
        assert chart.GetName().startswith(volume.GetName())
        key = chart.GetAttribute(mrml.KIND_ATTRIBUTE)
        reliability = result.report.summary["reliability"] if key == "all" else \
            next(s for s in result.report.segments if s.key == key).reliability
        counts = np.asarray(reliability["count"])
        table = chart.GetNthPlotSeriesNode(0).GetTableNode()
        assert chart.GetNthPlotSeriesNode(1).GetTableNode() is table
        np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(table, "Count"), counts[counts > 0])


@pytest.mark.parametrize("references", list(REFERENCES), ids=list(REFERENCES))
def test_successful_rerun_replaces_every_part_in_place(logic, obliqueVolume, references) -> None:
    firstReference, rerunReference = REFERENCES[references]
    first = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu",
                          reference=_reference(obliqueVolume) if firstReference else None)
    firstPlots = {c.GetAttribute(mrml.KIND_ATTRIBUTE): c.GetID() for c in first.plots}
    second = _second_volume()
    reference = _reference(second) if rerunReference else None
    count = slicer.mrmlScene.GetNumberOfNodes()
    again = logic.segment(second, model=TINY_MODEL, device="cpu", output=first.segmentation, reference=reference)
    _assert_complete(again, second, rerunReference)
    assert again.segmentation is first.segmentation and again.table.GetID() == first.table.GetID()
    assert {k: n.GetID() for k, n in again.heatmaps.items()} == {k: n.GetID() for k, n in first.heatmaps.items()}
    for chart in again.plots:  # diagrams of the earlier run are updated in place, new ones added
        assert firstPlots.get(chart.GetAttribute(mrml.KIND_ATTRIBUTE), chart.GetID()) == chart.GetID()
    # Diagrams added (4 nodes each) or dropped, and the signed-gap colour table a first signed map adds.
    added = 4 * (len(again.plots) - len(first.plots)) + (1 if rerunReference and not firstReference else 0)
    assert slicer.mrmlScene.GetNumberOfNodes() == count + added
    assert not [n for n in _all() if (n.GetName() or "").startswith("__LensSegCalib")]  # no staging leftovers


def _all() -> list:
    nodes = slicer.mrmlScene.GetNodes()
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def test_rerun_keeps_the_users_segments_and_their_display(logic, obliqueVolume) -> None:
    user = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segments")
    user.CreateDefaultDisplayNodes()
    user.GetSegmentation().AddEmptySegment("cornea", "Cornea", (0.9, 0.1, 0.1))
    cornea = np.zeros(slicer.util.arrayFromVolume(obliqueVolume).shape, bool)
    cornea[:, 2:6, 10:30] = True  # painted by the user: kept voxel for voxel
    mrml._import_mask(cornea, user, "cornea", obliqueVolume)
    user.GetSegmentation().AddEmptySegment("notes", "Notes", (0.1, 0.9, 0.1))  # no voxels at all
    user.GetDisplayNode().SetSegmentOpacity2DFill("cornea", 0.77)
    first = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", output=user)
    logic.segment(_second_volume(), model=TINY_MODEL, device="cpu", output=first.segmentation)
    segmentation = user.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert ids == ["cornea", "notes", "capsule", "cortex", "nucleus"] and user.GetName() == "my segments"
    assert user.GetDisplayNode().GetSegmentOpacity2DFill("cornea") == pytest.approx(0.77)
    np.testing.assert_array_equal(mrml._export_mask(user, "cornea", obliqueVolume), cornea)


CANCEL_STAGES = ["Segmenting", "segmenting slices", "heat maps", "Computing the calibration report"]


@pytest.mark.parametrize("stage", CANCEL_STAGES)
def test_cancelled_rerun_keeps_the_earlier_result(logic, obliqueVolume, stage) -> None:
    first = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", reference=_reference(obliqueVolume))
    second = _second_volume()
    reference = _reference(second)
    before = _scene()
    cancel = threading.Event()
    seen: list = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if message.startswith(stage):
            cancel.set()

    with pytest.raises(Cancelled):
        logic.segment(second, model=TINY_MODEL, device="cpu", output=first.segmentation, reference=reference,
                      progress=progress, cancel=cancel)
    assert any(m.startswith(stage) for m in seen)
    _assert_same_scene(before)


@pytest.mark.parametrize("stage, withReference", FIRST_RUN_CASES,
                         ids=[f"{s}-{'reference' if r else 'no reference'}" for s, r in FIRST_RUN_CASES])
def test_failed_first_run_leaves_no_new_node(logic, obliqueVolume, monkeypatch, stage, withReference) -> None:
    reference = _reference(obliqueVolume) if withReference else None
    before = _scene()
    calls = FAILURES[stage].install(monkeypatch)
    with pytest.raises(OutputError, match="simulated failure"):
        logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", reference=reference)
    assert calls
    _assert_same_scene(before)  # incl. the signed-gap colour table a first signed map adds


# --------------------------------------------------------------------------------------------- float16
class _HalfMaps:
    """A segmenter whose Prediction carries float16 confidence/entropy/boundary maps (what inference returns)."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter
        self.classes = segmenter.classes
        self.model_id = segmenter.model_id
        self.float32: dict = {}

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        prediction = self.segmenter.predict(*args, **kwargs)
        self.float32 = {name: np.asarray(getattr(prediction, name), dtype=np.float32)
                        for name in ("confidence", "entropy", "boundary")}
        return dataclasses.replace(prediction, **{name: value.astype(np.float16)
                                                  for name, value in self.float32.items()})


@pytest.mark.parametrize("withReference", [False, True])
def test_float16_maps_become_float32_volume_nodes(logic, obliqueVolume, withReference) -> None:
    half = _HalfMaps(logic.segmenter(TINY_MODEL, "cpu"))
    reference = _reference(obliqueVolume) if withReference else None
    result = logic.segment(obliqueVolume, model=half, device="cpu", reference=reference)
    assert {result.prediction.confidence.dtype, result.prediction.entropy.dtype} == {np.dtype(np.float16)}
    for name, node in result.heatmaps.items():
        assert node.GetImageData().GetScalarTypeAsString() == "float", name
        values = slicer.util.arrayFromVolume(node)
        assert values.dtype == np.float32
        if name == "boundary" and withReference:
            continue  # the signed map comes from the report (compared in _assert_complete)
        exact = np.nan_to_num(getattr(result.prediction, name).astype(np.float32), nan=0.0)
        np.testing.assert_array_equal(values, exact, err_msg=name)  # float16 -> float32 is exact
        original = np.nan_to_num(half.float32[name], nan=0.0)
        np.testing.assert_allclose(values, original, rtol=2.0 ** -11, atol=2.0 ** -14, err_msg=name)
    _assert_complete(result, obliqueVolume, withReference)
    # And a rerun into the same nodes (the update path) with float16 maps.
    again = logic.segment(obliqueVolume, model=half, device="cpu", reference=reference, output=result.segmentation)
    assert again.heatmaps["entropy"].GetImageData().GetScalarTypeAsString() == "float"
    _assert_complete(again, obliqueVolume, withReference)


def test_add_volume_turns_float16_into_float32(slicerEnv) -> None:
    from LensSegCalibLib.io import Geometry

    values = (np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 23.0).astype(np.float16)
    geometry = Geometry(spacing=(1.0, 0.5, 0.25), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    node = mrml.add_volume(values, geometry, "half")
    assert node.GetImageData().GetScalarTypeAsString() == "float"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), values.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_add_heatmap_stores_float32_and_leaves_the_callers_map_alone(slicerEnv, dtype) -> None:
    from LensSegCalibLib.io import Geometry

    values = np.linspace(0.0, 1.0, 24).reshape(2, 3, 4).astype(dtype)
    values[0, 0, :2] = np.nan  # outside the boundary band
    before = values.copy()
    geometry = Geometry(spacing=(1.0, 0.5, 0.25), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    node = mrml.add_heatmap(values, geometry, "boundary", "map")
    np.testing.assert_array_equal(values, before)  # NaN still there: the caller's array was not cleaned in place
    stored = slicer.util.arrayFromVolume(node)
    assert stored.dtype == np.float32 and node.GetImageData().GetScalarTypeAsString() == "float"
    np.testing.assert_array_equal(stored, np.nan_to_num(before.astype(np.float32), nan=0.0))
