"""``convlstm_fast::spatial_attention_layer_triton``: variant (b), one layer over a sequence.

    F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);   Z = W_z * F  (C -> 1 channel)
    A = softmax_HW(Z) per sample;   X̃ = A ∘ X_t                          (SPEC b, eqs. 17-19)
    then cell (a) on X̃: [i f o] = σ(U_x GAP(X̃) + U_h GAP(H_{t−1}) + b_g),
    G = tanh(SepConv_x(X̃) + SepConv_h(H_{t−1}) + b_c), C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh C_t

X̃ depends on H_{t−1}, so only ``xa = SepConv_xa(X) + b_a`` is precomputed. Forward, four
launches per step: (1) F (the c/d features kernel, ``_common.attention_features_kernel``,
without CAND); (2) ``_spatial_logits_kernel``: Z and per-tile softmax statistics (max, Σexp);
(3) ``_spatial_input_kernel``: A, SepConv_h(H_{t−1}) and SepConv_x(X̃) into one accumulator,
X̃ formed on the fly from X_t read in place (its NCHW planes: no channels-last copy of X), G, and
the per-tile column sums of X̃ (GAP(X̃) is a grid-wide reduction: the launch boundary before the
gates); (4) ``_spatial_cell_kernel``: pooled gates, cell update,
column sums of H_t.
Backward (the walk backwards), per step: the cell backward of (a) with the attention path's dH term
(``_common.pooled_layer_bwd_kernel``, ATT_PATH), dX̃ and per-pixel dA
(``_spatial_input_bwd_kernel``), the softmax backward on the [B, H·W] map, dF's pre-activation
(``_spatial_features_bwd_kernel``), and three GEMMs. Saved per step (as the native op): C_t, G
(2 state tensors), the gate pre-activations and A ``[T, B, H, W]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One import per kind: the steps' @triton.jit helpers, the kernels shared with other ops,
# launch choices, and the host-side layout and layer helpers.
from ._common import depthwise_tile, gate_act, mask_if, nan_max, nan_maximum, pooled_gate_dot
from ._common import load_cell_state, program_tile, sepconv_tile, state_tile, store_cell_state
from ._common import store_gate_preacts, store_hidden_state, tanh
from ._common import attention_features_kernel, pooled_layer_bwd_kernel
from ._common import GPU_BLOCK_M, SEPCONV_LAUNCH, block_sizes, cell_state_cases, dot_precision
from ._common import ATTENTION_FWD_BLOCK_K, ATTENTION_FWD_LAUNCH, POOLED_BWD_LAUNCH
from ._common import StepMask, Walk, depthwise, depthwise_backward, frame_planes, nchw, rows
from ._common import sepconv_rows, sepconv_rows_backward, sepconv_x_rows
from ._weight_grads import conv_weight_grad, steps_mm
from ._common import CellState, initial_pooled_state, layer_input_grads, output_grads
# The traffic models of the shared host helpers and kernels (for traffic() below).
from ._common import GPU_BLOCK_CS, attention_features_traffic, depthwise_backward_traffic
from ._common import gpu_grid, h_prev_all_traffic, initial_pooled_state_traffic
from ._common import layer_input_grads_traffic, output_grads_traffic
from ._common import pooled_layer_bwd_traffic, sepconv_rows_backward_traffic
from ._common import sepconv_x_rows_traffic


# Launch choices of the forward step kernels (sm_90, triton 3.6, compile_check): the reduction
# chunks are narrower than the channel tile — never above it: BLOCK_K = min(BLOCK_C, ...) on CPU
# and GPU alike. The logits kernel has no tl.dot; the input kernel's chunk is also its GEMM's K.
# At BLOCK_K = 64 and 4 warps the input kernel took 255 registers and spilled 6-16 KB (bf16,
# K = 3/5), the cell kernel (U_x/U_h tiles of 64 × 64) 2 KB, and the logits kernel 9-20 KB: at
# 16 channels, 8 warps and maxnreg = 128 all three fit (25 % occupancy or more) without spilling.
# maxnreg also keeps ptxas from picking a low register target of its own: without it the logits
# kernel used 32-64 registers and spilled a few bytes. The cell kernel runs 16 warps (its H_t
# store into the NCHW output, a layout change of the tile, spilled 4 B in 16-bit at 8 warps).
LOGITS_BLOCK_K = 16
LOGITS_LAUNCH = dict(SEPCONV_LAUNCH, num_warps=8, maxnreg=128)
INPUT_BLOCK_K = 16
INPUT_LAUNCH = dict(SEPCONV_LAUNCH, num_warps=8, maxnreg=128)
CELL_BLOCK_K = 16
CELL_LAUNCH = dict(SEPCONV_LAUNCH, num_warps=16, maxnreg=128)
# The backward's input and features kernels (no reduction chunk): at 4 warps they took 255
# registers (triton 3.9 spilled), at 8 warps capped to 128 they fit without spilling.
BWD_LAUNCH = dict(SEPCONV_LAUNCH, num_warps=8, maxnreg=128)


@triton.jit
def _spatial_logits_kernel(
    feat_ptr, wz_ptr, z_ptr, zstat_ptr,
    C, H, W, NMT,
    KSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Z[p] = Σ_{a,b,k} F[p + (a − P, b − P), k] · W_z[0, k, a, b] (fp32) for BLOCK_M pixels of
    sample b, and the tile's softmax statistics (m = max Z, s = Σ exp(Z − m))."""
    pid_m = tl.program_id(0)
    b = tl.program_id(2)
    HW = H * W
    PAD: tl.constexpr = KSIZE // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < HW
    oy = offs_m // W
    ox = offs_m % W
    feat = feat_ptr + b * HW * C
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        # Runtime tap loops (as _common.depthwise_tile): unrolled, the K² pointer and mask
        # tiles were hoisted out of the channel loop and spilled (sm_90, triton 3.6).
        for a in range(KSIZE):
            for bb in range(KSIZE):
                iy = oy + (a - PAD)
                ix = ox + (bb - PAD)
                valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                v = tl.load(feat + (iy * W + ix)[:, None] * C + offs_k[None, :],
                            mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                w = tl.load(wz_ptr + offs_k * (KSIZE * KSIZE) + (a * KSIZE + bb), mask=mask_k,
                            other=0.0).to(tl.float32)
                acc += v * w[None, :]
    z = tl.sum(acc, axis=1)
    tl.store(z_ptr + b * HW + offs_m, z, mask=mask_m)
    z = tl.where(mask_m, z, float("-inf"))
    m = nan_max(z, 0)
    s = tl.sum(tl.exp(z - m), axis=0)
    tl.store(zstat_ptr + (b * NMT + pid_m) * 2, m)
    tl.store(zstat_ptr + (b * NMT + pid_m) * 2 + 1, s)


@triton.jit
def _spatial_input_kernel(
    x_ptr, z_ptr, zstat_ptr, h_prev_ptr, dwh_ptr, pwh_ptr, dwx_ptr, pwx_ptr, cb_ptr,
    att_ptr, cand_ptr, xpart_ptr,
    CIN, C, H, W, NMT, X_STRIDE_B,
    KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A = exp(Z − M) / S (M, S merged from the tiles' statistics), then
    G = tanh(SepConv_x(A∘X_t) + SepConv_h(H_{t−1}) + b_c) with the depthwise of X̃ = A∘X formed
    on the fly from X_t read in place (x_ptr: the frame's NCHW planes, samples X_STRIDE_B
    apart) and SepConv_h(H_{t−1}) (h_prev ``[B, C, H, W]``, the previous step's output) first,
    into the same accumulator. Programs of the first channel tile also store A and the column
    sums of X̃ over their pixels (for GAP(X̃))."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    PAD: tl.constexpr = KSIZE // 2
    first_n = pid_n == 0

    # Softmax statistics of the whole map, merged in a fixed order:
    # M = max_i m_i, S = Σ_i s_i · exp(m_i − M).
    big = tl.load(zstat_ptr + b * NMT * 2)
    for tile in range(1, NMT):
        big = nan_maximum(big, tl.load(zstat_ptr + (b * NMT + tile) * 2))
    total = big * 0.0
    for tile in range(NMT):
        m_i = tl.load(zstat_ptr + (b * NMT + tile) * 2)
        total += tl.load(zstat_ptr + (b * NMT + tile) * 2 + 1) * tl.exp(m_i - big)
    z_b = z_ptr + b * HW
    att = tl.exp(tl.load(z_b + offs_m, mask=mask_m, other=0.0) - big) / total
    tl.store(att_ptr + b * HW + offs_m, att.to(att_ptr.dtype.element_ty),
             mask=mask_if(mask_m, first_n))

    x_b = x_ptr + b * X_STRIDE_B
    acc = sepconv_tile(h_prev_ptr + b * C * HW, oy, ox, mask_m, offs_n, mask_n, C, H, W, dwh_ptr,
                       pwh_ptr, KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, False)
    for k0 in range(0, CIN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < CIN
        d = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for a in range(KSIZE):  # runtime tap loops (see _spatial_logits_kernel)
            for bb in range(KSIZE):
                iy = oy + (a - PAD)
                ix = ox + (bb - PAD)
                valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                q = iy * W + ix
                a_q = tl.exp(tl.load(z_b + q, mask=valid, other=0.0) - big) / total
                v = tl.load(x_b + offs_k[None, :] * HW + q[:, None],
                            mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                # X̃ as the reference holds it: A∘X rounded to the input dtype.
                v = (v * a_q[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
                w = tl.load(dwx_ptr + offs_k * (KSIZE * KSIZE) + (a * KSIZE + bb), mask=mask_k,
                            other=0.0).to(tl.float32)
                d += v * w[None, :]
        center = tl.load(x_b + offs_k[None, :] * HW + offs_m[:, None],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        xt = (center * att[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(xpart_ptr + (b * NMT + pid_m) * CIN + offs_k, tl.sum(xt, axis=0),
                 mask=mask_if(mask_k, first_n))
        wt = tl.load(pwx_ptr + offs_n[None, :] * CIN + offs_k[:, None],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(d.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    pre = acc + tl.load(cb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(cand_ptr + offs, tanh(pre).to(cand_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["first", "last"])
def _spatial_cell_kernel(
    c_ptr, cell_prev_ptr, cand_ptr, gb_ptr, xpart_ptr, ux_ptr, hpart_prev_ptr, hpart_next_ptr,
    uh_ptr, h_out_ptr, cell_ptr, gate_ptr, h_n_ptr, c_n_ptr,
    CIN, C, H, W, NMT, first, last,
    ACT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[i f o] = act(U_x GAP(X̃) + U_h GAP(H_{t−1}) + b_g), C_t = f∘C_{t−1} + i∘G,
    H_t = o∘tanh C_t (into the NCHW output, h_out ``[B, C, H, W]``), and the column sums of H_t
    over this tile (the next step's h̄). The cell state: ``c``, ``cell_prev``, ``first``,
    ``last`` and SPLIT as :class:`_common.CellState` hands them."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    x0, x1, x2 = pooled_gate_dot(xpart_ptr, ux_ptr, b, offs_n, mask_n, C, CIN, NMT, HW, 3,
                                 BLOCK_K)
    h0, h1, h2 = pooled_gate_dot(hpart_prev_ptr, uh_ptr, b, offs_n, mask_n, C, C, NMT, HW, 3,
                                 BLOCK_K)
    z_i = x0 + h0 + tl.load(gb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z_f = x1 + h1 + tl.load(gb_ptr + C + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z_o = x2 + h2 + tl.load(gb_ptr + 2 * C + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    store_gate_preacts(gate_ptr, z_i, z_f, z_o, b, pid_m, offs_n, mask_n, C, 3)
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c_prev = load_cell_state(c_ptr, cell_prev_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                             first, SPLIT)
    c_new = gate_act(z_f, ACT)[None, :] * c_prev + gate_act(z_i, ACT)[None, :] * g
    h = (gate_act(z_o, ACT)[None, :] * tanh(c_new)).to(h_out_ptr.dtype.element_ty)
    store_cell_state(c_new, c_ptr, cell_ptr, c_n_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                     last, SPLIT)
    store_hidden_state(h, h_out_ptr, h_n_ptr, hpart_next_ptr, offs_m, mask_m, b, pid_m, offs_n,
                       mask_n, C, HW, NMT, last)


@triton.jit
def _spatial_input_bwd_kernel(
    ddx_ptr, dwx_ptr, dxbar_ptr, x_ptr, dxt_ptr, dapart_ptr,
    CIN, H, W, NKT,
    KSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dX̃ = dwᵀ_x(dacc·pw_x) + (dgp·U_x) / HW (the GEMM between launches), stored; and this
    channel tile's part of dA[p] = Σ_k dX̃[p, k] · X[p, k] (``dapart [B, NKT, H·W]``)."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        CIN, H, W, BLOCK_M, BLOCK_N)
    offs, mask = state_tile(b, HW, CIN, offs_m, mask_m, offs_n, mask_n)
    dxt = depthwise_tile(ddx_ptr + b * HW * CIN, oy, ox, mask_m, offs_n, mask_n,
                         CIN, H, W, dwx_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
    dxt += (tl.load(dxbar_ptr + b * CIN + offs_n, mask=mask_n, other=0.0) / HW)[None, :]
    tl.store(dxt_ptr + offs, dxt.to(dxt_ptr.dtype.element_ty), mask=mask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dapart_ptr + (b * NKT + pid_n) * HW + offs_m, tl.sum(tl.where(mask, dxt * x, 0.0), 1),
             mask=mask_m)


@triton.jit
def _spatial_features_bwd_kernel(
    dz_ptr, wz_ptr, feat_ptr, dfeat_ptr,
    C, H, W,
    KSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dF' = (Σ_{a,b} dZ[p − (a − P, b − P)] · W_z[0, k, a, b]) ∘ (1 − F²): the gradient of the
    features' pre-activation (Z = W_z * F transposed)."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    PAD: tl.constexpr = KSIZE // 2
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for a in range(KSIZE):  # runtime loops: unrolled, the K² pointer/mask tiles spilled
        for bb in range(KSIZE):
            iy = oy - (a - PAD)
            ix = ox - (bb - PAD)
            valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            dz = tl.load(dz_ptr + b * HW + iy * W + ix, mask=valid, other=0.0)
            w = tl.load(wz_ptr + offs_n * (KSIZE * KSIZE) + (a * KSIZE + bb), mask=mask_n,
                        other=0.0).to(tl.float32)
            acc += dz[:, None] * w[None, :]
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    f = tl.load(feat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dfeat_ptr + offs, (acc * (1.0 - f * f)).to(dfeat_ptr.dtype.element_ty), mask=mask)


# What one more step launches (Triton kernels, ATen calls; launch_count.py measures it).
# Forward: four kernels — the attention logits, the softmax-weighted input's SepConv, the
# candidate's H side, the cell. Backward: three kernels (the cell backward shared with (a), the
# attended input's and the attention features' backward) and 17 ATen calls: dgp = Σ gpart ·
# act'(z) (sum, 2 sigmoid, neg, 2 mul: 6, plus its copy into dgp[t]), d_att's sum, the softmax
# backward's 4 (mul, sum, sub, mul, with its copy into dz[t]), and 4 GEMMs into their buffers — the
# hot spot of the Triton backward (issue 14) — and, in fp32 (where it is measured), d W_z's
# per-step call and add_ (_weight_grads.conv_weight_grad; 16-bit dtypes make one for all steps).
LAUNCHES_PER_STEP = {"forward": (4, 0), "backward": (3, 19)}


def _gate_act_grad(z: torch.Tensor, gate_activation: int) -> torch.Tensor:
    """act'(z) as _common.gate_act_grad computes it: σ(z)·σ(−z) (no 1 − σ cancellation);
    hard_sigmoid: 0 for z < −2.5 or z > 2.5, else 0.2 (the kinks and NaN included)."""
    if gate_activation == 0:
        return torch.sigmoid(z) * torch.sigmoid(-z)
    return torch.where((z < -2.5) | (z > 2.5), 0.0, 0.2).to(z.dtype)


def spatial_attention_layer_forward(x, h0, c0, params, gate_activation: int,
                                    reverse: bool = False, lengths=None):
    """``x [T, B, Cin, H, W]``, ``h0``, ``c0`` ``[B, C, H, W]`` -> ``(output [T, B, C, H, W],
    h_n, c_n, [cell, candidate [T, B, H, W, C], gate_preact [T, B, 3C],
    attention [T, B, H, W]])``; ``lengths`` masks each sample's steps (_common.StepMask)."""
    p = [q.contiguous() for q in params]
    gwx, gwh, gb, cdwx, cpwx, cdwh, cpwh, cb, adwx, apwx, adwh, apwh, ab, wz = p
    steps, batch, cin, height, width = x.shape
    hidden, pixels, ksize = h0.shape[1], height * width, cdwh.shape[-1]
    xa, _ = sepconv_x_rows(x, adwx, apwx, ab)  # the only X-side term free of A
    xa = xa.view(steps, batch * pixels, hidden)
    frames = frame_planes(x)  # X_t read in place by the step's input kernel

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    out = x.new_empty(steps, batch, hidden, height, width)  # the output: H_t stored in place
    cell = x.new_empty(steps, batch * pixels, hidden)
    cand = torch.empty_like(cell)
    gate_preact = x.new_empty(steps, batch, 3 * hidden)
    att = x.new_empty(steps, batch, pixels)
    f32 = dict(device=x.device, dtype=torch.float32)
    feat = torch.empty_like(cell[0])
    logits = torch.empty(batch * pixels, **f32)
    zstat = torch.empty(batch, tiles, 2, **f32)
    xpart = torch.empty(batch, tiles, cin, **f32)
    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)
    h_prev, hpart = initial_pooled_state(h0, tiles, walk)
    h_prev = mask.carry_buffer(h_prev)
    state = CellState(h0, c0, cell, walk, mask)
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_c,
                  BLOCK_K=min(block_c, ATTENTION_FWD_BLOCK_K), **ATTENTION_FWD_LAUNCH)
    dot = dot_precision(x.dtype)
    for t in walk.forward():
        held = state.hold()
        attention_features_kernel[grid](h_prev, feat, xa[t], cdwh, cpwh, adwh, apwh, feat, feat,
                                        hidden, height, width, KSIZE=ksize, DOT_PRECISION=dot,
                                        CAND=False, **blocks)
        _spatial_logits_kernel[(tiles, 1, batch)](feat, wz, logits, zstat, hidden, height, width,
                                                  tiles, KSIZE=ksize, BLOCK_M=block_m,
                                                  BLOCK_K=min(block_c, LOGITS_BLOCK_K),
                                                  **LOGITS_LAUNCH)
        _spatial_input_kernel[grid](frames[t], logits, zstat, h_prev, cdwh, cpwh, cdwx, cpwx, cb,
                                    att[t], cand[t], xpart, cin, hidden, height, width, tiles,
                                    frames.stride(1), KSIZE=ksize, DOT_PRECISION=dot, BLOCK_M=block_m,
                                    BLOCK_N=block_c, BLOCK_K=min(block_c, INPUT_BLOCK_K),
                                    **INPUT_LAUNCH)
        c, c_prev, first, last = state.step(t)
        _spatial_cell_kernel[grid](c, c_prev, cand[t], gb, xpart, gwx, hpart[(t + 1) % 2],
                                   hpart[t % 2], gwh, out[t], cell[t], gate_preact[t],
                                   state.h_n, state.c_n, cin, hidden, height, width, tiles,
                                   first, last, ACT=gate_activation, SPLIT=state.split,
                                   BLOCK_M=block_m,
                                   BLOCK_N=block_c, BLOCK_K=min(block_c, CELL_BLOCK_K),
                                   **CELL_LAUNCH)
        if mask.active:
            state.forward_step(t, out[t], held, h_prev, hpart[t % 2], hpart[(t + 1) % 2])
        else:
            h_prev = out[t]
    state_shape = (steps, batch, height, width, hidden)
    output, h_n, c_n = state.outputs(out, h_prev)
    return output, h_n, c_n, [cell.view(state_shape), cand.view(state_shape), gate_preact,
                              att.view(steps, batch, height, width)]


def spatial_attention_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                                     saved, gate_activation: int, reverse: bool = False,
                                     lengths=None):
    """Gradients of :func:`spatial_attention_layer_forward` w.r.t. x, h0, c0 and every parameter."""
    p = [q.contiguous() for q in params]
    gwx, gwh, gb, cdwx, cpwx, cdwh, cpwh, cb, adwx, apwx, adwh, apwh, ab, wz = p
    steps, batch, cin, height, width = x.shape
    hidden, pixels, ksize = h0.shape[1], height * width, cdwh.shape[-1]
    maps, state = steps * batch, (steps, batch * pixels, hidden)
    cell, cand, gate_preact, att = saved
    cell, cand = (s.reshape(state).contiguous() for s in (cell, cand))
    gate_preact = gate_preact.contiguous()
    att = att.reshape(steps, batch, pixels).contiguous()
    frames = x.reshape(maps, cin, height, width)
    x_rows = rows(frames).view(steps, batch * pixels, cin)
    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)

    # Recompute the attention features F for all steps (batched; not saved).
    xa, _ = sepconv_x_rows(x, adwx, apwx, ab)
    h_prev = mask.before_each(output, h0).reshape(maps, hidden, height, width)
    dwh_a_rows, feat_pre = sepconv_rows(h_prev, adwh, apwh, None)
    feat = torch.tanh(feat_pre + xa).view(state)

    gout, dc = output_grads(grad_output, grad_h_n, grad_c_n, walk, mask)
    c0_rows = rows(c0)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles, cin_tiles = triton.cdiv(pixels, block_m), triton.cdiv(cin, block_c)
    f32 = dict(device=x.device, dtype=torch.float32)
    dacc, ddw_c, dfeat, ddw_a = (torch.empty_like(cell) for _ in range(4))
    ddx, dxt = torch.empty_like(x_rows), torch.empty_like(x_rows)
    dapart = torch.empty(batch, cin_tiles, pixels, **f32)
    dz = torch.empty(steps, batch, pixels, **f32)
    gpart = torch.empty(steps, batch, tiles, 3 * hidden, **f32)
    dgp = torch.empty(steps, batch, 3 * hidden, **f32)
    dgp_kernel = torch.empty_like(dgp)  # the backward kernel's copy of dgp (unused here)
    grad_h0_rows = torch.empty_like(cell[0])
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_c, **POOLED_BWD_LAUNCH)
    for s in walk.backward():
        t = s.t
        dc_held = mask.hold(dc) if s.cell else None
        pooled_layer_bwd_kernel[grid](
            mask.rec(s, ddw_c), mask.rec(s, gpart), mask.rec(s, gate_preact),
            mask.rec(s, dgp_kernel), gwh, cdwh, mask.rec(s, ddw_a),
            adwh, gout[t], grad_h0_rows, cell[t], s.prev(cell, c0_rows),
            cand[t], gate_preact[t], dc, dacc[t], gpart[t],
            hidden, height, width, tiles, KSIZE=ksize, ACT=gate_activation,
            HAS_REC=s.has_rec, CELL=s.cell, ATT_PATH=True, BLOCK_K=block_c, **blocks)
        if not s.cell:
            break
        mask.backward_step(t, dc, dc_held, dacc[t], gpart[t])
        # Gates: dgp_t = act'(z_t) ∘ (raw gate grads reduced over tiles); GAP(X̃)'s share of dX̃.
        dgp[t] = gpart[t].sum(1) * _gate_act_grad(gate_preact[t].float(), gate_activation)
        dxbar = dgp[t] @ gwx.float()
        torch.mm(dacc[t], cpwx, out=ddx[t])                  # d dw_x(X̃) = dacc · pw_x
        _spatial_input_bwd_kernel[(tiles, cin_tiles, batch)](
            ddx[t], cdwx, dxbar, x_rows[t], dxt[t], dapart, cin, height, width, cin_tiles,
            KSIZE=ksize, BLOCK_M=block_m, BLOCK_N=block_c, **BWD_LAUNCH)
        # Softmax over H·W: dZ = A ∘ (dA − Σ_HW A ∘ dA), dA[p] = Σ_k dX̃[p, k] X[p, k].
        d_att = dapart.sum(1)
        a_t = att[t].float()
        dz[t] = a_t * (d_att - (a_t * d_att).sum(1, keepdim=True))
        _spatial_features_bwd_kernel[grid](dz[t], wz, feat[t], dfeat[t], hidden, height, width,
                                           KSIZE=ksize, BLOCK_M=block_m, BLOCK_N=block_c,
                                           **BWD_LAUNCH)
        torch.mm(dacc[t], cpwh, out=ddw_c[t])                # d dw_h(H_{t−1}) = dacc · pw_h
        torch.mm(dfeat[t], apwh, out=ddw_a[t])               # d dw_ha(H_{t−1}) = dF' · pw_ha

    # Weight gradients of all steps in batched products.
    def flat(buffer, channels=hidden):
        return buffer.view(-1, channels)

    def as_maps(buffer, channels=hidden):
        return nchw(flat(buffer, channels), maps, height, width)

    att_maps = att.view(maps, 1, height, width)
    attended = att_maps * frames  # X̃
    feat_maps = as_maps(feat)
    # The weights' gradients over all steps, summed per step in fp32 (_weight_grads).
    grad_cpwx = steps_mm(flat(dacc), rows(depthwise(attended, cdwx)), steps)
    _, grad_cdwx = depthwise_backward(as_maps(ddx, cin), attended, cdwx, False, steps)
    grad_cpwh = steps_mm(flat(dacc), rows(depthwise(h_prev, cdwh)), steps)
    _, grad_cdwh = depthwise_backward(as_maps(ddw_c), h_prev, cdwh, False, steps)
    grad_apwh = steps_mm(flat(dfeat), dwh_a_rows, steps)
    _, grad_adwh = depthwise_backward(as_maps(ddw_a), h_prev, adwh, False, steps)
    grad_fa, grad_adwx, grad_apwx = sepconv_rows_backward(
        flat(dfeat), frames, rows(depthwise(frames, adwx)), adwx, apwx, steps)
    grad_wz = conv_weight_grad(dz.view(maps, 1, height, width).to(x.dtype), feat_maps, wz, steps)
    dgp_rows = dgp.view(maps, 3 * hidden)
    grad_gwh = steps_mm(dgp_rows, h_prev.mean((-2, -1), dtype=torch.float32), steps)
    grad_gwx = steps_mm(dgp_rows, attended.mean((-2, -1), dtype=torch.float32), steps)
    grad_frames = att_maps * as_maps(dxt, cin) + grad_fa  # X̃ = A ∘ X
    grads = [grad_gwx, grad_gwh, dgp_rows.sum(0), grad_cdwx, grad_cpwx, grad_cdwh, grad_cpwh,
             flat(dacc).sum(0, dtype=torch.float32), grad_adwx, grad_apwx, grad_adwh, grad_apwh,
             flat(dfeat).sum(0, dtype=torch.float32), grad_wz]
    mask.initial_hidden_grad(grad_h0_rows, grad_h_n)
    grad_x, grad_h0, grad_c0 = layer_input_grads(grad_frames, grad_h0_rows, dc, x)
    return grad_x, grad_h0, grad_c0, [g.to(q.dtype).contiguous() for g, q in zip(grads, params)]


def compile_cases(dtype: torch.dtype, ksize: int, block_c: int, gate_activation: int, dot: str):
    """(kernel, pointer types, constexprs, launch options) of the kernels defined here (this
    op also runs _common's attention_features_kernel without CAND and pooled_layer_bwd_kernel
    with ATT_PATH, which _common's cases cover)."""
    blocks = dict(BLOCK_M=GPU_BLOCK_M, BLOCK_N=block_c)
    state_types, state_flags = cell_state_cases(dtype)
    cell_types = {**dict.fromkeys(("xpart_ptr", "hpart_prev_ptr", "hpart_next_ptr"), "fp32"),
                  **state_types}
    return [
        (_spatial_logits_kernel, {"z_ptr", "zstat_ptr"},
         dict(BLOCK_M=GPU_BLOCK_M, BLOCK_K=min(block_c, LOGITS_BLOCK_K), KSIZE=ksize),
         LOGITS_LAUNCH),
        (_spatial_input_kernel, {"z_ptr", "zstat_ptr", "xpart_ptr"},
         dict(blocks, BLOCK_K=min(block_c, INPUT_BLOCK_K), KSIZE=ksize, DOT_PRECISION=dot),
         INPUT_LAUNCH),
        (_spatial_cell_kernel, cell_types,
         dict(blocks, BLOCK_K=min(block_c, CELL_BLOCK_K), ACT=gate_activation, **state_flags),
         CELL_LAUNCH),
        (_spatial_input_bwd_kernel, {"dxbar_ptr", "dapart_ptr"}, dict(blocks, KSIZE=ksize),
         BWD_LAUNCH),
        (_spatial_features_bwd_kernel, {"dz_ptr"}, dict(blocks, KSIZE=ksize), BWD_LAUNCH),
    ]


def traffic(shape, itemsize: int) -> list:
    """Modelled HBM bytes and FLOPs of every launch of :func:`spatial_attention_layer_forward`
    and :func:`spatial_attention_layer_backward` (bench.roofline's conventions) at ``shape``, on
    a GPU's tiling. The step's input kernel reads X_t once per channel tile of the output (its
    K² taps per tile are ``loaded``); the backward's per-step ATen calls act on [B, 3C] and
    [B, H·W] tensors (the ``.float()`` copies are free in fp32, where the launch counts are
    measured). The input kernel also reloads A's K² taps (the fp32 logits) for each chunk of
    its reduction over Cin (INPUT_BLOCK_K channels)."""
    from convlstm_fast.bench.roofline import BACKWARD, Recorder, Sizes, cell_state_steps

    z, r = Sizes(shape, itemsize), Recorder()
    C, cin, T, k2 = z.C, z.cin, z.T, z.K * z.K
    tiles, channel_tiles, programs = gpu_grid(z)
    cin_tiles = -(-cin // GPU_BLOCK_CS[0])
    cin_chunks = -(-cin // min(GPU_BLOCK_CS[0], INPUT_BLOCK_K))  # the input kernel's K loop
    amap, amap32 = z.B * z.HW * z.s, z.B * z.HW * 4
    hpart, xpart, zstat = z.B * tiles * C * 4, z.B * tiles * cin * 4, z.B * tiles * 2 * 4
    copies = 0 if itemsize == 4 else T  # .float() of a bf16/fp16 tensor is a copy
    sepconv_x_rows_traffic(r, z, cin, C)
    initial_pooled_state_traffic(r, z)
    attention_features_traffic(r, z, cand=False, count=T)
    r.kernel("_spatial_logits_kernel", z.state() + z.weight(k2 * C), amap32 + zstat,
             z.depthwise_flops(C), count=T, loaded=k2 * z.state())
    # X_t and A's logits, and H_{t−1} for SepConv_h (each channel tile redoes its depthwise)
    read = (z.xstep() + amap32 + zstat + z.state()
            + z.weight(k2 * cin + C * cin + C + k2 * C + C * C))
    loaded = (channel_tiles * (k2 + 1) * z.xstep() + channel_tiles * cin_chunks * k2 * amap32
              + channel_tiles * k2 * z.state()
              + programs * (GPU_BLOCK_CS[0] * (cin + C) * z.s + tiles * 2 * 4))
    r.kernel("_spatial_input_kernel", read, amap + z.state() + xpart,
             channel_tiles * (z.depthwise_flops(cin) + z.depthwise_flops(C))
             + z.gemm_flops(z.rows, C, cin) + z.gemm_flops(z.rows, C, C), count=T,
             loaded=loaded)
    read = z.state() + xpart + hpart + z.weight(3 * C * (cin + C) + 3 * C)
    per_program = tiles * (cin + C) * 4 + 3 * GPU_BLOCK_CS[0] * (cin + C) * z.s  # sums, U_x, U_h
    cell_state_steps(r, z, "_spatial_cell_kernel", read, z.state() + z.vec(3 * C, z.s) + hpart,
                     programs * 2 * 3 * GPU_BLOCK_CS[0] * (cin + C) + z.cell_flops(),
                     programs * per_program)

    r.phase = BACKWARD
    r.aten("clone (rows of X)", z.xseq(), z.xseq())
    sepconv_x_rows_traffic(r, z, cin, C)
    h_prev_all_traffic(r, z)
    r.aten("convolution (depthwise dw_ha(H_{t-1}))", z.seq(), z.seq(), z.depthwise_flops(C, T))
    r.aten("clone (rows)", z.seq(), z.seq())
    r.aten("mm (pw_ha · dw_ha(H_{t-1}))", z.seq() + z.weight(C * C), z.seq(),
           z.gemm_flops(T * z.rows, C, C))
    r.aten("add (F's pre-activation)", 2 * z.seq(), z.seq())
    r.aten("tanh (F)", z.seq(), z.seq())
    output_grads_traffic(r, z)
    pooled_layer_bwd_traffic(r, z, att_path=True)
    gates = z.vec(3 * C)
    r.aten("sum (gate partials over tiles)", z.B * tiles * 3 * C * 4, gates, count=T)
    r.aten("_to_copy (gate_preact.float())", z.vec(3 * C, z.s), gates, count=copies)
    for what in ("sigmoid (z)", "neg (-z)", "sigmoid (-z)", "mul (act')", "mul (dgp)",
                 "copy_ (dgp[t])"):
        r.aten(what, 2 * gates if what.startswith("mul") else gates, gates, count=T)
    r.aten("_to_copy (U_x.float())", z.weight(3 * C * cin), 3 * C * cin * 4, count=copies)
    r.aten("mm (dx̄ = dgp · U_x)", gates + 3 * C * cin * 4, z.vec(cin),
           z.gemm_flops(z.B, cin, 3 * C), count=T)
    r.aten("mm (ddx = dacc · pw_x)", z.state() + z.weight(C * cin), z.xstep(),
           z.gemm_flops(z.rows, cin, C), count=T)
    r.kernel("_spatial_input_bwd_kernel", 2 * z.xstep() + z.vec(cin),
             z.xstep() + z.B * cin_tiles * z.HW * 4, z.depthwise_flops(cin), count=T,
             loaded=(k2 + 1) * z.xstep() + z.vec(cin))
    r.aten("sum (dA over channel tiles)", z.B * cin_tiles * z.HW * 4, amap32, count=T)
    r.aten("_to_copy (att.float())", amap, amap32, count=copies)
    for what in ("mul (A∘dA)", "sum (Σ_HW A∘dA)", "sub (dA − Σ)", "mul (dZ)", "copy_ (dz[t])"):
        r.aten(what, 2 * amap32 if what.startswith(("mul", "sub")) else amap32,
               z.vec(1) if what.startswith("sum") else amap32, count=T)
    r.kernel("_spatial_features_bwd_kernel", amap32 + z.state() + z.weight(k2 * C), z.state(),
             z.depthwise_flops(C), count=T,
             loaded=channel_tiles * k2 * amap32 + z.state())
    for what in ("ddw_c = dacc · pw_h", "ddw_a = dF' · pw_ha"):
        r.aten(f"mm ({what})", z.state() + z.weight(C * C), z.state(), z.gemm_flops(z.rows, C, C),
               count=T)
    r.aten("mul (X̃ = A∘X)", z.xseq() + T * amap, z.xseq())
    r.aten("convolution (depthwise dw_x(X̃))", z.xseq(), z.xseq(), z.depthwise_flops(cin, T))
    r.aten("clone (rows)", z.xseq(), z.xseq())
    r.aten("mm (d pw_x)", z.seq() + z.xseq(), z.weight(C * cin), z.gemm_flops(C, cin, T * z.rows))
    depthwise_backward_traffic(r, z, cin, T, need_input=False)
    r.aten("convolution (depthwise dw_h(H_{t-1}))", z.seq(), z.seq(), z.depthwise_flops(C, T))
    r.aten("clone (rows)", z.seq(), z.seq())
    r.aten("mm (d pw_h)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, T * z.rows))
    depthwise_backward_traffic(r, z, C, T, need_input=False)
    r.aten("mm (d pw_ha)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, T * z.rows))
    depthwise_backward_traffic(r, z, C, T, need_input=False)
    r.aten("convolution (depthwise dw_xa(X))", z.xseq(), z.xseq(), z.depthwise_flops(cin, T))
    r.aten("clone (rows)", z.xseq(), z.xseq())
    sepconv_rows_backward_traffic(r, z, cin, C, T)
    if itemsize == 4:  # fp32: one call per step, summed (_weight_grads.conv_weight_grad)
        r.per_step_weight_grad("d W_z", amap + z.state(), z.weight(k2 * C),
                               z.gemm_flops(1, k2 * C, z.rows), T)
    else:
        r.aten("convolution_backward (d W_z)", T * amap + z.seq(), z.weight(k2 * C),
               z.gemm_flops(1, k2 * C, T * z.rows))
    r.aten("mean (GAP(H_{t-1}))", z.seq(), T * z.vec(C))
    r.aten("mean (GAP(X̃))", z.xseq(), T * z.vec(cin))
    r.aten("mul (dX̃∘A)", z.xseq() + T * amap, z.xseq())
    r.aten("add (dX)", 2 * z.xseq(), z.xseq())
    r.aten("sum (d b_c)", z.seq(), C * 4)
    r.aten("sum (d b_a)", z.seq(), C * 4)
    layer_input_grads_traffic(r, z)
    return r.launches
