"""The ``ccdgrid`` command: calibrate, demo, synth, info.

Each subcommand imports its heavy modules (numpy, fabio, h5py, the pipeline)
only when it runs, so ``ccdgrid --help`` answers at once. Errors in the input
(:class:`~ccdgrid.errors.CcdgridError`, and ``OSError`` for files) print one
line ``ccdgrid: error: ...`` on stderr and exit with status 1; ``--debug``
adds the traceback. Anything else is a bug and keeps its traceback. A
command line that argparse rejects, a value its option's check rejects
included (``--pitch 5``), is a usage error: status 2, as argparse does.
"""

import argparse
import json
import math
import os
import pathlib
import re
import sys
import time
import traceback
import warnings

from ._h5write import check_writable
from .errors import CcdgridError
from .units import PITCH_RANGE, parse_length

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EXIT_CODES = """\
exit status:
  0    success
  1    error in the input or the data (one line on stderr; --debug adds the traceback)
  2    invalid command line: an unknown or missing option, options that do not go
       together, or a value its option rejects (--pitch 5, --pitch abc); the
       command's usage and one line "ccdgrid COMMAND: error: ..."
  130  interrupted (Ctrl-C)
"""

_DESCRIPTION = """\
Calibrate the spatial distortion of an X-ray area detector from one image of a
regular grid of holes, and write a detector file that pyFAI loads as is:
    pyFAI.detector_factory("detector.h5")
"""

_MAIN_EPILOG = (
    """\
examples:
  ccdgrid demo                                 calibrate a built-in 2048x2048 example
  ccdgrid calibrate grid.edf --pitch 5mm       calibrate your grid image
  ccdgrid info grid_detector.h5                what a detector file holds
  ccdgrid validate grid.edf -d grid_detector.h5            correct the grid image, re-measure it
  ccdgrid correct scan_*.edf -d grid_detector.h5 -o out/   correct images for the distortion
  ccdgrid correct-stack in.h5::/entry/data -d grid_detector.h5 -o out.h5::/entry/data
                                               correct a frame stack, streamed
  ccdgrid report grid_detector.h5 grid.edf -o report.png   the figure to check a calibration
  ccdgrid convert grid_detector.h5 grid.spline export for Fit2D / pyFAI splinefile=
  ccdgrid COMMAND --help                       the options of one command

"""
    + _EXIT_CODES
)

_CALIBRATE_EPILOG = (
    """\
units:
  --pitch is a length between 1 µm and 10 cm: 5mm, 5000um, 5000µm, 0.5cm, or a
  bare number in metres (5e-3).
  --hole-diameter and --spacing are in pixels of the image.

output:
  Without -o the file is IMAGE_STEM_detector.h5 in the current directory (raw-data
  directories are often read-only). -o takes a file name ending in .h5, .hdf5 or
  .nxs (the file is HDF5, as pyFAI reads it), or a directory: an existing one, or
  a name ending in / (created). The output and --report are checked before the
  calibration starts. An existing file is replaced; nothing is written if the
  calibration fails.

series (several images, or --frames):
  Every frame is calibrated on its own, several at once (--workers), and gets its
  own detector file: -o names a directory (created if missing; files
  STEM_detector.h5, or STEM_FFFF_detector.h5 for frame FFFF of a stack) or a name
  pattern with {index} (position in the series), {frame} and {stem}. A table of
  every frame (holes, grid, pixel size, cross-validated residual, drift against
  the first frame that calibrates, or against --from) is written as CSV and
  JSON. A frame that fails is listed in the table and the others go on; the
  exit status is then 1.

examples:
  ccdgrid calibrate grid.edf --pitch 5mm
  ccdgrid calibrate grid.tif --pitch 5mm --mask mask.edf -o frelon_2026.h5
  ccdgrid calibrate scan.h5::/entry/data/data --frame 3 --pitch 5mm
  ccdgrid calibrate scan.h5::/entry/data --frames 0:16 --pitch 5mm -o out/
  ccdgrid calibrate grid_*.edf --pitch 5mm -o 'out/detector_{index:03d}.h5' --warm
  ccdgrid calibrate pos_a.edf pos_b.edf pos_c.edf --pitch 5mm --combine -o plate.h5

"""
    + _EXIT_CODES
)


# -- argument types (argparse turns their errors into usage errors, exit 2) --


