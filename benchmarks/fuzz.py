"""Fuzz: ``calibrate`` on random plausible grid plates, judged through pyFAI.

Usage (from the repository root, with ccdgrid and pyFAI installed)::

    python benchmarks/fuzz.py --seeds 0:400 --out results.jsonl   # seeds 0 to 399
    python benchmarks/fuzz.py --seeds 3,7,9 --out results.jsonl   # or a list (0:10,42 too)
    python benchmarks/fuzz.py --params 7                          # one case's parameters
    python benchmarks/fuzz.py --summary results.jsonl             # the table of a run

A case is one seed. ``draw(seed)`` picks the parameters of a plate from
``numpy.random.default_rng(seed)``: 1024²-2048² images (4096² one time in 12,
non-square about one in 6), pitch 30-150 px, holes 15-75 % of the pitch,
flat-top, Airy-like or Lorentzian-squared holes, rotations up to 45°, up to
40 px of radial distortion plus optional non-radial, bump and ripple terms,
peaks of 40-30 000 counts on 5-5 000 counts of background, vignetting,
gradients, lit discs with soft rims, dark holes one time in 14, and up to three
kinds of defect (hot pixels, clusters, dead lines, saturated discs, a beam
stop, cosmic-ray streaks, module gaps). ``_fuzz_plates.py`` renders it (its
docstring states the model and the coordinates), then the case runs
``ccdgrid.calibrate(image, pitch=5e-3)``, saves the detector file, loads it
with ``pyFAI.detector_factory`` and measures the residual of its corners
against the true field, up to an affine map (``_fuzz_plates.compare``, every
2nd pixel, every 4th above 5 Mpx). The same seed gives the same plate and
image on every machine with the same numpy version.

Outcomes (``classify``):

* ``OK``: residual RMS < 0.05 px and max < 0.5 px;
* ``wrong``: a result outside those bounds on a plate whose peak SNR at the
  image centre, ``peak / sqrt(peak + background + read_noise²)``, is 10 or
  more (enough signal that a result should be right, or refused);
* ``poor(lowSNR)``: the same below SNR 10;
* ``refused``: ``calibrate`` raised ``ccdgrid.CcdgridError`` (its message is
  recorded);
* ``crash``: any other exception in calibrate, save or the comparison
  (recorded with the traceback's last line and its tail).

Each case is one JSON line appended to ``--out`` (parameters, SNR, times,
hole count, residuals, coverage of the lit area, ``calibrate``'s summary,
warnings or error), and a short line is printed. Seeds already in ``--out``
are skipped, so an interrupted run resumes where it stopped. A run that died inside a
case (a segfault, the OOM killer) leaves ``OUT.running`` naming the seed;
the next run says so and runs that seed again.

``--summary`` prints the outcome counts over all cases and over the plates
of bright holes (not dark-hole plates) with a peak SNR of 10 or more, the
``calibrate`` times, the crashes, and the most common refusals (numbers
replaced by ``#``, grouped by the text before the first ``;``).

Time, an estimate: about 3 s a case on average on 2 cores, so 20-30 minutes
for ``--seeds 0:400``. Ten seeds were timed (draw to comparison, with
another fuzz run busy on one of the two cores): 1024²: 0.8-1.7 s, 1536²:
1.5-2.0 s, 2048²: 3.6-4.2 s, 2048x1536: 2.0 s, 4096²: 11 s; ``draw`` picks
these sizes 99, 105, 110, 58 (non-square) and 28 times in seeds 0-399,
which gives ~20 minutes; a few plates of Lorentzian holes took 20-90 s to be
refused in earlier runs. A 4096² case needs ~2.2 GB of memory.
"""

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fuzz_plates import add_defects, compare, make_field, render

