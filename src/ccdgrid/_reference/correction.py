"""Pure-numpy twin of ``ccdgrid._ext._correction`` (exact pixel splitting).

Same signatures, same conventions, same results to rounding (1e-12), by a
different route: instead of cutting each quadrilateral into pieces, the area
of ``quad ∩ cell`` is obtained for all pixels at once from Green's theorem,

    area(P ∩ [y0, y1] x [x0, x1]) = -∮_P g(y) h(x) dy,
    g = indicator of [y0, y1],  h(x) = clip(x - x0, 0, x1 - x0),

(the minus sign for the A -> B -> C -> D orientation of a pixel in (y, x)).
Each edge of the quadrilateral is clipped to the rows ``y0 <= y <= y1`` (the
horizontal lines), then integrated exactly piece by piece between the
vertical lines ``x = x0`` and ``x = x1`` where ``h`` is linear. Pixels are
grouped by the size of their bounding box, and each group is processed with
array operations, one output cell offset at a time.
"""

import numpy as np

__all__ = ["apply_csr", "kept_bounds", "row_sums", "shuffle_planes", "split_pixels"]

# The same constants as the kernel (see its module docstring).
SNAP = 1e-9
AREA_MIN = 1e-9
WEIGHT_MIN = 1e-13
MAX_SPAN = 13.0


def _snap(c):
    r = np.rint(c)
    return np.where(np.abs(c - r) <= SNAP, r, c)


def _corners(dy, dx, oy=0, ox=0):
    """Snapped true corners, arrays (npix, 4) of A, B, C, D, in the frame of origin (oy, ox)."""
    ny, nx = dy.shape[0] - 1, dy.shape[1] - 1
    # the whole-pixel shift on the integer nominal positions: no rounding
    ii, jj = np.meshgrid(np.arange(ny + 1.0) - oy, np.arange(nx + 1.0) - ox, indexing="ij")
    y = _snap(ii + dy)
    x = _snap(jj + dx)

    def four(a):
        return np.stack([a[:-1, :-1], a[1:, :-1], a[1:, 1:], a[:-1, 1:]], axis=-1).reshape(-1, 4)

    return four(y), four(x)


def _edge_integral(py, px, qy, qx, y0, y1, x0, x1):
    """∫ g(y) h(x) dy along the segments p -> q (arrays), for the cell bounds."""
    span = qy - py
    moving = span != 0
    safe = np.where(moving, span, 1.0)
    sa = (y0 - py) / safe
    sb = (y1 - py) / safe
    s_lo = np.clip(np.minimum(sa, sb), 0.0, 1.0)
    s_hi = np.clip(np.maximum(sa, sb), 0.0, 1.0)
    length = np.where(moving & (s_hi > s_lo), (s_hi - s_lo) * span, 0.0)
    xs = px + s_lo * (qx - px)
    xe = px + s_hi * (qx - px)
    # Split [xs, xe] where h changes slope; h is linear on each piece, so
    # (piece fraction) x h(piece midpoint) is its exact mean.
    dxe = xe - xs
    flat = dxe == 0
    safe_dx = np.where(flat, 1.0, dxe)
    t0 = np.clip((x0 - xs) / safe_dx, 0.0, 1.0)
    t1 = np.clip((x1 - xs) / safe_dx, 0.0, 1.0)
    ta = np.minimum(t0, t1)
    tb = np.maximum(t0, t1)
    width = x1 - x0

    def h(x):
        return np.clip(x - x0, 0.0, width)

    mean = (
        ta * h(xs + 0.5 * ta * dxe)
        + (tb - ta) * h(xs + 0.5 * (ta + tb) * dxe)
        + (1.0 - tb) * h(xs + 0.5 * (tb + 1.0) * dxe)
    )
    mean = np.where(flat, h(xs), mean)
    return length * mean


