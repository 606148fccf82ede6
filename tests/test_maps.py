"""Displacement maps: corner sampling, accuracy, mask, evaluate(), smoothing, bad input."""

import numpy as np
import pytest
from scipy.spatial import Delaunay

from ccdgrid.errors import CcdgridError
from ccdgrid.maps import displacement_maps
from ccdgrid.synthetic import make_distortion

SHAPE = (384, 448)
PITCH = 32.0


@pytest.fixture(params=["tps", "cubic"])
def method(request):
    return request.param


def holes(rng, shape=SHAPE, pitch=PITCH, margin=10.0, jitter=3.0):
    """Jittered lattice points (y, x) covering most of the image (no exact ties with pixels)."""
    ys = np.arange(margin, shape[0] - margin, pitch)
    xs = np.arange(margin, shape[1] - margin, pitch)
    pts = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    return pts + rng.uniform(-jitter, jitter, pts.shape)


def corner_coordinates(shape):
    """Index coordinates (y, x) of every corner, shape (ny + 1, nx + 1, 2)."""
    cy = np.arange(shape[0] + 1) - 0.5
    cx = np.arange(shape[1] + 1) - 0.5
    return np.stack(np.meshgrid(cy, cx, indexing="ij"), axis=-1)


def corner_inside(mask):
    """Corners all of whose 4 adjacent pixels are valid (well inside the hull)."""
    valid = mask == 0
    inner = valid[:-1, :-1] & valid[1:, :-1] & valid[:-1, 1:] & valid[1:, 1:]
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), bool)
    out[1:-1, 1:-1] = inner
    return out


def test_linear_field_is_reproduced_at_the_corners(method):
    # A half-pixel sampling error would show as 0.5 * slope = 0.01 px here.
    rng = np.random.default_rng(0)
    pts = holes(rng)
    a = np.array([[0.7, 0.02, -0.013], [-1.1, 0.009, 0.017]])  # (dy, dx) = c + gy*y + gx*x

    def field(p):
        return a[:, 0] + p @ a[:, 1:].T

    maps = displacement_maps(pts, field(pts), SHAPE, method=method)
    corners = corner_coordinates(SHAPE)
    expected = field(corners.reshape(-1, 2)).reshape(corners.shape)
    inside = corner_inside(maps.mask)
    assert inside.sum() > 0.7 * inside.size
    np.testing.assert_allclose(maps.dy[inside], expected[..., 0][inside], atol=2e-4)
    np.testing.assert_allclose(maps.dx[inside], expected[..., 1][inside], atol=2e-4)


def test_maps_shapes_and_dtypes(method):
    rng = np.random.default_rng(1)
    pts = holes(rng)
    maps = displacement_maps(pts, rng.normal(0, 1, pts.shape), SHAPE, method=method)
    assert maps.dx.shape == maps.dy.shape == (SHAPE[0] + 1, SHAPE[1] + 1)
    assert maps.dx.dtype == maps.dy.dtype == np.float32
    assert maps.mask.shape == SHAPE
    assert maps.mask.dtype == np.int8
    assert np.isfinite(maps.dx).all()
    assert np.isfinite(maps.dy).all()
    assert maps.shape == SHAPE
    assert maps.method == method


@pytest.mark.parametrize(("noise", "bound"), [(0.0, 0.004), (0.02, 0.015)])
def test_accuracy_at_dense_points_against_a_known_field(noise, bound):
    rng = np.random.default_rng(2)
    shape = (512, 512)
    pts = holes(rng, shape=shape, pitch=40.0, margin=8.0, jitter=2.0)
    field = make_distortion(shape, distortion_px=3.0, seed=3)
    disp = field.displacement(pts) + rng.normal(0.0, noise, pts.shape)
    maps = displacement_maps(pts, disp, shape)
    probe = rng.uniform(0, shape[0] - 1, (5000, 2))
    probe = probe[maps.mask[tuple(np.rint(probe).astype(int).T)] == 0]
    err = np.hypot(*(maps.evaluate(probe) - field.displacement(probe)).T)
    # measured: 0.0011 px RMS noise-free, 0.0126 px with 0.02 px noise on the holes
    assert np.sqrt(np.mean(err**2)) < bound
    if noise > 0:
        assert np.sqrt(np.mean(err**2)) < 0.75 * noise * np.sqrt(2)  # smoothing beats the noise


