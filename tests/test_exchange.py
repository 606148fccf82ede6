"""EDF corner maps and conversion between detector file, Fit2D spline and EDF pair."""

import argparse
from dataclasses import dataclass

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import ccdgrid
from ccdgrid.detector_file import load, save_detector
from ccdgrid.errors import CcdgridError
from ccdgrid.exchange import (
    EDF_CONVENTION,
    add_convert_parser,
    convert,
    edf_paths,
    read_edf_maps,
    write_edf_maps,
)
from ccdgrid.spline import read_spline

fabio = pytest.importorskip("fabio")

NY, NX = 70, 110  # non-square: an x/y swap changes shapes
PIXEL = (50e-6, 75e-6)  # (pixel1 = y, pixel2 = x), metres
TOLERANCE = 0.01  # px


def field(ny=NY, nx=NX):
    """Analytic corner maps (dy, dx), a few px, different along x and y."""
    i, j = np.mgrid[0 : ny + 1, 0 : nx + 1].astype(np.float64)
    dx = 2.0 * np.sin(i / 25.0) + 0.02 * j - 0.5
    dy = 1.5 * np.cos(j / 30.0) - 0.015 * i + 0.2
    return dy, dx


def band_mask(ny=NY, nx=NX):
    """1 = invalid: a border band of 4 rows on top and 6 columns on the right."""
    mask = np.zeros((ny, nx), np.int8)
    mask[:4] = 1
    mask[:, -6:] = 1
    return mask


@dataclass
class Calibration:
    dy: np.ndarray
    dx: np.ndarray
    mask: np.ndarray
    pixel_size: tuple


def valid_corners(mask):
    good = mask == 0
    corners = np.zeros((good.shape[0] + 1, good.shape[1] + 1), bool)
    for di in (0, 1):
        for dj in (0, 1):
            corners[di : di + good.shape[0], dj : dj + good.shape[1]] |= good
    return corners


# -- EDF ------------------------------------------------------------------------------


def test_edf_paths_accept_every_spelling(tmp_path):
    expected = tuple(tmp_path / f"maps{tail}" for tail in ("-x.edf", "-y.edf", "-mask.edf"))
    for name in ("maps", "maps.edf", "maps-x.edf", "maps-y.edf", "maps-mask.edf", "maps-X.EDF"):
        assert edf_paths(tmp_path / name) == expected


def test_edf_round_trip_with_headers(tmp_path):
    dy, dx = field()
    mask = band_mask()
    paths = write_edf_maps(tmp_path / "m", dy, dx, mask=mask, pixel_size=PIXEL)
    assert paths == edf_paths(tmp_path / "m")

    images = [fabio.open(str(p)) for p in paths]
    for image, name, data in zip(images[:2], ("dx", "dy"), (dx, dy), strict=True):
        assert image.data.dtype == np.float32
        assert image.data.shape == (NY + 1, NX + 1)
        assert_array_equal(image.data, data.astype(np.float32))
        header = image.header
        assert header["Map"] == name
        assert header["Units"] == "pixel"
        assert header["Convention"] == EDF_CONVENTION
        assert "(i-0.5, j-0.5)" in header["Convention"]
        assert "pyFAI coordinates (i, j)" in header["Convention"]
        assert header["Sign"].startswith("d = true - nominal")
        assert float(header["PixelSize1"]) == PIXEL[0]
        assert float(header["PixelSize2"]) == PIXEL[1]
        assert header["PixelSizeUnits"] == "m"
        assert header["ccdgrid_version"] == ccdgrid.__version__
        assert header["MaskFile"] == "m-mask.edf"
    assert images[2].data.shape == (NY, NX)
    assert_array_equal(images[2].data, mask)

    back = read_edf_maps(paths[0], paths[1])
    assert back.shape == (NY, NX)
    assert back.pixel_size == PIXEL
    assert back.dx.dtype == np.float32
    assert_array_equal(back.dx, dx.astype(np.float32))
    assert_array_equal(back.dy, dy.astype(np.float32))
    assert_array_equal(back.mask, mask)
    assert back.paths == paths


def test_edf_without_mask_or_pixel_size(tmp_path):
    dy, dx = field()
    paths = write_edf_maps(tmp_path / "bare.edf", dy, dx)
    assert len(paths) == 2
    header = fabio.open(str(paths[0])).header
    assert "PixelSize1" not in header
    assert "MaskFile" not in header
    back = read_edf_maps(*paths)
    assert back.mask is None
    assert back.pixel_size is None


