"""Soft holes beside a lit-area edge: :func:`soft_edge_rows`, the holes to leave out.

A hole's image is its transmission times the illumination. Where the
illumination falls across a hole (the edge of a taper's lit disc, a beam
stop's shadow), the fitted centre moves towards the brighter side. For a
hole with a sharp rim the rim pins the centre and the hole finder's tests
(:func:`ccdgrid.holes.classify_fits`) catch the holes an edge cuts. For a
soft hole (a Gaussian-like profile: the fitted blur more than half the
disc's radius) they cannot: a Gaussian times a linear ramp is the same
Gaussian moved, so nothing in the hole's own pixels tells the shift from
the ramp, and its long tails reach the dimmer side from a pitch away. On generated plates of
Lorentzian-squared holes inside a lit disc with a soft rim (sigma 56 px, a
115 px pitch) the holes within a pitch of the rim sat 0.1-2.2 px off,
inwards, with the fit's chi-square, asymmetries and plane tilt those of
the holes further in; the maps followed them (0.23 px RMS off the truth).
Without the holes within 0.8-1 pitch of the rim: 0.016-0.009 px.

The rim is found from the lattice: the outer row of holes are those with
one of their four nearest lattice neighbours missing where it would lie
well inside the image (no hole accepted there: outside the lit area, under
a beam stop, or cut by the rim). Each is compared with the holes inside
the row within :data:`LOCAL_PITCHES` lattice steps (the median of their
amplitudes). When the holes are soft and the row is dimmer than those
(median ratio below :data:`DIM_ROW`), the rim is soft and its slope reaches
them: the row is left out. Then, row after row inwards, so are the holes of
the new outer row that are that much dimmer than their inner holes, one by
one (a lattice row crosses a round rim at different depths), until none
is. Vignetting dims a row against the holes a few pitches in by ~1 % a
pitch, far less than a rim's slope. Behind a sharp rim (a taper's face
imaged in focus) the outer row keeps its light and its centres (Gaussian
holes of 3-6 px beside a 4 px rim: within the robustness tests' bounds),
and every hole stays. On an independent generator's 768² plate of
Gaussian holes (sigma 8 px, a 60 px pitch) behind a rim 40 px wide, the
maps were 0.17-0.23 px RMS (1.6-1.9 px at most) off the truth with every
hole, 0.017-0.030 px (0.16-0.28 px) without the 39-54 holes so left out
(six draws).
Positions ``(y, x)`` are index coordinates, px.
"""

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["DIM_ROW", "LOCAL_PITCHES", "MAX_ROWS", "SOFT_RATIO", "soft_edge_rows"]

#: The holes are soft when their median fitted blur exceeds this fraction of
#: their median fitted disc radius (Lorentzian-squared holes of the fuzz
#: plates fit as a disc of 0.5-16 px blurred by 8-17 px).
SOFT_RATIO = 0.5
#: The outer row is on a soft rim's slope when its holes' median amplitude
#: ratio to the holes inside it is below this; further in, a hole is when its
#: own ratio is. (Measured first against the median of all the inner holes:
#: 0.68-0.94 on eight Lorentzian fuzz plates with rims of sigma 17-56 px,
#: 0.90 on the plate above; 0.985-1.02 on the robustness tests' Gaussian
#: plates behind sharp rims and beam stops.)
DIM_ROW = 0.95
#: The light an outer hole is compared with: the median amplitude of the
#: holes inside the outer row within this many lattice steps of it.
LOCAL_PITCHES = 3
#: Rows left out at most: the first, and the dim holes of this many less one
#: rows inside it (a rim 40 px wide took three rows of a 60 px pitch; a
#: smooth fall of the light over the whole plate, which this rule cannot
#: cure, would otherwise strip it down to ``min_left``).
MAX_ROWS = 4
_NEIGHBOURS = np.array([(-1, 0), (0, -1), (0, 1), (1, 0)])


