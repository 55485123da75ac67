"""Fused Triton kernels of the recurrent step, installed as ``convlstm_fast.triton_kernels``.

Importing this package declares the ``convlstm_fast::<name>_triton`` ops and registers their
kernels (CUDA; CPU too, for TRITON_INTERPRET=1), autograd and fake tensors. ``IMPLEMENTED``
lists the variants whose ops exist.
"""

from __future__ import annotations

import contextlib

import torch

from convlstm_fast import variants
from convlstm_fast.backends.native import SAVED_SPECS
from convlstm_fast.ops.registration import define_layer_ops, register_layer_op

from ._common import INTERPRETED
from .channel_attention_layer import (input_attention_layer_backward,
                                      input_attention_layer_forward,
                                      output_attention_layer_backward,
                                      output_attention_layer_forward)
from .convlstm_layer import convlstm_layer_backward, convlstm_layer_forward
from .pooled_layer import pooled_layer_backward, pooled_layer_forward
from .spatial_attention_layer import (spatial_attention_layer_backward,
                                      spatial_attention_layer_forward)

# variant -> (forward, backward): one file per op, named after it.
_KERNELS = {
    "convlstm": (convlstm_layer_forward, convlstm_layer_backward),
    "a": (pooled_layer_forward, pooled_layer_backward),
    "b": (spatial_attention_layer_forward, spatial_attention_layer_backward),
    "c": (input_attention_layer_forward, input_attention_layer_backward),
    "d": (output_attention_layer_forward, output_attention_layer_backward),
}
IMPLEMENTED = tuple(_KERNELS)

__all__ = ["IMPLEMENTED", "INTERPRETED"]


def _check_device(x: torch.Tensor, name: str) -> None:
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{name}: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before "
            "triton is imported); use backend='cpu' or 'reference' for CPU tensors")


def _on_device(fn, name: str, x_index: int):
    """``fn`` run on the device of its argument ``x_index``: Triton launches (and allocations
    without a device) go to the *current* CUDA device, so a model on cuda:1 needs cuda:1 made
    current around them."""
    def run(*args):
        x = args[x_index]
        _check_device(x, name)
        with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
            return fn(*args)

    run.__name__ = fn.__name__
    return run


def _register(variant: str) -> None:
    forward, backward = _KERNELS[variant]
    name = variants.OP_NAMES[variant] + "_triton"
    qualname = "convlstm_fast::" + name
    if hasattr(torch.ops.convlstm_fast, name):  # already declared (module re-imported)
        return
    define_layer_ops(name)
    for key in ("CUDA", "CPU"):
        torch.library.impl(qualname, key)(_on_device(forward, qualname, 0))
        torch.library.impl(qualname + "_backward", key)(
            _on_device(backward, qualname + "_backward", 3))
    register_layer_op(qualname, variant, SAVED_SPECS[variant])


for _variant in IMPLEMENTED:
    _register(_variant)
