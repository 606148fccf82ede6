"""Exact pixel splitting (ccdgrid.correction): one specification, both engines."""

import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ccdgrid import correction
from ccdgrid._ext import _correction as kernel
from ccdgrid._reference import correction as reference
from ccdgrid.correction import CorrectionMatrix, correct
from ccdgrid.errors import CcdgridError


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


def corner_grid(ny, nx):
    return np.mgrid[0 : ny + 1, 0 : nx + 1].astype(np.float64)


def rotation_maps(ny, nx, degrees, centre=None):
    """Maps that rotate the whole grid by `degrees` about `centre` (pyFAI coords)."""
    yy, xx = corner_grid(ny, nx)
    cy, cx = centre if centre is not None else (ny / 2, nx / 2)
    t = np.deg2rad(degrees)
    y = cy + (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
    x = cx + (yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
    return y - yy, x - xx


def smooth_maps(ny, nx, amplitude, seed):
    """A smooth random field: 3 plane waves of 0.3-1 cycle per image, |d| <= `amplitude` px."""
    rng = np.random.default_rng(seed)
    yy, xx = corner_grid(ny, nx)
    maps = []
    for _ in range(2):
        d = np.zeros_like(yy)
        for _ in range(3):
            ky, kx = rng.uniform(0.3, 1.0, 2) * 2 * np.pi / np.array([ny, nx])
            d += np.sin(ky * yy + kx * xx + rng.uniform(0, 2 * np.pi))
        maps.append(amplitude * d / 3)
    return maps[0], maps[1]


def scale_maps(ny, nx, sy, sx):
    """Scale the grid by (sy, sx) about its centre."""
    yy, xx = corner_grid(ny, nx)
    return (yy - ny / 2) * (sy - 1), (xx - nx / 2) * (sx - 1)


def dense(cm):
    return cm.matrix.toarray()


def clip_area(quad, y0, x0):
    """Area of a polygon [(y, x), ...] inside [y0, y0+1] x [x0, x0+1].

    An independent Sutherland-Hodgman clipping in plain Python, for checks.
    """

    def clip(poly, inside, cut):
        out = []
        for k, p in enumerate(poly):
            q = poly[(k + 1) % len(poly)]
            if inside(p):
                out.append(p)
            if inside(p) != inside(q):
                out.append(cut(p, q))
        return out

    def at_y(c):
        return lambda p, q: (c, p[1] + (c - p[0]) * (q[1] - p[1]) / (q[0] - p[0]))

    def at_x(c):
        return lambda p, q: (p[0] + (c - p[1]) * (q[0] - p[0]) / (q[1] - p[1]), c)

    poly = list(quad)
    poly = clip(poly, lambda p: p[0] >= y0, at_y(y0))
    poly = clip(poly, lambda p: p[0] <= y0 + 1, at_y(y0 + 1)) if poly else poly
    poly = clip(poly, lambda p: p[1] >= x0, at_x(x0)) if poly else poly
    poly = clip(poly, lambda p: p[1] <= x0 + 1, at_x(x0 + 1)) if poly else poly
    if len(poly) < 3:
        return 0.0
    s = 0.0
    for k, p in enumerate(poly):
        q = poly[(k + 1) % len(poly)]
        s += p[0] * q[1] - q[0] * p[1]
    return 0.5 * s


def true_quad(dy, dx, i, j):
    yy, xx = corner_grid(dy.shape[0] - 1, dy.shape[1] - 1)
    y, x = yy + dy, xx + dx
    return [(y[a, b], x[a, b]) for a, b in ((i, j), (i + 1, j), (i + 1, j + 1), (i, j + 1))]


def inside_pixels(dy, dx, shape_out):
    """Input pixels whose four true corners all lie inside the output frame."""
    yy, xx = corner_grid(dy.shape[0] - 1, dy.shape[1] - 1)
    y, x = yy + dy, xx + dx
    ok = (y >= 0) & (y <= shape_out[0]) & (x >= 0) & (x <= shape_out[1])
    return ok[:-1, :-1] & ok[1:, :-1] & ok[1:, 1:] & ok[:-1, 1:]


MAP_CASES = {
    "noise": lambda: tuple(np.random.default_rng(1).normal(0, 0.25, (2, 25, 33))),
    "rotation20": lambda: rotation_maps(24, 32, 20),
    "smooth": lambda: smooth_maps(24, 32, 2.0, seed=2),
    "shift": lambda: (np.full((25, 33), 0.5), np.full((25, 33), -2.25)),
    "shrink": lambda: scale_maps(24, 32, 1.3, 0.6),
    "magnify": lambda: scale_maps(24, 32, 3.5, 2.2),
    "rough": lambda: tuple(np.random.default_rng(3).normal(0, 0.6, (2, 25, 33))),
}


# -- kernel against its numpy twin ----------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(MAP_CASES))
def test_kernel_matches_reference(case):
    dy, dx = MAP_CASES[case]()
    mask = (np.random.default_rng(4).random((24, 32)) < 0.05).astype(np.uint8)
    got = kernel.split_pixels(dy, dx, mask, 24, 32, np.float64)
    want = reference.split_pixels(dy, dx, mask, 24, 32, np.float64)
    assert_array_equal(got[2], want[2])  # same row pointers
    assert_array_equal(got[1], want[1])  # same columns, same order
    assert_allclose(got[0], want[0], rtol=0, atol=1e-12)
    assert got[3] == want[3]


def test_kernel_matches_reference_with_another_output_shape():
    dy, dx = smooth_maps(20, 24, 3.0, seed=5)
    mask = np.zeros((20, 24), np.uint8)
    got = kernel.split_pixels(dy, dx, mask, 17, 29, np.float64)
    want = reference.split_pixels(dy, dx, mask, 17, 29, np.float64)
    assert_array_equal(got[2], want[2])
    assert_array_equal(got[1], want[1])
    assert_allclose(got[0], want[0], rtol=0, atol=1e-12)


def test_threads_give_the_same_matrix_and_image():
    # Above the size where the kernels go parallel (PARALLEL_MIN_PIXELS).
    dy, dx = smooth_maps(300, 260, 3.0, seed=6)
    mask = np.zeros((300, 260), np.uint8)
    one = kernel.split_pixels(dy, dx, mask, 300, 260, np.float32, 1)
    two = kernel.split_pixels(dy, dx, mask, 300, 260, np.float32, 2)
    for a, b in zip(one[:3], two[:3], strict=True):
        assert_array_equal(a, b)
    cm = CorrectionMatrix.from_maps(dy, dx)
    img = np.random.default_rng(6).random((300, 260)).astype(np.float32)
    assert_array_equal(cm.apply(img, nthreads=1), cm.apply(img, nthreads=2))


def test_threads_give_the_same_matrix_when_rows_are_tilted():
    # A rotation tilts every input row across many output rows, so each input
    # row is split by several bands and the bands hand over to each other.
    dy, dx = rotation_maps(300, 260, 4)
    mask = (np.random.default_rng(23).random((300, 260)) < 0.01).astype(np.uint8)
    one = kernel.split_pixels(dy, dx, mask, 300, 260, np.float64, 1)
    two = kernel.split_pixels(dy, dx, mask, 300, 260, np.float64, 2)
    for a, b in zip(one[:3], two[:3], strict=True):
        assert_array_equal(a, b)
    assert one[3] == two[3]
    col = np.bincount(one[1], weights=one[0], minlength=300 * 260).reshape(300, 260)
    inside = inside_pixels(dy, dx, (300, 260)) & (mask == 0)
    assert_allclose(col[inside], 1.0, rtol=0, atol=1e-12)


# -- geometry -------------------------------------------------------------------------------------


def test_identity_is_exact(backend):
    z = np.zeros((33, 41))
    cm = CorrectionMatrix.from_maps(z, z, backend=backend, dtype=np.float64)
    assert cm.nnz == 32 * 40
    assert_array_equal(cm.matrix.data, 1.0)
    assert_array_equal(cm.matrix.indices, np.arange(32 * 40))
    img = np.random.default_rng(7).random((32, 40))
    assert_array_equal(cm.apply(img), img)


def test_corner_noise_below_snap_still_gives_identity(backend):
    # Round-off in maps (e.g. float32 metres / pixel size) must not create tiny weights.
    noise = np.random.default_rng(8).uniform(-1e-10, 1e-10, (2, 17, 17))
    cm = CorrectionMatrix.from_maps(noise[0], noise[1], backend=backend)
    assert cm.nnz == 256
    assert_array_equal(cm.matrix.data, 1.0)


def test_integer_shift_moves_columns(backend):
    z = np.zeros((21, 31))
    cm = CorrectionMatrix.from_maps(z, z + 3.0, backend=backend)
    img = np.random.default_rng(9).random((20, 30))
    out = cm.apply(img, dummy=np.nan)
    assert_array_equal(out[:, 3:], img[:, :-3])
    assert np.isnan(out[:, :3]).all()  # nothing lands there
    assert cm.nnz == 20 * 27  # the 3 last columns leave the frame


def test_half_pixel_shift_splits_in_halves(backend):
    z = np.zeros((13, 11))
    cm = CorrectionMatrix.from_maps(z + 0.5, z, backend=backend)
    assert_array_equal(cm.matrix.data, 0.5)
    img = np.random.default_rng(10).random((12, 10))
    out = cm.apply(img)
    assert_allclose(out[1:], 0.5 * (img[1:] + img[:-1]), rtol=1e-15)
    assert_allclose(out[0], 0.5 * img[0], rtol=1e-15)


def test_rotated_pixel_weights_match_independent_clipping(backend):
    dy, dx = rotation_maps(8, 8, 20)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend, dtype=np.float64)
    m = dense(cm)
    for i, j in [(3, 3), (1, 5), (6, 2)]:
        quad = true_quad(dy, dx, i, j)
        total = 0.5 * sum(
            p[0] * q[1] - q[0] * p[1] for p, q in zip(quad, quad[1:] + quad[:1], strict=True)
        )
        want = np.array(
            [clip_area(quad, k, l) / total for k in range(8) for l in range(8)]  # noqa: E741
        )
        assert_allclose(m[:, i * 8 + j], want, rtol=0, atol=1e-12)


def near_square_maps(ny, nx, seed):
    """Every corner (i, j) moved into the cell [i, i+1] x [j, j+1], away from its edges.

    Each pixel then has one corner in each cell of a 2 x 2 block of output
    pixels (the kernel's fast case); some of these quadrilaterals are concave.
    """
    rng = np.random.default_rng(seed)
    return rng.uniform(0.03, 0.97, (2, ny + 1, nx + 1))


def test_near_squares_match_independent_clipping(backend):
    dy, dx = near_square_maps(6, 7, seed=24)
    cm = CorrectionMatrix.from_maps(dy, dx, shape_out=(8, 9), backend=backend, dtype=np.float64)
    m = dense(cm)
    concave = 0
    for i in range(6):
        for j in range(7):
            quad = true_quad(dy, dx, i, j)
            total = 0.5 * sum(
                p[0] * q[1] - q[0] * p[1] for p, q in zip(quad, quad[1:] + quad[:1], strict=True)
            )
            want = np.zeros((8, 9))
            for k in (i, i + 1):
                for l in (j, j + 1):  # noqa: E741
                    want[k, l] = clip_area(quad, k, l) / total
            assert_allclose(m[:, i * 7 + j].reshape(8, 9), want, rtol=0, atol=1e-12)
            edges = [np.subtract(quad[(n + 1) % 4], quad[n]) for n in range(4)]
            turns = [
                edges[n - 1][0] * edges[n][1] - edges[n - 1][1] * edges[n][0] for n in range(4)
            ]
            concave += min(turns) < 0
    assert concave > 0  # the draw includes concave pixels


def test_pieces_below_weight_min_are_dropped_in_the_fast_case(backend):
    # Corner (2, 2) of a grid shifted by half a pixel pushed to 1e-7 px of the
    # corner of its output cell: the piece of pixel (2, 2) in that cell has a
    # weight near 1e-14, below WEIGHT_MIN; the other pieces are kept.
    dy = np.full((5, 5), 0.5)
    dx = np.full((5, 5), 0.5)
    for d, dropped in ((1e-7, True), (1e-5, False)):
        dy[2, 2] = dx[2, 2] = 1.0 - d
        cm = CorrectionMatrix.from_maps(
            dy, dx, shape_out=(5, 5), backend=backend, dtype=np.float64
        )
        m = dense(cm)
        quad = true_quad(dy, dx, 2, 2)
        total = 0.5 * sum(
            p[0] * q[1] - q[0] * p[1] for p, q in zip(quad, quad[1:] + quad[:1], strict=True)
        )
        tiny = clip_area(quad, 2, 2) / total
        assert (tiny < reference.WEIGHT_MIN) == dropped
        assert (m[2 * 5 + 2, 2 * 4 + 2] == 0.0) == dropped
        if not dropped:
            assert_allclose(m[2 * 5 + 2, 2 * 4 + 2], tiny, rtol=0, atol=1e-14)
        assert np.count_nonzero(m) == 16 * 4 - dropped


def test_rotated_unit_square_known_split(backend):
    # A unit pixel rotated by 20° about its own centre (2.5, 2.5): the exact split
    # along its middle row is (0.031, 0.877, 0.031) (PYFAI_NOTES §4.4), where
    # pyFAI's row-strip splitting gives (0, 0.938, 0).
    dy, dx = rotation_maps(5, 5, 20, centre=(2.5, 2.5))
    mask = np.ones((5, 5), bool)
    mask[2, 2] = False
    cm = CorrectionMatrix.from_maps(dy, dx, mask=mask, backend=backend, dtype=np.float64)
    w = dense(cm)[:, 2 * 5 + 2].reshape(5, 5)
    assert_allclose(w[2, 1:4], [0.031, 0.877, 0.031], atol=1e-3)
    assert_allclose(w.sum(), 1.0, rtol=1e-13)
    # analytically: sin and cos of 20° give the corner triangles exactly
    s, c = np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))
    h = (c + s) / 2 - 0.5  # how far each vertex pokes out of the central square
    tri = 0.5 * h * h / (s * c)  # area of one poking triangle (legs h/s and h/c)
    assert_allclose(w[2, 1], tri, rtol=1e-12)
    assert_allclose(w[2, 2], 1 - 4 * tri, rtol=1e-12)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_flux_is_conserved_for_pixels_inside(backend, seed):
    dy, dx = smooth_maps(40, 36, 3.0, seed=seed)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend, dtype=np.float64)
    col = np.asarray(cm.matrix.sum(axis=0)).reshape(40, 36)
    inside = inside_pixels(dy, dx, (40, 36))
    assert inside.sum() > 1000
    assert_allclose(col[inside], 1.0, rtol=0, atol=1e-12)
    assert (col[~inside] <= 1.0 + 1e-12).all()


