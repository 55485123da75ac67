"""The ``"triton"`` backend: fused Triton kernels (``convlstm_fast.triton_kernels``).

The ops ``convlstm_fast::<name>_triton`` are declared and implemented from Python when
``convlstm_fast.triton_kernels`` is imported; autograd and fake tensors go through the same
:func:`convlstm_fast.ops.registration.register_layer_op` as the native ops.
"""

from __future__ import annotations

import importlib

import torch

from . import OpBackend


class TritonBackend(OpBackend):
    def load(self) -> None:
        try:
            importlib.import_module("triton")
        except ImportError as error:
            raise ImportError(f"triton is not installed ({error}); pip install triton") from error
        importlib.import_module("convlstm_fast.triton_kernels")


BACKENDS = {
    "triton": TritonBackend("triton", "_triton", "CUDA", "cuda",
                            (torch.float32, torch.float16, torch.bfloat16)),
}
