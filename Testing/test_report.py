"""calibration_report: every number equals LensSegCalibLib.metrics / heatmaps on the same arrays; JSON, CSV and
the self-contained HTML (parsed with html.parser: images present and decodable, user text escaped)."""
from __future__ import annotations

import base64
import csv
import io
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from LensSegCalibLib import metrics as M
from LensSegCalibLib.errors import InputError
from LensSegCalibLib.inference import Prediction
from LensSegCalibLib.report import calibration_report

SPACING = (1.5, 0.3, 0.4)
CLASSES = [
    {"value": 0, "key": "background", "name": "Background", "color": [0, 0, 0]},
    {"value": 1, "key": "capsule", "name": "Lens capsule", "color": [230, 80, 60]},
    {"value": 2, "key": "nucleus", "name": "Lens nucleus", "color": [70, 110, 230]},
]


def _case(seed: int = 0) -> tuple[Prediction, np.ndarray, np.ndarray]:
    """A 3-class prediction on (5, 30, 34): reference = nested boxes, logits = reference + noise."""
    from LensSegCalibLib import heatmaps

    rng = np.random.default_rng(seed)
    ref = np.zeros((5, 30, 34), dtype=np.uint8)
    ref[1:4, 6:24, 8:28] = 1
    ref[2:4, 10:20, 12:24] = 2
    logits = 2.5 * np.eye(3)[ref].transpose(3, 0, 1, 2) + rng.normal(0, 1.2, (3, *ref.shape))
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=0).numpy().astype(np.float16)
    p32 = probs.astype(np.float32)
    labels = p32.argmax(0).astype(np.uint8)
    conf = p32.max(0)
    ent = heatmaps.normalized_entropy(p32)
    pred = Prediction(labels=labels, probabilities=probs, confidence=conf, entropy=ent,
                      boundary=heatmaps.label_free_boundary_map(labels, ent, SPACING), spacing=SPACING,
                      classes=CLASSES, model_id="test-model", model_version="1.2.3", weights_sha256="ab" * 32,
                      temperature=1.3, band_mm=0.6, device="cpu", seconds={"total": 1.0})
    image = rng.random(ref.shape).astype(np.float32)
    return pred, ref, image


@pytest.mark.parametrize("maps_dtype", [np.float32, np.float16])  # float16 = what the segmenter gives
@pytest.mark.parametrize("slab_rows", [None, 1])  # 1: the band and the statistics streamed one row at a time
def test_prediction_only_fields_match_direct_computation(maps_dtype, slab_rows, monkeypatch):
    from LensSegCalibLib import heatmaps

    if slab_rows is not None:
        monkeypatch.setattr(heatmaps, "_BAND_SLAB_VOXELS", slab_rows * 30 * 34)
    pred, _, _ = _case()
    pred.confidence = pred.confidence.astype(maps_dtype)
    pred.entropy = pred.entropy.astype(maps_dtype)
    rep = calibration_report(pred, SPACING)
    assert [s.key for s in rep.segments] == ["capsule", "nucleus"]
    for seg in rep.segments:
        mask = pred.labels == seg.value
        conf = pred.confidence[mask].astype(np.float64)
        assert seg.voxels == int(mask.sum())
        assert seg.volume_ml == pytest.approx(mask.sum() * 1.5 * 0.3 * 0.4 / 1000, rel=1e-12)
        assert seg.mean_confidence == pytest.approx(conf.mean(), abs=1e-12)
        assert seg.median_confidence == pytest.approx(np.median(conf), abs=1e-12)
        assert seg.p5_confidence == pytest.approx(np.percentile(conf, 5), abs=1e-12)
        assert seg.fraction_below_0_5 == pytest.approx((conf < 0.5).mean(), abs=1e-12)
        assert seg.fraction_below_0_9 == pytest.approx((conf < 0.9).mean(), abs=1e-12)
        band = M.boundary_band(mask.astype(np.uint8), SPACING, 2 * 0.3)  # default band = 2 x min spacing
        assert seg.band_voxels == int(band.sum()) > 0
        assert seg.band_mean_entropy == pytest.approx(pred.entropy[band].mean(dtype=np.float64), abs=1e-12)
        assert seg.band_mean_confidence == pytest.approx(pred.confidence[band].mean(dtype=np.float64), abs=1e-12)
        assert math.isnan(seg.dice) and seg.reliability is None  # no reference, no reference numbers
        assert sum(seg.confidence_histogram) == seg.voxels
        assert seg.confidence_histogram == np.histogram(conf, bins=np.linspace(0, 1, 21))[0].tolist()


