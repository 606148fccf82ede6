"""ccdgrid.synthetic: ground truth, image content, determinism, validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from ccdgrid import CcdgridError
from ccdgrid import synthetic as syn

# Everything off but the holes: the image is the rendered holes alone.
CLEAN = {
    "noise": "none",
    "taper": False,
    "fibre_pattern": False,
    "vignetting": False,
    "background": 0.0,
    "dtype": np.float64,
}


def _centroids(image, centres, half):
    """Intensity-weighted centroids of square windows around rounded centres."""
    out = []
    for cy, cx in centres:
        y0, x0 = round(cy) - half, round(cx) - half
        win = image[y0 : y0 + 2 * half + 1, x0 : x0 + 2 * half + 1].astype(np.float64)
        yy, xx = np.mgrid[y0 : y0 + 2 * half + 1, x0 : x0 + 2 * half + 1]
        out.append(((win * yy).sum() / win.sum(), (win * xx).sum() / win.sum()))
    return np.array(out)


# -- determinism, output type ----------------------------------------------


def test_same_seed_gives_identical_result():
    a = syn.grid_image((256, 256), seed=3, hot_pixels=4)
    b = syn.grid_image((256, 256), seed=3, hot_pixels=4)
    assert_array_equal(a.image, b.image)
    assert_array_equal(a.holes, b.holes)
    assert_array_equal(a.truth.corner_maps((256, 256))[0], b.truth.corner_maps((256, 256))[0])


def test_different_seed_changes_distortion_and_noise():
    a = syn.grid_image((256, 256), seed=1, offset=(0.0, 0.0))
    b = syn.grid_image((256, 256), seed=2, offset=(0.0, 0.0))
    pts = np.array([[10.0, 20.0], [128.0, 128.0], [250.0, 3.0]])
    assert np.abs(a.truth.displacement(pts) - b.truth.displacement(pts)).max() > 1e-3
    assert not np.array_equal(a.image, b.image)


def test_seed_none_is_recorded_and_reproducible():
    a = syn.grid_image((128, 128), seed=None)
    assert isinstance(a.params["seed"], int)
    b = syn.grid_image((128, 128), seed=a.params["seed"])
    assert_array_equal(a.image, b.image)


def test_changing_the_noise_keeps_the_geometry():
    a = syn.grid_image((256, 256), seed=5, noise="low")
    b = syn.grid_image((256, 256), seed=5, noise="heavy", hot_pixels=3)
    assert_array_equal(a.holes, b.holes)
    assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.image, b.image)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(np.uint16, np.uint16), (np.float32, np.float32), ("float64", np.float64)],
)
def test_output_dtype_and_shape(dtype, expected):
    res = syn.grid_image((200, 330), dtype=dtype, seed=0)
    assert res.image.shape == (200, 330)
    assert res.image.dtype == expected
    assert res.taper_mask.shape == (200, 330)
    assert res.taper_mask.dtype == bool
    m = len(res.holes)
    assert res.holes.shape == res.ideal.shape == res.indices.shape == (m, 2)
    assert res.indices.dtype == np.int64
    assert res.visible.shape == res.cut.shape == (m,)
    assert not np.any(res.visible & res.cut)


def test_uint16_output_is_clipped_at_saturation():
    res = syn.grid_image((128, 128), signal=1e5, seed=0, noise="heavy", vignetting=False)
    assert res.image.max() == 65535


def test_params_record_the_resolved_values():
    res = syn.grid_image((256, 256), distortion="strong", noise="heavy", seed=9)
    p = res.params
    assert p["seed"] == 9
    assert p["noise_multiplier"] == 3.0
    assert p["distortion_px"] == pytest.approx(20.0 * 256 / 2048)
    assert p["shape"] == (256, 256)
    assert len(p["offset"]) == 2


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (256,)}, "`shape`"),
        ({"shape": (0, 256)}, "`shape`"),
        ({"shape": (256.0, 256)}, "`shape`"),
        ({"shape": 256}, "`shape`"),
        ({"pitch_px": 0.0}, "`pitch_px` must be > 0"),
        ({"pitch_px": -3.0}, "`pitch_px` must be > 0"),
        ({"pitch_px": np.nan}, "`pitch_px` must be finite"),
        ({"hole_diameter_px": 0.0}, "`hole_diameter_px`"),
        ({"hole_diameter_px": 120.0}, "smaller than `pitch_px`"),
        ({"rotation_deg": 50.0}, "`rotation_deg`"),
        ({"shear_deg": 10.0}, "`shear_deg`"),
        ({"aspect": 2.0}, "`aspect`"),
        ({"offset": (1.0,)}, "`offset`"),
        ({"distortion": "wild"}, "`distortion`"),
        ({"distortion_px": -1.0}, "`distortion_px`"),
        ({"distortion_px": 150.0}, "`distortion_px` = 150 is too strong"),
        ({"psf_sigma": -1.0}, "`psf_sigma`"),
        ({"psf_tail": 1.0}, "`psf_tail`"),
        ({"signal": 0.0}, "`signal`"),
        ({"background": -1.0}, "`background`"),
        ({"noise": "loud"}, "`noise`"),
        ({"noise": -0.5}, "`noise`"),
        ({"taper": "hexagon"}, "`taper`"),
        ({"hot_pixels": -1}, "`hot_pixels`"),
        ({"hot_pixels": 2.5}, "`hot_pixels`"),
        ({"dead_rows": 300}, "`dead_rows`"),
        ({"dead_cols": True}, "`dead_cols`"),
        ({"dtype": np.int32}, "`dtype`"),
        ({"fibre_pattern": -1.0}, "`fibre_pattern`"),
        ({"fibre_pattern": "yes"}, "`fibre_pattern`"),
        ({"seed": -1}, "`seed`"),
        ({"seed": 1.5}, "`seed`"),
    ],
)
def test_bad_arguments_raise_ccdgrid_error(kwargs, match):
    kwargs = {"shape": (256, 256), **kwargs}
    with pytest.raises(CcdgridError, match=match):
        syn.grid_image(**kwargs)


# -- the lattice and the displacement convention ---------------------------------


def test_lattice_vectors_follow_rotation_shear_and_aspect():
    res = syn.grid_image(
        (256, 256), pitch_px=90.0, rotation_deg=0.8, shear_deg=0.3, aspect=1.01, seed=0
    )
    a1, a2 = res.lattice.a1, res.lattice.a2
    assert np.hypot(*a2) == pytest.approx(90.0, rel=1e-12)
    assert np.hypot(*a1) == pytest.approx(90.9, rel=1e-12)
    # a2 is the x axis turned by rotation_deg towards +y
    assert np.degrees(np.arctan2(a2[0], a2[1])) == pytest.approx(0.8, abs=1e-10)
    cos_angle = a1 @ a2 / (np.hypot(*a1) * np.hypot(*a2))
    assert np.degrees(np.arccos(cos_angle)) == pytest.approx(90.3, abs=1e-10)


def test_ideal_positions_are_the_lattice_nodes():
    res = syn.grid_image((300, 300), seed=4)
    lat = res.lattice
    expected = lat.origin + res.indices[:, :1] * lat.a1 + res.indices[:, 1:] * lat.a2
    assert_allclose(res.ideal, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("distortion", ["none", "frelon", "strong"])
def test_hole_plus_displacement_is_its_ideal_position(distortion):
    res = syn.grid_image((512, 512), distortion=distortion, seed=11)
    assert len(res.holes) > 10
    assert_allclose(res.holes + res.truth.displacement(res.holes), res.ideal, rtol=0, atol=1e-6)


def test_holes_listed_are_exactly_those_centred_in_the_image():
    res = syn.grid_image((300, 260), seed=2)
    y, x = res.holes.T
    assert np.all((y >= -0.5) & (y < 299.5) & (x >= -0.5) & (x < 259.5))
    # every lattice neighbour of a listed hole that is not listed lies outside
    lat = res.lattice
    neighbours = np.concatenate([res.indices + d for d in ((1, 0), (-1, 0), (0, 1), (0, -1))])
    known = {tuple(ij) for ij in res.indices}
    missing = np.array([ij for ij in neighbours if tuple(ij) not in known])
    p = res.truth.detector_position(lat.ideal(missing))
    outside = (p[:, 0] < -0.5) | (p[:, 0] >= 299.5) | (p[:, 1] < -0.5) | (p[:, 1] >= 259.5)
    assert np.all(outside)


def test_corner_maps_equal_displacement_at_the_corners():
    truth = syn.make_distortion((96, 128), distortion_px=3.0, seed=8)
    dy, dx = truth.corner_maps((96, 128))
    assert dy.shape == dx.shape == (97, 129)
    i, j = np.meshgrid(np.arange(97), np.arange(129), indexing="ij")
    corners = np.stack([i.ravel() - 0.5, j.ravel() - 0.5], axis=1)
    d = truth.displacement(corners)
    assert_allclose(dy.ravel(), d[:, 0], rtol=0, atol=1e-12)
    assert_allclose(dx.ravel(), d[:, 1], rtol=0, atol=1e-12)


def test_make_distortion_matches_the_image_truth():
    res = syn.grid_image((256, 256), distortion="strong", seed=21)
    truth = syn.make_distortion((256, 256), distortion="strong", seed=21)
    pts = np.random.default_rng(0).uniform(0, 255, (50, 2))
    assert_array_equal(truth.displacement(pts), res.truth.displacement(pts))


def test_jacobian_matches_finite_differences():
    truth = syn.make_distortion((512, 512), distortion="strong", seed=2)
    pts = np.random.default_rng(1).uniform(0, 511, (40, 2))
    hy, hx = np.array([1e-3, 0.0]), np.array([0.0, 1e-3])
    fd = np.stack(
        [
            (truth.displacement(pts + hy) - truth.displacement(pts - hy)) / 2e-3,
            (truth.displacement(pts + hx) - truth.displacement(pts - hx)) / 2e-3,
        ],
        axis=2,
    )
    assert_allclose(truth.jacobian(pts), fd, rtol=0, atol=1e-8)


def test_detector_position_inverts_the_map():
    truth = syn.make_distortion((512, 512), distortion_px=15.0, seed=3)
    p = np.random.default_rng(2).uniform(-10, 520, (100, 2))
    q = p + truth.displacement(p)
    assert_allclose(truth.detector_position(q), p, rtol=0, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    fraction=st.floats(0.0, 0.03),
    ny=st.integers(64, 400),
    nx=st.integers(64, 400),
)
def test_any_field_round_trips_through_its_inverse(seed, fraction, ny, nx):
    # strain ~ (3-7) x peak / size: 3 % of the size keeps it below the 25 % limit
    peak = fraction * min(ny, nx)
    truth = syn.make_distortion((ny, nx), distortion_px=peak, seed=seed)
    p = np.random.default_rng(seed).uniform(-0.5, [ny - 0.5, nx - 0.5], (64, 2))
    q = p + truth.displacement(p)
    assert_allclose(truth.detector_position(q), p, rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    ("distortion", "lo", "hi"), [("frelon", 0.5, 3.0), ("strong", 10.0, 25.0)]
)
def test_preset_peak_displacement_at_2048(distortion, lo, hi):
    truth = syn.make_distortion((2048, 2048), distortion=distortion, seed=6)
    dy, dx = truth.corner_maps((2048, 2048))
    peak = np.sqrt(dy * dy + dx * dx).max()
    assert lo <= peak <= hi


@pytest.mark.parametrize(("size", "scale"), [(4096, 1.0), (1024, 0.5), (512, 0.25)])
def test_preset_peak_scales_down_below_2048(size, scale):
    truth = syn.make_distortion((size, size), distortion="strong", seed=6)
    g = np.linspace(-0.5, size - 0.5, 257)
    dy, dx = truth.grid(g, g)
    assert np.sqrt(dy * dy + dx * dx).max() == pytest.approx(20.0 * scale, rel=0.01)
    # the local strain stays that of a real taper
    assert truth.max_strain((size, size)) < 0.08


def test_distortion_has_no_affine_part():
    truth = syn.make_distortion((512, 512), distortion="strong", seed=7)
    g = np.linspace(-0.5, 511.5, 65)
    dy, dx = truth.grid(g, g)
    y, x = np.meshgrid(g, g, indexing="ij")
    design = np.stack([np.ones(y.size), y.ravel(), x.ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.stack([dy.ravel(), dx.ravel()], 1), rcond=None)
    assert np.abs(coef[0]).max() < 1e-9  # px (intercept at the corner (-0.5, -0.5) = 0 too)
    assert np.abs(coef[1:]).max() < 1e-12  # px / px


def test_no_distortion_is_zero_everywhere():
    truth = syn.make_distortion((128, 128), distortion="none", seed=6)
    dy, dx = truth.corner_maps((128, 128))
    assert_array_equal(dy, 0.0)
    assert_array_equal(dx, 0.0)


def test_distortion_px_sets_the_peak():
    truth = syn.make_distortion((512, 512), distortion_px=7.0, seed=1)
    dy, dx = truth.grid(np.linspace(-0.5, 511.5, 129), np.linspace(-0.5, 511.5, 129))
    assert np.sqrt(dy * dy + dx * dx).max() == pytest.approx(7.0, rel=1e-9)


# -- image content ---------------------------------------------------------------


@pytest.mark.parametrize("psf_sigma", [0.0, 1.0])
@pytest.mark.parametrize("distortion_px", [0.0, 12.0])
def test_hole_centroid_is_its_true_position(psf_sigma, distortion_px):
    res = syn.grid_image(
        (512, 512),
        psf_sigma=psf_sigma,
        distortion_px=distortion_px,
        rotation_deg=0.9,
        shear_deg=0.3,
        aspect=1.02,
        seed=7,
        **CLEAN,
    )
    half = 10  # hole radius 5.25 px, aspect 1.02, PSF truncated at 4 sigma
    inner = res.visible & np.all((res.holes >= half) & (res.holes <= 511 - half), axis=1)
    assert inner.sum() >= 9
    c = _centroids(res.image, res.holes[inner], half)
    assert np.abs(c - res.holes[inner]).max() < 0.01


def test_hole_area_matches_the_plate_disc():
    # A disc of diameter D on a lattice with |a1| = aspect * |a2| and shear s
    # covers pi D^2 / 4 * aspect * cos(s) pixels before any distortion.
    res = syn.grid_image(
        (256, 256),
        psf_sigma=0.0,
        distortion="none",
        aspect=1.02,
        shear_deg=2.0,
        hole_diameter_px=12.0,
        signal=1.0,
        seed=1,
        **CLEAN,
    )
    k = np.flatnonzero(res.visible)[0]
    cy, cx = np.rint(res.holes[k]).astype(int)
    flux = res.image[cy - 10 : cy + 11, cx - 10 : cx + 11].sum()
    area = np.pi * 36.0 * 1.02 * np.cos(np.radians(2.0))
    # hole brightness varies by 3 % (1 sigma) around `signal`
    assert 0.85 * area < flux < 1.15 * area


def test_holes_are_bright_where_listed_visible():
    res = syn.grid_image((512, 512), seed=12, noise="normal")
    centres = np.rint(res.holes[res.visible]).astype(int)
    values = res.image[centres[:, 0], centres[:, 1]]
    # vignetting and fibre gain stay above ~0.45 inside the taper
    assert values.min() > 0.4 * 3000.0
    between = np.rint(res.holes[res.visible] + 0.5 * res.lattice.a2).astype(int)
    between = between[(between[:, 1] < 512)]
    assert res.image[between[:, 0], between[:, 1]].max() < 200


def test_nothing_is_seen_outside_the_taper():
    from scipy import ndimage

    res = syn.grid_image((512, 512), seed=13, signal=5000.0, background=50.0)
    assert (~res.taper_mask).sum() > 1000
    outside = ndimage.binary_erosion(~res.taper_mask, iterations=3, border_value=1)
    values = res.image[outside].astype(np.float64)
    # smooth background (±8 % amplitude per term), Poisson + read noise
    assert values.mean() == pytest.approx(50.0, rel=0.25)
    assert values.max() < 50.0 * 1.3 + 6 * np.sqrt(50.0 * 1.3 + 2.5**2)


def test_holes_at_the_taper_edge_are_cut():
    res = syn.grid_image((512, 512), seed=14, pitch_px=60.0, hole_diameter_px=10.0)
    assert res.cut.any()
    assert res.visible.any()
    # a visible hole and its surroundings are lit; a cut one reaches the dark
    for k in np.flatnonzero(res.visible):
        cy, cx = np.rint(res.holes[k]).astype(int)
        assert res.taper_mask[cy - 7 : cy + 8, cx - 7 : cx + 8].all()
    for k in np.flatnonzero(res.cut):
        cy, cx = np.rint(res.holes[k]).astype(int)
        win = res.taper_mask[max(cy - 9, 0) : cy + 10, max(cx - 9, 0) : cx + 10]
        assert win.shape != (19, 19) or not win.all()


def test_hot_pixels_and_dead_lines_are_present():
    res = syn.grid_image((256, 256), seed=15, hot_pixels=12, dead_rows=2, dead_cols=3)
    hot = res.defects["hot_pixels"]
    assert 12 <= len(hot) <= 36
    # a dead line may overwrite a hot pixel
    live = ~np.isin(hot[:, 0], res.defects["dead_rows"]) & ~np.isin(
        hot[:, 1], res.defects["dead_cols"]
    )
    assert np.all(res.image[hot[live, 0], hot[live, 1]] >= 1.5 * 3000.0)
    assert len(res.defects["dead_rows"]) == 2
    assert len(res.defects["dead_cols"]) == 3
    assert_array_equal(res.image[res.defects["dead_rows"], :], 0)
    assert_array_equal(res.image[:, res.defects["dead_cols"]], 0)


def test_no_defects_by_default():
    res = syn.grid_image((256, 256), seed=15)
    assert res.defects["hot_pixels"].shape == (0, 2)
    assert res.defects["dead_rows"].size == 0
    assert res.image.max() < 65535


@pytest.mark.parametrize(("noise", "lo", "hi"), [("low", 0.2, 0.5), ("heavy", 2.0, 4.0)])
def test_noise_level_scales(noise, lo, hi):
    kw = {"seed": 16, "taper": False, "fibre_pattern": False, "dtype": np.float32}
    clean = syn.grid_image((256, 256), noise="none", **kw).image
    normal = syn.grid_image((256, 256), noise="normal", **kw).image - clean
    other = syn.grid_image((256, 256), noise=noise, **kw).image - clean
    assert lo < other.std() / normal.std() < hi


# -- dense_residual --------------------------------------------------------------


@pytest.fixture(scope="module")
def field_512():
    return syn.make_distortion((512, 512), distortion_px=5.0, seed=30)


def test_dense_residual_of_the_true_maps_is_interpolation_error(field_512):
    dy, dx = field_512.corner_maps((512, 512))
    res = syn.dense_residual(field_512, dy, dx, n=5000, seed=1)
    # bilinear error <= h^2/8 * max|d''| with h = 1 px; |d''| ~ 5 px * (2 pi / 360 px)^2
    assert res.rms < 1e-3
    assert res.max < 3e-3
    assert res.points.shape == res.residuals.shape == (5000, 2)


def test_dense_residual_removes_an_affine_map_of_the_positions(field_512):
    dy, dx = field_512.corner_maps((512, 512))
    i, j = np.meshgrid(np.arange(513) - 0.5, np.arange(513) - 0.5, indexing="ij")
    # the same calibration in another lattice convention: corrected positions
    # (i + dy, j + dx) moved by one affine map, a 0.2 % scale and a shear
    y, x = i + dy, j + dx
    ay = y + 0.3 + 2e-3 * y + 5e-4 * x - i
    ax = x - 0.1 + 1e-3 * x - j
    res = syn.dense_residual(field_512, ay, ax, n=5000)
    assert res.rms < 1e-3
    assert_allclose(res.affine, [[0.3, 2e-3, 5e-4], [-0.1, 0.0, 1e-3]], atol=1e-4)
    raw = syn.dense_residual(field_512, ay, ax, n=5000, remove_affine=False)
    assert raw.rms > 0.3


def test_dense_residual_does_not_remove_a_scale_of_the_displacement_alone(field_512):
    # d -> 1.01 d is no affine map of the positions: 1 % of a ~5 px field stays
    dy, dx = field_512.corner_maps((512, 512))
    res = syn.dense_residual(field_512, 1.01 * dy, 1.01 * dx, n=5000)
    assert res.rms > 0.01


def test_dense_residual_sees_a_bump(field_512):
    dy, dx = field_512.corner_maps((512, 512))
    i, j = np.meshgrid(np.arange(513) - 0.5, np.arange(513) - 0.5, indexing="ij")
    amp, sigma, big = 0.5, 20.0, 100.0
    r2 = (i - 256.0) ** 2 + (j - 256.0) ** 2
    region = ((np.arange(512)[:, None] - 256.0) ** 2 + (np.arange(512) - 256.0) ** 2) < big**2
    res = syn.dense_residual(
        field_512, dy, dx + amp * np.exp(-r2 / (2 * sigma**2)), region=region, n=40000
    )
    assert np.all(np.hypot(res.points[:, 0] - 256, res.points[:, 1] - 256) < big + 1)
    # over the disc of radius R: E[b] and E[b^2] of b = A exp(-r^2 / 2 s^2)
    area = np.pi * big**2
    mean_b = amp * 2 * np.pi * sigma**2 * (1 - np.exp(-(big**2) / (2 * sigma**2))) / area
    mean_b2 = amp**2 * np.pi * sigma**2 * (1 - np.exp(-(big**2) / sigma**2)) / area
    expected = np.sqrt(mean_b2 - mean_b**2)
    assert res.rms == pytest.approx(expected, rel=0.1)
    assert res.rms_y < 1e-3
    assert 0.4 < res.max < 0.5


def test_dense_residual_skips_masked_pixels_and_nan_corners(field_512):
    dy, dx = field_512.corner_maps((512, 512))
    dx = dx.copy()
    dx[:, 300:] = np.nan
    mask = np.zeros((512, 512), dtype=np.int8)
    mask[:100] = 1
    res = syn.dense_residual(field_512, dy, dx, mask, n=3000)  # positional, as pyFAI masks
    assert np.isfinite(res.rms)
    assert res.points[:, 0].min() >= 99.5
    assert res.points[:, 1].max() <= 299.5


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.zeros((5, 5)), np.zeros((5, 6))), {}, "corner maps"),
        ((np.zeros((5, 5)), np.zeros((5, 5))), {"mask": np.zeros((5, 5))}, "`mask`"),
        ((np.zeros((5, 5)), np.zeros((5, 5))), {"region": np.ones((3, 4))}, "`region`"),
        ((np.zeros((5, 5)), np.zeros((5, 5))), {"mask": np.ones((4, 4))}, "no valid pixel"),
        ((np.zeros((5, 5)), np.zeros((5, 5))), {"n": 0}, "`n`"),
    ],
)
def test_dense_residual_rejects_bad_input(field_512, args, kwargs, match):
    with pytest.raises(CcdgridError, match=match):
        syn.dense_residual(field_512, *args, **kwargs)


# -- full-size smoke test ------------------------------------------------------------


@pytest.mark.slow
def test_frelon_2048_smoke():
    res = syn.frelon_2048(seed=1, hot_pixels=30, dead_rows=1)
    assert res.image.shape == (2048, 2048)
    assert res.image.dtype == np.uint16
    # ~ (2048 / 98)^2 lattice nodes in the image, most of them inside the taper
    assert 400 < len(res.holes) < 480
    assert res.visible.sum() > 0.75 * len(res.holes)
    assert 10.0 <= res.params["distortion_px"] <= 25.0
    assert_allclose(res.holes + res.truth.displacement(res.holes), res.ideal, atol=1e-6)


# -- detector model details ------------------------------------------------------------


@pytest.mark.parametrize("rows_along_x", [True, False])
def test_fibre_cells_are_whole_hexagons_across_the_period_seam(rows_along_x):
    from scipy import ndimage

    from ccdgrid._synthetic_render import _HexPattern

    pitch = 7.3
    pattern = _HexPattern((400, 300), pitch, rows_along_x, periods=4, width=1.2)
    seam = pattern.period
    index, _ = pattern.cells(seam - 40, seam + 40)
    hexagon = np.sqrt(3.0) / 2.0 * pitch**2
    areas = []
    for value in np.unique(index):
        labels, count = ndimage.label(index == value)
        assert count >= 1
        for k in range(1, count + 1):
            ys, xs = np.nonzero(labels == k)
            # cells cut by the window border are not whole
            if ys.min() > 0 and ys.max() < 79 and xs.min() > 0 and xs.max() < 299:
                areas.append(len(ys))
    areas = np.array(areas)
    assert len(areas) > 300
    # a cell split at the seam would show up as a half-size piece
    assert areas.min() > 0.75 * hexagon
    assert areas.max() < 1.25 * hexagon
    assert np.median(areas) == pytest.approx(hexagon, rel=0.05)


def test_circular_taper_darkens_the_corners():
    res = syn.grid_image((256, 256), taper="circle", seed=2)
    assert res.params["taper"] == "circle"
    assert not res.taper_mask[0, 0]
    assert not res.taper_mask[255, 255]
    assert res.taper_mask[128, 128]
    # radius 0.95 x the half-size: the lit fraction is about pi/4 * 0.95^2
    assert res.taper_mask.mean() == pytest.approx(np.pi / 4 * 0.95**2, abs=0.01)


def test_no_taper_lights_the_whole_image():
    res = syn.grid_image((256, 256), taper=False, seed=2)
    assert res.taper_mask.all()


def test_psf_tail_keeps_centroid_and_flux():
    base = {"distortion": "frelon", "seed": 5, "psf_sigma": 1.0, **CLEAN}
    sharp = syn.grid_image((384, 384), **base)
    tailed = syn.grid_image((384, 384), psf_tail=0.05, psf_tail_sigma=6.0, **base)
    half = 26  # 4 sigma of the tail plus the hole radius
    inner = tailed.visible & np.all((tailed.holes >= half) & (tailed.holes <= 383 - half), axis=1)
    assert inner.sum() >= 4
    c = _centroids(tailed.image, tailed.holes[inner], half)
    assert np.abs(c - tailed.holes[inner]).max() < 0.01
    k = np.flatnonzero(inner)[0]
    cy, cx = np.rint(tailed.holes[k]).astype(int)
    window = (slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
    assert tailed.image[window].sum() == pytest.approx(sharp.image[window].sum(), rel=1e-4)
    # Beyond 10 px only the tail remains: 5 % of the flux times the mass of a
    # 2-D Gaussian of variance 6^2 + R^2 / 4 (tail + disc) beyond that radius.
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    far = np.hypot(yy, xx) > 10
    fraction = tailed.image[window][far].sum() / tailed.image[window].sum()
    expected = 0.05 * np.exp(-(10.0**2) / (2 * (6.0**2 + 5.25**2 / 4)))
    assert fraction == pytest.approx(expected, rel=0.15)
    assert sharp.image[window][far].sum() < 1e-6 * sharp.image[window].sum()


@pytest.mark.parametrize("strength", [False, 0.0])
def test_fibre_pattern_off_gives_a_smooth_background(strength):
    res = syn.grid_image(
        (256, 256),
        fibre_pattern=strength,
        noise="none",
        taper=False,
        vignetting=False,
        signal=1.0,
        dtype=np.float32,
        seed=3,
    )
    # smooth background only (plus holes): tiny pixel-to-pixel steps away from holes
    steps = np.abs(np.diff(res.image, axis=1))
    assert np.median(steps) < 0.05


def test_corner_maps_give_pyfai_the_ideal_corner_positions():
    """pyFAI's set_dy/set_dx put corner (i, j) at the ideal position of that corner."""
    detector_mod = pytest.importorskip("pyFAI.detectors")
    shape = (48, 64)
    truth = syn.make_distortion(shape, distortion_px=2.0, seed=4)
    dy, dx = truth.corner_maps(shape)
    det = detector_mod.Detector(pixel1=1e-4, pixel2=1e-4, max_shape=shape)
    det.set_dy(dy)
    det.set_dx(dx)
    corners = det.get_pixel_corners()  # (ny, nx, 4, 3) metres; corner A = (i, j)
    # pyFAI coordinates are index coordinates + 0.5
    got = np.stack([corners[:, :, 0, 1] / 1e-4 - 0.5, corners[:, :, 0, 2] / 1e-4 - 0.5], -1)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    nominal = np.stack([i - 0.5, j - 0.5], axis=-1).reshape(-1, 2)
    ideal = nominal + truth.displacement(nominal)
    assert_allclose(got.reshape(-1, 2), ideal, rtol=0, atol=1e-4)  # float32 metres
