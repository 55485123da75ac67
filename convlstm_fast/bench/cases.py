"""What the benchmarks measure: shapes, the layer runners of every backend, Table 1, the saved
bytes per step and the full network's cost. Shared by ``python -m convlstm_fast.bench`` and the
pytest-benchmark files under ``benchmarks/``.

A runner is ``fn(x [T, B, Cin, H, W], params) -> output [T, B, C, H, W]``. The registered
backends (``convlstm_fast.backends.BACKENDS``, however many there are) run through
:func:`convlstm_fast.convlstm_layer`; ``"compile"`` is ``torch.compile`` of the reference step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..registry import cell_names, get_cell
from ..backends import BACKENDS, get_backend
from ..counting import count_mult_adds, count_parameters, paper_mult_adds
from ..functional import convlstm_layer
from ..graphs import CUDAGraphed
from ..modules import ConvLSTMCell
from ..reference import cells
from .harness import saved_state_tensors

COMPILE = "compile"
# "<backend>+<option>": the backend run with one of convlstm_layer's sequence options —
# "+recompute" with recompute=... (the --recompute mode, forward+backward only); "+reverse" with
# reverse=True (a bidirectional layer's second direction), "+ragged" with lengths drawn
# uniformly in [T/2, T] and "+stepwise" one layer call per step, the state handed on (a cell
# driven a step at a time, as ConvLSTMCell is by autoregressive models) (the --sequence-options
# mode); "+graphs" (named in --backends, CUDA only) the layer call captured once as CUDA
# graphs and replayed (convlstm_fast.graphs).
RECOMPUTE = "+recompute"
SEQUENCE_OPTIONS = ("+reverse", "+ragged", "+stepwise")
GRAPHS = "+graphs"
OPTIONS = (RECOMPUTE, *SEQUENCE_OPTIONS, GRAPHS)


def split_option(backend: str) -> tuple[str, str]:
    """``"cpu+ragged"`` -> ``("cpu", "+ragged")``; ``"cpu"`` -> ``("cpu", "")``."""
    for option in OPTIONS:
        if backend.endswith(option):
            return backend.removesuffix(option), option
    return backend, ""


def ragged_lengths(shape: "CellShape", seed: int = 0) -> torch.Tensor:
    """The "+ragged" lengths: ``[B]`` drawn uniformly from [ceil(T/2), T], fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint((shape.steps + 1) // 2, shape.steps + 1, (shape.batch,),
                         generator=generator)


@dataclass(frozen=True)
class CellShape:
    """One layer call: ``x [steps, batch, in_channels, height, width]``, K × K kernels."""

    batch: int
    steps: int
    in_channels: int
    hidden_channels: int
    height: int
    width: int
    kernel_size: int = 3
    label: str = ""

    @property
    def state_numel(self) -> int:
        return self.batch * self.hidden_channels * self.height * self.width

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"B={self.batch} T={self.steps} Cin={self.in_channels} C={self.hidden_channels} "
                f"{self.height}x{self.width} K={self.kernel_size}")


# Sized for this 2-core CPU: the whole default run stays under ~5 minutes.
DEFAULT_SHAPES = (CellShape(2, 8, 64, 64, 28, 28, label="default"),)
QUICK_SHAPES = (CellShape(1, 2, 8, 8, 8, 8, label="quick"),)
# SPEC "The full network": the ConvLSTM layers see 256 channels at 28×28, T = 16 at B = 8 for
# IsoGD (32-frame clips) and T = 8 at B = 16 for Jester (16-frame clips).
PAPER_SHAPES = (CellShape(8, 16, 256, 256, 28, 28, label="IsoGD"),
                CellShape(16, 8, 256, 256, 28, 28, label="Jester"))


def sweep_shapes(base: CellShape, spatial_sizes, channel_counts) -> list[CellShape]:
    """Latency against spatial size (channels of ``base``) and against channels (size of ``base``)."""
    shapes = [CellShape(base.batch, base.steps, base.in_channels, base.hidden_channels, s, s,
                        base.kernel_size, "spatial") for s in spatial_sizes]
    shapes += [CellShape(base.batch, base.steps, c, c, base.height, base.width, base.kernel_size,
                         "channels") for c in channel_counts]
    return shapes


def backend_names(requested=None, include_compile: bool = True) -> list[str]:
    """The backends to try: ``requested``, or every registered backend plus ``"compile"``."""
    if requested:
        unknown = [b for b in requested if split_option(b)[0] not in BACKENDS and b != COMPILE]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; choose from {BACKENDS + (COMPILE,)}")
        return list(requested)
    return list(BACKENDS) + ([COMPILE] if include_compile else [])


