"""Batched blurred-disc fits: the compiled kernel against its numpy twin.

``ccdgrid._ext._holefit`` and ``ccdgrid._reference.holefit`` get the same
inputs; the windows are built here from scipy's erfc with known parameters.
"""

import numpy as np
import pytest
from scipy.special import erfc

from ccdgrid._ext import _holefit as compiled
from ccdgrid._reference import holefit as reference
from ccdgrid.centres import fit_hole_profiles

ENGINES = {"cython": compiled, "numpy": reference}


@pytest.fixture(params=sorted(ENGINES))
def engine(request):
    return ENGINES[request.param]


def window_offsets(half):
    offs = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.repeat(offs, offs.size), np.tile(offs, offs.size)
    disc = yy * yy + xx * xx <= (half + 0.5) ** 2
    return np.ascontiguousarray(yy[disc]), np.ascontiguousarray(xx[disc])


def make_windows(n, half=9, noise=0.0, seed=0):
    """Windows of blurred discs with known parameters: (truth (n, 8), data, yy, xx)."""
    rng = np.random.default_rng(seed)
    yy, xx = window_offsets(half)
    truth = np.column_stack(
        [
            rng.uniform(-0.5, 0.5, n),  # cy
            rng.uniform(-0.5, 0.5, n),  # cx
            rng.uniform(4.5, 5.5, n),  # R
            rng.uniform(0.8, 1.2, n),  # s
            rng.uniform(1000, 3000, n),  # a
            rng.uniform(50, 150, n),  # b0
            rng.uniform(-1, 1, n),  # by
            rng.uniform(-1, 1, n),  # bx
        ]
    )
    r = np.hypot(yy[None] - truth[:, :1], xx[None] - truth[:, 1:2])
    data = truth[:, 4:5] * 0.5 * erfc((r - truth[:, 2:3]) / (np.sqrt(2) * truth[:, 3:4]))
    data += truth[:, 5:6] + truth[:, 6:7] * yy + truth[:, 7:8] * xx
    data += noise * rng.standard_normal(data.shape)
    return truth, np.ascontiguousarray(data), yy, xx


def start_from(truth, seed=1):
    rng = np.random.default_rng(seed)
    p0 = truth.copy()
    p0[:, :2] += rng.uniform(-0.6, 0.6, (len(truth), 2))
    p0[:, 2] *= 1.15  # the usual overestimate of the radius guess
    p0[:, 3] = 0.6
    p0[:, 4] *= 0.9
    p0[:, 6:] = 0.0
    return p0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gaussian_tail_matches_erfc(engine, sign):
    u = sign * np.concatenate([np.linspace(0, 40, 40001), [1e-300, 1e-9, 0.5, 1.0]])
    np.testing.assert_allclose(
        engine.gaussian_tail(u), 0.5 * erfc(u / np.sqrt(2)), rtol=0, atol=3e-15
    )


def test_noise_free_fit_recovers_the_parameters(engine):
    truth, data, yy, xx = make_windows(20)
    weight = np.ones_like(data)
    p, cost, res, steps = engine.gauss_newton(
        start_from(truth), data, weight, yy, xx, 9.0, 30, 0.0
    )
    np.testing.assert_allclose(p, truth, rtol=1e-7, atol=1e-7)
    assert (cost < 1e-12 * data.size).all()
    np.testing.assert_allclose(res, 0.0, atol=1e-6)
    assert (steps == 30).all()  # tol 0: every iteration is done


