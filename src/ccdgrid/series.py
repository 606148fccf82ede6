"""Calibrate a series of grid images in parallel: :func:`calibrate_series`.

A series is several image files, frames of an HDF5 stack (``file.h5::/path``)
or in-memory arrays. Every frame is calibrated on its own
(:func:`ccdgrid.pipeline.calibrate`), by a pool of worker processes (or
threads), and gets one detector file and one row of a table: hole counts,
grid, pixel size, cross-validated residual, and the drift against a reference
(the first frame of the series that calibrates, or a detector file given as
``reference``). A frame that fails is recorded with its error message and the
series goes on.

Why processes, and how they are set up: much of the pipeline is numpy and
scipy code that holds the GIL between compiled calls, and the frames are
independent, so worker processes are the safe way to use several cores
(``executor="thread"`` is kept for comparison: on the shared 2-core machine
two threads gave 1.0-1.5x, a measurement too noisy to choose them). Every
worker runs its BLAS and OpenMP single-threaded (worker processes are started
with :data:`THREAD_ENV` set to 1, and a forked one is held to one thread with
threadpoolctl, as the calling process is, which works as one of the
workers): on the 2-core
reference machine a 2048² frame then cost about 0.65 s of CPU, against
0.75-0.8 s with the libraries' own threads (which spin while they wait) for
the same wall time, and two workers do not fight over the cores (it is
~0.43 s since the detector file's corner kernel; about half of it is the
detector file, mostly its deflate). Workers read
their frames themselves (a path and a frame number travel to them, never an
image), write the detector files themselves and send back one small
:class:`FrameResult`. A spawned worker process costs about 0.6 s of CPU to
start (importing numpy, scipy and the pipeline: the imports scipy makes for
itself are most of it, ``scipy.interpolate`` brings in ``scipy.optimize``
whatever the pipeline imports) and ~0.1 s more on its first frame (it loads
the drift reference once): a series needs several frames per worker to
gain. A forked one starts in ~0.01 s, with the modules of the calling
process; workers are forked only from a process that runs a single thread
(no OpenMP or BLAS thread pool, no other Python thread) and holds no HDF5
file open, else spawned (:func:`ccdgrid._series_pool._start_method` says
why; the ``ccdgrid`` command, or a script, runs single-threaded when
``OMP_NUM_THREADS=1`` and ``OPENBLAS_NUM_THREADS=1`` are set before numpy is
imported).

Scheduling: frames are handed out one at a time to whichever worker is free
(the calling process's worker thread first), so a slow or late worker simply
does fewer frames; a worker process gets its first frame only once it is up
(the calling process calibrates while it imports: a frame queued in a
process still starting could not be taken back). While at least one frame
per worker would still wait, one more frame is queued behind a busy worker
process (it then never waits for this process between two frames); the
last frames go only to a free worker, since one queued behind a busy one
could leave another worker idle for up to two frames at the end; the worker
thread of the calling process takes the next frame as soon as it is free,
whatever waits queued in a worker process. Whole frames cannot be split, so
one worker may still wait up to one frame at the end: once no frame is left
to start, every idle worker lends its core to a busy one, which compresses
its detector file (about half of a frame's CPU) with one more thread
(:attr:`FrameResult.timing` ``borrowed``). The input files are hashed
(their SHA-256 is recorded in every detector file) in a thread while the
first frame is calibrated, not before it.
:attr:`FrameResult.timing` and :attr:`SeriesResult.timeline` say where and
when every frame ran and when each worker process was ready;
``benchmarks/series.py --timeline`` prints them with the CPU time of each
part, and measures the throughput with 1 and 2 workers.

Drift is measured as :mod:`ccdgrid.warmstart` measures it (grid shift at the
image centre, rotation, scale, largest change of ``dx``/``dy`` over the pixels
valid in both), after matching the frame's lattice indices to the reference's
(two calibrations index their holes from their own corner): the shift must be
less than half a pitch to be told apart from a whole-pitch move.

The modules of a series: this one checks the arguments and schedules the
frames (``_Run``); :mod:`ccdgrid.series_frames` selects the frames and names
their detector files, :mod:`ccdgrid.series_table` holds the results
(:class:`FrameResult`, :class:`SeriesResult`, the CSV and JSON files),
:mod:`ccdgrid._series_worker` does one frame's work in a worker and
:mod:`ccdgrid._series_pool` runs the workers (processes, threads, fork or
spawn).

Coordinates are ``(y, x)`` index coordinates in pixels (the centre of pixel
``(i, j)`` is at ``(i, j)``).
"""

