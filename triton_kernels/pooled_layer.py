"""``convlstm_fast::pooled_layer_triton``: variant (a), one layer over a sequence (SPEC "a").

    x̄ = GAP(X_t), h̄ = GAP(H_{t−1});  [i f o] = σ(U_x x̄ + U_h h̄ + b_g)          (eqs. 10-12)
    G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c)                           (eq. 13)
    C_t = f ∘ C_{t−1} + i ∘ G;   H_t = o ∘ tanh(C_t)                              (eqs. 14-15)

Forward: the X-side terms ``xc = SepConv_x(X) + b_c`` and ``xg = U_x x̄ + b_g`` for all steps in
batched ATen calls, then ONE launch per step (``_pooled_layer_fwd_kernel``): pooled gates from
the previous step's per-tile column sums of H, depthwise K×K of H_{t−1} on the fly, pointwise
GEMM (tl.dot), tanh, cell update, H_t, and this step's column sums of H_t.
Backward (reverse time): per step one launch (``_pooled_layer_bwd_kernel``) plus one GEMM; the
weight gradients of all steps are batched products after the loop.
Saved per step (as the native op): C_t and G (2 state tensors) and the gate pre-activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (GPU_BLOCK_M, block_sizes, depthwise, depthwise_backward, depthwise_tile,
                      dot_precision, gate_act, mask_if, nchw, pooled_gate_preacts,
                      pooled_hidden_grad, rows, sepconv_rows, sepconv_rows_backward, tanh,
                      tanh_with_grad)

# num_stages=1: the K² depthwise loads of a reduction chunk feed FMAs, not the MMA directly;
# software-pipelining them through shared memory multiplies it by K²·stages (348 KB at K = 3,
# fp32, 3 stages, over sm_90's 227 KB) for no gain: other programs hide their latency.
LAUNCH = dict(num_warps=4, num_stages=1)


@triton.jit
def _pooled_layer_fwd_kernel(
    h_prev_ptr, c_ptr, xc_ptr, xg_ptr, hpart_prev_ptr, hpart_next_ptr,
    dw_ptr, pw_ptr, uh_ptr,
    h_out_ptr, cell_ptr, cand_ptr, gate_ptr,
    C, H, W, NMT,
    KSIZE: tl.constexpr, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step for BLOCK_M pixels of sample b × BLOCK_N channels. Rows are ``[B·H·W, C]``:
    h_prev (H_{t−1}), c (fp32 C_{t−1} in, C_t out, in place), xc (SepConv_x(X_t) + b_c),
    xg ``[B, 3C]`` (U_x x̄_t + b_g, fp32), hpart ``[B, NMT, C]`` fp32 column sums of H per pixel
    tile (prev: H_{t−1}, read; next: H_t, written). Writes H_t, C_t, G and the gates' z."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < HW
    oy = offs_m // W
    ox = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C

    # [i f o] pre-activations for this program's channels (eqs. 10-12), U_h h̄ recomputed here.
    z_i, z_f, z_o = pooled_gate_preacts(xg_ptr, hpart_prev_ptr, uh_ptr, b, offs_n, mask_n, C,
                                        NMT, HW, 3, BLOCK_K)
    first_tile = mask_if(mask_n, pid_m == 0)
    gate_out = gate_ptr + b * 3 * C + offs_n
    tl.store(gate_out, z_i.to(gate_ptr.dtype.element_ty), mask=first_tile)
    tl.store(gate_out + C, z_f.to(gate_ptr.dtype.element_ty), mask=first_tile)
    tl.store(gate_out + 2 * C, z_o.to(gate_ptr.dtype.element_ty), mask=first_tile)
    gi = gate_act(z_i, ACT)
    gf = gate_act(z_f, ACT)
    go = gate_act(z_o, ACT)

    # SepConv_h(H_{t−1}) = Σ_k dw(H_{t−1})[:, k] · pw_h[n, k]   (depthwise on the fly, then MMA)
    h_prev = h_prev_ptr + b * HW * C
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        d = depthwise_tile(h_prev, oy, ox, mask_m, offs_k, mask_k, C, H, W, dw_ptr,
                           KSIZE, False, BLOCK_M, BLOCK_K)
        wt = tl.load(pw_ptr + offs_n[None, :] * C + offs_k[:, None],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(d.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)

    # Epilogue (eqs. 13-15): G = tanh(acc + xc), C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t).
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    g = tanh(acc + tl.load(xc_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    c_new = gf[None, :] * tl.load(c_ptr + offs, mask=mask, other=0.0) + gi[None, :] * g
    h = (go[None, :] * tanh(c_new)).to(h_out_ptr.dtype.element_ty)
    tl.store(c_ptr + offs, c_new, mask=mask)
    tl.store(cell_ptr + offs, c_new.to(cell_ptr.dtype.element_ty), mask=mask)
    tl.store(cand_ptr + offs, g.to(cand_ptr.dtype.element_ty), mask=mask)
    tl.store(h_out_ptr + offs, h, mask=mask)
    # Column sums of H_t over this tile's pixels: the next step's h̄ (fixed-order reduction).
    hsum = tl.sum(tl.where(mask, h.to(tl.float32), 0.0), axis=0)
    tl.store(hpart_next_ptr + (b * NMT + pid_m) * C + offs_n, hsum, mask=mask_n)


@triton.jit
def _pooled_layer_bwd_kernel(
    ddw_ptr, gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr, dw_ptr, ddwa_ptr, adw_ptr,
    gout_ptr, dh_ptr,
    cell_ptr, cell_prev_ptr, cand_ptr, gate_ptr, dc_ptr, dacc_ptr, gpart_ptr,
    C, H, W, NMT,
    KSIZE: tl.constexpr, ACT: tl.constexpr, HAS_REC: tl.constexpr, CELL: tl.constexpr,
    ATT_PATH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of step t (reverse time) for BLOCK_M pixels of sample b × BLOCK_N channels.

    dH_t = grad_output[t] + dwᵀ(ddw_{t+1}) + dh̄_{t+1} / HW, with ddw_{t+1} = dacc_{t+1} · pw_h
    (a GEMM done between launches) and dh̄_{t+1} = dgp_{t+1} · U_h, dgp_{t+1} = act'(z_{t+1}) ∘
    (the raw gate grads of step t+1, reduced here over pixel tiles; stored once per sample).
    With CELL (step t of the sequence, eqs. 13-15 backwards):
        dC   = dC_carry + dH ∘ o ∘ (1 − tanh² C_t);    dC_carry ← dC ∘ f
        di = Σ_HW dC ∘ G,  df = Σ_HW dC ∘ C_{t−1},  do = Σ_HW dH ∘ tanh C_t  (per-tile partials)
        dacc = dC ∘ i ∘ (1 − G²)     (gradient of SepConv_h(H_{t−1}) + xc; stored)
    Without CELL, dH is stored: the gradient of h0 (t = −1). ATT_PATH (variant b) adds a second
    H-side SepConv's gradient dwᵀ_a(ddw_a_{t+1}) to dH_t (the attention features')."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < HW
    oy = offs_m // W
    ox = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]

    if CELL:
        dh = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_REC:
        dhbar = pooled_hidden_grad(gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr, b,
                                   offs_n, mask_n, C, NMT, True, (pid_m == 0) & (pid_n == 0),
                                   3, ACT, BLOCK_N, BLOCK_K)
        dh += depthwise_tile(ddw_ptr + b * HW * C, oy, ox, mask_m, offs_n, mask_n, C, H, W,
                             dw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
        if ATT_PATH:
            dh += depthwise_tile(ddwa_ptr + b * HW * C, oy, ox, mask_m, offs_n, mask_n, C, H, W,
                                 adw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
        dh += dhbar[None, :] / HW
    if CELL:
        zb = gate_ptr + b * 3 * C + offs_n
        gi = gate_act(tl.load(zb, mask=mask_n, other=0.0).to(tl.float32), ACT)
        gf = gate_act(tl.load(zb + C, mask=mask_n, other=0.0).to(tl.float32), ACT)
        go = gate_act(tl.load(zb + 2 * C, mask=mask_n, other=0.0).to(tl.float32), ACT)
        c_t = tl.load(cell_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c_prev = tl.load(cell_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tc, dtc = tanh_with_grad(c_t)  # tanh C_t and 1 − tanh² C_t
        dc = tl.load(dc_ptr + offs, mask=mask, other=0.0) + dh * go[None, :] * dtc
        tl.store(dc_ptr + offs, dc * gf[None, :], mask=mask)
        dacc = dc * gi[None, :] * (1.0 - g * g)
        tl.store(dacc_ptr + offs, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
        part = gpart_ptr + (b * NMT + pid_m) * 3 * C + offs_n
        tl.store(part, tl.sum(tl.where(mask, dc * g, 0.0), axis=0), mask=mask_n)
        tl.store(part + C, tl.sum(tl.where(mask, dc * c_prev, 0.0), axis=0), mask=mask_n)
        tl.store(part + 2 * C, tl.sum(tl.where(mask, dh * tc, 0.0), axis=0), mask=mask_n)
    else:
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


def _unpack(params):
    (gate_weight_x, gate_weight_h, gate_bias, cand_dw_x, cand_pw_x, cand_dw_h, cand_pw_h,
     cand_bias) = params
    return (gate_weight_x, gate_weight_h.contiguous(), gate_bias, cand_dw_x, cand_pw_x,
            cand_dw_h.contiguous(), cand_pw_h.contiguous(), cand_bias)


def pooled_layer_forward(x, h0, c0, params, gate_activation: int):
    """``x [T, B, Cin, H, W]``, ``h0``, ``c0`` ``[B, C, H, W]`` -> ``(output [T, B, C, H, W],
    h_n, c_n, [cell [T, B, H, W, C], candidate [T, B, H, W, C], gate_preact [T, B, 3C]])``."""
    gwx, gwh, gb, dwx, pwx, dwh, pwh, cb = _unpack(params)
    steps, batch, cin, height, width = x.shape
    hidden, pixels = h0.shape[1], height * width
    ksize = dwh.shape[-1]
    frames = x.reshape(steps * batch, cin, height, width)
    # Everything that depends only on X, for all steps at once (KERNELS.md "Before the recurrence").
    _, xc = sepconv_rows(frames, dwx, pwx, cb)
    xg = F.linear(frames.mean((-2, -1), dtype=torch.float32), gwx.float(), gb.float())
    xc = xc.view(steps, batch * pixels, hidden)
    xg = xg.view(steps, batch, 3 * hidden)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    out = x.new_empty(steps, batch * pixels, hidden)
    cell = torch.empty_like(out)
    cand = torch.empty_like(out)
    gate_preact = x.new_empty(steps, batch, 3 * hidden)
    c_state = rows(c0).to(torch.float32, copy=True)
    hpart = torch.zeros(2, batch, tiles, hidden, device=x.device, dtype=torch.float32)
    hpart[1, :, 0] = h0.sum((-2, -1), dtype=torch.float32)
    h_prev = rows(h0)
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    for t in range(steps):
        _pooled_layer_fwd_kernel[grid](
            h_prev, c_state, xc[t], xg[t], hpart[(t + 1) % 2], hpart[t % 2], dwh, pwh, gwh,
            out[t], cell[t], cand[t], gate_preact[t],
            hidden, height, width, tiles,
            KSIZE=ksize, ACT=gate_activation, DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_c, **LAUNCH,
        )
        h_prev = out[t]
    state_shape = (steps, batch, height, width, hidden)
    output = out.view(state_shape).permute(0, 1, 4, 2, 3).contiguous()
    h_n = nchw(out[-1], batch, height, width).clone(memory_format=torch.contiguous_format)
    c_n = nchw(c_state, batch, height, width).to(x.dtype, memory_format=torch.contiguous_format,
                                                 copy=True)
    return output, h_n, c_n, [cell.view(state_shape), cand.view(state_shape), gate_preact]


def pooled_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                          gate_activation: int):
    """Gradients of :func:`pooled_layer_forward` w.r.t. x, h0, c0 and every parameter."""
    gwx, gwh, gb, dwx, pwx, dwh, pwh, cb = _unpack(params)
    steps, batch, cin, height, width = x.shape
    hidden, pixels = h0.shape[1], height * width
    ksize = dwh.shape[-1]
    cell, cand, gate_preact = saved
    cell = cell.reshape(steps, batch * pixels, hidden).contiguous()
    cand = cand.reshape(steps, batch * pixels, hidden).contiguous()
    gate_preact = gate_preact.contiguous()

    gout = grad_output.permute(0, 1, 3, 4, 2).clone(memory_format=torch.contiguous_format)
    gout = gout.view(steps, batch * pixels, hidden)
    gout[-1] += rows(grad_h_n)
    dc = rows(grad_c_n).to(torch.float32, copy=True)
    c0_rows = rows(c0)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    dacc = torch.empty_like(gout)
    ddw = torch.empty_like(gout)
    gpart = torch.empty(steps, batch, tiles, 3 * hidden, device=x.device, dtype=torch.float32)
    dgp = torch.empty(steps, batch, 3 * hidden, device=x.device, dtype=torch.float32)
    grad_h0_rows = torch.empty_like(gout[0])
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    for t in range(steps - 1, -2, -1):
        cell_step = t >= 0
        rec = t + 1 if t < steps - 1 else t  # the step whose gradients flow into H_t
        _pooled_layer_bwd_kernel[grid](
            ddw[rec], gpart[rec], gate_preact[rec], dgp[rec], gwh, dwh, ddw[rec], dwh,
            gout[max(t, 0)], grad_h0_rows,
            cell[max(t, 0)], cell[t - 1] if t > 0 else c0_rows, cand[max(t, 0)],
            gate_preact[max(t, 0)], dc, dacc[max(t, 0)], gpart[max(t, 0)],
            hidden, height, width, tiles,
            KSIZE=ksize, ACT=gate_activation, HAS_REC=t < steps - 1, CELL=cell_step,
            ATT_PATH=False,
            BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_c, **LAUNCH,
        )
        if cell_step:
            torch.mm(dacc[t], pwh, out=ddw[t])  # d dw(H_{t−1}) = dacc_t · pw_h

    # Weight gradients of all steps in batched products (KERNELS.md "after the loop").
    frames = x.reshape(steps * batch, cin, height, width)
    h_prev = torch.cat([h0[None], output[:-1]]).reshape(steps * batch, hidden, height, width)
    dacc_rows = dacc.view(-1, hidden)
    dgp_rows = dgp.view(steps * batch, 3 * hidden)
    grad_pwh = dacc_rows.t() @ rows(depthwise(h_prev, dwh))
    _, grad_dwh = depthwise_backward(nchw(ddw.view(-1, hidden), steps * batch, height, width),
                                     h_prev, dwh, False)
    grad_cb = dacc_rows.sum(0, dtype=torch.float32)
    grad_gb = dgp_rows.sum(0)
    grad_gwh = dgp_rows.t() @ h_prev.mean((-2, -1), dtype=torch.float32)
    xbar = frames.mean((-2, -1), dtype=torch.float32)
    grad_gwx = dgp_rows.t() @ xbar
    d_rows = rows(depthwise(frames, dwx))
    grad_frames, grad_dwx, grad_pwx = sepconv_rows_backward(dacc_rows, frames, d_rows, dwx, pwx)
    # GAP(X) feeds the gates: dX += (dgp · U_x) / HW broadcast over the map.
    grad_frames = grad_frames + ((dgp_rows @ gwx.float()) / pixels).to(x.dtype)[:, :, None, None]
    grad_x = grad_frames.reshape(x.shape).contiguous()
    grad_h0 = nchw(grad_h0_rows, batch, height, width).contiguous()
    grad_c0 = nchw(dc, batch, height, width).to(x.dtype, memory_format=torch.contiguous_format,
                                               copy=True)
    grads = [grad_gwx, grad_gwh, grad_gb, grad_dwx, grad_pwx, grad_dwh, grad_pwh, grad_cb]
    return grad_x, grad_h0, grad_c0, [g.to(p.dtype).contiguous() for g, p in zip(grads, params)]


def compile_cases(dtype: torch.dtype, ksize: int, block_c: int, gate_activation: int, dot: str):
    """(kernel, fp32 pointer names, constexprs, launch options) of every kernel this op
    launches on a GPU with the given kernel size and channel block (for compile_check); other
    pointers are x.dtype."""
    blocks = dict(BLOCK_M=GPU_BLOCK_M, BLOCK_N=block_c, BLOCK_K=block_c, KSIZE=ksize,
                  ACT=gate_activation)
    fwd_fp32 = {"c_ptr", "xg_ptr", "hpart_prev_ptr", "hpart_next_ptr"}
    bwd_fp32 = {"gpart_next_ptr", "dgp_next_ptr", "dc_ptr", "gpart_ptr"}
    return [(_pooled_layer_fwd_kernel, fwd_fp32, dict(blocks, DOT_PRECISION=dot), LAUNCH)] + [
        (_pooled_layer_bwd_kernel, bwd_fp32,
         dict(blocks, HAS_REC=has_rec, CELL=cell, ATT_PATH=att_path), LAUNCH)
        for has_rec, cell in ((True, True), (False, True), (True, False))
        for att_path in (True, False)  # ATT_PATH: variant b (spatial_attention_layer)
    ]
