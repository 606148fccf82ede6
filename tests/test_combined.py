"""Tests of ccdgrid.combined: one calibration from several plate positions."""

import numpy as np
import pytest

from ccdgrid import combined
from ccdgrid.combined import CombinedCalibration, calibrate_combined
from ccdgrid.detector_file import load
from ccdgrid.errors import CcdgridError
from ccdgrid.pipeline import calibrate
from ccdgrid.synthetic import dense_residual, grid_image

SHAPE = (512, 512)
# a 40 px pitch puts ~140 holes on a 512² image
PLATE = {"pitch_px": 40.0, "hole_diameter_px": 7.0, "rotation_deg": 0.4}
# plate moves of a fraction of a pitch, (y, x) px, relative to the first position
OFFSETS = np.array([(0.0, 0.0), (13.5, -9.25), (-16.0, 7.75)])


def _plates(seed, offsets=OFFSETS):
    return [grid_image(SHAPE, **PLATE, seed=seed, offset=tuple(o)) for o in offsets]


@pytest.fixture(scope="module", params=[1, 2], ids=["seed1", "seed2"])
def estimated(request):
    plates = _plates(request.param)
    return plates, calibrate_combined([p.image for p in plates])


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


def _dense(plates, cal, common):
    return dense_residual(plates[0].truth, cal.dy, cal.dx, common, region=plates[0].taper_mask).rms


def test_the_generator_keeps_the_field_when_the_plate_moves():
    # the premise of the experiment: same seed, same detector distortion
    a, b = _plates(3, OFFSETS[:2])
    pts = np.random.default_rng(0).uniform(0, 511, (500, 2))
    np.testing.assert_array_equal(a.truth.displacement(pts), b.truth.displacement(pts))
    np.testing.assert_allclose(np.subtract(b.params["offset"], a.params["offset"]), OFFSETS[1])


def test_combined_lowers_the_dense_residual(estimated):
    plates, cal = estimated
    single = cal.combined.single
    common = (single.mask != 0) | (cal.mask != 0)
    rms_single = _dense(plates, single, common)
    rms_combined = _dense(plates, cal, common)
    # measured: 0.30-0.50x with 3 positions on seeds 1-6
    assert rms_combined < 0.8 * rms_single


def test_the_joint_maps_cover_what_one_image_covers(estimated):
    # the border-gap rule weighed each edge against the points' nearest
    # neighbours: the samples of one hole a fraction of a pitch apart made
    # every edge between holes a "gap", and most of the detector was masked
    # (all of it on a 1024² plate moved by 18 px)
    plates, cal = estimated
    single = cal.combined.single
    valid_single = np.count_nonzero(single.mask == 0)
    assert np.count_nonzero(cal.mask == 0) >= 0.97 * valid_single
    # within the lit area, nothing one image keeps is lost
    lit = plates[0].taper_mask
    lost = (single.mask == 0) & (cal.mask != 0) & lit
    assert np.count_nonzero(lost) <= 0.01 * valid_single


def test_two_positions_are_enough_to_gain():
    plates = _plates(1, OFFSETS[:2])
    cal = calibrate_combined([p.image for p in plates], cv_folds=0)
    single = cal.combined.single
    common = (single.mask != 0) | (cal.mask != 0)
    # measured: 0.51-0.71x with 2 positions on seeds 1-6
    assert _dense(plates, cal, common) < 0.9 * _dense(plates, single, common)


def test_offsets_measured_on_central_holes_serve_the_lattice_of_all(monkeypatch):
    # Above 1500 samples the offsets are measured on the central holes, whose
    # lattice differs in scale from the one of all holes under a strong
    # distortion: used as they were, offsets of 30 px were 0.05 px off on a
    # 2048² plate and the joint map was twice worse than one image's. Here
    # the central subset is made small on small plates, with the same effect
    # (measured before the fix: 0.014-0.018 px against 0.017-0.019 for one
    # image, offsets 0.09-0.15 px off; after: 0.0063-0.0087 px, 0.025-0.03)
    monkeypatch.setattr(combined, "_OFFSET_MAX_POINTS", 100)
    plates = [
        grid_image(SHAPE, **PLATE, distortion="strong", seed=1, offset=tuple(o)) for o in OFFSETS
    ]
    cal = calibrate_combined([p.image for p in plates])
    single = cal.combined.single
    common = (single.mask != 0) | (cal.mask != 0)
    assert _dense(plates, cal, common) < 0.7 * _dense(plates, single, common)
    np.testing.assert_allclose(cal.combined.offsets_estimated, OFFSETS, atol=0.05)


