"""Stacks beyond memory: correct_dask on a real distributed cluster, streamed correct_hdf5."""

import argparse
import io
import os
import pickle
import sys
import types
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from ccdgrid import _h5read, stack
from ccdgrid.correction import CorrectionMatrix
from ccdgrid.errors import CcdgridError

NY, NX = 64, 96
N_FRAMES = 20


def _maps(rng, shape=(NY, NX)):
    ny, nx = shape
    # smooth enough that quadrilaterals stay convex, rough enough to split every pixel
    yy, xx = np.mgrid[0 : ny + 1, 0 : nx + 1]
    dy = 1.3 * np.sin(xx / 9.0) + rng.normal(0, 0.05, (ny + 1, nx + 1))
    dx = 0.8 * np.cos(yy / 7.0) + rng.normal(0, 0.05, (ny + 1, nx + 1))
    return dy, dx


@pytest.fixture
def detector():
    rng = np.random.default_rng(11)
    dy, dx = _maps(rng)
    mask = np.zeros((NY, NX), dtype=bool)
    mask[10, 20:30] = True
    return types.SimpleNamespace(dy=dy, dx=dx, mask=mask)


@pytest.fixture
def frames():
    rng = np.random.default_rng(12)
    return rng.integers(0, 60000, (N_FRAMES, NY, NX), dtype=np.uint16)


def _matrix(det, shape_out=None):
    return CorrectionMatrix.from_maps(det.dy, det.dx, mask=det.mask, shape_out=shape_out)


@pytest.fixture
def barrel():
    """A radial distortion that pushes the border 5 px out of the frame, with a masked row."""
    yy, xx = np.mgrid[0 : NY + 1, 0 : NX + 1].astype(np.float64)
    cy, cx = NY / 2, NX / 2
    a = 5.0 / (cy**2 + cx**2) ** 1.5
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    mask = np.zeros((NY, NX), dtype=bool)
    mask[40, 10:30] = True
    return types.SimpleNamespace(dy=a * r2 * (yy - cy), dx=a * r2 * (xx - cx), mask=mask)


def test_barrel_bounds_frame_is_larger_than_the_input(barrel):
    matrix = _matrix(barrel, "bounds")
    assert matrix.offset[0] < 0
    assert matrix.offset[1] < 0
    assert matrix.shape_out[0] > NY
    assert matrix.shape_out[1] > NX


# -- dask ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    # the scheduler's HTTP server on a free port: the default, 8787, taken by
    # another run gives a "port in use" warning, which filterwarnings=error
    # turns into a failure (dashboard_address=None still tried 8787)
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.mark.parametrize("normalize", [False, True], ids=["counts", "normalized"])
def test_dask_matches_in_memory_on_a_cluster(client, detector, frames, normalize):
    import dask.array as da

    matrix = _matrix(detector)
    lazy = stack.correct_dask(
        da.from_array(frames, chunks=(3, NY, NX)), matrix, normalize=normalize, dummy=-1.0
    )
    assert lazy.chunks[0] == da.from_array(frames, chunks=(3, NY, NX)).chunks[0]
    result = client.compute(lazy).result()
    expected = matrix.apply(frames, normalize=normalize, dummy=-1.0)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)


def test_dask_rechunks_split_frames_and_accepts_a_detector(client, detector, frames):
    import dask.array as da

    lazy = stack.correct_dask(da.from_array(frames, chunks=(5, 32, 40)), detector)
    assert lazy.chunks[1:] == ((NY,), (NX,))
    np.testing.assert_array_equal(client.compute(lazy).result(), _matrix(detector).apply(frames))


def test_dask_two_dimensional_and_float64(client, detector, frames):
    import dask.array as da

    matrix = _matrix(detector)
    image = frames[4].astype(np.float64)
    lazy = stack.correct_dask(da.from_array(image, chunks=(32, 48)), matrix)
    assert lazy.shape == (NY, NX)
    assert lazy.dtype == np.float64
    np.testing.assert_array_equal(client.compute(lazy).result(), matrix.apply(image))


