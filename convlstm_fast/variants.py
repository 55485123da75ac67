"""Transitional: the old per-variant helpers, now answered by :mod:`convlstm_fast.registry`."""

from __future__ import annotations

from .registry import (BUILTIN as VARIANTS, GATE_ACTIVATIONS, check_gate_activation,
                       check_kernel_size, check_variant, get_cell)

OP_NAMES = {name: get_cell(name).op for name in VARIANTS}


def parameter_shapes(variant, in_channels, hidden_channels, kernel_size):
    return get_cell(variant).parameter_shapes(in_channels, hidden_channels, kernel_size)


def parameter_names(variant):
    return get_cell(variant).parameter_names


def is_bias(name):
    return name.endswith("bias")


def num_pooled_gates(variant):
    return {"convlstm": 0}.get(variant, len(get_cell(variant).gates.order))


def weight_count(variant, in_channels, hidden_channels, kernel_size):
    return get_cell(variant).weight_count(in_channels, hidden_channels, kernel_size)


def step_mult_adds(variant, in_channels, hidden_channels, kernel_size, height, width):
    return get_cell(variant).mult_adds(in_channels, hidden_channels, kernel_size, height, width)


__all__ = ["VARIANTS", "GATE_ACTIVATIONS", "check_gate_activation", "check_kernel_size",
           "check_variant", "OP_NAMES", "parameter_shapes", "parameter_names", "is_bias",
           "num_pooled_gates", "weight_count", "step_mult_adds"]
