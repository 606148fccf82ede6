"""Peak climbing and sub-pixel refinement (ccdgrid.bilinear), every engine.

Tolerances: integer outputs and float outputs of the two engines are compared
exactly (both do the same float32 operations in the same order); analytic
expectations that pass through float32 arithmetic use ``atol=1e-6`` px; the
parity with pyFAI is checked exactly and, as the contract states, within
1e-5 px.
"""

import importlib.metadata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ccdgrid._ext import _bilinear as _cython
from ccdgrid.bilinear import Bilinear, _as_seeds, climb, refine_peaks
from ccdgrid.errors import CcdgridError

BACKENDS = ["cython", "numpy"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=["avx2", "four-lane"])
def lanes(request):
    """The compiled engine's vector path for seeds at maxima: eight lanes
    (AVX2, where the CPU has it) or four; restored after the test."""
    before = _cython.use_avx2()
    if request.param == "avx2" and not _cython.use_avx2(True):
        _cython.use_avx2(before)
        pytest.skip("this CPU has no AVX2")
    if request.param == "four-lane":
        _cython.use_avx2(False)
    yield request.param
    _cython.use_avx2(before)


def gaussian_image(rng, shape, n_peaks, *, background=10.0, noise=1.0):
    """Anisotropic, rotated Gaussian peaks on a noisy background (float64)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full(shape, background)
    for _ in range(n_peaks):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sy, sx = rng.uniform(0.7, 4.0, 2)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u = (yy - cy) * c + (xx - cx) * s
        v = -(yy - cy) * s + (xx - cx) * c
        img += rng.uniform(100, 2000) * np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2))
    return img + rng.normal(0, noise, shape)


def random_seeds(rng, shape, n):
    h, w = shape
    return np.column_stack([rng.uniform(-0.49, h - 0.51, n), rng.uniform(-0.49, w - 0.51, n)])


# --- the two engines agree ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
def test_engines_agree_exactly_on_gaussian_peaks(dtype):
    rng = np.random.default_rng(11)
    img = gaussian_image(rng, (96, 128), 25).astype(dtype)
    seeds = random_seeds(rng, img.shape, 500)
    cy = refine_peaks(img, seeds, backend="cython")
    ref = refine_peaks(img, seeds, backend="numpy")
    np.testing.assert_array_equal(cy, ref)
    np.testing.assert_array_equal(
        climb(img, seeds, backend="cython"), climb(img, seeds, backend="numpy")
    )


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda img: np.round(img / 100), id="quantised-ties"),
        pytest.param(lambda img: img - 400.0, id="negative"),
        pytest.param(lambda img: np.where(img > 300, np.nan, img), id="nan-pixels"),
        pytest.param(lambda img: np.zeros_like(img), id="flat"),
    ],
)
def test_engines_agree_exactly_on_hard_images(make):
    rng = np.random.default_rng(12)
    img = make(gaussian_image(rng, (80, 90), 20))
    seeds = random_seeds(rng, img.shape, 400)
    np.testing.assert_array_equal(
        refine_peaks(img, seeds, backend="cython"), refine_peaks(img, seeds, backend="numpy")
    )


def test_non_contiguous_views_give_the_same_as_copies(backend):
    rng = np.random.default_rng(13)
    big = gaussian_image(rng, (120, 160), 30).astype(np.float32)
    for view in (big[::2, 1::3], big.T, big[10:70, 20:90]):
        assert not view.flags.c_contiguous
        seeds = random_seeds(rng, view.shape, 100)
        np.testing.assert_array_equal(
            refine_peaks(view, seeds, backend=backend),
            refine_peaks(np.ascontiguousarray(view), seeds, backend=backend),
        )


# --- behaviour stated in the contract -------------------------------------------------


def test_two_pixel_plateau_refines_to_its_midpoint(backend):
    img = np.zeros((5, 6), np.float32)
    img[2, 2:4] = 1.0
    np.testing.assert_array_equal(refine_peaks(img, [(1, 1)], backend=backend), [[2.0, 2.5]])


def test_gaussian_peak_is_found_close_to_its_true_centre(backend):
    yy, xx = np.mgrid[0:21, 0:21]
    img = 1000 * np.exp(-0.5 * (((yy - 10.3) / 2.5) ** 2 + ((xx - 9.8) / 3.0) ** 2))
    (y, x) = refine_peaks(img, [(5, 15)], backend=backend)[0]
    # A 3x3 quadratic fit of a Gaussian sampled at 2.5-3 px width is biased
    # by a few hundredths of a pixel, no more.
    assert abs(y - 10.3) < 0.05
    assert abs(x - 9.8) < 0.05


def test_singular_hessian_falls_back_to_centre_of_mass(backend):
    # Rows y-1 and y are equal plateaus, row y+1 is zero: d2/dx2 = 0, so the
    # Hessian is singular, and the centre of mass is half a row up.
    img = np.zeros((7, 7), np.float32)
    img[2:4, 2:5] = 3.0
    np.testing.assert_allclose(
        refine_peaks(img, [(3, 3)], backend=backend), [[2.5, 3.0]], rtol=0, atol=1e-6
    )


def test_newton_step_beyond_one_pixel_falls_back_to_centre_of_mass(backend):
    # For this patch the Newton offsets are (1.14, 1.43) px: rejected.
    patch = np.array([[5, 3, 0], [5, 6, 5], [0, 5, 5]], np.float32)
    img = np.zeros((5, 5), np.float32)
    img[1:4, 1:4] = patch
    rows, cols = np.mgrid[1:4, 1:4]
    expected = [(patch * rows).sum() / patch.sum(), (patch * cols).sum() / patch.sum()]
    np.testing.assert_allclose(
        refine_peaks(img, [(2, 2)], backend=backend), [expected], rtol=0, atol=1e-6
    )


def test_climb_breaks_ties_by_first_pixel_in_raster_order(backend):
    img = np.zeros((5, 5), np.float32)
    img[1, 1] = img[3, 3] = 2.0  # both neighbours of (2, 2), equal
    img[2, 2] = 1.0
    np.testing.assert_array_equal(climb(img, [(2, 2)], backend=backend), [[1, 1]])


def test_plateau_stops_the_climb(backend):
    img = np.ones((4, 4), np.float32)
    seeds = np.array([(0, 0), (1, 2), (3, 3)])
    np.testing.assert_array_equal(climb(img, seeds, backend=backend), seeds)


def test_float_seeds_round_half_to_even(backend):
    img = np.ones((6, 6), np.float32)  # every pixel stops the climb where it starts
    got = climb(img, [(2.5, 3.5), (1.5, 0.5), (0.49, 4.51)], backend=backend)
    np.testing.assert_array_equal(got, [[2, 4], [2, 0], [0, 5]])


def test_integer_and_float_seeds_agree(backend):
    rng = np.random.default_rng(14)
    img = gaussian_image(rng, (64, 64), 10)
    seeds = rng.integers(0, 64, (200, 2))
    np.testing.assert_array_equal(
        refine_peaks(img, seeds, backend=backend),
        refine_peaks(img, seeds.astype(np.float64), backend=backend),
    )


def test_nan_pixels_are_never_climbed_and_stop_refinement(backend):
    img = np.zeros((7, 7), np.float32)
    img[3, 3] = 5.0
    img[3, 4] = np.nan  # a NaN neighbour of the maximum
    img[5, 1] = np.nan  # a NaN start
    got = refine_peaks(img, [(2, 2), (5, 1)], backend=backend)
    # (3, 3) is reached; its patch holds NaN, so neither Newton nor the
    # centre of mass is defined and the pixel itself is returned.
    np.testing.assert_array_equal(got, [[3.0, 3.0], [5.0, 1.0]])


@pytest.mark.parametrize(
    ("peak", "seed"),
    [((0, 0), (1, 1)), ((0, 4), (1, 3)), ((5, 0), (4, 1)), ((5, 4), (4, 3)), ((2, 4), (2, 3))],
)
def test_maxima_on_the_border_are_not_refined(backend, peak, seed):
    img = np.zeros((6, 5), np.float32)
    img[peak] = 10.0
    img[seed] = 5.0
    np.testing.assert_array_equal(refine_peaks(img, [seed], backend=backend), [peak])


@pytest.mark.parametrize(
    ("shape", "peak"), [((1, 1), (0, 0)), ((1, 7), (0, 4)), ((7, 1), (2, 0)), ((2, 2), (1, 0))]
)
def test_tiny_images_return_integer_maxima(backend, shape, peak):
    # A single-peaked image: every seed climbs to the peak, which is on the
    # border of so thin an image and therefore not refined.
    yy, xx = np.indices(shape)
    img = -((yy - peak[0]) ** 2 + (xx - peak[1]) ** 2).astype(np.float64)
    seeds = np.array([(0, 0), (shape[0] - 1, shape[1] - 1)])
    np.testing.assert_array_equal(refine_peaks(img, seeds, backend=backend), [peak, peak])


@pytest.mark.parametrize("shape", [(3, 3), (3, 4), (4, 3), (5, 7), (8, 8)])
def test_every_interior_pixel_as_a_maximum_matches_the_numpy_twin(shape):
    """Each interior pixel in turn is the peak, the last one included.

    The compiled test for "no neighbour is higher" reads each row of the
    window four floats wide; at the last interior pixel it must not.
    """
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    seeds = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            img = rng.uniform(0, 1, shape).astype(np.float32)
            img[y, x] = 5.0
            img[y, x + 1] = 3.0
            np.testing.assert_array_equal(
                refine_peaks(img, seeds, backend="cython"),
                refine_peaks(img, seeds, backend="numpy"),
            )
            np.testing.assert_array_equal(
                climb(img, seeds, backend="cython"), climb(img, seeds, backend="numpy")
            )


@pytest.mark.parametrize("n", [1, 7, 8, 9, 600, 2000])
def test_many_seeds_in_any_order_match_the_numpy_twin(n):
    """Batches longer than the prefetch distance, shuffled and repeated seeds."""
    rng = np.random.default_rng(n)
    img = gaussian_image(rng, (150, 170), 60)
    seeds = np.column_stack([rng.integers(0, 150, n), rng.integers(0, 170, n)])
    seeds[n // 2 :] = seeds[: n - n // 2]
    np.testing.assert_array_equal(
        refine_peaks(img, seeds, backend="cython"), refine_peaks(img, seeds, backend="numpy")
    )


def local_maxima(img):
    """``(M, 2)`` int64 pixels of every local maximum reached from every pixel (numpy twin)."""
    h, w = img.shape
    every = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    return np.unique(climb(img, every, backend="numpy"), axis=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 13, 64])
def test_seeds_on_maxima_match_the_numpy_twin_for_any_batch_length(lanes, n):
    """Seeds that are maxima, the tutorial's case: the kernel refines them
    four at a time, one per vector lane, and the rest of the batch (a
    remainder of fewer than four, groups broken by a seed that climbs or a
    maximum on the border or in the last two columns) through a queue of
    lanes that is flushed partly filled at the end."""
    rng = np.random.default_rng(100 + n)
    img = gaussian_image(rng, (60, 70), 30).astype(np.float32)
    img[[5, 30, 50], -2] += 400  # maxima in the last interior column
    img[0, 30] = img[-1, 5] = img.max() + 1  # and on the border
    maxima = local_maxima(img)
    others = np.column_stack([rng.integers(0, 60, n), rng.integers(0, 70, n)])
    for mix in (0.0, 0.2, 0.5):
        pick = maxima[rng.integers(0, len(maxima), n)]
        seeds = np.where((rng.uniform(size=n) < mix)[:, None], others, pick)
        np.testing.assert_array_equal(
            refine_peaks(img, seeds, backend="cython"), refine_peaks(img, seeds, backend="numpy")
        )


@pytest.mark.parametrize("odd_one", range(4))
def test_a_rejected_newton_step_among_four_maxima_falls_back_alone(lanes, odd_one):
    """Four maxima refined together, one of which has a singular Hessian."""
    img = np.zeros((9, 40), np.float32)
    starts = [3, 11, 19, 27]
    for x in starts:
        img[3:6, x : x + 3] = [[1, 2, 1], [2, 5, 3], [1, 3, 2]]
    x0 = starts[odd_one]
    img[3:6, x0 : x0 + 3] = [[3, 3, 3], [3, 3, 3], [0, 0, 0]]  # as in the singular test
    seeds = np.array([(4, x + 1) for x in starts])
    expected = refine_peaks(img, seeds, backend="numpy")
    np.testing.assert_array_equal(refine_peaks(img, seeds, backend="cython"), expected)
    np.testing.assert_allclose(expected[odd_one], [3.5, x0 + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("nthreads", [0, 2, 3])
def test_threads_give_the_same_results_as_one(lanes, nthreads):
    """Batches of 8192 seeds and more are split in chunks between threads."""
    rng = np.random.default_rng(31)
    img = gaussian_image(rng, (200, 240), 120).astype(np.float32)
    maxima = local_maxima(img)
    n = 10_001
    seeds = np.concatenate(
        [
            maxima[rng.integers(0, len(maxima), n // 2)],
            np.column_stack([rng.integers(0, 200, n - n // 2), rng.integers(0, 240, n - n // 2)]),
        ]
    )
    seeds = seeds[rng.permutation(n)]
    one = refine_peaks(img, seeds, nthreads=1)
    np.testing.assert_array_equal(refine_peaks(img, seeds, nthreads=nthreads), one)
    np.testing.assert_array_equal(refine_peaks(img, seeds, backend="numpy"), one)


# --- the compiled engine's vector paths for seeds at maxima ---------------------------


def peak_windows(centres, neighbours, corners, pitch=4):
    """An image of separate 3x3 windows on a background of -inf, and their centres.

    Window ``k`` has centre value ``centres[k]``, edge neighbours
    ``neighbours[k]`` (up, left, right, down) and corners ``corners[k]``
    (raster order); windows are ``pitch`` px apart on a row, so that the
    compiled engine refines consecutive seeds together.
    """
    n = len(centres)
    img = np.full((5, pitch * n + 2), -np.inf, np.float32)
    seeds = np.array([(2, 2 + pitch * k) for k in range(n)])
    for k, (y, x) in enumerate(seeds):
        img[y, x] = centres[k]
        img[y - 1, x], img[y, x - 1], img[y, x + 1], img[y + 1, x] = neighbours[k]
        img[y - 1, x - 1], img[y - 1, x + 1], img[y + 1, x - 1], img[y + 1, x + 1] = corners[k]
    return img, seeds


def test_second_differences_are_pyfais_at_every_magnitude(lanes):
    """The eight-lane path takes the second differences in float32 when
    that is exact (centre c > 0, edge neighbours in [c / 2, c]) and in
    double otherwise, as pyFAI always does. Peaks whose Newton step is
    accepted, with neighbours above, at and below c / 2, from subnormal to
    near-overflow centres, and negative and zero centres, all agree with the
    numpy twin bit for bit."""
    rng = np.random.default_rng(41)
    f32 = np.float32
    centres, neighbours = [], []
    # One kind of window after the other, so that whole blocks take each way.
    # Opposite neighbours are close, so that the Newton step is accepted.
    for kind in ("near", "half", "below", "far"):
        for exponent in range(-149, 128):
            c = f32(np.ldexp(rng.uniform(1, 2), exponent))
            half = f32(c * f32(0.5))
            lo, hi = {
                "near": (0.5, 1.0),
                "half": (0.5, 0.5),
                "below": (0.3, 0.5),
                "far": (0.05, 0.3),
            }[kind]
            u, v = rng.uniform(lo, hi, 2) * c
            edge = np.array([u, v, v * 1.01, u * 0.99], f32)
            if kind == "half":
                edge[:2] = half
            centres.append(c)
            neighbours.append(np.minimum(edge, c))
    for c in (f32(-3.0), f32(-1e-30), f32(0.0)):
        centres += [c] * 8
        neighbours += [np.full(4, c, f32) - f32(rng.uniform(0, 2)) for _ in range(8)]
    corners = np.min(neighbours, axis=1)[:, None] * np.full((len(centres), 4), 0.5)
    img, seeds = peak_windows(centres, neighbours, corners.astype(f32))
    np.testing.assert_array_equal(
        refine_peaks(img, seeds, backend="cython"), refine_peaks(img, seeds, backend="numpy")
    )


@pytest.mark.parametrize("odd_one", range(8))
def test_a_rejected_newton_step_among_eight_maxima_falls_back_alone(lanes, odd_one):
    patch = np.array([[1, 2, 1], [2, 5, 3], [1, 3, 2]], np.float32)
    singular = np.array([[3, 3, 3], [3, 3, 3], [0, 0, 0]], np.float32)
    img = np.zeros((9, 4 * 9 + 2), np.float32)
    for k in range(9):
        img[3:6, 4 * k + 1 : 4 * k + 4] = singular if k == odd_one else patch
    seeds = np.array([(4, 4 * k + 2) for k in range(9)])
    expected = refine_peaks(img, seeds, backend="numpy")
    np.testing.assert_array_equal(refine_peaks(img, seeds, backend="cython"), expected)
    np.testing.assert_allclose(expected[odd_one], [3.5, 4 * odd_one + 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda img: img, id="gaussians"),
        pytest.param(lambda img: np.round(img / 60), id="plateaus"),
        pytest.param(lambda img: img - 300.0, id="negative"),
        pytest.param(lambda img: np.where(img > 400, np.nan, img), id="nan"),
        pytest.param(lambda img: np.where(img > 400, np.inf, img), id="inf"),
    ],
)
def test_batches_of_maxima_mixed_with_climbs_match_the_numpy_twin(lanes, make):
    """Runs of maxima long enough for both vector paths, broken by seeds
    that climb, at any offset in the batch."""
    rng = np.random.default_rng(42)
    img = make(gaussian_image(rng, (90, 110), 70)).astype(np.float32)
    maxima = local_maxima(img)
    n = 300
    seeds = maxima[rng.integers(0, len(maxima), n)]
    climbers = rng.uniform(size=n) < 0.08
    seeds[climbers] = np.column_stack(
        [rng.integers(0, 90, climbers.sum()), rng.integers(0, 110, climbers.sum())]
    )
    for start in range(0, 9):
        batch = seeds[start:]
        np.testing.assert_array_equal(
            refine_peaks(img, batch, backend="cython"), refine_peaks(img, batch, backend="numpy")
        )


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16, np.uint32, np.int64, np.float64])
def test_maxima_of_every_image_dtype_match_the_numpy_twin(lanes, dtype):
    rng = np.random.default_rng(43)
    img = gaussian_image(rng, (70, 90), 40)
    img = img > 300 if dtype is bool else (img / 4).astype(dtype)
    maxima = local_maxima(np.asarray(img, np.float32))
    seeds = maxima[rng.permutation(len(maxima))]
    np.testing.assert_array_equal(
        refine_peaks(img, seeds, backend="cython"), refine_peaks(img, seeds, backend="numpy")
    )


@pytest.mark.parametrize("shape", [(1, 9), (2, 9), (3, 3), (3, 4), (9, 3), (4, 5)])
def test_many_seeds_on_tiny_images_match_the_numpy_twin(lanes, shape):
    """Blocks of eight seeds on images too small for the vector paths' windows."""
    rng = np.random.default_rng(44)
    img = rng.integers(0, 4, shape).astype(np.float32)
    seeds = np.concatenate([local_maxima(img)] * 8)
    np.testing.assert_array_equal(
        refine_peaks(img, seeds, backend="cython"), refine_peaks(img, seeds, backend="numpy")
    )


