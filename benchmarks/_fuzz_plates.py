"""Grid-of-holes plates for ``fuzz.py``, and their judge through pyFAI.

A generator written apart from :mod:`ccdgrid.synthetic` and from
``tests/_independent_grid.py`` (other hole profiles, and a distortion defined
on the plate rather than on the detector), so that the fuzz draws images that
neither the package's own tests nor its other benchmarks make.

Coordinates
-----------
Pixel units, ``(y, x)`` order, *index coordinates*: the centre of pixel
``(i, j)`` is at ``(i, j)``.

* The **ideal frame** is the plate's undistorted image. Hole ``(m, n)`` sits
  at ``q_mn = o + pitch * Rot(theta) @ (m, n)``, the origin ``o`` off whole
  pixels.
* The forward distortion ``f`` is defined **on the ideal frame**: a point
  ``q`` of the plate is seen on the **detector** at ``c = q + f(q)``, so hole
  ``(m, n)`` is imaged at ``q_mn + f(q_mn)``.
* To render, each detector pixel centre ``c`` is mapped back to the ideal
  frame by solving ``c = q + f(q)`` (fixed-point iteration ``q <- c - f(q)``)
  and the plate's transmission is sampled at that ``q`` (one sample a pixel,
  no integration over its area): hole shapes are warped with the field.
* The truth, in pyFAI's convention (``Detector.set_dx``/``set_dy``: the true
  position of a detector point is that point plus ``(dy, dx)``), is
  ``D(c) = q(c) - c = -f(q(c))``.
* pyFAI places corner ``(i, j)`` of the corner grid at ``(i, j)`` in its own
  coordinates, which are index coordinates + 0.5: that corner is the index
  point ``(i - 0.5, j - 0.5)``. A detector file's corner positions divided by
  the pixel size are pyFAI coordinates ``(i + dy, j + dx)``.

Field ``f`` (:func:`make_field`): radial barrel or pincushion
``k |q - centre|² (q - centre)``, ``radial`` px at the image corner (> 0:
pincushion, outward), plus a non-radial quadratic term, a Gaussian bump and a
sine ripple, each optional.

Image (:func:`render`): background (with an optional linear gradient) plus
``peak`` times the illumination (quadratic vignetting, optionally a lit disc
with an ``erfc`` rim) times the transmission (or times one minus it: dark
holes), then Poisson and Gaussian read noise. :func:`add_defects` adds hot
pixels and clusters, dead lines (0 or NaN), saturated discs, a beam stop,
cosmic-ray streaks and gaps between modules.
"""

import numpy as np
import pyFAI
from scipy.special import erfc

__all__ = ["add_defects", "compare", "invert", "make_field", "plate", "render", "truth_D"]


def make_field(shape, radial=10.0, quad=(0.0, 0.0), bump=None, ripple=None):
    """The forward distortion ``f`` of a plate, defined on the ideal frame.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the image; its centre is the radial term's centre.
    radial : float
        Radial displacement in px at the image corner (``k |r|² r`` with
        ``k = radial / R³``, ``R`` the half diagonal): > 0 pincushion
        (outward), < 0 barrel.
    quad : tuple of float
        ``(ay, ax)``: ``fy += ay x y / (cy cx)`` and ``fx += ax y² / cy²``
        (``y``, ``x`` from the centre ``(cy, cx)``), i.e. ``ay`` and ``ax`` px
        at the corner.
    bump : tuple of float, optional
        ``(by, bx, s, ay, ax)``: a Gaussian of width ``s`` px centred at
        ``(by, bx)``, displacing by ``(ay, ax)`` px at its top.
    ripple : tuple of float, optional
        ``(amp, period)``: ``fy += amp sin(2π qx / period)``,
        ``fx += amp cos(2π qy / period)``.

    Returns
    -------
    callable
        ``f(qy, qx) -> (fy, fx)`` on arrays of ideal-frame positions.
    """
    ny, nx = shape
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    R = np.hypot(cy, cx)
    k = radial / R**3

    def f(qy, qx):
        y = qy - cy
        x = qx - cx
        r2 = y * y + x * x
        fy = k * r2 * y
        fx = k * r2 * x
        fy = fy + quad[0] * (x * y) / (cy * cx)
        fx = fx + quad[1] * (y * y) / (cy * cy)
        if bump is not None:
            by, bx, s, ay, ax = bump
            g = np.exp(-((qy - by) ** 2 + (qx - bx) ** 2) / (2 * s * s))
            fy = fy + ay * g
            fx = fx + ax * g
        if ripple is not None:
            amp, period = ripple
            fy = fy + amp * np.sin(2 * np.pi * qx / period)
            fx = fx + amp * np.cos(2 * np.pi * qy / period)
        return fy, fx

    return f


