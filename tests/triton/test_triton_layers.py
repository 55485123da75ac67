"""What is particular to the Triton ops under TRITON_INTERPRET=1 (CPU): their kinks, opcheck of
both ops, torch.compile(fullgraph=True), deterministic mode, and what the backend reports.

Their outputs and gradients against the reference on every shape are the conformance suite's
cases (tests/test_backends.py, run here by test_backends_interpreted.py). Run alone:
``pytest tests/triton -q`` (its conftest sets TRITON_INTERPRET=1 before triton is imported).
Tolerances: rtol 1e-4, atol 1e-5 (fp32 with tl.dot in "ieee").
"""

from __future__ import annotations

import pytest
import torch

import convlstm_fast
from convlstm_fast import VARIANTS, get_cell
from convlstm_fast.backends import get_backend
from convlstm_fast.triton_kernels import IMPLEMENTED, INTERPRETED

from helpers import assert_close_to_reference, make_inputs, run_with_grads

pytestmark = pytest.mark.triton_interpret

RTOL, ATOL = 1e-4, 1e-5

# (T, B, Cin, C, H, W, K): a map spanning two pixel tiles of the interpreter's blocks (256).
TWO_PIXEL_TILES = (2, 1, 2, 3, 17, 16, 3)


def test_interpreter_is_on():
    assert INTERPRETED, "tests/triton/conftest.py must set TRITON_INTERPRET=1 before triton loads"


@pytest.mark.parametrize("variant", VARIANTS)
def test_backend_reports_support(variant):
    x = torch.zeros(1, 1, 2, 3, 3)
    reason = get_backend("triton").unsupported_reason(variant, x)
    if variant in IMPLEMENTED:
        assert reason is None
    else:
        assert reason == f"variant {variant!r} has no triton kernel"


@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_hard_sigmoid_kinks(variant):
    """Gate pre-activations exactly at ±2.5 (hard_sigmoid's kinks) through whole layers: the
    derivative is 0.2 there (the reference's pieces are chosen on x). Zero weights and inputs,
    bias ±2.5. The interpreter never contracts 0.2·x + 0.5 into an FMA, so this alone cannot
    see the compiled kernels' kinks: test_triton_numerics.py checks their PTX."""
    x, h0, c0, params = make_inputs(variant, 1, 1, 2, 3, 3, 4, 3)
    params = {k: torch.zeros_like(v) for k, v in params.items()}
    bias = params[get_cell(variant).gates.bias]
    bias[: bias.numel() // 2] = 2.5
    bias[bias.numel() // 2:] = -2.5
    inputs = (torch.zeros_like(x), torch.zeros_like(h0), c0, params)
    assert_close_to_reference(variant, inputs, "hard_sigmoid", "triton", RTOL, ATOL)


@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_opcheck(variant):
    x, h0, c0, params = make_inputs(variant, 2, 1, 2, 3, 3, 4, 3)
    op = getattr(torch.ops.convlstm_fast, get_cell(variant).op + "_triton")
    args = (x, h0, c0, [p.requires_grad_() for p in params.values()], 0)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_opcheck_backward(variant):
    """The backward op too: its results must match its fake (shapes and strides)."""
    x, h0, c0, params = make_inputs(variant, 2, 1, 2, 3, 3, 4, 3)
    name = get_cell(variant).op + "_triton"
    forward = getattr(torch.ops.convlstm_fast, name)
    backward = getattr(torch.ops.convlstm_fast, name + "_backward")
    params = list(params.values())
    output, h_n, c_n, saved = forward(x, h0, c0, params, 1)
    grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
    torch.library.opcheck(backward, (*grads, x, h0, c0, params, output, saved, 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_compile_fullgraph(variant):
    torch._dynamo.reset()
    model = convlstm_fast.ConvLSTM(2, 3, kernel_size=3, variant=variant, backend="triton")
    x = torch.randn(1, 2, 2, 4, 3)
    eager, (h_eager, c_eager) = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out, (h_n, c_n) = compiled(x)
    torch.testing.assert_close(out, eager, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h_n, h_eager, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(c_n, c_eager, rtol=RTOL, atol=ATOL)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    eager_grads = torch.autograd.grad(eager.sum(), list(model.parameters()))
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


# d shares every kernel with c.
@pytest.mark.parametrize("variant", [v for v in IMPLEMENTED if v != "d"])
def test_deterministic_bitwise(variant, deterministic):
    inputs = make_inputs(variant, *TWO_PIXEL_TILES)
    first = run_with_grads(variant, *inputs, "sigmoid", "triton")
    second = run_with_grads(variant, *inputs, "sigmoid", "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name