@pytest.mark.parametrize("where", [0, 7, 8, 13, 15, 16, 37, 39])
@pytest.mark.parametrize("bad", [(-1, 5), (5, -1), (20, 5), (5, 44), (2**62, 5), (-(2**63), 5)])
def test_the_first_integer_seed_outside_is_named_wherever_it_is(backend, lanes, where, bad):
    """Integer seeds are checked in the refining pass: a bad seed inside a
    block of maxima, at a block's edge or in the tail is found, and the
    first of two is named."""
    img = np.zeros((20, 44), np.float32)
    img[2:18:4, 2:42:4] = 1.0
    seeds = np.argwhere(img == 1.0)[:40]
    seeds[where] = bad
    seeds[-1] = (100, 100)
    if where == len(seeds) - 1:
        seeds[where] = bad
    with pytest.raises(CcdgridError, match=rf"`seeds\[{where}\]` = \({bad[0]}, {bad[1]}\)"):
        refine_peaks(img, seeds, backend=backend)


def test_the_first_seed_outside_is_named_with_threads():
    rng = np.random.default_rng(45)
    img = gaussian_image(rng, (60, 80), 30).astype(np.float32)
    seeds = local_maxima(img)[rng.integers(0, 5, 9000)]
    seeds[8500] = (60, 0)
    seeds[8999] = (0, -3)
    for nthreads in (1, 2):
        with pytest.raises(CcdgridError, match=r"`seeds\[8500\]` = \(60, 0\)"):
            refine_peaks(img, seeds, nthreads=nthreads)