@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_compiled_matches_numpy(tol):
    truth, data, yy, xx = make_windows(40, noise=30.0, seed=3)
    rng = np.random.default_rng(4)
    weight = rng.uniform(0.5, 1.5, data.shape)
    weight[rng.uniform(size=data.shape) < 0.05] = 0.0  # dropped pixels
    p0 = start_from(truth, seed=5)
    got = compiled.gauss_newton(p0, data, weight, yy, xx, 9.0, 6, tol)
    ref = reference.gauss_newton(p0, data, weight, yy, xx, 9.0, 6, tol)
    # same arithmetic up to summation order and the kernel's own erfc
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-9)
    np.testing.assert_allclose(got[2], ref[2], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(got[3], ref[3])
    if tol:
        assert got[3].max() < 6  # the convergence test stopped early


def test_convergence_test_stops_close_to_the_optimum(engine):
    truth, data, yy, xx = make_windows(30, noise=30.0, seed=6)
    weight = np.ones_like(data)
    p0 = start_from(truth, seed=7)
    full, *_ = engine.gauss_newton(p0, data, weight, yy, xx, 9.0, 20, 0.0)
    early, _, _, steps = engine.gauss_newton(p0, data, weight, yy, xx, 9.0, 20, 1e-3)
    assert steps.max() < 20
    assert np.abs(early[:, :2] - full[:, :2]).max() < 1e-4


def test_unweighted_hole_keeps_its_start(engine):
    truth, data, yy, xx = make_windows(3)
    weight = np.ones_like(data)
    weight[1] = 0.0  # no usable pixel: the normal equations are singular
    p0 = start_from(truth)
    p, cost, _, _ = engine.gauss_newton(p0, data, weight, yy, xx, 9.0, 5, 0.0)
    np.testing.assert_array_equal(p[1], p0[1])
    assert cost[1] == 0.0
    np.testing.assert_allclose(p[[0, 2]], truth[[0, 2]], rtol=1e-6, atol=1e-6)


def test_empty_batch(engine):
    yy, xx = window_offsets(4)
    p, cost, res, steps = engine.gauss_newton(
        np.zeros((0, 8)), np.zeros((0, yy.size)), np.zeros((0, yy.size)), yy, xx, 4.0, 3, 0.0
    )
    assert p.shape == (0, 8)
    assert cost.shape == (0,)
    assert res.shape == (0, yy.size)
    assert steps.shape == (0,)


def test_sector_asymmetry_compiled_matches_numpy():
    rng = np.random.default_rng(8)
    yy, xx = window_offsets(9)
    p = np.zeros((60, 8))
    p[:, :2] = rng.uniform(-1, 1, (60, 2))
    p[:30, :2] = np.round(p[:30, :2])  # pixels exactly on the sector boundaries
    p[:, 2], p[:, 3], p[:, 4] = 4.0, 1.0, 100.0
    res = rng.normal(size=(60, yy.size))
    weight = rng.uniform(0.0, 2.0, res.shape)
    weight[weight < 0.2] = 0.0
    got = compiled.sector_asymmetry(p, res, weight, yy, xx, 9.0)
    ref = reference.sector_asymmetry(p, res, weight, yy, xx, 9.0)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)


def test_one_sided_ring_stands_out(engine):
    yy, xx = window_offsets(9)
    p = np.zeros((2, 8))
    p[:, 2], p[:, 3], p[:, 4] = 4.0, 1.0, 100.0
    res = np.zeros((2, yy.size))
    ring = np.hypot(yy, xx) > 7.0
    res[0, ring & (xx < 0)] = -1.0  # darker on one side, as at the taper edge
    # hole 1: no residual at all
    _, ring_asym = engine.sector_asymmetry(p, res, np.ones_like(res), yy, xx, 9.0)
    assert ring_asym[0] > 3.0
    assert ring_asym[1] == 0.0


@pytest.fixture(scope="module")
def many_holes():
    """60 noisy holes in one image (enough for the population start), with their centres."""
    rng = np.random.default_rng(9)
    gy, gx = np.mgrid[0:6, 0:10]
    centres = np.column_stack([20 + 30 * gy.ravel(), 20 + 30 * gx.ravel()]).astype(float)
    centres += rng.uniform(-0.5, 0.5, centres.shape)
    yy, xx = np.mgrid[0:190, 0:310]
    img = np.full(yy.shape, 100.0)
    for cy, cx in centres:
        r = np.hypot(yy - cy, xx - cx)
        img += 2000.0 * 0.5 * erfc((r - 5.0) / (np.sqrt(2) * 0.9))
    return rng.poisson(img).astype(np.float64), centres


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_fit_hole_profiles_backends_agree(many_holes, backend):
    img, centres = many_holes
    seeds = np.rint(centres) + 0.3
    fit = fit_hole_profiles(img, seeds, 6.0, half=11, backend=backend)
    ref = fit_hole_profiles(img, seeds, 6.0, half=11, backend="numpy")
    np.testing.assert_allclose(fit.centres, ref.centres, rtol=0, atol=1e-7)
    np.testing.assert_allclose(fit.ring_asymmetry, ref.ring_asymmetry, rtol=1e-6)
    np.testing.assert_allclose(fit.ring_step, ref.ring_step, rtol=1e-6)
    np.testing.assert_allclose(fit.slope, ref.slope, rtol=0, atol=1e-6 * np.abs(ref.slope).max())
    assert fit.converged.all()
    # Poisson noise on a 2000 ADU disc: ~0.01 px per hole
    assert np.sqrt(((fit.centres - centres) ** 2).sum(1).mean()) < 0.03


