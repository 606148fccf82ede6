"""Warm-start recalibration: measure a detector again from a previous calibration.

A detector that was calibrated once is usually recalibrated after a small
move of the grid plate (a few pixels, a fraction of a degree). The previous
calibration already knows every hole's lattice index, its measured position,
the hole size and the lattice; :func:`recalibrate` reuses them instead of
searching the whole image:

1. a few dozen previous holes spread over the image are looked for in
   windows of half a pitch around their previous positions (3x3 median, box
   filter of the hole's size, arg-max), located by their centroid (~0.1 px,
   enough to place the fitting windows), and an affine map from the old to
   the new positions is fitted robustly: the global move;
2. every previous hole's position is predicted through that map and fitted
   in a small window around the prediction, with the same estimator and the
   same rejection tests as :func:`ccdgrid.peaks.find_holes` (missing, cut by
   the border or the taper edge, hot pixel, masked);
3. the holes keep their previous lattice indices, and the grid, maps and
   cross-validation are made as in :func:`ccdgrid.pipeline.calibrate`; from
   a calibration in memory, the maps' GCV reuses the previous fit's
   eigenbasis when the plate moved by a similarity, and when every
   previous hole was measured again the thin-plate system is solved
   from the previous fit's factor (``previous`` of
   :func:`ccdgrid.maps.displacement_maps`); a detector file holds
   neither.

No full-image smoothing or segmentation is done. When the plate moved too
far (the move cannot be measured reliably, exceeds ``max_shift``, or fewer
than ``min_matched`` of the previous holes are found again) a cold
:func:`~ccdgrid.pipeline.calibrate` is run instead and a
:class:`WarmStartFallback` warning says why.

Coordinates are ``(y, x)`` index coordinates: the centre of pixel ``(i, j)``
is at ``(i, j)``; displacement is ``ideal - measured`` in px.
"""

import math
import os
import time
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from . import centres as _centres
from . import holes as _holes
from . import peaks as _peaks
from ._notes import warn
from ._validation import as_image, check_backend
from .errors import CcdgridError
from .gridfit import centred_grid, fit_grid
from .lattice import LatticeIndex
from .maps import DisplacementMaps, displacement_maps, map_outputs
from .pipeline import (
    Calibration,
    _check_folds,
    _cross_validation,
    _fit_params,
    _output_mask,
    _read,
    calibrate,
)
from .polarity import invert, polarity_of

__all__ = ["Drift", "WarmCalibration", "WarmStartFallback", "recalibrate"]

_SAMPLE_SIDE = 8  # the global move is measured on up to 8 x 8 spread-out holes
_MIN_SAMPLE = 6
# largest departure of the old -> new linear map from identity (0.6 deg, 1 %):
# beyond it the plate was not just nudged
_MAX_LINEAR = 0.01
# fraction of the previous holes that may be lost before the maps' smoothing is chosen again
_SAME_HOLES_LOST = 0.05
# Gauss-Newton iterations of the warm fits: unweighted on the raw pixels, then weighted
_WARM_ITERATIONS = (2, 2)
_WARM_TOL = (5e-2, 1e-3)  # px: a hole stops iterating once its steps are this small


# Above this change of the lattice's scale, a cold fallback is warned of
# another plate or a wrong pitch (a detector's magnification drifts by ppm)
_OTHER_PLATE = 0.01


class WarmStartFallback(UserWarning):
    """A warm start was not possible; a cold calibration was made instead."""


@dataclass
class Drift:
    """How the grid and the maps changed since the previous calibration.

    Attributes
    ----------
    shift : ndarray of shape (2,), float64, px
        ``(y, x)`` move of the fitted grid at the image centre (new - old).
    rotation_mdeg : float, millidegree
        Rotation of the grid, from +x towards +y.
    scale_ppm : float, ppm
        Change of the grid's scale (square root of the area ratio), parts per
        million.
    max_change_dx, max_change_dy : float, px
        Largest ``|new - old|`` of the ``dx`` and ``dy`` corner maps over the
        corners of pixels valid in both calibrations.
    n_previous, n_matched : int
        Holes of the previous calibration, and how many were measured again.
    warm : bool
        False if the warm start fell back to a cold calibration (the grid
        figures are then NaN: the lattice indices are not comparable).
    reason : str
        Why the warm start fell back ("" when it did not).
    """

    shift: np.ndarray
    rotation_mdeg: float
    scale_ppm: float
    max_change_dx: float
    max_change_dy: float
    n_previous: int
    n_matched: int
    warm: bool = True
    reason: str = ""

    @property
    def matched_fraction(self):
        """``n_matched / n_previous``."""
        return self.n_matched / max(self.n_previous, 1)

    def summary(self):
        """One line for humans."""
        maps = (
            f"maps changed by at most {self.max_change_dx:.4f} px (dx), "
            f"{self.max_change_dy:.4f} px (dy)"
        )
        if not self.warm:
            return f"drift: warm start fell back to a cold calibration ({self.reason}); " + maps
        return (
            f"drift since the previous calibration: shift (y, x) ({self.shift[0]:.3f}, "
            f"{self.shift[1]:.3f}) px, rotation {self.rotation_mdeg:.2f} mdeg, "
            f"scale {self.scale_ppm:.1f} ppm; {self.n_matched}/{self.n_previous} holes "
            f"matched; " + maps
        )


@dataclass
class WarmCalibration(Calibration):
    """A :class:`~ccdgrid.pipeline.Calibration` with the drift from a previous one.

    Attributes
    ----------
    drift : Drift or None
        Move of the grid and change of the maps since the previous calibration.
    """

    drift: object = None

    def summary(self):
        """The calibration's summary, then the drift line."""
        text = super().summary()
        return text if self.drift is None else text + "\n" + self.drift.summary()


