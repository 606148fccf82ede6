"""Peak contrast and the automatic threshold (ccdgrid.holes)."""

import numpy as np
import pytest

from ccdgrid.centres import ProfileFit
from ccdgrid.holes import auto_threshold, classify_fits, ring_background


def _population(rng, radius_cv, n_side=12, pitch=50.0):
    """Fits of a square grid of whole holes whose radii scatter by ``radius_cv``."""
    iy, ix = np.mgrid[0:n_side, 0:n_side]
    centres = 60.0 + pitch * np.column_stack([iy.ravel(), ix.ravel()]).astype(np.float64)
    n = centres.shape[0]
    fields = dict(
        centres=centres,
        radius=6.0 * (1.0 + radius_cv * rng.standard_normal(n)),
        blur=np.full(n, 1.5) + 0.05 * rng.standard_normal(n),
        amplitude=1000.0 * (1.0 + 0.02 * rng.standard_normal(n)),
        background=np.full(n, 100.0),
        chi2=1.0 + 0.05 * rng.standard_normal(n),
        asymmetry=np.abs(0.004 + 0.001 * rng.standard_normal(n)),
        ring_asymmetry=np.abs(2.0 + 0.3 * rng.standard_normal(n)),
        outliers=rng.poisson(3, n).astype(np.int64),
        converged=np.ones(n, dtype=bool),
    )
    return fields


def test_radius_limit_follows_the_scatter_of_this_image_holes():
    # radii scattering by 3 % used to lose the holes 4 % below their
    # neighbours as "cut by edge"; an 18 % smaller hole is still rejected
    rng = np.random.default_rng(22)
    fields = _population(rng, 0.03)
    fields["radius"][[40, 77]] = [6.0 * 0.955, 6.0 * 0.82]
    fit = ProfileFit(**fields)
    reasons = classify_fits(fit, fields["amplitude"])
    assert reasons[40] == ""
    assert reasons[77] in ("cut by edge", "shape")
    assert np.count_nonzero(reasons != "") <= 2


def test_hole_with_a_dropped_side_is_cut_and_a_border_hole_too():
    rng = np.random.default_rng(23)
    fields = _population(rng, 0.01)
    # the fit dropped the dim side as outliers and left a one-sided residual
    fields["outliers"][50] = 80
    fields["asymmetry"][50] = 0.009
    # outliers alone (a missing neighbour beside a whole hole) are not enough
    fields["outliers"][90] = 80
    # a hole whose disc and one blur width (6 + 1.5 px) reach past the image
    # border (which lies half a pixel beyond row 0), and one that fits
    fields["centres"][5, 0] = 6.5
    fields["centres"][6, 0] = 7.5
    fit = ProfileFit(**fields)
    reasons = classify_fits(fit, fields["amplitude"], image_shape=(700, 700))
    assert reasons[50] == "cut by edge"
    assert reasons[90] == ""
    assert reasons[5] == "cut by border"
    assert reasons[6] == ""
    assert classify_fits(fit, fields["amplitude"])[5] == ""


@pytest.mark.parametrize("n_holes", [40, 400])
def test_threshold_between_noise_and_holes(n_holes):
    rng = np.random.default_rng(18)
    noise = rng.normal(0.5, 0.3, 20000)  # log10 contrast of noise peaks
    holes = rng.normal(3.4, 0.08, n_holes)
    hot = rng.uniform(1.8, 2.2, 30)  # hot pixels: between the populations
    thr, hist = auto_threshold(np.concatenate([noise, holes, hot]))
    assert noise.max() < thr < holes.min()
    assert hist.counts.sum() == 20000 + n_holes + 30
    assert hist.threshold == thr


