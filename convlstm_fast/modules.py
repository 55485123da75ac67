"""Drop-in modules: ``ConvLSTMCell`` (like ``nn.LSTMCell``) and ``ConvLSTM`` (like ``nn.LSTM``).

Modules are thin: they own the parameters (SPEC names, so a ``state_dict`` loads on every
backend), their initialisation and the loop over layers; the math runs in
:func:`convlstm_fast.functional.convlstm_layer`.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backends import check_backend
from .functional import State, check_input, check_recompute, convlstm_layer
from .registry import Parameter, check_gate_activation, check_kernel_size, get_cell

INITS = ("default", "reference")


def _check_channels(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _fan_in(parameter: Parameter, shape: tuple[int, ...], scheme: str) -> int:
    # Pointwise/FC weights are [out, in]; convolution kernels [out, in/groups, K, K]. The
    # reference code's he_normal (Keras) sees a depthwise kernel as [K, K, C, 1]: fan_in = K·K·C.
    fan_in = math.prod(shape[1:])
    if scheme == "reference" and parameter.role == "depthwise":
        fan_in *= shape[0]
    return fan_in


@torch.no_grad()
def init_parameters(cell: "ConvLSTMCell", scheme: str = "default") -> None:
    """Initialise a cell's parameters in place.

    The rules follow each parameter's role in the cell's registry entry.
    ``"default"``: every weight U(−1/√fan_in, 1/√fan_in) (PyTorch's convolution default),
    biases zero except the forget gate's slot of the gates' bias, which is 1 (Jozefowicz et al.
    2015).
    ``"reference"``: the reference code's (SPEC "Options"): he_normal, i.e. a normal truncated
    at ±2σ with σ = √(2/fan_in) (fan_in = K·K·in channels, depthwise kernels included);
    the pooled-FC gate weights (role ``fc``) constant 1/C with zero gate bias; the forget-gate
    bias 1 only where the cell's ``Gates.reference_forget_bias`` says so (``convlstm``); other
    biases zero.
    """
    if scheme not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {scheme!r}")
    c = cell.hidden_channels
    spec = get_cell(cell.variant)
    for parameter in spec.parameters:
        param = getattr(cell, parameter.name, None)
        if param is None:  # an absent bias (bias=False)
            continue
        if parameter.is_bias:
            param.zero_()
            continue
        fan_in = _fan_in(parameter, tuple(param.shape), scheme)
        if scheme == "reference" and parameter.role == "fc":
            param.fill_(1.0 / c)
        elif scheme == "reference":
            std = math.sqrt(2.0 / fan_in)
            nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(param, -bound, bound)
    gates = spec.gates
    if (cell.has_bias and gates is not None and gates.forget in gates.order
            and (scheme == "default" or gates.reference_forget_bias)):
        getattr(cell, gates.bias)[gates.slot(gates.forget, c)] = 1.0


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell of the paper, applied to one time step (like ``nn.LSTMCell``).

    Args:
        in_channels: Cin of the input ``x [B, Cin, H, W]``.
        hidden_channels: C of the states ``h``, ``c`` ``[B, C, H, W]``.
        kernel_size: odd K; convolutions use 'same' padding K // 2.
        variant: ``"convlstm"`` (original), ``"a"``, ``"b"``, ``"c"`` or ``"d"`` (shared/SPEC.md),
            or a cell added with :func:`convlstm_fast.register_cell`.
        bias: learn the biases (otherwise they are fixed at zero and absent from the state_dict).
        gate_activation: ``"sigmoid"`` (paper) or ``"hard_sigmoid"`` (reference code).
        init: ``"default"`` or ``"reference"`` (see :func:`init_parameters`).
        backend: ``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"auto"``.

    ``forward(x, state=None) -> (h, c)``, ``state = (h, c)``; zeros when ``None``.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3,
                 variant: str = "a", bias: bool = True, gate_activation: str = "sigmoid",
                 init: str = "default", backend: str = "auto"):
        super().__init__()
        self.in_channels = _check_channels(in_channels, "in_channels")
        self.hidden_channels = _check_channels(hidden_channels, "hidden_channels")
        self.kernel_size = check_kernel_size(kernel_size)
        spec = get_cell(variant)
        self.variant = variant
        self.gate_activation = check_gate_activation(gate_activation)
        self.backend = check_backend(backend)
        self.has_bias = bool(bias)
        for parameter in spec.parameters:
            if self.has_bias or not parameter.is_bias:
                shape = parameter.shape(in_channels, hidden_channels, kernel_size)
                self.register_parameter(parameter.name, nn.Parameter(torch.empty(shape)))
        init_parameters(self, init)

    def parameter_list(self) -> list[torch.Tensor]:
        """All parameters in op order; absent biases are zeros."""
        out = []
        for name, shape in get_cell(self.variant).parameter_shapes(
            self.in_channels, self.hidden_channels, self.kernel_size
        ).items():
            param = getattr(self, name, None)
            if param is None:
                reference = next(self.parameters())
                param = reference.new_zeros(shape)
            out.append(param)
        return out

    def forward_sequence(self, x: torch.Tensor, state: State | None = None,
                         recompute: str | int | None = None, reverse: bool = False,
                         lengths: torch.Tensor | Sequence[int] | None = None):
        """Run the cell over ``x [T, B, Cin, H, W]``: ``(output [T, B, C, H, W], (h_n, c_n))``
        (``recompute``, ``reverse``, ``lengths``: see :func:`convlstm_fast.convlstm_layer`)."""
        check_input(x, "x", 5, self.in_channels)
        return convlstm_layer(x, self.parameter_list(), self.variant, state,
                              gate_activation=self.gate_activation, backend=self.backend,
                              recompute=recompute, reverse=reverse, lengths=lengths)

    def forward(self, x: torch.Tensor, state: State | None = None) -> State:
        check_input(x, "x", 4, self.in_channels, channel_dim=1)
        _, (h, c) = self.forward_sequence(x.unsqueeze(0), state)
        return h, c

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}, "
                f"variant={self.variant!r}, bias={self.has_bias}, "
                f"gate_activation={self.gate_activation!r}, backend={self.backend!r}")


def _per_layer(value, num_layers: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{name} has {len(value)} entries, expected num_layers={num_layers}")
        return list(value)
    return [value] * num_layers


class ConvLSTM(nn.Module):
    """A stack of ConvLSTM layers over a sequence (like ``nn.LSTM``).

    Unlike ``nn.LSTM`` the default is ``batch_first=True``: video tensors are batch-first.

    Args:
        in_channels: Cin of the input.
        hidden_channels: C of every layer, or a list with one C per layer.
        kernel_size: odd K (one for all layers, or a list).
        num_layers: number of stacked layers.
        variant: the cell of every layer, or a list with one per layer.
        batch_first: input and output ``[B, T, C, H, W]`` when True, ``[T, B, C, H, W]`` otherwise.
        dropout: as ``nn.LSTM``'s: in training, dropout with this probability on the output of
            every layer but the last (never inside a cell, never on the returned states).
        bidirectional: as ``nn.LSTM``'s: every layer also runs a reverse direction (its own
            parameters, under ``cells_reverse``) walking t = T − 1 … 0; the two directions'
            outputs are concatenated along channels, so the next layer and the output have 2·C.
        recompute: trade time for memory in training, per layer (see
            :func:`convlstm_fast.convlstm_layer`): ``None``, ``"steps"``, an int, ``"layers"``.
        bias, gate_activation, init, backend: as for :class:`ConvLSTMCell`.

    ``forward(x, state=None, lengths=None) -> (output, (h_n, c_n))``: output holds the last
    layer's hidden state at every step, ``[B, T, D·C, H, W]`` (D = 2 when bidirectional, else
    1). When every layer has the same C, ``h_n``, ``c_n`` and a given ``state = (h_0, c_0)``
    are ``[D·num_layers, B, C, H, W]`` in ``nn.LSTM``'s order (layer l's forward direction at
    D·l, its reverse at D·l + 1); when the layers' C differ they are tuples with one
    ``[B, C_l, H, W]`` tensor per layer and direction, in the same order. Passing
    ``(h_n, c_n)`` of one call as ``state`` of the next continues the sequence.
    ``lengths`` (``[B]`` integers in [0, T]) makes the batch ragged: sample b's outputs are zero
    from step lengths[b] on and its ``h_n``, ``c_n`` are its states after its own last step
    (the reverse direction starts there); see :func:`convlstm_fast.convlstm_layer`.
    """

    def __init__(self, in_channels: int, hidden_channels: int | Sequence[int],
                 kernel_size: int | Sequence[int] = 3, num_layers: int = 1,
                 variant: str | Sequence[str] = "a", batch_first: bool = True, bias: bool = True,
                 gate_activation: str = "sigmoid", init: str = "default", backend: str = "auto",
                 dropout: float = 0.0, recompute: str | int | None = None,
                 bidirectional: bool = False):
        super().__init__()
        num_layers = _check_channels(num_layers, "num_layers")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout acts between layers (as in nn.LSTM): with num_layers=1 it "
                          f"does nothing (dropout={dropout})", stacklevel=2)
        self.dropout = float(dropout)
        self.recompute = check_recompute(recompute)
        hiddens = _per_layer(hidden_channels, num_layers, "hidden_channels")
        kernels = _per_layer(kernel_size, num_layers, "kernel_size")
        cells = _per_layer(variant, num_layers, "variant")
        self.in_channels = _check_channels(in_channels, "in_channels")
        self.num_layers = num_layers
        self.batch_first = batch_first
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.cells = nn.ModuleList()
        if bidirectional:
            self.cells_reverse = nn.ModuleList()
        layer_in = in_channels
        for hidden, kernel, cell_variant in zip(hiddens, kernels, cells):
            for direction in self._directions():
                direction.append(ConvLSTMCell(layer_in, hidden, kernel, cell_variant, bias,
                                              gate_activation, init, backend))
            layer_in = hidden * self.num_directions
        self.hidden_channels = hiddens
        self.stacked_states = len(set(hiddens)) == 1

    def _directions(self) -> list[nn.ModuleList]:
        return [self.cells, self.cells_reverse] if self.bidirectional else [self.cells]

    def _split_state(self, state) -> list[State | None]:
        """One ``(h_0, c_0)`` (or ``None``) per layer and direction, in nn.LSTM's order."""
        entries = self.num_layers * self.num_directions
        if state is None:
            return [None] * entries
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError("state must be a tuple (h_0, c_0)")
        h_0, c_0 = state
        first = "num_layers" + (" * 2 (bidirectional)" if self.bidirectional else "")
        if self.stacked_states:
            for name, tensor in (("h_0", h_0), ("c_0", c_0)):
                if not isinstance(tensor, torch.Tensor) or tensor.dim() != 5 or tensor.shape[0] != entries:
                    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ValueError(f"state {name} must be [{first} = {entries}, B, C, H, W], got {shape}")
            return [(h_0[i], c_0[i]) for i in range(entries)]
        for name, part in (("h_0", h_0), ("c_0", c_0)):
            if not isinstance(part, (tuple, list)) or len(part) != entries:
                raise ValueError(
                    f"state {name} must be a tuple of {first} = {entries} per-layer [B, C_l, H, W] "
                    "tensors (the layers have different hidden_channels)"
                )
        return list(zip(h_0, c_0))

    def forward(self, x: torch.Tensor, state=None, lengths=None):
        check_input(x, "x", 5, self.in_channels)
        sequence = x.transpose(0, 1) if self.batch_first else x
        layer_states = iter(self._split_state(state))
        h_n, c_n = [], []
        for index in range(self.num_layers):
            if index > 0 and self.dropout > 0:
                sequence = F.dropout(sequence, self.dropout, self.training)
            outputs = []
            for reverse, direction in enumerate(self._directions()):
                # The time-first view of a batch-first input goes in as it is: no copy of x, and
                # autograd keeps the caller's own tensor.
                output, (h, c) = direction[index].forward_sequence(
                    sequence, next(layer_states), recompute=self.recompute,
                    reverse=bool(reverse), lengths=lengths)
                outputs.append(output)
                h_n.append(h)
                c_n.append(c)
            sequence = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        output = sequence.transpose(0, 1) if self.batch_first else sequence
        if self.stacked_states:
            return output, (torch.stack(h_n), torch.stack(c_n))
        return output, (tuple(h_n), tuple(c_n))

    def extra_repr(self) -> str:
        extra = f", dropout={self.dropout}" if self.dropout else ""
        extra += f", recompute={self.recompute!r}" if self.recompute is not None else ""
        extra += ", bidirectional=True" if self.bidirectional else ""
        return f"batch_first={self.batch_first}{extra}"
