"""Launches per step of every Triton op, against the table its module declares
(``LAUNCHES_PER_STEP``: Triton kernels and ATen calls that one more step adds, forward and
backward), counted by convlstm_fast.triton_kernels.launch_count under the interpreter — the host
loops are the GPU's own. A change that adds a launch to a step fails here until its table says
so (sigmoid gates: hard_sigmoid's derivative is other ATen calls)."""

from collections import Counter

import pytest
import torch

from convlstm_fast import get_cell
from convlstm_fast.bench import cases, roofline
from convlstm_fast.triton_kernels import OP_MODULES, launch_count


def _inputs(variant):
    spec = get_cell(variant)

    def make(steps):
        generator = torch.Generator().manual_seed(steps)
        params = [torch.randn(p.shape(3, 4, 3), generator=generator) * 0.3
                  for p in spec.parameters]
        x = torch.randn(steps, 2, 3, 5, 6, generator=generator)
        h0, c0 = (torch.randn(2, 4, 5, 6, generator=generator) for _ in range(2))
        return x, h0, c0, params

    return make


VARIANTS = {get_cell(name).op: name for name in ("convlstm", "a", "b", "c", "d")}


@pytest.mark.parametrize("op", sorted(OP_MODULES))
def test_launches_per_step_match_the_table(op):
    measured = launch_count.launches_per_step(op, _inputs(VARIANTS[op]))
    declared = {mode: tuple(map(float, counts))
                for mode, counts in OP_MODULES[op].LAUNCHES_PER_STEP.items()}
    assert measured == declared


@pytest.mark.parametrize("op", sorted(OP_MODULES))
def test_a_batch_first_input_costs_the_forward_no_copy(op):
    """The time-first view of a batch-first x (what ConvLSTM passes) runs exactly the launches of
    a contiguous time-first x: the X side convolves x's frames in place and the reordering is
    folded into the channels-last copy the forward makes anyway (a copy of x would show here as
    one more ATen call)."""
    x, h0, c0, params = _inputs(VARIANTS[op])(3)
    forward = getattr(OP_MODULES[op], f"{op}_forward")
    batch_first_view = x.transpose(0, 1).contiguous().transpose(0, 1)
    counted, outputs = [], []
    for x_in in (x, batch_first_view):
        with launch_count.count_launches() as launches:
            outputs.append(forward(x_in, h0, c0, params, 0)[0])
        counted.append((dict(launches.triton), dict(launches.aten)))
    assert counted[1] == counted[0]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


@pytest.mark.parametrize("op", sorted(OP_MODULES))
def test_reverse_issues_the_launches_of_the_forward_direction(op):
    """``reverse`` walks the steps in the op's own loops: its forward and backward issue exactly
    the launches of the forward direction's, kernel by kernel and ATen call by ATen call (a
    flipped copy of x, the output or a gradient would show as more ATen calls)."""
    x, h0, c0, params = _inputs(VARIANTS[op])(3)
    module = OP_MODULES[op]
    forward, backward = getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward")
    counted = {}
    for reverse in (False, True):
        with launch_count.count_launches() as forward_launches:
            output, h_n, c_n, saved = forward(x, h0, c0, params, 0, reverse)
        grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
        with launch_count.count_launches() as backward_launches:
            backward(*grads, x, h0, c0, params, output, saved, 0, reverse)
        counted[reverse] = {mode: (dict(launches.triton), dict(launches.aten))
                            for mode, launches in (("forward", forward_launches),
                                                   ("backward", backward_launches))}
    assert counted[True] == counted[False]


@pytest.mark.parametrize("op", sorted(OP_MODULES))
def test_the_roofline_model_has_every_forward_launch(op):
    """The op module's traffic() (bench --roofline's model) has a record for every launch the
    forward issues, the batched ones before the loop included: by the kernel or ATen operation
    its name starts with, at T = 2 (the walk's first and last steps are records of their own).
    ``_unsafe_view`` is a view that ATen's schema does not mark as one (no kernel)."""
    module = OP_MODULES[op]
    x, h0, c0, params = _inputs(VARIANTS[op])(2)
    with launch_count.count_launches() as launches:
        getattr(module, f"{op}_forward")(x, h0, c0, params, 0)
    counted = launches.triton + launches.aten
    counted.pop("_unsafe_view", None)
    steps, batch, cin, height, width = x.shape
    shape = cases.CellShape(batch, steps, cin, h0.shape[1], height, width, 3)  # _inputs' K
    modelled = Counter()
    for record in module.traffic(shape, 4):
        if record.phase == roofline.FORWARD:
            modelled[record.name.split(" ")[0]] += record.count
    assert counted == modelled


def test_counter_sees_a_launch_and_an_aten_call():
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(dst + offs, tl.load(src + offs))

    src, dst = torch.arange(8.0), torch.empty(8)
    with launch_count.count_launches() as launches:
        _copy[(1,)](src, dst, N=8)
        torch.mm(src[None], dst[:, None], out=torch.empty(1, 1))
        src.view(2, 4)  # a view: not a launch
    assert torch.equal(dst, src)
    assert launches.triton == {"_copy": 1} and launches.aten == {"mm": 1}
