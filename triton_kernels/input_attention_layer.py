"""``convlstm_fast::input_attention_layer_triton``: variant (c), one layer over a sequence.

    A = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a)                      (SPEC c, eq. 21)
    Z = SepConv_z(A);   M = exp(Z − max_{h,w} Z)   per sample and channel       (eqs. 22-23)
    i = M,  [f o] = σ(U_x x̄ + U_h h̄ + b_g)
    G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c);  C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh C_t

Every kernel and the forward/backward driver are shared with output_attention_layer (d): they
are _common's channel-attention ones (launches and saved tensors described there), with
``output_gate=False``. Forward: ``(output, h_n, c_n, [cell, candidate, gate_preact [T, B, 2C]
(f, o), attention])``.
"""

from __future__ import annotations

from ._common import CHANNEL_ATTENTION_LAUNCHES, channel_attention_op, channel_attention_traffic

input_attention_layer_forward, input_attention_layer_backward = channel_attention_op(
    "input_attention_layer", output_gate=False)
LAUNCHES_PER_STEP = CHANNEL_ATTENTION_LAUNCHES
traffic = channel_attention_traffic  # the bytes and FLOPs of c and d are the same
