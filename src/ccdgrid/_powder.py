"""Powder rings seen through a known distortion, integrated with pyFAI.

Private support for ``benchmarks/integration.py`` and
``tests/test_integration_pyfai.py``: it checks a calibration where it is used,
in pyFAI's azimuthal integration, against the exact distortion of a synthetic
detector.

Physical model (lengths in px of the detector unless stated, (y, x) order):

* The detector is flat and normal to the beam (no tilt), at ``dist`` metres
  from the sample. The pixel seen at index coordinates ``p`` records what
  arrives at the *true* position ``t = p + d(p)``, with ``d`` the synthetic
  field (:class:`ccdgrid.synthetic.SyntheticDistortion`, same sign
  convention as ccdgrid's maps and pyFAI's ``set_dy``/``set_dx``).
* True positions become metres through rectangular pixels ``(pixel1,
  pixel2)`` in pyFAI's frame, whose origin is the outer corner of pixel
  ``(0, 0)``: ``y_m = (t_y + 0.5) * pixel1``, ``x_m = (t_x + 0.5) * pixel2``
  (pyFAI puts pixel centres at ``index + 0.5``, ccdgrid at ``index``).
* The rings are Gaussians in the radius ``r`` from the beam centre (the
  PONI, as there is no tilt), of standard deviation ``sigma_px`` pixels;
  without tilt ``2 theta = arctan(r / dist)`` is monotonic in ``r``, so a
  ring sharp in ``r`` is sharp in ``2 theta``.
* Each pixel's value is the mean of the intensity over ``supersample²``
  points spread evenly over the pixel (a box integral), plus a flat
  background, with Poisson noise. Solid angle and polarisation are left
  out: the integration is run without their corrections.

Choosing the pixel size. ccdgrid's detector file gives each pixel the size
that makes the *fitted* hole lattice a square of side ``pitch``
(:func:`ccdgrid.gridfit.pixel_size_from_vectors`); its maps are the
departure from that lattice. The generator's ideal lattice has a
rotation and an aspect ratio (its plate is square, ``shear_deg`` 0: ccdgrid
takes the plate for square and would correct a shear of the plate as the
detector's), and its field has no affine part. The same rule applied to
the generator's exact lattice vectors gives the truth pixel size, so the
truth detector ``(field's corner maps, that pixel size)`` and ccdgrid's
file describe the same physical frame. A rotation of that frame moves
nothing on a centred ring, so the comparison is between what ccdgrid
measured and what it would have produced from perfect hole positions.
"""

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PowderSetup",
    "RingFit",
    "fit_beam_centre",
    "fit_rings",
    "integrate_rings",
    "regular_detector",
    "render_powder",
    "truth_detector",
    "truth_pixel_size",
]

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_BLOCK_ROWS = 64  # detector rows rendered at a time (bounds the sub-sample temporaries)


@dataclass(frozen=True)
class PowderSetup:
    """Geometry and rings of a synthetic powder exposure.

    Attributes
    ----------
    shape : tuple of 2 int
        ``(ny, nx)`` of the detector.
    pixel_size : tuple of 2 float, m
        ``(pixel1, pixel2)`` of the true frame (along y, along x).
    dist : float, m
        Sample-detector distance.
    centre : tuple of 2 float, px
        Beam centre ``(y, x)`` in ccdgrid index coordinates of the true frame.
    radii_px : tuple of float, px
        Ring radii in units of ``sqrt(pixel1 * pixel2)``.
    sigma_px : float, px
        Radial standard deviation of every ring, same unit.
    peak : float, counts
        Ring peak height above the background.
    background : float, counts
        Flat background.
    wavelength : float, m
        Only passed to pyFAI (it does not enter ``r``).
    """

    shape: tuple
    pixel_size: tuple
    dist: float = 0.1
    centre: tuple = (0.0, 0.0)
    radii_px: tuple = ()
    sigma_px: float = 1.5
    peak: float = 2000.0
    background: float = 100.0
    wavelength: float = 1e-10

    @property
    def unit_m(self):
        """Length of one radial "px", m: the geometric mean pixel size."""
        return float(np.sqrt(self.pixel_size[0] * self.pixel_size[1]))

    @property
    def poni(self):
        """``(poni1, poni2)`` in m: the beam centre in pyFAI's frame."""
        return (
            (self.centre[0] + 0.5) * self.pixel_size[0],
            (self.centre[1] + 0.5) * self.pixel_size[1],
        )

    @property
    def two_theta_deg(self):
        """Ring angles ``2 theta``, degrees, ndarray of shape (K,)."""
        r = np.asarray(self.radii_px, dtype=np.float64) * self.unit_m
        return np.degrees(np.arctan2(r, self.dist))


def truth_pixel_size(lattice, pitch):
    """Pixel size ccdgrid would derive from the exact lattice, ``(pixel1, pixel2)`` in m.

    Parameters
    ----------
    lattice : ccdgrid.synthetic.Lattice
        The generator's ideal lattice (vectors in px).
    pitch : float, m
        Hole spacing of the plate.
    """
    from .gridfit import pixel_size_from_vectors

    return pixel_size_from_vectors(np.stack([lattice.a1, lattice.a2]), pitch)


