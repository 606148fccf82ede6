"""Exact pixel splitting: the sparse distortion-correction matrix, and applying it.

Geometry (pyFAI coordinates, in pixels): corner ``(i, j)`` of the input pixel
grid nominally sits at ``(i, j)`` and truly at ``(i + dy[i, j], j + dx[i, j])``.
Input pixel ``(i, j)`` is the quadrilateral of its true corners A = (i, j),
B = (i+1, j), C = (i+1, j+1), D = (i, j+1); output pixel ``(k, l)`` is the unit
square ``[k, k+1] x [l, l+1]``. The weight of (output, input) is the area of
their intersection divided by the area of the quadrilateral.

The areas are exact (to rounding). In the common case of a smooth
distortion (99.5 % of the pixels of the benchmark's field), a pixel is a
near-square whose four corners fall in the four cells of a 2 x 2 block, one
each: the two cut lines then divide it into four quadrilaterals whose areas
are half the cross product of their diagonals (:func:`near_square_weights`,
one division, vectorised over a row). Otherwise Green's theorem is
applied edge by edge: the area of a polygon P inside the cell
[k, k+1] x [l, l+1] is ``-∮_P g(y) h(x) dy`` with g the indicator of
[k, k+1] and h(x) = clip(x - l, 0, 1). Each edge is cut at the integer rows
it crosses, then each piece at the integer columns; on a sub-piece h is
linear, so its integral is (signed height) x h(mid-point), and the columns
to its left get the full signed height (kept as a difference array and
summed once per row). This is the exact counterpart of pyFAI's row-strip
splitting, which treats the edge as flat within each row strip (PYFAI_NOTES
§4.4); no polygon is built, and it holds for concave quadrilaterals too.

The matrix is built in compressed-sparse-row form (one row per output
pixel) in two passes. A survey checks every input pixel once (mask,
finiteness, degeneracy, near-square or not), and records for every input
row the output rows its pixels reach and an upper bound of the non-zeros. The output rows are
then cut into bands of a few dozen; for each band, in turn, the input rows
that reach it are split, keeping the pieces that fall in the band, and a
counting sort by output pixel puts them in CSR order (within an output
pixel, by increasing input pixel). A band learns where its entries start
once the band before it has counted its own, so bands are built in
parallel, each writing its slice of the final arrays directly: there is
neither a global sort nor a buffer for all the pieces, and the memory is
the final matrix plus a few MB per thread. The matrix is the same whatever
the number of threads.

The functions here trust their inputs (the façade ``ccdgrid.correction``
checks them): C-contiguous arrays of the stated shapes and dtypes, and the
preconditions stated in each docstring. Nothing here reads or writes out of
bounds for any displacement values, finite or not.
"""

from cython.parallel cimport prange
from libc.math cimport INFINITY, isfinite
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

import numpy as np

cdef extern from *:
    """
    #ifdef CCDGRID_OPENMP
    #include <omp.h>
    static int ccdgrid_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int ccdgrid_max_threads(void) { return 1; }
    #endif
    """
    int ccdgrid_max_threads() noexcept nogil


cdef extern from *:
    """
    /* Hand-over between the threads building consecutive bands: a release
       store of where the next band starts, read with acquire loads. Without
       the GCC/Clang atomic builtins the build runs on one thread. */
    #if defined(__GNUC__) || defined(__clang__)
    #define CCDGRID_ATOMICS 1
    #ifdef _WIN32
    #include <windows.h>
    static void ccdgrid_yield(void) { SwitchToThread(); }
    #else
    #include <sched.h>
    static void ccdgrid_yield(void) { sched_yield(); }
    #endif
    static long long ccdgrid_load(long long* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static void ccdgrid_store(long long* p, long long v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static long long ccdgrid_fetch_add(long long* p, long long v) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    #else
    #define CCDGRID_ATOMICS 0
    static void ccdgrid_yield(void) {}
    static long long ccdgrid_load(long long* p) { return *p; }
    static void ccdgrid_store(long long* p, long long v) { *p = v; }
    static long long ccdgrid_fetch_add(long long* p, long long v) {
        long long old = *p; *p = old + v; return old;
    }
    #endif
    """
    int CCDGRID_ATOMICS
    void ccdgrid_yield() noexcept nogil
    long long ccdgrid_load(long long* p) noexcept nogil
    void ccdgrid_store(long long* p, long long v) noexcept nogil
    long long ccdgrid_fetch_add(long long* p, long long v) noexcept nogil


cdef extern from *:
    """
    /* Snapping and flooring, the hottest arithmetic of the survey. Plain
       x86-64 has no rounding instruction (SSE4.1 has), and the compiler's
       inline rint() and floor() test the magnitude and handle the sign:
       this shorter form made the whole build 7 % faster. Adding and
       subtracting 1.5 * 2**52 rounds to an integer, ties to even, like
       rint() in the default rounding mode, for |c| < 2**51. Beyond, c is
       already a multiple of 0.5 and the result is c or at least 0.5 away:
       snapping keeps c, and the floor is only used after bounds that reject
       such values (as every test rejects NaN). It needs double arithmetic
       without extra precision. */
    #include <float.h>
    #include <math.h>
    #if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
    static inline double ccdgrid_round_even(double c) {
        return (c + 6755399441055744.0) - 6755399441055744.0;
    }
    #else
    static inline double ccdgrid_round_even(double c) { return rint(c); }
    #endif
    static inline double ccdgrid_snap(double c, double tol) {
        double r = ccdgrid_round_even(c);
        return fabs(c - r) <= tol ? r : c;
    }
    static inline double ccdgrid_floor(double c) {
        double r = ccdgrid_round_even(c);
        return r > c ? r - 1.0 : r;
    }
    """
    double c_snap "ccdgrid_snap"(double c, double tol) noexcept nogil
    double c_floor "ccdgrid_floor"(double c) noexcept nogil


cdef extern from *:
    """
    /* Add 1 to two adjacent int32 counters in one 64-bit memory operation
       (either byte order; no carry between them while they are < 2**31). */
    #include <string.h>
    #include <stdint.h>
    static inline void ccdgrid_incr_pair(int32_t* c) {
        uint64_t v;
        memcpy(&v, c, 8);
        v += 0x100000001ULL;
        memcpy(c, &v, 8);
    }
    """
    void incr_pair "ccdgrid_incr_pair"(int32_t* c) noexcept nogil


ctypedef fused idx_t:
    int32_t
    int64_t

ctypedef fused weight_t:
    float
    double

ctypedef fused image_t:
    float
    double

# Pixel types apply_csr reads directly: float32 or float64, or integers that
# float32 holds exactly (so converting each pixel in the kernel gives the
# same sums as converting the image first, without its 2-4 byte-per-pixel copy).
ctypedef fused pixel_t:
    float
    double
    uint8_t
    uint16_t
    int16_t


cdef enum:
    # Cells per axis of a pixel's bounding box at most (see MAX_SPAN), so
    # that the cell offset (r, c) in the box fits one byte as r * STRIDE + c.
    MAX_EXTENT = 15
    STRIDE = 16
    MAX_PIECES = MAX_EXTENT * MAX_EXTENT
    # What the survey found about an input pixel
    SKIP = 0   # masked, degenerate or outside the output grid
    OTHER = 1  # to split by the general method
    PLAIN = 2  # one corner in each cell of a 2 x 2 box (see survey_rows)


# Corner coordinates closer than this to an integer are snapped onto it, so
# that an undistorted grid gives exactly one weight of 1.0 per pixel.
SNAP = 1e-9
# Quadrilaterals with a smaller area (px²) are degenerate and dropped.
AREA_MIN = 1e-9
# A quadrilateral more than this many px high or wide is degenerate and
# dropped: it bounds the work and the buffers per pixel (its box then spans
# at most MAX_EXTENT cells); a real distortion is nowhere near it.
MAX_SPAN = 13.0
# Pieces with a smaller weight are rounding noise of a cut along a vertex or
# an edge and are not stored (at most 1e-13 of a pixel's flux each).
WEIGHT_MIN = 1e-13