def test_total_flux_when_the_grid_stays_inside(backend):
    yy, xx = corner_grid(48, 48)
    t = np.deg2rad(7)  # rotate by 7° and shrink by 0.8 about the centre
    y = 24 + 0.8 * ((yy - 24) * np.cos(t) - (xx - 24) * np.sin(t))
    x = 24 + 0.8 * ((yy - 24) * np.sin(t) + (xx - 24) * np.cos(t))
    dy, dx = y - yy, x - xx
    assert inside_pixels(dy, dx, (48, 48)).all()
    img = np.random.default_rng(14).random((48, 48))
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend, dtype=np.float64)
    assert_allclose(cm.apply(img).sum(), img.sum(), rtol=1e-12)


def test_float32_weights_keep_flux_to_float32_precision(backend):
    dy, dx = smooth_maps(40, 36, 3.0, seed=15)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    assert cm.matrix.dtype == np.float32
    col = np.asarray(cm.matrix.sum(axis=0, dtype=np.float64)).reshape(40, 36)
    assert_allclose(col[inside_pixels(dy, dx, (40, 36))], 1.0, rtol=0, atol=1e-6)


def test_output_shape_larger_than_input(backend):
    z = np.zeros((11, 9))
    cm = CorrectionMatrix.from_maps(z + 2, z + 1, shape_out=(15, 12), backend=backend)
    img = np.random.default_rng(16).random((10, 8)).astype(np.float32)
    out = cm.apply(img)
    assert out.shape == (15, 12)
    assert_array_equal(out[2:12, 1:9], img)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-6)


