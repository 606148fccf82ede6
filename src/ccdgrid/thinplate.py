"""Smoothing thin-plate splines with a polynomial trend, fitted whole or tile by tile.

The spline of :func:`ccdgrid.maps.displacement_maps` (method ``"tps"``) and of
:func:`ccdgrid.cross_validation.cross_validate`: ``f(x) = sum_i c_i phi(|x - p_i|)
+ P(x) a`` with ``phi(r) = r² log r`` (order 2, the thin-plate spline) or
``phi(r) = -r⁴ log r`` (order 3: the spline of least squared third
derivatives, whose trend must hold the quadratics) and ``P`` the monomials
up to the trend's degree, two components fitted at once (``(dy, dx)``, px). :class:`ThinPlate`
solves the system on the complement of the trend by Cholesky, or, given
the factor of a fit to nearly the same centres (:class:`SystemFactor`, a
plate moved a little), by conjugate gradients preconditioned with it;
:func:`fit_tps` falls back to an affine trend (and order 2) when the holes
leave a higher one undetermined, and above ``_TILE_ABOVE`` holes returns a
:class:`TiledThinPlate`, fitted tile by tile and blended.
:func:`rotate_symmetric`, :func:`apply_q` and :func:`monomials` are the
linear algebra it shares with the GCV of :mod:`ccdgrid.gcv`.

Conventions: positions are ``(y, x)`` float64 in the fit's length unit
(index coordinates divided by the hole spacing, as the callers pass them);
the smoothing is added to the diagonal of the kernel matrix in those units:
pitch² for order 2, pitch⁴ for order 3 (``phi`` scales as length² or
length⁴, so a smoothing in these units keeps the fit the same whatever the
pitch in px). The kernel sums come from ``ccdgrid._ext._tps`` or its numpy twin
``ccdgrid._reference.tps`` (``ENGINES[backend]``). Private to ccdgrid: these
names are the API of the other modules, not of the package.
"""

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.spatial import cKDTree

from ._ext import _tps as _tps_cython
from ._reference import tps as _tps_numpy
from .errors import CcdgridError

__all__ = [
    "ENGINES",
    "SystemFactor",
    "ThinPlate",
    "TiledThinPlate",
    "apply_q",
    "fit_tps",
    "monomials",
    "rotate_symmetric",
]

ENGINES = {"cython": _tps_cython, "numpy": _tps_numpy}
# Above this many holes the thin-plate spline is fitted tile by tile: one solve
# costs O(N³) time and 8 N² bytes (7 000 holes, a 24 px pitch at 2048²: 2.7 s
# and 0.4 GB; 29 000 at 4096²: 6.7 GB). Tiles hold ~_TILE_CORE holes of their
# own, are fitted with _TILE_MARGIN pitches of holes around them and blended
# over +-_TILE_BLEND pitches of their boundaries.
_TILE_ABOVE = 2500
_TILE_CORE = 1000
_TILE_MARGIN = 6.0
_TILE_BLEND = 2.0
_TILE_MIN_POINTS = 300
# Preconditioned conjugate gradients (a refit from a previous factor): stop
# at this residual relative to the right-hand side. The values fitted at the
# centres then differ from the exact solution's by at most twice the
# residual (see ThinPlate's Notes): with |d| ~ sqrt(N) x 20 px, ~1e-6 px at
# one hole in the worst case, the float32 maps' own rounding. Give up for a
# Cholesky solve after _PCG_MAX_ITER iterations (each ~4 ms at 1500
# centres, a factorisation ~35 ms).
_PCG_RTOL = 1e-9
_PCG_MAX_ITER = 6


