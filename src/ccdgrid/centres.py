"""Sub-pixel hole centres: a blurred-disc profile fitted to every hole at once.

Each hole is measured in a square window of the *raw* image around its seed
with the model

    f(y, x) = b0 + by (y - y0) + bx (x - x0) + a E(r),
    E(r) = erfc((r - R) / (sqrt(2) s)) / 2,   r = |(y, x) - (cy, cx)|,

a disc of radius R whose edge is blurred by a Gaussian of width s (a good
approximation of a disc convolved with a Gaussian PSF when R >> s), on a
local background plane. Any radially symmetric profile gives an unbiased
centre for a round hole, so the approximation costs only a little
efficiency. The eight parameters are found by Levenberg-Marquardt, the
normal equations of all holes being built and solved as one batch of 8x8
systems: no Python loop over holes.

Robustness, in two passes:

1. the fit is first made on a 3x3 median-filtered copy of each window, which
   removes hot pixels and dead pixels (a saturated hot pixel otherwise moves
   a centre by ~2 px);
2. a noise model is learnt from the residuals of the population (background
   variance per hole, plus a Poisson-like term proportional to the signal),
   pixels of the raw window further than 5 sigma from the first model are
   dropped, and the fit is refined on the raw pixels with 1/variance weights.
   This keeps the full precision of the raw data (the median filter alone
   loses some) while ignoring defects.

A warm fit (``median_pass=False``, for a recalibration that knows every
hole's position to a few hundredths of a pixel and its previous radius and
blur) skips the median-filtered pass and the population start: one
unweighted iteration on the raw pixels (pixels further than half the
amplitude from the start model, hot or dead ones, left out), the same noise
model from its residuals, then the weighted pass. Its two passes run fused
in the compiled kernel, one hole at a time: no (N, P) array in between.

The per-hole reduced chi-square, the residual asymmetry of the background
around the hole (a hole near the taper edge sees light on one side only),
the same on the median-filtered window in the noise units of all holes
(``ring_step``: a lit edge's step inflates the hole's own noise estimate)
and the fitted background plane's gradient are returned for the clean-up of
the hole finder.

The blurred disc also fits Gaussian and super-Gaussian holes with unbiased
centres (any radially symmetric misfit is symmetric), provided the window
holds the profile's tails: the hole finder sizes it from the fitted
``R + 3 s``.
"""

import numpy as np

from ._ext import _holefit as _cython
from ._reference import holefit as _numpy
from ._validation import check_backend
from .errors import CcdgridError

__all__ = ["ProfileFit", "extract_windows", "fit_hole_profiles", "windowed_centroids"]

# Variance model exponent: var = var_bg + c (a E)**q. Poisson noise alone is
# q = 1; a fibre-bundle gain texture multiplies the signal (q = 2). q = 1.5
# beat both on images with either or both (per-hole error 0.031 against
# 0.034 for q = 1 with a fibre pattern, equal without one).
_VARIANCE_EXPONENT = 1.5
_NPAR = 8  # cy, cx, R, s, a, b0, by, bx
_CLIP_SIGMA = 5.0  # raw pixels further than this from the first model are outliers
# Without the median-filtered pass, pixels further than this fraction of the
# amplitude from the start model are left out of the first, unweighted,
# iterations: hot and dead pixels, not the noise (a tenth of the amplitude at
# a peak SNR of 10) nor a start 0.3 px off (~0.15 amplitude on the edge).
_SPIKE = 0.5
_ENGINES = {"cython": _cython, "numpy": _numpy}