# -- the output frame: offset and bounds ----------------------------------------------------------


def barrel_maps(ny, nx, edge):
    """Radial maps, zero at the centre: true = c + (p - c)(1 + a r²), |d| = `edge` px at a corner.

    With ``edge > 0`` the true corners lie outside the nominal frame near the
    border (the corrected image of a barrel-distorted one is larger than it),
    with ``edge < 0`` inside (a pincushion).
    """
    yy, xx = corner_grid(ny, nx)
    cy, cx = ny / 2, nx / 2
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    a = edge / (cy**2 + cx**2) ** 1.5
    return a * r2 * (yy - cy), a * r2 * (xx - cx)


def true_extent(dy, dx):
    """floor/ceil of the true corner positions: the bounds frame, computed independently."""
    yy, xx = corner_grid(dy.shape[0] - 1, dy.shape[1] - 1)
    y, x = yy + dy, xx + dx
    oy, ox = int(np.floor(y.min())), int(np.floor(x.min()))
    return (oy, ox), (int(np.ceil(y.max())) - oy, int(np.ceil(x.max())) - ox)


def test_kernel_matches_reference_with_an_offset():
    dy, dx = barrel_maps(40, 52, 4.0)
    mask = (np.random.default_rng(40).random((40, 52)) < 0.03).astype(np.uint8)
    got = kernel.split_pixels(dy, dx, mask, 49, 61, np.float64, 0, -4, -5)
    want = reference.split_pixels(dy, dx, mask, 49, 61, np.float64, 0, -4, -5)
    assert_array_equal(got[2], want[2])
    assert_array_equal(got[1], want[1])
    assert_allclose(got[0], want[0], rtol=0, atol=1e-12)
    assert got[3] == want[3]


@pytest.mark.parametrize("case", sorted(MAP_CASES))
def test_kept_bounds_kernel_matches_reference(case):
    dy, dx = MAP_CASES[case]()
    mask = (np.random.default_rng(41).random((24, 32)) < 0.05).astype(np.uint8)
    assert kernel.kept_bounds(dy, dx, mask) == reference.kept_bounds(dy, dx, mask)


def test_kept_bounds_threads_agree():
    dy, dx = barrel_maps(300, 260, 6.0)
    mask = np.zeros((300, 260), np.uint8)
    assert kernel.kept_bounds(dy, dx, mask, 1) == kernel.kept_bounds(dy, dx, mask, 2)


def test_bounds_keep_every_count_of_a_barrel(backend):
    dy, dx = barrel_maps(96, 128, 6.0)
    img = np.random.default_rng(42).random((96, 128)) * 1000
    (oy, ox), shape = true_extent(dy, dx)
    assert oy < 0
    assert ox < 0
    cm = CorrectionMatrix.from_maps(dy, dx, shape_out="bounds", backend=backend, dtype=np.float64)
    assert cm.offset == (oy, ox)
    assert cm.shape_out == shape
    out = cm.apply(img)
    assert out.shape == shape
    assert_allclose(out.sum(), img.sum(), rtol=1e-12)  # every count kept
    col = np.asarray(cm.matrix.sum(axis=0)).ravel()
    assert_allclose(col, 1.0, rtol=0, atol=1e-12)  # every pixel wholly inside

    cropped = CorrectionMatrix.from_maps(dy, dx, backend=backend, dtype=np.float64)
    assert cropped.offset == (0, 0)
    assert cropped.apply(img).sum() < 0.98 * img.sum()  # the input frame loses the border


def test_bounds_of_a_pincushion_are_smaller_and_keep_every_count(backend):
    dy, dx = barrel_maps(64, 80, -5.0)
    img = np.random.default_rng(43).random((64, 80))
    cm = CorrectionMatrix.from_maps(dy, dx, shape_out="bounds", backend=backend, dtype=np.float64)
    assert (cm.offset, cm.shape_out) == true_extent(dy, dx)
    assert cm.shape_out[0] < 64
    assert cm.shape_out[1] < 80
    assert cm.offset[0] >= 1
    assert cm.offset[1] >= 1
    assert_allclose(cm.apply(img).sum(), img.sum(), rtol=1e-12)
    # no empty margin left: every border row and column of the frame receives counts
    cov = cm.coverage
    assert (cov[[0, -1], :].max(axis=1) > 0).all()
    assert (cov[:, [0, -1]].max(axis=0) > 0).all()


