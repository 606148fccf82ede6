"""Grid-of-holes images rendered as X-ray shadows: a third, independent model.

A test helper, not part of the package. Written apart from
:mod:`ccdgrid.synthetic` and ``tests/_independent_grid.py`` to exercise the
pipeline with physics and defects those do not model.

Model
-----
* Plate: a square lattice of holes of pitch ``pitch_px`` (in y pixels),
  rotated by ``rotation_deg`` (up to 45°), seen through non-square pixels:
  the x pixel is ``aspect`` times as wide as the y pixel, so the plate's
  ``(y, x)`` position of detector point ``t`` (px) is ``(t_y, aspect t_x)``.
  A few sites hold no hole (``missing``: plate defects).
* Distortion ``d(p)`` on detector coordinates (true position = ``p + d(p)``,
  pyFAI's ``set_dx``/``set_dy`` convention): a barrel term ``k1 u |u|²``
  (``u`` normalised by the half diagonal) plus "chicken-wire" taper
  defects: along a few straight fibre-bundle boundaries, a sharp step
  (``tanh`` over ``step_width`` px) of ``0.2-0.5`` px of displacement
  along the boundary, or a kink (the displacement grows linearly on one
  side, continuous across the line).
* Light: each sub-sample (2x2 per pixel) sees the disc transmission of the
  hole at its plate position with a 0.5 px linear edge ramp; the whole
  shadow is convolved with a point-spread function of a Gaussian core
  (``psf_sigma``) and a long Lorentzian-like tail (``(1 + r²/γ²)^-3/2``,
  weight ``psf_tail``), as a fibre-optic taper gives; then multiplied by a
  vignetting falloff (``vignetting`` times dimmer in the corners than at
  the centre) and by the lit area (a disc, a half plane or all).
* Detector: Poisson noise at ``peak`` counts for an open hole at the centre,
  a dark level ``dark`` (may be negative: int32 data with an offset),
  saturation at 65535, zingers (1-3 px bright spots), dead rows (0) and
  module gaps (bands of rows/columns at ``gap_value``, -1 or 0).

Coordinates are ``(y, x)`` index coordinates: the centre of pixel ``(r, c)``
is at ``(r, c)``.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy.signal import oaconvolve

__all__ = ["ProbeField", "ProbeGrid", "make_probe"]

_SATURATION = 65535.0


@dataclass
class ProbeField:
    """Barrel term plus fibre-bundle steps and kinks; ``displacement(points) -> (N, 2)``.

    Attributes
    ----------
    centre : tuple of 2 float, px
    radius : float, px
        Normalisation of ``u = (p - centre) / radius``.
    k1 : float, px
        ``d = k1 u |u|²`` (negative: barrel).
    lines : list of (y, x, angle_deg, kind, amount, width)
        A boundary through ``(y, x)`` whose normal is at ``angle_deg`` from
        +x. ``kind`` "step": displacement ``amount tanh(s / width)`` along
        the line, ``s`` the signed distance to it; "kink": displacement
        ``amount * max(s, 0) / 100`` along the line (``amount`` px per 100 px).
    """

    centre: tuple
    radius: float
    k1: float = 0.0
    lines: list = field(default_factory=list)

    def displacement(self, points):
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        u = (p - np.asarray(self.centre)) / self.radius
        d = self.k1 * u * np.sum(u * u, axis=1, keepdims=True)
        for y0, x0, ang, kind, amount, width in self.lines:
            a = np.deg2rad(ang)
            normal = np.array([np.sin(a), np.cos(a)])  # (y, x)
            along = np.array([normal[1], -normal[0]])
            s = (p - (y0, x0)) @ normal
            if kind == "step":
                mag = amount * np.tanh(s / width)
            else:
                mag = amount * np.maximum(s, 0.0) / 100.0
            d = d + mag[:, None] * along
        return d

    def seen_at(self, q, iters=60):
        """Detector points ``p`` with ``p + d(p) = q`` (fixed point; d is mild)."""
        q = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        p = q.copy()
        for _ in range(iters):
            p = q - self.displacement(p)
        return p

    def near_line(self, points, distance):
        """True for points closer than ``distance`` px to any step or kink line."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        out = np.zeros(len(p), dtype=bool)
        for y0, x0, ang, *_ in self.lines:
            a = np.deg2rad(ang)
            s = (p - (y0, x0)) @ np.array([np.sin(a), np.cos(a)])
            out |= np.abs(s) < distance
        return out


