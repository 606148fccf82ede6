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
from libc.stdint cimport int64_t, uint64_t

import numpy as np

from cython.parallel cimport prange

cdef extern from *:
    """
    /* Ask for the three rows of the 3x3 window at (y, x), inside an h x w
       image. A macro, not a function: GCC deems a function that only
       prefetches free of effects and deletes the calls. */
    #if defined(__GNUC__)
    #define ccdgrid_prefetch_window(base, h, w, y, x)                              \
        do {                                                                    \
            const float *ccdgrid_p_ = (base) + (y) * (w) + (x);                 \
            __builtin_prefetch((y) > 0 ? ccdgrid_p_ - (w) : ccdgrid_p_, 0, 3);  \
            __builtin_prefetch(ccdgrid_p_, 0, 3);                               \
            __builtin_prefetch((y) + 1 < (h) ? ccdgrid_p_ + (w) : ccdgrid_p_, 0, 3); \
        } while (0)
    #else
    #define ccdgrid_prefetch_window(base, h, w, y, x) ((void)0)
    #endif

    /* 1 if no pixel of the 3x3 window centred on *p is strictly greater than
       *p (NaN never is). Each row is read as four floats, the fourth one
       past the window: the caller makes sure that p[w + 2] is inside the
       image. Three vector comparisons instead of eight scalar ones. */
    #ifndef __has_builtin
    #define __has_builtin(x) 0
    #endif
    #if defined(__GNUC__) && __has_builtin(__builtin_shufflevector)
    #include <string.h>
    typedef float ccdgrid_v4f __attribute__((vector_size(16)));
    static inline int ccdgrid_centre_is_highest(const float *p, Py_ssize_t w)
    {
        ccdgrid_v4f r0, r1, r2;
        const ccdgrid_v4f c = {p[0], p[0], p[0], p[0]};
        memcpy(&r0, p - w - 1, sizeof r0);
        memcpy(&r1, p - 1, sizeof r1);
        memcpy(&r2, p + w - 1, sizeof r2);
        __typeof__(r0 > c) m = (r0 > c) | (r1 > c) | (r2 > c);
        return !(m[0] | m[1] | m[2]);
    }
    #else
    static inline int ccdgrid_centre_is_highest(const float *p, Py_ssize_t w)
    {
        const float c = p[0];
        return !((p[-w - 1] > c) | (p[-w] > c) | (p[-w + 1] > c) | (p[-1] > c)
                 | (p[1] > c) | (p[w - 1] > c) | (p[w] > c) | (p[w + 1] > c));
    }
    #endif
    """
    void ccdgrid_prefetch_window(
        const float* base, Py_ssize_t h, Py_ssize_t w, Py_ssize_t y, Py_ssize_t x
    ) noexcept nogil
    bint ccdgrid_centre_is_highest(const float* p, Py_ssize_t w) noexcept nogil

ctypedef fused seed_t:
    int64_t
    double

# Threads only for very large batches. A parallel loop waits for its slowest
# thread: on a busy 2-core machine a descheduled thread made 10,000 seeds take
# 20 ms instead of 0.5 ms serially; pipelines refine a few thousand at most.
cdef Py_ssize_t _PARALLEL_MIN = 1 << 20

# Seeds scattered over a large image miss the caches: the window of the
# seed this many places ahead is requested while the current one is worked on.
cdef enum:
    _AHEAD = 8

__all__ = ["climb", "climb_one", "refine_one", "refine_peaks", "seed_pixels"]


cdef Py_ssize_t _first_outside(
    const seed_t[::1] yx, Py_ssize_t h, Py_ssize_t w
) noexcept nogil:
    """Index of the first seed ``(yx[2k], yx[2k+1])`` outside ``[0, h) x [0, w)``, or -1.

    Float seeds are rounded half to even by adding and removing 1.5 * 2**52,
    as rint does for |v| < 2**51 (rint is a libm call on baseline x86-64);
    larger values, inf and NaN stay outside the image, which is all that
    matters here. The first loop has no branch, so that the compiler can
    vectorise it; the second, which finds the culprit, runs only on error.
    """
    cdef Py_ssize_t k
    cdef Py_ssize_t n = yx.shape[0] // 2
    cdef double magic = 6755399441055744.0
    cdef double fh = <double>h
    cdef double fw = <double>w
    cdef double fy, fx
    cdef bint ok = True
    for k in range(n):
        if seed_t is int64_t:
            # A negative value is a huge unsigned one: one comparison per axis.
            ok &= (<uint64_t>yx[2 * k] < <uint64_t>h) & (<uint64_t>yx[2 * k + 1] < <uint64_t>w)
        else:
            fy = (yx[2 * k] + magic) - magic
            fx = (yx[2 * k + 1] + magic) - magic
            # Comparisons with NaN are false: NaN seeds are outside.
            ok &= (fy >= 0) & (fy < fh) & (fx >= 0) & (fx < fw)
    if ok:
        return -1
    for k in range(n):
        if seed_t is int64_t:
            if not (0 <= yx[2 * k] < h and 0 <= yx[2 * k + 1] < w):
                return k
        else:
            fy = (yx[2 * k] + magic) - magic
            fx = (yx[2 * k + 1] + magic) - magic
            if not (fy >= 0 and fy < fh and fx >= 0 and fx < fw):
                return k
    return -1


