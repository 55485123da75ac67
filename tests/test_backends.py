"""The conformance suite: every kernel backend against the reference — output, h_n, c_n and the
gradients of x, h0, c0 and every parameter — per (backend, variant, case), a case being a dtype,
a gate activation and a shape.

Each case rounds random float64 inputs once to its dtype; the reference then runs on exactly those
numbers twice — in float64 (x64) and in the case's dtype (x_ref) — and every result x of the
backend must satisfy STYLE.md's rule ``max|x − x64| ≤ 2·max|x_ref − x64| + ε·max|x64|``
(ε = 1e-6 fp32, 1e-3 fp16/bf16, 1e-12 float64; tests/conftest.py). A backend that cannot run a
case skips it with its own ``unsupported_reason``.

Three ways of running it:
- here (``pytest tests``): the cpu backend on CPU tensors, triton and cuda on a GPU (marked
  ``gpu``, skipped with a reason without one; Triton cases assert that they ran compiled kernels,
  and tests/conftest.py refuses GPU tests in a session with TRITON_INTERPRET set);
- under Triton's interpreter (tests/triton, its own process): the triton backend on CPU tensors;
- against the CUDA kernels built in CPU emulation (csrc/cuda/emulation_check.py reads CASES).

The GPU check's default run selects ``-m "gpu and not extended"``: both GPU backends × every
variant in fp32 with hard_sigmoid and in bf16 with sigmoid (x contiguous, and x the time-first
view of a batch-first tensor, as ConvLSTM passes it, in both walks), on shapes whose integer arguments
fall in the same Triton specialisation classes as the benchmark's paper layer (so the run
compiles few specialisations: tests/triton/test_gpu_check_budget.py). Every other case is
``extended`` (``gpu_check.py full`` / ``fp16`` / ``k5`` run them).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from convlstm_fast import VARIANTS
from convlstm_fast.backends import get_backend
from convlstm_fast.functional import convlstm_layer
from convlstm_fast.reference import cells

# (T, B, Cin, C, H, W, K).
SHAPES = {
    # The GPU check's: C spans two 64-channel tiles, 80 pixels two pixel tiles; the paper
    # layer's specialisation classes. c/d in 16 bits use a shape's "_attention" shape where it
    # has one: fewer maps, so seeds whose attention maxima stand apart exist
    # (find_separated_problem finds none for 200 seeds with C over two 64-channel tiles).
    "small": (3, 2, 48, 80, 8, 10, 3),
    "small_attention": (2, 1, 16, 16, 8, 10, 3),
    "k5": (2, 2, 16, 32, 9, 7, 5),
    "k5_attention": (2, 1, 16, 16, 9, 7, 5),
    # Several channel and pixel tiles of the GPU kernels, K = 5 with B = 1, K = 1 with T = 1 and
    # C = 130 (three 64-channel tiles, the last one partly masked).
    "tiles": (3, 2, 40, 72, 9, 11, 3),
    "tiles_k5_b1": (2, 1, 16, 24, 13, 7, 5),
    "tiles_k1_t1": (1, 3, 8, 130, 6, 10, 1),
    # c/d in 16 bits: with C over two channel tiles no seed separates the maxima, so "tiles"
    # takes "small_attention"'s shape and K = 1 with T = 1 keeps B > 1 on fewer channels;
    # "tiles_k5_b1" separates as it is.
    "tiles_attention": (2, 1, 16, 16, 8, 10, 3),
    "tiles_k1_t1_attention": (1, 2, 8, 8, 6, 10, 1),
    # The CUDA kernels' base: C over two 32-channel tiles, 144 pixels in several reduction splits.
    "cuda_base": (3, 2, 5, 40, 12, 12, 3),
    "cuda_base_attention": (2, 2, 5, 8, 4, 5, 3),
    # Edge shapes: K ∈ {1, 3, 5}, B = 1, T = 1, H ≠ W, Cin ≠ C, Cin = 1; maps 16 and 20 wide
    # (the CPU stencils work in 16-float vectors, the last of a 20-wide row overlapping the one
    # before); two pixel tiles and two channel tiles of the interpreter's blocks (256 pixels,
    # 64 channels); 11 wide (8-double vectors, the second overlapping the first, in float64).
    "k1": (2, 2, 3, 5, 4, 7, 1),
    "k5_b1": (2, 1, 4, 3, 6, 5, 5),
    "t1": (1, 2, 2, 2, 3, 3, 3),
    "cin1": (3, 1, 1, 6, 2, 4, 3),
    "w20": (2, 2, 3, 4, 3, 20, 3),
    "w16_k5": (2, 1, 2, 3, 2, 16, 5),
    "odd": (2, 2, 5, 6, 5, 7, 3),
    "k1_b1": (2, 1, 3, 4, 4, 3, 1),
    "k5_t1": (1, 2, 4, 3, 6, 5, 5),
    "two_pixel_tiles": (2, 1, 2, 3, 17, 16, 3),
    # Many steps × samples over few channels: a weight gradient summed over all T·B·H·W = 16384
    # products at once is ~1.6× over STYLE.md's fp32 bound where the reference's per-step sum
    # is not (benchmarks/wgrad_probe.py; the H200's fp32 convlstm grad_weight_h misses).
    "long": (16, 4, 8, 8, 16, 16, 3),
    "two_channel_tiles": (2, 1, 3, 66, 3, 2, 3),
    "w11": (2, 2, 3, 4, 3, 11, 3),
    # A ragged batch (Case.ragged): lengths T, 1, 0 (every kind of sample) over T = 4 steps.
    "ragged": (4, 3, 3, 5, 5, 6, 3),
    # The CPU ConvLSTM's Winograd path (3×3 convolutions with >= 256 channels on both sides).
    "winograd": (2, 1, 256, 256, 6, 5, 3),
    "winograd_f64": (2, 1, 256, 256, 4, 3, 3),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    gate_activation: str
    shape: str
    extended: bool = True
    backends: tuple | None = None  # None: every backend
    variants: tuple | None = None  # None: every variant
    # How x arrives: None, contiguous; "hw", a view with H and W transposed in memory;
    # "batch_first", the time-first view of a batch-first tensor (as ConvLSTM passes it).
    layout: str | None = None
    # The layer walks t = T − 1 … 0 inside the op (the reverse direction of a bidirectional layer).
    reverse: bool = False
    # Each sample's number of valid steps, masked inside the op: ragged_lengths(T, B).
    ragged: bool = False


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ACTS = {"sigmoid": "sigmoid", "hard": "hard_sigmoid"}
CASES = [
    Case("fp32", torch.float32, "hard_sigmoid", "small", extended=False),
    Case("bf16", torch.bfloat16, "sigmoid", "small", extended=False),
    Case("fp16", torch.float16, "sigmoid", "small"),
    Case("bf16-hard", torch.bfloat16, "hard_sigmoid", "small"),
    Case("k5-fp32", torch.float32, "sigmoid", "k5"),
    Case("k5-bf16", torch.bfloat16, "hard_sigmoid", "k5"),
    *(Case(f"{shape}-{d}-{a}", dtype, act, shape)
      for shape in ("tiles", "tiles_k5_b1", "tiles_k1_t1", "cuda_base")
      for d, dtype in _DTYPES.items() for a, act in _ACTS.items()),
    *(Case(f"{shape}-fp32", torch.float32, "hard_sigmoid" if shape == "odd" else "sigmoid", shape)
      for shape in ("k1", "k5_b1", "t1", "cin1", "w20", "w16_k5", "odd", "k1_b1", "k5_t1",
                    "two_pixel_tiles", "two_channel_tiles")),
    Case("odd-fp32-sigmoid", torch.float32, "sigmoid", "odd"),
    Case("long-fp32", torch.float32, "sigmoid", "long"),
    Case("noncontiguous-fp32", torch.float32, "hard_sigmoid", "odd", layout="hw"),
    Case("batch-first-fp32", torch.float32, "sigmoid", "odd", layout="batch_first"),
    Case("batch-first-bf16", torch.bfloat16, "sigmoid", "small", extended=False,
         layout="batch_first"),
    Case("reverse-fp32", torch.float32, "hard_sigmoid", "odd", reverse=True),
    Case("reverse-k5-b1-fp32", torch.float32, "sigmoid", "k5_b1", reverse=True),
    Case("reverse-t1-fp32", torch.float32, "sigmoid", "t1", reverse=True),
    Case("reverse-batch-first-bf16", torch.bfloat16, "sigmoid", "small", extended=False,
         layout="batch_first", reverse=True),
    Case("ragged-fp32", torch.float32, "hard_sigmoid", "ragged", ragged=True),
    Case("ragged-reverse-fp32", torch.float32, "sigmoid", "ragged", reverse=True, ragged=True),
    Case("ragged-reverse-batch-first-bf16", torch.bfloat16, "sigmoid", "ragged",
         layout="batch_first", reverse=True, ragged=True),
    Case("winograd-fp32", torch.float32, "sigmoid", "winograd", backends=("cpu",)),
    Case("reverse-winograd-fp32", torch.float32, "sigmoid", "winograd", backends=("cpu",),
         variants=("convlstm",), reverse=True),
    Case("w11-f64", torch.float64, "sigmoid", "w11"),
    Case("winograd-f64", torch.float64, "sigmoid", "winograd_f64", backends=("cpu",),
         variants=("convlstm",)),
]

# Under Triton's interpreter (tests/triton runs this file in its own process) the suite is the
# triton backend on CPU tensors; otherwise each backend on its device.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = {"triton": "cpu"} if INTERPRETED else {"cpu": "cpu", "triton": "cuda", "cuda": "cuda"}

# The interpreter runs every Triton program one after another in numpy: the GPU check's shapes
# ("small", "k5", "tiles*", "cuda_base") take 10–75 s per variant there (every float32 case
# interpreted took 26 minutes, against CI's 4). Interpreted, the suite runs the edge shapes
# (1–4 s per variant), the non-contiguous input included; the larger shapes are the GPU's and
# the CUDA emulation's.
INTERPRETED_SHAPES = ("k1", "k5_b1", "t1", "cin1", "w20", "w16_k5", "odd", "k1_b1", "k5_t1",
                      "two_pixel_tiles", "two_channel_tiles", "long")


def selected(backend: str):
    """``(variant, case)`` pairs of the suite for ``backend`` in this process, before the
    backend's own ``unsupported_reason`` (csrc/cuda/emulation_check.py runs those of "cuda")."""
    for case in CASES:
        if case.backends is not None and backend not in case.backends:
            continue
        if INTERPRETED and case.shape not in INTERPRETED_SHAPES:
            continue
        for variant in case.variants or VARIANTS:
            yield variant, case


