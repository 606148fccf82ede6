"""One call from a grid image to displacement maps: :func:`calibrate`.

:func:`calibrate` only chains the pipeline's stages and keeps what each one
returned, so a user can inspect or replace any stage:

1. :func:`ccdgrid.peaks.find_holes` -- hole centres ``(y, x)``;
2. :func:`ccdgrid.lattice.index_holes` -- integer lattice indices;
3. :func:`ccdgrid.gridfit.fit_grid` then :func:`ccdgrid.gridfit.centred_grid`
   -- affine grid seen at the image centre, pixel size, displacement
   ``ideal - measured`` at every hole;
4. :func:`ccdgrid.maps.displacement_maps` -- ``dx``, ``dy`` on the pixel
   corners and the validity mask;
5. :func:`ccdgrid.cross_validation.cross_validate` -- the maps' error at
   holes they were not fitted to (k-fold), the accuracy figure of the
   calibration.
"""

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial import cKDTree

from ._notes import collected, warn
from ._validation import as_points, check_backend, check_image, split_masked
from .cross_validation import cross_validate
from .errors import CcdgridError
from .gcv import KERNEL_NAMES
from .gridfit import _check_pitch, centred_grid, fit_grid
from .lattice import index_holes
from .lit_edge import soft_edge_rows
from .maps import displacement_maps, map_outputs
from .peaks import GIVE_UP_ABOVE, MIN_HOLES, TooManyCandidates, find_holes
from .polarity import check_polarity, invert

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """Everything one calibration produced.

    Attributes
    ----------
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.
    pitch : float, m
        Hole spacing of the plate.
    pixel_size : tuple of 2 float, m
        ``(pixel1, pixel2)``: pixel size along y and x (pyFAI's order).
    holes : ccdgrid.peaks.HoleSearch
        Result of the hole search (centres, rejected candidates, threshold,
        smoothed image, timings).
    lattice : ccdgrid.lattice.LatticeIndex
        Lattice indices of the holes and rejected peaks with reasons.
    grid : ccdgrid.gridfit.GridFit
        Fitted affine grid and displacement at the indexed holes.
    maps : ccdgrid.maps.DisplacementMaps
        Corner maps, mask, smoothing used.
    dx, dy : ndarray of shape (ny + 1, nx + 1), float32, px
        Displacement at the pixel corners (corner ``(i, j)`` at index
        coordinates ``(i - 0.5, j - 0.5)``); true position = nominal +
        ``(dy, dx)``, as pyFAI's ``Detector.set_dx``/``set_dy``.
    mask : ndarray of shape (ny, nx), int8
        1 for pixels outside the area covered by holes (pyFAI's convention)
        or masked on input.
    timings : dict of str to float, s
        Wall time per stage: ``"read"``, ``"find_holes"``, ``"index_holes"``,
        ``"fit_grid"``, ``"displacement_maps"``, ``"total"`` (the
        cross-validation's own time is ``cross_validation.seconds``).
    params : dict
        Every option used, with the values the stages resolved (threshold,
        hole diameter, pitch in px, smoothing).
    cross_validation : ccdgrid.cross_validation.CrossValidation or None
        k-fold cross-validated error of the maps at the holes (None when
        disabled or when there are too few holes). Its RMS includes the
        centre error of the left-out holes: an upper bound on the maps'
        error at the holes, and the figure to quote as the accuracy (the
        residual of the full fit, ``maps.fit_residual_rms``, is only what the
        smoothing removed).
    source : dict or None
        When the image came from a file, :func:`ccdgrid.io.read_image`'s
        ``info`` (at least ``"path"`` and ``"sha256"``); for an array, the
        ``source`` name given as ``{"path": name, "sha256": None}``.
    """

    shape: tuple
    pitch: float
    pixel_size: tuple
    holes: object
    lattice: object
    grid: object
    maps: object
    dx: np.ndarray
    dy: np.ndarray
    mask: np.ndarray
    timings: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    source: object = None
    cross_validation: object = None

    def save(self, path):
        """Write the detector definition file (see :func:`ccdgrid.detector_file.save_detector`)."""
        from .detector_file import save_detector

        return save_detector(path, self)

    def displacement_at(self, points):
        """``(dy, dx)`` (M, 2) px at ``(y, x)`` points (M, 2), bilinear on the corner maps."""
        return self.maps.evaluate(points)

    def summary(self):
        """A few lines for humans: holes, grid, pixel size, residuals, timings."""
        holes, lattice, grid = self.holes, self.lattice, self.grid
        pitch_px = float(np.mean(np.hypot(grid.vectors[:, 0], grid.vectors[:, 1])))
        lines = [
            f"image {self.shape[0]} x {self.shape[1]} px"
            + (f", {os.path.basename(self.source['path'])}" if self.source else ""),
            f"holes found: {len(holes.peaks)}{_polarity_text(self.params)}; candidates "
            "rejected: " + _count_text(getattr(holes, "reasons", ())),
            f"holes indexed: {lattice.n_valid}; peaks rejected: " + _count_text(lattice.reasons),
            "grid vectors (y, x) px: i -> ({:.3f}, {:.3f}), j -> ({:.3f}, {:.3f})".format(
                *grid.vectors.ravel()
            ),
            f"pixel size: {self.pixel_size[0] * 1e6:.3f} x {self.pixel_size[1] * 1e6:.3f} µm "
            f"(y x) for a {self.pitch * 1e3:g} mm pitch" + _frame_text(grid),
            f"distortion at the holes (ideal - measured): RMS {grid.residual_rms:.3f} px, "
            f"max {grid.residual_max:.3f} px "
            f"({grid.residual_rms / pitch_px:.4f} / {grid.residual_max / pitch_px:.4f} pitch)",
            f"grid fit: {grid.method_used} (RMS lsq {grid.rms_lsq:.4f} px, "
            f"seed {grid.rms_seed:.4f} px)",
            f"maps: {_kernel_name(self.maps)} (trend degree {self.maps.degree}), "
            f"smoothing {self.maps.smoothing:.3g} {_smoothing_unit(self.maps)}"
            f"{_local_text(self.maps)}, "
            f"residual at the holes {self.maps.fit_residual_rms:.4f} px; "
            f"{int(np.count_nonzero(self.mask))} pixels masked "
            f"({np.count_nonzero(self.mask) / max(self.mask.size, 1):.1%} of the image)",
            self._cross_validation_line(pitch_px),
            "time: " + ", ".join(f"{k} {v:.3f} s" for k, v in self.timings.items()),
        ]
        return "\n".join(lines)

    def _cross_validation_line(self, pitch_px):
        cv = self.cross_validation
        if cv is None:
            return "accuracy (cross-validated): not measured"
        return (
            f"accuracy, {cv.folds_text()} cross-validated at {cv.n_evaluated} holes "
            f"(upper bound: includes each hole's centre error): RMS {cv.rms_px:.4f} px, "
            f"max {cv.max_px:.4f} px ({cv.rms_px / pitch_px:.5f} / "
            f"{cv.max_px / pitch_px:.5f} pitch)"
        )


