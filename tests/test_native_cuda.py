"""What is particular to the fused CUDA ops (``backend="cuda"``, csrc/cuda/*_kernel.cu).

Their outputs and gradients through ``convlstm_layer`` against the reference in fp32 (TF32 off),
fp16 and bf16 are cases of the conformance suite, tests/test_backends.py. Here the ops are called
directly (forward op, then its ``_backward`` op with random output gradients):
- float64 (the kernels take it, the backend does not offer it): every result within rtol 1e-7,
  atol 1e-9 of the float64 reference, on edge shapes (K ∈ {1, 3, 5}, H ≠ W, Cin ≠ C, B = 1,
  T = 1, C over several tiles), walking forward and in reverse;
- CPU vs CUDA in float64: outputs, ``saved`` and gradients of the two native backends agree, in
  either walk;
- what is saved follows the registry; opcheck; deterministic mode (bitwise equal twice); errors
  that name the argument; empty sequences; the ``_inference`` twins equal the ops bit for bit;
  two GPUs.
Every test is marked ``gpu`` and skipped with a reason without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import VARIANTS, get_cell
from convlstm_fast.registry import GATE_ACTIVATIONS
from convlstm_fast.reference import cells

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (T, B, Cin, C, H, W, K). "base": C spans two 32-channel tiles and 144 pixels give several
# pixel splits in the reductions.
BASE = (3, 2, 5, 40, 12, 12, 3)
EDGE_SHAPES = [
    (1, 1, 3, 4, 5, 7, 1),
    (2, 1, 6, 3, 7, 5, 5),
    (2, 3, 8, 70, 4, 9, 3),
    (3, 2, 1, 2, 1, 1, 3),
]
F64_TOL = dict(rtol=1e-7, atol=1e-9)


def _ops(variant):
    """The CUDA forward and backward ops of ``variant``; skips when they are not built."""
    from convlstm_fast import _extension

    try:
        _extension.load_extension()
    except ImportError as error:
        pytest.skip(str(error))
    name = get_cell(variant).op
    if not torch._C._dispatch_has_kernel_for_dispatch_key("convlstm_fast::" + name, "CUDA"):
        pytest.skip(f"convlstm_fast._C was built without the CUDA kernel of {name}")
    ops = torch.ops.convlstm_fast
    return getattr(ops, name), getattr(ops, name + "_backward")


def _wired(variant):
    """Skip unless the native backend registered autograd/fake tensors for ``variant``."""
    from convlstm_fast.backends import get_backend

    get_backend("cuda").load()
    if "cuda" not in get_cell(variant).kernels:
        pytest.skip(f"the registry gives {variant!r} no cuda kernel to wire")


def _problem(variant, shape, seed=0):
    """float64 CPU inputs, parameters (pre-activations O(1), so both hard_sigmoid regions occur)
    and output-gradient weights."""
    steps, batch, cin, hidden, height, width, k = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(size, generator=generator, dtype=torch.float64) * scale

    params = {}
    for parameter in get_cell(variant).parameters:
        pshape = parameter.shape(cin, hidden, k)
        fan_in = 1 if len(pshape) == 1 else int(torch.tensor(pshape[1:]).prod())
        params[parameter.name] = randn(*pshape, scale=0.5 if parameter.is_bias
                                       else 1.5 / fan_in ** 0.5)
    x = randn(steps, batch, cin, height, width)
    h0 = randn(batch, hidden, height, width, scale=0.5)
    c0 = randn(batch, hidden, height, width, scale=0.5)
    weights = [randn(steps, batch, hidden, height, width), randn(batch, hidden, height, width),
               randn(batch, hidden, height, width)]
    return x, h0, c0, params, weights


def _reference(variant, x, h0, c0, params, weights, gate_activation, reverse=False):
    """[output, h_n, c_n, grad_x, grad_h0, grad_c0, *grad_params] of the reference (autograd)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, h0, c0, *params.values())]
    lx, lh, lc, *lp = leaves
    out, h_n, c_n = cells.layer(variant, lx, lh, lc, dict(zip(params, lp)), gate_activation,
                                reverse=reverse)
    loss = sum((t * w.to(device=t.device, dtype=t.dtype)).sum()
               for t, w in zip((out, h_n, c_n), weights))
    return [out.detach(), h_n.detach(), c_n.detach(), *torch.autograd.grad(loss, leaves)]


