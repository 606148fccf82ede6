"""Compiled twin of :mod:`ccdgrid._reference.bilinear`: climb and sub-pixel refinement.

Preconditions (checked by :mod:`ccdgrid.bilinear`, trusted here; breaking them
reads out of bounds): ``image`` is a non-empty C-contiguous float32 2-D array,
``seeds`` a C-contiguous ``(N, 2)`` int64 array whose rows ``(y, x)`` satisfy
``0 <= y < H`` and ``0 <= x < W``.

The arithmetic reproduces pyFAI 2026.9 ``Bilinear.local_maxi``: the second
differences are evaluated in double and stored as float32, the Newton offsets
and the centre-of-mass sums are float32. The build compiles in ISO C mode
(``c_std=c11``), so the compiler does not fuse multiply-adds and the float32
roundings are those of the numpy twin.
"""

from libc.math cimport fabs
from libc.stdint cimport int64_t

import numpy as np

from cython.parallel cimport prange

# Threads only for very large batches. A parallel loop waits for its slowest
# thread: on a busy 2-core machine a descheduled thread made 10,000 seeds take
# 20 ms instead of 0.5 ms serially; pipelines refine a few thousand at most.
cdef Py_ssize_t _PARALLEL_MIN = 1 << 20

__all__ = ["climb", "climb_one", "refine_one", "refine_peaks"]


cdef inline int _interior_step(const float* p, Py_ssize_t w) noexcept nogil:
    """Raster index (0..8) of the best pixel of the 3x3 window centred on ``*p``.

    4 (the centre) unless a neighbour is strictly greater than the running
    best, scanned in raster order. Written as select operations rather than
    branches: which neighbour wins is data-dependent, and mispredicted
    branches dominated the cost of the branchy version.
    """
    cdef float best = p[0]
    cdef float v
    cdef int k = 4
    cdef bint t
    v = p[-w - 1]
    t = v > best
    best = v if t else best
    k = 0 if t else k
    v = p[-w]
    t = v > best
    best = v if t else best
    k = 1 if t else k
    v = p[-w + 1]
    t = v > best
    best = v if t else best
    k = 2 if t else k
    v = p[-1]
    t = v > best
    best = v if t else best
    k = 3 if t else k
    v = p[1]
    t = v > best
    best = v if t else best
    k = 5 if t else k
    v = p[w - 1]
    t = v > best
    best = v if t else best
    k = 6 if t else k
    v = p[w]
    t = v > best
    best = v if t else best
    k = 7 if t else k
    v = p[w + 1]
    t = v > best
    k = 8 if t else k
    return k


cdef inline void _climb_one(
    const float[:, ::1] image, Py_ssize_t* py, Py_ssize_t* px
) noexcept nogil:
    """Move ``(py, px)`` uphill until no pixel of its clipped 3x3 window is greater.

    Strict ``>`` against a running best in raster order: the first maximum
    met wins ties, plateaus stop the climb, NaN is never chosen and a NaN
    start never moves.
    """
    cdef Py_ssize_t h = image.shape[0]
    cdef Py_ssize_t w = image.shape[1]
    cdef Py_ssize_t cy = py[0]
    cdef Py_ssize_t cx = px[0]
    cdef Py_ssize_t ny, nx, i, j, i0, i1, j0, j1
    cdef const float* base = &image[0, 0]
    cdef float best, v
    cdef int k
    while True:
        if 0 < cy < h - 1 and 0 < cx < w - 1:
            k = _interior_step(base + cy * w + cx, w)
            if k == 4:
                break
            # k // 3 and k % 3 are the row and column within the window
            cy += k // 3 - 1
            cx += k % 3 - 1
            continue
        best = image[cy, cx]
        ny = cy
        nx = cx
        i0 = cy - 1 if cy > 0 else 0
        i1 = cy + 2 if cy + 2 <= h else h
        j0 = cx - 1 if cx > 0 else 0
        j1 = cx + 2 if cx + 2 <= w else w
        for i in range(i0, i1):
            for j in range(j0, j1):
                v = image[i, j]
                if v > best:
                    best = v
                    ny = i
                    nx = j
        if ny == cy and nx == cx:
            break
        cy = ny
        cx = nx
    py[0] = cy
    px[0] = cx