RMS_OK = 0.05  # px: an accurate calibration
MAX_OK = 0.5  # px: and no place far off
BRIGHT_SNR = 10.0  # peak SNR from which a result outside the bounds is "wrong"
OUTCOMES = ("OK", "refused", "wrong", "poor(lowSNR)", "crash")
_SHORT = (
    "seed",
    "outcome",
    "snr_center",
    "tgen",
    "tcal",
    "tcase",
    "nholes",
    "rms",
    "max",
    "valid_frac_lit",
)  # the printed line of a case


def draw(seed):
    """The parameters of case ``seed`` (a JSON-able dict, see the module docstring).

    Parameters
    ----------
    seed : int
        Seed of ``numpy.random.default_rng``; the draw order is fixed, so
        that a seed names the same plate in every run and version.

    Returns
    -------
    dict
        :func:`_fuzz_plates.render` keywords with ``field`` (the
        :func:`_fuzz_plates.make_field` keywords) and, if any, ``defects``
        (:func:`_fuzz_plates.add_defects` keywords, NaN as ``"nan"``).
    """
    rng = np.random.default_rng(seed)
    u = rng.uniform
    if rng.random() < 0.08:
        n = 4096
        shape = (n, n)
    else:
        ny = int(rng.choice([1024, 1536, 2048]))
        nx = int(rng.choice([1024, 1536, 2048])) if rng.random() < 0.25 else ny
        shape = (ny, nx)
    ny, nx = shape
    pitch = float(round(u(30, 150), 2))
    hole_diam_frac = float(round(u(0.15, 0.75), 3))
    profile = str(rng.choice(["flattop", "flattop", "airy", "lorentz"]))
    theta = float(round(u(0, 45) if rng.random() < 0.5 else u(0, 3), 3))
    field = dict(radial=float(round(u(-40, 40), 2)))
    if rng.random() < 0.4:
        field["quad"] = (float(round(u(-8, 8), 2)), float(round(u(-8, 8), 2)))
    if rng.random() < 0.35:
        s = float(round(u(1.0, 3.0) * pitch, 1))  # wider than a pitch
        a = min(4.0, 0.3 * s)  # keeps c = q + f(q) invertible
        field["bump"] = (
            float(round(u(0.2, 0.8) * ny, 1)),
            float(round(u(0.2, 0.8) * nx, 1)),
            s,
            float(round(u(-a, a), 2)),
            float(round(u(-a, a), 2)),
        )
    if rng.random() < 0.15:
        period = float(round(u(4, 12) * pitch, 1))
        amp = float(round(u(0.1, min(1.0, 0.05 * period / (2 * np.pi) * 10)), 2))
        field["ripple"] = (amp, period)
    peak = float(round(np.exp(u(np.log(40), np.log(30000))), 1))
    background = float(round(np.exp(u(np.log(5), np.log(5000))), 1))
    d = dict(
        shape=shape,
        pitch=pitch,
        theta=theta,
        hole_frac=round(hole_diam_frac / 2, 4),
        profile=profile,
        peak=peak,
        background=background,
        read_noise=float(round(u(0, 5), 2)),
        vignette=float(round(u(0, 0.6), 3)),
        field=field,
    )
    if rng.random() < 0.4:
        d["gradient"] = (float(round(u(-0.6, 0.6), 3)), float(round(u(-0.6, 0.6), 3)))
    if rng.random() < 0.35:
        d["lit_radius"] = float(round(u(0.35, 0.7) * min(ny, nx) + 0.0, 1))
        d["lit_edge"] = float(round(u(5, 60), 1))
    if rng.random() < 0.07:
        d["invert_contrast"] = True
    kinds = ["hot", "clusters", "dead", "saturated", "beamstop", "streaks", "gaps"]
    k = int(rng.integers(0, 4))
    chosen = list(rng.choice(kinds, size=k, replace=False))
    df = {}
    for kind in chosen:
        if kind == "hot":
            df["hot"] = int(rng.integers(10, 5000))
        elif kind == "clusters":
            df["clusters"] = int(rng.integers(1, 80))
        elif kind == "dead":
            df["dead_rows"] = [int(x) for x in rng.integers(0, ny, int(rng.integers(0, 4)))]
            df["dead_cols"] = [int(x) for x in rng.integers(0, nx, int(rng.integers(1, 4)))]
            df["dead_value"] = "nan" if rng.random() < 0.5 else 0.0
        elif kind == "saturated":
            df["saturated"] = int(rng.integers(1, 6))
            df["sat_radius"] = int(rng.integers(10, 61))
        elif kind == "beamstop":
            df["beamstop"] = (
                float(round(u(0.35, 0.65) * ny, 1)),
                float(round(u(0.35, 0.65) * nx, 1)),
                float(round(u(30, 0.12 * min(ny, nx)), 1)),
            )
        elif kind == "streaks":
            df["streaks"] = int(rng.integers(1, 60))
        elif kind == "gaps":
            g = []
            for _ in range(int(rng.integers(1, 3))):
                ax = int(rng.integers(0, 2))
                length = ny if ax == 0 else nx
                g0 = int(rng.integers(int(0.15 * length), int(0.85 * length)))
                g.append((g0, g0 + int(rng.integers(4, 20)), ax))
            df["gaps"] = g
    if df:
        d["defects"] = df
    return d


