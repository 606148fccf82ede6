"""The ``ccdgrid`` command line and the length parser it uses for --pitch.

Most tests call ``main([...])`` in-process. The pipeline and the synthetic
generator are replaced by small fakes here, so that these tests exercise the
command line itself (arguments, messages, exit codes, files) and nothing else.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types

import fabio
import numpy as np
import pytest
from pyFAI import detector_factory

import ccdgrid
from ccdgrid.cli import _glue_negative_values, build_parser, main
from ccdgrid.detector_file import load, save_detector
from ccdgrid.errors import CcdgridError
from ccdgrid.units import parse_length

# -- lengths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metres"),
    [
        ("5mm", 0.005),
        ("5 mm", 0.005),
        ("5MM", 0.005),
        ("5e-3", 0.005),
        ("0.005", 0.005),
        ("5000um", 0.005),
        ("5000µm", 0.005),  # micro sign U+00B5
        ("5000μm", 0.005),  # Greek mu U+03BC
        ("0.5cm", 0.005),
        (".5cm", 0.005),
        ("+2.5mm", 0.0025),
        ("1m", 1.0),
        (0.004, 0.004),
    ],
)
def test_parse_length(text, metres):
    assert parse_length(text) == pytest.approx(metres, rel=1e-12)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "pitch: expected a positive, finite length, got '0'"),
        ("-5mm", "pitch: expected a positive, finite length, got '-5mm'"),
        ("abc", "pitch: expected a length such as 5mm.*got 'abc'"),
        ("", "pitch: expected a length such as 5mm.*got ''"),
        ("5 parsecs", "pitch: unknown unit 'parsecs' in '5 parsecs'"),
        ("nan", "got 'nan'"),
        ("1e999", "pitch: expected a positive, finite length, got '1e999'"),
        ("5 mm mm", "got '5 mm mm'"),
    ],
)
def test_parse_length_rejects(text, message):
    with pytest.raises(CcdgridError, match=message):
        parse_length(text, name="pitch")


# -- fakes for the pipeline and the generator -------------------------------------------------


class FakeCalibration:
    """Has what the CLI and save_detector use: maps, mask, summary(), save()."""

    def __init__(self, image, pitch, mask=None, **kwargs):
        ny, nx = image.shape
        self.shape = (ny, nx)
        self.pixel_size = (pitch / 98.0, pitch / 98.0)
        y, x = np.mgrid[0 : ny + 1, 0 : nx + 1]
        self.dy = (0.01 * x).astype(np.float32)
        self.dx = (-0.02 * y).astype(np.float32)
        self.mask = np.zeros(image.shape, np.int8) if mask is None else mask.astype(np.int8)
        self.pitch = pitch
        source = kwargs.get("source")
        # as the pipeline does: a name for an in-memory image becomes a dict
        self.source = {"path": source, "sha256": None} if isinstance(source, str) else source
        self.params = {}

    def summary(self):
        return "FAKE SUMMARY: 42 holes"

    def save(self, path):
        return save_detector(path, self)


@pytest.fixture
def fake_calibrate(monkeypatch):
    """Install a fake ``ccdgrid.pipeline`` module; ``calls`` records every call."""
    calls = []
    behaviour = {"raise": None}

    def calibrate(image, **kwargs):
        calls.append((image, kwargs))
        if behaviour["raise"] is not None:
            raise behaviour["raise"]
        return FakeCalibration(image, **kwargs)

    module = types.ModuleType("ccdgrid.pipeline")
    module.calibrate = calibrate
    monkeypatch.setitem(sys.modules, "ccdgrid.pipeline", module)
    return types.SimpleNamespace(calls=calls, behaviour=behaviour)


@pytest.fixture
def fake_synthetic(monkeypatch):
    """Install a fake ``ccdgrid.synthetic`` with a known image and truth."""

    class Truth:
        def corner_maps(self, shape):
            ny, nx = shape
            return np.full((ny + 1, nx + 1), 0.5), np.full((ny + 1, nx + 1), -0.25)

        def displacement(self, points):
            return np.zeros((len(points), 2))

    calls = []

    def grid_image(shape=(2048, 2048), **kwargs):
        calls.append(dict(shape=shape, **kwargs))
        rng = np.random.default_rng(kwargs.get("seed", 0))
        return types.SimpleNamespace(
            image=rng.integers(0, 1000, size=shape).astype(np.uint16),
            truth=Truth(),
            holes=np.array([[10.0, 12.0], [10.5, 110.0]]),
            indices=np.array([[0, 0], [0, 1]]),
            ideal=np.array([[10.2, 12.1], [10.4, 110.3]]),
            visible=np.array([True, True]),
            taper_mask=np.ones(shape, bool),
            pitch_px=98.0,
        )

    def dense_residual(truth, dy, dx, mask=None, *, region=None, **kwargs):
        calls.append({"dense_residual": (np.shape(dy), np.shape(dx), np.shape(region))})
        return types.SimpleNamespace(rms=0.0123, max=0.0456, points=np.zeros((20000, 2)))

    module = types.ModuleType("ccdgrid.synthetic")
    module.grid_image = grid_image
    module.dense_residual = dense_residual
    monkeypatch.setitem(sys.modules, "ccdgrid.synthetic", module)
    monkeypatch.setattr(ccdgrid, "synthetic", module, raising=False)
    return calls


@pytest.fixture
def grid_file(tmp_path):
    """A small image file to calibrate (the fake pipeline ignores its content)."""
    path = tmp_path / "grid.edf"
    data = np.random.default_rng(0).integers(0, 1000, size=(40, 60)).astype(np.uint16)
    fabio.edfimage.EdfImage(data=data).write(str(path))
    return path


def _error_line(capsys):
    """stderr must be exactly one line ``ccdgrid: error: ...``; return it."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("ccdgrid: error: "), err
    assert "Traceback" not in err
    return err


