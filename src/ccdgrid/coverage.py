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
through long edges only; the pixels whose centre lies in such a triangle
are masked if the triangle is near the hull's boundary (its centroid within
``GAP_DEPTH`` local pitches) or wide (its circumradius, the distance from
every hole of its circumcentre, beyond ``GAP_RADIUS`` local pitches: an
empty corner, a notch in the lit area). Behind a complete outer row, a gap
is enclosed and stays valid, and so does the inner part of a narrow gap
that reaches the border (a row of holes missing across the whole plate):
there it has holes on both sides and is interpolated. An enclosed gap is
masked too when it is wide (circumradius beyond ``GAP_ENCLOSED`` local
pitches: a beam stop's shadow, a dark spot), where the maps would only
guess across a hole-free disc several pitches wide. Coordinates
are ``(y, x)`` index coordinates: the centre of pixel ``(i, j)`` is at
``(i, j)``.
"""

import numpy as np
from scipy.spatial import Delaunay, QhullError, cKDTree

__all__ = [
    "EDGE_RATIO",
    "GAP_DEPTH",
    "GAP_ENCLOSED",
    "GAP_RADIUS",
    "border_gaps",
    "mask_border_gaps",
]

EDGE_RATIO = 1.7  # between a lattice diagonal (1.41-1.5) and a gap's edge (>= 2)
GAP_DEPTH = 1.5  # pitches from the hull's boundary: beyond, a gap is interpolated ...
# ... unless its triangle's circumradius exceeds this many local pitches: then
# the gap is wider than one missing row (whose triangles have 1.12), and its
# middle lies that far from every hole (a Delaunay circumcircle holds none)
GAP_RADIUS = 1.3
# ... and any gap, enclosed or not, whose triangle's circumradius exceeds this:
# a hole-free disc over 4 pitches across (a 2 x 2 block of missing holes has 1.58)
GAP_ENCLOSED = 2.0


def border_gaps(
    points, *, edge_ratio=EDGE_RATIO, depth=GAP_DEPTH, radius=GAP_RADIUS, enclosed=GAP_ENCLOSED
):
    """Triangles of the holes' Delaunay triangulation that are border gaps or wide gaps.

    Parameters
    ----------
    points : ndarray of shape (N, 2), float64, px
        Hole centres ``(y, x)``, index coordinates.
    edge_ratio : float
        An edge is long when it spans more than this many local pitches.
    depth, radius : float
        Only border-gap triangles whose centroid lies within ``depth``
        local pitches of the hull's boundary, or whose circumradius exceeds
        ``radius`` local pitches, are returned.
    enclosed : float
        Any triangle whose circumradius exceeds this many local pitches is
        returned too, border gap or not.

    Returns
    -------
    corners : ndarray of shape (G, 3, 2), float64, px
        The ``(y, x)`` corners of every such triangle (G may be 0).
    """
    pts = np.asarray(points, dtype=np.float64)
    empty = np.zeros((0, 3, 2))
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
    # ... but only the part near the hull is extrapolated: farther in, a
    # narrow gap has holes on both sides (a whole row missing across the
    # plate is interpolated between its neighbours, to their accuracy). A
    # wide one (an empty corner of the image, a notch in the lit area) is
    # extrapolated all the way in: the mask follows its holes.
    pitch = nearest[simplices].mean(axis=1)  # (T,) local pitch of each triangle
    e1 = corners[:, 1] - corners[:, 0]
    e2 = corners[:, 2] - corners[:, 0]
    area2 = np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])  # twice the area
    with np.errstate(divide="ignore", invalid="ignore"):
        # circumradius abc / (4 area), in local pitches; a flat triangle's is inf
        circum = length.prod(axis=1) / (2.0 * area2 * pitch)
    gap = np.flatnonzero(reached)
    near = _depth(corners[gap].mean(axis=1), pts, tri.convex_hull) < depth * pitch[gap]
    keep = np.zeros(len(simplices), dtype=bool)
    keep[gap[near | (circum[gap] > radius)]] = True
    # An enclosed gap is interpolated, but across a hole-free disc more than
    # 2 ``enclosed`` pitches wide (a beam stop's shadow, a dark spot on the
    # phosphor) the maps guess: a 3 px bump of the field under a 9-pitch dark
    # disc came out 3 px wrong, with nothing to show it.
    keep |= circum > enclosed
    return corners[keep]


def _depth(points, pts, hull_edges):
    """Distance of each point (M, 2) inside the hull to its boundary, px."""
    a, b = pts[hull_edges[:, 0]], pts[hull_edges[:, 1]]
    edge = b - a
    length = np.hypot(edge[:, 0], edge[:, 1])
    # distance to each edge's line; for a point inside a convex polygon the
    # nearest boundary point lies on the line of the nearest edge
    cross = edge[None, :, 0] * (points[:, None, 1] - a[None, :, 1]) - edge[None, :, 1] * (
        points[:, None, 0] - a[None, :, 0]
    )
    return np.min(np.abs(cross) / length[None, :], axis=1)


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
    rows, first, last = _row_spans(border_gaps(points, edge_ratio=edge_ratio), ny, nx)
    keep = last >= first
    rows, first, last = rows[keep], first[keep], last[keep]
    if rows.size == 0:
        return 0
    # the (row, column) of every pixel of every span, without a loop over them
    # (pairs, not flat indices: the mask may be laid out in any order)
    lengths = last - first + 1
    cols = np.repeat(first - (np.cumsum(lengths) - lengths), lengths)
    cols += np.arange(int(lengths.sum()), dtype=np.int64)
    # spans of neighbouring triangles share end pixels: count the rows they
    # touch before and after, which costs less than sorting the indices
    band = mask[rows.min() : rows.max() + 1]
    before = np.count_nonzero(band)
    mask[np.repeat(rows, lengths), cols] = 1
    return int(np.count_nonzero(band) - before)


def _row_spans(triangles, ny, nx):
    """``(rows, first, last)`` int64: the pixel centres of each image row in each triangle.

    ``triangles`` (G, 3, 2) hold ``(y, x)`` corners; a centre on an edge is
    inside. A triangle meets a row's line in one interval, between its
    longest edge in y and one of the two others; one span per row and
    triangle (spans of neighbouring triangles may share their end pixels).
    """
    tri = np.take_along_axis(triangles, np.argsort(triangles[..., 0], axis=1)[..., None], axis=1)
    (y0, x0), (y1, x1), (y2, x2) = (tri[:, k].T for k in range(3))
    eps = 1e-9 * max(1.0, float(np.abs(tri).max(initial=0.0)))
    r0 = np.maximum(np.ceil(y0 - eps), 0).astype(np.int64)
    r1 = np.minimum(np.floor(y2 + eps), ny - 1).astype(np.int64)
    counts = np.where(y2 - y0 > eps, np.maximum(r1 - r0 + 1, 0), 0)
    t = np.repeat(np.arange(len(tri)), counts)
    rows = np.repeat(r0 - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    y = np.clip(rows.astype(np.float64), y0[t], y2[t])
    y0, x0, y1, x1, y2, x2 = y0[t], x0[t], y1[t], x1[t], y2[t], x2[t]
    xa = x0 + (y - y0) * (x2 - x0) / (y2 - y0)
    # the lower edge where the row is below the middle corner (and that edge
    # is not flat), else the upper one (flat edges give a corner's x)
    lower = (y <= y1) & (y1 - y0 > eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        xl = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        xu = np.where(y2 - y1 > eps, x1 + (y - y1) * (x2 - x1) / (y2 - y1), x1)
    xb = np.where(lower, xl, xu)
    first = np.maximum(np.ceil(np.minimum(xa, xb) - eps), 0).astype(np.int64)
    last = np.minimum(np.floor(np.maximum(xa, xb) + eps), nx - 1).astype(np.int64)
    return rows, first, last
