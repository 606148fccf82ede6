"""Combined plate positions against one image: dense residual of both, side by side.

Usage (from the repository root, with ccdgrid installed)::

    python benchmarks/combined.py                       # 1024², seeds 1-3, 2/3/4 positions
    python benchmarks/combined.py --size 2048 --seeds 1 2 --positions 2 4
    python benchmarks/combined.py --distortion strong --known

For each seed, ``grid_image`` makes images of one plate (98 px pitch, FReLoN
detector model) moved between exposures; the seed fixes the detector (its
distortion, fibres, taper) whatever the plate offset, so the images are
exactly a multi-position experiment. The plate moves are drawn once per seed,
uniformly within half a pitch (``--move`` px, default 49) of the first
position. The first image is calibrated alone (``ccdgrid.calibrate``, as
``calibrate_combined`` does for its comparison) and the first ``P`` images
jointly, for each ``P`` of ``--positions``. Reported: the dense residual
(RMS and max of the recovered maps against the true field at 20 000 points
inside the lit area, affine part removed, on the pixels both calibrations
call valid), their ratio, the largest error of the estimated offsets (in the
calibration's own lattice frame, which differs from the generator's by the
affine part no calibration sees), the cross-validated RMS of both, the
smoothing choice and the wall time of the joint calibration.
"""

import argparse
import sys
import time

import numpy as np

from ccdgrid.combined import calibrate_combined
from ccdgrid.synthetic import dense_residual, grid_image

PITCH_PX = 98.0


def _moves(seed, count, move):
    rng = np.random.default_rng(1000 + seed)
    return np.vstack([np.zeros(2), rng.uniform(-move, move, size=(count - 1, 2))])


def _offset_error(cal, plate, moves):
    """Largest error of the estimated offsets, px, in the frame they are estimated in.

    The offsets are moves of the plate's least-squares lattice; the grid's
    vectors are those of the lattice seen at the image centre, whose
    positions ``G(q) = c + J^-1 (q - q0)`` map the least-squares ones: its
    vectors times ``J^T`` are the least-squares lattice's.
    """
    a = np.array([plate.lattice.a1, plate.lattice.a2])
    vectors = cal.grid.vectors
    frame = cal.grid.frame or {}
    if "jacobian" in frame:
        vectors = vectors @ np.asarray(frame["jacobian"]).T
    expected = moves @ np.linalg.inv(a) @ vectors
    return float(np.abs(cal.combined.offsets_estimated - expected).max())


def run(size, seeds, positions, distortion, move, known):
    rows = []
    for seed in seeds:
        moves = _moves(seed, max(positions), move)
        plates = [
            grid_image((size, size), seed=seed, offset=tuple(m), distortion=distortion)
            for m in moves
        ]
        for count in positions:
            t0 = time.perf_counter()
            cal = calibrate_combined(
                [p.image for p in plates[:count]], offsets=moves[:count] if known else None
            )
            seconds = time.perf_counter() - t0
            single = cal.combined.single
            common = (single.mask != 0) | (cal.mask != 0)
            region = plates[0].taper_mask
            one = dense_residual(plates[0].truth, single.dy, single.dx, common, region=region)
            joint = dense_residual(plates[0].truth, cal.dy, cal.dx, common, region=region)
            rows.append(
                (
                    seed,
                    count,
                    one.rms,
                    one.max,
                    joint.rms,
                    joint.max,
                    joint.rms / one.rms,
                    _offset_error(cal, plates[0], moves[:count]),
                    cal.combined.single_cv_rms_px,
                    cal.cross_validation.rms_px if cal.cross_validation else float("nan"),
                    cal.params["resolved"]["smoothing_choice"],
                    seconds,
                )
            )
            print(_format(rows[-1]), flush=True)
    return rows


_HEADER = (
    "seed",
    "images",
    "single RMS px",
    "single max px",
    "combined RMS px",
    "combined max px",
    "ratio",
    "offset err px",
    "single CV px",
    "combined CV px",
    "map fit",
    "time s",
)


def _format(row):
    seed, count, *vals, choice, seconds = row
    nums = " | ".join(f"{v:.4f}" for v in vals)
    return f"| {seed} | {count} | {nums} | {choice} | {seconds:.1f} |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side, px")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--positions", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--distortion", default="frelon", choices=["frelon", "strong"])
    parser.add_argument("--move", type=float, default=PITCH_PX / 2, help="largest move, px")
    parser.add_argument("--known", action="store_true", help="pass the offsets as known")
    args = parser.parse_args(argv)
    if min(args.positions) < 2:
        parser.error("--positions must all be >= 2")
    print(
        "command: python benchmarks/combined.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(
        f"{args.size}² images, {args.distortion} distortion, moves within {args.move:g} px, "
        f"offsets {'known' if args.known else 'estimated'}"
    )
    print("| " + " | ".join(_HEADER) + " |")
    print("|" + "---|" * len(_HEADER))
    rows = run(args.size, args.seeds, args.positions, args.distortion, args.move, args.known)
    for count in args.positions:
        ratios = [r[6] for r in rows if r[1] == count]
        print(
            f"{count} images: combined / single dense RMS, median {np.median(ratios):.3f}, "
            f"worst {max(ratios):.3f} over {len(ratios)} seeds"
        )


if __name__ == "__main__":
    main()