class ProfileFit:
    """Result of :func:`fit_hole_profiles` for N holes.

    Attributes
    ----------
    centres : ndarray of shape (N, 2), float64
        Fitted centres (y, x) in index coordinates of the image.
    radius, blur : ndarray of shape (N,), float64
        Disc radius R and edge blur s, px.
    amplitude, background : ndarray of shape (N,), float64
        Disc height a above the local background b0 (image units).
    chi2 : ndarray of shape (N,), float64
        Reduced chi-square of the weighted fit (about 1 when the model and
        the learnt noise model hold).
    asymmetry : ndarray of shape (N,), float64
        Largest |mean residual| over 8 angular sectors of the disc, in units
        of the amplitude.
    ring_asymmetry : ndarray of shape (N,), float64
        Largest |sum of noise-normalised residuals| / sqrt(count) over 8
        sectors of the background ring (about 2 for a clean hole).
    outliers : ndarray of shape (N,), int64
        Number of raw pixels dropped as outliers (hot or dead pixels).
    ring_step : ndarray of shape (N,), float64, or None
        As ``ring_asymmetry``, but from the 3x3-median-filtered window (hot
        pixels removed, nothing clipped) in units of the noise typical of
        all the holes: a step of the background across the window (a lit
        edge, a beam stop) stands out even where it inflated the hole's own
        noise estimate. None when not measured.
    slope : ndarray of shape (N, 2), float64, or None
        Gradient ``(by, bx)`` of the fitted background plane, image units
        per px. None when not measured.
    converged : ndarray of shape (N,), bool
        The fit converged with parameters inside their bounds.
    """

    __slots__ = (
        "amplitude",
        "asymmetry",
        "background",
        "blur",
        "centres",
        "chi2",
        "converged",
        "outliers",
        "radius",
        "ring_asymmetry",
        "ring_step",
        "slope",
    )

    _OPTIONAL = ("ring_step", "slope")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name) if name in self._OPTIONAL else fields[name])


def extract_windows(image, centres, half):
    """Copy square windows around integer centres (one strided gather, no loop).

    Parameters
    ----------
    image : ndarray of shape (h, w)
    centres : ndarray of shape (N, 2), int64
        Window centres (row, col); the caller guarantees
        ``half <= row < h - half`` and ``half <= col < w - half``.
    half : int
        Half width: windows are ``(2 half + 1)`` pixels square.

    Returns
    -------
    ndarray of shape (N, 2 half + 1, 2 half + 1), dtype of ``image``
    """
    size = 2 * half + 1
    # one window per centre from a strided view: row copies, no index arrays
    view = np.lib.stride_tricks.sliding_window_view(image, (size, size))
    return view[centres[:, 0] - half, centres[:, 1] - half]


def _clipped_windows(image, centres, half, valid=None):
    """Square windows that may cross the image border, and which of their pixels count.

    Parameters
    ----------
    image : ndarray of shape (h, w)
    centres : ndarray of shape (N, 2), int64
        Window centres (row, col), inside the image.
    half : int
        Half width: windows are ``(2 half + 1)`` pixels square.
    valid : ndarray of shape (h, w), bool, optional
        False for pixels that must not be used.

    Returns
    -------
    windows : ndarray of shape (N, 2 half + 1, 2 half + 1), dtype of ``image``
        Pixels outside the image repeat the nearest border pixel.
    ok : ndarray of shape (N, 2 half + 1, 2 half + 1), bool, or None
        False where ``valid`` is False, outside the image, and on the rows
        and columns whose mirror through the window's centre is outside the
        image; None when every window lies inside the image and ``valid``
        is None.

    Notes
    -----
    A hole whose disc lies inside the image but whose window does not is
    measured from the pixels that exist, as if the rest were masked. A
    window cut on one side only would leave the radially symmetric misfit of
    the model (a point-spread function's tails, saturation) on the other:
    the background plane tilts to absorb it (by 20-45 typical spreads on
    PSF-tailed images) and the centre follows. The window is therefore cut
    symmetrically: a band as wide as the room to the border, full length
    along it.
    """
    h, w = image.shape
    inside = (
        (centres[:, 0] >= half)
        & (centres[:, 0] < h - half)
        & (centres[:, 1] >= half)
        & (centres[:, 1] < w - half)
    )
    if inside.all():
        ok = None if valid is None else extract_windows(valid, centres, half)
        return extract_windows(image, centres, half), ok
    size = 2 * half + 1
    n = centres.shape[0]
    win = np.empty((n, size, size), dtype=image.dtype)
    ok = np.empty((n, size, size), dtype=bool)
    if inside.any():  # an image narrower than a window has no window inside
        win[inside] = extract_windows(image, centres[inside], half)
        ok[inside] = True if valid is None else extract_windows(valid, centres[inside], half)
    offs = np.arange(-half, half + 1)
    rows = centres[~inside, 0, None] + offs
    cols = centres[~inside, 1, None] + offs
    r = np.clip(rows, 0, h - 1)[:, :, None]
    c = np.clip(cols, 0, w - 1)[:, None, :]
    win[~inside] = image[r, c]
    # rows and columns whose mirror through the centre is inside too: the
    # pixels kept are point-symmetric about the hole, so that the radially
    # symmetric part of the misfit (a PSF's tails) neither tilts the
    # background plane nor moves the centre
    there_r = (rows >= 0) & (rows < h) & (rows[:, ::-1] >= 0) & (rows[:, ::-1] < h)
    there_c = (cols >= 0) & (cols < w) & (cols[:, ::-1] >= 0) & (cols[:, ::-1] < w)
    there = there_r[:, :, None] & there_c[:, None, :]
    ok[~inside] = there if valid is None else there & valid[r, c]
    return win, ok


