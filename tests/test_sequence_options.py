"""Bidirectional layers, ragged batches (``lengths``) and their combination with ``recompute``,
on every backend, against plain compositions of unidirectional full-length runs.

- bidirectional = a forward layer + a layer on the time-flipped sequence (flipped back), the two
  outputs concatenated along channels, states in nn.LSTM's order; two stacked layers, so the
  second takes 2·C channels;
- lengths = each sample run alone on its own prefix (its reverse direction then starts at its
  last valid step by construction): outputs at t < length equal, zero after, ``h_n``/``c_n``
  equal, and the gradients of x, the initial state and every parameter equal the sums over the
  per-sample runs (one loss with random weights on output, h_n and c_n);
- float64 ``gradcheck`` of ``convlstm_layer(reverse=True, lengths=...)`` on the reference and
  the cpu backend; ``torch.compile(fullgraph=True)`` with the new arguments; bad arguments.

The compositions run on the reference backend (the oracle); the backend under test runs the
module. float64 on the CPU backends: atol 1e-10 (the same sums in a different order);
float32 on the GPU backends and Triton's interpreter: atol 2e-4, rtol 1e-3 (5 steps of fp32
accumulation, two layers). Under the interpreter (tests/triton runs the two comparisons of this
file in its own process) the cases are the triton backend's on CPU tensors alone, one gate
activation and the bidirectional ragged batch of one layer with lengths 2 to 4 (which holds the forward
direction's masking, and every kind of step the walk has):
the interpreter runs each program in numpy, and the activations are the conformance suite's
business.
"""

import os

import pytest
import torch

import convlstm_fast
from convlstm_fast import VARIANTS, _extension, convlstm_layer
from convlstm_fast.registry import GATE_ACTIVATIONS

F64_TOL = dict(atol=1e-10, rtol=1e-9)
F32_TOL = dict(atol=2e-4, rtol=1e-3)

CPU_BACKENDS = [
    pytest.param("reference"),
    pytest.param("cpu", marks=pytest.mark.skipif(not _extension.extension_built(),
                                                 reason="the compiled extension is not built")),
]
GPU_BACKENDS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("cuda", "triton")]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = [pytest.param("triton")] if INTERPRETED else CPU_BACKENDS + GPU_BACKENDS
ACTIVATIONS = GATE_ACTIVATIONS[:1] if INTERPRETED else GATE_ACTIVATIONS
DIRECTIONS = [pytest.param(True, id="bidirectional")] + (
    [] if INTERPRETED else [pytest.param(False, id="forward")])


def _setting(backend: str):
    """(device, dtype, tolerance) a backend is checked in."""
    if backend in ("reference", "cpu"):
        return "cpu", torch.float64, F64_TOL
    return ("cpu" if INTERPRETED else "cuda"), torch.float32, F32_TOL


def _model(variant, backend, gate_activation="sigmoid", bidirectional=True, num_layers=2,
           device="cpu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = convlstm_fast.ConvLSTM(3, 4, 3, num_layers=num_layers, variant=variant,
                                   bidirectional=bidirectional, gate_activation=gate_activation,
                                   backend=backend)
    with torch.no_grad():  # biases away from their zero init, so that every path carries signal
        for parameter in model.parameters():
            parameter.add_(torch.rand_like(parameter) - 0.5)
    return model.to(device=device, dtype=dtype)