def render_powder(setup, field, *, supersample=3, seed=0, noise=True):
    """Powder image recorded by a detector whose distortion is ``field``.

    Parameters
    ----------
    setup : PowderSetup
    field : ccdgrid.synthetic.SyntheticDistortion or None
        ``d(p)`` in px; None for an undistorted detector.
    supersample : int
        Points per pixel along each axis for the box integral.
    seed : int
        Seed of the Poisson noise.
    noise : bool
        Add Poisson noise (else the exact expectation is returned).

    Returns
    -------
    ndarray of shape ``setup.shape``, float64, counts
    """
    ny, nx = setup.shape
    n = int(supersample)
    offsets = (np.arange(n) + 0.5) / n - 0.5  # sub-pixel centres, px
    xs = (np.arange(nx)[:, None] + offsets).ravel()
    p1, p2 = setup.pixel_size
    cy, cx = setup.centre
    radii = np.asarray(setup.radii_px, dtype=np.float64)
    inv_two_var = 0.5 / setup.sigma_px**2
    out = np.empty((ny, nx), dtype=np.float64)
    for y0 in range(0, ny, _BLOCK_ROWS):
        y1 = min(ny, y0 + _BLOCK_ROWS)
        ys = (np.arange(y0, y1)[:, None] + offsets).ravel()
        if field is None:
            ty = np.broadcast_to(ys[:, None], (len(ys), len(xs)))
            tx = np.broadcast_to(xs[None, :], (len(ys), len(xs)))
        else:
            dy, dx = field.grid(ys, xs)
            ty = ys[:, None] + dy
            tx = xs[None, :] + dx
        # radius in units of the geometric-mean pixel, measured in metres first
        r = np.hypot((ty - cy) * p1, (tx - cx) * p2) / setup.unit_m
        inten = np.zeros_like(r)
        for rk in radii:
            inten += np.exp(-((r - rk) ** 2) * inv_two_var)
        out[y0:y1] = inten.reshape(y1 - y0, n, nx, n).mean(axis=(1, 3))
    out = setup.background + setup.peak * out
    if noise:
        out = np.random.default_rng(seed).poisson(out).astype(np.float64)
    return out


def regular_detector(shape, pixel_size):
    """pyFAI detector with rectangular pixels and no distortion."""
    from pyFAI.detectors import Detector

    return Detector(pixel1=pixel_size[0], pixel2=pixel_size[1], max_shape=tuple(shape))


def truth_detector(field, shape, pixel_size):
    """pyFAI detector carrying the exact distortion ``field`` on its pixel corners."""
    det = regular_detector(shape, pixel_size)
    dy, dx = field.corner_maps(shape)
    det.set_dy(dy)
    det.set_dx(dx)
    return det


@dataclass
class RingFit:
    """Fitted rings of one integrated profile.

    Attributes
    ----------
    radius_px, fwhm_px : ndarray of shape (K,), float64, px
        Gaussian centre and FWHM of each ring, in ``setup.unit_m`` units.
    two_theta_deg : ndarray of shape (K,), float64, degrees
        Centre as ``2 theta``.
    radius_err, fwhm_err : ndarray of shape (K,), float64, px
        1-sigma uncertainties from the fit's covariance.
    r_px, intensity : ndarray, float64
        The integrated profile (radius in px, mean counts).
    """

    radius_px: np.ndarray
    fwhm_px: np.ndarray
    two_theta_deg: np.ndarray
    radius_err: np.ndarray
    fwhm_err: np.ndarray
    r_px: np.ndarray
    intensity: np.ndarray