@dataclass
class _Previous:
    shape: tuple
    peaks: np.ndarray  # (N, 2) measured positions of the indexed holes
    indices: np.ndarray  # (N, 2) int64
    origin: np.ndarray
    vectors: np.ndarray
    hole_diameter: float
    pitch_px: float
    threshold: float
    pitch: float
    dx: np.ndarray
    dy: np.ndarray
    mask: np.ndarray
    smoothing: object  # float, pitch² units, or None when unknown
    degree: object = None  # trend degree of the previous maps, or None when unknown
    order: object = None  # their kernel order (2 or 3), or None when unknown (then 2)
    shapes: object = None  # (N, 2) fitted radius and blur of the holes, px, or None
    # DisplacementMaps fitted to ``peaks`` in their order (its GCV eigenbasis
    # is reused), or None (from a detector file)
    maps: object = None
    # the CrossValidation of those maps (its folds' factors are reused), or None
    cross_validation: object = None
    # "dark": the previous calibration measured the negative of its image
    polarity: str = "bright"


def recalibrate(
    image,
    previous,
    *,
    pitch=None,
    mask=None,
    max_shift=None,
    min_matched=0.8,
    smoothing=None,
    backend="cython",
    source=None,
    cv_folds=5,
):
    """Calibrate again from a previous calibration of the same detector.

    Parameters
    ----------
    image : array_like of shape (ny, nx) or str or os.PathLike
        The new grid image, or a file :func:`ccdgrid.io.read_image` reads.
    previous : Calibration or ccdgrid.detector_file.DetectorRecord or str or os.PathLike
        The previous calibration, its loaded detector record, or the path of
        a detector file written by ccdgrid (it must hold the holes and grid).
    pitch : float or None, m
        Hole spacing of the plate; None: the previous calibration's.
    mask : array_like of shape (ny, nx) or None
        Nonzero for pixels to ignore (pyFAI's convention).
    max_shift : float or None, px
        Largest move of the plate at the image centre handled warm; None:
        0.3 of the previous pitch. Beyond it, a cold calibration is made.
    min_matched : float
        Smallest fraction of the previous holes that must be measured again,
        in (0, 1]; below it, a cold calibration is made.
    smoothing : float, "auto", "previous" or None
        Thin-plate smoothing of the maps in pitch² units (see
        :func:`ccdgrid.maps.displacement_maps`). None or "auto": chosen by
        GCV on the new holes, as a cold calibration does (~20 ms at 2048²,
        less above 500 holes, where GCV runs on a central subset).
        "previous": the previous calibration's, with its trend degree, when
        at least 95 % of its holes were measured again, else by GCV; GCV's
        choice moves between neighbouring values of its grid from one image
        of a plate to the next, and the reused one left the dense residual
        ~10 % above a cold calibration's at 2048².
    backend : {"cython", "numpy"}
        Engine of the compiled kernels.
    source : str, dict or None
        Origin of an in-memory image (see :func:`ccdgrid.pipeline.calibrate`).
    cv_folds : int or None
        Folds of the maps' cross-validation; 0 or None skips it.

    Returns
    -------
    WarmCalibration
        The new calibration; ``drift`` holds the move since ``previous`` and
        ``params["warm_start"]`` whether the warm start was used (and why not).

    Raises
    ------
    CcdgridError
        Bad input, a previous calibration without holes or grid, or one of a
        different image shape.

    Warns
    -----
    WarmStartFallback
        When a cold calibration was made instead (the message says why).
    """
    check_backend(backend)
    cv_folds = _check_folds(cv_folds)
    if not 0.0 < float(min_matched) <= 1.0:
        raise CcdgridError(f"`min_matched` must be in (0, 1], got {min_matched!r}")
    timings = {}
    t_start = time.perf_counter()
    if isinstance(image, (str, os.PathLike)):
        image, source = _read(os.fspath(image))
    elif isinstance(source, dict):
        source = dict(source)
    elif source is not None:
        source = {"path": str(source), "sha256": None}
    prev = _previous(previous)
    img = _native(image)
    if prev.polarity == "dark":
        # the holes are measured where the previous calibration measured them:
        # on the image's negative
        img = invert(img, mask)
    if img.shape != prev.shape:
        raise CcdgridError(
            f"`image` has shape {img.shape} but `previous` was calibrated on {prev.shape}"
        )
    if pitch is None:
        pitch = prev.pitch
    if max_shift is None:
        max_shift = 0.3 * prev.pitch_px
    max_shift = float(max_shift)
    if not (math.isfinite(max_shift) and max_shift > 0):
        raise CcdgridError(f"`max_shift` must be a positive number of px, got {max_shift!r}")
    timings["read"] = time.perf_counter() - t_start
    # the maps' memory is mapped on the idle core while this thread measures
    # the move (see map_outputs)
    outputs = map_outputs(prev.shape)

    def cold(reason):
        warn(
            f"warm start not possible ({reason}); made a cold calibration instead",
            WarmStartFallback,
            stacklevel=3,
        )
        cal = calibrate(
            image,
            pitch=pitch,
            mask=mask,
            smoothing=None if _wants_previous(smoothing) else smoothing,
            backend=backend,
            source=source,
            cv_folds=cv_folds,
            polarity=prev.polarity,
        )
        cal.params["warm_start"] = {"used": False, "reason": reason}
        change = _map_change(prev, cal)
        nan = float("nan")
        # the lattice's scale is comparable without matching holes: a few per
        # cent is another plate or a wrong pitch, which the user should hear
        step, old_step = (
            math.sqrt(abs(np.linalg.det(v))) for v in (cal.grid.vectors, prev.vectors)
        )
        scale = step / old_step
        if abs(scale - 1.0) > _OTHER_PLATE:
            warn(
                f"the holes' spacing on the image changed by {(scale - 1.0) * 100:+.1f} % since "
                f"the previous calibration ({step:.2f} px against {old_step:.2f} px): another "
                "plate, or a wrong pitch? The pixel size follows from the pitch",
                WarmStartFallback,
                stacklevel=3,
            )
        drift = Drift(
            np.full(2, nan), nan, (scale - 1.0) * 1e6, *change, len(prev.peaks), 0, False, reason
        )
        return WarmCalibration(**{f.name: getattr(cal, f.name) for f in fields(cal)}, drift=drift)

    t0 = time.perf_counter()
    filled, valid, defects = _prepare(img, image, mask)
    radius = 0.5 * prev.hole_diameter
    move, why = _global_move(filled, prev, radius, max_shift)
    timings["global_move"] = time.perf_counter() - t0
    if move is None:
        return cold(why)

    t0 = time.perf_counter()
    predicted = _apply(move, prev.peaks)
    found = _measure(filled, valid, predicted, radius, prev, backend)
    timings["measure_holes"] = time.perf_counter() - t0
    ok = found["reasons"] == ""
    n_ok = int(ok.sum())
    if n_ok < min_matched * len(prev.peaks) or n_ok < _peaks.MIN_HOLES:
        return cold(
            f"only {n_ok} of the previous {len(prev.peaks)} holes found again "
            f"(< {min_matched:.0%})"
        )
    peaks = found["centres"][ok]
    indices = prev.indices[ok]
    holes = _hole_search(found, ok, prev, timings)
    holes.defects = defects

    t0 = time.perf_counter()
    grid = centred_grid(fit_grid(peaks, indices, pitch=pitch, backend=backend), peaks, prev.shape)
    timings["fit_grid"] = time.perf_counter() - t0
    lattice = LatticeIndex(
        indices=indices.copy(),
        valid=np.ones(n_ok, dtype=bool),
        vectors=grid.vectors.copy(),
        origin=grid.origin.copy(),
        rejected=np.zeros(0, dtype=np.int64),
        reasons=[],
        pitch_px=float(holes.pitch_px),
        pair_distances=np.zeros(0),
        window=(float("nan"), float("nan")),
        start=0,
        tolerance=float("nan"),
        outlier_threshold_px=None,
    )
    t0 = time.perf_counter()
    map_smoothing, map_degree, map_order = smoothing, None, None
    if _wants_previous(smoothing):
        map_smoothing = None
        if _same_hole_set(n_ok, len(prev.peaks)):
            # the same detector, plate, exposure and holes: the previous
            # smoothing and the trend degree and kernel order GCV chose with
            # it fit again (the smoothing's units are the order's)
            map_smoothing = prev.smoothing
            map_degree = _degree(prev.degree, n_ok) if map_smoothing is not None else None
            if map_smoothing is not None:  # else GCV chooses the order too
                map_order = 3 if prev.order == 3 else 2
            if map_order == 3 and (map_degree is None or map_degree < 2):
                map_smoothing = map_degree = map_order = None  # GCV again
    maps = displacement_maps(
        peaks,
        grid.displacement,
        prev.shape,
        smoothing=map_smoothing,
        degree=map_degree,
        order=map_order,
        scale_px=holes.pitch_px,
        # the holes keep their previous rows: the previous fit's GCV
        # eigenbasis is reused when they moved by a similarity
        previous=prev.maps,
        previous_rows=np.flatnonzero(ok) if prev.maps is not None else None,
        outputs=outputs,
        backend=backend,
    )
    timings["displacement_maps"] = time.perf_counter() - t0
    # the same holes in the same order: each fold's spline from the previous fold's factor
    cv = _cross_validation(peaks, grid, maps, cv_folds, previous=prev.cross_validation)
    out_mask = _output_mask(maps.mask, mask, holes.defects)
    timings["total"] = time.perf_counter() - t_start
    params = {
        "pitch": float(pitch),
        "mask": mask is not None,
        "smoothing": smoothing,
        "backend": backend,
        "cv_folds": cv_folds,
        "max_shift": max_shift,
        "min_matched": float(min_matched),
        "warm_start": {"used": True, "reason": ""},
        "polarity": prev.polarity,
        "resolved": {
            "hole_diameter": float(holes.hole_diameter),
            # with the diameter, the typical profile: what a warm start from
            # this calibration's file starts its fits from
            "hole_blur": float(np.median(holes.width[:, 1])),
            "pitch_px": float(holes.pitch_px),
            "threshold": float(holes.threshold),
            "smoothing": maps.smoothing,
            **_fit_params(maps, grid),
        },
    }
    cal = WarmCalibration(
        shape=prev.shape,
        pitch=grid.pitch,
        pixel_size=grid.pixel_size,
        holes=holes,
        lattice=lattice,
        grid=grid,
        maps=maps,
        dx=maps.dx,
        dy=maps.dy,
        mask=out_mask,
        timings=timings,
        params=params,
        source=source,
        cross_validation=cv,
    )
    t0 = time.perf_counter()
    cal.drift = _drift(
        prev, (prev.peaks[ok], indices), (peaks, indices), cal, len(prev.peaks), n_ok
    )
    timings["drift"] = time.perf_counter() - t0
    del timings["total"]  # re-added last, for the summary's order
    timings["total"] = time.perf_counter() - t_start
    return cal