def soft_edge_rows(peaks, indices, valid, vectors, amplitude, width, shape, margin, min_left=0):
    """Rows of the soft holes beside a lit-area edge, to leave out of the fit.

    Parameters
    ----------
    peaks : ndarray of shape (N, 2), float64
        Hole centres ``(y, x)``, px.
    indices : ndarray of shape (N, 2), int64
        Lattice indices ``(i, j)`` of the holes (meaningful where ``valid``).
    valid : ndarray of shape (N,), bool
        Holes the lattice accepted.
    vectors : ndarray of shape (2, 2), float64
        Lattice steps along ``i`` and ``j`` (rows), ``(y, x)`` px.
    amplitude : ndarray of shape (N,), float64
        Fitted height of each hole above its background.
    width : ndarray of shape (N, 2), float64
        Fitted disc radius and blur of each hole, px.
    shape : tuple of 2 int
        ``(h, w)`` of the image.
    margin : float, px
        A missing neighbour counts only if its expected centre lies at least
        this far inside the image (holes the image border cuts are missing
        for another reason; the hole's fitting window reaches about half a
        pitch).
    min_left : int
        Stop before a row would leave fewer valid holes than this.

    Returns
    -------
    ndarray of shape (K,), int64
        Sorted rows among the valid ones; empty when the holes are not soft
        or the outer row is not dimmer than the holes inside it.
    """
    none = np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(valid)
    if rows.size == 0:
        return none
    radius, blur = np.nanmedian(width[rows], axis=0)
    if not blur > SOFT_RATIO * radius:
        return none
    ij = indices[rows]
    lo = ij.min(axis=0) - 1
    span = ij.max(axis=0) - lo + 2
    # the neighbours' expected centres inside the image (by ``margin``)
    h, w = shape
    inside = []
    for step in _NEIGHBOURS:
        expected = peaks[rows] + step @ vectors
        inside.append(
            (expected[:, 0] >= margin)
            & (expected[:, 0] <= h - 1 - margin)
            & (expected[:, 1] >= margin)
            & (expected[:, 1] <= w - 1 - margin)
        )
    inside = np.stack(inside)
    left = np.ones(rows.size, dtype=bool)
    for depth in range(MAX_ROWS):
        # each hole still in, by lattice index (-1: none; one cell of margin),
        # and the empty sites joined to the outside of the lattice: a gap
        # inside it (a hole rejected for a hot pixel, blocked, masked) is
        # no rim
        where = np.full(tuple(span), -1, dtype=np.int64)
        where[tuple((ij[left] - lo).T)] = np.flatnonzero(left)
        outside = _outside(where)
        gone = np.stack([outside[tuple((ij + step - lo).T)] for step in _NEIGHBOURS])
        outer = left & np.any(inside & gone, axis=0)
        if not outer.any() or np.count_nonzero(left) - np.count_nonzero(outer) < max(3, min_left):
            break
        # each outer hole's light against that of the holes inside the row
        # within LOCAL_PITCHES: a soft rim dims the outer holes by more than
        # DIM_ROW's 5 %, vignetting by ~1 % a pitch (a global reference took
        # a vignetted 4096² plate's rim, 0.78 of its centre's light, for a
        # soft one)
        ratio = amplitude[rows] / _inner_light(ij, amplitude[rows], left & ~outer, outer)
        judged = outer & np.isfinite(ratio)
        if not judged.any():
            break
        if depth == 0:
            if not np.median(ratio[judged]) < DIM_ROW:
                break
            left &= ~outer
            continue
        # further in, the rim's slope shows hole by hole (a row of the
        # lattice crosses a round rim at different depths)
        dim = judged & (ratio < DIM_ROW)
        if not dim.any():
            break
        left &= ~dim
    return np.sort(rows[~left])


def _outside(where):
    """Empty cells of ``where`` (-1) 4-connected to its border: outside the lattice."""
    labels, _ = ndimage.label(where < 0)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.isin(labels, edge[edge > 0])


def _inner_light(ij, amplitude, inner, outer):
    """Median amplitude of the ``inner`` holes within ``LOCAL_PITCHES`` of each ``outer`` one.

    ``ij`` (M, 2) lattice indices, ``amplitude`` (M,), ``inner`` and
    ``outer`` (M,) bool. Returns (M,) float64, NaN where there is none (and
    for holes not ``outer``).
    """
    light = np.full(len(ij), np.nan)
    if not inner.any():
        return light
    tree = cKDTree(ij[inner].astype(np.float64))
    inner_amp = amplitude[inner]
    for k, near in zip(
        np.flatnonzero(outer),
        tree.query_ball_point(ij[outer].astype(np.float64), LOCAL_PITCHES + 0.01),
        strict=True,
    ):
        if near:
            light[k] = np.median(inner_amp[near])
    return light