def _run_ops(variant, x, h0, c0, params, weights, gate_activation, device="cuda", reverse=False):
    """The same list from the native ops (forward, then backward with ``weights`` as the output
    gradients, both walking ``reverse`` as asked), plus the ``saved`` list."""
    forward, backward = _ops(variant)
    args = [t.to(device) for t in (x, h0, c0)]
    plist = [p.to(device) for p in params.values()]
    code = GATE_ACTIVATIONS.index(gate_activation)
    out, h_n, c_n, saved = forward(*args, plist, code, reverse)
    grads = [w.to(device=device, dtype=x.dtype) for w in weights]
    grad_x, grad_h0, grad_c0, grad_params = backward(*grads, *args, plist, out, saved, code,
                                                     reverse)
    return [out, h_n, c_n, grad_x, grad_h0, grad_c0, *grad_params], saved


def _names(variant):
    return ["output", "h_n", "c_n", "grad_x", "grad_h0", "grad_c0"] + [
        "grad_" + n for n in get_cell(variant).parameter_names]



@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "T{}B{}Cin{}C{}H{}W{}K{}".format(*s))
@pytest.mark.parametrize("variant", VARIANTS)
def test_edge_shapes_float64(variant, shape, reverse):
    x, h0, c0, params, weights = _problem(variant, shape, seed=3)
    gate_activation = "hard_sigmoid" if shape[-1] == 5 else "sigmoid"
    want = _reference(variant, x, h0, c0, params, weights, gate_activation, reverse)
    got, _ = _run_ops(variant, x, h0, c0, params, weights, gate_activation, reverse=reverse)
    for name, g, w in zip(_names(variant), got, want):
        torch.testing.assert_close(g.cpu(), w, **F64_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_and_cuda_agree_float64(variant, reverse):
    """Both native backends: same outputs, the same ``saved`` values (up to the CPU kernel's NCHW
    layout where the registry's ``kernels["cpu"]`` says so) and the same gradients."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
            "convlstm_fast::" + get_cell(variant).op, "CPU"):
        pytest.skip(f"no native CPU kernel for {variant!r} yet")
    x, h0, c0, params, weights = _problem(variant, (2, 2, 4, 6, 5, 6, 3), seed=5)
    got_cuda, saved_cuda = _run_ops(variant, x, h0, c0, params, weights, "sigmoid",
                                    reverse=reverse)
    got_cpu, saved_cpu = _run_ops(variant, x, h0, c0, params, weights, "sigmoid", device="cpu",
                                  reverse=reverse)
    for name, a, b in zip(_names(variant), got_cuda, got_cpu):
        torch.testing.assert_close(a.cpu(), b, **F64_TOL, msg=lambda m: f"{name}: {m}")
    spec = get_cell(variant).saved_spec("cuda")(x, h0, list(params.values()))
    assert [(tuple(s.shape), s.dtype) for s in saved_cuda] == [(tuple(s), d) for s, d in spec]
    for index, (a, b) in enumerate(zip(saved_cuda, saved_cpu)):
        if get_cell(variant).kernels["cpu"] == "nchw" and b.dim() == 5:
            b = b.permute(0, 1, 3, 4, 2)  # the CPU kernel keeps this state tensor NCHW
        torch.testing.assert_close(a.cpu(), b, **F64_TOL, msg=lambda m: f"saved[{index}]: {m}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_follows_the_spec(variant, dtype):
    x, h0, c0, params, weights = _problem(variant, (2, 2, 3, 5, 4, 3, 3))
    cast = {n: p.to(dtype) for n, p in params.items()}
    _, saved = _run_ops(variant, x.to(dtype), h0.to(dtype), c0.to(dtype), cast, weights, "sigmoid")
    spec = get_cell(variant).saved_spec("cuda")(x.to(dtype), h0, list(cast.values()))
    assert [(tuple(s.shape), s.dtype) for s in saved] == [(tuple(s), d) for s, d in spec]
    assert all(s.is_cuda and s.is_contiguous() for s in saved)


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(variant):
    forward, backward = _ops(variant)
    _wired(variant)
    x, h0, c0, params, weights = _problem(variant, (2, 2, 3, 4, 5, 4, 3))
    args = [t.float().cuda() for t in (x, h0, c0)]
    plist = [p.float().cuda() for p in params.values()]
    for p in plist:
        p.requires_grad_()
    torch.library.opcheck(forward, (*args, plist, 0))
    out, _, _, saved = forward(*args, [p.detach() for p in plist], 1)
    grads = [w.float().cuda() for w in weights]
    torch.library.opcheck(backward, (*grads, *args, [p.detach() for p in plist], out, saved, 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_op_equals_the_forward(variant, monkeypatch):
    """``<op>_inference`` (nothing saved) gives the op's output and final states bit for bit (in
    deterministic mode), and ``convlstm_layer(backend="cuda")`` under no_grad runs it."""
    from convlstm_fast.functional import convlstm_layer

    forward, _ = _ops(variant)
    _wired(variant)
    x, h0, c0, params, _ = _problem(variant, BASE)
    args = [t.float().cuda() for t in (x, h0, c0)]
    plist = [p.float().cuda() for p in params.values()]
    inference = getattr(torch.ops.convlstm_fast, get_cell(variant).op + "_inference")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        want = forward(*args, plist, 1)[:3]
        got = inference(*args, plist, 1)
        with torch.no_grad():
            out, (h_n, c_n) = convlstm_layer(args[0], plist, variant, (args[1], args[2]),
                                             gate_activation="hard_sigmoid", backend="cuda")
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b, c in zip(("output", "h_n", "c_n"), got, (out, h_n, c_n), want):
        assert torch.equal(a, c) and torch.equal(b, c), f"{name} differs from the op's"
    torch.library.opcheck(inference.default, (*args, plist, 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic_mode_is_bitwise_reproducible(variant, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    x, h0, c0, params, weights = _problem(variant, BASE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, saved_first = _run_ops(variant, x.float(), h0.float(), c0.float(),
                                      {n: p.float() for n, p in params.items()}, weights, "sigmoid")
        second, saved_second = _run_ops(variant, x.float(), h0.float(), c0.float(),
                                        {n: p.float() for n, p in params.items()}, weights,
                                        "sigmoid")
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b in zip(_names(variant) + ["saved"] * len(saved_first), first + saved_first,
                          second + saved_second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
        assert torch.isfinite(a).all(), f"{name} is not finite"


@pytest.mark.parametrize("variant", VARIANTS)
def test_errors_name_the_argument(variant):
    forward, _ = _ops(variant)
    x, h0, c0, params, _ = _problem(variant, (2, 1, 3, 4, 5, 5, 3))
    args = [t.float().cuda() for t in (x, h0, c0)]
    plist = [p.float().cuda() for p in params.values()]
    with pytest.raises(RuntimeError, match="h0"):
        forward(args[0], args[1].cpu(), args[2], plist, 0)
    with pytest.raises(RuntimeError, match="c0"):
        forward(args[0], args[1], args[2].double(), plist, 0)
    first = get_cell(variant).parameter_names[0]
    bad = [plist[0][:-1]] + plist[1:]
    with pytest.raises(RuntimeError, match=first):
        forward(*args, bad, 0)
    with pytest.raises(RuntimeError, match="params"):
        forward(*args, plist[:-1], 0)
    with pytest.raises(RuntimeError, match="gate_activation"):
        forward(*args, plist, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_sequence(variant):
    forward, backward = _ops(variant)
    x, h0, c0, params, _ = _problem(variant, (0, 2, 3, 4, 5, 5, 3))
    args = [t.float().cuda() for t in (x, h0, c0)]
    plist = [p.float().cuda() for p in params.values()]
    out, h_n, c_n, saved = forward(*args, plist, 0)
    assert out.shape == (0, 2, 4, 5, 5)
    assert torch.equal(h_n, args[1]) and torch.equal(c_n, args[2])
    assert h_n.data_ptr() != args[1].data_ptr(), "h_n must not alias h0"
    grad_h_n, grad_c_n = torch.randn_like(args[1]), torch.randn_like(args[2])
    grad_x, grad_h0, grad_c0, grad_params = backward(torch.zeros_like(out), grad_h_n, grad_c_n,
                                                     *args, plist, out, saved, 0)
    assert grad_x.shape == args[0].shape
    assert torch.equal(grad_h0, grad_h_n) and torch.equal(grad_c0, grad_c_n)
    assert all(g.shape == p.shape and not g.any() for g, p in zip(grad_params, plist))


def test_runs_on_the_inputs_device():
    """With two GPUs, the ops run on (and return tensors on) the input's device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    forward, _ = _ops("a")
    x, h0, c0, params, _ = _problem("a", (2, 1, 3, 4, 5, 5, 3))
    device = torch.device("cuda", 1)
    args = [t.float().to(device) for t in (x, h0, c0)]
    out, h_n, c_n, saved = forward(*args, [p.float().to(device) for p in params.values()], 0)
    assert {t.device for t in (out, h_n, c_n, *saved)} == {device}
