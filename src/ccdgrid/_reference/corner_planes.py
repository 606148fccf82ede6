"""Pure-numpy twin of ``ccdgrid._ext._corner_planes``: one shuffled chunk of pixel_corners.

Trusts its inputs (:mod:`ccdgrid.detector_file` checks them): ``corner_map``
is a C-contiguous ``(ny + 1, nx + 1)`` float32 array, ``0 <= i0 < i1 <= ny``,
``axis`` is 0 or 1 and ``out`` a C-contiguous ``(4, rows * nx * 4)`` uint8
array with ``rows >= i1 - i0``.

Never materialises the float32 chunk: for each byte plane, the four bytes of
one pixel (corners A, B, C, D) are packed into a single little-endian uint32
word with whole-array shifts and ors, which numpy vectorises, instead of four
strided float32 copies and a byte-by-byte shuffle.
"""

import threading

import numpy as np

__all__ = ["corner_planes"]

_SCRATCH = threading.local()


def corner_planes(corner_map, pixel, i0, i1, axis, out):
    """Fill ``out`` with HDF5's shuffle of the chunk of corner coordinates of rows ``i0 .. i1``.

    Parameters
    ----------
    corner_map : ndarray of shape (ny + 1, nx + 1), float32, C-contiguous
        ``dy`` (axis 0) or ``dx`` (axis 1) on the corner grid, px.
    pixel : float
        ``pixel1`` (axis 0) or ``pixel2`` (axis 1), m.
    i0, i1 : int
        First and past-the-last pixel row of the chunk.
    axis : {0, 1}
        Coordinate written: 0 = y, ``pixel * (d + i)``; 1 = x,
        ``pixel * (d + j)``; computed in float64 and rounded to float32
        (pyFAI's corner-shaped ``set_dy``/``set_dx``).
    out : ndarray of shape (4, rows * nx * 4), uint8, C-contiguous
        Written in place: byte plane ``b`` holds byte ``b`` (little-endian)
        of the float32 values of the chunk ``(rows, nx, 4, 1)`` in order,
        corners A = (i, j), B = (i + 1, j), C = (i + 1, j + 1), D = (i, j + 1)
        of each pixel; rows past ``i1 - i0`` are 0.
    """
    source = corner_map[i0 : i1 + 1]
    n, nx = i1 - i0, source.shape[1] - 1
    block, single, byte, term = _scratch(source.shape)
    np.copyto(block, source)
    if axis == 0:
        block += np.arange(i0, i1 + 1, dtype=np.float64)[:, None]
    else:
        block += np.arange(nx + 1, dtype=np.float64)
    block *= pixel
    np.copyto(single, block, casting="same_kind")
    # values, not memory, are shifted below: the bytes are little-endian on any host
    bits = single.view("<u4")
    planes = out.view("<u4").reshape(4, -1, nx)
    planes[:, n:] = 0  # padding rows of the partial last chunk, outside the dataset
    for b in range(4):
        np.right_shift(bits, 8 * b, out=byte)
        byte &= 0xFF
        word = planes[b, :n]
        np.left_shift(byte[1:, :-1], 8, out=word)  # B = corner (i + 1, j)
        word |= byte[:-1, :-1]  # A = corner (i, j): lowest byte, first in memory
        np.left_shift(byte[1:, 1:], 16, out=term)  # C = corner (i + 1, j + 1)
        word |= term
        np.left_shift(byte[:-1, 1:], 24, out=term)  # D = corner (i, j + 1)
        word |= term


def _scratch(shape):
    """This thread's work arrays for a corner block of ``shape`` (rows + 1, nx + 1).

    Reused from chunk to chunk: freshly allocated MB-sized arrays come from
    new zero pages, and the page faults on first touch cost more than all of
    the arithmetic.
    """
    arrays = getattr(_SCRATCH, "arrays", None)
    if arrays is None or arrays[0].shape[0] < shape[0] or arrays[0].shape[1] != shape[1]:
        arrays = (
            np.empty(shape, dtype=np.float64),  # metres, exact
            np.empty(shape, dtype="<f4"),  # metres, rounded
            np.empty(shape, dtype="<u4"),  # one byte of each corner
            np.empty((shape[0] - 1, shape[1] - 1), dtype="<u4"),  # one shifted term
        )
        _SCRATCH.arrays = arrays
    rows = shape[0]
    return arrays[0][:rows], arrays[1][:rows], arrays[2][:rows], arrays[3][: rows - 1]
