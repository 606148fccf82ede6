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
tutorial's piecewise-cubic ``griddata``, for comparison. The spline is
:mod:`ccdgrid.thinplate`'s, its smoothing chosen by :mod:`ccdgrid.gcv`.

:func:`cross_validate` (defined in :mod:`ccdgrid.cross_validation`, re-exported
here) measures how well such a map predicts a hole it was not fitted to
(k-fold cross-validation): the honest accuracy figure of a calibration, where
the residual at the holes only says how much the smoothing removed.
"""

import functools
import threading
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage
from scipy.interpolate import BSpline, CloughTocher2DInterpolator, RectBivariateSpline
from scipy.spatial import ConvexHull, QhullError, cKDTree

from ._blas import one_blas_thread
from ._buffer_pool import BufferPool
from ._ext import _upsample as _upsample_cython
from ._map_checks import METHODS, MIN_POINTS, check_degree, non_negative, positive, rms
from ._reference import upsample as _upsample_numpy
from ._validation import as_points, check_backend
from .coverage import EDGE_RATIO, mask_border_gaps
from .cross_validation import CrossValidation, cross_validate
from .errors import CcdgridError
from .gcv import (
    GCV_MAX_POINTS,
    MISFIT_Z,
    candidate_degrees,
    coherent_misfit,
    gcv_choice,
    gcv_scores,
    gcv_smoothing,
    gcv_subset,
    local_subset,
    reused_gcv_scores,
    reused_subset,
)
from .thinplate import fit_tps

__all__ = [
    "MAP_MEMORY",
    "CrossValidation",
    "DisplacementMaps",
    "MapOutputs",
    "cross_validate",
    "displacement_maps",
    "hull_mask",
    "map_outputs",
]

_UPSAMPLE = {"cython": _upsample_cython, "numpy": _upsample_numpy}
_BLOCK_ROWS = 256  # corner rows evaluated at a time (bounds the float64 temporaries)
# Largest ratio between the smoothing GCV chooses for a refit and the
# previous fit's for the previous one to be kept (see _previous_factor)
_KEEP_SMOOTHING = 1.25

#: Memory of the maps and masks that calibrations dropped, handed to the next
#: ones (a :class:`ccdgrid._buffer_pool.BufferPool`). An array is reused only
#: once nothing references it; one nothing uses is kept 10 s, at most 12
#: arrays in all (four calibrations' two maps and mask: a recalibration loop
#: needs two). ``MAP_MEMORY.clear()`` releases them at once;
#: ``MAP_MEMORY.capacity = 0`` turns the reuse off.
MAP_MEMORY = BufferPool(capacity=12, keep_seconds=10.0)


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
        (grown by ``hull_margin`` px), or in a gap of the outer rows of
        holes that the hull bridges (:mod:`ccdgrid.coverage`): the maps are
        only extrapolated there.
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.
    method : str
        ``"tps"`` or ``"cubic"``.
    smoothing : float or None
        Thin-plate smoothing used, in units of pitch² for kernel order 2,
        pitch⁴ for order 3 (``None`` for cubic).
    smoothing_scores : dict or None
        GCV scores ``{"smoothing": (K,), "score": (K,)}`` (of the degree
        and order used) when the smoothing was chosen automatically, with
        ``"order_scores"``: best score per kernel order tried; with the
        degree chosen too, ``"degree_scores"``: best score per degree tried
        (of the order used); when
        a misfit shared by neighbouring holes lowered it (a GCV on a subset
        of the holes, see :func:`displacement_maps`), ``"local"``: one dict
        per lowering, ``{"z": misfit in noise units, "at": (y, x) px of the
        hole it centres on, "smoothing": the smoothing GCV chose there}``.
    scale_px : float, px
        Length unit of the thin-plate fit (the hole spacing).
    coarse_step : tuple of 2 float or None, px
        Spacing of the coarse evaluation grid (``None`` for cubic).
    fit_residual_rms : float, px
        RMS of (map at the holes - displacement given there): what the
        smoothing removed.
    degree : int or None
        Degree of the polynomial trend of the thin-plate fit (None for cubic).
    order : int or None
        Order of the thin-plate kernel: 2, ``r² log r`` (the thin-plate
        spline), or 3, ``-r⁴ log r`` (None for cubic). See
        :func:`displacement_maps`.
    gcv_basis : object or None
        What a GCV of the same plate moved a little may reuse (pass this
        object as ``previous`` to :func:`displacement_maps`): the eigenbasis
        of the GCV's projected kernel matrix and the points fitted. It holds
        ``8 (m - p)²`` bytes of eigenvectors for the ``m <= 500`` holes the
        GCV ran on (``p`` trend terms), plus ``O(m p + N)`` more: ~2 MB
        whatever the number of holes (1.9 MB at 4096², 1557 holes). None
        when the smoothing was not chosen by GCV. Opaque, not compared, not
        saved.
    tps_factor : ccdgrid.thinplate.SystemFactor or None
        What a refit of the same holes after a small move of the plate may
        reuse (pass this object as ``previous`` to
        :func:`displacement_maps`): the Cholesky factor of the thin-plate
        system, float32, ``4 (N - p)²`` bytes (9 MB at 4096², 1504 holes),
        and the points fitted. None for the cubic method and for a tiled
        fit (above 2 500 holes). Opaque, not compared, not saved.
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
    order: object = None
    gcv_basis: object = field(default=None, repr=False, compare=False)
    tps_factor: object = field(default=None, repr=False, compare=False)

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
    gap_ratio=EDGE_RATIO,
    degree=None,
    previous=None,
    previous_rows=None,
    outputs=None,
    backend="cython",
    order=None,
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
        Thin-plate smoothing in units of ``scale_px²`` for kernel order 2,
        ``scale_px⁴`` for order 3 (the value added to the diagonal of the
        kernel matrix when lengths are measured in hole spacings). None or
        "auto": chosen by generalised cross-validation (GCV), with the
        kernel order unless ``order`` is given: for order 2 the best of 37
        values from 1e-6 to 1e3, for order 3 of 49 from 1e-6 to 1e6,
        refined between its neighbours (kept at the ends). 0 interpolates
        exactly.
    scale_px : float or None, px
        Length unit of the fit; None: the median nearest-neighbour distance
        of the holes (the pitch).
    coarse_step : float or None, px
        Spacing of the coarse grid on which the spline is evaluated before
        bicubic upsampling. None: ``clip(scale_px / 2, 8, 48)``.
    hull_margin : float, px
        Grow (> 0) or shrink (< 0) the convex hull of the holes by this
        distance before deciding which pixels are valid.
    gap_ratio : float or None
        Also mask the gaps in the outer rows of holes, which the hull
        bridges and the maps would only extrapolate into: the pixels in
        Delaunay triangles of the holes whose longest edge exceeds this
        many local pitches, reached from the hull's boundary (see
        :mod:`ccdgrid.coverage`). None: the hull alone.
    degree : int or None
        Degree (1-5) of the polynomial trend fitted with the spline (not
        smoothed). None: with automatic smoothing and at most 500 holes,
        chosen together with the smoothing by GCV among the degrees 1-4
        that have at least two holes per polynomial term; otherwise 4 with
        at least 60 holes, 3 with at least 30, else 1.
    previous : DisplacementMaps or None
        Maps of the same plate, from holes that were (mostly) these ones
        before a small move: its GCV eigenbasis (``gcv_basis``) is reused
        where that is exact enough, and when the holes are exactly the
        previous ones in the same order and the smoothing is the same (a
        smoothing GCV chooses within 1.25x of the previous one is replaced
        by it), its thin-plate factor (``tps_factor``) preconditions the
        solve (see Notes). None: none.
    previous_rows : array_like of shape (N,), int, or None
        For each point, its row in the points ``previous`` was fitted to,
        -1 for a point it did not have; None: the same points in the same
        order.
    outputs : MapOutputs or None
        Memory for the two maps, made beforehand by :func:`map_outputs`
        for this ``shape`` (used by ``"tps"`` only); None: made here, in a
        second thread while the spline is fitted.
    backend : {"cython", "numpy"}
        Engine of the thin-plate kernel sums and of the bicubic upsampling
        to the corner grid.
    order : {2, 3} or None
        Order of the thin-plate kernel: 2, ``r² log r``; 3, ``-r⁴ log r``
        (the spline of least squared third derivatives; its trend holds the
        quadratics, so a degree >= 2). None: with automatic smoothing,
        chosen by GCV together with the smoothing (and the degree, when GCV
        chooses it): order 3 follows a field varying over a few hole
        spacings more closely from the same holes; with a given smoothing, 2.

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
    tile by tile and blended (:class:`ccdgrid.thinplate.TiledThinPlate`:
    0.6 s instead of 3.4 s and O(tile²) instead of 8 N² bytes at 7 000
    holes, within a tenth of the holes' noise of the single fit), the coarse
    grid
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
    part, shared by every trend degree tried (see
    :func:`ccdgrid.gcv.gcv_scores`); one more for the order-3 kernel
    ``-r⁴ log r``, chosen when its score is more than 1 % below the
    thin-plate spline's (``ccdgrid.gcv.ORDER3_MARGIN``). Where the
    distortion varies over a few hole spacings it follows it more closely
    from the same holes: on six 2048² plates of an outside generator
    (410-890 holes) GCV chose it every time, and the dense error of the
    spline against the true field fell by 9-57 % (0.044 -> 0.027 px on the
    mildest, 0.060 -> 0.026 px with hot pixels and dead lines). Above 500
    holes it runs on 500 holes in four patches, one per quarter of the region one trend of the fit
    covers: the plate, or about one tile's 1500 holes nearest the centroid
    above 2500 holes (:func:`ccdgrid.gcv.gcv_subset`; an O(N³)
    eigendecomposition otherwise), with the full fit's trend degree:
    patches spanning that region hold the trend near the fit's and keep the
    plate's density, so the ``s`` chosen is that of a GCV of all holes
    (4096², 1504 holes: 5.62; 1024 holes under 20 px of pincushion: 10) or
    one grid step from it. The 500 holes nearest the centroid, used before,
    let a quartic fit that patch alone: on dense plates under a field
    varying over the plate GCV chose the top of the grid (1e3), 0.27 px at
    most from the truth on a 6 663-hole 2048² plate.

    With ``previous`` whose GCV ran on holes that are all among these ones,
    the GCV runs on those holes again, from their previous eigenbasis (see
    :func:`ccdgrid.gcv.reused_gcv_scores`): the projected kernel of a plate
    moved by a similarity is the previous one times the scale², so only the
    new displacement is projected (~1 ms instead of ~30 ms for 500 holes),
    when the holes depart from a similarity of the previous ones by at
    most 0.005 pitch RMS. The scores are exact for a similarity (to 1e-12)
    and differ from a GCV on the new holes by about ten times that
    departure, relative: a plate moved by (3.4, -2.7) px and 20 mdeg at
    4096² departs by 2e-4 pitch (the centres' noise and the distortion's
    change), its scores by 0.2 %, and the same smoothing is chosen.

    With ``previous`` fitted to the same holes in the same order (each
    point's row in ``previous_rows`` is its own, and the trend degree and
    the smoothing are the same), the thin-plate system is solved by conjugate gradients
    preconditioned with the previous Cholesky factor (see
    :class:`ccdgrid.thinplate.ThinPlate`): the same coefficients to
    rounding, at 4096² (1504 holes) in ~15 ms instead of the ~40 ms of
    rotating and factorising the system. Otherwise, or if the iteration
    does not converge quickly, the system is factorised. GCV's refined
    minimum moves between two images of one plate by more than the
    iteration tolerates (4.04 and 4.37 at 4096² for a move of 3 px; 1.6x
    for a new draw of the noise on 168 holes), and the fit's error changes
    slowly with the smoothing (at 4096², 2048² and a 40 px pitch, a factor
    1.25 either way changed the dense residual by 3-5 %): a smoothing GCV
    chooses within ``_KEEP_SMOOTHING`` (1.25x) of the previous one is
    replaced by it, so the factor serves. A smoothing given by the caller
    is used as given.
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
    if len(pts) < MIN_POINTS:
        raise CcdgridError(f"too few holes to map a displacement: {len(pts)}, need {MIN_POINTS}")
    try:
        hull = ConvexHull(pts)
    except QhullError:
        raise CcdgridError("too few holes: the holes lie on one line") from None
    if scale_px is None:
        scale_px = float(np.median(cKDTree(pts).query(pts, k=2)[0][:, 1]))
    scale_px = positive(scale_px, "scale_px")
    try:
        margin = float(hull_margin)
    except (TypeError, ValueError):
        margin = float("nan")
    if not np.isfinite(margin):
        raise CcdgridError(f"`hull_margin` must be a finite number of px, got {hull_margin!r}")
    hull_margin = margin
    if gap_ratio is not None:
        gap_ratio = positive(gap_ratio, "gap_ratio")
    # The mask and the two maps' first touch (the largest arrays of a
    # calibration: page faults, and on a VM the host's) in a second thread,
    # while this one fits the spline.
    if outputs is not None and not isinstance(outputs, MapOutputs):
        raise CcdgridError(
            f"`outputs` must come from map_outputs() or be None, got {type(outputs).__name__}"
        )
    if outputs is not None and outputs.shape != (ny, nx):
        raise CcdgridError(f"`outputs` were made for shape {outputs.shape}, not {(ny, nx)}")
    with_maps = method == "tps" and outputs is None
    pending = _Background(
        _mask_and_outputs, hull.equations, (ny, nx), hull_margin, pts, gap_ratio, with_maps
    )

    if method == "cubic":
        mask, _ = pending.result()
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
            fit_residual_rms=rms(fit - disp),
        )

    scores = None
    fitted_points = pts.copy()  # kept by what a refit may reuse (the caller's array may change)
    auto_degree = degree is None
    degree = check_degree(degree, len(pts))
    orders, degree = _check_order(order, degree, auto_degree, len(pts))
    gcv_basis = None
    on_subset = False  # GCV ran on part of the holes
    if smoothing is None or (isinstance(smoothing, str) and smoothing == "auto"):
        keep = {}
        sub = reused_subset(*reuse) if reuse is not None else None
        if sub is None:
            sub = gcv_subset(pts, GCV_MAX_POINTS)
            scorer = functools.partial(
                gcv_scores, pts[sub] / scale_px, disp[sub], backend=backend, keep=keep
            )
        else:
            scorer = functools.partial(
                reused_gcv_scores,
                reuse[0],
                pts[sub] / scale_px,
                disp[sub],
                backend=backend,
                keep=keep,
            )
        # with all holes in the GCV, it also picks the trend's degree; on a
        # subset it would judge the trend on part of the field only
        degrees = candidate_degrees(len(pts)) if auto_degree and len(sub) == len(pts) else None
        smoothing, scores, degree, order = gcv_choice(
            pts[sub] / scale_px, disp[sub], degree, degrees, backend, scorer, orders
        )
        on_subset = len(sub) < len(pts)
        gcv_basis = _kept_bases(keep.get("bases", {}), sub, fitted_points)
    else:
        order = orders[0]
    smoothing = non_negative(smoothing, "smoothing")
    if coarse_step is None:
        coarse_step = float(np.clip(scale_px / 2.0, 8.0, 48.0))
    coarse_step = positive(coarse_step, "coarse_step")
    if coarse_step < 1.0:
        # finer than the corners themselves: only memory to lose
        raise CcdgridError(f"`coarse_step` must be at least 1 px, got {coarse_step!r}")

    factor, smoothing = _previous_factor(
        previous, reuse, len(pts), smoothing, degree, order, chosen=scores is not None
    )
    rbf, degree = fit_tps(pts / scale_px, disp, smoothing, degree, backend, factor, order)
    if rbf.order != order and scores is not None:
        # the fit fell back to order 2 (a trend the holes leave undetermined,
        # in a tile): GCV's smoothing was in order 3's units, chosen again
        smoothing, scores, degree, order = gcv_choice(
            pts[sub] / scale_px, disp[sub], degree, None, backend, orders=(rbf.order,)
        )
        gcv_basis = None
        rbf, degree = fit_tps(pts / scale_px, disp, smoothing, degree, backend, order=rbf.order)
    if on_subset:
        rbf, smoothing, degree, scores = _lower_for_local_misfit(
            pts, disp, scale_px, rbf, smoothing, degree, scores, backend
        )
    yc = _coarse_axis(ny, coarse_step)
    xc = _coarse_axis(nx, coarse_step)
    nodes = np.stack(np.meshgrid(yc, xc, indexing="ij"), axis=-1).reshape(-1, 2)
    coarse = rbf(nodes / scale_px).reshape(len(yc), len(xc), 2)
    mask, made = pending.result()
    dy, dx = _upsample(yc, xc, coarse, ny, nx, backend, out=made or outputs.take())
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
        fit_residual_rms=rms(rbf.residual_at_centres()),
        degree=degree,
        order=rbf.order,
        gcv_basis=gcv_basis,
        tps_factor=_kept_factor(rbf, fitted_points),
    )


_MAX_LOCAL_REFITS = 3


def _lower_for_local_misfit(pts, disp, scale_px, rbf, smoothing, degree, scores, backend):
    """Refit with less smoothing where the fit misses a feature shared by neighbouring holes.

    A smoothing chosen by GCV on a subset of the holes (above
    ``GCV_MAX_POINTS``) is blind to a feature of the field outside the
    subset's patches, and one feature weighs little in a GCV over the
    plate. When the residuals of the fit to all holes hold a misfit shared
    by neighbours (:func:`ccdgrid.gcv.coherent_misfit` above
    ``MISFIT_Z``), GCV runs on the holes around it
    (:func:`ccdgrid.gcv.local_subset`), and a smoothing lower than the
    plate's replaces it everywhere: the maps follow the feature, at the
    cost of some noise elsewhere. Repeated (at most ``_MAX_LOCAL_REFITS``
    times) while a misfit is left and GCV lowers the smoothing. On a
    4096² fuzz plate of 1839 holes (SNR 13, seed 326) with a bump of 2.8 px
    over 150 px, the smoothing went from 499 to 0.16 pitch² and the maps
    from 0.125 px RMS, 2.1 px at most, off the truth to 0.022 px, 0.15 px
    at most. The smoothing is the plate's: away from the feature the maps
    are noisier (on the 1600-hole plate of the tests, 0.026 -> 0.040 px RMS
    there, for 2 px less at the bump).

    Returns ``(spline, smoothing, degree, scores)``.
    """
    unit = pts / scale_px
    order = rbf.order  # the plate's kernel: its smoothing's units
    for _ in range(_MAX_LOCAL_REFITS):
        z, index = coherent_misfit(unit, rbf.residual_at_centres())
        if z <= MISFIT_Z:
            break
        local = local_subset(unit, index)
        try:
            lowered, _ = gcv_smoothing(unit[local], disp[local], degree, backend, order=order)
        except np.linalg.LinAlgError:
            break
        if not lowered < smoothing:
            break
        smoothing = float(lowered)
        scores = dict(scores)
        scores["local"] = [
            *scores.get("local", []),
            {"z": z, "at": tuple(float(v) for v in pts[index]), "smoothing": smoothing},
        ]
        rbf, degree = fit_tps(unit, disp, smoothing, degree, backend, order=order)
    return rbf, smoothing, degree, scores


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
    outside = np.less(x, first, out=MAP_MEMORY.empty((ny, nx), bool))
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


def _coarse_axis(n, step):
    """Nodes from the first corner (-0.5) to the last (n - 0.5), at most ``step`` apart."""
    count = max(int(np.ceil(n / step)), 3) + 1  # bicubic needs >= 4 nodes
    return np.linspace(-0.5, n - 0.5, count)


class _Background:
    """``func(*args)`` run in a daemon thread; :meth:`result` waits for it.

    An exception raised by ``func`` is raised again by :meth:`result`, in
    the caller's thread.
    """

    def __init__(self, func, *args):
        self._func = functools.partial(func, *args)
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, name="ccdgrid-maps", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            self._value = self._func()
        except Exception as err:  # re-raised by result(), in the caller's thread
            self._error = err

    def result(self):
        """``func``'s return value, once it has returned."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class MapOutputs:
    """Memory for the two maps of :func:`displacement_maps`, mapped in a second thread.

    Made by :func:`map_outputs`; given once to :func:`displacement_maps`
    (``outputs=``), which waits for it only when it writes the maps.
    ``shape`` is the image's ``(ny, nx)``.
    """

    def __init__(self, shape):
        self.shape = shape
        self._pending = _Background(_mapped_maps, shape)
        self._taken = False

    def take(self):
        """The two (ny + 1, nx + 1) float32 arrays, once mapped; only once."""
        if self._taken:
            raise CcdgridError("these map outputs were already used")
        self._taken = True
        return self._pending.result()


