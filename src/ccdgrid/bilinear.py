"""Sub-pixel peak positions: steepest-ascent climb plus one Newton step.

:func:`refine_peaks` takes a batch of integer (or rounded) seeds, lets each
climb to its local maximum and refines that maximum from the 3x3 second
differences, exactly as pyFAI 2026.9 ``Bilinear.local_maxi`` does for one
seed. :class:`Bilinear` mirrors pyFAI's class, so that code written for the
CCD-calibration tutorial runs with only its import changed.

Positions are ``(y, x)`` in index coordinates: the centre of pixel ``(i, j)``
is at ``(i, j)`` and the pixel spans ``i - 0.5 .. i + 0.5``.
"""

import math
import operator

import numpy as np

from ._ext import _bilinear as _cython
from ._reference import bilinear as _numpy
from ._validation import as_image, check_backend
from .errors import CcdgridError

__all__ = ["Bilinear", "climb", "refine_peaks"]

_ENGINES = {"cython": _cython, "numpy": _numpy}


def _first_bad_seed(seeds, rounded, shape):
    """Raise a :class:`CcdgridError` that names the first unusable seed."""
    finite = np.isfinite(seeds).all(axis=1) if seeds.dtype.kind == "f" else None
    h, w = shape
    inside = (
        (rounded[:, 0] >= 0) & (rounded[:, 0] < h) & (rounded[:, 1] >= 0) & (rounded[:, 1] < w)
    )
    k = int(np.flatnonzero(~inside)[0])
    value = tuple(seeds[k].tolist())
    if finite is not None and not finite[k]:
        raise CcdgridError(f"`seeds[{k}]` = {value} is not finite")
    raise CcdgridError(
        f"`seeds[{k}]` = {value} is outside the image of shape {tuple(shape)} "
        f"(pixel {tuple(int(v) for v in rounded[k])} after rounding to the nearest pixel)"
    )


