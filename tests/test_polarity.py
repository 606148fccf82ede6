"""Dark holes on a bright plate: calibrated through the image's negative."""

import warnings

import numpy as np
import pytest

import ccdgrid
from ccdgrid import polarity
from ccdgrid.combined import calibrate_combined
from ccdgrid.detector_file import load
from ccdgrid.errors import CcdgridError
from ccdgrid.pipeline import calibrate
from ccdgrid.synthetic import dense_residual, grid_image
from ccdgrid.validation import validate
from ccdgrid.warmstart import recalibrate

SHAPE = (512, 512)
PLATE = {"pitch_px": 40.0, "hole_diameter_px": 14.0, "rotation_deg": 0.4, "seed": 5}


def _plate(offset=(0.3, -0.2), **changes):
    return grid_image(SHAPE, **{**PLATE, "offset": offset, **changes})


def _dark(image):
    # the negative a detector's software would make of a uint16 frame: not
    # ccdgrid's own `invert` (max - image), a constant apart from it
    return (65535 - image.astype(np.int64)).astype(np.uint16)


def _residual(g, cal):
    return dense_residual(g.truth, cal.dy, cal.dx, cal.mask, region=g.taper_mask).rms


@pytest.fixture(scope="module")
def plate():
    g = _plate()
    return g, calibrate(g.image)


@pytest.fixture(scope="module")
def dark(plate):
    g, _ = plate
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dark plate calibrated in silence
        return calibrate(_dark(g.image))


def test_check_polarity_names_the_choices():
    for value in polarity.POLARITIES:
        assert polarity.check_polarity(value) == value
    for bad in ("Dark", "inverted", None, 1):
        with pytest.raises(CcdgridError, match="`polarity` must be one of 'auto', 'bright'"):
            polarity.check_polarity(bad)
    with pytest.raises(CcdgridError, match="`polarity` must be one of"):
        calibrate(np.zeros((64, 64)), polarity="negative")


@pytest.mark.parametrize(
    ("dtype", "out"),
    [
        (np.uint8, np.float32),
        (np.uint16, np.float32),
        (np.int32, np.float64),
        (np.uint32, np.float64),
        (np.float32, np.float32),
        (np.float64, np.float64),
    ],
)
def test_invert_is_the_largest_value_minus_the_image(dtype, out):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 200, size=(7, 9)).astype(dtype)
    neg = polarity.invert(a[:, ::2])  # non-contiguous too
    assert neg.dtype == out
    np.testing.assert_array_equal(neg, a[:, ::2].max() - a[:, ::2].astype(np.float64))
    # wide integers keep every count (float32 would round 2**24 + 1)
    if out == np.float64 and np.issubdtype(dtype, np.integer):
        big = np.array([[2**24 + 1, 0]], dtype=dtype)
        np.testing.assert_array_equal(polarity.invert(big), [[0.0, 2.0**24 + 1]])


def test_invert_keeps_non_finite_pixels_and_ignores_them_for_the_top():
    a = np.array([[1.0, np.nan, 5.0], [np.inf, 2.0, -np.inf]], dtype=np.float32)
    neg = polarity.invert(a)
    np.testing.assert_array_equal(neg[np.isfinite(a)], [4.0, 0.0, 3.0])
    assert not np.isfinite(neg[~np.isfinite(a)]).any()
    empty = np.full((2, 2), np.nan)
    assert np.isnan(polarity.invert(empty)).all()


def test_a_bright_plate_is_calibrated_once_as_bright_holes(plate):
    _, cal = plate
    assert cal.params["polarity"] == "bright"
    assert "as bright holes" not in cal.timings
    assert polarity.polarity_of(cal) == "bright"


def test_dark_holes_are_calibrated_as_well_as_bright_ones(plate, dark):
    g, bright = plate
    assert dark.params["polarity"] == "dark"
    assert polarity.polarity_of(dark) == "dark"
    # the bright attempt is accounted for in the time it took
    assert dark.timings["as bright holes"] > 0
    assert dark.lattice.n_valid == bright.lattice.n_valid
    rms_bright, rms_dark = _residual(g, bright), _residual(g, dark)
    assert rms_bright < 0.03
    assert rms_dark < 1.05 * rms_bright + 0.002


def test_dark_holes_calibrated_as_bright_ones_say_so(plate):
    # the plate between dark holes is a lattice too: calibrated in silence,
    # it was 1.2 px off on a fuzz plate; here it is refused (too few of its
    # peaks fit one lattice), with no word of a polarity
    g, _ = plate
    with pytest.raises(CcdgridError, match="do not form a grid"):
        calibrate(_dark(g.image), polarity="bright")
    forced = calibrate(_dark(g.image), polarity="dark")
    assert forced.params["polarity"] == "dark"
    assert "as bright holes" not in forced.timings


