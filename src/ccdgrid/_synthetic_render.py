"""Image formation for :mod:`ccdgrid.synthetic`: holes, taper, fibres, noise.

Everything here works on ``(y, x)`` index coordinates (pixel ``(i, j)`` centred
at ``(i, j)``) and on small row blocks of the image, so a 4096² image never
needs more than a couple of full-size float32 arrays.
"""

import numpy as np
from scipy import ndimage

__all__ = ["DetectorResponse", "render_holes"]

_SUBROWS = 32  # sub-rows of a pixel cut by a hole's edge (exact chord in x)
_EDGE_CHUNK = 8192  # edge pixels per vectorised sub-row batch
_TABLE_SIZE = 1 << 16  # per-cell gain tables, indexed by (column, row) mod 256


def render_holes(out, centres, forms, radius, amplitudes, psf_sigma, tail_fraction, tail_sigma):
    """Add anti-aliased, PSF-blurred elliptical holes into ``out``.

    Parameters
    ----------
    out : ndarray of shape (ny, nx), float32
        Image the holes are added to, in place.
    centres : ndarray of shape (M, 2), float64, px
        ``(y, x)`` detector positions of the hole centres.
    forms : ndarray of shape (M, 2, 2), float64
        Per hole, the linear map ``B`` from a detector offset ``s - centre`` to
        the offset on the plate (in px at the nominal pitch): a pixel point
        ``s`` is inside the hole when ``|B (s - centre)| <= radius``.
    radius : float, px
        Hole radius on the plate.
    amplitudes : ndarray of shape (M,), float
        Value of a fully covered pixel before the PSF.
    psf_sigma : float, px
        Standard deviation of the Gaussian PSF core (0 = no blur).
    tail_fraction : float
        Fraction of the flux in a wider Gaussian tail (0 = none).
    tail_sigma : float, px
        Standard deviation of that tail.

    Notes
    -----
    The hole is the exact image of the plate's disc under the local affine
    approximation of the distortion at its centre, so its centroid is the
    centre exactly (the second-order term is ~1e-4 px for the fields drawn
    here). Pixels cut by the edge are integrated exactly along x over 32
    sub-rows; the PSF is applied
    per hole window (symmetric and untruncated), which keeps the centroid.
    """
    m = len(centres)
    if m == 0:
        return
    inv = np.linalg.inv(forms)
    # Half-size of the window that holds the whole ellipse, and of the PSF pad.
    extent = radius * np.linalg.norm(inv, ord=2, axis=(1, 2)).max()
    hc = int(np.ceil(extent + 1.5))
    sigmas = [psf_sigma] if psf_sigma > 0 else []
    if tail_fraction > 0:
        sigmas.append(tail_sigma)
    pad = int(np.ceil(4.0 * max(sigmas))) if sigmas else 0
    hw = hc + pad

    base = np.rint(centres).astype(np.int64)
    k = np.arange(-hc, hc + 1)
    dy = (base[:, 0, None] + k) - centres[:, 0, None]  # (M, wc)
    dx = (base[:, 1, None] + k) - centres[:, 1, None]
    b = forms
    vy = b[:, 0, 0, None, None] * dy[:, :, None] + b[:, 0, 1, None, None] * dx[:, None, :]
    vx = b[:, 1, 0, None, None] * dy[:, :, None] + b[:, 1, 1, None, None] * dx[:, None, :]
    g = np.sqrt(vy * vy + vx * vx) - radius  # (M, wc, wc), plate px
    del vy, vx
    coverage = (g <= 0).astype(np.float32)
    # A pixel's farthest point is 0.71 px from its centre, i.e. at most
    # 0.71 * |B|_2 plate px: beyond that the pixel is wholly in or out.
    threshold = 0.75 * np.linalg.norm(b, ord=2, axis=(1, 2))
    edge = np.nonzero(np.abs(g) < threshold[:, None, None])
    del g
    # Edge pixels: split into sub-rows; the chord of the ellipse along each
    # sub-row is exact, so only y is sampled (midpoint rule).
    quad = np.einsum("mki,mkj->mij", b, b)  # |B s|^2 = s^T quad s
    sub = (np.arange(_SUBROWS) + 0.5) / _SUBROWS - 0.5
    r2 = radius * radius
    for s in range(0, len(edge[0]), _EDGE_CHUNK):
        h, a, c = (e[s : s + _EDGE_CHUNK] for e in edge)
        qyy = quad[h, 0, 0, None]
        qyx = quad[h, 0, 1, None]
        qxx = quad[h, 1, 1, None]
        py = dy[h, a][:, None] + sub  # (E, S) sub-row offsets from the centre
        # qxx x^2 + 2 qyx py x + qyy py^2 - r^2 <= 0
        disc = (qyx * qyx - qxx * qyy) * py * py + qxx * r2
        half = np.sqrt(np.maximum(disc, 0.0)) / qxx
        mid = -qyx * py / qxx
        x0 = dx[h, c][:, None]
        lo = np.maximum(mid - half, x0 - 0.5)
        hi = np.minimum(mid + half, x0 + 0.5)
        covered = np.where(disc > 0, np.clip(hi - lo, 0.0, 1.0), 0.0)
        coverage[h, a, c] = covered.mean(axis=1)

    stack = np.zeros((m, 2 * hw + 1, 2 * hw + 1), dtype=np.float32)
    stack[:, pad : pad + 2 * hc + 1, pad : pad + 2 * hc + 1] = coverage
    del coverage
    if sigmas:
        blurred = _blur(stack, psf_sigma) if psf_sigma > 0 else stack.copy()
        if tail_fraction > 0:
            blurred *= 1.0 - tail_fraction
            blurred += tail_fraction * _blur(stack, tail_sigma)
        stack = blurred
    stack *= np.asarray(amplitudes, dtype=np.float32)[:, None, None]

    ny, nx = out.shape
    kk = np.arange(-hw, hw + 1)
    rows = base[:, 0, None] + kk  # (M, w)
    cols = base[:, 1, None] + kk
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    flat = rows[:, :, None] * nx + cols[:, None, :]
    # np.add.at, not fancy +=, so that overlapping windows (small pitch) add up.
    np.add.at(out.reshape(-1), flat[inside], stack[inside])


