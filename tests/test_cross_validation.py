"""k-fold cross-validation of the maps: folds, exactness, noise, early stop, bad input."""

import numpy as np
import pytest

import ccdgrid
from ccdgrid import maps
from ccdgrid.cross_validation import CrossValidation, cross_validate
from ccdgrid.errors import CcdgridError
from ccdgrid.synthetic import make_distortion


def lattice(shape=(512, 512), pitch=32.0, margin=12.0):
    ys = np.arange(margin, shape[0] - margin, pitch)
    xs = np.arange(margin, shape[1] - margin, pitch)
    ii, jj = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    pts = np.stack([ys[ii], xs[jj]], axis=-1).reshape(-1, 2)
    return pts, np.stack([ii, jj], axis=-1).reshape(-1, 2)


def test_folds_are_balanced_and_interleaved():
    pts, ij = lattice()
    cv = cross_validate(pts, np.zeros_like(pts), k=5, indices=ij, smoothing=0.1)
    counts = np.bincount(cv.folds, minlength=5)
    assert counts.sum() == len(pts)
    assert counts.max() - counts.min() <= 2
    fold = {tuple(k): f for k, f in zip(ij.tolist(), cv.folds.tolist(), strict=True)}
    for (i, j), f in fold.items():
        for step in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            neighbour = fold.get((i + step[0], j + step[1]))
            assert neighbour is None or neighbour != f


def test_affine_field_is_predicted_exactly():
    # any hole left out of an affine field is predicted by its trend: zero error
    pts, ij = lattice()
    disp = np.column_stack([0.3 + 0.002 * pts[:, 0], -0.1 + 0.001 * pts[:, 1]])
    cv = cross_validate(pts, disp, k=5, indices=ij, smoothing=1.0, degree=1)
    assert cv.max_px < 1e-9
    assert cv.n_evaluated == len(pts)


def test_cv_error_is_the_prediction_error_plus_the_noise():
    # known smooth field + independent centre noise: E|cv|² = E|prediction - truth|² + E|noise|²,
    # because a left-out hole's noise is not in its prediction; the in-sample residual is not
    rng = np.random.default_rng(11)
    field = make_distortion((512, 512), distortion_px=2.0, seed=3)
    pts, ij = lattice()
    pts = pts + rng.uniform(-3, 3, pts.shape)
    truth = field.displacement(pts)
    noise = rng.normal(0.0, 0.02, pts.shape)
    cv = cross_validate(pts, truth + noise, k=5, indices=ij)
    pred_err2 = np.mean(np.sum((cv.predicted - truth) ** 2, axis=1))
    noise2 = np.mean(np.sum(noise**2, axis=1))
    assert cv.rms_px**2 == pytest.approx(pred_err2 + noise2, rel=0.2)
    assert cv.rms_px > np.sqrt(noise2)  # an upper bound of the noise-free error ...
    assert cv.rms_px > cv.in_sample_rms_px  # ... and larger than the in-sample residual
    assert cv.in_sample_rms_px < np.sqrt(noise2)  # the full fit absorbs part of the noise


def test_cv_is_deterministic_and_reuses_the_smoothing():
    rng = np.random.default_rng(5)
    pts, ij = lattice()
    disp = rng.normal(0, 0.05, pts.shape)
    a = cross_validate(pts, disp, k=10, indices=ij, smoothing=0.3, degree=3)
    b = cross_validate(pts, disp, k=10, indices=ij, smoothing=0.3, degree=3)
    np.testing.assert_array_equal(a.predicted, b.predicted)
    assert a.smoothing == 0.3
    assert a.degree == 3
    assert a.k == 10
    assert a.max_pitch == pytest.approx(a.max_px / a.scale_px)


def test_max_holes_stops_after_enough_folds():
    rng = np.random.default_rng(8)
    pts, ij = lattice()
    disp = rng.normal(0, 0.05, pts.shape)
    every = cross_validate(pts, disp, k=5, indices=ij, smoothing=0.3, max_holes=None)
    counts = np.bincount(every.folds, minlength=5)
    # just more than two folds' worth of holes: three folds are needed
    part = cross_validate(
        pts, disp, k=5, indices=ij, smoothing=0.3, max_holes=counts[:2].sum() + 1
    )
    assert every.folds_evaluated == 5
    assert every.n_evaluated == len(pts)
    assert part.folds_evaluated == 3
    assert part.n_evaluated == counts[:3].sum()
    done = part.folds < 3
    np.testing.assert_array_equal(part.predicted[done], every.predicted[done])
    assert np.isnan(part.predicted[~done]).all()
    assert "(3 folds evaluated)" in part.summary()


