"""First guesses of pitch and hole diameter (ccdgrid.grid_scale)."""

import importlib.util
from pathlib import Path

import _independent_grid as gen  # registered by conftest.py
import numpy as np
import pytest
from scipy import ndimage

from ccdgrid import grid_scale as gs
from ccdgrid.errors import CcdgridError
from ccdgrid.grid_scale import estimate_grid_scale
from ccdgrid.peaks import find_holes
from ccdgrid.smoothing import block_mean

_spec = importlib.util.spec_from_file_location("_tp", Path(__file__).with_name("test_peaks.py"))
_tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tp)


@pytest.mark.parametrize(
    ("pitch", "diameter", "hot"),
    [(48.0, 10.5, 0), (30.0, 6.0, 0), (64.0, 16.0, 0), (48.0, 10.5, 300)],
)
def test_pitch_and_diameter(pitch, diameter, hot):
    img = _tp.make_grid(pitch=pitch, diameter=diameter, hot_pixels=hot, seed=15)[0]
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(pitch, rel=0.02)
    # a first guess for the smoothing disc: measured +10..+20 % (PSF blur)
    assert scale.diameter == pytest.approx(diameter * 1.12, rel=0.12)
    assert scale.contrast > 20


def test_given_values_are_kept():
    img = _tp.make_grid(seed=16)[0].astype(np.float32)
    scale = estimate_grid_scale(img, pitch=50.0, diameter=9.0)
    assert (scale.pitch, scale.diameter) == (50.0, 9.0)


def test_constant_image():
    with pytest.raises(CcdgridError, match="constant"):
        estimate_grid_scale(np.ones((64, 64), np.float32))


def test_white_noise():
    rng = np.random.default_rng(17)
    with pytest.raises(CcdgridError, match=r"no (hole-like structure|periodic grid)"):
        estimate_grid_scale(rng.normal(100, 10, (256, 256)).astype(np.float32))


def test_small_holes_in_a_large_image_are_measured_at_full_resolution():
    # binned 2x2, 6 px holes are 3 px wide: the diameter is measured again
    # unbinned, on a central crop of about 1024 px
    img = _tp.make_grid(shape=(1536, 1536), pitch=40.0, diameter=6.0, seed=18)[0]
    img = img.astype(np.float32)
    scale = estimate_grid_scale(img)
    assert scale.pitch == pytest.approx(40.0, rel=0.02)
    assert scale.diameter == pytest.approx(6.0 * 1.12, rel=0.12)
    assert scale.contrast > 20
    # the same through a caller's binned copies
    again = estimate_grid_scale(img, binned=lambda f: block_mean(img, f))
    assert (again.pitch, again.diameter) == (scale.pitch, scale.diameter)


@pytest.mark.parametrize(("pitch", "sigma"), [(40.0, 2.0), (50.0, 2.5), (64.0, 3.0)])
def test_lit_circle_on_a_bright_background(pitch, sigma):
    # The lit area's edge (background 15-60 % of the holes' height inside, dark
    # outside) puts a cone under the autocorrelation's central peak: the
    # guess used to measure the cone (diameters of 0.4-0.7 pitch, or no
    # lattice at all) and now retries on a top-hat filtered image.
    grid = gen.make_grid(
        (512, 512), pitch_px=pitch, profile="gauss", width_px=sigma, lit_axes=(0.48, 0.48), seed=3
    )
    scale = estimate_grid_scale(grid.image.astype(np.float32))
    assert scale.pitch == pytest.approx(pitch, rel=0.02)
    # a Gaussian's "diameter" (its autocorrelation's half width) is ~4 sigma
    assert 3.0 * sigma < scale.diameter < 5.5 * sigma
    assert scale.contrast > 50


def _mirror(i, n):
    """Index ``i`` mirrored into 0..n-1 without repeating the edge (a 1-long axis: 0)."""
    if n == 1:
        return 0
    if i < 0:
        return -i
    if i > n - 1:
        return 2 * (n - 1) - i
    return i