# -- help, version, usage errors ------------------------------------------------------------


def test_help_lists_commands_units_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("calibrate", "demo", "synth", "info", "examples:", "130"):
        assert word in out


@pytest.mark.parametrize("command", ["calibrate", "demo", "synth", "info"])
def test_each_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: ccdgrid {command}" in capsys.readouterr().out


def test_calibrate_help_explains_pitch_units(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    out = capsys.readouterr().out
    assert "5000µm" in out
    assert "metres" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ccdgrid {ccdgrid.__version__}"


def test_no_command_prints_usage_and_returns_2(capsys):
    assert main([]) == 2
    assert "usage: ccdgrid" in capsys.readouterr().err


@pytest.mark.parametrize("pitch", ["0", "-5mm", "abc", "5 parsecs", "5", "0.5nm"])
def test_bad_pitch_is_a_usage_error_naming_the_value(capsys, grid_file, pitch):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(grid_file), f"--pitch={pitch}"])  # "=": "-5mm" is no option
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --pitch: " in err
    assert repr(pitch) in err
    assert "pitch: pitch" not in err


@pytest.mark.parametrize("pitch", ["-5mm", "-5", "-.5cm", "-5e-3"])
def test_a_negative_pitch_after_a_space_gets_the_pitch_error(capsys, grid_file, pitch):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(grid_file), "--pitch", pitch])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --pitch: expected a positive, finite length, got '{pitch}'" in err
    assert "expected one argument" not in err


def test_a_negative_value_reaches_every_option_that_takes_one(
    capsys, tmp_path, grid_file, fake_calibrate
):
    out = tmp_path / "o.h5"
    argv = ["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(out)]

    assert main([*argv, "--threshold", "-1e-2"]) == 0
    assert fake_calibrate.calls[-1][1]["threshold"] == -0.01
    with pytest.raises(SystemExit):
        main([*argv, "--spacing", "-9.5"])
    assert "argument --spacing: expected a positive number, got '-9.5'" in capsys.readouterr().err


def test_a_negative_word_after_a_flag_or_past_double_dash_is_left_alone(
    capsys, grid_file, fake_calibrate
):
    # --debug takes no value, and the words after "--" are no options: neither is glued
    with pytest.raises(SystemExit):
        main(["calibrate", str(grid_file), "--debug", "-5mm", "--pitch", "5mm"])
    assert "unrecognized arguments: -5mm" in capsys.readouterr().err
    assert fake_calibrate.calls == []
    argv = ["calibrate", "--pitch", "-5mm", "--", "--threshold", "-1"]
    assert _glue_negative_values(argv, build_parser().value_options) == [
        *("calibrate", "--pitch=-5mm", "--", "--threshold", "-1")
    ]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "two"])
def test_the_threshold_must_be_a_finite_number(
    capsys, tmp_path, grid_file, fake_calibrate, monkeypatch, value
):
    monkeypatch.chdir(tmp_path)  # where the default output would go if it were accepted
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(grid_file), "--pitch", "5mm", f"--threshold={value}"])
    assert exit_info.value.code == 2
    assert "argument --threshold: expected a " in capsys.readouterr().err
    assert fake_calibrate.calls == []


def test_a_pitch_without_unit_is_metres_and_must_be_plausible(capsys, grid_file):
    with pytest.raises(SystemExit):
        main(["calibrate", str(grid_file), "--pitch", "5"])
    assert "'5' is 5 m, not a plausible hole pitch" in capsys.readouterr().err


