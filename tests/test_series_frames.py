"""Frame selections of a series (``ccdgrid.series_frames``): ``"0:16"``, ``"0,3,7"``, ``"all"``."""

import re

import pytest

from ccdgrid.errors import CcdgridError
from ccdgrid.series_frames import expand_frames, parse_frames


@pytest.mark.parametrize(
    ("text", "frames"),
    [
        ("0:4", [0, 1, 2, 3]),
        ("0,3,7", [0, 3, 7]),
        ("0:8:3", [0, 3, 6]),
        ("7:", [7, 8, 9]),
        ("-2:", [8, 9]),
        ("-1", [9]),
        ("all", list(range(10))),
        (":", list(range(10))),
        ("0:2, 5", [0, 1, 5]),
        ("8:20", [8, 9]),  # a slice is clipped to the stack, as Python's are
        ("12", [12]),  # an explicit number is kept: reading it names the stack size
    ],
)
def test_frame_selection(text, frames):
    assert expand_frames(text, 10) == frames


@pytest.mark.parametrize("text", ["", "a", "1:2:3:4", "0:8:0", "1.5", "0;3"])
def test_a_bad_frame_selection_is_refused(text):
    with pytest.raises(CcdgridError, match=r"frame selection|`frames` must be"):
        parse_frames(text)


def test_frame_selection_from_python_objects():
    assert expand_frames(None, 3) == [0, 1, 2]
    assert expand_frames(slice(1, None), 3) == [1, 2]
    assert expand_frames([2, slice(0, 1)], 3) == [2, 0]


def test_a_colour_image_is_not_a_series_of_frames(tmp_path):
    # an (h, w, 3) array was 64 frames 80 px by 3, each failing "too small"
    import h5py
    import numpy as np

    from ccdgrid.series_frames import _specs

    rgb = np.zeros((64, 80, 3), dtype=np.uint8)
    np.save(tmp_path / "photo.npy", rgb)
    with h5py.File(tmp_path / "photo.h5", "w") as h5:
        h5["entry/data"] = rgb
    message = r"colour image \(64 x 80 pixels, 3 channels\)"
    with pytest.raises(CcdgridError, match=message):
        _specs(rgb, None)
    # a file is one failed frame of the series, with the reason
    for source in (tmp_path / "photo.npy", f"{tmp_path / 'photo.h5'}::/entry/data"):
        (spec,) = _specs(source, None)
        assert spec.error is not None
        assert re.search(message, spec.error)