def build(d, seed):
    """Render the plate of parameters ``d`` (from :func:`draw`).

    Parameters
    ----------
    d : dict
        Parameters of :func:`draw` (not modified; lists read from JSON do).
    seed : int
        Seed of the noise; the defects use ``seed + 1``.

    Returns
    -------
    img : ndarray of float32
        The image.
    field : callable
        The true forward field.
    lit : ndarray of bool
        Lit pixels.
    bad : ndarray of bool
        Pixels the defects spoil (see :func:`_fuzz_plates.add_defects`).
    """
    d = json.loads(json.dumps(d))  # a deep copy, with every tuple as a list
    fkw = d.pop("field")
    for key in ("quad", "bump", "ripple"):
        if key in fkw:
            fkw[key] = tuple(fkw[key])
    defects = d.pop("defects", None)
    d["shape"] = tuple(d["shape"])
    if "gradient" in d:
        d["gradient"] = tuple(d["gradient"])
    field = make_field(d["shape"], **fkw)
    img, info = render(field=field, seed=seed, **d)
    bad = np.zeros(img.shape, bool)
    if defects:
        if defects.get("dead_value") == "nan":
            defects["dead_value"] = np.nan
        if "beamstop" in defects:
            defects["beamstop"] = tuple(defects["beamstop"])
        if "gaps" in defects:
            defects["gaps"] = [tuple(g) for g in defects["gaps"]]
        img, bad = add_defects(img, seed=seed + 1, **defects)
    return img, field, info["lit"], bad


def snr(d):
    """Peak SNR of a hole at the image centre and at the worst lit corner.

    Parameters
    ----------
    d : dict
        Parameters of :func:`draw`.

    Returns
    -------
    center, edge : float
        ``peak / sqrt(peak + background + read_noise²)`` unvignetted; and
        with the vignetting at the lit disc's rim (or the corner) and the
        background raised by the gradients.
    """
    p, b, rn = d["peak"], d["background"], d["read_noise"]
    s0 = p / np.sqrt(p + b + rn**2)
    half_diagonal = np.hypot(*[(s - 1) / 2 for s in d["shape"]])
    reach = min(1.0, d.get("lit_radius", 1e9) / half_diagonal)
    pv = p * (1 - d["vignette"] * reach**2)
    b_edge = b * (1 + sum(abs(g) for g in d.get("gradient", (0, 0))))
    return float(s0), float(pv / np.sqrt(pv + b_edge + rn**2))


def classify(r):
    """Outcome of a case record (see the module docstring)."""
    if r["status"] == "crash":
        return "crash"
    if r["status"] == "refused":
        return "refused"
    if r["rms"] < RMS_OK and r["max"] < MAX_OK:
        return "OK"
    return "wrong" if r["snr_center"] >= BRIGHT_SNR else "poor(lowSNR)"


