"""The detector file: pyFAI loads it, it matches pyFAI's own corners, it round-trips."""

import datetime
import os
import sys
import types
import zlib
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from pyFAI import detector_factory
from pyFAI.detectors import Detector
from pyFAI.distortion import Distortion
from pyFAI.io import Nexus

import ccdgrid
from ccdgrid import detector_file
from ccdgrid.detector_file import load, save_detector
from ccdgrid.errors import CcdgridError

PIXEL_SIZE = (51.0e-6, 49.5e-6)  # (pixel1 = y, pixel2 = x), deliberately unequal


def _calibration(size, seed=0, **overrides):
    """A calibration-like object of image shape ``size``, with smooth, distinct dy and dx."""
    rng = np.random.default_rng(seed)
    shape = ny, nx = size
    y, x = np.mgrid[0 : ny + 1, 0 : nx + 1] / max(shape)
    dy = 2.5 * np.sin(3 * y + 1) * np.cos(2 * x) + rng.normal(0, 1e-3, y.shape)
    dx = -1.5 * np.cos(2 * y - x) + 0.3 * x + rng.normal(0, 1e-3, y.shape)
    mask = np.zeros(shape, dtype=np.int8)
    mask[: ny // 5, : nx // 3] = 1
    mask[-1, -1] = 1
    n, m = 12, 15  # holes fitted, holes found
    fields = {
        "shape": shape,
        "pixel_size": PIXEL_SIZE,
        "dx": dx.astype(np.float32),
        "dy": dy.astype(np.float32),
        "mask": mask,
        "grid": SimpleNamespace(
            P=np.array([10.0, 12.0, 98.0, 0.5, -0.4, 97.5]),
            origin=np.array([12.0, 10.0]),
            vectors=np.array([[97.5, -0.4], [0.5, 98.0]]),
            pixel_size=PIXEL_SIZE,
            indices=rng.integers(-5, 5, (n, 2)),
            ideal=rng.uniform(0, min(shape), (n, 2)),
            displacement=rng.normal(0, 1, (n, 2)),
            residuals=rng.normal(0, 0.02, (n, 2)),
            residual_rms=np.float64(0.75),
            method_used="lsq",
            seed_result={"not": "recorded"},
        ),
        "holes": SimpleNamespace(peaks=rng.uniform(0, min(shape), (m, 2))),
        "lattice": SimpleNamespace(
            indices=rng.integers(-5, 5, (m, 2)), valid=np.arange(m) % 5 != 0
        ),
        "params": {"threshold": np.float32(0.25), "hole_diameter": 10.5, "backend": "cython"},
        "source": {"path": "/data/grid.edf", "sha256": "ab" * 32},
        "pitch": 5e-3,
    }
    fields.update(overrides)
    return SimpleNamespace(**fields)


def _pyfai_reference(cal):
    """pyFAI's own detector with the same corner maps (the parity oracle)."""
    det = Detector(*cal.pixel_size, max_shape=cal.shape)
    det.set_dx(cal.dx)
    det.set_dy(cal.dy)
    return det


def _expected_corners(cal):
    """Corners from the convention alone, in float64: (i, j) at (p1 (i + dy), p2 (j + dx))."""
    ny, nx = cal.shape
    p1, p2 = cal.pixel_size
    y = p1 * (np.arange(ny + 1)[:, None] + cal.dy.astype(np.float64))
    x = p2 * (np.arange(nx + 1)[None, :] + cal.dx.astype(np.float64))
    out = np.zeros((ny, nx, 4, 3))
    for k, (di, dj) in enumerate([(0, 0), (1, 0), (1, 1), (0, 1)]):  # A, B, C, D
        out[:, :, k, 1] = y[di : di + ny, dj : dj + nx]
        out[:, :, k, 2] = x[di : di + ny, dj : dj + nx]
    return out


@pytest.fixture(params=[(37, 53), (64, 64), (1000, 700)], ids=["37x53", "64x64", "1000x700"])
def shape(request):
    return request.param


# -- pyFAI reads what we write ---------------------------------------------------------


def test_pyfai_loads_the_file_with_our_corners_and_mask(tmp_path, shape):
    cal = _calibration(shape)
    path = save_detector(tmp_path / "det.h5", cal)

    det = detector_factory(str(path))
    corners = det.get_pixel_corners()

    assert det.shape == shape
    assert det.max_shape == shape
    assert (det.pixel1, det.pixel2) == PIXEL_SIZE
    assert corners.dtype == np.float32
    assert corners.shape == (*shape, 4, 3)
    # float32 rounding of the float64 positions: half an ulp, 2**-24 relative
    np.testing.assert_allclose(corners, _expected_corners(cal), rtol=2**-23, atol=0)
    np.testing.assert_array_equal(det.mask, cal.mask)
    assert not det.uniform_pixel


def test_corners_equal_pyfai_set_dx_set_dy_bit_for_bit(tmp_path, shape):
    cal = _calibration(shape, seed=5)
    path = save_detector(tmp_path / "det.h5", cal)

    ours = detector_factory(str(path)).get_pixel_corners()

    np.testing.assert_array_equal(ours, _pyfai_reference(cal).get_pixel_corners())


@pytest.mark.parametrize(("shift_y", "shift_x"), [(0, 1), (2, 0), (1, -1)])
def test_pyfai_distortion_moves_pixels_the_documented_way(tmp_path, shift_y, shift_x):
    """True position = nominal + (dy, dx): pixel (i, j)'s content lands at (i + dy, j + dx)."""
    ny, nx = 24, 32
    cal = SimpleNamespace(
        dx=np.full((ny + 1, nx + 1), shift_x, np.float32),
        dy=np.full((ny + 1, nx + 1), shift_y, np.float32),
        pixel_size=(1e-4, 1e-4),
        mask=None,
    )
    path = save_detector(tmp_path / "shift.h5", cal)
    image = np.random.default_rng(0).uniform(1, 2, (ny, nx)).astype(np.float32)

    corrected = Distortion(detector_factory(str(path)), resize=False).correct(image)

    moved = corrected[
        max(shift_y, 0) : ny + min(shift_y, 0), max(shift_x, 0) : nx + min(shift_x, 0)
    ]
    source = image[
        max(-shift_y, 0) : ny - max(shift_y, 0), max(-shift_x, 0) : nx - max(shift_x, 0)
    ]
    # float32 corners in metres are not exact multiples of the pixel: tiny stray weights
    np.testing.assert_allclose(moved, source, rtol=0, atol=1e-4)


def test_many_small_chunks_and_a_partial_last_one(tmp_path, monkeypatch):
    monkeypatch.setattr(detector_file, "_CHUNK_BYTES", 1500)  # 3 rows of 31 pixels per chunk
    cal = _calibration((20, 31), seed=2)
    path = save_detector(tmp_path / "det.h5", cal, workers=3)

    with h5py.File(path) as h5:
        assert h5["entry/pyFAI/ccdgrid/pixel_corners"].chunks == (3, 31, 4, 1)
    ours = detector_factory(str(path)).get_pixel_corners()
    np.testing.assert_array_equal(ours, _pyfai_reference(cal).get_pixel_corners())
    np.testing.assert_array_equal(load(path).dx, cal.dx)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_compression_and_threads_do_not_change_the_values(tmp_path, workers, level):
    cal = _calibration((30, 41), seed=3)
    path = save_detector(tmp_path / "det.h5", cal, workers=workers, compression_level=level)

    ours = detector_factory(str(path)).get_pixel_corners()

    np.testing.assert_array_equal(ours, _pyfai_reference(cal).get_pixel_corners())


def test_plain_zlib_when_isal_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)  # makes `import isal` fail
    assert detector_file._compressor(2).keywords["engine"] is zlib
    cal = _calibration((30, 41), seed=8)
    path = save_detector(tmp_path / "det.h5", cal)

    ours = detector_factory(str(path)).get_pixel_corners()

    np.testing.assert_array_equal(ours, _pyfai_reference(cal).get_pixel_corners())
    np.testing.assert_array_equal(load(path).dy, cal.dy)


