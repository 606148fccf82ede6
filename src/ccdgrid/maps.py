"""Stage 4: displacement maps ``dx``, ``dy`` on the pixel-corner grid.

The displacement measured at the holes, ``d = ideal - measured`` in pixels, is
interpolated to the ``(ny + 1, nx + 1)`` pixel corners, corner ``(i, j)`` being
at index coordinates ``(i - 0.5, j - 0.5)``. That is where pyFAI's
``Detector.set_dx``/``set_dy`` put the values (pyFAI places corner ``(i, j)`` at
``(i, j)`` in its own coordinates, which are index coordinates + 0.5). The
seed tutorial evaluates at integer index coordinates instead, half a pixel off.

Default method ``"tps"``: a smoothing thin-plate spline with a polynomial
trend through the holes (the function of
``scipy.interpolate.RBFInterpolator(kernel="thin_plate_spline")``, solved here
by Cholesky on the complement of the trend), evaluated on a coarse grid that
covers the corner grid (kernel sums by a compiled kernel,
``ccdgrid._ext._tps``, and its numpy twin), then upsampled with a bicubic spline (a compiled
kernel, ``ccdgrid._ext._upsample``, and its numpy twin); the smoothing is
chosen by generalised cross-validation (GCV) unless given. ``"cubic"``: the
tutorial's piecewise-cubic ``griddata``, for comparison.

:func:`cross_validate` measures how well such a map predicts a hole it was
not fitted to (k-fold cross-validation): the honest accuracy figure of a
calibration, where the residual at the holes only says how much the
smoothing removed.
"""

import functools
import itertools
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import linalg, ndimage
from scipy.interpolate import BSpline, CloughTocher2DInterpolator, RectBivariateSpline
from scipy.spatial import ConvexHull, QhullError, cKDTree

from ._blas import one_blas_thread
from ._ext import _tps as _tps_cython
from ._ext import _upsample as _upsample_cython
from ._reference import tps as _tps_numpy
from ._reference import upsample as _upsample_numpy
from ._validation import as_points, check_backend
from .errors import CcdgridError

__all__ = [
    "CrossValidation",
    "DisplacementMaps",
    "cross_validate",
    "displacement_maps",
    "hull_mask",
]

METHODS = ("tps", "cubic")
_MIN_POINTS = 4
_UPSAMPLE = {"cython": _upsample_cython, "numpy": _upsample_numpy}
_TPS = {"cython": _tps_cython, "numpy": _tps_numpy}
_BLOCK_ROWS = 256  # corner rows evaluated at a time (bounds the float64 temporaries)
_GCV_GRID = np.logspace(-6, 3, 37)  # smoothing values tried, in units of pitch²
# GCV needs an O(N³) eigendecomposition; above this many holes it runs on the holes
# nearest the centroid: the same density, hence about the same optimal smoothing
_GCV_MAX_POINTS = 500
# Above this many holes the thin-plate spline is fitted tile by tile: one solve
# costs O(N³) time and 8 N² bytes (7 000 holes, a 24 px pitch at 2048²: 2.7 s
# and 0.4 GB; 29 000 at 4096²: 6.7 GB). Tiles hold ~_TILE_CORE holes of their
# own, are fitted with _TILE_MARGIN pitches of holes around them and blended
# over +-_TILE_BLEND pitches of their boundaries.
_TILE_ABOVE = 2500
_TILE_CORE = 1000
_TILE_MARGIN = 6.0
_TILE_BLEND = 2.0
_TILE_MIN_POINTS = 300
# cross-validation stops after the fold that brings the predicted holes to this many
_CV_MAX_HOLES = 600


@dataclass
class DisplacementMaps:
    """Displacement maps on the pixel-corner grid and their validity mask.

    Attributes
    ----------
    dx, dy : ndarray of shape (ny + 1, nx + 1), float32, px
        Displacement at the pixel corners; corner ``(i, j)`` is at index
        coordinates ``(i - 0.5, j - 0.5)``. The true position of a corner is
        its nominal position plus ``(dy, dx)`` (pyFAI's ``set_dx``/``set_dy``).
    mask : ndarray of shape (ny, nx), int8
        1 where the pixel centre lies outside the convex hull of the holes
        (grown by ``hull_margin`` px); the maps are only extrapolated there.
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.
    method : str
        ``"tps"`` or ``"cubic"``.
    smoothing : float or None
        Thin-plate smoothing used, in units of pitch² (``None`` for cubic).
    smoothing_scores : dict or None
        GCV scores ``{"smoothing": (K,), "score": (K,)}`` (of the degree
        used) when the smoothing was chosen automatically; with the degree
        chosen too, ``"degree_scores"``: best score per degree tried.
    scale_px : float, px
        Length unit of the thin-plate fit (the hole spacing).
    coarse_step : tuple of 2 float or None, px
        Spacing of the coarse evaluation grid (``None`` for cubic).
    fit_residual_rms : float, px
        RMS of (map at the holes - displacement given there): what the
        smoothing removed.
    degree : int or None
        Degree of the polynomial trend of the thin-plate fit (None for cubic).
    gcv_basis : object or None
        What a GCV of the same plate moved a little may reuse (pass this
        object as ``previous`` to :func:`displacement_maps`): the eigenbasis
        of the GCV's projected kernel matrix and the points fitted. It holds
        ``8 (m - p)²`` bytes of eigenvectors for the ``m <= 500`` holes the
        GCV ran on (``p`` trend terms), plus ``O(m p + N)`` more: ~2 MB
        whatever the number of holes (1.9 MB at 4096², 1557 holes). None
        when the smoothing was not chosen by GCV. Opaque, not compared, not
        saved.
    """

    dx: np.ndarray
    dy: np.ndarray
    mask: np.ndarray
    shape: tuple
    method: str
    smoothing: object
    smoothing_scores: object
    scale_px: float
    coarse_step: object
    fit_residual_rms: float
    degree: object = None
    gcv_basis: object = field(default=None, repr=False, compare=False)

    def evaluate(self, points):
        """Bilinear interpolation of the corner maps at arbitrary points.

        Parameters
        ----------
        points : array_like of shape (M, 2), float, px
            ``(y, x)`` index coordinates. Points outside the corner grid take
            the value of the nearest edge.

        Returns
        -------
        ndarray of shape (M, 2), float64, px
            ``(dy, dx)`` at the points.
        """
        return _bilinear_corners(self.dy, self.dx, as_points(points, "points"))


