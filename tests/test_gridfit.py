"""Affine grid fit: exact recovery, both methods, pixel size, displacement sign, bad input."""

import numpy as np
import pytest

from ccdgrid.errors import CcdgridError
from ccdgrid.gridfit import fit_grid, pixel_size_from_vectors


@pytest.fixture(params=["cython", "numpy"])
def backend(request):
    return request.param


def affine_lattice(rng, n=15):
    """Indices (i, j) on an n x n lattice, a known (origin, vectors) and exact positions."""
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    idx = np.column_stack([ii.ravel(), jj.ravel()])
    origin = np.array([40.3, 61.7])
    vectors = np.array([[98.2, -1.7], [2.1, 97.4]])  # rows: i step, j step, (y, x)
    pos = origin + idx @ vectors
    order = rng.permutation(len(idx))
    return idx[order], pos[order], origin, vectors


def test_exact_affine_is_recovered_by_both_methods(backend):
    rng = np.random.default_rng(0)
    idx, pos, origin, vectors = affine_lattice(rng)
    fit = fit_grid(pos, idx, backend=backend)
    np.testing.assert_allclose(fit.origin, origin, atol=1e-9)
    np.testing.assert_allclose(fit.vectors, vectors, atol=1e-9)
    assert fit.rms_lsq < 1e-9
    assert fit.rms_seed < 1e-6
    assert fit.residual_max < 1e-6
    np.testing.assert_allclose(fit.ideal, pos, atol=1e-6)
    (yy, yx), (xy, xx) = vectors
    # the tutorial's order: (Ox, Oy, Xx, Yx, Xy, Yy); X = j step, Y = i step, in (x, y)
    np.testing.assert_allclose(fit.P, [origin[1], origin[0], xx, yx, xy, yy], atol=1e-6)


def test_seed_objective_minimum_is_found_from_a_perturbed_lattice(backend):
    rng = np.random.default_rng(1)
    idx, pos, _, _ = affine_lattice(rng)
    noisy = pos + rng.normal(0.0, 0.05, pos.shape)
    fit = fit_grid(noisy, idx, backend=backend)
    assert fit.seed_result["success"]
    # both minimise nearly the same thing on small residuals
    assert fit.rms_lsq <= fit.rms_seed + 1e-12
    assert fit.rms_seed < fit.rms_lsq * 1.01
    assert fit.method_used == "lsq"
    assert 0.05 < fit.residual_rms < 0.09  # sqrt(2) * 0.05 minus 6 fitted parameters


def test_backends_agree():
    rng = np.random.default_rng(2)
    idx, pos, _, _ = affine_lattice(rng)
    noisy = pos + rng.normal(0.0, 0.3, pos.shape)
    a = fit_grid(noisy, idx, backend="cython")
    b = fit_grid(noisy, idx, backend="numpy")
    np.testing.assert_allclose(a.rms_seed, b.rms_seed, rtol=1e-8)
    np.testing.assert_array_equal(a.P, b.P)  # lsq used by both: no minimiser involved


def test_displacement_is_ideal_minus_measured():
    rng = np.random.default_rng(3)
    idx, pos, _, _ = affine_lattice(rng)
    pos = pos + rng.normal(0.0, 0.5, pos.shape)
    fit = fit_grid(pos, idx)
    np.testing.assert_allclose(fit.ideal, fit.origin + idx @ fit.vectors, atol=1e-9)
    np.testing.assert_allclose(fit.displacement, fit.ideal - pos, atol=1e-12)
    norm = np.hypot(*fit.displacement.T)
    assert fit.residual_rms == pytest.approx(np.sqrt(np.mean(norm**2)))
    assert fit.residual_max == pytest.approx(norm.max())
    np.testing.assert_allclose(fit.predict(idx[:5]), fit.ideal[:5], atol=1e-9)


@pytest.mark.parametrize("rotation_deg", [0.0, 7.0, 30.0, 45.0, -60.0, 90.0])
def test_pixel_size_of_a_rotated_lattice_seen_through_rectangular_pixels(rotation_deg):
    pixel1, pixel2, pitch = 51.3e-6, 49.7e-6, 5e-3
    t = np.deg2rad(rotation_deg)
    # plate steps in metres (x, y): the lattice is square on the plate, rotated by t
    step_j = pitch * np.array([np.cos(t), np.sin(t)])
    step_i = pitch * np.array([-np.sin(t), np.cos(t)])
    # on the detector in pixels, (y, x): the apparent lattice is sheared unless t = 0 mod 90
    vectors = np.array(
        [
            [step_i[1] / pixel1, step_i[0] / pixel2],
            [step_j[1] / pixel1, step_j[0] / pixel2],
        ]
    )
    p1, p2 = pixel_size_from_vectors(vectors, pitch)
    assert p1 == pytest.approx(pixel1, rel=1e-12)
    assert p2 == pytest.approx(pixel2, rel=1e-12)


