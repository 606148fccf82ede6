"""Tests of ccdgrid.warmstart: recalibration seeded by a previous calibration."""

import re

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ccdgrid.errors import CcdgridError
from ccdgrid.pipeline import calibrate
from ccdgrid.synthetic import dense_residual, grid_image
from ccdgrid.warmstart import WarmCalibration, WarmStartFallback, recalibrate

SHAPE = (512, 512)
PLATE = {"pitch_px": 40.0, "hole_diameter_px": 7.0, "rotation_deg": 0.4, "seed": 5}
BASE_OFFSET = (0.3, -0.2)


def _plate(offset=BASE_OFFSET, **changes):
    return grid_image(SHAPE, **{**PLATE, "offset": offset, **changes})


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def base():
    g = _plate()
    return g, calibrate(g.image, cv_folds=0)


def _valid_corners(*masks):
    pix = np.logical_and.reduce([np.asarray(m) == 0 for m in masks])
    corner = np.zeros((pix.shape[0] + 1, pix.shape[1] + 1), dtype=bool)
    for dy in (0, 1):
        for dx in (0, 1):
            corner[dy : dy + pix.shape[0], dx : dx + pix.shape[1]] |= pix
    return corner


def test_same_image_gives_same_maps_and_no_drift(base, backend):
    g, cold = base
    warm = recalibrate(g.image, cold, cv_folds=0, backend=backend)
    assert isinstance(warm, WarmCalibration)
    assert warm.params["warm_start"] == {"used": True, "reason": ""}
    # every indexed hole is found again with its previous indices, except at
    # most a borderline one at the taper edge (judged against its neighbours)
    assert warm.drift.n_matched >= cold.lattice.n_valid - 2
    prev_ij = {tuple(ij): k for k, ij in enumerate(cold.grid.indices)}
    rows = np.array([prev_ij[tuple(ij)] for ij in warm.lattice.indices])
    before = cold.holes.peaks[cold.lattice.valid][rows]
    # the warm fit starts from the previous shape and fits the raw pixels
    # (no median-filtered pass): the same centres to 0.01 px, except at the
    # taper edge, where it is as near the truth as the cold fit (within
    # 0.015 px: 0.026 against 0.014 px for one hole) or nearer
    err_warm, _ = cKDTree(g.holes).query(warm.holes.peaks)
    err_cold, _ = cKDTree(g.holes).query(before)
    moved = np.hypot(*(warm.holes.peaks - before).T) > 0.01
    assert moved.sum() <= 0.1 * len(rows)
    assert (err_warm[moved] <= err_cold[moved] + 0.015).all()
    assert np.sqrt(np.mean(err_warm**2)) <= np.sqrt(np.mean(err_cold**2))
    # the maps follow: as close to the truth as the cold ones, or closer
    res_warm = dense_residual(g.truth, warm.dy, warm.dx, warm.mask, region=g.taper_mask).rms
    res_cold = dense_residual(g.truth, cold.dy, cold.dx, cold.mask, region=g.taper_mask).rms
    assert res_warm <= 1.05 * res_cold
    diff = np.hypot(warm.dx - cold.dx, warm.dy - cold.dy)[_valid_corners(cold.mask, warm.mask)]
    assert diff.max() < 0.15
    drift = warm.drift
    assert np.hypot(*drift.shift) < 0.005
    # the warm and cold centres differ by their fits' noise (0.01 px): the
    # lattices they give turn by up to ~0.6 mdeg (26 holes per side)
    assert abs(drift.rotation_mdeg) < 1.0
    assert abs(drift.scale_ppm) < 30
    # the most the maps change is at the holes cut by the taper edge
    assert drift.max_change_dx < 0.15
    assert drift.max_change_dy < 0.15
    assert "drift since the previous calibration" in warm.summary()