@one_blas_thread
def displacement_maps(
    points,
    displacement,
    shape,
    *,
    method="tps",
    smoothing=None,
    scale_px=None,
    coarse_step=None,
    hull_margin=0.0,
    degree=None,
    previous=None,
    previous_rows=None,
    backend="cython",
):
    """Interpolate hole displacements to the pixel-corner grid.

    Parameters
    ----------
    points : array_like of shape (N, 2), float, px
        Measured ``(y, x)`` hole centres, index coordinates.
    displacement : array_like of shape (N, 2), float, px
        ``(dy, dx) = ideal - measured`` at each hole.
    shape : tuple of 2 int
        ``(ny, nx)`` of the image; the maps have shape ``(ny + 1, nx + 1)``.
    method : {"tps", "cubic"}
        ``"tps"``: smoothing thin-plate spline (recommended). ``"cubic"``:
        ``scipy.interpolate.griddata``'s cubic (Clough-Tocher) interpolant, no
        smoothing, outside the hull filled with the nearest valid corner.
    smoothing : float or "auto" or None
        Thin-plate smoothing in units of ``scale_px²`` (the value added to
        the diagonal of the kernel matrix when lengths are measured in hole
        spacings). None or "auto": chosen by generalised cross-validation
        (GCV) among 37 values from 1e-6 to 1e3. 0 interpolates exactly.
    scale_px : float or None, px
        Length unit of the fit; None: the median nearest-neighbour distance
        of the holes (the pitch).
    coarse_step : float or None, px
        Spacing of the coarse grid on which the spline is evaluated before
        bicubic upsampling. None: ``clip(scale_px / 2, 8, 48)``.
    hull_margin : float, px
        Grow (> 0) or shrink (< 0) the convex hull of the holes by this
        distance before deciding which pixels are valid.
    degree : int or None
        Degree (1-5) of the polynomial trend fitted with the spline (not
        smoothed). None: with automatic smoothing and at most 500 holes,
        chosen together with the smoothing by GCV among the degrees 1-4
        that have at least two holes per polynomial term; otherwise 4 with
        at least 60 holes, 3 with at least 30, else 1.
    previous : DisplacementMaps or None
        Maps of the same plate, from holes that were (mostly) these ones
        before a small move: its GCV eigenbasis (``gcv_basis``) is reused
        where that is exact enough (see Notes). None: none.
    previous_rows : array_like of shape (N,), int, or None
        For each point, its row in the points ``previous`` was fitted to,
        -1 for a point it did not have; None: the same points in the same
        order.
    backend : {"cython", "numpy"}
        Engine of the thin-plate kernel sums and of the bicubic upsampling
        to the corner grid.

    Returns
    -------
    DisplacementMaps

    Raises
    ------
    CcdgridError
        On bad shapes, non-finite values, fewer than 4 holes (or too few for
        ``degree``), holes on one line, an unknown method or a negative
        smoothing.

    Notes
    -----
    Corner ``(i, j)`` is evaluated at index coordinates ``(i - 0.5, j - 0.5)``;
    the coarse grid has nodes exactly at the first and last corner, so the
    bicubic upsampling never extrapolates (the spline is smooth at that
    scale: against the spline evaluated at every corner, 48 px steps leave
    2e-5 to 9e-5 px RMS and 2e-4 to 1.6e-3 px at most, on 4096² and 2048²
    FReLoN-like images). With ``N`` holes the fit costs O(N³) (the
    Cholesky factorisation; ~0.05 s for 1500 holes); above 2500 holes (a
    dense plate: ~7 000 holes at a 24 px pitch on 2048²) the spline is fitted
    tile by tile and blended (``_TiledThinPlate``: 0.6 s instead of 3.4 s and
    O(tile²) instead of 8 N² bytes at 7 000 holes, within a tenth of the
    holes' noise of the single fit), the coarse grid
    O(M N) kernel terms for its ``M`` nodes (~2 ns a term on one AVX2
    core: ~0.02 s for 7600 nodes and 1500 holes at 4096²); the
    upsampling costs a few operations per corner, computed row by row from
    each corner's four B-spline weights per axis and written straight into
    the float32 maps (no full-size temporary). BLAS runs on one thread here
    (see ``ccdgrid._blas``).

    The polynomial trend matters under strong distortion: the thin-plate
    part then only models what the polynomial leaves, which it interpolates
    better between the holes.

    GCV picks ``s`` minimising ``N |(I - H(s)) d|² / tr(I - H(s))²`` where
    ``H(s)`` is the thin-plate smoother matrix, from one eigendecomposition
    of the kernel matrix projected on the complement of the polynomial
    part, shared by every trend degree tried (see ``_gcv_scores``). Above
    500 holes it runs on the 500 holes nearest the centroid (an
    O(N³) eigendecomposition otherwise): same density, same noise, hence
    about the same best ``s`` (checked at 4096²: the same value as with all
    1557 holes).

    With ``previous`` whose GCV ran on holes that are all among these ones,
    the GCV runs on those holes again, from their previous eigenbasis (see
    ``_reused_gcv_scores``): the projected kernel of a plate moved by a
    similarity is the previous one times the scale², so only the new
    displacement is projected (~1 ms instead of ~30 ms for 500 holes),
    when the holes depart from a similarity of the previous ones by at
    most 0.005 pitch RMS. The scores are exact for a similarity (to 1e-12)
    and differ from a GCV on the new holes by about ten times that
    departure, relative: a plate moved by (3.4, -2.7) px and 20 mdeg at
    4096² departs by 2e-4 pitch (the centres' noise and the distortion's
    change), its scores by 0.2 %, and the same smoothing is chosen.
    """
    check_backend(backend)
    pts = as_points(points, "points")
    disp = as_points(displacement, "displacement")
    if len(disp) != len(pts):
        raise CcdgridError(
            f"`displacement` must have one row per point ({len(pts)}), got {len(disp)}"
        )
    if not (np.all(np.isfinite(pts)) and np.all(np.isfinite(disp))):
        raise CcdgridError("`points` and `displacement` must be finite")
    ny, nx = _check_shape(shape)
    if method not in METHODS:
        raise CcdgridError(f"`method` must be one of {METHODS}, got {method!r}")
    reuse = _previous_rows(previous, previous_rows, len(pts))
    if len(pts) < _MIN_POINTS:
        raise CcdgridError(f"too few holes to map a displacement: {len(pts)}, need {_MIN_POINTS}")
    try:
        hull = ConvexHull(pts)
    except QhullError:
        raise CcdgridError("too few holes: the holes lie on one line") from None
    if scale_px is None:
        scale_px = float(np.median(cKDTree(pts).query(pts, k=2)[0][:, 1]))
    scale_px = _positive(scale_px, "scale_px")
    hull_margin = float(hull_margin)
    mask = hull_mask(hull.equations, (ny, nx), margin=hull_margin)

    if method == "cubic":
        dy, dx = _cubic_maps(pts, disp, ny, nx)
        fit = _bilinear_corners(dy, dx, pts)
        return DisplacementMaps(
            dx=dx,
            dy=dy,
            mask=mask,
            shape=(ny, nx),
            method="cubic",
            smoothing=None,
            smoothing_scores=None,
            scale_px=scale_px,
            coarse_step=None,
            fit_residual_rms=_rms(fit - disp),
        )

    scores = None
    auto_degree = degree is None
    degree = _check_degree(degree, len(pts))
    gcv_basis = None
    if smoothing is None or (isinstance(smoothing, str) and smoothing == "auto"):
        keep = {}
        sub = _reused_subset(*reuse) if reuse is not None else None
        if sub is None:
            sub = _central_subset(pts, _GCV_MAX_POINTS)
            scorer = functools.partial(
                _gcv_scores, pts[sub] / scale_px, disp[sub], backend=backend, keep=keep
            )
        else:
            scorer = functools.partial(
                _reused_gcv_scores,
                reuse[0],
                pts[sub] / scale_px,
                disp[sub],
                backend=backend,
                keep=keep,
            )
        # with all holes in the GCV, it also picks the trend's degree; on a
        # central subset it would judge the trend on part of the field only
        degrees = _candidate_degrees(len(pts)) if auto_degree and len(sub) == len(pts) else None
        smoothing, scores, degree = _gcv_choice(
            pts[sub] / scale_px, disp[sub], degree, degrees, backend, scorer
        )
        if "basis" in keep:
            gcv_basis = replace(keep["basis"], rows=sub, points=pts.copy())
    smoothing = _non_negative(smoothing, "smoothing")
    if coarse_step is None:
        coarse_step = float(np.clip(scale_px / 2.0, 8.0, 48.0))
    coarse_step = _positive(coarse_step, "coarse_step")

    rbf, degree = _fit_tps(pts / scale_px, disp, smoothing, degree, backend)
    yc = _coarse_axis(ny, coarse_step)
    xc = _coarse_axis(nx, coarse_step)
    nodes = np.stack(np.meshgrid(yc, xc, indexing="ij"), axis=-1).reshape(-1, 2)
    coarse = rbf(nodes / scale_px).reshape(len(yc), len(xc), 2)
    dy, dx = _upsample(yc, xc, coarse, ny, nx, backend)
    return DisplacementMaps(
        dx=dx,
        dy=dy,
        mask=mask,
        shape=(ny, nx),
        method="tps",
        smoothing=float(smoothing),
        smoothing_scores=scores,
        scale_px=scale_px,
        coarse_step=(float(yc[1] - yc[0]), float(xc[1] - xc[0])),
        fit_residual_rms=_rms(rbf.residual_at_centres()),
        degree=degree,
        gcv_basis=gcv_basis,
    )


