"""Check a calibration by correcting the grid image and measuring the holes again.

:func:`validate` does what the seed tutorial does at its end, done carefully:

1. the grid image is corrected with the calibration's corner maps by exact,
   flux-conserving pixel splitting (:class:`ccdgrid.correction.CorrectionMatrix`),
   *normalised by the coverage* so that output pixels that only part of an
   input pixel reaches are not darker (a dark rim would pull the centres of
   the holes next to it); pixels covered less than half are left out;
2. the holes of the corrected image are found, indexed and fitted with an
   affine lattice by the calibration's own stages
   (:func:`~ccdgrid.peaks.find_holes`, :func:`~ccdgrid.lattice.index_holes`,
   :func:`~ccdgrid.gridfit.fit_grid`);
3. the mis-placement of every hole, ``|ideal - measured|`` against that
   lattice, is reported as mean, RMS and max in pixels and in units of the
   hole spacing, beside the same figures for the uncorrected image.

This is a *self-consistency* check, not a measure of accuracy: the same hole
finder measured the holes that made the maps, so a bias it repeats on both
images cancels, while re-measuring adds errors of its own (the holes at the
edges of the plate). Even the exact maps of a generated image leave a
residual of the same size as the recovered ones. The accuracy figure of a
calibration is the cross-validated error of its maps
(:func:`ccdgrid.cross_validation.cross_validate`,
``Calibration.cross_validation``), which the result also carries and its
summary quotes.

The command ``ccdgrid validate IMAGE -d DETECTOR`` is built by
:func:`add_validate_parser` and run by :func:`run_validate`.

This module imports numpy and the pipeline only inside its functions: the
command line imports it to build its parser, and ``ccdgrid --help`` must
stay instant.
"""

import os
from dataclasses import dataclass, field

from .errors import CcdgridError

__all__ = ["GridResidual", "ValidationResult", "add_validate_parser", "run_validate", "validate"]

_MIN_COVERAGE = 0.5  # corrected pixels reached by less of an input pixel are left out
_DEFAULT_PITCH = 5e-3  # m, when neither the caller nor the detector gives one

_SELF_CONSISTENCY_NOTE = (
    "This is a self-consistency check: the same hole finder measured the holes that made "
    "the maps, so a bias it repeats cancels, and re-measurement adds errors of its own "
    "(holes at the plate's edges); even exact maps leave a residual of this size."
)


@dataclass
class GridResidual:
    """Mis-placement of the holes of one image against their best affine lattice.

    Attributes
    ----------
    n_found : int
        Holes found by :func:`ccdgrid.peaks.find_holes`.
    n_holes : int
        Holes indexed and fitted (the figures are over these).
    points : ndarray of shape (n_holes, 2), float64, px
        Measured ``(y, x)`` hole centres, index coordinates.
    indices : ndarray of shape (n_holes, 2), int64
        Their lattice indices ``(i, j)``.
    residuals : ndarray of shape (n_holes, 2), float64, px
        ``(dy, dx) = ideal - measured`` against the fitted affine lattice.
    pitch_px : float, px
        Mean length of the two fitted lattice vectors: the unit of the
        ``*_pitch`` figures.
    mean_px, rms_px, max_px : float, px
        Mean, RMS and largest ``|residual|``.
    pixel_size : tuple of 2 float, m
        ``(pixel1, pixel2)`` that makes the fitted lattice square with the
        plate's pitch (:func:`ccdgrid.gridfit.pixel_size_from_vectors`).
    grid : ccdgrid.gridfit.GridFit
        The full grid fit.
    """

    n_found: int
    n_holes: int
    points: object = field(repr=False)
    indices: object = field(repr=False)
    residuals: object = field(repr=False)
    pitch_px: float
    mean_px: float
    rms_px: float
    max_px: float
    pixel_size: tuple
    grid: object = field(repr=False)

    @property
    def mean_pitch(self):
        """Mean mis-placement in units of the hole spacing."""
        return self.mean_px / self.pitch_px

    @property
    def rms_pitch(self):
        """RMS mis-placement in units of the hole spacing."""
        return self.rms_px / self.pitch_px

    @property
    def max_pitch(self):
        """Largest mis-placement in units of the hole spacing."""
        return self.max_px / self.pitch_px

    def as_dict(self):
        """The scalar figures as a plain dict (JSON-ready)."""
        return {
            "n_found": self.n_found,
            "n_holes": self.n_holes,
            "pitch_px": self.pitch_px,
            "mean_px": self.mean_px,
            "rms_px": self.rms_px,
            "max_px": self.max_px,
            "mean_pitch": self.mean_pitch,
            "rms_pitch": self.rms_pitch,
            "max_pitch": self.max_pitch,
            "pixel_size": list(self.pixel_size),
        }


