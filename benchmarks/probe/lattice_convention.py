"""How much of the dense residual is the choice of the ideal lattice, not an error.

Usage (from the repository root)::

    python benchmarks/probe/lattice_convention.py base-1024 barrel30 barrel60

``calibrate`` measures the distortion against the least-squares affine
lattice of all holes. A generator whose true field has no linear part at
the image centre (a radial barrel about the centre) defines another lattice:
the local one there. ``ccdgrid.synthetic.dense_residual`` removes the affine
part of ``d_rec - d``, but not ``(S - I) d``, ``S`` the map between the two
lattices. This script re-expresses the recovered corner maps against the
local lattice at the image centre (the corrected positions' Jacobian fitted
over the corners within ``r`` pitches of the centre set to the identity)
and measures both against the truth: probe cases by name (see
``benchmarks/probe/probe.py``), plus ``synthetic-strong``
(:func:`ccdgrid.synthetic.grid_image`, 20 px, whose truth has its
least-squares affine part removed: the convention of the current lattice).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe


def recentre(dy, dx, radius):
    """Corner maps re-expressed against the local lattice within ``radius`` px of the centre."""
    ny, nx = dy.shape[0] - 1, dy.shape[1] - 1
    yy, xx = np.mgrid[0 : ny + 1, 0 : nx + 1] - 0.5
    cy, cx = ny / 2, nx / 2
    sel = np.hypot(yy - cy, xx - cx) < radius
    corrected = np.column_stack([yy[sel] + dy[sel], xx[sel] + dx[sel]])
    design = np.column_stack([np.ones(sel.sum()), yy[sel] - cy, xx[sel] - cx])
    coef, *_ = np.linalg.lstsq(design, corrected, rcond=None)
    jac_inv = np.linalg.inv(coef[1:].T)
    pos = (np.stack([yy + dy, xx + dx], -1) - coef[0]) @ jac_inv.T + np.array([cy, cx])
    return pos[..., 0] - yy, pos[..., 1] - xx


def main(names):
    from ccdgrid.pipeline import calibrate
    from ccdgrid.synthetic import dense_residual, grid_image

    for name in names:
        if name == "synthetic-strong":
            g = grid_image((1024, 1024), pitch_px=60.0, hole_diameter_px=10.0, distortion="strong")
            image, truth, region = g.image, g.truth, getattr(g, "taper_mask", None)
        else:
            shape, kw = probe.cases()[name]
            g = probe.pg.make_probe(shape, **kw)
            image, truth, region = g.image, g.field, g.lit
        cal = calibrate(image, cv_folds=0)
        dy, dx = cal.dy.astype(np.float64), cal.dx.astype(np.float64)
        pitch = cal.params["resolved"]["pitch_px"]
        ls = dense_residual(truth, dy, dx, cal.mask, region=region, n=20000, seed=3)
        row = [f"{name}: least-squares lattice {ls.rms:.4f} / {ls.max:.3f} px"]
        for r in (1.5, 3.0):
            ndy, ndx = recentre(dy, dx, r * pitch)
            c = dense_residual(truth, ndy, ndx, cal.mask, region=region, n=20000, seed=3)
            row.append(f"centre lattice (r = {r} pitch) {c.rms:.4f} / {c.max:.3f} px")
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["base-1024", "barrel30", "barrel60", "synthetic-strong"])
