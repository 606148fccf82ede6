"""Fit2D spline files: pyFAI reads ours, we read pyFAI's and Fit2D's, errors name the line."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.interpolate import bisplev

from ccdgrid.errors import CcdgridError
from ccdgrid.spline import SplineMaps, SplineToleranceWarning, read_spline, write_spline

pyFAI_detectors = pytest.importorskip("pyFAI.detectors")
pyFAI_spline = pytest.importorskip("pyFAI.spline")

# non-square, so that an x/y swap anywhere changes the shape or the values
NY, NX = 150, 230
PIXEL = (50e-6, 75e-6)  # (pixel1 = y, pixel2 = x), metres
TOLERANCE = 0.01  # px, the contract of write_spline


def field(ny, nx, amplitude):
    """Analytic corner maps (dy, dx) on the (ny + 1, nx + 1) grid: barrel + ripple, off-centre."""
    i, j = np.mgrid[0 : ny + 1, 0 : nx + 1].astype(np.float64)
    cy, cx = 0.45 * ny, 0.55 * nx
    r2 = ((i - cy) ** 2 + (j - cx) ** 2) / (0.5 * max(ny, nx)) ** 2
    dx = 0.5 * amplitude * (j - cx) / (0.5 * nx) * r2 + 0.1 * amplitude * np.sin(i / 40.0)
    dy = 0.5 * amplitude * (i - cy) / (0.5 * ny) * r2 + 0.07 * amplitude * np.cos(j / 35.0)
    return dy, dx


def ellipse_pixels(ny, nx, fill=0.45):
    """Valid pixels: an off-centre ellipse, like the hull of the holes (True = valid)."""
    i, j = np.mgrid[0:ny, 0:nx]
    return ((i - 0.5 * ny) / (fill * ny)) ** 2 + ((j - 0.48 * nx) / (fill * nx)) ** 2 < 1


def corners_of(pixels):
    corners = np.zeros((pixels.shape[0] + 1, pixels.shape[1] + 1), dtype=bool)
    for di in (0, 1):
        for dj in (0, 1):
            corners[di : di + pixels.shape[0], dj : dj + pixels.shape[1]] |= pixels
    return corners


def pyfai_corner_displacement(detector):
    """(dy, dx) in px of corners A, B, C, D of every pixel, as pyFAI places them: (ny, nx, 4)."""
    corners = detector.get_pixel_corners().astype(np.float64)
    ny, nx = detector.shape
    i, j = np.mgrid[0:ny, 0:nx]
    # A=(i,j), B=(i+1,j), C=(i+1,j+1), D=(i,j+1) in pyFAI coordinates
    oi = np.array([0, 1, 1, 0])
    oj = np.array([0, 0, 1, 1])
    dy = corners[..., 1] / detector.pixel1 - (i[..., None] + oi)
    dx = corners[..., 2] / detector.pixel2 - (j[..., None] + oj)
    return dy, dx


def corner_values(corner_map):
    """The corner map's values at corners A, B, C, D of every pixel: (ny, nx, 4)."""
    return np.stack(
        [corner_map[:-1, :-1], corner_map[1:, :-1], corner_map[1:, 1:], corner_map[:-1, 1:]],
        axis=-1,
    )


# -- pyFAI reads what we write ---------------------------------------------------


@pytest.mark.parametrize("amplitude", [3.0, 20.0], ids=["smooth-3px", "strong-20px"])
def test_pyfai_detector_corners_match_maps_in_valid_region(tmp_path, amplitude):
    dy, dx = field(NY, NX, amplitude)
    valid = ellipse_pixels(NY, NX)
    outside = ~corners_of(valid)
    # what lies outside the valid region must not matter: NaN in dx, a far-off constant in dy
    dx_in = np.where(outside, np.nan, dx)
    dy_in = np.where(outside, 50.0, dy)
    path = tmp_path / "det.spline"
    fit = write_spline(path, dy_in, dx_in, pixel_size=PIXEL, valid_region=valid)

    det = pyFAI_detectors.Detector(splinefile=str(path))
    assert det.shape == (NY, NX)
    assert det.max_shape == (NY, NX)
    assert_allclose((det.pixel1, det.pixel2), PIXEL, rtol=1e-7)
    got_dy, got_dx = pyfai_corner_displacement(det)
    err = np.maximum(np.abs(got_dy - corner_values(dy)), np.abs(got_dx - corner_values(dx)))
    assert err[valid].max() <= TOLERANCE
    # what write_spline reports is what pyFAI gets, to the float32 corners (metres)
    assert err[valid].max() == pytest.approx(fit.max_error, abs=5e-4)
    assert fit.max_error <= TOLERANCE


