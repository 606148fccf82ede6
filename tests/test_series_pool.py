"""The workers of a series (``ccdgrid._series_pool``): how they start, when they take frames."""

import concurrent.futures as cf
import os
import sys
import threading

import h5py
import numpy as np
import pytest

from ccdgrid import _series_pool
from ccdgrid._series_pool import _Pool
from ccdgrid._series_worker import THREAD_ENV, _Config
from ccdgrid.series_frames import _Spec


def test_worker_processes_start_single_threaded():
    before = {name: os.environ.get(name) for name in THREAD_ENV}
    pool = _Pool("process", 2, _Config(pitch=5e-3, options={}, mask=None, save_workers=1))
    try:
        for future in pool.ready:
            pid, env, startup = future.result(timeout=120)
            assert pid != os.getpid()
            assert env == dict.fromkeys(THREAD_ENV, "1")
            assert startup["pid"] == pid
            assert startup["entered"] <= startup["ready"]
            assert startup["startup_cpu"] > 0
    finally:
        pool.shutdown()
    assert {name: os.environ.get(name) for name in THREAD_ENV} == before


def _start_method_with(monkeypatch, threads):
    monkeypatch.setattr(_series_pool, "_os_threads", lambda: threads)
    return _series_pool._start_method()


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="workers are forked on Linux only"
)
def test_workers_are_forked_only_from_a_single_thread(monkeypatch, tmp_path):
    assert _start_method_with(monkeypatch, 1) == ("fork", "")
    assert _start_method_with(monkeypatch, 3) == ("spawn", "3 threads run in this process")
    assert _start_method_with(monkeypatch, None) == (
        "spawn",
        "the threads of this process cannot be counted",
    )
    # the forked worker would hold a copy of the HDF5 library's state for it
    h5 = h5py.File(tmp_path / "open.h5", "w")
    h5["x"] = np.zeros(3)
    method, reason = _start_method_with(monkeypatch, 1)
    assert (method, reason) == ("spawn", "an HDF5 file is open in this process")
    dataset = h5["x"]
    del h5  # the file stays open while one of its objects is
    assert _start_method_with(monkeypatch, 1)[0] == "spawn"
    del dataset
    assert _start_method_with(monkeypatch, 1) == ("fork", "")
    # a forked worker must be held to one thread, with threadpoolctl
    monkeypatch.setattr(_series_pool, "_can_limit_threads", lambda: False)
    assert _start_method_with(monkeypatch, 1)[0] == "spawn"


def test_a_worker_process_takes_frames_once_up():
    pool = _Pool("process", 2, _Config(pitch=5e-3, options={}, mask=None, save_workers=1))
    try:
        pool.local_busy = 1  # this process's worker is busy
        up, starting = pool.ready, cf.Future()
        pool.ready = [starting]  # the process, as if still importing
        spec = _Spec(0, "<array 0>", None, error="no image")
        assert pool.submit("run", spec, None, -1, False) is None
        # waiting wakes when the process comes up, with no frame done
        threading.Timer(0.05, starting.set_result, (None,)).start()
        assert pool.wait(set()) == set()
        pool.ready = up
        up[0].result(timeout=120)
        first = pool.submit("run", spec, None, -1, False)
        second = pool.submit("run", spec, None, -1, False)  # queued behind it
        assert pool.submit("run", spec, None, -1, False) is None  # no more
        assert [local for _, local in (first, second)] == [False, False]
        for future, _ in (first, second):
            row, late = future.result(timeout=120)
            assert (row.index, row.status, row.error, late) == (0, "failed", "no image", [])
            pool.release(False)
        assert pool.process_busy == 0
    finally:
        pool.shutdown()
