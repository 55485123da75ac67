"""Functional layer: validates arguments, normalises them, and hands one layer to a backend.

The flow (STYLE.md): module (parameters, time loop over layers) -> :func:`convlstm_layer`
(validates, picks the backend) -> registered op or reference code -> kernel.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .backends import select_backend
from .registry import CellSpec, check_gate_activation, get_cell

State = tuple[torch.Tensor, torch.Tensor]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_input(x, name: str, ndim: int, channels: int | None = None, channel_dim: int = 2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if channels is not None and x.shape[channel_dim] != channels:
        raise ValueError(
            f"{name} has {x.shape[channel_dim]} channels (dim {channel_dim} of shape "
            f"{tuple(x.shape)}), expected in_channels={channels}"
        )


def check_state(state, x: torch.Tensor, batch: int, hidden_channels: int, height: int,
                width: int, name: str = "state") -> State:
    """``state`` must be ``(h, c)`` with each ``[B, C, H, W]`` on x's device and dtype."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{name} must be a tuple (h, c) of two tensors, got {type(state).__name__}")
    expected = (batch, hidden_channels, height, width)
    for part, tensor in zip(("h", "c"), state):
        label = f"{name}[{0 if part == 'h' else 1}] ({part})"
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{label} must have shape {expected} [B, C, H, W], got {tuple(tensor.shape)}")
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(
                f"{label} must match the input's dtype and device ({x.dtype}, {x.device}), "
                f"got {tensor.dtype}, {tensor.device}"
            )
    return state[0], state[1]


def _params_list(params, spec: CellSpec) -> list[torch.Tensor]:
    names = spec.parameter_names
    if isinstance(params, Mapping):
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"params for variant {spec.name!r} lack {missing}")
        params = [params[n] for n in names]
    params = list(params)
    if len(params) != len(names):
        raise ValueError(f"params for variant {spec.name!r} must be {len(names)} tensors {names}, "
                         f"got {len(params)}")
    for name, p in zip(names, params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name} must be a torch.Tensor, got {type(p).__name__}")
    return params


def _check_params(params: list[torch.Tensor], spec: CellSpec, x: torch.Tensor, hidden_channels: int,
                  kernel_size: int) -> None:
    expected = spec.parameter_shapes(x.shape[2], hidden_channels, kernel_size)
    for (name, shape), p in zip(expected.items(), params):
        if tuple(p.shape) != shape:
            raise ValueError(f"parameter {name} must have shape {shape}, got {tuple(p.shape)}")
        if p.device != x.device or p.dtype != x.dtype:
            raise ValueError(
                f"parameter {name} ({p.dtype}, {p.device}) must match the input "
                f"({x.dtype}, {x.device}); move the module with .to()"
            )


@torch._dynamo.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """Whether ``device_type`` has autocast at all (not "meta", used to count Mult-Adds). A
    constant under torch.compile: Dynamo cannot trace ``torch.amp.is_autocast_available`` on
    torch 2.6 … 2.11, and the answer never changes within a process."""
    return torch.amp.is_autocast_available(device_type)


def _autocast(tensors: Sequence[torch.Tensor], device_type: str) -> list[torch.Tensor]:
    """Under torch.autocast the layer runs in the autocast dtype (as a convolution would)."""
    if not (_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def check_recompute(recompute):
    """``None``, ``"layers"``, or a positive number of steps per chunk (``"steps"`` = 1)."""
    if recompute == "steps":
        return 1
    if recompute in (None, "layers") or (isinstance(recompute, int)
                                         and not isinstance(recompute, bool) and recompute > 0):
        return recompute
    raise ValueError("recompute must be None, 'layers', 'steps' or a positive number of steps "
                     f"per chunk, got {recompute!r}")


def check_lengths(lengths, batch: int, steps: int, device: torch.device):
    """``lengths``: ``None``, or each sample's number of valid steps, ``[B]`` integers in
    ``[0, T]`` (a tensor on any device, or a list of ints) -> ``(an int64 tensor on device,
    (shortest, longest))``; the bounds are read on the host once, and are ``None`` under
    torch.compile (where reading them would break the graph) and when ``lengths`` is."""
    if lengths is None:
        return None, None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"lengths must be a list of ints or an integer tensor, got {lengths!r}")
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError("lengths must be an integer tensor [B] or a list of ints, got "
                        f"{type(lengths).__name__}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape [B] = ({batch},), one length per sample, got "
                         f"{tuple(lengths.shape)}")
    bounds = None
    if not torch.compiler.is_compiling() and batch > 0:
        bounds = low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > steps:
            raise ValueError(f"lengths must lie in [0, T] = [0, {steps}], got values from {low} "
                             f"to {high}")
    return lengths.to(device=device, dtype=torch.int64), bounds


