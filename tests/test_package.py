"""The installed package: compiled extension, mapped Triton subpackage, op schemas, info."""

import importlib

import pytest
import torch

import convlstm_fast
from convlstm_fast import VARIANTS, _extension, get_cell
from convlstm_fast.ops import registration


def test_triton_kernels_is_a_subpackage():
    # triton_kernels/ is installed as convlstm_fast.triton_kernels (never a top-level package that
    # could clash with Triton's own); a shadowing source tree on sys.path would lack it.
    spec = importlib.util.find_spec("convlstm_fast.triton_kernels")
    assert spec is not None


def test_compiled_extension_loads_when_built():
    if not _extension.extension_built():
        pytest.skip("this installation has no compiled convlstm_fast._C (pure-Python install)")
    module = convlstm_fast.load_extension()
    assert module.__name__ == "convlstm_fast._C"


def test_native_schemas_match_the_python_contract():
    if not _extension.extension_built():
        pytest.skip("this installation has no compiled convlstm_fast._C")
    convlstm_fast.load_extension()
    for name in (get_cell(v).op for v in VARIANTS):
        forward = getattr(torch.ops.convlstm_fast, name).default._schema
        backward = getattr(torch.ops.convlstm_fast, name + "_backward").default._schema
        assert str(forward) == f"convlstm_fast::{name}{registration.LAYER_SCHEMA}"
        assert str(backward) == f"convlstm_fast::{name}_backward{registration.BACKWARD_SCHEMA}"
        inference = getattr(torch.ops.convlstm_fast, name + "_inference").default._schema
        assert str(inference) == f"convlstm_fast::{name}_inference{registration.INFERENCE_SCHEMA}"


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
