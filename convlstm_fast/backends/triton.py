"""The ``"triton"`` backend: fused Triton kernels (``convlstm_fast.triton_kernels``).

The ops ``convlstm_fast::<name>_triton`` are declared and implemented from Python when
``convlstm_fast.triton_kernels`` is imported; autograd and fake tensors go through the same
:func:`convlstm_fast.ops.registration.register_layer_op` as the native ops. The backend runs CUDA
tensors; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton
is imported — tests). ``"auto"`` never picks it for CPU tensors (``AUTO_PREFERENCE``).
"""

from __future__ import annotations

import importlib

import torch

from ..registry import get_cell
from . import OpBackend


# The oldest triton the kernels are written and tested for (pyproject.toml's "triton" extra).
MIN_TRITON = (3, 6)


def _release(version: str) -> tuple[int, ...]:
    """``"3.6.0"`` / ``"3.9.0+git1234"`` -> ``(3, 6, 0)``."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


class TritonBackend(OpBackend):
    def load(self) -> None:
        try:
            triton = importlib.import_module("triton")
        except ImportError as error:
            raise ImportError(f"triton is not installed ({error}); pip install triton") from error
        if _release(triton.__version__) < MIN_TRITON:
            raise ImportError(
                f"triton {triton.__version__} is older than the Triton kernels need "
                f"(>= {'.'.join(map(str, MIN_TRITON))}); pip install 'triton>="
                f"{'.'.join(map(str, MIN_TRITON))}'")
        importlib.import_module("convlstm_fast.triton_kernels")

    def unsupported_reason(self, variant, x):
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        kernels = importlib.import_module("convlstm_fast.triton_kernels")
        if "triton" not in get_cell(variant).kernels:
            return f"variant {variant!r} has no triton kernel"
        if x.device.type == "cpu" and kernels.INTERPRETED:
            if x.dtype != torch.float32:
                return ("backend 'triton' runs CPU tensors (interpreter) in float32 only, "
                        f"got {x.dtype}")
            return None
        if x.device.type == "cpu":
            return ("backend 'triton' runs CPU tensors only under Triton's interpreter "
                    "(TRITON_INTERPRET=1 set before triton is imported)")
        return super().unsupported_reason(variant, x)


BACKENDS = {
    "triton": TritonBackend("triton", "_triton", "CUDA", "cuda",
                            (torch.float32, torch.float16, torch.bfloat16), lengths_in_op=True),
}
