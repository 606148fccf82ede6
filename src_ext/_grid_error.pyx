"""Compiled twin of :mod:`ccdgrid._reference.grid_error`: one fused pass over the points.

Preconditions (checked by :mod:`ccdgrid.hole_error`, trusted here): ``P`` is a
float64 ``(6,)`` array ``(Ox, Oy, Xx, Yx, Xy, Yy)`` with finite entries and a
non-singular ``R = [[Xx, Yx], [Xy, Yy]]``; ``points`` is a C-contiguous
float64 ``(N, 2)`` array of **(x, y)** pixel positions.

The value, the seven sums the gradient needs and, on request, the residuals
come out of a single pass with no per-point temporary. ``R^-1`` is applied with
the same products and sums as the numpy twin, and the build is ISO C (no
fused multiply-add), so both engines round to the same holes.

The pass is written on the compiler's generic vector types and chosen once
at import (:func:`simd_isa`): eight points per AVX-512F instruction, else four
per AVX2 + FMA instruction, when the CPU has them (rounding with
``vrndscalepd`` / ``vroundpd``), else two per SSE2 / NEON
instruction (rounding with a guarded magic-number addition). Cython cannot
express vector types or per-function target ISAs, hence the block of C
below; a build without GCC/Clang vector extensions runs the scalar loop
:func:`_block_exact`, which every path falls back to where its shortcut may
be wrong. Only the order in which the seven sums are added differs between
the paths (FMA also rounds each product-sum once): the residuals are the
same bits everywhere.
"""

from cython.parallel cimport prange
from libc.math cimport rint
from libc.stdlib cimport free, malloc

import numpy as np

__all__ = ["grid_error", "simd_isa"]

