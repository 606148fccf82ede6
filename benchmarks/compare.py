"""ccdgrid against pyFAI and the seed tutorial, side by side in one run.

Usage (from the repository root, with ccdgrid and pyFAI installed)::

    python benchmarks/compare.py             # kernels at 2048², end to end at 2048² and 4096²
    python benchmarks/compare.py --quick     # small and fast smoke run (1024², 1 repeat)
    python benchmarks/compare.py --only kernels  # the kernel targets of issue 3
    python benchmarks/compare.py --only e2e --sizes 2048 --repeat 3
    python benchmarks/compare.py --only accuracy --sizes 2048 --accuracy-seeds 5

Part (a), kernels, times each ccdgrid kernel with its Cython and numpy
backends against pyFAI doing the same job, in this process:

* watershed: ``segment`` + ``merge_singletons`` vs ``InverseWatershed(img).init();
  .merge_singleton()`` on the 11x11-disc-convolved grid image;
* refine: ``refine_peaks`` (its default, one thread, and two OpenMP threads;
  for the target, also the default on a copy of the image in 2 MiB pages,
  which shows what the 4 KiB pages' TLB misses cost) vs a Python loop over
  ``pyFAI.ext.bilinear.Bilinear.local_maxi`` on 10,000 seeds taken the
  tutorial's way (the peak pixels of the big watershed regions of a
  convolved 19 px pitch grid image: the target), the same moved by up to
  2 px (a warm start's predictions), and random pixels (bounded by the climb);
* grid_error: value + gradient for 100,000 random points (the target) and
  100,000 hole centres of a distorted grid, against the numpy twin and the
  tutorial's objective (value, and value + the finite-difference gradient
  BFGS builds from it).

Kernel rows are medians over interleaved rounds (``_measure.side_by_side``)
and each section ends with a ``TARGET`` line: the ratio issue 3 judges.

Part (b), end to end, runs ``ccdgrid.calibrate(image, pitch=5e-3)`` +
``.save(path)`` and the tutorial pipeline (``tutorial_pipeline.py``) on the
same generated image, each measurement in a fresh process (``_measure.py``
is the worker). Reported per pipeline, medians over ``--repeat`` runs:

* time from image to maps + mask, time of the detector-file write;
* peak memory: the peak resident set size *above* the worker's resident size
  after its imports and the image load (the high-water mark is reset there
  through /proc/self/clear_refs), up to the maps and including the write;
* accuracy: the dense residual, recovered corner maps against the true field
  at 20 000 random points after removing an affine part, inside each
  pipeline's own valid region and inside the region both call valid. The
  tutorial's maps are read as corner maps, exactly as the detector file holds
  them, so its half-pixel sampling error is part of what is measured.

Part (c), with ``--accuracy-seeds K``, measures the dense residual alone
(in this process, untimed) on K images per size: the tutorial's accuracy is
bimodal (a hole that yields two watershed peaks a fraction of a pixel apart
makes cubic ``griddata`` blow up around it), so one image says little.

Each part prints a one-line skip message when what it needs is not importable.
Timings on a shared machine are noisy: compare ratios from one run.
"""

import argparse
import json
import mmap
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402
from tutorial_pipeline import disc_kernel  # noqa: E402

PITCH = 5e-3