def test_dask_scatters_the_matrix_to_the_cluster(client, detector, frames):
    import dask.array as da

    matrix = _matrix(detector)
    before = set(client.who_has())
    lazy = stack.correct_dask(da.from_array(frames, chunks=(2, NY, NX)), matrix)
    added = {key: workers for key, workers in client.who_has().items() if key not in before}
    # on both workers before anything is computed, and not in the graph
    assert [len(workers) for key, workers in added.items() if "CorrectionMatrix" in key] == [2]
    assert not any(isinstance(v, CorrectionMatrix) for v in dict(lazy.__dask_graph__()).values())
    np.testing.assert_array_equal(client.compute(lazy).result(), matrix.apply(frames))


def test_dask_graph_holds_the_matrix_once(detector, frames):
    """With a local scheduler the matrix is one delayed key of the graph."""
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    matrix = _matrix(detector)
    source = da.from_array(frames, chunks=(1, NY, NX))  # 20 blocks
    # the module's cluster may still be the default client: choose threads explicitly
    with dask.config.set(scheduler="threads"):
        lazy = stack.correct_dask(source, matrix)
        np.testing.assert_array_equal(lazy.compute(), matrix.apply(frames))
    # one task per block, plus one key for the matrix
    assert len(lazy.__dask_graph__()) - len(source.__dask_graph__()) == N_FRAMES + 1
    added = len(pickle.dumps(dict(lazy.__dask_graph__()))) - len(
        pickle.dumps(dict(source.__dask_graph__()))
    )
    # embedded per task, the matrix would add 20 times its size
    assert added < 1.5 * len(pickle.dumps(matrix))


def test_dask_accepts_a_bounds_matrix_or_builds_one(client, barrel, frames):
    import dask.array as da

    matrix = _matrix(barrel, "bounds")
    want = matrix.apply(frames)
    lazy = stack.correct_dask(da.from_array(frames, chunks=(4, NY, NX)), matrix)
    assert lazy.shape == (N_FRAMES, *matrix.shape_out)
    assert lazy.chunks[1:] == ((matrix.shape_out[0],), (matrix.shape_out[1],))
    np.testing.assert_array_equal(client.compute(lazy).result(), want)
    built = stack.correct_dask(
        da.from_array(frames, chunks=(4, NY, NX)), barrel, shape_out="bounds"
    )
    np.testing.assert_array_equal(client.compute(built).result(), want)
    # the counts of each frame are all kept (flux conservation over the bounds frame)
    valid = ~barrel.mask
    np.testing.assert_allclose(
        want.sum(axis=(1, 2), dtype=np.float64),
        (frames * valid).sum(axis=(1, 2), dtype=np.float64),
        rtol=1e-5,
    )


def test_dask_rejects_a_frame_for_a_matrix(barrel):
    da = pytest.importorskip("dask.array")
    with pytest.raises(CcdgridError, match="`shape_out` must be None when"):
        stack.correct_dask(da.zeros((2, NY, NX), chunks=1), _matrix(barrel), shape_out="bounds")


def test_dask_rejects_bad_input(detector, frames):
    da = pytest.importorskip("dask.array")
    with pytest.raises(CcdgridError, match="`array` must be a dask array"):
        stack.correct_dask(frames, detector)
    with pytest.raises(CcdgridError, match=r"`array` must have shape \(n, \*\(64, 96\)\)"):
        stack.correct_dask(da.zeros((4, NY, NX + 1), chunks=2), detector)
    with pytest.raises(CcdgridError, match="real numbers"):
        stack.correct_dask(da.zeros((4, NY, NX), dtype=complex, chunks=2), detector)
    with pytest.raises(CcdgridError, match="`detector_or_matrix` must be"):
        stack.correct_dask(da.zeros((4, NY, NX), chunks=2), object())


def test_dask_missing_names_the_extra(monkeypatch, detector):
    import builtins

    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name == "dask" or name.startswith("dask."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(CcdgridError, match=r"ccdgrid\[dask\]"):
        stack.correct_dask(None, detector)


# -- HDF5 ----------------------------------------------------------------------


def _write_source(path, data, **options):
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry/data", data=data, **options)
    return f"{path}::/entry/data"


@pytest.mark.parametrize("compression", ["gzip", None], ids=["gzip", "raw"])
@pytest.mark.parametrize("chunk_frames", [1, 6, 64], ids=["chunk1", "chunk6", "chunk64"])
def test_hdf5_matches_in_memory(tmp_path, detector, frames, compression, chunk_frames):
    src = _write_source(tmp_path / "in.h5", frames, chunks=(2, NY, NX), compression="gzip")
    result = stack.correct_hdf5(
        src,
        f"{tmp_path / 'out.h5'}::/processed/frames",
        detector,
        chunk_frames=chunk_frames,
        compression=compression,
        progress=False,
        workers=2,
    )
    assert result.shape == (N_FRAMES, NY, NX)
    assert result.dataset == "/processed/frames"
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        out = h5["/processed/frames"]
        assert out.chunks == (1, NY, NX)
        assert out.compression == compression
        assert out.shuffle == (compression is not None)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out[()], _matrix(detector).apply(frames))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "out.h5"]


