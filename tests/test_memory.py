"""What autograd keeps for backward beyond the tensors the caller holds, through ``ConvLSTM``.

Counted as the benchmark counts it (``bench.harness.saved_state_tensors``: unique storages seen
by ``saved_tensors_hooks``, less x, the parameters and the returned output), in state tensors
``[B, C, H, W]`` per step, at B=2 T=6 32 channels 12×12 with Cin = C; the zero initial state the
module makes itself is counted too. Two checks per fused backend and variant:

- batch-first keeps exactly what time-first keeps: the module hands the layer the time-first
  view of its batch-first input and the op reads it in place, so no transposed copy of x is kept
  (one was, and it cost a whole state tensor per step at Cin = C);
- the budgets of issue 13: a ≤ 2.4, b ≤ 2.4, c/d ≤ 3.4, convlstm ≤ 5.4.

The cpu backend runs here, triton and cuda on a GPU (marked ``gpu``); under Triton's interpreter
(tests/triton runs this file in its own process) the triton backend on CPU tensors.
"""

import os

import pytest
import torch

from convlstm_fast import VARIANTS, ConvLSTM
from convlstm_fast.backends import get_backend
from convlstm_fast.bench.harness import saved_state_tensors

BUDGETS = {"convlstm": 5.4, "a": 2.4, "b": 2.4, "c": 3.4, "d": 3.4}
BATCH, STEPS, CHANNELS, HEIGHT, WIDTH = 2, 6, 32, 12, 12
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ([pytest.param("triton", "cpu")] if INTERPRETED else
            [pytest.param("cpu", "cpu")] + [pytest.param(name, "cuda", marks=pytest.mark.gpu)
                                            for name in ("triton", "cuda")])


def _kept(model, x):
    return saved_state_tensors(lambda: model(x)[0], [x, *model.parameters()],
                               BATCH * CHANNELS * HEIGHT * WIDTH, STEPS)


def _skip_unsupported(backend, device, variant):
    reason = get_backend(backend).unsupported_reason(
        variant, torch.empty(1, 1, 1, 1, 1, device=device))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_batch_first_keeps_no_copy_of_x_and_meets_the_budget(backend, device, variant):
    _skip_unsupported(backend, device, variant)
    torch.manual_seed(0)
    batch_first = ConvLSTM(CHANNELS, CHANNELS, variant=variant, backend=backend).to(device)
    time_first = ConvLSTM(CHANNELS, CHANNELS, variant=variant, backend=backend,
                          batch_first=False).to(device)
    time_first.load_state_dict(batch_first.state_dict())
    x = torch.randn(BATCH, STEPS, CHANNELS, HEIGHT, WIDTH, device=device, requires_grad=True)
    x_time_first = x.detach().transpose(0, 1).contiguous().requires_grad_()
    kept = _kept(batch_first, x)
    assert kept == pytest.approx(_kept(time_first, x_time_first), abs=1e-9), \
        "batch-first keeps more than time-first: a copy of x is saved"
    assert kept <= BUDGETS[variant], f"{kept:.2f} state tensors per step kept"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_reverse_direction_keeps_what_the_forward_keeps(backend, device, variant):
    """A bidirectional layer keeps exactly twice what a forward one does, plus each direction's
    own output (the returned tensor is their concatenation, a new one): the reverse direction
    walks the steps inside the op, keeping no flipped copy of x or of its output."""
    _skip_unsupported(backend, device, variant)
    torch.manual_seed(0)
    forward = ConvLSTM(CHANNELS, CHANNELS, variant=variant, backend=backend).to(device)
    both = ConvLSTM(CHANNELS, CHANNELS, variant=variant, backend=backend,
                    bidirectional=True).to(device)
    x = torch.randn(BATCH, STEPS, CHANNELS, HEIGHT, WIDTH, device=device, requires_grad=True)
    assert _kept(both, x) == pytest.approx(2 * (_kept(forward, x) + 1), abs=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_ragged_batch_keeps_what_a_full_one_keeps(backend, device, variant):
    """A backend that masks ``lengths`` inside its op keeps exactly what it keeps for the full
    batch: the mask is applied in the loop, no per-step outputs or masked copies are saved."""
    _skip_unsupported(backend, device, variant)
    if not get_backend(backend).lengths_in_op:
        pytest.skip(f"backend {backend!r} drives ragged steps one call at a time")
    torch.manual_seed(0)
    model = ConvLSTM(CHANNELS, CHANNELS, variant=variant, backend=backend).to(device)
    x = torch.randn(BATCH, STEPS, CHANNELS, HEIGHT, WIDTH, device=device, requires_grad=True)
    lengths = torch.tensor([STEPS, STEPS // 2], device=device)
    ragged = saved_state_tensors(lambda: model(x, lengths=lengths)[0], [x, *model.parameters()],
                                 BATCH * CHANNELS * HEIGHT * WIDTH, STEPS)
    assert ragged == pytest.approx(_kept(model, x), abs=1e-9)