def test_reference_numbers_equal_metrics_on_the_same_arrays():
    pred, ref, _ = _case(1)
    rep = calibration_report(pred, SPACING, reference=ref)
    p = pred.probabilities[None]
    y = ref[None].astype(np.int64)
    seg_m = M.segmentation_metrics(pred.labels[None].astype(np.int64), y, 3, spacing=SPACING)
    bc = M.boundary_calibration(p, y, SPACING, 0.6, 15)
    s = rep.summary
    assert s["ece"] == pytest.approx(M.ece(p, y), abs=1e-12)
    assert s["ece_fg"] == pytest.approx(M.ece(p, y, mask=y != 0), abs=1e-12)
    assert s["classwise_ece"] == pytest.approx(M.classwise_ece(p, y), abs=1e-12)
    assert s["bece"] == pytest.approx(M.bece(p, y, SPACING, 0.6), abs=1e-12)
    assert s["pece"] == pytest.approx(M.pece(p, y), abs=1e-12)
    assert s["nll"] == pytest.approx(M.nll(p, y), abs=1e-9)
    assert s["brier"] == pytest.approx(M.brier(p, y), abs=1e-9)
    top = M.reliability(p, y)
    assert s["reliability"]["count"] == top.count.tolist()
    cw = M.classwise_ece(p, y, per_class=True)
    per_class_rel = M.reliability(p, y, classwise=True)
    for seg in rep.segments:
        c = seg.value
        assert seg.dice == pytest.approx(seg_m.dice[0, c], abs=1e-12)
        assert seg.iou == pytest.approx(seg_m.iou[0, c], abs=1e-12)
        assert seg.hd95_mm == pytest.approx(seg_m.hd95[0, c], abs=1e-12)
        assert seg.assd_mm == pytest.approx(seg_m.assd[0, c], abs=1e-12)
        assert seg.classwise_ece == pytest.approx(cw[c], abs=1e-12)
        assert seg.bece == pytest.approx(bc.bece_classwise[c - 1], abs=1e-12)
        assert seg.ece == pytest.approx(M.ece(p, y, mask=y == c), abs=1e-12)
        assert seg.nll == pytest.approx(M.nll(p, y, mask=y == c), abs=1e-9)
        assert seg.brier == pytest.approx(M.brier(p, y, mask=y == c), abs=1e-9)
        pc = p[:, c].astype(np.float32)
        assert seg.pece == pytest.approx(M.pece(np.stack([1 - pc, pc], 1), (y == c).astype(np.int64)), abs=1e-12)
        assert seg.reliability["count"] == per_class_rel.count[c].tolist()
        assert seg.reference_voxels == int((ref == c).sum())
    assert 0.5 < rep.segment("capsule").dice <= 1.0  # noisy but informative logits


def test_known_answer_case_d_surface_numbers_through_the_report():
    """METHODS.md case D (class 1, spacing (1, 0.5)): Dice 1/3, IoU 0.2, HD95 1.605971, ASSD 0.860280."""
    from LensSegCalibLib import heatmaps

    ref = np.zeros((10, 10), np.uint8)
    ref[2:6, 2:6] = 1
    lab = np.zeros((10, 10), np.uint8)
    lab[3:7, 4:9] = 1
    probs = np.stack([1.0 - 0.8 * lab, 0.8 * lab]).astype(np.float32)
    ent = heatmaps.normalized_entropy(probs)
    pred = Prediction(labels=lab, probabilities=probs, confidence=probs.max(0), entropy=ent,
                      boundary=ent, spacing=(1.0, 0.5), classes=CLASSES[:2])
    seg = calibration_report(pred, reference=ref).segments[0]
    assert abs(seg.dice - 1 / 3) < 2e-6 and abs(seg.iou - 0.2) < 2e-6
    assert abs(seg.hd95_mm - 1.605971) < 2e-6 and abs(seg.assd_mm - 0.860280) < 2e-6


def test_report_never_modifies_the_prediction_or_the_reference():
    pred, ref, image = _case(5)
    copies = [a.copy() for a in (pred.labels, pred.probabilities, pred.confidence, pred.entropy, ref, image)]
    calibration_report(pred, SPACING, reference=ref, image=image).to_html(None)
    for before, after in zip(copies, (pred.labels, pred.probabilities, pred.confidence, pred.entropy, ref, image)):
        np.testing.assert_array_equal(before, after)


