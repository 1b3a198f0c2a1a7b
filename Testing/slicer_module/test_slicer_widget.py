"""The Widget's run mechanics without Qt: Apply starts a worker thread, the poll publishes on the main thread,
Apply-while-running cancels. The .ui widgets are stand-ins that record what the Widget sets."""
from __future__ import annotations

import time
import types
from unittest import mock

import pytest
import slicer
from lsc_testdata import TINY_MODEL


class _Widget(types.SimpleNamespace):
    """A widget stand-in: plain attributes plus recorded setValue calls."""

    def setValue(self, value: int) -> None:
        self.values = getattr(self, "values", []) + [value]


@pytest.fixture
def widget(logic, obliqueVolume):
    import LensSegCalib

    w = LensSegCalib.LensSegCalibWidget.__new__(LensSegCalib.LensSegCalibWidget)
    LensSegCalib.LensSegCalibWidget.__init__(w, None)
    w.logic = logic
    names = ("applyButton", "progressBar", "statusLabel", "inputsCollapsibleButton", "showTableButton",
             "exportButton", "showReliabilityButton", "deviceInfoLabel")
    w.ui = types.SimpleNamespace(**{name: _Widget(enabled=True, text="", visible=False) for name in names})
    w.ui.heatmapSelector = _Widget(currentIndex=1)  # "boundary"
    w.ui.opacitySlider, w.ui.thresholdSlider = _Widget(value=0.4), _Widget(value=0.9)
    w.ui.legendCheckBox = _Widget(checked=True)
    w._timer = mock.MagicMock()
    w._parameterNode = types.SimpleNamespace(
        inputVolume=obliqueVolume, referenceSegmentation=None, outputSegmentation=None, modelId=TINY_MODEL,
        device="cpu", heatmap="confidence", heatmapOpacity=0.6, heatmapThreshold=0.95, showLegend=True)
    return w


def _runUntilDone(w, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while w._run is not None and time.monotonic() < deadline:
        w._poll()  # what the QTimer does every 100 ms on the GUI thread
        time.sleep(0.02)
    assert w._run is None, "the run did not finish"


def test_apply_runs_in_a_thread_and_publishes_on_poll(widget, cleanScene):
    widget.onApplyButton()
    assert widget._run is not None and widget.ui.applyButton.text == "Cancel"
    assert widget._run["thread"].is_alive() or widget._run["outcome"] is not None
    assert cleanScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # nothing before the poll
    _runUntilDone(widget)
    assert widget.ui.applyButton.text == "Apply" and widget.ui.exportButton.enabled
    assert cleanScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert widget._parameterNode.outputSegmentation is widget._result.segmentation  # next Apply reruns into it
    assert widget.ui.progressBar.values[-1] >= 95 and "Done" in widget.ui.statusLabel.text
    boundary = widget._result.heatmaps["boundary"].GetDisplayNode()  # the selector's map, the sliders' values
    assert (boundary.GetLowerThreshold(), boundary.GetUpperThreshold()) == pytest.approx((0.1, 1.0))
    widget.onApplyButton()
    _runUntilDone(widget)
    assert cleanScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # rerun replaced, no duplicate


def test_apply_while_running_cancels_and_changes_nothing(widget, cleanScene):
    import threading

    release = threading.Event()
    original = widget.logic.compute

    def slowCompute(job, **kwargs):
        release.wait(10)  # hold the worker until the test pressed Cancel
        return original(job, **kwargs)

    widget.logic.compute = slowCompute
    before = cleanScene.GetNumberOfNodes()
    widget.onApplyButton()
    widget.onApplyButton()  # the button reads "Cancel" now
    assert widget._run["cancel"].is_set() and widget.ui.statusLabel.text == "Cancelling..."
    release.set()
    _runUntilDone(widget)
    assert "Cancelled" in widget.ui.statusLabel.text
    assert cleanScene.GetNumberOfNodes() == before and widget._result is None


def test_bad_input_is_reported_in_the_status_line_and_nothing_runs(widget, cleanScene):
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    widget._parameterNode.inputVolume = empty
    before = cleanScene.GetNumberOfNodes()
    widget.onApplyButton()
    assert widget._run is None and "has no voxels" in widget.ui.statusLabel.text
    assert cleanScene.GetNumberOfNodes() == before


def test_a_failing_rerun_keeps_the_earlier_result_in_the_widget(widget, cleanScene, monkeypatch):
    from LensSegCalibLib import OutputError, mrml

    widget.onApplyButton()
    _runUntilDone(widget)
    first = widget._result
    ids = sorted(n.GetID() for n in first.nodes)
    voxels = mrml.volume_voxel_sha256(first.heatmaps["confidence"])
    before = cleanScene.GetNumberOfNodes()

    def broken(*args, **kwargs):
        raise OutputError("simulated failure while building the report table")

    monkeypatch.setattr(mrml, "add_table", broken)
    widget.onApplyButton()  # reruns into the same output segmentation
    _runUntilDone(widget)
    assert widget._result is first and widget.ui.exportButton.enabled  # the earlier result is still shown
    assert "left as it was" in widget.ui.statusLabel.text
    assert cleanScene.GetNumberOfNodes() == before and sorted(n.GetID() for n in first.nodes) == ids
    assert mrml.volume_voxel_sha256(first.heatmaps["confidence"]) == voxels
