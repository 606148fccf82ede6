"""End to end: ``ccdgrid.calibrate`` + ``save`` against the seed tutorial's pipeline.

Each benchmark skips (``NotImplementedError`` in ``setup``, asv's skip
signal) while what it measures is not importable. Images come from
``ccdgrid.synthetic.grid_image`` (FReLoN-like defaults, seed 0) or, until it
exists, the stand-in in ``benchmarks/_measure.py``; they are generated once
per run by the module-level ``setup_cache`` and stored as ``.npy`` files in
asv's cache directory. ``peakmem_*`` report the process's peak RSS, which
includes the image and imports: ``peakmem_reference`` shows that part alone.
"""

import os
import tempfile

# benchmarks/ is on sys.path: the package's __init__ put it there
import _measure
import numpy as np
from tutorial_pipeline import tutorial_pipeline

__all__ = ["TimeCalibrate", "TimeFindHoles", "TimeSave", "TimeTutorial", "setup_cache"]

SIZES = [1024, 2048, 4096]
PITCH = 5e-3


def setup_cache():
    """Generate one grid image per size; return ``{size: {"path", "threshold"}}``."""
    cache = {}
    for size in SIZES:
        grid, _source = _measure.grid_image(size, seed=0)
        path = os.path.abspath(f"grid_{size}.npy")
        np.save(path, grid.image)
        cache[size] = {"path": path, "threshold": _measure.by_eye_threshold(grid.image)}
    return cache


setup_cache.timeout = 900


def _calibrate():
    try:
        from ccdgrid import calibrate
    except ImportError as exc:
        raise NotImplementedError(f"ccdgrid.calibrate not available: {exc}") from exc
    return calibrate


class _Pipeline:
    params = SIZES
    param_names = ("size",)
    timeout = 900
    # one call per sample; up to 3 samples or 60 s, whichever comes first
    number = 1
    repeat = (1, 3, 60.0)
    rounds = 1
    warmup_time = 0


class TimeCalibrate(_Pipeline):
    """``ccdgrid.calibrate(image, pitch=5e-3)``: image to maps + mask, no file."""

    def setup(self, cache, size):
        self.calibrate = _calibrate()
        self.image = np.load(cache[size]["path"])

    def time_calibrate(self, cache, size):
        self.calibrate(self.image, pitch=PITCH)

    def peakmem_calibrate(self, cache, size):
        self.calibrate(self.image, pitch=PITCH)

    def peakmem_reference(self, cache, size):
        """Imports + image only: subtract from ``peakmem_calibrate``."""


class TimeFindHoles(_Pipeline):
    """``ccdgrid.find_holes(image)``: stage 1 alone (scale guess, binned search, profile fits).

    ``track_*`` report the stage's own split (seconds, from
    ``HoleSearch.timings``) of one call: which part a change moved.
    """

    def setup(self, cache, size):
        try:
            from ccdgrid import find_holes
        except ImportError as exc:
            raise NotImplementedError(f"ccdgrid.find_holes not available: {exc}") from exc
        self.find_holes = find_holes
        self.image = np.load(cache[size]["path"])

    def time_find_holes(self, cache, size):
        self.find_holes(self.image)

    def track_fit_seconds(self, cache, size):
        return self.find_holes(self.image).timings["fit"]

    def track_search_seconds(self, cache, size):
        """Scale guess, smoothing, segmentation and classification of the binned image."""
        t = self.find_holes(self.image).timings
        return sum(t[k] for k in ("scale", "smooth", "segment", "classify"))

    track_fit_seconds.unit = "seconds"
    track_search_seconds.unit = "seconds"


class TimeSave(_Pipeline):
    """``Calibration.save(path)``: the detector-file write alone."""

    def setup(self, cache, size):
        self.calibration = _calibrate()(np.load(cache[size]["path"]), pitch=PITCH)
        fd, self.path = tempfile.mkstemp(suffix=".h5")
        os.close(fd)
        try:  # one trial write: skip, rather than fail, while the writer is missing
            self.calibration.save(self.path)
        except ImportError as exc:
            raise NotImplementedError(f"Calibration.save not available: {exc}") from exc
        os.remove(self.path)

    def teardown(self, cache, size):
        path = getattr(self, "path", None)  # unset when setup skipped
        if path is not None and os.path.exists(path):
            os.remove(path)

    def time_save(self, cache, size):
        self.calibration.save(self.path)


class TimeTutorial(_Pipeline):
    """The seed tutorial's pipeline (``benchmarks/tutorial_pipeline.py``), file write included."""

    def setup(self, cache, size):
        try:
            import pyFAI.ext.watershed  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError(f"pyFAI not available: {exc}") from exc
        self.image = np.load(cache[size]["path"])
        self.threshold = cache[size]["threshold"]
        fd, self.path = tempfile.mkstemp(suffix=".h5")
        os.close(fd)

    def teardown(self, cache, size):
        path = getattr(self, "path", None)  # unset when setup skipped
        if path is not None and os.path.exists(path):
            os.remove(path)

    def time_tutorial(self, cache, size):
        tutorial_pipeline(self.image, threshold=self.threshold, path=self.path)

    def peakmem_tutorial(self, cache, size):
        tutorial_pipeline(self.image, threshold=self.threshold, path=self.path)
