"""calibrate() on plates of a seventh generator, judged through pyFAI against the true field.

Usage (from the repository root, with ccdgrid and pyFAI installed)::

    python benchmarks/outside_plates.py                 # the six 2048² plates of the README
    python benchmarks/outside_plates.py --all           # also 4096², 2048 x 3072 and a lit disc
    python benchmarks/outside_plates.py --only mild     # plates whose name holds "mild"
    python benchmarks/outside_plates.py --order 2       # the maps held to r² log r (order 2)
    python benchmarks/outside_plates.py --size 512      # every plate at 512² (a quick check)

A generator written apart from :mod:`ccdgrid.synthetic`, from
``tests/_independent_grid.py`` and from ``benchmarks/_fuzz_plates.py``: the
field is given as the *true* position ``T(y, x)`` of every detector point
(radial terms of r² and r⁴ about an off-centre point, a Gaussian bump and
a plane-wave ripple of 2.5 to 10 pitches), a hole is a disc with a logistic
rim (0.6 px) in the true frame, rendered 2 x 2 sub-sampled through ``T``,
blurred by a Gaussian PSF (1.2 px), lit with vignetting (and a soft lit
disc), with Poisson and read noise, hot pixels, dead rows and columns,
saturation, and float data with negative noise. Each plate is calibrated
with ``ccdgrid.calibrate`` (nothing set but the pitch), saved, loaded with
``pyFAI.detector_factory``, and corner A of every unmasked pixel, at pyFAI's
position for it, is compared with ``T`` of that corner up to an affine map
(the ideal frame's scale, rotation and origin are the plate's, which a
calibration only knows through its own choices): RMS, 99th percentile and
largest distance, px, over up to 200 000 corners.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from scipy.ndimage import gaussian_filter

# name: (shape, field kind, pitch px, hole diameter px, rotation deg, seed, rendering options)
PLATES = {
    "mild-ripple": ((2048, 2048), "mild", 98.0, 12.0, 0.7, 1, {}),
    "strong-hot-dead": (
        (2048, 2048), "strong", 98.0, 12.0, -1.3, 2, {"hot": 3000, "dead_rows": 4, "dead_cols": 3},
    ),
    "wild-noisy": (
        (2048, 2048), "wild", 80.0, 10.0, 2.0, 3,
        {"signal": 300.0, "bg": 400.0, "noise_read": 20.0},
    ),
    "radial-only": ((2048, 2048), "mild-noripple-nobump", 98.0, 12.0, 0.7, 1, {}),
    "wild-radial-snr4": (
        (2048, 2048), "wild-noripple", 90.0, 11.0, 1.1, 6,
        {"signal": 60.0, "bg": 200.0, "noise_read": 10.0},
    ),
    "float-negative-noise": (
        (2048, 2048), "strong-long", 70.0, 8.0, 0.2, 7,
        {"bg": 0.0, "noise_read": 30.0, "signal": 800.0, "dtype": "float32"},
    ),
}  # fmt: skip
MORE = {
    "4096-hot-dead": (
        (4096, 4096), "strong-long", 98.0, 12.0, 0.4, 4,
        {"hot": 20000, "dead_rows": 6, "dead_cols": 6, "supersample": 1},
    ),
    "2048x3072-saturated": (
        (2048, 3072), "strong-long", 110.0, 16.0, -0.6, 5, {"saturate": 3000},
    ),
    "lit-disc": (
        (2048, 2048), "strong-long", 98.0, 12.0, 0.3, 8, {"lit_radius": 0.9, "vignette": 0.6},
    ),
}  # fmt: skip


def true_position(shape, kind, seed):
    """``T(y, x) -> (y', x')``: the true position of detector point ``(y, x)``, px.

    ``kind`` is ``"mild"``, ``"strong"`` or ``"wild"`` (radial terms of 4, 25
    or 60 px at half the image's size, a bump of 1, 3 or 5 px, a ripple of
    0.3, 1 or 2 px), with ``-noripple``, ``-nobump`` or ``-long`` (a ripple
    period doubled to 500-1000 px) appended.
    """
    ny, nx = shape
    rng = np.random.default_rng(seed)
    cy, cx = (ny - 1) / 2 + rng.uniform(-50, 50), (nx - 1) / 2 + rng.uniform(-50, 50)
    half = 0.5 * max(ny, nx)
    base, _, extra = kind.partition("-")
    k1 = {"mild": 4.0, "strong": 25.0, "wild": 60.0}[base] * rng.choice([-1, 1])
    k2 = k1 * rng.uniform(-0.3, 0.3)
    ripple = {"mild": 0.3, "strong": 1.0, "wild": 2.0}[base] * ("noripple" not in extra)
    period = rng.uniform(250, 500) * (2.0 if "long" in extra else 1.0)
    angle = rng.uniform(0, np.pi)
    bump_at = (rng.uniform(0.3, 0.7) * ny, rng.uniform(0.3, 0.7) * nx)
    bump_w = rng.uniform(150, 300) * max(ny, nx) / 2048
    bump = {"mild": 1.0, "strong": 3.0, "wild": 5.0}[base] * ("nobump" not in extra)

    def field(y, x):
        dy, dx = y - cy, x - cx
        r2 = (dy * dy + dx * dx) / half**2
        radial = (k1 * r2 + k2 * r2 * r2) / half
        phase = (np.cos(angle) * y + np.sin(angle) * x) / period * 2 * np.pi
        g = np.exp(-((y - bump_at[0]) ** 2 + (x - bump_at[1]) ** 2) / (2 * bump_w**2))
        ty = y + dy * radial + ripple * np.sin(phase) + bump * g
        tx = x + dx * radial + 0.7 * ripple * np.cos(1.3 * phase) - 0.6 * bump * g
        return ty, tx

    return field


def render(shape, field, pitch, hole_d, rot_deg, seed, *, signal=4000.0, bg=100.0,
           noise_read=5.0, hot=0, dead_rows=0, dead_cols=0, saturate=None, vignette=0.4,
           dtype="uint16", lit_radius=None, supersample=2):  # fmt: skip
    """The grid image of a plate seen through ``field`` (see the module's notes)."""
    ny, nx = shape
    rng = np.random.default_rng(seed + 1)
    t = np.deg2rad(rot_deg)
    steps = pitch * np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # rows: (y, x)
    inverse = np.linalg.inv(steps)
    origin = rng.uniform(0, pitch, 2)
    holes = np.zeros(shape)
    s = supersample
    for a in range(s):
        for b in range(s):
            yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
            ty, tx = field(yy + (a + 0.5) / s - 0.5, xx + (b + 0.5) / s - 0.5)
            cell = np.stack([ty - origin[0], tx - origin[1]], -1) @ inverse
            off = (cell - np.round(cell)) @ steps  # from the nearest hole, true frame, px
            holes += 1.0 / (1.0 + np.exp((np.hypot(off[..., 0], off[..., 1]) - hole_d / 2) / 0.6))
    holes = gaussian_filter(holes / (s * s), 1.2)
    yy, xx = np.mgrid[0:ny, 0:nx]
    rr = np.hypot((yy - ny / 2) / (ny / 2), (xx - nx / 2) / (nx / 2))
    flat = 1.0 - vignette * rr**2
    if lit_radius is not None:
        flat /= 1.0 + np.exp((rr - lit_radius) / 0.02)
    expected = np.clip(bg + signal * holes * flat, 0, None)
    out = rng.poisson(expected).astype(np.float64) + rng.normal(0, noise_read, shape)
    if hot:
        out.flat[rng.integers(0, ny * nx, hot)] = rng.uniform(5, 20, hot) * signal
    out[rng.integers(0, ny, dead_rows)] = 0
    out[:, rng.integers(0, nx, dead_cols)] = 0
    if saturate is not None:
        out = np.minimum(out, saturate)
    if np.issubdtype(np.dtype(dtype), np.integer):
        out = np.clip(np.round(out), 0, np.iinfo(dtype).max)
    return out.astype(dtype)


def residual(path, field, shape):
    """``(rms, p99, max, valid fraction)``: pyFAI's corners against ``field``, affine removed."""
    import pyFAI

    det = pyFAI.detector_factory(path)
    corners = det.get_pixel_corners()  # (ny, nx, 4, 3): z, y, x in metres
    cy = corners[:, :, 0, 1] / det.pixel1  # corner A of pixel (i, j) sits at (i, j) in pyFAI
    cx = corners[:, :, 0, 2] / det.pixel2
    mask = det.mask if det.mask is not None else np.zeros(shape, np.int8)
    ok = (mask == 0) & np.isfinite(cy) & np.isfinite(cx)
    rows = np.flatnonzero(ok.ravel())
    rows = np.random.default_rng(0).choice(rows, min(200_000, rows.size), replace=False)
    iy, ix = np.unravel_index(rows, shape)
    ty, tx = field(iy - 0.5, ix - 0.5)  # the same corner, in index coordinates
    design = np.column_stack([np.ones(rows.size), ty, tx])
    miss = []
    for comp in (cy.ravel()[rows], cx.ravel()[rows]):
        coef, *_ = np.linalg.lstsq(design, comp, rcond=None)
        miss.append(comp - design @ coef)
    d = np.hypot(*miss)
    return float(np.sqrt(np.mean(d**2))), float(np.percentile(d, 99)), float(d.max()), ok.mean()


def run(name, plate, size, order, workdir):
    import ccdgrid
    from ccdgrid import maps as maps_module

    shape, kind, pitch, hole_d, rot, seed, options = plate
    if size:
        shape = tuple(round(n * size / max(shape)) for n in shape)
    field = true_position(shape, kind, seed)
    t0 = time.perf_counter()
    image = render(shape, field, pitch, hole_d, rot, seed, **options)
    t_gen = time.perf_counter() - t0
    original = maps_module.displacement_maps
    if order:
        # the maps held to one kernel order (the pipeline lets GCV choose)
        def held(*args, **kwargs):
            if kwargs.get("smoothing") is None:
                kwargs.setdefault("order", order)
            return original(*args, **kwargs)

        import ccdgrid.pipeline as pipeline

        pipeline.displacement_maps = held
    try:
        t0 = time.perf_counter()
        cal = ccdgrid.calibrate(image, pitch=5e-3)
        t_cal = time.perf_counter() - t0
    except ccdgrid.CcdgridError as exc:
        return f"{name:22s} {'x'.join(map(str, shape)):>10s}  refused: {exc}"
    finally:
        if order:
            pipeline.displacement_maps = original
    path = os.path.join(workdir, f"{name}.h5")
    cal.save(path)
    rms, p99, worst, valid = residual(path, field, shape)
    kernel = {2: "r² log r", 3: "-r⁴ log r"}.get(cal.maps.order, cal.maps.method)
    return (
        f"{name:22s} {'x'.join(map(str, shape)):>10s} {rms:9.4f} {p99:8.4f} {worst:7.3f} "
        f"{valid:6.2f} {cal.cross_validation.rms_px:7.4f}  {kernel} deg {cal.maps.degree}, "
        f"smoothing {cal.maps.smoothing:.3g}  "
        f"({t_gen:.1f} s to render, {t_cal:.2f} s to calibrate)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the larger plates")
    parser.add_argument("--only", default="", help="plates whose name holds this")
    parser.add_argument("--order", type=int, choices=(2, 3), help="hold the maps to one order")
    parser.add_argument("--size", type=int, help="scale every plate to this size (its long side)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    plates = {**PLATES, **(MORE if args.all else {})}
    print(f"$ python benchmarks/outside_plates.py {' '.join(argv)}".rstrip())
    print(
        f"{'plate':22s} {'shape':>10s} {'RMS px':>9s} {'p99 px':>8s} {'max px':>7s} "
        f"{'valid':>6s} {'CV px':>7s}  maps"
    )
    with tempfile.TemporaryDirectory() as workdir:
        for name, plate in plates.items():
            if args.only in name:
                print(run(name, plate, args.size, args.order, workdir), flush=True)


if __name__ == "__main__":
    main()