def test_pitch_is_required(capsys, grid_file):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(grid_file)])
    assert exit_info.value.code == 2
    assert "--pitch" in capsys.readouterr().err


def test_help_does_not_import_the_heavy_modules():
    code = (
        "import sys; from ccdgrid.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('numpy', 'fabio', 'h5py', 'scipy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# -- calibrate: errors ----------------------------------------------------------------------


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_missing_image(capsys, tmp_path, fake_calibrate, monkeypatch):
    monkeypatch.chdir(tmp_path)

    assert main(["calibrate", "nothere.edf", "--pitch", "5mm"]) == 1
    assert "image file not found" in _error_line(capsys)
    assert _files(tmp_path) == []
    assert fake_calibrate.calls == []


def test_text_file_is_not_an_image(capsys, tmp_path, fake_calibrate, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.edf").write_text("not an image\n")

    assert main(["calibrate", "notes.edf", "--pitch", "5mm", "-o", "out.h5"]) == 1
    assert "cannot read" in _error_line(capsys)
    assert _files(tmp_path) == ["notes.edf"]


def test_stack_needs_a_frame(capsys, tmp_path, fake_calibrate):
    path = tmp_path / "stack.npy"
    np.save(path, np.zeros((3, 20, 20), np.uint16))
    out = tmp_path / "out.h5"

    assert main(["calibrate", str(path), "--pitch", "5mm", "-o", str(out)]) == 1
    assert "holds 3 frames: choose one" in _error_line(capsys)
    assert not out.exists()

    assert main(["calibrate", str(path), "--pitch", "5mm", "-o", str(out), "--frame", "2"]) == 0
    assert out.exists()


def test_mask_of_the_wrong_shape(capsys, tmp_path, grid_file, fake_calibrate):
    mask = tmp_path / "mask.npy"
    np.save(mask, np.zeros((10, 10)))
    out = tmp_path / "out.h5"

    code = main(
        ["calibrate", str(grid_file), "--pitch", "5mm", "--mask", str(mask), "-o", str(out)]
    )

    assert code == 1
    assert "has shape (10, 10), but the image has shape (40, 60)" in _error_line(capsys)
    assert not out.exists()


def test_a_pipeline_error_is_one_line_and_no_file(capsys, tmp_path, fake_calibrate):
    path = tmp_path / "flat.npy"
    np.save(path, np.full((64, 64), 100, np.uint16))
    out = tmp_path / "out.h5"
    fake_calibrate.behaviour["raise"] = CcdgridError("no grid found: the image is constant")

    assert main(["calibrate", str(path), "--pitch", "5mm", "-o", str(out)]) == 1
    assert _error_line(capsys) == "ccdgrid: error: no grid found: the image is constant\n"
    assert not out.exists()


def test_debug_adds_the_traceback(capsys, grid_file, fake_calibrate):
    fake_calibrate.behaviour["raise"] = CcdgridError("no grid found")

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.endswith("ccdgrid: error: no grid found\n")


def test_interrupt_exits_130(capsys, grid_file, fake_calibrate):
    fake_calibrate.behaviour["raise"] = KeyboardInterrupt()

    assert main(["calibrate", str(grid_file), "--pitch", "5mm"]) == 130
    assert capsys.readouterr().err == "ccdgrid: interrupted\n"


def test_a_bug_keeps_its_traceback(grid_file, fake_calibrate):
    fake_calibrate.behaviour["raise"] = ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["calibrate", str(grid_file), "--pitch", "5mm"])


def test_unwritable_output_directory(capsys, tmp_path, grid_file, fake_calibrate):
    out = tmp_path / "no" / "such" / "dir.h5"

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(out)]) == 1
    assert "does not exist" in _error_line(capsys)


def test_a_missing_output_directory_is_reported_before_calibrating(
    capsys, tmp_path, grid_file, fake_calibrate
):
    out = tmp_path / "nodir" / "det.h5"

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(out)]) == 1
    assert f"directory {out.parent} does not exist" in _error_line(capsys)
    assert fake_calibrate.calls == []


@pytest.mark.parametrize("name", ["outdir/", "a/b/"])
def test_an_output_ending_in_a_slash_is_a_directory_made_for_the_file(
    capsys, tmp_path, grid_file, fake_calibrate, monkeypatch, name
):
    monkeypatch.chdir(tmp_path)

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", name]) == 0

    written = tmp_path / name / "grid_detector.h5"
    assert load(written).shape == (40, 60)
    assert f'pyFAI.detector_factory("{written}")' in capsys.readouterr().out