def unsupported_reason(backend: str, variant: str, x: torch.Tensor) -> str | None:
    """``None`` when ``backend`` can run ``variant`` on inputs like ``x``, else why not."""
    backend, option = split_option(backend)
    if option == GRAPHS and x.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if backend == COMPILE:
        if x.device.type == "cuda":
            try:
                import triton  # noqa: F401  (Inductor needs it for GPU code)
            except ImportError:
                return "torch.compile on CUDA needs triton"
        return None
    return get_backend(backend).unsupported_reason(variant, x)


def make_inputs(variant: str, shape: CellShape, device, dtype, seed: int = 0):
    """``x [T, B, Cin, H, W]`` and the parameter list of a freshly initialised cell."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cell = ConvLSTMCell(shape.in_channels, shape.hidden_channels, shape.kernel_size, variant,
                        backend="reference")
    x = torch.randn(shape.steps, shape.batch, shape.in_channels, shape.height, shape.width,
                    generator=generator)
    x = x.to(device=device, dtype=dtype)
    params = [p.detach().to(device=device, dtype=dtype) for p in cell.parameter_list()]
    return x, params


class _LayerCall(torch.nn.Module):
    """One layer call as a module of (x, *params), for CUDAGraphed ("+graphs")."""

    def __init__(self, variant: str, backend: str, gate_activation: str):
        super().__init__()
        self.variant, self.backend, self.gate_activation = variant, backend, gate_activation

    def forward(self, x, *params):
        return convlstm_layer(x, list(params), self.variant, gate_activation=self.gate_activation,
                              backend=self.backend)[0]


def layer_runner(backend: str, variant: str, shape: CellShape, gate_activation: str = "sigmoid",
                 recompute: str | int | None = None):
    """``fn(x, params) -> output`` running one layer on ``backend`` (or ``"compile"``); a
    ``"<backend>+<option>"`` name runs that backend with the option (:data:`OPTIONS`;
    ``recompute`` defaults to "steps")."""
    if backend != COMPILE:
        base, option = split_option(backend)
        options = {RECOMPUTE: dict(recompute=recompute or "steps"),
                   "+reverse": dict(reverse=True),
                   "+ragged": dict(lengths=ragged_lengths(shape))}.get(option, {})

        def run(x, params):
            return convlstm_layer(x, params, variant, gate_activation=gate_activation,
                                  backend=base, **options)[0]

        if option == GRAPHS:
            graphed = CUDAGraphed(_LayerCall(variant, base, gate_activation))
            return lambda x, params: graphed(x, *params)

        def run_stepwise(x, params):
            outputs, state = [], None
            for t in range(x.shape[0]):
                output, state = convlstm_layer(x[t:t + 1], params, variant, state,
                                               gate_activation=gate_activation, backend=base)
                outputs.append(output)
            return torch.cat(outputs)
        return run_stepwise if option == "+stepwise" else run
    # torch.compile of the reference step; the time loop stays in Python (as a user would
    # write it), so one compiled graph serves every step.
    step = torch.compile(get_cell(variant).step, dynamic=False)
    names = get_cell(variant).parameter_names

    def run_compiled(x, params):
        named = dict(zip(names, params))
        h = x.new_zeros(shape.batch, shape.hidden_channels, shape.height, shape.width)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(x.shape[0]):
            h, c = step(x[t], h, c, named, gate_activation, None)
            outputs.append(h)
        return torch.stack(outputs)

    return run_compiled


def forward_fn(run, x, params):
    """Inference forward: no autograd."""
    def fn():
        with torch.no_grad():
            return run(x, params)
    return fn


def forward_backward_fn(run, x, params, seed: int = 1):
    """Forward with autograd, then the gradients of x and every parameter for a fixed random
    output gradient (``torch.autograd.grad``: nothing accumulates between calls)."""
    inputs = [x.detach().requires_grad_()] + [p.detach().requires_grad_() for p in params]
    with torch.no_grad():
        shape = run(x, params).shape
    generator = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(shape, generator=generator).to(device=x.device, dtype=x.dtype)

    def fn():
        output = run(inputs[0], inputs[1:])
        return torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
    return fn


def saved_per_step(backend: str, variant: str, shape: CellShape, device, dtype,
                   recompute: str | int | None = None) -> float:
    """State tensors saved for backward per step (KERNELS.md "How saved for backward is counted")
    beyond what the caller holds. The caller's x is batch-first, as ConvLSTM's default, and the
    layer gets its time-first view, as ConvLSTM passes it: a runner that copied x to change its
    layout, and kept the copy, shows it here."""
    x, params = make_inputs(variant, shape, device, dtype)
    caller_x = x.transpose(0, 1).contiguous().requires_grad_()
    params = [p.requires_grad_() for p in params]
    run = layer_runner(backend, variant, shape, recompute=recompute)
    return saved_state_tensors(lambda: run(caller_x.transpose(0, 1), params),
                               [caller_x] + params, shape.state_numel, shape.steps)


def layer_flops(variant: str, shape: CellShape, mode: str) -> int:
    """FLOPs of one layer call: 2 × the true MACs of every step (Table 1's last column, as
    FlopCounterMode counts them); forward+backward counts the backward as twice the forward."""
    macs = shape.steps * shape.batch * get_cell(variant).mult_adds(
        shape.in_channels, shape.hidden_channels, shape.kernel_size, shape.height, shape.width)
    return 2 * macs * (3 if mode == "forward+backward" else 1)


def compulsory_bytes(variant: str, shape: CellShape, dtype: torch.dtype, mode: str) -> int:
    """The bytes any implementation must move through device memory for one layer call:
    forward — X, h0, c0 and the parameters read once, the output, h_n and c_n written once;
    forward+backward — that, plus grad_output read, X and the output read once more (the weight
    gradients need X, the recurrent ones H_{t−1}), grad_x and the parameter gradients written.
    Nothing saved for backward is counted (a recomputing design needs none), so this is a floor,
    not a model of our kernels: KERNELS.md's design floor for (a) is higher (≈ 410 MB forward
    at the paper's layer, with the input-side term written and read once)."""
    element = torch.empty((), dtype=dtype).element_size()
    sequence_in = shape.steps * shape.batch * shape.in_channels * shape.height * shape.width
    sequence_out = shape.steps * shape.state_numel
    params = sum(math.prod(s) for s in get_cell(variant).parameter_shapes(
        shape.in_channels, shape.hidden_channels, shape.kernel_size).values())
    forward = sequence_in + sequence_out + 4 * shape.state_numel + params
    if mode != "forward+backward":
        return forward * element
    backward = 2 * sequence_out + 2 * sequence_in + params
    return (forward + backward) * element


