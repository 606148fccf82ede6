"""First guesses of the grid pitch and hole diameter from the image autocorrelation.

The autocorrelation of a grid image is a central peak (one hole correlated
with itself: the overlap area of two discs, blurred by the PSF) surrounded by
copies of it at every lattice vector. Its half width at half maximum gives
the hole radius (two discs of radius R overlap by half at a distance of
0.808 R), and its strongest off-centre peak the nearest lattice vector.
White noise only adds to the zero lag, which is never used. Small bright
outliers do not: squared, one cosmic-ray streak at 10^4 counts outweighs
thousands of hole pixels at 40 and its own autocorrelation (a narrow peak,
copies at its pixel steps) becomes the guess; they are clipped away first
(:func:`_clip_small_bright`). Slow illumination changes are removed by a
high-pass filter. A step
(a lit-area edge, a beam stop) is not slow: its autocorrelation is a cone
under the central peak, seen as a pedestal at the peak's foot. The guess is
then made again on a white top-hat of the image, which removes anything
wider than a hole, steps included, and the one with the stronger lattice
peak is kept. An image is taken for a grid when its lattice peak stands
out from the other lags, or, for holes wider than a third of the pitch
(whose overlapping peaks leave few lags at the baseline), when the
lattice's other vectors echo it above the troughs between them.

These are starting values: the hole finder refines the diameter from fitted
hole profiles and the pitch from nearest-neighbour distances of the holes.
"""

import numpy as np
from scipy import fft as _fft
from scipy import ndimage

from .errors import CcdgridError
from .smoothing import block_mean

__all__ = ["GridScale", "estimate_grid_scale"]

# Two discs of radius R overlap by half of their area at a distance of
# HALF_OVERLAP * R (solves 2 acos(u/2) - u sqrt(1 - u^2/4) = pi/2).
HALF_OVERLAP = 0.8079

# Lattice-peak contrast below which an image is said to hold no grid: white
# noise gives 3.5-5, grid images 30 (300 hot pixels at 512²) to 1000.
MIN_CONTRAST = 10.0

# ... unless the lattice echoes: its peaks at the other lattice vectors (u,
# 2v, u + v, u - v) all stand this many spreads above its troughs at the
# cells' centres (see _lattice_echo). Holes wider than a third of the pitch
# spread the autocorrelation's peaks over most lags, and the spread then
# measures the lattice itself: clean plates with holes of 50-80 % of the
# pitch give a lattice peak only 3.5-6 spreads out, but an echo of 4.5-8.
# White and Poisson noise, correlated noise, random blobs and powder rings
# gave at most 1.7 (106 images, 256² to 2048²); a 1-D grating (stripes) up
# to 4.2, which then fails later: its peaks span one lattice direction.
MIN_ECHO = 3.0

# Above this pedestal under the autocorrelation's central peak (its foot over
# its height), the guess is made again on a top-hat filtered image: clean
# grids give ~0, background gradients 0.1-0.4, a lit-area edge 0.3-0.6.
_MAX_PEDESTAL = 0.1

# Side of the working image, px: the image is binned down to about this size.
_WORKING_SIZE = 1024


class GridScale:
    """Pitch and hole diameter guessed from the autocorrelation (pixels).

    Attributes
    ----------
    pitch : float
        Length of the nearest lattice vector, px.
    diameter : float
        Hole diameter, px.
    lattice_vector : ndarray of shape (2,)
        The nearest lattice vector (dy, dx), px.
    contrast : float
        Height of the lattice peak above the autocorrelation's typical
        off-centre level, in units of that level's spread: large for a grid,
        of order 5 for noise.
    """

    __slots__ = ("contrast", "diameter", "lattice_vector", "pitch")

    def __init__(self, pitch, diameter, lattice_vector, contrast):
        self.pitch = float(pitch)
        self.diameter = float(diameter)
        self.lattice_vector = np.asarray(lattice_vector, dtype=np.float64)
        self.contrast = float(contrast)

    def __repr__(self):
        return (
            f"GridScale(pitch={self.pitch:.2f}, diameter={self.diameter:.2f}, "
            f"contrast={self.contrast:.1f})"
        )


