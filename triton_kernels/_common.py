"""Pieces shared by the Triton layer ops: activations, the on-the-fly depthwise tile, the pooled
gates, block sizes, dot precision and the channels-last layout helpers.

Inside an op every state is a channels-last matrix of rows ``[B·H·W, C]`` (KERNELS.md "Layout"):
a pixel's channels are contiguous, so the pointwise convolutions are row-major GEMMs (``tl.dot``)
and a depthwise K×K tile of ``BLOCK_M`` pixels × ``BLOCK_K`` channels is K² coalesced loads.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


@triton.jit
def depthwise_tile(src_ptr, oy, ox, mask_m, offs_k, mask_k, C, H, W, dw_ptr,
                   KSIZE: tl.constexpr, FLIP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Depthwise K×K 'same' convolution of one sample's channels-last map ``src [H·W, C]`` at
    pixels (oy, ox) and channels offs_k, in fp32 (zero outside the map):
        FLIP = False:  out[y, x, k] = Σ_{a,b} w[k, a, b] · src[y + a − P, x + b − P, k]
        FLIP = True:   out[y, x, k] = Σ_{a,b} w[k, a, b] · src[y − a + P, x − b + P, k]
    (the second is the transposed convolution: the gradient of the first w.r.t. src).
    ``dw`` is ``[C, K·K]`` (conv2d's ``[C, 1, K, K]``), P = K // 2."""
    PAD: tl.constexpr = KSIZE // 2
    out = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for a in tl.static_range(KSIZE):
        for b in tl.static_range(KSIZE):
            if FLIP:
                iy = oy - (a - PAD)
                ix = ox - (b - PAD)
            else:
                iy = oy + (a - PAD)
                ix = ox + (b - PAD)
            valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            ptrs = src_ptr + (iy * W + ix)[:, None] * C + offs_k[None, :]
            v = tl.load(ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            w = tl.load(dw_ptr + offs_k * (KSIZE * KSIZE) + (a * KSIZE + b), mask=mask_k,
                        other=0.0).to(tl.float32)
            out += v * w[None, :]
    return out


@triton.jit
def pooled_gate_dot(part_ptr, w_ptr, b, offs_n, mask_n, C, CK, NMT, HW,
                    NUM_GATES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k W[g·C + n, k] · ȳ[k] for gates g < NUM_GATES and channels offs_n of sample b, where
    ȳ = (Σ_tiles part[b, tile, :]) / HW is the GAP of a map from its per-pixel-tile column sums
    ``part [B, NMT, CK]`` (reduced here in a fixed order: deterministic); ``W [NUM_GATES·C, CK]``.
    Returns three vectors (the unused ones are zero)."""
    z0 = tl.zeros_like(offs_n).to(tl.float32)
    z1 = tl.zeros_like(offs_n).to(tl.float32)
    z2 = tl.zeros_like(offs_n).to(tl.float32)
    for k0 in range(0, CK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < CK
        ybar = tl.zeros([BLOCK_K], dtype=tl.float32)
        for tile in range(NMT):
            ybar += tl.load(part_ptr + (b * NMT + tile) * CK + offs_k, mask=mask_k, other=0.0)
        ybar = ybar / HW
        wmask = mask_n[:, None] & mask_k[None, :]
        rows = offs_n[:, None] * CK + offs_k[None, :]
        u0 = tl.load(w_ptr + rows, mask=wmask, other=0.0).to(tl.float32)
        z0 += tl.sum(u0 * ybar[None, :], axis=1)
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
        raw = tl.zeros([BLOCK_K], dtype=tl.float32)
        for tile in range(NMT):
            raw += tl.load(gpart_ptr + (b * NMT + tile) * GC + offs_j, mask=mask_j, other=0.0)
        z = tl.load(gate_ptr + b * GC + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        dgp = raw * gate_act_grad(z, ACT)
        if STORE:
            tl.store(dgp_ptr + b * GC + offs_j, dgp, mask=mask_if(mask_j, store_here))
        u = tl.load(uh_ptr + offs_j[:, None] * C + offs_n[None, :],
                    mask=mask_j[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        dhbar += tl.sum(u * dgp[:, None], axis=0)
    return dhbar


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


def nchw(x_rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Rows ``[N·H·W, C]`` -> an ``[N, C, H, W]`` view in channels_last memory format."""
    return x_rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def depthwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' K×K convolution of ``[N, C, H, W]`` (any memory format)."""
    return F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=x.shape[1])


def depthwise_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       need_input: bool):
    """Gradients of :func:`depthwise` w.r.t. its input (if ``need_input``) and weight."""
    pad = weight.shape[-1] // 2
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], x.shape[1],
        [need_input, True, False])
    return grad_input, grad_weight


def sepconv_rows(x: torch.Tensor, dw: torch.Tensor, pw: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SepConv of ``x [N, Cin, H, W]`` for all N at once, as rows: returns
    ``(depthwise rows [N·H·W, Cin], dw(x)·pwᵀ + bias [N·H·W, C])``."""
    d = rows(depthwise(x, dw))
    out = torch.addmm(bias, d, pw.t()) if bias is not None else d @ pw.t()
    return d, out


def sepconv_rows_backward(grad_rows: torch.Tensor, x: torch.Tensor, d_rows: torch.Tensor,
                          dw: torch.Tensor, pw: torch.Tensor, need_input: bool = True):
    """Backward of :func:`sepconv_rows` given ``grad_rows [N·H·W, C]`` (the bias gradient is the
    column sum, taken by the caller): returns ``(grad_x or None, grad_dw, grad_pw)``."""
    n, _, h, w = x.shape
    grad_pw = grad_rows.t() @ d_rows
    grad_d = nchw(grad_rows @ pw, n, h, w)
    grad_x, grad_dw = depthwise_backward(grad_d, x, dw, need_input)
    return grad_x, grad_dw, grad_pw
