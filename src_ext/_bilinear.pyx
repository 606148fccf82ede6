"""Compiled twin of :mod:`ccdgrid._reference.bilinear`: climb and sub-pixel refinement.

Preconditions (checked by :mod:`ccdgrid.bilinear`, trusted here; breaking them
reads out of bounds): ``image`` is a non-empty C-contiguous float32 2-D array,
``seeds`` a C-contiguous ``(N, 2)`` int64 array whose rows ``(y, x)`` satisfy
``0 <= y < H`` and ``0 <= x < W``; except that :func:`refine_peaks` checks the
seeds itself, in the pass that refines them, and returns the first bad one.

Seeds that are already local maxima (a watershed's peaks, the tutorial's
case) are refined several at a time, one per vector lane: eight with AVX2
when the CPU has it (asked once at import; :func:`use_avx2`), else four.

The arithmetic reproduces pyFAI 2026.9 ``Bilinear.local_maxi``: the second
differences are evaluated in double and stored as float32 (the eight-lane path
takes them in float32 where that gives the same bits), the Newton offsets
and the centre-of-mass sums are float32. The build compiles in ISO C mode
(``c_std=c11``), so the compiler does not fuse multiply-adds and the float32
roundings are those of the numpy twin.
"""

from libc.math cimport INFINITY, nextafterf
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

import numpy as np

from cython.parallel cimport prange

