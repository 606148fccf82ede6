"""Soft holes beside a lit-area edge are left out: the rule on lattices, then on an image."""

import _independent_grid as gen  # registered by conftest.py
import numpy as np
import pytest

import ccdgrid.lit_edge
from ccdgrid import calibrate
from ccdgrid.combined import calibrate_combined
from ccdgrid.lit_edge import DIM_ROW, soft_edge_rows
from ccdgrid.pipeline import _index_without

PITCH = 50.0
SHAPE = (800, 800)


def _lattice(lit_radius=None, n=15):
    """``n`` x ``n`` holes ``PITCH`` apart about the image centre; the lit ones valid.

    Returns ``(peaks, indices, valid, vectors)``: holes further than
    ``lit_radius`` px from the centre are not valid (no light there), as
    the lattice leaves holes it did not accept.
    """
    ij = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    vectors = np.array([[PITCH, 1.5], [-1.5, PITCH]])
    centre = (np.array(SHAPE) - 1) / 2
    peaks = centre + (ij - (n - 1) / 2) @ vectors
    valid = np.ones(len(ij), dtype=bool)
    if lit_radius is not None:
        valid = np.hypot(*(peaks - centre).T) <= lit_radius
    return peaks, ij.astype(np.int64), valid, vectors


def _outer_row(peaks, valid, lit_radius):
    """The valid holes one of whose four neighbours lies outside the lit disc (expected)."""
    centre = (np.array(SHAPE) - 1) / 2
    rows = []
    for r in np.flatnonzero(valid):
        for step in ((-1, 0), (0, -1), (0, 1), (1, 0)):
            p = peaks[r] + np.array(step) @ np.array([[PITCH, 1.5], [-1.5, PITCH]])
            if np.hypot(*(p - centre)) > lit_radius:
                rows.append(r)
                break
    return np.array(rows)


SOFT = (2.0, 10.0)  # disc radius, blur: a Gaussian-like profile
SHARP = (10.0, 1.0)


def _widths(valid, shape_):
    return np.tile(np.array(shape_, dtype=float), (len(valid), 1))


@pytest.mark.parametrize("dim", [0.8, 0.9])
def test_the_outer_row_of_soft_holes_on_a_dim_rim_is_left_out(dim):
    peaks, ij, valid, vectors = _lattice(lit_radius=300.0)
    outer = _outer_row(peaks, valid, 300.0)
    assert 0 < len(outer) < valid.sum() / 2
    amplitude = np.full(len(peaks), 1000.0)
    amplitude[outer] *= dim
    rows = soft_edge_rows(peaks, ij, valid, vectors, amplitude, _widths(valid, SOFT), SHAPE, 25.0)
    np.testing.assert_array_equal(rows, np.sort(outer))


def test_dim_holes_further_in_go_one_by_one_after_a_dim_row():
    # the rim's slope reaches past the outer row at some holes only
    peaks, ij, valid, vectors = _lattice(lit_radius=300.0)
    outer = _outer_row(peaks, valid, 300.0)
    amplitude = np.full(len(peaks), 1000.0)
    amplitude[outer] = 700.0
    second = np.setdiff1d(_outer_row(peaks, valid, 300.0 - PITCH), outer)
    second = second[valid[second]]
    dim = second[::3]
    amplitude[dim] = 900.0  # below DIM_ROW of the inner holes' light
    assert DIM_ROW * 1000.0 > 900.0
    widths = _widths(valid, SOFT)
    rows = soft_edge_rows(peaks, ij, valid, vectors, amplitude, widths, SHAPE, 25.0)
    np.testing.assert_array_equal(rows, np.union1d(outer, dim))
    # never below min_left holes: the row that would cross it stays
    kept = soft_edge_rows(
        peaks, ij, valid, vectors, amplitude, widths, SHAPE, 25.0, min_left=valid.sum()
    )
    assert kept.size == 0


def test_a_bright_outer_row_sharp_holes_or_a_lit_image_leave_every_hole():
    peaks, ij, valid, vectors = _lattice(lit_radius=300.0)
    outer = _outer_row(peaks, valid, 300.0)
    amplitude = np.full(len(peaks), 1000.0)
    # a sharp rim beyond the outer row: it keeps its light
    amplitude[outer] *= DIM_ROW + 0.02
    args = (peaks, ij, valid, vectors, amplitude)
    assert soft_edge_rows(*args, _widths(valid, SOFT), SHAPE, 25.0).size == 0
    # sharp holes: the rim pins their centres
    amplitude[outer] = 500.0
    assert soft_edge_rows(*args, _widths(valid, SHARP), SHAPE, 25.0).size == 0
    # the whole image lit: the outermost holes' missing neighbours lie off the image
    peaks, ij, valid, vectors = _lattice(n=17)
    assert valid.all()
    amplitude = np.full(len(peaks), 1000.0)
    amplitude[np.abs(ij - 8).max(axis=1) == 8] = 500.0
    rows = soft_edge_rows(peaks, ij, valid, vectors, amplitude, _widths(valid, SOFT), SHAPE, 25.0)
    assert rows.size == 0


