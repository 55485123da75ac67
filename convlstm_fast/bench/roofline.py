"""A roofline without a GPU: modelled HBM bytes and FLOPs of every launch of the fused ops, summed
per layer and set beside the floor of shared/KERNELS.md ("Numbers to hold yourself to").

The models are written next to the kernels they describe: ``traffic(shape, itemsize)`` in each
Triton op module (triton_kernels/<op>.py, and _common.py for what ops share) and one function per
op in :mod:`convlstm_fast.ops.cuda_traffic` for the CUDA C++ drivers. Each returns a list of
:class:`Launch` records; this module holds the record, the sizes the models are written in, the
sums, the floor and the table the benchmark prints (``python -m convlstm_fast.bench --roofline``).

What a record counts (the conventions every model follows):
- ``read`` / ``written``: bytes one launch moves to or from HBM. Every tensor a launch touches is
  counted once per launch: a launch's working set (one step: a few 3.2 MB state tensors at the
  paper's layer) fits the 50 MB L2, so re-reads *within* a launch (halo taps, the same H tile
  loaded by every channel tile) are served on chip; nothing is assumed to stay in L2 *between*
  launches (KERNELS.md's floor makes the same assumption).
- ``loaded``: bytes the programs load (tiles, halo taps, per-tile re-reads, weights loaded by
  every program): the L1/L2 traffic, where the tiling's redundancy shows (e.g. Triton (a)'s
  depthwise of H redone by each of the C/BLOCK_N channel tiles).
- ``flops``: 2 × multiply-adds of the convolutions, GEMMs and gate FCs, recomputation included,
  plus :data:`CELL_FLOPS` per state element for an LSTM epilogue (an estimate: the activations'
  cost depends on their implementation).
- ``count``: launches per layer call; ``kind`` says whose launch it is, as the launch counts do:
  :data:`KERNEL` (a Triton kernel, or a CUDA kernel of ours) or :data:`ATEN` (one ATen call; an
  ATen call may run more than one GPU kernel, e.g. addmm with a 2-D bias copies it first: its
  bytes include that).
Not modelled: layout conversions an ATen call may make inside itself (cuDNN given a
channels-last gradient against an NCHW input), kernel launch and host overheads, and what the
caller (functional.convlstm_layer, modules.ConvLSTM) does around the op. Every launch of the step
loops is listed (tests/test_roofline.py holds the launches one more step
adds to the ``LAUNCHES_PER_STEP`` the kernels declare). Calls before and after the loop on
parameter-sized or [B, C]-sized tensors are left out (well under 0.1 % of the bytes).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict, dataclass

FORWARD, BACKWARD = "forward", "backward"
KERNEL, ATEN = "kernel", "aten"

# NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200): 4.8 TB/s HBM3e, 989 TFLOP/s
# dense BF16 tensor core (1,979 with sparsity). KERNELS.md gives the 410 MB floor as 140 µs at
# 3 TB/s (an H100) and issue 14 as 95 µs at ~4.3 TB/s (an H200, achievable); the modelled times
# here use the datasheet's 4.8 TB/s.
H200_HBM_BYTES_PER_S = 4.8e12
H200_BF16_FLOPS_PER_S = 989e12
H200_SMS = 132  # the CUDA reductions size their splits by the SM count (layer_common.cuh)

# FLOPs per state element of an LSTM epilogue (activations, cell update), forward and backward.
CELL_FLOPS = 20
CELL_BACKWARD_FLOPS = 30

# The fused op of each cell with a GPU kernel, and the GPU backends modelled.
OPS = {"convlstm": "convlstm_layer", "a": "pooled_layer", "b": "spatial_attention_layer",
       "c": "input_attention_layer", "d": "output_attention_layer"}
BACKENDS = ("triton", "cuda")
# Issue 14: modelled forward bytes ≤ 1.3 × the floor for a, b, c, d on both GPU backends.
TARGET_RATIO = 1.3
TARGET_VARIANTS = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Launch:
    """One launch (or ``count`` identical launches) of a layer call; bytes and FLOPs per launch."""

    name: str
    kind: str
    phase: str
    read: int
    written: int
    flops: int = 0
    count: int = 1
    loaded: int | None = None

    @property
    def bytes(self) -> int:
        """HBM bytes of all ``count`` launches."""
        return (self.read + self.written) * self.count

    @property
    def loaded_bytes(self) -> int:
        return (self.read if self.loaded is None else self.loaded) * self.count

    @property
    def total_flops(self) -> int:
        return self.flops * self.count


class Sizes:
    """A layer call's sizes in bytes. ``shape`` has the attributes of bench.cases.CellShape
    (batch, steps, in_channels, hidden_channels, height, width, kernel_size); ``itemsize`` is
    the compute dtype's (2 for bf16). Accumulators and the running cell state are fp32."""

    def __init__(self, shape, itemsize: int):
        self.T, self.B = shape.steps, shape.batch
        self.cin, self.C = shape.in_channels, shape.hidden_channels
        self.H, self.W, self.K = shape.height, shape.width, shape.kernel_size
        self.HW = self.H * self.W
        self.rows = self.B * self.HW  # pixel rows of one step
        self.s = itemsize

    def state(self, channels: int | None = None, itemsize: int | None = None) -> int:
        """One step's ``[B·H·W, channels]`` map (default C channels, the compute dtype)."""
        return self.rows * (self.C if channels is None else channels) * (itemsize or self.s)

    def state32(self, channels: int | None = None) -> int:
        return self.state(channels, 4)

    def xstep(self, itemsize: int | None = None) -> int:
        """One step of the input, ``[B, Cin, H, W]``."""
        return self.state(self.cin, itemsize)

    def seq(self, channels: int | None = None, itemsize: int | None = None) -> int:
        """All T steps of a ``[B·H·W, channels]`` map."""
        return self.T * self.state(channels, itemsize)

    def xseq(self, itemsize: int | None = None) -> int:
        return self.T * self.xstep(itemsize)

    def vec(self, channels: int, itemsize: int = 4) -> int:
        """A per-sample vector ``[B, channels]`` (fp32 by default)."""
        return self.B * channels * itemsize

    def weight(self, numel: int) -> int:
        return numel * self.s

    def depthwise_flops(self, channels: int, maps: int | None = None) -> int:
        """2 × multiply-adds of a K×K depthwise conv over ``maps`` steps' worth of pixel rows."""
        return 2 * self.K * self.K * self.rows * channels * (1 if maps is None else maps)

    def gemm_flops(self, m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    def cell_flops(self) -> int:
        """An LSTM epilogue over one step's state (:data:`CELL_FLOPS` per element)."""
        return CELL_FLOPS * self.rows * self.C

    def cell_backward_flops(self) -> int:
        return CELL_BACKWARD_FLOPS * self.rows * self.C


class Recorder:
    """Collects a model's launches; ``phase`` is the phase the next records belong to."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.phase = FORWARD

    def kernel(self, name, read, written, flops=0, count=1, loaded=None) -> None:
        self._add(name, KERNEL, read, written, flops, count, loaded)

    def aten(self, name, read, written, flops=0, count=1, loaded=None) -> None:
        self._add(name, ATEN, read, written, flops, count, loaded)

    def per_step_weight_grad(self, name, step_read, weight, step_flops, steps) -> None:
        """An fp32 weight gradient summed per step (ops/registration.py's contract): one
        convolution backward a step reading ``step_read`` and writing the ``weight`` bytes,
        and an add_ of each into the sum."""
        self.aten(f"convolution_backward ({name} of one step)", step_read, weight, step_flops,
                  count=steps)
        self.aten(f"add_ ({name} over the steps)", 2 * weight, weight, count=steps - 1)

    def _add(self, name, kind, read, written, flops, count, loaded) -> None:
        if count:
            self.launches.append(Launch(name, kind, self.phase, int(read), int(written),
                                        int(flops), int(count),
                                        None if loaded is None else int(loaded)))


def cell_state_steps(r: Recorder, z: Sizes, name: str, read: int, written: int, flops: int,
                     loaded_extra: int) -> None:
    """The T launches of a pooled-gate layer's step kernel ``name`` (a-d, both GPU backends):
    ``read`` and ``written`` its bytes beside the cell state, which this adds as the kernels
    keep it (triton_kernels/_common.py CellState, csrc/cuda/pooled_cell.cuh StepCellState; a
    2-byte model is bf16's, the split state): every step writes the saved C_t; the walk's first
    reads C_0 (the dtype), the others the state (bf16: the saved C_{t−1} and the low halves;
    else fp32 rows); each but the last writes the state, the last h_n and c_n instead.
    ``loaded_extra``: the programs' loads beyond the HBM reads."""
    state = z.state() * 2 if z.s == 2 else z.state32()
    state_written = z.state() if z.s == 2 else z.state32()

    def record(label, first, last, count):
        read_ = read + (z.state() if first else state)
        written_ = written + z.state() + (2 * z.state() if last else state_written)
        r.kernel(name + label, read_, written_, flops, count=count, loaded=read_ + loaded_extra)

    if z.T == 1:
        record(" (the one step: c0 in, h_n and c_n out)", True, True, 1)
        return
    record(" (first step: c0 in)", True, False, 1)
    record("", False, False, z.T - 2)
    record(" (last step: h_n and c_n out)", False, True, 1)


def totals(launches: list[Launch], phase: str | None = None) -> dict:
    """Bytes, loaded bytes, FLOPs and launches (by kind) of the launches of ``phase`` (all when
    None)."""
    chosen = [r for r in launches if phase is None or r.phase == phase]
    return {"bytes": sum(r.bytes for r in chosen),
            "loaded": sum(r.loaded_bytes for r in chosen),
            "flops": sum(r.total_flops for r in chosen),
            "kernels": sum(r.count for r in chosen if r.kind == KERNEL),
            "aten": sum(r.count for r in chosen if r.kind == ATEN)}


def with_steps(shape, steps: int):
    """``shape`` with another number of steps (any object with CellShape's attributes)."""
    from types import SimpleNamespace

    fields = ("batch", "steps", "in_channels", "hidden_channels", "height", "width",
              "kernel_size")
    values = {name: getattr(shape, name) for name in fields}
    values["steps"] = steps
    return SimpleNamespace(**values)


def launches_per_step(model, shape, itemsize: int) -> dict[str, tuple[float, float]]:
    """``{"forward": (kernels, aten), "backward": (...)}`` that one more step adds to ``model``'s
    launches: the model at T = 1 and T = 3, the difference halved — as the launch counts of
    triton_kernels/launch_count.py and csrc/cuda/emulation_check.py measure the kernels."""
    one, three = model(with_steps(shape, 1), itemsize), model(with_steps(shape, 3), itemsize)
    measured = {}
    for phase in (FORWARD, BACKWARD):
        a, b = totals(one, phase), totals(three, phase)
        measured[phase] = ((b["kernels"] - a["kernels"]) / 2, (b["aten"] - a["aten"]) / 2)
    return measured


# KERNELS.md's floor of variant (a), generalised per cell with the same recipe: X read once and
# each precomputed X-side term written once; per step H_{t−1}, C_{t−1} and each precomputed term
# read, H_t, C_t and each saved state-sized tensor beyond C_t written. Per cell: (channels of
# the precomputed terms, in units of C; whether a step reads X_t itself; channels saved beyond
# C_t). b's X̃ = A∘X_t depends on H_{t−1}: its step reads X_t (its [B, H·W] map A is left out).
_FLOOR_TERMS = {"convlstm": (4, False, 4), "a": (1, False, 1), "b": (1, True, 1),
                "c": (2, False, 2), "d": (2, False, 2)}


def floor_bytes(variant: str, shape, itemsize: int) -> int:
    """The forward's compulsory HBM bytes (KERNELS.md: ≈ 410 MB for (a) at the paper's layer)."""
    z = Sizes(shape, itemsize)
    pre, reads_x, saved = _FLOOR_TERMS[variant]
    per_step = (2 + pre + 2 + saved) * z.state() + (z.xstep() if reads_x else 0)
    return z.xseq() + pre * z.seq() + z.T * per_step


def triton_model(op: str):
    """The Triton op module's ``traffic`` (None where triton is not installed: the module imports
    it at top, the model itself is plain Python)."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"convlstm_fast.triton_kernels.{op}").traffic


def cuda_model(op: str):
    from ..ops import cuda_traffic

    return getattr(cuda_traffic, op)


def model_of(backend: str, variant: str):
    return (triton_model if backend == "triton" else cuda_model)(OPS[variant])


def roofline_rows(shape, itemsize: int, variants=None) -> list[dict]:
    """One row per (variant, GPU backend) with a model: forward and forward+backward bytes,
    FLOPs, launches per step, the ratio to the floor and the modelled times on an H200."""
    rows = []
    for variant in variants or OPS:
        floor = floor_bytes(variant, shape, itemsize)
        for backend in BACKENDS:
            model = model_of(backend, variant)
            if model is None:
                continue
            launches = model(shape, itemsize)
            fwd, both = totals(launches, FORWARD), totals(launches)
            per_step = launches_per_step(model, shape, itemsize)
            rows.append({
                "variant": variant, "backend": backend,
                "forward_bytes": fwd["bytes"], "forward_backward_bytes": both["bytes"],
                "forward_loaded": fwd["loaded"], "forward_flops": fwd["flops"],
                "forward_backward_flops": both["flops"],
                "launches_per_step": {phase: list(n) for phase, n in per_step.items()},
                "floor_bytes": floor, "ratio_to_floor": fwd["bytes"] / floor,
                "forward_us": fwd["bytes"] / H200_HBM_BYTES_PER_S * 1e6,
                "forward_backward_us": both["bytes"] / H200_HBM_BYTES_PER_S * 1e6,
                "forward_flops_us": fwd["flops"] / H200_BF16_FLOPS_PER_S * 1e6,
                "launches": [asdict(r) for r in launches],
            })
    return rows


def roofline_result(shape, itemsize: int, variants=None) -> dict:
    """The JSON entry: the shape, the constants used and the rows."""
    return {"shape": shape.to_dict() if hasattr(shape, "to_dict") else vars(shape),
            "itemsize": itemsize, "hbm_bytes_per_s": H200_HBM_BYTES_PER_S,
            "bf16_flops_per_s": H200_BF16_FLOPS_PER_S, "target_ratio": TARGET_RATIO,
            "kernels_md_floor_a": floor_bytes("a", shape, itemsize),
            "rows": roofline_rows(shape, itemsize, variants),
            "missing": [] if importlib.util.find_spec("triton") else
            ["triton (not installed: no Triton models)"]}


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f}"


def _steps(counts: list[float]) -> str:
    return "+".join(f"{n:g}" for n in counts)


def roofline_markdown(result: dict) -> str:
    """The table the benchmark prints."""
    s = result["shape"]
    lines = [
        f"Modelled roofline (not measured), B={s['batch']} T={s['steps']} Cin={s['in_channels']} "
        f"C={s['hidden_channels']} {s['height']}x{s['width']} K={s['kernel_size']}, "
        f"{result['itemsize']}-byte dtype: HBM bytes per layer call from the kernels' own "
        f"models (convlstm_fast.bench.roofline), time = bytes / "
        f"{result['hbm_bytes_per_s'] / 1e12:.1f} TB/s (H200 HBM3e, datasheet)", "",
        "| cell | backend | fwd MB | fwd+bwd MB | floor MB | fwd / floor | fwd µs | fwd+bwd µs "
        "| fwd GFLOP | fwd+bwd GFLOP | fwd µs at 989 TFLOP/s | launches/step fwd | bwd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['backend']} | {_mb(r['forward_bytes'])} | "
            f"{_mb(r['forward_backward_bytes'])} | {_mb(r['floor_bytes'])} | "
            f"{r['ratio_to_floor']:.2f} | {r['forward_us']:.0f} | {r['forward_backward_us']:.0f} | "
            f"{r['forward_flops'] / 1e9:.1f} | {r['forward_backward_flops'] / 1e9:.1f} | "
            f"{r['forward_flops_us']:.0f} | {_steps(r['launches_per_step'][FORWARD])} | "
            f"{_steps(r['launches_per_step'][BACKWARD])} |")
    lines += ["", f"floor: KERNELS.md's recipe per cell (X read once, each precomputed X-side "
              f"term written once; per step H, C and the precomputed terms in, H, C and the saved "
              f"tensors out); (a): {_mb(result['kernels_md_floor_a'])} MB. Launches per step: "
              f"kernels of ours + ATen calls. Target (issue 14): fwd / floor ≤ "
              f"{result['target_ratio']} for a, b, c, d."]
    lines += [f"not modelled: {m}" for m in result["missing"]]
    return "\n".join(lines)