def test_bounds_of_an_undistorted_detector_are_the_identity(backend):
    z = np.zeros((33, 41))
    cm = CorrectionMatrix.from_maps(z, z, shape_out="bounds", backend=backend, dtype=np.float64)
    assert cm.offset == (0, 0)
    assert cm.shape_out == (32, 40)
    assert_array_equal(cm.matrix.data, 1.0)
    assert_array_equal(cm.matrix.indices, np.arange(32 * 40))
    noise = np.random.default_rng(44).uniform(-1e-10, 1e-10, (2, 33, 41))  # below SNAP
    cm = CorrectionMatrix.from_maps(noise[0], noise[1], shape_out="bounds", backend=backend)
    assert (cm.offset, cm.shape_out, cm.nnz) == ((0, 0), (32, 40), 32 * 40)


def test_offset_places_a_moved_pixel(backend):
    # The right half (x >= 24) moves by a whole (-4, +6) px, the left half stays: the
    # frame spans y = -4 .. 30 and x = 0 .. 46, so offset (-4, 0) and shape (34, 46).
    ny, nx = 30, 40
    dy, dx = np.zeros((ny + 1, nx + 1)), np.zeros((ny + 1, nx + 1))
    dy[:, 24:] = -4.0
    dx[:, 24:] = 6.0
    img = np.zeros((ny, nx))
    img[1, 37] = 1000.0  # truly at (1 - 4, 37 + 6): above the input frame
    img[20, 5] = 500.0  # does not move
    cm = CorrectionMatrix.from_maps(dy, dx, shape_out="bounds", backend=backend, dtype=np.float64)
    assert (cm.offset, cm.shape_out) == ((-4, 0), (34, 46))
    out = cm.apply(img)
    want = np.zeros((34, 46))
    want[1 - 4 + 4, 37 + 6] = 1000.0
    want[20 + 4, 5] = 500.0
    assert_array_equal(out, want)
    # the input frame loses the first one
    lost = CorrectionMatrix.from_maps(dy, dx, backend=backend).apply(img)
    assert lost.sum() == 500.0
    assert lost[20, 5] == 500.0


def test_cover_frame_holds_the_input_frame_and_every_valid_pixel(backend):
    # A barrel: the bounds frame already holds the input frame, so cover is bounds.
    dy, dx = barrel_maps(48, 56, 4.0)
    bounds = CorrectionMatrix.from_maps(dy, dx, shape_out="bounds", backend=backend)
    cover = CorrectionMatrix.from_maps(dy, dx, shape_out="cover", backend=backend)
    assert (cover.offset, cover.shape_out) == (bounds.offset, bounds.shape_out)
    # A masked border (as a calibration masks the border beyond its holes) shrinks the
    # bounds frame to the valid pixels, not the cover frame: it stays the input frame.
    mask = np.ones((48, 56), np.uint8)
    mask[10:40, 12:50] = 0
    img = np.random.default_rng(45).random((48, 56))
    bounds = CorrectionMatrix.from_maps(dy, dx, mask=mask, shape_out="bounds", backend=backend)
    cover = CorrectionMatrix.from_maps(
        dy, dx, mask=mask, shape_out="cover", backend=backend, dtype=np.float64
    )
    assert bounds.shape_out[0] < 48
    assert bounds.shape_out[1] < 56
    assert (cover.offset, cover.shape_out) == ((0, 0), (48, 56))
    assert_allclose(cover.apply(img).sum(), img[mask == 0].sum(), rtol=1e-12)
    # A pincushion: the input frame holds every pixel, so cover is the input frame.
    dy, dx = barrel_maps(40, 44, -3.0)
    cover = CorrectionMatrix.from_maps(dy, dx, shape_out="cover", backend=backend)
    assert (cover.offset, cover.shape_out) == ((0, 0), (40, 44))
    # One side pushed out: the input frame grown on that side only.
    z = np.zeros((21, 31))
    cover = CorrectionMatrix.from_maps(z, z - 3.5, shape_out="cover", backend=backend)
    assert (cover.offset, cover.shape_out) == ((0, -4), (20, 34))
    with pytest.raises(CcdgridError, match='`offset` must be None with shape_out="cover"'):
        CorrectionMatrix.from_maps(z, z, shape_out="cover", offset=(0, 0), backend=backend)


def test_explicit_offset_gives_the_bounds_matrix(backend):
    dy, dx = barrel_maps(40, 44, 3.0)
    auto = CorrectionMatrix.from_maps(dy, dx, shape_out="bounds", backend=backend)
    manual = CorrectionMatrix.from_maps(
        dy, dx, shape_out=auto.shape_out, offset=auto.offset, backend=backend
    )
    assert manual.offset == auto.offset
    assert (manual.matrix != auto.matrix).nnz == 0
    # an offset alone keeps the input shape
    moved = CorrectionMatrix.from_maps(dy, dx, offset=(2, -3), backend=backend)
    assert (moved.shape_out, moved.offset) == ((40, 44), (2, -3))


def test_masked_and_invalid_corners_do_not_widen_the_bounds(backend):
    dy, dx = barrel_maps(48, 56, 3.0)
    want = true_extent(dy, dx)
    dy, dx = dy.copy(), dx.copy()
    dy[10, 12] = np.nan  # a non-finite corner: its four pixels are invalid
    dx[30, 40] = 400.0  # a wild corner inside a corner-shaped mask
    dy[40, 3] = -1e6  # a wild corner, unmasked: its pixels are degenerate (> MAX_SPAN)
    mask = np.zeros((49, 57), bool)
    mask[30, 40] = True
    cm = CorrectionMatrix.from_maps(dy, dx, mask=mask, shape_out="bounds", backend=backend)
    assert (cm.offset, cm.shape_out) == want
    assert correction.output_bounds(dy, dx, mask=mask, backend=backend) == want
    assert (cm.n_masked, cm.n_invalid, cm.n_degenerate) == (4, 4, 4)


def test_absurd_maps_give_a_clear_error_not_a_huge_frame(backend):
    z = np.zeros((33, 33))
    with pytest.raises(CcdgridError, match=r"edges by more than 0.5 of its size \(at most 2x"):
        CorrectionMatrix.from_maps(z + 1e5, z, shape_out="bounds", backend=backend)
    # half the detector's size beyond its edges is still allowed
    cm = CorrectionMatrix.from_maps(z - 16, z, shape_out="bounds", backend=backend)
    assert (cm.offset, cm.shape_out) == ((-16, 0), (32, 32))
    with pytest.raises(CcdgridError, match=r"more than 0\.5 of its size"):
        CorrectionMatrix.from_maps(z - 17, z, shape_out="bounds", backend=backend)


def test_bounds_with_no_valid_pixel_fall_back_to_the_input_frame(backend):
    z = np.zeros((9, 11))
    cm = CorrectionMatrix.from_maps(z, z, mask=np.ones((8, 10)), shape_out="bounds",
                                    backend=backend)  # fmt: skip
    assert (cm.offset, cm.shape_out, cm.nnz) == ((0, 0), (8, 10), 0)


