"""LensSegCalibLogic on real MRML (slicer-core): geometry, nodes, reruns, cancel, export, batch."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import slicer
from conftest import ASOCT_CLASSES, TEST_SPACING, TINY_MODEL, obliqueIJKToRAS

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
