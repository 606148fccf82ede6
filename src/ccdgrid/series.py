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
file open, else spawned (:func:`_start_method` says why; the ``ccdgrid``
command, or a script, runs single-threaded when ``OMP_NUM_THREADS=1`` and
``OPENBLAS_NUM_THREADS=1`` are set before numpy is imported).

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

Coordinates are ``(y, x)`` index coordinates in pixels (the centre of pixel
``(i, j)`` is at ``(i, j)``).
"""

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np

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

#: Environment variables that cap the threads of OpenMP and of the BLAS
#: libraries numpy and scipy may load; set to 1 in every worker process.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

#: Options passed on to :func:`ccdgrid.pipeline.calibrate` for every frame.
CALIBRATE_OPTIONS = ("hole_diameter", "pitch_px", "threshold", "smoothing", "backend", "cv_folds")

_MAX_ATTEMPTS = 2  # a frame in flight when a worker process dies is tried once more


# -- the work of one frame (runs in a worker) --------------------------------------


@dataclass(frozen=True)
class _Config:
    pitch: float
    options: dict
    mask: object  # None, a path, or an array
    save_workers: int | None  # compression threads of the detector-file writer


class _Worker:
    """Calibrates frames; one per worker process (or shared by threads).

    ``shared``: several threads of this process run frames at once with it
    (a frame's CPU time is then its thread's, not the process's).
    ``spare``: the pool's count of cores lent by idle workers at the end of
    the series (a shared ``multiprocessing.Value``), or None; see
    :meth:`_Pool.lend_idle_cores`. ``digests``: the series' :class:`_Digests`,
    for a worker in the calling process, which may start a frame before its
    file is hashed.
    """

    def __init__(self, config, shared=False, spare=None, digests=None):
        self.config = config
        self.shared = shared
        self.spare = spare
        self.digests = digests  # _Digests of the series (this process's worker only)
        self._references = {}
        self._mask = None

    def _reference(self, path):
        if path not in self._references:
            from .detector_file import load

            self._references[path] = load(path)
        return self._references[path]

    def _mask_for(self, shape):
        mask = self.config.mask
        if mask is None:
            return None
        if self._mask is None or self._mask.shape != shape:
            from .io import read_mask

            self._mask = read_mask(mask, shape)
        return self._mask

    def run(self, spec, reference, reference_index, warm, marker=None):
        """Calibrate one frame; never raises for a bad frame (only on interrupt).

        ``marker``: when the drift reference was not known at submission, the
        file where the scheduler writes it once it is (read before and after
        the calibration).
        """
        start, wall, cpu = time.perf_counter(), time.time(), self._cpu()
        borrowed = 0  # cores lent by idle workers to this frame's detector file
        row = _new_row(spec)
        try:
            if spec.error:
                raise CcdgridError(spec.error)
            if reference is None:
                reference, reference_index = _read_marker(marker)
            borrowed = self._calibrate(spec, row, reference, reference_index, warm, marker)
            row.status = "ok"
        except (CcdgridError, OSError) as exc:
            row.error = _describe(exc)
        except Exception as exc:  # a bug on one frame must not stop the series
            row.error = f"unexpected {type(exc).__name__}: {exc} (please report it)"
            row.traceback = traceback.format_exc()
        row.seconds = time.perf_counter() - start
        row.timing = {
            "worker": self._name(),
            "start": wall,
            "end": wall + row.seconds,
            "cpu": self._cpu() - cpu,
            "borrowed": borrowed,
        }
        return row

    def _borrow(self):
        """Take one core lent by an idle worker, if any: 1, else 0."""
        if self.spare is None:
            return 0
        with self.spare.get_lock():
            if self.spare.value <= 0:
                return 0
            self.spare.value -= 1
        return 1

    def _cpu(self):
        # a worker alone in its process runs one frame at a time: the process's
        # CPU time is the frame's (the scheduling threads of the calling
        # process add a few ms), compression thread included
        return time.thread_time() if self.shared else time.process_time()

    def _name(self):
        if self is _PROCESS_WORKER:
            return str(os.getpid())
        return f"{os.getpid()}:{threading.current_thread().name}"

    def _calibrate(self, spec, row, reference, reference_index, warm, marker):
        """Fill ``row`` with the frame's calibration; return the cores it borrowed (0 or 1)."""
        from .io import read_image
        from .pipeline import calibrate

        borrowed = 0

        pending = False  # the file is still being hashed
        if spec.array is not None:
            image = spec.array
            source = {"path": spec.file, "sha256": None, "frame": spec.frame}
        else:
            digest = spec.sha256
            if digest is None and self.digests is not None:
                digest = self.digests.get(spec, wait=False)
                pending = digest is None and self.digests.hashing(spec)
            # the digest is recorded, never used to read: it is filled in below
            image, source = read_image(
                spec.file, frame=spec.frame, sha256="" if pending else digest
            )
            row.file, row.dataset = source["path"], source["dataset"] or ""
        mask = self._mask_for(tuple(np.shape(image)))
        previous = None
        if warm and reference is not None:
            previous = self._reference(reference)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            cal = calibrate(
                image,
                pitch=self.config.pitch,
                mask=mask,
                source=source,
                previous=previous,
                **self.config.options,
            )
        row.note = "; ".join(dict.fromkeys(str(w.message) for w in caught))
        row.warm = bool(previous is not None and cal.params.get("warm_start", {}).get("used"))
        _fill_calibration(row, cal)
        if pending:
            cal.source["sha256"] = self.digests.get(spec) or _sha256(spec)
        if spec.output:
            from .detector_file import save_detector

            # the detector file is about half of a frame's CPU, and its chunks
            # compress in parallel: at the end of the series, a core lent by a
            # worker with nothing left to do shortens the frame
            borrowed = self._borrow()
            save_detector(spec.output, cal, workers=self.config.save_workers + borrowed)
            row.output = spec.output
        if reference is None:
            reference, reference_index = _read_marker(marker)
        if reference is not None:
            drift = getattr(cal, "drift", None)
            try:
                if drift is None or not drift.warm:
                    drift = _aligned_drift(self._reference(reference), cal)
            except CcdgridError as exc:  # the calibration itself is good
                row.note = _join(row.note, f"drift not measured: {exc}")
            else:
                _fill_drift(row, drift, reference_index)
        return borrowed

    def drift(self, frame_file, reference, reference_index):
        """Drift columns of a frame already written to ``frame_file``."""
        from .detector_file import load

        row = FrameResult(index=-1, file="")
        try:
            drift = _aligned_drift(self._reference(reference), load(frame_file))
            _fill_drift(row, drift, reference_index)
        except (CcdgridError, OSError) as exc:
            row.note = f"drift not measured: {_describe(exc)}"
        return row


def _read_marker(marker):
    """``(reference path, series index)`` from the scheduler's marker file, or (None, -1)."""
    if marker is None or not os.path.exists(marker):
        return None, -1
    with open(marker, encoding="utf-8") as stream:
        found = json.load(stream)
    return found["path"], int(found["index"])


def _new_row(spec):
    file, dataset = spec.file, ""
    if spec.array is None:
        file, _, dataset = spec.file.partition("::")
        file = str(pathlib.Path(file).expanduser().absolute())
    return FrameResult(
        index=spec.index,
        file=file,
        dataset=dataset,
        frame=-1 if spec.frame is None else spec.frame,
    )


def _describe(exc):
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _fill_calibration(row, cal):
    vectors = np.asarray(cal.grid.vectors, dtype=np.float64)
    pitch_px = float(np.mean(np.hypot(vectors[:, 0], vectors[:, 1])))
    row.holes_found = len(cal.holes.peaks)
    row.holes_rejected = len(getattr(cal.holes, "rejected", ()))
    row.holes_indexed = int(cal.lattice.n_valid)
    row.pitch_px = pitch_px
    # vectors[1] is the j step, about +x: its angle from +x towards +y
    row.rotation_deg = math.degrees(math.atan2(vectors[1, 0], vectors[1, 1]))
    row.pixel1_um, row.pixel2_um = (float(p) * 1e6 for p in cal.pixel_size)
    cv = cal.cross_validation
    if cv is not None:
        row.cv_rms_px, row.cv_max_px = float(cv.rms_px), float(cv.max_px)
        row.cv_rms_pitch, row.cv_max_pitch = row.cv_rms_px / pitch_px, row.cv_max_px / pitch_px
    row.fit_residual_px = float(cal.maps.fit_residual_rms)


def _fill_drift(row, drift, reference_index):
    row.reference_index = reference_index
    row.drift_shift_y_px, row.drift_shift_x_px = (float(v) for v in drift.shift)
    row.drift_rotation_mdeg = float(drift.rotation_mdeg)
    row.drift_scale_ppm = float(drift.scale_ppm)
    row.drift_max_change_dx_px = float(drift.max_change_dx)
    row.drift_max_change_dy_px = float(drift.max_change_dy)
    row.drift_matched = int(drift.n_matched)


def _aligned_drift(reference, calibration):
    """:mod:`ccdgrid.warmstart`'s drift of a cold calibration against a reference.

    Two cold calibrations number their holes from their own corner; the
    frame's indices are first shifted onto the reference's by matching every
    hole to the nearest reference hole (within 0.3 pitch) and taking the
    most common index difference.
    """
    from scipy.spatial import cKDTree

    from .warmstart import _drift, _previous

    ref, new = _previous(reference), _previous(calibration)
    if ref.shape != new.shape:
        raise CcdgridError(
            f"the drift reference was calibrated on {ref.shape} images, this frame is {new.shape}"
        )
    if len(ref.peaks) == 0 or len(new.peaks) == 0:
        raise CcdgridError("no indexed holes to compare with the drift reference")
    # both calibrations orient i about +y and j about +x (lattice.py): the
    # index frames differ by a translation only, if the grid turned < 45 deg
    dist, nearest = cKDTree(ref.peaks).query(new.peaks)
    close = dist < 0.3 * ref.pitch_px
    if not close.any():
        raise CcdgridError(
            "no hole of this frame lies within 0.3 pitch of a reference hole: the plate "
            "moved too far to measure the drift"
        )
    diff = ref.indices[nearest[close]] - new.indices[close]
    keys, counts = np.unique(diff, axis=0, return_counts=True)
    offset = keys[np.argmax(counts)]
    pair = np.all(diff == offset, axis=1)  # the same hole in both
    old_rows, new_rows = nearest[close][pair], np.flatnonzero(close)[pair]
    return _drift(
        ref,
        (ref.peaks[old_rows], ref.indices[old_rows]),
        (new.peaks[new_rows], new.indices[new_rows] + offset),
        new,
        len(ref.peaks),
        int(pair.sum()),
    )


# -- process workers -----------------------------------------------------------------

_PROCESS_WORKER = None
_STARTUP = {}  # this worker process's start-up, for SeriesResult.timeline


def _thread_limits(user_api=None):
    """Limit BLAS and/or OpenMP of this process to one thread, restored on exit.

    Needs threadpoolctl (numpy and the kernels are loaded already here, too
    late for environment variables); without it, a null context. OpenMP's
    limit holds for the calling thread only, BLAS's for the whole process.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    # the libraries must be loaded for threadpoolctl to find them
    from . import detector_file, pipeline, warmstart  # noqa: F401

    return threadpool_limits(limits=1, user_api=user_api)


def _can_limit_threads():
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def _init_thread():
    """Initialiser of a worker thread: OpenMP limited to one thread in it."""
    _thread_limits("openmp").__enter__()  # for the thread's life: never restored


def _init_process(config, spare=None, method="spawn"):
    """Initialiser of a worker process: its :class:`_Worker` and the pipeline's modules.

    ``method``: how the process was started (see :func:`_start_method`).
    """
    global _PROCESS_WORKER
    _STARTUP.update(pid=os.getpid(), entered=time.time(), method=method)
    # Ctrl-C reaches the whole process group: the parent stops the series and
    # each worker finishes its frame (its detector file is written whole)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # loaded once here rather than by the first frame, so that start-up
    # overlaps in all workers and every frame costs the same (a forked
    # process has them already)
    from . import detector_file, io, pipeline, warmstart  # noqa: F401

    if method == "fork":
        # the libraries were loaded by the parent, before THREAD_ENV was set:
        # held to one thread here, for the process's life. The OpenMP limit
        # also keeps this (main) thread off the parent's OpenMP thread pool,
        # which a fork does not copy (_start_method forks only a process
        # without one, but a region on two threads would wait for ever there)
        _thread_limits(None).__enter__()
    _PROCESS_WORKER = _Worker(config, spare=spare)
    _STARTUP.update(ready=time.time(), startup_cpu=time.process_time())


def _process_run(*args):
    return _PROCESS_WORKER.run(*args)


def _process_drift(frame_file, reference, reference_index):
    return _PROCESS_WORKER.drift(frame_file, reference, reference_index)


def _process_ready():
    """Run once per worker at start: its pid, thread limits and start-up times."""
    return os.getpid(), {name: os.environ.get(name) for name in THREAD_ENV}, dict(_STARTUP)


def _os_threads():
    """Threads of this process, of any kind (Linux's ``/proc/self/task``); None if unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _start_method():
    """``(method, reason)``: how to start worker processes now, and why not by fork.

    A forked worker inherits the pipeline already imported here: it is up in
    ~0.01 s of CPU, where a spawned one imports numpy, scipy and the pipeline
    again (~0.6 s of CPU on the 2-core reference machine, more than a 2048²
    frame). A fork copies this process's memory but only the thread that
    forks, so it is used only when nothing could be caught half-way:

    - on Linux (where this process's threads can be counted), with
      threadpoolctl (the libraries are loaded already: the forked worker
      holds BLAS and OpenMP to one thread with it, not with
      :data:`THREAD_ENV`);
    - when this process runs one thread, of any kind: no other Python
      thread (which could hold a lock the worker then needs), no OpenMP
      thread pool (libgomp's is not fork-safe: a forked child that enters a
      parallel region on more than one thread waits for ever for threads
      that were not copied), no BLAS threads. numpy's OpenBLAS starts its
      threads when it loads, unless ``OPENBLAS_NUM_THREADS=1`` (and
      ``OMP_NUM_THREADS=1`` for the OpenMP pool) are set before numpy is
      imported; Python 3.12+ warns about forking a process with threads;
    - when no HDF5 file is open here (the worker would hold a copy of the
      library's state for it).

    Otherwise the workers are spawned. ``reason`` is "" for fork.
    """
    if (
        not sys.platform.startswith("linux")
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        return "spawn", "fork is not available"
    if not _can_limit_threads():
        return "spawn", "no threadpoolctl to hold a forked worker to one thread"
    threads = _os_threads()
    if threads is None:
        return "spawn", "the threads of this process cannot be counted"
    if threads != 1:
        return "spawn", f"{threads} threads run in this process"
    h5py = sys.modules.get("h5py")
    if h5py is not None:
        h5f = h5py.h5f
        kinds = h5f.OBJ_FILE | h5f.OBJ_DATASET | h5f.OBJ_GROUP | h5f.OBJ_ATTR
        if h5f.get_obj_count(h5f.OBJ_ALL, kinds) > 0:
            return "spawn", "an HDF5 file is open in this process"
    return "fork", ""


@contextlib.contextmanager
def _single_threaded_environment():
    """Set :data:`THREAD_ENV` to 1 while worker processes are started, then restore it.

    A spawned process reads these when numpy, scipy and the OpenMP runtime
    load, before any code of ours could limit them.
    """
    saved = {name: os.environ.get(name) for name in THREAD_ENV}
    os.environ.update(dict.fromkeys(THREAD_ENV, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Pool:
    """The workers of a series: processes, threads, or the calling process alone.

    With ``kind="process"`` and ``workers=N``, N - 1 worker processes run
    beside one worker thread of the calling process, which has already paid
    for importing numpy, scipy and the pipeline (0.6 s of CPU per spawned
    process on the 2-core reference machine, more than a 2048² frame; the
    processes are forked when :func:`_start_method` finds that safe). That
    needs threadpoolctl, to hold this process's BLAS and OpenMP to one thread
    during the series; without it, N (spawned) worker processes run the
    frames. Every worker runs single-threaded (:data:`THREAD_ENV`, or
    threadpoolctl in a forked process; see the module notes for what that
    saves).
    """

    def __init__(self, kind, workers, config, digests=None):
        self.kind, self.workers, self.config = kind, workers, config
        self.processes = None  # ProcessPoolExecutor
        self.start_method = ""  # how its processes were started, and why not by fork
        self.threads = None  # ThreadPoolExecutor running self.local
        # cores lent by idle workers to busy ones at the end of a series
        # (process workers only: threads of one process would fight for the GIL)
        # (a spawn context's Value also serves forked processes, which inherit it)
        self.spare = (
            multiprocessing.get_context("spawn").Value("i", 0) if kind == "process" else None
        )
        self.lent = 0  # cores lent so far
        self.local = _Worker(
            config, shared=kind == "thread" and workers > 1, spare=self.spare, digests=digests
        )
        self.use_local = kind != "process" or _can_limit_threads()
        self.ready = []
        self.spawned = []  # the ready futures of every process started, restarts included
        self.local_busy = 0
        self.process_busy = 0  # frames running or queued in the worker processes
        self.limits = contextlib.ExitStack()
        self.start()

    def start(self):
        # BLAS threads are per process: held at 1 in this one for the series
        self.limits.enter_context(_thread_limits(None if self.kind == "serial" else "blas"))
        if self.kind == "serial":
            return
        if self.use_local:
            self.threads = cf.ThreadPoolExecutor(
                self.workers if self.kind == "thread" else 1,
                thread_name_prefix="ccdgrid-series",
                initializer=_init_thread,
            )
        if self.kind == "process":
            self._start_processes()

    def _start_processes(self):
        n = self.workers - 1 if self.use_local else self.workers
        # decided now, and again on a restart (threads of this process run by then)
        method, reason = _start_method()
        self.start_method = method + (f" ({reason})" if reason else "")
        self.processes = cf.ProcessPoolExecutor(
            n,
            mp_context=multiprocessing.get_context(method),
            initializer=_init_process,
            initargs=(self.config, self.spare, method),
        )
        # processes start on the first submit (all of them at once when forked,
        # before the executor starts its own thread): start them all now,
        # single-threaded
        with _single_threaded_environment():
            self.ready = [self.processes.submit(_process_ready) for _ in range(n)]
        self.spawned += self.ready
        self.process_busy = 0

    def restart(self):
        """Replace a broken process pool (the frames in it are lost)."""
        if not any(f.done() and f.exception() is None for f in self.ready):
            self.shutdown(cancel=True)
            raise CcdgridError(
                "the worker processes could not start (a script that uses process workers "
                "must call ccdgrid from under `if __name__ == '__main__':`)"
            )
        self.processes.shutdown(wait=False, cancel_futures=True)
        self._start_processes()

    def submit(self, func_name, *args, where="any"):
        """Run ``_Worker.<func_name>(*args)``; ``(future, local)``, or None if it cannot.

        ``where``: "any" free worker (this process first), "local" (this
        process only: None if busy) or "process" (a worker process only).
        """
        if self.kind == "serial":
            return _done(getattr(self.local, func_name), *args), True
        local_free = self.use_local and (self.kind == "thread" or self.local_busy == 0)
        if where != "process" and local_free:
            self.local_busy += self.kind == "process"
            return self.threads.submit(getattr(self.local, func_name), *args), True
        if where == "local" or self.processes is None:
            return None
        if self.process_busy >= self._process_slots():
            return None
        func = _process_run if func_name == "run" else _process_drift
        try:
            future = self.processes.submit(func, *args)
        except cf.process.BrokenProcessPool as exc:  # a process died starting
            future = cf.Future()
            future.set_exception(exc)
        self.process_busy += 1
        return future, False

    def _process_slots(self):
        """Frames the worker processes may hold: one per process up, and one queued.

        None before a process is up: a frame queued in a process still
        importing could not be taken back, and this process's worker would
        wait for it at the end if that start-up were slow (a loaded machine,
        a short series); until then this process's worker takes the frames.
        A process counts as up once it has answered :func:`_process_ready`
        (one answer per process started, whichever process gives it).
        """
        up = sum(f.done() for f in self.ready)
        return up + 1 if up else 0

    def wait(self, futures):
        """Wait for one of ``futures`` to finish or a worker process to come up.

        Returns the set of ``futures`` done (empty when a process came up).
        """
        starting = {f for f in self.ready if not f.done()}
        done = cf.wait(set(futures) | starting, return_when=cf.FIRST_COMPLETED).done
        return done - starting

    def lend_idle_cores(self):
        """No frame is left to start: lend the idle workers' cores to the busy ones.

        Each worker (this process's thread, or a worker process that is up)
        with nothing to do adds one core to :attr:`spare`; a busy worker takes
        one when it reaches its detector file and compresses it with one more
        thread (:meth:`_Worker._borrow`). Lent once per worker: once the last
        frames are placed, a worker that goes idle stays idle (but for a
        short drift measurement).
        """
        if self.spare is None:
            return
        up = sum(f.done() for f in self.ready)
        idle = (self.use_local and self.local_busy == 0) + max(0, up - self.process_busy)
        if idle > self.lent:
            with self.spare.get_lock():
                self.spare.value += idle - self.lent
            self.lent = idle

    def local_free(self):
        """True if this process's worker thread (beside worker processes) is idle."""
        return self.kind == "process" and self.use_local and self.local_busy == 0

    def release(self, local):
        """A frame submitted with ``local`` (True: to this process) is done."""
        if self.kind != "process":
            return
        if local:
            self.local_busy -= 1
        else:
            self.process_busy -= 1

    def startups(self):
        """Start-up times of the worker processes that started (see SeriesResult.timeline)."""
        return [
            f.result()[2]
            for f in self.spawned
            if f.done() and not f.cancelled() and not f.exception()
        ]

    def shutdown(self, cancel=False):
        for executor in (self.processes, self.threads):
            if executor is not None:
                executor.shutdown(wait=not cancel, cancel_futures=cancel)
        self.processes = self.threads = None
        self.limits.close()


def _done(func, *args):
    """A completed future of ``func(*args)`` (the serial executor)."""
    future = cf.Future()
    future.set_result(func(*args))
    return future


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
        ``backend``, ``cv_folds``.

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
    if not path.parent.is_dir():
        raise CcdgridError(
            f"cannot write the table {path}: directory {path.parent} does not exist"
        )
    return path.with_name(path.name + ".csv"), path.with_name(path.name + ".json")


class _Run:
    """Schedules the frames of one series and collects their rows.

    The drift reference, when not given, is the first frame in series order
    that calibrates; it is known once that frame and every frame before it
    are done. Frames started before that (at most ``workers + 1``) are
    calibrated cold and get their drift measured afterwards, from their
    detector files (written to a scratch directory when the series writes
    none).
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
        self.digests = _Digests(specs)

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
            while queue or runs or drifts:
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
                        row = future.result()
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
                if self.decided:
                    for row in self.pending_drift:
                        future, local = pool.submit(
                            "drift", self.files[row.index], self.reference, self.reference_index
                        )
                        drifts[future] = (row, local)
                    self.pending_drift = []
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
            # a worker process needs the digest with the frame; this process's
            # worker may start before it is known
            local = where != "process" and pool.local_free()
            spec.sha256 = self.digests.get(spec, wait=not local)
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


def _sha256(spec):
    """SHA-256 of a spec's file, hashed now (raises the OSError a reader would)."""
    from .io import sha256_file

    return sha256_file(_file_of(spec))


class _Digests:
    """SHA-256 of every image file of a series, each file hashed once.

    The digest of the input file is recorded in every detector file; a
    worker process gets it with its frame
    (:attr:`ccdgrid.series_frames._Spec.sha256`), never hashing the file
    itself. Hashing takes time (0.2 s of CPU for a stack of 16 frames of
    2048², as much as half a frame): with worker processes it
    runs in a thread while the first frames are calibrated by this process's
    worker, which records the digest once known, and the worker processes
    start. Serially (one worker, on one core) the files are hashed first.
    """

    def __init__(self, specs):
        self._futures = {}
        for spec in specs:
            if spec.array is None and not spec.error:
                self._futures.setdefault(_file_of(spec), cf.Future())
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

        for path, future in self._futures.items():
            if self._stopped:
                future.cancel()
                continue
            try:
                digest = sha256_file(path)
            except OSError:
                digest = None  # the reader of a frame reports it
            future.set_result(digest)

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
        return future.result()


def _merge_drift(row, drift):
    for name in (*_DRIFT_COLUMNS, "reference_index"):
        setattr(row, name, getattr(drift, name))
    row.note = _join(row.note, drift.note)


def _join(*notes):
    return "; ".join(n for n in notes if n)


def _zero_drift(n_holes):
    """The drift of the reference frame against itself."""
    from .warmstart import Drift

    return Drift(np.zeros(2), 0.0, 0.0, 0.0, 0.0, n_holes, n_holes)