import concurrent.futures as cf
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
from collections import deque

import numpy as np

from ._h5write import check_writable
from ._series_pool import _Pool
from ._series_worker import THREAD_ENV as THREAD_ENV  # re-exported
from ._series_worker import _Config, _fill_drift, _join, _new_row
from .errors import CcdgridError
from .series_frames import _assign_outputs, _file_of, _specs, expand_frames, parse_frames
from .series_table import _DRIFT_COLUMNS, COLUMNS, FrameResult, SeriesResult, _write_text

__all__ = [
    "COLUMNS",
    "FrameResult",
    "SeriesResult",
    "calibrate_series",
    "expand_frames",
    "parse_frames",
]

#: Options passed on to :func:`ccdgrid.pipeline.calibrate` for every frame.
CALIBRATE_OPTIONS = (
    "hole_diameter",
    "pitch_px",
    "threshold",
    "smoothing",
    "backend",
    "cv_folds",
    "polarity",
)

_MAX_ATTEMPTS = 2  # a frame in flight when a worker process dies is tried once more


# -- the series ----------------------------------------------------------------------


def calibrate_series(
    sources,
    *,
    pitch=5e-3,
    frames=None,
    output=None,
    table=None,
    workers=None,
    executor="process",
    warm=False,
    reference=None,
    mask=None,
    progress=True,
    on_frame=None,
    **options,
):
    """Calibrate every frame of a series of grid images, in parallel.

    Parameters
    ----------
    sources : str, os.PathLike, ndarray or list of them
        Image files (anything :func:`ccdgrid.io.read_image` reads; an HDF5
        stack as ``"file.h5::/entry/data"``), or in-memory arrays of shape
        ``(ny, nx)`` or stacks ``(n, ny, nx)`` (sent to the workers whole:
        prefer files for process workers).
    pitch : float, m
        Hole spacing of the plate.
    frames : None, int, slice, str or sequence of (int or slice)
        Frames to calibrate in each multi-frame source (see
        :func:`parse_frames` for the string form, e.g. ``"0:16"``); None:
        every frame.
    output : str, os.PathLike or None
        Where the detector files go: a directory (created if missing; files
        named ``STEM_detector.h5``, or ``STEM_FFFF_detector.h5`` for frame
        FFFF of a stack), or a name pattern with the fields ``{index}``
        (position in the series), ``{frame}`` and ``{stem}``, e.g.
        ``"out/detector_{index:03d}.h5"``. None: no detector files (the
        table only). Each file is written by its worker, atomically.
    table : str, os.PathLike or None
        Write the table to ``TABLE.csv`` and ``TABLE.json`` (a ``.csv`` or
        ``.json`` suffix is replaced); None: not written.
    workers : int or None
        Frames calibrated at once, each by one single-threaded worker (BLAS,
        OpenMP and the detector-file compression held to one thread); None:
        the CPUs this process may use, at most the number of frames. 1
        calibrates the frames one after the other in the calling process, on
        one core.
    executor : {"process", "thread"}
        Worker processes (each limited to one OpenMP/BLAS thread; scales) or
        threads of this process (much of the pipeline holds the GIL; kept for
        comparison).
    warm : bool
        Warm-start every frame from the drift reference
        (:func:`ccdgrid.warmstart.recalibrate`): from ``reference``, or else
        from the first frame that calibrates (frames already running by then
        are calibrated cold).
    reference : str, os.PathLike or None
        A detector file written by ccdgrid: measure the drift against it
        (and warm-start from it with ``warm=True``). None: the drift is
        measured against the first frame of the series that calibrates.
    mask : str, os.PathLike, array_like of shape (ny, nx) or None
        Pixels to ignore in every frame (nonzero = invalid); a file is read
        once per worker.
    progress : bool
        Show a progress bar (tqdm) on stderr.
    on_frame : callable or None
        Called in this process with each :class:`FrameResult` as soon as it
        is complete (in completion order), e.g. to print a line per frame.
    **options
        Passed to :func:`ccdgrid.pipeline.calibrate` for every frame:
        ``hole_diameter``, ``pitch_px``, ``threshold``, ``smoothing``,
        ``backend``, ``cv_folds``, ``polarity`` (a warm start reads its
        frames as its reference did).

    Returns
    -------
    SeriesResult
        One :class:`FrameResult` per frame, in series order; failed frames
        carry their error message. ``SeriesResult.table()`` gives the table
        as a structured array.

    Raises
    ------
    CcdgridError
        Bad arguments, output names that would collide or overwrite an input,
        or an unusable reference file -- before any frame is calibrated. A
        frame that cannot be read or calibrated does not raise: it is
        recorded as failed, and so is a frame whose worker process died
        twice (it is tried again alone, never in the calling process).

    Notes
    -----
    Process workers are forked when this process runs a single thread and
    holds no HDF5 file open (Linux; ``SeriesResult.timeline["start_method"]``
    says why not), else spawned: a script that calls this function must do so
    under ``if __name__ == "__main__":``. A fresh Python process runs a
    single thread if ``OPENBLAS_NUM_THREADS=1`` (numpy's BLAS starts its
    threads on import otherwise) and ``OMP_NUM_THREADS=1`` (if OpenMP code
    ran before the series) are set before numpy is imported; a forked worker
    starts in ~0.01 s of CPU instead of ~0.6 s.
    With ``workers=N`` and process workers, N - 1 worker processes run and
    the calling process calibrates frames too, if threadpoolctl is installed
    (to hold its BLAS and OpenMP to one thread during the series); without
    it, N worker processes run and this process only schedules. With
    ``workers=1`` the frames are calibrated here, one after the other, also
    single-threaded when threadpoolctl is installed.

    The drift reference is the first frame, in series order, that
    calibrates. Frames that started before it was known (at most
    ``workers + 1``) are calibrated cold even with ``warm=True``, and their
    drift is measured from their detector files.

    Examples
    --------
    >>> res = ccdgrid.calibrate_series(  # doctest: +SKIP
    ...     "scan.h5::/entry/data", frames="0:16", pitch=5e-3, output="out/", workers=2
    ... )
    >>> res.table()["drift_shift_x_px"]  # doctest: +SKIP
    """
    from .gridfit import _check_pitch

    unknown = sorted(set(options) - set(CALIBRATE_OPTIONS))
    if unknown:
        raise CcdgridError(
            f"unknown option `{unknown[0]}` for calibrate_series; accepted: "
            + ", ".join(CALIBRATE_OPTIONS)
        )
    pitch = _check_pitch(pitch)
    _check_options(options)
    if executor not in ("process", "thread"):
        raise CcdgridError(f"`executor` must be 'process' or 'thread', got {executor!r}")
    if reference is not None:
        reference = _check_reference(reference)
    if mask is not None and not isinstance(mask, (str, os.PathLike)):
        mask = np.asarray(mask)
    elif mask is not None:
        mask = os.fspath(mask)
        if not os.path.isfile(mask.split("::", 1)[0]):
            raise CcdgridError(f"mask file not found: {mask}")
    specs = _specs(sources, frames)
    _assign_outputs(specs, output)  # creates the output directory
    table_paths = _table_paths(table)
    workers = _check_workers(workers, len(specs))
    kind = "serial" if workers == 1 else executor
    config = _Config(
        pitch=pitch,
        options=dict(options),
        mask=mask,
        # a worker is one thread, down to the detector-file compression: N
        # workers use N cores (workers=1 leaves the others free)
        save_workers=1,
    )
    start, wall = time.perf_counter(), time.time()
    # the reference marker, and the detector files of frames that need a
    # later drift measurement when the series writes none
    scratch = tempfile.mkdtemp(prefix="ccdgrid-series-")
    try:
        run = _Run(specs, config, kind, workers, reference, warm, scratch, progress, on_frame)
        rows = run.execute()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = SeriesResult(
        frames=rows,
        reference=run.reference_text(),
        workers=workers,
        executor=kind,
        seconds=time.perf_counter() - start,
        timeline={"start": wall, **run.timeline},
    )
    if table_paths:
        result.tables = (
            result.write_csv(table_paths[0]),
            result.write_json(table_paths[1]),
        )
    return result


