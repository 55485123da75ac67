"""Weight gradients over a layer's steps, summed the way the reference sums them.

The reference's autograd (one cell per step) adds up T per-step weight gradients, each a sum over
one step's B·H·W positions. One product or convolution backward over all T·B·H·W positions at
once accumulates a single long sum instead, which in fp32 is measurably less accurate at long
sequences: tests/test_backends.py's "long" case (T = 16, B = 4, 16×16) put every fused backend
~1.6× over STYLE.md's fp32 bound, benchmarks/wgrad_probe.py measures the batched convolution
backward 2.3× further from float64 than the per-step sum on the CPU, and on the H200 it was
convlstm's grad_weight_h. So in fp32 these helpers sum over ``groups`` equal contiguous blocks
of rows (or frames) — one per step: any equal split gives the same two-level sum, so a
batch-first input's frame order does not matter — then over the blocks. Other dtypes keep one
call: their results are far coarser than the order of an fp32 sum. Each helper issues the same
ATen calls for any T, but the dense convolution's (one call and one add per step), so that the
launches per step stay what the op modules declare. The CUDA drivers' twins are
csrc/cuda/layer_common.cuh's ``steps_mm`` and ``same_conv_weight_grad``.
"""

from __future__ import annotations

import torch


def steps_mm(grad: torch.Tensor, inp: torch.Tensor, groups: int) -> torch.Tensor:
    """``gradᵀ · inp`` (``[rows, out]``, ``[rows, in]`` -> ``[out, in]``) over ``groups`` blocks
    of rows: in fp32 one batched product of the blocks, then their sum."""
    if grad.dtype != torch.float32:
        return grad.t() @ inp
    rows = grad.shape[0] // groups
    return torch.bmm(grad.reshape(groups, rows, grad.shape[1]).transpose(1, 2),
                     inp.reshape(groups, rows, inp.shape[1])).sum(0)


def _conv_weight_grad(grad, inp, weight, groups: int) -> torch.Tensor:
    pad = weight.shape[-1] // 2
    return torch.ops.aten.convolution_backward(
        grad, inp, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], groups,
        [False, True, False])[1]


def conv_weight_grad(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor,
                     groups: int) -> torch.Tensor:
    """d ``weight`` of the 'same' dense convolution ``conv(inp, weight)`` given ``grad``, over
    ``groups`` blocks of frames (``[N, ...]``): in fp32 one call per block, summed from the
    last block to the first (the reference's backward order); otherwise one call."""
    if grad.dtype != torch.float32:
        return _conv_weight_grad(grad, inp, weight, 1)
    frames = grad.shape[0] // groups
    total = None
    for g in reversed(range(groups)):
        part = _conv_weight_grad(grad[g * frames:(g + 1) * frames],
                                 inp[g * frames:(g + 1) * frames], weight, 1)
        total = part if total is None else total.add_(part)
    return total


def depthwise_weight_grad(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor,
                          groups: int) -> torch.Tensor:
    """d ``weight [C, 1, K, K]`` of the 'same' depthwise convolution of ``inp [N, C, H, W]``
    given ``grad``, over ``groups`` blocks of frames: in fp32 ONE grouped convolution backward
    whose groups are (block, channel) — the blocks laid side by side as channels — then the sum
    over the blocks; otherwise one call."""
    if grad.dtype != torch.float32:
        return _conv_weight_grad(grad, inp, weight, weight.shape[0])
    n, channels, height, width = inp.shape
    frames = n // groups

    def side_by_side(t):  # [groups·frames, C, H, W] -> [frames, groups·C, H, W], one copy
        out = t.new_empty(frames, groups * channels, height, width)  # (also at groups = 1)
        out.view(frames, groups, channels, height, width).copy_(
            t.reshape(groups, frames, channels, height, width).transpose(0, 1))
        return out

    per_block = _conv_weight_grad(side_by_side(grad), side_by_side(inp),
                                  weight.repeat(groups, 1, 1, 1), groups * channels)
    return per_block.view(groups, *weight.shape).sum(0)
