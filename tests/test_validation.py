"""Validation: self-consistency of a corrected grid image, cross-validated map error, CLI."""

import argparse
import json
import types

import numpy as np
import pytest

from ccdgrid.cross_validation import cross_validate
from ccdgrid.errors import CcdgridError
from ccdgrid.pipeline import calibrate
from ccdgrid.synthetic import grid_image
from ccdgrid.validation import add_validate_parser, validate

# The target, in units of the hole spacing: the seed tutorial's mean on real data.
TARGET_MEAN_PITCH = 0.0006


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def strong_1024():
    """A 1024² generated image (10 px peak distortion, 98 px pitch), its calibration."""
    g = grid_image((1024, 1024), seed=4, distortion="strong")
    return g, calibrate(g.image)


@pytest.fixture(scope="module")
def small():
    """A 512² image with a 40 px pitch (~140 holes), its calibration."""
    g = grid_image((512, 512), seed=7, pitch_px=40.0, hole_diameter_px=7.0, distortion_px=2.0)
    return g, calibrate(g.image)


def exact(g):
    dy, dx = g.truth.corner_maps(g.image.shape)
    return types.SimpleNamespace(dy=dy, dx=dx, mask=None)


def remove_affine(points, values, reference):
    """``values`` minus the affine function of ``points`` best fitting ``reference``."""
    design = np.column_stack([np.ones(len(points)), points - points.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(design, reference, rcond=None)
    return values - design @ coef


# -- validate() ----------------------------------------------------------------


def test_recovered_calibration_is_self_consistent(strong_1024):
    g, cal = strong_1024
    res = validate(g.image, cal)
    # every hole the calibration used is found again
    assert res.corrected.n_holes >= len(cal.grid.displacement) - 2
    assert res.corrected.mean_pitch <= TARGET_MEAN_PITCH
    assert res.corrected.max_pitch <= 0.003  # the tutorial's max on real data
    # 10 px of distortion left in the raw image: the correction removes > 99 % of it
    assert res.uncorrected.mean_px > 100 * res.corrected.mean_px
    assert res.corrected.rms_px >= res.corrected.mean_px
    assert res.corrected.max_px >= res.corrected.rms_px
    assert res.corrected.mean_pitch == pytest.approx(
        res.corrected.mean_px / res.corrected.pitch_px
    )
    # the corrected lattice is the calibrated one: same pixel size
    np.testing.assert_allclose(res.corrected.pixel_size, cal.pixel_size, rtol=2e-4)


def test_exact_maps_score_no_better(strong_1024):
    # The figure is set by re-measurement, not by the maps' accuracy: the exact maps leave
    # the hole finder's own error (~0.017 px here), while maps fitted to the same finder's
    # centres also undo its bias and score better (measured: 0.00018 vs 0.00007 pitch).
    g, cal = strong_1024
    recovered = validate(g.image, cal, uncorrected=False)
    truth = validate(g.image, exact(g), uncorrected=False)
    assert truth.uncorrected is None
    assert truth.corrected.mean_pitch <= TARGET_MEAN_PITCH
    assert truth.corrected.mean_px > 0.8 * recovered.corrected.mean_px
    assert truth.corrected.n_holes == recovered.corrected.n_holes
    assert truth.cross_validation is None  # no hole record to cross-validate


def test_summary_says_what_the_figures_mean(small):
    g, cal = small
    text = validate(g.image, cal).summary()
    assert "corrected image" in text
    assert "uncorrected image" in text
    assert "self-consistency check" in text
    assert f"{cal.cross_validation.k}-fold cross-validated" in text
    assert f"{cal.cross_validation.rms_px:.4f} px" in text


def test_uniform_shift_is_normalised_by_coverage(small, backend):
    # true position = nominal + 0.7 px along x: output column 0 gets 0.3 of a pixel (left
    # out), every other output pixel exactly one full pixel
    g, _ = small
    ny, nx = g.image.shape
    zeros = np.zeros((ny + 1, nx + 1))
    shifted = types.SimpleNamespace(dy=zeros, dx=zeros + 0.7, mask=None)
    res = validate(g.image, shifted, uncorrected=False, backend=backend)
    # the frame grows by the column the last input pixel is pushed into
    assert res.corrected_image.shape == (ny, nx + 1)
    assert np.isnan(res.corrected_image[:, 0]).all()
    assert np.isfinite(res.corrected_image[:, 1:]).all()
    # input pixel j truly spans [j + 0.7, j + 1.7] (pyFAI coordinates): output pixel k
    # gets 0.7 of input k - 1 and 0.3 of input k, no darkening anywhere
    img = g.image.astype(np.float64)
    np.testing.assert_allclose(
        res.corrected_image[:, 1:-1], 0.7 * img[:, :-1] + 0.3 * img[:, 1:], rtol=1e-5, atol=1e-3
    )
    # the added column holds 0.7 of the last input pixel, normalised by that coverage
    np.testing.assert_allclose(res.corrected_image[:, -1], img[:, -1], rtol=1e-5, atol=1e-3)


def test_detector_mask_hides_the_outer_holes(small):
    # the calibration masks pixels outside the hull of its hole centres: using that mask
    # in the correction cuts the outermost holes in half
    g, cal = small
    full = validate(g.image, cal, uncorrected=False)
    masked = validate(g.image, cal, uncorrected=False, detector_mask=True)
    assert masked.corrected.n_holes < full.corrected.n_holes - 10
    assert np.isnan(masked.corrected_image[cal.mask != 0]).mean() > 0.9


def test_detector_file_round_trip(small, tmp_path):
    g, cal = small
    path = tmp_path / "det.h5"
    cal.save(path)
    res = validate(g.image, path, uncorrected=False)
    reference = validate(g.image, cal, uncorrected=False)
    assert res.corrected.n_holes == reference.corrected.n_holes
    # the maps are stored as float32: the same figures to well below a thousandth of a pixel
    assert res.corrected.mean_px == pytest.approx(reference.corrected.mean_px, abs=2e-4)
    assert res.pitch == cal.pitch
    # recomputed from the file's hole record (the fit's scale differs by the pitch estimate)
    assert res.cross_validation.rms_px == pytest.approx(cal.cross_validation.rms_px, rel=0.05)
    assert res.as_dict()["cross_validation"]["k"] == cal.cross_validation.k


def test_wrong_shape_detector(small):
    g, cal = small
    with pytest.raises(
        CcdgridError, match=r"the detector.s dy map .* needs corner maps of shape \(512, 513\)"
    ):
        validate(g.image[:-1], cal)
    with pytest.raises(CcdgridError, match="must have corner maps dy and dx"):
        validate(g.image, types.SimpleNamespace(dy=cal.dy))
    bad_mask = types.SimpleNamespace(dy=cal.dy, dx=cal.dx, mask=np.zeros((10, 10)))
    with pytest.raises(CcdgridError, match=r"the detector's mask has shape \(10, 10\)"):
        validate(g.image, bad_mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pitch": -1.0}, "`pitch` must be a positive length"),
        ({"pitch": "5mm"}, "`pitch` must be a length in m"),
        ({"backend": "fortran"}, "`backend` must be one of"),
        ({"mask": np.zeros((3, 3))}, "shape"),
    ],
)
def test_bad_options(small, kwargs, match):
    g, cal = small
    with pytest.raises(CcdgridError, match=match):
        validate(g.image, cal, **kwargs)


def test_blank_image_fails_with_a_clear_message(small):
    _, cal = small
    with pytest.raises(CcdgridError, match="corrected image's holes could not be measured"):
        validate(np.zeros((512, 512), np.float32), cal)


# -- calibrate() keeps it -----------------------------------------------------------


def test_calibration_cv_against_the_truth(strong_1024):
    g, cal = strong_1024
    cv = cal.cross_validation
    assert cv.k == 5
    assert cv.n_evaluated == len(cal.grid.displacement)
    assert cv.rms_px > cal.maps.fit_residual_rms
    pts = cal.grid.ideal - cal.grid.displacement
    truth = g.truth.displacement(pts)
    # the measured and the true displacement differ by an affine map of the
    # true positions (the fitted lattice, centred: see gridfit.centred_grid)
    at = pts + truth
    noise = remove_affine(at, cal.grid.displacement - truth, cal.grid.displacement - truth)
    pred_err = remove_affine(at, cv.predicted - truth, cal.grid.displacement - truth)
    map_err = remove_affine(at, cal.maps.evaluate(pts) - truth, cal.grid.displacement - truth)
    rms = [np.sqrt(np.mean(np.sum(e**2, axis=1))) for e in (noise, pred_err, map_err)]
    assert cv.rms_px == pytest.approx(np.hypot(rms[0], rms[1]), rel=0.25)
    assert cv.rms_px > rms[2]  # an upper bound on the maps' true error at the holes
    assert "cross-validated" in cal.summary()


def test_calibration_cv_reports_the_maps_in_sample_residual(strong_1024):
    # calibrate() hands the maps' own residual to cross_validate instead of a second full fit:
    # it must be the figure a full fit of the same holes with the same settings gives
    _, cal = strong_1024
    refit = cross_validate(
        cal.grid.ideal - cal.grid.displacement,
        cal.grid.displacement,
        k=5,
        indices=cal.grid.indices,
        smoothing=cal.maps.smoothing,
        degree=cal.maps.degree,
        order=cal.maps.order,
        scale_px=cal.maps.scale_px,
    )
    assert cal.cross_validation.order == cal.maps.order
    assert cal.cross_validation.in_sample_rms_px == pytest.approx(refit.in_sample_rms_px, rel=1e-6)
    np.testing.assert_allclose(cal.cross_validation.predicted, refit.predicted, atol=1e-9)


def test_calibrate_without_cross_validation(small):
    g, _ = small
    assert calibrate(g.image, cv_folds=0).cross_validation is None
    with pytest.raises(CcdgridError, match="`cv_folds` must be 0, None or an integer >= 2"):
        calibrate(g.image, cv_folds=1)


# -- command line ---------------------------------------------------------------------


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="ccdgrid")
    add_validate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    args.run(args)
    return args


