"""Cross-backend numerics: the contract of convlstm_fast/ops/registration.py, on every backend.

The contract (the reference, convlstm_fast/reference/cells.py, defines it):
- hard_sigmoid's pieces are chosen on x itself, so its derivative is 0.2 on −2.5 ≤ x ≤ 2.5;
- tanh and sigmoid are accurate to a few ulps relative at every magnitude;
- NaN propagates within its sample, as the reference's does, and never reaches another sample.

Every test is parametrised over ``backend`` in ("reference", "cpu", "cuda"): "cuda" is marked
``gpu`` (skipped with a reason without a GPU, tests/conftest.py), "cpu" and "cuda" skip with the
backend's own ``unsupported_reason`` (e.g. the extension is not built, or the dtype is not
supported). The oracle is the reference in float64 on the CPU, run on the float64 copies of the
inputs the backend gets; low-precision results are held to STYLE.md's rule
``max|x − x64| ≤ 2·max|x_ref − x64| + ε·max|x64|`` (x_ref: the reference in the backend's dtype).
For the reference backend most comparisons are with itself; what holds it to the contract there
is the part of each test that does not use it as the oracle (the kink anchor, the float64 tanh and
sigmoid of the sweeps, the masks' sanity checks).
"""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import VARIANTS, ConvLSTM, get_cell
from convlstm_fast.registry import GATE_ACTIVATIONS
from convlstm_fast.backends import get_backend
from convlstm_fast.functional import convlstm_layer

BACKENDS = ["reference", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# The gates of each cell in the order of its gate parameters' blocks (shared/SPEC.md
# "Parameters"): convlstm's bias / weight_x rows, the pooled cells' gate_bias / gate_weight_x
# rows; c and d lack the gate their attention map replaces.
@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 is float32 on CUDA too (no TF32 in cuBLAS or cuDNN), for the backend and for the
    reference it is measured against, as in tests/test_native_cuda.py."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _backend_device(backend: str, variant: str, dtype: torch.dtype) -> str:
    """The device the backend runs on; skips with the backend's reason when it cannot run."""
    device = "cuda" if backend == "cuda" else "cpu"
    if backend != "reference":
        probe = torch.empty(0, device=device, dtype=dtype)
        reason = get_backend(backend).unsupported_reason(variant, probe)
        if reason is not None:
            pytest.skip(reason)
    return device


def _names(variant: str) -> list[str]:
    return ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0",
            *("grad " + name for name in get_cell(variant).parameter_names)]


def _run(backend, variant, gate_activation, inputs, params, dtype, device="cpu",
         loss_weights=None):
    """One layer of ``backend`` on ``inputs`` (x, h0, c0) and ``params`` (dict, op order) cast to
    ``dtype`` on ``device``: ``[output, h_n, c_n]``, then, with ``loss_weights`` (one tensor per
    output), the gradients of Σ output·weight w.r.t. x, h0, c0 and every parameter."""
    wants_grad = loss_weights is not None
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_(wants_grad)
              for t in (*inputs, *params.values())]
    x, h0, c0, *values = leaves
    output, (h_n, c_n) = convlstm_layer(x, dict(zip(params, values)), variant, (h0, c0),
                                        gate_activation=gate_activation, backend=backend)
    outs = [output, h_n, c_n]
    results = [o.detach().cpu() for o in outs]
    if wants_grad:
        loss = sum((o * w.to(device=device, dtype=dtype)).sum()
                   for o, w in zip(outs, loss_weights))
        results += [g.cpu() for g in torch.autograd.grad(loss, leaves)]
    return results


def _rounded(tensors, dtype):
    """The float64 copies of ``tensors`` rounded to ``dtype``: what the float64 oracle runs on."""
    if isinstance(tensors, dict):
        return {name: t.to(dtype).double() for name, t in tensors.items()}
    return [t.to(dtype).double() for t in tensors]


