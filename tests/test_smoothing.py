"""FFT disc smoothing (ccdgrid.smoothing) against a direct convolution."""

import numpy as np
import pytest
from scipy import signal

from ccdgrid.smoothing import disc_kernel, smooth_disc


# 97: the seed tutorial's 11 px disc; 29: x^2 + y^2 <= 9 on the integer grid
@pytest.mark.parametrize(("diameter", "size", "count"), [(11, 11, 97), (6, 7, 29)])
def test_disc_kernel(diameter, size, count):
    k = disc_kernel(diameter)
    assert k.shape == (size, size)
    assert k.dtype == np.float32
    assert (k > 0).sum() == count
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(k, k[::-1, ::-1])


@pytest.mark.parametrize("shape", [(128, 128), (97, 131), (250, 64)])
def test_matches_direct_convolution_inside(shape):
    rng = np.random.default_rng(14)
    img = rng.random(shape).astype(np.float32) * 100
    k = disc_kernel(10.5)
    ref = signal.convolve2d(img, k, mode="same")
    out = smooth_disc(img, 10.5)
    assert out.shape == shape
    assert out.dtype == np.float32
    m = k.shape[0] // 2
    np.testing.assert_allclose(out[m:-m, m:-m], ref[m:-m, m:-m], rtol=1e-5, atol=1e-4)