cdef double C_SNAP = SNAP
cdef double C_AREA_MIN = AREA_MIN
cdef double C_MAX_SPAN = MAX_SPAN
cdef double C_WEIGHT_MIN = WEIGHT_MIN

# Below this many pixels a job runs on one thread: starting threads costs
# more than it saves.
PARALLEL_MIN_PIXELS = 1 << 16
# Output rows per band at least and at most. A band is also at least twice
# as high as the typical number of output rows one input row reaches (7 for
# the benchmark's field, 140 for a 2048-wide detector turned by 4°), so that
# the input rows a band visits are mostly its own. Each thread holds about
# 55 bytes per output pixel of its band (pieces and counts): 3.5 MB for
# bands of 32 rows of 2048 pixels, 28 MB at the cap.
BAND_MIN = 32
BAND_MAX = 256
# Band hand-over markers (a band's start is otherwise >= 0).
# The output size that stands for "no output frame" (see kept_bounds).
cdef int64_t NO_FRAME = 1LL << 62
cdef long long UNSET = -1
cdef long long FAILED = -2


cdef struct Box:
    int64_t k0  # first output row and column of the bounding box
    int64_t l0
    int nk      # rows and columns of the bounding box
    int nl


cdef inline double snap(double c) noexcept nogil:
    """``c`` snapped onto the nearest integer if within SNAP of it."""
    return c_snap(c, C_SNAP)


cdef inline void gather_quad(const double* y0r, const double* x0r,
                             const double* y1r, const double* x1r, int64_t j,
                             double* qy, double* qx) noexcept nogil:
    """Corners A, B, C, D of pixel ``j`` from the snapped corner rows above and below it."""
    qy[0] = y0r[j]
    qx[0] = x0r[j]
    qy[1] = y1r[j]
    qx[1] = x1r[j]
    qy[2] = y1r[j + 1]
    qx[2] = x1r[j + 1]
    qy[3] = y0r[j + 1]
    qx[3] = x0r[j + 1]


cdef inline int64_t ifloor(double x) noexcept nogil:
    """floor(x) for |x| < 2**62."""
    cdef int64_t t = <int64_t>x
    return t - 1 if <double>t > x else t


cdef inline int64_t iceil(double x) noexcept nogil:
    """ceil(x) for |x| < 2**62."""
    cdef int64_t t = <int64_t>x
    return t + 1 if <double>t < x else t


cdef inline double quad_area(const double* qy, const double* qx) noexcept nogil:
    """Signed area of A, B, C, D (positive for an unfolded pixel): half the diagonals' cross."""
    return 0.5 * ((qy[2] - qy[0]) * (qx[3] - qx[1]) - (qx[2] - qx[0]) * (qy[3] - qy[1]))


cdef inline void bounding_box(const double* qy, const double* qx, Box* box) noexcept nogil:
    """Cells of the output grid the quadrilateral's bounding box covers.

    Precondition: the quadrilateral passed :func:`pixel_status` (finite
    corners, extent at most MAX_SPAN, so the integer casts are safe).
    """
    cdef double ymin = min(min(qy[0], qy[1]), min(qy[2], qy[3]))
    cdef double ymax = max(max(qy[0], qy[1]), max(qy[2], qy[3]))
    cdef double xmin = min(min(qx[0], qx[1]), min(qx[2], qx[3]))
    cdef double xmax = max(max(qx[0], qx[1]), max(qx[2], qx[3]))
    box.k0 = ifloor(ymin)
    box.l0 = ifloor(xmin)
    box.nk = <int>(iceil(ymax) - box.k0)
    box.nl = <int>(iceil(xmax) - box.l0)


cdef inline int pixel_status(const double* qy, const double* qx,
                             int64_t ny_out, int64_t nx_out) noexcept nogil:
    """Check one quadrilateral (corners A, B, C, D).

    Returns -1 if it is degenerate (non-finite, area below AREA_MIN, which
    includes folded ones, self-intersecting, or higher or wider than
    MAX_SPAN), 0 if it lies outside the output grid, 1 otherwise.
    """
    cdef int m, n_opposite = 0
    cdef double ymin, ymax, xmin, xmax, cross
    # One test for all 8 coordinates: a sum is finite only if every term is
    # (or it overflows, for coordinates beyond 1e307: degenerate anyway).
    if not isfinite(qy[0] + qy[1] + qy[2] + qy[3] + qx[0] + qx[1] + qx[2] + qx[3]):
        return -1
    if not (quad_area(qy, qx) > C_AREA_MIN):
        return -1
    # A simple quadrilateral turns against its orientation at most once (at a
    # concave vertex); a self-intersecting one ("bow tie") does so twice.
    for m in range(4):
        cross = ((qy[m] - qy[(m + 3) % 4]) * (qx[(m + 1) % 4] - qx[m])
                 - (qx[m] - qx[(m + 3) % 4]) * (qy[(m + 1) % 4] - qy[m]))
        if cross < 0.0:
            n_opposite += 1
    if n_opposite > 1:
        return -1
    ymin = min(min(qy[0], qy[1]), min(qy[2], qy[3]))
    ymax = max(max(qy[0], qy[1]), max(qy[2], qy[3]))
    xmin = min(min(qx[0], qx[1]), min(qx[2], qx[3]))
    xmax = max(max(qx[0], qx[1]), max(qx[2], qx[3]))
    if ymax - ymin > C_MAX_SPAN or xmax - xmin > C_MAX_SPAN:
        return -1
    if ymax <= 0.0 or xmax <= 0.0 or ymin >= <double>ny_out or xmin >= <double>nx_out:
        return 0
    return 1


cdef inline void square_weights(double ya, double xa, double yb, double xb,
                                double yc, double xc, double yd, double xd,
                                double* w, int64_t stride) noexcept nogil:
    """:func:`near_square_weights` for a pixel known to have one corner in each cell.

    Corners in box coordinates, as scalars; the weights of cells (0, 0),
    (0, 1), (1, 0), (1, 1) go to ``w[0]``, ``w[stride]``, ``w[2 stride]``,
    ``w[3 stride]``.
    """
    cdef double ua = 1.0 - ya, va = 1.0 - xa
    cdef double ub = yb - 1.0, vb = 1.0 - xb
    cdef double uc = yc - 1.0, vc = xc - 1.0
    cdef double ud = 1.0 - yd, vd = xd - 1.0
    cdef double e_ab, e_dc, e_ad, e_bc, m_y, m_x, ol, orr, ot, os, c00, c01, c10, c11, inv
    e_ab = ua + ub
    e_dc = ud + uc
    e_ad = va + vd
    e_bc = vb + vc
    m_y = e_ab * e_dc
    m_x = e_ad * e_bc
    # |OL|, |OR|, |OT|, |OS| times e_ab e_dc e_ad e_bc
    ol = (va * ub + vb * ua) * (e_dc * m_x)
    orr = (vd * uc + vc * ud) * (e_ab * m_x)
    ot = (ua * vd + ud * va) * (m_y * e_bc)
    os = (ub * vc + uc * vb) * (m_y * e_ad)
    c00 = ua * ol + va * ot
    c01 = ot * vd + orr * ud
    c10 = os * vb + ol * ub
    c11 = uc * orr + vc * os
    inv = 1.0 / ((c00 + c11) + (c01 + c10))
    w[0] = c00 * inv
    w[stride] = c01 * inv
    w[2 * stride] = c10 * inv
    w[3 * stride] = c11 * inv


cdef inline void swap_rows(
    double** y0, double** x0, double** fy0, double** fx0,
    double** y1, double** x1, double** fy1, double** fx1,
) noexcept nogil:
    """Exchange the current corner rows (``*0``) with the next ones (``*1``).

    A pass over consecutive pixel rows surveys each corner row once: the
    bottom corners of row ``i`` are the top corners of row ``i + 1``.
    """
    y0[0], y1[0] = y1[0], y0[0]
    x0[0], x1[0] = x1[0], x0[0]
    fy0[0], fy1[0] = fy1[0], fy0[0]
    fx0[0], fx1[0] = fx1[0], fx0[0]