cdef extern from *:
    """
    #include <string.h>

    #ifndef __has_builtin
    #define __has_builtin(x) 0
    #endif
    #if defined(__GNUC__) && __has_builtin(__builtin_shufflevector)
    #define CCDGRID_GE_VECTOR 1
    #else
    #define CCDGRID_GE_VECTOR 0
    #endif
    #if CCDGRID_GE_VECTOR && defined(__x86_64__)
    #define CCDGRID_GE_AVX2 1
    #include <immintrin.h>
    #else
    #define CCDGRID_GE_AVX2 0
    #endif

    /* c[0..5] = (Ox, Oy, i00, i01, i10, i11) with R^-1 = [[i00, i01], [i10, i11]];
       sums[0..6] = value, g0, g1, m00, m01, m10, m11. Returns 0 when a
       residual of the block may be wrong (the caller then redoes the block
       exactly); always 0 without vector extensions. */
    typedef int (*ccdgrid_ge_block_fn)(const double *, Py_ssize_t, const double *,
                                       double *, double *);

    /* "Redo every block exactly": the scalar path. */
    static int ccdgrid_ge_block_none(const double *pts, Py_ssize_t n, const double *c,
                                     double *res, double *sums)
    {
        (void)pts; (void)n; (void)c; (void)res; (void)sums;
        return 0;
    }

    #if CCDGRID_GE_VECTOR
    typedef double ccdgrid_v2d __attribute__((vector_size(16)));
    typedef long long ccdgrid_v2i __attribute__((vector_size(16)));
    typedef double ccdgrid_v4d __attribute__((vector_size(32)));
    typedef long long ccdgrid_v4i __attribute__((vector_size(32)));

    /* Even / odd doubles of the concatenation a|b: the x and the y of LANES
       points (with 4 lanes in the order 0, 2, 1, 3, which the sums do not
       mind); the same shuffle of r0|r1 interleaves the residuals back. */
    #define CCDGRID_GE_EVEN2(a, b) __builtin_shufflevector(a, b, 0, 2)
    #define CCDGRID_GE_ODD2(a, b) __builtin_shufflevector(a, b, 1, 3)
    #define CCDGRID_GE_EVEN4(a, b) __builtin_shufflevector(a, b, 0, 4, 2, 6)
    #define CCDGRID_GE_ODD4(a, b) __builtin_shufflevector(a, b, 1, 5, 3, 7)

    /* frac(u) for the baseline ISA, which has no vector rounding: for
       |u| < 2**51, u + 1.5 * 2**52 lies in [2**52, 2**53), where the doubles
       are exactly the integers, so the addition rounds u half to even as
       rint does and subtracting the constant back is exact. Whether the sum
       landed there is read off its sign and exponent bits, collected in
       `off`: NaN, inf and large |u| send the block to the exact path. */
    #define CCDGRID_GE_MAGIC 6755399441055744.0
    #define CCDGRID_GE_EXP_BITS 0x4330000000000000LL
    #define CCDGRID_GE_SIGN_EXP_MASK ((long long)0xFFF0000000000000ULL)
    #define CCDGRID_GE_FRAC_MAGIC(r, u)                                                 \
        do {                                                                        \
            t = (u) + CCDGRID_GE_MAGIC;                                             \
            r = (u) - (t - CCDGRID_GE_MAGIC);                                       \
            off |= (__typeof__(off))t ^ CCDGRID_GE_EXP_BITS;                        \
        } while (0)
    #define CCDGRID_GE_MADD(acc, a, b) acc += (a) * (b)

    /* LANES points from a|b: their terms to the sums, their residuals to lo|hi. */
    #define CCDGRID_GE_STEP(EVEN, ODD, FRAC, MADD)                                      \
        x = EVEN(a, b);                                                             \
        y = ODD(a, b);                                                              \
        q0 = x - ox;                                                                \
        q1 = y - oy;                                                                \
        u0 = i00 * q0 + i01 * q1;                                                   \
        u1 = i10 * q0 + i11 * q1;                                                   \
        FRAC(r0, u0);                                                               \
        FRAC(r1, u1);                                                               \
        MADD(s_v0, r0, r0);                                                         \
        MADD(s_v1, r1, r1);                                                         \
        s_g0 += r0;                                                                 \
        s_g1 += r1;                                                                 \
        MADD(s_m00, r0, u0);                                                        \
        MADD(s_m01, r0, u1);                                                        \
        MADD(s_m10, r1, u0);                                                        \
        MADD(s_m11, r1, u1);                                                        \
        lo = EVEN(r0, r1);                                                          \
        hi = ODD(r0, r1)

    /* One block on LANES-wide vectors. A macro because C has no type
       parameters: the instances differ in vector width, in how frac() is
       taken and in whether the sums use fused multiply-adds, so in the
       rounding of the seven sums, never in the rounding of a residual
       (u is computed with separate products and sums everywhere). */
    #define CCDGRID_GE_DEFINE_BODY(NAME, ATTR, LANES, VD, VI, EVEN, ODD, FRAC, MADD)    \
    ATTR static inline __attribute__((always_inline)) int NAME(                     \
        const double *restrict pts, Py_ssize_t n, const double *restrict c,         \
        double *restrict res, double *restrict sums, const int want_res)           \
    {                                                                               \
        const VD zero = {0.0};                                                      \
        const double ox = c[0], oy = c[1];                                          \
        const double i00 = c[2], i01 = c[3], i10 = c[4], i11 = c[5];                \
        VD s_v0 = zero, s_v1 = zero, s_g0 = zero, s_g1 = zero;                      \
        VD s_m00 = zero, s_m01 = zero, s_m10 = zero, s_m11 = zero;                  \
        VI off = (VI){0};                                                           \
        VD a, b, x, y, q0, q1, u0, u1, t, r0, r1, lo, hi;                           \
        double pad[2 * LANES], out[2 * LANES], lanes[8][LANES];                     \
        Py_ssize_t k, j, m;                                                         \
        long long any = 0;                                                          \
        (void)t;                                                                    \
        for (k = 0; k + LANES <= n; k += LANES) {                                  \
            memcpy(&a, pts + 2 * k, sizeof a);                                      \
            memcpy(&b, pts + 2 * k + LANES, sizeof b);                              \
            CCDGRID_GE_STEP(EVEN, ODD, FRAC, MADD);                                 \
            if (want_res) {                                                         \
                memcpy(res + 2 * k, &lo, sizeof lo);                                \
                memcpy(res + 2 * k + LANES, &hi, sizeof hi);                        \
            }                                                                       \
        }                                                                           \
        m = n - k;                                                                  \
        if (m > 0) {                                                                \
            /* Padding points at the origin T have u = 0: they add nothing. */      \
            for (j = 0; j < LANES; ++j) {                                           \
                pad[2 * j] = ox;                                                    \
                pad[2 * j + 1] = oy;                                                \
            }                                                                       \
            memcpy(pad, pts + 2 * k, (size_t)(2 * m) * sizeof(double));             \
            memcpy(&a, pad, sizeof a);                                              \
            memcpy(&b, pad + LANES, sizeof b);                                      \
            CCDGRID_GE_STEP(EVEN, ODD, FRAC, MADD);                                 \
            if (want_res) {                                                         \
                memcpy(out, &lo, sizeof lo);                                        \
                memcpy(out + LANES, &hi, sizeof hi);                                \
                memcpy(res + 2 * k, out, (size_t)(2 * m) * sizeof(double));         \
            }                                                                       \
        }                                                                           \
        memcpy(lanes[0], &s_v0, sizeof s_v0);                                       \
        memcpy(lanes[1], &s_v1, sizeof s_v1);                                       \
        memcpy(lanes[2], &s_g0, sizeof s_g0);                                       \
        memcpy(lanes[3], &s_g1, sizeof s_g1);                                       \
        memcpy(lanes[4], &s_m00, sizeof s_m00);                                     \
        memcpy(lanes[5], &s_m01, sizeof s_m01);                                     \
        memcpy(lanes[6], &s_m10, sizeof s_m10);                                     \
        memcpy(lanes[7], &s_m11, sizeof s_m11);                                     \
        for (j = 0; j < 8; ++j) {                                                   \
            for (m = 1; m < LANES; ++m) lanes[j][0] += lanes[j][m];                 \
        }                                                                           \
        sums[0] = lanes[0][0] + lanes[1][0];                                        \
        for (j = 1; j < 7; ++j) sums[j] = lanes[j + 1][0];                          \
        for (j = 0; j < LANES; ++j) any |= off[j];                                  \
        return (any & CCDGRID_GE_SIGN_EXP_MASK) == 0;                               \
    }

    /* The block function of a path: its body, with or without residuals
       (two instances, so that each loop is compiled without the test). */
    #define CCDGRID_GE_DEFINE_BLOCK(NAME, ATTR, BODY)                                   \
    ATTR static int NAME(const double *pts, Py_ssize_t n, const double *c,              \
                         double *res, double *sums)                                     \
    {                                                                                   \
        return res != NULL ? BODY(pts, n, c, res, sums, 1)                              \
                           : BODY(pts, n, c, NULL, sums, 0);                            \
    }

    #define CCDGRID_GE_NO_ATTR
    CCDGRID_GE_DEFINE_BODY(ccdgrid_ge_body2, CCDGRID_GE_NO_ATTR, 2, ccdgrid_v2d, ccdgrid_v2i,
                           CCDGRID_GE_EVEN2, CCDGRID_GE_ODD2, CCDGRID_GE_FRAC_MAGIC,
                           CCDGRID_GE_MADD)

    CCDGRID_GE_DEFINE_BLOCK(ccdgrid_ge_block_generic, CCDGRID_GE_NO_ATTR, ccdgrid_ge_body2)
    #else
    #define ccdgrid_ge_block_generic ccdgrid_ge_block_none
    #endif

    #if CCDGRID_GE_AVX2
    /* AVX2 + FMA: four lanes, frac() with vroundpd (exact for every input,
       so `off` stays 0) and fused multiply-adds into the sums. The products
       and sums that make u are separate instructions (the build is ISO C,
       which does not contract them), so residuals match the numpy twin. */
    #define CCDGRID_GE_FRAC_ROUND(r, u)                                                 \
        r = (u) - (ccdgrid_v4d)_mm256_round_pd(                                     \
            (__m256d)(u), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
    #define CCDGRID_GE_FMADD(acc, a, b)                                                 \
        acc = (ccdgrid_v4d)_mm256_fmadd_pd((__m256d)(a), (__m256d)(b), (__m256d)(acc))

    #define CCDGRID_GE_AVX2_ATTR __attribute__((target("avx2,fma")))
    CCDGRID_GE_DEFINE_BODY(ccdgrid_ge_body4, CCDGRID_GE_AVX2_ATTR, 4, ccdgrid_v4d, ccdgrid_v4i,
                           CCDGRID_GE_EVEN4, CCDGRID_GE_ODD4, CCDGRID_GE_FRAC_ROUND,
                           CCDGRID_GE_FMADD)

    CCDGRID_GE_DEFINE_BLOCK(ccdgrid_ge_block_avx2, CCDGRID_GE_AVX2_ATTR, ccdgrid_ge_body4)
    static int ccdgrid_ge_cpu_has_avx2(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }

    /* AVX-512F: eight lanes, the same instructions on 512-bit registers
       (vrndscalepd rounds like vroundpd). Worth its own path where numpy's
       loops use AVX-512 too (Zen 4/5, recent Xeons): there the twin is twice
       as fast as with AVX2. The in-lane unpacks give the x and y of points
       0, 4, 1, 5, 2, 6, 3, 7, which the sums do not mind, and interleave the
       residuals back in order. */
    typedef double ccdgrid_v8d __attribute__((vector_size(64)));
    typedef long long ccdgrid_v8i __attribute__((vector_size(64)));
    #define CCDGRID_GE_EVEN8(a, b) __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14)
    #define CCDGRID_GE_ODD8(a, b) __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15)
    #define CCDGRID_GE_FRAC_ROUND8(r, u)                                                \
        r = (u) - (ccdgrid_v8d)_mm512_roundscale_pd(                                \
            (__m512d)(u), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
    #define CCDGRID_GE_FMADD8(acc, a, b)                                                \
        acc = (ccdgrid_v8d)_mm512_fmadd_pd((__m512d)(a), (__m512d)(b), (__m512d)(acc))

    #define CCDGRID_GE_AVX512_ATTR __attribute__((target("avx512f,avx2,fma")))
    CCDGRID_GE_DEFINE_BODY(ccdgrid_ge_body8, CCDGRID_GE_AVX512_ATTR, 8, ccdgrid_v8d,
                           ccdgrid_v8i, CCDGRID_GE_EVEN8, CCDGRID_GE_ODD8,
                           CCDGRID_GE_FRAC_ROUND8, CCDGRID_GE_FMADD8)

    CCDGRID_GE_DEFINE_BLOCK(ccdgrid_ge_block_avx512, CCDGRID_GE_AVX512_ATTR,
                            ccdgrid_ge_body8)
    static int ccdgrid_ge_cpu_has_avx512(void)
    {
        /* libgcc's answer includes the OS's support of the zmm state */
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && ccdgrid_ge_cpu_has_avx2();
    }
    #else
    static int ccdgrid_ge_block_avx2(const double *pts, Py_ssize_t n, const double *c,
                                     double *res, double *sums)
    {
        return ccdgrid_ge_block_generic(pts, n, c, res, sums);
    }
    static int ccdgrid_ge_cpu_has_avx2(void) { return 0; }
    #define ccdgrid_ge_block_avx512 ccdgrid_ge_block_avx2
    static int ccdgrid_ge_cpu_has_avx512(void) { return 0; }
    #endif
    """
    ctypedef int (*ccdgrid_ge_block_fn)(const double*, Py_ssize_t, const double*,
                                        double*, double*) noexcept nogil
    int CCDGRID_GE_VECTOR
    int ccdgrid_ge_block_none(const double*, Py_ssize_t, const double*,
                              double*, double*) noexcept nogil
    int ccdgrid_ge_block_generic(const double*, Py_ssize_t, const double*,
                                 double*, double*) noexcept nogil
    int ccdgrid_ge_block_avx2(const double*, Py_ssize_t, const double*,
                              double*, double*) noexcept nogil
    int ccdgrid_ge_cpu_has_avx2() noexcept nogil
    int ccdgrid_ge_block_avx512(const double*, Py_ssize_t, const double*,
                                double*, double*) noexcept nogil
    int ccdgrid_ge_cpu_has_avx512() noexcept nogil