def _blur(stack, sigma):
    """Separable Gaussian blur of each window of a (M, w, w) stack, zero outside."""
    res = ndimage.gaussian_filter1d(stack, sigma, axis=1, mode="constant", truncate=4.0)
    return ndimage.gaussian_filter1d(res, sigma, axis=2, mode="constant", truncate=4.0)


class DetectorResponse:
    """Everything between the X-rays and the ADC except the holes.

    Holds the random parameters of one synthetic detector -- taper boundary,
    vignetting, fibre-bundle gain, smooth background -- and evaluates them on
    a block of rows.

    Parameters
    ----------
    shape : tuple of 2 int
        ``(ny, nx)``.
    rng : numpy.random.Generator
        Consumed once, here.
    taper : {"square", "circle", None}
        Shape of the lit area: a rounded square (half-extents 0.95 of the
        image's half-sizes, corner radius 0.3 of the smaller one), a circle of
        radius 0.95 of the smaller half-size, or the whole image.
    fibres : float
        Contrast of the fibre-bundle gain pattern: 1 for the default (1 %
        gain spread between fibres, 3 % darker cladding, 2 % spread between
        multifibres, boundaries up to 15 % darker), 0 for none.
    vignetting : bool
        Apply the intensity fall-off towards the edges.
    background : float, ADU
        Mean of the smooth dark/background level present everywhere.
    """

    edge_width = 2.0  # px over which the taper edge goes from lit to dark

    def __init__(self, shape, rng, taper="square", fibres=1.0, vignetting=True, background=50.0):
        ny, nx = shape
        self.shape = (ny, nx)
        half = np.array([ny / 2.0, nx / 2.0])
        # A real taper is never exactly centred on the chip.
        self.centre = (
            np.array([(ny - 1) / 2.0, (nx - 1) / 2.0]) + rng.uniform(-0.005, 0.005, 2) * half
        )
        self.taper = taper
        if taper == "circle":
            r = 0.95 * half.min()
            self.half_extent = np.array([r, r])
            self.corner_radius = r
        else:
            self.half_extent = 0.95 * half
            self.corner_radius = 0.3 * self.half_extent.min()
        self.vignetting = vignetting
        self.vig_scale = half.min()
        self.vig_alpha = rng.uniform(0.25, 0.35)
        # smooth background: mean * (1 + sum_k a_k cos(wy_k y + py_k) cos(wx_k x + px_k))
        self.background = float(background)
        self.bg_amp = rng.uniform(-0.08, 0.08, 3)
        self.bg_wy = rng.uniform(0.3, 1.5, 3) * np.pi / ny
        self.bg_wx = rng.uniform(0.3, 1.5, 3) * np.pi / nx
        self.bg_py = rng.uniform(0, 2 * np.pi, 3)
        self.bg_px = rng.uniform(0, 2 * np.pi, 3)
        self.fibres = float(fibres)
        self.cladding_depth = 0.03 * self.fibres
        self.fibre_pitch = rng.uniform(6.0, 9.0)
        self.fibre_gain = (1.0 + 0.01 * self.fibres * rng.standard_normal(_TABLE_SIZE)).astype(
            np.float32
        )
        self.multi_pitch = self.fibre_pitch * rng.uniform(7.0, 10.0)
        self.multi_gain = (1.0 + 0.02 * self.fibres * rng.standard_normal(_TABLE_SIZE)).astype(
            np.float32
        )
        # Most multifibre boundaries are faint, a few are clearly dark.
        self.wire_depth = (0.15 * self.fibres * rng.uniform(size=_TABLE_SIZE) ** 3).astype(
            np.float32
        )
        fibre_rows_along_x, multi_rows_along_x = rng.integers(0, 2, size=2).astype(bool)
        # The multifibre boundaries ("chicken wire") wander by a pixel or two.
        wobble = (
            rng.uniform(0.8, 2.0),
            2 * np.pi / rng.uniform(150.0, 400.0),
            rng.uniform(0, 2 * np.pi),
            rng.uniform(0.8, 2.0),
            rng.uniform(0, 2 * np.pi),
        )
        self._fibre_cells = self._multi_cells = None
        if self.fibres > 0:
            self._fibre_cells = _HexPattern(
                shape, self.fibre_pitch, fibre_rows_along_x, periods=4, width=1.2
            )
            self._multi_cells = _HexPattern(
                shape, self.multi_pitch, multi_rows_along_x, periods=2, width=1.6, wobble=wobble
            )

    def taper_distance(self, ys, xs):
        """Signed distance (px) to the taper edge, negative inside, (len(ys), len(xs))."""
        if self.taper is None:
            return np.full((len(ys), len(xs)), -np.inf)
        return self.point_distance(
            np.asarray(ys, dtype=np.float64)[:, None], np.asarray(xs, dtype=np.float64)[None, :]
        )

    def point_distance(self, y, x):
        """Signed distance (px) to the taper edge at points (broadcast), negative inside."""
        if self.taper is None:
            return np.full(np.broadcast(y, x).shape, -np.inf)
        rho = self.corner_radius
        qy = np.abs(y - self.centre[0]) - (self.half_extent[0] - rho)
        qx = np.abs(x - self.centre[1]) - (self.half_extent[1] - rho)
        outside = np.hypot(np.maximum(qy, 0.0), np.maximum(qx, 0.0))
        return outside + np.minimum(np.maximum(qy, qx), 0.0) - rho

    def block(self, y0, y1):
        """Evaluate the response on rows ``y0:y1``.

        Returns
        -------
        lit : ndarray of shape (y1 - y0, nx), float32
            Transmission of the taper: 1 inside, 0 outside, a linear ramp of
            :attr:`edge_width` px across the edge.
        gain : ndarray of shape (y1 - y0, nx), float32
            Vignetting times fibre-bundle gain (multiplies the X-ray signal).
        background : ndarray of shape (y1 - y0, nx), float32, ADU
            Smooth background level.
        """
        nx = self.shape[1]
        ys = np.arange(y0, y1, dtype=np.float64)
        xs = np.arange(nx, dtype=np.float64)
        if self.taper is None:
            lit = np.ones((len(ys), nx), dtype=np.float32)
        else:
            dist = self.taper_distance(ys, xs)
            lit = np.clip(0.5 - dist / self.edge_width, 0.0, 1.0).astype(np.float32)
        gain = self._fibre_gain(y0, y1) if self.fibres > 0 else np.ones((len(ys), nx), np.float32)
        if self.vignetting:
            ry = (self.vig_alpha * ((ys - self.centre[0]) / self.vig_scale) ** 2).astype(
                np.float32
            )
            rx = (self.vig_alpha * ((xs - self.centre[1]) / self.vig_scale) ** 2).astype(
                np.float32
            )
            vig = ry[:, None] + rx[None, :]
            vig += np.float32(1.0)
            vig *= vig
            gain /= vig
        left = self.bg_amp * np.cos(ys[:, None] * self.bg_wy + self.bg_py)
        right = np.cos(xs[:, None] * self.bg_wx + self.bg_px)
        bg = (self.background * (1.0 + left @ right.T)).astype(np.float32)
        return lit, gain, bg

    def _fibre_gain(self, y0, y1):
        cell, shape = self._fibre_cells.cells(y0, y1)
        gain = self.fibre_gain[cell]
        # cladding between fibres transmits a little less
        shape *= np.float32(-self.cladding_depth)
        shape += np.float32(1.0)
        gain *= shape
        cell, shape = self._multi_cells.cells(y0, y1)
        gain *= self.multi_gain[cell]
        shape *= self.wire_depth[cell]
        np.subtract(np.float32(1.0), shape, out=shape)
        gain *= shape
        return gain


