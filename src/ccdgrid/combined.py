"""Joint calibration from several images of one grid plate at shifted positions.

The distortion belongs to the detector and stays put while the plate moves, so
``K`` images of the plate shifted by a few pixels up to a fraction of a pitch
sample the *same* displacement field at ``K`` times as many places, each with
its own centre errors (a hole sits on different fibres of the taper in every
image). :func:`calibrate_combined` fits them together:

* one lattice ``q(i, j) = origin + i a1 + j a2`` shared by all images, with the
  indices of every image brought into one frame;
* one plate offset ``t_k`` per image (``t_0 = 0``): hole ``(i, j)`` of image
  ``k`` has the ideal position ``q(i, j) + t_k``;
* one displacement field ``d = ideal - measured``, sampled at the measured
  positions of all the holes of all the images, fitted by one
  :func:`ccdgrid.maps.displacement_maps`.

Conventions as everywhere in ccdgrid: ``(y, x)`` index coordinates (centre of
pixel ``(i, j)`` at ``(i, j)``), corner maps ``(ny + 1, nx + 1)`` with corner
``(i, j)`` at ``(i - 0.5, j - 0.5)``; the true position of a corner is its
nominal position plus ``(dy, dx)``. Offsets are ``(y, x)`` px: the holes of
image ``k`` are where those of the first image are, plus ``offsets[k]``.
"""

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.interpolate import RBFInterpolator

from ._validation import as_image, check_backend
from .coverage import mask_border_gaps
from .cross_validation import cross_validate
from .errors import CcdgridError
from .gridfit import _check_pitch, centred_grid, fit_grid
from .lattice import index_holes
from .maps import displacement_maps
from .peaks import GIVE_UP_ABOVE
from .pipeline import (
    _GIVE_UP_ABOVE,
    Calibration,
    _check_folds,
    _check_indexed,
    _dark_between,
    _fit_params,
    _found,
    _looks_inverted,
    _without_soft_edge_holes,
    calibrate,
)
from .polarity import check_polarity, invert
from .thinplate import fit_tps

__all__ = ["CombinedCalibration", "CombinedPositions", "calibrate_combined"]

# The offsets are estimated on at most this many holes nearest the centre (two
# thin-plate fits, O(n³)); with K images that is 1500 / K holes per image.
_OFFSET_MAX_POINTS = 1500
_OFFSET_PASSES = 2
# Thin-plate smoothing (pitch² units) and trend degree of the smoother that
# separates the offsets from the field. Measured on generated 1024² images
# under strong distortion (3 images, 3 seeds): offset errors 0.001-0.0025 px
# for any smoothing from 1e-6 to 100.
_OFFSET_SMOOTHING = 1.0
_OFFSET_TREND_DEGREE = 3
# Above this many samples (all holes of all images) the thin-plate fit, O(n³)
# in time and O(n²) in memory, is made on the per-site means instead (one
# sample per hole, as for one image): 4000 samples is ~0.13 GB per kernel
# matrix and a few seconds; four 4096² images (~6800) would take ~0.4 GB each
# and tens of seconds.
_MAX_JOINT_POINTS = 4000
# Folds (of 5) on which the candidate map fits are scored
_CHOICE_FOLDS = 2
# Largest departure of a lattice step of image k from an integer combination
# of the first image's steps, and of a known offset from the grid's, in pitch
_ALIGN_TOLERANCE = 0.25


