"""Compiled twin of :mod:`ccdgrid._reference.holefit`: batched blurred-disc fits.

Every hole is fitted by its own damped Gauss-Newton loop, in one pass over its
window pixels per iteration: model, residual, the normal equations and the
gradient are accumulated together, the 8x8 system is solved by Cholesky, and
the hole stops as soon as its step is below the tolerance. The per-pixel work
is one branch-free loop the compiler vectorises (its own exp, see
``ccdgrid_exp_neg``). The warm passes (:func:`warm_first_pass`,
:func:`warm_weighted_pass`) run a whole recalibration fit per hole in one
go: no (N, P) array in between. No array is allocated per iteration.

Preconditions (guaranteed by :func:`ccdgrid.centres.fit_hole_profiles`,
trusted here): ``p0`` is C-contiguous ``(N, 8)`` float64; ``data`` and
``weight`` C-contiguous ``(N, P)`` float64 with finite values and
``weight >= 0``; ``ok`` C-contiguous ``(N, P)`` bool, ``outer`` and
``inner`` C-contiguous ``(P,)`` bool; ``yy`` and ``xx`` C-contiguous
``(P,)`` float64; ``var_bg`` C-contiguous ``(N,)`` float64; ``half > 0``;
``iterations >= 0``.
"""

from libc.math cimport INFINITY, NAN, fabs, isfinite, pow, sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

import numpy as np

from cython.parallel cimport prange

__all__ = [
    "clip_weights",
    "edge_variances",
    "gauss_newton",
    "gaussian_tail",
    "sector_asymmetry",
    "warm_first_pass",
    "warm_weighted_pass",
]

cdef enum:
    NPAR = 8  # cy, cx, R, s, a, b0, by, bx
    NSCRATCH = 10  # per-pixel arrays of one hole's fit, see _fit_one

