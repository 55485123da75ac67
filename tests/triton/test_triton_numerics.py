"""The numeric contract of ops/registration.py, for the Triton kernels (CPU, interpreter):
hard_sigmoid's pieces and derivative chosen on x, tanh/sigmoid relative-accurate at every
magnitude, NaN kept inside its sample, the c/d backward's tie mask taken on the forward's Z, and
launches on the input's device.

Run alone: ``pytest tests/triton -q`` (its conftest sets TRITON_INTERPRET=1 before triton is
imported). The checks that the interpreter cannot make (it never contracts FMAs, and triton
3.6's maps the NaN-dropping max to np.maximum) compile probes for sm_90 in a subprocess instead.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

import convlstm_fast
import convlstm_fast.triton_kernels as triton_kernels
from convlstm_fast import get_cell
from convlstm_fast.reference import cells
from convlstm_fast.registry import GATE_ACTIVATIONS
from convlstm_fast.triton_kernels import IMPLEMENTED, _common
from convlstm_fast.triton_kernels._common import (gate_act, gate_act_grad, sigmoid, sigmoid_grad,
                                                  tanh_with_grad)

from helpers import make_inputs, run_with_grads

pytestmark = pytest.mark.triton_interpret

HERE = os.path.dirname(__file__)
GATE_ACTIVATION_CODES = {name: code for code, name in enumerate(GATE_ACTIVATIONS)}


# ---------------------------------------------------------------------------------------------
# The activations themselves
# ---------------------------------------------------------------------------------------------

@triton.jit
def _activations_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """out[k, i] for k = tanh, tanh', σ, σ', hard_sigmoid, hard_sigmoid' of x[i]."""
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    t, dt = tanh_with_grad(x)
    tl.store(out_ptr + offs, t, mask=mask)
    tl.store(out_ptr + N + offs, dt, mask=mask)
    tl.store(out_ptr + 2 * N + offs, sigmoid(x), mask=mask)
    tl.store(out_ptr + 3 * N + offs, sigmoid_grad(x), mask=mask)
    tl.store(out_ptr + 4 * N + offs, gate_act(x, 1), mask=mask)
    tl.store(out_ptr + 5 * N + offs, gate_act_grad(x, 1), mask=mask)