@pytest.fixture(params=["zlib", "isal"])
def deflate(request, monkeypatch):
    """Which deflate the save uses: zlib byte plane by byte plane, or ISA-L if installed."""
    if request.param == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)
    return request.param


@pytest.mark.parametrize("level", [1, 2, 3, 9])
def test_every_deflate_level_gives_pyfai_the_same_corners(tmp_path, deflate, level):
    cal = _calibration((23, 37), seed=9)
    path = save_detector(tmp_path / "det.h5", cal, compression_level=level, workers=2)

    ours = detector_factory(str(path)).get_pixel_corners()

    np.testing.assert_array_equal(ours, _pyfai_reference(cal).get_pixel_corners())
    record = load(path)
    np.testing.assert_array_equal(record.dx, cal.dx)
    np.testing.assert_array_equal(record.dy, cal.dy)


def _shuffled(chunk):
    """HDF5's shuffle filter, written independently of the code under test."""
    raw = np.frombuffer(chunk.tobytes(), np.uint8).reshape(chunk.size, chunk.itemsize)
    return np.ascontiguousarray(raw.T)


def _unshuffle(raw, dtype, shape):
    """Undo HDF5's shuffle filter, written independently of the code under test."""
    itemsize = np.dtype(dtype).itemsize
    planes = np.frombuffer(raw, np.uint8).reshape(itemsize, -1)
    return planes.T.copy().view(dtype).reshape(shape)


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(("i0", "i1"), [(0, 3), (3, 6), (6, 7)])  # (6, 7): partial last chunk
def test_corner_planes_are_the_shuffled_float32_corner_chunk(backend, axis, i0, i1):
    rng = np.random.default_rng(21)
    ny, nx, rows = 7, 13, 3
    corner_map = rng.normal(0, 4, (ny + 1, nx + 1)).astype(np.float32)
    pixel = PIXEL_SIZE[axis]
    out = np.full((4, rows * nx * 4), 0xAB, dtype=np.uint8)  # padding must be zeroed

    detector_file._planes_engine(backend).corner_planes(corner_map, pixel, i0, i1, axis, out)

    index = np.arange(ny + 1)[:, None] if axis == 0 else np.arange(nx + 1)[None, :]
    v = (pixel * (corner_map.astype(np.float64) + index)).astype("<f4")[i0 : i1 + 1]
    chunk = np.zeros((rows, nx, 4), dtype="<f4")
    chunk[: i1 - i0] = np.stack([v[:-1, :-1], v[1:, :-1], v[1:, 1:], v[:-1, 1:]], axis=-1)
    np.testing.assert_array_equal(out, _shuffled(chunk))


