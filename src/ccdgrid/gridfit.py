"""Stage 3: the affine grid ``pixel = T + R . (i, j)`` and the pixel size.

Two estimates of the same six parameters are made and compared:

* ``"lsq"``: linear least squares on ``[1, i, j]`` with the lattice indices
  fixed; it minimises the RMS of ``ideal - measured`` in pixels, so it is
  the one normally used.
* ``"seed"``: the objective of pyFAI's CCD-calibration tutorial,
  ``sum |frac(inverse(R) (p - T))|²`` over all holes in (x, y) order, which
  needs no indices, minimised with BFGS and the analytic gradient of
  :func:`ccdgrid.hole_error.grid_error`, started from the ``"lsq"`` solution.
  Kept for comparison with the tutorial. Both are scored by the RMS of
  ``ideal - measured`` in pixels with the same indices, where ``"lsq"`` is
  optimal by construction; ``"seed"`` is used only if strictly better.

Parameter order ``P = (Ox, Oy, Xx, Yx, Xy, Yy)`` mirrors the tutorial: (x, y)
order, ``R = [[Xx, Yx], [Xy, Yy]]``, ``pixel_xy = R . hole_xy + (Ox, Oy)`` with
``hole_xy = (j, i)``: ``X`` is the step for ``j + 1`` (about +x), ``Y`` the
step for ``i + 1`` (about +y). Everything else is in (y, x) order.

:func:`centred_grid` then re-expresses the fitted lattice as the plate's
seen at the image centre, made square (no displacement there, and no
displacement gradient but a shear): the frame the displacement maps and the
pixel size are given in.
"""

from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import minimize

from ._blas import one_blas_thread
from ._validation import as_points, check_backend, check_positive
from .errors import CcdgridError
from .hole_error import grid_error
from .units import PITCH_RANGE

__all__ = ["GridFit", "centred_grid", "fit_grid", "pixel_size_from_vectors"]

_MIN_HOLES = 3


@dataclass
class GridFit:
    """An affine hole grid fitted to measured hole centres.

    Attributes
    ----------
    P : ndarray of shape (6,), float64
        ``(Ox, Oy, Xx, Yx, Xy, Yy)`` of the method used, in the tutorial's
        (x, y) order (px).
    origin : ndarray of shape (2,), float64, px
        ``(y, x)`` ideal position of site ``(i, j) = (0, 0)``.
    vectors : ndarray of shape (2, 2), float64, px
        Rows: ``(y, x)`` steps for ``i + 1`` and ``j + 1``.
    pixel_size : tuple of 2 float, m
        ``(pixel1, pixel2)``: the size of a pixel along y and along x that
        makes the fitted grid square with side ``pitch``.
    pitch : float, m
        Hole spacing of the plate.
    indices : ndarray of shape (N, 2), int64
        The ``(i, j)`` used.
    rms_lsq, rms_seed : float, px
        RMS of ``|ideal - measured|`` for each method (``nan`` if the seed
        objective could not be minimised).
    method_used : {"lsq", "seed"}
        The method with the smaller RMS.
    ideal : ndarray of shape (N, 2), float64, px
        ``(y, x)`` ideal grid positions of the holes, method used.
    displacement : ndarray of shape (N, 2), float64, px
        ``(dy, dx) = ideal - measured``: the true position of what is seen at a
        hole is its measured position plus this.
    residual_rms, residual_max : float, px
        RMS and largest ``|displacement|`` (method used).
    seed_result : dict
        Minimiser report for the seed objective: ``success``, ``message``,
        ``nit``, ``value``.
    frame : dict or None
        None for the lattice fitted to all holes; after :func:`centred_grid`,
        how the lattice was re-expressed: ``centre`` (y, x) px, ``holes``
        and ``degree`` of the local fit, ``jacobian`` (2, 2) of the
        least-squares lattice's positions there (rows y, x).
    """

    P: np.ndarray
    origin: np.ndarray
    vectors: np.ndarray
    pixel_size: tuple
    pitch: float
    indices: np.ndarray
    rms_lsq: float
    rms_seed: float
    method_used: str
    ideal: np.ndarray
    displacement: np.ndarray
    residual_rms: float
    residual_max: float
    seed_result: dict
    frame: dict = None

    def predict(self, indices):
        """Ideal ``(y, x)`` px positions, shape (M, 2), of ``(i, j)`` sites (M, 2)."""
        ij = np.asarray(indices, dtype=np.float64).reshape(-1, 2)
        return self.origin + ij @ self.vectors


