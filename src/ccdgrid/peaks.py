"""Stage 1 of the calibration: find the centre of every hole of a grid image.

The pipeline, all of it automatic (every guess can be overridden):

1. the pitch and hole diameter are guessed from the autocorrelation of the
   image (:mod:`ccdgrid.grid_scale`);
2. the image is binned so that a hole still spans about five pixels
   (:func:`detection_binning`; 2x2 for the usual 10 px holes), then smoothed
   with a disc of the hole's size by FFT (:mod:`ccdgrid.smoothing`);
3. the smoothed image is cut into inverse-watershed regions, one per local
   maximum, and singleton regions are merged (:mod:`ccdgrid.watershed`);
4. the contrast of each region's peak over its surroundings is thresholded
   in log10 at an automatically chosen level (:mod:`ccdgrid.holes`); hot
   pixels and cosmic-ray streaks far brighter than the holes (their
   smoothed plateaus outshine faint holes and set the threshold) are found
   behind the peaks they make, left out of the image as invalid pixels, and
   steps 2-4 are redone;
5. the peaks are refined to sub-pixel seeds on the smoothed image
   (:func:`ccdgrid.bilinear.refine_peaks`) and mapped back to full
   resolution;
6. a blurred-disc profile is fitted to every hole in the *raw*,
   full-resolution image (:mod:`ccdgrid.centres`), robust to hot and dead
   pixels; soft (Gaussian-like) holes are fitted again in windows wide
   enough for their tails;
7. duplicates, holes cut by the image border (a hole whose disc and one
   blur width lie inside is kept: its window is clipped by the border),
   the taper edge or masked pixels, hot pixels and other non-holes are
   rejected with a reason.

Coordinates are ``(y, x)`` index coordinates: the centre of pixel ``(i, j)``
is at ``(i, j)``.
"""

import contextvars
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from . import centres as _centres
from . import holes as _holes
from ._validation import as_image, check_backend, split_masked
from .bilinear import refine_peaks
from .errors import CcdgridError
from .grid_scale import estimate_grid_scale
from .smoothing import block_mean, disc_kernel, smooth_disc
from .watershed import merge_singletons, segment

__all__ = ["MIN_HOLES", "HoleSearch", "detection_binning", "find_holes"]

MIN_HOLES = 6  # fewer accepted holes than this cannot define a lattice
_MIN_SIDE = 8  # px: two 3 px holes and their background need as much along each axis
# searches redone after leaving out the hot pixels the previous one found
_HOT_ROUNDS = 2
# smallest hole diameter, in binned pixels, that the peak search bins down to
_MIN_BINNED_DIAMETER = 5.0


@dataclass(eq=False)
class HoleSearch:
    """Result of :func:`find_holes`.

    Attributes
    ----------
    peaks : ndarray of shape (N, 2), float64
        Accepted hole centres (y, x), index coordinates, sorted by row then
        column of their pixel.
    amplitude : ndarray of shape (N,), float64
        Fitted height of each hole above its local background (image units).
    width : ndarray of shape (N, 2), float64
        Fitted disc radius and edge blur (Gaussian sigma) of each hole, px.
    background : ndarray of shape (N,), float64
        Fitted local background level under each hole (image units).
    rejected : ndarray of shape (M, 2), float64
        Positions (y, x) of the candidates that were rejected.
    reasons : ndarray of shape (M,), str
        Why: ``"duplicate"``, ``"cut by border"``, ``"masked"``,
        ``"hot pixel"``, ``"not a hole"``, ``"shape"``, ``"too faint"``,
        ``"cut by edge"``, ``"fit failed"`` or ``"saturated"`` (a plateau
        at the image's maximum wider than two holes, at its centroid,
        left out of the search).
    threshold : float
        log10 contrast threshold on the smoothed image (given or automatic).
    hole_diameter : float
        Hole diameter, px: the given value, else twice the median fitted
        radius.
    pitch_px : float
        Grid pitch, px: the given value, else the median nearest-neighbour
        distance of the accepted holes.
    smoothed : ndarray of shape (h // binning, w // binning), float32
        The binned, disc-smoothed image the peaks were searched in: its
        pixel ``(i, j)`` is centred at ``binning * (i, j) + (binning - 1) / 2``
        in the image's index coordinates.
    segmentation : object
        The watershed segmentation of ``smoothed`` (after singleton merging);
        its flat indices refer to ``smoothed``.
    timings : dict of str to float
        Seconds spent per stage.
    log_histogram : ccdgrid.holes.LogHistogram
        Histogram of log10 contrast of all peaks, with the threshold.
    binning : int
        Block size of ``smoothed`` (:func:`detection_binning` of the hole
        diameter): 1 means full resolution.
    defects : ndarray of shape (h, w), bool, or None
        The pixels the image itself shows unusable: dead lines (rows or
        columns of one value, a module gap's -1 or 0) and non-finite values;
        None when there are none. Not the given mask.
    """

    peaks: np.ndarray
    amplitude: np.ndarray
    width: np.ndarray
    background: np.ndarray
    rejected: np.ndarray
    reasons: np.ndarray
    threshold: float
    hole_diameter: float
    pitch_px: float
    smoothed: np.ndarray = field(repr=False)
    segmentation: object = field(repr=False)
    timings: dict
    log_histogram: _holes.LogHistogram = field(repr=False)
    binning: int = 1
    defects: object = field(default=None, repr=False)

    def __repr__(self):
        return (
            f"HoleSearch({len(self.peaks)} holes, {len(self.rejected)} rejected, "
            f"diameter={self.hole_diameter:.2f} px, pitch={self.pitch_px:.2f} px, "
            f"threshold={self.threshold:.3f})"
        )


def _positive_or_none(name, value):
    if value is None:
        return None
    try:
        val = float(value)
    except (TypeError, ValueError):
        raise CcdgridError(f"`{name}` must be a number, got {value!r}") from None
    if not np.isfinite(val) or val <= 0:
        raise CcdgridError(f"`{name}` must be a positive number of pixels, got {value!r}")
    return val


