"""Pieces shared by the Triton layer ops, so that each op file imports only from here (never
from another op file): activations, the program's tile, the on-the-fly depthwise tile, the pooled
gates and the cell-step stores, block sizes, dot precision and the channels-last layout helpers;
then the kernels more than one op launches: ``pooled_layer_bwd_kernel`` (a; b with ATT_PATH),
``attention_features_kernel`` (b without CAND; c, d) and the kernels and forward/backward
drivers of the channel-attention cells c and d (``channel_attention_forward`` and
``channel_attention_backward``, which input_attention_layer and output_attention_layer take through
``channel_attention_op`` with ``output_gate`` False and True).

The op's ``reverse`` changes only the host loops: they take the order of the steps from
:class:`Walk`, and in the kernels' docstrings t − 1 and t + 1 are the steps before and after t in
the walk (t + 1 and t − 1 in time when it runs backwards); every per-step tensor stays indexed by
time. The op's ``lengths`` too changes only the host loops, and nothing at all without it: the
few torch ops of :class:`StepMask` between the launches (a carry buffer for H, the carried C,
zeroed outputs and per-step gradients, dC passed through).

Inside an op every state is a channels-last matrix of rows ``[B·H·W, C]`` (KERNELS.md "Layout"):
a pixel's channels are contiguous, so the pointwise convolutions are row-major GEMMs (``tl.dot``)
and a depthwise K×K tile of ``BLOCK_M`` pixels × ``BLOCK_K`` channels is K² coalesced loads.

Longer than STYLE.md's ~600 lines per kernel file: c and d share every kernel and the driver, and
b and c/d share the features kernel, so these live here rather than in a second shared module
that op files would import from as well.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._weight_grads import depthwise_weight_grad, steps_mm

# Triton decides at import time whether @triton.jit kernels run through its numpy interpreter;
# only then can the ops run on CPU tensors (tests). Read once, like triton itself does.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

SIGMOID, HARD_SIGMOID = 0, 1  # the op's ``gate_activation`` codes (registry.GATE_ACTIVATIONS)

# Block sizes the launchers choose on a GPU: BLOCK_M pixels per program, BLOCK_C channels per tile
# (the output-channel tile and the reduction chunk of tl.dot, which needs every dimension >= 16).
# One configuration only: every launcher kernel is compiled ahead of time for each choice
# (compile_check), so choices are kept few; C < 64 runs masked in the 64-wide tile.
GPU_BLOCK_M = 64
GPU_BLOCK_CS = (64,)
KERNEL_SIZES_CHECKED = (1, 3, 5)
# Launch options of the SepConv kernels (a, b, c, d). num_stages=1: the K² depthwise loads of a
# reduction chunk feed FMAs, not the MMA directly; software-pipelining them through shared memory
# multiplies it by K²·stages (348 KB at K = 3, fp32, 3 stages, over sm_90's 227 KB) for no gain:
# other programs hide their latency.
SEPCONV_LAUNCH = dict(num_warps=4, num_stages=1)
# The channel-attention forward step kernels' own launch choices (attention_features_kernel,
# attention_logits_kernel, attention_cell_kernel; not SEPCONV_LAUNCH's), as pooled_layer's
# FWD_LAUNCH: a 16-wide reduction chunk (tl.dot's K and the pooled gates' U_h·h̄ chunk) and
# 16 warps with maxnreg = 128 (the cap there anyway; named, it keeps ptxas from choosing 64 of
# its own, where triton 3.8 spilled 8-12 B in the cell kernel): 64-114 registers on sm_90, one
# or two programs per SM, 25-50 % occupancy. At SEPCONV_LAUNCH with BLOCK_K = 64 each needed
# 255 and spilled (sm_90, triton 3.6: 64-500 B in bf16; the features kernel 4.6 KB in fp32 at
# K = 3); 8 warps capped at 128 registers fit triton 3.6 but spilled 28 B in the fp32 features
# kernel at K = 3 with triton 3.9's ptxas flags (--regAllocOptLevel=2). Never above the channel
# tile: BLOCK_K = min(BLOCK_C, ATTENTION_FWD_BLOCK_K), on CPU as on a GPU.
ATTENTION_FWD_BLOCK_K = 16
ATTENTION_FWD_LAUNCH = dict(SEPCONV_LAUNCH, num_warps=16, maxnreg=128)
# The backward step kernels of the pooled-gate cells (pooled_layer_bwd_kernel,
# attention_cell_bwd_kernel): 8 warps, half the registers per thread of every 64 × 64 state
# tile. At 4 warps both needed more than 255 and spilled (sm_90, triton 3.6: 0.3-0.8 KB even
# with the tiles loaded late and stored early; 0.7-1.4 KB before); at 8 warps ~200, no spill.
# They are not forward step kernels: one program per SM (12.5 %) is within the gate.
POOLED_BWD_LAUNCH = dict(SEPCONV_LAUNCH, num_warps=8)


# Activations, written with tl.exp and arithmetic only (libdevice is not available under the
# interpreter) and branch-free (tl.where): each keeps a few ulps of RELATIVE accuracy at every
# magnitude (ops/registration.py's numeric contract), and NaN in gives NaN out.

@triton.jit
def sigmoid(x):
    """σ(x) = 1/(1 + e) for x ≥ 0 and e/(1 + e) for x < 0, with e = exp(−|x|) ∈ (0, 1]: never
    overflows, and σ(−40) ≈ 4e−18 is not computed as 1 − (1 − 4e−18)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x < 0.0, e * r, r)


