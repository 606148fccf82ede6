"""Pure-numpy twins of the inverse watershed kernels (``ccdgrid._ext._watershed``).

Same signatures and results as the Cython kernels; they are the executable
specification the kernels are tested against and the ``backend="numpy"`` path.

* :func:`segment_kernel` climbs every pixel to its local maximum by pointer
  jumping on a best-neighbour array, then builds the border bitmask and the
  region table with ``np.bincount`` / ``ufunc.at`` / stable sorts.
* :func:`merge_kernel` merges singleton regions. Its union-find loop runs in
  Python over the singleton basins only (never per pixel); everything else is
  vectorised.

Both trust their inputs: ``data`` is a C-contiguous float32 or float64 (h, w)
array, compared as float32, and the segmentation arrays are the ones
:func:`segment_kernel` returned.
"""

import numpy as np

__all__ = ["NEIGHBOUR_OFFSETS", "PRIORITY_BITS", "index_dtype", "merge_kernel", "segment_kernel"]

#: (dy, dx) of the neighbour tested by bit k of the border bitmask (pyFAI's layout).
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
#: Order in which a border pixel's one recorded neighbour is chosen: N, E, S, W, NW, NE, SE, SW.
PRIORITY_BITS = (1, 3, 5, 7, 0, 2, 4, 6)


def index_dtype(n_pixels):
    """dtype of the per-pixel and per-border-pixel index arrays of an image of ``n_pixels``.

    int32 below 2**31 pixels, int64 from there on (as the kernel).
    """
    return np.dtype(np.int32) if n_pixels < 2**31 else np.dtype(np.int64)


def _best_neighbour(data):
    """Flat index of the steepest-ascent successor of every pixel, int64 (h*w,)."""
    h, w = data.shape
    # NaN padding never wins a strict ">" comparison.
    padded = np.pad(data, 1, constant_values=np.nan)
    flat = np.arange(h * w, dtype=np.int64).reshape(h, w)
    best_val = data.copy()
    best_idx = flat.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue  # the centre is the starting value: it never beats itself
            nb = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            # raster order + strict ">" = the first maximum of the window wins
            better = nb > best_val
            best_val = np.where(better, nb, best_val)
            best_idx = np.where(better, flat + (dy * w + dx), best_idx)
    # pyFAI's climb loop runs while the value rises from -inf: a -inf pixel never moves.
    best_idx[np.isneginf(data)] = flat[np.isneginf(data)]
    return best_idx.ravel()


def _climb(data):
    """Label (flat index of its local maximum) of every pixel, int64 (h*w,)."""
    ptr = _best_neighbour(data)
    # Pointer jumping: every round doubles the resolved path length.
    while True:
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            return ptr
        ptr = nxt


def _border_bits(labels2d):
    """uint8 (h, w) bitmask: bit k set iff neighbour k exists and has another label."""
    h, w = labels2d.shape
    padded = np.pad(labels2d, 1, constant_values=-1)
    bits = np.zeros((h, w), dtype=np.uint8)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        nb = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        bits |= (((nb != labels2d) & (nb != -1)).astype(np.uint8)) << np.uint8(k)
    return bits


def _recorded_neighbour(labels, bits, pixels, width):
    """Label of the one neighbour recorded for each border pixel (priority N,E,S,W,...)."""
    out = np.full(pixels.shape, -1, dtype=np.int64)
    b = bits[pixels]
    for k in reversed(PRIORITY_BITS):  # the highest priority is written last
        dy, dx = NEIGHBOUR_OFFSETS[k]
        sel = (b >> k) & 1 == 1
        out[sel] = labels[pixels[sel] + dy * width + dx]
    return out