def test_pyfai_spline_object_reads_header_and_knots(tmp_path):
    dy, dx = field(NY, NX, 5.0)
    path = tmp_path / "det.spline"
    fit = write_spline(path, dy, dx, pixel_size=PIXEL, grid_spacing=5e-3)
    spline = pyFAI_spline.Spline(str(path))
    assert (spline.xmin, spline.ymin, spline.xmax, spline.ymax) == (0.0, 0.0, NX, NY)
    assert spline.grid == pytest.approx(5000.0)  # µm
    assert spline.pixelSize == pytest.approx((75.0, 50.0))  # µm, (x, y) order
    assert spline.getDetectorSize() == (NY, NX)
    x_tck, y_tck = fit.spline.x_tck, fit.spline.y_tck
    assert_allclose(spline.xSplineKnotsX, x_tck[0], rtol=1e-7)
    assert_allclose(spline.xSplineKnotsY, x_tck[1], rtol=1e-7)
    assert_allclose(spline.ySplineCoeff, y_tck[2], rtol=1e-6, atol=1e-6)
    # pyFAI's own evaluation on the corner grid, (ny + 1, nx + 1) [y, x]
    x_disp, y_disp = spline.spline2array()
    assert x_disp.shape == (NY + 1, NX + 1)
    assert np.abs(x_disp - dx).max() <= TOLERANCE
    assert np.abs(y_disp - dy).max() <= TOLERANCE


