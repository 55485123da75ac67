"""Fused Triton kernels of the recurrent step, installed as ``convlstm_fast.triton_kernels``.

Importing this package declares the ``convlstm_fast::<op>_triton`` ops of every cell whose
registry entry has a triton kernel and registers their kernels (CUDA; CPU too, for
TRITON_INTERPRET=1), autograd and fake tensors. ``IMPLEMENTED`` lists those cells.
"""

from __future__ import annotations

import contextlib

import torch

from convlstm_fast.ops.registration import register_all

from ._common import INTERPRETED
from .convlstm_layer import convlstm_layer_backward, convlstm_layer_forward
from .input_attention_layer import input_attention_layer_backward, input_attention_layer_forward
from .output_attention_layer import output_attention_layer_backward, output_attention_layer_forward
from .pooled_layer import pooled_layer_backward, pooled_layer_forward
from .spatial_attention_layer import (spatial_attention_layer_backward,
                                      spatial_attention_layer_forward)

# op name -> (forward, backward): one file per op, named after it (shared kernels: _common).
_KERNELS = {
    "convlstm_layer": (convlstm_layer_forward, convlstm_layer_backward),
    "pooled_layer": (pooled_layer_forward, pooled_layer_backward),
    "spatial_attention_layer": (spatial_attention_layer_forward, spatial_attention_layer_backward),
    "input_attention_layer": (input_attention_layer_forward, input_attention_layer_backward),
    "output_attention_layer": (output_attention_layer_forward, output_attention_layer_backward),
}

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


# The cells whose registry entries name a triton kernel, wired (once) to these implementations.
IMPLEMENTED = tuple(register_all("triton", {
    op: (_on_device(forward, f"convlstm_fast::{op}_triton", 0),
         _on_device(backward, f"convlstm_fast::{op}_triton_backward", 3))
    for op, (forward, backward) in _KERNELS.items()}))