def _params():
    for backend, device in BACKENDS.items():
        for variant, case in selected(backend):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            if case.extended:
                marks.append(pytest.mark.extended)
            yield pytest.param(backend, variant, case, marks=marks,
                               id=f"{backend}-{variant}-{case.name}")


def _shape(variant: str, case: Case) -> tuple[int, ...]:
    if variant in ("c", "d") and case.dtype in (torch.float16, torch.bfloat16):
        return SHAPES.get(case.shape + "_attention", SHAPES[case.shape])
    return SHAPES[case.shape]


def ragged_lengths(steps: int, batch: int) -> list[int]:
    """A full sample, a one-step one, an empty one, one a step short, and again."""
    return [(steps, 1, 0, steps - 1)[b % 4] for b in range(batch)]


def _results(backend, variant, x, h0, c0, params, gate_activation, weights, transform=None,
             reverse=False, lengths=None):
    """{name: tensor} of the layer's outputs and the gradients of Σ w·(out, h_n, c_n);
    ``transform`` (e.g. a non-contiguous view) is applied to x inside the graph; ``reverse``
    walks t = T − 1 … 0; ``lengths`` masks each sample's steps past its end."""
    leaves = {"x": x, "h0": h0, "c0": c0, **params}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    named = {k: leaves[k] for k in params}
    x_in = transform(leaves["x"]) if transform else leaves["x"]
    if backend == "reference":
        out, h_n, c_n = cells.layer(
            variant, x_in, leaves["h0"], leaves["c0"], named, gate_activation, reverse=reverse,
            lengths=None if lengths is None else torch.tensor(lengths, device=x.device))
    else:
        out, (h_n, c_n) = convlstm_layer(x_in, named, variant, (leaves["h0"], leaves["c0"]),
                                         gate_activation=gate_activation, backend=backend,
                                         reverse=reverse, lengths=lengths)
    loss = sum((t.double() * w).sum() for t, w in zip((out, h_n, c_n), weights))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"output": out, "h_n": h_n, "c_n": c_n}
    results.update({"grad_" + k: g for k, g in zip(leaves, grads)})
    return {k: v.detach() for k, v in results.items()}


