"""What is particular to the Triton ops on a CUDA device: deterministic mode (bitwise equal
twice), autocast, and a layer on a second GPU.

Their outputs and gradients against the reference in fp32 (TF32 off), fp16 and bf16 on several
channel and pixel tiles are cases of the conformance suite, tests/test_backends.py.
Skipped with a reason without CUDA (tests/conftest.py); nothing queries a device at import.
"""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import VARIANTS
from convlstm_fast.functional import convlstm_layer
from convlstm_fast.reference import cells

pytestmark = pytest.mark.gpu



def _implemented():
    # Imported lazily: importing the kernels at collection would import triton, not a device query,
    # but keeps collection cheap.
    from convlstm_fast.triton_kernels import IMPLEMENTED

    return IMPLEMENTED


def _run(variant, x, h0, c0, params, gate_activation, backend, weights):
    leaves = [t.detach().clone().requires_grad_() for t in (x, h0, c0, *params.values())]
    lx, lh, lc, *lp = leaves
    named = dict(zip(params, lp))
    if backend == "reference":
        out, h_n, c_n = cells.layer(variant, lx, lh, lc, named, gate_activation)
    else:
        out, (h_n, c_n) = convlstm_layer(lx, named, variant, (lh, lc),
                                         gate_activation=gate_activation, backend=backend)
    loss = sum((t.double() * w).sum() for t, w in zip((out, h_n, c_n), weights))
    grads = torch.autograd.grad(loss, leaves)
    return [out.detach(), h_n.detach(), c_n.detach(), *grads]


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_deterministic_on_gpu(variant, make_params, make_inputs):
    """Under torch.use_deterministic_algorithms(True) two runs agree bitwise."""
    if variant not in _implemented():
        pytest.skip(f"backend 'triton' is not implemented for variant {variant!r}")
    params = make_params(variant, 24, 72, 3, dtype=torch.bfloat16, device="cuda")
    x, h0, c0 = make_inputs(3, 2, 24, 72, 9, 10, dtype=torch.bfloat16, device="cuda")
    weights = [torch.ones((), device="cuda", dtype=torch.float64)] * 3
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _run(variant, x, h0, c0, params, "sigmoid", "triton", weights)
        second = _run(variant, x, h0, c0, params, "sigmoid", "triton", weights)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_under_autocast(variant, make_params, make_inputs):
    """Under torch.autocast(bf16) the functional layer casts and the op runs in bf16."""
    if variant not in _implemented():
        pytest.skip(f"backend 'triton' is not implemented for variant {variant!r}")
    params = make_params(variant, 8, 16, 3, dtype=torch.float32, device="cuda")
    x, h0, c0 = make_inputs(2, 2, 8, 16, 6, 7, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, (h_n, c_n) = convlstm_layer(x, params, variant, (h0, c0), backend="triton")
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    ref, _, _ = cells.layer(variant, x, h0, c0, params)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_on_a_second_gpu(variant, fp32_ieee, make_params, make_inputs):
    """A layer whose tensors live on cuda:1 while cuda:0 is the current device: the launches
    must go to cuda:1 (the ops run their kernels under torch.cuda.device(x.device)), and the
    results match the reference there, forward and backward."""
    if variant not in _implemented():
        pytest.skip(f"backend 'triton' is not implemented for variant {variant!r}")
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    device = torch.device("cuda", 1)
    params = make_params(variant, 8, 16, 3, dtype=torch.float32, device=device)
    x, h0, c0 = make_inputs(2, 2, 8, 16, 6, 7, dtype=torch.float32, device=device)
    weights = [torch.ones((), device=device, dtype=torch.float64)] * 3
    with torch.cuda.device(0):
        got = _run(variant, x, h0, c0, params, "sigmoid", "triton", weights)
        want = _run(variant, x, h0, c0, params, "sigmoid", "reference", weights)
    for a, b in zip(got, want):
        assert a.device == device
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # fp32, TF32 off
