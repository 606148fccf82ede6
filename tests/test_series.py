"""Series of grid images: ``calibrate_series`` and ``ccdgrid calibrate`` on several frames.

The stack: frames of one synthetic plate (one seed, so one true distortion)
moved by known amounts between frames, and one blank frame that cannot be
calibrated. Drift is ``new - reference`` grid position at the image centre,
``(y, x)`` px, so a plate moved by ``(dy, dx)`` drifts by about ``(dy, dx)``.
"""

import concurrent.futures as cf
import contextlib
import csv
import hashlib
import itertools
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import warnings

import h5py
import numpy as np
import pytest
from pyFAI import detector_factory

from ccdgrid import _series_pool, _series_worker, series, series_frames
from ccdgrid._series_pool import _Pool
from ccdgrid._series_worker import THREAD_ENV, _Config
from ccdgrid.cli import main
from ccdgrid.detector_file import load
from ccdgrid.errors import CcdgridError
from ccdgrid.series import COLUMNS, calibrate_series
from ccdgrid.series_frames import _Spec
from ccdgrid.synthetic import grid_image

SIZE = 512
BASE = (0.3, -0.2)  # px, plate offset of frame 0
# (y, x) px plate move of each frame from frame 0; None = a blank frame
MOVES = [(0.0, 0.0), None, (0.4, -0.3), (23.0, -17.5)]
DRIFT_TOL = 0.05  # px: the grid fit of 25 holes under a 0.4 px distortion


def _frame(move):
    if move is None:
        return np.full((SIZE, SIZE), 120, dtype=np.uint16)
    return grid_image((SIZE, SIZE), seed=5, offset=(BASE[0] + move[0], BASE[1] + move[1])).image


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "scan.h5"
    with h5py.File(path, "w") as h5:
        h5["/entry/data"] = np.stack([_frame(m) for m in MOVES])
    return path


@pytest.fixture(scope="module")
def serial(stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    res = calibrate_series(
        f"{stack}::/entry/data",
        pitch=5e-3,
        output=out,
        table=out / "table",
        workers=1,
        progress=False,
    )
    return res, out


# -- a series, frame by frame ----------------------------------------------------------


def test_public_names_stay_importable_from_series():
    # defined in series_table and series_frames, re-exported by series
    import ccdgrid

    public = ["COLUMNS", "FrameResult", "SeriesResult", "calibrate_series"]
    assert sorted(series.__all__) == [*public, "expand_frames", "parse_frames"]
    for name in series.__all__:
        assert hasattr(series, name), name
    for name in ("FrameResult", "SeriesResult", "calibrate_series"):
        assert getattr(ccdgrid, name) is getattr(series, name), name


def test_every_frame_is_a_row_and_the_bad_one_is_recorded(serial):
    res, _ = serial
    assert [f.index for f in res.frames] == [0, 1, 2, 3]
    assert [f.frame for f in res.frames] == [0, 1, 2, 3]
    assert [f.status for f in res.frames] == ["ok", "failed", "ok", "ok"]
    assert res.frames[1].error != ""
    assert res.frames[1].output == ""
    assert [f.index for f in res.failed] == [1]
    assert not res.ok
    for f in res.frames:
        assert f.file == str(pathlib.Path(res.frames[0].file))
        assert f.dataset == "/entry/data"


def test_rows_hold_the_calibration_figures(serial):
    res, _ = serial
    for f in (res.frames[0], res.frames[2], res.frames[3]):
        assert f.holes_indexed >= 20
        assert f.holes_found >= f.holes_indexed
        assert f.pitch_px == pytest.approx(98.0 * (1 + 1.005) / 2, rel=2e-3)
        assert f.rotation_deg == pytest.approx(0.5, abs=0.02)
        assert 0 < f.cv_rms_px <= f.cv_max_px < 0.3
        assert f.cv_rms_pitch == pytest.approx(f.cv_rms_px / f.pitch_px, rel=1e-12)
        # 5 mm over the lattice step along each axis (aspect 1.005 along y)
        assert f.pixel2_um == pytest.approx(5e3 / 98.0, rel=2e-3)
        assert f.pixel1_um == pytest.approx(5e3 / (98.0 * 1.005), rel=2e-3)
        assert f.seconds > 0


def test_drift_against_the_first_frame_follows_the_plate(serial):
    res, _ = serial
    assert res.reference == "frame 0"
    first = res.frames[0]
    assert (first.drift_shift_y_px, first.drift_shift_x_px) == (0.0, 0.0)
    for index in (2, 3):
        f = res.frames[index]
        assert f.reference_index == 0
        np.testing.assert_allclose(
            (f.drift_shift_y_px, f.drift_shift_x_px), MOVES[index], atol=DRIFT_TOL
        )
        assert abs(f.drift_rotation_mdeg) < 5.0
        assert abs(f.drift_scale_ppm) < 500.0
        # the same detector: the maps hardly change
        assert f.drift_max_change_dx_px < 0.2
        assert f.drift_max_change_dy_px < 0.2
        assert f.drift_matched >= 15
    assert np.isnan(res.frames[1].drift_shift_x_px)


def test_each_frame_has_a_detector_file_pyfai_loads(stack, serial):
    res, out = serial
    digest = hashlib.sha256(stack.read_bytes()).hexdigest()
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "scan_0000_detector.h5",
        "scan_0002_detector.h5",
        "scan_0003_detector.h5",
        "table.csv",
        "table.json",
    ]
    for index in (0, 2, 3):
        path = out / f"scan_{index:04d}_detector.h5"
        assert res.frames[index].output == str(path)
        det = detector_factory(str(path))
        assert det.shape == (SIZE, SIZE)
        rec = load(path)
        assert rec.source["frame"] == index
        assert rec.source["dataset"] == "/entry/data"
        assert rec.source["sha256"] == digest


