"""The frames of a series: which ones, read from where, written to where.

:func:`parse_frames` and :func:`expand_frames` turn a frame selection
(``"0:16"``, ``"0,3,7"``) into frame numbers; ``_specs`` expands the sources
of :func:`ccdgrid.series.calibrate_series` into one ``_Spec`` per frame (a
path and a frame number, what a worker needs to read the frame, never an
image), and ``_assign_outputs`` names every frame's detector file from a
directory or a ``{index}`` pattern.

numpy is imported by the functions that use it, not by this module:
``ccdgrid calibrate --frames`` checks its argument with :func:`parse_frames`
while the command line is parsed, and a series wants BLAS and OpenMP held to
one thread before numpy loads (``ccdgrid.cli._one_thread_per_worker``).
"""

import os
import pathlib
import string
from dataclasses import dataclass

from ._h5write import check_writable
from .errors import CcdgridError

__all__ = ["expand_frames", "parse_frames"]

_OUTPUT_FIELDS = ("index", "frame", "stem")

# -- frame selection -------------------------------------------------------------


def parse_frames(text):
    """Parse a frame selection: ``"0:16"``, ``"0,3,7"``, ``"0:8:2,12"``, ``"all"``.

    Parameters
    ----------
    text : str
        Comma-separated items, each a 0-based frame number or a Python slice
        ``start:stop[:step]`` (ends may be omitted or negative, counted from
        the end of the stack). ``"all"`` (or ``":"``) selects every frame.

    Returns
    -------
    tuple of (int or slice)

    Raises
    ------
    CcdgridError
        If an item is not a number or a slice, or a step is 0.
    """
    if not isinstance(text, str) or not text.strip():
        raise CcdgridError(f"`frames` must be a selection such as '0:16' or '0,3,7', got {text!r}")
    if text.strip().lower() == "all":
        return (slice(None),)
    items = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                bounds = [int(b) if b.strip() else None for b in part.split(":")]
                if len(bounds) > 3 or bounds[2:] == [0]:
                    raise ValueError
                items.append(slice(*bounds))
            else:
                items.append(int(part))
        except ValueError:
            raise CcdgridError(
                f"bad frame selection {part!r} in {text!r}: use numbers (0,3,7) and "
                "slices (0:16, 0:16:2; the end is excluded)"
            ) from None
    return tuple(items)


def expand_frames(selection, nframes):
    """Frame numbers a selection picks among ``nframes``, in the order given.

    Parameters
    ----------
    selection : None, int, slice, str or sequence of (int or slice)
        None selects every frame; a string is parsed by :func:`parse_frames`.
        Negative numbers count from the end.
    nframes : int

    Returns
    -------
    list of int
        May hold numbers ``>= nframes`` when asked for explicitly (reading
        that frame then fails with a message naming the stack size); slices
        are clipped to the stack, as Python's are.
    """
    import numpy as np

    if selection is None:
        return list(range(nframes))
    if isinstance(selection, str):
        selection = parse_frames(selection)
    elif isinstance(selection, (int, np.integer, slice)):
        selection = (selection,)
    out = []
    for item in selection:
        if isinstance(item, slice):
            out.extend(range(*item.indices(nframes)))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            out.append(int(item) + nframes if item < 0 else int(item))
        else:
            raise CcdgridError(f"`frames` items must be ints or slices, got {item!r}")
    return [f for f in out if f >= 0]


def _count_frames(text):
    """Frames a source holds, or None when only a reader can tell (fabio formats).

    Cheap: reads only HDF5 metadata or the ``.npy`` header.
    """
    import numpy as np

    from . import io

    path, dataset = io._split_source(text)
    if not path.is_file():
        raise CcdgridError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    if dataset is not None or suffix in io._HDF5_SUFFIXES:
        import h5py

        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise CcdgridError(f"cannot open {path} as an HDF5 file: {exc}") from exc
        with handle:
            name = dataset if dataset is not None else io._only_image_dataset(handle, path)
            node = handle.get(name)
            if not isinstance(node, h5py.Dataset):
                raise CcdgridError(f"{path} has no dataset {name!r}")
            io.refuse_colour(node.shape, f"{path}::{name}")
            return node.shape[0] if node.ndim == 3 else 1
    if suffix == ".npy":
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CcdgridError(f"cannot read {path} as a .npy array: {exc}") from exc
        io.refuse_colour(data.shape, str(path))
        return data.shape[0] if data.ndim == 3 else 1
    return None


def _fabio_frames(path):
    import fabio

    try:
        return int(getattr(fabio.open(str(path)), "nframes", 1) or 1)
    except Exception as exc:  # fabio raises many types
        raise CcdgridError(f"cannot read {path} as an image: {exc}") from exc


@dataclass
class _Spec:
    """One frame to calibrate, as sent to a worker (small: a path, not an image)."""

    index: int
    file: str  # as given by the user, may hold "::dataset"; or "<array N>"
    frame: int | None
    output: str = ""
    array: object = None  # an in-memory 2-D image (tests, notebooks)
    error: str = ""  # set when the frame cannot even be named (missing file ...)
    attempts: int = 0
    sha256: str | None = None  # of the whole file, hashed once for all its frames