class _HexPattern:
    """Hexagonal cells of a fibre bundle, tabulated over one period of rows.

    A hexagonal lattice whose rows run along x (or along y) is stretched by
    less than 1 % across its rows so that it repeats exactly every
    ``period`` image rows; one period is computed once, and any block of rows
    is then a gather plus a running cell index, ~10 array passes instead of
    ~60 for the nearest-centre search at every pixel.

    Parameters
    ----------
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.
    pitch : float, px
        Distance between neighbouring cell centres.
    rows_along_x : bool
        Orientation of the rows of cells.
    periods : int
        Pairs of cell rows (or cells along y) per tabulated period.
    width : float, px
        Half-width of the darker band along cell boundaries.
    wobble : tuple of 5 float or None
        ``(amp_y, k_x, phase_y, amp_x, phase_x)``: the pattern is sampled at
        ``y + amp_y sin(k_x x + phase_y)``, ``x + amp_x sin(2 pi y / period +
        phase_x)`` (px, rad/px, rad), so straight boundaries become wavy.
    """

    def __init__(self, shape, pitch, rows_along_x, periods, width, wobble=None):
        ny, nx = shape
        r3 = np.sqrt(3.0)
        if rows_along_x:
            self.period = max(1, round(pitch * r3 * periods))
            along, half_gap = pitch, self.period / (2.0 * periods)
        else:
            self.period = max(1, round(pitch * periods))
            along, half_gap = self.period / periods, pitch * r3 / 2.0
        # the running index along y grows by this much per period
        self.step = 2 * periods
        y = np.arange(min(self.period, ny), dtype=np.float64)[:, None]
        x = np.arange(nx, dtype=np.float64)[None, :]
        if wobble is not None:
            amp_y, k_x, phase_y, amp_x, phase_x = wobble
            y, x = (
                y + amp_y * np.sin(k_x * x + phase_y),
                x + amp_x * np.sin(2 * np.pi * y / self.period + phase_x),
            )
        s, t = (x, y) if rows_along_x else (y, x)
        # Centres: the rectangular lattice (along, 2 half_gap) and its copy
        # shifted by (along / 2, half_gap); the nearer rounded node wins.
        m1, n1 = np.rint(s / along), np.rint(t / (2 * half_gap))
        ds1, dt1 = s - m1 * along, t - n1 * 2 * half_gap
        m2, n2 = np.floor(s / along), np.floor(t / (2 * half_gap))
        ds2, dt2 = s - (m2 + 0.5) * along, t - (n2 + 0.5) * 2 * half_gap
        second = ds2 * ds2 + dt2 * dt2 < ds1 * ds1 + dt1 * dt1
        ds, dt = np.where(second, ds2, ds1), np.where(second, dt2, dt1)
        col = np.where(second, 2 * m2 + 1, 2 * m1).astype(np.int32)
        row = np.where(second, 2 * n2 + 1, 2 * n1).astype(np.int32)
        # Distance to the cell edge: the bisectors with the six neighbours
        # (+-along, 0) and (+-along / 2, +-half_gap).
        edge = 0.5 * along - np.abs(ds)
        link = np.hypot(0.5 * along, half_gap)
        for sign in (1.0, -1.0):
            proj = np.abs(0.5 * along * ds + sign * half_gap * dt) / link
            edge = np.minimum(edge, 0.5 * link - proj)
        self.along_y, self.along_x = (row, col) if rows_along_x else (col, row)
        self.band = (np.maximum(1.0 - edge / width, 0.0) ** 2).astype(np.float32)

    def cells(self, y0, y1):
        """Cells of rows ``y0:y1``.

        Returns
        -------
        index : ndarray of shape (y1 - y0, nx), int32
            Index of each pixel's cell into a 2**16 table (``(x, y)`` cell
            counters modulo 256).
        band : ndarray of shape (y1 - y0, nx), float32
            ``(1 - edge / width)**2`` within ``width`` px of a cell edge, else 0.
        """
        ys = np.arange(y0, y1)
        local, tile = np.divmod(ys, self.period)[::-1]
        vy = self.along_y[local]
        vy += (self.step * tile).astype(np.int32)[:, None]
        vy &= 255
        index = self.along_x[local]
        index &= 255
        index <<= 8
        index |= vy
        return index, self.band[local]
