"""The detector definition file: HDF5 that pyFAI loads, plus ccdgrid's record.

Layout (NeXus, as ``pyFAI.detector_factory(path)`` expects it)::

    /                      NX_class=NXroot, default="entry", creator="ccdgrid <version>"
    /entry                 NX_class=NXentry; start_time, end_time, program_name
    /entry/pyFAI           NX_class=NXsubentry
    /entry/pyFAI/<name>    NX_class=NXdetector: what pyFAI reads
        API_VERSION "1.2", CORNERS 4, IS_FLAT, IS_CONTIGUOUS, orientation 3,
        pixel_size [pixel1, pixel2] (m), max_shape, shape (ny, nx),
        pixel_corners (ny, nx, 4, 3) float32 m, mask (ny, nx) int8 (1 = invalid)
    /entry/ccdgrid         NX_class=NXcollection: ccdgrid's own record
        dx, dy (ny + 1, nx + 1) float32 px, mask (hard link to the one above),
        holes/ (peaks, indices, valid: every hole found), grid/ (origin,
        vectors, pixel_size, P and, per fitted hole, indices, ideal,
        displacement, residuals; fit figures as attributes), pitch (m);
        attributes: version, created, parameters (JSON), source (JSON: input
        file path and sha256), summary

pyFAI's ``find_detector`` only descends into ``NXsubentry``/``NXinstrument``
children of an ``NXentry``, so the ``NXcollection`` is invisible to it.

The corner array is the bulk of the file (805 MB as float32 at 4096²). It is
never built whole: it is computed in blocks of rows and each block is
compressed (byte shuffle + deflate, which every HDF5 reader decodes) in a small
thread pool while the main thread writes the finished chunks. The deflate
stream of a chunk is made byte plane by byte plane, so that the nearly random
low byte of the float32 values can be stored rather than deflated at the
default level (see :func:`_deflate_planes`). Its ``z``
component is zero for a flat detector; those chunks are never written and
read back as the dataset's fill value, 0. The file is written under a
temporary name in the target directory and moved into place with
:func:`os.replace`, so a failed save leaves no partial file and an existing
file is either fully replaced or untouched.
"""

import datetime
import functools
import json
import math
import numbers
import os
import pathlib
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ._ext._config import clear_upper_vector_state
from ._h5read import read_chunked
from ._h5write import aligned_empty, atomic_h5
from .errors import CcdgridError

__all__ = ["CORNER_CONVENTION", "DetectorRecord", "load", "save_detector"]

CORNER_CONVENTION = (
    "corner map on the (ny + 1, nx + 1) pixel-corner grid; corner (i, j) is at index "
    "coordinates (i - 0.5, j - 0.5), i.e. at pyFAI's (pixel1 * i, pixel2 * j); the true "
    "position of a corner is its nominal position plus (dy, dx) pixels "
    "(pyFAI Detector.set_dx/set_dy convention)"
)
FORMAT_VERSION = 1
_ENTRY = "entry"
_RECORD = "ccdgrid"
_CHUNK_BYTES = 1 << 20
# zlib stream header: deflate, 32 KiB window, "fastest" hint; (0x78 * 256 + 0x01) % 31 == 0
_ZLIB_HEADER = b"\x78\x01"
_FAST_LEVEL = 2  # zlib levels that store the low byte plane of float32 chunks
# what is recorded of `calibration.grid` (when present): arrays, then scalars
_GRID_ARRAYS = {
    "P": np.float64,
    "origin": np.float64,
    "vectors": np.float64,
    "pixel_size": np.float64,
    "indices": np.int64,
    "ideal": np.float64,
    "displacement": np.float64,
    "residuals": np.float64,
}
_GRID_SCALARS = ("pitch", "residual_rms", "residual_max", "rms_lsq", "rms_seed", "method_used")
_CONTIGUITY_TOLERANCE = 1e-3  # px; float32 corners agree to ~1e-7 relative when shared