@dataclass
class ProbeGrid:
    """One rendered probe image and its truth.

    Attributes
    ----------
    image : ndarray (ny, nx), float32 or int32
    field : ProbeField
    holes : ndarray (N, 2)
        Seen positions (y, x) of every hole site with a hole, inside the image.
    visible : ndarray (N,), bool
        Fully lit, inside the image by ``R + 3`` px, off gaps and dead lines.
    clean : ndarray (N,), bool
        Visible and no zinger within ``R + 4`` px.
    missing : ndarray (M, 2)
        Seen positions of the sites whose hole is missing.
    lit : ndarray (ny, nx), bool
        Pixels lit with no gap or dead line (the region to judge maps on).
    radius : float
        Hole radius on the plate, y px.
    """

    image: np.ndarray
    field: ProbeField
    holes: np.ndarray
    visible: np.ndarray
    clean: np.ndarray
    missing: np.ndarray
    lit: np.ndarray
    radius: float


def _psf(sigma, tail, gamma, half):
    r2 = np.add.outer(np.arange(-half, half + 1) ** 2, np.arange(-half, half + 1) ** 2)
    core = np.exp(-0.5 * r2 / sigma**2)
    lor = (1.0 + r2 / gamma**2) ** -1.5
    k = (1.0 - tail) * core / core.sum() + tail * lor / lor.sum()
    return k / k.sum()


