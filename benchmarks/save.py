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

* ``zlib-whole L``: zlib deflate of the whole shuffled chunk at level L (what
  ccdgrid did before byte-plane deflate; level 2 was the default);
* ``zlib-planes L``: the current zlib path, one deflate per byte plane in a
  single zlib stream, low byte plane stored at levels 1-2;
* ``isal L``: ISA-L deflate of the whole shuffled chunk (``ccdgrid[fast]``);
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
        ("zlib-whole 2 (before)", 2, functools.partial(_whole_zlib, 2)),
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
            make = functools.partial(
                detector_file._deflate_whole, compress=isal_zlib.compress, level=level
            )
            label = f"isal {level}" + (" (default)" if level == 2 else "")
            rows.append((label, max(level, 1), make, True))
    return rows


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
    tasks = [
        make for _, _, make in detector_file._corner_tasks(cal.dy, cal.dx, cal.pixel_size, rows)
    ]

    def cpu(fn):
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            result = fn()
            times.append(time.process_time() - t0)
        return statistics.median(times), result

    out = {}
    out["build+shuffle, before"] = (cpu(lambda: [_chunk_before(m) for m in tasks])[0], None)
    seconds, chunks = cpu(lambda: [m() for m in tasks])
    out["build+shuffle, now"] = (seconds, None)
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
        rows = [(label, level, make, isal_) for label, level, make, isal_ in variants(have_isal)]
        if not args.no_pyfai:
            rows.append(("pyFAI Detector.save", None, None, False))
        for label, level, make, use_isal in rows:
            path = Path(tmp) / "det.h5"
            walls, cpus = [], []
            for _ in range(args.repeat):
                path.unlink(missing_ok=True)
                if level is None:
                    wall, cpu = run_pyfai(path, cal)
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
    compressors = [
        ("zlib-whole 2", functools.partial(_whole_zlib, 2)),
        ("zlib-planes 2", functools.partial(detector_file._deflate_planes, level=2)),
        ("zlib-planes 3", functools.partial(detector_file._deflate_planes, level=3)),
    ]
    if have_isal:
        from isal import isal_zlib

        for level in (0, 1, 2):
            compressors.append(
                (
                    f"isal {level}",
                    functools.partial(
                        detector_file._deflate_whole, compress=isal_zlib.compress, level=level
                    ),
                )
            )
    rows, count, out = phases(cal, compressors, args.repeat)
    print(f"\ncorner chunks (x and y planes): {count} chunks of {rows} rows, one thread")
    print(f"{'phase':26s} {'cpu s':>8s} {'MB out':>8s}")
    for label, (seconds, size) in out.items():
        size_text = "" if size is None else f"{size / 1e6:8.1f}"
        print(f"{label:26s} {seconds:8.3f} {size_text}")


if __name__ == "__main__":
    main()
