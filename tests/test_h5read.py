"""Reading HDF5 chunks past HDF5's filters (ccdgrid._h5read)."""

import types
import zlib

import h5py
import numpy as np
import pytest

from ccdgrid import _h5read
from ccdgrid.errors import CcdgridError


@pytest.fixture(params=["engine", "zlib"])
def engine(request, monkeypatch):
    """Inflate with the installed engine (ISA-L when present) and with zlib."""
    if request.param == "zlib":
        monkeypatch.setattr(_h5read, "deflate_engine", lambda: zlib)
    return request.param


_LAYOUTS = {
    # name: (create_dataset options, read past HDF5)
    "shuffle+gzip, partial last chunk": (
        dict(chunks=(7, 50), compression="gzip", shuffle=True),
        True,
    ),
    "gzip": (dict(chunks=(16, 50), compression="gzip"), True),
    "shuffle only": (dict(chunks=(16, 50), shuffle=True), True),
    "chunked, no filter": (dict(chunks=(5, 50)), True),
    "tiles": (dict(chunks=(8, 25), compression="gzip"), False),
    "lzf": (dict(chunks=(8, 50), compression="lzf"), False),
    "contiguous": ({}, False),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", "|i1", "<u2", ">i4"])
def test_read_chunked_equals_hdf5(tmp_path, engine, layout, dtype):
    options, direct = _LAYOUTS[layout]
    rng = np.random.default_rng(3)
    data = (rng.normal(0.0, 50.0, (40, 50)) * (np.arange(40)[:, None] + 1)).astype(dtype)
    with h5py.File(tmp_path / "d.h5", "w") as h5:
        h5.create_dataset("d", data=data, **options)
    with h5py.File(tmp_path / "d.h5", "r") as h5:
        assert (_h5read.direct_filters(h5["d"]) is not None) == direct
        got = _h5read.read_chunked(h5["d"])
        want = h5["d"][()]
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, data)


def test_read_chunked_of_a_stack_and_of_unwritten_chunks(tmp_path, engine):
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 4000, (6, 30, 20)).astype(np.uint16)
    with h5py.File(tmp_path / "d.h5", "w") as h5:
        dset = h5.create_dataset(
            "d", shape=frames.shape, dtype=np.uint16, chunks=(2, 30, 20),
            compression="gzip", shuffle=True, fillvalue=7,
        )  # fmt: skip
        dset[:4] = frames[:4]  # the last chunk is never allocated
    with h5py.File(tmp_path / "d.h5", "r") as h5:
        got = _h5read.read_chunked(h5["d"])
    expected = frames.copy()
    expected[4:] = 7
    np.testing.assert_array_equal(got, expected)


def test_read_chunked_honours_a_chunk_whose_deflate_was_skipped(tmp_path, engine):
    data = np.arange(400, dtype=np.float32).reshape(20, 20)
    with h5py.File(tmp_path / "d.h5", "w") as h5:
        dset = h5.create_dataset("d", data=data, chunks=(10, 20), compression="gzip", shuffle=True)
        shuffled = np.ascontiguousarray(data[10:].view(np.uint8).reshape(-1, 4).T)
        # pipeline (shuffle, deflate): bit 1 set = deflate not applied to this chunk
        dset.id.write_direct_chunk((10, 0), shuffled.tobytes(), filter_mask=0b10)
    with h5py.File(tmp_path / "d.h5", "r") as h5:
        np.testing.assert_array_equal(_h5read.read_chunked(h5["d"]), data)


def test_a_damaged_chunk_is_named(tmp_path, engine):
    data = np.arange(400, dtype=np.float32).reshape(20, 20)
    with h5py.File(tmp_path / "d.h5", "w") as h5:
        dset = h5.create_dataset("d", data=data, chunks=(10, 20), compression="gzip")
        stream = zlib.compress(data[10:].tobytes())
        dset.id.write_direct_chunk((10, 0), stream[: len(stream) // 2])
    with (
        h5py.File(tmp_path / "d.h5", "r") as h5,
        pytest.raises(CcdgridError, match=r"cannot inflate a chunk of grid\.h5::dy"),
    ):
        _h5read.read_chunked(h5["d"], "grid.h5::dy")
    # a chunk that inflates to a wrong size
    with h5py.File(tmp_path / "d.h5", "a") as h5:
        h5["d"].id.write_direct_chunk((10, 0), zlib.compress(bytes(100)))
    with (
        h5py.File(tmp_path / "d.h5", "r") as h5,
        pytest.raises(CcdgridError, match="holds 100 bytes after its filters, expected 800"),
    ):
        _h5read.read_chunked(h5["d"])


@pytest.mark.parametrize("kind", ["zeros", "noise", "counts"])
def test_inflate_into_a_reused_buffer(kind):
    rng = np.random.default_rng(13)
    n = 300_000
    if kind == "zeros":  # 16 KB of input inflate to far more than one 64 KB piece
        raw = bytes(n)
    elif kind == "noise":
        raw = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    else:
        raw = rng.integers(100, 200, n // 2, dtype=np.uint16).tobytes()
    stream = zlib.compress(raw, 6)
    scratch = types.SimpleNamespace()
    first = _h5read.inflate(stream, n, "f.h5::/d", scratch)
    assert first.tobytes() == raw
    again = _h5read.inflate(stream, n, "f.h5::/d", scratch)
    assert np.shares_memory(first, again)  # the same buffer, not a new one
    with pytest.raises(CcdgridError, match="holds more than the 1000 bytes"):
        _h5read.inflate(stream, 1000, "f.h5::/d", types.SimpleNamespace())
    with pytest.raises(CcdgridError, match="truncated"):
        _h5read.inflate(stream[: len(stream) // 2], n, "f.h5::/d", scratch)
