"""Generalised cross-validation (GCV) of the thin-plate smoothing, trend degree and kernel order.

:func:`gcv_scores` scores every smoothing of ``GCV_GRIDS[order]`` for each
trend degree from one eigendecomposition of the projected kernel matrix of
one kernel order (2: ``r² log r``, smoothing in pitch²; 3: ``-r⁴ log r``,
smoothing in pitch⁴); :func:`gcv_choice` picks the model (order, degree)
with the lowest score and refines its smoothing between grid values. :class:`GcvBasis` keeps that
eigenbasis so that the next fit of the same plate moved a little
(:func:`reused_gcv_scores`) only projects the new displacement.
:func:`gcv_subset` bounds the O(N³) cost to ``GCV_MAX_POINTS`` holes in
patches spread over the region one trend of the fit covers.

Conventions: positions ``(y, x)`` float64 in the fit's length unit (the
hole spacing), displacements ``(dy, dx)`` float64 in px; the thin-plate
spline and its linear algebra are those of :mod:`ccdgrid.thinplate`.
Private to ccdgrid: these names are the API of :mod:`ccdgrid.maps` and
:mod:`ccdgrid.cross_validation`, not of the package.
"""

import functools
from dataclasses import dataclass, replace

import numpy as np
from scipy import linalg, optimize
from scipy.spatial import cKDTree

from .thinplate import _TILE_ABOVE, ENGINES, apply_q, monomials, rotate_symmetric

__all__ = [
    "GCV_GRID",
    "GCV_GRIDS",
    "GCV_MAX_POINTS",
    "KERNEL_NAMES",
    "ORDER3_MARGIN",
    "GcvBasis",
    "GcvScores",
    "candidate_degrees",
    "coherent_misfit",
    "gcv_choice",
    "gcv_scores",
    "gcv_smoothing",
    "gcv_subset",
    "local_subset",
    "refined_minimum",
    "reused_gcv_scores",
    "reused_subset",
    "spread_subset",
]

GCV_GRID = np.logspace(-6, 3, 37)  # smoothing values tried, in units of pitch²
# The order-3 kernel -r⁴ log r: its smoothing is in units of pitch⁴ (the
# kernel scales as length⁴). The eigenvalues of its projected kernel matrix
# (what the smoothing is weighed against) are those of r² log r at a hole's
# scale (smallest 0.22 against 0.29, on a jittered 20 x 20 lattice with a
# quadratic trend) but reach 3.7e5 against 1.3e3 at the plate's: smoothing
# a field to its trend takes ~300x more, hence three more decades at the
# top, same step (1.78x) as GCV_GRID. GCV chose 1e-6 (three plates of the
# outside generator, low noise), 7.1, 17 and 372 pitch⁴ on the others; the
# best smoothing for the truth lay in 1e-6 to 1e3.
GCV_GRID_ORDER3 = np.logspace(-6, 6, 49)
GCV_GRIDS = {2: GCV_GRID, 3: GCV_GRID_ORDER3}
# The order-3 kernel is chosen when its GCV score is this much below the
# thin-plate spline's (relative). Where the noise hides the field both are
# smoothed to the trend and their scores differ by less than 0.5 % either
# way (8 plates of 324 holes, noise only); where order 3 follows the field
# better its score was 4.5-70 % lower (the outside generator's plates).
ORDER3_MARGIN = 0.01
# how the kernels are named to users (summary, detector file)
KERNEL_NAMES = {2: "tps", 3: "tps3"}
# GCV needs an O(N³) eigendecomposition; above this many holes it runs on
# patches of holes spread over the plate (see spread_subset)
GCV_MAX_POINTS = 500
# the plate is cut into SUBSET_CELLS x SUBSET_CELLS cells, one patch in each
SUBSET_CELLS = 2
# a tiled fit (above thinplate._TILE_ABOVE holes) gives each tile its own
# trend over about this many holes (1000 of its own and a 6-pitch margin)
GCV_TILE_POINTS = 1500
# A GCV on a subset does not see a local feature of the field outside its
# patches (a bump of 3 px over 1.6 pitches, at 4096²): the fit to all holes
# is checked for a misfit shared by neighbouring holes (coherent_misfit),
# and where one shows, a GCV of the LOCAL_GCV_POINTS holes around it may
# lower the smoothing. Holes per neighbourhood, and the misfit, in units of
# its noise, that counts as one (with the neighbourhood's mean: on 26 fuzz
# plates of 705-3941 holes with no local feature the largest was 6.4; on
# four 4096² plates with a bump GCV had smoothed away, 29-148; with its
# median, as now: 3.1-7.6 on 12 plates without, 21-113 on those four).
MISFIT_NEIGHBOURS = 13
MISFIT_Z = 10.0
LOCAL_GCV_POINTS = 300


