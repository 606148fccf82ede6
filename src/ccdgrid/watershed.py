"""Inverse watershed segmentation of an image into basins of attraction of its maxima.

Every pixel climbs by steepest ascent to a local maximum; the pixels that reach
the same maximum form one basin (a *region*), labelled by the flat index
``row * width + col`` of its peak. This is pyFAI's ``InverseWatershed``
(PYFAI_NOTES section 1) made O(N) and free of per-region Python objects:

* :func:`segment` returns a :class:`Segmentation`: labels, the 8-neighbour
  border bitmask and the region table as a structure of arrays.
* :func:`merge_singletons` merges regions whose maximum equals their minimum
  (one-pixel maxima, plateaus) into a neighbour.
* :class:`InverseWatershed` mirrors pyFAI's class, so the CCD-calibration
  tutorial runs unchanged with only its import changed.

Arrays are indexed ``[row, col] = [y, x]``; flat indices are C order.
"""

from dataclasses import dataclass, field

import numpy as np

from ._ext import _watershed as _cython
from ._reference import watershed as _numpy
from ._validation import as_image, check_backend
from .errors import CcdgridError

__all__ = ["InverseWatershed", "Region", "Segmentation", "merge_singletons", "segment"]

_ENGINES = {"cython": _cython, "numpy": _numpy}


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Labels, border bitmask and region table of an inverse watershed.

    Regions are rows ``0 .. R-1`` sorted by the flat index of their peak.
    Per-region arrays have shape (R,). Border pixels are stored per region in
    CSR form: region ``r`` owns ``border_index[border_ptr[r]:border_ptr[r+1]]``
    (flat indices, raster order) with one neighbour label each in
    ``border_neighbor``.

    A merged table shares the border CSR of its basins: its own
    ``border_ptr``, ``border_index`` and ``border_neighbor`` are assembled on
    first access (a copy of size B), while :meth:`border_of` reads a
    region's border without assembling anything.

    Index arrays with one entry per pixel or per border pixel (``labels``,
    ``border_index``, ``border_neighbor``) are int32 for images of fewer than
    2**31 pixels (as pyFAI's labels), int64 from there on: half the memory,
    and half the page faults of the fresh outputs. Per-region arrays are
    int64 whatever the size.

    Attributes
    ----------
    shape : tuple of int
        ``(h, w)`` of the image.
    labels : ndarray of int32 (int64 from 2**31 pixels), shape (h, w)
        Flat index of the local maximum each pixel climbs to (its *basin*).
        Never rewritten by merges, as in pyFAI.
    borders : ndarray of uint8, shape (h, w)
        Bit k set iff neighbour k is inside the image and has another label:
        bit0 (y-1, x-1), bit1 (y-1, x), bit2 (y-1, x+1), bit3 (y, x+1),
        bit4 (y+1, x+1), bit5 (y+1, x), bit6 (y+1, x-1), bit7 (y, x-1).
        Describes basins, not merged regions.
    peak : ndarray of int64, shape (R,)
        Flat index of each region's peak pixel (pyFAI ``Region.index``).
    size : ndarray of int64, shape (R,)
        Pixels in the region; sums to ``h * w``.
    maxi : ndarray of float32, shape (R,)
        ``float32(image)`` at the peak.
    mini : ndarray of float32, shape (R,)
        Minimum of ``float32(image)`` over the region's border pixels; for a
        merged region the minimum of its parts' ``mini`` (NaN ignored). NaN
        for a basin without border pixels (e.g. the whole image is one basin;
        pyFAI drops such regions).
    highest_pass : ndarray of float32, shape (R,)
        Highest value on the region's border (pyFAI's "pass"); NaN without border.
    pass_to : ndarray of int64, shape (R,)
        Label recorded at the first border pixel holding ``highest_pass``;
        -1 without border.
    border_ptr : ndarray of int64, shape (R + 1,)
    border_index : ndarray of int32 (int64 from 2**31 pixels), shape (B,)
        Flat indices of border pixels, raster order within each region.
    border_neighbor : ndarray of int32 (int64 from 2**31 pixels), shape (B,)
        For each border pixel the label of ONE neighbour of another basin,
        first set bit in the priority N, E, S, W, NW, NE, SE, SW (pyFAI's).
    basin_peak : ndarray of int64, shape (n_basins,)
        Labels of all basins, ascending (the ``peak`` of the unmerged table).
    basin_region : ndarray of int64, shape (n_basins,)
        Region row of each basin; ``arange(R)`` before merging.
    peaks_ptr : ndarray of int64, shape (R + 1,)
    peaks : ndarray of int64, shape (n_basins,)
        CSR of the labels of the basins making up each region, ascending.
    """

    shape: tuple
    labels: np.ndarray
    borders: np.ndarray
    peak: np.ndarray
    size: np.ndarray
    maxi: np.ndarray
    mini: np.ndarray
    highest_pass: np.ndarray
    pass_to: np.ndarray
    basin_peak: np.ndarray
    basin_region: np.ndarray
    peaks_ptr: np.ndarray
    peaks: np.ndarray
    _border: object = field(repr=False)

    @property
    def border_ptr(self):
        """int64 (R + 1,): CSR offsets of each region's border pixels."""
        return self._border.csr()[0]

    @property
    def border_index(self):
        """int32 (B,): border pixels, raster order per region (int64 from 2**31 pixels)."""
        return self._border.csr()[1]

    @property
    def border_neighbor(self):
        """int32 (B,): one neighbouring basin's label per border pixel (int64 from 2**31 px)."""
        return self._border.csr()[2]

    @property
    def n_regions(self):
        """Number of regions R (rows of the table)."""
        return int(self.peak.size)

    @property
    def n_basins(self):
        """Number of basins (local maxima) before any merge."""
        return int(self.basin_peak.size)

    @property
    def is_merged(self):
        """True if some region holds several basins."""
        return self.n_regions != self.n_basins

    def region_of_labels(self, labels):
        """Region row of each basin label (int64, same shape as ``labels``)."""
        rows = np.searchsorted(self.basin_peak, np.asarray(labels, dtype=np.int64))
        return self.basin_region[rows]

    def region_of_pixels(self):
        """Region row of every pixel, shape (h, w).

        int32 when there are fewer than 2**31 regions, else int64; use it with
        ``np.bincount(rows.ravel(), weights=...)`` for per-region sums.
        """
        itype = np.int32 if self.n_regions < 2**31 else np.int64
        rowmap = np.empty(self.labels.size, dtype=itype)
        rowmap[self.basin_peak] = self.basin_region
        return rowmap[self.labels]

    def border_of(self, row):
        """``(border_index, border_neighbor)`` of region ``row`` (views, not copies)."""
        return self._border.of(row)

    def peaks_of(self, row):
        """Labels of the basins that make up region ``row`` (ascending)."""
        return self.peaks[self.peaks_ptr[row] : self.peaks_ptr[row + 1]]


def segment(image, *, backend="cython"):
    """Inverse watershed: label every pixel with the local maximum it climbs to.

    Parameters
    ----------
    image : array_like, shape (h, w)
        Any real 2-D image (integers, floats, non-contiguous views). It is
        compared as ``float32(image)``, exactly as pyFAI does.
    backend : {"cython", "numpy"}
        Engine; both give identical results.

    Returns
    -------
    Segmentation
        One region per basin (``basin_region = arange(R)``).

    Raises
    ------
    CcdgridError
        If ``image`` is not a non-empty real 2-D array, or ``backend`` is unknown.

    Notes
    -----
    Each pixel's successor is the first maximum, in raster order, of its 3x3
    window (centre included) if strictly greater than the pixel; a pixel
    without a greater neighbour is a peak, so every pixel of a flat plateau is
    its own peak. NaN never climbs and is never climbed to; a -inf pixel
    never climbs either (as pyFAI). Labels are resolved from the successor
    pointers once per pixel (path compression), so the cost is O(h*w).
    """
    check_backend(backend)
    data = _kernel_image(image, "image")
    out = _ENGINES[backend].segment_kernel(data)
    return _basin_segmentation(data.shape, *out)


def _kernel_image(image, name):
    """``image`` as the kernels take it: C-contiguous float64 if it is float64, else float32.

    The kernels round float64 values to float32 where they read them, which
    saves a float32 copy of the whole image.
    """
    dtype = np.float64 if np.asarray(image).dtype == np.float64 else np.float32
    return as_image(image, name, dtype=dtype)


def _basin_segmentation(
    shape, labels, borders, peak, size, maxi, mini, hp, pass_to, bptr, bidx, bnbr
):
    n = peak.size
    rows = np.arange(n + 1, dtype=np.int64)  # one allocation for both identity maps
    return Segmentation(
        shape=tuple(shape),
        labels=labels,
        borders=borders,
        peak=peak,
        size=size,
        maxi=maxi,
        mini=mini,
        highest_pass=hp,
        pass_to=pass_to,
        basin_peak=peak,
        basin_region=rows[:n],
        peaks_ptr=rows,
        peaks=peak,
        _border=_BorderCSR(bptr, bidx, bnbr),
    )


class _BorderCSR:
    """Border CSR held as arrays (the table of basins)."""

    __slots__ = ("_csr",)

    def __init__(self, ptr, index, neighbor):
        self._csr = (ptr, index, neighbor)

    def csr(self):
        return self._csr

    def of(self, row):
        ptr, index, neighbor = self._csr
        sl = slice(ptr[row], ptr[row + 1])
        return index[sl], neighbor[sl]


class _MergedBorders:
    """Border CSR of a merged table: the basins' CSR plus a patch, assembled on demand.

    A region of one basin has that basin's border; the regions of several
    basins have theirs in the patch CSR (``patch = (ptr, index, neighbor)``,
    in row order), as pyFAI's merge touches only the merged regions.
    :meth:`csr` builds the contiguous arrays once, copying runs of
    consecutive one-basin regions; :meth:`of` answers without building them.
    """

    __slots__ = ("_basin_peak", "_basins", "_built", "_multi", "_patch", "_peak", "_peaks_ptr")

    def __init__(self, basins, basin_peak, peak, peaks_ptr, patch):
        self._basins = basins
        self._basin_peak = basin_peak
        self._peak = peak
        self._peaks_ptr = peaks_ptr
        self._patch = patch
        self._multi = None
        self._built = None

    @property
    def _multi_rows(self):
        """Rows of the regions of several basins (found on first use)."""
        if self._multi is None:
            self._multi = np.flatnonzero(np.diff(self._peaks_ptr) > 1)
        return self._multi

    def _basin(self, rows):
        # a one-basin region's peak is its basin's label
        return np.searchsorted(self._basin_peak, self._peak[rows])

    def of(self, row):
        k = np.searchsorted(self._multi_rows, row)
        if k < self._multi_rows.size and self._multi_rows[k] == row:
            ptr, index, neighbor = self._patch
            sl = slice(ptr[k], ptr[k + 1])
            return index[sl], neighbor[sl]
        return self._basins.of(self._basin(row))

    def csr(self):
        if self._built is None:
            self._built = self._assemble()
        return self._built

    def _assemble(self):
        bptr, bidx, bnbr = self._basins.csr()
        pptr, pidx, pnbr = self._patch
        n = self._peak.size
        single = np.ones(n, dtype=bool)
        single[self._multi_rows] = False
        rows = np.flatnonzero(single)
        basin = self._basin(rows)
        lengths = np.empty(n, dtype=np.int64)
        lengths[rows] = bptr[basin + 1] - bptr[basin]
        lengths[self._multi_rows] = np.diff(pptr)
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        index = np.empty(ptr[-1], dtype=bidx.dtype)
        neighbor = np.empty(ptr[-1], dtype=bnbr.dtype)
        # consecutive one-basin rows holding consecutive basins are one slice of each table
        cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(basin) != 1)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, rows.size], strict=True):
            if a == b:
                continue
            dst = slice(ptr[rows[a]], ptr[rows[b - 1] + 1])
            src = slice(bptr[basin[a]], bptr[basin[b - 1] + 1])
            index[dst] = bidx[src]
            neighbor[dst] = bnbr[src]
        for k, r in enumerate(self._multi_rows):
            dst = slice(ptr[r], ptr[r + 1])
            index[dst] = pidx[pptr[k] : pptr[k + 1]]
            neighbor[dst] = pnbr[pptr[k] : pptr[k + 1]]
        return ptr, index, neighbor