def test_int64_seeds_pass_through_uncopied_and_others_give_the_same():
    rng = np.random.default_rng(46)
    img = gaussian_image(rng, (50, 60), 20).astype(np.float32)
    seeds = np.ascontiguousarray(local_maxima(img)[rng.integers(0, 10, 40)], np.int64)
    assert _as_seeds(seeds, img.shape, check=False) is seeds
    expected = refine_peaks(img, seeds)
    wide = np.zeros((40, 4), np.int64)
    wide[:, ::2] = seeds
    for other in (seeds.astype(np.int32), np.asfortranarray(seeds), wide[:, ::2], seeds.tolist()):
        np.testing.assert_array_equal(refine_peaks(img, other), expected)


def test_empty_seeds_give_an_empty_result(backend):
    img = np.ones((3, 3))
    for empty in ([], np.empty((0, 2)), np.empty((0, 2), np.int64)):
        out = refine_peaks(img, empty, backend=backend)
        assert out.shape == (0, 2)
        assert out.dtype == np.float64
        assert climb(img, empty, backend=backend).shape == (0, 2)


@settings(max_examples=60, deadline=None)
@given(
    img=arrays(
        np.float32,
        st.tuples(st.integers(1, 12), st.integers(1, 12)),
        elements=st.integers(0, 4).map(float),
    ),
    data=st.data(),
)
def test_climb_ends_on_a_local_maximum_and_refinement_stays_within_a_pixel(img, data):
    h, w = img.shape
    seeds = np.array(
        data.draw(
            st.lists(
                st.tuples(st.integers(0, h - 1), st.integers(0, w - 1)), min_size=1, max_size=8
            )
        )
    )
    peaks = climb(img, seeds, backend="cython")
    np.testing.assert_array_equal(peaks, climb(img, seeds, backend="numpy"))
    for y, x in peaks:
        window = img[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
        assert not (window > img[y, x]).any()
    np.testing.assert_array_equal(climb(img, peaks, backend="cython"), peaks)
    refined = refine_peaks(img, seeds, backend="cython")
    np.testing.assert_array_equal(refined, refine_peaks(img, seeds, backend="numpy"))
    # Non-negative patch: Newton offsets and centres of mass stay in the 3x3 box.
    assert (np.abs(refined - peaks) <= 1.0).all()


# --- parity with pyFAI 2026.9 ---------------------------------------------------------


@pytest.fixture(scope="module")
def pyfai_bilinear():
    pytest.importorskip("pyFAI")
    # local_maxi changed in 2026.9 (PYFAI_NOTES §2.4); older releases differ.
    release = tuple(int(p) for p in importlib.metadata.version("pyFAI").split(".")[:2])
    if release < (2026, 9):
        pytest.skip(f"parity is with pyFAI >= 2026.9, found {release}")
    from pyFAI.ext.bilinear import Bilinear as PyfaiBilinear

    return PyfaiBilinear


@pytest.mark.parametrize("variant", ["gaussians", "quantised", "negative"])
def test_refine_peaks_matches_pyfai_local_maxi(backend, pyfai_bilinear, variant):
    rng = np.random.default_rng(21)
    img = gaussian_image(rng, (128, 160), 40)
    if variant == "quantised":  # many ties and flat patches: exercises the fallbacks
        img = np.round(img / 80)
    elif variant == "negative":  # non-positive patches: no centre of mass
        img = img - 500
    seeds = rng.integers(0, img.shape, (600, 2))
    pf = pyfai_bilinear(img)
    expected = np.array([pf.local_maxi(tuple(s)) for s in seeds.tolist()])
    got = refine_peaks(img, seeds, backend=backend)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got, expected)  # in fact bit for bit