def calibrate(
    image,
    *,
    pitch=None,
    mask=None,
    hole_diameter=None,
    pitch_px=None,
    threshold=None,
    smoothing=None,
    backend="cython",
    source=None,
    cv_folds=5,
    previous=None,
    polarity="auto",
):
    """Measure a detector's spatial distortion from one grid-of-holes image.

    Parameters
    ----------
    image : array_like of shape (ny, nx) or str or os.PathLike
        The grid image, or a file :func:`ccdgrid.io.read_image` reads (EDF,
        TIFF, CBF, HDF5, ...).
    pitch : float or None, m
        Hole spacing of the plate. None: the previous calibration's pitch
        when ``previous`` is given, else 5 mm (the usual FReLoN plate).
    mask : array_like of shape (ny, nx) or None
        Nonzero (or NaN) for pixels to ignore (pyFAI's convention); the mask
        of a numpy masked array ``image`` is added to it.
    hole_diameter : float or None, px
        Hole diameter on the image; None: estimated.
    pitch_px : float or None, px
        Hole spacing on the image; None: estimated.
    threshold : float or None
        Hole-detection threshold (log10 contrast); None: automatic.
    smoothing : float, "auto" or None
        Thin-plate smoothing of the maps in pitch² units; None: by GCV.
    backend : {"cython", "numpy"}
        Engine of the compiled kernels.
    cv_folds : int or None
        Folds of the cross-validation of the maps
        (:func:`ccdgrid.cross_validation.cross_validate`, about 0.05 s for
        400 holes); 0 or None skips it.
    source : str, dict or None
        What to record as the image's origin for an in-memory image: a name,
        or the ``info`` dict of :func:`ccdgrid.io.read_image` (path, sha256,
        frame, ...). For a path, the file's own information is used.
    previous : Calibration, ccdgrid.detector_file.DetectorRecord, str or None
        A previous calibration of the same detector (or its detector file):
        recalibrate warm from it with :func:`ccdgrid.warmstart.recalibrate`
        (``hole_diameter``, ``pitch_px`` and ``threshold`` are then taken
        from it; a cold calibration is made, with a warning, if the plate
        moved too far). Its polarity is used, whatever ``polarity`` says.
    polarity : {"auto", "bright", "dark"}
        Whether the holes are brighter than the plate (a metal plate's holes
        let the beam through) or darker (absorbing dots on a transparent
        sheet; see :mod:`ccdgrid.polarity`). "auto" calibrates the image as
        bright holes and, when that is refused or the lattice cells' middles
        lie far below the holes' background (the "holes" found were then the
        plate between dark ones), calibrates its negative too and keeps it
        if it stands and its maps predict holes left out no worse (when the
        search as bright holes drowns in candidates, the negative is tried
        first); only the kept calibration's warnings are shown.
        ``params["polarity"]`` records the polarity used.

    Returns
    -------
    Calibration
        A :class:`ccdgrid.warmstart.WarmCalibration` (with ``drift``) when
        ``previous`` is given.

    Raises
    ------
    CcdgridError
        Bad input, an unreadable file, or too few holes at any stage.
    """
    image, mask = split_masked(image, mask)
    polarity = check_polarity(polarity)
    if previous is not None:
        from .warmstart import recalibrate

        # its warnings are issued again from here, so that they name the
        # caller's line rather than this one (also when it raises)
        notes = []
        try:
            with collected() as notes:
                return recalibrate(
                    image,
                    previous,
                    pitch=pitch,
                    mask=mask,
                    smoothing=smoothing,
                    backend=backend,
                    source=source,
                    cv_folds=cv_folds,
                )
        finally:
            for note in notes:
                warn(note.message, note.category, stacklevel=2)
    check_backend(backend)
    cv_folds = _check_folds(cv_folds)
    # checked before the (long) hole search, not when the grid fit needs it
    pitch = _check_pitch(5e-3 if pitch is None else pitch)
    t_start = time.perf_counter()
    if isinstance(image, (str, os.PathLike)):
        image, source = _read(os.fspath(image))
    elif isinstance(source, dict):
        source = dict(source)
    elif source is not None:
        source = {"path": str(source), "sha256": None}
    # checked here, not by each polarity's hole search: a bad array is not
    # retried as its negative
    image = check_image(image)
    read = time.perf_counter() - t_start
    options = {
        "mask": mask,
        "hole_diameter": hole_diameter,
        "pitch_px": pitch_px,
        "threshold": threshold,
        "pitch": pitch,
        "smoothing": smoothing,
        "backend": backend,
        "cv_folds": cv_folds,
        "source": source,
    }
    cal, notes = _calibrate_polarity(image, polarity, read, options)
    for note in notes:
        warn(note, UserWarning, stacklevel=2)
    return cal