def run(seed, workdir):
    """Run case ``seed``: draw, render, calibrate, save, compare.

    Parameters
    ----------
    seed : int
        The case.
    workdir : str or Path
        Where the detector file is written (and removed).

    Returns
    -------
    dict
        The case's record (one line of ``--out``).
    """
    import ccdgrid

    t_case = time.perf_counter()
    d = draw(seed)
    rec = dict(seed=seed, params=d)
    rec["snr_center"], rec["snr_edge"] = snr(d)
    t0 = time.perf_counter()
    img, field, lit, bad = build(d, seed)
    rec["tgen"] = round(time.perf_counter() - t0, 1)
    out = Path(workdir) / f"det_{seed}.h5"
    t0 = time.perf_counter()
    caught = []
    try:
        # Python shows a warning once per place: a run of many cases would
        # keep only the first case's
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cal = ccdgrid.calibrate(img, pitch=5e-3)
        rec["tcal"] = round(time.perf_counter() - t0, 2)
        rec["nholes"] = len(cal.holes.peaks)
        cal.save(out)
        rec["status"] = "ok"
        try:
            rec["summary"] = cal.summary()[-800:]
        except Exception as e:
            # a broken report must not hide the calibration's accuracy
            rec["summary"] = f"summary() raised {type(e).__name__}: {e}"
        stride = 4 if img.size > 5e6 else 2
        rec.update(compare(out, field, lit, stride=stride, expect_bad=bad))
    except ccdgrid.CcdgridError as e:
        rec["tcal"] = round(time.perf_counter() - t0, 2)
        rec["status"] = "refused"
        rec["error"] = str(e)[:1500]
    except Exception as e:
        rec["tcal"] = round(time.perf_counter() - t0, 2)
        rec["status"] = "crash"
        rec["error"] = f"{type(e).__name__}: {e}"[:1500]
        rec["traceback"] = traceback.format_exc()[-3000:]
    finally:
        out.unlink(missing_ok=True)
    rec["warnings"] = [f"{w.category.__name__}: {w.message}"[:300] for w in caught]
    rec["outcome"] = classify(rec)
    rec["tcase"] = round(time.perf_counter() - t_case, 1)
    return rec


def seed_list(text):
    """Seeds of ``"0:400"`` (0 to 399), ``"3,7,9"`` or a mix (``"0:10,42"``)."""
    seeds = []
    for part in text.split(","):
        if ":" in part:
            lo, hi = part.split(":")
            seeds.extend(range(int(lo), int(hi)))
        elif part.strip():
            seeds.append(int(part))
    return seeds