def fit_grid(peaks, indices, *, pitch=5e-3, backend="cython"):
    """Fit the affine hole grid to indexed hole centres.

    Parameters
    ----------
    peaks : array_like of shape (N, 2), float, px
        Measured ``(y, x)`` hole centres, index coordinates. Only holes that
        were indexed (no ``-1`` rows).
    indices : array_like of shape (N, 2), int
        Lattice indices ``(i, j)``, ``i`` about along +y, ``j`` about along +x
        (as :func:`ccdgrid.lattice.index_holes` returns them).
    pitch : float, m
        Hole spacing of the plate (5 mm in the tutorial).
    backend : {"cython", "numpy"}
        Engine of :func:`ccdgrid.hole_error.grid_error` for the seed objective.

    Returns
    -------
    GridFit

    Raises
    ------
    CcdgridError
        "too few holes" with fewer than 3 holes or indices on one line; bad
        shapes, non-finite values, ``pitch <= 0``.

    Notes
    -----
    Pixel size. With ``s = (pixel2, pixel1)`` the pixel sizes along (x, y),
    the plate is square iff the columns of ``diag(s) R`` are orthogonal with
    length ``pitch``:
    ``Xx² u + Xy² v = pitch²``, ``Yx² u + Yy² v = pitch²``,
    ``Xx Yx u + Xy Yy v = 0`` with ``u = pixel2²``, ``v = pixel1²``.
    The tutorial solves the first two (``Py = pitch sqrt((Yx² - Xx²) /
    ((Xy Yx)² - (Xx Yy)²))``, ``Px = sqrt((pitch² - (Xy Py)²) / Xx²)``), which
    is singular for a lattice at 45°; all three are solved here in the least
    squares sense (see :func:`pixel_size_from_vectors`).
    """
    check_backend(backend)
    pts = as_points(peaks, "peaks")
    ij = np.asarray(indices)
    if ij.shape != pts.shape:
        raise CcdgridError(
            f"`indices` must have the shape of `peaks` {pts.shape}, got {np.shape(indices)}"
        )
    if not np.issubdtype(ij.dtype, np.integer) and not (
        np.all(np.isfinite(ij)) and np.all(ij == np.round(ij))
    ):
        raise CcdgridError("`indices` must hold integers")
    ij = ij.astype(np.int64)
    if not np.all(np.isfinite(pts)):
        raise CcdgridError("`peaks` must be finite (drop the rejected holes first)")
    pitch = _check_pitch(pitch)
    if len(pts) < _MIN_HOLES:
        raise CcdgridError(f"too few holes to fit a grid: {len(pts)}, need {_MIN_HOLES}")
    design = np.column_stack([np.ones(len(ij)), ij.astype(np.float64)])
    coef, _, rank, _ = np.linalg.lstsq(design, pts, rcond=None)
    if rank < 3:
        raise CcdgridError("too few holes to fit a grid: the indexed holes lie on one line")
    origin, vectors = coef[0], coef[1:3]
    ideal_lsq = design @ coef
    rms_lsq = _rms(ideal_lsq - pts)

    p_lsq = _to_tutorial(origin, vectors)
    p_seed, seed_result = _minimise_seed(p_lsq, pts, backend)
    if p_seed is not None:
        origin_s, vectors_s = _from_tutorial(p_seed)
        ideal_seed = origin_s + ij @ vectors_s
        rms_seed = _rms(ideal_seed - pts)
    else:
        rms_seed = float("nan")
    # lsq is optimal in this metric: prefer it unless the seed is better beyond rounding
    if p_seed is not None and rms_seed < rms_lsq * (1.0 - 1e-9):
        method, params, origin, vectors, ideal = "seed", p_seed, origin_s, vectors_s, ideal_seed
    else:
        method, params, ideal = "lsq", p_lsq, ideal_lsq
    disp = ideal - pts
    norm = np.hypot(disp[:, 0], disp[:, 1])
    return GridFit(
        P=params,
        origin=np.array(origin, dtype=np.float64),
        vectors=np.array(vectors, dtype=np.float64),
        pixel_size=pixel_size_from_vectors(vectors, pitch),
        pitch=pitch,
        indices=ij,
        rms_lsq=rms_lsq,
        rms_seed=rms_seed,
        method_used=method,
        ideal=ideal,
        displacement=disp,
        residual_rms=_rms(disp),
        residual_max=float(norm.max()),
        seed_result=seed_result,
    )


