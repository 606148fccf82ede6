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
    # scattered points have no pitch: the hull alone (no border-gap rule)
    maps = displacement_maps(pts, np.zeros_like(pts), SHAPE, method="cubic", gap_ratio=None)
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
        ({"coarse_step": 1e-9}, "at least 1 px"),  # 954 GiB of coarse grid
        ({"hull_margin": float("nan")}, "hull_margin"),  # masked every pixel
        ({"hull_margin": "a"}, "hull_margin"),
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
    from ccdgrid.maps import _KEEP_SMOOTHING

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
    # the direct GCV of the new holes (tested against explicit smoother matrices in test_gcv.py)
    degrees = candidate_degrees(len(pts)) if len(sub) == len(pts) else None
    smoothing, scores, degree, order = gcv_choice(new[sub] / pitch, disp[sub], 4, degrees)
    np.testing.assert_allclose(warm.smoothing_scores["score"], scores["score"], rtol=1e-8)
    # both kernel orders' eigenbases were reused (the order-3 one scales as a⁴)
    assert [b.order for b in warm.gcv_basis.others] == [3]
    assert warm.gcv_basis.others[0].vec is prev.gcv_basis.others[0].vec
    np.testing.assert_allclose(
        warm.smoothing_scores["order_scores"][3], scores["order_scores"][3], rtol=1e-8
    )
    # the same minimum, refined from scores that agree to rounding; the same
    # holes in the same order (and the same model) keep the previous
    # smoothing when GCV's is near it
    assert (warm.degree, warm.order) == (degree, order)
    kept = (prev.degree, prev.order) == (degree, order) and abs(
        np.log(smoothing / prev.smoothing)
    ) <= np.log(_KEEP_SMOOTHING)
    assert warm.smoothing == pytest.approx(prev.smoothing if kept else smoothing, rel=1e-6)


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


def test_maps_keep_the_gcv_eigenbasis_the_spline_factor_and_the_points():
    # what a fit keeps for the next one: the eigenvectors of the GCV's
    # projected kernel ((m - p)² float64, m holes in the GCV, p trend terms)
    # and O(m p + N) more, and the float32 Cholesky factor of the spline's
    # system ((N - p)², 4 bytes each: 9 MB at 1500 holes)
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
    factor = maps.tps_factor
    n_free = len(pts) - (maps.degree + 1) * (maps.degree + 2) // 2
    assert factor.upper.shape == (n_free, n_free)
    assert factor.upper.dtype == np.float32
    assert factor.upper.flags.f_contiguous
    assert factor.points is basis.points  # one copy of the points
    fixed = displacement_maps(pts, disp, SHAPE, scale_px=PITCH, smoothing=0.1)
    assert fixed.gcv_basis is None  # no GCV: no eigenbasis
    np.testing.assert_array_equal(fixed.tps_factor.points, pts)
    cubic = displacement_maps(pts, disp, SHAPE, method="cubic")
    assert cubic.gcv_basis is None
    assert cubic.tps_factor is None


