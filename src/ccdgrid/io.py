"""Reading grid images and masks from files.

Images are read with fabio (EDF, TIFF, CBF, Mar, ... every format fabio
knows), from HDF5 with h5py (``file.h5::/entry/data``) and from ``.npy``.
Every failure is a :class:`~ccdgrid.errors.CcdgridError` that names the file.
"""

import contextlib
import hashlib
import logging
import os
import pathlib

import numpy as np

from .errors import CcdgridError

__all__ = ["SeveralFramesError", "read_image", "read_mask", "refuse_colour", "sha256_file"]

_HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".nxs", ".nx", ".nx5", ".cxi"}
_HASH_BLOCK = 1 << 20


def sha256_file(path):
    """Return the SHA-256 hex digest of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    str
        64 lowercase hexadecimal digits.
    """
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb") as stream:
        while True:
            count = stream.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


def read_image(source, *, frame=None, sha256=None):
    """Read one 2-D image from a file.

    Parameters
    ----------
    source : str or os.PathLike
        A file path. ``.npy`` files are read with numpy; ``file.h5::/path``
        names a dataset inside an HDF5 file (an HDF5 file without ``::`` is
        accepted when it holds exactly one 2-D or 3-D numeric dataset);
        anything else goes through ``fabio.open`` (EDF, TIFF, CBF, ...).
    frame : int or None
        Frame of a multi-frame file or of a 3-D dataset (0-based). Required
        when the source holds more than one frame; ``None`` or ``0`` for a
        single image.
    sha256 : str or None
        The file's SHA-256 when the caller already knows it (a series reads
        many frames of one stack and hashes it once); None: computed here.

    Returns
    -------
    image : ndarray of shape (ny, nx)
        The image in the file's own dtype (integers are not converted),
        C-contiguous, indexed ``[y, x]``.
    info : dict
        ``"path"`` (absolute file path, str), ``"dataset"`` (HDF5 path or None),
        ``"frame"`` (int or None), ``"sha256"`` (hex digest of the whole
        file's bytes, so that a calibration can be traced to its input),
        ``"shape"`` (tuple ``(ny, nx)``), ``"dtype"`` (str) and ``"format"``
        (``"npy"``, ``"hdf5"`` or the fabio class name).

    Raises
    ------
    CcdgridError
        If the file does not exist, is not an image any reader knows, holds
        several frames and ``frame`` is not given, or the image is empty or
        not numeric. The message names the file.
    OSError
        If the file exists but cannot be read (permissions, I/O error).
    """
    path, dataset = _split_source(source)
    if not path.exists():
        raise CcdgridError(f"image file not found: {path}")
    if path.is_dir():
        raise CcdgridError(f"image path is a directory, not a file: {path}")
    if frame is not None and (
        isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or frame < 0
    ):
        raise CcdgridError(f"`frame` must be a non-negative int or None, got {frame!r}")
    # hashing also surfaces permission errors as OSError; a known digest skips
    # it and the reader below raises them instead
    digest = sha256_file(path) if sha256 is None else str(sha256)
    if dataset is not None or path.suffix.lower() in _HDF5_SUFFIXES:
        data, dataset, fmt = _read_hdf5(path, dataset, frame)
    elif path.suffix.lower() == ".npy":
        data, fmt = _read_npy(path, frame), "npy"
    else:
        data, fmt = _read_fabio(path, frame)
    data = _check_image(data, path)
    info = {
        "path": str(path),
        "dataset": dataset,
        "frame": None if frame is None else int(frame),
        "sha256": digest,
        "shape": tuple(int(n) for n in data.shape),
        "dtype": str(data.dtype),
        "format": fmt,
    }
    return data, info


def read_mask(mask, shape):
    """Read or convert a pixel mask and check it against the image shape.

    Parameters
    ----------
    mask : str, os.PathLike or array_like
        A file (anything :func:`read_image` reads) or an array. Non-zero
        (and NaN) values mark **invalid** pixels, as in pyFAI.
    shape : tuple of 2 int
        ``(ny, nx)`` of the image the mask belongs to.

    Returns
    -------
    ndarray of shape (ny, nx), bool
        True where the pixel is invalid.

    Raises
    ------
    CcdgridError
        If the file cannot be read as an image or the shape differs.
    """
    if isinstance(mask, (str, os.PathLike)):
        array, info = read_image(mask)
        label = f"mask file {info['path']}"
    else:
        array = np.asarray(mask)
        label = "`mask`"
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == bool
        ):
            raise CcdgridError(f"{label} must hold numbers, got dtype {array.dtype}")
    expected = tuple(int(n) for n in shape)
    if array.shape != expected:
        raise CcdgridError(f"{label} has shape {array.shape}, but the image has shape {expected}")
    return np.ascontiguousarray(array != 0)


def _split_source(source):
    if not isinstance(source, (str, os.PathLike)):
        raise CcdgridError(f"`source` must be a file path, got {type(source).__name__}")
    text = os.fspath(source)
    dataset = None
    if "::" in text:
        text, dataset = text.split("::", 1)
        if not dataset:
            raise CcdgridError(f"empty HDF5 dataset path after '::' in {source!r}")
    return pathlib.Path(text).expanduser().absolute(), dataset