def _fmt_t(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _print_table(rows, header):
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    for r in [header, None, *rows]:
        if r is None:
            print("  " + "  ".join("-" * w for w in widths))
            continue
        cells = [
            str(c).ljust(w) if k == 0 else str(c).rjust(w)
            for k, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  " + "  ".join(cells))


def _skip(what, exc):
    print(f"  skipped {what}: {type(exc).__name__}: {exc}")


# -- (a) kernels ---------------------------------------------------------------------------


def _time_rows(label, candidates, repeat, reference):
    """Time the (name, fn) candidates side by side; print medians and speed-ups.

    Returns ``name -> median seconds per call`` for the candidates that ran.
    """
    times, failures = _measure.side_by_side(candidates, repeat)
    for name, exc in failures.items():
        _skip(f"{label} [{name}]", exc)
    ref = times.get(reference)
    rows = [(k, _fmt_t(t), f"{ref / t:.1f}x" if ref else "-") for k, t in times.items()]
    if rows:
        _print_table(rows, (label, "median", f"speed-up vs {reference}"))
    return times


def _target(what, times, fast, slow, goal):
    """One line: the ratio a target of issue 3 is judged on, and whether it is met."""
    if fast in times and slow in times:
        ratio = times[slow] / times[fast]
        verdict = "met" if ratio >= goal else "NOT met"
        print(f"  TARGET {what}: {slow} / {fast} = {ratio:.1f}x (goal {goal}x: {verdict})")


def bench_kernels(size, n_seeds, n_points, repeat, seed):
    print(
        f"\n(a) Kernels, each measured side by side with its rivals: median of {repeat} "
        "interleaved rounds (each >= 20 ms of calls) after a warm-up"
    )
    from scipy import signal

    grid, source = _measure.grid_image(size, seed=seed)
    cnv = np.ascontiguousarray(signal.convolve2d(grid.image, disc_kernel(), "same"), np.float32)
    print(
        f"  watershed image: {source} {size}x{size}, seed {seed}, convolved with the "
        "tutorial's 11x11 disc (float32)"
    )

    # watershed
    regions = {}
    cands = []
    for backend in ("cython", "numpy"):

        def ws(backend=backend):
            from ccdgrid import merge_singletons, segment

            seg = merge_singletons(segment(cnv, backend=backend), cnv, backend=backend)
            regions[f"ccdgrid {backend}"] = (len(seg.size), int((seg.size > 97).sum()))

        cands.append((f"ccdgrid {backend}", ws))

    def ws_pyfai():
        from pyFAI.ext.watershed import InverseWatershed

        iw = InverseWatershed(cnv)
        iw.init()
        iw.merge_singleton()
        distinct = set(iw.regions.values())
        regions["pyFAI"] = (len(distinct), sum(r.size > 97 for r in distinct))

    cands.append(("pyFAI", ws_pyfai))
    print()
    times = _time_rows("watershed init + merge singletons", cands, repeat, "pyFAI")
    for name, (n_all, n_big) in regions.items():
        print(f"  {name}: {n_all} regions after merging, {n_big} with size > 97")
    _target("watershed init + merge singletons", times, "ccdgrid cython", "pyFAI", 15)

    bench_refine(n_seeds, repeat, seed)
    bench_grid_error(n_points, repeat, seed)


def bench_refine(n_seeds, repeat, seed):
    """``refine_peaks`` against a Python loop over pyFAI's ``Bilinear.local_maxi``."""
    try:
        from pyFAI.ext.bilinear import Bilinear
    except ImportError as exc:
        Bilinear = None
        _skip("pyFAI Bilinear", exc)
    cnv, peaks = _measure.tutorial_seeds(n_seeds, seed)
    rng = np.random.default_rng(seed + 2)
    h, w = cnv.shape
    cases = [
        (
            "the tutorial's seeds: region peaks (target)",
            peaks,
            "peak pixels of the convolved image's watershed regions (size > 97, max above "
            "threshold), 19 px pitch grid, 2048²: each is a local maximum, no climb",
        ),
        (
            "region peaks moved by up to 2 px",
            np.clip(peaks + rng.integers(-2, 3, peaks.shape), 0, [h - 1, w - 1]),
            "what a warm start's predicted positions look like: a climb of a few steps",
        ),
        (
            "random pixels",
            np.stack([rng.integers(0, h, n_seeds), rng.integers(0, w, n_seeds)], axis=1),
            "bounded by the climb for both: seeds start anywhere in the background and each "
            "step costs ccdgrid a few ns but reads a fresh 3x3 window from a 16 MB image",
        ),
    ]
    for title, seeds, note in cases:
        print(f"\n  refine {n_seeds} seeds, {title}\n  ({note})")
        target = "target" in title
        times = _refine_case(
            cnv, np.ascontiguousarray(seeds, dtype=np.int64), repeat, Bilinear, huge=target
        )
        if target:
            _target(f"refine {n_seeds} seeds", times, "ccdgrid cython", "pyFAI loop", 50)
            _target(f"refine {n_seeds} seeds, nthreads=2", times, "ccdgrid cython 2 threads",
                    "pyFAI loop", 50)  # fmt: skip
            huge = times.get("ccdgrid cython, image in 2 MiB pages")
            if huge and "pyFAI loop" in times:
                print(
                    f"  (not a target: the default call on the image in 2 MiB pages is "
                    f"{times['pyFAI loop'] / huge:.1f}x the pyFAI loop)"
                )


def _refine_case(cnv, seeds, repeat, Bilinear, huge=False):
    """One row set of :func:`bench_refine`; returns ``name -> median seconds``.

    With ``huge``, also the default call on a copy of the image in 2 MiB
    pages: the peaks are spread over the whole 16 MB image, so in 4 KiB
    pages most of the windows also miss the TLB (~4,000 pages for ~1,500
    TLB entries), and the kernel waits on page walks as much as on the data.
    """
    from ccdgrid import refine_peaks

    outputs = {}
    cands = []
    for backend in ("cython", "numpy"):

        def refine(backend=backend):
            outputs[backend] = refine_peaks(cnv, seeds, backend=backend)

        cands.append((f"ccdgrid {backend}", refine))

    def refine_two_threads():
        outputs["cython 2 threads"] = refine_peaks(cnv, seeds, nthreads=2)

    cands.insert(1, ("ccdgrid cython 2 threads", refine_two_threads))
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        big = _measure.on_pages(cnv, mmap.MADV_HUGEPAGE)
        mib = _measure.huge_page_bytes(big) / 2**20
        print(
            f"  (the image's copy for the 2 MiB-page row: {mib:.0f} of "
            f"{big.nbytes / 2**20:.0f} MiB in huge pages)"
        )

        def refine_huge():
            outputs["cython, 2 MiB pages"] = refine_peaks(big, seeds)

        cands.insert(2, ("ccdgrid cython, image in 2 MiB pages", refine_huge))
    if Bilinear is not None:
        bl = Bilinear(cnv)
        # As the tutorial holds them: a list of (y, x) tuples of Python ints.
        seed_list = [(int(y), int(x)) for y, x in seeds]

        def refine_pyfai():
            outputs["pyFAI"] = [bl.local_maxi(s) for s in seed_list]

        cands.append(("pyFAI loop", refine_pyfai))
    times = _time_rows("refine_peaks", cands, repeat, "pyFAI loop")
    if "pyFAI" in outputs:
        ref = np.asarray(outputs["pyFAI"], dtype=np.float64)
        for backend in ("cython", "cython 2 threads", "cython, 2 MiB pages", "numpy"):
            if backend in outputs:
                got = np.asarray(outputs[backend], dtype=np.float64).reshape(ref.shape)
                print(f"  max |ccdgrid {backend} - pyFAI| = {np.abs(got - ref).max():.2e} px")
    return times


def _grid_error_case(params, pts, repeat):
    """One row set of :func:`bench_grid_error`: ccdgrid's engines and the tutorial's numpy."""
    from scipy.optimize import approx_fprime

    from ccdgrid import grid_error

    def tutorial_error(p):
        rot = np.array([[p[2], p[3]], [p[4], p[5]]])
        hole = np.linalg.inv(rot).dot((pts - p[:2]).T).T
        return ((hole - np.round(hole)) ** 2).sum()

    cands = [
        (f"ccdgrid {b} value+grad", lambda b=b: grid_error(params, pts, backend=b))
        for b in ("cython", "numpy")
    ]
    cands.append(("tutorial value", lambda: tutorial_error(params)))
    cands.append(
        (
            "tutorial value+fd grad",
            lambda: (tutorial_error(params), approx_fprime(params, tutorial_error)),
        )
    )
    return _time_rows("grid_error", cands, repeat, "ccdgrid numpy value+grad")


def bench_grid_error(n_points, repeat, seed):
    """Fused value + gradient against the numpy twin (the target) and the tutorial's numpy."""
    try:
        from ccdgrid._ext._grid_error import simd_isa

        isa = simd_isa()
    except ImportError:
        isa = "?"
    rng = np.random.default_rng(seed + 1)
    cases = [
        (
            "random points (target)",
            np.array([1020.3, 1031.7, 97.9, -0.8, 0.9, 98.1]),
            rng.uniform(0, 4096, size=(n_points, 2)),
        ),
        ("lattice-like points", *_measure.lattice_points(n_points, seed + 1)),
    ]
    for title, params, pts in cases:
        print(f"\n  grid error, {n_points} {title} (kernel code path: {isa})")
        times = _grid_error_case(params, pts, repeat)
        if "target" in title:
            _target(
                f"grid error + gradient, {n_points} points",
                times,
                "ccdgrid cython value+grad",
                "ccdgrid numpy value+grad",
                10,
            )
    print(
        "  (random points are judged: the kernel's cost does not depend on where the points "
        "are, so both rows should agree; the numpy twin's may)"
    )


# -- (b) end to end ----------------------------------------------------------------------


def _run_worker(pipeline, image_path, out_path, threshold, maps_path):
    cmd = [sys.executable, str(HERE / "_measure.py"), pipeline, str(image_path), str(out_path)]
    cmd += ["--threshold", repr(threshold)]
    if maps_path is not None:
        cmd += ["--maps", str(maps_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise RuntimeError(f"worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available(pipeline):
    if pipeline == "ccdgrid":
        from ccdgrid import calibrate  # noqa: F401
    else:
        import pyFAI.ext.watershed  # noqa: F401


def _loads_in_pyfai(path, shape):
    try:
        import pyFAI

        det = pyFAI.detector_factory(str(path))
        return "yes" if tuple(det.shape) == tuple(shape) else f"shape {det.shape}"
    except Exception as exc:
        return f"no ({type(exc).__name__})"


def bench_e2e(size, repeat, seed, tmp):
    print(f"\n(b) End to end, {size}x{size}: median of {repeat} fresh process(es) per pipeline")
    start = time.perf_counter()
    grid, source = _measure.grid_image(size, seed=seed)
    image_path = tmp / f"grid_{size}.npy"
    np.save(image_path, grid.image)
    threshold = _measure.by_eye_threshold(grid.image)
    print(
        f"  image: {source}, seed {seed}, {grid.image.dtype} (generated in "
        f"{time.perf_counter() - start:.1f} s); tutorial threshold {threshold:.1f} "
        "(geometric mean of the median and the 99.95th percentile, for its by-eye 10**3.5)"
    )
    summary, stages, maps = {}, {}, {}
    for pipeline in ("ccdgrid", "tutorial"):
        try:
            _available(pipeline)
        except Exception as exc:
            _skip(pipeline, exc)
            continue
        runs = []
        try:
            for r in range(repeat):
                maps_path = tmp / f"maps_{pipeline}_{size}.npz" if r == 0 else None
                out = tmp / f"{pipeline}_{size}.h5"
                runs.append(_run_worker(pipeline, image_path, out, threshold, maps_path))
        except RuntimeError as exc:
            _skip(pipeline, exc)
            continue
        save_error = runs[0].get("save_error")
        if save_error:
            print(f"  {pipeline}: file write failed, save and total not measured: {save_error}")
        med = {
            k: None if runs[0][k] is None else float(np.median([r[k] for r in runs]))
            for k in ("time_maps", "time_save", "peak_maps_mb", "peak_total_mb", "base_mb")
        }
        med["n_peaks"] = runs[0]["n_peaks"]
        totals = [r["time_maps"] + (r["time_save"] or 0.0) for r in runs]
        med["total"] = None if save_error else float(np.median(totals))
        med["close_pairs"] = runs[0].get("close_pairs")
        med["exact_peak"] = all(r["exact_peak"] for r in runs)
        med["loads"] = "-" if save_error else _loads_in_pyfai(out, grid.image.shape)
        summary[pipeline] = med
        stages[pipeline] = {
            k: float(np.median([r["timings"].get(k, np.nan) for r in runs]))
            for k in runs[0]["timings"]
        }
        with np.load(tmp / f"maps_{pipeline}_{size}.npz") as data:
            maps[pipeline] = {k: data[k] for k in ("dy", "dx", "mask")}
    if not summary:
        return

    region = getattr(grid, "taper_mask", None)
    common = None
    if len(maps) == 2:
        common = (maps["ccdgrid"]["mask"] != 0) | (maps["tutorial"]["mask"] != 0)
    for pipeline, m in maps.items():
        try:
            own = _measure.dense_residual(grid.truth, m["dy"], m["dx"], m["mask"], region=region)
            both = (
                _measure.dense_residual(grid.truth, m["dy"], m["dx"], common, region=region)
                if common is not None
                else (None, None)
            )
        except Exception as exc:
            _skip(f"accuracy of {pipeline}", exc)
            own = both = (None, None)
        valid = 100.0 * (1 - np.count_nonzero(m["mask"]) / m["mask"].size)
        summary[pipeline].update(own=own, both=both, valid=valid)

    def px(v):
        return "-" if v is None else f"{v:.4f}"

    rows = []
    for pipeline, s in summary.items():
        rows.append(
            (
                pipeline,
                _fmt_t(s["time_maps"]),
                _fmt_t(s["time_save"]),
                _fmt_t(s["total"]),
                f"{s['peak_maps_mb']:.0f}",
                f"{s['peak_total_mb']:.0f}",
                px(s.get("own", (None,))[0]),
                px(s.get("own", (None, None))[1]),
                px(s.get("both", (None,))[0]),
                px(s.get("both", (None, None))[1]),
                f"{s.get('valid', float('nan')):.1f}",
                "-" if s["n_peaks"] is None else s["n_peaks"],
                s["loads"],
            )
        )
    if len(summary) == 2:
        c, t = summary["ccdgrid"], summary["tutorial"]

        def ratio(k, i=None):
            a, b = (t.get(k), c.get(k)) if i is None else (t[k][i], c[k][i])
            return "-" if a is None or b is None or b == 0 else f"{a / b:.1f}x"

        rows.append(
            (
                "tutorial / ccdgrid",
                ratio("time_maps"),
                ratio("time_save"),
                ratio("total"),
                ratio("peak_maps_mb"),
                ratio("peak_total_mb"),
                ratio("own", 0),
                ratio("own", 1),
                ratio("both", 0),
                ratio("both", 1),
                "",
                "",
                "",
            )
        )
    header = (
        "pipeline",
        "maps",
        "save",
        "total",
        "peak MB maps",
        "peak MB total",
        "RMS px own",
        "max px own",
        "RMS px common",
        "max px common",
        "valid %",
        "peaks",
        "pyFAI loads",
    )
    _print_table(rows, header)
    print(
        "  maps = image -> maps + mask; save = detector-file write; peak MB = peak RSS above the "
        "worker's RSS after imports + image load"
        + ("" if all(s["exact_peak"] for s in summary.values()) else " (ru_maxrss fallback)")
        + f" (baseline ~{np.median([s['base_mb'] for s in summary.values()]):.0f} MB)"
    )
    print(
        "  accuracy = dense residual (20 000 random points, affine part removed) inside the "
        "pipeline's own valid region ('own') and where both are valid ('common'); "
        f"in taper region: {'yes' if region is not None else 'no'}"
    )
    for pipeline, st in stages.items():
        parts = ", ".join(f"{k} {_fmt_t(v)}" for k, v in st.items())
        print(f"  stages {pipeline}: {parts or '(no timings reported)'}")
    for pipeline, s in summary.items():
        if s.get("close_pairs"):
            print(
                f"  note: {pipeline} kept {s['close_pairs']} pair(s) of peaks closer than 3 px "
                "(two regions on one hole); cubic griddata between such points blows up"
            )


def bench_accuracy(size, seeds):
    """Dense residual of both pipelines on several images, in this process (not timed)."""
    print(
        f"\n(c) Accuracy over {len(seeds)} image(s), {size}x{size} (seeds {seeds[0]}..{seeds[-1]})"
    )
    from tutorial_pipeline import tutorial_pipeline

    try:
        from ccdgrid import calibrate
    except ImportError as exc:
        _skip("ccdgrid", exc)
        calibrate = None
    results = {"ccdgrid": [], "tutorial": []}
    rows = []
    for seed in seeds:
        grid, _ = _measure.grid_image(size, seed=seed)
        region = getattr(grid, "taper_mask", None)
        row = [str(seed)]
        for name in results:
            try:
                if name == "ccdgrid":
                    if calibrate is None:
                        raise RuntimeError("not available")
                    res = calibrate(grid.image, pitch=PITCH)
                else:
                    threshold = _measure.by_eye_threshold(grid.image)
                    res = tutorial_pipeline(grid.image, threshold=threshold)
                rms, worst = _measure.dense_residual(
                    grid.truth, res.dy, res.dx, res.mask, region=region
                )
            except Exception as exc:
                row += [f"failed ({type(exc).__name__})", "-"]
                continue
            results[name].append(rms)
            row += [f"{rms:.4f}", f"{worst:.4f}"]
        rows.append(tuple(row))
    med = ["median"]
    for name in results:
        vals = results[name]
        med += [f"{np.median(vals):.4f}" if vals else "-", ""]
    rows.append(tuple(med))
    header = ("seed", "ccdgrid RMS px", "ccdgrid max px", "tutorial RMS px", "tutorial max px")
    _print_table(rows, header)
    print("  dense residual in each pipeline's own valid region (20 000 points, affine removed)")


# -- main ---------------------------------------------------------------------------------


def _header(argv):
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *argv])
    info = _measure.machine_info()
    print(f"$ {cmd}")
    print(
        f"machine: {info.get('cpu', '?')}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info['platform']}"
    )
    print(
        f"python {info['python']}, numpy {info['numpy']}, scipy {info['scipy']}, "
        f"pyFAI {info['pyFAI']}, ccdgrid {info.get('ccdgrid')}, openmp {info.get('openmp')}"
    )
    print(
        "threads env: "
        + ", ".join(
            f"{k}={info[k]}"
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        )
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description="Benchmark ccdgrid against pyFAI and the seed tutorial pipeline."
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="end-to-end image sizes (default 2048 4096; --quick: 1024)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="measurements per row, median reported (default 3; --quick: 1)",
    )
    parser.add_argument(
        "--only",
        choices=["kernels", "e2e", "accuracy"],
        default=None,
        help="run one part; 'accuracy' runs part (c) alone (default K = 5)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1024² images, fewer seeds/points, one repeat: a smoke run",
    )
    parser.add_argument("--seed", type=int, default=0, help="image generator seed")
    parser.add_argument(
        "--accuracy-seeds",
        type=int,
        default=0,
        metavar="K",
        help="also measure accuracy alone (untimed) on K images, seeds seed..seed+K-1",
    )
    args = parser.parse_args(argv)

    quick = args.quick
    sizes = args.sizes or ([1024] if quick else [2048, 4096])
    repeat = args.repeat or (1 if quick else 3)
    _header(argv)
    if args.only in (None, "kernels"):
        bench_kernels(
            size=1024 if quick else 2048,
            n_seeds=2000 if quick else 10_000,
            n_points=20_000 if quick else 100_000,
            repeat=args.repeat or (1 if quick else 7),
            seed=args.seed,
        )
    if args.only in (None, "e2e"):
        with tempfile.TemporaryDirectory(prefix="ccdgrid-bench-") as tmp:
            for size in sizes:
                bench_e2e(size, repeat, args.seed, Path(tmp))
    n_acc = args.accuracy_seeds or (5 if args.only == "accuracy" else 0)
    if args.only in (None, "e2e", "accuracy") and n_acc > 0:
        for size in sizes:
            bench_accuracy(size, list(range(args.seed, args.seed + n_acc)))


if __name__ == "__main__":
    main()