cdef inline void _subpixel(
    const float[:, ::1] image, Py_ssize_t y, Py_ssize_t x, double* oy, double* ox
) noexcept nogil:
    """Sub-pixel position of the local maximum at pixel ``(y, x)``.

    Border pixels are returned as they are. Otherwise one Newton step from the
    3x3 second differences, kept when both offsets are within one pixel; else
    the centre of mass of the raw 3x3 patch if its sum is positive; else the
    pixel itself.
    """
    cdef Py_ssize_t h = image.shape[0]
    cdef Py_ssize_t w = image.shape[1]
    cdef float a00, a01, a02, a10, a11, a12, a20, a21, a22
    cdef float d00, d11, d01, denom, dy, dx, v, s, sy, sx
    cdef Py_ssize_t i, j
    oy[0] = <double>y
    ox[0] = <double>x
    if y <= 0 or y >= h - 1 or x <= 0 or x >= w - 1:
        return
    a00 = image[y - 1, x - 1]
    a01 = image[y - 1, x]
    a02 = image[y - 1, x + 1]
    a10 = image[y, x - 1]
    a11 = image[y, x]
    a12 = image[y, x + 1]
    a20 = image[y + 1, x - 1]
    a21 = image[y + 1, x]
    a22 = image[y + 1, x + 1]
    # The literal 2.0 is a double: these two are evaluated in double and
    # rounded once to float32, as in pyFAI.
    d00 = a21 - 2.0 * a11 + a01
    d11 = a12 - 2.0 * a11 + a10
    d01 = (a00 - a02 - a20 + a22) / 4.0
    denom = 2.0 * (d00 * d11 - d01 * d01)
    if fabs(denom) >= 1e-10:
        dy = ((a12 - a10) * d01 + (a01 - a21) * d11) / denom
        dx = ((a10 - a12) * d00 + (a21 - a01) * d01) / denom
        if fabs(dy) <= 1.0 and fabs(dx) <= 1.0:
            oy[0] = <double>dy + <double>y
            ox[0] = <double>dx + <double>x
            return
    s = 0
    sy = 0
    sx = 0
    for i in range(y - 1, y + 2):
        for j in range(x - 1, x + 2):
            v = image[i, j]
            sy = sy + v * <float>i
            sx = sx + v * <float>j
            s = s + v
    if s > 0:
        oy[0] = <double>(sy / s)
        ox[0] = <double>(sx / s)


def climb(const float[:, ::1] image, const int64_t[:, ::1] seeds):
    """Integer steepest ascent from every seed; see :func:`ccdgrid.bilinear.climb`.

    Parameters
    ----------
    image : ndarray of shape (H, W), float32, C-contiguous
    seeds : ndarray of shape (N, 2), int64, C-contiguous, inside the image

    Returns
    -------
    ndarray of shape (N, 2), int64
        ``(y, x)`` of the local maximum reached from each seed.
    """
    cdef Py_ssize_t n = seeds.shape[0]
    cdef Py_ssize_t k, y, x
    out = np.empty((n, 2), dtype=np.int64)
    cdef int64_t[:, ::1] res = out
    with nogil:
        for k in prange(n, schedule="static", use_threads_if=n >= _PARALLEL_MIN):
            y = <Py_ssize_t>seeds[k, 0]
            x = <Py_ssize_t>seeds[k, 1]
            _climb_one(image, &y, &x)
            res[k, 0] = y
            res[k, 1] = x
    return out


def refine_peaks(const float[:, ::1] image, const int64_t[:, ::1] seeds):
    """Climb and refine every seed; see :func:`ccdgrid.bilinear.refine_peaks`.

    Parameters
    ----------
    image : ndarray of shape (H, W), float32, C-contiguous
    seeds : ndarray of shape (N, 2), int64, C-contiguous, inside the image

    Returns
    -------
    ndarray of shape (N, 2), float64
        Refined ``(y, x)`` in index coordinates.
    """
    cdef Py_ssize_t n = seeds.shape[0]
    cdef Py_ssize_t k, y, x
    out = np.empty((n, 2), dtype=np.float64)
    cdef double[:, ::1] res = out
    with nogil:
        for k in prange(n, schedule="static", use_threads_if=n >= _PARALLEL_MIN):
            y = <Py_ssize_t>seeds[k, 0]
            x = <Py_ssize_t>seeds[k, 1]
            _climb_one(image, &y, &x)
            _subpixel(image, y, x, &res[k, 0], &res[k, 1])
    return out


def climb_one(const float[:, ::1] image, Py_ssize_t y, Py_ssize_t x):
    """:func:`climb` for one seed ``(y, x)`` inside the image; returns ``(y, x)`` ints.

    For per-call use (pyFAI's ``cp_local_maxi``) without building arrays.
    """
    _climb_one(image, &y, &x)
    return y, x


def refine_one(const float[:, ::1] image, Py_ssize_t y, Py_ssize_t x):
    """:func:`refine_peaks` for one seed ``(y, x)`` inside the image; returns ``(y, x)`` floats.

    For per-call use (pyFAI's ``local_maxi``) without building arrays.
    """
    cdef double oy, ox
    _climb_one(image, &y, &x)
    _subpixel(image, y, x, &oy, &ox)
    return oy, ox