@dataclass
class CrossValidation:
    """k-fold cross-validated error of the displacement maps at the holes.

    Every hole is predicted by a map fitted without it (and without the rest
    of its fold), with the smoothing and trend of the full fit.

    Attributes
    ----------
    k : int
        Number of folds.
    folds : ndarray of shape (N,), int64
        Fold of each hole, ``0 .. k - 1``.
    predicted : ndarray of shape (N, 2), float64, px
        ``(dy, dx)`` predicted at each hole by the map fitted without its
        fold; NaN where it was not predicted (fold not evaluated, see
        ``max_holes``) or cannot be (``"cubic"`` outside the training holes'
        hull).
    folds_evaluated : int
        Folds whose holes were predicted (the first ones, ``0 ..``).
    residuals : ndarray of shape (N, 2), float64, px
        ``predicted - displacement``.
    n_evaluated : int
        Holes with a finite prediction (all of them for ``"tps"``).
    rms_px, mean_px, max_px : float, px
        RMS, mean and largest ``|residual|`` over the evaluated holes.
    in_sample_rms_px : float, px
        RMS of (full fit - displacement) at the holes: what the smoothing
        removed, the figure the cross-validated one is to be compared with.
    scale_px : float, px
        Hole spacing, the unit of the ``*_pitch`` figures.
    method : str
        ``"tps"`` or ``"cubic"``.
    smoothing : float or None
        Thin-plate smoothing used by every fold, pitch² units.
    degree : int or None
        Polynomial trend degree used (``None`` for cubic).
    seconds : float, s
        Wall time of the k fits.
    """

    k: int
    folds: np.ndarray
    folds_evaluated: int
    predicted: np.ndarray
    residuals: np.ndarray
    n_evaluated: int
    rms_px: float
    mean_px: float
    max_px: float
    in_sample_rms_px: float
    scale_px: float
    method: str
    smoothing: object
    degree: object
    seconds: float

    @property
    def rms_pitch(self):
        """RMS residual in units of the hole spacing."""
        return self.rms_px / self.scale_px

    @property
    def mean_pitch(self):
        """Mean residual in units of the hole spacing."""
        return self.mean_px / self.scale_px

    @property
    def max_pitch(self):
        """Largest residual in units of the hole spacing."""
        return self.max_px / self.scale_px

    def folds_text(self):
        """``"5-fold"``, or ``"5-fold (2 folds evaluated)"`` when stopped early."""
        text = f"{self.k}-fold"
        if self.folds_evaluated < self.k:
            text += f" ({self.folds_evaluated} folds evaluated)"
        return text

    def summary(self):
        """One line for humans."""
        return (
            f"{self.folds_text()} cross-validated map error at {self.n_evaluated} holes: "
            f"RMS {self.rms_px:.4f} px, max {self.max_px:.4f} px "
            f"({self.rms_pitch:.5f} / {self.max_pitch:.5f} pitch; "
            f"in-sample RMS {self.in_sample_rms_px:.4f} px)"
        )


@one_blas_thread
def cross_validate(
    points,
    displacement,
    *,
    k=5,
    indices=None,
    method="tps",
    smoothing=None,
    degree=None,
    scale_px=None,
    max_holes=_CV_MAX_HOLES,
    backend="cython",
    in_sample_rms=None,
):
    """k-fold cross-validated error of the displacement maps at the holes.

    The holes are split into ``k`` spatially interleaved folds; the map is
    fitted ``k`` times, each time without one fold, and evaluated at the
    holes left out. The error there (predicted - measured displacement) is
    the accuracy figure of a calibration: unlike the residual of the full
    fit, it cannot be made small by a map that merely follows the noise.

    Parameters
    ----------
    points : array_like of shape (N, 2), float, px
        Measured ``(y, x)`` hole centres, index coordinates.
    displacement : array_like of shape (N, 2), float, px
        ``(dy, dx) = ideal - measured`` at each hole.
    k : int
        Number of folds, ``2 <= k <= N``.
    indices : array_like of shape (N, 2), int, or None
        Lattice indices ``(i, j)`` of the holes. Hole ``(i, j)`` goes to fold
        ``(i + 2 j) mod k`` (``(i + j) mod k`` for ``k < 4``): none of its
        four nearest neighbours shares its fold, so every left-out hole is
        predicted from its neighbours one pitch away. None: the indices of
        the ``scale_px`` cells the holes fall in.
    method : {"tps", "cubic"}
        The map's method (see :func:`displacement_maps`).
    smoothing : float, "auto" or None
        Thin-plate smoothing, pitch² units, used for every fold (pass the
        full map's ``DisplacementMaps.smoothing``). None or "auto": chosen
        once by GCV on all holes, as :func:`displacement_maps` does.
    degree : int or None
        Trend degree (pass ``DisplacementMaps.degree``); None: chosen from
        the number of holes of one training set.
    scale_px : float or None, px
        Hole spacing (fit length unit and unit of the ``*_pitch`` figures);
        None: the median nearest-neighbour distance.
    max_holes : int or None
        Stop after the fold that brings the number of predicted holes to at
        least this (each fold is spread evenly over the plate, so a few
        folds sample all of it); None: every fold. The default, 600, covers
        every hole of a 2048² FReLoN image (~400) and 2 of the 5 folds at
        4096² (~1500 holes), where each fit costs ~0.1 s.
    backend : {"cython", "numpy"}
        Engine of the thin-plate kernel sums.
    in_sample_rms : float or None, px
        RMS residual of the map fitted to all the holes with the same
        ``smoothing`` and ``degree`` (``DisplacementMaps.fit_residual_rms``),
        reported beside the cross-validated figure; None: fit it here (one
        more thin-plate solve, ~40 ms at 4096²).

    Returns
    -------
    CrossValidation

    Raises
    ------
    CcdgridError
        Bad shapes or values, ``k`` out of range, or a training set too
        small for the thin-plate system.

    Notes
    -----
    The residual at a left-out hole is the map's prediction error there
    *plus* the error of that hole's measured centre (~0.02 px on FReLoN-like
    images), so it is an upper bound on the map's error, and it is measured
    with the holes ``1/k`` sparser than in the real map. Holes on the edge of
    the plate are extrapolated when left out, so the largest residuals are
    there. The spline is evaluated directly at the holes, not through the
    coarse grid and bicubic upsampling of :func:`displacement_maps` (they
    agree to ~1e-4 px). Cost: up to ``k`` thin-plate fits on ``(k-1)/k`` of
    the holes, O(k N³); 0.03-0.08 s for 400 holes and k = 5 on a 2-core
    machine.
    """
    t0 = time.perf_counter()
    check_backend(backend)
    pts = as_points(points, "points")
    disp = as_points(displacement, "displacement")
    n = len(pts)
    if len(disp) != n:
        raise CcdgridError(f"`displacement` must have one row per point ({n}), got {len(disp)}")
    if not (np.all(np.isfinite(pts)) and np.all(np.isfinite(disp))):
        raise CcdgridError("`points` and `displacement` must be finite")
    if method not in METHODS:
        raise CcdgridError(f"`method` must be one of {METHODS}, got {method!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise CcdgridError(
            f"`k` must be an integer from 2 to the number of holes ({n}), got {k!r}"
        )
    k = int(k)
    if scale_px is None:
        scale_px = float(np.median(cKDTree(pts).query(pts, k=2)[0][:, 1]))
    scale_px = _positive(scale_px, "scale_px")
    if indices is None:
        cells = np.floor(pts / scale_px + 0.5).astype(np.int64)
    else:
        cells = np.asarray(indices)
        if cells.shape != pts.shape or not np.issubdtype(cells.dtype, np.integer):
            raise CcdgridError(
                f"`indices` must be integers of the shape of `points` {pts.shape}, "
                f"got {cells.dtype} {cells.shape}"
            )
    folds = _interleaved_folds(cells, k)
    n_train = n - int(np.bincount(folds, minlength=k).max())
    if n_train < _MIN_POINTS:
        raise CcdgridError(
            f"too few holes to cross-validate: {n_train} in the smallest training set, "
            f"need {_MIN_POINTS}"
        )

    if max_holes is not None:
        max_holes = int(_positive(max_holes, "max_holes"))
    order = range(k)
    if max_holes is not None:
        reached = np.cumsum(np.bincount(folds, minlength=k)) >= max_holes
        order = range(int(np.argmax(reached)) + 1 if reached.any() else k)

    predicted = np.full((n, 2), np.nan)
    if method == "tps":
        degree = _check_degree(degree, n_train)
        if smoothing is None or (isinstance(smoothing, str) and smoothing == "auto"):
            sub = _central_subset(pts, _GCV_MAX_POINTS)
            smoothing, _ = _gcv_smoothing(pts[sub] / scale_px, disp[sub], degree, backend)
        smoothing = _non_negative(smoothing, "smoothing")
        unit = pts / scale_px
        if in_sample_rms is None:
            full, _ = _fit_tps(unit, disp, smoothing, degree, backend)
            in_sample = _rms(full.residual_at_centres())
        else:
            in_sample = _non_negative(in_sample_rms, "in_sample_rms")
        for f in order:
            test = folds == f
            if test.any():
                rbf, _ = _fit_tps(unit[~test], disp[~test], smoothing, degree, backend)
                predicted[test] = rbf(unit[test])
    else:
        smoothing = degree = None
        in_sample = 0.0  # the cubic interpolant passes through every hole
        for f in order:
            test = folds == f
            if test.any():
                predicted[test] = CloughTocher2DInterpolator(pts[~test], disp[~test])(pts[test])
    residuals = predicted - disp
    norm = np.hypot(residuals[:, 0], residuals[:, 1])
    ok = np.isfinite(norm)
    if not ok.any():
        raise CcdgridError("no hole could be predicted from the others")
    return CrossValidation(
        k=k,
        folds=folds,
        folds_evaluated=len(order),
        predicted=predicted,
        residuals=residuals,
        n_evaluated=int(ok.sum()),
        rms_px=float(np.sqrt(np.mean(norm[ok] ** 2))),
        mean_px=float(norm[ok].mean()),
        max_px=float(norm[ok].max()),
        in_sample_rms_px=float(in_sample),
        scale_px=scale_px,
        method=method,
        smoothing=None if smoothing is None else float(smoothing),
        degree=degree,
        seconds=time.perf_counter() - t0,
    )