@pytest.mark.parametrize("variant", ["gaussians", "quantised", "nan"])
def test_refining_maxima_matches_pyfai_local_maxi(backend, pyfai_bilinear, variant):
    """The tutorial's case: every seed is already a local maximum."""
    rng = np.random.default_rng(24)
    img = gaussian_image(rng, (128, 160), 60)
    if variant == "quantised":  # flat patches: centre-of-mass fallbacks among the peaks
        img = np.round(img / 80)
    elif variant == "nan":
        img[rng.integers(0, 128, 40), rng.integers(0, 160, 40)] = np.nan
    seeds = local_maxima(img.astype(np.float32))
    seeds = seeds[rng.permutation(len(seeds))]
    pf = pyfai_bilinear(img)
    expected = np.array([pf.local_maxi(tuple(s)) for s in seeds.tolist()])
    np.testing.assert_array_equal(refine_peaks(img, seeds, backend=backend), expected)


def test_climb_matches_pyfai_cp_local_maxi(backend, pyfai_bilinear):
    rng = np.random.default_rng(22)
    img = np.round(gaussian_image(rng, (100, 120), 30) / 50)
    h, w = img.shape
    starts = rng.integers(0, h * w, 800)
    pf = pyfai_bilinear(img)
    expected = np.array([pf.cp_local_maxi(int(i)) for i in starts])
    peaks = climb(img, np.column_stack(np.divmod(starts, w)), backend=backend)
    np.testing.assert_array_equal(peaks[:, 0] * w + peaks[:, 1], expected)