# With polarity="auto", the search as bright holes gives up at this many
# times more candidates than the image can hold holes (see _calibrate_polarity)
_GIVE_UP_ABOVE = 10.0


class _Attempt:
    """One polarity's calibration: its result or error, and what it cost (s)."""

    def __init__(self, image, polarity, read, options, give_up=False):
        self.polarity = polarity
        self.cal, self.below, self.notes, self.error = None, None, [], None
        t0 = time.perf_counter()
        token = GIVE_UP_ABOVE.set(_GIVE_UP_ABOVE if give_up else None)
        try:
            self.cal, self.below, self.notes = _calibrate_as(image, polarity, read, **options)
        except CcdgridError as exc:
            self.error = exc
        finally:
            GIVE_UP_ABOVE.reset(token)
        self.seconds = time.perf_counter() - t0

    @property
    def gave_up(self):
        return isinstance(self.error, TooManyCandidates)

    @property
    def stands(self):
        """Calibrated, and not on the plate between holes of the other polarity."""
        return self.cal is not None and not _looks_inverted(self.below)

    def kept(self, *others):
        """The calibration, its timings counting the ``others`` tried (None: not tried)."""
        cal = self.cal
        spent = {}
        for other in others:
            if other is not None and other is not self:
                name = f"as {other.polarity} holes" + (" (gave up)" if other.gave_up else "")
                spent[name] = spent.get(name, 0.0) + other.seconds
        cal.timings = {**spent, **cal.timings}
        cal.timings["total"] += sum(spent.values())
        return cal


def _calibrate_polarity(image, polarity, read, options):
    """A cold calibration with ``polarity`` (see :func:`calibrate`): ``(Calibration, notes)``.

    ``notes``: what :func:`calibrate` warns its caller of, kept apart rather
    than issued: with "auto", those of a calibration not kept are dropped (a
    user of a dark plate should not read about the misfits of its
    negative). Collected by hand, not with ``warnings.catch_warnings``,
    which changes the whole process's warning state and is not thread-safe.

    With "auto", the search as bright holes gives up early when it holds
    many more candidate peaks than the image can hold holes: the noise of a
    bright plate between dark holes (30 000 candidates for 1 000 holes, 13 s
    to a useless result at 2048²), or the hot pixels of a plate of bright
    holes, before they are left out (3 000 at 2048²). The negative is then
    calibrated first, giving up likewise; it is kept at once if it stands
    without a warning (the negative of a plate of bright holes does not
    stand: the middles of its lattice's cells are the holes). Otherwise the
    image is calibrated as bright holes in full, and the choice is made as
    without giving up.
    """
    if polarity != "auto":
        cal, below, notes = _calibrate_as(image, polarity, read, **options)
        return cal, notes + _inverted_note(below, polarity)
    bright = _Attempt(image, "bright", read, options, give_up=True)
    dark, tried = None, []
    if bright.gave_up:
        early = _Attempt(image, "dark", read, options, give_up=True)
        if early.stands and not early.notes:
            return early.kept(bright), early.notes
        tried.append(bright)
        if early.gave_up:
            tried.append(early)
        else:
            dark = early  # complete: it never reached the limit
        bright = _Attempt(image, "bright", read, options)
    if bright.stands:
        return bright.kept(*tried, dark), bright.notes
    if dark is None:
        dark = _Attempt(image, "dark", read, options)
    if dark.stands and _no_worse(dark.cal, bright.cal):
        return dark.kept(*tried, bright), dark.notes
    if bright.error is not None:
        raise bright.error
    notes = bright.notes + _inverted_note(bright.below, "bright", other_tried=True)
    return bright.kept(*tried, dark), notes