cdef extern from *:
    """
    #include <math.h>
    #include <string.h>
    #ifdef CCDGRID_OPENMP
    #include <omp.h>
    static int ccdgrid_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int ccdgrid_max_threads(void) { return 1; }
    #endif
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif

    /* Ask for the three rows of the 3x3 window at (y, x) of an image w
       pixels wide. A macro, not a function: GCC deems a function that only
       prefetches free of effects and deletes the calls. The address is
       computed on integers and may point outside the image (a prefetch
       never faults), which saves clamping it on the first and last rows. */
    #if defined(__GNUC__)
    #include <stdint.h>
    #define ccdgrid_prefetch_window(base, w, y, x)                                   \
        do {                                                                      \
            const uintptr_t ccdgrid_a_ = (uintptr_t)(base)                        \
                + (uintptr_t)((y) * (w) + (x) - 1) * sizeof(float);               \
            const uintptr_t ccdgrid_r_ = (uintptr_t)(w) * sizeof(float);          \
            __builtin_prefetch((const void *)(ccdgrid_a_ - ccdgrid_r_), 0, 3);    \
            __builtin_prefetch((const void *)ccdgrid_a_, 0, 3);                   \
            __builtin_prefetch((const void *)(ccdgrid_a_ + ccdgrid_r_), 0, 3);    \
        } while (0)
    #else
    #define ccdgrid_prefetch_window(base, w, y, x) ((void)0)
    #endif

    /* 1 if no pixel of the 3x3 window centred on *p is strictly greater than
       *p (NaN never is). Each row is read as four floats, the fourth one
       past the window: the caller makes sure that p[w + 2] is inside the
       image. Three vector comparisons instead of eight scalar ones. */
    #ifndef __has_builtin
    #define __has_builtin(x) 0
    #endif
    #if defined(__GNUC__) && __has_builtin(__builtin_shufflevector)
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

    /* The 3x3 window centred on *p (an interior pixel) as three rows of four
       floats into dst[0..11]; the fourth float of each row is the pixel past
       the window when `wide` (p[w + 2] is inside the image), else zero. */
    static inline void ccdgrid_copy_window(const float *p, Py_ssize_t w, int wide, float *dst)
    {
        if (wide) {
            memcpy(dst, p - w - 1, 4 * sizeof *dst);
            memcpy(dst + 4, p - 1, 4 * sizeof *dst);
            memcpy(dst + 8, p + w - 1, 4 * sizeof *dst);
        } else {
            memcpy(dst, p - w - 1, 3 * sizeof *dst);
            memcpy(dst + 4, p - 1, 3 * sizeof *dst);
            memcpy(dst + 8, p + w - 1, 3 * sizeof *dst);
            dst[3] = dst[7] = dst[11] = 0.0f;
        }
    }

    /* The common case of a batch of peaks, in one go: if (y, x) is an
       interior pixel not in the last two columns (1 <= y < 1 + ylim,
       1 <= x < 1 + xlim, the limits being h - 2 and w - 3 or 0) and no
       pixel of its 3x3 window is higher, write the window to dst as
       ccdgrid_copy_window does and return 1; else return 0 (dst may have
       been written). */
    #if defined(__SSE2__)
    static inline int ccdgrid_gather_maximum(const float *base, Py_ssize_t w, Py_ssize_t y,
                                             Py_ssize_t x, size_t ylim, size_t xlim,
                                             float *dst)
    {
        if (!(((size_t)(y - 1) < ylim) & ((size_t)(x - 1) < xlim)))
            return 0;
        const float *p = base + y * w + x;
        const __m128 c = _mm_set1_ps(p[0]);
        const __m128 r0 = _mm_loadu_ps(p - w - 1);
        const __m128 r1 = _mm_loadu_ps(p - 1);
        const __m128 r2 = _mm_loadu_ps(p + w - 1);
        _mm_storeu_ps(dst, r0);
        _mm_storeu_ps(dst + 4, r1);
        _mm_storeu_ps(dst + 8, r2);
        const __m128 m = _mm_or_ps(_mm_or_ps(_mm_cmpgt_ps(r0, c), _mm_cmpgt_ps(r1, c)),
                                   _mm_cmpgt_ps(r2, c));
        return (_mm_movemask_ps(m) & 7) == 0;
    }
    #else
    static inline int ccdgrid_gather_maximum(const float *base, Py_ssize_t w, Py_ssize_t y,
                                             Py_ssize_t x, size_t ylim, size_t xlim,
                                             float *dst)
    {
        if (!(((size_t)(y - 1) < ylim) & ((size_t)(x - 1) < xlim)))
            return 0;
        const float *p = base + y * w + x;
        if (!ccdgrid_centre_is_highest(p, w))
            return 0;
        ccdgrid_copy_window(p, w, 1, dst);
        return 1;
    }
    #endif

    /* pyFAI 2026.9's Newton step for CCDGRID_LANES maxima at once, one per
       vector lane: the same operations in the same order for each maximum as
       pyFAI's scalar code, so the same roundings. The second differences d00
       and d11 are evaluated in double and rounded once to float (pyFAI's
       double literal 2.0); d01 = (...) / 4.0 and denom = 2.0 * (...) are
       float values scaled by powers of two, exact in double, so float
       operations round them the same way. `win` holds CCDGRID_LANES windows
       as written by ccdgrid_copy_window, `pix` their centres (y, x) as
       doubles, `thr` is the least float f with (double)f >= 1e-10, so that
       |denom| >= thr is pyFAI's fabs(denom) >= 1e-10. For each lane i < nl
       whose step is accepted (|denom| >= 1e-10, |dy| <= 1, |dx| <= 1),
       writes (dy + y, dx + x), each float offset added to its pixel in
       double, to out[2 lk[i]], out[2 lk[i] + 1]. Returns the bit mask of
       those lanes; the others are left to the caller. */
    #if defined(__GNUC__) && __has_builtin(__builtin_shufflevector) \
        && __has_builtin(__builtin_convertvector)
    #define CCDGRID_LANES 4
    typedef double ccdgrid_v2d __attribute__((vector_size(16)));
    typedef double ccdgrid_v4d __attribute__((vector_size(32)));
    typedef int ccdgrid_v4i __attribute__((vector_size(16)));

    /* (float)((double)u - 2.0 * (double)c + (double)v), lane by lane */
    static inline ccdgrid_v4f ccdgrid_second_difference(ccdgrid_v4f u, ccdgrid_v4f c,
                                                        ccdgrid_v4f v)
    {
        ccdgrid_v4d du = __builtin_convertvector(u, ccdgrid_v4d);
        ccdgrid_v4d dc = __builtin_convertvector(c, ccdgrid_v4d);
        ccdgrid_v4d dv = __builtin_convertvector(v, ccdgrid_v4d);
        return __builtin_convertvector((du - 2.0 * dc) + dv, ccdgrid_v4f);
    }

    /* Columns c0, c1, c2 of the 4x4 matrix whose rows are l0..l3: row r of
       the windows of four maxima, one per row, becomes a_r0, a_r1, a_r2 with
       one maximum per lane. */
    static inline void ccdgrid_transpose(ccdgrid_v4f l0, ccdgrid_v4f l1, ccdgrid_v4f l2,
                                         ccdgrid_v4f l3, ccdgrid_v4f *c0, ccdgrid_v4f *c1,
                                         ccdgrid_v4f *c2)
    {
        ccdgrid_v4f t0 = __builtin_shufflevector(l0, l1, 0, 4, 1, 5);
        ccdgrid_v4f t1 = __builtin_shufflevector(l0, l1, 2, 6, 3, 7);
        ccdgrid_v4f t2 = __builtin_shufflevector(l2, l3, 0, 4, 1, 5);
        ccdgrid_v4f t3 = __builtin_shufflevector(l2, l3, 2, 6, 3, 7);
        *c0 = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
        *c1 = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
        *c2 = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    }

    /* Bit i set when lane i of the comparison result m is true. */
    static inline int ccdgrid_lane_mask(ccdgrid_v4i m)
    {
    #if defined(__SSE2__)
        return _mm_movemask_ps((__m128)m);
    #else
        return (m[0] & 1) | (m[1] & 2) | (m[2] & 4) | (m[3] & 8);
    #endif
    }

    /* The Newton step of four maxima given their windows a_rc, one maximum
       per lane; returns the mask of the lanes whose step is accepted, with
       the float offsets in *vy, *vx. */
    static inline int ccdgrid_newton4(
        ccdgrid_v4f a00, ccdgrid_v4f a01, ccdgrid_v4f a02, ccdgrid_v4f a10, ccdgrid_v4f a11,
        ccdgrid_v4f a12, ccdgrid_v4f a20, ccdgrid_v4f a21, ccdgrid_v4f a22, float thr,
        ccdgrid_v4f *vy, ccdgrid_v4f *vx)
    {
        ccdgrid_v4f d00, d11, d01, denom, ad, ay, ax;
        d00 = ccdgrid_second_difference(a21, a11, a01);
        d11 = ccdgrid_second_difference(a12, a11, a10);
        d01 = (((a00 - a02) - a20) + a22) * 0.25f;
        denom = (d00 * d11 - d01 * d01) * 2.0f;
        *vy = ((a12 - a10) * d01 + (a01 - a21) * d11) / denom;
        *vx = ((a10 - a12) * d00 + (a21 - a01) * d01) / denom;
        /* |v| by clearing the sign bit; comparisons with NaN are false */
        const ccdgrid_v4f one = {1.0f, 1.0f, 1.0f, 1.0f};
        const ccdgrid_v4f t = {thr, thr, thr, thr};
        const ccdgrid_v4i sign = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
        ad = (ccdgrid_v4f)((ccdgrid_v4i)denom & sign);
        ay = (ccdgrid_v4f)((ccdgrid_v4i)*vy & sign);
        ax = (ccdgrid_v4f)((ccdgrid_v4i)*vx & sign);
        return ccdgrid_lane_mask((ad >= t) & (ay <= one) & (ax <= one));
    }

    /* (dy + y, dx + x) in double, from lanes 2 half and 2 half + 1 of the
       interleaved offsets o = (dy_i, dx_i, dy_j, dx_j) and the pixel p. */
    static inline ccdgrid_v2d ccdgrid_position(ccdgrid_v4f o, int half, ccdgrid_v2d p)
    {
        ccdgrid_v4f s = half ? __builtin_shufflevector(o, o, 2, 3, 2, 3) : o;
        return __builtin_convertvector(__builtin_shufflevector(s, s, 0, 1), ccdgrid_v2d) + p;
    }

    static inline int ccdgrid_newton_lanes(const float *win, float thr, const double *pix,
                                           const Py_ssize_t *lk, int nl, double *out)
    {
        ccdgrid_v4f a[9], l[12], vy, vx, lo, hi;
        ccdgrid_v2d p;
        int r, i;
        memcpy(l, win, sizeof l);
        for (r = 0; r < 3; r++)
            ccdgrid_transpose(l[r], l[3 + r], l[6 + r], l[9 + r], &a[3 * r], &a[3 * r + 1],
                              &a[3 * r + 2]);
        int mask = ccdgrid_newton4(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8],
                                   thr, &vy, &vx);
        mask &= (1 << nl) - 1;
        lo = __builtin_shufflevector(vy, vx, 0, 4, 1, 5);
        hi = __builtin_shufflevector(vy, vx, 2, 6, 3, 7);
        for (i = 0; i < 4; i++) {
            if (mask >> i & 1) {
                memcpy(&p, pix + 2 * i, sizeof p);
                p = ccdgrid_position(i < 2 ? lo : hi, i & 1, p);
                memcpy(out + 2 * lk[i], &p, sizeof p);
            }
        }
        return mask;
    }

    /* The common case of a batch of peaks, four at a time without copies:
       if the four seeds s[0..7] are interior pixels not in the last two
       columns (as in ccdgrid_gather_maximum), none has a higher neighbour,
       and the four Newton steps are accepted, write the four refined
       positions to out[0..7] and return 1. Else return 0, having written
       nothing. */
    static int ccdgrid_refine_four(const float *base, Py_ssize_t w, size_t ylim,
                                   size_t xlim, const int64_t *s, float thr, double *out)
    {
        const float *q[4];
        ccdgrid_v4f row[12], a[9], c, vy, vx, lo, hi;
        ccdgrid_v4i higher = {0, 0, 0, 0};
        int i, inside = 1;
        for (i = 0; i < 4; i++)
            inside &= ((size_t)(s[2 * i] - 1) < ylim) & ((size_t)(s[2 * i + 1] - 1) < xlim);
        if (!inside)
            return 0;
        for (i = 0; i < 4; i++) {
            q[i] = base + s[2 * i] * w + s[2 * i + 1];
            memcpy(&row[i], q[i] - w - 1, sizeof row[i]);
            memcpy(&row[4 + i], q[i] - 1, sizeof row[i]);
            memcpy(&row[8 + i], q[i] + w - 1, sizeof row[i]);
            c = __builtin_shufflevector(row[4 + i], row[4 + i], 1, 1, 1, 1);
            higher |= (row[i] > c) | (row[4 + i] > c) | (row[8 + i] > c);
        }
        if (ccdgrid_lane_mask(higher) & 7)
            return 0;
        for (i = 0; i < 3; i++)
            ccdgrid_transpose(row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3],
                              &a[3 * i], &a[3 * i + 1], &a[3 * i + 2]);
        if (ccdgrid_newton4(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], thr,
                            &vy, &vx) != 15)
            return 0;
        lo = __builtin_shufflevector(vy, vx, 0, 4, 1, 5);
        hi = __builtin_shufflevector(vy, vx, 2, 6, 3, 7);
        for (i = 0; i < 4; i++) {
            ccdgrid_v2d p = {(double)s[2 * i], (double)s[2 * i + 1]};
            p = ccdgrid_position(i < 2 ? lo : hi, i & 1, p);
            memcpy(out + 2 * i, &p, sizeof p);
        }
        return 1;
    }
    #else
    #define CCDGRID_LANES 1
    static inline int ccdgrid_newton_lanes(const float *a, float thr, const double *pix,
                                           const Py_ssize_t *lk, int nl, double *out)
    {
        float d00 = (float)(((double)a[9] - 2.0 * (double)a[5]) + (double)a[1]);
        float d11 = (float)(((double)a[6] - 2.0 * (double)a[5]) + (double)a[4]);
        float d01 = (((a[0] - a[2]) - a[8]) + a[10]) * 0.25f;
        float denom = (d00 * d11 - d01 * d01) * 2.0f;
        float dy = ((a[6] - a[4]) * d01 + (a[1] - a[9]) * d11) / denom;
        float dx = ((a[4] - a[6]) * d00 + (a[9] - a[1]) * d01) / denom;
        if (nl > 0 && fabsf(denom) >= thr && fabsf(dy) <= 1.0f && fabsf(dx) <= 1.0f) {
            out[2 * lk[0]] = (double)dy + pix[0];
            out[2 * lk[0] + 1] = (double)dx + pix[1];
            return 1;
        }
        return 0;
    }
    static inline int ccdgrid_refine_four(const float *base, Py_ssize_t w, size_t ylim,
                                          size_t xlim, const int64_t *s, float thr,
                                          double *out)
    {
        return 0;
    }
    #endif

    /* AVX2 path for batches of peaks: eight seeds per step, one per lane of
       a 256-bit vector, compiled for AVX2 whatever the build's baseline and
       used when the CPU has it (ccdgrid_avx2_usable, asked once at import).
       Per seed it takes half the time of the four-lane path above when the
       windows are in the L1 cache (27 against 58 us for 10,000 seeds). With
       the seeds scattered over a 16 MB image, most of what is left is the
       memory traffic of three rows per seed (reading the windows alone takes
       40 us), which the loop overlaps with the work by asking for the windows
       of the next step while it works on the current one. */
    #if defined(__GNUC__) && defined(__x86_64__) && defined(__has_attribute)
    #if __has_attribute(target)
    #define CCDGRID_AVX2_PATH 1
    #endif
    #endif

    #ifdef CCDGRID_AVX2_PATH
    #include <immintrin.h>
    #define CCDGRID_AVX2 __attribute__((target("avx2")))

    static int ccdgrid_avx2_usable(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0;
    }

    /* Row r of seed i in the low half, of seed i + 4 in the high half. */
    CCDGRID_AVX2 static inline __m256 ccdgrid_load_pair(const float *p, const float *q)
    {
        return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(q), 1);
    }

    /* The first three columns of four rows loaded by ccdgrid_load_pair, one
       seed per lane in the order 0 1 2 3 | 4 5 6 7: both 128-bit halves are
       transposed at once by the in-lane shuffles. */
    CCDGRID_AVX2 static inline void ccdgrid_columns8(__m256 r0, __m256 r1, __m256 r2, __m256 r3,
                                                     __m256 *c0, __m256 *c1, __m256 *c2)
    {
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        *c0 = _mm256_shuffle_ps(t0, t2, 0x44);
        *c1 = _mm256_shuffle_ps(t0, t2, 0xee);
        *c2 = _mm256_shuffle_ps(t1, t3, 0x44);
    }

    /* Row d (an offset from the centre) of the windows centred at offsets
       q[0..7] from base, as its three columns, one seed per lane. */
    CCDGRID_AVX2 static inline void ccdgrid_row8(const float *base, const Py_ssize_t *q,
                                                 Py_ssize_t d, __m256 *c0, __m256 *c1,
                                                 __m256 *c2)
    {
        ccdgrid_columns8(ccdgrid_load_pair(base + (q[0] + d), base + (q[4] + d)),
                         ccdgrid_load_pair(base + (q[1] + d), base + (q[5] + d)),
                         ccdgrid_load_pair(base + (q[2] + d), base + (q[6] + d)),
                         ccdgrid_load_pair(base + (q[3] + d), base + (q[7] + d)), c0, c1, c2);
    }

    /* pyFAI's (float)((double)u - 2.0 * (double)c + (double)v), four lanes
       and then eight. */
    CCDGRID_AVX2 static inline __m128 ccdgrid_second_difference4(__m128 u, __m128 c, __m128 v)
    {
        const __m256d dc = _mm256_cvtps_pd(c);
        const __m256d e = _mm256_sub_pd(_mm256_cvtps_pd(u), _mm256_add_pd(dc, dc));
        return _mm256_cvtpd_ps(_mm256_add_pd(e, _mm256_cvtps_pd(v)));
    }

    CCDGRID_AVX2 static inline __m256 ccdgrid_second_difference8(__m256 u, __m256 c, __m256 v)
    {
        const __m128 lo = ccdgrid_second_difference4(
            _mm256_castps256_ps128(u), _mm256_castps256_ps128(c), _mm256_castps256_ps128(v));
        const __m128 hi = ccdgrid_second_difference4(
            _mm256_extractf128_ps(u, 1), _mm256_extractf128_ps(c, 1), _mm256_extractf128_ps(v, 1));
        return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    }

    /* (double)v for 0 <= v < 2**52, four lanes: AVX2 has no int64 conversion,
       but v is the mantissa of 2**52 + v. */
    CCDGRID_AVX2 static inline __m256d ccdgrid_int_to_double(__m256i v)
    {
        const __m256i bits = _mm256_set1_epi64x(0x4330000000000000LL);
        return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(v, bits)),
                             _mm256_set1_pd(4503599627370496.0));
    }

    /* Step A for the eight seeds s[0..15]: their offsets y * w + x into
       o[0..7], in the order 0 2 1 3 4 6 5 7 that unpacking leaves them in, and
       whether all are interior pixels not in the last two columns
       (1 <= y <= h - 2, 1 <= x <= w - 3: lim = (h - 3, w - 4) twice), so that
       their windows can be read four floats wide. The offsets use the low 32
       bits of y (w < 2**31): they are only read once the seeds are known to be
       inside. */
    CCDGRID_AVX2 static inline int ccdgrid_offsets8(const int64_t *s, __m256i lim, __m256i wv,
                                                    Py_ssize_t *o)
    {
        const __m256i one = _mm256_set1_epi64x(1);
        __m256i v[4], bad = _mm256_setzero_si256();
        int i;
        for (i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_si256((const __m256i *)(s + 4 * i));
            /* t is in [0, lim] when neither t nor lim - t has its sign bit set */
            const __m256i t = _mm256_sub_epi64(v[i], one);
            bad = _mm256_or_si256(bad, _mm256_or_si256(t, _mm256_sub_epi64(lim, t)));
            /* (y * w, x * w) + (x, 0) per 128-bit half: y * w + x in the
               even 64-bit lanes */
            v[i] = _mm256_add_epi64(_mm256_mul_epu32(v[i], wv), _mm256_srli_si256(v[i], 8));
        }
        _mm256_storeu_si256((__m256i *)o, _mm256_unpacklo_epi64(v[0], v[1]));
        _mm256_storeu_si256((__m256i *)(o + 4), _mm256_unpacklo_epi64(v[2], v[3]));
        return _mm256_movemask_pd(_mm256_castsi256_pd(bad)) == 0;
    }

    /* Ask for the three rows of the windows at offsets o[i], o[j]. Addresses are
       formed on integers: o may come from seeds outside the image, and a
       prefetch never faults. */
    #define CCDGRID_PREFETCH2(up, w4, o, i, j)                                         \
        do {                                                                            \
            if (o) {                                                                    \
                const uintptr_t ccdgrid_p_ = (up) + (uintptr_t)(o)[i] * sizeof(float);  \
                const uintptr_t ccdgrid_q_ = (up) + (uintptr_t)(o)[j] * sizeof(float);  \
                _mm_prefetch((const char *)ccdgrid_p_, _MM_HINT_T0);                    \
                _mm_prefetch((const char *)(ccdgrid_p_ + (w4)), _MM_HINT_T0);           \
                _mm_prefetch((const char *)(ccdgrid_p_ + 2 * (w4)), _MM_HINT_T0);       \
                _mm_prefetch((const char *)ccdgrid_q_, _MM_HINT_T0);                    \
                _mm_prefetch((const char *)(ccdgrid_q_ + (w4)), _MM_HINT_T0);           \
                _mm_prefetch((const char *)(ccdgrid_q_ + 2 * (w4)), _MM_HINT_T0);       \
            }                                                                           \
        } while (0)

    /* Step B: refine the eight interior seeds s[0..15] at offsets o (as step A
       leaves them) when all are maxima and all Newton steps are accepted;
       write their positions to out[0..15] and return 1. Else return 0 having
       written nothing. Meanwhile, ask for the windows at offsets po (the next
       step's, or NULL), spread between the loads: issued all at once, the
       requests filled the queue of pending loads and stalled the work. */
    CCDGRID_AVX2 static inline int ccdgrid_refine8(const float *base, Py_ssize_t w,
                                                   const int64_t *s, const Py_ssize_t *o,
                                                   const Py_ssize_t *po, float thr, double *out)
    {
        /* from a centre to the first pixel of each row of its window */
        const Py_ssize_t up = -w - 1, mid = -1, dn = w - 1;
        const uintptr_t pup = (uintptr_t)base - (uintptr_t)(w + 1) * sizeof(float);
        const uintptr_t w4 = (uintptr_t)w * sizeof(float);
        /* seed order; step A left them as 0 2 1 3 4 6 5 7 */
        const Py_ssize_t q[8] = {o[0], o[2], o[1], o[3], o[4], o[6], o[5], o[7]};
        __m256 a[9];
        ccdgrid_row8(base, q, up, &a[0], &a[1], &a[2]);
        CCDGRID_PREFETCH2(pup, w4, po, 0, 1);
        ccdgrid_row8(base, q, mid, &a[3], &a[4], &a[5]);
        CCDGRID_PREFETCH2(pup, w4, po, 2, 3);
        ccdgrid_row8(base, q, dn, &a[6], &a[7], &a[8]);
        CCDGRID_PREFETCH2(pup, w4, po, 4, 5);
        const __m256 c = a[4];
        /* no neighbour strictly higher; comparisons with NaN are false */
    #define CCDGRID_GT(i) _mm256_cmp_ps(a[i], c, _CMP_GT_OQ)
        const __m256 higher = _mm256_or_ps(
            _mm256_or_ps(_mm256_or_ps(CCDGRID_GT(0), CCDGRID_GT(1)),
                         _mm256_or_ps(CCDGRID_GT(2), CCDGRID_GT(3))),
            _mm256_or_ps(_mm256_or_ps(CCDGRID_GT(5), CCDGRID_GT(6)),
                         _mm256_or_ps(CCDGRID_GT(7), CCDGRID_GT(8))));
    #undef CCDGRID_GT
        CCDGRID_PREFETCH2(pup, w4, po, 6, 7);
        if (_mm256_movemask_ps(higher))
            return 0;
        /* The second differences in float when that gives pyFAI's double
           result bit for bit: for a centre c > 0 and neighbours u, v in
           [c / 2, c], u - c and v - c are exact (Sterbenz), and so is
           u - 2c + v in double, so both ways round the exact sum once. Near a
           smooth peak this always holds; else the double way. */
        __m256 d00, d11;
        const __m256 half = _mm256_mul_ps(c, _mm256_set1_ps(0.5f));
        const __m256 near = _mm256_and_ps(
            _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(a[1], half, _CMP_GE_OQ),
                                        _mm256_cmp_ps(a[7], half, _CMP_GE_OQ)),
                          _mm256_and_ps(_mm256_cmp_ps(a[3], half, _CMP_GE_OQ),
                                        _mm256_cmp_ps(a[5], half, _CMP_GE_OQ))),
            _mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_GT_OQ));
        if (_mm256_movemask_ps(near) == 0xff) {
            d00 = _mm256_add_ps(_mm256_sub_ps(a[7], c), _mm256_sub_ps(a[1], c));
            d11 = _mm256_add_ps(_mm256_sub_ps(a[5], c), _mm256_sub_ps(a[3], c));
        } else {
            d00 = ccdgrid_second_difference8(a[7], c, a[1]);
            d11 = ccdgrid_second_difference8(a[5], c, a[3]);
        }
        /* from here on pyFAI's float operations in its order, as in newton4 */
        const __m256 d01 = _mm256_mul_ps(
            _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(a[0], a[2]), a[6]), a[8]),
            _mm256_set1_ps(0.25f));
        __m256 denom = _mm256_sub_ps(_mm256_mul_ps(d00, d11), _mm256_mul_ps(d01, d01));
        denom = _mm256_add_ps(denom, denom);
        const __m256 vy = _mm256_div_ps(
            _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(a[5], a[3]), d01),
                          _mm256_mul_ps(_mm256_sub_ps(a[1], a[7]), d11)), denom);
        const __m256 vx = _mm256_div_ps(
            _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(a[3], a[5]), d00),
                          _mm256_mul_ps(_mm256_sub_ps(a[7], a[1]), d01)), denom);
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 ok = _mm256_and_ps(
            _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(denom, magnitude), _mm256_set1_ps(thr),
                                        _CMP_GE_OQ),
                          _mm256_cmp_ps(_mm256_and_ps(vy, magnitude), one, _CMP_LE_OQ)),
            _mm256_cmp_ps(_mm256_and_ps(vx, magnitude), one, _CMP_LE_OQ));
        if (_mm256_movemask_ps(ok) != 0xff)
            return 0;
        /* (dy + y, dx + x) in double; the seeds' (y, x) pairs are laid out as
           the output's */
        const __m256 lo = _mm256_unpacklo_ps(vy, vx), hi = _mm256_unpackhi_ps(vy, vx);
        const __m128 part[4] = {_mm256_castps256_ps128(lo), _mm256_castps256_ps128(hi),
                                _mm256_extractf128_ps(lo, 1), _mm256_extractf128_ps(hi, 1)};
        int i;
        for (i = 0; i < 4; i++) {
            const __m256i yx = _mm256_loadu_si256((const __m256i *)(s + 4 * i));
            _mm256_storeu_pd(out + 4 * i, _mm256_add_pd(_mm256_cvtps_pd(part[i]),
                                                        ccdgrid_int_to_double(yx)));
        }
        return 1;
    }

    /* Refine the blocks of eight seeds s[0 .. 16 nb - 1] in order until one
       that ccdgrid_refine8 cannot do (a seed outside or not a maximum, a
       rejected Newton step), writing out[0 .. 16 nb - 1] for them; return
       how many were done. Step A runs two blocks ahead of step B, and the
       windows are requested one block ahead: farther ahead was slower (more
       pending requests than the core serves). When it stops, the windows of
       the block it stopped at and of the next one have been requested, so
       that the caller's one-by-one path finds them in the cache. */
    CCDGRID_AVX2 static Py_ssize_t ccdgrid_refine_blocks(const float *base, Py_ssize_t h,
                                                         Py_ssize_t w, const int64_t *s,
                                                         Py_ssize_t nb, float thr, double *out)
    {
        const __m256i lim = _mm256_setr_epi64x(h - 3, w - 4, h - 3, w - 4);
        const __m256i wv = _mm256_set1_epi64x(w);
        const uintptr_t pup = (uintptr_t)base - (uintptr_t)(w + 1) * sizeof(float);
        const uintptr_t w4 = (uintptr_t)w * sizeof(float);
        Py_ssize_t ring[4][8];
        int inside[4];
        Py_ssize_t b;
        for (b = 0; b < 2 && b < nb; b++)
            inside[b] = ccdgrid_offsets8(s + 16 * b, lim, wv, ring[b]);
        if (nb > 0) {
            const Py_ssize_t *first = ring[0];
            CCDGRID_PREFETCH2(pup, w4, first, 0, 1);
            CCDGRID_PREFETCH2(pup, w4, first, 2, 3);
            CCDGRID_PREFETCH2(pup, w4, first, 4, 5);
            CCDGRID_PREFETCH2(pup, w4, first, 6, 7);
        }
        for (b = 0; b < nb; b++) {
            if (b + 2 < nb)
                inside[(b + 2) & 3] = ccdgrid_offsets8(s + 16 * (b + 2), lim, wv,
                                                       ring[(b + 2) & 3]);
            const Py_ssize_t *po = b + 1 < nb ? ring[(b + 1) & 3] : NULL;
            if (!inside[b & 3]) {
                CCDGRID_PREFETCH2(pup, w4, po, 0, 1);
                CCDGRID_PREFETCH2(pup, w4, po, 2, 3);
                CCDGRID_PREFETCH2(pup, w4, po, 4, 5);
                CCDGRID_PREFETCH2(pup, w4, po, 6, 7);
                return b;
            }
            if (!ccdgrid_refine8(base, w, s + 16 * b, ring[b & 3], po, thr, out + 16 * b))
                return b;
        }
        return nb;
    }
    #else
    static int ccdgrid_avx2_usable(void) { return 0; }
    static Py_ssize_t ccdgrid_refine_blocks(const float *base, Py_ssize_t h, Py_ssize_t w,
                                            const int64_t *s, Py_ssize_t nb, float thr,
                                            double *out)
    {
        return 0;
    }
    #endif
    """
    void ccdgrid_prefetch_window(
        const float* base, Py_ssize_t w, Py_ssize_t y, Py_ssize_t x
    ) noexcept nogil
    bint ccdgrid_centre_is_highest(const float* p, Py_ssize_t w) noexcept nogil
    void ccdgrid_copy_window(const float* p, Py_ssize_t w, int wide, float* dst) noexcept nogil
    int ccdgrid_newton_lanes(
        const float* win, float thr, const double* pix, const Py_ssize_t* lk, int nl, double* out
    ) noexcept nogil
    bint ccdgrid_refine_four(
        const float* base, Py_ssize_t w, size_t ylim, size_t xlim, const int64_t* s, float thr,
        double* out
    ) noexcept nogil
    bint ccdgrid_gather_maximum(
        const float* base, Py_ssize_t w, Py_ssize_t y, Py_ssize_t x, size_t ylim, size_t xlim,
        float* dst
    ) noexcept nogil
    enum: CCDGRID_LANES
    int ccdgrid_max_threads() noexcept nogil
    int ccdgrid_avx2_usable() noexcept nogil
    Py_ssize_t ccdgrid_refine_blocks(
        const float* base, Py_ssize_t h, Py_ssize_t w, const int64_t* s, Py_ssize_t nb,
        float thr, double* out
    ) noexcept nogil

