"""Which pixels the holes support: border gaps the maps would only extrapolate into.

The maps are valid inside the convex hull of the holes
(:func:`ccdgrid.maps.hull_mask`), but a convex hull bridges any gap in the
outer rows of holes: where a border hole was not found (cut by a lit area's
edge, a dead line, a hot pixel, a plate defect), the hull still runs along the
row, and the pixels around the missing hole are more than a pitch from every
hole on the outer side. The spline is extrapolated there, by 0.2-0.8 px on
strongly distorted plates. A gap enclosed by holes (a missing hole in the
middle of the plate) is not extrapolated, only interpolated, and stays valid.

The rule works on the Delaunay triangulation of the hole centres: a triangle
of a complete lattice has edges of one pitch and one diagonal (``sqrt(2)``
pitches, up to ~1.5 with a rectangular pixel and strong distortion), a
triangle spanning a missing hole has an edge of at least two pitches. An
edge is long when it exceeds ``edge_ratio`` local pitches (the mean
nearest-neighbour distance of its two holes). A border gap starts at a long
edge of the hull (the hull bridging missing holes, or the staircase of
rows cut by the image's edge on a rotated plate) and reaches inwards
through long edges only: the pixels whose centre lies in such a triangle
are masked. Behind a complete outer row, a gap is enclosed and stays valid. Coordinates
are ``(y, x)`` index coordinates: the centre of pixel ``(i, j)`` is at
``(i, j)``.
"""

import numpy as np
from scipy.spatial import Delaunay, QhullError, cKDTree

__all__ = ["EDGE_RATIO", "border_gaps", "mask_border_gaps"]

EDGE_RATIO = 1.7  # between a lattice diagonal (1.41-1.5) and a gap's edge (>= 2)


def border_gaps(points, *, edge_ratio=EDGE_RATIO):
    """Triangles of the holes' Delaunay triangulation that are border gaps.

    Parameters
    ----------
    points : ndarray of shape (N, 2), float64, px
        Hole centres ``(y, x)``, index coordinates.
    edge_ratio : float
        An edge is long when it spans more than this many local pitches.

    Returns
    -------
    corners : ndarray of shape (G, 3, 2), float64, px
        The ``(y, x)`` corners of every border-gap triangle (G may be 0).
    pitch : ndarray of shape (G,), float64, px
        The local pitch of each (median nearest-neighbour distance of its
        corners).
    """
    pts = np.asarray(points, dtype=np.float64)
    empty = (np.zeros((0, 3, 2)), np.zeros(0))
    if len(pts) < 4:
        return empty
    try:
        tri = Delaunay(pts)
    except QhullError:
        return empty
    simplices = tri.simplices
    corners = pts[simplices]  # (T, 3, 2)
    nearest = cKDTree(pts).query(pts, k=2)[0][:, 1]
    # edge k of a triangle is the one opposite its vertex k, as in
    # ``tri.neighbors[:, k]``; it is long when it spans more than
    # ``edge_ratio`` local pitches (those of its two ends)
    ends = np.stack([np.roll(simplices, -1, axis=1), np.roll(simplices, -2, axis=1)], axis=2)
    length = np.linalg.norm(pts[ends[..., 0]] - pts[ends[..., 1]], axis=2)  # (T, 3)
    long = length > edge_ratio * 0.5 * (nearest[ends[..., 0]] + nearest[ends[..., 1]])
    neighbors = tri.neighbors  # -1 across the hull's boundary
    # a gap opens onto the outside where a long edge is on the hull; it
    # reaches inwards through long edges only (behind a complete row of
    # holes, a missing hole is enclosed)
    reached = np.any(long & (neighbors < 0), axis=1)
    front = np.flatnonzero(reached)
    while front.size:
        across = neighbors[front][long[front]]
        across = np.unique(across[across >= 0])
        front = across[~reached[across]]
        reached[front] = True
    local = np.median(nearest[simplices], axis=1)
    return corners[reached], local[reached]


def mask_border_gaps(points, mask, *, edge_ratio=EDGE_RATIO):
    """Set ``mask`` to 1 at the pixels whose centre lies in a border gap (in place).

    Parameters
    ----------
    points : ndarray of shape (N, 2), float64, px
        Hole centres ``(y, x)``, index coordinates.
    mask : ndarray of shape (ny, nx), int8
        Validity mask, 1 = invalid (pyFAI's convention); modified in place.
    edge_ratio : float
        See :func:`border_gaps`.

    Returns
    -------
    int
        Number of pixels newly masked.
    """
    ny, nx = mask.shape
    added = 0
    # a few triangles, each a pitch or two across: a loop over them and a
    # vectorised test of the pixels of each one's bounding box
    for tri in border_gaps(points, edge_ratio=edge_ratio)[0]:
        lo = np.maximum(np.ceil(tri.min(axis=0)).astype(np.int64), 0)
        hi = np.minimum(np.floor(tri.max(axis=0)).astype(np.int64), (ny - 1, nx - 1))
        if np.any(hi < lo):
            continue
        yy, xx = np.mgrid[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1]
        inside = _in_triangle(tri, yy.astype(np.float64), xx.astype(np.float64))
        block = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1]
        fresh = inside & (block == 0)
        added += int(np.count_nonzero(fresh))
        block[fresh] = 1
    return added


def _in_triangle(tri, y, x):
    """Whether points ``(y, x)`` lie in the closed triangle ``tri`` (3, 2), either orientation."""
    (ay, ax), (by, bx), (cy, cx) = tri
    tol = 1e-9 * max(1.0, float(np.abs(tri).max()))
    d1 = (by - ay) * (x - ax) - (bx - ax) * (y - ay)
    d2 = (cy - by) * (x - bx) - (cx - bx) * (y - by)
    d3 = (ay - cy) * (x - cx) - (ax - cx) * (y - cy)
    neg = (d1 < -tol) | (d2 < -tol) | (d3 < -tol)
    pos = (d1 > tol) | (d2 > tol) | (d3 > tol)
    return ~(neg & pos)
