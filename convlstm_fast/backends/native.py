"""The native backends ``"cpu"`` and ``"cuda"``: fused C++ / CUDA kernels in ``convlstm_fast._C``.

The schemas are declared in csrc/convlstm_fast.cpp; the kernels register themselves with
TORCH_LIBRARY_IMPL; autograd, fake tensors and flop formulas are wired here, once, through
:func:`convlstm_fast.ops.registration.register_layer_op`.
"""

from __future__ import annotations

import torch

from .. import variants
from .._extension import load_extension
from ..ops.registration import register_inference_op, register_layer_op
from . import INFERENCE_SUFFIX, OpBackend


# (variant, device type) whose native kernel saves its state tensors NCHW, [T, B, C, H, W],
# instead of channels-last: the CPU kernels of the pooled variants work in the op's own NCHW layout.
NCHW_SAVED = {("a", "cpu"), ("b", "cpu"), ("c", "cpu"), ("d", "cpu")}


def _saved_spec(gate_channels: int, attention: str | None, nchw_devices=frozenset()):
    """What the native forwards save for backward, in the input's dtype:
    ``cell [T, B, H, W, C]`` (C_t of every step), ``candidate [T, B, H, W, C]`` (G = tanh(...)),
    ``gate_preact [T, B, n·C]`` (pooled-gate pre-activations), plus the attention map when the
    cell has one: ``[T, B, H, W]`` (b, the softmax A) or a state tensor (c/d, exp(Z − max)).
    The attention features and depthwise outputs are recomputed in backward, not saved. What is
    saved is private to the kernel that wrote it (only its own backward reads it): the state
    tensors are channels-last except on ``nchw_devices``, where the kernel keeps them NCHW
    (``[T, B, C, H, W]``, the same values permuted)."""

    def spec(x, h0, params):
        steps, batch, _, height, width = x.shape
        hidden = h0.shape[1]
        if x.device.type in nchw_devices:
            state = (steps, batch, hidden, height, width)
        else:
            state = (steps, batch, height, width, hidden)
        out = [(state, x.dtype), (state, x.dtype), ((steps, batch, gate_channels * hidden), x.dtype)]
        if attention == "spatial":
            out.append(((steps, batch, height, width), x.dtype))
        elif attention == "channel":
            out.append((state, x.dtype))
        return out

    return spec


def _convlstm_saved_spec(x, h0, params):
    """Original ConvLSTM: ``cell [T, B, H, W, C]`` and the gate pre-activations
    ``gates [T, B, H, W, 4C]`` (order i, f, g, o) — 5 state tensors per step."""
    steps, batch, _, height, width = x.shape
    hidden = h0.shape[1]
    return [((steps, batch, height, width, hidden), x.dtype),
            ((steps, batch, height, width, 4 * hidden), x.dtype)]


# (shape, dtype) of the tensors a forward returns as ``saved``, in the channels-last layout the
# CUDA and Triton kernels share. Whether a device has a kernel for an op is asked of the
# dispatcher (OpBackend.unsupported_reason).
SAVED_SPECS = {
    "convlstm": _convlstm_saved_spec,
    "a": _saved_spec(3, None),
    "b": _saved_spec(3, "spatial"),
    "c": _saved_spec(2, "channel"),
    "d": _saved_spec(2, "channel"),
}


def _nchw_devices(variant):
    return {device for name, device in NCHW_SAVED if name == variant}


# The native ops' (one fake registration serves their CPU and CUDA kernels): as SAVED_SPECS,
# with the state tensors NCHW on the devices NCHW_SAVED names.
NATIVE_SAVED_SPECS = {
    **SAVED_SPECS,
    "a": _saved_spec(3, None, _nchw_devices("a")),
    "b": _saved_spec(3, "spatial", _nchw_devices("b")),
    "c": _saved_spec(2, "channel", _nchw_devices("c")),
    "d": _saved_spec(2, "channel", _nchw_devices("d")),
}

_registered: set[str] = set()


def _register_ops() -> None:
    for variant, spec in NATIVE_SAVED_SPECS.items():
        qualname = "convlstm_fast::" + variants.OP_NAMES[variant]
        if qualname not in _registered:
            register_layer_op(qualname, variant, spec)
            register_inference_op(qualname + INFERENCE_SUFFIX, variant)
            _registered.add(qualname)


class NativeBackend(OpBackend):
    def load(self) -> None:
        load_extension()
        _register_ops()

    def unsupported_reason(self, variant, x):
        reason = super().unsupported_reason(variant, x)
        if reason is None and variant not in NATIVE_SAVED_SPECS:
            return f"backend {self.name!r} has no autograd wiring for variant {variant!r}"
        return reason


BACKENDS = {
    "cpu": NativeBackend("cpu", "", "CPU", "cpu", (torch.float32, torch.float64)),
    "cuda": NativeBackend("cuda", "", "CUDA", "cuda", (torch.float32, torch.float16, torch.bfloat16)),
}