ctypedef fused seed_t:
    int64_t
    double

# Threads only for very large batches. A parallel loop waits for its slowest
# thread: on a busy 2-core machine a descheduled thread made 10,000 seeds take
# 20 ms instead of 0.5 ms serially; pipelines refine a few thousand at most.
cdef Py_ssize_t _PARALLEL_MIN = 1 << 20

# refine_peaks asked for threads: below this many seeds one thread is faster
# (starting a team costs ~10 us); above it, chunks of _CHUNK seeds are handed
# out dynamically, because climbs from seeds that are not maxima vary in
# length and a static split left one thread with most of the work.
cdef Py_ssize_t _REFINE_PARALLEL_MIN = 8192
cdef enum:
    _CHUNK = 512

# Whether the CPU runs the eight-lane AVX2 path, asked once at import.
cdef bint _AVX2 = ccdgrid_avx2_usable()
cdef Py_ssize_t _AVX2_MAX_SIDE = 1 << 31

# Seeds scattered over a large image miss the caches: the window of the
# seed this many places ahead is requested while the current one is worked on.
cdef enum:
    _AHEAD = 8

__all__ = ["climb", "climb_one", "refine_one", "refine_peaks", "seed_pixels", "use_avx2"]


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
    # v is in [0, m] when neither v nor m - v has its top bit set: OR and
    # subtraction only, which SSE2 vectorises (it has no 64-bit comparison).
    cdef uint64_t acc = 0
    cdef uint64_t hm = <uint64_t>(h - 1)
    cdef uint64_t wm = <uint64_t>(w - 1)
    if seed_t is int64_t:
        for k in range(n):
            acc |= (<uint64_t>yx[2 * k] | (hm - <uint64_t>yx[2 * k])
                    | <uint64_t>yx[2 * k + 1] | (wm - <uint64_t>yx[2 * k + 1]))
        ok = (acc >> 63) == 0
    else:
        for k in range(n):
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
    const float* base, Py_ssize_t h, Py_ssize_t w, Py_ssize_t* py, Py_ssize_t* px
) noexcept nogil:
    """Move ``(py, px)`` uphill until no pixel of its clipped 3x3 window is greater.

    Strict ``>`` against a running best in raster order: the first maximum
    met wins ties, plateaus stop the climb, NaN is never chosen and a NaN
    start never moves. Returns True when the climb ends on an interior
    pixel, False on the image border.
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
    return interior


cdef inline void _centre_of_mass(
    const float* win, Py_ssize_t y, Py_ssize_t x, double* oy, double* ox
) noexcept nogil:
    """pyFAI's fallback when the Newton step is rejected, for the maximum at ``(y, x)``.

    ``win`` is its 3x3 window as three rows of four floats (the fourth
    unused). The centre of mass of the raw window if its sum is positive,
    else the pixel itself.
    """
    cdef float s = 0
    cdef float sy = 0
    cdef float sx = 0
    cdef float v
    cdef int r, c
    # float32 running sums in raster order, as pyFAI adds them
    for r in range(3):
        for c in range(3):
            v = win[4 * r + c]
            sy = sy + v * <float>(y + r - 1)
            sx = sx + v * <float>(x + c - 1)
            s = s + v
    if s > 0:
        oy[0] = <double>(sy / s)
        ox[0] = <double>(sx / s)
    else:
        oy[0] = <double>y
        ox[0] = <double>x


cdef float _newton_threshold() noexcept nogil:
    """The least float ``f`` with ``(double)f >= 1e-10``: pyFAI's bound on ``|denom|``."""
    cdef float t = <float>1e-10
    if <double>t < 1e-10:
        t = nextafterf(t, INFINITY)
    return t


