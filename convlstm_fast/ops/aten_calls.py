"""Counting the ATen operations a piece of host code issues — on a GPU each is at least one
kernel launch. Views and allocations are not launches and are not counted; ``out=`` and
in-place operations are. Used to hold the layer ops' drivers to the launches per step they
declare (triton_kernels/launch_count.py, csrc/cuda/emulation_check.py)."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Not a launch: allocations and autograd bookkeeping (views are recognised by their schema).
FREE = {"empty", "empty_like", "new_empty", "empty_strided", "detach", "lift_fresh"}


def is_launch(func) -> bool:
    """Whether the ATen operation ``func`` runs a kernel (it is not a view or an allocation)."""
    view = any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns)
    return not view and func.overloadpacket.__name__ not in FREE


class AtenCalls(TorchDispatchMode):
    """``with AtenCalls() as calls: ...``; ``calls.calls`` counts the operations by name.

    ``paused``: while it returns True nothing is counted (e.g. inside Triton's interpreter).
    ``into_own_ops``: count inside the ``convlstm_fast::`` ops too — the mode is off while it
    handles a call, so it runs such an op's CPU kernel itself (a redispatch) with the mode back
    on, and counts what that kernel issues instead of the op."""

    def __init__(self, paused: Callable[[], bool] | None = None, into_own_ops: bool = False):
        super().__init__()
        self.calls = Counter()
        self.paused = paused
        self.into_own_ops = into_own_ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.into_own_ops and func.namespace == "convlstm_fast":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                                       *args, **kwargs)
        if is_launch(func) and not (self.paused and self.paused()):
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)