def _activations(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(6, x.numel())
    _activations_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return out


def _ulp32(value: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 numbers at |value| (float64 in, float64 out)."""
    v = value.abs().float()
    return (torch.nextafter(v, torch.tensor(math.inf)) - v).double()


def test_tanh_and_sigmoid_are_relative_accurate():
    """tanh, 1 − tanh², σ and σ' within 4 float32 ulps of float64 over 1e-30 … 20, both signs:
    2σ(2x) − 1 (relative error ~1e-7/|x| near 0) and σ(1 − σ) (0 instead of e^−x for x ≫ 1)
    fail this."""
    magnitudes = torch.logspace(-30, math.log10(20.0), 601, dtype=torch.float64)
    x = torch.cat([-magnitudes.flip(0), torch.zeros(1, dtype=torch.float64), magnitudes]).float()
    got = _activations(x).double()
    x64 = x.double()
    e = torch.exp(-2 * x64.abs())
    exact = {
        "tanh": torch.tanh(x64),
        "1 - tanh^2": 4 * e / (1 + e) ** 2,  # not 1 − tanh², which cancels even in float64
        "sigmoid": torch.sigmoid(x64),
        "sigmoid'": torch.sigmoid(x64) * torch.sigmoid(-x64),
    }
    for row, (name, want) in enumerate(exact.items()):
        ulps = (got[row] - want).abs() / _ulp32(want)
        worst = int(ulps.argmax())
        assert ulps.max() <= 4, (f"{name}({x[worst].item():.3g}) = {got[row, worst].item():.9g}, "
                                 f"float64 {want[worst].item():.9g}: {ulps.max().item():.1f} ulps")


def test_activations_keep_nan():
    values = _activations(torch.tensor([math.nan, 1.0]))
    assert values[:, 0].isnan().tolist() == [True, True, True, True, True, False], values[:, 0]
    assert values[5, 0] == pytest.approx(0.2), "hard_sigmoid'(NaN) is 0.2 (the middle piece)"


def test_hard_sigmoid_pieces_on_x():
    """Values and derivatives at and next to the kinks ±2.5, at ±inf and NaN, against the
    reference's hard_sigmoid and its autograd derivative (0.2 on −2.5 ≤ x ≤ 2.5)."""
    kink = torch.tensor(2.5)
    inf = torch.tensor(math.inf)
    near = [torch.nextafter(-kink, -inf), -kink, torch.nextafter(-kink, inf),
            torch.nextafter(kink, -inf), kink, torch.nextafter(kink, inf)]
    x = torch.stack([-inf, torch.tensor(-3.0), *near, torch.tensor(0.0), torch.tensor(3.0), inf,
                     torch.tensor(math.nan)])
    leaf = x.clone().requires_grad_()
    want = cells.hard_sigmoid(leaf)
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    got = _activations(x)
    torch.testing.assert_close(got[4], want.detach(), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(got[5], want_grad, equal_nan=True, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# What the compiler makes of them (sm_90 PTX, compiled in a subprocess without the interpreter)
# ---------------------------------------------------------------------------------------------

def _probe_ptx(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(HERE, "ptx_probe.py"), name], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _instructions(ptx: str):
    """(opcode, [operands]) of each PTX instruction; vector operands ``{%r1, %r2}`` flattened."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith((".", "$", "{", "}")) or not line.endswith(";"):
            continue
        line = re.sub(r"^@!?%\w+\s+", "", line[:-1])  # drop a guard predicate
        opcode, _, rest = line.partition(" ")
        operands = [tok for tok in re.split(r"[\s,{}\[\]]+", rest) if tok]
        out.append((opcode, operands))
    return out


def _f32_immediate(token: str) -> float | None:
    if re.fullmatch(r"0[fF][0-9A-Fa-f]{8}", token):
        return struct.unpack(">f", bytes.fromhex(token[2:]))[0]
    return None


def test_hard_sigmoid_compiled_compares_x_itself():
    """In the sm_90 PTX of a kernel that applies gate_act and gate_act_grad (hard_sigmoid) to a
    loaded x, every float comparison reads x as loaded (through moves or an exact |x| at most),
    against the kinks ±2.5. Comparing the FMA-contracted 0.2·x + 0.5 against 0 and 1 instead (as
    before) gives −7.45e-9 < 0 at x = −2.5, hence derivative 0 where the contract says 0.2."""
    instructions = _instructions(_probe_ptx("hard_sigmoid"))
    defs = {}
    for opcode, operands in instructions:
        if operands:
            targets = operands[:-1] if opcode.startswith("ld.") else operands[:1]
            for reg in targets:
                defs.setdefault(reg, []).append((opcode, operands))

    def loaded(reg: str, depth: int = 0) -> bool:
        for opcode, operands in defs.get(reg, []):
            if opcode.startswith("ld.global"):
                return True
            exact = opcode.startswith(("mov.", "abs.", "neg.", "cvt.f32.f32"))
            if exact and depth < 8 and any(loaded(r, depth + 1) for r in operands[1:]
                                           if r.startswith("%")):
                return True
        return False

    compares = [ops for opcode, ops in instructions
                if opcode.startswith("setp.") and opcode.endswith(".f32")]
    assert compares, "no float comparison in the probe's PTX"
    constants = set()
    for operands in compares:
        sources = operands[1:]
        assert any(r.startswith("%") and loaded(r) for r in sources), (
            f"setp {operands} does not compare the loaded x (computed from it instead)")
        constants.update(v for v in map(_f32_immediate, sources) if v is not None)
    assert constants <= {-2.5, 2.5} and constants, f"compared against {constants}, not ±2.5"


def test_nan_max_compiles_to_nan_propagating_max():
    """nan_max / nan_maximum (c/d's logit maxima, b's softmax maximum) lower to max.NaN.f32 on
    sm_90, never to the NaN-dropping max.f32 that tl.max and tl.maximum's default give."""
    maxima = [opcode for opcode, _ in _instructions(_probe_ptx("nan_max"))
              if opcode.startswith("max.") and opcode.endswith("f32")]
    assert maxima and all(".NaN" in opcode for opcode in maxima), maxima


# ---------------------------------------------------------------------------------------------
# Small activations: STYLE.md's rule with ε = 1e-6 at magnitudes 1e-4 … 1e-6
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e-4, 1e-5, 1e-6])
@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_small_activations(variant, scale, assert_close_to_float64):
    """Zero biases, x, h0 and c0 scaled to ``scale``: every pre-activation, G, C and H is of
    that size. tanh(x) = 2σ(2x) − 1 gave relative errors 1e-3 (1e-4) … 1e-1 (1e-6)."""
    x, h0, c0, params = make_inputs(variant, 2, 2, 3, 4, 5, 4, 3, seed=7)
    biases = {p.name for p in get_cell(variant).parameters if p.is_bias}
    params = {k: torch.zeros_like(v) if k in biases else v for k, v in params.items()}
    inputs = (x * scale, h0 * scale, c0 * scale, params)
    inputs64 = tuple(t.double() for t in inputs[:3]) + ({k: v.double() for k, v in params.items()},)
    got = run_with_grads(variant, *inputs, "sigmoid", "triton")
    ref = run_with_grads(variant, *inputs, "sigmoid", "reference")
    exact = run_with_grads(variant, *inputs64, "sigmoid", "reference")
    for name, want64 in exact.items():
        assert_close_to_float64(got[name], ref[name], want64, name=name)


def _stack_results(model, x):
    x = x.detach().clone().requires_grad_()
    out, (h_n, c_n) = model(x)
    gen = torch.Generator().manual_seed(11)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
               for t in (out, h_n, c_n))
    names = ["x", *(name for name, _ in model.named_parameters())]
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return {"output": out, "h_n": h_n, "c_n": c_n,
            **{"grad_" + n: g for n, g in zip(names, grads)}}


def test_small_activations_stack_b(assert_close_to_float64):
    """The review's reproduction: a 3-layer variant-b stack without biases on N(0, 1) input has
    outputs ~1e-7 (X̃ = A∘X is 1/(H·W) of X, and again each layer); Triton's relative error was
    1.4 against 2e-7 for the float32 reference."""
    torch.manual_seed(0)
    reference = convlstm_fast.ConvLSTM(3, 4, kernel_size=3, num_layers=3, variant="b",
                                       bias=False, backend="reference")
    model = convlstm_fast.ConvLSTM(3, 4, kernel_size=3, num_layers=3, variant="b", bias=False,
                                   backend="triton")
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 3, 6, 5, generator=torch.Generator().manual_seed(1))
    got = _stack_results(model, x)
    ref = _stack_results(reference, x)
    exact = _stack_results(reference.double(), x.double())
    assert exact["output"].abs().max() < 1e-5, "not the small-activation regime"
    for name, want64 in exact.items():
        assert_close_to_float64(got[name], ref[name], want64, name=name)


