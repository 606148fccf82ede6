"""Bicubic upsampling of the coarse maps: compiled kernel and numpy twin against FITPACK."""

import numpy as np
import pytest
from scipy.interpolate import RectBivariateSpline
from scipy.spatial import ConvexHull

from ccdgrid import maps
from ccdgrid.errors import CcdgridError


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


@pytest.mark.parametrize(("ny", "nx", "step"), [(40, 57, 9.0), (3, 5, 8.0), (130, 70, 16.0)])
def test_upsample_matches_fitpack_at_every_corner(backend, ny, nx, step):
    rng = np.random.default_rng(0)
    yc = maps._coarse_axis(ny, step)
    xc = maps._coarse_axis(nx, step)
    coarse = rng.normal(0.0, 2.0, (len(yc), len(xc), 2))
    out0, out1 = maps._upsample(yc, xc, coarse, ny, nx, backend)
    assert out0.shape == out1.shape == (ny + 1, nx + 1)
    assert out0.dtype == out1.dtype == np.float32
    yk = np.arange(ny + 1) - 0.5  # corner (i, j) is at index coordinates (i - 0.5, j - 0.5)
    xk = np.arange(nx + 1) - 0.5
    for c, out in enumerate((out0, out1)):
        spline = RectBivariateSpline(yc, xc, coarse[..., c], kx=3, ky=3, s=0)
        # float32 rounding of values of a few units: ~5e-7
        np.testing.assert_allclose(out, spline(yk, xk), rtol=0, atol=2e-6)


def test_engines_agree_to_a_few_float32_ulps_on_large_maps():
    # displacements of tens of px: the compiled kernel's float32 products
    # stay within a few ulps of the value summed in double (2 measured)
    ny, nx = 300, 260
    yc = maps._coarse_axis(ny, 24.0)
    xc = maps._coarse_axis(nx, 24.0)
    gy, gx = np.meshgrid(yc, xc, indexing="ij")
    coarse = np.stack([40.0 * np.sin(gy / 90.0) + 1e-3 * gx**2, -45.0 * np.cos(gx / 70.0)], -1)
    fast = maps._upsample(yc, xc, coarse, ny, nx, "cython")
    exact = maps._upsample(yc, xc, coarse, ny, nx, "numpy")
    for a, b in zip(fast, exact, strict=True):
        # ulps of the largest values: near a zero crossing the terms still are that large
        ulp = np.spacing(np.abs(b).max())
        assert np.abs(a.astype(np.float64) - b).max() <= 4 * ulp


def test_upsample_interpolates_the_nodes(backend):
    rng = np.random.default_rng(1)
    ny, nx = 64, 48
    yc = maps._coarse_axis(ny, 16.0)  # nodes at -0.5, 15.5, ...: on corners
    xc = maps._coarse_axis(nx, 16.0)
    coarse = rng.normal(0.0, 1.0, (len(yc), len(xc), 2))
    out0, out1 = maps._upsample(yc, xc, coarse, ny, nx, backend)
    iy = np.rint(yc + 0.5).astype(int)
    ix = np.rint(xc + 0.5).astype(int)
    np.testing.assert_allclose(out0[np.ix_(iy, ix)], coarse[..., 0], atol=1e-6)
    np.testing.assert_allclose(out1[np.ix_(iy, ix)], coarse[..., 1], atol=1e-6)


def test_backends_give_the_same_maps():
    rng = np.random.default_rng(2)
    pts = rng.uniform(5, 250, (120, 2))
    disp = np.column_stack([np.sin(pts[:, 0] / 40), np.cos(pts[:, 1] / 50)])
    shape = (256, 300)
    a = maps.displacement_maps(pts, disp, shape, backend="cython")
    b = maps.displacement_maps(pts, disp, shape, backend="numpy")
    assert a.smoothing == b.smoothing
    np.testing.assert_allclose(a.dx, b.dx, atol=1e-6)
    np.testing.assert_allclose(a.dy, b.dy, atol=1e-6)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_bad_backend():
    pts = np.array([[0.0, 0.0], [0.0, 50.0], [50.0, 0.0], [50.0, 50.0], [25.0, 20.0]])
    with pytest.raises(CcdgridError, match="backend"):
        maps.displacement_maps(pts, np.zeros_like(pts), (60, 60), backend="fortran")


def test_upsample_fills_the_given_outputs_whatever_they_held(backend):
    # the pipeline passes arrays touched (zeroed) by a background thread:
    # every corner must be overwritten, none left from before
    rng = np.random.default_rng(3)
    ny, nx = 70, 53
    yc = maps._coarse_axis(ny, 12.0)
    xc = maps._coarse_axis(nx, 12.0)
    coarse = rng.normal(0.0, 1.0, (len(yc), len(xc), 2))
    fresh = maps._upsample(yc, xc, coarse, ny, nx, backend)
    given = tuple(np.full((ny + 1, nx + 1), np.nan, dtype=np.float32) for _ in range(2))
    out = maps._upsample(yc, xc, coarse, ny, nx, backend, out=given)
    assert out[0] is given[0]
    assert out[1] is given[1]
    for a, b in zip(out, fresh, strict=True):
        np.testing.assert_array_equal(a, b)


def test_background_outputs_are_the_mask_and_float32_maps_the_upsampling_fills():
    rng = np.random.default_rng(4)
    pts = rng.uniform(3, 60, (40, 2))
    hull = ConvexHull(pts)
    mask, arrays = maps._Background(
        maps._mask_and_outputs, hull.equations, (64, 70), 0.0, pts, None, True
    ).result()
    np.testing.assert_array_equal(mask, maps.hull_mask(hull.equations, (64, 70)))
    assert len(arrays) == 2
    assert arrays[0] is not arrays[1]
    for a in arrays:
        assert a.shape == (65, 71)
        assert a.dtype == np.float32
        assert a.flags.c_contiguous
    # their values are not set (pages mapped only): the upsampling writes every one
    for a in arrays:
        a.fill(np.nan)
    yc, xc = maps._coarse_axis(64, 16.0), maps._coarse_axis(70, 16.0)
    coarse = rng.normal(0, 1, (len(yc), len(xc), 2))
    dy, dx = maps._upsample(yc, xc, coarse, 64, 70, "cython", out=arrays)
    assert dy is arrays[0]
    assert dx is arrays[1]
    assert np.isfinite(dy).all()
    assert np.isfinite(dx).all()
    np.testing.assert_array_equal(
        np.stack([dy, dx]), np.stack(maps._upsample(yc, xc, coarse, 64, 70, "cython"))
    )


@pytest.mark.parametrize(
    ("shape", "error"), [((2**20, 2**20), MemoryError), ((2**31, 2**31), ValueError)]
)
def test_background_raises_the_threads_error_on_result(shape, error):
    # 4 TiB cannot be allocated here, 16 EiB by no numpy: the error is raised
    # in the background thread and must reach the caller, not vanish with it
    def allocate():
        return np.empty(shape, dtype=np.float32)

    pending = maps._Background(allocate)
    with pytest.raises(error):
        pending.result()