@pytest.mark.parametrize("given", ["matrix", "detector"])
def test_hdf5_bounds_frame_matches_in_memory(tmp_path, barrel, frames, given):
    src = _write_source(tmp_path / "in.h5", frames[:6])
    matrix = _matrix(barrel, "bounds")
    if given == "matrix":
        source, options = matrix, {}
    else:
        source, options = barrel, {"shape_out": "bounds"}
    result = stack.correct_hdf5(
        src, tmp_path / "out.h5", source, progress=False, workers=2, **options
    )
    assert result.shape == (6, *matrix.shape_out)
    assert result.offset == matrix.offset
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        out = h5["/entry/data"]
        assert out.chunks == (1, *matrix.shape_out)
        np.testing.assert_array_equal(out.attrs["offset"], matrix.offset)
        np.testing.assert_array_equal(out[()], matrix.apply(frames[:6]))


def test_hdf5_records_a_zero_offset_for_the_input_frame(tmp_path, barrel, frames):
    src = _write_source(tmp_path / "in.h5", frames[:2])
    result = stack.correct_hdf5(src, tmp_path / "out.h5", barrel, progress=False)
    assert result.shape == (2, NY, NX)
    assert result.offset == (0, 0)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        np.testing.assert_array_equal(h5["/entry/data"].attrs["offset"], [0, 0])
    with pytest.raises(CcdgridError, match="`shape_out` must be None when"):
        stack.correct_hdf5(
            src, tmp_path / "o2.h5", _matrix(barrel), shape_out="input", progress=False
        )


def test_hdf5_normalize_and_default_dataset(tmp_path, detector, frames):
    src = _write_source(tmp_path / "in.h5", frames[:5].astype(np.float64))
    result = stack.correct_hdf5(
        src, tmp_path / "out.h5", detector, normalize=True, dummy=np.nan, progress=False
    )
    assert result.dataset == "/entry/data"
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        out = h5["/entry/data"][()]
    assert out.dtype == np.float64
    expected = _matrix(detector).apply(frames[:5].astype(np.float64), normalize=True, dummy=np.nan)
    np.testing.assert_array_equal(out, expected)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    ("progress", "terminal", "shown"),
    [(None, True, True), (None, False, False), (True, False, True), (False, True, False)],
    ids=["auto-tty", "auto-pipe", "forced", "quiet"],
)
def test_hdf5_progress_bar(tmp_path, detector, frames, monkeypatch, progress, terminal, shown):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    src = _write_source(tmp_path / "in.h5", frames)
    stack.correct_hdf5(src, tmp_path / "out.h5", detector, progress=progress)
    assert (f"{N_FRAMES}/{N_FRAMES}" in stderr.getvalue()) is shown
    assert ("correcting" in stderr.getvalue()) is shown


def test_hdf5_failure_leaves_no_file(tmp_path, detector, frames, monkeypatch):
    src = _write_source(tmp_path / "in.h5", frames, chunks=(1, NY, NX))
    existing = tmp_path / "out.h5"
    existing.write_bytes(b"previous result")
    calls = []
    real_apply = CorrectionMatrix.apply

    def fail_at_the_tenth_frame(self, image, **kwargs):
        calls.append(image.shape)
        if len(calls) == 10:
            raise RuntimeError("disk full (simulated)")
        return real_apply(self, image, **kwargs)

    monkeypatch.setattr(CorrectionMatrix, "apply", fail_at_the_tenth_frame)
    with pytest.raises(RuntimeError, match="simulated"):
        stack.correct_hdf5(src, existing, detector, progress=False, workers=2)
    # frame by frame, and at most 2 * workers frames were in flight when it failed
    assert set(calls) == {(NY, NX)}
    assert 10 <= len(calls) <= 10 + 4 < N_FRAMES
    assert existing.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "out.h5"]


