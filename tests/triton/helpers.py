"""Shared by the Triton tests (CPU interpreter and GPU): random cells, reference comparison, and
STYLE.md's distance rule for low precision."""

from __future__ import annotations

import math

import torch

from convlstm_fast import variants
from convlstm_fast.functional import convlstm_layer
from convlstm_fast.reference import cells


def make_inputs(variant, steps, batch, in_channels, hidden, height, width, kernel_size,
                device="cpu", dtype=torch.float32, seed=0):
    """Random x [T, B, Cin, H, W], h0, c0 and params: weights N(0, 1/fan_in) (fan_in = all dims
    but the first), biases N(0, 0.25), so that pre-activations stay O(1) at any size."""
    gen = torch.Generator().manual_seed(seed)
    shapes = variants.parameter_shapes(variant, in_channels, hidden, kernel_size)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    params = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:])
        params[name] = rand(*shape, scale=0.5 if variants.is_bias(name) else fan_in ** -0.5)
    x = rand(steps, batch, in_channels, height, width)
    h0 = rand(batch, hidden, height, width, scale=0.5)
    c0 = rand(batch, hidden, height, width, scale=0.5)
    return x, h0, c0, params


def run_with_grads(variant, x, h0, c0, params, gate_activation, backend, grads_seed=1):
    """Forward and backward of one layer; returns the dict of every output and gradient."""
    leaves = {"x": x, "h0": h0, "c0": c0, **params}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    lp = {k: leaves[k] for k in params}
    if backend == "reference":
        out, h_n, c_n = cells.layer(variant, leaves["x"], leaves["h0"], leaves["c0"], lp,
                                    gate_activation)
    else:
        out, (h_n, c_n) = convlstm_layer(leaves["x"], lp, variant, (leaves["h0"], leaves["c0"]),
                                         gate_activation=gate_activation, backend=backend)
    gen = torch.Generator().manual_seed(grads_seed)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
               for t in (out, h_n, c_n)]
    loss = sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"output": out, "h_n": h_n, "c_n": c_n}
    result.update({"grad_" + k: g for k, g in zip(leaves, grads)})
    return {k: v.detach() for k, v in result.items()}


def assert_close_to_reference(variant, inputs, gate_activation, backend, rtol, atol):
    """Every output and gradient of ``backend`` matches the reference in the same dtype."""
    got = run_with_grads(variant, *inputs, gate_activation, backend)
    want = run_with_grads(variant, *inputs, gate_activation, "reference")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_distance_rule(got, ref, exact, eps):
    """STYLE.md: for every name in ``exact`` (float64 reference results), ``max|got − exact| <=
    2·max|ref − exact| + eps·max|exact|``, ``ref`` being the reference in got's dtype."""
    for name, x64 in exact.items():
        err = (got[name].double() - x64).abs().max().item()
        ref_err = (ref[name].double() - x64).abs().max().item()
        bound = 2 * ref_err + eps * x64.abs().max().item()
        assert err <= bound, (f"{name}: max error {err:.3g} > 2·{ref_err:.3g} + "
                              f"{eps}·{x64.abs().max().item():.3g} = {bound:.3g}")


def assert_low_precision_rule(variant, inputs, gate_activation, backend, eps=1e-3):
    """STYLE.md: for every output and gradient x, max|x − x64| <= 2·max|x_ref − x64| + eps·max|x64|
    with x64 the reference in float64 and x_ref the reference in the inputs' (low) dtype."""
    x, h0, c0, params = inputs
    to64 = lambda t: t.double()
    inputs64 = (to64(x), to64(h0), to64(c0), {k: to64(v) for k, v in params.items()})
    got = run_with_grads(variant, *inputs, gate_activation, backend)
    ref = run_with_grads(variant, *inputs, gate_activation, "reference")
    exact = run_with_grads(variant, *inputs64, gate_activation, "reference")
    assert_distance_rule(got, ref, exact, eps)
