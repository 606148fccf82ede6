"""Input checks shared by the public façades (the kernels trust their inputs)."""

import numpy as np

from .errors import CcdgridError

__all__ = ["as_image", "as_points", "check_backend", "check_positive", "split_masked"]

BACKENDS = ("cython", "numpy")


def check_backend(backend):
    """Return ``backend`` if it names an engine, else raise :class:`CcdgridError`."""
    if backend not in BACKENDS:
        raise CcdgridError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    return backend


def as_image(image, name="image", dtype=np.float32):
    """Return ``image`` as a C-contiguous 2-D array of ``dtype``.

    Accepts any real numeric dtype (bool, unsigned and signed integers,
    floats). Rejects other dimensionalities, empty arrays, and complex or
    object arrays with a message that names ``name``.
    """
    return np.ascontiguousarray(check_image(image, name), dtype=dtype)


def check_image(image, name="image"):
    """Return ``np.asarray(image)`` (no copy) if it is a non-empty 2-D array of real numbers.

    Else raise CcdgridError naming ``name``: bool, unsigned and signed
    integers and floats are accepted; other dimensionalities, empty arrays,
    complex, string and object arrays are not.
    """
    arr = np.asarray(image)
    # kinds: bool, signed, unsigned, float (a dtype check that costs ~0.1 us)
    if arr.dtype.kind not in "biuf":
        raise CcdgridError(f"`{name}` must hold real numbers, got an array of dtype {arr.dtype}")
    if arr.ndim != 2:
        raise CcdgridError(f"`{name}` must be a 2-D image, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise CcdgridError(f"`{name}` is empty (shape {arr.shape})")
    return arr


def as_points(points, name="points", ncols=2):
    """Return ``points`` as a C-contiguous ``(N, ncols)`` float64 array."""
    arr = np.asarray(points)
    if arr.dtype.kind not in "biuf":
        raise CcdgridError(f"`{name}` must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 1 and arr.size == ncols:
        arr = arr.reshape(1, ncols)
    if arr.ndim != 2 or arr.shape[1] != ncols:
        raise CcdgridError(f"`{name}` must have shape (N, {ncols}), got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def check_positive(value, name, what="a positive number"):
    """``float(value)``, or a CcdgridError naming ``name`` unless it is finite and > 0.

    ``what`` says what ``name`` must be in the message (e.g. "a positive
    length in metres").
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (np.isfinite(number) and number > 0):
        raise CcdgridError(f"`{name}` must be {what}, got {value!r}")
    return number


def split_masked(image, mask):
    """``(data, mask)``: the mask of a numpy masked array ``image`` merged into ``mask``.

    ``mask`` is nonzero for pixels to ignore (pyFAI's convention), or None;
    a plain array and its mask are returned as they are. A mask of another
    shape is returned unmerged, for the caller's shape check to name.
    """
    if not isinstance(image, np.ma.MaskedArray):
        return image, mask
    data = np.ma.getdata(image)
    hidden = np.ma.getmaskarray(image)
    if not hidden.any():
        return data, mask
    if mask is None:
        return data, hidden
    given = np.asarray(mask)
    if given.shape != hidden.shape:
        return data, mask
    return data, (given != 0) | hidden