@dataclass(frozen=True)
class DetectorRecord:
    """What a detector file holds, as returned by :func:`load`.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    name : str
        Name of the NXdetector group (pyFAI shows it with ``_`` as spaces).
    shape : tuple of 2 int
        ``(ny, nx)`` pixels.
    pixel_size : tuple of 2 float
        ``(pixel1, pixel2)`` = (y, x) pixel size in metres.
    dx, dy : ndarray of shape (ny + 1, nx + 1), float32, px
        Corner displacement maps (see :data:`CORNER_CONVENTION`). For a plain
        pyFAI file they are recovered from ``pixel_corners`` (about 1e-7
        relative precision of the float32 corners, i.e. ~2e-4 px at 2048 px).
    mask : ndarray of shape (ny, nx), int8
        1 = invalid pixel (pyFAI's convention); zeros if the file has none.
    grid : dict
        The fitted grid, whichever of these were recorded: ``origin`` (2,)
        and ``vectors`` (2, 2) in (y, x) px, ``pixel_size`` (2,) m, ``P``
        (tutorial order), and for the N fitted holes ``indices`` (N, 2)
        int64, ``ideal`` and ``displacement`` (``ideal - measured``) and
        ``residuals`` (N, 2) px; scalars such as ``residual_rms`` (px) and
        ``method_used``; ``frame`` (dict: ``centre`` (y, x) px, ...) when the
        lattice is the plate's seen there (:func:`ccdgrid.gridfit.centred_grid`;
        files of ccdgrid 0.1.0 before it have none). Empty for a plain pyFAI
        file.
    peaks : ndarray of shape (M, 2), float64, or None
        Every hole centre found, ``(y, x)`` px.
    indices : ndarray of shape (M, 2), int64, or None
        Their lattice indices.
    valid : ndarray of shape (M,), bool, or None
        Holes used in the grid fit (``peaks[valid]`` pairs with
        ``grid["displacement"]``).
    pitch : float or None
        Hole pitch of the grid plate, metres.
    params : dict
        Parameters of the calibration run (from JSON).
    source : dict or None
        The input image: ``"path"``, ``"sha256"``, ... as recorded.
    version : str or None
        ccdgrid version that wrote the file; None for a plain pyFAI file.
    created : str or None
        ISO 8601 creation time.
    summary : str or None
        The calibration's text summary, if recorded.
    """

    path: pathlib.Path
    name: str
    shape: tuple
    pixel_size: tuple
    dx: np.ndarray = field(repr=False)
    dy: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    grid: dict = field(default_factory=dict, repr=False)
    peaks: np.ndarray | None = field(default=None, repr=False)
    indices: np.ndarray | None = field(default=None, repr=False)
    valid: np.ndarray | None = field(default=None, repr=False)
    pitch: float | None = None
    params: dict = field(default_factory=dict, repr=False)
    source: dict | None = field(default=None, repr=False)
    version: str | None = None
    created: str | None = None
    summary: str | None = field(default=None, repr=False)

    @property
    def is_ccdgrid(self):
        """True if ccdgrid wrote the file (False for a plain pyFAI detector file)."""
        return self.version is not None


# -- saving ------------------------------------------------------------------


