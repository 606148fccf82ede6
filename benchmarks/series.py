"""Throughput of a calibrated series: 1 worker against 2, side by side in one run.

Usage (from the repository root, with ccdgrid installed)::

    python benchmarks/series.py                      # 16 frames of 2048², 1 and 2 workers
    python benchmarks/series.py --repeat 2 --all     # also threads, warm starts, a plain loop
    python benchmarks/series.py --frames 4 --size 1024 --repeat 1
    python benchmarks/series.py --repeat 2 --timeline  # where each worker spent its time
    python benchmarks/series.py --repeat 3 --ceiling   # and what two busy cores give here

A stack of FReLoN-like frames of one plate (``grid_image`` with the
``frelon_2048`` presets, strong distortion, the same seed, so the same true
distortion) is written to an HDF5 file, each frame with the plate moved a
little further (0.25 px in y, -0.15 px in x and 2 mdeg per frame). Then
:func:`ccdgrid.series.calibrate_series` calibrates the whole stack from
``file.h5::/entry/data`` and writes one detector file per frame into a
scratch directory, with 1 worker (in this process) and with 2 (this process
and one worker process), the runs taking turns ``--repeat`` times. A worker
is one thread (BLAS, OpenMP and the detector-file compression held to one
thread), so 1 worker uses one core; ``--all`` adds a plain loop of
``calibrate`` + ``save`` with the libraries' own threads for comparison. Reported:
the best wall time of each configuration (the machine is shared: the best is
the least disturbed), frames/s, the ratio to 1 worker, the CPU time of all
processes (on a busy machine two processes get a larger share of it than
one, which flatters the wall-time ratio; twice the CPU time of 1 worker over
that of 2 bounds the ratio an idle machine would give), and the accuracy (mean
dense residual of the frames' maps against the true field at 20 000 points
inside the lit area, affine part removed; mean cross-validated RMS).

``--all`` adds: 2 threads of one process, warm starts from frame 0 with 1 and
2 workers, and a plain loop of ``calibrate`` + ``save`` (the cost of the
series machinery itself).

On a shared machine the wall times count what other processes took from the
run: each run also reports the CPU time other processes and the kernel used
meanwhile, and the ratio is estimated a second way, from each worker's CPU
time (its frames laid end to end after its start-up; see ``cpu_makespan``):
an estimate for an idle machine, never a replacement for the measured ratio.
``--timeline`` prints, for the best run of each configuration, every worker's
start-up (when the worker process was asked for, when its initialiser ran,
when its imports were done, the CPU time they took), its frames (start-end,
s from the call, and in brackets the CPU time of the frame's process while
it ran; a ``+`` when the frame's detector file was compressed with a core
lent by an idle worker at the end), its busy and CPU time, gaps and idle
time at the end.
``--ceiling`` measures what this machine gives two workers without the
series: the series' per-frame work (``calibrate`` + ``save_detector`` with
one compression thread) in one fresh process, then in two at once (see
:func:`ceiling`); twice the first time over the second bounds the ratio.
``--outdir /dev/shm`` writes the detector files to memory (the disk out of
the measure).

The worker process is forked when this process runs a single thread (see
``ccdgrid._series_pool._start_method``), which needs numpy's BLAS and the OpenMP
runtime held to one thread before they load; else it is spawned and imports
numpy, scipy and the pipeline again (~0.6 s of CPU). Each run says which.
The ``ccdgrid calibrate`` command sets these variables itself for a series
(unless the user set them) before numpy loads; this script leaves them to
the caller, so that ``--all``'s plain loop keeps the libraries' threads. To
measure what the command does::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/series.py --repeat 2 --timeline

Both configurations do the same work either way: 1 worker runs single-threaded
in this process (threadpoolctl), with or without these variables.
"""

import argparse
import os
import pathlib
import resource
import shutil
import tempfile
import time

import h5py
import numpy as np

from ccdgrid.detector_file import load
from ccdgrid.pipeline import calibrate
from ccdgrid.series import calibrate_series
from ccdgrid.synthetic import dense_residual, grid_image

STEP = (0.25, -0.15)  # px per frame, (y, x)
TURN_MDEG = 2.0  # per frame


def make_stack(path, n, size):
    """Write ``n`` frames to ``path::/entry/data``; return the last frame's truth and lit area."""
    with h5py.File(path, "w") as h5:
        data = h5.create_dataset("/entry/data", (n, size, size), dtype=np.uint16)
        for k in range(n):
            g = grid_image(
                (size, size),
                distortion="strong",
                offset=(0.3 + STEP[0] * k, -0.2 + STEP[1] * k),
                rotation_deg=0.5 + TURN_MDEG * 1e-3 * k,
                seed=11,
            )
            data[k] = g.image
    return g.truth, g.taper_mask