def _loss_weights(shapes, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _check_all(got, want, want64, dtype, assert_close_to_float64, names):
    """float64: equal to the oracle to rounding; lower precision: STYLE.md's rule."""
    for name, g, w, w64 in zip(names, got, want, want64):
        if dtype == torch.float64:
            torch.testing.assert_close(g, w64, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert_close_to_float64(g, w, w64, name=name)


def _gate_rows(variant: str, gate: str, hidden: int) -> slice:
    return get_cell(variant).gates.slot(gate, hidden)


def _gate_bias(params, variant):
    return params[get_cell(variant).gates.bias]


def _gate_weight_x(params, variant):
    return params[get_cell(variant).gates.weights[0]]


# ---- hard_sigmoid at its kinks -----------------------------------------------------------

# Per hidden channel, the signs of the pre-activations ±2.5 of the gates i, f, o: every gate
# meets both kinks, and every channel has C_t ≠ 0 (i or f open), so that every gate's derivative
# reaches the gradients (do = dH∘tanh C_t would vanish with C_t = 0).
KINK_SIGNS = {"i": (-1, 1, 1, -1), "f": (1, -1, 1, 1), "o": (-1, 1, -1, 1)}
KINK_CASES = [
    pytest.param(backend, dtype, marks=[pytest.mark.gpu] if backend == "cuda" else [],
                 id=f"{backend}-{str(dtype).replace('torch.', '')}")
    for backend in ("reference", "cpu", "cuda") for dtype in (torch.float32, torch.float64)
]
KINK_CASES.append(pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu, id="cuda-bfloat16"))


def _kink_params(variant, cin, hidden, k, generator):
    """Every weight 0 and every gate bias ±2.5 (KINK_SIGNS), so each gate pre-activation is
    exactly that bias whatever the inputs; the candidate's and the attention's biases are
    random, so G, F ≠ 0."""
    params = {}
    spec = get_cell(variant)
    biases = {p.name for p in spec.parameters if p.is_bias}
    for name, shape in spec.parameter_shapes(cin, hidden, k).items():
        if name in biases:
            params[name] = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
        else:
            params[name] = torch.zeros(shape, dtype=torch.float64)
    _set_kink_biases(params, variant, hidden, 0.0)
    return params


def _set_kink_biases(params, variant, hidden, offset):
    """The gate biases at ±(2.5 − offset), in place."""
    bias = _gate_bias(params, variant)
    for gate in (g for g in get_cell(variant).gates.order if g != "g"):
        bias[_gate_rows(variant, gate, hidden)] = (
            torch.tensor(KINK_SIGNS[gate], dtype=torch.float64) * (2.5 - offset))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend, dtype", KINK_CASES)
def test_hard_sigmoid_kinks(backend, dtype, variant, make_inputs, assert_close_to_float64):
    """Every gate pre-activation exactly −2.5 or +2.5 (zero weights, gate biases ±2.5, random
    inputs and states): the output, final states and every gradient against the float64
    reference, whose derivative there is 0.2 — checked independently of the reference's own
    kink handling, against the same cell at ±(2.5 − 1e-9), inside the linear piece.

    Fails on the old code (4e16867) for the cpu backend's convlstm, float32 and float64: its
    hard_sigmoid derivative tested 0 ≤ 0.2·x + 0.5, which an FMA-contracted AVX2/AVX-512 loop
    rounds to −7.45e-9 at x = −2.5, giving d bias = 0 (and d weight_x = 0) there."""
    device = _backend_device(backend, variant, dtype)
    steps, batch, cin, hidden, height, width, k = 2, 2, 3, 4, 3, 4, 3
    inputs = make_inputs(steps, batch, cin, hidden, height, width, seed=3)
    params = _kink_params(variant, cin, hidden, k, torch.Generator().manual_seed(5))
    weights = _loss_weights([(steps, batch, hidden, height, width)]
                            + [(batch, hidden, height, width)] * 2)
    params64 = _rounded(params, dtype)
    want64 = _run("reference", variant, "hard_sigmoid", _rounded(inputs, dtype), params64,
                  torch.float64, loss_weights=weights)
    # The oracle's anchor: at the kinks the float64 reference equals the cell just inside them.
    inside = {name: p.clone() for name, p in params64.items()}
    _set_kink_biases(inside, variant, hidden, 1e-9)
    inside64 = _run("reference", variant, "hard_sigmoid", _rounded(inputs, dtype), inside,
                    torch.float64, loss_weights=weights)
    for name, at_kink, near in zip(_names(variant), want64, inside64):
        torch.testing.assert_close(at_kink, near, rtol=1e-7, atol=1e-8,
                                   msg=lambda m, name=name: f"reference {name} at the kinks: {m}")
    got = _run(backend, variant, "hard_sigmoid", inputs, params, dtype, device, weights)
    want = (None,) * len(got) if dtype == torch.float64 else _run(
        "reference", variant, "hard_sigmoid", inputs, params, dtype, device, weights)
    _check_all(got, want, want64, dtype, assert_close_to_float64, _names(variant))


# ---- tiny activations ------------------------------------------------------------------

SCALES = (1e-4, 1e-5, 1e-6)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_activations(backend, variant, gate_activation, scale, make_params, make_inputs,
                           assert_close_to_float64):
    """float32 with x, h0, c0 and every bias scaled by 1e-4 … 1e-6, so every tanh argument,
    the candidate, the cell and the output are of that size: the output, final states and every
    gradient under STYLE.md's rule against the float64 reference.

    Fails on the old code (4e16867) for the cpu backend (every variant, both activations): its
    float tanh (1 − e)/(1 + e), e = exp(−2|x|), has an absolute error of ~1e-7, i.e. a relative
    error of ~1e-7/|x| (10 % at 1e-6, and tanh x = 0 below 3e-8), in G, tanh C_t and F, and so
    in H_t and in every gradient through them. With that fixed, c and d still failed (att_dw_x
    2% off, d's grad x 1.2e-6): their A = exp(Z − max Z) rounded to exactly 1 for logits within
    3e-8 of the max, which the backward then took for ties of the max and gave a share of its
    gradient."""
    device = _backend_device(backend, variant, torch.float32)
    steps, batch, cin, hidden, height, width, k = 3, 2, 3, 4, 5, 6, 3
    inputs = [t * scale for t in make_inputs(steps, batch, cin, hidden, height, width, seed=11)]
    params = make_params(variant, cin, hidden, k, seed=13)
    biases = {p.name for p in get_cell(variant).parameters if p.is_bias}
    params = {name: p * scale if name in biases else p for name, p in params.items()}
    weights = _loss_weights([(steps, batch, hidden, height, width)]
                            + [(batch, hidden, height, width)] * 2)
    want64 = _run("reference", variant, gate_activation, _rounded(inputs, torch.float32),
                  _rounded(params, torch.float32), torch.float64, loss_weights=weights)
    want = _run("reference", variant, gate_activation, inputs, params, torch.float32, device,
                weights)
    got = _run(backend, variant, gate_activation, inputs, params, torch.float32, device, weights)
    assert 0.1 * scale < want64[0].abs().max() < 10 * scale  # the outputs are of that size
    _check_all(got, want, want64, torch.float32, assert_close_to_float64, _names(variant))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_activations_of_a_deep_stack(backend, variant, assert_close_to_float64):
    """The review's reproduction: ConvLSTM(num_layers=3, bias=False) with N(0, 1) input, whose
    activations shrink layer by layer (variant b's outputs are ~5e-8): outputs, final states and
    the gradients of the input and every parameter under STYLE.md's rule (float32).

    Fails on the old code (4e16867) for the cpu backend, every variant, from the same tanh near
    0 (the review measured b's outputs 0.24 off, relative, against 2e-7 for the float32
    reference, and c's att_bias gradient 4e-3 against 2.6e-7)."""
    device = _backend_device(backend, variant, torch.float32)
    torch.manual_seed(0)
    stack64 = ConvLSTM(4, 4, num_layers=3, variant=variant, bias=False, backend="reference")
    stack64 = stack64.double()
    x = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    stack_state = {name: t.float() for name, t in stack64.state_dict().items()}

    def run(stack_backend, dtype, run_device):
        stack = ConvLSTM(4, 4, num_layers=3, variant=variant, bias=False, backend=stack_backend)
        stack.load_state_dict(stack_state)
        stack = stack.to(device=run_device, dtype=dtype)
        x_in = x.to(device=run_device, dtype=dtype).requires_grad_()
        output, (h_n, c_n) = stack(x_in)
        outs = [output, h_n, c_n]
        weights = _loss_weights([o.shape for o in outs], seed=3)
        loss = sum((o * w.to(device=run_device, dtype=dtype)).sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, [x_in, *stack.parameters()])
        return [t.detach().cpu() for t in (*outs, *grads)]

    names = ["output", "h_n", "c_n", "grad x",
             *("grad " + name for name, _ in stack64.named_parameters())]
    want64 = run("reference", torch.float64, "cpu")
    want = run("reference", torch.float32, device)
    got = run(backend, torch.float32, device)
    for name, g, w, w64 in zip(names, got, want, want64):
        assert_close_to_float64(g, w, w64, name=name)


# ---- tanh and sigmoid over a sweep, through the ops --------------------------------------

# |v| log-spaced over 1e-30 … 20, both signs.
SWEEP = torch.logspace(-30, torch.log10(torch.tensor(20.0)).item(), 700, dtype=torch.float64)
SWEEP = torch.cat([SWEEP, -SWEEP]).float()
# The bounds, in ulps of the float32 result: tanh and σ from the CPU kernels' polynomial exp
# (measured over 7.2M points of ±[1e-30, 20]: 2.09 and 2.26 ulp) and CUDA's tanhf and expf
# (≤ 2 ulp); σ' = s²·e compounds exp's 2 ulp with the roundings of s = 1/(1 + e), doubled by the
# square (measured 4.23).
MAX_ULPS = 3.0
MAX_DERIVATIVE_ULPS = 6.0


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got − exact| in units of the float32 spacing at |exact|."""
    magnitude = exact.abs().float()
    spacing = (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude).double()
    return (got.double() - exact).abs() / spacing


def _sweep_cell(variant, readout):
    """A 1×1-kernel cell with one channel on a batch of 1×1 maps (GAP and b's softmax over one
    pixel are exact: b's X̃ = X; c/d's map A = 1), all weights 0 but one, whose gates are exactly
    0 or 1 under hard_sigmoid (biases ±3): ``readout`` "tanh_cell" gives f = o = 1 and G = 0,
    so C_t = c0 and H_t = tanh(c0); "tanh_candidate" gives f = 0, i = o = 1 and the candidate's
    pre-activation = x, so c_n = G = tanh(x); "sigmoid_forget" (sigmoid gates) gives the forget
    gate's pre-activation = x, c0 = 1 and G = 0, so c_n = σ(x) and dc_n/dx = σ'(x)."""
    params = {name: torch.zeros(shape, dtype=torch.float64)
              for name, shape in get_cell(variant).parameter_shapes(1, 1, 1).items()}
    opened = {"tanh_cell": {"i": -3.0, "f": 3.0, "o": 3.0},
              "tanh_candidate": {"i": 3.0, "f": -3.0, "o": 3.0},
              "sigmoid_forget": {}}[readout]
    bias = _gate_bias(params, variant)
    for gate, value in opened.items():
        if gate in get_cell(variant).gates.order:
            bias[_gate_rows(variant, gate, 1)] = value
    if readout == "tanh_candidate":
        if variant == "convlstm":
            params["weight_x"][_gate_rows(variant, "g", 1)] = 1.0
        else:
            params["cand_dw_x"].fill_(1.0)
            params["cand_pw_x"].fill_(1.0)
    if readout == "sigmoid_forget":
        _gate_weight_x(params, variant)[_gate_rows(variant, "f", 1)] = 1.0
    return params


@pytest.mark.parametrize("readout", ["tanh_cell", "tanh_candidate", "sigmoid_forget"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_accuracy_sweep(backend, variant, readout, assert_close_to_float64):
    """tanh (the cell's tanh C_t, the candidate's G) and σ, float32, at |v| from 1e-30 to 20 of
    both signs, read off a cell wired so that a result is exactly one of them (_sweep_cell): at
    most MAX_ULPS from float64 tanh / σ at every magnitude, and σ' (dc_n/dx) under STYLE.md's
    rule (the reference's autograd computes it as s·(1 − s), whose 1 − s cancels for x ≫ 0,
    so relative accuracy is held only where the backend computes σ' itself, see below).

    Fails on the old code (4e16867) for the cpu backend, every variant: its tanh v was 0 for
    |v| < 3e-8 (relative error 1, 1.7e7 ulps) and 2049 ulps off at 1e-4; its σ' = s·(1 − s)
    was exactly 0 for x > 16.6 (1.6e7 ulps at x = 18)."""
    device = _backend_device(backend, variant, torch.float32)
    values = SWEEP
    batch = values.numel()
    x = torch.zeros(1, batch, 1, 1, 1, dtype=torch.float64)
    h0 = torch.zeros(batch, 1, 1, 1, dtype=torch.float64)
    c0 = torch.zeros(batch, 1, 1, 1, dtype=torch.float64)
    if readout == "tanh_cell":
        c0 = values.double().view(batch, 1, 1, 1)
    else:
        x = values.double().view(1, batch, 1, 1, 1)
        if readout == "sigmoid_forget":
            c0 = torch.ones_like(c0)
    params = _sweep_cell(variant, readout)
    gate_activation = "sigmoid" if readout == "sigmoid_forget" else "hard_sigmoid"
    # d c_n / d x only.
    weights = [torch.zeros(1, batch, 1, 1, 1), torch.zeros(batch, 1, 1, 1),
               torch.ones(batch, 1, 1, 1)]
    got = _run(backend, variant, gate_activation, (x, h0, c0), params, torch.float32, device,
               weights)
    v = values.double()
    if readout == "tanh_cell":
        result, exact = got[0].flatten(), torch.tanh(v)
        torch.testing.assert_close(got[2].flatten(), values, rtol=0, atol=0)  # C_t = c0 exactly
    elif readout == "tanh_candidate":
        result, exact = got[2].flatten(), torch.tanh(v)
    else:
        result, exact = got[2].flatten(), torch.sigmoid(v)
    nonzero = exact != 0
    ulps = _ulps(result[nonzero], exact[nonzero])
    worst = int(ulps.argmax())
    assert ulps.max() <= MAX_ULPS, (
        f"{readout}: {ulps.max().item():.3g} ulps at v = {v[nonzero][worst].item():.3g} "
        f"(got {result[nonzero][worst].item():.9g}, float64 {exact[nonzero][worst].item():.9g})")
    if readout == "sigmoid_forget":
        grad_x = got[3].flatten()
        derivative = torch.sigmoid(v) * torch.sigmoid(-v)
        want = _run("reference", variant, gate_activation, (x, h0, c0), params, torch.float32,
                    device, weights)[3].flatten()
        assert_close_to_float64(grad_x, want, derivative, name="σ'")
        if backend != "reference":
            # The native kernels' σ' (cell_math.h gate_activation_grad) is accurate relative
            # at every magnitude, x ≫ 0 included.
            ulps = _ulps(grad_x, derivative)
            assert ulps.max() <= MAX_DERIVATIVE_ULPS, (
                f"σ': {ulps.max().item():.3g} ulps at x = {v[int(ulps.argmax())].item():.3g}")


# ---- NaN stays in its sample -------------------------------------------------------------

POISONED_SAMPLE, POISONED_STEP = 1, 1


def _poison(x, poison):
    """A NaN in sample POISONED_SAMPLE at step POISONED_STEP: the whole frame, or one pixel of
    one input channel."""
    x = x.clone()
    if poison == "frame":
        x[POISONED_STEP, POISONED_SAMPLE] = float("nan")
    else:
        x[POISONED_STEP, POISONED_SAMPLE, 0, 2, 3] = float("nan")
    return x


def _masks(outs):
    """isnan of output [T, B, …], h_n and c_n [B, …], all as [T, B, …] step by step."""
    output, h_n, c_n = outs[:3]
    return [torch.isnan(output), torch.isnan(h_n)[None], torch.isnan(c_n)[None]]


def _check_clean_samples(got, clean, batch, names):
    """Every tensor's samples other than the poisoned one: finite and equal to the clean run.
    Outputs are [T, B, …], h_n, c_n, grad h0, grad c0 [B, …], grad x [T, B, …]."""
    for name, g, c in zip(names, got, clean):
        dim = 1 if g.dim() == 5 else 0
        keep = [b for b in range(batch) if b != POISONED_SAMPLE]
        g, c = g.index_select(dim, torch.tensor(keep)), c.index_select(dim, torch.tensor(keep))
        assert torch.isfinite(g).all(), f"{name}: NaN or inf reached another sample"
        torch.testing.assert_close(g, c, rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name} of the other samples: {m}")


def _nan_case(backend, variant, gate_activation, x, h0, c0, params, device, names):
    """Runs the clean and the poisoned inputs (x [2, T, B, …]); returns the poisoned results,
    the clean ones and the float64 reference's poisoned ones, after checking the other
    samples."""
    shapes = [(x.shape[1], x.shape[2], *h0.shape[1:])] + [tuple(h0.shape)] * 2
    weights = _loss_weights(shapes)
    clean = _run(backend, variant, gate_activation, (x[0], h0, c0), params, torch.float32,
                 device, weights)
    got = _run(backend, variant, gate_activation, (x[1], h0, c0), params, torch.float32,
               device, weights)
    want64 = _run("reference", variant, gate_activation, _rounded((x[1], h0, c0), torch.float32),
                  _rounded(params, torch.float32), torch.float64)
    # The samples' own gradients (x, h0, c0) too: only the parameters' sum over the samples
    # may (and does) become NaN.
    _check_clean_samples(got[:6], clean[:6], x.shape[2], names[:6])
    return got, clean, want64


@pytest.mark.parametrize("poison", ["frame", "pixel"])
@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_sample(backend, variant, gate_activation, poison, make_params,
                                 make_inputs):
    """A NaN frame, or one NaN pixel of one input channel, in one sample at step 1 (float32):
    the poisoned sample's output, h_n and c_n are NaN exactly where the float64 reference's are
    (isnan masks equal: a local spread for convlstm's pixel, the whole sample once GAP(X_t) has
    carried it into the pooled gates); every other sample, and the poisoned one before step 1,
    is finite and equal to a clean run, and so are their input and state gradients. On "cuda"
    convlstm's K×K convolutions are cuDNN's, which may pick Winograd or FFT algorithms that
    spread a NaN over a tile or the whole sample: there its mask must contain the reference's,
    the other samples' checks staying exact.

    On the old code (4e16867) these pass for the cpu backend: a NaN in X_t reaches every pooled
    gate of its sample in the same step, which hides the one NaN the old kernels dropped (c/d's
    max over the pixels); test_nan_in_attention_logits_fills_the_plane reaches it."""
    device = _backend_device(backend, variant, torch.float32)
    steps, batch, cin, hidden, height, width, k = 3, 3, 3, 4, 6, 7, 3
    x, h0, c0 = make_inputs(steps, batch, cin, hidden, height, width, seed=17)
    params = make_params(variant, cin, hidden, k, seed=19)
    got, clean, want64 = _nan_case(backend, variant, gate_activation,
                                   torch.stack([x, _poison(x, poison)]), h0, c0, params, device,
                                   _names(variant))
    before = (slice(0, POISONED_STEP), POISONED_SAMPLE)
    torch.testing.assert_close(got[0][before], clean[0][before], rtol=0, atol=0)
    for label, got_mask, want_mask in zip(("output", "h_n", "c_n"), _masks(got), _masks(want64)):
        assert want_mask[:, POISONED_SAMPLE].any()
        if poison == "pixel" and variant == "convlstm":
            assert not want_mask[:, POISONED_SAMPLE].all()  # a local spread: the test has teeth
        if backend == "cuda" and variant == "convlstm":
            assert (got_mask >= want_mask).all(), f"{label}: a NaN of the reference is missing"
            continue
        assert torch.equal(got_mask, want_mask), (
            f"{label}: NaN at {int(got_mask.sum())} elements, the reference at "
            f"{int(want_mask.sum())}; differing at {int((got_mask != want_mask).sum())}")


@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_masks_through_winograd(backend, gate_activation, make_params, make_inputs):
    """convlstm at 192 + 64 → 256 channels, where the cpu backend's 3×3 convolutions run
    Winograd F(2×2, 3×3) (csrc/cpu/convlstm_layer_kernel.cpp use_winograd) forward and
    backward, with a NaN pixel in one sample at step 0 (float32): the masks of output, h_n and
    c_n equal the float64 reference's, the other sample is finite and equal to a clean run, and
    so are its input and state gradients. A tile transform sums a 4×4 input tile into the
    outputs of a 2×2 tile, and NaN does not cancel; but F(2×2, 3×3)'s Bᵀ and Aᵀ have exactly
    the zeros of the convolution's dependencies (input row 0 of a tile reaches only output
    row 0, row 3 only row 1), so a NaN spreads exactly as in the direct convolution. On "cuda"
    (cuDNN, whose F(4×4, 3×3) Winograd or FFT would spread it further) the mask must contain
    the reference's."""
    device = _backend_device(backend, "convlstm", torch.float32)
    steps, batch, cin, hidden, height, width, k = 2, 2, 192, 64, 12, 12, 3
    x, h0, c0 = make_inputs(steps, batch, cin, hidden, height, width, seed=23)
    params = make_params("convlstm", cin, hidden, k, seed=29)
    poisoned = x.clone()
    poisoned[0, POISONED_SAMPLE, 0, 6, 5] = float("nan")
    got, _, want64 = _nan_case(backend, "convlstm", gate_activation, torch.stack([x, poisoned]),
                               h0, c0, params, device, _names("convlstm"))
    for label, got_mask, want_mask in zip(("output", "h_n", "c_n"), _masks(got), _masks(want64)):
        assert want_mask.any() and not want_mask[:, POISONED_SAMPLE].all()
        if backend == "cuda":
            assert (got_mask >= want_mask).all(), f"{label}: a NaN of the reference is missing"
        else:
            assert torch.equal(got_mask, want_mask), (
                f"{label}: NaN at {int(got_mask.sum())} elements, the reference at "
                f"{int(want_mask.sum())}")


@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", ["c", "d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_attention_logits_fills_the_plane(backend, variant, gate_activation, make_params,
                                                 make_inputs):
    """A NaN born inside c/d's attention logits Z while the pooled gates stay finite: one pixel
    of two input channels is +inf, the attention's X-side depthwise taps of both are positive
    and its pointwise weights of opposite signs, so F (and then Z) is +inf − inf = NaN around
    the pixel, while the gate weights are positive, so GAP(X_t) = +inf opens every pooled gate
    (σ(+inf) = 1) instead of poisoning it. torch.amax propagates NaN, so A = exp(Z − max Z) is
    NaN over the whole plane of every channel: c's C_t and H_t (i = A) and d's H_t (o = A) are
    NaN everywhere in the sample, d's C_t only where the candidate met inf − inf. Masks equal to
    the float64 reference's; the other samples finite and equal to a clean run.

    Fails on the old code (4e16867) for the cpu backend: its max over the plane,
    `z > m ? z : m`, stepped over the NaN logits, so A (and C_t, H_t) were NaN only near the
    pixel."""
    device = _backend_device(backend, variant, torch.float32)
    # One step: from the next on, H_{t−1} = NaN reaches the pooled gates through GAP.
    steps, batch, cin, hidden, height, width, k = 1, 2, 3, 4, 8, 8, 3
    x, h0, c0 = make_inputs(steps, batch, cin, hidden, height, width, seed=31)
    params = make_params(variant, cin, hidden, k, seed=37)
    params["att_dw_x"][:2] = params["att_dw_x"][:2].abs()
    params["att_pw_x"][:, 0] = params["att_pw_x"][:, 0].abs()
    params["att_pw_x"][:, 1] = -params["att_pw_x"][:, 1].abs()
    params["gate_weight_x"] = params["gate_weight_x"].abs()
    poisoned = x.clone()
    poisoned[0, POISONED_SAMPLE, :2, 5, 5] = float("inf")  # far from pixel (0, 0)
    got, _, want64 = _nan_case(backend, variant, gate_activation, torch.stack([x, poisoned]),
                               h0, c0, params, device, _names(variant))
    filled = [True, True, variant == "c"]  # output, h_n, c_n NaN over the whole sample
    for label, got_mask, want_mask, full in zip(("output", "h_n", "c_n"), _masks(got),
                                                _masks(want64), filled):
        assert want_mask[:, POISONED_SAMPLE].all() == full
        assert torch.equal(got_mask, want_mask), (
            f"{label}: NaN at {int(got_mask.sum())} elements, the reference at "
            f"{int(want_mask.sum())}")