def _as_seeds(seeds, shape, *, check=True):
    """Return ``seeds`` as C-contiguous ``(N, 2)`` int64 pixels inside ``shape``.

    Float seeds are rounded half to even (``np.rint``, like Python's
    ``round`` that pyFAI uses); integer seeds are taken as they are. One
    compiled pass rounds and checks them: in numpy the same takes several
    passes over strided columns, which cost more than refining 10,000 peaks.
    With ``check=False`` integer seeds are not checked against ``shape``
    (the caller's kernel does it); float seeds always are.
    """
    if (
        not check
        and type(seeds) is np.ndarray
        and seeds.dtype == np.int64
        and seeds.ndim == 2
        and seeds.shape[1] == 2
        and seeds.flags.c_contiguous
    ):
        # The usual case, taken in a quarter of the general path's time
        # (which is as long as refining a few hundred peaks).
        return seeds
    arr = np.asarray(seeds)
    kind = arr.dtype.kind
    if kind not in "iuf":
        raise CcdgridError(f"`seeds` must hold real numbers, got an array of dtype {arr.dtype}")
    if arr.shape in ((0,), (0, 2)):
        return np.empty((0, 2), dtype=np.int64)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr.reshape(1, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise CcdgridError(f"`seeds` must have shape (N, 2) as (y, x), got {arr.shape}")
    if kind == "u" and arr.dtype.itemsize == 8:
        # uint64 beyond int64's range would wrap around: compare in floats.
        arr = arr.astype(np.float64)
    work = np.ascontiguousarray(arr, dtype=np.float64 if arr.dtype.kind == "f" else np.int64)
    if not check and work.dtype == np.int64:
        return work
    pixels, bad = _cython.seed_pixels(work, *shape)
    if bad >= 0:
        _first_bad_seed(arr, np.rint(arr) if arr.dtype.kind == "f" else arr, shape)
    return pixels


def _check_nthreads(nthreads):
    """``nthreads`` as a non-negative int, or a :class:`CcdgridError` naming it."""
    try:
        value = operator.index(nthreads)
    except TypeError as err:
        raise CcdgridError(f"`nthreads` must be an integer, got {nthreads!r}") from err
    if not 0 <= value < 2**31:
        raise CcdgridError(f"`nthreads` must be >= 0 (0: OpenMP's default), got {value}")
    return value


def climb(image, seeds, *, backend="cython"):
    """Integer steepest ascent from each seed to its local maximum.

    Parameters
    ----------
    image : array_like of shape (H, W)
        Any real dtype; cast once to float32 (as pyFAI does), so ties and
        near-ties are float32 ones. NaN pixels are never climbed onto.
    seeds : array_like of shape (N, 2)
        Start positions ``(y, x)`` in index coordinates, float or integer.
        Floats are rounded half to even to the nearest pixel.
    backend : {"cython", "numpy"}, optional
        Compiled kernel or its pure-numpy twin; identical results.

    Returns
    -------
    ndarray of shape (N, 2), int64
        The ``(y, x)`` pixel where each climb stops. A step moves to the
        highest pixel of the 3x3 window (clipped to the image, centre
        included) if it is strictly higher than the current one; among equal
        maxima the first in raster order wins. Same as pyFAI's
        ``Bilinear.cp_local_maxi`` on flat indices.

    Raises
    ------
    CcdgridError
        If ``image`` is not a non-empty real 2-D array, or a seed is
        non-finite or falls outside the image after rounding (the message
        names the first such seed).
    """
    engine = _ENGINES[check_backend(backend)]
    img = as_image(image)
    pix = _as_seeds(seeds, img.shape)
    return engine.climb(img, pix)


def refine_peaks(image, seeds, *, backend="cython", nthreads=1):
    """Local maxima reached from seeds, refined to sub-pixel precision.

    Each seed climbs as in :func:`climb`; the maximum ``(i, j)`` it reaches is
    then refined by one Newton step on the 3x3 neighbourhood ``a``::

        g = ((a[2,1] - a[0,1]) / 2, (a[1,2] - a[1,0]) / 2)
        H = [[a[2,1] - 2 a[1,1] + a[0,1], (a[0,0] - a[0,2] - a[2,0] + a[2,2]) / 4],
             [(same),                     a[1,2] - 2 a[1,1] + a[1,0]]]
        (dy, dx) = -H^-1 g

    kept if ``|2 det H| >= 1e-10`` and ``|dy| <= 1`` and ``|dx| <= 1``;
    otherwise the centre of mass of the raw 3x3 patch if its sum is positive;
    otherwise the pixel itself. Maxima on the image border are not refined.
    This is pyFAI 2026.9 ``Bilinear.local_maxi`` for a batch, float32 rounding
    included (results agree with pyFAI to the last bit in our tests).

    Parameters
    ----------
    image : array_like of shape (H, W)
        Any real dtype; cast once to float32 C-contiguous (as pyFAI does).
    seeds : array_like of shape (N, 2)
        Start positions ``(y, x)`` in index coordinates, float or integer.
        Floats are rounded half to even (``np.rint``, Python's ``round``).
    backend : {"cython", "numpy"}, optional
        Compiled kernel or its vectorised pure-numpy twin; identical results.
    nthreads : int, optional
        OpenMP threads for the cython backend, 0 for OpenMP's default
        (``OMP_NUM_THREADS``); batches of fewer than 8192 seeds always use
        one, and so does a build without OpenMP. The default is one: on a
        machine whose cores are busy with other work, a parallel call waits
        for its slowest thread and can take ten times longer than a serial
        one. The results do not depend on it.

    Returns
    -------
    ndarray of shape (N, 2), float64
        Refined ``(y, x)`` positions in index coordinates (pixels), one row
        per seed, in the order of ``seeds``; ``(0, 2)`` for no seeds.

    Raises
    ------
    CcdgridError
        If ``image`` is not a non-empty real 2-D array, ``seeds`` is not
        ``(N, 2)`` real, a seed is non-finite or outside the image after
        rounding (the message names the first such seed), or ``nthreads``
        is not a non-negative integer.

    Notes
    -----
    The Hessian is not checked for negative definiteness (saddles are
    accepted), and the centre of mass uses raw intensities, so a background
    pulls it towards the pixel centre; both as in pyFAI. On a two-pixel
    plateau the Newton step lands on the midpoint.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((5, 6), np.float32)
    >>> img[2, 2:4] = 1.0
    >>> refine_peaks(img, [(1, 1)])
    array([[2. , 2.5]])
    """
    engine = _ENGINES[check_backend(backend)]
    img = as_image(image)
    # Integer seeds are checked by the engine, in the pass that refines them.
    pix = _as_seeds(seeds, img.shape, check=False)
    out, bad = engine.refine_peaks(img, pix, _check_nthreads(nthreads))
    if bad >= 0:
        _first_bad_seed(pix, pix, img.shape)
    return out


class Bilinear:
    """Drop-in for pyFAI's ``pyFAI.ext.bilinear.Bilinear``.

    Parameters
    ----------
    data : array_like of shape (H, W)
        Any real dtype; kept as a float32 C-contiguous copy (read-only).
    backend : {"cython", "numpy"}, optional
        Engine used by :meth:`local_maxi` and :meth:`cp_local_maxi`.

    Attributes
    ----------
    data : ndarray of shape (H, W), float32
        The image as the kernels see it (read-only).
    height, width : int
        ``H`` and ``W``.
    maxi, mini : float
        Maximum and minimum of the input, taken on its own dtype and then
        rounded to float32, as pyFAI stores them (NaN if the image has NaN).
    """

    def __init__(self, data, *, backend="cython"):
        self._engine = _ENGINES[check_backend(backend)]
        raw = np.asarray(data)
        # A read-only view: the caller's own float32 array is neither copied
        # nor frozen (pyFAI shares it the same way).
        img = as_image(raw, name="data").view()
        img.flags.writeable = False
        self._data = img
        self.height, self.width = img.shape
        self.maxi = float(np.float32(raw.max()))
        self.mini = float(np.float32(raw.min()))

    @property
    def data(self):
        return self._data

    def _pixel(self, x):
        """``(y, x)`` -> in-bounds integer pixel, rounded half to even."""
        try:
            y0, x0 = (float(v) for v in x)
        except (TypeError, ValueError) as err:
            raise CcdgridError(
                f"the position must be a pair (y, x) of numbers, not {x!r}"
            ) from err
        if not (math.isfinite(y0) and math.isfinite(x0)):
            raise CcdgridError(f"the position (y, x) = {(y0, x0)} is not finite")
        iy, ix = round(y0), round(x0)
        if not (0 <= iy < self.height and 0 <= ix < self.width):
            raise CcdgridError(
                f"the position (y, x) = {(y0, x0)} is outside the image of shape "
                f"{(self.height, self.width)}"
            )
        return iy, ix

    def local_maxi(self, x):
        """Refined local maximum reached from one position.

        Parameters
        ----------
        x : pair of float
            Start ``(y, x)`` in index coordinates, rounded half to even.

        Returns
        -------
        tuple of float
            ``(y, x)`` as :func:`refine_peaks` gives it.
        """
        return self._engine.refine_one(self._data, *self._pixel(x))

    def cp_local_maxi(self, x):
        """Flat index ``y * width + x`` of the local maximum reached from flat index ``x``.

        Unlike pyFAI, ``x`` is checked: outside ``0 .. height * width - 1``
        raises :class:`CcdgridError` instead of reading out of bounds.
        """
        try:
            idx = operator.index(x)
        except TypeError as err:
            raise CcdgridError(f"the flat index must be an integer, got {x!r}") from err
        if not 0 <= idx < self.height * self.width:
            raise CcdgridError(
                f"the flat index {idx} is outside 0 .. {self.height * self.width - 1}"
            )
        y, x = self._engine.climb_one(self._data, *divmod(idx, self.width))
        return y * self.width + x

    def __call__(self, x):
        """Bilinear interpolation of the image at ``(y, x)`` (float32, like pyFAI).

        The position is clamped to ``[0, H - 1] x [0, W - 1]``; between
        pixel centres the four surrounding pixels are weighted bilinearly.
        """
        f32 = np.float32
        try:
            d0, d1 = (f32(v) for v in x)
        except (TypeError, ValueError) as err:
            raise CcdgridError(
                f"the position must be a pair (y, x) of numbers, not {x!r}"
            ) from err
        if not (np.isfinite(d0) and np.isfinite(d1)):
            raise CcdgridError(f"the position (y, x) = {(float(d0), float(d1))} is not finite")
        d0 = min(max(d0, f32(0)), f32(self.height - 1))
        d1 = min(max(d1, f32(0)), f32(self.width - 1))
        y0, y1 = f32(np.floor(d0)), f32(np.ceil(d0))
        x0, x1 = f32(np.floor(d1)), f32(np.ceil(d1))
        i0, i1, j0, j1 = int(y0), int(y1), int(x0), int(x1)
        a = self._data
        with np.errstate(all="ignore"):  # NaN/inf pixels propagate
            if i0 == i1 and j0 == j1:
                res = a[i0, j0]
            elif i0 == i1:
                res = a[i0, j0] * (x1 - d1) + a[i0, j1] * (d1 - x0)
            elif j0 == j1:
                res = a[i0, j0] * (y1 - d0) + a[i1, j0] * (d0 - y0)
            else:
                res = (
                    a[i0, j0] * (y1 - d0) * (x1 - d1)
                    + a[i1, j0] * (d0 - y0) * (x1 - d1)
                    + a[i0, j1] * (y1 - d0) * (d1 - x0)
                    + a[i1, j1] * (d0 - y0) * (d1 - x0)
                )
        return float(res)
