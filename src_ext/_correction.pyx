"""Exact pixel splitting: the sparse distortion-correction matrix, and applying it.

Geometry (pyFAI coordinates, in pixels): corner ``(i, j)`` of the input pixel
grid nominally sits at ``(i, j)`` and truly at ``(i + dy[i, j], j + dx[i, j])``.
Input pixel ``(i, j)`` is the quadrilateral of its true corners A = (i, j),
B = (i+1, j), C = (i+1, j+1), D = (i, j+1); output pixel ``(k, l)`` is the unit
square ``[k, k+1] x [l, l+1]``. The weight of (output, input) is the area of
their intersection divided by the area of the quadrilateral.

The areas are exact (to rounding), computed edge by edge with Green's
theorem: the area of a polygon P inside the cell [k, k+1] x [l, l+1] is
``-∮_P g(y) h(x) dy`` with g the indicator of [k, k+1] and
h(x) = clip(x - l, 0, 1). Each edge is cut at the integer rows it crosses,
then each piece at the integer columns; on a sub-piece h is linear, so its
integral is (signed height) x h(mid-point), and the columns to its left get
the full signed height (kept as a difference array and summed once per
row). This is the exact counterpart of pyFAI's row-strip splitting, which
treats the edge as flat within each row strip (PYFAI_NOTES §4.4); no polygon
is built, and it holds for concave quadrilaterals too.

The matrix is built in compressed-sparse-row form (one row per output
pixel). One pass over the input pixels splits each of them and stores its
pieces compactly (a one-byte cell offset within the pixel's bounding box and
the weight), counting the non-zeros of every output row; a prefix sum gives
the row pointers; a second, cheap pass scatters the pieces into place. With
OpenMP each thread handles one contiguous band of input rows and owns one
count array, so that every row of the matrix lists its input pixels in
raster order whatever the number of threads.

The functions here trust their inputs (the façade ``ccdgrid.correction``
checks them): C-contiguous arrays of the stated shapes and dtypes, and the
preconditions stated in each docstring. Nothing here reads or writes out of
bounds for any displacement values, finite or not.
"""