def merge_singletons(segmentation, image, *, backend="cython"):
    """Merge the regions whose maximum equals their minimum into a neighbour.

    Such regions are one-pixel maxima (a pixel's only border pixel is itself)
    and the pixels of flat plateaus. Basins are visited in peak order, as
    pyFAI's ``merge_singleton`` does; a region still singleton when visited:

    1. if it is one pixel, joins the region of its first 8-neighbour of equal
       value (priority N, E, S, W, NW, NE, SE, SW);
    2. otherwise joins the neighbouring region with the highest maximum (ties:
       the lowest peak index; NaN maxima never attract). pyFAI intends this
       but its loop is dead code and always takes the first recorded
       neighbour (PYFAI_NOTES §1.8); we do what it meant.

    The larger maximum keeps the peak (a tie keeps the visited region), sizes
    add up, ``mini`` is the minimum of the parts' ``mini``, border pixels whose
    recorded neighbour is now in the same region are dropped, and
    ``highest_pass`` / ``pass_to`` are recomputed on the merged border taken
    in raster order (pyFAI keeps merge order there, so ties may pick another
    ``pass_to``). A merged region left without border gets NaN / -1.

    Parameters
    ----------
    segmentation : Segmentation
        The unmerged result of :func:`segment` on ``image``.
    image : array_like, shape (h, w)
        The image that was segmented (compared as float32).
    backend : {"cython", "numpy"}

    Returns
    -------
    Segmentation
        Merged table; ``labels``, ``borders`` and the borders of regions
        made of one basin are shared with the input (its border CSR arrays
        are assembled on first access, see :class:`Segmentation`).
    """
    check_backend(backend)
    if not isinstance(segmentation, Segmentation):
        raise CcdgridError(
            f"`segmentation` must be a Segmentation, got {type(segmentation).__name__}"
        )
    if segmentation.is_merged:
        raise CcdgridError("`segmentation` is already merged: pass the result of segment()")
    data = _kernel_image(image, "image")
    if data.shape != segmentation.shape:
        raise CcdgridError(
            f"`image` has shape {data.shape} but `segmentation` was made on {segmentation.shape}"
        )
    s = segmentation
    out = _ENGINES[backend].merge_kernel(
        data,
        s.labels,
        s.borders,
        s.peak,
        s.size,
        s.maxi,
        s.mini,
        s.highest_pass,
        s.pass_to,
        s.border_ptr,
        s.border_index,
        s.border_neighbor,
    )
    basin_region, peak, size, maxi, mini, hp, pass_to, qptr, qidx, qnbr, pptr, peaks = out
    return Segmentation(
        shape=s.shape,
        labels=s.labels,
        borders=s.borders,
        peak=peak,
        size=size,
        maxi=maxi,
        mini=mini,
        highest_pass=hp,
        pass_to=pass_to,
        basin_peak=s.basin_peak,
        basin_region=basin_region,
        peaks_ptr=pptr,
        peaks=peaks,
        _border=_MergedBorders(s._border, s.basin_peak, peak, pptr, (qptr, qidx, qnbr)),
    )


