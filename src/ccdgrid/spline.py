"""Fit2D spline files: the distortion format every tool in the field reads.

A Fit2D spline file stores the two displacement fields as tensor-product
cubic B-splines (FITPACK ``tck``) in a fixed-width text layout::

    SPATIAL DISTORTION SPLINE INTERPOLATION COEFFICIENTS
    <blank>
      VALID REGION
    xmin ymin xmax ymax                       (px, 4 fields)
    <blank>
      GRID SPACING, X-PIXEL SIZE, Y-PIXEL SIZE
    grid pixel_x pixel_y                      (µm, 3 fields)
    <blank>
      X-DISTORTION
    n_knots_x n_knots_y                       (two I6 fields)
    knots in x, then (new line) knots in y, then (new line) the
    (n_knots_x - 4) * (n_knots_y - 4) coefficients, x-major
    <blank>
      Y-DISTORTION
    (same layout)
    <blank>

Every number is a 14-character ``E`` field (``%14.7E``; Fit2D itself writes
mantissas like ``0.2048000E+04``), five to a line.

Coordinates. The spline's variables are Fit2D/pyFAI pixel coordinates, in
which corner ``(i, j)`` of the pixel grid is at ``(y, x) = (i, j)`` and the
centre of pixel ``(i, j)`` at ``(i + 0.5, j + 0.5)``. In ccdgrid's index
coordinates (pixel centre at ``(i, j)``) that is ``spline = index + 0.5``.
X-DISTORTION is ``dx(x, y)`` and Y-DISTORTION is ``dy(x, y)``, in pixels:
pyFAI places corner ``(i, j)`` at ``(pixel1 * (i + dy(j, i)), pixel2 * (j +
dx(j, i)))``, which is the convention of ccdgrid's corner maps (true
position = nominal position + ``(dy, dx)``). So the maps ``dy, dx`` of shape
``(ny + 1, nx + 1)`` are the splines sampled at the integer corners:
``dx[i, j] = X(x=j, y=i)``.
"""

import math
import os
import pathlib
import secrets
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import CcdgridError

__all__ = ["SplineFit", "SplineMaps", "SplineToleranceWarning", "read_spline", "write_spline"]

TITLE = "SPATIAL DISTORTION SPLINE INTERPOLATION COEFFICIENTS"
_KEY_REGION = "VALID REGION"
_KEY_GRID = "GRID SPACING, X-PIXEL SIZE, Y-PIXEL SIZE"
_KEY_X = "X-DISTORTION"
_KEY_Y = "Y-DISTORTION"
_KEYWORDS = (_KEY_REGION, _KEY_GRID, _KEY_X, _KEY_Y)
_FIELD = 14  # characters per number
_PER_LINE = 5
_ORDER = 3  # Fit2D splines are bicubic
_MIN_CORNERS = _ORDER + 1  # FITPACK needs k + 1 points per axis

# Automatic fit: least squares on the valid corners alone, with uniform knots,
# from the coarsest spacing down until the largest error on a valid corner is
# within _ACCEPT x tolerance. The margin covers what the file and pyFAI add:
# float32 knots and coefficients, float32 corners in metres (~1e-4 px).
_ACCEPT = 0.9
# Knot intervals tried along the longer axis. The bound keeps the file compact
# (Fit2D's and pyFAI's splines have tens of knots per axis) and the solve
# small (at most 67² coefficients); a map that needs more is reported.
_INTERVALS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_MIN_SPACING = 4  # corner steps per knot interval, at least
# The fit runs on every `stride`-th corner, about this many along the shorter
# axis, but at least _MIN_SAMPLES per knot interval: the maps are smooth on
# scales of tens of pixels and the error is then measured on every corner.
_FIT_POINTS = 256
_MIN_SAMPLES = 8
# Weight of the bending penalty, relative to the largest diagonal term of the
# normal matrix: small enough to leave the fit to the data where there are
# any, it decides the coefficients the valid corners leave free. The ridge
# only makes the system regular when the valid corners are collinear.
_BEND = 1e-6
_RIDGE = 1e-12
_EVAL_BLOCK = 1 << 16  # points per block in scattered evaluation
_ERROR_ROWS = 256  # corner rows per block when measuring the fit error


class SplineToleranceWarning(UserWarning):
    """:func:`write_spline` could not meet its tolerance with a compact spline.

    The file is written with the most accurate spline tried; the message
    and :attr:`SplineFit.max_error` give the error reached.
    """