def _check_options(options):
    from ._validation import check_backend
    from .pipeline import _check_folds

    if "backend" in options:
        check_backend(options["backend"])
    if "cv_folds" in options:
        options["cv_folds"] = _check_folds(options["cv_folds"])
    if "polarity" in options:
        from .polarity import check_polarity

        check_polarity(options["polarity"])
    for name in ("hole_diameter", "pitch_px"):
        value = options.get(name)
        if value is not None and not (_is_real(value) and math.isfinite(value) and value > 0):
            raise CcdgridError(f"`{name}` must be a positive number of px or None, got {value!r}")
    value = options.get("threshold")
    if value is not None and not (_is_real(value) and math.isfinite(value)):
        raise CcdgridError(f"`threshold` must be a finite number or None, got {value!r}")


def _is_real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_reference(reference):
    from .detector_file import load

    if not isinstance(reference, (str, os.PathLike)):
        raise CcdgridError(
            f"`reference` must be the path of a detector file, got {type(reference).__name__}"
        )
    path = str(pathlib.Path(reference).expanduser().absolute())
    rec = load(path)  # fails here, once, rather than on every frame
    if not rec.is_ccdgrid or rec.peaks is None or "vectors" not in rec.grid:
        raise CcdgridError(
            f"{path} holds no fitted grid and holes (not written by ccdgrid?): it cannot "
            "be a drift reference"
        )
    return path