def _thin_ceiling(image):
    """Per pixel, the least over the four axes of the brighter of its two neighbours on it.

    The axes are the column, the row and the two diagonals through the
    pixel; the image is mirrored at its border (without repeating the edge
    pixel). A pixel brighter than this ceiling stands above its surroundings
    along some axis on both sides at once: a single pixel, a pair, a line
    one pixel wide in any direction (a cosmic-ray streak), a 2x2 cluster. A
    pixel of a hole at least three pixels wide has a neighbour inside the
    hole on every axis and stays under it, up to its noise.

    Parameters
    ----------
    image : ndarray of shape (h, w), float32 or float64

    Returns
    -------
    ndarray of shape (h, w), the dtype of ``image``
    """
    h, w = image.shape
    pad = np.pad(image, 1, mode="reflect")  # a 1-px-wide axis: the pixel itself

    def shifted(dy, dx):
        return pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ceiling = np.maximum(shifted(-1, 0), shifted(1, 0))
    pair = np.empty_like(ceiling)
    for a, b in (((0, -1), (0, 1)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1))):
        np.maximum(shifted(*a), shifted(*b), out=pair)
        np.minimum(ceiling, pair, out=ceiling)
    return ceiling


def _min3(image):
    """Minimum over the 3x3 square around each pixel (edge pixels repeated beyond the border)."""
    n, m = image.shape
    pad = np.pad(image, 1, mode="edge")
    rows = np.minimum(pad[:n], pad[1 : n + 1])
    np.minimum(rows, pad[2:], out=rows)
    out = np.minimum(rows[:, :m], rows[:, 1 : m + 1])
    return np.minimum(out, rows[:, 2:], out=out)


def _clip_isolated(image):
    """Clip every pixel to the second largest of its 4 neighbours (edge pixels repeated).

    Hot pixels (single, or pairs) would otherwise dominate the
    autocorrelation: a few hundred of them at 50x the hole height put as
    much power at random lags as all the holes at theirs. A hole's top pixel
    loses only noise, and the noise stays nearly white.
    """
    pad = np.pad(image, 1, mode="edge")
    up, down = pad[:-2, 1:-1], pad[2:, 1:-1]
    left, right = pad[1:-1, :-2], pad[1:-1, 2:]
    # second largest of four: the larger of the two pair minima, unless the
    # two pair maxima are both above it
    lo = np.minimum(up, down)
    tmp = np.minimum(left, right)
    np.maximum(lo, tmp, out=lo)
    hi = np.maximum(up, down)
    np.maximum(left, right, out=tmp)
    np.minimum(hi, tmp, out=hi)
    np.maximum(lo, hi, out=lo)
    return np.minimum(image, lo, out=lo)