def test_bilinear_facade_matches_pyfai(backend, pyfai_bilinear):
    rng = np.random.default_rng(23)
    img = gaussian_image(rng, (64, 80), 12)
    ours, theirs = Bilinear(img, backend=backend), pyfai_bilinear(img)
    assert (ours.height, ours.width) == (theirs.height, theirs.width)
    assert ours.maxi == theirs.maxi
    assert ours.mini == theirs.mini
    for y, x in rng.uniform(0, 63, (100, 2)):
        assert ours.local_maxi((y, x)) == theirs.local_maxi((y, x))
        flat = round(y) * 80 + round(x)
        assert ours.cp_local_maxi(flat) == theirs.cp_local_maxi(flat)
    for y, x in np.vstack([rng.uniform(-2, 66, (100, 2)), [[3, 4], [3, 4.5], [3.5, 4]]]):
        assert ours((y, x)) == pytest.approx(theirs((y, x)), rel=1e-6)


def test_bilinear_data_is_a_read_only_float32_view(backend):
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = Bilinear(img, backend=backend)
    assert b.data.dtype == np.float32
    assert not b.data.flags.writeable
    assert img.flags.writeable  # the caller's array is not frozen
    assert b((1.0, 2.5)) == pytest.approx(6.5)


# --- bad input ------------------------------------------------------------------------