def make_probe(
    shape=(1024, 1024),
    *,
    pitch_px=60.0,
    radius_px=5.0,
    rotation_deg=0.0,
    aspect=1.0,
    k1=-12.0,
    lines=(),
    missing=0,
    psf_sigma=0.9,
    psf_tail=0.25,
    psf_gamma=4.0,
    vignetting=3.0,
    lit="all",
    peak=20000.0,
    dark=100.0,
    zingers=0,
    hot=0,
    dead_rows=0,
    gaps=(),
    gap_value=-1,
    dtype="float32",
    shift=(0.0, 0.0),
    seed=0,
):
    """Render a probe grid image.

    Parameters
    ----------
    shape : (ny, nx)
    pitch_px, radius_px : float, y px
        Hole pitch and radius on the plate.
    rotation_deg, aspect, k1 : float
        Lattice rotation, x/y pixel size ratio, barrel term (px at the corner).
    lines : sequence of ProbeField line tuples
        Fibre-bundle boundaries.
    missing, zingers, hot, dead_rows : int
        Numbers of missing holes, zingers, hot pixels, dead rows.
    psf_sigma, psf_tail, psf_gamma : float
        Point-spread function: Gaussian core sigma (px), tail weight, tail scale (px).
    vignetting : float
        Centre-to-corner falloff of the light (>= 1).
    lit : {"all", "disc", "small", "half"}
        Lit area: the whole image, a disc of 0.47 (0.22 for "small") of the
        smaller side, or the left 60 % of the image.
    peak, dark : float
        Counts of an open hole at the centre; dark level added (may be < 0).
    gaps : sequence of ("row" | "col", start, width)
        Module gaps set to ``gap_value``.
    dtype : {"float32", "int32", "uint16"}
    shift : (dy, dx), px
        Moves the lattice (in plate coordinates) from its default origin.
    seed : int

    Returns
    -------
    ProbeGrid
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    fld = ProbeField(
        centre=(0.52 * ny, 0.47 * nx), radius=0.5 * np.hypot(ny, nx), k1=k1, lines=list(lines)
    )
    th = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    origin = np.array([0.5 * ny + 0.31 * pitch_px, 0.5 * nx * aspect + 0.17 * pitch_px])
    origin += np.asarray(shift, dtype=np.float64)
    # sites covering the image (plate coordinates)
    extent = np.hypot(ny, nx * aspect) / pitch_px + 2
    n = int(np.ceil(extent))
    ii, jj = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    ij = np.column_stack([ii.ravel(), jj.ravel()]).astype(np.float64)
    plate = origin + (ij * pitch_px) @ rot.T  # (y, x) plate coordinates
    true_det = plate / np.array([1.0, aspect])
    inside = (
        (true_det[:, 0] > -pitch_px)
        & (true_det[:, 0] < ny + pitch_px)
        & (true_det[:, 1] > -pitch_px)
        & (true_det[:, 1] < nx + pitch_px)
    )
    ij, true_det = ij[inside], true_det[inside]
    seen = fld.seen_at(true_det)
    in_img = (seen[:, 0] > 0) & (seen[:, 0] < ny - 1) & (seen[:, 1] > 0) & (seen[:, 1] < nx - 1)
    cand = np.flatnonzero(in_img & (np.minimum(seen[:, 0], ny - seen[:, 0]) > 3 * pitch_px / 2))
    miss_idx = rng.choice(cand, size=min(missing, cand.size), replace=False)
    is_missing = np.zeros(len(ij), dtype=bool)
    is_missing[miss_idx] = True
    missing_keys = {(int(a), int(b)) for a, b in ij[is_missing]}

    # transmission, 2x2 sub-samples per pixel, by row chunks
    trans = np.zeros(shape, dtype=np.float32)
    sub = np.array([-0.25, 0.25])
    inv_rot = rot.T
    chunk = max(1, 2_000_000 // nx)
    cols = np.arange(nx, dtype=np.float64)
    for r0 in range(0, ny, chunk):
        rows = np.arange(r0, min(r0 + chunk, ny), dtype=np.float64)
        acc = np.zeros((rows.size, nx))
        for sy in sub:
            for sx in sub:
                py, px = np.meshgrid(rows + sy, cols + sx, indexing="ij")
                pts = np.column_stack([py.ravel(), px.ravel()])
                t = pts + fld.displacement(pts)
                pl = (t * np.array([1.0, aspect]) - origin) @ inv_rot.T / pitch_px
                site = np.rint(pl)
                off = (pl - site) * pitch_px
                dist = np.hypot(off[:, 0], off[:, 1])
                cov = np.clip(radius_px - dist + 0.5, 0.0, 1.0)
                if missing_keys:
                    si = site.astype(np.int64)
                    for a, b in missing_keys:
                        cov[(si[:, 0] == a) & (si[:, 1] == b)] = 0.0
                acc += cov.reshape(rows.size, nx)
        trans[r0 : r0 + rows.size] = 0.25 * acc
    half = int(min(64, 0.5 * min(ny, nx) - 1))
    light = oaconvolve(trans, _psf(psf_sigma, psf_tail, psf_gamma, half), mode="same")
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    r2 = ((yy - 0.5 * ny) ** 2 + (xx - 0.5 * nx) ** 2) / (0.25 * (ny * ny + nx * nx))
    light *= 1.0 / (1.0 + (vignetting - 1.0) * r2)
    if lit in ("disc", "small"):
        frac = 0.47 if lit == "disc" else 0.22
        lit_area = (yy - 0.5 * ny) ** 2 + (xx - 0.5 * nx) ** 2 < (frac * min(ny, nx)) ** 2
    elif lit == "half":
        lit_area = xx < 0.6 * nx
    else:
        lit_area = np.ones(shape, dtype=bool)
    light *= lit_area
    counts = rng.poisson(np.maximum(light * peak, 0.0) + 2.0).astype(np.float64)
    counts = np.minimum(counts + dark, _SATURATION)
    bad = np.zeros(shape, dtype=bool)
    zing = rng.integers([0, 0], [ny, nx], size=(zingers, 2))
    for y, x in zing:
        h, w = rng.integers(1, 4, size=2)
        counts[y : y + h, x : x + w] = min(_SATURATION, dark + rng.uniform(3, 30) * peak)
    for y, x in rng.integers([0, 0], [ny, nx], size=(hot, 2)):
        counts[y, x] = min(_SATURATION, dark + rng.uniform(2, 20) * peak)
    for r in rng.choice(np.arange(ny // 10, ny - ny // 10), size=dead_rows, replace=False):
        counts[r] = 0.0
        bad[r] = True
    for kind, start, width in gaps:
        if kind == "row":
            counts[start : start + width] = gap_value
            bad[start : start + width] = True
        else:
            counts[:, start : start + width] = gap_value
            bad[:, start : start + width] = True
    image = counts.astype(dtype) if dtype != "float32" else counts.astype(np.float32)

    # truth: holes that are inside the image, with their footprint fully lit
    keep = in_img & ~is_missing
    holes = seen[keep]
    foot = radius_px + 3.0
    margin = np.minimum.reduce(
        [holes[:, 0], ny - 1 - holes[:, 0], holes[:, 1], nx - 1 - holes[:, 1]]
    )
    visible = margin > foot
    ok_area = lit_area & ~bad
    # eroded: a hole is visible when every pixel within `foot` is lit and good
    from scipy.ndimage import binary_erosion

    rr = int(np.ceil(foot))
    disk = np.add.outer(np.arange(-rr, rr + 1) ** 2, np.arange(-rr, rr + 1) ** 2) <= foot**2
    good_area = binary_erosion(ok_area, structure=disk, border_value=0)
    ri = np.clip(np.rint(holes).astype(np.int64), 0, [ny - 1, nx - 1])
    visible &= good_area[ri[:, 0], ri[:, 1]]
    clean = visible.copy()
    if zingers or hot:
        spots = np.vstack([zing.reshape(-1, 2), np.zeros((0, 2))])
        if len(spots):
            dz = np.min(
                np.hypot(*(holes[:, None, :] - spots[None, :, :] - 1).transpose(2, 0, 1)),
                axis=1,
            )
            clean &= dz > radius_px + 4.0
    return ProbeGrid(
        image=image,
        field=fld,
        holes=holes,
        visible=visible,
        clean=clean,
        missing=seen[in_img & is_missing],
        lit=lit_area & ~bad,
        radius=float(radius_px),
    )