@dataclass
class ValidationResult:
    """What :func:`validate` measured.

    Attributes
    ----------
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.
    corrected : GridResidual
        Holes of the corrected image against their affine lattice.
    uncorrected : GridResidual or None
        The same for the image as it is (None if not asked for, or if its
        holes could not be indexed).
    cross_validation : ccdgrid.cross_validation.CrossValidation or None
        k-fold cross-validated error of the maps at the calibration's holes:
        the accuracy figure (None when the detector holds no hole record).
    detector_pixel_size : tuple of 2 float or None, m
        The detector's ``(pixel1, pixel2)``, for comparison with
        ``corrected.pixel_size``.
    pitch : float, m
        Plate pitch used for the pixel sizes.
    corrected_image : ndarray, float32
        The corrected, coverage-normalised image; NaN where no valid input
        pixel reaches (or covers less than half a pixel). Its frame is the
        input's, grown where the distortion takes valid pixels beyond it
        (``shape_out="cover"`` of :meth:`ccdgrid.correction.CorrectionMatrix.from_maps`).
    timings : dict of str to float, s
        ``"correction"`` (build and apply), ``"corrected"`` and
        ``"uncorrected"`` (hole search and fit), ``"cross_validation"``,
        ``"total"``.
    """

    shape: tuple
    corrected: GridResidual
    uncorrected: object
    cross_validation: object
    detector_pixel_size: object
    pitch: float
    corrected_image: object = field(repr=False)
    timings: dict = field(default_factory=dict)

    def as_dict(self):
        """Scalar figures as nested plain dicts (JSON-ready)."""
        cv = self.cross_validation
        return {
            "shape": list(self.shape),
            "pitch": self.pitch,
            "corrected": self.corrected.as_dict(),
            "uncorrected": None if self.uncorrected is None else self.uncorrected.as_dict(),
            "cross_validation": None
            if cv is None
            else {
                "k": cv.k,
                "folds_evaluated": cv.folds_evaluated,
                "n_holes": cv.n_evaluated,
                "rms_px": cv.rms_px,
                "max_px": cv.max_px,
                "mean_px": cv.mean_px,
                "rms_pitch": cv.rms_pitch,
                "max_pitch": cv.max_pitch,
                "in_sample_rms_px": cv.in_sample_rms_px,
            },
            "detector_pixel_size": None
            if self.detector_pixel_size is None
            else list(self.detector_pixel_size),
            "timings": dict(self.timings),
        }

    def summary(self):
        """A table of the figures and what they mean, for humans."""
        lines = [
            f"validation on a {self.shape[0]} x {self.shape[1]} px image: hole mis-placement "
            "against the best affine lattice",
            f"{'':18s}{'holes':>6s} |{'mean px':>9s}{'RMS px':>9s}{'max px':>9s} |"
            f"{'mean pitch':>11s}{'RMS pitch':>11s}{'max pitch':>11s}",
            _row("corrected image", self.corrected),
        ]
        if self.uncorrected is not None:
            lines.append(_row("uncorrected image", self.uncorrected))
            if self.corrected.mean_px > 0:
                lines.append(
                    "the correction reduces the mean mis-placement "
                    f"{self.uncorrected.mean_px / self.corrected.mean_px:.0f}-fold"
                )
        p = self.corrected.pixel_size
        text = f"pixel size from the corrected grid: {p[0] * 1e6:.3f} x {p[1] * 1e6:.3f} µm (y x)"
        if self.detector_pixel_size is not None:
            d = self.detector_pixel_size
            worst = max(abs(p[0] / d[0] - 1), abs(p[1] / d[1] - 1))
            text += (
                f"; detector: {d[0] * 1e6:.3f} x {d[1] * 1e6:.3f} µm "
                f"(differ by {worst * 100:.3f} %)"
            )
        lines.append(text)
        lines.append(_SELF_CONSISTENCY_NOTE)
        cv = self.cross_validation
        if cv is None:
            lines.append(
                "Accuracy figure: the cross-validated error of the maps (ccdgrid.calibrate "
                "computes it); not available for this detector (no hole record)."
            )
        else:
            lines.append(
                f"Accuracy figure: the {cv.folds_text()} cross-validated error of the maps at "
                f"{cv.n_evaluated} holes left out of the fit: RMS {cv.rms_px:.4f} px, max "
                f"{cv.max_px:.4f} px ({cv.rms_pitch:.5f} / {cv.max_pitch:.5f} pitch); an upper "
                "bound, as it includes each left-out hole's own centre error."
            )
        return "\n".join(lines)


