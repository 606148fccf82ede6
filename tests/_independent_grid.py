"""Grid-of-holes images from a model independent of :mod:`ccdgrid.synthetic`.

A test helper, not part of the package. It was written without reading
``ccdgrid.synthetic`` so that the pipeline is exercised on images its own
generator never made: other hole profiles, another distortion model, other
illumination, noise and defects.

Model
-----
* Plate: a square lattice of pitch ``pitch_px`` (px on the detector), rotated
  by ``rotation_deg``, optionally stretched along y by ``aspect`` (non-square
  pixels). Site ``(i, j)`` has true position ``q = origin + i a + j b``.
* Distortion, defined on detector coordinates: what is seen at detector
  position ``p`` truly sits at ``p + d(p)``; a hole of true position ``q`` is
  therefore seen around the ``p`` solving ``p + d(p) = q``.
  ``d`` = radial (barrel/pincushion) ``u (k1 |u|² + k2 |u|⁴)`` with
  ``u = (p - c) / R`` + Brown tangential (decentering) terms + Gaussian bumps
  + fibre-taper shears (a smooth ``tanh`` step of displacement along a line).
* Holes: Gaussian (``exp(-r²/2σ²)``), super-Gaussian (``exp(-(r/w)^2m)``)
  or squared-Lorentzian (``(1 + r²/w²)^-2``) transmission profiles in
  *plate* coordinates, i.e. seen through the distortion, with per-hole width
  and brightness jitter, integrated over each pixel on a 3x3 sub-grid.
* Light: an elliptical lit area with a soft edge (a taper face) or the whole
  image; a strong smooth background inside it, a dark level outside; an
  optional beam-stop disc that blocks everything behind it; a fraction of the
  holes blocked (dust, bent plate).
* Detector: pixel gain (PRNU), Poisson noise, Gaussian read noise, hot pixels
  (single and 2x2), dead rows and columns (0 or NaN), clipping at 65535.

Coordinates are ``(y, x)`` index coordinates: the centre of pixel ``(r, c)``
is at ``(r, c)``. Displacements are ``(dy, dx)`` px, with the convention of
pyFAI's ``set_dx``/``set_dy``: true position = detector position + d.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["Field", "IndependentGrid", "frame_residual", "make_grid"]

_SUB = 3  # sub-samples per pixel side when integrating a hole profile
_CLIP = 65535.0


@dataclass
class Field:
    """A smooth displacement field ``d(p)`` on detector coordinates.

    Attributes
    ----------
    centre : tuple of 2 float, px
        ``(y, x)`` centre of the radial and tangential terms.
    radius : float, px
        Length that normalises ``u = (p - centre) / radius``.
    k1, k2 : float, px
        Radial terms: ``d = u (k1 |u|² + k2 |u|⁴)``; negative is barrel.
    t1, t2 : float, px
        Decentering terms (Brown): ``dy = t1 (|u|² + 2 uy²) + 2 t2 ux uy``,
        ``dx = t2 (|u|² + 2 ux²) + 2 t1 ux uy``.
    bumps : list of (y, x, sigma, dy, dx)
        Gaussian bumps of displacement ``(dy, dx) exp(-|p - (y, x)|² / 2 sigma²)``.
    shears : list of (y, x, angle_deg, width, amplitude)
        Taper shears: across the line through ``(y, x)`` with normal at
        ``angle_deg`` from +x, displacement ``amplitude tanh(s / width)``
        along the line, ``s`` the signed distance to the line.
    """

    centre: tuple
    radius: float
    k1: float = 0.0
    k2: float = 0.0
    t1: float = 0.0
    t2: float = 0.0
    bumps: list = field(default_factory=list)
    shears: list = field(default_factory=list)

    def displacement(self, points):
        """``(dy, dx)`` (N, 2) px at ``(y, x)`` points (N, 2)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        u = (p - np.asarray(self.centre, dtype=np.float64)) / self.radius
        uy, ux = u[:, 0], u[:, 1]
        r2 = uy * uy + ux * ux
        radial = self.k1 * r2 + self.k2 * r2 * r2
        out = u * radial[:, None]
        out[:, 0] += self.t1 * (r2 + 2 * uy * uy) + 2 * self.t2 * ux * uy
        out[:, 1] += self.t2 * (r2 + 2 * ux * ux) + 2 * self.t1 * ux * uy
        for by, bx, sigma, ay, ax in self.bumps:
            g = np.exp(-((p[:, 0] - by) ** 2 + (p[:, 1] - bx) ** 2) / (2.0 * sigma**2))
            out[:, 0] += ay * g
            out[:, 1] += ax * g
        for ly, lx, angle, width, amplitude in self.shears:
            ny, nx = np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))
            s = (p[:, 0] - ly) * ny + (p[:, 1] - lx) * nx
            step = amplitude * np.tanh(s / width)
            out[:, 0] += step * nx  # along the line: the normal turned by 90°
            out[:, 1] -= step * ny
        return out

    def seen_at(self, true_points, *, tol=1e-10, max_iter=200):
        """Detector positions ``p`` with ``p + d(p) = q`` for true points ``q`` (N, 2)."""
        q = np.asarray(true_points, dtype=np.float64).reshape(-1, 2)
        p = q.copy()
        for _ in range(max_iter):  # a contraction: |grad d| < 1 is checked by max_strain
            new = q - self.displacement(p)
            step = np.abs(new - p).max() if len(p) else 0.0
            p = new
            if step < tol:
                return p
        raise RuntimeError("the distortion field is not invertible (too strong a gradient)")

    def max_strain(self, shape, step=8.0):
        """Largest |partial derivative| of d over the image (central differences)."""
        ys = np.arange(0.0, shape[0] + step, step)
        xs = np.arange(0.0, shape[1] + step, step)
        pts = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
        h = 0.5
        worst = 0.0
        for e in (np.array([h, 0.0]), np.array([0.0, h])):
            grad = (self.displacement(pts + e) - self.displacement(pts - e)) / (2 * h)
            worst = max(worst, float(np.abs(grad).max()))
        return worst


