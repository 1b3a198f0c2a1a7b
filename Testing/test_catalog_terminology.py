"""Every catalog segment uses a terminology code that Slicer can resolve (ours or SNOMED) and its colour."""
from __future__ import annotations

import json
from pathlib import Path

from LensSegCalibLib.models import load_catalog
from LensSegCalibLib.phantom import CLASSES

TERM_FILE = (Path(__file__).resolve().parents[1] / "LensSegCalib" / "Resources"
             / "SegmentationCategoryTypeModifier-LensSegCalib.term.json")


def _term_types() -> dict[tuple[str, str], dict]:
    context = json.loads(TERM_FILE.read_text())
    types = {}
    for category in context["SegmentationCodes"]["Category"]:
        for typ in category["Type"]:
            types[(typ["CodingSchemeDesignator"], typ["CodeValue"])] = typ
            for modifier in typ.get("Modifier", []):
                types[(typ["CodingSchemeDesignator"], typ["CodeValue"], modifier["CodeValue"])] = modifier
    return types


def test_catalog_segments_resolve_in_our_terminology_file_with_its_colours():
    types = _term_types()
    context_name = json.loads(TERM_FILE.read_text())["SegmentationCategoryTypeContextName"]
    for spec in load_catalog().models:
        for cls in spec.classes:
            if cls["value"] == 0:
                continue
            parts = cls["terminology"].split("~")
            assert parts[0] == context_name, (spec.id, cls["key"])
            scheme, code, _ = parts[2].split("^")
            modifier = parts[3].split("^")[1] if parts[3].strip("^") else None
            entry = types[(scheme, code, modifier)] if modifier else types[(scheme, code)]
            assert list(cls["color"]) == list(entry["recommendedDisplayRGBValue"]), (spec.id, cls["key"])


def test_catalog_classes_match_the_phantom_segment_tables():
    for spec in load_catalog().models:
        task = "ct" if spec.modality == "CT" else "asoct"
        expected = {c["key"]: c for c in CLASSES[task]}
        for cls in spec.classes:
            ref = expected[cls["key"]]
            assert (cls["value"], cls["name"], list(cls["color"])) == (ref["value"], ref["name"], list(ref["color"]))
            assert cls.get("terminology") == ref.get("terminology")