def accuracy(files, truth, region):
    """Mean dense residual (px) of the detector files' maps against the true field."""
    rms = []
    for path in files:
        rec = load(path)
        rms.append(dense_residual(truth, rec.dy, rec.dx, rec.mask, region=region).rms)
    return float(np.mean(rms))


def cpu_seconds():
    """User + system CPU time of this process and of its finished children, s."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine_cpu_seconds():
    """Busy and idle CPU time of the whole machine since boot, s (Linux; else NaN).

    Busy less this run's own CPU time is what other processes and the kernel
    (e.g. writing the detector files back to disk) took from the run.
    """
    try:
        with open("/proc/stat", encoding="ascii") as stream:
            ticks = [int(v) for v in stream.readline().split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / hz, idle / hz


def children_cpu_seconds():
    """User + system CPU time of the finished children of this process, s."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def timelines(res):
    """Per-worker lines: start-up, frames, busy and idle time, CPU (s from the call)."""
    t0 = res.timeline["start"]
    end = t0 + res.seconds
    workers = {}
    for f in res.frames:
        if f.timing:
            workers.setdefault(f.timing["worker"], []).append(f.timing | {"i": f.index})
    startups = {str(p["pid"]): p for p in res.timeline.get("processes", [])}
    lines = []
    for name, frames in sorted(workers.items(), key=lambda kv: kv[0] in startups):
        frames.sort(key=lambda t: t["start"])
        busy = sum(t["end"] - t["start"] for t in frames)
        cpu = sum(t["cpu"] for t in frames)
        first, last = frames[0]["start"] - t0, frames[-1]["end"] - t0
        head = f"process {name}" if name in startups else f"this process ({name})"
        if name in startups:
            st = startups[name]
            head += (
                f" ({st.get('method', 'spawn')}ed; pool asked at "
                f"{res.timeline['pool_started'] - t0:.2f}, initialiser runs at "
                f"{st['entered'] - t0:.2f}, imports done at {st['ready'] - t0:.2f}, "
                f"start-up CPU {st['startup_cpu']:.2f} s)"
            )
        lines.append(
            f"    {head}: {len(frames)} frames, first starts at {first:.2f}, busy {busy:.2f} s "
            f"(CPU {cpu:.2f} s), "
            f"gaps {last - first - busy:.2f} s, idle at the end {end - t0 - last:.2f} s"
        )
        lines.append(
            "      "
            + " ".join(
                f"{t['i']}:{t['start'] - t0:.2f}-{t['end'] - t0:.2f}"
                f"({t['cpu']:.2f}){'+' * t.get('borrowed', 0)}"
                for t in frames
            )
        )
    return lines


def cpu_makespan(res):
    """The run's length if every worker had had a core to itself, s (an estimate).

    Each worker's frames are laid end to end at their CPU time (they stay
    where they ran), after the worker's own start: this process's first
    frame as measured, a worker process's start-up at its CPU time. On a
    shared machine the wall time counts the time other processes took the
    cores; this does not (it keeps the contention of the run's own workers,
    which shows as CPU time).
    """
    t0 = res.timeline["start"]
    startups = {str(p["pid"]): p for p in res.timeline.get("processes", [])}
    ends = {}
    for f in res.frames:
        if not f.timing:
            continue
        name = f.timing["worker"]
        if name not in ends:
            if name in startups:
                ends[name] = res.timeline["pool_started"] - t0 + startups[name]["startup_cpu"]
            else:
                ends[name] = min(g.timing["start"] for g in res.frames if g.timing) - t0
        ends[name] += f.timing["cpu"]
    return max(ends.values())