def test_pixel_size_matches_the_tutorial_formula_at_small_rotation():
    pixel1, pixel2, pitch = 51.3e-6, 49.7e-6, 5e-3
    t = np.deg2rad(2.0)
    xx, xy = pitch * np.cos(t) / pixel2, pitch * np.sin(t) / pixel1
    yx, yy = -pitch * np.sin(t) / pixel2, pitch * np.cos(t) / pixel1
    # PYFAI_NOTES §8 step 5
    py = pitch * np.sqrt((yx**2 - xx**2) / ((xy * yx) ** 2 - (xx * yy) ** 2))
    px = np.sqrt((pitch**2 - (xy * py) ** 2) / xx**2)
    p1, p2 = pixel_size_from_vectors(np.array([[yy, yx], [xy, xx]]), pitch)
    assert p1 == pytest.approx(py, rel=1e-10)
    assert p2 == pytest.approx(px, rel=1e-10)


def test_fit_grid_reports_pixel_size_from_pitch():
    rng = np.random.default_rng(4)
    idx, pos, _, vectors = affine_lattice(rng)
    fit = fit_grid(pos, idx, pitch=2.5e-3)
    assert fit.pixel_size == pytest.approx(pixel_size_from_vectors(vectors, 2.5e-3), rel=1e-9)
    assert fit.pitch == 2.5e-3
    # about 98 px per 2.5 mm
    assert fit.pixel_size[0] == pytest.approx(2.5e-3 / 98.2, rel=0.02)


def test_too_few_holes():
    with pytest.raises(CcdgridError, match="too few holes"):
        fit_grid([[0.0, 0.0], [0.0, 98.0]], [[0, 0], [0, 1]])


def test_collinear_indices():
    idx = np.column_stack([np.zeros(6, int), np.arange(6)])
    pos = idx * 98.0
    with pytest.raises(CcdgridError, match="too few holes"):
        fit_grid(pos, idx)


@pytest.mark.parametrize("pitch", [0.0, -5e-3, np.inf, None])
def test_bad_pitch(pitch):
    rng = np.random.default_rng(5)
    idx, pos, _, _ = affine_lattice(rng, n=4)
    with pytest.raises(CcdgridError, match="pitch"):
        fit_grid(pos, idx, pitch=pitch)


@pytest.mark.parametrize("pitch", [5.0, 0.2, 5e-7])
def test_a_pitch_in_the_wrong_unit_is_refused(pitch):
    # calibrate(pitch=5) meant 5 mm and gave an 8 cm pixel without a word
    rng = np.random.default_rng(5)
    idx, pos, _, _ = affine_lattice(rng, n=4)
    with pytest.raises(CcdgridError, match=r"not a plausible hole pitch .* in metres"):
        fit_grid(pos, idx, pitch=pitch)


@pytest.mark.parametrize("pitch", [1e-6, 0.1])
def test_the_plausible_pitch_range_is_inclusive(pitch):
    rng = np.random.default_rng(5)
    idx, pos, _, _ = affine_lattice(rng, n=4)
    assert fit_grid(pos, idx, pitch=pitch).pitch == pitch


def test_bad_indices():
    rng = np.random.default_rng(6)
    idx, pos, _, _ = affine_lattice(rng, n=4)
    with pytest.raises(CcdgridError, match="indices"):
        fit_grid(pos, idx[:-1])
    with pytest.raises(CcdgridError, match="indices"):
        fit_grid(pos, idx + 0.5)


def test_non_finite_peaks():
    rng = np.random.default_rng(7)
    idx, pos, _, _ = affine_lattice(rng, n=4)
    pos[0, 0] = np.nan
    with pytest.raises(CcdgridError, match="finite"):
        fit_grid(pos, idx)


def test_bad_backend():
    rng = np.random.default_rng(8)
    idx, pos, _, _ = affine_lattice(rng, n=4)
    with pytest.raises(CcdgridError, match="backend"):
        fit_grid(pos, idx, backend="fortran")


# -- centred_grid ------------------------------------------------------------------