def save_detector(
    path, calibration, *, name="ccdgrid", compression_level=2, workers=None, backend="cython"
):
    """Write a calibration as a detector file that pyFAI loads.

    Parameters
    ----------
    path : str or os.PathLike
        Output file. An existing file is replaced as a whole (never appended
        to, unlike pyFAI's ``Detector.save``); on failure it is left untouched
        and no partial file remains.
    calibration : object
        Anything with these attributes (duck typing; ccdgrid's
        :class:`~ccdgrid.pipeline.Calibration` has them all):

        Required
            ``dx``, ``dy`` : array_like of shape (ny + 1, nx + 1), px
                Corner displacement maps (see :data:`CORNER_CONVENTION`),
                finite; stored as float32, and the corners are computed from
                the float32 values so the two agree exactly.
            ``pixel_size`` : pair of float
                ``(pixel1, pixel2)`` in metres, > 0.
            ``mask`` : array_like of shape (ny, nx) or None
                Non-zero = invalid pixel. None writes an all-valid mask
                (pyFAI's ``Distortion`` fails on a detector without one).
        Optional (recorded when present and not None)
            ``shape`` : checked against the maps; ``grid`` with any of
            ``origin``, ``vectors``, ``pixel_size``, ``P``, ``indices``,
            ``ideal``, ``displacement``, ``residuals`` (arrays) and
            ``pitch``, ``residual_rms``, ``residual_max``, ``rms_lsq``,
            ``rms_seed``, ``method_used`` (scalars); ``holes.peaks``;
            ``lattice.indices`` and ``lattice.valid``; ``pitch`` (m);
            ``params`` (dict, stored as JSON); ``source`` (dict, e.g.
            :func:`ccdgrid.io.read_image`'s ``info``); ``summary()`` (str).
    name : str
        Name of the NXdetector group; pyFAI shows it with ``_`` as spaces.
    compression_level : int
        Deflate level 0-9 of the large datasets (after a byte shuffle); 0
        stores them uncompressed. At the fast levels 1 and 2 (default) the
        least significant byte plane of the float32 chunks, close to noise,
        is stored as is and the three others are deflated; levels >= 3
        deflate every plane. When python-isal is installed
        (``ccdgrid[fast]``) its ISA-L deflate replaces zlib, at level
        ``min(compression_level, 2)``. Every HDF5 reader inflates all of
        these the same way. Measured at 2048² (``benchmarks/save.py``,
        2 cores), the whole file: level 2 with zlib 0.8 s CPU and 57 MB,
        with ISA-L ~0.3 s CPU and ~57 MB; level 3 with zlib 1.7 s and
        46 MB; level 0 0.26 s and 174 MB (the corners alone are 134 MB
        raw, plus the all-zero z plane, which is never written).
    workers : int or None
        Threads compressing chunks; None = up to 4, no more than the CPUs
        this process may use.
    backend : {"cython", "numpy"}
        Engine that lays out the corner chunks' byte planes (the compiled
        kernel, or its numpy twin); the file is the same byte for byte.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    CcdgridError
        If an attribute is missing or inconsistent (the message names it),
        or the target directory does not exist.
    OSError
        If the file cannot be written (a full disk in one line naming the
        target); no file, temporary or partial, is left behind.

    Examples
    --------
    >>> cal = ccdgrid.calibrate(image, pitch=5e-3)  # doctest: +SKIP
    >>> save_detector("frelon.h5", cal)  # doctest: +SKIP
    >>> pyFAI.detector_factory("frelon.h5").get_pixel_corners().shape  # doctest: +SKIP
    (2048, 2048, 4, 3)
    """

    from . import __version__

    target = pathlib.Path(path).expanduser().absolute()
    if target.is_dir():
        raise CcdgridError(f"cannot write the detector file {target}: it is a directory")
    if not target.parent.is_dir():
        raise CcdgridError(
            f"cannot write the detector file {target}: directory {target.parent} does not exist"
        )
    if not _valid_group_name(name):
        raise CcdgridError(f"`name` must be a non-empty name without '/', got {name!r}")
    if (
        isinstance(compression_level, bool)
        or not isinstance(compression_level, (int, np.integer))
        or not 0 <= compression_level <= 9
    ):
        raise CcdgridError(
            f"`compression_level` must be an int in 0..9, got {compression_level!r}"
        )
    workers = _resolve_workers(workers)
    engine = _planes_engine(backend)
    content = _collect(calibration)

    with atomic_h5(target, "the detector file", direct=True) as h5:
        _write(h5, content, name, int(compression_level), workers, __version__, engine)
    return target


def _planes_engine(backend):
    """The module whose ``corner_planes`` builds the corner chunks for ``backend``."""
    from ._validation import check_backend

    if check_backend(backend) == "numpy":
        from ._reference import corner_planes
    else:
        from ._ext import _corner_planes as corner_planes
    return corner_planes