# Threads pay only for large batches: a parallel loop waits for its slowest
# thread, and on a busy machine a descheduled thread costs milliseconds.
# One pixel of one iteration costs ~25 ns: below ~2 ms of work stay serial.
cdef Py_ssize_t _PARALLEL_MIN_WORK = 100_000


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define CCDGRID_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
    #else
    #define CCDGRID_CLONES
    #endif
    /* No floating-point exceptions are looked at here: let the compiler turn
       the selections of the loops below into blends (vector code). No fused
       multiply-adds either: the AVX-512 and AVX2 copies then give the same
       results as the baseline ones, bit for bit. The AVX-512 copies took the
       warm start's fits of 1504 holes at 4096² from 28 to 21 ms on a Zen 5
       core. */
    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC push_options
    #pragma GCC optimize("no-trapping-math", "fp-contract=off")
    #endif
    #define CCDGRID_INV_SQRT2PI 0.3989422804014327

    /* exp(x) for x <= 0 (NaN gives NaN), within 1 ulp of libm's: the model's
       Gaussian. Branch-free, so that the per-pixel loops vectorise (a libm
       call cannot be), and no compat wrapper. Cody-Waite reduction
       x = n ln2 + r, |r| <= ln2 / 2, with ln2 in two parts (n ln2_hi is
       exact), a degree-13 Taylor polynomial (truncation error 2e-18), and
       2^n put in the exponent bits: the low bits of x log2(e) + 1.5 2^52
       hold n. Below -708, where 2^n is no longer normal, exp is 0. */
    static inline double ccdgrid_exp_neg(double x)
    {
        const double shift = 0x1.8p52;
        double xc = x < -708.0 ? -708.0 : x;
        double kd = xc * 1.4426950408889634 + shift;
        double n = kd - shift;
        uint64_t bits;
        memcpy(&bits, &kd, sizeof bits);
        double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
        double p = 1.0 / 6227020800.0;
        p = p * r + 1.0 / 479001600.0;
        p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;
        p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        uint64_t sbits = (bits << 52) + ((uint64_t)1023 << 52);
        double scale;
        memcpy(&scale, &sbits, sizeof scale);
        return x < -708.0 ? 0.0 : p * scale;
    }

    /* The Gaussian tail Q(u) = erfc(u / sqrt(2)) / 2 as phi(u) * poly(t),
       t = 1 / (1 + 0.3 |u|), phi the normal density, given gauss = exp(-u^2/2):
       the exponential is the one the Jacobian needs anyway, so an edge costs
       one exp and a Horner polynomial instead of libm's erfc (two exps).
       Coefficients of poly (t^0 first): a weighted least-squares Chebyshev
       fit of Q / phi on 0 <= |u| <= 14, reweighted towards a uniform absolute
       error; the absolute error on Q is below 2.2e-15 for every u (checked
       against scipy's erfc). */
    static const double ccdgrid_tail_c[13] = {
        -0.00018995285985040633, 0.30366449237885146, 0.26758990642099595,
        0.4466923367994351, -0.4084644199470453, 1.751012791537267,
        -2.90414572950165, 3.967911255353158, -3.7638782400869104,
        2.2897851529933178, -0.8671682177337061, 0.1887140930921305,
        -0.0182093311304925,
    };

    static inline double ccdgrid_tail(double u, double gauss)
    {
        double t = 1.0 / (1.0 + 0.3 * fabs(u));
        double poly = ccdgrid_tail_c[12];
        for (int i = 11; i >= 0; i--) {
            poly = poly * t + ccdgrid_tail_c[i];
        }
        poly = poly * gauss * CCDGRID_INV_SQRT2PI;
        return u >= 0.0 ? poly : 1.0 - poly;
    }

    /* Distances of the pixels from (cy, cx). Apart from the loops below:
       with errno-setting math (the default) the compiler keeps a sqrt
       scalar, with a test and a call for negative arguments; the sum of
       squares is never negative, so on x86-64 the SSE2 instruction does two
       at a time (the same correctly rounded results). */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    static void ccdgrid_radii(const double *restrict yy, const double *restrict xx,
                              Py_ssize_t n, double cy, double cx, double *restrict r)
    {
        Py_ssize_t k = 0;
    #if defined(__SSE2__)
        const __m128d vcy = _mm_set1_pd(cy), vcx = _mm_set1_pd(cx);
        for (; k + 2 <= n; k += 2) {
            __m128d dy = _mm_sub_pd(_mm_loadu_pd(yy + k), vcy);
            __m128d dx = _mm_sub_pd(_mm_loadu_pd(xx + k), vcx);
            __m128d s = _mm_add_pd(_mm_mul_pd(dy, dy), _mm_mul_pd(dx, dx));
            _mm_storeu_pd(r + k, _mm_sqrt_pd(s));
        }
    #endif
        for (; k < n; k++) {
            double dy = yy[k] - cy, dx = xx[k] - cx;
            r[k] = sqrt(dy * dy + dx * dx);
        }
    }

    /* One Gauss-Newton iteration's per-pixel work for parameters p: the five
       nonlinear Jacobian columns (d/dcy, d/dcx, d/dR, d/ds, d/da) and the
       residual, all times the root weight sw, given the radii rr. */
    CCDGRID_CLONES
    static void ccdgrid_jacobian(const double *restrict yy, const double *restrict xx,
                                 const double *restrict data, const double *restrict sw,
                                 Py_ssize_t n, const double *restrict p,
                                 const double *restrict rr, double *restrict jac,
                                 double *restrict wres)
    {
        const double cy = p[0], cx = p[1], rad = p[2], inv_s = 1.0 / p[3], amp = p[4];
        const double b0 = p[5], by = p[6], bx = p[7];
        const double scale = amp * CCDGRID_INV_SQRT2PI * inv_s;
        for (Py_ssize_t k = 0; k < n; k++) {
            double dy = yy[k] - cy, dx = xx[k] - cx, r = rr[k];
            double u = (r - rad) * inv_s;
            double gauss = ccdgrid_exp_neg(-0.5 * u * u);
            double edge = ccdgrid_tail(u, gauss);
            double res = data[k] - (amp * edge + b0 + by * yy[k] + bx * xx[k]);
            double root = sw[k];
            double phi = root * scale * gauss;
            double q = phi / (r > 1e-9 ? r : 1e-9);
            jac[k] = q * dy;
            jac[n + k] = q * dx;
            jac[2 * n + k] = phi;
            jac[3 * n + k] = phi * u;
            jac[4 * n + k] = root * edge;
            wres[k] = root * res;
        }
    }

    /* The disc's edge profile E = Q((r - R) / s) at radii rr into edge. */
    CCDGRID_CLONES
    static void ccdgrid_edge(const double *restrict rr, Py_ssize_t n, double rad,
                             double inv_s, double *restrict edge)
    {
        for (Py_ssize_t k = 0; k < n; k++) {
            double u = (rr[k] - rad) * inv_s;
            edge[k] = ccdgrid_tail(u, ccdgrid_exp_neg(-0.5 * u * u));
        }
    }

    /* Q(u) elementwise. */
    CCDGRID_CLONES
    static void ccdgrid_tail_of(const double *restrict u, Py_ssize_t n, double *restrict out)
    {
        for (Py_ssize_t k = 0; k < n; k++) {
            out[k] = ccdgrid_tail(u[k], ccdgrid_exp_neg(-0.5 * u[k] * u[k]));
        }
    }

    /* Residuals data - model(p) at radii rr into res (edge: scratch). */
    CCDGRID_CLONES
    static void ccdgrid_residuals(const double *restrict yy, const double *restrict xx,
                                  const double *restrict data, Py_ssize_t n,
                                  const double *restrict p, const double *restrict rr,
                                  double *restrict res)
    {
        const double rad = p[2], inv_s = 1.0 / p[3], amp = p[4];
        const double b0 = p[5], by = p[6], bx = p[7];
        for (Py_ssize_t k = 0; k < n; k++) {
            double u = (rr[k] - rad) * inv_s;
            double edge = ccdgrid_tail(u, ccdgrid_exp_neg(-0.5 * u * u));
            res[k] = data[k] - (amp * edge + b0 + by * yy[k] + bx * xx[k]);
        }
    }
    /* Both: residuals into res and edge profile into edge, one tail each. */
    CCDGRID_CLONES
    static void ccdgrid_residuals_edge(const double *restrict yy, const double *restrict xx,
                                       const double *restrict data, Py_ssize_t n,
                                       const double *restrict p, const double *restrict rr,
                                       double *restrict res, double *restrict edge)
    {
        const double rad = p[2], inv_s = 1.0 / p[3], amp = p[4];
        const double b0 = p[5], by = p[6], bx = p[7];
        for (Py_ssize_t k = 0; k < n; k++) {
            double u = (rr[k] - rad) * inv_s;
            double e = ccdgrid_tail(u, ccdgrid_exp_neg(-0.5 * u * u));
            edge[k] = e;
            res[k] = data[k] - (amp * e + b0 + by * yy[k] + bx * xx[k]);
        }
    }
    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC pop_options
    #endif

    /* The dot products of the normal equations are a large part of a fit's
       work. Sixteen running sums, one per lane of a fixed-size inner loop,
       let the compiler use vector registers and keep several additions in
       flight, and fix the order of the additions whatever the instruction
       set (the same result with SSE2 or AVX2). On x86-64 gcc also builds an
       AVX-512 and an AVX2 copy and picks one at load time. */
    #define CCDGRID_DOT_LANES 16
    CCDGRID_CLONES
    static double ccdgrid_dot(const double *restrict a, const double *restrict b,
                              Py_ssize_t n)
    {
        double acc[CCDGRID_DOT_LANES] = {0.0};
        Py_ssize_t k = 0;
        for (; k + CCDGRID_DOT_LANES <= n; k += CCDGRID_DOT_LANES) {
            for (int l = 0; l < CCDGRID_DOT_LANES; l++) {
                acc[l] += a[k + l] * b[k + l];
            }
        }
        for (; k < n; k++) {
            acc[0] += a[k] * b[k];
        }
        for (int w = CCDGRID_DOT_LANES / 2; w > 0; w /= 2) {
            for (int l = 0; l < w; l++) {
                acc[l] += acc[l + w];
            }
        }
        return acc[0];
    }
    """
    double _dot "ccdgrid_dot" (const double* a, const double* b, Py_ssize_t n) noexcept nogil
    void _radii "ccdgrid_radii" (
        const double* yy, const double* xx, Py_ssize_t n, double cy, double cx, double* r
    ) noexcept nogil
    void _jacobian "ccdgrid_jacobian" (
        const double* yy, const double* xx, const double* data, const double* sw,
        Py_ssize_t n, const double* p, const double* rr, double* jac, double* wres
    ) noexcept nogil
    void _edge "ccdgrid_edge" (
        const double* rr, Py_ssize_t n, double rad, double inv_s, double* edge
    ) noexcept nogil
    void _tail_of "ccdgrid_tail_of" (const double* u, Py_ssize_t n, double* out) noexcept nogil
    void _model_residuals "ccdgrid_residuals" (
        const double* yy, const double* xx, const double* data, Py_ssize_t n,
        const double* p, const double* rr, double* res
    ) noexcept nogil
    void _residuals_edge "ccdgrid_residuals_edge" (
        const double* yy, const double* xx, const double* data, Py_ssize_t n,
        const double* p, const double* rr, double* res, double* edge
    ) noexcept nogil


cdef inline double _sum(const double* a, Py_ssize_t n) noexcept nogil:
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t k = 0
    while k + 4 <= n:
        s0 = s0 + a[k]
        s1 = s1 + a[k + 1]
        s2 = s2 + a[k + 2]
        s3 = s3 + a[k + 3]
        k = k + 4
    while k < n:
        s0 = s0 + a[k]
        k = k + 1
    return (s0 + s1) + (s2 + s3)


cdef inline void _clamp(double* p, double half) noexcept nogil:
    """Keep the centre within 0.6 ``half`` of the window centre, R and s positive."""
    cdef double lim = 0.6 * half
    p[0] = min(max(p[0], -lim), lim)
    p[1] = min(max(p[1], -lim), lim)
    p[2] = min(max(p[2], 0.5), half)
    p[3] = min(max(p[3], 0.2), half)


cdef inline bint _cholesky_solve(double* a, double* b) noexcept nogil:
    """Solve ``a x = b`` in place (``b`` becomes ``x``) for a symmetric 8x8 ``a``.

    Only the upper triangle of ``a`` is read; ``a`` is overwritten. Returns
    False, leaving ``b`` undefined, when ``a`` is not positive definite.
    """
    cdef int i, j, k
    cdef double s
    # a = U^T U, U upper triangular, stored in the upper triangle of a
    for i in range(NPAR):
        s = a[i * NPAR + i]
        for k in range(i):
            s = s - a[k * NPAR + i] * a[k * NPAR + i]
        if not s > 0.0:
            return False
        s = sqrt(s)
        a[i * NPAR + i] = s
        for j in range(i + 1, NPAR):
            for k in range(i):
                a[i * NPAR + j] = a[i * NPAR + j] - a[k * NPAR + i] * a[k * NPAR + j]
            a[i * NPAR + j] = a[i * NPAR + j] / s
    for i in range(NPAR):  # U^T z = b
        s = b[i]
        for k in range(i):
            s = s - a[k * NPAR + i] * b[k]
        b[i] = s / a[i * NPAR + i]
    for i in range(NPAR - 1, -1, -1):  # U x = z
        s = b[i]
        for k in range(i + 1, NPAR):
            s = s - a[i * NPAR + k] * b[k]
        b[i] = s / a[i * NPAR + i]
    return True


cdef inline double _residuals(
    const double* p, const double* data, const double* weight, const double* yy,
    const double* xx, Py_ssize_t npix, double* res, double* rr
) noexcept nogil:
    """Residuals ``data - model`` into ``res`` (every pixel); returns the weighted cost.

    ``rr`` is scratch for ``npix`` radii.
    """
    cdef double cost = 0.0
    cdef Py_ssize_t k
    _radii(yy, xx, npix, p[0], p[1], rr)
    _model_residuals(yy, xx, data, npix, p, rr, res)
    for k in range(npix):
        cost = cost + weight[k] * res[k] * res[k]
    return cost


cdef int _fit_one(
    double* p, const double* data, const double* weight, const double* yy,
    const double* xx, Py_ssize_t npix, double half, int iterations, double tol,
    double* scratch, double spike=INFINITY
) noexcept nogil:
    """Gauss-Newton iterations for one hole, ``p`` updated in place; returns the count.

    Pixels whose residual at the start exceeds ``spike`` (absolute) get no
    weight in any iteration (``weight`` itself is not changed).

    ``scratch`` holds NSCRATCH * npix doubles. The least-squares problem is
    written with root weights, ``sqrt(w) (data - f)``: each iteration stores
    the five nonlinear Jacobian columns and the residual, all times
    ``sqrt(w)``, per pixel (six stores, in one vectorised loop: see
    ``ccdgrid_jacobian``), then forms the normal equations as
    vectorised dot products. The columns of the background plane,
    ``sqrt(w) (1, y, x)``, are fixed: they are stored once and their own
    block of the normal equations is summed once.
    """
    cdef double* sw = scratch  # sqrt(w)
    cdef double* swy = scratch + npix  # sqrt(w) * y
    cdef double* swx = scratch + 2 * npix  # sqrt(w) * x
    cdef double* jac = scratch + 3 * npix  # 5 columns: sqrt(w) d/dcy, d/dcx, d/dR, d/ds, d/da
    cdef double* wres = scratch + 8 * npix  # sqrt(w) * residual
    cdef double* rr = scratch + 9 * npix  # distances from the centre
    cdef double a[NPAR * NPAR]
    cdef double fixed[6]
    cdef double g[NPAR]
    cdef double big
    cdef Py_ssize_t k
    cdef int it, i, j
    cdef bint ok
    for k in range(npix):
        sw[k] = sqrt(weight[k])
        swy[k] = sw[k] * yy[k]
        swx[k] = sw[k] * xx[k]
    fixed[0] = _sum(weight, npix)
    fixed[1] = _dot(sw, swy, npix)
    fixed[2] = _dot(sw, swx, npix)
    fixed[3] = _dot(swy, swy, npix)
    fixed[4] = _dot(swy, swx, npix)
    fixed[5] = _dot(swx, swx, npix)
    for it in range(iterations):
        _radii(yy, xx, npix, p[0], p[1], rr)
        _jacobian(yy, xx, data, sw, npix, p, rr, jac, wres)
        if it == 0 and spike < INFINITY:
            # the start's residuals are at hand: drop the spikes for good
            ok = False
            for k in range(npix):
                if fabs(wres[k]) > spike * sw[k]:
                    sw[k] = 0.0
                    swy[k] = 0.0
                    swx[k] = 0.0
                    wres[k] = 0.0
                    for i in range(5):
                        jac[i * npix + k] = 0.0
                    ok = True
            if ok:
                fixed[0] = _dot(sw, sw, npix)
                fixed[1] = _dot(sw, swy, npix)
                fixed[2] = _dot(sw, swx, npix)
                fixed[3] = _dot(swy, swy, npix)
                fixed[4] = _dot(swy, swx, npix)
                fixed[5] = _dot(swx, swx, npix)
        for i in range(5):
            for j in range(i, 5):
                a[i * NPAR + j] = _dot(jac + i * npix, jac + j * npix, npix)
            a[i * NPAR + 5] = _dot(jac + i * npix, sw, npix)
            a[i * NPAR + 6] = _dot(jac + i * npix, swy, npix)
            a[i * NPAR + 7] = _dot(jac + i * npix, swx, npix)
            g[i] = _dot(wres, jac + i * npix, npix)
        g[5] = _dot(wres, sw, npix)
        g[6] = _dot(wres, swy, npix)
        g[7] = _dot(wres, swx, npix)
        a[5 * NPAR + 5] = fixed[0]
        a[5 * NPAR + 6] = fixed[1]
        a[5 * NPAR + 7] = fixed[2]
        a[6 * NPAR + 6] = fixed[3]
        a[6 * NPAR + 7] = fixed[4]
        a[7 * NPAR + 7] = fixed[5]
        ok = True
        for i in range(NPAR):
            # light Levenberg-Marquardt damping, as the numpy twin
            a[i * NPAR + i] = a[i * NPAR + i] + (1e-3 * a[i * NPAR + i] + 1e-12)
            ok = ok and isfinite(g[i])
            for j in range(i, NPAR):
                ok = ok and isfinite(a[i * NPAR + j])
        if ok:
            ok = _cholesky_solve(a, g)
        for i in range(NPAR):
            if not ok or not isfinite(g[i]):
                g[i] = 0.0
        for i in range(4):  # geometric steps bounded to a pixel
            g[i] = min(max(g[i], -1.0), 1.0)
        big = 0.0
        for i in range(NPAR):
            p[i] = p[i] + g[i]
        for i in range(4):
            big = max(big, fabs(g[i]))
        _clamp(p, half)
        if big <= tol and fabs(g[4]) <= tol * fabs(p[4]):
            return it + 1
    return iterations


def gaussian_tail(u):
    """``erfc(u / sqrt(2)) / 2`` elementwise, as the fits evaluate it (tests).

    Parameters
    ----------
    u : array_like, float64

    Returns
    -------
    ndarray of the shape of ``u``, float64
    """
    arr = np.ascontiguousarray(u, dtype=np.float64)
    out = np.empty_like(arr)
    cdef const double[::1] src = arr.reshape(-1)
    cdef double[::1] dst = out.reshape(-1)
    if src.shape[0]:
        with nogil:
            _tail_of(&src[0], src.shape[0], &dst[0])
    return out


def gauss_newton(p0, data, weight, yy, xx, double half, int iterations, double tol):
    """Fit the blurred-disc model to every hole (see ``ccdgrid._reference.holefit``).

    Parameters
    ----------
    p0 : ndarray of shape (N, 8), float64, C-contiguous
        Starting parameters ``(cy, cx, R, s, a, b0, by, bx)`` per hole,
        positions relative to the window centre, px.
    data, weight : ndarray of shape (N, P), float64, C-contiguous
        Pixel values and least-squares weights (>= 0) per hole.
    yy, xx : ndarray of shape (P,), float64, C-contiguous
        Pixel offsets (y, x) from the window centre, px.
    half : float
        Window radius, px: bounds the centre (0.6 ``half``), R and s.
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
    cdef const double[:, ::1] d = data
    cdef const double[:, ::1] w = weight
    cdef const double[::1] y = yy
    cdef const double[::1] x = xx
    out_p = np.array(p0, dtype=np.float64, order="C", copy=True)
    cdef Py_ssize_t n = out_p.shape[0]
    cdef Py_ssize_t npix = d.shape[1]
    out_cost = np.empty(n, dtype=np.float64)
    out_res = np.empty((n, npix), dtype=np.float64)
    out_steps = np.empty(n, dtype=np.int64)
    cdef double[:, ::1] pv = out_p
    cdef double[::1] cv = out_cost
    cdef double[:, ::1] rv = out_res
    cdef int64_t[::1] sv = out_steps
    cdef Py_ssize_t k
    cdef bint threads = n * npix * max(iterations, 1) >= _PARALLEL_MIN_WORK
    if n == 0 or npix == 0:
        out_cost[:] = 0.0
        out_res[:] = 0.0
        out_steps[:] = 0
        return out_p, out_cost, out_res, out_steps
    cdef double* scratch
    with nogil:
        for k in prange(n, schedule="dynamic", chunksize=4, use_threads_if=threads):
            scratch = <double*>malloc(NSCRATCH * npix * sizeof(double))
            if scratch == NULL:
                sv[k] = -1
                cv[k] = 0.0
            else:
                sv[k] = _fit_one(
                    &pv[k, 0], &d[k, 0], &w[k, 0], &y[0], &x[0], npix, half, iterations, tol,
                    scratch,
                )
                cv[k] = _residuals(
                    &pv[k, 0], &d[k, 0], &w[k, 0], &y[0], &x[0], npix, &rv[k, 0], scratch
                )
                free(scratch)
    if n and out_steps.min() < 0:
        raise MemoryError("no memory for the hole fits' scratch arrays")
    return out_p, out_cost, out_res, out_steps


