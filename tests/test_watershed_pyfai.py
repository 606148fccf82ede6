"""Parity of ccdgrid.watershed with pyFAI 2026.9 ``InverseWatershed`` (the oracle)."""

import numpy as np
import pytest
from scipy import signal

from ccdgrid.watershed import InverseWatershed, merge_singletons, segment

pyfai_ws = pytest.importorskip("pyFAI.ext.watershed", reason="pyFAI is the parity oracle")


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


def grid_image(shape, pitch, diameter, angle, seed):
    """Anti-aliased bright discs on a rotated square lattice, Poisson noise.

    Background 100 counts, holes 100 + 2e4 counts, the disc edge linear over
    one pixel (coverage ~ clip(r0 + 0.5 - r, 0, 1)).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u = (c * xx + s * yy) / pitch + 0.31
    v = (-s * xx + c * yy) / pitch + 0.17
    r = np.hypot(u - np.round(u), v - np.round(v)) * pitch
    disc = np.clip(diameter / 2 + 0.5 - r, 0.0, 1.0)
    return rng.poisson(100.0 + 2e4 * disc).astype(np.float64)


def tutorial_kernel():
    """The tutorial's 11x11 disc, r² <= 5.5², normalised to sum 1."""
    y, x = np.mgrid[-5:6, -5:6]
    k = (x * x + y * y <= 5.5**2).astype(np.float64)
    return k / k.sum()


@pytest.fixture(scope="module", params=[(256, 256, 41.0, 0.03, 1), (384, 320, 57.0, -0.2, 2)])
def convolved(request):
    h, w, pitch, angle, seed = request.param
    img = grid_image((h, w), pitch, 10.5, angle, seed)
    return signal.convolve2d(img, tutorial_kernel(), "same")


@pytest.fixture(scope="module")
def oracle(convolved):
    iw = pyfai_ws.InverseWatershed(convolved)
    iw.init()
    return iw


def test_labels_and_borders_match_pyfai(convolved, oracle, backend):
    seg = segment(convolved, backend=backend)
    assert seg.labels.dtype == oracle.labels.dtype  # int32, as pyFAI keeps them
    np.testing.assert_array_equal(seg.labels, oracle.labels)
    np.testing.assert_array_equal(seg.borders, oracle.borders)


def test_region_table_matches_pyfai(convolved, oracle, backend):
    seg = segment(convolved, backend=backend)
    has = np.diff(seg.border_ptr) > 0
    # pyFAI drops the regions without neighbours
    np.testing.assert_array_equal(seg.peak[has], sorted(oracle.regions))
    rows = np.flatnonzero(has)
    ref = [oracle.regions[int(seg.peak[r])] for r in rows]
    np.testing.assert_array_equal(seg.size[rows], [r.size for r in ref])
    np.testing.assert_array_equal(seg.maxi[rows], np.array([r.maxi for r in ref], np.float32))
    np.testing.assert_array_equal(seg.mini[rows], np.array([r.mini for r in ref], np.float32))
    np.testing.assert_array_equal(
        seg.highest_pass[rows], np.array([r.highest_pass for r in ref], np.float32)
    )
    np.testing.assert_array_equal(seg.pass_to[rows], [r.pass_to for r in ref])
    np.testing.assert_array_equal(
        seg.border_index, np.concatenate([r.get_borders() for r in ref]).astype(np.int64)
    )
    np.testing.assert_array_equal(
        seg.border_neighbor, np.concatenate([r.get_neighbors() for r in ref]).astype(np.int64)
    )


def tutorial_peaks(regions, width, threshold):
    """Cells 17-18 of the tutorial: big regions, then bright peaks, as a sorted set."""
    big = [r for r in set(regions.values()) if r.size > 97]
    return sorted((r.index // width, r.index % width) for r in big if r.maxi > threshold)


def test_tutorial_peaks_after_merge_match_pyfai(convolved, backend):
    # between the background (~100) and the hole centres (~100 + 2e4 * 97/97)
    threshold = 10**3.5
    width = convolved.shape[1]
    ref = pyfai_ws.InverseWatershed(convolved)
    ref.init()
    ref.merge_singleton()
    expected = tutorial_peaks(ref.regions, width, threshold)

    iw = InverseWatershed(convolved, backend=backend)
    iw.init()
    iw.merge_singleton()
    got = tutorial_peaks(iw.regions, width, threshold)
    assert len(expected) >= 16
    assert got == expected


def test_region_count_after_merge_is_close_to_pyfai(convolved, backend):
    ref = pyfai_ws.InverseWatershed(convolved)
    ref.init()
    ref.merge_singleton()
    n_ref = len(set(ref.regions.values()))
    seg = merge_singletons(segment(convolved, backend=backend), convolved, backend=backend)
    n_with_border = int(np.count_nonzero(np.diff(seg.border_ptr) > 0))
    # pyFAI always joins the first recorded neighbour, we the highest: only the
    # choice of target differs, so the number of merges is the same
    assert n_with_border == n_ref


def test_flat_pair_pyfai_takes_first_neighbour_we_take_highest(backend):
    # the same image as test_watershed.fork_image: documents the §1.8 divergence
    image = np.zeros((5, 6))
    image[2, 2:4] = 5.0
    image[0, 1], image[0, 4] = 6.0, 20.0
    image[2, 0], image[2, 5], image[4, 2] = 7.0, 8.0, 6.5
    ref = pyfai_ws.InverseWatershed(image)
    ref.init()
    ref.merge_singleton()
    assert ref.regions[14].index == 1  # dead-code loop: the first neighbour (peak 6)
    iw = InverseWatershed(image, backend=backend)
    iw.init()
    iw.merge_singleton()
    assert iw.regions[14].index == 4  # the highest neighbour (peak 20)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_init_matches_pyfai_on_quantised_noise(seed, backend):
    image = np.random.default_rng(seed).integers(0, 5, size=(48, 61)).astype(np.float64)
    ref = pyfai_ws.InverseWatershed(image)
    ref.init()
    seg = segment(image, backend=backend)
    np.testing.assert_array_equal(seg.labels, ref.labels)
    np.testing.assert_array_equal(seg.borders, ref.borders)
    has = np.diff(seg.border_ptr) > 0
    np.testing.assert_array_equal(seg.peak[has], sorted(ref.regions))
    for r in np.flatnonzero(has):
        region = ref.regions[int(seg.peak[r])]
        assert seg.pass_to[r] == region.pass_to
        assert seg.highest_pass[r] == np.float32(region.highest_pass)