def test_file_layout_is_fit2d_fixed_width(tmp_path):
    dy, dx = field(20, 30, 2.0)
    path = tmp_path / "small.spline"
    write_spline(path, dy, dx, pixel_size=(100e-6, 100e-6), grid_spacing=2.5e-3)
    lines = path.read_text().split("\n")
    assert lines[:8] == [
        "SPATIAL DISTORTION SPLINE INTERPOLATION COEFFICIENTS",
        "",
        "  VALID REGION",
        " 0.0000000E+00 0.0000000E+00 3.0000000E+01 2.0000000E+01",
        "",
        "  GRID SPACING, X-PIXEL SIZE, Y-PIXEL SIZE",
        " 2.5000000E+03 1.0000000E+02 1.0000000E+02",
        "",
    ]
    assert lines[8] == "  X-DISTORTION"
    nkx, nky = int(lines[9][:6]), int(lines[9][6:12])
    assert len(lines[9]) == 12
    block = lines[10 : lines.index("", 10)]
    # knots in x, knots in y and coefficients each start on a new line, 5 per line
    expected_lines = sum(-(-n // 5) for n in (nkx, nky, (nkx - 4) * (nky - 4)))
    assert len(block) == expected_lines
    assert all(len(line) % 14 == 0 and 14 <= len(line) <= 70 for line in block)
    assert "  Y-DISTORTION" in lines
    assert path.read_text().endswith("\n\n")  # the last block ends with a blank line too


# -- we read what pyFAI and Fit2D write -----------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # array2spline uses fitpack2
def test_read_spline_written_by_pyfai(tmp_path):
    dy, dx = field(NY, NX, 8.0)
    spline = pyFAI_spline.Spline()
    spline.xDispArray = dx
    spline.yDispArray = dy
    spline.array2spline(smoothing=1e-3)
    spline.pixelSize = (75.0, 50.0)
    spline.grid = 5000.0
    path = tmp_path / "pyfai.spline"
    spline.write(str(path))

    ours = read_spline(path)
    assert ours.shape == (NY, NX)
    assert ours.pixel_size == pytest.approx(PIXEL, rel=1e-7)
    assert ours.grid_spacing == pytest.approx(5e-3)
    got_dy, got_dx = ours.corner_maps()
    assert got_dx.shape == (NY + 1, NX + 1)
    # pyFAI's own evaluation of the same file (float32 knots and coefficients)
    check = pyFAI_spline.Spline(str(path))
    ref_dx, ref_dy = check.spline2array()
    assert_allclose(got_dx, ref_dx, atol=1e-4)
    assert_allclose(got_dy, ref_dy, atol=1e-4)
    # and the maps pyFAI fitted (its s=1e-3 leaves ~1e-3 px)
    assert np.abs(got_dx - dx).max() < 0.01
    assert np.abs(got_dy - dy).max() < 0.01


def fortran_e(value):
    """Fortran E14.7 as Fit2D writes it: ' 0.2048000E+04', '-0.1234567E-01'."""
    if value == 0:
        return " 0.0000000E+00"
    exponent = int(np.floor(np.log10(abs(value)))) + 1
    mantissa = value / 10.0**exponent
    if round(abs(mantissa), 7) >= 1.0:  # 0.99999999 rounds up to 1.0000000
        mantissa /= 10.0
        exponent += 1
    return f"{mantissa:10.7f}E{exponent:+03d}".rjust(14)


def fit2d_text(tck_x, tck_y, region, grid_um, pixel_um, fmt):
    lines = ["SPATIAL DISTORTION SPLINE INTERPOLATION COEFFICIENTS", "", "  VALID REGION"]
    lines += ["".join(fmt(v) for v in region), "", "  GRID SPACING, X-PIXEL SIZE, Y-PIXEL SIZE"]
    lines += ["".join(fmt(v) for v in (grid_um, *pixel_um)), ""]
    for key, (tx, ty, c) in (("X-DISTORTION", tck_x), ("Y-DISTORTION", tck_y)):
        lines += [f"  {key}", f"{len(tx):6d}{len(ty):6d}"]
        for block in (tx, ty, c):
            lines += ["".join(fmt(v) for v in block[k : k + 5]) for k in range(0, len(block), 5)]
        lines.append("")
    return "\n".join(lines) + "\n"


def random_tck(rng, nx, ny, n_inner_x, n_inner_y, scale):
    tx = np.r_[
        [0.0] * 4, np.sort(rng.choice(np.arange(1, nx), n_inner_x, replace=False)), [nx] * 4
    ]
    ty = np.r_[
        [0.0] * 4, np.sort(rng.choice(np.arange(1, ny), n_inner_y, replace=False)), [ny] * 4
    ]
    c = rng.normal(scale=scale, size=(len(tx) - 4) * (len(ty) - 4))
    return tx.astype(float), ty.astype(float), c


@pytest.mark.parametrize("style", ["fortran-mantissa", "python-14.7E", "whitespace"])
def test_read_fit2d_style_numbers(tmp_path, style):
    rng = np.random.default_rng(11)
    nx, ny = 120, 80
    tck_x = random_tck(rng, nx, ny, 3, 2, 2.0)
    tck_y = random_tck(rng, nx, ny, 2, 4, 1.0)
    fmt = {
        "fortran-mantissa": fortran_e,
        "python-14.7E": lambda v: f"{v:14.7E}",
        "whitespace": lambda v: f" {v:.9g}",
    }[style]
    path = tmp_path / "fit2d.spline"
    path.write_text(fit2d_text(tck_x, tck_y, (0, 0, nx, ny), 100.0, (46.875, 48.5), fmt))
    spline = read_spline(path)
    assert spline.valid_region == (0.0, 0.0, float(nx), float(ny))
    assert spline.pixel_size == pytest.approx((48.5e-6, 46.875e-6))
    assert spline.grid_spacing == pytest.approx(100e-6)
    dy, dx = spline.corner_maps()
    assert dx.shape == (ny + 1, nx + 1)
    cols, rows = np.arange(nx + 1.0), np.arange(ny + 1.0)
    # FITPACK's own evaluation of the coefficients written, [x, y] -> transposed to [y, x]
    assert_allclose(dx, bisplev(cols, rows, (*tck_x, 3, 3)).T, atol=2e-6)
    assert_allclose(dy, bisplev(cols, rows, (*tck_y, 3, 3)).T, atol=2e-6)


def test_fortran_mantissas_touch_when_negative(tmp_path):
    # Fortran E14.7 leaves no blank before a '-' sign: fields must be cut at 14 characters
    assert fortran_e(-2048.0) == "-0.2048000E+04"
    assert fortran_e(2048.0) == " 0.2048000E+04"
    rng = np.random.default_rng(5)
    tck = random_tck(rng, 40, 30, 1, 1, 1.0)
    tck = (tck[0], tck[1], -np.abs(tck[2]) - 0.5)  # every coefficient negative
    path = tmp_path / "neg.spline"
    path.write_text(fit2d_text(tck, tck, (0, 0, 40, 30), 0.0, (50.0, 50.0), fortran_e))
    assert "E+00-0." in path.read_text()
    spline = read_spline(path)
    assert_allclose(spline.x_tck[2], tck[2], rtol=1e-6)  # 7 significant digits
    assert spline.grid_spacing is None


# -- our round trip ----------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    dy, dx = field(NY, NX, 12.0)
    path = tmp_path / "rt.spline"
    fit = write_spline(path, dy, dx, pixel_size=PIXEL, grid_spacing=4e-3)
    back = read_spline(path)
    assert isinstance(back, SplineMaps)
    assert back.shape == (NY, NX)
    assert back.pixel_size == pytest.approx(PIXEL, rel=1e-7)
    assert back.grid_spacing == pytest.approx(4e-3)
    assert back.knots == fit.spline.knots
    got_dy, got_dx = back.corner_maps()
    err = np.maximum(np.abs(got_dy - dy), np.abs(got_dx - dx))
    assert err.max() <= TOLERANCE
    assert err.max() == pytest.approx(fit.max_error, abs=1e-6)
    assert fit.valid_corners == (NY + 1) * (NX + 1)
    # a larger shape than the file's samples the same splines (clamped beyond the knots)
    big_dy, big_dx = back.corner_maps((NY + 2, NX + 2))
    assert_array_equal(big_dx[: NY + 1, : NX + 1], got_dx)
    assert_array_equal(big_dy[: NY + 1, : NX + 1], got_dy)


def test_evaluate_uses_index_coordinates(tmp_path):
    dy, dx = field(NY, NX, 6.0)
    path = tmp_path / "ev.spline"
    write_spline(path, dy, dx, pixel_size=PIXEL)
    spline = read_spline(path)
    map_dy, map_dx = spline.corner_maps()
    rng = np.random.default_rng(3)
    i = rng.integers(0, NY + 1, 50)
    j = rng.integers(0, NX + 1, 50)
    # corner (i, j) is at index coordinates (i - 0.5, j - 0.5)
    ev_dy, ev_dx = spline.evaluate(i - 0.5, j - 0.5)
    assert_allclose(ev_dy, map_dy[i, j], atol=1e-12)
    assert_allclose(ev_dx, map_dx[i, j], atol=1e-12)
    # pixel centres against pyFAI's evaluation at pyFAI coordinates (i + 0.5, j + 0.5)
    pyfai = pyFAI_spline.Spline(str(path))
    yc = rng.uniform(0, NY - 1, 40)
    xc = rng.uniform(0, NX - 1, 40)
    ref_dx = pyfai.splineFuncX(xc + 0.5, yc + 0.5, list_of_points=True)
    ref_dy = pyfai.splineFuncY(xc + 0.5, yc + 0.5, list_of_points=True)
    got_dy, got_dx = spline.evaluate(yc, xc)
    assert_allclose(got_dx, ref_dx, atol=1e-4)
    assert_allclose(got_dy, ref_dy, atol=1e-4)
    # broadcasting
    grid_dy, _ = spline.evaluate(np.arange(3.0)[:, None], np.arange(4.0)[None, :])
    assert grid_dy.shape == (3, 4)


# -- fitting behaviour ------------------------------------------------------------------


def test_invalid_corners_neither_pull_the_fit_nor_cost_knots(tmp_path):
    dy, dx = field(NY, NX, 20.0)
    valid = ellipse_pixels(NY, NX, fill=0.4)
    outside = ~corners_of(valid)
    # the tutorial's nearest-valid fill outside the hull: kinks everywhere out there
    from scipy import ndimage

    nearest = ndimage.distance_transform_edt(outside, return_distances=False, return_indices=True)
    dx_nearest, dy_nearest = dx[tuple(nearest)], dy[tuple(nearest)]
    fit = write_spline(
        tmp_path / "n.spline", dy_nearest, dx_nearest, pixel_size=PIXEL, valid_region=valid
    )
    got_dy, got_dx = fit.spline.corner_maps()
    inside = ~outside
    assert np.abs(got_dx - dx)[inside].max() <= TOLERANCE
    assert np.abs(got_dy - dy)[inside].max() <= TOLERANCE
    # fitting the kinks would take about one knot per corner (235 x 155 here)
    for kx, ky in fit.spline.knots:
        assert kx <= 60
        assert ky <= 60


def test_corner_shaped_valid_region_equals_pixel_shaped(tmp_path):
    dy, dx = field(60, 90, 4.0)
    pixels = ellipse_pixels(60, 90)
    a = write_spline(tmp_path / "a.spline", dy, dx, pixel_size=PIXEL, valid_region=pixels)
    b = write_spline(
        tmp_path / "b.spline", dy, dx, pixel_size=PIXEL, valid_region=corners_of(pixels)
    )
    assert a.valid_corners == b.valid_corners == np.count_nonzero(corners_of(pixels))
    assert (tmp_path / "a.spline").read_text() == (tmp_path / "b.spline").read_text()


def test_explicit_zero_smoothing_interpolates(tmp_path):
    dy, dx = field(30, 40, 5.0)
    fit = write_spline(tmp_path / "z.spline", dy, dx, pixel_size=PIXEL, smoothing=0.0)
    assert fit.smoothing == (0.0, 0.0)
    assert fit.stride == (1, 1)
    # limited only by the 8 significant digits written and float32 reading
    assert fit.max_error < 1e-5
    assert fit.spline.knots == ((41 + 4, 31 + 4), (41 + 4, 31 + 4))


def test_tighter_tolerance_is_met(tmp_path):
    dy, dx = field(NY, NX, 20.0)
    fit = write_spline(tmp_path / "t.spline", dy, dx, pixel_size=PIXEL, tolerance=0.002)
    assert fit.max_error <= 0.002


def hole_hull_pixels(ny, nx, *, pitch, angle_deg, margin, seed):
    """Valid pixels: the convex hull of a rotated lattice of holes, ``margin`` px from the frame.

    Its edge is ragged like a calibration's (straight runs with one-pixel
    stairs) and, with a small margin, runs a few pixels from the frame.
    """
    from scipy.spatial import Delaunay

    rng = np.random.default_rng(seed)
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    k = np.arange(-(max(ny, nx) // pitch) - 2, max(ny, nx) // pitch + 3)
    a, b = (g.ravel() for g in np.meshgrid(k, k, indexing="ij"))
    y = 0.5 * ny + pitch * (a * c - b * s) + rng.normal(0.0, 0.3, a.size)
    x = 0.5 * nx + pitch * (a * s + b * c) + rng.normal(0.0, 0.3, a.size)
    keep = (y > margin) & (y < ny - margin) & (x > margin) & (x < nx - margin)
    hull = Delaunay(np.column_stack([y[keep], x[keep]]))
    i, j = np.mgrid[0:ny, 0:nx]
    return (hull.find_simplex(np.column_stack([i.ravel(), j.ravel()])) >= 0).reshape(ny, nx)


def barrel_field(ny, nx, amplitude):
    """Corner maps (dy, dx): off-centre barrel (cubic) plus a slow ripple, px."""
    i, j = np.mgrid[0 : ny + 1, 0 : nx + 1].astype(np.float64)
    u, w = (j - 0.52 * nx) / (0.5 * nx), (i - 0.47 * ny) / (0.5 * nx)
    r2 = u * u + w * w
    dx = amplitude * (0.5 * u * r2 + 0.1 * w) + 0.2 * np.sin(i / 60.0)
    dy = amplitude * (0.45 * w * r2 - 0.08 * u) + 0.15 * np.cos(j / 70.0)
    return dy, dx


@pytest.mark.parametrize(
    ("ny", "nx", "angle_deg", "margin"),
    [(256, 511, 4.0, 3.0), (511, 511, 3.0, 3.5)],
    ids=["256x511", "511x511"],
)
def test_hull_edge_near_the_frame_gives_a_compact_spline(tmp_path, ny, nx, angle_deg, margin):
    # a detector file's maps: a smooth field, valid inside the hull of the holes
    # only, the hull's edge a few pixels from the frame. Filling the rest used to
    # leave kinks there that the smoothing fit chased with one knot per corner.
    dy, dx = barrel_field(ny, nx, 8.0)
    valid = hole_hull_pixels(ny, nx, pitch=16, angle_deg=angle_deg, margin=margin, seed=0)
    inside = corners_of(valid)
    fit = write_spline(
        tmp_path / "hull.spline",
        np.where(inside, dy, np.nan),
        np.where(inside, dx, np.nan),
        pixel_size=PIXEL,
        valid_region=valid,
    )
    for kx, ky in fit.spline.knots:
        assert kx <= 40
        assert ky <= 40
    got_dy, got_dx = fit.spline.corner_maps()
    assert np.abs(got_dx - dx)[inside].max() <= TOLERANCE
    assert np.abs(got_dy - dy)[inside].max() <= TOLERANCE
    # the continuation outside stays near the field's scale (no wild extrapolation)
    assert np.abs(got_dx).max() <= 2.0 * np.abs(dx).max()
    assert np.abs(got_dy).max() <= 2.0 * np.abs(dy).max()


def test_unreachable_tolerance_warns_and_stays_compact(tmp_path):
    # white noise of 0.05 px: no smooth spline is within 0.01 px of it
    rng = np.random.default_rng(11)
    dy, dx = field(NY, NX, 5.0)
    noisy = dx + rng.normal(0.0, 0.05, dx.shape)
    with pytest.warns(SplineToleranceWarning, match=r"dx map is not within the tolerance"):
        fit = write_spline(tmp_path / "noisy.spline", dy, noisy, pixel_size=PIXEL)
    assert fit.max_error > TOLERANCE
    # the best spline tried is written, not one knot per corner
    (kx, ky), _ = fit.spline.knots
    assert kx < (NX + 1) // 2
    assert ky < (NY + 1) // 2
    # and what it reports is what is in the file
    got_dy, got_dx = read_spline(fit.path).corner_maps()
    err = max(np.abs(got_dx - noisy).max(), np.abs(got_dy - dy).max())
    assert err == pytest.approx(fit.max_error, abs=1e-5)


def test_given_smoothing_with_a_valid_region(tmp_path):
    # FITPACK sees every corner: the invalid ones must hold a smooth continuation
    dy, dx = barrel_field(200, 300, 6.0)
    valid = hole_hull_pixels(200, 300, pitch=16, angle_deg=2.0, margin=3.5, seed=1)
    inside = corners_of(valid)
    s = 1e-6 * inside.size
    fit = write_spline(
        tmp_path / "s.spline",
        np.where(inside, dy, 1e3),
        np.where(inside, dx, np.nan),
        pixel_size=PIXEL,
        valid_region=valid,
        smoothing=s,
    )
    assert fit.smoothing == (s, s)
    assert fit.max_error <= TOLERANCE
    for kx, ky in fit.spline.knots:
        assert kx <= 60
        assert ky <= 60


# -- errors ---------------------------------------------------------------------------------


def write_good(tmp_path):
    dy, dx = field(20, 30, 2.0)
    path = tmp_path / "good.spline"
    write_spline(path, dy, dx, pixel_size=PIXEL)
    return path, path.read_text().split("\n")


def test_malformed_number_names_the_line(tmp_path):
    path, lines = write_good(tmp_path)
    lines[11] = lines[11][:14] + "  1.0000000E+0X" + lines[11][29:]
    path.write_text("\n".join(lines))
    with pytest.raises(CcdgridError, match=r"line 12: cannot read numbers"):
        read_spline(path)


def test_truncated_block_names_the_lines_and_counts(tmp_path):
    path, lines = write_good(tmp_path)
    end = lines.index("", 10)
    del lines[end - 1]
    path.write_text("\n".join(lines))
    with pytest.raises(CcdgridError, match=rf"lines 11-{end - 1}: X-DISTORTION .* needs \d+"):
        read_spline(path)


def test_bad_knot_counts_name_the_line(tmp_path):
    path, lines = write_good(tmp_path)
    lines[9] = "  nine  ten"
    path.write_text("\n".join(lines))
    with pytest.raises(CcdgridError, match=r"line 10: expected two knot counts"):
        read_spline(path)


def test_missing_header_line_names_it(tmp_path):
    path, lines = write_good(tmp_path)
    lines[3] = ""
    path.write_text("\n".join(lines))
    with pytest.raises(CcdgridError, match=r"line 4: expected 4 numbers after 'VALID REGION'"):
        read_spline(path)


def test_missing_keyword(tmp_path):
    path, lines = write_good(tmp_path)
    start = lines.index("  Y-DISTORTION")
    path.write_text("\n".join(lines[:start]))
    with pytest.raises(CcdgridError, match=r"not a Fit2D spline file: no 'Y-DISTORTION'"):
        read_spline(path)


def test_non_positive_pixel_size_in_file(tmp_path):
    path, lines = write_good(tmp_path)
    lines[6] = lines[6][:14] + f"{0.0:14.7E}" + lines[6][28:]
    path.write_text("\n".join(lines))
    with pytest.raises(CcdgridError, match=r"line 7: pixel sizes must be positive"):
        read_spline(path)


def test_missing_file(tmp_path):
    with pytest.raises(CcdgridError, match="spline file not found"):
        read_spline(tmp_path / "absent.spline")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dx": np.zeros((10, 12))}, r"`dy` and `dx` differ in shape"),
        ({"dx": np.zeros((3, 12)), "dy": np.zeros((3, 12))}, r"`dy` must be a corner map"),
        ({"dx": np.full((10, 11), "a")}, r"`dx` must hold real numbers"),
        ({"pixel_size": (50e-6, -1.0)}, r"`pixel_size` must be two positive"),
        ({"pixel_size": 50.0}, r"`pixel_size` is in metres"),
        ({"grid_spacing": 0.0}, r"`grid_spacing` must be a positive number"),
        ({"smoothing": -1.0}, r"`smoothing` must be a number >= 0"),
        ({"tolerance": "tight"}, r"`tolerance` must be a number"),
        ({"valid_region": np.ones((5, 5), bool)}, r"`valid_region` must have the corner shape"),
        ({"valid_region": np.zeros((10, 11), bool)}, r"`valid_region` marks no corner"),
        ({"dx": np.full((10, 11), np.nan)}, r"`dx` holds 110 non-finite values on valid"),
    ],
)
def test_write_spline_rejects_bad_arguments(tmp_path, kwargs, match):
    args = {"dy": np.zeros((10, 11)), "dx": np.zeros((10, 11)), "pixel_size": PIXEL, **kwargs}
    path = tmp_path / "bad.spline"
    with pytest.raises(CcdgridError, match=match):
        write_spline(path, args.pop("dy"), args.pop("dx"), **args)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_spline_to_missing_directory(tmp_path):
    with pytest.raises(CcdgridError, match="does not exist"):
        write_spline(
            tmp_path / "no" / "x.spline", np.zeros((5, 5)), np.zeros((5, 5)), pixel_size=PIXEL
        )
