"""The workers of a series as the calling process runs them: :class:`_Pool`.

Processes, threads, or the calling process alone; with worker processes,
one worker thread of the calling process beside them. :func:`_start_method`
decides whether the processes are forked (fast, only from a process that
runs one thread and holds no HDF5 file open) or spawned. What a worker does
with a frame is :mod:`ccdgrid._series_worker`'s; which frame goes where and
when is :mod:`ccdgrid.series`'s (its notes say why processes, and how they
are set up).
"""

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import sys

from ._series_worker import (
    THREAD_ENV,
    _can_limit_threads,
    _init_process,
    _init_thread,
    _process_drift,
    _process_ready,
    _process_run,
    _thread_limits,
    _Worker,
)
from .errors import CcdgridError
from .maps import MAP_MEMORY

__all__ = ["_Pool", "_start_method"]


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
    threadpoolctl in a forked process; see :mod:`ccdgrid.series` for what
    that saves).
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
        # what the worker processes read the digests from (shared memory)
        self.digest_table = getattr(digests, "table", None)
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
        # the map memory's timer thread would make this process one to spawn from
        with MAP_MEMORY.timer_stopped():
            # decided now, and again on a restart (threads of this process run by then)
            method, reason = _start_method()
            self.start_method = method + (f" ({reason})" if reason else "")
            self.processes = cf.ProcessPoolExecutor(
                n,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_process,
                initargs=(self.config, self.spare, method, self.digest_table),
            )
            # processes start on the first submit (all of them at once when
            # forked, before the executor starts its own thread): start them
            # all now, single-threaded
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
