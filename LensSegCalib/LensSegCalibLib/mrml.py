"""MRML glue: numpy arrays <-> Slicer nodes for volumes, segmentations, heatmaps, report tables and plots.

The only core module that imports ``slicer``/``vtk`` (never ``qt``): it runs inside Slicer and headless on the
``slicer-core`` wheel (``Testing/headless_slicer.py``), so everything here is tested on real MRML.

Conventions (``docs/ARCHITECTURE.md``):
- Arrays from/to nodes are in array-axis order ``(K, J, I)`` = ``(Z, Y, X)``; ``slicer.util.arrayFromVolume``
  gives exactly that. ``vtkMRMLVolumeNode.GetSpacing()`` is ``(I, J, K)``: :func:`geometry_from_volume` reverses
  it into ``io.Geometry.spacing`` (array order).
- Slicer's physical space is RAS; ``io.Geometry`` (like SimpleITK and the files) is LPS. ``RAS = F @ LPS`` with
  ``F = diag(-1, -1, 1)``; the conversion lives here and in ``io.Geometry.ijk_to_ras`` only.
- Nodes we make carry the attribute ``LensSegCalib.Role`` (what they are) and ``LensSegCalib.Output`` (the ID of
  the segmentation node of the run they belong to), so a rerun into the same output updates them in place
  instead of adding duplicates; all or nothing: the new result is built in new nodes, checked, then swapped
  into the earlier ones (:func:`publish_job`).
- Heatmap volumes are float32: the float16 maps of a ``Prediction`` are widened on the way in (VTK has no
  half type).
- Input nodes are never modified: arrays are copied out of them.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from .errors import InputError
from .io import Geometry

__all__ = [
    "LPS_TO_RAS",
    "ROLE_ATTRIBUTE",
    "OUTPUT_ATTRIBUTE",
    "KIND_ATTRIBUTE",
    "SLOT_ATTRIBUTE",
    "HeatmapStyle",
    "HEATMAP_STYLES",
    "geometry_from_volume",
    "ijk_to_ras_from_geometry",
    "array_from_volume",
    "volume_voxel_sha256",
    "add_volume",
    "update_segmentation",
    "labels_from_segmentation",
    "add_heatmap",
    "show_heatmap",
    "hide_heatmaps",
    "color_node_for",
    "add_table",
    "add_reliability_chart",
    "find_nodes",
    "remove_nodes",
    "HEATMAP_MAPS",
    "SegmentationJob",
    "ComputedRun",
    "SegmentationResult",
    "prepare_job",
    "compute_job",
    "publish_job",
    "report_rows",
    "display_threshold",
    "export_result",
    "batch_files",
    "phantom_classes",
    "add_phantom",
    "parse_progress_line",
    "run_child_batch",
]

#: LPS <-> RAS: negate the first two physical axes (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ROLE_ATTRIBUTE = "LensSegCalib.Role"
OUTPUT_ATTRIBUTE = "LensSegCalib.Output"
KIND_ATTRIBUTE = "LensSegCalib.Kind"
SLOT_ATTRIBUTE = "LensSegCalib.Slot"


# --------------------------------------------------------------------------------------------- geometry
def geometry_from_volume(volumeNode: Any) -> Geometry:
    """The node's geometry as ``io.Geometry`` (spacing in array order, origin and direction in LPS).

    Args:
        volumeNode: any ``vtkMRMLVolumeNode``. A parent transform is not applied (harden it first).

    Returns:
        ``Geometry(spacing=(sk, sj, si), origin=LPS xyz, direction=9 values row-major, column j = axis j (i first))``.
    """
    import vtk

    directions = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(directions)
    rasDirection = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    lpsDirection = LPS_TO_RAS @ rasDirection  # columns stay the i, j, k axes
    lpsOrigin = LPS_TO_RAS @ np.asarray(volumeNode.GetOrigin(), dtype=float)
    spacingIJK = tuple(float(s) for s in volumeNode.GetSpacing())
    return Geometry(spacing=spacingIJK[::-1], origin=tuple(lpsOrigin.tolist()),
                    direction=tuple(lpsDirection.ravel().tolist()))


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix (what ``slicer.util.addVolumeFromArray`` takes) of a 3D ``io.Geometry``."""
    if geometry.ndim != 3:
        raise InputError(f"Slicer volumes are 3D; got a {geometry.ndim}D geometry. Add a slice axis of size 1.")
    return geometry.ijk_to_ras()


def _set_geometry(node: Any, geometry: Geometry) -> None:
    import slicer

    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_geometry(geometry)))


def array_from_volume(volumeNode: Any) -> np.ndarray:
    """A copy of the voxels of a scalar volume node, ``(K, J, I)``; the node is left untouched.

    Raises:
        InputError: no image data, empty, or not a single-component 3D scalar volume.
    """
    import slicer

    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") or \
            volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):  # a label map is a scalar volume subclass
        kind = "nothing" if volumeNode is None else volumeNode.GetClassName()
        raise InputError(f"Expected a scalar volume node, got {kind}. Select a grey-value volume (not a "
                         "vector/RGB, DTI or label map volume) as input.")
    imageData = volumeNode.GetImageData()
    if imageData is None or 0 in imageData.GetDimensions():
        raise InputError(f"Volume '{volumeNode.GetName()}' has no voxels. Load an image into it first.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise InputError(f"Volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                         "components per voxel; convert it to a single-component scalar volume first "
                         "(Vector to Scalar Volume module).")
    return np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)


