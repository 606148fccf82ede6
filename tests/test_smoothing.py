"""FFT disc smoothing (ccdgrid.smoothing) against a direct convolution."""

import numpy as np
import pytest
from scipy import signal

from ccdgrid.smoothing import block_mean, disc_kernel, smooth_disc


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


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_block_mean_is_the_mean_of_each_block(factor, dtype):
    rng = np.random.default_rng(factor)
    img = rng.integers(0, 60000, (37, 23)).astype(dtype)  # partial last blocks dropped
    out = block_mean(img, factor)
    h, w = 37 // factor, 23 // factor
    expected = img[: h * factor, : w * factor].astype(np.float64)
    expected = expected.reshape(h, factor, w, factor).mean(axis=(1, 3))
    assert out.dtype == np.float32
    assert out.shape == (h, w)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
