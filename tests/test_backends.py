"""Every kernel backend against the reference: output, h_n, c_n and the gradients of x, h0, c0 and
every parameter, per (backend, variant, case).

Each case rounds random float64 inputs once to its dtype; the reference then runs on exactly those
numbers twice — in float64 (x64) and in the case's dtype (x_ref) — and every result x of the
backend must satisfy STYLE.md's rule ``max|x − x64| ≤ 2·max|x_ref − x64| + ε·max|x64|``
(ε = 1e-6 fp32, 1e-3 fp16/bf16; tests/conftest.py).

- The GPU check's default selection (``-m "gpu and not extended"``): both GPU backends × every
  variant in fp32 with hard_sigmoid and in bf16 with sigmoid. The shapes keep every integer
  argument of the Triton kernels in the same specialisation class (multiple of 16 or not, 1 or
  not) as the benchmark's paper layer (256 channels, 28×28), so that the GPU check compiles few
  Triton specialisations; Triton cases assert that they ran compiled kernels, not the
  interpreter (tests/conftest.py refuses GPU tests in an interpreted session, too).
- ``extended``: fp16, bf16 with hard_sigmoid, and K = 5 (``gpu_check.py fp16`` / ``k5``).
- The cpu backend runs the same cases here (fp32; its other dtypes skip with its reason).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from convlstm_fast import VARIANTS
from convlstm_fast.backends import get_backend
from convlstm_fast.functional import convlstm_layer
from convlstm_fast.reference import cells

# (T, B, Cin, C, H, W, K). "small": C spans two 64-channel tiles, 80 pixels two pixel tiles.
# c/d in 16-bit use "small_attention": fewer maps, so a seed exists whose attention logits have
# well separated maxima (find_separated_problem).
SHAPES = {
    "small": (3, 2, 48, 80, 8, 10, 3),
    "small_attention": (2, 1, 16, 16, 8, 10, 3),
    "k5": (2, 2, 16, 32, 9, 7, 5),
    "k5_attention": (2, 1, 16, 16, 9, 7, 5),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    gate_activation: str
    shape: str
    extended: bool


CASES = [
    Case("fp32", torch.float32, "hard_sigmoid", "small", False),
    Case("bf16", torch.bfloat16, "sigmoid", "small", False),
    Case("fp16", torch.float16, "sigmoid", "small", True),
    Case("bf16-hard", torch.bfloat16, "hard_sigmoid", "small", True),
    Case("k5-fp32", torch.float32, "sigmoid", "k5", True),
    Case("k5-bf16", torch.bfloat16, "hard_sigmoid", "k5", True),
]
BACKENDS = {"cpu": "cpu", "triton": "cuda", "cuda": "cuda"}  # backend -> device of its tensors


def _params():
    for backend, device in BACKENDS.items():
        for case in CASES:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            if case.extended:
                marks.append(pytest.mark.extended)
            for variant in VARIANTS:
                yield pytest.param(backend, variant, case, marks=marks,
                                   id=f"{backend}-{variant}-{case.name}")


def _shape(variant: str, case: Case) -> tuple[int, ...]:
    if variant in ("c", "d") and case.dtype in (torch.float16, torch.bfloat16):
        return SHAPES[case.shape + "_attention"]
    return SHAPES[case.shape]


def _results(backend, variant, x, h0, c0, params, gate_activation, weights):
    """{name: tensor} of the layer's outputs and the gradients of Σ w·(out, h_n, c_n)."""
    leaves = {"x": x, "h0": h0, "c0": c0, **params}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    named = {k: leaves[k] for k in params}
    if backend == "reference":
        out, h_n, c_n = cells.layer(variant, leaves["x"], leaves["h0"], leaves["c0"], named,
                                    gate_activation)
    else:
        out, (h_n, c_n) = convlstm_layer(leaves["x"], named, variant, (leaves["h0"], leaves["c0"]),
                                         gate_activation=gate_activation, backend=backend)
    loss = sum((t.double() * w).sum() for t, w in zip((out, h_n, c_n), weights))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"output": out, "h_n": h_n, "c_n": c_n}
    results.update({"grad_" + k: g for k, g in zip(leaves, grads)})
    return {k: v.detach() for k, v in results.items()}


@pytest.mark.parametrize("backend, variant, case", list(_params()))
def test_backend_matches_reference(backend, variant, case, find_separated_problem,
                                   assert_close_to_float64, monkeypatch):
    device = BACKENDS[backend]
    probe = torch.empty(1, 1, 1, 1, 1, device=device, dtype=case.dtype)
    reason = get_backend(backend).unsupported_reason(variant, probe)
    if reason is not None:
        pytest.skip(reason)
    if device == "cuda":  # fp32 means IEEE fp32 here: no TF32 in the kernels or the reference
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    if backend == "triton":
        from convlstm_fast.triton_kernels import INTERPRETED

        assert not INTERPRETED, "GPU Triton tests must run compiled kernels"
    x, h0, c0, params, weights = find_separated_problem(variant, _shape(variant, case),
                                                        case.dtype, case.gate_activation)
    on = lambda t: t.to(device)  # noqa: E731
    exact = _results("reference", variant, on(x), on(h0), on(c0),
                     {k: on(v) for k, v in params.items()}, case.gate_activation,
                     [on(w) for w in weights])
    low = lambda t: t.to(device, case.dtype)  # noqa: E731
    args = (low(x), low(h0), low(c0), {k: low(v) for k, v in params.items()},
            case.gate_activation, [on(w) for w in weights])
    reference = _results("reference", variant, *args)
    got = _results(backend, variant, *args)
    for name, want64 in exact.items():
        assert got[name].dtype == case.dtype, f"{name}: dtype {got[name].dtype}"
        assert_close_to_float64(got[name], reference[name], want64, name=name)
    if backend == "triton":
        from convlstm_fast.info import triton_specializations

        assert sum(triton_specializations().values()) > 0, "no compiled Triton kernel ran"