def _no_worse(dark, bright):
    """Whether the calibration as dark holes predicts holes left out as well as the bright one.

    The bright web between large dark holes is a lattice too, and may
    calibrate: on a fuzz plate of 0.64-pitch dark holes, the web's maps
    predicted a hole left out to 0.10 px, the dark holes' (fewer, cut by a
    lit edge) to 1.4 px.
    """
    if bright is None:
        return True
    cv_dark, cv_bright = dark.cross_validation, bright.cross_validation
    if cv_dark is None or cv_bright is None:
        return True
    return not cv_dark.rms_px > cv_bright.rms_px


def _calibrate_as(
    image,
    polarity,
    read,
    *,
    mask,
    hole_diameter,
    pitch_px,
    threshold,
    pitch,
    smoothing,
    backend,
    cv_folds,
    source,
):
    """One cold calibration, of ``image`` as is ("bright") or of its negative ("dark").

    Returns ``(Calibration, below, notes)``: ``below`` is how far the
    lattice cells' middles lie below the holes' background, in hole
    contrasts (None when too few cells were measured; see
    :func:`_dark_between`), ``notes`` the warnings for the caller (str).
    """
    timings = {"read": read}
    t_start = time.perf_counter() - read
    if polarity == "dark":
        t0 = time.perf_counter()
        image = invert(image, mask)
        timings["invert"] = time.perf_counter() - t0

    holes = _timed(
        timings,
        "find_holes",
        find_holes,
        image,
        mask=mask,
        hole_diameter=hole_diameter,
        pitch_px=pitch_px,
        threshold=threshold,
        backend=backend,
    )
    shape = tuple(int(v) for v in np.shape(image))
    # the maps' memory is mapped on the idle core while the holes are indexed
    outputs = map_outputs(shape)
    peaks = as_points(holes.peaks, "peaks")
    lattice = _timed(timings, "index_holes", index_holes, peaks, pitch_px=holes.pitch_px)
    lattice = _without_soft_edge_holes(peaks, lattice, holes, shape)
    options = {"pitch": pitch, "smoothing": smoothing, "cv_folds": cv_folds, "backend": backend}
    grid, maps, cv = _fit(peaks, lattice, shape, timings=timings, outputs=outputs, **options)
    fitted = peaks[lattice.valid]
    gross = _gross_misses(cv, lattice.pitch_px, fitted)
    if gross.size and cv.folds_evaluated < cv.k:
        # a bad hole in a fold not evaluated pulls the maps at its neighbours,
        # which then miss when left out, while it is never judged: every fold
        # is evaluated before holes are dropped (a 4 px corner hole at 2048²
        # left the maps 2.1-2.3 px off with 2 of 5 folds); the folds already
        # evaluated are solved again from their factors
        cv = _cross_validation(fitted, grid, maps, cv_folds, previous=cv, max_holes=None)
        gross = _gross_misses(cv, lattice.pitch_px, fitted)
    if gross.size:
        # a gross centring error the hole and lattice tests let through (a
        # hole with few neighbours, straddling a filter's edge; its error may
        # have made good neighbours look like outliers to the lattice's local
        # test): the holes are indexed again without it, and fitted again
        t0 = time.perf_counter()
        lattice = _index_without(
            peaks, np.flatnonzero(lattice.valid)[gross], lattice, "unpredicted"
        )
        grid, maps, cv = _fit(peaks, lattice, shape, timings={}, **options)
        timings["refit"] = time.perf_counter() - t0
    valid = lattice.valid
    notes = _predictive_notes(cv, lattice.pitch_px)
    below = _dark_between(image, holes, grid, valid)
    out_mask = _output_mask(maps.mask, mask, holes.defects)
    timings["total"] = time.perf_counter() - t_start
    params = {
        "pitch": float(pitch),
        "mask": mask is not None,
        "hole_diameter": hole_diameter,
        "pitch_px": pitch_px,
        "threshold": threshold,
        "smoothing": smoothing,
        "backend": backend,
        "cv_folds": cv_folds,
        "polarity": polarity,
        "resolved": {
            "hole_diameter": float(holes.hole_diameter),
            # the typical profile's blur: a warm start from this calibration's
            # file starts its hole fits from it (and sizes its windows with it)
            "hole_blur": float(np.median(holes.width[valid, 1])),
            "pitch_px": float(holes.pitch_px),
            "threshold": float(holes.threshold),
            "lattice_tolerance": lattice.tolerance,
            "outlier_threshold_px": lattice.outlier_threshold_px,
            "smoothing": maps.smoothing,
            **_fit_params(maps, grid),
        },
    }
    return (
        Calibration(
            shape=shape,
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
        ),
        below,
        notes,
    )


def _fit(peaks, lattice, shape, *, pitch, smoothing, cv_folds, backend, timings, outputs=None):
    """``(grid, maps, cross-validation)`` of the holes ``lattice`` accepts, checked plausible.

    ``outputs``: the maps' memory (:func:`ccdgrid.maps.map_outputs`) or None.
    """
    valid = lattice.valid
    grid = _timed(
        timings,
        "fit_grid",
        _centred_fit,
        peaks[valid],
        lattice.indices[valid],
        shape,
        pitch=pitch,
        backend=backend,
    )
    maps = _timed(
        timings,
        "displacement_maps",
        displacement_maps,
        peaks[valid],
        grid.displacement,
        shape,
        smoothing=smoothing,
        scale_px=lattice.pitch_px,
        outputs=outputs,
        backend=backend,
    )
    _check_plausible(grid, maps, lattice.pitch_px, lattice.n_valid, _found(lattice, len(peaks)))
    return grid, maps, _cross_validation(peaks[valid], grid, maps, cv_folds)