def _check_workers(workers, n):
    if workers is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, n))
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise CcdgridError(f"`workers` must be a positive int or None, got {workers!r}")
    return max(1, min(int(workers), n))


def _table_paths(table):
    if table is None:
        return None
    if not isinstance(table, (str, os.PathLike)):
        raise CcdgridError(f"`table` must be a file path or None, got {type(table).__name__}")
    path = pathlib.Path(table).expanduser().absolute()
    if path.suffix.lower() in (".csv", ".json"):
        path = path.with_suffix("")
    paths = path.with_name(path.name + ".csv"), path.with_name(path.name + ".json")
    for target in paths:
        check_writable(target, "the table")
    return paths


class _Run:
    """Schedules the frames of one series and collects their rows.

    The drift reference, when not given, is the first frame in series order
    that calibrates; it is known once that frame and every frame before it
    are done. Frames started before that (at most ``workers + 1``) are
    calibrated cold and get their drift measured afterwards: by their worker,
    which keeps their calibrations and returns their drifts with its next
    frame; else (a worker that got no further frame, or died), once every
    frame is done, from their detector files (written to a scratch
    directory when the series writes none).
    """

    def __init__(self, specs, config, kind, workers, reference, warm, scratch, progress, on_frame):
        self.specs = specs
        self.pool_args = (kind, workers, config)
        self.workers = workers
        self.reference = reference
        self.reference_index = -1
        self.decided = reference is not None
        self.warm = bool(warm)
        self.scratch = scratch
        self.progress = progress
        self.on_frame = on_frame
        self.rows = [None] * len(specs)
        self.blind = set()  # series indices of frames started before the reference was known
        self.files = {}  # series index -> detector file of those frames
        self.pending_drift = []  # their rows, until the reference is known
        self.announced = set()  # series indices passed to on_frame
        self.marker = os.path.join(scratch, "reference.json")
        self.pool_factory = _Pool
        self.timeline = {}
        self.digests = _Digests(specs, shared=kind == "process")

    def reference_text(self):
        if self.reference_index >= 0:
            return f"frame {self.reference_index}"
        return self.reference or ""

    def execute(self):
        from tqdm import tqdm

        class _Bar(tqdm):
            # no monitor thread (it refreshes stalled bars): it would outlive a
            # disabled bar, and worker processes are forked only from a
            # process that runs one thread
            monitor_interval = 0

        queue = deque(self.specs)
        self.timeline["pool_started"] = time.time()
        pool = self.pool_factory(*self.pool_args, digests=self.digests)
        self.timeline["start_method"] = getattr(pool, "start_method", "")
        try:
            bar = _Bar(
                total=len(self.specs),
                unit="frame",
                desc="calibrate",
                file=sys.stderr,
                disable=not self.progress,
                dynamic_ncols=True,
            )
        except BaseException:
            pool.shutdown(cancel=True)
            raise
        self.digests.start(background=pool.kind == "process")
        runs, drifts = {}, {}
        failed = 0
        try:
            while queue or runs or drifts or (self.decided and self.pending_drift):
                # a free worker thread here always takes a frame: the one
                # queued behind a busy worker process counts in `runs`, yet
                # keeps no worker busy
                while queue and (
                    len(runs) < _depth(pool.kind, self.workers, len(queue)) or pool.local_free()
                ):
                    placed = self._place(pool, queue[0], runs)
                    if placed is None:
                        break  # wait for a suspect frame to finish alone
                    spec = queue.popleft()
                    spec.attempts += 1
                    runs[placed[0]] = (spec, placed[1])
                done = pool.wait({**runs, **drifts})
                broken = False
                late = []  # drift rows of earlier frames, returned with a frame
                for future in done:
                    if future in drifts:
                        row, local = drifts.pop(future)
                        pool.release(local)
                        try:
                            _merge_drift(row, future.result())
                        except cf.process.BrokenProcessPool:
                            broken = True
                            row.note = _join(row.note, "drift not measured: worker process died")
                        self._announce(row)
                        continue
                    spec, local = runs.pop(future)
                    pool.release(local)
                    try:
                        row, measured = future.result()
                        late.extend(measured)
                    except cf.process.BrokenProcessPool:
                        broken = True
                        row = self._crashed(spec, queue)
                        if row is None:
                            continue
                    complete = self._store(spec, row)
                    failed += not row.ok
                    bar.update(1)
                    bar.set_postfix(failed=failed, refresh=False)
                    if complete:
                        self._announce(row)  # else once its drift is known
                if broken:
                    # the pool is lost with every frame in it: try those once more
                    for spec, local in runs.values():
                        if local:
                            continue  # the thread in this process goes on
                        row = self._crashed(spec, queue)
                        if row is not None:
                            self._store(spec, row)
                            bar.update(1)
                    for row, local in drifts.values():
                        if not local:
                            row.note = _join(row.note, "drift not measured: worker process died")
                            self._announce(row)
                    runs = {f: v for f, v in runs.items() if v[1]}
                    drifts = {f: v for f, v in drifts.items() if v[1]}
                    pool.restart()
                if not queue:
                    pool.lend_idle_cores()
                self._decide_reference()
                self._merge_late(late)
                if self.decided and self.pending_drift and not runs:
                    # no worker holds these frames' calibrations any more (each
                    # measures the ones it holds with its next frame): their
                    # drifts are measured from their files
                    waiting = []
                    for row in self.pending_drift:
                        placed = pool.submit(
                            "drift", self.files[row.index], self.reference, self.reference_index
                        )
                        if placed is None:
                            waiting.append(row)  # every worker is busy: next time round
                        else:
                            drifts[placed[0]] = (row, placed[1])
                    self.pending_drift = waiting
            for row in self.rows:
                self._announce(row)  # frames whose drift could not be measured
        except BaseException:
            pool.shutdown(cancel=True)
            raise
        finally:
            self.digests.stop()
            bar.close()
        pool.shutdown()
        self.timeline["processes"] = pool.startups()
        return self.rows

    def _merge_late(self, late):
        """Merge the drift rows ``(series index, row)`` a worker measured late."""
        for index, drift_row in late:
            for row in self.pending_drift:
                if row.index == index:
                    _merge_drift(row, drift_row)
                    self.pending_drift.remove(row)
                    self._announce(row)
                    break

    def _announce(self, row):
        if self.on_frame is not None and row.index not in self.announced:
            self.announced.add(row.index)
            self.on_frame(row)

    def _place(self, pool, spec, runs):
        """Submit ``spec`` where it may run; ``(future, local)``, or None to wait.

        A frame that was in a worker process when it died is a suspect: it is
        run again alone in a worker process (never in this one), with no
        other frame beside it in a process that it could take down.
        """
        suspects = any(s.attempts > 1 for s, local in runs.values() if not local)
        if spec.attempts > 0:  # a suspect
            if any(not local for _, local in runs.values()):
                return None
            where = "process"
        elif suspects:
            where = "local"
        else:
            where = "any"
        if spec.sha256 is None:
            # every worker may start before the digest is known (a worker
            # process reads it from the shared table once it has calibrated)
            spec.sha256 = self.digests.get(spec, wait=False)
        args = (spec, self.reference, self.reference_index, self.warm)
        if not self.decided:
            if not spec.output:
                spec = dataclasses.replace(
                    spec, output=os.path.join(self.scratch, f"frame_{spec.index:06d}.h5")
                )
            args = (spec, None, -1, self.warm, self.marker)
        placed = pool.submit("run", *args, where=where)
        if placed is not None and not self.decided:
            self.blind.add(spec.index)
        return placed

    def _crashed(self, spec, queue):
        """A worker process died with ``spec`` in flight: queue it again, or fail it."""
        if spec.attempts < _MAX_ATTEMPTS:
            queue.appendleft(spec)
            return None
        row = _new_row(spec)
        row.error = (
            "a worker process died while calibrating this frame, twice (out of memory, or "
            "a crash in a compiled library)"
        )
        return row

    def _store(self, spec, row):
        """Keep a frame's row; False if it waits for its drift before being announced."""
        self.rows[spec.index] = row
        if row.ok and spec.index in self.blind:
            self.files[row.index] = row.output
            if not spec.output:  # written to the scratch directory only
                row.output = ""
            if row.reference_index < 0:  # the reference was not known in time
                self.pending_drift.append(row)
                return False
        return True

    def _decide_reference(self):
        """Fix the reference once the frames before the first good one are done."""
        if self.decided:
            return
        for row in self.rows:
            if row is None:
                return  # an earlier frame is still running
            if row.ok:
                break
        else:
            return
        self.decided = True
        self.reference_index = row.index
        self.reference = self.files[row.index]
        # frames already queued in a worker read it from there when they start
        _write_text(self.marker, json.dumps({"path": self.reference, "index": row.index}))
        _fill_drift(row, _zero_drift(row.holes_indexed), row.index)
        self.pending_drift = [r for r in self.pending_drift if r.index != row.index]
        self._announce(row)


