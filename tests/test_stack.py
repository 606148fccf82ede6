"""Stacks beyond memory: correct_dask on a real distributed cluster, streamed correct_hdf5."""

import argparse
import pickle
import types

import h5py
import numpy as np
import pytest

from ccdgrid import stack
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


def _matrix(det):
    return CorrectionMatrix.from_maps(det.dy, det.dx, mask=det.mask)


# -- dask ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    # dashboard_address=None: no HTTP server, hence no "port 8787 in use" warning,
    # which filterwarnings=error would turn into a failure when two runs overlap
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
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


def test_hdf5_progress_without_tqdm(tmp_path, detector, frames, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    src = _write_source(tmp_path / "in.h5", frames)
    stack.correct_hdf5(src, tmp_path / "out.h5", detector, chunk_frames=7, progress=True)
    assert f"{N_FRAMES}/{N_FRAMES} frames" in capsys.readouterr().err


def test_hdf5_failure_leaves_no_file(tmp_path, detector, frames, monkeypatch):
    src = _write_source(tmp_path / "in.h5", frames)
    existing = tmp_path / "out.h5"
    existing.write_bytes(b"previous result")
    calls = []
    real_apply = CorrectionMatrix.apply

    def fail_in_third_block(self, image, **kwargs):
        calls.append(image.shape)
        if len(calls) == 10:
            raise RuntimeError("disk full (simulated)")
        return real_apply(self, image, **kwargs)

    monkeypatch.setattr(CorrectionMatrix, "apply", fail_in_third_block)
    with pytest.raises(RuntimeError, match="simulated"):
        stack.correct_hdf5(src, existing, detector, chunk_frames=4, progress=False)
    assert calls == [(NY, NX)] * 10
    assert existing.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "out.h5"]


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
    ],
    ids=["chunk", "compression", "level"],
)
def test_hdf5_rejects_bad_options(tmp_path, detector, frames, kwargs, message):
    src = _write_source(tmp_path / "in.h5", frames[:2])
    with pytest.raises(CcdgridError, match=message):
        stack.correct_hdf5(src, tmp_path / "out.h5", detector, progress=False, **kwargs)


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


def test_command_line_parser_runs_correct_hdf5(tmp_path, detector, frames, monkeypatch, capsys):
    src = _write_source(tmp_path / "in.h5", frames[:3])
    monkeypatch.setattr(stack, "_as_matrix", lambda d, name="": _matrix(detector))
    parser = argparse.ArgumentParser(prog="ccdgrid")
    stack.add_correct_stack_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["correct-stack", src, "-d", "det.h5", "-o", str(tmp_path / "out.h5"), "--chunk", "2"]
    )
    assert args.debug is False
    args.run(args)
    assert "wrote" in capsys.readouterr().out
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        np.testing.assert_array_equal(h5["/entry/data"][()], _matrix(detector).apply(frames[:3]))
    with pytest.raises(SystemExit):
        parser.parse_args(["correct-stack", src, "-d", "d.h5", "-o", "o.h5", "--chunk", "0"])
