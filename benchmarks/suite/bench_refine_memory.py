"""Where the time of ``refine_peaks`` on 10,000 peaks goes: work, caches, pages.

asv module (classes with ``params``/``setup``/``time_*``). The tutorial's
seeds (``benchmarks/compare.py``'s target case) are refined on copies of the
same image laid out in memory in different ways, and compared with seed sets
that need the same work from fewer distinct windows:

* ``scattered``: the tutorial's 10,000 peaks, each a local maximum, in random
  order over the 2048² image (16 MB): three image rows per seed come from
  the L3 cache or memory;
* ``band``: 10,000 seeds drawn from the ~500 peaks of 100 rows, whose
  windows stay in the L2 cache;
* ``one``: one peak 10,000 times, its window in the L1 cache: the work alone.

Each on an image on 2 MiB pages (``huge``: what numpy asks the kernel for;
it gets them when the allocation is fresh) and on 4 KiB pages (``small``:
what an image gets when the allocator reuses memory already touched), on
Linux; elsewhere only ``default``. The difference between ``scattered`` and
``one`` is the memory traffic; between ``huge`` and ``small``, the address
translation (16 MB on 4 KiB pages is twice the reach of the TLB).

Run directly for a side-by-side of median times::

    python benchmarks/suite/bench_refine_memory.py
"""

import mmap
import sys
from pathlib import Path

import numpy as np

__all__ = ["RefineWhereTimeGoes", "image_copies", "seed_kinds"]


def _measure():
    """``benchmarks/_measure.py``, the inputs and timing shared with ``compare.py``."""
    here = str(Path(__file__).resolve().parents[1])
    if here not in sys.path:
        sys.path.insert(0, here)
    import _measure

    return _measure


def seed_kinds(n_seeds=10_000, seed=0):
    """The convolved image and ``{"scattered", "band", "one"}`` -> (n_seeds, 2) int64 seeds."""
    image, peaks = _measure().tutorial_seeds(n_seeds, seed)
    rng = np.random.default_rng(seed + 3)
    rows = (peaks[:, 0] >= 1000) & (peaks[:, 0] < 1100)
    band = peaks[rows][rng.integers(0, rows.sum(), n_seeds)]
    one = np.repeat(peaks[:1], n_seeds, axis=0)
    kinds = {"scattered": peaks, "band": band, "one": one}
    return image, {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in kinds.items()}


def image_copies(image):
    """``{"huge", "small"}`` -> copies of ``image`` on 2 MiB and 4 KiB pages (Linux).

    Elsewhere ``{"default": image}``. The 2 MiB pages are asked for, not
    guaranteed: the kernel gives them when it has them free.
    """
    if not all(hasattr(mmap, a) for a in ("MADV_HUGEPAGE", "MADV_NOHUGEPAGE", "MAP_ANONYMOUS")):
        return {"default": image}
    return {
        "huge": _measure().on_pages(image, mmap.MADV_HUGEPAGE),
        "small": _measure().on_pages(image, mmap.MADV_NOHUGEPAGE),
    }


class RefineWhereTimeGoes:
    """``refine_peaks(image, seeds)`` (compiled engine) per memory layout and seed kind."""

    params = (("huge", "small", "default"), ("scattered", "band", "one"))
    param_names = ("pages", "seeds")
    timeout = 300

    def setup_cache(self):
        image, kinds = seed_kinds()
        return image, kinds

    def setup(self, cache, pages, seeds):
        image, kinds = cache
        copies = image_copies(image)
        if pages not in copies:
            raise NotImplementedError(f"no {pages!r} image on this platform")
        from ccdgrid.bilinear import refine_peaks

        img, starts = copies[pages], kinds[seeds]
        self.run = lambda: refine_peaks(img, starts)

    def time_refine_peaks(self, cache, pages, seeds):
        self.run()


def main():
    from ccdgrid.bilinear import refine_peaks

    image, kinds = seed_kinds()
    copies = image_copies(image)
    cands = [
        (f"{pages} pages, {kind}", lambda i=img, s=starts: refine_peaks(i, s))
        for pages, img in copies.items()
        for kind, starts in kinds.items()
    ]
    times, failures = _measure().side_by_side(cands, repeat=7)
    print("refine_peaks (cython), 10,000 maxima: median of 7 interleaved rounds")
    for name, t in times.items():
        print(f"  {name:24s} {t * 1e6:7.1f} us")
    for name, exc in failures.items():
        print(f"  {name:24s} failed ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