def test_seed_outside_the_image_is_named(backend):
    img = np.zeros((10, 20))
    with pytest.raises(CcdgridError, match=r"`seeds\[1\]` = \(9\.6, 3\.0\) is outside"):
        refine_peaks(img, [(1.0, 1.0), (9.6, 3.0), (-5.0, 0.0)], backend=backend)
    with pytest.raises(CcdgridError, match=r"`seeds\[0\]` = \(0, -1\) is outside"):
        climb(img, np.array([(0, -1)]), backend=backend)
    with pytest.raises(CcdgridError, match=r"`seeds\[0\]`.*outside"):
        refine_peaks(img, np.array([(2**40, 0)], np.uint64), backend=backend)


def test_non_finite_seed_is_named(backend):
    with pytest.raises(CcdgridError, match=r"`seeds\[2\]` = \(1\.0, nan\) is not finite"):
        refine_peaks(np.zeros((5, 5)), [(1, 1), (2, 2), (1, np.nan)], backend=backend)
    with pytest.raises(CcdgridError, match=r"`seeds\[0\]` = \(inf, 1\.0\) is not finite"):
        refine_peaks(np.zeros((5, 5)), [(np.inf, 1)], backend=backend)


@pytest.mark.parametrize(
    ("seeds", "match"),
    [
        (np.zeros((3, 3)), r"`seeds` must have shape \(N, 2\)"),
        (np.zeros((2, 2, 2)), r"`seeds` must have shape \(N, 2\)"),
        (np.zeros((3, 0)), r"`seeds` must have shape \(N, 2\)"),
        (np.array([(1 + 1j, 2)]), "`seeds` must hold real numbers"),
        (np.array([("a", "b")]), "`seeds` must hold real numbers"),
    ],
)
def test_malformed_seeds_are_rejected(backend, seeds, match):
    with pytest.raises(CcdgridError, match=match):
        refine_peaks(np.zeros((5, 5)), seeds, backend=backend)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros(5), "must be a 2-D image"),
        (np.zeros((2, 3, 4)), "must be a 2-D image"),
        (np.zeros((0, 4)), "is empty"),
        (np.zeros((3, 3), complex), "must hold real numbers"),
        (np.empty((3, 3), object), "must hold real numbers"),
    ],
)
def test_bad_images_are_rejected(backend, image, match):
    with pytest.raises(CcdgridError, match=match):
        refine_peaks(image, [(0, 0)], backend=backend)
    with pytest.raises(CcdgridError, match=match):
        Bilinear(image, backend=backend)


