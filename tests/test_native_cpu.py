"""What is particular to the fused CPU ops (``backend="cpu"``, csrc/cpu/*_kernel.cpp).

Their outputs and gradients against the reference, in float32 and float64 on every edge shape
(the Winograd path included), are cases of the conformance suite, tests/test_backends.py. Here:
float64 gradcheck of the fused ops through the functional layer, the ops on non-contiguous
inputs, ``opcheck`` of each op, the errors their entry points raise, empty sequences, the
``_inference`` twins (the forward without the saved tensors) against the ops themselves and the
dispatch of gradient-free calls to them, FlopCounterMode, and ``torch.compile(fullgraph=True)``.
Tolerances against the reference in fp32: atol 2e-5, rtol 1e-4 (both sides sum the same
products in different orders).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import convlstm_fast
from convlstm_fast import VARIANTS, _extension, get_cell
from convlstm_fast.registry import GATE_ACTIVATIONS
from convlstm_fast.functional import convlstm_layer

pytestmark = pytest.mark.skipif(
    not _extension.extension_built(), reason="the compiled extension convlstm_fast._C is not built"
)


FP32_TOL = dict(atol=2e-5, rtol=1e-4)


def _load_ops():
    from convlstm_fast.backends import get_backend

    get_backend("cpu").load()


def make_params(variant, cin, hidden, k, dtype=torch.float32, seed=0):
    """Random parameters scaled so pre-activations are O(1) (both hard_sigmoid regions occur)."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    spec = get_cell(variant)
    for parameter in spec.parameters:
        shape = parameter.shape(cin, hidden, k)
        fan_in = 1 if len(shape) == 1 else int(torch.tensor(shape[1:]).prod())
        scale = 0.5 if parameter.is_bias else 1.5 / fan_in ** 0.5
        params.append((torch.randn(shape, generator=generator, dtype=torch.float64) * scale)
                      .to(dtype).requires_grad_())
    return params


