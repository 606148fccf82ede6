"""One BLAS thread for the small dense linear algebra of the pipeline.

The thin-plate systems, GCV and the lattice frame's polynomial fit are
small matrices (tens to ~1600 rows). A second BLAS thread gains nothing on
them on a quiet 2-core machine, and right after the OpenMP kernels, or on
a busy machine, the BLAS threads spin for cores the others hold: a 771 x 21
least-squares fit took 50-90 ms instead of 0.3 ms, ``displacement_maps``
1.8 s instead of 0.19 s at 2048².
"""

import functools

from scipy import linalg  # noqa: F401 -- loads the BLAS the controller must find
from threadpoolctl import ThreadpoolController

__all__ = ["one_blas_thread"]

# Built once, on import: finding the loaded libraries costs ~10 ms, which
# the first calibration of a process used to pay inside its timed stages.
_BLAS = ThreadpoolController().select(user_api="blas")


def one_blas_thread(func):
    """Run ``func`` with the BLAS/LAPACK thread pools limited to one thread (~0.1 ms a call)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _BLAS.limit(limits=1):
            return func(*args, **kwargs)

    return wrapper