def seed_pixels(seeds, Py_ssize_t h, Py_ssize_t w):
    """Integer pixels of ``(N, 2)`` seeds ``(y, x)``, and the first seed outside the image.

    Parameters
    ----------
    seeds : ndarray of shape (N, 2), int64 or float64, C-contiguous
        Float seeds are rounded half to even (``rint``).
    h, w : int
        Image shape.

    Returns
    -------
    pixels : ndarray of shape (N, 2), int64, or None
        The seeds themselves when they are int64 (no copy); None when a float
        seed is outside.
    bad : int
        Index of the first seed outside ``[0, h) x [0, w)`` after rounding,
        or -1 when all are inside.
    """
    # Dispatched by hand: Cython's run-time dispatch of a fused def function
    # costs more than the loop for 10,000 seeds.
    cdef const int64_t[::1] as_int
    cdef const double[::1] as_float
    cdef int64_t[::1] pix
    cdef Py_ssize_t bad
    cdef Py_ssize_t k
    if seeds.dtype == np.int64:
        as_int = seeds.reshape(-1)
        with nogil:
            bad = _first_outside(as_int, h, w)
        return seeds, bad
    as_float = seeds.reshape(-1)
    with nogil:
        bad = _first_outside(as_float, h, w)
    if bad >= 0:
        return None, bad
    out = np.empty(seeds.shape, dtype=np.int64)
    flat = out.reshape(-1)
    pix = flat
    with nogil:
        for k in range(as_float.shape[0]):
            # All inside the image: exact, and the same rounding as above.
            pix[k] = <int64_t>((as_float[k] + 6755399441055744.0) - 6755399441055744.0)
    return out, bad


cdef inline void _load_window(const float* p, Py_ssize_t w, float* a) noexcept nogil:
    """The 3x3 window centred on ``*p`` (an interior pixel) into ``a[0..8]``, raster order."""
    a[0] = p[-w - 1]
    a[1] = p[-w]
    a[2] = p[-w + 1]
    a[3] = p[-1]
    a[4] = p[0]
    a[5] = p[1]
    a[6] = p[w - 1]
    a[7] = p[w]
    a[8] = p[w + 1]


cdef inline int _best_in_window(const float* a) noexcept nogil:
    """Raster index (0..8) of the pixel a step moves to, given that one is higher.

    Scans the window in raster order against a running best that starts at
    the centre and is replaced only by a strictly greater value: the first
    maximum met wins ties and NaN is never chosen. Written as select
    operations rather than branches: which neighbour wins is data-dependent,
    and mispredicted branches dominated the cost of the branchy version.
    """
    cdef float best = a[4]
    cdef int k = 4
    cdef int i
    cdef bint t
    for i in range(9):
        t = a[i] > best
        best = a[i] if t else best
        k = i if t else k
    return k


cdef inline bint _climb(
    const float* base, Py_ssize_t h, Py_ssize_t w, Py_ssize_t* py, Py_ssize_t* px, float* a
) noexcept nogil:
    """Move ``(py, px)`` uphill until no pixel of its clipped 3x3 window is greater.

    Strict ``>`` against a running best in raster order: the first maximum
    met wins ties, plateaus stop the climb, NaN is never chosen and a NaN
    start never moves. Returns True when the climb ends on an interior
    pixel, with its 3x3 window in ``a[0..8]`` unless ``a`` is NULL; False
    on the image border.
    """
    cdef Py_ssize_t cy = py[0]
    cdef Py_ssize_t cx = px[0]
    cdef Py_ssize_t ny, nx, i, j, i0, i1, j0, j1
    cdef float best, v
    cdef int k
    cdef bint interior
    cdef float b[9]
    # The last interior pixel whose window's rows can be read four floats wide.
    cdef Py_ssize_t wide_end = (h - 2) * w + (w - 3)
    cdef const float* p
    while True:
        if 0 < cy < h - 1 and 0 < cx < w - 1:
            p = base + cy * w + cx
            # Every climb ends on this test, and seeds that start on a maximum
            # (a watershed's peaks) do nothing else: it has its own fast path.
            if cy * w + cx <= wide_end:
                if ccdgrid_centre_is_highest(p, w):
                    interior = True
                    break
            else:
                _load_window(p, w, b)
                if _best_in_window(b) == 4:
                    interior = True
                    break
            _load_window(p, w, b)
            k = _best_in_window(b)
            # k // 3 and k % 3 are the row and column within the window
            cy += k // 3 - 1
            cx += k % 3 - 1
            continue
        best = base[cy * w + cx]
        ny = cy
        nx = cx
        i0 = cy - 1 if cy > 0 else 0
        i1 = cy + 2 if cy + 2 <= h else h
        j0 = cx - 1 if cx > 0 else 0
        j1 = cx + 2 if cx + 2 <= w else w
        for i in range(i0, i1):
            for j in range(j0, j1):
                v = base[i * w + j]
                if v > best:
                    best = v
                    ny = i
                    nx = j
        if ny == cy and nx == cx:
            interior = False
            break
        cy = ny
        cx = nx
    py[0] = cy
    px[0] = cx
    if interior and a != NULL:
        _load_window(base + cy * w + cx, w, a)
    return interior


