"""Exact pixel splitting: the sparse distortion-correction matrix, and applying it.

Geometry (pyFAI coordinates, in pixels): corner ``(i, j)`` of the input pixel
grid nominally sits at ``(i, j)`` and truly at ``(i + dy[i, j], j + dx[i, j])``.
Input pixel ``(i, j)`` is the quadrilateral of its true corners A = (i, j),
B = (i+1, j), C = (i+1, j+1), D = (i, j+1); output pixel ``(k, l)`` is the unit
square ``[k, k+1] x [l, l+1]``. The weight of (output, input) is the area of
their intersection divided by the area of the quadrilateral, computed by exact
polygon splitting: the quadrilateral is cut into row strips along ``y = k``,
then each strip into cells along ``x = l`` (a two-sided Sutherland-Hodgman
split, so each cut is done once, not once per cell).

The matrix is built in compressed-sparse-row form (one row per output pixel)
in two passes over the input pixels that run the same deterministic code:
the first counts the non-zeros of every output row, the second writes them.
Memory is the final matrix plus one int32 count per output pixel and thread.
With OpenMP, each thread handles one contiguous band of input rows and owns
one count array, so that every row of the matrix lists its input pixels in
raster order whatever the number of threads.

The functions here trust their inputs (the façade ``ccdgrid.correction``
checks them): C-contiguous arrays of the stated shapes and dtypes, and the
preconditions stated in each docstring. Nothing here reads or writes out of
bounds for any finite or non-finite displacement values.
"""

from cython.parallel cimport prange
from libc.math cimport ceil, fabs, floor, isfinite, rint
from libc.stdint cimport int32_t, int64_t

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
    # Vertex capacity of a polygon. A simple quadrilateral never needs more
    # than about 20 after the row and column cuts; splitting refuses inputs
    # above MAXV / 2 vertices, so a buffer can never overflow.
    MAXV = 64
    # A pixel whose bounding box spans more than MAX_EXTENT output pixels
    # along either axis is dropped as degenerate: it bounds the work and the
    # stack buffers per pixel (a real distortion is nowhere near it).
    MAX_EXTENT = 16
    MAX_PIECES = MAX_EXTENT * MAX_EXTENT


# Corner coordinates closer than this to an integer are snapped onto it, so
# that an undistorted grid gives exactly one weight of 1.0 per pixel.
SNAP = 1e-9
# Quadrilaterals with a smaller area (px²) are degenerate and dropped.
AREA_MIN = 1e-9
# Pieces with a smaller weight are rounding noise of a cut along a vertex or
# an edge and are not stored (at most 1e-13 of a pixel's flux each).
WEIGHT_MIN = 1e-13

cdef double C_SNAP = SNAP
cdef double C_AREA_MIN = AREA_MIN
cdef double C_WEIGHT_MIN = WEIGHT_MIN

# Below this many pixels a job is run on one thread: starting threads costs
# more than it saves.
PARALLEL_MIN_PIXELS = 1 << 16


cdef struct Poly:
    int n
    double v[2][MAXV]  # v[0] = y, v[1] = x


cdef inline double snap(double c) noexcept nogil:
    cdef double r = rint(c)
    if fabs(c - r) <= C_SNAP:
        return r
    return c


cdef inline bint split(const Poly* p, int axis, double c, Poly* lo, Poly* hi) noexcept nogil:
    """Cut ``p`` along the line ``v[axis] == c`` into ``lo`` (<= c) and ``hi`` (>= c).

    Vertices on the line go to both sides; crossing points are placed exactly
    on the line. Returns False (outputs undefined) if ``p`` has too many
    vertices for the buffers.
    """
    cdef int i, j, n = p.n, other = 1 - axis
    cdef double a0, a1, b0, b1, b
    lo.n = 0
    hi.n = 0
    if n > MAXV // 2:
        return False
    for i in range(n):
        j = i + 1
        if j == n:
            j = 0
        a0 = p.v[axis][i]
        a1 = p.v[axis][j]
        b0 = p.v[other][i]
        if a0 <= c:
            lo.v[axis][lo.n] = a0
            lo.v[other][lo.n] = b0
            lo.n += 1
        if a0 >= c:
            hi.v[axis][hi.n] = a0
            hi.v[other][hi.n] = b0
            hi.n += 1
        if (a0 < c and a1 > c) or (a0 > c and a1 < c):
            b1 = p.v[other][j]
            b = b0 + (c - a0) / (a1 - a0) * (b1 - b0)
            lo.v[axis][lo.n] = c
            lo.v[other][lo.n] = b
            lo.n += 1
            hi.v[axis][hi.n] = c
            hi.v[other][hi.n] = b
            hi.n += 1
    return True