def test_bad_offsets_are_rejected():
    z = np.zeros((5, 5))
    for bad in [(1.5, 0), (True, 0), (1,), 3, (0, 2**41)]:
        with pytest.raises(CcdgridError, match="`offset` must be two integers"):
            CorrectionMatrix.from_maps(z, z, offset=bad)
    with pytest.raises(CcdgridError, match='`offset` must be None with shape_out="bounds"'):
        CorrectionMatrix.from_maps(z, z, shape_out="bounds", offset=(0, 0))
    with pytest.raises(CcdgridError, match="`shape_out` must be None, "):
        CorrectionMatrix.from_maps(z, z, shape_out="bound")
    with pytest.raises(CcdgridError, match="`offset` must be two integers"):
        correct(np.zeros((4, 4)), SimpleNamespace(dy=z, dx=z, mask=None), offset=(0.5, 0))


def test_correct_caches_each_frame_apart():
    correction.clear_cache()
    dy, dx = barrel_maps(24, 24, 2.0)
    det = SimpleNamespace(dy=dy, dx=dx, mask=None)
    img = np.random.default_rng(45).random((24, 24))
    bounds = correct(img, det, shape_out="bounds")
    assert bounds.shape == true_extent(dy, dx)[1]
    assert correct(img, det).shape == (24, 24)
    assert correct(img, det, shape_out="input").shape == (24, 24)
    assert_array_equal(correct(img, det, shape_out="bounds"), bounds)
    assert len(correction._CACHE) == 2  # None and "input" are one frame
    correction.clear_cache()


# -- masks, invalid corners, degenerate pixels ----------------------------------------------------


def test_mask_excludes_pixels(backend):
    dy, dx = smooth_maps(20, 20, 1.5, seed=17)
    mask = np.zeros((20, 20), bool)
    mask[5:8, 9] = True
    cm = CorrectionMatrix.from_maps(dy, dx, mask=mask, backend=backend)
    assert cm.n_masked == 3
    col = np.asarray(cm.matrix.sum(axis=0)).reshape(20, 20)
    assert_array_equal(col[mask], 0.0)
    img = np.random.default_rng(17).random((20, 20))
    spoiled = img.copy()
    spoiled[mask] = np.nan
    assert_array_equal(cm.apply(spoiled), cm.apply(img * ~mask))


def test_corner_shaped_mask_flags_the_pixels_around_a_corner(backend):
    z = np.zeros((7, 7))
    corners = np.zeros((7, 7), bool)
    corners[3, 3] = True
    cm = CorrectionMatrix.from_maps(z, z, mask=corners, backend=backend)
    assert cm.n_masked == 4
    col = np.asarray(cm.matrix.sum(axis=0)).reshape(6, 6)
    want = np.ones((6, 6))
    want[2:4, 2:4] = 0.0
    assert_array_equal(col, want)


def test_nan_corner_masks_the_four_pixels_sharing_it(backend):
    dy, dx = smooth_maps(12, 12, 1.0, seed=18)
    dx[4, 6] = np.nan
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    assert cm.n_invalid == 4
    assert cm.n_degenerate == 0
    col = np.asarray(cm.matrix.sum(axis=0, dtype=np.float64)).reshape(12, 12)
    invalid = np.zeros((12, 12), bool)
    invalid[3:5, 5:7] = True
    assert_array_equal(col[invalid], 0.0)
    inside = inside_pixels(np.nan_to_num(dy), np.nan_to_num(dx), (12, 12)) & ~invalid
    assert_allclose(col[inside], 1.0, atol=1e-6)


def test_folded_and_bow_tie_pixels_are_dropped_and_counted(backend):
    z = np.zeros((9, 9))
    dy, dx = z.copy(), z.copy()
    dy[3, 3] = 1.6  # corner A of pixel (3, 3) passes below its B: a bow tie
    dx[6, 6] = 1.2  # corner A of pixel (6, 6) passes right of its D: a bow tie
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    assert cm.n_degenerate >= 2
    col = np.asarray(cm.matrix.sum(axis=0)).reshape(8, 8)
    assert col[3, 3] == 0.0
    assert np.isfinite(cm.apply(np.ones((8, 8)))).all()


def test_huge_displacements_do_not_crash(backend):
    z = np.zeros((6, 6))
    dy, dx = z.copy(), z.copy()
    dy[2, 2] = 1e300
    dx[0, 0] = -1e17
    dy[5, 5] = 40.0  # a spike: pixel (4, 4) becomes taller than MAX_SPAN
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    assert cm.n_degenerate == 4 + 1 + 1
    assert np.isfinite(cm.apply(np.ones((5, 5)))).all()


def test_pixels_outside_the_output_are_not_degenerate(backend):
    z = np.zeros((6, 6))
    cm = CorrectionMatrix.from_maps(z + 100.0, z, backend=backend)
    assert cm.nnz == 0
    assert cm.n_degenerate == 0
    assert_array_equal(cm.apply(np.ones((5, 5)), dummy=-1.0), -1.0)


# -- apply: dtypes, normalisation, NaN, stacks ----------------------------------------------------


def test_normalize_divides_by_coverage(backend):
    dy, dx = rotation_maps(30, 30, 10)
    mask = np.zeros((30, 30), bool)
    mask[10:13, 14] = True
    cm = CorrectionMatrix.from_maps(dy, dx, mask=mask, backend=backend, dtype=np.float64)
    flat = np.full((30, 30), 7.0)
    raw = cm.apply(flat, dummy=np.nan)
    norm = cm.apply(flat, normalize=True, dummy=np.nan)
    covered = cm.coverage > 0
    assert_allclose(norm[covered], 7.0, rtol=1e-12)
    assert_allclose(raw[covered], 7.0 * cm.coverage[covered], rtol=1e-12)
    assert np.isnan(norm[~covered]).all()
    assert (~covered).sum() > 0
    assert (cm.coverage < 1 - 1e-3).sum() > 20  # edges and the masked hole


def test_nan_input_touches_only_its_output_pixels(backend):
    dy, dx = smooth_maps(16, 16, 1.5, seed=19)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    img = np.ones((16, 16), np.float32)
    img[7, 8] = np.nan
    out = cm.apply(img)
    touched = (dense(cm)[:, 7 * 16 + 8] > 0).reshape(16, 16)
    assert touched.sum() >= 1
    assert_array_equal(np.isnan(out), touched)


@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [
        (np.float64, np.float64),
        (np.float32, np.float32),
        (np.uint16, np.float32),
        (np.int32, np.float32),
        (bool, np.float32),
    ],
)
def test_output_dtype(backend, dtype, out_dtype):
    dy, dx = smooth_maps(10, 12, 1.0, seed=20)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    img = (np.random.default_rng(20).random((10, 12)) * 100).astype(dtype)
    out = cm.apply(img)
    assert out.dtype == out_dtype
    want = cm.matrix.astype(np.float64) @ img.astype(np.float64).ravel()
    assert_allclose(out.ravel(), want, rtol=1e-5 if out_dtype == np.float32 else 1e-12)


def test_stack_equals_images_one_by_one(backend):
    dy, dx = smooth_maps(14, 18, 1.0, seed=21)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    stack = np.random.default_rng(21).random((3, 14, 18)).astype(np.float32)
    out = cm.apply(stack, normalize=True)
    assert out.shape == (3, 14, 18)
    for k in range(3):
        assert_allclose(out[k], cm.apply(stack[k], normalize=True), rtol=1e-6)


