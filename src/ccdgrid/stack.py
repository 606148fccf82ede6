"""Distortion correction of image stacks larger than memory: on Dask, or streamed from HDF5.

Both paths apply one :class:`~ccdgrid.correction.CorrectionMatrix`, built once,
frame by frame; the result is exactly what ``CorrectionMatrix.apply`` gives on
the whole stack in memory.

* :func:`correct_dask` turns a dask array of frames ``(n, ny, nx)`` into a
  dask array of corrected frames. The matrix (~150 MB at 2048² for a
  few-pixel distortion) is shared by every block task, never copied into
  each: scattered once to the workers of a distributed client, else one
  ``dask.delayed`` key of the graph.
* :func:`correct_hdf5` streams a 3-D HDF5 dataset block by block into a
  chunked, compressed HDF5 dataset (one frame per chunk). Memory is bounded by
  a few blocks, whatever the number of frames. Reading the next block, the
  matrix product (OpenMP) and compression (zlib or ISA-L, in a thread pool)
  overlap: all three release the GIL. The output is written under a
  temporary name beside the target and moved into place with
  :func:`os.replace`, so a failure leaves no half-written file.

Dask is an optional extra: ``pip install "ccdgrid[dask]"``.
"""

import os
import pathlib
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .correction import CorrectionMatrix
from .errors import CcdgridError

__all__ = [
    "StackResult",
    "add_correct_stack_parser",
    "correct_dask",
    "correct_hdf5",
    "run_correct_stack",
]

_DEFAULT_DATASET = "/entry/data"


def _as_matrix(detector_or_matrix, name="detector_or_matrix"):
    """A CorrectionMatrix from itself, a detector file path, or a record with dy, dx, mask."""
    if isinstance(detector_or_matrix, CorrectionMatrix):
        return detector_or_matrix
    detector = detector_or_matrix
    if isinstance(detector, (str, os.PathLike)):
        from .detector_file import load

        detector = load(detector)
    missing = [a for a in ("dy", "dx", "mask") if not hasattr(detector, a)]
    if missing:
        raise CcdgridError(
            f"`{name}` must be a CorrectionMatrix, a detector file path or have dy, dx and "
            f"mask attributes (missing: {', '.join(missing)}); got {type(detector).__name__}"
        )
    return CorrectionMatrix.from_maps(detector.dy, detector.dx, mask=detector.mask)


def _work_dtype(dtype):
    """The dtype CorrectionMatrix.apply returns for input of ``dtype``."""
    import numpy as np

    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _check_real_dtype(dtype, label):
    import numpy as np

    dtype = np.dtype(dtype)
    if (
        dtype.kind == "O"
        or not (np.issubdtype(dtype, np.number) or dtype.kind == "b")
        or np.issubdtype(dtype, np.complexfloating)
    ):
        raise CcdgridError(f"{label} must hold real numbers, got dtype {dtype}")


# -- dask ----------------------------------------------------------------------


def _apply_block(block, matrix, normalize, dummy, nthreads):
    return matrix.apply(block, normalize=normalize, dummy=dummy, nthreads=nthreads)


def _share(matrix, dask):
    """The matrix as one object every block task refers to, never a copy per task.

    On a distributed cluster it is scattered to every worker at once: put in
    the graph instead, it would travel through the scheduler (which warns
    about any graph above 10 MB; the matrix weighs ~150 MB at 2048²).
    """
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # ValueError: no distributed client is running
        client = None
    if client is not None and dask.base.get_scheduler() == client.get:
        return client.scatter(matrix, broadcast=True, hash=False)
    # a fresh key: id() may be reused by a later matrix while a cluster holds the old one
    return dask.delayed(matrix, name=f"correction-matrix-{uuid.uuid4().hex}")