cdef inline double poly_area(const Poly* p) noexcept nogil:
    """Signed area, positive for the orientation A -> B -> C -> D of a pixel."""
    cdef int i
    cdef double y0 = p.v[0][0], x0 = p.v[1][0], s = 0.0
    for i in range(1, p.n - 1):
        s += ((p.v[0][i] - y0) * (p.v[1][i + 1] - x0)
              - (p.v[0][i + 1] - y0) * (p.v[1][i] - x0))
    return 0.5 * s


cdef int split_pixel(const double* qy, const double* qx,
                     int64_t ny_out, int64_t nx_out,
                     int64_t* bins, double* weights) noexcept nogil:
    """Split one quadrilateral over the output grid.

    ``qy``, ``qx``: the 4 corners A, B, C, D in pyFAI pixel coordinates
    (already snapped). Writes up to MAX_PIECES (output flat index, weight)
    pairs, in row-major order of the output cells, and returns their number;
    returns -1 for a degenerate quadrilateral (non-finite, area below
    AREA_MIN, self-intersecting, or wider than MAX_EXTENT).
    """
    cdef int m, n_opposite = 0, npieces = 0
    cdef int kk, ll, nk, nl, lmin, lmax
    cdef int64_t k0, l0, k, l
    cdef double area, ymin, ymax, xmin, xmax, cross, w
    cdef double ey0, ex0, ey1, ex1
    cdef Poly quad, strip, cell, row_a, row_b, col_a, col_b
    cdef Poly* rest
    cdef Poly* nxt
    cdef Poly* s
    cdef Poly* crest
    cdef Poly* c

    for m in range(4):
        if not (isfinite(qy[m]) and isfinite(qx[m])):
            return -1
    area = 0.5 * ((qy[2] - qy[0]) * (qx[3] - qx[1]) - (qx[2] - qx[0]) * (qy[3] - qy[1]))
    if not (area > C_AREA_MIN):
        return -1
    # A simple quadrilateral turns against its orientation at most once (at a
    # concave vertex); a self-intersecting one ("bow tie") does so twice.
    for m in range(4):
        ey0 = qy[m] - qy[(m + 3) % 4]
        ex0 = qx[m] - qx[(m + 3) % 4]
        ey1 = qy[(m + 1) % 4] - qy[m]
        ex1 = qx[(m + 1) % 4] - qx[m]
        cross = ey0 * ex1 - ex0 * ey1
        if cross < 0.0:
            n_opposite += 1
    if n_opposite > 1:
        return -1

    ymin = ymax = qy[0]
    xmin = xmax = qx[0]
    for m in range(1, 4):
        ymin = min(ymin, qy[m])
        ymax = max(ymax, qy[m])
        xmin = min(xmin, qx[m])
        xmax = max(xmax, qx[m])
    if ceil(ymax) - floor(ymin) > MAX_EXTENT or ceil(xmax) - floor(xmin) > MAX_EXTENT:
        return -1
    if ymax <= 0.0 or xmax <= 0.0 or ymin >= <double>ny_out or xmin >= <double>nx_out:
        return 0  # entirely outside the output: valid, contributes nothing
    k0 = <int64_t>floor(ymin)
    l0 = <int64_t>floor(xmin)
    nk = <int>(<int64_t>ceil(ymax) - k0)
    nl = <int>(<int64_t>ceil(xmax) - l0)

    if nk == 1 and nl == 1:
        # Inside one output pixel: all of the flux goes there, exactly.
        if k0 >= 0 and l0 >= 0 and k0 < ny_out and l0 < nx_out:
            bins[0] = k0 * nx_out + l0
            weights[0] = 1.0
            return 1
        return 0

    # Local coordinates (subtracting an integer is exact here), so that the
    # areas are computed on small numbers.
    quad.n = 4
    for m in range(4):
        quad.v[0][m] = qy[m] - <double>k0
        quad.v[1][m] = qx[m] - <double>l0

    rest = &quad
    for kk in range(nk):
        k = k0 + kk
        if kk < nk - 1:
            nxt = &row_a if rest != &row_a else &row_b
            if not split(rest, 0, <double>(kk + 1), &strip, nxt):
                return -1
            rest = nxt
            s = &strip
        else:
            s = rest
        if k < 0 or k >= ny_out or s.n < 3:
            continue
        xmin = xmax = s.v[1][0]
        for m in range(1, s.n):
            xmin = min(xmin, s.v[1][m])
            xmax = max(xmax, s.v[1][m])
        lmin = <int>floor(xmin)
        lmax = <int>ceil(xmax)
        crest = s
        for ll in range(lmin, lmax):
            l = l0 + ll
            if ll < lmax - 1:
                nxt = &col_a if crest != &col_a else &col_b
                if not split(crest, 1, <double>(ll + 1), &cell, nxt):
                    return -1
                crest = nxt
                c = &cell
            else:
                c = crest
            if l < 0 or l >= nx_out or c.n < 3:
                continue
            w = poly_area(c) / area
            if w > C_WEIGHT_MIN:
                bins[npieces] = k * nx_out + l
                weights[npieces] = w
                npieces += 1
    return npieces


