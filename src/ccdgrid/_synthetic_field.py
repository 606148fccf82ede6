"""The analytic displacement field behind :mod:`ccdgrid.synthetic`.

A :class:`SyntheticDistortion` is a smooth map ``d(p)`` on detector index
coordinates ``p = (y, x)`` (pixel ``(i, j)`` centred at ``(i, j)``), with the
pyFAI ``set_dx``/``set_dy`` sign: the true (ideal, undistorted) position of
what is seen at ``p`` is ``p + d(p)``. It is a cubic polynomial plus a sum of
plane cosine waves in the normalised coordinate ``u = (p - centre) / scale``,
so it can be evaluated exactly (no interpolation) at any point, and on a
rectangular grid with one small matrix product per component.
"""

import numpy as np

from .errors import CcdgridError

__all__ = ["SyntheticDistortion", "random_distortion"]

_DEGREE = 3  # polynomial part: monomials uy**m * ux**n with m + n <= 3
_N_WAVES = 24
# Wavelengths of the random cosines, in units of the largest image side:
# longer than the image, as a taper's distortion is smooth at the hole pitch.
_WAVELENGTH_RANGE = (0.7, 4.0)
_CHUNK = 65536  # points per block when evaluating (N, K) cosine phases


class SyntheticDistortion:
    """Smooth analytic displacement field on detector index coordinates.

    ``d(p) = P(u) + sum_k a_k cos(f_k . u + phi_k)`` for each component, with
    ``u = (p - centre) / scale`` and ``P`` a polynomial of degree 3.

    Parameters
    ----------
    centre : array_like of shape (2,), float, px
        ``(y, x)`` index coordinates of ``u = 0``.
    scale : float, px
        Length that maps to ``|u| = 1``.
    poly : array_like of shape (2, 4, 4), float, px
        ``poly[c, m, n]`` multiplies ``uy**m * ux**n`` in component ``c``
        (0 = dy, 1 = dx). Entries with ``m + n > 3`` must be zero.
    freqs : array_like of shape (K, 2), float, rad per unit of ``u``
        Wave vectors ``(fy, fx)``.
    amps : array_like of shape (2, K), float, px
        Amplitudes of the waves in dy (row 0) and dx (row 1).
    phases : array_like of shape (2, K), float, rad
        Phases of the waves in dy and dx.

    Notes
    -----
    Convention (as pyFAI's ``Detector.set_dx``/``set_dy`` and ccdgrid's maps):
    a feature whose ideal (undistorted) position is ``q`` is seen on the
    detector at the point ``p`` with ``p + d(p) = q``; :meth:`detector_position`
    solves that equation.
    """

    def __init__(self, centre, scale, poly, freqs, amps, phases):
        self.centre = np.array(centre, dtype=np.float64).reshape(2)
        self.scale = float(scale)
        self.poly = np.array(poly, dtype=np.float64).reshape(2, _DEGREE + 1, _DEGREE + 1)
        self.freqs = np.array(freqs, dtype=np.float64).reshape(-1, 2)
        k = len(self.freqs)
        self.amps = np.array(amps, dtype=np.float64).reshape(2, k)
        self.phases = np.array(phases, dtype=np.float64).reshape(2, k)
        if not self.scale > 0:
            raise CcdgridError(f"`scale` must be > 0, got {scale!r}")

    def __repr__(self):
        return (
            f"SyntheticDistortion(centre=({self.centre[0]:g}, {self.centre[1]:g}), "
            f"scale={self.scale:g}, "
            f"{len(self.freqs)} waves)"
        )

    def scaled(self, factor):
        """Return a copy whose displacement is ``factor`` times this one."""
        return SyntheticDistortion(
            self.centre,
            self.scale,
            self.poly * factor,
            self.freqs,
            self.amps * factor,
            self.phases,
        )

    # -- evaluation at points ---------------------------------------------
    def displacement(self, points):
        """Displacement ``(dy, dx)`` at arbitrary detector points.

        Parameters
        ----------
        points : array_like of shape (N, 2) or (2,), float, px
            ``(y, x)`` index coordinates.

        Returns
        -------
        ndarray of shape (N, 2), float64, px
            ``(dy, dx)``; the ideal position of ``points`` is
            ``points + displacement(points)``.
        """
        p = _points(points)
        out = np.empty_like(p)
        for s in range(0, len(p), _CHUNK):
            u = (p[s : s + _CHUNK] - self.centre) / self.scale
            phase_base = u @ self.freqs.T  # (n, K)
            for c in range(2):
                val = np.polynomial.polynomial.polyval2d(u[:, 0], u[:, 1], self.poly[c])
                val += np.cos(phase_base + self.phases[c]) @ self.amps[c]
                out[s : s + _CHUNK, c] = val
        return out

    def jacobian(self, points):
        """Derivatives ``J[n, a, b] = d(d_a)/d(p_b)`` at detector points.

        Parameters
        ----------
        points : array_like of shape (N, 2), float, px
            ``(y, x)`` index coordinates.

        Returns
        -------
        ndarray of shape (N, 2, 2), float64, dimensionless
            Axis 1 is the component (dy, dx), axis 2 the coordinate (y, x).
        """
        p = _points(points)
        out = np.empty((len(p), 2, 2))
        for s in range(0, len(p), _CHUNK):
            u = (p[s : s + _CHUNK] - self.centre) / self.scale
            phase_base = u @ self.freqs.T
            for c in range(2):
                sines = np.sin(phase_base + self.phases[c]) * self.amps[c]  # (n, K)
                for b in range(2):
                    dpoly = np.polynomial.polynomial.polyder(self.poly[c], axis=b)
                    val = np.polynomial.polynomial.polyval2d(u[:, 0], u[:, 1], dpoly)
                    val -= sines @ self.freqs[:, b]
                    out[s : s + _CHUNK, c, b] = val / self.scale
        return out

    # -- evaluation on grids ----------------------------------------------
    def grid(self, ys, xs):
        """Displacement on the outer grid of coordinate vectors.

        Parameters
        ----------
        ys : array_like of shape (H,), float, px
            Row (y) index coordinates.
        xs : array_like of shape (W,), float, px
            Column (x) index coordinates.

        Returns
        -------
        dy, dx : ndarray of shape (H, W), float64, px
            ``d`` at the points ``(ys[a], xs[b])``, exactly as
            :meth:`displacement` would give (up to rounding).
        """
        uy = (np.asarray(ys, dtype=np.float64).ravel() - self.centre[0]) / self.scale
        ux = (np.asarray(xs, dtype=np.float64).ravel() - self.centre[1]) / self.scale
        powers = np.arange(_DEGREE + 1)
        vy = uy[:, None] ** powers  # (H, 4)
        vx = ux[:, None] ** powers  # (W, 4)
        # cos(fy uy + fx ux + phi) = cos(fy uy) cos(fx ux + phi) - sin(fy uy) sin(fx ux + phi):
        # each component is then one (H, 4 + 2K) @ (4 + 2K, W) product.
        ay = uy[:, None] * self.freqs[:, 0]
        cy, sy = np.cos(ay), np.sin(ay)
        ax = ux[:, None] * self.freqs[:, 1]
        maps = []
        for c in range(2):
            left = np.hstack([vy @ self.poly[c], cy * self.amps[c], -sy * self.amps[c]])
            bx = ax + self.phases[c]
            right = np.hstack([vx, np.cos(bx), np.sin(bx)])
            maps.append(left @ right.T)
        return maps[0], maps[1]

    def corner_maps(self, shape):
        """Displacement maps on the pixel-corner grid of an image.

        Parameters
        ----------
        shape : tuple of 2 int
            ``(ny, nx)`` of the image.

        Returns
        -------
        dy, dx : ndarray of shape (ny + 1, nx + 1), float64, px
            ``d`` at corner ``(i, j)``, which sits at index coordinates
            ``(i - 0.5, j - 0.5)`` -- the arrays pyFAI's corner-shaped
            ``set_dy``/``set_dx`` take.
        """
        ny, nx = _shape(shape)
        return self.grid(np.arange(ny + 1) - 0.5, np.arange(nx + 1) - 0.5)

    def center_maps(self, shape):
        """Displacement maps at the pixel centres, each of shape ``shape`` (float64, px)."""
        ny, nx = _shape(shape)
        return self.grid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64))

    def peak(self, shape, n=129):
        """Largest ``|d|`` (px) on an ``n x n`` grid spanning the image's pixel area."""
        ny, nx = _shape(shape)
        dy, dx = self.grid(np.linspace(-0.5, ny - 0.5, n), np.linspace(-0.5, nx - 0.5, n))
        return float(np.sqrt(dy * dy + dx * dx).max())

    def max_strain(self, shape, n=65):
        """Largest ``|dd_a/dp_b|`` (dimensionless) on an ``n x n`` grid over the image."""
        ny, nx = _shape(shape)
        ys, xs = np.meshgrid(np.linspace(-0.5, ny - 0.5, n), np.linspace(-0.5, nx - 0.5, n))
        jac = self.jacobian(np.stack([ys.ravel(), xs.ravel()], axis=1))
        return float(np.abs(jac).max())

    # -- inverse ------------------------------------------------------------
    def detector_position(self, ideal, tol=1e-9, max_iter=50):
        """Solve ``p + d(p) = ideal`` for the detector position ``p``.

        Parameters
        ----------
        ideal : array_like of shape (N, 2), float, px
            Ideal (undistorted) ``(y, x)`` positions.
        tol : float, px
            Convergence threshold on the largest Newton step.
        max_iter : int
            Newton iterations allowed.

        Returns
        -------
        ndarray of shape (N, 2), float64, px
            Detector ``(y, x)`` index coordinates where those points are seen.

        Raises
        ------
        CcdgridError
            If Newton's method does not converge (a field that folds over).
        """
        q = _points(ideal)
        p = q - self.displacement(q)
        for _ in range(max_iter):
            resid = p + self.displacement(p) - q
            jac = self.jacobian(p)
            jac[:, 0, 0] += 1.0
            jac[:, 1, 1] += 1.0
            step = np.linalg.solve(jac, resid[:, :, None])[:, :, 0]
            p -= step
            if len(p) == 0 or np.abs(step).max() < tol:
                break
        else:
            raise CcdgridError(
                "the distortion field is not invertible (Newton did not converge); "
                "reduce `distortion_px`"
            )
        return p