cdef void row_square_weights(const double* y0r, const double* x0r, const double* fy0,
                             const double* fx0, const double* y1r, const double* x1r,
                             int64_t nx, double* w) noexcept nogil:
    """:func:`square_weights` of every pixel of a row, as if all were plain.

    ``y0r``, ``x0r``, ``fy0``, ``fx0``: the snapped corners of the row's top
    edge and their floors; ``y1r``, ``x1r``: its bottom edge. Writes the
    four weights of pixel j to ``w[4 j : 4 j + 4]``; they are meaningless
    for pixels that are not PLAIN. Without branches, so that the compiler
    vectorises it (one output array: more would exceed the run-time alias
    checks it is willing to insert).
    """
    cdef int64_t j
    cdef double k0, l0
    for j in range(nx):
        k0 = fy0[j]
        l0 = fx0[j]
        square_weights(y0r[j] - k0, x0r[j] - l0, y1r[j] - k0, x1r[j] - l0,
                       y1r[j + 1] - k0, x1r[j + 1] - l0, y0r[j + 1] - k0, x0r[j + 1] - l0,
                       w + 4 * j, 1)


cdef inline bint near_square_weights(const double* ly, const double* lx,
                                     double* w) noexcept nogil:
    """Weights of a near-square in the 4 cells of a 2x2 box, if it has one corner in each.

    ``ly``, ``lx``: corners A, B, C, D in box coordinates (the box is
    [0, 2] x [0, 2], cut by the lines y = 1 and x = 1). When A, B, C, D lie
    strictly inside the cells (0, 0), (1, 0), (1, 1), (0, 1) respectively,
    each edge crosses exactly one cut line, once: AB and DC cross y = 1 at
    L and R, AD and BC cross x = 1 at T and S. The chord L-R lies inside
    the pixel (a line meets a simple polygon's boundary at those two points
    only), and so does T-S; they meet at O = (1, 1). Cell (0, 0) then holds
    exactly the quadrilateral A, L, O, T, and so on around O, convex or not
    (such a pixel cannot be self-intersecting: AB and CD lie on either side
    of x = 1, BC and DA on either side of y = 1).

    With u, v a corner's distances to the lines y = 1 and x = 1 (positive),
    L is at distance |OL| = (v_A u_B + v_B u_A) / (u_A + u_B) from O, and
    likewise for R, T, S; the area of A, L, O, T is half the cross product
    of its diagonals, (u_A |OL| + v_A |OT|) / 2, and so on. Every term is a
    product of positive factors: no cancellation. The four areas are put
    over the common denominator (u_A + u_B)(u_D + u_C)(v_A + v_D)(v_B + v_C)
    so that normalising them by their sum (the pixel's area) takes one
    division.

    Fills ``w`` (row-major: cells (0, 0), (0, 1), (1, 0), (1, 1); they sum
    to 1 to rounding) and returns True, or returns False (nothing written)
    when the corners are not so placed.
    """
    if not (ly[0] < 1.0 and lx[0] < 1.0 and ly[1] > 1.0 and lx[1] < 1.0
            and ly[2] > 1.0 and lx[2] > 1.0 and ly[3] < 1.0 and lx[3] > 1.0):
        return False
    square_weights(ly[0], lx[0], ly[1], lx[1], ly[2], lx[2], ly[3], lx[3], w, 1)
    return True


cdef inline double positive_mean(double a, double b) noexcept nogil:
    """Mean over t in [0, 1] of max(a + (b - a) t, 0)."""
    if a >= 0.0 and b >= 0.0:
        return 0.5 * (a + b)
    if a <= 0.0 and b <= 0.0:
        return 0.0
    if a > 0.0:
        return a * a / (2.0 * (a - b))
    return b * b / (2.0 * (b - a))


cdef inline void split_2x2(const double* ly, const double* lx, double area,
                           double* cells) noexcept nogil:
    """Areas of a quadrilateral in the 4 cells of a 2x2 box (box coordinates).

    With J = ∫ x dy and P = ∫ max(x - 1, 0) dy along the edges, over their
    whole length (w) or their part below y = 1 (l), Green's theorem gives
    cells (0, 1) = -P_l, (1, 1) = P_l - P_w, (0, 0) = P_l - J_l, and (1, 0)
    the rest of the area.
    """
    cdef int m, n
    cdef double ya, xa, yb, xb, d, xm, jl = 0.0, pl = 0.0, pw = 0.0
    for m in range(4):
        n = (m + 1) & 3
        ya = ly[m]
        xa = lx[m]
        yb = ly[n]
        xb = lx[n]
        d = yb - ya
        if d == 0.0:
            continue
        pw += d * positive_mean(xa - 1.0, xb - 1.0)
        if ya <= 1.0 and yb <= 1.0:
            jl += d * 0.5 * (xa + xb)
            pl += d * positive_mean(xa - 1.0, xb - 1.0)
        elif ya < 1.0 or yb < 1.0:
            xm = xa + (1.0 - ya) * (xb - xa) / d
            if ya < 1.0:
                jl += (1.0 - ya) * 0.5 * (xa + xm)
                pl += (1.0 - ya) * positive_mean(xa - 1.0, xm - 1.0)
            else:
                jl += (yb - 1.0) * 0.5 * (xm + xb)
                pl += (yb - 1.0) * positive_mean(xm - 1.0, xb - 1.0)
    cells[0] = pl - jl
    cells[1] = -pl
    cells[3] = pl - pw
    cells[2] = area - cells[0] - cells[1] - cells[3]


cdef inline int ceil_nonneg(double x) noexcept nogil:
    """ceil(x) for 0 <= x < 2**31 (negative rounding noise gives 0)."""
    cdef int t = <int>x
    return t + 1 if <double>t < x else t


cdef inline void add_piece(double* part, double* left, int r, int nl,
                           double v, double xs, double xe) noexcept nogil:
    """Add -∫ h dy of a segment within box row ``r`` (v = minus its signed height).

    ``part[c]`` gets the part of column c; ``left[c]`` the full height owed to
    every column left of c. x is in box coordinates, in [0, nl] up to
    rounding, which the clamps absorb.
    """
    cdef double xlo = min(xs, xe), xhi = max(xs, xe), scale, a, b, f
    cdef int c, clo, chi
    cdef int base = r * STRIDE
    clo = <int>xlo if xlo > 0.0 else 0
    chi = ceil_nonneg(xhi) - 1
    if chi < clo:
        chi = clo  # on an integer line: one column
    if chi > nl - 1:
        chi = nl - 1
    if clo > chi:
        clo = chi
    if clo == chi:
        part[base + clo] += v * (0.5 * (xs + xe) - clo)
        left[base + clo] += v
        return
    scale = v / (xhi - xlo)
    for c in range(clo, chi + 1):
        a = xlo if c == clo else <double>c
        b = xhi if c == chi else <double>(c + 1)
        f = (b - a) * scale
        part[base + c] += f * (0.5 * (a + b) - c)
        left[base + c] += f


cdef inline void add_edge(double* part, double* left, int nk, int nl,
                          double ya, double xa, double yb, double xb) noexcept nogil:
    """Integrate the edge a -> b of a pixel over the rows of its box."""
    cdef double y0, x0, y1, x1, sgn, dxdy, ys, xs, ye, xe
    cdef int r, r0, r1
    if ya == yb:
        return  # horizontal: no dy
    if ya < yb:
        y0, x0, y1, x1, sgn = ya, xa, yb, xb, -1.0
    else:
        y0, x0, y1, x1, sgn = yb, xb, ya, xa, 1.0
    r0 = <int>y0 if y0 > 0.0 else 0
    r1 = ceil_nonneg(y1)
    if r1 > nk:
        r1 = nk
    if r0 > r1 - 1:
        r0 = r1 - 1
    if r1 - r0 == 1:
        add_piece(part, left, r0, nl, sgn * (y1 - y0), x0, x1)
        return
    dxdy = (x1 - x0) / (y1 - y0)
    ys = y0
    xs = x0
    for r in range(r0, r1):
        if r == r1 - 1:
            ye = y1
            xe = x1
        else:
            ye = <double>(r + 1)
            xe = x0 + (ye - y0) * dxdy
        add_piece(part, left, r, nl, sgn * (ye - ys), xs, xe)
        ys = ye
        xs = xe


