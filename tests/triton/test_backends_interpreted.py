"""The conformance suite, tests/test_backends.py, for the Triton backend under the interpreter.

Loaded from its own file, so that its cases are the same ones the GPU runs; with TRITON_INTERPRET
set (this folder's conftest) that file offers the triton backend on CPU tensors alone, and the
backend runs the float32 cases (its other dtypes skip with its reason). The CPU-only Winograd
shapes are not offered to it.
"""

import importlib.util
import pathlib
import sys

_path = pathlib.Path(__file__).resolve().parents[1] / "test_backends.py"
_spec = importlib.util.spec_from_file_location("test_backends_shared", _path)
_suite = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _suite
_spec.loader.exec_module(_suite)

test_backend_matches_reference = _suite.test_backend_matches_reference