def _read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_seeds(seeds, out):
    """Run the seeds not yet in ``out``, appending a line each."""
    import pyFAI

    import ccdgrid

    out = Path(out)
    running = out.with_name(out.name + ".running")
    done = {r["seed"] for r in _read(out)} if out.exists() else set()
    print("command: python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(
        f"ccdgrid {ccdgrid.__version__}, pyFAI {pyFAI.version}, numpy {np.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    todo = [s for s in seeds if s not in done]
    died_in = int(running.read_text()) if running.exists() else None
    if died_in is not None and died_in not in done:
        again = "; it runs again" if died_in in todo else ""
        print(
            f"a previous run died in seed {died_in} (segfault, out of memory or killed?): "
            f"it is not in {out}{again}",
            flush=True,
        )
    if len(todo) < len(seeds):
        print(f"{len(seeds) - len(todo)} of the {len(seeds)} seeds are already in {out}: skipped")
    tally = collections.Counter()
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for s in todo:
                # written before the case: a hard crash never reaches the except clauses
                running.write_text(f"{s}\n")
                r = run(s, workdir)
                with open(out, "a") as fh:
                    fh.write(json.dumps(r, default=str) + "\n")
                tally[r["outcome"]] += 1
                short = {key: r.get(key) for key in _SHORT}
                short["shape"] = r["params"]["shape"]
                short["pitch"] = r["params"]["pitch"]
                short["err"] = r.get("error", "")[:150]
                print(json.dumps(short, default=str), flush=True)
    finally:
        running.unlink(missing_ok=True)
    counts = ", ".join(f"{k} {tally[k]}" for k in OUTCOMES if tally[k])
    print(
        f"{len(todo)} cases in {time.perf_counter() - t_start:.0f} s ({counts or 'none'}); "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def _refusal_kind(message):
    # numbers differ from plate to plate, and the list of rejected candidates
    # after the ';' splits one refusal into many rows
    return re.sub(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", message).split(";")[0]


def summary(path, most=8):
    """Print the summary table of a results file."""
    rows = _read(path)
    # lines without parameters: hard crashes a wrapper script may have recorded
    with_params = [r for r in rows if "params" in r]
    bright = [
        r
        for r in with_params
        if not r["params"].get("invert_contrast") and r["snr_center"] >= BRIGHT_SNR
    ]
    seeds = sorted(r["seed"] for r in rows)
    print(f"{path}: {len(rows)} cases, seeds {seeds[0]}-{seeds[-1]}" if rows else f"{path}: empty")
    if not rows:
        return
    c_all = collections.Counter(r["outcome"] for r in rows)
    c_bright = collections.Counter(r["outcome"] for r in bright)
    names = [*OUTCOMES, *sorted(set(c_all) - set(OUTCOMES))]
    print(f"\n{'outcome':14s} {'all':>5s} {'bright, SNR >= 10':>18s}")
    for name in names:
        print(f"{name:14s} {c_all[name]:5d} {c_bright[name]:18d}")
    print(f"{'total':14s} {len(rows):5d} {len(bright):18d}")
    low = [r for r in with_params if r["outcome"] == "OK" and r.get("valid_frac_lit", 1) < 0.5]
    if low:
        listed = ", ".join(str(r["seed"]) for r in low)
        print(f"(OK but under half the lit area kept: seeds {listed})")
    warned = collections.Counter(r["outcome"] for r in with_params if r.get("warnings"))
    if warned:
        print(f"(calibrate warned in: {', '.join(f'{n} {k}' for k, n in warned.items())})")
    times = np.array([r["tcal"] for r in with_params])
    if times.size:
        slow = max(with_params, key=lambda r: r["tcal"])
        print(
            f"\ncalibrate: median {np.median(times):.2f} s, "
            f"90 % {np.percentile(times, 90):.2f} s, max {times.max():.1f} s "
            f"(seed {slow['seed']}, {slow['outcome']})"
        )
    crashes = [r for r in rows if r["outcome"] not in OUTCOMES[:4]]
    if crashes:
        print("\ncrashes:")
        for r in crashes:
            print(f"  seed {r['seed']}: {r['outcome']}: {r.get('error', '')[:200]}")
    refusals = collections.Counter(
        _refusal_kind(r["error"]) for r in rows if r["outcome"] == "refused"
    )
    if refusals:
        print(f"\nmost common refusals ({sum(refusals.values())}; numbers as #):")
        for message, n in refusals.most_common(most):
            print(f"  {n:4d}  {message[:160]}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="seeds: 0:400 (0 to 399), 3,7,9, or a mix such as 0:10,42",
    )
    parser.add_argument("--seeds", type=seed_list, help="the cases to run")
    parser.add_argument("--out", default="results.jsonl", help="JSON lines, appended to")
    parser.add_argument("--params", type=seed_list, metavar="SEEDS", help="print the parameters")
    parser.add_argument("--summary", metavar="RESULTS", help="print the summary of a results file")
    args = parser.parse_args(argv)
    if args.seeds is None and args.params is None and args.summary is None:
        parser.error("give --seeds, --params or --summary")
    for s in args.params or ():
        print(json.dumps(dict(seed=s, params=draw(s), snr=snr(draw(s)))))
    if args.seeds is not None:
        run_seeds(args.seeds, args.out)
    if args.summary:
        summary(args.summary)


if __name__ == "__main__":
    main()
