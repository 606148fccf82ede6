"""Pure-numpy twin of ``ccdgrid._ext._bilinear``: steepest-ascent climb and refinement.

Both functions trust their inputs (the façade :mod:`ccdgrid.bilinear` checks
them): ``image`` is a C-contiguous 2-D float32 array and ``seeds`` a
C-contiguous ``(N, 2)`` int64 array of ``(y, x)`` pixel indices inside the
image. Work is vectorised over the seeds: one climb step is a handful of array
operations over the seeds that are still moving, never a Python loop per seed.

The arithmetic follows pyFAI 2026.9 ``Bilinear.local_maxi`` operation by
operation, including where it rounds to float32, so that the results are
bit-for-bit those of the compiled kernel.
"""

import numpy as np

__all__ = ["climb", "climb_one", "refine_one", "refine_peaks"]

# The 3x3 window in raster order (top row first, left to right): the order in
# which ties are broken, the first maximum met wins.
_WINDOW = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _climb_step(image, cy, cx):
    """One ascent step for every seed: the best pixel of the clipped 3x3 window.

    Returns the new ``(cy, cx)``; a seed moves only to a pixel strictly higher
    than its centre (and than every earlier pixel of the window), so plateaus
    and NaN centres stop it, and NaN neighbours are never chosen.
    """
    h, w = image.shape
    best = image[cy, cx]
    ny, nx = cy.copy(), cx.copy()
    for dy, dx in _WINDOW:
        if dy == 0 and dx == 0:
            continue  # the centre can never be strictly greater than itself
        yy, xx = cy + dy, cx + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        v = image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        better = inside & (v > best)
        best = np.where(better, v, best)
        ny = np.where(better, yy, ny)
        nx = np.where(better, xx, nx)
    return ny, nx


def climb(image, seeds):
    """Integer steepest ascent from every seed to its local maximum.

    Parameters
    ----------
    image : ndarray of shape (H, W), float32, C-contiguous
        The image (trusted).
    seeds : ndarray of shape (N, 2), int64
        Start pixels ``(y, x)``, all inside the image (trusted).

    Returns
    -------
    ndarray of shape (N, 2), int64
        The ``(y, x)`` pixel where each climb stops: no pixel of its clipped
        3x3 window is strictly greater.
    """
    out = np.array(seeds, dtype=np.int64, copy=True).reshape(-1, 2)
    active = np.arange(len(out))
    cy, cx = out[:, 0].copy(), out[:, 1].copy()
    while active.size:
        ny, nx = _climb_step(image, cy, cx)
        moved = (ny != cy) | (nx != cx)
        out[active, 0] = ny
        out[active, 1] = nx
        active = active[moved]
        cy, cx = ny[moved], nx[moved]
    return out


def _subpixel(image, py, px):
    """Sub-pixel positions of interior maxima ``(py, px)`` (1-D int64 arrays).

    One Newton step from the 3x3 finite-difference Hessian, accepted when both
    offsets are within 1 pixel; otherwise the centre of mass of the raw 3x3
    patch; otherwise (non-positive or NaN patch sum) the pixel itself.
    """
    f32, f64 = np.float32, np.float64
    a = [[image[py + r - 1, px + c - 1] for c in range(3)] for r in range(3)]
    (a00, a01, a02), (a10, a11, a12), (a20, a21, a22) = a
    pyf, pxf = py.astype(f64), px.astype(f64)
    with np.errstate(all="ignore"):  # NaN and inf pixels propagate, as in the kernel
        # pyFAI evaluates the second differences in double (its literal 2.0)
        # and stores them as float32; everything after is float32 arithmetic.
        d00 = (a21.astype(f64) - 2.0 * a11.astype(f64) + a01.astype(f64)).astype(f32)
        d11 = (a12.astype(f64) - 2.0 * a11.astype(f64) + a10.astype(f64)).astype(f32)
        d01 = (a00 - a02 - a20 + a22) / f32(4)
        denom = f32(2) * (d00 * d11 - d01 * d01)
        dy = ((a12 - a10) * d01 + (a01 - a21) * d11) / denom
        dx = ((a10 - a12) * d00 + (a21 - a01) * d01) / denom
        newton = (np.abs(denom).astype(f64) >= 1e-10) & (np.abs(dy) <= 1) & (np.abs(dx) <= 1)

        # Centre of mass with float32 running sums in raster order, as the
        # kernel adds them (np.sum would add pairwise and round differently).
        s = np.zeros(py.shape, f32)
        sy = np.zeros(py.shape, f32)
        sx = np.zeros(py.shape, f32)
        for r in range(3):
            fy = (py + (r - 1)).astype(f32)
            for c in range(3):
                fx = (px + (c - 1)).astype(f32)
                sy = sy + a[r][c] * fy
                sx = sx + a[r][c] * fx
                s = s + a[r][c]
        com = s > 0
        safe = np.where(com, s, f32(1))
        com_y = (sy / safe).astype(f64)
        com_x = (sx / safe).astype(f64)

    y = np.where(newton, dy.astype(f64) + pyf, np.where(com, com_y, pyf))
    x = np.where(newton, dx.astype(f64) + pxf, np.where(com, com_x, pxf))
    return y, x


def refine_peaks(image, seeds, nthreads=1):
    """Climb from each seed to its local maximum and refine it to sub-pixel.

    Parameters
    ----------
    image : ndarray of shape (H, W), float32, C-contiguous
        The image (trusted).
    seeds : ndarray of shape (N, 2), int64
        Start pixels ``(y, x)``, checked here against the image.
    nthreads : int
        Ignored (the compiled twin's thread count); numpy runs as it does.

    Returns
    -------
    out : ndarray of shape (N, 2), float64
        Refined ``(y, x)`` positions in index coordinates (the centre of pixel
        ``(i, j)`` is at ``(i, j)``). Maxima on the first or last row or
        column are returned unrefined. Meaningless when ``bad >= 0``.
    bad : int
        Index of the first seed outside ``[0, H) x [0, W)``, or -1.
    """
    h, w = image.shape
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 2)
    outside = (seeds[:, 0] < 0) | (seeds[:, 0] >= h) | (seeds[:, 1] < 0) | (seeds[:, 1] >= w)
    if outside.any():
        return np.empty(seeds.shape, np.float64), int(np.argmax(outside))
    peaks = climb(image, seeds)
    out = peaks.astype(np.float64)
    py, px = peaks[:, 0], peaks[:, 1]
    interior = np.flatnonzero((py > 0) & (py < h - 1) & (px > 0) & (px < w - 1))
    if interior.size:
        y, x = _subpixel(image, py[interior], px[interior])
        out[interior, 0] = y
        out[interior, 1] = x
    return out, -1


def climb_one(image, y, x):
    """:func:`climb` for one seed ``(y, x)`` (ints inside the image); returns ``(y, x)`` ints."""
    res = climb(image, np.array([[y, x]], dtype=np.int64))
    return int(res[0, 0]), int(res[0, 1])


def refine_one(image, y, x):
    """:func:`refine_peaks` for one seed ``(y, x)`` (ints inside the image); returns floats."""
    res, _ = refine_peaks(image, np.array([[y, x]], dtype=np.int64))
    return float(res[0, 0]), float(res[0, 1])
