"""The benchmark baseline (benchmarks/tutorial_pipeline.py) still runs and means what it says.

A 512² grid image keeps it fast; the checks are on facts that do not depend on
the baseline's code: the true hole positions and field of the generator, the
kernel the tutorial defines, and the corner layout pyFAI documents.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyFAI")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tutorial = _load("tutorial_pipeline")
measure = _load("_measure")


@pytest.fixture(scope="module")
def grid():
    try:
        from ccdgrid.synthetic import grid_image
    except ImportError:
        return measure.fallback_grid_image((512, 512), seed=3)
    return grid_image((512, 512), seed=3)


@pytest.fixture(scope="module")
def run(grid, tmp_path_factory):
    path = tmp_path_factory.mktemp("tutorial") / "detector.h5"
    threshold = measure.by_eye_threshold(grid.image)
    return tutorial.tutorial_pipeline(grid.image, threshold=threshold, path=path), path


def test_disc_kernel_is_the_tutorials_97_pixel_disc():
    kernel = tutorial.disc_kernel()
    assert kernel.shape == (11, 11)
    assert np.count_nonzero(kernel) == 97
    np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-12)


def test_returns_corner_maps_mask_and_timings(run):
    res, _ = run
    assert res.dy.shape == res.dx.shape == (513, 513)
    assert np.isfinite(res.dy).all()
    assert np.isfinite(res.dx).all()
    assert res.mask.shape == (512, 512)
    assert res.mask.dtype == np.int8
    assert set(np.unique(res.mask)) == {0, 1}
    assert list(res.timings)[:3] == ["convolve", "watershed_init", "merge_singleton"]
    assert "save" in res.timings


def test_finds_every_visible_hole(grid, run):
    res, _ = run
    true = grid.holes[grid.visible]
    dist = np.sqrt(((true[:, None, :] - res.peaks[None, :, :]) ** 2).sum(axis=2)).min(axis=1)
    # bilinear refinement of a convolved disc: well under a tenth of a pixel
    assert np.median(dist) < 0.1
    assert dist.max() < 0.5


def test_pixel_size_matches_pitch_over_lattice_spacing(grid, run):
    res, _ = run
    expected = 5e-3 / grid.pitch_px
    np.testing.assert_allclose(res.pixel_size, (expected, expected), rtol=0.02)


def test_maps_follow_the_true_field(grid, run):
    res, _ = run
    rms, _ = measure.dense_residual(
        grid.truth, res.dy, res.dx, res.mask, region=grid.taper_mask, n=5000, seed=1
    )
    # 0.023 px RMS is the baseline at 2048²; a 512² image has ~25 holes, so
    # only a loose bound is meaningful here (an inverted sign gives ~|d|).
    assert rms < 0.25


def test_detector_file_holds_the_maps_at_the_corners(run):
    import pyFAI

    res, path = run
    det = pyFAI.detector_factory(str(path))
    assert tuple(det.shape) == (512, 512)
    corners = det.get_pixel_corners()  # (ny, nx, 4, 3) m; corner A of pixel (i, j) is (i, j)
    i, j = np.mgrid[0:512, 0:512]
    np.testing.assert_allclose(corners[..., 0, 1] / det.pixel1, i + res.dy[:-1, :-1], atol=1e-4)
    np.testing.assert_allclose(corners[..., 0, 2] / det.pixel2, j + res.dx[:-1, :-1], atol=1e-4)
    np.testing.assert_array_equal(det.mask, res.mask)


def test_no_grid_raises():
    image = np.random.default_rng(0).normal(100, 5, size=(128, 128))
    with pytest.raises(RuntimeError, match="have 4 neighbours"):
        tutorial.tutorial_pipeline(image, threshold=1e9)
