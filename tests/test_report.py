"""The calibration report figure (matplotlib, Agg canvas; skipped without matplotlib)."""

import argparse
import dataclasses
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ccdgrid import report, synthetic
from ccdgrid.detector_file import load
from ccdgrid.errors import CcdgridError
from ccdgrid.pipeline import calibrate

PANELS = ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(h)")


@pytest.fixture(scope="module")
def small():
    """A 512² generated grid image and its calibration."""
    grid = synthetic.grid_image((512, 512), seed=2)
    return grid.image, calibrate(grid.image, pitch=5e-3)


@pytest.fixture(scope="module")
def figure(small):
    image, cal = small
    return report.plot_calibration(cal, image)


def _panel(fig, label):
    """The axes whose title starts with ``label`` (e.g. "(b)")."""
    found = [ax for ax in fig.axes if ax.get_title(loc="left").startswith(label)]
    assert len(found) == 1, f"{len(found)} axes titled {label}"
    return found[0]


def _titles(fig):
    return [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]


def test_figure_has_every_panel(figure):
    titles = _titles(figure)
    for label in PANELS:
        assert sum(t.startswith(label) for t in titles) == 1, (label, titles)
    assert any(t == "summary" for t in titles)
    assert "holes" in figure.get_suptitle()


@pytest.mark.parametrize("with_image", [True, False])
def test_the_image_panel_spans_the_detector(small, with_image):
    # the search's binned image and the full-resolution one both cover the
    # detector, whatever block size each is shown at
    image, cal = small
    assert cal.holes.binning > 1
    fig = report.plot_calibration(cal, image if with_image else None)
    (shown,) = _panel(fig, "(a)").get_images()
    left, right, bottom, top = shown.get_extent()
    ny, nx = image.shape
    assert (left, top) == (-0.5, -0.5)
    assert nx - 0.5 <= right < nx + 16
    assert ny - 0.5 <= bottom < ny + 16


def test_block_any_keeps_lines_one_pixel_wide():
    # the mask's outline was drawn on mask[::f, ::f]: a dead row at 611 with
    # f = 4 vanished from it
    mask = np.zeros((2048, 2045), bool)
    mask[611] = True
    mask[:, 1501] = True
    mask[2047, 3] = True
    blocks = report._block_any(mask, 4)
    assert blocks.shape == (512, 512)
    assert blocks[152].all()  # rows 608..611
    assert blocks[:, 375].all()  # columns 1500..1503
    assert blocks[511, 0]
    assert blocks.sum() == 512 + 512 - 1 + 1  # the row, the column, their crossing, the pixel
    np.testing.assert_array_equal(report._block_any(mask, 1), mask)


def test_panel_titles_are_short_enough_not_to_meet():
    # (f)'s second line ran into (g)'s title at 19 x 14 inches on a 2048²
    # plate (its arrows thinned to every 2nd row and column)
    grid = synthetic.grid_image((2048, 2048), pitch_px=60.0, hole_diameter_px=12.0, seed=2)
    figure = report.plot_calibration(calibrate(grid.image, pitch=5e-3))
    assert "every 2nd row/col" in _panel(figure, "(f)").get_title(loc="left")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    f_title = _panel(figure, "(f)")._left_title
    g_title = _panel(figure, "(g)")._left_title
    f_box, g_box = f_title.get_window_extent(renderer), g_title.get_window_extent(renderer)
    assert f_box.x1 < g_box.x0


def test_title_states_holes_pixel_size_and_residual(small, figure):
    _, cal = small
    title = figure.get_suptitle()
    assert f"{cal.lattice.n_valid} holes" in title
    assert f"{cal.pixel_size[0] * 1e6:.2f} × {cal.pixel_size[1] * 1e6:.2f} µm" in title
    assert "pitch)" in title  # the residual is also given in pitch units
    # the accuracy figure leads: what the maps predict at holes left out
    cv = cal.cross_validation
    assert f"{cv.k}-fold cross-validated" in title
    assert f"RMS {cv.rms_px:.3f} px" in title.split("|")[0]


def test_threshold_line_is_the_calibrations_threshold(small, figure):
    _, cal = small
    ax = _panel(figure, "(b)")
    lines = [ln for ln in ax.get_lines() if ln.get_gid() == "threshold"]
    assert len(lines) == 1
    np.testing.assert_allclose(lines[0].get_xdata(), [cal.holes.threshold] * 2, rtol=0, atol=0)


def test_pair_window_is_the_lattice_window(small, figure):
    _, cal = small
    ax = _panel(figure, "(c)")
    spans = [p for p in ax.patches if p.get_gid() == "window"]
    assert len(spans) == 1
    span = spans[0]
    xs = span.get_patch_transform().transform(span.get_path().vertices)[:, 0]  # data x
    np.testing.assert_allclose([xs.min(), xs.max()], cal.lattice.window, rtol=1e-12)


def test_every_accepted_and_rejected_point_is_drawn(small, figure):
    _, cal = small
    ax = _panel(figure, "(a)")
    labels = [h.get_label() for h in ax.get_legend().legend_handles]
    assert f"hole used in the fit ({cal.lattice.n_valid})" in labels
    reasons, counts = np.unique(cal.holes.reasons, return_counts=True)
    for reason, count in zip(reasons, counts, strict=True):
        assert f"{reason} ({count})" in labels