def test_a_plate_between_dark_holes_calibrated_as_holes_is_warned_of():
    # large dark holes (0.6 pitch) leave a bright web whose cells' middles
    # form a lattice that calibrates: the middles of its cells are the dark
    # holes, far below the "holes'" background
    g = _plate(hole_diameter_px=24.0)
    with pytest.warns(UserWarning, match="is it dark holes on a bright plate.*polarity='dark'"):
        cal = calibrate(_dark(g.image), polarity="bright")
    assert cal.params["polarity"] == "bright"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = calibrate(_dark(g.image))
    assert auto.params["polarity"] == "dark"
    assert _residual(g, auto) < 0.03


def test_a_dark_calibration_keeps_its_polarity_in_the_detector_file(dark, tmp_path):
    path = dark.save(tmp_path / "dark.h5")
    record = load(path)
    assert record.params["polarity"] == "dark"
    assert polarity.polarity_of(record) == "dark"


@pytest.mark.parametrize("from_file", [False, True])
def test_a_warm_start_from_a_dark_calibration_reads_the_new_image_as_dark(
    plate, dark, from_file, tmp_path
):
    moved = _plate(offset=(1.8, -0.9))
    previous = dark.save(tmp_path / "dark.h5") if from_file else dark
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to a cold calibration
        warm = recalibrate(_dark(moved.image), previous)
    assert warm.params["warm_start"]["used"]
    assert warm.params["polarity"] == "dark"
    np.testing.assert_allclose(warm.drift.shift, (1.5, -0.7), atol=0.05)
    assert _residual(moved, warm) < 1.1 * _residual(moved, dark) + 0.003


def test_validation_measures_a_dark_plate_through_its_negative(plate, dark):
    g, _ = plate
    result = validate(_dark(g.image), dark)
    # the corrected grid's holes sit on a lattice again
    assert result.corrected.n_holes > 0.9 * dark.lattice.n_valid
    assert result.corrected.rms_px < 0.1


def test_combined_positions_of_a_dark_plate(plate):
    images = [_dark(_plate(offset=o).image) for o in ((0.3, -0.2), (6.3, 4.1))]
    for single in (True, False):
        cal = calibrate_combined(images, compare_single=single, cv_folds=0)
        assert cal.params["polarity"] == "dark"
        assert cal.lattice.n_valid > 0


def test_an_image_without_a_grid_is_refused_with_the_bright_search_s_reason():
    rng = np.random.default_rng(3)
    noise = rng.normal(100.0, 5.0, size=(256, 256)).astype(np.float32)
    with pytest.raises(CcdgridError) as auto:
        calibrate(noise)
    with pytest.raises(CcdgridError) as bright:
        calibrate(noise, polarity="bright")
    assert str(auto.value) == str(bright.value)


def test_the_command_line_takes_the_polarity(plate, tmp_path, capsys):
    import fabio

    from ccdgrid.cli import main

    g, _ = plate
    path = tmp_path / "dark.edf"
    fabio.edfimage.EdfImage(data=_dark(g.image)).write(str(path))
    out = tmp_path / "det.h5"
    assert main(["calibrate", str(path), "--pitch", "5mm", "-o", str(out)]) == 0
    assert load(out).params["polarity"] == "dark"
    forced = ["calibrate", str(path), "--pitch", "5mm", "--polarity", "dark", "-o", str(out)]
    assert main(forced) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["calibrate", str(path), "--pitch", "5mm", "--polarity", "negative"])
    assert "--polarity: invalid choice" in capsys.readouterr().err
    assert ccdgrid.calibrate is calibrate


def test_the_negative_is_kept_only_if_its_maps_predict_no_worse():
    from types import SimpleNamespace as NS

    from ccdgrid.pipeline import _no_worse

    def cal(rms):
        return NS(cross_validation=None if rms is None else NS(rms_px=rms))

    # a fuzz plate's bright web (0.10 px) against its dark holes (1.4 px)
    assert not _no_worse(cal(1.435), cal(0.101))
    assert _no_worse(cal(0.003), cal(0.111))
    assert _no_worse(cal(0.05), cal(0.05))
    assert _no_worse(cal(1.0), None)  # the bright calibration was refused
    assert _no_worse(cal(None), cal(0.1))  # not measured: the negative stands


def test_the_summary_says_the_holes_were_dark(plate, dark):
    assert "dark holes on a bright plate, measured on the image's negative" in dark.summary()
    assert "dark holes" not in plate[1].summary()