def _valid_group_name(name):
    """True if ``name`` can be an HDF5 group name (non-empty, no '/', not '.' or '..')."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _collect(cal):
    """Validate the duck-typed calibration and return plain arrays and values."""
    for attr in ("dx", "dy", "pixel_size", "mask"):
        if not hasattr(cal, attr):
            raise CcdgridError(f"`calibration` has no attribute {attr!r}")
    dx = _corner_map(cal.dx, "calibration.dx")
    dy = _corner_map(cal.dy, "calibration.dy")
    if dx.shape != dy.shape:
        raise CcdgridError(
            f"`calibration.dx` and `calibration.dy` differ in shape: {dx.shape} vs {dy.shape}"
        )
    shape = (dx.shape[0] - 1, dx.shape[1] - 1)
    declared = getattr(cal, "shape", None)
    if declared is not None and tuple(int(n) for n in declared) != shape:
        raise CcdgridError(
            f"`calibration.shape` is {tuple(declared)} but the corner maps have shape "
            f"{dx.shape}, i.e. an image of {shape}"
        )
    pixel_size = _pixel_size(cal.pixel_size, "calibration.pixel_size")
    if cal.mask is None:
        mask = np.zeros(shape, dtype=np.int8)
    else:
        mask = np.asarray(cal.mask)
        if mask.shape != shape:
            raise CcdgridError(f"`calibration.mask` must have shape {shape}, got {mask.shape}")
        mask = np.ascontiguousarray(mask != 0, dtype=np.int8)

    grid_obj = getattr(cal, "grid", None)
    grid, grid_scalars = {}, {}
    for key, dtype in _GRID_ARRAYS.items():
        value = getattr(grid_obj, key, None)
        if value is not None:
            grid[key] = _numeric(value, f"calibration.grid.{key}", dtype)
    for key in _GRID_SCALARS:
        value = getattr(grid_obj, key, None)
        if isinstance(value, (numbers.Real, np.number)) and not isinstance(value, bool):
            grid_scalars[key] = float(value)
        elif value is not None:
            grid_scalars[key] = str(value)
    frame = getattr(grid_obj, "frame", None)
    if isinstance(frame, dict):
        grid_scalars["frame"] = _json(frame)
    holes = {}
    for owner, key, dtype in (("holes", "peaks", np.float64), ("lattice", "indices", np.int64)):
        value = getattr(getattr(cal, owner, None), key, None)
        if value is not None:
            holes[key] = _numeric(value, f"calibration.{owner}.{key}", dtype)
    valid = getattr(getattr(cal, "lattice", None), "valid", None)
    if valid is not None:
        holes["valid"] = np.asarray(valid, dtype=bool)

    pitch = getattr(cal, "pitch", None)
    if pitch is not None:
        pitch = float(pitch)
        if not math.isfinite(pitch) or pitch <= 0:
            raise CcdgridError(f"`calibration.pitch` must be a positive length in m, got {pitch}")
    params = getattr(cal, "params", None) or {}
    if not isinstance(params, dict):
        raise CcdgridError(f"`calibration.params` must be a dict, got {type(params).__name__}")
    source = getattr(cal, "source", None)
    if source is not None and not isinstance(source, dict):
        raise CcdgridError(f"`calibration.source` must be a dict or None, got {source!r}")
    summary = getattr(cal, "summary", None)
    summary = summary() if callable(summary) else summary
    return {
        "dx": dx,
        "dy": dy,
        "shape": shape,
        "pixel_size": pixel_size,
        "mask": mask,
        "grid": grid,
        "grid_scalars": grid_scalars,
        "holes": holes,
        "pitch": pitch,
        "params": params,
        "source": source,
        "summary": None if summary is None else str(summary),
    }


def _corner_map(value, label):
    arr = np.asarray(value)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise CcdgridError(f"`{label}` must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise CcdgridError(
            f"`{label}` must be a corner map of shape (ny + 1, nx + 1), got {arr.shape}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        count = np.count_nonzero(~np.isfinite(arr))
        raise CcdgridError(f"`{label}` holds {count} non-finite values (NaN or inf)")
    return arr


def _pixel_size(value, label):
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        message = f"`{label}` must be (pixel1, pixel2) in metres, got {value!r}"
        raise CcdgridError(message) from None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise CcdgridError(f"`{label}` must be two positive lengths in metres, got {value!r}")
    return pair


def _numeric(value, label, dtype):
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise CcdgridError(f"`{label}` must be numeric, got {value!r}") from None


def _resolve_workers(workers):
    if workers is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, min(4, cpus))
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise CcdgridError(f"`workers` must be a positive int or None, got {workers!r}")
    return int(workers)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json(obj):
    return json.dumps(obj, default=_json_default, sort_keys=True)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (pathlib.PurePath, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def _write(h5, c, name, level, workers, version, engine):
    ny, nx = c["shape"]
    now = _now()
    h5.attrs["NX_class"] = "NXroot"
    h5.attrs["default"] = _ENTRY
    h5.attrs["creator"] = f"ccdgrid {version}"
    h5.attrs["file_time"] = now
    entry = h5.create_group(_ENTRY)
    entry.attrs["NX_class"] = "NXentry"
    entry["start_time"] = now
    entry["program_name"] = "ccdgrid"
    entry["program_name"].attrs["version"] = version
    entry["title"] = "detector distortion calibration from a grid-of-holes image"
    sub = entry.create_group("pyFAI")
    sub.attrs["NX_class"] = "NXsubentry"
    det = sub.create_group(name)
    det.attrs["NX_class"] = "NXdetector"
    det["API_VERSION"] = np.bytes_("1.2")
    det["CORNERS"] = np.int64(4)
    det["IS_FLAT"] = True
    det["IS_CONTIGUOUS"] = True
    det["orientation"] = np.int32(3)
    det["orientation"].attrs["value"] = "BottomRight"
    det["binning"] = np.array([1, 1], dtype=np.int32)
    det["force_pixel"] = False
    det["pixel_size"] = np.array(c["pixel_size"], dtype=np.float64)
    det["pixel_size"].attrs["unit"] = "m"
    det["max_shape"] = np.array(c["shape"], dtype=np.int32)
    det["shape"] = np.array(c["shape"], dtype=np.int32)
    mask = det.create_dataset(
        "mask",
        data=c["mask"],
        chunks=_row_chunks(c["shape"], 1),
        compression="gzip",
        compression_opts=level,
        shuffle=True,
    )
    mask.attrs["interpretation"] = "image"
    rows = _chunk_rows(nx * 4 * 4, ny)
    corners = det.create_dataset(
        "pixel_corners",
        shape=(ny, nx, 4, 3),
        dtype="<f4",  # _CornerPlane builds little-endian bytes
        chunks=(rows, nx, 4, 1),
        compression="gzip",
        compression_opts=level,
        shuffle=True,
        fillvalue=np.float32(0),
    )
    corners.attrs["interpretation"] = "vertex"
    corners.attrs["unit"] = "m"

    rec = entry.create_group(_RECORD)
    rec.attrs["NX_class"] = "NXcollection"
    rec.attrs["program"] = "ccdgrid"
    rec.attrs["version"] = version
    rec.attrs["format_version"] = FORMAT_VERSION
    rec.attrs["created"] = now
    rec.attrs["parameters"] = _json(c["params"])
    rec.attrs["source"] = _json(c["source"])
    if c["summary"] is not None:
        rec.attrs["summary"] = c["summary"]
    maps = {}
    for key in ("dx", "dy"):
        maps[key] = rec.create_dataset(
            key,
            shape=c[key].shape,
            dtype=np.float32,
            chunks=_row_chunks(c[key].shape, 4),
            compression="gzip",
            compression_opts=level,
            shuffle=True,
        )
        maps[key].attrs["unit"] = "pixel"
        maps[key].attrs["convention"] = CORNER_CONVENTION
    rec["mask"] = mask  # a hard link: one copy in the file, two names
    if c["pitch"] is not None:
        rec["pitch"] = c["pitch"]
        rec["pitch"].attrs["unit"] = "m"
    if c["grid"] or c["grid_scalars"]:
        grid = rec.create_group("grid")
        grid.attrs["NX_class"] = "NXcollection"
        grid.attrs["convention"] = (
            "origin, vectors, ideal, displacement, residuals in (y, x) px, index coordinates "
            "(centre of pixel (i, j) at (i, j)); displacement = ideal - measured, per fitted "
            "hole (indices); pixel_size (pixel1, pixel2) in m; P = (Ox, Oy, Xx, Yx, Xy, Yy) in "
            "(x, y) order, pixel_xy = R . hole_xy + (Ox, Oy), R = [[Xx, Yx], [Xy, Yy]]; frame "
            "(JSON): the lattice is the square plate's as seen at frame.centre (no displacement "
            "there, and no displacement gradient but the frame.shear_deg the holes show, which "
            "is distortion; see ccdgrid.gridfit.centred_grid)"
        )
        for key, value in c["grid"].items():
            grid[key] = value
        for key, value in c["grid_scalars"].items():
            grid.attrs[key] = value
    if c["holes"]:
        holes = rec.create_group("holes")
        holes.attrs["NX_class"] = "NXcollection"
        holes.attrs["convention"] = (
            "every hole found: peaks (y, x) px in index coordinates, lattice indices (i, j), "
            "valid = used in the grid fit"
        )
        for key, value in c["holes"].items():
            holes[key] = value

    tasks = _corner_tasks(c["dy"], c["dx"], c["pixel_size"], rows, engine)
    for key in ("dx", "dy"):
        tasks += _map_tasks(c[key], maps[key].chunks, key)
    datasets = {"corners": corners, "dx": maps["dx"], "dy": maps["dy"]}
    _write_chunks(datasets, tasks, _compressor(level), workers)
    entry["end_time"] = _now()


def _chunk_rows(row_bytes, nrows):
    return int(max(1, min(nrows, _CHUNK_BYTES // max(1, row_bytes))))


def _row_chunks(shape, itemsize):
    return (_chunk_rows(shape[1] * itemsize, shape[0]), shape[1])


def _corner_tasks(dy, dx, pixel_size, rows, engine):
    """Chunk jobs for pixel_corners: (dataset key, chunk offset, function -> chunk array)."""
    ny = dy.shape[0] - 1
    pixel1, pixel2 = pixel_size
    tasks = []
    for i0 in range(0, ny, rows):
        i1 = min(i0 + rows, ny)
        for axis, corner_map, pixel in ((0, dy, pixel1), (1, dx, pixel2)):
            plane = _CornerPlane(corner_map, pixel, i0, i1, rows, axis, engine)
            tasks.append(("corners", (i0, 0, 0, axis + 1), plane))
    return tasks


class _CornerPlane:
    """One chunk of pixel_corners, the y (axis 0) or x (axis 1) metres of rows i0..i1, shuffled.

    The arithmetic is that of pyFAI's corner-shaped ``set_dy``/``set_dx``:
    ``pixel1 * (dy + i)`` and ``pixel2 * (dx + j)`` in float64, rounded to
    float32, so the file equals pyFAI's own detector bit for bit.

    Calling it returns what HDF5's shuffle filter makes of the chunk
    ``(rows, nx, 4, 1)`` of little-endian float32: a uint8 array of shape
    (4, rows * nx * 4), byte plane ``b`` holding byte ``b`` of the corners A,
    B, C, D of each pixel in turn. ``engine`` builds it from the
    (rows + 1, nx + 1) corner grid without materialising the float32 chunk:
    the compiled kernel in one pass (~0.02 s of CPU per 2048² file), its
    numpy twin with whole-array shifts and ors (~0.1-0.15 s, and ~30 passes
    over block-sized arrays; see ``benchmarks/save.py``).
    """

    def __init__(self, corner_map, pixel, i0, i1, rows, axis, engine):
        self.corner_map, self.pixel = corner_map, pixel
        self.i0, self.i1, self.rows, self.axis = i0, i1, rows, axis
        self.engine = engine

    def __call__(self):
        nx = self.corner_map.shape[1] - 1
        planes = np.empty((4, self.rows * nx * 4), dtype=np.uint8)
        self.engine.corner_planes(
            self.corner_map, float(self.pixel), self.i0, self.i1, self.axis, planes
        )
        return planes


def _map_tasks(corner_map, chunks, key):
    rows = chunks[0]
    tasks = []
    for i0 in range(0, corner_map.shape[0], rows):
        tasks.append((key, (i0, 0), _MapChunk(corner_map, i0, rows)))
    return tasks


class _MapChunk:
    def __init__(self, corner_map, i0, rows):
        self.corner_map, self.i0, self.rows = corner_map, i0, rows

    def __call__(self):
        part = self.corner_map[self.i0 : self.i0 + self.rows]
        if part.shape[0] < self.rows:
            padded = np.zeros((self.rows, part.shape[1]), dtype=part.dtype)
            padded[: part.shape[0]] = part
            part = padded
        return _shuffle(part)


def _compressor(level):
    """A function (make_planes) -> bytes: what HDF5's deflate filter makes of a shuffled chunk.

    Deflate byte plane by byte plane (see :func:`_deflate_planes`) with
    ISA-L when python-isal is installed, at level ``min(level, 2)``, else
    with zlib at ``level``. Both release the GIL while compressing, so the
    pool's threads run in parallel.
    """
    if level == 0:
        return functools.partial(_deflate_planes, level=0, store_low=False, engine=zlib)
    store_low = level <= _FAST_LEVEL
    try:
        from isal import isal_zlib
    except ImportError:
        return functools.partial(_deflate_planes, level=level, store_low=store_low, engine=zlib)
    return functools.partial(
        _deflate_planes, level=min(level, 2), store_low=store_low, engine=isal_zlib
    )


def _shuffle(chunk):
    """HDF5's shuffle filter: byte k of every element, for k = 0 .. itemsize - 1.

    Returns a C-contiguous uint8 array of shape (itemsize, chunk.size).
    """
    chunk = np.ascontiguousarray(chunk)
    return np.ascontiguousarray(chunk.view(np.uint8).reshape(-1, chunk.itemsize).T)


def _deflate_planes(make_planes, level, store_low, engine):
    """Deflate each byte plane of a shuffled chunk with its own settings into one zlib stream.

    The shuffled chunk is the concatenation of its byte planes, and a raw
    deflate stream may be cut into independently compressed pieces: every
    piece but the last ends with a sync flush (byte aligned, no final-block
    bit) and no piece refers back into another. Behind a zlib header and the
    Adler-32 of all planes it is an ordinary zlib stream, which HDF5's
    deflate filter (any reader) inflates.

    Why: the least significant byte of a float32 corner in metres is close
    to noise. At 2048² zlib spends about 2/3 of its time on that plane to
    save ~40 % of it (34 -> 20 MB), while the three other planes fall from
    100 MB to 5 MB; ISA-L spends half of its time there. So when
    ``store_low`` is true (the fast levels 1 and 2) that plane is stored as
    is (deflate level 0).

    Parameters
    ----------
    make_planes : callable
        Returns the shuffled chunk, uint8 of shape (itemsize, n).
    level : int
        Deflate level of the planes (all of them stored if 0).
    store_low : bool
        Store plane 0 (the least significant byte) instead of deflating it.
    engine : module
        ``zlib`` or ``isal.isal_zlib`` (the same ``compressobj`` and
        ``adler32`` interface).
    """
    planes = make_planes()
    if level == 0:
        return zlib.compress(planes, 0)
    last = len(planes) - 1
    pieces = [_ZLIB_HEADER]
    adler = 1
    for k, plane in enumerate(planes):
        if k == 0 and last > 0 and store_low:
            deflate = zlib.compressobj(0, zlib.DEFLATED, -zlib.MAX_WBITS)
        else:
            deflate = engine.compressobj(level, engine.DEFLATED, -zlib.MAX_WBITS)
        pieces.append(deflate.compress(plane))
        pieces.append(deflate.flush(zlib.Z_FINISH if k == last else zlib.Z_SYNC_FLUSH))
        adler = engine.adler32(plane, adler)  # ISA-L's is ~4x faster than zlib's
    # ISA-L's AVX-512 code leaves the vector state dirty: the next chunk's
    # planes (an SSE kernel, on this thread) would be built several times slower
    clear_upper_vector_state()
    pieces.append(adler.to_bytes(4, "big"))
    return _joined(pieces)


def _joined(pieces):
    """The concatenation of ``pieces`` (bytes) in a uint8 array on a 4 KiB boundary.

    Such a chunk is written past the page cache (see
    :func:`ccdgrid._h5write.atomic_h5`); the copy costs what ``b"".join``
    did.
    """
    out = aligned_empty((sum(len(p) for p in pieces),), np.uint8)
    pos = 0
    for piece in pieces:
        out[pos : pos + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        pos += len(piece)
    return out


def _write_chunks(datasets, tasks, compress, workers):
    """Compress chunks in ``workers`` threads and write them in order from this thread.

    At most ``2 * workers`` chunks are in flight, so memory stays a few MB
    whatever the image size. Only this thread touches HDF5.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        try:
            for key, offset, make in tasks:
                pending.append((key, offset, pool.submit(compress, make)))
                if len(pending) >= 2 * workers:
                    key_, offset_, future = pending.popleft()
                    datasets[key_].id.write_direct_chunk(offset_, future.result())
            while pending:
                key_, offset_, future = pending.popleft()
                datasets[key_].id.write_direct_chunk(offset_, future.result())
        except BaseException:
            for *_, future in pending:
                future.cancel()
            raise