def test_both_backends_write_the_same_bytes(tmp_path):
    cal = _calibration((45, 38), seed=12)
    chunks = {}
    for name in ("cython", "numpy"):
        path = save_detector(tmp_path / f"{name}.h5", cal, backend=name, workers=2)
        with h5py.File(path, "r") as h5:
            node = h5["entry/pyFAI/ccdgrid/pixel_corners"].id
            offsets = [node.get_chunk_info(k).chunk_offset for k in range(node.get_num_chunks())]
            chunks[name] = [node.read_direct_chunk(o) for o in offsets]

    assert chunks["cython"] == chunks["numpy"]


@pytest.mark.parametrize("engine_name", ["zlib", "isal"])
@pytest.mark.parametrize("level", [0, 1, 2, 3, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
def test_plane_wise_stream_is_a_plain_zlib_stream(level, dtype, engine_name):
    engine = zlib if engine_name == "zlib" else pytest.importorskip("isal.isal_zlib")
    engine_level = level if engine is zlib else min(level, 2)  # ISA-L has levels 0-3
    rng = np.random.default_rng(10)
    chunk = (rng.normal(0, 1, (5, 301, 4)) * 1e3).astype(dtype)

    stream = detector_file._deflate_planes(
        lambda: _shuffled(chunk), level=engine_level, store_low=level <= 2, engine=engine
    )

    # zlib.decompress checks the header, every block and the Adler-32 trailer
    raw = zlib.decompress(stream)
    np.testing.assert_array_equal(_unshuffle(raw, dtype, chunk.shape), chunk)


def test_plane_wise_stream_clears_the_vector_state_after_deflating(monkeypatch):
    # ISA-L's AVX-512 deflate leaves the upper vector registers dirty, which
    # slows the next chunk's plane building (an SSE kernel) on the same thread
    events = []
    real = zlib.compressobj

    def compressobj(*args):
        events.append("deflate")
        return real(*args)

    engine = types.SimpleNamespace(
        compressobj=compressobj, DEFLATED=zlib.DEFLATED, adler32=zlib.adler32
    )
    monkeypatch.setattr(detector_file, "clear_upper_vector_state", lambda: events.append("clear"))
    chunk = np.arange(4 * 301, dtype=np.float32).reshape(4, 301)
    stream = detector_file._deflate_planes(
        lambda: _shuffled(chunk), level=2, store_low=True, engine=engine
    )
    assert zlib.decompress(stream) == _shuffled(chunk).tobytes()
    assert events.count("deflate") == 3  # the low byte plane is stored by zlib
    assert events[-1] == "clear"


def test_fast_levels_store_the_low_byte_plane_and_higher_levels_deflate_it():
    rng = np.random.default_rng(11)
    chunk = (0.05 + 1e-3 * rng.random((8, 256, 4))).astype(np.float32)  # low byte: noise
    low_plane = chunk.size  # bytes of one byte plane

    fast = detector_file._deflate_planes(
        lambda: _shuffled(chunk), level=2, store_low=True, engine=zlib
    )
    full = detector_file._deflate_planes(
        lambda: _shuffled(chunk), level=3, store_low=False, engine=zlib
    )

    # stored blocks cost 5 bytes of header each, at most 65535 bytes apiece
    assert len(fast) > low_plane
    assert len(full) < len(fast)
    assert zlib.decompress(fast) == zlib.decompress(full)


def test_the_zero_z_plane_is_not_written_and_reads_as_zeros(tmp_path, deflate):
    cal = _calibration((40, 33), seed=12)
    path = save_detector(tmp_path / "det.h5", cal)

    with h5py.File(path) as h5:
        corners = h5["entry/pyFAI/ccdgrid/pixel_corners"]
        stored = [
            corners.id.get_chunk_info(k).chunk_offset for k in range(corners.id.get_num_chunks())
        ]
        z = corners[..., 0]
    assert sorted({offset[3] for offset in stored}) == [1, 2]  # y and x planes only
    np.testing.assert_array_equal(z, np.zeros((40, 33, 4), np.float32))


def test_pyfai_sees_exactly_one_detector(tmp_path):
    path = save_detector(tmp_path / "det.h5", _calibration((16, 16)), name="frelon_1")

    with Nexus(str(path), "r") as nxs:
        found = [grp.name for grp in nxs.find_detector(all=True)]
    assert found == ["/entry/pyFAI/frelon_1"]
    assert detector_factory(str(path)).aliases[0] == "frelon 1"


def test_file_layout(tmp_path):
    cal = _calibration((16, 24))
    path = save_detector(tmp_path / "det.h5", cal)

    with h5py.File(path) as h5:
        assert h5.attrs["NX_class"] == "NXroot"
        assert h5["entry"].attrs["NX_class"] == "NXentry"
        assert h5["entry/pyFAI"].attrs["NX_class"] == "NXsubentry"
        det = h5["entry/pyFAI/ccdgrid"]
        assert det.attrs["NX_class"] == "NXdetector"
        assert det["API_VERSION"][()] == b"1.2"
        assert det["CORNERS"][()] == 4
        np.testing.assert_array_equal(det["pixel_size"][()], PIXEL_SIZE)
        assert det["pixel_size"].attrs["unit"] == "m"
        np.testing.assert_array_equal(det["shape"][()], [16, 24])
        assert det["mask"].dtype == np.int8
        assert det["mask"].compression == "gzip"
        assert det["mask"].shuffle
        assert det["pixel_corners"].compression == "gzip"
        rec = h5["entry/ccdgrid"]
        assert rec.attrs["NX_class"] == "NXcollection"
        assert rec["dx"].attrs["unit"] == "pixel"
        assert (
            "corner (i, j) is at index coordinates (i - 0.5, j - 0.5)"
            in (rec["dy"].attrs["convention"])
        )
        assert rec["mask"] == det["mask"]  # one dataset, two names
        assert rec["pitch"].attrs["unit"] == "m"


def test_a_mask_of_none_writes_an_all_valid_mask(tmp_path):
    path = save_detector(tmp_path / "det.h5", _calibration((10, 12), mask=None))

    np.testing.assert_array_equal(detector_factory(str(path)).mask, np.zeros((10, 12)))


def test_a_boolean_or_float_mask_is_stored_as_int8_ones(tmp_path):
    mask = np.zeros((10, 12))
    mask[3, 4] = 7.5
    path = save_detector(tmp_path / "det.h5", _calibration((10, 12), mask=mask))

    stored = load(path).mask
    assert stored.dtype == np.int8
    np.testing.assert_array_equal(stored, (mask != 0).astype(np.int8))


# -- our record ----------------------------------------------------------------------------


def test_round_trip_through_load(tmp_path):
    cal = _calibration((33, 47))
    path = save_detector(tmp_path / "det.h5", cal)

    rec = load(path)

    assert rec.path == path
    assert rec.name == "ccdgrid"
    assert rec.shape == (33, 47)
    assert rec.pixel_size == PIXEL_SIZE
    np.testing.assert_array_equal(rec.dx, cal.dx)
    np.testing.assert_array_equal(rec.dy, cal.dy)
    assert rec.dx.dtype == np.float32
    np.testing.assert_array_equal(rec.mask, cal.mask)
    np.testing.assert_array_equal(rec.grid["P"], cal.grid.P)
    np.testing.assert_array_equal(rec.grid["origin"], cal.grid.origin)
    np.testing.assert_array_equal(rec.grid["vectors"], cal.grid.vectors)
    np.testing.assert_array_equal(rec.grid["pixel_size"], PIXEL_SIZE)
    np.testing.assert_array_equal(rec.grid["indices"], cal.grid.indices)
    np.testing.assert_array_equal(rec.grid["ideal"], cal.grid.ideal)
    np.testing.assert_array_equal(rec.grid["displacement"], cal.grid.displacement)
    np.testing.assert_array_equal(rec.grid["residuals"], cal.grid.residuals)
    assert rec.grid["residual_rms"] == 0.75
    assert rec.grid["method_used"] == "lsq"
    assert "seed_result" not in rec.grid
    np.testing.assert_array_equal(rec.peaks, cal.holes.peaks)
    np.testing.assert_array_equal(rec.indices, cal.lattice.indices)
    assert rec.indices.dtype == np.int64
    np.testing.assert_array_equal(rec.valid, cal.lattice.valid)
    assert rec.pitch == 5e-3
    assert rec.params == {"threshold": 0.25, "hole_diameter": 10.5, "backend": "cython"}
    assert rec.source == cal.source
    assert rec.version == ccdgrid.__version__
    assert rec.is_ccdgrid
    created = datetime.datetime.fromisoformat(rec.created)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - created).total_seconds() < 600


def test_load_is_the_public_name():
    assert ccdgrid.load is load


def test_minimal_calibration_object(tmp_path):
    """Only dx, dy, pixel_size and mask are required."""
    full = _calibration((12, 9))
    cal = SimpleNamespace(dx=full.dx, dy=full.dy, pixel_size=full.pixel_size, mask=None)
    path = save_detector(tmp_path / "det.h5", cal)

    rec = load(path)

    assert rec.shape == (12, 9)
    assert rec.grid == {}
    assert rec.peaks is None
    assert rec.valid is None
    assert rec.pitch is None
    assert rec.params == {}
    assert rec.source is None
    assert rec.summary is None


def test_summary_is_recorded(tmp_path):
    cal = _calibration((8, 8))
    cal.summary = lambda: "412 holes, RMS 0.02 px"
    path = save_detector(tmp_path / "det.h5", cal)

    assert load(path).summary == "412 holes, RMS 0.02 px"


# -- atomic replacement -------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error("stop")

    monkeypatch.setattr(detector_file, "_write_chunks", fail)

    with pytest.raises(error):
        save_detector(tmp_path / "det.h5", _calibration((16, 16)))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_an_existing_file_untouched(tmp_path, monkeypatch):
    path = save_detector(tmp_path / "det.h5", _calibration((16, 16), seed=1))
    before = path.read_bytes()
    monkeypatch.setattr(detector_file, "_shuffle", _boom)  # fails mid-way, in a thread

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_detector(path, _calibration((16, 16), seed=2))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["det.h5"]


def test_saving_again_replaces_the_file(tmp_path):
    first, second = _calibration((16, 20), seed=1), _calibration((16, 20), seed=2)
    path = save_detector(tmp_path / "det.h5", first)
    save_detector(path, second)

    with h5py.File(path) as h5:
        assert list(h5) == ["entry"]
    np.testing.assert_array_equal(load(path).dx, second.dx)
    np.testing.assert_array_equal(
        detector_factory(str(path)).get_pixel_corners(),
        _pyfai_reference(second).get_pixel_corners(),
    )


def test_new_file_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = save_detector(tmp_path / "det.h5", _calibration((8, 8)))

    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dx": np.zeros((5, 5))}, r"`calibration.dx` and `calibration.dy` differ in shape"),
        ({"dy": np.zeros(5)}, r"`calibration.dy` must be a corner map of shape"),
        ({"dx": np.full((11, 11), np.nan)}, r"`calibration.dx` holds 121 non-finite values"),
        ({"shape": (11, 11)}, r"`calibration.shape` is \(11, 11\) but the corner maps"),
        ({"mask": np.zeros((11, 11))}, r"`calibration.mask` must have shape \(10, 10\)"),
        ({"pixel_size": (5e-5, -5e-5)}, r"`calibration.pixel_size` must be two positive"),
        ({"pixel_size": 5e-5}, r"`calibration.pixel_size` must be \(pixel1, pixel2\)"),
        ({"pitch": 0.0}, r"`calibration.pitch` must be a positive length"),
        ({"params": ["a"]}, r"`calibration.params` must be a dict"),
        ({"source": "grid.edf"}, r"`calibration.source` must be a dict or None"),
    ],
)
def test_bad_calibration_is_named(tmp_path, overrides, message):
    cal = _calibration((10, 10), **overrides)

    with pytest.raises(CcdgridError, match=message):
        save_detector(tmp_path / "det.h5", cal)
    assert list(tmp_path.iterdir()) == []