def _interleaved_folds(cells, k):
    """Fold ``(i + m j) mod k`` of each lattice cell, ``m = 2`` (``1`` for k < 4).

    With ``m = 2`` and ``k >= 4`` the four nearest neighbours of a hole,
    ``(i ± 1, j)`` and ``(i, j ± 1)``, are all in other folds than its own.
    """
    m = 2 if k >= 4 else 1
    return np.mod(cells[:, 0] + m * cells[:, 1], k).astype(np.int64)


def _fit_tps(pts, disp, smoothing, degree, backend="cython"):
    """``(spline, degree used)``: a polynomial trend, else an affine one.

    Holes along a few lines (a narrow strip of plate) leave a quartic trend
    undetermined: the trend's monomials are then rank-deficient. Above
    ``_TILE_ABOVE`` holes the spline is a :class:`_TiledThinPlate`.
    """
    if len(pts) > _TILE_ABOVE:
        tiled = _TiledThinPlate(pts, disp, smoothing, degree, backend)
        return tiled, tiled.degree
    return _single_tps(pts, disp, smoothing, degree, backend)


def _single_tps(pts, disp, smoothing, degree, backend):
    for deg in dict.fromkeys((degree, 1)):
        try:
            return _ThinPlate(pts, disp, smoothing, deg, backend), deg
        except (np.linalg.LinAlgError, linalg.LinAlgError):
            continue
    raise CcdgridError("too few holes: the thin-plate spline system is singular")


