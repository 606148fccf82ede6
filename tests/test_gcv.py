"""GCV of the thin-plate smoothing: scores against the explicit smoother matrix, degree choice."""

from dataclasses import replace

import numpy as np
import pytest
from _fine_field import fine_field  # registered by conftest.py
from scipy.interpolate import RBFInterpolator

import ccdgrid.maps
from ccdgrid.cross_validation import cross_validate
from ccdgrid.errors import CcdgridError
from ccdgrid.gcv import (
    GCV_GRID,
    GCV_GRIDS,
    GCV_MAX_POINTS,
    GCV_TILE_POINTS,
    LOCAL_GCV_POINTS,
    MISFIT_NEIGHBOURS,
    MISFIT_Z,
    ORDER3_MARGIN,
    candidate_degrees,
    coherent_misfit,
    gcv_choice,
    gcv_scores,
    gcv_smoothing,
    gcv_subset,
    local_subset,
    reused_gcv_scores,
    spread_subset,
)
from ccdgrid.maps import displacement_maps
from ccdgrid.pipeline import _local_text
from ccdgrid.thinplate import _TILE_ABOVE, ThinPlate


@pytest.mark.parametrize("degrees", [[1, 2, 3, 4], [3], [2, 4]])
def test_gcv_scores_equal_the_explicit_smoother_matrix(degrees):
    # The shared eigendecomposition (lowest degree) with the higher monomials
    # as constraints must give the score of each degree's own smoother H(s),
    # built here column by column by scipy's thin-plate fit of unit vectors.
    rng = np.random.default_rng(11)
    pts = rng.uniform(0.0, 6.0, (45, 2))
    disp = np.column_stack([np.sin(pts[:, 0]), pts[:, 0] * pts[:, 1] / 10]) + rng.normal(
        0.0, 0.05, pts.shape
    )
    scores = gcv_scores(pts, disp, degrees)
    for deg in degrees:
        for k in (3, 15, 24, 33):
            expected = _explicit_score(pts, disp, GCV_GRID[k], deg)
            assert scores[deg][k] == pytest.approx(expected, rel=1e-6)
            # between grid values too
            s = GCV_GRID[k] * 1.3
            assert scores.at(deg, s) == pytest.approx(_explicit_score(pts, disp, s, deg), rel=1e-6)


def _explicit_score(pts, disp, s, deg):
    """GCV score from the smoother matrix H(s), built column by column by scipy."""
    n = len(pts)
    rbf = RBFInterpolator(pts, np.eye(n), kernel="thin_plate_spline", smoothing=s, degree=deg)
    resid = np.eye(n) - rbf(pts).T  # I - H(s)
    return n * np.sum((resid @ disp) ** 2) / np.trace(resid) ** 2


def test_gcv_smoothing_is_the_minimum_between_grid_values():
    # a smooth field plus noise: the minimum lies inside the grid, between two values
    rng = np.random.default_rng(13)
    pts = rng.uniform(0.0, 8.0, (120, 2))
    disp = np.column_stack([np.sin(pts[:, 0]), np.cos(0.7 * pts[:, 1])])
    disp += rng.normal(0.0, 0.05, pts.shape)
    smoothing, scores = gcv_smoothing(pts, disp, 2)
    k = int(np.argmin(scores["score"]))
    assert 0 < k < len(GCV_GRID) - 1
    assert GCV_GRID[k - 1] < smoothing < GCV_GRID[k + 1]
    assert not np.any(np.isclose(smoothing, GCV_GRID, rtol=1e-3))  # not a grid value
    # a minimum of the score computed independently, lower than the grid's
    best = _explicit_score(pts, disp, smoothing, 2)
    assert best < scores["score"][k]
    for step in (0.98, 1.02):
        assert _explicit_score(pts, disp, smoothing * step, 2) > best


def test_gcv_choice_picks_the_degree_with_the_lowest_score():
    rng = np.random.default_rng(12)
    pts = rng.uniform(0.0, 8.0, (90, 2))
    # a cubic trend plus noise: degree 1 and 2 leave structure, 3 and 4 fit it
    disp = np.column_stack([(pts[:, 0] - 4) ** 3 / 20, (pts[:, 1] - 4) ** 3 / 30])
    disp += rng.normal(0.0, 0.01, pts.shape)
    smoothing, scores, degree, _ = gcv_choice(pts, disp, 4, [1, 2, 3, 4])
    best = min(scores["degree_scores"], key=scores["degree_scores"].get)
    assert degree == best
    assert degree >= 3
    assert scores["score"].min() == pytest.approx(scores["degree_scores"][degree])
    assert smoothing == scores["smoothing"][np.argmin(scores["score"])]


