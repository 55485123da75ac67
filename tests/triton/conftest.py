"""Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before anything imports triton, so this conftest sets it at import
and these tests run in their own pytest process: ``pytest tests/triton -q`` (this folder's
pytest.ini makes it the rootdir, so tests/conftest.py — whose hooks are the main suite's — is not
loaded as a conftest). Its fixtures (random problems, STYLE.md's distance rule) are shared: they
are imported from it below, after TRITON_INTERPRET is set (it imports no triton itself).
"""

import importlib.util
import os
import pathlib
import sys

import pytest

_TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"
# helpers.py sits beside the tests (pytest's importlib mode does not put this folder on sys.path).
sys.path.insert(0, os.path.dirname(__file__))

_spec = importlib.util.spec_from_file_location(
    "convlstm_fast_tests_conftest", pathlib.Path(__file__).resolve().parents[1] / "conftest.py")
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)
assert_close_to_float64 = _shared.assert_close_to_float64
find_separated_problem = _shared.find_separated_problem
make_inputs = _shared.make_inputs
make_params = _shared.make_params


def pytest_collection_modifyitems(config, items):
    if not _TOO_LATE:
        return
    skip = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1 could be set; "
                                   "run this folder in its own process: pytest tests/triton")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(skip)