def test_mask_marks_pixels_outside_the_hull():
    rng = np.random.default_rng(3)
    pts = rng.uniform([40, 60], [300, 400], (80, 2))
    maps = displacement_maps(pts, np.zeros_like(pts), SHAPE, method="cubic")
    centres = np.stack(np.meshgrid(*map(np.arange, SHAPE), indexing="ij"), -1).reshape(-1, 2)
    outside = Delaunay(pts).find_simplex(centres.astype(float)) < 0
    np.testing.assert_array_equal(maps.mask.ravel(), outside.astype(np.int8))


def test_hull_margin_grows_and_shrinks_the_valid_area():
    rng = np.random.default_rng(4)
    pts = holes(rng, margin=60.0)
    kwargs = {"method": "cubic"}
    base = displacement_maps(pts, np.zeros_like(pts), SHAPE, **kwargs).mask
    grown = displacement_maps(pts, np.zeros_like(pts), SHAPE, hull_margin=10.0, **kwargs).mask
    shrunk = displacement_maps(pts, np.zeros_like(pts), SHAPE, hull_margin=-10.0, **kwargs).mask
    assert np.all(grown <= base)
    assert np.all(base <= shrunk)
    assert grown.sum() < base.sum() < shrunk.sum()


def test_evaluate_is_bilinear_on_the_corner_grid():
    rng = np.random.default_rng(5)
    pts = holes(rng)
    maps = displacement_maps(pts, rng.normal(0, 1, pts.shape), SHAPE, smoothing=0.1)
    i, j = 100, 200
    # corner (i, j) sits at (i - 0.5, j - 0.5); the pixel centre (i, j) is the mean of 4 corners
    at_corner = maps.evaluate([[i - 0.5, j - 0.5]])[0]
    assert at_corner == pytest.approx([maps.dy[i, j], maps.dx[i, j]], abs=1e-6)
    centre = maps.evaluate([[i, j]])[0]
    mean_dy = maps.dy[i : i + 2, j : j + 2].astype(float).mean()
    mean_dx = maps.dx[i : i + 2, j : j + 2].astype(float).mean()
    assert centre == pytest.approx([mean_dy, mean_dx], abs=1e-6)
    quarter = maps.evaluate([[i - 0.25, j - 0.5]])[0]
    expected = 0.75 * maps.dy[i, j] + 0.25 * maps.dy[i + 1, j]
    assert quarter[0] == pytest.approx(expected, abs=1e-6)


def test_zero_smoothing_interpolates_the_holes():
    rng = np.random.default_rng(6)
    pts = holes(rng)
    disp = rng.normal(0, 0.05, pts.shape)
    exact = displacement_maps(pts, disp, SHAPE, smoothing=0.0)
    assert exact.fit_residual_rms < 1e-8
    smooth = displacement_maps(pts, disp, SHAPE, smoothing=10.0)
    assert smooth.fit_residual_rms > 0.02


def test_gcv_smooths_more_when_the_holes_are_noisier():
    rng = np.random.default_rng(7)
    pts = holes(rng)
    field = make_distortion(SHAPE, distortion_px=2.0, seed=8)
    clean = displacement_maps(pts, field.displacement(pts), SHAPE)
    noisy = displacement_maps(pts, field.displacement(pts) + rng.normal(0, 0.05, pts.shape), SHAPE)
    assert noisy.smoothing > 100 * clean.smoothing
    assert noisy.smoothing_scores["score"].shape == noisy.smoothing_scores["smoothing"].shape


