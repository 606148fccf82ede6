"""Reading images and masks: formats, frames, provenance, and clear errors."""

import hashlib
import subprocess
import sys

import fabio.cbfimage
import fabio.edfimage
import fabio.tifimage
import h5py
import numpy as np
import pytest

import ccdgrid
from ccdgrid import io
from ccdgrid.errors import CcdgridError
from ccdgrid.io import read_image, read_mask, sha256_file


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _image(rng, shape=(37, 53), dtype=np.uint16):
    return rng.integers(0, 60000, size=shape).astype(dtype)


# -- formats ---------------------------------------------------------------------


def test_read_edf_returns_data_and_provenance(tmp_path, rng):
    data = _image(rng)
    path = tmp_path / "grid.edf"
    fabio.edfimage.EdfImage(data=data).write(str(path))

    image, info = read_image(path)

    np.testing.assert_array_equal(image, data)
    assert image.dtype == np.uint16
    assert image.flags.c_contiguous
    assert info["path"] == str(path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["shape"] == (37, 53)
    assert info["dtype"] == "uint16"
    assert info["frame"] is None
    assert info["dataset"] is None
    assert info["format"] == "EdfImage"


@pytest.mark.parametrize("suffix", [".edf", ".tif"])
def test_a_truncated_file_is_refused(tmp_path, rng, suffix):
    # fabio zero-fills the missing tail of a truncated EDF and only logs it
    writer = {".edf": fabio.edfimage.EdfImage, ".tif": fabio.tifimage.TifImage}[suffix]
    full = tmp_path / f"full{suffix}"
    writer(data=_image(rng, (200, 300))).write(str(full))
    raw = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(raw[: int(0.9 * len(raw))])
    with pytest.raises(CcdgridError, match=r"cut\.(edf|tif)"):
        read_image(cut)


def test_a_truncated_edf_is_one_line_on_the_command_line(tmp_path, rng):
    # fabio's own log line came before ccdgrid's error (a fresh interpreter:
    # pytest's log capture would hide it)
    full = tmp_path / "full.edf"
    fabio.edfimage.EdfImage(data=_image(rng, (200, 300))).write(str(full))
    cut = tmp_path / "cut.edf"
    cut.write_bytes(full.read_bytes()[:60000])
    code = "import sys; from ccdgrid.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["calibrate", str(cut), "--pitch", "5mm", "-o", str(tmp_path / "d.h5")]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert run.returncode == 1
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"ccdgrid: error: {cut} is truncated: ")


@pytest.mark.parametrize(
    ("suffix", "writer", "dtype"),
    [
        (".tif", fabio.tifimage.TifImage, np.uint16),
        (".cbf", fabio.cbfimage.CbfImage, np.int32),
    ],
)
def test_read_other_fabio_formats(tmp_path, rng, suffix, writer, dtype):
    data = _image(rng, (40, 31), dtype)
    path = tmp_path / f"grid{suffix}"
    writer(data=data).write(str(path))

    image, info = read_image(str(path))

    np.testing.assert_array_equal(image, data)
    assert info["shape"] == (40, 31)


def test_read_npy_keeps_float_dtype(tmp_path, rng):
    data = rng.normal(size=(20, 30)).astype(np.float32)
    path = tmp_path / "grid.npy"
    np.save(path, data)

    image, info = read_image(path)

    np.testing.assert_array_equal(image, data)
    assert image.dtype == np.float32
    assert info["format"] == "npy"


def test_read_npy_frame_of_a_stack(tmp_path, rng):
    stack = _image(rng, (3, 12, 17))
    path = tmp_path / "stack.npy"
    np.save(path, stack)

    image, info = read_image(path, frame=2)

    np.testing.assert_array_equal(image, stack[2])
    assert info["frame"] == 2