def volume_voxel_sha256(volumeNode: Any) -> str:
    """sha256 of a volume's voxel bytes, shape and dtype: proves that a node was not modified."""
    import slicer

    array = np.ascontiguousarray(slicer.util.arrayFromVolume(volumeNode))
    digest = hashlib.sha256(f"{array.shape}{array.dtype.str}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _tag(node: Any, role: str, output: Any = None, kind: Optional[str] = None) -> None:
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    if output is not None:
        node.SetAttribute(OUTPUT_ATTRIBUTE, output.GetID())
    if kind is not None:
        node.SetAttribute(KIND_ATTRIBUTE, kind)


def find_nodes(role: str, output: Any = None, kind: Optional[str] = None, className: str = "vtkMRMLNode") -> list:
    """Nodes in the scene we made with this role (and output segmentation / kind, when given)."""
    import slicer

    found = []
    collection = slicer.mrmlScene.GetNodesByClass(className)
    for index in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(index)
        if node.GetAttribute(ROLE_ATTRIBUTE) != role:
            continue
        if output is not None and node.GetAttribute(OUTPUT_ATTRIBUTE) != output.GetID():
            continue
        if kind is not None and node.GetAttribute(KIND_ATTRIBUTE) != kind:
            continue
        found.append(node)
    return found


def remove_nodes(nodes: Iterable[Any]) -> None:
    """Remove nodes (and, through the scene, their display/storage nodes); ``None`` entries are skipped."""
    import slicer

    for node in nodes:
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            continue
        # RemoveNode leaves the display and storage nodes behind (slicer-core): remove them explicitly
        companions = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if hasattr(node, "GetNumberOfDisplayNodes") else []
        if hasattr(node, "GetStorageNode"):
            companions.append(node.GetStorageNode())
        slicer.mrmlScene.RemoveNode(node)
        for companion in companions:
            if companion is not None and slicer.mrmlScene.IsNodePresent(companion):
                slicer.mrmlScene.RemoveNode(companion)


# ------------------------------------------------------------------------------------------------ volumes
def add_volume(array: np.ndarray, geometry: Geometry, name: str, *, existing: Any = None,
               role: str = "volume", output: Any = None, kind: Optional[str] = None) -> Any:
    """Scalar volume node holding a copy of ``array`` (``(K, J, I)``) on ``geometry``.

    Args:
        array: 3D array in array-axis order; copied. float16 (the inference maps) is stored as float32.
        geometry: ``io.Geometry`` of the array (spacing array order, LPS).
        name: node name.
        existing: a scalar volume node to update in place (a rerun) instead of adding a new one.
        role, output, kind: bookkeeping attributes (see module docstring).
    """
    import slicer

    data = np.ascontiguousarray(array)
    if data.dtype == np.float16:  # VTK has no half-float type: exact widening to float32
        data = data.astype(np.float32)
    if data.ndim != 3:
        raise InputError(f"Volume arrays must be 3D (K, J, I); got shape {data.shape}.")
    if existing is None:
        # (add|update)VolumeFromArray deep-copy the voxels into VTK: no copy of our own needed
        node = slicer.util.addVolumeFromArray(data, ijk_to_ras_from_geometry(geometry), name=name)
    else:
        node = existing
        node.SetName(name)
        slicer.util.updateVolumeFromArray(node, data)
        _set_geometry(node, geometry)
    _tag(node, role, output, kind)
    return node


# ------------------------------------------------------------------------------------------- segmentation
def _color01(color: Sequence[float]) -> tuple:
    values = [float(c) for c in color]
    return tuple(v / 255.0 for v in values) if max(values, default=0.0) > 1.0 else tuple(values)


def update_segmentation(labels: np.ndarray, referenceVolume: Any, classes: Sequence[Mapping[str, Any]], *,
                        segmentation: Any = None, name: str = "Segmentation", show3D: bool = True) -> Any:
    """Create or update a segmentation node from a label map on ``referenceVolume``'s grid.

    One segment per foreground class, segment ID = class ``key`` (stable across reruns), name and colour
    (0..255 or 0..1) from the class, terminology tag when the class has one. In an existing node, segments with
    these IDs are replaced; the user's other segments stay.

    Args:
        labels: integer ``(K, J, I)`` label map on the reference volume's grid (values = class ``value``).
        referenceVolume: volume node whose geometry the labels share.
        classes: dicts ``{value, key, name, color, terminology?}`` (value 0 = background is skipped).
        segmentation: existing ``vtkMRMLSegmentationNode`` to update, or None for a new one.
        name: name of a new node.
        show3D: also build closed surfaces (3D view).
    """
    import slicer

    if labels.shape != tuple(reversed(referenceVolume.GetImageData().GetDimensions())):
        raise InputError(f"Label map {labels.shape} does not match the volume grid "
                         f"{tuple(reversed(referenceVolume.GetImageData().GetDimensions()))} (K, J, I).")
    node = segmentation
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)  # before importing labels
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    segments = node.GetSegmentation()
    wasModifying = node.StartModify()
    try:
        for cls in sorted(classes, key=lambda c: int(c["value"])):
            if int(cls["value"]) == 0:
                continue
            key = str(cls["key"])
            if segments.GetSegment(key) is not None:
                segments.RemoveSegment(key)
            segments.AddEmptySegment(key, str(cls["name"]), _color01(cls["color"]))
            _import_mask(labels == int(cls["value"]), node, key, referenceVolume)
            terminology = cls.get("terminology")
            if terminology:
                segment = segments.GetSegment(key)
                segment.SetTag(segment.GetTerminologyEntryTagName(), str(terminology))
    finally:
        node.EndModify(wasModifying)
    _style_segmentation_display(node.GetDisplayNode())
    if show3D:
        node.CreateClosedSurfaceRepresentation()
    _tag(node, "segmentation")
    node.SetAttribute(OUTPUT_ATTRIBUTE, node.GetID())
    return node


def _style_segmentation_display(display: Any) -> None:
    """Predictions: light fill + outline (SLICER.md 3.2)."""
    display.SetVisibility2DFill(True)
    display.SetOpacity2DFill(0.3)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(2)


def _import_mask(mask: np.ndarray, segmentationNode: Any, segmentId: str, referenceVolume: Any) -> None:
    """Set a segment's binary labelmap from a ``(K, J, I)`` bool mask on the reference volume's grid.

    Through a temporary label map node *without* display node: ``slicer.util.updateSegmentBinaryLabelmapFromArray``
    leaves the temporary node's display node in the scene, one per call (a rerun would grow the scene).
    """
    import slicer
    import vtk

    temporary = slicer.vtkMRMLLabelMapVolumeNode()
    temporary.SetName("__LensSegCalib_temp__")
    temporary.SetHideFromEditors(True)
    slicer.mrmlScene.AddNode(temporary)
    try:
        matrix = vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(matrix)
        temporary.SetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(temporary, np.ascontiguousarray(mask, dtype=np.uint8))
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(temporary, segmentationNode,
                                                                                     segmentIds):
            raise InputError(f"Slicer could not import segment {segmentId!r}; check that the volume has voxels.")
    finally:
        slicer.mrmlScene.RemoveNode(temporary)


def _export_mask(segmentationNode: Any, segmentId: str, referenceVolume: Any) -> np.ndarray:
    """Bool ``(K, J, I)`` mask of one segment resampled onto ``referenceVolume``'s grid.

    Own version of ``slicer.util.arrayFromSegmentBinaryLabelmap``, which leaves the temporary label map's
    display node in the scene on every call.
    """
    import slicer
    import vtk

    temporary = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__LensSegCalib_temp__")
    try:
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, segmentIds,
                                                                                 temporary, referenceVolume):
            raise InputError(f"Segment {segmentId!r} of '{segmentationNode.GetName()}' could not be exported to the "
                             "volume's grid; check that both overlap in space.")
        return np.asarray(slicer.util.arrayFromVolume(temporary)) > 0
    finally:
        display = temporary.GetDisplayNode()
        if display is not None:
            color = display.GetColorNode()
            slicer.mrmlScene.RemoveNode(display)
            if color is not None and not color.GetSingletonTag():  # a per-export table, not a default one
                slicer.mrmlScene.RemoveNode(color)
        slicer.mrmlScene.RemoveNode(temporary)