cdef int split_quad(const double* qy, const double* qx, const Box* box,
                    uint8_t* codes, double* weights) noexcept nogil:
    """Split one valid quadrilateral over the cells of its bounding box.

    ``qy``, ``qx``: its corners A, B, C, D in pyFAI pixel coordinates, already
    snapped, having passed :func:`pixel_status`; ``box`` from
    :func:`bounding_box`. Writes up to MAX_PIECES pieces whose weight
    exceeds WEIGHT_MIN: ``codes`` = r * STRIDE + c for the output cell
    (box.k0 + r, box.l0 + c), in row-major order, and their weights (which
    sum to 1 to rounding). Cells outside the output grid are included: the
    caller drops them. Returns the number of pieces.
    """
    cdef int m, r, c, n = 0, nk = box.nk, nl = box.nl, base
    cdef double s, w, inv_area
    cdef double ly[4]
    cdef double lx[4]
    cdef double part[MAX_EXTENT * STRIDE]
    cdef double left[MAX_EXTENT * STRIDE]
    if nk == 1 and nl == 1:
        # Inside one output pixel: all of the flux goes there, exactly.
        codes[0] = 0
        weights[0] = 1.0
        return 1
    # Box coordinates: subtracting an integer is exact here.
    for m in range(4):
        ly[m] = qy[m] - <double>box.k0
        lx[m] = qx[m] - <double>box.l0
    if nk == 2 and nl == 2:
        # The common case of a smooth distortion, without loops.
        if not near_square_weights(ly, lx, part):
            s = quad_area(qy, qx)
            split_2x2(ly, lx, s, part)
            inv_area = 1.0 / s
            for m in range(4):
                part[m] *= inv_area
        for m in range(4):
            w = part[m]
            if w > C_WEIGHT_MIN:
                codes[n] = <uint8_t>((m >> 1) * STRIDE + (m & 1))
                weights[n] = w
                n += 1
        return n
    inv_area = 1.0 / quad_area(qy, qx)
    for r in range(nk):
        for c in range(nl + 1):
            part[r * STRIDE + c] = 0.0
            left[r * STRIDE + c] = 0.0
    for m in range(4):
        add_edge(part, left, nk, nl, ly[m], lx[m], ly[(m + 1) % 4], lx[(m + 1) % 4])
    for r in range(nk):
        base = r * STRIDE
        s = 0.0
        for c in range(nl - 1, -1, -1):
            s += left[base + c + 1]
            part[base + c] += s
        for c in range(nl):
            w = part[base + c] * inv_area
            if w > C_WEIGHT_MIN:
                codes[n] = <uint8_t>(base + c)
                weights[n] = w
                n += 1
    return n


cdef inline void survey_row(const double* dy, const double* dx, int64_t i, int64_t nx,
                            int64_t oy, int64_t ox, double* ry, double* rx,
                            double* fy, double* fx) noexcept nogil:
    """True positions of the corners of corner-grid row ``i``, snapped, and their floors.

    Positions are in the output frame, whose origin is at ``(oy, ox)`` of
    the input frame: the whole-pixel shift is applied to the integer
    nominal position, so that it adds no rounding.
    """
    cdef int64_t j, a = i * (nx + 1)
    cdef double y, x
    cdef double yi = <double>(i - oy)
    for j in range(nx + 1):
        y = snap(yi + dy[a + j])
        x = snap(<double>(j - ox) + dx[a + j])
        ry[j] = y
        rx[j] = x
        fy[j] = c_floor(y)
        fx[j] = c_floor(x)


cdef int survey_rows(const double* dy, const double* dx, const uint8_t* mask,
                     int64_t nx, int64_t oy, int64_t ox, int64_t row_start, int64_t row_stop,
                     int64_t ny_out, int64_t nx_out, uint8_t* kinds,
                     int64_t* rowlo, int64_t* rowhi,
                     int64_t* n_degenerate, int64_t* bound) noexcept nogil:
    """First pass over input rows [row_start, row_stop): which pixels to split.

    Sets ``kinds[p]`` to PLAIN or OTHER for the unmasked, non-degenerate
    pixels that reach the output grid, else SKIP; ``rowlo[i]``,
    ``rowhi[i]`` to the output rows [lo, hi) the valid pixels of input row
    i reach (lo = ny_out, hi = 0 if none). Adds the degenerate unmasked
    pixels to ``n_degenerate`` and the output cells of the valid pixels'
    bounding boxes (an upper bound of their non-zeros) to ``bound``.
    Returns -1 if memory ran out, else 0.

    A pixel is PLAIN when its bounding box is 2 x 2 cells with corners A, B,
    C, D strictly inside cells (0, 0), (1, 0), (1, 1), (0, 1) (the case of
    :func:`near_square_weights`), the box meets the output grid and the
    area exceeds AREA_MIN: such a pixel certainly passes
    :func:`pixel_status` (finite, simple, positively oriented, small). It
    is recognised from the floors of the corner coordinates, computed once
    per corner: A and D in one row of cells, B and C in the next and not on
    the line between; likewise for the columns. That is a quarter of the
    rounding work of testing each pixel's corners, and the test has no
    branches (NaN fails every comparison; infinite or huge coordinates fail
    the bounds); the other pixels get the full check. (GCC finds vectorising
    it with SSE2 unprofitable; the row loop stays scalar.)
    """
    cdef int64_t i, j, p, lo, hi, k_lo, k_hi, l_lo, l_hi, ndeg = 0, cells = 0
    cdef int status
    cdef Box box
    cdef double qy[4]
    cdef double qx[4]
    cdef double ny_d = <double>ny_out, nx_d = <double>nx_out
    cdef double* rows = <double*>malloc(8 * (nx + 1) * sizeof(double))
    cdef uint8_t* plain = <uint8_t*>malloc(nx * sizeof(uint8_t))
    cdef double* y0r
    cdef double* x0r
    cdef double* fy0
    cdef double* fx0
    cdef double* y1r
    cdef double* x1r
    cdef double* fy1
    cdef double* fx1
    if rows == NULL or plain == NULL:
        free(rows)
        free(plain)
        return -1
    y0r = rows
    x0r = rows + (nx + 1)
    fy0 = rows + 2 * (nx + 1)
    fx0 = rows + 3 * (nx + 1)
    y1r = rows + 4 * (nx + 1)
    x1r = rows + 5 * (nx + 1)
    fy1 = rows + 6 * (nx + 1)
    fx1 = rows + 7 * (nx + 1)
    survey_row(dy, dx, row_start, nx, oy, ox, y0r, x0r, fy0, fx0)
    for i in range(row_start, row_stop):
        survey_row(dy, dx, i + 1, nx, oy, ox, y1r, x1r, fy1, fx1)
        for j in range(nx):
            plain[j] = (
                (fy0[j + 1] == fy0[j]) & (fy1[j] == fy0[j] + 1.0) & (fy1[j + 1] == fy1[j])
                & (y1r[j] != fy1[j]) & (y1r[j + 1] != fy1[j + 1])
                & (fx1[j] == fx0[j]) & (fx0[j + 1] == fx0[j] + 1.0) & (fx1[j + 1] == fx0[j + 1])
                & (x0r[j + 1] != fx0[j + 1]) & (x1r[j + 1] != fx1[j + 1])
                & (fy0[j] >= -1.0) & (fy0[j] < ny_d) & (fx0[j] >= -1.0) & (fx0[j] < nx_d)
                & (0.5 * ((y1r[j + 1] - y0r[j]) * (x0r[j + 1] - x1r[j])
                          - (x1r[j + 1] - x0r[j]) * (y0r[j + 1] - y1r[j])) > C_AREA_MIN))
        lo = ny_out
        hi = 0
        for j in range(nx):
            p = i * nx + j
            if mask[p]:
                kinds[p] = SKIP
                continue
            if plain[j]:
                kinds[p] = PLAIN
                box.k0 = <int64_t>fy0[j]
                box.l0 = <int64_t>fx0[j]
                box.nk = 2
                box.nl = 2
            else:
                gather_quad(y0r, x0r, y1r, x1r, j, qy, qx)
                status = pixel_status(qy, qx, ny_out, nx_out)
                if status <= 0:
                    kinds[p] = SKIP
                    if status < 0:
                        ndeg += 1
                    continue
                kinds[p] = OTHER
                bounding_box(qy, qx, &box)
            k_lo = max(box.k0, 0)
            k_hi = min(box.k0 + box.nk, ny_out)
            l_lo = max(box.l0, 0)
            l_hi = min(box.l0 + box.nl, nx_out)
            lo = min(lo, k_lo)
            hi = max(hi, k_hi)
            cells += (k_hi - k_lo) * (l_hi - l_lo)
        rowlo[i] = lo
        rowhi[i] = hi
        swap_rows(&y0r, &x0r, &fy0, &fx0, &y1r, &x1r, &fy1, &fx1)
    free(rows)
    free(plain)
    n_degenerate[0] = ndeg
    bound[0] = cells
    return 0