def test_cython_and_numpy_apply_agree():
    dy, dx = smooth_maps(20, 24, 2.0, seed=22)
    a = CorrectionMatrix.from_maps(dy, dx, backend="cython")
    b = CorrectionMatrix.from_maps(dy, dx, backend="numpy")
    img = np.random.default_rng(22).random((2, 20, 24))
    assert_allclose(a.apply(img, normalize=True), b.apply(img, normalize=True), rtol=1e-12)


# -- input validation -----------------------------------------------------------------------------


def test_bad_maps_are_rejected():
    z = np.zeros((5, 5))
    with pytest.raises(CcdgridError, match="`dy` must be a corner map"):
        CorrectionMatrix.from_maps(np.zeros(5), np.zeros(5))
    with pytest.raises(CcdgridError, match=r"`dx` \(shape \(5, 6\)\) must have the shape"):
        CorrectionMatrix.from_maps(z, np.zeros((5, 6)))
    with pytest.raises(CcdgridError, match="`dy` must hold real numbers"):
        CorrectionMatrix.from_maps(z.astype(complex), z)
    with pytest.raises(CcdgridError, match=r"`mask` \(shape \(5, 4\)\) must have the pixel"):
        CorrectionMatrix.from_maps(z, z, mask=np.zeros((5, 4)))
    with pytest.raises(CcdgridError, match=r"`shape_out` must be None, .* positive integers"):
        CorrectionMatrix.from_maps(z, z, shape_out=(4, 0))
    with pytest.raises(CcdgridError, match=r"`shape_out` must be None, .* positive integers"):
        CorrectionMatrix.from_maps(z, z, shape_out=(4.5, 3))
    with pytest.raises(CcdgridError, match="`backend` must be one of"):
        CorrectionMatrix.from_maps(z, z, backend="opencl")
    with pytest.raises(CcdgridError, match="`dtype` must be float32 or float64"):
        CorrectionMatrix.from_maps(z, z, dtype=np.int32)


def test_bad_images_are_rejected():
    z = np.zeros((5, 5))
    cm = CorrectionMatrix.from_maps(z, z)
    with pytest.raises(CcdgridError, match=r"`image` must have shape \(4, 4\)"):
        cm.apply(np.zeros((5, 4)))
    with pytest.raises(CcdgridError, match="`image` must hold real numbers"):
        cm.apply(np.zeros((4, 4), complex))


# -- correct(): detectors, cache ------------------------------------------------------------------


def test_correct_with_a_detector_object_and_cache():
    correction.clear_cache()
    dy, dx = smooth_maps(16, 16, 1.0, seed=23)
    det = SimpleNamespace(dy=dy, dx=dx, mask=None)
    img = np.random.default_rng(23).random((16, 16)).astype(np.float32)
    want = CorrectionMatrix.from_maps(dy, dx).apply(img)
    assert_array_equal(correct(img, det), want)
    assert_array_equal(correct(img, det), want)
    assert len(correction._CACHE) == 1
    det.dx = dx + 0.5  # a new map is a new matrix
    assert not np.array_equal(correct(img, det), want)
    assert len(correction._CACHE) == 2
    correction.clear_cache()


def test_correct_rejects_objects_without_maps():
    with pytest.raises(CcdgridError, match="missing: mask"):
        correct(np.zeros((4, 4)), SimpleNamespace(dx=np.zeros((5, 5)), dy=np.zeros((5, 5))))


# -- pyFAI parity (pyFAI >= 2026.9) ---------------------------------------------------------------


def pyfai_correct(dy, dx, img):
    detectors = pytest.importorskip("pyFAI.detectors")
    distortion = pytest.importorskip("pyFAI.distortion")
    shape = img.shape
    det = detectors.Detector(1.0, 1.0, max_shape=shape)  # pixel 1.0: exact corners (§3.2)
    det.set_dx(dx)
    det.set_dy(dy)
    dis = distortion.Distortion(det, mask=np.zeros(shape, np.int8))
    return dis.correct(img)


@pytest.mark.parametrize(("sy", "sx"), [(0.0, 2.5), (1.25, 0.0), (-0.75, 0.4)])
def test_pure_shifts_match_pyfai(sy, sx):
    z = np.zeros((33, 29))
    img = np.random.default_rng(24).random((32, 28)).astype(np.float32) * 1000
    ours = CorrectionMatrix.from_maps(z + sy, z + sx).apply(img)
    assert_allclose(ours, pyfai_correct(z + sy, z + sx, img), rtol=0, atol=1e-3)


def test_smooth_distortion_matches_pyfai_within_its_row_strip_error():
    # pyFAI is exact along rows and treats each edge as flat in x within a row strip
    # (§4.4). For an edge of slope s = dx/dy crossing a column line inside a strip,
    # the flux it misplaces across that line is at most |s| / 8 of a pixel; with
    # smooth maps |s| <= max |∂dx/∂y| + max |∂dy/∂x| ≈ 0.1 here, so each output
    # pixel may differ by at most a few 1e-2 of the intensity scale.
    dy, dx = smooth_maps(48, 48, 1.5, seed=25)
    slope = max(np.abs(np.diff(dx, axis=0)).max(), np.abs(np.diff(dy, axis=1)).max())
    assert slope < 0.15
    img = np.random.default_rng(25).random((48, 48)).astype(np.float32)
    ours = CorrectionMatrix.from_maps(dy, dx).apply(img)
    theirs = pyfai_correct(dy, dx, img)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 4 * slope / 8
    assert diff.mean() < diff.max() / 3  # most pixels agree much better
    assert_allclose(ours.sum(), theirs.sum(), rtol=1e-5)  # both conserve flux


# -- the ``ccdgrid correct`` command ---------------------------------------------


def write_detector(path, dy, dx, mask=None):
    from ccdgrid.detector_file import save_detector

    cal = SimpleNamespace(dy=dy, dx=dx, pixel_size=(5e-5, 5e-5), mask=mask)
    return save_detector(path, cal)


def write_inputs(directory, images):
    """Write images[0] as .npy, images[1] as .edf, images[2] as .tif; return the paths."""
    import fabio.edfimage
    import fabio.tifimage

    paths = [directory / "a.npy", directory / "b.edf", directory / "c.tif"][: len(images)]
    writers = [
        lambda p, d: np.save(p, d),
        lambda p, d: fabio.edfimage.EdfImage(data=d).write(str(p)),
        lambda p, d: fabio.tifimage.TifImage(data=d).write(str(p)),
    ]
    for path, image, write in zip(paths, images, writers, strict=False):
        write(path, image)
    return paths


