"""Reading HDF5 chunks past HDF5's filters: deflate with ISA-L, unshuffle with numpy.

HDF5 inflates a chunk with zlib, ~4x slower than ISA-L's inflate
(python-isal, ``ccdgrid[fast]``). Chunks that span whole rows (a stack's
frames, a detector file's maps) and carry only the shuffle and deflate
filters are read as stored (``read_direct_chunk``) and their filters undone
here: :func:`read_chunked` reads a whole dataset so, ``ccdgrid.stack``
frame by frame into reused buffers.
"""

import math
import zlib

import h5py
import numpy as np

from .errors import CcdgridError

__all__ = ["deflate_engine", "direct_filters", "inflate", "read_chunked", "unshuffle"]


def deflate_engine():
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib
    return isal_zlib


def direct_filters(source):
    """The filter pipeline as ``[("shuffle" | "deflate", element size)]`` if chunks can be
    read directly (each chunk whole rows along the first axis, as a stack's frames or
    a map's rows; no other filter), else None."""
    if source.chunks is None or source.chunks[1:] != source.shape[1:]:
        return None
    if source.dtype.kind not in "uif" or source.dtype.itemsize not in (1, 2, 4, 8):
        return None
    plist = source.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CHUNKED or plist.get_external_count():
        return None
    filters = []
    for index in range(plist.get_nfilters()):
        code, _, values, _ = plist.get_filter(index)
        if code == h5py.h5z.FILTER_DEFLATE:
            filters.append(("deflate", 0))
        elif code == h5py.h5z.FILTER_SHUFFLE:
            filters.append(("shuffle", int(values[0]) if values else source.dtype.itemsize))
        else:
            return None
    return filters


_INFLATE_PIECE = 262144  # compressed bytes fed to the inflater at a time
_INFLATE_OUT = 1048576  # inflated bytes it returns at most at a time


def inflate(data, size, name, scratch=None):
    """Inflate one zlib stream (HDF5's deflate filter) into a uint8 array (``size`` expected).

    With ``scratch`` (any object taking attributes, e.g. a thread-local), the
    result goes to ``scratch.inflated``, reused while large enough: the
    inflater is fed and drained in pieces of 1 MB at most, which the allocator
    recycles, where one ``size``-byte result would be fresh memory (and
    ~2000 page faults at 2048² uint16) every chunk.
    """
    engine = deflate_engine()
    if scratch is None:
        try:
            return np.frombuffer(engine.decompress(data, 15, size), dtype=np.uint8)
        except engine.error as exc:
            raise CcdgridError(f"cannot inflate a chunk of {name}: {exc}") from exc
    out = getattr(scratch, "inflated", None)
    if out is None or out.size < size:
        out = scratch.inflated = np.empty(size, dtype=np.uint8)
    inflater = engine.decompressobj(15)
    source = memoryview(data).cast("B")
    pos, overflow = 0, False
    try:
        for first in range(0, len(source), _INFLATE_PIECE):
            pending = source[first : first + _INFLATE_PIECE]
            # drained when the input is used up and a call returns less than asked
            while not (inflater.eof or overflow):
                piece = inflater.decompress(pending, _INFLATE_OUT)
                overflow = pos + len(piece) > size
                if not overflow:
                    out[pos : pos + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                    pos += len(piece)
                pending = inflater.unconsumed_tail
                if not pending and len(piece) < _INFLATE_OUT:
                    break
            if inflater.eof or overflow:
                break
        complete = inflater.eof and not overflow
    except engine.error as exc:
        raise CcdgridError(f"cannot inflate a chunk of {name}: {exc}") from exc
    if not complete:
        raise CcdgridError(
            f"cannot inflate a chunk of {name}: the stream is truncated or holds more than "
            f"the {size} bytes of a chunk"
        )
    return out[:pos]


def unshuffle(data, element_size, scratch=None):
    """Undo HDF5's shuffle filter: byte plane k back into byte k of every element.

    The result goes to ``scratch.unshuffled`` (reused while large enough)
    when ``scratch`` is given.
    """
    n = data.size // element_size
    out = getattr(scratch, "unshuffled", None)
    if out is None or out.size < data.size:
        out = np.empty(data.size, dtype=np.uint8)
        if scratch is not None:
            scratch.unshuffled = out
    out = out[: data.size]
    elements = out[: n * element_size].reshape(n, element_size)
    for k in range(element_size):
        # one strided copy per plane: a single (n, size) <- (size, n).T copy is 5x slower
        elements[:, k] = data[k * n : (k + 1) * n]
    out[n * element_size :] = data[n * element_size :]  # HDF5 leaves the tail as is
    return out


def read_chunked(dataset, name=None):
    """``dataset[()]``, its chunks inflated by :func:`inflate` where it can be.

    Parameters
    ----------
    dataset : h5py.Dataset
        Any dataset. One chunked along its first axis only (each chunk whole
        rows) with only the shuffle and deflate filters is read chunk by
        chunk as stored; any other is read by HDF5.
    name : str, optional
        The dataset's name in error messages (default: file::path).

    Returns
    -------
    ndarray
        The dataset's values, its shape and dtype.

    Raises
    ------
    CcdgridError
        If a chunk does not inflate to its size (a damaged file).
    """
    filters = direct_filters(dataset) if dataset.ndim >= 1 else None
    if filters is None:
        return dataset[()]
    name = name or f"{dataset.file.filename}::{dataset.name}"
    out = np.empty(dataset.shape, dtype=dataset.dtype)
    rows = dataset.chunks[0]
    row_shape = dataset.shape[1:]
    nbytes = rows * math.prod(row_shape) * dataset.dtype.itemsize
    origin = (0,) * (dataset.ndim - 1)
    for i0 in range(0, dataset.shape[0], rows):
        i1 = min(i0 + rows, dataset.shape[0])
        info = dataset.id.get_chunk_info_by_coord((i0, *origin))
        if info is None or info.byte_offset is None:  # never written: HDF5's fill value
            dataset.read_direct(out, np.s_[i0:i1], np.s_[i0:i1])
            continue
        mask, raw = dataset.id.read_direct_chunk((i0, *origin))
        data = np.frombuffer(raw, dtype=np.uint8)
        for index in reversed(range(len(filters))):
            if mask >> index & 1:  # HDF5 skipped this (optional) filter for this chunk
                continue
            code, element_size = filters[index]
            if code == "deflate":
                data = inflate(data, nbytes, name)
            else:
                data = unshuffle(data, element_size)
        if data.size != nbytes:
            raise CcdgridError(
                f"a chunk of {name} holds {data.size} bytes after its filters, expected "
                f"{nbytes}: the file is damaged"
            )
        out[i0:i1] = data.view(dataset.dtype).reshape(rows, *row_shape)[: i1 - i0]
    return out
