"""Border gaps of the holes: pixels a convex hull bridges and the maps only extrapolate into."""

import numpy as np
import pytest
from scipy.spatial import ConvexHull, cKDTree

from ccdgrid.coverage import border_gaps, mask_border_gaps
from ccdgrid.maps import displacement_maps, hull_mask

SHAPE = (400, 460)
PITCH = 40.0


def _lattice(rotation_deg=0.0, aspect=1.0, barrel=0.0, drop=(), rows=4, cols=5, clip=False):
    """Hole centres (y, x), rows ``-rows..rows`` by ``cols``, minus ``drop`` (i, j).

    With ``clip``, a larger lattice cut by SHAPE less a 20 px border instead.
    """
    t = np.deg2rad(rotation_deg)
    if clip:
        rows = cols = 12
    ii, jj = np.meshgrid(np.arange(-rows, rows + 1), np.arange(-cols, cols + 1), indexing="ij")
    keep = np.ones(ii.shape, bool)
    for i, j in drop:
        keep &= ~((ii == i) & (jj == j))
    u = np.stack([ii[keep], jj[keep] * aspect], axis=1) * PITCH
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = np.array(SHAPE) / 2.0
    p = u @ rot.T
    r2 = np.sum(p**2, axis=1, keepdims=True) / np.sum(centre**2)
    p = centre + p * (1.0 - barrel * r2)
    inside = np.all((p >= 20) & (p <= np.array(SHAPE) - 21), axis=1)
    assert clip or inside.all()
    return p[inside]


def _hull(pts):
    return hull_mask(ConvexHull(pts).equations, SHAPE)


def _masked(pts):
    mask = _hull(pts)
    added = mask_border_gaps(pts, mask)
    return mask, added


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"clip": True},  # the image's edges cut an unrotated lattice along its rows
        {"rotation_deg": 30.0, "rows": 3, "cols": 3},
        {"rotation_deg": 45.0, "aspect": 1.05, "rows": 3, "cols": 3},
        {"barrel": 0.06},  # 6 % less magnification in the corners
        {"aspect": 0.95, "barrel": 0.04, "rotation_deg": 10.0, "rows": 3, "cols": 4},
    ],
)
def test_a_complete_lattice_has_no_border_gap(kw):
    pts = _lattice(**kw)
    corners = border_gaps(pts)
    mask, added = _masked(pts)
    assert len(corners) == 0
    assert added == 0
    np.testing.assert_array_equal(mask, _hull(pts))


def _site(i, j):
    return np.array(SHAPE) / 2.0 + PITCH * np.array([i, j])


def test_a_missing_border_hole_masks_the_gap_up_to_the_next_row():
    full = _lattice()
    # the top row is i = -4 (y = 40); drop one hole in its middle
    pts = _lattice(drop=[(-4, 1)])
    assert len(pts) == len(full) - 1
    mask, added = _masked(pts)
    hull = _hull(pts)
    assert added > 0
    y, x = _site(-4, 1).astype(int)
    # the hull still runs along the top row over the missing hole
    assert hull[y + 1, x] == 0
    # the gap: the missing site, and halfway to the next row below it
    assert mask[y + 1, x] == 1
    assert mask[y + int(PITCH / 2), x] == 1
    # every newly masked pixel is farther from the holes than a lattice cell's
    # centre would be from its four holes, or between the two rows by the gap
    newly = np.argwhere((mask == 1) & (hull == 0))
    dist = cKDTree(pts).query(newly.astype(float))[0]
    assert dist.max() > 0.9 * PITCH
    assert np.all(np.abs(newly[:, 1] - x) <= PITCH)
    assert np.all((newly[:, 0] >= y) & (newly[:, 0] <= y + PITCH))
    # the next row's holes and the rest of the plate stay valid
    ny, nx = _site(-3, 1).astype(int)
    assert mask[ny + 1, nx] == 0
    assert np.array_equal(mask[y + int(1.5 * PITCH) :], hull[y + int(1.5 * PITCH) :])


