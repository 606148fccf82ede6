"""Pixel-to-hole error of the affine grid model (ccdgrid.hole_error), every engine.

Everything here is in (x, y) order, as in the module. Tolerances: residuals
of the two engines are compared exactly (same operations, same order); sums
differ only by summation order, so values agree to 1e-12 relative and
gradient components to 1e-12 of the sum of their terms' magnitudes; finite
differences to 1e-6 relative.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from ccdgrid._ext import _grid_error as _kernel
from ccdgrid.errors import CcdgridError
from ccdgrid.hole_error import grid_error, grid_error_value

BACKENDS = ["cython", "numpy"]

# The tutorial's order: (Ox, Oy, Xx, Yx, Xy, Yy), R = [[Xx, Yx], [Xy, Yy]].
P_TRUE = np.array([734.2, 1181.7, 98.3, 1.2, -0.8, 97.6])


def _available_paths():
    paths = []
    for name in ("avx512", "avx2", "baseline", "scalar"):
        try:
            previous = _kernel._select_isa(name)
        except ValueError:
            continue
        _kernel._select_isa(previous)
        paths.append(name)
    return paths


PATHS = _available_paths()


@pytest.fixture(params=PATHS)
def isa(request):
    """Run the Cython kernel through one of its code paths, then restore the default."""
    previous = _kernel._select_isa(request.param)
    yield request.param
    _kernel._select_isa(previous)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def direct(P, points):
    """The tutorial's objective, written independently with np.linalg.inv."""
    R = np.array([[P[2], P[3]], [P[4], P[5]]])
    u = (points - P[:2]) @ np.linalg.inv(R).T
    frac = u - np.round(u)
    return float((frac**2).sum()), frac


def lattice_points(rng, P, n, max_frac=0.3):
    """Points whose hole coordinates are integers plus offsets in (-max_frac, max_frac)."""
    holes = rng.integers(-10, 11, (n, 2)) + rng.uniform(-max_frac, max_frac, (n, 2))
    R = np.array([[P[2], P[3]], [P[4], P[5]]])
    return holes @ R.T + P[:2]


def test_value_and_residuals_match_the_direct_formula(backend):
    rng = np.random.default_rng(31)
    points = lattice_points(rng, P_TRUE, 500, max_frac=0.45)
    value, _, res = grid_error(P_TRUE, points, residuals=True, backend=backend)
    expected_value, expected_res = direct(P_TRUE, points)
    assert value == pytest.approx(expected_value, rel=1e-12)
    np.testing.assert_allclose(res, expected_res, rtol=0, atol=1e-12)
    assert grid_error_value(P_TRUE, points, backend=backend) == value


def test_gradient_matches_central_finite_differences(backend):
    rng = np.random.default_rng(32)
    points = lattice_points(rng, P_TRUE, 300, max_frac=0.3)
    P = P_TRUE + np.array([0.3, -0.2, 0.01, -0.02, 0.015, 0.01])
    _, grad = grid_error(P, points, backend=backend)
    step = 1e-6 * np.maximum(np.abs(P), 1.0)
    numeric = np.empty(6)
    for i in range(6):
        dp = np.zeros(6)
        dp[i] = step[i]
        numeric[i] = (direct(P + dp, points)[0] - direct(P - dp, points)[0]) / (2 * step[i])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9 * np.abs(numeric).max())


def test_engines_agree(isa):
    rng = np.random.default_rng(33)
    points = rng.uniform(-50, 2100, (20_000, 2))  # some near half-way: same rounding needed
    P = np.array([10.5, -3.25, 97.1, 2.3, -1.7, 98.9])
    value, grad, res = grid_error(P, points, residuals=True, backend="cython")
    ref_value, ref_grad, ref_res = grid_error(P, points, residuals=True, backend="numpy")
    np.testing.assert_array_equal(res, ref_res)
    assert value == pytest.approx(ref_value, rel=1e-12)
    # Each gradient component is a sum of signed terms; bound its rounding by
    # the sum of the magnitudes of those terms.
    inv = np.abs(np.linalg.inv(np.array([[P[2], P[3]], [P[4], P[5]]])))
    u = np.abs((points - P[:2]) @ np.linalg.inv([[P[2], P[3]], [P[4], P[5]]]).T)
    scale = 2 * inv.sum() * (np.abs(res).sum() + (np.abs(res)[:, :, None] * u[:, None, :]).sum())
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-12 * scale)


def test_gradient_is_the_same_with_and_without_residuals(backend):
    rng = np.random.default_rng(34)
    points = lattice_points(rng, P_TRUE, 100)
    value, grad = grid_error(P_TRUE, points, backend=backend)
    value2, grad2, _ = grid_error(P_TRUE, points, residuals=True, backend=backend)
    assert value == value2
    np.testing.assert_array_equal(grad, grad2)


def test_half_way_points_round_half_to_even(backend):
    identity = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    big = 2.0**51  # from here on the baseline path's shortcut rounding is not exact
    points = np.array([[0.5, 1.5], [2.5, -0.5], [-1.5, 3.25], [big + 0.5, big + 1.5]])
    _, _, res = grid_error(identity, points, residuals=True, backend=backend)
    np.testing.assert_array_equal(res, [[0.5, -0.5], [0.5, -0.5], [0.5, 0.25], [0.5, -0.5]])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 8191, 8192, 8193, 20_003])