def _depth(kind, workers, queued):
    """Frames to have in flight with ``queued`` frames still waiting.

    One frame more than there are workers, while at least one frame per
    worker would still wait after it: queued behind a busy worker process,
    it spares that worker the round trip to this process between two frames.
    Near the end of the series it would instead tie a frame to a busy worker
    while another may be about to be free (a worker process cannot give back
    a frame once queued in it), and leave that one idle for up to a frame:
    the last frames go only to a free worker.
    """
    if kind == "serial":
        return 1
    return workers + (queued > workers)


class _Digests:
    """SHA-256 of every image file of a series, each file hashed once.

    The digest of the input file is recorded in every detector file.
    Hashing takes time (0.1 s for a stack of 16 frames of 2048², 2 s for a
    3 GB stack): with worker processes it runs in a thread while the
    workers calibrate their first frames, and a worker waits for the
    digest only when it writes a detector file. This process's worker reads
    it here; worker processes read it from a table in shared memory
    (``shared``: :class:`_DigestTable`, handed to them when they start), so
    they never hash the file themselves and start at once. Serially (one
    worker, on one core) the files are hashed first.
    """

    def __init__(self, specs, shared=False):
        self._futures = {}
        for spec in specs:
            if spec.array is None and not spec.error:
                self._futures.setdefault(_file_of(spec), cf.Future())
        self.table = _DigestTable(list(self._futures)) if shared and self._futures else None
        self._stopped = False

    def start(self, background):
        """Hash the files, in a thread if ``background`` (else before returning)."""
        if background:
            threading.Thread(target=self._run, name="ccdgrid-series-hash", daemon=True).start()
        else:
            self._run()

    def stop(self):
        """Hash no further file (the one being hashed is finished)."""
        self._stopped = True

    def _run(self):
        from .io import sha256_file

        try:
            for path, future in self._futures.items():
                if self._stopped:
                    break
                try:
                    digest = sha256_file(path)
                except OSError:
                    digest = None  # the reader of a frame reports it
                future.set_result(digest)
                self._publish(path, digest)
        finally:
            # stopped, or failed: a worker waiting for a digest hashes the file itself
            for path, future in self._futures.items():
                if future.cancel():
                    self._publish(path, None)

    def _publish(self, path, digest):
        if self.table is not None:
            self.table.put(path, digest)

    def hashing(self, spec):
        """True if ``spec``'s file is file-backed and its digest not known yet."""
        future = self._futures.get(_file_of(spec)) if spec.array is None else None
        return future is not None and not future.done()

    def get(self, spec, wait=True):
        """The digest of ``spec``'s file (str); None if it has none (an array, an
        unreadable file) or, with ``wait`` False, if it is not known yet."""
        future = self._futures.get(_file_of(spec)) if spec.array is None else None
        if future is None or (not wait and not future.done()):
            return None
        try:
            return future.result()
        except cf.CancelledError:  # not hashed (stopped, or the hash thread failed)
            return None