def _thin_ceiling_brute(img):
    h, w = img.shape
    out = np.empty_like(img)
    for i in range(h):
        for j in range(w):
            best = np.inf
            for dy, dx in ((1, 0), (0, 1), (1, 1), (1, -1)):
                a = img[_mirror(i - dy, h), _mirror(j - dx, w)]
                b = img[_mirror(i + dy, h), _mirror(j + dx, w)]
                best = min(best, max(a, b))
            out[i, j] = best
    return out


@pytest.mark.parametrize("shape", [(1, 7), (2, 2), (6, 1), (9, 13)])
def test_thin_ceiling_matches_its_definition(shape):
    rng = np.random.default_rng(71)
    img = rng.normal(50.0, 20.0, shape).astype(np.float32)
    got = gs._thin_ceiling(img)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, _thin_ceiling_brute(img))


def test_min3_is_scipys_minimum_filter():
    img = np.random.default_rng(72).normal(0.0, 1.0, (17, 23)).astype(np.float32)
    expected = ndimage.minimum_filter(img, size=3, mode="nearest")
    np.testing.assert_array_equal(gs._min3(img), expected)


def _defects():
    """A flat 10-count image, a hole (disc of radius 3.5, 100 counts) and small bright defects."""
    img = np.full((40, 40), 10.0, dtype=np.float32)
    yy, xx = np.mgrid[:40, :40]
    hole = np.hypot(yy - 30, xx - 30) <= 3.5
    img[hole] = 100.0
    img[5, 3:15] = 2e4  # a row streak
    img[np.arange(8, 20), np.arange(20, 32)] = 3e4  # a diagonal streak
    img[25:27, 5:7] = 4e4  # a 2x2 cluster
    img[30, 15] = 5e4  # a hot pixel
    img[12:14, 3:12] = 2e4  # a streak two pixels wide
    img[[2, 3, 4, 3, 3], [30, 30, 30, 29, 31]] = 4e4  # two crossing streaks
    return img, hole


def _second_largest_of_4_brute(img):
    h, w = img.shape
    out = np.empty_like(img)
    for i in range(h):
        for j in range(w):
            near = [
                img[max(i - 1, 0), j],
                img[min(i + 1, h - 1), j],
                img[i, max(j - 1, 0)],
                img[i, min(j + 1, w - 1)],
            ]
            out[i, j] = min(img[i, j], sorted(near)[-2])
    return out


def _bright_level_brute(floor, block=16):
    h, w = floor.shape
    tops = [
        floor[i : i + block, j : j + block].max()
        for i in range(0, h - block + 1, block)
        for j in range(0, w - block + 1, block)
    ]
    return np.percentile(tops, 99.0)


def test_bright_level_is_a_high_percentile_of_tile_maxima():
    rng = np.random.default_rng(74)
    floor = rng.normal(10.0, 1.0, (330, 340)).astype(np.float32)  # 20 x 21 whole tiles
    np.testing.assert_allclose(gs._bright_level(floor), _bright_level_brute(floor), rtol=1e-6)
    # blobs in 4 of 420 tiles are above the 99th percentile of their maxima
    for y, x in [(35, 19), (99, 291), (195, 147), (307, 35)]:  # each inside one tile
        floor[y : y + 10, x : x + 10] = 1e4
    assert gs._bright_level(floor) < 1e3
    # an image smaller than a tile: its maximum
    assert gs._bright_level(floor[:10, :10]) == floor[:10, :10].max()