# -- loading -----------------------------------------------------------------


def load(path):
    """Read a detector file written by ccdgrid (or a plain pyFAI detector file).

    Parameters
    ----------
    path : str or os.PathLike
        An HDF5 detector file. Files written by pyFAI's ``Detector.save`` are
        accepted too: their ``dx``/``dy`` are recovered from the pixel
        corners (which requires contiguous pixels), and they have no grid,
        holes or parameters.

    Returns
    -------
    DetectorRecord

    Raises
    ------
    CcdgridError
        If the file does not exist, is not HDF5, or holds no detector.

    Examples
    --------
    >>> rec = ccdgrid.load("frelon.h5")  # doctest: +SKIP
    >>> rec.dx.shape, rec.pixel_size  # doctest: +SKIP
    ((2049, 2049), (5.1e-05, 5.1e-05))
    """
    import h5py

    target = pathlib.Path(path).expanduser().absolute()
    if not target.is_file():
        raise CcdgridError(f"detector file not found: {target}")
    try:
        h5 = h5py.File(target, "r")
    except OSError as exc:
        raise CcdgridError(f"{target} is not an HDF5 detector file ({exc})") from exc
    with h5:
        det = _find_detector(h5)
        if det is None:
            raise CcdgridError(
                f"{target} holds no detector definition (no NXentry/NXsubentry/NXdetector group)"
            )
        rec = _find_record(h5)
        try:
            return _read(target, det, rec)
        except KeyError as exc:
            raise CcdgridError(f"{target}: incomplete detector definition ({exc})") from exc


