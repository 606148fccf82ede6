"""Exchange formats: dx/dy EDF images, and conversion between distortion formats.

Three ways to carry the same corner displacement maps ``dy, dx`` (shape
``(ny + 1, nx + 1)``, pixels; corner ``(i, j)`` at index coordinates
``(i - 0.5, j - 0.5)``, which is pyFAI's ``(i, j)``; true position = nominal
position + ``(dy, dx)``):

``detector``
    The HDF5 detector file pyFAI loads (:mod:`ccdgrid.detector_file`):
    ``.h5``, ``.hdf5``, ``.nxs``, ``.nx5``.
``spline``
    A Fit2D spline file (:mod:`ccdgrid.spline`): ``.spline``.
``edf``
    A pair of EDF images ``PREFIX-x.edf`` (dx) and ``PREFIX-y.edf`` (dy),
    pyFAI's ``Spline.writeEDF`` naming, plus ``PREFIX-mask.edf`` (int8,
    ``(ny, nx)``, 1 = invalid pixel) when a mask is known. A path
    ``PREFIX.edf``, ``PREFIX-x.edf`` or ``PREFIX-y.edf`` names the pair.

:func:`convert` reads any of them and writes any other. The ``ccdgrid
convert`` subcommand is :func:`add_convert_parser` + :func:`run_convert`.

This module imports numpy, fabio and h5py only when a function runs, so that
building the command-line parser stays instant.
"""

import argparse
import os
import pathlib
import secrets
from dataclasses import dataclass, field

from .errors import CcdgridError

__all__ = [
    "EDF_CONVENTION",
    "FORMATS",
    "Conversion",
    "EdfMaps",
    "add_convert_parser",
    "convert",
    "edf_paths",
    "read_edf_maps",
    "run_convert",
    "write_edf_maps",
]

FORMATS = ("detector", "spline", "edf")
_SUFFIXES = {
    ".h5": "detector",
    ".hdf5": "detector",
    ".hdf": "detector",
    ".nxs": "detector",
    ".nx5": "detector",
    ".spline": "spline",
    ".edf": "edf",
}
# EDF header values end at ';' and the header at '}', so neither may appear here
EDF_CONVENTION = (
    "corner grid of shape (ny+1, nx+1): corner (i, j) is at pixel-index coordinates "
    "(i-0.5, j-0.5), i.e. at pyFAI coordinates (i, j) (pixel centre (i, j) at (i+0.5, j+0.5))"
)
_EDF_SIGN = "d = true - nominal position of the corner (pyFAI Detector.set_dx/set_dy)"
_MASK_CONVENTION = "1 = invalid pixel (pyFAI), shape (ny, nx)"


