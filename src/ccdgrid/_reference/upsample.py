"""Pure-numpy twin of ``ccdgrid._ext._upsample``: two tensor-product cubic splines on a grid.

Same signature and preconditions as the compiled kernel (checked by
:func:`ccdgrid.maps._upsample`), sums in double throughout (the compiled
kernel makes its last four products per value in float32: a few ulps
apart). The weights are scattered into dense B-spline design matrices
and each block of rows is the matrix product ``By @ coef @ Bx.T``: the
formulation a BLAS makes fast, at the price of ``ky`` and ``kx``
multiply-adds per output value where four would do.
"""

import numpy as np

__all__ = ["upsample"]

_BLOCK_ROWS = 256  # output rows per matrix product (bounds the float64 temporaries)


def _dense(weights, starts, ncoef):
    """Dense ``(n, ncoef)`` design matrix from 4 weights per row and their first column."""
    dense = np.zeros((len(starts), ncoef))
    cols = starts[:, None] + np.arange(4)
    np.put_along_axis(dense, cols, weights, axis=1)
    return dense


def upsample(coef, wy, sy, wx, sx, out0, out1):
    """Evaluate two cubic tensor-product splines on a grid, into ``out0`` and ``out1``.

    Parameters
    ----------
    coef : ndarray of shape (2, ky, kx), float64
        B-spline coefficients of the two surfaces.
    wy : ndarray of shape (ny, 4), float64
        Non-zero B-spline weights of each output row.
    sy : ndarray of shape (ny,), int64
        Coefficient row of the first of them, ``0 <= sy <= ky - 4``.
    wx : ndarray of shape (nx, 4), float64
        Non-zero B-spline weights of each output column.
    sx : ndarray of shape (nx,), int64
        Coefficient column of the first of them, ``0 <= sx <= kx - 4``.
    out0, out1 : ndarray of shape (ny, nx), float32
        Filled with the surfaces of ``coef[0]`` and ``coef[1]``.
    """
    ky, kx = coef.shape[1:]
    bx_t = _dense(wx, sx, kx).T
    for start in range(0, out0.shape[0], _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, out0.shape[0])
        by = _dense(wy[start:stop], sy[start:stop], ky)
        for c, out in enumerate((out0, out1)):
            out[start:stop] = (by @ coef[c]) @ bx_t
