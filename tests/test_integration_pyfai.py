"""ccdgrid's detector file where it is used: pyFAI's azimuthal integration.

A powder image is rendered through the exact distortion of a synthetic grid
image (1024², "strong" preset: 10 px peak), calibrated by ccdgrid from that
grid image, and integrated by pyFAI with three detectors: regular, ccdgrid's
file (loaded by ``pyFAI.detector_factory``) and the exact truth. The beam
centre is fitted for each detector (:func:`ccdgrid._powder.fit_beam_centre`).
Measured on this case (seed 2): ccdgrid's ring radii within 0.012 px of the
truth's, widths within 0.05 %; the regular detector's outer ring is 17 %
wider and 1 px off. The bounds below leave a margin of 4x or more on these.
"""

import numpy as np
import pytest

pytest.importorskip("pyFAI")

import pyFAI

import ccdgrid
from ccdgrid import _powder
from ccdgrid.synthetic import grid_image

SIZE = 1024
PITCH = 5e-3
SEED = 2
# ccdgrid's maps are accurate to ~0.02 px RMS at the holes (cross-validated)
# and a ring averages them over thousands of pixels: its radius error is the
# scale error of the fitted lattice, measured 0.012 px at r = 409 px.
RADIUS_TOL_PX = 0.05
WIDTH_TOL = 0.02  # relative; the regular detector is 17 % off on the outer ring
HARNESS_TOL_PX = 0.01  # truth detector vs the rendered radii (fit error ~0.001 px)


@pytest.fixture(scope="module")
def scene():
    grid = grid_image((SIZE, SIZE), distortion="strong", seed=SEED)
    pixel_size = _powder.truth_pixel_size(grid.lattice, PITCH)
    half = 0.5 * (SIZE - 1)
    setup = _powder.PowderSetup(
        shape=(SIZE, SIZE),
        pixel_size=pixel_size,
        centre=(half + 13.3, half - 7.9),
        radii_px=(0.2 * half, 0.5 * half, 0.8 * half),
    )
    image = _powder.render_powder(setup, grid.truth, supersample=3, seed=SEED)
    # the same pixels for every detector; the rings lie inside the lit taper
    mask = ~grid.taper_mask
    return grid, setup, image, mask


def _rings(scene, detector):
    _, setup, image, mask = scene
    poni = _powder.fit_beam_centre(image, detector, setup, mask=mask)
    r, inten = _powder.integrate_rings(image, detector, setup, poni=poni, mask=mask)
    return _powder.fit_rings(r, inten, setup), poni


@pytest.fixture(scope="module", params=["cython", "numpy"])
def calibrated(request, scene, tmp_path_factory):
    grid = scene[0]
    cal = ccdgrid.calibrate(grid.image, pitch=PITCH, backend=request.param, cv_folds=0)
    path = tmp_path_factory.mktemp(f"det-{request.param}") / "ccdgrid.h5"
    cal.save(str(path))
    fit, _ = _rings(scene, pyFAI.detector_factory(str(path)))
    return cal, fit


@pytest.fixture(scope="module")
def truth_fit(scene):
    grid, setup = scene[:2]
    return _rings(scene, _powder.truth_detector(grid.truth, setup.shape, setup.pixel_size))


@pytest.fixture(scope="module")
def regular_fit(scene):
    setup = scene[1]
    return _rings(scene, _powder.regular_detector(setup.shape, setup.pixel_size))[0]


def _width_ratio(fit, truth):
    return fit.fwhm_px / truth.fwhm_px


def test_truth_detector_recovers_rendered_rings(scene, truth_fit):
    # the harness itself: exact detector, rendered centre and radii
    setup = scene[1]
    fit, poni = truth_fit
    np.testing.assert_allclose(fit.radius_px, setup.radii_px, atol=HARNESS_TOL_PX)
    np.testing.assert_allclose(
        np.array(poni) / setup.unit_m, np.array(setup.poni) / setup.unit_m, atol=HARNESS_TOL_PX
    )


def test_ccdgrid_ring_radii_match_truth(calibrated, truth_fit):
    _, fit = calibrated
    np.testing.assert_allclose(fit.radius_px, truth_fit[0].radius_px, atol=RADIUS_TOL_PX)


def test_ccdgrid_ring_widths_match_truth(calibrated, truth_fit):
    _, fit = calibrated
    np.testing.assert_allclose(_width_ratio(fit, truth_fit[0]), 1.0, atol=WIDTH_TOL)


def test_regular_detector_rings_are_wider(calibrated, truth_fit, regular_fit):
    _, fit = calibrated
    regular = regular_fit
    ratio = _width_ratio(regular, truth_fit[0])
    # the outer ring crosses the strongest non-radial part of the field
    assert ratio[-1] > 1.0 + 4 * WIDTH_TOL
    assert ratio[-1] > _width_ratio(fit, truth_fit[0])[-1] + 3 * WIDTH_TOL
    assert np.max(np.abs(regular.radius_px - truth_fit[0].radius_px)) > 4 * RADIUS_TOL_PX


@pytest.mark.parametrize("error", ["sign", "swapped_axes"])
def test_wrong_maps_are_caught(scene, truth_fit, error):
    # negative controls: the exact maps with d's sign flipped (measured: outer ring 68 %
    # wider, radii 1-2 px off) or dy/dx swapped (30 % wider, 0.5-1 px off) fail both
    # bounds, so a detector file with these errors would fail the tests above. A sampling
    # offset of the maps (half a pixel, even one) changes d by 0.5-1 x its gradient,
    # ~0.01 px here: below what a ring shows; the detector-file tests own that check.
    grid, setup = scene[:2]
    dy, dx = grid.truth.corner_maps(setup.shape)
    dy, dx = (-dy, -dx) if error == "sign" else (dx, dy)
    det = _powder.regular_detector(setup.shape, setup.pixel_size)
    det.set_dy(dy)
    det.set_dx(dx)
    wrong, _ = _rings(scene, det)
    truth = truth_fit[0]
    assert np.max(np.abs(_width_ratio(wrong, truth) - 1.0)) > 4 * WIDTH_TOL
    assert np.max(np.abs(wrong.radius_px - truth.radius_px)) > 4 * RADIUS_TOL_PX