def _centred_fit(peaks, indices, shape, *, pitch, backend):
    """The grid fitted to the holes, seen at the image centre (``gridfit.centred_grid``)."""
    return centred_grid(fit_grid(peaks, indices, pitch=pitch, backend=backend), peaks, shape)


def _polarity_text(params):
    if isinstance(params, dict) and params.get("polarity") == "dark":
        return " (dark holes on a bright plate, measured on the image's negative)"
    return ""


def _frame_text(grid):
    """Where the lattice is the plate's (see ``gridfit.centred_grid``), as text."""
    frame = getattr(grid, "frame", None)
    if not frame:
        return ""
    y, x = frame["centre"]
    shear = frame.get("shear_deg", 0.0)
    if abs(shear) < 0.0005:
        return f", the lattice's at ({y:.1f}, {x:.1f}) px (no distortion there)"
    # the plate is square: a shear seen there is the detector's (see gridfit._squared)
    return (
        f", the lattice's at ({y:.1f}, {x:.1f}) px, squared (no distortion there "
        f"but its {shear:+.3f} deg of shear)"
    )


def _check_folds(cv_folds):
    if cv_folds is None or (isinstance(cv_folds, (int, np.integer)) and cv_folds == 0):
        return 0
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, (int, np.integer)) or cv_folds < 2:
        raise CcdgridError(f"`cv_folds` must be 0, None or an integer >= 2, got {cv_folds!r}")
    return int(cv_folds)


def _cross_validation(points, grid, maps, cv_folds, previous=None, **options):
    """k-fold cross-validated map error at the holes, or None (``cv_folds`` 0, too few holes).

    ``previous``: a CrossValidation whose folds' factors a refit may reuse
    (see :func:`ccdgrid.cross_validation.cross_validate`); ``options``: more
    of its arguments (``max_holes=None``: every fold).
    """
    if not cv_folds:
        return None
    try:
        return cross_validate(
            points,
            grid.displacement,
            k=min(cv_folds, len(grid.displacement)),
            indices=grid.indices,
            method=maps.method,
            smoothing=maps.smoothing,
            degree=maps.degree,
            order=maps.order,
            scale_px=maps.scale_px,
            # the maps were fitted to these holes with these settings: no second full fit
            in_sample_rms=maps.fit_residual_rms if maps.method == "tps" else None,
            previous=previous,
            **options,
        )
    except CcdgridError:
        # a diagnostic only: too few holes to leave some out must not fail the calibration
        return None


# Beyond these, what was indexed is not a plate's grid seen through a
# detector (noise, or another pattern, with the hole size and spacing forced):
# a 60 px barrel at a 60 px pitch moves holes by 0.26 pitch RMS from the
# lattice of the centre, a 90 px one at a 40 px pitch by 0.56, and smooth
# maps meet real holes to their centring noise (< 0.005 pitch).
_MAX_DISTORTION_PITCH = 2.0
_MAX_MAP_MISFIT_PITCH = 0.1
# The maps of a real plate predict a hole left out to its centring noise
# (0.0002-0.006 pitch RMS on every generated plate, down to a peak SNR of 7),
# where streaks taken for holes left 0.06 pitch.
_MAX_CV_PITCH = 0.03
# ... and a calibration whose holes are predicted worse than this, or worse
# than _WARN_CV_PX whatever the pitch, is kept, with a warning. Of 400 random
# plates of an independent generator (benchmarks/fuzz.py), those within
# 0.05 px RMS of the truth were cross-validated at 0.033 px (median), 0.21 px
# (99th percentile) and never above 0.36 px; 11 of the 37 off by more (bright
# holes) were above 0.3 px, 6 of them without a word (146 px pitch: 0.78 px
# is 0.0054 pitch)
_WARN_CV_PITCH = 0.01
_WARN_CV_PX = 0.3


def _fit_params(maps, grid):
    """The maps' and grid fit's choices a detector file records (``params["resolved"]``).

    What a warm start or a validation from the file fits again with.
    """
    return {
        "map_degree": maps.degree,
        "map_order": maps.order,
        "map_method": maps.method,
        "grid_method": grid.method_used,
    }


def _kernel_name(maps):
    """``"tps"`` (kernel ``r² log r``), ``"tps3"`` (``-r⁴ log r``) or the method's name."""
    return KERNEL_NAMES.get(maps.order, maps.method) if maps.method == "tps" else maps.method


def _smoothing_unit(maps):
    """The unit of the maps' smoothing: pitch² for kernel order 2, pitch⁴ for order 3."""
    return "pitch⁴" if maps.order == 3 else "pitch²"


