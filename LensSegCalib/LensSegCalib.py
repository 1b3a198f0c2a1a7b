"""LensSegCalib 3D Slicer module: calibrated crystalline-lens segmentation with confidence heatmaps and reports.

Thin on purpose: Module (metadata, start-up hooks), parameter node, Widget (GUI only), Logic (a facade over
``LensSegCalibLib``; no Qt), and the in-Slicer self-test. Arrays, geometry and MRML glue live in
``LensSegCalibLib.mrml``; inference, heatmaps and reports in the other ``LensSegCalibLib`` modules.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from LensSegCalibLib import Cancelled, InputError, LensSegCalibError, mrml

DEFAULT_MODEL = "asoct-lens-acw"
#: Import names of the Python packages the core needs (torch from the PyTorch extension, the rest via pip).
REQUIRED_IMPORTS = ("torch", "monai", "scipy", "safetensors", "nrrd", "slicerio", "matplotlib", "jsonschema")
SAMPLE_NAMES = {"asoct": "LensSegCalib AS-OCT phantom", "ct": "LensSegCalib CT head phantom"}
#: Sample shapes (Z, Y, X), quick to segment on a laptop CPU: AS-OCT on the device-like native grid (16 x 13 mm
#: at 20 x 16 um), where the shipped models were trained (they degrade on much coarser B-scans).
SAMPLE_SHAPES = {"asoct": (8, 800, 800), "ct": (48, 160, 160)}


class LensSegCalib(ScriptedLoadableModule):
    """Module metadata; loads our terminology and registers the sample data once Slicer has started."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LensSegCalib")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LensSegCalib contributors"]
        self.parent.helpText = _(
            "Segments the crystalline lens (AS-OCT: capsule, cortex, nucleus; head CT: right and left lens) with "
            "MONAI/PyTorch models trained with calibration-aware losses, and shows how far to trust each voxel: "
            "confidence, boundary-calibration and entropy heatmaps, a per-segment report table, reliability "
            "diagrams, and an export of JSON/CSV/HTML reports. Everything runs on this computer.<br>"
            "Methods: ACW loss and BECE (Liu et al., arXiv:2508.08705); SDC loss and pECE (Liang et al., "
            "arXiv:2503.05107); NACL (Murugesan et al., Medical Image Analysis 2025); SVLS (Islam &amp; Glocker, "
            "IPMI 2021); region-wise loss (Valverde &amp; Tohka, Pattern Recognition 2023); CALF (Alam et al., "
            "arXiv:2504.04458); MONAI (Cardoso et al., arXiv:2211.02701).<br>"
            "Python console: <code>LensSegCalibLogic().segment(volumeNode)</code>; see the README.")
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, MONAI and PyTorch. The models are trained on synthetic phantoms shipped with the "
            "extension; they are research tools, not medical devices.")
        slicer.app.connect("startupCompleted()", _onStartupCompleted)


def _onStartupCompleted() -> None:
    """Load the terminology context and register sample data (cheap: no torch, no phantom generation)."""
    logic = LensSegCalibLogic()
    logic.loadTerminology()
    try:
        import SampleData
    except ImportError:
        return  # SampleData module disabled
    for kind, name in SAMPLE_NAMES.items():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="LensSegCalib", sampleName=name, uris=[f"lenssegcalib://phantom/{kind}"],
            fileNames=[f"LensSegCalib-{kind}-phantom.nrrd"], nodeNames=[name],
            thumbnailFileName=os.path.join(logic.resourceDir, "Icons", "LensSegCalib.png"),
            customDownloader=lambda source, kind=kind: LensSegCalibLogic().loadSampleData(kind))