def labels_from_segmentation(segmentationNode: Any, referenceVolume: Any,
                             classes: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Label map ``(K, J, I)`` uint8 on ``referenceVolume``'s grid from a (reference) segmentation.

    Segments are matched to classes by segment ID = class key, else by name (case-insensitive); voxels of
    unmatched segments stay 0.

    Raises:
        InputError: no segment matches any foreground class (the message lists both sides).
    """
    import slicer

    segments = segmentationNode.GetSegmentation()
    byName = {segments.GetNthSegment(i).GetName().strip().lower(): segments.GetNthSegmentID(i)
              for i in range(segments.GetNumberOfSegments())}
    shape = tuple(reversed(referenceVolume.GetImageData().GetDimensions()))
    labels = np.zeros(shape, np.uint8)
    matched = 0
    for cls in sorted(classes, key=lambda c: int(c["value"])):
        if int(cls["value"]) == 0:
            continue
        segmentId = cls["key"] if segments.GetSegment(str(cls["key"])) is not None else \
            byName.get(str(cls["name"]).strip().lower())
        if segmentId is None:
            continue
        labels[_export_mask(segmentationNode, segmentId, referenceVolume)] = int(cls["value"])
        matched += 1
    if matched == 0:
        present = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
        expected = [str(c["name"]) for c in classes if int(c["value"]) != 0]
        raise InputError(f"Reference segmentation '{segmentationNode.GetName()}' has segments {present}, none "
                         f"matching the model's classes {expected}. Rename the reference segments to these names.")
    return labels


# ---------------------------------------------------------------------------------------------- heatmaps
@dataclass(frozen=True)
class HeatmapStyle:
    """How one heatmap quantity is shown: colour table, window and threshold (values outside are transparent)."""

    title: str
    colors: str
    window: tuple
    threshold: tuple
    invert: bool = False
    unit: str = ""


#: Display conventions per heatmap kind (SLICER.md 3.1, METHODS.md 10): fixed windows so colours mean the same
#: in every case; thresholds hide the uninteresting voxels (confident / no boundary uncertainty).
HEATMAP_STYLES: dict = {
    "confidence": HeatmapStyle("Confidence (low is hot)", "Inferno", (0.0, 1.0), (0.0, 0.95), invert=True),
    "entropy": HeatmapStyle("Normalised entropy", "Viridis", (0.0, 1.0), (0.05, 1.0)),
    "boundary": HeatmapStyle("Boundary uncertainty", "Inferno", (0.0, 1.0), (0.05, 1.0)),
    "boundary_signed": HeatmapStyle("Boundary calibration error (+ over-confident)", "LensSegCalibSignedGap",
                                    (-0.5, 0.5), (-1.0, 1.0)),
}


def _signed_gap_table() -> Any:
    """Diverging blue-white-red table for signed calibration gaps (0 = white), made once per scene."""
    import slicer

    existing = slicer.mrmlScene.GetFirstNodeByName("LensSegCalibSignedGap")
    if existing is not None:
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetName("LensSegCalibSignedGap")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for index in range(256):
        t = index / 255.0 * 2.0 - 1.0  # -1 (under-confident, blue) .. +1 (over-confident, red)
        if t < 0:
            rgb = (1.0 + 0.85 * t, 1.0 + 0.6 * t, 1.0)  # white -> (0.15, 0.4, 1.0)
        else:
            rgb = (1.0, 1.0 - 0.85 * t, 1.0 - 0.85 * t)  # white -> (1.0, 0.15, 0.15)
        node.SetColor(index, str(index), *rgb, 1.0)
    node.SetAttribute(ROLE_ATTRIBUTE, "colors")
    return slicer.mrmlScene.AddNode(node)


def color_node_for(kind: str) -> Any:
    """Colour table node of a heatmap kind: Slicer's built-in file table (same ID headless) or our own."""
    import slicer

    style = HEATMAP_STYLES[kind]
    if style.colors == "LensSegCalibSignedGap":
        return _signed_gap_table()
    node = slicer.mrmlScene.GetNodeByID(slicer.vtkMRMLColorLogic.GetFileColorNodeID(f"{style.colors}.txt"))
    if node is None:  # very old Slicer: fall back to a procedural table that always exists
        node = slicer.mrmlScene.GetNodeByID("vtkMRMLColorTableNodeFileViridis.txt") or \
            slicer.mrmlScene.GetNodeByID("vtkMRMLPETProceduralColorNodePET-Heat")
    return node


def add_heatmap(array: np.ndarray, geometry: Geometry, kind: str, name: str, *, output: Any = None,
                existing: Any = None) -> Any:
    """Float32 heatmap volume on ``geometry`` with display node, colour table, fixed window and threshold.

    Args:
        array: ``(K, J, I)`` values in the kind's range, any float type (float16 maps of a ``Prediction`` are
            widened to float32: VTK has no half type). NaN = undefined (outside the boundary band): stored as
            0 (hidden by the threshold), except in the signed map, where it stays NaN (transparent).
        kind: a key of :data:`HEATMAP_STYLES`.
        name: node name, e.g. ``"<input> confidence"``.
        output: the run's segmentation node (bookkeeping for reruns).
        existing: heatmap node of an earlier run to update in place.
    """
    if kind not in HEATMAP_STYLES:
        raise InputError(f"Unknown heatmap kind {kind!r}; use one of {sorted(HEATMAP_STYLES)}.")
    values = np.asarray(array, dtype=np.float32)
    if kind != "boundary_signed":
        # In place on our own float32 copy (float16 maps): one volume-sized array less; never on the caller's.
        values = np.nan_to_num(values, copy=bool(np.may_share_memory(values, array)), nan=0.0, posinf=1.0,
                               neginf=-1.0)
    # The signed map keeps NaN outside its band: 0 there would read as "perfectly calibrated" (white over the
    # whole image); NaN fails the display threshold test, so those voxels are transparent in the slice views.
    node = add_volume(values, geometry, name, existing=existing, role="heatmap", output=output, kind=kind)
    _style_heatmap_display(node, kind)
    return node


def _style_heatmap_display(node: Any, kind: str) -> None:
    """Display node of a heatmap volume (made if missing): colour table, fixed window, threshold of ``kind``."""
    style = HEATMAP_STYLES[kind]
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color_node_for(kind).GetID())
    display.AutoWindowLevelOff()  # never auto W/L: colours must mean the same in every case
    display.SetWindowLevelMinMax(*style.window)
    display.SetInterpolate(False)
    display.SetInvertDisplayScalarRange(style.invert)
    display.AutoThresholdOff()
    display.ApplyThresholdOn()
    display.SetThreshold(*style.threshold)


def show_heatmap(heatmapNode: Any, backgroundNode: Any, *, opacity: float = 0.5,
                 threshold: Optional[tuple] = None, legend: bool = True) -> Any:
    """Show a heatmap as the foreground layer of every slice view, with an optional colour legend.

    Args:
        heatmapNode: from :func:`add_heatmap`.
        backgroundNode: the input volume (background layer).
        opacity: foreground opacity 0..1.
        threshold: ``(lower, upper)`` shown range (outside is transparent); None keeps the node's.
        legend: add (or reuse) a colour legend display node.

    Returns:
        The colour legend display node, or None.
    """
    import slicer

    display = heatmapNode.GetDisplayNode()
    if threshold is not None:
        display.AutoThresholdOff()
        display.ApplyThresholdOn()
        display.SetThreshold(float(threshold[0]), float(threshold[1]))
    composites = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(backgroundNode.GetID())
        composite.SetForegroundVolumeID(heatmapNode.GetID())
        composite.SetForegroundOpacity(float(min(max(opacity, 0.0), 1.0)))
    legendNode = None
    if legend:
        legendNode = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heatmapNode)
        if legendNode is None:
            legendNode = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(heatmapNode)
        if legendNode is not None:
            kind = heatmapNode.GetAttribute(KIND_ATTRIBUTE)
            legendNode.SetTitleText(HEATMAP_STYLES[kind].title if kind in HEATMAP_STYLES else heatmapNode.GetName())
            legendNode.SetLabelFormat("%.2f")
            legendNode.SetVisibility(True)
    return legendNode


