"""GCV of the thin-plate smoothing: scores against the explicit smoother matrix, degree choice."""

import numpy as np
import pytest
from scipy.interpolate import RBFInterpolator

from ccdgrid.gcv import GCV_GRID, gcv_choice, gcv_scores


@pytest.mark.parametrize("degrees", [[1, 2, 3, 4], [3], [2, 4]])
def test_gcv_scores_equal_the_explicit_smoother_matrix(degrees):
    # The shared eigendecomposition (lowest degree) with the higher monomials
    # as constraints must give the score of each degree's own smoother H(s),
    # built here column by column by scipy's thin-plate fit of unit vectors.
    rng = np.random.default_rng(11)
    pts = rng.uniform(0.0, 6.0, (45, 2))
    disp = np.column_stack([np.sin(pts[:, 0]), pts[:, 0] * pts[:, 1] / 10]) + rng.normal(
        0.0, 0.05, pts.shape
    )
    scores = gcv_scores(pts, disp, degrees)
    n = len(pts)
    for deg in degrees:
        for k in (3, 15, 24, 33):
            s = GCV_GRID[k]
            rbf = RBFInterpolator(
                pts, np.eye(n), kernel="thin_plate_spline", smoothing=s, degree=deg
            )
            resid = np.eye(n) - rbf(pts).T  # I - H(s)
            expected = n * np.sum((resid @ disp) ** 2) / np.trace(resid) ** 2
            assert scores[deg][k] == pytest.approx(expected, rel=1e-6)


def test_gcv_choice_picks_the_degree_with_the_lowest_score():
    rng = np.random.default_rng(12)
    pts = rng.uniform(0.0, 8.0, (90, 2))
    # a cubic trend plus noise: degree 1 and 2 leave structure, 3 and 4 fit it
    disp = np.column_stack([(pts[:, 0] - 4) ** 3 / 20, (pts[:, 1] - 4) ** 3 / 30])
    disp += rng.normal(0.0, 0.01, pts.shape)
    smoothing, scores, degree = gcv_choice(pts, disp, 4, [1, 2, 3, 4])
    best = min(scores["degree_scores"], key=scores["degree_scores"].get)
    assert degree == best
    assert degree >= 3
    assert scores["score"].min() == pytest.approx(scores["degree_scores"][degree])
    assert smoothing == scores["smoothing"][np.argmin(scores["score"])]