def random_distortion(shape, peak_px, rng):
    """Draw a smooth FReLoN-like displacement field with a given peak.

    Parameters
    ----------
    shape : tuple of 2 int
        ``(ny, nx)`` of the image the field covers.
    peak_px : float, px
        Largest ``|d|`` over the image area after normalisation (0 gives a
        zero field).
    rng : numpy.random.Generator
        Source of randomness (consumed, so the field depends only on it).

    Returns
    -------
    SyntheticDistortion

    Notes
    -----
    Barrel/pincushion ``k u |u|**2`` (random sign) and weaker random quadratic
    and cubic terms carry about 60 % of the peak; 24 cosines with wavelengths
    0.7-4 times the largest image side, amplitudes falling as ``f**-1.5``,
    the rest. The least-squares affine part over the image (invisible to a
    calibration, which fits its own lattice) is removed, then the field is
    scaled so that its peak on a 129 x 129 grid over the image is
    ``peak_px``.
    """
    ny, nx = shape
    centre = ((ny - 1) / 2.0, (nx - 1) / 2.0)
    scale = max(ny, nx) / 2.0
    poly = np.zeros((2, _DEGREE + 1, _DEGREE + 1))
    kappa = rng.choice([-1.0, 1.0])
    poly[0, 3, 0] = poly[0, 1, 2] = kappa  # dy = k uy (uy^2 + ux^2)
    poly[1, 2, 1] = poly[1, 0, 3] = kappa  # dx = k ux (uy^2 + ux^2)
    m, n = np.meshgrid(np.arange(_DEGREE + 1), np.arange(_DEGREE + 1), indexing="ij")
    higher = (m + n >= 2) & (m + n <= _DEGREE)
    poly[:, higher] += rng.normal(0.0, 0.25, size=(2, int(higher.sum())))

    # u spans 2 over the largest side: wavelength L sides -> 2 L in u.
    wavelength = 2.0 * rng.uniform(*_WAVELENGTH_RANGE, size=_N_WAVES)
    fnorm = 2.0 * np.pi / wavelength
    angle = rng.uniform(0.0, 2.0 * np.pi, size=_N_WAVES)
    freqs = np.stack([fnorm * np.sin(angle), fnorm * np.cos(angle)], axis=1)
    amps = rng.normal(size=(2, _N_WAVES)) * (fnorm.min() / fnorm) ** 1.5
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(2, _N_WAVES))

    poly_part = SyntheticDistortion(centre, scale, poly, freqs[:0], amps[:, :0], phases[:, :0])
    wave_part = SyntheticDistortion(centre, scale, poly * 0.0, freqs, amps, phases)
    poly *= 0.6 / max(poly_part.peak(shape, n=33), 1e-300)
    amps *= 0.4 / max(wave_part.peak(shape, n=33), 1e-300)
    field = _without_affine(SyntheticDistortion(centre, scale, poly, freqs, amps, phases), shape)
    current = field.peak(shape)
    return field.scaled(peak_px / current if current > 0 else 0.0)


