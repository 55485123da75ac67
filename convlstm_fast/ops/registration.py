"""Autograd, fake tensors and flop formulas for the layer ops — wired once for every backend.

Every kernel backend exposes, per cell, two ops with the same schemas (KERNELS.md "The unit of an
op": one layer over a whole sequence):

    <name>(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int gate_activation,
           bool reverse=False, Tensor? lengths=None)
        -> (Tensor output, Tensor h_n, Tensor c_n, Tensor[] saved)
    <name>_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0,
                    Tensor c0, Tensor[] params, Tensor output, Tensor[] saved, int gate_activation,
                    bool reverse=False, Tensor? lengths=None)
        -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)

``x`` is time-first ``[T, B, Cin, H, W]`` with any strides — ConvLSTM passes the time-first view
of its batch-first input, which a kernel reads in place (or one step's frame at a time), so that
what autograd saves is the caller's own x —, ``h0``/``c0`` and ``h_n``/``c_n`` ``[B, C, H, W]``,
``output`` ``[T, B, C, H, W]``, ``output`` and ``grad_x`` contiguous; ``params`` follow the
order of the cell's registry entry;
``gate_activation`` is an index into ``registry.GATE_ACTIVATIONS``. ``reverse`` walks the steps
t = T − 1 … 0 inside the kernel's loop (the reverse direction of a bidirectional layer): step t
then starts from step t + 1's state (``h0``/``c0`` at t = T − 1), ``output[t]`` is still the
state after step t, ``(h_n, c_n)`` are step 0's, and every per-step tensor (x, output, saved,
gradients) stays indexed by time. ``lengths`` (int64 ``[B]`` on x's device, each in [0, T]; the
caller checks them) masks inside the kernel's loop: step t of sample b counts iff
t < lengths[b]. A step that counts starts from the previous step's state when that one counted
too, else from ``h0``/``c0`` (the reverse walk's first valid step, t = lengths[b] − 1); one that
does not writes a zero ``output[t][b]`` and leaves the sample's state as it was; ``(h_n, c_n)``
are each sample's state after its own last valid step (``h0``/``c0`` for length 0). In backward
a step that does not count passes dH and dC through untouched and adds nothing to any gradient
(``grad_output[t][b]`` there is ignored). What a kernel keeps in ``saved`` at a step that does
not count is its own affair, as long as its backward never reads anything non-finite from it.
``saved`` is whatever the
kernel keeps for its backward (shapes and dtypes declared per layout in the registry entry's
``saved``); the gradients that arrive for it are ignored. Native ops (``convlstm_fast::<op>``)
are declared in C++ (csrc/convlstm_fast.cpp); Triton ops (``convlstm_fast::<op>_triton``) are
declared from Python with :func:`define_layer_ops`. :func:`register_all` then wires every
registered cell's op of a backend family, once.

The numeric contract every kernel keeps, whatever its backend (the reference defines it):
- ``hard_sigmoid(x)`` is 0 for x < −2.5, 1 for x > 2.5 and 0.2·x + 0.5 in between, the pieces
  chosen on ``x`` itself; its derivative is 0.2 on the closed interval −2.5 ≤ x ≤ 2.5, else 0;
- tanh and sigmoid are accurate to a few ulps *relative* at every magnitude, tiny activations
  included (no 1 − e cancellation near 0); so are their derivatives where the kernel keeps the
  pre-activation, and otherwise (1 − t², s·(1 − s) from the output, as the reference's autograd)
  they are as accurate as the reference's;
- NaN propagates: a NaN in a sample makes that sample's results NaN as the reference's do (the
  max of c/d's attention logits, clamps and activations keep NaN) and never reaches another
  sample;
- accumulation in fp32 (fp64 for fp64 inputs), deterministic (no unordered atomics);
- a weight gradient over the steps is, in fp32, a sum of per-step sums (each over one step's
  B·H·W positions), as the reference's autograd adds up its per-step cells' gradients: one
  product over all T·B·H·W positions is measurably less accurate at long sequences
  (tests/test_backends.py's "long" case; csrc/cuda/layer_common.cuh ``steps_mm``,
  triton_kernels/_weight_grads.py).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from ..registry import GATE_ACTIVATIONS, CellSpec, cell_names, get_cell

LAYER_SCHEMA = (
    "(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int gate_activation,"
    " bool reverse=False, Tensor? lengths=None)"
    " -> (Tensor output, Tensor h_n, Tensor c_n, Tensor[] saved)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0,"
    " Tensor[] params, Tensor output, Tensor[] saved, int gate_activation,"
    " bool reverse=False, Tensor? lengths=None)"
    " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)"
)

# The forward without the saved tensors (a native op's ``<name>_inference`` twin).
INFERENCE_SUFFIX = "_inference"
INFERENCE_SCHEMA = (
    "(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int gate_activation,"
    " bool reverse=False, Tensor? lengths=None) -> (Tensor output, Tensor h_n, Tensor c_n)"
)

# (shape, dtype) of each saved tensor, from the forward's inputs: (x, h0, params) -> list.
SavedSpec = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], list]

_LIBRARY = torch.library.Library("convlstm_fast", "FRAGMENT")


def define_layer_ops(name: str) -> None:
    """Declare ``convlstm_fast::<name>`` and ``<name>_backward`` from Python (Triton ops)."""
    _LIBRARY.define(name + LAYER_SCHEMA)
    _LIBRARY.define(name + "_backward" + BACKWARD_SCHEMA)


def gate_activation_code(gate_activation: str) -> int:
    return GATE_ACTIVATIONS.index(gate_activation)


def _layer_fake(x, h0, c0, params, gate_activation, reverse=False, lengths=None, *,
                saved_spec: SavedSpec):
    steps, hidden = x.shape[0], h0.shape[1]
    output = x.new_empty((steps, *h0.shape[:1], hidden, *h0.shape[2:]), dtype=h0.dtype)
    saved = [x.new_empty(shape, dtype=dtype) for shape, dtype in saved_spec(x, h0, params)]
    return output, torch.empty_like(h0), torch.empty_like(c0), saved


def _backward_fake(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                   gate_activation, reverse=False, lengths=None):
    return (x.new_empty(x.shape), torch.empty_like(h0), torch.empty_like(c0),
            [torch.empty_like(p) for p in params])


def _setup_context(ctx, inputs, output):
    x, h0, c0, params, gate_activation, *rest = inputs
    out, _, _, saved = output
    ctx.save_for_backward(x, h0, c0, out, *params, *saved)
    # Gradients that never arrive (the saved tensors' always; h_n's or c_n's when unused) stay
    # None instead of being materialised as zero tensors the size of the sequence: the backward
    # makes the small zeros it needs itself.
    ctx.set_materialize_grads(False)
    ctx.num_params = len(params)
    ctx.gate_activation = gate_activation
    # reverse and lengths, when the inputs carry them (torch fills in the schema's defaults, or
    # an older one may hand over only the arguments given).
    ctx.reverse = bool(rest[0]) if rest else False
    ctx.lengths = rest[1] if len(rest) > 1 else None


def _double_backward_error(ctx, *grads):
    raise RuntimeError(
        "convlstm_fast: double backward (create_graph=True through the backward of a fused "
        "layer op) is not supported; use backend='reference' for higher-order gradients"
    )


def _layer_mult_adds(spec: CellSpec, x_shape, h0_shape, params_shapes) -> int:
    steps, batch, cin, height, width = x_shape
    by_name = dict(zip(spec.parameter_names, params_shapes))
    kernel = by_name[spec.kernel_of][-1] if spec.kernel_of else 1
    return steps * batch * spec.mult_adds(cin, h0_shape[1], kernel, height, width)


def _flop_formulas(spec: CellSpec):
    """FLOPs = 2 · MACs. The backward is counted as twice the forward's work (the gradients of
    the inputs and of the weights), as FlopCounterMode counts the reference's convolutions."""

    def forward(x_shape, h0_shape, c0_shape, params_shapes, *args, **kwargs) -> int:
        return 2 * _layer_mult_adds(spec, x_shape, h0_shape, params_shapes)

    def backward(grad_output_shape, grad_h_n_shape, grad_c_n_shape, x_shape, h0_shape, c0_shape,
                 params_shapes, *args, **kwargs) -> int:
        return 4 * _layer_mult_adds(spec, x_shape, h0_shape, params_shapes)

    return forward, backward


