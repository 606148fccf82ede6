"""Flux-conserving distortion correction of images by exact pixel splitting.

A calibrated detector is described by the displacement of its pixel corners:
corner ``(i, j)`` of the ``(ny + 1, nx + 1)`` corner grid truly sits at
``(i + dy[i, j], j + dx[i, j])`` in *pyFAI coordinates* (pixel units, where
input pixel ``(i, j)`` nominally spans ``[i, i+1] x [j, j+1]``; ccdgrid's index
coordinates are these minus 0.5). This is the convention of pyFAI's
``Detector.set_dx``/``set_dy`` with corner-shaped maps: a positive ``dx``
means the corner is really further along +x.

Each input pixel is the quadrilateral of its four true corners
A = (i, j), B = (i+1, j), C = (i+1, j+1), D = (i, j+1). Each output pixel
``(k, l)`` is the unit square ``[oy + k, oy + k + 1] x [ox + l, ox + l + 1]``
of the undistorted grid, where the whole-pixel *offset* ``(oy, ox)`` places
the output frame: ``(0, 0)`` (the input frame, the default of the library)
or, with ``shape_out="bounds"`` (``"cover"``), the smallest frame that holds
every valid pixel (and the input frame), so that no counts are lost (see
:meth:`CorrectionMatrix.from_maps`).
The correction is the sparse matrix ``M`` (rows: output pixels, columns:
input pixels) with

    M[out, in] = area(quad_in ∩ square_out) / area(quad_in),

computed by exact polygon clipping, so that every input pixel lying wholly
inside the output frame gives all of its counts, and nothing more, to the
output (flux conservation). ``corrected = M @ image``.

Differences from pyFAI's ``pyFAI.distortion.Distortion`` (PYFAI_NOTES §4, §7):
the splitting is exact in both directions (pyFAI's is exact along rows
only, up to 6 % of a pixel misplaced for a 20° rotation); the input mask is
honoured for distorted detectors; an undistorted detector gives exactly the
identity; memory is proportional to the non-zeros; ``normalize=True``
divides by the coverage so partially covered output pixels are not darker.

The module imports numpy and scipy inside its functions only: the command line
imports it to build its parser (``ccdgrid correct``), and ``ccdgrid --help``
must answer at once.
"""

import os
import zlib
from collections import OrderedDict

from ._h5write import check_writable
from .errors import CcdgridError

__all__ = [
    "MAX_GROWTH",
    "CorrectionMatrix",
    "add_correct_parser",
    "add_frame_argument",
    "clear_cache",
    "correct",
    "output_bounds",
    "run_correct",
]

# A bounds frame (shape_out="bounds") must lie within the input frame widened
# by half its size on every side, so at most this many times its size per
# axis: a real distortion moves pixels by tens of pixels, not by half a
# detector, and a wild corner must not cost a huge allocation.
MAX_GROWTH = 2


def _kernels(backend):
    if backend == "cython":
        from ._ext import _correction
    else:
        from ._reference import correction as _correction
    return _correction


def _real_array(value, name):
    import numpy as np

    arr = np.asarray(value)
    if (
        arr.dtype == object
        or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool)
        or np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise CcdgridError(f"`{name}` must hold real numbers, got an array of dtype {arr.dtype}")
    return arr


def _check_maps(dy, dx):
    import numpy as np

    dy = _real_array(dy, "dy")
    dx = _real_array(dx, "dx")
    if dy.ndim != 2 or dy.shape[0] < 2 or dy.shape[1] < 2:
        raise CcdgridError(
            f"`dy` must be a corner map of shape (ny + 1, nx + 1) with ny, nx >= 1, "
            f"got shape {dy.shape}"
        )
    if dx.shape != dy.shape:
        raise CcdgridError(f"`dx` (shape {dx.shape}) must have the shape of `dy` ({dy.shape})")
    return (
        np.ascontiguousarray(dy, dtype=np.float64),
        np.ascontiguousarray(dx, dtype=np.float64),
    )


def _pixels_with_a_flagged_corner(corner_flags):
    f = corner_flags
    return f[:-1, :-1] | f[1:, :-1] | f[1:, 1:] | f[:-1, 1:]


def _check_mask(mask, shape):
    import numpy as np

    if mask is None:
        return np.zeros(shape, dtype=np.uint8)
    mask = _real_array(mask, "mask")
    if mask.shape == (shape[0] + 1, shape[1] + 1):
        mask = _pixels_with_a_flagged_corner(mask != 0)
    elif mask.shape != shape:
        raise CcdgridError(
            f"`mask` (shape {mask.shape}) must have the pixel shape {shape} "
            f"or the corner shape {(shape[0] + 1, shape[1] + 1)}"
        )
    return np.ascontiguousarray(mask != 0, dtype=np.uint8)