def test_a_directory_asked_for_is_not_made_when_the_calibration_fails(
    capsys, tmp_path, grid_file, fake_calibrate, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    fake_calibrate.behaviour["raise"] = CcdgridError("no grid found")

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", "outdir/"]) == 1
    _error_line(capsys)
    assert _files(tmp_path) == ["grid.edf"]


@pytest.mark.parametrize("name", ["out.edf", "out.txt", "outdir", "out.h5.tif"])
def test_a_detector_file_name_must_say_hdf5(capsys, tmp_path, grid_file, fake_calibrate, name):
    out = tmp_path / name

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(out)]) == 1
    assert "a detector file is HDF5, name it .h5 (or .hdf5, .nxs)" in _error_line(capsys)
    assert fake_calibrate.calls == []
    assert _files(tmp_path) == ["grid.edf"]


@pytest.mark.parametrize("name", ["det.h5", "det.HDF5", "det.nxs"])
def test_hdf5_suffixes_are_accepted(tmp_path, grid_file, fake_calibrate, name):
    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(tmp_path / name)]) == 0
    assert load(tmp_path / name).shape == (40, 60)


def test_demo_output_is_checked_before_it_runs(capsys, tmp_path, fake_calibrate, fake_synthetic):
    assert main(["demo", "--size", "32", "-o", str(tmp_path / "demo.edf")]) == 1
    assert "a detector file is HDF5" in _error_line(capsys)
    assert fake_synthetic == []


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ("r.txt", "--report r.txt: matplotlib draws no .txt figure; choose .png, .pdf or .svg"),
        ("nodir/r.png", "does not exist"),
    ],
)
def test_a_bad_report_is_refused_before_calibrating(
    capsys, tmp_path, grid_file, fake_calibrate, monkeypatch, report, message
):
    monkeypatch.chdir(tmp_path)

    code = main(
        ["calibrate", str(grid_file), "--pitch", "5mm", "-o", "rep.h5", "--report", report]
    )

    assert code == 1
    assert message in _error_line(capsys)
    assert fake_calibrate.calls == []
    assert _files(tmp_path) == ["grid.edf"]


def test_a_report_without_matplotlib_is_refused_before_calibrating(
    capsys, tmp_path, grid_file, fake_calibrate, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for name in ("matplotlib", "matplotlib.backend_bases"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails

    code = main(
        ["calibrate", str(grid_file), "--pitch", "5mm", "-o", "rep.h5", "--report", "r.png"]
    )

    assert code == 1
    assert "--report needs matplotlib: pip install 'ccdgrid[plot]'" in _error_line(capsys)
    assert fake_calibrate.calls == []
    assert _files(tmp_path) == ["grid.edf"]


def test_output_may_not_overwrite_the_input(capsys, tmp_path, fake_calibrate):
    path = tmp_path / "grid.npy"
    np.save(path, np.zeros((20, 20), np.uint16))
    before = path.read_bytes()

    assert main(["calibrate", str(path), "--pitch", "5mm", "-o", str(path)]) == 1
    assert "would overwrite the input image" in _error_line(capsys)
    assert path.read_bytes() == before
    assert fake_calibrate.calls == []


# -- calibrate: success ---------------------------------------------------------------------


def test_calibrate_passes_the_options_and_writes_the_default_output(
    capsys, tmp_path, grid_file, fake_calibrate, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    mask = tmp_path / "mask.npy"
    mask_data = np.zeros((40, 60), np.uint8)
    mask_data[5, 7] = 1
    np.save(mask, mask_data)

    code = main(
        [
            "calibrate",
            str(grid_file),
            "--pitch",
            "5000µm",
            "--mask",
            str(mask),
            "--hole-diameter",
            "10.5",
            "--spacing",
            "98",
            "--threshold",
            "0.3",
            "--backend",
            "numpy",
        ]
    )

    assert code == 0
    ((image, kwargs),) = fake_calibrate.calls
    assert image.shape == (40, 60)
    assert kwargs["pitch"] == pytest.approx(5e-3, rel=1e-12)
    np.testing.assert_array_equal(kwargs["mask"], mask_data.astype(bool))
    assert kwargs["hole_diameter"] == 10.5
    assert kwargs["pitch_px"] == 98.0
    assert kwargs["threshold"] == 0.3
    assert kwargs["backend"] == "numpy"
    assert kwargs["source"]["path"] == str(grid_file)
    assert len(kwargs["source"]["sha256"]) == 64
    out = capsys.readouterr().out
    assert "FAKE SUMMARY: 42 holes" in out
    assert _files(work) == ["grid_detector.h5"]  # IMAGE_STEM_detector.h5 in the cwd
    rec = load(work / "grid_detector.h5")
    assert rec.shape == (40, 60)
    assert rec.source["path"] == str(grid_file)
    assert rec.source["sha256"] == hashlib.sha256(grid_file.read_bytes()).hexdigest()


def test_calibrate_defaults_leave_the_automatic_choices_to_the_pipeline(
    tmp_path, grid_file, fake_calibrate
):
    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(tmp_path / "o.h5")]) == 0

    ((_, kwargs),) = fake_calibrate.calls
    assert kwargs["mask"] is None
    assert kwargs["hole_diameter"] is None
    assert kwargs["pitch_px"] is None
    assert kwargs["threshold"] is None
    assert kwargs["backend"] == "cython"


def test_calibrate_replaces_an_existing_output(tmp_path, grid_file, fake_calibrate):
    out = tmp_path / "det.h5"
    out.write_bytes(b"old content")

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(out)]) == 0
    assert load(out).shape == (40, 60)