cdef inline void _flush(
    const float* win, const double* pix, const Py_ssize_t* lk, int nl, float thr, double* out
) noexcept nogil:
    """Refine the ``nl`` maxima gathered in ``win`` and write seed ``lk[i]``'s result.

    The lanes from ``nl`` to ``CCDGRID_LANES - 1`` are computed and ignored.
    """
    cdef int i
    cdef int ok = ccdgrid_newton_lanes(win, thr, pix, lk, nl, out)
    if ok == (1 << nl) - 1:
        return
    for i in range(nl):
        if not (ok >> i) & 1:
            _centre_of_mass(win + 12 * i, <Py_ssize_t>pix[2 * i], <Py_ssize_t>pix[2 * i + 1],
                            &out[2 * lk[i]], &out[2 * lk[i] + 1])


cdef inline int _push(
    const float* base, Py_ssize_t h, Py_ssize_t w, size_t ylim, size_t xlim, Py_ssize_t y,
    Py_ssize_t x, Py_ssize_t k, float* win, double* pix, Py_ssize_t* lk, int nl, float thr,
    double* out
) noexcept nogil:
    """Climb from seed ``k`` at ``(y, x)``; queue the interior maximum reached as lane ``nl``.

    A maximum on the image border is written as it is. When the lanes are
    full they are refined and emptied. Returns the number of lanes in use.
    """
    # Seeds that are already maxima (a watershed's peaks) need no climb.
    if not ccdgrid_gather_maximum(base, w, y, x, ylim, xlim, win + 12 * nl):
        if not _climb(base, h, w, &y, &x):
            out[2 * k] = <double>y
            out[2 * k + 1] = <double>x
            return nl
        # not four floats wide when p[w + 2] would be past the image's end
        ccdgrid_copy_window(base + y * w + x, w, y * w + x <= (h - 2) * w + (w - 3),
                            win + 12 * nl)
    lk[nl] = k
    pix[2 * nl] = <double>y
    pix[2 * nl + 1] = <double>x
    nl += 1
    if nl == CCDGRID_LANES:
        _flush(win, pix, lk, nl, thr, out)
        nl = 0
    return nl


