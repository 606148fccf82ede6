"""Blurred-disc profile fit (ccdgrid.centres) on single holes with known centres."""

import numpy as np
import pytest
from scipy import ndimage

from ccdgrid.centres import _clipped_windows, _median3, fit_hole_profiles, windowed_centroids


def holes_image(centres, shape=(64, 400), radius=5.0, sigma=0.9, amp=3000.0, bg=200.0):
    """Sum of anti-aliased discs (16x16 supersampling) blurred by a Gaussian."""
    sub = (np.arange(16) + 0.5) / 16 - 0.5
    cover = np.zeros(shape)
    for yc, xc in centres:
        iy, ix = round(yc), round(xc)
        oy, ox = np.mgrid[-8:9, -8:9]
        py, px = iy + oy, ix + ox
        fy = py[..., None, None] + sub[:, None] - yc
        fx = px[..., None, None] + sub[None, :] - xc
        cover[py, px] += (np.hypot(fy, fx) < radius).mean(axis=(2, 3))
    return ndimage.gaussian_filter(cover, sigma) * amp + bg


@pytest.fixture(scope="module")
def row_of_holes():
    rng = np.random.default_rng(11)
    centres = np.stack(
        [32 + rng.uniform(-0.5, 0.5, 12), 20 + 30 * np.arange(12) + rng.uniform(-0.5, 0.5, 12)], 1
    )
    return holes_image(centres), centres


def test_noise_free_centres(row_of_holes):
    img, centres = row_of_holes
    fit = fit_hole_profiles(img, np.rint(centres), 5.0, half=10)
    # erfc edge vs exact blurred disc: a small pixel-phase error remains
    np.testing.assert_allclose(fit.centres, centres, atol=0.01)
    np.testing.assert_allclose(fit.radius, 5.0, atol=0.15)
    assert fit.converged.all()
    np.testing.assert_allclose(fit.background, 200.0, rtol=0.02)


def test_poisson_noise_matches_best_case_centroid(row_of_holes):
    # isolated holes on a flat background: the centroid's best case (both ~0.011 px)
    img, centres = row_of_holes
    rng = np.random.default_rng(12)
    errs, base = [], []
    for _ in range(4):
        noisy = rng.poisson(img).astype(np.float64)
        fit = fit_hole_profiles(noisy, centres + 0.4, 5.0, half=10)
        errs.append(fit.centres - centres)
        base.append(windowed_centroids(noisy, centres, 10) - centres)
    fit_rms = np.sqrt((np.concatenate(errs) ** 2).sum(1).mean())
    base_rms = np.sqrt((np.concatenate(base) ** 2).sum(1).mean())
    assert fit_rms < 0.02
    assert fit_rms < 1.15 * base_rms


def test_hot_pixel_does_not_move_the_centre(row_of_holes):
    img, centres = row_of_holes
    spoiled = img.copy()
    iy, ix = np.rint(centres[3]).astype(int)
    spoiled[iy + 4, ix - 5] = 65535.0  # on the edge, where it pulls hardest
    clean = fit_hole_profiles(img, centres, 5.0, half=10)
    fit = fit_hole_profiles(spoiled, centres, 5.0, half=10)
    assert abs(fit.centres[3] - clean.centres[3]).max() < 0.01
    assert fit.outliers[3] >= 1
    shift = windowed_centroids(spoiled, centres, 10)[3] - windowed_centroids(img, centres, 10)[3]
    assert abs(shift).max() > 0.5  # the baseline is thrown off


def test_masked_pixels_are_ignored(row_of_holes):
    img, centres = row_of_holes
    spoiled = img.copy()
    iy, ix = np.rint(centres[5]).astype(int)
    valid = np.ones(img.shape, bool)
    valid[iy - 1 : iy + 2, ix + 3 : ix + 7] = False
    spoiled[~valid] = 0.0
    fit = fit_hole_profiles(spoiled, centres, 5.0, half=10, valid=valid)
    np.testing.assert_allclose(fit.centres[5], centres[5], atol=0.02)


def test_per_hole_window_sizes(row_of_holes):
    img, centres = row_of_holes
    halves = np.where(np.arange(12) % 2 == 0, 10, 8)
    fit = fit_hole_profiles(img, centres, 5.0, half=halves)
    np.testing.assert_allclose(fit.centres, centres, atol=0.015)