def test_threshold_moves_with_scale():
    rng = np.random.default_rng(19)
    vals = np.concatenate([rng.normal(0.5, 0.3, 5000), rng.normal(3.4, 0.08, 200)])
    t1, _ = auto_threshold(vals)
    t2, _ = auto_threshold(vals + 1.0)
    assert t2 - t1 == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    ("modes", "n_holes"),
    [
        ([(0.1, 0.15, 100), (1.2, 0.2, 60), (2.2, 0.1, 60)], 130),  # few, multimodal noise peaks
        ([(2.4, 0.3, 30)], 100),  # holes are three quarters of the peaks
    ],
)
def test_threshold_finds_holes_when_the_noise_spread_is_spoiled(modes, n_holes):
    # median + 6 MAD of these peaks lies above every hole (the floor used to be
    # returned as is: 0 holes); the gap of >= 0.6 decade below the holes is the threshold
    rng = np.random.default_rng(20)
    noise = np.concatenate([rng.normal(m, s, n) for m, s, n in modes])
    noise = np.minimum(noise, 3.0)
    holes = rng.normal(3.75, 0.08, n_holes).clip(3.6, 3.9)
    thr, _ = auto_threshold(np.concatenate([noise, holes]))
    assert noise.max() < thr < holes.min()


def test_threshold_keeps_the_faint_tail_of_a_clean_vignetted_plate():
    # a clean plate: ten noise peaks (two far below the rest), holes 97 % of
    # the peaks, the corner holes dimmed by vignetting trailing 0.8 decade
    # below the others. The widest gap above the faintest tenth (all holes)
    # had put the threshold inside the tail.
    rng = np.random.default_rng(22)
    noise = np.concatenate([[-1.9, -1.1], rng.uniform(0.4, 1.9, 8)])
    holes = np.concatenate([rng.normal(3.8, 0.06, 270), rng.uniform(3.0, 3.6, 30)])
    thr, _ = auto_threshold(np.concatenate([noise, holes]))
    assert noise.max() < thr < holes.min()


def test_threshold_is_not_put_below_a_few_outliers_when_many_holes_are_expected():
    # holes two thirds of the peaks (the noise spread then holds holes and the
    # floor lies above them all), faint holes cut by the lit area's edge
    # bridging the noise and the holes, and six peaks of saturated blobs 2.5
    # decades above them: the widest weighed gap is below the blobs
    rng = np.random.default_rng(23)
    noise = rng.normal(0.0, 0.5, 1300).clip(-2.0, 0.8)
    cut = rng.uniform(0.5, 1.9, 300)
    holes = rng.normal(2.2, 0.1, 2500).clip(1.9, 2.8)
    blobs = rng.uniform(4.6, 4.8, 6)
    vals = np.concatenate([noise, cut, holes, blobs])
    thr, _ = auto_threshold(vals)
    assert thr > holes.max()  # what the caller's count rules out
    thr, _ = auto_threshold(vals, min_bright=50)
    assert noise.max() < thr < holes.min()


def test_threshold_keeps_a_few_holes_above_the_noise():
    # four holes over a single noise mode: the floor keeps them, no gap search
    rng = np.random.default_rng(21)
    noise = rng.normal(1.0, 0.25, 300)
    holes = np.array([4.1, 4.11, 4.12, 4.13])
    thr, _ = auto_threshold(np.concatenate([noise, holes]))
    assert noise.max() < thr < holes.min()


def test_threshold_is_below_holes_that_are_most_peaks_under_a_few_saturated_ones():
    # a plate of 140 broad holes, two of them saturated, and 15 noise peaks:
    # the widest gap lies below the two, and the threshold went there (2 of
    # 140 holes kept); a gap below many values, nearly as wide, is the holes'
    rng = np.random.default_rng(4)
    noise = np.array([0.9, 1.81, 1.9, 1.93, 1.98, 2.01, 2.1, 2.19, 2.39, 2.66, 2.73, 2.77, 2.86])
    faint = np.array([3.07, 3.1, 3.19, 3.19, 3.21, 3.22])  # holes in the corners
    holes = np.concatenate([faint, rng.normal(3.35, 0.02, 134)])
    saturated = np.array([4.31, 4.31])
    thr, _ = auto_threshold(np.concatenate([noise, holes, saturated]))
    # every hole kept (the faintest noise peaks too: the profile checks judge them)
    assert np.median(noise) < thr < holes.min()