def test_the_table_as_csv_json_and_array(serial):
    res, out = serial
    with open(out / "table.csv", newline="") as stream:
        rows = list(csv.reader(stream))
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == 5
    head = COLUMNS.index("status")
    assert [r[head] for r in rows[1:]] == ["ok", "failed", "ok", "ok"]
    assert rows[2][COLUMNS.index("cv_rms_px")] == ""  # not measured: an empty cell
    assert float(rows[3][COLUMNS.index("cv_rms_px")]) == res.frames[2].cv_rms_px

    doc = json.loads((out / "table.json").read_text())
    assert doc["n_frames"] == 4
    assert doc["n_failed"] == 1
    assert doc["reference"] == "frame 0"
    assert doc["frames"][1]["cv_rms_px"] is None
    assert doc["frames"][3]["holes_indexed"] == res.frames[3].holes_indexed

    table = res.table()
    assert table.dtype.names == COLUMNS
    assert table["holes_indexed"].dtype == np.int64
    np.testing.assert_array_equal(table["status"], ["ok", "failed", "ok", "ok"])
    assert table["holes_indexed"][1] == -1
    assert np.isnan(table["cv_rms_px"][1])


def test_no_temporary_file_is_left(serial):
    _, out = serial
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# -- workers -----------------------------------------------------------------------------


def test_two_processes_give_the_serial_results(stack, serial, tmp_path):
    res, _ = serial
    par = calibrate_series(
        f"{stack}::/entry/data",
        pitch=5e-3,
        output=tmp_path,
        workers=2,
        executor="process",
        progress=False,
    )
    assert par.executor == "process"
    assert par.workers == 2
    for a, b in zip(res.frames, par.frames, strict=True):
        assert (a.index, a.status, a.error) == (b.index, b.status, b.error)
        assert (a.holes_found, a.holes_indexed, a.drift_matched) == (
            b.holes_found,
            b.holes_indexed,
            b.drift_matched,
        )
        for name in ("cv_rms_px", "pitch_px", "drift_shift_y_px", "drift_shift_x_px"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-6)
        assert pathlib.Path(b.output).parent == tmp_path if b.ok else b.output == ""


