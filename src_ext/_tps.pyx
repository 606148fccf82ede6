"""Compiled twin of :mod:`ccdgrid._reference.tps`: thin-plate spline kernel sums.

The thin-plate kernel of order 2, ``phi(r) = r² log r = r² log(r²) / 2``,
or of order 3, ``phi(r) = -r⁴ log r = -r⁴ log(r²) / 2`` (the 2-D polyharmonic
spline of least squared third derivatives; the minus sign makes it
conditionally positive definite, as ``r² log r`` is, so that the same
solvers serve both), is evaluated
from ``r²`` (no square root) with a logarithm written for this loop: libm's
``log`` is a function call the compiler cannot vectorise, and without
``-ffast-math`` it would not reorder the sums either. Here the sums over the
centres run in eight fixed lanes (a fixed order of additions, whatever the
instruction set) and the logarithm is branch-free, so gcc vectorises the
whole term (2.8x faster than libm's ``log`` on one AVX2 core). The x86-64-v3
copy (AVX2 with FMA) fuses multiply-adds, which the project's C11 mode
forbids elsewhere: 1.8 instead of 2.4 ns a term on one core (the coarse
grid of a 4096² calibration: 20 instead of 26.5 ms of CPU). The x86-64-v4
copy (AVX-512: Zen 4/5, recent Xeons) does eight terms per instruction:
0.57 instead of 1.11 ns a term on one Zen 5 core (1504 centres, 7396
points). Their values differ from the baseline copy's by rounding only
(4e-10 at most on sums of order one, measured).

The logarithm: ``x = 2^k m`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` read
from the bits, ``log(m) = 2 atanh(s)``, ``s = (m - 1) / (m + 1)``, by the
classic minimax polynomial in ``s²`` (the coefficients of the fdlibm/Sun
``__ieee754_log``, public domain numbers), ``k log 2`` in two parts. Valid
for positive normal ``x``; the callers add ``1e-300`` to ``r²`` so that
``r = 0`` gives ``phi = 0`` instead of ``0 * -inf``. Measured against libm
on ``x`` from 1e-304 to 1e304: relative error below 2.3e-16.

Preconditions (guaranteed by :mod:`ccdgrid.thinplate` and :mod:`ccdgrid.gcv`,
trusted here): every array C-contiguous float64 with finite values;
``points`` and ``out`` ``(M, 2)``; ``centres`` and ``coef`` ``(N, 2)``;
``trend`` ``(P, 2)`` with ``P = (d + 1)(d + 2) / 2`` for a degree
``0 <= d <= 5``; ``shift`` ``(2,)``; ``scale > 0``; ``kernel``'s ``out``
``(N, N)``; ``order`` 2 or 3 (any other value is taken as 2).
"""

import numpy as np

from cython.parallel cimport prange

__all__ = ["evaluate", "kernel_matrix"]