cdef inline void pixel_corners(const double* dy, const double* dx, int64_t stride,
                               int64_t i, int64_t j, double* qy, double* qx) noexcept nogil:
    """Snapped true corners A, B, C, D of input pixel (i, j) (corner grid row stride)."""
    cdef int64_t a = i * stride + j
    qy[0] = snap(<double>i + dy[a])
    qx[0] = snap(<double>j + dx[a])
    qy[1] = snap(<double>(i + 1) + dy[a + stride])
    qx[1] = snap(<double>j + dx[a + stride])
    qy[2] = snap(<double>(i + 1) + dy[a + stride + 1])
    qx[2] = snap(<double>(j + 1) + dx[a + stride + 1])
    qy[3] = snap(<double>i + dy[a + 1])
    qx[3] = snap(<double>(j + 1) + dx[a + 1])


cdef int64_t count_band(const double* dy, const double* dx, const unsigned char* mask,
                        int64_t nx, int64_t row_start, int64_t row_stop,
                        int64_t ny_out, int64_t nx_out, int32_t* counts) noexcept nogil:
    """First pass over input rows [row_start, row_stop): non-zeros per output pixel.

    Adds to ``counts`` (length ny_out * nx_out); returns the number of
    unmasked pixels found degenerate.
    """
    cdef int64_t i, j, n_degenerate = 0
    cdef int m, npieces
    cdef double qy[4]
    cdef double qx[4]
    cdef int64_t bins[MAX_PIECES]
    cdef double weights[MAX_PIECES]
    for i in range(row_start, row_stop):
        for j in range(nx):
            if mask[i * nx + j]:
                continue
            pixel_corners(dy, dx, nx + 1, i, j, qy, qx)
            npieces = split_pixel(qy, qx, ny_out, nx_out, bins, weights)
            if npieces < 0:
                n_degenerate += 1
                continue
            for m in range(npieces):
                counts[bins[m]] += 1
    return n_degenerate