def test_read_edf_written_by_pyfai(tmp_path):
    pyfai_spline = pytest.importorskip("pyFAI.spline")
    dy, dx = field()
    convert_src = tmp_path / "src.h5"
    save_detector(convert_src, Calibration(dy, dx, None, PIXEL))
    spline_path = convert(convert_src, tmp_path / "s.spline").paths[0]
    spline = pyfai_spline.Spline(str(spline_path))
    spline.writeEDF(str(tmp_path / "pyfai"))  # pyfai-x.edf, pyfai-y.edf, empty headers
    back = read_edf_maps(tmp_path / "pyfai-x.edf", tmp_path / "pyfai-y.edf")
    ours_dy, ours_dx = read_spline(spline_path).corner_maps()
    assert back.pixel_size is None
    np.testing.assert_allclose(back.dx, ours_dx, atol=1e-4)
    np.testing.assert_allclose(back.dy, ours_dy, atol=1e-4)


def test_read_edf_rejects_swapped_or_mismatched_files(tmp_path):
    dy, dx = field()
    dx_path, dy_path = write_edf_maps(tmp_path / "m", dy, dx)
    with pytest.raises(CcdgridError, match="holds the 'dy' map, expected 'dx'"):
        read_edf_maps(dy_path, dx_path)
    small = write_edf_maps(tmp_path / "small", *field(10, 12))
    with pytest.raises(CcdgridError, match="differ in shape"):
        read_edf_maps(dx_path, small[1])
    with pytest.raises(CcdgridError, match="EDF file not found"):
        read_edf_maps(tmp_path / "absent-x.edf", dy_path)


def test_read_edf_rejects_other_units(tmp_path):
    dx_path = tmp_path / "u-x.edf"
    fabio.edfimage.EdfImage(data=np.zeros((5, 6), np.float32), header={"Units": "mm"}).write(
        str(dx_path)
    )
    _, dy_path = write_edf_maps(tmp_path / "v", np.zeros((5, 6)), np.zeros((5, 6)))
    with pytest.raises(CcdgridError, match=r"displacement in 'mm', expected pixels"):
        read_edf_maps(dx_path, dy_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dx": np.zeros((5, 7))}, "`dy` and `dx` differ in shape"),
        ({"dx": np.zeros(7)}, "`dx` must be a corner map"),
        ({"mask": np.zeros((5, 6))}, r"`mask` must have the pixel shape \(4, 5\)"),
        ({"pixel_size": (1e-4, 0.0)}, "`pixel_size` must be two positive lengths"),
    ],
)
def test_write_edf_rejects_bad_arguments(tmp_path, kwargs, match):
    args = {"dy": np.zeros((5, 6)), "dx": np.zeros((5, 6)), **kwargs}
    with pytest.raises(CcdgridError, match=match):
        write_edf_maps(tmp_path / "bad", args.pop("dy"), args.pop("dx"), **args)
    assert list(tmp_path.iterdir()) == []


# -- conversion between every pair -----------------------------------------------------

SUFFIX = {"detector": ".h5", "spline": ".spline", "edf": ".edf"}


def make_source(tmp_path, fmt):
    """A source file in `fmt` holding field() and band_mask(); returns (path, dy, dx, mask)."""
    dy, dx = field()
    mask = band_mask()
    if fmt == "detector":
        path = tmp_path / "src.h5"
        save_detector(path, Calibration(dy, dx, mask, PIXEL))
        return path, dy, dx, mask
    if fmt == "edf":
        paths = write_edf_maps(tmp_path / "src", dy, dx, mask=mask, pixel_size=PIXEL)
        return paths[0], dy, dx, mask
    # a spline holds no mask; its maps are what it evaluates to
    path = tmp_path / "src.spline"
    save_detector(tmp_path / "seed.h5", Calibration(dy, dx, None, PIXEL))
    convert(tmp_path / "seed.h5", path)
    dy, dx = read_spline(path).corner_maps()
    return path, dy, dx, None


def read_target(path, fmt):
    """(dy, dx, mask or None, pixel_size) from a converted file, read by independent means."""
    if fmt == "detector":
        import pyFAI

        rec = load(path)
        # pyFAI itself agrees with the record's maps
        det = pyFAI.detector_factory(str(path))
        corners = det.get_pixel_corners()
        assert det.shape == (NY, NX)
        np.testing.assert_allclose(
            corners[:, :, 0, 2] / det.pixel2 - np.arange(NX), rec.dx[:-1, :-1], atol=2e-4
        )
        return rec.dy, rec.dx, rec.mask, rec.pixel_size
    if fmt == "spline":
        spline = read_spline(path)
        dy, dx = spline.corner_maps()
        return dy, dx, None, spline.pixel_size
    x_path, y_path, mask_path = edf_paths(path)
    data = [fabio.open(str(p)).data for p in (y_path, x_path)]
    mask = fabio.open(str(mask_path)).data if mask_path.exists() else None
    header = fabio.open(str(x_path)).header
    return data[0], data[1], mask, (float(header["PixelSize1"]), float(header["PixelSize2"]))