def test_calibrate_leaves_the_process_warning_state_alone(plate):
    # catch_warnings is process-wide and not thread-safe: calibrations in two
    # threads once left the filters at "always" and every later warning of the
    # process in a list nobody read
    import threading

    g, _ = plate
    filters, show = list(warnings.filters), warnings.showwarning
    threads = [threading.Thread(target=calibrate, args=(_dark(g.image),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == filters
    assert warnings.showwarning is show


def test_a_warning_from_a_stage_reaches_the_caller_even_when_calibrate_fails(monkeypatch):
    from ccdgrid import pipeline

    def find_holes(*args, **kwargs):
        warnings.warn("a warning of the hole search", RuntimeWarning, stacklevel=2)
        raise CcdgridError("too few holes found in `image`: 0")

    monkeypatch.setattr(pipeline, "find_holes", find_holes)
    with (
        pytest.warns(RuntimeWarning, match="a warning of the hole search"),
        pytest.raises(CcdgridError, match="too few holes"),
    ):
        calibrate(np.ones((64, 64), dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.complex64, "<U5", object])
def test_a_bad_array_is_refused_before_any_polarity_is_tried(dtype):
    image = np.ones((64, 64)).astype(dtype)
    for polarity_ in ("auto", "bright", "dark"):
        with pytest.raises(CcdgridError, match="`image` must hold real numbers"):
            calibrate(image, polarity=polarity_)
    with pytest.raises(CcdgridError, match="`image` must hold real numbers"):
        polarity.invert(image)


def test_invert_takes_its_top_from_the_pixels_used():
    # a masked module gap holding a sentinel sets no top; an unmasked one far
    # beyond float32's integer range turns the negative float64
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    a[0, 0] = 1e12
    mask = np.zeros(a.shape, dtype=np.uint8)
    mask[0, 0] = 1
    neg = polarity.invert(a, mask)
    assert neg.dtype == np.float32
    np.testing.assert_array_equal(neg.ravel()[1:], 11.0 - np.arange(1, 12))
    nan_mask = np.where(mask == 1, np.nan, 0.0)  # NaN marks a pixel too
    np.testing.assert_array_equal(polarity.invert(a, nan_mask), neg)
    wide = polarity.invert(a)
    assert wide.dtype == np.float64
    top = float(np.float32(1e12))  # the pixel's own value
    np.testing.assert_array_equal(wide.ravel()[1:], top - np.arange(1, 12))
    # a mask of another shape is left to the hole search to report
    np.testing.assert_array_equal(polarity.invert(a, np.zeros((2, 2))), wide)


def test_bright_holes_calibrated_as_dark_ones_say_so():
    g = _plate(hole_diameter_px=24.0)
    with pytest.warns(UserWarning, match="is it bright holes on a dark plate.*polarity='bright'"):
        cal = calibrate(g.image, polarity="dark")
    assert cal.params["polarity"] == "dark"


def test_the_cold_fallback_of_a_dark_warm_start_is_dark_too(dark):
    from ccdgrid.warmstart import WarmStartFallback

    far = _plate(offset=(15.3, -9.2))  # beyond 0.3 pitch: no warm start
    with pytest.warns(WarmStartFallback, match="made a cold calibration instead"):
        cal = recalibrate(_dark(far.image), dark)
    assert not cal.params["warm_start"]["used"]
    assert cal.params["polarity"] == "dark"
    assert "as bright holes" not in cal.timings  # calibrated as dark at once
    assert _residual(far, cal) < 0.03
    with pytest.raises(CcdgridError, match="`polarity` must be one of"):
        calibrate(_dark(far.image), previous=dark, polarity="negative")


def test_the_report_shows_a_dark_plate_as_it_was_measured(plate, dark):
    from ccdgrid.report import _gather

    g, bright = plate
    shown = _gather(dark, _dark(g.image))
    assert shown.image_label == "image's negative (dark holes)"
    # the negative: bright where the holes are
    ij = np.rint(dark.holes.peaks[:20]).astype(int).T
    between = np.rint(dark.holes.peaks[:20] + 0.5 * dark.grid.vectors.sum(axis=0)).astype(int).T
    assert (shown.image[tuple(ij)] > shown.image[tuple(between)]).all()
    assert _gather(bright, g.image).image_label == "image"


@pytest.mark.parametrize("warm", [False, True])
def test_a_series_of_dark_frames(tmp_path, warm):
    import h5py

    from ccdgrid.series import calibrate_series

    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as h5:
        h5["/entry/data"] = np.stack(
            [_dark(_plate(offset=(0.3 + 0.5 * k, -0.2)).image) for k in range(3)]
        )
    res = calibrate_series(
        f"{path}::/entry/data", output=tmp_path / "out", workers=1, warm=warm, progress=False
    )
    assert res.ok
    assert [load(f.output).params["polarity"] for f in res.frames] == ["dark"] * 3
    # the plate moved by 0.5 px a frame, which the drift against frame 0 shows
    np.testing.assert_allclose(res.table()["drift_shift_y_px"], [0.0, 0.5, 1.0], atol=0.05)
    assert [f.warm for f in res.frames] == [False, warm, warm]


def _noisy_dark_plate():
    # an independent generator's heavy-noise plate (peak SNR ~9), negated: the
    # bright plate's noise makes thousands of candidate peaks as bright holes
    import _independent_grid as gen

    shape = (512, 512)
    field = gen.Field(centre=(240, 271), radius=362.0, k1=-6.0, t1=0.5)
    g = gen.make_grid(
        shape, pitch_px=48.0, profile="gauss", width_px=2.5, field=field, lit=None,
        amplitude=120.0, background=(0.2, 0.45), dark=20.0, read_noise=3.0, seed=7,
    )  # fmt: skip
    return g, np.nanmax(g.image) * 1.02 + 50 - g.image


def test_the_search_as_bright_holes_gives_up_on_the_noise_of_a_bright_plate():
    from ccdgrid import peaks as P

    g, img = _noisy_dark_plate()
    token = P.GIVE_UP_ABOVE.set(10.0)
    try:
        with pytest.raises(P.TooManyCandidates, match="candidate peaks for at most"):
            P.find_holes(img)
        # the same plate of bright holes does not (one with thousands of hot
        # pixels does: see the next tests)
        P.find_holes(g.image)
    finally:
        P.GIVE_UP_ABOVE.reset(token)
    assert P.GIVE_UP_ABOVE.get() is None  # never set outside calibrate's first attempt


def test_a_noisy_dark_plate_is_calibrated_after_an_early_give_up(monkeypatch):
    # the attempt as bright holes (13 s and 1.3 GB at 2048² before it gave up
    # early) ends before its fits; the negative decides, as it would have
    import _independent_grid as gen

    from ccdgrid import pipeline

    g, img = _noisy_dark_plate()
    tried = []
    attempt = pipeline._calibrate_as

    def counted(image, polarity_, *args, **kwargs):
        tried.append(polarity_)
        return attempt(image, polarity_, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_calibrate_as", counted)
    cal = calibrate(img)
    assert cal.params["polarity"] == "dark"
    assert tried == ["bright", "dark"]
    assert cal.timings["as bright holes (gave up)"] < cal.timings["total"]
    points = g.holes[g.visible]
    points = points[cal.mask[tuple(np.rint(points).astype(int).T)] == 0]
    assert gen.frame_residual(g, cal, points)[0] < 0.05


def test_validation_of_an_image_of_the_other_polarity_warns():
    # 24 px holes on a 40 px pitch: the web between them is a lattice too,
    # and its re-measurement gave 0.1 px where the plate's gives 0.016
    g = _plate(hole_diameter_px=24.0)
    dark, bright = calibrate(_dark(g.image)), calibrate(g.image)
    for image, detector in ((g.image, dark), (_dark(g.image), bright)):
        with pytest.warns(UserWarning, match="look like the plate between holes of the other"):
            validate(image, detector)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate(_dark(g.image), dark).corrected.rms_px < 0.03


def test_hot_pixels_do_not_make_the_bright_search_give_up(monkeypatch):
    # 2 500 hot pixels on a 1024² plate outnumber ten times the holes it can
    # hold before the search leaves them out: counted then, the search gave
    # up and the negative was calibrated first (25 s instead of 0.34 s at
    # 2048², helper-69). They are counted once left out: the plate is
    # calibrated once, as polarity="bright" calibrates it
    from ccdgrid import pipeline

    g = grid_image((1024, 1024), pitch_px=64.0, hot_pixels=2500, seed=2)
    tried = []
    attempt = pipeline._calibrate_as

    def counted(image, polarity_, *args, **kwargs):
        tried.append((polarity_, pipeline.GIVE_UP_ABOVE.get() is not None))
        return attempt(image, polarity_, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_calibrate_as", counted)
    cal = calibrate(g.image)
    assert tried == [("bright", True)]
    assert cal.params["polarity"] == "bright"
    assert not any(k.startswith("as ") for k in cal.timings)
    assert len(cal.holes.rejected) > 2000  # the hot pixels, reported
    monkeypatch.setattr(pipeline, "_calibrate_as", attempt)
    alone = calibrate(g.image, polarity="bright")
    np.testing.assert_array_equal(cal.dx, alone.dx)
    np.testing.assert_array_equal(cal.dy, alone.dy)