cdef struct Plan:
    # What every band builder reads (see split_pixels).
    const double* dy
    const double* dx
    const uint8_t* kinds    # per input pixel: SKIP, OTHER or PLAIN (the survey)
    const int64_t* rowlo    # per input row: output rows [rowlo, rowhi) reached
    const int64_t* rowhi
    const int64_t* first    # per band: input rows [first, last) to visit
    const int64_t* last
    int64_t nx
    int64_t oy              # input position of the output frame's origin (whole pixels)
    int64_t ox
    int64_t ny_out
    int64_t nx_out
    int64_t height          # output rows per band (the last one may be lower)
    int64_t nbands
    int64_t capacity        # room in the output arrays (the survey's bound)
    long long* next_band    # the next band nobody has taken yet
    long long* starts       # per band + 1: first entry of the band, or UNSET/FAILED


cdef int grow(int64_t need, int64_t* cap, idx_t** pix, weight_t** pw,
              int32_t** pbin) noexcept nogil:
    """Make room for ``need`` pieces in a thread's band buffers; -1 if memory ran out."""
    cdef int64_t new_cap = max(max(need, 2 * cap[0]), 1 << 16)
    cdef void* tmp
    tmp = realloc(pix[0], new_cap * sizeof(idx_t))
    if tmp == NULL:
        return -1
    pix[0] = <idx_t*>tmp
    tmp = realloc(pw[0], new_cap * sizeof(weight_t))
    if tmp == NULL:
        return -1
    pw[0] = <weight_t*>tmp
    tmp = realloc(pbin[0], new_cap * sizeof(int32_t))
    if tmp == NULL:
        return -1
    pbin[0] = <int32_t*>tmp
    cap[0] = new_cap
    return 0


cdef int build_bands(Plan* plan, idx_t* indptr, idx_t* indices,
                     weight_t* data) noexcept nogil:
    """One thread's share of the second pass: take bands in turn until none is left.

    For a band of output rows [k_top, k_end): split the valid pixels of the
    input rows that reach it, keeping the pieces inside the band, in raster
    order; count them per output pixel; wait until the band before has
    published where this band starts, publish where the next one starts,
    then write this band's row pointers and scatter its pieces (a stable
    counting sort) into the output arrays. The pieces are kept as records
    (band-local bin, input pixel, weight); a plain pixel whose four pieces
    are all kept is one record of four slots (its first bin negated, its
    pixel, the four weights). Bands are taken in increasing
    order, so the band waited for is always being built by a running
    thread. A thread that runs out of memory publishes FAILED for the bands
    it takes, and every band after fails in turn. Returns -1 in that case.
    """
    cdef int64_t nx = plan.nx, nx_out = plan.nx_out, height = plan.height
    cdef int64_t b, k_top, k_end, nbins, i, j, p, prev, n, e, bin_, cap = 0, k, col
    cdef long long start
    cdef int m, npieces, failed = 0
    cdef int32_t c, running, c0, c1, c2, c3
    cdef uint8_t kind
    cdef Box box
    cdef double qy[4]
    cdef double qx[4]
    cdef uint8_t codes[MAX_PIECES]
    cdef double weights[MAX_PIECES]
    cdef double w
    cdef bint inside
    cdef idx_t pos
    cdef idx_t* pix = NULL
    cdef weight_t* pw = NULL
    cdef int32_t* pbin = NULL
    cdef double* rows = <double*>malloc((8 * (nx + 1) + 4 * nx) * sizeof(double))
    cdef int32_t* counts = <int32_t*>malloc(height * nx_out * sizeof(int32_t))
    cdef double* y0r = rows
    cdef double* x0r = rows + (nx + 1)
    cdef double* fy0 = rows + 2 * (nx + 1)
    cdef double* fx0 = rows + 3 * (nx + 1)
    cdef double* y1r = rows + 4 * (nx + 1)
    cdef double* x1r = rows + 5 * (nx + 1)
    cdef double* fy1 = rows + 6 * (nx + 1)
    cdef double* fx1 = rows + 7 * (nx + 1)
    cdef double* wrow = rows + 8 * (nx + 1)
    if rows == NULL or counts == NULL:
        failed = 1
    while True:
        b = ccdgrid_fetch_add(plan.next_band, 1)
        if b >= plan.nbands:
            break
        k_top = b * height
        k_end = min(k_top + height, plan.ny_out)
        nbins = (k_end - k_top) * nx_out
        n = 0
        if not failed:
            memset(counts, 0, nbins * sizeof(int32_t))
            prev = -2
            for i in range(plan.first[b], plan.last[b]):
                if plan.rowlo[i] >= k_end or plan.rowhi[i] <= k_top:
                    continue
                if i == prev + 1:
                    swap_rows(&y0r, &x0r, &fy0, &fx0, &y1r, &x1r, &fy1, &fx1)
                else:
                    survey_row(plan.dy, plan.dx, i, nx, plan.oy, plan.ox, y0r, x0r, fy0, fx0)
                survey_row(plan.dy, plan.dx, i + 1, nx, plan.oy, plan.ox, y1r, x1r, fy1, fx1)
                prev = i
                row_square_weights(y0r, x0r, fy0, fx0, y1r, x1r, nx, wrow)
                for j in range(nx):
                    p = i * nx + j
                    kind = plan.kinds[p]
                    if kind == SKIP:
                        continue
                    if n + MAX_PIECES > cap:
                        if grow(n + MAX_PIECES, &cap, &pix, &pw, &pbin) != 0:
                            failed = 1
                            break
                    if kind == PLAIN:
                        # The common case: weights from the row pass, inline (a
                        # call per pixel costs a fifth of the build). Corner A is
                        # in the first cell of the 2 x 2 box.
                        box.k0 = <int64_t>fy0[j]
                        box.l0 = <int64_t>fx0[j]
                        if box.k0 >= k_end or box.k0 + 2 <= k_top:
                            continue
                        bin_ = (box.k0 - k_top) * nx_out + box.l0
                        inside = (box.k0 >= k_top and box.k0 + 2 <= k_end
                                  and box.l0 >= 0 and box.l0 + 2 <= nx_out)
                        if (inside and wrow[4 * j] > C_WEIGHT_MIN
                                and wrow[4 * j + 1] > C_WEIGHT_MIN
                                and wrow[4 * j + 2] > C_WEIGHT_MIN
                                and wrow[4 * j + 3] > C_WEIGHT_MIN):
                            # All four pieces kept: one record for the block (its
                            # first bin, negated, and the four weights), counted
                            # and placed two adjacent bins at a time. This
                            # bookkeeping per piece was a sixth of the build.
                            pbin[n] = <int32_t>(-1 - bin_)
                            pix[n] = <idx_t>p
                            pw[n] = <weight_t>wrow[4 * j]
                            pw[n + 1] = <weight_t>wrow[4 * j + 1]
                            pw[n + 2] = <weight_t>wrow[4 * j + 2]
                            pw[n + 3] = <weight_t>wrow[4 * j + 3]
                            incr_pair(&counts[bin_])
                            incr_pair(&counts[bin_ + nx_out])
                            n += 4
                            continue
                        for m in range(4):
                            w = wrow[4 * j + m]
                            if not w > C_WEIGHT_MIN:
                                continue
                            if not inside:
                                k = box.k0 + (m >> 1)
                                col = box.l0 + (m & 1)
                                if k < k_top or k >= k_end or col < 0 or col >= nx_out:
                                    continue
                            k = bin_ + (m >> 1) * nx_out + (m & 1)
                            pbin[n] = <int32_t>k
                            pix[n] = <idx_t>p
                            pw[n] = <weight_t>w
                            counts[k] += 1
                            n += 1
                        continue
                    gather_quad(y0r, x0r, y1r, x1r, j, qy, qx)
                    bounding_box(qy, qx, &box)
                    if box.k0 >= k_end or box.k0 + box.nk <= k_top:
                        continue
                    npieces = split_quad(qy, qx, &box, codes, weights)
                    for m in range(npieces):
                        k = box.k0 + codes[m] // STRIDE
                        col = box.l0 + codes[m] % STRIDE
                        if k < k_top or k >= k_end or col < 0 or col >= nx_out:
                            continue
                        bin_ = (k - k_top) * nx_out + col
                        pbin[n] = <int32_t>bin_
                        pix[n] = <idx_t>p
                        pw[n] = <weight_t>weights[m]
                        counts[bin_] += 1
                        n += 1
                if failed:
                    break
        if not failed:
            # counts -> each output pixel's first slot within the band
            running = 0
            for e in range(nbins):
                c = counts[e]
                counts[e] = running
                running += c
        start = ccdgrid_load(&plan.starts[b])
        while start == UNSET:
            ccdgrid_yield()
            start = ccdgrid_load(&plan.starts[b])
        if failed or start < 0 or start + n > plan.capacity:
            ccdgrid_store(&plan.starts[b + 1], FAILED)
            failed = 1
            continue
        ccdgrid_store(&plan.starts[b + 1], start + n)
        for e in range(nbins):
            indptr[k_top * nx_out + e] = <idx_t>(start + counts[e])
        e = 0
        while e < n:
            bin_ = pbin[e]
            if bin_ < 0:
                # a block record: bins b, b + 1, b + nx_out, b + nx_out + 1
                bin_ = -1 - bin_
                c0 = counts[bin_]
                c1 = counts[bin_ + 1]
                incr_pair(&counts[bin_])
                c2 = counts[bin_ + nx_out]
                c3 = counts[bin_ + nx_out + 1]
                incr_pair(&counts[bin_ + nx_out])
                pos = <idx_t>start
                indices[pos + c0] = pix[e]
                data[pos + c0] = pw[e]
                indices[pos + c1] = pix[e]
                data[pos + c1] = pw[e + 1]
                indices[pos + c2] = pix[e]
                data[pos + c2] = pw[e + 2]
                indices[pos + c3] = pix[e]
                data[pos + c3] = pw[e + 3]
                e += 4
                continue
            pos = <idx_t>(start + counts[bin_])
            counts[bin_] += 1
            indices[pos] = pix[e]
            data[pos] = pw[e]
            e += 1
    free(rows)
    free(counts)
    free(pix)
    free(pw)
    free(pbin)
    return -1 if failed else 0


