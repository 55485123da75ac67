"""Shared fixtures of the test suite (test files cannot import each other under importlib mode).

Nothing here queries a device at import time: ``gpu``-marked tests are skipped at setup, with a
reason, when CUDA is unavailable.

Fixtures:
- ``make_params(variant, in_channels, hidden_channels, kernel_size, dtype, seed)`` -> dict of a
  cell's parameters by SPEC name, in ``variants.parameter_shapes`` order (the op order).
- ``make_inputs(steps, batch, in_channels, hidden_channels, height, width, dtype, seed)`` ->
  ``(x [T, B, Cin, H, W], h0, c0 [B, C, H, W])``.
- ``assert_close_to_float64(actual, reference, reference64)``: STYLE.md's low-precision rule.

Values are drawn in float64 on the CPU from a seeded generator and then cast, so one seed gives
the same numbers (up to rounding) on every device and dtype. ``convlstm_fast`` is imported
lazily: importing it imports triton (through torch.utils.flop_counter), which tests/triton must
do itself, after setting TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math
import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def random_params(variant: str, in_channels: int, hidden_channels: int, kernel_size: int = 3,
                  dtype: torch.dtype = torch.float64, seed: int = 0, *, device="cpu",
                  scale: float = 1.0, bias_scale: float = 0.5,
                  requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Weights U(−scale/√fan_in, scale/√fan_in) (fan_in = all dims but the first), biases
    U(−bias_scale, bias_scale); leaves, in the op's parameter order."""
    from convlstm_fast import variants

    generator = torch.Generator().manual_seed(seed)
    params = {}
    shapes = variants.parameter_shapes(variant, in_channels, hidden_channels, kernel_size)
    for name, shape in shapes.items():
        if variants.is_bias(name):
            value = _uniform(shape, bias_scale, generator)
        else:
            value = _uniform(shape, scale / math.sqrt(math.prod(shape[1:])), generator)
        params[name] = value.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return params


def random_inputs(steps: int, batch: int, in_channels: int, hidden_channels: int, height: int,
                  width: int, dtype: torch.dtype = torch.float64, seed: int = 0, *, device="cpu",
                  requires_grad: bool = False):
    """``x`` U(−1, 1) ``[T, B, Cin, H, W]``; ``h0`` U(−0.5, 0.5) and ``c0`` U(−1, 1) ``[B, C, H, W]``."""
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    x = _uniform((steps, batch, in_channels, height, width), 1.0, generator)
    h0 = _uniform((batch, hidden_channels, height, width), 0.5, generator)
    c0 = _uniform((batch, hidden_channels, height, width), 1.0, generator)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, h0, c0))


@pytest.fixture
def make_params():
    """Factory ``(variant, in_channels, hidden_channels, kernel_size=3, dtype=float64, seed=0, *,
    device="cpu", scale=1.0, bias_scale=0.5, requires_grad=False) -> dict``."""
    return random_params


@pytest.fixture
def make_inputs():
    """Factory ``(steps, batch, in_channels, hidden_channels, height, width, dtype=float64, seed=0,
    *, device="cpu", requires_grad=False) -> (x, h0, c0)``."""
    return random_inputs


# ε of STYLE.md's rule per dtype.
EPSILON = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def _flatten(value) -> list:
    if isinstance(value, torch.Tensor) or value is None:
        return [value]
    return [leaf for item in value for leaf in _flatten(item)]


def check_close_to_float64(actual, reference, reference64, eps: float | None = None,
                           name: str = "output") -> None:
    """For every tensor x (nested tuples/lists are walked in step):
    ``max|x − x64| ≤ 2·max|x_ref − x64| + ε·max|x64|`` where ``x64`` is the reference in float64
    (run on the float64 copies of the same low-precision inputs) and ``x_ref`` the reference in
    x's dtype; ε from ``EPSILON`` by x's dtype unless given. ``None`` entries must match."""
    actuals, references, references64 = _flatten(actual), _flatten(reference), _flatten(reference64)
    assert len(actuals) == len(references) == len(references64), (
        f"{name}: {len(actuals)} tensors vs {len(references)} reference vs "
        f"{len(references64)} float64 reference"
    )
    for index, (x, x_ref, x64) in enumerate(zip(actuals, references, references64)):
        label = f"{name}[{index}]" if len(actuals) > 1 else name
        if x is None or x_ref is None or x64 is None:
            assert x is None and x_ref is None and x64 is None, f"{label}: None vs tensor"
            continue
        assert x.shape == x64.shape, f"{label}: shape {tuple(x.shape)} vs {tuple(x64.shape)}"
        assert x.dtype == x_ref.dtype, f"{label}: dtype {x.dtype} vs reference {x_ref.dtype}"
        x64 = x64.detach().to("cpu", torch.float64)
        tolerance_eps = EPSILON[x.dtype] if eps is None else eps
        bound = 2 * (x_ref.detach().to("cpu", torch.float64) - x64).abs().max().item() \
            if x64.numel() else 0.0
        bound += tolerance_eps * (x64.abs().max().item() if x64.numel() else 0.0)
        torch.testing.assert_close(
            x.detach().to("cpu", torch.float64), x64, rtol=0, atol=bound,
            msg=lambda default: f"{label} breaks max|x − x64| ≤ 2·max|x_ref − x64| + ε·max|x64| "
                                f"= {bound:.3e} (ε = {tolerance_eps:g}): {default}",
        )


@pytest.fixture
def assert_close_to_float64():
    """``(actual, reference, reference64, eps=None, name="output")``: STYLE.md's distance rule
    for low-precision results, on tensors or nested sequences of tensors."""
    return check_close_to_float64