def test_ring_background():
    yy, xx = np.mgrid[0:64, 0:64]
    img = (5.0 + 0.0 * yy).astype(np.float32)
    img[np.hypot(yy - 32, xx - 32) < 4] = 100.0
    med, low, high = ring_background(img, np.array([[32, 32]]), 10.0)
    assert (med[0], low[0], high[0]) == (5.0, 5.0, 5.0)


@pytest.mark.parametrize("n", [8, 7])
def test_ring_background_is_median_min_max_of_ring_samples(n):
    rng = np.random.default_rng(5)
    img = rng.normal(100.0, 10.0, (40, 50)).astype(np.float32)
    peaks = np.array([[20, 25], [0, 0], [39, 49], [5, 30]])
    med, low, high = ring_background(img, peaks, 6.0, n=n)
    ang = np.arange(n) * (2.0 * np.pi / n)
    oy, ox = np.rint(6.0 * np.sin(ang)).astype(int), np.rint(6.0 * np.cos(ang)).astype(int)
    for k, (y, x) in enumerate(peaks):
        ring = img[np.clip(y + oy, 0, 39), np.clip(x + ox, 0, 49)].astype(np.float64)
        assert med[k] == pytest.approx(np.median(ring), rel=1e-6)
        assert (low[k], high[k]) == (ring.min(), ring.max())


@pytest.mark.parametrize("n", [3, 7, 8])
def test_sorting_networks_sort_every_zero_one_input(n):
    # the 0-1 principle: a network that sorts every 0/1 input sorts every input
    from ccdgrid.holes import _sorting_network

    bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    v = [bits[:, k].copy() for k in range(n)]
    for i, j in _sorting_network(n):
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    np.testing.assert_array_equal(np.stack(v, 1), np.sort(bits, axis=1))


def test_background_step_across_the_window_marks_a_cut_hole():
    # a lit edge crossing the window: the step stands far out of this image's
    # spread of ring_step; a whole hole a little above the typical value stays
    rng = np.random.default_rng(24)
    fields = _population(rng, 0.01)
    n = fields["amplitude"].size
    fields["ring_step"] = np.abs(1.4 + 0.3 * rng.standard_normal(n))
    fields["ring_step"][[30, 61]] = [25.0, 3.0]
    reasons = classify_fits(ProfileFit(**fields), fields["amplitude"])
    assert reasons[30] == "cut by edge"
    assert reasons[61] == ""
    assert np.count_nonzero(reasons != "") == 1
    # fits that did not measure it (ring_step None) are judged without it
    del fields["ring_step"]
    assert ProfileFit(**fields).ring_step is None
    assert classify_fits(ProfileFit(**fields), fields["amplitude"])[30] == ""


def _soft_population(rng, n_side=12, pitch=56.0):
    """Fits of Gaussian-like holes: the fitted radius and blur trade off at the noise."""
    fields = _population(rng, 0.0, n_side, pitch)
    n = fields["amplitude"].size
    # a Gaussian of sigma ~3.2 px fits as R ~3.7, s ~2.8: along the valley of
    # equal RMS radius sqrt(R²/2 + 2 s²) the pair scatters by ~10 %
    rms = 4.78 * (1.0 + 0.02 * rng.standard_normal(n))
    fields["radius"] = 3.7 * (1.0 + 0.1 * rng.standard_normal(n))
    fields["blur"] = np.sqrt((rms**2 - 0.5 * fields["radius"] ** 2) / 2.0)
    return fields


def test_soft_holes_are_judged_by_their_rms_radius():
    rng = np.random.default_rng(25)
    fields = _soft_population(rng)
    # R 39 % below the median but the same RMS radius (a clean hole at SNR 9)
    fields["radius"][20], fields["blur"][20] = 2.26, 3.24
    # both R and s small: a smaller object
    fields["radius"][70], fields["blur"][70] = 2.3, 1.6
    reasons = classify_fits(ProfileFit(**fields), fields["amplitude"])
    assert reasons[20] == ""
    assert reasons[70] in ("shape", "cut by edge")
    assert np.count_nonzero(reasons != "") == 1