def test_median3_matches_numpy():
    rng = np.random.default_rng(13)
    for values in (rng.normal(size=(7, 12, 12)), rng.integers(0, 3, (7, 12, 12)).astype(float)):
        ref = np.median(
            np.stack(
                [values[:, dy : dy + 10, dx : dx + 10] for dy in range(3) for dx in range(3)]
            ),
            axis=0,
        )
        np.testing.assert_array_equal(_median3(values), ref)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_background_step_across_a_window_shows_in_ring_step(row_of_holes, backend):
    # a lit-area edge 9 px from hole 4: the background drops from 200 to 20
    # beyond it (the hole itself stays whole); the step inflates that hole's
    # own noise estimate, but not ring_step, which uses the typical noise
    img, centres = row_of_holes
    rng = np.random.default_rng(14)
    cut = img.copy()
    xs = np.arange(img.shape[1])
    edge = centres[4, 1] + 9.0
    cut[:, xs > edge] -= 180.0
    cut = rng.poisson(np.maximum(cut, 0.0)).astype(np.float64)
    fit = fit_hole_profiles(cut, centres, 5.0, half=10, backend=backend)
    others = np.delete(fit.ring_step, [4, 5])  # hole 5 lies beyond the edge
    assert fit.ring_step[4] > 2.0 * others.max()
    assert fit.ring_step[4] > 8.0 * np.median(others)
    # the hole's own noise units hide the step (what ring_step is for)
    assert fit.ring_asymmetry[4] < 2.0 * np.median(fit.ring_asymmetry)


def _warm(img, centres, backend="cython", **kw):
    """A warm fit: previous shape per hole, seeds a few hundredths of a pixel off."""
    rng = np.random.default_rng(21)
    seeds = centres + rng.uniform(-0.05, 0.05, centres.shape)
    shape = (np.full(len(centres), 5.0), np.full(len(centres), 0.9))
    kw = {"half": 10, "start_shape": shape, "median_pass": False, "iterations": (1, 2), **kw}
    return fit_hole_profiles(img, seeds, 4.0, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_warm_fit_matches_the_cold_fit(row_of_holes, backend):
    img, centres = row_of_holes
    rng = np.random.default_rng(22)
    noisy = rng.poisson(img).astype(np.float64)
    cold = fit_hole_profiles(noisy, centres, 5.0, half=10, backend=backend)
    warm = _warm(noisy, centres, backend)
    np.testing.assert_allclose(warm.centres, cold.centres, atol=2e-3)
    np.testing.assert_allclose(warm.radius, cold.radius, rtol=1e-3)
    # its noise model comes from raw residuals, not the median-filtered
    # model's: the same within the misfit of the variance law
    assert 0.8 < np.median(warm.chi2) < 1.5
    assert warm.converged.all()
    assert warm.ring_step is None  # measured on the median-filtered windows only
    assert warm.slope.shape == (12, 2)


def test_warm_fit_backends_agree(row_of_holes):
    img, centres = row_of_holes
    noisy = np.random.default_rng(23).poisson(img).astype(np.float64)
    got, ref = _warm(noisy, centres), _warm(noisy, centres, "numpy")
    for name in ("centres", "radius", "blur", "amplitude", "chi2", "asymmetry"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(got.outliers, ref.outliers)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_warm_fit_ignores_hot_and_masked_pixels(row_of_holes, backend):
    img, centres = row_of_holes
    clean = _warm(img, centres, backend)
    spoiled = img.copy()
    iy, ix = np.rint(centres[3]).astype(int)
    spoiled[iy + 4, ix - 5] = 65535.0  # on the edge, where it pulls hardest
    iy, ix = np.rint(centres[5]).astype(int)
    valid = np.ones(img.shape, bool)
    valid[iy - 1 : iy + 2, ix + 3 : ix + 7] = False
    spoiled[~valid] = 0.0
    fit = _warm(spoiled, centres, backend, valid=valid)
    assert abs(fit.centres[3] - clean.centres[3]).max() < 0.01
    assert fit.outliers[3] >= 1
    np.testing.assert_allclose(fit.centres[5], centres[5], atol=0.02)
    np.testing.assert_allclose(fit.centres, centres, atol=0.02)


def test_warm_fit_without_a_shape_starts_from_a_sample(row_of_holes):
    # no start_shape: a sample's fitted shape starts all (here 12 holes:
    # too few for a sample, the guess itself); still the same centres
    img, centres = row_of_holes
    fit = fit_hole_profiles(img, centres, 5.0, half=10, median_pass=False, iterations=(3, 3))
    np.testing.assert_allclose(fit.centres, centres, atol=0.015)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((np.ones(3), np.ones(12)), "one per seed"),
        ((5.0, -1.0), "positive finite"),
        ((np.nan, 1.0), "positive finite"),
        (5.0, "radius, blur"),
    ],
)
def test_bad_start_shape(row_of_holes, shape, match):
    from ccdgrid.errors import CcdgridError

    img, centres = row_of_holes
    with pytest.raises(CcdgridError, match=match):
        fit_hole_profiles(img, centres, 5.0, half=10, start_shape=shape)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("tail", [0.0, 0.3])