@triton.jit
def sigmoid_grad(x):
    """σ'(x) = σ(x)·σ(−x) = e/(1 + e)², e = exp(−|x|) (not σ(1 − σ), which cancels for x ≫ 0)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return e * r * r


@triton.jit
def tanh_with_grad(x):
    """(tanh x, 1 − tanh² x), both relative-accurate (2σ(2x) − 1 would cancel near 0):
        |x| < 0.625:  tanh x = x + x³·P(x²)   (cephes tanhf's minimax polynomial; 1 − t² ≥ 0.69)
        |x| ≥ 0.625:  tanh|x| = (1 − e)/(1 + e),  1 − tanh² x = 4e/(1 + e)²,  e = exp(−2|x|) ≤ 0.29
    (no cancellation in 1 − e, no overflow for large |x|; the sign is restored for x < 0)."""
    a = tl.abs(x)
    z = x * x
    p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
         + 1.33314422036e-1) * z - 3.33332819422e-1
    t_small = x + x * z * p
    e = tl.exp(-2.0 * a)
    r = 1.0 / (1.0 + e)
    t_large = (1.0 - e) * r
    t = tl.where(a < 0.625, t_small, tl.where(x < 0.0, -t_large, t_large))
    d = tl.where(a < 0.625, 1.0 - t_small * t_small, 4.0 * e * r * r)
    return t, d


@triton.jit
def tanh(x):
    """tanh x, relative-accurate at every magnitude (see :func:`tanh_with_grad`)."""
    t, _unused = tanh_with_grad(x)
    return t


@triton.jit
def gate_act(x, ACT: tl.constexpr):
    """σ(x) or hard_sigmoid(x) (SPEC "Options"): 0 for x < −2.5, 1 for x > 2.5, 0.2·x + 0.5
    between, the pieces chosen on x itself (never on the rounded 0.2·x + 0.5, whose sign at
    x = −2.5 depends on FMA contraction); NaN stays NaN (no min/max clamp)."""
    if ACT == 0:
        y = sigmoid(x)
    else:
        y = tl.where(x < -2.5, 0.0, tl.where(x > 2.5, 1.0, 0.2 * x + 0.5))
    return y


@triton.jit
def gate_act_grad(x, ACT: tl.constexpr):
    """dσ/dx (:func:`sigmoid_grad`); hard_sigmoid: 0 for x < −2.5 or x > 2.5, else 0.2 (so 0.2
    at the kinks ±2.5, and for NaN), decided on x itself as :func:`gate_act`."""
    if ACT == 0:
        d = sigmoid_grad(x)
    else:
        d = tl.where((x < -2.5) | (x > 2.5), 0.0, 0.2)
    return d


@triton.jit
def nan_maximum(a, b):
    """max(a, b), NaN if either is NaN (tl.maximum's default, and so tl.max, drop NaN on a GPU)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_max(x, axis: tl.constexpr):
    """tl.max(x, axis) that keeps NaN: a NaN logit makes its whole softmax/max-normalisation NaN,
    as the reference's amax and softmax do."""
    return tl.reduce(x, axis, nan_maximum)


@triton.jit
def mask_if(mask, cond):
    """``mask`` where the scalar ``cond`` (e.g. ``pid_m == 0``) holds, else all False.
    Not ``mask & cond``: triton 3.9's interpreter turns a block & a scalar comparison into an
    int32 array, which tl.load/tl.store reject ("mask has unsupported dtype")."""
    return tl.where(cond, mask, False)


# ---------------------------------------------------------------------------------------------
# Tiles: every step kernel runs on a grid (pixel tiles, channel tiles, B)
# ---------------------------------------------------------------------------------------------

@triton.jit
def program_tile(C, H, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of the grid (pixel tiles, channel tiles, B): returns ``(pid_m, pid_n,
    b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n)``, the BLOCK_M pixels ``offs_m`` of sample
    b's H·W map (valid where mask_m; at row oy, column ox) and the BLOCK_N channels ``offs_n``
    of C (valid where mask_n)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < HW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    oy = offs_m // W
    ox = offs_m % W
    return pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n


@triton.jit
def state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n):
    """Element offsets and mask of a :func:`program_tile` in channels-last rows ``[B·H·W, C]``."""
    offs = (b * HW + offs_m)[:, None] * C + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    return offs, mask


@triton.jit
def map_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n):
    """Element offsets and mask of a :func:`program_tile` in an NCHW map ``[B, C, H, W]`` (the
    layer's output and H_{t−1}: contiguous along the tile's pixels)."""
    offs = b * C * HW + offs_n[None, :] * HW + offs_m[:, None]
    mask = mask_m[:, None] & mask_n[None, :]
    return offs, mask


@triton.jit
def depthwise_tile(src_ptr, oy, ox, mask_m, offs_k, mask_k, C, H, W, dw_ptr,
                   KSIZE: tl.constexpr, FLIP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr = True):
    """Depthwise K×K 'same' convolution of one sample's channels-last map ``src [H·W, C]`` (or,
    without CHANNELS_LAST, of its NCHW planes ``src [C, H·W]``) at pixels (oy, ox) and channels
    offs_k, in fp32 (zero outside the map):
        FLIP = False:  out[y, x, k] = Σ_{a,b} w[k, a, b] · src[y + a − P, x + b − P, k]
        FLIP = True:   out[y, x, k] = Σ_{a,b} w[k, a, b] · src[y − a + P, x − b + P, k]
    (the second is the transposed convolution: the gradient of the first w.r.t. src).
    ``dw`` is ``[C, K·K]`` (conv2d's ``[C, 1, K, K]``), P = K // 2."""
    PAD: tl.constexpr = KSIZE // 2
    out = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    # Runtime loops over the taps, not tl.static_range: unrolled, the compiler hoists all K²
    # pointer and mask tiles out of the caller's channel loop (64 registers each for a 64×64
    # tile) and the forward step kernel spilled 4.6 KB/thread at K = 3 (sm_90, triton 3.6).
    for a in range(KSIZE):
        for b in range(KSIZE):
            if FLIP:
                iy = oy - (a - PAD)
                ix = ox - (b - PAD)
            else:
                iy = oy + (a - PAD)
                ix = ox + (b - PAD)
            valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            if CHANNELS_LAST:
                ptrs = src_ptr + (iy * W + ix)[:, None] * C + offs_k[None, :]
            else:
                ptrs = src_ptr + offs_k[None, :] * (H * W) + (iy * W + ix)[:, None]
            v = tl.load(ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            w = tl.load(dw_ptr + offs_k * (KSIZE * KSIZE) + (a * KSIZE + b), mask=mask_k,
                        other=0.0).to(tl.float32)
            out += v * w[None, :]
    return out



@triton.jit
def sepconv_tile(h_ptr, oy, ox, mask_m, offs_n, mask_n, C, H, W, dw_ptr, pw_ptr,
                 KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr = True):
    """SepConv of one sample's channels-last map ``h_ptr`` (NCHW planes without CHANNELS_LAST)
    for a program's BLOCK_M pixels × BLOCK_N output channels, fp32: Σ_k dw(H)[:, k] · pw[n, k]
    over the C input channels in chunks of BLOCK_K, the depthwise tile computed on the fly
    (:func:`depthwise_tile`)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        d = depthwise_tile(h_ptr, oy, ox, mask_m, offs_k, mask_k, C, H, W, dw_ptr,
                           KSIZE, False, BLOCK_M, BLOCK_K, CHANNELS_LAST)
        w = tl.load(pw_ptr + offs_n[None, :] * C + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(d.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["B", "sums"])
def sepconv_frames_kernel(x_ptr, dw_ptr, pw_ptr, bias_ptr, out_ptr, xpart_ptr,
                          CIN, C, H, W, B, stride_t, stride_b, NMT, sums,
                          KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """An X-side SepConv of every step at once (KERNELS.md "Before the recurrence"), for BLOCK_M
    pixels of frame n = t·B + b (the grid's third axis) × BLOCK_N of the C output channels:
        out[n·H·W + p, j] = bias[j] + Σ_k pw[j, k] · dw(X[t, b])[p, k]
    as time-first channels-last rows ``[T·B·H·W, C]``. X[t, b] ``[CIN, H, W]`` (contiguous
    planes) is read in place at ``x + t·stride_t + b·stride_b``: a time-first x and the
    time-first view of a batch-first one alike. With ``sums`` ≠ 0 the programs of the first
    channel tile also store their pixels' column sums of X[t, b], ``xpart [T·B, NMT, CIN]`` fp32
    (x̄_t for the pooled gates, reduced over the NMT tiles by the caller). ``sums`` and B are
    runtime values, not specialised on: one compile serves the X sides with and without x̄ and
    every batch size (the GPU check's compile budget, tests/triton/test_gpu_check_budget.py)."""
    pid_m, pid_n, n, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    src = x_ptr + (n // B) * stride_t + (n % B) * stride_b
    acc = sepconv_tile(src, oy, ox, mask_m, offs_n, mask_n, CIN, H, W, dw_ptr, pw_ptr,
                       KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, False)
    acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs, mask = state_tile(n, HW, C, offs_m, mask_m, offs_n, mask_n)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if (sums != 0) & (pid_n == 0):
        for k0 in range(0, CIN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < CIN
            v = tl.load(src + offs_k[None, :] * HW + offs_m[:, None],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            tl.store(xpart_ptr + (n * NMT + pid_m) * CIN + offs_k,
                     tl.sum(v.to(tl.float32), axis=0), mask=mask_k)


@triton.jit
def tile_sum(part_ptr, b, NMT, width, offs, mask):
    """Σ_tile part[b, tile, offs] of per-pixel-tile partials ``part [B, NMT, width]`` (fp32),
    added in a fixed order: deterministic."""
    total = tl.zeros_like(offs).to(tl.float32)
    for tile in range(NMT):
        total += tl.load(part_ptr + (b * NMT + tile) * width + offs, mask=mask, other=0.0)
    return total


@triton.jit
def pooled_gate_dot(part_ptr, w_ptr, b, offs_n, mask_n, C, CK, NMT, HW,
                    NUM_GATES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k W[g·C + n, k] · ȳ[k] for gates g < NUM_GATES and channels offs_n of sample b, where
    ȳ = (Σ_tiles part[b, tile, :]) / HW is the GAP of a map from its per-pixel-tile column sums
    ``part [B, NMT, CK]`` (reduced here in a fixed order: deterministic); ``W [NUM_GATES·C, CK]``
    (NUM_GATES 1 to 3). Returns three vectors (the unused ones are zero)."""
    z0 = tl.zeros_like(offs_n).to(tl.float32)
    z1 = tl.zeros_like(offs_n).to(tl.float32)
    z2 = tl.zeros_like(offs_n).to(tl.float32)
    for k0 in range(0, CK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < CK
        ybar = tile_sum(part_ptr, b, NMT, CK, offs_k, mask_k) / HW
        wmask = mask_n[:, None] & mask_k[None, :]
        rows = offs_n[:, None] * CK + offs_k[None, :]
        u0 = tl.load(w_ptr + rows, mask=wmask, other=0.0).to(tl.float32)
        z0 += tl.sum(u0 * ybar[None, :], axis=1)
        if NUM_GATES >= 2:
            u1 = tl.load(w_ptr + C * CK + rows, mask=wmask, other=0.0).to(tl.float32)
            z1 += tl.sum(u1 * ybar[None, :], axis=1)
        if NUM_GATES == 3:
            u2 = tl.load(w_ptr + 2 * C * CK + rows, mask=wmask, other=0.0).to(tl.float32)
            z2 += tl.sum(u2 * ybar[None, :], axis=1)
    return z0, z1, z2


@triton.jit
def pooled_gate_preacts(xg_ptr, hpart_ptr, uh_ptr, b, offs_n, mask_n, C, NMT, HW,
                        NUM_GATES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pre-activations of the pooled gates for channels offs_n of sample b (SPEC eqs. 10-12):
        z_g[n] = xg[b, g·C + n] + Σ_k U_h[g·C + n, k] · h̄[k]
    ``xg [B, NUM_GATES·C]`` holds U_x·GAP(X_t) + b_g; ``hpart [B, NMT, C]`` the per-pixel-tile
    column sums of H_{t−1}. Returns three vectors (the unused ones are zero)."""
    GC = NUM_GATES * C
    d0, d1, d2 = pooled_gate_dot(hpart_ptr, uh_ptr, b, offs_n, mask_n, C, C, NMT, HW,
                                 NUM_GATES, BLOCK_K)
    z0 = d0 + tl.load(xg_ptr + b * GC + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z1 = d1 + tl.load(xg_ptr + b * GC + C + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if NUM_GATES == 3:
        z2 = d2 + tl.load(xg_ptr + b * GC + 2 * C + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        z2 = d2
    return z0, z1, z2


@triton.jit(do_not_specialize=["C", "CIN", "NMT", "HW", "GATES"])
def pooled_input_gates_kernel(xpart_ptr, ux_ptr, gb_ptr, xg_ptr, C, CIN, NMT, HW, GATES,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """xg[n, g·C + c] = b_g[g·C + c] + Σ_k U_x[g·C + c, k] · x̄_n[k] (fp32) for the GATES gates
    and BLOCK_N channels of map n, x̄ = (Σ_tiles xpart[n, tile, :]) / HW from the X-side kernel's
    per-pixel-tile column sums ``xpart [N, NMT, CIN]`` (summed in a fixed order); U_x and b_g in
    their own dtype. GATES is a runtime count (a: 3, c/d: 2): one compile serves both."""
    pid_n = tl.program_id(0)
    n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    for g in range(GATES):  # one gate at a time: pooled_gate_dot of U_x's rows of gate g
        rows = g * C + offs_n
        z, _, _ = pooled_gate_dot(xpart_ptr, ux_ptr + g * C * CIN, n, offs_n, mask_n, C, CIN, NMT,
                                  HW, 1, BLOCK_K)
        z += tl.load(gb_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(xg_ptr + n * GATES * C + rows, z, mask=mask_n)


@triton.jit
def pooled_hidden_grad(gpart_ptr, gate_ptr, dgp_ptr, uh_ptr, b, offs_n, mask_n, C, NMT,
                       STORE: tl.constexpr, store_here, NUM_GATES: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward of the pooled gates of one step for sample b (SPEC eqs. 10-12):
        dgp[j] = act'(z[j]) · Σ_tiles gpart[b, tile, j]       j < NUM_GATES·C (raw grads reduced)
        dh̄[n] = Σ_j dgp[j] · U_h[j, n]                        (returned for channels offs_n)
    ``dgp`` is stored when STORE and ``store_here`` (one program per sample writes it)."""
    GC = NUM_GATES * C
    dhbar = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(0, GC, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K)
        mask_j = offs_j < GC
        raw = tile_sum(gpart_ptr, b, NMT, GC, offs_j, mask_j)
        z = tl.load(gate_ptr + b * GC + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        dgp = raw * gate_act_grad(z, ACT)
        if STORE:
            tl.store(dgp_ptr + b * GC + offs_j, dgp, mask=mask_if(mask_j, store_here))
        u = tl.load(uh_ptr + offs_j[:, None] * C + offs_n[None, :],
                    mask=mask_j[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        dhbar += tl.sum(u * dgp[:, None], axis=0)
    return dhbar


@triton.jit
def recurrent_hidden_grad(gout_ptr, gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr,
                          ddw_ptr, dw_ptr, ddwa_ptr, adw_ptr, b, store_here, offs, mask,
                          oy, ox, mask_m, offs_n, mask_n, C, H, W, NMT,
                          KSIZE: tl.constexpr, NUM_GATES: tl.constexpr, ACT: tl.constexpr,
                          HAS_REC: tl.constexpr, CELL: tl.constexpr, ATT_PATH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dH_t of a pooled-gate cell (a, b, c, d) on this tile, in the walk's opposite order:
        dH_t = grad_output[t] (with CELL) + dwᵀ(ddw_{t+1}) [+ dwᵀ_a(ddw_a_{t+1}), ATT_PATH]
               + dh̄_{t+1} / HW                                                  (with HAS_REC)
    ddw_{t+1} = dacc_{t+1}·pw_h and ddw_a_{t+1} (a second H-side SepConv's, the attention
    features') come from GEMMs between launches; dh̄_{t+1} = dgp_{t+1}·U_h
    (:func:`pooled_hidden_grad`, which stores dgp_{t+1} where ``store_here``)."""
    HW = H * W
    if HAS_REC:  # first: only [BLOCK_N] vectors are live across its loops, no tile
        dhbar = pooled_hidden_grad(gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr, b,
                                   offs_n, mask_n, C, NMT, True, store_here,
                                   NUM_GATES, ACT, BLOCK_N, BLOCK_K)
    if CELL:  # gout: grad_output[t], NCHW [B, C, H, W]
        goffs, _ = map_tile(b, HW, C, oy * W + ox, mask_m, offs_n, mask_n)
        dh = tl.load(gout_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_REC:
        dh += depthwise_tile(ddw_ptr + b * HW * C, oy, ox, mask_m, offs_n, mask_n, C, H, W,
                             dw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
        if ATT_PATH:
            dh += depthwise_tile(ddwa_ptr + b * HW * C, oy, ox, mask_m, offs_n, mask_n, C, H, W,
                                 adw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
        dh += dhbar[None, :] / HW
    return dh


@triton.jit
def store_gate_preacts(gate_ptr, z0, z1, z2, b, pid_m, offs_n, mask_n, C,
                       NUM_GATES: tl.constexpr):
    """The pooled gates' pre-activations ``gate [B, NUM_GATES·C]`` for channels offs_n of sample
    b (saved for the backward), stored by the sample's first pixel tile only."""
    first_tile = mask_if(mask_n, pid_m == 0)
    gate_out = gate_ptr + b * NUM_GATES * C + offs_n
    tl.store(gate_out, z0.to(gate_ptr.dtype.element_ty), mask=first_tile)
    tl.store(gate_out + C, z1.to(gate_ptr.dtype.element_ty), mask=first_tile)
    if NUM_GATES == 3:
        tl.store(gate_out + 2 * C, z2.to(gate_ptr.dtype.element_ty), mask=first_tile)


@triton.jit
def load_cell_state(c_ptr, prev_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n, first,
                    SPLIT: tl.constexpr):
    """C_{t−1} of this tile in fp32 from what :class:`CellState` hands the step: at the walk's
    first step (``first``, a runtime flag: one compile serves every step) C_0 itself (``prev``:
    the NCHW c0, in the layer's dtype); else the fp32 rows ``c``, or with SPLIT (bf16) the two
    halves of their bits: ``prev`` is the saved bf16 C_{t−1} (rows), the high half rounded half
    away from zero, and ``c`` (int16) the low half (exact)."""
    if first != 0:
        offs, mask = map_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
        c = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
        if SPLIT:
            high = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.uint16, bitcast=True)
            low = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
            low = low.to(tl.uint32)
            # The high half was rounded up (by one unit of its last place) iff low >= 2^15.
            bits = (high.to(tl.uint32) << 16) + low
            c = tl.where(low >= 0x8000, bits - 0x10000, bits).to(tl.float32, bitcast=True)
        else:
            c = tl.load(c_ptr + offs, mask=mask, other=0.0)
    return c


@triton.jit
def store_cell_state(c_new, c_ptr, cell_ptr, c_n_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                     last, SPLIT: tl.constexpr):
    """C_t of this tile into the saved ``cell`` (rows, the layer's dtype) and the state the next
    step reads (:func:`load_cell_state`): the fp32 rows ``c`` (in place), or with SPLIT the low
    16 bits of C_t's fp32 bits, the saved bf16 C_t being its high half rounded half away from zero
    (a NaN stays one). At the walk's last step (``last``, a runtime flag) no state but c_n (NCHW,
    the layer's output)."""
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    if SPLIT:
        bits = c_new.to(tl.uint32, bitcast=True)
        high = tl.where(c_new != c_new, 0x7FC0, (bits + 0x8000) >> 16).to(tl.uint16)
        cell = high.to(cell_ptr.dtype.element_ty, bitcast=True)
        if last == 0:
            low = (bits & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)
            tl.store(c_ptr + offs, low, mask=mask)
    else:
        cell = c_new.to(cell_ptr.dtype.element_ty)
        if last == 0:
            tl.store(c_ptr + offs, c_new, mask=mask)
    tl.store(cell_ptr + offs, cell, mask=mask)
    if last != 0:
        map_offs, _ = map_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
        tl.store(c_n_ptr + map_offs, cell, mask=mask)


@triton.jit
def store_hidden_state(h, h_out_ptr, h_n_ptr, hpart_next_ptr, offs_m, mask_m, b, pid_m, offs_n,
                       mask_n, C, HW, NMT, last):
    """H_t of this tile (already in h_out's dtype) into ``h_out``, the step's slice ``[B, C, H,
    W]`` of the layer's NCHW output (which the next step reads as H_{t−1}: no rows of H and no
    copy to NCHW after the loop), at the walk's last step (``last``) into h_n too, and the
    tile's column sums of it into ``hpart_next [B, NMT, C]``: the next step's h̄ (a fixed-order
    reduction)."""
    offs, mask = map_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    tl.store(h_out_ptr + offs, h, mask=mask)
    if last != 0:
        tl.store(h_n_ptr + offs, h, mask=mask)
    hsum = tl.sum(tl.where(mask, h.to(tl.float32), 0.0), axis=0)
    tl.store(hpart_next_ptr + (b * NMT + pid_m) * C + offs_n, hsum, mask=mask_n)


# ---------------------------------------------------------------------------------------------
# Kernels of more than one op
# ---------------------------------------------------------------------------------------------

@triton.jit
def pooled_layer_bwd_kernel(
    ddw_ptr, gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr, dw_ptr, ddwa_ptr, adw_ptr,
    gout_ptr, dh_ptr,
    cell_ptr, cell_prev_ptr, cand_ptr, gate_ptr, dc_ptr, dacc_ptr, gpart_ptr,
    C, H, W, NMT,
    KSIZE: tl.constexpr, ACT: tl.constexpr, HAS_REC: tl.constexpr, CELL: tl.constexpr,
    ATT_PATH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of step t of cell (a) (the walk backwards; pooled_layer, and
    spatial_attention_layer's cell on X̃) for BLOCK_M pixels of sample b × BLOCK_N channels.

    dH_t = grad_output[t] + dwᵀ(ddw_{t+1}) + dh̄_{t+1} / HW, with ddw_{t+1} = dacc_{t+1} · pw_h
    (a GEMM done between launches) and dh̄_{t+1} = dgp_{t+1} · U_h, dgp_{t+1} = act'(z_{t+1}) ∘
    (the raw gate grads of step t+1, reduced here over pixel tiles; stored once per sample).
    With CELL (step t of the sequence, eqs. 13-15 backwards):
        dC   = dC_carry + dH ∘ o ∘ (1 − tanh² C_t);    dC_carry ← dC ∘ f
        di = Σ_HW dC ∘ G,  df = Σ_HW dC ∘ C_{t−1},  do = Σ_HW dH ∘ tanh C_t  (per-tile partials)
        dacc = dC ∘ i ∘ (1 − G²)     (gradient of SepConv_h(H_{t−1}) + xc; stored)
    Without CELL, dH is stored: the gradient of h0 (t = −1). ATT_PATH (variant b) adds a second
    H-side SepConv's gradient dwᵀ_a(ddw_a_{t+1}) to dH_t (the attention features')."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    dh = recurrent_hidden_grad(gout_ptr, gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr,
                               ddw_ptr, dw_ptr, ddwa_ptr, adw_ptr, b, (pid_m == 0) & (pid_n == 0),
                               offs, mask, oy, ox, mask_m, offs_n, mask_n, C, H, W, NMT,
                               KSIZE, 3, ACT, HAS_REC, CELL, ATT_PATH, BLOCK_M, BLOCK_N, BLOCK_K)
    if CELL:
        zb = gate_ptr + b * 3 * C + offs_n
        gi = gate_act(tl.load(zb, mask=mask_n, other=0.0).to(tl.float32), ACT)
        gf = gate_act(tl.load(zb + C, mask=mask_n, other=0.0).to(tl.float32), ACT)
        go = gate_act(tl.load(zb + 2 * C, mask=mask_n, other=0.0).to(tl.float32), ACT)
        # Each state tile is loaded where it is first needed and each result stored as soon
        # as it is complete, so that few tiles are live at once (the stores keep the order).
        part = gpart_ptr + (b * NMT + pid_m) * 3 * C + offs_n
        c_t = tl.load(cell_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tc, dtc = tanh_with_grad(c_t)  # tanh C_t and 1 − tanh² C_t
        dc = tl.load(dc_ptr + offs, mask=mask, other=0.0) + dh * go[None, :] * dtc
        tl.store(part + 2 * C, tl.sum(tl.where(mask, dh * tc, 0.0), axis=0), mask=mask_n)
        tl.store(dc_ptr + offs, dc * gf[None, :], mask=mask)
        g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dacc = dc * gi[None, :] * (1.0 - g * g)
        tl.store(dacc_ptr + offs, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
        tl.store(part, tl.sum(tl.where(mask, dc * g, 0.0), axis=0), mask=mask_n)
        c_prev = tl.load(cell_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(part + C, tl.sum(tl.where(mask, dc * c_prev, 0.0), axis=0), mask=mask_n)
    else:
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def attention_features_kernel(
    h_prev_ptr, xc_ptr, xa_ptr, cdw_ptr, cpw_ptr, adw_ptr, apw_ptr, cand_ptr, feat_ptr,
    C, H, W,
    KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, CAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G = tanh(SepConv_h(H_{t−1}) + xc) (with CAND) and A = tanh(SepConv_ha(H_{t−1}) + xa) for
    BLOCK_M pixels of sample b × BLOCK_N channels: both depthwise filters read the same H_{t−1}
    tiles (``h_prev [B, C, H, W]``, NCHW: the previous step's output).
    Without CAND (variant b, whose X-side candidate term comes later in the step, and whose
    input kernel adds SepConv_h(H_{t−1}) itself) only A; xc and cand are not touched.
    One SepConv after the other, G stored before A's loop: a single accumulator is live at a
    time (both in one loop kept two, and fp32 at K = 3 spilled even at BLOCK_K = 16; each
    depthwise tile loads its taps itself either way, so the loads are the same)."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    h_prev = h_prev_ptr + b * C * HW
    if CAND:
        acc = sepconv_tile(h_prev, oy, ox, mask_m, offs_n, mask_n, C, H, W, cdw_ptr, cpw_ptr,
                           KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, False)
        offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
        g = tanh(acc + tl.load(xc_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        tl.store(cand_ptr + offs, g.to(cand_ptr.dtype.element_ty), mask=mask)
    acc = sepconv_tile(h_prev, oy, ox, mask_m, offs_n, mask_n, C, H, W, adw_ptr, apw_ptr,
                       KSIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, False)
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    a = tanh(acc + tl.load(xa_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(feat_ptr + offs, a.to(feat_ptr.dtype.element_ty), mask=mask)


# Channel attention (c, d): the cells differ only in the gate the map M replaces (OUTPUT_GATE).
#     A = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a)                   (SPEC c, eq. 21)
#     Z = SepConv_z(A);   M = exp(Z − max_{h,w} Z)   per sample and channel    (eqs. 22-23)
#     (c) i = M, [f o] = σ(U_x x̄ + U_h h̄ + b_g);   (d) o = M, [i f] = σ(...)
#     G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c);  C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh C_t

@triton.jit
def attention_logits_kernel(
    feat_ptr, zdw_ptr, zpw_ptr, z_ptr, zpart_ptr,
    C, H, W, NMT,
    KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Z = SepConv_z(A), rounded to z's dtype (the input's, as the reference's Z), and the
    tile's per-channel maximum of the rounded Z over its valid pixels (fp32, exact)."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        d = depthwise_tile(feat_ptr + b * HW * C, oy, ox, mask_m, offs_k, mask_k, C, H, W,
                           zdw_ptr, KSIZE, False, BLOCK_M, BLOCK_K)
        w = tl.load(zpw_ptr + offs_n[None, :] * C + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(d.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + offs, z, mask=mask)
    tile_max = nan_max(tl.where(mask, z.to(tl.float32), float("-inf")), 0)
    tl.store(zpart_ptr + (b * NMT + pid_m) * C + offs_n, tile_max, mask=mask_n)


@triton.jit(do_not_specialize=["first", "last", "output_gate"])
def attention_cell_kernel(
    z_ptr, zpart_ptr, c_ptr, cell_prev_ptr, cand_ptr, xg_ptr, hpart_prev_ptr, hpart_next_ptr,
    uh_ptr, h_out_ptr, cell_ptr, att_ptr, gate_ptr, h_n_ptr, c_n_ptr,
    C, H, W, NMT, first, last, output_gate,
    ACT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """M = exp(Z − max_HW Z) (never exp(Z)/max exp(Z)), the two pooled gates, and the cell
    update with M as the input gate (c) or the output gate (``output_gate`` ≠ 0, d: a runtime
    flag, so that c and d share one compile). The cell state: ``c``, ``cell_prev``, ``first``,
    ``last`` and SPLIT as :class:`CellState` hands them."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    # The pooled gates and max Z first: only [BLOCK_N] vectors are live across their loops, no
    # tile of the state (the tile's offsets and M after them).
    z0, z1, z2 = pooled_gate_preacts(xg_ptr, hpart_prev_ptr, uh_ptr, b, offs_n, mask_n, C,
                                     NMT, HW, 2, BLOCK_K)
    store_gate_preacts(gate_ptr, z0, z1, z2, b, pid_m, offs_n, mask_n, C, 2)
    g0 = gate_act(z0, ACT)
    g1 = gate_act(z1, ACT)
    zmax = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for tile in range(NMT):
        zmax = nan_maximum(zmax, tl.load(zpart_ptr + (b * NMT + tile) * C + offs_n, mask=mask_n,
                                         other=0.0))
    zmax = tl.where(mask_n, zmax, 0.0)

    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    att = tl.exp(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) - zmax[None, :])
    tl.store(att_ptr + offs, att.to(att_ptr.dtype.element_ty), mask=mask)
    g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c_prev = load_cell_state(c_ptr, cell_prev_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                             first, SPLIT)
    if output_gate != 0:  # (d): [i f] pooled, o = M
        c_new = g1[None, :] * c_prev + g0[None, :] * g
        h = att * tanh(c_new)
    else:  # (c): i = M, [f o] pooled
        c_new = g0[None, :] * c_prev + att * g
        h = g1[None, :] * tanh(c_new)
    h = h.to(h_out_ptr.dtype.element_ty)
    store_cell_state(c_new, c_ptr, cell_ptr, c_n_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                     last, SPLIT)
    store_hidden_state(h, h_out_ptr, h_n_ptr, hpart_next_ptr, offs_m, mask_m, b, pid_m, offs_n,
                       mask_n, C, HW, NMT, last)


@triton.jit
def attention_cell_bwd_kernel(
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
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    dh = recurrent_hidden_grad(gout_ptr, gpart_next_ptr, gate_next_ptr, dgp_next_ptr, uh_ptr,
                               ddwc_ptr, cdw_ptr, ddwa_ptr, adw_ptr, b, (pid_m == 0) & (pid_n == 0),
                               offs, mask, oy, ox, mask_m, offs_n, mask_n, C, H, W, NMT,
                               KSIZE, 2, ACT, HAS_REC, CELL, True, BLOCK_M, BLOCK_N, BLOCK_K)
    if CELL:
        g0 = gate_act(tl.load(gate_ptr + b * 2 * C + offs_n, mask=mask_n, other=0.0)
                      .to(tl.float32), ACT)
        g1 = gate_act(tl.load(gate_ptr + b * 2 * C + C + offs_n, mask=mask_n, other=0.0)
                      .to(tl.float32), ACT)
        # Each state tile is loaded where it is first needed and each result stored as soon
        # as it is complete, so that few tiles are live at once (the stores keep the order).
        part = gpart_ptr + (b * NMT + pid_m) * 2 * C + offs_n
        spart = spart_ptr + (b * NMT + pid_m) * C + offs_n
        c_t = tl.load(cell_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tc, dtc = tanh_with_grad(c_t)  # tanh C_t and 1 − tanh² C_t
        carry = tl.load(dc_ptr + offs, mask=mask, other=0.0)
        if OUTPUT_GATE:
            att = tl.load(att_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dc = carry + dh * att * dtc
            datt = dh * tc
            tl.store(datt_ptr + offs, datt, mask=mask)
            tl.store(spart, tl.sum(tl.where(mask, att * datt, 0.0), axis=0), mask=mask_n)
            tl.store(dc_ptr + offs, dc * g1[None, :], mask=mask)
            g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dacc = dc * g0[None, :] * (1.0 - g * g)
            tl.store(dacc_ptr + offs, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
            tl.store(part, tl.sum(tl.where(mask, dc * g, 0.0), axis=0), mask=mask_n)
            c_prev = tl.load(cell_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(part + C, tl.sum(tl.where(mask, dc * c_prev, 0.0), axis=0), mask=mask_n)
        else:
            dc = carry + dh * g1[None, :] * dtc
            tl.store(part + C, tl.sum(tl.where(mask, dh * tc, 0.0), axis=0), mask=mask_n)
            tl.store(dc_ptr + offs, dc * g0[None, :], mask=mask)
            c_prev = tl.load(cell_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(part, tl.sum(tl.where(mask, dc * c_prev, 0.0), axis=0), mask=mask_n)
            g = tl.load(cand_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            datt = dc * g
            att = tl.load(att_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dacc = dc * att * (1.0 - g * g)
            tl.store(dacc_ptr + offs, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
            tl.store(datt_ptr + offs, datt, mask=mask)
            tl.store(spart, tl.sum(tl.where(mask, att * datt, 0.0), axis=0), mask=mask_n)
    else:
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def attention_logits_bwd_kernel(
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
    total = tile_sum(spart_ptr, b, NMT, C, offs_n, mask_n)
    att = tl.load(att_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    datt = tl.load(datt_ptr + offs, mask=mask, other=0.0)
    tie = tl.load(tie_ptr + offs, mask=mask, other=0.0)
    dz = att * datt - tie * total[None, :]
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def attention_features_bwd_kernel(
    ddz_ptr, zdw_ptr, feat_ptr, dfeat_ptr,
    C, H, W,
    KSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dA' = dwᵀ_z(dZ·pw_z) ∘ (1 − A²): the gradient of A's pre-activation (the GEMM dZ·pw_z
    runs between launches)."""
    pid_m, pid_n, b, HW, offs_m, mask_m, oy, ox, offs_n, mask_n = program_tile(
        C, H, W, BLOCK_M, BLOCK_N)
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    dfeat = depthwise_tile(ddz_ptr + b * HW * C, oy, ox, mask_m, offs_n, mask_n,
                           C, H, W, zdw_ptr, KSIZE, True, BLOCK_M, BLOCK_N)
    a = tl.load(feat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dfeat_ptr + offs, (dfeat * (1.0 - a * a)).to(dfeat_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

def block_sizes(device: torch.device, pixels: int, channels: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C). On a GPU from ``GPU_BLOCK_CS`` (compile_check covers each); under
    the interpreter (CPU tensors) as few, large programs as possible (each costs ~0.6 ms)."""
    if device.type == "cpu":
        block_c = min(max(16, triton.next_power_of_2(channels)), 64)
        return min(max(16, triton.next_power_of_2(pixels)), 256), block_c
    return GPU_BLOCK_M, GPU_BLOCK_CS[0]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tl.dot follows torch.get_float32_matmul_precision(): TF32 only for "high"/"medium"."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def rows(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> channels-last rows ``[N·H·W, C]`` (contiguous)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c).contiguous()


def rows_fp32(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> fp32 channels-last rows ``[N·H·W, C]`` of its own, in one copy (what
    the fp32 cell state and the carried dC start from)."""
    n, c, h, w = x.shape
    out = torch.empty(n * h * w, c, device=x.device, dtype=torch.float32)
    out.view(n, h, w, c).copy_(x.permute(0, 2, 3, 1))
    return out


def nchw(x_rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Rows ``[N·H·W, C]`` -> an ``[N, C, H, W]`` view in channels_last memory format."""
    return x_rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def depthwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' K×K convolution of ``[N, C, H, W]`` (any memory format)."""
    return F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=x.shape[1])


def depthwise_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       need_input: bool, steps: int):
    """Gradients of :func:`depthwise` w.r.t. its input (if ``need_input``) and weight, the
    weight's over ``steps`` blocks of frames (_weight_grads: summed per step in fp32)."""
    if x.dtype != torch.float32:
        pad = weight.shape[-1] // 2
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], x.shape[1],
            [need_input, True, False])
        return grad_input, grad_weight
    return (depthwise_input_grad(grad, x, weight) if need_input else None,
            depthwise_weight_grad(grad, x, weight, steps))


def depthwise_input_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """The gradient of :func:`depthwise` w.r.t. its input."""
    pad = weight.shape[-1] // 2
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], x.shape[1],
        [True, False, False])[0]


class SequenceFrames:
    """The frames of ``x [T, B, Cin, H, W]`` as one batch ``frames [N, Cin, H, W]`` for the X-side
    convolutions, read in place: a time-first x in its T·B order, the time-first view of a
    batch-first tensor (what ConvLSTM passes) in its own B·T order; other strides are copied
    once. :meth:`rows` gives per-frame results back in time-first order, the reordering folded
    into the channels-last copy that :func:`rows` makes anyway."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.steps, self.batch = x.shape[:2]
        self.batch_major = not x.is_contiguous() and x.transpose(0, 1).is_contiguous()
        source = x.transpose(0, 1) if self.batch_major else x
        self.frames = source.reshape(-1, *x.shape[2:])

    def _in_time_order(self, per_frame: torch.Tensor) -> torch.Tensor:
        lead = (self.batch, self.steps) if self.batch_major else (self.steps, self.batch)
        sequence = per_frame.view(*lead, *per_frame.shape[1:])
        return sequence.transpose(0, 1) if self.batch_major else sequence

    def rows(self, per_frame: torch.Tensor) -> torch.Tensor:
        """A per-frame result ``[N, C, H, W]`` as channels-last rows ``[T·B·H·W, C]``, time-first."""
        sequence = self._in_time_order(per_frame)
        return sequence.permute(0, 1, 3, 4, 2).reshape(-1, per_frame.shape[1]).contiguous()


def frame_planes(x: torch.Tensor) -> torch.Tensor:
    """``x [T, B, Cin, H, W]`` itself where every frame's planes are contiguous (whatever the
    order of its first two dims), else one contiguous copy: what kernels read X_t in place from
    (frame t's sample b at ``b · stride(1)`` from ``x[t]``)."""
    height, width = x.shape[3:]
    return x if x.stride()[2:] == (height * width, width, 1) else x.contiguous()


def sepconv_rows(x: torch.Tensor, dw: torch.Tensor, pw: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SepConv of ``x [N, Cin, H, W]`` for all N at once, as rows: returns ``(depthwise rows
    [N·H·W, Cin], dw(x)·pwᵀ + bias [N·H·W, C])`` (the H side's, whose depthwise rows the
    backward reuses; the X side's is :func:`sepconv_x_rows`)."""
    d = rows(depthwise(x, dw))
    out = torch.addmm(bias, d, pw.t()) if bias is not None else d @ pw.t()
    return d, out


def sepconv_x_rows(x: torch.Tensor, dw: torch.Tensor, pw: torch.Tensor, bias: torch.Tensor,
                   gate_weight: torch.Tensor | None = None,
                   gate_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``SepConv(X_t) + bias`` of every step of ``x [T, B, Cin, H, W]`` in ONE launch
    (sepconv_frames_kernel): time-first channels-last rows ``[T·B·H·W, C]``, with no depthwise
    output written, no copy to rows and no separate GEMM; x is read in place whatever the order
    of its first two dims (copied only if a frame's planes are not contiguous). With
    ``gate_weight`` U_x ``[n·C, Cin]`` (and ``gate_bias`` b_g) also the pooled gates' X-side
    terms xg = U_x x̄ + b_g of every step (fp32 ``[T·B, n·C]`` time-first), from the kernel's
    per-tile column sums of X in one more launch (pooled_input_gates_kernel: x is read once, U_x
    in its dtype), else None."""
    steps, batch, cin, height, width = x.shape
    x = frame_planes(x)
    hidden, pixels = pw.shape[0], height * width
    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    maps, means = steps * batch, gate_weight is not None
    out = x.new_empty(maps * pixels, hidden)
    xpart = torch.empty((maps, tiles, cin) if means else (1,), device=x.device,
                        dtype=torch.float32)
    block_k = min(block_c, ATTENTION_FWD_BLOCK_K)
    sepconv_frames_kernel[(tiles, triton.cdiv(hidden, block_c), maps)](
        x, dw.contiguous(), pw.contiguous(), bias, out, xpart,
        cin, hidden, height, width, batch, x.stride(0), x.stride(1), tiles, int(means),
        KSIZE=dw.shape[-1], DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_k, **ATTENTION_FWD_LAUNCH)
    if not means:
        return out, None
    gates = gate_weight.shape[0] // hidden
    xg = torch.empty(maps, gates * hidden, device=x.device, dtype=torch.float32)
    pooled_input_gates_kernel[(triton.cdiv(hidden, block_c), maps)](
        xpart, gate_weight.contiguous(), gate_bias.contiguous(), xg, hidden, cin, tiles, pixels,
        gates, BLOCK_N=block_c, BLOCK_K=block_k, **SEPCONV_LAUNCH)
    return out, xg


def sepconv_rows_backward(grad_rows: torch.Tensor, x: torch.Tensor, d_rows: torch.Tensor,
                          dw: torch.Tensor, pw: torch.Tensor, steps: int, need_input: bool = True):
    """Backward of :func:`sepconv_rows` given ``grad_rows [N·H·W, C]`` (the bias gradient is the
    column sum, taken by the caller): returns ``(grad_x or None, grad_dw, grad_pw)``, the weights'
    over ``steps`` blocks (_weight_grads)."""
    n, _, h, w = x.shape
    grad_pw = steps_mm(grad_rows, d_rows, steps)
    grad_d = nchw(grad_rows @ pw, n, h, w)
    grad_x, grad_dw = depthwise_backward(grad_d, x, dw, need_input, steps)
    return grad_x, grad_dw, grad_pw


class BackwardStep(NamedTuple):
    """One launch of a backward's loop (:meth:`Walk.backward`). ``cell``: it runs the cell
    backward of step ``t``; the last launch does not (it stores dH_0 only, and ``t`` is the
    walk's first step, for pointers it does not read). ``rec``: the step after t in the walk,
    whose gradients flow into H_t (``has_rec``); at the walk's last step there is none, and
    ``rec`` is t itself, unread. ``before``: the step before t, whose C_{t−1} step t read
    (None at the first step: c0)."""

    t: int
    cell: bool
    rec: int
    has_rec: bool
    before: int | None

    def prev(self, states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The state step t started from: ``states[before]``, or ``initial`` at the first step."""
        return initial if self.before is None else states[self.before]


class Walk:
    """The order of a layer's steps: t = 0 … T−1, or T−1 … 0 with ``reverse`` (the op's argument,
    ops/registration.py). Step t starts from the state of the step before it in the walk (h0, c0
    at the first) and ``output[t]`` is its state; every per-step tensor stays indexed by time, so
    a launcher reverses by its loop order and the indices it takes from here, with no flipped copy
    of x, the output or the gradients and the same launches per step."""

    def __init__(self, steps: int, reverse: bool):
        self.steps, self.reverse = steps, reverse
        self.first, self.last = (steps - 1, 0) if reverse else (0, steps - 1)

    def forward(self) -> range:
        """The steps in the order the forward runs them."""
        return range(self.steps - 1, -1, -1) if self.reverse else range(self.steps)

    def before(self, t: int) -> int | None:
        """The step before t in the walk, whose state t starts from (None at the first)."""
        if t == self.first:
            return None
        return t + 1 if self.reverse else t - 1

    def after(self, t: int) -> int | None:
        """The step after t in the walk, which starts from t's state (None at the last)."""
        if t == self.last:
            return None
        return t - 1 if self.reverse else t + 1

    def backward(self) -> Iterator[BackwardStep]:
        """The backward's T + 1 launches, in the opposite order of the forward: one per step,
        then the one that stores dH_0 (from the first step's gradients)."""
        for t in reversed(self.forward()):
            rec = self.after(t)
            yield BackwardStep(t, True, t if rec is None else rec, rec is not None, self.before(t))
        yield BackwardStep(self.first, False, self.first, True, None)

    def before_each(self, states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The state each step started from, time-indexed (``states [T, ...]``, ``initial`` the
        first step's): H_{t−1} of every step for the batched weight gradients, one ``cat``."""
        if self.reverse:
            return torch.cat([states[1:], initial[None]])
        return torch.cat([initial[None], states[:-1]])


class StepMask:
    """Per-sample ``lengths`` inside a layer's host loop (ops/registration.py; the Python twin of
    csrc/step_mask.h): step t of sample b counts iff t < lengths[b]. Every method is a torch op
    on the call's device (no host synchronisation) and does nothing at all without lengths, so
    that the launches and results of an op without lengths are exactly what they were.

    Forward: the kernels read H_{t−1} from a carry buffer (:meth:`carry_buffer`), never from
    ``output[t − 1]``; after step t, :meth:`forward_step` keeps the sample's C (the fp32 state and
    the saved C_t, so that the backward's C_{t−1} reads are the carried C), its H carry and its
    pooled column sums of H (what the next step reads as h̄) where the step does not count, and
    zeroes ``output[t]`` there.
    Backward: a step that does not count passes dC through (:meth:`hold` before the launch,
    :meth:`backward_step` after it restores the held dC) and its per-step gradients are zeroed
    after the launch, so that nothing of it reaches the weight gradients nor, through the next
    launch's recurrent term, dH of the step before. dH passes through by linearity: grad_h_n
    enters at each sample's last valid step of the walk (:func:`output_grads`), or is
    grad_h0 itself at length 0 (:meth:`initial_hidden_grad`); walking in reverse, a sample's
    dH_0 is the recurrent term of its first valid step t = lengths[b] − 1, so the launch that
    stores dH_0 reads each sample's recurrent data of that step (:meth:`rec`)."""

    def __init__(self, lengths: torch.Tensor | None, walk: Walk, batch: int):
        if lengths is not None:
            if lengths.dtype != torch.int64 or lengths.shape != (batch,):
                raise ValueError(f"lengths must be int64 [B] = [{batch}], got "
                                 f"{lengths.dtype} {tuple(lengths.shape)}")
        self.lengths, self.walk, self.batch = lengths, walk, batch

    @property
    def active(self) -> bool:
        return self.lengths is not None

    def counts(self, t: int) -> torch.Tensor:
        """``[B, 1]`` bool: whether step t of each sample counts."""
        return (self.lengths > t).view(-1, 1)

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-sample tensor (leading dimension B, or B·H·W rows) as ``[B, -1]``."""
        return tensor.view(self.batch, -1)

    def restore(self, t: int, state: torch.Tensor, held: torch.Tensor) -> None:
        """``state`` ← ``held`` for the samples whose step t does not count (in place)."""
        flat = self._flat(state)
        flat.copy_(torch.where(self.counts(t), flat, self._flat(held)))

    def zero(self, t: int, *tensors: torch.Tensor) -> None:
        """Each tensor ← 0 for the samples whose step t does not count (in place)."""
        keep_out = self.counts(t).logical_not()
        for tensor in tensors:
            self._flat(tensor).masked_fill_(keep_out, 0)

    def carry_buffer(self, h_start: torch.Tensor) -> torch.Tensor:
        """H_0 (``[B, C, H, W]``, as the step kernels read H_{t−1}) as the forward's H carry: a
        copy of its own under lengths (it is updated in place, and ``h0.contiguous()`` is h0
        itself), else ``h_start`` itself."""
        return h_start.clone() if self.active else h_start

    def hold(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A copy of ``tensor`` before a step changes it in place (None without lengths)."""
        return tensor.clone() if self.active else None

    def forward_step(self, t: int, out_t, cell_t, c_state, c_before, h_carry,
                     hpart_next=None, hpart_prev=None, cell_before=None) -> None:
        """After forward step t: the samples whose step does not count keep C (``c_state`` ←
        ``c_before``, and the saved ``cell_t`` is that carried C: ``c_state`` rounded, or
        ``cell_before`` where the saved C is part of the state, :class:`CellState`), their H
        carry and pooled column sums (``hpart_next`` ← ``hpart_prev``, the sums the step read);
        the others' carry becomes ``out_t``; ``out_t`` is zeroed where the step does not count."""
        if not self.active:
            return
        self.restore(t, c_state, c_before)
        if cell_before is None:
            cell_t.copy_(c_state)
        else:
            self.restore(t, cell_t, cell_before)
        counts = self.counts(t)
        carry = self._flat(h_carry)
        carry.copy_(torch.where(counts, self._flat(out_t), carry))
        self.zero(t, out_t)
        if hpart_next is not None:
            self.restore(t, hpart_next, hpart_prev)

    def backward_step(self, t: int, dc: torch.Tensor, dc_held, *step_grads) -> None:
        """After the backward launch of step t: dC passes through the samples whose step does not
        count (``dc`` ← ``dc_held``) and the per-step gradients it wrote are zero there."""
        if not self.active:
            return
        self.restore(t, dc, dc_held)
        self.zero(t, *step_grads)

    def _gathers(self, s: BackwardStep) -> bool:
        return self.active and self.walk.reverse and not s.cell

    def _first_valid(self) -> torch.Tensor:
        return (self.lengths - 1).clamp(min=0)

    def rec(self, s: BackwardStep, buffer: torch.Tensor) -> torch.Tensor:
        """``buffer[s.rec]``, the recurrent data launch ``s`` reads; for the reverse walk's dH_0
        launch under lengths, each sample's data of its first valid step t = lengths[b] − 1
        (a gathered copy: its dH_0 is that step's recurrent term; length 0: see
        :meth:`initial_hidden_grad`)."""
        if not self._gathers(s):
            return buffer[s.rec]
        steps = buffer.shape[0]
        picked = buffer.view(steps, self.batch, -1)[
            self._first_valid(), torch.arange(self.batch, device=buffer.device)]
        return picked.view(buffer.shape[1:])

    def rec_written(self, s: BackwardStep, buffer: torch.Tensor, written: torch.Tensor) -> None:
        """After a dH_0 launch that read :meth:`rec`'s copies and stored a per-step gradient of
        step ``s.rec`` into ``written`` (its copy of ``buffer[s.rec]``): ``buffer[s.rec]`` is
        that gradient for the samples whose step s.rec counts (lengths[b] = T, the copy is
        their own) and zero for the others (their step s.rec does not count)."""
        if not self._gathers(s):
            return
        flat = self._flat(buffer[s.rec])
        flat.copy_(torch.where(self.counts(s.rec), self._flat(written), 0.0))

    def initial_hidden_grad(self, grad_h0_rows: torch.Tensor, grad_h_n: torch.Tensor) -> None:
        """dH_0 of the samples of length 0 is grad_h_n itself (no step counts; in place)."""
        if not self.active:
            return
        flat = self._flat(grad_h0_rows)
        flat.copy_(torch.where((self.lengths > 0).view(-1, 1), flat,
                               self._flat(rows(grad_h_n)).to(flat.dtype)))

    def last_valid_step(self) -> torch.Tensor:
        """``[B]`` each sample's last valid step in the walk's order (0 for length 0, which has
        none: the caller checks lengths > 0): lengths[b] − 1 walking forwards, 0 in reverse."""
        if self.walk.reverse:
            return torch.zeros_like(self.lengths)
        return self._first_valid()

    def before_each(self, states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """:meth:`Walk.before_each` with lengths: H_{t−1} of step t is the previous step's state
        where that step counted, else ``initial`` (walking forwards a step that counts always
        follows one that did; in reverse, a sample's first valid step started from h0)."""
        stored = self.walk.before_each(states, initial)
        if not self.active or not self.walk.reverse:
            return stored
        steps = states.shape[0]
        # Step t's previous step is t + 1, which counted iff t + 1 < lengths[b].
        previous_counted = (torch.arange(1, steps + 1, device=self.lengths.device)[:, None]
                            < self.lengths[None, :])
        shape = (steps, self.batch) + (1,) * (states.dim() - 2)
        return torch.where(previous_counted.view(shape), stored, initial[None])


def initial_pooled_state(h0: torch.Tensor, tiles: int, walk: Walk):
    """The start of a pooled-gate cell's recurrence: ``(h_prev, hpart)``, H_0 itself (NCHW, as
    the step kernels read H_{t−1}; copied only if not contiguous) and the two ping-pong buffers
    ``[2, B, tiles, C]`` (fp32) of per-pixel-tile column sums of H that the steps hand on (step t
    reads ``[(t + 1) % 2]``, writes ``[t % 2]``: the steps before and after t in the walk have
    the same parity, whichever its direction): buffer ``(first + 1) % 2`` holds H_0's, all in
    tile 0. The cell state: :class:`CellState`."""
    batch, hidden = h0.shape[:2]
    hpart = torch.zeros(2, batch, tiles, hidden, device=h0.device, dtype=torch.float32)
    hpart[(walk.first + 1) % 2, :, 0] = h0.sum((-2, -1), dtype=torch.float32)
    return h0.contiguous(), hpart


class CellState:
    """The fp32 cell state C between the steps of a pooled-gate layer (a, b, c, d) as its step
    kernels read and write it (:func:`load_cell_state`, :func:`store_cell_state`), and the
    layer's h_n and c_n, which the walk's last step writes.

    Every step writes the saved C_t (``cell [T, B·H·W, C]``, the layer's dtype) anyway; in bf16
    that is the high half of C_t's fp32 bits (rounded half away from zero), so the state proper
    is only the low halves (int16 rows, in place): 4 bytes read and 4 written per element and
    step for an exact fp32 state, where an fp32 copy beside the saved C_t took 4 and 6. In fp32
    and fp16 the state is fp32 rows (in place). The walk's first step reads c0 itself (NCHW, no
    fp32 copy of it), its last writes c_n and h_n rather than a state no step reads.
    With ``lengths`` the state starts as C_0 (a sample whose step does not count keeps it,
    :meth:`forward_step`), first and last steps are steps like the others, and h_n, c_n are
    taken after the loop (:meth:`outputs`)."""

    def __init__(self, h0: torch.Tensor, c0: torch.Tensor, cell: torch.Tensor, walk: Walk,
                 mask: StepMask):
        self.cell, self.walk, self.mask = cell, walk, mask
        self.c0 = c0.contiguous()
        self.split = cell.dtype == torch.bfloat16
        shape = cell.shape[1:]
        if mask.active:
            self.initial = rows(c0).to(cell.dtype) if self.split else None
            self.state = (torch.zeros(shape, device=cell.device, dtype=torch.int16)
                          if self.split else rows_fp32(c0))
        else:
            self.initial = None
            self.state = torch.empty(shape, device=cell.device,
                                     dtype=torch.int16 if self.split else torch.float32)
        self.h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
        self.c_n = torch.empty_like(c0, dtype=cell.dtype, memory_format=torch.contiguous_format)

    def _prev(self, t: int) -> torch.Tensor:
        """The saved C_{t−1} step t reads in split mode (C_0 as bf16 rows at the first)."""
        before = self.walk.before(t)
        return self.initial if before is None else self.cell[before]

    def step(self, t: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(c, cell_prev, first, last)`` of step t's launch: the state, the tensor read beside
        it (always in the layer's dtype: one pointer type for every step), and the walk's
        first/last-step flags (SPLIT: :attr:`split`; h_n, c_n: the attributes)."""
        first = int(t == self.walk.first and not self.mask.active)
        last = int(t == self.walk.last and not self.mask.active)
        prev = self._prev(t) if self.split and not first else self.c0
        return self.state, prev, first, last

    def hold(self) -> torch.Tensor | None:
        """The state before a step (with lengths; else None)."""
        return self.mask.hold(self.state)

    def forward_step(self, t: int, out_t, held, h_carry, hpart_next, hpart_prev) -> None:
        """:meth:`StepMask.forward_step` after step t, for this state (with lengths)."""
        self.mask.forward_step(t, out_t, self.cell[t], self.state, held, h_carry, hpart_next,
                               hpart_prev, self._prev(t) if self.split else None)

    def outputs(self, out: torch.Tensor, h_carry: torch.Tensor):
        """``(output, h_n, c_n)`` after the walk: h_n and c_n as the last step wrote them, or
        with lengths from the H carry and each sample's carried C."""
        if not self.mask.active:
            return out, self.h_n, self.c_n
        batch, hidden, height, width = self.c_n.shape
        last = self.cell[self.walk.last] if self.split else self.state
        c_n = nchw(last, batch, height, width).to(self.cell.dtype,
                                                 memory_format=torch.contiguous_format, copy=True)
        return out, h_carry.clone(), c_n


def layer_outputs(out: torch.Tensor, c_state: torch.Tensor, dtype: torch.dtype, batch: int,
                  height: int, width: int, walk: Walk, h_last: torch.Tensor | None = None):
    """``(output [T, B, C, H, W], h_n, c_n)`` (contiguous, ``dtype``): the output is ``out``
    itself, where the step kernels stored H_t; h_n a copy of ``out[walk.last]`` (or of
    ``h_last``, the H carry of a call with lengths), c_n from the fp32 cell state rows
    ``c_state [B·H·W, C]`` after the walk's last step."""
    h_n = (out[walk.last] if h_last is None else h_last).clone()
    c_n = nchw(c_state, batch, height, width).to(dtype, memory_format=torch.contiguous_format,
                                                 copy=True)
    return out, h_n, c_n


def output_grads(grad_output: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor,
                 walk: Walk, mask: StepMask | None = None):
    """The backward's start: ``(gout, dc)``. ``gout[t]`` is the gradient reaching H_t from the
    outputs, an NCHW map ``[B, C, H, W]`` as the step kernels read it: grad_output[t] in place
    (made contiguous if it is not), and at the walk's last step a copy with grad_h_n added (with
    lengths, grad_h_n enters at each sample's last valid step, :meth:`StepMask.last_valid_step`,
    none at length 0: then gout is one copy of grad_output). ``dc``: grad_c_n as fp32 rows (the
    carried dC)."""
    steps, batch = grad_output.shape[:2]
    grad_output = grad_output.contiguous()
    if mask is not None and mask.active:
        gout = grad_output.clone()
        entering = grad_h_n.reshape(batch, -1)
        entering = torch.where((mask.lengths > 0).view(-1, 1), entering, 0.0).to(gout.dtype)
        samples = torch.arange(batch, device=gout.device)
        gout.view(steps, batch, -1).index_put_((mask.last_valid_step(), samples), entering,
                                               accumulate=True)
        gout = list(gout.unbind(0))
    else:
        gout = list(grad_output.unbind(0))
        gout[walk.last] = gout[walk.last] + grad_h_n.to(memory_format=torch.contiguous_format)
    return gout, rows_fp32(grad_c_n)


def layer_input_grads(grad_frames: torch.Tensor, grad_h0_rows: torch.Tensor, dc: torch.Tensor,
                      x: torch.Tensor):
    """``(grad_x, grad_h0, grad_c0)`` (contiguous) from the gradient of the frames
    ``[T·B, Cin, H, W]``, dH_0's rows and the fp32 dC carried past the first step."""
    _, batch, _, height, width = x.shape
    grad_x = grad_frames.reshape(x.shape).contiguous()
    grad_h0 = nchw(grad_h0_rows, batch, height, width).contiguous()
    grad_c0 = nchw(dc, batch, height, width).to(x.dtype, memory_format=torch.contiguous_format,
                                               copy=True)
    return grad_x, grad_h0, grad_c0


# ---------------------------------------------------------------------------------------------
# Channel attention (c, d): forward and backward over a sequence
# ---------------------------------------------------------------------------------------------
# Forward: the X-side terms (``xc``, ``xa``, ``xg``) for all steps in batched ATen calls, then
# three launches per step (KERNELS.md): (1) ``attention_features_kernel``: both depthwise filters
# of H_{t−1} and two GEMMs, one SepConv after the other -> G, then A; (2) ``attention_logits_kernel``: Z =
# SepConv_z(A) (needs A's neighbours, hence the launch boundary) and per-tile channel maxima;
# (3) ``attention_cell_kernel``: M = exp(Z − max), pooled gates, cell update, column sums of H_t.
# Backward (the walk backwards), per step: the cell backward fused with the two transposed depthwise
# convolutions into dH_t (``attention_cell_bwd_kernel``), dZ (``attention_logits_bwd_kernel``),
# a GEMM, dA's pre-activation (``attention_features_bwd_kernel``) and two GEMMs. A_t and Z_t
# are recomputed per step by the forward's own launches (1) and (2), so the tie mask of max Z is
# the forward's (as the CUDA op does; it costs the candidate GEMM once more); weight gradients
# are batched after the loop.
# Saved per step (as the native op): C_t, G, M (3 state tensors) and the gate pre-activations.

def _attention_x_side(x: torch.Tensor, p, steps, batch, pixels, hidden, gates: bool = True):
    """xc = SepConv_x(X) + b_c, xa = SepConv_xa(X) + b_a (rows), xg = U_x x̄ + b_g (fp32; None
    without ``gates``: the backward reads the saved gate pre-activations, so it needs no x̄)."""
    gwx, _, gb, cdwx, cpwx, _, _, cb, adwx, apwx, _, _, ab, _, _ = p
    xc, xg = sepconv_x_rows(x, cdwx, cpwx, cb, gwx if gates else None, gb)
    xa, _ = sepconv_x_rows(x, adwx, apwx, ab)
    shape = (steps, batch * pixels, hidden)
    if not gates:
        return xc.view(shape), xa.view(shape), None
    return xc.view(shape), xa.view(shape), xg.view(steps, batch, 2 * hidden)


def _attention_logits_step(h_prev, xc, xa, p, cand, feat, logits, zpart, height, width, grid,
                           launch, dot):
    """Launches (1) and (2) of one forward step, from ``h_prev [B, C, H, W]`` and the step's
    X-side terms: ``cand`` ← G_t, ``feat`` ← A_t, ``logits`` ← Z_t (rows, x's dtype) and ``zpart
    [B, tiles, C]`` ← its per-tile channel maxima. The backward recomputes A_t and Z_t through
    this same call: the tie mask of max_HW Z must be taken on the very numbers the forward
    normalised by (an ATen recompute rounds differently and, in bf16, can move the max)."""
    hidden = h_prev.shape[1]  # [B, C, H, W]
    cdwh, cpwh, adwh, apwh, zdw, zpw = (p[i] for i in (5, 6, 10, 11, 13, 14))
    ksize = cdwh.shape[-1]
    attention_features_kernel[grid](h_prev, xc, xa, cdwh, cpwh, adwh, apwh, cand, feat,
                                    hidden, height, width, KSIZE=ksize, DOT_PRECISION=dot,
                                    CAND=True, **launch)
    attention_logits_kernel[grid](feat, zdw, zpw, logits, zpart, hidden, height, width,
                                  zpart.shape[1], KSIZE=ksize, DOT_PRECISION=dot, **launch)


def channel_attention_forward(x, h0, c0, params, gate_activation: int, output_gate: bool,
                              reverse: bool = False, lengths: torch.Tensor | None = None):
    """Variant (c) (``output_gate`` False: M is the input gate) or (d) (True: the output gate):
    ``(output, h_n, c_n, [cell, candidate, gate_preact [T, B, 2C], attention])``; ``lengths``
    masks each sample's steps (:class:`StepMask`)."""
    p = [q.contiguous() for q in params]
    gwh = p[1]
    steps, batch, cin, height, width = x.shape
    hidden, pixels = h0.shape[1], height * width
    xc, xa, xg = _attention_x_side(x, p, steps, batch, pixels, hidden)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    out = x.new_empty(steps, batch, hidden, height, width)
    cell, cand, att = (x.new_empty(steps, batch * pixels, hidden) for _ in range(3))
    gate_preact = x.new_empty(steps, batch, 2 * hidden)
    feat = torch.empty_like(cell[0])
    logits = torch.empty_like(feat)
    zpart = torch.empty(batch, tiles, hidden, device=x.device, dtype=torch.float32)
    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)
    h_prev, hpart = initial_pooled_state(h0, tiles, walk)
    h_prev = mask.carry_buffer(h_prev)
    state = CellState(h0, c0, cell, walk, mask)
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    launch = dict(BLOCK_M=block_m, BLOCK_N=block_c,
                  BLOCK_K=min(block_c, ATTENTION_FWD_BLOCK_K), **ATTENTION_FWD_LAUNCH)
    dot = dot_precision(x.dtype)
    for t in walk.forward():
        held = state.hold()
        _attention_logits_step(h_prev, xc[t], xa[t], p, cand[t], feat, logits, zpart, height,
                               width, grid, launch, dot)
        c, c_prev, first, last = state.step(t)
        attention_cell_kernel[grid](logits, zpart, c, c_prev, cand[t], xg[t], hpart[(t + 1) % 2],
                                    hpart[t % 2], gwh, out[t], cell[t], att[t], gate_preact[t],
                                    state.h_n, state.c_n, hidden, height, width, tiles, first,
                                    last, int(output_gate), ACT=gate_activation,
                                    SPLIT=state.split, **launch)
        if mask.active:
            state.forward_step(t, out[t], held, h_prev, hpart[t % 2], hpart[(t + 1) % 2])
        else:
            h_prev = out[t]
    state_shape = (steps, batch, height, width, hidden)
    output, h_n, c_n = state.outputs(out, h_prev)
    return output, h_n, c_n, [cell.view(state_shape), cand.view(state_shape), gate_preact,
                              att.view(state_shape)]


def channel_attention_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                               saved, gate_activation: int, output_gate: bool,
                               reverse: bool = False, lengths: torch.Tensor | None = None):
    """Gradients of :func:`channel_attention_forward` w.r.t. x, h0, c0 and every parameter."""
    p = [q.contiguous() for q in params]
    gwx, gwh, _, cdwx, cpwx, cdwh, cpwh, _, adwx, apwx, adwh, apwh, _, zdw, zpw = p
    steps, batch, cin, height, width = x.shape
    hidden, pixels, ksize = h0.shape[1], height * width, cdwh.shape[-1]
    state = (steps, batch * pixels, hidden)
    cell, cand, gate_preact, att = saved
    cell, cand, att = (s.reshape(state).contiguous() for s in (cell, cand, att))
    gate_preact = gate_preact.contiguous()
    frames = x.reshape(steps * batch, cin, height, width)
    maps = steps * batch
    walk = Walk(steps, reverse)
    mask = StepMask(lengths, walk, batch)

    # A_t and Z_t are not saved: each step of the loop recomputes them with the forward's kernels.
    xc, xa, _ = _attention_x_side(x, p, steps, batch, pixels, hidden, gates=False)
    h_prev = mask.before_each(output, h0).reshape(maps, hidden, height, width)
    h_prev_maps = h_prev.view(steps, batch, hidden, height, width)  # NCHW, read in place

    gout, dc = output_grads(grad_output, grad_h_n, grad_c_n, walk, mask)
    c0_rows = rows(c0)

    block_m, block_c = block_sizes(x.device, pixels, hidden)
    tiles = triton.cdiv(pixels, block_m)
    f32 = dict(device=x.device, dtype=torch.float32)
    dacc, ddw_c, dz, ddz, dfeat, ddw_a, feat = (torch.empty_like(cell) for _ in range(7))
    cand_scratch = torch.empty_like(cell[0])  # the recompute's G (the saved G is used)
    logits, datt = torch.empty_like(cand_scratch), torch.empty(state[1:], **f32)
    zpart = torch.empty(batch, tiles, hidden, **f32)
    spart = torch.empty(batch, tiles, hidden, **f32)
    gpart = torch.empty(steps, batch, tiles, 2 * hidden, **f32)
    dgp = torch.empty(steps, batch, 2 * hidden, **f32)
    grad_h0_rows = torch.empty_like(cell[0])
    grid = (tiles, triton.cdiv(hidden, block_c), batch)
    launch = dict(BLOCK_M=block_m, BLOCK_N=block_c,  # the forward's, for its recompute
                  BLOCK_K=min(block_c, ATTENTION_FWD_BLOCK_K), **ATTENTION_FWD_LAUNCH)
    cell_bwd = dict(BLOCK_M=block_m, BLOCK_N=block_c, BLOCK_K=block_c, **POOLED_BWD_LAUNCH)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_c, **SEPCONV_LAUNCH)
    dot = dot_precision(x.dtype)
    for s in walk.backward():
        t = s.t
        dc_held = mask.hold(dc) if s.cell else None
        dgp_rec = mask.rec(s, dgp)
        attention_cell_bwd_kernel[grid](
            mask.rec(s, ddw_c), mask.rec(s, ddw_a), mask.rec(s, gpart), mask.rec(s, gate_preact),
            dgp_rec, gwh, cdwh, adwh,
            gout[t], grad_h0_rows, cell[t], s.prev(cell, c0_rows), cand[t], att[t],
            gate_preact[t], dc, dacc[t], datt, spart, gpart[t],
            hidden, height, width, tiles, KSIZE=ksize, ACT=gate_activation,
            OUTPUT_GATE=output_gate, HAS_REC=s.has_rec, CELL=s.cell, **cell_bwd)
        if not s.cell:
            mask.rec_written(s, dgp, dgp_rec)
            break
        mask.backward_step(t, dc, dc_held, dacc[t], datt, spart, gpart[t])
        _attention_logits_step(h_prev_maps[t], xc[t], xa[t], p, cand_scratch, feat[t], logits,
                               zpart, height, width, grid, launch, dot)
        # τ = [Z = max_HW Z] / #ties per (sample, channel), on the forward's own Z_t
        z_maps = logits.view(batch, pixels, hidden)
        is_max = z_maps == z_maps.amax(1, keepdim=True)
        tie = (is_max / is_max.sum(1, keepdim=True)).view(state[1:])
        attention_logits_bwd_kernel[grid](att[t], datt, tie, spart, dz[t], hidden, pixels,
                                          tiles, **blocks)
        torch.mm(dz[t], zpw, out=ddz[t])                   # d dw_z(A) = dZ · pw_z
        attention_features_bwd_kernel[grid](ddz[t], zdw, feat[t], dfeat[t], hidden, height,
                                            width, KSIZE=ksize, **blocks)
        torch.mm(dacc[t], cpwh, out=ddw_c[t])              # d dw_h(H_{t−1}) = dacc · pw_h
        torch.mm(dfeat[t], apwh, out=ddw_a[t])             # d dw_ha(H_{t−1}) = dA' · pw_ha

    # Weight gradients of all steps in batched products.
    def flat(buffer):
        return buffer.view(-1, hidden)

    def as_maps(buffer):
        return nchw(flat(buffer), maps, height, width)

    feat_maps = as_maps(feat)
    grad_cpwh = steps_mm(flat(dacc), rows(depthwise(h_prev, cdwh)), steps)
    _, grad_cdwh = depthwise_backward(as_maps(ddw_c), h_prev, cdwh, False, steps)
    grad_apwh = steps_mm(flat(dfeat), rows(depthwise(h_prev, adwh)), steps)
    _, grad_adwh = depthwise_backward(as_maps(ddw_a), h_prev, adwh, False, steps)
    grad_zpw = steps_mm(flat(dz), rows(depthwise(feat_maps, zdw)), steps)
    _, grad_zdw = depthwise_backward(as_maps(ddz), feat_maps, zdw, False, steps)
    dgp_rows = dgp.view(maps, 2 * hidden)
    grad_gwh = steps_mm(dgp_rows, h_prev.mean((-2, -1), dtype=torch.float32), steps)
    grad_gwx = steps_mm(dgp_rows, frames.mean((-2, -1), dtype=torch.float32), steps)
    grad_fc, grad_cdwx, grad_cpwx = sepconv_rows_backward(
        flat(dacc), frames, rows(depthwise(frames, cdwx)), cdwx, cpwx, steps)
    grad_fa, grad_adwx, grad_apwx = sepconv_rows_backward(
        flat(dfeat), frames, rows(depthwise(frames, adwx)), adwx, apwx, steps)
    grad_frames = grad_fc + grad_fa
    grad_frames = grad_frames + ((dgp_rows @ gwx.float()) / pixels).to(x.dtype)[:, :, None, None]
    grads = [grad_gwx, grad_gwh, dgp_rows.sum(0), grad_cdwx, grad_cpwx, grad_cdwh, grad_cpwh,
             flat(dacc).sum(0, dtype=torch.float32), grad_adwx, grad_apwx, grad_adwh, grad_apwh,
             flat(dfeat).sum(0, dtype=torch.float32), grad_zdw, grad_zpw]
    mask.initial_hidden_grad(grad_h0_rows, grad_h_n)
    grad_x, grad_h0, grad_c0 = layer_input_grads(grad_frames, grad_h0_rows, dc, x)
    return grad_x, grad_h0, grad_c0, [g.to(q.dtype).contiguous() for g, q in zip(grads, params)]


# What one more step of (c) or (d) launches (Triton kernels, ATen calls; launch_count.py measures
# it). Forward: three kernels — the attention features, the logits, the cell. Backward: five
# kernels and 7 ATen calls — the attention map's max-normalisation backward (amax, eq, sum, div)
# and three GEMMs into their buffers.
CHANNEL_ATTENTION_LAUNCHES = {"forward": (3, 0), "backward": (5, 7)}


def channel_attention_op(op: str, output_gate: bool):
    """``(<op>_forward, <op>_backward)``: :func:`channel_attention_forward` and
    :func:`channel_attention_backward` of variant (c) (``output_gate`` False) or (d) (True), with
    the registered op's signatures."""

    def forward(x, h0, c0, params, gate_activation: int, reverse: bool = False, lengths=None):
        return channel_attention_forward(x, h0, c0, params, gate_activation, output_gate,
                                         reverse, lengths)

    def backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                 gate_activation: int, reverse: bool = False, lengths=None):
        return channel_attention_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params,
                                          output, saved, gate_activation, output_gate, reverse,
                                          lengths)

    forward.__name__, backward.__name__ = f"{op}_forward", f"{op}_backward"
    forward.__qualname__, backward.__qualname__ = forward.__name__, backward.__name__
    return forward, backward


def cell_state_cases(dtype: torch.dtype) -> tuple[dict, dict]:
    """For compile_check, what a forward step kernel's cell state (:class:`CellState`) makes of
    its signature in ``dtype``: the type of ``c`` and the SPLIT flag."""
    split = dtype == torch.bfloat16
    return {"c_ptr": "i16" if split else "fp32"}, dict(SPLIT=split)


def compile_cases(dtype: torch.dtype, ksize: int, block_c: int, gate_activation: int, dot: str):
    """(kernel, pointer types, constexprs, launch options) of every kernel defined here, in each
    flag combination an op launches on a GPU (for compile_check): pointer types are the names of
    the fp32 pointers, or a {name: type} dict; other pointers are x.dtype. Each kernel's most
    complete combination comes first."""
    blocks = dict(BLOCK_M=GPU_BLOCK_M, BLOCK_N=block_c)
    fwd_k = min(block_c, ATTENTION_FWD_BLOCK_K)
    gemm = dict(blocks, BLOCK_K=fwd_k, KSIZE=ksize, DOT_PRECISION=dot)
    pooled_bwd = dict(blocks, BLOCK_K=block_c, KSIZE=ksize, ACT=gate_activation)
    pooled_bwd_fp32 = {"gpart_next_ptr", "dgp_next_ptr", "dc_ptr", "gpart_ptr"}
    cases = [
        (pooled_layer_bwd_kernel, pooled_bwd_fp32,
         dict(pooled_bwd, HAS_REC=has_rec, CELL=cell, ATT_PATH=att_path), POOLED_BWD_LAUNCH)
        for has_rec, cell in ((True, True), (False, True), (True, False))
        for att_path in (True, False)  # ATT_PATH: variant b (spatial_attention_layer)
    ]
    cases += [  # the X side of a, b, c, d (sepconv_x_rows), x̄ or not: one compile
        (sepconv_frames_kernel, {"xpart_ptr"}, gemm, ATTENTION_FWD_LAUNCH),
        # xg from its tile sums (a: 3 gates, c/d: 2; a runtime count)
        (pooled_input_gates_kernel, {"xpart_ptr", "xg_ptr"}, dict(BLOCK_N=block_c, BLOCK_K=fwd_k),
         SEPCONV_LAUNCH),
    ]
    cases += [
        (attention_features_kernel, set(), dict(gemm, CAND=True), ATTENTION_FWD_LAUNCH),
        (attention_features_kernel, set(), dict(gemm, CAND=False),
         ATTENTION_FWD_LAUNCH),  # b: spatial_attention_layer
        (attention_logits_kernel, {"zpart_ptr"}, gemm, ATTENTION_FWD_LAUNCH),
        (attention_logits_bwd_kernel, {"datt_ptr", "tie_ptr", "spart_ptr"}, blocks,
         SEPCONV_LAUNCH),
        (attention_features_bwd_kernel, set(), dict(blocks, KSIZE=ksize), SEPCONV_LAUNCH),
    ]
    state_types, state_flags = cell_state_cases(dtype)
    fwd_types = {**dict.fromkeys(("zpart_ptr", "xg_ptr", "hpart_prev_ptr", "hpart_next_ptr"),
                                 "fp32"), **state_types}
    bwd_fp32 = {"gpart_next_ptr", "dgp_next_ptr", "dc_ptr", "datt_ptr", "spart_ptr", "gpart_ptr"}
    # c and d (input_attention_layer, output_attention_layer): one forward cell kernel (its
    # output_gate a runtime flag), the backward's per gate
    cases.append((attention_cell_kernel, fwd_types,
                  dict(blocks, BLOCK_K=fwd_k, ACT=gate_activation, **state_flags),
                  ATTENTION_FWD_LAUNCH))
    for output_gate in (False, True):
        cell = dict(blocks, BLOCK_K=block_c, ACT=gate_activation, OUTPUT_GATE=output_gate)
        for has_rec, is_cell in ((True, True), (False, True), (True, False)):
            cases.append((attention_cell_bwd_kernel, bwd_fp32,
                          dict(cell, KSIZE=ksize, HAS_REC=has_rec, CELL=is_cell),
                          POOLED_BWD_LAUNCH))
    return cases


# ---------------------------------------------------------------------------------------------
# Traffic models (convlstm_fast.bench.roofline): what the launchers above move, per launch
# ---------------------------------------------------------------------------------------------
# Plain Python on the shapes and the GPU tiling (GPU_BLOCK_M × GPU_BLOCK_CS[0] programs), for
# ``traffic(shape, itemsize)`` of every op module; records are bench.roofline's ``Recorder``.

def gpu_grid(z) -> tuple[int, int, int]:
    """(pixel tiles per sample, channel tiles, programs) of a step kernel's GPU grid."""
    tiles = -(-z.HW // GPU_BLOCK_M)
    channel_tiles = -(-z.C // GPU_BLOCK_CS[0])
    return tiles, channel_tiles, tiles * channel_tiles * z.B


def sepconv_x_rows_traffic(r, z, cin: int, cout: int, gates: int = 0) -> None:
    """:func:`sepconv_x_rows`: one kernel over every frame of X, reading it once and writing the
    rows; each of its cout/BLOCK_N channel tiles loads the frames' K² shifted tiles over all cin
    channels and its pw slice (``loaded``, from L2). With ``gates`` (the pooled gates' count)
    the first channel tile also writes its column sums, from which pooled_input_gates_kernel
    makes xg = U_x x̄ + b_g (every program of it reads its sample's sums once per gate and its
    U_x rows: ``loaded``)."""
    tiles, _, _ = gpu_grid(z)
    channel_tiles = -(-cout // GPU_BLOCK_CS[0])
    maps = z.T * z.B
    frames, sums = z.xseq(), (maps * tiles * cin * 4 if gates else 0)
    read = frames + z.weight(z.K * z.K * cin + cin * cout + cout)
    loaded = (channel_tiles * z.K * z.K * frames + (frames if gates else 0)
              + maps * tiles * channel_tiles * GPU_BLOCK_CS[0] * cin * z.s)
    r.kernel("sepconv_frames_kernel", read, z.seq(cout) + sums,
             channel_tiles * z.depthwise_flops(cin, z.T) + z.gemm_flops(z.T * z.rows, cout, cin),
             loaded=loaded)
    if gates:
        rows = gates * cout
        weight = z.weight(rows * cin + rows)
        r.kernel("pooled_input_gates_kernel", sums + weight, maps * rows * 4,
                 z.gemm_flops(maps, rows, cin) + maps * channel_tiles * gates * tiles * cin,
                 loaded=channel_tiles * gates * sums + maps * weight)


def sepconv_rows_backward_traffic(r, z, cin: int, cout: int, maps: int, need_input=True) -> None:
    """:func:`sepconv_rows_backward` given the rows' gradient: d pw, d(dw output), the depthwise
    conv's backward."""
    grad, frames = maps * z.state(cout), maps * z.state(cin)
    r.aten("mm (d pw)", grad + frames, z.weight(cin * cout), z.gemm_flops(cout, cin, maps * z.rows))
    r.aten("mm (d dw output)", grad + z.weight(cin * cout), frames,
           z.gemm_flops(maps * z.rows, cin, cout))
    depthwise_backward_traffic(r, z, cin, maps, need_input)


def depthwise_backward_traffic(r, z, channels: int, maps: int, need_input: bool) -> None:
    """:func:`depthwise_backward`: reads the gradient and the input, writes d input if asked."""
    size = maps * z.state(channels)
    r.aten("convolution_backward (depthwise)", 2 * size, size if need_input else 0,
           z.depthwise_flops(channels, maps) * (2 if need_input else 1))


def initial_pooled_state_traffic(r, z) -> None:
    """:func:`initial_pooled_state`: the zeroed ping-pong buffers of H's column sums and H_0's
    in tile 0 of one (H_0 and C_0 are read in place)."""
    tiles, _, _ = gpu_grid(z)
    r.aten("zeros (hpart)", 0, 2 * z.B * tiles * z.C * 4)
    r.aten("sum (h0 column sums)", z.state(), z.vec(z.C))
    r.aten("copy_ (into tile 0)", z.vec(z.C), z.vec(z.C))


def layer_outputs_traffic(r, z) -> None:
    """:func:`layer_outputs`: h_n's copy, c_n from the fp32 state (the steps wrote the output)."""
    r.aten("clone (h_n)", z.state(), z.state())
    r.aten("_to_copy (c_n)", z.state32(), z.state())


def output_grads_traffic(r, z) -> None:
    """:func:`output_grads` and ``rows(c0)``: grad_h_n added to the last step's grad_output (the
    others are read in place), fp32 dC."""
    r.aten("add (grad_h_n into the last step)", 2 * z.state(), z.state())
    r.aten("copy_ (grad_c_n to fp32 rows)", z.state(), z.state32())
    r.aten("clone (rows c0)", z.state(), z.state())


def layer_input_grads_traffic(r, z) -> None:
    """:func:`layer_input_grads`: grad_h0 to NCHW, grad_c0 from the fp32 dC."""
    r.aten("clone (grad_h0)", z.state(), z.state())
    r.aten("_to_copy (grad_c0)", z.state32(), z.state())


def h_prev_all_traffic(r, z) -> None:
    """:meth:`Walk.before_each` of the output: H_{t−1} of every step (for the weight gradients)."""
    r.aten("cat (H_{t-1} of all steps)", z.seq(), z.seq())


def pooled_layer_bwd_traffic(r, z, att_path: bool) -> None:
    """The T + 1 launches of :func:`pooled_layer_bwd_kernel` (t = T−1 … 0, then t = −1 for dH_0):
    see :func:`cell_bwd_traffic`; ATT_PATH (b) adds the second transposed depthwise."""
    cell_bwd_traffic(r, z, "pooled_layer_bwd_kernel", 3, 2 if att_path else 1, channel_map=False)


def cell_bwd_traffic(r, z, name: str, gates: int, paths: int, channel_map: bool) -> None:
    """The T + 1 launches of a pooled cell's backward step kernel (:func:`pooled_layer_bwd_kernel`
    or :func:`attention_cell_bwd_kernel`): dH_t from grad_output, the transposed depthwise of
    each of the ``paths`` ddw_{t+1} and dh̄_{t+1}; with CELL the cell backward (C_t, C_{t−1}, G
    (and M with ``channel_map``) in; dC in place; dacc (and the fp32 dM and Σ M∘dM) out, with the
    gate partials). Each program re-reduces the gate partials and recomputes dgp·U_h for its
    channels (``loaded``), as every program loads K² taps of each ddw (halo re-reads)."""
    tiles, channel_tiles, programs = gpu_grid(z)
    partials = z.B * tiles * gates * z.C * 4
    preacts = z.vec(gates * z.C, z.s)
    weights = z.weight(gates * z.C * z.C + paths * z.K * z.K * z.C)
    rec_loaded = (paths * (z.K * z.K - 1) * z.state() + programs * (
        tiles * gates * z.C * 4 + gates * z.C * GPU_BLOCK_CS[0] * z.s))
    rec_read = paths * z.state() + partials + preacts + weights
    rec_flops = paths * z.depthwise_flops(z.C) + programs * 2 * gates * z.C * GPU_BLOCK_CS[0]
    maps = 1 if channel_map else 0
    # grad_output, C_t, C_{t−1}, G (, M); dC; the gate pre-activations
    cell_read = (4 + maps) * z.state() + z.state32() + preacts
    cell_written = z.state32() + z.state() + partials + maps * (z.state32() + z.B * tiles * z.C * 4)
    cell_flops = z.cell_backward_flops()
    r.kernel(f"{name} (t = T-1)", cell_read, cell_written, cell_flops)
    r.kernel(f"{name} (t < T-1)", cell_read + rec_read, cell_written + z.vec(gates * z.C),
             cell_flops + rec_flops, count=z.T - 1, loaded=cell_read + rec_read + rec_loaded)
    if z.T > 1:
        r.kernel(f"{name} (dH_0)", rec_read, z.state() + z.vec(gates * z.C), rec_flops,
                 loaded=rec_read + rec_loaded)
    else:
        r.kernel(f"{name} (dH_0)", 0, z.state())


def attention_features_traffic(r, z, cand: bool, count: int) -> None:
    """:func:`attention_features_kernel`: both SepConvs of H_{t−1} (without ``cand``, b: only
    F's), one after the other (each of the C/BLOCK_N channel tiles redoes the depthwise convs of
    all C channels: ``loaded``)."""
    tiles, channel_tiles, programs = gpu_grid(z)
    convs = 2 if cand else 1
    weights = z.weight(convs * (z.K * z.K * z.C + z.C * z.C))
    read = (3 if cand else 2) * z.state() + weights
    written = convs * z.state()
    loaded = (read + (convs * channel_tiles * z.K * z.K - 1) * z.state()
              + programs * convs * GPU_BLOCK_CS[0] * z.C * z.s)
    flops = convs * (channel_tiles * z.depthwise_flops(z.C) + z.gemm_flops(z.rows, z.C, z.C))
    r.kernel("attention_features_kernel", read, written, flops, count=count, loaded=loaded)


def attention_logits_traffic(r, z, count: int) -> None:
    """:func:`attention_logits_kernel`: Z = SepConv_z(A) in the dtype and the tiles' channel
    maxima (fp32)."""
    tiles, channel_tiles, programs = gpu_grid(z)
    read = z.state() + z.weight(z.K * z.K * z.C + z.C * z.C)
    loaded = (read + (channel_tiles * z.K * z.K - 1) * z.state()
              + programs * GPU_BLOCK_CS[0] * z.C * z.s)
    r.kernel("attention_logits_kernel", read, z.state() + z.B * tiles * z.C * 4,
             channel_tiles * z.depthwise_flops(z.C) + z.gemm_flops(z.rows, z.C, z.C),
             count=count, loaded=loaded)


def channel_attention_traffic(shape, itemsize: int) -> list:
    """Modelled HBM bytes and FLOPs of every launch of :func:`channel_attention_forward` and
    :func:`channel_attention_backward` (c and d move the same bytes), bench.roofline's
    conventions. The backward recomputes A_t and Z_t with the forward's two first kernels."""
    from convlstm_fast.bench.roofline import BACKWARD, Recorder, Sizes, cell_state_steps

    z, r = Sizes(shape, itemsize), Recorder()
    C, cin, T = z.C, z.cin, z.T
    tiles, channel_tiles, programs = gpu_grid(z)
    sepconv_x_rows_traffic(r, z, cin, C, gates=2)  # xc and xg
    sepconv_x_rows_traffic(r, z, cin, C)  # xa
    initial_pooled_state_traffic(r, z)
    attention_features_traffic(r, z, cand=True, count=T)
    attention_logits_traffic(r, z, count=T)
    hpart = z.B * tiles * C * 4
    read = z.state() + hpart + z.state() + z.vec(2 * C) + hpart + z.weight(2 * C * C)
    written = 2 * z.state() + z.vec(2 * C, z.s) + hpart
    cell_state_steps(r, z, "attention_cell_kernel", read, written,
                     programs * 2 * 2 * GPU_BLOCK_CS[0] * C + z.cell_flops(),
                     programs * (2 * tiles * C * 4 + 2 * GPU_BLOCK_CS[0] * C * z.s))

    r.phase = BACKWARD
    sepconv_x_rows_traffic(r, z, cin, C)  # xc
    sepconv_x_rows_traffic(r, z, cin, C)  # xa
    h_prev_all_traffic(r, z)
    output_grads_traffic(r, z)
    cell_bwd_traffic(r, z, "attention_cell_bwd_kernel", 2, 2, channel_map=True)
    attention_features_traffic(r, z, cand=True, count=T)
    attention_logits_traffic(r, z, count=T)
    r.aten("amax (max_HW Z)", z.state(), z.vec(C, z.s), count=T)
    r.aten("eq (Z = max Z)", z.state() + z.vec(C, z.s), z.state(itemsize=1), count=T)
    r.aten("sum (ties)", z.state(itemsize=1), z.vec(C, 8), count=T)
    r.aten("div (τ)", z.state(itemsize=1) + z.vec(C, 8), z.state32(), count=T)
    r.kernel("attention_logits_bwd_kernel", z.state() + 2 * z.state32() + hpart, z.state(),
             count=T, loaded=z.state() + 2 * z.state32() + programs * tiles * GPU_BLOCK_CS[0] * 4)
    for what in ("ddz = dZ · pw_z", "ddw_c = dacc · pw_h", "ddw_a = dA' · pw_ha"):
        r.aten(f"mm ({what})", z.state() + z.weight(C * C), z.state(), z.gemm_flops(z.rows, C, C),
               count=T)
    r.kernel("attention_features_bwd_kernel", 2 * z.state() + z.weight(z.K * z.K * C),
             z.state(), z.depthwise_flops(C), count=T, loaded=(z.K * z.K + 1) * z.state())
    for what in ("h", "ha"):
        r.aten(f"convolution (depthwise dw_{what}(H_{{t-1}}))", z.seq(), z.seq(),
               z.depthwise_flops(C, T))
        r.aten("clone (rows)", z.seq(), z.seq())
        r.aten(f"mm (d pw_{what})", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, T * z.rows))
        depthwise_backward_traffic(r, z, C, T, need_input=False)
    r.aten("convolution (depthwise dw_z(A))", z.seq(), z.seq(), z.depthwise_flops(C, T))
    r.aten("clone (rows)", z.seq(), z.seq())
    r.aten("mm (d pw_z)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, T * z.rows))
    depthwise_backward_traffic(r, z, C, T, need_input=False)
    r.aten("mean (GAP(H_{t-1}))", z.seq(), T * z.vec(C))
    r.aten("mean (GAP(X))", z.xseq(), T * z.vec(cin))
    for what in ("x", "xa"):
        r.aten(f"convolution (depthwise dw_{what}(X))", z.xseq(), z.xseq(),
               z.depthwise_flops(cin, T))
        r.aten("clone (rows)", z.xseq(), z.xseq())
        sepconv_rows_backward_traffic(r, z, cin, C, T)
    r.aten("add (dX of both SepConvs)", 2 * z.xseq(), z.xseq())
    r.aten("add (GAP(X)'s share of dX)", z.xseq(), z.xseq())
    r.aten("sum (d b_c)", z.seq(), C * 4)
    r.aten("sum (d b_a)", z.seq(), C * 4)
    layer_input_grads_traffic(r, z)
    return r.launches