@dataclass(frozen=True)
class EdfMaps:
    """Corner maps read from an EDF pair by :func:`read_edf_maps`.

    Attributes
    ----------
    dy, dx : ndarray of shape (ny + 1, nx + 1), float32, px
        Corner displacement maps (see the module docstring).
    mask : ndarray of shape (ny, nx), int8, or None
        1 = invalid pixel; None when no mask file was found.
    pixel_size : tuple of 2 float or None
        ``(pixel1, pixel2)`` = (y, x) in metres, if the headers state it.
    headers : dict
        ``{"dx": {...}, "dy": {...}}``: the EDF headers, as fabio reads them.
    paths : tuple of pathlib.Path
        ``(dx_path, dy_path, mask_path or None)``.
    """

    dy: object = field(repr=False)
    dx: object = field(repr=False)
    mask: object = field(repr=False)
    pixel_size: tuple | None
    headers: dict = field(repr=False)
    paths: tuple

    @property
    def shape(self):
        """``(ny, nx)`` pixels."""
        return (self.dx.shape[0] - 1, self.dx.shape[1] - 1)


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert` did.

    Attributes
    ----------
    source, target : str
        Formats, from :data:`FORMATS`.
    paths : tuple of pathlib.Path
        Files written (one, or two or three for an EDF pair).
    shape : tuple of 2 int
        ``(ny, nx)`` pixels.
    spline_fit : ccdgrid.spline.SplineFit or None
        For a spline target: the smoothing chosen and the largest and RMS
        difference between the spline and the maps on the valid corners.
    """

    source: str
    target: str
    paths: tuple
    shape: tuple
    spline_fit: object = field(default=None, repr=False)


# -- EDF pairs ---------------------------------------------------------------


def edf_paths(prefix):
    """The files of an EDF pair: ``(PREFIX-x.edf, PREFIX-y.edf, PREFIX-mask.edf)``.

    Parameters
    ----------
    prefix : str or os.PathLike
        ``PREFIX``, or any of ``PREFIX.edf``, ``PREFIX-x.edf``,
        ``PREFIX-y.edf``, ``PREFIX-mask.edf``.

    Returns
    -------
    tuple of 3 pathlib.Path
    """
    text = os.fspath(prefix)
    for tail in ("-x.edf", "-y.edf", "-mask.edf", ".edf"):
        if text.lower().endswith(tail):
            text = text[: -len(tail)]
            break
    if not text or text.endswith(("/", os.sep)):
        raise CcdgridError(f"`prefix` must name files, got {os.fspath(prefix)!r}")
    return tuple(pathlib.Path(f"{text}{tail}") for tail in ("-x.edf", "-y.edf", "-mask.edf"))


def write_edf_maps(prefix, dy, dx, *, mask=None, pixel_size=None):
    """Write corner displacement maps as EDF images (float32), with their conventions.

    Parameters
    ----------
    prefix : str or os.PathLike
        Writes ``PREFIX-x.edf`` (dx) and ``PREFIX-y.edf`` (dy), and
        ``PREFIX-mask.edf`` if ``mask`` is given (see :func:`edf_paths`).
        Existing files are replaced; each file is written under a temporary
        name and renamed, so none is ever left half-written.
    dy, dx : array_like of shape (ny + 1, nx + 1), float, px
        Corner displacement maps: corner ``(i, j)`` at index coordinates
        ``(i - 0.5, j - 0.5)`` (pyFAI's ``(i, j)``); true position = nominal
        + ``(dy, dx)``. Stored as float32.
    mask : array_like of shape (ny, nx) or None
        Non-zero = invalid pixel; stored as int8 0/1.
    pixel_size : pair of float or None
        ``(pixel1, pixel2)`` = (y, x) in metres, recorded in the headers.

    Returns
    -------
    tuple of pathlib.Path
        The files written: dx, dy, then the mask if any.

    Notes
    -----
    Header keys of both map files: ``Map`` (``dx`` or ``dy``), ``Units``
    (``pixel``), ``Convention`` (:data:`EDF_CONVENTION`), ``Sign``,
    ``PixelSize1``/``PixelSize2`` and ``PixelSizeUnits`` (``m``) when known,
    ``MaskFile`` when a mask is written, ``Creator`` and ``ccdgrid_version``.

    Examples
    --------
    >>> write_edf_maps("frelon", cal.dy, cal.dx, mask=cal.mask,
    ...                pixel_size=cal.pixel_size)  # doctest: +SKIP
    (PosixPath('frelon-x.edf'), PosixPath('frelon-y.edf'), PosixPath('frelon-mask.edf'))
    """
    import numpy as np

    from . import __version__

    dx_path, dy_path, mask_path = edf_paths(prefix)
    dy = _corner_map(dy, "dy")
    dx = _corner_map(dx, "dx")
    if dy.shape != dx.shape:
        raise CcdgridError(f"`dy` and `dx` differ in shape: {dy.shape} vs {dx.shape}")
    shape = (dx.shape[0] - 1, dx.shape[1] - 1)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise CcdgridError(f"`mask` must have the pixel shape {shape}, got {mask.shape}")
        mask = (mask != 0).astype(np.int8)
    common = {
        "Units": "pixel",
        "Convention": EDF_CONVENTION,
        "Sign": _EDF_SIGN,
        "Creator": f"ccdgrid {__version__}",
        "ccdgrid_version": str(__version__),
    }
    if pixel_size is not None:
        pixel1, pixel2 = _pixel_size(pixel_size, "pixel_size")
        common.update(PixelSize1=repr(pixel1), PixelSize2=repr(pixel2), PixelSizeUnits="m")
    if mask is not None:
        common["MaskFile"] = mask_path.name
    for path in (dx_path, dy_path, mask_path):
        _check_target(path)
    written = []
    for path, name, data in ((dx_path, "dx", dx), (dy_path, "dy", dy)):
        _write_edf(path, data, {"Map": name, **common})
        written.append(path)
    if mask is not None:
        header = {
            "Map": "mask",
            "Convention": _MASK_CONVENTION,
            "Creator": common["Creator"],
            "ccdgrid_version": common["ccdgrid_version"],
        }
        _write_edf(mask_path, mask, header)
        written.append(mask_path)
    return tuple(written)


def read_edf_maps(dx_path, dy_path, *, mask_path=None):
    """Read corner displacement maps from two EDF images.

    Parameters
    ----------
    dx_path, dy_path : str or os.PathLike
        The dx and dy images, each of shape (ny + 1, nx + 1), pixels. Files
        from :func:`write_edf_maps` and from pyFAI's ``Spline.writeEDF``
        (which states nothing in its headers) are both read.
    mask_path : str or os.PathLike or None
        A mask image (ny, nx), non-zero = invalid. None: the file named by
        the ``MaskFile`` header of the dx image, looked up beside it, if
        there is one.

    Returns
    -------
    EdfMaps

    Raises
    ------
    CcdgridError
        If a file is missing or unreadable, the shapes disagree, a header
        states a unit other than pixels, or the two headers give different
        pixel sizes.
    """
    import numpy as np

    dx_path = pathlib.Path(dx_path).expanduser()
    dy_path = pathlib.Path(dy_path).expanduser()
    dx, dx_header = _read_edf(dx_path)
    dy, dy_header = _read_edf(dy_path)
    for path, data in ((dx_path, dx), (dy_path, dy)):
        if data.ndim != 2 or min(data.shape) < 2:
            raise CcdgridError(f"{path}: a corner map must be a 2-D image, got shape {data.shape}")
    if dx.shape != dy.shape:
        raise CcdgridError(f"{dx_path} and {dy_path} differ in shape: {dx.shape} vs {dy.shape}")
    for path, header, name in ((dx_path, dx_header, "dx"), (dy_path, dy_header, "dy")):
        units = header.get("Units", "pixel").strip().lower()
        if units not in ("pixel", "pixels", "px"):
            raise CcdgridError(f"{path}: displacement in {units!r}, expected pixels")
        stated = header.get("Map", name).strip()
        if stated != name:
            raise CcdgridError(f"{path} holds the {stated!r} map, expected {name!r}")
    pixel_x = _header_pixel_size(dx_path, dx_header)
    pixel_y = _header_pixel_size(dy_path, dy_header)
    if pixel_x is not None and pixel_y is not None and not np.allclose(pixel_x, pixel_y):
        raise CcdgridError(
            f"{dx_path} and {dy_path} state different pixel sizes: {pixel_x} vs {pixel_y} m"
        )
    pixel_size = pixel_x if pixel_x is not None else pixel_y

    mask = None
    if mask_path is None and dx_header.get("MaskFile"):
        candidate = dx_path.parent / dx_header["MaskFile"].strip()
        mask_path = candidate if candidate.is_file() else None
    if mask_path is not None:
        mask_path = pathlib.Path(mask_path).expanduser()
        raw, _ = _read_edf(mask_path)
        shape = (dx.shape[0] - 1, dx.shape[1] - 1)
        if raw.shape != shape:
            raise CcdgridError(
                f"{mask_path}: a mask for {shape} pixels must have that shape, got {raw.shape}"
            )
        mask = (raw != 0).astype(np.int8)
    return EdfMaps(
        dy=np.ascontiguousarray(dy, dtype=np.float32),
        dx=np.ascontiguousarray(dx, dtype=np.float32),
        mask=mask,
        pixel_size=pixel_size,
        headers={"dx": dx_header, "dy": dy_header},
        paths=(dx_path, dy_path, mask_path),
    )


def _write_edf(path, data, header):
    from fabio.edfimage import EdfImage

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        EdfImage(data=data, header=header).write(os.fspath(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_edf(path):
    import fabio

    if not path.is_file():
        raise CcdgridError(f"EDF file not found: {path}")
    try:
        image = fabio.open(os.fspath(path))
    except Exception as exc:  # fabio raises many types for a file it cannot parse
        raise CcdgridError(f"{path} is not a readable EDF image ({exc})") from exc
    return image.data, {str(k): str(v) for k, v in image.header.items()}


def _header_pixel_size(path, header):
    if "PixelSize1" not in header and "PixelSize2" not in header:
        return None
    units = header.get("PixelSizeUnits", "m").strip()
    if units != "m":
        raise CcdgridError(f"{path}: pixel size in {units!r}, expected 'm'")
    try:
        pair = (float(header["PixelSize1"]), float(header["PixelSize2"]))
    except (KeyError, ValueError):
        raise CcdgridError(
            f"{path}: PixelSize1/PixelSize2 must both be numbers, got "
            f"{header.get('PixelSize1')!r}, {header.get('PixelSize2')!r}"
        ) from None
    return _pixel_size(pair, f"pixel size in {path}")


# -- conversion --------------------------------------------------------------


@dataclass
class _Maps:
    """The duck-typed calibration that :func:`ccdgrid.detector_file.save_detector` takes."""

    dy: object
    dx: object
    mask: object
    pixel_size: tuple | None
    pitch: float | None = None
    source: dict | None = None


def convert(src, dst, *, to=None, pixel_size=None, tolerance=0.01):
    """Convert distortion maps between a detector file, a Fit2D spline and an EDF pair.

    Parameters
    ----------
    src : str or os.PathLike
        A ccdgrid or pyFAI detector file (HDF5), a Fit2D spline file, or an
        EDF pair (``PREFIX-x.edf``, ``PREFIX-y.edf`` or ``PREFIX.edf``, or
        the prefix itself). The format is recognised from the content.
    dst : str or os.PathLike
        Output; its format comes from the extension (``.h5``, ``.hdf5``,
        ``.nxs``, ``.nx5``: detector; ``.spline``; ``.edf``: EDF pair) unless
        ``to`` says otherwise. Existing files are replaced.
    to : {"detector", "spline", "edf"} or None
        Output format, overriding the extension.
    pixel_size : float or pair of float or None
        ``(pixel1, pixel2)`` in metres. Required when the source does not
        state it (EDF images without ccdgrid's headers) and the target needs
        it (detector, spline); otherwise it overrides the source's.
    tolerance : float
        For a spline target: the largest acceptable difference between the
        spline and the maps on a valid (unmasked) corner, px.

    Returns
    -------
    Conversion

    Raises
    ------
    CcdgridError
        If a format cannot be recognised, a file is malformed, or the pixel
        size is needed and unknown.

    Notes
    -----
    A detector file's mask travels to the EDF mask image and back, and
    becomes a spline's valid region (which a spline file cannot store: a
    detector made from a spline has no mask). A spline is sampled at the
    pixel corners exactly as pyFAI's ``Detector(splinefile=...)`` does.

    Examples
    --------
    >>> convert("frelon.h5", "frelon.spline").spline_fit.max_error  # doctest: +SKIP
    0.0071
    >>> convert("frelon.spline", "frelon.edf").paths  # doctest: +SKIP
    (PosixPath('frelon-x.edf'), PosixPath('frelon-y.edf'))
    """
    source_format = _source_format(src)
    target_format = _target_format(dst, to)
    if pixel_size is not None:
        pixel_size = _pixel_size(pixel_size, "pixel_size")
    maps = _read_maps(src, source_format)
    if pixel_size is not None:
        maps.pixel_size = pixel_size
    if maps.pixel_size is None and target_format != "edf":
        raise CcdgridError(
            f"{src} does not state the pixel size, which a {target_format} file needs: "
            "give `pixel_size` (--pixel-size)"
        )
    shape = (maps.dx.shape[0] - 1, maps.dx.shape[1] - 1)
    fit = None
    if target_format == "detector":
        from .detector_file import save_detector

        paths = (save_detector(dst, maps),)
    elif target_format == "spline":
        from .spline import write_spline

        fit = write_spline(
            dst,
            maps.dy,
            maps.dx,
            pixel_size=maps.pixel_size,
            grid_spacing=maps.pitch,
            valid_region=None if maps.mask is None else maps.mask == 0,
            tolerance=tolerance,
        )
        paths = (fit.path,)
    else:
        paths = write_edf_maps(dst, maps.dy, maps.dx, mask=maps.mask, pixel_size=maps.pixel_size)
    return Conversion(
        source=source_format, target=target_format, paths=paths, shape=shape, spline_fit=fit
    )


def _source_format(src):
    path = pathlib.Path(src).expanduser()
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(512)
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            return "detector"
        if head.lstrip().startswith(b"{"):
            return "edf"
        if b"SPATIAL DISTORTION" in head.upper() or b"VALID REGION" in head.upper():
            return "spline"
        raise CcdgridError(
            f"{path}: not a detector file (HDF5), a Fit2D spline file or an EDF image"
        )
    try:
        dx_path, dy_path, _ = edf_paths(path)
    except CcdgridError:
        dx_path = dy_path = None
    if dx_path is not None and dx_path.is_file() and dy_path.is_file():
        return "edf"
    raise CcdgridError(f"source not found: {path}")


def _target_format(dst, to):
    if to is not None:
        if to not in FORMATS:
            raise CcdgridError(f"`to` must be one of {', '.join(FORMATS)}; got {to!r}")
        return to
    suffix = pathlib.Path(dst).suffix.lower()
    if suffix not in _SUFFIXES:
        known = ", ".join(sorted(_SUFFIXES))
        raise CcdgridError(
            f"cannot tell the output format from {os.fspath(dst)!r} (extensions: {known}); "
            "give `to` (--to)"
        )
    return _SUFFIXES[suffix]


def _read_maps(src, fmt):
    path = pathlib.Path(src).expanduser()
    origin = {"path": os.fspath(path.absolute()), "format": fmt}
    if fmt == "detector":
        from .detector_file import load

        rec = load(path)
        return _Maps(rec.dy, rec.dx, rec.mask, rec.pixel_size, rec.pitch, origin)
    if fmt == "spline":
        from .spline import read_spline

        spline = read_spline(path)
        dy, dx = spline.corner_maps()
        return _Maps(dy, dx, None, spline.pixel_size, spline.grid_spacing, origin)
    dx_path, dy_path, _ = edf_paths(path)
    edf = read_edf_maps(dx_path, dy_path)
    return _Maps(edf.dy, edf.dx, edf.mask, edf.pixel_size, None, origin)


# -- command line ------------------------------------------------------------

_CONVERT_EPILOG = """\
formats (the output's from its extension, or --to):
  detector   HDF5 detector file that pyFAI loads (.h5, .hdf5, .nxs, .nx5)
  spline     Fit2D spline file (.spline)
  edf        EDF pair PREFIX-x.edf, PREFIX-y.edf (+ PREFIX-mask.edf); name it
             PREFIX.edf, PREFIX-x.edf or PREFIX

examples:
  ccdgrid convert frelon.h5 frelon.spline           for Fit2D, SPD, pyFAI splinefile=
  ccdgrid convert frelon.h5 frelon.edf              frelon-x.edf, frelon-y.edf, frelon-mask.edf
  ccdgrid convert old.spline old.h5                 a detector file from a Fit2D spline
  ccdgrid convert maps-x.edf maps.h5 --pixel-size 50um
"""


def add_convert_parser(subparsers, parents=()):
    """Add the ``convert`` subcommand to a ``ccdgrid`` argparse subparsers object.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers()`` returned.
    parents : sequence of argparse.ArgumentParser
        Parent parsers with shared options (ccdgrid's ``--debug``).

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser; it sets ``args.run = run_convert``.
    """
    parser = subparsers.add_parser(
        "convert",
        parents=list(parents),
        help="convert distortion maps: detector file, Fit2D spline, EDF images",
        description="Convert corner displacement maps between a detector file (HDF5), a\n"
        "Fit2D spline file and a pair of EDF images. The spline is fitted so that it\n"
        "reproduces the maps within --tolerance pixels on every unmasked corner.",
        epilog=_CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="detector file, .spline or EDF pair")
    parser.add_argument("target", metavar="TARGET", help="output file (format from extension)")
    parser.add_argument("--to", choices=FORMATS, help="output format, overriding the extension")
    parser.add_argument(
        "--pixel-size",
        type=_pixel_size_argument,
        metavar="SIZE",
        help="pixel size when the source lacks it: 50um, or 50um,60um for (y, x)",
    )
    parser.add_argument(
        "--tolerance",
        type=_tolerance_argument,
        default=0.01,
        metavar="PX",
        help="largest spline error on an unmasked corner (default: %(default)s px)",
    )
    parser.set_defaults(run=run_convert)
    return parser


def run_convert(args):
    """Run ``ccdgrid convert`` from parsed arguments; print what was written."""
    result = convert(
        args.source, args.target, to=args.to, pixel_size=args.pixel_size, tolerance=args.tolerance
    )
    ny, nx = result.shape
    print(f"{result.source} -> {result.target}: {ny} x {nx} pixels")
    for path in result.paths:
        print(f"wrote {path}")
    fit = result.spline_fit
    if fit is not None:
        (kx, ky), (lx, ly) = fit.spline.knots
        print(
            f"spline: {kx} x {ky} (dx) and {lx} x {ly} (dy) knots; on {fit.valid_corners} "
            f"valid corners max error {fit.max_error:.4f} px, RMS {fit.rms_error:.4f} px"
        )


def _pixel_size_argument(text):
    from .units import parse_length

    parts = [part for part in text.replace(";", ",").split(",") if part.strip()]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected SIZE or SIZE_Y,SIZE_X, got {text!r}")
    try:
        values = [parse_length(part, name="pixel size") for part in parts]
    except CcdgridError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return tuple(values * 2) if len(values) == 1 else tuple(values)


def _tolerance_argument(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {text!r}")
    return value


# -- validation --------------------------------------------------------------


def _corner_map(value, label):
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise CcdgridError(f"`{label}` must hold real numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise CcdgridError(f"`{label}` must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise CcdgridError(
            f"`{label}` must be a corner map of shape (ny + 1, nx + 1), got {arr.shape}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def _pixel_size(value, label):
    import math

    import numpy as np

    try:
        pair = (float(value),) * 2 if np.ndim(value) == 0 else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise CcdgridError(
            f"`{label}` must be (pixel1, pixel2) in metres, got {value!r}"
        ) from None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise CcdgridError(f"`{label}` must be two positive lengths in metres, got {value!r}")
    return pair


def _check_target(path):
    if path.is_dir():
        raise CcdgridError(f"cannot write {path}: it is a directory")
    if not path.absolute().parent.is_dir():
        raise CcdgridError(f"cannot write {path}: directory {path.parent} does not exist")