def _one_thread_per_worker():
    """Hold BLAS and OpenMP to one thread before numpy loads, for a series.

    numpy's OpenBLAS starts its threads when it loads, and a process with
    threads spawns its series workers (each imports numpy, scipy and the
    pipeline again, ~0.6 s of CPU) where one with a single thread forks them
    (``ccdgrid._series_pool._start_method``). Every worker of a series, this
    process's included, runs BLAS and OpenMP on one thread anyway. Values the
    user set are kept; once numpy is loaded this changes nothing.
    """
    if "numpy" not in sys.modules:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")


def _frames(text):
    # --frames makes a series (checking it loads no numpy)
    _one_thread_per_worker()
    from .series_frames import parse_frames

    try:
        parse_frames(text)
    except CcdgridError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _pitch(text):
    try:
        value = parse_length(text)
    except CcdgridError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    low, high = PITCH_RANGE
    if not low <= value <= high:
        # "--pitch 5" is 5 m: almost certainly a forgotten unit
        raise argparse.ArgumentTypeError(
            f"{text!r} is {value:g} m, not a plausible hole pitch ({low * 1e6:g} µm to "
            f"{high * 1e2:g} cm): give a unit, e.g. 5mm"
        )
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _size(text):
    """``"2048"`` (square) or ``"1024x2048"`` (ny x nx) -> (ny, nx)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 16:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 2048 or 1024x2048 (rows x columns, each >= 16), got {text!r}"
        )
    return tuple(dims)


# -- the parser --------------------------------------------------------------


def build_parser():
    """Return the ``ccdgrid`` argument parser (subcommands set ``args.run``).

    Its ``value_options`` attribute is the set of the subcommands' option
    strings that take one value.
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ccdgrid",
        description=_DESCRIPTION,
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ccdgrid {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    cal = sub.add_parser(
        "calibrate",
        parents=[common],
        help="calibrate a detector from a grid image and write its detector file",
        description="Find the holes of a grid image, fit the grid, and write the distortion\n"
        "as a detector file for pyFAI. Hole size, spacing and detection threshold are\n"
        "found automatically; the options below override them.",
        epilog=_CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="grid image: EDF, TIFF, CBF, ... (anything fabio reads), .npy, or "
        "file.h5::/path/to/dataset; several images (or --frames) calibrate a series",
    )
    cal.add_argument(
        "--pitch",
        type=_pitch,
        required=True,
        metavar="LENGTH",
        help="distance between neighbouring holes of the grid plate, e.g. 5mm (required: "
        "it sets the pixel size)",
    )
    cal.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="detector file to write (.h5, .hdf5 or .nxs) or a directory (existing, or "
        "ending in /); for a series, a directory or a name pattern such as "
        "out/detector_{index:03d}.h5",
    )
    cal.add_argument(
        "--from",
        dest="previous",
        metavar="DETECTOR",
        help="previous detector file (.h5) of this detector: measure the holes near their "
        "previous positions instead of searching the image (faster); falls back to a full "
        "calibration, with a warning, if the plate moved too far. In a series, every frame "
        "starts from it and its drift is measured against it",
    )
    cal.add_argument(
        "--report",
        metavar="FILE",
        help="also draw the report figure (.png, .pdf, .svg; needs matplotlib: "
        "pip install 'ccdgrid[plot]')",
    )
    cal.add_argument(
        "--mask", metavar="FILE", help="mask image of the same shape, non-zero = bad pixel"
    )
    cal.add_argument(
        "--frame", type=_count, metavar="N", help="frame of a multi-frame file (0-based)"
    )
    cal.add_argument(
        "--frames",
        type=_frames,
        metavar="SEL",
        help="calibrate these frames of each file as a series: 0:16, 0,3,7, 0:16:2, all",
    )
    series = cal.add_argument_group("series (several images, or --frames)")
    series.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="frames calibrated at once (default: the CPUs available)",
    )
    series.add_argument(
        "--warm",
        action="store_true",
        help="warm-start every frame from the first one that calibrates (faster; a frame "
        "whose plate moved too far is calibrated in full)",
    )
    series.add_argument(
        "--table",
        metavar="FILE",
        help="write the per-frame table to FILE.csv and FILE.json (default: STEM_series.csv "
        "and .json beside the detector files)",
    )
    series.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: on a terminal)"
    )
    series.add_argument(
        "--combine",
        action="store_true",
        help="instead of one calibration per image: calibrate the images (the same plate "
        "shifted between them) jointly into one detector file",
    )
    cal.add_argument(
        "--hole-diameter", type=_positive_float, metavar="PX", help="hole diameter, pixels"
    )
    cal.add_argument(
        "--spacing",
        type=_positive_float,
        metavar="PX",
        help="approximate distance between neighbouring holes in the image, pixels",
    )
    cal.add_argument(
        "--threshold",
        type=_finite_float,
        metavar="T",
        help="hole-detection threshold, log10 of the smallest contrast of a hole over its "
        "surroundings in the smoothed image, in counts: 2 means 100 counts (default: "
        "automatic; `ccdgrid info` shows the value used as resolved.threshold)",
    )
    cal.add_argument(
        "--polarity",
        choices=("auto", "bright", "dark"),
        default="auto",
        help="holes brighter than the plate (a metal plate's holes), darker (absorbing dots "
        "on a transparent sheet), or auto (default): bright, unless the image reads as dark "
        "holes; the detector file records which",
    )
    cal.add_argument(
        "--backend",
        choices=("cython", "numpy"),
        default="cython",
        help="compiled kernels (default) or their pure-numpy twins",
    )
    cal.set_defaults(run=_run_calibrate, parser=cal)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="calibrate a generated FReLoN-like grid image and check it against the truth",
        description="Generate a grid image with a known distortion (no input file needed),\n"
        "calibrate it, write the detector file, and report the error of the recovered\n"
        "distortion against the ground truth.",
        epilog="example:\n  ccdgrid demo --size 1024 --seed 3\n\n" + _EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--size", type=_size, default=(2048, 2048), metavar="N", help="image size (default 2048)"
    )
    demo.add_argument("--seed", type=_count, default=0, help="random seed (default 0)")
    demo.add_argument(
        "-o",
        "--output",
        default="demo_detector.h5",
        metavar="FILE",
        help="detector file to write (default demo_detector.h5)",
    )
    demo.add_argument("--backend", choices=("cython", "numpy"), default="cython")
    demo.set_defaults(run=_run_demo)

    synth = sub.add_parser(
        "synth",
        parents=[common],
        help="write a synthetic grid image and its ground truth",
        description="Write a FReLoN-like grid-of-holes image with a known distortion and,\n"
        "beside it, OUTPUT_STEM_truth.npz: the true corner maps dy, dx (pixels, shape\n"
        "(ny + 1, nx + 1), corner (i, j) at index coordinates (i - 0.5, j - 0.5); true\n"
        "position = position + (dy, dx)) and the true hole positions (y, x).",
        epilog="examples:\n  ccdgrid synth -o grid.edf\n"
        "  ccdgrid synth -o hard.edf --size 4096 --distortion strong --noise heavy "
        "--hot-pixels 200 --dead-rows 3\n\n" + _EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="image file: .edf, .tif/.tiff or .npy",
    )
    synth.add_argument(
        "--size",
        type=_size,
        default=(2048, 2048),
        metavar="N",
        help="N (square) or NYxNX, pixels (default 2048)",
    )
    synth.add_argument("--seed", type=_count, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--distortion",
        choices=("frelon", "strong", "none"),
        default="frelon",
        help="peak distortion: frelon 1.5 px, strong 20 px, none (default frelon)",
    )
    synth.add_argument("--noise", choices=("none", "low", "normal", "heavy"), default="normal")
    synth.add_argument("--hot-pixels", type=_count, default=0, metavar="N")
    synth.add_argument("--dead-rows", type=_count, default=0, metavar="N")
    synth.add_argument("--dead-cols", type=_count, default=0, metavar="N")
    synth.add_argument(
        "--spacing", type=_positive_float, default=98.0, metavar="PX", help="hole pitch, pixels"
    )
    synth.add_argument(
        "--hole-diameter", type=_positive_float, default=10.5, metavar="PX", help="pixels"
    )
    synth.set_defaults(run=_run_synth)

    info = sub.add_parser(
        "info",
        parents=[common],
        help="show what a detector file holds",
        description="Print the shape, pixel size, mask, distortion range and provenance\n"
        "recorded in a detector file (ccdgrid's, or a plain pyFAI one).",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("detector", metavar="DETECTOR", help="detector file (.h5)")
    info.set_defaults(run=_run_info)

    from .correction import add_correct_parser
    from .exchange import add_convert_parser
    from .report import add_report_parser
    from .stack import add_correct_stack_parser
    from .validation import add_validate_parser

    add_validate_parser(sub, parents=[common])
    add_correct_parser(sub, parents=[common])
    add_correct_stack_parser(sub, parents=[common])
    add_report_parser(sub, parents=[common])
    add_convert_parser(sub, parents=[common])
    # the options that take one value, for _glue_negative_values
    parser.value_options = frozenset(
        option
        for command in sub.choices.values()
        for action in command._actions
        if action.nargs is None and action.option_strings
        for option in action.option_strings
    )
    return parser


_NEGATIVE = re.compile(r"-\.?\d")


def _glue_negative_values(argv, value_options):
    """``--pitch -5mm`` -> ``--pitch=-5mm``, for every option that takes one value.

    argparse reads a word that starts with "-" as an option unless it is a
    plain number, so ``--pitch -5mm`` or ``--threshold -1e-2`` stopped at
    "expected one argument"; glued, the value reaches its own check.
    """
    argv = list(argv)
    glued = []
    while argv:
        word = argv.pop(0)
        if word in value_options and argv and _NEGATIVE.match(argv[0]):
            word = f"{word}={argv.pop(0)}"
        glued.append(word)
        if word == "--":
            glued.extend(argv)
            break
    return glued


# -- entry point ---------------------------------------------------------------


def main(argv=None):
    """Run the ``ccdgrid`` command line and return its exit status.

    Parameters
    ----------
    argv : list of str or None
        Arguments without the program name; None reads ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 1 on an input error, 130 when interrupted. Usage
        errors raise ``SystemExit(2)`` from argparse.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(_glue_negative_values(argv, parser.value_options))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with warnings.catch_warnings():
            if not args.debug:
                # numpy's numerical notes (a mean of no pixels, a NaN compared)
                # say nothing to a user; ccdgrid's own warnings still show,
                # as one line each, without the source line that raised them
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.showwarning = _show_warning
            args.run(args)
    except KeyboardInterrupt:
        print("ccdgrid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CcdgridError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"ccdgrid: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# The library's messages name its Python arguments; on the command line they
# are the image, the mask and the options that set them.
_ARGUMENT_WORDS = {
    "`image`": "the image",
    "`mask`": "the mask",
    "`pitch_px`": "--spacing",
    "`hole_diameter`": "--hole-diameter",
    "`threshold`": "--threshold",
    "`pitch`": "--pitch",
    "`previous`": "the --from detector file",
}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the command line: ``ccdgrid: warning: <message>``."""
    print(f"ccdgrid: warning: {_describe(message)}", file=sys.stderr if file is None else file)


def _describe(exc):
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc) or type(exc).__name__
    for word, option in _ARGUMENT_WORDS.items():
        text = text.replace(word, option)
    return text[:1].upper() + text[1:] if text.startswith("the ") else text