def _drive_steps(run, times: Sequence[int], x, h, c, lengths, weights):
    """The layer one step at a time in the order of ``times``, each step one call of the
    backend's layer (a fused step on a kernel backend), a sample's step ``t`` counting only
    while ``t < lengths[b]``: past it the state is carried unchanged and the output is zero.
    Returns the outputs in the order of ``times`` and the final state."""
    outputs = []
    for t in times:
        output, _, c_next = run(x[t:t + 1], h, c, None, *weights)
        valid = (lengths > t).view(-1, 1, 1, 1)
        outputs.append(torch.where(valid, output[0], 0.0))
        h = torch.where(valid, output[0], h)
        c = torch.where(valid, c_next, c)
    return (*outputs, h, c)


def _walk(steps: int, reverse: bool, lengths: torch.Tensor | None,
          bounds: tuple[int, int] | None, in_op: bool = False) -> list[tuple[str, list[int]]]:
    """The walk over the steps as segments ``(kind, times)`` in processing order: ``"layer"``,
    a run of steps every sample reaches, as one call of the backend's layer (walking it
    backwards with ``reverse``); ``"masked"``, one call per step with the lengths applied;
    ``"skip"``, steps no sample reaches (zero output, state unchanged). ``bounds`` are the
    lengths' min and max (:func:`check_lengths`); without them (under torch.compile) every step
    is masked. A backend that masks ``lengths`` inside its layer (``in_op``) runs every step the
    longest sample reaches as one ``"layer"`` call."""
    times = list(range(steps - 1, -1, -1) if reverse else range(steps))
    if lengths is None or (in_op and bounds is None):
        return [("layer", times)]
    if bounds is None:
        return [("masked", times)]
    shortest, longest = bounds
    if in_op:
        shortest = longest
    segments = [("layer", [t for t in times if t < shortest]),
                ("masked", [t for t in times if shortest <= t < longest]),
                ("skip", [t for t in times if t >= longest])]
    if reverse:
        segments.reverse()
    return [(kind, part) for kind, part in segments if part]