def test_missing_attribute_is_named(tmp_path):
    cal = _calibration((10, 10))
    del cal.dy

    with pytest.raises(CcdgridError, match="`calibration` has no attribute 'dy'"):
        save_detector(tmp_path / "det.h5", cal)


def test_bad_target_paths(tmp_path):
    cal = _calibration((10, 10))
    with pytest.raises(CcdgridError, match=r"directory .*nodir does not exist"):
        save_detector(tmp_path / "nodir" / "det.h5", cal)
    with pytest.raises(CcdgridError, match="it is a directory"):
        save_detector(tmp_path, cal)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a/b"}, "`name` must be a non-empty name"),
        ({"name": ""}, "`name` must be a non-empty name"),
        ({"compression_level": 10}, r"`compression_level` must be an int in 0\.\.9"),
        ({"workers": 0}, "`workers` must be a positive int"),
        ({"backend": "fortran"}, "`backend` must be one of"),
    ],
)
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(CcdgridError, match=message):
        save_detector(tmp_path / "det.h5", _calibration((10, 10)), **kwargs)


# -- loading other files ------------------------------------------------------------------


def test_load_a_plain_pyfai_detector_file(tmp_path):
    cal = _calibration((21, 34), seed=4)
    det = _pyfai_reference(cal)
    det.mask = cal.mask
    path = tmp_path / "pyfai.h5"
    det.save(str(path))

    rec = load(path)

    assert not rec.is_ccdgrid
    assert rec.version is None
    assert rec.shape == (21, 34)
    assert rec.pixel_size == PIXEL_SIZE
    np.testing.assert_array_equal(rec.mask, cal.mask)
    # float32 corners of p * (index + d): absolute precision ~ (index + |d|) * 2**-24 px
    tol = (max(cal.shape) + 3) * 2**-23
    np.testing.assert_allclose(rec.dx, cal.dx, rtol=0, atol=tol)
    np.testing.assert_allclose(rec.dy, cal.dy, rtol=0, atol=tol)
    assert rec.grid == {}
    assert rec.params == {}


