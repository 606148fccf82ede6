"""Inverse watershed segmentation and singleton merging (compiled kernels).

Private: :mod:`ccdgrid.watershed` validates the inputs and calls these. The
pure-numpy twins with the same signatures are in
:mod:`ccdgrid._reference.watershed`; both follow PYFAI_NOTES section 1.

Preconditions (not checked here; breaking them reads out of bounds):
``data`` is C-contiguous float32 or float64 (h, w) with h*w >= 1 (float64
values are rounded to float32 where read, so no float32 copy of the image
is made); the segmentation arrays passed to :func:`merge_kernel` are
exactly those :func:`segment_kernel` returned for that ``data``.
"""

import numpy as np

from libc.math cimport INFINITY, NAN, isnan
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy

ctypedef fused index_t:
    int32_t
    int64_t

ctypedef fused real_t:
    float
    double


cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    #endif
    /* Map the whole pages of a fresh buffer for writing in one madvise call
       (Linux >= 5.14 keeps the contents); elsewhere, or if it fails, leave
       them to fault in where they are first written. */
    static void ccdgrid_populate(char *buf, size_t nbytes)
    {
    #if defined(__linux__)
        const uintptr_t page = 4096;
        uintptr_t a = ((uintptr_t)buf + page - 1) / page * page;
        uintptr_t e = ((uintptr_t)buf + nbytes) / page * page;
        if (e > a)
            (void)madvise((void *)a, e - a, MADV_POPULATE_WRITE);
    #else
        (void)buf;
        (void)nbytes;
    #endif
    }
    """
    void _populate "ccdgrid_populate" (char *buf, size_t nbytes) noexcept nogil


#: Fresh outputs of at least this many bytes are mapped up front (see :func:`_fresh`).
_POPULATE_MIN_BYTES = 1 << 20


def _fresh(shape, dtype):
    """``np.empty(shape, dtype)`` with its pages mapped in one system call when it is large.

    A fresh output costs a page fault per page where the kernel first writes
    it; on 4 KiB pages (when numpy gets no huge pages) that was a third of
    the time of segment + merge at 2048². Mapping the pages in one
    ``madvise(MADV_POPULATE_WRITE)`` skips the fault entry and exit of each
    (26 % less time per MB measured; on huge pages it changes nothing).
    Mapping them from a second thread was much slower here, so it is not.
    """
    out = np.empty(shape, dtype)
    cdef Py_ssize_t nbytes = out.nbytes
    cdef char[::1] raw
    if nbytes >= _POPULATE_MIN_BYTES:
        raw = out.reshape(-1).view(np.int8)
        with nogil:
            _populate(&raw[0], nbytes)
    return out


def _block(*specs):
    """Arrays of the given ``(length, dtype)``, as views into one allocation.

    numpy maps allocations of 4 MiB or more with huge pages; arrays of a
    few MB each would take a page fault per 4 KiB instead, which cost about
    0.5 ms per MB where this was measured (as much as the kernels' work on
    them). Views start on 64-byte boundaries.
    """
    sizes = [(n * np.dtype(dt).itemsize + 63) // 64 * 64 for n, dt in specs]
    buf = _fresh(max(sum(sizes), 1), np.uint8)
    out = []
    off = 0
    for (n, dt), nbytes in zip(specs, sizes):
        out.append(buf[off:off + n * np.dtype(dt).itemsize].view(dt))
        off += nbytes
    return out


cdef inline int64_t _recorded_neighbour(
    const index_t *lab, int64_t p, uint8_t bits, int64_t w
) noexcept nogil:
    """Label of the one neighbour pyFAI records for a border pixel.

    Priority N, E, S, W, NW, NE, SE, SW; ``bits`` must be non-zero.
    """
    if bits & 2:
        return lab[p - w]
    if bits & 8:
        return lab[p + 1]
    if bits & 32:
        return lab[p + w]
    if bits & 128:
        return lab[p - 1]
    if bits & 1:
        return lab[p - w - 1]
    if bits & 4:
        return lab[p - w + 1]
    if bits & 16:
        return lab[p + w + 1]
    return lab[p + w - 1]


cdef inline uint8_t _border_bits(
    const index_t *lab, int64_t i, int64_t j, int64_t h, int64_t w
) noexcept nogil:
    """8-neighbour bitmask of neighbours inside the image with another label."""
    cdef int64_t p = i * w + j
    cdef index_t c = lab[p]
    cdef uint8_t bits = 0
    if i > 0:
        if j > 0 and lab[p - w - 1] != c:
            bits |= 1
        if lab[p - w] != c:
            bits |= 2
        if j < w - 1 and lab[p - w + 1] != c:
            bits |= 4
    if j < w - 1 and lab[p + 1] != c:
        bits |= 8
    if i < h - 1:
        if j < w - 1 and lab[p + w + 1] != c:
            bits |= 16
        if lab[p + w] != c:
            bits |= 32
        if j > 0 and lab[p + w - 1] != c:
            bits |= 64
    if j > 0 and lab[p - 1] != c:
        bits |= 128
    return bits


cdef inline void _offsets(int64_t w, int64_t *off) noexcept nogil:
    """Flat offset of the neighbour tested by each bit of the border bitmask."""
    off[0] = -w - 1
    off[1] = -w
    off[2] = -w + 1
    off[3] = 1
    off[4] = w + 1
    off[5] = w
    off[6] = w - 1
    off[7] = -1


cdef inline void _first_priority(int8_t *first) noexcept nogil:
    """``first[bits]``: the bit pyFAI records for a border pixel (N, E, S, W, NW, NE, SE, SW)."""
    cdef int bits, k
    cdef int prio[8]
    prio[:] = [1, 3, 5, 7, 0, 2, 4, 6]
    first[0] = -1
    for bits in range(1, 256):
        for k in range(8):
            if (bits >> prio[k]) & 1:
                first[bits] = prio[k]
                break


cdef extern from *:
    """
    /* The row loops below vectorise; on x86-64 gcc also builds an AVX2 copy
       and picks it at load time on CPUs that have it. */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define CCDGRID_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define CCDGRID_SIMD_CLONES
    #endif
    /* One window position for a whole row: where src beats the running best,
       take its value and code. restrict lets the compiler vectorise it. */
    CCDGRID_SIMD_CLONES
    static void ccdgrid_row_best(const float *restrict src, float *restrict best_v,
                                 int32_t *restrict best_k, Py_ssize_t n, int32_t code)
    {
        for (Py_ssize_t j = 0; j < n; j++) {
            float u = src[j], v = best_v[j];
            int32_t k = best_k[j];
            int32_t c = -(int32_t)(u > v);
            best_v[j] = u > v ? u : v;
            best_k[j] = k ^ ((k ^ code) & c);
        }
    }
    """
    void _row_best "ccdgrid_row_best" (
        const float *src, float *best_v, int32_t *best_k, Py_ssize_t n, int32_t code
    ) noexcept nogil


cdef extern from *:
    """
    /* Border bitmask of the interior pixels of one row (see _border_bits),
       from the codes of the rows above, at and below it. */
    #define CCDGRID_ROW_BITS(T)                                                   \\
    CCDGRID_SIMD_CLONES                                                           \\
    static void ccdgrid_row_bits_##T(const T *up, const T *mid, const T *dn,      \\
                                     uint8_t *restrict out, Py_ssize_t n)         \\
    {                                                                             \\
        for (Py_ssize_t j = 0; j < n; j++) {                                      \\
            T c = mid[j];                                                         \\
            out[j] = (uint8_t)((up[j - 1] != c) | ((up[j] != c) << 1)             \\
                               | ((up[j + 1] != c) << 2) | ((mid[j + 1] != c) << 3) \\
                               | ((dn[j + 1] != c) << 4) | ((dn[j] != c) << 5)    \\
                               | ((dn[j - 1] != c) << 6) | ((mid[j - 1] != c) << 7)); \\
        }                                                                         \\
    }
    CCDGRID_ROW_BITS(int32_t)
    CCDGRID_ROW_BITS(int64_t)
    """
    void _row_bits32 "ccdgrid_row_bits_int32_t" (
        const int32_t *up, const int32_t *mid, const int32_t *dn, uint8_t *out, Py_ssize_t n
    ) noexcept nogil
    void _row_bits64 "ccdgrid_row_bits_int64_t" (
        const int64_t *up, const int64_t *mid, const int64_t *dn, uint8_t *out, Py_ssize_t n
    ) noexcept nogil


cdef inline const float *_row_f32(
    const real_t *d, float *ring, int64_t i, int64_t w
) noexcept nogil:
    """Row i of the image as float32: in place, or in the 3-row ring for float64 data."""
    if real_t is float:
        return d + i * w
    else:
        return ring + (i % 3) * w


cdef inline void _load_row(const real_t *d, float *ring, int64_t i, int64_t w) noexcept nogil:
    """Round row i of float64 data to float32 into its ring slot (float32 data: nothing)."""
    cdef int64_t j
    cdef float *out = ring + (i % 3) * w
    cdef const real_t *src = d + i * w
    if real_t is double:
        for j in range(w):
            out[j] = <float>src[j]


cdef int64_t _climb_rows(
    const real_t *d, index_t *a, int64_t h, int64_t w, float *best_v, int32_t *best_k,
    float *ring, int64_t **peak, int64_t *cap
) noexcept nogil:
    """Successor pointers, row by row, already resolved where that is free.

    A pixel's successor is the first maximum of its 3x3 window in raster
    order if strictly above the pixel (NaN never wins, a NaN or -inf pixel
    never moves, as in pyFAI); a pixel without one is a root and gets the
    code -(r + 1), r = its rank in raster order, and its flat index goes to
    ``peak[0][r]`` (grown by doubling ``cap[0]``). The eight window positions
    are swept over row buffers ``best_v``/``best_k`` of length w, which keeps
    the comparisons branch-free; float64 data are rounded to float32 a row
    at a time into ``ring`` (3 rows). Then a pixel whose successor lies
    above or to its left takes the successor's code if it has one; the rest
    (chains that go east or down) is the work of :func:`_resolve_and_count`.
    (Settling east runs here too cost more than the few walks it saves.)

    Returns the number of roots, or -1 if the peak buffer could not grow.
    """
    cdef int64_t i, j, p, q, jlo, c
    cdef int64_t count = 0
    cdef int32_t k
    cdef int dy, dx
    cdef const float *row
    cdef index_t *ar
    cdef int64_t *grown
    cdef int64_t delta[9]
    for k in range(9):
        delta[k] = (k // 3 - 1) * w + (k % 3 - 1)
    _load_row(d, ring, 0, w)
    for i in range(h):
        if i + 1 < h:
            _load_row(d, ring, i + 1, w)
        row = _row_f32(d, ring, i, w)
        ar = a + i * w
        for j in range(w):
            best_v[j] = row[j]
            best_k[j] = 4
        for k in range(9):
            dy = k // 3 - 1
            dx = k % 3 - 1
            if k == 4 or i + dy < 0 or i + dy >= h or w + (-1 if dx else 0) <= 0:
                continue
            # the column range whose neighbour (i + dy, j + dx) is inside the image
            jlo = 1 if dx < 0 else 0
            _row_best(_row_f32(d, ring, i + dy, w) + jlo + dx, best_v + jlo, best_k + jlo,
                      w - (1 if dx else 0), k)
        for j in range(w):
            p = i * w + j
            k = best_k[j]
            if k == 4 or row[j] == -INFINITY:
                if count == cap[0]:
                    grown = <int64_t *>realloc(peak[0], 2 * count * sizeof(int64_t))
                    if grown == NULL:
                        return -1
                    peak[0] = grown
                    cap[0] = 2 * count
                peak[0][count] = p
                count += 1
                ar[j] = <index_t>(-count)
                continue
            q = p + delta[k]
            ar[j] = <index_t>q
            # only successors before p (k < 4) have been written: others read p itself
            c = a[q if k < 4 else p]
            ar[j] = <index_t>(c if c < 0 else q)
    return count


cdef inline void _count_row(
    const index_t *a, int64_t h, int64_t w, int64_t i, uint8_t *bor, index_t *cnt
) noexcept nogil:
    """Border bitmask of row i; region sizes into cnt[2r], border counts into cnt[2r+1]."""
    cdef int64_t j, r
    cdef const index_t *mid = a + i * w
    cdef uint8_t *out = bor + i * w
    if 0 < i < h - 1 and w > 2:
        if index_t is int32_t:
            _row_bits32(mid - w + 1, mid + 1, mid + w + 1, out + 1, w - 2)
        else:
            _row_bits64(mid - w + 1, mid + 1, mid + w + 1, out + 1, w - 2)
        out[0] = _border_bits(a, i, 0, h, w)
        out[w - 1] = _border_bits(a, i, w - 1, h, w)
    else:
        for j in range(w):
            out[j] = _border_bits(a, i, j, h, w)
    for j in range(w):
        r = ~mid[j]
        cnt[2 * r] += 1
        cnt[2 * r + 1] += out[j] != 0


cdef void _resolve_and_count(
    index_t *a, int64_t h, int64_t w, uint8_t *bor, index_t *cnt, index_t *work
) noexcept nogil:
    """Finish resolving codes bottom-up, with the bitmask and counts of each row.

    Going up, every row below row i is resolved, so a pointer down takes its
    code in a sweep left to right (which also settles west pointers), and
    east runs in a sweep right to left. The few pixels left point up into a
    pixel still unresolved (often an east run above): they walk to the
    first resolved pixel and compress their path (``work``, length >= w,
    queues them). Row i+1's
    bitmask and counts need rows i..i+2, so they trail by one row.
    """
    cdef int64_t i, j, p, q, c, x, nx, m, t
    cdef index_t *ar
    for i in range(h - 1, -1, -1):
        ar = a + i * w
        for j in range(w):
            q = ar[j]
            c = a[q if q >= 0 else i * w + j]
            ar[j] = <index_t>(c if c < 0 else q)
        m = 0
        work[0] = i * w + w - 1
        m += ar[w - 1] >= 0
        for j in range(w - 2, -1, -1):
            p = i * w + j
            q = ar[j]
            c = ar[j + 1]
            q = c if q == p + 1 and c < 0 else q
            ar[j] = <index_t>q
            work[m] = <index_t>p
            m += q >= 0
        for t in range(m):
            p = work[t]
            c = a[p]
            while c >= 0:
                c = a[c]
            x = p
            while a[x] >= 0:
                nx = a[x]
                a[x] = <index_t>c
                x = nx
        if i + 1 < h:
            _count_row(a, h, w, i + 1, bor, cnt)
    _count_row(a, h, w, 0, bor, cnt)


cdef inline float _slot_float(const index_t *slot) noexcept nogil:
    cdef float v
    memcpy(&v, slot, sizeof(float))
    return v


cdef inline void _set_slot_float(index_t *slot, float v) noexcept nogil:
    memcpy(slot, &v, sizeof(float))


cdef bint _region_table(
    const real_t *flat,
    index_t *lab,
    int64_t h,
    int64_t w,
    const int64_t *peak,
    const uint8_t *bor,
    index_t *rec,
    index_t *cols,
    index_t *border_index,
    index_t *border_neighbor,
) noexcept nogil:
    """Fill the border CSR and the running mini/pass; turn the codes in ``lab`` into labels.

    Region r's record is ``rec[4r : 4r + 4]``: fill cursor (its CSR start on
    entry), code of the pass neighbour (0: none yet; codes are negative),
    and as float bits the running minimum (+inf on entry) and pass (-inf on
    entry), so one cache line serves a border pixel. The minimum skips NaN
    and the pass moves on a strict ">", to the first pixel holding it; a
    region whose first border value is NaN, or whose pass never rose above
    -inf, is fixed afterwards by the caller (pyFAI starts both at the first
    value). ``cols`` (length w) lists a row's border pixels, so the sweep
    does not branch on every pixel. ``lab`` holds the resolved codes on
    entry; pixel p gets its label ``peak[~lab[p]]`` one row behind the sweep,
    once no border pixel will read its code again. Returns True if some
    border value is NaN.
    """
    cdef int64_t i, j, p, k, m, t, nc
    cdef bint nan_seen = False
    cdef index_t *rr
    cdef uint8_t bits
    cdef float v, lo, hi
    cdef bint up
    cdef int64_t off[8]
    cdef int8_t first[256]
    _offsets(w, off)
    _first_priority(first)
    for i in range(h):
        m = 0
        for j in range(w):
            cols[m] = <index_t>j
            m += bor[i * w + j] != 0
        for t in range(m):
            p = i * w + cols[t]
            bits = bor[p]
            rr = rec + 4 * <int64_t>(~lab[p])
            k = rr[0]
            rr[0] = <index_t>(k + 1)
            nc = lab[p + off[first[bits]]]
            border_index[k] = <index_t>p
            border_neighbor[k] = <index_t>peak[~nc]
            v = <float>flat[p]
            nan_seen |= v != v
            lo = _slot_float(rr + 2)
            hi = _slot_float(rr + 3)
            up = v > hi
            _set_slot_float(rr + 2, v if v < lo else lo)
            _set_slot_float(rr + 3, v if up else hi)
            rr[1] = <index_t>(nc if up else rr[1])
        # row i - 1 is read for the last time by row i
        if i > 0:
            for p in range((i - 1) * w, i * w):
                lab[p] = <index_t>peak[~lab[p]]
    for p in range((h - 1) * w, h * w):
        lab[p] = <index_t>peak[~lab[p]]
    return nan_seen


cdef void _start_table(
    const index_t *cnt, int64_t nreg, int64_t *size, int64_t *ptr, index_t *rec
) noexcept nogil:
    """Sizes, border CSR offsets and the records :func:`_region_table` starts from."""
    cdef int64_t r
    ptr[0] = 0
    for r in range(nreg):
        size[r] = cnt[2 * r]
        ptr[r + 1] = ptr[r] + cnt[2 * r + 1]
        rec[4 * r] = <index_t>ptr[r]
        rec[4 * r + 1] = 0
        _set_slot_float(rec + 4 * r + 2, INFINITY)
        _set_slot_float(rec + 4 * r + 3, -INFINITY)


cdef void _finish_table(
    const index_t *rec,
    int64_t nreg,
    const real_t *flat,
    const int64_t *peak,
    const int64_t *ptr,
    const index_t *border_index,
    const index_t *border_neighbor,
    bint nan_seen,
    float *maxi,
    float *mini,
    float *hp,
    int64_t *pass_to,
) noexcept nogil:
    """``maxi``, ``mini``, ``highest_pass``, ``pass_to`` from the records of :func:`_region_table`.

    pyFAI starts the minimum and the pass at a region's first border value
    and moves them with strict comparisons: a NaN first value freezes both
    at NaN, and the pass stays at the first pixel when nothing rises above
    it. Regions without border get NaN, NaN, -1. The first value is read
    only if ``nan_seen`` (a random read per region).
    """
    cdef int64_t r, code
    for r in range(nreg):
        maxi[r] = <float>flat[peak[r]]
        code = rec[4 * r + 1]
        if ptr[r + 1] == ptr[r]:
            mini[r] = NAN
            hp[r] = NAN
            pass_to[r] = -1
            continue
        mini[r] = _slot_float(rec + 4 * r + 2)
        hp[r] = _slot_float(rec + 4 * r + 3)
        if nan_seen and isnan(flat[border_index[ptr[r]]]):
            mini[r] = NAN
            hp[r] = NAN
            code = 0
        pass_to[r] = peak[~code] if code != 0 else border_neighbor[ptr[r]]


def _segment(const real_t[:, ::1] data, bint wide):
    """:func:`segment_kernel` with int64 (``wide``) or int32 index arrays."""
    labels = _fresh((data.shape[0], data.shape[1]), np.int64 if wide else np.int32)
    return (labels,) + _segment_into(np.asarray(data).reshape(-1), labels.reshape(-1),
                                     data.shape[0], data.shape[1])


def _segment_into(const real_t[::1] flat, index_t[::1] lab, int64_t h, int64_t w):
    """Segment ``flat`` (h*w) with ``lab`` as the label output; the other outputs, in order.

    ``lab`` holds the working codes until the last sweep turns them into
    labels, so the per-pixel and per-border-pixel arrays all have its index
    type (int32 needs h*w < 2**31).
    """
    cdef int64_t n = h * w
    cdef int64_t nreg, nb, cap = max(64, n // 64)
    cdef bint nan_seen
    cdef int64_t *pk = <int64_t *>malloc(cap * sizeof(int64_t))
    if pk == NULL:
        raise MemoryError()
    itype = np.int32 if index_t is int32_t else np.int64
    cdef float[::1] best_v = np.empty(w, dtype=np.float32)
    cdef float[::1] ring = np.empty(3 * w if real_t is double else 1, dtype=np.float32)
    cdef int32_t[::1] best_k = np.empty(w, dtype=np.int32)
    cdef int64_t[::1] peak_v
    try:
        with nogil:
            nreg = _climb_rows(&flat[0], &lab[0], h, w, &best_v[0], &best_k[0], &ring[0],
                               &pk, &cap)
        if nreg < 0:
            raise MemoryError()
        peak, size, border_ptr, pass_to, maxi, mini, hp = _block(
            *[(nreg, np.int64)] * 2, (nreg + 1, np.int64), (nreg, np.int64),
            *[(nreg, np.float32)] * 3
        )
        peak_v = peak
        memcpy(&peak_v[0], pk, nreg * sizeof(int64_t))
    finally:
        free(pk)
    borders = _fresh((h, w), np.uint8)
    counts, rec, work = _block((2 * nreg, itype), (4 * nreg, itype), (w, itype))
    counts[:] = 0
    cdef uint8_t[::1] bor = borders.reshape(-1)
    cdef index_t[::1] cnt = counts, work_v = work, rec_v = rec
    cdef int64_t[::1] size_v = size, ptr_v = border_ptr
    with nogil:
        _resolve_and_count(&lab[0], h, w, &bor[0], &cnt[0], &work_v[0])
        _start_table(&cnt[0], nreg, &size_v[0], &ptr_v[0], &rec_v[0])
    nb = border_ptr[nreg]
    # +1: a valid address for &v[0] when there is no border pixel at all
    border_index = _fresh(nb + 1, itype)
    border_neighbor = _fresh(nb + 1, itype)
    cdef index_t[::1] bidx_v = border_index, bnbr_v = border_neighbor
    cdef int64_t[::1] pto_v = pass_to
    cdef float[::1] mini_v = mini, hp_v = hp, maxi_v = maxi
    with nogil:
        nan_seen = _region_table(&flat[0], &lab[0], h, w, &peak_v[0], &bor[0], &rec_v[0],
                                 &work_v[0], &bidx_v[0], &bnbr_v[0])
        _finish_table(&rec_v[0], nreg, &flat[0], &peak_v[0], &ptr_v[0], &bidx_v[0],
                      &bnbr_v[0], nan_seen, &maxi_v[0], &mini_v[0], &hp_v[0], &pto_v[0])
    return (borders, peak, size, maxi, mini, hp, pass_to,
            border_ptr, border_index[:nb], border_neighbor[:nb])


def segment_kernel(data):
    """Inverse watershed segmentation of an image compared as float32.

    Parameters
    ----------
    data : ndarray of float32 or float64, shape (h, w), C-contiguous, h*w >= 1
        float64 values are rounded to float32 where they are read.

    Returns
    -------
    tuple
        ``(labels, borders, peak, size, maxi, mini, highest_pass, pass_to,
        border_ptr, border_index, border_neighbor)``, as documented in
        :class:`ccdgrid.watershed.Segmentation`. ``labels``,
        ``border_index`` and ``border_neighbor`` are int32 below 2**31
        pixels, int64 from there on (:func:`index_dtype`).

    Notes
    -----
    Three sweeps over the image: down (successors, resolved where rows
    above allow), up (the rest of the resolution, the bitmask, sizes and
    border counts), down (border CSR, passes, codes turned into labels in
    place).
    """
    return _segment(data, index_dtype(data.shape[0] * data.shape[1]) == np.int64)


def index_dtype(n_pixels):
    """dtype of the per-pixel and per-border-pixel index arrays of an image of ``n_pixels``.

    int32 below 2**31 pixels (half the memory, and the page faults, of
    int64 on fresh outputs), int64 from there on.
    """
    return np.dtype(np.int32) if n_pixels < 2**31 else np.dtype(np.int64)


cdef void _bucket_starts(
    const int64_t *peak, int64_t nbas, int64_t nbuckets, int shift, int64_t *start
) noexcept nogil:
    """``start[k]``: the first basin whose peak is >= k << shift (k = 0 .. nbuckets)."""
    cdef int64_t k, b = 0
    for k in range(nbuckets + 1):
        while b < nbas and peak[b] < (k << shift):
            b += 1
        start[k] = b


cdef inline int64_t _basin_of(
    const int64_t *peak, const int64_t *start, int shift, int64_t label
) noexcept nogil:
    """Basin row of a label (a peak's flat index).

    Bisection among the peaks of its bucket of 2**shift flat indices (about
    one image row), written with a select rather than a branch.
    """
    cdef int64_t base = start[label >> shift]
    cdef int64_t n = start[(label >> shift) + 1] - base, half
    while n > 1:
        half = n >> 1
        base = base + half if peak[base + half] <= label else base
        n -= half
    return base


cdef inline int64_t _find(index_t *parent, int64_t x) noexcept nogil:
    """Union-find root with path halving."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


cdef int _cmp_int64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0]
    cdef int64_t y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


