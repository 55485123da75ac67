"""The native backends ``"cpu"`` and ``"cuda"``: fused C++ / CUDA kernels in ``convlstm_fast._C``.

The schemas are declared in csrc/convlstm_fast.cpp; the kernels register themselves with
TORCH_LIBRARY_IMPL; autograd, fake tensors and flop formulas are wired once, for every cell the
registry gives a native kernel, by :func:`convlstm_fast.ops.registration.register_all`.
"""

from __future__ import annotations

import torch

from .._extension import load_extension
from ..ops.registration import register_all
from . import OpBackend


class NativeBackend(OpBackend):
    def load(self) -> None:
        load_extension()
        register_all("native")


BACKENDS = {
    "cpu": NativeBackend("cpu", "", "CPU", "cpu", (torch.float32, torch.float64),
                         lengths_in_op=True),
    "cuda": NativeBackend("cuda", "", "CUDA", "cuda",
                          (torch.float32, torch.float16, torch.bfloat16), lengths_in_op=True),
}