def test_hdf5_corrupt_chunk_is_reported(tmp_path, detector, frames):
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        dset = h5.create_dataset(
            "/entry/data", data=frames, chunks=(1, NY, NX), compression="gzip", shuffle=True
        )
        dset.id.write_direct_chunk((3, 0, 0), b"not a zlib stream")
    with pytest.raises(CcdgridError, match=r"cannot inflate a chunk of .*in\.h5::/entry/data"):
        stack.correct_hdf5(
            f"{tmp_path / 'in.h5'}::/entry/data", tmp_path / "out.h5", detector, progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]


def test_hdf5_truncated_chunk_is_reported(tmp_path, detector, frames):
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        dset = h5.create_dataset("/entry/data", data=frames, chunks=(1, NY, NX), shuffle=True)
        dset.id.write_direct_chunk((3, 0, 0), frames[3].tobytes()[:-10])
    with pytest.raises(CcdgridError, match=r"holds 12278 bytes after its filters, expected 12288"):
        stack.correct_hdf5(
            f"{tmp_path / 'in.h5'}::/entry/data", tmp_path / "out.h5", detector, progress=False
        )


# source layouts: read chunk by chunk ("direct") or through HDF5 ("hdf5")
_LAYOUTS = {
    "raw-frames": ({"chunks": (1, NY, NX)}, "direct"),
    "gzip-shuffle-frames": (
        {"chunks": (1, NY, NX), "compression": "gzip", "shuffle": True},
        "direct",
    ),
    "gzip-3-frames": ({"chunks": (3, NY, NX), "compression": "gzip"}, "direct"),
    "shuffle-only-7-frames": ({"chunks": (7, NY, NX), "shuffle": True}, "direct"),
    "gzip-tiles": ({"chunks": (2, 32, 48), "compression": "gzip"}, "hdf5"),
    "lzf-frames": ({"chunks": (1, NY, NX), "compression": "lzf"}, "hdf5"),
    "fletcher32": ({"chunks": (1, NY, NX), "fletcher32": True}, "hdf5"),
    "contiguous": ({}, "hdf5"),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("dtype", ["<u2", ">u2", "<i4", ">f4", "<f8"])
def test_hdf5_reads_every_source_layout(tmp_path, detector, frames, layout, dtype):
    options, path = _LAYOUTS[layout]
    data = (frames.astype(np.int64) - 1000).astype(dtype) if dtype == "<i4" else frames
    data = data.astype(dtype)
    src = _write_source(tmp_path / "in.h5", data, **options)
    with h5py.File(tmp_path / "in.h5", "r") as h5:
        assert h5["/entry/data"].dtype == np.dtype(dtype)
        assert (_h5read.direct_filters(h5["/entry/data"]) is not None) == (path == "direct")
    stack.correct_hdf5(src, tmp_path / "out.h5", detector, chunk_frames=4, progress=False)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        out = h5["/entry/data"][()]
    np.testing.assert_array_equal(out, _matrix(detector).apply(data.astype(dtype[1:])))


def test_hdf5_unwritten_chunks_read_as_the_fill_value(tmp_path, detector, frames):
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        dset = h5.create_dataset(
            "/entry/data", shape=frames.shape, dtype=np.uint16, chunks=(2, NY, NX),
            compression="gzip", fillvalue=7,
        )  # fmt: skip
        dset[:6] = frames[:6]  # chunks 3 .. 9 are never allocated
    stack.correct_hdf5(
        f"{tmp_path / 'in.h5'}::/entry/data", tmp_path / "out.h5", detector, progress=False
    )
    expected = frames.copy()
    expected[6:] = 7
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        np.testing.assert_array_equal(h5["/entry/data"][()], _matrix(detector).apply(expected))


def test_hdf5_honours_a_chunk_whose_deflate_was_skipped(tmp_path, detector, frames):
    """HDF5 stores a chunk unfiltered by an optional filter when that filter fails."""
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        dset = h5.create_dataset(
            "/entry/data", data=frames, chunks=(1, NY, NX), compression="gzip", shuffle=True
        )
        shuffled = np.ascontiguousarray(frames[5].view(np.uint8).reshape(-1, 2).T)
        # pipeline (shuffle, deflate): bit 1 set = deflate not applied to this chunk
        dset.id.write_direct_chunk((5, 0, 0), shuffled.tobytes(), filter_mask=0b10)
    with h5py.File(tmp_path / "in.h5", "r") as h5:  # (reopened: HDF5 caches the old mask)
        assert h5["/entry/data"].id.read_direct_chunk((5, 0, 0))[0] == 0b10
        np.testing.assert_array_equal(h5["/entry/data"][5], frames[5])  # HDF5 itself agrees
    stack.correct_hdf5(
        f"{tmp_path / 'in.h5'}::/entry/data", tmp_path / "out.h5", detector, progress=False
    )
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        np.testing.assert_array_equal(h5["/entry/data"][()], _matrix(detector).apply(frames))


# -- the output chunks: HDF5's shuffle + deflate, built plane by plane ----------


@pytest.fixture(params=["zlib", "isal"])
def engine(request):
    if request.param == "zlib":
        return zlib
    return pytest.importorskip("isal.isal_zlib")


def _shuffled(frame):
    return np.ascontiguousarray(frame.view(np.uint8).reshape(-1, frame.itemsize).T).tobytes()


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (7, 5), (255, 257), (300, 301), (2, 65535)],
    ids=["one-pixel", "tiny", "one-full-block", "blocks-and-rest", "two-full-blocks"],
)
@pytest.mark.parametrize("kind", ["noise", "smooth", "constant", "float64"])
def test_deflater_output_is_the_shuffled_frame_as_one_zlib_stream(engine, shape, kind):
    rng = np.random.default_rng(5)
    if kind == "noise":
        frame = rng.uniform(0, 4000, shape).astype(np.float32)
    elif kind == "smooth":
        frame = np.round(np.add.outer(np.arange(shape[0]), np.arange(shape[1])) / 8.0)
        frame = frame.astype(np.float32)
    elif kind == "constant":
        frame = np.full(shape, 3.0, dtype=np.float32)
    else:
        frame = rng.normal(100, 10, shape)
    chunk = stack._Deflater(1, engine=engine)(frame)
    assert chunk.dtype == np.uint8
    assert chunk.ndim == 1
    # zlib.decompress checks the header, the final block and the Adler-32
    assert zlib.decompress(chunk.tobytes()) == _shuffled(frame)


