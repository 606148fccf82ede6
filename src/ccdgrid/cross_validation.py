"""k-fold cross-validated error of the displacement maps at the holes.

:func:`cross_validate` measures how well a map of
:func:`ccdgrid.maps.displacement_maps` predicts a hole it was not fitted to:
the honest accuracy figure of a calibration, where the residual at the
holes only says how much the smoothing removed. Positions ``(y, x)`` and
displacements ``(dy, dx) = ideal - measured`` in px, index coordinates.
"""

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.interpolate import CloughTocher2DInterpolator
from scipy.spatial import cKDTree

from ._blas import one_blas_thread
from ._map_checks import METHODS, MIN_POINTS, check_degree, non_negative, positive, rms
from ._validation import as_points, check_backend
from .errors import CcdgridError
from .gcv import GCV_MAX_POINTS, gcv_choice, gcv_subset
from .thinplate import fit_tps

__all__ = ["CrossValidation", "cross_validate"]

# cross-validation stops after the fold that brings the predicted holes to this many
_CV_MAX_HOLES = 600


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
        Thin-plate smoothing used by every fold, pitch² units for kernel
        order 2, pitch⁴ for order 3.
    degree : int or None
        Polynomial trend degree used (``None`` for cubic).
    order : int or None
        Thin-plate kernel order used, 2 or 3 (``None`` for cubic).
    seconds : float, s
        Wall time of the k fits.
    factors : dict or None
        ``{fold: factor}``: the thin-plate factor of each evaluated fold's fit, for a
        cross-validation of the same holes after a small move of the plate
        (``previous`` of :func:`cross_validate`): ``4 (n_f - p)²`` bytes per
        fold of ``n_f`` training holes (12 MB for the 2 folds evaluated at
        4096², ~1500 holes). None for the cubic method or tiled fits.
        Opaque, not compared.
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
    factors: object = field(default=None, repr=False, compare=False)
    order: object = None

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
    previous=None,
    order=None,
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
        The map's method (see :func:`ccdgrid.maps.displacement_maps`).
    smoothing : float, "auto" or None
        Thin-plate smoothing, pitch² units for kernel order 2, pitch⁴ for
        order 3, used for every fold (pass the full map's
        ``DisplacementMaps.smoothing``). None or "auto": chosen once by GCV
        on all holes, with the kernel order unless ``order`` is given, as
        :func:`ccdgrid.maps.displacement_maps` does.
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
    previous : CrossValidation or None
        The cross-validation of the same holes, in the same order, before a
        small move of the plate (a warm start that found every previous
        hole again): with the same ``k`` and folds, each fold's thin-plate
        system is solved from that fold's previous factor (see
        :class:`ccdgrid.thinplate.ThinPlate`; ~12 ms instead of ~35 ms per
        fold of 1200 holes). Unusable factors are ignored.
    order : {2, 3} or None
        Thin-plate kernel order (pass ``DisplacementMaps.order``: the
        smoothing's units are the order's). None: chosen by GCV with an
        automatic smoothing, else 2.

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
    coarse grid and bicubic upsampling of
    :func:`ccdgrid.maps.displacement_maps` (they agree to ~1e-4 px). Cost:
    up to ``k`` thin-plate fits on ``(k-1)/k`` of the holes, O(k N³);
    0.03-0.08 s for 400 holes and k = 5 on a 2-core machine.
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
    scale_px = positive(scale_px, "scale_px")
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
    if n_train < MIN_POINTS:
        raise CcdgridError(
            f"too few holes to cross-validate: {n_train} in the smallest training set, "
            f"need {MIN_POINTS}"
        )

    if max_holes is not None:
        max_holes = int(positive(max_holes, "max_holes"))
    evaluated = range(k)
    if max_holes is not None:
        reached = np.cumsum(np.bincount(folds, minlength=k)) >= max_holes
        evaluated = range(int(np.argmax(reached)) + 1 if reached.any() else k)

    predicted = np.full((n, 2), np.nan)
    if method == "tps":
        degree = check_degree(degree, n_train)
        if order is not None and (isinstance(order, bool) or order not in (2, 3)):
            raise CcdgridError(f"`order` must be 2, 3 or None, got {order!r}")
        if order == 3 and degree < 2:
            raise CcdgridError(f"kernel order 3 needs a trend of degree 2 or more, not {degree}")
        if smoothing is None or (isinstance(smoothing, str) and smoothing == "auto"):
            sub = gcv_subset(pts, GCV_MAX_POINTS)
            orders = (order,) if order is not None else (2, 3) if degree >= 2 else (2,)
            smoothing, _, _, order = gcv_choice(
                pts[sub] / scale_px, disp[sub], degree, None, backend, orders=orders
            )
        order = 2 if order is None else int(order)
        smoothing = non_negative(smoothing, "smoothing")
        unit = pts / scale_px
        if in_sample_rms is None:
            full, _ = fit_tps(unit, disp, smoothing, degree, backend, order=order)
            in_sample = rms(full.residual_at_centres())
        else:
            in_sample = non_negative(in_sample_rms, "in_sample_rms")
        before = _previous_factors(previous, k, folds, smoothing, order)
        kept = []
        for f in evaluated:
            test = folds == f
            if test.any():
                rbf, _ = fit_tps(
                    unit[~test], disp[~test], smoothing, degree, backend, before.get(f), order
                )
                predicted[test] = rbf(unit[test])
                kept.append((f, getattr(rbf, "factor", None)))
        factors = dict(kept) if all(fac is not None for _, fac in kept) else None
    else:
        smoothing = degree = order = factors = None
        in_sample = 0.0  # the cubic interpolant passes through every hole
        for f in evaluated:
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
        folds_evaluated=len(evaluated),
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
        factors=factors,
        order=order,
    )


def _previous_factors(previous, k, folds, smoothing, order):
    """``{fold: SystemFactor}`` of a previous cross-validation with these folds, else empty.

    Only at the same smoothing and kernel order: a factor made at another
    one would not precondition the fold's system well (see
    ``maps._previous_factor``).
    """
    if previous is None:
        return {}
    if not isinstance(previous, CrossValidation):
        raise CcdgridError(
            f"`previous` must be a CrossValidation or None, got {type(previous).__name__}"
        )
    if previous.factors is None or previous.k != k or not np.array_equal(previous.folds, folds):
        return {}
    if previous.smoothing is None or not np.isclose(previous.smoothing, smoothing, rtol=1e-9):
        return {}
    if previous.order != order:
        return {}
    return previous.factors


def _interleaved_folds(cells, k):
    """Fold ``(i + m j) mod k`` of each lattice cell, ``m = 2`` (``1`` for k < 4).

    With ``m = 2`` and ``k >= 4`` the four nearest neighbours of a hole,
    ``(i ± 1, j)`` and ``(i, j ± 1)``, are all in other folds than its own.
    """
    m = 2 if k >= 4 else 1
    return np.mod(cells[:, 0] + m * cells[:, 1], k).astype(np.int64)
