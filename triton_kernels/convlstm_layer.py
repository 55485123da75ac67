"""``convlstm_fast::convlstm_layer_triton``: the original ConvLSTM, one layer over a sequence.

    [i f g o] = W_x * X_t + W_h * H_{t−1} + b;   i, f, o = σ(·), G = tanh(g)      (SPEC eqs. 1-4)
    C_t = f ∘ C_{t−1} + i ∘ G;   H_t = o ∘ tanh(C_t)                              (eqs. 5-6)

Forward: ``xz = W_x * X + b`` for all steps in one ATen convolution, then ONE launch per step
(``_convlstm_layer_fwd_kernel``): the H-side K×K convolution as an implicit GEMM over (K·K·C)
producing the four gate slices of the same output channels in one program, with the LSTM
epilogue fused. Backward (the walk backwards): ONE launch per step (``_convlstm_layer_bwd_kernel``):
the transposed implicit GEMM of the next step's gate gradients back to dH_t, fused with the cell
backward of step t. Weight and input gradients: two batched ATen convolution backwards after the
loop. Saved per step (as the native op): C_t and the gate pre-activations (1 + 4 state tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (GPU_BLOCK_M, SequenceFrames, StepMask, Walk, block_sizes, dot_precision,
                      gate_act, gate_act_grad, layer_input_grads, layer_outputs, map_tile, nchw,
                      output_grads, program_tile, rows, rows_fp32, tanh, tanh_with_grad)
from ._weight_grads import conv_weight_grad
# The traffic models of the shared host helpers (for traffic() below).
from ._common import (gpu_grid, h_prev_all_traffic, layer_input_grads_traffic,
                      layer_outputs_traffic, output_grads_traffic)


# Before sm_90 the forward's tensor-core path does not fit 16 warps' 128 registers: on sm_80 it
# spills 4.3 KB a thread there (bf16, triton 3.9) and 0.3 KB at 8 warps, so sm_80's forward keeps
# 8 (its backward is better at 16: at 8 the fp32 one spills 7 KB). compile_check compiles each
# architecture with its own (the "per_arch" key).
PER_ARCH_FWD_LAUNCH = {80: dict(num_warps=8)}


def gpu_arch(device: torch.device) -> int:
    """90 for sm_90 and newer (and off CUDA), else 80: the key of PER_ARCH_FWD_LAUNCH."""
    if device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def launch_options(dtype: torch.dtype, arch: int | None = None, forward: bool = True) -> dict:
    """16 warps (4 warpgroups): the four fp32 accumulators of BLOCK_M × BLOCK_N are 32 registers
    per thread, and ptxas's 128-register cap at 16 warps (65536 per SM) still holds both step
    kernels without spilling (compile_check, triton 3.6, sm_90): one program per SM, 16 warps,
    25 % occupancy. At 8 warps both needed 255 registers and spilled (one program per SM, 12.5 %);
    maxnreg=128 at 8 warps spills ~0.6-1.3 KB. Two pipeline stages for 16-bit operands; fp32
    tiles are twice as large, one stage keeps them within sm_80's 163 KB. The fp32 forward with
    IEEE dots (FMA, not tensor cores) fits only one gate at a time (:func:`gate_at_a_time`)."""
    options = dict(num_warps=16, num_stages=1 if dtype == torch.float32 else 2)
    if not forward:
        return options
    if arch is None:  # compile_check: every architecture's, for it to pick from
        return dict(options, per_arch=PER_ARCH_FWD_LAUNCH)
    return dict(options, **PER_ARCH_FWD_LAUNCH.get(arch, {}))


# The forward's reduction chunk: BLOCK_K = min(BLOCK_C, FWD_BLOCK_K). 32 keeps the TF32 (and the
# 16-bit) forward free of spills at 16 warps, where 64 spilled 8 B in TF32 (compile_check). The
# backward reduces over 4C in chunks of BLOCK_C.
FWD_BLOCK_K = 32


def gate_at_a_time(dtype: torch.dtype, dot: str) -> bool:
    """Whether the forward runs one reduction loop per gate (GATE_AT_A_TIME): for fp32 with IEEE
    dots. Their FMA operand fragments (every BLOCK_K column of a thread's H rows, shared by the
    four gate dots, with each dot's weight fragment on top) do not fit 16 warps' 128 registers:
    ptxas falls back to 32 registers and spills 3.2 KB a thread on sm_90 (triton 3.6,
    compile_check; 0.2-14 KB at every BLOCK_K and warp count tried). One loop per gate keeps one
    H and one weight fragment live: 116 registers, no spill, at K = 1, 3 and 5. It reads each H
    tile four times (from L1/L2: the modelled HBM traffic is the same); IEEE fp32 is the slow
    FMA path either way."""
    return dtype == torch.float32 and dot == "ieee"


def forward_constexprs(dtype: torch.dtype, block_c: int, dot: str) -> dict:
    """The forward kernel's GATE_AT_A_TIME and BLOCK_K for a launch."""
    return dict(GATE_AT_A_TIME=gate_at_a_time(dtype, dot), BLOCK_K=min(block_c, FWD_BLOCK_K))


@triton.jit
def _h_tap_tiles(it, chunks, h_prev, w_ptr, C, C4, H, W, oy, ox, mask_m, offs_n, mask_n,
                 KSIZE: tl.constexpr, BLOCK_K: tl.constexpr, CHANNEL_MAJOR: tl.constexpr):
    """Iteration ``it`` of the forward's (tap, channel chunk) loop: the shifted tile
    ``[BLOCK_M, BLOCK_K]`` of the NCHW map H_{t−1} and the address and mask of the gate-i weight
    tile ``[BLOCK_K, BLOCK_N]`` (gate j's is ``j·C`` further on). CHANNEL_MAJOR loads the H tile
    as ``[BLOCK_K, BLOCK_M]``, the map's own order, and transposes it: what the tensor-core dots
    need without spilling (the pixel-major load spilled 4 B in 16-bit on sm_90, triton 3.6),
    while the FMA dots of fp32 IEEE spilled ~0.9 KB with it and take the pixel-major tile."""
    PAD: tl.constexpr = KSIZE // 2
    tap = it // chunks
    offs_k = (it % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < C
    iy = oy + (tap // KSIZE - PAD)
    ix = ox + (tap % KSIZE - PAD)
    valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    if CHANNEL_MAJOR:
        hv = tl.trans(tl.load(h_prev + offs_k[:, None] * (H * W) + (iy * W + ix)[None, :],
                              mask=mask_k[:, None] & valid[None, :], other=0.0))
    else:
        hv = tl.load(h_prev + offs_k[None, :] * (H * W) + (iy * W + ix)[:, None],
                     mask=valid[:, None] & mask_k[None, :], other=0.0)
    wbase = w_ptr + tap * C * C4 + offs_k[:, None] * C4 + offs_n[None, :]
    return hv, wbase, mask_k[:, None] & mask_n[None, :]


@triton.jit
def _h_gate_conv(h_prev, w_gate, C, C4, H, W, oy, ox, mask_m, offs_n, mask_n,
                 KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W_h * H_{t−1} for one gate (``w_gate`` = w + j·C): one dot per loop iteration."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    chunks = tl.cdiv(C, BLOCK_K)
    for it in range(KSIZE * KSIZE * chunks):
        hv, wbase, wmask = _h_tap_tiles(it, chunks, h_prev, w_gate, C, C4, H, W, oy, ox,
                                        mask_m, offs_n, mask_n, KSIZE, BLOCK_K, False)
        acc = tl.dot(hv, tl.load(wbase, mask=wmask, other=0.0), acc,
                     input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _convlstm_layer_fwd_kernel(
    h_prev_ptr, c_ptr, xz_ptr, w_ptr,
    h_out_ptr, cell_ptr, gates_ptr,
    C, H, W,
    KSIZE: tl.constexpr, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GATE_AT_A_TIME: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step for BLOCK_M pixels of sample b × BLOCK_N channels of each gate. NCHW maps
    ``[B, C, H, W]``: h_prev (H_{t−1}) and h_out (H_t, the step's slice of the layer's output).
    Rows: c fp32 ``[B·H·W, C]`` (C_{t−1} in, C_t out, in place), xz
    ``[B·H·W, 4C]`` (W_x * X_t + b), w ``[K·K, C, 4C]`` (w[a·K + b, k, j] = W_h[j, k, a, b]).
        z_j[p] = xz[p, j] + Σ_{a,b,k} H_{t−1}[p + (a − P, b − P), k] · W_h[j, k, a, b]
    Without GATE_AT_A_TIME one loop over (tap, channel chunk) does the four gates' dots on each
    H tile; with it (see :func:`gate_at_a_time`) each gate has its own loop, run where the
    epilogue first needs it (i and g, then f, then o)."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    C4 = 4 * C
    h_prev = h_prev_ptr + b * C * HW

    if GATE_AT_A_TIME:
        acc_i = _h_gate_conv(h_prev, w_ptr, C, C4, H, W, oy, ox, mask_m, offs_n, mask_n,
                             KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        acc_g = _h_gate_conv(h_prev, w_ptr + 2 * C, C, C4, H, W, oy, ox, mask_m, offs_n,
                             mask_n, KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # One runtime loop over (tap, channel chunk): each iteration is one H tile and four
        # weight tiles, which the software pipeliner can double-buffer (an unrolled tap loop
        # would make it buffer all K² taps at once).
        chunks = tl.cdiv(C, BLOCK_K)
        for it in range(KSIZE * KSIZE * chunks):
            hv, wbase, wmask = _h_tap_tiles(it, chunks, h_prev, w_ptr, C, C4, H, W, oy, ox,
                                            mask_m, offs_n, mask_n, KSIZE, BLOCK_K, True)
            acc_i = tl.dot(hv, tl.load(wbase, mask=wmask, other=0.0), acc_i,
                           input_precision=DOT_PRECISION)
            acc_f = tl.dot(hv, tl.load(wbase + C, mask=wmask, other=0.0), acc_f,
                           input_precision=DOT_PRECISION)
            acc_g = tl.dot(hv, tl.load(wbase + 2 * C, mask=wmask, other=0.0), acc_g,
                           input_precision=DOT_PRECISION)
            acc_o = tl.dot(hv, tl.load(wbase + 3 * C, mask=wmask, other=0.0), acc_o,
                           input_precision=DOT_PRECISION)

    # Epilogue (eqs. 3-6), one gate at a time so that each accumulator dies as it is used.
    row = (b * HW + offs_m)[:, None]
    mask = mask_m[:, None] & mask_n[None, :]
    zoffs = row * C4 + offs_n[None, :]
    offs = row * C + offs_n[None, :]
    out_ty = gates_ptr.dtype.element_ty
    z_i = acc_i + tl.load(xz_ptr + zoffs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gates_ptr + zoffs, z_i.to(out_ty), mask=mask)
    z_g = acc_g + tl.load(xz_ptr + zoffs + 2 * C, mask=mask, other=0.0).to(tl.float32)
    tl.store(gates_ptr + zoffs + 2 * C, z_g.to(out_ty), mask=mask)
    ig = gate_act(z_i, ACT) * tanh(z_g)
    if GATE_AT_A_TIME:
        acc_f = _h_gate_conv(h_prev, w_ptr + C, C, C4, H, W, oy, ox, mask_m, offs_n, mask_n,
                             KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    z_f = acc_f + tl.load(xz_ptr + zoffs + C, mask=mask, other=0.0).to(tl.float32)
    tl.store(gates_ptr + zoffs + C, z_f.to(out_ty), mask=mask)
    c_new = gate_act(z_f, ACT) * tl.load(c_ptr + offs, mask=mask, other=0.0) + ig
    tl.store(c_ptr + offs, c_new, mask=mask)
    tl.store(cell_ptr + offs, c_new.to(cell_ptr.dtype.element_ty), mask=mask)
    if GATE_AT_A_TIME:
        acc_o = _h_gate_conv(h_prev, w_ptr + 3 * C, C, C4, H, W, oy, ox, mask_m, offs_n,
                             mask_n, KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    z_o = acc_o + tl.load(xz_ptr + zoffs + 3 * C, mask=mask, other=0.0).to(tl.float32)
    tl.store(gates_ptr + zoffs + 3 * C, z_o.to(out_ty), mask=mask)
    h = gate_act(z_o, ACT) * tanh(c_new)
    hoffs, _ = map_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    tl.store(h_out_ptr + hoffs, h.to(h_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _convlstm_layer_bwd_kernel(
    dz_next_ptr, wt_ptr, gout_ptr, dh_ptr,
    cell_ptr, cell_prev_ptr, gates_ptr, dc_ptr, dz_ptr,
    C, H, W,
    KSIZE: tl.constexpr, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_REC: tl.constexpr, CELL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of step t for BLOCK_M pixels of sample b × BLOCK_N hidden channels.

    dH_t = grad_output[t] + Σ_{a,b,j} dz_{t+1}[p − (a − P, b − P), j] · W_h[j, k, a, b]
    (``wt [K·K, 4C, C]``, wt[a·K + b, j, k] = W_h[j, k, a, b]). With CELL (eqs. 3-6 backwards):
        dC = dC_carry + dH ∘ o ∘ (1 − tanh² C_t);   dC_carry ← dC ∘ f
        dz_i = dC ∘ G ∘ σ'(z_i),  dz_f = dC ∘ C_{t−1} ∘ σ'(z_f),  dz_g = dC ∘ i ∘ (1 − G²),
        dz_o = dH ∘ tanh C_t ∘ σ'(z_o)      (stored: ``dz [B·H·W, 4C]``)
    Without CELL, dH is stored: the gradient of h0."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    PAD: tl.constexpr = KSIZE // 2
    C4 = 4 * C
    row = (b * HW + offs_m)[:, None]
    mask = mask_m[:, None] & mask_n[None, :]
    offs = row * C + offs_n[None, :]

    dh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_REC:
        dz_next = dz_next_ptr + b * HW * C4
        chunks = tl.cdiv(C4, BLOCK_K)
        for it in range(KSIZE * KSIZE * chunks):  # (tap, gate-channel chunk), as the forward
            tap = it // chunks
            offs_j = (it % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_j = offs_j < C4
            iy = oy - (tap // KSIZE - PAD)
            ix = ox - (tap % KSIZE - PAD)
            valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            dzv = tl.load(dz_next + (iy * W + ix)[:, None] * C4 + offs_j[None, :],
                          mask=valid[:, None] & mask_j[None, :], other=0.0)
            wv = tl.load(wt_ptr + tap * C4 * C + offs_j[:, None] * C + offs_n[None, :],
                         mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            dh = tl.dot(dzv, wv, dh, input_precision=DOT_PRECISION)
    if CELL:
        # One gate at a time (o, f, then g and i), each loaded where it is first needed, so that
        # few tiles are live at once.
        goffs, _ = map_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)  # grad_output[t], NCHW
        dh += tl.load(gout_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
        zoffs = row * C4 + offs_n[None, :]
        out_ty = dz_ptr.dtype.element_ty
        z_o = tl.load(gates_ptr + zoffs + 3 * C, mask=mask, other=0.0).to(tl.float32)
        tc, dtc = tanh_with_grad(tl.load(cell_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        tl.store(dz_ptr + zoffs + 3 * C, (dh * tc * gate_act_grad(z_o, ACT)).to(out_ty),
                 mask=mask)
        dc = tl.load(dc_ptr + offs, mask=mask, other=0.0) + dh * gate_act(z_o, ACT) * dtc
        z_f = tl.load(gates_ptr + zoffs + C, mask=mask, other=0.0).to(tl.float32)
        tl.store(dc_ptr + offs, dc * gate_act(z_f, ACT), mask=mask)
        c_prev = tl.load(cell_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + zoffs + C, (dc * c_prev * gate_act_grad(z_f, ACT)).to(out_ty),
                 mask=mask)
        g, dg = tanh_with_grad(tl.load(gates_ptr + zoffs + 2 * C, mask=mask,
                                       other=0.0).to(tl.float32))  # G and 1 − G²
        z_i = tl.load(gates_ptr + zoffs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + zoffs, (dc * g * gate_act_grad(z_i, ACT)).to(out_ty), mask=mask)
        tl.store(dz_ptr + zoffs + 2 * C, (dc * gate_act(z_i, ACT) * dg).to(out_ty),
                 mask=mask)
    else:
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


# What one more step launches (Triton kernels, ATen calls; launch_count.py measures it, in fp32):
# one kernel per step each way (the implicit GEMM with the LSTM epilogue, and its backward); W_x·X
# and the weight gradients are batched over all steps — but in fp32 d W_h and d W_x, one call
# and one add_ a step each (_weight_grads.conv_weight_grad; 16-bit dtypes: one call each).
LAUNCHES_PER_STEP = {"forward": (1, 0), "backward": (1, 4)}


def convlstm_layer_forward(x, h0, c0, params, gate_activation: int, reverse: bool = False,
                           lengths=None):
    """``x [T, B, Cin, H, W]``, ``h0``, ``c0`` ``[B, C, H, W]`` -> ``(output [T, B, C, H, W],
    h_n, c_n, [cell [T, B, H, W, C], gates [T, B, H, W, 4C]])``; ``lengths`` masks each
    sample's steps (_common.StepMask)."""
    weight_x, weight_h, bias = params
    steps, batch, cin, height, width = x.shape
    hidden, pixels, ksize = h0.shape[1], height * width, weight_h.shape[-1]
    seq = SequenceFrames(x)
    # W_x * X + b for all steps at once (KERNELS.md "Before the recurrence").
    xz = seq.rows(F.conv2d(seq.frames, weight_x, bias, padding=ksize // 2))
    xz = xz.view(steps, batch * pixels, 4 * hidden)
    w = weight_h.permute(2, 3, 1, 0).reshape(ksize * ksize, hidden, 4 * hidden).contiguous()

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    out = x.new_empty(steps, batch, hidden, height, width)  # the output: H_t stored in place
    cell = x.new_empty(steps, batch * pixels, hidden)
    gates = x.new_empty(steps, batch * pixels, 4 * hidden)
    c_state = rows_fp32(c0)
    grid = (triton.cdiv(pixels, block_m), triton.cdiv(hidden, block_c), batch)
    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)
    h_prev = mask.carry_buffer(h0.contiguous())
    dot = dot_precision(x.dtype)
    for t in walk.forward():
        c_before = mask.hold(c_state)
        _convlstm_layer_fwd_kernel[grid](
            h_prev, c_state, xz[t], w, out[t], cell[t], gates[t], hidden, height, width,
            KSIZE=ksize, ACT=gate_activation, DOT_PRECISION=dot, BLOCK_M=block_m,
            BLOCK_N=block_c, **forward_constexprs(x.dtype, block_c, dot),
            **launch_options(x.dtype, gpu_arch(x.device)),
        )
        if mask.active:
            mask.forward_step(t, out[t], cell[t], c_state, c_before, h_prev)
        else:
            h_prev = out[t]
    state_shape = (steps, batch, height, width, hidden)
    output, h_n, c_n = layer_outputs(out, c_state, x.dtype, batch, height, width, walk,
                                     h_prev if mask.active else None)
    return output, h_n, c_n, [cell.view(state_shape),
                              gates.view(steps, batch, height, width, 4 * hidden)]


def convlstm_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                            gate_activation: int, reverse: bool = False, lengths=None):
    """Gradients of :func:`convlstm_layer_forward` w.r.t. x, h0, c0, weight_x, weight_h, bias."""
    weight_x, weight_h, bias = params
    steps, batch, cin, height, width = x.shape
    hidden, pixels, ksize = h0.shape[1], height * width, weight_h.shape[-1]
    cell = saved[0].reshape(steps, batch * pixels, hidden).contiguous()
    gates = saved[1].reshape(steps, batch * pixels, 4 * hidden).contiguous()
    wt = weight_h.permute(2, 3, 0, 1).reshape(ksize * ksize, 4 * hidden, hidden).contiguous()

    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)
    gout, dc = output_grads(grad_output, grad_h_n, grad_c_n, walk, mask)
    c0_rows = rows(c0)
    dz = torch.empty_like(gates)
    grad_h0_rows = torch.empty_like(cell[0])

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    grid = (triton.cdiv(pixels, block_m), triton.cdiv(hidden, block_c), batch)
    for s in walk.backward():
        dc_held = mask.hold(dc) if s.cell else None
        _convlstm_layer_bwd_kernel[grid](
            mask.rec(s, dz), wt, gout[s.t], grad_h0_rows,
            cell[s.t], s.prev(cell, c0_rows), gates[s.t], dc, dz[s.t],
            hidden, height, width,
            KSIZE=ksize, ACT=gate_activation, DOT_PRECISION=dot_precision(x.dtype),
            HAS_REC=s.has_rec, CELL=s.cell,
            BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_c,
            **launch_options(x.dtype, forward=False),
        )
        if s.cell:
            mask.backward_step(s.t, dc, dc_held, dz[s.t])
    mask.initial_hidden_grad(grad_h0_rows, grad_h_n)

    # Weight and input gradients of all steps: two batched convolution backwards (in fp32 the
    # weights' per step, summed: _weight_grads, 2 ATen calls a step each).
    frames = x.reshape(steps * batch, cin, height, width)
    h_prev = mask.before_each(output, h0).reshape(steps * batch, hidden, height, width)
    dz_maps = nchw(dz.view(-1, 4 * hidden), steps * batch, height, width)
    pad = [ksize // 2] * 2
    grad_wh = conv_weight_grad(dz_maps, h_prev, weight_h, steps)
    per_step = x.dtype == torch.float32
    grad_frames, grad_wx, _ = torch.ops.aten.convolution_backward(
        dz_maps, frames, weight_x, None, [1, 1], pad, [1, 1], False, [0, 0], 1,
        [True, not per_step, False])
    if per_step:
        grad_wx = conv_weight_grad(dz_maps, frames, weight_x, steps)
    grad_bias = dz.view(-1, 4 * hidden).sum(0, dtype=torch.float32).to(bias.dtype)
    grad_x, grad_h0, grad_c0 = layer_input_grads(grad_frames, grad_h0_rows, dc, x)
    return grad_x, grad_h0, grad_c0, [g.contiguous() for g in (grad_wx, grad_wh, grad_bias)]


def compile_cases(dtype: torch.dtype, ksize: int, block_c: int, gate_activation: int, dot: str):
    """(kernel, fp32 pointer names, constexprs, launch options) of every kernel this op launches
    on a GPU with the given kernel size and channel block (for compile_check)."""
    blocks = dict(BLOCK_M=GPU_BLOCK_M, BLOCK_N=block_c, BLOCK_K=block_c, KSIZE=ksize,
                  ACT=gate_activation, DOT_PRECISION=dot)
    back = launch_options(dtype, forward=False)
    return [
        (_convlstm_layer_fwd_kernel, {"c_ptr"},
         dict(blocks, **forward_constexprs(dtype, block_c, dot)), launch_options(dtype)),
        (_convlstm_layer_bwd_kernel, {"dc_ptr"}, dict(blocks, HAS_REC=True, CELL=True), back),
        (_convlstm_layer_bwd_kernel, {"dc_ptr"}, dict(blocks, HAS_REC=False, CELL=True), back),
        (_convlstm_layer_bwd_kernel, {"dc_ptr"}, dict(blocks, HAS_REC=True, CELL=False), back),
    ]


def traffic(shape, itemsize: int) -> list:
    """Modelled HBM bytes and FLOPs of every launch of :func:`convlstm_layer_forward` and
    :func:`convlstm_layer_backward` (bench.roofline's conventions) at ``shape``, on a GPU's
    tiling. Every program of the implicit GEMM loads its K² shifted H tiles over all C input
    channels and the whole ``[K·K, C, 4·BLOCK_N]`` weight slice of its channels (``loaded``:
    the weight is read from L2 once per pixel tile and sample)."""
    from convlstm_fast.bench.roofline import BACKWARD, Recorder, Sizes

    z, r = Sizes(shape, itemsize), Recorder()
    C, cin, k2 = z.C, z.cin, z.K * z.K
    tiles, channel_tiles, _ = gpu_grid(z)
    weight_h = z.weight(4 * C * C * k2)
    r.aten("convolution (W_x * X + b)", z.xseq() + z.weight(4 * C * cin * k2), z.seq(4 * C),
           z.gemm_flops(z.T * z.rows, 4 * C, cin * k2))
    r.aten("clone (xz to rows)", z.seq(4 * C), z.seq(4 * C))
    r.aten("clone (W_h to [K·K, C, 4C])", weight_h, weight_h)
    r.aten("copy_ (c0 to fp32 rows)", z.state(), z.state32())
    gemm = z.gemm_flops(z.rows, 4 * C, C * k2)
    step_read = z.state() + z.state32() + z.state(4 * C) + weight_h
    step_written = z.state(4 * C) + z.state32() + 2 * z.state()
    step_loaded = (step_read + (channel_tiles * k2 - 1) * z.state()
                   + (tiles * z.B - 1) * weight_h)
    r.kernel("_convlstm_layer_fwd_kernel", step_read, step_written, gemm + z.cell_flops(),
             count=z.T, loaded=step_loaded)
    layer_outputs_traffic(r, z)

    r.phase = BACKWARD
    r.aten("clone (W_h to [K·K, 4C, C])", weight_h, weight_h)
    output_grads_traffic(r, z)
    cell_read = 3 * z.state() + z.state(4 * C) + z.state32()  # grad_output, C_t, C_{t−1}, z
    cell_written = z.state32() + z.state(4 * C)  # dC, dz
    rec_read = z.state(4 * C) + weight_h
    rec_loaded = (rec_read + (channel_tiles * k2 - 1) * z.state(4 * C)
                  + (tiles * z.B - 1) * weight_h)
    r.kernel("_convlstm_layer_bwd_kernel (t = T-1)", cell_read, cell_written,
             z.cell_backward_flops())
    r.kernel("_convlstm_layer_bwd_kernel (t < T-1)", cell_read + rec_read, cell_written,
             gemm + z.cell_backward_flops(), count=z.T - 1, loaded=cell_read + rec_loaded)
    r.kernel("_convlstm_layer_bwd_kernel (dH_0)", rec_read if z.T > 1 else 0, z.state(),
             gemm if z.T > 1 else 0, loaded=rec_loaded if z.T > 1 else 0)
    h_prev_all_traffic(r, z)
    if itemsize == 4:  # fp32: the weights' gradients one call a step, summed
        weight_x = z.weight(4 * C * cin * k2)
        r.aten("convolution_backward (dX)", z.seq(4 * C) + weight_x, z.xseq(),
               z.gemm_flops(z.T * z.rows, 4 * C, cin * k2))
        r.per_step_weight_grad("d W_h", z.state(4 * C) + z.state(), weight_h,
                               z.gemm_flops(4 * C, C * k2, z.rows), z.T)
        r.per_step_weight_grad("d W_x", z.state(4 * C) + z.xstep(), weight_x,
                               z.gemm_flops(4 * C, cin * k2, z.rows), z.T)
    else:
        r.aten("convolution_backward (d W_h)", z.seq(4 * C) + z.seq(), weight_h,
               z.gemm_flops(4 * C, C * k2, z.T * z.rows))
        r.aten("convolution_backward (dX, d W_x)", z.seq(4 * C) + z.xseq(), z.xseq(),
               2 * z.gemm_flops(z.T * z.rows, 4 * C, cin * k2))
    r.aten("sum (d bias)", z.seq(4 * C), 4 * C * 4)
    layer_input_grads_traffic(r, z)
    return r.launches