def test_estimated_offsets_match_the_plate_moves(estimated):
    _, cal = estimated
    assert not cal.combined.offsets_given
    np.testing.assert_array_equal(cal.combined.offsets[0], [0.0, 0.0])
    # measured: at most 0.007 px off
    np.testing.assert_allclose(cal.combined.offsets_estimated, OFFSETS, atol=0.05)
    np.testing.assert_array_equal(cal.combined.offsets, cal.combined.offsets_estimated)


def test_known_offsets_are_used_as_given(backend):
    plates = _plates(2)
    # absolute stage positions: taken relative to the first
    stage = OFFSETS + np.array([100.0, -50.0])
    cal = calibrate_combined([p.image for p in plates], offsets=stage, backend=backend)
    assert cal.combined.offsets_given
    np.testing.assert_array_equal(cal.combined.offsets, OFFSETS)
    np.testing.assert_allclose(cal.combined.offsets_estimated, OFFSETS, atol=0.05)
    single = cal.combined.single
    common = (single.mask != 0) | (cal.mask != 0)
    assert _dense(plates, cal, common) < 0.8 * _dense(plates, single, common)


def test_offsets_that_contradict_the_images_are_refused():
    plates = _plates(2)
    wrong = OFFSETS.copy()
    wrong[2] = (-16.0 + 16.0, 7.75)  # 0.4 pitch away from where the plate is
    with pytest.raises(CcdgridError, match=r"offsets\[2\].*does not match"):
        calibrate_combined([p.image for p in plates], offsets=wrong)


def test_the_single_comparison_is_the_plain_calibration(estimated):
    plates, cal = estimated
    alone = calibrate(plates[0].image)
    np.testing.assert_array_equal(cal.combined.single.dx, alone.dx)
    np.testing.assert_array_equal(cal.combined.single.dy, alone.dy)
    assert cal.combined.single_cv_rms_px == alone.cross_validation.rms_px


def test_records_line_up(estimated):
    _, cal = estimated
    assert isinstance(cal, CombinedCalibration)
    comb, grid = cal.combined, cal.grid
    n = len(grid.indices)
    valid = cal.lattice.valid
    assert int(valid.sum()) == n == int(comb.n_indexed.sum())
    np.testing.assert_array_equal(np.bincount(comb.image_of_hole), comb.n_indexed)
    np.testing.assert_array_equal(comb.n_found, [len(h.peaks) for h in comb.holes])
    np.testing.assert_array_equal(cal.lattice.indices[valid], grid.indices)
    assert grid.indices.min() == 0
    measured = cal.holes.peaks[valid]
    np.testing.assert_allclose(grid.ideal - grid.displacement, measured, atol=1e-9)
    # the same lattice site seen in two images: the plate moved by the offset
    # (up to the change of the distortion over that move, far below 0.5 px)
    own = comb.image_of_hole == 0
    first = {tuple(ij): p for ij, p in zip(grid.indices[own], measured[own], strict=True)}
    for k in (1, 2):
        sel = comb.image_of_hole == k
        pairs = [
            (first[tuple(ij)], p)
            for ij, p in zip(grid.indices[sel], measured[sel], strict=True)
            if tuple(ij) in first
        ]
        assert len(pairs) > 100
        moves = np.array([p - q for q, p in pairs])
        np.testing.assert_allclose(moves, np.broadcast_to(OFFSETS[k], moves.shape), atol=0.5)
    assert np.all(comb.fit_rms < 0.1)
    # per-image cross-validation when the map was fitted to the samples, not site means
    fitted_to_samples = cal.params["resolved"]["smoothing_choice"].startswith("all samples")
    assert np.all(np.isfinite(comb.cv_rms)) == fitted_to_samples
    assert cal.params["combined"]["n_images"] == 3
    text = cal.summary()
    for k in range(3):
        assert f"image {k}: offset" in text


