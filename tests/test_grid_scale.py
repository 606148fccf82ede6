"""First guesses of pitch and hole diameter (ccdgrid.grid_scale)."""

import importlib.util
from pathlib import Path

import _independent_grid as gen  # registered by conftest.py
import numpy as np
import pytest

from ccdgrid.errors import CcdgridError
from ccdgrid.grid_scale import estimate_grid_scale
from ccdgrid.smoothing import block_mean

_spec = importlib.util.spec_from_file_location("_tp", Path(__file__).with_name("test_peaks.py"))
_tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tp)


@pytest.mark.parametrize(
    ("pitch", "diameter", "hot"),
    [(48.0, 10.5, 0), (30.0, 6.0, 0), (64.0, 16.0, 0), (48.0, 10.5, 300)],
)
def test_pitch_and_diameter(pitch, diameter, hot):
    img = _tp.make_grid(pitch=pitch, diameter=diameter, hot_pixels=hot, seed=15)[0]
    scale = estimate_grid_scale(img.astype(np.float32))
    assert scale.pitch == pytest.approx(pitch, rel=0.02)
    # a first guess for the smoothing disc: measured +10..+20 % (PSF blur)
    assert scale.diameter == pytest.approx(diameter * 1.12, rel=0.12)
    assert scale.contrast > 20


def test_given_values_are_kept():
    img = _tp.make_grid(seed=16)[0].astype(np.float32)
    scale = estimate_grid_scale(img, pitch=50.0, diameter=9.0)
    assert (scale.pitch, scale.diameter) == (50.0, 9.0)


def test_constant_image():
    with pytest.raises(CcdgridError, match="constant"):
        estimate_grid_scale(np.ones((64, 64), np.float32))


def test_white_noise():
    rng = np.random.default_rng(17)
    with pytest.raises(CcdgridError, match=r"no (hole-like structure|periodic grid)"):
        estimate_grid_scale(rng.normal(100, 10, (256, 256)).astype(np.float32))


def test_small_holes_in_a_large_image_are_measured_at_full_resolution():
    # binned 2x2, 6 px holes are 3 px wide: the diameter is measured again
    # unbinned, on a central crop of about 1024 px
    img = _tp.make_grid(shape=(1536, 1536), pitch=40.0, diameter=6.0, seed=18)[0]
    img = img.astype(np.float32)
    scale = estimate_grid_scale(img)
    assert scale.pitch == pytest.approx(40.0, rel=0.02)
    assert scale.diameter == pytest.approx(6.0 * 1.12, rel=0.12)
    assert scale.contrast > 20
    # the same through a caller's binned copies
    again = estimate_grid_scale(img, binned=lambda f: block_mean(img, f))
    assert (again.pitch, again.diameter) == (scale.pitch, scale.diameter)


@pytest.mark.parametrize(("pitch", "sigma"), [(40.0, 2.0), (50.0, 2.5), (64.0, 3.0)])
def test_lit_circle_on_a_bright_background(pitch, sigma):
    # The lit area's edge (background 15-60 % of the holes' height inside, dark
    # outside) puts a cone under the autocorrelation's central peak: the
    # guess used to measure the cone (diameters of 0.4-0.7 pitch, or no
    # lattice at all) and now retries on a top-hat filtered image.
    grid = gen.make_grid(
        (512, 512), pitch_px=pitch, profile="gauss", width_px=sigma, lit_axes=(0.48, 0.48), seed=3
    )
    scale = estimate_grid_scale(grid.image.astype(np.float32))
    assert scale.pitch == pytest.approx(pitch, rel=0.02)
    # a Gaussian's "diameter" (its autocorrelation's half width) is ~4 sigma
    assert 3.0 * sigma < scale.diameter < 5.5 * sigma
    assert scale.contrast > 50