@parameterNodeWrapper
class LensSegCalibParameterNode:
    """GUI state, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    referenceSegmentation: vtkMRMLSegmentationNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = DEFAULT_MODEL
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    heatmap: Annotated[str, Choice(["confidence", "boundary", "entropy", "none"])] = "confidence"
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    heatmapThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.95
    showLegend: bool = True


class LensSegCalibWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: inputs, Apply/Cancel with progress, heatmap display, report buttons. Work runs in a thread."""

    HEATMAPS = ("confidence", "boundary", "entropy", "none")
    DEVICES = ("auto", "cpu", "cuda")

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[LensSegCalibLogic] = None
        self._parameterNode: Optional[LensSegCalibParameterNode] = None
        self._guiTag = None
        self._run: Optional[dict] = None
        self._result: Optional[mrml.SegmentationResult] = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LensSegCalib.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.progressBar.visible = False  # shown while a run is going
        self.logic = LensSegCalibLogic()
        for spec in self.logic.models():
            self.ui.modelSelector.addItem(f"{spec.title} ({spec.modality})", spec.id)
            self.ui.modelSelector.setItemData(self.ui.modelSelector.count - 1,
                                              f"{spec.id} - {spec.modality}: {spec.description}", qt.Qt.ToolTipRole)
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self._onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self._onDeviceChanged)
        self.ui.heatmapSelector.connect("currentIndexChanged(int)", self._onHeatmapChanged)
        for widget, signal in ((self.ui.opacitySlider, "valueChanged(double)"),
                               (self.ui.thresholdSlider, "valueChanged(double)"),
                               (self.ui.legendCheckBox, "toggled(bool)")):
            widget.connect(signal, lambda *args: self._updateHeatmapDisplay())
        self.ui.showTableButton.connect("clicked(bool)", self.onShowTable)
        self.ui.showReliabilityButton.connect("clicked(bool)", self.onShowReliability)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelRun()
        self.removeObservers()
        self._disconnectGui()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._detectGpu()

    def exit(self) -> None:
        self._disconnectGui()

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        self._cancelRun()
        self._result = None
        self._disconnectGui()

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ----------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self._disconnectGui()
        self._parameterNode = self.logic.getParameterNode()
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._guiTag = self._parameterNode.connectGui(self.ui)
        self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        index = self.ui.modelSelector.findData(self._parameterNode.modelId)
        self.ui.modelSelector.setCurrentIndex(max(index, 0))
        self.ui.deviceSelector.setCurrentIndex(self.DEVICES.index(self._parameterNode.device))
        self.ui.heatmapSelector.setCurrentIndex(self.HEATMAPS.index(self._parameterNode.heatmap))
        self._updateButtons()

    def _disconnectGui(self) -> None:
        if self._parameterNode is not None and self._guiTag is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self._guiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def _onModelChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.modelId = self.ui.modelSelector.itemData(index)
            import qt

            self.ui.modelSelector.toolTip = self.ui.modelSelector.itemData(index, qt.Qt.ToolTipRole)

    def _onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.device = self.DEVICES[index]

    def _onHeatmapChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.heatmap = self.HEATMAPS[index]
            self._updateHeatmapDisplay()

    def _updateButtons(self, *args: Any) -> None:
        running = self._run is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._parameterNode.modelId)
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.inputsCollapsibleButton.enabled = not running
        hasResult = self._result is not None
        self.ui.showTableButton.enabled = hasResult
        self.ui.exportButton.enabled = hasResult and not running
        self.ui.showReliabilityButton.enabled = hasResult and bool(self._result.plots)

    def _updateDeviceInfo(self) -> None:
        self.ui.deviceInfoLabel.text = self.logic.gpuDescription()

    def _detectGpu(self) -> None:
        """Import torch in a background thread (seconds), then show the GPU it finds; the GUI stays usable."""
        import qt

        if "torch" in sys.modules or importlib.util.find_spec("torch") is None:
            self._updateDeviceInfo()
            return
        self.ui.deviceInfoLabel.text = _("(looking for a GPU...)")
        loader = threading.Thread(target=importlib.import_module, args=("torch",), daemon=True)
        loader.start()

        def check() -> None:
            if loader.is_alive():
                qt.QTimer.singleShot(300, check)
            else:
                self._updateDeviceInfo()

        qt.QTimer.singleShot(300, check)

    # -- run: prepare on the main thread, compute in a worker thread, publish on the main thread ------------
    def onApplyButton(self) -> None:
        if self._run is not None:
            self._run["cancel"].set()
            self._setStatus(_("Cancelling..."))
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        try:
            job = self.logic.prepare(p.inputVolume, model=p.modelId, reference=p.referenceSegmentation)
        except LensSegCalibError as error:
            self._setStatus(_("Not started: {error}").format(error=error))
            slicer.util.errorDisplay(str(error))
            return
        run = {"cancel": threading.Event(), "progress": (0.0, _("Starting")), "job": job, "outcome": None}
        model, device = p.modelId, p.device  # read here: the worker thread must not touch MRML

        def work() -> None:
            try:
                run["outcome"] = self.logic.compute(job, model=model, device=device, cancel=run["cancel"],
                                                    progress=lambda f, m: run.__setitem__("progress", (f, m)))
            except BaseException as error:  # handed to the GUI thread, shown there
                run["outcome"] = error

        self._run = run
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.visible = True
        self._updateButtons()
        run["thread"] = threading.Thread(target=work, name="LensSegCalib", daemon=True)
        run["thread"].start()
        self._timer.start()

    def _poll(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        fraction, message = run["progress"]
        self.ui.progressBar.setValue(int(100 * fraction))
        self._setStatus(message)
        if run["thread"].is_alive():
            return
        self._timer.stop()
        self._run = None
        outcome = run["outcome"]
        try:
            if isinstance(outcome, Cancelled):
                self._setStatus(_("Cancelled. The scene was left unchanged."))
            elif isinstance(outcome, BaseException):
                self._setStatus(_("Failed: {error}").format(error=outcome))
                slicer.util.errorDisplay(str(outcome) if isinstance(outcome, LensSegCalibError) else
                                         _("Segmentation failed: {error}").format(error=outcome))
            else:
                self._publish(run["job"], outcome)
        finally:
            self.ui.progressBar.visible = False
            self._updateDeviceInfo()
            self._updateButtons()

    def _publish(self, job: Any, computed: Any) -> None:
        p = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                self._result = self.logic.publish(job, computed, output=p.outputSegmentation)
        except Exception as error:  # any failure ends here, in a timer slot: publish left the scene as it was
            logging.exception("LensSegCalib: creating the result nodes failed")
            self._setStatus(_("Failed: {error} The scene was left as it was (an earlier result is kept).")
                            .format(error=error))
            slicer.util.errorDisplay(_("Could not create the result nodes; the scene was left as it was, an earlier "
                                       "result in the output segmentation included.\n\n{error}").format(error=error))
            return
        p.outputSegmentation = self._result.segmentation  # next Apply reruns into the same nodes
        self._updateHeatmapDisplay()
        device = computed.prediction.device
        self._setStatus(_("Done in {seconds:.1f} s on {device}: {n} segments.").format(
            seconds=computed.seconds, device=device, n=len(computed.report.segments)))

    def _cancelRun(self) -> None:
        if self._run is not None:
            self._run["cancel"].set()
            self._run["thread"].join(timeout=5.0)
            self._run = None
            self._timer.stop()

    def _ensureDependencies(self) -> bool:
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("LensSegCalib needs these Python packages: {names}. PyTorch comes from the PyTorch extension, "
                  "the rest is installed with pip (pinned versions). Install now? This can take several minutes.")
                .format(names=", ".join(missing))):
            return False
        try:
            with slicer.util.WaitCursor():
                self.logic.installDependencies()
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error))
            return False
        return not self.logic.missingDependencies()

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    # -- results -----------------------------------------------------------------------------------------
    def _updateHeatmapDisplay(self) -> None:
        if self._result is not None and not all(slicer.mrmlScene.IsNodePresent(n) for n in self._result.nodes):
            self._result = None  # the user deleted result nodes: nothing left to show
            self._updateButtons()
        if self._result is None:
            return
        # Read the widgets, not the parameter node: this slot may run before the GUI binding updated it.
        ui = self.ui
        heatmap = self.HEATMAPS[max(ui.heatmapSelector.currentIndex, 0)]
        self.logic.showHeatmap(self._result, heatmap, opacity=ui.opacitySlider.value,
                               threshold=ui.thresholdSlider.value, legend=ui.legendCheckBox.checked)
        layout = slicer.app.layoutManager()  # None without a main window (tests, --no-main-window)
        if layout is not None:
            meta = self._result.report.meta
            text = f"LensSegCalib {meta['model']['id']} ({meta['device']})"
            text += "" if heatmap == "none" else f"\n{heatmap}"
            for name in layout.sliceViewNames():
                view = layout.sliceWidget(name).sliceView()
                view.cornerAnnotation().SetText(vtk.vtkCornerAnnotation.UpperRight, text)
                view.forceRender()

    def onShowTable(self) -> None:
        if self._result is not None:
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            selection = slicer.app.applicationLogic().GetSelectionNode()
            selection.SetActiveTableID(self._result.table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()

    def onShowReliability(self) -> None:
        if self._result is not None and self._result.plots:
            slicer.modules.plots.logic().ShowChartInLayout(self._result.plots[0])

    def onExport(self) -> None:
        import qt

        if self._result is None:
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Export report to folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.export_report(self._result, folder)
            self._setStatus(_("Exported {n} files to {folder}.").format(n=len(written), folder=folder))


class LensSegCalibLogic(ScriptedLoadableModuleLogic):
    """Console/GUI facade over ``LensSegCalibLib`` (no Qt). Example::

        logic = LensSegCalibLogic()
        result = logic.segment(volumeNode, model="asoct-lens-acw")     # reference=segNode for measured calibration
        logic.export_report(result, "/tmp/lens-report")
        logic.batch("/data/scans/*.nrrd", "/tmp/batch-out", model="asoct-lens-acw")
    """

    def __init__(self, parent: Any = None, catalogPath: Optional[str] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self, parent)
        self.catalogPath = catalogPath  # None = the shipped Resources/Models/catalog.json
        self.resourceDir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources")
        self._segmenters: dict = {}

    def getParameterNode(self) -> LensSegCalibParameterNode:
        return LensSegCalibParameterNode(super().getParameterNode())

    # -- catalog, devices, dependencies ------------------------------------------------------------------
    def catalog(self) -> Any:
        from LensSegCalibLib.models import load_catalog

        return load_catalog(self.catalogPath)

    def models(self) -> list:
        """Catalog entries (``ModelSpec``) in catalog order; empty if the catalog cannot be read."""
        try:
            return list(self.catalog())
        except LensSegCalibError as error:
            logging.error(str(error))
            return []
        except ImportError:  # first start: jsonschema not installed yet; list the entries without validating
            import json
            import types

            path = self.catalogPath or os.path.join(self.resourceDir, "Models", "catalog.json")
            with open(path, encoding="utf-8") as stream:
                entries = json.load(stream).get("models", [])
            return [types.SimpleNamespace(id=e["id"], title=e.get("title", e["id"]), modality=e.get("modality", ""),
                                          description=e.get("description", "")) for e in entries]

    @staticmethod
    def gpuDescription() -> str:
        """'GPU: <name>' / 'no GPU: CPU only' once torch is loaded; never imports torch itself (slow)."""
        torch = sys.modules.get("torch")
        if torch is None:
            return _("(GPU checked at the first run)")
        if torch.cuda.is_available():
            return _("GPU: {name}").format(name=torch.cuda.get_device_name(0))
        return _("no GPU found: CPU only")

    @staticmethod
    def missingDependencies() -> list:
        """Import names from :data:`REQUIRED_IMPORTS` that are not installed (no import, no subprocess)."""
        return [name for name in REQUIRED_IMPORTS if importlib.util.find_spec(name) is None]

    def installDependencies(self) -> None:
        """torch through the PyTorch extension first (right CUDA build), then the pinned rest via pip.

        Raises:
            RuntimeError: the PyTorch extension is missing or an install failed (message says what to do).
        """
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError as error:
                raise RuntimeError(_("Install the PyTorch extension (Extensions Manager), restart Slicer, and "
                                     "press Apply again.")) from error
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.2") \
                    is None:
                raise RuntimeError(_("PyTorch was not installed; LensSegCalib cannot run without it."))
        import slicer.packaging

        path = os.path.join(self.resourceDir, "requirements.txt")
        try:
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(path), requester="LensSegCalib")
        except Exception as error:  # pip/network/permission failures come as many exception types
            raise RuntimeError(_("Installing the Python packages of LensSegCalib failed ({error}). Check the network "
                                 "connection, or install them from the Python console: "
                                 "slicer.util.pip_install('-r {path}'), then restart Slicer.")
                               .format(error=error, path=path)) from error
        importlib.invalidate_caches()

    def loadTerminology(self) -> str:
        """Load our terminology context (lens, capsule, cortex, nucleus); returns its name."""
        path = os.path.join(self.resourceDir, "SegmentationCategoryTypeModifier-LensSegCalib.term.json")
        return slicer.modules.terminologies.logic().LoadTerminologyFromFile(path)

    def _classes(self, model: Any) -> list:
        return list(model.classes) if hasattr(model, "predict") else list(self.catalog().get(model).classes)

    def segmenter(self, model: Any = DEFAULT_MODEL, device: str = "auto") -> Any:
        """A loaded ``Segmenter`` for a model id (cached per model, device and catalog), or ``model`` itself
        when it already is one."""
        if hasattr(model, "predict"):
            return model
        device = {"gpu": "cuda", "GPU": "cuda", "CPU": "cpu"}.get(device, device)
        key = (model, device, self.catalogPath)
        if key not in self._segmenters:
            from LensSegCalibLib.inference import Segmenter

            self._segmenters = {key: Segmenter.from_catalog(model, device, catalog=self.catalogPath)}
        return self._segmenters[key]

    # -- segmentation ------------------------------------------------------------------------------------
    def prepare(self, volumeNode: Any, model: Any = DEFAULT_MODEL, reference: Any = None) -> mrml.SegmentationJob:
        """Main thread: read the input (and reference) from the scene. Raises InputError/ModelError."""
        return mrml.prepare_job(volumeNode, self._classes(model), reference)

    def compute(self, job: mrml.SegmentationJob, model: Any = DEFAULT_MODEL, device: str = "auto",
                progress: Optional[Callable] = None, cancel: Optional[threading.Event] = None) -> mrml.ComputedRun:
        """Any thread (touches no MRML): load the model, predict, build the report."""
        return mrml.compute_job(job, self.segmenter(model, device), progress=progress, cancel=cancel)

    def publish(self, job: mrml.SegmentationJob, computed: mrml.ComputedRun, output: Any = None,
                show: bool = True) -> mrml.SegmentationResult:
        """Main thread: create/update the result nodes (all or nothing) and show the confidence map."""
        result = mrml.publish_job(job, computed, output=output)
        if show:
            self.showHeatmap(result, "confidence")
        return result

    def segment(self, volumeNode: Any, model: Any = DEFAULT_MODEL, reference: Any = None, output: Any = None,
                device: str = "auto", progress: Optional[Callable] = None,
                cancel: Optional[threading.Event] = None) -> mrml.SegmentationResult:
        """Segment a volume node; returns the segmentation, heatmap, table and plot nodes and the report.

        Args:
            volumeNode: scalar volume (any spacing, origin, direction); never modified.
            model: catalog model id (``LensSegCalibLogic().models()``), or a loaded ``Segmenter``.
            reference: optional segmentation node with the model's segment names: measured calibration.
            output: existing segmentation node to update (its lens segments and linked nodes are replaced).
            device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
            progress: ``progress(fraction, message)``.
            cancel: ``threading.Event``; set it (e.g. from ``progress``) to stop; raises ``Cancelled`` and
                leaves the scene unchanged.
        """
        job = self.prepare(volumeNode, model, reference)
        computed = self.compute(job, model, device, progress=progress, cancel=cancel)
        result = self.publish(job, computed, output=output)
        if progress is not None:
            progress(1.0, "Done")
        return result

    def showHeatmap(self, result: mrml.SegmentationResult, heatmap: str = "confidence", opacity: float = 0.6,
                    threshold: float = 0.95, legend: bool = True) -> None:
        """Show one heatmap of ``result`` as the foreground of all slice views (``"none"`` hides them)."""
        mrml.hide_heatmaps()
        node = result.heatmaps.get(heatmap)
        if node is None:
            return
        kind = node.GetAttribute(mrml.KIND_ATTRIBUTE)
        mrml.show_heatmap(node, result.volume, opacity=opacity, threshold=mrml.display_threshold(kind, threshold),
                          legend=legend)

    # -- files -------------------------------------------------------------------------------------------
    def export_report(self, result: mrml.SegmentationResult, folder: str, overwrite: bool = True) -> list:
        """Write the files the CLI writes for one case (seg.nrrd, heatmaps, report JSON/CSV/HTML) to ``folder``.

        Returns:
            Paths written.
        """
        from LensSegCalibLib.outputs import write_case_outputs

        return mrml.export_result(result, folder, write_case_outputs, overwrite=overwrite)

    def batch(self, paths_or_glob: Any, out_dir: str, model: str = DEFAULT_MODEL, device: str = "auto",
              overwrite: bool = False, progress: Optional[Callable] = None,
              cancel: Optional[threading.Event] = None, inProcess: bool = True) -> list:
        """Segment image files one at a time (never loaded into the scene); write the CLI's outputs per file.

        Args:
            paths_or_glob: a glob pattern (``"/data/*.nrrd"``), one path, or a list of paths.
            out_dir: output folder (created).
            overwrite: replace existing outputs (else finished inputs are skipped).
            inProcess: False runs ``Scripts/run_inference.py`` in a child process (Slicer's Python): memory
                is returned when it ends and ``cancel`` stops it at once.

        Returns:
            One dict per input: ``{"input", "status": "done"|"skipped"|"failed", "error", "outputs"}``.
        """
        if isinstance(paths_or_glob, (str, os.PathLike)):
            pattern = str(paths_or_glob)
            paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        else:
            paths = [str(p) for p in paths_or_glob]
        if not paths:
            raise InputError(f"No input files match {paths_or_glob!r}; check the folder and the pattern.")
        if not inProcess:
            import shutil
            import sys

            python = shutil.which("PythonSlicer") or sys.executable  # Slicer's interpreter, same packages
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Scripts", "run_inference.py")
            command = [python, script, "--out", str(out_dir), "--model", model, "--device", device]
            command += (["--catalog", str(self.catalogPath)] if self.catalogPath else [])
            command += (["--overwrite"] if overwrite else []) + ["--"] + paths
            return mrml.run_child_batch(command, progress=progress, cancel=cancel)
        return mrml.batch_files(paths, out_dir, self.segmenter(model, device), overwrite=overwrite,
                                progress=progress, cancel=cancel)

    # -- sample data -------------------------------------------------------------------------------------
    def loadSampleData(self, kind: str = "asoct", seed: int = 0, shape: Optional[Sequence[int]] = None) -> tuple:
        """Generate a phantom locally (no download) and load it: ``(volumeNode, referenceSegmentationNode)``.

        Args:
            kind: ``"asoct"`` (capsule, cortex, nucleus) or ``"ct"`` (right and left lens).
            seed: phantom seed (< 10000; higher seeds are reserved for evaluation).
            shape: ``(Z, Y, X)``; default a small volume (:data:`SAMPLE_SHAPES`).
        """
        from LensSegCalibLib import phantom

        if kind not in SAMPLE_NAMES:
            raise InputError(f"Unknown sample {kind!r}; use one of {sorted(SAMPLE_NAMES)}.")
        make = phantom.asoct_volume if kind == "asoct" else phantom.ct_head_volume
        case = make(seed, shape=tuple(shape or SAMPLE_SHAPES[kind]))
        model = DEFAULT_MODEL if kind == "asoct" else "ct-lens-acw"
        classes = self._classes(model) if model in self.catalog() else mrml.phantom_classes(kind)
        return mrml.add_phantom(case, SAMPLE_NAMES[kind], classes)