def _attr(node, key, default=None):
    value = node.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _find_detector(h5):
    """The NXdetector group pyFAI would pick: the latest NXentry's first one."""
    import h5py

    entries = []
    for grp in h5.values():
        is_entry = isinstance(grp, h5py.Group) and _attr(grp, "NX_class") == "NXentry"
        if is_entry and "start_time" in grp:
            stamp = grp["start_time"][()]
            stamp = stamp.decode() if isinstance(stamp, bytes) else str(stamp)
            entries.append((stamp[:19], grp))
    # stable sort on the 1-second stamp, latest first, like pyFAI
    entries.sort(key=lambda item: item[0], reverse=True)
    for _, entry in entries:
        for kind in ("NXsubentry", "NXinstrument"):
            for sub in entry.values():
                if isinstance(sub, h5py.Group) and _attr(sub, "NX_class") == kind:
                    for det in sub.values():
                        if isinstance(det, h5py.Group) and _attr(det, "NX_class") == "NXdetector":
                            return det
    return None


def _find_record(h5):
    node = h5.get(f"{_ENTRY}/{_RECORD}")
    if node is not None and _attr(node, "program") == "ccdgrid":
        return node
    return None


def _read(target, det, rec):
    name = det.name.rsplit("/", 1)[-1]
    pixel_size = tuple(float(v) for v in det["pixel_size"][()])
    if "shape" in det:
        shape = tuple(int(v) for v in det["shape"][()])
    elif "max_shape" in det:
        shape = tuple(int(v) for v in det["max_shape"][()])
    else:
        shape = tuple(det["mask"].shape)
    if "mask" in det:
        mask = read_chunked(det["mask"], f"{target}::mask").astype(np.int8, copy=False)
    else:
        mask = np.zeros(shape, np.int8)
    if rec is None:
        dy, dx = _maps_from_corners(det, shape, pixel_size, target)
        return DetectorRecord(
            path=target, name=name, shape=shape, pixel_size=pixel_size, dx=dx, dy=dy, mask=mask
        )
    grid, holes = {}, {}
    if "grid" in rec:
        node = rec["grid"]
        grid = {key: node[key][()] for key in node}
        grid.update(
            (key, _attr(node, key)) for key in node.attrs if key not in ("NX_class", "convention")
        )
        if isinstance(grid.get("frame"), str):
            grid["frame"] = json.loads(grid["frame"])
    if "holes" in rec:
        holes = {key: rec["holes"][key][()] for key in rec["holes"]}
    return DetectorRecord(
        path=target,
        name=name,
        shape=shape,
        pixel_size=pixel_size,
        dx=read_chunked(rec["dx"], f"{target}::dx"),
        dy=read_chunked(rec["dy"], f"{target}::dy"),
        mask=mask,
        grid=grid,
        peaks=holes.get("peaks"),
        indices=holes.get("indices"),
        valid=holes.get("valid"),
        pitch=float(rec["pitch"][()]) if "pitch" in rec else None,
        params=json.loads(_attr(rec, "parameters", "{}")),
        source=json.loads(_attr(rec, "source", "null")),
        version=_attr(rec, "version"),
        created=_attr(rec, "created"),
        summary=_attr(rec, "summary"),
    )