def test_read_hdf5_dataset_path(tmp_path, rng):
    data = _image(rng, (25, 19))
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        h5["entry/data/data"] = data
        h5["entry/other"] = np.arange(5)

    image, info = read_image(f"{path}::/entry/data/data")

    np.testing.assert_array_equal(image, data)
    assert info["path"] == str(path)
    assert info["dataset"] == "/entry/data/data"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_hdf5_stack_reads_the_chosen_frame(tmp_path, rng):
    stack = _image(rng, (4, 10, 14))
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        h5["data"] = stack

    image, _ = read_image(f"{path}::data", frame=3)

    np.testing.assert_array_equal(image, stack[3])


def test_read_hdf5_without_dataset_path_uses_the_only_image(tmp_path, rng):
    data = _image(rng, (9, 8))
    path = tmp_path / "one.h5"
    with h5py.File(path, "w") as h5:
        h5["entry/image"] = data
        h5["entry/energy"] = 12.4

    image, info = read_image(path)

    np.testing.assert_array_equal(image, data)
    assert info["dataset"] == "/entry/image"


def test_read_multi_frame_edf(tmp_path, rng):
    frames = [_image(rng, (8, 9)) for _ in range(3)]
    path = tmp_path / "multi.edf"
    edf = fabio.edfimage.EdfImage(data=frames[0])
    for frame in frames[1:]:
        edf.append_frame(data=frame)
    edf.write(str(path))

    image, _ = read_image(path, frame=1)

    np.testing.assert_array_equal(image, frames[1])
    with pytest.raises(CcdgridError, match=r"multi\.edf holds 3 frames: choose one"):
        read_image(path)


def test_sha256_is_streamed_in_blocks(tmp_path, monkeypatch, rng):
    payload = rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    monkeypatch.setattr(io, "_HASH_BLOCK", 7)  # many blocks and a partial last one

    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()


def test_read_image_is_the_public_name():
    assert ccdgrid.read_image is read_image


# -- errors --------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CcdgridError, match=r"image file not found: .*nothere\.edf"):
        read_image(tmp_path / "nothere.edf")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(CcdgridError, match="is a directory"):
        read_image(tmp_path)


@pytest.mark.parametrize("name", ["notes.txt", "fake.edf", "fake.tif"])
def test_text_file_is_not_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n")

    with pytest.raises(CcdgridError, match=rf"cannot read .*{name} as an image"):
        read_image(path)


def test_text_file_named_h5(tmp_path):
    path = tmp_path / "fake.h5"
    path.write_text("no HDF5 here")

    with pytest.raises(CcdgridError, match=r"cannot open .*fake\.h5 as an HDF5 file"):
        read_image(path)


def test_stack_without_frame(tmp_path, rng):
    path = tmp_path / "stack.npy"
    np.save(path, _image(rng, (3, 12, 17)))

    with pytest.raises(CcdgridError, match=r"stack\.npy holds 3 frames: choose one with frame="):
        read_image(path)


@pytest.mark.parametrize("channels", [3, 4])
def test_a_colour_image_is_not_taken_for_a_stack(tmp_path, rng, channels):
    # it was "holds 64 frames: choose one with frame="
    path = tmp_path / "photo.npy"
    np.save(path, rng.integers(0, 255, (64, 80, channels), dtype=np.uint8))

    with pytest.raises(
        CcdgridError, match=rf"colour image \(64 x 80 pixels, {channels} channels\)"
    ):
        read_image(path)
    # a stack of frames 3 px wide is still a stack (too narrow for a grid)
    np.save(path, _image(rng, (5, 6, 3)))
    with pytest.raises(CcdgridError, match="holds 5 frames"):
        read_image(path)


def test_frame_out_of_range(tmp_path, rng):
    path = tmp_path / "stack.npy"
    np.save(path, _image(rng, (3, 12, 17)))

    with pytest.raises(CcdgridError, match=r"frame 3 requested but .* holds 3 frame"):
        read_image(path, frame=3)


def test_frame_of_a_single_image(tmp_path, rng):
    path = tmp_path / "one.npy"
    np.save(path, _image(rng))

    assert read_image(path, frame=0)[0].shape == (37, 53)
    with pytest.raises(CcdgridError, match=r"frame 1 requested but .* holds 1 frame"):
        read_image(path, frame=1)


