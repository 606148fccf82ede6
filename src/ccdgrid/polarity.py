"""Which way a grid image's holes differ from the plate: bright or dark.

ccdgrid measures bright holes on a dark plate: a hole in a metal plate lets
the beam through. A mask of absorbing dots on a transparent sheet, or an
image a processing step inverted, shows dark holes on a bright plate
instead. Their image is measured through its negative, :func:`invert`,
whose holes are bright again. :func:`ccdgrid.calibrate` chooses the
polarity itself by default (``polarity="auto"``) and records it in the
calibration's ``params`` and in the detector file, so that a warm start or a
validation from that file reads its images the same way.
"""

import numpy as np

from ._validation import check_image
from .errors import CcdgridError

__all__ = ["POLARITIES", "check_polarity", "invert", "polarity_of"]

POLARITIES = ("auto", "bright", "dark")


def check_polarity(polarity):
    """Return ``polarity`` if it is one of :data:`POLARITIES`, else raise CcdgridError."""
    if not isinstance(polarity, str) or polarity not in POLARITIES:
        raise CcdgridError(
            f"`polarity` must be one of {', '.join(map(repr, POLARITIES))} (holes brighter or "
            f"darker than the plate, or chosen from the image), got {polarity!r}"
        )
    return polarity


def invert(image, mask=None):
    """The negative of an image: its largest usable value minus it.

    Parameters
    ----------
    image : array_like of shape (ny, nx)
        Any real dtype (others raise CcdgridError, as the hole search does).
    mask : array_like of shape (ny, nx) or None
        Nonzero (or NaN) for pixels to ignore: their values (a module gap's
        sentinel, say) do not set the top. Ignored if its shape differs
        (the hole search reports that).

    Returns
    -------
    ndarray of shape (ny, nx), float32 or float64
        float64 for float64 input, for integers wider than 16 bits and
        whenever float32 would round the counts (a top beyond 2**24), else
        float32. Non-finite pixels stay non-finite; an image without a
        usable pixel is returned as float, unchanged.
    """
    img = check_image(image)
    usable = np.isfinite(img) if img.dtype.kind == "f" else np.ones(img.shape, dtype=bool)
    if mask is not None and np.shape(mask) == img.shape:
        usable &= np.asarray(mask) == 0  # NaN == 0 is False: a NaN masks too
    if not usable.any():
        return img.astype(np.float64 if img.dtype == np.float64 else np.float32)
    top = float(img.max() if usable.all() else img[usable].max())
    wide = (
        img.dtype == np.float64
        or (img.dtype.kind in "iu" and img.dtype.itemsize > 2)
        or abs(top) > 2.0**24
    )
    out = img.astype(np.float64 if wide else np.float32)
    # in place: one image-sized array, not two
    np.subtract(top, out, out=out)
    return out


def polarity_of(calibration):
    """``"bright"`` or ``"dark"``: how a calibration (or detector record) read its image.

    Calibrations and files made before the polarity was recorded measured
    bright holes.
    """
    params = getattr(calibration, "params", None)
    value = params.get("polarity") if isinstance(params, dict) else None
    return "dark" if value == "dark" else "bright"
