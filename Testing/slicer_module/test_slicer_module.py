"""The thin module file under the headless harness: metadata, sample data, terminology, self-test wiring."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import slicer

from LensSegCalibLib import InputError, mrml


def test_module_metadata():
    import LensSegCalib

    parent = types.SimpleNamespace()
    LensSegCalib.LensSegCalib(parent)
    assert parent.title == "LensSegCalib" and parent.categories == ["Segmentation"]
    assert "2508.08705" in parent.helpText and "MONAI" in parent.helpText and parent.acknowledgementText


def test_terminology_file_loads(logic):
    assert logic.loadTerminology() == "Segmentation category and type - LensSegCalib"
    entry = slicer.vtkSlicerTerminologyEntry()
    text = ("Segmentation category and type - LensSegCalib~SCT^123037004^Anatomical Structure~SCT^78076003^Lens"
            "~SCT^7771000^Left~~^^~^^")
    assert slicer.modules.terminologies.logic().DeserializeTerminologyEntry(text, entry)
    assert (entry.GetTypeObject().GetCodeMeaning(), entry.GetTypeModifierObject().GetCodeMeaning()) == ("Lens", "Left")


def test_asoct_sample_data_is_generated_locally_with_its_ground_truth(logic):
    from LensSegCalibLib.phantom import asoct_volume

    volume, reference = logic.loadSampleData("asoct", seed=2, shape=(2, 64, 64))
    phantom = asoct_volume(2, shape=(2, 64, 64))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), phantom.image)
    assert volume.GetSpacing() == pytest.approx(tuple(phantom.spacing)[::-1])
    classes = mrml.phantom_classes("asoct")
    np.testing.assert_array_equal(mrml.labels_from_segmentation(reference, volume, classes), phantom.labels)
    assert volume.GetName() == "LensSegCalib AS-OCT phantom"
    with pytest.raises(InputError, match="Unknown sample"):
        logic.loadSampleData("mri")


def test_sample_data_is_registered_at_startup(monkeypatch, logic):
    import LensSegCalib

    registered = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: registered.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    LensSegCalib._onStartupCompleted()
    assert [r["sampleName"] for r in registered] == ["LensSegCalib AS-OCT phantom", "LensSegCalib CT head phantom"]
    assert all(r["category"] == "LensSegCalib" and callable(r["customDownloader"]) for r in registered)
    assert all(len(r["uris"]) == len(r["fileNames"]) == len(r["nodeNames"]) == 1 for r in registered)


def test_heatmap_display_choice_and_threshold(logic, obliqueVolume):
    from lsc_testdata import TINY_MODEL

    for layout in ("Red", "Green"):  # what each slice view of the application has
        node = slicer.vtkMRMLSliceCompositeNode()
        node.SetLayoutName(layout)
        slicer.mrmlScene.AddNode(node)
    result = logic.segment(obliqueVolume, model=TINY_MODEL, device="cpu")
    composite = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetNumberOfItems() >= 2
    logic.showHeatmap(result, "entropy", opacity=0.3, threshold=0.8)
    display = result.heatmaps["entropy"].GetDisplayNode()
    assert (display.GetLowerThreshold(), display.GetUpperThreshold()) == pytest.approx((0.2, 1.0))
    for index in range(composite.GetNumberOfItems()):
        node = composite.GetItemAsObject(index)
        assert node.GetForegroundVolumeID() == result.heatmaps["entropy"].GetID()
        assert node.GetBackgroundVolumeID() == obliqueVolume.GetID() and node.GetForegroundOpacity() == 0.3
    logic.showHeatmap(result, "confidence", threshold=0.9)
    confidence = result.heatmaps["confidence"].GetDisplayNode()
    assert (confidence.GetLowerThreshold(), confidence.GetUpperThreshold()) == pytest.approx((0.0, 0.9))
    assert confidence.GetInvertDisplayScalarRange()  # low confidence is hot
    logic.showHeatmap(result, "none")
    for index in range(composite.GetNumberOfItems()):
        assert composite.GetItemAsObject(index).GetForegroundVolumeID() is None


def test_ct_sample_data_keeps_the_phantom_geometry(logic):
    from LensSegCalibLib.phantom import ct_head_volume

    volume, reference = logic.loadSampleData("ct", seed=1, shape=(12, 48, 48))
    phantom = ct_head_volume(1, shape=(12, 48, 48))
    geometry = mrml.geometry_from_volume(volume)
    assert geometry.spacing == pytest.approx(phantom.spacing)
    assert geometry.origin == pytest.approx(phantom.origin)  # LPS, as the phantom (and SimpleITK) gives it
    labels = mrml.labels_from_segmentation(reference, volume, mrml.phantom_classes("ct"))
    np.testing.assert_array_equal(labels, phantom.labels)
    names = [reference.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == ["Right lens", "Left lens"]


def _shippedModel(modelId: str) -> bool:
    from LensSegCalibLib.errors import CatalogError
    from LensSegCalibLib.models import load_catalog

    try:
        return modelId in load_catalog()
    except CatalogError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _shippedModel("asoct-lens-acw"), reason="asoct-lens-acw is not in the shipped catalog yet")
def test_in_slicer_self_test_passes_headless_with_the_shipped_model(slicerEnv):
    """LensSegCalibTest (what ctest runs inside Slicer): sample data -> shipped asoct-lens-acw -> nodes -> rerun
    -> export, on a small phantom."""
    import unittest

    import LensSegCalib

    outcome = unittest.TextTestRunner(verbosity=0).run(LensSegCalib.LensSegCalibTest("runTest"))
    assert outcome.wasSuccessful(), [str(e[1]) for e in outcome.errors + outcome.failures]


@pytest.fixture
def fakeInstallers(monkeypatch):
    """PyTorch extension and slicer.packaging stand-ins that record the order of the install steps."""
    import importlib.util

    calls = []
    realFindSpec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else realFindSpec(name, *a))
    torchUtils = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        result = object()

        def installTorch(self, askConfirmation: bool, torchVersionRequirement: str):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            return PyTorchUtilsLogic.result

    torchUtils.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", torchUtils)
    packaging = types.ModuleType("slicer.packaging")
    packaging.load_requirements = lambda path: [line for line in open(path).read().splitlines()
                                                if line and not line.startswith("#")]
    packaging.pip_ensure = lambda requirements, requester: calls.append(("pip", tuple(requirements), requester))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    return calls, PyTorchUtilsLogic, packaging


def test_dependencies_install_torch_first_then_pinned_packages(logic, fakeInstallers):
    calls, _, _ = fakeInstallers
    logic.installDependencies()
    assert [c[0] for c in calls] == ["torch", "pip"]  # torch from the PyTorch extension before monai via pip
    assert calls[0][1] is True  # the user is asked first
    assert "monai==1.6.1" in calls[1][1] and not any(r.startswith("torch") for r in calls[1][1])
    assert calls[1][2] == "LensSegCalib"


def test_dependency_install_failures_say_what_to_do(logic, fakeInstallers, monkeypatch):
    calls, torchLogic, packaging = fakeInstallers
    monkeypatch.setattr(torchLogic, "result", None)  # the user declined, or the install failed
    with pytest.raises(RuntimeError, match="PyTorch was not installed"):
        logic.installDependencies()
    monkeypatch.setattr(torchLogic, "result", object())

    def failing(requirements, requester):
        raise OSError("network unreachable")

    monkeypatch.setattr(packaging, "pip_ensure", failing)
    with pytest.raises(RuntimeError, match="network unreachable.*pip_install"):
        logic.installDependencies()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    with pytest.raises(RuntimeError, match="Install the PyTorch extension"):
        logic.installDependencies()


def test_model_list_works_before_the_dependencies_are_installed(logic, monkeypatch):
    """The GUI lists the models at set-up, maybe before jsonschema & co. are installed (first start)."""
    import LensSegCalibLib.models

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'jsonschema'")

    monkeypatch.setattr(LensSegCalibLib.models, "load_catalog", missing)
    from lsc_testdata import TINY_MODEL

    models = logic.models()
    assert [(m.id, m.modality) for m in models] == [(TINY_MODEL, "AS-OCT")]


@pytest.mark.slow
@pytest.mark.skipif(not _shippedModel("ct-lens-acw"), reason="ct-lens-acw is not in the shipped catalog yet")
def test_ct_sample_with_the_shipped_ct_model(slicerEnv):
    import LensSegCalib

    logic = LensSegCalib.LensSegCalibLogic()
    volume, reference = logic.loadSampleData("ct", seed=4, shape=(32, 96, 96))
    result = logic.segment(volume, model="ct-lens-acw", reference=reference, device="cpu")
    segments = result.segmentation.GetSegmentation()
    assert [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())] == ["right_lens", "left_lens"]
    assert result.table.GetNumberOfRows() == 2 and result.plots
    assert all(np.isfinite(s.dice) for s in result.report.segments)