@pytest.mark.parametrize("frame", [-1, 1.5, True, "0"])
def test_bad_frame_argument(tmp_path, rng, frame):
    path = tmp_path / "one.npy"
    np.save(path, _image(rng))

    with pytest.raises(CcdgridError, match="`frame` must be a non-negative int"):
        read_image(path, frame=frame)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((0, 5)), r"empty image \(shape \(0, 5\)\)"),
        (np.arange(10), r"shape \(10,\), not a 2-D image"),
        (np.zeros((2, 2, 2, 2)), r"shape \(2, 2, 2, 2\), not a 2-D image"),
        (np.zeros((4, 4), dtype=complex), "complex numbers"),
        (np.zeros((4, 4), dtype="U3"), "does not hold numbers"),
    ],
)
def test_arrays_that_are_not_images(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)

    with pytest.raises(CcdgridError, match=message):
        read_image(path)


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    with pytest.raises(CcdgridError, match=r"cannot read .*objects\.npy as a \.npy array"):
        read_image(path)


def test_hdf5_errors(tmp_path, rng):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        h5["a"] = _image(rng, (5, 5))
        h5["b"] = _image(rng, (5, 5))

    with pytest.raises(CcdgridError, match=r"has no dataset '/missing'"):
        read_image(f"{path}::/missing")
    with pytest.raises(CcdgridError, match="is a group, not a dataset"):
        read_image(f"{path}::/")
    with pytest.raises(CcdgridError, match=r"holds 2 image datasets \(/a, /b\): name one"):
        read_image(path)
    with pytest.raises(CcdgridError, match="empty HDF5 dataset path"):
        read_image(f"{path}::")


def test_source_must_be_a_path():
    with pytest.raises(CcdgridError, match="`source` must be a file path, got ndarray"):
        read_image(np.zeros((4, 4)))


# -- masks ---------------------------------------------------------------------


def test_read_mask_from_array_marks_nonzero_and_nan_invalid():
    mask = np.array([[0, 1, 0], [2.5, 0, np.nan]])

    result = read_mask(mask, (2, 3))

    np.testing.assert_array_equal(result, [[False, True, False], [True, False, True]])
    assert result.dtype == bool


def test_read_mask_from_file(tmp_path):
    mask = np.zeros((6, 7), dtype=np.uint8)
    mask[2, 3] = 1
    path = tmp_path / "mask.edf"
    fabio.edfimage.EdfImage(data=mask).write(str(path))

    result = read_mask(path, (6, 7))

    np.testing.assert_array_equal(result, mask.astype(bool))


def test_read_mask_shape_is_checked(tmp_path):
    path = tmp_path / "mask.npy"
    np.save(path, np.zeros((6, 7)))

    with pytest.raises(CcdgridError, match=r"mask file .* has shape \(6, 7\), .* \(7, 6\)"):
        read_mask(path, (7, 6))
    with pytest.raises(CcdgridError, match=r"`mask` has shape \(2, 2\)"):
        read_mask(np.zeros((2, 2)), (3, 3))


def test_read_mask_refuses_non_numbers():
    with pytest.raises(CcdgridError, match="`mask` must hold numbers"):
        read_mask(np.array([["a", "b"]]), (1, 2))


def test_known_sha256_is_recorded_without_hashing_the_file(tmp_path, monkeypatch, rng):
    # a series hashes a stack once and passes the digest to every frame's read
    img = _image(rng)
    path = tmp_path / "a.npy"
    np.save(path, img)
    truth = hashlib.sha256(path.read_bytes()).hexdigest()

    def no_hash(_):
        raise AssertionError("the file was hashed although its digest was given")

    monkeypatch.setattr(io, "sha256_file", no_hash)
    data, info = read_image(path, sha256=truth)
    np.testing.assert_array_equal(data, img)
    assert info["sha256"] == truth
    with pytest.raises(CcdgridError, match="not found"):
        read_image(tmp_path / "missing.npy", sha256=truth)