def _specs(sources, frames):
    """Expand sources and a frame selection into one :class:`_Spec` per frame."""
    import numpy as np

    from .io import refuse_colour

    if isinstance(sources, (str, os.PathLike, np.ndarray)):
        sources = [sources]
    try:
        sources = list(sources)
    except TypeError:
        raise CcdgridError(
            f"`sources` must be a path, an array or a list of them, got {type(sources).__name__}"
        ) from None
    if not sources:
        raise CcdgridError("`sources` is empty: give at least one image")
    specs = []
    for n, src in enumerate(sources):
        if isinstance(src, np.ndarray):
            label = f"<array {n}>"
            refuse_colour(src.shape, label)
            if src.ndim == 2:  # one image, whatever the selection
                specs.append(_Spec(len(specs), label, None, array=src))
            elif src.ndim == 3:
                for f in expand_frames(frames, src.shape[0]):
                    if f >= src.shape[0]:
                        err = f"frame {f} requested but the array holds {src.shape[0]} frame(s)"
                        specs.append(_Spec(len(specs), label, f, error=err))
                    else:
                        specs.append(_Spec(len(specs), label, f, array=src[f]))
            else:
                raise CcdgridError(
                    f"`sources[{n}]` must be a 2-D image or a 3-D stack, got shape {src.shape}"
                )
            continue
        if not isinstance(src, (str, os.PathLike)):
            raise CcdgridError(
                f"`sources[{n}]` must be a path or an array, got {type(src).__name__}"
            )
        text = os.fspath(src)
        try:
            count = _count_frames(text)
            if count is None and frames is not None:
                count = _fabio_frames(text.split("::", 1)[0])
        except CcdgridError as exc:
            specs.append(_Spec(len(specs), text, None, error=str(exc)))
            continue
        if count is None or (count == 1 and frames is None):
            # one image (or a fabio file whose reader will say if it holds several)
            specs.append(_Spec(len(specs), text, None))
        else:
            for f in expand_frames(frames, count):
                specs.append(_Spec(len(specs), text, f))
    if not specs:
        # every source is a stack that the selection's slices miss
        raise CcdgridError(f"the frame selection {frames!r} picks no frame of {_counts(sources)}")
    return specs


def _counts(sources):
    """``"scan.h5::/entry/data (6 frames)"``, for the sources of an empty selection."""
    import numpy as np

    names = []
    for n, src in enumerate(sources[:3]):
        if isinstance(src, np.ndarray):
            names.append(f"<array {n}> ({src.shape[0]} frames)")
        else:
            names.append(f"{os.fspath(src)} ({_count_frames(os.fspath(src))} frames)")
    return ", ".join(names) + (", ..." if len(sources) > 3 else "")


# -- output names ------------------------------------------------------------------


def _check_pattern(pattern):
    fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    unknown = sorted(f for f in fields if f.split(".")[0].split("[")[0] not in _OUTPUT_FIELDS)
    if unknown:
        raise CcdgridError(
            f"unknown field {{{unknown[0]}}} in the output name pattern {pattern!r}: "
            "use {index} (position in the series), {frame} (frame in its file) or {stem} "
            "(file name without extension), e.g. out/detector_{index:03d}.h5"
        )
    if not pattern.lower().endswith((".h5", ".hdf5", ".nxs")):
        raise CcdgridError(f"the output name pattern {pattern!r} must end with .h5")


def _assign_outputs(specs, output):
    """Set every spec's detector file from a directory or a ``{field}`` pattern."""
    if output is None:
        return None
    text = os.fspath(output)
    if "{" in text:
        _check_pattern(text)
        directory = None
    else:
        directory = pathlib.Path(text).expanduser().absolute()
        if directory.exists() and not directory.is_dir():
            raise CcdgridError(
                f"the output {directory} is a file: for a series give a directory or a name "
                "pattern such as out/detector_{index:03d}.h5"
            )
    used = {}
    inputs = {
        str(pathlib.Path(s.file.split("::", 1)[0]).expanduser().absolute())
        for s in specs
        if s.array is None
    }
    for s in specs:
        stem = pathlib.Path(s.file.split("::", 1)[0]).stem if s.array is None else "array"
        if s.array is not None:
            stem = f"array{s.file.strip('<>').split()[-1]}"
        frame = -1 if s.frame is None else s.frame
        if directory is None:
            try:
                name = text.format(index=s.index, frame=max(frame, 0), stem=stem)
            except (ValueError, IndexError, KeyError) as exc:
                raise CcdgridError(f"bad output name pattern {text!r}: {exc}") from None
            path = pathlib.Path(name).expanduser().absolute()
        else:
            suffix = "" if s.frame is None else f"_{s.frame:04d}"
            path = directory / f"{stem}{suffix}_detector.h5"
        if str(path) in inputs:
            raise CcdgridError(f"the output file {path} would overwrite an input image")
        if str(path) in used:
            hint = (
                "put {index} in the pattern"
                if directory is None
                else "give a name pattern with {index}"
            )
            raise CcdgridError(
                f"frames {used[str(path)]} and {s.index} would both be written to {path}: {hint}"
            )
        used[str(path)] = s.index
        s.output = str(path)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    # before any frame is calibrated: a read-only directory made every frame
    # fail once calibrated
    for path in used:
        check_writable(path, "the detector file")
    return directory


def _file_of(spec):
    """Absolute path of the file a file-backed spec reads."""
    return str(pathlib.Path(spec.file.partition("::")[0]).expanduser().absolute())