class _DigestTable:
    """The digests of a series' files in shared memory, as worker processes read them.

    65 bytes a file: a state byte (0 not known yet, 1 known, 2 none: the
    file could not be read, or was not hashed) and the hexadecimal digest.
    The same interface as :class:`_Digests` (``hashing``, ``get``), so a
    worker reads either. Passed to a worker process when it starts (as
    ``multiprocessing`` allows shared memory to travel), forked or spawned.
    """

    _WIDTH = 65
    _POLL = 0.002  # s between two looks while waiting: the hash thread is never far

    def __init__(self, files):
        import multiprocessing

        self.slots = {path: k for k, path in enumerate(files)}
        # a spawn context's Array also serves forked processes
        self.array = multiprocessing.get_context("spawn").Array("B", self._WIDTH * len(files))

    def put(self, path, digest):
        """Publish ``path``'s digest (None: the workers hash the file themselves)."""
        at = self._WIDTH * self.slots[path]
        with self.array.get_lock():
            if digest is not None:
                self.array[at + 1 : at + self._WIDTH] = list(digest.encode("ascii"))
            self.array[at] = 1 if digest is not None else 2

    def _state(self, spec):
        slot = self.slots.get(_file_of(spec)) if spec.array is None else None
        if slot is None:
            return None, None
        at = self._WIDTH * slot
        with self.array.get_lock():
            state = self.array[at]
            digest = bytes(self.array[at + 1 : at + self._WIDTH]).decode("ascii")
        return state, digest

    def hashing(self, spec):
        return self._state(spec)[0] == 0

    def get(self, spec, wait=True):
        import multiprocessing

        state, digest = self._state(spec)
        parent = multiprocessing.parent_process()
        polls = 0
        while state == 0 and wait:
            time.sleep(self._POLL)
            state, digest = self._state(spec)
            polls += 1
            # a worker whose series died with its parent stops waiting (and
            # hashes the file itself, if it is still asked to)
            if polls % 250 == 0 and parent is not None and not parent.is_alive():
                return None
        return digest if state == 1 else None


def _merge_drift(row, drift):
    for name in (*_DRIFT_COLUMNS, "reference_index"):
        setattr(row, name, getattr(drift, name))
    # a frame whose worker already failed to measure the drift is measured
    # again here (its reference_index is still -1): say why only once
    if drift.note not in row.note.split("; "):
        row.note = _join(row.note, drift.note)


def _zero_drift(n_holes):
    """The drift of the reference frame against itself."""
    from .warmstart import Drift

    return Drift(np.zeros(2), 0.0, 0.0, 0.0, 0.0, n_holes, n_holes)