def invert(f, cy, cx, niter=60):
    """Ideal-frame positions ``q`` of detector points ``c``: ``c = q + f(q)``.

    Parameters
    ----------
    f : callable
        A field of :func:`make_field`.
    cy, cx : ndarray of float
        Detector positions (index coordinates); not modified.
    niter : int
        Most fixed-point iterations ``q <- c - f(q)``; they stop earlier once
        a step moves no point by 1e-9 px.

    Returns
    -------
    qy, qx : ndarray of float
        The ideal positions, same shape as ``cy``.

    Raises
    ------
    RuntimeError
        When ``q + f(q)`` misses ``c`` by 1e-6 px or more: the field is not
        a contraction there (too strong a bump or ripple for its width).
    """
    qy, qx = cy.copy(), cx.copy()
    for _ in range(niter):
        fy, fx = f(qy, qx)
        qy_new = cy - fy
        qx_new = cx - fx
        err = max(np.abs(qy_new - qy).max(), np.abs(qx_new - qx).max())
        qy, qx = qy_new, qx_new
        if err < 1e-9:
            break
    fy, fx = f(qy, qx)
    resid = max(np.abs(qy + fy - cy).max(), np.abs(qx + fx - cx).max())
    if not resid < 1e-6:
        raise RuntimeError(f"the field is not invertible here: {resid:.3g} px off")
    return qy, qx


def plate(qy, qx, pitch, theta_deg, origin, radius, edge, profile="flattop"):
    """Transmission of the plate at ideal-frame positions.

    Parameters
    ----------
    qy, qx : ndarray of float
        Ideal-frame positions.
    pitch : float
        Lattice step in px.
    theta_deg : float
        Rotation of the lattice in degrees.
    origin : tuple of float
        ``(oy, ox)``, the ideal position of hole ``(0, 0)``.
    radius : float
        Hole radius in px (for ``"lorentz"``: the half width of the profile).
    edge : float
        Gaussian blur (σ, px) of the holes' rims (``"flattop"``, ``"airy"``).
    profile : {"flattop", "airy", "lorentz"}
        ``"flattop"``: a blurred disc, 1 inside. ``"airy"``: the same disc
        plus a faint ring (6 %) at 1.6 radii. ``"lorentz"``: the long-tailed
        ``1 / (1 + (ρ / radius)²)²``.

    Returns
    -------
    ndarray of float
        The transmission of the nearest hole at each position.
    """
    t = np.deg2rad(theta_deg)
    c, s = np.cos(t), np.sin(t)
    dy = qy - origin[0]
    dx = qx - origin[1]
    # lattice coordinates (the inverse rotation)
    u = (c * dx + s * dy) / pitch
    v = (-s * dx + c * dy) / pitch
    du = (u - np.round(u)) * pitch
    dv = (v - np.round(v)) * pitch
    rho = np.hypot(du, dv)
    if profile == "flattop":
        return 0.5 * erfc((rho - radius) / (np.sqrt(2) * edge))
    if profile == "airy":
        core = 0.5 * erfc((rho - radius) / (np.sqrt(2) * edge))
        ring = 0.06 * np.exp(-((rho - 1.6 * radius) ** 2) / (2 * (0.25 * radius) ** 2))
        return core + ring
    if profile == "lorentz":
        return 1.0 / (1.0 + (rho / radius) ** 2) ** 2
    raise ValueError(profile)


