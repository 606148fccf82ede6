"""HDF5 outputs on a disk that cannot take them: one line, no crash, nothing left.

The disk is "full" through RLIMIT_FSIZE in a child process: every write past
the limit fails with EFBIG inside HDF5, as ENOSPC does on a full disk, and
HDF5 takes the same failure path (a full tmpfs crashed ccdgrid with a
segmentation fault after printing its error).
"""

import signal
import subprocess
import sys

import fabio
import h5py
import numpy as np
import pytest

from ccdgrid.detector_file import save_detector
from ccdgrid.pipeline import calibrate
from ccdgrid.synthetic import grid_image

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)"
)

CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from ccdgrid.cli import main
sys.exit(main({argv!r}))
"""


def _run_limited(argv, limit):
    code = CHILD.format(limit=limit, argv=[str(a) for a in argv])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plate")
    image = folder / "grid.edf"
    g = grid_image((384, 384), pitch_px=40.0, hole_diameter_px=8.0, seed=3)
    fabio.edfimage.EdfImage(data=g.image.astype(np.float32)).write(str(image))
    detector = save_detector(folder / "det.h5", calibrate(g.image, pitch=5e-3, cv_folds=0))
    return image, detector


def test_a_detector_file_the_disk_cannot_take_is_one_error_line(plate, tmp_path):
    image, _ = plate
    out = tmp_path / "det.h5"
    result = _run_limited(["calibrate", image, "--pitch", "5mm", "-o", out], 200_000)
    assert result.returncode == 1, result.stderr  # not -11 (a segmentation fault)
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"ccdgrid: error: {out}: the detector file would exceed the largest file size allowed here"
    )
    assert list(tmp_path.iterdir()) == []  # no temporary or partial file


def test_a_corrected_stack_the_disk_cannot_take_is_one_error_line(plate, tmp_path):
    _, detector = plate
    source = tmp_path / "stack.h5"
    rng = np.random.default_rng(1)
    with h5py.File(source, "w") as f:
        f["data"] = rng.integers(0, 1000, (6, 384, 384), dtype=np.uint16)
    limit = source.stat().st_size + 100_000  # the source itself was written before
    out = tmp_path / "out.h5"
    result = _run_limited(
        ["correct-stack", f"{source}::/data", "-d", detector, "-o", f"{out}::/data"], limit
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"ccdgrid: error: {out}: the corrected stack would exceed the largest file size "
        "allowed here"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.h5"]
