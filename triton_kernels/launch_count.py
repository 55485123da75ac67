"""Counting what a Triton op launches: its Triton kernels, and the ATen operations its host code
issues around them (convlstm_fast.ops.aten_calls: on a GPU each is at least one kernel launch).

Every op module declares ``LAUNCHES_PER_STEP = {"forward": (triton, aten), "backward":
(triton, aten)}``: what one more step of the sequence adds, read off its host loop;
:func:`launches_per_step` measures it (the op at T = 1 and T = 3, the difference halved) and
tests/triton/test_launch_counts.py holds every op to its table, under the interpreter (the host
code is the same on a GPU). Work batched over all steps (the X side before the loop, the weight
gradients after it) is a per-layer cost and not in the table.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch

from convlstm_fast.ops.aten_calls import AtenCalls

@dataclass
class Launches:
    """What ran inside one :func:`count_launches` block, by name."""

    triton: Counter = field(default_factory=Counter)
    aten: Counter = field(default_factory=Counter)
    depth: int = 0  # > 0 while a Triton kernel runs (the interpreter's own ATen calls are not ours)

    def totals(self) -> tuple[int, int]:
        return sum(self.triton.values()), sum(self.aten.values())


def _kernel_classes() -> list[type]:
    """Triton's launchable function classes: the compiled JIT function, and the interpreter's."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    return [jit.JITFunction, interpreter.InterpretedFunction]


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as launches: ...`` counts the Triton kernel launches (by kernel
    name) and the ATen operations (by name) the block issues."""
    launches = Launches()
    originals = {cls: cls.run for cls in _kernel_classes()}

    def counted(original):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(self, *args, **kwargs)
            launches.triton[self.fn.__name__] += 1
            launches.depth += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                launches.depth -= 1
        return run

    for cls, original in originals.items():
        cls.run = counted(original)
    try:
        with AtenCalls(paused=lambda: launches.depth > 0) as aten:
            launches.aten = aten.calls
            yield launches
    finally:
        for cls, original in originals.items():
            cls.run = original


def launches_per_step(op: str, make_inputs) -> dict[str, tuple[float, float]]:
    """``{"forward": (triton, aten), "backward": (...)}`` that one more step adds to ``op``'s
    implementation (``triton_kernels.<op>``), measured at T = 1 and T = 3; ``make_inputs(steps)``
    returns ``(x, h0, c0, params)``."""
    from . import OP_MODULES

    module = OP_MODULES[op]
    forward, backward = getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward")
    measured = {}
    for mode in ("forward", "backward"):
        totals = []
        for steps in (1, 3):
            x, h0, c0, params = make_inputs(steps)
            result = forward(x, h0, c0, params, 0)
            output, h_n, c_n, saved = result
            grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
            with count_launches() as launches:
                if mode == "forward":
                    forward(x, h0, c0, params, 0)
                else:
                    backward(*grads, x, h0, c0, params, output, saved, 0)
            totals.append(launches.totals())
        measured[mode] = tuple((b - a) / 2 for a, b in zip(*totals))
    return measured