# ---------------------------------------------------------------------------------------------
# NaN stays in its sample
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("poison", ["frame", "pixel"])
@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_nan_stays_in_its_sample(variant, gate_activation, poison):
    """NaN in sample 0's x (its whole first frame, or one pixel of one channel at step 1): sample
    0's output, h_n and c_n are NaN exactly where the reference's are; sample 1's results (and
    its gradients w.r.t. x, h0, c0) are finite and equal to those of a clean run. Before, c/d
    with hard_sigmoid turned NaN finite (tile maxima merged by tl.maximum, the gates clamped
    through tl.maximum/tl.minimum)."""
    x, h0, c0, params = make_inputs(variant, 2, 2, 3, 4, 5, 4, 3, seed=13)
    poisoned = x.clone()
    if poison == "frame":
        poisoned[0, 0] = math.nan
    else:
        poisoned[1, 0, 1, 2, 3] = math.nan
    got = run_with_grads(variant, poisoned, h0, c0, params, gate_activation, "triton")
    ref = run_with_grads(variant, poisoned, h0, c0, params, gate_activation, "reference")
    clean = run_with_grads(variant, x, h0, c0, params, gate_activation, "triton")
    sample_axis = {"output": 1, "h_n": 0, "c_n": 0, "grad_x": 1, "grad_h0": 0, "grad_c0": 0}
    for name, axis in sample_axis.items():
        mine, theirs, other = (r[name].select(axis, 0) for r in (got, ref, clean))
        if not name.startswith("grad_"):
            assert ref[name].select(axis, 0).isnan().any(), f"{name}: the poison did not reach it"
            assert torch.equal(mine.isnan(), theirs.isnan()), (
                f"{name} of the poisoned sample: {int(mine.isnan().sum())} NaN, the reference "
                f"{int(theirs.isnan().sum())}")
        kept = got[name].select(axis, 1)
        assert kept.isfinite().all(), f"{name}: NaN reached the clean sample"
        assert torch.equal(kept, clean[name].select(axis, 1)), f"{name}: clean sample changed"