def test_saturated_blobs_do_not_make_the_guess():
    # three 30 px discs at 65535 on a 400-count plate made the autocorrelation
    # (a 298 px pitch for 60 px): the brightest 3x3 minimum, which set the
    # clipping level, was theirs
    img = _tp.make_grid(shape=(1024, 1024), pitch=60.0, diameter=20.0, amplitude=400.0, seed=31)[0]
    clean = estimate_grid_scale(img.astype(np.float32))
    yy, xx = np.mgrid[:1024, :1024]
    for y, x in [(200, 700), (610, 180), (830, 900)]:
        img[np.hypot(yy - y, xx - x) < 15] = 65535.0
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(60.0, rel=0.02)
    assert scale.diameter == pytest.approx(clean.diameter, rel=0.1)


def test_clip_small_bright_matches_its_definition():
    img, _ = _defects()
    img += np.random.default_rng(73).normal(0.0, 2.0, img.shape).astype(np.float32)
    step1 = _second_largest_of_4_brute(img)
    np.testing.assert_array_equal(gs._clip_isolated(img), step1)
    thin = _thin_ceiling_brute(img)
    floor = ndimage.minimum_filter(np.minimum(img, thin), size=3, mode="nearest")
    floor = floor.astype(np.float64)
    top = _bright_level_brute(floor)
    base = np.minimum(floor, np.float32(top)).mean()
    contrast = np.float32(3.0 * (top - base))
    step2 = np.where(img - thin > contrast, thin, step1)
    step3 = np.minimum(step2, np.float32(base) + contrast)
    np.testing.assert_allclose(gs._clip_small_bright(img), step3, rtol=1e-6)
    # the defects are where the three steps differ
    assert (step2 != step1).any()
    assert (step3 != step2).any()


def test_clip_small_bright_cuts_defects_and_keeps_the_hole():
    img, hole = _defects()
    got = gs._clip_small_bright(img)
    np.testing.assert_array_equal(got[hole], img[hole])  # the hole is untouched
    # lines 1 px wide, the 2x2 cluster and the hot pixel fall to the background
    for rows, cols in [(5, slice(3, 15)), (slice(25, 27), slice(5, 7)), (30, 15)]:
        assert (got[rows, cols] == 10.0).all()
    assert (got[np.arange(8, 20), np.arange(20, 32)] == 10.0).all()
    # what is thicker stays below three times the hole's contrast
    assert got.max() <= 10.0 + 3.0 * 90.0


def test_saturated_blobs_do_not_flatten_a_faint_grid():
    # three discs a hole wide at 65535 over a 40-count grid: they raised the
    # background level (a mean) above the holes' (53 against 40 counts), the
    # clipping ceiling fell below it and cut the holes to a third of their
    # height (diameter guess 13 % off); larger blobs clipped every pixel to
    # one value: "no hole-like structure". find_holes takes flat saturated
    # plateaus out before this guess; blobs that are not flat, or not at the
    # image's maximum, stay.
    img, _, _, _ = _tp._faint_grid(seed=42)
    clean = estimate_grid_scale(img.astype(np.float32))
    yy, xx = np.indices(img.shape)
    for cy, cx in [(100, 120), (300, 400), (420, 150)]:
        img[np.hypot(yy - cy, xx - cx) < 6] = 65535.0
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(48.0, rel=0.02)
    assert scale.diameter == pytest.approx(clean.diameter, rel=0.1)


def test_cosmic_ray_streaks_on_a_faint_grid():
    # a 40-count grid with eight streaks at 10^3.5-10^4.8 counts: the guess
    # was 2.6 px holes 12 px apart (the streaks' own autocorrelation)
    img, _, _, _ = _tp._faint_grid(seed=42)
    clean = estimate_grid_scale(img.astype(np.float32))
    rng = np.random.default_rng(142)
    img, _ = _tp.add_streaks(img, *_tp._random_streaks(rng, 8, img.shape))
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(48.0, rel=0.02)
    assert scale.diameter == pytest.approx(clean.diameter, rel=0.05)
    assert scale.contrast > 0.8 * clean.contrast