@one_blas_thread
def centred_grid(grid, peaks, shape):
    """The grid re-expressed against the plate's lattice as seen at the image centre.

    :func:`fit_grid` fits the lattice to all holes, so the displacement it
    leaves has no affine part over the plate: the average magnification
    and rotation of the distortion go into the pixel size and the lattice
    vectors. The distortion is only defined up to such an affine map, and
    detectors define it otherwise: no displacement and no local
    magnification at the centre of the detector, where a taper distorts
    least (the seed tutorial's premise) and a radial barrel or pincushion
    is zero. This returns the same physical calibration (the ideal
    positions are moved by one affine map ``G``, so corrected images differ
    by that map only) in that frame: the positions the fitted lattice gives
    the holes, ``ideal = m + d``, are fitted near the centre ``c`` by a cubic
    polynomial of the measured positions ``m``, ``ideal ~ q0 + J (m - c) +
    ...``, and ``G(q) = c + K J^-1 (q - q0)``, ``K`` the linear map that
    makes the lattice seen at ``c`` a square plate's (:func:`_squared`);
    then ``d' = G(ideal) - m`` is zero at ``c`` with a gradient there that
    is the shear alone (zero when the holes there show a square plate), and
    the pixel size is that of the lattice at the centre. A radial distortion
    about the centre (the field most generators and tapers have) is then
    recovered as it is defined, instead of with its average magnification
    removed: on barrel fields of 30-60 px, 0.05-0.22 px RMS of apparent
    error become 0.004-0.010 px (``benchmarks/probe/lattice_convention.py``).

    Parameters
    ----------
    grid : GridFit
        A lattice fitted to all holes (:func:`fit_grid`).
    peaks : array_like of shape (N, 2), float, px
        The measured ``(y, x)`` centres of ``grid``'s holes, in its order.
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.

    Returns
    -------
    GridFit
        ``origin``, ``vectors``, ``P``, ``pixel_size``, ``ideal``,
        ``displacement``, ``residual_rms``/``residual_max`` in the centred
        frame; ``frame`` says how. The fit figures (``rms_lsq``,
        ``rms_seed``) are the lattice fit's.

    Notes
    -----
    The centre is the image centre when holes surround it (one within 1.5
    pitch, and each quadrant around it holding at least an eighth of its 49
    nearest holes), else the hole nearest the holes' median.
    The fit uses the half of the holes nearest to it (at least 49, all of
    them when fewer): of degree 5 with at least 100 holes, which makes
    ``J`` exact for radial fields up to ``r⁴ (m - c)`` and keeps the noise
    of the centres from tilting the frame (with 0.02 px of noise per
    centre, 700 holes: 0.030-0.034 px RMS between the recovered and the
    true field, against 0.028 for the centres' noise alone and 0.07-0.08
    with a cubic fit of the 49 nearest holes); cubic with 30-99 holes,
    quadratic with 15-29, else affine (the lattice then stays the
    least-squares one, up to the noise). The degree is also capped by the
    rows and columns of sites among those holes (n + 1 of each for degree
    n), and lowered while the design is ill-conditioned. A degenerate fit
    keeps the least-squares lattice (``frame["degree"]`` 0).
    """
    pts = as_points(peaks, "peaks")
    if len(pts) != len(grid.ideal):
        raise CcdgridError(
            f"`peaks` must have one row per hole of the grid ({len(grid.ideal)}), got {len(pts)}"
        )
    centre = _frame_centre(pts, shape, grid.vectors)
    k = min(len(pts), max(_CENTRE_HOLES, -(-len(pts) // 2)))
    near = np.argpartition(((pts - centre) ** 2).sum(axis=1), k - 1)[:k]
    # a polynomial of degree n in the plane needs n + 1 distinct rows and
    # columns of sites (holes on two lines leave y² undetermined): capped
    # exactly from the indices, whatever the plate's rotation
    rows, cols = (len(np.unique(grid.indices[near, a])) for a in (0, 1))
    top = 5 if k >= 100 else 3 if k >= 30 else 2 if k >= 15 else 1
    # powers of offsets scaled to [-1, 1] per axis: a well-conditioned design
    scale = np.maximum(1.0, np.abs(pts[near] - centre).max(axis=0))
    rel = (pts[near] - centre) / scale
    for degree in range(max(1, min(top, rows - 1, cols - 1)), 0, -1):
        design = _monomials(rel, degree)
        coef, _, rank, sv = np.linalg.lstsq(design, grid.ideal[near], rcond=None)
        if rank == design.shape[1] and sv[-1] > 1e-8 * sv[0]:
            break
    q0 = coef[0]
    jac = coef[1:3].T / scale  # d ideal / d (y, x): rows y, x of the positions
    if not (np.all(np.isfinite(jac)) and np.linalg.cond(jac) < 1e6):
        # a degenerate local fit: keep the least-squares lattice
        return replace(grid, frame={"centre": centre.tolist(), "holes": int(k), "degree": 0})
    # the lattice seen at the centre, then squared: only its rotation and
    # the pixel sizes are not distortion (see _squared)
    inv = np.linalg.inv(jac)
    local = grid.vectors @ inv.T
    vectors, shear_deg = _squared(local, grid.pitch)
    to_plate = np.linalg.solve(local, vectors).T @ inv

    def move(q):
        return centre + (q - q0) @ to_plate.T

    ideal = move(grid.ideal)
    origin = move(grid.origin)
    disp = ideal - pts
    norm = np.hypot(disp[:, 0], disp[:, 1])
    return replace(
        grid,
        P=_to_tutorial(origin, vectors),
        origin=origin,
        vectors=vectors,
        pixel_size=pixel_size_from_vectors(vectors, grid.pitch),
        ideal=ideal,
        displacement=disp,
        residual_rms=_rms(disp),
        residual_max=float(norm.max()),
        frame={
            "centre": centre.tolist(),
            "holes": int(k),
            "degree": int(degree),
            "jacobian": jac.tolist(),
            "shear_deg": shear_deg,
        },
    )


def _squared(vectors, pitch, rounds=4):
    """``(square, shear)``: the lattice vectors of a square plate nearest ``vectors``.

    ``vectors`` (2, 2), rows the i and j steps ``(dy, dx)`` in px. The plate
    is square with sides ``pitch``: in metres its steps are orthogonal and
    equally long, so the lattice seen through pixels ``(pixel1, pixel2)`` is
    ``pitch Q diag(1 / pixel1, 1 / pixel2)``, ``Q`` orthogonal. What the
    holes show beyond that (a shear, a stretch along a diagonal: a taper's)
    is distortion, and must be left in the displacement: kept in the
    lattice, it would survive the correction (a 1 % shear left a square
    plate at 90.57 degrees). ``Q`` and the pixel sizes are fitted
    alternately (nearest orthogonal matrix, then each pixel size by least
    squares), from :func:`pixel_size_from_vectors`. ``shear`` is the angle
    between the steps in metres before, minus 90 degrees.
    """
    size = np.array(pixel_size_from_vectors(vectors, pitch))
    phys = vectors * size / pitch
    cos = phys[0] @ phys[1] / (np.linalg.norm(phys[0]) * np.linalg.norm(phys[1]))
    shear = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))) - 90.0)
    for _ in range(rounds):
        u, _, vt = np.linalg.svd(vectors * size / pitch)
        q = u @ vt  # the orthogonal matrix nearest it (its determinant's sign kept)
        # each column of ``vectors`` is ``pitch q[:, c] / size[c]`` at best
        size = pitch * np.sum(q * q, axis=0) / np.sum(vectors * q, axis=0)
    return pitch * q / size, shear