def hide_heatmaps() -> None:
    """Empty the foreground layer of every slice view that shows one of our heatmaps; hide their legends."""
    import slicer

    composites = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        foreground = slicer.mrmlScene.GetNodeByID(composite.GetForegroundVolumeID() or "")
        if foreground is not None and foreground.GetAttribute(ROLE_ATTRIBUTE) == "heatmap":
            composite.SetForegroundVolumeID(None)
    for node in find_nodes("heatmap", className="vtkMRMLScalarVolumeNode"):
        legendNode = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node)
        if legendNode is not None:
            legendNode.SetVisibility(False)


# ------------------------------------------------------------------------------------------ tables, plots
def _column(title: str, values: Sequence[Any]) -> Any:
    import vtk

    if all(isinstance(v, str) for v in values):
        array = vtk.vtkStringArray()
    elif all(isinstance(v, (bool, int, np.integer)) and not isinstance(v, float) for v in values):
        array = vtk.vtkIntArray()
    else:
        array = vtk.vtkDoubleArray()
    array.SetName(title)
    for value in values:
        if isinstance(array, vtk.vtkStringArray):
            array.InsertNextValue(value)
        elif isinstance(array, vtk.vtkIntArray):
            array.InsertNextValue(int(value))
        else:
            array.InsertNextValue(float("nan") if value is None else float(value))
    return array


def add_table(rows: Sequence[Mapping[str, Any]], name: str, *, existing: Any = None, output: Any = None,
              role: str = "report", units: Optional[Mapping[str, str]] = None,
              descriptions: Optional[Mapping[str, str]] = None) -> Any:
    """Table node with one row per entry of ``rows`` (dicts with the same keys, in column order).

    Strings become string columns, ints int columns, everything else double (None -> NaN). ``existing`` is
    emptied and refilled (a rerun keeps the node and its ID).
    """
    import slicer

    node = existing or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetName(name)
    table = node.GetTable()
    wasModifying = node.StartModify()
    try:
        while table.GetNumberOfColumns():
            table.RemoveColumn(0)
        columns = list(rows[0].keys()) if rows else []
        for title in columns:
            table.AddColumn(_column(title, [row.get(title) for row in rows]))
        node.SetUseColumnTitleAsColumnHeader(True)
        for title, unit in (units or {}).items():
            if title in columns:
                node.SetColumnUnitLabel(title, unit)
        for title, text in (descriptions or {}).items():
            if title in columns:
                node.SetColumnDescription(title, text)
        table.Modified()
    finally:
        node.EndModify(wasModifying)
    _tag(node, role, output)
    return node


def add_reliability_chart(bins: Mapping[str, Sequence[float]], title: str, *, output: Any = None,
                          key: str = "all", existing: Optional[Mapping[str, Any]] = None) -> dict:
    """Reliability diagram as MRML plot nodes: bins table, observed and ideal series, chart (axes 0..1).

    Args:
        bins: ``{"center", "confidence", "accuracy", "count"}``, one value per bin (empty bins are skipped).
        title: chart title.
        output: the run's segmentation node (bookkeeping).
        key: which diagram of the run (segment key or ``"all"``), stored as the kind attribute.
        existing: ``{"table", "observed", "ideal", "chart"}`` of an earlier run to update in place.

    Returns:
        ``{"table", "observed", "ideal", "chart"}`` nodes.
    """
    import slicer

    counts = np.asarray(bins["count"], dtype=float)
    keep = counts > 0
    rows = [{"BinCenter": float(c), "MeanConfidence": float(m), "Accuracy": float(a), "Count": int(n)}
            for c, m, a, n, k in zip(bins["center"], bins["confidence"], bins["accuracy"], counts, keep) if k]
    existing = dict(existing or {})
    table = add_table(rows or [{"BinCenter": 0.5, "MeanConfidence": math.nan, "Accuracy": math.nan, "Count": 0}],
                      f"{title} bins", existing=existing.get("table"), output=output, role="reliability-table")
    table.SetAttribute(KIND_ATTRIBUTE, key)
    scene = slicer.mrmlScene
    observed = existing.get("observed") or scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{title} observed")
    observed.SetAndObserveTableNodeID(table.GetID())
    observed.SetXColumnName("MeanConfidence")
    observed.SetYColumnName("Accuracy")
    observed.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    observed.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    observed.SetColor(0.85, 0.3, 0.1)
    ideal = existing.get("ideal") or scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{title} ideal")
    ideal.SetAndObserveTableNodeID(table.GetID())
    ideal.SetXColumnName("BinCenter")
    ideal.SetYColumnName("BinCenter")
    ideal.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeLine)
    ideal.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
    ideal.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    ideal.SetColor(0.5, 0.5, 0.5)
    chart = existing.get("chart") or scene.AddNewNodeByClass("vtkMRMLPlotChartNode", title)
    chart.SetName(title)
    chart.RemoveAllPlotSeriesNodeIDs()
    for series in (observed, ideal):
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(title)
    chart.SetXAxisTitle("Confidence")
    chart.SetYAxisTitle("Accuracy")
    chart.SetXAxisRangeAuto(False)
    chart.SetXAxisRange(0.0, 1.0)
    chart.SetYAxisRangeAuto(False)
    chart.SetYAxisRange(0.0, 1.0)
    for node, role in ((observed, "reliability-series"), (ideal, "reliability-series"), (chart, "reliability-chart")):
        _tag(node, role, output, key)
    observed.SetAttribute(SLOT_ATTRIBUTE, "observed")  # a rerun finds the series by slot, not by (editable) name
    ideal.SetAttribute(SLOT_ATTRIBUTE, "ideal")
    return {"table": table, "observed": observed, "ideal": ideal, "chart": chart}


# ------------------------------------------------------------------------------------------------- runs
#: Heatmaps a run publishes, in the order the GUI offers them (``"boundary"`` is signed with a reference).
HEATMAP_MAPS = ("confidence", "boundary", "entropy")
MAP_ATTRIBUTE = "LensSegCalib.Map"
#: Name prefix of the hidden staging segmentation of a rerun (removed before the rerun returns).
_STAGING_PREFIX = "__LensSegCalib_staging__"

#: SegmentReport fields that are not table columns (lists / display data).
_NOT_COLUMNS = ("value", "key", "color", "reliability", "confidence_histogram")
#: Fields that only a reference fills (dropped from the table when no reference was given).
_REFERENCE_COLUMNS = ("reference_voxels", "reference_volume_ml", "dice", "iou", "hd95_mm", "assd_mm", "ece",
                      "classwise_ece", "bece", "pece", "nll", "brier")
_COLUMN_UNITS = {"volume_ml": "mL", "reference_volume_ml": "mL", "hd95_mm": "mm", "assd_mm": "mm"}
_COLUMN_DESCRIPTIONS = {
    "name": "Segment name (model class)",
    "voxels": "Voxels predicted as this segment",
    "volume_ml": "Predicted volume",
    "mean_confidence": "Mean top-label probability inside the segment",
    "p5_confidence": "5th percentile of the confidence inside the segment",
    "band_mean_entropy": "Mean normalised entropy in the band around the segment's boundary",
    "dice": "Dice overlap with the reference",
    "ece": "Expected calibration error (top-label, 15 bins; fraction, x100 for %)",
    "bece": "Boundary expected calibration error (band around reference interfaces)",
}


