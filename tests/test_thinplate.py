"""Thin-plate splines: against scipy's RBFInterpolator, the affine fallback, the tiled fit.

Kernel order 3 (``-r⁴ log r``), which scipy does not have, against a dense
solve of its bordered system written here.
"""

import numpy as np
import pytest
from _fine_field import fine_field  # registered by conftest.py
from scipy.interpolate import RBFInterpolator

from ccdgrid import thinplate
from ccdgrid.maps import displacement_maps
from ccdgrid.thinplate import ThinPlate, TiledThinPlate, fit_tps


@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("smoothing", [0.0, 0.05, 10.0])
def test_thin_plate_equals_scipy_rbf_interpolator(degree, smoothing):
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
    rng = np.random.default_rng(21)
    pts = rng.uniform(0.0, 8.0, (120, 2))
    values = rng.normal(0.0, 1.0, (120, 2))
    tps = ThinPlate(pts, values, smoothing, 3, backend)
    scipy_rbf = RBFInterpolator(
        pts, values, kernel="thin_plate_spline", smoothing=smoothing, degree=3
    )
    np.testing.assert_allclose(tps.residual_at_centres(), scipy_rbf(pts) - values, atol=1e-8)
    np.testing.assert_allclose(tps.residual_at_centres(), tps(pts) - values, atol=1e-9)


def test_thin_plate_falls_back_to_an_affine_trend_on_a_few_lines():
    # holes on 3 rows: a quartic trend in y is undetermined
    ys, xs = np.meshgrid([0.0, 1.0, 2.0], np.arange(12.0), indexing="ij")
    pts = np.column_stack([ys.ravel(), xs.ravel()])
    values = np.column_stack([0.1 * pts[:, 1], -0.2 * pts[:, 0]])
    tps, degree = fit_tps(pts, values, 0.0, 4)
    assert degree == 1
    np.testing.assert_allclose(tps(pts), values, atol=1e-9)
    # order 3 needs a quadratic trend: its fallback is the affine thin-plate spline
    tps, degree = fit_tps(pts, values, 0.0, 4, order=3)
    assert (degree, tps.order) == (1, 2)
    np.testing.assert_allclose(tps(pts), values, atol=1e-9)


# -- kernel order 3 ------------------------------------------------------------------


