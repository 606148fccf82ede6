"""Which local maxima of the smoothed image are holes: contrast, threshold, clean-up.

Every region of the watershed has one peak. A hole's peak stands far above
the background around it; a noise peak barely does. The contrast of a peak
is its smoothed value minus the median of the smoothed image on a ring just
outside the smoothed hole, so that a slowly varying background, dark areas
outside the taper and the overall intensity scale do not matter.

The threshold on ``log10(contrast)`` is chosen automatically from the
histogram of all peaks: the bright mode of the holes is located first, and
the threshold is put at the deepest, widest gap of the histogram between it
and the noise peaks, never closer to the noise than a multiple of the noise
peaks' own spread. Holes, hot pixels and the faint rest are then told apart
by their fitted profiles (see :func:`classify_fits`).
"""

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["LogHistogram", "auto_threshold", "classify_fits", "ring_background"]


class LogHistogram:
    """Histogram of ``log10(contrast)`` of all peaks, for reports.

    Attributes
    ----------
    edges : ndarray of shape (B + 1,), float64
        Bin edges, log10 of image units.
    counts : ndarray of shape (B,), int64
    threshold : float
        The log10 threshold that was used.
    """

    __slots__ = ("counts", "edges", "threshold")

    def __init__(self, edges, counts, threshold):
        self.edges = edges
        self.counts = counts
        self.threshold = float(threshold)

    def __repr__(self):
        return f"LogHistogram({self.counts.size} bins, threshold={self.threshold:.3f})"


# An optimal sorting network for 8 values (19 exchanges; Knuth, TAOCP 5.3.4).
_SORT8 = (
    (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7), (0, 1), (2, 3),
    (4, 5), (6, 7), (2, 4), (3, 5), (1, 4), (3, 6), (1, 2), (3, 4), (5, 6),
)  # fmt: skip


def _sorting_network(n):
    """Exchanges ``(i, j)``, ``i < j``, that sort n values (min to slot i, max to slot j)."""
    if n == 8:
        return _SORT8
    return tuple((j, j + 1) for i in range(n - 1) for j in range(n - 1 - i))