def test_gaps_inside_the_lattice_are_no_rim():
    # holes missing inside the lit area (rejected for a hot pixel, blocked):
    # their neighbours keep their light and stay
    peaks, ij, valid, vectors = _lattice(lit_radius=300.0)
    outer = _outer_row(peaks, valid, 300.0)
    amplitude = np.full(len(peaks), 1000.0)
    amplitude[outer] = 800.0
    centre = (np.array(SHAPE) - 1) / 2
    deep = np.flatnonzero(valid & (np.hypot(*(peaks - centre).T) < 180.0))
    gaps = deep[::4]
    assert len(gaps) >= 8
    valid[gaps] = False
    widths = _widths(valid, SOFT)
    rows = soft_edge_rows(peaks, ij, valid, vectors, amplitude, widths, SHAPE, 25.0)
    np.testing.assert_array_equal(rows, np.sort(outer))


def test_a_light_falling_over_the_whole_plate_loses_max_rows_at_most():
    # the light falls by 10 % a pitch from the centre: every row is dimmer
    # than the one inside it, which the rule cannot cure; it stops
    peaks, ij, valid, vectors = _lattice(lit_radius=340.0)
    centre = (np.array(SHAPE) - 1) / 2
    r = np.hypot(*(peaks - centre).T)
    amplitude = 1000.0 * 0.9 ** (r / PITCH)
    widths = _widths(valid, SOFT)
    rows = soft_edge_rows(peaks, ij, valid, vectors, amplitude, widths, SHAPE, 25.0)
    assert rows.size > 0
    kept = valid.copy()
    kept[rows] = False
    # the holes more than MAX_ROWS pitches (and a diagonal's slack) inside the rim stay
    assert kept[valid & (r < 340.0 - (ccdgrid.lit_edge.MAX_ROWS + 0.5) * PITCH)].all()


def test_too_few_or_no_valid_holes_leave_none_out():
    peaks, ij, valid, vectors = _lattice(lit_radius=60.0)
    amplitude = np.full(len(peaks), 1000.0)
    amplitude[_outer_row(peaks, valid, 60.0)] = 500.0
    widths = _widths(valid, SOFT)
    # nearly every lit hole is on the rim: leaving it out would leave under 3
    assert soft_edge_rows(peaks, ij, valid, vectors, amplitude, widths, SHAPE, 25.0).size == 0
    none = np.zeros(len(peaks), dtype=bool)
    assert soft_edge_rows(peaks, ij, none, vectors, amplitude, widths, SHAPE, 25.0).size == 0


def _rim_plate(seed, offset=(0.3, 0.6)):
    """Gaussian holes (sigma 8 px, 60 px apart) on a dark plate, lit through a
    disc whose rim is 40 px wide: the outer rows' centres move inwards."""
    field = gen.Field(centre=(360.0, 407.0), radius=543.0, k1=-25.0, k2=-6.0, t1=1.5, t2=1.0)
    return gen.make_grid(
        (768, 768),
        pitch_px=60.0,
        offset=offset,
        profile="gauss",
        width_px=8.0,
        edge_px=40.0,
        background=(0.01, 0.02),
        lit_axes=(0.42, 0.42),
        field=field,
        seed=seed,
    )


def _left_out(lattice):
    return sum(reason == "soft hole at a lit edge" for reason in lattice.reasons)


def test_calibrate_leaves_out_soft_holes_a_soft_rim_biases(monkeypatch):
    grid = _rim_plate(seed=5)

    def residual(cal):
        yy, xx = np.nonzero(cal.mask[::4, ::4] == 0)
        return gen.frame_residual(grid, cal, np.column_stack([yy * 4.0, xx * 4.0]))

    cal = calibrate(grid.image)
    left_out = _left_out(cal.lattice)
    assert left_out > 10
    rms, worst = residual(cal)
    assert rms < 0.08
    assert worst < 0.4
    # dropping a gross miss later indexes the holes again: the ones left out stay out
    gross = int(np.flatnonzero(cal.lattice.valid)[0])
    again = _index_without(np.asarray(cal.holes.peaks), [gross], cal.lattice, "unpredicted")
    assert _left_out(again) == left_out
    assert again.n_valid == cal.lattice.n_valid - 1
    monkeypatch.setattr(ccdgrid.lit_edge, "SOFT_RATIO", np.inf)
    every = calibrate(grid.image)
    assert _left_out(every.lattice) == 0
    assert residual(every)[0] > 3 * rms


def test_a_combined_calibration_leaves_them_out_of_every_image():
    images = [
        _rim_plate(seed=8 + k, offset=offset).image
        for k, offset in enumerate([(0.3, 0.6), (0.55, 0.15)])
    ]
    cal = calibrate_combined(images, cv_folds=0)
    mine = _left_out(calibrate(images[0], cv_folds=0).lattice)
    assert mine > 10
    assert _left_out(cal.lattice) > mine + 10  # the second image's too