def test_window_clipped_by_the_image_border(backend, tail):
    # holes 6.6-9 px from the top border and one in the corner, fitted in
    # windows of half width 10 that the border cuts; with a wide PSF tail the
    # disc model misfits alike on every side, and the symmetric cut keeps the
    # background plane from taking it up on one side only
    centres = np.array(
        [[6.6, 40.3], [7.4, 80.6], [9.1, 120.2], [7.2, 7.3], [32.4, 160.7], [31.8, 200.2]]
    )
    img = holes_image(centres) + holes_image(centres, sigma=3.0, amp=3000.0 * tail, bg=0.0)
    fit = fit_hole_profiles(img, np.rint(centres) + 0.3, 5.0, half=10, backend=backend)
    assert fit.converged.all()
    # a window cut on one side only moved the corner hole by 0.012 px
    np.testing.assert_allclose(fit.centres, centres, atol=0.008)
    np.testing.assert_allclose(fit.radius[:4], fit.radius[4], atol=0.05)


def test_clipped_windows_leave_out_the_mirror_of_the_missing_pixels():
    img = np.arange(400.0).reshape(20, 20)
    valid = np.ones(img.shape, bool)
    valid[3, 6] = False
    win, ok = _clipped_windows(img, np.array([[2, 4], [10, 10]]), 4, valid)
    assert win.shape == (2, 9, 9)
    assert ok.shape == (2, 9, 9)
    # rows 2-4 above the centre are off the image, and their mirrors below
    expect = np.zeros((9, 9), bool)
    expect[2:7] = True
    expect[5, 6] = False  # the invalid pixel (3, 6)
    np.testing.assert_array_equal(ok[0], expect)
    np.testing.assert_array_equal(win[0][2:7], img[0:5, 0:9])
    assert ok[1].all()
    np.testing.assert_array_equal(win[1], img[6:15, 6:15])


def test_many_seeds_are_fitted_in_bounded_chunks(row_of_holes, monkeypatch):
    # a noisy plate searched in the wrong polarity sent 17 000 seeds in 31 px
    # windows to one fit (1.1 GB): above _FIT_PIXELS they go by chunks, each
    # with its own population start, and whole holes come out the same
    from ccdgrid import centres as C

    img, centres = row_of_holes
    rng = np.random.default_rng(3)
    noisy = rng.poisson(img).astype(np.float64)
    whole = fit_hole_profiles(noisy, np.rint(centres), 5.0, half=10)
    calls = []
    group = C._fit_group
    monkeypatch.setattr(C, "_fit_group", lambda *a: calls.append(len(a[1])) or group(*a))
    monkeypatch.setattr(C, "_FIT_PIXELS", 6 * C._disc_offsets(10)[2].size)
    chunked = fit_hole_profiles(noisy, np.rint(centres), 5.0, half=10)
    assert calls[:2] == [6, 6]
    assert chunked.converged.all()
    np.testing.assert_allclose(chunked.centres, whole.centres, atol=5e-3)  # noise: 0.011
    np.testing.assert_allclose(chunked.radius, whole.radius, atol=2e-2)
