"""``convlstm_fast::output_attention_layer_triton``: variant (d), one layer over a sequence.

Cell (c) of input_attention_layer with the roles of i and o swapped (SPEC "d"): the channel
attention map M = exp(Z − max_{h,w} Z) is the output gate, H_t = M∘tanh C_t, and the pooled FC
gives [i f] = σ(U_x x̄ + U_h h̄ + b_g) (saved as gate_preact ``[T, B, 2C]``). Every kernel and
the driver are _common's channel-attention ones, with ``output_gate=True``.
"""

from __future__ import annotations

from ._common import CHANNEL_ATTENTION_LAUNCHES, channel_attention_op, channel_attention_traffic

output_attention_layer_forward, output_attention_layer_backward = channel_attention_op(
    "output_attention_layer", output_gate=True)
LAUNCHES_PER_STEP = CHANNEL_ATTENTION_LAUNCHES
traffic = channel_attention_traffic  # the bytes and FLOPs of c and d are the same