def _region_passes(values, neighbours, ptr):
    """pyFAI ``init_values`` over CSR border values: (mini, highest_pass, pass_to).

    Per region, in raster order: mini and the pass start at the first border
    value; later values lower the minimum or raise the pass with strict
    comparisons, so NaN after the first value is ignored, and the pass goes to
    the neighbour of the first border pixel holding the highest value. Regions
    without border get NaN, NaN, -1.
    """
    n = ptr.size - 1
    counts = np.diff(ptr)
    owner = np.repeat(np.arange(n), counts)
    mini = np.full(n, np.nan, dtype=np.float32)
    hp = np.full(n, np.nan, dtype=np.float32)
    pass_to = np.full(n, -1, dtype=np.int64)
    if values.size == 0:
        return mini, hp, pass_to
    np.fmin.at(mini, owner, values)
    np.fmax.at(hp, owner, values)
    pos = np.arange(values.size, dtype=np.int64)
    first_max = np.full(n, values.size, dtype=np.int64)
    hit = values == hp[owner]
    np.minimum.at(first_max, owner[hit], pos[hit])
    has = counts > 0
    starts = ptr[:-1][has]
    # a NaN first value freezes both running values at NaN
    nan_first = np.zeros(n, dtype=bool)
    nan_first[has] = np.isnan(values[starts])
    mini[nan_first] = np.nan
    hp[nan_first] = np.nan
    first_max[nan_first] = ptr[:-1][nan_first]
    pass_to[has] = neighbours[first_max[has]]
    return mini, hp, pass_to


def segment_kernel(data):
    """Inverse watershed segmentation of a float32 image (numpy twin).

    Parameters
    ----------
    data : ndarray of float32 or float64, shape (h, w), C-contiguous
        Compared as float32.

    Returns
    -------
    tuple
        ``(labels, borders, peak, size, maxi, mini, highest_pass, pass_to,
        border_ptr, border_index, border_neighbor)`` as documented in
        :class:`ccdgrid.watershed.Segmentation`; ``labels``,
        ``border_index`` and ``border_neighbor`` have the dtype
        :func:`index_dtype` gives for ``h * w`` (computed in int64).
    """
    data = data.astype(np.float32, copy=False)
    h, w = data.shape
    flat = data.ravel()
    labels = _climb(data)
    peak = np.flatnonzero(labels == np.arange(labels.size, dtype=np.int64)).astype(np.int64)
    n = peak.size
    rows = np.searchsorted(peak, labels)
    size = np.bincount(rows, minlength=n).astype(np.int64)
    borders = _border_bits(labels.reshape(h, w))
    pixels = np.flatnonzero(borders.ravel()).astype(np.int64)
    owner = rows[pixels]
    order = np.argsort(owner, kind="stable")
    border_index = pixels[order]
    border_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n), out=border_ptr[1:])
    border_neighbor = _recorded_neighbour(labels, borders.ravel(), border_index, w)
    maxi = flat[peak].astype(np.float32)
    mini, hp, pass_to = _region_passes(flat[border_index], border_neighbor, border_ptr)
    itype = index_dtype(labels.size)
    return (
        labels.reshape(h, w).astype(itype),
        borders,
        peak,
        size,
        maxi,
        mini,
        hp,
        pass_to,
        border_ptr,
        border_index.astype(itype),
        border_neighbor.astype(itype),
    )


def _merge_roots(data, labels, borders, width, peak, size, maxi, mini, border_ptr, border_nrow):
    """Union-find over basins: (rep (R,), maxi, mini) with rep[b] = basin row holding the peak."""
    n = peak.size
    region = np.arange(n, dtype=np.int64)  # basin -> representative basin (kept flat)
    members = {}  # representative -> array of member basins (only for merged ones)
    cur_size = size.copy()
    cur_maxi = maxi.copy()
    cur_mini = mini.copy()
    height = data.shape[0]
    flat = data.ravel()
    for k in np.flatnonzero(maxi == mini):
        r = region[k]
        if cur_maxi[r] != cur_mini[r]:
            continue
        target = -1
        if cur_size[r] == 1:
            # a one-pixel region joins an equal-valued neighbour first (pyFAI priority)
            p = int(peak[r])
            y, x = divmod(p, width)
            for bit in PRIORITY_BITS:
                dy, dx = NEIGHBOUR_OFFSETS[bit]
                if not (int(borders[p]) >> bit) & 1:
                    continue
                if not (0 <= y + dy < height and 0 <= x + dx < width):
                    continue
                q = p + dy * width + dx
                if flat[q] == cur_maxi[r]:
                    target = region[np.searchsorted(peak, labels[q])]
                    break
        if target < 0:
            # else the neighbouring region with the highest maximum (ties: lowest peak)
            own = members.get(r, np.array([r]))
            entries = np.concatenate(
                [np.arange(border_ptr[m], border_ptr[m + 1]) for m in own]
            ).astype(np.int64)
            cand = region[border_nrow[entries]]
            cand = cand[(cand != r) & ~np.isnan(cur_maxi[cand])]
            if cand.size:
                best = cur_maxi[cand].max()
                target = cand[cur_maxi[cand] == best].min()
        if target < 0:
            continue
        keep, gone = (target, r) if cur_maxi[target] > cur_maxi[r] else (r, target)
        moved = members.pop(gone, np.array([gone]))
        region[moved] = keep
        members[keep] = np.concatenate([members.get(keep, np.array([keep])), moved])
        cur_size[keep] += cur_size[gone]
        cur_mini[keep] = np.fmin(cur_mini[keep], cur_mini[gone])
    return region, cur_maxi, cur_mini


