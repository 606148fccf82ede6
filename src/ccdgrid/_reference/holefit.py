"""Pure-numpy twin of ``ccdgrid._ext._holefit``: batched blurred-disc fits.

The model of one hole, in its window (offsets ``(y, x)`` from the window
centre, px):

    f(y, x) = b0 + by y + bx x + a E(r),
    E(r) = erfc((r - R) / (sqrt(2) s)) / 2,   r = |(y, x) - (cy, cx)|,

with parameters ``p = (cy, cx, R, s, a, b0, by, bx)``. Every Gauss-Newton
iteration builds the 8x8 normal equations of all the holes still moving as
one batch and solves them together: no Python loop over holes. A hole leaves
the batch once its step is below the tolerance.

The inputs are trusted (see :func:`ccdgrid.centres.fit_hole_profiles`):
``p0`` is ``(N, 8)`` float64, ``data`` and ``weight`` ``(N, P)`` float64
with finite values and ``weight >= 0``, ``yy`` and ``xx`` ``(P,)`` float64.
"""

import numpy as np
from scipy.special import erfc

__all__ = [
    "clip_weights",
    "edge_variances",
    "gauss_newton",
    "gaussian_tail",
    "model",
    "sector_asymmetry",
    "warm_first_pass",
    "warm_weighted_pass",
]

_SQRT2 = np.sqrt(2.0)
_INV_SQRT2PI = 1.0 / np.sqrt(2.0 * np.pi)
_NPAR = 8  # cy, cx, R, s, a, b0, by, bx


def gaussian_tail(u):
    """``erfc(u / sqrt(2)) / 2`` elementwise: the blurred edge of the model.

    Parameters
    ----------
    u : array_like, float64

    Returns
    -------
    ndarray of the shape of ``u``, float64
    """
    return 0.5 * erfc(np.asarray(u, dtype=np.float64) * (1.0 / _SQRT2))


def model(p, yy, xx, with_jacobian=True):
    """Model values and Jacobian of N holes at P pixels.

    Parameters
    ----------
    p : ndarray of shape (N, 8), float64
        ``(cy, cx, R, s, a, b0, by, bx)`` per hole.
    yy, xx : ndarray of shape (P,), float64
        Pixel offsets from the window centre, px.
    with_jacobian : bool
        Also return the Jacobian.

    Returns
    -------
    f : ndarray of shape (N, P), float64
    jac : ndarray of shape (N, 8, P), float64, or None
        Derivatives of ``f`` with respect to each parameter.
    """
    cy, cx, rad, s, a = (p[:, k, None] for k in range(5))
    dy = yy[None, :] - cy
    dx = xx[None, :] - cx
    r = np.sqrt(dy * dy + dx * dx)
    u = (r - rad) / s
    edge = 0.5 * erfc(u * (1.0 / _SQRT2))
    f = a * edge
    f += p[:, 5, None]
    f += p[:, 6, None] * yy[None, :]
    f += p[:, 7, None] * xx[None, :]
    if not with_jacobian:
        return f, None
    jac = np.empty((p.shape[0], _NPAR, yy.size))
    aphi = np.exp(-0.5 * u * u)
    aphi *= a * (_INV_SQRT2PI / s)
    np.multiply(aphi, u, out=jac[:, 3])
    np.copyto(jac[:, 2], aphi)
    aphi /= np.maximum(r, 1e-9)
    np.multiply(aphi, dy, out=jac[:, 0])
    np.multiply(aphi, dx, out=jac[:, 1])
    np.copyto(jac[:, 4], edge)
    jac[:, 5] = 1.0
    jac[:, 6] = yy[None, :]
    jac[:, 7] = xx[None, :]
    return f, jac


def _solve(a, b):
    """Solve a batch of small systems; a singular one gives a zero step."""
    good = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=1)
    out = np.zeros_like(b)
    try:
        out[good] = np.linalg.solve(a[good], b[good][..., None])[..., 0]
    except np.linalg.LinAlgError:
        for k in np.flatnonzero(good):  # rare: only when some system is singular
            try:
                out[k] = np.linalg.solve(a[k], b[k])
            except np.linalg.LinAlgError:
                out[k] = 0.0
    out[~np.isfinite(out)] = 0.0
    return out


def _clamp(p, half):
    np.clip(p[:, 0], -0.6 * half, 0.6 * half, out=p[:, 0])
    np.clip(p[:, 1], -0.6 * half, 0.6 * half, out=p[:, 1])
    np.clip(p[:, 2], 0.5, float(half), out=p[:, 2])
    np.clip(p[:, 3], 0.2, float(half), out=p[:, 3])


