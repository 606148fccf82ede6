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

from ._validation import as_points, check_positive
from .errors import CcdgridError

__all__ = ["REASONS", "LatticeIndex", "index_holes"]

#: Why a peak can be left out of the lattice (the values of ``LatticeIndex.reasons``).
REASONS = {
    "non-finite": "the peak position is NaN or infinite",
    "isolated": "no other peak within the neighbour search radius",
    "duplicate": "another peak fits the same lattice site better",
    "off-lattice": "farther than `tolerance` pitch from the site its neighbours predict",
    "disconnected": "in a group of peaks that could not be tied to the main lattice",
    "outlier": "off the smooth trend of its neighbours by more than `outlier_sigma` sigmas",
    "unpredicted": "maps fitted without it miss it far more than any other hole (calibrate)",
    "soft hole at a lit edge": (
        "a soft hole on the slope of a soft lit-area rim, whose centre it biases "
        "(calibrate; see ccdgrid.lit_edge)"
    ),
}

_MIN_HOLES = 4
_NEIGHBOURS = 24  # candidates per hole for propagation: all sites up to two steps away
_REACH = 2.3  # propagation radius in pitches: steps of up to 2 sites bridge a missing hole
_MAX_STEP = 2
_OUTLIER_FLOOR_PX = 0.1  # never reject a hole for misfits below this (px)
# an outlier's misfit must exceed its neighbours' (recomputed without it) this many times
_COHERENCE_RATIO = 6.0
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
    outlier_threshold_px : float or None, px
        Misfit above which a hole was rejected as an outlier (None: no test).
    reason_counts : dict
        Number of rejected peaks per key of :data:`REASONS`.
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
    outlier_threshold_px: object
    reason_counts: dict = field(init=False)

    def __post_init__(self):
        self.reason_counts = {key: self.reasons.count(key) for key in REASONS}

    @property
    def n_valid(self):
        """Number of accepted holes."""
        return int(np.count_nonzero(self.valid))