cdef int _cmp_int32(const void *a, const void *b) noexcept nogil:
    cdef int32_t x = (<const int32_t *>a)[0]
    cdef int32_t y = (<const int32_t *>b)[0]
    return (x > y) - (x < y)


cdef void _union_singletons(
    const real_t[::1] flat,
    const index_t[::1] lab,
    const uint8_t[::1] bor,
    int64_t w,
    const int64_t[::1] peak,
    const float[::1] maxi,
    const float[::1] mini,
    const int64_t[::1] ptr,
    const index_t[::1] border_neighbor,
    const int64_t[::1] row_start,
    int shift,
    index_t[::1] parent,
    index_t[::1] ring,
    index_t[::1] cur_size,
    float[::1] cur_mini,
) noexcept nogil:
    """Merge singleton basins in peak order (see ``merge_kernel``).

    ``parent`` is a union-find forest whose roots are the basins carrying each
    region's peak, so ``maxi[root]`` is the region's maximum. ``ring`` links
    the basins of a region in a cycle, to scan a merged region's border.
    """
    cdef int64_t nbas = peak.shape[0]
    cdef int64_t k, r, t, c, m, e, p, q, keep, gone, tmp
    cdef uint8_t bits
    cdef int b
    cdef int64_t off[8]
    cdef int prio[8]
    _offsets(w, off)
    prio[:] = [1, 3, 5, 7, 0, 2, 4, 6]  # N, E, S, W, NW, NE, SE, SW
    for k in range(nbas):
        # only a basin that starts as a singleton can be part of one later
        if not maxi[k] == mini[k]:
            continue
        r = _find(&parent[0], k)
        if not maxi[r] == cur_mini[r]:
            continue
        t = -1
        if cur_size[r] == 1:
            p = peak[r]
            bits = bor[p]
            for b in range(8):
                if (bits >> prio[b]) & 1:
                    q = p + off[prio[b]]
                    if <float>flat[q] == maxi[r]:
                        t = _find(&parent[0], _basin_of(&peak[0], &row_start[0], shift, lab[q]))
                        break
        if t < 0:
            m = r
            while True:
                for e in range(ptr[m], ptr[m + 1]):
                    c = _basin_of(&peak[0], &row_start[0], shift, border_neighbor[e])
                    c = _find(&parent[0], c)
                    if c == r or isnan(maxi[c]):
                        continue
                    if t < 0 or maxi[c] > maxi[t] or (maxi[c] == maxi[t] and c < t):
                        t = c
                m = ring[m]
                if m == r:
                    break
        if t < 0:
            continue
        # pyFAI Region.merge: the larger maximum keeps the peak, a tie keeps ``self``
        if maxi[t] > maxi[r]:
            keep = t
            gone = r
        else:
            keep = r
            gone = t
        parent[gone] = <index_t>keep
        cur_size[keep] += cur_size[gone]
        if isnan(cur_mini[keep]) or cur_mini[gone] < cur_mini[keep]:
            cur_mini[keep] = cur_mini[gone]
        tmp = ring[keep]
        ring[keep] = ring[gone]
        ring[gone] = tmp