def test_json_and_csv_round_trip():
    pred, ref, _ = _case(2)
    rep = calibration_report(pred, SPACING, reference=ref, case="eye_01", input_sha256="cd" * 32)
    data = json.loads(rep.to_json())
    assert data["meta"]["model"] == {"id": "test-model", "version": "1.2.3", "weights_sha256": "ab" * 32,
                                     "temperature": 1.3, "mirror_tta": False}
    assert data["meta"]["input"]["sha256"] == "cd" * 32
    assert {"torch", "monai", "numpy", "lenssegcalib"} <= set(data["meta"]["package_versions"])
    assert data["meta"]["created"].endswith("Z")
    assert data["segments"][0]["dice"] == pytest.approx(rep.segments[0].dice)
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert [r["key"] for r in rows] == ["capsule", "nucleus"]
    assert float(rows[1]["hd95_mm"]) == pytest.approx(rep.segments[1].hd95_mm)
    assert rows[0]["case"] == "eye_01"


def test_empty_segment_gives_nan_and_json_stays_valid():
    pred, ref, _ = _case(3)
    pred.labels[pred.labels == 2] = 1  # the nucleus is never predicted
    rep = calibration_report(pred, SPACING, reference=ref)
    nucleus = rep.segment("nucleus")
    assert nucleus.voxels == 0 and math.isnan(nucleus.mean_confidence)
    assert nucleus.dice == 0.0 and math.isinf(nucleus.hd95_mm)  # one empty mask: failure, +inf
    data = json.loads(rep.to_json())  # strict JSON: NaN -> null, inf -> "inf"
    seg = data["segments"][1]
    assert seg["mean_confidence"] is None and seg["hd95_mm"] == "inf"


def test_reference_errors_say_what_to_do():
    pred, ref, _ = _case()
    with pytest.raises(InputError, match="resample"):
        calibration_report(pred, SPACING, reference=ref[:, :10])
    bad = ref.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(InputError, match="label values"):
        calibration_report(pred, SPACING, reference=bad)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_with_decodable_images_and_escaped_names(tmp_path):
    pred, ref, image = _case(4)
    evil = "<script>alert('x')</script>"
    rep = calibration_report(pred, SPACING, reference=ref, image=image, case=f"case {evil}",
                             class_names=["Background", f"Capsule {evil}", "Nucleus & co"])
    path = tmp_path / "r.html"
    text = rep.to_html(path)
    assert path.read_text(encoding="utf-8") == text
    assert "<script>" not in text and "&lt;script&gt;" in text
    parser = _Collector()
    parser.feed(text)
    assert "script" not in parser.tags
    assert len(parser.images) == 1 + len(rep.segments)  # slice figure + one per segment
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    joined = "".join(parser.text)
    assert "Nucleus & co" in joined and "Dice" in joined and "test-model" in joined
    assert "http://" not in text and "https://" not in text  # nothing loaded from outside


def test_write_case_outputs_signed_boundary_and_no_clobber(tmp_path):
    from LensSegCalibLib import heatmaps
    from LensSegCalibLib.errors import OutputError
    from LensSegCalibLib.io import Geometry, read_image
    from LensSegCalibLib.outputs import case_is_done, write_case_outputs

    pred, ref, image = _case(6)
    geo = Geometry(SPACING, (1.0, -2.0, 3.0))
    rep = calibration_report(pred, SPACING, reference=ref, image=image)
    paths = write_case_outputs(tmp_path, "c", pred, geo, rep, boundary="signed")
    signed = read_image(paths["boundary"]).array
    expected = heatmaps.boundary_calibration_map(pred.probabilities, ref, SPACING, fill=0.0)
    np.testing.assert_allclose(signed, expected, atol=1e-7)
    assert (signed < 0).any() or (signed > 0).any()
    assert case_is_done(tmp_path, "c")
    before = paths["report_json"].read_bytes()
    with pytest.raises(OutputError, match="already exist"):
        write_case_outputs(tmp_path, "c", pred, geo, rep)
    assert paths["report_json"].read_bytes() == before
    no_ref = calibration_report(pred, SPACING)
    with pytest.raises(OutputError, match="reference"):
        write_case_outputs(tmp_path / "x", "c", pred, geo, no_ref, boundary="signed")
