"""Powder rings integrated by pyFAI through three detector models.

A powder image is rendered through the same distortion as a synthetic grid
image (see :mod:`ccdgrid._powder` for the model), then integrated by pyFAI's
``AzimuthalIntegrator.integrate1d`` (full pixel splitting, CSR) with:

(a) a regular detector (rectangular pixels, no distortion);
(b) the detector file ccdgrid writes from the grid image, loaded by
    ``pyFAI.detector_factory``;
(c) the exact truth: the generator's field on the pixel corners
    (``set_dy``/``set_dx``), with the pixel size ccdgrid's rule gives for
    the generator's exact lattice.

The distance and the starting PONI are the true ones for all three; the
beam centre is then fitted for each detector separately
(:func:`ccdgrid._powder.fit_beam_centre`), because each model puts the
pixels in its own frame: ccdgrid's is its fitted lattice's, translated from
the generator's by up to a pixel with the "strong" preset, which with a
common PONI would smear every ring by that much. The pixels ccdgrid
calibrated (its mask) are used for all three. Each ring is fitted by a
Gaussian plus a constant; the table gives its radius (px and 2 theta) and
FWHM (px).
Targets: |radius(b) - radius(c)| <= 0.05 px and FWHM(b) within 5 % of
FWHM(c).

Usage::

    python benchmarks/integration.py [--size 2048] [--distortion frelon] [--seed 2]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyFAI

import ccdgrid
from ccdgrid import _powder
from ccdgrid.synthetic import grid_image

PITCH = 5e-3  # m, the plate's hole spacing
RING_FRACTIONS = (0.2, 0.4, 0.6, 0.8)  # ring radii / half the detector's side


def run(size, distortion, seed, supersample=3, pitch_px=98.0):
    """Render, calibrate, integrate; return the setup, fits and timings."""
    shape = (size, size)
    t0 = time.perf_counter()
    grid = grid_image(shape, distortion=distortion, seed=seed, pitch_px=pitch_px)
    t_grid = time.perf_counter() - t0

    t0 = time.perf_counter()
    cal = ccdgrid.calibrate(grid.image, pitch=PITCH)
    t_cal = time.perf_counter() - t0

    pixel_size = _powder.truth_pixel_size(grid.lattice, PITCH)
    half = 0.5 * (size - 1)
    setup = _powder.PowderSetup(
        shape=shape,
        pixel_size=pixel_size,
        centre=(half + 0.013 * size, half - 0.0077 * size),
        radii_px=tuple(f * half for f in RING_FRACTIONS),
    )
    t0 = time.perf_counter()
    image = _powder.render_powder(setup, grid.truth, supersample=supersample, seed=seed)
    t_render = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ccdgrid.h5")
        cal.save(path)
        det_b = pyFAI.detector_factory(path)
        detectors = {
            "regular": _powder.regular_detector(shape, pixel_size),
            "ccdgrid": det_b,
            "truth": _powder.truth_detector(grid.truth, shape, pixel_size),
        }
        # the same pixels for every detector: those ccdgrid calibrated
        mask = np.asarray(cal.mask) != 0
        fits, t_int, ponis = {}, {}, {}
        for name, det in detectors.items():
            t0 = time.perf_counter()
            ponis[name] = _powder.fit_beam_centre(image, det, setup, mask=mask)
            r, inten = _powder.integrate_rings(image, det, setup, poni=ponis[name], mask=mask)
            t_int[name] = time.perf_counter() - t0
            fits[name] = _powder.fit_rings(r, inten, setup)
    times = {"grid": t_grid, "calibrate": t_cal, "render": t_render, **t_int}
    return setup, cal, fits, times, det_b, ponis


def _table(setup, fits):
    lines = []
    head = (
        f"{'ring':>4} {'2th nominal':>11} | "
        + " | ".join(f"{n:>8} r px   2th deg   FWHM px" for n in fits)
        + " | b-c r px  FWHM b/c  FWHM a/c"
    )
    lines.append(head)
    lines.append("-" * len(head))
    a, b, c = fits["regular"], fits["ccdgrid"], fits["truth"]
    for k, tth in enumerate(setup.two_theta_deg):
        cells = " | ".join(
            f"{f.radius_px[k]:15.3f} {f.two_theta_deg[k]:9.5f} {f.fwhm_px[k]:9.3f}"
            for f in fits.values()
        )
        lines.append(
            f"{k:>4} {tth:11.5f} | {cells} | {b.radius_px[k] - c.radius_px[k]:+8.4f}"
            f"  {b.fwhm_px[k] / c.fwhm_px[k]:8.4f}  {a.fwhm_px[k] / c.fwhm_px[k]:8.4f}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="detector side, px")
    parser.add_argument("--distortion", default="frelon", help="generator preset")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args(argv)
    setup, _, fits, times, det_b, ponis = run(args.size, args.distortion, args.seed)
    print(
        "command: python benchmarks/integration.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(
        f"detector {setup.shape[0]}x{setup.shape[1]}, dist {setup.dist} m, "
        f"true pixel {setup.pixel_size[0] * 1e6:.4f} x {setup.pixel_size[1] * 1e6:.4f} um, "
        f"ccdgrid pixel {det_b.pixel1 * 1e6:.4f} x {det_b.pixel2 * 1e6:.4f} um, "
        f"beam centre (y, x) = ({setup.centre[0]:.2f}, {setup.centre[1]:.2f}) px, "
        f"ring sigma {setup.sigma_px} px (FWHM {setup.sigma_px * 2.3548:.3f} px before pixel "
        f"and bin widths)"
    )
    for name, (p1, p2) in ponis.items():
        print(
            f"fitted beam centre, {name}: PONI ({p1 * 1e3:.5f}, {p2 * 1e3:.5f}) mm, "
            f"({(p1 - setup.poni[0]) / setup.unit_m:+.3f}, "
            f"{(p2 - setup.poni[1]) / setup.unit_m:+.3f}) px from the true one"
        )
    print(
        "radii: Gaussian centres in px of sqrt(pixel1*pixel2); a = regular, b = ccdgrid, c = truth"
    )
    print(_table(setup, fits))
    b, c = fits["ccdgrid"], fits["truth"]
    print(
        f"max |r_b - r_c| = {np.max(np.abs(b.radius_px - c.radius_px)):.4f} px (target 0.05); "
        f"max |FWHM_b / FWHM_c - 1| = {np.max(np.abs(b.fwhm_px / c.fwhm_px - 1)):.4f} "
        "(target 0.05); "
        f"fit uncertainty of r_c up to {np.max(c.radius_err):.4f} px"
    )
    print("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
