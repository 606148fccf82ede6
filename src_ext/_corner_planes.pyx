"""Compiled twin of :mod:`ccdgrid._reference.corner_planes`: one shuffled chunk of pixel_corners.

Writes, in one pass over the corner map, what HDF5's shuffle filter makes of
the chunk ``(rows, nx, 4, 1)`` of pyFAI's ``pixel_corners`` that holds the y
(``axis=0``) or x (``axis=1``) coordinate, in metres, of the corners A, B, C,
D of the pixels of rows ``i0 .. i1 - 1``: byte plane ``b`` of ``out`` holds
byte ``b`` (little-endian) of every float32 value of the chunk, in the
chunk's order (pixel by pixel, A B C D within a pixel).

The value of corner ``(i, j)`` is pyFAI's corner-shaped ``set_dy``/``set_dx``
arithmetic, ``pixel * (d + i)`` (axis 0) or ``pixel * (d + j)`` (axis 1) in
double, rounded to float32, so the file equals pyFAI's own bit for bit. Each
corner row is converted once and kept in a small scratch row (two are
live: the top and bottom corners of one pixel row), and every output byte is
written once: the numpy twin makes about 30 passes over block-sized arrays
for the same result, which on a 2-core machine running two workers is
shared-cache and memory traffic that slows the other worker too.

Preconditions (checked by :mod:`ccdgrid.detector_file`, trusted here;
breaking them reads or writes out of bounds): ``corner_map`` is C-contiguous
of shape ``(ny + 1, nx + 1)`` with ``nx >= 1``; ``0 <= i0 < i1 <= ny``;
``axis`` is 0 or 1; ``out`` is C-contiguous of shape ``(4, rows * nx * 4)``
with ``rows >= i1 - i0`` (the rows past ``i1 - i0``, padding of a partial
last chunk, are set to 0).
"""

from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

__all__ = ["corner_planes"]


cdef inline void _row_bits(
    const float* source,
    Py_ssize_t n,
    double pixel,
    double row_term,
    bint along_x,
    uint32_t* bits,
) noexcept nogil:
    """float32 bits of ``pixel * (source[j] + term)``, ``j < n``; term = ``j`` or ``row_term``."""
    cdef Py_ssize_t j
    cdef float value
    for j in range(n):
        if along_x:
            value = <float>(pixel * (<double>source[j] + <double>j))
        else:
            value = <float>(pixel * (<double>source[j] + row_term))
        memcpy(&bits[j], &value, 4)


cdef inline void _pixel_row(
    const uint32_t* top,
    const uint32_t* bottom,
    Py_ssize_t nx,
    uint8_t* p0,
    uint8_t* p1,
    uint8_t* p2,
    uint8_t* p3,
) noexcept nogil:
    """The 4 x 4 nx bytes of one pixel row: corners A = top[j], B = bottom[j],
    C = bottom[j + 1], D = top[j + 1], byte ``b`` of each into plane ``b``."""
    cdef Py_ssize_t j, k
    cdef uint32_t a, b, c, d
    for j in range(nx):
        a = top[j]
        b = bottom[j]
        c = bottom[j + 1]
        d = top[j + 1]
        k = 4 * j
        p0[k] = <uint8_t>a
        p0[k + 1] = <uint8_t>b
        p0[k + 2] = <uint8_t>c
        p0[k + 3] = <uint8_t>d
        p1[k] = <uint8_t>(a >> 8)
        p1[k + 1] = <uint8_t>(b >> 8)
        p1[k + 2] = <uint8_t>(c >> 8)
        p1[k + 3] = <uint8_t>(d >> 8)
        p2[k] = <uint8_t>(a >> 16)
        p2[k + 1] = <uint8_t>(b >> 16)
        p2[k + 2] = <uint8_t>(c >> 16)
        p2[k + 3] = <uint8_t>(d >> 16)
        p3[k] = <uint8_t>(a >> 24)
        p3[k + 1] = <uint8_t>(b >> 24)
        p3[k + 2] = <uint8_t>(c >> 24)
        p3[k + 3] = <uint8_t>(d >> 24)


def corner_planes(
    const float[:, ::1] corner_map,
    double pixel,
    Py_ssize_t i0,
    Py_ssize_t i1,
    int axis,
    uint8_t[:, ::1] out,
):
    """Fill ``out`` with the shuffled chunk of corner rows ``i0 .. i1`` (see the module notes).

    Parameters
    ----------
    corner_map : ndarray of shape (ny + 1, nx + 1), float32, C-contiguous
        ``dy`` (axis 0) or ``dx`` (axis 1) on the corner grid, px.
    pixel : float
        ``pixel1`` (axis 0) or ``pixel2`` (axis 1), m.
    i0, i1 : int
        First and past-the-last pixel row of the chunk.
    axis : {0, 1}
        Coordinate written: 0 = y, 1 = x.
    out : ndarray of shape (4, rows * nx * 4), uint8, C-contiguous
        The byte planes, written in place.
    """
    cdef Py_ssize_t nx = corner_map.shape[1] - 1
    cdef Py_ssize_t n = i1 - i0
    cdef Py_ssize_t width = out.shape[1]
    cdef Py_ssize_t row_bytes = 4 * nx
    cdef Py_ssize_t p, b
    cdef bint along_x = axis == 1
    cdef uint32_t* top
    cdef uint32_t* bottom
    cdef uint32_t* swap
    cdef uint8_t* base = &out[0, 0]
    top = <uint32_t*>malloc(2 * (nx + 1) * sizeof(uint32_t))
    if top == NULL:
        raise MemoryError("no memory for two corner rows")
    bottom = top + (nx + 1)
    with nogil:
        _row_bits(&corner_map[i0, 0], nx + 1, pixel, <double>i0, along_x, top)
        for p in range(n):
            _row_bits(
                &corner_map[i0 + p + 1, 0], nx + 1, pixel, <double>(i0 + p + 1), along_x, bottom
            )
            _pixel_row(
                top,
                bottom,
                nx,
                base + p * row_bytes,
                base + width + p * row_bytes,
                base + 2 * width + p * row_bytes,
                base + 3 * width + p * row_bytes,
            )
            swap = top
            top = bottom
            bottom = swap
        for b in range(4):
            memset(base + b * width + n * row_bytes, 0, width - n * row_bytes)
    free(top if top < bottom else bottom)