# a fresh interpreter, single-threaded from the start: its worker process is
# forked; prints the serial and the parallel tables, the start method and the
# threads the forked worker may use
_FORKED_SERIES = """
import json, sys
from threadpoolctl import threadpool_info
from ccdgrid._series_pool import _Pool
from ccdgrid._series_worker import _Config
from ccdgrid.series import calibrate_series
source, out = sys.argv[1:3]
runs = [
    calibrate_series(source, pitch=5e-3, output=f"{out}/{n}", workers=n, progress=False)
    for n in (1, 2)
]
pool = _Pool("process", 2, _Config(pitch=5e-3, options={}, mask=None, save_workers=1))
try:
    pool.ready[0].result(timeout=120)
    info = pool.processes.submit(threadpool_info).result()
    threads = {i["user_api"]: i["num_threads"] for i in info}
finally:
    pool.shutdown()
print(json.dumps({
    "rows": [[f.row() for f in r.frames] for r in runs],
    "start_method": runs[1].timeline["start_method"],
    "methods": [p["method"] for p in runs[1].timeline["processes"]],
    "threads": threads,
}))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="workers are forked on Linux only"
)
def test_a_forked_worker_process_gives_the_serial_results(stack, serial, tmp_path):
    env = os.environ | dict.fromkeys(THREAD_ENV, "1")
    run = subprocess.run(
        [sys.executable, "-c", _FORKED_SERIES, f"{stack}::/entry/data", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a worker stuck in a copied thread pool must fail the test, not hang it
        check=False,
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["start_method"] == "fork"
    assert found["methods"] == ["fork"]
    assert set(found["threads"].values()) == {1}  # BLAS and OpenMP held to one thread
    res, _ = serial
    for rows in found["rows"]:  # 1 worker in that interpreter, then 2
        for a, b in zip(res.frames, rows, strict=True):
            assert (a.index, a.status, a.error) == (b["index"], b["status"], b["error"])
            assert (a.holes_found, a.holes_indexed, a.drift_matched) == (
                b["holes_found"],
                b["holes_indexed"],
                b["drift_matched"],
            )
            for name in ("cv_rms_px", "pitch_px", "drift_shift_y_px", "drift_shift_x_px"):
                np.testing.assert_allclose(b[name], getattr(a, name), atol=1e-6)


def test_a_series_leaves_no_thread_behind(stack):
    # a thread left running (tqdm's monitor once was) would keep the next
    # series from forking its workers
    before = {t.ident for t in threading.enumerate()}
    for progress in (False, True):
        calibrate_series(
            f"{stack}::/entry/data", frames="2:4", pitch=5e-3, workers=2, progress=progress
        )
        # but for the map memory's timer, which the next series stops before forking
        # (test_a_forked_worker_process_gives_the_serial_results)
        alive = {
            t.ident
            for t in threading.enumerate()
            if t.is_alive() and t.name != "ccdgrid-map-memory"
        }
        assert alive <= before


def test_without_threadpoolctl_every_worker_is_a_process(stack, monkeypatch):
    # this process's BLAS cannot be held to one thread: it only schedules
    monkeypatch.setattr(_series_pool, "_can_limit_threads", lambda: False)
    monkeypatch.setattr(_series_pool, "_thread_limits", lambda api=None: contextlib.nullcontext())
    pool = _Pool("process", 2, _Config(pitch=5e-3, options={}, mask=None, save_workers=1))
    try:
        assert not pool.use_local
        for future in pool.ready:
            future.result(timeout=120)
        assert len(pool.processes._processes) == 2  # both spawned single-threaded
    finally:
        pool.shutdown()
    res = calibrate_series(
        f"{stack}::/entry/data", frames="2:4", pitch=5e-3, workers=2, progress=False
    )
    assert [f.status for f in res.frames] == ["ok", "ok"]
    np.testing.assert_allclose(
        (res.frames[1].drift_shift_y_px, res.frames[1].drift_shift_x_px),
        np.subtract(MOVES[3], MOVES[2]),
        atol=DRIFT_TOL,
    )


def test_threads_calibrate_too(stack, tmp_path):
    res = calibrate_series(
        f"{stack}::/entry/data",
        frames="2:4",
        pitch=5e-3,
        output=tmp_path,
        workers=2,
        executor="thread",
        progress=False,
    )
    assert res.executor == "thread"
    assert [f.status for f in res.frames] == ["ok", "ok"]
    np.testing.assert_allclose(
        (res.frames[1].drift_shift_y_px, res.frames[1].drift_shift_x_px),
        np.subtract(MOVES[3], MOVES[2]),
        atol=DRIFT_TOL,
    )


class _SimulatedPool:
    """One worker thread here and one worker process, on a simulated clock.

    Nothing is calibrated: a frame takes ``local_s`` in this process and
    ``process_s`` in the worker process, which is up at ``startup_s`` (it
    takes no frame before, as :class:`~ccdgrid._series_pool._Pool`) and runs the
    frames queued in it one after the other (as a real worker process does: a
    frame queued there cannot be taken back).
    """

    kind = "process"

    def __init__(self, startup_s, local_s, process_s):
        self.now = 0.0
        self.local_s, self.process_s = local_s, process_s
        self.startup_s = startup_s
        self.process_free = startup_s  # when the process can start its next frame
        self.local_busy = False
        self.finish = {}  # future -> (time, row, where)
        self.placed = []  # (series index, where, frames before it still in that worker)
        self.ends = {}  # where -> end of its last frame
        self.local_runs = []  # (start, end) of this process's frames
        self.lending = []  # when the scheduler offered idle cores

    def submit(self, func_name, spec, *args, where="any"):
        assert func_name == "run"
        future = cf.Future()
        row = _series_worker._new_row(spec)
        row.status = "ok"
        if where != "process" and not self.local_busy:
            self.local_busy = True
            self.finish[future] = (self.now + self.local_s, row, "local")
            self.local_runs.append((self.now, self.now + self.local_s))
            self.placed.append((spec.index, "local", 0))
            return future, True
        if where == "local" or self.now < self.startup_s:
            return None
        ahead = sum(1 for f, (_, _, w) in self.finish.items() if w == "process" and not f.done())
        self.process_free = max(self.now, self.process_free) + self.process_s
        self.finish[future] = (self.process_free, row, "process")
        self.placed.append((spec.index, "process", ahead))
        return future, False

    def wait(self, futures):
        future = min(futures, key=lambda f: self.finish[f][0], default=None)
        if self.now < self.startup_s and (
            future is None or self.finish[future][0] > self.startup_s
        ):
            self.now = self.startup_s  # the worker process is up
            return set()
        self.now, row, where = self.finish[future]
        self.ends[where] = self.now
        future.set_result((row, []))
        return {future}

    def release(self, local):
        self.local_busy = self.local_busy and not local

    def local_free(self):
        return not self.local_busy

    def lend_idle_cores(self):
        self.lending.append(self.now)

    def startups(self):
        return []

    def shutdown(self, cancel=False):
        pass


def _simulated_series(n, pool, tmp_path):
    specs = [_Spec(i, f"<array {i}>", None, array=np.zeros((1, 1))) for i in range(n)]
    config = _Config(pitch=5e-3, options={}, mask=None, save_workers=1)
    # a reference file known from the start: no frame waits for a drift reference
    run = series._Run(specs, config, "process", 2, "reference.h5", False, tmp_path, False, None)
    run.pool_factory = lambda *args, **kwargs: pool
    return run.execute()


def test_the_last_frames_go_to_a_free_worker(tmp_path):
    # the worker process starts late and is slower: with a frame queued in it
    # ahead of time to the end, this process would wait 3 s for it, idle
    pool = _SimulatedPool(startup_s=1.0, local_s=1.0, process_s=1.5)
    rows = _simulated_series(8, pool, tmp_path)
    assert [r.index for r in rows] == list(range(8))
    assert all(r.ok for r in rows)
    assert sorted(i for i, _, _ in pool.placed) == list(range(8))
    # while frames remain for every worker, one waits queued in the busy process
    assert max(ahead for _, _, ahead in pool.placed[:-2]) == 1
    # the last two are placed only where they start at once
    assert [ahead for _, _, ahead in pool.placed[-2:]] == [0, 0]
    # so neither worker waits for the other longer than a frame at the end
    assert abs(pool.ends["local"] - pool.ends["process"]) < 1.5


@pytest.mark.parametrize("n", [5, 6, 7, 8, 12])
def test_this_process_never_waits_while_frames_remain(tmp_path, n):
    # a frame queued behind the busy worker process must not keep this
    # process's free worker from the frames still waiting (it once did, for
    # as long as the process took to finish its frame)
    pool = _SimulatedPool(startup_s=0.5, local_s=1.0, process_s=1.25)
    rows = _simulated_series(n, pool, tmp_path)
    assert all(r.ok for r in rows)
    local = pool.local_runs
    assert all(b[0] == a[1] for a, b in itertools.pairwise(local))
    assert local[0][0] == 0.0
    # it stops only when no frame is left to start
    assert len(local) + sum(w == "process" for _, w, _ in pool.placed) == n


def test_a_worker_process_gets_frames_only_once_up(tmp_path):
    # it comes up after this process's worker could do every frame: it gets
    # none (queued in it while it started, one would have ended at 11 s)
    pool = _SimulatedPool(startup_s=10.0, local_s=1.0, process_s=1.0)
    rows = _simulated_series(3, pool, tmp_path)
    assert [r.index for r in rows] == [0, 1, 2]
    assert pool.placed == [(0, "local", 0), (1, "local", 0), (2, "local", 0)]
    assert pool.ends == {"local": 3.0}


def test_a_series_shorter_than_the_workers_is_placed_without_queueing(tmp_path):
    pool = _SimulatedPool(startup_s=0.5, local_s=1.0, process_s=1.0)
    rows = _simulated_series(2, pool, tmp_path)
    assert [r.index for r in rows] == [0, 1]
    assert pool.placed == [(0, "local", 0), (1, "process", 0)]


@pytest.mark.parametrize(
    ("kind", "workers", "queued", "depth"),
    [
        ("serial", 1, 10, 1),
        ("process", 2, 3, 3),  # one frame waits queued while two more remain
        ("process", 2, 2, 2),  # the last two frames: only to a free worker
        ("process", 2, 1, 2),
        ("thread", 4, 5, 5),
        ("thread", 4, 4, 4),
    ],
)
def test_frames_in_flight(kind, workers, queued, depth):
    assert series._depth(kind, workers, queued) == depth


def test_idle_workers_lend_their_cores_once_to_busy_ones(stack, tmp_path):
    config = _Config(pitch=5e-3, options={"cv_folds": 0}, mask=None, save_workers=1)
    pool = _Pool("process", 2, config)
    try:
        pool.ready[0].result(timeout=120)  # the worker process is up
        pool.local_busy, pool.process_busy = 1, 1
        pool.lend_idle_cores()
        assert pool.spare.value == 0  # both busy: nothing to lend
        pool.local_busy = 0
        pool.lend_idle_cores()
        pool.lend_idle_cores()
        assert pool.spare.value == 1  # once per idle worker
        pool.process_busy = 0
        # the worker process borrows it for its frame's detector file
        spec = _Spec(0, f"{stack}::/entry/data", 0, output=str(tmp_path / "d.h5"))
        future, local = pool.submit("run", spec, None, -1, False, where="process")
        row, late = future.result(timeout=300)
        assert not local
        assert row.ok
        assert late == []
        assert row.timing["borrowed"] == 1
        assert pool.spare.value == 0
        pool.release(False)
        # this process's worker finds none left
        assert pool.local._borrow() == 0
        pool.lend_idle_cores()  # now the process is idle too: one more core
        assert pool.local._borrow() == 1
        assert pool.local._borrow() == 0
    finally:
        pool.shutdown()


def test_cores_are_lent_only_once_no_frame_is_left_to_start(tmp_path):
    pool = _SimulatedPool(startup_s=0.5, local_s=1.0, process_s=1.25)
    _simulated_series(7, pool, tmp_path)
    last_start = max(start for start, _ in pool.local_runs)
    assert pool.lending
    assert min(pool.lending) >= last_start


def test_a_frame_started_before_its_file_is_hashed_records_the_digest(
    stack, tmp_path, monkeypatch
):
    spec = _Spec(0, f"{stack}::/entry/data", 0, output=str(tmp_path / "d.h5"))
    digests = series._Digests([spec])  # not started: the file is still "being hashed"
    seen = []
    hashing = series._Digests.hashing

    def record(self, s):
        seen.append(hashing(self, s))
        return seen[-1]

    def finish_then_get(self, s, wait=True):
        if wait:  # the frame needs the digest now: the hash thread finishes
            self._run()
        return get(self, s, wait)

    get = series._Digests.get
    monkeypatch.setattr(series._Digests, "hashing", record)
    monkeypatch.setattr(series._Digests, "get", finish_then_get)
    config = _Config(pitch=5e-3, options={"cv_folds": 0}, mask=None, save_workers=1)

    row, late = _series_worker._Worker(config, digests=digests).run(spec, None, -1, False)

    assert row.ok
    assert late == []
    assert seen == [True]  # read while the hash was not known
    assert (
        load(tmp_path / "d.h5").source["sha256"] == hashlib.sha256(stack.read_bytes()).hexdigest()
    )


def test_process_workers_record_the_digest_without_waiting_for_it(stack, tmp_path, monkeypatch):
    # a large stack takes seconds to hash: the worker processes calibrate
    # meanwhile and read the digest from the shared table when they save
    from ccdgrid import io

    real = io.sha256_file
    log = tmp_path / "hashed.txt"  # a file: a forked worker that hashed would show

    def slow_sha256(path):
        time.sleep(2.5)
        digest = real(path)
        with open(log, "a") as stream:
            stream.write(f"{time.time()}\n")
        return digest

    monkeypatch.setattr(io, "sha256_file", slow_sha256)
    res = calibrate_series(
        f"{stack}::/entry/data",
        frames="0,2,3",
        pitch=5e-3,
        output=tmp_path,
        workers=2,
        progress=False,
        cv_folds=0,
    )
    digest = hashlib.sha256(stack.read_bytes()).hexdigest()
    assert res.ok
    assert [load(f.output).source["sha256"] for f in res.frames] == [digest] * 3
    hashed = [float(line) for line in log.read_text().split()]
    assert len(hashed) == 1  # hashed once, here: no worker hashed it again
    in_processes = [f for f in res.frames if ":" not in f.timing["worker"]]
    assert in_processes
    assert min(f.timing["start"] for f in in_processes) < hashed[0]


def test_the_digest_table_says_known_none_or_not_yet(tmp_path):
    files = [tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"]
    for k, path in enumerate(files):
        path.write_bytes(bytes([k]) * 100)
    specs = [series_frames._Spec(k, str(path), None) for k, path in enumerate(files)]
    digests = series._Digests(specs, shared=True)
    table = digests.table
    assert [table.hashing(s) for s in specs] == [True] * 3
    assert [table.get(s, wait=False) for s in specs] == [None] * 3
    table.put(str(files[0]), "ab" * 32)
    table.put(str(files[1]), None)  # unreadable: the worker hashes it itself
    assert [table.hashing(s) for s in specs] == [False, False, True]
    assert table.get(specs[0]) == "ab" * 32
    assert table.get(specs[1]) is None
    # a series stopped before a file was hashed: it is published as none
    digests.stop()
    digests._run()
    assert not table.hashing(specs[2])
    assert table.get(specs[2]) is None
    assert digests.get(specs[2]) is None
    # an in-memory image has no file, and no slot
    array = series_frames._Spec(3, "<array 3>", None, array=np.zeros((2, 2)))
    assert not table.hashing(array)
    assert table.get(array) is None


def test_a_worker_here_waiting_for_a_digest_hashes_the_file_itself_if_hashing_fails(
    tmp_path, monkeypatch
):
    from ccdgrid import io

    path = tmp_path / "a.h5"
    path.write_bytes(b"x" * 100)
    spec = series_frames._Spec(0, str(path), None)
    digests = series._Digests([spec])
    started = threading.Event()

    def failing(path):
        started.set()
        time.sleep(0.2)
        raise ValueError("not an OSError")

    def hash_thread():
        with pytest.raises(ValueError, match="not an OSError"):
            digests._run()

    monkeypatch.setattr(io, "sha256_file", failing)
    thread = threading.Thread(target=hash_thread)
    thread.start()
    started.wait()
    assert digests.get(spec, wait=True) is None  # was: CancelledError in the worker
    thread.join()


def test_rows_say_where_and_when_each_frame_ran(stack, tmp_path):
    res = calibrate_series(
        f"{stack}::/entry/data",
        frames="0,2,3",
        pitch=5e-3,
        workers=2,
        executor="process",
        progress=False,
        cv_folds=0,
    )
    assert res.executor == "process"
    start, end = res.timeline["start"], res.timeline["start"] + res.seconds
    assert start <= res.timeline["pool_started"] <= end
    workers = set()
    for f in res.frames:
        assert start <= f.timing["start"] <= f.timing["end"] <= end
        assert f.timing["end"] - f.timing["start"] == pytest.approx(f.seconds, abs=1e-6)
        assert f.timing["cpu"] > 0
        workers.add(f.timing["worker"])
    # this process's worker is a thread, named "PID:THREAD"; a process is "PID"
    assert all(w.split(":")[0].isdigit() for w in workers)
    assert all(w.startswith(f"{os.getpid()}:") for w in workers if ":" in w)
    for p in res.timeline["processes"]:
        assert p["pid"] != os.getpid()
        assert start <= p["entered"] <= p["ready"] <= end
        assert p["startup_cpu"] > 0
    # the timing is for profiling, not a column of the table
    assert "timing" not in COLUMNS
    assert "timing" not in res.table().dtype.names


class _KillsItsWorker(np.ndarray):
    """An image that ends the process that unpickles it: a worker crash."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_a_crashed_worker_fails_its_frame_only(monkeypatch):
    # worker processes only: this process's worker would take the frames
    # while they start, and never unpickles the killer
    monkeypatch.setattr(_series_pool, "_can_limit_threads", lambda: False)
    monkeypatch.setattr(_series_pool, "_thread_limits", lambda api=None: contextlib.nullcontext())
    rng = np.random.default_rng(0)
    good = grid_image((SIZE, SIZE), seed=5, offset=BASE).image
    killer = rng.integers(0, 100, (SIZE, SIZE)).astype(np.uint16).view(_KillsItsWorker)
    res = calibrate_series([good, killer, good], pitch=5e-3, workers=2, progress=False, cv_folds=0)
    assert [f.status for f in res.frames] == ["ok", "failed", "ok"]
    # tried again alone in a new worker process, never in the calling one
    assert res.frames[1].error.startswith("a worker process died while calibrating this frame")