def test_load_a_regular_pyfai_detector_gives_zero_maps(tmp_path):
    path = tmp_path / "flat.h5"
    Detector(1e-4, 1e-4, max_shape=(6, 9)).save(str(path))

    rec = load(path)

    np.testing.assert_array_equal(rec.dx, np.zeros((7, 10)))
    np.testing.assert_array_equal(rec.dy, np.zeros((7, 10)))


def test_load_refuses_non_contiguous_pixels(tmp_path):
    rng = np.random.default_rng(7)
    det = Detector(1e-4, 1e-4, max_shape=(6, 9))
    det.set_dx(rng.normal(0, 0.3, (6, 9)))  # centre-shaped: each pixel moves on its own
    path = tmp_path / "shifted.h5"
    det.save(str(path))

    with pytest.raises(CcdgridError, match="pixels are not contiguous"):
        load(path)


def test_load_errors(tmp_path):
    with pytest.raises(CcdgridError, match="detector file not found"):
        load(tmp_path / "missing.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(CcdgridError, match="is not an HDF5 detector file"):
        load(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["data"] = np.zeros((4, 4))
    with pytest.raises(CcdgridError, match="holds no detector definition"):
        load(other)


def test_ccdgrid_correct_reads_the_file(tmp_path):
    from ccdgrid import correction

    cal = _calibration((40, 56), seed=9)
    path = save_detector(tmp_path / "det.h5", cal)
    image = np.random.default_rng(9).random((40, 56)).astype(np.float32)
    correction.clear_cache()

    from_file = correction.correct(image, path)
    from_maps = correction.correct(image, SimpleNamespace(dy=cal.dy, dx=cal.dx, mask=cal.mask))

    np.testing.assert_array_equal(from_file, from_maps)
    correction.clear_cache()


def test_the_lattice_frame_is_recorded_and_read_back(tmp_path):
    from ccdgrid.pipeline import calibrate
    from ccdgrid.synthetic import grid_image

    g = grid_image((384, 384), pitch_px=40.0, hole_diameter_px=7.0, seed=2)
    cal = calibrate(g.image, cv_folds=0)
    rec = load(cal.save(tmp_path / "det.h5"))
    assert rec.grid["frame"] == cal.grid.frame
    assert rec.grid["frame"]["centre"] == [191.5, 191.5]
    # a file without one (older, or another writer's) reads without it
    assert "frame" not in load(save_detector(tmp_path / "old.h5", _calibration((33, 47)))).grid