def _row(label, r):
    return (
        f"{label:18s}{r.n_holes:6d} |{r.mean_px:9.4f}{r.rms_px:9.4f}{r.max_px:9.4f} |"
        f"{r.mean_pitch:11.5f}{r.rms_pitch:11.5f}{r.max_pitch:11.5f}"
    )


def validate(
    image,
    detector,
    *,
    pitch=None,
    mask=None,
    detector_mask=False,
    uncorrected=True,
    hole_diameter=None,
    pitch_px=None,
    threshold=None,
    backend="cython",
):
    """Correct a grid image with a calibration and measure its holes again.

    Parameters
    ----------
    image : array_like of shape (ny, nx) or str or os.PathLike
        The grid image (normally the one that was calibrated), or a file
        :func:`ccdgrid.io.read_image` reads.
    detector : Calibration, DetectorRecord, object, str or os.PathLike
        The calibration: a :class:`ccdgrid.calibrate` result, a record loaded
        by :func:`ccdgrid.detector_file.load`, a path to such a file, or any
        object with corner maps ``dy``, ``dx`` of shape ``(ny + 1, nx + 1)``
        in px (true position of corner ``(i, j)``, nominally at index
        coordinates ``(i - 0.5, j - 0.5)``, is that plus ``(dy, dx)``) and
        optionally ``mask`` (``(ny, nx)``, nonzero = invalid), ``pitch`` (m)
        and ``pixel_size`` (m). A calibration of dark holes
        (``params["polarity"] == "dark"``) has the image's negative measured.
    pitch : float or None, m
        Plate pitch for the pixel size of the re-fitted grid; None: the
        detector's, else 5 mm. It does not change the mis-placement figures.
    mask : array_like of shape (ny, nx), str or None
        Invalid pixels of ``image`` (nonzero = invalid; a file is read with
        :func:`ccdgrid.io.read_mask`). Non-finite pixels and dead rows or
        columns are added to it; they are left out of the correction.
    detector_mask : bool
        Also leave out the pixels the detector masks. Off by default: a
        calibration masks the pixels outside the hull of its hole centres,
        which cuts the outermost holes in half and hides them from the
        check; their maps are extrapolated only a hole radius.
    uncorrected : bool
        Also measure the image as it is, for contrast.
    hole_diameter, pitch_px : float or None, px
        Hole diameter and spacing for :func:`ccdgrid.peaks.find_holes`.
        None: the values the calibration resolved (``params["resolved"]``
        of a calibration or detector file), so both images are searched as
        the calibration was; estimated from the image when there are none.
    threshold : float or None
        Detection threshold for :func:`ccdgrid.peaks.find_holes`; None:
        automatic.
    backend : {"cython", "numpy"}
        Engine of the correction and the hole search.

    Returns
    -------
    ValidationResult

    Raises
    ------
    CcdgridError
        If the maps do not match the image's shape (``(ny + 1, nx + 1)``), an
        argument is invalid, or the corrected image's holes cannot be found
        or indexed.

    Notes
    -----
    The figures are ``|ideal - measured|`` per hole against an affine lattice
    fitted to the corrected holes, in px and in units of the hole spacing.
    On the seed tutorial's real FReLoN data this check gave 0.003 (max) and
    0.0006 (mean) pitch. On generated FReLoN-like images with 20 px of
    distortion (``benchmarks/validation.py``), ccdgrid's calibration gives
    0.00012 mean / 0.00050 max pitch at 2048² and 0.00015 / 0.00076 at
    4096², and the *exact* maps 0.00016 / 0.00078 and 0.00015 / 0.00086:
    the figures measure the re-measurement, not the maps (maps fitted to
    the hole finder's own centres even undo its bias and score better than
    the truth). Read :attr:`ValidationResult.cross_validation` for the
    maps' accuracy.

    Examples
    --------
    >>> import ccdgrid
    >>> from ccdgrid.synthetic import grid_image
    >>> g = grid_image((512, 512), seed=1)
    >>> cal = ccdgrid.calibrate(g.image)
    >>> res = validate(g.image, cal)
    >>> bool(res.corrected.mean_pitch < res.uncorrected.mean_pitch)
    True
    """
    import time

    import numpy as np

    from ._validation import as_image, check_backend
    from .correction import CorrectionMatrix
    from .polarity import invert, polarity_of

    t_start = time.perf_counter()
    check_backend(backend)
    if isinstance(image, (str, os.PathLike)):
        from .io import read_image

        image, _ = read_image(image)
    img = as_image(image, "image", dtype=np.float64 if _is_float64(image) else np.float32)
    shape = img.shape
    if isinstance(detector, (str, os.PathLike)):
        from .detector_file import load

        detector = load(detector)
    dy, dx, det_mask = _detector_maps(detector, shape)
    pitch = _resolve_pitch(pitch, detector)
    search = {
        "hole_diameter": _resolved(detector, "hole_diameter", hole_diameter),
        "pitch_px": _resolved(detector, "pitch_px", pitch_px),
        "threshold": threshold,
        "backend": backend,
    }
    invalid = _input_mask(img, mask)
    polarity = polarity_of(detector)
    if polarity == "dark":
        # measured as the calibration measured it: dark holes through the
        # image's negative (see ccdgrid.polarity)
        img = invert(img, invalid)
    correction_mask = invalid if not detector_mask or det_mask is None else invalid | det_mask

    timings = {}
    t0 = time.perf_counter()
    # the input frame, grown where the distortion takes valid pixels beyond it, so that
    # no hole near the edge is cut off by the frame
    matrix = CorrectionMatrix.from_maps(
        dy, dx, mask=correction_mask, shape_out="cover", backend=backend
    )
    corrected_img = matrix.apply(img, normalize=True, dummy=np.nan)
    # a sliver of a pixel scaled up by the normalisation is mostly noise
    corrected_img[matrix.coverage < _MIN_COVERAGE] = np.nan
    del matrix
    timings["correction"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    corrected = _measure(corrected_img, None, pitch, search, "corrected", polarity)
    timings["corrected"] = time.perf_counter() - t0
    before = None
    if uncorrected:
        t0 = time.perf_counter()
        try:
            before = _measure(img, invalid, pitch, search, "original")
        except CcdgridError:
            # strong distortion may defeat the indexing of the raw image: only the contrast is lost
            before = None
        timings["uncorrected"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cv = _cross_validation_of(detector)
    timings["cross_validation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    pixel_size = getattr(detector, "pixel_size", None)
    return ValidationResult(
        shape=shape,
        corrected=corrected,
        uncorrected=before,
        cross_validation=cv,
        detector_pixel_size=None if pixel_size is None else tuple(float(v) for v in pixel_size),
        pitch=pitch,
        corrected_image=corrected_img,
        timings=timings,
    )


def _is_float64(image):
    return getattr(image, "dtype", None) == "float64"


def _detector_maps(detector, shape):
    """``(dy, dx, mask)`` of a duck-typed detector, checked against the image shape."""
    import numpy as np

    missing = [a for a in ("dy", "dx") if not hasattr(detector, a)]
    if missing:
        raise CcdgridError(
            f"`detector` must have corner maps dy and dx (missing: {', '.join(missing)}); "
            f"got {type(detector).__name__}"
        )
    dy = np.asarray(detector.dy)
    dx = np.asarray(detector.dx)
    corners = (shape[0] + 1, shape[1] + 1)
    for name, arr in (("dy", dy), ("dx", dx)):
        if arr.shape != corners:
            raise CcdgridError(
                f"the detector's {name} map has shape {arr.shape}, but an image of shape {shape} "
                f"needs corner maps of shape {corners}: the detector was calibrated for "
                f"another image size"
            )
    det_mask = getattr(detector, "mask", None)
    if det_mask is not None:
        det_mask = np.asarray(det_mask)
        if det_mask.shape == corners:
            flag = det_mask != 0
            det_mask = flag[:-1, :-1] | flag[1:, :-1] | flag[:-1, 1:] | flag[1:, 1:]
        elif det_mask.shape != shape:
            raise CcdgridError(
                f"the detector's mask has shape {det_mask.shape}, expected {shape} or {corners}"
            )
        else:
            det_mask = det_mask != 0
    return dy, dx, det_mask


def _resolve_pitch(pitch, detector):
    import math

    if pitch is None:
        pitch = getattr(detector, "pitch", None)
        if pitch is None:
            return _DEFAULT_PITCH
    try:
        value = float(pitch)
    except (TypeError, ValueError):
        raise CcdgridError(f"`pitch` must be a length in m, got {pitch!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise CcdgridError(f"`pitch` must be a positive length in m, got {pitch!r}")
    return value


def _input_mask(img, mask):
    """Pixels left out of the correction: the caller's, non-finite, dead lines."""
    import numpy as np

    from .peaks import _dead_lines  # the hole search's own rule, so both images agree

    invalid = ~np.isfinite(img)
    if mask is not None:
        from .io import read_mask

        invalid |= read_mask(mask, img.shape)
    dead = _dead_lines(img)
    if dead is not None:
        invalid |= dead
    return invalid


def _resolved(detector, key, value):
    """``value``, else the calibration's resolved ``key`` (hole search settings), else None."""
    if value is not None:
        return value
    params = getattr(detector, "params", None)
    resolved = params.get("resolved") if isinstance(params, dict) else None
    found = resolved.get(key) if isinstance(resolved, dict) else None
    return float(found) if isinstance(found, (int, float)) and found > 0 else None


def _measure(img, mask, pitch, search, label, polarity=None):
    """Find, index and fit the holes of one image -> GridResidual.

    ``polarity``: the detector's ("bright" or "dark"), to warn when the holes
    found look like the plate between holes of the other polarity (an image
    of another plate than the calibration's, or inverted since).
    """
    import warnings

    import numpy as np

    from .gridfit import fit_grid
    from .lattice import index_holes
    from .peaks import find_holes

    if mask is not None and not mask.any():
        mask = None
    try:
        holes = find_holes(img, mask=mask, **search)
        lattice = index_holes(holes.peaks, pitch_px=holes.pitch_px)
        valid = lattice.valid
        grid = fit_grid(
            holes.peaks[valid], lattice.indices[valid], pitch=pitch, backend=search["backend"]
        )
    except CcdgridError as exc:
        raise CcdgridError(f"the {label} image's holes could not be measured: {exc}") from exc
    if polarity is not None:
        from .pipeline import _dark_between, _looks_inverted

        below = _dark_between(img, holes, grid, valid)
        if _looks_inverted(below):
            warnings.warn(
                f"the {label} image's holes, measured as the detector file's {polarity} "
                f"holes, look like the plate between holes of the other polarity (the "
                f"middles of the lattice's cells lie {below:.1f} times their contrast below "
                "their background): is it an image of the calibrated plate, with its polarity?",
                UserWarning,
                stacklevel=3,
            )
    norm = np.hypot(grid.displacement[:, 0], grid.displacement[:, 1])
    return GridResidual(
        n_found=len(holes.peaks),
        n_holes=len(norm),
        points=holes.peaks[valid],
        indices=grid.indices,
        residuals=grid.displacement,
        pitch_px=float(np.mean(np.hypot(grid.vectors[:, 0], grid.vectors[:, 1]))),
        mean_px=float(norm.mean()),
        rms_px=float(np.sqrt(np.mean(norm**2))),
        max_px=float(norm.max()),
        pixel_size=tuple(float(v) for v in grid.pixel_size),
        grid=grid,
    )


def _cross_validation_of(detector):
    """The detector's cross-validation, or one computed from its hole record, or None.

    A :class:`~ccdgrid.pipeline.Calibration` carries it; a loaded detector
    file holds the fitted holes (``grid["ideal"]``, ``grid["displacement"]``,
    ``grid["indices"]``) and the smoothing and trend degree used, enough to
    compute it again.
    """
    import numpy as np

    from .cross_validation import cross_validate

    cv = getattr(detector, "cross_validation", None)
    if cv is not None:
        return cv
    grid = getattr(detector, "grid", None)
    get = grid.get if isinstance(grid, dict) else lambda key: getattr(grid, key, None)
    ideal, disp, indices = get("ideal"), get("displacement"), get("indices")
    if grid is None or ideal is None or disp is None or indices is None:
        return None
    params = getattr(detector, "params", None) or {}
    resolved = params.get("resolved", {}) if isinstance(params, dict) else {}
    method = resolved.get("map_method", "tps")
    disp = np.asarray(disp, dtype=np.float64)
    try:
        return cross_validate(
            np.asarray(ideal, dtype=np.float64) - disp,
            disp,
            k=min(int(params.get("cv_folds") or 5), len(disp)),
            indices=np.asarray(indices, dtype=np.int64),
            method=method if method in ("tps", "cubic") else "tps",
            smoothing=resolved.get("smoothing"),
            degree=resolved.get("map_degree"),
            order=resolved.get("map_order"),
            scale_px=resolved.get("pitch_px"),
        )
    except CcdgridError:
        return None


# -- command line ------------------------------------------------------------

_EPILOG = """\
what it does:
  Corrects IMAGE with the detector's distortion maps (flux-conserving, normalised
  by coverage), finds its holes again, fits an affine lattice and prints how far
  the holes are from it, for the corrected and the original image. This is a
  self-consistency check; the accuracy of the maps is their cross-validated
  error, also printed when the detector file holds its holes.

examples:
  ccdgrid validate grid.edf -d grid_detector.h5
  ccdgrid validate grid.edf -d grid_detector.h5 --max-mean 0.001 --json check.json
"""


def add_validate_parser(subparsers, *, parents=()):
    """Add the ``validate`` subcommand to the ``ccdgrid`` command line.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers`` returned.
    parents : sequence of argparse.ArgumentParser
        Parent parsers whose options the subcommand shares. Without any, the
        subcommand defines ``--debug`` itself (the command line's ``main``
        reads ``args.debug``); pass a parent only if it defines ``--debug``.

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser; it sets ``args.run`` to :func:`run_validate`.
    """
    import argparse

    parser = subparsers.add_parser(
        "validate",
        parents=list(parents),
        help="correct a grid image with a detector file and measure its holes again",
        description="Check a calibration: correct the grid image with the detector's\n"
        "distortion and report how far its holes are from a perfect lattice.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "image", metavar="IMAGE", help="grid image (anything `ccdgrid calibrate` reads)"
    )
    parser.add_argument(
        "-d", "--detector", required=True, metavar="FILE", help="detector file (.h5)"
    )
    parser.add_argument("--mask", metavar="FILE", help="mask image, non-zero = bad pixel")
    parser.add_argument(
        "--frame", type=_frame, metavar="N", help="frame of a multi-frame file (0-based)"
    )
    parser.add_argument(
        "--pitch",
        metavar="LENGTH",
        help="hole pitch, e.g. 5mm, for the pixel size of the corrected grid "
        "(default: the detector file's)",
    )
    parser.add_argument(
        "--detector-mask",
        action="store_true",
        help="leave out the pixels the detector masks (by default only IMAGE's bad pixels)",
    )
    parser.add_argument(
        "--max-mean",
        type=float,
        metavar="PITCH",
        help="fail (exit 1) if the corrected mean mis-placement exceeds this, in pitch units",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--backend", choices=("cython", "numpy"), default="cython")
    if not parents:
        parser.add_argument(
            "--debug", action="store_true", help="show the full traceback of an error"
        )
    parser.set_defaults(run=run_validate)
    return parser


def _frame(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def run_validate(args):
    """Run ``ccdgrid validate`` from parsed arguments; print the summary.

    Raises
    ------
    CcdgridError
        Bad input, or a corrected mean mis-placement above ``--max-mean``.
    """
    import json

    from .detector_file import load
    from .io import read_image
    from .units import parse_length

    pitch = None if args.pitch is None else parse_length(args.pitch)
    image, info = read_image(args.image, frame=args.frame)
    detector = load(args.detector)
    result = validate(
        image,
        detector,
        pitch=pitch,
        mask=args.mask,
        detector_mask=args.detector_mask,
        backend=args.backend,
    )
    print(f"image {info['path']}, detector {args.detector}")
    print(result.summary())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result.as_dict(), fh, indent=2)
            fh.write("\n")
    if args.max_mean is not None and result.corrected.mean_pitch > args.max_mean:
        raise CcdgridError(
            f"validation failed: mean mis-placement {result.corrected.mean_pitch:.5f} pitch "
            f"exceeds --max-mean {args.max_mean}"
        )