def ring_background(smoothed, peaks, radius, n=8):
    """Median and spread of ``smoothed`` on a ring around each peak.

    Parameters
    ----------
    smoothed : ndarray of shape (h, w), float32
    peaks : ndarray of shape (N, 2), int64
        Peak pixels (row, col).
    radius : float
        Ring radius, px; ring points outside the image are clamped to its edge.
    n : int
        Number of ring points.

    Returns
    -------
    median, low, high : ndarray of shape (N,), float64
        Median, minimum and maximum of the ring samples (the smoothing has
        already averaged each sample over a hole's area, so a few samples
        suffice).
    """
    h, w = smoothed.shape
    ang = np.arange(n) * (2.0 * np.pi / n)
    oy = np.rint(radius * np.sin(ang)).astype(np.int64)
    ox = np.rint(radius * np.cos(ang)).astype(np.int64)
    # flat indices of the ring points, clamped to the image (np.clip is far
    # slower than a maximum and a minimum in place for integers)
    rows = peaks[:, 0] + oy[:, None]
    np.minimum(np.maximum(rows, 0, out=rows), h - 1, out=rows)
    cols = peaks[:, 1] + ox[:, None]
    np.minimum(np.maximum(cols, 0, out=cols), w - 1, out=cols)
    rows *= w
    rows += cols
    # one row of samples per ring point, sorted across rows by an exchange
    # network: a few vectorised min/max over N values instead of N small sorts
    ring = list(smoothed.ravel()[rows])
    spare = np.empty_like(ring[0])
    for i, j in _sorting_network(n):
        np.minimum(ring[i], ring[j], out=spare)
        np.maximum(ring[i], ring[j], out=ring[j])
        ring[i], spare = spare, ring[i]
    median = 0.5 * (ring[(n - 1) // 2].astype(np.float64) + ring[n // 2])
    return median, ring[0].astype(np.float64), ring[-1].astype(np.float64)


# fewer peaks above the noise floor than this means the floor missed the holes
# (peaks.MIN_HOLES: no lattice can be defined from fewer)
_MIN_BRIGHT = 6


_MANY_ABOVE = 0.5  # a gap below many values is the holes' at half the widest's weight


def auto_threshold(log_contrast, bin_width=0.05, min_bright=None, max_holes=None):
    """Choose the log10-contrast threshold separating holes from noise peaks.

    Parameters
    ----------
    log_contrast : ndarray of shape (N,), float64
        ``log10(contrast)`` of the candidate peaks with a positive contrast.
    bin_width : float
        Histogram bin width in decades.
    min_bright : int, optional
        The fewest holes the image should show (default and at least
        ``_MIN_BRIGHT``, 6): a gap below fewer values than that is not
        the holes' (the caller knows how many the image holds about: its
        area over the pitch squared).
    max_holes : float, optional
        The most holes the image can hold (about its area over the pitch
        squared). When there are no more candidates than that, none is taken for
        noise: the threshold lies below them all, and the profile fits judge
        them. (A smoothing disc as wide as large holes leaves few regions
        besides the holes: on a 1024² plate of a 150 px pitch the 51
        candidates were the holes, 0.6 decade apart under vignetting, one
        of them brighter by 0.3 decade, and the gap below it was taken for
        the holes': one hole kept.)

    Returns
    -------
    threshold : float
        The chosen threshold (log10 units).
    histogram : LogHistogram

    Notes
    -----
    1. The noise peaks are the bulk of the low values: their median ``m`` and
       spread ``s`` (MAD) are taken from the lower half of the distribution.
    2. Holes are the high mode: the median of the values above ``m + 6 s``
       (if there are none, the threshold is ``m + 6 s``). If fewer than six
       values lie above ``m + 6 s``, the noise statistics were spoiled (few,
       multimodal noise peaks, or holes near half of all peaks): the floor
       and the lower end of the search in 3. move to the widest gap between
       sorted values, each weighed by the square root of the smaller count on
       either side of it: among those with ``min_bright`` values above when
       the caller expects more than six holes; otherwise the widest gap
       stands even below fewer values (a few holes over the noise, kept by
       the floor), unless a gap below six values or more weighs at least
       half as much (holes most of the peaks, a few saturated ones above).
    3. The threshold is the centre of the emptiest stretch of the histogram
       (smoothed over 3 bins) between ``m + 4 s`` and the hole mode minus
       0.3 decade (but not below the hole mode minus one decade); the
       longest run of the emptiest bins wins, so that faint holes are kept
       and sent to the profile checks rather than dropped here.
    """
    min_bright = _MIN_BRIGHT if min_bright is None else max(int(min_bright), _MIN_BRIGHT)
    vals = np.sort(np.asarray(log_contrast, dtype=np.float64))
    lo, hi = vals[0], vals[-1]
    nb = max(int(np.ceil((hi - lo) / bin_width)), 1)
    edges = lo + bin_width * np.arange(nb + 1)
    counts = np.histogram(vals, bins=edges)[0].astype(np.int64)
    if max_holes is not None and vals.size <= max_holes:
        thr = float(lo - 0.5 * bin_width)
        return thr, LogHistogram(edges, counts, thr)
    lower = vals[: max(vals.size // 2, 1)]
    med = float(np.median(vals))
    spread = 1.4826 * float(np.median(np.abs(lower - np.median(lower))))
    spread = max(spread, bin_width)
    floor = med + 6.0 * spread
    start = med + 4.0 * spread
    bright = vals[vals > floor]
    if bright.size < min_bright and vals.size > 2 * min_bright:
        # With few noise peaks (large holes leave few watershed regions) or
        # holes making up nearly half of the peaks, the "noise" spread holds
        # several modes or the holes themselves and the floor lands above
        # every hole. The holes are then the values above the widest gap
        # between sorted values, which is where the floor goes instead. A gap
        # is weighed by the square root of the smaller count on either side:
        # the noise's own long tail leaves wide gaps below one or two values,
        # and on a clean, vignetted plate (few noise peaks, holes most of the
        # peaks) the corner holes trail down half a decade: they filled the
        # faintest tenth, once left out of the search here, and the threshold
        # cut into them (9 of 301 holes lost).
        gaps = np.diff(vals)
        below = np.arange(1, vals.size)
        weight = gaps * np.sqrt(np.minimum(below, vals.size - below))
        few_above = vals.size - below < min_bright
        k = int(np.argmax(weight))
        widest = weight[k]
        if min_bright > _MIN_BRIGHT:
            # the caller expects more holes than a gap below fewer than
            # `min_bright` values leaves: three saturated blobs 160 times
            # brighter than the holes (a 2048² plate of ~900 holes) left the
            # widest gap below their 6 peaks
            weight[few_above] = -np.inf
            k = int(np.argmax(weight))
        elif few_above[k]:
            # a few values far above the rest are a few holes over the noise,
            # or a few saturated holes over a plate of holes, the holes most
            # of the peaks (two at 4.3 over 140 at 3.3-3.4, the noise peaks
            # 15 values below): then a gap below enough values is nearly as
            # wide, and it is the holes'
            weight[few_above] = -np.inf
            k_many = int(np.argmax(weight))
            if weight[k_many] >= _MANY_ABOVE * widest:
                k = k_many
        # fewer values above the gap than are needed: these few are the holes
        # and the floor already keeps them
        if vals.size - k - 1 >= min_bright and vals[k] < floor:
            start = float(vals[k])
            floor = 0.5 * (vals[k] + vals[k + 1])
            bright = vals[vals > floor]
    if bright.size == 0:
        return floor, LogHistogram(edges, counts, floor)
    mode = float(np.median(bright))
    # holes ten times fainter than the typical one are never kept (see
    # classify_fits), so the threshold need not go lower
    start = max(start, mode - 1.0)
    stop = mode - 0.3
    if stop <= start:
        thr = min(floor, mode - 0.3) if mode - 0.3 > med else floor
        return thr, LogHistogram(edges, counts, thr)
    centres = 0.5 * (edges[:-1] + edges[1:])
    sm = np.convolve(counts, np.ones(3) / 3.0, mode="same")
    inside = (centres >= start) & (centres <= stop)
    if not inside.any():
        thr = 0.5 * (start + stop)
        return thr, LogHistogram(edges, counts, thr)
    idx = np.flatnonzero(inside)
    low = sm[idx].min()
    best = idx[sm[idx] <= low + 1e-9]
    # the longest run of minimal bins; its centre is the threshold
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    run = max(runs, key=len)
    thr = float(0.5 * (centres[run[0]] + centres[run[-1]]))
    return thr, LogHistogram(edges, counts, thr)


def _robust_z(values, ref):
    med = np.median(ref)
    mad = 1.4826 * np.median(np.abs(ref - med))
    return (values - med) / max(mad, 1e-12 * max(abs(med), 1.0))


def classify_fits(fit, contrast, nmin=5, image_shape=None, window=None):
    """Reasons to reject fitted candidates, judged against the population.

    Parameters
    ----------
    fit : ccdgrid.centres.ProfileFit
        Profile fits of N candidates.
    contrast : ndarray of shape (N,), float64
        Peak contrast of each candidate in the smoothed image.
    nmin : int
        Below this many plausible holes, only the absolute tests apply.
    image_shape : tuple of int, optional
        ``(h, w)`` of the image: a hole whose disc and one blur width
        (``R + s``) reach past the image border is cut by it.
    window : int or ndarray of shape (N,), int, optional
        Half width of each fit's window, px (with ``image_shape``): holes
        whose window the image border clips are judged against each other
        in the chi-square, ring, background-step and plane-tilt tests (when
        each group holds at least ``max(nmin, 8)`` good holes).

    Returns
    -------
    ndarray of shape (N,), object
        ``""`` for an accepted hole, else a short reason: ``"fit failed"``,
        ``"hot pixel"``, ``"not a hole"`` (no disc in the raw image),
        ``"shape"`` (RMS radius or blur unlike the other holes), ``"too
        faint"``, ``"cut by border"`` (the disc reaches past the image
        border), ``"cut by edge"`` (background darker on one side or
        stepped, its plane tilted against the neighbours', dimmer or smaller
        than the neighbours, or a poor fit).

    Notes
    -----
    Every limit is judged against this image's holes (robust z-scores, or
    spreads of neighbour ratios), so that it follows the noise and the
    hole-to-hole scatter of the plate rather than fixed tolerances. The
    optional ``fit.ring_step`` and ``fit.slope`` (None in fits that did not
    measure them) add the background-step and tilted-plane tests.
    """
    n = fit.amplitude.size
    reasons = np.full(n, "", dtype=object)
    amp = fit.amplitude
    ratio = amp / np.maximum(contrast, 1e-30)
    reasons[~fit.converged] = "fit failed"
    # a hole's fitted height matches its smoothed contrast (the disc kernel
    # is no wider than the hole); a hot pixel's median-filtered window has no disc
    # The size of a hole is its RMS radius: for soft (Gaussian-like) holes
    # the fitted disc radius and blur trade off against each other at the
    # noise level (each scatters 8-10 % at a peak SNR of 9, which the fixed
    # limits below took for a wrong shape), their RMS radius only 4 %.
    size = _rms_radius(fit.radius, fit.blur)
    nodisc = (reasons == "") & ((ratio < 0.3) | ~(size >= 1.0))
    reasons[nodisc & (fit.outliers > 0)] = "hot pixel"
    reasons[nodisc & (fit.outliers == 0)] = "not a hole"
    good = reasons == ""
    if good.sum() < nmin:
        return reasons
    ref = good.copy()
    for _ in range(2):
        rz = _robust_z(size, size[ref])
        med_r = np.median(size[ref])
        med_s = np.median(fit.blur[ref])
        med_a = np.median(amp[ref])
        rel = np.abs(size / med_r - 1.0)
        shape = ((np.abs(rz) > 6.0) & (rel > 0.06)) | (rel > 0.25)
        shape |= fit.blur > 2.5 * med_s + 0.5
        faint = amp < 0.2 * med_a
        ref = good & ~shape & ~faint
        if ref.sum() < nmin:
            ref = good
            break
    reasons[good & shape] = "shape"
    reasons[good & ~shape & faint] = "too faint"
    good = reasons == ""
    # Windows cut by the image border hold less background, and on two sides
    # only: the model's misfit weighs more in their chi-square, ring
    # asymmetry, background step and plane (ring_step 6-11 typical spreads
    # of all holes for whole holes at the border of a saturated, PSF-tailed
    # image). They are judged against each other when there are enough.
    clipped = _clipped(fit.centres, image_shape, window, good, nmin)
    logchi = np.log(np.maximum(fit.chi2, 1e-300))
    chi_z, chi_med = _grouped_z(fit.chi2, good, clipped, logchi)
    asym_z = _robust_z(fit.asymmetry, fit.asymmetry[good])
    ring_z, _ = _grouped_z(fit.ring_asymmetry, good, clipped)
    # a hole partly cut by the taper edge keeps its shape but loses light:
    # it is dimmer than its neighbours (vignetting is smooth on that scale)
    near = _Neighbours(fit.centres)
    ratio = _neighbour_ratio(fit.centres, amp, good, near=near)
    # A hole cut by a lit-area edge need not look smaller: the fit may
    # drop its dimmed side as outliers and leave a one-sided residual. Both
    # are judged against this image's holes, with margins that a hot pixel
    # or two in a hole does not reach (outliers alone also come from a
    # missing neighbour or a background step beside a whole hole).
    out = fit.outliers.astype(np.float64)
    out_med = float(np.median(out[good]))
    out_mad = 1.4826 * float(np.median(np.abs(out[good] - out_med)))
    asym_med = float(np.median(fit.asymmetry[good]))
    cut = good & (
        ((chi_z > 6.0) & (fit.chi2 > 1.5 * chi_med))
        | ((asym_z > 6.0) & (fit.asymmetry > 0.04))
        # one-sided and dimmer than the neighbours: cut (a whole hole in a
        # resampled image may be as one-sided, but keeps its light)
        | ((asym_z > 6.0) & (fit.asymmetry > 2.0 * asym_med) & (ratio < 0.95))
        | ((ring_z > 6.0) & (fit.ring_asymmetry > 6.0))
        | ((out > max(1.5 * out_med + 20.0, out_med + 6.0 * out_mad)) & (asym_z > 3.0))
    )
    if fit.ring_step is not None:
        # A lit-area edge or a beam stop crossing the window leaves a step in
        # the background that the plane cannot follow: the fit drifts away
        # from the dark side (by up to a pixel) and, its own noise estimate
        # inflated by the step, hides it from ring_asymmetry. On the
        # median-filtered window and in the noise units of all the holes, the
        # step of a cut hole stands 10-50 typical spreads out; a whole hole's
        # background, gradient included, stays within ~5.
        step_z, step_med = _grouped_z(fit.ring_step, good, clipped)
        cut |= good & (step_z > 6.0) & (fit.ring_step > 2.0 * step_med)
    if fit.slope is not None:
        # The same step tilts the fitted background plane: against the
        # plane of its neighbours (a smooth background tilts them alike), the
        # plane of a hole the step moves by more than 0.15 px differs by 27-700
        # typical spreads, a whole hole's by less than 4, even where the step
        # is too faint for ring_step (a dark background, a peak SNR of 9). In
        # between (8-20) lie holes the step barely touches (0.01-0.14 px off
        # on generated images, 0.1 px on a FReLoN-like taper edge): they
        # are worth more to the maps at the edge than they cost.
        # Cut holes come in rows along the edge: a second pass leaves the
        # tilted ones out of the neighbours' medians.
        ref = good
        for _ in range(2):
            slope_med = _neighbour_median(fit.centres, fit.slope, ref, near=near)
            tilt = np.hypot(*(fit.slope - slope_med).T)
            tilt_z = _grouped_z(tilt, ref, clipped)[0]
            tilted = good & (tilt_z > 20.0)
            ref = good & ~tilted
        # At a peak SNR of 7-10 the tilt of a hole the edge cuts through
        # stays below 20 spreads (8-13), and its neighbours along the edge,
        # cut alike, hide its dimmer, smaller disc from the neighbour ratios
        # below: such holes sat 0.8-2.6 px off. A tilt beyond 5 spreads that
        # comes with a one-sided residual or a disc small for the population
        # is a cut hole: on 28 generated 512² plates (two generators, peak
        # SNR 7 to 400), this caught 23 of the 46 holes more than 0.3 px
        # off (all those beyond 1.2 px) and 2 of 2378 within 0.1 px.
        tilted |= good & (tilt_z > 5.0) & ((asym_z > 3.0) | (rz < -2.5))
        cut |= tilted
    border = np.zeros(n, dtype=bool)
    if image_shape is not None:
        # The image ends half a pixel past its outermost pixel centres. A
        # hole whose disc and one blur width lie inside is fitted without
        # bias on the pixels there are; a hole cut closer than that has lost
        # part of its edge, and its centre moves away from the border.
        reach = fit.radius + fit.blur
        cy, cx = fit.centres[:, 0], fit.centres[:, 1]
        h, w = image_shape
        edge = np.minimum(np.minimum(cy, h - 1 - cy), np.minimum(cx, w - 1 - cx)) + 0.5
        border = good & (edge < reach)
    # ... and, losing its rim, it looks smaller than its neighbours (the
    # local magnification changes by far less than 2 % from hole to hole).
    # A dark fibre-bundle boundary across a hole also dims it and makes it
    # one-sided, but leaves its radius: dimness alone is not enough.
    r_ratio = _neighbour_ratio(fit.centres, size, good, near=near)
    # How far a whole hole's fitted radius strays from its neighbours' depends
    # on the noise and on how much the holes differ: the limits scale with
    # the robust spread of the ratio over this image's holes.
    r_spread = 1.4826 * float(np.median(np.abs(r_ratio[good] - np.median(r_ratio[good]))))
    small = 1.0 - max(0.04, 4.0 * r_spread)
    smallish = 1.0 - max(0.02, 2.0 * r_spread)
    # likewise for the brightness: plates whose holes differ in transmission
    # by several per cent must not lose their dimmer whole holes
    a_spread = 1.4826 * float(np.median(np.abs(ratio[good] - np.median(ratio[good]))))
    dark = 1.0 - max(0.3, 6.0 * a_spread)
    darkish = 1.0 - max(0.1, 3.0 * a_spread)
    dim = good & (
        (ratio < dark)
        | (r_ratio < small)
        | ((ratio < darkish) & ((r_ratio < smallish) | ((asym_z > 3.0) & (r_ratio < 0.995))))
    )
    reasons[cut | dim] = "cut by edge"
    reasons[border] = "cut by border"
    return reasons


def _clipped(centres, image_shape, window, good, nmin):
    """Holes whose fit window crosses the image border, (N,) bool.

    All False without ``image_shape`` and ``window``, or when fewer than
    ``max(nmin, 8)`` good holes fall in either group (too few for a robust
    spread: every hole is then judged against all).
    """
    n = centres.shape[0]
    if image_shape is None or window is None:
        return np.zeros(n, dtype=bool)
    half = np.broadcast_to(np.asarray(window, dtype=np.float64), (n,))
    h, w = image_shape
    cy, cx = centres[:, 0], centres[:, 1]
    room = np.minimum(np.minimum(cy, h - 1 - cy), np.minimum(cx, w - 1 - cx))
    clipped = room < half
    least = max(nmin, 8)
    if np.count_nonzero(good & clipped) < least or np.count_nonzero(good & ~clipped) < least:
        return np.zeros(n, dtype=bool)
    return clipped


def _grouped_z(values, good, groups, scaled=None):
    """Robust z-scores of ``values`` within the groups (True, False) of ``groups``.

    Returns ``(z, median)``: the z-score of ``scaled`` (``values`` if None)
    against the ``good`` members of each hole's group, and the median of
    ``values`` over them, both (N,).
    """
    scaled = values if scaled is None else scaled
    z = np.empty(values.shape)
    med = np.empty(values.shape)
    for g in (False, True):
        sel = groups == g
        ref = good & sel
        if not sel.any():
            continue
        if not ref.any():
            ref = good
        z[sel] = _robust_z(scaled[sel], scaled[ref])
        med[sel] = np.median(values[ref])
    return z, med


def _rms_radius(radius, blur):
    """RMS radius, px, of a disc of radius ``R`` blurred by a Gaussian of sigma ``s``.

    ``sqrt(R² / 2 + 2 s²)``: the disc's second moment plus the blur's. For
    soft profiles the fitted ``R`` and ``s`` trade off against each other at
    the noise level; this combination of them does not.
    """
    return np.sqrt(0.5 * np.square(radius) + 2.0 * np.square(blur))


def _neighbour_ratio(centres, values, good, k=6, near=None):
    """``values`` over the median of the k nearest ``good`` neighbours' values."""
    if np.count_nonzero(good) <= k:
        return np.ones(values.size)
    return values / _neighbour_median(centres, values, good, k, near)


def _neighbour_median(centres, values, good, k=6, near=None):
    """Median of ``values`` (N,) or (N, d) over each point's k nearest ``good`` neighbours.

    A point is not its own neighbour. With k or fewer good points, the
    median over all of them. ``near``, a :class:`_Neighbours` of
    ``centres``, keeps the neighbours found for one ``good`` for the next
    call with the same (classify_fits asks four times, mostly with one).
    """
    idx = np.flatnonzero(good)
    if idx.size <= k:
        return np.broadcast_to(np.median(values[idx], axis=0), values.shape)
    nb = near.rows(good, k) if near is not None else _neighbour_rows(centres, idx, k)
    return np.median(values[nb], axis=1)


def _neighbour_rows(centres, idx, k):
    """(N, k) rows, among ``idx``, of each point's k nearest neighbours but itself."""
    _, nb = cKDTree(centres[idx]).query(centres, k=k + 1)
    # the nearest is the point itself for good ones; drop it, else the farthest
    own = idx[nb[:, 0]] == np.arange(centres.shape[0])
    return idx[np.where(own[:, None], nb[:, 1:], nb[:, :-1])]


class _Neighbours:
    """The k nearest ``good`` neighbours of every centre, for the last ``good`` asked."""

    def __init__(self, centres):
        self.centres = centres
        self._key = None
        self._rows = None

    def rows(self, good, k):
        if self._key is None or self._key[1] != k or not np.array_equal(self._key[0], good):
            self._rows = _neighbour_rows(self.centres, np.flatnonzero(good), k)
            self._key = (good.copy(), k)
        return self._rows
