"""``convlstm_fast::pooled_layer_triton``: variant (a), one layer over a sequence (SPEC "a").

    x̄ = GAP(X_t), h̄ = GAP(H_{t−1});  [i f o] = σ(U_x x̄ + U_h h̄ + b_g)          (eqs. 10-12)
    G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c)                           (eq. 13)
    C_t = f ∘ C_{t−1} + i ∘ G;   H_t = o ∘ tanh(C_t)                              (eqs. 14-15)

Forward: the X-side terms ``xc = SepConv_x(X) + b_c`` and ``xg = U_x x̄ + b_g`` for all steps in
two launches (_common.sepconv_x_rows), then ONE launch per step (``_pooled_layer_fwd_kernel``): pooled gates from
the previous step's per-tile column sums of H, depthwise K×K of H_{t−1} on the fly, pointwise
GEMM (tl.dot), tanh, cell update, H_t, and this step's column sums of H_t.
Backward (the walk backwards): per step one launch (``_common.pooled_layer_bwd_kernel``, which
spatial_attention_layer launches too) plus one GEMM; the weight gradients of all steps are
batched products after the loop.
Saved per step (as the native op): C_t and G (2 state tensors) and the gate pre-activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One import per kind: the step's @triton.jit helpers, the kernel shared with
# spatial_attention_layer, launch choices, and the host-side layout and layer helpers.
from ._common import gate_act, pooled_gate_preacts, program_tile, sepconv_tile, state_tile, tanh
from ._common import load_cell_state, store_cell_state, store_gate_preacts, store_hidden_state
from ._common import pooled_layer_bwd_kernel
from ._common import GPU_BLOCK_CS, GPU_BLOCK_M, POOLED_BWD_LAUNCH, SEPCONV_LAUNCH, block_sizes
from ._common import cell_state_cases, dot_precision
from ._common import StepMask, Walk, depthwise, depthwise_backward, nchw, rows
from ._common import sepconv_rows_backward, sepconv_x_rows
from ._weight_grads import steps_mm
from ._common import CellState, initial_pooled_state, layer_input_grads, output_grads
# The traffic models of the shared host helpers and kernels (for traffic() below).
from ._common import depthwise_backward_traffic, gpu_grid, h_prev_all_traffic
from ._common import initial_pooled_state_traffic, layer_input_grads_traffic
from ._common import output_grads_traffic, pooled_layer_bwd_traffic
from ._common import sepconv_rows_backward_traffic, sepconv_x_rows_traffic

# This kernel's own launch choices (not SEPCONV_LAUNCH's, which other kernels share): a 16-wide
# reduction chunk and 16 warps (82-100 registers on sm_90: one program, 16 warps per SM, 25 %
# occupancy). At SEPCONV_LAUNCH with BLOCK_K = BLOCK_C = 64 it needed more than 255 and
# spilled on sm_90 (~1 KB/thread in bf16 at K = 3 on triton 3.6, even with the depthwise taps as
# a runtime loop and the gates after the main loop); BLOCK_K = 32 with 8 warps fits in 164
# without spilling (one program per SM, 12.5 %); BLOCK_K = 16 at 8 warps capped at 128 registers
# fit triton 3.6 but spilled 8 B in 16-bit at K = 3 with triton 3.9's ptxas flags
# (--regAllocOptLevel=2; compile_check). maxnreg = 128 (16 warps' share anyway) keeps ptxas
# from a low target of its own: reading H_{t−1} from the NCHW output, it picked 64 registers
# for fp32 at K = 1 and 5 and spilled 16-32 B. Never above the channel tile: BLOCK_K =
# min(BLOCK_C, 16).
FWD_BLOCK_K = 16
FWD_LAUNCH = dict(SEPCONV_LAUNCH, num_warps=16, maxnreg=128)


@triton.jit(do_not_specialize=["first", "last"])
def _pooled_layer_fwd_kernel(
    h_prev_ptr, c_ptr, cell_prev_ptr, xc_ptr, xg_ptr, hpart_prev_ptr, hpart_next_ptr,
    dw_ptr, pw_ptr, uh_ptr,
    h_out_ptr, cell_ptr, cand_ptr, gate_ptr, h_n_ptr, c_n_ptr,
    C, H, W, NMT, first, last,
    KSIZE: tl.constexpr, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step for BLOCK_M pixels of sample b × BLOCK_N channels. h_prev (H_{t−1}) and h_out
    (H_t) are NCHW maps ``[B, C, H, W]`` (the layer's output, step by step); rows ``[B·H·W, C]``:
    xc (SepConv_x(X_t) + b_c); xg ``[B, 3C]`` (U_x x̄_t + b_g, fp32), hpart ``[B, NMT, C]`` fp32
    column sums of H per pixel tile (prev: H_{t−1}, read; next: H_t, written); the cell state
    (``c``, ``cell_prev``, ``first``, SPLIT) and the last step's h_n, c_n as
    :class:`_common.CellState` hands them. Writes H_t, C_t, G and the gates' z."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)

    # SepConv_h(H_{t−1}) = Σ_k dw(H_{t−1})[:, k] · pw_h[n, k]   (depthwise on the fly, then MMA)
    h_prev = h_prev_ptr + b * C * HW
    acc = sepconv_tile(h_prev, oy, ox, mask_m, offs_n, mask_n, C, H, W, dw_ptr, pw_ptr,
                       KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, False)

    # [i f o] pre-activations for this program's channels (eqs. 10-12), U_h h̄ recomputed here;
    # after the main loop, so that they are not live across it (only the epilogue needs them).
    z_i, z_f, z_o = pooled_gate_preacts(xg_ptr, hpart_prev_ptr, uh_ptr, b, offs_n, mask_n, C,
                                        NMT, HW, 3, BLOCK_K)
    store_gate_preacts(gate_ptr, z_i, z_f, z_o, b, pid_m, offs_n, mask_n, C, 3)
    gi = gate_act(z_i, ACT)
    gf = gate_act(z_f, ACT)
    go = gate_act(z_o, ACT)

    # Epilogue (eqs. 13-15): G = tanh(acc + xc), C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t).
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    g = tanh(acc + tl.load(xc_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    c_prev = load_cell_state(c_ptr, cell_prev_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                             first, SPLIT)
    c_new = gf[None, :] * c_prev + gi[None, :] * g
    h = (go[None, :] * tanh(c_new)).to(h_out_ptr.dtype.element_ty)
    store_cell_state(c_new, c_ptr, cell_ptr, c_n_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                     last, SPLIT)
    tl.store(cand_ptr + offs, g.to(cand_ptr.dtype.element_ty), mask=mask)
    # H_t and its column sums over this tile's pixels: the next step's h̄.
    store_hidden_state(h, h_out_ptr, h_n_ptr, hpart_next_ptr, offs_m, mask_m, b, pid_m, offs_n,
                       mask_n, C, HW, NMT, last)


# What one more step launches (Triton kernels, ATen calls; launch_count.py measures it): forward,
# the step kernel alone; backward, the step kernel and d dw(H_{t−1}), one GEMM. The X side and
# the weight gradients are batched over all steps.
LAUNCHES_PER_STEP = {"forward": (1, 0), "backward": (1, 1)}


def _unpack(params):
    (gate_weight_x, gate_weight_h, gate_bias, cand_dw_x, cand_pw_x, cand_dw_h, cand_pw_h,
     cand_bias) = params
    return (gate_weight_x, gate_weight_h.contiguous(), gate_bias, cand_dw_x, cand_pw_x,
            cand_dw_h.contiguous(), cand_pw_h.contiguous(), cand_bias)


def pooled_layer_forward(x, h0, c0, params, gate_activation: int, reverse: bool = False,
                         lengths=None):
    """``x [T, B, Cin, H, W]``, ``h0``, ``c0`` ``[B, C, H, W]`` -> ``(output [T, B, C, H, W],
    h_n, c_n, [cell [T, B, H, W, C], candidate [T, B, H, W, C], gate_preact [T, B, 3C]])``;
    ``lengths`` masks each sample's steps (_common.StepMask)."""
    gwx, gwh, gb, dwx, pwx, dwh, pwh, cb = _unpack(params)
    steps, batch, cin, height, width = x.shape
    hidden, pixels = h0.shape[1], height * width
    ksize = dwh.shape[-1]
    # Everything that depends only on X, for all steps at once (KERNELS.md "Before the recurrence").
    xc, xg = sepconv_x_rows(x, dwx, pwx, cb, gwx, gb)
    xc = xc.view(steps, batch * pixels, hidden)
    xg = xg.view(steps, batch, 3 * hidden)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    out = x.new_empty(steps, batch, hidden, height, width)  # the output: H_t stored in place
    cell = x.new_empty(steps, batch * pixels, hidden)
    cand = torch.empty_like(cell)
    gate_preact = x.new_empty(steps, batch, 3 * hidden)
    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)
    h_prev, hpart = initial_pooled_state(h0, tiles, walk)
    h_prev = mask.carry_buffer(h_prev)
    state = CellState(h0, c0, cell, walk, mask)
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    for t in walk.forward():
        held = state.hold()
        c, c_prev, first, last = state.step(t)
        _pooled_layer_fwd_kernel[grid](
            h_prev, c, c_prev, xc[t], xg[t], hpart[(t + 1) % 2], hpart[t % 2], dwh, pwh, gwh,
            out[t], cell[t], cand[t], gate_preact[t], state.h_n, state.c_n,
            hidden, height, width, tiles, first, last,
            KSIZE=ksize, ACT=gate_activation, DOT_PRECISION=dot_precision(x.dtype),
            SPLIT=state.split,
            BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=min(block_c, FWD_BLOCK_K), **FWD_LAUNCH,
        )
        if mask.active:
            state.forward_step(t, out[t], held, h_prev, hpart[t % 2], hpart[(t + 1) % 2])
        else:
            h_prev = out[t]
    state_shape = (steps, batch, height, width, hidden)
    output, h_n, c_n = state.outputs(out, h_prev)
    return output, h_n, c_n, [cell.view(state_shape), cand.view(state_shape), gate_preact]