def index_holes(peaks, *, pitch_px=None, tolerance=0.25, outlier_sigma=6.0):
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
    outlier_sigma : float or None
        Reject holes whose distance from a local quadratic fit of their
        neighbours exceeds this many robust standard deviations of that
        distance over all holes (never below 0.1 px). None: no such test.

    Returns
    -------
    LatticeIndex
        Indices, acceptance mask, lattice vectors, and each rejected peak
        with its reason.

    Raises
    ------
    CcdgridError
        With "too few holes" if fewer than 4 finite peaks are given or no
        lattice with two independent directions is found; if ``pitch_px``,
        ``tolerance`` or ``outlier_sigma`` is out of range.

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
    5. Then, against a local *quadratic* fit (so that distortion curvature
       does not count), holes more than ``outlier_sigma`` robust sigmas off
       are rejected ("outlier"), the worst of a neighbourhood first. This
       catches holes mis-centred by a few tenths of a px to a few px (cut by
       the taper edge, a hot pixel, dust), which the coarse test above lets
       through. On generated 2048² images one taper-cut hole 0.2 px off was
       the largest map error (0.20 px) until this test, with a 0.1 px floor,
       removed it (0.08 px). A hole is rejected only if it also stands out
       from its neighbours, whose misfits are recomputed without it (more
       than 6 times their median): near a distortion feature narrower than
       the quadratic's reach (a local bump, a taper shear) all holes are off
       the quadratic trend together, and they are the feature's only samples.
       Rejecting them (10 good holes on an independently generated image)
       raised the map error there from 0.03 to 0.10 px RMS, 0.5 px max.
    """
    pts = as_points(peaks, "peaks")
    pitch_px = _check_optional_positive(pitch_px, "pitch_px")
    try:
        ok = 0.0 < float(tolerance) < 0.5
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CcdgridError(f"`tolerance` must be in (0, 0.5) pitch, got {tolerance!r}")
    tolerance = float(tolerance)
    if outlier_sigma is not None:
        outlier_sigma = _check_optional_positive(outlier_sigma, "outlier_sigma")
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
    threshold = None
    if outlier_sigma is not None:
        threshold = _reject_outliers(prop, outlier_sigma, _OUTLIER_FLOOR_PX)
        if _reinstate_duplicates(prop):
            threshold = _reject_outliers(prop, outlier_sigma, _OUTLIER_FLOOR_PX)

    idx = prop.index
    ok = prop.assigned
    sub_reason = np.full(n, "", dtype=object)
    sub_reason[prop.duplicate & ~ok] = "duplicate"
    sub_reason[prop.misfit & ~ok] = "off-lattice"
    sub_reason[prop.outlier & ~ok] = "outlier"
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
        outlier_threshold_px=threshold,
    )


def _check_optional_positive(value, name):
    return None if value is None else check_positive(value, name)


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
        self.local = [tuple(basis.ravel())] * n  # (a00, a01, a10, a11) per hole
        self.py = np.ascontiguousarray(p[:, 0], dtype=np.float64)
        self.px = np.ascontiguousarray(p[:, 1], dtype=np.float64)
        self.nbrs = [[m for m in row if m < n] for row in nb_idx.tolist()]
        self.duplicate = np.zeros(n, bool)
        self.misfit = np.zeros(n, bool)
        self.outlier = np.zeros(n, bool)
        self.sites = {}
        self.claim = {}  # duplicate hole -> the site it lost
        self.n_groups = 0

    def run(self, start, start_index, *, sites=None, claim=None):
        """Propagate from ``start``; returns the holes indexed in this run.

        ``sites`` and ``claim`` (site -> hole, duplicate -> the site it lost)
        default to the main lattice's; a group indexed in its own frame
        passes its own, whose sites mean nothing in the main frame until the
        group is tied to it.

        The loop reads and writes the state arrays through memoryviews: per
        hole it touches ~20 neighbours, where numpy's per-item overhead would
        dominate, and a copy of the state as lists would cost O(N) per run
        (a run per group of leftover peaks: thousands on a noisy plate).
        """
        sites = self.sites if sites is None else sites
        claim = self.claim if claim is None else claim
        gid = self.n_groups
        self.n_groups += 1
        py, px = memoryview(self.py), memoryview(self.px)
        index = memoryview(self.index)
        assigned = memoryview(self.assigned)
        group = memoryview(self.group)
        duplicate = memoryview(self.duplicate)
        misfit = memoryview(self.misfit_px)
        local = self.local
        nbrs = self.nbrs
        tol2 = self.tol_px**2

        def take(m, site, miss):
            index[m, 0], index[m, 1] = site
            assigned[m] = True
            group[m] = gid
            misfit[m] = miss
            sites[site] = m

        take(start, tuple(start_index), 0.0)
        queue = deque([start])
        members = [start]
        while queue:
            h = queue.popleft()
            if not assigned[h] or group[h] != gid:
                continue  # evicted by a better-fitting duplicate after being queued
            a00, a01, a10, a11 = local[h]  # columns: i step, j step, as (y, x)
            det = a00 * a11 - a01 * a10
            hy, hx = py[h], px[h]
            bi, bj = index[h, 0], index[h, 1]
            for m in nbrs[h]:
                if assigned[m] or duplicate[m]:
                    continue
                dy, dx = py[m] - hy, px[m] - hx
                si = round((a11 * dy - a01 * dx) / det)
                sj = round((a00 * dx - a10 * dy) / det)
                span = max(abs(si), abs(sj))
                if span == 0 or span > _MAX_STEP:
                    continue
                ey, ex = dy - a00 * si - a01 * sj, dx - a10 * si - a11 * sj
                miss2 = ey * ey + ex * ex
                if miss2 >= tol2:
                    continue
                site = (bi + si, bj + sj)
                owner = sites.get(site)
                if owner is not None:
                    if misfit[owner] <= miss2**0.5:
                        duplicate[m] = True
                        claim[m] = site
                        continue
                    assigned[owner], duplicate[owner], group[owner] = False, True, -1
                    claim[owner] = site
                take(m, site, miss2**0.5)
                local[m] = self._local_matrix(m, nbrs[m], index, assigned, group, py, px)
                if local[m] is None:
                    local[m] = local[h]
                queue.append(m)
                members.append(m)
        return np.array([m for m in members if assigned[m] and group[m] == gid], dtype=np.int64)

    @staticmethod
    def _local_matrix(m, nbrs, index, assigned, group, py, px):
        """Least-squares local lattice matrix of ``m`` from its indexed neighbours.

        Returns ``(a00, a01, a10, a11)`` with columns the i and j steps in
        (y, x), or None when fewer than two independent steps are indexed.
        """
        g = group[m]
        mi, mj = index[m, 0], index[m, 1]
        s_ii = s_ij = s_jj = 0.0
        r_iy = r_ix = r_jy = r_jx = 0.0
        for k in nbrs:
            if not assigned[k] or group[k] != g:
                continue
            di, dj = index[k, 0] - mi, index[k, 1] - mj
            if max(abs(di), abs(dj)) > _MAX_STEP:
                continue
            dy, dx = py[k] - py[m], px[k] - px[m]
            s_ii += di * di
            s_ij += di * dj
            s_jj += dj * dj
            r_iy += di * dy
            r_ix += di * dx
            r_jy += dj * dy
            r_jx += dj * dx
        det = s_ii * s_jj - s_ij * s_ij
        if det <= 0.5:  # fewer than two independent steps
            return None
        # solve [[s_ii, s_ij], [s_ij, s_jj]] [col_i; col_j] = [r_i; r_j] per component
        ci_y = (s_jj * r_iy - s_ij * r_jy) / det
        cj_y = (s_ii * r_jy - s_ij * r_iy) / det
        ci_x = (s_jj * r_ix - s_ij * r_jx) / det
        cj_x = (s_ii * r_jx - s_ij * r_ix) / det
        return (ci_y, cj_y, ci_x, cj_x)


def _attach_other_groups(prop, isolated):
    """Index groups the main propagation missed, then tie them to the main lattice."""
    n = len(prop.p)
    main = prop.assigned.copy()
    if np.count_nonzero(main) < 3:
        return
    origin, vectors = _affine(prop.index[main], prop.p[main], prop.basis)
    inv = np.linalg.inv(vectors.T)
    # a peak with no neighbour at a lattice step can only make a group of
    # one: settled here at once (each try scans the state for the next
    # start, and a pattern that is no grid leaves thousands of such peaks)
    lonely = ~prop.assigned & (_lattice_neighbours(prop) == 0)
    prop.group[lonely] = -2
    for _ in range(n):
        todo = np.flatnonzero(~prop.assigned & ~prop.duplicate & ~isolated & (prop.group == -1))
        if len(todo) == 0:
            return
        sites, claim = {}, {}
        members = prop.run(todo[0], (0, 0), sites=sites, claim=claim)
        if len(members) < 2:
            prop.group[members] = -2  # tried, stays unindexed
            prop.assigned[members] = False
            _release(prop, claim)
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
            for m, s in zip(members, shifted.tolist(), strict=True):
                prop.sites[tuple(s)] = m
            # a duplicate lost a site of the group's frame: the same shift
            # makes it a site of the main lattice
            for m, (si, sj) in claim.items():
                prop.claim[m] = (si + int(best[0]), sj + int(best[1]))
        else:
            prop.assigned[members] = False
            prop.group[members] = -2
            _release(prop, claim)


def _release(prop, claim):
    """Free the peaks that lost a site of a group left unindexed.

    They lost to a peak that is no hole of the lattice, at a site of the
    group's own frame: no duplicates of anything (on a plate with stray
    peaks 792 such peaks were reported "duplicate"), and each may still
    start or join another group.
    """
    if claim:
        lost = np.fromiter(claim, np.int64, len(claim))
        prop.duplicate[lost] = False
        prop.group[lost] = -1


def _lattice_neighbours(prop):
    """Per hole, its neighbours a step of the global lattice away (within tolerance).

    Steps of 1 to ``_MAX_STEP`` sites along either axis, misfit below
    ``prop.tol_px``, duplicates left out: the neighbours a propagation
    started from the hole (with the global lattice matrix) could index.
    """
    n = len(prop.p)
    nb = prop.nb_idx
    present = nb < n
    safe = np.where(present, nb, 0)
    d = prop.p[safe] - prop.p[:, None, :]  # (n, K, 2)
    step = np.rint(d @ np.linalg.inv(prop.basis).T)
    miss = np.hypot(*np.moveaxis(d - step @ prop.basis.T, -1, 0))
    span = np.abs(step).max(axis=2)
    ok = present & ~prop.duplicate[safe] & (span >= 1) & (span <= _MAX_STEP)
    return np.count_nonzero(ok & (miss < prop.tol_px), axis=1)


def _local_misfits(prop, quadratic, judge=None):
    """Distance of every indexed hole from the site its indexed neighbours predict.

    For every indexed hole at once: a least-squares fit ``p = c + L di`` (plus
    the three second-order terms if ``quadratic``) over its indexed
    neighbours up to two sites away, itself excluded; the misfit is
    ``|p_h - c|`` (px). Returns ``(misfit, judged)``; holes with too few
    neighbours for a well-posed fit are not judged (misfit 0). ``judge``
    (bool mask) picks the holes to test, default the indexed ones; only
    indexed holes serve as neighbours.
    """
    n = len(prop.p)
    nb = prop.nb_idx
    present = nb < n
    safe = np.where(present, nb, 0)
    ok = prop.assigned
    judge = ok if judge is None else judge
    di = (prop.index[safe] - prop.index[:, None, :]).astype(np.float64)  # (n, K, 2)
    w = present & ok[safe] & judge[:, None] & (np.abs(di).max(axis=2) <= _MAX_STEP)
    cols = [np.ones(di.shape[:2]), di[..., 0], di[..., 1]]
    if quadratic:
        cols += [di[..., 0] ** 2, di[..., 0] * di[..., 1], di[..., 1] ** 2]
    design = np.stack(cols, axis=2)  # (n, K, q)
    q = design.shape[2]
    wd = design * w[..., None]
    normal = np.einsum("nki,nkj->nij", wd, design)
    rhs = np.einsum("nki,nkj->nij", wd, prop.p[safe])
    # well-posed: enough neighbours and a normal matrix far from singular
    cond_ok = np.zeros(n, bool)
    enough = judge & (w.sum(axis=1) >= q + 3)
    if np.any(enough):
        cond_ok[enough] = np.linalg.cond(normal[enough]) < 1e8
    coef = np.zeros((n, q, 2))
    if np.any(cond_ok):
        coef[cond_ok] = np.linalg.solve(normal[cond_ok], rhs[cond_ok])
    miss = np.where(cond_ok, np.hypot(*(prop.p - coef[:, 0, :]).T), 0.0)
    return miss, cond_ok


def _unassign(prop, bad, flag):
    prop.assigned[bad] = False
    flag[bad] = True
    for h in bad:
        site = tuple(prop.index[h].tolist())
        if prop.sites.get(site) == h:
            del prop.sites[site]


def _reject_local_misfits(prop, tol_px, passes=2):
    """Reject indexed holes farther than ``tol_px`` from their predicted site (affine)."""
    for _ in range(passes):
        miss, judged = _local_misfits(prop, quadratic=False)
        bad = np.flatnonzero(judged & (miss > tol_px))
        if len(bad) == 0:
            return
        _unassign(prop, bad, prop.misfit)


def _reject_outliers(prop, k_sigma, floor_px, max_rounds=8):
    """Reject holes off the smooth trend of their neighbours by > k robust sigmas.

    The misfit against a local quadratic fit is noise-dominated for good
    holes, so its scale comes from the median (Rayleigh: median = 1.1774
    sigma per component). Each round tests only holes whose misfit is the
    largest among their neighbours', and rejects one only if it also stands
    out from its neighbourhood (:func:`_stands_out`): a distortion feature
    narrower than the quadratic's reach (a local bump, a taper shear) puts
    every hole around it off the quadratic trend, and those holes are the
    only samples of that feature. A bad hole can still make a neighbour with
    few neighbours of its own look worse, so rejected holes are re-tested
    against the final set and reinstated if they fit. Returns the threshold
    used (px).
    """
    n = len(prop.p)
    nb = prop.nb_idx
    present = nb < n
    safe = np.where(present, nb, 0)
    miss, judged = _local_misfits(prop, quadratic=True)
    if np.count_nonzero(judged) < 10:
        return None
    threshold = max(floor_px, k_sigma * np.median(miss[judged]) / 1.1774)
    coherent = np.zeros(n, bool)  # off the trend together with their neighbourhood: kept
    for _ in range(max_rounds):
        over = judged & (miss > threshold) & ~coherent
        if not np.any(over):
            break
        nb_miss = np.where(present & prop.assigned[safe], miss[safe], 0.0).max(axis=1)
        worst = np.flatnonzero(over & (miss >= nb_miss))
        out = np.array([_stands_out(prop, h, miss[h]) for h in worst], dtype=bool)
        coherent[worst[~out]] = True
        if not np.any(out):
            break
        _unassign(prop, worst[out], prop.outlier)
        miss, judged = _local_misfits(prop, quadratic=True)
    for _ in range(max_rounds):
        candidates = prop.outlier & ~prop.assigned
        if not np.any(candidates):
            break
        miss_c, judged_c = _local_misfits(prop, quadratic=True, judge=candidates)
        back = np.flatnonzero(judged_c & (miss_c <= threshold))
        back = [h for h in back if tuple(prop.index[h].tolist()) not in prop.sites]
        if not back:
            break
        for h in back:
            prop.assigned[h] = True
            prop.outlier[h] = False
            prop.sites[tuple(prop.index[h].tolist())] = h
    return threshold


def _stands_out(prop, h, miss_h):
    """True if hole ``h``'s misfit is an isolated error rather than a local feature.

    The misfits of ``h``'s indexed neighbours (up to two sites away) are
    recomputed without ``h``, so that an error of ``h`` cannot leak into
    them. An isolated centring error leaves them at the noise level; a
    distortion feature that the local quadratic cannot follow leaves them
    comparable to ``h``'s own. ``h`` stands out if its misfit exceeds
    :data:`_COHERENCE_RATIO` times their median. Measured ratios: a hole
    cut by the taper edge 0.18 px off, 8.5; a centre 1.8 px off, 48;
    holes on a 1 px Gaussian bump of 1.5 pitch sigma or on a sub-pitch
    taper shear, 1.8 to 4.9. With fewer than 3 neighbours to compare, the
    hole is judged on the global threshold alone.
    """
    n = len(prop.p)
    row = prop.nb_idx[h]
    row = row[row < n]
    row = row[prop.assigned[row]]
    near = np.abs(prop.index[row] - prop.index[h]).max(axis=1) <= _MAX_STEP
    row = row[near]
    if len(row) < 3:
        return True
    judge = np.zeros(n, bool)
    judge[row] = True
    prop.assigned[h] = False
    try:
        miss, judged = _local_misfits(prop, quadratic=True, judge=judge)
    finally:
        prop.assigned[h] = True
    ok = judged[row]
    if np.count_nonzero(ok) < 3:
        return True
    return bool(miss_h > _COHERENCE_RATIO * np.median(miss[row[ok]]))


def _reinstate_duplicates(prop):
    """Give duplicates the sites their rivals lost as outliers; True if any moved."""
    moved = False
    for m, site in prop.claim.items():
        if prop.duplicate[m] and not prop.assigned[m] and site not in prop.sites:
            prop.index[m] = site
            prop.assigned[m] = True
            prop.duplicate[m] = False
            prop.group[m] = 0
            prop.sites[site] = m
            moved = True
    return moved


def _affine(idx, pos, basis):
    """Least-squares ``pos = origin + idx @ vectors``; ``basis`` if degenerate."""
    design = np.column_stack([np.ones(len(idx)), idx.astype(np.float64)])
    coef, _, rank, _ = np.linalg.lstsq(design, pos, rcond=None)
    if rank < 3:
        vectors = basis.T.copy()
        origin = np.mean(pos - idx @ vectors, axis=0)
        return origin, vectors
    return coef[0], coef[1:3].copy()