def map_outputs(shape):
    """Start mapping the memory of two maps for an image of ``shape`` (ny, nx).

    The pages of the two (ny + 1, nx + 1) float32 maps (134 MB at 4096²)
    are written once in a second thread, which on these VMs costs 25-90 ms
    of CPU (the host backs guest memory on first use too). A caller that
    knows the shape early (:func:`ccdgrid.warmstart.recalibrate`) starts it
    before its single-threaded stages, so that this work uses the idle core
    instead of competing with the spline's threads.
    """
    return MapOutputs(_check_shape(shape))


def _mapped_maps(shape):
    """Two (ny + 1, nx + 1) float32 arrays whose every page was written (values unset).

    From :data:`MAP_MEMORY`: the maps of a calibration nothing uses any more
    serve again, their pages already mapped.
    """
    ny, nx = shape
    maps = tuple(MAP_MEMORY.empty((ny + 1, nx + 1), np.float32) for _ in range(2))
    for a in maps:
        # one write per 4 KiB page maps it; the upsampling writes every value
        # (a full fill cost 3.5 ms more at 4096²)
        a.reshape(-1)[:: 4096 // a.itemsize] = 0.0
    return maps


def _mask_and_outputs(equations, shape, margin, pts, gap_ratio, with_maps):
    """``(mask, maps)``: the hull and border-gap mask, and two mapped maps or None.

    ``mask`` (ny, nx) int8 as :func:`hull_mask` with :func:`mask_border_gaps`
    applied unless ``gap_ratio`` is None; ``maps`` two (ny + 1, nx + 1)
    float32 arrays whose every page was written (their values are not
    set), when ``with_maps``. Made in
    a second thread by :func:`displacement_maps`: a fresh array's pages are
    mapped on first write, which for the two maps of a 4096² detector
    (134 MB) took 12 ms of a 28 ms upsampling on a quiet machine, and
    0.1-0.3 s in a fresh process on these VMs, whose host backs the guest's
    memory on first use too. While the spline is fitted, this costs no wall
    time when a core is free, and what it cost before when none is (numpy's
    ``fill`` and the mask's array operations release the GIL).
    """
    mask = hull_mask(equations, shape, margin=margin)
    if gap_ratio is not None:
        mask_border_gaps(pts, mask, edge_ratio=gap_ratio)
    return mask, (_mapped_maps(shape) if with_maps else None)


def _upsample(yc, xc, coarse, ny, nx, backend, out=None):
    """Bicubic interpolation of two coarse-grid maps to all corners, float32.

    ``coarse`` (len(yc), len(xc), 2) holds the values at the nodes; the
    interpolating tensor-product spline of each map (scipy's
    ``RectBivariateSpline`` with ``s=0``, its coefficients only) is
    evaluated at corner ``(i, j)``, index coordinates ``(i - 0.5, j - 0.5)``,
    by the kernel from each corner row's and column's four non-zero B-spline
    weights. Returns ``(map 0, map 1)``, each (ny + 1, nx + 1) float32:
    the two C-contiguous arrays of ``out`` if given, else new ones.
    """
    coef = np.empty((2, len(yc), len(xc)))  # s=0: one coefficient per node
    for c in range(2):
        spline = RectBivariateSpline(yc, xc, coarse[..., c], kx=3, ky=3, s=0)
        ty, tx = spline.get_knots()
        coef[c] = spline.get_coeffs().reshape(len(ty) - 4, len(tx) - 4)
    wy, sy = _spline_weights(np.arange(ny + 1, dtype=np.float64) - 0.5, ty, coef.shape[1])
    wx, sx = _spline_weights(np.arange(nx + 1, dtype=np.float64) - 0.5, tx, coef.shape[2])
    if out is None:
        out = tuple(np.empty((ny + 1, nx + 1), dtype=np.float32) for _ in range(2))
    out0, out1 = out
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


def _previous_rows(previous, previous_rows, n_points):
    """``(previous.gcv_basis, rows)`` validated, or None when there is nothing to reuse.

    The basis may be None when ``previous`` kept only its thin-plate factor.
    """
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
    fitted = [k for k in (previous.gcv_basis, previous.tps_factor) if k is not None]
    if not fitted:
        return None
    n_previous = len(fitted[0].points)
    if known.size and known.max() >= n_previous:
        raise CcdgridError(
            f"`previous_rows` must be rows of the {n_previous} points `previous` was fitted to"
        )
    return previous.gcv_basis, rows


def _previous_factor(previous, reuse, n_points, smoothing, degree, order, chosen):
    """``(factor, smoothing)``: the previous fit's factor for these points, else None.

    The factor serves the same points in the same order with the same trend
    degree and kernel order (the smoothings of two orders are not in the
    same units), at the same smoothing: one made at another smoothing
    preconditions the system poorly (a ratio ``q`` spreads the eigenvalues
    over ``[1, q]``: ~5 iterations at 1.09, more than a factorisation costs
    at 1.78, one step of GCV's grid). A smoothing GCV ``chosen`` within
    ``_KEEP_SMOOTHING`` of the previous one is replaced by it, so that the
    factor serves: GCV's own choice moves that much between two images of
    one plate (see Notes of :func:`displacement_maps`).
    """
    if reuse is None or previous.tps_factor is None or previous.smoothing is None:
        return None, smoothing
    factor = previous.tps_factor
    rows = reuse[1]
    if (
        factor.n_points != n_points
        or factor.degree != degree
        or factor.order != order
        or not np.array_equal(rows, np.arange(n_points))
    ):
        return None, smoothing
    near = (
        chosen
        and smoothing > 0
        and previous.smoothing > 0
        and abs(np.log(smoothing / previous.smoothing)) <= np.log(_KEEP_SMOOTHING)
    )
    if near:
        smoothing = previous.smoothing
    if not np.isclose(previous.smoothing, smoothing, rtol=1e-9, atol=0.0):
        return None, smoothing
    return factor, smoothing


def _check_order(order, degree, auto_degree, n_points):
    """``(orders, degree)``: the kernel orders GCV may choose from, and the trend degree.

    One order if ``order`` is given. Order 3 needs a trend of degree >= 2:
    without one among the degrees possible, only order 2 is a candidate;
    asked for, with the degree left to ccdgrid, the degree is raised to 2.
    """
    top = max(candidate_degrees(n_points)) if auto_degree else degree
    if order is None:
        return ((2, 3) if top >= 2 else (2,)), degree
    if isinstance(order, bool) or order not in (2, 3):
        raise CcdgridError(f"`order` must be 2, 3 or None, got {order!r}")
    if order == 3 and degree < 2:
        if not (auto_degree and top >= 2):
            raise CcdgridError(
                f"kernel order 3 needs a trend of degree 2 or more ({n_points} holes, "
                f"degree {degree})"
            )
        degree = 2
    return (int(order),), degree


def _kept_bases(bases, rows, points):
    """The GCV eigenbases a refit may reuse, as one :class:`ccdgrid.gcv.GcvBasis`, or None.

    ``bases`` ``{order: GcvBasis}`` from one GCV: the lowest order's basis,
    the others among its ``others``, all with the ``rows`` of the points
    the GCV ran on and the ``points`` (px) fitted.
    """
    if not bases:
        return None
    kept = [replace(bases[o], rows=rows, points=points, others=()) for o in sorted(bases)]
    return replace(kept[0], others=tuple(kept[1:]))


def _kept_factor(rbf, pts):
    """The factor a refit may reuse, with ``pts`` (px, the points fitted); None if tiled."""
    factor = getattr(rbf, "factor", None)
    # a reused factor keeps its matrix (no copy) but takes these points
    return None if factor is None else replace(factor, points=pts)


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
