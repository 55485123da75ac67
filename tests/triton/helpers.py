"""Shared by the Triton interpreter tests: random cells and the comparison with the reference in the
same dtype (STYLE.md's distance rule is tests/conftest.py's ``assert_close_to_float64`` fixture,
which this folder's conftest shares)."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import torch

from convlstm_fast import get_cell
from convlstm_fast.functional import convlstm_layer
from convlstm_fast.reference import cells


def main_suite_module(filename: str):
    """Load tests/<filename> (a main-suite file whose cases follow TRITON_INTERPRET) as a module,
    so that a file here can run its tests under the interpreter."""
    path = pathlib.Path(__file__).resolve().parents[1] / filename
    spec = importlib.util.spec_from_file_location(path.stem + "_shared", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_inputs(variant, steps, batch, in_channels, hidden, height, width, kernel_size,
                device="cpu", dtype=torch.float32, seed=0):
    """Random x [T, B, Cin, H, W], h0, c0 and params: weights N(0, 1/fan_in) (fan_in = all dims
    but the first), biases N(0, 0.25), so that pre-activations stay O(1) at any size."""
    gen = torch.Generator().manual_seed(seed)
    spec = get_cell(variant)
    shapes = spec.parameter_shapes(in_channels, hidden, kernel_size)
    biases = {p.name for p in spec.parameters if p.is_bias}

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    params = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:])
        params[name] = rand(*shape, scale=0.5 if name in biases else fan_in ** -0.5)
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
