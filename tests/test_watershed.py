"""Inverse watershed: kernel against its numpy twin, invariants, bad input, façade."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ccdgrid import CcdgridError
from ccdgrid._ext import _watershed
from ccdgrid._reference import watershed as _twin
from ccdgrid._reference.watershed import NEIGHBOUR_OFFSETS
from ccdgrid.watershed import InverseWatershed, Segmentation, merge_singletons, segment

FIELDS = (
    "labels",
    "borders",
    "peak",
    "size",
    "maxi",
    "mini",
    "highest_pass",
    "pass_to",
    "border_ptr",
    "border_index",
    "border_neighbor",
    "basin_peak",
    "basin_region",
    "peaks_ptr",
    "peaks",
)


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


def assert_same(a, b):
    """Every field equal, dtype included; NaN == NaN for the float fields."""
    assert a.shape == b.shape
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def both(image):
    """(cython, numpy) results of segment and of merge_singletons."""
    sc = segment(image, backend="cython")
    sn = segment(image, backend="numpy")
    return sc, sn, merge_singletons(sc, image), merge_singletons(sn, image, backend="numpy")


def images():
    rng = np.random.default_rng(20260901)
    nan_img = rng.normal(size=(40, 37))
    nan_img[rng.random(nan_img.shape) < 0.1] = np.nan
    nan_img[rng.random(nan_img.shape) < 0.03] = -np.inf
    plateau = np.zeros((30, 40))
    plateau[5:12, 8:20] = 7.0  # a flat-topped maximum
    plateau[20:25, 25:35] = 3.0
    plateau[20:25, 30] = 3.5
    return {
        "normal": rng.normal(size=(64, 51)),
        "quantised": rng.integers(0, 4, size=(57, 63)),
        "plateaus": plateau,
        "constant": np.full((9, 12), 5.0),
        "nan_inf": nan_img,
        "1x1": np.array([[3.0]]),
        "1xN": rng.integers(0, 3, size=(1, 29)),
        "Nx1": rng.integers(0, 3, size=(31, 1)),
        "uint16": rng.integers(0, 4, size=(33, 40)).astype(np.uint16),
        "int32": rng.integers(-3, 3, size=(33, 40)).astype(np.int32),
        "float32": rng.normal(size=(33, 40)).astype(np.float32),
        "view": rng.normal(size=(80, 90))[::2, 3::3],
        "transposed": rng.integers(0, 5, size=(30, 20)).T,
    }


@pytest.mark.parametrize(("name", "image"), list(images().items()))
def test_cython_matches_numpy_twin(name, image):
    sc, sn, mc, mn = both(image)
    assert_same(sc, sn)
    assert_same(mc, mn)


#: Fields of segment_kernel's tuple, and of merge_kernel's, whose dtype is the index dtype.
SEGMENT_INDEX_FIELDS = (0, 9, 10)  # labels, border_index, border_neighbor
MERGE_INDEX_FIELDS = (8, 9)  # patch_index, patch_neighbor


@pytest.mark.parametrize(("name", "image"), list(images().items()))
def test_int64_index_arrays_match_int32(name, image):
    # images of 2**31 pixels or more get int64 index arrays: same values, forced here
    data = np.ascontiguousarray(image, dtype=np.float64)
    narrow = _watershed.segment_kernel(data)
    wide = _watershed._segment(data, True)
    for k, (x, y) in enumerate(zip(narrow, wide, strict=True)):
        if k in SEGMENT_INDEX_FIELDS:
            assert (x.dtype, y.dtype) == (np.int32, np.int64), k
        else:
            assert x.dtype == y.dtype, k
        np.testing.assert_array_equal(x, y, err_msg=str(k))
    merged_narrow = _watershed.merge_kernel(data, *narrow)
    merged_wide = _watershed.merge_kernel(data, *wide)
    for k, (x, y) in enumerate(zip(merged_narrow, merged_wide, strict=True)):
        if k in MERGE_INDEX_FIELDS:
            assert (x.dtype, y.dtype) == (np.int32, np.int64), k
        else:
            assert x.dtype == y.dtype, k
        np.testing.assert_array_equal(x, y, err_msg=str(k))


@pytest.mark.parametrize(
    ("n_pixels", "dtype"),
    [(1, np.int32), (2**31 - 1, np.int32), (2**31, np.int64), (46341**2, np.int64)],
)
def test_index_dtype_switches_at_2_31_pixels(n_pixels, dtype):
    assert _watershed.index_dtype(n_pixels) == dtype
    assert _twin.index_dtype(n_pixels) == dtype


def test_index_arrays_are_int32(backend):
    rng = np.random.default_rng(12)
    image = rng.normal(size=(30, 35))
    seg = segment(image, backend=backend)
    merged = merge_singletons(seg, image, backend=backend)
    for s in (seg, merged):
        for name in ("labels", "border_index", "border_neighbor"):
            assert getattr(s, name).dtype == np.int32, name
        for name in ("peak", "size", "pass_to", "border_ptr", "basin_peak", "peaks"):
            assert getattr(s, name).dtype == np.int64, name


def test_float64_compared_as_float32(backend):
    # float64 values that differ only below float32 resolution tie in float32
    rng = np.random.default_rng(31)
    image = rng.integers(0, 3, size=(30, 41)) + rng.uniform(0.0, 1e-9, size=(30, 41))
    as32 = image.astype(np.float32)
    assert_same(segment(image, backend=backend), segment(as32, backend=backend))
    m64 = merge_singletons(segment(image, backend=backend), image, backend=backend)
    m32 = merge_singletons(segment(as32, backend=backend), as32, backend=backend)
    assert_same(m64, m32)


def test_merged_border_of_reads_the_assembled_csr(backend):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 3, size=(40, 45)).astype(np.float64)
    merged = merge_singletons(segment(image, backend=backend), image, backend=backend)
    assert merged.is_merged
    # border_of answers from the basins' table and the patch, before any assembly
    parts = [merged.border_of(r) for r in range(merged.n_regions)]
    ptr, index, neighbor = merged.border_ptr, merged.border_index, merged.border_neighbor
    assert ptr.shape == (merged.n_regions + 1,)
    for r, (idx, nbr) in enumerate(parts):
        np.testing.assert_array_equal(idx, index[ptr[r] : ptr[r + 1]])
        np.testing.assert_array_equal(nbr, neighbor[ptr[r] : ptr[r + 1]])


def check_invariants(seg, image):
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    n = h * w
    labels = seg.labels.ravel()
    assert seg.labels.dtype == np.int32
    assert seg.borders.dtype == np.uint8
    assert seg.size.sum() == n
    assert np.all(np.diff(seg.peak) > 0)
    # every basin label is a pixel with no strictly greater 3x3 neighbour
    # (a -inf pixel is its own basin whatever its neighbours, as in pyFAI)
    peaks = np.unique(labels)
    np.testing.assert_array_equal(peaks, seg.basin_peak)
    padded = np.pad(img, 1, constant_values=-np.inf)
    py, px = np.divmod(peaks[~np.isneginf(img.ravel()[peaks])], w)
    for dy, dx in NEIGHBOUR_OFFSETS:
        assert not np.any(padded[py + 1 + dy, px + 1 + dx] > img[py, px])
    # border bitmask consistent with the labels
    padded_lab = np.pad(seg.labels, 1, constant_values=-1)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        nb = padded_lab[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        expect = (nb != seg.labels) & (nb != -1)
        np.testing.assert_array_equal((seg.borders >> k) & 1 == 1, expect)
    # the basin CSR lists exactly the bordered pixels, raster order per region
    assert seg.border_ptr[0] == 0
    assert seg.border_ptr[-1] == seg.border_index.size
    assert np.all(np.diff(seg.border_ptr) >= 0)
    if not seg.is_merged:
        np.testing.assert_array_equal(np.sort(seg.border_index), np.flatnonzero(seg.borders))
    owner = np.repeat(np.arange(seg.n_regions), np.diff(seg.border_ptr))
    rows = seg.region_of_pixels().ravel()
    np.testing.assert_array_equal(rows[seg.border_index], owner)
    same_owner = owner[1:] == owner[:-1]
    assert np.all(np.diff(seg.border_index)[same_owner] > 0)
    # the recorded neighbour is another basin's label, touching the pixel
    assert np.all(labels[seg.border_index] != seg.border_neighbor)
    if seg.border_neighbor.size:
        np.testing.assert_array_equal(
            rows[seg.border_neighbor] != owner, np.ones(owner.size, dtype=bool)
        )
    # per-region sums from the pixel map agree with the table
    np.testing.assert_array_equal(np.bincount(rows, minlength=seg.n_regions), seg.size)
    np.testing.assert_array_equal(seg.maxi, img.ravel()[seg.peak])
    np.testing.assert_array_equal(np.sort(seg.peaks), seg.basin_peak)


@pytest.mark.parametrize(("name", "image"), list(images().items()))
def test_invariants(name, image, backend):
    seg = segment(image, backend=backend)
    check_invariants(seg, image)
    check_invariants(merge_singletons(seg, image, backend=backend), image)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=np.int8,
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
        elements=st.integers(0, 3),
    )
)
def test_property_engines_agree_on_few_levels(image):
    sc, sn, mc, mn = both(image)
    assert_same(sc, sn)
    assert_same(mc, mn)
    check_invariants(sc, image)
    check_invariants(mc, image)


def test_known_small_image(backend):
    # 0 1 0 0 3     peaks at 1 (value 1... climbs to itself) and 4; hand-checked
    image = np.array([[0, 1, 0, 0, 3]], dtype=np.float64)
    seg = segment(image, backend=backend)
    np.testing.assert_array_equal(seg.labels, [[1, 1, 1, 4, 4]])
    np.testing.assert_array_equal(seg.borders, [[0, 0, 8, 128, 0]])
    np.testing.assert_array_equal(seg.peak, [1, 4])
    np.testing.assert_array_equal(seg.size, [3, 2])
    np.testing.assert_array_equal(seg.border_ptr, [0, 1, 2])
    np.testing.assert_array_equal(seg.border_index, [2, 3])
    np.testing.assert_array_equal(seg.border_neighbor, [4, 1])
    np.testing.assert_array_equal(seg.mini, [0, 0])
    np.testing.assert_array_equal(seg.highest_pass, [0, 0])
    np.testing.assert_array_equal(seg.pass_to, [4, 1])


def test_first_maximum_in_raster_order_wins(backend):
    image = np.zeros((5, 5))
    image[1, 1] = image[3, 3] = 2.0  # both are neighbours of (2, 2)
    image[2, 2] = 1.0
    seg = segment(image, backend=backend)
    assert seg.labels[2, 2] == 1 * 5 + 1


def test_nan_never_climbs_nor_attracts(backend):
    image = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 5.0], [1.0, 2.0, 0.0]])
    seg = segment(image, backend=backend)
    assert seg.labels[1, 1] == 4  # its own one-pixel basin
    assert np.count_nonzero(seg.labels == 4) == 1
    i = np.searchsorted(seg.peak, 4)
    assert np.isnan(seg.maxi[i])
    assert np.isnan(seg.mini[i])


def test_plateau_chain_merges_into_higher_neighbour(backend):
    # 0 5 5 0 9: basins {0,1} (peak 1) and {2} are plateau singletons (maxi == mini
    # == 5 over their border); {3,4} peaks at 9. Peak 1 joins its only neighbour
    # (basin 2), the pair is still flat and joins basin 4, whose 9 keeps the peak.
    image = np.array([[0.0, 5.0, 5.0, 0.0, 9.0]])
    seg = segment(image, backend=backend)
    np.testing.assert_array_equal(seg.peak, [1, 2, 4])
    np.testing.assert_array_equal(seg.mini, [5.0, 5.0, 0.0])
    merged = merge_singletons(seg, image, backend=backend)
    np.testing.assert_array_equal(merged.peak, [4])
    np.testing.assert_array_equal(merged.size, [5])
    np.testing.assert_array_equal(merged.peaks, [1, 2, 4])
    np.testing.assert_array_equal(merged.basin_region, [0, 0, 0])
    np.testing.assert_array_equal(merged.mini, [0.0])


def test_no_singleton_left_around_a_plateau(backend):
    # a flat 9-valued top inside a ring of 10s: every plateau pixel is a
    # one-pixel basin (its neighbours climb to the ring), so all are singletons
    image = np.zeros((6, 7))
    image[2:4, 2:5] = 9.0
    image[[0, 5], :] = 10.0
    image[:, [0, 6]] = 10.0
    seg = segment(image, backend=backend)
    plateau_rows = np.searchsorted(seg.peak, np.flatnonzero(image == 9.0))
    np.testing.assert_array_equal(seg.size[plateau_rows], np.ones(6))
    merged = merge_singletons(seg, image, backend=backend)
    has_border = np.diff(merged.border_ptr) > 0
    assert not np.any((merged.maxi == merged.mini) & has_border)
    assert merged.size.sum() == image.size


def fork_image():
    """A flat 2-px top (5) whose first border pixel records a low basin (6 at
    (0, 1)) and whose second records a high one (20 at (0, 4)).

    Every other neighbour of the top sees a value above 5 in its own window,
    so both top pixels are one-pixel basins.
    """
    image = np.zeros((5, 6))
    image[2, 2:4] = 5.0
    image[0, 1], image[0, 4] = 6.0, 20.0
    image[2, 0], image[2, 5], image[4, 2] = 7.0, 8.0, 6.5
    return image


def test_flat_region_joins_highest_neighbour_not_first(backend):
    image = fork_image()
    seg = segment(image, backend=backend)
    rows = np.searchsorted(seg.peak, [14, 15])
    np.testing.assert_array_equal(seg.peak[rows], [14, 15])
    np.testing.assert_array_equal(seg.size[rows], [1, 1])
    np.testing.assert_array_equal(seg.pass_to[rows], [1, 4])  # N neighbours
    merged = merge_singletons(seg, image, backend=backend)
    region = merged.region_of_pixels()
    # the equal pair merges first, then the flat pair joins the 20, not the 6
    assert region[2, 2] == region[2, 3] == region[0, 4]
    assert merged.peak[region[2, 2]] == 4
    assert region[0, 1] != region[2, 2]


def test_constant_image_merges_into_one_region(backend):
    image = np.full((4, 5), 2.0)
    seg = segment(image, backend=backend)
    assert seg.n_regions == 20
    merged = merge_singletons(seg, image, backend=backend)
    assert merged.n_regions == 1
    assert merged.size[0] == 20
    assert merged.border_index.size == 0
    assert merged.pass_to[0] == -1
    assert np.isnan(merged.highest_pass[0])


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros(5), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.zeros((0, 4)), "empty"),
        (np.zeros((3, 3), dtype=complex), "real numbers"),
        (np.array([[1, "a"]], dtype=object), "real numbers"),
    ],
)
def test_bad_image(image, match, backend):
    with pytest.raises(CcdgridError, match=match):
        segment(image, backend=backend)


def test_bad_backend():
    with pytest.raises(CcdgridError, match="backend"):
        segment(np.zeros((3, 3)), backend="fortran")


def test_merge_rejects_mismatched_inputs(backend):
    seg = segment(np.zeros((4, 4)), backend=backend)
    with pytest.raises(CcdgridError, match="shape"):
        merge_singletons(seg, np.zeros((4, 5)), backend=backend)
    with pytest.raises(CcdgridError, match="Segmentation"):
        merge_singletons(seg.labels, np.zeros((4, 4)), backend=backend)
    merged = merge_singletons(seg, np.zeros((4, 4)), backend=backend)
    with pytest.raises(CcdgridError, match="already merged"):
        merge_singletons(merged, np.zeros((4, 4)), backend=backend)


def test_segmentation_is_frozen():
    seg = segment(np.zeros((2, 2)))
    assert isinstance(seg, Segmentation)
    with pytest.raises(AttributeError):
        seg.size = None


def test_facade_regions_share_merged_objects(backend):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 3, size=(20, 24)).astype(np.float64)
    iw = InverseWatershed(image, backend=backend)
    iw.init()
    iw.merge_singleton()
    seg = iw.segmentation
    regions = iw.regions
    distinct = set(regions.values())
    assert len(distinct) <= seg.n_regions
    for r in distinct:
        for label in r.peaks:
            assert regions[label] is r
        assert r.get_size() == r.size
        assert r.get_index() == r.index
        assert len(r.get_borders()) == len(r.get_neighbors())
    assert sum(r.size for r in distinct) <= image.size


def test_facade_peaks_from_area(backend):
    image = np.zeros((20, 20))
    image[5, 5], image[5, 14], image[14, 9] = 10.0, 30.0, 20.0
    iw = InverseWatershed(image, backend=backend)
    iw.init()
    mask = np.zeros(image.shape, dtype=bool)
    mask[3:17, 3:17] = True
    out = iw.peaks_from_area(mask, refine=False, Imin=5.0)
    np.testing.assert_array_equal(out, [[5.0, 14.0], [14.0, 9.0], [5.0, 5.0]])
    out = iw.peaks_from_area(mask, refine=False, keep=2)
    np.testing.assert_array_equal(out, [[5.0, 14.0], [14.0, 9.0]])
    with pytest.raises(CcdgridError, match="mask"):
        iw.peaks_from_area(np.zeros((3, 3), dtype=bool))
