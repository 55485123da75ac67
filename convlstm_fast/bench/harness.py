"""The one timing harness of the benchmarks (STYLE.md 8): warm-up, then the median and the 20th
and 80th percentiles of repeated runs; device-side timing on a GPU.

On CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) when triton is
importable, CUDA events otherwise; on the CPU, ``time.perf_counter`` around each call.
Also here: the "saved for backward" accounting of KERNELS.md and the run environment.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch


@dataclass
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles of ``repeats`` runs."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(sorted_values: list[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default).
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(samples_ms: Iterable[float]) -> Timing:
    values = sorted(samples_ms)
    if not values:
        raise ValueError("summarize needs at least one sample")
    return Timing(statistics.median(values), _percentile(values, 0.2), _percentile(values, 0.8),
                  len(values))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_function(fn: Callable[[], object], device: torch.device | str, warmup: int = 2,
                  repeats: int = 10, max_seconds: float | None = None) -> Timing:
    """Time ``fn()`` (no arguments) on ``device``.

    CPU: ``warmup`` untimed calls, then up to ``repeats`` timed calls (stopping early once
    ``max_seconds`` of timed calls have passed, with at least three samples). CUDA:
    ``triton.testing.do_bench`` with warm-up and repetition budgets derived from the same counts,
    or CUDA events around each call when triton is missing.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, device, warmup, repeats)
    for _ in range(warmup):
        fn()
    samples = []
    started = time.perf_counter()
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
        if max_seconds is not None and len(samples) >= 3 and time.perf_counter() - started > max_seconds:
            break
    return summarize(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str,
                     warmup: int = 2, repeats: int = 10,
                     max_seconds: float | None = None) -> dict[str, Timing]:
    """Time several functions of one comparison: on the CPU round-robin (each round calls every
    function once), so that a shared machine's changing load weighs on all of them alike and
    their ratios hold; stops after ``max_seconds`` once every function has three samples. On
    CUDA each function is timed on its own with :func:`time_function`."""
    device = torch.device(device)
    if device.type == "cuda":
        return {name: time_function(fn, device, warmup, repeats) for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    for round_index in range(repeats):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - begin) * 1e3)
        if (max_seconds is not None and round_index >= 2
                and time.perf_counter() - started > max_seconds):
            break
    return {name: summarize(values) for name, values in samples.items()}


def _time_cuda(fn, device: torch.device, warmup: int, repeats: int) -> Timing:
    with torch.cuda.device(device):
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            # do_bench takes time budgets in ms; it estimates one call's time first.
            median, p20, p80 = do_bench(fn, warmup=max(25, 5 * warmup), rep=max(100, 10 * repeats),
                                        quantiles=[0.5, 0.2, 0.8])
            return Timing(float(median), float(p20), float(p80), -1)
        for _ in range(max(warmup, 3)):
            fn()
        torch.cuda.synchronize(device)
        samples = []
        for _ in range(max(repeats, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return summarize(samples)


def device_profile(fn: Callable[[], object], device: torch.device | str,
                   top: int = 4) -> dict | None:
    """Where one warm call of ``fn`` spends its time on a GPU (torch.profiler's CUDA activity):
    ``wall_ms`` of the call (synchronised), ``kernel_ms`` summed over the device activities it
    ran (kernels, copies, fills), ``kernels`` their count, and the ``top`` kernels by total
    device time. ``kernel_ms`` well below ``wall_ms`` means the host (Python, dispatch,
    launches) holds the GPU back, not the kernels. None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - begin) * 1e3
    return profile_summary(prof.events(), torch.autograd.DeviceType.CUDA, wall_ms, top)


def profile_summary(events, device_type, wall_ms: float, top: int = 4) -> dict:
    """:func:`device_profile`'s figures from a profiler's events of ``device_type``."""
    kernels: dict[str, list[float]] = {}
    for event in events:
        if event.device_type == device_type:
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us() / 1e3
            entry[1] += 1
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])
    return {"wall_ms": wall_ms, "kernel_ms": sum(ms for ms, _ in kernels.values()),
            "kernels": sum(count for _, count in kernels.values()),
            "top": [{"name": name[:120], "ms": ms, "count": count}
                    for name, (ms, count) in ranked[:top]]}


def device_ceilings(device: torch.device | str, dtype: torch.dtype) -> dict:
    """The two ceilings a roofline needs, measured here (METHOD.md: datasheet rates are leads):
    a large device-to-device copy (bytes read + written per second) and a large matrix product
    in ``dtype`` (FLOP/s), each the median of :func:`time_function` runs on random data."""
    device = torch.device(device)
    big = device.type == "cuda"
    elements = (1 << 28) if big else (1 << 25)  # 512 MiB / 64 MiB of bf16-or-wider words
    source = torch.randn(elements, device=device)
    target = torch.empty_like(source)
    copy = time_function(lambda: target.copy_(source), device, 2, 10, 2.0)
    side = 8192 if big else 1024
    matmul_dtype = dtype if dtype != torch.float64 or not big else torch.float32
    a = torch.randn(side, side, device=device).to(matmul_dtype)
    b = torch.randn(side, side, device=device).to(matmul_dtype)
    product = time_function(lambda: a @ b, device, 2, 10, 2.0)
    del source, target, a, b
    return {"copy_GBps": 2 * elements * 4 / (copy.median_ms * 1e-3) / 1e9,
            "matmul_TFLOPs": 2 * side ** 3 / (product.median_ms * 1e-3) / 1e12,
            "matmul_dtype": str(matmul_dtype).replace("torch.", "")}


def saved_state_tensors(forward: Callable[[], torch.Tensor], excluded: Iterable[torch.Tensor],
                        state_numel: int, steps: int) -> float:
    """KERNELS.md "How saved for backward is counted": the unique storages that autograd saves
    during ``forward()`` (seen by ``torch.autograd.graph.saved_tensors_hooks``), leaving out
    the storages of ``excluded`` (the input x and the parameters) and of the returned output,
    in bytes, divided by ``steps`` × one state tensor (``state_numel`` elements of the output's
    dtype). ``forward`` must return the layer's output ``[T, B, C, H, W]``."""
    seen: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    skip = {(str(t.device), t.untyped_storage().data_ptr()) for t in list(excluded) + [output]}
    total = sum(nbytes for key, nbytes in seen.items() if key not in skip and key[1] != 0)
    return total / (steps * state_numel * output.element_size())


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_descriptor(device: torch.device) -> str:
    """A file-name-safe description of the device without the host name, e.g.
    ``cpu-2core-x86_64`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        raw = "cuda-" + torch.cuda.get_device_name(device)
    else:
        raw = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in raw.lower())
    while "--" in safe:
        safe = safe.replace("--", "-")
    return safe.strip("-")


def environment(device: torch.device) -> dict:
    """Device name, software versions, git commit and date of a benchmark run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "device_descriptor": device_descriptor(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
