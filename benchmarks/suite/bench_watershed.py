"""Inverse watershed: ``segment`` + ``merge_singletons`` against pyFAI's ``InverseWatershed``.

asv module (classes with ``params``/``setup``/``time_*``/``peakmem_*``). The
image is a lattice of anti-aliased 10.5 px discs (98 px pitch, slightly
rotated) on a Poisson background, smoothed with the tutorial's 11x11 disc
kernel, as the tutorial feeds ``InverseWatershed``. The pyFAI engine runs
``InverseWatershed(img).init(); .merge_singleton()``; it is skipped without
pyFAI.

Run directly for a side-by-side of median times and peak memory::

    python benchmarks/suite/bench_watershed.py [size]
"""

import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
from scipy import signal

try:
    from pyFAI.ext.watershed import InverseWatershed as PyfaiInverseWatershed
except ImportError:  # pyFAI is optional: its engine is then skipped
    PyfaiInverseWatershed = None


def convolved_grid(size, pitch=98.0, diameter=10.5, seed=0):
    """float64 (size, size) grid image smoothed by the tutorial's disc kernel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c, s = np.cos(0.02), np.sin(0.02)
    u = (c * xx + s * yy) / pitch
    v = (-s * xx + c * yy) / pitch
    r = np.hypot(u - np.round(u), v - np.round(v)) * pitch
    img = rng.poisson(100.0 + 2e4 * np.clip(diameter / 2 + 0.5 - r, 0.0, 1.0))
    y, x = np.mgrid[-5:6, -5:6]
    kernel = (x * x + y * y <= 5.5**2).astype(np.float64)
    return signal.fftconvolve(img.astype(np.float64), kernel / kernel.sum(), "same")


def _runner(image, engine):
    if engine == "pyfai":

        def run():
            iw = PyfaiInverseWatershed(image)
            iw.init()
            iw.merge_singleton()
            return iw

        return run
    from ccdgrid.watershed import merge_singletons, segment

    return lambda: merge_singletons(segment(image, backend=engine), image, backend=engine)


class Watershed:
    """Segmentation then singleton merging, for each engine."""

    params = ((512, 2048), ("cython", "numpy", "pyfai"))
    param_names = ("size", "engine")
    timeout = 300

    def setup(self, size, engine):
        if engine == "pyfai" and PyfaiInverseWatershed is None:
            raise NotImplementedError("pyFAI is not installed")
        self.image = convolved_grid(size)
        self.run = _runner(self.image, engine)

    def time_segment_and_merge(self, size, engine):
        self.run()

    def peakmem_segment_and_merge(self, size, engine):
        self.run()

    def peakmem_reference(self, size, engine):
        """Setup alone (image, imports): subtract from ``peakmem_segment_and_merge``."""


class Segment:
    """Segmentation alone (pyFAI's ``init()``)."""

    params = ((512, 2048), ("cython", "numpy", "pyfai"))
    param_names = ("size", "engine")
    timeout = 300

    def setup(self, size, engine):
        if engine == "pyfai" and PyfaiInverseWatershed is None:
            raise NotImplementedError("pyFAI is not installed")
        self.image = convolved_grid(size)
        if engine == "pyfai":
            self.run = lambda: PyfaiInverseWatershed(self.image).init()
        else:
            from ccdgrid.watershed import segment

            self.run = lambda: segment(self.image, backend=engine)

    def time_segment(self, size, engine):
        self.run()


def _median(func, repeat):
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        func()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rss_worker(size, engine):
    """Print the peak RSS growth (bytes) of one run, in a fresh process.

    The high-water mark is reset through ``/proc/self/clear_refs`` after the
    image is built, so the peak of building it is not counted; without it
    (not Linux) ``ru_maxrss`` differences are printed, which read 0 when the
    setup peaked higher.
    """
    image = convolved_grid(size)
    run = _runner(image, engine)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
        result = run()
        grow = _status_bytes("VmHWM") - base
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = run()
        grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    del result
    print(grow)


def main(size=2048):
    image = convolved_grid(size)
    n = image.size
    engines = ["cython", "numpy"] + (["pyfai"] if PyfaiInverseWatershed else [])
    times = {e: _median(_runner(image, e), 5 if e == "cython" else 3) for e in engines}
    for e, (wall, cpu) in times.items():
        print(f"{size}², {e}: median wall {wall * 1e3:.1f} ms, cpu {cpu * 1e3:.1f} ms")
    if "pyfai" in times:
        print(
            f"pyFAI / cython: {times['pyfai'][0] / times['cython'][0]:.1f}x wall, "
            f"{times['pyfai'][1] / times['cython'][1]:.1f}x cpu"
        )
    run = _runner(image, "cython")
    tracemalloc.start()
    result = run()
    _, peak = tracemalloc.get_traced_memory()
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    print(
        f"cython, tracemalloc: peak {peak / n:.1f} B/px above the float64 input "
        f"({peak / 2**20:.0f} MiB), result keeps {kept / n:.1f} B/px"
    )
    for e in engines:
        out = subprocess.run(
            [sys.executable, __file__, "--rss", str(size), e],
            capture_output=True,
            text=True,
            check=True,
        )
        grow = int(out.stdout.split()[-1])
        print(
            f"{e}, peak RSS growth in a fresh process: "
            f"{grow / n:.1f} B/px ({grow / 2**20:.0f} MiB)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss":
        _rss_worker(int(sys.argv[2]), sys.argv[3])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 2048)
