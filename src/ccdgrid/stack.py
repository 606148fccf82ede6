"""Distortion correction of image stacks larger than memory: on Dask, or streamed from HDF5.

Both paths apply one :class:`~ccdgrid.correction.CorrectionMatrix`, built once,
frame by frame; the result is exactly what ``CorrectionMatrix.apply`` gives on
the whole stack in memory.

* :func:`correct_dask` turns a dask array of frames ``(n, ny, nx)`` into a
  dask array of corrected frames. The matrix (~150 MB at 2048² for a
  few-pixel distortion) is shared by every block task, never copied into
  each: scattered once to the workers of a distributed client, else one
  ``dask.delayed`` key of the graph.
* :func:`correct_hdf5` streams a 3-D HDF5 dataset into a chunked, compressed
  HDF5 dataset (one frame per chunk). Frames are corrected in parallel, one
  thread each: the thread inflates its input chunk (read with
  ``read_direct_chunk``), applies the matrix and deflates the result into
  what HDF5's shuffle + deflate filters would have stored, written with
  ``write_direct_chunk``: the file is a plain gzip dataset. All of that
  releases the GIL. Memory is bounded by a few frames in flight, whatever
  the number of frames, and their buffers serve frame after frame. The
  output is written under a temporary name beside the target and moved
  into place with :func:`os.replace`, so a failure leaves no half-written
  file.

Dask is an optional extra: ``pip install "ccdgrid[dask]"``.
"""

import math
import os
import pathlib
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ._ext._config import clear_upper_vector_state
from ._h5write import aligned_empty, atomic_h5, check_writable
from .correction import CorrectionMatrix, add_frame_argument
from .errors import CcdgridError

__all__ = [
    "StackResult",
    "add_correct_stack_parser",
    "correct_dask",
    "correct_hdf5",
    "run_correct_stack",
]

_DEFAULT_DATASET = "/entry/data"


def _as_matrix(detector_or_matrix, name="detector_or_matrix", shape_out=None):
    """A CorrectionMatrix from itself, a detector file path, or a record with dy, dx, mask.

    ``shape_out`` (see ``CorrectionMatrix.from_maps``) frames a matrix built
    here; a matrix given has its frame already, so it must then be None.
    """
    if isinstance(detector_or_matrix, CorrectionMatrix):
        if shape_out is not None:
            raise CcdgridError(
                f"`shape_out` must be None when `{name}` is a CorrectionMatrix: the matrix "
                f"has its frame already ({detector_or_matrix.shape_out} at offset "
                f"{detector_or_matrix.offset})"
            )
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
    return CorrectionMatrix.from_maps(
        detector.dy, detector.dx, mask=detector.mask, shape_out=shape_out
    )


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


