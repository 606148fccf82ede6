"""Stage 2: integer lattice indices ``(i, j)`` for every detected hole.

The holes of the calibration plate sit on a square lattice; on the detector
that lattice is rotated, scaled anisotropically, apparently sheared (non-square
pixels seen at an angle) and distorted by a few to ~20 px. A single global
rounding of ``inverse(R) (p - T)`` fails as soon as the distortion reaches half
a pitch somewhere, so the indices are propagated instead: breadth-first along
the neighbour graph, each step measured against the *local* lattice vectors of
the hole it starts from.

Canonical orientation: ``i`` counts along ``vectors[0]``, the lattice direction
closest to the image's +y axis, oriented so that its y component is positive;
``j`` counts along ``vectors[1]``, oriented so that its x component is
positive. Indices of accepted holes are shifted so that their minimum is 0 on
both axes. Positions are ``(y, x)`` index coordinates in pixels (the centre of
pixel ``(r, c)`` is at ``(r, c)``).
"""

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from ._validation import as_points
from .errors import CcdgridError

__all__ = ["REASONS", "LatticeIndex", "index_holes"]

#: Why a peak can be left out of the lattice (the values of ``LatticeIndex.reasons``).
REASONS = {
    "non-finite": "the peak position is NaN or infinite",
    "isolated": "no other peak within the neighbour search radius",
    "duplicate": "another peak fits the same lattice site better",
    "off-lattice": "farther than `tolerance` pitch from the site its neighbours predict",
    "disconnected": "in a group of peaks that could not be tied to the main lattice",
}

_MIN_HOLES = 4
_NEIGHBOURS = 24  # candidates per hole for propagation: all sites up to two steps away
_REACH = 2.3  # propagation radius in pitches: steps of up to 2 sites bridge a missing hole
_MAX_STEP = 2
_ANGLE_BINS = 180
_CLUSTER_HALF_WIDTH = np.deg2rad(12.0)
_SECOND_AXIS_MIN_ANGLE = np.deg2rad(30.0)


@dataclass
class LatticeIndex:
    """Lattice indices of detected holes.

    Attributes
    ----------
    indices : ndarray of shape (N, 2), int64
        ``(i, j)`` of each input peak, ``>= 0`` for accepted peaks, ``-1``
        on the rows of rejected peaks. ``i`` runs along ``vectors[0]`` (about
        +y), ``j`` along ``vectors[1]`` (about +x).
    valid : ndarray of shape (N,), bool
        True for accepted peaks.
    vectors : ndarray of shape (2, 2), float64, px
        Rows are the ``(y, x)`` lattice steps for ``i + 1`` and ``j + 1``,
        from a least-squares affine fit over the accepted holes.
    origin : ndarray of shape (2,), float64, px
        ``(y, x)`` position of site ``(0, 0)`` from the same fit (the site may
        hold no hole).
    rejected : ndarray of shape (K,), int64
        Row numbers in ``peaks`` of the rejected peaks, increasing.
    reasons : list of str, length K
        One key of :data:`REASONS` per rejected peak.
    pitch_px : float, px
        Lattice scale used for the search windows (given, or the median
        nearest-neighbour distance).
    pair_distances : ndarray of shape (M,), float64, px
        Distances of all peak pairs closer than ``1.5 * pitch_px`` (for a
        histogram in reports).
    window : tuple of 2 float, px
        ``(low, high)`` distances of the neighbour pairs used to estimate the
        lattice vectors.
    start : int
        Row of the peak the propagation started from (index assigned first).
    tolerance : float
        Largest accepted misfit, in units of ``pitch_px``.
    """

    indices: np.ndarray
    valid: np.ndarray
    vectors: np.ndarray
    origin: np.ndarray
    rejected: np.ndarray
    reasons: list
    pitch_px: float
    pair_distances: np.ndarray
    window: tuple
    start: int
    tolerance: float
    reason_counts: dict = field(init=False)

    def __post_init__(self):
        self.reason_counts = {key: self.reasons.count(key) for key in REASONS}

    @property
    def n_valid(self):
        """Number of accepted holes."""
        return int(np.count_nonzero(self.valid))