# -- references, warm starts, in-memory sources -------------------------------------------


def test_drift_against_a_reference_file_with_warm_starts(stack, serial):
    res, out = serial
    warm = calibrate_series(
        f"{stack}::/entry/data",
        frames=[2, 3],
        pitch=5e-3,
        reference=out / "scan_0000_detector.h5",
        warm=True,
        workers=1,
        progress=False,
    )
    assert warm.reference == str(out / "scan_0000_detector.h5")
    for f, index in zip(warm.frames, (2, 3), strict=True):
        assert f.ok
        assert f.warm
        assert f.reference_index == -1
        np.testing.assert_allclose(
            (f.drift_shift_y_px, f.drift_shift_x_px), MOVES[index], atol=DRIFT_TOL
        )
        assert f.cv_rms_px < 2 * res.frames[index].cv_rms_px


def test_warm_start_from_the_first_frame(stack):
    res = calibrate_series(
        f"{stack}::/entry/data", frames="0,2", pitch=5e-3, warm=True, workers=1, progress=False
    )
    assert [f.warm for f in res.frames] == [False, True]
    np.testing.assert_allclose(
        (res.frames[1].drift_shift_y_px, res.frames[1].drift_shift_x_px),
        MOVES[2],
        atol=DRIFT_TOL,
    )