def series_run(source, workers, executor="process", warm=False, outdir=None):
    out = tempfile.mkdtemp(prefix="ccdgrid-bench-series-", dir=outdir)
    try:
        cpu, cpu_children, machine = cpu_seconds(), children_cpu_seconds(), machine_cpu_seconds()
        res = calibrate_series(
            source,
            pitch=5e-3,
            output=out,
            workers=workers,
            executor=executor,
            warm=warm,
            progress=False,
        )
        # the worker processes have exited (and been waited for) by now
        res.cpu_seconds = cpu_seconds() - cpu
        res.cpu_children = children_cpu_seconds() - cpu_children
        busy, idle = np.subtract(machine_cpu_seconds(), machine)
        res.cpu_others, res.cpu_idle = busy - res.cpu_seconds, idle
        if not res.ok:
            raise SystemExit(f"frames failed: {[f.error for f in res.failed]}")
        return res, out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def plain_loop(stack_path, n):
    """``calibrate`` + ``save`` frame by frame, no series machinery."""
    from ccdgrid.io import read_image

    out = tempfile.mkdtemp(prefix="ccdgrid-bench-loop-")
    try:
        start = time.perf_counter()
        for k in range(n):
            image, info = read_image(f"{stack_path}::/entry/data", frame=k)
            calibrate(image, pitch=5e-3, source=info).save(os.path.join(out, f"{k}.h5"))
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


# s a ceiling's process may wait for the other, or this one for a result
_CEILING_WAIT = 1800


def _ceiling_worker(source, frames, outdir, barrier, queue):
    """Calibrate and save ``frames`` of ``source`` in a loop, as a series worker does."""
    from ccdgrid.detector_file import save_detector
    from ccdgrid.io import read_image

    try:
        images = [read_image(source, frame=k, sha256="")[0] for k in frames]
        warm_up = calibrate(images[0], pitch=5e-3)
        save_detector(os.path.join(outdir, "warm-up.h5"), warm_up, workers=1)
        barrier.wait(timeout=_CEILING_WAIT)
        start, cpu = time.perf_counter(), time.process_time()
        for k, image in zip(frames, images, strict=True):
            save_detector(os.path.join(outdir, f"{k}.h5"), calibrate(image, pitch=5e-3), workers=1)
        queue.put((time.perf_counter() - start, time.process_time() - cpu))
    except BaseException as exc:
        barrier.abort()  # the other process must not wait for this one
        queue.put(f"{type(exc).__name__}: {exc}")
        raise