def test_cli_prints_the_summary_and_writes_json(small, tmp_path, capsys):
    g, cal = small
    image, det, out = tmp_path / "grid.npy", tmp_path / "det.h5", tmp_path / "v.json"
    np.save(image, g.image)
    cal.save(det)
    args = run_cli(["validate", str(image), "-d", str(det), "--json", str(out)])
    assert args.debug is False
    text = capsys.readouterr().out
    assert "self-consistency check" in text
    figures = json.loads(out.read_text())
    assert figures["corrected"]["n_holes"] > 100
    assert figures["corrected"]["mean_pitch"] < figures["uncorrected"]["mean_pitch"]
    with pytest.raises(CcdgridError, match="validation failed: mean mis-placement"):
        run_cli(["validate", str(image), "-d", str(det), "--max-mean", "1e-9"])


def test_cli_shares_the_parents_debug_option():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    parser = argparse.ArgumentParser(prog="ccdgrid")
    add_validate_parser(parser.add_subparsers(dest="command"), parents=[common])
    args = parser.parse_args(["validate", "grid.edf", "-d", "det.h5", "--debug", "--frame", "2"])
    assert args.debug is True
    assert args.frame == 2
    assert args.detector == "det.h5"
    with pytest.raises(SystemExit):
        parser.parse_args(["validate", "grid.edf", "-d", "det.h5", "--frame", "-1"])


def test_cli_missing_detector_option():
    with pytest.raises(SystemExit):
        run_cli(["validate", "grid.edf"])