class _TiledThinPlate:
    """Smoothing thin-plate splines fitted tile by tile and blended.

    The bounding box of the centres is cut into a grid of tiles whose
    boundaries are quantiles of the centres' coordinates (so that tiles hold
    about ``_TILE_CORE`` centres each). Each tile's spline is fitted to the
    centres within ``_TILE_MARGIN`` units of it (at least
    ``_TILE_MIN_POINTS``, the nearest ones), so that it is not extrapolating
    where it is used; the splines are blended with a C¹ partition of unity
    that ramps over ``+-_TILE_BLEND`` units around every boundary. Cost
    O(N · tile²) instead of O(N³), memory O(tile²) instead of O(N²).

    A smoothing spline is local in effect (a centre's influence on the fit
    decays over a few spacings once the smoothing is set), so the blend of
    overlapping fits differs from the single fit by much less than the
    noise of the holes (tested against the single spline).

    Parameters and the call are those of :class:`_ThinPlate`; ``degree``
    is the trend degree every tile used (the lowest, if a tile had to fall
    back to an affine trend).
    """

    def __init__(self, pts, disp, smoothing, degree, backend="cython"):
        self.centres = np.ascontiguousarray(pts, dtype=np.float64)
        self.values = np.asarray(disp, dtype=np.float64)
        self.smoothing = float(smoothing)
        n = len(self.centres)
        lo, hi = self.centres.min(axis=0), self.centres.max(axis=0)
        extent = np.maximum(hi - lo, 1e-9)
        n_tiles = -(-n // _TILE_CORE)
        ty = max(1, round(np.sqrt(n_tiles * extent[0] / extent[1])))
        tx = max(1, -(-n_tiles // ty))
        # each tile's core at least two blend widths wide: weights stay separable
        ty = int(min(ty, max(1, extent[0] // (4 * _TILE_BLEND))))
        tx = int(min(tx, max(1, extent[1] // (4 * _TILE_BLEND))))
        self.cuts = (
            _quantile_cuts(self.centres[:, 0], ty),
            _quantile_cuts(self.centres[:, 1], tx),
        )
        tree = cKDTree(self.centres)
        self.tiles = []
        degrees = []
        for (y0, y1), (x0, x1) in itertools.product(
            zip(*_bounds(self.cuts[0]), strict=True), zip(*_bounds(self.cuts[1]), strict=True)
        ):
            near = (
                (self.centres[:, 0] >= y0 - _TILE_MARGIN)
                & (self.centres[:, 0] <= y1 + _TILE_MARGIN)
                & (self.centres[:, 1] >= x0 - _TILE_MARGIN)
                & (self.centres[:, 1] <= x1 + _TILE_MARGIN)
            )
            idx = np.flatnonzero(near)
            if len(idx) < _TILE_MIN_POINTS:
                # the tile's middle, its infinite outer bounds taken at the centres' extent
                middle = 0.5 * (np.maximum((y0, x0), lo) + np.minimum((y1, x1), hi))
                idx = np.sort(tree.query(middle, k=min(_TILE_MIN_POINTS, n))[1])
            spline, deg = _single_tps(
                self.centres[idx], self.values[idx], smoothing, degree, backend
            )
            self.tiles.append(spline)
            degrees.append(deg)
        self.degree = min(degrees)
        self.shape = (len(self.cuts[0]) + 1, len(self.cuts[1]) + 1)

    def __call__(self, x):
        """Values at points ``x`` (M, 2) -> (M, 2) float64."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.zeros((len(x), 2))
        wy = _blend_weights(x[:, 0], self.cuts[0])  # (ty, M)
        wx = _blend_weights(x[:, 1], self.cuts[1])  # (tx, M)
        for k, spline in enumerate(self.tiles):
            w = wy[k // self.shape[1]] * wx[k % self.shape[1]]
            used = np.flatnonzero(w > 0)
            if used.size:
                out[used] += w[used, None] * spline(x[used])
        return out

    def residual_at_centres(self):
        """Values at the centres minus the values fitted, (N, 2) float64."""
        return self(self.centres) - self.values


def _quantile_cuts(coord, tiles):
    """Interior tile boundaries along one axis: ``tiles - 1`` quantiles of ``coord``."""
    if tiles <= 1:
        return np.zeros(0)
    return np.quantile(coord, np.arange(1, tiles) / tiles)


def _bounds(cuts):
    """(lower, upper) bounds of the tiles along one axis, infinite at the ends."""
    edges = np.concatenate([[-np.inf], cuts, [np.inf]])
    return edges[:-1], edges[1:]


def _blend_weights(coord, cuts):
    """(tiles, M) C¹ partition of unity along one axis.

    Tile ``t``'s weight is ``S(c_{t-1}) - S(c_t)`` with ``S(c)`` a smoothstep
    from 0 to 1 over ``[c - _TILE_BLEND, c + _TILE_BLEND]``: the weights sum
    to one (the sum telescopes) and vanish beyond a blend width outside the
    tile.
    """
    u = (coord[None, :] - cuts[:, None] + _TILE_BLEND) / (2 * _TILE_BLEND)
    u = np.clip(u, 0.0, 1.0)
    step = u * u * (3.0 - 2.0 * u)  # (tiles - 1, M)
    ones = np.ones((1, len(coord)))
    above = np.concatenate([ones, step, 0.0 * ones])  # S(c_0 = -inf) = 1, S(c_T = +inf) = 0
    return above[:-1] - above[1:]


class _ThinPlate:
    """Smoothing thin-plate spline ``f(x) = sum_i c_i phi(|x - p_i|) + P(x) a``, 2 components.

    ``phi(r) = r² log r``; ``P`` the monomials up to ``degree``. The same
    function as ``scipy.interpolate.RBFInterpolator(kernel="thin_plate_spline",
    smoothing=s, degree=degree)``, solved and evaluated at about half the
    cost: the system ``[[K + s I, P], [P', 0]]`` is reduced to the
    complement of ``P`` (``Q2' (K + s I) Q2``, positive definite) and
    solved by Cholesky, O(N³ / 3) instead of an O(2 N³ / 3) LU. The kernel
    matrix and the values at new points come from the kernel sums of
    ``ccdgrid._ext._tps`` (or their numpy twin), ``phi = r² log(r²) / 2``
    from ``r²`` (no square root), the trend added in the same pass.

    Parameters
    ----------
    pts : ndarray of shape (N, 2), float64
        Centres, in the fit's length unit.
    disp : ndarray of shape (N, 2), float64
        Values at the centres.
    smoothing : float
        Added to the diagonal of the kernel matrix, >= 0.
    degree : int
        Degree of the polynomial trend.
    backend : {"cython", "numpy"}
        Engine of the kernel sums.

    Raises
    ------
    numpy.linalg.LinAlgError
        If the trend is undetermined by the centres or the system is singular.
    """

    def __init__(self, pts, disp, smoothing, degree, backend="cython"):
        self.centres = np.ascontiguousarray(pts, dtype=np.float64)
        self.degree = degree
        self.smoothing = float(smoothing)
        self._engine = _TPS[backend]
        self.shift = self.centres.mean(axis=0)
        self.scale = max(float(np.abs(self.centres - self.shift).max()), 1e-300)
        poly = self._poly(self.centres)
        n, p = poly.shape
        if n <= p:
            raise np.linalg.LinAlgError("fewer centres than trend terms")
        (house, tau), _ = linalg.qr(poly, mode="raw")
        r_diag = np.abs(np.diag(house[:p]))
        if r_diag.min() <= 1e-10 * r_diag.max():
            raise np.linalg.LinAlgError("the trend's monomials are rank-deficient")
        kern = np.empty((n, n))
        self._engine.kernel_matrix(self.centres, float(smoothing), kern)
        rotated = _rotate_symmetric(house, tau, kern)  # upper triangle only
        del kern
        rhs = _apply_q(house, tau, np.asarray(disp, dtype=np.float64), "L")
        # Cholesky of Q2' (K + s I) Q2: positive definite for distinct centres
        y = linalg.cho_solve(linalg.cho_factor(rotated[p:, p:], lower=False), rhs[p:])
        padded = np.zeros((n, y.shape[1]))
        padded[p:] = y
        self.coef = np.ascontiguousarray(
            _apply_q(house, tau, padded, "L", transpose=False)  # c = Q2 y
        )
        # P a = d - (K + s I) c, projected on Q1: R a = Q1' d - (Q1' (K + s I) Q2) y
        upper = np.triu(house[:p])
        self.trend = np.ascontiguousarray(
            linalg.solve_triangular(upper, rhs[:p] - rotated[:p, p:] @ y)
        )

    def residual_at_centres(self):
        """Values at the centres minus the values fitted, (N, 2) float64.

        The solution satisfies ``(K + s I) c + P a = d``, so at the centres
        ``f = K c + P a = d - s c``: no kernel sum over the N² pairs (at
        4096², ~1500 holes, that evaluation cost as much as a fifth of the
        coarse grid's). Exact up to rounding (~1e-12 relative to ``d``).
        """
        return -self.smoothing * self.coef

    def _poly(self, x):
        u = (x - self.shift) / self.scale
        cols = [
            u[:, 0] ** a * u[:, 1] ** (t - a) for t in range(self.degree + 1) for a in range(t + 1)
        ]
        return np.column_stack(cols)

    def __call__(self, x):
        """Values at points ``x`` (M, 2) -> (M, 2) float64."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty((len(x), 2))
        self._engine.evaluate(x, self.centres, self.coef, self.trend, self.shift, self.scale, out)
        return out


def hull_mask(equations, shape, *, margin=0.0):
    """Pixels whose centre lies outside a convex polygon.

    Parameters
    ----------
    equations : array_like of shape (F, 3), float
        Facets ``a y + b x + c <= 0`` inside, with ``(a, b)`` unit normals
        (``scipy.spatial.ConvexHull(points_yx).equations``).
    shape : tuple of 2 int
        ``(ny, nx)``.
    margin : float, px
        Grow (> 0) or shrink (< 0) the polygon by this distance.

    Returns
    -------
    ndarray of shape (ny, nx), int8
        1 outside (invalid, pyFAI's convention), 0 inside. Pixel ``(i, j)``
        is tested at its centre ``(i, j)``.

    Notes
    -----
    Each row meets a convex polygon in one interval of x, so the test costs
    O(ny F) for the intervals plus one comparison per pixel.
    """
    eq = np.asarray(equations, dtype=np.float64)
    ny, nx = shape
    y = np.arange(ny, dtype=np.float64)
    a, b, c = eq[:, 0], eq[:, 1], eq[:, 2] - margin
    lo = np.full(ny, -np.inf)
    hi = np.full(ny, np.inf)
    tiny = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = -(c[None, :] + a[None, :] * y[:, None]) / b[None, :]
    right = b > tiny  # a y + b x + c <= 0  ->  x <= bound
    left = b < -tiny
    if np.any(right):
        hi = np.min(bound[:, right], axis=1)
    if np.any(left):
        lo = np.max(bound[:, left], axis=1)
    flat = ~(right | left)
    if np.any(flat):
        out_row = np.any(a[None, flat] * y[:, None] + c[None, flat] > 0, axis=1)
        lo[out_row], hi[out_row] = np.inf, -np.inf
    # pixel columns first .. last + 1 inside each row, as int32 so that the two
    # full-size comparisons below run on narrow integers
    first = np.clip(np.ceil(lo), 0, nx).astype(np.int32)[:, None]
    stop = np.clip(np.floor(hi) + 1.0, 0, nx).astype(np.int32)[:, None]
    x = np.arange(nx, dtype=np.int32)
    outside = x < first
    # the second comparison by blocks of rows: a full-size temporary would
    # cost as many fresh pages (and their faults) as the mask itself
    block = np.empty((min(ny, _BLOCK_ROWS), nx), dtype=bool)
    for start in range(0, ny, _BLOCK_ROWS):
        stop_row = min(start + _BLOCK_ROWS, ny)
        part = block[: stop_row - start]
        np.greater_equal(x, stop[start:stop_row], out=part)
        outside[start:stop_row] |= part
    return outside.view(np.int8)


def _check_shape(shape):
    try:
        ny, nx = (int(v) for v in shape)
        ok = all(int(v) == v for v in shape)
    except (TypeError, ValueError):
        raise CcdgridError(f"`shape` must be (ny, nx), got {shape!r}") from None
    if not ok or ny < 1 or nx < 1:
        raise CcdgridError(f"`shape` must be two positive integers, got {shape!r}")
    return ny, nx


def _check_degree(degree, n_points):
    """Polynomial degree of the spline's trend: 4, 3 or 1 depending on the holes."""
    if degree is None:
        # quartic trend (15 terms) when there are 4x as many holes, else cubic (10), else affine;
        # measured on generated 2048² images (~380 holes), dense RMS error of the maps,
        # degree 1 / 3 / 4: 0.022 / 0.015 / 0.014 px (strong), 0.008 / 0.004 / 0.003 px (frelon)
        if n_points >= 60:
            return 4
        return 3 if n_points >= 30 else 1
    if degree not in (1, 2, 3, 4, 5) or isinstance(degree, bool):
        raise CcdgridError(f"`degree` must be an integer from 1 to 5 or None, got {degree!r}")
    n_terms = (degree + 1) * (degree + 2) // 2
    if n_points <= n_terms:
        raise CcdgridError(
            f"too few holes ({n_points}) for a degree-{degree} trend ({n_terms} terms)"
        )
    return int(degree)


def _candidate_degrees(n_points):
    """Trend degrees GCV may choose from: at least 2 holes per polynomial term."""
    return [d for d in (1, 2, 3, 4) if n_points >= (d + 1) * (d + 2)] or [1]


def _gcv_choice(pts, disp, degree, degrees, backend="cython", scorer=None):
    """``(smoothing, scores, degree)`` minimising the GCV score.

    ``degrees`` None: the smoothing for ``degree`` alone. Otherwise the pair
    (degree, smoothing) with the lowest score: GCV estimates the
    leave-one-out error of the whole fit, trend included, so scores of
    different degrees compare. It matters with few holes (a coarse pitch,
    a small lit area): 23 holes under a cubic barrel distortion left
    0.20 px RMS between the holes with the affine trend the fixed rule
    gave, 0.016 px with the cubic one GCV picks.

    ``scorer(degrees)`` returns the scores (default: :func:`_gcv_scores`
    of ``pts`` and ``disp``).
    """
    if scorer is None:
        scorer = functools.partial(_gcv_scores, pts, disp, backend=backend)
    if degrees is None:
        smoothing, scores = _gcv_smoothing(pts, disp, degree, backend, scorer)
        return smoothing, scores, degree
    # holes along a few lines leave a trend undetermined
    full_rank = [
        deg
        for deg in degrees
        if np.linalg.matrix_rank(_monomials(pts, deg)) == (deg + 1) * (deg + 2) // 2
    ]
    try:
        by_degree = scorer(full_rank) if full_rank else {}
    except (np.linalg.LinAlgError, linalg.LinAlgError):
        by_degree = {}
    best = None
    for deg, score in by_degree.items():
        k = int(np.argmin(score))
        if np.isfinite(score[k]) and (best is None or score[k] < best[0]):
            best = (float(score[k]), k, deg)
    if best is None:
        smoothing, scores = _gcv_smoothing(pts, disp, degree, backend, scorer)
        return smoothing, scores, degree
    _, k, deg = best
    scores = {
        "smoothing": _GCV_GRID.copy(),
        "score": by_degree[deg],
        "degree_scores": {d: float(v.min()) for d, v in by_degree.items()},
    }
    return float(_GCV_GRID[k]), scores, deg


def _central_subset(pts, limit):
    """Indices of at most ``limit`` points nearest the centroid."""
    if len(pts) <= limit:
        return np.arange(len(pts))
    dist = np.hypot(*(pts - pts.mean(axis=0)).T)
    return np.sort(np.argpartition(dist, limit - 1)[:limit])


def _positive(value, name):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CcdgridError(f"`{name}` must be a positive number, got {value!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise CcdgridError(f"`{name}` must be a positive number, got {value!r}")
    return value


def _non_negative(value, name):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CcdgridError(f"`{name}` must be a number >= 0 or 'auto', got {value!r}") from None
    if not (np.isfinite(value) and value >= 0):
        raise CcdgridError(f"`{name}` must be a number >= 0 or 'auto', got {value!r}")
    return value


def _rms(d):
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1))))


def _coarse_axis(n, step):
    """Nodes from the first corner (-0.5) to the last (n - 0.5), at most ``step`` apart."""
    count = max(int(np.ceil(n / step)), 3) + 1  # bicubic needs >= 4 nodes
    return np.linspace(-0.5, n - 0.5, count)


def _upsample(yc, xc, coarse, ny, nx, backend):
    """Bicubic interpolation of two coarse-grid maps to all corners, float32.

    ``coarse`` (len(yc), len(xc), 2) holds the values at the nodes; the
    interpolating tensor-product spline of each map (scipy's
    ``RectBivariateSpline`` with ``s=0``, its coefficients only) is
    evaluated at corner ``(i, j)``, index coordinates ``(i - 0.5, j - 0.5)``,
    by the kernel from each corner row's and column's four non-zero B-spline
    weights. Returns ``(map 0, map 1)``, each (ny + 1, nx + 1) float32.
    """
    coef = np.empty((2, len(yc), len(xc)))  # s=0: one coefficient per node
    for c in range(2):
        spline = RectBivariateSpline(yc, xc, coarse[..., c], kx=3, ky=3, s=0)
        ty, tx = spline.get_knots()
        coef[c] = spline.get_coeffs().reshape(len(ty) - 4, len(tx) - 4)
    wy, sy = _spline_weights(np.arange(ny + 1, dtype=np.float64) - 0.5, ty, coef.shape[1])
    wx, sx = _spline_weights(np.arange(nx + 1, dtype=np.float64) - 0.5, tx, coef.shape[2])
    out0 = np.empty((ny + 1, nx + 1), dtype=np.float32)
    out1 = np.empty((ny + 1, nx + 1), dtype=np.float32)
    _UPSAMPLE[backend].upsample(coef, wy, sy, wx, sx, out0, out1)
    return out0, out1


def _spline_weights(points, knots, ncoef):
    """``(weights (M, 4) float64, first coefficient (M,) int64)`` of a cubic B-spline basis.

    Every point inside the knots' span has exactly four consecutive non-zero
    basis functions; the checks guard the kernel's preconditions.
    """
    design = BSpline.design_matrix(points, knots, 3)
    cols = design.indices.reshape(-1, 4).astype(np.int64)
    if (
        design.nnz != 4 * len(points)
        or np.any(np.diff(design.indptr) != 4)
        or np.any(np.diff(cols, axis=1) != 1)
        or cols.min() < 0
        or cols.max() >= ncoef
    ):
        raise AssertionError("cubic B-spline design matrix without 4 consecutive weights per row")
    weights = np.ascontiguousarray(design.data.reshape(-1, 4), dtype=np.float64)
    return weights, np.ascontiguousarray(cols[:, 0])


def _gcv_smoothing(pts, disp, degree, backend="cython", scorer=None):
    """``(smoothing, {"smoothing": (K,), "score": (K,)})`` minimising the GCV score."""
    if scorer is None:
        scorer = functools.partial(_gcv_scores, pts, disp, backend=backend)
    score = scorer([degree])[degree]
    best = int(np.argmin(score))
    return float(_GCV_GRID[best]), {"smoothing": _GCV_GRID.copy(), "score": score}


def _gcv_scores(pts, disp, degrees, backend="cython", keep=None):
    """GCV score of every smoothing of ``_GCV_GRID``, for each trend degree.

    Parameters
    ----------
    pts : ndarray of shape (N, 2), float64
        Hole positions in units of the fit's length scale.
    disp : ndarray of shape (N, 2), float64, px
        Displacement at the holes; the score sums both components.
    degrees : list of int
        Trend degrees, each with full-rank monomials at ``pts``.
    backend : {"cython", "numpy"}
        Engine of the kernel matrix.
    keep : dict or None
        If given, ``keep["basis"]`` receives the eigenbasis as a
        :class:`_GcvBasis` (``rows`` None), for :func:`_reused_gcv_scores`.

    Returns
    -------
    dict
        ``{degree: ndarray of shape (K,)}``, ``N |(I - H(s)) d|² / tr(I - H(s))²``.

    Notes
    -----
    The thin-plate smoother with trend ``P`` (the monomials up to the
    degree) and kernel ``K`` has residual operator
    ``I - H = s Q2 (Q2' K Q2 + s I)^-1 Q2'``, ``Q2`` an orthonormal basis of
    the complement of ``P``'s columns. One eigendecomposition
    ``Q2' K Q2 = U diag(lam) U'`` is made, for the lowest degree. A higher
    degree only constrains the solution further, to be orthogonal to its
    extra monomials ``E`` (in those coordinates): with ``B = diag(lam + s)``
    and ``G = E' B^-1 E``, the constrained inverse is
    ``B^-1 - B^-1 E G^-1 E' B^-1``, so its residual and trace cost O(N r²)
    per smoothing (``r`` extra monomials, at most 12) instead of one more
    O(N³) eigendecomposition per degree.
    """
    n = len(pts)
    base = min(degrees)
    n_base = (base + 1) * (base + 2) // 2
    poly = _monomials(pts, max(degrees))  # columns by total degree: the lowest first
    # Q = [Q1 Q2] kept as n_base Householder reflectors: applying them costs
    # O(N² n_base) where products with an explicit Q2 cost O(N³)
    (house, tau), _ = linalg.qr(poly[:, :n_base], mode="raw")
    kern = np.empty((n, n))
    _TPS[backend].kernel_matrix(np.ascontiguousarray(pts, dtype=np.float64), 0.0, kern)
    rotated = _rotate_symmetric(house, tau, kern)  # upper triangle only
    lam, vec = linalg.eigh(rotated[n_base:, n_base:], lower=False, driver="evd")
    lam = np.maximum(lam, 0.0)  # conditionally positive definite: tiny negatives are rounding
    both = _apply_q(house, tau, np.column_stack([disp, poly[:, n_base:]]), "L")[n_base:]
    both = vec.T @ both
    g = both[:, :2]  # (m, 2) displacement in the eigenbasis
    extra = both[:, 2:]  # (m, P - n_base) higher monomials in the eigenbasis
    if keep is not None:
        keep["basis"] = _GcvBasis(
            points=None,
            rows=None,
            nodes=np.array(pts, dtype=np.float64),
            degrees=(base, max(degrees)),
            house=house,
            tau=tau,
            lam=lam,
            vec=vec,
            extra=extra.copy(),
        )
    return _gcv_from_eigenbasis(lam, g, extra, n, n_base, degrees)


def _gcv_from_eigenbasis(lam, g, extra, n, n_base, degrees):
    """GCV scores from the eigenbasis of the projected kernel (see :func:`_gcv_scores`).

    ``lam`` (m,) eigenvalues, ``g`` (m, 2) the displacement and ``extra``
    (m, P - n_base) the monomials above the base degree, both in the
    eigenbasis; ``n`` holes. Returns ``{degree: (K,) scores}``.
    """
    s = _GCV_GRID[:, None]
    inv = 1.0 / (lam[None, :] + s)  # (K, m) diagonal of B^-1 for every smoothing
    out = {}
    for deg in degrees:
        r = (deg + 1) * (deg + 2) // 2 - n_base
        if r == 0:
            rss = np.sum(inv**2 * np.sum(g * g, axis=1), axis=1)
            trace = np.sum(inv, axis=1)
        else:
            e, _ = np.linalg.qr(extra[:, :r])  # orthonormal: the same span, better conditioned
            inv_e = inv[:, :, None] * e  # (K, m, r) = B^-1 E
            gram = e.T @ inv_e  # (K, r, r) = G
            coupled = np.linalg.solve(gram, inv_e.transpose(0, 2, 1) @ g)  # G^-1 E' B^-1 d
            x = inv[:, :, None] * (g - e @ coupled)  # (K, m, 2) constrained B^-1 d
            rss = np.sum(x * x, axis=(1, 2))
            second = inv_e.transpose(0, 2, 1) @ inv_e  # E' B^-2 E
            trace = np.sum(inv, axis=1) - np.trace(np.linalg.solve(gram, second), axis1=1, axis2=2)
        out[deg] = n * (s[:, 0] ** 2 * rss) / (s[:, 0] * trace) ** 2
    return out


@dataclass
class _GcvBasis:
    """Eigenbasis of a GCV (see :func:`_gcv_scores`), kept for the next fit of the plate.

    ``points`` (N, 2) float64: all the points fitted, px, and ``rows`` (m,)
    int64: the rows of those the GCV ran on (both set by
    :func:`displacement_maps`); ``nodes`` (m, 2) float64: those points in
    the fit's length unit when the basis was computed; ``degrees``:
    ``(base, top)`` trend degrees it covers; ``house``, ``tau``: the
    reflectors of the base monomials; ``lam`` (m - n_base,), ``vec``:
    eigenvalues and eigenvectors of the projected kernel; ``extra``
    (m - n_base, P_top - n_base): the monomials above the base in the
    eigenbasis. ``vec`` is the bulk of it: ``8 (m - n_base)²`` bytes.
    """

    points: object
    rows: object
    nodes: np.ndarray
    degrees: tuple
    house: np.ndarray
    tau: np.ndarray
    lam: np.ndarray
    vec: np.ndarray
    extra: np.ndarray


# Largest RMS departure of the holes from a similarity of the holes a GCV
# eigenbasis was computed on, in pitches, for that basis to be reused
# (see _similarity).
_REUSE_MAX_WARP = 0.005


def _similarity(old, new):
    """``(scale², RMS departure)`` of the similarity that best maps ``old`` onto ``new``.

    Both (m, 2) float64, the same points in the same order. The least-squares
    similarity (rotation, scale, shift) in complex form; the departure is the
    RMS distance of ``new`` from the mapped ``old`` (same unit as the points).
    """
    zo = old[:, 1] + 1j * old[:, 0]
    zn = new[:, 1] + 1j * new[:, 0]
    zo = zo - zo.mean()
    zn = zn - zn.mean()
    a = np.vdot(zo, zn) / max(np.vdot(zo, zo).real, 1e-300)
    return float(abs(a) ** 2), float(np.sqrt(np.mean(np.abs(zn - a * zo) ** 2)))


def _reused_gcv_scores(basis, nodes, disp, degrees, backend="cython", keep=None):
    """GCV scores of ``disp`` at ``nodes`` from a previous fit's eigenbasis, when exact enough.

    ``nodes`` (m, 2) are the points of ``basis.nodes`` (same holes, same
    order) measured again, ``disp`` (m, 2) the new displacement there. The
    thin-plate kernel ``r² log r`` projected on the complement of a trend of
    degree >= 1 scales by ``a²`` when the points move by a similarity of
    scale ``a`` (the ``r² log a`` term is a trend of degree 1, which the
    projection removes), and a polynomial space is mapped onto itself by any
    affine map: for a plate moved by a similarity (plus a small warp) the
    previous eigenbasis with its eigenvalues times ``a²`` is that of the new
    points, and only the displacement has to be projected, O(m²) instead of
    the O(m³) eigendecomposition. Used when the points depart from the best
    similarity of the old ones by at most ``_REUSE_MAX_WARP`` (RMS, pitch
    units) and the degrees asked for are covered; otherwise
    :func:`_gcv_scores` computes them again (``keep`` as there: the basis
    used is put in ``keep["basis"]``).
    """
    base, top = basis.degrees
    scale2, warp = _similarity(basis.nodes, nodes)
    if min(degrees) != base or max(degrees) > top or warp > _REUSE_MAX_WARP:
        return _gcv_scores(nodes, disp, degrees, backend, keep)
    n_base = len(basis.tau)
    proj = _apply_q(basis.house, basis.tau, np.array(disp, dtype=np.float64), "L")[n_base:]
    if keep is not None:
        keep["basis"] = basis
    return _gcv_from_eigenbasis(
        scale2 * basis.lam, basis.vec.T @ proj, basis.extra, len(nodes), n_base, degrees
    )


def _previous_rows(previous, previous_rows, n_points):
    """``(previous.gcv_basis, rows)`` validated, or None when there is nothing to reuse."""
    if previous is None:
        if previous_rows is not None:
            raise CcdgridError("`previous_rows` needs `previous`")
        return None
    if not isinstance(previous, DisplacementMaps):
        raise CcdgridError(
            f"`previous` must be a DisplacementMaps or None, got {type(previous).__name__}"
        )
    rows = np.asarray(previous_rows if previous_rows is not None else np.arange(n_points))
    if rows.shape != (n_points,) or not np.issubdtype(rows.dtype, np.integer):
        raise CcdgridError(
            f"`previous_rows` must be {n_points} integers (one per point), "
            f"got {rows.dtype} {rows.shape}"
        )
    rows = rows.astype(np.int64)
    known = rows[rows >= 0]
    if np.any(rows < -1) or len(np.unique(known)) != len(known):
        raise CcdgridError("`previous_rows` must be distinct rows >= 0, or -1 for a new point")
    if previous.gcv_basis is None:
        return None
    n_previous = len(previous.gcv_basis.points)
    if known.size and known.max() >= n_previous:
        raise CcdgridError(
            f"`previous_rows` must be rows of the {n_previous} points `previous` was fitted to"
        )
    return previous.gcv_basis, rows


def _reused_subset(basis, rows):
    """Rows of the new points that were ``basis.rows``, or None if one is gone."""
    if basis is None or basis.rows is None:
        return None
    known = rows >= 0
    if not known.any() or basis.rows.max() > rows[known].max():
        return None
    where = np.full(int(rows[known].max()) + 1, -1, dtype=np.int64)
    where[rows[known]] = np.flatnonzero(known)
    sub = where[basis.rows]
    return None if np.any(sub < 0) else sub


def _rotate_symmetric(house, tau, kern):
    """``Q' K Q`` for a symmetric ``K``, ``Q`` from the reflectors of ``qr(..., mode="raw")``.

    Only the upper triangle of the result is computed (and only it may be
    read); ``kern`` (C-contiguous, float64) is overwritten.

    Notes
    -----
    With ``Q = I - V T V'`` (the compact WY form of the ``p`` reflectors,
    ``T`` upper triangular) and ``W = K V``::

        Q' K Q = K - V B' - B V',   B = W T - V M / 2,   M = T' V' W T

    one product ``K V`` and one symmetric rank-2p update (BLAS ``syr2k``,
    one triangle): ~4 N² p flops and two passes over ``K``, where applying
    the reflectors from both sides (LAPACK ``ormqr`` twice) takes ~8 N² p
    and four. 7x faster at N = 1500, p = 15 on one thread.
    """
    p = len(tau)
    v = np.tril(house[:, :p], -1)
    v[np.arange(p), np.arange(p)] = 1.0
    vtv = v.T @ v
    t = np.zeros((p, p))
    for i in range(p):  # LAPACK's larft, forward and column-wise
        t[:i, i] = -tau[i] * (t[:i, :i] @ vtv[:i, i])
        t[i, i] = tau[i]
    w = kern @ v
    m = t.T @ (v.T @ w) @ t
    b = w @ t - v @ (0.25 * (m + m.T))  # M is symmetric up to rounding
    # K' = K is Fortran-contiguous: BLAS updates it in place, its lower
    # triangle being K's upper one
    out = linalg.blas.dsyr2k(-1.0, v, b, beta=1.0, c=kern.T, trans=0, lower=1, overwrite_c=1)
    return out.T


def _apply_q(house, tau, c, side, transpose=True):
    """``Q' c`` (side "L"; ``Q c`` if not ``transpose``) or ``c Q`` (side "R").

    ``Q`` is given by the Householder reflectors of ``scipy.linalg.qr(...,
    mode="raw")``.
    """
    ormqr = linalg.get_lapack_funcs("ormqr", (house, c))
    trans = "T" if (side == "L") == transpose else "N"
    lwork = max(1, c.shape[1] if side == "L" else c.shape[0]) * 64
    out, _, info = ormqr(side, trans, house, tau, c, lwork)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK ormqr failed (info {info})")
    return out


def _monomials(pts, degree):
    """Columns ``y**a x**b`` (a + b <= degree) on centred, unit-scaled coordinates."""
    u = pts - pts.mean(axis=0)
    u = u / max(np.abs(u).max(), 1e-300)
    cols = [u[:, 0] ** a * u[:, 1] ** (t - a) for t in range(degree + 1) for a in range(t + 1)]
    return np.column_stack(cols)


def _cubic_maps(pts, disp, ny, nx):
    """The tutorial's cubic ``griddata`` at the corners, NaN filled by nearest valid corner."""
    interp = CloughTocher2DInterpolator(pts, disp)
    xk = np.arange(nx + 1, dtype=np.float64) - 0.5
    dy = np.empty((ny + 1, nx + 1), dtype=np.float32)
    dx = np.empty((ny + 1, nx + 1), dtype=np.float32)
    for start in range(0, ny + 1, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, ny + 1)
        yk = np.arange(start, stop, dtype=np.float64) - 0.5
        gy, gx = np.meshgrid(yk, xk, indexing="ij")
        val = interp(gy, gx)
        dy[start:stop] = val[..., 0]
        dx[start:stop] = val[..., 1]
    missing = np.isnan(dy)
    if np.any(missing):
        near = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
        dy = dy[near[0], near[1]]
        dx = dx[near[0], near[1]]
    return dy, dx


def _bilinear_corners(dy, dx, pts):
    """Bilinear interpolation of corner maps at (y, x) points -> (M, 2) (dy, dx)."""
    coords = (pts + 0.5).T  # corner (i, j) sits at index coordinates (i - 0.5, j - 0.5)
    out = np.empty((len(pts), 2), dtype=np.float64)
    out[:, 0] = ndimage.map_coordinates(dy, coords, order=1, mode="nearest", output=np.float64)
    out[:, 1] = ndimage.map_coordinates(dx, coords, order=1, mode="nearest", output=np.float64)
    return out
