"""Streaming a large HDF5 stack through the distortion correction: memory and throughput.

Generates once a stack of uint16 frames (default 200 x 2048², 1.6 GB, one frame
per HDF5 chunk, uncompressed) and smooth corner maps, then runs each
measurement in a fresh Python process so that its peak resident memory
(``ru_maxrss``, imports and matrix included) is its own:

* ``in-memory``: ``CorrectionMatrix.apply`` on frames already in memory
  (``--chunk`` frames per call): the reference throughput.
* ``hdf5-gzip`` / ``hdf5-raw``: :func:`ccdgrid.stack.correct_hdf5` from the
  file to a new file, shuffle + deflate level 1 or uncompressed.
* ``dask``: :func:`ccdgrid.stack.correct_dask` on ``da.from_array`` of the
  HDF5 dataset, stored with ``da.store`` into an uncompressed dataset
  (threaded scheduler), when dask is installed.

The matrix is built before the clock starts (its build time is printed
apart). CPU s is the process's user + system time while the clock runs
(threads included): less sensitive than wall time to other load on the
machine. Targets: peak memory below 1 GB, streaming throughput within 1.5x of
the in-memory one. The input was just written, so it is read from the page
cache: this measures ccdgrid, not the disk.

Run: ``python benchmarks/stack.py`` (about 3 min on 2 cores);
``python benchmarks/stack.py --frames 16 --size 1024`` for a smoke run.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("in-memory", "hdf5-raw", "hdf5-gzip", "dask")
MEMORY_TARGET_MB = 1024
THROUGHPUT_TARGET = 1.5


def _maps(size, seed=0):
    """Smooth distortion up to ~3 px, (size + 1)² corners."""
    rng = np.random.default_rng(seed)
    t = np.linspace(-1.0, 1.0, size + 1)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    a = rng.normal(0, 1, 6)
    dy = 2.0 * yy * xx + a[0] * np.sin(2.1 * xx + a[1]) + 0.5 * a[2] * yy**2
    dx = -1.5 * xx**2 + a[3] * np.cos(1.7 * yy + a[4]) + 0.5 * a[5] * xx * yy
    return dy, dx


def generate(workdir, frames, size):
    """Write the stack and maps (once per frames x size); return their paths."""
    import h5py

    stack_path = workdir / f"stack_{frames}x{size}.h5"
    maps_path = workdir / f"maps_{size}.npz"
    if not maps_path.exists():
        dy, dx = _maps(size)
        np.savez(maps_path, dy=dy, dx=dx)
    if not stack_path.exists():
        rng = np.random.default_rng(1)
        tmp = stack_path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as h5:
            dset = h5.create_dataset(
                "/entry/data", shape=(frames, size, size), dtype=np.uint16, chunks=(1, size, size)
            )
            base = rng.integers(100, 4000, (size, size), dtype=np.uint16)
            for i in range(frames):
                dset[i] = base + rng.integers(0, 64, (size, size), dtype=np.uint16)
        os.replace(tmp, stack_path)
    return stack_path, maps_path


def _cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(mode, stack_path, maps_path, out_path, chunk):
    """One measurement in this (fresh) process; prints one JSON line."""
    import h5py

    from ccdgrid.correction import CorrectionMatrix

    maps = np.load(maps_path)
    t0 = time.perf_counter()
    matrix = CorrectionMatrix.from_maps(maps["dy"], maps["dx"])
    build = time.perf_counter() - t0
    src = f"{stack_path}::/entry/data"
    with h5py.File(stack_path, "r") as h5:
        n = h5["/entry/data"].shape[0]
    if mode == "in-memory":
        with h5py.File(stack_path, "r") as h5:
            block = h5["/entry/data"][:chunk]
        matrix.apply(block)  # warm up (page faults of the output, OpenMP pool)
        repeats = max(1, n // chunk)
        cpu0, t0 = _cpu(), time.perf_counter()
        for _ in range(repeats):
            matrix.apply(block)
        seconds = time.perf_counter() - t0
        n = repeats * chunk
    elif mode.startswith("hdf5"):
        from ccdgrid.stack import correct_hdf5

        compression = "gzip" if mode == "hdf5-gzip" else None
        cpu0, t0 = _cpu(), time.perf_counter()
        correct_hdf5(src, out_path, matrix, chunk_frames=chunk, compression=compression,
                     progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
    else:
        import dask
        import dask.array as da

        from ccdgrid.stack import correct_dask

        cpu0, t0 = _cpu(), time.perf_counter()
        with h5py.File(stack_path, "r") as h5, h5py.File(out_path, "w") as out:
            source = da.from_array(h5["/entry/data"], chunks=(chunk, -1, -1))
            result = correct_dask(source, matrix, nthreads=1)
            shape = result.shape
            target = out.create_dataset(
                "/entry/data", shape=shape, dtype=result.dtype, chunks=(1, *shape[1:])
            )
            with dask.config.set(scheduler="threads"):
                da.store(result, target, lock=True)
        seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = usage.ru_maxrss / 1024  # Linux: KiB
    cpu = _cpu() - cpu0
    out_mb = out_path.stat().st_size / 2**20 if out_path.exists() else 0.0
    record = {"mode": mode, "frames": n, "seconds": seconds, "build": build, "cpu": cpu}
    record.update(peak_mb=peak_mb, out_mb=out_mb, nnz=matrix.nnz)
    print(json.dumps(record))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=8, help="frames per block")
    parser.add_argument("--workdir", type=Path, help="keep the stack here (default: a temp dir)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, *args.paths, args.chunk)
        return 0

    with tempfile.TemporaryDirectory(prefix="ccdgrid-stack-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        stack_path, maps_path = generate(workdir, args.frames, args.size)
        size_gb = stack_path.stat().st_size / 1e9
        print(f"input {stack_path} ({args.frames} x {args.size}² uint16, {size_gb:.2f} GB), "
              f"ready in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        rows = []
        for mode in args.modes:
            if mode == "dask":
                try:
                    import dask.array  # noqa: F401
                except ImportError:
                    print("dask: skipped (not installed)")
                    continue
            out_path = workdir / f"out_{mode}.h5"
            cmd = [sys.executable, __file__, "--worker", mode, "--chunk", str(args.chunk),
                   "--paths", str(stack_path), str(maps_path), str(out_path)]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            out_path.unlink(missing_ok=True)
    _table(rows, args)
    return 0


def _table(rows, args):
    print(f"\ncommand: python benchmarks/stack.py --frames {args.frames} --size {args.size} "
          f"--chunk {args.chunk}; cpus: {os.cpu_count()}")  # fmt: skip
    reference = next((r for r in rows if r["mode"] == "in-memory"), None)
    ref_fps = reference["frames"] / reference["seconds"] if reference else None
    print(f"{'mode':<10} {'frames':>6} {'time s':>8} {'frames/s':>9} {'vs memory':>9} "
          f"{'peak MB':>8} {'out MB':>8} {'build s':>7} {'CPU s':>6}")  # fmt: skip
    for r in rows:
        fps = r["frames"] / r["seconds"]
        ratio = f"{ref_fps / fps:.2f}x" if ref_fps else "-"
        sizes = f"{r['peak_mb']:>8.0f} {r['out_mb']:>8.0f}"
        print(f"{r['mode']:<10} {r['frames']:>6} {r['seconds']:>8.2f} {fps:>9.1f} {ratio:>9} "
              f"{sizes} {r['build']:>7.2f} {r['cpu']:>6.1f}")  # fmt: skip
    print(f"targets: peak < {MEMORY_TARGET_MB} MB; streaming within {THROUGHPUT_TARGET}x "
          "of in-memory frames/s ('vs memory' = in-memory frames/s / this mode's)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