@dataclass
class CombinedPositions:
    """What the joint fit of several plate positions found, image by image.

    Attributes
    ----------
    n_images : int
        ``K``, the number of images.
    offsets : ndarray of shape (K, 2), float64, px
        ``(y, x)`` plate offset of each image relative to the first, used in
        the fit (the given ones when known, else :attr:`offsets_estimated`).
    offsets_given : bool
        True when the offsets were given.
    offsets_estimated : ndarray of shape (K, 2), float64, px
        Offsets measured from the images (always computed, also when given:
        their difference shows a stage that did not go where it was told).
        Unknown offsets are only defined modulo a lattice step; the one
        within half a step of zero (in lattice coordinates) is reported.
    index_shift : ndarray of shape (K, 2), int64
        Added to image ``k``'s own lattice indices (after ``index_matrix``)
        to put them in the common frame of ``Calibration.grid.indices``.
    index_matrix : ndarray of shape (K, 2, 2), int64
        Integer matrix taking image ``k``'s own ``(i, j)`` (row vector, on
        the left) to the common frame's axes; the identity unless the
        indexing of an image chose other lattice steps (e.g. opposite signs).
    image_of_hole : ndarray of shape (N,), int64
        Image each row of ``Calibration.grid.indices`` / ``displacement``
        came from.
    n_found : ndarray of shape (K,), int64
        Holes found in each image.
    n_indexed : ndarray of shape (K,), int64
        Holes indexed, i.e. used in the joint fit, per image.
    lattice_rms : ndarray of shape (K,), float64, px
        RMS of ``|ideal - measured|`` per image against the joint lattice
        (the distortion seen by that image's holes).
    fit_rms : ndarray of shape (K,), float64, px
        RMS of (combined map - displacement) at each image's holes.
    cv_rms : ndarray of shape (K,), float64, px
        Cross-validated residual of the combined map per image (NaN where no
        hole of that image was predicted, or cross-validation was off).
    single : Calibration or None
        The first image calibrated alone with the same options
        (:func:`ccdgrid.calibrate`), for comparison; None when not asked.
    holes : list of ccdgrid.peaks.HoleSearch
        The hole search of each image.
    lattices : list of ccdgrid.lattice.LatticeIndex
        The indexing of each image (its own frame).
    grids : list of ccdgrid.gridfit.GridFit
        Each image's own affine lattice fit.
    """

    n_images: int
    offsets: np.ndarray
    offsets_given: bool
    offsets_estimated: np.ndarray
    index_shift: np.ndarray
    index_matrix: np.ndarray
    image_of_hole: np.ndarray
    n_found: np.ndarray
    n_indexed: np.ndarray
    lattice_rms: np.ndarray
    fit_rms: np.ndarray
    cv_rms: np.ndarray
    single: object = None
    holes: list = field(default_factory=list, repr=False)
    lattices: list = field(default_factory=list, repr=False)
    grids: list = field(default_factory=list, repr=False)

    @property
    def single_cv_rms_px(self):
        """Cross-validated RMS of the first image calibrated alone, px (NaN if unknown)."""
        cv = getattr(self.single, "cross_validation", None)
        return float("nan") if cv is None else float(cv.rms_px)

    def summary(self):
        """A few lines for humans: one per image, then the comparison with one image."""
        lines = [
            f"combined {self.n_images} plate positions, offsets "
            + ("given" if self.offsets_given else "estimated")
            + " (y, x) px:"
        ]
        for k in range(self.n_images):
            oy, ox = self.offsets[k]
            ey, ex = self.offsets_estimated[k]
            given = f" (measured {ey:+.3f}, {ex:+.3f})" if self.offsets_given else ""
            lines.append(
                f"  image {k}: offset ({oy:+.3f}, {ox:+.3f}){given}; "
                f"{self.n_indexed[k]}/{self.n_found[k]} holes used; "
                f"map residual at its holes {self.fit_rms[k]:.4f} px, "
                f"cross-validated {self.cv_rms[k]:.4f} px"
            )
        if self.single is not None:
            lines.append(
                "first image alone: cross-validated RMS "
                + (
                    f"{self.single_cv_rms_px:.4f} px"
                    if np.isfinite(self.single_cv_rms_px)
                    else "not measured"
                )
            )
        return "\n".join(lines)

    def as_dict(self):
        """Plain JSON-able figures (stored in ``Calibration.params["combined"]``)."""
        return {
            "n_images": int(self.n_images),
            "offsets_px": self.offsets.tolist(),
            "offsets_given": bool(self.offsets_given),
            "offsets_estimated_px": self.offsets_estimated.tolist(),
            "index_shift": self.index_shift.tolist(),
            "n_found": self.n_found.tolist(),
            "n_indexed": self.n_indexed.tolist(),
            "lattice_rms_px": self.lattice_rms.tolist(),
            "fit_rms_px": self.fit_rms.tolist(),
            "cv_rms_px": [None if not np.isfinite(v) else float(v) for v in self.cv_rms],
            "single_cv_rms_px": (
                None if not np.isfinite(self.single_cv_rms_px) else self.single_cv_rms_px
            ),
        }


@dataclass
class CombinedCalibration(Calibration):
    """A :class:`~ccdgrid.pipeline.Calibration` made from several plate positions.

    The inherited fields describe the joint result: ``grid`` is the joint
    lattice fit over the holes of all images (``grid.indices`` in the common
    frame, ``grid.ideal`` including each image's offset), ``holes`` and
    ``lattice`` list the holes of all images one image after the other (the
    rows of ``holes.peaks[lattice.valid]`` are those of ``grid``), with the
    first image's search settings and smoothed image; ``maps``, ``dx``,
    ``dy``, ``mask`` and ``cross_validation`` are the combined map's.
    ``save()`` writes a normal detector file.

    Attributes
    ----------
    combined : CombinedPositions
        Offsets, per-image figures and the single-image comparison.
    """

    combined: object = None

    def summary(self):
        """The calibration's summary, then one line per plate position."""
        text = super().summary()
        return text if self.combined is None else text + "\n" + self.combined.summary()