class Region:
    """One region of :class:`InverseWatershed`, read lazily from the table.

    Mirrors pyFAI's ``Region`` attributes (``index, size, maxi, mini,
    highest_pass, pass_to, peaks, border, neighbors``) and ``get_*`` methods.
    ``maxi``, ``mini`` and ``highest_pass`` are float32 values; ``peaks`` is
    ascending (pyFAI lists them in merge order).
    """

    __slots__ = ("_row", "_seg")

    def __init__(self, seg, row):
        self._seg = seg
        self._row = row

    @property
    def index(self):
        return int(self._seg.peak[self._row])

    @property
    def size(self):
        return int(self._seg.size[self._row])

    @property
    def maxi(self):
        return self._seg.maxi[self._row]

    @property
    def mini(self):
        return self._seg.mini[self._row]

    @property
    def highest_pass(self):
        return self._seg.highest_pass[self._row]

    @property
    def pass_to(self):
        return int(self._seg.pass_to[self._row])

    @property
    def peaks(self):
        return self._seg.peaks_of(self._row).tolist()

    @property
    def border(self):
        return self._seg.border_of(self._row)[0].tolist()

    @property
    def neighbors(self):
        return self._seg.border_of(self._row)[1].tolist()

    def get_index(self):
        return self.index

    def get_size(self):
        return self.size

    def get_maxi(self):
        return self.maxi

    def get_mini(self):
        return self.mini

    def get_highest_pass(self):
        return self.highest_pass

    def get_pass_to(self):
        return self.pass_to

    def get_borders(self):
        return self.border

    def get_neighbors(self):
        return self.neighbors

    def __repr__(self):
        return (
            f"Region(index={self.index}, size={self.size}, maxi={self.maxi}, "
            f"mini={self.mini}, pass={self.highest_pass} to {self.pass_to})"
        )


