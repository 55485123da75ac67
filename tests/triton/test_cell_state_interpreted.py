"""The pooled-gate step kernels' fp32 cell state (_common.CellState, load_cell_state and
store_cell_state) through Triton's interpreter, in the split form bf16 layers keep it in: the saved
bf16 C_t is the high half of C_t's fp32 bits, the state proper the low half (int16).

The interpreter runs the layer ops in fp32 only (its bf16 arithmetic is not the GPU's), so the
ops' own tests never take the split path on a CPU; the two helpers are run here through a kernel
of this file's own on bf16 and int16 buffers (bit moves only: no bf16 arithmetic), against what
torch computes of the same fp32 values. On a GPU, tests/test_backends.py's bf16 cases run it in
every pooled-gate op.
"""

import pytest
import torch
import triton
import triton.language as tl

from convlstm_fast.triton_kernels._common import load_cell_state, state_tile
from convlstm_fast.triton_kernels import _common
from convlstm_fast.triton_kernels._common import store_cell_state

BATCH, CHANNELS, HEIGHT, WIDTH = 2, 24, 5, 7
BLOCK_M, BLOCK_N = 16, 16


@triton.jit
def _step_state_kernel(c_new_ptr, c_ptr, cell_ptr, prev_ptr, c_n_ptr, out_ptr, C, HW, first, last,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores the rows ``c_new`` as a step's C_t, then loads C_{t−1} as the next step would,
    from ``c`` and ``prev`` (with ``first``: the NCHW ``prev`` itself), into the fp32 rows
    ``out``."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < HW, offs_n < C
    offs, mask = state_tile(b, HW, C, offs_m, mask_m, offs_n, mask_n)
    c_new = tl.load(c_new_ptr + offs, mask=mask, other=0.0)
    store_cell_state(c_new, c_ptr, cell_ptr, c_n_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n,
                     last, SPLIT)
    c_prev = load_cell_state(c_ptr, prev_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n, first,
                             SPLIT)
    tl.store(out_ptr + offs, c_prev, mask=mask)


def _run(c_new, prev=None, first=0, last=0, split=True):
    """(state, saved C_t, c_n, what the next step reads) after one store of ``c_new`` (rows)."""
    rows = c_new.shape[0]
    state = torch.zeros(rows, CHANNELS, dtype=torch.int16 if split else torch.float32)
    cell = torch.empty(rows, CHANNELS, dtype=torch.bfloat16 if split else torch.float32)
    c_n = torch.zeros(BATCH, CHANNELS, HEIGHT, WIDTH, dtype=cell.dtype)
    out = torch.empty(rows, CHANNELS)
    grid = (triton.cdiv(HEIGHT * WIDTH, BLOCK_M), triton.cdiv(CHANNELS, BLOCK_N), BATCH)
    _step_state_kernel[grid](c_new, state, cell, cell if prev is None else prev, c_n, out,
                             CHANNELS, HEIGHT * WIDTH, first, last, SPLIT=split,
                             BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return state, cell, c_n, out


def _awkward_values(generator):
    """fp32 rows over the whole exponent range with ±0, ±inf, NaNs (both signs, high and low
    payload bits), bf16's largest finite value and values exactly halfway between two bf16s."""
    rows = BATCH * HEIGHT * WIDTH
    magnitude = torch.exp2(torch.randint(-140, 128, (rows, CHANNELS), generator=generator).float())
    values = torch.randn(rows, CHANNELS, generator=generator) * magnitude
    bits = values.view(torch.int32)
    # Halfway between two bf16s (low half 0x8000), rounded up or down by even/odd high halves.
    bits[::3, ::2] = (bits[::3, ::2] & ~0xFFFF) | 0x8000
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                            3.3895313892515355e38, -1.1754943508222875e-38, 1.0 + 2.0 ** -8])
    values.view(-1)[:special.numel()] = special
    odd_nans = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, 0x7F808000], dtype=torch.int32)
    values.view(-1)[special.numel():special.numel() + 4] = odd_nans.view(torch.float32)
    return values


def test_split_state_is_exact_and_the_saved_half_is_rounded():
    c_new = _awkward_values(torch.Generator().manual_seed(0))
    state, cell, _, back = _run(c_new)
    finite = ~torch.isnan(c_new)
    # The next step reads C_t bit for bit (NaN as a NaN).
    assert torch.equal(back.view(torch.int32)[finite], c_new.view(torch.int32)[finite])
    assert torch.isnan(back[~finite]).all() and torch.isnan(cell.float()[~finite]).all()
    # The saved C_t is C_t rounded to nearest (ties away from zero where torch ties to even).
    nearest = c_new.to(torch.bfloat16).float()
    saved = cell.float()
    low = c_new.view(torch.int32) & 0xFFFF
    tie = finite & (low == 0x8000)
    assert torch.equal(saved[finite & ~tie], nearest[finite & ~tie])
    assert tie.sum() > 100
    away = (c_new.view(torch.int32) + 0x8000) >> 16 << 16
    assert torch.equal(saved[tie], away.view(torch.float32)[tie])
    # The state is the low halves.
    assert torch.equal(state[finite], low.to(torch.int16)[finite])