def _local_text(maps):
    """What the summary says of a smoothing lowered for a local feature (see maps)."""
    local = (maps.smoothing_scores or {}).get("local")
    if not local:
        return ""
    first = local[0]
    return (
        f" (GCV's on part of the holes lowered for a local misfit, {first['z']:.0f} times "
        f"its noise, at ({first['at'][0]:.0f}, {first['at'][1]:.0f}) px)"
    )


def _found(lattice, n_peaks):
    """The holes found that count for :func:`_check_indexed`: those left out on
    purpose (a soft lit edge) are no sign that the others do not form a grid."""
    return n_peaks - sum(reason == _SOFT_EDGE for reason in lattice.reasons)


def _check_indexed(n_indexed, n_found):
    """Raise CcdgridError unless most of the ``n_found`` holes, and enough, fit one lattice."""
    if n_found and 2 * n_indexed <= n_found:
        raise CcdgridError(
            f"the holes found do not form a grid: only {n_indexed} of {n_found} fit one "
            f"lattice; is there a grid of holes of this size and spacing in the image?"
        )
    if n_indexed < MIN_HOLES:
        raise CcdgridError(
            f"too few holes to map a distortion: {n_indexed} fit one lattice, at least "
            f"{MIN_HOLES} are needed"
        )


def _check_plausible(grid, maps, pitch_px, n_indexed=None, n_found=None):
    """Raise CcdgridError when the holes indexed do not look like a distorted grid.

    ``grid.residual_rms`` is the RMS distortion at the holes and
    ``maps.fit_residual_rms`` what the smooth maps leave of it, both px;
    ``pitch_px`` the hole spacing on the image; ``n_indexed`` of the
    ``n_found`` holes fit the lattice (on a grid image nearly all do).
    """
    if n_indexed is not None:
        _check_indexed(n_indexed, n_found)
    distortion = grid.residual_rms / pitch_px
    misfit = maps.fit_residual_rms / pitch_px
    if distortion > _MAX_DISTORTION_PITCH or misfit > _MAX_MAP_MISFIT_PITCH:
        raise CcdgridError(
            f"the holes found do not form a distorted grid: the distortion at them is "
            f"{distortion:.2f} pitch RMS and smooth maps miss them by {misfit:.2f} pitch RMS "
            f"(a grid image gives < {_MAX_DISTORTION_PITCH:g} and < {_MAX_MAP_MISFIT_PITCH:g}); "
            f"is there a grid of holes of this size and spacing in the image?"
        )


# A hole that maps fitted without it miss by this many times the median miss,
# and by this fraction of the pitch, is a gross error: 6 px where the others
# are missed by 0.04 (median) to 0.7 px on a reviewer's plate with a strong
# S-shaped field. More than this fraction of such holes is a feature of the
# field the maps cannot follow (a taper step), not bad holes: all are kept.
_GROSS_MISS_RATIO = 20.0
_GROSS_MISS_PITCH = 0.02
_GROSS_MAX_FRACTION = 0.02
# Below that fraction of the pitch a hole is still a gross error when it
# stands alone: missed by _ISOLATED_MISS_RATIO times the median miss of its
# _ISOLATED_NEIGHBOURS nearest fitted holes (a feature of the field the maps
# cannot follow is missed at its neighbours too), by _GROSS_MISS_RATIO
# times the plate's median and by _ISOLATED_MISS_PITCH of the pitch. Fuzz
# plates 145 and 248: one hole missed by 0.52 px (0.009 pitch, 38 times the
# median, 16 times its neighbours') and 0.80 px (0.0065 pitch; 5.1 times
# its neighbours', whose misses it raised) left the maps 0.51 and 1.31 px
# off the truth there.
_ISOLATED_MISS_PITCH = 0.004
_ISOLATED_MISS_RATIO = 4.0
_ISOLATED_NEIGHBOURS = 8


# Never fewer holes than this fraction are kept by the lit-edge rule: a lit
# disc of a few pitches has most of its holes near the rim, and a quarter
# of them still gave maps 0.015-0.06 px off on the fuzz plates (and covered
# 8-25 % of the lit area); the rule stops before crossing it.
_SOFT_EDGE_KEEP = 0.25
_SOFT_EDGE = "soft hole at a lit edge"  # a lattice.REASONS key
# rejections a refit of the lattice must keep (see _index_without)
_DELIBERATE = (_SOFT_EDGE, "unpredicted")


def _without_soft_edge_holes(peaks, lattice, holes, shape):
    """``lattice`` without the soft holes a lit-area edge biases (see :mod:`ccdgrid.lit_edge`).

    Never fewer than a quarter of the holes (``_SOFT_EDGE_KEEP``), nor fewer
    than ``MIN_HOLES``, are kept. In a small lit disc most holes are near
    its rim: of 43 Lorentzian holes 96 px apart in a 450 px disc, 13 are
    kept and cover 8 % of the lit area, 0.06 px RMS off the truth, against
    0.13 px (1 px at most) with all of them.
    """
    n_valid = int(np.count_nonzero(lattice.valid))
    rows = soft_edge_rows(
        peaks,
        lattice.indices,
        lattice.valid,
        lattice.vectors,
        holes.amplitude,
        holes.width,
        shape,
        margin=0.5 * holes.pitch_px,
        min_left=max(MIN_HOLES, int(np.ceil(_SOFT_EDGE_KEEP * n_valid))),
    )
    if rows.size == 0:
        return lattice
    # the holes left are those the lattice accepted: no second indexing (0.2 s
    # at 4096², and it could take back rim holes it had rejected)
    return _lattice_without(lattice, rows, _SOFT_EDGE)


