"""Large HDF5 writes past the page cache (O_DIRECT): same bytes, and really direct."""

import errno
import os

import h5py
import numpy as np
import pytest

from ccdgrid import _h5write, stack
from ccdgrid._h5write import ALIGN, DIRECT_MIN, _direct_fd, _Sink, aligned_empty
from ccdgrid.correction import CorrectionMatrix


@pytest.fixture
def sink(tmp_path):
    path = tmp_path / "f.bin"
    path.touch()
    with open(path, "r+b", buffering=0) as raw, _direct_fd(path, True) as fd:
        if fd is None:
            pytest.skip("this filesystem refuses O_DIRECT")
        yield _Sink(raw, fd), path


def _spy(monkeypatch):
    """Record the bytes each write sent past the page cache."""
    done = []
    real = _Sink._write_direct

    def spy(self, view):
        done.append(real(self, view))
        return done[-1]

    monkeypatch.setattr(_Sink, "_write_direct", spy)
    return done


def _payload(nbytes, rng, aligned=True):
    data = aligned_empty((nbytes,), np.uint8) if aligned else np.empty(nbytes + 1, np.uint8)[1:]
    data[...] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    return data


@pytest.mark.parametrize("shape", [(5,), (3, 7), (1000, 1001)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_aligned_empty_starts_on_a_block_boundary(shape, dtype):
    a = aligned_empty(shape, dtype)
    assert a.shape == shape
    assert a.dtype == dtype
    assert a.flags.c_contiguous
    assert a.__array_interface__["data"][0] % ALIGN == 0


@pytest.mark.parametrize("tail", [0, 1, 4095, 2048])
def test_whole_blocks_go_direct_and_the_tail_through_the_cache(sink, monkeypatch, tail):
    out, path = sink
    done = _spy(monkeypatch)
    rng = np.random.default_rng(1)
    head = _payload(3 * ALIGN, rng)
    big = _payload(DIRECT_MIN + tail, rng)
    out.write(head)  # at offset 0, under DIRECT_MIN: through the cache
    out.write(big)  # at a 4 KiB offset, from aligned memory: direct
    assert done == [0, DIRECT_MIN]
    assert out.error is None
    assert out.tell() == head.nbytes + big.nbytes
    assert path.read_bytes() == head.tobytes() + big.tobytes()


def test_unaligned_memory_or_offset_is_written_through_the_cache(sink, monkeypatch):
    out, path = sink
    done = _spy(monkeypatch)
    rng = np.random.default_rng(2)
    loose = _payload(DIRECT_MIN, rng, aligned=False)
    odd = _payload(DIRECT_MIN, rng)
    out.write(loose)  # memory off a boundary
    out.write(b"x")
    out.write(odd)  # file offset off a boundary
    assert done == [0, 0, 0]
    assert path.read_bytes() == loose.tobytes() + b"x" + odd.tobytes()


def test_a_rewrite_of_cached_bytes_reads_back_the_direct_ones(sink):
    out, path = sink
    rng = np.random.default_rng(3)
    first = _payload(DIRECT_MIN, rng)
    out.write(first)  # direct
    out.seek(10)
    out.write(b"abc")  # through the cache, inside the direct range
    out.seek(0)
    back = bytearray(DIRECT_MIN)
    assert out.readinto(back) == DIRECT_MIN
    expected = first.tobytes()
    expected = expected[:10] + b"abc" + expected[13:]
    assert bytes(back) == expected
    assert path.read_bytes() == expected


def test_a_device_that_refuses_the_alignment_falls_back_to_the_cache(sink, monkeypatch):
    out, path = sink
    real = os.pwrite

    def refuse(fd, data, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(_h5write.os, "pwrite", refuse)
    big = _payload(2 * DIRECT_MIN, np.random.default_rng(4))
    out.write(big)
    monkeypatch.setattr(_h5write.os, "pwrite", real)
    assert out.error is None
    assert out._direct is None  # not tried again
    assert path.read_bytes() == big.tobytes()


def test_another_error_of_a_direct_write_is_kept(sink, monkeypatch):
    out, _ = sink

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_h5write.os, "pwrite", full)
    out.write(_payload(DIRECT_MIN, np.random.default_rng(5)))
    assert out.error is not None
    assert out.error.errno == errno.ENOSPC


@pytest.mark.parametrize("compression", ["gzip", None], ids=["gzip", "raw"])
def test_a_stack_s_chunks_are_written_direct_and_read_back_equal(
    tmp_path, monkeypatch, compression
):
    (tmp_path / "probe").touch()
    if _direct_fd_refused(tmp_path / "probe"):
        pytest.skip("this filesystem refuses O_DIRECT")
    rng = np.random.default_rng(6)
    ny, nx = 640, 768  # a float32 frame of 1.9 MB: above DIRECT_MIN, deflated or not
    yy, xx = np.mgrid[0 : ny + 1, 0 : nx + 1]
    dy, dx = 0.7 * np.sin(xx / 50.0), 0.5 * np.cos(yy / 40.0)
    frames = rng.integers(100, 4000, (3, ny, nx), dtype=np.uint16)
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5.create_dataset("/entry/data", data=frames, chunks=(1, ny, nx))
    matrix = CorrectionMatrix.from_maps(dy, dx)
    done = _spy(monkeypatch)
    result = stack.correct_hdf5(
        f"{tmp_path / 'in.h5'}::/entry/data",
        tmp_path / "out.h5",
        matrix,
        compression=compression,
        progress=False,
        workers=2,
    )
    assert sum(done) > 0.95 * result.stored_bytes  # all but each chunk's last partial block
    assert sum(d > 0 for d in done) == 3
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        np.testing.assert_array_equal(h5["/entry/data"][()], matrix.apply(frames))


def _direct_fd_refused(path):
    with _direct_fd(path, True) as fd:
        return fd is None


def test_a_detector_file_written_direct_holds_what_the_page_cache_way_writes(
    tmp_path, monkeypatch
):
    import contextlib

    from ccdgrid.detector_file import save_detector
    from ccdgrid.pipeline import calibrate
    from ccdgrid.synthetic import grid_image

    (tmp_path / "probe").touch()
    if _direct_fd_refused(tmp_path / "probe"):
        pytest.skip("this filesystem refuses O_DIRECT")
    cal = calibrate(grid_image((512, 640), pitch_px=40.0, seed=7).image, cv_folds=0)
    done = _spy(monkeypatch)
    save_detector(tmp_path / "direct.h5", cal)
    assert sum(d > 0 for d in done) >= 5  # the corner array's chunks, at least
    monkeypatch.setattr(_h5write, "_direct_fd", lambda path, wanted: contextlib.nullcontext())
    save_detector(tmp_path / "cached.h5", cal)

    def contents(path):
        found = {}
        with h5py.File(path, "r") as h5:
            h5.visititems(
                lambda name, obj: (
                    found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
                )
            )
        return found

    direct, cached = contents(tmp_path / "direct.h5"), contents(tmp_path / "cached.h5")
    assert direct.keys() == cached.keys()
    for name, value in cached.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(direct[name], value, err_msg=name)
        elif "date" not in name.lower() and "time" not in name.lower():
            assert direct[name] == value, name
