"""Disc smoothing of a grid image by FFT convolution (stage 1 of hole finding).

The seed tutorial convolves the image with an 11x11 disc using
``scipy.signal.convolve2d`` (0.7 s at 2048²). The same "same"-mode linear
convolution through real FFTs of a fast length costs one forward and one
inverse transform of the image plus one of the kernel.
"""

import numpy as np
from scipy import fft as _fft

__all__ = ["block_mean", "disc_kernel", "smooth_disc"]


def block_mean(image, factor):
    """Mean of ``factor`` x ``factor`` blocks of an image (binning).

    Parameters
    ----------
    image : ndarray of shape (h, w), real
    factor : int
        Block size, >= 1.

    Returns
    -------
    ndarray of shape (h // factor, w // factor), float32
        Pixel ``(i, j)`` is the mean of the image's pixels
        ``[factor i, factor (i + 1)) x [factor j, factor (j + 1))``, so its
        centre is at index coordinates ``factor * (i, j) + (factor - 1) / 2``
        of the image. A partial last block of rows or columns is dropped.
        For ``factor == 1``, the image as float32 (not a copy if it already is).
    """
    if factor == 1:
        return np.asarray(image, dtype=np.float32)
    h, w = image.shape
    h2, w2 = h // factor * factor, w // factor * factor
    # rows first (whole rows: one pass over the image), then columns of the
    # row sums, a factor smaller; a reshape + mean over two axes is far slower
    rows = np.array(image[0:h2:factor, :w2], dtype=np.float32)
    for dy in range(1, factor):
        rows += image[dy:h2:factor, :w2]
    out = np.array(rows[:, 0::factor], dtype=np.float32)
    for dx in range(1, factor):
        out += rows[:, dx::factor]
    out *= np.float32(1.0 / (factor * factor))
    return out


def disc_kernel(diameter):
    """Return a normalised disc kernel of odd size.

    Parameters
    ----------
    diameter : float
        Disc diameter in pixels (> 0). The kernel holds the pixels whose
        centre lies within ``diameter / 2`` of the central pixel, as in the
        seed tutorial (an 11 px hole gives its 97-pixel 11x11 disc).

    Returns
    -------
    ndarray of shape (k, k), float32
        ``k = 2 * floor(diameter / 2) + 1``; the weights sum to 1.
    """
    radius = 0.5 * float(diameter)
    half = max(int(np.floor(radius)), 1)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    kernel = (yy * yy + xx * xx <= radius * radius).astype(np.float64)
    kernel /= kernel.sum()
    return kernel.astype(np.float32)


def _kernel_spectrum(kernel, shape):
    """``rfft2`` of the centred, symmetric ``kernel`` wrapped on ``shape``, by two small DFTs.

    The kernel is symmetric in y and in x, so its spectrum is real and
    separable: ``cos(ky dy) K[dy, dx] cos(kx dx)`` summed over the offsets.
    Folding the mirrored offsets (weight 2 off the axes) halves both small
    matrices: one (ny, k/2) @ (k/2, k/2) @ (k/2, nx // 2 + 1) product,
    much cheaper than a full-size FFT.
    """
    k = kernel.shape[0]
    half = k // 2
    fold = np.full(half + 1, 2.0)
    fold[0] = 1.0
    quarter = kernel[half:, half:].astype(np.float64) * fold[:, None] * fold[None, :]
    offs = np.arange(half + 1, dtype=np.float64)
    ny, nx = shape
    cx = np.cos((2.0 * np.pi / nx) * np.outer(offs, np.arange(nx // 2 + 1)))  # (k/2, nx//2+1)
    cy = np.cos((2.0 * np.pi / ny) * np.outer(np.arange(ny), offs))  # (ny, k/2)
    # the result is stored as float32: the last product may as well be one
    return cy.astype(np.float32) @ (quarter @ cx).astype(np.float32)


def smooth_disc(image, diameter, *, workers=None):
    """Convolve ``image`` with :func:`disc_kernel` by FFT.

    Parameters
    ----------
    image : ndarray of shape (h, w), float32
        Image, already validated; invalid pixels should have been filled.
    diameter : float
        Disc diameter in pixels.
    workers : int, optional
        Threads for :mod:`scipy.fft`.

    Returns
    -------
    ndarray of shape (h, w), float32
        The smoothed image; pixel ``(i, j)`` is the kernel-weighted mean of the
        pixels around ``(i, j)``.

    Notes
    -----
    The convolution is circular on a fast FFT length at least the image size,
    the image being padded with its own edge values. Only pixels within the
    kernel radius of the border can see the wrap (never a hole that could be
    measured: its window would not fit in the image).
    """
    kernel = disc_kernel(diameter)
    h, w = image.shape
    shape = (_fft.next_fast_len(h, real=True), _fft.next_fast_len(w, real=True))
    data = image
    if shape != (h, w):
        data = np.pad(image, ((0, shape[0] - h), (0, shape[1] - w)), mode="edge")
    spec = _fft.rfft2(data, workers=workers)
    spec *= _kernel_spectrum(kernel, shape)
    full = _fft.irfft2(spec, s=shape, workers=workers)
    return np.ascontiguousarray(full[:h, :w], dtype=np.float32)