def correct_dask(array, detector_or_matrix, *, normalize=False, dummy=0.0, nthreads=1):
    """Correct a dask array of frames for the distortion, lazily.

    Parameters
    ----------
    array : dask.array.Array of real, shape (n, ny, nx) or (ny, nx)
        Distorted frames, any real dtype. Chunks may split the frame axis
        freely; chunks that split a frame are merged (the correction mixes
        neighbouring rows and columns), so chunk along frames only.
    detector_or_matrix : CorrectionMatrix or str or os.PathLike or object
        The matrix itself (reuse it across calls), a detector file, or any
        object with ``dy``, ``dx`` (corner maps, shape (ny + 1, nx + 1), px)
        and ``mask`` attributes, from which the matrix is built once.
    normalize, dummy
        See :meth:`CorrectionMatrix.apply`.
    nthreads : int
        OpenMP threads per block task. Dask already runs one task per
        worker thread, so the default 1 avoids oversubscribing the cores;
        0 means OpenMP's default.

    Returns
    -------
    dask.array.Array, shape (n,) + ``shape_out`` or ``shape_out``
        The corrected frames, float64 for float64 input, float32 otherwise,
        chunked like ``array`` along frames and whole along the image axes.

    Raises
    ------
    CcdgridError
        If dask is not installed, ``array`` is not a 2-D or 3-D dask array of
        real numbers, or its frames do not have the detector's shape.

    Notes
    -----
    The matrix is shared, never copied into each task. When dask's
    scheduler is a ``distributed`` client, the matrix is scattered to all
    its workers now (``client.scatter(matrix, broadcast=True)``) and
    the graph refers to that future: compute the result on that client.
    Otherwise it is one ``dask.delayed`` key, whatever the number of
    blocks, for the threaded or process schedulers.

    An h5py dataset can be wrapped with ``dask.array.from_array`` for the
    threaded scheduler, but h5py objects cannot be pickled, so worker
    processes must open the file themselves (e.g. one ``dask.delayed`` read
    per block); for a plain file-to-file job :func:`correct_hdf5` is
    simpler and bounded in memory.
    """
    import numpy as np

    try:
        import dask
        import dask.array as da
    except ImportError as exc:
        raise CcdgridError(
            'correct_dask needs dask: install the extra with pip install "ccdgrid[dask]"'
        ) from exc
    if not isinstance(array, da.Array):
        raise CcdgridError(f"`array` must be a dask array, got {type(array).__name__}")
    _check_real_dtype(array.dtype, "`array`")
    matrix = _as_matrix(detector_or_matrix)
    if array.ndim == 2:
        return correct_dask(
            array[None], matrix, normalize=normalize, dummy=dummy, nthreads=nthreads
        )[0]
    if array.ndim != 3 or array.shape[1:] != matrix.shape_in:
        raise CcdgridError(
            f"`array` must have shape (n, *{matrix.shape_in}) or {matrix.shape_in}, "
            f"got {array.shape}"
        )
    if len(array.chunks[1]) > 1 or len(array.chunks[2]) > 1:
        array = array.rechunk({1: -1, 2: -1})
    work = _work_dtype(array.dtype)
    shared = _share(matrix, dask)
    ny, nx = matrix.shape_out
    return da.map_blocks(
        _apply_block,
        array,
        shared,
        bool(normalize),
        float(dummy),
        int(nthreads),
        dtype=work,
        chunks=(array.chunks[0], (ny,), (nx,)),
        meta=np.empty((0, 0, 0), dtype=work),
        name="ccdgrid-correct",
    )


# -- HDF5 streaming ------------------------------------------------------------


@dataclass(frozen=True)
class StackResult:
    """What :func:`correct_hdf5` wrote.

    Attributes
    ----------
    path : pathlib.Path
        The output file.
    dataset : str
        The output dataset inside it.
    shape : tuple of int
        ``(n, ny_out, nx_out)``.
    dtype : numpy.dtype
        float32 (float64 for float64 input).
    seconds : float
        Wall time of the correction, reading and writing included.
    """

    path: pathlib.Path
    dataset: str
    shape: tuple
    dtype: object  # numpy.dtype of the output frames
    seconds: float

    @property
    def frames_per_second(self):
        """Frames corrected per second of wall time."""
        return self.shape[0] / self.seconds if self.seconds > 0 else float("inf")