def test_every_code_path_matches_the_numpy_twin(isa, n):
    """Vector widths, tails and block boundaries; residuals bit for bit."""
    rng = np.random.default_rng(n)
    # R^-1 = diag(1/2, 1/4) is exact: points on a quarter-pixel raster give
    # exact half-way hole coordinates, where rounding half to even matters.
    P = np.array([-40.5, 17.25, 2.0, 0.0, 0.0, 4.0])
    points = rng.uniform(-100, 2200, (n, 2))
    points[: (n + 1) // 2] = np.round(points[: (n + 1) // 2] * 4) / 4
    value, grad, res = grid_error(P, points, residuals=True)
    ref_value, ref_grad, ref_res = grid_error(P, points, residuals=True, backend="numpy")
    np.testing.assert_array_equal(res, ref_res)
    assert value == pytest.approx(ref_value, rel=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12 * np.abs(ref_grad).max())
    value2, grad2 = grid_error(P, points)
    assert value2 == value
    np.testing.assert_array_equal(grad2, grad)


@pytest.mark.parametrize("where", [0, 4097, 8191, 8192, 9999])
def test_a_huge_coordinate_in_one_block_leaves_the_others_exact(isa, where):
    """|u| >= 2**51 in one point: its block takes the exact path, the others do not."""
    rng = np.random.default_rng(where)
    identity = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    points = rng.uniform(-50, 50, (10_000, 2))
    points[where] = [2.0**52 + 3.0, -(2.0**51) - 0.5]
    value, _, res = grid_error(identity, points, residuals=True)
    expected = points - np.rint(points)
    np.testing.assert_array_equal(res, expected)
    assert value == pytest.approx((expected**2).sum(), rel=1e-12)


def test_no_points_gives_zero(backend):
    value, grad, res = grid_error(P_TRUE, np.empty((0, 2)), residuals=True, backend=backend)
    assert value == 0.0
    np.testing.assert_array_equal(grad, np.zeros(6))
    assert res.shape == (0, 2)


def test_minimize_recovers_the_grid_from_noisy_points(backend):
    rng = np.random.default_rng(35)
    holes = np.stack(np.meshgrid(np.arange(-8, 9), np.arange(-7, 8)), -1).reshape(-1, 2)
    R = np.array([[P_TRUE[2], P_TRUE[3]], [P_TRUE[4], P_TRUE[5]]])
    points = holes @ R.T + P_TRUE[:2] + rng.normal(0, 0.05, holes.shape)
    start = P_TRUE + np.array([3.0, -2.5, 0.4, -0.3, 0.3, -0.5])
    fit = minimize(
        lambda p: grid_error(p, points, backend=backend), start, jac=True, options={"gtol": 1e-10}
    )
    # Least squares on 255 holes with 0.05 px noise: the origin to ~0.05/sqrt(255)
    # px and the lattice vectors to ~0.05/(sqrt(255) * 5 holes) px, within 5 sigma.
    assert fit.success
    np.testing.assert_allclose(fit.x[:2], P_TRUE[:2], atol=0.02)
    np.testing.assert_allclose(fit.x[2:], P_TRUE[2:], atol=0.005)


@settings(max_examples=50, deadline=None)
@given(
    P=st.tuples(
        st.floats(-1e3, 1e3),
        st.floats(-1e3, 1e3),
        st.floats(5, 200),
        st.floats(-2, 2),
        st.floats(-2, 2),
        st.floats(5, 200),
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_value_is_the_sum_of_squared_residuals_within_half_a_hole(P, seed):
    # Runs the default code path only: fixtures do not mix with @given.
    rng = np.random.default_rng(seed)
    points = rng.uniform(-3000, 3000, (64, 2))
    value, _, res = grid_error(P, points, residuals=True)
    np.testing.assert_array_equal(res, grid_error(P, points, residuals=True, backend="numpy")[2])
    assert (np.abs(res) <= 0.5).all()
    assert value == pytest.approx((res**2).sum(), rel=1e-12)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("P", "match"),
    [
        ([0, 0, 1, 2, 2, 4], "singular grid matrix"),
        ([0, 0, 0, 0, 0, 0], "singular grid matrix"),
        ([0, 0, 1e-200, 0, 0, 1e-200], "singular grid matrix"),  # det underflows to 0
        ([0, 0, 1, 1, 1], r"`P` must have shape \(6,\)"),
        ([[0, 0, 1], [0, 0, 1]], r"`P` must have shape \(6,\)"),
        ([0, np.nan, 1, 0, 0, 1], "`P` must be finite"),
        ([0, 0, np.inf, 0, 0, 1], "`P` must be finite"),
        (np.array([0, 0, 1, 0, 0, 1], complex), "`P` must hold real numbers"),
    ],
)
def test_bad_parameters_are_rejected(backend, P, match):
    with pytest.raises(CcdgridError, match=match):
        grid_error(P, np.zeros((3, 2)), backend=backend)


@pytest.mark.parametrize(
    ("points", "match"),
    [
        (np.zeros((3, 3)), r"`points` must have shape \(N, 2\)"),
        (np.zeros((2, 2, 2)), r"`points` must have shape \(N, 2\)"),
        (np.zeros((3, 2), complex), "`points` must hold real numbers"),
        (np.array([[1.0, 2.0], [3.0, np.nan], [np.inf, 0.0]]), r"`points\[1\]` = \(3\.0, nan\)"),
    ],
)
def test_bad_points_are_rejected(backend, points, match):
    with pytest.raises(CcdgridError, match=match):
        grid_error(P_TRUE, points, backend=backend)


def test_unknown_backend_is_rejected():
    with pytest.raises(CcdgridError, match="`backend` must be one of"):
        grid_error(P_TRUE, np.zeros((3, 2)), backend="fortran")
