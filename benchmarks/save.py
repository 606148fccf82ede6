"""Cost of writing the detector file: deflate choices side by side, and pyFAI's own save.

Usage (from the repository root, ccdgrid and pyFAI installed; python-isal
optional)::

    python benchmarks/save.py                    # 2048², 3 repeats, all variants
    python benchmarks/save.py --size 4096 --repeat 1 --no-pyfai
    python benchmarks/save.py --size 1024 --check   # also: pyFAI loads each file, corners
                                                    # bit-identical to its set_dx/set_dy

The corner maps are a smooth field of a few pixels (what a calibration
produces), float32, on the (ny + 1, nx + 1) corner grid. Every variant goes
through :func:`ccdgrid.detector_file.save_detector`; only the chunk
compressor differs:

* ``<rev>: default``: ``save_detector`` as of git revision ``--baseline``
  (default ``main``), with zlib and, if installed, ISA-L: the "before";
* ``zlib-whole L``: zlib deflate of the whole shuffled chunk at level L (how
  main deflates with zlib; its default level is 2);
* ``zlib-planes L``: the current zlib path, one deflate per byte plane in a
  single zlib stream, low byte plane stored at levels 1-2;
* ``isal-whole L``: ISA-L deflate of the whole shuffled chunk (how main uses
  ``ccdgrid[fast]``, at level 2);
* ``isal-planes L``: the current path with python-isal installed (ISA-L at
  level min(L, 2), byte plane by byte plane, low plane stored at L <= 2);
* ``none``: ``compression_level=0``;
* ``pyFAI``: ``Detector(...); set_dx; set_dy; save(path)`` (pyFAI 2026.9).

Reported: median wall and CPU time (all threads of this process) of the
call, the file size, and a single-threaded breakdown of one pass over the
corner chunks (build the float32 chunk, shuffle, deflate) so the cost of
each phase is visible. Timings are medians over ``--repeat`` calls on a
possibly shared machine: read them as a ratio between rows.
"""

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path

import numpy as np

from ccdgrid import detector_file

PIXEL_SIZE = (51.0e-6, 50.5e-6)