# -- the previous calibration ------------------------------------------------


def _previous(previous):
    """Normalise a Calibration, DetectorRecord or path to :class:`_Previous`."""
    if isinstance(previous, (str, os.PathLike)):
        from .detector_file import load

        previous = load(previous)
    if isinstance(previous, Calibration):
        lat, holes, grid = previous.lattice, previous.holes, previous.grid
        peaks = np.asarray(holes.peaks, dtype=np.float64)
        valid = np.asarray(lat.valid, dtype=bool) & _first_position(len(peaks), previous.params)
        maps = _fitted_maps(previous.maps, peaks[valid])
        return _Previous(
            shape=tuple(int(n) for n in previous.shape),
            peaks=peaks[valid],
            indices=np.asarray(lat.indices, dtype=np.int64)[valid],
            origin=np.asarray(grid.origin, dtype=np.float64),
            vectors=np.asarray(grid.vectors, dtype=np.float64),
            hole_diameter=float(holes.hole_diameter),
            pitch_px=float(holes.pitch_px),
            threshold=float(holes.threshold),
            pitch=float(previous.pitch),
            dx=previous.dx,
            dy=previous.dy,
            mask=previous.mask,
            smoothing=_smoothing(getattr(previous.maps, "smoothing", None)),
            degree=getattr(previous.maps, "degree", None),
            order=getattr(previous.maps, "order", None),
            shapes=_shapes(holes, valid),
            maps=maps,
            # fitted to the same holes as the maps (a combined calibration's are not)
            cross_validation=previous.cross_validation if maps is not None else None,
            polarity=polarity_of(previous),
        )
    needed = ("peaks", "indices", "valid", "grid", "params", "shape", "dx", "dy", "mask")
    missing = [name for name in needed if getattr(previous, name, None) is None]
    if missing:
        raise CcdgridError(
            "`previous` must be a Calibration, a detector record or the path of a detector "
            f"file written by ccdgrid; got {type(previous).__name__} without {missing}"
        )
    grid = previous.grid
    resolved = (previous.params or {}).get("resolved", {})
    if "origin" not in grid or "vectors" not in grid or "hole_diameter" not in resolved:
        raise CcdgridError(
            "`previous` holds no fitted grid or hole size (a plain pyFAI detector file?): "
            "it cannot seed a warm start"
        )
    valid = np.asarray(previous.valid, dtype=bool)
    valid = valid & _first_position(len(valid), previous.params)
    pitch = previous.pitch or (previous.params or {}).get("pitch", 5e-3)
    vectors = np.asarray(grid["vectors"], dtype=np.float64)
    pitch_px = resolved.get("pitch_px") or float(np.mean(np.hypot(*vectors.T)))
    return _Previous(
        shape=tuple(int(n) for n in previous.shape),
        peaks=np.asarray(previous.peaks, dtype=np.float64)[valid],
        indices=np.asarray(previous.indices, dtype=np.int64)[valid],
        origin=np.asarray(grid["origin"], dtype=np.float64),
        vectors=vectors,
        hole_diameter=float(resolved["hole_diameter"]),
        pitch_px=float(pitch_px),
        threshold=float(resolved.get("threshold", float("nan"))),
        pitch=float(pitch),
        dx=previous.dx,
        dy=previous.dy,
        mask=previous.mask,
        smoothing=_smoothing(resolved.get("smoothing")),
        degree=resolved.get("map_degree"),
        order=resolved.get("map_order"),
        shapes=_record_shapes(resolved, int(valid.sum())),
        polarity=polarity_of(previous),
    )