def register_layer_op(qualname: str, spec: CellSpec, saved_spec: SavedSpec) -> None:
    """Register fake tensors, autograd and flop formulas for ``qualname`` and its backward.

    ``qualname`` is ``"convlstm_fast::<name>"`` with ``<name>_backward`` beside it; the kernels
    themselves are registered by the backend (TORCH_LIBRARY_IMPL in C++, or torch.library.impl).
    """
    backward_qualname = qualname + "_backward"
    namespace, name = qualname.split("::")
    ops = getattr(torch.ops, namespace)
    backward_op = getattr(ops, name + "_backward")

    def fake(x, h0, c0, params, gate_activation, reverse=False, lengths=None):
        return _layer_fake(x, h0, c0, params, gate_activation, saved_spec=saved_spec)

    def backward(ctx, grad_output, grad_h_n, grad_c_n, grad_saved):
        x, h0, c0, out, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.num_params], rest[ctx.num_params:]
        grad_output = torch.zeros_like(out) if grad_output is None else grad_output.contiguous()
        grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n.contiguous()
        grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n.contiguous()
        grad_x, grad_h0, grad_c0, grad_params = backward_op(
            grad_output, grad_h_n, grad_c_n, x, h0, c0, list(params), out, list(saved),
            ctx.gate_activation, ctx.reverse, ctx.lengths,
        )
        grads = (grad_x, grad_h0, grad_c0, list(grad_params), None, None, None)
        # One slot per argument the op was applied with: torch 2.6 leaves out trailing arguments
        # equal to their defaults (reverse=False, lengths=None) although setup_context sees them
        # filled in, newer torch versions keep them; needs_input_grad has one entry per argument
        # either way.
        return grads[:len(ctx.needs_input_grad)]

    torch.library.register_fake(qualname)(fake)
    torch.library.register_fake(backward_qualname)(_backward_fake)
    torch.library.register_autograd(qualname, backward, setup_context=_setup_context)
    torch.library.register_autograd(
        backward_qualname, _double_backward_error, setup_context=lambda ctx, inputs, output: None
    )
    forward_flops, backward_flops = _flop_formulas(spec)
    register_flop_formula(getattr(ops, name))(forward_flops)
    register_flop_formula(backward_op)(backward_flops)


