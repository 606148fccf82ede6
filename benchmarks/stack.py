"""Streaming a large HDF5 stack through the distortion correction: memory and throughput.

Generates once a stack of uint16 frames (default 200 x 2048², 1.6 GB, one frame
per HDF5 chunk, uncompressed; ``--source-compression gzip`` stores it shuffled
and deflated instead) and smooth corner maps, then runs each measurement in a
fresh Python process so that its peak resident memory (``ru_maxrss``, imports
and matrix included) is its own:

* ``in-memory``: ``CorrectionMatrix.apply`` on frames already in memory
  (``--chunk`` frames per call, OpenMP on every core);
  ``in-memory-frames``: the same frames, one ``apply`` per frame, one thread
  each, as many threads as CPUs (faster per frame: a stack in one call gathers
  from all its frames at once). The faster of the two is the reference.
  Both apply the matrix to the same ``--chunk`` frames again and again, so
  their outputs land in memory the allocator recycles. ``in-memory-stack``
  (not run by default: it holds the whole stack, input and output, ~5 GB at
  200 x 2048²) is the literal case, ``CorrectionMatrix.apply`` on the whole
  ``(n, ny, nx)`` array in one call: its output is fresh memory, whose page
  faults cost system time. It is shown, never taken as the reference.
* ``hdf5-gzip``: :func:`ccdgrid.stack.correct_hdf5` with its defaults (shuffle
  + deflate level 1, ISA-L when python-isal is installed);
  ``hdf5-gzip-zlib``: the same with python-isal hidden (zlib);
  ``hdf5-raw``: uncompressed output. Each checks two frames read back with
  plain h5py against ``CorrectionMatrix.apply``.
* ``dask``: :func:`ccdgrid.stack.correct_dask` on ``da.from_array`` of the
  HDF5 dataset, stored with ``da.store`` into an uncompressed dataset
  (threaded scheduler), when dask is installed.
* ``stages``: a profile, one thread, of what one frame costs in each stage of
  the stream, into buffers reused from frame to frame as the stream does:
  read the stored chunk, inflate it (compressed source only), apply the
  matrix, shuffle the byte planes, encode a chunk (the default level 1 and
  level 2, by ISA-L when installed; zlib level 1),
  write the chunk (into ``--outdir``, like the stream).

The matrix is built before the clock starts (its build time is printed
apart). CPU s is the process's user + system time while the clock runs
(threads included), sys s its system part (page faults, page cache): less
sensitive than wall time to other load on the machine. Targets: peak memory
below 1 GB, streaming throughput within 1.5x of the in-memory one. The input
was just written, so it is read from the page cache. The stream writes its
chunks past the page cache (``O_DIRECT``) where the filesystem allows it;
``--outdir /dev/shm/...`` (tmpfs, which does not) measures the page-cache
way instead.

Run: ``python benchmarks/stack.py`` (about 4 min on 2 cores);
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

MODES = (
    "in-memory",
    "in-memory-frames",
    "in-memory-stack",
    "hdf5-gzip",
    "hdf5-gzip-zlib",
    "hdf5-raw",
    "dask",
    "stages",
)
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


def generate(workdir, frames, size, compression=None):
    """Write the stack and maps (once per frames x size x compression); return their paths."""
    import h5py

    suffix = f"_{compression}" if compression else ""
    stack_path = workdir / f"stack_{frames}x{size}{suffix}.h5"
    maps_path = workdir / f"maps_{size}.npz"
    if not maps_path.exists():
        dy, dx = _maps(size)
        np.savez(maps_path, dy=dy, dx=dx)
    if not stack_path.exists():
        rng = np.random.default_rng(1)
        tmp = stack_path.with_suffix(".tmp")
        options = {"compression": "gzip", "shuffle": True} if compression else {}
        with h5py.File(tmp, "w") as h5:
            dset = h5.create_dataset(
                "/entry/data",
                shape=(frames, size, size),
                dtype=np.uint16,
                chunks=(1, size, size),
                **options,
            )
            base = rng.integers(100, 4000, (size, size), dtype=np.uint16)
            for i in range(frames):
                dset[i] = base + rng.integers(0, 64, (size, size), dtype=np.uint16)
        os.replace(tmp, stack_path)
    return stack_path, maps_path


def _cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sys():
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _check_output(out_path, stack_path, matrix):
    """Frames 0 and n-1 read back with plain h5py equal CorrectionMatrix.apply."""
    import h5py

    with h5py.File(out_path, "r") as out, h5py.File(stack_path, "r") as src:
        n = src["/entry/data"].shape[0]
        for i in sorted({0, n - 1}):
            expected = matrix.apply(src["/entry/data"][i])
            if not np.array_equal(out["/entry/data"][i], expected):
                raise AssertionError(f"frame {i} of {out_path} differs from the in-memory result")


def _median_ms(function, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        function()
        times.append(time.process_time() - t0)
    return 1000 * float(np.median(times))


def _stages(stack_path, matrix, outdir, repeats=8):
    """CPU ms per frame of each stage of the stream, on one thread, buffers reused."""
    import zlib

    import h5py

    from ccdgrid import stack
    from ccdgrid._ext import _correction

    with h5py.File(stack_path, "r") as h5:
        source = h5["/entry/data"]
        reader = stack._Reader(source, None)
        if reader.filters is None:
            raise RuntimeError("the benchmark stack should be readable chunk by chunk")
        buffer = reader.read(0, 1)[1]
        cost = {"read": _median_ms(lambda: reader.read(0, 1, buffer), repeats)}
        payload = reader.read(0, 1, buffer)[0]
        if reader.filters:
            cost["inflate"] = _median_ms(lambda: reader.decode(payload, 1), repeats)
        frame = reader.decode(payload, 1)[0].copy()
    corrected = np.empty(matrix.shape_out, dtype=np.float32)
    cost["apply"] = _median_ms(lambda: matrix.apply(frame, nthreads=1, out=corrected), repeats)
    n = corrected.size
    span = stack._stored_size(n)
    chunk = np.empty(stack._Deflater.bound(corrected.shape, corrected.dtype), dtype=np.uint8)
    starts = 2 + span * np.arange(4, dtype=np.int64)
    every = np.ones(4, dtype=np.uint8)
    raw_bytes = corrected.reshape(-1).view(np.uint8)
    cost["shuffle (all planes stored)"] = _median_ms(
        lambda: _correction.shuffle_planes(raw_bytes, 4, chunk, starts, every), repeats
    )
    deflaters = {"level 1": stack._Deflater(1), "level 2": stack._Deflater(2)}
    deflaters["zlib"] = stack._Deflater(1, engine=zlib)
    sizes = {}
    for name, deflate in deflaters.items():
        cost[f"encode ({name})"] = _median_ms(
            lambda deflate=deflate: deflate(corrected, chunk), repeats
        )
        sizes[name] = deflate(corrected, chunk).nbytes / corrected.nbytes
    cost["deflate every plane (zlib)"] = _median_ms(
        lambda: zlib.compress(corrected.view(np.uint8).reshape(-1, 4).T.copy(), 1), 3
    )
    encoded = deflaters["level 1"](corrected, chunk)
    with (
        tempfile.TemporaryDirectory(dir=outdir) as scratch,
        h5py.File(Path(scratch) / "w.h5", "w") as h5,
    ):
        target = h5.create_dataset(
            "x", shape=(repeats, *corrected.shape), dtype=np.float32,
            chunks=(1, *corrected.shape), compression="gzip", shuffle=True,
        )  # fmt: skip
        index = iter(range(repeats))
        cost["write"] = _median_ms(
            lambda: target.id.write_direct_chunk((next(index), 0, 0), encoded), repeats
        )
    return cost, sizes


def _worker(mode, stack_path, maps_path, out_path, chunk):
    """One measurement in this (fresh) process; prints one JSON line."""
    if mode == "hdf5-gzip-zlib":
        sys.modules["isal"] = None  # import isal -> ImportError: ccdgrid falls back to zlib
    import h5py

    from ccdgrid.correction import CorrectionMatrix

    maps = np.load(maps_path)
    t0 = time.perf_counter()
    matrix = CorrectionMatrix.from_maps(maps["dy"], maps["dx"])
    build = time.perf_counter() - t0
    src = f"{stack_path}::/entry/data"
    with h5py.File(stack_path, "r") as h5:
        n = h5["/entry/data"].shape[0]
    record = {"mode": mode, "build": build, "nnz": matrix.nnz}
    if mode == "stages":
        record["cost"], record["sizes"] = _stages(stack_path, matrix, out_path.parent)
        print(json.dumps(record))
        return
    engine = "-"
    if mode == "in-memory":
        with h5py.File(stack_path, "r") as h5:
            block = h5["/entry/data"][:chunk]
        matrix.apply(block)  # warm up (page faults of the output, OpenMP pool)
        repeats = max(1, n // chunk)
        cpu0, sys0, t0 = _cpu(), _sys(), time.perf_counter()
        for _ in range(repeats):
            matrix.apply(block)
        seconds = time.perf_counter() - t0
        n = repeats * chunk
    elif mode == "in-memory-stack":
        with h5py.File(stack_path, "r") as h5:
            block = h5["/entry/data"][()]
        matrix.apply(block[:2])  # warm up (OpenMP pool)
        cpu0, sys0, t0 = _cpu(), _sys(), time.perf_counter()
        matrix.apply(block)
        seconds = time.perf_counter() - t0
    elif mode == "in-memory-frames":
        from concurrent.futures import ThreadPoolExecutor

        with h5py.File(stack_path, "r") as h5:
            block = h5["/entry/data"][:chunk]
        repeats = max(1, n // chunk)
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            list(pool.map(lambda f: matrix.apply(f, nthreads=1), block))  # warm up
            cpu0, sys0, t0 = _cpu(), _sys(), time.perf_counter()
            for _ in range(repeats):
                list(pool.map(lambda f: matrix.apply(f, nthreads=1), block))
            seconds = time.perf_counter() - t0
        n = repeats * chunk
    elif mode.startswith("hdf5"):
        from ccdgrid import _h5read, stack

        compression = None if mode == "hdf5-raw" else "gzip"
        if compression:
            engine = "zlib" if _h5read.deflate_engine().__name__ == "zlib" else "isal"
        cpu0, sys0, t0 = _cpu(), _sys(), time.perf_counter()
        stack.correct_hdf5(src, out_path, matrix, compression=compression, progress=False)
        seconds = time.perf_counter() - t0
    else:
        import dask
        import dask.array as da

        from ccdgrid.stack import correct_dask

        cpu0, sys0, t0 = _cpu(), _sys(), time.perf_counter()
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
    cpu = _cpu() - cpu0
    out_mb = out_path.stat().st_size / 2**20 if out_path.exists() else 0.0
    if out_path.exists():
        _check_output(out_path, stack_path, matrix)
    record.update(frames=n, seconds=seconds, cpu=cpu, sys=_sys() - sys0, engine=engine)
    record.update(peak_mb=usage.ru_maxrss / 1024, out_mb=out_mb)  # Linux: KiB
    print(json.dumps(record))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=8, help="frames per in-memory apply")
    parser.add_argument(
        "--source-compression",
        choices=["none", "gzip"],
        default="none",
        help="store the input stack raw (default) or shuffled + deflated",
    )
    parser.add_argument("--workdir", type=Path, help="keep the stack here (default: a temp dir)")
    parser.add_argument(
        "--outdir",
        type=Path,
        help="write the outputs here (default: the workdir); /dev/shm keeps the disk out "
        "of the measurement (GBs of output otherwise meet the kernel's dirty-page throttling)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=[m for m in MODES if m != "in-memory-stack"],
        help="what to measure (default: all but in-memory-stack, which needs ~5 GB)",
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, *args.paths, args.chunk)
        return 0

    compression = None if args.source_compression == "none" else args.source_compression
    with tempfile.TemporaryDirectory(prefix="ccdgrid-stack-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.outdir:
            args.outdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        stack_path, maps_path = generate(workdir, args.frames, args.size, compression)
        size_gb = stack_path.stat().st_size / 1e9
        print(f"input {stack_path} ({args.frames} x {args.size}² uint16, "
              f"{args.source_compression}, {size_gb:.2f} GB), "
              f"ready in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        rows = []
        for mode in args.modes:
            if mode == "dask":
                try:
                    import dask.array  # noqa: F401
                except ImportError:
                    print("dask: skipped (not installed)")
                    continue
            out_path = (args.outdir or workdir) / f"out_{mode}.h5"
            cmd = [sys.executable, __file__, "--worker", mode, "--chunk", str(args.chunk),
                   "--paths", str(stack_path), str(maps_path), str(out_path)]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            out_path.unlink(missing_ok=True)
    _table(rows, args)
    return 0


def _table(rows, args):
    command = " ".join(["python benchmarks/stack.py", *(argv for argv in sys.argv[1:])])
    print(f"\ncommand: {command}; cpus: {os.cpu_count()}")
    stages = next((r for r in rows if r["mode"] == "stages"), None)
    rows = [r for r in rows if r["mode"] != "stages"]
    memory = [r for r in rows if r["mode"] in ("in-memory", "in-memory-frames")]
    reference = max(memory, key=lambda r: r["frames"] / r["seconds"], default=None)
    ref_fps = reference["frames"] / reference["seconds"] if reference else None
    header = ("mode", "deflate", "frames", "time s", "frames/s", "vs memory", "peak MB",
              "out MB", "build s", "CPU s", "sys s", "CPU ms/fr")  # fmt: skip
    widths = (-16, 7, 6, 7, 8, 9, 7, 7, 7, 6, 6, 9)
    cells = zip(header, widths, strict=True)
    print(" ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in cells))
    for r in rows:
        fps = r["frames"] / r["seconds"]
        ratio = f"{ref_fps / fps:.2f}x" if ref_fps else "-"
        print(f"{r['mode']:<16} {r['engine']:>7} {r['frames']:>6} {r['seconds']:>7.2f} "
              f"{fps:>8.1f} {ratio:>9} {r['peak_mb']:>7.0f} {r['out_mb']:>7.0f} "
              f"{r['build']:>7.2f} {r['cpu']:>6.1f} {r['sys']:>6.1f} "
              f"{1000 * r['cpu'] / r['frames']:>9.1f}")  # fmt: skip
    if reference:
        print(f"targets: peak < {MEMORY_TARGET_MB} MB; streaming within {THROUGHPUT_TARGET}x "
              f"of in-memory frames/s ('vs memory' = {reference['mode']} frames/s, the faster "
              "in-memory way, / this mode's; on a busy machine compare CPU ms/fr, which "
              "wall time follows when both cores are saturated)")  # fmt: skip
    default = next((r for r in rows if r["mode"] == "hdf5-gzip"), None)
    if reference and default:
        fps = default["frames"] / default["seconds"]
        print(f"default settings ({default['engine']}): {reference['mode']} "
              f"{ref_fps:.1f} frames/s, streamed {fps:.1f} frames/s, ratio {ref_fps / fps:.2f}x, "
              f"peak {default['peak_mb']:.0f} MB")  # fmt: skip
    if stages:
        print(f"\nstages, CPU ms per {args.size}² frame on one thread:")
        for name, ms in stages["cost"].items():
            print(f"  {name:<28} {ms:7.1f}")
        for name, ratio in stages["sizes"].items():
            print(f"  encoded size ({name}): {100 * ratio:.1f} % of float32")


if __name__ == "__main__":
    sys.exit(main())