cdef inline bint _outside(Py_ssize_t y, Py_ssize_t x, Py_ssize_t h, Py_ssize_t w) noexcept nogil:
    """Whether ``(y, x)`` is outside ``[0, h) x [0, w)`` (negative values wrap to huge)."""
    return <size_t>y >= <size_t>h or <size_t>x >= <size_t>w


cdef Py_ssize_t _refine_range(
    const float* base, Py_ssize_t h, Py_ssize_t w, const int64_t* seeds, double* out,
    Py_ssize_t start, Py_ssize_t stop, Py_ssize_t n
) noexcept nogil:
    """Climb and refine seeds ``start .. stop - 1`` of ``n``; ``(y, x)`` pairs in, out.

    Returns -1, or the index of the first seed of the range outside the
    image, where it stops (``out`` is then partly written). Eight (AVX2) or
    four consecutive seeds that are all maxima are refined together, one
    per vector lane, straight from the image: the common case of peaks.
    Other seeds climb one by one and the interior maxima they reach are
    queued ``CCDGRID_LANES`` at a time for the same vector Newton step;
    maxima on the image border are written as they are.
    """
    cdef float win[12 * CCDGRID_LANES]
    cdef Py_ssize_t lk[CCDGRID_LANES]
    cdef double pix[2 * CCDGRID_LANES]
    cdef int nl = 0
    cdef float thr = _newton_threshold()
    cdef size_t ylim = h - 2 if h > 2 else 0
    cdef size_t xlim = w - 3 if w > 3 else 0
    cdef Py_ssize_t k = start
    cdef Py_ssize_t j, y, x
    cdef const int64_t* ahead
    # The eight-lane path computes offsets from the low 32 bits of y and w.
    if _AVX2 and h < _AVX2_MAX_SIDE and w < _AVX2_MAX_SIDE:
        while k + 8 <= stop:
            y = seeds[2 * k]
            x = seeds[2 * k + 1]
            # A block whose first seed is not a maximum would fail: seeds that
            # climb (a warm start's predictions) skip the vector path's
            # set-up, and its own request for the next windows is made here.
            if (<size_t>(y - 1) < ylim and <size_t>(x - 1) < xlim
                    and ccdgrid_centre_is_highest(base + y * w + x, w)):
                k += 8 * ccdgrid_refine_blocks(base, h, w, seeds + 2 * k, (stop - k) // 8,
                                               thr, out + 2 * k)
                if k + 8 > stop:
                    break
            elif k + 16 <= n:
                for j in range(k + 8, k + 16):
                    ccdgrid_prefetch_window(base, w, seeds[2 * j], seeds[2 * j + 1])
            # the block at k is not for the vector path: its seeds one by one
            for j in range(k, k + 8):
                y = seeds[2 * j]
                x = seeds[2 * j + 1]
                if _outside(y, x, h, w):
                    return j
                nl = _push(base, h, w, ylim, xlim, y, x, j, win, pix, lk, nl, thr, out)
            k += 8
    else:
        while k + 4 <= stop:
            if k + _AHEAD + 4 <= n:
                ahead = seeds + 2 * (k + _AHEAD)
                ccdgrid_prefetch_window(base, w, ahead[0], ahead[1])
                ccdgrid_prefetch_window(base, w, ahead[2], ahead[3])
                ccdgrid_prefetch_window(base, w, ahead[4], ahead[5])
                ccdgrid_prefetch_window(base, w, ahead[6], ahead[7])
            if not ccdgrid_refine_four(base, w, ylim, xlim, seeds + 2 * k, thr, out + 2 * k):
                for j in range(k, k + 4):
                    y = seeds[2 * j]
                    x = seeds[2 * j + 1]
                    if _outside(y, x, h, w):
                        return j
                    nl = _push(base, h, w, ylim, xlim, y, x, j, win, pix, lk, nl, thr, out)
            k += 4
    for j in range(k, stop):
        y = seeds[2 * j]
        x = seeds[2 * j + 1]
        if _outside(y, x, h, w):
            return j
        nl = _push(base, h, w, ylim, xlim, y, x, j, win, pix, lk, nl, thr, out)
    if nl:
        # Unused lanes: zeros, any finite values would do.
        memset(win + 12 * nl, 0, 12 * (CCDGRID_LANES - nl) * sizeof(float))
        _flush(win, pix, lk, nl, thr, out)
    return -1


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
                ccdgrid_prefetch_window(base, w, seeds[k + _AHEAD, 0], seeds[k + _AHEAD, 1])
            y = <Py_ssize_t>seeds[k, 0]
            x = <Py_ssize_t>seeds[k, 1]
            _climb(base, h, w, &y, &x)
            res[k, 0] = y
            res[k, 1] = x
    return out