def test_cubic_cannot_predict_outside_the_training_hull():
    pts, ij = lattice()
    disp = np.column_stack([np.sin(pts[:, 0] / 90.0), np.cos(pts[:, 1] / 70.0)])
    cv = cross_validate(pts, disp, k=5, indices=ij, method="cubic")
    assert cv.smoothing is None
    assert cv.in_sample_rms_px == 0.0
    unpredicted = ~np.isfinite(cv.predicted[:, 0])
    assert 0 < unpredicted.sum() == len(pts) - cv.n_evaluated
    # only corner holes (all four of their lattice neighbours absent) fall outside the hull
    corners = np.isin(ij[:, 0], [0, ij[:, 0].max()]) & np.isin(ij[:, 1], [0, ij[:, 1].max()])
    assert np.all(corners[unpredicted])


def test_folds_without_indices_use_cells():
    pts, _ = lattice()
    with_cells = cross_validate(pts, np.zeros_like(pts), k=5, smoothing=0.1)
    counts = np.bincount(with_cells.folds, minlength=5)
    assert counts.max() - counts.min() <= 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 1}, "`k` must be an integer from 2"),
        ({"k": 2.5}, "`k` must be an integer from 2"),
        ({"k": 10_000}, "`k` must be an integer from 2"),
        ({"indices": np.zeros((3, 2), int)}, "`indices` must be integers"),
        ({"method": "linear"}, "`method` must be one of"),
        ({"smoothing": -1.0}, "`smoothing` must be a number >= 0"),
        ({"max_holes": 0}, "`max_holes` must be a positive number"),
        ({"in_sample_rms": -0.1}, "`in_sample_rms` must be a number >= 0"),
    ],
)
def test_cross_validate_bad_input(kwargs, match):
    pts, _ = lattice()
    with pytest.raises(CcdgridError, match=match):
        cross_validate(pts, np.zeros_like(pts), **kwargs)


def test_public_names_are_those_of_this_module():
    # cross_validate and CrossValidation were defined in ccdgrid.maps: still importable there
    assert maps.cross_validate is cross_validate
    assert maps.CrossValidation is CrossValidation
    assert {"cross_validate", "CrossValidation"} <= set(maps.__all__)
    assert ccdgrid.cross_validate is cross_validate
    assert ccdgrid.CrossValidation is CrossValidation


def test_cv_of_the_same_holes_moved_solves_each_fold_from_its_previous_factor():
    rng = np.random.default_rng(44)
    pts, ij = lattice()
    field = make_distortion((512, 512), distortion_px=3.0, seed=5)
    before = cross_validate(pts, field.displacement(pts), k=5, indices=ij, smoothing=0.5)
    assert sorted(before.factors) == list(range(5))
    moved = pts + np.array([2.4, -1.7]) + rng.normal(0, 0.01, pts.shape)
    disp = field.displacement(moved) + rng.normal(0, 0.02, pts.shape)
    warm = cross_validate(moved, disp, k=5, indices=ij, smoothing=0.5, previous=before)
    fresh = cross_validate(moved, disp, k=5, indices=ij, smoothing=0.5)
    for f in range(5):
        assert warm.factors[f].upper is before.factors[f].upper
        assert fresh.factors[f].upper is not before.factors[f].upper
    # the predictions are those of factorised fits to far below the holes' noise
    np.testing.assert_allclose(warm.predicted, fresh.predicted, rtol=0, atol=1e-7)
    assert warm.rms_px == pytest.approx(fresh.rms_px, rel=1e-6)
    # other folds (another k): not reused, the same result
    other = cross_validate(moved, disp, k=4, indices=ij, smoothing=0.5, previous=before)
    assert all(other.factors[f].upper is not before.factors[f].upper for f in range(4))
    # another smoothing: factorised
    stiffer = cross_validate(moved, disp, k=5, indices=ij, smoothing=5.0, previous=before)
    assert all(stiffer.factors[f].upper is not before.factors[f].upper for f in range(5))
    cubic = cross_validate(moved, disp, k=5, indices=ij, method="cubic", previous=before)
    assert cubic.factors is None
    with pytest.raises(CcdgridError, match="`previous` must be a CrossValidation"):
        cross_validate(moved, disp, k=5, indices=ij, smoothing=0.5, previous=before.factors)
