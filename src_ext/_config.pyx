"""Facts about how the compiled kernels were built."""

cdef extern from *:
    """
    #ifdef CCDGRID_OPENMP
    #define CCDGRID_HAVE_OPENMP 1
    #else
    #define CCDGRID_HAVE_OPENMP 0
    #endif
    """
    int CCDGRID_HAVE_OPENMP


def openmp_enabled():
    """Return True if the kernels were compiled with OpenMP support."""
    return bool(CCDGRID_HAVE_OPENMP)