# Paeth's median-of-9 exchange network: after these 19 min/max exchanges the
# median of the nine values sits in slot 4 (no sort, all elementwise).
_MEDIAN9 = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)  # fmt: skip


def _median3(windows):
    """3x3 median of the inner part of (N, w + 2, w + 2) windows -> (N, w, w)."""
    w = windows.shape[1] - 2
    v = [windows[:, dy : dy + w, dx : dx + w].copy() for dy in range(3) for dx in range(3)]
    spare = np.empty_like(v[0])  # exchanges reuse one buffer: no allocation per step
    for i, j in _MEDIAN9:
        np.minimum(v[i], v[j], out=spare)
        np.maximum(v[i], v[j], out=v[j])
        v[i], spare = spare, v[i]
    return v[4]


def fit_hole_profiles(
    image,
    seeds,
    radius,
    *,
    half,
    valid=None,
    iterations=(5, 3),
    tol=(1e-2, 1e-3),
    start_shape=None,
    median_pass=True,
    backend="cython",
):
    """Fit a blurred disc on a background plane to every hole, vectorised.

    Parameters
    ----------
    image : ndarray of shape (h, w), float32 or float64
        Raw image (not smoothed).
    seeds : ndarray of shape (N, 2), float64
        Starting centres (y, x), index coordinates, within ~1 px.
    radius : float
        Starting hole radius, px (unused with ``start_shape``).
    half : int or ndarray of shape (N,), int
        Radius of the circular fitting window around each seed's pixel, px;
        it should reach ``radius + 3 blur + 2`` to hold a ring of background.
        Windows may cross the image border: the pixels outside it are left
        out of the fit like invalid ones (each seed's pixel must lie inside
        the image).
    valid : ndarray of shape (h, w), bool, optional
        False for pixels that must not be used (masked, dead).
    iterations : (int, int)
        Most Gauss-Newton iterations of the first pass (median-filtered, or
        raw and unweighted without ``median_pass``) and of the weighted pass.
    tol : (float, float)
        Per pass, a hole stops iterating once its steps in centre, radius and
        blur are at most ``tol`` px (and its amplitude step ``tol`` times the
        amplitude).
    start_shape : (ndarray of shape (N,), ndarray of shape (N,)), optional
        Starting radius and blur of every hole, px (e.g. a previous
        calibration's fits); the population start is then skipped.
    median_pass : bool
        First fit a 3x3-median-filtered copy of each window (robust from a
        rough start). False: the first pass fits the raw pixels, unweighted,
        which needs a start within a fraction of a pixel (``start_shape`` and
        seeds from a previous calibration, best with ``start_shape``);
        ``ring_step`` is then not measured (None).
    backend : {"cython", "numpy"}
        Engine of the Gauss-Newton fits.

    Returns
    -------
    ProfileFit
        In the order of ``seeds``.
    """
    engine = _ENGINES[check_backend(backend)]
    passes = tuple(zip((int(k) for k in iterations), (float(t) for t in tol), strict=True))
    seeds = np.asarray(seeds, dtype=np.float64)
    n = seeds.shape[0]
    halves = np.broadcast_to(np.asarray(half, dtype=np.int64), seeds.shape[:1])
    shape = None if start_shape is None else _check_shape(start_shape, n)
    opts = (valid, passes, engine, bool(median_pass))
    fit = _fit_batches(image, seeds, radius, halves, shape, opts)
    # a seed far from its hole (e.g. pulled by a hot pixel) leaves the hole
    # off-centre in its window: fit those again around the new centre
    moved = np.abs(fit.centres - np.rint(seeds)).max(axis=1) > 1.0
    if moved.any():
        h, w = image.shape
        new = fit.centres[moved]
        c = np.rint(new).astype(np.int64)
        again = (c[:, 0] >= 0) & (c[:, 0] < h) & (c[:, 1] >= 0) & (c[:, 1] < w)
        idx = np.flatnonzero(moved)[again]
        if idx.size:
            sub = None if shape is None else shape[idx]
            refit = _fit_batches(image, new[again], radius, halves[idx], sub, opts)
            for name in ProfileFit.__slots__:
                value = getattr(fit, name)
                if value is not None:
                    value[idx] = getattr(refit, name)
    return fit