# ---------------------------------------------------------------------------------------------
# c/d backward: the tie mask of max_HW Z is the forward's
# ---------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a @triton.jit kernel: launches it and keeps a copy of the named argument."""

    def __init__(self, kernel, argument: str):
        self.kernel, self.argument, self.seen = kernel, argument, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            self.seen.append(args[self.kernel.arg_names.index(self.argument)].clone())
        return launch


def _mirrored(t: torch.Tensor) -> torch.Tensor:
    """t made symmetric under flipping its last axis (the width of a map or of a K×K kernel)."""
    half = (t.shape[-1] + 1) // 2
    return torch.cat([t[..., :half], t[..., : t.shape[-1] - half].flip(-1)], -1)


@pytest.mark.parametrize("variant", [v for v in ("c", "d") if v in IMPLEMENTED])
def test_tie_mask_is_the_forwards(variant, monkeypatch):
    """The backward's τ = [Z = max_HW Z]/#ties must be taken on the Z_t that the forward's
    logits kernel produced (and normalised M by). A constructed near-tie: x, h0, c0 and every
    depthwise kernel mirror-symmetric in width, so in exact arithmetic Z(y, w) = Z(y, W−1−w) and
    each channel's max sits on a mirrored pair that only rounding separates. Before, the
    backward recomputed A and Z through ATen (A rounded to fp16 after an fp16 GEMM, Z in fp32):
    its rounding split the pairs differently, and τ (hence Σ M∘dM) went to the other pixel in
    many (step, sample, channel)."""
    name = get_cell(variant).op + "_triton"
    forward = getattr(torch.ops.convlstm_fast, name)
    backward = getattr(torch.ops.convlstm_fast, name + "_backward")
    x, h0, c0, params = make_inputs(variant, 3, 2, 8, 16, 6, 7, 3, seed=4)
    x, h0, c0 = (_mirrored(t).half() for t in (x, h0, c0))
    params = [(_mirrored(v) if key.endswith(("dw_x", "dw_h", "dw_z")) else v).half()
              for key, v in params.items()]
    logits = _Recorder(_common.attention_logits_kernel, "z_ptr")
    ties = _Recorder(_common.attention_logits_bwd_kernel, "tie_ptr")
    monkeypatch.setattr(_common, "attention_logits_kernel", logits)
    monkeypatch.setattr(_common, "attention_logits_bwd_kernel", ties)
    output, h_n, c_n, saved = forward(x, h0, c0, params, 0)
    forward_z = logits.seen[:]
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in (output, h_n, c_n)]
    backward(*grads, x, h0, c0, params, output, saved, 0)
    steps, batch, hidden = x.shape[0], x.shape[1], h0.shape[1]
    assert len(forward_z) == len(ties.seen) == steps
    for t, tie in zip(range(steps - 1, -1, -1), ties.seen):  # the backward runs in reverse time
        z = forward_z[t].view(batch, -1, hidden)
        is_max = z == z.amax(1, keepdim=True)
        torch.testing.assert_close(tie.view(batch, -1, hidden), is_max / is_max.sum(1, True),
                                   rtol=0, atol=0, msg=lambda m, t=t: f"step {t}: {m}")


# ---------------------------------------------------------------------------------------------
# Launches run on the input's device
# ---------------------------------------------------------------------------------------------

def test_launches_run_on_the_inputs_device(monkeypatch):
    """The registered kernels run inside ``torch.cuda.device(x.device)`` for CUDA inputs (Triton
    launches on the current device: a model on cuda:1 with cuda:0 current would otherwise launch
    on cuda:0), and without a guard for CPU tensors. torch.cuda.device is replaced by a recorder."""
    entered = []

    class DeviceRecorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.remove(self.device)

    monkeypatch.setattr(torch.cuda, "device", DeviceRecorder)
    during = []
    run = triton_kernels._on_device(lambda *args: during.append(list(entered)) or "done", "op", 1)
    cuda1 = SimpleNamespace(device=torch.device("cuda", 1), is_cuda=True)
    assert run(None, cuda1) == "done"
    assert run(None, torch.zeros(1)) == "done"
    assert during == [[torch.device("cuda", 1)], []]
    assert entered == []