def render(
    shape=(2048, 2048),
    pitch=80.0,
    theta=0.7,
    origin=None,
    hole_frac=0.15,
    edge=1.5,
    profile="flattop",
    field=None,
    peak=20000.0,
    background=300.0,
    gradient=(0.0, 0.0),
    lit_radius=None,
    lit_edge=40.0,
    vignette=0.3,
    read_noise=3.0,
    poisson=True,
    invert_contrast=False,
    seed=0,
    dtype=np.float32,
):
    """A noisy image of a distorted grid plate.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    pitch, theta : float
        Lattice step (px) and rotation (degrees), see :func:`plate`.
    origin : tuple of float, optional
        Ideal position of hole ``(0, 0)``; default: the image centre moved by
        ``(0.37, -0.21)`` pitch, so that no hole sits on whole pixels there.
    hole_frac : float
        Hole radius as a fraction of the pitch.
    edge : float
        Rim blur σ in px.
    profile : {"flattop", "airy", "lorentz"}
        See :func:`plate`.
    field : callable, optional
        A field of :func:`make_field`; default none.
    peak, background : float
        Counts of a hole's top (unvignetted) and of the background.
    gradient : tuple of float
        Relative background slope along y and x, image centre to edge.
    lit_radius : float, optional
        Radius in px of a lit disc about the image centre (default: all lit).
    lit_edge : float
        σ in px of the lit disc's rim.
    vignette : float
        Illumination loss at the image corner, ``1 - vignette (r / R)²``.
    read_noise : float
        σ of the Gaussian read noise in counts.
    poisson : bool
        Draw Poisson counts before adding the read noise.
    invert_contrast : bool
        Dark holes on a bright plate (the light times ``1 - transmission``).
    seed : int
        Seed of ``numpy.random.default_rng`` for the noise.
    dtype : dtype
        Of the returned image.

    Returns
    -------
    image : ndarray
        ``shape``, ``dtype``.
    info : dict
        ``lit``: bool array, where the lit disc passes half its light (all
        True without one); ``origin``: the origin used.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    if origin is None:
        origin = ((ny - 1) / 2 + 0.37 * pitch, (nx - 1) / 2 - 0.21 * pitch)
    if field is None:
        field = make_field(shape, 0.0)
    cy, cx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    qy, qx = invert(field, cy, cx)
    T = plate(qy, qx, pitch, theta, origin, hole_frac * pitch, edge, profile)
    del qy, qx
    yc, xc = (ny - 1) / 2.0, (nx - 1) / 2.0
    r = np.hypot(cy - yc, cx - xc)
    R = np.hypot(yc, xc)
    illum = 1.0 - vignette * (r / R) ** 2
    if lit_radius is not None:
        lit_env = 0.5 * erfc((r - lit_radius) / (np.sqrt(2) * lit_edge))
    else:
        lit_env = np.ones_like(r)
    illum = illum * lit_env
    bg = background * (1 + gradient[0] * (cy - yc) / yc + gradient[1] * (cx - xc) / xc)
    bg = np.maximum(bg, 0)
    light = 1 - np.clip(T, 0, 1) if invert_contrast else T
    img = bg + peak * illum * light
    if poisson:
        img = rng.poisson(np.maximum(img, 0)).astype(np.float64)
    img = img + rng.normal(0, read_noise, img.shape)
    info = dict(lit=lit_env > 0.5, origin=origin)
    return img.astype(dtype), info


def add_defects(
    img,
    seed=1,
    hot=0,
    clusters=0,
    dead_rows=(),
    dead_cols=(),
    dead_value=0.0,
    saturated=0,
    sat_value=65535.0,
    sat_radius=15,
    beamstop=None,
    streaks=0,
    gaps=(),
    gap_value=-1.0,
):
    """Detector defects on a copy of an image.

    Defects are drawn in the order of the parameters (from one
    ``numpy.random.default_rng(seed)``), so a given set of parameters and
    seed gives the same image.

    Parameters
    ----------
    img : ndarray
        The image; not modified.
    seed : int
        Seed of the positions and values.
    hot : int
        Single hot pixels, 5e4-6.5e4 counts.
    clusters : int
        Square clusters of 2x2 or 3x3 pixels at 6e4.
    dead_rows, dead_cols : sequence of int
        Lines set to ``dead_value`` (0 or NaN).
    dead_value : float
        Value of the dead lines.
    saturated : int
        Discs of radius ``sat_radius`` px at ``sat_value``, 100 px or more
        from the edges.
    sat_value : float
        Value of the saturated discs.
    sat_radius : int
        Their radius in px.
    beamstop : tuple of float, optional
        ``(by, bx, radius)``: a disc and an arm to the right edge (a quarter of
        the radius either side of ``by``) that pass 2 % of the light, plus 5.
    streaks : int
        Cosmic-ray tracks: lines 30-200 px long adding 2e3-3e4 counts.
    gaps : sequence of tuple
        ``(start, stop, axis)``: rows (``axis`` 0) or columns (1) set to
        ``gap_value``, as between detector modules.
    gap_value : float
        Value in the gaps.

    Returns
    -------
    img : ndarray
        The image with its defects.
    bad : ndarray of bool
        Pixels a calibration is expected to leave out: dead lines, saturated
        discs, the beam stop and the gaps (not hot pixels, clusters or
        streaks, which it should see through).
    """
    rng = np.random.default_rng(seed)
    ny, nx = img.shape
    img = img.copy()
    bad = np.zeros(img.shape, bool)
    if hot:
        iy = rng.integers(0, ny, hot)
        ix = rng.integers(0, nx, hot)
        img[iy, ix] = rng.uniform(5e4, 6.5e4, hot)
    for _ in range(clusters):
        y, x = rng.integers(5, ny - 5), rng.integers(5, nx - 5)
        s = rng.integers(2, 4)
        img[y : y + s, x : x + s] = 6e4
    for row in dead_rows:
        img[row, :] = dead_value
        bad[row, :] = True
    for col in dead_cols:
        img[:, col] = dead_value
        bad[:, col] = True
    yy, xx = np.ogrid[0:ny, 0:nx]
    for _ in range(saturated):
        y, x = rng.integers(100, ny - 100), rng.integers(100, nx - 100)
        m = (yy - y) ** 2 + (xx - x) ** 2 < sat_radius**2
        img[m] = sat_value
        bad |= m
    for _ in range(streaks):
        y0, x0 = rng.uniform(50, ny - 50), rng.uniform(50, nx - 50)
        length = rng.uniform(30, 200)
        a = rng.uniform(0, np.pi)
        # two samples a pixel along the track: no gaps in a diagonal line
        t = np.linspace(0, length, int(length * 2))
        ys = np.clip((y0 + t * np.sin(a)).astype(int), 0, ny - 1)
        xs = np.clip((x0 + t * np.cos(a)).astype(int), 0, nx - 1)
        img[ys, xs] += rng.uniform(2e3, 3e4)
    for g0, g1, axis in gaps:
        if axis == 0:
            img[g0:g1, :] = gap_value
            bad[g0:g1, :] = True
        else:
            img[:, g0:g1] = gap_value
            bad[:, g0:g1] = True
    if beamstop is not None:
        by, bx, br = beamstop
        m = (yy - by) ** 2 + (xx - bx) ** 2 < br**2
        arm = (np.abs(yy - by) < br / 4) & (xx > bx)
        m = m | arm
        img[m] = img[m] * 0.02 + 5
        bad |= m
    return img, bad


def truth_D(field, cy, cx):
    """True displacement at detector points, in pyFAI's convention.

    Parameters
    ----------
    field : callable
        A field of :func:`make_field`.
    cy, cx : ndarray of float
        Detector positions (index coordinates).

    Returns
    -------
    dy, dx : ndarray of float
        ``D(c) = q(c) - c``: the ideal position of what is seen at ``c`` is
        ``c + D(c)``.
    """
    qy, qx = invert(field, cy, cx)
    return qy - cy, qx - cx


def compare(path, field, lit, stride=2, expect_bad=None):
    """Residual of a detector file, loaded by pyFAI, against the true field.

    Corner ``(i, j)`` of every ``stride``-th pixel the file leaves unmasked is
    taken at pyFAI's position for it, ``P = (i + dy, j + dx)``, and the true
    ideal position of that corner, ``q`` of the index point
    ``(i - 0.5, j - 0.5)``, is fitted by an affine map of ``P`` (least
    squares): the residual is the distance left. The affine part is free
    because the ideal frame's scale, rotation and origin are those of the
    plate, which a calibration knows only through its own choices.

    Parameters
    ----------
    path : str or Path
        A detector file pyFAI reads (``pyFAI.detector_factory``).
    field : callable
        The plate's field (:func:`make_field`).
    lit : ndarray of bool
        Lit pixels (``render``'s ``info["lit"]``).
    stride : int
        Step between the pixels sampled along each axis.
    expect_bad : ndarray of bool, optional
        Pixels the file may mask without loss (``add_defects``'s ``bad``).

    Returns
    -------
    dict
        ``rms``, ``p99``, ``max``: residual in px; ``worst_at``: ``(i, j)``
        of the largest; ``valid_frac_lit``: fraction
        of the lit, not bad, pixels left unmasked; ``valid_outside_lit``:
        unmasked pixels outside the lit area; ``npts``: points compared;
        ``sign_corr``: correlation of the file's displacement with the true
        one, means removed (about +1; -1 means a sign flip); ``A``: the
        affine map's linear part; ``pixel``: ``(pixel1, pixel2)`` in m.

    Raises
    ------
    ValueError
        When the file masks every sampled pixel (``argmax`` of nothing):
        ``fuzz.py`` then records a crash, though ccdgrid did not raise.
    """
    det = pyFAI.detector_factory(path)
    corners = det.get_pixel_corners()  # (ny, nx, 4, 3): z, y, x in metres
    ps1, ps2 = det.pixel1, det.pixel2
    mask = det.mask
    ny, nx = corners.shape[:2]
    if mask is None:
        mask = np.zeros((ny, nx), np.int8)
    valid = mask == 0
    ii, jj = np.mgrid[0:ny:stride, 0:nx:stride]
    sel = valid[ii, jj]
    ii = ii[sel]
    jj = jj[sel]
    Py = corners[ii, jj, 0, 1] / ps1
    Px = corners[ii, jj, 0, 2] / ps2
    cy = ii - 0.5
    cx = jj - 0.5
    qy, qx = invert(field, cy.astype(float), cx.astype(float))
    M = np.column_stack([Py, Px, np.ones_like(Py)])
    coef, *_ = np.linalg.lstsq(M, np.column_stack([qy, qx]), rcond=None)
    pred = M @ coef
    res = np.hypot(qy - pred[:, 0], qx - pred[:, 1])
    # without the affine fit, for the sign: file position minus pyFAI's nominal one
    Dfile_y = Py - ii
    Dfile_x = Px - jj
    Dtrue_y = qy - cy
    Dtrue_x = qx - cx
    sign_corr = np.corrcoef(
        np.concatenate([Dfile_y - Dfile_y.mean(), Dfile_x - Dfile_x.mean()]),
        np.concatenate([Dtrue_y - Dtrue_y.mean(), Dtrue_x - Dtrue_x.mean()]),
    )[0, 1]
    lit_region = lit.copy()
    if expect_bad is not None:
        lit_region &= ~expect_bad
    frac = (valid & lit_region).sum() / max(lit_region.sum(), 1)
    outside = (valid & ~lit).sum()
    imax = np.argmax(res)
    return dict(
        rms=float(np.sqrt(np.mean(res**2))) if res.size else np.nan,
        p99=float(np.percentile(res, 99)) if res.size else np.nan,
        max=float(res.max()) if res.size else np.nan,
        worst_at=(int(ii[imax]), int(jj[imax])) if res.size else None,
        valid_frac_lit=float(frac),
        valid_outside_lit=int(outside),
        npts=int(res.size),
        sign_corr=float(sign_corr),
        A=coef[:2].T.round(6).tolist(),
        pixel=(ps1, ps2),
    )