def test_deflater_stores_noise_planes_and_deflates_the_others(engine):
    rng = np.random.default_rng(6)
    n = 256 * 256
    # three random low bytes (as the fraction of corrected counts), a constant top byte
    bits = rng.integers(0, 1 << 24, n, dtype=np.uint32) | np.uint32(0x44 << 24)
    frame = bits.view(np.float32).reshape(256, 256)
    chunk = stack._Deflater(1, engine=engine)(frame)
    stored_planes = 3 * (n + 5 * 2)  # two stored blocks per 65536-byte plane
    # header, three stored planes, the deflated constant plane (< 1 KB), Adler-32
    assert stored_planes + 2 + 4 < chunk.nbytes < stored_planes + 2 + 4 + 1000
    assert zlib.decompress(chunk.tobytes()) == _shuffled(frame)


def test_deflater_deflates_a_smooth_frame_well(engine):
    frame = np.full((256, 256), 1500.0, dtype=np.float32)
    frame[100:] = 20.0
    chunk = stack._Deflater(1, engine=engine)(frame)
    assert chunk.nbytes < 0.01 * frame.nbytes
    assert zlib.decompress(chunk.tobytes()) == _shuffled(frame)


def test_deflater_moves_stored_planes_after_a_deflated_one(engine):
    rng = np.random.default_rng(8)
    # a zero low byte (deflated, first in the stream) under three random bytes (stored)
    bits = rng.integers(0, 1 << 24, 300 * 301, dtype=np.uint32) << np.uint32(8)
    frame = bits.view(np.float32).reshape(300, 301)
    chunk = stack._Deflater(1, engine=engine)(frame)
    assert chunk.nbytes < 3.01 * frame.size
    assert zlib.decompress(chunk.tobytes()) == _shuffled(frame)


