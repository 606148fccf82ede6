"""Compiled kernels (Cython). Private: use the public façades in :mod:`ccdgrid`."""