def index_holes(peaks, *, pitch_px=None, tolerance=0.25):
    """Assign integer lattice indices to hole positions.

    Parameters
    ----------
    peaks : array_like of shape (N, 2), float, px
        ``(y, x)`` hole centres in index coordinates. NaN rows are rejected.
    pitch_px : float or None, px
        Approximate hole spacing on the detector. None: the median distance
        from each peak to its nearest neighbour. Only sets the search windows,
        so 20 % off is harmless.
    tolerance : float
        Largest misfit of a hole with respect to the site predicted by its
        neighbours, in units of the pitch (0 < tolerance < 0.5).

    Returns
    -------
    LatticeIndex
        Indices, acceptance mask, lattice vectors, and each rejected peak
        with its reason.

    Raises
    ------
    CcdgridError
        With "too few holes" if fewer than 4 finite peaks are given or no
        lattice with two independent directions is found; if ``pitch_px`` or
        ``tolerance`` is out of range.

    Notes
    -----
    1. Neighbour pairs come from a KD-tree (no N² distance matrix). The
       difference vectors of pairs ``0.7 .. 1.25`` pitch apart are folded to
       one half-plane; the two lattice directions are the two largest modes
       of their angle histogram (at least 30° apart), and each lattice vector
       is the mean of the vectors near its mode.
    2. Propagation starts from the hole nearest the centroid among those with
       all four neighbours present. A step from an indexed hole ``h`` to a
       neighbour ``m`` is ``round(inverse(L_h) (p_m - p_h))`` with ``L_h`` the
       hole's *local* lattice matrix (fitted on its indexed neighbours,
       inherited from its parent otherwise); steps of up to two sites bridge
       missing holes; a step is accepted if its misfit is below ``tolerance``
       pitch. Two peaks on one site: the better-fitting one stays.
    3. Groups that the propagation cannot reach (e.g. behind a gap of more than
       one missing row) are indexed on their own and attached with the
       integer offset on which the global affine fit of the main group agrees
       for most of their holes.
    4. Every indexed hole is finally checked against a local affine fit of its
       indexed neighbours (itself excluded); misfits above ``tolerance`` pitch
       are rejected ("off-lattice"), twice, so a bad hole cannot shield
       another.
    """
    pts = as_points(peaks, "peaks")
    pitch_px = _check_optional_positive(pitch_px, "pitch_px")
    tolerance = float(tolerance)
    if not 0.0 < tolerance < 0.5:
        raise CcdgridError(f"`tolerance` must be in (0, 0.5) pitch, got {tolerance!r}")
    n_all = len(pts)
    reason = np.full(n_all, "", dtype=object)
    finite = np.isfinite(pts).all(axis=1)
    reason[~finite] = "non-finite"
    rows = np.flatnonzero(finite)
    if len(rows) < _MIN_HOLES:
        raise CcdgridError(
            f"too few holes to index a lattice: {len(rows)} finite peaks, need {_MIN_HOLES}"
        )
    p = pts[rows]
    n = len(p)
    tree = cKDTree(p)
    nn_dist = tree.query(p, k=2)[0][:, 1]
    if pitch_px is None:
        pitch_px = float(np.median(nn_dist))
        if not pitch_px > 0:
            raise CcdgridError("too few holes: most peaks coincide (median neighbour distance 0)")
    window = (0.7 * pitch_px, 1.25 * pitch_px)

    close = tree.query_pairs(1.5 * pitch_px, output_type="ndarray")
    pair_vec = p[close[:, 1]] - p[close[:, 0]]
    pair_len = np.hypot(pair_vec[:, 0], pair_vec[:, 1])
    in_window = (pair_len > window[0]) & (pair_len < window[1])
    basis = _lattice_vectors(pair_vec[in_window])

    k = min(_NEIGHBOURS + 1, n)
    reach = _REACH * max(np.hypot(*basis[:, 0]), np.hypot(*basis[:, 1]))
    nb_dist, nb_idx = tree.query(p, k=k, distance_upper_bound=reach)
    nb_idx = nb_idx[:, 1:]  # column 0 is the hole itself
    isolated = ~np.isfinite(nb_dist[:, 1]) if k > 1 else np.ones(n, bool)

    tol_px = tolerance * pitch_px
    prop = _Propagation(p, nb_idx, basis, tol_px)
    start = _start_hole(p, nb_idx, basis, tol_px, isolated)
    prop.run(start, (0, 0))
    _attach_other_groups(prop, isolated)
    _reject_local_misfits(prop, tol_px)

    idx = prop.index
    ok = prop.assigned
    sub_reason = np.full(n, "", dtype=object)
    sub_reason[prop.duplicate & ~ok] = "duplicate"
    sub_reason[prop.misfit & ~ok] = "off-lattice"
    leftover = ~ok & (sub_reason == "")
    valid_nb = nb_idx < n
    touches_any = np.zeros_like(valid_nb)
    touches_any[valid_nb] = ok[nb_idx[valid_nb]]
    touches = touches_any.any(axis=1)
    sub_reason[leftover & isolated] = "isolated"
    sub_reason[leftover & ~isolated & touches] = "off-lattice"
    sub_reason[leftover & ~isolated & ~touches] = "disconnected"
    reason[rows] = sub_reason

    if np.count_nonzero(ok) < 3:
        raise CcdgridError(
            f"too few holes fit a lattice: {np.count_nonzero(ok)} indexed of {n_all} peaks"
        )
    idx_ok = idx[ok] - idx[ok].min(axis=0)
    indices = np.full((n_all, 2), -1, dtype=np.int64)
    indices[rows[ok]] = idx_ok
    valid = np.zeros(n_all, bool)
    valid[rows[ok]] = True
    origin, vectors = _affine(idx_ok, p[ok], basis)

    rejected = np.flatnonzero(~valid)
    return LatticeIndex(
        indices=indices,
        valid=valid,
        vectors=vectors,
        origin=origin,
        rejected=rejected,
        reasons=[str(r) for r in reason[rejected]],
        pitch_px=float(pitch_px),
        pair_distances=pair_len,
        window=(float(window[0]), float(window[1])),
        start=int(rows[start]),
        tolerance=tolerance,
    )


