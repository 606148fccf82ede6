"""The work of one frame of a series, in a worker; a worker process's start-up.

A worker (:class:`_Worker`) reads its frame itself (a path and a frame number
travel to it, never an image), calibrates it with
:func:`ccdgrid.pipeline.calibrate`, writes its detector file, measures its
drift against the series' reference and returns one small
:class:`~ccdgrid.series_table.FrameResult` (with the drifts of its earlier
frames that had to wait for the reference); it never raises for a bad frame.
It runs in a worker process of the pool (:func:`_init_process` makes one per
process, :func:`_process_run` calls it) or in a worker thread of the calling
process (:func:`_init_thread`). Every worker runs BLAS and OpenMP on one
thread: :data:`THREAD_ENV` set before a spawned process loads them, or
threadpoolctl (:func:`_thread_limits`) once they are loaded.

The callables sent to worker processes live here, importable by their module
path in a spawned process; :mod:`ccdgrid._series_pool` starts the processes
and :mod:`ccdgrid.series` schedules the frames.
"""

import contextlib
import json
import math
import os
import pathlib
import signal
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np

from ._notes import collected
from .errors import CcdgridError
from .series_frames import _file_of
from .series_table import FrameResult

__all__ = [
    "THREAD_ENV",
    "_Config",
    "_Worker",
    "_can_limit_threads",
    "_fill_drift",
    "_init_process",
    "_init_thread",
    "_join",
    "_new_row",
    "_process_drift",
    "_process_ready",
    "_process_run",
    "_thread_limits",
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


# -- the work of one frame (runs in a worker) --------------------------------------

# calibrations a worker keeps for a drift measured later (see _Worker._unmeasured;
# 58 MB each at 2048²): usually one, a frame done while the reference was still
# being calibrated; the drifts of any more are read back from their files
_KEEP_UNMEASURED = 2


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
    :meth:`ccdgrid._series_pool._Pool.lend_idle_cores`. ``digests``: the
    series' :class:`ccdgrid.series._Digests` (in the calling process) or
    its :class:`ccdgrid.series._DigestTable` (in a worker process), from
    which a worker that started a frame before its file was hashed reads
    the digest when it writes the detector file.
    """

    def __init__(self, config, shared=False, spare=None, digests=None):
        self.config = config
        self.shared = shared
        self.spare = spare
        self.digests = digests  # _Digests or _DigestTable of the series, or None
        self._references = {}
        # the detector file this worker wrote last and its calibration: the
        # series' reference is usually a frame this worker has just calibrated,
        # and reading it back (~0.08 s at 2048²) made that worker's next frame
        # the slowest of the series
        self._last_saved = (None, None)
        self._mask = None
        # frames done before the series' reference was known: their drift is
        # measured from these calibrations once it is (reading each back from
        # its file cost ~0.05 s at 2048², a twentieth of a 2-worker series)
        self._unmeasured = {}  # series index -> Calibration
        self._unmeasured_lock = threading.Lock()  # threads may share this worker

    def _reference(self, path):
        if path not in self._references:
            saved, cal = self._last_saved
            if saved == path:
                self._references[path] = cal
            else:
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

        Returns
        -------
        row : FrameResult
        late : list of (int, FrameResult)
            The drift rows (see :meth:`drift`) of earlier frames of this
            worker that were done before the reference was known, by series
            index; measured now if it is known now, else empty.
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
        return row, self._late_drifts(reference, reference_index, marker)

    def _late_drifts(self, reference, reference_index, marker):
        """Drift rows of the frames kept in ``_unmeasured``, once the reference is known."""
        if not self._unmeasured:
            return []
        if reference is None:
            reference, reference_index = _read_marker(marker)
            if reference is None:
                return []
        with self._unmeasured_lock:
            waiting, self._unmeasured = self._unmeasured, {}
        late = []
        for index, cal in sorted(waiting.items()):
            if index == reference_index:
                continue  # the reference itself: its drift is zero
            try:
                late.append((index, self._drift_row(reference, reference_index, cal)))
            except Exception as exc:  # a bug on one frame must not stop the series
                row = FrameResult(index=-1, file="")
                row.note = f"drift not measured: unexpected {type(exc).__name__}: {exc}"
                late.append((index, row))
        return late

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
        # ccdgrid's own warnings, collected in this thread only: several
        # worker threads may calibrate at once (see ccdgrid._notes)
        with collected() as notes:
            cal = calibrate(
                image,
                pitch=self.config.pitch,
                mask=mask,
                source=source,
                previous=previous,
                **self.config.options,
            )
        row.note = "; ".join(dict.fromkeys(note.message for note in notes))
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
        if reference is None:
            with self._unmeasured_lock:
                if len(self._unmeasured) < _KEEP_UNMEASURED:
                    # else its drift is measured from its file at the end
                    self._unmeasured[spec.index] = cal
        else:
            drift = getattr(cal, "drift", None)
            try:
                if drift is None or not drift.warm:
                    drift = _aligned_drift(self._reference(reference), cal)
            except CcdgridError as exc:  # the calibration itself is good
                row.note = _join(row.note, f"drift not measured: {exc}")
            else:
                _fill_drift(row, drift, reference_index)
        if spec.output:
            self._last_saved = (spec.output, cal)
        return borrowed

    def drift(self, frame_file, reference, reference_index):
        """Drift columns of a frame already written to ``frame_file``."""
        return self._drift_row(reference, reference_index, frame_file)

    def _drift_row(self, reference, reference_index, frame):
        """A row holding only the drift of ``frame`` (a calibration or its file)."""
        from .detector_file import load

        row = FrameResult(index=-1, file="")
        try:
            if isinstance(frame, (str, os.PathLike)):
                frame = load(frame)
            drift = _aligned_drift(self._reference(reference), frame)
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


def _sha256(spec):
    """SHA-256 of a spec's file, hashed now (raises the OSError a reader would)."""
    from .io import sha256_file

    return sha256_file(_file_of(spec))


def _join(*notes):
    return "; ".join(n for n in notes if n)


# -- a worker process: its start-up --------------------------------------------------

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


def _init_process(config, spare=None, method="spawn", digests=None):
    """Initialiser of a worker process: its :class:`_Worker` and the pipeline's modules.

    ``method``: how the process was started (see
    :func:`ccdgrid._series_pool._start_method`); ``digests``: the series'
    :class:`ccdgrid.series._DigestTable`, or None.
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
    _PROCESS_WORKER = _Worker(config, spare=spare, digests=digests)
    _STARTUP.update(ready=time.time(), startup_cpu=time.process_time())


def _process_run(*args):
    return _PROCESS_WORKER.run(*args)


def _process_drift(frame_file, reference, reference_index):
    return _PROCESS_WORKER.drift(frame_file, reference, reference_index)


def _process_ready():
    """Run once per worker at start: its pid, thread limits and start-up times."""
    return os.getpid(), {name: os.environ.get(name) for name in THREAD_ENV}, dict(_STARTUP)