class InverseWatershed:
    """pyFAI-compatible façade over :func:`segment` and :func:`merge_singletons`.

    Parameters
    ----------
    data : array_like, shape (h, w)
        Real 2-D image; kept as a float32 copy in ``data``.
    thres : float
        Kept for signature compatibility (pyFAI's ``merge_intense`` threshold).
    backend : {"cython", "numpy"}

    Attributes
    ----------
    labels : ndarray of int32, shape (h, w)
        Flat index of each pixel's basin peak (int32 as pyFAI's; int64 from
        2**31 pixels).
    borders : ndarray of uint8, shape (h, w)
    regions : dict of int to Region
        Every basin label -> its (possibly merged) region; merged regions are
        the same object under all their labels. As in pyFAI, basins without
        border pixels (no neighbour) are left out. Built on first access.
    segmentation : Segmentation or None
        The current table, for array-level work.
    """

    def __init__(self, data, thres=1.0, *, backend="cython"):
        self.backend = check_backend(backend)
        self.data = as_image(data, "data")
        self.height, self.width = self.data.shape
        self.thres = thres
        self.segmentation = None
        self._basins = None
        self._regions = None
        self.labels = None
        self.borders = None

    def init(self):
        """Segment the image (pyFAI's init_labels/borders/regions/pass)."""
        self._basins = segment(self.data, backend=self.backend)
        self.segmentation = self._basins
        self.labels = self._basins.labels
        self.borders = self._basins.borders
        self._regions = None

    def merge_singleton(self):
        """Merge singleton regions (see :func:`merge_singletons`)."""
        if self._basins is None:
            self.init()
        self.segmentation = merge_singletons(self._basins, self.data, backend=self.backend)
        self._regions = None

    @property
    def regions(self):
        if self._regions is None:
            self._regions = self._build_regions()
        return self._regions

    def _build_regions(self):
        if self.segmentation is None:
            return {}
        seg = self.segmentation
        objects = [Region(seg, r) for r in range(seg.n_regions)]
        # pyFAI drops the basins that have no border pixel before any merge
        has_border = np.diff(self._basins.border_ptr) > 0
        keys = seg.basin_peak[has_border].tolist()
        rows = seg.basin_region[has_border].tolist()
        return {k: objects[r] for k, r in zip(keys, rows, strict=True)}

    def peaks_from_area(self, mask, Imin=None, keep=None, refine=True, dmin=0.0):
        """Peaks of the regions touched by ``mask``, brightest first when filtered.

        Parameters
        ----------
        mask : array_like of bool, shape (h, w)
            Pixels of interest; a region counts if any of its pixels is set,
            and its constituent peaks count if they lie in the mask.
        Imin : float, optional
            Keep only peaks at least this intense (``None``: no limit; pyFAI
            also treats 0 as no limit, we do not).
        keep : int, optional
            Keep at most this many, greedily preferring peaks farther than
            ``dmin`` pixels from every peak already kept.
        refine : bool
            Refine each peak to sub-pixel (``ccdgrid.bilinear.refine_peaks``).
        dmin : float
            Minimum distance in pixels used with ``keep``.

        Returns
        -------
        ndarray of float64, shape (N, 2)
            ``(y, x)`` index coordinates; sorted by decreasing intensity when
            ``Imin`` or ``keep`` is given, else by region then peak index.
        """
        mask = np.asarray(mask)
        if mask.shape != self.data.shape:
            raise CcdgridError(
                f"`mask` has shape {mask.shape}, expected the image shape {self.data.shape}"
            )
        if self.segmentation is None:
            self.init()
        seg = self.segmentation
        flat_mask = mask.astype(bool).ravel()
        pts = np.flatnonzero(flat_mask)
        rows = np.unique(seg.region_of_labels(self.labels.ravel()[pts]))
        if rows.size:
            starts, stops = seg.peaks_ptr[rows], seg.peaks_ptr[rows + 1]
            cand = np.concatenate([seg.peaks[a:b] for a, b in zip(starts, stops, strict=True)])
        else:
            cand = np.empty(0, dtype=np.int64)
        cand = cand[flat_mask[cand]]
        intensity = self.data.ravel()[cand]
        yx = np.stack([cand // self.width, cand % self.width], axis=1)
        if refine and cand.size:
            from .bilinear import refine_peaks  # another stage's module; loaded on demand

            out = refine_peaks(self.data, yx, backend=self.backend)
        else:
            out = yx.astype(np.float64)
        if Imin is None and keep is None:
            return out
        order = np.argsort(-intensity, kind="stable")
        if Imin is not None:
            order = order[intensity[order] >= Imin]
        out = out[order]
        if keep is not None and len(out) > keep:
            out = _greedy_keep(out, int(keep), float(dmin))
        return out


def _greedy_keep(points, keep, dmin):
    """First ``keep`` points no closer than ``dmin`` to an earlier kept one, padded."""
    accepted = []
    rejected = []
    for k, p in enumerate(points):
        if len(accepted) >= keep:
            break
        if accepted:
            d2 = ((points[accepted] - p) ** 2).sum(axis=1)
            if (d2 <= dmin * dmin).any():
                rejected.append(k)
                continue
        accepted.append(k)
    chosen = (accepted + rejected)[:keep]
    return points[chosen]