def _check_optional_positive(value, name):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CcdgridError(f"`{name}` must be a positive number, got {value!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise CcdgridError(f"`{name}` must be a positive number, got {value!r}")
    return value


def _lattice_vectors(vec):
    """Two lattice vectors as columns ``[a_i, a_j]`` of a (2, 2) (y, x) matrix."""
    if len(vec) < 2:
        raise CcdgridError(
            "too few holes: no pair of peaks about one pitch apart; "
            "check `pitch_px` or the detection"
        )
    folded = np.where((vec[:, 0] < 0) | ((vec[:, 0] == 0) & (vec[:, 1] < 0)), -1.0, 1.0)
    vec = vec * folded[:, None]
    theta = np.arctan2(vec[:, 0], vec[:, 1])  # in [0, pi)
    hist = np.bincount(
        (theta / np.pi * _ANGLE_BINS).astype(np.int64) % _ANGLE_BINS, minlength=_ANGLE_BINS
    ).astype(np.float64)
    # circular smoothing so that a mode split over two bins still wins
    hist = sum(w * np.roll(hist, s) for s, w in ((-2, 1), (-1, 2), (0, 3), (1, 2), (2, 1)))
    centres = (np.arange(_ANGLE_BINS) + 0.5) * np.pi / _ANGLE_BINS
    first = centres[np.argmax(hist)]
    far = _angle_gap(centres, first) >= _SECOND_AXIS_MIN_ANGLE
    if not np.any(hist[far] > 0):
        raise CcdgridError("too few holes: the peaks do not span two lattice directions")
    second = centres[far][np.argmax(hist[far])]
    axes = [_mode_vector(vec, theta, t) for t in (first, second)]
    a, b = axes
    # i along the direction closer to +y, j along the other, x component positive
    if abs(a[0]) / np.hypot(*a) < abs(b[0]) / np.hypot(*b):
        a, b = b, a
    a = a if a[0] > 0 else -a
    b = b if b[1] > 0 else -b
    basis = np.column_stack([a, b])
    if abs(np.linalg.det(basis)) < 0.1 * np.hypot(*a) * np.hypot(*b):
        raise CcdgridError("too few holes: the two lattice directions are nearly parallel")
    return basis


def _angle_gap(theta, ref):
    """Angular distance modulo pi."""
    d = np.abs(theta - ref) % np.pi
    return np.minimum(d, np.pi - d)


def _mode_vector(vec, theta, centre):
    near = _angle_gap(theta, centre) < _CLUSTER_HALF_WIDTH
    v = vec[near]
    direction = np.array([np.sin(centre), np.cos(centre)])
    v = v * np.where(v @ direction < 0, -1.0, 1.0)[:, None]
    med = np.median(v, axis=0)
    close = np.hypot(*(v - med).T) < 0.15 * np.hypot(*med)
    return v[close].mean(axis=0) if np.any(close) else med


def _start_hole(p, nb_idx, basis, tol_px, isolated):
    """A hole with the most of its 4 direct neighbours present, nearest the centroid."""
    n = len(p)
    inv = np.linalg.inv(basis)
    counts = np.zeros(n, np.int64)
    for col in range(nb_idx.shape[1]):
        m = nb_idx[:, col]
        ok = m < n
        d = p[np.where(ok, m, 0)] - p
        step = np.rint(d @ inv.T)
        miss = np.hypot(*(d - step @ basis.T).T)
        unit = np.abs(step).sum(axis=1) == 1
        counts += ok & unit & (miss < tol_px)
    centre = np.median(p, axis=0)
    dist = np.hypot(*(p - centre).T)
    # lexicographic: most neighbours first, then nearest the centre; never an isolated peak
    key = np.where(isolated, np.inf, dist - 1e9 * np.minimum(counts, 4))
    return int(np.argmin(key))


class _Propagation:
    """Breadth-first index propagation with local lattice matrices."""

    def __init__(self, p, nb_idx, basis, tol_px):
        n = len(p)
        self.p = p
        self.nb_idx = nb_idx
        self.basis = basis
        self.tol_px = tol_px
        self.index = np.zeros((n, 2), np.int64)
        self.assigned = np.zeros(n, bool)
        self.group = np.full(n, -1, np.int64)
        self.misfit_px = np.full(n, np.inf)
        self.local = np.repeat(basis[None], n, axis=0)
        self.duplicate = np.zeros(n, bool)
        self.misfit = np.zeros(n, bool)
        self.sites = {}
        self.n_groups = 0

    def run(self, start, start_index, *, sites=None):
        """Propagate from ``start``; returns the holes indexed in this run."""
        sites = self.sites if sites is None else sites
        gid = self.n_groups
        self.n_groups += 1
        n = len(self.p)
        self._take(start, tuple(start_index), 0.0, gid, sites)
        queue = deque([start])
        members = [start]
        while queue:
            h = queue.popleft()
            if not self.assigned[h] or self.group[h] != gid:
                continue  # evicted by a better-fitting duplicate after being queued
            nb = self.nb_idx[h]
            nb = nb[nb < n]
            if len(nb) == 0:
                continue
            lh = self.local[h]
            d = self.p[nb] - self.p[h]
            step = np.rint(d @ np.linalg.inv(lh).T)
            miss = np.hypot(*(d - step @ lh.T).T)
            span = np.abs(step).max(axis=1)
            good = (span >= 1) & (span <= _MAX_STEP) & (miss < self.tol_px)
            base = self.index[h]
            for m, s, e in zip(nb[good], step[good].astype(np.int64), miss[good]):
                if self.assigned[m] or self.duplicate[m]:
                    continue
                site = (int(base[0] + s[0]), int(base[1] + s[1]))
                owner = sites.get(site)
                if owner is not None:
                    if self.misfit_px[owner] <= e:
                        self.duplicate[m] = True
                        continue
                    self._evict(owner)
                self._take(m, site, e, gid, sites)
                self._update_local(m, h)
                queue.append(m)
                members.append(m)
        return np.array([m for m in members if self.assigned[m] and self.group[m] == gid])

    def _take(self, m, site, misfit, gid, sites):
        self.index[m] = site
        self.assigned[m] = True
        self.group[m] = gid
        self.misfit_px[m] = misfit
        sites[site] = m

    def _evict(self, m):
        self.assigned[m] = False
        self.duplicate[m] = True
        self.group[m] = -1

    def _update_local(self, m, parent):
        """Local lattice matrix of ``m`` from its indexed neighbours (parent's if too few)."""
        n = len(self.p)
        nb = self.nb_idx[m]
        nb = nb[(nb < n)]
        nb = nb[self.assigned[nb] & (self.group[nb] == self.group[m])]
        di = (self.index[nb] - self.index[m]).astype(np.float64)
        near = np.abs(di).max(axis=1) <= _MAX_STEP
        di, nb = di[near], nb[near]
        if len(nb) >= 2:
            gram = di.T @ di
            if np.linalg.det(gram) > 0.5:
                d = self.p[nb] - self.p[m]
                self.local[m] = np.linalg.solve(gram, di.T @ d).T
                return
        self.local[m] = self.local[parent]


def _attach_other_groups(prop, isolated):
    """Index groups the main propagation missed, then tie them to the main lattice."""
    n = len(prop.p)
    main = prop.assigned.copy()
    if np.count_nonzero(main) < 3:
        return
    origin, vectors = _affine(prop.index[main], prop.p[main], prop.basis)
    inv = np.linalg.inv(vectors.T)
    for _ in range(n):
        todo = np.flatnonzero(~prop.assigned & ~prop.duplicate & ~isolated & (prop.group == -1))
        if len(todo) == 0:
            return
        sites = {}
        members = prop.run(todo[0], (0, 0), sites=sites)
        if len(members) < 2:
            prop.group[members] = -2  # tried, stays unindexed
            prop.assigned[members] = False
            continue
        guess = (prop.p[members] - origin) @ inv.T - prop.index[members]
        offsets = np.rint(guess).astype(np.int64)
        uniq, counts = np.unique(offsets, axis=0, return_counts=True)
        best = uniq[np.argmax(counts)]
        shifted = prop.index[members] + best
        agree = counts.max() > 0.5 * len(members)
        free = all(tuple(s) not in prop.sites for s in shifted.tolist())
        if agree and free:
            prop.index[members] = shifted
            prop.group[members] = 0
            for m, s in zip(members, shifted.tolist()):
                prop.sites[tuple(s)] = m
        else:
            prop.assigned[members] = False
            prop.group[members] = -2


def _reject_local_misfits(prop, tol_px, passes=2):
    """Reject indexed holes far from the site their indexed neighbours predict."""
    n = len(prop.p)
    for _ in range(passes):
        ok = prop.assigned
        bad = []
        for h in np.flatnonzero(ok):
            nb = prop.nb_idx[h]
            nb = nb[nb < n]
            nb = nb[ok[nb]]
            di = (prop.index[nb] - prop.index[h]).astype(np.float64)
            near = np.abs(di).max(axis=1) <= _MAX_STEP
            di, nb = di[near], nb[near]
            if len(nb) < 3:
                continue
            design = np.column_stack([np.ones(len(nb)), di])
            if np.linalg.matrix_rank(design) < 3:
                continue
            coef = np.linalg.lstsq(design, prop.p[nb], rcond=None)[0]
            if np.hypot(*(prop.p[h] - coef[0])) > tol_px:
                bad.append(h)
        if not bad:
            return
        bad = np.array(bad)
        prop.assigned[bad] = False
        prop.misfit[bad] = True
        for h in bad:
            site = tuple(prop.index[h].tolist())
            if prop.sites.get(site) == h:
                del prop.sites[site]


def _affine(idx, pos, basis):
    """Least-squares ``pos = origin + idx @ vectors``; ``basis`` if degenerate."""
    design = np.column_stack([np.ones(len(idx)), idx.astype(np.float64)])
    coef, _, rank, _ = np.linalg.lstsq(design, pos, rcond=None)
    if rank < 3:
        vectors = basis.T.copy()
        origin = np.mean(pos - idx @ vectors, axis=0)
        return origin, vectors
    return coef[0], coef[1:3].copy()