def _gross_misses(cv, pitch_px, points=None):
    """Rows of the fitted holes whose cross-validated miss is gross, (K,) int64.

    ``points`` (N, 2) px: the fitted holes, in the rows of ``cv``; with
    them, when no miss is gross, a hole missed alone among its neighbours
    counts from a smaller miss (see ``_ISOLATED_MISS_PITCH``).
    """
    none = np.zeros(0, dtype=np.int64)
    if cv is None:
        return none
    miss = np.hypot(cv.residuals[:, 0], cv.residuals[:, 1])
    finite = np.isfinite(miss)
    if np.count_nonzero(finite) < 10:
        return none
    typical = _GROSS_MISS_RATIO * float(np.median(miss[finite]))
    gross = finite & (miss > max(typical, _GROSS_MISS_PITCH * pitch_px))
    # only without a gross miss: a hole missed by pitches pulls the maps
    # fitted without its neighbours, up to two rings of holes around it
    if points is not None and len(points) > _ISOLATED_NEIGHBOURS and not gross.any():
        alone = np.flatnonzero(finite & (miss > max(typical, _ISOLATED_MISS_PITCH * pitch_px)))
        if alone.size:
            _, near = cKDTree(points).query(points[alone], k=_ISOLATED_NEIGHBOURS + 1)
            around = miss[near[:, 1:]]
            # the largest miss of its neighbourhood: a bad hole's neighbours
            # are missed more too (it pulls the maps fitted without them)
            worst = miss[alone] >= np.nanmax(around, axis=1, initial=0.0)
            far = miss[alone] > _ISOLATED_MISS_RATIO * np.nanmedian(around, axis=1)
            gross[alone[worst & far]] = True
    gross = np.flatnonzero(gross)
    if gross.size > max(1.0, _GROSS_MAX_FRACTION * miss.size):
        return none
    return gross


def _index_without(peaks, rows, lattice, reason):
    """The peaks indexed again without ``rows``, which are rejected for ``reason``.

    A LatticeIndex over all of ``peaks`` (the rows keep their numbers). The
    new indexing may give back holes the first rejected, not reject holes
    the first accepted: then ``lattice`` is kept without ``rows`` instead
    (:func:`_lattice_without`). The holes ``lattice`` left out on purpose
    (``_DELIBERATE`` reasons) stay out with their reasons: indexing all the
    other peaks again gave back the soft holes of a lit rim when a gross
    miss was dropped after them.
    """
    rows = np.asarray(rows, dtype=np.int64)
    before = [
        (int(r), why)
        for r, why in zip(lattice.rejected, lattice.reasons, strict=True)
        if why in _DELIBERATE
    ]
    out = np.concatenate([rows, np.array([r for r, _ in before], dtype=np.int64)])
    keep = np.ones(len(peaks), dtype=bool)
    keep[out] = False
    kept = np.flatnonzero(keep)
    again = index_holes(peaks[kept], pitch_px=lattice.pitch_px)
    valid = np.zeros(len(peaks), dtype=bool)
    valid[kept] = again.valid
    if not np.all(valid[lattice.valid & keep]):
        # the new indexing judged holes the first one accepted to be outliers
        # (it had lost the good holes that tied them to the lattice, and may
        # have taken back a bad one the first had rejected: a corner hole
        # 4 px off left the maps 3.7 px from the truth instead of 0.08)
        return _lattice_without(lattice, rows, reason)
    indices = np.full((len(peaks), 2), -1, dtype=np.int64)
    indices[kept] = again.indices
    rejected = np.concatenate([kept[again.rejected], out])
    reasons = list(again.reasons) + [reason] * len(rows) + [why for _, why in before]
    rejected, reasons = _in_order(rejected, reasons)
    return replace(
        again,
        indices=indices,
        valid=valid,
        rejected=rejected,
        reasons=reasons,
        start=int(kept[again.start]),
    )


def _lattice_without(lattice, rows, reason):
    """``lattice`` with its valid ``rows`` rejected for ``reason``, not indexed again.

    The indices of the holes left are shifted to start at 0 (the origin
    moves with them), as an indexing gives them.
    """
    rows = np.asarray(rows, dtype=np.int64)
    valid = lattice.valid.copy()
    valid[rows] = False
    indices = np.where(valid[:, None], lattice.indices, -1)
    shift = indices[valid].min(axis=0)
    indices[valid] -= shift
    rejected = np.concatenate([lattice.rejected, rows]).astype(np.int64)
    reasons = list(lattice.reasons) + [reason] * len(rows)
    rejected, reasons = _in_order(rejected, reasons)
    return replace(
        lattice,
        indices=indices,
        valid=valid,
        rejected=rejected,
        reasons=reasons,
        origin=lattice.origin + shift @ lattice.vectors,
    )


def _in_order(rejected, reasons):
    """Rejected rows sorted (as an indexing lists them), with their reasons."""
    order = np.argsort(rejected, kind="stable")
    return rejected[order], [reasons[k] for k in order]


