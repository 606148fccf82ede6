"""Shared set-up of the test suite.

``tests`` is not a package (pytest runs with ``--import-mode=importlib``), so
the helper modules ``_independent_grid.py``, ``_probe_grid.py`` and
``_fine_field.py`` beside the tests are registered here, before any test
module is collected, for them to ``import``.
"""

import importlib.util
import sys
from pathlib import Path


def _register(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)


_register("_independent_grid")
_register("_probe_grid")
_register("_fine_field")