@pytest.mark.parametrize(("pitch", "fraction"), [(80.0, 0.40), (80.0, 0.45), (50.0, 0.45)])
def test_holes_of_nearly_half_the_pitch(pitch, fraction):
    # Discs this large spread the autocorrelation's lattice peaks over most
    # lags: the peak stands only 6-9 spreads out, which used to be refused
    # as "no periodic grid" on clean plates. The lattice's other vectors
    # echo it and let it pass.
    img = _tp.make_grid(
        shape=(768, 768), pitch=pitch, diameter=fraction * pitch, rotation_deg=3.0, seed=21
    )[0]
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(pitch, rel=0.02)
    assert scale.diameter == pytest.approx(fraction * pitch * 1.12, rel=0.15)


@pytest.mark.parametrize("seed", range(6))
def test_white_noise_does_not_echo(seed):
    rng = np.random.default_rng(100 + seed)
    img = rng.poisson(100.0, (512, 512)).astype(np.float32)
    with pytest.raises(CcdgridError, match=r"no (hole-like structure|periodic grid)"):
        estimate_grid_scale(img)


def _lags(half, points, value, z=None):
    """``z`` (lags dy 0..half, dx -half..half; zeros if None) with ``value`` at ``points``
    and at their mirror lags (the autocorrelation is symmetric)."""
    z = np.zeros((half + 1, 2 * half + 1)) if z is None else z.copy()
    for y, x in points:
        y, x = (int(y), int(x)) if y >= 0 else (-int(y), -int(x))
        if y <= half and abs(x) <= half:
            z[y, x + half] = value
    return z


def _lattice_lags(v, u, n=4):
    return [
        (i * v[0] + j * u[0], i * v[1] + j * u[1])
        for i in range(-n, n + 1)
        for j in range(-n, n + 1)
        if (i, j) != (0, 0)
    ]


def test_lattice_echo_is_the_lowest_peak_over_the_highest_trough():
    half = 60
    v, u = (20, 4), (-4, 20)
    peaks = _lags(half, _lattice_lags(v, u), 8.0)
    # nothing between the peaks: the echo is their height over the baseline
    assert gs._lattice_echo(peaks, *v) == pytest.approx(8.0)
    # 3x3 troughs of -3 at the cells' centres (v + u) / 2 + lattice: 8 + 3
    centres = [(y + 8, x + 12) for y, x in _lattice_lags(v, u)] + [(8, 12)]
    troughs = peaks
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            troughs = _lags(half, [(y + dy, x + dx) for y, x in centres], -3.0, troughs)
    assert gs._lattice_echo(troughs, *v) == pytest.approx(11.0)
    # one lag as high as the peaks at a cell centre: the echo falls to 0
    raised = _lags(half, [(1.5 * v[0] + 0.5 * u[0], 1.5 * v[1] + 0.5 * u[1])], 8.0, troughs)
    assert gs._lattice_echo(raised, *v) == pytest.approx(0.0)


def test_lattice_echo_takes_the_shortest_second_vector_of_those_as_high():
    # every lag of a sharp lattice stands about as high: when a longer one
    # (here 2u - v) is the highest, the cells it spans with v are not the
    # lattice's, their "centres" fall on lattice lags, and the echo of a
    # clean 4096² lattice was -0.2
    half = 60
    v, u = (20, 4), (-4, 20)
    lattice = _lags(half, _lattice_lags(v, u), 8.0)
    longer = (2 * u[0] - v[0], 2 * u[1] - v[1])
    lattice = _lags(half, [longer], 8.5, lattice)
    # the peaks' height over the baseline between them (0 with 2u - v)
    assert gs._lattice_echo(lattice, *v) == pytest.approx(8.0)