cdef void fill_band(const double* dy, const double* dx, const unsigned char* mask,
                    int64_t nx, int64_t row_start, int64_t row_stop,
                    int64_t ny_out, int64_t nx_out,
                    idx_t* cursors, idx_t* indices, weight_t* data) noexcept nogil:
    """Second pass over the same rows: write each piece at its output row's cursor."""
    cdef int64_t i, j
    cdef int m, npieces
    cdef idx_t pos
    cdef double qy[4]
    cdef double qx[4]
    cdef int64_t bins[MAX_PIECES]
    cdef double weights[MAX_PIECES]
    for i in range(row_start, row_stop):
        for j in range(nx):
            if mask[i * nx + j]:
                continue
            pixel_corners(dy, dx, nx + 1, i, j, qy, qx)
            npieces = split_pixel(qy, qx, ny_out, nx_out, bins, weights)
            for m in range(npieces):
                pos = cursors[bins[m]]
                indices[pos] = <idx_t>(i * nx + j)
                data[pos] = <weight_t>weights[m]
                cursors[bins[m]] = pos + 1


def _counts_to_cursors(int32_t[:, ::1] counts, idx_t[:, ::1] cursors, idx_t[::1] indptr):
    """Row pointers of the matrix, and each band's first free slot in every row.

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


def _fill(const double[:, ::1] dy, const double[:, ::1] dx,
          const unsigned char[:, ::1] mask, int64_t ny_out, int64_t nx_out,
          idx_t[:, ::1] cursors, idx_t[::1] indices, weight_t[::1] data):
    cdef int nthreads = <int>cursors.shape[0]
    cdef int t
    cdef int64_t ny = mask.shape[0], nx = mask.shape[1]
    for t in prange(nthreads, nogil=True, num_threads=nthreads, schedule="static", chunksize=1):
        fill_band(&dy[0, 0], &dx[0, 0], &mask[0, 0], nx,
                  t * ny // nthreads, (t + 1) * ny // nthreads,
                  ny_out, nx_out, &cursors[t, 0], &indices[0], &data[0])


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
        Threads to use; 0 means OpenMP's default. Small jobs use one.

    Returns
    -------
    data : ndarray of weight_dtype, shape (nnz,)
    indices : ndarray of int32 or int64, shape (nnz,)
        Flat input pixel index ``i * nx + j``, increasing within each row.
    indptr : ndarray of the same integer dtype, shape (ny_out * nx_out + 1,)
    n_degenerate : int
        Unmasked input pixels dropped: non-finite corners, area below
        ``AREA_MIN`` px², self-intersecting, or a bounding box wider than
        16 output pixels.

    Notes
    -----
    Preconditions (unchecked): the shapes and dtypes above, ny, nx >= 1.
    """
    cdef int64_t ny = mask.shape[0], nx = mask.shape[1]
    cdef int64_t nbins = <int64_t>ny_out * <int64_t>nx_out
    cdef int nt = <int>nthreads if nthreads > 0 else ccdgrid_max_threads()
    cdef int t
    if ny * nx < PARALLEL_MIN_PIXELS:
        nt = 1
    nt = <int>max(1, min(nt, ny))

    cdef const double[:, ::1] dy_v = dy
    cdef const double[:, ::1] dx_v = dx
    cdef const unsigned char[:, ::1] mask_v = mask
    counts = np.zeros((nt, nbins), dtype=np.int32)
    n_deg = np.zeros(nt, dtype=np.int64)
    cdef int32_t[:, ::1] counts_v = counts
    cdef int64_t[::1] n_deg_v = n_deg
    cdef int64_t c_ny_out = ny_out, c_nx_out = nx_out
    for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
        n_deg_v[t] = count_band(&dy_v[0, 0], &dx_v[0, 0], &mask_v[0, 0], nx,
                                t * ny // nt, (t + 1) * ny // nt,
                                c_ny_out, c_nx_out, &counts_v[t, 0])

    nnz = int(counts.sum(dtype=np.int64))
    small = nnz < 2**31 and ny * nx < 2**31 and nbins < 2**31
    idx_dtype = np.int32 if small else np.int64
    cursors = counts if small else counts.astype(np.int64)
    indptr = np.empty(nbins + 1, dtype=idx_dtype)
    _counts_to_cursors(counts, cursors, indptr)
    indices = np.empty(nnz, dtype=idx_dtype)
    data = np.empty(nnz, dtype=weight_dtype)
    if nnz:
        _fill(dy, dx, mask, ny_out, nx_out, cursors, indices, data)
    return data, indices, indptr, int(n_deg.sum())


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