def _cell_area(qy, qx, y0, x0):
    """Area of each quad (rows of qy, qx) inside the unit cell at (y0, x0)."""
    total = np.zeros(qy.shape[0])
    for m in range(4):
        n = (m + 1) % 4
        total += _edge_integral(qy[:, m], qx[:, m], qy[:, n], qx[:, n], y0, y0 + 1, x0, x0 + 1)
    return -total


def _survey(qy, qx):
    """Per quad: (signed area, not degenerate, ymin, ymax, xmin, xmax)."""
    finite = np.isfinite(qy).all(axis=1) & np.isfinite(qx).all(axis=1)
    with np.errstate(invalid="ignore"):
        area = 0.5 * (
            (qy[:, 2] - qy[:, 0]) * (qx[:, 3] - qx[:, 1])
            - (qx[:, 2] - qx[:, 0]) * (qy[:, 3] - qy[:, 1])
        )
        ey0 = qy - np.roll(qy, 1, axis=1)
        ex0 = qx - np.roll(qx, 1, axis=1)
        ey1 = np.roll(qy, -1, axis=1) - qy
        ex1 = np.roll(qx, -1, axis=1) - qx
        n_opposite = ((ey0 * ex1 - ex0 * ey1) < 0).sum(axis=1)
        ymin, ymax = qy.min(axis=1), qy.max(axis=1)
        xmin, xmax = qx.min(axis=1), qx.max(axis=1)
        good = (
            finite
            & (area > AREA_MIN)
            & (n_opposite <= 1)
            & (ymax - ymin <= MAX_SPAN)
            & (xmax - xmin <= MAX_SPAN)
        )
    return area, good, ymin, ymax, xmin, xmax


def kept_bounds(dy, dx, mask, nthreads=0):
    """Bounding box of the true corners of the pixels the matrix can keep.

    See :func:`ccdgrid._ext._correction.kept_bounds`: ``(ymin, ymax, xmin,
    xmax)`` over the unmasked, non-degenerate pixels; ``nthreads`` is ignored.
    """
    del nthreads
    qy, qx = _corners(np.asarray(dy, np.float64), np.asarray(dx, np.float64))
    _, good, ymin, ymax, xmin, xmax = _survey(qy, qx)
    keep = good & (np.asarray(mask).ravel() == 0)
    if not keep.any():
        return (np.inf, -np.inf, np.inf, -np.inf)
    return (
        float(ymin[keep].min()),
        float(ymax[keep].max()),
        float(xmin[keep].min()),
        float(xmax[keep].max()),
    )


def split_pixels(dy, dx, mask, ny_out, nx_out, weight_dtype, nthreads=0, oy=0, ox=0):
    """Sparse matrix of exact pixel-splitting weights, in CSR arrays.

    See :func:`ccdgrid._ext._correction.split_pixels` for the parameters and
    the returned ``(data, indices, indptr, n_degenerate)``; ``nthreads`` is
    ignored.
    """
    del nthreads
    qy, qx = _corners(np.asarray(dy, np.float64), np.asarray(dx, np.float64), oy, ox)
    npix = qy.shape[0]
    mask = np.asarray(mask).ravel() != 0
    area, good, ymin, ymax, xmin, xmax = _survey(qy, qx)
    fy, cy = np.floor(ymin), np.ceil(ymax)
    fx, cx = np.floor(xmin), np.ceil(xmax)
    n_degenerate = int(np.count_nonzero(~mask & ~good))
    keep = ~mask & good & (ymax > 0) & (xmax > 0) & (ymin < ny_out) & (xmin < nx_out)

    idx = np.flatnonzero(keep)
    k0 = fy[idx].astype(np.int64)
    l0 = fx[idx].astype(np.int64)
    nk = cy[idx].astype(np.int64) - k0
    nl = cx[idx].astype(np.int64) - l0
    qy_local = qy[idx] - k0[:, None]
    qx_local = qx[idx] - l0[:, None]
    a = area[idx]

    bins, cols, weights = [], [], []
    sizes = np.stack([nk, nl], axis=1)
    for snk, snl in np.unique(sizes, axis=0) if idx.size else ():
        sel = np.flatnonzero((nk == snk) & (nl == snl))
        for dk in range(snk):
            k = k0[sel] + dk
            for dl in range(snl):
                l = l0[sel] + dl  # noqa: E741
                if snk == 1 and snl == 1:
                    w = np.ones(sel.size)  # the kernel's exact single-cell case
                else:
                    w = _cell_area(qy_local[sel], qx_local[sel], dk, dl) / a[sel]
                ok = (w > WEIGHT_MIN) & (k >= 0) & (k < ny_out) & (l >= 0) & (l < nx_out)
                bins.append(k[ok] * nx_out + l[ok])
                cols.append(idx[sel][ok])
                weights.append(w[ok])

    nbins = ny_out * nx_out
    if bins:
        bins = np.concatenate(bins)
        cols = np.concatenate(cols)
        weights = np.concatenate(weights)
    else:
        bins = cols = np.zeros(0, np.int64)
        weights = np.zeros(0)
    order = np.lexsort((cols, bins))
    nnz = order.size
    small = nnz < 2**31 and npix < 2**31 and nbins < 2**31
    idx_dtype = np.int32 if small else np.int64
    indptr = np.zeros(nbins + 1, dtype=idx_dtype)
    np.cumsum(np.bincount(bins, minlength=nbins), out=indptr[1:])
    return (
        weights[order].astype(weight_dtype),
        cols[order].astype(idx_dtype),
        indptr,
        n_degenerate,
    )