def test_lattice_echo_of_a_lone_peak_and_of_a_peak_too_far_out():
    half = 60
    rng = np.random.default_rng(5)
    lone = rng.normal(0.0, 1.0, (half + 1, 2 * half + 1))  # lags dy 0..half, dx -half..half
    lone[20, 3 + half] = 8.0  # the highest lag; the others hold noise
    assert gs._lattice_echo(lone, 20, 3) < gs.MIN_ECHO
    # a peak whose multiples leave the box cannot be confirmed
    lattice = _lags(half, _lattice_lags((20, 3), (-3, 20)), 8.0)
    assert gs._lattice_echo(lattice, 40, 57) == -np.inf


@pytest.mark.parametrize(
    ("fraction", "rotation"), [(0.5, 7.0), (0.55, 0.0), (0.6, 30.0), (0.65, 2.0), (0.75, 0.0)]
)
def test_holes_wider_than_half_the_pitch(fraction, rotation):
    # The autocorrelation of such a plate is a ripple: its lattice peak
    # stands only 4-6 spreads out, as white noise's highest lag does. Its
    # troughs between the peaks tell it from noise.
    img = _tp.make_grid(
        shape=(768, 768), pitch=80.0, diameter=fraction * 80.0, rotation_deg=rotation, seed=21
    )[0]
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(80.0, rel=0.02)


@pytest.mark.parametrize("fraction", [0.45, 0.55, 0.7])
def test_few_wide_holes_are_measured_whole(fraction):
    # five holes across a 1024² plate, 90-140 px wide: the autocorrelation's
    # central peak outlasted the 48 lags of its radial profile (the diameter
    # came out 58 px for 110), and the top-hat retry, narrower than the
    # holes, measured their rims (12 px)
    img = _tp.make_grid(
        shape=(1024, 1024), pitch=200.0, diameter=fraction * 200.0, rotation_deg=2.0, seed=21
    )[0]
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(200.0, rel=0.02)
    # a first guess (the overlap of two discs only approximates these
    # blurred, vignetted holes' autocorrelation); the hole fits refine it
    assert scale.diameter == pytest.approx(fraction * 200.0, rel=0.35)
    search = find_holes(img)
    assert search.hole_diameter == pytest.approx(fraction * 200.0, rel=0.03)
    assert len(search.peaks) >= 20


def _powder_rings(rng, n):
    r = np.hypot(*(np.mgrid[:n, :n] - n / 2))
    rings = sum(np.exp(-((r - r0) ** 2) / 8.0) for r0 in rng.uniform(20, n / 2, 8))
    return 100.0 * rings + rng.poisson(10.0, (n, n))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "make",
    [
        lambda rng: ndimage.gaussian_filter(rng.normal(0.0, 1.0, (512, 512)), 3.0),
        lambda rng: (
            ndimage.gaussian_filter((rng.random((512, 512)) < 5e-4) * 1000.0, 6.0)
            + rng.normal(0.0, 0.1, (512, 512))
        ),
        lambda rng: _powder_rings(rng, 512),
    ],
    ids=["correlated-noise", "blobs", "powder-rings"],
)
def test_images_without_a_lattice_do_not_echo(make, seed):
    img = make(np.random.default_rng(200 + seed)).astype(np.float32)
    with pytest.raises(CcdgridError, match=r"no (hole-like structure|periodic grid)"):
        estimate_grid_scale(img)


def _lorentzian_plate(shape, pitch, radius, rotation_deg, seed=0):
    """Holes of profile 1 / (1 + (r / radius)²)² (long tails, no rim), Poisson counts."""
    rng = np.random.default_rng(seed)
    t = np.deg2rad(rotation_deg)
    a = pitch * np.array([np.cos(t), np.sin(t)])  # (y, x) of the lattice's two steps
    b = pitch * np.array([-np.sin(t), np.cos(t)])
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    inv = np.linalg.inv(np.column_stack([a, b]))
    i0 = np.rint(inv[0, 0] * yy + inv[0, 1] * xx)
    j0 = np.rint(inv[1, 0] * yy + inv[1, 1] * xx)
    holes = np.zeros(shape, np.float32)
    for di in range(-2, 3):  # the tails of the 5 x 5 nearest holes
        for dj in range(-2, 3):
            cy = (i0 + di) * a[0] + (j0 + dj) * b[0]
            cx = (i0 + di) * a[1] + (j0 + dj) * b[1]
            holes += 1.0 / np.square(1.0 + ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2)
    return rng.poisson(90.0 + 20000.0 * holes).astype(np.float32)


