"""Grid error value + gradient: the fused Cython pass against its numpy twin.

asv module (classes with ``params``/``setup``/``time_*``/``peakmem_*``). Two
kinds of points, as in ``benchmarks/compare.py``: scattered uniformly over a
2048² detector (``"random"``, the case issue 3's 10x target is judged on)
and hole centres of a distorted ~13 px pitch grid (``"lattice"``, what the
pipeline feeds it). ``P`` is in the tutorial's (x, y) order. pyFAI has no
such kernel (the tutorial writes the error in numpy), so there is no pyFAI
engine here.

Run directly for a side-by-side of median times (interleaved rounds)::

    python benchmarks/suite/bench_grid_error.py
"""

import sys
from functools import partial
from pathlib import Path

import numpy as np

__all__ = ["GridError"]

P = np.array([734.2, 1181.7, 98.3, 1.2, -0.8, 97.6])  # (Ox, Oy, Xx, Yx, Xy, Yy)


def _measure():
    """``benchmarks/_measure.py``, the inputs and timing shared with ``compare.py``."""
    here = str(Path(__file__).resolve().parents[1])
    if here not in sys.path:
        sys.path.insert(0, here)
    import _measure

    return _measure


def _points(n, kind="random", seed=0):
    """``(P, points)``: parameters and ``(n, 2)`` (x, y) points of the given kind."""
    if kind == "random":
        return P, np.random.default_rng(seed).uniform(0, 2048, (n, 2))
    return _measure().lattice_points(n, seed)


class GridError:
    """``grid_error(P, points)`` (value and gradient), optionally with residuals."""

    params = (
        (1_000, 100_000, 1_000_000),
        ("random", "lattice"),
        (False, True),
        ("cython", "numpy"),
    )
    param_names = ("n_points", "points", "residuals", "engine")

    def setup(self, n_points, points, residuals, engine):
        from ccdgrid.hole_error import grid_error

        params, pts = _points(n_points, points)
        self.run = lambda: grid_error(params, pts, residuals=residuals, backend=engine)

    def time_grid_error(self, n_points, points, residuals, engine):
        self.run()

    def peakmem_grid_error(self, n_points, points, residuals, engine):
        self.run()

    def peakmem_reference(self, n_points, points, residuals, engine):
        """Setup alone (points, imports): subtract from ``peakmem_grid_error``."""


def main():
    from ccdgrid.hole_error import grid_error

    print_side_by_side = _measure().print_side_by_side
    for n in (1_000, 100_000):
        for kind in ("random", "lattice"):
            params, pts = _points(n, kind)
            for residuals in (False, True):
                print_side_by_side(
                    f"{n:>7} {kind} points, residuals={residuals!s:5}",
                    [
                        (e, partial(grid_error, params, pts, residuals=residuals, backend=e))
                        for e in ("cython", "numpy")
                    ],
                    reference="numpy",
                )


if __name__ == "__main__":
    main()