def floor_ms(variant: str, shape: CellShape, dtype: torch.dtype, mode: str,
             ceilings: dict | None) -> tuple[float, str] | None:
    """The larger of compulsory bytes / memory bandwidth and FLOPs / matmul rate (the device's
    measured ceilings, :func:`convlstm_fast.bench.harness.device_ceilings`): ``(ms, "memory" or
    "compute")``, or None without ceilings."""
    if not ceilings:
        return None
    memory = compulsory_bytes(variant, shape, dtype, mode) / (ceilings["copy_GBps"] * 1e9) * 1e3
    compute = layer_flops(variant, shape, mode) / (ceilings["matmul_TFLOPs"] * 1e12) * 1e3
    return (memory, "memory") if memory >= compute else (compute, "compute")


def table1(in_channels: int = 256, hidden_channels: int = 256, kernel_size: int = 3,
           size: int = 28) -> list[dict]:
    """The paper's Table 1: per registered cell, the exact weight count, the paper's Mult-Adds
    convention (:func:`convlstm_fast.paper_mult_adds`: weights × H·W) and the true MACs of one
    step and one sample (:func:`convlstm_fast.count_mult_adds`, run on fake tensors: no memory,
    no compute), beside the paper's printed numbers for its five cells."""
    rows = []
    fake_mode = FakeTensorMode()
    for variant in cell_names():
        with fake_mode:
            cell = ConvLSTMCell(in_channels, hidden_channels, kernel_size, variant,
                                backend="reference")
            x = torch.empty(1, in_channels, size, size)
            true = count_mult_adds(cell, x)
        weights = count_parameters(cell, include_bias=False)
        paper = paper_mult_adds(cell, size, size)
        printed_params, printed_mult_adds = get_cell(variant).paper_table1 or (None, None)
        rows.append({
            "variant": variant,
            "weights": weights,
            "parameters_with_bias": count_parameters(cell),
            "paper_mult_adds": paper,
            "true_mult_adds": true,
            "overstatement": paper / true,
            "paper_printed_params": printed_params,
            "paper_printed_mult_adds": printed_mult_adds,
        })
    return rows