# -- info ------------------------------------------------------------------------------------


def test_info_describes_a_detector_file(capsys, tmp_path, grid_file, fake_calibrate):
    out = tmp_path / "det.h5"
    main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(out)])
    capsys.readouterr()

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "40 x 60 pixels of 51.020 x 51.020 µm" in text
    assert f"ccdgrid {ccdgrid.__version__}" in text
    assert str(grid_file) in text
    assert "pitch       5 mm" in text


def test_info_on_a_plain_pyfai_detector_file(capsys, tmp_path):
    from pyFAI.detectors import Detector

    path = tmp_path / "pyfai.h5"
    Detector(75e-6, 75e-6, max_shape=(30, 20)).save(str(path))

    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "not ccdgrid (a plain pyFAI detector file" in text
    assert "30 x 20 pixels of 75.000 x 75.000 µm" in text


def test_info_on_a_file_that_is_not_a_detector(capsys, tmp_path):
    path = tmp_path / "grid.npy"
    np.save(path, np.zeros((4, 4)))

    assert main(["info", str(path)]) == 1
    assert "is not an HDF5 detector file" in _error_line(capsys)


# -- correct ---------------------------------------------------------------------------------


def test_correct_checks_the_image_shape_before_building_the_matrix(
    capsys, tmp_path, grid_file, fake_calibrate, monkeypatch
):
    from ccdgrid.correction import CorrectionMatrix

    detector = tmp_path / "det.h5"
    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(detector)]) == 0
    capsys.readouterr()
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((30, 60), np.uint16))
    built = []
    monkeypatch.setattr(
        CorrectionMatrix, "from_maps", classmethod(lambda cls, *a, **k: built.append(a))
    )

    code = main(["correct", str(other), "-d", str(detector), "-o", str(tmp_path / "out")])

    assert code == 1
    line = _error_line(capsys)
    assert f"{other} has shape (30, 60), but the detector {detector} is (40, 60)" in line
    assert built == []
    assert not (tmp_path / "out").exists()


# -- synth and demo -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".edf", ".tif", ".npy"])
def test_synth_writes_the_image_and_its_truth(capsys, tmp_path, fake_synthetic, suffix):
    out = tmp_path / f"grid{suffix}"

    code = main(
        [
            *("synth", "-o", str(out), "--size", "48x64", "--seed", "3"),
            *("--distortion", "strong", "--hot-pixels", "5", "--dead-rows", "1"),
        ]
    )

    assert code == 0
    assert _files(tmp_path) == sorted([out.name, "grid_truth.npz"])
    image, _ = ccdgrid.io.read_image(out)
    expected = np.random.default_rng(3).integers(0, 1000, size=(48, 64)).astype(np.uint16)
    np.testing.assert_array_equal(image, expected)
    with np.load(tmp_path / "grid_truth.npz") as truth:
        np.testing.assert_array_equal(truth["dy"], np.full((49, 65), 0.5, np.float32))
        np.testing.assert_array_equal(truth["dx"], np.full((49, 65), -0.25, np.float32))
        np.testing.assert_array_equal(truth["holes"], [[10.0, 12.0], [10.5, 110.0]])
    (call,) = fake_synthetic
    assert call["shape"] == (48, 64)
    assert call["seed"] == 3
    assert call["distortion"] == "strong"
    assert call["hot_pixels"] == 5
    assert call["dead_rows"] == 1
    assert str(out) in capsys.readouterr().out


def test_synth_refuses_an_unknown_format(capsys, tmp_path, fake_synthetic):
    assert main(["synth", "-o", str(tmp_path / "grid.jpg"), "--size", "32"]) == 1
    assert "choose a .edf, .tif, .tiff or .npy file name" in _error_line(capsys)
    assert _files(tmp_path) == []


