"""Distortion correction: building the pixel-splitting matrix and applying it.

asv module (classes with ``params``/``setup``/``time_*``/``peakmem_*``).
Engines: ccdgrid's Cython kernel, its numpy twin (small sizes only: it is a
specification, not a contender) and pyFAI's ``Distortion`` (``calc_LUT`` with
``method="csr"``, then ``correct``), skipped when pyFAI is not installed.
The distortion is a smooth field of a few pixels (max |d| about 4 px), as a
fibre-optic taper gives; pyFAI's detector has a pixel size of 1.0 so that its
float32 corners are exact (PYFAI_NOTES §3.2).

Run directly for a side-by-side of both engines in one process: the build and
apply ratios (pyFAI time / ccdgrid time; medians of 5 builds and of 7 x 3
applies, the engines interleaved so that both see the same machine load),
process CPU time, and the peak resident memory each build adds (Linux only).
On a busy machine the wall-clock ratios shrink; the load average is printed::

    python benchmarks/suite/bench_correction.py [size ...]
"""

import os
import sys
import time

import numpy as np

__all__ = ["ApplyCorrection", "BuildCorrection"]


def smooth_maps(size):
    """Corner maps (size + 1)² of a smooth distortion, |d| up to about 4 px."""
    yy, xx = np.mgrid[0 : size + 1, 0 : size + 1] / size
    dy = 3.0 * np.sin(2.0 * yy + 1.0) * np.cos(3.0 * xx) + 1.3 * xx - 0.5
    dx = 2.0 * np.cos(4.0 * yy) + 2.5 * yy * xx - 0.7
    return dy, dx


def _pyfai_distortion(dy, dx):
    """A pyFAI ``Distortion`` for the maps, or NotImplementedError (asv: skip)."""
    try:
        from pyFAI.detectors import Detector
        from pyFAI.distortion import Distortion
    except ImportError as exc:
        raise NotImplementedError(f"pyFAI not available: {exc}") from exc
    shape = (dy.shape[0] - 1, dy.shape[1] - 1)
    det = Detector(1.0, 1.0, max_shape=shape)
    det.set_dx(dx)
    det.set_dy(dy)
    det.get_pixel_corners()  # built once, outside the timings
    return lambda: Distortion(det, mask=np.zeros(shape, np.int8), method="csr")


def _pyfai_version():
    """pyFAI's version string, or "(not installed)"."""
    try:
        import pyFAI
    except ImportError:
        return "(not installed)"
    return pyFAI.version


def _check_engine(engine, size):
    if engine == "numpy" and size > 512:
        raise NotImplementedError("the numpy twin is only run on small detectors")


class BuildCorrection:
    """Build the sparse matrix from corner maps (pyFAI: ``Distortion.calc_LUT``)."""

    params = ((512, 2048, 4096), ("cython", "numpy", "pyFAI"))
    param_names = ("size", "engine")
    timeout = 600
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0

    def setup(self, size, engine):
        _check_engine(engine, size)
        dy, dx = smooth_maps(size)
        if engine == "pyFAI":
            make = _pyfai_distortion(dy, dx)
            self.run = lambda: make().calc_LUT()
        else:
            from ccdgrid.correction import CorrectionMatrix

            self.run = lambda: CorrectionMatrix.from_maps(dy, dx, backend=engine)

    def time_build(self, size, engine):
        self.run()

    def peakmem_build(self, size, engine):
        self.run()

    def peakmem_reference(self, size, engine):
        """Setup alone (maps, pyFAI corners, imports): subtract from ``peakmem_build``."""


class ApplyCorrection:
    """Correct one float32 image, or a stack of 8 (pyFAI: ``Distortion.correct``)."""

    params = ((512, 2048), (1, 8), ("cython", "numpy", "pyFAI"))
    param_names = ("size", "n_images", "engine")
    timeout = 600

    def setup(self, size, n_images, engine):
        _check_engine(engine, size)
        dy, dx = smooth_maps(size)
        rng = np.random.default_rng(0)
        images = rng.random((n_images, size, size), dtype=np.float32) * 1000
        if engine == "pyFAI":
            dis = _pyfai_distortion(dy, dx)()
            dis.calc_LUT()
            self.run = lambda: [dis.correct(img) for img in images]
        else:
            from ccdgrid.correction import CorrectionMatrix

            cm = CorrectionMatrix.from_maps(dy, dx, backend=engine)
            stack = images[0] if n_images == 1 else images
            self.run = lambda: cm.apply(stack)

    def time_apply(self, size, n_images, engine):
        self.run()


# -- side by side, one process ------------------------------------------------------------------


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _peak_added_mib(func):
    """Run func once; return (result, peak RSS it added in MiB), Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return func(), float("nan")
    before = _rss_kib("VmRSS")
    result = func()
    return result, (_rss_kib("VmHWM") - before) / 1024


def _median(func, repeat):
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        func()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def main(sizes):
    import gc

    from ccdgrid.correction import CorrectionMatrix

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"ccdgrid vs pyFAI {_pyfai_version()}, medians of interleaved runs in one process; "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at start (ratios are only "
        "comparable between quiet runs)"
    )
    for size in sizes:
        dy, dx = smooth_maps(size)
        make = _pyfai_distortion(dy, dx)
        img = np.random.default_rng(0).random((size, size), dtype=np.float32) * 1000

        def build_ours(dy=dy, dx=dx):
            return CorrectionMatrix.from_maps(dy, dx)

        def build_pyfai(make=make):
            dis = make()
            dis.calc_LUT()
            return dis

        # peak memory first, each engine on its own, nothing else alive
        cm, mem_ours = _peak_added_mib(build_ours)
        del cm
        gc.collect()
        dis, mem_pyfai = _peak_added_mib(build_pyfai)
        del dis
        gc.collect()
        # interleaved timings, so that both engines see the same machine load
        t_ours, t_pyfai = [], []
        for _ in range(5):
            t_ours.append(_median(build_ours, 1))
            t_pyfai.append(_median(build_pyfai, 1))
        (w_o, c_o), (w_p, c_p) = np.median(t_ours, axis=0), np.median(t_pyfai, axis=0)
        print(
            f"{size}² build: ccdgrid {w_o:.3f} s wall ({c_o:.3f} s cpu, +{mem_ours:.0f} MiB), "
            f"pyFAI {w_p:.3f} s wall ({c_p:.3f} s cpu, +{mem_pyfai:.0f} MiB): "
            f"{w_p / w_o:.1f}x faster ({c_p / c_o:.1f}x less cpu), "
            f"{mem_pyfai / mem_ours:.1f}x less memory"
        )

        cm = build_ours()
        dis = build_pyfai()
        a_o, a_p = [], []
        for _ in range(7):
            a_o.append(_median(lambda cm=cm, img=img: cm.apply(img), 3)[0])
            a_p.append(_median(lambda dis=dis, img=img: dis.correct(img), 3)[0])
        diff = np.abs(cm.apply(img) - dis.correct(img)).max()
        m_o, m_p = np.median(a_o), np.median(a_p)
        print(
            f"{size}² apply: ccdgrid {m_o * 1e3:.1f} ms, pyFAI {m_p * 1e3:.1f} ms: "
            f"{m_p / m_o:.1f}x faster (nnz {cm.nnz} vs {dis.lut[0].size}; "
            f"max |difference| {diff:.3g} on a 0-1000 image)"
        )
        del cm, dis
        gc.collect()


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [2048])