def make_inputs(steps, batch, cin, hidden, height, width, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

    return (rand(steps, batch, cin, height, width), rand(batch, hidden, height, width),
            rand(batch, hidden, height, width))


def _run(backend, variant, x, h0, c0, params, gate_activation):
    out, (h_n, c_n) = convlstm_layer(x, params, variant, (h0, c0),
                                     gate_activation=gate_activation, backend=backend)
    return out, h_n, c_n


def test_compiled_extension_loads_when_built():
    module = convlstm_fast.load_extension()
    assert module.__name__ == "convlstm_fast._C"


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_input(variant):
    """The op takes a non-contiguous x (a transposed view: [T, B, Cin, W, H] storage read as
    [T, B, Cin, H, W]) and non-contiguous states, with the same results bit for bit."""
    _load_ops()
    forward = getattr(torch.ops.convlstm_fast, get_cell(variant).op)
    x, h0, c0, params = _op_args(variant)
    strided = x.transpose(3, 4).contiguous().transpose(3, 4)
    assert not strided.is_contiguous()
    # ... and non-contiguous initial states.
    h0_s, c0_s = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (h0, c0))
    assert not (h0_s.is_contiguous() or c0_s.is_contiguous())
    for got, want in zip(forward(strided, h0_s, c0_s, params, 0)[:3],
                         forward(x, h0, c0, params, 0)[:3]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(variant, gate_activation):
    x, h0, c0 = make_inputs(2, 2, 2, 3, 3, 4, dtype=torch.float64)
    params = make_params(variant, 2, 3, 3, dtype=torch.float64)

    def layer(x, h0, c0, *params):
        return _run("cpu", variant, x, h0, c0, list(params), gate_activation)

    assert torch.autograd.gradcheck(layer, (x, h0, c0, *params), eps=1e-6, atol=1e-5,
                                    rtol=1e-4, fast_mode=True)


def _op_args(variant, dtype=torch.float32):
    x, h0, c0 = (t.detach() for t in make_inputs(3, 3, 3, 4, 4, 5, dtype=dtype))
    params = [p.detach() for p in make_params(variant, 3, 4, 3, dtype=dtype)]
    return x, h0, c0, params


# The walks an op call can take (T = 3, B = 3): forwards or backwards, each with no lengths or
# with a full, a one-step and an empty sample masked inside the op.
WALKS = {"forward": (False, None), "reverse": (True, None),
         "ragged": (False, [3, 1, 0]), "ragged-reverse": (True, [3, 1, 0])}


def _walk_args(walk):
    reverse, lengths = WALKS[walk]
    return (reverse,) if lengths is None else (reverse, torch.tensor(lengths))


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(variant, walk):
    _load_ops()
    name = get_cell(variant).op
    x, h0, c0, params = _op_args(variant)
    forward = getattr(torch.ops.convlstm_fast, name).default
    torch.library.opcheck(forward, (x.requires_grad_(), h0.requires_grad_(), c0, params, 1,
                                    *_walk_args(walk)))
    x, h0 = x.detach(), h0.detach()
    output, h_n, c_n, saved = forward(x, h0, c0, params, 1, *_walk_args(walk))
    backward = getattr(torch.ops.convlstm_fast, name + "_backward").default
    grads = (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(backward, (*grads, x, h0, c0, params, output, saved, 1,
                                     *_walk_args(walk)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64_lengths_inside_the_op(variant, reverse):
    """The op itself with ``lengths`` (masked inside its loop: zero outputs and carried states
    past each sample's end, a reverse walk starting at each sample's last valid step):
    float64 gradcheck of every input, and the values against the reference layer with the same
    lengths."""
    from convlstm_fast.reference import cells

    _load_ops()
    spec = get_cell(variant)
    x, h0, c0 = make_inputs(4, 4, 2, 3, 3, 4, dtype=torch.float64)
    params = make_params(variant, 2, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 0, 2])
    forward = getattr(torch.ops.convlstm_fast, spec.op)

    def layer(x, h0, c0, *params):
        return forward(x, h0, c0, list(params), 0, reverse, lengths)[:3]

    want = cells.layer(variant, x, h0, c0, dict(zip(spec.parameter_names, params)), "sigmoid",
                       reverse=reverse, lengths=lengths)
    for got, expected in zip(layer(x, h0, c0, *params), want):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(layer, (x, h0, c0, *params), eps=1e-6, atol=1e-5,
                                    rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_errors_name_the_argument(variant):
    _load_ops()
    forward = getattr(torch.ops.convlstm_fast, get_cell(variant).op)
    x, h0, c0, params = _op_args(variant)
    bad = list(params)
    bad[2] = bad[2][:-1]
    name = get_cell(variant).parameter_names[2]
    with pytest.raises(RuntimeError, match=rf"params\[2\] \({name}\)"):
        forward(x, h0, c0, bad, 0)
    with pytest.raises(RuntimeError, match="c0 must have shape"):
        forward(x, h0, c0[:, :1], params, 0)
    with pytest.raises(RuntimeError, match="gate_activation"):
        forward(x, h0, c0, params, 2)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        forward(x.half(), h0, c0, params, 0)


def test_empty_sequence():
    _load_ops()
    x, h0, c0, params = _op_args("a")
    output, h_n, c_n, saved = torch.ops.convlstm_fast.pooled_layer(x[:0], h0, c0, params, 0)
    assert output.shape == (0, 3, 4, 4, 5)
    torch.testing.assert_close(h_n, h0)
    assert h_n.data_ptr() != h0.data_ptr()


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_op_equals_the_forward(variant, walk):
    """``<op>_inference`` runs the same kernel without keeping the saved tensors: the same
    output and final states, bit for bit (its step buffers reused in either walk); and opcheck
    (schema, fake tensors, AOT dispatch)."""
    _load_ops()
    name = get_cell(variant).op
    x, h0, c0, params = _op_args(variant)
    inference = getattr(torch.ops.convlstm_fast, name + "_inference").default
    want = getattr(torch.ops.convlstm_fast, name)(x, h0, c0, params, 1, *_walk_args(walk))[:3]
    got = inference(x, h0, c0, params, 1, *_walk_args(walk))
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch.library.opcheck(inference, (x, h0, c0, params, 1, *_walk_args(walk)),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", VARIANTS)
def test_calls_wanting_no_gradient_run_the_inference_op(variant):
    x, h0, c0 = (t.detach() for t in make_inputs(2, 2, 3, 4, 4, 5))
    params = [p.detach() for p in make_params(variant, 3, 4, 3)]
    name = "convlstm_fast::" + get_cell(variant).op

    def ops_of(x, params):
        with _OpRecorder() as recorder:
            out = _run("cpu", variant, x, h0, c0, params, "sigmoid")
        return recorder.ops, out

    with torch.no_grad():
        ops, out = ops_of(x, [p.requires_grad_() for p in params])
    assert name + "_inference" in ops and name not in ops
    want = _run("reference", variant, x, h0, c0, params, "sigmoid")
    for g, w in zip(out, want):
        torch.testing.assert_close(g, w.detach(), **FP32_TOL)
    ops, _ = ops_of(x, [p.detach() for p in params])  # grad mode on, nothing requires grad
    assert name + "_inference" in ops and name not in ops
    ops, _ = ops_of(x.requires_grad_(), [p.detach() for p in params])
    assert name in ops and name + "_inference" not in ops


def test_inference_flops_equal_the_forwards():
    """FlopCounterMode counts the inference op as the forward it is."""
    model = convlstm_fast.ConvLSTM(3, 4, kernel_size=3, variant="b", backend="cpu")
    x = torch.randn(2, 3, 3, 5, 6)
    with FlopCounterMode(display=False) as training:
        model(x)
    with torch.no_grad(), FlopCounterMode(display=False) as inference:
        model(x)
    assert inference.get_total_flops() == training.get_total_flops() > 0


def test_torch_compile_fullgraph_no_grad():
    torch.manual_seed(0)
    model = convlstm_fast.ConvLSTM(3, 4, kernel_size=3, variant="c", backend="cpu")
    x = torch.randn(2, 3, 3, 5, 6)
    with torch.no_grad():
        eager_out, (eager_h, eager_c) = model(x)
        out, (h_n, c_n) = torch.compile(model, fullgraph=True)(x)
    for got, want in ((out, eager_out), (h_n, eager_h), (c_n, eager_c)):
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_torch_compile_fullgraph():
    variant = "a"
    torch.manual_seed(0)
    model = convlstm_fast.ConvLSTM(3, 4, kernel_size=3, variant=variant, backend="cpu")
    x = torch.randn(2, 3, 3, 5, 6, requires_grad=True)
    eager_out, (eager_h, _) = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out, (h_n, _) = compiled(x)
    torch.testing.assert_close(out, eager_out, **FP32_TOL)
    torch.testing.assert_close(h_n, eager_h, **FP32_TOL)
    (grad_compiled,) = torch.autograd.grad(out.sum(), x)
    (grad_eager,) = torch.autograd.grad(eager_out.sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager, **FP32_TOL)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_batch_is_one_op_call(variant, reverse):
    """``lengths`` are masked inside the fused op: a ragged batch is one forward and one backward
    call over the steps its longest sample reaches (none past it), not a call per step."""
    x, h0, c0 = make_inputs(5, 3, 3, 4, 4, 5)
    params = make_params(variant, 3, 4, 3)
    name = "convlstm_fast::" + get_cell(variant).op
    with _OpRecorder() as recorder:
        out, (h_n, c_n) = convlstm_layer(x, params, variant, (h0, c0), backend="cpu",
                                         reverse=reverse, lengths=torch.tensor([4, 1, 3]))
        (out.sum() + h_n.sum() + c_n.sum()).backward()
    assert recorder.ops.count(name) == 1 and recorder.ops.count(name + "_backward") == 1
    assert out.shape[0] == 5 and out[4].abs().max() == 0