def register_inference_op(qualname: str, spec: CellSpec) -> None:
    """Register the fake tensors and flop formula of ``qualname`` (``<name>_inference``): the
    forward without the saved tensors, ``-> (output, h_n, c_n)``, for calls that want no
    gradient. It has no autograd; :meth:`OpBackend.run_layer` calls it only when no input needs
    a gradient."""
    namespace, name = qualname.split("::")

    def fake(x, h0, c0, params, gate_activation, reverse=False, lengths=None):
        output, h_n, c_n, _ = _layer_fake(x, h0, c0, params, gate_activation,
                                          saved_spec=lambda *args: [])
        return output, h_n, c_n

    torch.library.register_fake(qualname)(fake)
    register_flop_formula(getattr(getattr(torch.ops, namespace), name))(_flop_formulas(spec)[0])


_WIRED: set[str] = set()


def register_all(family: str, implementations: Mapping[str, tuple] | None = None) -> list[str]:
    """Wire autograd, fake tensors and flop formulas of every registered cell that has a kernel
    in ``family``, once per op; returns the cells wired.

    ``family="native"``: the ops ``convlstm_fast::<op>`` and their ``<op>_inference`` twins of
    the compiled extension (declared in C++), one registration for the CPU and CUDA kernels —
    the fake tensors follow the saved layout of the tensors' device (the spec's ``kernels``).
    ``family="triton"``: declares ``convlstm_fast::<op>_triton`` and ``_backward`` and registers
    ``implementations[op] = (forward_impl, backward_impl)`` for the CUDA and CPU (interpreter)
    dispatch keys."""
    devices = ("cpu", "cuda") if family == "native" else ("triton",)
    wired = []
    for name in cell_names():
        spec = get_cell(name)
        if not any(device in spec.kernels for device in devices):
            continue
        wired.append(name)
        qualname = "convlstm_fast::" + spec.op + ("_triton" if family == "triton" else "")
        if qualname in _WIRED or (family == "triton"
                                  and hasattr(torch.ops.convlstm_fast, qualname.split("::")[1])):
            continue  # wired already (e.g. by an earlier import of the Triton package)
        if family == "triton":
            forward, backward = implementations[spec.op]
            define_layer_ops(qualname.split("::")[1])
            for key in ("CUDA", "CPU"):
                torch.library.impl(qualname, key)(forward)
                torch.library.impl(qualname + "_backward", key)(backward)
            register_layer_op(qualname, spec, spec.saved_spec("triton"))
        else:
            register_layer_op(qualname, spec, _native_saved_spec(spec))
            register_inference_op(qualname + INFERENCE_SUFFIX, spec)
        _WIRED.add(qualname)
    return wired


def _native_saved_spec(spec: CellSpec) -> SavedSpec:
    """One fake registration serves a native op's CPU and CUDA kernels: the saved layout is the
    one the kernel of the tensors' device keeps (a device without a kernel of its own, e.g.
    "meta", takes the CUDA kernel's)."""

    def saved(x, h0, params):
        layout = spec.kernels.get(x.device.type, spec.kernels.get("cuda"))
        return spec.saved[layout](x, h0, params)

    return saved
