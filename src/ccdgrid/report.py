"""The calibration report: one figure a beamline scientist reads to trust a calibration.

:func:`plot_calibration` draws, from a :class:`ccdgrid.pipeline.Calibration`
or from a detector file loaded with :func:`ccdgrid.detector_file.load`:

(a) the grid image (log scale) with the accepted holes, the rejected
    candidates by reason and the outline of the valid region;
(b) the histogram of the candidates' log10 contrast with the detection
    threshold;
(c) the histogram of distances between neighbouring peaks with the window
    used to estimate the lattice vectors;
(d), (e) the ``dx`` and ``dy`` maps on the pixel corners;
(f) the displacement ``ideal - measured`` at every hole, as exaggerated
    arrows;
(g) where the maps miss the measured displacement at the holes;
(h) the histogram of that miss, with its RMS and maximum;
and the key numbers in the title and a text panel.

matplotlib is an optional dependency (``pip install "ccdgrid[plot]"``). The
figure is a plain :class:`matplotlib.figure.Figure` rendered by the Agg
canvas: it never opens a window, needs no display and is not registered with
``pyplot`` (nothing to close). In a notebook it shows as the value of a cell.

Conventions: positions are ``(y, x)`` index coordinates (centre of pixel
``(i, j)`` at ``(i, j)``); the image panels show them with y downwards, as
the image is stored. Displacements are ``ideal - measured`` in pixels: the
true position of what is seen at a point is that point plus ``(dy, dx)``.
"""

import math
import os
import pathlib
from dataclasses import dataclass, field

from .errors import CcdgridError

# numpy (and matplotlib) are imported inside the functions: the command line
# builds its parser with add_report_parser, and `ccdgrid --help` must not pay
# for numpy

__all__ = ["add_report_parser", "plot_calibration", "run_report", "write_report"]

_MISSING_MATPLOTLIB = "the report needs matplotlib: pip install 'ccdgrid[plot]'"
_IMAGE_PANEL_PX = 640  # the image panel is about this many screen pixels wide
_MAP_PANEL_PX = 320
_QUIVER_ACROSS = 24  # at most about this many arrows across panel (f)
# marker style per rejection reason; unknown reasons cycle through _SPARE_STYLES
_REASON_STYLES = {
    "hot pixel": ("x", "#ff2d2d"),
    "duplicate": ("+", "#ffd400"),
    "cut by border": ("s", "#ff9f1c"),
    "cut by edge": ("D", "#ff9f1c"),
    "masked": ("s", "#b0b0b0"),
    "not a hole": ("v", "#c77dff"),
    "shape": ("^", "#ff5ec4"),
    "too faint": ("v", "#8ecae6"),
    "fit failed": ("X", "#ff2d2d"),
    "saturated": ("o", "#00e5ff"),
}
_SPARE_STYLES = [("o", "#ff006e"), ("P", "#fb5607"), ("*", "#3a86ff"), ("h", "#ffbe0b")]
_LATTICE_PREFIX = "not in the grid: "
# holes in the grid that calibrate left out of the fit on purpose
_LEFT_OUT = {"soft hole at a lit edge": "left out: soft hole at a lit edge"}


def _lattice_label(reason):
    """The legend's label of a hole the lattice or calibrate rejected for ``reason``."""
    return _LEFT_OUT.get(reason, _LATTICE_PREFIX + reason)


@dataclass
class _ReportData:
    """What the panels draw, gathered from a Calibration or a detector file."""

    shape: tuple
    pixel_size: tuple
    pitch: object  # m or None
    pitch_px: object  # px or None
    dx: object
    dy: object
    mask: object
    holes: object  # (N, 2) measured (y, x) of the holes in the fit
    displacement: object  # (N, 2) (dy, dx) = ideal - measured
    indices: object = None  # (N, 2) lattice (i, j) of the holes, or None
    image: object = None  # 2-D array or None
    image_label: str = "image"
    image_binning: int = 1  # detector pixels per image pixel (the peak search bins)
    rejected: list = field(default_factory=list)  # [(label, (K, 2) positions)]
    log_hist: object = None  # (edges, counts, threshold) or None
    pair_distances: object = None
    window: object = None
    source: str = ""  # the grid image's file name, if known
    detector_file: str = ""
    method: str = ""
    notes: list = field(default_factory=list)
    cv: object = None  # (rms px, max px, folds) of the k-fold cross-validation, or None

    @property
    def residual(self):
        """(N, 2) px: corner maps interpolated at the holes minus the measured displacement."""
        return _bilinear_corners(self.dy, self.dx, self.holes) - self.displacement


# -- public -------------------------------------------------------------------