def convlstm_layer(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    variant: str = "a",
    state: State | None = None,
    *,
    gate_activation: str = "sigmoid",
    backend: str = "auto",
    recompute: str | int | None = None,
    reverse: bool = False,
    lengths: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, State]:
    """Run one ConvLSTM layer over a sequence.

    Args:
        x (Tensor[T, B, Cin, H, W]): the input sequence, time-first, any strides (the time-first
            view ``x_bf.transpose(0, 1)`` of a batch-first tensor is read in place, not copied).
        params: the cell's parameters by name (or a list in the order of its registry entry's
            ``parameters``); the hidden size C and kernel size K are read from them.
        variant: a registered cell (:func:`convlstm_fast.cell_names`): ``"convlstm"``, ``"a"``,
            ``"b"``, ``"c"``, ``"d"`` or one added with :func:`convlstm_fast.register_cell`.
        state: ``(h_0, c_0)``, each Tensor[B, C, H, W]; zeros when ``None``.
        gate_activation: ``"sigmoid"`` or ``"hard_sigmoid"`` (clamp(0.2·x + 0.5, 0, 1)).
        backend: ``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"auto"``.
        recompute: trade time for memory when a gradient is wanted (``torch.utils.checkpoint``):
            ``None`` keeps what the backend saves for backward (2–5 state tensors per step);
            ``"steps"`` (or an int k) runs the layer in chunks of 1 (k) steps that keep only
            their inputs — h and c at the chunk boundaries — and recomputes the rest in backward
            (one extra forward in all); ``"layers"`` keeps only the layer's inputs.
        reverse: walk the sequence backwards, t = T − 1 … 0 (the reverse direction of a
            bidirectional layer); ``output[t]`` is still the state after step t.
        lengths (Tensor[B] or list of ints, in [0, T]): each sample's number of valid steps.
            Sample b's ``output[t]`` is zero for t ≥ lengths[b], and ``(h_n, c_n)`` is its state
            after its own last valid step (``state`` itself for length 0); in reverse its
            sequence starts at step lengths[b] − 1. Gradients are those of running each sample
            alone on its prefix. No sorting or repacking: the state is carried unchanged past a
            sample's end.

    ``reverse`` runs inside the backend's layer (the fused kernels walk their own loop
    backwards; no copy of the sequence), and so do ``lengths`` on the backends that mask them
    inside their loop (the reference, cpu, and those whose ``lengths_in_op`` is set): one call
    of the layer over the steps the longest sample reaches. Elsewhere the steps every sample
    reaches run as one call, those between the shortest and the longest sample one call per
    step with the lengths applied. No step past the longest sample is computed.

    Returns:
        ``(output, (h_n, c_n))`` with output Tensor[T, B, C, H, W], h_n, c_n Tensor[B, C, H, W].
    """
    spec = get_cell(variant)
    check_gate_activation(gate_activation)
    check_input(x, "x", 5)
    param_list = _params_list(params, spec)
    hidden_channels, kernel_size = spec.sizes(param_list)
    steps, batch, _, height, width = x.shape
    device_type = x.device.type
    x, *param_list = _autocast([x, *param_list], device_type)
    _check_params(param_list, spec, x, hidden_channels, kernel_size)
    if state is None:
        h0 = x.new_zeros(batch, hidden_channels, height, width)
        c0 = torch.zeros_like(h0)
    else:
        if isinstance(state, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in state):
            state = tuple(_autocast(state, device_type))
        h0, c0 = check_state(state, x, batch, hidden_channels, height, width)
    chosen = select_backend(backend, variant, x)
    recompute = check_recompute(recompute)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    lengths, bounds = check_lengths(lengths, batch, steps, x.device)
    if steps == 0 or x.numel() == 0 or h0.numel() == 0:
        output = x.new_zeros(steps, batch, hidden_channels, height, width)
        return output, (h0.clone(), c0.clone())
    param_list = [p.contiguous() for p in param_list]

    def run(x_part, h_part, c_part, lengths_part, *weights):
        # x as given (e.g. the time-first view of ConvLSTM's batch-first input): the kernels read
        # it in place, so autograd keeps the caller's own tensor, not a copy; with ``reverse``
        # the kernel walks the steps backwards itself, with ``lengths`` it masks them itself.
        output, h_n, c_n = chosen.run_layer(variant, x_part, h_part.contiguous(),
                                            c_part.contiguous(), list(weights), gate_activation,
                                            reverse, lengths_part)
        return output, h_n, c_n

    checkpointed = recompute is not None and torch.is_grad_enabled()
    in_op = lengths is not None and chosen.lengths_in_op
    if in_op and bounds is not None and bounds[0] == steps:
        lengths, in_op = None, False  # every sample runs the whole sequence: nothing to mask
    if not checkpointed and (lengths is None or in_op) and (bounds is None or bounds[1] == steps):
        output, h_n, c_n = run(x, h0, c0, lengths, *param_list)
        return output, (h_n, c_n)
    chunk = steps if not checkpointed or recompute == "layers" else recompute
    pieces = {}  # first time of a piece -> the outputs of its steps, [n, B, C, H, W]
    h_n, c_n = h0, c0
    for kind, times in _walk(steps, reverse, lengths, bounds, in_op):
        if kind == "skip":
            pieces[min(times)] = x.new_zeros(len(times), batch, hidden_channels, height, width)
            continue
        for start in range(0, len(times), chunk):
            group = times[start:start + chunk]
            first, last = min(group), max(group)
            if kind == "layer":
                part = (lengths - first).clamp(0, last + 1 - first) if in_op else None
                args = (x[first:last + 1], h_n, c_n, part, *param_list)
                output, h_n, c_n = (checkpoint(run, *args, use_reentrant=False)
                                    if checkpointed else run(*args))
                pieces[first] = output
                continue
            args = (run, group, x, h_n, c_n, lengths, param_list)
            *group_outputs, h_n, c_n = (checkpoint(_drive_steps, *args, use_reentrant=False)
                                        if checkpointed else _drive_steps(*args))
            for t, output in zip(group, group_outputs):
                pieces[t] = output[None]
    ordered = [pieces[t] for t in sorted(pieces)]
    return (ordered[0] if len(ordered) == 1 else torch.cat(ordered)), (h_n, c_n)