def test_the_first_good_frame_is_the_reference(stack):
    res = calibrate_series(
        f"{stack}::/entry/data", frames="1,2,3", pitch=5e-3, workers=1, progress=False
    )
    assert res.reference == "frame 1"  # series index 1: stack frame 2
    assert [f.reference_index for f in res.frames] == [-1, 1, 1]
    np.testing.assert_allclose(
        (res.frames[2].drift_shift_y_px, res.frames[2].drift_shift_x_px),
        np.subtract(MOVES[3], MOVES[2]),
        atol=DRIFT_TOL,
    )


def test_the_reference_a_worker_just_wrote_is_not_read_back(stack, tmp_path, monkeypatch):
    # the local worker usually calibrates the reference frame itself: its next
    # frame used to read the file back (~0.08 s at 2048²) to measure its drift
    reads = []
    import ccdgrid.detector_file as detector_file

    original = detector_file.load
    monkeypatch.setattr(detector_file, "load", lambda path: reads.append(path) or original(path))
    serial = calibrate_series(
        f"{stack}::/entry/data", frames="0,2,3", pitch=5e-3, output=tmp_path, workers=1,
        progress=False,
    )  # fmt: skip
    assert serial.ok
    assert serial.frames[2].reference_index == 0
    assert reads == []
    # and the drift is the one measured against the file
    for f in serial.frames[1:]:
        record = _series_worker._aligned_drift(load(serial.frames[0].output), load(f.output))
        np.testing.assert_allclose(
            (f.drift_shift_y_px, f.drift_shift_x_px), record.shift, rtol=0, atol=1e-9
        )
        assert f.drift_max_change_dx_px == pytest.approx(record.max_change_dx, abs=1e-6)