def _check_shape_out(shape_out, default):
    if shape_out is None or (isinstance(shape_out, str) and shape_out == "input"):
        return default
    if isinstance(shape_out, str) and shape_out in _COMPUTED_FRAMES:
        return shape_out
    try:
        ny, nx = (int(s) for s in shape_out)
        ok = (ny, nx) == tuple(shape_out) and ny >= 1 and nx >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CcdgridError(
            f'`shape_out` must be None, "input", "bounds", "cover" or two positive integers, '
            f"got {shape_out!r}"
        )
    return ny, nx


# Output frames computed from the maps (see CorrectionMatrix.from_maps).
_COMPUTED_FRAMES = ("bounds", "cover")

# Offsets far beyond any detector, yet exact in float64 with the pixel index added.
_OFFSET_LIMIT = 2**40


def _check_offset(offset, shape_out):
    import numpy as np

    if offset is None:
        return (0, 0)
    if shape_out in _COMPUTED_FRAMES:
        raise CcdgridError(f'`offset` must be None with shape_out="{shape_out}" (it is computed)')
    try:
        ok = len(offset) == 2 and all(
            isinstance(o, (int, np.integer)) and not isinstance(o, (bool, np.bool_))
            and abs(int(o)) <= _OFFSET_LIMIT
            for o in offset
        )  # fmt: skip
    except TypeError:
        ok = False
    if not ok:
        raise CcdgridError(
            f"`offset` must be two integers (whole pixels, |offset| <= 2**40), got {offset!r}"
        )
    return int(offset[0]), int(offset[1])