# -- subcommands -----------------------------------------------------------------


def _default_output(image):
    path = pathlib.Path(image.split("::", 1)[0])
    return pathlib.Path.cwd() / f"{path.stem}_detector.h5"


def _run_calibrate(args):
    series = len(args.images) > 1 or args.frames is not None
    _check_calibrate_options(args, series)
    if args.combine:
        return _run_combine(args)
    if series:
        return _run_series(args)
    _run_single(args, args.images[0])


_SERIES_ONLY = ("workers", "warm", "table")


def _check_calibrate_options(args, series):
    """Usage errors (exit 2) for options that do not go together."""
    given = [name for name in _SERIES_ONLY if getattr(args, name) not in (None, False)]
    if args.frame is not None and args.frames is not None:
        args.parser.error("give either --frame N or --frames SEL, not both")
    if args.combine:
        clash = [f"--{n}" for n in given] + (["--from"] if args.previous else [])
        clash += ["--report"] if args.report else []
        if clash:
            args.parser.error(f"--combine makes one calibration: {clash[0]} does not apply")
        return
    if not series and given:
        args.parser.error(
            f"--{given[0]} is for a series: give several images or --frames (one image "
            "is calibrated on its own)"
        )
    if series and args.report:
        args.parser.error("--report draws the figure of one calibration: give one image")