class LensSegCalibTest(ScriptedLoadableModuleTest):
    """In-Slicer end-to-end test on the generated AS-OCT phantom (ctest and "Reload and Test")."""

    def runTest(self) -> None:
        self.setUp()
        self.test_EndToEnd()

    def test_EndToEnd(self) -> None:
        import tempfile

        self.delayDisplay("Generating the AS-OCT phantom")
        logic = LensSegCalibLogic()
        logic.loadTerminology()
        volume, reference = logic.loadSampleData("asoct", shape=(4, 128, 160))
        before = mrml.volume_voxel_sha256(volume)
        self.delayDisplay("Segmenting")
        result = logic.segment(volume, reference=reference, device="cpu")
        names = [result.segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(result.segmentation.GetSegmentation().GetNumberOfSegments())]
        expected = [c["name"] for c in sorted(logic._classes(DEFAULT_MODEL), key=lambda c: c["value"])][1:]
        self.assertEqual(names, expected)
        self.assertEqual(set(result.heatmaps), {"confidence", "boundary", "entropy"})
        self.assertEqual(result.table.GetNumberOfRows(), len(expected))
        self.assertEqual(mrml.volume_voxel_sha256(volume), before)
        count = slicer.mrmlScene.GetNumberOfNodes()
        logic.segment(volume, reference=reference, output=result.segmentation, device="cpu")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        with tempfile.TemporaryDirectory() as folder:
            written = logic.export_report(result, folder)
            self.assertTrue(all(Path(p).is_file() for p in written))
        self.delayDisplay("Test passed")
