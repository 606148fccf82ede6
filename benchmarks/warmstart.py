"""Warm-start recalibration against a cold calibration, side by side in one run.

Usage (from the repository root, with ccdgrid installed)::

    python benchmarks/warmstart.py                    # 2048² and 4096², 3 repeats
    python benchmarks/warmstart.py --sizes 1024 --repeat 1
    python benchmarks/warmstart.py --cv 5             # with the default cross-validation

For each size, a FReLoN-like plate image is generated (``grid_image`` with
the presets of ``frelon_2048``/``frelon_4096``: 98 px pitch, 10.5 px holes,
strong distortion), calibrated cold once to make the previous calibration, then the plate
is moved by (3.4, -2.7) px and turned by 20 mdeg and the new image is
calibrated both cold (``calibrate``) and warm (``recalibrate`` from the
previous calibration), alternately, ``--repeat`` times each. Reported:
median wall times, the speed-up, the same for the process's CPU time
(steadier than wall time on a shared machine), after ``--warmup`` rounds of
each that are not timed (default 2: a process's first rounds are slower for
both, as they map fresh memory), the dense residual of both
(RMS of the recovered maps against the true field at 20 000 points inside
the lit area, affine part removed), the median time of every stage, and
the drift the warm start measured. Cross-validation is off in both unless
``--cv K`` (then both run the same K-fold cross-validation, which costs the
same in both: up to 2 thin-plate solves of ~1200 holes at 4096²).

The warm maps' GCV reuses the previous calibration's eigenbasis (see
``ccdgrid.maps.displacement_maps``, ``previous``) when the GCV's holes were
all found again and moved by a similarity; the lines say whether it was
reused and how much memory the kept basis takes. With ``--chain``, the next
frame of a series (the plate moved a little more) is also calibrated cold
and warm from the warm result, as a series recalibrating from its last
calibration would (the basis is then the first calibration's when each
step reused it).

Both calibrations take their maps' and mask's memory from
``ccdgrid.maps.MAP_MEMORY``, which hands a dropped calibration's arrays to
the next one (each round here drops the previous round's result of its
kind). ``--fresh-memory`` turns that off: every calibration then maps new
memory, whose first write costs page faults (and, on a virtual machine, the
host's), as a single calibration in a fresh process does.
"""

import argparse
import time

import numpy as np

from ccdgrid.maps import MAP_MEMORY
from ccdgrid.pipeline import calibrate
from ccdgrid.synthetic import dense_residual, grid_image
from ccdgrid.warmstart import recalibrate

MOVE = (3.4, -2.7)  # px, (y, x)
TURN_DEG = 0.02
CHAIN_MOVE = (0.6, 0.9)  # px, the next frame's further move (--chain)
CHAIN_TURN_DEG = 0.005


def _plate(size, offset, rotation_deg):
    return grid_image(
        (size, size), distortion="strong", offset=offset, rotation_deg=rotation_deg, seed=11
    )


def _stages(runs):
    """Median time of every stage over the runs, as text."""
    return ", ".join(
        f"{k} {np.median([r[k] for r in runs]):.3f} s" for k in runs[0] if k != "read"
    )


def _reused(old, new):
    """What the warm maps reused of the previous fit (GCV eigenbasis, thin-plate factor), as text.

    Both are kept, not copied, when reused: the same arrays.
    """
    reused, kept = [], 0
    basis = new.gcv_basis
    if basis is not None and old.gcv_basis is not None and basis.vec is old.gcv_basis.vec:
        reused.append("GCV eigenbasis")
        kept += sum(v.nbytes for v in vars(basis).values() if isinstance(v, np.ndarray))
    factor = new.tps_factor
    if factor is not None and old.tps_factor is not None and factor.upper is old.tps_factor.upper:
        reused.append("thin-plate Cholesky factor")
        kept += factor.upper.nbytes
    if not reused:
        return "none"
    return f"{', '.join(reused)} (kept: {kept / 2**20:.1f} MiB)"


def _rounds(image, previous, repeat, cv, warmup=0):
    """Cold and warm calibrations of ``image``, alternately, ``repeat`` times.

    Returns the last of each and, per round, their wall times, CPU times and
    stage timings: ``(cold, warm, {"cold": ..., "warm": ...})`` with lists
    under ``"t"``, ``"cpu"`` and ``"stages"``. ``warmup`` rounds are run
    first and not recorded.
    """
    for _ in range(warmup):
        calibrate(image, cv_folds=cv)
        recalibrate(image, previous, cv_folds=cv)
    runs = {kind: {"t": [], "cpu": [], "stages": []} for kind in ("cold", "warm")}
    made = {}
    for _ in range(repeat):
        for kind in ("cold", "warm"):
            t, c = time.perf_counter(), time.process_time()
            if kind == "cold":
                made[kind] = calibrate(image, cv_folds=cv)
            else:
                made[kind] = recalibrate(image, previous, cv_folds=cv)
            runs[kind]["t"].append(time.perf_counter() - t)
            runs[kind]["cpu"].append(time.process_time() - c)
            runs[kind]["stages"].append(made[kind].timings)
    return made["cold"], made["warm"], runs


