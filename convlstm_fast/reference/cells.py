"""The five cells, one recurrent step each, written straight from shared/SPEC.md.

This is the oracle every backend is tested against: the simplest correct PyTorch, never
"optimised". Tensors are NCHW: ``x [B, Cin, H, W]``, ``h``, ``c`` ``[B, C, H, W]``; ``params`` maps
the SPEC parameter names to tensors. ``record``, when given, receives the attention maps (variants
b, c, d) and the pooled gates, for visualisation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]
Record = dict[str, torch.Tensor]


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The reference code's gate activation: clamp(0.2·x + 0.5, 0, 1) (not torch's x/6 form).

    The numeric contract every backend follows (ops/registration.py): the pieces are chosen on
    ``x`` itself — 0 for x < −2.5, 1 for x > 2.5, 0.2·x + 0.5 in between — never on the rounded
    0.2·x + 0.5, whose sign at x = −2.5 depends on whether a compiler contracts it into an FMA.
    So the derivative is 0.2 on the closed interval −2.5 ≤ x ≤ 2.5 and 0 outside, and NaN stays
    NaN (a clamp through min/max would turn it into 0 or 1)."""
    inner = 0.2 * x + 0.5
    return torch.where(x < -2.5, 0.0, torch.where(x > 2.5, 1.0, inner))


def gate_activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"sigmoid": torch.sigmoid, "hard_sigmoid": hard_sigmoid}[name]


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """GAP over H and W: ``[B, C, H, W] -> [B, C]``."""
    return x.mean(dim=(-2, -1))


def same_conv2d(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """K×K convolution with 'same' padding K // 2, no bias."""
    return F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=groups)


def sepconv(x: torch.Tensor, depthwise: torch.Tensor, pointwise: torch.Tensor) -> torch.Tensor:
    """SepConv: depthwise K×K (``[Cin, 1, K, K]``) then pointwise 1×1 (``[Cout, Cin]``), no bias."""
    y = same_conv2d(x, depthwise, groups=x.shape[1])
    return torch.einsum("oc,bchw->bohw", pointwise, y)