def test_spline_of_the_same_holes_moved_is_solved_from_the_previous_factor():
    rng = np.random.default_rng(27)
    pts = holes(rng)
    field = make_distortion(SHAPE, distortion_px=3.0, seed=4)
    prev = displacement_maps(pts, field.displacement(pts), SHAPE, smoothing=0.5)
    new = _similar(pts, 0.0004, 1.0, (3.4, -2.7)) + rng.normal(0, 0.01, pts.shape)
    disp = field.displacement(new) + rng.normal(0, 0.02, pts.shape)
    warm = displacement_maps(new, disp, SHAPE, smoothing=0.5, previous=prev)
    fresh = displacement_maps(new, disp, SHAPE, smoothing=0.5)
    assert warm.tps_factor.upper is prev.tps_factor.upper
    assert fresh.tps_factor.upper is not prev.tps_factor.upper
    np.testing.assert_array_equal(warm.tps_factor.points, new)
    np.testing.assert_allclose(warm.dx, fresh.dx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(warm.dy, fresh.dy, rtol=0, atol=1e-6)
    assert warm.fit_residual_rms == pytest.approx(fresh.fit_residual_rms, rel=1e-6)
    # the holes in another order, or one of them new: factorised again
    order = rng.permutation(len(pts))
    rows = np.arange(len(pts))
    rows[5] = -1
    for points, values, previous_rows in (
        (new[order], disp[order], order),
        (new, disp, rows),
    ):
        again = displacement_maps(
            points, values, SHAPE, smoothing=0.5, previous=prev, previous_rows=previous_rows
        )
        assert again.tps_factor.upper is not prev.tps_factor.upper


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


def test_a_factor_made_at_another_smoothing_is_not_used(monkeypatch):
    from ccdgrid import thinplate

    tried = []
    solve = thinplate._preconditioned
    monkeypatch.setattr(thinplate, "_preconditioned", lambda *a: tried.append(1) or solve(*a))
    rng = np.random.default_rng(28)
    pts = holes(rng)
    field = make_distortion(SHAPE, distortion_px=3.0, seed=4)
    prev = displacement_maps(pts, field.displacement(pts), SHAPE, smoothing=0.5)
    new = pts + np.array([1.5, -0.5])
    same = displacement_maps(new, field.displacement(new), SHAPE, smoothing=0.5, previous=prev)
    assert len(tried) == 1
    other = displacement_maps(new, field.displacement(new), SHAPE, smoothing=0.9, previous=prev)
    assert same.tps_factor.upper is prev.tps_factor.upper
    assert other.tps_factor.upper is not prev.tps_factor.upper
    assert len(tried) == 1  # not even tried: its iterations would be wasted


def test_a_smoothing_chosen_near_the_previous_one_is_replaced_by_it():
    from ccdgrid.maps import _KEEP_SMOOTHING

    rng = np.random.default_rng(29)
    pts = holes(rng)
    field = make_distortion(SHAPE, distortion_px=3.0, seed=4)
    noise = rng.normal(0, 0.02, pts.shape)
    prev = displacement_maps(pts, field.displacement(pts) + noise, SHAPE, degree=3)
    # the plate moved a little, the centres measured again: GCV's choice
    # moves with the noise (by 1.6x here for a new draw of it), so the same
    # draw plus a little
    new = pts + np.array([0.4, -0.3])
    near = field.displacement(new) + noise + rng.normal(0, 0.003, pts.shape)
    cold = displacement_maps(new, near, SHAPE, degree=3)
    assert cold.smoothing != prev.smoothing  # GCV's own choice moved a little ...
    assert abs(np.log(cold.smoothing / prev.smoothing)) <= np.log(_KEEP_SMOOTHING)
    warm = displacement_maps(new, near, SHAPE, degree=3, previous=prev)
    assert warm.smoothing == prev.smoothing  # ... and the previous one serves
    assert warm.tps_factor.upper is prev.tps_factor.upper
    fixed = displacement_maps(
        new, near, SHAPE, degree=3, smoothing=prev.smoothing, order=prev.order
    )
    np.testing.assert_allclose(warm.dx, fixed.dx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(warm.dy, fixed.dy, rtol=0, atol=1e-6)
    # ten times the noise: GCV's choice is far from the previous one (here
    # even of another kernel order, whose smoothing is in other units) and stays
    far = field.displacement(new) + rng.normal(0, 0.2, pts.shape)
    cold = displacement_maps(new, far, SHAPE, degree=3)
    assert cold.order != prev.order or abs(np.log(cold.smoothing / prev.smoothing)) > np.log(
        _KEEP_SMOOTHING
    )
    warm = displacement_maps(new, far, SHAPE, degree=3, previous=prev)
    # (the eigenbasis reused: the same scores to rounding)
    assert warm.smoothing == pytest.approx(cold.smoothing, rel=1e-9)
    assert warm.tps_factor.upper is not prev.tps_factor.upper
    # a smoothing given by the caller is never replaced
    given = prev.smoothing * 1.1
    warm = displacement_maps(new, near, SHAPE, degree=3, smoothing=given, previous=prev)
    assert warm.smoothing == given


def test_maps_written_into_memory_mapped_beforehand():
    from ccdgrid.maps import map_outputs

    rng = np.random.default_rng(30)
    pts = holes(rng)
    disp = rng.normal(0, 0.05, pts.shape)
    here = displacement_maps(pts, disp, SHAPE, smoothing=0.5)
    outputs = map_outputs(SHAPE)
    given = displacement_maps(pts, disp, SHAPE, smoothing=0.5, outputs=outputs)
    np.testing.assert_array_equal(given.dx, here.dx)
    np.testing.assert_array_equal(given.dy, here.dy)
    np.testing.assert_array_equal(given.mask, here.mask)
    assert given.dx.shape == (SHAPE[0] + 1, SHAPE[1] + 1)
    assert given.dx.dtype == np.float32
    with pytest.raises(CcdgridError, match="already used"):
        displacement_maps(pts, disp, SHAPE, smoothing=0.5, outputs=outputs)
    with pytest.raises(CcdgridError, match=r"made for shape \(100, 120\)"):
        displacement_maps(pts, disp, SHAPE, smoothing=0.5, outputs=map_outputs((100, 120)))
    with pytest.raises(CcdgridError, match="must come from map_outputs"):
        displacement_maps(pts, disp, SHAPE, outputs=np.zeros((2, *SHAPE), np.float32))
    with pytest.raises(CcdgridError, match="`shape` must be two positive integers"):
        map_outputs((0, 5))


def test_a_strip_of_holes_gets_the_smoothing_of_the_order_it_is_fitted_with():
    # three rows of holes leave a quartic trend undetermined: the fit falls
    # back to an affine trend and order 2, and GCV's smoothing must be in
    # that order's units (an order-3 value, in pitch⁴, was used as pitch²:
    # 237 where order 2 chose 5.5, the map 6x further from the truth)
    rng = np.random.default_rng(1)
    yy, xx = np.meshgrid(20 + 20 * np.arange(3), 20 + 20 * np.arange(300), indexing="ij")
    pts = np.column_stack([yy.ravel(), xx.ravel()]).astype(float)
    pts += rng.normal(0, 0.02, pts.shape)
    true = np.column_stack([0.2 * np.sin(pts[:, 1] / 40 * 2 * np.pi), np.zeros(len(pts))])
    disp = true + rng.normal(0, 0.03, pts.shape)
    m = displacement_maps(pts, disp, (80, 6020), scale_px=20.0, coarse_step=10)
    assert m.order == 2
    assert m.smoothing_scores["order"] == 2
    forced = displacement_maps(pts, disp, (80, 6020), scale_px=20.0, coarse_step=10, order=2)
    assert m.smoothing == pytest.approx(forced.smoothing, rel=0.1)