def _plate(n, pitch, rng):
    """``n`` x ``n`` holes, ``pitch`` px apart, jittered by 0.05 pitch: (n², 2) float64, px."""
    idx = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    return (idx + 1.0 + rng.normal(0.0, 0.05, idx.shape)) * pitch


@pytest.mark.parametrize("cells", [2, 3])
def test_spread_subset_takes_one_compact_patch_per_cell(cells):
    rng = np.random.default_rng(31)
    pts = _plate(40, 1.0, rng)[rng.permutation(1600)]
    rows = spread_subset(pts, GCV_MAX_POINTS, cells)
    assert len(rows) == GCV_MAX_POINTS
    assert np.array_equal(rows, np.unique(rows))  # sorted, distinct
    # the holes of each cell (equal-count bands in y, then in x) by the same cuts
    per = GCV_MAX_POINTS / cells**2
    band = np.argsort(np.argsort(pts[:, 0], kind="stable"), kind="stable") * cells // 1600
    counts = np.zeros((cells, cells), dtype=np.int64)
    for b in range(cells):
        members = np.flatnonzero(band == b)
        col = np.argsort(np.argsort(pts[members, 1], kind="stable"), kind="stable")
        cell = col * cells // len(members)
        for c in range(cells):
            mine = members[cell == c]
            chosen = np.intersect1d(mine, rows)
            counts[b, c] = len(chosen)
            # a disc around the cell's centroid: radius sqrt(per / pi) pitches, plus the jitter
            dist = np.hypot(*(pts[chosen] - pts[mine].mean(axis=0)).T)
            assert dist.max() <= np.sqrt(per / np.pi) + 1.5
    assert counts.min() >= np.floor(per)
    assert counts.max() <= np.ceil(per)


def test_spread_subset_keeps_every_point_up_to_the_limit():
    pts = _plate(20, 1.0, np.random.default_rng(32))
    np.testing.assert_array_equal(spread_subset(pts, 400), np.arange(400))
    np.testing.assert_array_equal(spread_subset(pts, 500), np.arange(400))


def test_gcv_above_the_limit_chooses_about_what_a_gcv_of_all_holes_chooses():
    # A field varying over the plate (wavelengths 40-52 pitches on a
    # 30-pitch plate): a quartic fitted to the 500 central holes leaves the
    # spline little to follow there, and a GCV on them chose 31.6 pitch²
    # where one on all 900 holes chooses 10 (2 grid steps); patches over the
    # plate hold the trend near the full fit's.
    rng = np.random.default_rng(7)
    pitch = 30.0
    pts = _plate(30, pitch, rng)
    u = pts / pitch
    wl = 40.0
    disp = 2.0 * np.column_stack(
        [
            np.sin(2 * np.pi * u[:, 0] / wl + 1) * np.cos(2 * np.pi * u[:, 1] / (1.3 * wl)),
            np.cos(2 * np.pi * (u[:, 0] + 0.7 * u[:, 1]) / (1.1 * wl) + 0.5),
        ]
    )
    disp += rng.normal(0.0, 0.03, disp.shape)
    maps = displacement_maps(pts, disp, (960, 960), scale_px=pitch)
    assert maps.degree == 4
    # the O(N³) GCV of all holes, with the kernel order the maps chose
    every = int(np.argmin(gcv_scores(u, disp, [4], order=maps.order)[4]))
    chosen = int(np.argmin(np.abs(np.log(GCV_GRIDS[maps.order] / maps.smoothing))))
    assert abs(chosen - every) <= 1
    # cross-validation chooses its smoothing on the same holes
    cv = cross_validate(pts, disp, k=5, scale_px=pitch, max_holes=1)
    assert cv.smoothing == maps.smoothing


def test_gcv_subset_spreads_over_one_tile_of_a_tiled_fit():
    # a single fit: patches over the whole plate; a tiled one (each tile with
    # its own trend): patches over about one tile's holes around the centre
    rng = np.random.default_rng(33)
    small = _plate(40, 1.0, rng)
    assert len(small) <= _TILE_ABOVE
    np.testing.assert_array_equal(gcv_subset(small), spread_subset(small, GCV_MAX_POINTS))
    big = _plate(60, 1.0, rng)
    assert len(big) > _TILE_ABOVE
    rows = gcv_subset(big)
    assert len(rows) == GCV_MAX_POINTS
    dist = np.hypot(*(big - big.mean(axis=0)).T)
    assert dist[rows].max() <= np.sort(dist)[GCV_TILE_POINTS - 1]
    # ...spread over that region, not its centre: a hole in each of its corners
    reach = np.sqrt(GCV_TILE_POINTS / np.pi)  # the region's radius, pitches
    centred = big[rows] - big.mean(axis=0)
    for sy in (-1, 1):
        for sx in (-1, 1):
            quarter = (np.sign(centred[:, 0]) == sy) & (np.sign(centred[:, 1]) == sx)
            assert np.hypot(*centred[quarter].T).max() >= 0.6 * reach