@dataclass
class SegmentationJob:
    """Everything a run needs, read from the scene on the main thread (MRML is not thread-safe).

    Attributes:
        volume: input volume node (only read). image: copy of its voxels ``(K, J, I)``. geometry: its geometry.
        reference: reference labels ``(K, J, I)`` uint8 on the volume's grid, or None.
        input_sha256: hash of the voxels (provenance; also proves the input was not modified).
        name: input node name, used in output node names.
    """

    volume: Any
    image: np.ndarray
    geometry: Geometry
    reference: Optional[np.ndarray]
    input_sha256: str
    name: str


@dataclass
class ComputedRun:
    """Result of the heavy, thread-safe part (no MRML): prediction, report and the signed boundary map."""

    prediction: Any
    report: Any
    signed_boundary: Optional[np.ndarray]
    seconds: float


@dataclass
class SegmentationResult:
    """What ``LensSegCalibLogic.segment`` returns: the nodes it made or updated, and the numbers.

    Attributes:
        segmentation: ``vtkMRMLSegmentationNode`` (one segment per foreground class, ID = class key).
        heatmaps: ``{"confidence", "boundary", "entropy"}`` -> ``vtkMRMLScalarVolumeNode`` (float32, window
            0..1; ``boundary`` is the signed calibration error, window -0.5..0.5, when a reference was given).
        table: ``vtkMRMLTableNode``, one row per segment with the report's numbers.
        plots: ``vtkMRMLPlotChartNode`` reliability diagrams (overall first), empty without a reference.
        report: the ``LensSegCalibLib.report.CalibrationReport``.
        prediction: the ``LensSegCalibLib.inference.Prediction`` (arrays on the input grid).
        volume, geometry, reference: the input node, its geometry, and the reference labels used (or None).
    """

    segmentation: Any
    heatmaps: dict
    table: Any
    plots: list
    report: Any
    prediction: Any
    volume: Any
    geometry: Geometry
    reference: Optional[np.ndarray] = None

    @property
    def nodes(self) -> list:
        """Every node of the result (segmentation, heatmaps, table, charts and their series/tables)."""
        nodes = [self.segmentation, *self.heatmaps.values(), self.table]
        for chart in self.plots:
            nodes.append(chart)
            for index in range(chart.GetNumberOfPlotSeriesNodes()):
                series = chart.GetNthPlotSeriesNode(index)
                nodes += [series, series.GetTableNode()]
        return [node for node in dict.fromkeys(nodes) if node is not None]


def prepare_job(volumeNode: Any, classes: Sequence[Mapping[str, Any]], reference: Any = None) -> SegmentationJob:
    """Read the input (and reference) from the scene: geometry check, voxel copy, reference labels.

    Raises:
        InputError: not a usable scalar volume, bad spacing/direction, reference without matching segments.
    """
    image = array_from_volume(volumeNode)
    geometry = geometry_from_volume(volumeNode)
    geometry.validate()
    if volumeNode.GetParentTransformNode() is not None:
        raise InputError(f"Volume '{volumeNode.GetName()}' is under a transform. Harden the transform first "
                         "(Data module: right-click > Harden transform) so that outputs line up with it.")
    labels = labels_from_segmentation(reference, volumeNode, classes) if reference is not None else None
    return SegmentationJob(volume=volumeNode, image=image, geometry=geometry, reference=labels,
                           input_sha256=volume_voxel_sha256(volumeNode), name=volumeNode.GetName())


def compute_job(job: SegmentationJob, segmenter: Any, *, progress: Any = None, cancel: Any = None) -> ComputedRun:
    """The heavy part, safe to run in a worker thread (no MRML): inference, report, signed boundary map.

    Args:
        job: from :func:`prepare_job`.
        segmenter: a ``LensSegCalibLib.inference.Segmenter`` (or an object with the same ``predict``).
        progress: ``progress(fraction 0..1, message)``; called from this thread.
        cancel: ``threading.Event``; when set, raises ``Cancelled`` (nothing is published).
    """
    import time

    from .errors import Cancelled
    from .heatmaps import boundary_calibration_map
    from .report import calibration_report

    started = time.perf_counter()
    report = progress or (lambda fraction, message: None)

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Segmentation cancelled; the scene was left unchanged.")

    def inference_progress(fraction: float, message: str) -> None:
        report(0.05 + 0.8 * float(fraction), message)  # inference is most of the time

    check()
    report(0.02, f"Segmenting {job.name} with {getattr(segmenter, 'model_id', 'the model')}")
    direction = np.asarray(job.geometry.direction, dtype=float).reshape(3, 3)
    prediction = segmenter.predict(job.image, job.geometry.spacing, direction=direction,
                                   progress=inference_progress, cancel=cancel)
    check()
    report(0.87, "Computing the calibration report")
    calibration = calibration_report(prediction, job.geometry.spacing, reference=job.reference, image=job.image,
                                     case=_case_name(job.name), input_sha256=job.input_sha256)
    check()
    signed = None
    if job.reference is not None:
        # The report already holds the signed map (it draws it in the HTML); compute it only if it does not.
        signed = getattr(calibration, "preview", {}).get("signed_map")
        if signed is None:
            report(0.93, "Computing the boundary-calibration map")
            signed = boundary_calibration_map(prediction.probabilities, job.reference, job.geometry.spacing)
    check()
    report(0.95, "Creating segments, heatmaps and report nodes")
    return ComputedRun(prediction, calibration, signed, time.perf_counter() - started)


def report_rows(report: Any, withReference: bool) -> list:
    """Table rows (dicts, report field names as columns) from a ``CalibrationReport``."""
    from dataclasses import fields

    rows = []
    for segment in report.segments:
        row = {}
        for item in fields(segment):
            if item.name in _NOT_COLUMNS or (not withReference and item.name in _REFERENCE_COLUMNS):
                continue
            row[item.name] = getattr(segment, item.name)
        rows.append(row)
    return rows


def _reliability_bins(reliability: Any) -> Optional[dict]:
    """``{"center", "confidence", "accuracy", "count"}`` from a report's reliability dict, or None."""
    if not reliability:
        return None
    get = reliability.get
    counts = get("count", get("counts"))
    confidence = get("confidence", get("mean_confidence"))
    accuracy = get("accuracy", get("mean_accuracy"))
    if counts is None or confidence is None or accuracy is None:
        return None
    n = len(counts)
    edges = get("edges")
    if edges is not None and len(edges) == n + 1:
        centers = [(float(a) + float(b)) / 2.0 for a, b in zip(edges[:-1], edges[1:])]
    else:
        centers = get("center", [(i + 0.5) / n for i in range(n)])
    return {"center": list(centers), "confidence": list(confidence), "accuracy": list(accuracy),
            "count": list(counts)}


@dataclass
class _Parts:
    """The nodes of one result. ``diagrams``: key (``"all"`` or a segment key) -> ``{"table", "observed",
    "ideal", "chart"}``; ``loose``: nodes of an earlier run that belong to no complete diagram (duplicates)."""

    segmentation: Any
    heatmaps: dict = field(default_factory=dict)
    table: Any = None
    diagrams: dict = field(default_factory=dict)
    loose: list = field(default_factory=list)