def test_synth_size_is_checked(capsys, tmp_path, fake_synthetic):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "-o", str(tmp_path / "g.edf"), "--size", "8"])
    assert exit_info.value.code == 2
    assert "got '8'" in capsys.readouterr().err


def test_demo_runs_without_arguments_or_input(
    capsys, tmp_path, fake_calibrate, fake_synthetic, monkeypatch
):
    monkeypatch.chdir(tmp_path)

    assert main(["demo", "--size", "64"]) == 0

    out = capsys.readouterr().out
    assert "FAKE SUMMARY" in out
    assert "RMS 0.0123 px, max 0.0456 px" in out
    assert _files(tmp_path) == ["demo_detector.h5"]
    ((image, kwargs),) = fake_calibrate.calls
    assert image.shape == (64, 64)
    assert kwargs["pitch"] == 5e-3
    assert fake_synthetic[-1] == {"dense_residual": ((65, 65), (65, 65), (64, 64))}


# -- the installed console script (one subprocess run) ---------------------------------------


def test_console_script_reports_a_user_error_in_one_line(tmp_path):
    script = shutil.which("ccdgrid", path=os.path.dirname(sys.executable)) or shutil.which(
        "ccdgrid"
    )
    assert script is not None, "the ccdgrid console script is not installed"

    result = subprocess.run(
        [script, "calibrate", str(tmp_path / "missing.edf"), "--pitch", "5mm"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("ccdgrid: error: image file not found")
    assert result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# -- with the real generator -----------------------------------------------------------------


def test_synth_with_the_real_generator_matches_a_direct_call(tmp_path):
    from ccdgrid import synthetic

    out = tmp_path / "grid.edf"
    argv = ["synth", "-o", str(out), "--size", "120x200", "--seed", "2", "--distortion", "strong"]

    assert main([*argv, "--hot-pixels", "3", "--spacing", "40", "--hole-diameter", "6"]) == 0

    direct = synthetic.grid_image(
        (120, 200), seed=2, distortion="strong", hot_pixels=3, pitch_px=40.0, hole_diameter_px=6.0
    )
    image, _ = ccdgrid.io.read_image(out)
    np.testing.assert_array_equal(image, direct.image)
    dy, dx = direct.truth.corner_maps((120, 200))
    with np.load(tmp_path / "grid_truth.npz") as truth:
        assert truth["dy"].shape == (121, 201)
        np.testing.assert_array_equal(truth["dy"], dy.astype(np.float32))
        np.testing.assert_array_equal(truth["dx"], dx.astype(np.float32))
        np.testing.assert_array_equal(truth["holes"], direct.holes)
        assert json.loads(str(truth["params"]))["seed"] == 2


# -- with the real pipeline --------------------------------------------------------------------


def test_demo_end_to_end(capsys, tmp_path):
    out = tmp_path / "demo.h5"

    assert main(["demo", "--size", "512", "-o", str(out)]) == 0

    text = capsys.readouterr().out
    rms = float(re.search(r"against the ground truth.*: RMS (\d+\.\d+) px, max", text).group(1))
    assert rms < 0.1  # a sanity bound; the pipeline's own tests hold the accuracy targets
    det = detector_factory(str(out))
    assert det.shape == (512, 512)
    assert det.get_pixel_corners().shape == (512, 512, 4, 3)


def test_calibrate_a_synthetic_image_end_to_end(capsys, tmp_path):
    from ccdgrid import synthetic

    image = tmp_path / "grid.edf"
    out = tmp_path / "det.h5"
    assert main(["synth", "-o", str(image), "--size", "512", "--seed", "4"]) == 0

    assert main(["calibrate", str(image), "--pitch", "5mm", "-o", str(out)]) == 0

    assert "holes found" in capsys.readouterr().out
    rec = load(out)
    assert rec.source["path"] == str(image)
    assert rec.source["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    truth = synthetic.grid_image((512, 512), seed=4)
    np.testing.assert_array_equal(ccdgrid.io.read_image(image)[0], truth.image)
    error = synthetic.dense_residual(
        truth.truth, rec.dy, rec.dx, rec.mask, region=truth.taper_mask
    )
    assert error.rms < 0.1
    np.testing.assert_array_equal(detector_factory(str(out)).mask, rec.mask)


def test_a_threshold_in_counts_gets_its_unit_and_the_automatic_value(capsys, tmp_path):
    image = tmp_path / "grid.edf"
    out = tmp_path / "det.h5"
    assert main(["synth", "-o", str(image), "--size", "512", "--seed", "4"]) == 0
    capsys.readouterr()

    code = main(["calibrate", str(image), "--pitch", "5mm", "-o", str(out), "--threshold", "30"])

    assert code == 1
    line = _error_line(capsys)
    assert line.startswith("ccdgrid: error: too few holes found")
    assert "--threshold 30 is log10 of the holes' contrast: 1e+30 counts" in line
    automatic = float(re.search(r"the automatic threshold is (-?\d+\.\d+) \(", line).group(1))
    holes = int(re.search(r"\((\d+) holes\): leave it out", line).group(1))
    assert 0 < automatic < 5  # 10 to 1e5 counts: any real grid image
    assert holes >= 6
    assert "--hole-diameter PX and --spacing PX" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("message", "shown", "hint"),
    [
        (
            "too few holes found in `image`: 2 (at least 6 are needed)",
            "too few holes found in the image: 2 (at least 6 are needed)",
            "or --threshold T below",
        ),
        (
            "no grid of holes found in `image`: no peak stands out",
            "no grid of holes found in the image: no peak stands out",
            "or --threshold T below",
        ),
        (
            "`image` shows no periodic grid of holes: ...",
            "The image shows no periodic grid of holes: ...",
            "If the image does show a grid",
        ),
    ],
)
def test_a_failed_hole_search_names_the_options_that_help(
    capsys, tmp_path, grid_file, fake_calibrate, message, shown, hint
):
    # the library's messages name its arguments; the command line, its options
    fake_calibrate.behaviour["raise"] = CcdgridError(message)
    out = tmp_path / "o.h5"

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(out)]) == 1

    line = _error_line(capsys)
    assert line.startswith(f"ccdgrid: error: {shown}. ")
    assert hint in line
    assert "--hole-diameter PX and --spacing PX" in line