cdef inline double _select(double* v, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """The ``k``-th smallest of ``v[:n]`` (``v`` is reordered: quickselect, Hoare partition).

    On return ``v[:k] <= v[k] <= v[k + 1:n]``.
    """
    cdef Py_ssize_t lo = 0, hi = n - 1, i, j
    cdef double pivot, t
    while lo < hi:
        pivot = v[lo + (hi - lo) // 2]
        i = lo
        j = hi
        while i <= j:
            while v[i] < pivot:
                i = i + 1
            while pivot < v[j]:
                j = j - 1
            if i <= j:
                t = v[i]
                v[i] = v[j]
                v[j] = t
                i = i + 1
                j = j - 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return v[k]


cdef inline double _robust_var(double* v, Py_ssize_t count) noexcept nogil:
    """``(1.4826 median(v[:count]))**2`` (NaN below 5 values); ``v`` is reordered."""
    cdef Py_ssize_t k
    cdef double lo, hi
    if count < 5:
        return NAN
    lo = _select(v, count, (count - 1) // 2)
    hi = lo
    if count % 2 == 0:
        # the upper middle value: the smallest of those after the lower one
        hi = v[count // 2]
        for k in range(count // 2 + 1, count):
            hi = min(hi, v[k])
    lo = 1.4826 * (0.5 * (lo + hi))
    return lo * lo


def edge_variances(p, res, ok, yy, xx):
    """Noise variance of the background and of the disc's top per hole, from residuals.

    Parameters
    ----------
    p : ndarray of shape (N, 8), float64, C-contiguous
        Fitted parameters ``(cy, cx, R, s, a, b0, by, bx)``.
    res : ndarray of shape (N, P), float64, C-contiguous
        Residuals ``data - model``.
    ok : ndarray of shape (N, P), bool, C-contiguous
        Usable pixels.
    yy, xx : ndarray of shape (P,), float64, C-contiguous
        Pixel offsets from the window centre, px.

    Returns
    -------
    var_bg, var_in : ndarray of shape (N,), float64
        ``(1.4826 median |res|)**2`` over the usable pixels where the model's
        edge profile ``E = Q((r - R) / s)`` is below 0.02 (background) and
        above 0.9 (the disc's top); NaN where fewer than 5 pixels qualify.
    """
    cdef const double[:, ::1] pv = p
    cdef const double[:, ::1] rv = res
    cdef const unsigned char[:, ::1] okv = ok.view(np.uint8)
    cdef const double[::1] y = yy
    cdef const double[::1] x = xx
    cdef Py_ssize_t n = pv.shape[0]
    cdef Py_ssize_t npix = rv.shape[1]
    out_bg = np.empty(n, dtype=np.float64)
    out_in = np.empty(n, dtype=np.float64)
    cdef double[::1] bg = out_bg
    cdef double[::1] top = out_in
    cdef Py_ssize_t i, k, nb, nt
    cdef double* buf
    failed = np.zeros(n, dtype=np.uint8)
    cdef unsigned char[::1] fv = failed
    if n == 0:
        return out_bg, out_in
    if npix == 0:
        out_bg[:] = np.nan
        out_in[:] = np.nan
        return out_bg, out_in
    cdef bint threads = n * npix >= _PARALLEL_MIN_WORK
    with nogil:
        for i in prange(n, schedule="static", use_threads_if=threads):
            # radii, then edges, then |res| of the background and of the top
            buf = <double*>malloc(3 * npix * sizeof(double))
            if buf == NULL:
                fv[i] = 1
            else:
                _radii(&y[0], &x[0], npix, pv[i, 0], pv[i, 1], buf)
                _edge(buf, npix, pv[i, 2], 1.0 / pv[i, 3], buf + npix)
                nb = 0
                nt = 0
                for k in range(npix):
                    if okv[i, k]:
                        if buf[npix + k] < 0.02:
                            buf[nb] = fabs(rv[i, k])  # behind k: radii no longer needed
                            nb = nb + 1
                        elif buf[npix + k] > 0.9:
                            buf[2 * npix + nt] = fabs(rv[i, k])
                            nt = nt + 1
                bg[i] = _robust_var(buf, nb)
                top[i] = _robust_var(buf + 2 * npix, nt)
                free(buf)
    if failed.any():
        raise MemoryError("no memory for the noise model's scratch arrays")
    return out_bg, out_in


def clip_weights(p, res, ok, yy, xx, var_bg, double slope, double exponent, double nsigma):
    """Noise model per pixel, outlier clip and least-squares weights.

    Parameters
    ----------
    p : ndarray of shape (N, 8), float64, C-contiguous
    res : ndarray of shape (N, P), float64, C-contiguous
        Residuals ``data - model`` of the model the pixels are judged against.
    ok : ndarray of shape (N, P), bool, C-contiguous
    yy, xx : ndarray of shape (P,), float64, C-contiguous
    var_bg : ndarray of shape (N,), float64, C-contiguous
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
    cdef const double[:, ::1] pv = p
    cdef const double[:, ::1] rv = res
    cdef const unsigned char[:, ::1] okv = ok.view(np.uint8)
    cdef const double[::1] y = yy
    cdef const double[::1] x = xx
    cdef const double[::1] vb = var_bg
    cdef Py_ssize_t n = pv.shape[0]
    cdef Py_ssize_t npix = rv.shape[1]
    out_var = np.empty((n, npix), dtype=np.float64)
    out_keep = np.empty((n, npix), dtype=bool)
    out_w = np.empty((n, npix), dtype=np.float64)
    cdef double[:, ::1] var = out_var
    cdef unsigned char[:, ::1] keep = out_keep.view(np.uint8)
    cdef double[:, ::1] wv = out_w
    cdef double limit = nsigma * nsigma
    cdef double amp, sig, v, r2
    cdef bint threads = n * npix >= _PARALLEL_MIN_WORK
    cdef bint sqrt_power = exponent == 1.5
    cdef Py_ssize_t i, k
    if n == 0 or npix == 0:
        return out_var, out_keep, out_w
    with nogil:
        for i in prange(n, schedule="static", use_threads_if=threads):
            # the edges go to the weights' row first (scratch)
            _radii(&y[0], &x[0], npix, pv[i, 0], pv[i, 1], &var[i, 0])
            _edge(&var[i, 0], npix, pv[i, 2], 1.0 / pv[i, 3], &wv[i, 0])
            amp = pv[i, 4]
            for k in range(npix):
                sig = max(amp * wv[i, k], 0.0)
                # x**1.5 as x sqrt(x): the model's exponent, at a third of pow's cost
                v = vb[i] + slope * (sig * sqrt(sig) if sqrt_power else pow(sig, exponent))
                var[i, k] = v
                r2 = rv[i, k] * rv[i, k]
                if okv[i, k] and r2 <= limit * v:
                    keep[i, k] = 1
                    wv[i, k] = 1.0 / v
                else:
                    keep[i, k] = 0
                    wv[i, k] = 0.0
    return out_var, out_keep, out_w


cdef double _median_of(
    const double* v, const unsigned char* ok, const unsigned char* sel, Py_ssize_t npix,
    double* buf
) noexcept nogil:
    """Median of ``v`` over the pixels both ``ok`` and ``sel`` (0 when there is none)."""
    cdef Py_ssize_t k, m = 0
    cdef double lo, hi
    for k in range(npix):
        if ok[k] and sel[k]:
            buf[m] = v[k]
            m = m + 1
    if m == 0:
        return 0.0
    lo = _select(buf, m, (m - 1) // 2)
    hi = lo
    if m % 2 == 0:
        hi = buf[m // 2]
        for k in range(m // 2 + 1, m):
            hi = min(hi, buf[k])
    return 0.5 * (lo + hi)


def warm_first_pass(
    p0, data, ok, yy, xx, outer, inner, double half, bint start_levels, double spike,
    int iterations, double tol
):
    """First pass of a warm fit: unweighted iterations on the raw pixels, then noise statistics.

    Parameters
    ----------
    p0 : ndarray of shape (N, 8), float64, C-contiguous
        Start ``(cy, cx, R, s, a, b0, by, bx)`` per hole.
    data : ndarray of shape (N, P), float64, C-contiguous
        Raw pixel values.
    ok : ndarray of shape (N, P), bool, C-contiguous
        Usable pixels.
    yy, xx : ndarray of shape (P,), float64, C-contiguous
        Pixel offsets from the window centre, px.
    outer, inner : ndarray of shape (P,), bool, C-contiguous
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
    cdef const double[:, ::1] d = data
    cdef const unsigned char[:, ::1] okv = ok.view(np.uint8)
    cdef const double[::1] y = yy
    cdef const double[::1] x = xx
    cdef const unsigned char[::1] ov = outer.view(np.uint8)
    cdef const unsigned char[::1] iv = inner.view(np.uint8)
    out_p = np.array(p0, dtype=np.float64, order="C", copy=True)
    cdef Py_ssize_t n = out_p.shape[0]
    cdef Py_ssize_t npix = d.shape[1]
    out_bg = np.full(n, np.nan)
    out_in = np.full(n, np.nan)
    failed = np.zeros(n, dtype=np.uint8)
    cdef double[:, ::1] pv = out_p
    cdef double[::1] bg = out_bg
    cdef double[::1] top = out_in
    cdef unsigned char[::1] fv = failed
    cdef bint threads = n * npix * (max(iterations, 0) + 3) >= _PARALLEL_MIN_WORK
    cdef Py_ssize_t i, k, nb, nt
    cdef double* scratch
    cdef double* w
    cdef double* res
    cdef double* edge
    cdef double* buf
    if n == 0 or npix == 0:
        return out_p, out_bg, out_in
    with nogil:
        for i in prange(n, schedule="dynamic", chunksize=4, use_threads_if=threads):
            scratch = <double*>malloc((NSCRATCH + 4) * npix * sizeof(double))
            if scratch == NULL:
                fv[i] = 1
            else:
                w = scratch + NSCRATCH * npix
                res = w + npix
                edge = res + npix
                buf = edge + npix
                if start_levels:
                    pv[i, 5] = _median_of(&d[i, 0], &okv[i, 0], &ov[0], npix, buf)
                    pv[i, 4] = max(
                        _median_of(&d[i, 0], &okv[i, 0], &iv[0], npix, buf) - pv[i, 5], 1e-6
                    )
                for k in range(npix):
                    w[k] = 1.0 if okv[i, k] else 0.0
                # a hot pixel on the edge would pull the unweighted fit by up to
                # a pixel: outliers far beyond any noise or start error stay out
                _fit_one(
                    &pv[i, 0], &d[i, 0], w, &y[0], &x[0], npix, half, iterations, tol, scratch,
                    spike * fabs(pv[i, 4]),
                )
                # residuals and edges at the fitted parameters (scratch: the radii)
                _radii(&y[0], &x[0], npix, pv[i, 0], pv[i, 1], scratch)
                _residuals_edge(&y[0], &x[0], &d[i, 0], npix, &pv[i, 0], scratch, res, edge)
                nb = 0
                nt = 0
                for k in range(npix):
                    if okv[i, k]:
                        if edge[k] < 0.02:
                            buf[nb] = fabs(res[k])
                            nb = nb + 1
                        elif edge[k] > 0.9:
                            scratch[nt] = fabs(res[k])  # the radii are no longer needed
                            nt = nt + 1
                bg[i] = _robust_var(buf, nb)
                top[i] = _robust_var(scratch, nt)
                free(scratch)
    if failed.any():
        raise MemoryError("no memory for the hole fits' scratch arrays")
    return out_p, out_bg, out_in


cdef inline Py_ssize_t _clip(
    const double* res, const double* var, const unsigned char* ok, Py_ssize_t npix,
    double limit, double* w
) noexcept nogil:
    """Weights ``1 / var`` of the usable pixels with ``res**2 <= limit var``, else 0; the count."""
    cdef Py_ssize_t k, kept = 0
    for k in range(npix):
        if ok[k] and res[k] * res[k] <= limit * var[k]:
            w[k] = 1.0 / var[k]
            kept = kept + 1
        else:
            w[k] = 0.0
    return kept


def warm_weighted_pass(
    p1, data, ok, yy, xx, double half, var_bg, double slope, double exponent, double nsigma,
    int iterations, double tol
):
    """Weighted pass of a warm fit: noise model, clip, fit, clip again, sector asymmetry.

    The pixels are judged against the model ``p1`` with the variance
    ``var_bg + slope max(a E, 0)**exponent`` (see :func:`clip_weights`),
    fitted with weights 1 / variance, judged again against the new model, and
    the holes whose kept pixels changed are fitted again from there.

    Parameters
    ----------
    p1 : ndarray of shape (N, 8), float64, C-contiguous
        Parameters of the first pass.
    data : ndarray of shape (N, P), float64, C-contiguous
    ok : ndarray of shape (N, P), bool, C-contiguous
    yy, xx : ndarray of shape (P,), float64, C-contiguous
    half : float
        Window radius, px.
    var_bg : ndarray of shape (N,), float64, C-contiguous
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
    cdef const double[:, ::1] d = data
    cdef const unsigned char[:, ::1] okv = ok.view(np.uint8)
    cdef const double[::1] y = yy
    cdef const double[::1] x = xx
    cdef const double[::1] vb = var_bg
    out_p = np.array(p1, dtype=np.float64, order="C", copy=True)
    cdef Py_ssize_t n = out_p.shape[0]
    cdef Py_ssize_t npix = d.shape[1]
    out_cost = np.zeros(n)
    out_kept = np.zeros(n, dtype=np.int64)
    out_outliers = np.zeros(n, dtype=np.int64)
    out_disc = np.zeros(n)
    out_ring = np.zeros(n)
    failed = np.zeros(n, dtype=np.uint8)
    cdef double[:, ::1] pv = out_p
    cdef double[::1] cv = out_cost
    cdef int64_t[::1] kv = out_kept
    cdef int64_t[::1] outv = out_outliers
    cdef double[::1] dv = out_disc
    cdef double[::1] gv = out_ring
    cdef unsigned char[::1] fv = failed
    cdef double limit = nsigma * nsigma
    cdef bint sqrt_power = exponent == 1.5
    cdef bint threads = n * npix * (2 * max(iterations, 0) + 3) >= _PARALLEL_MIN_WORK
    cdef Py_ssize_t i, k, usable, kept
    cdef double sig, amp
    cdef bint changed, now
    cdef double* scratch
    cdef double* w
    cdef double* res
    cdef double* var
    if n == 0 or npix == 0:
        return out_p, out_cost, out_kept, out_outliers, out_disc, out_ring
    with nogil:
        for i in prange(n, schedule="dynamic", chunksize=4, use_threads_if=threads):
            scratch = <double*>malloc((NSCRATCH + 3) * npix * sizeof(double))
            if scratch == NULL:
                fv[i] = 1
            else:
                w = scratch + NSCRATCH * npix
                res = w + npix
                var = res + npix
                # the noise model and the residuals of the first pass's model
                _radii(&y[0], &x[0], npix, pv[i, 0], pv[i, 1], scratch)
                _residuals_edge(&y[0], &x[0], &d[i, 0], npix, &pv[i, 0], scratch, res, var)
                amp = pv[i, 4]
                usable = 0
                for k in range(npix):
                    sig = max(amp * var[k], 0.0)
                    sig = sig * sqrt(sig) if sqrt_power else pow(sig, exponent)
                    var[k] = vb[i] + slope * sig
                    usable = usable + (1 if okv[i, k] else 0)
                kept = _clip(res, var, &okv[i, 0], npix, limit, w)
                _fit_one(
                    &pv[i, 0], &d[i, 0], w, &y[0], &x[0], npix, half, iterations, tol, scratch
                )
                cv[i] = _residuals(&pv[i, 0], &d[i, 0], w, &y[0], &x[0], npix, res, scratch)
                # clip again against the refined model: the first one may have
                # been pulled by masked or dead pixels and dropped good ones
                changed = False
                for k in range(npix):
                    now = okv[i, k] != 0 and res[k] * res[k] <= limit * var[k]
                    if now != (w[k] > 0.0):
                        changed = True
                        break
                if changed:
                    kept = _clip(res, var, &okv[i, 0], npix, limit, w)
                    _fit_one(
                        &pv[i, 0], &d[i, 0], w, &y[0], &x[0], npix, half, iterations, tol,
                        scratch,
                    )
                    cv[i] = _residuals(&pv[i, 0], &d[i, 0], w, &y[0], &x[0], npix, res, scratch)
                kv[i] = kept
                outv[i] = usable - kept
                _sectors(&pv[i, 0], res, w, &y[0], &x[0], npix, half, &dv[i], &gv[i])
                free(scratch)
    if failed.any():
        raise MemoryError("no memory for the hole fits' scratch arrays")
    return out_p, out_cost, out_kept, out_outliers, out_disc, out_ring


cdef inline int _sector(double dy, double dx) noexcept nogil:
    """``floor((atan2(dy, dx) + pi) * 4 / pi) % 8`` by comparisons (no atan2).

    Exact, signed zeros included, except for offsets exactly on a diagonal,
    where rounding decides atan2's side.
    """
    if dy >= 0.0:
        if dx > 0.0 or (dx == 0.0 and dy == 0.0):
            return 4 if (dy < dx or dy == 0.0) else 5
        if dx == 0.0:
            return 6
        if dy == 0.0:
            return 0  # atan2 = pi
        return 6 if dy > -dx else 7
    if dx < 0.0:
        return 0 if -dy < -dx else 1
    return 2 if -dy > dx else 3


cdef void _sectors(
    const double* p, const double* res, const double* weight, const double* yy,
    const double* xx, Py_ssize_t npix, double half, double* disc, double* ring
) noexcept nogil:
    """One hole of :func:`sector_asymmetry`: its ``disc`` and ``ring`` values."""
    cdef double dsum[8]
    cdef double rsum[8]
    cdef int64_t dcount[8]
    cdef int64_t rcount[8]
    cdef double dy, dx, r, best_d = 0.0, best_r = 0.0
    cdef double inner = p[2] + 1.5 * p[3], outer = p[2] + 2.5 * p[3]
    cdef Py_ssize_t k
    cdef int s
    for s in range(8):
        dsum[s] = 0.0
        rsum[s] = 0.0
        dcount[s] = 0
        rcount[s] = 0
    for k in range(npix):
        if not weight[k] > 0.0:
            continue
        dy = yy[k] - p[0]
        dx = xx[k] - p[1]
        r = sqrt(dy * dy + dx * dx)
        if r <= inner:
            s = _sector(dy, dx)
            dsum[s] = dsum[s] + res[k]
            dcount[s] = dcount[s] + 1
        elif r > outer and r <= half:
            s = _sector(dy, dx)
            rsum[s] = rsum[s] + res[k] * sqrt(weight[k])
            rcount[s] = rcount[s] + 1
    for s in range(8):
        best_d = max(best_d, fabs(dsum[s] / max(dcount[s], 1)))
        best_r = max(best_r, fabs(rsum[s]) / sqrt(<double>max(rcount[s], 1)))
    disc[0] = best_d / max(fabs(p[4]), 1e-12)
    ring[0] = best_r


def sector_asymmetry(p, res, weight, yy, xx, double half):
    """One-sidedness of the residuals over 8 sectors (see ``ccdgrid._reference.holefit``).

    Parameters
    ----------
    p : ndarray of shape (N, 8), float64, C-contiguous
    res, weight : ndarray of shape (N, P), float64, C-contiguous
    yy, xx : ndarray of shape (P,), float64, C-contiguous
    half : float

    Returns
    -------
    disc, ring : ndarray of shape (N,), float64
    """
    cdef const double[:, ::1] pv = p
    cdef const double[:, ::1] rv = res
    cdef const double[:, ::1] wv = weight
    cdef const double[::1] y = yy
    cdef const double[::1] x = xx
    cdef Py_ssize_t n = pv.shape[0]
    cdef Py_ssize_t npix = rv.shape[1]
    out_disc = np.empty(n, dtype=np.float64)
    out_ring = np.empty(n, dtype=np.float64)
    cdef double[::1] dv = out_disc
    cdef double[::1] gv = out_ring
    cdef Py_ssize_t i
    with nogil:
        for i in range(n):
            _sectors(&pv[i, 0], &rv[i, 0], &wv[i, 0], &y[0], &x[0], npix, half, &dv[i], &gv[i])
    return out_disc, out_ring