def test_a_frame_done_before_the_reference_gets_its_drift_with_the_next(
    stack, serial, tmp_path, monkeypatch
):
    # frames calibrated while the reference was still being calibrated: their
    # worker keeps them and measures their drifts with its next frame, from
    # memory (reading them back cost ~0.05 s at 2048²)
    reference = serial[0].frames[0].output
    marker = tmp_path / "reference.json"
    config = _Config(pitch=5e-3, options={"cv_folds": 0}, mask=None, save_workers=1)
    worker = _series_worker._Worker(config)
    specs = [
        _Spec(k, f"{stack}::/entry/data", k, output=str(tmp_path / f"d{k}.h5")) for k in (2, 3)
    ]
    row, late = worker.run(specs[0], None, -1, False, str(marker))
    assert row.ok
    assert (row.reference_index, late) == (-1, [])
    marker.write_text(json.dumps({"path": reference, "index": 0}))
    reads = []
    import ccdgrid.detector_file as detector_file

    original = detector_file.load
    monkeypatch.setattr(detector_file, "load", lambda path: reads.append(path) or original(path))
    row, late = worker.run(specs[1], None, -1, False, str(marker))
    assert row.ok
    assert row.reference_index == 0
    assert [index for index, _ in late] == [2]
    assert reads == [reference]  # the reference, once; never the frame's own file
    record = _series_worker._aligned_drift(load(reference), load(specs[0].output))
    measured = late[0][1]
    assert measured.reference_index == 0
    np.testing.assert_allclose(
        (measured.drift_shift_y_px, measured.drift_shift_x_px), record.shift, rtol=0, atol=1e-9
    )
    assert measured.drift_max_change_dy_px == pytest.approx(record.max_change_dy, abs=1e-6)
    np.testing.assert_allclose(record.shift, MOVES[2], atol=DRIFT_TOL)
    # measured once: the next frame returns none
    assert worker.run(specs[1], None, -1, False, str(marker))[1] == []


def test_a_late_drift_that_fails_is_a_note_not_the_end_of_the_series(
    stack, serial, tmp_path, monkeypatch
):
    marker = tmp_path / "reference.json"
    config = _Config(pitch=5e-3, options={"cv_folds": 0}, mask=None, save_workers=1)
    worker = _series_worker._Worker(config)
    specs = [
        _Spec(k, f"{stack}::/entry/data", k, output=str(tmp_path / f"d{k}.h5")) for k in (2, 3)
    ]
    worker.run(specs[0], None, -1, False, str(marker))
    marker.write_text(json.dumps({"path": serial[0].frames[0].output, "index": 0}))
    aligned = _series_worker._aligned_drift
    calls = []

    def fail_first(reference, calibration):
        calls.append(1)
        if len(calls) == 2:  # the kept frame's, measured after the frame's own
            raise RuntimeError("a bug")
        return aligned(reference, calibration)

    monkeypatch.setattr(_series_worker, "_aligned_drift", fail_first)
    row, late = worker.run(specs[1], None, -1, False, str(marker))
    assert row.ok
    assert row.reference_index == 0  # the frame's own drift is measured
    assert [index for index, _ in late] == [2]
    assert late[0][1].note == "drift not measured: unexpected RuntimeError: a bug"


def _frame_1_before_the_reference(monkeypatch, before_frame_2=None):
    """Make series frame 0 wait until frame 1 is done; record what the pool is asked.

    ``before_frame_2``: called with the marker path before frame 2 runs.
    Returns the list of the pool's submissions (function names).
    """
    done = {}
    run = _series_worker._Worker.run

    def ordered_run(self, spec, reference, reference_index, warm, marker=None):
        if spec.index == 0:
            assert done.setdefault(1, threading.Event()).wait(60)
        if spec.index == 2 and before_frame_2 is not None:
            before_frame_2(marker)
        result = run(self, spec, reference, reference_index, warm, marker)
        done.setdefault(spec.index, threading.Event()).set()
        return result

    submitted = []
    submit = _Pool.submit

    def recording_submit(self, func_name, *args, **kwargs):
        submitted.append(func_name)
        return submit(self, func_name, *args, **kwargs)

    monkeypatch.setattr(_series_worker._Worker, "run", ordered_run)
    monkeypatch.setattr(_Pool, "submit", recording_submit)
    return submitted