def test_a_constant_image_gets_no_hint(capsys, tmp_path, grid_file, fake_calibrate):
    message = "`image` is constant: there is no grid of holes in it"
    fake_calibrate.behaviour["raise"] = CcdgridError(message)

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(tmp_path / "o.h5")]) == 1
    expected = "The image is constant: there is no grid of holes in it"
    assert _error_line(capsys) == f"ccdgrid: error: {expected}\n"


def test_messages_name_options_not_python_arguments(capsys, tmp_path, grid_file, fake_calibrate):
    fake_calibrate.behaviour["raise"] = CcdgridError(
        "`pitch_px` must be a positive number of pixels; check `hole_diameter` and `mask`"
    )

    assert main(["calibrate", str(grid_file), "--pitch", "5mm", "-o", str(tmp_path / "o.h5")]) == 1
    line = _error_line(capsys)
    assert "--spacing must be a positive number of pixels" in line
    assert "check --hole-diameter and the mask" in line
    assert "`" not in line


def test_the_threshold_help_gives_its_unit(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--threshold T hole-detection threshold, log10 of the smallest contrast" in out
    assert "2 means 100 counts" in out


def test_a_constant_image_has_no_grid(capsys, tmp_path):
    path = tmp_path / "flat.npy"
    np.save(path, np.full((128, 128), 100, np.uint16))
    out = tmp_path / "det.h5"

    assert main(["calibrate", str(path), "--pitch", "5mm", "-o", str(out)]) == 1

    assert "no grid of holes" in _error_line(capsys)
    assert _files(tmp_path) == ["flat.npy"]


def test_a_series_summary_names_the_failed_frames_by_index(capsys, tmp_path):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.full((64, 64), 100, np.uint16))
    images = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    argv = ["calibrate", *images, "--pitch", "5mm", "-o", f"{tmp_path}/out/", "--workers", "1"]

    assert main([*argv, "--no-progress"]) == 1

    out = capsys.readouterr().out
    assert "calibrated 0 of 2 frames in " in out
    assert "; 2 failed (indices 0, 1)\n" in out


def test_a_series_summary_of_one_and_of_many_failed_frames():
    from ccdgrid.series_table import FrameResult, SeriesResult

    def summary(n_failed):
        frames = [FrameResult(index=i, file="f", status="failed") for i in range(n_failed)]
        frames.append(FrameResult(index=n_failed, file="f", status="ok"))
        return SeriesResult(frames=frames, seconds=1.0).summary()

    assert summary(1).endswith("; 1 failed (index 0)")
    assert summary(12).endswith("; 12 failed (indices 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...)")