# The one result STYLE.md's rule cannot judge: the gradient of the attention features' bias b_a
# (b, c, d). Their attention is invariant to a constant added to a map (softmax over H·W,
# exp(Z − max Z)), so Σ_pixels dZ = 0 exactly, and d b_a = Σ dF_pre is what is left of a
# cancellation between terms 50 to 3000 times larger than itself (with K = 1, where no padding
# breaks it, most). Every float32 evaluation then errs by ~u·Σ|terms|, well above ε·max|x64|,
# and by amounts that are draws: two equally valid orders of the reference (the problem and
# kernels rotated by 180°) differ by up to 5×, and over 30 seeds the fused kernels' median error
# equals the reference's (0.9–1.1×) while 2 seeds in 30 break the rule (b at K = 1; which ones
# depends on the thread count). Where this result alone breaks the rule, the case xfails with the
# numbers — provided it is within the rule at ε 100 times STYLE.md's, which a wrong gradient
# (an error of the size of the result) is not.
CANCELLED = ("grad_att_bias",)
CANCELLED_EPS = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 0.1,
                 torch.bfloat16: 0.1}


def check_results(check, got: dict, reference: dict, exact: dict, dtype: torch.dtype):
    """Every result of ``got`` against ``exact`` (float64) and ``reference`` (the reference in
    ``dtype``) with ``check``, tests/conftest.py's ``check_close_to_float64``: raises
    AssertionError on the first that breaks the rule, except for a result of CANCELLED within
    CANCELLED_EPS; returns the notes of those."""
    notes = []
    for name, want64 in exact.items():
        assert got[name].dtype == dtype, f"{name}: dtype {got[name].dtype}"
        try:
            check(got[name], reference[name], want64, name=name)
        except AssertionError as error:
            if name not in CANCELLED:
                raise
            check(got[name], reference[name], want64, eps=CANCELLED_EPS[dtype], name=name)
            notes.append(" ".join(str(error).split()))
    return notes