def test_png_is_written_whole(tmp_path, small):
    image, cal = small
    path = tmp_path / "report.png"
    fig = report.plot_calibration(cal, image, path=path, dpi=50)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]  # no temporary left
    assert fig.get_size_inches().tolist() == [19.0, 14.0]


def test_write_report_other_formats(tmp_path, small):
    _, cal = small
    out = report.write_report(cal, tmp_path / "report.pdf")
    assert out.read_bytes()[:5] == b"%PDF-"


def test_unwritable_path_is_a_ccdgrid_error(tmp_path, small):
    _, cal = small
    with pytest.raises(CcdgridError, match="does not exist"):
        report.plot_calibration(cal, path=tmp_path / "missing" / "report.png")


def test_map_colour_limits_ignore_one_wild_corner(small):
    _, cal = small
    dx = cal.dx.copy()
    inside = np.argwhere(cal.mask == 0)[len(np.argwhere(cal.mask == 0)) // 2]
    dx[inside[0], inside[1]] = 1e6  # one corpse of a corner: the colours must not follow it
    fig = report.plot_calibration(dataclasses.replace(cal, dx=dx))
    vmin, vmax = _panel(fig, "(d)").get_images()[0].get_clim()
    assert vmin == -vmax  # diverging, centred at 0
    valid = cal.dx[:-1, :-1][cal.mask == 0]
    assert vmax < 10 * np.abs(valid).max()


def test_without_matplotlib_a_clear_error(monkeypatch, small):
    _, cal = small
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(CcdgridError, match=r"pip install 'ccdgrid\[plot\]'"):
        report.plot_calibration(cal)


def test_image_of_another_shape_is_refused(small):
    _, cal = small
    with pytest.raises(CcdgridError, match=r"`image` has shape \(100, 100\)"):
        report.plot_calibration(cal, np.zeros((100, 100)))


def test_other_objects_are_refused():
    with pytest.raises(CcdgridError, match="`calibration` must be a Calibration"):
        report.plot_calibration(object())


def test_detector_file_with_image(tmp_path, small):
    image, cal = small
    cal.save(tmp_path / "det.h5")
    rec = load(tmp_path / "det.h5")
    fig = report.plot_calibration(rec, image)
    titles = _titles(fig)
    for label in PANELS:
        assert sum(t.startswith(label) for t in titles) == 1, (label, titles)
    # the image was searched again with the recorded threshold
    line = next(ln for ln in _panel(fig, "(b)").get_lines() if ln.get_gid() == "threshold")
    np.testing.assert_allclose(line.get_xdata()[0], cal.holes.threshold, rtol=1e-12)
    assert f"{cal.lattice.n_valid} holes" in fig.get_suptitle()


def test_detector_file_without_image(tmp_path, small):
    _, cal = small
    cal.save(tmp_path / "det.h5")
    fig = report.plot_calibration(load(tmp_path / "det.h5"))
    assert _panel(fig, "(a)").get_title(loc="left").endswith("(no image given)")
    ax_b = _panel(fig, "(b)")
    assert not ax_b.get_lines()
    assert any("needs the grid image" in t.get_text() for t in ax_b.texts)


def test_bilinear_at_holes_uses_the_corner_convention():
    # corner (i, j) sits at (i - 0.5, j - 0.5): a linear field is interpolated exactly
    ny, nx = 6, 9
    ci, cj = np.mgrid[0 : ny + 1, 0 : nx + 1].astype(np.float64)
    y, x = ci - 0.5, cj - 0.5
    dy, dx = 0.3 * y - 0.1 * x + 2.0, -0.2 * y + 0.05 * x
    rng = np.random.default_rng(7)
    pts = rng.uniform([-0.5, -0.5], [ny - 0.5, nx - 0.5], size=(50, 2))
    got = report._bilinear_corners(dy, dx, pts)
    want = np.stack(
        [0.3 * pts[:, 0] - 0.1 * pts[:, 1] + 2.0, -0.2 * pts[:, 0] + 0.05 * pts[:, 1]], axis=1
    )
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_command_line(tmp_path, small, monkeypatch, capsys):
    image, cal = small
    cal.save(tmp_path / "det.h5")
    np.save(tmp_path / "grid.npy", image)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    parser = argparse.ArgumentParser(prog="ccdgrid")
    sub = parser.add_subparsers(dest="command")
    report.add_report_parser(sub, parents=[common])
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["report", "det.h5", "grid.npy", "--dpi", "40"])
    assert args.run is report.run_report
    out = args.run(args)
    assert out == tmp_path / "det_report.png"
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_command_line_adds_debug_without_parents():
    parser = argparse.ArgumentParser(prog="ccdgrid")
    sub = parser.add_subparsers(dest="command")
    report.add_report_parser(sub)
    args = parser.parse_args(["report", "det.h5", "-o", "r.png", "--debug"])
    assert (args.detector, args.image, args.output, args.debug) == ("det.h5", None, "r.png", True)


def test_holes_left_out_on_purpose_are_not_called_off_the_grid():
    # the lit-edge rule leaves out holes that are in the grid
    assert report._lattice_label("soft hole at a lit edge") == "left out: soft hole at a lit edge"
    assert report._lattice_label("outlier") == "not in the grid: outlier"