def _survey(const double[:, ::1] dy, const double[:, ::1] dx, const uint8_t[:, ::1] mask,
            int64_t oy, int64_t ox, int64_t ny_out, int64_t nx_out, uint8_t[::1] kinds,
            int64_t[::1] rowlo,
            int64_t[::1] rowhi, int nthreads):
    """Run :func:`survey_rows` on ``nthreads`` bands of input rows; (n_degenerate, bound)."""
    cdef int64_t ny = mask.shape[0], nx = mask.shape[1]
    cdef int t, nt = nthreads
    degs = np.zeros(nt, dtype=np.int64)
    cells = np.zeros(nt, dtype=np.int64)
    status = np.zeros(nt, dtype=np.int32)
    cdef int64_t[::1] degs_v = degs
    cdef int64_t[::1] cells_v = cells
    cdef int32_t[::1] status_v = status
    for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
        status_v[t] = survey_rows(&dy[0, 0], &dx[0, 0], &mask[0, 0], nx, oy, ox,
                                  t * ny // nt, (t + 1) * ny // nt, ny_out, nx_out,
                                  &kinds[0], &rowlo[0], &rowhi[0],
                                  &degs_v[t], &cells_v[t])
    if status.any():
        raise MemoryError("cannot allocate the pixel-splitting buffers")
    return int(degs.sum()), int(cells.sum())


cdef int bounds_rows(const double* dy, const double* dx, const uint8_t* mask,
                     int64_t nx, int64_t row_start, int64_t row_stop,
                     double* lohi) noexcept nogil:
    """Bounding box of the kept pixels of input rows [row_start, row_stop).

    A pixel is kept when it is unmasked and not degenerate (the test of
    :func:`pixel_status`, without an output frame); ``lohi`` receives
    (ymin, ymax, xmin, xmax) of their snapped true corners, in the input
    frame, or (inf, -inf, inf, -inf) if there is none. Returns -1 if
    memory ran out, else 0.

    A near-square pixel (one corner in each cell of a 2 x 2 block, the
    PLAIN test of :func:`survey_rows`) is certainly kept, and its extremes
    are known corners: A or D the highest, B or C the lowest, A or B the
    leftmost, C or D the rightmost. Only the other pixels get the full
    check, which would otherwise cost as much as the rest of the pass.
    """
    cdef int64_t i, j, m
    cdef double qy[4]
    cdef double qx[4]
    cdef double ymin = INFINITY, ymax = -INFINITY, xmin = INFINITY, xmax = -INFINITY
    cdef double* rows = <double*>malloc(8 * (nx + 1) * sizeof(double))
    cdef double* y0r
    cdef double* x0r
    cdef double* fy0
    cdef double* fx0
    cdef double* y1r
    cdef double* x1r
    cdef double* fy1
    cdef double* fx1
    cdef bint plain
    if rows == NULL:
        return -1
    y0r = rows
    x0r = rows + (nx + 1)
    fy0 = rows + 2 * (nx + 1)
    fx0 = rows + 3 * (nx + 1)
    y1r = rows + 4 * (nx + 1)
    x1r = rows + 5 * (nx + 1)
    fy1 = rows + 6 * (nx + 1)
    fx1 = rows + 7 * (nx + 1)
    survey_row(dy, dx, row_start, nx, 0, 0, y0r, x0r, fy0, fx0)
    for i in range(row_start, row_stop):
        survey_row(dy, dx, i + 1, nx, 0, 0, y1r, x1r, fy1, fx1)
        for j in range(nx):
            if mask[i * nx + j]:
                continue
            plain = (
                (fy0[j + 1] == fy0[j]) & (fy1[j] == fy0[j] + 1.0) & (fy1[j + 1] == fy1[j])
                & (y1r[j] != fy1[j]) & (y1r[j + 1] != fy1[j + 1])
                & (fx1[j] == fx0[j]) & (fx0[j + 1] == fx0[j] + 1.0) & (fx1[j + 1] == fx0[j + 1])
                & (x0r[j + 1] != fx0[j + 1]) & (x1r[j + 1] != fx1[j + 1])
                & (0.5 * ((y1r[j + 1] - y0r[j]) * (x0r[j + 1] - x1r[j])
                          - (x1r[j + 1] - x0r[j]) * (y0r[j + 1] - y1r[j])) > C_AREA_MIN))
            if plain:
                ymin = min(ymin, min(y0r[j], y0r[j + 1]))
                ymax = max(ymax, max(y1r[j], y1r[j + 1]))
                xmin = min(xmin, min(x0r[j], x1r[j]))
                xmax = max(xmax, max(x0r[j + 1], x1r[j + 1]))
                continue
            gather_quad(y0r, x0r, y1r, x1r, j, qy, qx)
            # no frame: a huge one, so that only degeneracy fails the test
            if pixel_status(qy, qx, NO_FRAME, NO_FRAME) < 0:
                continue
            for m in range(4):
                ymin = min(ymin, qy[m])
                ymax = max(ymax, qy[m])
                xmin = min(xmin, qx[m])
                xmax = max(xmax, qx[m])
        swap_rows(&y0r, &x0r, &fy0, &fx0, &y1r, &x1r, &fy1, &fx1)
    free(rows)
    lohi[0] = ymin
    lohi[1] = ymax
    lohi[2] = xmin
    lohi[3] = xmax
    return 0