@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_broad_long_tailed_holes_give_the_lattice_step(fraction):
    # Holes of 20-30 % of a 55 px pitch with long tails make the
    # autocorrelation nearly sinusoidal: every lattice lag stands 3-6
    # spreads out, and the highest was a long one, a lattice vector close to
    # whole pixels (444 px): the plate was refused, or guessed 8x its pitch
    img = _lorentzian_plate((1536, 2048), 55.0, fraction * 55.0, 6.2)
    scale = estimate_grid_scale(img)
    assert scale.pitch == pytest.approx(55.0, rel=0.02)


def test_shortest_high_peak_is_the_lattice_step():
    half = 60
    v, u = (3, 20), (-20, 3)
    z = _lags(half, _lattice_lags(v, u), 5.0)
    z = _lags(half, [(9, 60)], 5.6, z)  # a long lattice lag a little higher
    ly, lx = np.mgrid[0 : half + 1, -half : half + 1]
    far = ly**2 + lx**2 >= 10**2
    # the central peak, left out of the search, whose slope reaches past the
    # edge of `far` as high as the lattice's peaks (5.0 at r = 10)
    r = np.hypot(ly, lx)
    z = np.where(r < 11, np.maximum(z, 55.0 - 5.0 * r), z)
    assert (z[far & (r < 11)] > 0.8 * 5.6).any()
    assert gs._shortest_high_peak(z, far, half, 5.6) == (3, 20 + half)
    # row dy = 0 holds lags l and -l: a lag there is a maximum only if it is
    # one of the whole plane (here its mirror's neighbour (1, -19) is higher)
    z = _lags(half, [(0, 19)], 4.8, z)
    z = _lags(half, [(1, -19)], 5.0, z)
    assert gs._shortest_high_peak(z, far, half, 5.6) == (1, -19 + half)


def test_a_lattice_step_inside_the_central_peak_is_looked_for_before_refusing(monkeypatch):
    # squared-Lorentzian holes of half width 0.36 pitch (independent
    # generator): their autocorrelation's central peak is so wide that the
    # lags beyond 1.5 guessed diameters miss the lattice's step (39 px) and
    # hold its diagonal (55 px); down to one diameter they hold the step
    img = gen.make_grid(
        (768, 768), pitch_px=39.0, profile="lorentz", width_px=14.0, rotation_deg=0.7,
        amplitude=20000.0, seed=4,
    ).image.astype(np.float32)  # fmt: skip
    first = gs._estimate(img, None, None, None, tophat=False)
    closer = gs._estimate(img, None, None, None, tophat=False, central=1.0)
    assert first[0] == pytest.approx(55.2, rel=0.04)
    assert closer[0] == pytest.approx(39.0, rel=0.04)
    # this plate's diagonal lattice echoes (its top-hat guess: 3.4 > 3), so
    # the guess stands at 55 px and the closer search never runs
    assert estimate_grid_scale(img).pitch == pytest.approx(55.2, rel=0.04)
    # on fuzz plates 139, 195 and 249 it did not (refused as "no periodic
    # grid"); simulated here: the step is then taken
    real = gs._lattice_vector

    def diagonal_does_not_echo(box, half, diameter, central=1.5):
        vec, contrast, echo = real(box, half, diameter, central)
        return (vec, 3.4, -0.1) if central == 1.5 else (vec, contrast, echo)

    monkeypatch.setattr(gs, "_lattice_vector", diagonal_does_not_echo)
    assert estimate_grid_scale(img).pitch == pytest.approx(39.0, rel=0.04)