@pytest.mark.parametrize("target", ["detector", "spline", "edf"])
@pytest.mark.parametrize("source", ["detector", "spline", "edf"])
def test_convert_every_pair(tmp_path, source, target):
    src, dy, dx, mask = make_source(tmp_path, source)
    dst = tmp_path / f"out{SUFFIX[target]}"
    result = convert(src, dst)
    assert (result.source, result.target) == (source, target)
    assert result.shape == (NY, NX)
    got_dy, got_dx, got_mask, pixel_size = read_target(dst, target)
    assert got_dx.shape == (NY + 1, NX + 1)
    assert pixel_size == pytest.approx(PIXEL, rel=1e-7)
    if target == "spline":
        # a fit: within the tolerance on the corners of unmasked pixels
        corners = np.ones(dx.shape, bool) if mask is None else valid_corners(mask)
        assert np.abs(got_dx - dx)[corners].max() <= TOLERANCE
        assert np.abs(got_dy - dy)[corners].max() <= TOLERANCE
        assert result.spline_fit.max_error <= TOLERANCE
    else:
        # copies: exact to float32
        assert_array_equal(got_dx, np.float32(dx))
        assert_array_equal(got_dy, np.float32(dy))
        if mask is not None:
            assert_array_equal(got_mask, mask)
        elif target == "detector":
            assert not got_mask.any()
        else:
            assert got_mask is None


def test_convert_to_overrides_the_extension(tmp_path):
    src, *_ = make_source(tmp_path, "detector")
    result = convert(src, tmp_path / "distortion.txt", to="spline")
    assert result.target == "spline"
    assert read_spline(tmp_path / "distortion.txt").shape == (NY, NX)


def test_convert_edf_without_pixel_size_needs_it(tmp_path):
    dy, dx = field()
    write_edf_maps(tmp_path / "bare", dy, dx)
    with pytest.raises(CcdgridError, match=r"does not state the pixel size.*--pixel-size"):
        convert(tmp_path / "bare", tmp_path / "out.h5")
    result = convert(tmp_path / "bare-y.edf", tmp_path / "out.h5", pixel_size=(40e-6, 45e-6))
    assert load(result.paths[0]).pixel_size == (40e-6, 45e-6)


@pytest.mark.parametrize(
    ("src_name", "dst_name", "to", "match"),
    [
        ("src.h5", "out.tiff", None, "cannot tell the output format"),
        ("src.h5", "out.h5", "fit2d", "`to` must be one of detector, spline, edf"),
        ("absent.h5", "out.edf", None, "source not found"),
        ("junk.txt", "out.edf", None, "not a detector file"),
    ],
)
def test_convert_errors(tmp_path, src_name, dst_name, to, match):
    make_source(tmp_path, "detector")
    (tmp_path / "junk.txt").write_text("hello\n")
    with pytest.raises(CcdgridError, match=match):
        convert(tmp_path / src_name, tmp_path / dst_name, to=to)
    assert not (tmp_path / dst_name).exists()


# -- command line ----------------------------------------------------------------------


def parser():
    top = argparse.ArgumentParser(prog="ccdgrid")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    add_convert_parser(top.add_subparsers(dest="command"), parents=[common])
    return top


def test_convert_subcommand(tmp_path, capsys):
    src, *_ = make_source(tmp_path, "detector")
    args = parser().parse_args(["convert", str(src), str(tmp_path / "cli.spline")])
    assert args.tolerance == 0.01
    args.run(args)
    out = capsys.readouterr().out
    assert "detector -> spline: 70 x 110 pixels" in out
    assert f"wrote {tmp_path / 'cli.spline'}" in out
    assert "max error" in out
    assert (tmp_path / "cli.spline").is_file()


def test_convert_subcommand_pixel_size(tmp_path):
    write_edf_maps(tmp_path / "bare", *field())
    args = parser().parse_args(
        ["convert", str(tmp_path / "bare.edf"), str(tmp_path / "o.h5"), "--pixel-size", "50um"]
    )
    assert args.pixel_size == pytest.approx((50e-6, 50e-6))
    args.run(args)
    assert load(tmp_path / "o.h5").pixel_size == pytest.approx((50e-6, 50e-6))
    args = parser().parse_args(
        ["convert", "a", "b.h5", "--pixel-size", "50um,75um", "--to", "edf", "--debug"]
    )
    assert args.pixel_size == pytest.approx((50e-6, 75e-6))
    assert args.to == "edf"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--pixel-size", "fifty"], "fifty"),
        (["--tolerance", "-1"], "positive number of pixels"),
        (["--to", "tiff"], "invalid choice"),
    ],
)
def test_convert_subcommand_usage_errors(capsys, extra, match):
    with pytest.raises(SystemExit) as excinfo:
        parser().parse_args(["convert", "a.h5", "b.spline", *extra])
    assert excinfo.value.code == 2
    assert match in capsys.readouterr().err
