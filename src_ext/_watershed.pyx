"""Inverse watershed segmentation and singleton merging (compiled kernels).

Private: :mod:`ccdgrid.watershed` validates the inputs and calls these. The
pure-numpy twins with the same signatures are in
:mod:`ccdgrid._reference.watershed`; both follow PYFAI_NOTES section 1.

Preconditions (not checked here; breaking them reads out of bounds):
``data`` is C-contiguous float32 (h, w) with h*w >= 1; the segmentation arrays
passed to :func:`merge_kernel` are exactly those :func:`segment_kernel`
returned for that ``data``.
"""

import numpy as np

from libc.math cimport INFINITY, isnan
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t
from libc.stdlib cimport qsort
from libc.string cimport memcpy

ctypedef fused index_t:
    int32_t
    int64_t


cdef inline int64_t _recorded_neighbour(
    const int64_t *lab, int64_t p, uint8_t bits, int64_t w
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
    const int64_t *lab, int64_t i, int64_t j, int64_t h, int64_t w
) noexcept nogil:
    """8-neighbour bitmask of neighbours inside the image with another label."""
    cdef int64_t p = i * w + j
    cdef int64_t c = lab[p]
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
    /* One window position for a whole row: where src beats the running best,
       take its value and code. restrict lets the compiler vectorise it. */
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