def pooled_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                          gate_activation: int, reverse: bool = False, lengths=None):
    """Gradients of :func:`pooled_layer_forward` w.r.t. x, h0, c0 and every parameter."""
    gwx, gwh, gb, dwx, pwx, dwh, pwh, cb = _unpack(params)
    steps, batch, cin, height, width = x.shape
    hidden, pixels = h0.shape[1], height * width
    ksize = dwh.shape[-1]
    cell, cand, gate_preact = saved
    cell = cell.reshape(steps, batch * pixels, hidden).contiguous()
    cand = cand.reshape(steps, batch * pixels, hidden).contiguous()
    gate_preact = gate_preact.contiguous()

    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)
    gout, dc = output_grads(grad_output, grad_h_n, grad_c_n, walk, mask)
    c0_rows = rows(c0)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    dacc = torch.empty_like(cell)
    ddw = torch.empty_like(cell)
    gpart = torch.empty(steps, batch, tiles, 3 * hidden, device=x.device, dtype=torch.float32)
    dgp = torch.empty(steps, batch, 3 * hidden, device=x.device, dtype=torch.float32)
    grad_h0_rows = torch.empty_like(cell[0])
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    for s in walk.backward():
        t = s.t
        # The data of step s.rec, whose gradients flow into H_t (mask.rec: as the walk has it,
        # but for the reverse walk's dH_0 launch under lengths).
        dc_held = mask.hold(dc) if s.cell else None
        ddw_rec, dgp_rec = mask.rec(s, ddw), mask.rec(s, dgp)
        pooled_layer_bwd_kernel[grid](
            ddw_rec, mask.rec(s, gpart), mask.rec(s, gate_preact), dgp_rec, gwh, dwh, ddw_rec,
            dwh, gout[t], grad_h0_rows, cell[t], s.prev(cell, c0_rows), cand[t],
            gate_preact[t], dc, dacc[t], gpart[t],
            hidden, height, width, tiles,
            KSIZE=ksize, ACT=gate_activation, HAS_REC=s.has_rec, CELL=s.cell,
            ATT_PATH=False,
            BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_c, **POOLED_BWD_LAUNCH,
        )
        if s.cell:
            mask.backward_step(t, dc, dc_held, dacc[t], gpart[t])
            torch.mm(dacc[t], pwh, out=ddw[t])  # d dw(H_{t−1}) = dacc_t · pw_h
        else:
            mask.rec_written(s, dgp, dgp_rec)
    mask.initial_hidden_grad(grad_h0_rows, grad_h_n)

    # Weight gradients of all steps in batched products (KERNELS.md "after the loop"), summed
    # per step in fp32 (_weight_grads).
    frames = x.reshape(steps * batch, cin, height, width)
    h_prev = mask.before_each(output, h0).reshape(steps * batch, hidden, height, width)
    dacc_rows = dacc.view(-1, hidden)
    dgp_rows = dgp.view(steps * batch, 3 * hidden)
    grad_pwh = steps_mm(dacc_rows, rows(depthwise(h_prev, dwh)), steps)
    _, grad_dwh = depthwise_backward(nchw(ddw.view(-1, hidden), steps * batch, height, width),
                                     h_prev, dwh, False, steps)
    grad_cb = dacc_rows.sum(0, dtype=torch.float32)
    grad_gb = dgp_rows.sum(0)
    grad_gwh = steps_mm(dgp_rows, h_prev.mean((-2, -1), dtype=torch.float32), steps)
    xbar = frames.mean((-2, -1), dtype=torch.float32)
    grad_gwx = steps_mm(dgp_rows, xbar, steps)
    d_rows = rows(depthwise(frames, dwx))
    grad_frames, grad_dwx, grad_pwx = sepconv_rows_backward(dacc_rows, frames, d_rows, dwx, pwx,
                                                            steps)
    # GAP(X) feeds the gates: dX += (dgp · U_x) / HW broadcast over the map.
    grad_frames = grad_frames + ((dgp_rows @ gwx.float()) / pixels).to(x.dtype)[:, :, None, None]
    grad_x, grad_h0, grad_c0 = layer_input_grads(grad_frames, grad_h0_rows, dc, x)
    grads = [grad_gwx, grad_gwh, grad_gb, grad_dwx, grad_pwx, grad_dwh, grad_pwh, grad_cb]
    return grad_x, grad_h0, grad_c0, [g.to(p.dtype).contiguous() for g, p in zip(grads, params)]