def _maps_from_corners(det, shape, pixel_size, target):
    """Corner maps (dy, dx) in px from a pyFAI detector's pixel_corners (or zeros)."""
    ny, nx = shape
    if "pixel_corners" not in det:
        zeros = np.zeros((ny + 1, nx + 1), dtype=np.float32)
        return zeros, zeros.copy()
    corners = det["pixel_corners"]
    if corners.shape != (ny, nx, 4, 3):
        raise CcdgridError(
            f"{target}: pixel_corners has shape {corners.shape}, expected {(ny, nx, 4, 3)}"
        )
    rows = _chunk_rows(nx * 4 * 4, ny)  # a few MB at a time, never the whole array
    maps = []
    for axis, pixel in ((1, pixel_size[0]), (2, pixel_size[1])):
        grid = np.empty((ny + 1, nx + 1))
        worst = 0.0
        previous = None  # corners (B, C) of the last row of the previous block
        for i0 in range(0, ny, rows):
            c = corners[i0 : i0 + rows, :, :, axis].astype(np.float64) / pixel
            a, b, cc, d = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
            grid[i0 : i0 + len(c), :-1] = a  # A = corner (i, j)
            grid[i0 : i0 + len(c), -1] = d[:, -1]  # D of the last column = corner (i, nx)
            # shared corners must agree, else the pixels overlap or leave gaps
            diffs = [d[:, :-1] - a[:, 1:], cc[:, :-1] - b[:, 1:]]
            diffs += [b[:-1] - a[1:], cc[:-1] - d[1:]]
            if previous is not None:
                diffs += [previous[0] - a[0], previous[1] - d[0]]
            worst = max([worst] + [float(np.abs(x).max()) for x in diffs if x.size])
            previous = (b[-1], cc[-1])
        grid[-1, :-1] = previous[0]  # B of the last row = corner (ny, j)
        grid[-1, -1] = previous[1][-1]  # C of the last pixel = corner (ny, nx)
        if worst > _CONTIGUITY_TOLERANCE:
            raise CcdgridError(
                f"{target}: the pixels are not contiguous (shared corners differ by up to "
                f"{worst:.3g} px), so the file has no corner displacement maps"
            )
        index = np.arange(ny + 1)[:, None] if axis == 1 else np.arange(nx + 1)[None, :]
        maps.append((grid - index).astype(np.float32))
    return maps[0], maps[1]