def layout_view(x: torch.Tensor, layout: str | None) -> torch.Tensor:
    """The same values as ``x`` in ``layout`` (Case.layout): a view of storage laid out
    [T, B, Cin, W, H] ("hw") or [B, T, Cin, H, W] ("batch_first"), or ``x`` itself."""
    if layout is None:
        return x
    dims = {"hw": (3, 4), "batch_first": (0, 1)}[layout]
    return x.transpose(*dims).contiguous().transpose(*dims)


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
    if backend == "triton" and device == "cuda":
        from convlstm_fast.triton_kernels import INTERPRETED as interpreted

        assert not interpreted, "GPU Triton tests must run compiled kernels"
    shape = _shape(variant, case)
    walk = dict(reverse=case.reverse, lengths=ragged_lengths(*shape[:2]) if case.ragged else None)
    x, h0, c0, params, weights = find_separated_problem(variant, shape, case.dtype,
                                                        case.gate_activation, **walk)
    on = lambda t: t.to(device)  # noqa: E731
    exact = _results("reference", variant, on(x), on(h0), on(c0),
                     {k: on(v) for k, v in params.items()}, case.gate_activation,
                     [on(w) for w in weights], **walk)
    low = lambda t: t.to(device, case.dtype)  # noqa: E731
    args = (low(x), low(h0), low(c0), {k: low(v) for k, v in params.items()},
            case.gate_activation, [on(w) for w in weights])
    reference = _results("reference", variant, *args, **walk)
    got = _results(backend, variant, *args, transform=lambda t: layout_view(t, case.layout),
                   **walk)
    notes = check_results(assert_close_to_float64, got, reference, exact, case.dtype)
    if backend == "triton" and device == "cuda":
        from convlstm_fast.info import triton_specializations

        assert sum(triton_specializations().values()) > 0, "no compiled Triton kernel ran"
    if notes:
        pytest.xfail("a cancellation the rule cannot judge (CANCELLED): " + "; ".join(notes))