def _as_mask(mask, shape):
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise CcdgridError(f"`mask` (shape {arr.shape}) must have the shape of `image` {shape}")
    if arr.dtype.kind not in "biuf":
        raise CcdgridError(f"`mask` must hold numbers or booleans, got dtype {arr.dtype}")
    invalid = arr != 0  # NaN != 0: a NaN in a float mask masks its pixel
    n_valid = invalid.size - np.count_nonzero(invalid)
    if 0 < n_valid < _MIN_VALID_FRACTION * invalid.size:
        # no grid can be found in what is left; most likely the mask says
        # 1 for the pixels to use
        raise CcdgridError(
            f"`mask` leaves {n_valid} of {invalid.size} pixels valid "
            f"({100.0 * n_valid / invalid.size:.2f} %): nonzero marks a pixel to ignore "
            "(pyFAI's convention); is it inverted?"
        )
    return invalid


_MIN_VALID_FRACTION = 0.01  # of the pixels a mask must leave valid


_DEAD_CHUNK = 512  # pixels of a line compared at a time


def _dead_lines(img, fraction=0.9):
    """Mask of rows and columns that hold one value almost everywhere (dead lines).

    A dead row crossing a fitting window would otherwise look like a dark
    edge; masking it lets the fit use the rest of the window. A row is dead
    when at least ``fraction`` of its pixels equal its first one, a column
    when as many equal its pixel in the first row, unless that value is the
    image's median (of a strided sample of ~250 000 pixels): on a
    photon-counting or dark-subtracted image most lines between the holes
    hold zeros, which is background, not a dead line. Returns None when
    there is none, and when every row or every column is dead (an image of
    lines).

    Notes
    -----
    The lines are compared by chunks of ``_DEAD_CHUNK`` pixels, and a line
    is dropped as soon as more of its pixels differ than a dead line allows:
    a noisy line after its first chunk. Reading about an eighth of the image
    for the rows and an eighth for the columns, it costs ~2.5 ms at 4096²
    where a scan of every pixel cost ~18 ms.
    """
    h, w = img.shape
    rows = np.zeros(h, dtype=bool)
    cols = np.zeros(w, dtype=bool)
    dead_rows = _dead(img, 0, fraction)
    dead_cols = _dead(img, 1, fraction)
    if dead_rows.size == dead_cols.size == 0 or dead_rows.size == h or dead_cols.size == w:
        return None  # none, or an image of lines
    # a strided sample: the median of every pixel costs ~100 ms at 4096²
    step = max(1, int(np.sqrt(img.size / 250_000)))
    background = np.median(img[::step, ::step])
    rows[dead_rows[img[dead_rows, 0] != background]] = True
    cols[dead_cols[img[0, dead_cols] != background]] = True
    if not (rows.any() or cols.any()):
        return None
    return rows[:, None] | cols[None, :]


def _dead(img, axis, fraction):
    """Indices of the dead rows (``axis`` 0) or columns (1) of ``img``."""
    n = img.shape[1 - axis]
    need = fraction * n  # pixels equal to the reference a dead line has
    lines = np.arange(img.shape[axis])
    ref = img[:, 0] if axis == 0 else img[0]
    unlike = np.zeros(lines.size, dtype=np.int64)
    for start in range(0, n, _DEAD_CHUNK):
        stop = min(start + _DEAD_CHUNK, n)
        if axis == 0:
            block = img[:, start:stop] if start == 0 else img[lines, start:stop]
            unlike += np.count_nonzero(block != ref[:, None], axis=1)
        else:
            block = img[start:stop] if start == 0 else img[start:stop][:, lines]
            unlike += np.count_nonzero(block != ref, axis=0)
        keep = n - unlike >= need  # the most equal pixels the line can still reach
        lines, ref, unlike = lines[keep], ref[keep], unlike[keep]
        if lines.size == 0:
            break
    return lines