def test_an_enclosed_gap_stays_valid():
    # a missing hole in the middle and a 2 x 2 block: interpolated, not extrapolated
    pts = _lattice(drop=[(0, 0), (2, 3), (2, 4), (3, 3), (3, 4)])
    mask, added = _masked(pts)
    assert added == 0
    np.testing.assert_array_equal(mask, _hull(pts))


def test_a_wide_enclosed_gap_is_masked_up_to_its_holes():
    # a 3 x 4 block missing inside the plate (a beam stop's shadow): enclosed,
    # but its middle is 2-2.5 pitches from every hole, too far to trust
    block = [(i, j) for i in range(-1, 2) for j in range(-2, 2)]
    pts = _lattice(drop=block)
    mask, added = _masked(pts)
    assert added > 0
    y, x = _site(0, -1).astype(int)
    assert mask[y, x] == 1
    # what stays valid of it lies within a missing row's reach of the holes
    # around (the triangles at its corners are narrow); its middle is ~2 away
    tree = cKDTree(pts)
    valid = np.argwhere(mask == 0).astype(float)
    assert tree.query(valid)[0].max() < 1.12 * PITCH
    assert tree.query([_site(0, -0.5)])[0][0] > 2.0 * PITCH
    # nothing is masked outside the ring of holes around the block
    newly = np.argwhere(mask != _hull(pts))
    lo, hi = _site(-2, -3), _site(2, 2)
    assert np.all((newly >= lo) & (newly <= hi))


def test_a_row_missing_across_the_plate_is_masked_only_near_the_border():
    # a whole row of holes missing: the gap reaches the hull at both ends,
    # but inside the plate it has holes above and below and is interpolated
    pts = _lattice(drop=[(0, j) for j in range(-5, 6)])
    mask, added = _masked(pts)
    assert added > 0
    y = int(SHAPE[0] / 2)
    xs = np.flatnonzero(mask[y] == 1)
    x_first, x_last = _site(0, -5)[1], _site(0, 5)[1]
    # masked: the ends of the band, up to ~1.5 pitch in from the outer columns
    assert mask[y, int(x_first) + 2] == 1
    assert mask[y, int(x_last) - 2] == 1
    assert xs[(xs > x_first) & (xs < x_last)].size > 0
    inner = xs[(xs > x_first + 2.5 * PITCH) & (xs < x_last - 2.5 * PITCH)]
    assert inner.size == 0
    # the middle of the band stays valid
    assert mask[y, int(SHAPE[1] / 2)] == 0


def test_an_empty_corner_is_masked_all_the_way_in():
    # a 5 x 5 block of holes missing at a corner (an empty corner of the
    # image, a notch in the lit area): the hull bridges it with a diagonal,
    # and near the notch's inner corner the gap lies 2-3 pitches from that
    # diagonal (deeper than GAP_DEPTH) and as far from every hole
    notch = [(i, j) for i in range(-4, 1) for j in range(1, 6)]
    pts = _lattice(drop=notch)
    mask, added = _masked(pts)
    assert added > 0
    tree = cKDTree(pts)
    valid = np.argwhere(mask == 0).astype(float)
    # nothing valid lies beyond the holes around the notch: every valid
    # pixel is within a lattice cell's half diagonal of a hole
    assert tree.query(valid)[0].max() < 0.75 * PITCH
    y, x = _site(0, 1).astype(int)  # the notch's innermost site
    assert mask[y, x] == 1
    # ... and not beyond: the cell beside the inner corner's hole stays valid
    y1, x1 = _site(1, 1).astype(int)
    assert mask[y1 + 2, x1 - 2] == 0


def test_a_row_cut_by_a_rotated_edge_masks_the_wedge_beyond_the_holes():
    # holes cut by the image's edge on a rotated plate: the hull bridges the
    # staircase of the outer rows; what lies beyond a row of holes is masked
    pts = _lattice(rotation_deg=8.0, clip=True)
    mask, added = _masked(pts)
    assert added > 0
    tree = cKDTree(pts)
    valid = np.argwhere(mask == 0).astype(float)
    # every valid pixel is within a lattice cell: at most its half diagonal
    # (plus the rotation's slack) from a hole
    assert tree.query(valid)[0].max() < 0.75 * PITCH
    hull_valid = np.argwhere(_hull(pts) == 0).astype(float)
    assert tree.query(hull_valid)[0].max() > 0.9 * PITCH  # what the hull alone kept