def plot_calibration(calibration, image=None, *, path=None, figsize=(19.0, 14.0), dpi=100):
    """Draw the calibration report figure, and optionally save it.

    Parameters
    ----------
    calibration : ccdgrid.pipeline.Calibration or ccdgrid.detector_file.DetectorRecord
        A calibration, or a detector file loaded with
        :func:`ccdgrid.detector_file.load`. A file keeps the maps, the holes
        and the fitted grid but not the hole search: with ``image`` the image
        is searched again with the recorded diameter, pitch and threshold for
        panels (a)-(b), and the lattice window of panel (c) is recomputed
        from the recorded holes (both are stated on the figure).
    image : array_like of shape (ny, nx) or None
        The grid image. None: a Calibration shows its disc-smoothed image; a
        detector file shows the holes on an empty frame.
    path : str or os.PathLike or None
        Where to write the figure (format from the suffix: ``.png``,
        ``.pdf``, ``.svg``, ...). Written under a temporary name and renamed,
        so a failed save leaves no partial file.
    figsize : tuple of 2 float, inches
        Figure size (width, height).
    dpi : float
        Resolution of a saved raster image, dots per inch (19 x 14 in at
        100 dpi: 1900 x 1400 px).

    Returns
    -------
    matplotlib.figure.Figure
        Axes titled ``(a) ...`` to ``(h) ...`` plus colour bars and a summary
        panel.

    Raises
    ------
    CcdgridError
        If matplotlib is not installed, ``calibration`` is neither kind of
        object, ``image`` does not have the calibration's shape, or the file
        cannot be written.
    """
    mpl = _import_matplotlib()
    data = _gather(calibration, image)
    fig = _draw(mpl, data, figsize)
    if path is not None:
        _save_figure(fig, path, dpi)
    return fig