def ceiling(source, frames, outdir=None):
    """Seconds per frame of the series' work alone and with two processes at once.

    The work of a series worker without the series: in a fresh process
    (spawned, one thread for BLAS and OpenMP as the series' workers), the
    frames read into memory first, one frame calibrated and saved to warm
    up, then ``frames`` frames calibrated and saved (``save_detector`` with
    one compression thread, the series' setting). Once with one such
    process, once with two started together (each all the frames). The
    ratio of the two says what two busy cores give on this machine: the
    cores' own slowdown when both work (shared caches, memory bandwidth,
    the host's clock) and the core a single worker's file writer borrows.
    """
    import multiprocessing

    from ccdgrid._series_worker import THREAD_ENV

    ctx = multiprocessing.get_context("spawn")
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: "1" for k in saved})
    out = tempfile.mkdtemp(prefix="ccdgrid-bench-ceiling-", dir=outdir)
    try:
        result, procs = {}, []
        for n in (1, 2):
            barrier, queue = ctx.Barrier(n), ctx.Queue()
            procs = [
                ctx.Process(
                    target=_ceiling_worker,
                    args=(source, frames, os.path.join(out, str(p)), barrier, queue),
                )
                for p in range(n)
            ]
            for p, proc in enumerate(procs):
                os.makedirs(os.path.join(out, str(p)), exist_ok=True)
                proc.start()
            # a worker killed (out of memory, say) puts nothing: give up in time
            times = [queue.get(timeout=_CEILING_WAIT) for _ in procs]
            for proc in procs:
                proc.join()
            failed = [t for t in times if isinstance(t, str)]
            if failed:
                raise SystemExit(f"the ceiling's worker failed: {failed[0]}")
            result[n] = (
                max(t[0] for t in times) / len(frames),
                sum(t[1] for t in times) / (n * len(frames)),
            )
        return result
    finally:
        for proc in procs:  # one killed leaves the other waiting: not at exit
            if proc.is_alive():
                proc.terminate()
                proc.join()
        shutil.rmtree(out, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="also threads, warm starts, loop")
    parser.add_argument("--stack", help="keep the generated stack in this .h5 file (reused)")
    parser.add_argument(
        "--outdir",
        help="write the detector files under this directory (default: the system's temporary "
        "directory; /dev/shm takes the disk out of the measure)",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="print each worker's start-up, frames and idle time in the best runs",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure the series' work (calibrate + save) in one process alone and in two "
        "at once, without the series: what two busy cores give on this machine",
    )
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="ccdgrid-bench-stack-")
    stack = pathlib.Path(args.stack) if args.stack else pathlib.Path(scratch) / "stack.h5"
    try:
        t = time.perf_counter()
        if stack.exists():
            print(f"reusing {stack}")
            last = args.frames - 1
            g = grid_image(
                (args.size, args.size),
                distortion="strong",
                offset=(0.3 + STEP[0] * last, -0.2 + STEP[1] * last),
                seed=11,
            )
            truth, region = g.truth, g.taper_mask
        else:
            truth, region = make_stack(stack, args.frames, args.size)
            print(f"wrote {args.frames} frames of {args.size}² in {time.perf_counter() - t:.1f} s")
        source = f"{stack}::/entry/data"
        configs = [
            ("1 worker", 1, "process", False),
            ("2 workers (processes)", 2, "process", False),
        ]
        if args.all:
            configs += [
                ("2 workers (threads)", 2, "thread", False),
                ("1 worker, warm", 1, "process", True),
                ("2 workers (processes), warm", 2, "process", True),
            ]
        best = {name: None for name, *_ in configs}
        loop_best = None
        for _ in range(args.repeat):
            for name, workers, executor, warm in configs:
                res, out = series_run(source, workers, executor, warm, args.outdir)
                try:
                    if best[name] is None or res.seconds < best[name][0].seconds:
                        files = [f.output for f in res.frames]
                        best[name] = (res, accuracy(files, truth, region))
                finally:
                    shutil.rmtree(out, ignore_errors=True)
            if args.all:
                seconds = plain_loop(stack, args.frames)
                loop_best = seconds if loop_best is None else min(loop_best, seconds)
        base = best["1 worker"][0].throughput
        print(
            f"{args.frames} frames of {args.size}², best of {args.repeat}, "
            f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.2f}:"
        )
        for name, (res, dense) in best.items():
            cv = np.nanmean(res.table()["cv_rms_px"])
            warm = sum(f.warm for f in res.frames)
            print(
                f"  {name:30s} {res.seconds:6.2f} s  {res.throughput:5.2f} frames/s  "
                f"x{res.throughput / base:4.2f}  CPU {res.cpu_seconds:6.1f} s  "
                f"dense residual {dense:.4f} px  CV RMS {cv:.4f} px  warm {warm}/{len(res.frames)}"
            )
            if res.timeline.get("start_method"):
                print(f"    worker processes started by {res.timeline['start_method']}")
            if args.timeline:
                print(
                    f"    CPU of the worker processes {res.cpu_children:.2f} s; of other "
                    f"processes and the kernel during the run {res.cpu_others:.2f} s; "
                    f"idle {res.cpu_idle:.2f} s"
                )
                print("\n".join(timelines(res)))
        if loop_best is not None:
            print(
                f"  {'plain loop calibrate + save':30s} {loop_best:6.2f} s  "
                f"{args.frames / loop_best:5.2f} frames/s  x{args.frames / loop_best / base:4.2f}"
            )
        two, one = best["2 workers (processes)"][0], best["1 worker"][0]
        print(f"ratio 2 workers / 1 worker: {two.throughput / base:.2f} (target >= 1.7)")
        print(
            f"the same from each worker's CPU time (an estimate for an idle machine): "
            f"{cpu_makespan(one):.2f} s / {cpu_makespan(two):.2f} s = "
            f"{cpu_makespan(one) / cpu_makespan(two):.2f}"
        )
        # on a busy machine the wall-time ratio is unreliable: the CPU time says
        # what the parallel run costs in all, start-up and contention included
        print(
            f"CPU time 2 workers / 1 worker: {two.cpu_seconds / one.cpu_seconds:.2f} "
            f"(a ratio on an idle machine of at most {2 * one.cpu_seconds / two.cpu_seconds:.2f})"
        )
        if args.ceiling:
            frames = list(range(min(args.frames, 8)))
            best = {}
            for _ in range(args.repeat):
                for n, (wall, cpu) in ceiling(source, frames, args.outdir).items():
                    if n not in best or wall < best[n][0]:
                        best[n] = (wall, cpu)
            (one, one_cpu), (two, two_cpu) = best[1], best[2]
            print(
                f"ceiling (the series' work without the series, {len(frames)} frames a process, "
                f"best of {args.repeat}): {one:.3f} s a frame alone (CPU {one_cpu:.3f} s), "
                f"{two:.3f} s with two processes at once (CPU {two_cpu:.3f} s each): two workers "
                f"give at most x{2 * one / two:.2f} of one on this machine, start-up aside"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
