#!/usr/bin/env python3
"""Headless 3D Slicer for tests and scripts: real MRML from the ``slicer-core`` wheel, no Qt, no GUI.

``start()`` builds one ``vtkMRMLScene`` with the application logic and the module logics that
LensSegCalib's Logic uses (Colors, Terminologies, Volumes, Segmentations, SubjectHierarchy, Tables, Plots,
Sequences), exposes them the way Slicer does (``slicer.mrmlScene``, ``slicer.app``,
``slicer.modules.<name>.logic()``), adds a small file-IO manager so ``slicer.util.loadVolume/saveNode/
exportNode/loadSegmentation/loadTable`` work, installs import stand-ins for what ``slicer-core`` lacks
(``qt``, ``ctk``, ``slicer.i18n``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``)
and puts ``LensSegCalib/`` on ``sys.path``. After that a plain Python process can::

    sys.path.insert(0, "Testing"); import headless_slicer      # or load the file with importlib
    scene = headless_slicer.start()
    import LensSegCalib
    logic = LensSegCalib.LensSegCalibLogic()

Used by ``Testing/slicer_module/conftest.py`` (pytest fixtures) and ``Screenshots/make_screenshots.py``; run it as a
script for a smoke check (``python Testing/headless_slicer.py``). Facts and pitfalls: ``shared/SLICER.md`` 5.
Refuses to run inside the real Slicer application (``slicer.app`` exists there).
"""
from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import tempfile
import types
import unittest
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

# Choose EGL before VTK creates any render window: skips the X11 probe (and its warning) on servers.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "LensSegCalib"

__all__ = ["start", "reset", "module_dir", "opengl_available", "OffscreenSliceView", "REPO_ROOT", "MODULE_DIR"]