def write_report(calibration, path, image=None, *, dpi=100):
    """Save the report of a calibration to ``path`` (for ``calibrate --report``).

    Parameters
    ----------
    calibration : ccdgrid.pipeline.Calibration or ccdgrid.detector_file.DetectorRecord
    path : str or os.PathLike
        Output file; the suffix sets the format (``.png`` recommended).
    image : array_like of shape (ny, nx) or None
        The grid image the calibration was made from.
    dpi : float
        Raster resolution, dots per inch.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    plot_calibration(calibration, image, path=path, dpi=dpi)
    return pathlib.Path(path)


def add_report_parser(subparsers, parents=()):
    """Add the ``report`` subcommand to the ``ccdgrid`` command line.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers`` returned.
    parents : sequence of argparse.ArgumentParser
        Shared option parsers (the CLI's ``--debug``); ``--debug`` is added
        here when none of them defines it.

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser; it sets ``run=run_report``.
    """
    import argparse

    parser = subparsers.add_parser(
        "report",
        parents=list(parents),
        help="draw the report figure of a detector file (PNG, PDF or SVG)",
        description="Draw the figure that shows whether a calibration can be trusted: the\n"
        "holes found on the image, the detection threshold, the lattice window, the\n"
        "dx/dy maps, the displacement at every hole and how well the maps fit it.\n"
        "A detector file does not keep the hole search: give the grid image and it\n"
        "is searched again with the recorded parameters.",
        epilog="example:\n  ccdgrid report grid_detector.h5 grid.edf -o grid_report.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("detector", metavar="DETECTOR", help="detector file written by ccdgrid")
    parser.add_argument(
        "image",
        metavar="IMAGE",
        nargs="?",
        help="the grid image it was calibrated from (optional; same reading rules as "
        "'ccdgrid calibrate')",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="figure to write; the suffix sets the format (default DETECTOR_STEM_report.png "
        "in the current directory)",
    )
    parser.add_argument(
        "--frame", type=int, metavar="N", help="frame of a multi-frame image file (0-based)"
    )
    parser.add_argument(
        "--dpi", type=float, default=100.0, help="resolution of a raster figure (default 100)"
    )
    if not any("--debug" in action.option_strings for p in parents for action in p._actions):
        parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.set_defaults(run=run_report)
    return parser


def run_report(args):
    """Run ``ccdgrid report``: load the detector file (and image), write the figure.

    Parameters
    ----------
    args : argparse.Namespace
        ``detector``, ``image`` (or None), ``output`` (or None), ``frame``,
        ``dpi``.

    Returns
    -------
    pathlib.Path
        The figure written.
    """
    from .detector_file import load

    record = load(args.detector)
    image = None
    if args.image is not None:
        from .io import read_image

        image, _ = read_image(args.image, frame=args.frame)
    if args.output:
        output = pathlib.Path(args.output)
    else:
        output = pathlib.Path.cwd() / f"{pathlib.Path(args.detector).stem}_report.png"
    write_report(record, output, image, dpi=args.dpi)
    print(f"wrote {output}")
    return output


# -- gathering the data -----------------------------------------------------------


def _import_matplotlib():
    try:
        import matplotlib
        import matplotlib.backends.backend_agg
        import matplotlib.colors
        import matplotlib.figure
        import matplotlib.lines
    except ImportError as exc:
        raise CcdgridError(_MISSING_MATPLOTLIB) from exc
    return matplotlib


def _gather(cal, image):
    import numpy as np

    if hasattr(cal, "holes") and hasattr(cal, "lattice") and hasattr(cal, "maps"):
        data = _from_calibration(cal)
    elif hasattr(cal, "dx") and hasattr(cal, "grid") and hasattr(cal, "peaks"):
        data = _from_record(cal, image)
    else:
        raise CcdgridError(
            "`calibration` must be a Calibration or a detector file record "
            f"(ccdgrid.detector_file.load), got {type(cal).__name__}"
        )
    if image is not None:
        img = np.asarray(image)
        if img.shape != data.shape:
            raise CcdgridError(
                f"`image` has shape {img.shape} but the calibration is for {data.shape}"
            )
        # the full-resolution image, not the search's binned one
        data.image, data.image_label, data.image_binning = img, "image", 1
        from .polarity import invert, polarity_of

        if polarity_of(cal) == "dark":
            # shown as measured: dark holes on a log scale of a bright plate
            # are a few grey levels in a white field
            data.image, data.image_label = invert(img), "image's negative (dark holes)"
    return data


def _from_calibration(cal):
    import numpy as np

    holes, lattice, grid = cal.holes, cal.lattice, cal.grid
    peaks = np.asarray(holes.peaks, dtype=np.float64)
    valid = np.asarray(lattice.valid, dtype=bool)
    rejected = _group(np.asarray(holes.rejected).reshape(-1, 2), np.asarray(holes.reasons))
    lat_rows = np.asarray(lattice.rejected, dtype=np.int64)
    rejected += _group(
        peaks[lat_rows], np.array([_lattice_label(r) for r in lattice.reasons], dtype=object)
    )
    hist = holes.log_histogram
    source = cal.source.get("path", "") if isinstance(cal.source, dict) else ""
    return _ReportData(
        shape=tuple(cal.shape),
        pixel_size=tuple(cal.pixel_size),
        pitch=cal.pitch,
        pitch_px=float(lattice.pitch_px),
        dx=cal.dx,
        dy=cal.dy,
        mask=cal.mask,
        holes=peaks[valid],
        displacement=np.asarray(grid.displacement, dtype=np.float64),
        indices=np.asarray(grid.indices),
        image=getattr(holes, "smoothed", None),
        image_label="disc-smoothed image",
        image_binning=int(getattr(holes, "binning", 1)),
        rejected=rejected,
        log_hist=(hist.edges, hist.counts, float(holes.threshold)),
        pair_distances=np.asarray(lattice.pair_distances),
        window=tuple(lattice.window),
        source=str(source or ""),
        method=_method_text(cal.params.get("resolved", {}) if cal.params else {}),
        cv=_cv(getattr(cal, "cross_validation", None)),
    )


def _cv(cv):
    if cv is None or not math.isfinite(cv.rms_px):
        return None
    return float(cv.rms_px), float(cv.max_px), int(cv.k)


def _from_record(rec, image):
    import numpy as np

    if rec.peaks is None or "displacement" not in rec.grid:
        raise CcdgridError(
            f"{getattr(rec, 'path', 'the detector file')} holds no hole record (a plain pyFAI "
            "file?): the report needs a detector file written by ccdgrid"
        )
    peaks = np.asarray(rec.peaks, dtype=np.float64)
    valid = np.ones(len(peaks), bool) if rec.valid is None else np.asarray(rec.valid, dtype=bool)
    resolved = (rec.params or {}).get("resolved", {})
    notes = []
    pitch_px = resolved.get("pitch_px")
    vectors = rec.grid.get("vectors")
    if pitch_px is None and vectors is not None:
        pitch_px = float(np.mean(np.hypot(*np.asarray(vectors).T)))
    data = _ReportData(
        shape=tuple(rec.shape),
        pixel_size=tuple(rec.pixel_size),
        pitch=rec.pitch,
        pitch_px=pitch_px,
        dx=rec.dx,
        dy=rec.dy,
        mask=rec.mask,
        holes=peaks[valid],
        displacement=np.asarray(rec.grid["displacement"], dtype=np.float64),
        indices=rec.grid.get("indices"),
        rejected=_group(
            peaks[~valid], np.full((~valid).sum(), _LATTICE_PREFIX + "reason not in the file")
        ),
        source=str((rec.source or {}).get("path", "") or ""),
        detector_file=str(rec.path),
        method=_method_text(resolved),
    )
    lattice = _reindex(peaks, pitch_px)
    if lattice is not None:
        data.pair_distances = np.asarray(lattice.pair_distances)
        data.window = tuple(lattice.window)
        notes.append("(c): lattice indexed again from the file's holes.")
    if image is not None:
        search = _research(image, resolved)
        if search is not None:
            # the file's holes are the truth here: drop re-found candidates on top of them
            rej = np.asarray(search.rejected, dtype=np.float64).reshape(-1, 2)
            reasons = np.asarray(search.reasons, dtype=str)
            if len(rej) and len(peaks):
                from scipy.spatial import cKDTree

                radius = 0.5 * float(resolved.get("hole_diameter") or 5.0)
                far = cKDTree(peaks).query(rej, distance_upper_bound=radius)[0] > radius
                rej, reasons = rej[far], reasons[far]
            data.rejected = _group(rej, reasons) + data.rejected
            hist = search.log_histogram
            data.log_hist = (hist.edges, hist.counts, float(search.threshold))
            notes.append("(a), (b): image searched again with the recorded settings.")
    else:
        notes.append("(b) needs the grid image.")
    data.notes = notes
    return data


def _reindex(peaks, pitch_px):
    from .lattice import index_holes

    try:
        return index_holes(peaks, pitch_px=pitch_px)
    except CcdgridError:
        return None


def _research(image, resolved):
    from .peaks import find_holes

    kwargs = {key: resolved.get(key) for key in ("hole_diameter", "pitch_px", "threshold")}
    try:
        return find_holes(image, **kwargs)
    except CcdgridError:
        return None


def _group(positions, reasons):
    """[(reason, (K, 2) positions)], most frequent reason first."""
    import numpy as np

    if len(reasons) == 0:
        return []
    keys, counts = np.unique(np.asarray(reasons, dtype=str), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    reasons = np.asarray(reasons, dtype=str)
    return [(str(keys[k]), positions[reasons == keys[k]]) for k in order]


def _method_text(resolved):
    parts = []
    if resolved.get("hole_diameter") is not None:
        parts.append(f"hole Ø {resolved['hole_diameter']:.1f} px")
    third = resolved.get("map_order") == 3
    if resolved.get("map_method"):
        name = resolved["map_method"]
        text = f"maps: {'tps3' if third and name == 'tps' else name}"
        if resolved.get("map_degree") is not None:
            text += f" (trend degree {resolved['map_degree']})"
        parts.append(text)
    if resolved.get("smoothing") is not None:
        parts.append(f"smoothing {resolved['smoothing']:.3g} {'pitch⁴' if third else 'pitch²'}")
    return ", ".join(parts)


def _bilinear_corners(dy, dx, points):
    """(M, 2) (dy, dx) of the corner maps at (y, x) points (corner (i, j) at (i-0.5, j-0.5))."""
    import numpy as np
    from scipy.ndimage import map_coordinates

    coords = (np.asarray(points, dtype=np.float64) + 0.5).T
    if coords.shape[1] == 0:
        return np.zeros((0, 2))
    out = [
        map_coordinates(np.asarray(m, np.float64), coords, order=1, mode="nearest")
        for m in (dy, dx)
    ]
    return np.stack(out, axis=1)


# -- drawing ------------------------------------------------------------------------


def _draw(mpl, d, figsize):
    # a bare Figure on the Agg canvas: no GUI backend, no display, no pyplot state
    import numpy as np

    fig = mpl.figure.Figure(figsize=figsize)
    mpl.backends.backend_agg.FigureCanvasAgg(fig)
    gs = fig.add_gridspec(
        4,
        4,
        height_ratios=[1.0, 1.0, 0.25, 1.05],
        width_ratios=[1.0, 1.0, 1.15, 1.15],
        left=0.045,
        right=0.935,  # room for the last colour bar's label
        top=0.91,
        bottom=0.045,
        wspace=0.5,
        hspace=0.42,
    )
    ax_img = fig.add_subplot(gs[0:2, 0:2])
    ax_thr = fig.add_subplot(gs[0, 2])
    ax_pair = fig.add_subplot(gs[0, 3])
    ax_quiv = fig.add_subplot(gs[1:3, 2])
    ax_resmap = fig.add_subplot(gs[1:3, 3])
    ax_dx = fig.add_subplot(gs[3, 0])
    ax_dy = fig.add_subplot(gs[3, 1])
    ax_reshist = fig.add_subplot(gs[3, 2])
    ax_text = fig.add_subplot(gs[3, 3])

    residual = d.residual
    res_norm = np.hypot(residual[:, 0], residual[:, 1])
    disp_norm = np.hypot(d.displacement[:, 0], d.displacement[:, 1])

    _panel_image(mpl, ax_img, d)
    _panel_threshold(ax_thr, d)
    _panel_pairs(ax_pair, d)
    _panel_map(
        mpl, ax_dx, d, d.dx, "(d) dx map (px): true − nominal x\nhatched: no holes, extrapolated"
    )
    _panel_map(
        mpl, ax_dy, d, d.dy, "(e) dy map (px): true − nominal y\nhatched: no holes, extrapolated"
    )
    _panel_quiver(mpl, ax_quiv, d, disp_norm)
    _panel_residual_map(ax_resmap, d, res_norm)
    _panel_residual_hist(ax_reshist, res_norm, d.pitch_px)
    _panel_text(ax_text, d, disp_norm, res_norm)
    fig.suptitle(_title(d, disp_norm, res_norm), fontsize=15, y=0.99, va="top")
    return fig


def _block_any(mask, f):
    """``mask`` (bool) reduced by ``f`` x ``f`` blocks: True where a block holds a True.

    The panel's outline of the mask: a strided sample showed a masked line
    one pixel wide only when its index was a multiple of ``f``.
    """
    import numpy as np

    if f == 1:
        return mask
    ny, nx = mask.shape
    padded = np.zeros((-(-ny // f) * f, -(-nx // f) * f), dtype=bool)
    padded[:ny, :nx] = mask
    return padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f).any(axis=(1, 3))


def _colorbar(fig, ax, mappable, label, **kwargs):
    """A colour bar beside ``ax``'s drawn box (it follows the equal-aspect shrink)."""
    cax = ax.inset_axes([1.03, 0.0, 0.04, 1.0])
    cb = fig.colorbar(mappable, cax=cax, **kwargs)
    cb.set_label(label)
    return cb


def _image_axes(ax, shape):
    ny, nx = shape
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(ny - 0.5, -0.5)  # y downwards, as the image is stored
    ax.set_aspect("equal")
    ax.set_anchor("W")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")


def _title(d, disp_norm, res_norm):
    p1, p2 = (v * 1e6 for v in d.pixel_size)
    rms = _rms(res_norm)
    line1 = (
        f"ccdgrid calibration — {len(d.holes)} holes, pixel size {p1:.2f} × {p2:.2f} µm (y × x)"
        + (f", hole pitch {d.pitch * 1e3:g} mm" if d.pitch else "")
    )
    pitch_txt = f" ({rms / d.pitch_px:.2g} pitch)" if d.pitch_px else ""
    line2 = (
        f"maps vs measured holes: RMS {rms:.3f} px{pitch_txt}, max {_max(res_norm):.3f} px"
        f"   |   distortion at the holes (ideal − measured): RMS {_rms(disp_norm):.2f} px, "
        f"max {_max(disp_norm):.2f} px"
    )
    if d.cv is not None:
        # what the maps predict at a hole they were not fitted to: the accuracy
        # figure (the in-sample misfit only says how much the smoothing removed)
        cv_rms, cv_max, k = d.cv
        cv_pitch = f" ({cv_rms / d.pitch_px:.2g} pitch)" if d.pitch_px else ""
        line2 = (
            f"accuracy ({k}-fold cross-validated at the holes): RMS {cv_rms:.3f} px{cv_pitch}, "
            f"max {cv_max:.3f} px   |   in-sample: RMS {rms:.3f} px   |   distortion at "
            f"the holes: RMS {_rms(disp_norm):.2f} px, max {_max(disp_norm):.2f} px"
        )
    return line1 + "\n" + line2


def _image_factor(shape, target):
    return max(1, math.ceil(max(shape) / target))


def _block_mean(array, f):
    """Mean over blocks of f x f pixels (edge-padded to a multiple of f), float32."""
    import numpy as np

    a = np.asarray(array, dtype=np.float32)
    if f == 1:
        return a
    h, w = a.shape
    if h % f or w % f:
        a = np.pad(a, ((0, -h % f), (0, -w % f)), mode="edge")
    return a.reshape(a.shape[0] // f, f, a.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)


def _panel_image(mpl, ax, d):
    import numpy as np

    fig = ax.figure
    if d.image is None:
        ax.set_title("(a) holes in the detector file (no image given)", loc="left")
    else:
        ax.set_title(f"(a) {d.image_label} (log scale): holes and rejected candidates", loc="left")
    _image_axes(ax, d.shape)
    f = _image_factor(d.shape, _IMAGE_PANEL_PX)
    if d.image is not None:
        # the mean of a block keeps the holes visible; a hot pixel is diluted f² times
        b = max(int(d.image_binning), 1)
        small = _block_mean(d.image, max(f // b, 1))
        scale = max(f // b, 1) * b  # detector pixels per displayed pixel
        good = small[np.isfinite(small) & (small > 0)]
        if good.size:
            lo, hi = np.percentile(good, [1.0, 99.9])
            lo = max(lo, hi * 1e-4)
            hi = max(hi, lo * 10.0)
            im = ax.imshow(
                np.clip(np.nan_to_num(small, nan=lo), lo, None),
                cmap="gray",
                norm=mpl.colors.LogNorm(vmin=lo, vmax=hi, clip=True),
                extent=(-0.5, small.shape[1] * scale - 0.5, small.shape[0] * scale - 0.5, -0.5),
                interpolation="nearest",
            )
            _colorbar(fig, ax, im, "counts (log scale; 1–99.9 % of the pixels)")
    else:
        ax.set_facecolor("0.15")

    m = _block_any(np.asarray(d.mask) != 0, f)
    handles = []
    if m.any() and not m.all():
        ax.contour(
            np.arange(m.shape[1]) * f + 0.5 * (f - 1),  # block centres
            np.arange(m.shape[0]) * f + 0.5 * (f - 1),
            m.astype(np.float32),
            levels=[0.5],
            colors="#00b4ff",
            linewidths=1.3,
        )
        handles.append(
            mpl.lines.Line2D(
                [], [], color="#00b4ff", lw=1.3, label="edge of the valid region (mask)"
            )
        )
    handles.append(
        ax.scatter(
            d.holes[:, 1],
            d.holes[:, 0],
            s=22,
            facecolors="none",
            edgecolors="#39ff14",
            linewidths=0.9,
            label=f"hole used in the fit ({len(d.holes)})",
        )
    )
    spare = iter(_SPARE_STYLES * 4)
    for reason, pos in d.rejected:
        marker, colour = _REASON_STYLES.get(reason.removeprefix(_LATTICE_PREFIX)) or next(spare)
        line_marker = marker in ("x", "+")
        handles.append(
            ax.scatter(
                pos[:, 1],
                pos[:, 0],
                s=42 if line_marker else 34,
                marker=marker,
                c=colour if line_marker else "none",
                edgecolors=None if line_marker else colour,
                linewidths=1.4,
                label=f"{reason} ({len(pos)})",
            )
        )
    # below the image, in the gridspec row left free for it; a dark box because the
    # marker colours were chosen to stand out on the dark image
    leg = ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.0, -0.075),
        ncol=3,
        fontsize=10,
        borderaxespad=0.0,
        title="(a) rejected candidates by reason (count)" if d.rejected else None,
        title_fontsize=10,
        alignment="left",
        facecolor="0.25",
        edgecolor="none",
        framealpha=1.0,
        labelcolor="white",
    )
    if d.rejected:
        leg.get_title().set_color("white")


def _panel_threshold(ax, d):
    import numpy as np

    ax.set_title("(b) peak contrast: holes stand out of the noise", loc="left")
    ax.set_xlabel("log10 contrast of a smoothed peak over its surroundings (counts)")
    ax.set_ylabel("number of peaks")
    if d.log_hist is None:
        _empty(ax, "needs the grid image\n(not kept in the detector file)")
        return
    edges, counts, thr = d.log_hist
    edges, counts = np.asarray(edges, dtype=np.float64), np.asarray(counts)
    centres = 0.5 * (edges[1:] + edges[:-1])
    kept = centres >= thr
    n_noise, n_kept = int(counts[~kept].sum()), int(counts[kept].sum())
    # one filled step patch per class: 200 bars would be 200 artists to draw
    ax.stairs(
        np.where(kept, 0, counts),
        edges,
        fill=True,
        color="0.6",
        label=f"below: noise peaks ({n_noise})",
    )
    ax.stairs(
        np.where(kept, counts, 0),
        edges,
        fill=True,
        color="#2a9d8f",
        label=f"kept: hole candidates ({n_kept})",
    )
    ax.axvline(
        thr,
        color="#d62828",
        lw=1.8,
        gid="threshold",
        label=f"threshold {thr:.2f} = {10**thr:.3g} counts",
    )
    ax.set_yscale("log")
    ax.set_ylim(0.7, max(2.0, counts.max()) * 8)
    ax.legend(fontsize=9, loc="upper left")


def _panel_pairs(ax, d):
    import numpy as np

    ax.set_title("(c) distances between nearby peaks", loc="left")
    ax.set_xlabel("distance between two peaks (px)")
    ax.set_ylabel("number of pairs")
    if d.pair_distances is None or len(d.pair_distances) == 0:
        _empty(ax, "no pair distances")
        return
    dist = np.asarray(d.pair_distances, dtype=np.float64)
    lo, hi = d.window if d.window is not None else (dist.min(), dist.max())
    counts, edges = np.histogram(dist, bins=np.linspace(0.0, max(dist.max(), hi) * 1.03, 90))
    ax.stairs(counts, edges, fill=True, color="0.45", label="pairs of peaks")
    ax.axvspan(
        lo,
        hi,
        color="#2a9d8f",
        alpha=0.2,
        gid="window",
        label=f"neighbour window {lo:.1f}–{hi:.1f} px",
    )
    if d.pitch_px:
        ax.axvline(
            d.pitch_px, color="#d62828", lw=1.5, ls="--", label=f"pitch {d.pitch_px:.2f} px"
        )
    ax.set_yscale("log")
    ax.set_ylim(0.7, max(2.0, counts.max()) * 8)
    ax.legend(fontsize=9, loc="upper left")


def _corner_extent(shape, f):
    """imshow extent of corner maps sampled every f corners (corner k*f at k*f - 0.5)."""
    h, w = shape
    return (-0.5 - f / 2, (w - 1) * f - 0.5 + f / 2, (h - 1) * f - 0.5 + f / 2, -0.5 - f / 2)


def _sampled_corner_map(d, corner_map):
    import numpy as np

    f = _image_factor(d.shape, _MAP_PANEL_PX)
    values = np.asarray(corner_map)[::f, ::f].astype(np.float32)
    ny, nx = d.shape
    rows = np.minimum(np.arange(values.shape[0]) * f, ny - 1)
    cols = np.minimum(np.arange(values.shape[1]) * f, nx - 1)
    invalid = np.asarray(d.mask)[np.ix_(rows, cols)] != 0
    return f, np.ma.masked_array(values, mask=invalid | ~np.isfinite(values))


def _panel_map(mpl, ax, d, corner_map, title):
    import numpy as np

    f, values = _sampled_corner_map(d, corner_map)
    ax.set_title(title, loc="left")
    _image_axes(ax, d.shape)
    inside = values.compressed()
    # robust limits: one wild corner must not wash out the map
    lim = float(np.percentile(np.abs(inside), 99.5)) if inside.size else 1.0
    lim = lim if lim > 0 else 1.0
    cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="0.85")
    im = ax.imshow(
        values,
        cmap=cmap,
        vmin=-lim,
        vmax=lim,
        extent=_corner_extent(values.shape, f),
        interpolation="nearest",
    )
    if values.mask.any() and not values.mask.all():
        ax.contourf(
            np.arange(values.shape[1]) * f - 0.5,
            np.arange(values.shape[0]) * f - 0.5,
            values.mask.astype(np.float32),
            levels=[0.5, 1.5],
            colors="none",
            hatches=["///"],
        )
    _colorbar(ax.figure, ax, im, "px", extend="both")


def _nice(value):
    """The largest of 1, 2, 5 x 10^k not above value (value > 0)."""
    k = math.floor(math.log10(value))
    for m in (5, 2, 1):
        if m * 10**k <= value:
            return m * 10**k
    return 10**k


def _panel_quiver(mpl, ax, d, disp_norm):
    import numpy as np

    _image_axes(ax, d.shape)
    if len(d.holes) == 0:
        ax.set_title("(f) displacement at the holes", loc="left")
        return
    spacing = d.pitch_px or max(d.shape) / 10
    holes, disp, norm = d.holes, d.displacement, disp_norm
    step = math.ceil(max(d.shape) / spacing / _QUIVER_ACROSS)
    thinned = step > 1 and d.indices is not None and len(d.indices) == len(holes)
    if thinned:
        # an arrow can be no longer than the gap to the next one: on large images
        # show every step-th lattice row and column so that arrows stay readable
        keep = np.all(np.asarray(d.indices) % step == 0, axis=1)
        holes, disp, norm = holes[keep], disp[keep], norm[keep]
        spacing *= step
    big = float(np.percentile(norm, 90)) if norm.size else 0.0
    # the 90th percentile arrow spans about 0.6 gap: a few large ones may overlap
    factor = _nice(0.6 * spacing / big) if big > 0 else 1.0
    which = f"; every {_ordinal(step)} row/col" if thinned else ""
    # two short lines: a longer one ran into (g)'s title
    ax.set_title(
        f"(f) ideal − measured at the holes (px), arrows × {factor:g}\n"
        f"lattice of the image centre{which}",
        loc="left",
    )
    q = ax.quiver(
        holes[:, 1],
        holes[:, 0],
        disp[:, 1],
        disp[:, 0],
        norm,
        angles="xy",
        scale_units="xy",
        scale=1.0 / factor,
        # dark end of viridis only: the pale end vanishes on white
        cmap=mpl.colors.ListedColormap(mpl.colormaps["viridis"](np.linspace(0.0, 0.8, 256))),
        width=0.005,
    )
    q.set_clim(0.0, float(disp_norm.max()) or 1.0)
    _colorbar(ax.figure, ax, q, "px")
    ref = _nice(0.8 * spacing / factor)  # a key arrow of most of a pitch: visible
    ax.quiverkey(
        q,
        1.0,
        -0.13,
        ref,
        f"arrow for {ref:g} px",
        labelpos="W",
        coordinates="axes",
        color="black",
        fontproperties={"size": 10},
    )


def _ordinal(n):
    return {2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _panel_residual_map(ax, d, res_norm):
    import numpy as np

    ax.set_title("(g) |map − measured displacement| (px)\nat each hole; worst on top", loc="left")
    _image_axes(ax, d.shape)
    if len(d.holes) == 0:
        return
    top = float(np.percentile(res_norm, 99))
    top = top if top > 0 else 1.0
    order = np.argsort(res_norm)  # the worst holes drawn last, on top
    sc = ax.scatter(
        d.holes[order, 1],
        d.holes[order, 0],
        c=res_norm[order],
        s=18,
        cmap="magma_r",
        vmin=0.0,
        vmax=top,
        edgecolors="0.4",
        linewidths=0.3,
    )
    _colorbar(ax.figure, ax, sc, "px", extend="max")


def _panel_residual_hist(ax, res_norm, pitch_px):
    import numpy as np

    ax.set_title("(h) maps vs measured displacement", loc="left")
    ax.set_xlabel("|map − measured displacement| at a hole (px)")
    ax.set_ylabel("number of holes")
    if res_norm.size == 0:
        _empty(ax, "no holes")
        return
    bins = int(np.clip(2 * np.sqrt(res_norm.size), 8, 40))
    counts, edges = np.histogram(res_norm, bins=bins)
    ax.stairs(counts, edges, fill=True, color="#457b9d")
    ax.set_ylim(0, counts.max() * 1.45)  # head room for the text box
    rms, mx = _rms(res_norm), _max(res_norm)
    ax.axvline(rms, color="#d62828", lw=1.5)
    text = f"RMS {rms:.4f} px (red line)\nmax {mx:.4f} px"
    if pitch_px:
        text += f"\n= {rms / pitch_px:.2g} / {mx / pitch_px:.2g} pitch"
    ax.text(
        0.97,
        0.95,
        text,
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=10,
        bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.9},
    )


def _panel_text(ax, d, disp_norm, res_norm):
    import numpy as np

    ax.set_axis_off()
    ny, nx = d.shape
    masked = int(np.count_nonzero(d.mask))
    n_rej = sum(len(p) for _, p in d.rejected)
    lines = [
        f"image: {ny} × {nx} px" + (f", {os.path.basename(d.source)}" if d.source else ""),
        *([f"detector file: {os.path.basename(d.detector_file)}"] if d.detector_file else []),
        f"holes in the fit: {len(d.holes)}; rejected: {n_rej}",
        f"pixel size (y, x): {d.pixel_size[0] * 1e6:.3f}, {d.pixel_size[1] * 1e6:.3f} µm",
    ]
    if d.pitch_px:
        lines.append(f"hole pitch on the image: {d.pitch_px:.2f} px")
    lines += [
        f"distortion: RMS {_rms(disp_norm):.3f} px, max {_max(disp_norm):.3f} px",
        f"maps vs holes: RMS {_rms(res_norm):.4f} px, max {_max(res_norm):.4f} px",
        f"masked (outside the holes): {100.0 * masked / (ny * nx):.1f} % of the pixels",
    ]
    if d.method:
        lines += _wrap(d.method, 48)
    lines += [
        "",
        "displacement = ideal grid − measured hole;",
        "true position = nominal + (dy, dx), as pyFAI.",
    ]
    for note in d.notes:
        lines += _wrap(note, 52)
    ax.set_title("summary", loc="left")
    ax.text(
        0.0,
        1.0,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=10,
        linespacing=1.4,
    )


def _wrap(text, width):
    import textwrap

    return textwrap.wrap(text, width)


def _empty(ax, message):
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _rms(values):
    import numpy as np

    return float(np.sqrt(np.mean(np.square(values)))) if np.size(values) else float("nan")


def _max(values):
    import numpy as np

    return float(np.max(values)) if np.size(values) else float("nan")


def _save_figure(fig, path, dpi):
    target = pathlib.Path(path).expanduser().absolute()
    if not target.parent.is_dir():
        raise CcdgridError(f"cannot write {target}: directory {target.parent} does not exist")
    fmt = target.suffix.lstrip(".").lower() or "png"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        # PNG: light compression, 4x faster to write than the default level
        extra = {"pil_kwargs": {"compress_level": 2}} if fmt == "png" else {}
        fig.savefig(tmp, dpi=dpi, format=fmt, **extra)
        os.replace(tmp, target)
    except ValueError as exc:  # matplotlib: unknown format
        raise CcdgridError(f"cannot write {target}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