def _frame_centre(pts, shape, vectors):
    """The image centre when holes surround it, else the hole nearest the holes' median.

    Surrounded: a hole within 1.5 pitch of it and, among its 49 nearest
    holes, at least 1/8 in each quadrant around it (the centre of a plate,
    not the rim of a lit disc passing near it or a gap between modules).
    """
    centre = (np.asarray(shape[:2], dtype=np.float64) - 1.0) / 2.0
    pitch = float(np.mean(np.hypot(vectors[:, 0], vectors[:, 1])))
    rel = pts - centre
    dist2 = (rel**2).sum(axis=1)
    k = min(len(pts), _CENTRE_HOLES)
    near = rel[np.argpartition(dist2, k - 1)[:k]]
    quadrants = np.bincount(2 * (near[:, 0] >= 0) + (near[:, 1] >= 0), minlength=4)
    if dist2.min() <= (1.5 * pitch) ** 2 and quadrants.min() * 8 >= k:
        return centre
    median = np.median(pts, axis=0)
    return pts[np.argmin(((pts - median) ** 2).sum(axis=1))].copy()


_CENTRE_HOLES = 49


def _monomials(rel, degree):
    """Columns 1, y, x, then y², yx, x², ... up to ``degree`` of (M, 2) points."""
    y, x = rel[:, 0], rel[:, 1]
    cols = [np.ones(len(rel)), y, x]
    for total in range(2, degree + 1):
        cols += [y ** (total - a) * x**a for a in range(total + 1)]
    return np.column_stack(cols)