def fit_beam_centre(image, detector, setup, *, mask=None, iterations=3, half_window=4.0):
    """PONI ``(poni1, poni2)`` in m: the common centre of the rings as ``detector`` sees them.

    Each detector model puts the pixels in its own frame: ccdgrid's frame is
    its fitted lattice's, which may be translated (and scaled by a few 1e-4)
    from the generator's. A translated beam centre would smear every ring
    by ``± shift``, so the centre is fitted for each detector, as one would
    refine the PONI on a calibrant.

    Parameters
    ----------
    image : ndarray of shape ``setup.shape``
    detector : pyFAI.detectors.Detector
    setup : PowderSetup
        Gives the starting centre (``setup.poni``) and the ring radii.
    mask : ndarray of shape ``setup.shape`` or None
        Nonzero for pixels to leave out.
    iterations : int
        Refits, each re-selecting the pixels around the rings.
    half_window : float
        Pixels within ``half_window * sigma_px`` of a ring are used.

    Returns
    -------
    tuple of 2 float, m

    Notes
    -----
    A weighted algebraic (Kåsa) circle fit with one centre for all rings:
    ``|x|² = 2 c . x + b_k`` is linear in ``(c, b_1 .. b_K)``; each pixel is
    weighted by its counts above the background. A ring symmetric about its
    centre gives an unbiased centre.
    """
    pos1, pos2 = detector.calc_cartesian_positions()[:2]
    pos1 = np.asarray(pos1, dtype=np.float64)
    pos2 = np.asarray(pos2, dtype=np.float64)
    good = np.isfinite(pos1) & np.isfinite(pos2)
    if mask is not None:
        good &= np.asarray(mask) == 0
    weight = np.asarray(image, dtype=np.float64) - setup.background
    centre = np.array(setup.poni, dtype=np.float64)
    unit = setup.unit_m
    # coordinates in px about the starting centre keep the normal equations well scaled
    y = (pos1[good] - centre[0]) / unit
    x = (pos2[good] - centre[1]) / unit
    w = weight[good]
    shift = np.zeros(2)
    k_count = len(setup.radii_px)
    for _ in range(iterations):
        r = np.hypot(y - shift[0], x - shift[1])
        rows, rhs, wts = [], [], []
        for k, rk in enumerate(setup.radii_px):
            sel = (np.abs(r - rk) <= half_window * setup.sigma_px) & (w > 0)
            design = np.zeros((int(sel.sum()), 2 + k_count))
            design[:, 0] = 2 * y[sel]
            design[:, 1] = 2 * x[sel]
            design[:, 2 + k] = 1.0
            rows.append(design)
            rhs.append(y[sel] ** 2 + x[sel] ** 2)
            wts.append(np.sqrt(w[sel]))
        design, rhs, wts = np.vstack(rows), np.concatenate(rhs), np.concatenate(wts)
        sol, *_ = np.linalg.lstsq(design * wts[:, None], rhs * wts, rcond=None)
        shift = sol[:2]
    return tuple(centre + shift * unit)


def integrate_rings(
    image,
    detector,
    setup,
    *,
    poni=None,
    mask=None,
    bin_px=0.25,
    method=("full", "csr", "cython"),
):
    """Azimuthal profile of ``image`` in px of radius, with pyFAI.

    Parameters
    ----------
    image : ndarray of shape ``setup.shape``
    detector : pyFAI.detectors.Detector
    setup : PowderSetup
        Gives the distance, the wavelength and the default PONI.
    poni : tuple of 2 float or None, m
        ``(poni1, poni2)``; None: ``setup.poni``.
    mask : ndarray of shape ``setup.shape`` or None
        Nonzero for pixels to leave out.
    bin_px : float, px
        Radial bin width.
    method : tuple
        pyFAI integration method; the default splits every pixel over the
        polygon of its four (distorted) corners.

    Returns
    -------
    r_px, intensity : ndarray of shape (M,), float64
    """
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    poni1, poni2 = setup.poni if poni is None else poni
    ai = AzimuthalIntegrator(
        dist=setup.dist, poni1=poni1, poni2=poni2, detector=detector, wavelength=setup.wavelength
    )
    lo = (min(setup.radii_px) - 12 * setup.sigma_px) * setup.unit_m * 1e3
    hi = (max(setup.radii_px) + 12 * setup.sigma_px) * setup.unit_m * 1e3
    npt = int(np.ceil((hi - lo) / (bin_px * setup.unit_m * 1e3)))
    res = ai.integrate1d(
        image,
        npt,
        unit="r_mm",
        method=method,
        radial_range=(lo, hi),
        correctSolidAngle=False,
        mask=mask,
    )
    return np.asarray(res.radial) * 1e-3 / setup.unit_m, np.asarray(res.intensity)


def _gauss(r, amp, centre, sigma, base):
    return base + amp * np.exp(-0.5 * ((r - centre) / sigma) ** 2)


def fit_rings(r_px, intensity, setup, *, half_window=6.0):
    """Gaussian-plus-constant fit of every ring of ``setup``.

    Parameters
    ----------
    r_px, intensity : ndarray of shape (M,), float64
        Profile from :func:`integrate_rings`.
    setup : PowderSetup
    half_window : float
        Half-width of the fitted window around each nominal radius, in units
        of ``setup.sigma_px``.

    Returns
    -------
    RingFit
    """
    from scipy.optimize import curve_fit

    centres, fwhm, c_err, w_err = [], [], [], []
    ok = np.isfinite(intensity)
    for rk in setup.radii_px:
        sel = ok & (np.abs(r_px - rk) <= half_window * setup.sigma_px)
        x, y = r_px[sel], intensity[sel]
        base = float(np.median(np.concatenate([y[:3], y[-3:]])))
        p0 = (float(y.max()) - base, float(x[np.argmax(y)]), setup.sigma_px, base)
        popt, pcov = curve_fit(_gauss, x, y, p0=p0)
        perr = np.sqrt(np.diag(pcov))
        centres.append(popt[1])
        fwhm.append(abs(popt[2]) * _FWHM_PER_SIGMA)
        c_err.append(perr[1])
        w_err.append(perr[2] * _FWHM_PER_SIGMA)
    centres = np.array(centres)
    return RingFit(
        radius_px=centres,
        fwhm_px=np.array(fwhm),
        two_theta_deg=np.degrees(np.arctan2(centres * setup.unit_m, setup.dist)),
        radius_err=np.array(c_err),
        fwhm_err=np.array(w_err),
        r_px=r_px,
        intensity=intensity,
    )
