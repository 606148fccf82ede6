"""The seed tutorial's pipeline, kept as the baseline ccdgrid is measured against.

pyFAI's "CCD calibration" tutorial (the seed of ccdgrid) calibrates a detector
from a grid-of-holes image with pyFAI's inverse watershed, its bilinear
peak refinement and a handful of numpy/scipy steps. This module redoes those
steps with pyFAI 2026.9 and numpy/scipy, *on purpose without improving them*:
the same 11x11 disc convolution, the same region and intensity cuts, the same
BFGS fit of the grid with a finite-difference gradient, cubic ``griddata``
sampled at integer index coordinates and stored as pixel corners (a
half-pixel sampling error that ccdgrid does not repeat), nearest-value fill
outside the convex hull of the peaks, and ``Detector.save``.

The only departures from the tutorial's notebook are the ones a script needs:
the intensity threshold, the neighbour-distance window and the origin guess
are parameters instead of numbers read off the tutorial's image by eye, and
every stage is timed.

Conventions: arrays ``[y, x]``; peaks ``(y, x)`` in index coordinates (pixel
centre ``(i, j)`` at ``(i, j)``); the tutorial's grid parameters
``P = (Ox, Oy, Xx, Yx, Xy, Yy)`` are in (x, y) order with
``R = [[Xx, Yx], [Xy, Yy]]`` and ``pixel_xy = R . hole_xy + (Ox, Oy)``.
"""

import os
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import interpolate, ndimage, optimize, signal
from scipy.spatial.distance import cdist

__all__ = [
    "TUTORIAL_THRESHOLD",
    "TutorialResult",
    "disc_kernel",
    "save_detector",
    "tutorial_pipeline",
]

#: The tutorial's intensity cut on region maxima, chosen by eye on its image.
TUTORIAL_THRESHOLD = 10**3.5


@dataclass
class TutorialResult:
    """What the tutorial pipeline produced.

    Attributes
    ----------
    dy, dx : ndarray of shape (ny + 1, nx + 1), float64, px
        Displacement maps as given to ``Detector.set_dy`` / ``set_dx``
        (NaN filled by the nearest valid value). They were evaluated at
        integer index coordinates but pyFAI reads them as corners, i.e. at
        ``(i - 0.5, j - 0.5)``: read them as corner maps to measure what the
        detector file really holds.
    mask : ndarray of shape (ny, nx), int8
        1 where the corner ``(i, j)`` lies outside the convex hull of the
        peaks (the tutorial's mask), 0 elsewhere.
    peaks : ndarray of shape (N, 2), float64, px
        Refined ``(y, x)`` peak positions, index coordinates.
    params : ndarray of shape (6,), float64
        Fitted ``(Ox, Oy, Xx, Yx, Xy, Yy)``, px.
    pixel_size : tuple of 2 float, m
        ``(pixel1, pixel2)`` = (y, x) pixel size from the tutorial's formulas.
    n_regions : int
        Distinct watershed regions after ``merge_singleton``.
    n_four : int
        Peaks with exactly four neighbours.
    detector : pyFAI.detectors.Detector
        The detector with the maps and mask set, ready for :func:`save_detector`.
    timings : dict of str to float, s
        Wall time of every stage, in pipeline order.
    """

    dy: np.ndarray
    dx: np.ndarray
    mask: np.ndarray
    peaks: np.ndarray
    params: np.ndarray
    pixel_size: tuple
    n_regions: int
    n_four: int
    detector: object
    timings: dict = field(default_factory=dict)


def disc_kernel(size=11, radius=5.5):
    """The tutorial's smoothing kernel: a flat disc, normalised to sum 1.

    Parameters
    ----------
    size : int
        Odd kernel width, px.
    radius : float
        Pixels with ``y**2 + x**2 <= radius**2`` (offsets from the centre) are in.

    Returns
    -------
    ndarray of shape (size, size), float64
    """
    half = size // 2
    y, x = np.ogrid[-half : half + 1, -half : half + 1]
    kernel = (y**2 + x**2 <= radius**2).astype(np.float64)
    return kernel / kernel.sum()


def save_detector(detector, path):
    """Write ``detector`` with ``Detector.save``, deleting an existing file first.

    ``Detector.save`` appends a new entry to an existing file and pyFAI then
    loads the oldest one within the same second, hence the delete.

    Parameters
    ----------
    detector : pyFAI.detectors.Detector
    path : str or os.PathLike
    """
    if os.path.exists(path):
        os.remove(path)
    detector.save(os.fspath(path))


class _Clock:
    """Accumulates the wall time of successive named stages."""

    def __init__(self):
        self.timings = {}
        self._last = time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.timings[name] = now - self._last
        self._last = now