_DETECTOR_SUFFIXES = (".h5", ".hdf5", ".nxs")  # pyFAI's detector_factory reads HDF5/NeXus


def _detector_output(text, default, images=()):
    """The detector file that ``-o text`` names, checked before any calibration.

    ``text`` None: ``default``. An existing directory, or a name ending in
    "/" (a directory, created when the file is written): ``default``'s name
    in it. Otherwise a file name with a suffix of :data:`_DETECTOR_SUFFIXES`:
    what is written is HDF5 whatever the name, and ``out.edf`` would pass
    for an image. Its directory must exist, unless "/" asked for it. It may
    not be one of the input ``images`` (``path`` or ``path::dataset``).
    """
    folder = text is not None and text.endswith(("/", os.sep))
    if text is None:
        path = default
    else:
        path = pathlib.Path(text).expanduser().absolute()
        if folder or path.is_dir():
            path = path / default.name
    inputs = {pathlib.Path(image.split("::", 1)[0]).expanduser().absolute() for image in images}
    if path in inputs:
        which = "the input image" if len(inputs) == 1 else "an input image"
        raise CcdgridError(f"the output file {path} would overwrite {which}")
    if path.suffix.lower() not in _DETECTOR_SUFFIXES:
        raise CcdgridError(
            f"-o {text}: a detector file is HDF5, name it .h5 (or .hdf5, .nxs); "
            "for a directory, end the name with /"
        )
    if path.is_dir():
        raise CcdgridError(f"cannot write {path}: it is a directory")
    check_writable(path, create=folder)
    return path