def _inputs(batch, steps, model, device, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    directions = model.num_directions * model.num_layers

    def rand(*shape, scale=1.0):
        return ((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale
                ).to(device=device, dtype=dtype).requires_grad_()

    x = rand(batch, steps, 3, 5, 6)
    state = (rand(directions, batch, 4, 5, 6, scale=0.5), rand(directions, batch, 4, 5, 6))
    return x, state


def _composed_bidirectional(model, x, state):
    """The oracle: each layer's two directions as unidirectional reference runs, the reverse one
    on the flipped sequence."""
    sequence = x.transpose(0, 1)
    h_n, c_n = [], []
    for layer in range(model.num_layers):
        outputs = []
        for direction, cells in enumerate((model.cells, model.cells_reverse)):
            cell = cells[layer]
            index = 2 * layer + direction
            source = sequence.flip(0) if direction else sequence
            output, (h, c) = convlstm_layer(source, cell.parameter_list(), cell.variant,
                                            (state[0][index], state[1][index]),
                                            gate_activation=cell.gate_activation,
                                            backend="reference")
            outputs.append(output.flip(0) if direction else output)
            h_n.append(h)
            c_n.append(c)
        sequence = torch.cat(outputs, dim=2)
    return sequence.transpose(0, 1), (torch.stack(h_n), torch.stack(c_n))


def _loss(output, h_n, c_n, seed=7):
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for tensor in (output, h_n, c_n):
        weight = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        total = total + (tensor * weight.to(tensor)).sum()
    return total


def _grads(loss, model, x, state):
    inputs = [x, *state, *model.parameters()]
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _assert_all_close(got, want, tol, what):
    for index, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or g.abs().max() == 0, f"{what}[{index}]"
            continue
        torch.testing.assert_close(g, w.to(g.dtype), **tol, msg=lambda m: f"{what}[{index}]: {m}")


@pytest.mark.parametrize("gate_activation", ACTIVATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_matches_forward_plus_flipped(backend, variant, gate_activation):
    device, dtype, tol = _setting(backend)
    model = _model(variant, backend, gate_activation, device=device, dtype=dtype)
    x, state = _inputs(2, 5, model, device, dtype)
    output, (h_n, c_n) = model(x, state)
    assert output.shape == (2, 5, 8, 5, 6) and h_n.shape == c_n.shape == (4, 2, 4, 5, 6)
    want_output, (want_h, want_c) = _composed_bidirectional(model, x, state)
    _assert_all_close((output, h_n, c_n), (want_output, want_h, want_c), tol, "forward")
    got = _grads(_loss(output, h_n, c_n), model, x, state)
    want = _grads(_loss(want_output, want_h, want_c), model, x, state)
    _assert_all_close(got, want, tol, "gradient")


# T = 5. A full, a short, an empty and a near-full sample: every step masked; and lengths
# from 2 to 4: steps 0-1 reach every sample (a forward layer runs them as one call), step 4 none.
LENGTHS = [pytest.param((4, 2, 3, 2), id="2to4")] + (
    [] if INTERPRETED else [pytest.param((5, 2, 0, 4), id="0to5")])


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_match_per_sample_runs(backend, variant, bidirectional, lengths):
    device, dtype, tol = _setting(backend)
    model = _model(variant, backend, "hard_sigmoid", bidirectional=bidirectional,
                   num_layers=1 if INTERPRETED else 2, device=device, dtype=dtype)
    x, state = _inputs(len(lengths), 5, model, device, dtype)
    output, (h_n, c_n) = model(x, state, lengths=torch.tensor(lengths))
    got = _grads(_loss(output, h_n, c_n), model, x, state)

    # Each sample alone on its own prefix; the zeros past its end are part of the expectation.
    want_output = torch.zeros_like(output)
    want_h, want_c = torch.empty_like(h_n), torch.empty_like(c_n)
    loss = 0
    for b, length in enumerate(lengths):
        sample_state = (state[0][:, b:b + 1], state[1][:, b:b + 1])
        out_b, (h_b, c_b) = model(x[b:b + 1, :length], sample_state)
        with torch.no_grad():
            want_output[b, :length] = out_b[0]
            want_h[:, b], want_c[:, b] = h_b[:, 0], c_b[:, 0]
        padded = torch.cat([out_b, out_b.new_zeros(1, 5 - length, *out_b.shape[2:])], dim=1)
        loss = loss + _loss_part(padded, h_b, c_b, b, output.shape, h_n.shape)
    _assert_all_close((output, h_n, c_n), (want_output, want_h, want_c), tol, "forward")
    want = _grads(loss, model, x, state)
    _assert_all_close(got, want, tol, "gradient")


def _loss_part(output_b, h_b, c_b, b, output_shape, state_shape, seed=7):
    """Sample b's share of :func:`_loss` over the batch (the same random weights, sliced)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for tensor, shape, batch_dim in ((output_b, output_shape, 0), (h_b, state_shape, 1),
                                     (c_b, state_shape, 1)):
        weight = torch.randn(shape, generator=generator, dtype=torch.float64)
        weight = weight.narrow(batch_dim, b, 1)
        total = total + (tensor * weight.to(tensor)).sum()
    return total


@pytest.mark.parametrize("lengths", [None, [3, 2]], ids=["full", "ragged"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_reverse_with_lengths(backend, variant, lengths, make_params, make_inputs):
    """float64 gradcheck of the reverse direction: the op's own reverse walk over the whole
    sequence ("full"), and a ragged batch, whose steps every sample reaches run as one reverse
    op call after the masked ones ("ragged")."""
    params = make_params(variant, 2, 2, requires_grad=True)
    x, h0, c0 = make_inputs(3, 2, 2, 2, 3, 4, requires_grad=True)
    names = list(params)

    def fn(x, h0, c0, *weights):
        output, (h_n, c_n) = convlstm_layer(x, dict(zip(names, weights)), variant, (h0, c0),
                                            backend=backend, reverse=True, lengths=lengths)
        return output, h_n, c_n

    # fast_mode: the Jacobian against random projections (one column per output instead of
    # per input element), ~40x faster here; a wrong gradient still shows as a mismatch.
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params.values()), eps=1e-6, atol=1e-7,
                                     fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_recompute_with_reverse_and_lengths(backend):
    model = _model("a", backend)
    x, state = _inputs(3, 5, model, "cpu", torch.float64)
    lengths = torch.tensor([4, 3, 2])  # a forward prefix of 2 steps, 2 masked, 1 skipped
    output, (h_n, c_n) = model(x, state, lengths=lengths)
    want = _grads(_loss(output, h_n, c_n), model, x, state)
    for recompute in ("steps", 2, "layers"):
        model.recompute = recompute
        output_r, (h_r, c_r) = model(x, state, lengths=lengths)
        _assert_all_close((output_r, h_r, c_r), (output, h_n, c_n), F64_TOL, str(recompute))
        got = _grads(_loss(output_r, h_r, c_r), model, x, state)
        _assert_all_close(got, want, F64_TOL, f"gradient, recompute={recompute}")


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11),
                    reason="torch 2.6's torch.compile aborts the process (SIGABRT) on this "
                           "graph in CI; checked on torch 2.11 and newer")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_bidirectional_with_lengths(backend):
    model = _model("c", backend, dtype=torch.float32)
    x, state = _inputs(2, 4, model, "cpu", torch.float32)
    lengths = torch.tensor([4, 2])
    eager = model(x, state, lengths=lengths)
    compiled = torch.compile(model, fullgraph=True)(x, state, lengths=lengths)
    tol = dict(atol=2e-5, rtol=1e-4)
    _assert_all_close((compiled[0], *compiled[1]), (eager[0], *eager[1]), tol, "forward")
    got = torch.autograd.grad(compiled[0].sum(), x)
    want = torch.autograd.grad(eager[0].sum(), x)
    _assert_all_close(got, want, tol, "gradient")


@pytest.mark.parametrize("lengths, error, match", [
    (torch.tensor([2.0, 1.0]), TypeError, "lengths must hold integers, got dtype torch.float32"),
    (torch.tensor([True, False]), TypeError, "lengths must hold integers"),
    (torch.tensor([2, 1, 1]), ValueError, r"lengths must have shape \[B\] = \(2,\)"),
    (torch.tensor([[2, 1]]), ValueError, r"got \(1, 2\)"),
    ([4, 1], ValueError, r"lengths must lie in \[0, T\] = \[0, 3\], got values from 1 to 4"),
    ([-1, 1], ValueError, "got values from -1 to 1"),
    ([1.5, 1], TypeError, "lengths must be a list of ints"),
    ("3", TypeError, "lengths must be an integer tensor"),
])
def test_bad_lengths_are_named(lengths, error, match):
    model = convlstm_fast.ConvLSTM(3, 4, variant="a", backend="reference")
    with pytest.raises(error, match=match):
        model(torch.randn(2, 3, 3, 4, 4), lengths=lengths)


def test_bad_bidirectional_arguments_are_named():
    with pytest.raises(TypeError, match="bidirectional must be a bool"):
        convlstm_fast.ConvLSTM(3, 4, bidirectional=1)
    model = convlstm_fast.ConvLSTM(3, 4, num_layers=2, bidirectional=True, backend="reference")
    state = torch.zeros(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"num_layers \* 2 \(bidirectional\) = 4"):
        model(torch.randn(1, 3, 3, 4, 4), (state, state))
    with pytest.raises(TypeError, match="reverse must be a bool"):
        convlstm_layer(torch.randn(3, 1, 3, 4, 4), model.cells[0].parameter_list(), "a",
                       reverse="yes")


def test_bidirectional_layout_and_names():
    model = convlstm_fast.ConvLSTM(3, [4, 5], num_layers=2, bidirectional=True,
                                   backend="reference")
    assert model.cells[1].in_channels == model.cells_reverse[1].in_channels == 8
    names = {name.split(".")[0] for name in model.state_dict()}
    assert names == {"cells", "cells_reverse"}
    output, (h_n, c_n) = model(torch.randn(2, 3, 3, 4, 4))
    assert output.shape == (2, 3, 10, 4, 4)
    assert [tuple(h.shape[1:2]) for h in h_n] == [(4,), (4,), (5,), (5,)]
    assert "bidirectional=True" in repr(model)