@dataclass(frozen=True)
class SplineMaps:
    """A Fit2D spline distortion, as read by :func:`read_spline`.

    Attributes
    ----------
    x_tck, y_tck : tuple of (ndarray, ndarray, ndarray), float64
        FITPACK ``(knots_x, knots_y, coefficients)`` of the X-DISTORTION
        (``dx``) and Y-DISTORTION (``dy``) splines, bicubic; the
        coefficient of basis ``(a, b)`` is at ``a * (len(knots_y) - 4) + b``.
        Their variables are ``(x, y)`` = (column, row) in Fit2D/pyFAI pixel
        coordinates (corner ``(i, j)`` at ``(y, x) = (i, j)``); their values
        are pixels.
    valid_region : tuple of 4 float
        ``(xmin, ymin, xmax, ymax)``, px, as in the file.
    pixel_size : tuple of 2 float
        ``(pixel1, pixel2)`` = (y, x) pixel size in metres (the file holds
        µm in (x, y) order).
    grid_spacing : float or None
        Hole pitch of the calibration grid in metres (the file holds µm);
        None when the file says 0.
    path : pathlib.Path or None
        The file read, if any.
    """

    x_tck: tuple = field(repr=False)
    y_tck: tuple = field(repr=False)
    valid_region: tuple
    pixel_size: tuple
    grid_spacing: float | None = None
    path: pathlib.Path | None = None

    @property
    def shape(self):
        """``(ny, nx)`` pixels of the detector, as pyFAI derives it from VALID REGION."""
        xmin, ymin, xmax, ymax = self.valid_region
        return (int(ymax - ymin), int(xmax - xmin))

    @property
    def knots(self):
        """Knot counts ``((nx_X, ny_X), (nx_Y, ny_Y))`` of the two splines."""
        return tuple((len(tck[0]), len(tck[1])) for tck in (self.x_tck, self.y_tck))

    def evaluate(self, y, x):
        """Displacement at arbitrary points.

        Parameters
        ----------
        y, x : array_like of float, px
            Index coordinates (ccdgrid's convention: the centre of pixel
            ``(i, j)`` is at ``(i, j)``, corner ``(i, j)`` at
            ``(i - 0.5, j - 0.5)``); broadcast against each other. Points
            beyond the spline's knot range take the value at the nearest
            edge of that range, as FITPACK does.

        Returns
        -------
        dy, dx : ndarray of float64, px
            Displacements, shaped like the broadcast inputs.
        """
        y, x = np.broadcast_arrays(
            _coordinates(y, "y").astype(np.float64), _coordinates(x, "x").astype(np.float64)
        )
        # Fit2D/pyFAI coordinates are index coordinates + 0.5
        u, v = x.ravel() + 0.5, y.ravel() + 0.5
        dx = _evaluate_points(self.x_tck, u, v)
        dy = _evaluate_points(self.y_tck, u, v)
        return dy.reshape(y.shape), dx.reshape(y.shape)

    def corner_maps(self, shape=None):
        """Sample the splines at the pixel corners, as pyFAI's Detector does.

        Parameters
        ----------
        shape : pair of int or None
            ``(ny, nx)`` pixels; None uses :attr:`shape`.

        Returns
        -------
        dy, dx : ndarray of shape (ny + 1, nx + 1), float64, px
            Corner displacement maps: corner ``(i, j)`` (index coordinates
            ``(i - 0.5, j - 0.5)``, pyFAI's ``(i, j)``) truly lies at its
            nominal position plus ``(dy[i, j], dx[i, j])``.
        """
        ny, nx = self.shape if shape is None else _shape(shape)
        rows = np.arange(ny + 1, dtype=np.float64)
        cols = np.arange(nx + 1, dtype=np.float64)
        return _evaluate_grid(self.y_tck, cols, rows), _evaluate_grid(self.x_tck, cols, rows)


@dataclass(frozen=True)
class SplineFit:
    """What :func:`write_spline` wrote and how well it reproduces the maps.

    Attributes
    ----------
    path : pathlib.Path
        The file written.
    spline : SplineMaps
        The splines, exactly as a reader finds them in the file.
    smoothing : tuple of 2 float
        For ``(dx, dy)``: the FITPACK ``s`` given, or, for the automatic
        fit, its sum of squared residuals over the valid fitted corners, px²
        (the ``s`` that FITPACK would be held to for the same fit).
    stride : tuple of 2 int
        The fit used every ``stride``-th corner along each axis, for
        ``(dx, dy)`` (1 = every corner).
    max_error : float
        Largest ``|spline - map|`` over the valid corners and both
        components, px, measured with the float32-rounded knots and
        coefficients a reader such as pyFAI uses.
    rms_error : float
        RMS of the same differences, px.
    valid_corners : int
        Number of corners the error is measured on.
    """

    path: pathlib.Path
    spline: SplineMaps = field(repr=False)
    smoothing: tuple
    stride: tuple
    max_error: float
    rms_error: float
    valid_corners: int


# -- writing -----------------------------------------------------------------