def test_save_writes_a_detector_file_pyfai_loads(estimated, tmp_path):
    from pyFAI import detector_factory

    _, cal = estimated
    path = cal.save(tmp_path / "combined.h5")
    det = detector_factory(str(path))
    assert det.shape == SHAPE
    np.testing.assert_array_equal(det.mask, cal.mask)
    rec = load(path)
    np.testing.assert_array_equal(rec.dx, cal.dx)
    assert rec.params["combined"]["offsets_px"] == cal.combined.offsets.tolist()


def test_a_warm_start_from_the_combined_file_starts_from_its_hole_profile(estimated, tmp_path):
    from ccdgrid.warmstart import recalibrate

    plates, cal = estimated
    blur = cal.params["resolved"]["hole_blur"]
    per_image = [
        np.median(h.width[lat.valid, 1])
        for h, lat in zip(cal.combined.holes, cal.combined.lattices, strict=True)
    ]
    assert min(per_image) <= blur <= max(per_image)
    rec = load(cal.save(tmp_path / "combined.h5"))
    assert rec.params["resolved"]["hole_blur"] == blur
    # the combined lattice is the first image's: the first position has not
    # moved, from the file as from the calibration in memory
    for previous in (rec, cal):
        warm = recalibrate(plates[0].image, previous, cv_folds=0)
        assert warm.drift.n_previous == cal.combined.n_indexed[0]
        assert warm.drift.n_matched >= 0.95 * warm.drift.n_previous
        np.testing.assert_allclose(warm.drift.shift, 0.0, atol=0.05)


def test_paths_are_read(tmp_path):
    plates = _plates(1, OFFSETS[:2])
    paths = []
    for k, p in enumerate(plates):
        paths.append(tmp_path / f"pos{k}.npy")
        np.save(paths[-1], p.image)
    from_files = calibrate_combined(paths, cv_folds=0, compare_single=False)
    in_memory = calibrate_combined([p.image for p in plates], cv_folds=0, compare_single=False)
    np.testing.assert_array_equal(from_files.dx, in_memory.dx)
    assert [s["path"] for s in from_files.source["images"]] == [str(p) for p in paths]
    assert from_files.combined.single is None


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        ("one", {}, "at least 2 images"),
        ("array", {}, "list of at least 2 images"),
        ("shapes", {}, r"images\[1\]` has shape"),
        ("two", {"offsets": [(0, 0)]}, r"offsets` must have shape \(2, 2\)"),
        ("two", {"offsets": [(0, 0, 0), (1, 1, 1)]}, r"offsets` must have shape \(2, 2\)"),
        ("two", {"offsets": [(0, 0), (np.nan, 1)]}, "offsets` must be finite"),
        ("two", {"offsets": "abc"}, "offsets"),
        ("two", {"mask": [None]}, "list of 2"),
        ("two", {"mask": np.zeros((4, 4))}, "mask` for image 0 has shape"),
        ("two", {"compare_single": "yes"}, "compare_single"),
        ("two", {"pitch": -1}, "pitch"),
    ],
)
def test_bad_input_is_named(images, kwargs, match):
    img = np.zeros(SHAPE, dtype=np.uint16)
    sets = {
        "one": [img],
        "array": img,
        "shapes": [img, np.zeros((256, 256), dtype=np.uint16)],
        "two": [img, img],
    }
    with pytest.raises(CcdgridError, match=match):
        calibrate_combined(sets[images], **kwargs)


def test_an_image_without_a_grid_is_named():
    plate = _plates(1, OFFSETS[:1])[0]
    noise = np.random.default_rng(4).poisson(50, SHAPE).astype(np.uint16)
    with pytest.raises(CcdgridError, match="image 1"):
        calibrate_combined([plate.image, noise], cv_folds=0)
