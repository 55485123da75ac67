"""convlstm_fast.graphs.CUDAGraphed: a layer's calls captured as CUDA graphs and replayed.

Its argument checks run anywhere; the captures need a GPU (the tests marked gpu skip themselves
with a reason without one, tests/conftest.py). On a GPU a graphed module is compared with an
eager copy of itself on every backend that runs there: outputs, final states and the gradients
of the input, the initial state and every parameter, over several replays with new inputs, a
new signature (captured once more), and inference under no_grad.
"""

from __future__ import annotations

import copy

import pytest
import torch

from convlstm_fast import ConvLSTM
from convlstm_fast.backends import get_backend
from convlstm_fast.graphs import CUDAGraphed

SHAPE = dict(batch=2, steps=4, cin=3, hidden=16, height=8, width=10)


def _layer(variant: str, backend: str, device="cpu") -> ConvLSTM:
    torch.manual_seed(0)
    return ConvLSTM(SHAPE["cin"], SHAPE["hidden"], 3, variant=variant, backend=backend).to(device)


def test_wraps_modules_only():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        CUDAGraphed(lambda x: x)


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_iters_must_be_a_positive_int(warmup):
    with pytest.raises(ValueError, match="warmup_iters must be an int >= 1"):
        CUDAGraphed(_layer("a", "reference"), warmup_iters=warmup)


def test_cpu_arguments_are_refused_with_their_position():
    graphed = CUDAGraphed(_layer("a", "reference"))
    x = torch.randn(SHAPE["batch"], SHAPE["steps"], SHAPE["cin"], 8, 10)
    with pytest.raises(ValueError, match="tensor argument 0 .* is on cpu"):
        graphed(x)
    assert graphed.captured == 0


def test_non_tensor_arguments_are_refused():
    graphed = CUDAGraphed(_layer("a", "reference"))
    with pytest.raises(TypeError, match="tensor argument 0 .* is a int"):
        graphed(3)


def _inputs(batch=SHAPE["batch"], seed=1, device="cuda"):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, SHAPE["steps"], SHAPE["cin"], SHAPE["height"], SHAPE["width"],
                    generator=generator).to(device)
    state = tuple(torch.randn(1, batch, SHAPE["hidden"], SHAPE["height"], SHAPE["width"],
                              generator=generator).to(device) for _ in range(2))
    return x, state


def _step(module, x, state):
    """One training step's numbers: output, h_n, c_n and the gradients of x, h_0, c_0 and every
    parameter of a weighted loss (cloned: a graphed call's results are its graph's buffers)."""
    x = x.detach().clone().requires_grad_()
    state = tuple(s.detach().clone().requires_grad_() for s in state)
    module.zero_grad(set_to_none=True)
    out, (h_n, c_n) = module(x, state)
    weights = [torch.linspace(-1, 1, t.numel(), device=t.device).view_as(t)
               for t in (out, h_n, c_n)]
    sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights)).backward()
    grads = [x.grad, *(s.grad for s in state), *(p.grad for p in module.parameters())]
    return [t.detach().clone() for t in (out, h_n, c_n, *grads)]


def _gpu_backends():
    # Lazily: nothing queries a device at collection.
    names = []
    for name in ("reference", "cuda", "triton"):
        probe = torch.empty(0, device="cuda")
        if get_backend(name).unsupported_reason("a", probe) is None:
            names.append(name)
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["a", "convlstm"])
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_graphed_training_steps_match_eager(backend, variant, fp32_ieee):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend!r} does not run on this GPU")
    eager = _layer(variant, backend, "cuda")
    graphed = CUDAGraphed(copy.deepcopy(eager))
    for seed in (1, 2, 3):  # the first captures, the others replay with new inputs
        x, state = _inputs(seed=seed)
        expected, got = _step(eager, x, state), _step(graphed, x, state)
        for name, e, g in zip(["output", "h_n", "c_n", "x", "h_0", "c_0",
                               *(n for n, _ in eager.named_parameters())], expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert graphed.captured == 1


@pytest.mark.gpu
def test_a_new_signature_is_captured_once_more():
    backend = _gpu_backends()[-1]
    eager = _layer("a", backend, "cuda")
    graphed = CUDAGraphed(copy.deepcopy(eager))
    for batch in (2, 3, 2):
        x, state = _inputs(batch=batch)
        for e, g in zip(_step(eager, x, state), _step(graphed, x, state)):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert graphed.captured == 2
    graphed.clear()
    assert graphed.captured == 0


@pytest.mark.gpu
def test_inference_under_no_grad_replays_the_forward():
    backend = _gpu_backends()[-1]
    eager = _layer("c", backend, "cuda").eval()
    graphed = CUDAGraphed(copy.deepcopy(eager))
    with torch.no_grad():
        for seed in (1, 2):
            x, state = _inputs(seed=seed)
            expected = eager(x, state)
            out, (h_n, c_n) = graphed(x, state)
            torch.testing.assert_close(out, expected[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(h_n, expected[1][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(c_n, expected[1][1], rtol=1e-4, atol=1e-5)
            assert out.grad_fn is None
    assert graphed.captured == 1


def test_the_bench_times_graphs_on_cuda_only():
    from convlstm_fast.bench import cases

    assert cases.backend_names(["cuda+graphs", "triton+graphs"]) == ["cuda+graphs",
                                                                     "triton+graphs"]
    assert cases.split_option("triton+graphs") == ("triton", cases.GRAPHS)
    assert cases.unsupported_reason("reference+graphs", "a", torch.empty(0)) == \
        "CUDA graphs need a CUDA device"