@dataclass(frozen=True, eq=False)
class SystemFactor:
    """Cholesky factor of a thin-plate fit's reduced system, kept for a refit.

    A refit of nearly the same centres (the same holes after a small move
    of the plate) is solved by conjugate gradients preconditioned with it
    (see :class:`ThinPlate`). Opaque outside ccdgrid.

    Attributes
    ----------
    upper : ndarray of shape (n - p, n - p), float32, Fortran order
        Upper triangle ``U`` of ``U' U = Q2' (K + s I) Q2`` (the strictly
        lower triangle holds no meaning); float32 halves its memory and
        changes a preconditioner by nothing that matters.
    n_points : int
        Number of centres ``n`` of the fit.
    degree : int
        Trend degree of the fit (``p`` monomials).
    points : ndarray of shape (n, 2) or None
        The centres, in the caller's unit, when the caller keeps them to
        match a refit's centres with these (:mod:`ccdgrid.maps` does).
    order : int
        Kernel order of the fit (2 or 3): a factor preconditions only a
        system of its own kernel.
    """

    upper: np.ndarray
    n_points: int
    degree: int
    points: object = None
    order: int = 2


def fit_tps(pts, disp, smoothing, degree, backend="cython", factor=None, order=2):
    """``(spline, degree used)``: a polynomial trend, else an affine one.

    Holes along a few lines (a narrow strip of plate) leave a quartic trend
    undetermined: the trend's monomials are then rank-deficient. The
    fallback to an affine trend is also one to order 2 (order 3 needs the
    quadratics in its trend); ``spline.order`` is the order used. Above
    ``_TILE_ABOVE`` holes the spline is a :class:`TiledThinPlate` (which
    ignores ``factor``); otherwise ``factor`` is passed to
    :class:`ThinPlate`.
    """
    if len(pts) > _TILE_ABOVE:
        tiled = TiledThinPlate(pts, disp, smoothing, degree, backend, order)
        return tiled, tiled.degree
    return _single_tps(pts, disp, smoothing, degree, backend, factor, order)


def _single_tps(pts, disp, smoothing, degree, backend, factor=None, order=2):
    for deg, ord_ in dict.fromkeys(((degree, order), (1, 2))):
        try:
            return ThinPlate(pts, disp, smoothing, deg, backend, factor, ord_), deg
        except (np.linalg.LinAlgError, linalg.LinAlgError):
            continue
    raise CcdgridError("too few holes: the thin-plate spline system is singular")


