"""calibrate() on realistic images of an independent generator, judged through pyFAI.

Usage (from the repository root, with ccdgrid and pyFAI installed)::

    python benchmarks/robustness.py                    # every case, 2048² and 4096²
    python benchmarks/robustness.py --sizes 2048       # the 2048² cases only
    python benchmarks/robustness.py --only gauss       # cases whose id holds "gauss"
    python benchmarks/robustness.py --json out.json    # also save the rows
    python benchmarks/robustness.py --fuzz 24          # 24 random plates, 768-1280 px

What a judge does, case by case: render a grid image with
``tests/_independent_grid.py`` (a model written apart from
:mod:`ccdgrid.synthetic`: Gaussian and super-Gaussian holes, hot pixels and
2x2 clusters, dead rows and columns as 0 or NaN, 20 px barrel or pincushion,
heavy noise, elliptical or circular lit areas that cut holes, a beam stop),
run ``ccdgrid.calibrate`` on it, save the detector file, load that file with
``pyFAI.detector_factory`` and compare the distortion its pixel corners hold
with the generator's true field. The measurement helpers are those of
``tests/test_robustness.py`` (imported, not copied):

* ``frame``: corrected positions ``p + d_rec(p)`` against true positions
  ``p + d(p)`` up to an affine map of the true frame, at 20 000 random points
  of the fully lit pixels the file leaves unmasked (``frame_residual``);
* ``det``: ``ccdgrid.synthetic.dense_residual`` on the same points, ``d_rec -
  d`` up to an affine map of the true positions (the same measure as
  ``frame``, by another implementation);
* ``holes``: the frame residual at the true positions of the visible holes;
* found / missed: clean visible holes (no defect in their footprint) matched
  by an indexed hole within 0.5 px, or not; false: reported holes farther than
  1 px from every lit true hole; ``ctr max``: the worst distance of an indexed
  hole from its true position.

``d_rec`` is read from pyFAI's corners: corner A of pixel ``(i, j)`` sits at
``pixel1 (i + dy)``, so ``dy = A_y / pixel1 - i`` (float32 metres: ~1e-6 px).
Times are wall and CPU (``time.process_time``) seconds of ``calibrate`` and of
its hole search, then of the save and the pyFAI load. The machine is shared:
quote the load (printed) with the times.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parent.parent


def _load(name, path):
    """Import a module from a file (``tests`` is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_load("_independent_grid", ROOT / "tests" / "_independent_grid.py")  # what conftest.py does
rob = _load("test_robustness", ROOT / "tests" / "test_robustness.py")
gen = rob.gen  # tests/_independent_grid.py

# realistic FReLoN-like plates: 5 mm pitch at 50-120 µm pixels, ~10 px holes
_HEAVY_NOISE = dict(amplitude=120.0, background=(0.2, 0.45), dark=20.0, read_noise=3.0)
_DEFECTS = dict(hot_pixels=200, hot_clusters=30, dead_rows=4, dead_cols=3)


def _case(size, pitch, profile, width, field, **kw):
    kw.setdefault("lit", None)
    return (size, size), dict(pitch_px=pitch, profile=profile, width_px=width, **kw), field


BARREL = dict(k1=-20.0, k2=-2.0, t1=1.0)  # ~22 px at the corners
PINCUSHION = dict(k1=17.0, k2=3.0, t2=-1.0)  # ~20 px
MILD = dict(k1=-6.0, t1=0.5)


def cases():
    """id -> (shape, make_grid keywords, Field keywords)."""
    out = {}
    for n in (2048, 4096):
        s = n // 2048  # pitch and hole size grow with the image (same plate, finer pixels)
        out |= {
            f"gauss-{n}-p{80 * s}-clean": _case(n, 80 * s, "gauss", 3.0 * s, MILD),
            f"super-{n}-p{64 * s}-clean": _case(n, 64 * s, "super", 5.0 * s, MILD),
        }
        if n == 2048:
            out |= {
                "gauss-2048-p40-small-holes": _case(n, 40, "gauss", 2.0, MILD),
                "super3-2048-p100-big-holes": _case(n, 100, "super", 7.0, MILD, super_order=3),
                "gauss-2048-p80-hot200-clusters": _case(
                    n, 80, "gauss", 3.0, MILD, hot_pixels=200, hot_clusters=30
                ),
                "gauss-2048-p80-dead-lines-0": _case(
                    n, 80, "gauss", 3.0, MILD, dead_rows=4, dead_cols=3
                ),
                "super-2048-p80-dead-lines-nan": _case(
                    n, 80, "super", 5.0, MILD, dead_rows=4, dead_cols=3, dead_value=np.nan
                ),
                "gauss-2048-p80-barrel22": _case(n, 80, "gauss", 3.0, BARREL),
                "super-2048-p64-pincushion20": _case(n, 64, "super", 5.0, PINCUSHION),
                "gauss-2048-p80-noise-snr9": _case(n, 80, "gauss", 3.0, MILD, **_HEAVY_NOISE),
                "super-2048-p80-noise-snr9": _case(n, 80, "super", 5.0, MILD, **_HEAVY_NOISE),
                "gauss-2048-p80-circle-lit": _case(
                    n, 80, "gauss", 3.0, MILD, lit="ellipse", lit_axes=(0.48, 0.48)
                ),
                "super-2048-p80-ellipse-lit": _case(
                    n, 80, "super", 5.0, MILD, lit="ellipse", lit_axes=(0.45, 0.40)
                ),
                "gauss-2048-p80-beam-stop": _case(
                    n, 80, "gauss", 3.0, MILD, beam_stop=(1000, 1100, 120)
                ),
            }
        out |= {
            f"gauss-{n}-p{72 * s}-all": _case(
                n,
                72 * s,
                "gauss",
                3.0 * s,
                BARREL,
                lit="ellipse",
                lit_axes=(0.48, 0.48),
                beam_stop=(0.48 * n, 0.55 * n, 0.05 * n),
                missing_fraction=0.03,
                **_DEFECTS,
            ),
            f"super-{n}-p{90 * s}-all-nan-noise": _case(
                n,
                90 * s,
                "super",
                5.0 * s,
                PINCUSHION,
                lit="ellipse",
                lit_axes=(0.46, 0.42),
                beam_stop=(0.5 * n, 0.45 * n, 0.06 * n),
                dead_value=np.nan,
                **_DEFECTS,
                **_HEAVY_NOISE,
            ),
        }
    # dense plates, last so that the seeds of the cases above stay as they were:
    # ~7 000 and ~16 000 holes (the maps are fitted tile by tile)
    out["gauss-2048-p24-dense"] = _case(2048, 24, "gauss", 1.5, MILD)
    out["super-4096-p32-dense"] = _case(4096, 32, "super", 3.0, BARREL)
    return out


def fuzz_cases(count, seed=2026):
    """``count`` random plates, 768-1280 px: id -> (shape, make_grid keywords, Field keywords).

    Pitch 28-120 px, Gaussian or super-Gaussian holes of 3-9 % / 5-15 % of
    it, any rotation in +-45 deg, 3 % aspect, a lit ellipse or none, up to 300
    hot pixels and 30 clusters, 3 dead rows and columns (0 or NaN), 5 % of
    holes blocked, heavy noise one time in three, up to 20 px of radial
    distortion with tangential terms.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(count):
        n = int(rng.choice([768, 1024, 1280]))
        pitch = float(rng.uniform(28, 120))
        profile = str(rng.choice(["gauss", "super"]))
        lo, hi = (0.03, 0.09) if profile == "gauss" else (0.05, 0.15)
        kw = dict(
            pitch_px=pitch,
            profile=profile,
            width_px=float(pitch * rng.uniform(lo, hi)),
            rotation_deg=float(rng.uniform(-45, 45)),
            lit=None,
            hot_pixels=int(rng.integers(0, 300)),
            hot_clusters=int(rng.integers(0, 30)),
            dead_rows=int(rng.integers(0, 4)),
            dead_cols=int(rng.integers(0, 4)),
            dead_value=float(rng.choice([0.0, np.nan])),
            missing_fraction=float(rng.uniform(0, 0.05)),
            aspect=float(rng.uniform(0.97, 1.03)),
        )
        if rng.random() < 0.5:
            kw.update(lit="ellipse", lit_axes=tuple(float(a) for a in rng.uniform(0.4, 0.5, 2)))
        if rng.random() < 0.3:
            kw.update(_HEAVY_NOISE, amplitude=float(rng.uniform(100, 400)))
        terms = dict(
            k1=float(rng.uniform(-20, 20)),
            k2=float(rng.uniform(-3, 3)),
            t1=float(rng.uniform(-1, 1)),
            t2=float(rng.uniform(-1, 1)),
        )
        out[f"fuzz{k}-{n}-p{pitch:.0f}-{profile}-w{kw['width_px']:.1f}"] = ((n, n), kw, terms)
    return out


class _CornerMaps:
    """``displacement_at`` from corner maps ``(ny + 1, nx + 1)``, bilinear in each pixel."""

    def __init__(self, dy, dx):
        self.dy, self.dx = dy, dx

    def displacement_at(self, points):
        ny, nx = self.dy.shape[0] - 1, self.dy.shape[1] - 1
        iy = np.clip(np.rint(points[:, 0]).astype(np.int64), 0, ny - 1)
        ix = np.clip(np.rint(points[:, 1]).astype(np.int64), 0, nx - 1)
        fy = points[:, 0] + 0.5 - iy
        fx = points[:, 1] + 0.5 - ix
        out = []
        for m in (self.dy, self.dx):
            top = m[iy, ix] * (1 - fx) + m[iy, ix + 1] * fx
            bottom = m[iy + 1, ix] * (1 - fx) + m[iy + 1, ix + 1] * fx
            out.append(top * (1 - fy) + bottom * fy)
        return np.stack(out, axis=1)


def pyfai_maps(path):
    """Corner maps (dy, dx) px and pixel mask read back through ``pyFAI.detector_factory``."""
    import pyFAI

    det = pyFAI.detector_factory(str(path))
    corners = det.get_pixel_corners()  # (ny, nx, 4, 3) float32 m: A, B, C, D; (z, y, x)
    ny, nx = corners.shape[:2]
    maps = []
    for axis, pixel in ((1, det.pixel1), (2, det.pixel2)):
        pos = np.empty((ny + 1, nx + 1))
        pos[:-1, :-1] = corners[:, :, 0, axis]  # A = corner (i, j)
        pos[-1, :-1] = corners[-1, :, 1, axis]  # B = (i + 1, j)
        pos[:-1, -1] = corners[:, -1, 3, axis]  # D = (i, j + 1)
        pos[-1, -1] = corners[-1, -1, 2, axis]  # C = (i + 1, j + 1)
        pos /= pixel
        nominal = np.arange(ny + 1.0)[:, None] if axis == 1 else np.arange(nx + 1.0)[None, :]
        maps.append(pos - nominal)
    mask = np.zeros((ny, nx), np.int8) if det.mask is None else np.asarray(det.mask)
    return maps[0], maps[1], mask


def calibrate_through_pyfai(image, name, workdir, row):
    """``(calibration, (dy, dx, mask))`` as pyFAI reads the saved file, or None on an error.

    Calibrates ``image`` with nothing set by hand, saves the detector file in
    ``workdir``, loads it back through pyFAI (:func:`pyfai_maps`) and deletes
    it; the timings (``cal_s``, ``cal_cpu_s``, ``find_holes_s``, ``save_s``,
    ``load_s``), or ``error``, go into ``row``.
    """
    from ccdgrid.errors import CcdgridError
    from ccdgrid.pipeline import calibrate

    wall, cpu = time.perf_counter(), time.process_time()
    try:
        cal = calibrate(image)
    except CcdgridError as exc:
        row["error"] = str(exc)[:80]
        return None
    row["cal_s"] = time.perf_counter() - wall
    row["cal_cpu_s"] = time.process_time() - cpu
    row["find_holes_s"] = cal.timings["find_holes"]
    path = Path(workdir) / f"{name}.h5"
    t = time.perf_counter()
    cal.save(path)
    row["save_s"] = time.perf_counter() - t
    t = time.perf_counter()
    maps = pyfai_maps(path)
    row["load_s"] = time.perf_counter() - t
    path.unlink()
    return cal, maps


def run_case(name, shape, kwargs, terms, seed, workdir):
    """One row: the case calibrated, saved, loaded in pyFAI and judged."""
    from ccdgrid.synthetic import dense_residual

    field = rob._field(shape, **terms)
    t = time.perf_counter()
    grid = gen.make_grid(shape, field=field, seed=seed, **kwargs)
    row = {
        "case": name,
        "gen_s": time.perf_counter() - t,
        "max_d_px": grid.params["max_displacement"],
        "clean": int(grid.clean.sum()),
    }
    done = calibrate_through_pyfai(grid.image, name, workdir, row)
    if done is None:
        return row
    cal, (dy, dx, mask) = done

    found = np.asarray(cal.holes.peaks)
    used = found[cal.lattice.valid]
    clean = grid.holes[grid.clean]
    dist = cKDTree(used).query(clean)[0]
    row["found"] = int((dist <= rob.MATCH_PX).sum())
    row["missed"] = int((dist > rob.MATCH_PX).sum())
    lit_holes = grid.holes[grid.visible | grid.partial]
    row["false"] = int((cKDTree(lit_holes).query(found)[0] > rob.FALSE_PX).sum())
    row["ctr_max"] = float(cKDTree(grid.holes).query(used)[0].max())

    maps = _CornerMaps(dy, dx)
    det = dense_residual(grid.field, dy, dx, mask, region=grid.valid_region(), n=20000, seed=3)
    row["det_rms"] = det.rms
    row["frame_rms"], row["frame_max"] = rob.frame_residual(grid, maps, det.points)
    visible = grid.holes[grid.visible]
    unmasked = mask[tuple(np.rint(visible).astype(np.int64).T)] == 0
    row["holes_rms"] = rob.frame_residual(grid, maps, visible[unmasked])[0]
    return row


_COLUMNS = (
    ("case", "case", "{}"),
    ("max_d_px", "|d|max", "{:.0f}"),
    ("clean", "clean", "{}"),
    ("found", "found", "{}"),
    ("missed", "missed", "{}"),
    ("false", "false", "{}"),
    ("ctr_max", "ctr max", "{:.3f}"),
    ("frame_rms", "frame rms", "{:.4f}"),
    ("frame_max", "frame max", "{:.3f}"),
    ("det_rms", "det rms", "{:.4f}"),
    ("holes_rms", "holes rms", "{:.4f}"),
    ("cal_s", "calib s", "{:.2f}"),
    ("cal_cpu_s", "cpu s", "{:.2f}"),
    ("find_holes_s", "holes s", "{:.2f}"),
    ("save_s", "save s", "{:.2f}"),
    ("load_s", "pyFAI load s", "{:.2f}"),
)


def _cells(row):
    if "error" in row:
        return [row["case"], f"{row['max_d_px']:.0f}", str(row["clean"]), "ERROR: " + row["error"]]
    return [fmt.format(row[key]) for key, _, fmt in _COLUMNS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--only", default=None, help="run the cases whose id holds this")
    parser.add_argument("--json", default=None, help="save the rows to this file")
    parser.add_argument(
        "--fuzz",
        type=int,
        default=0,
        metavar="N",
        help="instead, N random plates of 768-1280 px (every defect drawn at random)",
    )
    args = parser.parse_args(argv)
    import ccdgrid

    every = fuzz_cases(args.fuzz) if args.fuzz else cases()
    if args.fuzz:
        args.sizes = sorted({shape[0] for shape, _, _ in every.values()})
    # the seed follows the case, whatever the selection
    seeds = {name: 100 + k for k, name in enumerate(every)}
    selected = {
        k: v
        for k, v in every.items()
        if v[0][0] in args.sizes and (args.only is None or args.only in k)
    }
    print("command: python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(
        f"ccdgrid {ccdgrid.__version__}, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores"
    )
    header = [title for _, title, _ in _COLUMNS]
    print(" | ".join(header))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, (shape, kwargs, terms) in selected.items():
            row = run_case(name, shape, kwargs, terms, seed=seeds[name], workdir=workdir)
            rows.append(row)
            print(" | ".join(_cells(row)), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