def refine_peaks(const float[:, ::1] image, const int64_t[:, ::1] seeds, int nthreads=1):
    """Climb and refine every seed; see :func:`ccdgrid.bilinear.refine_peaks`.

    Parameters
    ----------
    image : ndarray of shape (H, W), float32, C-contiguous
    seeds : ndarray of shape (N, 2), int64, C-contiguous
        Checked here, in the same pass as the refinement: a separate pass
        over 10,000 seeds cost a tenth of the refinement.
    nthreads : int
        OpenMP threads, 0 for OpenMP's default; batches of fewer than 8192
        seeds use one. The results do not depend on it.

    Returns
    -------
    out : ndarray of shape (N, 2), float64
        Refined ``(y, x)`` in index coordinates; meaningless when ``bad >= 0``.
    bad : int
        Index of the first seed outside ``[0, H) x [0, W)``, or -1.
    """
    cdef Py_ssize_t n = seeds.shape[0]
    out = np.empty((n, 2), dtype=np.float64)
    if n == 0:
        return out, -1
    cdef double[:, ::1] res = out
    cdef const float* base = &image[0, 0]
    cdef const int64_t* sp = &seeds[0, 0]
    cdef double* op = &res[0, 0]
    cdef Py_ssize_t h = image.shape[0]
    cdef Py_ssize_t w = image.shape[1]
    cdef Py_ssize_t nchunk = (n + _CHUNK - 1) // _CHUNK
    cdef Py_ssize_t c
    cdef Py_ssize_t bad = -1
    cdef Py_ssize_t[::1] firsts
    if nthreads <= 0:
        nthreads = ccdgrid_max_threads()
    if n < _REFINE_PARALLEL_MIN or nthreads < 2:
        with nogil:
            bad = _refine_range(base, h, w, sp, op, 0, n, n)
        return out, bad
    firsts = np.empty(nchunk, dtype=np.intp)
    with nogil:
        for c in prange(nchunk, schedule="dynamic", chunksize=1, num_threads=nthreads):
            firsts[c] = _refine_range(base, h, w, sp, op, c * _CHUNK, min((c + 1) * _CHUNK, n), n)
        for c in range(nchunk):
            if firsts[c] >= 0:
                bad = firsts[c]
                break
    return out, bad