def test_shifted_plate_reports_shift_and_keeps_accuracy(base, backend):
    _, cold_prev = base
    move = np.array([3.0, -2.0])
    g = _plate(offset=tuple(np.add(BASE_OFFSET, move)))
    warm = recalibrate(g.image, cold_prev, cv_folds=0, backend=backend)
    assert warm.params["warm_start"]["used"]
    np.testing.assert_allclose(warm.drift.shift, move, atol=0.05)
    assert abs(warm.drift.rotation_mdeg) < 5
    assert warm.drift.matched_fraction > 0.9
    cold = calibrate(g.image, cv_folds=0, backend=backend)
    rms_warm = dense_residual(g.truth, warm.dy, warm.dx, warm.mask, region=g.taper_mask).rms
    rms_cold = dense_residual(g.truth, cold.dy, cold.dx, cold.mask, region=g.taper_mask).rms
    assert rms_warm <= 1.1 * rms_cold


def test_warm_fits_start_from_the_previous_hole_shape(base, monkeypatch):
    from ccdgrid import centres
    from ccdgrid.warmstart import _previous

    _, cold_prev = base
    g = _plate(offset=(BASE_OFFSET[0] + 1.0, BASE_OFFSET[1] + 0.5))
    seen = {}
    real = centres.fit_hole_profiles

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(centres, "fit_hole_profiles", spy)
    first = recalibrate(g.image, cold_prev, cv_folds=0)
    shapes = cold_prev.holes.width[cold_prev.lattice.valid]
    assert seen["median_pass"] is False
    assert seen["start_shape"][0] == pytest.approx(np.median(shapes[:, 0]), rel=1e-12)
    assert seen["start_shape"][1] == pytest.approx(np.median(shapes[:, 1]), rel=1e-12)
    # a warm calibration seeds the next one the same way (its holes' own fits)
    again = _previous(first)
    np.testing.assert_array_equal(again.shapes, first.holes.width)
    second = recalibrate(g.image, first, cv_folds=0)
    diff = np.hypot(*(second.holes.peaks - first.holes.peaks).T)
    assert np.median(diff) < 1e-3  # the same image: the same centres...
    assert diff.max() < 0.05  # ...but for holes cut by the taper edge


def test_window_holds_the_profile_of_soft_holes():
    from ccdgrid.warmstart import _window_half

    sharp = np.column_stack([np.full(9, 5.2), np.full(9, 0.9)])
    soft = np.column_stack([np.full(9, 3.1), np.full(9, 2.45)])
    assert _window_half(5.2, 98.0, sharp) == _window_half(5.2, 98.0)  # 1.7 R + 2 holds it
    # a Gaussian-like hole: R + 3 s + 2 = 12.45 px, where 1.7 R + 2 gives 8
    assert _window_half(3.1, 72.0, soft)[0] == 13
    assert _window_half(3.1, 72.0)[0] == 9
    assert _window_half(3.1, 20.0, soft)[0] == 9  # at most 0.45 pitch


def test_rotated_plate_reports_rotation(base):
    _, prev = base
    g = _plate(rotation_deg=PLATE["rotation_deg"] + 0.05)
    warm = recalibrate(g.image, prev, cv_folds=0)
    assert warm.params["warm_start"]["used"]
    # the plate turned by 50 mdeg about the image centre, where hole (0, 0) sits
    assert warm.drift.rotation_mdeg == pytest.approx(50.0, abs=3.0)
    assert np.hypot(*warm.drift.shift) < 0.1


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"offset": (BASE_OFFSET[0] + 20.0, BASE_OFFSET[1])}, "moved|consistent"),
        ({"pitch_px": 31.0, "hole_diameter_px": 6.0}, "consistent|found again|rotation or scale"),
    ],
    ids=["half-pitch-move", "other-plate"],
)
def test_large_move_falls_back_to_cold(base, changes, why):
    _, prev = base
    g = _plate(**changes)
    with pytest.warns(WarmStartFallback) as caught:
        cal = recalibrate(g.image, prev, cv_folds=0)
    said = " / ".join(str(w.message) for w in caught)
    assert re.search(f"warm start not possible .*({why})", said), said
    assert cal.params["warm_start"]["used"] is False
    assert not cal.drift.warm
    assert np.isnan(cal.drift.rotation_mdeg)
    assert "fell back to a cold calibration" in cal.summary()
    # the cold result is a full calibration of the new image
    assert cal.lattice.n_valid > 50
    # the lattices' scales compare without matched holes
    scale = 31.0 / PLATE["pitch_px"] if "pitch_px" in changes else 1.0
    assert cal.drift.scale_ppm == pytest.approx((scale - 1.0) * 1e6, abs=2e3)


