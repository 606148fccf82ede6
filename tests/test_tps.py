"""Thin-plate kernel sums: compiled kernel and numpy twin against direct formulas.

Both kernel orders: 2, ``r² log r``, and 3, ``-r⁴ log r``.
"""

import numpy as np
import pytest
from scipy.interpolate import RBFInterpolator

from ccdgrid import maps
from ccdgrid._ext import _tps as tps_cython
from ccdgrid._reference import tps as tps_numpy
from ccdgrid.thinplate import ThinPlate

ENGINES = {"cython": tps_cython, "numpy": tps_numpy}


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


@pytest.fixture(params=[2, 3])
def order(request):
    return request.param


def _phi(r, order=2):
    """r² log r, or -r⁴ log r, from r (the textbook form, not the kernels' from r²)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = r * r * np.log(r) if order == 2 else -(r**4) * np.log(r)
    return np.where(r == 0.0, 0.0, out)


def _direct(points, centres, coef, trend, shift, scale, order=2):
    r = np.hypot(*(points[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    value = _phi(r, order) @ coef
    u = (points - shift) / scale
    col = 0
    degree = round((np.sqrt(8 * len(trend) + 1) - 3) / 2)
    for t in range(degree + 1):
        for a in range(t + 1):
            value += np.outer(u[:, 0] ** a * u[:, 1] ** (t - a), trend[col])
            col += 1
    return value


@pytest.mark.parametrize("degree", [0, 1, 2, 4, 5])
@pytest.mark.parametrize(("m", "n"), [(1, 1), (37, 9), (300, 61), (5, 0)])
def test_evaluate_equals_the_direct_sum(backend, order, degree, m, n):
    rng = np.random.default_rng(100 + degree + m)
    centres = rng.uniform(-3.0, 9.0, (n, 2))
    points = rng.uniform(-5.0, 11.0, (m, 2))
    if n:
        points[0] = centres[n // 2]  # r = 0 exactly
    coef = rng.normal(0.0, 1.0, (n, 2))
    trend = rng.normal(0.0, 1.0, ((degree + 1) * (degree + 2) // 2, 2))
    shift = np.array([2.5, 3.0])
    out = np.full((m, 2), np.nan)
    ENGINES[backend].evaluate(points, centres, coef, trend, shift, 6.0, out, order)
    expected = _direct(points, centres, coef, trend, shift, 6.0, order)
    # terms of a few hundred (order 2) or 1e5 (order 3), summed in another
    # order: ~1e-13 of the largest term
    atol = 1e-11 if order == 2 else 1e-8
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=atol)


def test_evaluate_threaded_equals_numpy(order):
    # 4000 x 700 terms: above the compiled kernel's threading threshold
    rng = np.random.default_rng(3)
    centres = rng.uniform(0.0, 40.0, (700, 2))
    points = rng.uniform(0.0, 40.0, (4000, 2))
    coef = rng.normal(0.0, 1e-3, (700, 2))
    trend = rng.normal(0.0, 1.0, (15, 2))
    shift = np.array([20.0, 20.0])
    out_c = np.empty((4000, 2))
    out_n = np.empty((4000, 2))
    tps_cython.evaluate(points, centres, coef, trend, shift, 20.0, out_c, order)
    tps_numpy.evaluate(points, centres, coef, trend, shift, 20.0, out_n, order)
    # order 3: terms up to 3e7 x 1e-3
    np.testing.assert_allclose(out_c, out_n, rtol=1e-12, atol=1e-12 if order == 2 else 1e-8)


def test_compiled_logarithm_over_the_whole_range():
    # one centre at the origin, unit weight, no trend: out = r² log r, for
    # r² from 1e-300 to 1e300 (every binade the bit manipulation meets)
    r2 = np.logspace(-300, 300, 20001)
    r2 = np.concatenate([r2, [0.5, 1.0, 2.0, np.sqrt(0.5), np.sqrt(2.0), 1 - 1e-16, 1 + 2e-16]])
    points = np.column_stack([np.sqrt(r2), np.zeros_like(r2)])
    out = np.empty_like(points)
    coef = np.array([[1.0, 2.0]])
    tps_cython.evaluate(points, np.zeros((1, 2)), coef, np.zeros((1, 2)), np.zeros(2), 1.0, out)
    # sqrt then square may move r² by an ulp; the kernel adds 1e-300 (phi(0) = 0)
    r2_used = points[:, 0] ** 2 + 1e-300
    expected = 0.5 * r2_used * np.log(r2_used)
    np.testing.assert_allclose(out[:, 0], expected, rtol=5e-16 * 8, atol=0)
    np.testing.assert_allclose(out[:, 1], 2 * expected, rtol=5e-16 * 8, atol=0)


def test_compiled_order_3_kernel_over_a_wide_range():
    # -r⁴ log r from r² over 1e-150 to 1e150 (r⁴ within float64's range)
    r2 = np.logspace(-150, 150, 3001)
    points = np.column_stack([np.sqrt(r2), np.zeros_like(r2)])
    out = np.empty_like(points)
    coef = np.array([[1.0, -3.0]])
    tps_cython.evaluate(points, np.zeros((1, 2)), coef, np.zeros((1, 2)), np.zeros(2), 1.0, out, 3)
    r2_used = points[:, 0] ** 2 + 1e-300
    expected = -0.5 * r2_used * r2_used * np.log(r2_used)
    np.testing.assert_allclose(out[:, 0], expected, rtol=5e-16 * 8, atol=0)
    np.testing.assert_allclose(out[:, 1], -3 * expected, rtol=5e-16 * 8, atol=0)


@pytest.mark.parametrize("n", [1, 2, 9, 130])
def test_kernel_matrix(backend, order, n):
    rng = np.random.default_rng(n)
    centres = rng.uniform(0.0, 12.0, (n, 2))
    out = np.full((n, n), np.nan)
    ENGINES[backend].kernel_matrix(centres, 0.25, out, order)
    r = np.hypot(*(centres[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    expected = _phi(r, order) + 0.25 * np.eye(n)
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(out, out.T)


def test_the_default_kernel_is_order_2(backend):
    rng = np.random.default_rng(4)
    centres = rng.uniform(0.0, 12.0, (7, 2))
    default, second = np.empty((7, 7)), np.empty((7, 7))
    ENGINES[backend].kernel_matrix(centres, 0.0, default)
    ENGINES[backend].kernel_matrix(centres, 0.0, second, 2)
    np.testing.assert_array_equal(default, second)


def test_kernel_matrix_threaded_equals_numpy(order):
    rng = np.random.default_rng(5)
    centres = rng.uniform(0.0, 40.0, (2100, 2))  # above the threading threshold
    out_c = np.empty((2100, 2100))
    out_n = np.empty((2100, 2100))
    tps_cython.kernel_matrix(centres, 1.5, out_c, order)
    tps_numpy.kernel_matrix(centres, 1.5, out_n, order)
    np.testing.assert_allclose(out_c, out_n, rtol=1e-13, atol=1e-12)
    np.testing.assert_array_equal(out_c, out_c.T)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_thin_plate_backends_equal_scipy(backend, smoothing):
    rng = np.random.default_rng(21)
    pts = rng.uniform(0.0, 8.0, (120, 2))
    values = rng.normal(0.0, 1.0, (120, 2))
    probe = np.vstack([rng.uniform(-1.0, 9.0, (400, 2)), pts[:5]])
    ours = ThinPlate(pts, values, smoothing, 3, backend)(probe)
    ref = RBFInterpolator(pts, values, kernel="thin_plate_spline", smoothing=smoothing, degree=3)
    np.testing.assert_allclose(ours, ref(probe), rtol=0, atol=1e-8)


def test_displacement_maps_backends_agree():
    rng = np.random.default_rng(8)
    yy, xx = np.meshgrid(np.arange(8, 250, 30.0), np.arange(10, 250, 30.0), indexing="ij")
    pts = np.column_stack([yy.ravel(), xx.ravel()]) + rng.normal(0.0, 0.5, (yy.size, 2))
    disp = np.column_stack([np.sin(pts[:, 0] / 70), np.cos(pts[:, 1] / 90)])
    disp += rng.normal(0.0, 0.01, disp.shape)
    a = maps.displacement_maps(pts, disp, (256, 256), backend="cython")
    b = maps.displacement_maps(pts, disp, (256, 256), backend="numpy")
    assert a.smoothing == b.smoothing
    assert a.degree == b.degree
    # float32 maps of values below 1.5: a few float32 ulps
    np.testing.assert_allclose(a.dx, b.dx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.dy, b.dy, rtol=0, atol=1e-6)