def detection_binning(diameter):
    """Block size of the image the peaks are searched in, for a hole ``diameter`` px wide.

    The segmentation only has to give one region per hole; a hole that
    still spans five pixels after binning does (the disc kernel stays at
    least 5x5, so the smoothed hole keeps a single, central maximum). The
    centres are measured on the full-resolution image afterwards.

    Parameters
    ----------
    diameter : float
        Hole diameter, px.

    Returns
    -------
    int
        Binning factor, >= 1.
    """
    return max(1, int(float(diameter) // _MIN_BINNED_DIAMETER))


class _BinnedCopies:
    """Binned copies of one image, each made once (the scale guess and the search share them).

    An even factor is binned from the 2x2 copy, a quarter of the image: the
    scale guess's 4x4 copy of a 4096² image then costs little more than the
    2x2 one the search needs.
    """

    def __init__(self, image):
        self.image = image
        self.copies = {1: image}

    def __call__(self, factor):
        if factor not in self.copies:
            if factor % 2 == 0 and factor > 2:
                self.copies[factor] = block_mean(self(2), factor // 2)
            else:
                self.copies[factor] = block_mean(self.image, factor)
        return self.copies[factor]


def _segment(smoothed, backend):
    """Watershed regions of ``smoothed``: (segmentation, peak flat indices, sizes)."""
    seg = merge_singletons(segment(smoothed, backend=backend), smoothed, backend=backend)
    return seg, np.asarray(seg.peak, dtype=np.int64), np.asarray(seg.size, dtype=np.int64)


class TooManyCandidates(CcdgridError):
    """A search told to give up (:data:`GIVE_UP_ABOVE`) found far more peaks than holes fit."""


# When set (a number), a search whose candidates above the threshold exceed
# that many times the holes the image can hold (1.5 area / pitch²) raises
# TooManyCandidates before its fits; a search that finds hot pixels is
# judged once they are left out (3 000 of them on a 2048² plate of bright
# holes outnumbered ten times its holes).
# Set by ccdgrid.calibrate's polarity="auto" around its first attempts, and
# by calibrate_combined's quick look at its first image; a context variable,
# so that threads calibrating at once do not see each other's.
GIVE_UP_ABOVE = contextvars.ContextVar("GIVE_UP_ABOVE", default=None)


def find_holes(
    image,
    *,
    mask=None,
    hole_diameter=None,
    pitch_px=None,
    threshold=None,
    backend="cython",
):
    """Find the centres of the holes of a grid image.

    Parameters
    ----------
    image : array_like of shape (h, w), real
        The grid image (holes bright on a darker background).
    mask : array_like of shape (h, w), bool, int or float, optional
        Nonzero (or NaN) for invalid pixels (dead, saturated, gaps); the mask
        of a numpy masked array ``image`` is added to it. They never enter
        a centre; a hole with more than 10 % of its disc masked is rejected.
    hole_diameter : float, optional
        Hole diameter, px (> 0). Estimated from the image when None.
    pitch_px : float, optional
        Grid pitch, px (> 0). Estimated from the image when None.
    threshold : float, optional
        log10 of the minimal contrast of a peak of the smoothed image over
        its surroundings (image units). Chosen automatically when None.
    backend : {"cython", "numpy"}
        Engine of the watershed and refinement kernels.

    Returns
    -------
    HoleSearch
        Accepted centres (y, x) in index coordinates (the centre of pixel
        ``(i, j)`` is at ``(i, j)``), their fitted amplitude and width, the
        rejected candidates with reasons, and what was used to find them.

    Raises
    ------
    CcdgridError
        For invalid arguments, an image without a grid of holes (constant,
        pure noise) or fewer than :data:`MIN_HOLES` holes.

    Notes
    -----
    The centre of each hole is the centre of a blurred disc on a local
    background plane fitted by weighted least squares to the raw pixels of a
    window around it (after a first pass on a 3x3 median-filtered copy that
    removes hot pixels). Hot pixels and streaks one pixel wide that outshine
    the holes' smoothed contrast threefold are left out of the image before
    the search is redone (they do not count towards a hole's masked share),
    and reported as rejected ``"hot pixel"`` candidates, one per 8-connected
    cluster at the mean position of its pixels. On noise-limited images the
    centre error is about half that of the seed tutorial's bilinear
    refinement of the smoothed image; a fibre-bundle gain pattern biases
    every intensity-based estimator alike.
    """
    backend = check_backend(backend)
    image, mask = split_masked(image, mask)
    img = as_image(image)
    if min(img.shape) < _MIN_SIDE:
        raise CcdgridError(
            f"`image` of shape {img.shape} is too small to hold a grid of holes "
            f"(at least {_MIN_SIDE} px in each direction)"
        )
    hole_diameter = _positive_or_none("hole_diameter", hole_diameter)
    pitch_px = _positive_or_none("pitch_px", pitch_px)
    if threshold is not None:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise CcdgridError(f"`threshold` must be a number, got {threshold!r}") from None
        if not np.isfinite(threshold):
            raise CcdgridError(f"`threshold` must be finite, got {threshold!r}")
    user = _as_mask(mask, img.shape)
    defects = image_defects(img, np.asarray(image).dtype)
    if user is None or defects is None:
        invalid = defects if user is None else user
    else:
        invalid = user | defects
    valid = None if invalid is None else ~invalid
    if valid is not None:
        if not valid.any():
            if user is not None and user.all():
                raise CcdgridError(
                    "`mask` marks every pixel of `image` as invalid (nonzero marks a pixel "
                    "to ignore, pyFAI's convention): is it inverted?"
                )
            raise CcdgridError(
                "`image` has no usable pixel: every pixel is NaN, infinite, on a dead line"
                " or masked"
            )
        img = np.where(valid, img, np.float32(np.median(img[valid])))

    timings = {}
    t0 = time.perf_counter()
    # A plateau at the image's maximum wider than a hole is a saturated spot,
    # not a hole: its autocorrelation can make the scale guess (four 82 px
    # discs on a 65 px pitch: a 665 px guess), and its many flat-topped
    # peaks outnumber the holes' high tail, so the threshold went between
    # them (one 120 px disc at 65535 left 12 of 1142 holes). Such plateaus
    # are left out of the search (holes under them are "masked"), but not
    # out of the detector file: the pixels work. Those that stand out from
    # the other plateaus go before the scale is guessed, those wider than
    # two of the holes it guesses after.
    plateaus = _max_plateaus(img, valid)
    saturated = None
    if plateaus is not None:
        saturated = _saturated_plateaus(img, valid, hole_diameter, plateaus)
    if saturated is not None:
        img, valid = _left_out(img, valid, saturated)
        plateaus = _max_plateaus(img, valid)  # those left, of the image as it is now
    binned = _BinnedCopies(img)
    if hole_diameter is None or pitch_px is None:
        scale = estimate_grid_scale(img, pitch=pitch_px, diameter=hole_diameter, binned=binned)
        diameter0, pitch0 = scale.diameter, scale.pitch
    else:
        diameter0, pitch0 = hole_diameter, pitch_px
    if hole_diameter is None and plateaus is not None:
        wide = _saturated_plateaus(img, valid, diameter0, plateaus)
        if wide is not None:
            img, valid = _left_out(img, valid, wide)
            saturated = wide if saturated is None else saturated | wide
            binned = _BinnedCopies(img)
            if pitch_px is None:
                # the first guess saw the plateaus: guess again without them
                scale = estimate_grid_scale(img, pitch=None, diameter=None, binned=binned)
                diameter0, pitch0 = scale.diameter, scale.pitch
    timings["scale"] = time.perf_counter() - t0

    # Hot pixels far brighter than the holes make plateaus in the smoothed
    # image that outshine them: their contrasts set the threshold (above every
    # hole at 60 counts a hole and 500 saturated hot pixels) and a hole beside
    # one takes its plateau's contrast and is thrown out with it. A search
    # that finds such pixels stops before the fits; they are left out of the
    # image and the search is redone.
    hot = np.zeros(0, dtype=np.int64)
    # a hole is judged "masked" by the pixels the caller (or the image) made
    # invalid, not by the hot pixels left out here: those are thin (a streak
    # through a hole's disc takes 10-15 % of it) and the fits skip them
    given = valid
    passes = [diameter0]
    first_result = None  # the first search, when a second one redoes it
    while passes:
        diameter = passes.pop()
        for rounds_left in range(_HOT_ROUNDS, -1, -1):
            result = _search(
                img, binned, valid, diameter, pitch0, threshold, backend, timings,
                stop_on_hot=rounds_left > 0, given_valid=given, hot_left_out=hot.size > 0,
            )  # fmt: skip
            if result is None or result[0] is not None:
                break
            img, valid = _without_pixels(img, valid, result[2])
            hot = np.concatenate([hot, result[2]])
            binned = _BinnedCopies(img)
        # the first guess sized the smoothing disc; redo with the size the
        # fits measured (``_search``'s second value: the fitted disc, or half
        # the profile's width for soft holes) when it was far off, so the
        # smoothed peaks are single and centred. A smaller disc shows hot
        # pixels the first one smoothed away: that search leaves them out
        # too (100 hot pixels among broad holes 59 -> 21 px made the bright
        # mode, and the threshold went above every hole)
        first = diameter == diameter0 and hole_diameter is None and result is not None
        if first and abs(result[1] / diameter0 - 1.0) > 0.3:
            passes.append(result[1])
            # kept when the measured size is the smaller one (a disc smaller
            # than the first guess can lose holes to what the guess smoothed
            # away; a larger one only merges a hole's split peaks)
            if result[1] < diameter0:
                first_result, first_hot = result, hot.copy()
        elif first_result is not None and (
            result is None or len(result[0].peaks) < 0.5 * len(first_result[0].peaks)
        ):
            # the smaller disc lost most of the holes (cosmic-ray streaks
            # thicker than a hot pixel outshone 140 broad holes at the
            # fitted 30 px, where the first guess, 68 px, smoothed them away):
            # the first search stands, with the hot pixels it left out
            result, hot = first_result, first_hot
    if result is None:
        raise CcdgridError(
            "no grid of holes found in `image`: no peak stands out of the background"
        )
    search = result[0]
    if hot.size:
        _report_hot_pixels(search, hot, img.shape)
    if saturated is not None:
        _report_saturated(search, saturated)
    if pitch_px is not None:
        search.pitch_px = pitch_px
    if hole_diameter is not None:
        search.hole_diameter = hole_diameter
    n = len(search.peaks)
    if n < MIN_HOLES:
        raise CcdgridError(
            f"too few holes found in `image`: {n} (at least {MIN_HOLES} are needed); "
            f"rejected candidates: {_summary(search.reasons)}"
        )
    search.timings = timings
    search.defects = defects
    return search


def image_defects(img, dtype=None):
    """Pixels an image itself shows unusable, (h, w) bool, or None when there are none.

    Dead lines (:func:`_dead_lines`: rows or columns of one value, as a
    detector's module gaps hold -1 or 0) and, for a floating-point ``dtype``
    (the image's own, before any cast; None: ``img``'s), non-finite values.
    Both are left out of the hole search and masked in the detector file: a
    frame integrated with it would hold the same values there.
    """
    defects = _dead_lines(img)
    # integer images (the usual detector output) hold no NaN: skip the scan
    if np.issubdtype(img.dtype if dtype is None else dtype, np.floating):
        finite = np.isfinite(img)
        if not finite.all():
            defects = ~finite if defects is None else defects | ~finite
    return defects


def _summary(reasons):
    if len(reasons) == 0:
        return "none"
    names, counts = np.unique(reasons, return_counts=True)
    return ", ".join(f"{c} {n}" for n, c in zip(names, counts, strict=True))


def _give_up_above(limit, candidates, capacity, pitch):
    """Raise TooManyCandidates past ``limit`` times the holes the image can hold.

    See :data:`GIVE_UP_ABOVE` (``limit`` None: never).
    """
    if limit is not None and candidates > limit * 1.5 * capacity:
        raise TooManyCandidates(
            f"{candidates} candidate peaks for at most {1.5 * capacity:.0f} holes of a "
            f"{pitch:.1f} px pitch"
        )


def _search(
    img, binned, valid, diameter, pitch, threshold, backend, timings, stop_on_hot=False,
    given_valid=None, hot_left_out=False,
):  # fmt: skip
    """One pass of the search for a given hole diameter.

    ``valid`` (None: all) holds the pixels the fits may use; ``given_valid``
    those the caller and the image left valid, before hot pixels were left
    out: a hole with more than 10 % of its disc invalid in it is "masked".

    Returns (HoleSearch, diameter for a smoothing disc (px: the fitted
    discs', at least half the profiles' full width at half maximum), flat
    indices of the isolated hot pixels seen), or None if no peak stands out
    at all. With ``stop_on_hot``,
    a pass that sees hot pixels returns (None, None, hot pixels) before the
    fits. ``hot_left_out``: an earlier pass left hot pixels out of ``img``;
    with :data:`GIVE_UP_ABOVE` set, its candidates are then judged before
    hot pixels are looked for again (else once none is found).
    """
    h, w = img.shape
    t = time.perf_counter()
    # peaks are searched in a binned image (4x fewer pixels at the usual
    # hole sizes); positions go back to full resolution as block centres
    factor = detection_binning(diameter)
    small_d = diameter / factor
    smoothed = smooth_disc(binned(factor), small_d)
    timings["smooth"] = time.perf_counter() - t

    t = time.perf_counter()
    seg, peak_flat, size = _segment(smoothed, backend)
    timings["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    kernel_area = float(disc_kernel(small_d).astype(bool).sum())
    # regions much smaller than the smoothing disc are noise, never a hole
    big = size >= 0.25 * kernel_area
    peak_flat = peak_flat[big]
    peaks_small = np.stack(np.divmod(peak_flat, smoothed.shape[1]), axis=1).astype(np.int64)
    ring_r = min(diameter + 2.0, 0.45 * pitch) / factor
    bg, _, _ = _holes.ring_background(smoothed, peaks_small, ring_r)
    contrast = smoothed.ravel()[peak_flat].astype(np.float64) - bg
    positive = contrast > 0
    if positive.sum() == 0:
        return None
    logc = np.log10(contrast[positive])
    # 2 % of the holes the image would hold if the plate lit all of it; with
    # no more candidates than it can hold (a hexagonal lattice, the holes
    # the border cuts, a guessed pitch a few % long: 1.5 times its area over
    # the pitch squared), none is noise
    capacity = h * w / pitch**2
    thr_auto, hist = _holes.auto_threshold(
        logc, min_bright=0.02 * capacity, max_holes=1.5 * capacity
    )
    thr = thr_auto if threshold is None else threshold
    hist.threshold = thr
    keep = np.flatnonzero(positive)[logc >= thr]
    if hot_left_out:
        # the noise of a plate of the other polarity stays when hot pixels go
        # (a plate's own hot pixels do not): judged before the costly fits
        _give_up_above(GIVE_UP_ABOVE.get(), keep.size, capacity, pitch)
    peaks_small, contrast, bg = peaks_small[keep], contrast[keep], bg[keep]
    # the full-resolution pixel nearest to the centre of each peak's block
    peaks_int = peaks_small * factor + factor // 2
    timings["classify"] = time.perf_counter() - t

    t = time.perf_counter()
    radius = 0.5 * diameter
    reasons = np.full(len(peaks_int), "", dtype=object)
    # a hole is bright in the raw image at its smoothed peak; the plateau a
    # hot pixel leaves in the smoothed image is not (3x3 median kills it)
    raw_level = _median3_at(img, peaks_int) - bg
    flat = raw_level < 0.3 * contrast
    reach = int(np.ceil(radius)) + factor
    # a pixel that outshines the smoothed contrast threefold made (or swelled)
    # the peak: a hot pixel, or a hole beside one
    spiky = _box_max_at(img, peaks_int, reach) - bg > 3.0 * contrast
    reasons[flat] = np.where(spiky[flat], "hot pixel", "not a hole")
    # a hole the image's border cuts leaves its smoothed peak off its lit
    # part: flat at the peak, it is a hole cut by the border, not "no hole"
    room = np.minimum.reduce(
        [peaks_int[:, 0], h - 1 - peaks_int[:, 0], peaks_int[:, 1], w - 1 - peaks_int[:, 1]]
    )
    reasons[flat & ~spiky & (room < radius)] = "cut by border"
    hot = _isolated_spikes(img, peaks_int[spiky], reach, bg[spiky], contrast[spiky])
    if stop_on_hot and hot.size:
        return None, None, hot
    if not hot_left_out:
        # hot pixels are candidates too: a search that finds some is judged
        # once they are left out (above), else here
        _give_up_above(GIVE_UP_ABOVE.get(), keep.size, capacity, pitch)
    if valid is not None:
        reasons[flat & (_median3_at(valid.view(np.uint8), peaks_int) < 1)] = "masked"
    # one report per defect: a hot pixel's plateau holds many peaks
    at = _full_resolution(peaks_small.astype(np.float64), factor)
    _mark_duplicates(at, np.flatnonzero(flat), contrast, diameter, reasons)
    silent = reasons == "duplicate"
    half = int(np.ceil(max(1.7 * radius + 2.0, radius + 5.0)))
    half = int(max(min(half, np.floor(0.45 * pitch)), np.ceil(radius + 3.0)))
    # the guessed diameter runs ~15 % large: the disc a hole's masked share is
    # counted in
    half_min = int(np.ceil(0.85 * radius + 2.5))
    # no de-duplication before the fit: a peak on a hot pixel's plateau or cut
    # by the border must not suppress the measurable peak of the hole beside
    # it; seeds that converge on one hole are merged after the fit
    seeds = at.copy()
    todo = np.flatnonzero(reasons == "")
    refined = refine_peaks(smoothed, peaks_small[todo].astype(np.float64), backend=backend)
    seeds[todo] = _full_resolution(refined, factor)
    timings["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    cy = np.rint(seeds[:, 0]).astype(np.int64)
    cx = np.rint(seeds[:, 1]).astype(np.int64)
    room = np.minimum.reduce([cy, h - 1 - cy, cx, w - 1 - cx])
    # Every window has the same size; near the border the image clips it (see
    # centres.fit_hole_profiles), and classify_fits judges the fitted disc
    # against the border. A seed closer to the border than most of the hole's
    # radius belongs to a hole cut through its disc (the guessed radius runs
    # ~15 % large, and ~30 % for saturated holes: at 0.85 R, whole holes of a
    # saturated image 12.5 px from the border, R + s = 11.9 px, were lost).
    reasons[(reasons == "") & (room < 0.7 * radius)] = "cut by border"
    fit_idx = np.flatnonzero(reasons == "")
    positions = seeds.copy()
    n_fit = fit_idx.size
    fit = None
    if n_fit:
        fit = _centres.fit_hole_profiles(
            img, seeds[fit_idx], radius, half=half, valid=valid, backend=backend
        )
        # The window was sized from the diameter alone. Soft holes (Gaussian
        # profiles: a small fitted radius, a wide blur) reach further: with
        # their tails cut by the window, the background plane absorbs them
        # and the centres scatter several times more. Fit again in windows
        # that hold the profile and a ring of background.
        reach = _profile_reach(fit)
        wider = min(reach, int(np.floor(0.45 * pitch)))
        if wider > half:
            half = wider
            fit_radius = float(np.median(fit.radius[fit.converged]))
            fit = _centres.fit_hole_profiles(
                img, seeds[fit_idx], fit_radius, half=half, valid=valid, backend=backend
            )
        positions[fit_idx] = fit.centres
        fit_reasons = _holes.classify_fits(
            fit, contrast[fit_idx], image_shape=img.shape, window=half
        )
        if given_valid is not None:
            heavy = _masked_fraction_high(given_valid, fit, half_min)
            fit_reasons[(fit_reasons == "") & heavy] = "masked"
        reasons[fit_idx] = fit_reasons
    timings["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    accepted = np.flatnonzero(reasons == "")
    # two seeds may converge on one hole: keep the better fit
    score = np.zeros(len(positions))
    if n_fit:
        score[fit_idx] = -fit.chi2
    _mark_duplicates(positions, accepted, score, radius, reasons)
    accepted = np.flatnonzero(reasons == "")
    keep_rej = ~silent & (reasons != "")
    # fitted values for accepted ones (all of them went through the fit)
    where = np.searchsorted(fit_idx, accepted) if n_fit else np.zeros(0, np.int64)
    order = np.lexsort((positions[accepted, 1], np.rint(positions[accepted, 0])))
    accepted, where = accepted[order], where[order]
    rej = np.flatnonzero(keep_rej)
    sized_d = diameter
    if accepted.size and fit is not None:
        fitted_d = 2.0 * float(np.median(fit.radius[where]))
        # a smoothing disc must not be much narrower than the profile:
        # Lorentzian-like holes fit a 3 px disc under a 9 px blur, and a 3 px
        # disc smoothed the noise of a 64 px pitch plate into 17 000 peaks.
        # At least half the profile's full width at half maximum (within
        # ~15 %), not all of it: fitted in windows sized from a guess far
        # too small, hard discs of 30 px came out blurred by 15 px
        fwhm = np.hypot(2.0 * fit.radius[where], 2.355 * fit.blur[where])
        sized_d = max(fitted_d, 0.5 * float(np.median(fwhm)))
        amplitude = fit.amplitude[where]
        width = np.stack([fit.radius[where], fit.blur[where]], axis=1)
        background = fit.background[where]
    else:
        fitted_d = diameter
        amplitude = np.zeros(0)
        width = np.zeros((0, 2))
        background = np.zeros(0)
    pts = positions[accepted]
    if pts.shape[0] >= 2:
        dist, _ = cKDTree(pts).query(pts, k=2)
        pitch_est = float(np.median(dist[:, 1]))
    else:
        pitch_est = pitch
    timings["clean"] = time.perf_counter() - t
    search = HoleSearch(
        peaks=pts,
        amplitude=amplitude,
        width=width,
        background=background,
        rejected=positions[rej],
        reasons=reasons[rej].astype(str),
        threshold=thr,
        hole_diameter=fitted_d,
        pitch_px=pitch_est,
        smoothed=smoothed,
        segmentation=seg,
        timings=timings,
        log_histogram=hist,
        binning=factor,
    )
    return search, sized_d, hot


def _full_resolution(points, factor):
    """Index coordinates in the image of points given in its ``factor``-binned copy."""
    return points * factor + 0.5 * (factor - 1)


def _median3_at(image, points):
    """3x3 median of ``image`` around integer points (clamped at the border)."""
    h, w = image.shape
    offs = np.array([-1, 0, 1])
    rows = np.clip(points[:, 0, None, None] + offs[None, :, None], 0, h - 1)
    cols = np.clip(points[:, 1, None, None] + offs[None, None, :], 0, w - 1)
    return np.median(image[rows, cols].reshape(len(points), 9), axis=1).astype(np.float64)


def _box_max_at(image, points, half):
    """Maximum of ``image`` in a square of half width ``half`` around integer points."""
    h, w = image.shape
    offs = np.arange(-half, half + 1)
    rows = np.clip(points[:, 0, None, None] + offs[None, :, None], 0, h - 1)
    cols = np.clip(points[:, 1, None, None] + offs[None, None, :], 0, w - 1)
    if len(points) == 0:
        return np.zeros(0)
    return image[rows, cols].reshape(len(points), -1).max(axis=1).astype(np.float64)


# pixels of the search boxes of _isolated_spikes held at once (~16 MB of each array)
_SPIKE_BOX_BUDGET = 2_000_000


def _isolated_spikes(image, points, half, level, contrast):
    """Flat indices of the hot pixels behind the plateaus of hot-pixel peaks.

    Parameters
    ----------
    image : ndarray of shape (h, w), float32
    points : ndarray of shape (K, 2), int64
        Full-resolution pixels (row, col) of peaks whose smoothed contrast
        a spike made or swelled.
    half : int
        Half width of the square searched around each point, px (the
        smoothing disc's reach).
    level, contrast : ndarray of shape (K,), float64
        Local background and smoothed contrast of each peak (image units).

    Returns
    -------
    ndarray of shape (M,), int64
        Sorted flat indices of pixels that stand above their surroundings by
        more than three times the peak's contrast and that either have a 3x3
        median within a quarter of their height of the background (single
        hot pixels and clusters of up to four) or stand as high above their
        thin ceiling (:func:`_thin_ceiling_at`: lines one pixel wide, such
        as cosmic-ray streaks, whose steps put five of their pixels in a
        3x3 square). Never a hole's pixels: a hole's 3x3 median follows its
        profile, every pixel of it has a neighbour as bright on some side of
        every axis, and its pixels are no brighter than its smoothed
        contrast allows.
    """
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    h, w = image.shape
    offs = np.arange(-half, half + 1)
    # by chunks of points, each pixel kept once with the first peak that
    # reached it (in the order of ``points``): the boxes of 72 000 peaks of a
    # noisy image searched in the wrong polarity took over 1 GB at once
    chunk = max(1, _SPIKE_BOX_BUDGET // offs.size**2)
    seen = np.zeros(h * w, dtype=bool)
    found, owner = [], []
    for start in range(0, len(points), chunk):
        pts = points[start : start + chunk]
        rows = np.clip(pts[:, 0, None] + offs[None, :], 0, h - 1)
        cols = np.clip(pts[:, 1, None] + offs[None, :], 0, w - 1)
        box = image[rows[:, :, None], cols[:, None, :]]
        excess = box - level[start : start + chunk, None, None]
        k, i, j = np.nonzero(excess > 3.0 * contrast[start : start + chunk, None, None])
        flat, first = np.unique(rows[k, i] * w + cols[k, j], return_index=True)
        new = ~seen[flat]
        seen[flat[new]] = True
        found.append(flat[new])
        owner.append(k[first[new]] + start)
    flat = np.concatenate(found)
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(flat)
    flat, k = flat[order], np.concatenate(owner)[order]
    at = np.stack(np.divmod(flat, w), axis=1)
    height = image.ravel()[flat].astype(np.float64) - level[k]
    above = np.minimum(_median3_at(image, at), _thin_ceiling_at(image, at)) - level[k]
    return flat[above < 0.25 * height]


def _thin_ceiling_at(image, points):
    """:func:`ccdgrid.grid_scale._thin_ceiling` of ``image`` at integer points only.

    Parameters
    ----------
    image : ndarray of shape (h, w), float32
    points : ndarray of shape (K, 2), int64
        Pixels (row, col) inside the image.

    Returns
    -------
    ndarray of shape (K,), float64
        Per point, the least over the column, the row and the two diagonals
        of the brighter of its two neighbours on that axis (the image
        mirrored at its border, without repeating the edge pixel).
    """
    h, w = image.shape

    def mirrored(idx, n):
        if n == 1:
            return np.zeros_like(idx)
        idx = np.abs(idx)
        return np.where(idx > n - 1, 2 * (n - 1) - idx, idx)

    y, x = points[:, 0], points[:, 1]
    ceiling = None
    for dy, dx in ((1, 0), (0, 1), (1, 1), (1, -1)):
        a = image[mirrored(y - dy, h), mirrored(x - dx, w)]
        b = image[mirrored(y + dy, h), mirrored(x + dx, w)]
        pair = np.maximum(a, b)
        ceiling = pair if ceiling is None else np.minimum(ceiling, pair)
    return ceiling.astype(np.float64)


def _without_pixels(image, valid, flat):
    """Copies of ``image`` and ``valid`` with the pixels ``flat`` made invalid.

    Their values become the 3x3 median around them, so that the smoothing
    no longer sees them (the fits skip them as invalid). Where five or more
    pixels of that 3x3 square are left out (along a cosmic-ray streak with
    steps), the median is the streak's own level: their thin ceiling
    (:func:`_thin_ceiling_at`), the brighter neighbour across the streak,
    is used instead. The caller's image is never modified.
    """
    h, w = image.shape
    flat = np.unique(flat)
    at = np.stack(np.divmod(flat, w), axis=1)
    fill = _median3_at(image, at)
    offs = np.array([-1, 0, 1])
    rows = at[:, 0, None, None] + offs[None, :, None]
    cols = at[:, 1, None, None] + offs[None, None, :]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    near = np.where(inside, rows * w + cols, -1).reshape(len(flat), 9)
    pos = np.minimum(np.searchsorted(flat, near), flat.size - 1)
    crowded = np.count_nonzero(flat[pos] == near, axis=1) >= 5
    if crowded.any():
        fill[crowded] = _thin_ceiling_at(image, at[crowded])
    image = image.copy()
    image.ravel()[flat] = fill
    valid = np.ones((h, w), dtype=bool) if valid is None else valid.copy()
    valid.ravel()[flat] = False
    return image, valid


# The least area of a saturated spot found before the holes' size is known,
# px: a disc 16 px across
_MIN_SPOT = 200


def _max_plateaus(img, valid):
    """``(labels, areas)`` of the plateaus at the image's saturation level, or None.

    A plateau is a 4-connected set of pixels at one level; labels as
    :func:`scipy.ndimage.label` gives them, ``areas[k]`` the pixels of
    plateau ``k`` (``areas[0]`` the rest). The level is the maximum of the
    valid pixels, unless a level below it (see :func:`_pile_up_levels`)
    holds a plateau of at least :data:`_MIN_SPOT` pixels and the maximum
    none: hot pixels added above a float image's saturation (clipped discs
    at 65535, hot pixels at 85 000) hid the saturated spots, which then
    made the threshold (5 of 170 holes found). None when fewer than 9 pixels
    are at the maximum (noise leaves it to a pixel or two) and no level
    below holds a plateau that wide.
    """
    # invalid pixels hold the valid ones' median here: below their maximum
    top = img.max()
    found = _plateaus_at(img, valid, top)
    if found is not None and found[1][1:].max() >= _MIN_SPOT:
        return found
    for level in _pile_up_levels(img, valid, top):
        # a spot of _MIN_SPOT px (16 px across) keeps about a quarter of its
        # pixels in every 4th row; asking for half of that there, a pass over
        # a quarter of the image rules out the false levels that the sparse
        # tail of integer data makes
        if np.count_nonzero(img[::4] == level) < _MIN_SPOT / 8:
            continue
        below = _plateaus_at(img, valid, level, least=_MIN_SPOT)
        if below is not None and below[1][1:].max() >= _MIN_SPOT:
            return below
    return found


def _plateaus_at(img, valid, level, least=9):
    """``(labels, areas)`` of the 4-connected plateaus at ``level``, or None under ``least`` px."""
    at = img == level
    if valid is not None:
        at &= valid
    # counting first spares labelling the whole image for a level too sparse
    if np.count_nonzero(at) < least:
        return None
    labels, n = ndimage.label(at)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


# Pixels of the sample _pile_up_levels looks at the brightest 2 % of, at most
_LEVEL_SAMPLE = 1 << 18


def _pile_up_levels(img, valid, top, most=3):
    """Levels under ``top`` where the brightest valid pixels pile up, highest first.

    Clipping piles pixels up at one value: in a sample of the image (every
    pixel up to 2**18 of them, else every s-th row and column) a level
    among the brightest 2 % is a pile-up when it holds four times as many
    samples as the next level down, and at least 3 and as many as a spot
    of half of :data:`_MIN_SPOT` pixels leaves in the sample (noise
    spreads the brightest values over one sample each in a float image,
    over smoothly falling counts in an integer one, whose sparse tail may
    still hold a level 4 samples strong after one of 1). At most ``most``
    levels.
    """
    stride = max(1, int(np.sqrt(img.size / _LEVEL_SAMPLE)))
    # a 2-D stride: a flat one that divides the width samples a few columns
    sample = img[::stride, ::stride].ravel()
    if valid is not None:
        sample = sample[valid[::stride, ::stride].ravel()]
    keep = max(len(sample) // 50, 64)
    if len(sample) <= keep:
        return []
    floor = np.partition(sample, len(sample) - keep)[len(sample) - keep]
    values, counts = np.unique(sample[(sample >= floor) & (sample < top)], return_counts=True)
    if len(values) == 0:
        return []
    under = sample[sample < values[0]]
    first = np.count_nonzero(under == under.max()) if len(under) else 0
    lower = np.concatenate([[first], counts[:-1]])
    least = max(3.0, 0.5 * _MIN_SPOT / stride**2)
    piled = (counts >= least) & (counts >= 4 * lower)
    return list(values[piled][::-1][:most])


def _saturated_plateaus(img, valid, diameter, plateaus=None):
    """Pixels of saturated spots (plateaus at the saturation level) and their rim; or None.

    A plateau is a 4-connected set of pixels at the saturation level of the valid
    pixels. With the hole ``diameter`` (px) known, a plateau is a spot when
    it covers more than twice the area of a hole. Without it, when it
    covers more than 200 px and, among six plateaus or more, four times
    the median plateau: the holes that saturate make many alike (kept),
    spots a few (a plate with fewer than six saturated holes may lose those
    that are wide). Nothing counts when the spots would cover half of the
    valid pixels (a blank image). Each spot is widened by half a diameter
    (8 px without one), which takes the blurred rim a saturated spot has
    on a real detector. ``plateaus``: :func:`_max_plateaus` of ``img`` and
    ``valid`` when the caller has them (None: found here).
    """
    if plateaus is None:
        plateaus = _max_plateaus(img, valid)
        if plateaus is None:
            return None
    labels, area = plateaus
    if diameter is not None:
        wide = area > 2.0 * np.pi * (0.5 * diameter) ** 2
    else:
        plateaus = area[1:][area[1:] >= 9]
        least = _MIN_SPOT if len(plateaus) < 6 else max(_MIN_SPOT, 4.0 * np.median(plateaus))
        wide = area > least
    wide[0] = False
    n_valid = img.size if valid is None else np.count_nonzero(valid)
    if not wide.any() or area[wide].sum() > 0.5 * n_valid:
        # none, or the image is mostly one level (blank): no spot to leave out
        return None
    reach = int(np.ceil(0.5 * diameter)) if diameter is not None else 8
    out = np.zeros(img.shape, dtype=bool)
    h, w = img.shape
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or not wide[k]:
            continue
        rows = slice(max(box[0].start - reach, 0), min(box[0].stop + reach, h))
        cols = slice(max(box[1].start - reach, 0), min(box[1].stop + reach, w))
        # distance to the plateau within its box, widened by the rim
        near = ndimage.distance_transform_edt(labels[rows, cols] != k) <= reach
        out[rows, cols] |= near
    return out


def _left_out(img, valid, pixels):
    """``(img, valid)`` with ``pixels`` invalid and holding the valid pixels' median."""
    valid = ~pixels if valid is None else valid & ~pixels
    return np.where(pixels, np.float32(np.median(img[valid])), img), valid


def _report_saturated(search, saturated):
    """Add each saturated plateau left out of the search to the rejected candidates."""
    labels, n = ndimage.label(saturated)
    at = np.array(ndimage.center_of_mass(saturated, labels, np.arange(1, n + 1)))
    search.rejected = np.concatenate([search.rejected, at.reshape(-1, 2)])
    search.reasons = np.concatenate([search.reasons, np.full(n, "saturated")])


def _report_hot_pixels(search, flat, shape):
    """Add the hot pixels left out of the image to the rejected candidates, one per cluster.

    A cluster is a set of 8-connected pixels (a cosmic-ray streak is one),
    reported at the mean position of its pixels.
    """
    at = np.stack(np.divmod(np.unique(flat), shape[1]), axis=1).astype(np.float64)
    pairs = cKDTree(at).query_pairs(r=1.5, output_type="ndarray")
    graph = coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(len(at),) * 2
    )
    n, label = connected_components(graph, directed=False)
    count = np.bincount(label, minlength=n)
    centre = np.stack([np.bincount(label, weights=c, minlength=n) for c in at.T], axis=1)
    at = centre / count[:, None]
    search.rejected = np.concatenate([search.rejected, at])
    search.reasons = np.concatenate([search.reasons, np.full(len(at), "hot pixel")])


def _masked_fraction_high(valid, fit, half, limit=0.1):
    """True where more than ``limit`` of a hole's disc (r <= R + 1) is invalid."""
    h, w = valid.shape
    centre = np.rint(fit.centres).astype(np.int64)
    offs = np.arange(-half, half + 1)
    rows = centre[:, 0, None] + offs[None, :]
    cols = centre[:, 1, None] + offs[None, :]
    win = valid[np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :]]
    dy = rows[:, :, None] - fit.centres[:, 0, None, None]
    dx = cols[:, None, :] - fit.centres[:, 1, None, None]
    disc = np.hypot(dy, dx) <= fit.radius[:, None, None] + 1.0
    bad = (disc & ~win).sum(axis=(1, 2))
    return bad > limit * np.maximum(disc.sum(axis=(1, 2)), 1)


def _mark_duplicates(positions, accepted, score, radius, reasons):
    """Among ``accepted`` candidates closer than ``radius``, keep the highest score."""
    if accepted.size < 2:
        return
    pairs = cKDTree(positions[accepted]).query_pairs(r=max(radius, 1.0), output_type="ndarray")
    if pairs.size == 0:
        return
    # visit candidates from the brightest down; a candidate loses to any kept partner
    order = accepted[np.argsort(-score[accepted], kind="stable")]
    rank = np.empty(positions.shape[0], dtype=np.int64)
    rank[order] = np.arange(order.size)
    a, b = accepted[pairs[:, 0]], accepted[pairs[:, 1]]
    winner = np.where(rank[a] < rank[b], a, b)
    loser = np.where(rank[a] < rank[b], b, a)
    dropped = np.zeros(positions.shape[0], dtype=bool)
    for k in np.argsort(rank[winner], kind="stable"):  # few pairs: tiny loop
        if not dropped[winner[k]]:
            dropped[loser[k]] = True
    reasons[dropped] = "duplicate"


def _profile_reach(fit):
    """Window radius, px, holding the typical fitted profile and a ring of background.

    ``R + 3 s`` (the blurred edge down to 0.1 %) plus 2 px of background,
    from the median radius and blur of the converged fits; 0 if none.
    """
    ok = fit.converged
    if not ok.any():
        return 0
    return int(np.ceil(np.median(fit.radius[ok]) + 3.0 * np.median(fit.blur[ok]) + 2.0))
