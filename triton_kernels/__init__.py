"""Fused Triton kernels of the recurrent step, installed as ``convlstm_fast.triton_kernels``.

Importing this package declares the ``convlstm_fast::<op>_triton`` ops of every cell whose
registry entry has a triton kernel and registers their kernels (CUDA; CPU too, for
TRITON_INTERPRET=1), autograd and fake tensors. ``IMPLEMENTED`` lists those cells.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from convlstm_fast.ops.registration import register_all
from convlstm_fast.registry import cell_names, get_cell

from ._common import INTERPRETED


def _op_modules() -> dict:
    """op name -> its module, ``triton_kernels/<op>.py`` (which defines ``<op>_forward`` and
    ``<op>_backward``), for every cell whose registry entry names a triton kernel: one file per
    op, named after it, and nothing else to list (shared kernels: _common)."""
    ops = dict.fromkeys(get_cell(name).op for name in cell_names()
                        if "triton" in get_cell(name).kernels)
    return {op: importlib.import_module(f".{op}", __name__) for op in ops}


OP_MODULES = _op_modules()
_KERNELS = {op: (getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward"))
            for op, module in OP_MODULES.items()}

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