def test_a_fallback_to_another_plate_says_so(base):
    # a plate 20 % finer fell back in silence, its pixel size 25 % off the
    # previous one's: a wrong --pitch looks the same
    _, prev = base
    g = _plate(pitch_px=31.0, hole_diameter_px=6.0)
    with pytest.warns(WarmStartFallback) as caught:
        recalibrate(g.image, prev, cv_folds=0)
    said = [str(w.message) for w in caught]
    assert any("spacing on the image changed by -" in m and "wrong pitch" in m for m in said)
    # a move alone does not say it
    g = _plate(offset=(BASE_OFFSET[0] + 20.0, BASE_OFFSET[1]))
    with pytest.warns(WarmStartFallback) as caught:
        recalibrate(g.image, prev, cv_folds=0)
    assert not any("spacing" in str(w.message) for w in caught)


def test_a_fallback_names_the_callers_line_through_calibrate_too(base, monkeypatch):
    # calibrate(previous=...) hands over to recalibrate: its warnings named a
    # line of ccdgrid's pipeline, not the caller's
    _, prev = base
    g = _plate(offset=(BASE_OFFSET[0] + 20.0, BASE_OFFSET[1]))
    with pytest.warns(WarmStartFallback, match="warm start not possible") as caught:
        calibrate(g.image, previous=prev, cv_folds=0)
    assert {w.filename for w in caught} == {__file__}
    with pytest.warns(WarmStartFallback, match="warm start not possible") as caught:
        recalibrate(g.image, prev, cv_folds=0)
    assert {w.filename for w in caught} == {__file__}
    # and a fallback whose cold calibration fails still says it fell back
    import ccdgrid.warmstart as warmstart

    def refuse(*args, **kwargs):
        raise CcdgridError("too few holes found in `image`: 0")

    monkeypatch.setattr(warmstart, "calibrate", refuse)
    with pytest.warns(WarmStartFallback) as caught, pytest.raises(CcdgridError):
        calibrate(g.image, previous=prev, cv_folds=0)
    assert [w.filename for w in caught] == [__file__]


def test_previous_from_detector_file(base, tmp_path):
    g, prev = base
    path = tmp_path / "detector.h5"
    prev.save(path)
    warm = recalibrate(g.image, path, cv_folds=0)
    assert warm.params["warm_start"]["used"]
    assert warm.pitch == prev.pitch
    # the file holds what the warm start needs: same result as from memory
    direct = recalibrate(g.image, prev, cv_folds=0)
    assert warm.drift.n_matched == direct.drift.n_matched
    np.testing.assert_array_equal(warm.lattice.indices, direct.lattice.indices)
    # a cold calibration's file records the typical hole profile (diameter and
    # blur): the warm fits start from the same shape as from the calibration
    assert prev.params["resolved"]["hole_blur"] == pytest.approx(
        np.median(prev.holes.width[prev.lattice.valid, 1])
    )
    np.testing.assert_allclose(warm.holes.peaks, direct.holes.peaks, atol=1e-9)


def test_warm_calibration_file_seeds_as_the_calibration_itself(base, tmp_path):
    # a warm calibration's file records the typical hole blur with the
    # diameter: recalibrating from the file starts the fits from the same shape
    g, prev = base
    moved = _plate(offset=(BASE_OFFSET[0] + 0.7, BASE_OFFSET[1] - 0.4))
    first = recalibrate(moved.image, prev, cv_folds=0)
    assert first.params["resolved"]["hole_blur"] == pytest.approx(
        np.median(first.holes.width[:, 1])
    )
    path = tmp_path / "warm.h5"
    first.save(path)
    from_file = recalibrate(g.image, path, cv_folds=0)
    direct = recalibrate(g.image, first, cv_folds=0)
    np.testing.assert_array_equal(from_file.lattice.indices, direct.lattice.indices)
    np.testing.assert_allclose(from_file.holes.peaks, direct.holes.peaks, atol=1e-9)