def _bump(pts, centre, sigma, amp):
    """A Gaussian displacement ``amp`` (dy, dx) px at ``centre``, width ``sigma``: (N, 2)."""
    g = np.exp(-np.sum((pts - centre) ** 2, axis=1) / (2 * sigma**2))
    return g[:, None] * np.asarray(amp, dtype=float)


def test_coherent_misfit_finds_a_misfit_neighbours_share_and_not_noise():
    rng = np.random.default_rng(41)
    pts = _plate(40, 1.0, rng)
    noise = rng.normal(0.0, 0.05, pts.shape)
    z, _ = coherent_misfit(pts, noise)
    assert 1.0 < z < MISFIT_Z
    # a bump of 0.3 px over 1.5 pitches, six times the holes' noise
    z, index = coherent_misfit(pts, noise + _bump(pts, (12.3, 27.8), 1.5, (0.3, -0.2)))
    assert z > MISFIT_Z
    assert np.hypot(*(pts[index] - (12.3, 27.8))) < 2.0
    # its noise comes from neighbour differences: a smooth misfit over the
    # whole plate (a trend the fit lacks) is as coherent as a bump
    tilt = 0.01 * (pts - pts.mean(axis=0))
    assert coherent_misfit(pts, noise + tilt)[0] > MISFIT_Z


def test_coherent_misfit_is_not_one_bad_hole():
    # one hole 8 px off is the gross-miss test's business, not a feature
    rng = np.random.default_rng(46)
    pts = _plate(40, 1.0, rng)
    residual = rng.normal(0.0, 0.05, pts.shape)
    residual[777] = (8.0, -5.0)
    assert coherent_misfit(pts, residual)[0] < MISFIT_Z
    # ...but a third of a neighbourhood off is shared
    near = np.argsort(np.hypot(*(pts - pts[777]).T))[:7]
    residual[near] += (0.5, 0.0)
    z, index = coherent_misfit(pts, residual)
    assert z > MISFIT_Z
    assert np.hypot(*(pts[index] - pts[777])) < 2.0


def test_coherent_misfit_judges_the_component_that_has_noise():
    rng = np.random.default_rng(47)
    pts = _plate(30, 1.0, rng)
    residual = np.zeros_like(pts)
    residual[:, 1] = rng.normal(0.0, 0.05, len(pts))
    assert coherent_misfit(pts, residual)[0] < MISFIT_Z
    residual += _bump(pts, (15.0, 15.0), 1.5, (0.0, 0.3))
    assert coherent_misfit(pts, residual)[0] > MISFIT_Z


def test_coherent_misfit_needs_more_holes_than_a_neighbourhood_and_some_noise():
    pts = _plate(3, 1.0, np.random.default_rng(42))
    assert len(pts) < MISFIT_NEIGHBOURS + 1
    assert coherent_misfit(pts, np.ones_like(pts)) == (0.0, 0)
    pts = _plate(10, 1.0, np.random.default_rng(43))
    assert coherent_misfit(pts, np.zeros_like(pts)) == (0.0, 0)


def test_local_subset_is_the_holes_nearest_one_hole():
    pts = _plate(30, 1.0, np.random.default_rng(44))
    rows = local_subset(pts, 37)
    assert len(rows) == LOCAL_GCV_POINTS
    assert np.array_equal(rows, np.unique(rows))
    dist = np.hypot(*(pts - pts[37]).T)
    assert 37 in rows
    assert dist[rows].max() <= np.sort(dist)[LOCAL_GCV_POINTS - 1]
    np.testing.assert_array_equal(local_subset(pts[:100], 5), np.arange(100))


def _bumpy_plate(with_bump, seed=45):
    """1600 holes, 50 px apart, a quadratic field, 0.05 px of noise, and a bump at the centre.

    The bump (2.5 px over 1.5 pitches) lies between the four patches a GCV on
    500 of the holes runs on (one about each quarter's centroid).
    """
    rng = np.random.default_rng(seed)
    pitch = 50.0
    pts = _plate(40, pitch, rng)

    def field(p):
        u = p / 1000.0 - 1.0
        smooth = np.column_stack([3.0 * u[:, 0] * u[:, 1], 2.0 * u[:, 1] ** 2 - u[:, 0]])
        return smooth + (_bump(p, (1025.0, 1025.0), 1.5 * pitch, (2.5, -1.5)) if with_bump else 0)

    disp = field(pts) + rng.normal(0.0, 0.05, pts.shape)
    return pts, disp, field, pitch