def kept_bounds(const double[:, ::1] dy, const double[:, ::1] dx,
                const uint8_t[:, ::1] mask, int nthreads=0):
    """Bounding box of the true corners of the pixels the matrix can keep.

    Parameters
    ----------
    dy, dx : ndarray of float64, shape (ny + 1, nx + 1), C-contiguous
        Corner displacements in pixels (see :func:`split_pixels`).
    mask : ndarray of uint8, shape (ny, nx), C-contiguous
        Nonzero: the input pixel is left out.
    nthreads : int, optional
        Threads to use; 0 means OpenMP's default. Small jobs use one.

    Returns
    -------
    tuple of 4 float
        ``(ymin, ymax, xmin, xmax)`` of the snapped true corner positions
        (pyFAI coordinates of the input frame) of every unmasked pixel that
        is not degenerate (the pixels :func:`split_pixels` splits when the
        output frame contains them); ``(inf, -inf, inf, -inf)`` if there is
        none.
    """
    cdef int64_t ny = mask.shape[0], nx = mask.shape[1]
    cdef int t, nt = <int>nthreads if nthreads > 0 else ccdgrid_max_threads()
    if ny * nx < PARALLEL_MIN_PIXELS:
        nt = 1
    nt = <int>max(1, min(nt, ny))
    lohi = np.empty((nt, 4), dtype=np.float64)
    status = np.zeros(nt, dtype=np.int32)
    cdef double[:, ::1] lohi_v = lohi
    cdef int32_t[::1] status_v = status
    for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
        status_v[t] = bounds_rows(&dy[0, 0], &dx[0, 0], &mask[0, 0], nx,
                                  t * ny // nt, (t + 1) * ny // nt, &lohi_v[t, 0])
    if status.any():
        raise MemoryError("cannot allocate the bounds buffers")
    return (float(lohi[:, 0].min()), float(lohi[:, 1].max()),
            float(lohi[:, 2].min()), float(lohi[:, 3].max()))


def _band_rows(const int64_t[::1] rowlo, const int64_t[::1] rowhi, int64_t height,
               int64_t[::1] first, int64_t[::1] last):
    """Per band of ``height`` output rows, the input rows [first, last) that reach it."""
    cdef Py_ssize_t ny = rowlo.shape[0], nbands = first.shape[0], i, b
    with nogil:
        for b in range(nbands):
            first[b] = ny
            last[b] = 0
        for i in range(ny):
            if rowlo[i] >= rowhi[i]:
                continue
            for b in range(rowlo[i] // height, (rowhi[i] - 1) // height + 1):
                first[b] = min(first[b], i)
                last[b] = max(last[b], i + 1)
        for b in range(nbands):
            if first[b] >= last[b]:
                first[b] = 0
                last[b] = 0


def _fill(const double[:, ::1] dy, const double[:, ::1] dx, const uint8_t[::1] kinds,
          const int64_t[::1] rowlo, const int64_t[::1] rowhi,
          const int64_t[::1] first, const int64_t[::1] last, int64_t[::1] starts,
          int64_t oy, int64_t ox, int64_t ny_out, int64_t nx_out, int64_t height,
          idx_t[::1] indptr, idx_t[::1] indices, weight_t[::1] data, int nthreads):
    """Run :func:`build_bands` on ``nthreads`` threads; False if memory ran out."""
    cdef Plan plan
    cdef int t, nt = nthreads
    cdef long long next_band = 0
    status = np.zeros(nt, dtype=np.int32)
    cdef int32_t[::1] status_v = status
    plan.dy = &dy[0, 0]
    plan.dx = &dx[0, 0]
    plan.kinds = &kinds[0]
    plan.rowlo = &rowlo[0]
    plan.rowhi = &rowhi[0]
    plan.first = &first[0]
    plan.last = &last[0]
    plan.nx = dy.shape[1] - 1
    plan.oy = oy
    plan.ox = ox
    plan.ny_out = ny_out
    plan.nx_out = nx_out
    plan.height = height
    plan.nbands = first.shape[0]
    plan.capacity = indices.shape[0]
    plan.next_band = &next_band
    plan.starts = <long long*>&starts[0]
    for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
        status_v[t] = build_bands(&plan, &indptr[0], &indices[0], &data[0])
    return not status.any() and starts[plan.nbands] >= 0


def split_pixels(dy, dx, mask, ny_out, nx_out, weight_dtype, nthreads=0, oy=0, ox=0):
    """Sparse matrix of exact pixel-splitting weights, in CSR arrays.

    Parameters
    ----------
    dy, dx : ndarray of float64, shape (ny + 1, nx + 1), C-contiguous
        Corner displacements in pixels (true corner = nominal + (dy, dx), the
        nominal corner (i, j) being at (i, j) in pyFAI coordinates).
    mask : ndarray of uint8, shape (ny, nx), C-contiguous
        Nonzero: the input pixel is left out of the matrix.
    ny_out, nx_out : int
        Output grid shape (>= 1 each); output pixel (k, l) is the unit square
        [oy + k, oy + k + 1] x [ox + l, ox + l + 1] of the input frame.
    weight_dtype : {numpy.float32, numpy.float64}
        Dtype of the stored weights (always computed in float64).
    nthreads : int, optional
        Threads to use; 0 means OpenMP's default. Small jobs use one.
    oy, ox : int, optional
        Position of the output frame's origin (the corner of output pixel
        (0, 0)) in the input frame, in whole pixels; |oy|, |ox| < 2**52.

    Returns
    -------
    data : ndarray of weight_dtype, shape (nnz,)
    indices : ndarray of int32 or int64, shape (nnz,)
        Flat input pixel index ``i * nx + j``, increasing within each row.
    indptr : ndarray of the same integer dtype, shape (ny_out * nx_out + 1,)
    n_degenerate : int
        Unmasked input pixels dropped: non-finite corners, area below
        ``AREA_MIN`` px² (folded pixels included), self-intersecting, or a
        bounding box wider than 15 output pixels.

    Notes
    -----
    Preconditions (unchecked): the shapes and dtypes above, ny, nx >= 1.
    The result does not depend on ``nthreads``.
    """
    cdef int64_t ny = mask.shape[0], nx = mask.shape[1]
    cdef int64_t nbins = ny_out * nx_out
    cdef int nt = <int>nthreads if nthreads > 0 else ccdgrid_max_threads()
    if mask.size < PARALLEL_MIN_PIXELS or not CCDGRID_ATOMICS:
        nt = 1
    nt = <int>max(1, min(nt, ny))

    kinds = np.empty(ny * nx, dtype=np.uint8)
    rowlo = np.empty(ny, dtype=np.int64)
    rowhi = np.empty(ny, dtype=np.int64)
    n_degenerate, bound = _survey(dy, dx, mask, oy, ox, ny_out, nx_out, kinds, rowlo, rowhi, nt)

    reach = (rowhi - rowlo)[rowhi > rowlo]
    typical = int(np.median(reach)) if reach.size else 1
    height = min(max(2 * typical, BAND_MIN), BAND_MAX, ny_out)
    # band-local bin numbers are int32 (and negated for block records)
    height = max(1, min(height, (2**31 - 2) // nx_out))
    nbands = -(-ny_out // height)
    first = np.empty(nbands, dtype=np.int64)
    last = np.empty(nbands, dtype=np.int64)
    _band_rows(rowlo, rowhi, height, first, last)

    small = bound < 2**31 and ny * nx < 2**31 and nbins < 2**31
    idx_dtype = np.int32 if small else np.int64
    # Sized for the bound, which is within a few % of the non-zeros for a
    # smooth distortion; the pages past the last entry are never touched, and
    # the arrays are shrunk in place at the end.
    indices = np.empty(max(bound, 1), dtype=idx_dtype)
    data = np.empty(max(bound, 1), dtype=weight_dtype)
    indptr = np.empty(nbins + 1, dtype=idx_dtype)
    starts = np.full(nbands + 1, UNSET, dtype=np.int64)
    starts[0] = 0
    ok = _fill(dy, dx, kinds, rowlo, rowhi, first, last, starts, oy, ox, ny_out, nx_out,
               height, indptr, indices, data, nt)
    if not ok:
        raise MemoryError("cannot allocate the pixel-splitting buffers")
    del kinds
    nnz = int(starts[nbands])
    indptr[nbins] = nnz
    indices.resize(nnz, refcheck=False)
    data.resize(nnz, refcheck=False)
    return data, indices, indptr, int(n_degenerate)


def row_sums(const idx_t[::1] indptr, const weight_t[::1] data):
    """Sum of the weights of every row (the coverage of each output pixel), float64."""
    cdef Py_ssize_t nrows = indptr.shape[0] - 1, b
    cdef idx_t p
    cdef double s
    out = np.empty(nrows, dtype=np.float64)
    cdef double[::1] out_v = out
    with nogil:
        for b in range(nrows):
            s = 0.0
            for p in range(indptr[b], indptr[b + 1]):
                s = s + data[p]
            out_v[b] = s
    return out


def apply_csr(const idx_t[::1] indptr, const idx_t[::1] indices, const weight_t[::1] data,
              const pixel_t[:, ::1] images, image_t[:, ::1] out,
              const double[::1] coverage, bint normalize, double dummy, int nthreads=0):
    """``out[m] = M @ images[m]`` for every image m of a stack, in place.

    Parameters
    ----------
    indptr, indices, data : CSR arrays of M, shape (nbins, npix)
    images : ndarray of float32, float64, uint8, uint16 or int16, shape (n, npix)
        Each pixel is converted to the dtype of ``out`` as it is read: the
        integer types are exact in float32, so the result is the same as for
        ``images.astype(out.dtype)``.
    out : ndarray of float32 or float64, shape (n, nbins)
        The accumulator has this dtype (float32 sums for float32 output).
        float64 images need a float64 ``out``.
    coverage : ndarray of float64, shape (nbins,)
        Row sums of M; read only if ``normalize``.
    normalize : bool
        Divide each output pixel by its coverage.
    dummy : float
        Value of the output pixels whose row of M is empty.
    nthreads : int, optional
        0 means OpenMP's default; small jobs run on one thread.

    Notes
    -----
    Preconditions (unchecked): consistent shapes, indices < npix, and
    coverage[b] > 0 wherever row b is not empty.
    """
    cdef Py_ssize_t nbins = out.shape[1], nimg = out.shape[0], b, m
    cdef idx_t p, start, stop
    cdef image_t acc
    cdef image_t c_dummy = <image_t>dummy
    cdef int nt = nthreads if nthreads > 0 else ccdgrid_max_threads()
    cdef const pixel_t* img
    cdef image_t* res
    if nbins * nimg < PARALLEL_MIN_PIXELS:
        nt = 1
    # One pass over the matrix per image: the inner loop is then a single
    # running sum over plain pointers, twice as fast as looping over the
    # images inside each row (2048², one thread: 17 ms instead of 31 ms;
    # likewise per image for a stack of 8).
    for m in range(nimg):
        img = &images[m, 0]
        res = &out[m, 0]
        for b in prange(nbins, nogil=True, num_threads=nt, schedule="static"):
            start = indptr[b]
            stop = indptr[b + 1]
            acc = c_dummy
            if start < stop:
                acc = 0
                for p in range(start, stop):
                    acc = acc + <image_t>(data[p] * <image_t>img[indices[p]])
                if normalize:
                    acc = <image_t>(acc / coverage[b])
            res[b] = acc


cdef extern from *:
    """
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define CCDGRID_LITTLE_ENDIAN 1
    #else
    #define CCDGRID_LITTLE_ENDIAN 0
    #endif
    """
    int CCDGRID_LITTLE_ENDIAN


cdef enum:
    STORED_BLOCK = 65535  # bytes in one stored deflate block at most


def shuffle_planes(const uint8_t[::1] src, Py_ssize_t itemsize, uint8_t[::1] dst,
                   const int64_t[::1] starts, const uint8_t[::1] stored):
    """HDF5's byte shuffle of ``src``, each byte plane written where it will be stored.

    Byte ``k`` of every element of ``src`` (``n = src.size // itemsize``
    elements) goes to plane ``k``, which begins at ``dst[starts[k]]`` and is
    either the ``n`` bytes in a row (``stored[k] == 0``: to be deflated
    later) or the same bytes as stored (uncompressed) deflate blocks:
    before every 65535 bytes, and before the last, shorter run, the block's
    5-byte header (BTYPE 00, BFINAL 0, LEN, NLEN), so ``5 * ceil(n / 65535)``
    more bytes. One pass over ``src`` writes every plane, and stored planes
    need no copy after it.

    Parameters
    ----------
    src : ndarray of uint8, shape (n * itemsize,)
        The elements' bytes, in memory order.
    itemsize : int
        Bytes per element, >= 1.
    dst : ndarray of uint8
        Written at the planes' spans only.
    starts : ndarray of int64, shape (itemsize,)
        Offset of each plane in ``dst``.
    stored : ndarray of uint8, shape (itemsize,)
        Non-zero to write a plane as stored blocks.

    Notes
    -----
    Preconditions (unchecked): ``src.size`` is a multiple of ``itemsize``,
    every plane's span lies inside ``dst``, spans do not overlap.
    """
    cdef Py_ssize_t n = src.shape[0] // itemsize, g0, count, i, k
    cdef const uint8_t* s = &src[0] if src.shape[0] else NULL
    cdef uint8_t* d
    cdef uint8_t* planes[16]
    cdef uint8_t* base = &dst[0] if dst.shape[0] else NULL
    cdef int64_t offset
    cdef uint32_t word
    if n == 0:
        return
    if itemsize > 16:
        raise ValueError("itemsize above 16")
    with nogil:
        g0 = 0
        while g0 < n:
            count = min(<Py_ssize_t>STORED_BLOCK, n - g0)
            for k in range(itemsize):
                if stored[k]:
                    offset = starts[k] + (g0 // STORED_BLOCK) * (STORED_BLOCK + 5)
                    d = base + offset
                    d[0] = 0
                    d[1] = count & 0xFF
                    d[2] = (count >> 8) & 0xFF
                    d[3] = (~count) & 0xFF
                    d[4] = ((~count) >> 8) & 0xFF
                    planes[k] = d + 5
                else:
                    planes[k] = base + starts[k] + g0
            if itemsize == 4 and CCDGRID_LITTLE_ENDIAN:
                # the float32 case: one 4-byte load, four byte stores
                for i in range(count):
                    memcpy(&word, s + 4 * (g0 + i), 4)
                    planes[0][i] = <uint8_t>word
                    planes[1][i] = <uint8_t>(word >> 8)
                    planes[2][i] = <uint8_t>(word >> 16)
                    planes[3][i] = <uint8_t>(word >> 24)
            else:
                for i in range(count):
                    for k in range(itemsize):
                        planes[k][i] = s[(g0 + i) * itemsize + k]
            g0 = g0 + count