def _noisy_batch(n=40, half=9, seed=11):
    """Poisson-like windows, a few hot and masked pixels: (truth, data, ok, yy, xx)."""
    truth, data, yy, xx = make_windows(n, half=half, noise=0.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    data = data + np.sqrt(data) * rng.standard_normal(data.shape)
    hot = rng.uniform(size=data.shape) < 0.004
    data[hot] += 5e4
    ok = rng.uniform(size=data.shape) > 0.03
    return truth, np.ascontiguousarray(data), np.ascontiguousarray(ok), yy, xx


@pytest.mark.parametrize("nan_hole", [False, True])
def test_edge_variances_compiled_matches_numpy(nan_hole):
    truth, data, ok, yy, xx = _noisy_batch()
    p = truth.copy()
    res = np.ascontiguousarray(data - reference.model(p, yy, xx, False)[0])
    ok[3, :] = False  # no usable pixel: NaN
    ok[4, 4:] = False  # fewer than 5
    if nan_hole:
        p[7] = np.nan  # a failed fit: no edge, NaN out
    got = compiled.edge_variances(p, res, ok, yy, xx)
    ref = reference.edge_variances(p, res, ok, yy, xx)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)  # NaN where NaN
    assert np.isnan(got[0][[3, 4]]).all()
    # against the definition: (1.4826 median |res|)^2 over the background
    r = np.hypot(yy - p[0, 0], xx - p[0, 1])
    sel = ok[0] & (0.5 * erfc((r - p[0, 2]) / (np.sqrt(2) * p[0, 3])) < 0.02)
    np.testing.assert_allclose(got[0][0], (1.4826 * np.median(np.abs(res[0, sel]))) ** 2)


def test_clip_weights_compiled_matches_numpy():
    truth, data, ok, yy, xx = _noisy_batch()
    res = np.ascontiguousarray(data - reference.model(truth, yy, xx, False)[0])
    var_bg = np.full(len(truth), 100.0)
    for exponent in (1.5, 1.0):
        got = compiled.clip_weights(truth, res, ok, yy, xx, var_bg, 0.8, exponent, 5.0)
        ref = reference.clip_weights(truth, res, ok, yy, xx, var_bg, 0.8, exponent, 5.0)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-12)
    assert not got[1][~ok].any()
    assert (got[2][got[1]] > 0).all()
    assert (got[2][~got[1]] == 0).all()
    assert (~got[1] & ok).sum() >= 0.5 * (np.abs(res) > 1e4).sum()  # the hot pixels go


def _warm_inputs(half=9, n=40, seed=11):
    truth, data, ok, yy, xx = _noisy_batch(n=n, half=half, seed=seed)
    rng = np.random.default_rng(seed + 2)
    p0 = truth.copy()
    p0[:, :2] += rng.uniform(-0.05, 0.05, (n, 2))  # a warm start: the previous shape, near
    p0[:, 2:4] *= rng.uniform(0.97, 1.03, (n, 2))
    p0[:, 4:] = 0.0
    rr = np.hypot(yy, xx)
    outer = np.ascontiguousarray(rr >= half - 1.5)
    inner = np.ascontiguousarray(rr <= 0.5 * np.median(truth[:, 2]))
    return truth, p0, data, ok, yy, xx, outer, inner