class SeveralFramesError(CcdgridError):
    """A file of several frames read without choosing one (``label``, ``nframes``)."""

    def __init__(self, label, nframes):
        super().__init__(
            f"{label} holds {nframes} frames: choose one with frame= (--frame on the command line)"
        )
        self.label, self.nframes = str(label), int(nframes)


# The least side of a frame a 3-D array's last axis may be (less: colour channels)
_MIN_FRAME_SIDE = 8


def refuse_colour(shape, label):
    """Raise a CcdgridError if an array of ``shape`` is a colour image (h, w, 3 or 4)."""
    if len(shape) == 3 and shape[2] in (3, 4) and min(shape[:2]) >= _MIN_FRAME_SIDE:
        # frames 3 or 4 px wide hold no grid: the last axis is a colour's
        raise CcdgridError(
            f"{label} holds a colour image ({shape[0]} x {shape[1]} pixels, "
            f"{shape[2]} channels), not a detector's intensity image: give the "
            "detector's own image"
        )


def _frame_index(nframes, frame, label):
    """Index of the frame to read among ``nframes``, or a CcdgridError."""
    if nframes == 0:
        raise CcdgridError(f"{label} holds no frame (empty stack)")
    if frame is None:
        if nframes == 1:
            return 0
        raise SeveralFramesError(label, nframes)
    if frame >= nframes:
        raise CcdgridError(f"frame {frame} requested but {label} holds {nframes} frame(s)")
    return int(frame)


def _select_frame(data, frame, label):
    """Reduce a 2-D or 3-D array (or memory map, or dataset) to one 2-D frame."""
    refuse_colour(data.shape, label)
    if data.ndim == 3:
        return data[_frame_index(data.shape[0], frame, label)]
    if data.ndim == 2:
        _frame_index(1, frame, label)
        return data[()]
    raise CcdgridError(f"{label} holds an array of shape {data.shape}, not a 2-D image")


def _check_image(data, path):
    data = np.asarray(data)
    if data.dtype == object or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise CcdgridError(f"{path} does not hold numbers (dtype {data.dtype})")
    if np.issubdtype(data.dtype, np.complexfloating):
        raise CcdgridError(f"{path} holds complex numbers, not an intensity image")
    if data.ndim != 2:
        raise CcdgridError(f"{path} holds an array of shape {data.shape}, not a 2-D image")
    if data.size == 0:
        raise CcdgridError(f"{path} holds an empty image (shape {data.shape})")
    return np.ascontiguousarray(data)


def _read_npy(path, frame):
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CcdgridError(f"cannot read {path} as a .npy array: {exc}") from exc
    if not isinstance(data, np.ndarray):
        raise CcdgridError(f"{path} does not hold a single array")
    # np.array copies out of the memory map, reading only the chosen frame
    return np.array(_select_frame(data, frame, path))


def _read_hdf5(path, dataset, frame):
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise CcdgridError(f"cannot open {path} as an HDF5 file: {exc}") from exc
    with handle:
        if dataset is None:
            dataset = _only_image_dataset(handle, path)
        node = handle.get(dataset)
        if node is None:
            raise CcdgridError(f"{path} has no dataset {dataset!r}")
        if not isinstance(node, h5py.Dataset):
            raise CcdgridError(f"{path}::{dataset} is a group, not a dataset")
        # an h5py dataset slices like an array: only the chosen frame is read
        data = _select_frame(node, frame, f"{path}::{dataset}")
    return data, dataset, "hdf5"


def _only_image_dataset(handle, path):
    import h5py

    found = []

    def visit(name, node):
        if (
            isinstance(node, h5py.Dataset)
            and node.ndim in (2, 3)
            and node.size > 0
            and (np.issubdtype(node.dtype, np.number) or node.dtype == bool)
        ):
            found.append("/" + name)

    handle.visititems(visit)
    if len(found) == 1:
        return found[0]
    if not found:
        raise CcdgridError(f"{path} holds no 2-D or 3-D numeric dataset")
    listed = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    raise CcdgridError(
        f"{path} holds {len(found)} image datasets ({listed}): name one as {path.name}::/path"
    )


@contextlib.contextmanager
def _logs_held_back(name):
    """Hold back the records below CRITICAL of logger ``name`` (and its children)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_fabio(path, frame):
    import fabio

    try:
        # fabio logs what it finds wrong (a truncated EDF, as it reads the
        # data) before the error ccdgrid gives: a second line, in another voice
        with _logs_held_back("fabio"):
            image = fabio.open(str(path))
            fmt = type(image).__name__
            nframes = int(getattr(image, "nframes", 1) or 1)
            if nframes > 1:
                image = image.getframe(_frame_index(nframes, frame, path))
                frame = None
            data = image.data
            # fabio fills the missing tail of a truncated EDF with zeros and only logs it
            truncated = bool(getattr(image, "incomplete_file", False)) or bool(
                getattr(image, "incomplete_data", False)
            )
    except CcdgridError:
        raise
    except Exception as exc:  # fabio raises many types (OSError, ValueError, KeyError, ...)
        raise CcdgridError(f"cannot read {path} as an image: {exc}") from exc
    if data is None:
        raise CcdgridError(f"cannot read {path} as an image: no data in the file")
    if truncated:
        raise CcdgridError(
            f"{path} is truncated: its data end before the image its header describes "
            f"(an interrupted copy or write?)"
        )
    return _select_frame(np.asarray(data), frame, path), fmt