def write_spline(
    path,
    dy,
    dx,
    *,
    pixel_size,
    grid_spacing=None,
    smoothing=None,
    valid_region=None,
    tolerance=0.01,
):
    """Fit corner displacement maps with bicubic splines and write a Fit2D spline file.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.spline`` by custom). Written under a temporary name
        and renamed, so a failure leaves no partial file.
    dy, dx : array_like of shape (ny + 1, nx + 1), float, px
        Corner displacement maps (ny, nx >= 3): corner ``(i, j)`` is at index
        coordinates ``(i - 0.5, j - 0.5)``, which is pyFAI's ``(i, j)``; its
        true position is its nominal one plus ``(dy, dx)``. Must be finite on
        the valid corners; other corners may hold anything, NaN included.
    pixel_size : float or pair of float
        ``(pixel1, pixel2)`` = (y, x) pixel size in metres (one number: square
        pixels). Written in µm, in the file's (x, y) order.
    grid_spacing : float or None
        Hole pitch of the calibration grid in metres, written in µm; None
        writes 0 (unknown). Readers do not use it to correct images.
    smoothing : float or None
        FITPACK's ``s`` for both maps: the allowed sum of squared residuals
        over all corners, px² (pyFAI's ``array2spline(smoothing=...)``).
        None: the automatic fit (see Notes), the coarsest spline whose
        largest error on a valid corner is within ``tolerance``.
    valid_region : array_like of bool or None
        Where the maps are measured (True = valid): either per corner,
        shape (ny + 1, nx + 1), or per pixel, shape (ny, nx), in which case
        the corners of valid pixels are valid. Note the sense: a pyFAI mask
        (1 = invalid) is ``valid_region=(mask == 0)``. The other corners
        neither pull the spline nor cost knots: the spline there is a
        smooth continuation of the valid region. None: all valid.
    tolerance : float
        Largest acceptable ``|spline - map|`` on a valid corner, px, when
        ``smoothing`` is None.

    Returns
    -------
    SplineFit
        The file written, the smoothing chosen and the errors measured.

    Raises
    ------
    CcdgridError
        If an argument is invalid (the message names it).
    OSError
        If the file cannot be written.

    Warns
    -----
    SplineToleranceWarning
        If a map is not within ``tolerance`` of any spline with up to 64
        knot intervals per axis (noise or steps in the map); the most
        accurate one tried is written and ``max_error`` says how far off.

    Notes
    -----
    The header's VALID REGION is the whole frame ``(0, 0, nx, ny)``, from
    which pyFAI takes the detector shape ``(ny, nx)``; a Fit2D spline is
    evaluated everywhere, but only the valid region is fitted.

    Automatic fit (``smoothing=None``): a least-squares bicubic with
    uniformly spaced knots, weighted 1 on the valid corners and 0 on the
    others, plus a weak bending penalty (second differences of the
    coefficients) that decides only what the valid corners leave free and
    continues the spline smoothly across the invalid region. It runs on
    every ``k``-th corner (about 256 along the shorter axis, at least 8 per
    knot interval), with 1, 2, 3, 4, 6, ... 64 knot intervals along the
    longer axis until the largest error on a valid corner, with float32
    knots and coefficients, is within 0.9 ``tolerance``; the margin covers
    pyFAI's float32 corners in metres.

    Given ``smoothing``: ``scipy.interpolate.RectBivariateSpline`` (FITPACK
    ``regrid``) on every corner, with the knots FITPACK places for that
    ``s``; the invalid corners first take the values of the automatic fit,
    so they hold no step or kink for FITPACK to chase.

    Examples
    --------
    >>> fit = write_spline("frelon.spline", cal.dy, cal.dx,
    ...                    pixel_size=cal.pixel_size,
    ...                    valid_region=cal.mask == 0)  # doctest: +SKIP
    >>> fit.max_error < 0.01  # doctest: +SKIP
    True
    >>> pyFAI.detectors.Detector(splinefile="frelon.spline").shape  # doctest: +SKIP
    (2048, 2048)
    """
    dy = _corner_map(dy, "dy")
    dx = _corner_map(dx, "dx")
    if dy.shape != dx.shape:
        raise CcdgridError(f"`dy` and `dx` differ in shape: {dy.shape} vs {dx.shape}")
    pixel1, pixel2 = _pixel_size(pixel_size)
    grid_um = 0.0 if grid_spacing is None else _positive(grid_spacing, "grid_spacing") * 1e6
    if smoothing is not None:
        smoothing = _non_negative(smoothing, "smoothing")
    tolerance = _positive(tolerance, "tolerance")
    valid = _valid_corners(valid_region, dx.shape)
    for label, arr in (("dy", dy), ("dx", dx)):
        bad = np.count_nonzero(~np.isfinite(arr[valid]))
        if bad:
            raise CcdgridError(
                f"`{label}` holds {bad} non-finite values on valid corners; mark them "
                "invalid in `valid_region`"
            )
    target = pathlib.Path(path).expanduser()
    _check_target(target)

    ny1, nx1 = dx.shape
    x_fit = _fit_map(dx, valid, smoothing, tolerance, "dx")
    y_fit = _fit_map(dy, valid, smoothing, tolerance, "dy")
    spline = SplineMaps(
        x_tck=x_fit[0],
        y_tck=y_fit[0],
        valid_region=(0.0, 0.0, float(nx1 - 1), float(ny1 - 1)),
        pixel_size=(pixel1, pixel2),
        grid_spacing=None if grid_um == 0 else grid_um * 1e-6,
        path=target,
    )
    text = _format_spline(spline, grid_um)
    _atomic_write_text(target, text)
    # what a reader gets back: the 8 significant digits written, in float32
    stored = read_spline(target)
    worst, squares = 0.0, 0.0
    for tck, corner_map in ((stored.x_tck, dx), (stored.y_tck, dy)):
        map_worst, map_squares = _error_stats(_as_float32(tck), corner_map, valid)
        worst = max(worst, map_worst)
        squares += map_squares
    count = np.count_nonzero(valid)
    return SplineFit(
        path=target,
        spline=stored,
        smoothing=(x_fit[1], y_fit[1]),
        stride=(x_fit[2], y_fit[2]),
        max_error=worst,
        rms_error=math.sqrt(squares / (2 * count)),
        valid_corners=int(count),
    )