def _without_affine(field, shape, n=65):
    """The field minus its least-squares affine part over the image area.

    A calibration measures holes against a fitted lattice, so an affine part
    of ``d`` only moves, turns and stretches the lattice: it is invisible.
    Removing it makes the peak ``|d|`` a measure of what can be seen. The
    affine part is folded into the constant and linear polynomial terms, so
    the field stays exactly analytic.
    """
    ny, nx = shape
    ys = np.linspace(-0.5, ny - 0.5, n)
    xs = np.linspace(-0.5, nx - 0.5, n)
    dy, dx = field.grid(ys, xs)
    uy, ux = np.meshgrid(
        (ys - field.centre[0]) / field.scale, (xs - field.centre[1]) / field.scale, indexing="ij"
    )
    design = np.stack([np.ones(uy.size), uy.ravel(), ux.ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.stack([dy.ravel(), dx.ravel()], axis=1), rcond=None)
    poly = field.poly.copy()
    for c in range(2):
        poly[c, 0, 0] -= coef[0, c]
        poly[c, 1, 0] -= coef[1, c]
        poly[c, 0, 1] -= coef[2, c]
    return SyntheticDistortion(
        field.centre, field.scale, poly, field.freqs, field.amps, field.phases
    )


def _points(points):
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1 and p.size == 2:
        p = p.reshape(1, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise CcdgridError(f"`points` must have shape (N, 2), got {p.shape}")
    return p


def _shape(shape):
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise CcdgridError(f"`shape` must be a pair of ints, got {shape!r}") from None
    if ny <= 0 or nx <= 0:
        raise CcdgridError(f"`shape` must be positive, got {shape!r}")
    return ny, nx
