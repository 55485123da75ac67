"""Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before anything imports triton, so this conftest sets it at import
and these tests run in their own pytest process: ``pytest tests/triton -q`` (this folder's
pytest.ini makes it the rootdir, so tests/conftest.py, which imports triton, is not loaded).
"""

import os
import sys

import pytest

_TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"
# helpers.py sits beside the tests (pytest's importlib mode does not put this folder on sys.path).
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if not _TOO_LATE:
        return
    skip = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1 could be set; "
                                   "run this folder in its own process: pytest tests/triton")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(skip)
