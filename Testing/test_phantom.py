"""Phantoms: determinism, label nesting, image/label consistency, anatomy numbers, CT HU, writers round-trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from LensSegCalibLib.errors import InputError, OutputError
from LensSegCalibLib.phantom import (
    CLASSES,
    HELDOUT_SEED_START,
    Phantom,
    asoct_volume,
    ct_head_volume,
    write_phantom,
)

SMALL = (4, 192, 192)  # 68 um depth x 83 um lateral: lens 50-70 px thick
EIGHT = np.ones((3, 3), bool)


def _lateral_mm(ph: Phantom) -> np.ndarray:
    nx = ph.image.shape[2]
    return (np.arange(nx) + 0.5) * ph.spacing[2] - 8.0


# ------------------------------------------------------------------------------------------------ AS-OCT
def test_asoct_is_deterministic_per_seed_and_seeds_differ():
    a, b, c = asoct_volume(7, shape=(2, 64, 64)), asoct_volume(7, shape=(2, 64, 64)), asoct_volume(8, shape=(2, 64, 64))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.visible, b.visible)
    assert a.meta["age"] == b.meta["age"]
    assert not np.array_equal(a.image, c.image)
    assert a.meta["age"] != c.meta["age"]


def test_asoct_contract_types_shapes_and_spacing():
    ph = asoct_volume(1, shape=(4, 100, 120))
    assert ph.task == "asoct" and ph.class_names == ("background", "capsule", "cortex", "nucleus")
    assert ph.image.dtype == np.float32 and ph.labels.dtype == np.uint8 and ph.visible.dtype == bool
    assert ph.image.shape == ph.labels.shape == ph.visible.shape == ph.lens_fraction.shape == (4, 100, 120)
    assert 0.0 <= ph.image.min() and ph.image.max() <= 1.0
    # field of view stays 13 mm deep x 16 mm wide; z = arc spacing at r = 4.65 mm for 4 meridians
    np.testing.assert_allclose(ph.spacing, (np.pi * 4.65 / 4, 13.0 / 100, 16.0 / 120), rtol=1e-6)
    assert ph.meta["bscan_angles_deg"] == [0.0, 45.0, 90.0, 135.0]
    assert set(np.unique(ph.labels)) == {0, 1, 2, 3}
    json.dumps({k: v for k, v in ph.meta.items() if k != "visible"})  # metadata is JSON-serialisable


@pytest.mark.parametrize(
    "seed,kw", [(2, {}), (11, {"split": "heldout"}), (5, {"tilt_deg": 9.0, "decentration_mm": 1.0})]
)
def test_capsule_encloses_cortex_encloses_nucleus(seed, kw):
    ph = asoct_volume(seed, shape=SMALL, **kw)
    for lab in ph.labels:
        nuc, cortex, cap, bg = lab == 3, lab == 2, lab == 1, lab == 0
        assert nuc.sum() > 500 and cortex.sum() > 500 and cap.sum() > 100
        grown = ndimage.binary_dilation(nuc, EIGHT)
        assert not np.any(grown & (cap | bg)), "nucleus touches capsule or background"
        assert not np.any(ndimage.binary_dilation(cortex, EIGHT) & bg), "cortex touches background"
        # lens is one solid piece
        assert ndimage.label(lab > 0)[1] == 1
        assert np.array_equal(ndimage.binary_fill_holes(lab > 0), lab > 0)


def test_capsule_band_is_two_pixels_thick_at_the_anterior_pole():
    ph = asoct_volume(3, shape=(2, 400, 200), tilt_deg=0.0, decentration_mm=0.0, axial_jitter_mm=0.0,
                      lateral_shift_mm=0.0)
    col = ph.labels[0][:, 100]
    first = int(np.argmax(col > 0))
    assert col[first] == 1 and col[first + 1] == 1 and col[first + 2] == 2


def test_lens_thickness_diameter_and_acd_match_the_sampled_anatomy():
    for seed in (0, 4, 9):
        ph = asoct_volume(seed, shape=(2, 520, 400), tilt_deg=0.0, decentration_mm=0.0, axial_jitter_mm=0.0,
                          lateral_shift_mm=0.0)
        m, (sz, sy, sx) = ph.meta, ph.spacing
        lab = ph.labels[0]
        centre = lab[:, 199:201].max(axis=1) > 0
        thick = centre.sum() * sy
        assert abs(thick - m["lens_thickness_mm"]) <= 2 * sy
        width = (lab.max(axis=0) > 0).sum() * sx
        assert abs(width - m["lens_diameter_mm"]) <= 3 * sx
        top = np.argmax(centre) * sy
        acd = top - (m["corneal_apex_depth_mm"] + m["cornea_thickness_mm"])
        assert abs(acd - m["acd_mm"]) <= 2 * sy
        # DATA.md 2/3.1 ranges
        assert 3.0 <= m["lens_thickness_mm"] <= 6.2 and 8.6 <= m["lens_diameter_mm"] <= 10.4
        assert 2.2 <= m["acd_mm"] <= 4.0 and 8.5 <= m["ra_mm"] <= 15 and 5.5 <= m["rp_mm"] <= 7.5
        assert abs(m["lens_thickness_mm"] - (3.31 + 0.018 * m["age"])) < 0.9


def test_older_eyes_have_thicker_lenses_and_shallower_chambers():
    young = [asoct_volume(s, shape=(1, 64, 64), age=25).meta for s in range(6)]
    old = [asoct_volume(s, shape=(1, 64, 64), age=80).meta for s in range(6)]
    for y, o in zip(young, old):  # same seed: same residuals, only age differs
        assert o["lens_thickness_mm"] - y["lens_thickness_mm"] == pytest.approx(0.018 * 55, abs=1e-6) or \
            o["lens_thickness_mm"] in (3.0, 6.2)
        assert o["acd_mm"] <= y["acd_mm"] and o["ra_mm"] <= y["ra_mm"]
        # the nucleus keeps its size (unless a thin young lens caps it at LT - 0.6 mm)
        assert o["nucleus_thickness_mm"] == pytest.approx(y["nucleus_thickness_mm"]) or \
            y["nucleus_thickness_mm"] == pytest.approx(y["lens_thickness_mm"] - 0.6)


def _class_means(ph: Phantom) -> tuple[float, float]:
    """Mean display level of visible cortex and nucleus in front of the lens equator (where attenuation by a
    dense nucleus has not yet darkened the image)."""
    depth = (np.arange(ph.image.shape[1]) + 0.5) * ph.spacing[1]
    front = (depth < ph.meta["lens_center_depth_mm"])[None, :, None]
    vis = ph.visible & front
    return float(ph.image[(ph.labels == 2) & vis].mean()), float(ph.image[(ph.labels == 3) & vis].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nucleus_darker_than_cortex_when_clear_and_brighter_in_dense_cataract(seed):
    common = dict(shape=(2, 160, 160), pupil_mm=6.0, dynamic_range_db=50.0, specular_streak=False)
    cortex0, nucleus0 = _class_means(asoct_volume(seed, cataract_grade=0, **common))
    cortex5, nucleus5 = _class_means(asoct_volume(seed, cataract_grade=5, **common))
    assert nucleus0 < cortex0 - 0.02
    assert nucleus5 > cortex5 + 0.02
    assert nucleus5 > nucleus0 + 0.05


def test_capsule_is_the_brightest_lens_structure():
    ph = asoct_volume(6, shape=SMALL, cataract_grade=1, specular_streak=False)
    vis = ph.visible
    cap = ph.image[(ph.labels == 1) & vis].mean()
    assert cap > ph.image[(ph.labels == 2) & vis].mean() + 0.15


def test_lens_is_centred_behind_the_pupil_and_partly_hidden_by_the_iris():
    ph = asoct_volume(12, shape=SMALL, pupil_mm=4.0, decentration_mm=0.2, specular_streak=False,
                      lateral_shift_mm=0.0)
    x = _lateral_mm(ph)
    for k in range(ph.labels.shape[0]):
        lens = ph.labels[k] > 0
        cx = (lens.sum(axis=0) * x).sum() / lens.sum()
        assert abs(cx) < 0.2 + 0.3
        hidden = lens & ~ph.visible[k]
        shown = lens & ph.visible[k]
        assert hidden.sum() > 0.3 * lens.sum() and shown.sum() > 0.2 * lens.sum()
        # within the pupil the lens is seen; behind the iris (|x| > pupil radius) it is not
        cols_pupil = np.abs(x) < 1.6
        cols_iris = np.abs(x) > 2.3
        assert shown[:, cols_pupil].sum() == lens[:, cols_pupil].sum()
        assert shown[:, cols_iris].sum() == 0


def test_small_pupil_hides_more_lens_and_hidden_voxels_are_dark():
    small = asoct_volume(20, shape=SMALL, pupil_mm=2.5, specular_streak=False)
    wide = asoct_volume(20, shape=SMALL, pupil_mm=6.5, specular_streak=False)
    frac = [((p.labels > 0) & ~p.visible).sum() / (p.labels > 0).sum() for p in (small, wide)]
    assert frac[0] > 0.55 and frac[1] < frac[0] - 0.2
    lens = small.labels > 0
    dark, seen = small.image[lens & ~small.visible].mean(), small.image[lens & small.visible].mean()
    assert dark < seen - 0.05
    air = small.image[:, :4, :].mean()  # above the cornea: noise floor only
    assert abs(dark - air) < 0.03  # shadowed lens is indistinguishable from the noise floor


def test_dense_cataract_with_low_dynamic_range_loses_the_posterior_lens():
    ph = asoct_volume(4, shape=SMALL, cataract_grade=5, dynamic_range_db=30.0, pupil_mm=6.0, lateral_shift_mm=0.0)
    x = _lateral_mm(ph)
    lens = ph.labels[0][:, np.abs(x) < 1.0] > 0
    vis = ph.visible[0][:, np.abs(x) < 1.0]
    rows = np.nonzero(lens.any(axis=1))[0]
    top, bottom = rows[: len(rows) // 4], rows[-len(rows) // 4:]
    assert vis[top].all(axis=1).all() and not vis[bottom].any()


def test_heldout_split_applies_documented_shifts():
    shifted = [asoct_volume(HELDOUT_SEED_START + s, shape=(1, 48, 48), split="heldout").meta for s in range(12)]
    assert HELDOUT_SEED_START == 10000
    for m in shifted:
        assert m["split"] == "heldout" and m["heldout_shifts"]
        if "old_age" in m["heldout_shifts"]:
            assert 71 <= m["age"] <= 85
        if "dense_cataract" in m["heldout_shifts"]:
            assert m["cataract_grade"] in (4, 5)
        if "small_pupil" in m["heldout_shifts"]:
            assert m["pupil_mm"] <= 2.6
        if "strong_tilt" in m["heldout_shifts"]:
            assert 6 <= m["tilt_deg"] <= 9 and 0.4 <= m["decentration_mm"] <= 1.0
        if "low_dynamic_range" in m["heldout_shifts"]:
            assert m["dynamic_range_db"] <= 35 and m["looks"] == 1
    train = [asoct_volume(s, shape=(1, 48, 48)).meta for s in range(12)]
    assert all(20 <= m["age"] <= 70 and m["cataract_grade"] <= 3 and m["tilt_deg"] <= 6 for m in train)
    assert asoct_volume(3, shape=(1, 48, 48), hard=True).meta["heldout_shifts"]


def test_variation_overrides_and_errors():
    ph = asoct_volume(2, shape=(2, 48, 48), age=77, cataract_grade=4, tilt_deg=3.0, pupil_mm=3.3, looks=2,
                      dynamic_range_db=44.0, rolloff_db=5.0)
    m = ph.meta
    assert (m["age"], m["cataract_grade"], m["tilt_deg"], m["pupil_mm"], m["looks"]) == (77, 4, 3.0, 3.3, 2)
    with pytest.raises(InputError, match="Valid keywords"):
        asoct_volume(2, shape=(2, 48, 48), colour="red")
    with pytest.raises(InputError, match="contradicts"):
        asoct_volume(2, shape=(2, 48, 48), n_bscans=8)
    with pytest.raises(InputError, match="seed"):
        asoct_volume(-1, shape=(2, 48, 48))
    with pytest.raises(InputError, match="shape"):
        asoct_volume(1, shape=(2, 48))
    with pytest.raises(InputError, match="outside the supported range"):
        asoct_volume(1, shape=(2, 48, 48), cataract_grade=9)
    assert asoct_volume(1, shape=(8, 40, 40), n_bscans=8).meta["n_bscans"] == 8


def test_lens_fraction_agrees_with_labels():
    ph = asoct_volume(9, shape=(2, 128, 128))
    lens = ph.labels > 0
    assert np.array_equal(lens, ph.lens_fraction >= 0.5)
    partial = (ph.lens_fraction > 0) & (ph.lens_fraction < 1)
    assert partial.sum() > 0 and np.all(ndimage.binary_dilation(lens, iterations=1)[partial])


# ------------------------------------------------------------------------------------------------ CT
CT_SMALL = dict(shape=(20, 96, 128), pixel_mm=0.8, slice_mm=1.0)


def test_ct_is_deterministic_and_labels_both_lenses_at_the_ipd():
    a = ct_head_volume(3, **CT_SMALL, ipd_mm=60.0)
    b = ct_head_volume(3, **CT_SMALL, ipd_mm=60.0)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, ct_head_volume(4, **CT_SMALL).image)
    assert a.task == "ct" and a.class_names == ("background", "right_lens", "left_lens")
    assert a.visible.all() and a.image.dtype == np.float32 and a.labels.dtype == np.uint8
    assert np.array_equal(np.round(a.image), a.image)  # integer HU like an int16 series
    centroids = []
    for value in (1, 2):
        idx = np.argwhere(a.labels == value)
        assert len(idx) > 20
        centroids.append(idx.mean(axis=0) * np.asarray(a.spacing))
    right, left = centroids
    assert right[2] < left[2]  # patient right = low X index (image left in radiological display)
    assert abs(np.linalg.norm(left - right) - 60.0) < 3.5
    # lens volume ~ 0.15-0.25 mL
    for value in (1, 2):
        vol = (a.labels == value).sum() * np.prod(a.spacing) / 1000
        assert 0.1 < vol < 0.3


def test_ct_hounsfield_units_of_lens_vitreous_fat_and_bone():
    ph = ct_head_volume(5, shape=(28, 128, 160), pixel_mm=0.7, slice_mm=1.0, noise_sd_hu=4.0, lens_hu=115.0,
                        vitreous_hu=10.0, fat_hu=-80.0, bone_hu=1200.0, hu_offset=0.0, sharp_kernel=False,
                        traumatic_side="none", calcified_lens=False)
    img, sp = ph.image, np.asarray(ph.spacing)
    # lens core one in-plane voxel away from the partial-volume rim (the blur, FWHM <= 1.2 mm, reaches that far)
    core = ndimage.binary_erosion(ph.lens_fraction > 0.99, np.ones((1, 3, 3), bool))
    assert core.sum() > 10
    assert abs(np.median(img[core]) - 115) < 6
    origin = np.asarray(ph.origin)[::-1]  # (z, y, x) with direction = identity
    for gc in ph.meta["globe_centers_lps_mm"]:
        k, j, i = np.round((np.asarray(gc)[::-1] - origin) / sp).astype(int)
        vitreous = img[k - 1:k + 2, j - 2:j + 3, i - 2:i + 3]
        assert -5 < vitreous.mean() < 25
    near_eyes = np.zeros(img.shape, bool)
    zz, yy, xx = np.indices(img.shape)
    for lc in ph.meta["lens_centers_lps_mm"]:
        k, j, i = (np.asarray(lc)[::-1] - origin) / sp
        near_eyes |= ((zz - k) * sp[0]) ** 2 + ((yy - j) * sp[1]) ** 2 + ((xx - i) * sp[2]) ** 2 < 35**2
    fat = (img[near_eyes] < -40) & (img[near_eyes] > -130)
    assert fat.mean() > 0.03
    assert np.percentile(img, 99.9) > 700 and img.min() <= -990


def test_ct_partial_volume_thick_slices_lower_lens_peak_and_stay_labelled():
    thin = ct_head_volume(6, shape=(24, 96, 128), pixel_mm=0.8, slice_mm=1.0, noise_sd_hu=0.0)
    thick = ct_head_volume(6, shape=(6, 96, 128), pixel_mm=0.8, slice_mm=5.0, noise_sd_hu=0.0)
    assert (thick.labels == 1).any() and (thick.labels == 2).any()
    assert thick.lens_fraction.max() < 1.0 or (thick.lens_fraction == 1).sum() < (thin.lens_fraction == 1).sum()
    lens_hu = thin.meta["lens_hu_right"]
    assert thin.image[thin.labels == 1].max() > thick.image[thick.labels == 1].max() - 1
    assert thin.image[thin.labels == 1].max() == pytest.approx(lens_hu, abs=15)


def test_ct_heldout_and_errors():
    m = ct_head_volume(HELDOUT_SEED_START + 1, shape=(4, 32, 32), split="heldout").meta
    assert m["heldout_shifts"] and m["split"] == "heldout"
    with pytest.raises(InputError, match="Valid keywords"):
        ct_head_volume(1, shape=(4, 32, 32), brain="big")


# ------------------------------------------------------------------------------------------------ writers
@pytest.mark.parametrize("task,shape", [("asoct", (3, 48, 64)), ("ct", (8, 48, 64))])
def test_write_phantom_round_trips_geometry_and_segments(tmp_path, task, shape):
    import SimpleITK as sitk
    import slicerio

    kw = {"pixel_mm": 1.0} if task == "ct" else {}
    paths = write_phantom(task, 3, tmp_path, shape=shape, **kw)
    assert {p.name for p in paths.values()} == {f"{task}_3.nrrd", f"{task}_3.seg.nrrd", f"{task}_3_visible.nrrd",
                                                 f"{task}_3.json"}
    ph = (asoct_volume if task == "asoct" else ct_head_volume)(3, shape=shape, **kw)
    img = sitk.ReadImage(str(paths["image"]))
    np.testing.assert_allclose(img.GetSpacing()[::-1], ph.spacing, rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), ph.origin, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), ph.image)
    assert img.GetPixelIDTypeAsString() == ("16-bit signed integer" if task == "ct" else "32-bit float")
    vis = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["visible"])))
    np.testing.assert_array_equal(vis.astype(bool), ph.visible)
    seg = slicerio.read_segmentation(str(paths["segmentation"]))
    names = {s["labelValue"]: (s["id"], s["name"]) for s in seg["segments"]}
    expected = {c["value"]: (c["key"], c["name"]) for c in CLASSES[task] if c["value"]}
    assert names == expected
    labels = slicerio.extract_segments(seg, [(n, v) for v, (_, n) in expected.items()])["voxels"]
    np.testing.assert_array_equal(labels.transpose(2, 1, 0), ph.labels)
    meta = json.loads(paths["meta"].read_text())
    assert meta["seed"] == 3 and meta["task"] == task and "visible" not in meta
    with pytest.raises(OutputError, match="overwrite"):
        write_phantom(task, 3, tmp_path, shape=shape, **kw)
    with pytest.raises(InputError, match="Unknown phantom task"):
        write_phantom("mri", 3, tmp_path)


# ------------------------------------------------------------------------------------------------ physics
def test_speckle_is_fully_developed_and_looks_reduce_it():
    from LensSegCalibLib.phantom.speckle import log_compress, speckle_intensity

    rng = np.random.default_rng(0)
    refl = np.full((256, 256), 1e4, np.float32)  # 40 dB above the noise floor: noise is negligible
    one = speckle_intensity(refl, rng, psf_sigma_px=(1.0, 1.5), looks=1)
    amp = np.sqrt(one)
    # DATA 1.3 [OL06]: Rayleigh amplitude contrast sqrt(4/pi - 1) = 0.5227; exponential intensity SD/mean = 1
    assert amp.std() / amp.mean() == pytest.approx(0.5227, abs=0.02)
    assert one.mean() == pytest.approx(1e4 + 1, rel=0.05)  # energy-normalised PSF keeps the mean
    four = speckle_intensity(refl, rng, psf_sigma_px=(1.0, 1.5), looks=4)
    assert four.std() / four.mean() == pytest.approx(0.5, abs=0.04)  # 1/sqrt(L)
    # log compression: median noise (ln 2 for unit-power exponential noise) -> floor; +DR dB -> 1
    out = log_compress(np.array([np.log(2.0), np.log(2.0) * 10**5], np.float32), dynamic_range_db=50.0,
                       floor_level=0.03)
    np.testing.assert_allclose(out, [0.03, 1.0], atol=2e-6)


def test_eyelid_covers_and_hides_the_peripheral_cornea_in_vertical_meridians():
    ph = asoct_volume(8, shape=(2, 256, 256), eyelids=True, upper_lid_mm=4.0, lower_lid_mm=5.0,
                      lateral_shift_mm=0.0, specular_streak=False)
    x = _lateral_mm(ph)
    horiz, vert = ph.visible[0], ph.visible[1]  # meridians 0 and 90 deg
    under_lid = x > 5.0  # superior side of the vertical meridian, past the lid margin
    # horizontal meridian: no lid, the beam reaches cornea, iris and sclera; vertical: lost under the lid
    top = slice(0, 90)  # 0-4.6 mm depth: above the iris root
    assert horiz[top, under_lid].mean() > 0.95
    assert vert[top, under_lid].mean() < 0.5 * horiz[top, under_lid].mean()
    assert not vert[150:, under_lid].any()  # deeper than 7.6 mm nothing is reached under the lid
    assert ph.image[1][:40, under_lid].mean() > ph.image[0][:40, under_lid].mean() + 0.05  # lid tissue on top
