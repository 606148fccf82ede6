"""Grid error value + gradient: the fused Cython pass against its numpy twin.

asv module (classes with ``params``/``setup``/``time_*``/``peakmem_*``). The
points are scattered uniformly over a 2048² detector; ``P`` is a grid of
about 98 px pitch, in the tutorial's (x, y) order. pyFAI has no such kernel
(the tutorial writes the error in numpy), so there is no pyFAI engine here.

Run directly for a quick side-by-side of median times::

    python benchmarks/suite/bench_grid_error.py
"""

import time
from functools import partial

import numpy as np

__all__ = ["GridError"]

P = np.array([734.2, 1181.7, 98.3, 1.2, -0.8, 97.6])  # (Ox, Oy, Xx, Yx, Xy, Yy)


def _points(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 2048, (n, 2))


class GridError:
    """``grid_error(P, points)`` (value and gradient), optionally with residuals."""

    params = ((1_000, 100_000, 1_000_000), (False, True), ("cython", "numpy"))
    param_names = ("n_points", "residuals", "engine")

    def setup(self, n_points, residuals, engine):
        from ccdgrid.hole_error import grid_error

        points = _points(n_points)
        self.run = lambda: grid_error(P, points, residuals=residuals, backend=engine)

    def time_grid_error(self, n_points, residuals, engine):
        self.run()

    def peakmem_grid_error(self, n_points, residuals, engine):
        self.run()

    def peakmem_reference(self, n_points, residuals, engine):
        """Setup alone (points, imports): subtract from ``peakmem_grid_error``."""


def _median_seconds(func, repeat):
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def main():
    from ccdgrid.hole_error import grid_error

    for n in (1_000, 100_000):
        points = _points(n)
        for residuals in (False, True):
            t_cy, t_np = (
                _median_seconds(partial(grid_error, P, points, residuals=residuals, backend=e), r)
                for e, r in (("cython", 201), ("numpy", 51))
            )
            print(
                f"{n:>7} points, residuals={residuals!s:5}: cython {t_cy * 1e3:.3f} ms, "
                f"numpy {t_np * 1e3:.3f} ms, numpy / cython = {t_np / t_cy:.1f}x"
            )


if __name__ == "__main__":
    main()