def _old_parts(output: Any) -> _Parts:
    """The nodes that an earlier run into ``output`` made (found through their bookkeeping attributes)."""
    parts = _Parts(segmentation=output)
    for node in find_nodes("heatmap", output=output, className="vtkMRMLScalarVolumeNode"):
        if parts.heatmaps.setdefault(node.GetAttribute(MAP_ATTRIBUTE), node) is not node:
            parts.loose.append(node)
    tables = find_nodes("report", output=output, className="vtkMRMLTableNode")
    parts.table = tables[0] if tables else None
    parts.loose += tables[1:]
    for role, slot in (("reliability-chart", "chart"), ("reliability-series", None), ("reliability-table", "table")):
        for node in find_nodes(role, output=output):
            # Series of runs before the slot attribute: told apart by the name ("... ideal").
            name = slot or node.GetAttribute(SLOT_ATTRIBUTE) or \
                ("ideal" if (node.GetName() or "").endswith("ideal") else "observed")
            diagram = parts.diagrams.setdefault(node.GetAttribute(KIND_ATTRIBUTE), {})
            if diagram.setdefault(name, node) is not node:
                parts.loose.append(node)
    return parts


def _copy_other_segments(source: Any, target: Any, classes: Sequence[Mapping[str, Any]]) -> None:
    """Copy into ``target`` the segments of ``source`` that are not the model's classes, in order, with its source
    representation and conversion parameters. The model's segments are not copied: the new ones replace them,
    and copying the old ones (with their closed surfaces) would only cost time and memory."""
    modelKeys = {str(c["key"]) for c in classes if int(c["value"]) != 0}
    target.SetSourceRepresentationName(source.GetSourceRepresentationName())
    target.CopyConversionParameters(source)
    for index in range(source.GetNumberOfSegments()):
        segmentId = source.GetNthSegmentID(index)
        if segmentId not in modelKeys and not target.CopySegmentFromSegmentation(source, segmentId, False):
            from .errors import OutputError

            raise OutputError(f"Segment {segmentId!r} of the output segmentation could not be copied, so the "
                              "scene was left as it was. Choose 'Create new segmentation' as output, or export that "
                              "segment first.")


def _build_parts(job: SegmentationJob, computed: ComputedRun, output: Any, heatmapMaps: Sequence[str]) -> _Parts:
    """Every node of the new result, all of them new: an earlier result in ``output`` is not touched.

    For a rerun the segmentation is a hidden staging node that starts with ``output``'s other segments (the
    user's) and that :class:`_Swap` moves into ``output``; the other nodes are tagged with ``output`` already.
    """
    import slicer

    prediction, calibration = computed.prediction, computed.report
    if output is None:
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{job.name} lens segmentation")
        owner = segmentation
    else:
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                          f"{_STAGING_PREFIX} {output.GetName()}")
        segmentation.SetHideFromEditors(True)
        _copy_other_segments(output.GetSegmentation(), segmentation.GetSegmentation(), prediction.classes)
        owner = output
    # Closed surfaces come after the swap (publish_job): built here they would coexist with the earlier
    # result's, the largest part of a rerun's peak memory.
    update_segmentation(prediction.labels, job.volume, prediction.classes, segmentation=segmentation, show3D=False)
    parts = _Parts(segmentation=segmentation)
    for mapName in heatmapMaps:
        if mapName == "boundary" and computed.signed_boundary is not None:
            array, kind = computed.signed_boundary, "boundary_signed"
        else:
            array, kind = getattr(prediction, mapName), mapName
        label = "boundary calibration" if mapName == "boundary" else mapName
        node = add_heatmap(array, job.geometry, kind, f"{job.name} {label}", output=owner)
        node.SetAttribute(MAP_ATTRIBUTE, mapName)
        parts.heatmaps[mapName] = node
    parts.table = add_table(report_rows(calibration, job.reference is not None), f"{job.name} calibration report",
                            output=owner, units=_COLUMN_UNITS, descriptions=_COLUMN_DESCRIPTIONS)
    diagrams = [("all", "Reliability (all voxels)", calibration.summary.get("reliability"))]
    diagrams += [(s.key, f"Reliability: {s.name}", s.reliability) for s in calibration.segments]
    for key, title, reliability in diagrams:
        bins = _reliability_bins(reliability)
        if bins is not None:
            parts.diagrams[key] = add_reliability_chart(bins, f"{job.name} {title}", output=owner, key=key)
    return parts


def _check_built(parts: _Parts, job: SegmentationJob, computed: ComputedRun, heatmapMaps: Sequence[str]) -> None:
    """Refuse an incomplete new result before anything of an earlier one is replaced.

    Raises:
        OutputError: a class without segment, a heatmap missing or off the input grid, a report row missing.
    """
    from .errors import OutputError

    segments = parts.segmentation.GetSegmentation()
    missing = [str(c["key"]) for c in computed.prediction.classes
               if int(c["value"]) != 0 and segments.GetSegment(str(c["key"])) is None]
    shape = tuple(int(n) for n in job.image.shape)
    offGrid = [name for name in heatmapMaps if name not in parts.heatmaps or
               parts.heatmaps[name].GetImageData() is None or
               tuple(reversed(parts.heatmaps[name].GetImageData().GetDimensions())) != shape]
    rows, expected = parts.table.GetNumberOfRows(), len(computed.report.segments)
    if missing or offGrid or rows != expected:
        raise OutputError(f"The new result for '{job.name}' came out incomplete (segments missing: {missing}; "
                          f"heatmaps missing or off the input grid: {offGrid}; report rows: {rows} of {expected}), "
                          "so the scene was left as it was. Run again; if it repeats, report it with the Python "
                          "console log.")


