"""Per-sample ``lengths`` masked inside every Triton layer op's loop (ops/registration.py's
``lengths``; triton_kernels/_common.StepMask), under TRITON_INTERPRET=1 (CPU).

Each op (convlstm, a, b, c, d) called directly with lengths that include 0 and T, in both walks
and with both gate activations: output, h_n, c_n and the gradients of x, h0, c0 and every
parameter equal the reference's ``cells.layer(..., reverse=, lengths=)`` in fp32; grad_output at
the steps that do not count is ignored (NaN there changes nothing); the launches of an op without
lengths are those of test_launch_counts.py and its results bitwise the same as with
``lengths=None`` spelled out (the mask adds nothing). Tolerances: rtol 1e-4, atol 1e-5 (fp32 with
tl.dot in "ieee"), as test_triton_layers.py.
"""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import get_cell
from convlstm_fast.ops.registration import gate_activation_code
from convlstm_fast.reference import cells
from convlstm_fast.triton_kernels import IMPLEMENTED, OP_MODULES

from helpers import make_inputs

pytestmark = pytest.mark.triton_interpret

RTOL, ATOL = 1e-4, 1e-5

# (T, B, Cin, C, H, W, K) and lengths with a full sample, one of a single step, an empty one and
# one of T − 2 steps (every kind of walk: masked suffix, masked prefix in reverse, all masked).
SHAPE = (4, 4, 3, 4, 5, 6, 3)
LENGTHS = [4, 1, 0, 2]


def _op(variant):
    return getattr(torch.ops.convlstm_fast, get_cell(variant).op + "_triton")


def _leaves(variant, seed=0):
    x, h0, c0, params = make_inputs(variant, *SHAPE, seed=seed)
    leaves = {"x": x, "h0": h0, "c0": c0, **params}
    return {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}


def _run(variant, leaves, gate_activation, reverse, lengths, backend, weights):
    params = {k: v for k, v in leaves.items() if k not in ("x", "h0", "c0")}
    if backend == "reference":
        out, h_n, c_n = cells.layer(variant, leaves["x"], leaves["h0"], leaves["c0"], params,
                                    gate_activation, reverse=reverse, lengths=lengths)
    else:
        args = (leaves["x"], leaves["h0"], leaves["c0"], list(params.values()),
                gate_activation_code(gate_activation), reverse)
        if lengths is not None:
            args += (lengths,)
        out, h_n, c_n, _ = _op(variant)(*args)
    loss = sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"output": out, "h_n": h_n, "c_n": c_n}
    result.update({"grad_" + k: g for k, g in zip(leaves, grads)})
    return {k: v.detach() for k, v in result.items()}


def _weights(leaves, seed=1):
    """Random loss weights of output, h_n and c_n (their shapes from x and h0)."""
    gen = torch.Generator().manual_seed(seed)
    steps = leaves["x"].shape[0]
    shapes = [(steps, *leaves["h0"].shape), leaves["h0"].shape, leaves["c0"].shape]
    return [torch.randn(shape, generator=gen) for shape in shapes]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("gate_activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_lengths_match_the_reference(variant, gate_activation, reverse):
    leaves = _leaves(variant)
    lengths = torch.tensor(LENGTHS)
    weights = _weights(leaves)
    got = _run(variant, leaves, gate_activation, reverse, lengths, "triton", weights)
    want = _run(variant, leaves, gate_activation, reverse, lengths, "reference", weights)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # The steps that do not count write zeros (exactly), the empty sample keeps h0 and c0.
    invalid = torch.arange(SHAPE[0])[:, None] >= lengths[None, :]
    assert torch.equal(got["output"][invalid], torch.zeros_like(got["output"][invalid]))
    assert torch.equal(got["h_n"][2], leaves["h0"][2].detach())
    assert torch.equal(got["c_n"][2], leaves["c0"][2].detach())


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_grad_output_at_steps_that_do_not_count_is_ignored(variant, reverse):
    """NaN in grad_output wherever a step does not count: every gradient is what zeros there
    give (bitwise), and finite."""
    leaves = _leaves(variant)
    lengths = torch.tensor(LENGTHS)
    weights = _weights(leaves)
    invalid = (torch.arange(SHAPE[0])[:, None] >= lengths[None, :])
    zeroed, poisoned = list(weights), list(weights)
    zeroed[0] = weights[0].masked_fill(invalid[:, :, None, None, None], 0.0)
    poisoned[0] = weights[0].masked_fill(invalid[:, :, None, None, None], float("nan"))
    clean = _run(variant, leaves, "sigmoid", reverse, lengths, "triton", zeroed)
    dirty = _run(variant, leaves, "sigmoid", reverse, lengths, "triton", poisoned)
    for name in clean:
        if name.startswith("grad_"):
            assert torch.isfinite(dirty[name]).all(), name
            assert torch.equal(dirty[name], clean[name]), name


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_full_lengths_match_no_lengths(variant, reverse):
    """lengths = T everywhere masks nothing: the results equal those without lengths (the where
    copies are exact; only the backward's order of additions may differ at the ulp level)."""
    leaves = _leaves(variant)
    weights = _weights(leaves)
    full = torch.full((SHAPE[1],), SHAPE[0], dtype=torch.int64)
    masked = _run(variant, leaves, "sigmoid", reverse, full, "triton", weights)
    plain = _run(variant, leaves, "sigmoid", reverse, None, "triton", weights)
    for name in plain:
        if name in ("output", "h_n", "c_n"):
            assert torch.equal(masked[name], plain[name]), name
        else:
            torch.testing.assert_close(masked[name], plain[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("op", sorted(OP_MODULES))
def test_lengths_none_is_the_unmasked_op(op):
    """The launchers with ``lengths=None`` spelled out run exactly what they run without it."""
    variant = {get_cell(name).op: name for name in IMPLEMENTED}[op]
    x, h0, c0, params = make_inputs(variant, 3, 2, 3, 4, 5, 6, 3)
    params = list(params.values())
    module = OP_MODULES[op]
    forward, backward = getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward")
    for reverse in (False, True):
        first = forward(x, h0, c0, params, 0, reverse)
        second = forward(x, h0, c0, params, 0, reverse, None)
        for a, b in zip(first[:3], second[:3]):
            assert torch.equal(a, b)
        grads = [torch.randn_like(t) for t in first[:3]]
        g1 = backward(*grads, x, h0, c0, params, first[0], first[3], 0, reverse)
        g2 = backward(*grads, x, h0, c0, params, first[0], first[3], 0, reverse, None)
        for a, b in zip([*g1[:3], *g1[3]], [*g2[:3], *g2[3]]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_opcheck_with_lengths(variant):
    """Both ops with lengths (reverse walk, one sample masked for a step): schema, fake tensors,
    autograd registration (the forward op), results against the fakes (the backward op)."""
    x, h0, c0, params = make_inputs(variant, 2, 2, 2, 3, 3, 4, 3)
    params = [p.requires_grad_() for p in params.values()]
    lengths = torch.tensor([2, 1])
    op = _op(variant)
    torch.library.opcheck(op, (x, h0, c0, params, 0, True, lengths))
    backward = getattr(torch.ops.convlstm_fast, get_cell(variant).op + "_triton_backward")
    output, h_n, c_n, saved = op(x, h0, c0, params, 0, True, lengths)
    grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
    torch.library.opcheck(backward, (*grads, x, h0, c0, [p.detach() for p in params],
                                     output.detach(), [s.detach() for s in saved], 0, True,
                                     lengths),
                          test_utils=("test_schema", "test_faketensor"))
