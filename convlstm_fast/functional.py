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


def convlstm_layer(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    variant: str = "a",
    state: State | None = None,
    *,
    gate_activation: str = "sigmoid",
    backend: str = "auto",
    recompute: str | int | None = None,
) -> tuple[torch.Tensor, State]:
    """Run one ConvLSTM layer over a sequence.

    Args:
        x (Tensor[T, B, Cin, H, W]): the input sequence, time-first.
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
    if steps == 0 or x.numel() == 0 or h0.numel() == 0:
        output = x.new_zeros(steps, batch, hidden_channels, height, width)
        return output, (h0.clone(), c0.clone())
    param_list = [p.contiguous() for p in param_list]

    def run(x_part, h_part, c_part, *weights):
        output, h_n, c_n = chosen.run_layer(variant, x_part.contiguous(), h_part.contiguous(),
                                            c_part.contiguous(), list(weights), gate_activation)
        return output, h_n, c_n

    if recompute is None or not torch.is_grad_enabled():
        output, h_n, c_n = run(x, h0, c0, *param_list)
        return output, (h_n, c_n)
    chunk = steps if recompute == "layers" else recompute
    outputs = []
    h_n, c_n = h0, c0
    for start in range(0, steps, chunk):
        output, h_n, c_n = checkpoint(run, x[start:start + chunk], h_n, c_n, *param_list,
                                      use_reentrant=False)
        outputs.append(output)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), (h_n, c_n)