def run(size, repeat, cv, chain=False, warmup=0):
    base = _plate(size, (0.25, -0.4), 0.5)
    previous = calibrate(base.image, cv_folds=0)
    moved = _plate(size, (0.25 + MOVE[0], -0.4 + MOVE[1]), 0.5 + TURN_DEG)
    cold, warm, runs = _rounds(moved.image, previous, repeat, cv, warmup)
    cold_t, cold_cpu, cold_stages = (runs["cold"][k] for k in ("t", "cpu", "stages"))
    warm_t, warm_cpu, warm_stages = (runs["warm"][k] for k in ("t", "cpu", "stages"))
    rms = [
        dense_residual(moved.truth, c.dy, c.dx, c.mask, region=moved.taper_mask).rms
        for c in (cold, warm)
    ]
    tc, tw = float(np.median(cold_t)), float(np.median(warm_t))
    print(
        f"{size}²: cold {tc:.3f} s, warm {tw:.3f} s ({tc / tw:.1f}x faster); "
        f"dense residual cold {rms[0]:.4f} px, warm {rms[1]:.4f} px "
        f"({rms[1] / rms[0] - 1:+.1%}); holes cold {cold.lattice.n_valid}, "
        f"warm {warm.drift.n_matched}/{warm.drift.n_previous}"
    )
    cc, wc = float(np.median(cold_cpu)), float(np.median(warm_cpu))
    print(f"  CPU time (all threads): cold {cc:.3f} s, warm {wc:.3f} s ({cc / wc:.1f}x)")
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(cold_t, warm_t, strict=True))
    print("  ratio per round (wall): " + ratios)
    print(
        "  per round, wall / CPU (s): cold "
        + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(cold_t, cold_cpu, strict=True))
        + "; warm "
        + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(warm_t, warm_cpu, strict=True))
    )
    reused = _reused(previous.maps, warm.maps)
    print(
        f"  maps' smoothing: previous {previous.maps.smoothing:g}, cold {cold.maps.smoothing:g}, "
        f"warm {warm.maps.smoothing:g}; reused from the previous fit: {reused}"
    )
    print("  warm stages (median): " + _stages(warm_stages))
    print("  cold stages (median): " + _stages(cold_stages))
    if cv:
        print(f"  cross-validation: cold {cold.cross_validation.summary()}")
        print(f"                    warm {warm.cross_validation.summary()}")
    print("  " + warm.drift.summary())
    print(f"  (true move: shift {MOVE} px at hole (0, 0), rotation {TURN_DEG * 1e3:.0f} mdeg)")
    if chain:
        _chain(size, repeat, cv, warm)


def _chain(size, repeat, cv, previous):
    """The next frame of a series: the plate moved a little more, warm from the warm result."""
    offset = (0.25 + MOVE[0] + CHAIN_MOVE[0], -0.4 + MOVE[1] + CHAIN_MOVE[1])
    nxt = _plate(size, offset, 0.5 + TURN_DEG + CHAIN_TURN_DEG)
    cold, warm, runs = _rounds(nxt.image, previous, repeat, cv)
    cold_t, cold_cpu = runs["cold"]["t"], runs["cold"]["cpu"]
    warm_t, warm_cpu = runs["warm"]["t"], runs["warm"]["cpu"]
    maps_t = [s["displacement_maps"] for s in runs["warm"]["stages"]]
    rms = [
        dense_residual(nxt.truth, c.dy, c.dx, c.mask, region=nxt.taper_mask).rms
        for c in (cold, warm)
    ]
    tc, tw = float(np.median(cold_t)), float(np.median(warm_t))
    cc, wc = float(np.median(cold_cpu)), float(np.median(warm_cpu))
    print(
        f"  next frame (moved {CHAIN_MOVE} px, {CHAIN_TURN_DEG * 1e3:.0f} mdeg more), warm from "
        f"the warm result: cold {tc:.3f} s, warm {tw:.3f} s ({tc / tw:.1f}x; CPU "
        f"{cc / wc:.1f}x); warm maps {np.median(maps_t):.3f} s; dense residual "
        f"{rms[1] / rms[0] - 1:+.1%} of cold; smoothing previous "
        f"{previous.maps.smoothing:g}, warm {warm.maps.smoothing:g}; reused: "
        f"{_reused(previous.maps, warm.maps)}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="rounds of each run first and not timed (a process's first rounds map fresh memory)",
    )
    parser.add_argument("--cv", type=int, default=0, help="cross-validation folds (0: none)")
    parser.add_argument(
        "--fresh-memory",
        action="store_true",
        help="new memory for every calibration's maps (ccdgrid.maps.MAP_MEMORY off)",
    )
    parser.add_argument(
        "--chain",
        action="store_true",
        help="also the next frame of a series, warm from the warm result",
    )
    args = parser.parse_args(argv)
    if args.fresh_memory:
        MAP_MEMORY.capacity = 0
    for size in args.sizes:
        run(size, args.repeat, args.cv, args.chain, args.warmup)


if __name__ == "__main__":
    main()