class _Swap:
    """Moves a built result into the nodes of an earlier one (their IDs stay), with an undo log.

    Each step re-points a data object (segmentation, image data, table) or copies a few properties: nothing
    voxel-sized is allocated, so nothing runs out of memory half-way. If a step fails, :meth:`undo` puts the
    saved objects and properties back, newest first, and the earlier result is as it was.
    """

    def __init__(self) -> None:
        self._undo: list = []

    def _save_name_and_attributes(self, node: Any) -> None:
        name = node.GetName()
        attributes = {key: node.GetAttribute(key) for key in node.GetAttributeNames()}

        def restore() -> None:
            node.SetName(name)
            for key in node.GetAttributeNames():
                if key not in attributes:
                    node.RemoveAttribute(key)
            for key, value in attributes.items():
                node.SetAttribute(key, value)

        self._undo.append(restore)

    def _save_content(self, node: Any) -> None:
        """Properties of a small node (display, plot series, chart); references (e.g. to a table) are not content."""
        saved = node.CreateNodeInstance()
        saved.CopyContent(node)
        self._undo.append(lambda: node.CopyContent(saved))

    @staticmethod
    def _take_name_and_attributes(old: Any, new: Any) -> None:
        old.SetName(new.GetName())
        for key in new.GetAttributeNames():
            old.SetAttribute(key, new.GetAttribute(key))

    def segmentation(self, old: Any, new: Any) -> None:
        """``old`` gets ``new``'s segments (the staging copy: the user's other segments are in it too)."""
        import slicer

        self._save_name_and_attributes(old)
        if old.GetDisplayNode() is not None:
            self._save_content(old.GetDisplayNode())
        segmentation = old.GetSegmentation()
        self._undo.append(lambda: old.SetAndObserveSegmentation(segmentation))
        old.SetAndObserveSegmentation(new.GetSegmentation())
        new.SetAndObserveSegmentation(slicer.vtkSegmentation())  # the staging node goes; the segments stay
        if old.GetDisplayNode() is None:
            old.CreateDefaultDisplayNodes()  # a new node: removed with the other new ones on failure
        _style_segmentation_display(old.GetDisplayNode())
        _tag(old, "segmentation")
        old.SetAttribute(OUTPUT_ATTRIBUTE, old.GetID())

    def volume(self, old: Any, new: Any) -> None:
        """Heatmap ``old`` gets ``new``'s voxels, grid, name, kind and display style."""
        import vtk

        self._save_name_and_attributes(old)
        if old.GetDisplayNode() is not None:
            self._save_content(old.GetDisplayNode())
        image, matrix = old.GetImageData(), vtk.vtkMatrix4x4()
        old.GetIJKToRASMatrix(matrix)

        def restore() -> None:
            old.SetIJKToRASMatrix(matrix)
            old.SetAndObserveImageData(image)

        self._undo.append(restore)
        newMatrix = vtk.vtkMatrix4x4()
        new.GetIJKToRASMatrix(newMatrix)
        old.SetIJKToRASMatrix(newMatrix)
        old.SetAndObserveImageData(new.GetImageData())
        new.SetAndObserveImageData(None)
        self._take_name_and_attributes(old, new)
        _style_heatmap_display(old, new.GetAttribute(KIND_ATTRIBUTE))

    def table(self, old: Any, new: Any) -> None:
        """Table ``old`` gets ``new``'s rows, columns, units and descriptions (the schema)."""
        import vtk

        self._save_name_and_attributes(old)
        table, schema, header = old.GetTable(), old.GetSchema(), old.GetUseColumnTitleAsColumnHeader()

        def restore() -> None:
            old.SetAndObserveTable(table)
            old.SetAndObserveSchema(schema)
            old.SetUseColumnTitleAsColumnHeader(header)

        self._undo.append(restore)
        old.SetAndObserveTable(new.GetTable())
        old.SetAndObserveSchema(new.GetSchema())
        old.SetUseColumnTitleAsColumnHeader(new.GetUseColumnTitleAsColumnHeader())
        new.SetAndObserveTable(vtk.vtkTable())
        new.SetAndObserveSchema(vtk.vtkTable())
        self._take_name_and_attributes(old, new)

    def plot(self, old: Any, new: Any) -> None:
        """Plot series or chart ``old`` gets ``new``'s properties; it keeps pointing at the old table/series."""
        self._save_name_and_attributes(old)
        self._save_content(old)
        old.CopyContent(new)
        self._take_name_and_attributes(old, new)

    def commit(self) -> None:
        """Forget the saved objects: the earlier result's data is freed once nothing else holds it."""
        self._undo.clear()

    def undo(self) -> None:
        """Restore everything saved, newest first; a failing step does not stop the others."""
        import logging

        while self._undo:
            restore = self._undo.pop()
            try:
                restore()
            except Exception:  # keep restoring the rest; the caller re-raises the original error
                logging.exception("LensSegCalib: could not restore part of the earlier result")


def _swap_in(swap: _Swap, old: _Parts, new: _Parts) -> tuple:
    """Move ``new`` into ``old``'s nodes where it has a counterpart; keep new nodes where it has none.

    Returns:
        ``(parts, emptied, stale)``: the result's nodes; the staging nodes that gave their content away; the
        earlier nodes the result no longer has (diagrams without numbers now, incomplete or duplicate ones).
    """
    swap.segmentation(old.segmentation, new.segmentation)
    parts, emptied = _Parts(segmentation=old.segmentation), [new.segmentation]
    for name, node in new.heatmaps.items():
        previous = old.heatmaps.get(name)
        if previous is not None:
            swap.volume(previous, node)
            emptied.append(node)
        parts.heatmaps[name] = previous or node
    if old.table is not None:
        swap.table(old.table, new.table)
        emptied.append(new.table)
    parts.table = old.table or new.table
    for key, nodes in new.diagrams.items():
        previous = old.diagrams.get(key, {})
        if set(previous) != set(nodes):  # none, or one whose nodes the user deleted: the new nodes stay
            parts.diagrams[key] = nodes
            continue
        swap.table(previous["table"], nodes["table"])
        for slot in ("observed", "ideal", "chart"):
            swap.plot(previous[slot], nodes[slot])
        parts.diagrams[key] = previous
        emptied += [nodes["chart"], nodes["observed"], nodes["ideal"], nodes["table"]]
    kept = {node.GetID() for nodes in parts.diagrams.values() for node in nodes.values()}
    stale = [node for nodes in old.diagrams.values() for node in nodes.values() if node.GetID() not in kept]
    return parts, emptied, stale + old.loose


def _node_ids() -> set:
    import slicer

    nodes = slicer.mrmlScene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def _remove_nodes_added_since(before: set) -> None:
    """Remove every node added to the scene since ``before`` (node IDs), newest first; singletons stay.

    Catches what a failing step made before it could hand it back: its own nodes, display nodes, temporary
    label maps, the signed-gap colour table of a first signed map.
    """
    import slicer

    nodes = slicer.mrmlScene.GetNodes()
    added = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    remove_nodes(reversed([n for n in added if n.GetID() not in before and not n.GetSingletonTag()]))


def _add_closed_surfaces(segmentation: Any) -> None:
    """3D surfaces of the segments. A derived representation: if VTK fails to make it, the result is still
    complete (Segment Editor > Show 3D makes it again), so this only logs."""
    import logging

    try:
        segmentation.CreateClosedSurfaceRepresentation()
    except Exception as error:  # any VTK/wrapping error: the published result stays valid without surfaces
        logging.warning("LensSegCalib: no 3D surfaces for '%s' (%s); use Segment Editor > Show 3D.",
                        segmentation.GetName(), error)


def publish_job(job: SegmentationJob, computed: ComputedRun, *, output: Any = None,
                heatmapMaps: Sequence[str] = HEATMAP_MAPS) -> SegmentationResult:
    """Create (or, with ``output``, update) the result nodes; all or nothing.

    Every node of the new result is built first, as new nodes, and checked (:func:`_check_built`); an earlier
    result is not touched meanwhile. Without ``output`` these nodes are the result. With ``output`` (the
    segmentation node of an earlier run, or any segmentation node) they are then moved into the earlier run's
    nodes in one short step (:class:`_Swap`: same node IDs, no duplicates; the user's other segments stay).
    If anything fails, building or swapping, the swap is undone and every node this call added is removed: the
    scene, the earlier result included, is as it was. Diagrams of the earlier run that this run has no numbers
    for (e.g. the reference was dropped) are removed last, once the new result is complete, and then the
    closed surfaces (3D view) are made: after the earlier result's data was freed.
    """
    before = _node_ids()
    swap = _Swap()
    try:
        old = _old_parts(output) if output is not None else None
        new = _build_parts(job, computed, output, heatmapMaps)
        _check_built(new, job, computed, heatmapMaps)
        if old is None:
            parts, stale = new, []
        else:
            parts, emptied, stale = _swap_in(swap, old, new)
            remove_nodes(emptied)
    except BaseException:  # also KeyboardInterrupt: never leave a mix of two results
        swap.undo()
        _remove_nodes_added_since(before)
        raise
    swap.commit()
    remove_nodes(stale)
    _add_closed_surfaces(parts.segmentation)
    return SegmentationResult(segmentation=parts.segmentation, heatmaps=parts.heatmaps, table=parts.table,
                              plots=[nodes["chart"] for nodes in parts.diagrams.values()], report=computed.report,
                              prediction=computed.prediction, volume=job.volume, geometry=job.geometry,
                              reference=job.reference)