cdef inline void _subpixel(
    const float* a, Py_ssize_t y, Py_ssize_t x, double* oy, double* ox
) noexcept nogil:
    """Sub-pixel position of the local maximum at interior pixel ``(y, x)``.

    ``a[0..8]`` is its 3x3 window in raster order. One Newton step from the
    second differences, kept when both offsets are within one pixel; else
    the centre of mass of the raw window if its sum is positive; else the
    pixel itself.
    """
    cdef float a00 = a[0]
    cdef float a01 = a[1]
    cdef float a02 = a[2]
    cdef float a10 = a[3]
    cdef float a11 = a[4]
    cdef float a12 = a[5]
    cdef float a20 = a[6]
    cdef float a21 = a[7]
    cdef float a22 = a[8]
    cdef float d00, d11, d01, denom, dy, dx, s, sy, sx
    cdef int i
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
    # float32 running sums in raster order, as pyFAI adds them
    s = 0
    sy = 0
    sx = 0
    for i in range(9):
        sy = sy + a[i] * <float>(y + i // 3 - 1)
        sx = sx + a[i] * <float>(x + i % 3 - 1)
        s = s + a[i]
    if s > 0:
        oy[0] = <double>(sy / s)
        ox[0] = <double>(sx / s)
    else:
        oy[0] = <double>y
        ox[0] = <double>x


cdef inline void _refine(
    const float* base, Py_ssize_t h, Py_ssize_t w, Py_ssize_t y, Py_ssize_t x,
    double* oy, double* ox
) noexcept nogil:
    """Climb from pixel ``(y, x)`` and refine the maximum; border maxima stay as they are."""
    cdef float a[9]
    if _climb(base, h, w, &y, &x, a):
        _subpixel(a, y, x, oy, ox)
    else:
        oy[0] = <double>y
        ox[0] = <double>x


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
    cdef Py_ssize_t h = image.shape[0]
    cdef Py_ssize_t w = image.shape[1]
    cdef const float* base = &image[0, 0]
    out = np.empty((n, 2), dtype=np.int64)
    cdef int64_t[:, ::1] res = out
    with nogil:
        for k in prange(n, schedule="static", use_threads_if=n >= _PARALLEL_MIN):
            if k + _AHEAD < n:
                ccdgrid_prefetch_window(base, h, w, seeds[k + _AHEAD, 0], seeds[k + _AHEAD, 1])
            y = <Py_ssize_t>seeds[k, 0]
            x = <Py_ssize_t>seeds[k, 1]
            _climb(base, h, w, &y, &x, NULL)
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
    cdef Py_ssize_t k
    cdef Py_ssize_t h = image.shape[0]
    cdef Py_ssize_t w = image.shape[1]
    cdef const float* base = &image[0, 0]
    out = np.empty((n, 2), dtype=np.float64)
    cdef double[:, ::1] res = out
    with nogil:
        for k in prange(n, schedule="static", use_threads_if=n >= _PARALLEL_MIN):
            if k + _AHEAD < n:
                ccdgrid_prefetch_window(base, h, w, seeds[k + _AHEAD, 0], seeds[k + _AHEAD, 1])
            _refine(base, h, w, <Py_ssize_t>seeds[k, 0], <Py_ssize_t>seeds[k, 1],
                    &res[k, 0], &res[k, 1])
    return out


def climb_one(const float[:, ::1] image, Py_ssize_t y, Py_ssize_t x):
    """:func:`climb` for one seed ``(y, x)`` inside the image; returns ``(y, x)`` ints.

    For per-call use (pyFAI's ``cp_local_maxi``) without building arrays.
    """
    _climb(&image[0, 0], image.shape[0], image.shape[1], &y, &x, NULL)
    return y, x


def refine_one(const float[:, ::1] image, Py_ssize_t y, Py_ssize_t x):
    """:func:`refine_peaks` for one seed ``(y, x)`` inside the image; returns ``(y, x)`` floats.

    For per-call use (pyFAI's ``local_maxi``) without building arrays.
    """
    cdef double oy, ox
    _refine(&image[0, 0], image.shape[0], image.shape[1], y, x, &oy, &ox)
    return oy, ox