def test_displacement_maps_masks_border_gaps_unless_asked_not_to():
    pts = _lattice(drop=[(-4, 1), (-4, 2)])
    disp = np.zeros_like(pts)
    maps = displacement_maps(pts, disp, SHAPE, smoothing=1.0)
    hull_only = displacement_maps(pts, disp, SHAPE, smoothing=1.0, gap_ratio=None)
    expected, _ = _masked(pts)
    np.testing.assert_array_equal(maps.mask, expected)
    np.testing.assert_array_equal(hull_only.mask, _hull(pts))
    assert maps.mask.sum() > hull_only.mask.sum()


@pytest.mark.parametrize("n", [0, 1, 3])
def test_too_few_points_mask_nothing(n):
    pts = _lattice()[:n]
    mask = np.zeros(SHAPE, np.int8)
    assert mask_border_gaps(pts, mask) == 0
    assert not mask.any()


def test_collinear_points_mask_nothing():
    pts = np.stack([np.full(10, 100.0), np.arange(10) * PITCH + 20], axis=1)
    mask = np.zeros(SHAPE, np.int8)
    assert mask_border_gaps(pts, mask) == 0


def _in_triangle(tri, y, x):
    """Whether points ``(y, x)`` lie in the closed triangle ``tri`` (3, 2), by cross products."""
    (ay, ax), (by, bx), (cy, cx) = tri
    d = [
        (by - ay) * (x - ax) - (bx - ax) * (y - ay),
        (cy - by) * (x - bx) - (cx - bx) * (y - by),
        (ay - cy) * (x - cx) - (ax - cx) * (y - cy),
    ]
    tol = 1e-9
    neg = np.any([v < -tol for v in d], axis=0)
    pos = np.any([v > tol for v in d], axis=0)
    return ~(neg & pos)


@pytest.mark.parametrize(
    "kw",
    [
        {"rotation_deg": 8.0, "clip": True},
        {"rotation_deg": -21.0, "clip": True, "barrel": 0.05},
        {"drop": [(-4, 1), (-4, 2), (4, -5), (0, 5)]},
    ],
)
def test_masked_pixels_are_the_centres_inside_the_gap_triangles(kw):
    pts = _lattice(**kw)
    corners = border_gaps(pts)
    assert len(corners) > 0
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]].astype(float)
    expected = np.zeros(SHAPE, bool)
    for tri in corners:
        expected |= _in_triangle(tri, yy, xx)
    mask = np.zeros(SHAPE, np.int8)
    added = mask_border_gaps(pts, mask)
    np.testing.assert_array_equal(mask.astype(bool), expected)
    assert added == expected.sum()
    # a mask laid out column by column is written in place all the same
    fortran = np.zeros(SHAPE, np.int8, order="F")
    assert mask_border_gaps(pts, fortran) == added
    np.testing.assert_array_equal(fortran, mask)
    # pixels masked already are left as they are and not counted
    again = mask.copy()
    assert mask_border_gaps(pts, again) == 0
    np.testing.assert_array_equal(again, mask)


def test_row_spans_match_a_point_in_triangle_test_on_random_and_flat_triangles():
    from ccdgrid.coverage import _row_spans

    rng = np.random.default_rng(7)
    shape = (60, 70)
    tris = rng.uniform(-15, 80, (40, 3, 2))  # many reach beyond the image
    tris[:10, 1, 0] = tris[:10, 0, 0]  # a flat edge (same y), on a row or between rows
    tris[:5, :2, 0] = np.round(tris[:5, :2, 0])
    tris[10:15] = np.round(tris[10:15])  # corners on pixel centres
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    for k, tri in enumerate(tris):
        spans = np.zeros(shape, bool)
        for r, a, b in zip(*_row_spans(tri[None], *shape), strict=True):
            if b >= a:  # an empty span: the row's interval holds no pixel centre
                assert a >= 0
                assert b < shape[1]
                spans[r, a : b + 1] = True
        np.testing.assert_array_equal(
            spans, _in_triangle(tri, yy, xx), err_msg=f"triangle {k}: {tri.tolist()}"
        )