# Points are summed in fixed-size blocks whose partial sums are added in
# block order: the result does not depend on the number of threads.
cdef Py_ssize_t _BLOCK = 8192
# Threads only for very large inputs (2**20 points and more). A parallel loop
# waits for its slowest thread: on a busy 2-core machine a descheduled thread
# made 100,000 points take 24 ms instead of 0.46 ms serially.
cdef Py_ssize_t _PARALLEL_MIN_BLOCKS = 128
# value, g0, g1, m00, m01, m10, m11
cdef enum:
    _NSUMS = 7

cdef ccdgrid_ge_block_fn _vector_block = ccdgrid_ge_block_none
cdef str _isa = "scalar"
if CCDGRID_GE_VECTOR:
    _vector_block = ccdgrid_ge_block_generic
    _isa = "baseline"
    if ccdgrid_ge_cpu_has_avx512():
        _vector_block = ccdgrid_ge_block_avx512
        _isa = "avx512"
    elif ccdgrid_ge_cpu_has_avx2():
        _vector_block = ccdgrid_ge_block_avx2
        _isa = "avx2"


def simd_isa():
    """Which code path the kernel runs: ``"avx512"``, ``"avx2"``, ``"baseline"`` or ``"scalar"``.

    ``"avx512"``: eight lanes, AVX-512F. ``"avx2"``: four lanes, AVX2 + FMA.
    ``"baseline"``: two lanes, the build target's ISA (SSE2 on x86-64).
    ``"scalar"``: one point at a time with ``rint`` (builds without vector
    extensions).
    """
    return _isa