def test_deflater_codes_only_the_exponent_of_fractional_counts_huffman_only(engine):
    rng = np.random.default_rng(9)
    frame = rng.uniform(100, 5000, (256, 300)).astype(np.float32)
    deflate = stack._Deflater(1, engine=engine)
    planes = frame.reshape(-1).view(np.uint8).reshape(-1, 4).T
    modes = [deflate._plan(p)[0] for p in planes]
    assert modes == ["store", "store", "store", "huffman"]
    buffer = np.empty(stack._Deflater.bound(frame.shape, frame.dtype), dtype=np.uint8)
    for _ in range(2):  # the same buffer twice: nothing left over from the first frame
        chunk = deflate(frame, buffer)
        assert np.shares_memory(chunk, buffer)
        assert zlib.decompress(chunk.tobytes()) == _shuffled(frame)
        frame = frame[::-1].copy()
    # three stored planes and a Huffman-coded exponent byte (2.2 bits a byte
    # here, where the engine's level 1 deflate needs more)
    exponent = planes[3].copy()
    assert chunk.nbytes < 3.01 * frame.size + 2.4 / 8 * frame.size
    assert chunk.nbytes - 3.01 * frame.size < len(engine.compress(exponent, 1))


def test_deflater_deflates_planes_with_repeats(engine):
    # long runs of one value: LZ77 matches beat a 1-bit-a-byte Huffman code
    frame = np.repeat(np.arange(64, dtype=np.float32) * 3.5 + 1000, 64 * 64).reshape(256, 1024)
    deflate = stack._Deflater(1, engine=engine)
    planes = frame.reshape(-1).view(np.uint8).reshape(-1, 4).T
    assert [deflate._plan(p)[0] for p in planes] == ["deflate"] * 4
    chunk = deflate(frame)
    assert chunk.nbytes < 0.01 * frame.nbytes
    assert zlib.decompress(chunk.tobytes()) == _shuffled(frame)


def test_hdf5_stream_reuses_its_buffers(tmp_path, detector, monkeypatch):
    rng = np.random.default_rng(10)
    frames = rng.integers(0, 60000, (30, NY, NX), dtype=np.uint16)
    src = _write_source(tmp_path / "in.h5", frames, chunks=(1, NY, NX))
    outputs, inputs = [], set()
    new_output = stack._FrameCorrector.new_output
    read = stack._Reader.read

    def counted_output(self):
        outputs.append(new_output(self))
        return outputs[-1]

    def counted_read(self, i0, count, buffer=None):
        payload, buffer = read(self, i0, count, buffer)
        inputs.add(id(buffer))
        return payload, buffer

    monkeypatch.setattr(stack._FrameCorrector, "new_output", counted_output)
    monkeypatch.setattr(stack._Reader, "read", counted_read)
    stack.correct_hdf5(src, tmp_path / "out.h5", detector, workers=2, progress=False)
    # at most 2 * workers frames in flight, whatever the number of frames
    assert 1 <= len(outputs) <= 4
    assert 1 <= len(inputs) <= 4
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        np.testing.assert_array_equal(h5["/entry/data"][()], _matrix(detector).apply(frames))


@pytest.mark.parametrize("level", [1, 6, 9])
def test_hdf5_output_is_a_plain_gzip_dataset(tmp_path, detector, frames, level):
    src = _write_source(tmp_path / "in.h5", frames[:4])
    result = stack.correct_hdf5(
        src, tmp_path / "out.h5", detector, compression_level=level, progress=False
    )
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        out = h5["/entry/data"]
        assert out.compression == "gzip"
        assert out.compression_opts == level
        assert out.shuffle
        np.testing.assert_array_equal(out[()], _matrix(detector).apply(frames[:4]))
        stored = sum(out.id.get_chunk_info(i).size for i in range(out.id.get_num_chunks()))
    assert result.stored_bytes == stored
    assert result.compression_ratio == pytest.approx(stored / (4 * NY * NX * 4))


def test_hdf5_rejects_a_two_dimensional_dataset(tmp_path, detector, frames):
    src = _write_source(tmp_path / "in.h5", frames[0])
    with pytest.raises(CcdgridError, match=r"has shape \(64, 96\): a stack must be 3-D"):
        stack.correct_hdf5(src, tmp_path / "out.h5", detector, progress=False)
    assert not (tmp_path / "out.h5").exists()


def test_hdf5_rejects_an_empty_stack(tmp_path, detector):
    src = _write_source(tmp_path / "in.h5", np.zeros((0, NY, NX), dtype=np.uint16))
    with pytest.raises(CcdgridError, match="holds no frame"):
        stack.correct_hdf5(src, tmp_path / "out.h5", detector, progress=False)