def pooled_gates(
    x: torch.Tensor, h: torch.Tensor, params: Params, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """act(U_x·GAP(X) + U_h·GAP(H) + b_g) -> ``[B, n·C]`` (eqs. 10-12)."""
    z = F.linear(global_average_pool(x), params["gate_weight_x"])
    z = z + F.linear(global_average_pool(h), params["gate_weight_h"], params["gate_bias"])
    return act(z)


def channel_attention(z: torch.Tensor) -> torch.Tensor:
    """exp(Z − max_{h,w} Z) per sample and channel (eq. 23; the overflow-free form, SPEC c)."""
    return torch.exp(z - z.amax(dim=(-2, -1), keepdim=True))


def spatial_attention(z: torch.Tensor) -> torch.Tensor:
    """Softmax of ``z [B, 1, H, W]`` over all H·W positions, per sample (eq. 18)."""
    b, _, height, width = z.shape
    return torch.softmax(z.reshape(b, -1), dim=1).reshape(b, 1, height, width)


def _bias_map(bias: torch.Tensor) -> torch.Tensor:
    return bias[:, None, None]


def _cell_update(i, f, o, candidate, c):
    """C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t) (eqs. 5-6, 14-15)."""
    c_next = f * c + i * candidate
    return o * torch.tanh(c_next), c_next


def convlstm_step(x, h, c, params: Params, gate_activation: str, record: Record | None = None):
    """Original ConvLSTM (eqs. 1-6): [i f g o] = W_x * X + W_h * H + b."""
    act = gate_activation_fn(gate_activation)
    z = same_conv2d(x, params["weight_x"]) + same_conv2d(h, params["weight_h"])
    z = z + _bias_map(params["bias"])
    i, f, g, o = z.chunk(4, dim=1)
    return _cell_update(act(i), act(f), act(o), torch.tanh(g), c)


def _candidate(x, h, params: Params) -> torch.Tensor:
    """G = tanh(SepConv_x(X) + SepConv_h(H) + b_c) (eq. 13)."""
    z = sepconv(x, params["cand_dw_x"], params["cand_pw_x"])
    z = z + sepconv(h, params["cand_dw_h"], params["cand_pw_h"])
    return torch.tanh(z + _bias_map(params["cand_bias"]))


def _attention_features(x, h, params: Params) -> torch.Tensor:
    """tanh(SepConv_xa(X) + SepConv_ha(H) + b_a): the first stage of the b, c and d attention."""
    z = sepconv(x, params["att_dw_x"], params["att_pw_x"])
    z = z + sepconv(h, params["att_dw_h"], params["att_pw_h"])
    return torch.tanh(z + _bias_map(params["att_bias"]))


def pooled_step(x, h, c, params: Params, gate_activation: str, record: Record | None = None):
    """Variant (a), eqs. 8-15: pooled-FC gates i, f, o broadcast over H, W; SepConv candidate."""
    gates = pooled_gates(x, h, params, gate_activation_fn(gate_activation))
    i, f, o = (g[:, :, None, None] for g in gates.chunk(3, dim=1))
    if record is not None:
        record["gates"] = gates
    return _cell_update(i, f, o, _candidate(x, h, params), c)


def spatial_attention_step(
    x, h, c, params: Params, gate_activation: str, record: Record | None = None
):
    """Variant (b), eqs. 17-19: X̃ = softmax_HW(W_z * features) ∘ X, then (a) on X̃."""
    z = same_conv2d(_attention_features(x, h, params), params["att_weight_z"])
    attention = spatial_attention(z)
    if record is not None:
        record["attention"] = attention
    return pooled_step(attention * x, h, c, params, gate_activation, record)


def _channel_attention_step(x, h, c, params: Params, gate_activation: str, attention_gate: str,
                            record: Record | None):
    """Variants (c)/(d), eqs. 21-23: one gate becomes exp(Z − max Z) with
    Z = SepConv_z(features); the other two come from the pooled FC."""
    z = sepconv(_attention_features(x, h, params), params["att_dw_z"], params["att_pw_z"])
    attention = channel_attention(z)
    gates = pooled_gates(x, h, params, gate_activation_fn(gate_activation))
    first, second = (g[:, :, None, None] for g in gates.chunk(2, dim=1))
    if record is not None:
        record["attention"] = attention
        record["gates"] = gates
    if attention_gate == "input":
        i, f, o = attention, first, second
    else:
        i, f, o = first, second, attention
    return _cell_update(i, f, o, _candidate(x, h, params), c)


def input_attention_step(x, h, c, params: Params, gate_activation: str,
                         record: Record | None = None):
    """Variant (c): the input gate is the attention map; [f o] from the pooled FC."""
    return _channel_attention_step(x, h, c, params, gate_activation, "input", record)


def output_attention_step(x, h, c, params: Params, gate_activation: str,
                          record: Record | None = None):
    """Variant (d): the output gate is the attention map; [i f] from the pooled FC."""
    return _channel_attention_step(x, h, c, params, gate_activation, "output", record)


def step(variant: str, x, h, c, params: Params, gate_activation: str = "sigmoid",
         record: Record | None = None):
    """One step of ``variant`` (any registered cell: its spec's ``step``): ``(h_next, c_next)``."""
    from ..registry import get_cell

    return get_cell(variant).step(x, h, c, params, gate_activation, record)


def layer(variant: str, x, h0, c0, params: Params, gate_activation: str = "sigmoid",
          records: list[Record] | None = None, reverse: bool = False,
          lengths: torch.Tensor | None = None):
    """One layer over a sequence, time-first: ``x [T, B, Cin, H, W]`` ->
    ``(output [T, B, C, H, W], h_n, c_n)``. ``records``, when given, gets one dict per step, in
    the order walked. ``reverse`` walks t = T − 1 … 0: step t starts from step t + 1's state,
    ``output[t]`` is the state after step t, ``(h_n, c_n)`` the state after step 0.
    ``lengths`` (integers ``[B]``): sample b's step t counts only while t < lengths[b]; past
    that its output is zero and its state carried unchanged."""
    h, c = h0, c0
    outputs = {}
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        record = {} if records is not None else None
        h_next, c_next = step(variant, x[t], h, c, params, gate_activation, record)
        if records is not None:
            records.append(record)
        if lengths is None:
            h, c = h_next, c_next
            outputs[t] = h
            continue
        counts = (lengths > t).view(-1, *([1] * (h.dim() - 1)))
        outputs[t] = torch.where(counts, h_next, 0.0)
        h = torch.where(counts, h_next, h)
        c = torch.where(counts, c_next, c)
    return torch.stack([outputs[t] for t in range(x.shape[0])]), h, c