def _select_isa(name):
    """Force a code path (for tests); returns the previous one. Not thread-safe."""
    global _vector_block, _isa
    previous = _isa
    if name == "avx512" and ccdgrid_ge_cpu_has_avx512():
        _vector_block = ccdgrid_ge_block_avx512
    elif name == "avx2" and ccdgrid_ge_cpu_has_avx2():
        _vector_block = ccdgrid_ge_block_avx2
    elif name == "baseline" and CCDGRID_GE_VECTOR:
        _vector_block = ccdgrid_ge_block_generic
    elif name == "scalar":
        _vector_block = ccdgrid_ge_block_none
    else:
        raise ValueError(f"code path {name!r} is not available in this build or on this CPU")
    _isa = name
    return previous


cdef void _block_exact(
    const double* pts, Py_ssize_t n, const double* c, double* res, double* sums
) noexcept nogil:
    """The 7 sums over ``n`` points (x, y) at ``pts``, rounding with ``rint``.

    The reference path of the vector code, for blocks where its shortcut may
    be wrong (|u| >= 2**51, NaN, inf) and for builds without it.
    """
    cdef double acc[_NSUMS]
    cdef double q0, q1, u0, u1, r0, r1
    cdef Py_ssize_t k, j
    for j in range(_NSUMS):
        acc[j] = 0.0
    for k in range(n):
        q0 = pts[2 * k] - c[0]
        q1 = pts[2 * k + 1] - c[1]
        u0 = c[2] * q0 + c[3] * q1
        u1 = c[4] * q0 + c[5] * q1
        r0 = u0 - rint(u0)
        r1 = u1 - rint(u1)
        acc[0] += r0 * r0 + r1 * r1
        acc[1] += r0
        acc[2] += r1
        acc[3] += r0 * u0
        acc[4] += r0 * u1
        acc[5] += r1 * u0
        acc[6] += r1 * u1
        if res != NULL:
            res[2 * k] = r0
            res[2 * k + 1] = r1
    for j in range(_NSUMS):
        sums[j] = acc[j]