def _check_report(text):
    """Raise, before the calibration, if ``--report text`` could not be drawn."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise CcdgridError("--report needs matplotlib: pip install 'ccdgrid[plot]'") from None
    path = pathlib.Path(text).expanduser().absolute()
    fmt = path.suffix.lstrip(".").lower() or "png"  # as ccdgrid.report writes it
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise CcdgridError(
            f"--report {text}: matplotlib draws no .{fmt} figure; choose .png, .pdf or .svg"
        )
    check_writable(path)


def _run_single(args, source):
    from .io import read_image, read_mask

    output = _detector_output(args.output, _default_output(source), [source])
    if args.report:
        _check_report(args.report)
    image, info = read_image(source, frame=args.frame)
    frame = "" if info["frame"] is None else f" frame {info['frame']}"
    ny, nx = info["shape"]
    print(f"read {info['path']}{frame}: {ny} x {nx} {info['dtype']}")
    mask = None if args.mask is None else read_mask(args.mask, image.shape)

    from .pipeline import calibrate

    start = time.perf_counter()
    with _detection_hint(args, image, mask):
        calibration = calibrate(
            image,
            pitch=args.pitch,
            mask=mask,
            hole_diameter=args.hole_diameter,
            pitch_px=args.spacing,
            threshold=args.threshold,
            backend=args.backend,
            previous=args.previous,
            polarity=args.polarity,
            source=info,  # provenance (file, frame, dataset, sha256) for the detector file
        )
    elapsed = time.perf_counter() - start
    print(calibration.summary())
    _save(calibration, output, elapsed)
    print(f'use it in pyFAI: pyFAI.detector_factory("{output}")')
    if args.report:
        from .report import write_report

        print(f"wrote {write_report(calibration, args.report, image)}")


# what the hole search and the lattice say when they find too few holes
# (not "is constant": no option helps there)
_DETECTION_FAILURES = ("too few holes", "no grid of holes found", "shows no periodic grid")


_DARK_SPOTS = (
    "The image looks like dark spots on a bright background: calibrate it as dark holes, "
    "with --polarity dark (or auto, the default)."
)


class _detection_hint:
    """Context manager: add the ways out to a failed hole search's error.

    The message of the library names no option; on the command line the
    cure is one of --threshold (whose unit, log10 counts, is easy to get
    wrong), --hole-diameter or --spacing. When the user's --threshold was
    the cause, the hole search is run again with the automatic one (on the
    error path only) to say what it would have been.
    """

    def __init__(self, args, image=None, mask=None):
        self.args, self.image, self.mask = args, image, mask

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, CcdgridError):
            return False
        # dark dots on a bright plate searched as bright holes fail anywhere in
        # the search or the lattice ("auto" tried them as dark holes already)
        bright = getattr(self.args, "polarity", "auto") == "bright"
        dark = _DARK_SPOTS if bright and _dark_spots(self.image, self.mask) else ""
        if not any(text in str(exc) for text in _DETECTION_FAILURES):
            if not dark:
                return False
            text = str(exc)
            sep = " " if text.endswith((".", "?")) else ". "
            raise CcdgridError(f"{text}{sep}{dark}") from exc
        hint = self._ways(str(exc))
        raise CcdgridError(f"{exc}. {dark + ' ' if dark else ''}{hint}") from exc

    def _ways(self, message):
        args = self.args
        given = args.threshold
        ways = "--hole-diameter PX and --spacing PX (the holes' size and distance, pixels)"
        if (
            "shows no periodic grid" in message
        ):  # the image's autocorrelation, before any threshold
            return f"If the image does show a grid of holes, give {ways}"
        if given is None:
            return (
                f"Try {ways}, or --threshold T below the automatic one (log10 of the holes' "
                "contrast in counts: 2 means 100 counts)"
            )
        text = (
            f"--threshold {given:g} is log10 of the holes' contrast: {_power_of_ten(given)} counts"
        )
        automatic = self._automatic_threshold()
        if automatic is not None:
            value, holes = automatic
            text += f"; the automatic threshold is {value:.2f} ({holes} holes): leave it out"
        return f"{text}. Or try {ways}"

    def _automatic_threshold(self):
        """``(threshold, holes)`` of the search without the user's threshold, or None."""
        if self.image is None:
            return None
        from .peaks import find_holes

        try:
            search = find_holes(
                self.image,
                mask=self.mask,
                hole_diameter=self.args.hole_diameter,
                pitch_px=self.args.spacing,
                backend=self.args.backend,
            )
        except CcdgridError:
            return None
        return float(search.threshold), len(search.peaks)


