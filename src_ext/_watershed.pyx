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
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport qsort

ctypedef fused index_t:
    int32_t
    int64_t


cdef inline int64_t _recorded_neighbour(
    const int64_t[::1] lab, int64_t p, uint8_t bits, int64_t w
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
    const int64_t[::1] lab, int64_t i, int64_t j, int64_t h, int64_t w
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


cdef int64_t _pointers(const float[:, ::1] d, int64_t[::1] lab) noexcept nogil:
    """Store every pixel's steepest-ascent successor; roots get -(row + 1).

    The successor is the first maximum of the 3x3 window in raster order if it
    is strictly above the pixel (NaN never wins, a NaN or -inf pixel never
    moves, as in pyFAI). Roots are numbered in raster order. Returns the
    number of roots.
    """
    cdef int64_t h = d.shape[0], w = d.shape[1]
    cdef int64_t i, j, a, b, a0, a1, b0, b1, best, p
    cdef int64_t count = 0
    cdef float v, u
    for i in range(h):
        a0 = i - 1 if i > 0 else 0
        a1 = i + 1 if i < h - 1 else h - 1
        for j in range(w):
            p = i * w + j
            v = d[i, j]
            best = p
            if v != -INFINITY:
                if 0 < i < h - 1 and 0 < j < w - 1:
                    # interior: unrolled window, raster order, centre skipped
                    u = d[i - 1, j - 1]
                    if u > v:
                        v = u
                        best = p - w - 1
                    u = d[i - 1, j]
                    if u > v:
                        v = u
                        best = p - w
                    u = d[i - 1, j + 1]
                    if u > v:
                        v = u
                        best = p - w + 1
                    u = d[i, j - 1]
                    if u > v:
                        v = u
                        best = p - 1
                    u = d[i, j + 1]
                    if u > v:
                        v = u
                        best = p + 1
                    u = d[i + 1, j - 1]
                    if u > v:
                        v = u
                        best = p + w - 1
                    u = d[i + 1, j]
                    if u > v:
                        v = u
                        best = p + w
                    u = d[i + 1, j + 1]
                    if u > v:
                        best = p + w + 1
                else:
                    b0 = j - 1 if j > 0 else 0
                    b1 = j + 1 if j < w - 1 else w - 1
                    for a in range(a0, a1 + 1):
                        for b in range(b0, b1 + 1):
                            u = d[a, b]
                            if u > v:
                                v = u
                                best = a * w + b
            if best == p:
                count += 1
                lab[p] = -count
            else:
                lab[p] = best
    return count


cdef void _resolve(int64_t[::1] lab, int64_t[::1] peak) noexcept nogil:
    """Replace successor pointers by their root's code, compressing each path once.

    Every pixel is walked as an unresolved node at most once: O(N). ``peak``
    must be -1 on entry; a walk stops at the first resolved pixel, which is
    the root itself whenever the root's peak is still unset.
    """
    cdef int64_t n = lab.shape[0]
    cdef int64_t p, q, x, nx, code
    for p in range(n):
        q = lab[p]
        if q < 0:
            # a root, or a pixel already compressed (whose root's peak is set)
            if peak[~q] < 0:
                peak[~q] = p
            continue
        while lab[q] >= 0:
            q = lab[q]
        code = lab[q]
        if peak[~code] < 0:
            peak[~code] = q
        x = p
        while lab[x] >= 0:
            nx = lab[x]
            lab[x] = code
            x = nx


cdef void _region_table(
    const float[::1] flat,
    int64_t[::1] lab,
    int64_t h,
    int64_t w,
    const int64_t[::1] peak,
    uint8_t[::1] borders,
    int64_t[::1] size,
    int64_t[::1] ptr,
    int64_t[::1] cursor,
    int64_t[::1] border_index,
    int64_t[::1] border_neighbor,
    float[::1] mini,
    float[::1] hp,
    int64_t[::1] pass_to,
) noexcept nogil:
    """Fill borders, CSR, mini/highest_pass/pass_to; then turn codes into labels.

    ``lab`` holds root codes -(row + 1) on entry and peak flat indices on exit.
    ``size``/``ptr`` are filled by the caller's counting pass.
    """
    cdef int64_t n = h * w
    cdef int64_t i, j, p, r, k
    cdef uint8_t bits
    cdef float v
    for i in range(h):
        for j in range(w):
            p = i * w + j
            bits = borders[p]
            if bits == 0:
                continue
            r = ~lab[p]
            k = cursor[r]
            cursor[r] = k + 1
            border_index[k] = p
            border_neighbor[k] = peak[~_recorded_neighbour(lab, p, bits, w)]
            v = flat[p]
            # pyFAI init_values: running min / strict ">" pass from the first value
            if k == ptr[r]:
                mini[r] = v
                hp[r] = v
                pass_to[r] = border_neighbor[k]
            elif v < mini[r]:
                mini[r] = v
            elif v > hp[r]:
                hp[r] = v
                pass_to[r] = border_neighbor[k]
    for p in range(n):
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
    cdef int64_t nreg, i, j, p, r
    cdef uint8_t bits
    labels = np.empty((h, w), dtype=np.int64)
    cdef int64_t[::1] lab = labels.reshape(-1)
    cdef const float[::1] flat = np.asarray(data).reshape(-1)
    with nogil:
        nreg = _pointers(data, lab)
    peak = np.full(nreg, -1, dtype=np.int64)
    size = np.zeros(nreg, dtype=np.int64)
    border_ptr = np.zeros(nreg + 1, dtype=np.int64)
    borders = np.empty((h, w), dtype=np.uint8)
    cdef int64_t[::1] peak_v = peak, size_v = size, ptr_v = border_ptr
    cdef uint8_t[::1] bor = borders.reshape(-1)
    with nogil:
        _resolve(lab, peak_v)
        for i in range(h):
            for j in range(w):
                p = i * w + j
                r = ~lab[p]
                size_v[r] += 1
                bits = _border_bits(lab, i, j, h, w)
                bor[p] = bits
                if bits:
                    ptr_v[r + 1] += 1
        for r in range(nreg):
            ptr_v[r + 1] += ptr_v[r]
    nb = border_ptr[nreg]
    border_index = np.empty(nb, dtype=np.int64)
    border_neighbor = np.empty(nb, dtype=np.int64)
    mini = np.full(nreg, np.nan, dtype=np.float32)
    hp = np.full(nreg, np.nan, dtype=np.float32)
    pass_to = np.full(nreg, -1, dtype=np.int64)
    cdef int64_t[::1] cursor = border_ptr[:-1].copy()
    cdef int64_t[::1] bidx_v = border_index, bnbr_v = border_neighbor, pto_v = pass_to
    cdef float[::1] mini_v = mini, hp_v = hp
    with nogil:
        _region_table(flat, lab, h, w, peak_v, bor, size_v, ptr_v, cursor,
                      bidx_v, bnbr_v, mini_v, hp_v, pto_v)
    maxi = np.asarray(flat)[peak]
    return (labels, borders, peak, size, maxi, mini, hp, pass_to,
            border_ptr, border_index, border_neighbor)


cdef inline int64_t _find(int64_t[::1] parent, int64_t x) noexcept nogil:
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
    const index_t[::1] rowmap,
    const index_t[::1] nrow,
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
    off[0] = -w - 1
    off[1] = -w
    off[2] = -w + 1
    off[3] = 1
    off[4] = w + 1
    off[5] = w
    off[6] = w - 1
    off[7] = -1
    prio[0] = 1
    prio[1] = 3
    prio[2] = 5
    prio[3] = 7
    prio[4] = 0
    prio[5] = 2
    prio[6] = 4
    prio[7] = 6
    for k in range(nbas):
        # only a basin that starts as a singleton can be part of one later
        if not maxi[k] == mini[k]:
            continue
        r = _find(parent, k)
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
                        t = _find(parent, rowmap[lab[q]])
                        break
        if t < 0:
            m = r
            while True:
                for e in range(ptr[m], ptr[m + 1]):
                    c = _find(parent, nrow[e])
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
    const index_t[::1] nrow,
    int64_t[::1] new_ptr,
    int64_t[::1] new_index,
    int64_t[::1] new_nbr,
    float[::1] hp,
    int64_t[::1] pass_to,
) noexcept nogil:
    """Border CSR of the merged regions in raster order, with pass and pass_to.

    A basin's border pixel stays iff its recorded neighbour lies in another
    region; ``new_ptr`` already holds the per-region counts as a cumsum.
    """
    cdef int64_t nbas = region.shape[0]
    cdef int64_t nreg = peaks_ptr.shape[0] - 1
    cdef int64_t b, e, g, k, f, start, stop, p
    cdef float v
    for f in range(nreg):
        pass_to[f] = new_ptr[f]  # used as a fill cursor until the pass loop below
    for b in range(nbas):
        g = region[b]
        for e in range(ptr[b], ptr[b + 1]):
            if region[nrow[e]] != g:
                k = pass_to[g]
                pass_to[g] = k + 1
                new_index[k] = border_index[e]
    for f in range(nreg):
        start = new_ptr[f]
        stop = new_ptr[f + 1]
        if peaks_ptr[f + 1] - peaks_ptr[f] > 1 and stop - start > 1:
            # several basins: their raster-ordered runs interleave
            qsort(&new_index[start], stop - start, sizeof(int64_t), _cmp_int64)
        pass_to[f] = -1
        for k in range(start, stop):
            p = new_index[k]
            new_nbr[k] = _recorded_neighbour(lab, p, bor[p], w)
            v = flat[p]
            if k == start:
                hp[f] = v
                pass_to[f] = new_nbr[k]
            elif v > hp[f]:
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
    const int64_t[::1] border_ptr,
    const int64_t[::1] border_index,
    const int64_t[::1] border_neighbor,
    index_t[::1] rowmap,
    index_t[::1] nrow,
):
    cdef int64_t nbas = peak.shape[0]
    cdef int64_t nb = border_index.shape[0]
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
        for e in range(nb):
            nrow[e] = rowmap[border_neighbor[e]]
        _union_singletons(flat, lab, bor, w, peak, maxi, mini, border_ptr, rowmap, nrow,
                          par, ring_v, size_v, mini_v)
        nreg = 0
        for b in range(nbas):
            if _find(par, b) == b:
                nreg += 1
    basin_region = np.empty(nbas, dtype=np.int64)
    new_peak = np.empty(nreg, dtype=np.int64)
    new_size = np.zeros(nreg, dtype=np.int64)
    new_maxi = np.empty(nreg, dtype=np.float32)
    new_mini = np.empty(nreg, dtype=np.float32)
    peaks_ptr = np.zeros(nreg + 1, dtype=np.int64)
    peaks = np.empty(nbas, dtype=np.int64)
    new_ptr = np.zeros(nreg + 1, dtype=np.int64)
    cdef int64_t[::1] reg = basin_region, npk = new_peak, nsz = new_size
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
                ring_v[b] = g  # the ring is no longer needed: reuse it as root -> row
                g += 1
        for b in range(nbas):
            r = ring_v[_find(par, b)]
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
        for r in range(nreg + 1):
            nptr[r] = 0
    # border counts need every basin's region first
    with nogil:
        for b in range(nbas):
            for e in range(border_ptr[b], border_ptr[b + 1]):
                if reg[nrow[e]] != reg[b]:
                    nptr[reg[b] + 1] += 1
        for r in range(nreg):
            nptr[r + 1] += nptr[r]
    k = new_ptr[nreg]
    new_index = np.empty(k, dtype=np.int64)
    new_nbr = np.empty(k, dtype=np.int64)
    hp = np.full(nreg, np.nan, dtype=np.float32)
    pass_to = np.empty(nreg, dtype=np.int64)
    cdef int64_t[::1] nidx = new_index, nnbr = new_nbr, pto = pass_to
    cdef float[::1] hp_v = hp
    with nogil:
        _merged_borders(flat, lab, bor, w, reg, pptr, border_ptr, border_index, nrow,
                        nptr, nidx, nnbr, hp_v, pto)
    return (basin_region, new_peak, new_size, new_maxi, new_mini, hp, pass_to,
            new_ptr, new_index, new_nbr, peaks_ptr, peaks)


def merge_kernel(
    const float[:, ::1] data,
    const int64_t[:, ::1] labels,
    const uint8_t[:, ::1] borders,
    const int64_t[::1] peak,
    const int64_t[::1] size,
    const float[::1] maxi,
    const float[::1] mini,
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
    nrow = np.empty(border_index.shape[0], dtype=itype)
    return _merge_impl(
        np.asarray(data).reshape(-1), np.asarray(labels).reshape(-1),
        np.asarray(borders).reshape(-1), w, peak, size, maxi, mini,
        border_ptr, border_index, border_neighbor, rowmap, nrow,
    )
