"""The pixel-to-hole error of an affine grid model, with its analytic gradient.

**Coordinate order warning.** Everything in this module is in **(x, y)**
order, mirroring the CCD-calibration tutorial it reproduces: the parameters
are ``P = (Ox, Oy, Xx, Yx, Xy, Yy)`` and the points are ``(x, y)`` pixel
positions. It is the one place in ccdgrid that does not use ``(y, x)``;
convert with ``points_yx[:, ::-1]``.

The model maps hole indices to pixels, ``pixel_xy = R @ hole_xy + T`` with
``R = [[Xx, Yx], [Xy, Yy]]`` (columns: the pixel steps of one hole along x
and along y) and ``T = (Ox, Oy)``. :func:`grid_error` is what
``scipy.optimize.minimize(grid_error, P0, args=(points,), jac=True)`` wants.
"""

import math

import numpy as np

from ._ext import _grid_error as _cython
from ._reference import grid_error as _numpy
from ._validation import as_points, check_backend
from .errors import CcdgridError

__all__ = ["grid_error", "grid_error_value"]

_ENGINES = {"cython": _cython, "numpy": _numpy}

_EPS = float(np.finfo(np.float64).eps)


def _as_parameters(P):
    """``P`` as a float64 (6,) array with a finite, regular ``R``."""
    arr = np.asarray(P)
    if arr.dtype.kind not in "iuf":
        raise CcdgridError(f"`P` must hold real numbers, got an array of dtype {arr.dtype}")
    if arr.shape != (6,):
        raise CcdgridError(
            f"`P` must have shape (6,) as (Ox, Oy, Xx, Yx, Xy, Yy), got {arr.shape}"
        )
    # Six Python numbers: checking them one by one costs less than a numpy
    # call, and this runs once per objective evaluation in a minimiser.
    values = arr.tolist()
    if not all(map(math.isfinite, values)):
        raise CcdgridError(f"`P` must be finite, got {values}")
    _, _, xx, yx, xy, yy = (float(v) for v in values)
    det = xx * yy - yx * xy
    # Singular when det is zero up to the rounding error of its own two products.
    if abs(det) <= 4 * _EPS * (abs(xx * yy) + abs(yx * xy)):
        raise CcdgridError(
            f"`P` has a singular grid matrix R = [[Xx, Yx], [Xy, Yy]] = "
            f"[[{xx!r}, {yx!r}], [{xy!r}, {yy!r}]] (det = {det!r})"
        )
    return np.ascontiguousarray(arr, dtype=np.float64)


def grid_error(P, points, *, residuals=False, backend="cython"):
    """Sum of squared distances, in hole units, from each point to its nearest hole.

    .. warning:: **(x, y) order.** ``P`` and ``points`` are in (x, y) order,
       mirroring the CCD-calibration tutorial; everywhere else ccdgrid uses
       (y, x). Pass ``points_yx[:, ::-1]``.

    Parameters
    ----------
    P : array_like of shape (6,)
        ``(Ox, Oy, Xx, Yx, Xy, Yy)`` in pixels: the model is
        ``pixel_xy = R @ hole_xy + (Ox, Oy)`` with ``R = [[Xx, Yx], [Xy, Yy]]``.
    points : array_like of shape (N, 2)
        Measured hole positions, **(x, y)** in pixels.
    residuals : bool, optional
        Also return each point's fractional offset from its nearest hole.
    backend : {"cython", "numpy"}, optional
        Fused one-pass kernel or its vectorised numpy twin (same results to
        rounding of the sums, about 1e-13 relative).

    Returns
    -------
    value : float
        ``sum_k |frac(R^-1 (p_k - T))|^2`` in hole units squared, with
        ``frac(u) = u - round(u)`` rounding half to even (``np.rint``).
    gradient : ndarray of shape (6,), float64
        ``d value / d P``, analytic. ``round`` is piecewise constant, so its
        derivative is zero except where a point sits exactly half-way between
        two holes (where ``value`` is continuous but not differentiable).
    residuals : ndarray of shape (N, 2), float64
        Only with ``residuals=True``: ``frac(R^-1 (p_k - T))``, (x, y) in
        hole units (multiply by ``R`` for pixels).

    Raises
    ------
    CcdgridError
        If ``P`` is not 6 finite numbers, ``R`` is singular, ``points`` is not
        ``(N, 2)`` real, or a point is not finite (the message names it).

    See Also
    --------
    grid_error_value : the value alone.

    Notes
    -----
    The value is in hole units squared, so gradients are small: with
    ``scipy.optimize.minimize``'s default ``gtol=1e-5`` BFGS stops about
    0.01 px from the optimum; pass ``options={"gtol": 1e-10}`` for more.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.optimize import minimize
    >>> true = np.array([10.0, 20.0, 98.0, 1.5, -1.0, 97.0])
    >>> holes = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2)
    >>> points = holes @ true[2:].reshape(2, 2).T + true[:2]
    >>> fit = minimize(grid_error, true + [0.4, -0.3, 0.2, 0.1, 0.0, -0.2],
    ...                args=(points,), jac=True, options={"gtol": 1e-10})
    >>> bool(np.allclose(fit.x, true, atol=1e-6))
    True
    """
    engine = _ENGINES[check_backend(backend)]
    params = _as_parameters(P)
    pts = as_points(points)
    out = engine.grid_error(params, pts, bool(residuals))
    if not math.isfinite(out[0]):
        # Checked after the pass, which costs nothing when all is well.
        bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
        if bad.size:
            k = int(bad[0])
            raise CcdgridError(f"`points[{k}]` = {tuple(pts[k].tolist())} is not finite")
    return out


def grid_error_value(P, points, *, backend="cython"):
    """The value of :func:`grid_error` alone (a float), for minimisers without ``jac``.

    Parameters and conventions as :func:`grid_error`: **(x, y)** order.
    """
    return grid_error(P, points, backend=backend)[0]