def _bounds_frame(dy, dx, full_mask, backend, nthreads):
    """``(offset, shape_out)`` of the smallest whole-pixel frame holding the kept pixels."""
    import math

    ny, nx = full_mask.shape
    ymin, ymax, xmin, xmax = _kernels(backend).kept_bounds(dy, dx, full_mask, nthreads)
    if not ymin <= ymax:  # no pixel to keep: nothing to frame
        return (0, 0), (ny, nx)
    oy, ox = math.floor(ymin), math.floor(xmin)
    ny_out, nx_out = math.ceil(ymax) - oy, math.ceil(xmax) - ox
    # the input frame widened by (MAX_GROWTH - 1) / 2 of its size on each side
    lo_y, lo_x = -((MAX_GROWTH - 1) * ny // 2), -((MAX_GROWTH - 1) * nx // 2)
    if oy < lo_y or ox < lo_x or oy + ny_out > ny - lo_y or ox + nx_out > nx - lo_x:
        raise CcdgridError(
            f"the valid pixels' true corners span rows {ymin:.6g} to {ymax:.6g} and columns "
            f"{xmin:.6g} to {xmax:.6g} of a {ny} x {nx} detector: a frame holding them "
            f"({ny_out} x {nx_out} px at offset ({oy}, {ox})) reaches beyond the detector's "
            f"edges by more than {(MAX_GROWTH - 1) / 2:g} of its size (at most {MAX_GROWTH}x its "
            "size per axis). "
            "The maps must be wrong there: mask those pixels, or give shape_out and offset"
        )
    return (oy, ox), (ny_out, nx_out)


def _computed_frame(kind, dy, dx, full_mask, backend, nthreads):
    """``(offset, shape_out)`` of the ``"bounds"`` or ``"cover"`` frame."""
    (oy, ox), (ny_out, nx_out) = _bounds_frame(dy, dx, full_mask, backend, nthreads)
    if kind == "bounds":
        return (oy, ox), (ny_out, nx_out)
    ny, nx = full_mask.shape
    lo_y, lo_x = min(oy, 0), min(ox, 0)
    return (lo_y, lo_x), (max(oy + ny_out, ny) - lo_y, max(ox + nx_out, nx) - lo_x)


def output_bounds(dy, dx, *, mask=None, backend="cython", nthreads=0):
    """The smallest whole-pixel output frame that loses none of an image's counts.

    Parameters
    ----------
    dy, dx, mask, backend, nthreads
        See :meth:`CorrectionMatrix.from_maps`.

    Returns
    -------
    offset : tuple of 2 int
        ``(oy, ox)``: the corner of output pixel (0, 0) in the input's pyFAI
        coordinates, ``floor`` of the smallest true corner coordinate along
        each axis over the valid pixels (unmasked, with finite corners, not
        degenerate; the others are left out of the matrix anyway).
    shape_out : tuple of 2 int
        ``(ny_out, nx_out)``: from the offset to ``ceil`` of the largest true
        corner coordinate. For an undistorted detector, ``(0, 0)`` and the
        input shape. With no valid pixel at all, ``(0, 0)`` and the input
        shape.

    Raises
    ------
    CcdgridError
        Bad maps, mask or options (as :meth:`CorrectionMatrix.from_maps`), or
        valid pixels whose true corners lie more than half the detector's
        size beyond its edges (a frame more than :data:`MAX_GROWTH` times
        the input per axis): such maps are wrong, and the frame would cost
        a huge allocation.
    """
    from ._validation import check_backend

    check_backend(backend)
    dy, dx = _check_maps(dy, dx)
    shape_in = (dy.shape[0] - 1, dy.shape[1] - 1)
    _, full_mask = _full_mask(dy, dx, _check_mask(mask, shape_in))
    return _bounds_frame(dy, dx, full_mask, backend, nthreads)


def _full_mask(dy, dx, user_mask):
    """``(n_invalid, mask)``: the user's mask and the pixels with a non-finite corner."""
    import numpy as np

    # A finite sum means finite maps: one cheap pass in the usual case
    # (a sum that overflows only costs the exact check below).
    if np.isfinite(dy.sum()) and np.isfinite(dx.sum()):
        return 0, user_mask
    bad_pixel = _pixels_with_a_flagged_corner(~(np.isfinite(dy) & np.isfinite(dx)))
    n_invalid = int(np.count_nonzero(bad_pixel & (user_mask == 0)))
    if not n_invalid:
        return 0, user_mask
    return n_invalid, user_mask | bad_pixel.view(np.uint8)


def _check_weight_dtype(dtype):
    import numpy as np

    try:
        dtype = np.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise CcdgridError(f"`dtype` must be float32 or float64, got {dtype!r}")
    return dtype


class CorrectionMatrix:
    """The sparse pixel-splitting matrix of a distorted detector.

    Build it with :meth:`from_maps`; apply it with :meth:`apply`.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix, shape (ny_out * nx_out, ny * nx)
        Row ``k * nx_out + l`` holds the weights of output pixel ``(k, l)``;
        column ``i * nx + j`` is input pixel ``(i, j)``. Weights are float32
        or float64 (``dtype``), indices int32 (int64 beyond 2**31 entries);
        within a row, columns are in increasing order.
    shape_in : tuple of int
        ``(ny, nx)``, the input image shape.
    shape_out : tuple of int
        ``(ny_out, nx_out)``, the output image shape.
    offset : tuple of int
        ``(oy, ox)``, whole pixels: the corner of output pixel (0, 0) in the
        input's pyFAI coordinates. Output pixel ``(k, l)`` covers
        ``[oy + k, oy + k + 1] x [ox + l, ox + l + 1]``, so a point at index
        coordinates ``(y, x)`` of the corrected image is at ``(y + oy, x + ox)``
        of the undistorted input frame. ``(0, 0)`` for the input frame.
    n_masked : int
        Input pixels excluded by the user's mask.
    n_invalid : int
        Further input pixels excluded because a corner is NaN or infinite.
    n_degenerate : int
        Further input pixels dropped because their quadrilateral is
        degenerate: area below 1e-9 px², folded (negative area),
        self-intersecting, or spanning more than 16 output pixels.
    backend : str
        The engine that built the matrix (``"cython"`` or ``"numpy"``); it
        also applies it.
    """

    def __init__(self, matrix, shape_in, shape_out, *, offset=(0, 0), n_masked=0,
                 n_invalid=0, n_degenerate=0, backend="cython"):  # fmt: skip
        self.matrix = matrix
        self.shape_in = tuple(shape_in)
        self.shape_out = tuple(shape_out)
        self.offset = (int(offset[0]), int(offset[1]))
        self.n_masked = int(n_masked)
        self.n_invalid = int(n_invalid)
        self.n_degenerate = int(n_degenerate)
        from ._validation import check_backend

        self.backend = check_backend(backend)
        self._coverage = None

    @classmethod
    def from_maps(cls, dy, dx, *, mask=None, shape_out=None, offset=None, backend="cython",
                  dtype="float32", nthreads=0):  # fmt: skip
        """Build the matrix from corner displacement maps.

        Parameters
        ----------
        dy, dx : array_like of real, shape (ny + 1, nx + 1)
            Displacement of every pixel corner in pixels, along y (rows) and
            x (columns): corner ``(i, j)``, nominally at ``(i, j)`` in pyFAI
            coordinates, is truly at ``(i + dy[i, j], j + dx[i, j])``. Any real
            dtype; used in float64. Non-finite corners invalidate the (up to
            four) pixels that share them.
        mask : array_like, shape (ny, nx) or (ny + 1, nx + 1), optional
            Nonzero marks an invalid input pixel, left out of the matrix. A
            corner-shaped mask flags corners: a pixel with a flagged corner
            is invalid.
        shape_out : None or "input" or "bounds" or "cover" or tuple of 2 int, optional
            The output frame. None or ``"input"`` (the default): the input
            frame, ``(ny, nx)`` at offset (0, 0). ``"bounds"``: the smallest
            frame of whole input pixels that holds the true corners of every
            valid pixel (see :func:`output_bounds`), so that each valid
            pixel gives all its counts to the output: the sum of the
            corrected image is that of the valid input pixels. It shrinks to
            the valid pixels when a mask covers the detector's border.
            ``"cover"``: the smallest frame holding both the input frame and
            the ``"bounds"`` one: the input frame, grown only where valid
            pixels land beyond it (the ``ccdgrid correct`` default). A tuple:
            that shape, at ``offset``. Counts that fall outside the frame are
            lost.
        offset : tuple of 2 int, optional
            The corner of output pixel (0, 0) in the input's pyFAI
            coordinates, whole pixels; default (0, 0). Computed, and so not
            allowed, with ``shape_out="bounds"`` or ``"cover"``.
        backend : {"cython", "numpy"}
            The compiled kernel, or its pure-numpy twin (slow; for checks).
        dtype : {numpy.float32, numpy.float64}
            Storage dtype of the weights (they are always computed in
            float64). float32 halves the memory and speeds up :meth:`apply`;
            its rounding (6e-8 relative) is far below any calibration error.
        nthreads : int
            OpenMP threads for the cython backend; 0 means OpenMP's default
            (``OMP_NUM_THREADS``). Small detectors always use one; the
            matrix does not depend on the number of threads.

        Returns
        -------
        CorrectionMatrix

        Raises
        ------
        CcdgridError
            Maps that are not real 2-D arrays of one shape with at least 2x2
            corners, a mask of the wrong shape, a bad ``shape_out``,
            ``offset``, ``backend`` or ``dtype``; with ``shape_out="bounds"``
            or ``"cover"``, valid pixels more than half the detector's size beyond its edges
            (see :func:`output_bounds`).

        Notes
        -----
        Why the input frame is the library's default: the corrected image
        then stays pixel for pixel on the raw frame, so masks, regions of
        interest and a beam centre set on raw images stay valid, and code
        written before the option gets the same images. Its cost: under a
        distortion whose average magnification is not 1 (ccdgrid's maps
        are in the centred lattice frame, so the scale is the central
        pixel's), a barrel pushes the border's counts out of the frame
        and a pincushion leaves an empty margin. A radial barrel of 20 px at
        the corners of a 2048² image, zero at the centre, moves pixels up to
        15 px beyond each edge: the input frame loses 1.8 % of a flat image's
        counts (0.9 % under the test generator's 20 px "strong" field).
        The ``ccdgrid correct`` command defaults to ``"cover"`` instead
        (keeping every count, and every pixel of the input frame: a
        calibration masks the border beyond its holes, which would shrink
        a ``"bounds"`` frame), and records the offset.

        The offset is a whole number of pixels, so the output pixels stay
        aligned on the input's: no resampling blur from a fractional shift
        (pyFAI's ``Distortion(resize=True)`` uses the fractional minimum),
        and an undistorted detector still gives exactly the identity, of
        the input's shape, with ``"bounds"`` too.


        Corner coordinates within 1e-9 px of an integer are snapped onto it,
        so an undistorted grid, or one shifted by whole pixels, gives
        exactly one weight of 1.0 per pixel. Cuts that leave less than 1e-13
        of a pixel in a cell (rounding noise) are not stored.
        """
        import numpy as np

        from ._validation import check_backend

        check_backend(backend)
        dy, dx = _check_maps(dy, dx)
        shape_in = (dy.shape[0] - 1, dy.shape[1] - 1)
        user_mask = _check_mask(mask, shape_in)
        shape_out = _check_shape_out(shape_out, shape_in)
        offset = _check_offset(offset, shape_out)
        dtype = _check_weight_dtype(dtype)

        n_masked = int(np.count_nonzero(user_mask))
        n_invalid, full_mask = _full_mask(dy, dx, user_mask)
        if shape_out in _COMPUTED_FRAMES:
            offset, shape_out = _computed_frame(shape_out, dy, dx, full_mask, backend, nthreads)

        data, indices, indptr, n_degenerate = _kernels(backend).split_pixels(
            dy, dx, full_mask, shape_out[0], shape_out[1], dtype, nthreads, *offset
        )
        import scipy.sparse

        matrix = scipy.sparse.csr_matrix(
            (data, indices, indptr),
            shape=(shape_out[0] * shape_out[1], shape_in[0] * shape_in[1]),
            copy=False,
        )
        return cls(
            matrix,
            shape_in,
            shape_out,
            offset=offset,
            n_masked=n_masked,
            n_invalid=n_invalid,
            n_degenerate=n_degenerate,
            backend=backend,
        )

    @property
    def nnz(self):
        """Number of stored weights."""
        return int(self.matrix.nnz)

    @property
    def nbytes(self):
        """Memory held by the matrix arrays, in bytes."""
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    @property
    def coverage(self):
        """Sum of the weights of each output pixel, float64, shape ``shape_out``.

        1 where input pixels tile the output pixel completely, less near
        masked pixels, at the edge of the distorted frame, or where input
        pixels are stretched; 0 where no input pixel reaches.
        """
        if self._coverage is None:
            m = self.matrix
            self._coverage = _kernels(self.backend).row_sums(m.indptr, m.data)
        return self._coverage.reshape(self.shape_out)

    def apply(self, image, *, normalize=False, dummy=0.0, nthreads=0, out=None):
        """Correct one image, or a stack of images, for the distortion.

        Parameters
        ----------
        image : array_like of real, shape ``shape_in`` or (n,) + ``shape_in``
            Counts per input pixel (any real dtype). A 3-D stack is corrected
            image by image in one call.
        normalize : bool
            If True, divide each output pixel by its coverage (see
            :attr:`coverage`), giving an intensity per full pixel rather than
            the counts received; partially covered pixels at the edges of
            the frame or next to masked pixels are then not darker.
        dummy : float
            Value of the output pixels that no valid input pixel reaches
            (default 0; ``float("nan")`` to flag them).
        nthreads : int
            OpenMP threads (cython backend); 0 means OpenMP's default.
        out : ndarray, optional
            Where to write the result: C-contiguous, of the result's shape
            and dtype (below), not overlapping ``image``. Reusing one buffer
            frame after frame spares a fresh 16 MB (2048², float32) each
            time, and the kernel's page faults on it.

        Returns
        -------
        ndarray, shape ``shape_out`` or (n,) + ``shape_out``
            float64 for float64 input, float32 for every other dtype; it is
            also the accumulator's dtype. NaN in an input pixel makes NaN
            exactly the output pixels it overlaps. ``out`` itself when given.

        Raises
        ------
        CcdgridError
            If ``image`` is not real or has the wrong shape, or ``out`` is not
            a C-contiguous array of the result's shape and dtype.

        Notes
        -----
        float32, float64, uint8, uint16 and int16 images are read as they
        are (the integers are exact in float32); other dtypes are converted
        to float32 first. Either way the result is that of
        ``image.astype(float32)``.
        """
        import numpy as np

        arr = _real_array(image, "image")
        if arr.ndim == 2 and arr.shape == self.shape_in:
            stack, single = arr[None], True
        elif arr.ndim == 3 and arr.shape[1:] == self.shape_in:
            stack, single = arr, False
        else:
            raise CcdgridError(
                f"`image` must have shape {self.shape_in} or (n, *{self.shape_in}), "
                f"got {arr.shape}"
            )
        work = np.float64 if arr.dtype == np.float64 else np.float32
        # read as they are, no converted copy: float32 holds these integers exactly
        direct = arr.dtype in _DIRECT_DTYPES
        stack = np.ascontiguousarray(
            stack.reshape(stack.shape[0], -1), dtype=arr.dtype if direct else work
        )
        shape = (stack.shape[0], self.shape_out[0] * self.shape_out[1])
        if out is None:
            result = np.empty(shape, dtype=work)
        else:
            result = self._check_out(out, (shape[0], *self.shape_out), single, work, arr)
        coverage = self.coverage.ravel() if normalize else np.zeros(0)
        m = self.matrix
        _kernels(self.backend).apply_csr(
            m.indptr, m.indices, m.data, stack, result.reshape(shape), coverage,
            bool(normalize), float(dummy), nthreads,
        )  # fmt: skip
        if out is not None:
            return out
        result = result.reshape((-1, *self.shape_out))
        return result[0] if single else result

    @staticmethod
    def _check_out(out, shape, single, work, image):
        """``out`` as a (n,) + shape_out view, after checking it can take the result."""
        import numpy as np

        want = shape[1:] if single else shape
        if not isinstance(out, np.ndarray):
            raise CcdgridError(f"`out` must be a numpy array, got {type(out).__name__}")
        if out.shape != want or out.dtype != work or not out.flags.c_contiguous:
            raise CcdgridError(
                f"`out` must be a C-contiguous {np.dtype(work).name} array of shape {want}, "
                f"got {out.dtype} {out.shape}"
                + ("" if out.flags.c_contiguous else " (not C-contiguous)")
            )
        if not out.flags.writeable:
            raise CcdgridError("`out` must be writeable")
        if np.shares_memory(out, image):
            raise CcdgridError("`out` must not overlap `image`")
        return out.reshape(shape)

    def __repr__(self):
        return (
            f"CorrectionMatrix(shape_in={self.shape_in}, shape_out={self.shape_out}, "
            f"offset={self.offset}, nnz={self.nnz}, dtype={self.matrix.dtype}, "
            f"n_masked={self.n_masked}, "
            f"n_invalid={self.n_invalid}, n_degenerate={self.n_degenerate})"
        )


# Image dtypes the kernel reads without a converted copy (see apply_csr's pixel_t).
_DIRECT_DTYPES = ("float32", "float64", "uint8", "uint16", "int16")

# Built matrices, most recently used last. Each can weigh ~150 MB at 2048²,
# hence a very small cache.
_CACHE = OrderedDict()
_CACHE_SIZE = 2


def clear_cache():
    """Forget the matrices cached by :func:`correct`."""
    _CACHE.clear()


def _fingerprint(arr):
    import numpy as np

    if arr is None:
        return None
    arr = np.ascontiguousarray(arr)
    return (arr.shape, arr.dtype.str, zlib.crc32(memoryview(arr).cast("B")))


def _load_detector(path):
    from .detector_file import load

    return load(path)


def correct(image, detector, *, normalize=False, dummy=0.0, shape_out=None, offset=None,
            backend="cython", dtype="float32", cache=True):  # fmt: skip
    """Correct an image for a detector's distortion (build, cache and apply).

    Parameters
    ----------
    image : array_like of real, shape (ny, nx) or (n, ny, nx)
        The distorted image(s).
    detector : object or str or os.PathLike
        Anything with attributes ``dy``, ``dx`` (corner maps, shape
        (ny + 1, nx + 1), pixels, see :meth:`CorrectionMatrix.from_maps`) and
        ``mask`` (pixel or corner shaped, nonzero = invalid, or None): a calibration
        result or a loaded detector record. A path is read with
        ``ccdgrid.detector_file.load``.
    normalize, dummy
        See :meth:`CorrectionMatrix.apply`.
    shape_out, offset, backend, dtype
        See :meth:`CorrectionMatrix.from_maps`. The default is the input
        frame (counts pushed out of it by the distortion are lost);
        ``shape_out="bounds"`` or ``"cover"`` keeps them all, in a frame
        whose offset :func:`output_bounds` gives (or build the matrix and
        read its ``offset``).
    cache : bool
        Reuse the matrix of a recent call with the same maps, mask and
        options (recognised by content, not identity, so maps modified in
        place are never served stale). Fingerprinting the maps costs about
        25 ms per 2048² float64 map: to correct many images, build a
        :class:`CorrectionMatrix` once, or pass a stack.

    Returns
    -------
    ndarray
        See :meth:`CorrectionMatrix.apply`.
    """
    import numpy as np

    if isinstance(detector, (str, os.PathLike)):
        detector = _load_detector(detector)
    missing = [a for a in ("dy", "dx", "mask") if not hasattr(detector, a)]
    if missing:
        raise CcdgridError(
            f"`detector` must have dy, dx and mask attributes (missing: {', '.join(missing)}); "
            f"got {type(detector).__name__}"
        )
    dy, dx, mask = detector.dy, detector.dx, detector.mask
    key = None
    if cache:
        # checked here so that a bad value is reported as such, not as a bad cache key
        frame = _check_shape_out(shape_out, None)
        frame = (frame, _check_offset(offset, frame))
        key = (
            _fingerprint(np.asarray(dy)),
            _fingerprint(np.asarray(dx)),
            _fingerprint(None if mask is None else np.asarray(mask)),
            frame,
            backend,
            np.dtype(dtype).str,
        )
        cm = _CACHE.get(key)
        if cm is not None:
            _CACHE.move_to_end(key)
            return cm.apply(image, normalize=normalize, dummy=dummy)
    cm = CorrectionMatrix.from_maps(
        dy, dx, mask=mask, shape_out=shape_out, offset=offset, backend=backend, dtype=dtype
    )
    if cache:
        _CACHE[key] = cm
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return cm.apply(image, normalize=normalize, dummy=dummy)


# -- the ``ccdgrid correct`` command ---------------------------------------------

_FORMATS = {"edf": ".edf", "tif": ".tif", "npy": ".npy"}
_SUFFIX_FORMAT = {".edf": "edf", ".tif": "tif", ".tiff": "tif", ".npy": "npy"}

_CORRECT_EPILOG = """\
what it does:
  Builds the flux-conserving pixel-splitting matrix of the detector file's
  distortion once (its masked pixels left out), applies it to every IMAGE and
  writes IMAGE_STEM_corrected.EXT in DIR. Pixel values are counts per output
  pixel; --normalize divides by each pixel's coverage instead, so pixels at the
  edge of the frame or beside masked pixels are not darker. Output is float32
  (float64 for float64 input). An existing output file is replaced; a file is
  written whole or not at all.

output frame:
  By default (--frame cover) the corrected images hold the input frame and
  every valid pixel where it truly belongs, so no counts are lost: a barrel
  distortion makes them larger than the input (by 2 x 15 px for a barrel of
  20 px at the corners of a 2048² image). --frame bounds is the smallest
  frame holding the valid pixels only: a pincushion makes it smaller than the
  input, and so does a masked border (a calibration masks the border beyond
  its holes). Pixel (0, 0) starts at OFFSET_Y, OFFSET_X of the input (whole
  pixels, printed, and in the EDF header as ccdgrid_offset_y and
  ccdgrid_offset_x): a point at (y, x) of a corrected image is at
  (y + OFFSET_Y, x + OFFSET_X) of the input frame. --frame input keeps the
  input's shape and pixel grid (offset 0, 0) and loses the counts pushed
  outside it.

examples:
  ccdgrid correct scan_*.edf -d frelon_detector.h5 -o corrected/
  ccdgrid correct frame.tif -d frelon_detector.h5 -o . --normalize --dummy nan --format npy
  ccdgrid correct frame.edf -d frelon_detector.h5 -o . --frame input
"""


def add_frame_argument(parser):
    """Add ``--frame cover|bounds|input`` (the output frame) to a correcting command."""
    parser.add_argument(
        "--frame",
        choices=("cover", "bounds", "input"),
        default="cover",
        help="output frame: 'cover' (default) holds the input frame and every valid pixel, "
        "no counts lost; 'bounds' the valid pixels only; 'input' keeps the input's shape and "
        "pixel grid, losing what the distortion pushes outside it",
    )


def add_correct_parser(subparsers, parents=()):
    """Add the ``correct`` subcommand to the ``ccdgrid`` command line.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers`` returned.
    parents : sequence of argparse.ArgumentParser
        Parent parsers whose options the subcommand shares. Without any, the
        subcommand defines ``--debug`` itself (the command line's ``main``
        reads ``args.debug``); pass a parent only if it defines ``--debug``.

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser; it sets ``args.run`` to :func:`run_correct`.
    """
    import argparse

    parser = subparsers.add_parser(
        "correct",
        parents=list(parents),
        help="correct images for a detector's distortion",
        description="Correct images for the spatial distortion recorded in a detector file.",
        epilog=_CORRECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="images to correct (anything `ccdgrid calibrate` reads), all of the detector's shape",
    )
    parser.add_argument(
        "-d", "--detector", required=True, metavar="FILE", help="detector file (.h5)"
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="directory of the corrected images (created if missing)",
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="divide by the coverage: intensity per full pixel instead of counts received",
    )
    parser.add_argument(
        "--dummy",
        type=float,
        default=0.0,
        metavar="V",
        help="value of the pixels no valid input pixel reaches (default 0; nan allowed)",
    )
    parser.add_argument(
        "--format",
        choices=tuple(_FORMATS),
        help="output format (default: the input's when it is EDF, TIFF or .npy, else edf)",
    )
    add_frame_argument(parser)
    parser.add_argument("--backend", choices=("cython", "numpy"), default="cython")
    if not parents:
        parser.add_argument(
            "--debug", action="store_true", help="show the full traceback of an error"
        )
    parser.set_defaults(run=run_correct)
    return parser


def _output_path(source, directory, fmt):
    """``directory / (stem + "_corrected" + ext)`` for an input ``path`` or ``path::dataset``."""
    import pathlib

    path = pathlib.Path(str(source).split("::", 1)[0])
    if fmt is None:
        fmt = _SUFFIX_FORMAT.get(path.suffix.lower(), "edf")
    return directory / f"{path.stem}_corrected{_FORMATS[fmt]}", fmt


def _write_atomically(target, fmt, data, header):
    """Write ``data`` to a temporary file beside ``target``, then rename it onto ``target``."""
    import secrets

    import numpy as np

    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        if fmt == "npy":
            with open(tmp, "wb") as stream:
                np.save(stream, data)
        elif fmt == "edf":
            import fabio.edfimage

            fabio.edfimage.EdfImage(data=data, header=header).write(str(tmp))
        else:
            import fabio.tifimage

            fabio.tifimage.TifImage(data=data).write(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        # also on KeyboardInterrupt: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def _read_checked(source, detector):
    """``(image, info)`` of ``source``; raise if its shape is not ``detector``'s."""
    from .io import SeveralFramesError, read_image

    try:
        image, info = read_image(source)
    except SeveralFramesError as exc:
        # correct's own --frame is the output frame, not an input frame
        raise CcdgridError(
            f"{exc.label} holds {exc.nframes} frames; `ccdgrid correct` corrects single images: "
            f"correct the stack with `ccdgrid correct-stack {source} -d {detector.path} "
            "-o OUT.h5`"
        ) from None
    if image.shape != tuple(detector.shape):
        raise CcdgridError(
            f"{info['path']} has shape {image.shape}, but the detector "
            f"{detector.path} is {tuple(detector.shape)}"
        )
    return image, info


def run_correct(args):
    """Run ``ccdgrid correct`` from parsed arguments; print one line per image.

    Before the images, it prints the detector and the output frame: its
    shape and its offset, the input position of the corner of corrected
    pixel (0, 0), also written in EDF headers (``ccdgrid_offset_y``,
    ``ccdgrid_offset_x``; ``npy`` and ``tif`` files have no header).
    The matrix is built once and applied to each image in turn, so memory
    holds one image at a time. Images are written as they are corrected: an
    error on one image stops the run and leaves the images before it written
    (each whole) and nothing of it.

    Raises
    ------
    CcdgridError
        A missing or unreadable detector file or image, an image whose shape
        is not the detector's, two inputs that would give the same output
        name, or an output path that is not a directory.
    """
    import pathlib
    import time

    from .detector_file import load

    directory = pathlib.Path(args.output).expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        raise CcdgridError(f"the output {directory} exists and is not a directory")
    targets = {}
    for source in args.images:
        target, fmt = _output_path(source, directory, args.format)
        if target in targets:
            raise CcdgridError(
                f"{source} and {targets[target][0]} would both be written to {target.name}: "
                "correct them in separate runs or rename one"
            )
        targets[target] = (source, fmt)
    # before any work; the directory is made after the first image is
    # corrected (a run failing on it leaves nothing behind)
    for target in targets:
        check_writable(target, "the corrected image", create=True)

    detector = load(args.detector)
    # the first image is read before the matrix (seconds to build on a large
    # detector) so that an image of another detector fails at once
    first = _read_checked(args.images[0], detector)
    start = time.perf_counter()
    frame = args.frame
    cm = CorrectionMatrix.from_maps(
        detector.dy, detector.dx, mask=detector.mask, shape_out=frame, backend=args.backend
    )
    ny, nx = cm.shape_in
    (ny_out, nx_out), (oy, ox) = cm.shape_out, cm.offset
    print(
        f"detector {detector.path}: {ny} x {nx}, {int(detector.mask.astype(bool).sum())} "
        f"masked pixels; correction matrix of {cm.nnz} weights "
        f"({cm.nbytes / 2**20:.1f} MB) built in {time.perf_counter() - start:.2f} s"
    )
    print(
        f"output frame ({frame}): {ny_out} x {nx_out}, offset {oy} {ox} "
        f"(corrected pixel (k, l) covers input position ({_plus('k', oy)}, {_plus('l', ox)}))"
    )
    header = {
        "ccdgrid_correct": f"detector={detector.path} normalize={bool(args.normalize)} "
        f"dummy={args.dummy:g} frame={frame}",
        "ccdgrid_offset_y": str(oy),
        "ccdgrid_offset_x": str(ox),
    }
    for target, (source, fmt) in targets.items():
        image, info = first if first is not None else _read_checked(source, detector)
        first = None
        start = time.perf_counter()
        corrected = cm.apply(image, normalize=args.normalize, dummy=args.dummy)
        elapsed = time.perf_counter() - start
        # created only now, so that a run failing on its first image leaves nothing behind
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, fmt, corrected, header)
        print(f"wrote {target} (from {info['path']}, corrected in {elapsed:.3f} s)")


def _plus(name, offset):
    """``"k + 3"``, ``"k - 56"`` or ``"k"``: an index and its offset, as text."""
    if offset == 0:
        return name
    return f"{name} {'-' if offset < 0 else '+'} {abs(offset)}"
