"""The conformance suite, tests/test_backends.py, for the Triton backend under the interpreter.

Loaded from its own file, so that its cases are the same ones the GPU runs; with TRITON_INTERPRET
set (this folder's conftest) that file offers the triton backend on CPU tensors alone, and the
backend runs the float32 cases (its other dtypes skip with its reason). The CPU-only Winograd
shapes are not offered to it.
"""

from helpers import main_suite_module

test_backend_matches_reference = main_suite_module("test_backends.py").test_backend_matches_reference