def _check_shape(start_shape, n):
    """``start_shape`` as an (n, 2) array of radius and blur, px."""
    try:
        rad, blur = (np.asarray(v, dtype=np.float64) for v in start_shape)
        shape = np.column_stack([np.broadcast_to(rad, (n,)), np.broadcast_to(blur, (n,))])
    except (TypeError, ValueError):
        raise CcdgridError(
            f"`start_shape` must be (radius, blur), each a number or one per seed ({n})"
        ) from None
    if not (np.isfinite(shape).all() and (shape > 0).all()):
        raise CcdgridError("`start_shape` must hold positive finite radii and blurs (px)")
    return shape


# Window pixels (seeds x disc pixels) fitted at once: a group costs ~90 bytes
# per pixel (17 000 seeds in 31 px windows, the noise of a plate searched in
# the wrong polarity, took 1.1 GB). Groups up to this size, every real plate
# measured (a dense 4096² plate: 16 000 holes x 200 px), are fitted whole, as
# their population start and noise scale are the group's.
_FIT_PIXELS = 6_000_000


def _fit_batches(image, seeds, radius, halves, shape, opts):
    """Fit groups of seeds that share a window size; results in seed order."""
    parts = []
    order = []
    for hv in np.unique(halves):
        same = np.flatnonzero(halves == hv)
        # chunks of even size: a remainder of a few seeds would get no
        # population start and a noise scale of its own
        most = max(1, _FIT_PIXELS // _disc_offsets(int(hv))[2].size)
        chunks = -(-same.size // most)
        for idx in np.array_split(same, chunks):
            sub = None if shape is None else shape[idx]
            parts.append(_fit_group(image, seeds[idx], radius, int(hv), sub, *opts))
            order.append(idx)
    if not parts:
        return _fit_group(image, seeds, radius, 3, shape, *opts)
    if len(parts) == 1:
        return parts[0]
    idx = np.concatenate(order)
    inv = np.empty_like(idx)
    inv[idx] = np.arange(idx.size)
    fields = {
        name: None
        if getattr(parts[0], name) is None
        else np.concatenate([getattr(part, name) for part in parts])[inv]
        for name in ProfileFit.__slots__
    }
    return ProfileFit(**fields)


def _spot_shadow(res, ok, amplitude, disc, half):
    """Pixels whose 3x3 median a bright or dark spot reaches, (N, P) bool.

    A zinger or hot cluster of 5 or more pixels survives the 3x3 median, and
    the median of the pixels around any spot is biased towards it: in a
    hole's ring of background a 3x3 zinger alone made the background look
    stepped by 3-1500 typical spreads ("cut by edge"). A spot pixel is one
    off the fitted model by more than the hole's own height, which neither
    noise at a usable signal-to-noise ratio nor a lit-area edge reaches
    (the background behind the plate is darker than a hole); the 3x3
    neighbourhood of every such pixel is its shadow in the median.

    Parameters
    ----------
    res : ndarray of shape (N, P), float64
        Raw residuals ``data - model`` on the window's disc pixels.
    ok : ndarray of shape (N, P), bool
        Valid pixels.
    amplitude : ndarray of shape (N,), float64
        Fitted hole heights.
    disc : ndarray of shape (P,), int64
        Flat indices of the disc pixels in the ``(2 half + 1)²`` square.
    half : int
        Window half width, px.
    """
    spot = ok & (np.abs(res) > np.abs(amplitude)[:, None])
    rows = np.flatnonzero(spot.any(axis=1))
    out = np.zeros(spot.shape, dtype=bool)
    if rows.size == 0:
        return out
    w = 2 * half + 1
    square = np.zeros((rows.size, w + 2, w + 2), dtype=bool)
    inner = square[:, 1:-1, 1:-1].reshape(rows.size, -1)  # a copy: filled, then put back
    inner[:, disc] = spot[rows]
    square[:, 1:-1, 1:-1] = inner.reshape(rows.size, w, w)
    grown = np.zeros((rows.size, w, w), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            grown |= square[:, dy : dy + w, dx : dx + w]
    out[rows] = grown.reshape(rows.size, -1)[:, disc]
    return out


def _disc_offsets(half):
    """Pixel offsets (y, x) of the circular window of radius ``half + 0.5``, and their indices."""
    w = 2 * half + 1
    offs = np.arange(-half, half + 1, dtype=np.float64)
    yy = np.repeat(offs, w)
    xx = np.tile(offs, w)
    disc = np.flatnonzero(yy * yy + xx * xx <= (half + 0.5) ** 2)
    return yy[disc], xx[disc], disc


def _fit_group(image, seeds, radius, half, shape, valid, passes, engine, median_pass):
    n = seeds.shape[0]
    centre = np.rint(seeds).astype(np.int64)
    yy, xx, disc = _disc_offsets(half)
    p = np.zeros((n, _NPAR))
    p[:, :2] = seeds - centre
    if shape is None:
        p[:, 2] = radius
        p[:, 3] = max(0.1 * radius, 0.6)
        inner_radius = radius
    else:
        p[:, 2:4] = shape
        inner_radius = float(np.median(shape[:, 0])) if n else 0.0
    rr = np.hypot(yy, xx)
    outer = rr >= half - 1.5
    inner = rr <= 0.5 * inner_radius
    if median_pass:
        return _cold_group(
            image, centre, p, yy, xx, disc, outer, inner, half, valid, passes, engine
        )
    return _warm_group(
        image, centre, p, yy, xx, disc, outer, inner, half, shape is None, valid, passes, engine
    )


def _cold_group(image, centre, p, yy, xx, disc, outer, inner, half, valid, passes, engine):
    """A median-filtered pass from the population start, then the weighted raw pass."""
    solve = engine.gauss_newton
    n = centre.shape[0]
    # the image's own dtype (float32 from the hole finder): the 3x3 median
    # selects values, so it is exact in it, and moves half the bytes
    raw, ok_big = _clipped_windows(image, centre, half + 1, valid)
    if ok_big is None:
        ok_big = np.ones(raw.shape, dtype=bool)
    else:
        # invalid pixels (and those outside the image) take the window median
        # so that the 3x3 median ignores them
        bad = np.flatnonzero(~ok_big.all(axis=(1, 2)))
        if bad.size:
            fill = np.median(raw[bad].reshape(bad.size, -1), axis=1).astype(raw.dtype)
            raw[bad] = np.where(ok_big[bad], raw[bad], fill[:, None, None])
    # the kernels take C-contiguous rows (fancy indexing may not give them)
    med = np.ascontiguousarray(_median3(raw).reshape(n, -1)[:, disc], dtype=np.float64)
    data = np.ascontiguousarray(raw[:, 1:-1, 1:-1].reshape(n, -1)[:, disc], dtype=np.float64)
    ok = np.ascontiguousarray(ok_big[:, 1:-1, 1:-1].reshape(n, -1)[:, disc])
    p[:, 5] = np.median(med[:, outer], axis=1)
    p[:, 4] = np.maximum(np.median(med[:, inner], axis=1) - p[:, 5], 1e-6)

    weight = ok.astype(np.float64)
    _population_start(p, med, weight, yy, xx, half, passes[0][0], solve)
    p, _, res_med, _ = solve(p, med, weight, yy, xx, half, *passes[0])
    res_raw = data - (med - res_med)
    var_bg, slope = _noise_model(*engine.edge_variances(p, res_raw, ok, yy, xx), p[:, 4])
    variance, keep, weight = engine.clip_weights(
        p, res_raw, ok, yy, xx, var_bg, slope, _VARIANCE_EXPONENT, _CLIP_SIGMA
    )
    p, cost, res, _ = solve(p, data, weight, yy, xx, half, *passes[1])
    # clip again against the refined model: pass 1 may have been pulled by
    # masked or dead pixels and dropped good pixels next to them
    keep2 = ok & (res * res <= _CLIP_SIGMA**2 * variance)
    changed = (keep2 != keep).any(axis=1)
    if changed.any():
        keep[changed] = keep2[changed]
        weight[changed] = np.where(keep2[changed], 1.0 / variance[changed], 0.0)
        sub, cost_sub, res_sub, _ = solve(
            p[changed], data[changed], weight[changed], yy, xx, half, *passes[1]
        )
        p[changed], cost[changed], res[changed] = sub, cost_sub, res_sub

    asym, ring_asym = engine.sector_asymmetry(p, res, weight, yy, xx, float(half))
    # the background's one-sidedness on the median-filtered pixels, unclipped,
    # against the typical hole's noise (see ProfileFit.ring_step)
    off_med = med - data + res  # median-filtered pixels minus the model
    spots = _spot_shadow(res, ok, p[:, 4], disc, half)
    _, ring_step = engine.sector_asymmetry(
        p, off_med, (ok & ~spots) / float(np.median(var_bg)), yy, xx, float(half)
    )
    return _profile_fit(
        centre, p, cost, keep.sum(1), (ok & ~keep).sum(1), asym, ring_asym, ring_step, half
    )


def _warm_group(
    image, centre, p, yy, xx, disc, outer, inner, half, no_shape, valid, passes, engine
):
    """Raw unweighted pass from the given start, then the weighted pass (compiled, fused)."""
    n = centre.shape[0]
    raw, ok_win = _clipped_windows(image, centre, half, valid)
    data = np.ascontiguousarray(raw.reshape(n, -1)[:, disc], dtype=np.float64)
    if ok_win is None:
        ok = np.ones(data.shape, dtype=bool)
    else:
        ok = np.ascontiguousarray(ok_win.reshape(n, -1)[:, disc])
    outer = np.ascontiguousarray(outer)
    inner = np.ascontiguousarray(inner)
    if no_shape:
        # no shape per hole: start every hole from the shape of a fitted sample
        p, _, _ = engine.warm_first_pass(
            p, data, ok, yy, xx, outer, inner, half, True, np.inf, 0, 0.0
        )
        _population_start(p, data, ok.astype(np.float64), yy, xx, half, 5, engine.gauss_newton)
    p, var_bg, var_in = engine.warm_first_pass(
        p, data, ok, yy, xx, outer, inner, float(half), not no_shape, _SPIKE, *passes[0]
    )
    var_bg, slope = _noise_model(var_bg, var_in, p[:, 4])
    p, cost, kept, outliers, asym, ring_asym = engine.warm_weighted_pass(
        p, data, ok, yy, xx, float(half), var_bg, slope, _VARIANCE_EXPONENT, _CLIP_SIGMA,
        *passes[1],
    )  # fmt: skip
    return _profile_fit(centre, p, cost, kept, outliers, asym, ring_asym, None, half)


def _noise_model(var_bg, var_in, amplitude):
    """Background variance per hole (N,) and the population's signal slope.

    The variance of a pixel is ``var_bg + slope (a E)**q``: the background's
    per hole plus a signal-proportional (Poisson-like) term shared by all
    holes, from the residual variances of the background and of the disc's
    top (:func:`edge_variances`).
    """
    amp = np.maximum(amplitude, 1e-12)
    with np.errstate(invalid="ignore"):
        slopes = (var_in - var_bg) / amp**_VARIANCE_EXPONENT
    slopes = slopes[np.isfinite(slopes)]
    slope = max(float(np.median(slopes)), 0.0) if slopes.size else 0.0
    finite = np.isfinite(var_bg) & (var_bg > 0)
    var_bg = np.where(finite, var_bg, np.median(var_bg[finite]) if finite.any() else 1.0)
    # model mismatch floor, so that noise-free data do not lose good pixels
    return np.ascontiguousarray(np.maximum(var_bg, (3e-3 * amp) ** 2)), slope


def _profile_fit(centre, p, cost, kept, outliers, asym, ring_asym, ring_step, half):
    dof = np.maximum(kept - _NPAR, 1)
    inside = (np.abs(p[:, :2]) < 0.6 * half - 1e-9).all(1)
    converged = inside & np.isfinite(p).all(1) & (p[:, 4] > 0)
    return ProfileFit(
        centres=centre + p[:, :2],
        radius=p[:, 2].copy(),
        blur=p[:, 3].copy(),
        amplitude=p[:, 4].copy(),
        background=p[:, 5].copy(),
        chi2=cost / dof,
        asymmetry=asym,
        ring_asymmetry=ring_asym,
        ring_step=ring_step,
        slope=p[:, 6:8].copy(),
        outliers=np.asarray(outliers, dtype=np.int64),
        converged=converged,
    )


def _population_start(p, data, weight, yy, xx, half, iterations, solve, size=24):
    """Start every hole from the median radius and blur of a few fitted ones (in place).

    The radius guess comes from the image's autocorrelation and runs ~15 %
    large, the blur guess is a plain default; all holes of a plate share
    both to a few per cent. Fitting a spread-out sample of the brighter
    candidates first lets the others converge in about two iterations
    instead of five.
    """
    n = p.shape[0]
    if n < 2 * size:
        return
    bright = np.flatnonzero(p[:, 4] >= 0.5 * np.median(p[:, 4]))
    if bright.size < size:
        return
    sample = bright[np.linspace(0, bright.size - 1, size).astype(np.int64)]
    fitted, _, _, _ = solve(p[sample], data[sample], weight[sample], yy, xx, half, iterations, 0.0)
    good = np.isfinite(fitted).all(axis=1) & (fitted[:, 4] > 0)
    if good.sum() >= size // 2:
        p[:, 2] = np.median(fitted[good, 2])
        p[:, 3] = np.median(fitted[good, 3])


def windowed_centroids(image, seeds, half):
    """Background-subtracted centroid in a square window (the classic baseline).

    Parameters
    ----------
    image : ndarray of shape (h, w)
    seeds : ndarray of shape (N, 2), float64
        Window centres (y, x), at least ``half`` from the border.
    half : int
        Half width of the window.

    Returns
    -------
    ndarray of shape (N, 2), float64
        Centroids (y, x); the background is the median of the window's
        outermost pixels and negative values are clipped to 0.
    """
    centre = np.rint(np.asarray(seeds)).astype(np.int64)
    win = extract_windows(image, centre, half).astype(np.float64)
    border = np.concatenate([win[:, 0], win[:, -1], win[:, 1:-1, 0], win[:, 1:-1, -1]], axis=1)
    win = np.maximum(win - np.median(border, axis=1)[:, None, None], 0.0)
    offs = np.arange(-half, half + 1, dtype=np.float64)
    total = win.sum(axis=(1, 2))
    cy = np.einsum("nij,i->n", win, offs) / total
    cx = np.einsum("nij,j->n", win, offs) / total
    return centre + np.stack([cy, cx], axis=1)