@pytest.mark.parametrize("split", [True, False], ids=["split-bf16", "fp32"])
def test_first_step_reads_c0_and_last_writes_c_n_instead_of_the_state(split):
    generator = torch.Generator().manual_seed(1)
    rows = BATCH * HEIGHT * WIDTH
    c_new = torch.randn(rows, CHANNELS, generator=generator)
    c0 = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH, generator=generator)
    c0 = c0.to(torch.bfloat16 if split else torch.float32)
    state, cell, c_n, back = _run(c_new, prev=c0, first=1, last=1, split=split)
    c0_rows = c0.float().permute(0, 2, 3, 1).reshape(rows, CHANNELS)
    assert torch.equal(back, c0_rows)
    assert torch.equal(c_n, cell.view(BATCH, HEIGHT, WIDTH, CHANNELS).permute(0, 3, 1, 2))
    assert not state.any(), "the last step stored a state no step reads"
    _, _, c_n_mid, _ = _run(c_new, split=split)
    assert not c_n_mid.any(), "a step other than the last wrote c_n"


@triton.jit
def _toy_step_kernel(c_ptr, prev_ptr, cell_ptr, c_n_ptr, C, HW, first, last,
                     SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A cell update C_t = 0.75 C_{t−1} + 1/3 in fp32 (no bf16 arithmetic), through the state."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < HW, offs_n < C
    c_prev = load_cell_state(c_ptr, prev_ptr, b, HW, C, offs_m, mask_m, offs_n, mask_n, first,
                             SPLIT)
    store_cell_state(c_prev * 0.75 + 1.0 / 3.0, c_ptr, cell_ptr, c_n_ptr, b, HW, C, offs_m,
                     mask_m, offs_n, mask_n, last, SPLIT)


def _rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values as the saved C holds them: bf16 rounded half away from zero, else as is."""
    if dtype != torch.bfloat16:
        return values
    return (((values.view(torch.int32) + 0x8000) >> 16) << 16).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["split-bf16", "fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [None, [2, 0], [3, 1]], ids=["full", "2-0", "3-1"])
def test_cell_state_carries_c_through_a_walk(dtype, reverse, lengths):
    """CellState over a 3-step walk: c_n and every saved C_t are the fp32 recurrence's, rounded
    once; with lengths (step t of sample b counts iff t < lengths[b]) a sample keeps its C through
    the steps that do not count (length 0: c0 itself), the walk's first and last among them."""
    steps, rows, pixels = 3, BATCH * HEIGHT * WIDTH, HEIGHT * WIDTH
    generator = torch.Generator().manual_seed(2)
    c0 = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH, generator=generator).to(dtype)
    h0 = torch.zeros_like(c0)
    cell = torch.empty(steps, rows, CHANNELS, dtype=dtype)
    walk = _common.Walk(steps, reverse)
    lengths = None if lengths is None else torch.tensor(lengths)
    mask = _common.StepMask(lengths, walk, BATCH)
    state = _common.CellState(h0, c0, cell, walk, mask)
    out, carry = torch.zeros(steps, *c0.shape, dtype=dtype), h0.clone()
    hpart = torch.zeros(2, BATCH, 1, CHANNELS)
    grid = (triton.cdiv(pixels, BLOCK_M), triton.cdiv(CHANNELS, BLOCK_N), BATCH)
    for t in walk.forward():
        held = state.hold()
        c, prev, first, last = state.step(t)
        _toy_step_kernel[grid](c, prev, cell[t], state.c_n, CHANNELS, pixels, first, last,
                               SPLIT=state.split, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        if mask.active:
            state.forward_step(t, out[t], held, carry, hpart[t % 2], hpart[(t + 1) % 2])
    _, _, c_n = state.outputs(out, carry)

    expected = c0.float().permute(0, 2, 3, 1).reshape(BATCH, pixels, CHANNELS)
    counted = [steps] * BATCH if lengths is None else lengths.tolist()
    for t in walk.forward():
        for b in range(BATCH):
            if t < counted[b]:
                expected[b] = expected[b] * 0.75 + 1.0 / 3.0
            saved = cell[t].view(BATCH, pixels, CHANNELS)[b].float()
            assert torch.equal(saved, _rounded(expected[b], dtype)), (t, b)
    c_n_rows = c_n.float().permute(0, 2, 3, 1).reshape(BATCH, pixels, CHANNELS)
    assert torch.equal(c_n_rows, _rounded(expected, dtype))