def test_report_figure_of_a_warm_calibration(base, tmp_path):
    pytest.importorskip("matplotlib")
    from ccdgrid.report import write_report

    g, prev = base
    warm = recalibrate(g.image, prev, cv_folds=0)
    out = write_report(warm, tmp_path / "warm.png", g.image)
    assert out.stat().st_size > 10_000


def test_calibrate_previous_keyword_delegates(base):
    g, prev = base
    cal = calibrate(g.image, previous=prev, cv_folds=0)
    assert isinstance(cal, WarmCalibration)
    assert cal.params["warm_start"]["used"]


def test_shape_mismatch_is_an_error(base):
    _, prev = base
    with pytest.raises(CcdgridError, match=r"shape \(256, 256\).*\(512, 512\)"):
        recalibrate(np.zeros((256, 256), np.float32), prev)


def test_previous_without_holes_is_an_error(base):
    g, _ = base
    with pytest.raises(CcdgridError, match="`previous` must be a Calibration"):
        recalibrate(g.image, {"dx": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_shift": -1.0}, "max_shift"), ({"min_matched": 1.5}, "min_matched")],
)
def test_bad_options(base, kwargs, match):
    g, prev = base
    with pytest.raises(CcdgridError, match=match):
        recalibrate(g.image, prev, **kwargs)


def test_warm_maps_choose_the_smoothing_by_gcv_as_a_cold_calibration(base):
    _, prev = base
    moved = _plate(offset=(BASE_OFFSET[0] + 0.7, BASE_OFFSET[1] - 0.4))
    warm = recalibrate(moved.image, prev, cv_folds=0)
    assert warm.maps.smoothing_scores is not None  # chosen by GCV on the new holes
    cold = calibrate(moved.image, cv_folds=0)
    # as accurate as a cold calibration between the holes (here more: the warm
    # fits on raw pixels place the holes at the taper edge better)
    err = [dense_residual(moved.truth, c.dy, c.dx, c.mask).rms for c in (warm, cold)]
    assert err[0] <= 1.1 * err[1]


def test_warm_maps_reuse_the_previous_smoothing_and_degree_on_request(base, tmp_path):
    g, prev = base
    warm = recalibrate(g.image, prev, cv_folds=0, smoothing="previous")
    assert warm.maps.smoothing == prev.maps.smoothing
    assert warm.maps.degree == prev.maps.degree
    # with the kernel order its smoothing was chosen for (its units are the order's)
    assert warm.maps.order == prev.maps.order
    assert warm.maps.smoothing_scores is None
    path = tmp_path / "detector.h5"
    prev.save(path)
    assert prev.params["resolved"]["map_order"] == prev.maps.order
    from_file = recalibrate(g.image, path, cv_folds=0, smoothing="previous")
    assert from_file.maps.degree == prev.maps.degree
    assert from_file.maps.order == prev.maps.order
    assert from_file.params["resolved"]["map_order"] == prev.maps.order
    # a cold fallback chooses by GCV
    with pytest.warns(WarmStartFallback):
        far = recalibrate(
            _plate(offset=(BASE_OFFSET[0] + 20.0, BASE_OFFSET[1])).image,
            prev,
            cv_folds=0,
            smoothing="previous",
        )
    assert far.maps.smoothing_scores is not None


def test_warm_maps_choose_the_smoothing_again_when_holes_are_lost(base):
    g, prev = base
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[:, :70] = 1  # the first column of holes or so: more than 5 % of them
    warm = recalibrate(g.image, prev, mask=mask, cv_folds=0, smoothing="previous")
    assert warm.params["warm_start"]["used"]
    lost = 1.0 - warm.drift.n_matched / warm.drift.n_previous
    assert 0.05 < lost < 0.2
    assert warm.maps.smoothing_scores is not None  # chosen by GCV
    kept = recalibrate(g.image, prev, cv_folds=0, smoothing="previous")
    assert kept.maps.smoothing_scores is None


def _smooth_calibration(rng, shape, holes=0.3):
    """Masks with holes of random blobs and smooth maps (a few slow waves), float32."""
    from types import SimpleNamespace

    ny, nx = shape
    blobs = rng.uniform(size=(ny // 16 + 2, nx // 16 + 2)) < holes
    mask = np.kron(blobs, np.ones((16, 16), dtype=np.int8))[:ny, :nx].astype(np.int8)
    y, x = np.mgrid[0 : ny + 1, 0 : nx + 1] - 0.5
    maps = []
    for _ in range(2):
        k = rng.uniform(0.005, 0.03, size=(3, 2))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        field = sum(np.sin(k[m, 0] * y + k[m, 1] * x + phase[m]) for m in range(3))
        maps.append((field * rng.uniform(0.01, 0.1)).astype(np.float32))
    return SimpleNamespace(mask=mask, dx=maps[0], dy=maps[1])


def _exact_map_change(old, new):
    """Brute force: the largest |new - old| over corners valid in both (NaN skipped)."""
    corner = _valid_corners(old.mask, new.mask)
    if not corner.any():
        return float("nan"), float("nan")
    out = []
    for n, o in ((new.dx, old.dx), (new.dy, old.dy)):
        change = np.abs(n.astype(np.float64) - o)[corner]
        change = change[np.isfinite(change)]
        out.append(float(change.max()) if change.size else float("nan"))
    return tuple(out)


@pytest.mark.parametrize("shape", [(600, 37), (256, 256), (97, 161), (1, 9)])
def test_map_change_matches_the_corner_by_corner_maximum_on_smooth_maps(shape):
    from ccdgrid.warmstart import _CHANGE_STEP, _map_change

    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        old, new = _smooth_calibration(rng, shape), _smooth_calibration(rng, shape)
        exact = _exact_map_change(old, new)
        approx = _map_change(old, new)
        for a, e, n, o in zip(approx, exact, (new.dx, new.dy), (old.dx, old.dy), strict=True):
            if np.isnan(e):
                assert np.isnan(a)
                continue
            # a lower bound, short by at most the gradient over half a diagonal
            change = n.astype(np.float64) - o
            grad = max(np.abs(np.diff(change, axis=ax)).max(initial=0.0) for ax in (0, 1))
            assert a <= e + 1e-7
            assert e - a <= grad * _CHANGE_STEP / np.sqrt(2) + 1e-7


def test_map_change_finds_a_maximum_between_the_sampled_corners():
    from ccdgrid.warmstart import _map_change

    rng = np.random.default_rng(8)
    old, new = (
        _smooth_calibration(rng, (200, 300), holes=0.0),
        _smooth_calibration(rng, (200, 300), holes=0.0),
    )
    new.dx[:] = old.dx
    # a smooth bump of the change peaking at corner (101, 203), off the 8-lattice
    y, x = np.mgrid[0:201, 0:301]
    new.dx += (0.5 * np.exp(-((y - 101) ** 2 + (x - 203) ** 2) / 200.0)).astype(np.float32)
    change_dx, _ = _map_change(old, new)
    assert change_dx == pytest.approx(_exact_map_change(old, new)[0], abs=1e-6)
    assert change_dx == pytest.approx(0.5, abs=1e-3)


def test_map_change_skips_nan_and_needs_a_shared_valid_corner():
    from ccdgrid.warmstart import _map_change

    rng = np.random.default_rng(3)
    old, new = _smooth_calibration(rng, (64, 48), 0.0), _smooth_calibration(rng, (64, 48), 0.0)
    new.dx[0, 0] = np.nan  # a sampled corner: skipped, as by nanmax
    new.dy[:] = np.nan
    change_dx, change_dy = _map_change(old, new)
    assert change_dx == pytest.approx(_exact_map_change(old, new)[0], abs=1e-6)
    assert np.isnan(change_dy)
    new.mask[:] = 1
    assert np.isnan(_map_change(old, new)).all()


@pytest.mark.parametrize("shape", [(17, 17), (16, 25), (9, 8), (1, 1)])
def test_take_lattice_is_the_gather(shape):
    from ccdgrid.warmstart import _take_lattice

    a = np.arange(np.prod(shape)).reshape(shape)
    for step in (1, 4, 8):
        rows = np.unique(np.r_[0 : shape[0] : step, shape[0] - 1])
        cols = np.unique(np.r_[0 : shape[1] : step, shape[1] - 1])
        np.testing.assert_array_equal(_take_lattice(a, rows, cols, step), a[np.ix_(rows, cols)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_image_dtype_does_not_change_the_result(base, dtype):
    # the warm start fits windows of the image in its own dtype: uint16
    # counts and the same counts as floats or wider integers are the same data
    _, prev = base
    moved = _plate(offset=(BASE_OFFSET[0] + 1.3, BASE_OFFSET[1] - 0.8))
    ref = recalibrate(moved.image, prev, cv_folds=0)
    other = recalibrate(moved.image.astype(dtype), prev, cv_folds=0)
    assert moved.image.dtype == np.uint16
    np.testing.assert_array_equal(other.holes.peaks, ref.holes.peaks)
    np.testing.assert_array_equal(other.dx, ref.dx)


def test_calibrate_with_previous_keeps_the_previous_pitch_by_default():
    # a 7 mm plate recalibrated warm without restating the pitch: the pixel
    # size must follow the previous 7 mm, not calibrate()'s cold default of 5 mm
    img = grid_image((384, 384), seed=3, pitch_px=40.0).image
    first = calibrate(img, pitch=7e-3, cv_folds=0)
    again = calibrate(img, previous=first, cv_folds=0)
    np.testing.assert_allclose(again.pixel_size, first.pixel_size, rtol=1e-3)
    assert again.pitch == pytest.approx(7e-3)


def test_dead_row_across_holes_is_masked(base, backend):
    _, prev = base
    moved = _plate(offset=(BASE_OFFSET[0] + 1.3, BASE_OFFSET[1] - 0.8))
    clean = recalibrate(moved.image, prev, cv_folds=0, backend=backend)
    peaks = clean.holes.peaks
    centre_row = int(np.rint(np.median(peaks[np.abs(peaks[:, 0] - 256) < 20, 0])))
    column = int(np.rint(np.median(peaks[np.abs(peaks[:, 1] - 131) < 20, 1]))) + 7
    by_index = {tuple(ij): p for ij, p in zip(clean.lattice.indices, peaks, strict=True)}
    # 7 px holes in windows of half width 9: a row 7 px off the centres
    # crosses the windows, not the holes; one through the centres crosses both
    for offset in (7, 0):
        img = moved.image.copy()
        row = centre_row + offset
        img[row] = 0
        img[:, column] = 4000  # bright: it would draw the global move's search
        warm = recalibrate(img, prev, cv_folds=0, backend=backend)
        assert warm.params["warm_start"]["used"]
        near = np.abs(peaks[:, 0] - row) < 9
        assert near.sum() >= 5
        masked = warm.holes.rejected[warm.holes.reasons == "masked"]
        if offset:
            # the holes are measured without the dead row, as well as before
            assert warm.drift.n_matched >= clean.drift.n_matched - 3
            for ij, p in zip(warm.lattice.indices, warm.holes.peaks, strict=True):
                if abs(p[0] - row) < 9 or abs(p[1] - column) < 9:
                    assert np.hypot(*(p - by_index[tuple(ij)])) < 0.05
        else:
            # more than a tenth of their disc is dead: rejected as masked, as the
            # hole finder does
            assert len(masked) >= near.sum() - 2
            assert np.all(np.abs(masked[:, 0] - row) < 3)


def test_warm_maps_reuse_the_previous_fit_and_equal_a_fit_of_the_new_holes(base):
    from ccdgrid.maps import displacement_maps

    _, prev = base
    moved = _plate(offset=(BASE_OFFSET[0] + 1.3, BASE_OFFSET[1] - 0.8))
    warm = recalibrate(moved.image, prev, cv_folds=0)
    # with all holes in the GCV (< 500), it is made again when one is lost:
    # here two at the taper edge
    assert warm.drift.n_matched < warm.drift.n_previous
    assert warm.maps.gcv_basis.vec is not prev.maps.gcv_basis.vec
    # a warm start from the warm calibration finds the same holes: the GCV
    # runs from their eigenbasis and picks the same smoothing
    again = recalibrate(moved.image, warm, cv_folds=0)
    assert again.drift.n_matched == again.drift.n_previous
    assert again.maps.gcv_basis.vec is warm.maps.gcv_basis.vec
    assert again.maps.smoothing == warm.maps.smoothing
    # the same holes in the same order: the spline is solved from the warm
    # fit's factor, not factorised again
    assert again.maps.tps_factor.upper is warm.maps.tps_factor.upper
    np.testing.assert_array_equal(again.maps.tps_factor.points, again.holes.peaks)
    # ... and, that smoothing once chosen, the maps are those of a fit of the
    # new holes from scratch, to far below the float32 maps' rounding
    fresh = displacement_maps(
        again.holes.peaks,
        again.grid.displacement,
        SHAPE,
        scale_px=again.holes.pitch_px,
        smoothing=again.maps.smoothing,
        degree=again.maps.degree,
    )
    assert fresh.tps_factor.upper is not warm.maps.tps_factor.upper
    np.testing.assert_allclose(again.dx, fresh.dx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(again.dy, fresh.dy, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(again.mask, fresh.mask)


def test_maps_fitted_to_other_holes_are_not_reused(base):
    from dataclasses import replace

    from ccdgrid.warmstart import _previous

    _, prev = base
    assert _previous(prev).maps is prev.maps
    # maps fitted to other points than the indexed holes (a combined
    # calibration's: several plate positions) are not taken for theirs
    other = replace(prev.maps)
    other.gcv_basis = replace(prev.maps.gcv_basis, points=prev.maps.gcv_basis.points[::-1])
    assert _previous(replace(prev, maps=other)).maps is None
    # maps that kept only their spline factor (no GCV ran) are matched by its points
    factor_only = replace(prev.maps, gcv_basis=None)
    assert _previous(replace(prev, maps=factor_only)).maps is factor_only
    points = factor_only.tps_factor.points[::-1]
    factor_only.tps_factor = replace(factor_only.tps_factor, points=points)
    assert _previous(replace(prev, maps=factor_only)).maps is None


def test_module_gaps_are_masked_in_a_warm_start_too():
    g = grid_image(SHAPE, **{**PLATE, "offset": BASE_OFFSET})
    image = g.image.astype(np.int32)
    image[200:202] = -1
    cold = calibrate(image, cv_folds=0)
    warm = recalibrate(image, cold, cv_folds=0)
    assert warm.params["warm_start"]["used"]
    assert np.all(warm.mask[200:202] == 1)
    np.testing.assert_array_equal(warm.mask[200:202], cold.mask[200:202])


def test_warm_cross_validation_reuses_the_folds_of_the_previous_one():
    g = _plate()
    cold = calibrate(g.image, cv_folds=5)
    # the same image: every hole found again, in the previous order; the
    # smoothing and trend kept (GCV's scores of the degrees 1-4 differ by 1 %
    # here, and the warm centres may tip the choice: other systems)
    warm = recalibrate(g.image, cold, cv_folds=5, smoothing="previous")
    assert warm.drift.n_matched == warm.drift.n_previous
    assert warm.maps.degree == cold.maps.degree
    np.testing.assert_array_equal(warm.cross_validation.folds, cold.cross_validation.folds)
    for f, factor in warm.cross_validation.factors.items():
        assert factor.upper is cold.cross_validation.factors[f].upper
    # the figure is the one a cross-validation from scratch gives
    fresh = recalibrate(g.image, cold, cv_folds=0, smoothing="previous")
    from ccdgrid.pipeline import _cross_validation

    again = _cross_validation(fresh.holes.peaks, fresh.grid, fresh.maps, 5)
    assert warm.cross_validation.rms_px == pytest.approx(again.rms_px, rel=1e-6)
    assert warm.cross_validation.max_px == pytest.approx(again.max_px, rel=1e-6)