@pytest.mark.parametrize(("spread", "kept"), [(0.05, True), (0.01, False)])
def test_dimness_limit_follows_the_brightness_scatter(spread, kept):
    # a hole ~12 % dimmer and ~2.5 % smaller than its neighbours: on a plate
    # whose holes scatter by 5 % in brightness it is a whole hole, on one whose
    # holes scatter by 1 % it has lost light to an edge
    rng = np.random.default_rng(26)
    fields = _population(rng, 0.005)
    fields["amplitude"] = 1000.0 * (1.0 + spread * rng.standard_normal(fields["radius"].size))
    fields["amplitude"][50] = 880.0
    fields["radius"][50] = 6.0 * 0.975
    reasons = classify_fits(ProfileFit(**fields), fields["amplitude"])
    assert (reasons[50] == "") is kept


def test_background_plane_tilted_against_its_neighbours_marks_a_cut_hole():
    # a row of holes along a lit edge: each plane tilts towards the light;
    # the whole holes beside them keep the smooth gradient of the background
    rng = np.random.default_rng(27)
    fields = _population(rng, 0.01)
    n = fields["amplitude"].size
    fields["slope"] = np.array([0.8, -0.3]) + 0.05 * rng.standard_normal((n, 2))
    row = np.arange(12 * 11, 12 * 12)  # the last row of the 12 x 12 grid
    fields["slope"][row, 0] += rng.uniform(5.0, 40.0, row.size)
    # a whole hole 15 spreads off: barely touched by some step, kept
    fields["slope"][40, 1] += 15 * 0.05
    reasons = classify_fits(ProfileFit(**fields), fields["amplitude"])
    np.testing.assert_array_equal(np.flatnonzero(reasons != ""), row)
    assert set(reasons[row]) == {"cut by edge"}


def test_moderate_tilt_with_a_one_sided_or_small_disc_marks_a_cut_hole():
    # at a low signal-to-noise ratio a row cut by a lit edge tilts its planes
    # by only ~8 spreads; with a one-sided residual or a small disc it is
    # cut, with neither it is a whole hole the noise tilted
    rng = np.random.default_rng(28)
    fields = _population(rng, 0.01)
    n = fields["amplitude"].size
    fields["slope"] = np.array([0.8, -0.3]) + 0.05 * rng.standard_normal((n, 2))
    spread = 1.4826 * 0.05 * 0.8  # about the robust spread of the tilt norm
    tilted = [30, 31, 32]
    for i in tilted:
        fields["slope"][i, 0] += 9.0 * spread
    fields["asymmetry"][30] = 0.004 + 0.01  # ten spreads one-sided
    fields["radius"][31] = 6.0 * 0.93  # a disc small for the population
    reasons = classify_fits(ProfileFit(**fields), fields["amplitude"])
    assert reasons[30] == "cut by edge"
    assert reasons[31] == "cut by edge"
    assert reasons[32] == ""
    assert np.count_nonzero(reasons != "") == 2


def _low_snr_taper_plate(shear_deg):
    """Worst hole error (px) and worst map error (px) at a peak SNR of ~7, 512² plate."""
    from scipy.spatial import cKDTree

    import ccdgrid
    from ccdgrid.synthetic import dense_residual, grid_image

    g = grid_image(
        (512, 512),
        pitch_px=40,
        hole_diameter_px=8,
        shear_deg=shear_deg,
        seed=7,
        signal=100,
        background=100,
    )
    cal = ccdgrid.calibrate(g.image, pitch=5e-3, cv_folds=0)
    used = np.asarray(cal.holes.peaks)[cal.lattice.valid]
    off = cKDTree(g.holes).query(used)[0]
    return off.max(), dense_residual(g.truth, cal.dy, cal.dx, cal.mask).max