def _fitted_maps(maps, peaks):
    """The previous :class:`~ccdgrid.maps.DisplacementMaps` when it kept what a refit reuses.

    That is its GCV eigenbasis or its thin-plate factor.

    Only when it was fitted to ``peaks`` (N, 2), the rows of
    ``_Previous.peaks``, in their order: a calibration's maps are fitted to
    its indexed holes, a combined calibration's to the holes of all its
    plate positions (of which ``peaks`` keeps the first position's).
    """
    if not isinstance(maps, DisplacementMaps):
        return None
    kept = maps.gcv_basis if maps.gcv_basis is not None else maps.tps_factor
    if kept is None or not np.array_equal(kept.points, peaks):
        return None
    return maps


def _first_position(n, params):
    """(n,) bool: the holes of the first image of a combined calibration, else all.

    A combined calibration lists the holes of its plate positions one image
    after the other, the same lattice site once per image, each where the
    plate was; its grid is the first image's. Predicting the holes of a new
    image from all of them would put up to one hole per position at every
    site.
    """
    keep = np.ones(n, dtype=bool)
    combined = (params or {}).get("combined") or {}
    found = combined.get("n_found")
    if found and sum(found) == n:
        keep[int(found[0]) :] = False
    return keep


def _shapes(holes, valid):
    """Fitted (radius, blur) of the indexed holes, (N, 2) px, or None when not usable."""
    width = getattr(holes, "width", None)
    if width is None:
        return None
    width = np.asarray(width, dtype=np.float64)
    if width.shape != (valid.size, 2):
        return None
    width = width[valid]
    return width if (np.isfinite(width).all() and (width > 0).all()) else None