def _predictive_notes(cv, pitch_px):
    """Raise CcdgridError when the maps cannot predict a hole left out (``cv`` may be None).

    Returns the warning (a list of 0 or 1 str) when they predict it poorly,
    for :func:`calibrate` to issue.
    """
    if cv is None or not np.isfinite(cv.rms_px):
        return []
    if cv.rms_px > _MAX_CV_PITCH * pitch_px:
        raise CcdgridError(
            f"the holes found do not form a smoothly distorted grid: maps fitted without a "
            f"hole miss it by {cv.rms_px:.3g} px RMS, {cv.rms_px / pitch_px:.2f} pitch (a grid "
            f"image gives < {_MAX_CV_PITCH:g}); is there a grid of holes of this size and "
            f"spacing in the image?"
        )
    if cv.rms_px > min(_WARN_CV_PITCH * pitch_px, _WARN_CV_PX):
        # a lit disc holding 29 holes gave maps 1.1 px RMS (7.9 px max) off the
        # truth, which this figure (2.5 px) showed and nothing said
        return [
            f"the maps miss a hole left out of their fit by {cv.rms_px:.3g} px RMS "
            f"({cv.rms_px / pitch_px:.4f} pitch; well measured plates give ~0.03 px, and "
            "< 0.006 pitch): too few holes, noisy or biased holes "
            "(by a lit-area edge, say) or a field that varies faster than the holes sample "
            "it; see the report's panels (g) and (h)"
        ]
    return []


def _dark_between(image, holes, grid, valid):
    """How far the image between the holes found lies below their background, in contrasts.

    On a plate whose holes are bright, the middle of a lattice cell is
    background. On an image of dark holes on a bright plate, the "holes"
    found are the bright plate between them and the cells' middles are the
    dark holes: half a hole's contrast or more below the background
    (measured: 4 to 26 contrasts below on such images, within 0.06 on 25
    bright-hole plates). Such a calibration was returned 1.2 px off in
    silence. Returns None when fewer than ``MIN_HOLES`` holes or middles
    can be measured, or when the holes' median contrast is not positive.
    """
    amplitude = np.asarray(holes.amplitude, dtype=np.float64)[valid]
    if amplitude.size < MIN_HOLES or not np.median(amplitude) > 0:
        return None
    centres = np.asarray(holes.peaks, dtype=np.float64)[valid]
    middles = np.rint(centres + 0.5 * (grid.vectors[0] + grid.vectors[1])).astype(np.int64)
    ny, nx = np.shape(image)
    inside = np.all((middles >= 0) & (middles < (ny, nx)), axis=1)
    levels = np.asarray(image)[middles[inside, 0], middles[inside, 1]].astype(np.float64)
    levels = levels[np.isfinite(levels)]
    if levels.size < MIN_HOLES:
        return None
    below = np.median(np.asarray(holes.background, dtype=np.float64)[valid]) - np.median(levels)
    return float(below / np.median(amplitude))


def _looks_inverted(below):
    return below is not None and below > 0.5


def _inverted_note(below, measured, other_tried=False):
    """The warning (a list of 0 or 1 str) for a calibration whose "holes" look like the plate.

    ``measured``: "bright" or "dark", the holes the calibration looked for;
    ``other_tried``: the other polarity was calibrated too and did no better.
    """
    if not _looks_inverted(below):
        return []
    other = "dark" if measured == "bright" else "bright"
    advice = (
        f"calibrated as {other} holes (polarity='{other}'), it did no better"
        if other_tried
        else f"calibrate with polarity='{other}' (--polarity {other}) or 'auto'"
    )
    return [
        f"the image between the holes found is {below:.1f} times their contrast below "
        f"their background: is it {other} holes on a {measured} plate? This calibration "
        f"measured {measured} holes; {advice}"
    ]


def _output_mask(maps_mask, user_mask, defects=None):
    """int8 (ny, nx), 1 = invalid: outside the holes' hull, masked by the user or a defect.

    ``defects``: the pixels the image shows unusable (``HoleSearch.defects``:
    dead lines, non-finite values), or None.
    """
    extra = [m for m in (user_mask, defects) if m is not None]
    if not extra:
        return maps_mask.astype(np.int8, copy=False)
    # the comparison's own (fresh) array becomes the output: no second full-size one
    out = np.not_equal(extra[0], 0).view(np.int8)
    np.bitwise_or(out, maps_mask, out=out)
    for more in extra[1:]:
        np.bitwise_or(out, more, out=out)
    return out


def _timed(timings, name, func, *args, **kwargs):
    t0 = time.perf_counter()
    result = func(*args, **kwargs)
    timings[name] = time.perf_counter() - t0
    return result


def _read(path):
    """``(image, info)`` of a file; ``info`` has at least "path" and "sha256"."""
    from .io import read_image

    array, info = read_image(path)
    return array, dict(info)


def _count_text(reasons):
    keys, counts = np.unique(np.asarray(list(reasons), dtype=str), return_counts=True)
    if len(keys) == 0:
        return "none"
    return ", ".join(f"{c} {k}" for k, c in zip(keys, counts, strict=True))
