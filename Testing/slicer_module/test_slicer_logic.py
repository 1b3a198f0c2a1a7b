"""LensSegCalibLogic on real MRML (slicer-core): geometry, nodes, reruns, cancel, export, batch."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import slicer
from lsc_testdata import ASOCT_CLASSES, TEST_SPACING, TINY_MODEL, obliqueIJKToRAS

from LensSegCalibLib import Cancelled, mrml


def _matrix(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def test_segment_creates_nodes_on_the_volume_geometry(logic, obliqueVolume):
    result = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu")
    segmentation = result.segmentation.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == [c["name"] for c in ASOCT_CLASSES[1:]]
    assert [segmentation.GetNthSegmentID(i) for i in range(3)] == ["capsule", "cortex", "nucleus"]
    capsule = segmentation.GetSegment("capsule")
    assert np.allclose(capsule.GetColor(), np.array([255, 220, 80]) / 255.0)
    assert mrml_tag(capsule) == ASOCT_CLASSES[1]["terminology"]
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    assert segmentation.ContainsRepresentation(surface)  # 3D view shows surfaces
    display = result.segmentation.GetDisplayNode()
    assert display.GetVisibility2DOutline() and display.GetOpacity2DFill() == pytest.approx(0.3)
    # Labels come back on the volume's grid, voxel for voxel (KJI order, oblique geometry).
    labels = mrml.labels_from_segmentation(result.segmentation, obliqueVolume, ASOCT_CLASSES)
    np.testing.assert_array_equal(labels, result.prediction.labels)
    assert result.prediction.labels.shape == slicer.util.arrayFromVolume(obliqueVolume).shape
    assert np.allclose(result.prediction.spacing, TEST_SPACING)  # IJK spacing reversed into array order
    for kind, node in result.heatmaps.items():
        assert np.allclose(_matrix(node), obliqueIJKToRAS(None)), kind
        display = node.GetDisplayNode()
        assert display is not None and display.GetColorNode() is not None
        assert not display.GetAutoWindowLevel()
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
        assert node.GetImageData().GetScalarTypeAsString() == "float"
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result.heatmaps["confidence"]),
                               result.prediction.confidence, atol=0)
    assert result.heatmaps["confidence"].GetDisplayNode().GetColorNodeID() == \
        "vtkMRMLColorTableNodeFileInferno.txt"


def mrml_tag(segment) -> str:
    import vtk

    value = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)


def test_geometry_conversion_round_trip(slicerEnv, obliqueVolume):
    geometry = mrml.geometry_from_volume(obliqueVolume)
    assert geometry.spacing == pytest.approx(TEST_SPACING)
    ras = obliqueIJKToRAS(None)
    # LPS origin = RAS origin with x, y negated; LPS direction = RAS direction with rows 0, 1 negated.
    assert geometry.origin == pytest.approx((-12.5, 40.0, 7.25))
    direction = np.asarray(geometry.direction).reshape(3, 3)
    np.testing.assert_allclose(direction, np.diag([-1, -1, 1]) @ (ras[:3, :3] / np.asarray(TEST_SPACING[::-1])))
    np.testing.assert_allclose(mrml.ijk_to_ras_from_geometry(geometry), ras, atol=1e-12)


def _nodeIds(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.mark.parametrize("withReference", [False, True])
def test_rerun_into_output_replaces_instead_of_duplicating(logic, obliqueVolume, cleanScene, withReference):
    reference = _referenceFor(obliqueVolume)[0] if withReference else None
    first = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", reference=reference)
    before = _nodeIds(cleanScene)
    again = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", output=first.segmentation,
                          reference=reference)
    assert _nodeIds(cleanScene) == before  # same nodes, updated in place (charts too), no temporary leftovers
    assert [c.GetID() for c in again.plots] == [c.GetID() for c in first.plots]
    assert bool(first.plots) == withReference
    assert again.segmentation is first.segmentation
    assert {k: n.GetID() for k, n in again.heatmaps.items()} == {k: n.GetID() for k, n in first.heatmaps.items()}
    assert again.table.GetID() == first.table.GetID()
    assert first.segmentation.GetSegmentation().GetNumberOfSegments() == 3


def test_rerun_keeps_the_users_other_segments(logic, obliqueVolume):
    user = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segments")
    user.GetSegmentation().AddEmptySegment("cornea", "Cornea", (0.9, 0.1, 0.1))
    result = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", output=user)
    ids = [user.GetSegmentation().GetNthSegmentID(i) for i in range(user.GetSegmentation().GetNumberOfSegments())]
    assert result.segmentation is user and ids == ["cornea", "capsule", "cortex", "nucleus"]


def test_input_voxels_and_geometry_are_unchanged(logic, obliqueVolume):
    voxels = mrml.volume_voxel_sha256(obliqueVolume)
    matrix = _matrix(obliqueVolume)
    logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu")
    assert mrml.volume_voxel_sha256(obliqueVolume) == voxels
    np.testing.assert_array_equal(_matrix(obliqueVolume), matrix)


def test_cancel_mid_run_leaves_no_nodes(logic, obliqueVolume, cleanScene):
    before = _nodeIds(cleanScene)
    cancel = threading.Event()
    seen = []

    def progress(fraction: float, message: str) -> None:
        seen.append(fraction)
        if fraction > 0.05:  # inside inference: the segmenter checks the event between batches
            cancel.set()

    with pytest.raises(Cancelled):
        logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", progress=progress, cancel=cancel)
    assert max(seen) < 0.95  # stopped before the node-creation stage
    assert _nodeIds(cleanScene) == before


def test_progress_is_monotonic_and_ends_at_one(logic, obliqueVolume):
    seen = []
    logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and all(b >= a for a, b in zip(seen, seen[1:]))


def test_export_writes_the_same_files_as_the_cli(logic, obliqueVolume, tinyCatalog, tmp_path):
    from LensSegCalibLib.cli import main

    result = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu")
    exported = tmp_path / "export"
    written = logic.export_report(result, str(exported))
    # The CLI on the same voxels and geometry, saved by Slicer as NRRD under the node's name.
    source = tmp_path / "oblique_scan.nrrd"
    assert slicer.util.exportNode(obliqueVolume, str(source))
    cli = tmp_path / "cli"
    code = main(["segment", str(source), "--model", TINY_MODEL, "--out", str(cli), "--catalog", tinyCatalog,
                 "--device", "cpu", "--quiet"])
    assert code == 0
    cliFiles = sorted(p.name for p in cli.iterdir() if p.name != "summary.csv")
    assert sorted(p.split("/")[-1] for p in written) == cliFiles
    assert (exported / "oblique_scan_report.csv").read_text() == (cli / "oblique_scan_report.csv").read_text()
    for name in ("oblique_scan_confidence.nrrd", "oblique_scan_boundary.nrrd"):
        ours = slicer.util.loadVolume(str(exported / name))
        theirs = slicer.util.loadVolume(str(cli / name))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(ours), slicer.util.arrayFromVolume(theirs))
        np.testing.assert_allclose(_matrix(ours), _matrix(theirs), atol=1e-9)
    segmentation = slicer.util.loadSegmentation(str(exported / "oblique_scan.seg.nrrd"))
    labels = mrml.labels_from_segmentation(segmentation, obliqueVolume, ASOCT_CLASSES)
    np.testing.assert_array_equal(labels, result.prediction.labels)


def test_batch_processes_files_without_loading_them(logic, obliqueVolume, tmp_path):
    paths = []
    for index in range(2):
        path = tmp_path / f"scan{index}.nrrd"
        assert slicer.util.exportNode(obliqueVolume, str(path))
        paths.append(path)
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    volumesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")
    out = tmp_path / "out"
    rows = logic.batch(str(tmp_path / "*.nrrd"), str(out), model=TINY_MODEL, device="cpu")
    assert [(r["input"].split("/")[-1], r["status"]) for r in rows] == \
        [("broken.nrrd", "failed"), ("scan0.nrrd", "done"), ("scan1.nrrd", "done")]
    assert "broken.nrrd" in rows[0]["error"] or rows[0]["error"]
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == volumesBefore
    assert (out / "scan1_report.json").is_file()
    again = logic.batch([str(p) for p in paths], str(out), model=TINY_MODEL, device="cpu")
    assert [r["status"] for r in again] == ["skipped", "skipped"]


def _referenceFor(volume):
    """Reference segmentation: the ellipse of the test volume as 'Lens nucleus', a ring as 'Lens capsule'."""
    array = slicer.util.arrayFromVolume(volume)
    k, j, i = np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij")
    r = ((i - 24) / 14.0) ** 2 + ((j - 20) / 9.0) ** 2
    labels = np.zeros(array.shape, np.uint8)
    labels[r < 1.0] = 1
    labels[r < 0.6] = 3
    segmentation = mrml.update_segmentation(labels, volume, ASOCT_CLASSES, name="ground truth", show3D=False)
    return segmentation, labels


def test_reference_gives_measured_calibration_table_and_plots(logic, obliqueVolume):
    reference, labels = _referenceFor(obliqueVolume)
    result = logic.segment(obliqueVolume, model=TINY_MODEL, reference=reference, device="cpu")
    np.testing.assert_array_equal(result.reference, labels)
    table = result.table
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert {"name", "voxels", "volume_ml", "dice", "ece", "bece"} <= set(columns)
    for row, segment in enumerate(result.report.segments):
        assert table.GetCellText(row, columns.index("name")) == segment.name
        assert int(table.GetCellText(row, columns.index("voxels"))) == segment.voxels
        for column in ("dice", "ece", "volume_ml"):
            value = table.GetTable().GetColumnByName(column).GetValue(row)  # the double, not its text
            assert value == pytest.approx(getattr(segment, column), rel=1e-12, nan_ok=True)
    assert table.GetColumnUnitLabel("volume_ml") == "mL"
    # Overall reliability diagram first: its bins table holds the report's non-empty bins.
    assert result.plots and result.plots[0].GetAttribute(mrml.KIND_ATTRIBUTE) == "all"
    reliability = result.report.summary["reliability"]
    keep = np.asarray(reliability["count"]) > 0
    series = result.plots[0].GetNthPlotSeriesNode(0)
    bins = slicer.util.arrayFromTableColumn(series.GetTableNode(), "Accuracy")
    np.testing.assert_allclose(bins, np.asarray(reliability["accuracy"])[keep])
    counts = slicer.util.arrayFromTableColumn(series.GetTableNode(), "Count")
    np.testing.assert_array_equal(counts, np.asarray(reliability["count"])[keep])
    chart = result.plots[0]
    assert (chart.GetXAxisRange()[0], chart.GetXAxisRange()[1]) == (0.0, 1.0)
    # With a reference the boundary map is the signed calibration error: diverging table, window -0.5..0.5.
    boundary = result.heatmaps["boundary"].GetDisplayNode()
    assert (boundary.GetWindowLevelMin(), boundary.GetWindowLevelMax()) == (-0.5, 0.5)
    values = slicer.util.arrayFromVolume(result.heatmaps["boundary"])
    inBand = np.isfinite(values)  # NaN outside the band: transparent, not "0 = perfectly calibrated"
    assert 0 < inBand.sum() < values.size
    assert values[inBand].min() >= -1.0 and values[inBand].max() <= 1.0
    np.testing.assert_array_equal(values, np.asarray(result.report.preview["signed_map"], dtype=np.float32))


def test_dropping_the_reference_removes_stale_plots(logic, obliqueVolume, cleanScene):
    reference, _ = _referenceFor(obliqueVolume)
    first = logic.segment(obliqueVolume, model=TINY_MODEL, reference=reference, device="cpu")
    assert cleanScene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == len(first.plots) > 0
    again = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu", output=first.segmentation)
    assert again.plots == [] and cleanScene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 0
    assert cleanScene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 0
    assert again.heatmaps["boundary"].GetDisplayNode().GetWindowLevelMin() == 0.0  # label-free again


def test_reference_with_foreign_segment_names_is_refused(logic, obliqueVolume, cleanScene):
    from LensSegCalibLib import InputError

    foreign = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "foreign")
    foreign.SetReferenceImageGeometryParameterFromVolumeNode(obliqueVolume)
    foreign.GetSegmentation().AddEmptySegment("liver", "Liver", (1, 0, 0))
    before = _nodeIds(cleanScene)
    with pytest.raises(InputError, match="Rename the reference segments"):
        logic.segment(obliqueVolume, model=TINY_MODEL, reference=foreign, device="cpu")
    assert _nodeIds(cleanScene) == before


def test_batch_in_a_child_process_streams_progress_and_matches_in_process(logic, obliqueVolume, tmp_path):
    path = tmp_path / "scan.nrrd"
    assert slicer.util.exportNode(obliqueVolume, str(path))
    seen = []
    rows = logic.batch([str(path)], str(tmp_path / "child"), model=TINY_MODEL, device="cpu", inProcess=False,
                       progress=lambda f, m: seen.append((f, m)))
    assert [r["status"] for r in rows] == ["done"]
    assert seen[0][0] == 0.0 and seen[-1][0] == pytest.approx(1.0)
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    logic.batch([str(path)], str(tmp_path / "here"), model=TINY_MODEL, device="cpu")
    assert (tmp_path / "child" / "scan_report.csv").read_text() == (tmp_path / "here" / "scan_report.csv").read_text()


@pytest.mark.parametrize("line, parsed", [("PROGRESS 0.25 Segmenting slice 3\n", (0.25, "Segmenting slice 3")),
                                          ("PROGRESS 1.7", (1.0, "")), ("PROGRESS x y", None), ("hello", None)])
def test_progress_line_protocol(line, parsed):
    assert mrml.parse_progress_line(line) == parsed


def test_cancelling_the_child_process_raises_and_leaves_no_outputs(logic, obliqueVolume, tmp_path):
    path = tmp_path / "scan.nrrd"
    assert slicer.util.exportNode(obliqueVolume, str(path))
    cancel = threading.Event()
    out = tmp_path / "child"
    with pytest.raises(Cancelled):
        logic.batch([str(path)], str(out), model=TINY_MODEL, device="cpu", inProcess=False, cancel=cancel,
                    progress=lambda f, m: cancel.set())  # cancel at the first progress line
    assert not out.exists() or not any(out.iterdir())


def test_unusable_inputs_raise_clear_errors_and_change_nothing(logic, obliqueVolume, cleanScene):
    from LensSegCalibLib import InputError

    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    rgb = slicer.util.addVolumeFromArray(np.zeros((2, 8, 8, 3), np.uint8), name="rgb",
                                         nodeClassName="vtkMRMLVectorVolumeNode")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    obliqueVolume.SetAndObserveTransformNodeID(transform.GetID())
    before = _nodeIds(cleanScene)
    for node, fragment in ((empty, "has no voxels"), (rgb, "components per voxel"), (obliqueVolume, "Harden")):
        with pytest.raises(InputError, match=fragment):
            logic.segment(node, model=TINY_MODEL, device="cpu")
    with pytest.raises(InputError, match="scalar volume"):
        logic.segment(None, model=TINY_MODEL, device="cpu")
    assert _nodeIds(cleanScene) == before


def test_unknown_model_lists_the_known_ones(logic, obliqueVolume, cleanScene):
    from LensSegCalibLib import ModelError

    before = _nodeIds(cleanScene)
    with pytest.raises(ModelError, match=TINY_MODEL):
        logic.segment(obliqueVolume, model="no-such-model", device="cpu")
    assert _nodeIds(cleanScene) == before
