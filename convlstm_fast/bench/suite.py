"""The benchmark suite: which cases a run holds (default, ``--quick``, ``--paper``) and running
them into one result dict (see :mod:`convlstm_fast.bench.report` for tables, JSON and plots)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..registry import cell_names
from ..backends import select_backend
from ..counting import count_parameters
from ..info import triton_specializations
from ..models import GestureNet
from . import cases, roofline
from .harness import device_ceilings, device_profile, environment, time_function
from .harness import time_interleaved
from .report import FORWARD, FORWARD_BACKWARD


@dataclass
class NetworkConfig:
    """The clip GestureNet's throughput is measured on: ``[batch, 3, frames, size, size]``."""

    width_mult: float
    size: int
    frames: int
    batch: int
    num_classes: int = 27
    backend: str = "auto"


@dataclass
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    variants: list[str]
    backends: list[str]
    shapes: tuple[cases.CellShape, ...]
    network: NetworkConfig | None
    sweep_spatial: tuple[int, ...] = ()
    sweep_channels: tuple[int, ...] = ()
    warmup: int = 2
    repeats: int = 10
    max_seconds: float = 3.0
    compile_shapes: int = 1  # torch.compile only on the first N shapes (compiling is slow)
    gate_activation: str = "sigmoid"
    recompute: str | int | None = None  # also time "<backend>+recompute" in forward+backward
    sequence_options: bool = False  # also time "<backend>+reverse" and "<backend>+ragged"
    time_budget_s: float | None = None  # start no new case after this many seconds
    label: str = "default"
    ceilings: bool = True  # measure the device's copy bandwidth and matmul rate (the floors)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "variants": list(self.variants),
            "backends": list(self.backends),
            "shapes": [s.to_dict() for s in self.shapes],
            "network": None if self.network is None else dict(self.network.__dict__),
            "sweep_spatial": list(self.sweep_spatial),
            "sweep_channels": list(self.sweep_channels),
            "warmup": self.warmup,
            "repeats": self.repeats,
            "gate_activation": self.gate_activation,
            "recompute": self.recompute,
            "sequence_options": self.sequence_options,
        }