def _barrel_plate(k=2e-7, shape=(1024, 1024), pitch_px=40.0, rotation_deg=0.3, centre=None):
    """Measured centres of a plate seen through ``D(m) = k |m - c|² (m - c)`` (px).

    The true position of what is seen at ``m`` is ``m + D(m)``; the plate's
    holes, at true positions on a square lattice, are seen where
    ``m + D(m)`` is their site. Returns indices, measured centres, ``D`` and
    the true lattice step (px).
    """
    c = (np.asarray(shape, dtype=np.float64) - 1) / 2 if centre is None else np.asarray(centre)
    t = np.radians(rotation_deg)
    vectors = pitch_px * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    n = int(shape[0] / pitch_px) + 2
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    idx = np.column_stack([ii.ravel(), jj.ravel()])
    sites = c - (n - 1) / 2 * vectors.sum(axis=0) + idx @ vectors + 7.3

    def distortion(m):
        r = m - c
        return k * (r**2).sum(axis=1, keepdims=True) * r

    m = sites.copy()
    for _ in range(60):  # m = site - D(m), a contraction for these k
        m = sites - distortion(m)
    inside = np.all((m > 2) & (m < np.asarray(shape) - 3), axis=1)
    return idx[inside], m[inside], distortion, pitch_px


def test_centred_grid_recovers_a_radial_distortion_about_the_centre():
    from ccdgrid.gridfit import centred_grid

    idx, m, distortion, step = _barrel_plate()
    lsq = fit_grid(m, idx, pitch=5e-3)
    true = distortion(m)
    # the fitted lattice takes the barrel's average magnification: its
    # displacement is another field (more than 0.5 px away at the corners)
    assert np.abs(lsq.displacement - true).max() > 0.5
    grid = centred_grid(lsq, m, (1024, 1024))
    # a cubic field about the centre: recovered exactly, lattice and pixel size included
    np.testing.assert_allclose(grid.displacement, true, atol=1e-8)
    np.testing.assert_allclose(grid.ideal - grid.displacement, m, atol=1e-9)
    np.testing.assert_allclose(grid.pixel_size, (5e-3 / step, 5e-3 / step), rtol=1e-9)
    np.testing.assert_allclose(grid.predict(grid.indices), grid.ideal, atol=1e-8)
    np.testing.assert_allclose(np.hypot(*grid.vectors.T), step, rtol=1e-9)
    assert grid.frame["centre"] == [511.5, 511.5]
    assert grid.frame["degree"] == 5
    assert grid.frame["holes"] == -(-len(m) // 2)
    # what the least-squares fit measured is kept
    assert (grid.rms_lsq, grid.rms_seed, grid.method_used) == (
        lsq.rms_lsq,
        lsq.rms_seed,
        lsq.method_used,
    )
    assert lsq.frame is None


def test_centred_grid_moves_the_ideal_positions_by_one_affine_map():
    from ccdgrid.gridfit import centred_grid

    rng = np.random.default_rng(4)
    idx, m, distortion, _ = _barrel_plate(k=1e-7, rotation_deg=-1.0)
    true = distortion(m)
    m = m + rng.normal(0, 0.02, m.shape)  # measured centres are noisy
    lsq = fit_grid(m, idx)
    grid = centred_grid(lsq, m, (1024, 1024))
    design = np.column_stack([np.ones(len(m)), lsq.ideal])
    coef, *_ = np.linalg.lstsq(design, grid.ideal, rcond=None)
    np.testing.assert_allclose(design @ coef, grid.ideal, atol=1e-9)
    # the field as defined, to the noise of the centres (and of the local
    # fit's scale and rotation, which the 49 central holes carry)
    err = np.hypot(*(grid.displacement - true).T)
    err_lsq = np.hypot(*(lsq.displacement - true).T)
    # (0.028 px RMS for the noise alone)
    assert np.sqrt(np.mean(err**2)) < 0.04
    assert err.max() < 0.12
    assert np.sqrt(np.mean(err_lsq**2)) > 0.1


def test_centred_grid_off_the_plate_uses_the_holes_median():
    from ccdgrid.gridfit import centred_grid

    idx, m, _, _ = _barrel_plate(shape=(1024, 1024), centre=(511.5, 511.5))
    corner = np.all(m < 480, axis=1)  # a plate that covers one quadrant only
    grid = centred_grid(fit_grid(m[corner], idx[corner]), m[corner], (1024, 1024))
    # the hole nearest the holes' median: a point with holes around it
    median = np.median(m[corner], axis=0)
    nearest = m[corner][np.argmin(np.hypot(*(m[corner] - median).T))]
    np.testing.assert_allclose(grid.frame["centre"], nearest)
    # a lit disc whose rim passes by the image centre: the centre is not surrounded
    rim = np.hypot(*(m - [511.5, 311.5]).T) < 200
    grid = centred_grid(fit_grid(m[rim], idx[rim]), m[rim], (1024, 1024))
    assert grid.frame["centre"] != [511.5, 511.5]


def test_centred_grid_on_two_rows_of_holes_stays_affine_across_them():
    from ccdgrid.gridfit import centred_grid

    idx, m, _, _ = _barrel_plate()
    strip = np.isin(idx[:, 0], np.unique(idx[:, 0])[12:14])  # two rows of sites
    grid = centred_grid(fit_grid(m[strip], idx[strip]), m[strip], (1024, 1024))
    assert grid.frame["degree"] == 1
    assert np.all(np.isfinite(grid.displacement))


def _square_plate_vectors(pitch_px=98.0, rotation_deg=1.0, aspect=1.012):
    """Lattice steps (rows i, j; (dy, dx) px) of a square plate seen through rectangular pixels."""
    t = np.deg2rad(rotation_deg)
    q = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])  # rows: i, j steps, m
    return pitch_px * q / np.array([1.0, aspect])  # pixel2 = aspect * pixel1