def test_cli_correct_builds_once_and_writes_every_image(tmp_path, backend, capsys):
    from ccdgrid.cli import main
    from ccdgrid.detector_file import load

    dy, dx = smooth_maps(40, 48, 1.5, seed=30)
    mask = np.zeros((40, 48), np.int8)
    mask[7, 9:12] = 1
    det = write_detector(tmp_path / "det.h5", dy, dx, mask)
    rng = np.random.default_rng(30)
    images = [rng.integers(0, 4000, (40, 48)).astype(np.uint16) for _ in range(3)]
    paths = write_inputs(tmp_path, images)
    out = tmp_path / "out" / "new"

    argv = ["correct", *map(str, paths), "-d", str(det), "-o", str(out), "--backend", backend]
    assert main(argv) == 0

    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("detector ") for line in printed) == 1
    frame_lines = [line for line in printed if line.startswith("output frame (cover): ")]
    assert len(frame_lines) == 1
    assert [line.split()[1] for line in printed if line.startswith("wrote ")] == [
        str(out / "a_corrected.npy"),
        str(out / "b_corrected.edf"),
        str(out / "c_corrected.tif"),
    ]
    assert sorted(os.listdir(out)) == ["a_corrected.npy", "b_corrected.edf", "c_corrected.tif"]
    # the stored maps are float32: the expectation uses what the file holds, built by
    # the numpy twin so that the command's engine is checked against the other one
    rec = load(det)
    for name, image in zip(["a_corrected.npy", "b_corrected.edf", "c_corrected.tif"], images,
                           strict=True):  # fmt: skip
        expected = correct(image, rec, shape_out="cover", backend="numpy", cache=False)
        got = np.load(out / name) if name.endswith(".npy") else fabio_read(out / name)
        assert got.dtype == np.float32
        assert_allclose(got, expected, rtol=2e-6, atol=1e-3)


def fabio_read(path):
    import fabio

    return fabio.open(str(path)).data


def test_cli_correct_normalize_dummy_and_format(tmp_path):
    from ccdgrid.cli import main

    # a shift of +2.5 px along x: output column l >= 3 holds half of input columns
    # l - 3 and l - 2; column 2 only half of column 0; columns 0 and 1 nothing
    z = np.zeros((25, 21))
    det = write_detector(tmp_path / "det.h5", z, z + 2.5)
    image = np.random.default_rng(31).random((24, 20)) * 100
    np.save(tmp_path / "frame.npy", image)
    argv = ["correct", str(tmp_path / "frame.npy"), "-d", str(det), "-o", str(tmp_path)]
    assert (
        main([*argv, "--normalize", "--dummy", "nan", "--format", "edf", "--frame", "input"]) == 0
    )

    got = fabio_read(tmp_path / "frame_corrected.edf")
    assert got.dtype == np.float64  # float64 input stays float64
    assert np.isnan(got[:, :2]).all()
    assert_allclose(got[:, 2], image[:, 0], rtol=1e-12)
    assert_allclose(got[:, 3:], 0.5 * (image[:, :-3] + image[:, 1:-2]), rtol=1e-12)


def test_cli_correct_bounds_frame_keeps_every_column_and_writes_the_offset(tmp_path, capsys):
    import fabio

    from ccdgrid.cli import main

    # the same +2.5 px shift along x: the input spans x = 2.5 .. 22.5, so the bounds
    # frame starts at input x = 2 and is 21 columns wide; its column 0 = [2, 3] holds
    # half of input column 0, column 20 = [22, 23] half of column 19
    z = np.zeros((25, 21))
    det = write_detector(tmp_path / "det.h5", z, z + 2.5)
    image = np.random.default_rng(32).random((24, 20)) * 100
    np.save(tmp_path / "frame.npy", image)
    argv = ["correct", str(tmp_path / "frame.npy"), "-d", str(det), "-o", str(tmp_path)]
    assert main([*argv, "--format", "edf", "--frame", "bounds"]) == 0
    assert "output frame (bounds): 24 x 21, offset 0 2 " in capsys.readouterr().out

    edf = fabio.open(str(tmp_path / "frame_corrected.edf"))
    assert edf.header["ccdgrid_offset_y"] == "0"
    assert edf.header["ccdgrid_offset_x"] == "2"
    assert "frame=bounds" in edf.header["ccdgrid_correct"]
    got = edf.data
    assert got.shape == (24, 21)
    assert_allclose(got[:, 0], 0.5 * image[:, 0], rtol=1e-12)
    assert_allclose(got[:, 1:-1], 0.5 * (image[:, :-1] + image[:, 1:]), rtol=1e-12)
    assert_allclose(got[:, -1], 0.5 * image[:, -1], rtol=1e-12)
    assert_allclose(got.sum(), image.sum(), rtol=1e-12)

    # the default frame also holds the input frame: columns 0 and 1, which nothing reaches
    assert main([*argv, "--format", "npy"]) == 0
    assert "output frame (cover): 24 x 23, offset 0 0 " in capsys.readouterr().out
    cover = np.load(tmp_path / "frame_corrected.npy")
    assert_array_equal(cover[:, :2], 0.0)
    assert_array_equal(cover[:, 2:], got)

    # npy has no header: the offset is printed (already checked) and --frame input is 0 0
    assert main([*argv, "--format", "npy", "--frame", "input"]) == 0
    assert "output frame (input): 24 x 20, offset 0 0 " in capsys.readouterr().out
    assert np.load(tmp_path / "frame_corrected.npy").shape == (24, 20)