def _split(target, label, *, default=None):
    if not isinstance(target, (str, os.PathLike)):
        raise CcdgridError(f"`{label}` must be 'file.h5::/dataset', got {type(target).__name__}")
    text = os.fspath(target)
    path, sep, dataset = text.partition("::")
    if not sep:
        if default is None:
            raise CcdgridError(f"`{label}` must name a dataset as 'file.h5::/path', got {text!r}")
        dataset = default
    if not path or not dataset:
        raise CcdgridError(f"`{label}` must be 'file.h5::/path', got {text!r}")
    return pathlib.Path(path).expanduser().absolute(), "/" + dataset.lstrip("/")


def _open_source(path, dataset):
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise CcdgridError(f"cannot open {path} as an HDF5 file: {exc}") from exc
    try:
        node = handle.get(dataset)
        if not isinstance(node, h5py.Dataset):
            what = "no dataset" if node is None else "a group, not a dataset, at"
            raise CcdgridError(f"{path} has {what} {dataset!r}")
        _check_real_dtype(node.dtype, f"{path}::{dataset}")
        if node.ndim != 3:
            raise CcdgridError(
                f"{path}::{dataset} has shape {node.shape}: a stack must be 3-D (n, ny, nx)"
            )
        if node.shape[0] == 0:
            raise CcdgridError(f"{path}::{dataset} holds no frame (shape {node.shape})")
    except BaseException:
        handle.close()
        raise
    return handle, node


def _temporary_sibling(target):
    from .detector_file import _temporary_sibling as make

    return make(target)