def test_centred_grid_with_few_holes_keeps_the_fitted_lattice():
    from ccdgrid.gridfit import centred_grid

    rng = np.random.default_rng(1)
    ii, jj = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    idx = np.column_stack([ii.ravel(), jj.ravel()])
    pos = np.array([40.3, 61.7]) + idx @ _square_plate_vectors()
    pos = pos + rng.normal(0, 0.05, pos.shape)
    lsq = fit_grid(pos, idx)
    grid = centred_grid(lsq, pos, (400, 400))
    assert grid.frame["degree"] == 1
    # an affine fit of all holes of a square plate: the lattice moves only
    # by the noise's regression, not by a frame of its own
    np.testing.assert_allclose(grid.ideal, lsq.ideal, atol=0.02)
    np.testing.assert_allclose(grid.pixel_size, lsq.pixel_size, rtol=2e-4)


@pytest.mark.parametrize(("rotation_deg", "aspect"), [(0.0, 1.0), (1.0, 1.012), (33.0, 0.97)])
@pytest.mark.parametrize("shear", [0.01, -0.004])
def test_centred_grid_leaves_a_shear_in_the_displacement(rotation_deg, aspect, shear):
    # A square plate seen through a detector that shears it by 1 % (a
    # taper): the lattice the holes show is not square, and no pixel size
    # makes it so. The calibration must square it and put the shear in the
    # displacement, or the corrected image of a square plate is not square.
    from ccdgrid.gridfit import centred_grid

    pitch = 5e-3
    square = _square_plate_vectors(rotation_deg=rotation_deg, aspect=aspect)
    ii, jj = np.meshgrid(np.arange(-7, 8), np.arange(-7, 8), indexing="ij")
    idx = np.column_stack([ii.ravel(), jj.ravel()])
    centre = np.array([511.5, 511.5])
    true = centre + idx @ square  # where a distortion-free detector sees the holes
    warp = np.array([[1.0, shear], [0.0, 1.0]])  # measured = centre + warp (true - centre)
    measured = centre + (true - centre) @ warp.T
    grid = centred_grid(fit_grid(measured, idx, pitch=pitch), measured, (1024, 1024))
    p1, p2 = grid.pixel_size
    phys = grid.vectors * np.array([p1, p2])
    # the lattice is a square plate's: orthogonal steps of one pitch, in metres
    assert abs(phys[0] @ phys[1]) < 1e-9 * pitch**2
    np.testing.assert_allclose(np.linalg.norm(phys, axis=1), pitch, rtol=1e-9)
    # ... the undistorted one, up to a rotation and the pixel sizes' common
    # scale (a shear s is a stretch of 1 +- s / 2 along the diagonals: its
    # split between the pixel aspect and the map is ambiguous at order s²)
    np.testing.assert_allclose(p2 / p1, aspect, rtol=1e-4)
    assert abs(grid.frame["shear_deg"]) > 0.3 * np.degrees(abs(shear))
    # the displacement holds the shear: zero at the centre, linear in the
    # measured position, and the corrected holes form the square lattice
    corrected = measured + grid.displacement
    np.testing.assert_allclose(corrected, grid.origin + idx @ grid.vectors, atol=1e-6)
    d = np.linalg.lstsq(
        np.column_stack([np.ones(len(idx)), measured - centre]), grid.displacement, rcond=None
    )[0]
    np.testing.assert_allclose(d[0], 0.0, atol=1e-6)
    assert np.abs(d[1:]).max() > 0.3 * abs(shear)


def test_centred_grid_bad_input():
    from ccdgrid.gridfit import centred_grid

    rng = np.random.default_rng(0)
    idx, pos, _, _ = affine_lattice(rng)
    with pytest.raises(CcdgridError, match="one row per hole"):
        centred_grid(fit_grid(pos, idx), pos[:-1], (2000, 2000))