cdef inline void _block(
    ccdgrid_ge_block_fn vector_block, const double* pts, Py_ssize_t n, const double* c,
    double* res, double* sums
) noexcept nogil:
    if not vector_block(pts, n, c, res, sums):
        _block_exact(pts, n, c, res, sums)


def grid_error(const double[::1] P, const double[:, ::1] points, bint residuals):
    """Value, gradient and optionally residuals; see :func:`ccdgrid.hole_error.grid_error`.

    Parameters
    ----------
    P : ndarray of shape (6,), float64
        ``(Ox, Oy, Xx, Yx, Xy, Yy)``, ``R`` regular.
    points : ndarray of shape (N, 2), float64, C-contiguous
        **(x, y)** pixel positions.
    residuals : bool
        Also return the ``(N, 2)`` fractional vectors (x, y) in hole units.

    Returns
    -------
    tuple
        ``(value, gradient)`` or ``(value, gradient, residuals)``.
    """
    cdef Py_ssize_t n = points.shape[0]
    cdef Py_ssize_t nblocks = (n + _BLOCK - 1) // _BLOCK
    cdef Py_ssize_t b, start, j
    cdef double det = P[2] * P[5] - P[3] * P[4]
    cdef double c[6]
    cdef double total[_NSUMS]
    cdef double sums[_NSUMS]
    cdef double* partial = NULL
    cdef double* res = NULL
    cdef double[:, ::1] res_view
    cdef const double* pts = &points[0, 0] if n > 0 else NULL
    cdef ccdgrid_ge_block_fn vector_block = _vector_block
    c[0] = P[0]
    c[1] = P[1]
    c[2] = P[5] / det
    c[3] = -P[3] / det
    c[4] = -P[4] / det
    c[5] = P[2] / det
    res_arr = None
    if residuals:
        res_arr = np.empty((n, 2), dtype=np.float64)
        if n > 0:
            res_view = res_arr
            res = &res_view[0, 0]
    for j in range(_NSUMS):
        total[j] = 0.0
    if nblocks < _PARALLEL_MIN_BLOCKS:
        with nogil:
            for b in range(nblocks):
                start = b * _BLOCK
                _block(vector_block, pts + 2 * start, min(_BLOCK, n - start), c,
                       res + 2 * start if res != NULL else NULL, sums)
                for j in range(_NSUMS):
                    total[j] += sums[j]
    else:
        partial = <double*>malloc(nblocks * _NSUMS * sizeof(double))
        if partial == NULL:
            raise MemoryError()
        try:
            with nogil:
                for b in prange(nblocks, schedule="static"):
                    start = b * _BLOCK
                    _block(vector_block, pts + 2 * start, min(_BLOCK, n - start), c,
                           res + 2 * start if res != NULL else NULL, partial + _NSUMS * b)
                # Same order of additions as the serial loop above.
                for b in range(nblocks):
                    for j in range(_NSUMS):
                        total[j] += partial[_NSUMS * b + j]
        finally:
            free(partial)
    # d value / d T = -2 R^-T g and d value / d R = -2 R^-T M, with
    # g = sum r_k and M = sum r_k u_k^T (R^-T[a, b] = R^-1[b, a]).
    gradient = np.array([
        -2.0 * (c[2] * total[1] + c[4] * total[2]),
        -2.0 * (c[3] * total[1] + c[5] * total[2]),
        -2.0 * (c[2] * total[3] + c[4] * total[5]),
        -2.0 * (c[2] * total[4] + c[4] * total[6]),
        -2.0 * (c[3] * total[3] + c[5] * total[5]),
        -2.0 * (c[3] * total[4] + c[5] * total[6]),
    ])
    if residuals:
        return total[0], gradient, res_arr
    return total[0], gradient