cdef void _merged_borders(
    const real_t[::1] flat,
    const index_t[::1] lab,
    const uint8_t[::1] bor,
    int64_t w,
    const int64_t[::1] peak,
    const int64_t[::1] row_start,
    int shift,
    const int64_t[::1] region,
    const index_t[::1] slot,
    const int64_t[::1] ptr,
    const index_t[::1] border_index,
    const index_t[::1] border_neighbor,
    const float[::1] old_hp,
    const int64_t[::1] old_pass_to,
    const index_t[::1] rep,
    const int64_t[::1] patch_ptr,
    index_t[::1] patch_index,
    index_t[::1] patch_nbr,
    float[::1] hp,
    int64_t[::1] pass_to,
) noexcept nogil:
    """Border patch of the regions made of several basins, and every pass / pass_to.

    A basin's border pixel stays iff its recorded neighbour lies in another
    region, which can only fail in regions of several basins: regions of one
    basin keep their basin's border, pass and pass_to, and only the others
    (``slot[r] >= 0``) get their border written, in raster order, into the
    patch CSR ``patch_ptr`` (counts' cumsum, filled here).
    """
    cdef int64_t nbas = region.shape[0]
    cdef int64_t nreg = slot.shape[0]
    cdef int64_t b, e, g, k, f, start, stop, p
    cdef float v
    for f in range(nreg):
        if slot[f] >= 0:
            pass_to[f] = patch_ptr[slot[f]]  # a fill cursor until the pass loop below
    for b in range(nbas):
        g = region[b]
        if slot[g] < 0:
            continue
        for e in range(ptr[b], ptr[b + 1]):
            if region[_basin_of(&peak[0], &row_start[0], shift, border_neighbor[e])] != g:
                k = pass_to[g]
                pass_to[g] = k + 1
                patch_index[k] = border_index[e]
    for f in range(nreg):
        if slot[f] < 0:
            hp[f] = old_hp[rep[f]]
            pass_to[f] = old_pass_to[rep[f]]
            continue
        start = patch_ptr[slot[f]]
        stop = patch_ptr[slot[f] + 1]
        pass_to[f] = -1
        if stop == start:
            continue
        # several basins: their raster-ordered runs interleave
        if index_t is int32_t:
            qsort(&patch_index[start], stop - start, sizeof(int32_t), _cmp_int32)
        else:
            qsort(&patch_index[start], stop - start, sizeof(int64_t), _cmp_int64)
        for k in range(start, stop):
            p = patch_index[k]
            patch_nbr[k] = <index_t>_recorded_neighbour(&lab[0], p, bor[p], w)
            v = <float>flat[p]
            if k == start or v > hp[f]:
                hp[f] = v
                pass_to[f] = patch_nbr[k]