# 9 evenly spaced samples (RGB 0..1) of matplotlib's perceptual maps: stand-ins for Slicer's file colour
# tables, which the wheel does not ship (no share/ColorFiles). Same node IDs as in Slicer.
_COLOR_ANCHORS = {
    "Inferno": [(0.001, 0.000, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
                (0.736, 0.216, 0.330), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
                (0.988, 0.998, 0.645)],
    "Viridis": [(0.267, 0.005, 0.329), (0.279, 0.175, 0.483), (0.230, 0.322, 0.546), (0.173, 0.449, 0.558),
                (0.128, 0.567, 0.551), (0.158, 0.684, 0.502), (0.369, 0.789, 0.383), (0.678, 0.864, 0.190),
                (0.993, 0.906, 0.144)],
    "ColdToHotRainbow": [(0.0, 0.0, 0.56), (0.0, 0.0, 1.0), (0.0, 0.5, 1.0), (0.0, 1.0, 1.0), (0.5, 1.0, 0.5),
                         (1.0, 1.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0)],
}


def module_dir() -> Path:
    """Folder of the scripted module (``LensSegCalib/``), the one Slicer puts on its module path."""
    return MODULE_DIR


class _Module:
    """Stand-in for ``slicer.modules.<name>``: ``logic()`` and ``path`` (path of the module file)."""

    def __init__(self, logic: Any, path: str = "") -> None:
        self._logic = logic
        self.path = path

    def logic(self) -> Any:
        return self._logic


class _IOManager:
    """The part of ``qSlicerCoreIOManager`` that ``slicer.util`` load/save/export helpers call."""

    _VOLUME = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
    _SEGMENTATION = (".seg.nrrd", ".seg.nhdr", ".seg.nii.gz")
    _TABLE = (".csv", ".tsv")

    def __init__(self, scene: Any, modules: Any) -> None:
        self.scene = scene
        self.modules = modules

    def fileType(self, fileName: str) -> str:
        name = str(fileName).lower()
        if name.endswith(self._SEGMENTATION):
            return "SegmentationFile"
        if name.endswith(self._VOLUME):
            return "VolumeFile"
        if name.endswith(self._TABLE):
            return "TableFile"
        return "NoFile"

    def fileWriterFileType(self, node: Any) -> str:
        for cls, kind in (("vtkMRMLSegmentationNode", "SegmentationFile"), ("vtkMRMLVolumeNode", "VolumeFile"),
                          ("vtkMRMLTableNode", "TableFile")):
            if node.IsA(cls):
                return kind
        return "NoFile"

    @staticmethod
    def _stem(fileName: str) -> str:
        base = os.path.basename(str(fileName))
        for ext in sorted(_IOManager._SEGMENTATION + _IOManager._VOLUME + _IOManager._TABLE, key=len, reverse=True):
            if base.lower().endswith(ext):
                return base[: -len(ext)]
        return os.path.splitext(base)[0]

    def loadNodes(self, fileType: str, properties: dict, loadedNodes: Any = None, userMessages: Any = None) -> bool:
        fileName = str(properties["fileName"])
        name = properties.get("name") or self._stem(fileName)
        node = None
        if fileType == "VolumeFile":
            # Bit flags of vtkSlicerVolumesLogic::AddArchetypeVolume: 1 labelmap, 2 centered, 4 single file,
            # 16 discard orientation.
            flags = sum(bit for key, bit in (("labelmap", 1), ("center", 2), ("singleFile", 4),
                                             ("discardOrientation", 16)) if properties.get(key))
            node = self.modules.volumes.logic().AddArchetypeVolume(fileName, name, flags)
        elif fileType == "SegmentationFile":
            node = self.modules.segmentations.logic().LoadSegmentationFromFile(
                fileName, bool(properties.get("autoOpacities", True)), name)
        elif fileType == "TableFile":
            node = self.modules.tables.logic().AddTable(fileName, name)
        if node is None:
            return False
        if loadedNodes is not None:
            loadedNodes.AddItem(node)
        return True

    def saveNodes(self, fileType: str, properties: dict, userMessages: Any = None) -> bool:
        # Like Slicer: saving (re)points the node's own storage node at the file.
        node = self.scene.GetNodeByID(properties["nodeID"])
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(properties["fileName"]))
        return bool(storage.WriteData(node))

    def _writerFormats(self, node: Any) -> list:
        storage = node.CreateDefaultStorageNode()
        formats = storage.GetSupportedWriteFileTypes()
        out = [formats.GetValue(i) for i in range(formats.GetNumberOfValues())]
        storage.UnRegister(None)
        if not out and node.IsA("vtkMRMLVolumeNode"):
            # slicer-core's ITK archetype storage reports no write types although WriteData handles these.
            out = ["NRRD (.nrrd)", "NRRD (.nhdr)", "NIfTI (.nii.gz)", "NIfTI (.nii)", "MetaImage (.mha)",
                   "MetaImage (.mhd)"]
        return out

    def fileWriterExtensions(self, node: Any) -> list:
        return self._writerFormats(node)

    def extractKnownExtension(self, fileName: str, node: Any) -> str:
        import slicer

        extensions = [slicer.vtkDataFileFormatHelper.GetFileExtensionFromFormatString(f)
                      for f in self._writerFormats(node)]
        for ext in sorted(extensions, key=len, reverse=True):
            if str(fileName).lower().endswith(ext.lower()):
                return ext
        return ""

    def exportNodes(self, nodeIDs: list, fileNames: list, properties: Any = None, hardenTransform: bool = False,
                    userMessages: Any = None) -> bool:
        # Export = temporary storage node; the scene and the node's own storage node stay untouched.
        ok = True
        for nodeID, fileName in zip(nodeIDs, fileNames):
            node = self.scene.GetNodeByID(nodeID)
            storage = node.CreateDefaultStorageNode()
            storage.SetFileName(str(fileName))
            ok = bool(storage.WriteData(node)) and ok
            storage.UnRegister(None)
        return ok