def corner_maps(size, seed=0):
    """Smooth (dy, dx) corner maps of shape (size + 1, size + 1), float32 px, up to ~8 px."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size + 1, 0 : size + 1] / size
    a = rng.uniform(0.5, 1.5, 4)
    dy = 4 * a[0] * np.sin(3 * y + 1) * np.cos(2 * x) + 2 * a[1] * x * y
    dx = -3 * a[2] * np.cos(2 * y - x) + 3 * a[3] * x**2
    return dy.astype(np.float32), dx.astype(np.float32)


def variants(have_isal):
    """(label, compression_level, compressor factory or None = ccdgrid's own choice, isal?)."""
    rows = [
        ("zlib-whole 1", 1, functools.partial(_whole_zlib, 1)),
        ("zlib-whole 2", 2, functools.partial(_whole_zlib, 2)),
        ("zlib-planes 1", 1, None),
        ("zlib-planes 2 (default)", 2, None),
        ("zlib-planes 3", 3, None),
        ("zlib-planes 6", 6, None),
        ("none (level 0)", 0, None),
    ]
    rows = [(label, level, make, False) for label, level, make in rows]
    if have_isal:
        from isal import isal_zlib

        for level in (0, 1, 2):
            make = functools.partial(_deflate_whole, compress=isal_zlib.compress, level=level)
            rows.append((f"isal-whole {level}", max(level, 1), make, True))
        rows.append(("isal-planes 2 (default)", 2, None, True))
        rows.append(("isal-planes 3", 3, None, True))
    return rows


def _deflate_whole(make_planes, compress, level):
    return compress(make_planes(), level=level)


def _whole_zlib(level, make_planes):
    return zlib.compress(make_planes(), level)


def run_save(path, cal, level, compressor, use_isal):
    saved_isal = sys.modules.get("isal", "absent")
    saved_compressor = detector_file._compressor
    if not use_isal:
        sys.modules["isal"] = None  # ccdgrid falls back to zlib
    if compressor is not None:
        detector_file._compressor = lambda _level: compressor
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        detector_file.save_detector(path, cal, compression_level=level)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        detector_file._compressor = saved_compressor
        if saved_isal == "absent":
            sys.modules.pop("isal", None)
        else:
            sys.modules["isal"] = saved_isal


def baseline_module(rev):
    """ccdgrid's detector_file.py as of git revision ``rev``, imported beside the current one."""
    import importlib.util
    import subprocess

    source = subprocess.run(
        ["git", "show", f"{rev}:src/ccdgrid/detector_file.py"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    # a name inside the package, so its relative imports (.errors, __version__) resolve
    spec = importlib.util.spec_from_file_location("ccdgrid._detector_file_baseline", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module


def run_baseline(module, path, cal, use_isal):
    saved_isal = sys.modules.get("isal", "absent")
    if not use_isal:
        sys.modules["isal"] = None
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        module.save_detector(path, cal)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        if saved_isal == "absent":
            sys.modules.pop("isal", None)
        else:
            sys.modules["isal"] = saved_isal


def run_pyfai(path, cal):
    from pyFAI.detectors import Detector

    wall, cpu = time.perf_counter(), time.process_time()
    det = Detector(*cal.pixel_size, max_shape=cal.shape)
    det.set_dx(cal.dx)
    det.set_dy(cal.dy)
    det.save(str(path))
    return time.perf_counter() - wall, time.process_time() - cpu


def check(path, cal):
    """pyFAI loads the file and its corners equal pyFAI's own set_dx/set_dy, bit for bit."""
    from pyFAI import detector_factory
    from pyFAI.detectors import Detector

    ref = Detector(*cal.pixel_size, max_shape=cal.shape)
    ref.set_dx(cal.dx)
    ref.set_dy(cal.dy)
    ours = detector_factory(str(path)).get_pixel_corners()
    return bool(np.array_equal(ours, ref.get_pixel_corners()))


def _chunk_before(make):
    """The chunk as built before: float32 (rows, nx, 4) by 4 strided copies, then shuffled."""
    i0, i1, rows = make.i0, make.i1, make.rows
    block = make.corner_map[i0 : i1 + 1].astype(np.float64)
    if make.axis == 0:
        block += np.arange(i0, i1 + 1, dtype=np.float64)[:, None]
    else:
        block += np.arange(block.shape[1], dtype=np.float64)
    block *= make.pixel
    metres = block.astype(np.float32)
    n = i1 - i0
    out = np.zeros((rows, metres.shape[1] - 1, 4), dtype=np.float32)
    out[:n, :, 0] = metres[:-1, :-1]
    out[:n, :, 1] = metres[1:, :-1]
    out[:n, :, 2] = metres[1:, 1:]
    out[:n, :, 3] = metres[:-1, 1:]
    return np.ascontiguousarray(out.view(np.uint8).reshape(-1, 4).T)


def phases(cal, compressors, repeat):
    """Single-threaded CPU seconds (median of ``repeat``) of one pass over the corner chunks."""
    ny, nx = cal.shape
    rows = detector_file._chunk_rows(nx * 4 * 4, ny)
    engines = {name: detector_file._planes_engine(name) for name in ("numpy", "cython")}
    tasks, numpy_tasks = (
        [
            make
            for _, _, make in detector_file._corner_tasks(
                cal.dy, cal.dx, cal.pixel_size, rows, engines[name]
            )
        ]
        for name in ("cython", "numpy")
    )

    def cpu(fn):
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            result = fn()
            times.append(time.process_time() - t0)
        return statistics.median(times), result

    # each chunk is dropped once built, as in the save (retaining them all would time page faults)
    out = {}
    out["build+shuffle, before"] = (cpu(lambda: [_chunk_before(m).size for m in tasks])[0], None)
    out["build+shuffle, numpy twin"] = (cpu(lambda: [m().size for m in numpy_tasks])[0], None)
    out["build+shuffle, kernel"] = (cpu(lambda: [m().size for m in tasks])[0], None)
    chunks = [m() for m in tasks]
    assert all(np.array_equal(c, _chunk_before(m)) for c, m in zip(chunks, tasks, strict=True))
    for label, compressor in compressors:
        seconds, size = cpu(lambda c=compressor: sum(len(c(lambda x=x: x)) for x in chunks))
        out[f"deflate {label}"] = (seconds, size)
    return rows, len(tasks), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image side, px (default 2048)")
    parser.add_argument("--repeat", type=int, default=3, help="calls per variant (median)")
    parser.add_argument("--check", action="store_true", help="load each file with pyFAI")
    parser.add_argument("--no-pyfai", action="store_true", help="skip pyFAI's own save")
    parser.add_argument("--no-phases", action="store_true", help="skip the phase breakdown")
    parser.add_argument(
        "--baseline",
        default="main",
        help="git revision whose save_detector runs first, default settings (default: main; "
        "'' to skip)",
    )
    args = parser.parse_args(argv)

    try:
        import isal  # noqa: F401

        have_isal = True
    except ImportError:
        have_isal = False
    n = args.size
    dy, dx = corner_maps(n)
    cal = types.SimpleNamespace(
        dx=dx, dy=dy, pixel_size=PIXEL_SIZE, mask=None, shape=(n, n), summary=None
    )
    print("command: python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]))
    print(
        f"image {n}x{n}; cpus usable {len(os.sched_getaffinity(0))}; "
        f"load average {os.getloadavg()[0]:.1f}; isal {'yes' if have_isal else 'no'}; "
        f"repeat {args.repeat}"
    )
    header = f"{'variant':26s} {'wall s':>8s} {'cpu s':>8s} {'file MB':>8s}"
    header += "  pyFAI corners ==" if args.check else ""
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        if args.baseline:
            module = baseline_module(args.baseline)
            rows.append((f"{args.baseline}: default, zlib", "baseline", module, False))
            if have_isal:
                rows.append((f"{args.baseline}: default, isal", "baseline", module, True))
        rows += variants(have_isal)
        if not args.no_pyfai:
            rows.append(("pyFAI Detector.save", None, None, False))
        for label, level, make, use_isal in rows:
            path = Path(tmp) / "det.h5"
            walls, cpus = [], []
            for _ in range(args.repeat):
                path.unlink(missing_ok=True)
                if level is None:
                    wall, cpu = run_pyfai(path, cal)
                elif level == "baseline":
                    wall, cpu = run_baseline(make, path, cal, use_isal)
                else:
                    wall, cpu = run_save(path, cal, level, make, use_isal)
                walls.append(wall)
                cpus.append(cpu)
            line = (
                f"{label:26s} {statistics.median(walls):8.3f} {statistics.median(cpus):8.3f} "
                f"{path.stat().st_size / 1e6:8.1f}"
            )
            if args.check:
                line += f"  {check(path, cal)}"
            print(line, flush=True)

    if args.no_phases:
        return
    planes = detector_file._deflate_planes
    compressors = [
        ("zlib-whole 2", functools.partial(_whole_zlib, 2)),
        ("zlib-planes 2", functools.partial(planes, level=2, store_low=True, engine=zlib)),
        ("zlib-planes 3", functools.partial(planes, level=3, store_low=False, engine=zlib)),
    ]
    if have_isal:
        from isal import isal_zlib

        for level in (0, 2):
            compressors.append(
                (
                    f"isal-whole {level}",
                    functools.partial(_deflate_whole, compress=isal_zlib.compress, level=level),
                )
            )
        compressors.append(
            ("isal-planes 2", functools.partial(planes, level=2, store_low=True, engine=isal_zlib))
        )
    rows, count, out = phases(cal, compressors, args.repeat)
    print(f"\ncorner chunks (x and y planes): {count} chunks of {rows} rows, one thread")
    print(f"{'phase':26s} {'cpu s':>8s} {'MB out':>8s}")
    for label, (seconds, size) in out.items():
        size_text = "" if size is None else f"{size / 1e6:8.1f}"
        print(f"{label:26s} {seconds:8.3f} {size_text}")


if __name__ == "__main__":
    main()