def correct_dask(array, detector_or_matrix, *, normalize=False, dummy=0.0, nthreads=1,
                 shape_out=None):  # fmt: skip
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
    shape_out : None or "input" or "bounds" or "cover" or tuple of 2 int
        The output frame of a matrix built here (see
        :meth:`CorrectionMatrix.from_maps`; None, the default, is the input
        frame). Must be None when ``detector_or_matrix`` is a matrix: its
        own ``shape_out`` and ``offset`` apply.

    Returns
    -------
    dask.array.Array, shape (n,) + ``shape_out`` or ``shape_out``
        The corrected frames, float64 for float64 input, float32 otherwise,
        chunked like ``array`` along frames and whole along the image axes.

    Raises
    ------
    CcdgridError
        If dask is not installed, ``array`` is not a 2-D or 3-D dask array of
        real numbers, its frames do not have the detector's shape, or
        ``shape_out`` is bad or given with a matrix.

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
    matrix = _as_matrix(detector_or_matrix, shape_out=shape_out)
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
    stored_bytes : int
        Bytes of frame data stored in the output dataset (after compression).
    offset : tuple of int
        ``(oy, ox)``: the matrix's offset, the input position of the corner
        of output pixel (0, 0) (see ``CorrectionMatrix.offset``); also the
        dataset's ``offset`` attribute.
    """

    path: pathlib.Path
    dataset: str
    shape: tuple
    dtype: object  # numpy.dtype of the output frames
    seconds: float
    stored_bytes: int = 0
    offset: tuple = (0, 0)

    @property
    def frames_per_second(self):
        """Frames corrected per second of wall time."""
        return self.shape[0] / self.seconds if self.seconds > 0 else float("inf")

    @property
    def compression_ratio(self):
        """Stored bytes over the uncompressed size of the frames (1.0 when uncompressed)."""
        raw = math.prod(self.shape) * self.dtype.itemsize
        return self.stored_bytes / raw if raw else 1.0


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


def _available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def correct_hdf5(src, dst, detector, *, chunk_frames=None, compression="gzip",
                 compression_level=1, normalize=False, dummy=0.0, progress=None,
                 workers=None, shape_out=None):  # fmt: skip
    """Correct a 3-D HDF5 stack frame by frame into a new, chunked HDF5 file.

    The defaults suit a beamline stack: float32 frames (what
    :meth:`CorrectionMatrix.apply` returns), one frame per HDF5 chunk (a
    reader fetches frame ``i`` alone), byte shuffle + deflate level 1, which
    every HDF5 reader (h5py, pyFAI, silx, ...) opens without plugins.

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
    chunk_frames : int or None
        Frames per HDF5 read when the source cannot be read chunk by chunk
        directly (see Notes); None means the source's chunk depth along the
        frame axis (1 for a contiguous dataset). Ignored otherwise.
    compression : {"gzip", None}
        Output compression: byte shuffle + deflate, or none.
    compression_level : int
        1 (the default) to 9: ISA-L at level ``min(compression_level, 3)``
        with python-isal installed (``pip install "ccdgrid[fast]"``), else
        zlib at ``compression_level``.
    normalize, dummy
        See :meth:`CorrectionMatrix.apply`.
    progress : bool or None
        Progress bar (tqdm) on stderr: None (default) shows it when stderr
        is a terminal, True always, False never.
    workers : int or None
        Frames corrected at once, each by one thread (reading its frame's
        chunk, applying the matrix, compressing); None means the number of
        available CPUs, at most 4.
    shape_out : None or "input" or "bounds" or "cover" or tuple of 2 int
        See :func:`correct_dask`. The output dataset has the matrix's frame
        shape, and its ``offset`` attribute holds the matrix's offset
        ``(oy, ox)`` (int64): frame pixel ``(k, l)`` covers input position
        ``(k + oy, l + ox)``.

    Returns
    -------
    StackResult
        The output path, dataset, shape ``(n, ny_out, nx_out)``, dtype
        (float32, or float64 for float64 input), wall time, stored size and
        offset.

    Raises
    ------
    CcdgridError
        A source that is not a 3-D real dataset, frames whose shape is not
        the detector's, ``dst`` equal to the source file, bad options, a
        corrupt compressed chunk.
    OSError
        If a file cannot be read or written. Nothing is left at ``dst``
        (an existing file there is untouched) when anything fails.

    Notes
    -----
    What the defaults cost, CPU per 2048² uint16 frame on one core
    (``python benchmarks/stack.py --modes stages``, a Zen 5 EPYC): reading a
    stored chunk ~0.3 ms, applying the matrix ~9 ms (uint16 pixels read as
    they are), encoding the chunk ~5 ms at level 1 with ISA-L (shuffle
    1.5 ms, the exponent byte's Huffman-only block ~2 ms, Adler-32 1.3 ms;
    ~9 ms with zlib), writing it ~5 ms. Corrected counts are fractional, so
    the three low bytes of every float32 are noise and only the exponent
    byte compresses: each byte plane is coded only if a sample of it shrinks
    by 10 % or more, else stored as is, and the file is ~80 % of the
    float32 size (1.6x a uint16 input) at any level. A plane is deflated,
    or coded as one Huffman-only block (every byte a literal, no LZ77
    search: ~3x faster than ISA-L on the exponent byte, and smaller), by
    what makes its sample smaller.
    Deflating every plane (what HDF5's own filter does) costs ~350 ms with
    zlib for the same size. ``compression=None`` stores 25 % more bytes
    and costs ~2 ms more to write than it saves in encoding.

    Frames are corrected in parallel, ``workers`` at a time, each by one
    thread with one OpenMP thread. Chunks of one or more whole frames,
    stored raw or with HDF5's shuffle and deflate filters, are read with
    ``read_direct_chunk`` and inflated by the workers; any other layout
    (tiled chunks, other filters, contiguous) is read through HDF5,
    ``chunk_frames`` frames at a time. Output chunks are written with
    ``write_direct_chunk``. At most ``2 * workers`` frames are in flight,
    and their buffers serve again frame after frame (a fresh 16 MB array
    per frame costs its page faults each time): memory is the matrix
    (~150 MB at 2048²), an input and an output chunk per frame in flight
    (~25 MB at 2048² uint16) and a float32 frame per worker, whatever the
    number of frames (~340 MB peak in all at 2048² with 2 workers). The
    output is written under a temporary name beside ``dst`` and moved into
    place with :func:`os.replace`. Each chunk is written past the page
    cache (``O_DIRECT``, chunks placed on 4 KiB boundaries, see
    :func:`ccdgrid._h5write.atomic_h5`) where the filesystem allows it: a
    new file's page-cache pages cost the kernel (and a virtual machine's
    host) fresh memory, 8.8 s of system time for 200 2048² frames against
    1.1 s written directly on the reference machine.
    """
    if chunk_frames is not None:
        chunk_frames = _positive_int(chunk_frames, "chunk_frames")
    _check_compression(compression, compression_level)
    if workers is None:
        workers = min(_available_cpus(), 4)
    workers = _positive_int(workers, "workers")
    if not isinstance(progress, (bool, type(None))):
        raise CcdgridError(f"`progress` must be True, False or None, got {progress!r}")
    src_path, src_dataset = _split(src, "src")
    dst_path, dst_dataset = _split(dst, "dst", default=_DEFAULT_DATASET)
    if dst_path == src_path or (dst_path.exists() and os.path.samefile(dst_path, src_path)):
        raise CcdgridError(f"the output {dst_path} must not be the source file")
    check_writable(dst_path, "the corrected stack")
    matrix = _as_matrix(detector, "detector", shape_out=shape_out)

    import numpy as np
    from tqdm import tqdm

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
        reader = _Reader(source, chunk_frames)
        encode = _Deflater(compression_level) if compression else None
        correct = _FrameCorrector(
            reader.decode, matrix, normalize, dummy, encode,
            nthreads=max(1, _available_cpus() // workers), work=work,
        )  # fmt: skip
        with atomic_h5(dst_path, "the corrected stack", direct=True) as out:
            options = {"compression": "gzip", "shuffle": True} if compression else {}
            if compression:
                options["compression_opts"] = int(compression_level)
            target = out.create_dataset(
                dst_dataset, shape=shape, dtype=work, chunks=(1, *matrix.shape_out), **options
            )
            target.attrs["source"] = f"{src_path}::{src_dataset}"
            target.attrs["creator"] = "ccdgrid.stack.correct_hdf5"
            target.attrs["normalize"] = bool(normalize)
            target.attrs["offset"] = np.asarray(matrix.offset, dtype=np.int64)
            with tqdm(
                total=n, unit="frame", desc="correcting", file=sys.stderr,
                disable=None if progress is None else not progress,
            ) as bar:  # fmt: skip
                stored = _stream(reader, target, correct, workers, bar)
    seconds = time.perf_counter() - start
    return StackResult(dst_path, dst_dataset, shape, work, seconds, stored, matrix.offset)


def _stream(reader, target, correct, workers, bar):
    """Correct the chunks of ``reader`` in ``workers`` threads; write them in order here.

    This thread alone calls HDF5 (h5py serialises its calls anyway): it
    reads a chunk into a free input buffer, hands it to the pool with free
    output buffers, and writes the oldest finished chunk's frames (from
    their buffers, which then serve again) once ``2 * workers`` frames are
    in flight, which bounds memory. Workers inflate, correct and deflate
    without the GIL, so they keep the cores busy while this thread does I/O.
    Returns the number of bytes written.
    """
    in_flight = 2 * workers
    pending = deque()  # (first frame, input buffer, output buffers, future)
    free_inputs, free_outputs = [], []
    queued = 0
    stored = 0

    def retire_oldest():
        nonlocal queued, stored
        i0, source, outputs, future = pending.popleft()
        chunks = future.result()
        for offset, chunk in enumerate(chunks):
            target.id.write_direct_chunk((i0 + offset, 0, 0), chunk)
            stored += chunk.nbytes
        queued -= len(chunks)
        bar.update(len(chunks))
        free_inputs.append(source)
        free_outputs.extend(outputs)

    with ThreadPoolExecutor(workers, thread_name_prefix="ccdgrid-stack") as pool:
        try:
            for i0, count in reader.chunks():
                while queued and queued + count > in_flight:
                    retire_oldest()
                spare = free_inputs.pop() if free_inputs else None
                payload, source = reader.read(i0, count, spare)
                outputs = [
                    free_outputs.pop() if free_outputs else correct.new_output()
                    for _ in range(count)
                ]
                future = pool.submit(correct, payload, count, outputs)
                pending.append((i0, source, outputs, future))
                queued += count
            while pending:
                retire_oldest()
        except BaseException:
            for *_, future in pending:
                future.cancel()
            raise
    return stored


class _FrameCorrector:
    """Decode a chunk of input, correct its frames one by one, encode each output chunk.

    Called by the workers with the output buffers (one per frame) that the
    stream hands out and takes back: nothing of a frame's size is allocated
    per frame. Without compression the matrix is applied straight into the
    output buffer (the chunk is the frame); with it, into a float frame of
    the worker's own, which the encoder then shuffles and deflates into the
    output buffer.
    """

    def __init__(self, decode, matrix, normalize, dummy, encode, nthreads, work):
        import threading

        self.decode, self.matrix, self.encode = decode, matrix, encode
        self.options = {"normalize": bool(normalize), "dummy": float(dummy), "nthreads": nthreads}
        self.work = work
        self.local = threading.local()

    def new_output(self):
        """An output buffer for one frame's chunk (the stream keeps and reuses it)."""
        import numpy as np

        # on a 4 KiB boundary, so that the chunk can be written past the page cache
        if self.encode is None:
            return aligned_empty(self.matrix.shape_out, self.work)
        return aligned_empty((self.encode.bound(self.matrix.shape_out, self.work),), np.uint8)

    def _frame(self):
        import numpy as np

        frame = getattr(self.local, "frame", None)
        if frame is None:
            frame = self.local.frame = np.empty(self.matrix.shape_out, dtype=self.work)
        return frame

    def __call__(self, payload, count, outputs):
        frames = self.decode(payload, count, self.local)
        chunks = []
        for frame, output in zip(frames, outputs, strict=True):
            if self.encode is None:
                chunks.append(self.matrix.apply(frame, out=output, **self.options))
            else:
                corrected = self.matrix.apply(frame, out=self._frame(), **self.options)
                chunks.append(self.encode(corrected, output))
        return chunks