def _miss_at_bump(maps, field, radius):
    """Largest |maps - field| px at the pixel corners within ``radius`` px of the bump."""
    ii, jj = np.mgrid[900:1151:5, 900:1151:5]
    near = np.hypot(ii - 0.5 - 1025.0, jj - 0.5 - 1025.0) < radius
    corners = np.column_stack([ii[near] - 0.5, jj[near] - 0.5]).astype(float)
    truth = field(corners)
    got = np.column_stack([maps.dy[ii[near], jj[near]], maps.dx[ii[near], jj[near]]])
    return float(np.abs(got - truth).max())


def test_maps_follow_a_local_feature_that_a_gcv_on_a_subset_misses(monkeypatch):
    pts, disp, field, pitch = _bumpy_plate(with_bump=True)
    assert len(pts) > GCV_MAX_POINTS
    maps = displacement_maps(pts, disp, (2050, 2050), scale_px=pitch)
    local = maps.smoothing_scores["local"]
    assert np.hypot(*(np.array(local[0]["at"]) - 1025.0)) < 2 * pitch
    assert local[0]["z"] > MISFIT_Z
    assert maps.smoothing == local[-1]["smoothing"]
    assert _miss_at_bump(maps, field, 3 * pitch) < 0.3  # 2 px without the check
    # calibrate's summary says so, and where
    y, x = local[0]["at"]
    assert f"lowered for a local misfit, {local[0]['z']:.0f} times" in _local_text(maps)
    assert f"at ({y:.0f}, {x:.0f}) px" in _local_text(maps)
    # without the check, the GCV's smoothing flattens the bump
    monkeypatch.setattr(ccdgrid.maps, "MISFIT_Z", np.inf)
    blind = displacement_maps(pts, disp, (2050, 2050), scale_px=pitch)
    assert "local" not in blind.smoothing_scores
    assert _local_text(blind) == ""
    assert blind.smoothing > 10 * maps.smoothing
    assert _miss_at_bump(blind, field, 3 * pitch) > 1.0


def test_maps_without_a_local_feature_keep_the_gcv_choice(monkeypatch):
    pts, disp, _, pitch = _bumpy_plate(with_bump=False)
    maps = displacement_maps(pts, disp, (2050, 2050), scale_px=pitch)
    assert "local" not in maps.smoothing_scores
    monkeypatch.setattr(ccdgrid.maps, "MISFIT_Z", np.inf)
    blind = displacement_maps(pts, disp, (2050, 2050), scale_px=pitch)
    assert blind.smoothing == maps.smoothing
    np.testing.assert_array_equal(blind.dy, maps.dy)


# -- kernel order ----------------------------------------------------------------------


def _explicit_score_order3(pts, disp, s, deg):
    """GCV score of the order-3 spline from its smoother matrix, column by column."""
    n = len(pts)
    # H(s) e_i: the fit of a unit vector (the spline is tested against its
    # bordered system in test_thinplate.py)
    hat = np.column_stack(
        [ThinPlate(pts, np.column_stack([e, e]), s, deg, order=3)(pts)[:, 0] for e in np.eye(n)]
    )
    resid = np.eye(n) - hat  # I - H(s)
    return n * np.sum((resid @ disp) ** 2) / np.trace(resid) ** 2


@pytest.mark.parametrize("degrees", [[2, 3, 4], [3]])
def test_order_3_gcv_scores_equal_the_explicit_smoother_matrix(degrees):
    rng = np.random.default_rng(11)
    pts = rng.uniform(0.0, 6.0, (45, 2))
    disp = np.column_stack([np.sin(pts[:, 0]), pts[:, 0] * pts[:, 1] / 10]) + rng.normal(
        0.0, 0.05, pts.shape
    )
    scores = gcv_scores(pts, disp, degrees, order=3)
    assert scores.order == 3
    assert scores.grid is GCV_GRIDS[3]
    for deg in degrees:
        for k in (6, 20, 30, 42):
            s = GCV_GRIDS[3][k]
            assert scores[deg][k] == pytest.approx(
                _explicit_score_order3(pts, disp, s, deg), rel=1e-6
            )
        s = GCV_GRIDS[3][25] * 1.3
        assert scores.at(deg, s) == pytest.approx(
            _explicit_score_order3(pts, disp, s, deg), rel=1e-6
        )


