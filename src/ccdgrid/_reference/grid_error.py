"""Pure-numpy twin of ``ccdgrid._ext._grid_error``: the pixel-to-hole error of a grid.

The inputs are trusted (the façade :mod:`ccdgrid.grid_error` checks them):
``P`` is a float64 ``(6,)`` array ``(Ox, Oy, Xx, Yx, Xy, Yy)`` with a regular
``R = [[Xx, Yx], [Xy, Yy]]``, ``points`` a C-contiguous float64 ``(N, 2)``
array of ``(x, y)`` pixel positions (x first, as in the tutorial).

Vectorised: a few array operations and BLAS dot products per chunk of
points, so that the benchmark ratio against the fused kernel is an honest
one. Chunks of 8192 points keep each temporary at 64 KiB: whole-array
temporaries of 100,000 points are fresh ``mmap`` allocations (glibc maps
anything from 128 KiB up) whose page faults made this 3-4x slower, and
BLAS threads dot products of that length, which on a busy machine cost
tens of milliseconds.
"""

import numpy as np

__all__ = ["grid_error"]

_CHUNK = 8192


def grid_error(P, points, residuals=False):
    """Sum of squared distances, in hole units, from each point to its nearest hole.

    Parameters
    ----------
    P : ndarray of shape (6,), float64
        ``(Ox, Oy, Xx, Yx, Xy, Yy)``; ``pixel_xy = R @ hole_xy + (Ox, Oy)``.
    points : ndarray of shape (N, 2), float64, C-contiguous
        Measured positions, **(x, y)** in pixels.
    residuals : bool
        Also return the per-point fractional vectors.

    Returns
    -------
    value : float
        ``sum_k |frac(R^-1 (p_k - T))|^2`` with ``frac(u) = u - rint(u)``.
    gradient : ndarray of shape (6,), float64
        ``d value / d P``.
    residuals : ndarray of shape (N, 2), float64
        Only if ``residuals``: ``frac(R^-1 (p_k - T))`` as (x, y) hole units.
    """
    ox, oy, xx, yx, xy, yy = (float(v) for v in P)
    det = xx * yy - yx * xy
    # R^-1 = adj(R) / det, applied with the same products and sums as the
    # kernel, so that rint() sees bit-identical arguments in both engines.
    i00, i01, i10, i11 = yy / det, -yx / det, -xy / det, xx / det
    n = len(points)
    res = np.empty((n, 2)) if residuals else None
    # value, g0, g1, m00, m01, m10, m11
    sums = np.zeros(7)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        q0 = points[start:stop, 0] - ox
        q1 = points[start:stop, 1] - oy
        u0 = i00 * q0 + i01 * q1
        u1 = i10 * q0 + i11 * q1
        with np.errstate(invalid="ignore"):  # non-finite points give NaN, as in the kernel
            r0 = u0 - np.rint(u0)
            r1 = u1 - np.rint(u1)
        # One contiguous column at a time: numpy's axis-0 reductions of an
        # (N, 2) array are an order of magnitude slower than dot products.
        sums += (r0 @ r0 + r1 @ r1, r0.sum(), r1.sum(), r0 @ u0, r0 @ u1, r1 @ u0, r1 @ u1)
        if residuals:
            res[start:stop, 0] = r0
            res[start:stop, 1] = r1
    value = float(sums[0])
    g = sums[1:3]
    m = sums[3:].reshape(2, 2)
    # d u / d T = -R^-1 and d u / d R = -R^-1 (dR) u, hence
    # d value / d T = -2 R^-T sum_k r_k and d value / d R = -2 R^-T sum_k r_k u_k^T.
    inv_t = np.array([[i00, i10], [i01, i11]])
    g_t = -2.0 * inv_t @ g
    g_r = -2.0 * inv_t @ m
    gradient = np.array([g_t[0], g_t[1], g_r[0, 0], g_r[0, 1], g_r[1, 0], g_r[1, 1]])
    if residuals:
        return value, gradient, res
    return value, gradient
