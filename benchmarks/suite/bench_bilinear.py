"""Peak refinement: ``ccdgrid.bilinear.refine_peaks`` against pyFAI's ``Bilinear.local_maxi``.

asv module (classes with ``params``/``setup``/``time_*``/``peakmem_*``). The
seeds are those of ``benchmarks/compare.py``: the peak pixels of the big
watershed regions of a convolved 19 px pitch grid image of 2048², taken the
tutorial's way (``"tutorial"``, each already a local maximum: the case issue
3's 50x target is judged on), the same moved by up to 2 px (``"near"``, a
warm start's predictions) and random pixels (``"random"``, where both
implementations are bounded by the climb). The pyFAI engine is a Python
loop over ``local_maxi`` on a list of ``(y, x)`` tuples, as the tutorial
calls it; it is skipped without pyFAI.

Run directly for a side-by-side of median times (interleaved rounds)::

    python benchmarks/suite/bench_bilinear.py
"""

import sys
from pathlib import Path

import numpy as np

try:
    from pyFAI.ext.bilinear import Bilinear as PyfaiBilinear
except ImportError:  # pyFAI is optional: its engine is then skipped
    PyfaiBilinear = None

__all__ = ["RefinePeaks", "seed_sets"]


def _measure():
    """``benchmarks/_measure.py``, the inputs and timing shared with ``compare.py``."""
    here = str(Path(__file__).resolve().parents[1])
    if here not in sys.path:
        sys.path.insert(0, here)
    import _measure

    return _measure


def seed_sets(n_seeds=10_000, seed=0):
    """The convolved image and ``{"tutorial", "near", "random"}`` -> (n_seeds, 2) int64 seeds."""
    image, peaks = _measure().tutorial_seeds(n_seeds, seed)
    rng = np.random.default_rng(seed + 2)
    h, w = image.shape
    near = np.clip(peaks + rng.integers(-2, 3, peaks.shape), 0, [h - 1, w - 1])
    random = np.stack([rng.integers(0, h, n_seeds), rng.integers(0, w, n_seeds)], axis=1)
    sets = {"tutorial": peaks, "near": near, "random": random}
    return image, {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in sets.items()}


def _pyfai_loop(interp, tuples):
    return [interp.local_maxi(s) for s in tuples]


class RefinePeaks:
    """``refine_peaks(image, seeds)`` for each engine and kind of seeds."""

    params = ((1_000, 10_000), ("tutorial", "near", "random"), ("cython", "numpy", "pyfai"))
    param_names = ("n_seeds", "seeds", "engine")
    timeout = 300

    def setup_cache(self):
        return seed_sets(10_000)

    def setup(self, cache, n_seeds, seeds, engine):
        if engine == "pyfai" and PyfaiBilinear is None:
            raise NotImplementedError("pyFAI is not installed")
        from ccdgrid.bilinear import refine_peaks

        image, sets = cache
        starts = sets[seeds][:n_seeds]
        if engine == "pyfai":
            interp = PyfaiBilinear(image)
            tuples = [tuple(s) for s in starts.tolist()]
            self.run = lambda: _pyfai_loop(interp, tuples)
        else:
            self.run = lambda: refine_peaks(image, starts, backend=engine)

    def time_refine_peaks(self, cache, n_seeds, seeds, engine):
        self.run()

    def peakmem_refine_peaks(self, cache, n_seeds, seeds, engine):
        self.run()

    def peakmem_reference(self, cache, n_seeds, seeds, engine):
        """Setup alone (image, seeds, imports): subtract from ``peakmem_refine_peaks``."""


def main():
    from ccdgrid.bilinear import refine_peaks

    image, sets = seed_sets(10_000)
    for kind, starts in sets.items():
        cands = [
            (e, lambda e=e, s=starts: refine_peaks(image, s, backend=e))
            for e in ("cython", "numpy")
        ]
        if PyfaiBilinear is not None:
            interp = PyfaiBilinear(image)
            tuples = [tuple(s) for s in starts.tolist()]
            cands.append(("pyFAI loop", lambda i=interp, t=tuples: _pyfai_loop(i, t)))
            diff = np.abs(refine_peaks(image, starts) - np.array(_pyfai_loop(interp, tuples)))
            kind += f" (max |cython - pyFAI| = {diff.max():.1e} px)"
        _measure().print_side_by_side(f"10,000 seeds, {kind}", cands, reference="pyFAI loop")


if __name__ == "__main__":
    main()
