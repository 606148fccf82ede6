"""Measurement helpers shared by ``compare.py`` and the asv suite.

* Test images: ``ccdgrid.synthetic.grid_image`` when it is importable, else
  :func:`fallback_grid_image`, a small stand-in kept for development.
* Accuracy: ``ccdgrid.synthetic.dense_residual`` when importable, else
  :func:`fallback_dense_residual` (same definition).
* Kernel inputs shared by ``compare.py`` and the asv suite:
  :func:`tutorial_seeds` (peaks to refine, taken the tutorial's way) and
  :func:`lattice_points` (hole centres of a distorted grid).
* Timing (:func:`median_time`; :func:`side_by_side` and
  :func:`print_side_by_side` for kernels against their rivals in
  interleaved rounds) and machine description (:func:`machine_info`).
* Peak memory: run as a script, this module is the worker ``compare.py``
  starts in a fresh process for every end-to-end measurement (see
  :func:`_worker`). It reports the peak resident set size *above the
  process's resident size after imports and image load*: the kernel's
  high-water mark (VmHWM) is reset through ``/proc/self/clear_refs`` right
  before the pipeline starts, so transient memory from imports does not hide
  in the baseline. Without ``clear_refs`` it falls back to ``ru_maxrss``
  differences, which are right only when nothing before the baseline peaked
  higher than the baseline itself.

Conventions as in ccdgrid: ``(y, x)`` index coordinates, pixel centre
``(i, j)`` at ``(i, j)``; corner maps ``(ny + 1, nx + 1)`` with corner
``(i, j)`` at ``(i - 0.5, j - 0.5)``; displacement ``d`` = true - nominal, px.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "FallbackField",
    "FallbackGrid",
    "by_eye_threshold",
    "dense_residual",
    "fallback_dense_residual",
    "fallback_grid_image",
    "grid_image",
    "lattice_points",
    "machine_info",
    "median_time",
    "print_side_by_side",
    "side_by_side",
    "tutorial_seeds",
]


# -- images ---------------------------------------------------------------------------------


class FallbackField:
    """Smooth random distortion field (development stand-in for ccdgrid.synthetic).

    ``d(y, x)`` is a random polynomial of degree <= 3 in the normalised
    coordinates plus one long-wavelength sine per component, scaled so that
    the largest ``|d|`` on the image is ``peak_px``.

    Parameters
    ----------
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.
    peak_px : float, px
        Largest displacement magnitude over the image.
    rng : numpy.random.Generator
    """

    def __init__(self, shape, peak_px, rng):
        self.shape = tuple(shape)
        self._coef = rng.normal(size=(2, 4, 4)) / (1 + np.add.outer(np.arange(4), np.arange(4)))
        self._wave = rng.uniform(0.5, 1.5, size=(2, 2)), rng.uniform(0, 2 * np.pi, size=(2, 2))
        self._scale = 1.0
        ny, nx = self.shape
        yy, xx = np.mgrid[0 : ny - 1 : 65j, 0 : nx - 1 : 65j]
        d = self.displacement(np.stack([yy.ravel(), xx.ravel()], axis=1))
        self._scale = peak_px / max(np.sqrt((d**2).sum(axis=1)).max(), 1e-12)

    def displacement(self, points):
        """``(dy, dx)``, ``(N, 2)`` float64 px, at ``(y, x)`` points ``(N, 2)``."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        ny, nx = self.shape
        u = 2 * pts[:, 0] / max(ny - 1, 1) - 1
        v = 2 * pts[:, 1] / max(nx - 1, 1) - 1
        out = np.empty_like(pts)
        freq, phase = self._wave
        for c in range(2):
            out[:, c] = np.polynomial.polynomial.polyval2d(u, v, self._coef[c])
            out[:, c] += 0.3 * np.sin(
                freq[c, 0] * np.pi * u + freq[c, 1] * np.pi * v + phase[c, 0]
            )
        return out * self._scale

    def corner_maps(self, shape):
        """``(dy, dx)`` corner maps, each ``(ny + 1, nx + 1)`` float64 px."""
        ny, nx = shape
        cy, cx = np.mgrid[0 : ny + 1, 0 : nx + 1].astype(np.float64) - 0.5
        d = self.displacement(np.stack([cy.ravel(), cx.ravel()], axis=1))
        return d[:, 0].reshape(ny + 1, nx + 1), d[:, 1].reshape(ny + 1, nx + 1)


