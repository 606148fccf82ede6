"""The table of a series: a :class:`FrameResult` per frame, the :class:`SeriesResult`.

What :func:`ccdgrid.series.calibrate_series` returns (both names are
importable from :mod:`ccdgrid.series` and :mod:`ccdgrid`), and its CSV and
JSON files: one row per frame, columns :data:`COLUMNS`. A float is NaN and a
count -1 when not measured; an empty CSV cell, a JSON null. A file is
written beside its target and renamed: never half-written.
"""

import csv
import dataclasses
import io as _stdio
import json
import math
import os
import pathlib
from dataclasses import dataclass, field

import numpy as np

from .errors import CcdgridError

__all__ = ["COLUMNS", "FrameResult", "SeriesResult"]


@dataclass
class FrameResult:
    """One frame of a series: where it came from, what its calibration gave.

    Floats are NaN and counts -1 when not measured (a failed frame, no
    cross-validation, no drift reference).

    Attributes
    ----------
    index : int
        Position in the series (0-based).
    file : str
        Image file (absolute path), or ``"<array N>"`` for an in-memory array.
    dataset : str
        HDF5 dataset path ("" for other files).
    frame : int
        Frame within the file or dataset; -1 for a single-image file.
    status : {"ok", "failed"}
    error : str
        Why the frame failed ("" if it did not).
    note : str
        A warning worth keeping (e.g. why a warm start fell back to a cold one).
    output : str
        Detector file written ("" if none).
    holes_found, holes_rejected, holes_indexed : int
        Hole centres found, candidates rejected by the hole search, holes
        given a lattice index and used in the grid fit.
    pitch_px : float, px
        Mean length of the two fitted lattice vectors.
    rotation_deg : float, degree
        Angle of the lattice's ``j`` direction (about +x) from +x towards +y.
    pixel1_um, pixel2_um : float, µm
        Pixel size along y and x for the plate's pitch.
    cv_rms_px, cv_max_px : float, px
        Cross-validated map error at the holes (the calibration's accuracy
        figure, an upper bound: it includes each hole's centre error).
    cv_rms_pitch, cv_max_pitch : float
        The same in pitches.
    fit_residual_px : float, px
        RMS residual of the smoothed maps at the holes they were fitted to.
    warm : bool
        True if the frame was warm-started from the reference.
    reference_index : int
        Series index of the drift reference; -1 for a reference file or none.
    drift_shift_y_px, drift_shift_x_px : float, px
        Move of the fitted grid at the image centre since the reference.
    drift_rotation_mdeg : float, millidegree
        Rotation of the grid since the reference, from +x towards +y.
    drift_scale_ppm : float, ppm
        Change of the grid's scale since the reference.
    drift_max_change_dx_px, drift_max_change_dy_px : float, px
        Largest change of the ``dx``/``dy`` corner maps over the pixels valid
        in both calibrations.
    drift_matched : int
        Holes matched to the reference's.
    seconds : float, s
        Wall time of the frame in its worker (read, calibrate, write).
    traceback : str
        Traceback of an unexpected error (not a column of the table).
    timing : dict
        Where and when the frame ran (not a column of the table): ``worker``
        (str, ``"PID"`` for a worker process, ``"PID:THREAD"`` for a worker
        thread of the calling process), ``start`` and ``end`` (s, wall clock,
        :func:`time.time`, comparable across the processes of one machine)
        and ``cpu`` (s of CPU time of the worker's process while it ran the
        frame; with ``executor="thread"``, of its thread only, without the
        detector file's compression thread) and ``borrowed`` (int: cores lent
        by idle workers at the end of the series to compress its detector
        file, 0 or 1). Empty for a frame that never reached a worker.
    """

    index: int
    file: str
    dataset: str = ""
    frame: int = -1
    status: str = "failed"
    error: str = ""
    note: str = ""
    output: str = ""
    holes_found: int = -1
    holes_rejected: int = -1
    holes_indexed: int = -1
    pitch_px: float = math.nan
    rotation_deg: float = math.nan
    pixel1_um: float = math.nan
    pixel2_um: float = math.nan
    cv_rms_px: float = math.nan
    cv_max_px: float = math.nan
    cv_rms_pitch: float = math.nan
    cv_max_pitch: float = math.nan
    fit_residual_px: float = math.nan
    warm: bool = False
    reference_index: int = -1
    drift_shift_y_px: float = math.nan
    drift_shift_x_px: float = math.nan
    drift_rotation_mdeg: float = math.nan
    drift_scale_ppm: float = math.nan
    drift_max_change_dx_px: float = math.nan
    drift_max_change_dy_px: float = math.nan
    drift_matched: int = -1
    seconds: float = math.nan
    traceback: str = field(default="", repr=False)
    timing: dict = field(default_factory=dict, repr=False)

    @property
    def ok(self):
        """True if the frame was calibrated."""
        return self.status == "ok"

    @property
    def label(self):
        """The frame as a user names it: ``name.h5::/dataset frame 3`` (file name only)."""
        text = os.path.basename(self.file) + (f"::{self.dataset}" if self.dataset else "")
        return text + (f" frame {self.frame}" if self.frame >= 0 else "")

    def row(self):
        """The table columns (:data:`COLUMNS`) as a dict."""
        return {name: getattr(self, name) for name in COLUMNS}