def gauss_newton(p0, data, weight, yy, xx, half, iterations, tol):
    """Fit the blurred-disc model to every hole by lightly damped Gauss-Newton.

    The seeds are within a pixel and the problem is well conditioned for a
    real hole, so plain steps (the geometric ones bounded to a pixel)
    converge in a few iterations; candidates that are not holes may not
    converge and are judged by the caller.

    Parameters
    ----------
    p0 : ndarray of shape (N, 8), float64
        Starting parameters ``(cy, cx, R, s, a, b0, by, bx)`` per hole,
        positions relative to the window centre, px.
    data, weight : ndarray of shape (N, P), float64
        Pixel values and least-squares weights (>= 0) per hole.
    yy, xx : ndarray of shape (P,), float64
        Pixel offsets (y, x) from the window centre, px.
    half : float
        Window radius, px: the centre stays within 0.6 ``half`` of the
        window centre, ``0.5 <= R <= half``, ``0.2 <= s <= half``.
    iterations : int
        Most Gauss-Newton iterations per hole.
    tol : float
        A hole stops once its step in cy, cx, R and s is at most ``tol`` px
        and its amplitude step at most ``tol`` times the amplitude.

    Returns
    -------
    p : ndarray of shape (N, 8), float64
    cost : ndarray of shape (N,), float64
        Weighted sum of squared residuals at ``p``.
    res : ndarray of shape (N, P), float64
        ``data - model(p)`` at every pixel.
    steps : ndarray of shape (N,), int64
        Iterations done per hole.
    """
    p = np.array(p0, dtype=np.float64, copy=True)
    steps = np.zeros(p.shape[0], dtype=np.int64)
    active = np.arange(p.shape[0])
    eye = np.eye(_NPAR)
    for _ in range(iterations):
        if active.size == 0:
            break
        sub = p[active]
        f, jac = model(sub, yy, xx)
        res = data[active] - f
        jw = jac * weight[active, None, :]
        normal = jw @ jac.transpose(0, 2, 1)
        grad = (jw @ res[..., None])[..., 0]
        diag = np.einsum("nii->ni", normal)
        damped = normal + (1e-3 * diag + 1e-12)[:, :, None] * eye
        step = _solve(damped, grad)
        np.clip(step[:, :4], -1.0, 1.0, out=step[:, :4])
        sub += step
        _clamp(sub, half)
        p[active] = sub
        steps[active] += 1
        done = (np.abs(step[:, :4]).max(axis=1) <= tol) & (
            np.abs(step[:, 4]) <= tol * np.abs(sub[:, 4])
        )
        active = active[~done]
    f, _ = model(p, yy, xx, with_jacobian=False)
    res = data - f
    cost = np.einsum("np,np->n", weight * res, res)
    return p, cost, res, steps


def sector_asymmetry(p, res, weight, yy, xx, half):
    """One-sidedness of the residuals over 8 angular sectors around each hole.

    Returns ``(disc, ring)``: the largest |mean residual| of a sector of the
    disc in units of the amplitude, and the largest |sum of normalised
    residuals| / sqrt(count) of a sector of the background ring, in units of
    the noise. A hole cut by the taper edge misses light on one side: its
    disc residuals are one-sided, or its background is darker on one side --
    a step far below the amplitude but many times the noise of a sector.

    Parameters
    ----------
    p : ndarray of shape (N, 8), float64
        Fitted parameters ``(cy, cx, R, s, a, b0, by, bx)``.
    res : ndarray of shape (N, P), float64
        Residuals ``data - model(p)``.
    weight : ndarray of shape (N, P), float64
        Fit weights (1 / variance); pixels of weight 0 are ignored.
    yy, xx : ndarray of shape (P,), float64
        Pixel offsets from the window centre, px.
    half : float
        Outer radius of the ring, px.

    Returns
    -------
    disc, ring : ndarray of shape (N,), float64

    Notes
    -----
    Sector ``k`` holds the angles ``atan2(dy, dx)`` in
    ``[-pi + k pi / 4, -pi + (k + 1) pi / 4)`` around the fitted centre.
    """
    dy = yy[None] - p[:, :1]
    dx = xx[None] - p[:, 1:2]
    r = np.hypot(dy, dx)
    sector = ((np.arctan2(dy, dx) + np.pi) * (4.0 / np.pi)).astype(np.int64) % 8
    n = res.shape[0]
    flat = np.arange(n)[:, None] * 8 + sector
    keep = weight > 0
    rad, blur = p[:, 2:3], p[:, 3:4]
    zone = keep & (r <= rad + 1.5 * blur)
    sums = np.bincount(flat[zone], weights=res[zone], minlength=8 * n).reshape(n, 8)
    counts = np.bincount(flat[zone], minlength=8 * n).reshape(n, 8)
    disc = np.abs(sums / np.maximum(counts, 1)).max(1) / np.maximum(np.abs(p[:, 4]), 1e-12)
    zone = keep & (r > rad + 2.5 * blur) & (r <= half)
    z = res * np.sqrt(weight)
    sums = np.bincount(flat[zone], weights=z[zone], minlength=8 * n).reshape(n, 8)
    counts = np.bincount(flat[zone], minlength=8 * n).reshape(n, 8)
    ring = np.abs(sums / np.sqrt(np.maximum(counts, 1))).max(1)
    return disc, ring