# -- reading: chunk by chunk, inflated by the workers --------------------------


class _Reader:
    """Read a source dataset chunk by chunk into reused buffers.

    When each chunk holds whole frames and its filters are among shuffle
    and deflate, a chunk's stored bytes are read with ``read_direct_chunk``
    and :meth:`decode` (run by a worker) undoes the filters. Otherwise HDF5
    reads ``chunk_frames`` frames at once and the payload is already the
    frames.
    """

    def __init__(self, source, chunk_frames):
        self.source = source
        self.name = f"{source.file.filename}::{source.name}"  # workers must not call HDF5
        self.n = source.shape[0]
        self.dtype = source.dtype
        from ._h5read import direct_filters

        self.filters = direct_filters(source)
        if self.filters is not None:
            self.depth = source.chunks[0]
        elif chunk_frames is not None:
            self.depth = chunk_frames
        else:
            self.depth = source.chunks[0] if source.chunks else 1
        self.frame_shape = source.shape[1:]
        self.chunk_nbytes = self.depth * math.prod(self.frame_shape) * self.dtype.itemsize

    def chunks(self):
        """``(first frame, frames)`` of every chunk, in order."""
        for i0 in range(0, self.n, self.depth):
            yield i0, min(self.depth, self.n - i0)

    def read(self, i0, count, buffer=None):
        """The payload of the chunk at frame ``i0``, read into ``buffer`` when it is large
        enough, and the buffer that holds it (to pass again once the payload is used)."""
        import numpy as np

        info = None
        if self.filters is not None:
            info = self.source.id.get_chunk_info_by_coord((i0, 0, 0))
        # a chunk never written (HDF5 supplies the fill value) is read through HDF5
        if info is None or info.byte_offset is None:
            size = count * math.prod(self.frame_shape) * self.dtype.itemsize
            if buffer is None or buffer.nbytes < size:
                buffer = np.empty(max(size, self.chunk_nbytes), dtype=np.uint8)
            frames = buffer[:size].view(self.dtype).reshape(count, *self.frame_shape)
            self.source.read_direct(frames, np.s_[i0 : i0 + count])
            return frames, buffer
        if buffer is None or buffer.nbytes < info.size:
            buffer = np.empty(max(info.size, self.chunk_nbytes), dtype=np.uint8)
        mask, _ = self.source.id.read_direct_chunk((i0, 0, 0), out=buffer)
        return (mask, buffer[: info.size]), buffer

    def decode(self, payload, count, scratch=None):
        """The frames ``(count, ny, nx)`` of one payload (a worker runs this).

        ``scratch`` (any object taking attributes, e.g. a thread-local) keeps
        the buffer of unshuffled bytes from one call to the next.
        """
        if not isinstance(payload, tuple):  # read through HDF5: already frames
            return payload
        from ._h5read import inflate, unshuffle

        mask, data = payload
        for index in reversed(range(len(self.filters))):
            if mask >> index & 1:  # HDF5 skipped this (optional) filter for this chunk
                continue
            code, element_size = self.filters[index]
            if code == "deflate":
                data = inflate(data, self.chunk_nbytes, self.name, scratch)
            else:
                data = unshuffle(data, element_size, scratch)
        if data.size != self.chunk_nbytes:
            raise CcdgridError(
                f"a chunk of {self.name} holds {data.size} bytes after its filters, expected "
                f"{self.chunk_nbytes}: the file is damaged"
            )
        frames = data.view(self.dtype).reshape(self.depth, *self.frame_shape)
        return frames[:count]