def test_a_drift_note_measured_twice_is_kept_once():
    # a frame whose worker failed to measure its drift is measured again by the scheduler
    from ccdgrid.series import _merge_drift
    from ccdgrid.series_table import FrameResult

    note = "drift not measured: no hole of this frame lies within 0.3 pitch of a reference hole"
    row = FrameResult(index=1, file="f", status="ok", note=f"warm start not possible; {note}")
    again = FrameResult(index=-1, file="", note=note)

    _merge_drift(row, again)

    assert row.note == f"warm start not possible; {note}"
    _merge_drift(row, FrameResult(index=-1, file="", note="another note"))
    assert row.note == f"warm start not possible; {note}; another note"


def test_a_series_holds_blas_and_openmp_to_one_thread_before_numpy_loads():
    # so that the process has one thread and forks its workers (ccdgrid.series)
    code = (
        "import os, sys\n"
        "from ccdgrid import cli\n"
        "assert 'numpy' not in sys.modules\n"
        "cli._frames('0:3')\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'], "
        "os.environ['MKL_NUM_THREADS'], len(os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["MKL_NUM_THREADS"] = "3"  # a value the user set is kept
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "3", "1"]


def test_checking_frames_loads_no_numpy():
    # the check runs while the command line is parsed, for every command
    code = (
        "import argparse, sys\n"
        "from ccdgrid import cli\n"
        "cli._frames('0:8:2,12')\n"
        "try:\n"
        "    cli._frames('0:8:0')\n"
        "except argparse.ArgumentTypeError as exc:\n"
        "    print(exc)\n"
        "print('numpy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("bad frame selection '0:8:0'")
    assert out.stdout.splitlines()[1] == "False"


@pytest.mark.parametrize("debug", [False, True])
def test_numpy_runtime_warnings_are_hidden_unless_debugging(monkeypatch, capsys, debug):
    import warnings

    from ccdgrid import cli

    def noisy(args):
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=1)
        warnings.warn("made a cold calibration instead", UserWarning, stacklevel=1)

    monkeypatch.setattr(cli, "_run_info", noisy)
    argv = ["info", "x.h5"] + (["--debug"] if debug else [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(argv) == 0
    err = capsys.readouterr().err
    if debug:
        # Python's own report of both, with where they were raised
        assert [w.category for w in seen] == [RuntimeWarning, UserWarning]
    else:
        # ccdgrid's own warning as one line, numpy's not at all
        assert err.splitlines() == ["ccdgrid: warning: made a cold calibration instead"]
        assert seen == []


def test_dark_spots_on_a_bright_plate_are_named(capsys, tmp_path):
    # a real grid image, inverted: dark dots on a bright field fail in the
    # lattice, whose own advice (size, spacing) cannot help
    from ccdgrid.cli import _dark_spots
    from ccdgrid.synthetic import grid_image

    g = grid_image((512, 512), pitch_px=40.0, hole_diameter_px=8.0, seed=3)
    image = g.image.astype(np.float32)
    assert not _dark_spots(image)
    assert _dark_spots(image.max() - image)
    tapered = grid_image((512, 512), seed=5).image  # an unlit region around the taper
    assert not _dark_spots(tapered)
    path = tmp_path / "inverted.edf"
    fabio.edfimage.EdfImage(data=image.max() - image).write(str(path))

    out = tmp_path / "o.h5"
    args = ["calibrate", str(path), "--pitch", "5mm", "-o", str(out)]
    assert main([*args, "--polarity", "bright"]) == 1
    line = _error_line(capsys)
    assert "dark spots on a bright background" in line
    assert "with --polarity dark (or auto, the default)" in line
    assert not out.exists()
    # the default calibrates it as dark holes
    assert main(args) == 0
    assert load(out).params["polarity"] == "dark"


def test_the_dark_spots_hint_joins_a_detection_failures_advice(capsys, tmp_path, fake_calibrate):
    path = tmp_path / "dots.edf"
    data = np.random.default_rng(2).integers(990, 1010, (40, 60)).astype(np.uint16)
    for dy in range(3):
        for dx in range(3):
            data[4 + dy :: 10, 4 + dx :: 10] = 10  # dark 3x3 dots
    fabio.edfimage.EdfImage(data=data).write(str(path))
    fake_calibrate.behaviour["raise"] = CcdgridError("too few holes found in `image`: 2")

    argv = ["calibrate", str(path), "--pitch", "5mm", "-o", str(tmp_path / "o.h5")]
    assert main([*argv, "--polarity", "bright"]) == 1
    line = _error_line(capsys)
    assert "too few holes found in the image: 2. The image looks like dark spots" in line
    # with "auto" (the default) the dark holes were tried already: no such hint
    assert main(argv) == 1
    assert "dark spots" not in _error_line(capsys)
    assert "--hole-diameter PX and --spacing PX" in line