def test_bilinear_rejects_positions_outside_the_image(backend):
    b = Bilinear(np.zeros((4, 5)), backend=backend)
    with pytest.raises(
        CcdgridError, match=r"\(4\.0, 0\.0\) is outside the image of shape \(4, 5\)"
    ):
        b.local_maxi((4.0, 0.0))
    with pytest.raises(CcdgridError, match="is not finite"):
        b.local_maxi((np.nan, 0.0))
    with pytest.raises(CcdgridError, match=r"flat index 20 is outside 0 \.\. 19"):
        b.cp_local_maxi(20)
    with pytest.raises(CcdgridError, match="flat index must be an integer"):
        b.cp_local_maxi(2.0)
    with pytest.raises(CcdgridError, match="must be a pair"):
        b((1.0,))


@pytest.mark.parametrize(
    ("nthreads", "match"),
    [(-1, "`nthreads` must be >= 0"), (2.0, "`nthreads` must be an integer"), (None, "integer")],
)
def test_bad_thread_counts_are_rejected(backend, nthreads, match):
    with pytest.raises(CcdgridError, match=match):
        refine_peaks(np.zeros((3, 3)), [(1, 1)], backend=backend, nthreads=nthreads)


def test_unknown_backend_is_rejected():
    with pytest.raises(CcdgridError, match="`backend` must be one of"):
        refine_peaks(np.zeros((3, 3)), [(1, 1)], backend="opencl")