def test_too_few_holes():
    with pytest.raises(CcdgridError, match="too few holes"):
        displacement_maps([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.zeros((3, 2)), SHAPE)


def test_collinear_holes():
    pts = np.column_stack([np.arange(10.0) * 20, np.arange(10.0) * 20])
    with pytest.raises(CcdgridError, match="too few holes"):
        displacement_maps(pts, np.zeros_like(pts), SHAPE)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "linear"}, "method"),
        ({"smoothing": -1.0}, "smoothing"),
        ({"smoothing": "lots"}, "smoothing"),
        ({"coarse_step": 0.0}, "coarse_step"),
        ({"degree": 7}, "degree"),
        ({"scale_px": -2.0}, "scale_px"),
    ],
)
def test_bad_options(kwargs, match):
    rng = np.random.default_rng(9)
    pts = holes(rng)
    with pytest.raises(CcdgridError, match=match):
        displacement_maps(pts, np.zeros_like(pts), SHAPE, **kwargs)


def test_bad_arrays():
    rng = np.random.default_rng(10)
    pts = holes(rng)
    with pytest.raises(CcdgridError, match="one row per point"):
        displacement_maps(pts, np.zeros((3, 2)), SHAPE)
    bad = np.zeros_like(pts)
    bad[0, 0] = np.nan
    with pytest.raises(CcdgridError, match="finite"):
        displacement_maps(pts, bad, SHAPE)
    with pytest.raises(CcdgridError, match="shape"):
        displacement_maps(pts, np.zeros_like(pts), (0, 10))


@pytest.mark.parametrize("degrees", [[1, 2, 3, 4], [3], [2, 4]])
def test_gcv_scores_equal_the_explicit_smoother_matrix(degrees):
    # The shared eigendecomposition (lowest degree) with the higher monomials
    # as constraints must give the score of each degree's own smoother H(s),
    # built here column by column by scipy's thin-plate fit of unit vectors.
    from scipy.interpolate import RBFInterpolator

    from ccdgrid.gcv import GCV_GRID, gcv_scores

    rng = np.random.default_rng(11)
    pts = rng.uniform(0.0, 6.0, (45, 2))
    disp = np.column_stack([np.sin(pts[:, 0]), pts[:, 0] * pts[:, 1] / 10]) + rng.normal(
        0.0, 0.05, pts.shape
    )
    scores = gcv_scores(pts, disp, degrees)
    n = len(pts)
    for deg in degrees:
        for k in (3, 15, 24, 33):
            s = GCV_GRID[k]
            rbf = RBFInterpolator(
                pts, np.eye(n), kernel="thin_plate_spline", smoothing=s, degree=deg
            )
            resid = np.eye(n) - rbf(pts).T  # I - H(s)
            expected = n * np.sum((resid @ disp) ** 2) / np.trace(resid) ** 2
            assert scores[deg][k] == pytest.approx(expected, rel=1e-6)


def test_gcv_choice_picks_the_degree_with_the_lowest_score():
    from ccdgrid.gcv import gcv_choice

    rng = np.random.default_rng(12)
    pts = rng.uniform(0.0, 8.0, (90, 2))
    # a cubic trend plus noise: degree 1 and 2 leave structure, 3 and 4 fit it
    disp = np.column_stack([(pts[:, 0] - 4) ** 3 / 20, (pts[:, 1] - 4) ** 3 / 30])
    disp += rng.normal(0.0, 0.01, pts.shape)
    smoothing, scores, degree = gcv_choice(pts, disp, 4, [1, 2, 3, 4])
    best = min(scores["degree_scores"], key=scores["degree_scores"].get)
    assert degree == best
    assert degree >= 3
    assert scores["score"].min() == pytest.approx(scores["degree_scores"][degree])
    assert smoothing == scores["smoothing"][np.argmin(scores["score"])]