cdef int64_t _pointers(
    const float *d, int64_t *lab, int64_t h, int64_t w, float *best_v, int32_t *best_k
) noexcept nogil:
    """Store every pixel's steepest-ascent successor; roots get -(row + 1).

    The successor is the first maximum of the 3x3 window in raster order if it
    is strictly above the pixel (NaN never wins, a NaN or -inf pixel never
    moves, as in pyFAI). Roots are numbered in raster order. A row at a time:
    the eight window positions are swept in raster order over row buffers
    ``best_v``/``best_k`` of length w, which keeps the comparisons branch-free.
    Returns the number of roots.
    """
    cdef int64_t i, j, p, jlo
    cdef int64_t count = 0
    cdef int32_t k
    cdef int dy, dx
    cdef const float *row
    cdef int64_t delta[9]
    for k in range(9):
        delta[k] = (k // 3 - 1) * w + (k % 3 - 1)
    for i in range(h):
        row = d + i * w
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
            _row_best(d + (i + dy) * w + jlo + dx, best_v + jlo, best_k + jlo,
                      w - (1 if dx else 0), k)
        for j in range(w):
            p = i * w + j
            if best_k[j] == 4 or row[j] == -INFINITY:
                count += 1
                lab[p] = -count
            else:
                lab[p] = p + delta[best_k[j]]
    return count


cdef inline void _resolve_row(
    int64_t *lab, int64_t start, int64_t stop, int64_t *work
) noexcept nogil:
    """Replace the successor pointers of pixels start..stop-1 by their root's code.

    Pixels whose successor is already resolved (root codes are negative) are
    done in a branch-free sweep; the others are queued in ``work`` (length
    >= stop - start) and walk to the first resolved pixel, compressing their
    path, so every pixel is walked as an unresolved node at most once over
    the image: O(N).
    """
    cdef int64_t p, q, x, nx, code, m = 0, t
    for p in range(start, stop):
        q = lab[p]
        code = lab[q if q >= 0 else p]
        lab[p] = code if code < 0 else q
        work[m] = p
        m += code >= 0
    for t in range(m):
        p = work[t]
        code = lab[p]
        while code >= 0:
            code = lab[code]
        x = p
        while lab[x] >= 0:
            nx = lab[x]
            lab[x] = code
            x = nx


cdef inline void _count_row(
    const int64_t *lab, int64_t h, int64_t w, int64_t i, uint8_t *bor, int64_t *size,
    int64_t *ptr
) noexcept nogil:
    """Border bitmask, region sizes and border counts (into ``ptr[r + 1]``) of row i."""
    cdef int64_t j, p, r, c
    cdef const int64_t *l0
    cdef const int64_t *l1
    cdef const int64_t *l2
    cdef uint8_t bits
    for j in range(w):
        p = i * w + j
        if 0 < i < h - 1 and 0 < j < w - 1:
            l0 = lab + p - w
            l1 = lab + p
            l2 = lab + p + w
            c = l1[0]
            bits = (
                (l0[-1] != c)
                | ((l0[0] != c) << 1)
                | ((l0[1] != c) << 2)
                | ((l1[1] != c) << 3)
                | ((l2[1] != c) << 4)
                | ((l2[0] != c) << 5)
                | ((l2[-1] != c) << 6)
                | ((l1[-1] != c) << 7)
            )
        else:
            bits = _border_bits(lab, i, j, h, w)
        r = ~lab[p]
        size[r] += 1
        bor[p] = bits
        ptr[r + 1] += bits != 0


cdef void _resolve_and_count(
    int64_t *lab, int64_t h, int64_t w, int64_t *peak, uint8_t *bor, int64_t *size,
    int64_t *ptr, int64_t *work
) noexcept nogil:
    """Resolve all labels to root codes, then bitmask, sizes and border counts.

    Counting row i needs rows i-1..i+1 resolved, so it trails the resolution
    by one row while those rows are still in cache.
    """
    cdef int64_t p, i
    for p in range(h * w):
        if lab[p] < 0:
            peak[~lab[p]] = p
    for i in range(h):
        _resolve_row(lab, i * w, (i + 1) * w, work)
        if i > 0:
            _count_row(lab, h, w, i - 1, bor, size, ptr)
    _count_row(lab, h, w, h - 1, bor, size, ptr)


cdef void _region_table(
    const float *flat,
    int64_t *lab,
    int64_t h,
    int64_t w,
    const int64_t *peak,
    const uint8_t *bor,
    const int64_t *ptr,
    int64_t *cursor,
    int64_t *border_index,
    int64_t *border_neighbor,
    float *mini,
    float *hp,
    int64_t *pass_to,
) noexcept nogil:
    """Fill the border CSR and mini/highest_pass/pass_to; turn codes into labels.

    ``lab`` holds root codes -(row + 1) on entry and peak flat indices on exit.
    """
    cdef int64_t i, j, p, r, k, nb
    cdef uint8_t bits
    cdef float v
    cdef int64_t off[8]
    cdef int8_t first[256]
    _offsets(w, off)
    _first_priority(first)
    for i in range(h):
        for j in range(w):
            p = i * w + j
            bits = bor[p]
            if bits == 0:
                continue
            r = ~lab[p]
            k = cursor[r]
            cursor[r] = k + 1
            nb = peak[~lab[p + off[first[bits]]]]
            border_index[k] = p
            border_neighbor[k] = nb
            v = flat[p]
            # pyFAI init_values: running min / strict ">" pass from the first value
            # (NaN after the first value never wins; v < mini implies not v > pass)
            if k == ptr[r]:
                mini[r] = v
                hp[r] = v
                pass_to[r] = nb
            else:
                mini[r] = v if v < mini[r] else mini[r]
                if v > hp[r]:
                    hp[r] = v
                    pass_to[r] = nb
        # rows above i are no longer read: give them their final labels
        if i > 0:
            for p in range((i - 1) * w, i * w):
                lab[p] = peak[~lab[p]]
    for p in range((h - 1) * w, h * w):
        lab[p] = peak[~lab[p]]


def segment_kernel(const float[:, ::1] data):
    """Inverse watershed segmentation of a float32 image.

    Parameters
    ----------
    data : ndarray of float32, shape (h, w), C-contiguous, h*w >= 1

    Returns
    -------
    tuple
        ``(labels, borders, peak, size, maxi, mini, highest_pass, pass_to,
        border_ptr, border_index, border_neighbor)``, as documented in
        :class:`ccdgrid.watershed.Segmentation`.
    """
    cdef int64_t h = data.shape[0], w = data.shape[1]
    cdef int64_t nreg, r
    labels = np.empty((h, w), dtype=np.int64)
    cdef int64_t[::1] lab = labels.reshape(-1)
    cdef const float[::1] flat = np.asarray(data).reshape(-1)
    cdef float[::1] best_v = np.empty(w, dtype=np.float32)
    cdef int32_t[::1] best_k = np.empty(w, dtype=np.int32)
    cdef int64_t[::1] best_k64 = np.empty(w, dtype=np.int64)  # resolve work queue
    with nogil:
        nreg = _pointers(&flat[0], &lab[0], h, w, &best_v[0], &best_k[0])
    peak = np.empty(nreg, dtype=np.int64)
    size = np.zeros(nreg, dtype=np.int64)
    border_ptr = np.zeros(nreg + 1, dtype=np.int64)
    borders = np.empty((h, w), dtype=np.uint8)
    cdef int64_t[::1] peak_v = peak, size_v = size, ptr_v = border_ptr
    cdef uint8_t[::1] bor = borders.reshape(-1)
    with nogil:
        _resolve_and_count(&lab[0], h, w, &peak_v[0], &bor[0], &size_v[0], &ptr_v[0],
                           &best_k64[0])
        for r in range(nreg):
            ptr_v[r + 1] += ptr_v[r]
    nb = border_ptr[nreg]
    # +1: a valid address for &v[0] when there is no border pixel at all
    border_index = np.empty(nb + 1, dtype=np.int64)
    border_neighbor = np.empty(nb + 1, dtype=np.int64)
    mini = np.full(nreg, np.nan, dtype=np.float32)
    hp = np.full(nreg, np.nan, dtype=np.float32)
    pass_to = np.full(nreg, -1, dtype=np.int64)
    cdef int64_t[::1] cursor = border_ptr[:-1].copy()
    cdef int64_t[::1] bidx_v = border_index, bnbr_v = border_neighbor, pto_v = pass_to
    cdef float[::1] mini_v = mini, hp_v = hp
    with nogil:
        _region_table(&flat[0], &lab[0], h, w, &peak_v[0], &bor[0], &ptr_v[0], &cursor[0],
                      &bidx_v[0], &bnbr_v[0], &mini_v[0], &hp_v[0], &pto_v[0])
    maxi = np.asarray(flat)[peak]
    return (labels, borders, peak, size, maxi, mini, hp, pass_to,
            border_ptr, border_index[:nb], border_neighbor[:nb])


cdef inline int64_t _find(int64_t *parent, int64_t x) noexcept nogil:
    """Union-find root with path halving."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


cdef int _cmp_int64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0]
    cdef int64_t y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


cdef void _union_singletons(
    const float[::1] flat,
    const int64_t[::1] lab,
    const uint8_t[::1] bor,
    int64_t w,
    const int64_t[::1] peak,
    const float[::1] maxi,
    const float[::1] mini,
    const int64_t[::1] ptr,
    const int64_t[::1] border_neighbor,
    const index_t[::1] rowmap,
    int64_t[::1] parent,
    int64_t[::1] ring,
    int64_t[::1] cur_size,
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
                    if flat[q] == maxi[r]:
                        t = _find(&parent[0], rowmap[lab[q]])
                        break
        if t < 0:
            m = r
            while True:
                for e in range(ptr[m], ptr[m + 1]):
                    c = _find(&parent[0], rowmap[border_neighbor[e]])
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
        parent[gone] = keep
        cur_size[keep] += cur_size[gone]
        if isnan(cur_mini[keep]) or cur_mini[gone] < cur_mini[keep]:
            cur_mini[keep] = cur_mini[gone]
        tmp = ring[keep]
        ring[keep] = ring[gone]
        ring[gone] = tmp


cdef void _merged_borders(
    const float[::1] flat,
    const int64_t[::1] lab,
    const uint8_t[::1] bor,
    int64_t w,
    const int64_t[::1] region,
    const int64_t[::1] peaks_ptr,
    const int64_t[::1] ptr,
    const int64_t[::1] border_index,
    const int64_t[::1] border_neighbor,
    const float[::1] old_hp,
    const int64_t[::1] old_pass_to,
    const int64_t[::1] rep,
    const index_t[::1] rowmap,
    int64_t[::1] new_ptr,
    int64_t[::1] new_index,
    int64_t[::1] new_nbr,
    float[::1] hp,
    int64_t[::1] pass_to,
) noexcept nogil:
    """Border CSR of the merged regions in raster order, with pass and pass_to.

    A basin's border pixel stays iff its recorded neighbour lies in another
    region, which can only fail in regions made of several basins: a region
    of one basin keeps its border and pass as they are. ``new_ptr`` holds the
    counts' cumsum.
    """
    cdef int64_t nbas = region.shape[0]
    cdef int64_t nreg = peaks_ptr.shape[0] - 1
    cdef int64_t b, e, g, k, f, start, stop, p, cnt
    cdef float v
    for f in range(nreg):
        pass_to[f] = new_ptr[f]  # used as a fill cursor until the pass loop below
    for b in range(nbas):
        g = region[b]
        if peaks_ptr[g + 1] - peaks_ptr[g] == 1:
            cnt = ptr[b + 1] - ptr[b]
            k = new_ptr[g]
            memcpy(&new_index[k], &border_index[ptr[b]], cnt * sizeof(int64_t))
            memcpy(&new_nbr[k], &border_neighbor[ptr[b]], cnt * sizeof(int64_t))
            continue
        for e in range(ptr[b], ptr[b + 1]):
            if region[rowmap[border_neighbor[e]]] != g:
                k = pass_to[g]
                pass_to[g] = k + 1
                new_index[k] = border_index[e]
    for f in range(nreg):
        start = new_ptr[f]
        stop = new_ptr[f + 1]
        if peaks_ptr[f + 1] - peaks_ptr[f] == 1:
            b = rep[f]
            hp[f] = old_hp[b]
            pass_to[f] = old_pass_to[b]
            continue
        # several basins: their raster-ordered runs interleave
        qsort(&new_index[start], stop - start, sizeof(int64_t), _cmp_int64)
        pass_to[f] = -1
        for k in range(start, stop):
            p = new_index[k]
            new_nbr[k] = _recorded_neighbour(&lab[0], p, bor[p], w)
            v = flat[p]
            if k == start or v > hp[f]:
                hp[f] = v
                pass_to[f] = new_nbr[k]


def _merge_impl(
    const float[::1] flat,
    const int64_t[::1] lab,
    const uint8_t[::1] bor,
    int64_t w,
    const int64_t[::1] peak,
    const int64_t[::1] size,
    const float[::1] maxi,
    const float[::1] mini,
    const float[::1] highest_pass,
    const int64_t[::1] pass_to,
    const int64_t[::1] border_ptr,
    const int64_t[::1] border_index,
    const int64_t[::1] border_neighbor,
    index_t[::1] rowmap,
):
    cdef int64_t nbas = peak.shape[0]
    cdef int64_t b, e, r, g, nreg, k
    parent = np.arange(nbas, dtype=np.int64)
    ring = np.arange(nbas, dtype=np.int64)
    cur_size = np.array(size, dtype=np.int64)
    cur_mini = np.array(mini, dtype=np.float32)
    cdef int64_t[::1] par = parent, size_v = cur_size, ring_v = ring
    cdef float[::1] mini_v = cur_mini
    with nogil:
        for b in range(nbas):
            rowmap[peak[b]] = <index_t>b
        _union_singletons(flat, lab, bor, w, peak, maxi, mini, border_ptr, border_neighbor,
                          rowmap, par, ring_v, size_v, mini_v)
        nreg = 0
        for b in range(nbas):
            if _find(&par[0], b) == b:
                nreg += 1
    basin_region = np.empty(nbas, dtype=np.int64)
    new_peak = np.empty(nreg, dtype=np.int64)
    new_size = np.zeros(nreg, dtype=np.int64)
    new_maxi = np.empty(nreg, dtype=np.float32)
    new_mini = np.empty(nreg, dtype=np.float32)
    peaks_ptr = np.zeros(nreg + 1, dtype=np.int64)
    peaks = np.empty(nbas, dtype=np.int64)
    new_ptr = np.zeros(nreg + 1, dtype=np.int64)
    rep = np.empty(nreg, dtype=np.int64)
    cdef int64_t[::1] reg = basin_region, npk = new_peak, nsz = new_size, rep_v = rep
    cdef int64_t[::1] pptr = peaks_ptr, pks = peaks, nptr = new_ptr
    cdef float[::1] nmaxi = new_maxi, nmini = new_mini
    with nogil:
        # representatives are numbered in basin order, i.e. by peak flat index
        g = 0
        for b in range(nbas):
            if par[b] == b:
                npk[g] = peak[b]
                nmaxi[g] = maxi[b]
                nmini[g] = mini_v[b]
                rep_v[g] = b
                ring_v[b] = g  # the ring is no longer needed: reuse it as root -> row
                g += 1
        for b in range(nbas):
            r = ring_v[_find(&par[0], b)]
            reg[b] = r
            nsz[r] += size[b]
            pptr[r + 1] += 1
        for r in range(nreg):
            pptr[r + 1] += pptr[r]
        # peaks CSR: counting sort of basins by region, basin order kept
        for r in range(nreg):
            nptr[r] = pptr[r]
        for b in range(nbas):
            r = reg[b]
            pks[nptr[r]] = peak[b]
            nptr[r] += 1
        # border counts: only regions of several basins lose pixels
        for r in range(nreg + 1):
            nptr[r] = 0
        for b in range(nbas):
            r = reg[b]
            if pptr[r + 1] - pptr[r] == 1:
                nptr[r + 1] += border_ptr[b + 1] - border_ptr[b]
            else:
                for e in range(border_ptr[b], border_ptr[b + 1]):
                    if reg[rowmap[border_neighbor[e]]] != r:
                        nptr[r + 1] += 1
        for r in range(nreg):
            nptr[r + 1] += nptr[r]
    k = new_ptr[nreg]
    new_index = np.empty(k, dtype=np.int64)
    new_nbr = np.empty(k, dtype=np.int64)
    new_hp = np.full(nreg, np.nan, dtype=np.float32)
    new_pass_to = np.empty(nreg, dtype=np.int64)
    cdef int64_t[::1] nidx = new_index, nnbr = new_nbr, pto = new_pass_to
    cdef float[::1] hp_v = new_hp
    with nogil:
        _merged_borders(flat, lab, bor, w, reg, pptr, border_ptr, border_index, border_neighbor,
                        highest_pass, pass_to, rep_v, rowmap, nptr, nidx, nnbr, hp_v, pto)
    return (basin_region, new_peak, new_size, new_maxi, new_mini, new_hp, new_pass_to,
            new_ptr, new_index, new_nbr, peaks_ptr, peaks)


def merge_kernel(
    const float[:, ::1] data,
    const int64_t[:, ::1] labels,
    const uint8_t[:, ::1] borders,
    const int64_t[::1] peak,
    const int64_t[::1] size,
    const float[::1] maxi,
    const float[::1] mini,
    const float[::1] highest_pass,
    const int64_t[::1] pass_to,
    const int64_t[::1] border_ptr,
    const int64_t[::1] border_index,
    const int64_t[::1] border_neighbor,
):
    """Merge singleton regions (maxi == mini) of a segmentation.

    Basins are visited in peak order. A region whose maximum equals its
    minimum joins, if it is one pixel, the region of its first equal-valued
    neighbour (priority N, E, S, W, NW, NE, SE, SW); otherwise the neighbouring
    region with the highest maximum (NaN maxima ignored, ties to the lowest
    peak index). The larger maximum keeps the peak (a tie keeps the visited
    region), sizes add up, mini is the minimum of the parts' minis, and the
    border, pass and pass_to are recomputed over the merged border.

    Returns
    -------
    tuple
        ``(basin_region, peak, size, maxi, mini, highest_pass, pass_to,
        border_ptr, border_index, border_neighbor, peaks_ptr, peaks)``.
    """
    cdef int64_t h = data.shape[0], w = data.shape[1]
    cdef int64_t n = h * w
    # int32 row indices halve the N-sized lookup table whenever they fit
    itype = np.int32 if n < 2**31 else np.int64
    rowmap = np.empty(n, dtype=itype)
    return _merge_impl(
        np.asarray(data).reshape(-1), np.asarray(labels).reshape(-1),
        np.asarray(borders).reshape(-1), w, peak, size, maxi, mini, highest_pass, pass_to,
        border_ptr, border_index, border_neighbor, rowmap,
    )