class _App:
    """The members of ``slicer.app`` that module logic and ``slicer.util`` touch."""

    applicationName = "Slicer"
    majorVersion, minorVersion = 5, 12

    def __init__(self, scene: Any, appLogic: Any, ioManager: _IOManager, temporaryPath: str) -> None:
        self._scene, self._appLogic, self._io = scene, appLogic, ioManager
        self.temporaryPath = temporaryPath

    def mrmlScene(self) -> Any:
        return self._scene

    def applicationLogic(self) -> Any:
        return self._appLogic

    def coreIOManager(self) -> _IOManager:
        return self._io

    def layoutManager(self) -> None:
        return None  # no views headless: code must tolerate this (it does in Slicer with --no-main-window too)

    def testingEnabled(self) -> bool:
        return True  # slicer.util message boxes log instead of blocking

    def commandOptions(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(testingEnabled=True, noMainWindow=True)

    def processEvents(self, *args: Any) -> None:
        pass

    def pauseRender(self) -> None:
        pass

    def resumeRender(self) -> None:
        pass

    def connect(self, *args: Any) -> bool:
        return True

    def setOverrideCursor(self, *args: Any) -> None:  # slicer.util.WaitCursor / tryWithErrorDisplay
        pass

    def restoreOverrideCursor(self) -> None:
        pass


def _make_color_table(scene: Any, name: str, anchors: list, singletonTag: Optional[str]) -> Any:
    """256-colour continuous table interpolated from evenly spaced anchors (a singleton survives Clear(0))."""
    import slicer
    import vtk

    transfer = vtk.vtkColorTransferFunction()
    for index, rgb in enumerate(anchors):
        transfer.AddRGBPoint(index / (len(anchors) - 1), *rgb)
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for index in range(256):
        node.SetColor(index, str(index), *transfer.GetColor(index / 255.0), 1.0)
    if singletonTag:
        node.SetSingletonTag(singletonTag)  # the scene derives the node ID from class + singleton tag
    return scene.AddNode(node)


def _stub_missing_imports() -> None:
    """Import stand-ins for modules slicer-core lacks; never replaces a module that imports."""
    import slicer

    for name in ("qt", "ctk", "slicer.qSlicerBaseQTCore"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = mock.MagicMock(name=name)

    try:
        importlib.import_module("slicer.i18n")
    except ImportError:
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        sys.modules["slicer.i18n"] = slicer.i18n = i18n

    try:
        importlib.import_module("slicer.ScriptedLoadableModule")
    except ImportError:
        sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule = _scripted_module_stub()

    try:
        importlib.import_module("slicer.parameterNodeWrapper")
    except ImportError:
        sys.modules["slicer.parameterNodeWrapper"] = slicer.parameterNodeWrapper = _parameter_wrapper_stub()


def _scripted_module_stub() -> types.ModuleType:
    """The four ScriptedLoadable base classes, reduced to what a Logic and a self-test need."""
    import slicer

    stub = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__

        def resourcePath(self, filename: str) -> str:
            return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__[: -len("Widget")]

        def resourcePath(self, filename: str) -> str:
            return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)

        def setup(self) -> None:
            raise RuntimeError("Widgets need the Slicer application; test the Logic headless instead.")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            name = type(self).__name__
            self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name
            self.isSingletonParameterNode = True

        def getParameterNode(self) -> Any:
            # Same semantics as Slicer: one singleton vtkMRMLScriptedModuleNode per module.
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetName(self.moduleName)
                node.SetSingletonTag(self.moduleName)
                node = scene.AddNode(node)
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, *args: Any, **kwargs: Any) -> None:
            logging.info(message)

        def setUp(self) -> None:
            slicer.mrmlScene.Clear(0)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(stub, cls.__name__, cls)
    stub.__all__ = [cls for cls in dir(stub) if cls.startswith("Scripted")]
    return stub


def _parameter_wrapper_stub() -> types.ModuleType:
    """``parameterNodeWrapper`` as a typed-defaults holder: no persistence in the node, no GUI binding."""
    stub = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls: type) -> type:
        defaults = {key: getattr(cls, key, None) for key in getattr(cls, "__annotations__", {})}

        def __init__(self: Any, parameterNode: Any = None) -> None:
            object.__setattr__(self, "parameterNode", parameterNode)
            for key, value in defaults.items():
                object.__setattr__(self, key, value)

        cls.__init__ = __init__
        cls.connectGui = lambda self, gui: None
        cls.disconnectGui = lambda self, tag: None
        return cls

    stub.parameterNodeWrapper = parameterNodeWrapper
    stub.parameterPack = lambda cls: cls
    for validator in ("WithinRange", "Minimum", "Maximum", "Choice", "Default", "Decimals", "SingleStep"):
        setattr(stub, validator, lambda *args, **kwargs: None)
    return stub


def _import_slicer() -> Any:
    """``import slicer`` (slicer-core).

    Note: slicer-core's ``slicer`` package calls ``pkgutil.extend_path``, so any folder named ``slicer/`` on
    ``sys.path`` would join the package; that is why the module tests live in ``Testing/slicer_module/``.
    """
    return importlib.import_module("slicer")


