"""The installed package: compiled extension, mapped Triton subpackage, info (the native op
schemas: tests/test_native_layout.py)."""

import importlib

import pytest
import torch

import convlstm_fast
from convlstm_fast import VARIANTS, _extension


def test_triton_kernels_is_a_subpackage():
    # triton_kernels/ is installed as convlstm_fast.triton_kernels (never a top-level package that
    # could clash with Triton's own); a shadowing source tree on sys.path would lack it.
    spec = importlib.util.find_spec("convlstm_fast.triton_kernels")
    assert spec is not None


def test_triton_backend_loads_where_triton_is_new_enough():
    """Where triton >= MIN_TRITON is installed the Triton backend must load: every other Triton
    test of this suite skips on a machine without CUDA, so a broken import (a module missing from
    the installed package) would otherwise pass unseen here."""
    from convlstm_fast.backends import get_backend
    from convlstm_fast.backends.triton import MIN_TRITON, _release

    triton = pytest.importorskip("triton")
    if _release(triton.__version__) < MIN_TRITON:
        pytest.skip(f"triton {triton.__version__} is below the backend's floor")
    assert get_backend("triton").unavailable_reason() is None
    kernels = importlib.import_module("convlstm_fast.triton_kernels")
    assert set(kernels.IMPLEMENTED) == {v for v in VARIANTS
                                        if "triton" in convlstm_fast.get_cell(v).kernels}


def test_compiled_extension_loads_when_built():
    if not _extension.extension_built():
        pytest.skip("this installation has no compiled convlstm_fast._C (pure-Python install)")
    module = convlstm_fast.load_extension()
    assert module.__name__ == "convlstm_fast._C"


def test_info_lists_every_backend_and_variant():
    from convlstm_fast import info

    text = info.report()
    for name in ("reference", "triton", "cuda", "cpu"):
        assert name in text
    rows = info.backend_report(torch.device("cpu"))
    assert {(b, v) for b, v, _ in rows} == {
        (b, v) for b in ("reference", "triton", "cuda", "cpu") for v in VARIANTS
    }
    assert all(status == "usable" for b, _, status in rows if b == "reference")
    # CUDA kernels can never run on CPU tensors: the reason must say so.
    assert all("cuda" in status for b, _, status in rows if b == "cuda")