def _edge(p, yy, xx):
    """The edge profile ``E = Q((r - R) / s)`` of every hole at every pixel, (N, P)."""
    r = np.hypot(yy[None] - p[:, :1], xx[None] - p[:, 1:2])
    return gaussian_tail((r - p[:, 2:3]) / p[:, 3:4])


def _masked_median(values, sel):
    """Per-row median of ``values`` over ``sel`` (0 where nothing is selected)."""
    masked = np.where(sel, values, np.nan)
    out = np.zeros(values.shape[0])
    some = sel.any(axis=1)
    if some.any():
        out[some] = np.nanmedian(masked[some], axis=1)
    return out


def _robust_var(res, sel):
    """Per-row ``(1.4826 median |res|)**2`` over selected pixels (NaN below 5)."""
    vals = np.where(sel, np.abs(res), np.inf)
    vals.sort(axis=1)
    count = sel.sum(1)
    rows = np.arange(res.shape[0])
    lo = vals[rows, np.maximum((count - 1) // 2, 0)]
    hi = vals[rows, np.maximum(count // 2, 0)]
    with np.errstate(invalid="ignore"):
        mad = np.where(count >= 5, 0.5 * (lo + hi), np.nan)
    return (1.4826 * mad) ** 2


def edge_variances(p, res, ok, yy, xx):
    """Noise variance of the background and of the disc's top per hole, from residuals.

    Parameters
    ----------
    p : ndarray of shape (N, 8), float64
        Fitted parameters ``(cy, cx, R, s, a, b0, by, bx)``.
    res : ndarray of shape (N, P), float64
        Residuals ``data - model``.
    ok : ndarray of shape (N, P), bool
        Usable pixels.
    yy, xx : ndarray of shape (P,), float64
        Pixel offsets from the window centre, px.

    Returns
    -------
    var_bg, var_in : ndarray of shape (N,), float64
        ``(1.4826 median |res|)**2`` over the usable pixels where the model's
        edge profile ``E = Q((r - R) / s)`` is below 0.02 (background) and
        above 0.9 (the disc's top); NaN where fewer than 5 pixels qualify.
    """
    edge = _edge(p, yy, xx)
    return _robust_var(res, (edge < 0.02) & ok), _robust_var(res, (edge > 0.9) & ok)


def clip_weights(p, res, ok, yy, xx, var_bg, slope, exponent, nsigma):
    """Noise model per pixel, outlier clip and least-squares weights.

    Parameters
    ----------
    p : ndarray of shape (N, 8), float64
    res : ndarray of shape (N, P), float64
        Residuals ``data - model`` of the model the pixels are judged against.
    ok : ndarray of shape (N, P), bool
    yy, xx : ndarray of shape (P,), float64
    var_bg : ndarray of shape (N,), float64
        Background variance per hole.
    slope, exponent : float
        Signal term of the variance: ``slope (a E)**exponent``.
    nsigma : float
        Pixels with ``|res| > nsigma sqrt(variance)`` are dropped.

    Returns
    -------
    variance : ndarray of shape (N, P), float64
        ``var_bg + slope max(a E, 0)**exponent``, ``E`` the edge profile of ``p``.
    keep : ndarray of shape (N, P), bool
        ``ok & (res**2 <= nsigma**2 variance)``.
    weight : ndarray of shape (N, P), float64
        ``keep / variance``.
    """
    edge = _edge(p, yy, xx)
    variance = var_bg[:, None] + slope * np.maximum(p[:, 4:5] * edge, 0.0) ** exponent
    keep = ok & (res * res <= nsigma * nsigma * variance)
    with np.errstate(divide="ignore"):
        return variance, keep, np.where(keep, 1.0 / variance, 0.0)


def warm_first_pass(
    p0, data, ok, yy, xx, outer, inner, half, start_levels, spike, iterations, tol
):
    """First pass of a warm fit: unweighted iterations on the raw pixels, then noise statistics.

    Parameters
    ----------
    p0 : ndarray of shape (N, 8), float64
        Start ``(cy, cx, R, s, a, b0, by, bx)`` per hole.
    data : ndarray of shape (N, P), float64
        Raw pixel values.
    ok : ndarray of shape (N, P), bool
        Usable pixels.
    yy, xx : ndarray of shape (P,), float64
        Pixel offsets from the window centre, px.
    outer, inner : ndarray of shape (P,), bool
        Pixels of the background ring and of the disc's centre.
    half : float
        Window radius, px (bounds of the parameters, see :func:`gauss_newton`).
    start_levels : bool
        Start ``b0`` at the median of the usable ``outer`` pixels and ``a``
        at the median of the usable ``inner`` ones minus ``b0`` (at least
        1e-6); otherwise ``p0``'s.
    spike : float
        Usable pixels further than ``spike`` times the start amplitude from
        the start model (hot or dead pixels) are left out of the iterations.
    iterations : int
        Most Gauss-Newton iterations, every other usable pixel of weight 1.
    tol : float
        Convergence tolerance (see :func:`gauss_newton`).

    Returns
    -------
    p : ndarray of shape (N, 8), float64
    var_bg, var_in : ndarray of shape (N,), float64
        :func:`edge_variances` of the residuals at ``p`` (every usable pixel).
    """
    p = np.array(p0, dtype=np.float64, copy=True)
    if start_levels and p.shape[0]:
        p[:, 5] = _masked_median(data, ok & outer[None])
        p[:, 4] = np.maximum(_masked_median(data, ok & inner[None]) - p[:, 5], 1e-6)
    start = data - model(p, yy, xx, with_jacobian=False)[0]
    weight = (ok & (np.abs(start) <= spike * np.abs(p[:, 4:5]))).astype(np.float64)
    p, _, res, _ = gauss_newton(p, data, weight, yy, xx, half, iterations, tol)
    var_bg, var_in = edge_variances(p, res, ok, yy, xx)
    return p, var_bg, var_in


def warm_weighted_pass(
    p1, data, ok, yy, xx, half, var_bg, slope, exponent, nsigma, iterations, tol
):
    """Weighted pass of a warm fit: noise model, clip, fit, clip again, sector asymmetry.

    The pixels are judged against the model ``p1`` with the variance
    ``var_bg + slope max(a E, 0)**exponent`` (see :func:`clip_weights`),
    fitted with weights 1 / variance, judged again against the new model, and
    the holes whose kept pixels changed are fitted again from there.

    Parameters
    ----------
    p1 : ndarray of shape (N, 8), float64
        Parameters of the first pass.
    data : ndarray of shape (N, P), float64
    ok : ndarray of shape (N, P), bool
    yy, xx : ndarray of shape (P,), float64
    half : float
        Window radius, px.
    var_bg : ndarray of shape (N,), float64
        Background variance per hole (> 0).
    slope, exponent : float
        Signal term of the variance.
    nsigma : float
        Clip at ``nsigma`` standard deviations.
    iterations : int
        Most Gauss-Newton iterations of each weighted fit.
    tol : float
        Convergence tolerance (see :func:`gauss_newton`).

    Returns
    -------
    p : ndarray of shape (N, 8), float64
    cost : ndarray of shape (N,), float64
        Weighted sum of squared residuals at ``p``.
    kept, outliers : ndarray of shape (N,), int64
        Pixels used, and usable pixels dropped as outliers.
    disc, ring : ndarray of shape (N,), float64
        :func:`sector_asymmetry` of the final residuals and weights.
    """
    f, _ = model(p1, yy, xx, with_jacobian=False)
    variance, keep, weight = clip_weights(
        p1, data - f, ok, yy, xx, var_bg, slope, exponent, nsigma
    )
    p, cost, res, _ = gauss_newton(p1, data, weight, yy, xx, half, iterations, tol)
    keep2 = ok & (res * res <= nsigma * nsigma * variance)
    changed = (keep2 != keep).any(axis=1)
    if changed.any():
        keep[changed] = keep2[changed]
        with np.errstate(divide="ignore"):
            weight[changed] = np.where(keep2[changed], 1.0 / variance[changed], 0.0)
        sub, cost_sub, res_sub, _ = gauss_newton(
            p[changed], data[changed], weight[changed], yy, xx, half, iterations, tol
        )
        p[changed], cost[changed], res[changed] = sub, cost_sub, res_sub
    disc, ring = sector_asymmetry(p, res, weight, yy, xx, half)
    kept = keep.sum(axis=1).astype(np.int64)
    return p, cost, kept, (ok & ~keep).sum(axis=1).astype(np.int64), disc, ring