def test_low_snr_holes_cut_by_the_taper_edge_are_not_used():
    # a peak SNR of ~7: the holes of the rows the taper edge cuts through
    # were fitted 0.8-2.1 px off and bent the maps by up to 1.9 px (the
    # reviewer's image, made when the generator's plate was 0.2 degrees from
    # square by default)
    hole_max, map_max = _low_snr_taper_plate(0.2)
    assert hole_max < 0.5
    assert map_max < 0.3


@pytest.mark.xfail(
    strict=True,
    reason="holes.classify_fits: on the same plate made square, two holes the taper edge "
    "cuts at a peak SNR of ~7 are used 2.3 and 1.5 px off (the maps 1.9 px off there): "
    "the tilt-and-asymmetry rule catches about half of such holes",
)
def test_low_snr_holes_cut_by_the_taper_edge_of_a_square_plate_are_not_used():
    hole_max, map_max = _low_snr_taper_plate(0.0)
    assert hole_max < 0.5
    assert map_max < 0.3


def test_holes_in_windows_the_border_clips_are_judged_against_each_other():
    # whole holes whose windows the border clips show a background step 3-4
    # times the others' (the model's misfit weighs more in fewer background
    # pixels); one of them has a real step, ten times theirs
    rng = np.random.default_rng(24)
    fields = _population(rng, 0.01)
    centres = fields["centres"]
    clipped = (centres < 70.0).any(axis=1)  # the first row and column
    fields["ring_step"] = np.where(clipped, 8.0, 2.0) * (1 + 0.1 * rng.standard_normal(144))
    fields["ring_step"][12] = 80.0  # a clipped hole (row 1, column 0)
    fit = ProfileFit(**fields)
    reasons = classify_fits(fit, fields["amplitude"], image_shape=(700, 700), window=70)
    assert clipped[12]
    assert reasons[12] == "cut by edge"
    assert np.count_nonzero(reasons != "") == 1
    # judged against all holes, the clipped ones would be rejected
    alone = classify_fits(fit, fields["amplitude"], image_shape=(700, 700))
    assert (alone[clipped] == "cut by edge").all()


def test_neighbour_medians_kept_for_one_mask_are_found_again_for_another():
    from ccdgrid.holes import _neighbour_median, _Neighbours

    rng = np.random.default_rng(41)
    centres = rng.uniform(0, 500, (300, 2))
    values = rng.normal(0, 1, (300, 2))
    near = _Neighbours(centres)
    masks = [rng.random(300) > 0.2 for _ in range(2)]
    for good in (masks[0], masks[0], masks[1], masks[0]):
        got = _neighbour_median(centres, values, good, near=near)
        # brute force: the 6 nearest good points other than the point itself
        dist = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
        dist[:, ~good] = np.inf
        np.fill_diagonal(dist, np.inf)
        nearest = np.argsort(dist, axis=1)[:, :6]
        np.testing.assert_array_equal(got, np.median(values[nearest], axis=1))


def test_no_more_candidates_than_holes_the_image_holds_are_all_kept():
    # a smoothing disc as wide as large holes leaves few regions besides
    # the holes (fuzz seed 357: 51 candidates on a 1024² plate of a 150 px
    # pitch, 0.6 decade apart under vignetting, one brighter by 0.3
    # decade): the gap below the bright one was taken for the holes'
    rng = np.random.default_rng(357)
    holes = np.sort(rng.uniform(2.14, 2.43, 50))
    vals = np.concatenate([holes, [2.76]])
    thr, _ = auto_threshold(vals, min_bright=1.0)
    assert np.count_nonzero(vals > thr) < 6  # unaided: one hole kept
    thr, _ = auto_threshold(vals, min_bright=1.0, max_holes=74.0)
    assert thr < vals.min()
    # more candidates than the image holds: the noise statistics decide
    noise = rng.normal(0.5, 0.25, 400)
    thr, _ = auto_threshold(np.concatenate([noise, holes]), min_bright=1.0, max_holes=74.0)
    assert noise.max() < thr < holes.min()
