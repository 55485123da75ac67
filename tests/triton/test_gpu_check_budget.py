"""How many Triton specialisations the GPU check's default run compiles — bounded without a GPU.

Each distinct (kernel, constexpr values, launch options, pointer dtypes and 16-byte alignment,
integer arguments' class: multiple of 16 or not, equal to 1 or not, unless the kernel's
``do_not_specialize`` names them) is one compile on the GPU, of
a second or more each, inside a 15-minute lease. The Triton launches of the default run's Triton
work — tests/test_backends.py's default cases, the bench's a and convlstm at the paper's layer,
the sanitizer's quick cases — are replayed here with the GPU's block sizes and recorded without
running the kernels (the launchers' control flow does not depend on the data, so the launch
sequence is the real one and the replay takes seconds); the bf16 cases replay in fp32 (the
interpreter's only dtype), which maps one to one onto their bf16 keys.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

from convlstm_fast import VARIANTS, get_cell
from convlstm_fast.functional import convlstm_layer
from convlstm_fast.triton_kernels import _common
from triton.runtime.interpreter import InterpretedFunction

TESTS = pathlib.Path(__file__).resolve().parents[1]
MAX_SPECIALISATIONS = 60
PAPER_LAYER = (2, 1, 256, 256, 28, 28, 3)  # T, B, Cin, C, H, W, K: B and T are not arguments


def _backend_cases():
    spec = importlib.util.spec_from_file_location("test_backends_cases", TESTS / "test_backends.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _key(kernel, args, kwargs):
    constexprs = {name for name, kind in kernel.fn.__annotations__.items()
                  if "constexpr" in str(kind)}
    unspecialised = set(kernel.kwargs.get("do_not_specialize") or ())
    parts = [kernel.__name__]
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            parts.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or name in constexprs:
            parts.append((name, value))
        elif name in unspecialised:
            parts.append((name, type(value).__name__))
        elif isinstance(value, int):
            parts.append((name, value % 16 == 0, value == 1))
        else:
            parts.append((name, type(value).__name__))
    return tuple(parts) + tuple(sorted(kwargs.items()))


@pytest.fixture
def recorded(monkeypatch):
    """The set of launch keys, filled while the fixture is active, with the launchers picking
    the GPU's block sizes; kernels are recorded, not run."""
    keys: set = set()

    def run(self, *args, grid, warmup, **kwargs):
        keys.add(_key(self, args, kwargs))

    monkeypatch.setattr(InterpretedFunction, "run", run)
    gpu_blocks = lambda device, pixels, channels: (_common.GPU_BLOCK_M,  # noqa: E731
                                                   _common.GPU_BLOCK_CS[0])
    for name, module in list(sys.modules.items()):
        if name.startswith("convlstm_fast.triton_kernels") and hasattr(module, "block_sizes"):
            monkeypatch.setattr(module, "block_sizes", gpu_blocks)
    return keys


def _run(variant, shape, gate_activation, as_laid_out=lambda x: x, reverse=False):
    steps, batch, cin, hidden, height, width, _ = shape
    generator = torch.Generator().manual_seed(0)
    params = {n: (torch.randn(s, generator=generator) * 0.1).requires_grad_()
              for n, s in get_cell(variant).parameter_shapes(cin, hidden, shape[-1]).items()}
    x = torch.randn(steps, batch, cin, height, width, generator=generator, requires_grad=True)
    out, (h_n, c_n) = convlstm_layer(as_laid_out(x), params, variant, gate_activation=gate_activation,
                                     backend="triton", reverse=reverse)
    (out.sum() + h_n.sum() + c_n.sum()).backward()


def test_default_gpu_check_compiles_at_most_60_specialisations(recorded):
    cases = _backend_cases()
    keys = {}  # the case's dtype -> its launch keys (recorded in fp32: one set per real dtype)
    for case in cases.CASES:
        if case.extended:
            continue
        recorded.clear()
        for variant in VARIANTS:
            _run(variant, cases._shape(variant, case), case.gate_activation,
                 lambda x: cases.layout_view(x, case.layout), case.reverse)
        if case.dtype == torch.bfloat16:
            for variant in ("a", "convlstm"):  # the bench
                _run(variant, PAPER_LAYER, "sigmoid")
            for variant in ("c", "d"):  # the sanitizer's quick cases: bf16 on "small"
                _run(variant, cases.SHAPES["small"], "sigmoid")
        keys.setdefault(str(case.dtype).replace("torch.", ""), set()).update(recorded)
    per_dtype = {dtype: len(launches) for dtype, launches in keys.items()}
    total = sum(per_dtype.values())
    print(f"Triton specialisations of the GPU check's default run: {per_dtype}, total {total}")
    assert total <= MAX_SPECIALISATIONS, per_dtype
