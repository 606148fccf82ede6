"""calibrate() on X-ray-shadow grid images of a third generator, judged through pyFAI.

Usage (from the repository root)::

    python benchmarks/probe/probe.py                 # every case
    python benchmarks/probe/probe.py --only gap      # cases whose name holds "gap"
    python benchmarks/probe/probe.py --json out.json

The images come from ``tests/_probe_grid.py`` (holes as disc shadows
through a PSF with Lorentzian-like tails, vignetting, barrel plus
fibre-bundle steps and kinks, non-square pixels, rotations up to 45°,
missing holes, zingers, saturation, low-count Poisson noise, int32 with a
negative offset, round or partial lit areas, module gaps). Each case is
calibrated, saved, loaded with ``pyFAI.detector_factory`` and measured as in
``benchmarks/robustness.py``: found / missed clean holes (0.5 px), false
holes (farther than 1 px from every true lit hole, missing sites included as
not holes), the worst centre error of a used hole away from a step line, the
dense residual (``det``: ``ccdgrid.synthetic.dense_residual``, affine part
removed; ``frame``: corrected against true positions up to an affine map),
both on lit pixels the file leaves unmasked, and with a 1.5 pitch band
around the step/kink lines left out (``det_off``). ``ratio`` is the
calibrated pixel2/pixel1 over the true aspect, minus 1.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(ROOT / "benchmarks"))
import robustness as rb  # noqa: E402  (its harness and its file loader)

pg = rb._load("_probe_grid", ROOT / "tests" / "_probe_grid.py")

STEPS = [(400, 300, 20.0, "step", 0.35, 1.0), (700, 650, 95.0, "step", -0.25, 1.0)]
KINKS = [(500, 200, 60.0, "kink", 0.4, 0.0), (300, 800, -30.0, "step", 0.2, 1.5)]


def _scaled(lines, n):
    s = n / 1024.0
    return [(y * s, x * s, *rest) for y, x, *rest in lines]


def cases():
    out = {}
    n = 1024
    out["base-1024"] = ((n, n), dict())
    out["psf-tail-strong"] = ((n, n), dict(psf_tail=0.5, psf_gamma=6.0))
    out["vignette5"] = ((n, n), dict(vignetting=5.0))
    out["rot45"] = ((n, n), dict(rotation_deg=45.0))
    out["rot30-aspect1.03"] = ((n, n), dict(rotation_deg=30.0, aspect=1.03))
    out["aspect0.98"] = ((n, n), dict(aspect=0.98, rotation_deg=3.0))
    out["steps"] = ((n, n), dict(lines=STEPS))
    out["kinks"] = ((n, n), dict(lines=KINKS))
    out["barrel30"] = ((n, n), dict(k1=-30.0))
    out["missing8"] = ((n, n), dict(missing=8))
    out["zingers300"] = ((n, n), dict(zingers=300, hot=300))
    out["saturated"] = ((n, n), dict(peak=200000.0))
    out["lowcount50"] = ((n, n), dict(peak=50.0, dark=0.0))
    out["int32-neg"] = ((n, n), dict(dtype="int32", dark=-150.0, peak=3000.0))
    out["disc-lit"] = ((n, n), dict(lit="disc"))
    out["half-lit"] = ((n, n), dict(lit="half"))
    out["small-disc-lit"] = ((n, n), dict(lit="small", vignetting=2.0))
    out["small-disc-rot45-aspect0.97"] = (
        (n, n),
        dict(lit="small", rotation_deg=45.0, aspect=0.97, pitch_px=40.0, radius_px=4.0),
    )
    out["gaps-1"] = ((n, n), dict(gaps=[("row", 500, 17), ("col", 330, 7)], gap_value=-1))
    out["gaps-0-dead"] = ((n, n), dict(gaps=[("col", 600, 10)], gap_value=0, dead_rows=3))
    out["barrel60"] = ((n, n), dict(k1=-60.0))
    out["pincushion40-rot20"] = ((n, n), dict(k1=40.0, rotation_deg=20.0))
    out["lowcount20-vignette5"] = ((n, n), dict(peak=20.0, dark=0.0, vignetting=5.0))
    out["dense-p24"] = ((n, n), dict(pitch_px=24.0, radius_px=3.0, psf_tail=0.4))
    out["big-holes-p100"] = ((n, n), dict(pitch_px=100.0, radius_px=20.0))
    out["uint16-hot"] = ((n, n), dict(dtype="uint16", hot=3000, zingers=100, dead_rows=5))
    out["all-2048"] = (
        (2048, 2048),
        dict(
            pitch_px=98.0,
            radius_px=5.25,
            rotation_deg=12.0,
            aspect=1.02,
            k1=-25.0,
            lines=_scaled(STEPS + KINKS, 2048),
            missing=6,
            vignetting=4.0,
            zingers=400,
            hot=200,
            lit="disc",
            gaps=[("row", 1020, 9)],
            dtype="int32",
            dark=-80.0,
            peak=400.0,
            seed=5,
        ),
    )
    out["all-4096"] = (
        (4096, 4096),
        dict(
            pitch_px=98.0,
            radius_px=5.25,
            rotation_deg=-7.0,
            aspect=0.985,
            k1=-40.0,
            lines=_scaled(STEPS + KINKS, 4096),
            missing=10,
            vignetting=3.0,
            zingers=1000,
            hot=500,
            gaps=[("row", 2040, 17), ("col", 1030, 7)],
            peak=100.0,
            dark=0.0,
            seed=6,
        ),
    )
    return out


def run(name, shape, kw, workdir):
    from ccdgrid.synthetic import dense_residual

    t = time.perf_counter()
    g = pg.make_probe(shape, **kw)
    row = {"case": name, "gen_s": time.perf_counter() - t, "clean": int(g.clean.sum())}
    done = rb.calibrate_through_pyfai(g.image, name, workdir, row)
    if done is None:
        return row
    cal, (dy, dx, mask) = done
    found = np.asarray(cal.holes.peaks)
    used = found[cal.lattice.valid]
    dist = cKDTree(used).query(g.holes[g.clean])[0]
    row["found"] = int((dist <= 0.5).sum())
    row["missed"] = int((dist > 0.5).sum())
    row["missed_at"] = g.holes[g.clean][dist > 0.5][:4].round(1).tolist()
    lit_holes = g.holes
    row["false"] = int((cKDTree(lit_holes).query(found)[0] > 1.0).sum())
    if len(g.missing):
        row["false"] += int((cKDTree(g.missing).query(found)[0] < 2.0).sum())
    far = ~g.field.near_line(used, g.radius + 3.0)
    row["ctr_max"] = float(cKDTree(g.holes).query(used[far])[0].max())
    row["ratio"] = cal.pixel_size[1] / cal.pixel_size[0] / kw.get("aspect", 1.0) - 1.0
    det = dense_residual(g.field, dy, dx, mask, region=g.lit, n=20000, seed=3)
    row["det_rms"], row["det_max"] = det.rms, det.max
    pitch = kw.get("pitch_px", 60.0)
    off = ~g.field.near_line(det.points, 1.5 * pitch)
    if g.field.lines and off.any():
        region = g.lit.copy()
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        pts = np.column_stack([yy.ravel(), xx.ravel()]).astype(float)
        region &= ~g.field.near_line(pts, 1.5 * pitch).reshape(shape)
        d2 = dense_residual(g.field, dy, dx, mask, region=region, n=20000, seed=3)
        row["det_off"] = d2.rms
    maps = rb._CornerMaps(dy, dx)

    class _G:
        field = g.field

    row["frame_rms"], row["frame_max"] = rb.rob.frame_residual(_G, maps, det.points)
    row["unmasked_lit"] = float(((mask == 0) & g.lit).sum() / g.lit.sum())
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as wd:
        for name, (shape, kw) in cases().items():
            if args.only and args.only not in name:
                continue
            row = run(name, shape, kw, wd)
            rows.append(row)
            print(
                json.dumps(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                ),
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