def merge_kernel(
    data,
    labels,
    borders,
    peak,
    size,
    maxi,
    mini,
    highest_pass,
    pass_to,
    border_ptr,
    border_index,
    border_neighbor,
):
    """Merge singleton regions of a segmentation (numpy twin).

    Parameters
    ----------
    data : ndarray of float32 or float64, shape (h, w), C-contiguous
        The image that was segmented (compared as float32).
    labels : ndarray of int32 or int64, shape (h, w)
    borders : ndarray of uint8, shape (h, w)
    peak, size, maxi, mini, highest_pass, pass_to : ndarray
    border_ptr, border_index, border_neighbor : ndarray
        The basin table of :func:`segment_kernel` (one row per basin);
        ``border_index`` and ``border_neighbor`` have the dtype of ``labels``,
        which ``patch_index`` and ``patch_neighbor`` keep. This twin
        recomputes every pass; the kernel copies ``highest_pass`` and
        ``pass_to`` of regions made of one basin.

    Returns
    -------
    tuple
        ``(basin_region, peak, size, maxi, mini, highest_pass, pass_to,
        patch_ptr, patch_index, patch_neighbor, peaks_ptr, peaks)`` of the
        merged table; ``basin_region`` (R_basins,) maps basins to region rows.
        Regions of one basin keep that basin's border; ``patch_*`` is the
        border CSR of the regions of several basins only, in row order.
    """
    data = data.astype(np.float32, copy=False)
    width = data.shape[1]
    lab = labels.ravel()
    border_nrow = np.searchsorted(peak, border_neighbor)
    rep, cur_maxi, cur_mini = _merge_roots(
        data, lab, borders.ravel(), width, peak, size, maxi, mini, border_ptr, border_nrow
    )
    reps = np.flatnonzero(rep == np.arange(peak.size))  # ascending = sorted by peak index
    n = reps.size
    basin_region = np.searchsorted(reps, rep).astype(np.int64)
    new_peak = peak[reps]
    new_size = np.bincount(basin_region, weights=size, minlength=n).astype(np.int64)
    new_maxi = cur_maxi[reps]
    new_mini = cur_mini[reps]
    order = np.argsort(basin_region, kind="stable")
    peaks = peak[order]
    peaks_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(basin_region, minlength=n), out=peaks_ptr[1:])
    # a border pixel stays iff its recorded neighbour ended in another region
    owner = np.repeat(basin_region, np.diff(border_ptr))
    keep = basin_region[border_nrow] != owner
    owner = owner[keep]
    pix = border_index[keep]
    nbr = border_neighbor[keep]
    order = np.lexsort((pix, owner))
    owner = owner[order]
    pix = pix[order]
    nbr = nbr[order]
    new_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n), out=new_ptr[1:])
    _, hp, pass_to = _region_passes(data.ravel()[pix], nbr, new_ptr)
    multi = np.diff(peaks_ptr) > 1
    in_patch = multi[owner]
    patch_ptr = np.zeros(np.count_nonzero(multi) + 1, dtype=np.int64)
    np.cumsum(np.diff(new_ptr)[multi], out=patch_ptr[1:])
    return (
        basin_region,
        new_peak,
        new_size,
        new_maxi,
        new_mini,
        hp,
        pass_to,
        patch_ptr,
        pix[in_patch],
        nbr[in_patch],
        peaks_ptr,
        peaks,
    )