def pixel_size_from_vectors(vectors, pitch):
    """Pixel size that makes a fitted lattice a square grid of side ``pitch``.

    Parameters
    ----------
    vectors : array_like of shape (2, 2), float, px
        Rows: ``(y, x)`` lattice steps for ``i + 1`` and ``j + 1``.
    pitch : float, m
        Side of the square grid on the plate.

    Returns
    -------
    tuple of 2 float, m
        ``(pixel1, pixel2)``: pixel size along y and along x.

    Raises
    ------
    CcdgridError
        If ``pitch <= 0`` or no positive pixel size fits the lattice (e.g. a
        degenerate lattice).

    Notes
    -----
    Solves ``Xx² u + Xy² v = p²``, ``Yx² u + Yy² v = p²`` and
    ``Xx Yx u + Xy Yy v = 0`` (``u = pixel2²``, ``v = pixel1²``, each equation
    divided by ``p²``) by linear least squares, with ``X = vectors[1]`` (the
    j step) and ``Y = vectors[0]`` (the i step) written in (x, y). The two
    first equations alone are the tutorial's formula. A grid seen rotated by
    any angle through rectangular pixels satisfies all three exactly; a
    residual shear (a plate that is not square) is shared between them.
    """
    pitch = _check_pitch(pitch)
    v = np.asarray(vectors, dtype=np.float64)
    (yy, yx), (xy, xx) = v  # i step = Y = (Yy, Yx); j step = X = (Xy, Xx)
    a = np.array([[xx * xx, xy * xy], [yx * yx, yy * yy], [xx * yx, xy * yy]])
    scale = np.abs(a).max()
    if not np.isfinite(scale) or scale == 0:
        raise CcdgridError(f"cannot derive a pixel size from lattice vectors {v.tolist()}")
    uv, _, rank, _ = np.linalg.lstsq(a / scale, np.array([1.0, 1.0, 0.0]), rcond=None)
    uv = uv / scale
    if rank < 2 or not np.all(uv > 0):
        raise CcdgridError(f"cannot derive a pixel size from lattice vectors {v.tolist()}")
    pixel2, pixel1 = pitch * np.sqrt(uv)
    return (float(pixel1), float(pixel2))


def _check_pitch(pitch):
    pitch = check_positive(pitch, "pitch", "a positive length in metres")
    low, high = PITCH_RANGE
    if not low <= pitch <= high:
        raise CcdgridError(
            f"`pitch` = {pitch:g} m is not a plausible hole pitch ({low * 1e6:g} µm to "
            f"{high * 1e2:g} cm): it is in metres, 5 mm is 5e-3"
        )
    return pitch


def _rms(d):
    return float(np.sqrt(np.mean(d[:, 0] ** 2 + d[:, 1] ** 2)))


def _to_tutorial(origin, vectors):
    """(y, x) origin and rows (i step, j step) -> P = (Ox, Oy, Xx, Yx, Xy, Yy)."""
    (yy, yx), (xy, xx) = vectors
    return np.array([origin[1], origin[0], xx, yx, xy, yy], dtype=np.float64)


def _from_tutorial(params):
    ox, oy, xx, yx, xy, yy = params
    return np.array([oy, ox]), np.array([[yy, yx], [xy, xx]])


def _minimise_seed(p0, pts_yx, backend):
    """Minimise the tutorial's objective from ``p0``; (None, report) on failure."""
    points_xy = np.ascontiguousarray(pts_yx[:, ::-1])

    def fun(params):
        value, grad = grid_error(params, points_xy, residuals=False, backend=backend)
        return float(value), np.asarray(grad, dtype=np.float64)

    try:
        with np.errstate(all="ignore"):
            res = minimize(fun, p0, jac=True, method="BFGS")
    except CcdgridError as exc:  # a line search stepped onto a singular R
        return None, {"success": False, "message": str(exc), "nit": 0, "value": float("nan")}
    report = {
        "success": bool(res.success),
        "message": str(res.message),
        "nit": int(res.nit),
        "value": float(res.fun),
    }
    if not np.all(np.isfinite(res.x)) or abs(np.linalg.det(_r_matrix(res.x))) < 1e-12:
        return None, report
    return np.asarray(res.x, dtype=np.float64), report


def _r_matrix(params):
    return np.array([[params[2], params[3]], [params[4], params[5]]])