def test_the_scheduler_takes_late_drifts_and_reads_back_no_frame(stack, tmp_path, monkeypatch):
    # two worker threads: series frame 1 is done while frame 0, the reference,
    # is still calibrating; its worker returns its drift with frame 2
    seen = []

    def wait_for_the_reference(marker):
        # frame 2 ends once the scheduler has written the reference down
        deadline = time.monotonic() + 60
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(os.path.exists(marker))

    submitted = _frame_1_before_the_reference(monkeypatch, wait_for_the_reference)
    res = calibrate_series(
        f"{stack}::/entry/data", frames="0,2,3", pitch=5e-3, output=tmp_path, workers=2,
        executor="thread", progress=False,
    )  # fmt: skip
    assert res.ok
    assert seen == [True]
    assert submitted == ["run"] * 3  # no drift measured from a file
    assert [f.reference_index for f in res.frames] == [0, 0, 0]
    for f, move in zip(res.frames[1:], (MOVES[2], MOVES[3]), strict=True):
        np.testing.assert_allclose((f.drift_shift_y_px, f.drift_shift_x_px), move, atol=DRIFT_TOL)


def test_a_frame_whose_worker_gets_no_more_frames_is_measured_from_its_file(
    stack, tmp_path, monkeypatch
):
    # the worker that did frame 1 gets no frame after the reference is known:
    # its drift is read back once every frame is done
    submitted = _frame_1_before_the_reference(monkeypatch)
    res = calibrate_series(
        f"{stack}::/entry/data", frames="0,2", pitch=5e-3, workers=2, executor="thread",
        progress=False,
    )  # fmt: skip
    assert res.ok
    assert submitted == ["run", "run", "drift"]
    assert res.frames[1].reference_index == 0
    np.testing.assert_allclose(
        (res.frames[1].drift_shift_y_px, res.frames[1].drift_shift_x_px), MOVES[2], atol=DRIFT_TOL
    )


def test_arrays_and_no_output_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    frames = np.stack([_frame(MOVES[0]), _frame(MOVES[2])])
    res = calibrate_series([frames], pitch=5e-3, workers=1, progress=False)
    assert [f.file for f in res.frames] == ["<array 0>", "<array 0>"]
    assert [f.frame for f in res.frames] == [0, 1]
    assert [f.output for f in res.frames] == ["", ""]
    np.testing.assert_allclose(
        (res.frames[1].drift_shift_y_px, res.frames[1].drift_shift_x_px),
        MOVES[2],
        atol=DRIFT_TOL,
    )
    assert os.listdir(tmp_path) == []


# -- output names and argument errors ------------------------------------------------------


def test_a_name_pattern(stack, tmp_path):
    res = calibrate_series(
        f"{stack}::/entry/data",
        frames="2,0",
        pitch=5e-3,
        output=tmp_path / "det_{index:02d}_f{frame}.h5",
        workers=1,
        progress=False,
        cv_folds=0,
    )
    assert [pathlib.Path(f.output).name for f in res.frames] == ["det_00_f2.h5", "det_01_f0.h5"]
    assert sorted(os.listdir(tmp_path)) == ["det_00_f2.h5", "det_01_f0.h5"]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("same.h5", "is a file: for a series give a directory or a name pattern"),
        ("det_{stem}.h5", r"frames 0 and 1 would both be written to .*det_scan\.h5"),
        ("det_{frames}.h5", r"unknown field \{frames\}"),
        ("det_{index}.edf", "must end with .h5"),
        ("missing/det_{index}.h5", "directory .*missing does not exist"),
    ],
)
def test_bad_outputs_are_refused_before_any_work(stack, tmp_path, output, message):
    (tmp_path / "same.h5").write_bytes(b"")
    with pytest.raises(CcdgridError, match=message):
        calibrate_series(
            f"{stack}::/entry/data", frames="0:2", output=tmp_path / output, progress=False
        )
    assert sorted(os.listdir(tmp_path)) == ["same.h5"]


@pytest.mark.parametrize("where", ["output", "table"])
def test_a_read_only_directory_is_refused_before_any_work(stack, tmp_path, monkeypatch, where):
    # every frame was calibrated, then failed on its temporary file
    import ccdgrid._h5write as h5write

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = os.access
    monkeypatch.setattr(
        h5write.os, "access", lambda p, mode: False if str(p) == str(read_only) else real(p, mode)
    )
    monkeypatch.setattr(series, "_Run", None)  # no frame may start
    output, table = tmp_path / "out", tmp_path / "table"
    if where == "output":
        output = read_only
    else:
        table = read_only / "table"
    with pytest.raises(CcdgridError, match=f"directory {read_only} is not writable"):
        calibrate_series(
            f"{stack}::/entry/data", frames="0:2", output=output, table=table, progress=False
        )


def test_the_output_may_not_overwrite_an_input(tmp_path):
    image = tmp_path / "grid.h5"
    with h5py.File(image, "w") as h5:
        h5["data"] = _frame(MOVES[0])
    with pytest.raises(CcdgridError, match="would overwrite an input image"):
        calibrate_series(f"{image}::/data", frames="0", output=tmp_path / "{stem}.h5")
    assert os.listdir(tmp_path) == ["grid.h5"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "`workers` must be a positive int"),
        ({"executor": "mpi"}, "`executor` must be 'process' or 'thread'"),
        ({"pitch": -1.0}, "`pitch` must be a positive length"),
        ({"backend": "fortran"}, "`backend` must be one of"),
        ({"hole_diameter": -3}, "`hole_diameter` must be a positive number"),
        ({"colour": "red"}, "unknown option `colour`"),
        ({"reference": "nowhere.h5"}, "detector file not found"),
    ],
)
def test_bad_arguments_are_named(stack, kwargs, message):
    with pytest.raises(CcdgridError, match=message):
        calibrate_series(f"{stack}::/entry/data", progress=False, **kwargs)


def test_a_missing_file_is_a_failed_frame(stack, tmp_path):
    res = calibrate_series(
        [tmp_path / "nowhere.edf", f"{stack}::/entry/data"],
        frames="0",
        pitch=5e-3,
        workers=1,
        progress=False,
        cv_folds=0,
    )
    assert [f.status for f in res.frames] == ["failed", "ok"]
    assert "image file not found" in res.frames[0].error
    assert res.reference == "frame 1"


# -- the command line ------------------------------------------------------------------------


