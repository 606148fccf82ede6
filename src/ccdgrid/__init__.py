"""ccdgrid: spatial distortion calibration of X-ray area detectors from a grid image.

The pipeline (Hammersley, Svensson & Thompson, NIM A 346 (1994) 312-321):
peak picking -> grid assignment -> distortion fit -> displacement maps at the
pixel corners -> a detector definition file that pyFAI loads as is.

Conventions used everywhere: arrays are indexed ``[row, col] = [y, x]``;
positions are ``(y, x)`` float64 in index coordinates, where the centre of
pixel ``(i, j)`` is at ``(i, j)``; displacement maps live on the
``(ny + 1, nx + 1)`` pixel-corner grid, corner ``(i, j)`` being at index
coordinates ``(i - 0.5, j - 0.5)``.

Public names are loaded on first use, so ``import ccdgrid`` and
``ccdgrid --help`` stay fast.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ccdgrid")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# public name -> module that defines it
_LAZY = {
    "CcdgridError": "errors",
    "segment": "watershed",
    "merge_singletons": "watershed",
    "Segmentation": "watershed",
    "InverseWatershed": "watershed",
    "refine_peaks": "bilinear",
    "Bilinear": "bilinear",
    "grid_error": "hole_error",
    "find_holes": "peaks",
    "HoleSearch": "peaks",
    "CorrectionMatrix": "correction",
    "correct": "correction",
    "output_bounds": "correction",
    "index_holes": "lattice",
    "LatticeIndex": "lattice",
    "fit_grid": "gridfit",
    "GridFit": "gridfit",
    "displacement_maps": "maps",
    "DisplacementMaps": "maps",
    "calibrate": "pipeline",
    "Calibration": "pipeline",
    "load": "detector_file",
    "correct_dask": "stack",
    "correct_hdf5": "stack",
    "recalibrate": "warmstart",
    "WarmCalibration": "warmstart",
    "WarmStartFallback": "warmstart",
    "validate": "validation",
    "ValidationResult": "validation",
    "cross_validate": "cross_validation",
    "CrossValidation": "cross_validation",
    "read_spline": "spline",
    "write_spline": "spline",
    "SplineToleranceWarning": "spline",
    "convert": "exchange",
    "read_edf_maps": "exchange",
    "write_edf_maps": "exchange",
    "save_detector": "detector_file",
    "DetectorRecord": "detector_file",
    "read_image": "io",
    "calibrate_combined": "combined",
    "CombinedCalibration": "combined",
    "calibrate_series": "series",
    "SeriesResult": "series",
    "FrameResult": "series",
}
_SUBMODULES = {
    "synthetic",
    "cli",
    "io",
    "errors",
    "correction",
    "detector_file",
    "report",
    "spline",
    "exchange",
    "validation",
    "stack",
    "combined",
    "series",
}

__all__ = ["__version__", "openmp_enabled", *sorted(_LAZY), *sorted(_SUBMODULES)]


def openmp_enabled():
    """Return True if the compiled kernels were built with OpenMP."""
    from ._ext._config import openmp_enabled as _openmp_enabled

    return _openmp_enabled()


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ccdgrid' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
