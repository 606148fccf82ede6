"""Large arrays handed out again once nothing references them any more.

A fresh array's pages are mapped on their first write. On the virtual
machines this project is measured on, the host backs the guest's memory on
first use too: the two float32 maps of a 4096² calibration (134 MB) took
7-17 ms to map in most calls and 100-300 ms in others, more than all the
rest of a warm-start recalibration. A program that recalibrates again and
again drops one calibration's maps as it makes the next ones; handing the
next calibration the dropped arrays costs no page fault at all.

An array is handed out again only when the pool's own reference is the only
one left: a calibration, a view, a slice or a memoryview of it all hold a
reference to it (numpy views keep the array that owns the memory alive), so
an array that anything can still read is never reused. The price is memory:
an array nothing uses is kept until it has been unused for ``keep_seconds``
(a timer thread checks while the pool holds arrays), at most ``capacity``
arrays in all.
"""

import contextlib
import os
import sys
import threading
import time

import numpy as np


def _refcount(entry):
    """References to the array of a pool entry, this function's own ones not counted."""
    array = entry[0]
    return sys.getrefcount(array) - 2  # the local name and getrefcount's argument


# what _refcount gives for an array only its entry holds: measured, not
# assumed, as the interpreter's count of temporary references varies between
# versions
_SPARE = _refcount([np.empty(1), 0.0])


def _spare(entry):
    return _refcount(entry) == _SPARE


def _wait_for_exit(native_id, timeout=1.0):
    """Wait until the OS thread ``native_id`` is gone from ``/proc/self/task`` (Linux).

    ``Thread.join`` returns as the thread's Python state is released, a
    moment before its OS thread ends; a caller counting the OS threads of
    the process must not count it.
    """
    path = f"/proc/self/task/{native_id}"
    deadline = time.monotonic() + timeout
    while native_id is not None and os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.0005)


class BufferPool:
    """Large arrays kept for reuse once their users dropped them.

    Parameters
    ----------
    capacity : int
        How many arrays the pool keeps, in use or not (0: none, every call
        allocates).
    keep_seconds : float
        How long, in seconds, an array that nothing else references is kept
        after the pool last handed it out or saw it in use.
    """

    def __init__(self, capacity, keep_seconds):
        self.capacity = int(capacity)
        self.keep_seconds = float(keep_seconds)
        # [array, when last handed out or seen in use (monotonic s)], least
        # recently handed out first
        self._entries = []
        self._lock = threading.Lock()
        self._timer = None
        self._paused = 0
        os.register_at_fork(after_in_child=self._after_fork)

    def empty(self, shape, dtype):
        """A C-contiguous array of ``shape`` and ``dtype`` whose values are unset.

        The most recently used pooled array of that shape and dtype that
        nothing references is returned if there is one (its pages are the
        likeliest still cached); else a new one, which the pool keeps in
        place of its least recently used spare array, or beside the others
        while it holds fewer than ``capacity``.
        """
        shape = tuple(int(n) for n in shape)
        dtype = np.dtype(dtype)
        with self._lock:
            entries = self._entries
            for i in reversed(range(len(entries))):
                entry = entries[i]
                if entry[0].shape == shape and entry[0].dtype == dtype and _spare(entry):
                    del entries[i]
                    return self._hand_out(entry)
            array = np.empty(shape, dtype=dtype)
            if self.capacity <= 0:
                return array
            if len(entries) >= self.capacity:
                spare = next((i for i, e in enumerate(entries) if _spare(e)), None)
                if spare is None:
                    return array  # every pooled array is in use: this one is not kept
                del entries[spare]
            return self._hand_out([array, 0.0])

    def _hand_out(self, entry):
        entry[1] = time.monotonic()
        self._entries.append(entry)
        if self._timer is None and not self._paused:
            self._schedule()
        return entry[0]

    def _schedule(self):
        self._timer = threading.Timer(self.keep_seconds, self._trim)
        self._timer.name = "ccdgrid-map-memory"
        self._timer.daemon = True
        self._timer.start()

    def _trim(self):
        """Drop the arrays unused for ``keep_seconds``; check again later while any remain."""
        with self._lock:
            now = time.monotonic()
            for entry in self._entries:
                if not _spare(entry):
                    entry[1] = now
            self._entries = [e for e in self._entries if now - e[1] < self.keep_seconds]
            self._timer = None
            if self._entries and not self._paused:
                self._schedule()

    @contextlib.contextmanager
    def timer_stopped(self):
        """Run the block with the pool's timer thread stopped (it restarts after).

        For a caller that forks worker processes only when its process runs
        a single thread (:func:`ccdgrid._series_pool._start_method`).
        """
        with self._lock:
            self._paused += 1
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            timer.join()
            _wait_for_exit(timer.native_id)
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                if self._entries and self._timer is None and not self._paused:
                    self._schedule()

    def _after_fork(self):
        # a forked child's copies of the parent's arrays would be copied again
        # page by page on their first write: it starts with an empty pool (and
        # without the timer, whose thread a fork does not copy)
        self._lock = threading.Lock()
        self._timer = None
        self._paused = 0
        self._entries.clear()

    def clear(self):
        """Forget every pooled array (those still in use live on with their users)."""
        with self._lock:
            self._entries.clear()

    @property
    def nbytes(self):
        """Bytes of the pooled arrays, in use or not."""
        with self._lock:
            return sum(e[0].nbytes for e in self._entries)

    @property
    def spare_nbytes(self):
        """Bytes of the pooled arrays that nothing else references."""
        with self._lock:
            return sum(e[0].nbytes for e in self._entries if _spare(e))