@dataclass
class IndependentGrid:
    """A generated image and its ground truth.

    Attributes
    ----------
    image : ndarray of shape (ny, nx), float32, float64 or uint16
    field : Field
        The true distortion, ``displacement(points)`` evaluable anywhere.
    sites : ndarray of shape (M, 2), int64
        ``(i, j)`` of every lattice site whose hole lands near the image.
    holes : ndarray of shape (M, 2), float64, px
        ``(y, x)`` detector position where each site's hole centre is seen.
    visible : ndarray of shape (M,), bool
        Hole fully inside the image and the lit area, not blocked, not behind
        the beam stop.
    clean : ndarray of shape (M,), bool
        Visible, and no hot or dead pixel within its footprint.
    partial : ndarray of shape (M,), bool
        Some light of the hole reaches the image, but it is not ``visible``
        (cut by the border, the lit-area edge or the beam stop).
    lit : ndarray of shape (ny, nx), float32
        Fraction of the light reaching each pixel (lit area x beam stop).
    hot : ndarray of shape (K, 2), int64
        Pixels made hot.
    dead : ndarray of shape (ny, nx), bool
        Dead pixels (whole rows and columns).
    footprint_px : ndarray of shape (M,), float64
        Radius of each hole's footprint (light > 1e-4 of its peak), px.
    params : dict
        Arguments used.
    """

    image: np.ndarray
    field: Field
    sites: np.ndarray
    holes: np.ndarray
    visible: np.ndarray
    clean: np.ndarray
    partial: np.ndarray
    lit: np.ndarray
    hot: np.ndarray
    dead: np.ndarray
    footprint_px: np.ndarray
    params: dict

    def valid_region(self, margin=0.0):
        """Pixels fully lit and at least ``margin`` px from any unlit pixel, bool (ny, nx)."""
        from scipy import ndimage

        lit = self.lit > 0.999
        if margin > 0:
            lit = ndimage.binary_erosion(lit, iterations=int(np.ceil(margin)), border_value=0)
        return lit


