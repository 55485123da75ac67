"""Converting weights from the usual single-kernel PyTorch ConvLSTM (SPEC "API notes").

Most PyTorch ConvLSTMs convolve the concatenation ``[X, H]`` with one ``[4C, Cin + C, K, K]``
kernel. In this project's layout ``weight_x`` and ``weight_h`` are its two slices along the
input-channel axis; the four output blocks are reordered to i, f, g, o.
"""

from __future__ import annotations

import torch

GATE_ORDER = "ifgo"


def from_concat_conv(weight: torch.Tensor, bias: torch.Tensor | None, in_channels: int,
                     gate_order: str = "ifog") -> dict[str, torch.Tensor]:
    """State dict of a ``ConvLSTMCell(variant="convlstm")`` from a concatenated-input kernel.

    Args:
        weight (Tensor[4C, Cin + C, K, K]): the kernel over ``cat([x, h], dim=1)``.
        bias (Tensor[4C] or None): its bias (``None`` gives zeros).
        in_channels: Cin, the number of leading input channels that belong to ``x``.
        gate_order: the order of the four output blocks in ``weight``, a permutation of
            ``"ifgo"`` (``"ifog"`` is the most common in PyTorch code).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("weight must be a 4-D tensor [4C, Cin + C, K, K]")
    if weight.shape[0] % 4:
        raise ValueError(f"weight's first dim must be 4·C, got {weight.shape[0]}")
    hidden = weight.shape[0] // 4
    if weight.shape[1] != in_channels + hidden:
        raise ValueError(
            f"weight's second dim must be in_channels + C = {in_channels} + {hidden}, "
            f"got {weight.shape[1]}"
        )
    if sorted(gate_order) != sorted(GATE_ORDER):
        raise ValueError(f"gate_order must be a permutation of {GATE_ORDER!r}, got {gate_order!r}")
    if bias is None:
        bias = weight.new_zeros(4 * hidden)
    if tuple(bias.shape) != (4 * hidden,):
        raise ValueError(f"bias must have shape ({4 * hidden},), got {tuple(bias.shape)}")
    order = [gate_order.index(gate) for gate in GATE_ORDER]
    blocks = weight.reshape(4, hidden, *weight.shape[1:])[order].reshape_as(weight)
    bias = bias.reshape(4, hidden)[order].reshape(-1)
    return {
        "weight_x": blocks[:, :in_channels].contiguous(),
        "weight_h": blocks[:, in_channels:].contiguous(),
        "bias": bias.contiguous(),
    }