def test_hdf5_rejects_a_shape_mismatch(tmp_path, detector, frames):
    src = _write_source(tmp_path / "in.h5", frames[:, :, :-1])
    with pytest.raises(CcdgridError, match=r"frames of shape \(64, 95\).*\(64, 96\)"):
        stack.correct_hdf5(src, tmp_path / "out.h5", detector, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_frames": 0}, "`chunk_frames` must be a positive int"),
        ({"compression": "lzf"}, "`compression` must be 'gzip' or None"),
        ({"compression_level": 0}, "`compression_level` must be an int from 1 to 9"),
        ({"compression_level": 10}, "`compression_level` must be an int from 1 to 9"),
        ({"workers": 0}, "`workers` must be a positive int"),
        ({"progress": "yes"}, "`progress` must be True, False or None"),
    ],
    ids=["chunk", "compression", "level0", "level10", "workers", "progress"],
)
def test_hdf5_rejects_bad_options(tmp_path, detector, frames, kwargs, message):
    src = _write_source(tmp_path / "in.h5", frames[:2])
    with pytest.raises(CcdgridError, match=message):
        stack.correct_hdf5(src, tmp_path / "out.h5", detector, **{"progress": False, **kwargs})


def test_hdf5_rejects_bad_paths(tmp_path, detector, frames):
    src = _write_source(tmp_path / "in.h5", frames[:2])
    with pytest.raises(CcdgridError, match="`src` must name a dataset"):
        stack.correct_hdf5(tmp_path / "in.h5", tmp_path / "out.h5", detector, progress=False)
    with pytest.raises(CcdgridError, match="has no dataset '/missing'"):
        stack.correct_hdf5(
            f"{tmp_path / 'in.h5'}::/missing", tmp_path / "out.h5", detector, progress=False
        )
    with pytest.raises(CcdgridError, match="must not be the source file"):
        stack.correct_hdf5(src, f"{tmp_path / 'in.h5'}::/out", detector, progress=False)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CcdgridError, match="cannot open"):
        stack.correct_hdf5(
            f"{tmp_path / 'text.h5'}::/x", tmp_path / "out.h5", detector, progress=False
        )


def _parser():
    parser = argparse.ArgumentParser(prog="ccdgrid")
    stack.add_correct_stack_parser(parser.add_subparsers(dest="command"))
    return parser


def test_command_line_parser_runs_correct_hdf5(tmp_path, detector, frames, monkeypatch, capsys):
    src = _write_source(tmp_path / "in.h5", frames[:3])
    frames_asked = []

    def as_matrix(d, name="", shape_out=None):
        frames_asked.append(shape_out)
        return _matrix(detector)

    monkeypatch.setattr(stack, "_as_matrix", as_matrix)
    args = _parser().parse_args(
        ["correct-stack", src, "-d", "det.h5", "-o", str(tmp_path / "out.h5"), "--chunk", "2",
         "--level", "6", "--workers", "3", "--quiet"]
    )  # fmt: skip
    assert args.debug is False
    args.run(args)
    assert "wrote" in capsys.readouterr().out
    assert frames_asked == ["cover"]  # the command's default frame
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["/entry/data"].compression_opts == 6
        np.testing.assert_array_equal(h5["/entry/data"][()], _matrix(detector).apply(frames[:3]))


def test_command_line_defaults_and_progress(monkeypatch, capsys):
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        return stack.StackResult(Path("o.h5"), "/entry/data", (2, 3, 4), np.dtype("f4"), 1.0, 48)

    monkeypatch.setattr(stack, "correct_hdf5", record)
    args = _parser().parse_args(["correct-stack", "in.h5::/x", "-d", "d.h5", "-o", "o.h5"])
    args.run(args)
    assert (
        "2 frames of 3 x 4 float32 (frame cover, offset 0 0) in 1.00 s (2.0 frames/s, "
        "50 % of the raw size)" in capsys.readouterr().out
    )
    assert seen == {
        "shape_out": "cover",
        "chunk_frames": None,
        "compression": "gzip",
        "compression_level": 1,
        "normalize": False,
        "progress": None,  # tqdm decides: shown on a terminal only
        "workers": None,
    }


@pytest.mark.parametrize(
    "option", [["--chunk", "0"], ["--level", "0"], ["--level", "10"], ["--workers", "x"]]
)
def test_command_line_rejects_bad_numbers(option, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["correct-stack", "i.h5::/x", "-d", "d.h5", "-o", "o.h5", *option])
    assert "expected" in capsys.readouterr().err