def use_avx2(enabled=None):
    """Whether :func:`refine_peaks` takes the eight-lane AVX2 path.

    Parameters
    ----------
    enabled : bool or None
        None asks; False forces the four-lane path (for tests: both paths
        give the same results); True restores the AVX2 path where the CPU
        has it.

    Returns
    -------
    bool
        The setting in force after the call.
    """
    global _AVX2
    if enabled is not None:
        _AVX2 = bool(enabled) and ccdgrid_avx2_usable()
    return bool(_AVX2)


def climb_one(const float[:, ::1] image, Py_ssize_t y, Py_ssize_t x):
    """:func:`climb` for one seed ``(y, x)`` inside the image; returns ``(y, x)`` ints.

    For per-call use (pyFAI's ``cp_local_maxi``) without building arrays.
    """
    _climb(&image[0, 0], image.shape[0], image.shape[1], &y, &x)
    return y, x


def refine_one(const float[:, ::1] image, Py_ssize_t y, Py_ssize_t x):
    """:func:`refine_peaks` for one seed ``(y, x)`` inside the image; returns ``(y, x)`` floats.

    For per-call use (pyFAI's ``local_maxi``) without building arrays.
    """
    cdef int64_t seed[2]
    cdef double res[2]
    seed[0] = y
    seed[1] = x
    # the caller checked the seed: no index comes back
    _refine_range(&image[0, 0], image.shape[0], image.shape[1], seed, res, 0, 1, 1)
    return res[0], res[1]