@dataclass
class FallbackGrid:
    """Image and ground truth from :func:`fallback_grid_image` (a subset of SyntheticGrid).

    Attributes
    ----------
    image : ndarray of shape (ny, nx), uint16
    truth : FallbackField
    holes : ndarray of shape (M, 2), float64, px
        True ``(y, x)`` of every hole drawn.
    visible : ndarray of shape (M,), bool
        Hole fully inside the image with a margin.
    taper_mask : ndarray of shape (ny, nx), bool
        All True: the stand-in has no taper.
    pitch_px : float
    """

    image: np.ndarray
    truth: FallbackField
    holes: np.ndarray
    visible: np.ndarray
    taper_mask: np.ndarray
    pitch_px: float


def fallback_grid_image(
    shape=(2048, 2048),
    *,
    pitch_px=98.0,
    hole_diameter_px=10.5,
    rotation_deg=0.5,
    distortion_px=1.5,
    psf_sigma=1.0,
    signal=3000.0,
    background=50.0,
    seed=0,
):
    """Grid of anti-aliased bright discs under a smooth distortion (development stand-in).

    Holes of diameter ``hole_diameter_px`` sit at ``pitch_px`` spacing on a
    lattice rotated by ``rotation_deg``; the true position ``p`` of a hole of
    ideal position ``q`` solves ``p + d(p) = q``. Each disc's pixel coverage is
    integrated on a 5x5 sub-pixel grid, blurred by a Gaussian PSF, scaled to
    ``background + signal * coverage`` and given Poisson-like Gaussian noise.

    Returns
    -------
    FallbackGrid
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    truth = FallbackField(shape, distortion_px, rng)
    theta = np.deg2rad(rotation_deg)
    a_x = pitch_px * np.array([np.sin(theta), np.cos(theta)])  # (y, x) step along ~x
    a_y = pitch_px * np.array([np.cos(theta), -np.sin(theta)])  # (y, x) step along ~y
    centre = np.array([(ny - 1) / 2, (nx - 1) / 2]) + rng.uniform(-0.5, 0.5, 2) * pitch_px
    n = int(np.ceil(max(ny, nx) / pitch_px)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    ideal = centre + i.reshape(-1, 1) * a_y + j.reshape(-1, 1) * a_x
    holes = ideal.copy()
    for _ in range(20):
        holes = ideal - truth.displacement(holes)
    radius = hole_diameter_px / 2
    margin = radius + 3 * psf_sigma + 2
    inside = (holes >= -radius).all(axis=1) & (holes < np.array([ny, nx]) + radius).all(axis=1)
    holes = holes[inside]
    visible = (holes >= margin).all(axis=1) & (holes <= np.array([ny - 1, nx - 1]) - margin).all(
        axis=1
    )

    coverage = np.zeros(shape, dtype=np.float64)
    half = int(np.ceil(radius)) + 1
    sub = (np.arange(5) + 0.5) / 5 - 0.5
    off = np.arange(-half, half + 1)
    base = np.round(holes).astype(np.int64)
    # pixel (py, px) of each hole's window, sub-sample (sy, sx): axes (hole, py, px, sy, sx)
    py = base[:, 0, None] + off
    px = base[:, 1, None] + off
    ry = (
        py[:, :, None, None, None]
        + sub[None, None, None, :, None]
        - holes[:, 0, None, None, None, None]
    )
    rx = (
        px[:, None, :, None, None]
        + sub[None, None, None, None, :]
        - holes[:, 1, None, None, None, None]
    )
    frac = ((ry**2 + rx**2) <= radius**2).mean(axis=(3, 4))
    yy = np.broadcast_to(py[:, :, None], frac.shape)
    xx = np.broadcast_to(px[:, None, :], frac.shape)
    ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    np.add.at(coverage, (yy[ok], xx[ok]), frac[ok])
    expected = background + signal * ndimage.gaussian_filter(coverage, psf_sigma)
    noisy = expected + rng.normal(size=shape) * np.sqrt(expected)
    image = np.clip(np.round(noisy), 0, 65535).astype(np.uint16)
    return FallbackGrid(
        image=image,
        truth=truth,
        holes=holes,
        visible=visible,
        taper_mask=np.ones(shape, dtype=bool),
        pitch_px=float(pitch_px),
    )


def grid_image(size, seed=0):
    """A ``size`` x ``size`` grid image with its truth, and the name of its generator.

    Uses ``ccdgrid.synthetic.grid_image`` (defaults: FReLoN-like) when it
    exists, else :func:`fallback_grid_image`.

    Returns
    -------
    grid : SyntheticGrid or FallbackGrid
    source : str
    """
    try:
        from ccdgrid.synthetic import grid_image as synthetic_grid_image
    except ImportError:
        return fallback_grid_image((size, size), seed=seed), "benchmarks/_measure.py fallback"
    return synthetic_grid_image((size, size), seed=seed), "ccdgrid.synthetic.grid_image"


def lattice_points(n_points, seed=0):
    """Hole centres of a distorted grid and parameters near its own: the pipeline's kind of points.

    A ~13 px pitch lattice fills a 4096² detector with ~100,000 holes; a
    smooth distortion of up to ~3 px and 0.05 px of noise move them off it.

    Returns
    -------
    params : ndarray of shape (6,)
        ``(Ox, Oy, Xx, Yx, Xy, Yy)`` a little off the true grid, as during a fit.
    points : ndarray of shape (n_points, 2), float64
        **(x, y)** px, the order of :func:`ccdgrid.grid_error`.
    """
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_points)))
    j, i = np.meshgrid(np.arange(side), np.arange(side))
    holes = np.stack([j.ravel(), i.ravel()], axis=1)[:n_points].astype(np.float64)
    true = np.array([20.3, 17.9, 12.9, 0.11, -0.09, 12.95])
    pts = holes @ true[2:].reshape(2, 2).T + true[:2]
    pts += 3.0 * np.sin(pts[:, ::-1] / 900.0) + rng.normal(0, 0.05, pts.shape)
    return true + np.array([0.4, -0.3, 0.002, 0.001, -0.001, 0.003]), pts


def tutorial_seeds(n_seeds, seed=0):
    """``(n_seeds, 2)`` int64 seeds taken the tutorial's way, and the image they refine on.

    The tutorial refines the peak pixel of every watershed region of the
    11x11-disc-convolved image with more than 97 pixels and a maximum above
    its threshold. One 2048² image at the usual 98 px pitch has ~400 such
    peaks; a 19 px pitch gives ~10,000 distinct ones on the same size, so no
    peak is refined twice. They come in random order, as the tutorial's
    ``set(iw.regions.values())`` gives them.
    """
    from scipy import signal
    from tutorial_pipeline import disc_kernel

    from ccdgrid import merge_singletons, segment

    try:
        from ccdgrid.synthetic import grid_image
    except ImportError:
        grid = fallback_grid_image((2048, 2048), pitch_px=19.0, seed=seed)
    else:
        grid = grid_image((2048, 2048), pitch_px=19.0, seed=seed)
    cnv = np.ascontiguousarray(signal.convolve2d(grid.image, disc_kernel(), "same"), np.float32)
    seg = merge_singletons(segment(cnv), cnv)
    keep = (seg.size > 97) & (seg.maxi > by_eye_threshold(grid.image))
    peaks = np.stack(np.divmod(seg.peak[keep], cnv.shape[1]), axis=1)
    rng = np.random.default_rng(seed)
    peaks = peaks[rng.permutation(len(peaks))]
    if len(peaks) < n_seeds:  # only with the small fallback image
        peaks = peaks[np.arange(n_seeds) % len(peaks)]
    return cnv, np.ascontiguousarray(peaks[:n_seeds], dtype=np.int64)


def on_pages(image, advice):
    """A copy of ``image`` in a private anonymous mapping advised before it is touched.

    ``advice``: ``mmap.MADV_HUGEPAGE`` or ``mmap.MADV_NOHUGEPAGE`` (Linux).
    Private: a shared mapping is shared memory, which the kernel does not
    back with 2 MiB pages. The copy starts on a 2 MiB boundary.
    """
    import mmap

    huge = 1 << 21
    buf = mmap.mmap(-1, image.nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(advice)
    raw = np.frombuffer(buf, dtype=np.uint8)
    start = -raw.ctypes.data % huge
    copy = raw[start : start + image.nbytes].view(image.dtype).reshape(image.shape)
    copy[...] = image
    return copy


def huge_page_bytes(array):
    """Bytes of the mapping that holds ``array`` backed by 2 MiB pages (``/proc/self/smaps``).

    0 where there is no such file or no such mapping.
    """
    address = array.ctypes.data
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def by_eye_threshold(image):
    """Intensity cut for the tutorial pipeline, standing in for its by-eye choice.

    The tutorial reads ``10**3.5`` off a log-scale view of its image: a level
    between the background and the holes. This takes the geometric mean of
    the median (background) and the 99.95th percentile (hole tops; holes
    cover ~1 % of the pixels) of the raw image.

    Parameters
    ----------
    image : ndarray of shape (ny, nx)

    Returns
    -------
    float
    """
    lo, hi = np.percentile(image, [50, 99.95])
    return float(np.sqrt(max(lo, 1.0) * max(hi, 1.0)))


# -- accuracy ------------------------------------------------------------------------------


def fallback_dense_residual(truth, dy, dx, mask=None, *, region=None, n=20000, seed=0):
    """RMS and max error of corner maps against a true field, affine part removed.

    Points are drawn uniformly in pixels with ``mask == 0`` (and ``region``
    True), uniformly inside each pixel; the maps are interpolated bilinearly
    between the corners (corner ``(i, j)`` at ``(i - 0.5, j - 0.5)``, as in
    pyFAI's detector); the least-squares affine fit ``a + b Y + c X`` of each
    component of (recovered - true), ``(Y, X)`` the true positions, is
    removed, since a calibration measures the field against a lattice it
    fits itself (the definition of ``ccdgrid.synthetic.dense_residual``).

    Parameters
    ----------
    truth : object with ``displacement(points) -> (N, 2)``
    dy, dx : ndarray of shape (ny + 1, nx + 1), px
    mask : ndarray of shape (ny, nx) or None
        Non-zero = invalid.
    region : ndarray of shape (ny, nx), bool, or None
    n : int
    seed : int

    Returns
    -------
    rms, max : float, px
        Of the vector residual ``sqrt(ry**2 + rx**2)``.
    """
    dy = np.asarray(dy, dtype=np.float64)
    dx = np.asarray(dx, dtype=np.float64)
    ny, nx = dy.shape[0] - 1, dy.shape[1] - 1
    valid = np.ones((ny, nx), dtype=bool)
    if mask is not None:
        valid &= np.asarray(mask) == 0
    if region is not None:
        valid &= np.asarray(region, dtype=bool)
    flat = np.flatnonzero(valid)
    rng = np.random.default_rng(seed)
    pick = flat[rng.integers(0, flat.size, size=n)]
    iy, ix = np.divmod(pick, nx)
    points = np.stack([iy + rng.uniform(-0.5, 0.5, n), ix + rng.uniform(-0.5, 0.5, n)], axis=1)
    coords = (points + 0.5).T
    recovered = np.stack(
        [ndimage.map_coordinates(m, coords, order=1, mode="nearest") for m in (dy, dx)], axis=1
    )
    true = truth.displacement(points)
    resid = recovered - true
    at = points + true  # an affine map of the true positions, as in ccdgrid.synthetic
    design = np.column_stack([np.ones(n), at - at.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(design, resid, rcond=None)
    resid -= design @ coef
    norm = np.sqrt((resid**2).sum(axis=1))
    return float(np.sqrt((norm**2).mean())), float(norm.max())


def dense_residual(truth, dy, dx, mask=None, *, region=None, n=20000, seed=0):
    """``(rms, max)`` px, through ccdgrid.synthetic.dense_residual when it exists.

    Same arguments as :func:`fallback_dense_residual`.
    """
    try:
        from ccdgrid.synthetic import dense_residual as synthetic_dense_residual
    except ImportError:
        return fallback_dense_residual(truth, dy, dx, mask, region=region, n=n, seed=seed)
    res = synthetic_dense_residual(truth, dy, dx, mask, region=region, n=n, seed=seed)
    if isinstance(res, tuple):
        return float(res[0]), float(res[1])
    return float(res.rms), float(res.max)


# -- timing and machine ------------------------------------------------------------------


def median_time(fn, repeat=3):
    """Median and all wall times (s) of ``repeat`` calls of ``fn()``."""
    times = []
    for _ in range(max(int(repeat), 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def side_by_side(candidates, repeat=7, min_time=0.02):
    """Median wall time per call of each candidate, measured in interleaved rounds.

    Every round calls each candidate in turn, each enough times in a row to
    last about ``min_time`` seconds (counted on a timed warm-up call), so
    that a burst of load on a shared machine falls on all candidates alike
    and sub-millisecond calls are not lost in the timer's noise.

    Parameters
    ----------
    candidates : sequence of (str, callable)
        Names and zero-argument callables.
    repeat : int
        Rounds; the median over rounds is reported.
    min_time : float, s
        Least duration of one candidate's share of a round.

    Returns
    -------
    times : dict
        ``name -> median seconds per call``, in the order given, for the
        candidates that ran.
    failures : dict
        ``name -> exception`` for those that raised (on the warm-up call).
    """
    calls, failures = {}, {}
    for name, fn in candidates:
        try:
            start = time.perf_counter()
            fn()  # warm-up: imports, first-call allocations, the editable rebuild check
            once = time.perf_counter() - start
        except Exception as exc:
            failures[name] = exc
            continue
        calls[name] = max(1, int(min_time / max(once, 1e-7)))
    samples = {name: [] for name in calls}
    funcs = dict(candidates)
    for _ in range(max(int(repeat), 1)):
        for name, n in calls.items():
            fn = funcs[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: float(np.median(v)) for name, v in samples.items()}, failures


def print_side_by_side(label, candidates, reference, repeat=7):
    """One line: :func:`side_by_side` medians and each one's speed-up over ``reference``."""
    times, failures = side_by_side(candidates, repeat)
    ref = times.get(reference)
    parts = [
        f"{name} {t * 1e3:.3f} ms" + (f" ({ref / t:.1f}x)" if ref and name != reference else "")
        for name, t in times.items()
    ]
    parts += [f"{name} failed ({type(exc).__name__}: {exc})" for name, exc in failures.items()]
    print(f"{label}: " + ", ".join(parts))
    return times


def machine_info():
    """Dict describing the machine and the library versions measured."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy": np.__version__,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import scipy

    info["scipy"] = scipy.__version__
    try:
        import pyFAI

        info["pyFAI"] = pyFAI.version
    except ImportError:
        info["pyFAI"] = "not installed"
    try:
        import ccdgrid

        info["ccdgrid"] = ccdgrid.__version__
        try:
            info["openmp"] = ccdgrid.openmp_enabled()
        except Exception as exc:  # the kernel slot may still be a placeholder
            info["openmp"] = f"unknown ({type(exc).__name__})"
    except ImportError:
        info["ccdgrid"] = "not installed"
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        info[key] = os.environ.get(key, "unset")
    return info


# -- the end-to-end worker ------------------------------------------------------------


def _status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class _PeakMemory:
    """Peak RSS above a baseline, in MB (1e6 bytes)."""

    def __init__(self):
        self.exact = True
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self.base = _status_kb("VmRSS")
        except OSError:
            self.exact = False
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self):
        peak = (
            _status_kb("VmHWM")
            if self.exact
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        return (peak - self.base) * 1024 / 1e6

    def base_mb(self):
        return self.base * 1024 / 1e6


def _worker(argv=None):
    """Run one end-to-end pipeline on a saved image; print one JSON line.

    The image is loaded from ``.npy`` after every import the pipeline needs,
    then the peak-memory baseline is taken. Reported: ``time_maps`` (image
    to maps + mask), ``time_save`` (detector file write), ``peak_maps_mb``
    (peak RSS above baseline up to the maps), ``peak_total_mb`` (including
    the write), ``base_mb`` (RSS at the baseline), ``n_peaks`` (holes used,
    when the result says) and ``close_pairs`` (pairs of them closer than
    3 px), ``save_error``, the pipeline's own per-stage ``timings``. With
    ``--maps`` the corner maps and mask are saved for the accuracy measurement.
    """
    parser = argparse.ArgumentParser(prog="_measure.py")
    parser.add_argument("pipeline", choices=["ccdgrid", "tutorial"])
    parser.add_argument("image")
    parser.add_argument("output", help="detector file to write")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--maps", default=None, help="npz to save dy, dx, mask into")
    args = parser.parse_args(argv)

    if args.pipeline == "ccdgrid":
        # imported before the baseline so that import cost stays out of the
        # peak; the scipy/h5py modules too, as the tutorial's are (a lazy
        # import inside calibrate() would otherwise be charged to ccdgrid only)
        import h5py  # noqa: F401
        import scipy.interpolate
        import scipy.ndimage
        import scipy.optimize
        import scipy.signal
        import scipy.spatial  # noqa: F401

        from ccdgrid import calibrate

        def run(image):
            cal = calibrate(image, pitch=5e-3)
            return cal, cal.dy, cal.dx, cal.mask, dict(getattr(cal, "timings", {}) or {})

        def save(cal, path):
            cal.save(path)

    else:
        # imported before the baseline, as above (pyFAI.io writes the file)
        import pyFAI.detectors
        import pyFAI.ext.watershed
        import pyFAI.io  # noqa: F401
        from tutorial_pipeline import TUTORIAL_THRESHOLD, save_detector, tutorial_pipeline

        threshold = TUTORIAL_THRESHOLD if args.threshold is None else args.threshold

        def run(image):
            res = tutorial_pipeline(image, threshold=threshold, path=None)
            return res, res.dy, res.dx, res.mask, dict(res.timings)

        def save(res, path):
            save_detector(res.detector, path)

    image = np.load(args.image)
    mem = _PeakMemory()
    start = time.perf_counter()
    obj, dy, dx, mask, timings = run(image)
    time_maps = time.perf_counter() - start
    peak_maps = mem.peak_mb()
    start = time.perf_counter()
    save_error = None
    try:
        save(obj, args.output)
        time_save = time.perf_counter() - start
    except Exception as exc:  # the maps are still worth reporting
        save_error, time_save = f"{type(exc).__name__}: {exc}", None
    peak_total = mem.peak_mb()
    peaks = getattr(obj, "peaks", None)
    if peaks is None:  # ccdgrid: Calibration.holes.peaks
        peaks = getattr(getattr(obj, "holes", None), "peaks", None)
    close_pairs = None
    if peaks is not None and np.ndim(peaks) == 2 and len(peaks) > 1:
        from scipy.spatial import cKDTree

        close_pairs = len(cKDTree(np.asarray(peaks, dtype=np.float64)).query_pairs(3.0))
    if args.maps:
        np.savez(args.maps, dy=np.asarray(dy), dx=np.asarray(dx), mask=np.asarray(mask))
    print(
        json.dumps(
            {
                "time_maps": time_maps,
                "time_save": time_save,
                "peak_maps_mb": peak_maps,
                "peak_total_mb": peak_total,
                "base_mb": mem.base_mb(),
                "exact_peak": mem.exact,
                "n_peaks": None if peaks is None else len(peaks),
                "save_error": save_error,
                "close_pairs": close_pairs,
                "timings": timings,
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker()