def compile_cases(dtype: torch.dtype, ksize: int, block_c: int, gate_activation: int, dot: str):
    """(kernel, pointer types, constexprs, launch options) of the kernel defined here, as this
    op launches it on a GPU with the given kernel size and channel block (for compile_check; _common's cases cover its backward kernel); other pointers are
    x.dtype."""
    blocks = dict(BLOCK_M=GPU_BLOCK_M, BLOCK_N=block_c, BLOCK_K=min(block_c, FWD_BLOCK_K),
                  KSIZE=ksize, ACT=gate_activation, DOT_PRECISION=dot)
    state_types, state_flags = cell_state_cases(dtype)
    fwd_types = {**dict.fromkeys(("xg_ptr", "hpart_prev_ptr", "hpart_next_ptr"), "fp32"),
                 **state_types}
    return [(_pooled_layer_fwd_kernel, fwd_types, dict(blocks, **state_flags), FWD_LAUNCH)]


def traffic(shape, itemsize: int) -> list:
    """Modelled HBM bytes and FLOPs of every launch of :func:`pooled_layer_forward` and
    :func:`pooled_layer_backward` (bench.roofline's conventions) at ``shape``, on a GPU's tiling.
    The step kernel reads H_{t−1}, C_{t−1}, xc[t] and writes H_t, C_t, the saved C_t and G
    (the cell state as _common.CellState keeps it): each of its C/BLOCK_N channel tiles redoes
    the depthwise of all C channels of H_{t−1} (``loaded``: K² taps per tile) and U_h·h̄ for its
    channels."""
    from convlstm_fast.bench.roofline import BACKWARD, Recorder, Sizes, cell_state_steps

    z, r = Sizes(shape, itemsize), Recorder()
    C, cin, maps = z.C, z.cin, z.T * z.B
    tiles, channel_tiles, programs = gpu_grid(z)
    sepconv_x_rows_traffic(r, z, cin, C, gates=3)
    initial_pooled_state_traffic(r, z)
    hpart = z.B * tiles * C * 4
    weights = z.weight(z.K * z.K * C + C * C + 3 * C * C)
    read = 2 * z.state() + z.vec(3 * C) + hpart + weights
    written = 2 * z.state() + z.vec(3 * C, z.s) + hpart
    per_program = GPU_BLOCK_CS[0] * C * z.s * 4 + tiles * C * 4  # pw_h and U_h slices, h̄ sums
    loaded_extra = (channel_tiles * z.K * z.K - 1) * z.state() + programs * per_program
    flops = (channel_tiles * z.depthwise_flops(C) + z.gemm_flops(z.rows, C, C)
             + programs * 2 * 3 * GPU_BLOCK_CS[0] * C + z.cell_flops())
    cell_state_steps(r, z, "_pooled_layer_fwd_kernel", read, written, flops, loaded_extra)

    r.phase = BACKWARD
    output_grads_traffic(r, z)
    pooled_layer_bwd_traffic(r, z, att_path=False)
    r.aten("mm (ddw = dacc · pw_h)", z.state() + z.weight(C * C), z.state(),
           z.gemm_flops(z.rows, C, C), count=z.T)
    h_prev_all_traffic(r, z)
    r.aten("convolution (depthwise of H_{t-1})", z.seq(), z.seq(), z.depthwise_flops(C, z.T))
    r.aten("clone (rows)", z.seq(), z.seq())
    r.aten("mm (d pw_h)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, z.T * z.rows))
    depthwise_backward_traffic(r, z, C, z.T, need_input=False)
    r.aten("sum (d b_c)", z.seq(), C * 4)
    r.aten("mean (GAP(H_{t-1}))", z.seq(), maps * C * 4)
    r.aten("mean (GAP(X))", z.xseq(), maps * cin * 4)
    r.aten("convolution (depthwise of X)", z.xseq(), z.xseq(), z.depthwise_flops(cin, z.T))
    r.aten("clone (rows)", z.xseq(), z.xseq())
    sepconv_rows_backward_traffic(r, z, cin, C, z.T)
    r.aten("add (GAP(X)'s share of dX)", z.xseq(), z.xseq())
    layer_input_grads_traffic(r, z)
    return r.launches