def _merge_impl(
    const real_t[::1] flat,
    const index_t[::1] lab,
    const uint8_t[::1] bor,
    int64_t w,
    const int64_t[::1] peak,
    const int64_t[::1] size,
    const float[::1] maxi,
    const float[::1] mini,
    const float[::1] highest_pass,
    const int64_t[::1] pass_to,
    const int64_t[::1] border_ptr,
    const index_t[::1] border_index,
    const index_t[::1] border_neighbor,
):
    cdef int64_t nbas = peak.shape[0]
    # labels are found from buckets of 2**shift >= w flat indices (no division)
    cdef int shift = max(int(w - 1).bit_length(), 0)
    cdef int64_t nbuckets = ((lab.shape[0] - 1) >> shift) + 1
    cdef int64_t b, e, r, g, nreg, k, nmulti
    row_start = np.empty(nbuckets + 1, dtype=np.int64)
    cdef int64_t[::1] rs = row_start
    # scratch per basin: basins, sizes and cursors fit the index dtype (int32 below 2**31 pixels)
    itype = np.int32 if index_t is int32_t else np.int64
    parent, ring, cur_size, cur_mini, slot, rep = _block(
        *[(nbas, itype)] * 3, (nbas, np.float32), *[(nbas, itype)] * 2
    )
    # outputs: region tables sized for the worst case (no merge), cut to R below
    (basin_region, peaks, new_peak, new_size, new_pass_to, peaks_ptr, new_maxi, new_mini,
     new_hp) = _block(*[(nbas, np.int64)] * 5, (nbas + 1, np.int64), *[(nbas, np.float32)] * 3)
    cdef index_t[::1] par = parent, size_v = cur_size, ring_v = ring
    cdef float[::1] mini_v = cur_mini
    with nogil:
        for b in range(nbas):
            par[b] = <index_t>b
            ring_v[b] = <index_t>b
            size_v[b] = <index_t>size[b]
            mini_v[b] = mini[b]
        _bucket_starts(&peak[0], nbas, nbuckets, shift, &rs[0])
        _union_singletons(flat, lab, bor, w, peak, maxi, mini, border_ptr, border_neighbor,
                          rs, shift, par, ring_v, size_v, mini_v)
        nreg = 0
        for b in range(nbas):
            if _find(&par[0], b) == b:
                nreg += 1
    new_peak = new_peak[:nreg]
    new_size = new_size[:nreg]
    new_size[:] = 0
    new_maxi = new_maxi[:nreg]
    new_mini = new_mini[:nreg]
    peaks_ptr = peaks_ptr[:nreg + 1]
    peaks_ptr[:] = 0
    new_hp = new_hp[:nreg]
    new_hp[:] = np.nan
    new_pass_to = new_pass_to[:nreg]
    slot = slot[:nreg]
    rep = rep[:nreg]
    cdef int64_t[::1] reg = basin_region, npk = new_peak, nsz = new_size
    cdef int64_t[::1] pptr = peaks_ptr, pks = peaks
    cdef index_t[::1] rep_v = rep, slot_v = slot
    cdef float[::1] nmaxi = new_maxi, nmini = new_mini
    with nogil:
        # representatives are numbered in basin order, i.e. by peak flat index
        g = 0
        for b in range(nbas):
            if par[b] == b:
                npk[g] = peak[b]
                nmaxi[g] = maxi[b]
                nmini[g] = mini_v[b]
                rep_v[g] = <index_t>b
                ring_v[b] = <index_t>g  # the ring is no longer needed: reuse it as root -> row
                g += 1
        for b in range(nbas):
            r = ring_v[_find(&par[0], b)]
            reg[b] = r
            nsz[r] += size[b]
            pptr[r + 1] += 1
        nmulti = 0
        for r in range(nreg):
            slot_v[r] = <index_t>(nmulti if pptr[r + 1] > 1 else -1)
            nmulti += pptr[r + 1] > 1
            pptr[r + 1] += pptr[r]
        # peaks CSR: counting sort of basins by region, basin order kept (ring as cursor)
        for r in range(nreg):
            ring_v[r] = <index_t>pptr[r]
        for b in range(nbas):
            r = reg[b]
            pks[ring_v[r]] = peak[b]
            ring_v[r] += 1
    patch_ptr = np.zeros(nmulti + 1, dtype=np.int64)
    cdef int64_t[::1] qptr = patch_ptr
    with nogil:
        # border counts of the regions of several basins: pixels facing their own region go
        for b in range(nbas):
            r = reg[b]
            if slot_v[r] >= 0:
                for e in range(border_ptr[b], border_ptr[b + 1]):
                    if reg[_basin_of(&peak[0], &rs[0], shift, border_neighbor[e])] != r:
                        qptr[slot_v[r] + 1] += 1
        for r in range(nmulti):
            qptr[r + 1] += qptr[r]
    k = patch_ptr[nmulti]
    patch_index = np.empty(k, dtype=itype)
    patch_nbr = np.empty(k, dtype=itype)
    cdef index_t[::1] qidx = patch_index, qnbr = patch_nbr
    cdef int64_t[::1] pto = new_pass_to
    cdef float[::1] hp_v = new_hp
    with nogil:
        _merged_borders(flat, lab, bor, w, peak, rs, shift, reg, slot_v, border_ptr, border_index,
                        border_neighbor, highest_pass, pass_to, rep_v, qptr, qidx, qnbr, hp_v,
                        pto)
    return (basin_region, new_peak, new_size, new_maxi, new_mini, new_hp, new_pass_to,
            patch_ptr, patch_index, patch_nbr, peaks_ptr, peaks)