def default_config(device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   quick: bool = False, paper: bool = False) -> BenchConfig:
    """The embedded presets: the default sized for a 2-core CPU (< ~5 minutes), ``quick`` (a few
    seconds, for CI and tests; no torch.compile unless asked), ``paper`` (256 channels, 28x28,
    the IsoGD and Jester shapes; meant for a GPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = list(cell_names())
    if quick:
        return BenchConfig(device, dtype, names, cases.backend_names(include_compile=False),
                           cases.QUICK_SHAPES, NetworkConfig(0.125, 32, 4, 1),
                           sweep_spatial=(4, 8), sweep_channels=(4, 8), warmup=1, repeats=3,
                           max_seconds=0.5, label="quick")
    if paper:
        return BenchConfig(device, dtype, names, cases.backend_names(), cases.PAPER_SHAPES,
                           NetworkConfig(1.0, 112, 16, 8), sweep_spatial=(14, 28, 56),
                           sweep_channels=(64, 128, 256, 512), warmup=5, repeats=20,
                           max_seconds=5.0, label="paper")
    return BenchConfig(device, dtype, names, cases.backend_names(), cases.DEFAULT_SHAPES,
                       NetworkConfig(0.25, 48, 8, 2), sweep_spatial=(7, 14, 28),
                       sweep_channels=(16, 32, 64), warmup=1, repeats=10, max_seconds=4.0)


def _network_costs(config: BenchConfig) -> dict:
    """Full-size network (width 1, 16-frame 112x112 clip, 249 classes) per cell: parameters and
    MACs per stage, counted on fake tensors."""
    input_shape = (1, 3, 16, 112, 112)
    per_variant = {}
    for variant in config.variants:
        net = GestureNet(249, variant, backend="reference")
        per_variant[variant] = net.summary(input_shape).to_dict()
    return {"input_shape": list(input_shape), "num_classes": 249, "per_variant": per_variant}


def _network_throughput(config: BenchConfig, variant: str) -> dict:
    net_cfg = config.network
    torch.manual_seed(0)
    net = GestureNet(net_cfg.num_classes, variant, backend=net_cfg.backend,
                     width_mult=net_cfg.width_mult).to(config.device, config.dtype)
    clip = torch.randn(net_cfg.batch, 3, net_cfg.frames, net_cfg.size, net_cfg.size)
    clip = clip.to(config.device, config.dtype)
    labels = torch.randint(0, net_cfg.num_classes, (net_cfg.batch,), device=config.device)
    params = [p for p in net.parameters() if p.requires_grad]

    def inference():
        with torch.no_grad():
            net(clip)

    def training():
        loss = torch.nn.functional.cross_entropy(net(clip).float(), labels)
        torch.autograd.grad(loss, params)

    net.eval()
    infer = time_function(inference, config.device, config.warmup, config.repeats,
                          config.max_seconds)
    net.train()
    train = time_function(training, config.device, config.warmup, config.repeats,
                          config.max_seconds)
    # The ConvLSTM input the network builds: T' = ceil(T / 2) steps at S / 4 (Res3D strides).
    steps, side = -(-net_cfg.frames // 2), -(-net_cfg.size // 4)
    probe = clip.new_empty(steps, net_cfg.batch, net.hidden_channels, side, side)
    return {
        "variant": variant,
        "convlstm_backend": select_backend(net_cfg.backend, variant, probe).name,
        "parameters": count_parameters(net),
        "inference_ms": infer.to_dict(),
        "training_ms": train.to_dict(),
        "inference_clips_per_s": net_cfg.batch / (infer.median_ms / 1e3),
        "training_clips_per_s": net_cfg.batch / (train.median_ms / 1e3),
    }


def _tasks(config: BenchConfig, result: dict):
    """The run as a list of ``(description, thunk)``, so one progress bar covers it."""
    tasks = []

    def latency_task(shape_index, shape, variant, mode):
        """One (shape, variant, mode): every backend timed, one checkpoint of the result."""
        make = cases.forward_fn if mode == FORWARD else cases.forward_backward_fn

        def run():
            x, params = cases.make_inputs(variant, shape, config.device, config.dtype)
            fns = {}
            backends = list(config.backends)
            kernels = [b for b in config.backends if b != cases.COMPILE]
            if config.recompute is not None and mode == FORWARD_BACKWARD:
                backends += [b + cases.RECOMPUTE for b in kernels]
            if config.sequence_options:
                backends += [b + option for b in kernels for option in cases.SEQUENCE_OPTIONS]
            for backend in backends:
                reason = cases.unsupported_reason(backend, variant, x)
                if reason is None and backend == cases.COMPILE and shape_index >= config.compile_shapes:
                    reason = f"torch.compile timed on the first {config.compile_shapes} shape(s) only"
                if reason is not None:
                    if mode == FORWARD:  # one row per (shape, variant, backend)
                        result["skipped"].append({"shape": shape.label, "variant": variant,
                                                  "backend": backend, "reason": reason})
                    continue
                if backend == cases.COMPILE:
                    torch._dynamo.reset()
                runner = cases.layer_runner(backend, variant, shape, config.gate_activation,
                                            config.recompute)
                fns[backend] = make(runner, x, params)
                if backend == cases.COMPILE:
                    started = time.perf_counter()
                    fns[backend]()  # compile outside the timing
                    key = f"{shape.label}/{variant}/{mode}"
                    result["compile_seconds"][key] = round(time.perf_counter() - started, 2)
            # All backends of one case are timed round-robin, so that the load of a shared
            # machine weighs on each alike and their ratios stay meaningful.
            timings = time_interleaved(fns, config.device, config.warmup, config.repeats,
                                       config.max_seconds)
            floor = cases.floor_ms(variant, shape, config.dtype, mode, result["ceilings"])
            for backend, timing in timings.items():
                profiled = device_profile(fns[backend], config.device)
                result["latency"].append({
                    "shape": shape.to_dict(), "variant": variant, "backend": backend,
                    "mode": mode, "dtype": result["config"]["dtype"], **timing.to_dict(),
                    "flops": cases.layer_flops(variant, shape, mode),
                    "compulsory_bytes": cases.compulsory_bytes(variant, shape, config.dtype, mode),
                    "floor_ms": None if floor is None else floor[0],
                    "floor_bound": None if floor is None else floor[1],
                    **({} if profiled is None else {"profile": profiled})})
            if mode != FORWARD_BACKWARD:
                return
            state_bytes = shape.state_numel * x.element_size()
            for backend in fns:
                if backend != cases.COMPILE:
                    saved = cases.saved_per_step(backend, variant, shape, config.device,
                                                 config.dtype, config.recompute)
                    result["saved"].append({"shape": shape.to_dict(), "variant": variant,
                                            "backend": backend, "saved_per_step": saved,
                                            "saved_bytes_per_step": saved * state_bytes})
        return run

    for index, shape in enumerate(config.shapes):
        for variant in config.variants:
            for mode in (FORWARD, FORWARD_BACKWARD):
                tasks.append((f"{shape.label} {variant} {mode}",
                              latency_task(index, shape, variant, mode)))

    if config.network is not None:
        def costs():
            result["network"]["costs"] = _network_costs(config)
        tasks.append(("network MACs", costs))
        for variant in config.variants:
            def throughput(variant=variant):
                result["network"]["throughput"]["rows"].append(_network_throughput(config, variant))
            tasks.append((f"network {variant}", throughput))

    base = config.shapes[0]
    measured: dict[tuple, dict] = {}  # the base shape sits in both sweeps: time it once
    for shape in cases.sweep_shapes(base, config.sweep_spatial, config.sweep_channels):
        for variant in config.variants:
            def sweep(shape=shape, variant=variant):
                dims = (variant, shape.batch, shape.steps, shape.in_channels,
                        shape.hidden_channels, shape.height, shape.width, shape.kernel_size)
                if dims not in measured:
                    x, params = cases.make_inputs(variant, shape, config.device, config.dtype)
                    fns = {backend: cases.forward_fn(cases.layer_runner(backend, variant, shape),
                                                     x, params)
                           for backend in config.backends if backend != cases.COMPILE
                           and cases.unsupported_reason(backend, variant, x) is None}
                    measured[dims] = time_interleaved(fns, config.device, 1,
                                                      max(3, config.repeats // 2),
                                                      config.max_seconds / 2)
                for backend, timing in measured[dims].items():
                    result["sweep"].append({"shape": shape.to_dict(), "variant": variant,
                                            "backend": backend, **timing.to_dict()})
            tasks.append((f"sweep {shape.label} {shape.height}x{shape.width} "
                          f"C={shape.hidden_channels} {variant}", sweep))
    return tasks


class _PlainProgress:
    """Stand-in for tqdm where it is not installed (e.g. a bare GPU machine): one line per case."""

    def __init__(self, items, enabled: bool):
        self.items, self.enabled = items, enabled

    def __iter__(self):
        return iter(self.items)

    def set_postfix_str(self, text: str) -> None:
        if self.enabled:
            print(f"bench: {text}", file=sys.stderr, flush=True)


def _progress(tasks, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(tasks, enabled)
    return tqdm(tasks, desc="bench", disable=not enabled, leave=False)


def _add_ratios(result: dict) -> None:
    """Speedup over the reference backend for the same shape, cell and mode, from this run."""
    reference = {(r["shape"]["label"], r["variant"], r["mode"]): r["median_ms"]
                 for r in result["latency"] if r["backend"] == "reference"}
    for r in result["latency"]:
        base = reference.get((r["shape"]["label"], r["variant"], r["mode"]))
        r["speedup_vs_reference"] = None if base is None else base / r["median_ms"]


def run_suite(config: BenchConfig, progress: bool = True,
              on_task: Callable[[dict], None] | None = None) -> dict:
    """Run every case of ``config``; returns the result dict (JSON-serialisable). ``on_task``
    is called with the result so far after every task (``result["complete"]`` is False until
    the end), so that a run killed midway still leaves what it measured."""
    result = {
        "complete": False,
        "environment": environment(config.device),
        "ceilings": device_ceilings(config.device, config.dtype) if config.ceilings else None,
        "config": config.to_dict(),
        "table1": cases.table1(),
        # Modelled, not measured: the fused GPU ops at the paper's layer in bf16 (an H200).
        "roofline": roofline.roofline_result(cases.PAPER_SHAPES[0], 2),
        "latency": [],
        "skipped": [],
        "saved": [],
        "compile_seconds": {},
        "network": {"costs": None, "throughput": {"config": None, "rows": []}},
        "sweep": [],
        "task_seconds": {},
    }
    if config.network is not None:
        probe = GestureNet(config.network.num_classes, "a", backend="reference",
                           width_mult=config.network.width_mult)
        shape = (1, 3, config.network.frames, config.network.size, config.network.size)
        result["network"]["throughput"]["config"] = {
            **config.network.__dict__, "mult_adds": probe.summary(shape).total_mult_adds}
    started = time.perf_counter()
    tasks = _tasks(config, result)
    bar = _progress(tasks, progress)
    for description, task in bar:
        if config.time_budget_s is not None and time.perf_counter() - started > config.time_budget_s:
            result["skipped"].append({"shape": "-", "variant": "-", "backend": "-",
                                      "reason": f"time budget ({config.time_budget_s:.0f} s) spent "
                                                f"before: {description}"})
            continue
        bar.set_postfix_str(description)
        task_started = time.perf_counter()
        task()
        result["task_seconds"][description] = round(time.perf_counter() - task_started, 3)
        if on_task is not None:
            _add_ratios(result)
            on_task(result)
    _add_ratios(result)
    result["environment"]["triton_specializations"] = sum(triton_specializations().values())
    result["wall_seconds"] = time.perf_counter() - started
    result["complete"] = True
    return result