def calibrate_combined(
    images,
    *,
    pitch=5e-3,
    offsets=None,
    mask=None,
    hole_diameter=None,
    pitch_px=None,
    threshold=None,
    smoothing=None,
    backend="cython",
    cv_folds=5,
    compare_single=True,
    sources=None,
    polarity="auto",
):
    """Calibrate a detector from several images of one grid plate at shifted positions.

    Parameters
    ----------
    images : sequence of array_like of shape (ny, nx), str or os.PathLike
        At least two images of the same plate on the same detector, as
        arrays or files :func:`ccdgrid.io.read_image` reads. All of one
        shape. The first is the reference: offsets are relative to it.
    pitch : float, m
        Hole spacing of the plate.
    offsets : array_like of shape (K, 2), float, px, or None
        Known ``(y, x)`` plate shifts of each image, in pixels of the
        detector: the holes of image ``k`` are where the first image's are
        plus ``offsets[k]``. If ``offsets[0]`` is not zero, every row is
        taken relative to it. They are used as given (fixed in the fit).
        None: estimated from the images.
    mask : array_like of shape (ny, nx), a sequence of K of them (or None), or None
        Nonzero for pixels to ignore (pyFAI's convention): one mask for all
        images (a detector mask), or one per image.
    hole_diameter, pitch_px, threshold : float or None
        As in :func:`ccdgrid.calibrate`, applied to every image (None:
        resolved per image).
    smoothing : float, "auto" or None
        Thin-plate smoothing of the combined maps, pitch² units; None: GCV.
    backend : {"cython", "numpy"}
        Engine of the compiled kernels.
    cv_folds : int or None
        Folds of the cross-validation (0 or None: skipped), for the combined
        map and the single-image comparison.
    compare_single : bool
        Also calibrate the first image alone (its maps and cross-validation
        cost one more thin-plate fit), stored in ``combined.single``.
    sources : sequence of (str, dict or None) or None
        Origin of in-memory images, as ``source`` in :func:`ccdgrid.calibrate`
        (ignored for paths, whose file information is used).
    polarity : {"auto", "bright", "dark"}
        Bright or dark holes, as in :func:`ccdgrid.calibrate`; "auto" decides
        on the first image (as ``calibrate`` would, unless its hole search
        finds a plain grid of bright holes), and all images are read that way.

    Returns
    -------
    CombinedCalibration
        A :class:`~ccdgrid.pipeline.Calibration` (``save()`` writes a detector
        file pyFAI loads) with ``combined``: per-image offsets, hole counts
        and residuals, and the first image calibrated alone.

    Raises
    ------
    CcdgridError
        Fewer than two images, images of different shapes, offsets or masks
        of the wrong shape, an image in which no grid is found (the message
        names it), lattices that do not agree between images, or known
        offsets that disagree with the images by more than a quarter pitch.

    Notes
    -----
    1. Each image goes through :func:`ccdgrid.peaks.find_holes`,
       :func:`ccdgrid.lattice.index_holes` and :func:`ccdgrid.gridfit.fit_grid`.
    2. Indices in one frame: image ``k``'s lattice steps are an integer
       (unimodular) combination ``M`` of the first image's, and its site
       ``(0, 0)`` is the first image's site ``s`` plus the plate offset:
       ``origin_k - origin_0 = t_k + s V_0``. With ``t_k`` known, ``s`` is
       the nearest integer pair; unknown, the ``t_k`` within half a step of
       zero is taken (a shift by a whole lattice step shows the same holes).
    3. Offsets, from that rough start: the joint lattice is fitted with the
       current offsets, and what is left of each image's displacements as a
       constant beside a smooth field shared by all images is removed
       (Speckman's partial-residual estimator with a thin-plate smoother);
       twice. They are estimated also when given, for comparison.
    4. With the offsets fixed (the given ones when known), the joint lattice
       is :func:`ccdgrid.gridfit.fit_grid` of ``measured - t_k`` with the
       common indices, and ``d = ideal - measured`` at every hole of every
       image feeds one :func:`ccdgrid.maps.displacement_maps`, with the hole
       spacing as length unit. Unless a smoothing is given, three fits (all
       samples with GCV's smoothing, all samples with the smoothing GCV
       picks on the per-site means, or the per-site means alone) are scored
       by their error at left-out lattice sites and the best is made (see
       :func:`_combined_maps`): GCV alone takes the shared error of the
       samples of one hole in images shifted by a few pixels for signal.
       The cross-validation puts all samples of a lattice site in one fold;
       after a fit of the per-site means it is that of the means (less noisy
       targets, so not comparable with one image's figure).

    Cost: the hole search once per image, then thin-plate fits, O(n³) in
    the number of samples ``n`` (all holes of all images): ~1500 for four
    2048² FReLoN-like images, about a second. Above 4000 samples (e.g.
    three or four 4096² images, ~1700 holes each) the map is fitted to the
    per-site means instead: the noise of the centres still averages out,
    but the map loses the denser sampling (the offsets are still estimated
    from at most 1500 samples near the centre).
    """
    t_start = time.perf_counter()
    timings = {}
    check_backend(backend)
    cv_folds = _check_folds(cv_folds)
    pitch = _check_pitch(pitch)
    polarity = check_polarity(polarity)
    if not isinstance(compare_single, (bool, np.bool_)):
        raise CcdgridError(f"`compare_single` must be True or False, got {compare_single!r}")
    arrays, infos = _read_images(images, sources)
    n_img = len(arrays)
    shape = arrays[0].shape
    masks = _check_masks(mask, n_img, shape)
    given = _check_offsets(offsets, n_img)
    timings["read"] = time.perf_counter() - t_start
    options = {
        "hole_diameter": hole_diameter,
        "pitch_px": pitch_px,
        "threshold": threshold,
        "backend": backend,
    }

    t0 = time.perf_counter()
    first = None
    stages = []
    if polarity == "auto" and not compare_single:
        # a plain grid of bright holes is settled by its hole search alone
        plain = _plain_bright(arrays[0], masks[0], pitch, options)
        if plain is not None:
            polarity = "bright"
            stages.append(plain)
    if compare_single or polarity == "auto":
        # the first image alone: compared with the joint calibration, and how
        # calibrate reads it settles an automatic polarity
        first = _per_image(
            0,
            infos,
            calibrate,
            arrays[0],
            pitch=pitch,
            mask=masks[0],
            smoothing=smoothing,
            cv_folds=cv_folds if compare_single else 0,
            source=infos[0],
            polarity=polarity,
            **options,
        )
        polarity = first.params["polarity"]
    single = first if compare_single else None
    if polarity == "dark":
        arrays = [a if k == 0 and first is not None else invert(a) for k, a in enumerate(arrays)]
    for k, image in enumerate(arrays):
        if k < len(stages):
            continue  # measured by _plain_bright
        if k == 0 and first is not None:
            # the images are aligned on least-squares lattices: calibrate's
            # grid is the one seen at the image centre (gridfit.centred_grid)
            valid = first.lattice.valid
            lsq = fit_grid(
                np.asarray(first.holes.peaks, dtype=np.float64)[valid],
                first.lattice.indices[valid],
                pitch=pitch,
                backend=backend,
            )
            stages.append((first.holes, first.lattice, lsq))
        else:
            stages.append(_per_image(k, infos, _stages, image, masks[k], pitch, options))
    timings["per_image"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = stages[0][2]
    points, own_ij, image_of = [], [], []
    matrices, shifts, rough = [], [], []
    for k, (holes, lattice, grid) in enumerate(stages):
        m = _index_matrix(ref.vectors, grid.vectors, k, lattice.pitch_px)
        shift, t_rough = _index_shift(ref, grid, m, None if given is None else given[k], k)
        matrices.append(m)
        shifts.append(shift)
        rough.append(t_rough)
        valid = lattice.valid
        points.append(np.asarray(holes.peaks, dtype=np.float64)[valid])
        own_ij.append(lattice.indices[valid] @ m + shift)
        image_of.append(np.full(int(valid.sum()), k, dtype=np.int64))
    points = np.concatenate(points)
    ij = np.concatenate(own_ij)
    image_of = np.concatenate(image_of)
    # a common frame with indices >= 0, as index_holes gives them for one image
    low = ij.min(axis=0)
    ij = ij - low
    shifts = np.array(shifts, dtype=np.int64) - low

    scale_px = float(np.mean([s[1].pitch_px for s in stages]))
    estimated, steps = _refine_offsets(
        points, ij, image_of, np.array(rough), scale_px, pitch, backend
    )
    used = estimated if given is None else given
    lsq = fit_grid(points - used[image_of], ij, pitch=pitch, backend=backend)
    # The offsets were measured in the lattice of the central holes: a plate
    # shift is a fraction of the lattice steps, in px only through a
    # lattice's steps, and the lattice of all holes differs in scale (0.16 %
    # on a 2048² plate under a 15 px pincushion: offsets of 30 px were
    # 0.047 px off, and the joint map twice worse than one image's). They
    # are put in the joint lattice, which then moves a little: twice.
    for _ in range(2 if given is None else 1):
        estimated = np.linalg.solve(steps.T, estimated.T).T @ lsq.vectors
        steps = lsq.vectors
        if given is None:
            used = estimated
            lsq = fit_grid(points - used[image_of], ij, pitch=pitch, backend=backend)
    # each hole's site where its image saw the plate, then one frame for all:
    # the lattice seen at the image centre, fitted against detector positions
    lsq = replace(lsq, ideal=lsq.ideal + used[image_of])
    grid = centred_grid(lsq, points, shape)
    timings["joint_fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    maps, cv, choice, site_smoothing = _combined_maps(
        points, grid.displacement, grid.indices, shape, scale_px, smoothing, cv_folds
    )
    timings["displacement_maps"] = time.perf_counter() - t0

    holes_all, lattice_all = _merged_records(stages, matrices, shifts, grid)
    per_image = _per_image_figures(points, grid.displacement, image_of, maps, cv, n_img)
    combined = CombinedPositions(
        n_images=n_img,
        offsets=used.copy(),
        offsets_given=given is not None,
        offsets_estimated=estimated,
        index_shift=shifts,
        index_matrix=np.array(matrices, dtype=np.int64),
        image_of_hole=image_of,
        n_found=np.array([len(s[0].peaks) for s in stages], dtype=np.int64),
        n_indexed=np.array([s[1].n_valid for s in stages], dtype=np.int64),
        single=single,
        holes=[s[0] for s in stages],
        lattices=[s[1] for s in stages],
        grids=[s[2] for s in stages],
        **per_image,
    )
    out_mask = maps.mask
    for m in masks:
        if m is not None:
            out_mask = out_mask | (np.asarray(m) != 0).astype(np.int8)
    timings["total"] = time.perf_counter() - t_start
    params = {
        "pitch": float(pitch),
        "mask": any(m is not None for m in masks),
        "hole_diameter": hole_diameter,
        "pitch_px": pitch_px,
        "threshold": threshold,
        "smoothing": smoothing,
        "backend": backend,
        "cv_folds": cv_folds,
        "polarity": polarity,
        "offsets": None if given is None else given.tolist(),
        "resolved": {
            "hole_diameter": float(stages[0][0].hole_diameter),
            # the typical blur of every image's indexed holes: a warm start
            # from this file starts its hole fits from it, as from a single image's
            "hole_blur": float(
                np.median(np.concatenate([s[0].width[s[1].valid, 1] for s in stages]))
            ),
            "pitch_px": scale_px,
            "threshold": float(stages[0][0].threshold),
            "lattice_tolerance": stages[0][1].tolerance,
            "outlier_threshold_px": stages[0][1].outlier_threshold_px,
            # what one image of this plate would use (one sample per hole), for
            # warm starts and validations made of single images
            "smoothing": site_smoothing,
            "map_smoothing": maps.smoothing,
            "smoothing_choice": choice,
            **_fit_params(maps, grid),
            "per_image": {
                "hole_diameter": [float(s[0].hole_diameter) for s in stages],
                "pitch_px": [float(s[0].pitch_px) for s in stages],
                "threshold": [float(s[0].threshold) for s in stages],
            },
        },
        "combined": combined.as_dict(),
    }
    source = dict(infos[0]) if infos[0] is not None else None
    if source is not None:
        source["images"] = [i if i is not None else {"path": None} for i in infos]
    return CombinedCalibration(
        shape=tuple(int(v) for v in shape),
        pitch=grid.pitch,
        pixel_size=grid.pixel_size,
        holes=holes_all,
        lattice=lattice_all,
        grid=grid,
        maps=maps,
        dx=maps.dx,
        dy=maps.dy,
        mask=out_mask.astype(np.int8, copy=False),
        timings=timings,
        params=params,
        source=source,
        cross_validation=cv,
        combined=combined,
    )


# -- input checks -------------------------------------------------------------------------


def _read_images(images, sources):
    """``(arrays, infos)``: 2-D arrays of one shape, and each one's source dict or None."""
    if isinstance(images, (str, os.PathLike, np.ndarray)) or not hasattr(images, "__len__"):
        raise CcdgridError(
            "`images` must be a list of at least 2 images (arrays or paths), "
            f"got {type(images).__name__}"
        )
    if len(images) < 2:
        raise CcdgridError(f"`images` must hold at least 2 images, got {len(images)}")
    if sources is not None and (isinstance(sources, str) or len(sources) != len(images)):
        raise CcdgridError(f"`sources` must give one entry per image ({len(images)})")
    arrays, infos = [], []
    for k, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            from .io import read_image

            array, info = read_image(os.fspath(image))
            info = dict(info)
        else:
            array = image
            src = None if sources is None else sources[k]
            if isinstance(src, dict):
                info = dict(src)
            elif src is not None:
                info = {"path": str(src), "sha256": None}
            else:
                info = None
        array = as_image(array, name=f"images[{k}]", dtype=np.asarray(array).dtype)
        if arrays and array.shape != arrays[0].shape:
            raise CcdgridError(
                f"`images[{k}]` has shape {array.shape}, the first image {arrays[0].shape}: "
                "all images must come from one detector"
            )
        arrays.append(array)
        infos.append(info)
    return arrays, infos


def _check_masks(mask, n_img, shape):
    """One mask (or None) per image, each checked against ``shape``."""
    if mask is None:
        return [None] * n_img
    if isinstance(mask, (list, tuple)):
        if len(mask) != n_img:
            raise CcdgridError(
                f"`mask` must be one array for all images or a list of {n_img}, "
                f"got a list of {len(mask)}"
            )
        masks = list(mask)
    else:
        masks = [mask] * n_img
    for k, m in enumerate(masks):
        if m is not None and np.shape(m) != shape:
            raise CcdgridError(f"`mask` for image {k} has shape {np.shape(m)}, the images {shape}")
    return masks


def _check_offsets(offsets, n_img):
    """``(K, 2)`` float64 offsets relative to the first image, or None."""
    if offsets is None:
        return None
    try:
        arr = np.array(offsets, dtype=np.float64)
    except (TypeError, ValueError):
        raise CcdgridError(
            f"`offsets` must be {n_img} (y, x) pairs of numbers in px, got {offsets!r}"
        ) from None
    if arr.shape != (n_img, 2):
        raise CcdgridError(
            f"`offsets` must have shape ({n_img}, 2), one (y, x) pair per image, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise CcdgridError("`offsets` must be finite")
    return arr - arr[0]


# -- stages -------------------------------------------------------------------------------


def _per_image(k, infos, func, *args, **kwargs):
    """Run one image's stages; a failure names the image."""
    try:
        return func(*args, **kwargs)
    except CcdgridError as exc:
        name = (infos[k] or {}).get("path")
        label = f"image {k}" + (f" ({name})" if name else "")
        raise CcdgridError(f"{label}: {exc}") from exc


def _plain_bright(image, mask, pitch, options):
    """:func:`_stages` of an image that plainly holds bright holes, else None.

    Plainly: most holes found fit one lattice (``calibrate``'s rule,
    :func:`ccdgrid.pipeline._check_indexed`) and the middles of its cells
    are background, not dark holes (:func:`ccdgrid.pipeline._dark_between`).
    Otherwise the caller lets ``calibrate(polarity="auto")`` decide.
    """
    # the noise of a plate of dark holes searched as bright ones gives up early
    token = GIVE_UP_ABOVE.set(_GIVE_UP_ABOVE)
    try:
        stages = _stages(image, mask, pitch, options)
        holes, lattice, grid = stages
        _check_indexed(lattice.n_valid, _found(lattice, len(holes.peaks)))
    except CcdgridError:
        return None
    finally:
        GIVE_UP_ABOVE.reset(token)
    if _looks_inverted(_dark_between(image, holes, grid, lattice.valid)):
        return None
    return stages


def _stages(image, mask, pitch, options):
    """``(HoleSearch, LatticeIndex, GridFit)`` of one image."""
    from .peaks import find_holes

    holes = find_holes(image, mask=mask, **options)
    peaks = np.asarray(holes.peaks, dtype=np.float64)
    lattice = index_holes(peaks, pitch_px=holes.pitch_px)
    # as calibrate does: soft holes a soft lit rim biases are left out
    lattice = _without_soft_edge_holes(peaks, lattice, holes, np.shape(image))
    valid = lattice.valid
    grid = fit_grid(peaks[valid], lattice.indices[valid], pitch=pitch, backend=options["backend"])
    return holes, lattice, grid


def _index_matrix(ref_vectors, vectors, k, pitch_px):
    """Integer ``M`` with ``vectors ~ M @ ref_vectors``, ``|det M| = 1``."""
    m = np.rint(vectors @ np.linalg.inv(ref_vectors)).astype(np.int64)
    misfit = np.abs(vectors - m @ ref_vectors).max()
    if abs(round(np.linalg.det(m))) != 1 or misfit > _ALIGN_TOLERANCE * pitch_px:
        raise CcdgridError(
            f"image {k}: its lattice steps {np.round(vectors, 2).tolist()} px do not match "
            f"the first image's {np.round(ref_vectors, 2).tolist()} px: not the same plate "
            "and detector, or the plate was rotated between the images"
        )
    return m


def _index_shift(ref, grid, m, offset, k):
    """``(s, t)``: integer index shift of image ``k`` and its rough plate offset (px).

    ``origin_k - origin_0 = t + s V_0`` (image ``k``'s site ``(0, 0)`` is the
    first image's site ``s`` moved by the plate offset ``t``).
    """
    inv = np.linalg.inv(ref.vectors)
    delta = grid.origin - ref.origin
    if offset is None:
        s = np.rint(delta @ inv)
    else:
        frac = (delta - offset) @ inv
        s = np.rint(frac)
        if np.abs(frac - s).max() > _ALIGN_TOLERANCE:
            measured = delta - s @ ref.vectors
            raise CcdgridError(
                f"`offsets[{k}]` = ({offset[0]:.3f}, {offset[1]:.3f}) px does not match the "
                f"images, which put the plate at ({measured[0]:.3f}, {measured[1]:.3f}) px "
                "from the first position (modulo a lattice step); offsets are (y, x), "
                "the move of the holes from the first image to image k"
            )
    t = delta - s @ ref.vectors
    return s.astype(np.int64), t


def _refine_offsets(points, ij, image_of, rough, scale_px, pitch, backend):
    """``(K, 2)`` plate offsets, px, refined from ``rough`` by the joint fit.

    Each pass fits the joint lattice with the current offsets and removes
    the per-image constants left beside a smooth shared field
    (:func:`_offset_errors`); the second pass corrects for the lattice having
    moved with the offsets of the first. Returns the offsets and the steps
    (rows: i step, j step; (y, x) px) of the lattice they were measured in.
    """
    offsets = rough - rough[0]
    sub = _central_subset(points, _OFFSET_MAX_POINTS)
    for _ in range(_OFFSET_PASSES):
        grid = fit_grid(
            points[sub] - offsets[image_of[sub]], ij[sub], pitch=pitch, backend=backend
        )
        offsets = offsets - _offset_errors(
            points[sub], grid.displacement, image_of[sub], len(offsets), scale_px
        )
    return offsets, grid.vectors


def _offset_errors(points, disp, image_of, n_img, scale_px):
    """Per-image constants left in ``disp`` beside a smooth shared field, px.

    ``disp = f(points) + e_k`` with ``f`` smooth and ``e_0 = 0``: the
    thin-plate smoother ``H`` removes the smooth part from the displacements
    and from the image indicators ``X`` alike, and ``e`` is the least-squares
    fit of ``(I - H) disp`` on ``(I - H) X`` (Speckman's estimator of a
    partially linear model). A constant cannot hide in ``f`` because ``f``
    must be the same for all images, whose holes interleave.
    """
    one_hot = (image_of[:, None] == np.arange(1, n_img)[None, :]).astype(np.float64)
    values = np.column_stack([disp, one_hot])
    unit = points / scale_px
    rbf = _tps(unit, values, _OFFSET_SMOOTHING, _OFFSET_TREND_DEGREE)
    out = np.zeros((n_img, 2))
    if rbf is None:
        return out
    fitted = rbf(unit)
    resid = values - fitted
    coef, *_ = np.linalg.lstsq(resid[:, 2:], resid[:, :2], rcond=None)
    out[1:] = coef
    return out


def _central_subset(points, limit):
    """Indices of at most ``limit`` points nearest the centroid, increasing."""
    if len(points) <= limit:
        return np.arange(len(points))
    dist = np.hypot(*(points - points.mean(axis=0)).T)
    return np.sort(np.argpartition(dist, limit - 1)[:limit])


def _combined_maps(points, disp, indices, shape, scale_px, smoothing, cv_folds):
    """``(maps, cross_validation, choice, per-site smoothing)`` of the combined map.

    ``choice`` names the fit made; the per-site smoothing is the fit's
    equivalent for one sample per hole (a single image).

    With ``smoothing`` None, three fits are scored by their error at
    left-out lattice sites (:func:`_site_cv_error`) and the best is made:

    * ``"all samples, GCV"``: a thin-plate fit of every sample with the
      smoothing GCV picks on them;
    * ``"all samples, site GCV"``: the same with the smoothing GCV picks on
      the per-site means, times the samples per site (a site of ``m``
      samples at one place weighs ``m`` times its mean);
    * ``"per-site means"``: the fit of the means of each site's samples.

    GCV assumes independent errors. The samples of one hole in images
    shifted by a few pixels share much of theirs (same fibres, same pixels):
    GCV on all samples may then take them for exact data and barely smooth,
    and the fit of all samples follows that shared error between
    neighbouring samples (on 512² images shifted by up to 4 px, a dense
    error 1.4x that of one image where the means gave 0.84x). Shifted by a
    fraction of a pitch, the samples are different places with independent
    errors and fitting them all is the best (0.44-0.74x one image against
    0.52-0.71x for the means).
    """
    mean_pts, mean_disp, sites = _site_means(points, disp, indices)
    if len(points) > _MAX_JOINT_POINTS:
        maps = displacement_maps(
            mean_pts, mean_disp, shape, smoothing=smoothing, scale_px=scale_px
        )
        cv = _cross_validation(mean_pts, mean_disp, sites, maps, cv_folds)
        choice = f"per-site means ({len(points)} samples > {_MAX_JOINT_POINTS})"
        return maps, cv, choice, maps.smoothing
    per_site = len(mean_pts) / len(points)
    if smoothing is not None:
        maps = _all_samples_maps(
            points, disp, mean_pts, shape, smoothing=smoothing, scale_px=scale_px
        )
        cv = _cross_validation(points, disp, indices, maps, cv_folds)
        return maps, cv, "all samples, given smoothing", maps.smoothing * per_site
    # only the smoothing and degree are wanted here: a coarse evaluation grid keeps it cheap
    coarse = 4.0 * scale_px
    direct = displacement_maps(
        points, disp, shape, scale_px=scale_px, coarse_step=coarse, gap_ratio=None
    )
    means = displacement_maps(mean_pts, mean_disp, shape, scale_px=scale_px, coarse_step=coarse)
    # each with the kernel order GCV chose with its smoothing (the smoothing's units)
    candidates = {
        "all samples, GCV": (False, direct.smoothing, direct.degree, direct.order),
        "all samples, site GCV": (
            False,
            means.smoothing / per_site,
            means.degree,
            means.order,
        ),
        "per-site means": (True, means.smoothing, means.degree, means.order),
    }
    errors = _site_cv_error(points, disp, indices, candidates, scale_px)
    choice = min(errors, key=errors.get)
    on_means, s, degree, order = candidates[choice]
    if on_means:
        maps = displacement_maps(
            mean_pts,
            mean_disp,
            shape,
            smoothing=s,
            degree=degree,
            scale_px=scale_px,
            order=order,
        )
        cv = _cross_validation(mean_pts, mean_disp, sites, maps, cv_folds)
        return maps, cv, choice, s
    maps = _all_samples_maps(
        points, disp, mean_pts, shape, smoothing=s, degree=degree, scale_px=scale_px, order=order
    )
    cv = _cross_validation(points, disp, indices, maps, cv_folds)
    return maps, cv, choice, s * per_site


def _all_samples_maps(points, disp, sites, shape, **fit):
    """Maps fitted to every sample, with the border gaps of the lattice ``sites`` masked.

    The gap rule (:func:`ccdgrid.coverage.mask_border_gaps`) weighs each
    Delaunay edge against its points' nearest-neighbour distance: the
    samples of one hole in images shifted by a fraction of a pitch lie a
    few pixels apart, every edge between two holes looked like a gap, and
    the whole detector was masked. It runs on the sites' mean positions,
    one point per hole; the hull is that of all the samples.
    """
    maps = displacement_maps(points, disp, shape, gap_ratio=None, **fit)
    mask_border_gaps(sites, maps.mask)
    return maps


def _site_cv_error(points, disp, indices, candidates, scale_px):
    """Mean squared error of each candidate fit at left-out sites, px².

    Sites go to fold ``(i + 2 j) mod 5`` (their four neighbours elsewhere);
    for the first :data:`_CHOICE_FOLDS` folds every candidate is fitted
    without the fold's samples (or, for a fit of means, with the means of
    the other sites) and predicts each left-out sample at its own place: the
    same targets for all, so that the fits of samples and of means compare,
    and a fit of means pays for blurring samples that are far apart.
    """
    mean_pts, mean_disp, sites = _site_means(points, disp, indices)
    _, inverse = np.unique(indices, axis=0, return_inverse=True)
    fold = np.mod(sites[:, 0] + 2 * sites[:, 1], 5)
    errors = dict.fromkeys(candidates, 0.0)
    for f in range(_CHOICE_FOLDS):
        test = fold == f
        train = ~test[inverse.ravel()]
        if not test.any():
            continue
        for name, (on_means, s, degree, order) in candidates.items():
            x, y = (
                (mean_pts[~test], mean_disp[~test]) if on_means else (points[train], disp[train])
            )
            rbf = _tps(x / scale_px, y, s, degree, order)
            if rbf is None:
                errors[name] = np.inf
                continue
            err = rbf(points[~train] / scale_px) - disp[~train]
            errors[name] += float(np.sum(err * err))
    return errors


def _tps(x, y, smoothing, degree, order=2):
    """A smoothing thin-plate ``RBFInterpolator``, with an affine trend if ``degree``'s fails.

    Kernel order 3 (``-r⁴ log r``, which scipy does not have): ccdgrid's
    own spline, with the same fallback (to an affine trend and order 2).
    """
    if order == 3:
        try:
            return fit_tps(x, y, smoothing, degree, order=3)[0]
        except CcdgridError:
            return None
    for deg in dict.fromkeys((degree, 1)):
        try:
            return RBFInterpolator(
                x, y, kernel="thin_plate_spline", smoothing=smoothing, degree=deg
            )
        except (ValueError, np.linalg.LinAlgError):
            continue
    return None


def _site_means(points, disp, indices):
    """``(points, displacement, indices)`` averaged over the samples of each lattice site."""
    sites, inverse, counts = np.unique(indices, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    mean_pts = np.zeros((len(sites), 2))
    mean_disp = np.zeros((len(sites), 2))
    np.add.at(mean_pts, inverse, points)
    np.add.at(mean_disp, inverse, disp)
    return mean_pts / counts[:, None], mean_disp / counts[:, None], sites


def _cross_validation(points, disp, indices, maps, cv_folds, **fit):
    """k-fold error at left-out sites with ``maps``' settings (or ``fit``'s), or None."""
    if not cv_folds:
        return None
    if maps is not None:
        fit = {
            "method": maps.method,
            "smoothing": maps.smoothing,
            "degree": maps.degree,
            "order": maps.order,
            "scale_px": maps.scale_px,
        }
    try:
        return cross_validate(points, disp, k=min(cv_folds, len(points)), indices=indices, **fit)
    except CcdgridError:
        return None  # a diagnostic only: it must not fail the calibration


def _per_image_figures(points, disp, image_of, maps, cv, n_img):
    fit = maps.evaluate(points) - disp
    lattice_rms = np.empty(n_img)
    fit_rms = np.empty(n_img)
    cv_rms = np.full(n_img, np.nan)
    for k in range(n_img):
        sel = image_of == k
        lattice_rms[k] = _rms(disp[sel])
        fit_rms[k] = _rms(fit[sel])
        if cv is not None and len(cv.residuals) == len(points):
            res = cv.residuals[sel]
            res = res[np.all(np.isfinite(res), axis=1)]
            if len(res):
                cv_rms[k] = _rms(res)
    return {"lattice_rms": lattice_rms, "fit_rms": fit_rms, "cv_rms": cv_rms}


def _merged_records(stages, matrices, shifts, grid):
    """The hole searches and indexings of all images as one, in the common frame.

    Rows are the images' peaks one image after the other, so that
    ``peaks[valid]`` lines up with the joint grid's rows.
    """
    peaks, amplitude, width, background, rejected, reasons = [], [], [], [], [], []
    indices, valid, lat_rejected, lat_reasons, pairs = [], [], [], [], []
    offset = 0
    for (holes, lattice, _), m, s in zip(stages, matrices, shifts, strict=True):
        peaks.append(np.asarray(holes.peaks, dtype=np.float64))
        amplitude.append(np.asarray(holes.amplitude))
        width.append(np.asarray(holes.width))
        background.append(np.asarray(holes.background))
        rejected.append(np.asarray(holes.rejected, dtype=np.float64).reshape(-1, 2))
        reasons.append(np.asarray(holes.reasons))
        ij = np.full(lattice.indices.shape, -1, dtype=np.int64)
        ok = lattice.valid
        ij[ok] = lattice.indices[ok] @ m + s
        indices.append(ij)
        valid.append(ok)
        lat_rejected.append(np.asarray(lattice.rejected, dtype=np.int64) + offset)
        lat_reasons.extend(lattice.reasons)
        pairs.append(np.asarray(lattice.pair_distances))
        offset += len(holes.peaks)
    holes0, lattice0 = stages[0][0], stages[0][1]
    holes_all = replace(
        holes0,
        peaks=np.concatenate(peaks),
        amplitude=np.concatenate(amplitude),
        width=np.concatenate(width),
        background=np.concatenate(background),
        rejected=np.concatenate(rejected),
        reasons=np.concatenate(reasons),
    )
    lattice_all = replace(
        lattice0,
        indices=np.concatenate(indices),
        valid=np.concatenate(valid),
        vectors=grid.vectors.copy(),
        origin=grid.origin.copy(),
        rejected=np.concatenate(lat_rejected),
        reasons=lat_reasons,
        pair_distances=np.concatenate(pairs),
    )
    return holes_all, lattice_all


def _rms(d):
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1)))) if len(d) else float("nan")