def merge_kernel(
    data,
    labels,
    const uint8_t[:, ::1] borders,
    const int64_t[::1] peak,
    const int64_t[::1] size,
    const float[::1] maxi,
    const float[::1] mini,
    const float[::1] highest_pass,
    const int64_t[::1] pass_to,
    const int64_t[::1] border_ptr,
    border_index,
    border_neighbor,
):
    """Merge singleton regions (maxi == mini) of a segmentation.

    Basins are visited in peak order. A region whose maximum equals its
    minimum joins, if it is one pixel, the region of its first equal-valued
    neighbour (priority N, E, S, W, NW, NE, SE, SW); otherwise the neighbouring
    region with the highest maximum (NaN maxima ignored, ties to the lowest
    peak index). The larger maximum keeps the peak (a tie keeps the visited
    region), sizes add up, mini is the minimum of the parts' minis, and the
    border, pass and pass_to are recomputed over the merged border.
    ``data`` is the segmented image, float32 or float64 C-contiguous (h, w);
    ``labels`` (C-contiguous (h, w)), ``border_index`` and ``border_neighbor``
    share one index dtype, int32 or int64, which ``patch_index`` and
    ``patch_neighbor`` take.

    Returns
    -------
    tuple
        ``(basin_region, peak, size, maxi, mini, highest_pass, pass_to,
        patch_ptr, patch_index, patch_neighbor, peaks_ptr, peaks)``: the
        merged table, whose regions of one basin keep that basin's border
        (not copied); ``patch_*`` is the border CSR of the regions of several
        basins only, in row order (see ``ccdgrid.watershed._MergedBorders``).
    """
    return _merge_impl(
        np.asarray(data).reshape(-1), np.asarray(labels).reshape(-1),
        np.asarray(borders).reshape(-1), data.shape[1], peak, size, maxi, mini, highest_pass,
        pass_to, border_ptr, border_index, border_neighbor,
    )