def test_cli_series_writes_files_and_table(capsys, stack, tmp_path):
    code = main(
        [
            "calibrate",
            f"{stack}::/entry/data",
            "--frames",
            "2:4",
            "--pitch",
            "5mm",
            "-o",
            str(tmp_path / "out"),
            "--workers",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == [
        "scan_0002_detector.h5",
        "scan_0003_detector.h5",
        "scan_series.csv",
        "scan_series.json",
    ]
    assert "calibrated 2 of 2 frames" in out
    assert "[1] scan.h5::/entry/data frame 3: " in out
    # the reference is the series' first frame, frame 2 of the stack
    assert "drift measured against frame 0 of the series (scan.h5::/entry/data frame 2)" in out
    assert err == ""


def test_a_selection_that_picks_no_frame_is_refused(stack, tmp_path):
    # it ran, calibrated nothing, wrote an empty table and exited 0
    with pytest.raises(
        CcdgridError, match=r"'7:9' picks no frame of .*scan\.h5::/entry/data \(4 f"
    ):
        calibrate_series(f"{stack}::/entry/data", frames="7:9", output=tmp_path, progress=False)
    assert os.listdir(tmp_path) == []
    # a slice that runs past the end is cut there, as Python's are
    res = calibrate_series(
        f"{stack}::/entry/data", frames="2:9", output=tmp_path, workers=1, progress=False
    )
    assert [f.frame for f in res.frames] == [2, 3]


def test_cli_series_with_a_bad_frame_exits_1_in_one_line(capsys, stack, tmp_path):
    code = main(
        [
            "calibrate",
            f"{stack}::/entry/data",
            "--frames",
            "0,1",
            "--pitch",
            "5mm",
            "-o",
            str(tmp_path / "det_{index}.h5"),
            "--table",
            str(tmp_path / "t.csv"),
            "--workers",
            "1",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 1
    assert sorted(os.listdir(tmp_path)) == ["det_0.h5", "t.csv", "t.json"]
    lines = err.strip().splitlines()
    assert lines[0].startswith("[1] scan.h5::/entry/data frame 1: FAILED: ")
    assert lines[-1].startswith("ccdgrid: error: 1 of 2 frames failed (first: scan.h5")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--warm"], "--warm is for a series"),
        (["--workers", "2"], "--workers is for a series"),
        (["--frame", "0", "--frames", "0:2"], "either --frame N or --frames SEL"),
        (["--frames", "0:2", "--report", "r.png"], "--report draws the figure of one"),
        (["--combine", "--warm"], "--combine makes one calibration: --warm"),
        (["--frames", "x"], "bad frame selection 'x'"),
        (["--workers", "0"], "must be at least 1"),
    ],
)
def test_cli_usage_errors(capsys, stack, extra, message):
    with pytest.raises(SystemExit) as stop:
        main(["calibrate", f"{stack}::/entry/data", "--pitch", "5mm", *extra])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_combine_writes_one_detector_file(capsys, stack, tmp_path):
    output = tmp_path / "plate.h5"
    source = f"{stack}::/entry/data"
    code = main(
        ["calibrate", source, "--frames", "0,2", "--combine", "--pitch", "5mm", "-o", str(output)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert os.listdir(tmp_path) == ["plate.h5"]
    assert detector_factory(str(output)).shape == (SIZE, SIZE)
    assert "combined 2 plate positions" in out


def test_cli_combine_needs_two_images(capsys, stack, tmp_path):
    output = tmp_path / "plate.h5"
    source = f"{stack}::/entry/data"
    code = main(
        ["calibrate", source, "--frame", "0", "--combine", "--pitch", "5mm", "-o", str(output)]
    )
    assert code == 1
    assert capsys.readouterr().err == (
        "ccdgrid: error: --combine needs at least two images (or frames) of the plate\n"
    )
    assert os.listdir(tmp_path) == []


# -- warnings of frames calibrated in threads --------------------------------------------


def test_each_thread_collects_its_own_notes():
    from ccdgrid._notes import collected, warn

    inside, issued, notes = threading.Event(), threading.Event(), []

    def worker():
        with collected() as mine:
            inside.set()
            assert issued.wait(60)
            warn("a note of the worker thread")
        notes.extend(mine)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(60)
    # the main thread's warning is issued as usual while the worker collects
    with pytest.warns(UserWarning, match="the main thread's") as record:
        warn("the main thread's warning")
    issued.set()
    thread.join()
    assert [str(w.message) for w in record] == ["the main thread's warning"]
    assert [note.message for note in notes] == ["a note of the worker thread"]
    assert [note.category for note in notes] == [UserWarning]


def test_worker_threads_keep_their_frames_notes_and_the_warning_state(stack, monkeypatch):
    # two worker threads: each frame's note lands in its own row, and the
    # process's warning filters are as they were (catch_warnings around each
    # frame swapped them for the whole process)
    from ccdgrid import pipeline

    original = pipeline._calibrate_polarity

    def noting(image, polarity, read, options):
        cal, notes = original(image, polarity, read, options)
        return cal, [*notes, f"a note on the frame with mean {np.mean(image):.6f}"]

    monkeypatch.setattr(pipeline, "_calibrate_polarity", noting)
    filters, show = list(warnings.filters), warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note issued as a warning would fail the frame
        res = calibrate_series(
            f"{stack}::/entry/data", frames="0,2,3,0,2", pitch=5e-3, workers=2,
            executor="thread", progress=False,
        )  # fmt: skip
    assert warnings.filters == filters
    assert warnings.showwarning is show
    assert res.ok
    with h5py.File(stack) as h5:
        means = [np.mean(h5["/entry/data"][k]) for k in (0, 2, 3, 0, 2)]
    for f, mean in zip(res.frames, means, strict=True):
        assert f.note == f"a note on the frame with mean {mean:.6f}"