# -- writing: what HDF5's shuffle + deflate filters would store -----------------

_ZLIB_HEADER = (0x78, 0x01)  # deflate, 32 KiB window; 0x7801 % 31 == 0 as RFC 1950 asks
_STORED_MAX = 65535  # bytes in one stored deflate block
_SAMPLES = 4  # windows of a byte plane deflated to judge it
_SAMPLE_BYTES = 8192
_WORTH = 0.9  # deflate a plane whose sample shrinks below this fraction


class _Deflater:
    """One output frame -> the bytes HDF5's shuffle + deflate filters store for it.

    The result is one zlib stream (RFC 1950) of the shuffled frame, built
    byte plane by byte plane, in a buffer the caller may reuse from frame to
    frame. A sample of each plane (4 windows of 8 KiB) decides how it is
    coded: deflated by ISA-L (when installed) or zlib, or as one
    Huffman-only block (:mod:`ccdgrid._huffman`: every byte a literal, a
    code built from the sample), whichever makes the sample smaller; stored
    when neither shrinks it by 10 % (the noisy low bytes of fractional
    counts). The exponent byte of noisy frames is the Huffman-only case:
    1-3 bits of entropy a byte and no repeats for LZ77 to find, where
    Huffman-only coding is 17 % smaller than ISA-L's level 1 and ~3x
    faster (2048² benchmark frames: ~2 ms with a code from the sample's
    counts, as here, 3.1 ms with the plane's, against 6.8 ms). One pass of
    the ``shuffle_planes`` kernel writes every byte plane where it goes:
    stored ones as stored deflate blocks, in place (no call to the
    compressor, no copy after); the others in a row, then coded, each piece
    but the last ending on a byte (a sync flush) so the pieces concatenate
    into one valid stream. Any inflate (HDF5's filter) reads it.
    """

    def __init__(self, level, engine=None):
        from ._ext import _correction
        from ._h5read import deflate_engine

        self.engine = deflate_engine() if engine is None else engine
        self.level = min(level, 3) if self.engine is not zlib else level
        self.kernels = _correction
        self.local = threading.local()  # each thread's buffer for Huffman-only blocks

    @staticmethod
    def bound(shape, dtype):
        """Bytes of the largest chunk of a frame of ``shape`` and ``dtype`` (all planes stored)."""
        import numpy as np

        return 2 + np.dtype(dtype).itemsize * _stored_size(math.prod(shape)) + 4

    def __call__(self, frame, out=None):
        """The chunk of ``frame``: a uint8 view of ``out`` (at least :meth:`bound` bytes),
        or of a new array when ``out`` is None."""
        import numpy as np

        frame = np.ascontiguousarray(frame)
        size = frame.itemsize
        if out is None:
            out = np.empty(self.bound(frame.shape, frame.dtype), dtype=np.uint8)
        planes = frame.reshape(-1).view(np.uint8).reshape(-1, size).T  # (size, n) strided
        n = planes.shape[1]
        span = _stored_size(n)
        # each plane at the place it has if every plane before it is stored
        starts = 2 + span * np.arange(size, dtype=np.int64)
        plans = [self._plan(p) for p in planes]
        stored = np.array([mode == "store" for mode, _ in plans], dtype=np.uint8)
        self.kernels.shuffle_planes(frame.reshape(-1).view(np.uint8), size, out, starts, stored)
        out[:2] = _ZLIB_HEADER
        pos, adler = 2, 1
        for k in range(size):
            final = k == size - 1
            start = int(starts[k])
            if stored[k]:
                if pos != start:  # an earlier plane deflated: move this one up
                    out[pos : pos + span] = out[start : start + span]
                adler = _stored_adler(out, pos, n, adler, self.engine)
                if final:
                    out[pos + (_blocks(n) - 1) * (_STORED_MAX + 5)] |= 1
                pos += span
                continue
            plane = out[start : start + n]
            adler = self.engine.adler32(plane, adler)
            mode, lengths = plans[k]
            if mode == "huffman":
                clear_upper_vector_state()  # ISA-L's adler32 is AVX-512 code too
                piece = self._huffman(plane, final, lengths)
            else:
                piece = self._deflate(plane, final)
            if len(piece) < span:
                out[pos : pos + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                pos += len(piece)
            else:  # it did not shrink after all: store it
                pos, _ = _put_stored(out, pos, plane.copy(), final, 1, self.engine)
        clear_upper_vector_state()
        out[pos : pos + 4] = np.frombuffer(adler.to_bytes(4, "big"), dtype=np.uint8)
        return out[: pos + 4]

    def _plan(self, plane):
        """How to code a byte plane: ``("store" | "huffman" | "deflate", code lengths)``.

        Both codings are tried on a sample; the smaller wins if it shrinks
        the sample by 10 % or more. The Huffman code is built from the
        sample's counts with every byte value counted once more, so that it
        also codes the values the sample missed.
        """
        import numpy as np

        from ._huffman import HEADER_BITS, histogram, literal_lengths

        n = plane.size
        if n <= _SAMPLES * _SAMPLE_BYTES:
            sample = np.ascontiguousarray(plane)
        else:
            starts = np.linspace(0, n - _SAMPLE_BYTES, _SAMPLES).astype(np.int64)
            sample = np.concatenate([plane[s : s + _SAMPLE_BYTES] for s in starts])
        deflated = len(self.engine.compress(sample, self.level))
        clear_upper_vector_state()
        counts = histogram(sample)
        lengths = literal_lengths(counts + 1)
        # the block's header (139 bytes) is the plane's, not the sample's
        huffman = (int(counts @ lengths[:256]) + HEADER_BITS * sample.size / n) / 8
        if min(deflated, huffman) >= _WORTH * sample.size:
            return "store", None
        return ("huffman", lengths) if huffman <= deflated else ("deflate", None)

    def _huffman(self, plane, final, lengths):
        from ._huffman import deflate_block

        block = deflate_block(plane, final, lengths=lengths, out=getattr(self.local, "out", None))
        self.local.out = block.base  # the buffer it was written into, kept for the next frame
        return block

    def _deflate(self, plane, final):
        deflate = self.engine.compressobj(self.level, self.engine.DEFLATED, -zlib.MAX_WBITS)
        head = deflate.compress(plane)
        tail = deflate.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
        # ISA-L's AVX-512 code leaves the vector state dirty, which made the
        # next frame's correction (an SSE kernel, on this thread) 4x slower
        clear_upper_vector_state()
        return head + tail


def _blocks(n):
    """Stored deflate blocks that hold ``n`` bytes (one, empty, for none)."""
    return max(1, -(-n // _STORED_MAX))


def _stored_size(n):
    """Bytes of ``n`` bytes written as stored deflate blocks (5-byte header each)."""
    return n + 5 * _blocks(n)


def _stored_adler(out, pos, n, adler, engine):
    """The running Adler-32 updated with the ``n`` bytes stored as blocks at ``out[pos:]``."""
    for first in range(0, n, _STORED_MAX):
        at = pos + (first // _STORED_MAX) * (_STORED_MAX + 5) + 5
        adler = engine.adler32(out[at : at + min(_STORED_MAX, n - first)], adler)
    return adler


def _put_stored(out, pos, plane, final, adler, engine):
    """Write ``plane`` (uint8, any stride) as stored blocks at ``out[pos:]``.

    Returns the position after them and the running Adler-32 updated with
    ``plane``. Every block but possibly the last holds 65535 bytes; the
    last one has the BFINAL bit if ``final``.
    """
    n = plane.size
    full, rest = divmod(n, _STORED_MAX)
    last_header = pos
    if full:
        blocks = out[pos : pos + full * (_STORED_MAX + 5)].reshape(full, _STORED_MAX + 5)
        blocks[:, :5] = (0, 0xFF, 0xFF, 0, 0)  # BTYPE 00, LEN 65535, NLEN 0 (little-endian)
        blocks[:, 5:] = plane[: full * _STORED_MAX].reshape(full, _STORED_MAX)
        for row in blocks[:, 5:]:
            adler = engine.adler32(row, adler)
        last_header = pos + (full - 1) * (_STORED_MAX + 5)
        pos += full * (_STORED_MAX + 5)
    if rest or not full:
        nlen = rest ^ 0xFFFF
        out[pos : pos + 5] = (0, rest & 0xFF, rest >> 8, nlen & 0xFF, nlen >> 8)
        out[pos + 5 : pos + 5 + rest] = plane[full * _STORED_MAX :]
        adler = engine.adler32(out[pos + 5 : pos + 5 + rest], adler)
        last_header = pos
        pos += 5 + rest
    if final:
        out[last_header] |= 1
    return pos, adler


# -- command line --------------------------------------------------------------

_EPILOG = """\
examples:
  ccdgrid correct-stack scan.h5::/entry/data -d detector.h5 -o corrected.h5::/entry/data
  ccdgrid correct-stack scan.h5::/entry/data -d detector.h5 -o corrected.h5 --no-compression

The output holds float32 frames (float64 for float64 input), one frame per HDF5
chunk, byte-shuffled and deflated: any HDF5 reader opens it without plugins.
Corrected counts are fractional, so their low bytes are noise: the file is
~80 % of the float32 size (1.6x a uint16 input), whatever the level. At 2048²,
one frame costs ~9 ms of CPU to correct, ~5 ms to encode with ISA-L (pip
install "ccdgrid[fast]"; ~9 ms with zlib), and ~5 ms to write; frames are
corrected --workers at a time.
The file is written under a temporary name and moved into place only when
complete.

By default (--frame cover) the frames hold the input frame and every valid
pixel where it truly belongs, so no counts are lost; --frame bounds holds the
valid pixels only (smaller under a masked border). The dataset's "offset"
attribute (also printed) is the input position of the corner of frame pixel
(0, 0). --frame input keeps the input's shape and pixel grid (offset 0, 0)
and loses the counts the distortion pushes outside it.
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


def _level_argument(text):
    import argparse

    value = _positive_argument(text)
    if value > 9:
        raise argparse.ArgumentTypeError(f"expected a deflate level from 1 to 9, got {text!r}")
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
        "detector file, frame by frame (memory does not grow with the number of frames).",
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
        "--level",
        type=_level_argument,
        default=1,
        metavar="L",
        help="deflate level 1-9 (default: %(default)s; higher levels cost more CPU for "
        "about the same size on corrected counts)",
    )
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="store the frames raw (25 %% larger, no deflate cost)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_argument,
        metavar="N",
        help="frames corrected at once, one thread each (default: CPUs, at most 4); "
        "memory grows by ~70 MB per worker at 2048²",
    )
    parser.add_argument(
        "--chunk",
        type=_positive_argument,
        metavar="N",
        help="frames per read when HDF5 must decode the source itself (tiled chunks or "
        "filters other than shuffle/deflate; default: the source's chunk depth)",
    )
    parser.add_argument(
        "--normalize", action="store_true", help="divide by each output pixel's coverage"
    )
    add_frame_argument(parser)
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (shown on a terminal only anyway)"
    )
    if not parents:
        parser.add_argument(
            "--debug", action="store_true", help="show the full traceback of an error"
        )
    parser.set_defaults(run=run_correct_stack)
    return parser


def run_correct_stack(args):
    """Run ``ccdgrid correct-stack`` from parsed arguments; print what was written.

    The progress bar shows on a terminal only, never with ``--quiet``.
    """
    result = correct_hdf5(
        args.source,
        args.output,
        args.detector,
        chunk_frames=args.chunk,
        compression=None if args.no_compression else "gzip",
        compression_level=args.level,
        normalize=args.normalize,
        progress=False if args.quiet else None,
        workers=args.workers,
        shape_out=args.frame,
    )
    n, ny, nx = result.shape
    oy, ox = result.offset
    print(
        f"wrote {result.path}::{result.dataset}: {n} frames of {ny} x {nx} {result.dtype} "
        f"(frame {args.frame}, offset {oy} {ox}) "
        f"in {result.seconds:.2f} s ({result.frames_per_second:.1f} frames/s, "
        f"{100 * result.compression_ratio:.0f} % of the raw size)"
    )