def _bright_level(floor, block=16, quantile=99.0):
    """The level of the brightest holes in ``floor`` (an image's 3x3 minima).

    The ``quantile`` percentile of the brightest value of each ``block`` x
    ``block`` tile: the working image holds ~1024 px across, so most tiles
    hold a hole and the brightest tiles the brightest holes, while a few
    saturated blobs (a bright spot, a leak past the beam stop: three discs
    30 px across at 160 times the holes' level) fill a few tiles. The
    brightest 3x3 minimum itself was such a blob's level, and the clipping
    that follows then spared every blob: the blobs made the autocorrelation
    and the guess (a 298 px pitch for 60 px). Blobs that fill more tiles
    than 1 % can still make the guess; the hole search then leaves out
    their plateaus and guesses again.
    """
    h, w = floor.shape
    if h < block or w < block:
        return float(floor.max())
    tiles = floor[: h - h % block, : w - w % block]
    tiles = tiles.reshape(h // block, block, w // block, block).max(axis=(1, 3))
    return float(np.percentile(tiles, quantile))


def _clip_small_bright(image):
    """``image`` with its small bright outliers cut down (a new array).

    Three ceilings, each for what the one before misses:

    1. every pixel is clipped to the second largest of its 4 neighbours
       (:func:`_clip_isolated`): single hot pixels and pairs fall, a hole's
       top loses only noise, and the noise stays nearly white;
    2. a pixel more than ``3 (M - B)`` above its thin ceiling
       (:func:`_thin_ceiling`) becomes that ceiling: lines one pixel wide in
       any direction (cosmic-ray streaks) and 2x2 clusters fall to their
       surroundings. ``M`` is the level of the brightest holes: the 3x3
       minima of the image clipped to its thin ceiling (nothing narrower
       than 3x3 survives a 3x3 minimum filter, and the thin ceiling trims
       the rim of a 3x3 blob), at the brightest of most places
       (:func:`_bright_level`: a few saturated blobs a hole wide are not
       the holes), and ``B`` the mean 3x3 minimum (each capped at ``M``),
       the background: no hole pixel stands three hole contrasts above its
       neighbours, while noise, which the thin ceiling would
       otherwise clip everywhere (flattening the holes of a 20-count
       image), is left alone;
    3. everything is clipped to ``B + 3 (M - B)``: what is left above the
       holes (streaks two pixels wide, streaks that cross, small blobs)
       then weighs no more than a few hole pixels.

    Squared in the autocorrelation, a few pixels at 10^4 counts outweigh
    thousands of hole pixels at 40: without steps 2 and 3, five streaks
    made the guess (2 px holes, 6 px apart).
    """
    clipped = _clip_isolated(image)
    thin = _thin_ceiling(image)
    # a blob that binning left 3 px wide holds a 3x3 block; capped by its
    # thin ceiling, its rim falls and the 3x3 minimum no longer sees it
    floor = _min3(np.minimum(image, thin))
    top = _bright_level(floor)
    # capped at the holes' level: three hole-sized discs at 65535 over
    # 40-count holes raised the plain mean above it, and the ceiling below
    # then cut the holes down (larger blobs: every pixel to one value)
    base = float(np.minimum(floor, np.float32(top)).mean(dtype=np.float64))
    contrast = np.float32(3.0 * (top - base))
    hi, lo = float(image.max()), float(image.min())
    if hi - lo <= contrast and hi <= base + contrast:
        # nothing stands that far above a thin ceiling (>= the minimum) nor
        # above the last ceiling: steps 2 and 3 would change no pixel
        return clipped
    spike = np.subtract(image, thin, out=floor) > contrast
    np.copyto(clipped, thin, where=spike)
    return np.minimum(clipped, np.float32(base) + contrast, out=clipped)


def _autocorrelation(image, max_period):
    """Circular autocorrelation of the high-passed, mean-free image, lag (0, 0) first."""
    h, w = image.shape
    data = image - np.float32(image.mean())
    spec = _fft.rfft2(data)  # float32 in, complex64 out: half the cost of float64
    power = np.square(spec.real)
    power += np.square(spec.imag)
    # remove structure slower than a few lattice periods (illumination,
    # taper); the Gaussian low-pass is separable, so no 2-D exp is needed
    kc = 1.0 / (3.0 * max_period)
    gy = np.exp(-np.square(_fft.fftfreq(h) / kc)).astype(np.float32)
    gx = np.exp(-np.square(_fft.rfftfreq(w) / kc)).astype(np.float32)
    power -= power * gy[:, None] * gx[None, :]
    return _fft.irfft2(power, s=(h, w))


def _lag_box(ac, half):
    """The autocorrelation for lags -half..half in both axes, centred."""
    rows = np.r_[np.arange(-half, 0) % ac.shape[0], np.arange(0, half + 1)]
    cols = np.r_[np.arange(-half, 0) % ac.shape[1], np.arange(0, half + 1)]
    return ac[np.ix_(rows, cols)]


def _radial_median(box, half, rmax):
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rbin = np.rint(np.hypot(yy, xx)).astype(np.int64).ravel()
    keep = rbin <= rmax
    rbin, vals = rbin[keep], box.ravel()[keep]
    order = np.lexsort((vals, rbin))
    rbin, vals = rbin[order], vals[order]
    starts = np.searchsorted(rbin, np.arange(rmax + 1))
    ends = np.searchsorted(rbin, np.arange(rmax + 1), side="right")
    return vals[(starts + ends - 1) // 2]


def estimate_grid_scale(image, *, pitch=None, diameter=None, binned=None):
    """Guess the grid pitch and the hole diameter of a grid image.

    Parameters
    ----------
    image : ndarray of shape (h, w), float32
        The grid image (validated, invalid pixels filled with a neutral value).
    pitch, diameter : float, optional
        Known values (px); a known value is returned unchanged and, for the
        pitch, bounds the search of the diameter.
    binned : callable, optional
        ``binned(factor)`` returns ``block_mean(image, factor)`` (float32),
        for a caller that keeps binned copies of the image; None bins here.

    Returns
    -------
    GridScale

    Raises
    ------
    CcdgridError
        If the image is constant, has no hole-like structure, or no lattice
        peak that stands out by :data:`MIN_CONTRAST` spreads or is echoed
        at the lattice's other vectors by :data:`MIN_ECHO`.
    """
    if not np.ptp(image) > 0:
        raise CcdgridError("`image` is constant: there is no grid of holes in it")
    found = _estimate(image, pitch, diameter, binned, tophat=False)
    # (a lattice confirmed by its echo alone, the holes wider than a third
    # of the pitch, is not looked at again: the top-hat, narrower than such
    # holes, leaves their rims, and the rims' lattice peak stands out more)
    if found is None or found[4] > _MAX_PEDESTAL or _implausible(found, pitch, diameter):
        # A lit-area edge, a beam stop or a background step puts a cone under
        # the central peak of the autocorrelation (the autocorrelation of a
        # step falls linearly with the lag): the peak's half width then
        # measures the step, not the holes, and the lattice peak drowns. A
        # white top-hat removes every structure wider than its window, steps
        # included, and keeps the holes; the guess whose lattice peak stands
        # out more wins (a faint lattice peak that echoes is worth that
        # second look too).
        found = _best(
            [found, _estimate(image, pitch, diameter, binned, tophat=True)], pitch, diameter
        )
    if found is not None and pitch is None and _implausible(found, pitch, diameter):
        # Broad, soft holes (a third of the pitch or more) widen the central
        # peak, and the lags left to it (1.5 guessed diameters) can hold the
        # lattice's own step: the search finds a longer vector (the diagonal),
        # whose lattice may not echo (fuzz plates of 35-40 px pitch refused).
        # Before refusing, the lattice peak is looked for again down to one
        # diameter from the centre. Only then: a plate calibrated from a
        # longer first guess (2x the pitch) is not guessed again.
        closer = [
            _estimate(image, pitch, diameter, binned, tophat=t, central=1.0) for t in (False, True)
        ]
        found = _best([found, *closer], pitch, diameter)
    if found is None:
        raise CcdgridError(
            "`image` shows no hole-like structure (flat autocorrelation): is there a grid in it?"
        )
    found_p, found_d, vec, contrast, _, echo = found
    if contrast < MIN_CONTRAST and echo < MIN_ECHO:
        raise CcdgridError(
            "`image` shows no periodic grid of holes: the autocorrelation's lattice peak is "
            f"{contrast:.1f} times its spread (noise gives ~4, grids > 30)"
        )
    return GridScale(found_p, found_d, vec, contrast)


def _best(guesses, pitch, diameter):
    """The plausible guess whose lattice peak stands out most (None if there is none)."""
    ranked = [f for f in guesses if f is not None]
    ranked.sort(key=lambda f: (not _implausible(f, pitch, diameter), f[3]))
    return ranked[-1] if ranked else None


def _implausible(found, pitch, diameter):
    """A first guess no plate gives: no lattice peak, or holes wider than half the pitch
    that the lattice's troughs do not confirm."""
    found_p, found_d, _, contrast, _, echo = found
    return (contrast < MIN_CONTRAST and echo < MIN_ECHO) or (
        pitch is None and diameter is None and found_d > 0.5 * found_p and echo < MIN_ECHO
    )


def _tophat(image, size):
    """White top-hat: ``image`` minus its grey opening by a ``size`` square."""
    return image - ndimage.grey_opening(image, size=(size, size))


def _estimate(image, pitch, diameter, binned, tophat, central=1.5):
    """(pitch, diameter, lattice vector, contrast, pedestal, echo); None: no central peak.

    Lengths in full-resolution px; the pedestal is the autocorrelation at the
    foot of its central peak over the peak's height (~0 for a clean grid);
    contrast and echo as :func:`_lattice_vector` returns them, the lattice
    peak searched beyond ``central`` diameters from the centre.
    """
    h, w = image.shape
    # a ~1024 px working image keeps the cost low; the holes stay >= 3 px wide
    factor = max(1, round(max(h, w) / _WORKING_SIZE))
    if diameter is not None:
        factor = max(1, min(factor, int(diameter // 4)))
    crop = (slice(None), slice(None))
    while True:
        work = binned(factor) if binned is not None else block_mean(image, factor)
        small = _clip_small_bright(work[crop])
        sh, sw = small.shape
        if tophat:
            # wider than any hole of a plate with a few tens of holes across
            small = _tophat(small, max(min(sh, sw) // 16, 9))
        max_period = min(sh, sw) / 4.0
        ac = _autocorrelation(small, max_period)
        half = int(min(max_period * 1.25, sh // 2 - 1, sw // 2 - 1))
        box = _lag_box(ac, half)
        rmax = min(half, 48)
        prof = _radial_median(_lag_box(ac, rmax), rmax, rmax)
        d_est, pedestal = _diameter_from_profile(prof)
        while _no_minimum(prof) and rmax < half:
            # holes so wide (and few) that the central peak outlasts the
            # profile: look further out (110 px holes on a 1024² plate
            # were measured 12 px wide)
            rmax = min(half, 4 * rmax)
            prof = _radial_median(_lag_box(ac, rmax), rmax, rmax)
            d_est, pedestal = _diameter_from_profile(prof)
        if d_est is None or factor == 1 or d_est >= 4.0:
            break
        # The holes are too small at this binning: look again at half of it.
        # The whole image is not needed for that, only enough lattice periods
        # (those of this coarse look) for the same search: a central crop of
        # ~1024 px, four times less work than the whole image at 4096².
        vec, contrast, _ = _lattice_vector(box, half, d_est)
        factor = max(1, factor // 2)
        fine_pitch = np.hypot(*vec) * 2.0  # px at the new binning
        size = max(_WORKING_SIZE, int(np.ceil(5.0 * fine_pitch)))
        crop = (slice(None), slice(None))
        if contrast >= MIN_CONTRAST:
            crop = tuple(
                slice(max(0, (n - size) // 2), max(0, (n - size) // 2) + size)
                for n in (h // factor, w // factor)
            )
    if d_est is None and diameter is None:
        return None
    found_d = diameter if diameter is not None else d_est * factor
    vec, contrast, echo = _lattice_vector(box, half, found_d / factor, central)
    found_p = pitch if pitch is not None else float(np.hypot(*vec)) * factor
    return found_p, found_d, vec * factor, contrast, pedestal, echo


def _no_minimum(prof):
    """True when the radial profile falls all along: its first minimum lies beyond it."""
    return prof.size >= 6 and not (np.diff(prof[1:]) > 0).any()


def _diameter_from_profile(prof):
    """Hole diameter (working px, None if not found) and pedestal from the radial profile.

    The pedestal is the profile at the first minimum beyond the central peak
    over the peak's height (NaN when undefined).
    """
    if prof.size < 6 or not np.all(np.isfinite(prof)):
        return None, np.nan
    # the zero lag holds the white-noise power; extrapolate it from lags 1-3
    # (quadratically: the PSF rounds the top of the overlap function)
    peak = max(3.0 * prof[1] - 3.0 * prof[2] + prof[3], prof[1])
    # baseline: the first minimum of the profile beyond the central peak
    diffs = np.diff(prof[1:])
    rising = np.flatnonzero(diffs > 0)
    first_min = int(rising[0]) + 1 if rising.size else prof.size - 1
    base = prof[first_min]
    if not peak > base or first_min < 2:
        return None, np.nan
    pedestal = base / peak if peak > 0 else np.nan
    level = base + 0.5 * (peak - base)
    seg = prof[1 : first_min + 1]
    below = np.flatnonzero(seg <= level)
    if below.size == 0:
        return None, pedestal
    k = int(below[0]) + 1  # prof[k] <= level < prof[k - 1] (prof[0] taken as `peak`)
    upper = peak if k == 1 else prof[k - 1]
    r_half = (k - 1) + (upper - level) / (upper - prof[k])
    return 2.0 * r_half / HALF_OVERLAP, pedestal


def _lattice_vector(box, half, diameter, central=1.5):
    """Strongest off-centre autocorrelation peak beyond the central one, sub-pixel.

    Returns ``(vector (dy, dx), contrast, echo)``: the peak's lag in working
    px, its height above the median of the lags searched (those at least
    ``central`` diameters and one pixel from the centre) in units of their
    spread, and, when that contrast is below :data:`MIN_CONTRAST`, the
    :func:`_lattice_echo` of the peak (-inf when not needed).
    """
    # A lit-area edge, a background step or dead lines with hot clusters add
    # an autocorrelation that varies smoothly with the lag and spreads over
    # all lags; a lattice peak is a bump about one hole wide. Removing a copy
    # smoothed over more than a hole keeps the bumps and flattens the rest.
    sigma = max(1.5 * diameter, 2.0)
    # The autocorrelation is symmetric: only lags dy >= 0 are searched, and
    # the filter needs its kernel radius (scipy's, truncate=4) of rows above
    # them, plus one for the sub-pixel step. Filtering that part alone gives
    # the same values as filtering the whole box.
    top = max(half - int(4.0 * sigma + 0.5) - 2, 0)
    part = box[top:]
    hp = part - ndimage.gaussian_filter(part, sigma=sigma, mode="nearest")
    row0 = half - top  # row of lag dy = 0 in hp
    lag_y = np.arange(half + 1)
    lag_x = np.arange(-half, half + 1)
    far = (lag_y[:, None] ** 2 + lag_x[None, :] ** 2) >= (central * diameter + 1) ** 2
    searched = hp[row0:]
    flat = int(np.argmax(np.where(far, searched, -np.inf)))
    iy, ix = divmod(flat, searched.shape[1])
    ring = searched[far]
    med = np.median(ring)
    spread = 1.4826 * np.median(np.abs(ring - med)) + 1e-30
    contrast = (searched[iy, ix] - med) / spread
    echo = -np.inf
    if contrast < MIN_CONTRAST:
        z = (searched - med) / spread
        iy, ix = _shortest_high_peak(z, far, half, contrast)
        contrast = z[iy, ix]
        echo = _lattice_echo(np.where(far, z, -np.inf), iy, ix - half)
    dy = dx = 0.0
    r = row0 + iy
    if 0 < r < hp.shape[0] - 1 and 0 < ix < hp.shape[1] - 1:
        c = hp[r, ix]
        up, dn = hp[r - 1, ix], hp[r + 1, ix]
        lf, rt = hp[r, ix - 1], hp[r, ix + 1]
        den_y, den_x = up - 2 * c + dn, lf - 2 * c + rt
        if den_y < 0:
            dy = float(np.clip(0.5 * (up - dn) / den_y, -0.5, 0.5))
        if den_x < 0:
            dx = float(np.clip(0.5 * (lf - rt) / den_x, -0.5, 0.5))
    return np.array([iy + dy, ix - half + dx]), contrast, echo


_HIGH_PEAK = 0.8  # a lag within this fraction of the highest one's contrast is as high


def _shortest_high_peak(z, far, half, highest):
    """The shortest lag among the local maxima of ``z`` about as high as the highest.

    Holes a third of the pitch wide or more, with soft or long-tailed rims,
    make the autocorrelation almost a sum of sinusoids: every lattice lag
    stands as high as the others, a few spreads out, and the highest of
    them is as often a long one (a moiré of the lattice with the binning,
    lit-area edges) as the lattice's own step (a 55 px lattice was read as
    a 444 px one). The lattice's step is the shortest of them. ``z`` holds
    every lag's contrast (lags ``dy = 0..half``, ``dx = -half..half``), and
    the lags searched are those of ``far``: a maximum is one of the whole
    plane (not a lag on the slope of the central peak at the edge of
    ``far``), and row ``dy = 0`` is completed with its mirror (lag -l is
    lag l). Returns ``(row, column)`` in ``z``.
    """
    plane = np.vstack([z[1:2, ::-1], z])
    local = (plane >= ndimage.maximum_filter(plane, size=3, mode="nearest"))[1:]
    candidates = np.flatnonzero(local & far & (z >= _HIGH_PEAK * highest))
    if candidates.size == 0:  # the highest lag searched sits on a slope: it stands
        k = int(np.argmax(np.where(far, z, -np.inf)))
        return divmod(k, z.shape[1])
    ly, lx = np.divmod(candidates, z.shape[1])
    k = candidates[int(np.argmin(ly**2 + (lx - half) ** 2))]
    return divmod(int(k), z.shape[1])


_CELL_CENTRES = ((1.5, 0.5), (0.5, 1.5), (1.5, -0.5), (-0.5, 1.5))


def _lattice_echo(z, vy, vx):
    """How well the lags a lattice with the peak ``v = (vy, vx)`` implies stand out.

    ``z`` ((half + 1, 2 half + 1): lags ``dy = 0..half``, ``dx = -half..half``)
    holds each lag's contrast, -inf near the centre. The second vector ``u``
    is the shortest of the local maxima more than 30 degrees off the line of
    ``v`` within :data:`_HIGH_PEAK` of the highest of them (the highest lag
    itself when none is positive, or when it sits on a slope: see
    :func:`_shortest_high_peak`). A lattice
    puts peaks at ``u``, ``2v``, ``u + v`` and ``u - v`` and troughs halfway
    between its peaks, at ``1.5 v``, ``1.5 u``, ``v +- u/2`` and ``u +- v/2``
    (halfway between two holes the image's holes meet the gaps between the
    shifted image's: the correlation is lowest there). The echo is the
    lowest peak less the highest trough (each the highest of the 3x3 lags
    around it: the peaks are a hole wide), over those inside the box; -inf
    if fewer than three peaks or two troughs are. A lattice gives about
    twice the contrast of ``v``: its peaks stand as high as ``v``, and
    when holes wider than half the pitch flatten its peaks into ripples
    (the spread then measures the lattice, and ``v`` stands only 4-6
    spreads out), its troughs sink about as low. White noise gives its
    highest lag and unrelated values at the others: an echo of about 0.
    """
    half = z.shape[0] - 1
    ly, lx = np.mgrid[0 : half + 1, -half : half + 1]
    norm_v = np.hypot(vy, vx)
    off_line = np.abs(vy * lx - vx * ly) > 0.5 * norm_v * np.hypot(ly, lx)
    # the shortest of the lags about as high as the highest: on a clean
    # lattice all its lags stand as high, and the highest was a longer,
    # non-primitive one (31 px for a 13 px step), whose "cell centres"
    # fell on lattice lags (the echo of a sharp 4096² lattice was -0.2)
    off = np.where(off_line, z, -np.inf)
    highest = float(off.max())
    if highest > 0:
        uy, ux = _shortest_high_peak(z, off_line & np.isfinite(z), half, highest)
    else:
        uy, ux = divmod(int(np.argmax(off)), z.shape[1])
    ux -= half

    def highest_near(dy, dx):
        dy, dx = round(dy), round(dx)
        if dy < 0:  # the autocorrelation is symmetric: lag -l is lag l
            dy, dx = -dy, -dx
        if dy > half or abs(dx) > half:
            return None
        rows = slice(max(dy - 1, 0), dy + 2)
        cols = slice(max(dx + half - 1, 0), dx + half + 2)
        near = z[rows, cols]
        near = near[np.isfinite(near)]
        return float(near.max()) if near.size else None

    peaks = [(uy, ux), (2 * vy, 2 * vx), (uy + vy, ux + vx), (uy - vy, ux - vx)]
    # cell centres (i + 1/2) v + (j + 1/2) u beyond the central peak
    troughs = [(i * vy + j * uy, i * vx + j * ux) for i, j in _CELL_CENTRES]
    high = [h for h in (highest_near(*p) for p in peaks) if h is not None]
    low = [h for h in (highest_near(*t) for t in troughs) if h is not None]
    if len(high) < 3 or len(low) < 2:
        return -np.inf
    return min(high) - max(low)
