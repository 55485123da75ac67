"""PTX of small probe kernels built from _common's helpers, compiled ahead of time for sm_90
without a GPU (run as a script, with TRITON_INTERPRET unset: the interpreter cannot compile).

    python ptx_probe.py NAME      prints the PTX of probe NAME (see PROBES)

Used by test_triton_numerics.py to check what the interpreter cannot show: how a compiler that
contracts FMAs and reduces with NaN-dropping max lowers these helpers.
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from convlstm_fast.triton_kernels._common import gate_act, gate_act_grad, nan_max, nan_maximum


@triton.jit
def _hard_sigmoid_probe(x_ptr, y_ptr, d_ptr, BLOCK: tl.constexpr):
    """y = hard_sigmoid(x), d = hard_sigmoid'(x)."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, gate_act(x, 1))
    tl.store(d_ptr + offs, gate_act_grad(x, 1))


@triton.jit
def _nan_max_probe(x_ptr, m_ptr, BLOCK: tl.constexpr):
    """m = max(max_i x[i], x[0]) through nan_max and nan_maximum."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(m_ptr, nan_maximum(nan_max(x, 0), tl.load(x_ptr)))


PROBES = {
    "hard_sigmoid": (_hard_sigmoid_probe, {"x_ptr": "*fp32", "y_ptr": "*fp32", "d_ptr": "*fp32"}),
    "nan_max": (_nan_max_probe, {"x_ptr": "*fp32", "m_ptr": "*fp32"}),
}


def ptx(name: str, arch: int = 90) -> str:
    kernel, pointers = PROBES[name]
    signature = {**pointers, "BLOCK": "constexpr"}
    compiled = triton.compile(ASTSource(kernel, signature, {"BLOCK": 128}),
                              target=GPUTarget("cuda", arch, 32))
    return compiled.asm["ptx"]


if __name__ == "__main__":
    print(ptx(sys.argv[1]))