def _record_shapes(resolved, n):
    """(n, 2) radius and blur from a record's typical hole profile, or None.

    A detector file holds no per-hole fits, but the hole diameter (twice the
    median fitted radius) and, when it recorded it, the median blur: all the
    warm fits start from (and size their windows with).
    """
    try:
        rad = 0.5 * float(resolved["hole_diameter"])
        blur = float(resolved["hole_blur"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(rad) and math.isfinite(blur) and rad > 0 and blur > 0):
        return None
    return np.tile([rad, blur], (n, 1))


def _wants_previous(smoothing):
    return isinstance(smoothing, str) and smoothing == "previous"


def _same_hole_set(n_matched, n_previous):
    """True when the holes measured again are the previous ones but a few.

    GCV's smoothing depends on how densely and how far the holes sample the
    field: with more than ``_SAME_HOLES_LOST`` of them gone (masked, cut, in
    the dark) the previous value no longer fits and is chosen again.
    """
    return n_matched >= (1.0 - _SAME_HOLES_LOST) * n_previous


def _smoothing(value):
    """A previous smoothing that can be reused (positive finite float), else None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _degree(value, n_holes):
    """A previous trend degree usable with ``n_holes`` holes (1-5, more holes than terms)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    if not 1 <= value <= 5 or n_holes <= (value + 1) * (value + 2) // 2:
        return None
    return int(value)


# -- measuring ---------------------------------------------------------------


def _native(image):
    """``image`` validated as a C-contiguous 2-D array, in its own dtype when it can be.

    The fits read a few hundred pixels around each hole and convert those
    windows to float64 themselves: converting the whole image to float32
    first (64 MB at 4096², and its page faults) cost more than all of them
    on a busy machine. Booleans become uint8 and half floats float32.
    """
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return as_image(arr, dtype=arr.dtype)


def _prepare(img, original, mask):
    """The image with invalid pixels set to the valid median, the valid map and the defects.

    ``(image, valid, defects)``: ``valid`` None when every pixel is, and
    ``defects`` as :func:`ccdgrid.peaks.image_defects` returns them.

    Same treatment of the mask, dead lines (the same scan) and non-finite
    pixels as :func:`ccdgrid.peaks.find_holes`, and the fill value from a
    1/16 subsample of the valid pixels (it only has to look like background
    to the global move's search: the fits ignore invalid pixels).
    """
    invalid = _peaks._as_mask(mask, img.shape)
    defects = _peaks.image_defects(img, np.asarray(original).dtype)
    if defects is not None:
        invalid = defects if invalid is None else invalid | defects
    if invalid is None:
        return img, None, None
    valid = ~invalid
    if not valid.any():
        raise CcdgridError("`mask` marks every pixel of `image` as invalid")
    step = 4 if min(valid.shape) >= 64 else 1
    sample = img[::step, ::step][valid[::step, ::step]]
    if sample.size == 0:
        sample = img[valid]
    return np.where(valid, img, np.float32(np.median(sample))), valid, defects


def _window_half(radius, pitch_px, shapes=None):
    """Fit window half width and the smallest one accepted (as find_holes).

    With the previous holes' fitted ``shapes`` ((N, 2) radius and blur, px),
    the window also holds the typical profile and a ring of background,
    ``R + 3 s + 2`` (as find_holes widens it for soft holes): in a window
    sized from the diameter alone, the tails of Gaussian-like holes are cut,
    the background plane absorbs them and the centres scatter more.
    """
    half = int(np.ceil(max(1.7 * radius + 2.0, radius + 5.0)))
    if shapes is not None and len(shapes):
        rad, blur = np.median(shapes, axis=0)
        half = max(half, int(np.ceil(rad + 3.0 * blur + 2.0)))
    half = int(max(min(half, np.floor(0.45 * pitch_px)), np.ceil(radius + 3.0)))
    return half, int(np.ceil(0.85 * radius + 2.5))


def _sample(points, shape):
    """Row numbers of up to 8 x 8 points spread over the image."""
    ny, nx = shape
    gy, gx = np.meshgrid(
        (np.arange(_SAMPLE_SIDE) + 0.5) * ny / _SAMPLE_SIDE,
        (np.arange(_SAMPLE_SIDE) + 0.5) * nx / _SAMPLE_SIDE,
        indexing="ij",
    )
    _, idx = cKDTree(points).query(np.stack([gy.ravel(), gx.ravel()], axis=1))
    return np.unique(idx)


def _global_move(img, prev, radius, max_shift):
    """Affine map old -> new positions from a sample of holes, or (None, reason)."""
    h, w = img.shape
    pick = _sample(prev.peaks, prev.shape)
    search = int(np.floor(0.5 * prev.pitch_px))
    centre = np.rint(prev.peaks[pick]).astype(np.int64)
    inside = (
        (centre[:, 0] >= search + 1)
        & (centre[:, 0] < h - search - 1)
        & (centre[:, 1] >= search + 1)
        & (centre[:, 1] < w - search - 1)
    )
    pick, centre = pick[inside], centre[inside]
    if pick.size < _MIN_SAMPLE:
        return None, f"only {pick.size} previous holes far enough from the border to search"
    coarse = centre + _brightest_spot(img, centre, search + 1, radius)
    half, _ = _window_half(radius, prev.pitch_px)
    room = np.minimum.reduce(
        [coarse[:, 0] - 1, h - 2 - coarse[:, 0], coarse[:, 1] - 1, w - 2 - coarse[:, 1]]
    )
    usable = room >= half
    pick, coarse = pick[usable], coarse[usable]
    if pick.size < _MIN_SAMPLE:
        return None, "too few sample holes inside the image"
    centres, contrast = _centroids(img, coarse, half)
    good = np.isfinite(centres).all(axis=1) & (contrast > 0)
    if good.sum() >= _MIN_SAMPLE:
        good &= contrast >= 0.3 * np.median(contrast[good])
    src, dst = prev.peaks[pick[good]], centres[good]
    if len(src) < _MIN_SAMPLE:
        return None, "the sample holes were not found near their previous positions"
    # a rigid move of the plate leaves sub-pixel residuals (the distortion
    # hardly changes over a few px); holes locked on a neighbour are a pitch off
    cap = max(1.5, 0.05 * prev.pitch_px)
    move, inliers = _robust_affine(src, dst, cap)
    if move is None or inliers.sum() < max(_MIN_SAMPLE, 0.6 * len(pick)):
        return None, (
            "the move is not consistent over the image (a different plate, or a move of "
            "half a pitch or more)"
        )
    if np.abs(move[1:] - np.eye(2)).max() > _MAX_LINEAR:
        return None, (
            "the rotation or scale change of the grid is too large for a warm start "
            f"(linear part {move[1:].T.round(4).tolist()})"
        )
    centre_img = (np.asarray(prev.shape, dtype=np.float64) - 1.0) / 2.0
    shift = _apply(move, centre_img[None])[0] - centre_img
    if np.hypot(*shift) > max_shift:
        return None, (
            f"the plate moved by {np.hypot(*shift):.1f} px at the image centre "
            f"(max_shift {max_shift:.1f} px)"
        )
    return move, ""


def _brightest_spot(img, centre, ext, radius):
    """Offset (N, 2) int64 from ``centre`` to the brightest hole-sized spot within ``ext`` px.

    The windows are binned as the cold search bins the image
    (:func:`ccdgrid.peaks.detection_binning`: a hole still spans about five
    binned pixels), then a 3x3 median removes hot pixels and a box of the
    hole's size makes the hole the brightest spot of its window. The spot
    is good to about one binned pixel: it only places the centroid windows.
    Binning 2x2 made the search 4x cheaper (the median of 64 windows of
    99² px cost ~19 ms, most of the global move, at 4096²).
    """
    n = len(centre)
    win = _centres.extract_windows(img, centre, ext).astype(np.float32)
    factor = _peaks.detection_binning(2.0 * radius)
    if factor > 1:
        # block sums from strided slices (a reduction over two inner axes of a
        # 5-D view is ~10x slower); the scale does not matter to an arg-max
        m = win.shape[1] // factor
        blocks = [
            win[:, dy : m * factor : factor, dx : m * factor : factor]
            for dy in range(factor)
            for dx in range(factor)
        ]
        win = blocks[0].copy()
        for part in blocks[1:]:
            win += part
    win = _centres._median3(win)  # binned pixel (a, b) of win is (a + 1, b + 1) before
    box = max(round(2.0 * radius / factor), 1)
    win = ndimage.uniform_filter(win, size=(1, box, box), mode="nearest")
    a, b = np.divmod(win.reshape(n, -1).argmax(axis=1), win.shape[2])
    # centre of binned pixel (a + 1, b + 1) in window coordinates
    spot = factor * (np.stack([a, b], axis=1) + 1) + 0.5 * (factor - 1)
    return np.rint(spot).astype(np.int64) - ext


def _centroids(img, coarse, half):
    """Centroids of the holes near integer positions, and their contrast.

    On the 3x3-median-filtered window of half width ``half`` around each
    position (hot pixels removed), above its border's median plus a fifth of
    the contrast (the noise of the background would pull the centroid to the
    window's centre). Good to ~0.1 px: enough for the global move, which
    only places the fitting windows (every hole is then fitted), at a
    fraction of the cost of fitting the sample (~25 ms for 64 holes, most
    of it fixed costs of the batched fit).

    Returns ``(centres (N, 2) float64, NaN where the window is flat;
    contrast (N,) float64)``.
    """
    win = _centres._median3(_centres.extract_windows(img, coarse, half + 1).astype(np.float32))
    border = np.concatenate([win[:, 0], win[:, -1], win[:, 1:-1, 0], win[:, 1:-1, -1]], axis=1)
    background = np.median(border, axis=1)
    contrast = win.max(axis=(1, 2)) - background
    above = win - (background + 0.2 * contrast)[:, None, None]
    np.maximum(above, 0.0, out=above)
    offs = np.arange(-half, half + 1, dtype=np.float64)
    total = above.sum(axis=(1, 2), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.einsum("nij,i->n", above, offs) / total
        cx = np.einsum("nij,j->n", above, offs) / total
    return coarse + np.stack([cy, cx], axis=1), contrast.astype(np.float64)


def _robust_affine(src, dst, cap, rounds=5):
    """``(3, 2)`` affine map ``dst ~ [1, src] @ M`` by least squares with outlier rejection.

    Starts from the median translation, so that a minority of holes locked on
    a neighbour does not pull the first fit; residuals above ``cap`` px are
    always outliers.
    """
    design = np.column_stack([np.ones(len(src)), src])
    move = np.vstack([np.median(dst - src, axis=0), np.eye(2)])
    keep = None
    for _ in range(rounds):
        err = np.hypot(*(design @ move - dst).T)
        ref = err if keep is None else err[keep]
        new = err <= min(max(1.0, 4.0 * 1.4826 * np.median(ref)), cap)
        if keep is not None and np.array_equal(new, keep):
            break
        keep = new
        if keep.sum() < _MIN_SAMPLE:
            return None, keep
        move, *_ = np.linalg.lstsq(design[keep], dst[keep], rcond=None)
    return move, keep


def _apply(move, points):
    return np.column_stack([np.ones(len(points)), points]) @ move


def _measure(img, valid, predicted, radius, prev, backend):
    """Fit every predicted hole; centres and a rejection reason per hole ("" = accepted).

    Every hole starts at its predicted position (good to a few hundredths of
    a pixel) with the previous holes' median radius and blur (from a
    detector file, which does not hold them: the shape of a sample of holes
    fitted first), in a window that holds that profile: two unweighted
    iterations on the raw pixels, the noise model, then two weighted ones
    (:func:`ccdgrid.centres.fit_hole_profiles` with ``median_pass=False``),
    where a cold fit needs the median-filtered pass, the population start
    and more iterations.
    """
    h, w = img.shape
    n = len(predicted)
    pitch_px = prev.pitch_px
    half, half_min = _window_half(radius, pitch_px, prev.shapes)
    reasons = np.full(n, "", dtype=object)
    cy, cx = np.rint(predicted).astype(np.int64).T
    room = np.minimum.reduce([cy - 1, h - 2 - cy, cx - 1, w - 2 - cx])
    halves = np.minimum(half, room)
    reasons[halves < half_min] = "cut by border"
    centres = predicted.copy()
    fit_idx = np.flatnonzero(reasons == "")
    fit = None
    if fit_idx.size:
        warm = {"median_pass": False, "iterations": _WARM_ITERATIONS, "tol": _WARM_TOL}
        if prev.shapes is not None:
            # the previous population's typical shape, not each hole's own:
            # a soft hole's fitted radius and blur trade off against each other
            # at the noise level, and a start from one image's noise converges
            # more slowly on the next image than the median does
            rad, blur = np.median(prev.shapes, axis=0)
            warm["start_shape"] = (rad, blur)
        fit = _centres.fit_hole_profiles(
            img,
            predicted[fit_idx],
            radius,
            half=halves[fit_idx],
            valid=valid,
            backend=backend,
            **warm,
        )
        centres[fit_idx] = fit.centres
        # no smoothed image here: a hole's expected contrast is the population's
        # amplitude, so a window on the dark (a missing hole) fails the disc test
        amp = fit.amplitude[fit.converged & (fit.amplitude > 0)]
        typical = float(np.median(amp)) if amp.size else 1.0
        fit_reasons = _holes.classify_fits(fit, np.full(fit_idx.size, typical))
        if valid is not None:
            heavy = _peaks._masked_fraction_high(valid, fit, half_min)
            fit_reasons[(fit_reasons == "") & heavy] = "masked"
        # the prediction is good to a fraction of a pixel: a fit that wandered
        # off it found something else
        off = np.hypot(*(fit.centres - predicted[fit_idx]).T) > max(2.0, 0.05 * pitch_px)
        fit_reasons[(fit_reasons == "") & off] = "off prediction"
        reasons[fit_idx] = fit_reasons
    return {"centres": centres, "reasons": reasons, "fit": fit, "fit_idx": fit_idx}


def _hole_search(found, ok, prev, timings):
    """A :class:`ccdgrid.peaks.HoleSearch` for the measured holes (no smoothed image)."""
    fit, fit_idx = found["fit"], found["fit_idx"]
    where = np.searchsorted(fit_idx, np.flatnonzero(ok))
    rejected = ~ok
    peaks = found["centres"][ok]
    if len(peaks) >= 2:
        dist, _ = cKDTree(peaks).query(peaks, k=2)
        pitch_px = float(np.median(dist[:, 1]))
    else:
        pitch_px = prev.pitch_px
    # reports show the log10 contrast of the candidates: here the fitted
    # height of every window, against the previous threshold
    amp = fit.amplitude[fit.amplitude > 0]
    logc = np.log10(amp) if amp.size else np.zeros(1)
    counts, edges = np.histogram(logc, bins=max(10, min(100, logc.size // 4)))
    return _peaks.HoleSearch(
        peaks=peaks,
        amplitude=fit.amplitude[where],
        width=np.stack([fit.radius[where], fit.blur[where]], axis=1),
        background=fit.background[where],
        rejected=found["centres"][rejected],
        reasons=found["reasons"][rejected].astype(str),
        threshold=prev.threshold,
        hole_diameter=2.0 * float(np.median(fit.radius[where])),
        pitch_px=pitch_px,
        smoothed=None,
        segmentation=None,
        timings=dict(timings),
        log_histogram=_holes.LogHistogram(edges, counts.astype(np.int64), prev.threshold),
    )


# -- drift -------------------------------------------------------------------


def _drift(prev, old, new, maps, n_previous, n_matched):
    """Grid move and map change between ``prev`` and a new calibration.

    ``old`` and ``new``: ``(peaks, indices)`` of the same holes, (N, 2) px
    and (N, 2), measured in ``prev`` and in the new calibration and numbered
    as in ``prev``; ``maps``: the new ``dx``, ``dy`` and ``mask``. The move
    is that of the least-squares lattices of these holes in both (the same
    holes: a row lost at the edge would otherwise move the fit under a
    strong distortion), not of the grids' lattices: one seen at the image
    centre (:func:`~ccdgrid.gridfit.centred_grid`) takes its scale and
    rotation from the central holes, which their noise turns by up to a
    mdeg from one image to the next.
    """
    o_old, v_old = _lsq_lattice(*old)
    o_new, v_new = _lsq_lattice(*new)
    # row-vector convention: p = origin + (i, j) @ vectors, so
    # p_new = o_new + (p_old - o_old) @ inv(V_old) @ V_new
    lin = np.linalg.solve(v_old, v_new)
    centre = (np.asarray(prev.shape, dtype=np.float64) - 1.0) / 2.0
    moved = o_new + (centre - o_old) @ lin
    a = lin.T  # acts on (y, x) column vectors
    # rotation from +x towards +y: y_out gains sin(t) x_in
    theta = math.atan2(a[0, 1] - a[1, 0], a[0, 0] + a[1, 1])
    scale = math.sqrt(abs(np.linalg.det(a)))
    change_dx, change_dy = _map_change(prev, maps)
    return Drift(
        shift=moved - centre,
        rotation_mdeg=math.degrees(theta) * 1e3,
        scale_ppm=(scale - 1.0) * 1e6,
        max_change_dx=change_dx,
        max_change_dy=change_dy,
        n_previous=n_previous,
        n_matched=n_matched,
    )


def _lsq_lattice(peaks, indices):
    """``(origin, vectors)`` of the affine lattice fitted to all holes by least squares."""
    ij = np.asarray(indices, dtype=np.float64)
    design = np.column_stack([np.ones(len(ij)), ij])
    coef, *_ = np.linalg.lstsq(design, np.asarray(peaks, dtype=np.float64), rcond=None)
    return coef[0], coef[1:3]


# the map change is compared on every _CHANGE_STEP-th corner, then on every
# corner around the _CHANGE_REFINE largest differences of each map
_CHANGE_STEP = 8
_CHANGE_REFINE = 4


def _map_change(prev, cal):
    """Largest ``|new - old|`` of dx and dy over corners of pixels valid in both.

    Returns ``(dx change, dy change)`` in px, NaN when no corner is valid in
    both calibrations.

    Notes
    -----
    The four maps are 270 MB at 4096²: comparing them corner by corner cost
    ~40 ms of CPU, a tenth of a warm start. The maps are smooth (splines
    through holes a pitch apart, ~100 px), so the change is measured on the
    corners ``(i, j)`` with ``i`` and ``j`` multiples of ``_CHANGE_STEP``
    (and the last corner row and column), then on every corner of the
    ``(2 _CHANGE_STEP + 1)²`` box around each of the ``_CHANGE_REFINE``
    largest differences of each map. The result never exceeds the exact
    maximum, and equals it when the largest difference lies within
    ``_CHANGE_STEP`` corners of one of those; otherwise it is short of it by
    at most ``G _CHANGE_STEP / sqrt(2)``, ``G`` the largest gradient of the
    change (px per px: ~1e-4 for a plate moved by a few px). A spike of the
    change narrower than ``_CHANGE_STEP`` corners may be missed.
    """
    old_mask, new_mask = np.asarray(prev.mask), np.asarray(cal.mask)
    ny, nx = old_mask.shape
    step = _CHANGE_STEP
    rows = np.unique(np.r_[0 : ny + 1 : step, ny])
    cols = np.unique(np.r_[0 : nx + 1 : step, nx])
    # a corner of the sub-lattice counts when the pixel after it (clipped to
    # the image) is valid in both: a subset of the valid corners, so the
    # result stays a lower bound of the exact maximum
    pix = np.minimum(rows, ny - 1), np.minimum(cols, nx - 1)
    corner = _take_lattice(old_mask, *pix, step) == 0
    corner &= _take_lattice(new_mask, *pix, step) == 0
    if not corner.any():
        return float("nan"), float("nan")
    worst = []
    for new, old in ((cal.dx, prev.dx), (cal.dy, prev.dy)):
        diff = np.abs(
            np.subtract(
                _take_lattice(new, rows, cols, step),
                _take_lattice(old, rows, cols, step),
                dtype=np.float32,
            )
        )
        diff[~corner | np.isnan(diff)] = -np.inf  # as fmax: NaN corners are skipped
        k = min(_CHANGE_REFINE, diff.size)
        top = np.argpartition(diff, diff.size - k, axis=None)[diff.size - k :]
        best = -np.inf
        for flat in top:
            if not np.isfinite(diff.flat[flat]):
                continue
            i, j = np.unravel_index(flat, diff.shape)
            r0, r1 = max(rows[i] - step, 0), min(rows[i] + step + 1, ny + 1)
            c0, c1 = max(cols[j] - step, 0), min(cols[j] + step + 1, nx + 1)
            box = _corner_valid(old_mask, new_mask, r0, r1, c0, c1)
            change = np.abs(np.subtract(new[r0:r1, c0:c1], old[r0:r1, c0:c1], dtype=np.float32))
            best = np.fmax(best, np.fmax.reduce(change, axis=None, where=box, initial=-np.inf))
        worst.append(float(best) if np.isfinite(best) else float("nan"))
    return worst[0], worst[1]


def _take_lattice(a, rows, cols, step):
    """``a[np.ix_(rows, cols)]`` for indices ``0, step, 2 step, ...`` and at most one more.

    The regular part is a strided slice: 3-4x cheaper than a gather at 4096².
    """
    nr = len(rows) - int(rows[-1] != (len(rows) - 1) * step)
    nc = len(cols) - int(cols[-1] != (len(cols) - 1) * step)
    out = np.empty((len(rows), len(cols)), dtype=a.dtype)
    out[:nr, :nc] = a[: (nr - 1) * step + 1 : step, : (nc - 1) * step + 1 : step]
    if nr < len(rows):
        out[nr:] = a[rows[nr:]][:, cols]
    if nc < len(cols):
        out[:, nc:] = a[np.ix_(rows, cols[nc:])]
    return out


def _corner_valid(old_mask, new_mask, r0, r1, c0, c1):
    """Corners ``r0 .. r1 - 1`` x ``c0 .. c1 - 1`` touching a pixel valid in both masks.

    Corner ``(i, j)`` touches the pixels ``(i - 1 .. i, j - 1 .. j)`` that
    exist. Returns ``(r1 - r0, c1 - c0)`` bool.
    """
    ny, nx = old_mask.shape
    lo, hi, left, right = max(r0 - 1, 0), min(r1, ny), max(c0 - 1, 0), min(c1, nx)
    pix = (old_mask[lo:hi, left:right] == 0) & (new_mask[lo:hi, left:right] == 0)
    # corners lo .. hi (pixel rows lo .. hi - 1 and their lower edges)
    grown = np.zeros((hi - lo + 1, right - left + 1), dtype=bool)
    for dy in (0, 1):
        for dx in (0, 1):
            grown[dy : dy + hi - lo, dx : dx + right - left] |= pix
    return grown[r0 - lo : r1 - lo, c0 - left : c1 - left]
