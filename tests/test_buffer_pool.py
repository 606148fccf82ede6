"""Tests of ccdgrid._buffer_pool and of the maps' reuse of dropped calibrations' memory."""

import os
import threading
import time

import numpy as np
import pytest

from ccdgrid import maps
from ccdgrid._buffer_pool import BufferPool
from ccdgrid.pipeline import calibrate
from ccdgrid.synthetic import grid_image


def _address(array):
    return array.__array_interface__["data"][0]


def test_a_dropped_array_is_handed_out_again():
    pool = BufferPool(capacity=4, keep_seconds=60)
    a = pool.empty((30, 40), np.float32)
    address = _address(a)
    del a
    b = pool.empty((30, 40), np.float32)
    assert _address(b) == address
    assert b.shape == (30, 40)
    assert b.dtype == np.float32
    assert b.flags.c_contiguous


@pytest.mark.parametrize(
    "hold",
    [
        lambda a: a,
        lambda a: a[3:7, ::2],
        lambda a: a.view(np.int32),
        lambda a: a.reshape(-1),
        memoryview,
        lambda a: np.asarray(a).T,
    ],
    ids=["array", "slice", "view", "reshape", "memoryview", "transpose"],
)
def test_an_array_anything_still_references_is_never_handed_out(hold):
    pool = BufferPool(capacity=4, keep_seconds=60)
    a = pool.empty((30, 40), np.float32)
    a[...] = 7.0
    kept = hold(a)
    del a
    b = pool.empty((30, 40), np.float32)
    b[...] = -1.0
    assert np.all(np.asarray(kept).view(np.float32) == 7.0)
    del kept
    c = pool.empty((30, 40), np.float32)  # now the first one is free again
    assert not np.shares_memory(b, c)


def test_another_shape_or_dtype_gets_new_memory():
    pool = BufferPool(capacity=4, keep_seconds=60)
    a = pool.empty((30, 40), np.float32)
    address = _address(a)
    del a
    for shape, dtype in (((40, 30), np.float32), ((30, 40), np.float64), ((30, 40), np.int32)):
        b = pool.empty(shape, dtype)
        assert _address(b) != address
        assert b.shape == shape
        assert b.dtype == dtype


def test_capacity_bounds_what_the_pool_holds():
    pool = BufferPool(capacity=2, keep_seconds=60)
    held = [pool.empty((10, 10), np.float64) for _ in range(3)]
    assert pool.nbytes == 2 * held[0].nbytes  # the third is not kept
    assert pool.spare_nbytes == 0
    del held
    assert pool.spare_nbytes == pool.nbytes == 1600
    big = pool.empty((20, 20), np.float64)  # replaces a spare small one
    assert pool.nbytes == 800 + big.nbytes


def test_capacity_zero_never_reuses():
    pool = BufferPool(capacity=0, keep_seconds=60)
    a = pool.empty((10, 10), np.float64)
    del a
    assert pool.nbytes == 0


def test_unused_arrays_are_released_after_keep_seconds_and_used_ones_kept():
    pool = BufferPool(capacity=4, keep_seconds=0.05)
    used = pool.empty((10, 10), np.float64)
    pool.empty((20, 20), np.float64)  # dropped at once
    assert pool.nbytes == 800 + 3200
    deadline = time.monotonic() + 5.0
    while pool.nbytes > 800 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.nbytes == 800  # only the one still in use
    del used
    deadline = time.monotonic() + 5.0
    while pool.nbytes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.nbytes == 0


def test_clear_forgets_the_arrays_but_not_their_values():
    pool = BufferPool(capacity=4, keep_seconds=60)
    a = pool.empty((10, 10), np.float64)
    a[...] = 3.0
    pool.clear()
    assert pool.nbytes == 0
    b = pool.empty((10, 10), np.float64)
    b[...] = 0.0
    assert np.all(a == 3.0)


def _timer_threads():
    return [t for t in threading.enumerate() if t.name == "ccdgrid-map-memory"]


def test_the_timer_is_stopped_inside_timer_stopped_and_runs_again_after():
    pool = BufferPool(capacity=4, keep_seconds=60)
    kept = pool.empty((10, 10), np.float64)
    assert len(_timer_threads()) >= 1
    others = {t.ident for t in _timer_threads()} - {pool._timer.ident}
    with pool.timer_stopped():
        assert {t.ident for t in _timer_threads()} <= others
        more = pool.empty((20, 20), np.float64)  # no timer started meanwhile
        assert {t.ident for t in _timer_threads()} <= others
    assert pool._timer is not None
    assert pool._timer.is_alive()
    assert pool.nbytes == kept.nbytes + more.nbytes
    pool.clear()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_starts_with_an_empty_pool():
    pool = BufferPool(capacity=4, keep_seconds=60)
    kept = pool.empty((10, 10), np.float64)
    read, write = os.pipe()
    with pool.timer_stopped():
        pid = os.fork()
    if pid == 0:  # the child: report what its pool holds, then leave at once
        os.write(write, str(pool.nbytes).encode())
        os._exit(0)
    os.close(write)
    got = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert got == "0"
    assert pool.nbytes == kept.nbytes  # the parent's pool is as it was


def test_threads_never_share_an_array():
    pool = BufferPool(capacity=3, keep_seconds=60)
    clashes = []

    def work(tag):
        for _ in range(300):
            a = pool.empty((64,), np.int64)
            a[...] = tag
            time.sleep(0)
            if not np.all(a == tag):
                clashes.append(tag)
            del a

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clashes == []


@pytest.fixture
def plate():
    maps.MAP_MEMORY.clear()  # no spare maps of this shape left by other tests
    return grid_image((256, 320), pitch_px=32.0, hole_diameter_px=6.0, seed=3).image


def test_a_calibration_reuses_the_maps_of_one_dropped_before(plate):
    first = calibrate(plate, cv_folds=0)
    addresses = {_address(first.dx), _address(first.dy)}
    expected = first.dx.copy(), first.dy.copy(), first.mask.copy()
    del first
    second = calibrate(plate, cv_folds=0)
    assert {_address(second.dx), _address(second.dy)} == addresses
    np.testing.assert_array_equal(second.dx, expected[0])
    np.testing.assert_array_equal(second.dy, expected[1])
    np.testing.assert_array_equal(second.mask, expected[2])


def test_a_calibration_still_held_keeps_its_maps(plate):
    first = calibrate(plate, cv_folds=0)
    before = first.dx.copy(), first.dy.copy(), first.mask.copy()
    moved = grid_image((256, 320), pitch_px=32.0, hole_diameter_px=6.0, seed=3, offset=(2.5, 1.5))
    second = calibrate(moved.image, cv_folds=0)
    for old, new in zip(
        (first.dx, first.dy, first.mask), (second.dx, second.dy, second.mask), strict=True
    ):
        assert not np.shares_memory(old, new)
    np.testing.assert_array_equal(first.dx, before[0])
    np.testing.assert_array_equal(first.dy, before[1])
    np.testing.assert_array_equal(first.mask, before[2])