def candidate_degrees(n_points):
    """Trend degrees GCV may choose from: at least 2 holes per polynomial term."""
    return [d for d in (1, 2, 3, 4) if n_points >= (d + 1) * (d + 2)] or [1]


def gcv_choice(pts, disp, degree, degrees, backend="cython", scorer=None, orders=(2, 3)):
    """``(smoothing, scores, degree, order)`` minimising the GCV score.

    The model (kernel order, trend degree) is that of the lowest score on
    its grid (``GCV_GRIDS[order]``), the smoothing its minimum refined
    between grid values (:func:`refined_minimum`). ``degrees`` None: the
    smoothing for ``degree`` alone (and the order among ``orders``).
    Otherwise the pair (degree, smoothing) with the lowest score: GCV
    estimates the leave-one-out error of the whole fit, trend included, so
    scores of different degrees compare. It matters with few holes (a
    coarse pitch, a small lit area): 23 holes under a cubic barrel
    distortion left 0.20 px RMS between the holes with the affine trend the
    fixed rule gave, 0.016 px with the cubic one GCV picks. The same holds
    between kernel orders: order 3 (``-r⁴ log r``) is scored with the
    degrees >= 2 among those (its trend must hold the quadratics), order 2
    with all of them.

    ``scorer(degrees, order=order)`` returns the scores (default:
    :func:`gcv_scores` of ``pts`` and ``disp``). ``orders``: the kernel
    orders to choose from; an order that cannot be scored (no degree for
    it, a singular system) is left out, unless it is the only one.

    Returns
    -------
    smoothing : float
        Length² units for order 2 (pitch², with ``pts`` in pitches),
        length⁴ for order 3.
    scores : dict
        ``{"smoothing": grid, "score": scores on it}`` of the model chosen;
        with ``degrees``, ``"degree_scores"``: the best score of each degree
        of the order chosen; ``"order"``: the order chosen and
        ``"order_scores"``: ``{order: best score}`` of every order scored.
    degree : int
        Trend degree chosen.
    order : int
        Kernel order chosen, 2 or 3.
    """
    if scorer is None:
        scorer = functools.partial(gcv_scores, pts, disp, backend=backend)
    orders = sorted(set(orders))
    if degrees is None:
        # holes along a few lines leave the trend undetermined: the fit then
        # falls back to an affine trend and order 2, whose smoothing is not
        # in order 3's units (pitch² against pitch⁴)
        full = np.linalg.matrix_rank(monomials(pts, degree)) == (degree + 1) * (degree + 2) // 2
        by_order = {}
        for order in orders:
            if (degree < order - 1 or (order > 2 and not full)) and len(orders) > 1:
                continue
            try:
                by_order[order] = scorer([degree], order=order)
            except (np.linalg.LinAlgError, linalg.LinAlgError):
                if len(orders) == 1:
                    raise
        if not by_order:
            raise np.linalg.LinAlgError("no kernel order could be scored")
        best = {o: float(np.min(v[degree])) for o, v in by_order.items()}
        order = _preferred_order(best)
        chosen = by_order[order]
        smoothing = refined_minimum(chosen, degree)
        scores = {"smoothing": chosen.grid.copy(), "score": chosen[degree]}
        scores.update(order=order, order_scores=best)
        return smoothing, scores, degree, order
    # holes along a few lines leave a trend undetermined
    full_rank = [
        deg
        for deg in degrees
        if np.linalg.matrix_rank(monomials(pts, deg)) == (deg + 1) * (deg + 2) // 2
    ]
    by_model = {}
    for order in orders:
        usable = [deg for deg in full_rank if deg >= order - 1]
        try:
            by_model[order] = scorer(usable, order=order) if usable else {}
        except (np.linalg.LinAlgError, linalg.LinAlgError):
            by_model[order] = {}
    best = {}  # order: (lowest score, its degree)
    for order, by_degree in by_model.items():
        for deg, score in by_degree.items():
            low = float(np.min(score))
            if np.isfinite(low) and (order not in best or low < best[order][0]):
                best[order] = (low, deg)
    if not best:
        order = orders[0]
        smoothing, scores = gcv_smoothing(pts, disp, degree, backend, scorer, order)
        return smoothing, scores, degree, order
    order = _preferred_order({o: v[0] for o, v in best.items()})
    deg = best[order][1]
    by_degree = by_model[order]
    scores = {
        "smoothing": by_degree.grid.copy(),
        "score": by_degree[deg],
        "degree_scores": {d: float(v.min()) for d, v in by_degree.items()},
        "order": order,
        "order_scores": {o: v[0] for o, v in best.items()},
    }
    return refined_minimum(by_degree, deg), scores, deg, order