def test_order_3_gcv_needs_a_quadratic_trend():
    pts = np.random.default_rng(1).uniform(0.0, 6.0, (40, 2))
    with pytest.raises(ValueError, match="order 3"):
        gcv_scores(pts, np.zeros((40, 2)), [1, 2], order=3)


def test_reused_order_3_scores_scale_as_the_fourth_power():
    # a plate moved by a similarity of scale 1.3: the order-3 projected
    # kernel is the previous one times 1.3⁴ (the order-2 one times 1.3²)
    rng = np.random.default_rng(14)
    pts = rng.uniform(0.0, 8.0, (80, 2))
    angle = 0.3
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 1.3 * pts @ turn.T + (2.0, -1.0)
    disp = np.column_stack([np.sin(moved[:, 0] / 2), np.cos(moved[:, 1] / 3)])
    keep = {}
    gcv_scores(pts, disp, [2, 3, 4], keep=keep)
    gcv_scores(pts, disp, [2, 3, 4], keep=keep, order=3)
    basis = replace(keep["bases"][2], others=(keep["bases"][3],))
    for order in (2, 3):
        again = {}
        reused = reused_gcv_scores(basis, moved, disp, [2, 3, 4], keep=again, order=order)
        assert again["bases"][order].vec is keep["bases"][order].vec  # no new eigenbasis
        fresh = gcv_scores(moved, disp, [2, 3, 4], order=order)
        for deg in (2, 3, 4):
            np.testing.assert_allclose(reused[deg], fresh[deg], rtol=1e-9)


def _lattice(n_side, seed):
    """An ``n_side``² unit lattice jittered by 0.05 pitch, (n², 2) float64, pitches."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(float(n_side)), np.arange(float(n_side)), indexing="ij")
    return np.column_stack([i.ravel(), j.ravel()]) + rng.normal(0.0, 0.05, (n_side**2, 2)), rng


def test_gcv_picks_order_3_for_a_smooth_field_of_a_few_pitches():
    pitch = 40.0
    unit, rng = _lattice(18, seed=5)
    pts = (unit + 1.0) * pitch
    disp = fine_field(unit) + rng.normal(0.0, 0.003, unit.shape)
    _, scores, degree, order = gcv_choice(unit, disp, 4, candidate_degrees(len(unit)))
    assert order == 3
    assert degree >= 2
    assert scores["order_scores"][3] < 0.5 * scores["order_scores"][2]
    # the maps it makes are closer to the field than the thin-plate spline's
    shape = (int(19 * pitch), int(19 * pitch))
    auto = displacement_maps(pts, disp, shape, scale_px=pitch)
    tps = displacement_maps(pts, disp, shape, scale_px=pitch, order=2)
    assert (auto.order, tps.order) == (3, 2)
    g = np.linspace(2 * pitch, 17 * pitch, 46)
    probe = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    truth = fine_field(probe / pitch - 1.0)
    error = {
        m.order: np.sqrt(np.mean(np.sum((m.evaluate(probe) - truth) ** 2, axis=1)))
        for m in (auto, tps)
    }
    assert error[3] < 0.5 * error[2]


@pytest.mark.parametrize("seed", range(4))
def test_gcv_keeps_order_2_where_the_noise_hides_the_field(seed):
    # an affine field under noise: both orders smooth to the trend, with
    # scores within a fraction of a per cent: the thin-plate spline stays
    unit, rng = _lattice(18, seed)
    disp = np.column_stack([0.01 * unit[:, 0], -0.02 * unit[:, 1]])
    disp += rng.normal(0.0, 0.02, unit.shape)
    _, scores, _, order = gcv_choice(unit, disp, 4, candidate_degrees(len(unit)))
    assert order == 2
    low, high = sorted(scores["order_scores"].values())
    assert high < (1 + ORDER3_MARGIN) * low


def test_order_2_with_too_few_holes_for_a_quadratic_trend():
    # 10 holes: only an affine trend has two holes per term, and order 3 needs a quadratic one
    unit, rng = _lattice(4, seed=3)
    unit = unit[:10]
    pts = (unit + 1.0) * 50.0
    disp = fine_field(unit) + rng.normal(0.0, 0.003, unit.shape)
    maps = displacement_maps(pts, disp, (260, 260), scale_px=50.0)
    assert (maps.order, maps.degree) == (2, 1)
    assert list(maps.smoothing_scores["order_scores"]) == [2]
    with pytest.raises(CcdgridError, match="order 3"):
        displacement_maps(pts, disp, (260, 260), scale_px=50.0, order=3, degree=1)
    with pytest.raises(CcdgridError, match="`order`"):
        displacement_maps(pts, disp, (260, 260), scale_px=50.0, order=4)