from cython.parallel cimport prange
from libc.math cimport fabs, isfinite, rint
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc, realloc

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
    /* Whole pages from the system, handed back at once when released (a
       malloc'ed block may stay in the process after free). */
    #if defined(_WIN32)
    #include <stdlib.h>
    static void* ccdgrid_map(size_t n) { return malloc(n); }
    static void ccdgrid_unmap(void* p, size_t n) { (void)n; free(p); }
    #else
    #include <sys/mman.h>
    static void* ccdgrid_map(size_t n) {
        void* p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    static void ccdgrid_unmap(void* p, size_t n) { munmap(p, n); }
    #endif
    """
    void* ccdgrid_map(size_t n) noexcept nogil
    void ccdgrid_unmap(void* p, size_t n) noexcept nogil


ctypedef fused idx_t:
    int32_t
    int64_t

ctypedef fused weight_t:
    float
    double

ctypedef fused image_t:
    float
    double


cdef enum:
    # Cells per axis of a pixel's bounding box at most (see MAX_SPAN), so
    # that the cell offset (r, c) in the box fits one byte as r * STRIDE + c.
    MAX_EXTENT = 15
    STRIDE = 16
    MAX_PIECES = MAX_EXTENT * MAX_EXTENT
    # Entries per storage block of the first pass (5 MiB with float32 weights).
    BLOCK = 1 << 20


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
# Each building thread owns one int32 count per output pixel: more threads
# than this would cost more memory than they save time.
MAX_BUILD_THREADS = 4


cdef struct Box:
    int64_t k0  # first output row and column of the bounding box
    int64_t l0
    int nk      # rows and columns of the bounding box
    int nl
    double area


cdef inline double snap(double c) noexcept nogil:
    cdef double r = rint(c)
    if fabs(c - r) <= C_SNAP:
        return r
    return c


cdef inline void snapped_row(const double* dy, const double* dx, int64_t i, int64_t nx,
                             double* ry, double* rx) noexcept nogil:
    """True positions of the corners of corner-grid row ``i``, snapped."""
    cdef int64_t j, a = i * (nx + 1)
    for j in range(nx + 1):
        ry[j] = snap(<double>i + dy[a + j])
        rx[j] = snap(<double>j + dx[a + j])


cdef inline int64_t ifloor(double x) noexcept nogil:
    """floor(x) for |x| < 2**62."""
    cdef int64_t t = <int64_t>x
    return t - 1 if <double>t > x else t


cdef inline int64_t iceil(double x) noexcept nogil:
    """ceil(x) for |x| < 2**62."""
    cdef int64_t t = <int64_t>x
    return t + 1 if <double>t < x else t


cdef inline void box_origin(const double* qy, const double* qx,
                            int64_t* k0, int64_t* l0) noexcept nogil:
    """First output cell of the bounding box (pixels accepted by pixel_box only)."""
    k0[0] = ifloor(min(min(qy[0], qy[1]), min(qy[2], qy[3])))
    l0[0] = ifloor(min(min(qx[0], qx[1]), min(qx[2], qx[3])))


cdef inline int pixel_box(const double* qy, const double* qx,
                          int64_t ny_out, int64_t nx_out, Box* box) noexcept nogil:
    """Check one quadrilateral (corners A, B, C, D) and find its bounding box.

    Returns -1 if it is degenerate (non-finite, area below AREA_MIN, which
    includes folded ones, self-intersecting, or higher or wider than
    MAX_SPAN), 0 if it lies outside the output grid, 1 otherwise (``box``
    filled).
    """
    cdef int m, n_opposite = 0
    cdef double area, ymin, ymax, xmin, xmax, cross
    # One test for all 8 coordinates: a sum is finite only if every term is
    # (or it overflows, for coordinates beyond 1e307: degenerate anyway).
    if not isfinite(qy[0] + qy[1] + qy[2] + qy[3] + qx[0] + qx[1] + qx[2] + qx[3]):
        return -1
    area = 0.5 * ((qy[2] - qy[0]) * (qx[3] - qx[1]) - (qx[2] - qx[0]) * (qy[3] - qy[1]))
    if not (area > C_AREA_MIN):
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
    # From here on |coordinates| < ny_out + MAX_SPAN: the integer casts are safe.
    box.k0 = ifloor(ymin)
    box.l0 = ifloor(xmin)
    box.nk = <int>(iceil(ymax) - box.k0)
    box.nl = <int>(iceil(xmax) - box.l0)
    box.area = area
    return 1


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


cdef int split_pixel(const double* qy, const double* qx,
                     int64_t ny_out, int64_t nx_out, Box* box,
                     uint8_t* codes, double* weights) noexcept nogil:
    """Split one quadrilateral over the output grid.

    ``qy``, ``qx``: its corners A, B, C, D in pyFAI pixel coordinates, already
    snapped. Writes up to MAX_PIECES pieces: ``codes`` = r * STRIDE + c, the
    output cell (box.k0 + r, box.l0 + c), in row-major order, and their
    weights. Returns their number, or -1 for a degenerate quadrilateral.
    """
    cdef int status = pixel_box(qy, qx, ny_out, nx_out, box)
    cdef int m, r, c, n = 0, nk, nl, base
    cdef int64_t k, col
    cdef double s, w, inv_area
    cdef double ly[4]
    cdef double lx[4]
    cdef double part[MAX_EXTENT * STRIDE]
    cdef double left[MAX_EXTENT * STRIDE]
    if status <= 0:
        return status
    nk = box.nk
    nl = box.nl
    if nk == 1 and nl == 1:
        # Inside one output pixel: all of the flux goes there, exactly.
        codes[0] = 0
        weights[0] = 1.0
        return 1
    # Box coordinates: subtracting an integer is exact here.
    for m in range(4):
        ly[m] = qy[m] - <double>box.k0
        lx[m] = qx[m] - <double>box.l0
    inv_area = 1.0 / box.area
    if nk == 2 and nl == 2:
        # The common case of a smooth distortion, without loops.
        split_2x2(ly, lx, box.area, part)
        for m in range(4):
            r = m >> 1
            c = m & 1
            k = box.k0 + r
            col = box.l0 + c
            w = part[m] * inv_area
            if w > C_WEIGHT_MIN and k >= 0 and col >= 0 and k < ny_out and col < nx_out:
                codes[n] = <uint8_t>(r * STRIDE + c)
                weights[n] = w
                n += 1
        return n
    for r in range(nk):
        for c in range(nl + 1):
            part[r * STRIDE + c] = 0.0
            left[r * STRIDE + c] = 0.0
    for m in range(4):
        add_edge(part, left, nk, nl, ly[m], lx[m], ly[(m + 1) % 4], lx[(m + 1) % 4])
    for r in range(nk):
        k = box.k0 + r
        if k < 0 or k >= ny_out:
            continue
        base = r * STRIDE
        s = 0.0
        for c in range(nl - 1, -1, -1):
            s += left[base + c + 1]
            part[base + c] += s
        for c in range(nl):
            col = box.l0 + c
            if col < 0 or col >= nx_out:
                continue
            w = part[base + c] * inv_area
            if w > C_WEIGHT_MIN:
                codes[n] = <uint8_t>(base + c)
                weights[n] = w
                n += 1
    return n


cdef struct Band:
    # The pieces of one band of input rows, in raster order, in blocks of
    # BLOCK entries: BLOCK one-byte cell codes, then BLOCK weights. Blocks are
    # mapped and unmapped one by one, so that the scatter pass hands memory
    # back to the system as it goes (the peak stays near the final matrix).
    char** blocks
    int64_t* used
    int64_t nblocks
    int64_t cap


cdef int band_new_block(Band* band, size_t block_bytes) noexcept nogil:
    cdef void* tmp
    cdef char* block
    if band.nblocks == band.cap:
        band.cap = 2 * band.cap + 8
        tmp = realloc(band.blocks, band.cap * sizeof(char*))
        if tmp == NULL:
            return -1
        band.blocks = <char**>tmp
        tmp = realloc(band.used, band.cap * sizeof(int64_t))
        if tmp == NULL:
            return -1
        band.used = <int64_t*>tmp
    block = <char*>ccdgrid_map(block_bytes)
    if block == NULL:
        return -1
    band.blocks[band.nblocks] = block
    band.used[band.nblocks] = 0
    band.nblocks += 1
    return 0


cdef void band_release(Band* band, int64_t b, size_t block_bytes) noexcept nogil:
    if band.blocks != NULL and band.blocks[b] != NULL:
        ccdgrid_unmap(band.blocks[b], block_bytes)
        band.blocks[b] = NULL


cdef void band_free(Band* band, size_t block_bytes) noexcept nogil:
    cdef int64_t b
    for b in range(band.nblocks):
        band_release(band, b, block_bytes)
    free(band.blocks)
    free(band.used)
    band.blocks = NULL
    band.used = NULL
    band.nblocks = 0


cdef int split_band(const double* dy, const double* dx, const uint8_t* mask,
                    int64_t nx, int64_t row_start, int64_t row_stop,
                    int64_t ny_out, int64_t nx_out,
                    int32_t* counts, uint8_t* npieces, Band* band,
                    weight_t* witness, int64_t* n_degenerate) noexcept nogil:
    """First pass over input rows [row_start, row_stop).

    Stores the pieces of the band's pixels in ``band`` (a pixel's pieces
    never straddle two blocks), their number per pixel in ``npieces`` and
    per output pixel in ``counts``. ``witness`` only selects the weight
    dtype. Returns -1 if memory ran out, else 0.
    """
    cdef int64_t i, j, p, bin0, used = BLOCK, ndeg = 0
    cdef int m, n
    cdef Box box
    cdef double qy[4]
    cdef double qx[4]
    cdef uint8_t lcodes[MAX_PIECES]
    cdef double lweights[MAX_PIECES]
    cdef size_t block_bytes = BLOCK * (1 + sizeof(weight_t))
    cdef uint8_t* cbuf = NULL
    cdef weight_t* wbuf = NULL
    cdef double* rows = <double*>malloc(4 * (nx + 1) * sizeof(double))
    cdef double* y0r
    cdef double* x0r
    cdef double* y1r
    cdef double* x1r
    cdef double* swap
    if rows == NULL:
        return -1
    y0r = rows
    x0r = rows + (nx + 1)
    y1r = rows + 2 * (nx + 1)
    x1r = rows + 3 * (nx + 1)
    snapped_row(dy, dx, row_start, nx, y0r, x0r)
    for i in range(row_start, row_stop):
        snapped_row(dy, dx, i + 1, nx, y1r, x1r)
        for j in range(nx):
            p = i * nx + j
            npieces[p] = 0
            if mask[p]:
                continue
            qy[0] = y0r[j]
            qx[0] = x0r[j]
            qy[1] = y1r[j]
            qx[1] = x1r[j]
            qy[2] = y1r[j + 1]
            qx[2] = x1r[j + 1]
            qy[3] = y0r[j + 1]
            qx[3] = x0r[j + 1]
            n = split_pixel(qy, qx, ny_out, nx_out, &box, lcodes, lweights)
            if n < 0:
                ndeg += 1
                continue
            if n == 0:
                continue
            if used + n > BLOCK:
                if band_new_block(band, block_bytes) != 0:
                    free(rows)
                    return -1
                cbuf = <uint8_t*>band.blocks[band.nblocks - 1]
                wbuf = <weight_t*>(band.blocks[band.nblocks - 1] + BLOCK)
                used = 0
            npieces[p] = <uint8_t>n
            bin0 = box.k0 * nx_out + box.l0
            for m in range(n):
                cbuf[used + m] = lcodes[m]
                wbuf[used + m] = <weight_t>lweights[m]
                counts[bin0 + (lcodes[m] // STRIDE) * nx_out + lcodes[m] % STRIDE] += 1
            used += n
            band.used[band.nblocks - 1] = used
        swap = y0r
        y0r = y1r
        y1r = swap
        swap = x0r
        x0r = x1r
        x1r = swap
    free(rows)
    n_degenerate[0] = ndeg
    return 0


cdef int scatter_band(const double* dy, const double* dx, int64_t nx,
                      int64_t row_start, int64_t row_stop, int64_t nx_out,
                      const uint8_t* npieces, Band* band,
                      idx_t* cursors, idx_t* indices, weight_t* data) noexcept nogil:
    """Second pass over the same rows: move each stored piece to its slot.

    Releases each block of ``band`` once it has been read.
    """
    cdef int64_t i, j, p, e = 0, k0, l0, b, blk = 0
    cdef int n
    cdef idx_t pos
    cdef double qy[4]
    cdef double qx[4]
    cdef size_t block_bytes = BLOCK * (1 + sizeof(weight_t))
    cdef const uint8_t* cbuf = <uint8_t*>band.blocks[0]
    cdef const weight_t* wbuf = <weight_t*>(band.blocks[0] + BLOCK)
    cdef double* rows = <double*>malloc(4 * (nx + 1) * sizeof(double))
    cdef double* y0r
    cdef double* x0r
    cdef double* y1r
    cdef double* x1r
    cdef double* swap
    if rows == NULL:
        return -1
    y0r = rows
    x0r = rows + (nx + 1)
    y1r = rows + 2 * (nx + 1)
    x1r = rows + 3 * (nx + 1)
    snapped_row(dy, dx, row_start, nx, y0r, x0r)
    for i in range(row_start, row_stop):
        snapped_row(dy, dx, i + 1, nx, y1r, x1r)
        for j in range(nx):
            p = i * nx + j
            n = npieces[p]
            if n == 0:
                continue
            if e == band.used[blk]:
                band_release(band, blk, block_bytes)
                blk += 1
                cbuf = <uint8_t*>band.blocks[blk]
                wbuf = <weight_t*>(band.blocks[blk] + BLOCK)
                e = 0
            qy[0] = y0r[j]
            qx[0] = x0r[j]
            qy[1] = y1r[j]
            qx[1] = x1r[j]
            qy[2] = y1r[j + 1]
            qx[2] = x1r[j + 1]
            qy[3] = y0r[j + 1]
            qx[3] = x0r[j + 1]
            # The same corners give the same box as in the first pass.
            box_origin(qy, qx, &k0, &l0)
            for _ in range(n):
                b = (k0 + cbuf[e] // STRIDE) * nx_out + l0 + cbuf[e] % STRIDE
                pos = cursors[b]
                indices[pos] = <idx_t>p
                data[pos] = wbuf[e]
                cursors[b] = pos + 1
                e += 1
        swap = y0r
        y0r = y1r
        y1r = swap
        swap = x0r
        x0r = x1r
        x1r = swap
    free(rows)
    band_free(band, block_bytes)
    return 0


def _counts_to_cursors(int32_t[:, ::1] counts, idx_t[:, ::1] cursors, idx_t[::1] indptr):
    """Row pointers of the matrix, and each band's first slot in every row.

    ``cursors`` may be ``counts`` itself (int32 case): each count is read
    before its slot is overwritten.
    """
    cdef Py_ssize_t nthreads = counts.shape[0], nbins = counts.shape[1], b, t
    cdef int64_t running = 0, c
    with nogil:
        for b in range(nbins):
            indptr[b] = <idx_t>running
            for t in range(nthreads):
                c = counts[t, b]
                cursors[t, b] = <idx_t>running
                running += c
        indptr[nbins] = <idx_t>running


def _split(const double[:, ::1] dy, const double[:, ::1] dx,
           const uint8_t[:, ::1] mask, int64_t ny_out, int64_t nx_out,
           weight_t[::1] witness, int nthreads):
    cdef int64_t ny = mask.shape[0], nx = mask.shape[1]
    cdef int64_t nbins = ny_out * nx_out, nnz = 0, n_deg = 0, b
    cdef int t, nt = nthreads
    cdef size_t block_bytes = BLOCK * (1 + sizeof(weight_t))
    cdef Band* bands = <Band*>calloc(nt, sizeof(Band))
    cdef int64_t* degs = <int64_t*>calloc(nt, sizeof(int64_t))
    cdef int* status = <int*>calloc(nt, sizeof(int))
    cdef int32_t[:, ::1] counts_v
    cdef uint8_t[::1] npieces_v
    cdef int32_t[:, ::1] cur32
    cdef int64_t[:, ::1] cur64
    cdef int32_t[::1] ind32
    cdef int64_t[::1] ind64
    cdef weight_t[::1] data_v
    try:
        if bands == NULL or degs == NULL or status == NULL:
            raise MemoryError("cannot allocate the band tables")
        counts = np.zeros((nt, nbins), dtype=np.int32)
        npieces = np.empty(ny * nx, dtype=np.uint8)
        counts_v = counts
        npieces_v = npieces
        for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
            status[t] = split_band(&dy[0, 0], &dx[0, 0], &mask[0, 0], nx,
                                   t * ny // nt, (t + 1) * ny // nt, ny_out, nx_out,
                                   &counts_v[t, 0], &npieces_v[0], &bands[t],
                                   &witness[0], &degs[t])
        for t in range(nt):
            if status[t] != 0:
                raise MemoryError("cannot allocate the pixel-splitting buffers")
            for b in range(bands[t].nblocks):
                nnz += bands[t].used[b]
            n_deg += degs[t]

        small = nnz < 2**31 and ny * nx < 2**31 and nbins < 2**31
        idx_dtype = np.int32 if small else np.int64
        cursors = counts if small else counts.astype(np.int64)
        del counts
        indptr = np.empty(nbins + 1, dtype=idx_dtype)
        _counts_to_cursors(counts_v, cursors, indptr)
        indices = np.empty(max(nnz, 1), dtype=idx_dtype)
        data = np.empty(max(nnz, 1), dtype=witness.base.dtype)
        data_v = data
        if small:
            cur32 = cursors
            ind32 = indices
            for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
                if bands[t].nblocks > 0:
                    status[t] = scatter_band(&dy[0, 0], &dx[0, 0], nx, t * ny // nt,
                                             (t + 1) * ny // nt, nx_out, &npieces_v[0],
                                             &bands[t], &cur32[t, 0], &ind32[0], &data_v[0])
        else:
            cur64 = cursors
            ind64 = indices
            for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
                if bands[t].nblocks > 0:
                    status[t] = scatter_band(&dy[0, 0], &dx[0, 0], nx, t * ny // nt,
                                             (t + 1) * ny // nt, nx_out, &npieces_v[0],
                                             &bands[t], &cur64[t, 0], &ind64[0], &data_v[0])
        for t in range(nt):
            if status[t] != 0:
                raise MemoryError("cannot allocate the pixel-splitting buffers")
    finally:
        if bands != NULL:
            for t in range(nt):
                band_free(&bands[t], block_bytes)
        free(bands)
        free(degs)
        free(status)
    return data[:nnz], indices[:nnz], indptr, int(n_deg)


def split_pixels(dy, dx, mask, ny_out, nx_out, weight_dtype, nthreads=0):
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
        [k, k+1] x [l, l+1].
    weight_dtype : {numpy.float32, numpy.float64}
        Dtype of the stored weights (always computed in float64).
    nthreads : int, optional
        Threads to use; 0 means OpenMP's default. Small jobs use one, and
        never more than MAX_BUILD_THREADS are used.

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
    """
    cdef int64_t ny = mask.shape[0]
    cdef int nt = <int>nthreads if nthreads > 0 else ccdgrid_max_threads()
    if mask.size < PARALLEL_MIN_PIXELS:
        nt = 1
    nt = <int>max(1, min(nt, ny, MAX_BUILD_THREADS))
    witness = np.empty(1, dtype=weight_dtype)
    return _split(dy, dx, mask, ny_out, nx_out, witness, nt)


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
              const image_t[:, ::1] images, image_t[:, ::1] out,
              const double[::1] coverage, bint normalize, double dummy, int nthreads=0):
    """``out[m] = M @ images[m]`` for every image m of a stack, in place.

    Parameters
    ----------
    indptr, indices, data : CSR arrays of M, shape (nbins, npix)
    images : ndarray of float32 or float64, shape (n, npix)
        The accumulator has this dtype (float32 sums for float32 images).
    out : ndarray, same dtype as images, shape (n, nbins)
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
    if nbins * nimg < PARALLEL_MIN_PIXELS:
        nt = 1
    for b in prange(nbins, nogil=True, num_threads=nt, schedule="static"):
        start = indptr[b]
        stop = indptr[b + 1]
        for m in range(nimg):
            if start == stop:
                out[m, b] = c_dummy
                continue
            acc = 0
            for p in range(start, stop):
                acc = acc + <image_t>(data[p] * images[m, indices[p]])
            if normalize:
                acc = <image_t>(acc / coverage[b])
            out[m, b] = acc