@pytest.mark.parametrize("start_levels", [True, False])
def test_warm_first_pass_compiled_matches_numpy(start_levels):
    truth, p0, data, ok, yy, xx, outer, inner = _warm_inputs()
    if not start_levels:
        p0[:, 4:6] = truth[:, 4:6] * 0.9
    ok[5, outer] = False  # no background pixel left: b0 starts at 0
    got = compiled.warm_first_pass(
        p0, data, ok, yy, xx, outer, inner, 9.0, start_levels, 0.5, 1, 1e-3
    )
    ref = reference.warm_first_pass(
        p0, data, ok, yy, xx, outer, inner, 9.0, start_levels, 0.5, 1, 1e-3
    )
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-7)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-7)


def test_warm_first_pass_start_levels_are_medians():
    _, p0, data, ok, yy, xx, outer, inner = _warm_inputs(n=6)
    p, _, _ = compiled.warm_first_pass(p0, data, ok, yy, xx, outer, inner, 9.0, True, 0.5, 0, 0.0)
    for i in range(6):
        b0 = np.median(data[i, ok[i] & outer])
        assert p[i, 5] == pytest.approx(b0, rel=1e-15)
        assert p[i, 4] == pytest.approx(np.median(data[i, ok[i] & inner]) - b0, rel=1e-12)
    np.testing.assert_array_equal(p[:, :4], p0[:, :4])  # no iteration asked


def test_warm_weighted_pass_compiled_matches_numpy():
    truth, p0, data, ok, yy, xx, outer, inner = _warm_inputs()
    p1, var_bg, _ = reference.warm_first_pass(
        p0, data, ok, yy, xx, outer, inner, 9.0, True, 0.5, 1, 0.0
    )
    var_bg = np.ascontiguousarray(np.where(np.isfinite(var_bg), var_bg, 1.0))
    args = (p1, data, ok, yy, xx, 9.0, var_bg, 0.9, 1.5, 5.0, 2, 1e-3)
    got = compiled.warm_weighted_pass(*args)
    ref = reference.warm_weighted_pass(*args)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-7)
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_array_equal(got[3], ref[3])
    np.testing.assert_allclose(got[4], ref[4], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got[5], ref[5], rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(got[2] + got[3], ok.sum(1))
    # the hot pixels (0.4 %, 20-50 amplitudes) are dropped from the first
    # pass too: the centres land on the truth to the noise (~0.02 px)
    assert np.abs(got[0][:, :2] - truth[:, :2]).max() < 0.1
    clean, *_ = compiled.warm_first_pass(
        p0, data, ok, yy, xx, outer, inner, 9.0, True, np.inf, 1, 0.0
    )
    assert np.abs(clean[:, :2] - truth[:, :2]).max() > 0.3  # without the spike test


@pytest.mark.parametrize("engine_name", ["cython", "numpy"])
def test_warm_passes_of_tiny_and_empty_batches(engine_name):
    engine = ENGINES[engine_name]
    yy, xx = window_offsets(1)  # 9 pixels... and nothing to fit
    nothing = np.zeros((0, yy.size))
    none = np.zeros((0, yy.size), dtype=bool)
    mask = np.ones(yy.size, dtype=bool)
    p, bg, top = engine.warm_first_pass(
        np.zeros((0, 8)), nothing, none, yy, xx, mask, mask, 1.0, True, 0.5, 1, 0.0
    )
    assert p.shape == (0, 8)
    assert bg.shape == top.shape == (0,)
    out = engine.warm_weighted_pass(
        np.zeros((0, 8)), nothing, none, yy, xx, 1.0, np.zeros(0), 0.0, 1.5, 5.0, 2, 0.0
    )
    assert [a.shape for a in out] == [(0, 8)] + [(0,)] * 5
    # one hole in a 3x3 window: too few pixels for a noise estimate (NaN), no crash
    truth, data, _, _ = make_windows(1, half=1, seed=2)
    ok = np.ones(data.shape, dtype=bool)
    p, bg, top = engine.warm_first_pass(
        truth, data, ok, yy, xx, mask, mask, 1.0, True, 0.5, 1, 0.0
    )
    assert np.isnan(top).all()
