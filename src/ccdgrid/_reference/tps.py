"""Pure-numpy twin of ``ccdgrid._ext._tps``: thin-plate spline kernel sums.

Kernel of order 2, ``phi(r) = r² log r``, or 3, ``phi(r) = -r⁴ log r``.

Same signatures and preconditions as the compiled kernel (checked by
:mod:`ccdgrid.thinplate` and :mod:`ccdgrid.gcv`). The kernel values of a
block of points are one ``cdist`` and a few in-place operations, summed by
a matrix product: memory traffic of ``8 M N`` bytes per pass where the
compiled kernel keeps every term in registers.
"""

import numpy as np
from scipy.spatial.distance import cdist

__all__ = ["evaluate", "kernel_matrix"]

_CHUNK = 2048  # points per block (a few MB of kernel values)


def _phi_of_r2(r2, order=2):
    """``r² log(r²) / 2`` (order 2) or ``-r⁴ log(r²) / 2`` (order 3) from ``r2``, in place.

    0 at r = 0, as the compiled kernel.
    """
    r2 += 1e-300
    k = np.log(r2)
    k *= r2
    if order == 3:
        k *= -r2
    k *= 0.5
    return k


def _monomials(u, degree):
    cols = [u[:, 0] ** a * u[:, 1] ** (t - a) for t in range(degree + 1) for a in range(t + 1)]
    return np.column_stack(cols)


def evaluate(points, centres, coef, trend, shift, scale, out, order=2):
    """Thin-plate spline values at points, into ``out``.

    Parameters
    ----------
    points : ndarray of shape (M, 2), float64
        Evaluation points, in the fit's length unit.
    centres : ndarray of shape (N, 2), float64
        Spline centres, same unit.
    coef : ndarray of shape (N, 2), float64
        Kernel weights of the two components.
    trend : ndarray of shape (P, 2), float64
        Coefficients of the monomials ``u_y^a u_x^(t - a)``, ``t = 0..d``,
        ``a = 0..t`` in that order, ``P = (d + 1)(d + 2) / 2``, ``d <= 5``.
    shift : ndarray of shape (2,), float64
        The monomials are of ``u = (point - shift) / scale``.
    scale : float
        See ``shift``, > 0.
    out : ndarray of shape (M, 2), float64
        ``out[i] = sum_k coef[k] phi(|p_i - c_k|) + trend part``, with
        ``phi(r) = r² log r`` (order 2) or ``-r⁴ log r`` (order 3).
    order : int
        Order of the thin-plate kernel, 2 or 3.
    """
    degree = 0
    while (degree + 1) * (degree + 2) // 2 < len(trend):
        degree += 1
    for start in range(0, len(points), _CHUNK):
        part = points[start : start + _CHUNK]
        value = _phi_of_r2(cdist(part, centres, "sqeuclidean"), order) @ coef
        value += _monomials((part - shift) / scale, degree) @ trend
        out[start : start + len(part)] = value


def kernel_matrix(centres, smoothing, out, order=2):
    """Thin-plate kernel matrix plus smoothing on its diagonal, into ``out``.

    Parameters
    ----------
    centres : ndarray of shape (N, 2), float64
        Spline centres.
    smoothing : float
        Added to the diagonal.
    out : ndarray of shape (N, N), float64
        ``out[i, j] = phi(|c_i - c_j|) + smoothing [i == j]``, symmetric,
        ``phi(r) = r² log r`` (order 2) or ``-r⁴ log r`` (order 3), 0 at r = 0.
    order : int
        Order of the thin-plate kernel, 2 or 3.
    """
    out[...] = _phi_of_r2(cdist(centres, centres, "sqeuclidean"), order)
    out[np.diag_indices(len(centres))] = smoothing
