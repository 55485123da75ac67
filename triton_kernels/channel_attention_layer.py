"""``convlstm_fast::input_attention_layer_triton`` (c) and ``output_attention_layer_triton`` (d).

    A = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a)                      (SPEC c, eq. 21)
    Z = SepConv_z(A);   M = exp(Z − max_{h,w} Z)   per sample and channel       (eqs. 22-23)
    (c) i = M, [f o] = σ(U_x x̄ + U_h h̄ + b_g);   (d) o = M, [i f] = σ(...)
    G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c);  C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh C_t

Forward: the X-side terms (``xc``, ``xa``, ``xg``) for all steps in batched ATen calls, then three
launches per step (KERNELS.md): (1) ``_attention_features_kernel``: one pass over H_{t−1} with
both depthwise filters and two GEMMs -> G and A; (2) ``_attention_logits_kernel``: Z =
SepConv_z(A) (needs A's neighbours, hence the launch boundary) and per-tile channel maxima;
(3) ``_attention_cell_kernel``: M = exp(Z − max), pooled gates, cell update, column sums of H_t.
Backward (reverse time), per step: the cell backward fused with the two transposed depthwise
convolutions into dH_t (``_attention_cell_bwd_kernel``), dZ (``_attention_logits_bwd_kernel``),
a GEMM, dA's pre-activation (``_attention_features_bwd_kernel``) and two GEMMs. A_t and Z_t
are recomputed per step by the forward's own launches (1) and (2), so the tie mask of max Z is
the forward's (as the CUDA op does; it costs the candidate GEMM once more); weight gradients
are batched after the loop.
Saved per step (as the native op): C_t, G, M (3 state tensors) and the gate pre-activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (GPU_BLOCK_M, block_sizes, depthwise, depthwise_backward, depthwise_tile,
                      dot_precision, gate_act, mask_if, nan_max, nan_maximum, nchw,
                      pooled_gate_preacts, pooled_hidden_grad, rows, sepconv_rows,
                      sepconv_rows_backward, tanh, tanh_with_grad)

LAUNCH = dict(num_warps=4, num_stages=1)  # see pooled_layer.LAUNCH


@triton.jit
def _attention_features_kernel(
    h_prev_ptr, xc_ptr, xa_ptr, cdw_ptr, cpw_ptr, adw_ptr, apw_ptr, cand_ptr, feat_ptr,
    C, H, W,
    KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, RAW_CAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G = tanh(SepConv_h(H_{t−1}) + xc) and A = tanh(SepConv_ha(H_{t−1}) + xa) for BLOCK_M
    pixels of sample b × BLOCK_N channels: the same H tiles feed both depthwise filters.
    RAW_CAND (variant b, whose X-side candidate term comes later in the step): store
    SepConv_h(H_{t−1}) itself (fp32) instead of G; xc is not read."""
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
    h_prev = h_prev_ptr + b * HW * C
    acc_c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        wmask = mask_k[:, None] & mask_n[None, :]
        wt = offs_n[None, :] * C + offs_k[:, None]
        d_c = depthwise_tile(h_prev, oy, ox, mask_m, offs_k, mask_k, C, H, W, cdw_ptr,
                             KSIZE, False, BLOCK_M, BLOCK_K)
        w_c = tl.load(cpw_ptr + wt, mask=wmask, other=0.0)
        acc_c = tl.dot(d_c.to(w_c.dtype), w_c, acc_c, input_precision=DOT_PRECISION)
        d_a = depthwise_tile(h_prev, oy, ox, mask_m, offs_k, mask_k, C, H, W, adw_ptr,
                             KSIZE, False, BLOCK_M, BLOCK_K)
        w_a = tl.load(apw_ptr + wt, mask=wmask, other=0.0)
        acc_a = tl.dot(d_a.to(w_a.dtype), w_a, acc_a, input_precision=DOT_PRECISION)
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if RAW_CAND:
        g = acc_c
    else:
        g = tanh(acc_c + tl.load(xc_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    a = tanh(acc_a + tl.load(xa_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(cand_ptr + offs, g.to(cand_ptr.dtype.element_ty), mask=mask)
    tl.store(feat_ptr + offs, a.to(feat_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_logits_kernel(
    feat_ptr, zdw_ptr, zpw_ptr, z_ptr, zpart_ptr,
    C, H, W, NMT,
    KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Z = SepConv_z(A) (fp32) and the tile's per-channel maximum of Z over its valid pixels."""
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        d = depthwise_tile(feat_ptr + b * HW * C, oy, ox, mask_m, offs_k, mask_k, C, H, W,
                           zdw_ptr, KSIZE, False, BLOCK_M, BLOCK_K)
        w = tl.load(zpw_ptr + offs_n[None, :] * C + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(d.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(z_ptr + offs, acc, mask=mask)
    tile_max = nan_max(tl.where(mask, acc, float("-inf")), 0)
    tl.store(zpart_ptr + (b * NMT + pid_m) * C + offs_n, tile_max, mask=mask_n)


@triton.jit
def _attention_cell_kernel(
    z_ptr, zpart_ptr, c_ptr, cand_ptr, xg_ptr, hpart_prev_ptr, hpart_next_ptr, uh_ptr,
    h_out_ptr, cell_ptr, att_ptr, gate_ptr,
    C, H, W, NMT,
    ACT: tl.constexpr, OUTPUT_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """M = exp(Z − max_HW Z) (never exp(Z)/max exp(Z)), the two pooled gates, and the cell
    update with M as the input gate (c) or the output gate (OUTPUT_GATE, d)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < HW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]

    zmax = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for tile in range(NMT):
        zmax = nan_maximum(zmax, tl.load(zpart_ptr + (b * NMT + tile) * C + offs_n, mask=mask_n,
                                         other=0.0))
    zmax = tl.where(mask_n, zmax, 0.0)
    att = tl.exp(tl.load(z_ptr + offs, mask=mask, other=0.0) - zmax[None, :])
    tl.store(att_ptr + offs, att.to(att_ptr.dtype.element_ty), mask=mask)

    z0, z1, _unused = pooled_gate_preacts(xg_ptr, hpart_prev_ptr, uh_ptr, b, offs_n, mask_n, C,
                                          NMT, HW, 2, BLOCK_K)
    first_tile = mask_if(mask_n, pid_m == 0)
    tl.store(gate_ptr + b * 2 * C + offs_n, z0.to(gate_ptr.dtype.element_ty), mask=first_tile)
    tl.store(gate_ptr + b * 2 * C + C + offs_n, z1.to(gate_ptr.dtype.element_ty),
             mask=first_tile)
    g0 = gate_act(z0, ACT)
    g1 = gate_act(z1, ACT)
    g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c_prev = tl.load(c_ptr + offs, mask=mask, other=0.0)
    if OUTPUT_GATE:  # (d): [i f] pooled, o = M
        c_new = g1[None, :] * c_prev + g0[None, :] * g
        h = att * tanh(c_new)
    else:  # (c): i = M, [f o] pooled
        c_new = g0[None, :] * c_prev + att * g
        h = g1[None, :] * tanh(c_new)
    h = h.to(h_out_ptr.dtype.element_ty)
    tl.store(c_ptr + offs, c_new, mask=mask)
    tl.store(cell_ptr + offs, c_new.to(cell_ptr.dtype.element_ty), mask=mask)
    tl.store(h_out_ptr + offs, h, mask=mask)
    hsum = tl.sum(tl.where(mask, h.to(tl.float32), 0.0), axis=0)
    tl.store(hpart_next_ptr + (b * NMT + pid_m) * C + offs_n, hsum, mask=mask_n)


@triton.jit
def _attention_cell_bwd_kernel(
    ddwc_ptr, ddwa_ptr, gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr, cdw_ptr, adw_ptr,
    gout_ptr, dh_ptr,
    cell_ptr, cell_prev_ptr, cand_ptr, att_ptr, gate_ptr, dc_ptr,
    dacc_ptr, datt_ptr, spart_ptr, gpart_ptr,
    C, H, W, NMT,
    KSIZE: tl.constexpr, ACT: tl.constexpr, OUTPUT_GATE: tl.constexpr,
    HAS_REC: tl.constexpr, CELL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of step t. dH_t = grad_output[t] + dwᵀ_c(ddw_c) + dwᵀ_a(ddw_a) + dh̄/HW, where
    ddw_c = dacc_{t+1}·pw_h and ddw_a = dA'_{t+1}·pw_ha come from GEMMs between launches and
    dh̄ = dgp_{t+1}·U_h (pooled_hidden_grad). With CELL, for (c) (i = M, f, o pooled):
        dC = dC_carry + dH∘o∘(1 − tanh² C_t);  dC_carry ← dC∘f;  dM = dC∘G;
        df = Σ_HW dC∘C_{t−1};  do = Σ_HW dH∘tanh C_t;  dacc = dC∘M∘(1 − G²)
    and for (d) (i, f pooled, o = M): dM = dH∘tanh C_t, di = Σ dC∘G, df = Σ dC∘C_{t−1}.
    Also the per-tile sums Σ M∘dM (for dZ). Without CELL, dH is stored (the gradient of h0)."""
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
                                   2, ACT, BLOCK_N, BLOCK_K)
        dh += depthwise_tile(ddwc_ptr + b * HW * C, oy, ox, mask_m, offs_n, mask_n, C, H, W,
                             cdw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
        dh += depthwise_tile(ddwa_ptr + b * HW * C, oy, ox, mask_m, offs_n, mask_n, C, H, W,
                             adw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
        dh += dhbar[None, :] / HW
    if CELL:
        g0 = gate_act(tl.load(gate_ptr + b * 2 * C + offs_n, mask=mask_n, other=0.0)
                      .to(tl.float32), ACT)
        g1 = gate_act(tl.load(gate_ptr + b * 2 * C + C + offs_n, mask=mask_n, other=0.0)
                      .to(tl.float32), ACT)
        att = tl.load(att_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c_t = tl.load(cell_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c_prev = tl.load(cell_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tc, dtc = tanh_with_grad(c_t)  # tanh C_t and 1 − tanh² C_t
        carry = tl.load(dc_ptr + offs, mask=mask, other=0.0)
        part = gpart_ptr + (b * NMT + pid_m) * 2 * C + offs_n
        if OUTPUT_GATE:
            dc = carry + dh * att * dtc
            datt = dh * tc
            tl.store(dc_ptr + offs, dc * g1[None, :], mask=mask)
            dacc = dc * g0[None, :] * (1.0 - g * g)
            tl.store(part, tl.sum(tl.where(mask, dc * g, 0.0), axis=0), mask=mask_n)
            tl.store(part + C, tl.sum(tl.where(mask, dc * c_prev, 0.0), axis=0), mask=mask_n)
        else:
            dc = carry + dh * g1[None, :] * dtc
            datt = dc * g
            tl.store(dc_ptr + offs, dc * g0[None, :], mask=mask)
            dacc = dc * att * (1.0 - g * g)
            tl.store(part, tl.sum(tl.where(mask, dc * c_prev, 0.0), axis=0), mask=mask_n)
            tl.store(part + C, tl.sum(tl.where(mask, dh * tc, 0.0), axis=0), mask=mask_n)
        tl.store(dacc_ptr + offs, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
        tl.store(datt_ptr + offs, datt, mask=mask)
        tl.store(spart_ptr + (b * NMT + pid_m) * C + offs_n,
                 tl.sum(tl.where(mask, att * datt, 0.0), axis=0), mask=mask_n)
    else:
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_logits_bwd_kernel(
    att_ptr, datt_ptr, tie_ptr, spart_ptr, dz_ptr,
    C, HW, NMT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of M = exp(Z − max Z) per (sample, channel):
        dZ = M∘dM − τ ∘ Σ_HW M∘dM,   τ = [Z = max Z] / #ties  (torch.amax's gradient rule)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    mask = (offs_m < HW)[:, None] & mask_n[None, :]
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(NMT):
        total += tl.load(spart_ptr + (b * NMT + tile) * C + offs_n, mask=mask_n, other=0.0)
    att = tl.load(att_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    datt = tl.load(datt_ptr + offs, mask=mask, other=0.0)
    tie = tl.load(tie_ptr + offs, mask=mask, other=0.0)
    dz = att * datt - tie * total[None, :]
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_features_bwd_kernel(
    ddz_ptr, zdw_ptr, feat_ptr, dfeat_ptr,
    C, H, W,
    KSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dA' = dwᵀ_z(dZ·pw_z) ∘ (1 − A²): the gradient of A's pre-activation (the GEMM dZ·pw_z
    runs between launches)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < HW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    dfeat = depthwise_tile(ddz_ptr + b * HW * C, offs_m // W, offs_m % W, mask_m, offs_n, mask_n,
                           C, H, W, zdw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
    a = tl.load(feat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dfeat_ptr + offs, (dfeat * (1.0 - a * a)).to(dfeat_ptr.dtype.element_ty), mask=mask)


def _unpack(params):
    return [p.contiguous() for p in params]


def _x_side(frames, p, steps, batch, pixels, hidden):
    """xc = SepConv_x(X) + b_c, xa = SepConv_xa(X) + b_a (rows), xg = U_x x̄ + b_g (fp32)."""
    gwx, _, gb, cdwx, cpwx, _, _, cb, adwx, apwx, _, _, ab, _, _ = p
    _, xc = sepconv_rows(frames, cdwx, cpwx, cb)
    _, xa = sepconv_rows(frames, adwx, apwx, ab)
    xg = F.linear(frames.mean((-2, -1), dtype=torch.float32), gwx.float(), gb.float())
    shape = (steps, batch * pixels, hidden)
    return xc.view(shape), xa.view(shape), xg.view(steps, batch, 2 * hidden)


def _attention_logits_step(h_prev, xc, xa, p, cand, feat, logits, zpart, height, width, grid,
                           launch, dot):
    """Launches (1) and (2) of one forward step, from ``h_prev`` rows ``[B·H·W, C]`` and the step's
    X-side terms: ``cand`` ← G_t, ``feat`` ← A_t, ``logits`` ← Z_t (fp32 rows) and ``zpart
    [B, tiles, C]`` ← its per-tile channel maxima. The backward recomputes A_t and Z_t through
    this same call: the tie mask of max_HW Z must be taken on the very numbers the forward
    normalised by (an ATen recompute rounds differently and, in bf16, can move the max)."""
    hidden = h_prev.shape[1]
    cdwh, cpwh, adwh, apwh, zdw, zpw = (p[i] for i in (5, 6, 10, 11, 13, 14))
    ksize = cdwh.shape[-1]
    _attention_features_kernel[grid](h_prev, xc, xa, cdwh, cpwh, adwh, apwh, cand, feat,
                                     hidden, height, width, KSIZE=ksize, DOT_PRECISION=dot,
                                     RAW_CAND=False, **launch)
    _attention_logits_kernel[grid](feat, zdw, zpw, logits, zpart, hidden, height, width,
                                   zpart.shape[1], KSIZE=ksize, DOT_PRECISION=dot, **launch)


def _channel_attention_forward(x, h0, c0, params, gate_activation: int, output_gate: bool):
    p = _unpack(params)
    gwh = p[1]
    steps, batch, cin, height, width = x.shape
    hidden, pixels = h0.shape[1], height * width
    frames = x.reshape(steps * batch, cin, height, width)
    xc, xa, xg = _x_side(frames, p, steps, batch, pixels, hidden)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    out = x.new_empty(steps, batch * pixels, hidden)
    cell, cand, att = torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)
    gate_preact = x.new_empty(steps, batch, 2 * hidden)
    feat = torch.empty_like(out[0])
    logits = torch.empty(batch * pixels, hidden, device=x.device, dtype=torch.float32)
    zpart = torch.empty(batch, tiles, hidden, device=x.device, dtype=torch.float32)
    c_state = rows(c0).to(torch.float32, copy=True)
    hpart = torch.zeros(2, batch, tiles, hidden, device=x.device, dtype=torch.float32)
    hpart[1, :, 0] = h0.sum((-2, -1), dtype=torch.float32)
    h_prev = rows(h0)
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    launch = dict(BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_c, **LAUNCH)
    dot = dot_precision(x.dtype)
    for t in range(steps):
        _attention_logits_step(h_prev, xc[t], xa[t], p, cand[t], feat, logits, zpart, height,
                               width, grid, launch, dot)
        _attention_cell_kernel[grid](logits, zpart, c_state, cand[t], xg[t], hpart[(t + 1) % 2],
                                     hpart[t % 2], gwh, out[t], cell[t], att[t], gate_preact[t],
                                     hidden, height, width, tiles, ACT=gate_activation,
                                     OUTPUT_GATE=output_gate, **launch)
        h_prev = out[t]
    state_shape = (steps, batch, height, width, hidden)
    output = out.view(state_shape).permute(0, 1, 4, 2, 3).contiguous()
    h_n = nchw(out[-1], batch, height, width).clone(memory_format=torch.contiguous_format)
    c_n = nchw(c_state, batch, height, width).to(x.dtype, memory_format=torch.contiguous_format,
                                                 copy=True)
    return output, h_n, c_n, [cell.view(state_shape), cand.view(state_shape), gate_preact,
                              att.view(state_shape)]


def _channel_attention_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                                saved, gate_activation: int, output_gate: bool):
    p = _unpack(params)
    gwx, gwh, _, cdwx, cpwx, cdwh, cpwh, _, adwx, apwx, adwh, apwh, _, zdw, zpw = p
    steps, batch, cin, height, width = x.shape
    hidden, pixels, ksize = h0.shape[1], height * width, cdwh.shape[-1]
    state = (steps, batch * pixels, hidden)
    cell, cand, gate_preact, att = saved
    cell, cand, att = (s.reshape(state).contiguous() for s in (cell, cand, att))
    gate_preact = gate_preact.contiguous()
    frames = x.reshape(steps * batch, cin, height, width)
    maps = steps * batch

    # A_t and Z_t are not saved: each step of the loop recomputes them with the forward's kernels.
    xc, xa, _ = _x_side(frames, p, steps, batch, pixels, hidden)
    h_prev = torch.cat([h0[None], output[:-1]]).reshape(maps, hidden, height, width)
    h_prev_rows = rows(h_prev).view(state)

    gout = grad_output.permute(0, 1, 3, 4, 2).clone(memory_format=torch.contiguous_format)
    gout = gout.view(state)
    gout[-1] += rows(grad_h_n)
    dc = rows(grad_c_n).to(torch.float32, copy=True)
    c0_rows = rows(c0)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    f32 = dict(device=x.device, dtype=torch.float32)
    dacc, ddw_c, dz, ddz, dfeat, ddw_a, feat = (torch.empty_like(gout) for _ in range(7))
    cand_scratch = torch.empty_like(gout[0])  # the recompute's G (the saved G is used)
    logits, datt = torch.empty(state[1:], **f32), torch.empty(state[1:], **f32)
    zpart = torch.empty(batch, tiles, hidden, **f32)
    spart = torch.empty(batch, tiles, hidden, **f32)
    gpart = torch.empty(steps, batch, tiles, 2 * hidden, **f32)
    dgp = torch.empty(steps, batch, 2 * hidden, **f32)
    grad_h0_rows = torch.empty_like(gout[0])
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    launch = dict(BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_c, **LAUNCH)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_c, **LAUNCH)
    dot = dot_precision(x.dtype)
    for t in range(steps - 1, -2, -1):
        here, rec = max(t, 0), min(t + 1, steps - 1)
        _attention_cell_bwd_kernel[grid](
            ddw_c[rec], ddw_a[rec], gpart[rec], gate_preact[rec], dgp[rec], gwh, cdwh, adwh,
            gout[here], grad_h0_rows, cell[here], cell[t - 1] if t > 0 else c0_rows, cand[here],
            att[here], gate_preact[here], dc, dacc[here], datt, spart, gpart[here],
            hidden, height, width, tiles, KSIZE=ksize, ACT=gate_activation,
            OUTPUT_GATE=output_gate, HAS_REC=t < steps - 1, CELL=t >= 0, **launch)
        if t < 0:
            break
        _attention_logits_step(h_prev_rows[t], xc[t], xa[t], p, cand_scratch, feat[t], logits,
                               zpart, height, width, grid, launch, dot)
        # τ = [Z = max_HW Z] / #ties per (sample, channel), on the forward's own Z_t
        z_maps = logits.view(batch, pixels, hidden)
        is_max = z_maps == z_maps.amax(1, keepdim=True)
        tie = (is_max / is_max.sum(1, keepdim=True)).view(state[1:])
        _attention_logits_bwd_kernel[grid](att[t], datt, tie, spart, dz[t], hidden, pixels,
                                           tiles, **blocks)
        torch.mm(dz[t], zpw, out=ddz[t])                   # d dw_z(A) = dZ · pw_z
        _attention_features_bwd_kernel[grid](ddz[t], zdw, feat[t], dfeat[t], hidden, height,
                                             width, KSIZE=ksize, **blocks)
        torch.mm(dacc[t], cpwh, out=ddw_c[t])              # d dw_h(H_{t−1}) = dacc · pw_h
        torch.mm(dfeat[t], apwh, out=ddw_a[t])             # d dw_ha(H_{t−1}) = dA' · pw_ha

    # Weight gradients of all steps in batched products.
    def flat(buffer):
        return buffer.view(-1, hidden)

    def as_maps(buffer):
        return nchw(flat(buffer), maps, height, width)

    feat_maps = as_maps(feat)
    grad_cpwh = flat(dacc).t() @ rows(depthwise(h_prev, cdwh))
    _, grad_cdwh = depthwise_backward(as_maps(ddw_c), h_prev, cdwh, False)
    grad_apwh = flat(dfeat).t() @ rows(depthwise(h_prev, adwh))
    _, grad_adwh = depthwise_backward(as_maps(ddw_a), h_prev, adwh, False)
    grad_zpw = flat(dz).t() @ rows(depthwise(feat_maps, zdw))
    _, grad_zdw = depthwise_backward(as_maps(ddz), feat_maps, zdw, False)
    dgp_rows = dgp.view(maps, 2 * hidden)
    grad_gwh = dgp_rows.t() @ h_prev.mean((-2, -1), dtype=torch.float32)
    grad_gwx = dgp_rows.t() @ frames.mean((-2, -1), dtype=torch.float32)
    grad_fc, grad_cdwx, grad_cpwx = sepconv_rows_backward(flat(dacc), frames,
                                                          rows(depthwise(frames, cdwx)), cdwx, cpwx)
    grad_fa, grad_adwx, grad_apwx = sepconv_rows_backward(flat(dfeat), frames,
                                                          rows(depthwise(frames, adwx)), adwx, apwx)
    grad_frames = grad_fc + grad_fa
    grad_frames = grad_frames + ((dgp_rows @ gwx.float()) / pixels).to(x.dtype)[:, :, None, None]
    grads = [grad_gwx, grad_gwh, dgp_rows.sum(0), grad_cdwx, grad_cpwx, grad_cdwh, grad_cpwh,
             flat(dacc).sum(0, dtype=torch.float32), grad_adwx, grad_apwx, grad_adwh, grad_apwh,
             flat(dfeat).sum(0, dtype=torch.float32), grad_zdw, grad_zpw]
    grad_x = grad_frames.reshape(x.shape).contiguous()
    grad_h0 = nchw(grad_h0_rows, batch, height, width).contiguous()
    grad_c0 = nchw(dc, batch, height, width).to(x.dtype, memory_format=torch.contiguous_format,
                                               copy=True)
    return grad_x, grad_h0, grad_c0, [g.to(q.dtype).contiguous() for g, q in zip(grads, params)]


def input_attention_layer_forward(x, h0, c0, params, gate_activation: int):
    """Variant (c): ``(output, h_n, c_n, [cell, candidate, gate_preact [T, B, 2C], attention])``."""
    return _channel_attention_forward(x, h0, c0, params, gate_activation, False)


def input_attention_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                                   saved, gate_activation: int):
    return _channel_attention_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params,
                                       output, saved, gate_activation, False)


def output_attention_layer_forward(x, h0, c0, params, gate_activation: int):
    """Variant (d): as (c) with the attention map as the output gate."""
    return _channel_attention_forward(x, h0, c0, params, gate_activation, True)


def output_attention_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                                    saved, gate_activation: int):
    return _channel_attention_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params,
                                       output, saved, gate_activation, True)


def compile_cases(dtype: torch.dtype, ksize: int, block_c: int, gate_activation: int, dot: str):
    """(kernel, fp32 pointer names, constexprs, launch options) of every kernel these ops launch
    on a GPU (for compile_check); other pointers are x.dtype."""
    blocks = dict(BLOCK_M=GPU_BLOCK_M, BLOCK_N=block_c)
    gemm = dict(blocks, BLOCK_K=block_c, KSIZE=ksize, DOT_PRECISION=dot)
    cases = [
        (_attention_features_kernel, set(), dict(gemm, RAW_CAND=False), LAUNCH),
        (_attention_features_kernel, {"xc_ptr", "cand_ptr"}, dict(gemm, RAW_CAND=True),
         LAUNCH),  # b: spatial_attention_layer
        (_attention_logits_kernel, {"z_ptr", "zpart_ptr"}, gemm, LAUNCH),
        (_attention_logits_bwd_kernel, {"datt_ptr", "tie_ptr", "spart_ptr"}, blocks, LAUNCH),
        (_attention_features_bwd_kernel, set(), dict(blocks, KSIZE=ksize), LAUNCH),
    ]
    fwd_fp32 = {"z_ptr", "zpart_ptr", "c_ptr", "xg_ptr", "hpart_prev_ptr", "hpart_next_ptr"}
    bwd_fp32 = {"gpart_next_ptr", "dgp_next_ptr", "dc_ptr", "datt_ptr", "spart_ptr", "gpart_ptr"}
    for output_gate in (False, True):
        cell = dict(blocks, BLOCK_K=block_c, ACT=gate_activation, OUTPUT_GATE=output_gate)
        cases.append((_attention_cell_kernel, fwd_fp32, cell, LAUNCH))
        for has_rec, is_cell in ((True, True), (False, True), (True, False)):
            cases.append((_attention_cell_bwd_kernel, bwd_fp32,
                          dict(cell, KSIZE=ksize, HAS_REC=has_rec, CELL=is_cell), LAUNCH))
    return cases