@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("smoothing", [0.0, 0.05, 10.0])
def test_thin_plate_equals_scipy_rbf_interpolator(degree, smoothing):
    from scipy.interpolate import RBFInterpolator

    from ccdgrid.thinplate import ThinPlate

    rng = np.random.default_rng(13)
    pts = rng.uniform(0.0, 8.0, (80, 2))
    values = rng.normal(0.0, 1.0, (80, 2))
    probe = np.vstack([rng.uniform(-1.0, 9.0, (500, 2)), pts[:5]])  # centres too (r = 0)
    ours = ThinPlate(pts, values, smoothing, degree)(probe)
    scipy_rbf = RBFInterpolator(
        pts, values, kernel="thin_plate_spline", smoothing=smoothing, degree=degree
    )
    np.testing.assert_allclose(ours, scipy_rbf(probe), rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("smoothing", [0.0, 0.05, 10.0])
def test_residual_at_centres_is_the_fit_minus_the_values(backend, smoothing):
    from scipy.interpolate import RBFInterpolator

    from ccdgrid.thinplate import ThinPlate

    rng = np.random.default_rng(21)
    pts = rng.uniform(0.0, 8.0, (120, 2))
    values = rng.normal(0.0, 1.0, (120, 2))
    tps = ThinPlate(pts, values, smoothing, 3, backend)
    scipy_rbf = RBFInterpolator(
        pts, values, kernel="thin_plate_spline", smoothing=smoothing, degree=3
    )
    np.testing.assert_allclose(tps.residual_at_centres(), scipy_rbf(pts) - values, atol=1e-8)
    np.testing.assert_allclose(tps.residual_at_centres(), tps(pts) - values, atol=1e-9)


def test_fit_residual_rms_is_the_rms_at_the_holes():
    from scipy.interpolate import RBFInterpolator

    rng = np.random.default_rng(22)
    pts = holes(rng)
    field = make_distortion(SHAPE, distortion_px=3.0, seed=4)
    disp = field.displacement(pts) + rng.normal(0.0, 0.05, pts.shape)
    maps = displacement_maps(pts, disp, SHAPE, smoothing=0.3)
    unit = pts / maps.scale_px
    spline = RBFInterpolator(
        unit, disp, kernel="thin_plate_spline", smoothing=0.3, degree=maps.degree
    )
    rms = np.sqrt(np.mean(np.sum((spline(unit) - disp) ** 2, axis=1)))
    assert maps.fit_residual_rms == pytest.approx(rms, rel=1e-6)
    assert maps.fit_residual_rms > 0.01  # the smoothing removed part of the noise


def test_thin_plate_falls_back_to_an_affine_trend_on_a_few_lines():
    from ccdgrid.thinplate import fit_tps

    # holes on 3 rows: a quartic trend in y is undetermined
    ys, xs = np.meshgrid([0.0, 1.0, 2.0], np.arange(12.0), indexing="ij")
    pts = np.column_stack([ys.ravel(), xs.ravel()])
    values = np.column_stack([0.1 * pts[:, 1], -0.2 * pts[:, 0]])
    tps, degree = fit_tps(pts, values, 0.0, 4)
    assert degree == 1
    np.testing.assert_allclose(tps(pts), values, atol=1e-9)


# -- many holes: the spline fitted tile by tile --------------------------------------


def _dense_lattice(n_side, seed):
    """Holes on an ``n_side``² unit lattice (3 % missing) and a smooth field with noise."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    pts = np.column_stack([i.ravel(), j.ravel()]) + rng.normal(0, 0.02, (n_side**2, 2))
    pts = pts[rng.random(len(pts)) > 0.03]

    def field(p):
        u = (p - n_side / 2) / n_side
        r2 = (u**2).sum(axis=1)
        return np.column_stack(
            [
                3 * u[:, 0] * r2 + 0.3 * np.sin(p[:, 1] / 4),
                3 * u[:, 1] * r2 + 0.2 * np.cos(p[:, 0] / 5),
            ]
        )

    return pts, field, field(pts) + rng.normal(0, 0.02, pts.shape), rng


def test_tiled_spline_is_the_single_spline_to_far_below_the_noise(monkeypatch):
    from ccdgrid import thinplate

    monkeypatch.setattr(thinplate, "_TILE_CORE", 80)  # 4 x 4 tiles of a 1 250-hole plate
    pts, field, values, rng = _dense_lattice(36, seed=61)
    single = thinplate.ThinPlate(pts, values, 0.1, 4)
    tiled = thinplate.TiledThinPlate(pts, values, 0.1, 4)
    assert tiled.shape == (4, 4)
    probe = rng.uniform(0, 35, (5000, 2))  # the plate, tile boundaries included
    diff = tiled(probe) - single(probe)
    # the holes' noise is 0.02: inside the plate the blend of local fits differs
    # from the one fit by a tenth of it at most (at the outermost holes, where
    # both extrapolate a little), a hundredth in RMS, and is as near the truth
    assert np.abs(diff).max() < 4e-3
    assert np.sqrt(np.mean(diff**2)) < 4e-4
    # beyond the outermost holes (masked in the maps) only kept finite and close
    outside = np.column_stack([rng.uniform(-1, 36, 500), rng.uniform(-1, 0, 500)])
    assert np.abs(tiled(outside) - single(outside)).max() < 0.1
    err_single = np.sqrt(np.mean((single(probe) - field(probe)) ** 2))
    err_tiled = np.sqrt(np.mean((tiled(probe) - field(probe)) ** 2))
    assert err_tiled == pytest.approx(err_single, rel=0.01)
    np.testing.assert_allclose(tiled.residual_at_centres(), tiled(pts) - values)
    assert np.abs(tiled.residual_at_centres() - single.residual_at_centres()).max() < 2e-3


def test_blend_weights_are_a_partition_of_unity():
    from ccdgrid import thinplate

    rng = np.random.default_rng(62)
    cuts = np.array([10.0, 25.0, 31.0])
    coord = np.concatenate([rng.uniform(-20, 60, 4000), cuts, cuts + thinplate._TILE_BLEND])
    w = thinplate._blend_weights(coord, cuts)
    assert w.shape == (4, coord.size)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    h = thinplate._TILE_BLEND
    bounds = np.concatenate([[-np.inf], cuts, [np.inf]])
    for t in range(4):
        inside = (coord > bounds[t] + h) & (coord < bounds[t + 1] - h)
        outside = (coord < bounds[t] - h) | (coord > bounds[t + 1] + h)
        assert (w[t, inside] == 1).all()
        assert (w[t, outside] == 0).all()
    assert thinplate._blend_weights(coord, np.zeros(0)).tolist() == [[1.0] * coord.size]


def test_displacement_maps_of_many_holes_are_fitted_by_tiles(monkeypatch):
    from ccdgrid import thinplate

    pts, _, values, _ = _dense_lattice(40, seed=63)
    pitch = 12.0
    shape = (int(41 * pitch), int(41 * pitch))
    one = displacement_maps(pts * pitch + 6, values, shape, smoothing=0.1, scale_px=pitch)
    monkeypatch.setattr(thinplate, "_TILE_ABOVE", 500)
    monkeypatch.setattr(thinplate, "_TILE_CORE", 300)
    tiles = displacement_maps(pts * pitch + 6, values, shape, smoothing=0.1, scale_px=pitch)
    valid = one.mask == 0
    assert valid.mean() > 0.8
    for a, b in ((one.dx, tiles.dx), (one.dy, tiles.dy)):
        assert np.abs(a - b)[:-1, :-1][valid].max() < 2e-3
    assert tiles.fit_residual_rms == pytest.approx(one.fit_residual_rms, rel=0.02)


# -- reuse of a previous fit's GCV eigenbasis (a plate moved a little) ---------------


def _similar(pts, angle, scale, shift):
    """``pts`` (N, 2) turned by ``angle`` rad, scaled and shifted (a similarity)."""
    c, s = np.cos(angle), np.sin(angle)
    return pts @ (scale * np.array([[c, -s], [s, c]])).T + np.asarray(shift)


@pytest.mark.parametrize(
    ("shape", "pitch"),
    [((384, 448), 32.0), ((1024, 1120), 40.0)],  # 168 holes (degree chosen) / 700 (subset)
)
def test_gcv_from_the_previous_eigenbasis_is_exact_for_a_similarity(shape, pitch):
    from ccdgrid.gcv import GCV_MAX_POINTS, candidate_degrees, gcv_choice

    rng = np.random.default_rng(21)
    pts = holes(rng, shape=shape, pitch=pitch)
    field = make_distortion(shape, distortion_px=3.0, seed=4)
    prev = displacement_maps(
        pts, field.displacement(pts) + rng.normal(0, 0.02, pts.shape), shape, scale_px=pitch
    )
    new = _similar(pts, 0.004, 1.0005, (2.5, -1.5))
    disp = field.displacement(new) + rng.normal(0, 0.02, pts.shape)
    warm = displacement_maps(new, disp, shape, scale_px=pitch, previous=prev)
    assert warm.gcv_basis.vec is prev.gcv_basis.vec  # reused, not computed again
    sub = warm.gcv_basis.rows
    assert len(sub) == min(len(pts), GCV_MAX_POINTS)
    # the direct GCV of the new holes (tested against explicit smoother matrices above)
    degrees = candidate_degrees(len(pts)) if len(sub) == len(pts) else None
    smoothing, scores, degree = gcv_choice(new[sub] / pitch, disp[sub], 4, degrees)
    np.testing.assert_allclose(warm.smoothing_scores["score"], scores["score"], rtol=1e-8)
    assert (warm.smoothing, warm.degree) == (smoothing, degree)


def test_gcv_is_computed_again_when_the_holes_are_warped():
    rng = np.random.default_rng(22)
    pts = holes(rng)
    disp = rng.normal(0, 0.05, pts.shape)
    prev = displacement_maps(pts, disp, SHAPE, scale_px=PITCH)
    # 0.05 pitch RMS of non-rigid change: ten times what is reused
    new = pts + rng.normal(0, 0.05 * PITCH / np.sqrt(2), pts.shape)
    warm = displacement_maps(new, disp, SHAPE, scale_px=PITCH, previous=prev)
    fresh = displacement_maps(new, disp, SHAPE, scale_px=PITCH)
    assert warm.gcv_basis.vec is not prev.gcv_basis.vec
    np.testing.assert_array_equal(warm.smoothing_scores["score"], fresh.smoothing_scores["score"])


def test_maps_keep_only_the_gcv_eigenbasis_and_the_points():
    # what a fit keeps for the next one: the eigenvectors of the GCV's
    # projected kernel ((m - p)² float64, m holes in the GCV, p trend terms)
    # and O(m p + N) more, no N² factor of the thin-plate system
    rng = np.random.default_rng(26)
    pts = holes(rng)
    disp = rng.normal(0, 0.05, pts.shape)
    maps = displacement_maps(pts, disp, SHAPE, scale_px=PITCH)
    basis = maps.gcv_basis
    np.testing.assert_array_equal(basis.points, pts)
    np.testing.assert_array_equal(basis.rows, np.arange(len(pts)))  # < 500 holes: all
    m_free = len(pts) - len(basis.tau)
    assert basis.vec.shape == (m_free, m_free)
    arrays = [v for v in vars(basis).values() if isinstance(v, np.ndarray)]
    others = sum(a.nbytes for a in arrays) - basis.vec.nbytes
    # per hole: the 15 monomials of degree <= 4 (base reflectors and the rest
    # in the eigenbasis), points, nodes, row, eigenvalue: 21 float64
    assert others <= 8 * len(pts) * 22
    fixed = displacement_maps(pts, disp, SHAPE, scale_px=PITCH, smoothing=0.1)
    assert fixed.gcv_basis is None  # no GCV: nothing kept


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"previous": "maps.h5"}, "`previous` must be a DisplacementMaps"),
        ({"previous_rows": np.arange(3)}, "`previous_rows` needs `previous`"),
        ({"previous": "self", "previous_rows": np.arange(3)}, "`previous_rows` must be 168"),
        ({"previous": "self", "previous_rows": np.zeros(168, int)}, "must be distinct rows"),
        ({"previous": "self", "previous_rows": np.full(168, -2)}, "must be distinct rows"),
        ({"previous": "self", "previous_rows": np.zeros(168)}, "`previous_rows` must be 168"),
        ({"previous": "self", "previous_rows": np.arange(1, 169)}, "rows of the 168 points"),
    ],
)
def test_bad_previous(kwargs, match):
    rng = np.random.default_rng(25)
    pts = holes(rng)
    assert len(pts) == 168
    disp = rng.normal(0, 0.05, pts.shape)
    if kwargs.get("previous") == "self":
        kwargs = {**kwargs, "previous": displacement_maps(pts, disp, SHAPE)}
    with pytest.raises(CcdgridError, match=match):
        displacement_maps(pts, disp, SHAPE, **kwargs)