def _preferred_order(best):
    """The kernel order of ``best`` ``{order: lowest GCV score}`` to fit.

    Order 3 only when its score is below order 2's by more than
    ``ORDER3_MARGIN``: where the two are that close (a field the noise
    hides, smoothed to its trend by both) the thin-plate spline stays.
    """
    if 2 in best and 3 in best:
        return 3 if best[3] < (1.0 - ORDER3_MARGIN) * best[2] else 2
    return min(best)


def gcv_subset(pts, limit=GCV_MAX_POINTS):
    """Indices (sorted, int64) of the at most ``limit`` holes a GCV of ``pts`` (N, 2) runs on.

    All of them up to ``limit``; otherwise :func:`spread_subset` of the
    region one trend covers in the fit: the whole plate for a single
    thin-plate fit, the ``GCV_TILE_POINTS`` holes nearest the centroid
    (about one tile) above ``_TILE_ABOVE`` holes, where every tile of
    :class:`ccdgrid.thinplate.TiledThinPlate` fits its own trend. Patches
    over the whole of a dense plate hold one quartic for the plate where
    the fit has one per tile: on two dense 2048² plates of the judge's
    generator (4 790 and 6 687 holes) the GCV chose 1.78 pitch² and the
    maps were 0.0047 / 0.0035 px RMS from the truth; from the 500 central
    holes 17.8 / 56.2 and 0.0030 / 0.0024 px; from patches over one tile's
    region 5.62 / 10 and 0.0037 / 0.0024 px (0.022 / 0.017 px at most,
    against 0.019 / 0.059 from the central holes).
    """
    n = len(pts)
    if n <= limit:
        return np.arange(n)
    if n <= _TILE_ABOVE:
        return spread_subset(pts, limit)
    dist = np.hypot(*(pts - pts.mean(axis=0)).T)
    region = np.sort(np.argpartition(dist, GCV_TILE_POINTS - 1)[:GCV_TILE_POINTS])
    return region[spread_subset(pts[region], limit)]


def coherent_misfit(pts, residual, k=MISFIT_NEIGHBOURS):
    """``(z, index)``: the largest misfit shared by ``k`` neighbouring holes, and where.

    Parameters
    ----------
    pts : ndarray of shape (N, 2), float64
        Hole positions ``(y, x)``, any length unit.
    residual : ndarray of shape (N, 2), float64
        What a fit leaves at each hole, px (either sign convention).
    k : int
        Holes per neighbourhood: each hole and its ``k - 1`` nearest.

    Returns
    -------
    z : float
        The largest ``|median residual|`` of a neighbourhood, per component,
        in units of the noise of such a median (``1.2533 sigma / sqrt(k)``),
        where ``sigma`` comes from the differences of each hole's residual
        with its nearest neighbour's (1.4826 MAD / sqrt 2: a smooth misfit
        cancels in them, the holes' noise does not). The median, not the
        mean: one hole 8 px off on a 1600-hole plate gave z = 37 as a mean
        (the gross-miss test deals with such holes). About 3-6 for a fit
        that leaves noise only; 0 with fewer than ``k + 1`` holes. A
        component without noise (sigma 0) is not judged.
    index : int
        The hole at the centre of that neighbourhood.
    """
    n = len(pts)
    if n <= k:
        return 0.0, 0
    _, near = cKDTree(pts).query(pts, k=k)
    diff = residual - residual[near[:, 1]]
    sigma = 1.4826 * np.median(np.abs(diff), axis=0) / np.sqrt(2.0)
    noisy = sigma > 0
    if not noisy.any():
        return 0.0, 0
    centre = np.median(residual[near][:, :, noisy], axis=1)
    z = np.max(np.abs(centre) / (1.2533 * sigma[noisy] / np.sqrt(k)), axis=1)
    index = int(np.argmax(z))
    return float(z[index]), index