def test_cli_correct_missing_detector_leaves_nothing(tmp_path, capsys):
    from ccdgrid.cli import main

    np.save(tmp_path / "a.npy", np.ones((8, 8)))
    out = tmp_path / "out"
    code = main(["correct", str(tmp_path / "a.npy"), "-d", str(tmp_path / "nope.h5"),
                 "-o", str(out)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("ccdgrid: error: detector file not found")
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_correct_shape_mismatch_leaves_nothing(tmp_path, capsys):
    from ccdgrid.cli import main

    z = np.zeros((17, 17))
    det = write_detector(tmp_path / "det.h5", z, z)
    np.save(tmp_path / "small.npy", np.ones((16, 15)))
    out = tmp_path / "out"
    assert main(["correct", str(tmp_path / "small.npy"), "-d", str(det), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"small\.npy has shape \(16, 15\), but the detector .* is \(16, 16\)", err)
    assert not out.exists()


def test_cli_correct_points_a_stack_to_correct_stack(tmp_path, capsys):
    # `correct`'s --frame is the output frame: read_image's advice to pass
    # --frame to choose an input frame was wrong for it
    import h5py

    from ccdgrid.cli import main

    z = np.zeros((17, 17))
    det = write_detector(tmp_path / "det.h5", z, z)
    with h5py.File(tmp_path / "scan.h5", "w") as h5:
        h5["/entry/data"] = np.ones((3, 16, 16), np.uint16)
    out = tmp_path / "out"
    source = f"{tmp_path / 'scan.h5'}::/entry/data"
    assert main(["correct", source, "-d", str(det), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "holds 3 frames; `ccdgrid correct` corrects single images" in err
    assert f"`ccdgrid correct-stack {source} -d {det} -o OUT.h5`" in err
    assert "--frame" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["read-only directory", "read-only parent", "a file"])
def test_cli_correct_refuses_an_unwritable_output_before_the_matrix(
    tmp_path, capsys, monkeypatch, case
):
    import os

    import ccdgrid._h5write as h5write
    from ccdgrid import correction
    from ccdgrid.cli import main

    z = np.zeros((17, 17))
    det = write_detector(tmp_path / "det.h5", z, z)
    np.save(tmp_path / "a.npy", np.ones((16, 16)))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = os.access
    no = lambda p, mode: False if str(p) == str(read_only) else real(p, mode)  # noqa: E731
    monkeypatch.setattr(h5write.os, "access", no)
    monkeypatch.setattr(os, "access", no)
    monkeypatch.setattr(correction.CorrectionMatrix, "from_maps", None)  # never built
    out = {
        "read-only directory": read_only,
        "read-only parent": read_only / "new",
        "a file": tmp_path / "a.npy",
    }[case]
    assert main(["correct", str(tmp_path / "a.npy"), "-d", str(det), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert {
        "read-only directory": f"directory {read_only} is not writable",
        "read-only parent": f"the corrected image {out}/a_corrected.npy: directory {read_only} is",
        "a file": f"{out} exists and is not a directory",
    }[case] in err
    assert sorted(os.listdir(read_only)) == []


def test_cli_correct_refuses_two_inputs_with_one_output_name(tmp_path, capsys):
    from ccdgrid.cli import main

    z = np.zeros((9, 9))
    det = write_detector(tmp_path / "det.h5", z, z)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "x.npy", np.ones((8, 8)))
    argv = ["correct", str(tmp_path / "a" / "x.npy"), str(tmp_path / "b" / "x.npy"),
            "-d", str(det), "-o", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 1
    assert "would both be written to x_corrected.npy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_correct_failed_write_leaves_no_file(tmp_path, monkeypatch, capsys):
    from ccdgrid.cli import main

    z = np.zeros((9, 9))
    det = write_detector(tmp_path / "det.h5", z, z)
    np.save(tmp_path / "x.npy", np.ones((8, 8)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_corrected.npy").write_bytes(b"old")

    def disk_full(stream, data):
        stream.write(b"partial")
        raise OSError(28, "No space left on device", str(out / "x_corrected.npy"))

    monkeypatch.setattr(np, "save", disk_full)
    assert main(["correct", str(tmp_path / "x.npy"), "-d", str(det), "-o", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(out) == ["x_corrected.npy"]
    assert (out / "x_corrected.npy").read_bytes() == b"old"  # the old file is untouched


# -- apply: out=, integer images read as they are --------------------------------


@pytest.mark.parametrize("weights", ["float32", "float64"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "bool"])
def test_integer_images_give_the_float32_result_exactly(backend, weights, dtype):
    rng = np.random.default_rng(41)
    dy, dx = smooth_maps(24, 31, 1.5, seed=41)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend, dtype=weights)
    info = np.iinfo(dtype) if dtype != "bool" else None
    low, high = (0, 2) if info is None else (info.min, info.max)
    stack = rng.integers(low, high, (3, 24, 31), endpoint=True).astype(dtype)
    out = cm.apply(stack, dummy=-1.0)
    assert out.dtype == np.float32
    assert_array_equal(out, cm.apply(stack.astype(np.float32), dummy=-1.0))
    assert_array_equal(cm.apply(stack[1]), cm.apply(stack[1].astype(np.float32)))


@pytest.mark.parametrize("dtype", ["uint16", "float32", "float64"])
def test_apply_into_out_returns_out_with_the_same_values(backend, dtype):
    rng = np.random.default_rng(42)
    dy, dx = smooth_maps(20, 22, 2.0, seed=42)
    cm = CorrectionMatrix.from_maps(dy, dx, backend=backend)
    stack = (rng.uniform(0, 4000, (2, 20, 22))).astype(dtype)
    work = np.float64 if dtype == "float64" else np.float32
    out = np.full((2, 20, 22), 7.0, dtype=work)
    assert cm.apply(stack, normalize=True, out=out) is out
    assert_array_equal(out, cm.apply(stack, normalize=True))
    single = np.empty((20, 22), dtype=work)
    assert cm.apply(stack[0], out=single) is single
    assert_array_equal(single, cm.apply(stack[0]))


def test_apply_rejects_an_unsuitable_out():
    dy, dx = smooth_maps(10, 12, 1.0, seed=43)
    cm = CorrectionMatrix.from_maps(dy, dx)
    image = np.ones((10, 12), dtype=np.uint16)
    with pytest.raises(CcdgridError, match=r"`out` must be a C-contiguous float32 array"):
        cm.apply(image, out=np.empty((10, 12), dtype=np.float64))
    with pytest.raises(CcdgridError, match=r"of shape \(10, 12\), got float32 \(1, 10, 12\)"):
        cm.apply(image, out=np.empty((1, 10, 12), dtype=np.float32))
    with pytest.raises(CcdgridError, match="not C-contiguous"):
        cm.apply(image, out=np.empty((12, 10), dtype=np.float32).T)
    with pytest.raises(CcdgridError, match="numpy array"):
        cm.apply(image, out=[[0.0] * 12] * 10)
    frozen = np.empty((10, 12), dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises(CcdgridError, match="writeable"):
        cm.apply(image, out=frozen)
    same = np.ones((10, 12), dtype=np.float32)
    with pytest.raises(CcdgridError, match="must not overlap"):
        cm.apply(same, out=same)


# -- the chunk-encoding kernel (HDF5 shuffle) -----------------------------------


@pytest.fixture(params=["cython", "numpy"])
def chunk_kernels(request):
    return kernel if request.param == "cython" else reference


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 65535, 65536, 140001])
def test_shuffle_planes_writes_each_byte_plane_in_place(chunk_kernels, itemsize, n):
    rng = np.random.default_rng(44)
    src = rng.integers(0, 256, n * itemsize, dtype=np.uint8)
    stored = (np.arange(itemsize) % 2 == 0).astype(np.uint8)
    blocks = -(-n // 65535)
    sizes = [n + 5 * blocks if s else n for s in stored]
    starts = np.cumsum([3, *sizes[:-1]]).astype(np.int64)
    dst = np.full(3 + sum(sizes) + 2, 0xAB, dtype=np.uint8)
    chunk_kernels.shuffle_planes(src, itemsize, dst, starts, stored)
    # nothing outside the spans
    assert (dst[:3] == 0xAB).all()
    assert (dst[-2:] == 0xAB).all()
    for k in range(itemsize):
        plane = src[k::itemsize]  # byte k of every element
        at = int(starts[k])
        if not stored[k]:
            assert_array_equal(dst[at : at + n], plane)
            continue
        for b in range(blocks):
            count = min(65535, n - 65535 * b)
            head = at + b * 65540
            assert dst[head] == 0  # not final, stored
            assert int(dst[head + 1]) | int(dst[head + 2]) << 8 == count
            assert int(dst[head + 3]) | int(dst[head + 4]) << 8 == count ^ 0xFFFF
            assert_array_equal(dst[head + 5 : head + 5 + count], plane[65535 * b :][:count])


@pytest.mark.parametrize(("offset", "text"), [(0, "k"), (3, "k + 3"), (-56, "k - 56")])
def test_offsets_are_printed_with_their_sign(offset, text):
    from ccdgrid.correction import _plus

    assert _plus("k", offset) == text
