"""The Triton ops with the GPU's tiling, under the interpreter.

On CPU tensors the launchers pick interpreter-sized blocks (``_common.block_sizes``: as few, large
programs as possible), so the rest of this folder never runs a kernel with the block sizes, the
reduction chunks and the tile count a GPU launch uses. Here ``block_sizes`` answers as it does for
a CUDA tensor, on shapes whose maps span several pixel tiles (a partial last one too) and whose
channel counts span several channel tiles (partial too), so that every tiled index, mask and
cross-tile reduction of the GPU launches is checked against the reference: every output and
gradient, both walks, and per-sample lengths. Everything a launcher derives for the GPU (BLOCK_K,
tile counts, partial-sum buffers) must come from ``block_sizes`` for this to hold.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from convlstm_fast.functional import convlstm_layer
from convlstm_fast.reference import cells
from convlstm_fast.triton_kernels import IMPLEMENTED, _common

from helpers import make_inputs

pytestmark = pytest.mark.triton_interpret

RTOL, ATOL = 1e-4, 1e-5
# (T, B, Cin, C, H, W, K): 9×11 = 99 pixels = 64 + 35 (two pixel tiles, the last partial),
# C = 70 = 64 + 6 and Cin = 67 (two channel tiles each, the last partial).
SHAPES = {"k3": (3, 2, 67, 70, 9, 11, 3), "k5": (2, 2, 5, 70, 11, 9, 5)}


@pytest.fixture
def gpu_tiling(monkeypatch):
    def gpu_blocks(device, pixels, channels):
        return _common.GPU_BLOCK_M, _common.GPU_BLOCK_CS[0]

    for name, module in list(sys.modules.items()):
        if name.startswith("convlstm_fast.triton_kernels") and hasattr(module, "block_sizes"):
            monkeypatch.setattr(module, "block_sizes", gpu_blocks)
    assert _common.GPU_BLOCK_M < 99, "the shapes must span more than one GPU pixel tile"
    assert _common.GPU_BLOCK_CS[0] < 70, "the shapes must span more than one GPU channel tile"


def _layer(variant, leaves, params, gate_activation, backend, reverse, lengths):
    if backend == "reference":
        out, h_n, c_n = cells.layer(variant, leaves["x"], leaves["h0"], leaves["c0"], params,
                                    gate_activation, reverse=reverse, lengths=lengths)
        return out, h_n, c_n
    out, (h_n, c_n) = convlstm_layer(leaves["x"], params, variant, (leaves["h0"], leaves["c0"]),
                                     gate_activation=gate_activation, backend=backend,
                                     reverse=reverse, lengths=lengths)
    return out, h_n, c_n


def _results(variant, inputs, gate_activation, backend, reverse, lengths):
    x, h0, c0, params = inputs
    leaves = {"x": x, "h0": h0, "c0": c0, **params}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    outputs = _layer(variant, leaves, {k: leaves[k] for k in params}, gate_activation, backend,
                     reverse, lengths)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in outputs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = dict(zip(("output", "h_n", "c_n"), outputs))
    result.update({"grad_" + k: g for k, g in zip(leaves, grads)})
    return {k: v.detach() for k, v in result.items()}


# K = 3 in every walk; K = 5 (the widest halo) forward only: each case is ~10 s interpreted.
WALKS = [("k3", "forward"), ("k3", "reverse"), ("k3", "ragged"), ("k5", "forward")]


@pytest.mark.parametrize("shape, walk", WALKS, ids=[f"{s}-{w}" for s, w in WALKS])
@pytest.mark.parametrize("variant", IMPLEMENTED)
def test_gpu_tiling_matches_reference(gpu_tiling, variant, shape, walk):
    steps, batch, cin, hidden, height, width, ksize = SHAPES[shape]
    inputs = make_inputs(variant, steps, batch, cin, hidden, height, width, ksize)
    reverse = walk != "forward"
    lengths = torch.tensor([steps - 1, steps][:batch]) if walk == "ragged" else None
    activation = "hard_sigmoid" if shape == "k5" else "sigmoid"
    got = _results(variant, inputs, activation, "triton", reverse, lengths)
    want = _results(variant, inputs, activation, "reference", reverse, lengths)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("one_gate_loops", [True, False], ids=["gate-at-a-time", "four-dot-loop"])
def test_convlstm_forward_loop_structures(gpu_tiling, monkeypatch, one_gate_loops):
    """The ConvLSTM forward's two reduction structures (convlstm_layer.gate_at_a_time): fp32 with
    IEEE dots, the interpreter's default, takes one loop per gate; the four-dot loop is what
    16-bit and TF32 launches take. Both in fp32 against the reference, over 3 partial chunks."""
    from convlstm_fast.triton_kernels import convlstm_layer as module

    chosen = []

    def choice(dtype, dot):
        chosen.append(one_gate_loops)
        return one_gate_loops

    monkeypatch.setattr(module, "gate_at_a_time", choice)
    steps, batch, cin, hidden, height, width, ksize = SHAPES["k3"]
    inputs = make_inputs("convlstm", steps, batch, cin, hidden, height, width, ksize)
    got = _results("convlstm", inputs, "sigmoid", "triton", False, None)
    want = _results("convlstm", inputs, "sigmoid", "reference", False, None)
    assert chosen, "the launcher did not ask gate_at_a_time"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gate_at_a_time_only_for_ieee_fp32():
    from convlstm_fast.triton_kernels.convlstm_layer import gate_at_a_time

    assert gate_at_a_time(torch.float32, "ieee")
    assert not gate_at_a_time(torch.float32, "tf32")
    assert not gate_at_a_time(torch.bfloat16, "ieee")
    assert not gate_at_a_time(torch.float16, "ieee")


@pytest.mark.parametrize("layout", ["time-first", "batch-first", "strided"])
def test_x_side_sepconv_kernel_matches_aten(gpu_tiling, layout):
    """The X side of a, b, c, d (_common.sepconv_x_rows, GPU tiles over 2 partial pixel and
    channel tiles, Cin over 5 reduction chunks) against ATen's depthwise and pointwise
    convolutions, torch.mean and F.linear: time-first rows from x in either order, read in
    place, and from frames whose planes are not contiguous; the pooled gates' X-side terms U_x x̄
    + b_g (3 gates: a; 2: c, d) from the kernel's tile sums."""
    steps, batch, cin, hidden, height, width = 3, 2, 67, 70, 9, 11
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, steps, cin, height, width, generator=gen).transpose(0, 1)
    if layout == "time-first":
        x = x.contiguous()
    elif layout == "strided":
        x = x.transpose(3, 4).contiguous().transpose(3, 4)
    dw = torch.randn(cin, 1, 3, 3, generator=gen) / 3
    pw = torch.randn(hidden, cin, generator=gen) / cin ** 0.5
    bias = torch.randn(hidden, generator=gen)
    frames = x.reshape(steps * batch, cin, height, width)  # time-first: n = t·B + b
    want = F.conv2d(F.conv2d(frames, dw, padding=1, groups=cin), pw[:, :, None, None], bias)
    want = want.permute(0, 2, 3, 1).reshape(-1, hidden)
    x_bar = x.mean((-2, -1)).reshape(steps * batch, cin)
    for gates in (3, 2):
        gate_weight = torch.randn(gates * hidden, cin, generator=gen) / cin ** 0.5
        gate_bias = torch.randn(gates * hidden, generator=gen)
        got, xg = _common.sepconv_x_rows(x, dw, pw, bias, gate_weight, gate_bias)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(xg, F.linear(x_bar, gate_weight, gate_bias),
                                   rtol=RTOL, atol=ATOL)
    alone, none = _common.sepconv_x_rows(x, dw, pw, bias)
    assert none is None
    torch.testing.assert_close(alone, got, rtol=0, atol=0)