def test_command_line_writes_the_frame_and_its_offset(tmp_path, barrel, frames, capsys):
    from ccdgrid.detector_file import load, save_detector

    det = save_detector(
        tmp_path / "det.h5",
        types.SimpleNamespace(
            dy=barrel.dy, dx=barrel.dx, pixel_size=(5e-5, 5e-5), mask=barrel.mask
        ),
    )
    rec = load(det)  # the file holds float32 maps: build the expectation from them
    src = _write_source(tmp_path / "in.h5", frames[:3])
    base = ["correct-stack", src, "-d", str(det), "--quiet"]
    for frame, argv in [
        ("cover", []),
        ("bounds", ["--frame", "bounds"]),
        ("input", ["--frame", "input"]),
    ]:
        out = tmp_path / f"{frame}.h5"
        args = _parser().parse_args([*base, "-o", str(out), *argv])
        args.run(args)
        matrix = CorrectionMatrix.from_maps(rec.dy, rec.dx, mask=rec.mask, shape_out=frame)
        oy, ox = matrix.offset
        ny, nx = matrix.shape_out
        assert f"3 frames of {ny} x {nx} float32 (frame {frame}, offset {oy} {ox})" in (
            capsys.readouterr().out
        )
        with h5py.File(out, "r") as h5:
            np.testing.assert_array_equal(h5["/entry/data"].attrs["offset"], [oy, ox])
            np.testing.assert_array_equal(h5["/entry/data"][()], matrix.apply(frames[:3]))
    assert (oy, ox) == (0, 0)
    assert (ny, nx) == (NY, NX)


def test_deflater_clears_the_vector_state_after_each_compression(engine, monkeypatch):
    # ISA-L's AVX-512 code leaves the upper vector registers dirty, which
    # slows every later SSE instruction of the thread (the next frame's
    # correction 4x, the Huffman kernel 3x): a clear follows the engine's
    # calls before any kernel of ours runs, and ends every frame
    events = []
    real = (engine.compress, engine.compressobj, engine.adler32)

    class Spy:
        DEFLATED = engine.DEFLATED

        @staticmethod
        def compress(*args):
            events.append("engine")
            return real[0](*args)

        @staticmethod
        def compressobj(*args):
            events.append("engine")
            return real[1](*args)

        @staticmethod
        def adler32(*args):
            events.append("engine")
            return real[2](*args)

    monkeypatch.setattr(stack, "clear_upper_vector_state", lambda: events.append("clear"))
    huffman = stack._Deflater._huffman

    def spy_huffman(self, *args):
        events.append("kernel")
        return huffman(self, *args)

    monkeypatch.setattr(stack._Deflater, "_huffman", spy_huffman)
    rng = np.random.default_rng(12)
    frame = rng.uniform(100, 5000, (64, 80)).astype(np.float32)
    frame[:32] = 7.0  # a deflated half and a Huffman-coded half, in two frames
    for image in (frame, frame[32:]):
        events.clear()
        chunk = stack._Deflater(1, engine=Spy)(image)
        assert zlib.decompress(chunk.tobytes()) == _shuffled(image)
        assert events[-1] == "clear"
        dirty = False
        for event in events:
            assert not (dirty and event == "kernel")
            dirty = event == "engine" or (dirty and event != "clear")
    assert "kernel" in events


def test_an_output_that_cannot_be_written_is_refused_before_any_frame(
    tmp_path, detector, frames, monkeypatch
):
    # a directory as the output: every frame was corrected, then os.replace
    # failed on the temporary file
    import ccdgrid._h5write as h5write

    src = _write_source(tmp_path / "in.h5", frames)
    monkeypatch.setattr(stack, "_Reader", None)  # no frame may be read
    (tmp_path / "adir").mkdir()
    with pytest.raises(
        CcdgridError, match=r"cannot write the corrected stack .*adir: it is a dir"
    ):
        stack.correct_hdf5(src, tmp_path / "adir", detector, progress=False)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = os.access
    monkeypatch.setattr(
        h5write.os, "access", lambda p, mode: False if str(p) == str(read_only) else real(p, mode)
    )
    with pytest.raises(CcdgridError, match=f"directory {read_only} is not writable"):
        stack.correct_hdf5(src, read_only / "out.h5", detector, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["adir", "in.h5", "ro"]