def local_subset(pts, index, limit=LOCAL_GCV_POINTS):
    """The holes a local GCV runs on: the ``limit`` nearest hole ``index``.

    Parameters
    ----------
    pts : ndarray of shape (N, 2), float64
        Hole positions ``(y, x)``, any length unit.
    index : int
        The hole at the centre.
    limit : int
        Number of holes (all of them if there are fewer).

    Returns
    -------
    ndarray of shape (min(N, limit),), int64
        Sorted indices, ``index`` among them.
    """
    if len(pts) <= limit:
        return np.arange(len(pts))
    _, near = cKDTree(pts).query(pts[index], k=limit)
    return np.sort(np.asarray(near, dtype=np.int64))


def spread_subset(pts, limit, cells=SUBSET_CELLS):
    """Indices of ``limit`` points in ``cells²`` patches spread over the plate.

    Parameters
    ----------
    pts : ndarray of shape (N, 2), float64
        Hole positions ``(y, x)``, any length unit.
    limit : int
        Number of points wanted, >= 1.
    cells : int
        The points are cut into ``cells`` bands of equal count along ``y``,
        each band into ``cells`` cells of equal count along ``x``.

    Returns
    -------
    ndarray of shape (min(N, limit),), int64
        Sorted indices: all the points if ``N <= limit``; otherwise, from
        every cell, about ``limit / cells²`` points nearest that cell's
        centroid (the ``limit`` points of lowest rank in their cell by
        distance to its centroid: a cell with fewer points gives them all).

    Notes
    -----
    The GCV runs on these points with the trend degree of the fit to all
    ``N``. Patches that span the plate hold that trend near the full fit's,
    so the spline is left about what it is left in the full fit; each patch
    keeps the plate's density, so the smoothing (pitch² units) transfers.
    The ``limit`` holes nearest the centroid, used before, let a quartic
    trend fit that patch alone, which it does well for a field varying over
    the plate, leaving the spline little to follow: on a 7216-hole plate (24
    px pitch, 2048², a Fourier field) GCV then chose the top of the grid, 1e3
    pitch², and the maps were 0.013 px RMS, 0.20 px at most from the truth;
    from 2 x 2 patches it chooses 17.8: 0.0099 px RMS, 0.045 px at most.
    Where a GCV of all the holes could be computed it chose the same
    smoothing as the patches (FReLoN-like 4096², 1504 holes: 5.62; 1024
    holes under 20 px of pincushion: 10; 503 holes: 56.2) or the next one
    of the grid (643 holes under 22 px of barrel: 10, the patches 17.8), the
    central holes 17.8, 31.6, 56.2 and 31.6. More, smaller patches (3 x 3,
    4 x 4) chose less than a GCV of all holes (1.78 and 3.16 at 4096²).
    """
    n = len(pts)
    if n <= limit:
        return np.arange(n)
    rank = np.empty(n, dtype=np.int64)
    for band in np.array_split(np.argsort(pts[:, 0], kind="stable"), cells):
        band = band[np.argsort(pts[band, 1], kind="stable")]
        for cell in np.array_split(band, cells):
            dist = np.hypot(*(pts[cell] - pts[cell].mean(axis=0)).T)
            rank[cell[np.argsort(dist, kind="stable")]] = np.arange(len(cell))
    return np.sort(np.argsort(rank, kind="stable")[:limit])


def gcv_smoothing(pts, disp, degree, backend="cython", scorer=None, order=2):
    """``(smoothing, {"smoothing": (K,), "score": (K,)})`` minimising the GCV score.

    For the kernel of ``order`` (smoothing in length² units for order 2,
    length⁴ for order 3, on ``GCV_GRIDS[order]``). The smoothing is the
    minimum refined between the grid's neighbours of its best value (see
    :func:`refined_minimum`).
    """
    if scorer is None:
        scorer = functools.partial(gcv_scores, pts, disp, backend=backend)
    by_degree = scorer([degree], order=order)
    score = by_degree[degree]
    smoothing = refined_minimum(by_degree, degree)
    grid = getattr(by_degree, "grid", GCV_GRIDS[order])
    return smoothing, {"smoothing": grid.copy(), "score": score}