def _bordered_solve(pts, values, smoothing, degree, probe):
    """The order-3 spline at ``probe``, from a dense solve of ``[[K + s I, P], [P', 0]]``.

    ``K_ij = -|p_i - p_j|⁴ log |p_i - p_j|``, ``P`` the monomials up to
    ``degree`` of the raw coordinates: written from the definition, not
    from ccdgrid's reduced system or its scaled monomials.
    """

    def kernel(a, b):
        r = np.hypot(*(a[:, None, :] - b[None, :, :]).transpose(2, 0, 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(r > 0, -(r**4) * np.log(r), 0.0)

    def poly(x):
        return np.column_stack(
            [x[:, 0] ** a * x[:, 1] ** (t - a) for t in range(degree + 1) for a in range(t + 1)]
        )

    n, p = len(pts), (degree + 1) * (degree + 2) // 2
    system = np.zeros((n + p, n + p))
    system[:n, :n] = kernel(pts, pts) + smoothing * np.eye(n)
    system[:n, n:] = poly(pts)
    system[n:, :n] = poly(pts).T
    sol = np.linalg.solve(system, np.vstack([values, np.zeros((p, 2))]))
    return kernel(probe, pts) @ sol[:n] + poly(probe) @ sol[n:]


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("smoothing", [0.0, 0.5, 50.0])
def test_order_3_spline_equals_the_bordered_system(backend, degree, smoothing):
    rng = np.random.default_rng(17)
    pts = rng.uniform(0.0, 6.0, (60, 2))
    values = rng.normal(0.0, 1.0, (60, 2))
    probe = np.vstack([rng.uniform(-1.0, 7.0, (300, 2)), pts[:5]])  # centres too (r = 0)
    tps = ThinPlate(pts, values, smoothing, degree, backend, order=3)
    assert tps.order == 3
    expected = _bordered_solve(pts, values, smoothing, degree, probe)
    np.testing.assert_allclose(tps(probe), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(tps.residual_at_centres(), tps(pts) - values, atol=1e-8)


def test_order_3_needs_a_quadratic_trend():
    pts = np.random.default_rng(3).uniform(0.0, 6.0, (30, 2))
    with pytest.raises(ValueError, match="order 3"):
        ThinPlate(pts, np.zeros((30, 2)), 0.0, 1, order=3)
    with pytest.raises(ValueError, match="order 4"):
        ThinPlate(pts, np.zeros((30, 2)), 0.0, 4, order=4)


def test_order_3_reproduces_a_field_of_a_few_pitches_better_from_exact_samples():
    # interpolation (no smoothing) of exact samples on an 18 x 18 jittered
    # lattice, judged on a dense grid inside it against the analytic field
    rng = np.random.default_rng(5)
    i, j = np.meshgrid(np.arange(18.0), np.arange(18.0), indexing="ij")
    pts = np.column_stack([i.ravel(), j.ravel()]) + rng.normal(0.0, 0.05, (324, 2))
    g = np.linspace(1.0, 16.0, 61)
    probe = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    truth = fine_field(probe)
    error = {}
    for order in (2, 3):
        tps, _ = fit_tps(pts, fine_field(pts), 0.0, 2, order=order)
        error[order] = np.sqrt(np.mean(np.sum((tps(probe) - truth) ** 2, axis=1)))
    # measured: 0.071 px (order 2) and 0.020 px (order 3)
    assert error[3] < 0.4 * error[2]


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
    monkeypatch.setattr(thinplate, "_TILE_CORE", 80)  # 4 x 4 tiles of a 1 250-hole plate
    pts, field, values, rng = _dense_lattice(36, seed=61)
    single = ThinPlate(pts, values, 0.1, 4)
    tiled = TiledThinPlate(pts, values, 0.1, 4)
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


# -- a refit from a previous factor (the same holes after a small move) ---------------


def _plate_holes(rng, n_side=18):
    """A square lattice of unit pitch with 0.02 of jitter, in the fit's unit."""
    ij = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij"), -1)
    return ij.reshape(-1, 2).astype(float) + rng.normal(0.0, 0.02, (n_side * n_side, 2))


def _warped(field_of, pts):
    """Values of a smooth field with a bump at ``pts``: what the maps interpolate."""
    y, x = pts.T
    return (
        np.stack(
            [
                0.3 * np.sin(0.4 * x) + 0.05 * y + np.exp(-((x - 9) ** 2 + (y - 7) ** 2) / 8),
                0.2 * np.cos(0.3 * y) - 0.02 * x * y / 18,
            ],
            axis=1,
        )
        * field_of
    )


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("smoothing", [0.0, 1e-3, 17.8])
@pytest.mark.parametrize("order", [2, 3])
def test_refit_from_a_previous_factor_equals_the_factorised_solve(backend, smoothing, order):
    rng = np.random.default_rng(31)
    old = _plate_holes(rng)
    first = ThinPlate(old, _warped(20.0, old), smoothing, 4, backend, order=order)
    assert first.iterations == 0
    # the plate moved: turned by 20 mdeg, shifted, the distortion seen at
    # other places, each centre measured again with its noise
    angle = np.deg2rad(0.02)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    new = old @ turn.T + (0.034, -0.027) + rng.normal(0.0, 3e-4, old.shape)
    values = _warped(20.0, new + 0.03)
    warm = ThinPlate(new, values, smoothing, 4, backend, factor=first.factor, order=order)
    cold = ThinPlate(new, values, smoothing, 4, backend, order=order)
    # order 3's system is worse conditioned: its float32 factor preconditions
    # it less well (4 iterations measured)
    assert 1 <= warm.iterations <= (3 if order == 2 else 5)
    assert warm.factor is first.factor  # kept for the next refit
    probe = np.vstack([rng.uniform(-1.0, 18.0, (400, 2)), new[:5]])
    # the values fitted differ by at most twice the residual, 1e-9 of |d|
    bound = 2 * thinplate._PCG_RTOL * np.linalg.norm(values)
    assert np.abs(warm(probe) - cold(probe)).max() < bound
    np.testing.assert_allclose(warm.residual_at_centres(), cold.residual_at_centres(), atol=bound)


def test_a_factor_of_other_holes_is_not_used():
    rng = np.random.default_rng(32)
    pts = _plate_holes(rng)
    values = _warped(10.0, pts)
    fewer = ThinPlate(pts[:-1], values[:-1], 1.0, 4)
    other_degree = ThinPlate(pts, values, 1.0, 3)
    other_order = ThinPlate(pts, values, 1.0, 4, order=3)
    assert other_order.factor.order == 3
    cold = ThinPlate(pts, values, 1.0, 4)
    for factor in (fewer.factor, other_degree.factor, other_order.factor):
        tps = ThinPlate(pts, values, 1.0, 4, factor=factor)
        assert tps.iterations == 0
        assert tps.factor is not factor
        np.testing.assert_array_equal(tps.coef, cold.coef)
        np.testing.assert_array_equal(tps.factor.upper, cold.factor.upper)


def test_a_factor_that_does_not_converge_soon_gives_way_to_a_factorisation(monkeypatch):
    rng = np.random.default_rng(33)
    pts = _plate_holes(rng)
    values = _warped(10.0, pts)
    # the same holes under a hundred times the smoothing: a poor preconditioner
    stiff = ThinPlate(pts, values, 1.0, 4)
    cold = ThinPlate(pts, values, 0.01, 4)
    monkeypatch.setattr(thinplate, "_PCG_MAX_ITER", 2)
    tps = ThinPlate(pts, values, 0.01, 4, factor=stiff.factor)
    assert tps.iterations == 0
    assert tps.factor is not stiff.factor
    np.testing.assert_array_equal(tps.coef, cold.coef)
    # with room to converge, the poor preconditioner still gives the solution
    monkeypatch.setattr(thinplate, "_PCG_MAX_ITER", 400)
    slow = ThinPlate(pts, values, 0.01, 4, factor=stiff.factor)
    assert slow.iterations > 3
    bound = 2 * thinplate._PCG_RTOL * np.linalg.norm(values)
    assert np.abs(slow(pts) - cold(pts)).max() < bound


def test_a_refit_of_a_constant_component_takes_no_step():
    rng = np.random.default_rng(34)
    pts = _plate_holes(rng)
    values = _warped(10.0, pts)
    first = ThinPlate(pts, values, 1.0, 4)
    zero = values.copy()
    zero[:, 1] = 0.0  # rhs 0: converged from the start, 0/0 must not give NaN
    tps = ThinPlate(pts + 0.001, zero, 1.0, 4, factor=first.factor)
    assert np.all(np.isfinite(tps.coef))
    assert np.all(tps.coef[:, 1] == 0.0)
    cold = ThinPlate(pts + 0.001, zero, 1.0, 4)
    np.testing.assert_allclose(tps(pts), cold(pts), rtol=0, atol=1e-8)
