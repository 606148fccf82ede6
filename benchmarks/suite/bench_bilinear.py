"""Peak refinement: ``ccdgrid.bilinear.refine_peaks`` against pyFAI's ``Bilinear.local_maxi``.

asv module (classes with ``params``/``setup``/``time_*``/``peakmem_*``). The
image is a lattice of anisotropic Gaussian holes (98 px pitch) on a noisy
background; the seeds are scattered within 4 px of the holes, so each climbs
a few pixels before it is refined. The pyFAI engine is a Python loop over
``local_maxi``, as the tutorial calls it; it is skipped without pyFAI.

Run directly for a quick side-by-side of median times::

    python benchmarks/suite/bench_bilinear.py
"""

import time
from functools import partial

import numpy as np

try:
    from pyFAI.ext.bilinear import Bilinear as PyfaiBilinear
except ImportError:  # pyFAI is optional: its engine is then skipped
    PyfaiBilinear = None

__all__ = ["RefinePeaks", "grid_of_peaks"]


def grid_of_peaks(size, n_seeds, seed=0):
    """A ``(size, size)`` float32 image of Gaussian holes and ``(n_seeds, 2)`` (y, x) seeds."""
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 5.0, (size, size)).astype(np.float32)
    axis = np.arange(40.0, size - 12, 98.0)
    centres = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    centres += rng.uniform(-3, 3, centres.shape)
    yy, xx = np.mgrid[-12:13, -12:13]
    for cy, cx in centres:
        iy, ix = round(cy), round(cx)
        if 12 <= iy < size - 12 and 12 <= ix < size - 12:
            fy, fx = cy - iy, cx - ix
            stamp = np.exp(-0.5 * (((yy - fy) / 3.5) ** 2 + ((xx - fx) / 2.5) ** 2))
            img[iy - 12 : iy + 13, ix - 12 : ix + 13] += 5000.0 * stamp
    seeds = centres[rng.integers(0, len(centres), n_seeds)]
    seeds = np.clip(seeds + rng.uniform(-4, 4, seeds.shape), 0, size - 1)
    return img, seeds


class RefinePeaks:
    """``refine_peaks(image, seeds)`` for each engine."""

    params = ((512, 2048), (1_000, 10_000), ("cython", "numpy", "pyfai"))
    param_names = ("size", "n_seeds", "engine")
    timeout = 300

    def setup(self, size, n_seeds, engine):
        if engine == "pyfai" and PyfaiBilinear is None:
            raise NotImplementedError("pyFAI is not installed")
        from ccdgrid.bilinear import refine_peaks

        self.image, self.seeds = grid_of_peaks(size, n_seeds)
        if engine == "pyfai":
            interp = PyfaiBilinear(self.image)
            starts = [tuple(s) for s in self.seeds.tolist()]
            self.run = lambda: [interp.local_maxi(s) for s in starts]
        else:
            self.run = lambda: refine_peaks(self.image, self.seeds, backend=engine)

    def time_refine_peaks(self, size, n_seeds, engine):
        self.run()

    def peakmem_refine_peaks(self, size, n_seeds, engine):
        self.run()

    def peakmem_reference(self, size, n_seeds, engine):
        """Setup alone (image, seeds, imports): subtract from ``peakmem_refine_peaks``."""


def _median_seconds(func, repeat):
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def main():
    from ccdgrid.bilinear import refine_peaks

    image, seeds = grid_of_peaks(2048, 10_000)
    at_maxima = refine_peaks(image, seeds).round()  # seeds already on integer maxima
    for label, starts in (("within 4 px of the holes", seeds), ("on the maxima", at_maxima)):
        times = {
            engine: _median_seconds(partial(refine_peaks, image, starts, backend=engine), n)
            for engine, n in (("cython", 51), ("numpy", 7))
        }
        line = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items())
        if PyfaiBilinear is not None:
            tuples = [tuple(s) for s in starts.tolist()]
            t_pyfai = _median_seconds(partial(_pyfai_loop, PyfaiBilinear(image), tuples), 7)
            diff = np.abs(refine_peaks(image, starts) - _pyfai_loop(PyfaiBilinear(image), tuples))
            line += (
                f", pyFAI loop {t_pyfai * 1e3:.3f} ms; pyFAI / cython = "
                f"{t_pyfai / times['cython']:.1f}x, max |cython - pyFAI| = {diff.max():.1e} px"
            )
        print(f"2048², 10,000 seeds {label}: {line}")


def _pyfai_loop(interp, tuples):
    return np.array([interp.local_maxi(s) for s in tuples])


if __name__ == "__main__":
    main()