def display_threshold(kind: Optional[str], value: float) -> tuple:
    """Shown range of a heatmap for the GUI's one threshold slider ``value`` in [0, 1].

    Confidence is shown where it is *below* ``value`` (the doubtful voxels); boundary uncertainty and entropy
    where they are *above* ``1 - value``; the signed calibration error everywhere in its band.
    """
    value = float(min(max(value, 0.0), 1.0))
    if kind == "confidence":
        return (0.0, value)
    if kind == "boundary_signed":
        return (-1.0, 1.0)
    return (1.0 - value, 1.0)


def _case_name(name: str) -> str:
    """A file-name-safe case name from a node name (letters, digits, ``-_.``; others become ``_``)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip())
    return safe.strip("._") or "case"


def export_result(result: SegmentationResult, folder: Any, writer: Any, *, overwrite: bool = True) -> list:
    """Write a result with the CLI's writer (``outputs.write_case_outputs``): same files, names and options.

    The case name is the volume node's name (made file-name safe), as the CLI uses the input file's name.
    """
    name = _case_name(result.volume.GetName())
    paths = writer(folder, name, result.prediction, result.geometry, result.report, overwrite=overwrite)
    return [str(path) for path in paths.values()]


def batch_files(paths: Sequence[str], outDir: Any, segmenter: Any, *, overwrite: bool = False,
                progress: Any = None, cancel: Any = None) -> list:
    """Segment files one by one with the CLI's per-case function (read, predict, report, write, forget).

    A failing file is reported and the batch goes on; finished cases are skipped unless ``overwrite``.

    Returns:
        ``[{"input", "status": "done" | "skipped" | "failed", "error", "outputs"}]`` in input order.

    Raises:
        Cancelled: ``cancel`` was set (files finished so far keep their outputs).
    """
    from .cli import segment_case
    from .errors import Cancelled, LensSegCalibError
    from .outputs import case_is_done, case_name, output_paths

    report = progress or (lambda fraction, message: None)
    results = []
    for index, path in enumerate(paths):
        name = case_name(path)
        entry = {"input": str(path), "status": "done", "error": "", "outputs": []}
        base = index / len(paths)
        if not overwrite and case_is_done(outDir, name):
            entry["status"] = "skipped"
        else:
            try:
                segment_case(path, segmenter, outDir, name=name, overwrite=overwrite, cancel=cancel,
                             progress=lambda f, m: report(base + f / len(paths), f"{name}: {m}"))
                entry["outputs"] = [str(p) for p in output_paths(outDir, name).values()]
            except Cancelled:
                raise
            except (LensSegCalibError, OSError, ValueError) as error:  # per file; the batch goes on
                entry.update(status="failed", error=str(error))
        results.append(entry)
        report((index + 1) / len(paths), f"{name}: {entry['status']}")
    return results


def phantom_classes(kind: str) -> list:
    """Class table of a phantom task (``"asoct"`` or ``"ct"``), the one the catalog models copy."""
    import copy

    from .phantom import CLASSES

    return copy.deepcopy(CLASSES[kind])


def add_phantom(phantom: Any, name: str, classes: Sequence[Mapping[str, Any]]) -> tuple:
    """Load a ``LensSegCalibLib.phantom.Phantom`` as a volume node and its ground truth as a segmentation node.

    Returns:
        ``(volumeNode, referenceSegmentationNode)``; the reference is outlined only (no fill).
    """
    geometry = Geometry(spacing=tuple(phantom.spacing), origin=tuple(getattr(phantom, "origin", ())),
                        direction=tuple(getattr(phantom, "direction", ())))
    volume = add_volume(np.asarray(phantom.image, dtype=np.float32), geometry, name, role="sample")
    reference = update_segmentation(np.asarray(phantom.labels), volume, classes, name=f"{name} reference",
                                    show3D=False)
    reference.SetAttribute(ROLE_ATTRIBUTE, "sample-reference")
    display = reference.GetDisplayNode()
    display.SetVisibility2DFill(False)  # ground truth: outline only, so predictions stay readable
    display.SetVisibility(False)
    volume.GetDisplayNode().AutoWindowLevelOn()
    return volume, reference


# ------------------------------------------------------------------------------------------ child process
def parse_progress_line(line: str) -> Optional[tuple]:
    """``"PROGRESS 0.42 text"`` -> ``(0.42, "text")``; any other line -> None (log text)."""
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) < 2 or parts[0] != "PROGRESS":
        return None
    try:
        fraction = float(parts[1])
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), parts[2] if len(parts) > 2 else ""


def run_child_batch(command: Sequence[str], *, progress: Any = None, cancel: Any = None,
                    terminateTimeout: float = 10.0) -> list:
    """Run ``Scripts/run_inference.py`` (``command``) and follow its PROGRESS/CASE lines.

    Args:
        command: the full command line (interpreter, script, arguments); no shell.
        progress: ``progress(fraction, message)``, called from this thread.
        cancel: ``threading.Event``: SIGTERM to the child (it stops within one batch), then kill after
            ``terminateTimeout`` seconds.

    Returns:
        The per-input rows the child reported.

    Raises:
        Cancelled: ``cancel`` was set. ModelError: the child could not load the model (exit 2) or crashed.
    """
    import json
    import logging
    import queue
    import subprocess
    import threading

    from .errors import Cancelled, ModelError

    report = progress or (lambda fraction, message: None)
    lines: "queue.Queue" = queue.Queue()
    child = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def read() -> None:
        for text in child.stdout:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    rows, log, cancelled = [], [], False
    while True:
        if cancel is not None and cancel.is_set() and not cancelled:
            cancelled = True
            child.terminate()
            try:
                child.wait(timeout=terminateTimeout)
            except subprocess.TimeoutExpired:
                child.kill()
        try:
            text = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if text is None:
            break
        parsed = parse_progress_line(text)
        if parsed is not None:
            report(*parsed)
        elif text.startswith("CASE "):
            rows.append(json.loads(text[5:]))
        else:
            log.append(text.rstrip())
            logging.info("LensSegCalib child: %s", text.rstrip())
    code = child.wait()
    if cancelled or code == 130:
        raise Cancelled("Batch cancelled; finished cases keep their outputs, nothing half-written is left.")
    if code not in (0, 1):
        raise ModelError(f"The inference process failed (exit code {code}): {' | '.join(log[-5:])}")
    return rows