def refined_minimum(by_degree, degree):
    """The smoothing minimising ``degree``'s GCV score, refined between grid values.

    ``by_degree`` is what :func:`gcv_scores` returns (its ``grid``, that of
    its kernel order; ``GCV_GRID`` for a plain dict). The grid's best value
    ``grid[k]`` brackets the minimum between its neighbours, where the
    score is minimised in ``log s`` (bounded Brent, to 0.1 % of ``s``); the
    grid's value is kept at either end of the grid, for scores that are not
    a :class:`GcvScores`, and if the refinement does not score lower.

    Notes
    -----
    The grid's steps are 1.78x apart and the score is flat near its minimum
    (0.03 % between 3.16 and 5.62 at 4096²): the best grid value of two
    images of one plate can then jump by a step where the refined minima
    differ by a few per cent (4.04 and 4.37 for a plate moved by 3 px),
    which lets a refit of the moved plate reuse the previous factor
    (:func:`ccdgrid.maps.displacement_maps`).
    """
    score = by_degree[degree]
    grid = getattr(by_degree, "grid", GCV_GRID)
    k = int(np.argmin(score))
    if not isinstance(by_degree, GcvScores) or k in (0, len(grid) - 1):
        return float(grid[k])
    lo, hi = np.log(grid[k - 1]), np.log(grid[k + 1])
    best = optimize.minimize_scalar(
        lambda t: by_degree.at(degree, np.exp(t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-3},
    )
    if not (best.success and np.isfinite(best.fun) and best.fun < score[k]):
        return float(grid[k])
    return float(np.exp(best.x))


def gcv_scores(pts, disp, degrees, backend="cython", keep=None, order=2):
    """GCV score of every smoothing of ``GCV_GRIDS[order]``, for each trend degree.

    Parameters
    ----------
    pts : ndarray of shape (N, 2), float64
        Hole positions in units of the fit's length scale.
    disp : ndarray of shape (N, 2), float64, px
        Displacement at the holes; the score sums both components.
    degrees : list of int
        Trend degrees, each with full-rank monomials at ``pts``, each
        >= ``order - 1``.
    backend : {"cython", "numpy"}
        Engine of the kernel matrix.
    keep : dict or None
        If given, ``keep["bases"][order]`` receives the eigenbasis as a
        :class:`GcvBasis` (``rows`` None), for :func:`reused_gcv_scores`.
    order : {2, 3}
        Kernel order: ``r² log r`` (smoothing in length², ``GCV_GRID``) or
        ``-r⁴ log r`` (length⁴, ``GCV_GRID_ORDER3``).

    Returns
    -------
    GcvScores
        ``{degree: ndarray of shape (K,)}``, ``N |(I - H(s)) d|² / tr(I - H(s))²``
        for every ``s`` of its ``grid``; its ``at(degree, s)`` scores any ``s``.

    Notes
    -----
    The thin-plate smoother with trend ``P`` (the monomials up to the
    degree) and kernel ``K`` has residual operator
    ``I - H = s Q2 (Q2' K Q2 + s I)^-1 Q2'``, ``Q2`` an orthonormal basis of
    the complement of ``P``'s columns. One eigendecomposition
    ``Q2' K Q2 = U diag(lam) U'`` is made, for the lowest degree. A higher
    degree only constrains the solution further, to be orthogonal to its
    extra monomials ``E`` (in those coordinates): with ``B = diag(lam + s)``
    and ``G = E' B^-1 E``, the constrained inverse is
    ``B^-1 - B^-1 E G^-1 E' B^-1``, so its residual and trace cost O(N r²)
    per smoothing (``r`` extra monomials, at most 12) instead of one more
    O(N³) eigendecomposition per degree.
    """
    n = len(pts)
    base = min(degrees)
    if base < order - 1:
        raise ValueError(f"kernel order {order} needs trend degrees >= {order - 1}, got {base}")
    n_base = (base + 1) * (base + 2) // 2
    poly = monomials(pts, max(degrees))  # columns by total degree: the lowest first
    # Q = [Q1 Q2] kept as n_base Householder reflectors: applying them costs
    # O(N² n_base) where products with an explicit Q2 cost O(N³)
    (house, tau), _ = linalg.qr(poly[:, :n_base], mode="raw")
    kern = np.empty((n, n))
    ENGINES[backend].kernel_matrix(np.ascontiguousarray(pts, dtype=np.float64), 0.0, kern, order)
    rotated = rotate_symmetric(house, tau, kern)  # upper triangle only
    lam, vec = linalg.eigh(rotated[n_base:, n_base:], lower=False, driver="evd")
    lam = np.maximum(lam, 0.0)  # conditionally positive definite: tiny negatives are rounding
    both = apply_q(house, tau, np.column_stack([disp, poly[:, n_base:]]), "L")[n_base:]
    both = vec.T @ both
    g = both[:, :2]  # (m, 2) displacement in the eigenbasis
    extra = both[:, 2:]  # (m, P - n_base) higher monomials in the eigenbasis
    if keep is not None:
        keep.setdefault("bases", {})[order] = GcvBasis(
            points=None,
            rows=None,
            nodes=np.array(pts, dtype=np.float64),
            degrees=(base, max(degrees)),
            house=house,
            tau=tau,
            lam=lam,
            vec=vec,
            extra=extra.copy(),
            order=order,
        )
    return GcvScores((lam, g, extra, n, n_base), degrees, order)


class GcvScores(dict):
    """``{degree: (K,) scores on grid}``, and the score at any smoothing (:meth:`at`).

    Made by :func:`gcv_scores` and :func:`reused_gcv_scores`, which keep the
    eigenbasis quantities the scores come from (O(m r) memory). ``order``
    is the kernel order scored, ``grid`` its smoothing values
    (``GCV_GRIDS[order]``).
    """

    def __init__(self, spectrum, degrees, order=2):
        self.order = order
        self.grid = GCV_GRIDS[order]
        super().__init__(_gcv_from_eigenbasis(*spectrum, degrees, self.grid))
        self._spectrum = spectrum

    def at(self, degree, smoothing):
        """GCV score of ``degree`` (one of the keys) at ``smoothing`` (> 0, grid units)."""
        if degree not in self:
            raise KeyError(degree)
        grid = np.array([float(smoothing)])
        return float(_gcv_from_eigenbasis(*self._spectrum, [degree], grid)[degree][0])


def _gcv_from_eigenbasis(lam, g, extra, n, n_base, degrees, grid=GCV_GRID):
    """GCV scores from the eigenbasis of the projected kernel (see :func:`gcv_scores`).

    ``lam`` (m,) eigenvalues, ``g`` (m, 2) the displacement and ``extra``
    (m, P - n_base) the monomials above the base degree, both in the
    eigenbasis; ``n`` holes. Returns ``{degree: (K,) scores}``, one score per
    smoothing of ``grid`` (K,).
    """
    s = np.asarray(grid, dtype=np.float64)[:, None]
    inv = 1.0 / (lam[None, :] + s)  # (K, m) diagonal of B^-1 for every smoothing
    out = {}
    for deg in degrees:
        r = (deg + 1) * (deg + 2) // 2 - n_base
        if r == 0:
            rss = np.sum(inv**2 * np.sum(g * g, axis=1), axis=1)
            trace = np.sum(inv, axis=1)
        else:
            e, _ = np.linalg.qr(extra[:, :r])  # orthonormal: the same span, better conditioned
            inv_e = inv[:, :, None] * e  # (K, m, r) = B^-1 E
            gram = e.T @ inv_e  # (K, r, r) = G
            coupled = np.linalg.solve(gram, inv_e.transpose(0, 2, 1) @ g)  # G^-1 E' B^-1 d
            x = inv[:, :, None] * (g - e @ coupled)  # (K, m, 2) constrained B^-1 d
            rss = np.sum(x * x, axis=(1, 2))
            second = inv_e.transpose(0, 2, 1) @ inv_e  # E' B^-2 E
            trace = np.sum(inv, axis=1) - np.trace(np.linalg.solve(gram, second), axis1=1, axis2=2)
        out[deg] = n * (s[:, 0] ** 2 * rss) / (s[:, 0] * trace) ** 2
    return out


@dataclass
class GcvBasis:
    """Eigenbasis of a GCV (see :func:`gcv_scores`), kept for the next fit of the plate.

    One kernel order's (``order``); ``others``: the bases of the other
    orders the same GCV scored, on the same points (what
    :func:`ccdgrid.maps.displacement_maps` keeps is the order-2 basis, with
    the order-3 one among its ``others``).

    ``points`` (N, 2) float64: all the points fitted, px, and ``rows`` (m,)
    int64: the rows of those the GCV ran on (both set by
    :func:`ccdgrid.maps.displacement_maps`); ``nodes`` (m, 2) float64: those points in
    the fit's length unit when the basis was computed; ``degrees``:
    ``(base, top)`` trend degrees it covers; ``house``, ``tau``: the
    reflectors of the base monomials; ``lam`` (m - n_base,), ``vec``:
    eigenvalues and eigenvectors of the projected kernel; ``extra``
    (m - n_base, P_top - n_base): the monomials above the base in the
    eigenbasis. ``vec`` is the bulk of it: ``8 (m - n_base)²`` bytes.
    """

    points: object
    rows: object
    nodes: np.ndarray
    degrees: tuple
    house: np.ndarray
    tau: np.ndarray
    lam: np.ndarray
    vec: np.ndarray
    extra: np.ndarray
    order: int = 2
    others: tuple = ()


# Largest RMS departure of the holes from a similarity of the holes a GCV
# eigenbasis was computed on, in pitches, for that basis to be reused
# (see _similarity).
_REUSE_MAX_WARP = 0.005


def _similarity(old, new):
    """``(scale², RMS departure)`` of the similarity that best maps ``old`` onto ``new``.

    Both (m, 2) float64, the same points in the same order. The least-squares
    similarity (rotation, scale, shift) in complex form; the departure is the
    RMS distance of ``new`` from the mapped ``old`` (same unit as the points).
    """
    zo = old[:, 1] + 1j * old[:, 0]
    zn = new[:, 1] + 1j * new[:, 0]
    zo = zo - zo.mean()
    zn = zn - zn.mean()
    a = np.vdot(zo, zn) / max(np.vdot(zo, zo).real, 1e-300)
    return float(abs(a) ** 2), float(np.sqrt(np.mean(np.abs(zn - a * zo) ** 2)))


def reused_gcv_scores(basis, nodes, disp, degrees, backend="cython", keep=None, order=2):
    """GCV scores of ``disp`` at ``nodes`` from a previous fit's eigenbasis, when exact enough.

    ``nodes`` (m, 2) are the points of ``basis.nodes`` (same holes, same
    order) measured again, ``disp`` (m, 2) the new displacement there; the
    basis of kernel ``order`` is ``basis`` or one of its ``others``. The
    kernel ``r^(2k - 2) log r`` of order ``k`` projected on the complement of
    a trend of degree >= k - 1 scales by ``a^(2k - 2)`` when the points move
    by a similarity of scale ``a`` (the ``r^(2k - 2) log a`` term is a
    polynomial in the pair whose every monomial is of degree <= k - 1 in
    one of the two points, which the projection removes), and a polynomial
    space is mapped onto itself by any affine map: for a plate moved by a
    similarity (plus a small warp) the previous eigenbasis with its
    eigenvalues times ``a²`` (order 2) or ``a⁴`` (order 3) is that of the
    new points, and only the displacement has to be projected, O(m²)
    instead of the O(m³) eigendecomposition. Used when the points depart
    from the best similarity of the old ones by at most ``_REUSE_MAX_WARP``
    (RMS, pitch units) and the degrees asked for are covered; otherwise
    :func:`gcv_scores` computes them again (``keep`` as there: the basis
    used is put in ``keep["bases"][order]``).
    """
    basis = next((b for b in (basis, *basis.others) if b.order == order), None)
    if basis is None:
        return gcv_scores(nodes, disp, degrees, backend, keep, order)
    base, top = basis.degrees
    scale2, warp = _similarity(basis.nodes, nodes)
    if min(degrees) != base or max(degrees) > top or warp > _REUSE_MAX_WARP:
        return gcv_scores(nodes, disp, degrees, backend, keep, order)
    n_base = len(basis.tau)
    proj = apply_q(basis.house, basis.tau, np.array(disp, dtype=np.float64), "L")[n_base:]
    if keep is not None:
        keep.setdefault("bases", {})[order] = replace(basis, others=())
    lam = scale2 ** (order - 1) * basis.lam
    return GcvScores((lam, basis.vec.T @ proj, basis.extra, len(nodes), n_base), degrees, order)


def reused_subset(basis, rows):
    """Rows of the new points that were ``basis.rows``, or None if one is gone."""
    if basis is None or basis.rows is None:
        return None
    known = rows >= 0
    if not known.any() or basis.rows.max() > rows[known].max():
        return None
    where = np.full(int(rows[known].max()) + 1, -1, dtype=np.int64)
    where[rows[known]] = np.flatnonzero(known)
    sub = where[basis.rows]
    return None if np.any(sub < 0) else sub
