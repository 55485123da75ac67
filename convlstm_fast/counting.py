"""Parameter and Mult-Add counts (the paper's Table 1 and the full network's cost).

Mult-Adds are measured, not written per layer: :func:`count_mult_adds` runs the module under
``torch.utils.flop_counter.FlopCounterMode`` (1 MAC = 2 FLOPs), which counts convolutions and
matrix products of any model, and the project's fused ops through the flop formulas registered
for them (ops/registration.py), so every backend counts the same.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import is_bias_name


def count_parameters(module: nn.Module, include_bias: bool = True) -> int:
    """Number of parameter elements; with ``include_bias=False`` the cells' biases (the
    parameters their registry entries mark as such) are left out (the paper's Params column
    counts weights only)."""
    return sum(
        p.numel()
        for name, p in module.named_parameters()
        if include_bias or not is_bias_name(name)
    )


def count_mult_adds(module: nn.Module, *inputs, **kwargs) -> int:
    """Multiply-accumulates of one forward call ``module(*inputs, **kwargs)``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return counter.get_total_flops() // 2


def paper_mult_adds(cell: nn.Module, height: int, width: int) -> int:
    """The paper's Mult-Adds convention for a cell: weights (no biases) × H·W (SPEC Table 1)."""
    return count_parameters(cell, include_bias=False) * height * width