def _dark_spots(image, mask=None):
    """Whether ``image`` looks like dark spots on a bright field (an inverted grid image).

    The light through a plate's holes makes a few bright pixels over a
    darker, larger background: its brightest percent stands farther above
    the median than its darkest percent below it (an unlit taper region
    included). Dark dots on a bright plate are the other way round, by far.
    """
    if image is None:
        return False
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    keep = np.isfinite(values)
    if mask is not None and np.shape(mask) == values.shape:
        keep &= np.asarray(mask) == 0
    values = values[keep]
    if values.size < 100:
        return False
    low, mid, high = np.percentile(values[:: max(1, values.size // 1_000_000)], [1, 50, 99])
    return bool(mid > low and mid - low > 3.0 * (high - mid))


def _power_of_ten(exponent):
    """``10**exponent`` as a short text ("100", "1e+30"), also past float's range."""
    if abs(exponent) > 300:
        return f"10^{exponent:g}"
    return f"{10.0**exponent:.3g}"


def _calibrate_options(args):
    """The pipeline options the user set (the others keep the pipeline's defaults)."""
    options = {
        "hole_diameter": args.hole_diameter,
        "pitch_px": args.spacing,
        "threshold": args.threshold,
    }
    options = {key: value for key, value in options.items() if value is not None}
    if args.backend != "cython":
        options["backend"] = args.backend
    if args.polarity != "auto":
        options["polarity"] = args.polarity
    return options


def _run_series(args):
    _one_thread_per_worker()
    from .series import calibrate_series

    frames = args.frames if args.frames is not None else args.frame
    output = args.output if args.output else pathlib.Path.cwd()
    table = args.table
    if table is None:
        text = os.fspath(output)
        folder = pathlib.Path(text).parent if "{" in text else pathlib.Path(text)
        stem = pathlib.Path(args.images[0].split("::", 1)[0]).stem
        table = folder / f"{stem}_series"
    progress = not args.no_progress and sys.stderr.isatty()
    echo = _frame_printer(progress, args.debug)
    result = calibrate_series(
        args.images,
        pitch=args.pitch,
        frames=frames,
        output=output,
        table=table,
        workers=args.workers,
        warm=args.warm or args.previous is not None,
        reference=args.previous,
        mask=args.mask,
        progress=progress,
        on_frame=echo,
        **_calibrate_options(args),
    )
    print(result.summary())
    if result.reference:
        print(f"drift measured against {_reference_line(result)}")
    print("table: " + ", ".join(str(p) for p in result.tables))
    failed = result.failed
    if failed:
        first = failed[0]
        raise CcdgridError(
            f"{len(failed)} of {len(result.frames)} frames failed (first: {first.label}: "
            f"{first.error}); the table lists them all"
        )


def _frame_printer(progress, debug):
    """One line per frame as it completes (above the progress bar when there is one)."""
    if progress:
        from tqdm import tqdm

        def write(text, stream):
            tqdm.write(text, file=stream)
    else:

        def write(text, stream):
            print(text, file=stream, flush=True)

    def echo(row):
        if not row.ok:
            write(f"[{row.index}] {row.label}: FAILED: {row.error}", sys.stderr)
            if debug and row.traceback:
                write(row.traceback.rstrip(), sys.stderr)
            return
        parts = [f"{row.holes_indexed} holes", f"CV RMS {row.cv_rms_px:.4f} px"]
        if row.warm:
            parts.append("warm")
        if math.isfinite(row.drift_shift_y_px):
            parts.append(
                f"drift ({row.drift_shift_y_px:+.3f}, {row.drift_shift_x_px:+.3f}) px, "
                f"{row.drift_rotation_mdeg:+.1f} mdeg"
            )
        line = f"[{row.index}] {row.label}: " + ", ".join(parts)
        write(line + (f" -> {row.output}" if row.output else ""), sys.stdout)
        if row.note:
            write(f"[{row.index}] note: {row.note}", sys.stderr)

    return echo


def _run_combine(args):
    from .io import read_image, read_mask
    from .series_frames import _specs

    single = _default_output(args.images[0])
    default = single.with_name(single.name.replace("_detector.h5", "_combined_detector.h5"))
    output = _detector_output(args.output, default, args.images)
    # the images are read here: the joint fit needs them all at once
    images, sources = [], []
    for spec in _specs(args.images, args.frames if args.frames is not None else args.frame):
        if spec.error:
            raise CcdgridError(spec.error)
        image, info = read_image(spec.file, frame=spec.frame)
        images.append(image)
        sources.append(info)
    if len(images) < 2:
        raise CcdgridError("--combine needs at least two images (or frames) of the plate")
    mask = None if args.mask is None else read_mask(args.mask, images[0].shape)
    print(f"read {len(images)} images of {images[0].shape[0]} x {images[0].shape[1]} px")

    from .combined import calibrate_combined

    start = time.perf_counter()
    with _detection_hint(args):
        calibration = calibrate_combined(
            images, pitch=args.pitch, mask=mask, sources=sources, **_calibrate_options(args)
        )
    elapsed = time.perf_counter() - start
    print(calibration.summary())
    _save(calibration, output, elapsed)
    print(f'use it in pyFAI: pyFAI.detector_factory("{output}")')


def _save(calibration, output, elapsed):
    start = time.perf_counter()
    # a directory asked for with "-o dir/": made only now, when there is a file for it
    pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
    calibration.save(output)
    print(f"calibrated in {elapsed:.2f} s; wrote {output} in {time.perf_counter() - start:.2f} s")


def _run_demo(args):
    output = _detector_output(args.output, pathlib.Path.cwd() / "demo_detector.h5")
    from . import synthetic
    from .pipeline import calibrate

    ny, nx = args.size
    start = time.perf_counter()
    grid = synthetic.grid_image(shape=(ny, nx), seed=args.seed)
    generated = time.perf_counter() - start
    print(
        f"generated a {ny} x {nx} FReLoN-like grid image (seed {args.seed}) in {generated:.2f} s"
    )
    start = time.perf_counter()
    calibration = calibrate(
        grid.image,
        pitch=5e-3,
        backend=args.backend,
        source=f"ccdgrid.synthetic.grid_image(shape=({ny}, {nx}), seed={args.seed})",
    )
    elapsed = time.perf_counter() - start
    print(calibration.summary())
    _save(calibration, output, elapsed)
    # judged where the taper lets light through: outside it there is nothing to calibrate
    res = synthetic.dense_residual(
        grid.truth, calibration.dy, calibration.dx, calibration.mask, region=grid.taper_mask
    )
    print(
        f"accuracy against the ground truth, between the holes ({res.points.shape[0]} random "
        f"points, affine part removed): RMS {res.rms:.4f} px, max {res.max:.4f} px"
    )


def _run_synth(args):
    import numpy as np

    from . import synthetic

    output = pathlib.Path(args.output).expanduser().absolute()
    suffix = output.suffix.lower()
    if suffix not in (".edf", ".tif", ".tiff", ".npy"):
        raise CcdgridError(
            f"cannot write {output.name}: choose a .edf, .tif, .tiff or .npy file name"
        )
    if not output.parent.is_dir():
        raise CcdgridError(f"cannot write {output}: directory {output.parent} does not exist")
    truth_path = output.with_name(f"{output.stem}_truth.npz")
    grid = synthetic.grid_image(
        shape=args.size,
        seed=args.seed,
        distortion=args.distortion,
        noise=args.noise,
        hot_pixels=args.hot_pixels,
        dead_rows=args.dead_rows,
        dead_cols=args.dead_cols,
        pitch_px=args.spacing,
        hole_diameter_px=args.hole_diameter,
    )
    dy, dx = grid.truth.corner_maps(args.size)
    params = {k: v for k, v in vars(args).items() if k not in ("run", "debug", "command")}
    header = {"ccdgrid_synth": " ".join(f"{k}={v}" for k, v in sorted(params.items()))}
    with _atomic(output) as tmp_image, _atomic(truth_path) as tmp_truth:
        _write_image(tmp_image, suffix, grid.image, header)
        with open(tmp_truth, "wb") as stream:
            np.savez(
                stream,
                dy=dy.astype(np.float32),
                dx=dx.astype(np.float32),
                holes=grid.holes,
                indices=grid.indices,
                ideal=grid.ideal,
                visible=grid.visible,
                taper_mask=grid.taper_mask,
                pitch_px=np.float64(grid.pitch_px),
                params=np.str_(json.dumps(getattr(grid, "params", {}), default=_plain)),
                convention=np.str_(
                    "dy, dx: (ny + 1, nx + 1) corner maps in px, corner (i, j) at index "
                    "coordinates (i - 0.5, j - 0.5); true position = position + (dy, dx); "
                    "holes, ideal: (y, x) px, centre of pixel (i, j) at (i, j)"
                ),
            )
    ny, nx = args.size
    print(
        f"wrote {output} ({ny} x {nx} {grid.image.dtype}, {len(grid.holes)} holes) "
        f"and its ground truth {truth_path}"
    )


def _plain(obj):
    """JSON fallback for numpy values (arrays and scalars have ``tolist``)."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


class _atomic:
    """Context manager: yield a temporary path beside ``target``, rename it on success."""

    def __init__(self, target):
        self.target = pathlib.Path(target)
        self.tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}.tmp")

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def _write_image(path, suffix, image, header):
    import numpy as np

    if suffix == ".npy":
        with open(path, "wb") as stream:
            np.save(stream, image)
        return
    import fabio.edfimage
    import fabio.tifimage

    if suffix == ".edf":
        fabio.edfimage.EdfImage(data=image, header=header).write(str(path))
    else:
        fabio.tifimage.TifImage(data=image).write(str(path))


def _flatten(params, prefix=""):
    """``(dotted.key, value)`` pairs of a nested dict, in key order."""
    for key in sorted(params):
        value = params[key]
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _run_info(args):
    import numpy as np

    from .detector_file import load

    rec = load(args.detector)
    ny, nx = rec.shape
    p1, p2 = rec.pixel_size
    masked = int(np.count_nonzero(rec.mask))
    if rec.is_ccdgrid:
        writer = f"ccdgrid {rec.version} on {rec.created}"
    else:
        writer = "not ccdgrid (a plain pyFAI detector file: no grid, holes or parameters)"
    lines = [
        f"file        {rec.path}",
        f"written by  {writer}",
        f"detector    {rec.name!r}: {ny} x {nx} pixels of {p1 * 1e6:.3f} x {p2 * 1e6:.3f} µm "
        f"(pixel1 = y, pixel2 = x)",
        f"mask        {masked} invalid pixels ({100 * masked / (ny * nx):.2f} %)",
    ]
    for label, corner_map in (("dy", rec.dy), ("dx", rec.dx)):
        rms = float(np.sqrt(np.mean(np.square(corner_map, dtype=np.float64))))
        lines.append(
            f"{label}          corner map {corner_map.shape}: min {corner_map.min():+.3f}, "
            f"max {corner_map.max():+.3f}, RMS {rms:.3f} px"
        )
    if rec.pitch is not None:
        lines.append(f"pitch       {rec.pitch * 1e3:g} mm")
    if rec.peaks is not None:
        used = "" if rec.valid is None else f", {int(np.count_nonzero(rec.valid))} in the fit"
        lines.append(f"holes       {len(rec.peaks)} found{used}")
    if rec.source:
        digest = rec.source.get("sha256")
        lines.append(
            f"source      {rec.source.get('path')}" + (f" (sha256 {digest})" if digest else "")
        )
    if rec.params:
        lines.append("parameters")
        lines.extend(f"  {key} = {value}" for key, value in _flatten(rec.params))
    if rec.summary:
        lines.append("summary:")
        lines.extend("  " + line for line in rec.summary.splitlines())
    print("\n".join(lines))


def _reference_line(result):
    """The series' reference as the user sees it: ``frame 0 (scan.h5::/entry/data frame 4)``.

    ``result.reference`` names a frame by its position in the series, which
    is the frame of the stack only for a selection starting at 0.
    """
    text = result.reference
    if text.startswith("frame "):
        index = int(text.split()[1])
        row = next((f for f in result.frames if f.index == index), None)
        if row is not None:
            where = os.path.basename(row.file) + (f"::{row.dataset}" if row.dataset else "")
            if row.frame is not None and row.frame >= 0:
                where += f" frame {row.frame}"
            return f"frame {index} of the series ({where})"
    return text
