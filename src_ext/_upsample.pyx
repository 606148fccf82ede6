"""Compiled twin of :mod:`ccdgrid._reference.upsample`: two tensor-product cubic splines on a grid.

Evaluates ``out[c][i, j] = sum_k sum_l wy[i, k] coef[c, sy[i] + k, sx[j] + l] wx[j, l]``
(``k, l = 0 .. 3``) for the two maps ``c = 0, 1``: the cubic B-spline surface of
coefficients ``coef`` at the points of a rectangular grid, each point given
by its four non-zero B-spline weights per axis and the index of the first of
them. Separable: for one output row, the four coefficient rows it needs are
combined once (``4 kx`` multiply-adds per map), then every output value takes
four more, so the cost is about ``8 (nx + kx)`` per row and per map instead
of the ``2 ky kx nx`` of a dense matrix product.

Preconditions (checked by :func:`ccdgrid.maps._upsample`, trusted here;
breaking them reads out of bounds): ``coef`` is C-contiguous of shape
``(2, ky, kx)``; ``wy`` ``(ny, 4)`` and ``sy`` ``(ny,)`` with
``0 <= sy[i] <= ky - 4``; ``wx`` ``(nx, 4)`` and ``sx`` ``(nx,)`` with
``0 <= sx[j] <= kx - 4``; ``out0`` and ``out1`` C-contiguous ``(ny, nx)``.

The row combinations are summed in double; the last four products per
output value are made in float32, the outputs' type: a vector register
then holds twice as many values, and the loop over 2 x 4097² values went
from ~41 to ~30 ms of CPU. The result is within a few float32 ulps of the
value summed in double (7.6e-6 px on maps of +-50 px, measured), far below
the maps' ~1e-3 px accuracy.
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

import numpy as np

from cython.parallel cimport prange

# Rows are handed to threads in blocks, each with its own scratch row. The
# loop is nearly bound by memory bandwidth, and one core does not reach it:
# two 4097² float32 maps (pages already mapped, as displacement_maps hands
# them) took 13.5 ms on one thread and 7.1 ms on two, on an idle 2-core
# machine. On a busy one two threads were slower (14 vs 28 ms, an earlier
# session): only a dynamic schedule of small blocks keeps that loss bounded.
cdef Py_ssize_t _BLOCK = 32
cdef Py_ssize_t _PARALLEL_MIN_VALUES = 1 << 22

__all__ = ["upsample"]


cdef inline void _rows(
    const double[:, :, ::1] coef,
    const double[:, ::1] wy,
    const int64_t[::1] sy,
    const float[:, ::1] wxt,
    const int64_t[::1] cuts,
    const int64_t[::1] sx,
    float[:, ::1] out0,
    float[:, ::1] out1,
    Py_ssize_t i0,
    Py_ssize_t i1,
    double* r0,
    double* r1,
) noexcept nogil:
    """Output rows ``i0 .. i1 - 1`` of both maps; ``r0``, ``r1`` hold ``kx`` doubles each.

    ``wxt`` is ``wx`` transposed, (4, nx), and ``cuts`` the column ranges
    ``cuts[q] .. cuts[q + 1] - 1`` that share one ``sx``: inside such a run
    the four coefficients are loop invariants and the weights contiguous,
    so the compiler vectorises the innermost loop.
    """
    cdef Py_ssize_t kx = coef.shape[2]
    cdef Py_ssize_t nruns = cuts.shape[0] - 1
    cdef Py_ssize_t i, j, k, q, s
    cdef double a0, a1, a2, a3
    cdef float p0, p1, p2, p3, t0, t1, t2, t3
    cdef const double* c0
    cdef const double* c1
    cdef const float* b0 = &wxt[0, 0]
    cdef const float* b1 = &wxt[1, 0]
    cdef const float* b2 = &wxt[2, 0]
    cdef const float* b3 = &wxt[3, 0]
    cdef float* o0
    cdef float* o1
    for i in range(i0, i1):
        s = sy[i]
        a0 = wy[i, 0]
        a1 = wy[i, 1]
        a2 = wy[i, 2]
        a3 = wy[i, 3]
        c0 = &coef[0, s, 0]
        c1 = &coef[1, s, 0]
        for k in range(kx):
            r0[k] = a0 * c0[k] + a1 * c0[k + kx] + a2 * c0[k + 2 * kx] + a3 * c0[k + 3 * kx]
            r1[k] = a0 * c1[k] + a1 * c1[k + kx] + a2 * c1[k + 2 * kx] + a3 * c1[k + 3 * kx]
        o0 = &out0[i, 0]
        o1 = &out1[i, 0]
        for q in range(nruns):
            s = sx[cuts[q]]
            p0 = <float>r0[s]
            p1 = <float>r0[s + 1]
            p2 = <float>r0[s + 2]
            p3 = <float>r0[s + 3]
            t0 = <float>r1[s]
            t1 = <float>r1[s + 1]
            t2 = <float>r1[s + 2]
            t3 = <float>r1[s + 3]
            for j in range(cuts[q], cuts[q + 1]):
                o0[j] = b0[j] * p0 + b1[j] * p1 + b2[j] * p2 + b3[j] * p3
                o1[j] = b0[j] * t0 + b1[j] * t1 + b2[j] * t2 + b3[j] * t3


def upsample(
    const double[:, :, ::1] coef,
    const double[:, ::1] wy,
    const int64_t[::1] sy,
    const double[:, ::1] wx,
    const int64_t[::1] sx,
    float[:, ::1] out0,
    float[:, ::1] out1,
):
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

    Raises
    ------
    MemoryError
        If a thread's scratch row cannot be allocated.
    """
    cdef Py_ssize_t ny = out0.shape[0]
    cdef Py_ssize_t kx = coef.shape[2]
    cdef const float[:, ::1] wxt = np.ascontiguousarray(np.transpose(wx), dtype=np.float32)
    cdef const int64_t[::1] cuts = np.concatenate(
        ([0], np.flatnonzero(np.diff(sx)) + 1, [sx.shape[0]])
    ).astype(np.int64)
    cdef Py_ssize_t nblocks = (ny + _BLOCK - 1) // _BLOCK
    cdef bint threads = ny * out0.shape[1] >= _PARALLEL_MIN_VALUES
    cdef Py_ssize_t b, i0, i1
    cdef double* scratch
    cdef int failed = 0
    with nogil:
        for b in prange(nblocks, schedule="dynamic", use_threads_if=threads):
            i0 = b * _BLOCK
            i1 = i0 + _BLOCK if i0 + _BLOCK < ny else ny
            scratch = <double*>malloc(2 * kx * sizeof(double))
            if scratch == NULL:
                failed = 1
            else:
                _rows(
                    coef, wy, sy, wxt, cuts, sx, out0, out1, i0, i1, scratch, scratch + kx
                )
                free(scratch)
    if failed:
        raise MemoryError("no memory for the upsampling's scratch rows")