def tutorial_pipeline(
    image,
    *,
    pitch=5e-3,
    threshold=TUTORIAL_THRESHOLD,
    min_size=97,
    neighbour_range=(70.0, 110.0),
    origin_guess=None,
    path=None,
):
    """Run the seed tutorial's calibration on one grid image.

    Parameters
    ----------
    image : array_like of shape (ny, nx)
        Grid-of-holes image (bright holes), any real dtype.
    pitch : float, m
        Hole spacing of the grid plate.
    threshold : float
        Keep regions whose maximum of the convolved image is above this value
        (the tutorial uses ``10**3.5``, read by eye from its image).
    min_size : int
        Keep regions with more than this many pixels (97 = kernel area).
    neighbour_range : tuple of 2 float, px
        Two peaks are first neighbours when ``lo < distance < hi``.
    origin_guess : tuple of 2 float or None, px
        ``(x, y)`` near which the grid origin is taken (the tutorial uses
        (734, 1181) on its image); None takes the image centre.
    path : str or os.PathLike or None
        Where to write the pyFAI detector file; None skips the write. An
        existing file is deleted first, because ``Detector.save`` appends.

    Returns
    -------
    TutorialResult

    Raises
    ------
    RuntimeError
        If fewer than 3 peaks have four neighbours (the grid cannot be set up).
    """
    from pyFAI.detectors import Detector
    from pyFAI.ext.watershed import InverseWatershed

    img = np.asarray(image)
    ny, nx = img.shape
    clock = _Clock()

    cnv = signal.convolve2d(img, disc_kernel(), "same")
    clock.lap("convolve")

    iw = InverseWatershed(cnv)
    iw.init()
    clock.lap("watershed_init")
    iw.merge_singleton()
    clock.lap("merge_singleton")

    all_regions = set(iw.regions.values())
    regions = [r for r in all_regions if r.size > min_size]
    peaks = [(r.index // nx, r.index % nx) for r in regions if r.maxi > threshold]
    clock.lap("select")

    peaks_ref = np.array([iw.bilinear.local_maxi(p) for p in peaks], dtype=np.float64)
    peaks_ref = peaks_ref.reshape(-1, 2)
    clock.lap("refine")

    lo, hi = neighbour_range
    dist = cdist(peaks_ref, peaks_ref)
    close = (dist > lo) & (dist < hi)
    four = np.flatnonzero(close.sum(axis=1) == 4)
    if four.size < 3:
        raise RuntimeError(f"only {four.size} peaks have 4 neighbours: threshold or range off?")
    # In (y, x): east = +x, north = +row, as in the tutorial.
    east, north = [], []
    for k in four:
        offsets = peaks_ref[close[k]] - peaks_ref[k]
        east.append(offsets[np.argmax(offsets @ (0.0, 1.0))])
        north.append(offsets[np.argmax(offsets @ (1.0, 0.0))])
    vx = np.mean(east, axis=0)  # (y, x) of the lattice step along x
    vy = np.mean(north, axis=0)  # (y, x) of the lattice step along y
    if origin_guess is None:
        origin_guess = ((nx - 1) / 2, (ny - 1) / 2)
    guess_yx = np.array([origin_guess[1], origin_guess[0]])
    origin = peaks_ref[four[np.argmin(((peaks_ref[four] - guess_yx) ** 2).sum(axis=1))]]
    clock.lap("neighbours")

    peaks_xy = peaks_ref[:, ::-1].copy()

    def to_hole(p, xy):
        rot = np.array([[p[2], p[3]], [p[4], p[5]]])
        return np.linalg.inv(rot).dot((xy - p[:2]).T).T

    def to_pix(p, hole):
        rot = np.array([[p[2], p[3]], [p[4], p[5]]])
        return rot.dot(hole.T).T + p[:2]

    def error(p):
        hole = to_hole(p, peaks_xy)
        return ((hole - np.round(hole)) ** 2).sum()

    p0 = np.array([origin[1], origin[0], vx[1], vy[1], vx[0], vy[0]])
    params = optimize.minimize(error, p0).x
    clock.lap("fit")

    _ox, _oy, xx, yx, xy, yy = params
    py = pitch * np.sqrt((yx**2 - xx**2) / ((xy * yx) ** 2 - (xx * yy) ** 2))
    px = np.sqrt((pitch**2 - (xy * py) ** 2) / xx**2)
    delta = to_pix(params, np.round(to_hole(params, peaks_xy))) - peaks_xy  # (x, y)
    clock.lap("delta")

    grid = np.mgrid[0 : ny + 1, 0 : nx + 1]
    delta_x = interpolate.griddata(peaks_ref, delta[:, 0], tuple(grid), method="cubic")
    delta_y = interpolate.griddata(peaks_ref, delta[:, 1], tuple(grid), method="cubic")
    del grid
    clock.lap("griddata")

    mask = np.isnan(delta_x).astype(np.int8)[:ny, :nx]
    filled = []
    for d in (delta_x, delta_y):
        invalid = np.isnan(d)
        index = ndimage.distance_transform_edt(
            invalid, return_distances=False, return_indices=True
        )
        filled.append(d[tuple(index)])
        del index
    delta_x, delta_y = filled
    clock.lap("fill")

    det = Detector(py, px)
    det.max_shape = det.shape = img.shape
    det.set_dx(delta_x)
    det.set_dy(delta_y)
    det.mask = mask
    clock.lap("detector")

    if path is not None:
        save_detector(det, path)
        clock.lap("save")

    return TutorialResult(
        dy=delta_y,
        dx=delta_x,
        mask=mask,
        peaks=peaks_ref,
        params=params,
        pixel_size=(float(py), float(px)),
        n_regions=len(all_regions),
        n_four=int(four.size),
        detector=det,
        timings=clock.timings,
    )