def _fit_map(z, valid, smoothing, tolerance, label):
    """Fit one corner map; return (tck, s, stride) of the spline to write."""
    if smoothing is None:
        return _least_squares_fit(z, valid, tolerance, label)
    filled = z
    if not valid.all():
        # FITPACK weighs every corner alike: give the invalid ones the values of
        # the automatic fit, a bicubic that meets the valid corners within the
        # tolerance, so they hold no step or kink for the given s to chase
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SplineToleranceWarning)
            tck = _least_squares_fit(z, valid, tolerance, label)[0]
        rows = np.arange(z.shape[0], dtype=np.float64)
        cols = np.arange(z.shape[1], dtype=np.float64)
        filled = np.where(valid, z, _evaluate_grid(tck, cols, rows))
    return _fit(filled, smoothing), smoothing, 1


def _least_squares_fit(z, valid, tolerance, label):
    """The coarsest uniform-knot bicubic fitting ``z`` within the tolerance on the valid corners.

    Returns ``(tck, squares, stride)``: the spline, its sum of squared
    residuals over the fitted corners (px²) and the stride of those corners.
    When even the finest allowed knots miss the tolerance, returns the
    finest spline and warns (:class:`SplineToleranceWarning`).
    """
    ny1, nx1 = z.shape
    longer = max(ny1, nx1) - 1
    limit = _ACCEPT * tolerance
    # invalid corners may hold NaN; they get weight 0, and 0 * NaN is NaN
    known = np.where(valid, z, 0.0)
    for intervals in _interval_counts(longer):
        spacing = longer / intervals
        stride = max(1, min(min(ny1, nx1) // _FIT_POINTS, int(spacing // _MIN_SAMPLES)))
        tck = _masked_least_squares(known, valid, spacing, stride)
        if _max_error(tck, z, valid, limit) <= limit:
            break
    else:
        # the finest spline tried is the most accurate; _max_error may have
        # stopped at a subset of the corners, so measure it on all of them
        error = _error_stats(_as_float32(tck), z, valid)[0]
        if error > tolerance:
            warnings.warn(
                f"the {label} map is not within the tolerance ({tolerance:g} px) of a "
                f"bicubic spline with knots {spacing:.3g} px apart or more: the finest tried "
                f"({len(tck[0])} x {len(tck[1])} knots) is {error:.3g} px off on a valid "
                "corner. The map has detail on scales below that spacing (ripple, noise "
                "or steps); the file carries this spline. Raise the tolerance or check the "
                "map.",
                SplineToleranceWarning,
                stacklevel=4,
            )
    return tck, _error_stats(tck, z, valid, stride=stride)[1], stride


def _interval_counts(length):
    """Knot interval counts to try along an axis of ``length`` corner steps, coarsest first."""
    counts = [n for n in _INTERVALS if length / n >= _MIN_SPACING]
    return counts or [1]


def _uniform_knots(length, spacing):
    """Clamped cubic knots on [0, length], interior knots ``spacing`` apart (or about)."""
    intervals = max(1, round(length / spacing))
    inner = np.linspace(0.0, float(length), intervals + 1)[1:-1]
    return np.concatenate([np.zeros(_ORDER + 1), inner, np.full(_ORDER + 1, float(length))])


def _masked_least_squares(known, valid, spacing, stride):
    """Penalised least-squares bicubic on the valid corners of every ``stride``-th row/column.

    Minimises sum over valid sampled corners of (spline - known)² plus a
    weak bending penalty on the coefficients (second differences along y
    and x and the mixed difference): the penalty only decides the
    coefficients the valid corners leave free, which it continues smoothly
    (linearly, far from the data) into the invalid region.
    """
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    ny1, nx1 = known.shape
    rows, cols = _samples(ny1, stride), _samples(nx1, stride)
    tx = _uniform_knots(nx1 - 1, spacing)
    ty = _uniform_knots(ny1 - 1, spacing)
    mx, my = len(tx) - _ORDER - 1, len(ty) - _ORDER - 1
    bx = _design(cols.astype(np.float64), tx, mx).tocsr()
    by = _design(rows.astype(np.float64), ty, my).tocsr()
    weight = valid[np.ix_(rows, cols)].astype(np.float64)
    values = known[np.ix_(rows, cols)]
    # normal matrix of the tensor basis, weighted: sum_ij w_ij By_ia By_ia' Bx_jb Bx_jb'
    # built from products of neighbouring basis functions along each axis
    wide = 2 * _ORDER + 1
    along_x = _neighbour_products(bx, mx).T @ weight.T  # (wide * mx, rows)
    blocks = np.asarray(_neighbour_products(by, my).T @ along_x.T).reshape(my, wide, mx, wide)
    a = np.arange(my)[:, None, None, None]
    e = np.arange(-_ORDER, _ORDER + 1)[None, :, None, None]
    b = np.arange(mx)[None, None, :, None]
    d = np.arange(-_ORDER, _ORDER + 1)[None, None, None, :]
    inside = (a + e >= 0) & (a + e < my) & (b + d >= 0) & (b + d < mx)
    row_index = np.broadcast_to(a * mx + b, inside.shape)[inside]
    col_index = np.broadcast_to((a + e) * mx + b + d, inside.shape)[inside]
    size = my * mx
    normal = sparse.csr_array((blocks[inside], (row_index, col_index)), shape=(size, size))
    rhs = np.asarray(by.T @ np.asarray(bx.T @ values.T).T).ravel()  # (my, mx) flattened
    scale = float(normal.diagonal().max())
    system = normal + (_BEND * scale) * _bending(my, mx) + (_RIDGE * scale) * sparse.identity(size)
    # sparse LU: a banded Cholesky (LAPACK) is faster alone but stalls on
    # threaded BLAS when the machine is busy
    coef = spsolve(sparse.csc_array(system), rhs).reshape(my, mx)
    # the file's layout: the coefficient of basis (x = a, y = b) at a * my + b
    return (tx, ty, np.ascontiguousarray(coef.T).ravel())


def _neighbour_products(basis, n_coef):
    """Sparse (points, 7 n_coef): column 7 a + 3 + e holds B[:, a] * B[:, a + e], |e| <= 3.

    ``basis`` is a CSR design matrix with its 4 non-zero values of each row
    in consecutive, sorted columns (as ``BSpline.design_matrix`` makes it).
    """
    from scipy import sparse

    npts = basis.shape[0]
    width = _ORDER + 1
    first = basis.indices[basis.indptr[:-1]]
    values = basis.data.reshape(npts, width)
    p, q = (g.ravel() for g in np.meshgrid(np.arange(width), np.arange(width), indexing="ij"))
    wide = 2 * _ORDER + 1
    cols = (first[:, None] + p) * wide + _ORDER + (q - p)
    data = values[:, p] * values[:, q]
    point = np.repeat(np.arange(npts), width * width)
    return sparse.csr_array((data.ravel(), (point, cols.ravel())), shape=(npts, wide * n_coef))


def _bending(my, mx):
    """Bending energy of a (my, mx) coefficient grid: yy² + 2 xy² + xx² differences."""
    from scipy import sparse

    dyy, dxx = _second_difference(my), _second_difference(mx)
    dxy = sparse.kron(_first_difference(my), _first_difference(mx))
    return (
        sparse.kron(dyy.T @ dyy, sparse.identity(mx))
        + sparse.kron(sparse.identity(my), dxx.T @ dxx)
        + 2.0 * (dxy.T @ dxy)
    )


def _fit(z, s):
    """FITPACK's smoothing bicubic of a full corner map for ``s``: its (tx, ty, c)."""
    from scipy.interpolate import RectBivariateSpline

    # x = column, y = row, as the file stores it
    spline = RectBivariateSpline(
        np.arange(z.shape[1], dtype=np.float64),
        np.arange(z.shape[0], dtype=np.float64),
        z.T,
        kx=_ORDER,
        ky=_ORDER,
        s=s,
    )
    tx, ty = spline.get_knots()
    return (tx, ty, spline.get_coeffs())


def _samples(n, stride):
    """Every ``stride``-th index of ``range(n)``, always including the last."""
    idx = np.arange(0, n, stride)
    if idx[-1] != n - 1:
        idx = np.append(idx, n - 1)
    return idx


def _max_error(tck, z, valid, limit):
    """Largest |spline - z| on the valid corners, or some value above ``limit``."""
    tck32 = _as_float32(tck)
    # most rejected candidates already fail on every 4th corner: 1/16 of the work
    worst, _ = _error_stats(tck32, z, valid, stride=4)
    if worst > limit:
        return worst
    return _error_stats(tck32, z, valid)[0]


def _as_float32(tck):
    """Knots and coefficients rounded to float32: what pyFAI keeps of the file."""
    return tuple(np.asarray(a, np.float32).astype(np.float64) for a in tck)


def _error_stats(tck, z, valid, *, stride=1):
    """Max and sum of squares of |spline - z| over the valid corners of every stride-th row/col.

    Evaluated by blocks of rows, so no full-size temporary is made.
    """
    coef = _coefficients(tck)
    z, valid = z[::stride, ::stride], valid[::stride, ::stride]
    rows = np.arange(0, z.shape[0] * stride, stride, dtype=np.float64)
    cols = np.arange(0, z.shape[1] * stride, stride, dtype=np.float64)
    along_x = (_design(cols, tck[0], coef.shape[0]) @ coef).T  # (n_coef_y, len(cols))
    by = _design(rows, tck[1], coef.shape[1]).tocsr()
    worst, squares = 0.0, 0.0
    for start in range(0, len(rows), _ERROR_ROWS):
        block = slice(start, start + _ERROR_ROWS)
        err = np.asarray(by[block] @ along_x)
        err -= z[block]
        # invalid corners may hold NaN: where() drops them
        err = np.where(valid[block], np.abs(err, out=err), 0.0).ravel()
        worst = max(worst, float(err.max()))
        squares += float(np.dot(err, err))
    return worst, squares


def _second_difference(n):
    from scipy import sparse

    return sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))


