"""The installed package: version, build facts, lazy public names."""

import importlib.metadata
import subprocess
import sys

import pytest

import ccdgrid


def test_version_matches_installed_metadata():
    assert ccdgrid.__version__ == importlib.metadata.version("ccdgrid")


def test_openmp_flag_is_a_bool():
    assert isinstance(ccdgrid.openmp_enabled(), bool)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = ccdgrid.nonexistent


def test_public_functions_stay_callable_after_their_modules_are_imported():
    # No public function shares its name with a submodule: importing the
    # submodule first must not shadow the function (a fresh interpreter, as
    # this test session has imported everything already).
    code = (
        "import ccdgrid.pipeline, ccdgrid.hole_error, ccdgrid.correction, ccdgrid;"
        "assert callable(ccdgrid.calibrate) and callable(ccdgrid.grid_error)"
        " and callable(ccdgrid.correct)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-300:]


def test_every_public_name_resolves():
    for name in ccdgrid.__all__:
        assert getattr(ccdgrid, name) is not None, name