class _Progress:
    """tqdm if it is installed, else one self-overwriting line on stderr."""

    def __init__(self, total, enabled, label):
        self.total, self.done, self.label = total, 0, label
        self.bar = None
        self.enabled = enabled
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="frame", desc=label, file=sys.stderr)

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last > 0.5 or self.done == self.total:
                self._last = now
                print(f"\r{self.label}: {self.done}/{self.total} frames", end="", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _check_compression(compression, level):
    import numpy as np

    if compression not in ("gzip", None):
        raise CcdgridError(f"`compression` must be 'gzip' or None, got {compression!r}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 1 <= level <= 9:
        raise CcdgridError(f"`compression_level` must be an int from 1 to 9, got {level!r}")


def _positive_int(value, label):
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CcdgridError(f"`{label}` must be a positive int, got {value!r}")
    return int(value)


def correct_hdf5(src, dst, detector, *, chunk_frames=8, compression="gzip",
                 compression_level=1, normalize=False, dummy=0.0, progress=True,
                 workers=None):  # fmt: skip
    """Correct a 3-D HDF5 stack frame block by frame block into a new HDF5 file.

    Parameters
    ----------
    src : str or os.PathLike
        ``"file.h5::/path/to/dataset"``: a 3-D dataset (n, ny, nx) of real
        numbers, any chunking or compression HDF5 reads.
    dst : str or os.PathLike
        ``"out.h5::/path/to/dataset"`` (``"out.h5"`` alone means
        ``/entry/data``). The file is created, or replaced if it exists; it
        must not be the source file.
    detector : CorrectionMatrix or str or os.PathLike or object
        See :func:`correct_dask`; its pixel shape must be ``(ny, nx)``.
    chunk_frames : int
        Frames read per block (one HDF5 read call; the next block is read
        while this one is corrected, frame by frame). Memory is about two
        input blocks, ``2 * chunk_frames * ny * nx * itemsize`` bytes, plus
        ``2 * workers + 4`` corrected frames and the matrix: at 2048², 8 frames
        of uint16 and 2 workers, a peak of 490 MB raw, 573 MB with deflate
        (process total, matrix build included), whatever the number of frames.
    compression : {"gzip", None}
        Output compression: byte shuffle + deflate (readable by every HDF5
        reader), or none.
    compression_level : int
        Deflate level, 1 (fastest; the default) to 9. ISA-L is used when
        installed (``ccdgrid[fast]``), at most at level 2. Deflating a
        2048² float32 frame costs ~23 ms of CPU with ISA-L but ~330 ms with
        the standard zlib, against ~45 ms for the correction itself: without
        ISA-L, compression sets the pace (about 5x slower than
        ``compression=None`` on 2 cores). Corrected counts compress poorly
        anyway (~80 % of the raw size).
    normalize, dummy
        See :meth:`CorrectionMatrix.apply`.
    progress : bool
        Show a progress bar on stderr (tqdm if installed, else a plain line).
    workers : int or None
        Compression threads; None means the number of CPUs (at most 8).

    Returns
    -------
    StackResult
        The output path, dataset, shape ``(n, ny_out, nx_out)``, dtype
        (float32, or float64 for float64 input) and wall time. The output is
        chunked one frame per chunk.

    Raises
    ------
    CcdgridError
        A source that is not a 3-D real dataset, frames whose shape is not
        the detector's, ``dst`` equal to the source file, bad options.
    OSError
        If a file cannot be read or written. Nothing is left at ``dst``
        (an existing file there is untouched) when anything fails.
    """
    chunk_frames = _positive_int(chunk_frames, "chunk_frames")
    _check_compression(compression, compression_level)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = _positive_int(workers, "workers")
    src_path, src_dataset = _split(src, "src")
    dst_path, dst_dataset = _split(dst, "dst", default=_DEFAULT_DATASET)
    if dst_path == src_path or (dst_path.exists() and os.path.samefile(dst_path, src_path)):
        raise CcdgridError(f"`dst` ({dst_path}) must not be the source file")
    if not dst_path.parent.is_dir():
        raise CcdgridError(f"cannot write {dst_path}: directory {dst_path.parent} does not exist")
    matrix = _as_matrix(detector, "detector")

    import h5py

    start = time.perf_counter()
    handle, source = _open_source(src_path, src_dataset)
    with handle:
        if source.shape[1:] != matrix.shape_in:
            raise CcdgridError(
                f"{src_path}::{src_dataset} holds frames of shape {source.shape[1:]}, but the "
                f"detector's pixel shape is {matrix.shape_in}"
            )
        n = source.shape[0]
        work = _work_dtype(source.dtype)
        shape = (n, *matrix.shape_out)
        tmp = _temporary_sibling(dst_path)
        try:
            with h5py.File(tmp, "w") as out:
                options = {"compression": "gzip", "shuffle": True} if compression else {}
                target = out.create_dataset(
                    dst_dataset, shape=shape, dtype=work, chunks=(1, *matrix.shape_out), **options
                )
                target.attrs["source"] = f"{src_path}::{src_dataset}"
                target.attrs["creator"] = "ccdgrid.stack.correct_hdf5"
                target.attrs["normalize"] = bool(normalize)
                bar = _Progress(n, progress, "correcting")
                try:
                    _stream(source, target, matrix, chunk_frames, compression,
                            compression_level, normalize, dummy, workers, bar)  # fmt: skip
                finally:
                    bar.close()
            os.replace(tmp, dst_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return StackResult(dst_path, dst_dataset, shape, work, time.perf_counter() - start)


def _read_block(source, i0, i1):
    return source[i0:i1]


def _raw(frame):
    import numpy as np

    return np.ascontiguousarray(frame)


def _stream(source, target, matrix, chunk_frames, compression, level, normalize, dummy,
            workers, bar):  # fmt: skip
    """Read block k+1 and write block k-1 while block k is corrected.

    Four stages overlap: a reader thread, this thread's matrix product
    (OpenMP), ``workers`` compression threads and one writer thread that
    writes the finished frames in order, one HDF5 chunk each, bypassing
    HDF5's own (single-threaded) filters. h5py serialises HDF5 calls, so
    reading and writing take turns, but the product and compression run
    meanwhile; all of them release the GIL. At most ``2 * workers + 2``
    corrected frames wait to be written, which bounds memory.
    """
    from .detector_file import _compressor, _shuffle

    n = source.shape[0]
    starts = list(range(0, n, chunk_frames))
    compress = _compressor(level) if compression else None
    in_flight = 2 * workers + 2
    pending = deque()

    def write(index, packed):
        target.id.write_direct_chunk((index, 0, 0), packed.result())

    def retire_oldest():
        pending.popleft().result()
        bar.update(1)

    with (
        ThreadPoolExecutor(1) as reader,
        ThreadPoolExecutor(workers) as packer,
        ThreadPoolExecutor(1) as writer,
    ):
        try:
            ahead = reader.submit(_read_block, source, 0, min(chunk_frames, n)) if n else None
            for k, i0 in enumerate(starts):
                block = ahead.result()
                if k + 1 < len(starts):
                    j0 = starts[k + 1]
                    ahead = reader.submit(_read_block, source, j0, min(j0 + chunk_frames, n))
                for offset, raw in enumerate(block):
                    # frame by frame, so a written frame's memory is freed at once
                    # instead of living until its whole block is written
                    frame = matrix.apply(raw, normalize=normalize, dummy=dummy)
                    if compress is None:
                        packed = packer.submit(_raw, frame)
                    else:
                        packed = packer.submit(compress, lambda f=frame: _shuffle(f))
                    # one writer thread: chunks reach the file in frame order
                    pending.append(writer.submit(write, i0 + offset, packed))
                    while len(pending) > in_flight:
                        retire_oldest()
                del block
            while pending:
                retire_oldest()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


# -- command line --------------------------------------------------------------

_EPILOG = """\
examples:
  ccdgrid correct-stack scan.h5::/entry/data -d detector.h5 -o corrected.h5::/entry/data
  ccdgrid correct-stack scan.h5::/entry/data -d detector.h5 -o corrected.h5 --chunk 16

The output holds float32 frames (float64 for float64 input), one frame per HDF5
chunk, shuffled and deflated (--no-compression to store them raw; deflate is
fast only with ISA-L: pip install "ccdgrid[fast]"). It is written under a
temporary name and moved into place only when complete.
"""


def _positive_argument(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_correct_stack_parser(subparsers, parents=()):
    """Add the ``correct-stack`` subcommand to a ``ccdgrid`` argparse subparsers object.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers()`` returned.
    parents : sequence of argparse.ArgumentParser
        Parent parsers with shared options. Without any, the subcommand
        defines ``--debug`` itself (the command line's ``main`` reads it).

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser; it sets ``args.run = run_correct_stack``.
    """
    import argparse

    parser = subparsers.add_parser(
        "correct-stack",
        parents=list(parents),
        help="correct every frame of an HDF5 stack, streaming, into a new HDF5 file",
        description="Correct the distortion of every frame of a 3-D HDF5 dataset with a\n"
        "detector file, block by block (memory does not grow with the number of frames).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="IN", help="input stack: file.h5::/path/to/dataset")
    parser.add_argument(
        "-d", "--detector", required=True, metavar="FILE", help="detector file (.h5)"
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help=f"output: file.h5::/path (default dataset {_DEFAULT_DATASET})",
    )
    parser.add_argument(
        "--chunk",
        type=_positive_argument,
        default=8,
        metavar="N",
        help="frames per block (default: %(default)s)",
    )
    parser.add_argument(
        "--normalize", action="store_true", help="divide by each output pixel's coverage"
    )
    parser.add_argument(
        "--no-compression", action="store_true", help="store the frames uncompressed"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if not parents:
        parser.add_argument(
            "--debug", action="store_true", help="show the full traceback of an error"
        )
    parser.set_defaults(run=run_correct_stack)
    return parser


def run_correct_stack(args):
    """Run ``ccdgrid correct-stack`` from parsed arguments; print what was written."""
    result = correct_hdf5(
        args.source,
        args.output,
        args.detector,
        chunk_frames=args.chunk,
        compression=None if args.no_compression else "gzip",
        normalize=args.normalize,
        progress=not args.quiet,
    )
    n, ny, nx = result.shape
    print(
        f"wrote {result.path}::{result.dataset}: {n} frames of {ny} x {nx} {result.dtype} "
        f"in {result.seconds:.2f} s ({result.frames_per_second:.1f} frames/s)"
    )