class TiledThinPlate:
    """Smoothing thin-plate splines fitted tile by tile and blended.

    The bounding box of the centres is cut into a grid of tiles whose
    boundaries are quantiles of the centres' coordinates (so that tiles hold
    about ``_TILE_CORE`` centres each). Each tile's spline is fitted to the
    centres within ``_TILE_MARGIN`` units of it (at least
    ``_TILE_MIN_POINTS``, the nearest ones), so that it is not extrapolating
    where it is used; the splines are blended with a C¹ partition of unity
    that ramps over ``+-_TILE_BLEND`` units around every boundary. Cost
    O(N · tile²) instead of O(N³), memory O(tile²) instead of O(N²).

    A smoothing spline is local in effect (a centre's influence on the fit
    decays over a few spacings once the smoothing is set), so the blend of
    overlapping fits differs from the single fit by much less than the
    noise of the holes (tested against the single spline).

    Parameters and the call are those of :class:`ThinPlate`; ``degree``
    and ``order`` are the trend degree and kernel order every tile used (the
    lowest, if a tile had to fall back to an affine trend and order 2).
    """

    def __init__(self, pts, disp, smoothing, degree, backend="cython", order=2):
        self.centres = np.ascontiguousarray(pts, dtype=np.float64)
        self.values = np.asarray(disp, dtype=np.float64)
        self.smoothing = float(smoothing)
        n = len(self.centres)
        lo, hi = self.centres.min(axis=0), self.centres.max(axis=0)
        extent = np.maximum(hi - lo, 1e-9)
        n_tiles = -(-n // _TILE_CORE)
        ty = max(1, round(np.sqrt(n_tiles * extent[0] / extent[1])))
        tx = max(1, -(-n_tiles // ty))
        # each tile's core at least two blend widths wide: weights stay separable
        ty = int(min(ty, max(1, extent[0] // (4 * _TILE_BLEND))))
        tx = int(min(tx, max(1, extent[1] // (4 * _TILE_BLEND))))
        self.cuts = (
            _quantile_cuts(self.centres[:, 0], ty),
            _quantile_cuts(self.centres[:, 1], tx),
        )
        tree = cKDTree(self.centres)
        self.tiles = []
        degrees = []
        orders = []
        for (y0, y1), (x0, x1) in itertools.product(
            zip(*_bounds(self.cuts[0]), strict=True), zip(*_bounds(self.cuts[1]), strict=True)
        ):
            near = (
                (self.centres[:, 0] >= y0 - _TILE_MARGIN)
                & (self.centres[:, 0] <= y1 + _TILE_MARGIN)
                & (self.centres[:, 1] >= x0 - _TILE_MARGIN)
                & (self.centres[:, 1] <= x1 + _TILE_MARGIN)
            )
            idx = np.flatnonzero(near)
            if len(idx) < _TILE_MIN_POINTS:
                # the tile's middle, its infinite outer bounds taken at the centres' extent
                middle = 0.5 * (np.maximum((y0, x0), lo) + np.minimum((y1, x1), hi))
                idx = np.sort(tree.query(middle, k=min(_TILE_MIN_POINTS, n))[1])
            spline, deg = _single_tps(
                self.centres[idx], self.values[idx], smoothing, degree, backend, order=order
            )
            self.tiles.append(spline)
            degrees.append(deg)
            orders.append(spline.order)
        self.degree = min(degrees)
        self.order = min(orders)
        self.shape = (len(self.cuts[0]) + 1, len(self.cuts[1]) + 1)

    def __call__(self, x):
        """Values at points ``x`` (M, 2) -> (M, 2) float64."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.zeros((len(x), 2))
        wy = _blend_weights(x[:, 0], self.cuts[0])  # (ty, M)
        wx = _blend_weights(x[:, 1], self.cuts[1])  # (tx, M)
        for k, spline in enumerate(self.tiles):
            w = wy[k // self.shape[1]] * wx[k % self.shape[1]]
            used = np.flatnonzero(w > 0)
            if used.size:
                out[used] += w[used, None] * spline(x[used])
        return out

    def residual_at_centres(self):
        """Values at the centres minus the values fitted, (N, 2) float64."""
        return self(self.centres) - self.values


def _quantile_cuts(coord, tiles):
    """Interior tile boundaries along one axis: ``tiles - 1`` quantiles of ``coord``."""
    if tiles <= 1:
        return np.zeros(0)
    return np.quantile(coord, np.arange(1, tiles) / tiles)


def _bounds(cuts):
    """(lower, upper) bounds of the tiles along one axis, infinite at the ends."""
    edges = np.concatenate([[-np.inf], cuts, [np.inf]])
    return edges[:-1], edges[1:]


def _blend_weights(coord, cuts):
    """(tiles, M) C¹ partition of unity along one axis.

    Tile ``t``'s weight is ``S(c_{t-1}) - S(c_t)`` with ``S(c)`` a smoothstep
    from 0 to 1 over ``[c - _TILE_BLEND, c + _TILE_BLEND]``: the weights sum
    to one (the sum telescopes) and vanish beyond a blend width outside the
    tile.
    """
    u = (coord[None, :] - cuts[:, None] + _TILE_BLEND) / (2 * _TILE_BLEND)
    u = np.clip(u, 0.0, 1.0)
    step = u * u * (3.0 - 2.0 * u)  # (tiles - 1, M)
    ones = np.ones((1, len(coord)))
    above = np.concatenate([ones, step, 0.0 * ones])  # S(c_0 = -inf) = 1, S(c_T = +inf) = 0
    return above[:-1] - above[1:]


class ThinPlate:
    """Smoothing thin-plate spline ``f(x) = sum_i c_i phi(|x - p_i|) + P(x) a``, 2 components.

    ``phi(r) = r² log r`` (order 2) or ``-r⁴ log r`` (order 3); ``P`` the
    monomials up to ``degree``. For order 2 the same function as
    ``scipy.interpolate.RBFInterpolator(kernel="thin_plate_spline",
    smoothing=s, degree=degree)`` (scipy has no ``-r⁴ log r`` kernel), solved
    and evaluated at about half the cost: the system ``[[K + s I, P], [P', 0]]`` is reduced to the
    complement of ``P`` (``Q2' (K + s I) Q2``, positive definite) and
    solved by Cholesky, O(N³ / 3) instead of an O(2 N³ / 3) LU (for order
    3 the projected matrix is positive definite because the trend holds the
    quadratics, the null space of its semi-norm). The kernel
    matrix and the values at new points come from the kernel sums of
    ``ccdgrid._ext._tps`` (or their numpy twin), ``phi = r^(2m - 2) log(r²) / 2``
    from ``r²`` (no square root), the trend added in the same pass.

    Parameters
    ----------
    pts : ndarray of shape (N, 2), float64
        Centres, in the fit's length unit.
    disp : ndarray of shape (N, 2), float64
        Values at the centres.
    smoothing : float
        Added to the diagonal of the kernel matrix, >= 0 (length² units for
        order 2, length⁴ for order 3).
    degree : int
        Degree of the polynomial trend, >= ``order - 1``.
    backend : {"cython", "numpy"}
        Engine of the kernel sums.
    factor : SystemFactor or None
        The factor of a fit to nearly the same centres, in the same order
        and with the same trend degree and kernel order (the same holes
        after a small move of the plate): the system is then solved by
        conjugate gradients preconditioned with it, to a residual of
        ``_PCG_RTOL`` relative to the right-hand side (see Notes). A factor
        of another size, degree or kernel order, or one that has not
        converged after ``_PCG_MAX_ITER`` iterations, gives way to a
        factorisation. None: Cholesky.
    order : {2, 3}
        Order of the kernel: 2, ``r² log r`` (the thin-plate spline); 3,
        ``-r⁴ log r``, smoother (it minimises the squared third derivatives),
        which follows a field varying over a few hole spacings more closely
        from the same holes.

    Attributes
    ----------
    factor : SystemFactor
        The factor to pass to a refit: this fit's own after a Cholesky
        solve, the one given after a preconditioned solve (a chain of
        refits keeps the first factor while it serves).
    iterations : int
        Conjugate-gradient iterations of a preconditioned solve, 0 for a
        Cholesky one.

    Raises
    ------
    numpy.linalg.LinAlgError
        If the trend is undetermined by the centres or the system is singular.
    ValueError
        If ``order`` is not 2 or 3, or is 3 with a trend degree below 2.

    Notes
    -----
    A plate moved by a similarity leaves ``Q2' (K + s I) Q2`` unchanged up
    to a scale (the kernel's log term only adds a polynomial in the pair
    whose every monomial has degree <= ``order - 1`` in one of the two
    points, which ``Q2`` annihilates); what the distortion changes moves
    its eigenvalues against the previous factor's by a fraction of a per cent (a plate
    moved by (3.4, -2.7) px and 20 mdeg at 4096², 1504 holes: the
    preconditioned matrix's eigenvalues lie in [0.9962, 1.0039]), so two or
    three iterations, each one product with ``K`` and two triangular
    solves, reach the tolerance: 17 ms instead of 45 ms there.

    With the residual ``r`` left, the values fitted at the centres,
    ``d - s c - Q2 r``, differ from the exact solution's by at most
    ``2 |r|`` (``s (Q2' K Q2 + s I)^-1`` has norm at most 1, the projected
    kernel being positive semi-definite): with ``_PCG_RTOL = 1e-9``, 9e-10 px
    at most over the 4096² plate above, whose maps reach 31 px.
    """

    def __init__(self, pts, disp, smoothing, degree, backend="cython", factor=None, order=2):
        if order not in (2, 3) or degree < order - 1:
            raise ValueError(f"kernel order {order!r} with a degree-{degree} trend")
        self.centres = np.ascontiguousarray(pts, dtype=np.float64)
        self.degree = degree
        self.order = order
        self.smoothing = float(smoothing)
        self._engine = ENGINES[backend]
        self.shift = self.centres.mean(axis=0)
        self.scale = max(float(np.abs(self.centres - self.shift).max()), 1e-300)
        poly = self._poly(self.centres)
        n, p = poly.shape
        if n <= p:
            raise np.linalg.LinAlgError("fewer centres than trend terms")
        (house, tau), _ = linalg.qr(poly, mode="raw")
        r_diag = np.abs(np.diag(house[:p]))
        if r_diag.min() <= 1e-10 * r_diag.max():
            raise np.linalg.LinAlgError("the trend's monomials are rank-deficient")
        kern = np.empty((n, n))
        self._engine.kernel_matrix(self.centres, float(smoothing), kern, order)
        rhs = apply_q(house, tau, np.asarray(disp, dtype=np.float64), "L")
        self.iterations = 0
        solved = None
        if (
            factor is not None
            and factor.n_points == n
            and factor.degree == degree
            and factor.order == order
        ):
            solved = _preconditioned(house, tau, kern, rhs[p:], factor.upper)
        if solved is not None:
            y, (kc, coef), self.iterations = solved
            self._factor = factor
            self.coef = np.ascontiguousarray(coef)
            # Q1' (K + s I) Q2 y, from (K + s I) c: the Q' of its first p rows
            cross = apply_q(house, tau, kc, "L")[:p]
        else:
            rotated = rotate_symmetric(house, tau, kern)  # upper triangle only
            del kern
            # Cholesky of Q2' (K + s I) Q2: positive definite for distinct centres
            upper, _ = linalg.cho_factor(rotated[p:, p:], lower=False)
            y = linalg.cho_solve((upper, False), rhs[p:])
            # kept as computed (float64); converted only if a caller keeps it
            self._factor = (upper, n, degree, order)
            padded = np.zeros((n, y.shape[1]))
            padded[p:] = y
            self.coef = np.ascontiguousarray(
                apply_q(house, tau, padded, "L", transpose=False)  # c = Q2 y
            )
            cross = rotated[:p, p:] @ y
        # P a = d - (K + s I) c, projected on Q1: R a = Q1' d - (Q1' (K + s I) Q2) y
        upper = np.triu(house[:p])
        self.trend = np.ascontiguousarray(linalg.solve_triangular(upper, rhs[:p] - cross))

    @property
    def factor(self):
        """The :class:`SystemFactor` a refit may reuse (see the class's Attributes)."""
        if not isinstance(self._factor, SystemFactor):
            upper, n, degree, order = self._factor
            self._factor = SystemFactor(
                np.asfortranarray(upper, dtype=np.float32), n, degree, order=order
            )
        return self._factor

    def residual_at_centres(self):
        """Values at the centres minus the values fitted, (N, 2) float64.

        The solution satisfies ``(K + s I) c + P a = d``, so at the centres
        ``f = K c + P a = d - s c``: no kernel sum over the N² pairs (at
        4096², ~1500 holes, that evaluation cost as much as a fifth of the
        coarse grid's). Exact up to rounding (~1e-12 relative to ``d``).
        """
        return -self.smoothing * self.coef

    def _poly(self, x):
        u = (x - self.shift) / self.scale
        cols = [
            u[:, 0] ** a * u[:, 1] ** (t - a) for t in range(self.degree + 1) for a in range(t + 1)
        ]
        return np.column_stack(cols)

    def __call__(self, x):
        """Values at points ``x`` (M, 2) -> (M, 2) float64."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty((len(x), 2))
        self._engine.evaluate(
            x, self.centres, self.coef, self.trend, self.shift, self.scale, out, self.order
        )
        return out


def _preconditioned(house, tau, kern, rhs, upper):
    """Solve ``Q2' K Q2 y = rhs`` by conjugate gradients preconditioned with ``U' U``.

    ``kern`` (n, n) is ``K + s I`` (both triangles), ``Q`` given by the
    reflectors ``house, tau``, ``rhs`` (n - p, k) with one independent
    system per column, ``upper`` the Fortran-ordered ``U``. Returns
    ``(y, (K c, c), iterations)`` with ``c = Q2 y`` (n, k), or None when the
    residual is still above ``_PCG_RTOL`` after ``_PCG_MAX_ITER``
    iterations or the iteration broke down.
    """
    n, p = kern.shape[0], house.shape[0] - rhs.shape[0]
    if upper.shape != (rhs.shape[0], rhs.shape[0]):
        return None
    potrs = linalg.get_lapack_funcs("potrs", (upper,))
    padded = np.zeros((n, rhs.shape[1]))

    def product(v):
        """``(Q2' K Q2 v, (K Q2 v, Q2 v))``."""
        padded[p:] = v
        c = apply_q(house, tau, padded, "L", transpose=False)
        kc = kern @ c
        return apply_q(house, tau, kc, "L")[p:], (kc, c)

    def precondition(r):
        z, info = potrs(upper, r.astype(np.float32), lower=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK potrs failed (info {info})")
        return z.astype(np.float64)

    limit = _PCG_RTOL * np.linalg.norm(rhs, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = precondition(rhs)
        ay, (kc, c) = product(y)
        r = rhs - ay
        d = rz = None
        for it in range(_PCG_MAX_ITER + 1):
            # tested before preconditioning: a converged residual needs no
            # triangular solves (two passes over the factor)
            if np.all(np.linalg.norm(r, axis=0) <= limit):
                return y, (kc, c), it
            if it == _PCG_MAX_ITER:
                return None
            z = precondition(r)
            rz_new = np.einsum("ij,ij->j", r, z)
            d = z if d is None else z + np.where(rz > 0, rz_new / rz, 0.0) * d
            rz = rz_new
            q, (kd, cd) = product(d)
            # a column that has converged takes no step (0/0 would be NaN)
            alpha = np.where(rz > 0, rz / np.einsum("ij,ij->j", d, q), 0.0)
            if not np.all(np.isfinite(alpha)):
                return None
            y += alpha * d
            # K c and c follow y (linear in it): no product to recompute them
            kc += alpha * kd
            c += alpha * cd
            r -= alpha * q
    return None


def rotate_symmetric(house, tau, kern):
    """``Q' K Q`` for a symmetric ``K``, ``Q`` from the reflectors of ``qr(..., mode="raw")``.

    Only the upper triangle of the result is computed (and only it may be
    read); ``kern`` (C-contiguous, float64) is overwritten.

    Notes
    -----
    With ``Q = I - V T V'`` (the compact WY form of the ``p`` reflectors,
    ``T`` upper triangular) and ``W = K V``::

        Q' K Q = K - V B' - B V',   B = W T - V M / 2,   M = T' V' W T

    one product ``K V`` and one symmetric rank-2p update (BLAS ``syr2k``,
    one triangle): ~4 N² p flops and two passes over ``K``, where applying
    the reflectors from both sides (LAPACK ``ormqr`` twice) takes ~8 N² p
    and four. 7x faster at N = 1500, p = 15 on one thread.
    """
    p = len(tau)
    v = np.tril(house[:, :p], -1)
    v[np.arange(p), np.arange(p)] = 1.0
    vtv = v.T @ v
    t = np.zeros((p, p))
    for i in range(p):  # LAPACK's larft, forward and column-wise
        t[:i, i] = -tau[i] * (t[:i, :i] @ vtv[:i, i])
        t[i, i] = tau[i]
    w = kern @ v
    m = t.T @ (v.T @ w) @ t
    b = w @ t - v @ (0.25 * (m + m.T))  # M is symmetric up to rounding
    # K' = K is Fortran-contiguous: BLAS updates it in place, its lower
    # triangle being K's upper one
    out = linalg.blas.dsyr2k(-1.0, v, b, beta=1.0, c=kern.T, trans=0, lower=1, overwrite_c=1)
    return out.T


def apply_q(house, tau, c, side, transpose=True):
    """``Q' c`` (side "L"; ``Q c`` if not ``transpose``) or ``c Q`` (side "R").

    ``Q`` is given by the Householder reflectors of ``scipy.linalg.qr(...,
    mode="raw")``.
    """
    ormqr = linalg.get_lapack_funcs("ormqr", (house, c))
    trans = "T" if (side == "L") == transpose else "N"
    lwork = max(1, c.shape[1] if side == "L" else c.shape[0]) * 64
    out, _, info = ormqr(side, trans, house, tau, c, lwork)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK ormqr failed (info {info})")
    return out


def monomials(pts, degree):
    """Columns ``y**a x**b`` (a + b <= degree) on centred, unit-scaled coordinates."""
    u = pts - pts.mean(axis=0)
    u = u / max(np.abs(u).max(), 1e-300)
    cols = [u[:, 0] ** a * u[:, 1] ** (t - a) for t in range(degree + 1) for a in range(t + 1)]
    return np.column_stack(cols)