def row_sums(indptr, data):
    """Sum of the weights of every row, float64, shape (len(indptr) - 1,)."""
    counts = np.diff(indptr)
    rows = np.repeat(np.arange(counts.size), counts)
    return np.bincount(rows, weights=np.asarray(data, np.float64), minlength=counts.size)


def apply_csr(indptr, indices, data, images, out, coverage, normalize, dummy, nthreads=0):
    """``out[m] = M @ images[m]`` for every image of the stack, in place.

    See :func:`ccdgrid._ext._correction.apply_csr`; accumulates in the dtype
    of ``out`` (integer images are converted to it first); ``nthreads`` is
    ignored.
    """
    del nthreads
    images = images.astype(out.dtype, copy=False)
    counts = np.diff(indptr)
    rows = np.repeat(np.arange(counts.size), counts)
    products = data.astype(images.dtype)[None, :] * images[:, indices]
    acc = np.zeros(out.shape, dtype=images.dtype)
    for m in range(images.shape[0]):
        np.add.at(acc[m], rows, products[m])
    if normalize:
        covered = counts > 0
        acc[:, covered] /= coverage[covered].astype(images.dtype)
    acc[:, counts == 0] = dummy
    out[...] = acc


_STORED_BLOCK = 65535


def shuffle_planes(src, itemsize, dst, starts, stored):
    """HDF5's byte shuffle of ``src``, each byte plane written where it will be stored.

    See :func:`ccdgrid._ext._correction.shuffle_planes`: plane ``k`` (byte
    ``k`` of every element) at ``dst[starts[k]:]``, in a row or as stored
    deflate blocks of 65535 bytes, each after its 5-byte header.
    """
    n = src.size // itemsize
    if n == 0:
        return
    planes = src[: n * itemsize].reshape(n, itemsize).T
    full, rest = divmod(n, _STORED_BLOCK)
    counts = [_STORED_BLOCK] * full + ([rest] if rest else [])
    for k in range(itemsize):
        start = int(starts[k])
        if not stored[k]:
            dst[start : start + n] = planes[k]
            continue
        for g, count in enumerate(counts):
            at = start + g * (_STORED_BLOCK + 5)
            nlen = count ^ 0xFFFF
            dst[at : at + 5] = (0, count & 0xFF, count >> 8, nlen & 0xFF, nlen >> 8)
            first = g * _STORED_BLOCK
            dst[at + 5 : at + 5 + count] = planes[k][first : first + count]