def start(temporaryPath: Optional[str] = None) -> Any:
    """Build the headless Slicer once per process and return its ``vtkMRMLScene`` (later calls reuse it).

    Args:
        temporaryPath: folder for ``slicer.app.temporaryPath``; a new temporary folder when None.

    Returns:
        The scene, also available as ``slicer.mrmlScene``.

    Raises:
        RuntimeError: inside the real Slicer application (the harness must not replace its scene).
    """
    slicer = _import_slicer()
    import vtk

    if getattr(slicer, "_lensSegCalibHeadless", None) is not None:
        return slicer._lensSegCalibHeadless.scene
    if hasattr(slicer, "app"):
        raise RuntimeError("Running inside the Slicer application: use slicer.mrmlScene, not the headless harness.")

    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()  # the application adds one; slice displayable managers expect it
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    appLogic.GetColorLogic().SetMRMLScene(scene)
    appLogic.GetColorLogic().AddDefaultColorNodes()
    appLogic.SetSliceLogics(vtk.vtkCollection())
    appLogic.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    for factory in (slicer.vtkMRMLSliceViewDisplayableManagerFactory,
                    slicer.vtkMRMLThreeDViewDisplayableManagerFactory):
        factory.GetInstance().SetMRMLApplicationLogic(appLogic)

    modules = types.SimpleNamespace()

    def register(key: str, logicName: str, logic: Any) -> None:
        # Application logic first, then the scene: SetMRMLScene registers node classes and needs the former.
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(logicName, logic)
        setattr(modules, key, _Module(logic))

    # Both logics look for share/ files the wheel lacks and log errors about it: harmless, silenced.
    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    register("colors", "Colors", slicer.vtkSlicerColorLogic())
    register("terminologies", "Terminologies", slicer.vtkSlicerTerminologiesModuleLogic())
    vtk.vtkObject.SetGlobalWarningDisplay(previous)
    for name, anchors in _COLOR_ANCHORS.items():
        _make_color_table(scene, name, anchors, singletonTag=f"File{name}.txt")
    generic = slicer.vtkMRMLColorTableNode()  # default labelmap colours of the Volumes logic
    generic.Copy(scene.GetNodeByID("vtkMRMLColorTableNodeLabels"))
    generic.SetName("GenericColors")
    generic.SetSingletonTag("FileGenericColors.txt")
    scene.AddNode(generic)
    register("volumes", "Volumes", slicer.vtkSlicerVolumesLogic())
    register("segmentations", "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())
    register("subjecthierarchy", "SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic())
    register("tables", "Tables", slicer.vtkSlicerTablesLogic())
    register("plots", "Plots", slicer.vtkSlicerPlotsLogic())
    register("sequences", "Sequences", slicer.vtkSlicerSequencesLogic())
    # Our own module, as Slicer would list it (slicer.modules.lenssegcalib.path = the module file).
    modules.lenssegcalib = _Module(None, str(MODULE_DIR / "LensSegCalib.py"))

    temporaryPath = temporaryPath or tempfile.mkdtemp(prefix="lenssegcalib-slicer-")
    ioManager = _IOManager(scene, modules)
    slicer.mrmlScene = scene
    slicer.modules = modules
    slicer.app = _App(scene, appLogic, ioManager, temporaryPath)
    _stub_missing_imports()
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    slicer._lensSegCalibHeadless = types.SimpleNamespace(scene=scene, appLogic=appLogic, modules=modules,
                                                         io=ioManager)
    return scene


def reset() -> None:
    """Remove all data nodes; default colour tables and singletons stay (their contents are reset)."""
    import slicer

    slicer.mrmlScene.Clear(0)


_OPENGL_PROBE = ("import vtk; w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8); w.Render(); "
                 "print(w.GetClassName()); raise SystemExit(0 if w.SupportsOpenGL() else 3)")
_opengl_cache: dict = {}


def opengl_available(timeout: float = 120.0) -> Optional[str]:
    """Name of the offscreen render-window class if OpenGL works, else None.

    Probed once per process in a child process: with no usable EGL/OSMesa, VTK segfaults on Render()
    instead of raising, which would kill the test run.
    """
    if "result" not in _opengl_cache:
        try:
            done = subprocess.run([sys.executable, "-c", _OPENGL_PROBE], capture_output=True, text=True,
                                  timeout=timeout)
            _opengl_cache["result"] = done.stdout.strip() if done.returncode == 0 else None
        except subprocess.TimeoutExpired:
            _opengl_cache["result"] = None
    return _opengl_cache["result"]


class OffscreenSliceView:
    """One slice view (slice logic + displayable managers) rendered offscreen, as Slicer's Red/Yellow/Green.

    Slicer draws the blended layers with CTK; here a ``vtkImageMapper`` shows the slice logic's output, and
    the segmentation outlines and colour legend come from Slicer's own displayable managers.
    Call only after ``opengl_available()`` returned a class name (a missing backend segfaults).
    """

    MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLColorLegendDisplayableManager")

    def __init__(self, layoutName: str = "Red", size: tuple = (640, 480)) -> None:
        import slicer
        import vtk

        headless = slicer._lensSegCalibHeadless
        self.size = size
        self.sliceLogic = slicer.vtkMRMLSliceLogic()
        self.sliceLogic.SetMRMLApplicationLogic(headless.appLogic)
        self.sliceLogic.SetMRMLScene(headless.scene)
        self.sliceNode = self.sliceLogic.AddSliceNode(layoutName)
        headless.appLogic.GetSliceLogics().AddItem(self.sliceLogic)
        self.renderWindow = vtk.vtkRenderWindow()
        self.renderWindow.SetOffScreenRendering(1)
        self.renderWindow.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.renderWindow.AddRenderer(self.renderer)
        # Without an initialised interactor the displayable-manager group segfaults.
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.renderWindow)
        self.interactor.Initialize()
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for name in self.MANAGERS:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.sliceNode)
        mapper = vtk.vtkImageMapper()
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        self.imageActor = vtk.vtkActor2D()
        self.imageActor.SetMapper(mapper)
        self.imageActor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.imageActor)
        self.corner = vtk.vtkCornerAnnotation()
        self.corner.SetMaximumFontSize(15)
        self.renderer.AddViewProp(self.corner)

    def save_png(self, path: str | os.PathLike, annotations: Optional[dict] = None,
                 sliceOffset: Optional[float] = None, zoom: float = 1.0, center: Optional[tuple] = None) -> None:
        """Fit the view to the background volume, render and write an RGB PNG of ``size`` pixels.

        Args:
            annotations: ``{vtkCornerAnnotation corner: text}``.
            sliceOffset: slice position (mm along the view normal); None keeps the fitted one.
            zoom: > 1 magnifies (field of view divided by ``zoom``), around ``center`` (RAS mm) when given.
        """
        import vtk

        self.sliceLogic.ResizeSliceNode(*self.size)
        self.sliceLogic.FitSliceToBackground(*self.size)
        if zoom != 1.0:
            fov = self.sliceNode.GetFieldOfView()
            self.sliceNode.SetFieldOfView(fov[0] / zoom, fov[1] / zoom, fov[2])
        if center is not None:
            self.sliceNode.JumpSliceByCentering(*center)
        if sliceOffset is not None:
            self.sliceLogic.SetSliceOffset(sliceOffset)
        self.sliceLogic.SnapSliceOffsetToIJK()
        # The slice logic's output port changes whenever layers change: reconnect before each render.
        self.imageActor.GetMapper().SetInputConnection(self.sliceLogic.GetImageDataConnection())
        for corner, text in (annotations or {}).items():
            self.corner.SetText(corner, text)
        self.renderWindow.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.renderWindow)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()


def _smoke(argv: Optional[list] = None) -> int:
    """Script entry: start, import the module, run a Logic call on a tiny volume, print what worked."""
    import numpy as np

    scene = start()
    slicer = _import_slicer()

    import LensSegCalib  # noqa: F401  (import check: the thin module loads under the stand-ins)

    volume = slicer.util.addVolumeFromArray(np.zeros((2, 3, 4), np.float32), name="smoke")
    logic = LensSegCalib.LensSegCalibLogic()
    print(f"scene ok: {scene.GetNumberOfNodes()} nodes; volume {volume.GetName()} spacing {volume.GetSpacing()}")
    print(f"LensSegCalibLogic ok: {type(logic).__name__}; OpenGL: {opengl_available() or 'unavailable'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_smoke(sys.argv[1:]))