def make_grid(
    shape=(512, 512),
    *,
    pitch_px=60.0,
    rotation_deg=0.0,
    aspect=1.0,
    offset=(0.3, 0.6),
    profile="gauss",
    width_px=4.0,
    super_order=2,
    width_jitter=0.03,
    field=None,
    lit="ellipse",
    lit_axes=(0.46, 0.46),
    lit_centre=(0.5, 0.5),
    edge_px=4.0,
    amplitude=20000.0,
    amplitude_jitter=0.05,
    background=(0.15, 0.6),
    dark=100.0,
    read_noise=5.0,
    prnu=0.02,
    poisson=True,
    hot_pixels=0,
    hot_clusters=0,
    dead_rows=0,
    dead_cols=0,
    dead_value=0.0,
    saturate=False,
    missing_fraction=0.0,
    beam_stop=None,
    dtype=np.float32,
    seed=0,
):
    """Render one grid image and its ground truth.

    Parameters
    ----------
    shape : tuple of 2 int
        ``(ny, nx)``.
    pitch_px : float, px
        Lattice spacing on the detector (before distortion).
    rotation_deg : float
        Lattice rotation.
    aspect : float
        Stretch of the lattice along y (non-square pixels).
    offset : tuple of 2 float
        Position of site (0, 0) in pitches from the image centre.
    profile : {"gauss", "super", "lorentz"}
        Hole transmission profile.
    width_px : float, px
        Gaussian sigma, super-Gaussian half width ``w``, or the ``w`` of the
        squared Lorentzian ``1 / (1 + (r/w)²)²`` (long tails: a blurred-disc
        fit gives it a small disc under a wide blur).
    super_order : int
        ``m`` of ``exp(-(r/w)^2m)``.
    width_jitter, amplitude_jitter : float
        Relative RMS spread of hole width and brightness.
    field : Field or None
        Distortion; None: no distortion.
    lit : {"ellipse", None}
        Elliptical lit area, or the whole image lit.
    lit_axes, lit_centre : tuple of 2 float
        Semi-axes and centre of the ellipse as fractions of ``shape``.
    edge_px : float, px
        Width of the soft edge of the lit area.
    amplitude : float
        Peak counts of a hole.
    background : tuple of 2 float
        Scatter background inside the lit area, as fractions of
        ``amplitude``, at the top-left and bottom-right corners (a smooth
        gradient with some curvature).
    dark : float
        Level outside the lit area.
    read_noise : float
        Gaussian read noise, counts RMS.
    prnu : float
        Relative RMS of the uncorrelated pixel gain.
    poisson : bool
        Draw Poisson noise.
    hot_pixels, hot_clusters : int
        Numbers of single hot pixels and 2x2 hot clusters, 0.3 to 3 times
        ``amplitude`` above the local level.
    dead_rows, dead_cols : int
        Whole rows and columns set to ``dead_value``.
    dead_value : float
        0 or NaN.
    saturate : bool
        Clip at 65535 and return uint16.
    missing_fraction : float
        Fraction of holes blocked.
    beam_stop : tuple (y, x, radius) or None
        Dark disc (px) blocking all light behind it.
    dtype : numpy dtype
        Output type unless ``saturate``.
    seed : int

    Returns
    -------
    IndependentGrid
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    field = field if field is not None else Field(centre=(ny / 2, nx / 2), radius=max(shape))
    strain = field.max_strain(shape)
    if strain >= 0.3:
        raise ValueError(f"distortion gradient {strain:.2f} too strong to render")

    # lattice: a (mostly +y), b (mostly +x), rotated and stretched
    t = np.deg2rad(rotation_deg)
    a = pitch_px * np.array([np.cos(t) * aspect, -np.sin(t)])
    b = pitch_px * np.array([np.sin(t) * aspect, np.cos(t)])
    centre = np.array([ny / 2, nx / 2]) + pitch_px * np.asarray(offset)
    span = int(np.ceil(np.hypot(ny, nx) / pitch_px / min(aspect, 1.0))) + 2
    ii, jj = np.meshgrid(np.arange(-span, span + 1), np.arange(-span, span + 1), indexing="ij")
    sites = np.stack([ii.ravel(), jj.ravel()], axis=1)
    q = centre + sites[:, :1] * a + sites[:, 1:] * b
    width = width_px * np.exp(width_jitter * rng.standard_normal(len(q)))
    if profile == "gauss":
        reach = 4.3 * width  # exp(-r²/2σ²) < 1e-4
    elif profile == "super":
        reach = width * np.log(1e4) ** (1.0 / (2 * super_order))
    elif profile == "lorentz":
        reach = 6.0 * width  # (1 + r²/w²)^-2 < 7e-4: the tail is long
    else:
        raise ValueError(f"unknown profile {profile!r}")
    near = (
        (q[:, 0] > -2 * reach - 30)
        & (q[:, 0] < ny + 2 * reach + 30)
        & (q[:, 1] > -2 * reach - 30)
        & (q[:, 1] < nx + 2 * reach + 30)
    )
    sites, q, width, reach = sites[near], q[near], width[near], reach[near]
    holes = field.seen_at(q)
    # the footprint on the detector is the plate footprint seen through d
    foot = reach * (1.0 + strain) + 0.75
    on_image = (
        (holes[:, 0] > -foot)
        & (holes[:, 0] < ny - 1 + foot)
        & (holes[:, 1] > -foot)
        & (holes[:, 1] < nx - 1 + foot)
    )
    sites, q, width, reach, holes, foot = (
        v[on_image] for v in (sites, q, width, reach, holes, foot)
    )
    m = len(holes)

    # light reaching each pixel: lit area (soft edge) times beam stop
    yy = np.arange(ny, dtype=np.float64)[:, None]
    xx = np.arange(nx, dtype=np.float64)[None, :]
    light = np.ones(shape)
    if lit == "ellipse":
        cy, cx = lit_centre[0] * ny, lit_centre[1] * nx
        ay, ax = lit_axes[0] * ny, lit_axes[1] * nx
        rho = np.hypot((yy - cy) / ay, (xx - cx) / ax)
        # signed distance to the ellipse, approximately, in px
        dist = (1.0 - rho) * np.hypot(ay, ax) / np.sqrt(2.0)
        light = light * _smooth_step(dist / edge_px)
    elif lit is not None:
        raise ValueError(f"unknown lit {lit!r}")
    if beam_stop is not None:
        by, bx, br = beam_stop
        dist = np.hypot(yy - by, xx - bx) - br
        light = light * _smooth_step(dist / 2.0)

    brightness = amplitude * np.exp(amplitude_jitter * rng.standard_normal(m))
    blocked = rng.random(m) < missing_fraction
    brightness[blocked] = 0.0

    # unit-peak profiles x brightness, times the light that reaches each pixel
    signal = _render_holes(shape, field, q, holes, width, brightness, foot, profile, super_order)
    signal *= light
    # scatter background: gradient with a quadratic bend, only where light arrives
    g0, g1 = background
    ramp = 0.5 * (yy / ny + xx / nx)
    bend = 0.25 * ((yy / ny - 0.5) ** 2 - (xx / nx - 0.3) ** 2)
    scatter = amplitude * (g0 + (g1 - g0) * (ramp + bend))
    expected = dark + light * np.maximum(scatter, 0.0) + signal
    del signal

    gain = 1.0 + prnu * rng.standard_normal(shape)
    expected *= np.maximum(gain, 0.0)
    counts = rng.poisson(expected).astype(np.float64) if poisson else expected
    counts += read_noise * rng.standard_normal(shape)

    hot = _hot_pixels(rng, shape, hot_pixels, hot_clusters)
    for r, c in hot:
        counts[r, c] += amplitude * rng.uniform(0.3, 3.0)
    dead = np.zeros(shape, bool)
    dead[rng.choice(ny, size=dead_rows, replace=False), :] = True
    dead[:, rng.choice(nx, size=dead_cols, replace=False)] = True
    if saturate:
        counts[dead] = 0.0
        image = np.clip(np.rint(counts), 0, _CLIP).astype(np.uint16)
    else:
        image = counts.astype(dtype)
        image[dead] = dead_value

    # truth flags: light over each hole's footprint, border, defects
    inside = (
        (holes[:, 0] - foot >= 0)
        & (holes[:, 0] + foot <= ny - 1)
        & (holes[:, 1] - foot >= 0)
        & (holes[:, 1] + foot <= nx - 1)
    )
    light_min, light_max = _footprint_extrema(light, holes, foot)
    visible = inside & (light_min > 0.999) & ~blocked
    partial = ~visible & ~blocked & (light_max > 0.05)
    defect = np.zeros(m, bool)
    if len(hot):
        near_hot = cKDTree(hot.astype(np.float64)).query(holes, k=1)[0]
        defect |= near_hot <= foot + 1.5
    dead_rows_at = np.flatnonzero(dead.all(axis=1))
    dead_cols_at = np.flatnonzero(dead.all(axis=0))
    for r in dead_rows_at:
        defect |= np.abs(holes[:, 0] - r) <= foot
    for c in dead_cols_at:
        defect |= np.abs(holes[:, 1] - c) <= foot
    clean = visible & ~defect

    params = {
        "shape": tuple(shape),
        "pitch_px": pitch_px,
        "rotation_deg": rotation_deg,
        "profile": profile,
        "width_px": width_px,
        "amplitude": amplitude,
        "read_noise": read_noise,
        "lit": lit,
        "saturate": saturate,
        "missing_fraction": missing_fraction,
        "beam_stop": beam_stop,
        "seed": seed,
        "max_strain": strain,
        "max_displacement": float(
            np.abs(field.displacement(np.array([[0, 0], [0, nx], [ny, 0], [ny, nx]]))).max()
        ),
    }
    return IndependentGrid(
        image=image,
        field=field,
        sites=sites.astype(np.int64),
        holes=holes,
        visible=visible,
        clean=clean,
        partial=partial,
        lit=light.astype(np.float32),
        hot=hot,
        dead=dead,
        footprint_px=foot,
        params=params,
    )


def _smooth_step(z):
    """0 far below 0, 1 far above, 0.5 at 0 (a soft edge of unit width)."""
    return 0.5 * (1.0 + np.tanh(z))


def _render_holes(shape, field, q, holes, width, brightness, foot, profile, order):
    """Sum of the hole profiles, each integrated over pixels on a 3x3 sub-grid.

    The profile is evaluated at the *true* position ``p + d(p)`` of each
    sub-sample, relative to the hole's true centre ``q``: the hole is seen
    through the distortion, so its image is the (slightly) distorted profile.
    """
    ny, nx = shape
    half = int(np.ceil(foot.max()))
    offs = np.arange(-half, half + 1, dtype=np.float64)
    oy, ox = np.meshgrid(offs, offs, indexing="ij")
    sub = (np.arange(_SUB) + 0.5) / _SUB - 0.5
    sy, sx = np.meshgrid(sub, sub, indexing="ij")
    # (pixels, sub-samples) offsets from the hole's centre pixel
    dy = oy.reshape(-1, 1) + sy.reshape(1, -1)
    dx = ox.reshape(-1, 1) + sx.reshape(1, -1)
    out = np.zeros(ny * nx)
    batch = 48
    for start in range(0, len(q), batch):
        sl = slice(start, start + batch)
        c = np.rint(holes[sl]).astype(np.int64)
        py = c[:, 0, None, None] + dy[None]
        px = c[:, 1, None, None] + dx[None]
        pts = np.stack([py.ravel(), px.ravel()], axis=1)
        true = pts + field.displacement(pts)
        vy = true[:, 0].reshape(py.shape) - q[sl, 0, None, None]
        vx = true[:, 1].reshape(px.shape) - q[sl, 1, None, None]
        r2 = (vy * vy + vx * vx) / width[sl, None, None] ** 2
        if profile == "lorentz":
            val = 1.0 / np.square(1.0 + r2)
        else:
            val = np.exp(-0.5 * r2 if profile == "gauss" else -(r2**order))
        val = val.mean(axis=2) * brightness[sl, None]
        row = c[:, 0, None] + oy.reshape(1, -1).astype(np.int64)
        col = c[:, 1, None] + ox.reshape(1, -1).astype(np.int64)
        ok = (row >= 0) & (row < ny) & (col >= 0) & (col < nx)
        out += np.bincount((row * nx + col)[ok], weights=val[ok], minlength=ny * nx)
    return out.reshape(shape)


def _footprint_extrema(light, holes, foot):
    """Min and max of ``light`` over the pixels within ``foot`` of each hole (0 if none)."""
    ny, nx = light.shape
    lo = np.zeros(len(holes))
    hi = np.zeros(len(holes))
    for k, ((y, x), r) in enumerate(zip(holes, foot, strict=True)):
        r0, r1 = max(int(np.floor(y - r)), 0), min(int(np.ceil(y + r)), ny - 1)
        c0, c1 = max(int(np.floor(x - r)), 0), min(int(np.ceil(x + r)), nx - 1)
        if r0 > r1 or c0 > c1:
            continue
        gy, gx = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
        disc = np.hypot(gy - y, gx - x) <= r
        if not disc.any():
            continue
        vals = light[r0 : r1 + 1, c0 : c1 + 1][disc]
        lo[k], hi[k] = vals.min(), vals.max()
    return lo, hi


def _hot_pixels(rng, shape, singles, clusters):
    """(K, 2) int64 coordinates of single hot pixels and of 2x2 clusters."""
    ny, nx = shape
    one = np.stack([rng.integers(0, ny, singles), rng.integers(0, nx, singles)], axis=1)
    corner = np.stack(
        [rng.integers(0, ny - 1, clusters), rng.integers(0, nx - 1, clusters)], axis=1
    )
    quad = (corner[:, None, :] + np.array([[0, 0], [0, 1], [1, 0], [1, 1]])[None]).reshape(-1, 2)
    return np.concatenate([one, quad]).astype(np.int64)


def frame_residual(grid, cal, points):
    """RMS and max (px) of ``p + d_rec(p)`` against ``A(p + d(p))``, ``A`` the best affine map.

    ``grid`` an :class:`IndependentGrid`, ``cal`` a calibration of its image,
    ``points`` (M, 2) detector positions: the calibration's frame is the
    plate's up to an affine map, which is fitted out.
    """
    corrected = points + cal.displacement_at(points)
    true = points + grid.field.displacement(points)
    design = np.column_stack([np.ones(len(points)), true - true.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(design, corrected, rcond=None)
    norm = np.hypot(*(corrected - design @ coef).T)
    return float(np.sqrt(np.mean(norm**2))), float(norm.max())
