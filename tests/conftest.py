"""Shared fixtures of the test suite (test files cannot import each other under importlib mode).

Nothing here queries a device at import time: ``gpu``-marked tests are skipped at setup, with a
reason, when CUDA is unavailable.

Fixtures:
- ``make_params(variant, in_channels, hidden_channels, kernel_size, dtype, seed)`` -> dict of a
  cell's parameters by SPEC name, in the order of its registry entry (the op order).
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
import os

import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


def pytest_collection_finish(session):
    """GPU tests never run interpreted: triton reads TRITON_INTERPRET when each kernel is
    decorated, so in a session where it is set (e.g. tests/triton's conftest was collected
    beside them) the "GPU" Triton tests would test the interpreter on host copies and pass."""
    gpu_items = [item for item in session.items if item.get_closest_marker("gpu") is not None]
    if gpu_items and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise pytest.UsageError(
            f"{len(gpu_items)} GPU-marked tests collected with TRITON_INTERPRET=1 (e.g. "
            f"{gpu_items[0].nodeid}): they would run Triton's interpreter, not GPU code. Run "
            "tests/triton in its own pytest process and the GPU tests without TRITON_INTERPRET.")


# Under pytest-xdist (the GPU check runs its tests in several processes) each worker compiles its
# own specialisations: the workers hand their counts to the controller when they finish.
_WORKER_COUNTS: list[dict[str, int]] = []


def _triton_counts() -> dict[str, int]:
    import sys

    if "convlstm_fast.triton_kernels" not in sys.modules:
        return {}
    from convlstm_fast.info import triton_specializations

    return triton_specializations()


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker
        session.config.workeroutput["triton_specializations"] = _triton_counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _WORKER_COUNTS.append(getattr(node, "workeroutput", {}).get("triton_specializations", {}))


def pytest_terminal_summary(terminalreporter):
    """How many Triton specialisations this session compiled (the GPU check bounds them); with
    xdist workers, summed over them (one compiled in two workers counts twice)."""
    per_process = [_triton_counts(), *_WORKER_COUNTS]
    total = sum(sum(counts.values()) for counts in per_process)
    kernels = {name for counts in per_process for name, n in counts.items() if n}
    if total:
        where = f" over {len(_WORKER_COUNTS)} workers" if _WORKER_COUNTS else ""
        terminalreporter.write_line(f"triton specialisations compiled: {total} "
                                    f"in {len(kernels)} kernels{where}")


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def random_params(variant: str, in_channels: int, hidden_channels: int, kernel_size: int = 3,
                  dtype: torch.dtype = torch.float64, seed: int = 0, *, device="cpu",
                  scale: float = 1.0, bias_scale: float = 0.5,
                  requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Weights U(−scale/√fan_in, scale/√fan_in) (fan_in = all dims but the first), biases
    U(−bias_scale, bias_scale); leaves, in the op's parameter order."""
    from convlstm_fast import get_cell

    generator = torch.Generator().manual_seed(seed)
    params = {}
    biases = {p.name for p in get_cell(variant).parameters if p.is_bias}
    shapes = get_cell(variant).parameter_shapes(in_channels, hidden_channels, kernel_size)
    for name, shape in shapes.items():
        if name in biases:
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


@pytest.fixture
def fp32_ieee():
    """fp32 products and convolutions in IEEE fp32 on CUDA (TF32 off) for the test, then back."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


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


# Smallest gap between the largest and the second-largest attention logit of every c/d map that
# the rounding of a dtype cannot flip (see find_separated_problem).
ATTENTION_MIN_GAP = {torch.float64: 0.0, torch.float32: 1e-5, torch.float16: 0.03,
                     torch.bfloat16: 0.03}


def separated_problem(variant: str, shape, dtype: torch.dtype, gate_activation: str,
                      max_seeds: int = 200, *, reverse: bool = False, lengths=None):
    """``(x, h0, c0, params, weights)``, float64 on the CPU, with values already rounded to
    ``dtype`` (so x64 and x_ref of the distance rule see the kernels' numbers) and ``weights``
    the output gradients' ``[out, h_n, c_n]``; ``shape`` is ``(T, B, Cin, C, H, W, K)``.

    For c/d the seed is chosen so that in every map (t, b, c) the maximum of the attention
    logits Z exceeds the runner-up by ``ATTENTION_MIN_GAP[dtype]`` in the float64 reference:
    the gradient of exp(Z − max Z) jumps where the argmax changes, so a near-tie that rounding
    flips would move a whole map's Σ dA∘A to another pixel — in the kernel or in x_ref, by chance.
    The maps are those of the walk the case takes (``reverse``, ``lengths``: a reverse walk goes
    through other states, so a seed separated walking forwards need not be separated there).
    """
    from convlstm_fast.reference import cells

    steps, batch, cin, hidden, height, width, kernel_size = shape
    # Weights twice the default spread Z over a range wide enough that seeds with every map's
    # maximum 0.03 clear of the runner-up exist (at the default scale none of 200 seeds does).
    separated = variant in ("c", "d") and ATTENTION_MIN_GAP[dtype] >= 0.01
    for seed in range(max_seeds):
        params = random_params(variant, cin, hidden, kernel_size, seed=seed,
                               scale=2.0 if separated else 1.0)
        x, h0, c0 = random_inputs(steps, batch, cin, hidden, height, width, seed=seed)
        x, h0, c0 = (t.to(dtype).double() for t in (x, h0, c0))
        params = {name: p.to(dtype).double() for name, p in params.items()}
        generator = torch.Generator().manual_seed(seed + 17)
        weights = [torch.randn(size, generator=generator, dtype=torch.float64)
                   for size in ((steps, *h0.shape), h0.shape, c0.shape)]
        if variant not in ("c", "d") or ATTENTION_MIN_GAP[dtype] == 0:
            return x, h0, c0, params, weights
        records = []
        cells.layer(variant, x, h0, c0, params, gate_activation, records=records, reverse=reverse,
                    lengths=None if lengths is None else torch.tensor(lengths))
        attention = torch.stack([r["attention"] for r in records]).flatten(-2)  # exp(Z − max)
        gap = -attention.topk(2, dim=-1).values[..., 1].log()  # [steps walked, B, C]
        if lengths is not None:  # only the maps of steps that count matter
            times = torch.arange(steps - 1, -1, -1) if reverse else torch.arange(steps)
            counts = times[:, None] < torch.tensor(lengths)[None, :]
            gap = gap[counts]
        if gap.numel() == 0 or gap.min().item() >= ATTENTION_MIN_GAP[dtype]:
            return x, h0, c0, params, weights
    raise AssertionError(f"no seed < {max_seeds} separates the maxima of Z by "
                         f"{ATTENTION_MIN_GAP[dtype]} for {variant} {shape}")


@pytest.fixture
def find_separated_problem():
    """``(variant, shape, dtype, gate_activation, *, reverse, lengths) -> (x, h0, c0, params,
    weights)``, see :func:`separated_problem`."""
    return separated_problem