def _first_difference(n):
    from scipy import sparse

    return sparse.diags([-1.0, 1.0], [0, 1], shape=(n - 1, n))


def _format_spline(spline, grid_um):
    pixel1, pixel2 = spline.pixel_size
    lines = [
        TITLE,
        "",
        f"  {_KEY_REGION}",
        _numbers(spline.valid_region),
        "",
        f"  {_KEY_GRID}",
        _numbers((grid_um, pixel2 * 1e6, pixel1 * 1e6)),
        "",
    ]
    for key, (tx, ty, c) in ((_KEY_X, spline.x_tck), (_KEY_Y, spline.y_tck)):
        lines.append(f"  {key}")
        lines.append(f"{len(tx):6d}{len(ty):6d}")
        for block in (tx, ty, c):  # each block starts on a new line
            lines.extend(
                _numbers(block[k : k + _PER_LINE]) for k in range(0, len(block), _PER_LINE)
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _numbers(values):
    return "".join(f"{float(v):14.7E}" for v in values)


# -- reading -----------------------------------------------------------------


def read_spline(path):
    """Read a Fit2D spline file (as written by Fit2D, pyFAI or :func:`write_spline`).

    Parameters
    ----------
    path : str or os.PathLike
        The spline file.

    Returns
    -------
    SplineMaps

    Raises
    ------
    CcdgridError
        If the file does not exist or is malformed; the message names the
        file and the line (1-based) at fault.

    Notes
    -----
    Numbers are read as 14-character fields (the format's definition, which
    lets negative numbers touch, as Fortran writes them); a line that does
    not split that way is read as whitespace-separated numbers. Keywords are
    matched case-insensitively, on lines of their own. A data block ends at
    the first blank line, at the next keyword, or at the end of the file.

    Examples
    --------
    >>> spline = read_spline("frelon.spline")  # doctest: +SKIP
    >>> dy, dx = spline.corner_maps()  # doctest: +SKIP
    >>> dx.shape  # doctest: +SKIP
    (2049, 2049)
    """
    target = pathlib.Path(path).expanduser()
    if not target.is_file():
        raise CcdgridError(f"spline file not found: {target}")
    raw = target.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [line.rstrip() for line in text.splitlines()]
    found = {}
    for index, line in enumerate(lines):
        key = line.strip().upper()
        if key in _KEYWORDS:
            if key in found:
                raise CcdgridError(
                    f"{target}, line {index + 1}: keyword {key!r} appears twice "
                    f"(first on line {found[key] + 1})"
                )
            found[key] = index
    missing = [key for key in _KEYWORDS if key not in found]
    if missing:
        raise CcdgridError(
            f"{target} is not a Fit2D spline file: no {' / '.join(repr(k) for k in missing)} "
            "keyword line"
        )
    region = _header_numbers(target, lines, found[_KEY_REGION], 4)
    xmin, ymin, xmax, ymax = region
    if not (xmax > xmin and ymax > ymin):
        raise CcdgridError(
            f"{target}, line {found[_KEY_REGION] + 2}: VALID REGION must have xmax > xmin and "
            f"ymax > ymin, got {region}"
        )
    grid_um, px_um, py_um = _header_numbers(target, lines, found[_KEY_GRID], 3)
    if not (px_um > 0 and py_um > 0):
        raise CcdgridError(
            f"{target}, line {found[_KEY_GRID] + 2}: pixel sizes must be positive, got "
            f"{px_um} and {py_um} µm"
        )
    x_tck = _read_block(target, lines, found[_KEY_X])
    y_tck = _read_block(target, lines, found[_KEY_Y])
    return SplineMaps(
        x_tck=x_tck,
        y_tck=y_tck,
        valid_region=tuple(region),
        pixel_size=(py_um * 1e-6, px_um * 1e-6),
        grid_spacing=grid_um * 1e-6 if grid_um > 0 else None,
        path=target,
    )


def _header_numbers(target, lines, key_index, count):
    index = key_index + 1
    if index >= len(lines) or not lines[index].strip():
        found = "the end of the file" if index >= len(lines) else "a blank line"
        raise CcdgridError(
            f"{target}, line {index + 1}: expected {count} numbers after "
            f"{lines[key_index].strip()!r}, found {found}"
        )
    values = _parse_numbers(target, lines[index], index)
    if len(values) < count:
        raise CcdgridError(
            f"{target}, line {index + 1}: expected {count} numbers after "
            f"{lines[key_index].strip()!r}, found {len(values)}: {lines[index]!r}"
        )
    return values[:count]


def _read_block(target, lines, key_index):
    name = lines[key_index].strip()
    index = key_index + 1
    if index >= len(lines) or not lines[index].strip():
        raise CcdgridError(f"{target}, line {index + 1}: expected the knot counts after {name!r}")
    counts = _parse_counts(lines[index])
    if counts is None:
        raise CcdgridError(
            f"{target}, line {index + 1}: expected two knot counts after {name!r}, got "
            f"{lines[index]!r}"
        )
    nkx, nky = counts
    minimum = 2 * (_ORDER + 1)
    if nkx < minimum or nky < minimum:
        raise CcdgridError(
            f"{target}, line {index + 1}: a bicubic spline needs at least {minimum} knots "
            f"per axis, got {nkx} and {nky}"
        )
    values = []
    first = stop = index + 1
    while (
        stop < len(lines) and lines[stop].strip() and lines[stop].strip().upper() not in _KEYWORDS
    ):
        values.extend(_parse_numbers(target, lines[stop], stop))
        stop += 1
    expected = nkx + nky + (nkx - _ORDER - 1) * (nky - _ORDER - 1)
    if len(values) != expected:
        raise CcdgridError(
            f"{target}, lines {first + 1}-{max(first + 1, stop)}: {name} with {nkx} x {nky} "
            f"knots needs {expected} numbers (knots and coefficients), found {len(values)}"
        )
    values = np.asarray(values, dtype=np.float64)
    tx, ty, c = values[:nkx], values[nkx : nkx + nky], values[nkx + nky :]
    for axis, knots in (("x", tx), ("y", ty)):
        if np.any(np.diff(knots) < 0) or not knots[_ORDER] < knots[-_ORDER - 1]:
            raise CcdgridError(
                f"{target}, line {first + 1}: {name} knots in {axis} must be non-decreasing "
                "and span a non-empty interval"
            )
    return (tx, ty, c)


def _parse_numbers(target, line, index):
    """Numbers on one data line: 14-character fields, else whitespace-separated."""
    text = line.rstrip()
    fields = [text[k : k + _FIELD] for k in range(0, len(text), _FIELD)]
    values = _floats(fields)
    if values is None:
        values = _floats(text.split())
    if values is None:
        raise CcdgridError(f"{target}, line {index + 1}: cannot read numbers from {line!r}")
    return values


def _floats(tokens):
    try:
        values = [float(token) for token in tokens]
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    return values


def _parse_counts(line):
    tokens = line.split()
    if len(tokens) != 2:  # two I6 fields that touch: counts of 100000 or more
        tokens = [line[:6], line[6:12]] if len(line.rstrip()) == 12 else tokens
    try:
        counts = tuple(int(token) for token in tokens)
    except ValueError:
        return None
    return counts if len(counts) == 2 else None


# -- evaluation --------------------------------------------------------------


def _design(points, knots, n_coef):
    """Sparse cubic B-spline basis at ``points``, clamped to the knots' base interval."""
    from scipy.interpolate import BSpline

    lo, hi = knots[_ORDER], knots[n_coef]
    return BSpline.design_matrix(np.clip(points, lo, hi), knots, _ORDER)


def _coefficients(tck):
    tx, ty, c = tck
    return np.asarray(c, dtype=np.float64).reshape(len(tx) - _ORDER - 1, len(ty) - _ORDER - 1)


def _evaluate_grid(tck, cols, rows):
    """Spline on the grid ``rows x cols``; returns (len(rows), len(cols)) float64."""
    tx, ty, _ = tck
    coef = _coefficients(tck)
    bx = _design(cols, tx, coef.shape[0])
    by = _design(rows, ty, coef.shape[1])
    return np.asarray(by @ (bx @ coef).T)


def _evaluate_points(tck, u, v):
    """Spline at the points ``(x=u, y=v)``; 1-D float64 arrays."""
    tx, ty, _ = tck
    coef = _coefficients(tck)
    out = np.empty(u.shape, dtype=np.float64)
    for start in range(0, u.size, _EVAL_BLOCK):
        sl = slice(start, start + _EVAL_BLOCK)
        partial = _design(u[sl], tx, coef.shape[0]) @ coef  # (block, n_coef_y)
        by = _design(v[sl], ty, coef.shape[1])
        out[sl] = np.asarray(by.multiply(partial).sum(axis=1)).ravel()
    return out


# -- validation and file helpers ----------------------------------------------


def _corner_map(value, label):
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise CcdgridError(f"`{label}` must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2 or min(arr.shape) < _MIN_CORNERS:
        raise CcdgridError(
            f"`{label}` must be a corner map of shape (ny + 1, nx + 1) with ny, nx >= "
            f"{_MIN_CORNERS - 1}, got shape {arr.shape}"
        )
    return np.asarray(arr, dtype=np.float64)


def _valid_corners(valid_region, corner_shape):
    if valid_region is None:
        return np.ones(corner_shape, dtype=bool)
    arr = np.asarray(valid_region)
    if arr.dtype == object or not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise CcdgridError(f"`valid_region` must be a boolean array, got dtype {arr.dtype}")
    pixel_shape = (corner_shape[0] - 1, corner_shape[1] - 1)
    if arr.shape == corner_shape:
        valid = arr != 0
    elif arr.shape == pixel_shape:
        pixels = arr != 0
        valid = np.zeros(corner_shape, dtype=bool)
        # a corner is needed by any of the (up to four) valid pixels around it
        valid[:-1, :-1] |= pixels
        valid[1:, :-1] |= pixels
        valid[:-1, 1:] |= pixels
        valid[1:, 1:] |= pixels
    else:
        raise CcdgridError(
            f"`valid_region` must have the corner shape {corner_shape} or the pixel shape "
            f"{pixel_shape}, got {arr.shape}"
        )
    if not valid.any():
        raise CcdgridError("`valid_region` marks no corner as valid")
    return valid


def _pixel_size(value):
    try:
        pair = (float(value),) * 2 if np.ndim(value) == 0 else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise CcdgridError(
            f"`pixel_size` must be (pixel1, pixel2) in metres, got {value!r}"
        ) from None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise CcdgridError(f"`pixel_size` must be two positive lengths in metres, got {value!r}")
    if max(pair) > 0.1:
        raise CcdgridError(f"`pixel_size` is in metres; {value!r} is not a plausible pixel")
    return pair


def _positive(value, label):
    number = _real(value, label)
    if not number > 0 or not math.isfinite(number):
        raise CcdgridError(f"`{label}` must be a positive number, got {value!r}")
    return number


def _non_negative(value, label):
    number = _real(value, label)
    if not number >= 0 or not math.isfinite(number):
        raise CcdgridError(f"`{label}` must be a number >= 0, got {value!r}")
    return number


def _real(value, label):
    if isinstance(value, bool):
        raise CcdgridError(f"`{label}` must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CcdgridError(f"`{label}` must be a number, got {value!r}") from None


def _coordinates(value, label):
    arr = np.asarray(value)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise CcdgridError(f"`{label}` must hold real numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise CcdgridError(f"`{label}` holds non-finite coordinates")
    return arr


def _shape(shape):
    try:
        ny, nx = (int(n) for n in shape)
    except (TypeError, ValueError):
        raise CcdgridError(f"`shape` must be (ny, nx), got {shape!r}") from None
    if ny < 1 or nx < 1:
        raise CcdgridError(f"`shape` must be positive, got {shape!r}")
    return ny, nx


def _check_target(target):
    if target.is_dir():
        raise CcdgridError(f"cannot write {target}: it is a directory")
    if not target.absolute().parent.is_dir():
        raise CcdgridError(f"cannot write {target}: directory {target.parent} does not exist")


def _atomic_write_text(target, text):
    """Write ``text`` beside ``target`` under a temporary name, then rename it into place."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="ascii", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
