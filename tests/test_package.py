"""The installed package: version, build facts, lazy public names."""

import importlib.metadata

import pytest

import ccdgrid


def test_version_matches_installed_metadata():
    assert ccdgrid.__version__ == importlib.metadata.version("ccdgrid")


def test_openmp_flag_is_a_bool():
    assert isinstance(ccdgrid.openmp_enabled(), bool)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = ccdgrid.nonexistent