# A parallel loop waits for its slowest thread and, on a busy machine, a
# descheduled thread costs milliseconds: threads only for ~5 ms of work or
# more (one kernel term costs ~2 ns on one AVX2 core).
cdef Py_ssize_t _PARALLEL_MIN_TERMS = 2_000_000
cdef Py_ssize_t _CHUNK_POINTS = 64  # points per task of the parallel loop

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    /* fp-contract=fast: fused multiply-adds in the x86-64-v3 and v4 copies
       (C11 mode turns contraction off) */
    #define CCDGRID_TPS_CLONES \
        __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), \
                       optimize("fp-contract=fast")))
    #else
    #define CCDGRID_TPS_CLONES
    #endif
    #define CCDGRID_TPS_LANES 8

    /* log(x) for positive normal x, branch-free (vectorisable). */
    static inline double ccdgrid_log(double x)
    {
        const double ln2_hi = 6.93147180369123816490e-01;
        const double ln2_lo = 1.90821492927058770002e-10;
        const double lg1 = 6.666666666666735130e-01, lg2 = 3.999999999940941908e-01;
        const double lg3 = 2.857142874366239149e-01, lg4 = 2.222219843214978396e-01;
        const double lg5 = 1.818357216161805012e-01, lg6 = 1.531383769920937332e-01;
        const double lg7 = 1.479819860511658591e-01;
        const uint64_t sqrt_half = 0x3fe6a09e667f3bcdULL;  /* bits of sqrt(1/2) */
        uint64_t bits, mbits, ebits;
        double m, e;
        memcpy(&bits, &x, 8);
        /* shifted so that the exponent field counts from sqrt(1/2), not 1 */
        bits += 0x3ff0000000000000ULL - sqrt_half;
        mbits = (bits & 0x000fffffffffffffULL) + sqrt_half;
        memcpy(&m, &mbits, 8);
        /* the exponent as a double without an int64 conversion (none in AVX2):
           2^52 + field, minus 2^52 + 1023 */
        ebits = (bits >> 52) | 0x4330000000000000ULL;
        memcpy(&e, &ebits, 8);
        double k = e - 4503599627371519.0;
        double f = m - 1.0;
        double s = f / (2.0 + f);
        double z = s * s, w = z * z;
        double r = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7))) + w * (lg2 + w * (lg4 + w * lg6));
        double hfsq = 0.5 * f * f;
        return k * ln2_hi - ((hfsq - (s * (hfsq + r) + k * ln2_lo)) - f);
    }

    /* The sums and the kernel rows for one kernel order, from a macro: the
       order is fixed in each copy's loops (a test inside them would keep gcc
       from vectorising, or double the work of order 2). TIMES is the factor
       of r² log r² that makes phi: 1 for r² log r (order 2), -r2 for -r⁴ log r
       (order 3); the 0.5 is applied once per sum. */
    #define CCDGRID_TPS_KERNELS(ORDER, TIMES) \
    /* sum_k coef[k] phi(|p - c_k|) for points p0..p1-1, two components. */ \
    CCDGRID_TPS_CLONES \
    static void ccdgrid_tps_sums##ORDER(const double *restrict points, Py_ssize_t p0, \
                                        Py_ssize_t p1, const double *restrict cy, \
                                        const double *restrict cx, \
                                        const double *restrict c0, \
                                        const double *restrict c1, Py_ssize_t n, \
                                        double *restrict out) \
    { \
        for (Py_ssize_t i = p0; i < p1; i++) { \
            const double y = points[2 * i], x = points[2 * i + 1]; \
            double a0[CCDGRID_TPS_LANES] = {0.0}, a1[CCDGRID_TPS_LANES] = {0.0}; \
            Py_ssize_t k = 0; \
            for (; k + CCDGRID_TPS_LANES <= n; k += CCDGRID_TPS_LANES) { \
                for (int l = 0; l < CCDGRID_TPS_LANES; l++) { \
                    double dy = y - cy[k + l], dx = x - cx[k + l]; \
                    double r2 = dy * dy + dx * dx + 1e-300; \
                    double phi = (TIMES) * r2 * ccdgrid_log(r2); \
                    a0[l] += c0[k + l] * phi; \
                    a1[l] += c1[k + l] * phi; \
                } \
            } \
            for (; k < n; k++) { \
                double dy = y - cy[k], dx = x - cx[k]; \
                double r2 = dy * dy + dx * dx + 1e-300; \
                double phi = (TIMES) * r2 * ccdgrid_log(r2); \
                a0[0] += c0[k] * phi; \
                a1[0] += c1[k] * phi; \
            } \
            for (int w = CCDGRID_TPS_LANES / 2; w > 0; w /= 2) { \
                for (int l = 0; l < w; l++) { \
                    a0[l] += a0[l + w]; \
                    a1[l] += a1[l + w]; \
                } \
            } \
            out[2 * i] = 0.5 * a0[0]; \
            out[2 * i + 1] = 0.5 * a1[0]; \
        } \
    } \
    /* Row i of the kernel matrix from column i on: phi(|c_i - c_j|), j >= i. */ \
    CCDGRID_TPS_CLONES \
    static void ccdgrid_tps_row##ORDER(const double *restrict cy, \
                                       const double *restrict cx, Py_ssize_t i, \
                                       Py_ssize_t n, double *restrict row) \
    { \
        const double y = cy[i], x = cx[i]; \
        for (Py_ssize_t j = i; j < n; j++) { \
            double dy = y - cy[j], dx = x - cx[j]; \
            double r2 = dy * dy + dx * dx + 1e-300; \
            row[j] = 0.5 * (TIMES) * r2 * ccdgrid_log(r2); \
        } \
    }

    CCDGRID_TPS_KERNELS(2, 1.0)
    CCDGRID_TPS_KERNELS(3, -r2)
    """
    void _sums2 "ccdgrid_tps_sums2" (
        const double* points, Py_ssize_t p0, Py_ssize_t p1, const double* cy,
        const double* cx, const double* c0, const double* c1, Py_ssize_t n, double* out
    ) noexcept nogil
    void _sums3 "ccdgrid_tps_sums3" (
        const double* points, Py_ssize_t p0, Py_ssize_t p1, const double* cy,
        const double* cx, const double* c0, const double* c1, Py_ssize_t n, double* out
    ) noexcept nogil
    void _row2 "ccdgrid_tps_row2" (
        const double* cy, const double* cx, Py_ssize_t i, Py_ssize_t n, double* row
    ) noexcept nogil
    void _row3 "ccdgrid_tps_row3" (
        const double* cy, const double* cx, Py_ssize_t i, Py_ssize_t n, double* row
    ) noexcept nogil


cdef inline void _trend(
    const double* point,
    const double* trend,
    int degree,
    double sy,
    double sx,
    double inv_scale,
    double* out,
) noexcept nogil:
    """Add ``sum_t trend[t] u_y^a u_x^(t-a)`` (monomials by total degree) to ``out``."""
    cdef double uy = (point[0] - sy) * inv_scale
    cdef double ux = (point[1] - sx) * inv_scale
    cdef double py[6]
    cdef double px[6]
    cdef int t, a, col = 0
    cdef double term, v0 = 0.0, v1 = 0.0
    py[0] = 1.0
    px[0] = 1.0
    for t in range(1, degree + 1):
        py[t] = py[t - 1] * uy
        px[t] = px[t - 1] * ux
    for t in range(degree + 1):
        for a in range(t + 1):
            term = py[a] * px[t - a]
            v0 = v0 + trend[2 * col] * term
            v1 = v1 + trend[2 * col + 1] * term
            col = col + 1
    out[0] = out[0] + v0
    out[1] = out[1] + v1


def evaluate(
    const double[:, ::1] points,
    const double[:, ::1] centres,
    const double[:, ::1] coef,
    const double[:, ::1] trend,
    const double[::1] shift,
    double scale,
    double[:, ::1] out,
    int order=2,
):
    """Thin-plate spline values at points, into ``out``.

    Parameters
    ----------
    points : ndarray of shape (M, 2), float64
        Evaluation points, in the fit's length unit.
    centres : ndarray of shape (N, 2), float64
        Spline centres, same unit.
    coef : ndarray of shape (N, 2), float64
        Kernel weights of the two components.
    trend : ndarray of shape (P, 2), float64
        Coefficients of the monomials ``u_y^a u_x^(t - a)``, ``t = 0..d``,
        ``a = 0..t`` in that order, ``P = (d + 1)(d + 2) / 2``, ``d <= 5``.
    shift : ndarray of shape (2,), float64
        The monomials are of ``u = (point - shift) / scale``.
    scale : float
        See ``shift``, > 0.
    out : ndarray of shape (M, 2), float64
        ``out[i] = sum_k coef[k] phi(|p_i - c_k|) + trend part``, with
        ``phi(r) = r² log r`` (order 2) or ``-r⁴ log r`` (order 3).
    order : int
        Order of the thin-plate kernel, 2 or 3.
    """
    cdef bint third = order == 3
    cdef Py_ssize_t m = points.shape[0]
    cdef Py_ssize_t n = centres.shape[0]
    cdef Py_ssize_t nchunks = (m + _CHUNK_POINTS - 1) // _CHUNK_POINTS
    cdef int degree = 0
    while (degree + 1) * (degree + 2) // 2 < trend.shape[0]:
        degree += 1
    cdef double inv_scale = 1.0 / scale
    cdef double sy = shift[0], sx = shift[1]
    cdef bint threads = m * n >= _PARALLEL_MIN_TERMS
    cdef Py_ssize_t b, i, i0, i1
    if m == 0:
        return
    # the centres' coordinates and weights as separate rows: unit-stride loads
    cols = np.ascontiguousarray(np.concatenate([np.asarray(centres).T, np.asarray(coef).T]))
    cdef const double[:, ::1] cc = cols
    with nogil:
        for b in prange(nchunks, schedule="dynamic", use_threads_if=threads):
            i0 = b * _CHUNK_POINTS
            i1 = i0 + _CHUNK_POINTS if i0 + _CHUNK_POINTS < m else m
            if n > 0 and third:
                _sums3(&points[0, 0], i0, i1, &cc[0, 0], &cc[1, 0], &cc[2, 0], &cc[3, 0], n,
                       &out[0, 0])
            elif n > 0:
                _sums2(&points[0, 0], i0, i1, &cc[0, 0], &cc[1, 0], &cc[2, 0], &cc[3, 0], n,
                       &out[0, 0])
            else:
                for i in range(i0, i1):
                    out[i, 0] = 0.0
                    out[i, 1] = 0.0
            for i in range(i0, i1):
                _trend(&points[i, 0], &trend[0, 0], degree, sy, sx, inv_scale, &out[i, 0])


def kernel_matrix(
    const double[:, ::1] centres, double smoothing, double[:, ::1] out, int order=2
):
    """Thin-plate kernel matrix plus smoothing on its diagonal, into ``out``.

    Parameters
    ----------
    centres : ndarray of shape (N, 2), float64
        Spline centres.
    smoothing : float
        Added to the diagonal.
    out : ndarray of shape (N, N), float64
        ``out[i, j] = phi(|c_i - c_j|) + smoothing [i == j]``, symmetric,
        ``phi(r) = r² log r`` (order 2) or ``-r⁴ log r`` (order 3), 0 at r = 0.
    order : int
        Order of the thin-plate kernel, 2 or 3.
    """
    cdef bint third = order == 3
    cdef Py_ssize_t n = centres.shape[0]
    cdef Py_ssize_t i, j
    cdef bint threads = n * n // 2 >= _PARALLEL_MIN_TERMS
    if n == 0:
        return
    cols = np.ascontiguousarray(np.asarray(centres).T)
    cdef const double[:, ::1] cc = cols
    with nogil:
        # each row from the diagonal on; the rows shorten, so hand them out
        # dynamically
        for i in prange(n, schedule="dynamic", chunksize=16, use_threads_if=threads):
            if third:
                _row3(&cc[0, 0], &cc[1, 0], i, n, &out[i, 0])
            else:
                _row2(&cc[0, 0], &cc[1, 0], i, n, &out[i, 0])
        # mirror the upper triangle (a second pass: rows written by other threads)
        for i in prange(n, schedule="static", use_threads_if=threads):
            for j in range(i):
                out[i, j] = out[j, i]
            out[i, i] = smoothing