#: Columns of the table, in order (every :class:`FrameResult` field but the
#: traceback and the timing).
COLUMNS = tuple(
    f.name for f in dataclasses.fields(FrameResult) if f.name not in ("traceback", "timing")
)
_DRIFT_COLUMNS = (
    "drift_shift_y_px",
    "drift_shift_x_px",
    "drift_rotation_mdeg",
    "drift_scale_ppm",
    "drift_max_change_dx_px",
    "drift_max_change_dy_px",
    "drift_matched",
)


@dataclass
class SeriesResult:
    """The outcome of :func:`~ccdgrid.series.calibrate_series`.

    Attributes
    ----------
    frames : list of FrameResult
        One per frame, in series order.
    reference : str
        What the drift is measured against: ``"frame N"`` (series index), a
        detector file path, or ``""`` when no frame calibrated.
    workers : int
        Workers used.
    executor : {"process", "thread", "serial"}
        How the frames were run ("serial": in the calling process).
    seconds : float, s
        Wall time of the whole series (pool start-up included).
    tables : tuple of pathlib.Path
        The CSV and JSON files written (empty if none).
    timeline : dict
        When the run's parts started, for profiling (times in s, wall clock,
        :func:`time.time`): ``start`` (the call), ``pool_started`` (the
        workers were asked to start), ``start_method`` (str: ``"fork"``, or
        ``"spawn (why not fork)"``; "" without worker processes) and
        ``processes``, one dict per worker process that started: ``pid``,
        ``method`` ("fork" or "spawn"), ``entered`` (its initialiser began:
        the interpreter is up), ``ready`` (it has imported the pipeline),
        ``startup_cpu`` (s of CPU time it had used by then; a forked process
        counts from the fork). With the frames' :attr:`FrameResult.timing`,
        it tells where a parallel run lost time.
    """

    frames: list
    reference: str = ""
    workers: int = 1
    executor: str = "serial"
    seconds: float = math.nan
    tables: tuple = ()
    timeline: dict = field(default_factory=dict, repr=False)

    @property
    def ok(self):
        """True if every frame was calibrated."""
        return all(f.ok for f in self.frames)

    @property
    def failed(self):
        """The frames that failed, in series order."""
        return [f for f in self.frames if not f.ok]

    @property
    def throughput(self):
        """Frames per second of wall time (failed frames included)."""
        return len(self.frames) / self.seconds if self.seconds > 0 else math.nan

    def table(self):
        """The table as a numpy structured array, one record per frame.

        Returns
        -------
        ndarray of shape (n_frames,), structured
            Fields :data:`COLUMNS`: strings as ``U`` (unicode), counts as
            int64, flags as bool, measures as float64 (NaN when not measured).
        """
        dtype = []
        for f in dataclasses.fields(FrameResult):
            if f.name not in COLUMNS:
                continue
            if f.type in ("int", int):
                kind = np.int64
            elif f.type in ("float", float):
                kind = np.float64
            elif f.type in ("bool", bool):
                kind = np.bool_
            else:
                width = max([1] + [len(getattr(r, f.name)) for r in self.frames])
                kind = f"U{width}"
            dtype.append((f.name, kind))
        return np.array([tuple(r.row().values()) for r in self.frames], dtype=dtype)

    def write_csv(self, path):
        """Write the table as CSV (header of :data:`COLUMNS`; empty cell = not measured).

        The file is written beside its target and renamed: never half-written.
        """
        buffer = _stdio.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in self.frames:
            writer.writerow(_csv_cell(v) for v in r.row().values())
        return _write_text(path, buffer.getvalue())

    def write_json(self, path):
        """Write the table and the run's settings as JSON (null = not measured)."""
        from . import __version__

        doc = {
            "ccdgrid_version": __version__,
            "reference": self.reference,
            "workers": self.workers,
            "executor": self.executor,
            "seconds": _json_value(self.seconds),
            "n_frames": len(self.frames),
            "n_failed": len(self.failed),
            "units": _UNITS,
            "frames": [{k: _json_value(v) for k, v in r.row().items()} for r in self.frames],
        }
        return _write_text(path, json.dumps(doc, indent=1) + "\n")

    def summary(self):
        """One line for humans."""
        n, bad = len(self.frames), len(self.failed)
        text = (
            f"calibrated {n - bad} of {n} frames in {self.seconds:.1f} s "
            f"({self.throughput:.2f} frames/s, {self.workers} {self.executor} worker"
            f"{'s' if self.workers > 1 else ''})"
        )
        if bad:
            shown = ", ".join(str(f.index) for f in self.failed[:10]) + (
                ", ..." if bad > 10 else ""
            )
            text += f"; {bad} failed ({'indices' if bad > 1 else 'index'} {shown})"
        return text


_UNITS = {
    "pitch_px": "px",
    "rotation_deg": "degree, lattice j axis from +x towards +y",
    "pixel1_um": "µm (y)",
    "pixel2_um": "µm (x)",
    "cv_rms_px": "px",
    "cv_max_px": "px",
    "cv_rms_pitch": "pitch",
    "cv_max_pitch": "pitch",
    "fit_residual_px": "px",
    "drift_shift_y_px": "px, grid move at the image centre",
    "drift_shift_x_px": "px, grid move at the image centre",
    "drift_rotation_mdeg": "millidegree, from +x towards +y",
    "drift_scale_ppm": "ppm",
    "drift_max_change_dx_px": "px",
    "drift_max_change_dy_px": "px",
    "seconds": "s",
    "frame": "-1: single-image file",
}


def _csv_cell(value):
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_text(path, text):
    target = pathlib.Path(path).expanduser().absolute()
    if not target.parent.is_dir():
        raise CcdgridError(f"cannot write {target}: directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
