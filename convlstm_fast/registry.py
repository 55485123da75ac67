"""The registry of cells: one :class:`CellSpec` per variant holds everything that depends on
*which* cell and not on *how* it is computed (STYLE.md 11).

A spec says: the parameters (SPEC names, shapes as functions of Cin, C, K, their roles, which
are biases), the gates (order, which slot is the forget gate, the init rule of its bias), the
reference step (the oracle, convlstm_fast.reference.cells), the multiply-accumulates of a step
(Table 1, FlopCounterMode's convention), the fused op's name and what it saves for backward per
layout, and which backends implement it. The modules, the functional layer, the op
registration, counting, the benchmark, training, the visualiser and the tests iterate over this
registry; nothing else names a variant.

The attention quantities of b, c and d use one set of letters everywhere (code, comments, the
``att_*`` parameters): the attention features F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) +
b_a) (``att_dw_x``, ``att_pw_x``, ``att_dw_h``, ``att_pw_h``, ``att_bias``), the logits Z (b:
``att_weight_z`` * F, one channel; c/d: SepConv_z(F) with ``att_dw_z``, ``att_pw_z``) and the map
A (b: softmax over H·W; c/d: exp(Z − max_HW Z)). SPEC writes the c/d ones with an index i.

Users add cells with :func:`register_cell`; a cell without fused kernels runs on the reference
backend (``backend="auto"`` falls back to it; an explicit fused backend says it has no kernel).

For the native cells, csrc/cells.h describes the same parameters, gates and saved tensors to
the C++ kernels (which cannot read this file); tests/test_native_layout.py holds the two equal
through the op ``convlstm_fast::cell_layout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

GATE_ACTIVATIONS = ("sigmoid", "hard_sigmoid")
ROLES = ("conv", "depthwise", "pointwise", "fc", "bias")
LAYOUTS = ("channels_last", "nchw")
ShapeFn = Callable[[int, int, int], tuple]  # (in_channels, hidden_channels, kernel_size) -> shape
# (x [T, B, Cin, H, W], h0 [B, C, H, W], params) -> [(shape, dtype), ...] of the saved tensors
SavedSpec = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], list]


@dataclass(frozen=True)
class Parameter:
    """One parameter: its name, ``shape(in_channels, hidden_channels, kernel_size)`` and its
    role, which decides its initialisation (:func:`convlstm_fast.modules.init_parameters`):
    ``conv`` (a full K×K kernel ``[out, in, K, K]``), ``depthwise`` (``[channels, 1, K, K]``),
    ``pointwise`` (a 1×1 convolution ``[out, in]``), ``fc`` (a pooled gate FC ``[out, in]``),
    ``bias``."""

    name: str
    shape: ShapeFn
    role: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"parameter {self.name!r}: role must be one of {ROLES}, got {self.role!r}")

    @property
    def is_bias(self) -> bool:
        return self.role == "bias"


@dataclass(frozen=True)
class Gates:
    """The gate slots stacked along dim 0 of ``bias`` and of the ``weights`` that feed it, in
    ``order``; ``forget`` names the forget gate, whose bias starts at 1 (Jozefowicz et al. 2015)
    under the default init, and under the reference code's init only if
    ``reference_forget_bias``."""

    order: tuple
    bias: str
    weights: tuple = ()
    forget: str = "f"
    reference_forget_bias: bool = False

    def slot(self, name: str, hidden_channels: int) -> slice:
        index = self.order.index(name)
        return slice(index * hidden_channels, (index + 1) * hidden_channels)


@dataclass(frozen=True)
class CellSpec:
    """Everything about one cell that is independent of how it is computed.

    Args:
        name: the ``variant`` string users pass.
        description: one line, with the paper's equations.
        parameters: in the canonical order every op and ``parameter_list()`` use.
        step: the reference step ``(x, h, c, params: dict, gate_activation, record) -> (h, c)``
            on NCHW tensors; ``record`` (a dict or None) receives what the visualiser shows.
        mult_adds: ``(in_channels, hidden_channels, kernel_size, height, width) -> int``: the
            true multiply-accumulates of one step of one sample, as FlopCounterMode counts the
            reference (convolutions and matrix products).
        hidden_of: ``(parameter, rows per hidden channel)``: C = that parameter's dim 0 / rows.
        kernel_of: the parameter whose last dim is K (None: the cell has no spatial kernel).
        gates: the gate slots, for the forget-gate bias (None: no such bias).
        records: the keys the reference step writes into ``record`` (e.g. "attention").
        op: the fused op's base name: ``convlstm_fast::<op>`` (native), ``<op>_triton``.
        kernels: backend -> the layout its kernel saves state tensors in (a key of ``saved``);
            the backends not listed have no kernel for this cell.
        saved: layout -> what the fused forward saves for backward (its shapes and dtypes; the
            values are private to that kernel's own backward).
        paper_table1: the paper's printed (Params, Mult-Adds) of Table 1, for comparison.
    """

    name: str
    description: str
    parameters: tuple
    step: Callable
    mult_adds: Callable[[int, int, int, int, int], int]
    hidden_of: tuple
    kernel_of: str | None = None
    gates: Gates | None = None
    records: tuple = ()
    op: str | None = None
    kernels: Mapping[str, str] = field(default_factory=dict)
    saved: Mapping[str, SavedSpec] = field(default_factory=dict)
    paper_table1: tuple | None = None

    def __post_init__(self):
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"cell {self.name!r}: parameter names repeat: {names}")
        if self.hidden_of[0] not in names or (self.kernel_of and self.kernel_of not in names):
            raise ValueError(f"cell {self.name!r}: hidden_of/kernel_of must name parameters {names}")
        if self.gates is not None and not {self.gates.bias, *self.gates.weights} <= set(names):
            raise ValueError(f"cell {self.name!r}: gates.bias and gates.weights must be among "
                             f"{names}")
        for backend, layout in self.kernels.items():
            if layout not in self.saved:
                raise ValueError(f"cell {self.name!r}: kernel of {backend!r} saves in layout "
                                 f"{layout!r}, which `saved` does not describe")
        if self.kernels and self.op is None:
            raise ValueError(f"cell {self.name!r}: fused kernels need an op name")

    def parameter_shapes(self, in_channels: int, hidden_channels: int,
                         kernel_size: int) -> dict[str, tuple]:
        """Names and shapes of the parameters, in op order."""
        return {p.name: tuple(p.shape(in_channels, hidden_channels, kernel_size))
                for p in self.parameters}

    @property
    def parameter_names(self) -> tuple:
        return tuple(p.name for p in self.parameters)

    def sizes(self, params: Sequence[torch.Tensor]) -> tuple[int, int]:
        """``(hidden_channels, kernel_size)`` read off a parameter list in op order."""
        by_name = dict(zip(self.parameter_names, params))
        name, rows = self.hidden_of
        kernel = by_name[self.kernel_of].shape[-1] if self.kernel_of else 1
        return by_name[name].shape[0] // rows, kernel

    def weight_count(self, in_channels: int, hidden_channels: int, kernel_size: int) -> int:
        """Weights without biases: the paper's Params column (eqs. 7, 16, 20, 24)."""
        return sum(math.prod(p.shape(in_channels, hidden_channels, kernel_size))
                   for p in self.parameters if not p.is_bias)

    def saved_spec(self, backend: str) -> SavedSpec:
        return self.saved[self.kernels[backend]]


_CELLS: dict[str, CellSpec] = {}


def register_cell(spec: CellSpec, *, replace: bool = False) -> CellSpec:
    """Add ``spec`` to the registry (``replace=True`` to redefine a user cell of that name; the
    paper's five cannot be replaced). Returns it."""
    if not isinstance(spec, CellSpec):
        raise TypeError(f"register_cell takes a CellSpec, got {type(spec).__name__}")
    if spec.name in _CELLS and (not replace or spec.name in BUILTIN):
        raise ValueError(f"a cell named {spec.name!r} is already registered")
    _CELLS[spec.name] = spec
    return spec


def unregister_cell(name: str) -> None:
    """Remove a user-registered cell (the paper's five stay)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is one of the paper's cells and cannot be removed")
    _CELLS.pop(name, None)


def cell_names() -> tuple:
    """Every registered cell, the paper's five first."""
    return tuple(_CELLS)


def get_cell(name: str) -> CellSpec:
    """The spec of ``name``; a ValueError listing the registered names otherwise."""
    if not isinstance(name, str) or name not in _CELLS:
        raise ValueError(f"variant must be one of {cell_names()}, got {name!r}")
    return _CELLS[name]


def check_variant(variant: str) -> str:
    get_cell(variant)
    return variant


def check_gate_activation(gate_activation: str) -> str:
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(
            f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
    return gate_activation


def check_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd integer ('same' padding K // 2), got {kernel_size}")
    return kernel_size


def is_bias_name(name: str) -> bool:
    """Whether a (possibly dotted) parameter name is a bias of a registered cell: the paper's
    Params column leaves those out."""
    leaf = name.rsplit(".", 1)[-1]
    return any(p.is_bias for spec in _CELLS.values() for p in spec.parameters if p.name == leaf)


# ---------------------------------------------------------------------------------------------
# The paper's five cells (shared/SPEC.md)
# ---------------------------------------------------------------------------------------------

def _conv_mult_adds(in_channels, hidden, kernel, height, width):
    """[i f g o] = W_x * X + W_h * H: K²·(Cin + C)·4C per pixel."""
    return kernel * kernel * (in_channels + hidden) * 4 * hidden * height * width


def _sepconv_mult_adds(kernel, channels_in, channels_out, pixels):
    return (kernel * kernel * channels_in + channels_in * channels_out) * pixels


def _pooled_mult_adds(gates: int, attention: str | None):
    """(a)–(d): the pooled FCs on x̄, h̄ (gates·C·(Cin + C)), the candidate's two SepConvs, and
    for b/c/d the features' two SepConvs plus Z (b: a K×K conv to one channel; c/d: a SepConv)."""

    def count(in_channels, hidden, kernel, height, width):
        pixels = height * width
        macs = gates * hidden * (in_channels + hidden)
        macs += _sepconv_mult_adds(kernel, in_channels, hidden, pixels)
        macs += _sepconv_mult_adds(kernel, hidden, hidden, pixels)
        if attention is not None:
            macs += _sepconv_mult_adds(kernel, in_channels, hidden, pixels)
            macs += _sepconv_mult_adds(kernel, hidden, hidden, pixels)
        if attention == "spatial":
            macs += kernel * kernel * hidden * pixels
        elif attention == "channel":
            macs += _sepconv_mult_adds(kernel, hidden, hidden, pixels)
        return macs

    return count


def _state_shape(x, h0, layout):
    steps, batch, _, height, width = x.shape
    hidden = h0.shape[1]
    if layout == "nchw":
        return (steps, batch, hidden, height, width)
    return (steps, batch, height, width, hidden)


def _pooled_saved(gates: int, attention: str | None) -> dict:
    """What the fused (a)–(d) forwards save, per layout, in the input's dtype: C_t and G of every
    step (state tensors), the pooled gates' pre-activations ``[T, B, gates·C]``, and the
    attention map A when the cell has one — ``[T, B, H, W]`` for b (softmax over H·W), a state
    tensor for c/d (exp(Z − max Z)). F, Z and the depthwise outputs are recomputed in backward."""

    def spec_for(layout):
        def spec(x, h0, params):
            state = _state_shape(x, h0, layout)
            steps, batch = x.shape[:2]
            saved = [(state, x.dtype), (state, x.dtype),
                     ((steps, batch, gates * h0.shape[1]), x.dtype)]
            if attention == "spatial":
                saved.append(((steps, batch, x.shape[3], x.shape[4]), x.dtype))
            elif attention == "channel":
                saved.append((state, x.dtype))
            return saved
        return spec

    return {layout: spec_for(layout) for layout in LAYOUTS}


def _convlstm_saved(x, h0, params):
    """C_t ``[T, B, H, W, C]`` and the gate pre-activations ``[T, B, H, W, 4C]`` (i, f, g, o)."""
    cell = _state_shape(x, h0, "channels_last")
    return [(cell, x.dtype), (cell[:-1] + (4 * cell[-1],), x.dtype)]


def _sepconv(prefix: str, source: str, bias: bool = False) -> tuple:
    """SepConv weights ``<prefix>_dw_<source>``, ``<prefix>_pw_<source>`` from ``x`` (Cin
    channels) or ``h`` / ``z`` (C channels) to C."""
    def channels(cin, c):
        return cin if source == "x" else c

    return (Parameter(f"{prefix}_dw_{source}", lambda cin, c, k: (channels(cin, c), 1, k, k),
                      "depthwise"),
            Parameter(f"{prefix}_pw_{source}", lambda cin, c, k: (c, channels(cin, c)),
                      "pointwise"))


def _pooled_parameters(gates: int, attention: str | None) -> tuple:
    params = (Parameter("gate_weight_x", lambda cin, c, k: (gates * c, cin), "fc"),
              Parameter("gate_weight_h", lambda cin, c, k: (gates * c, c), "fc"),
              Parameter("gate_bias", lambda cin, c, k: (gates * c,), "bias"),
              *_sepconv("cand", "x"), *_sepconv("cand", "h"),
              Parameter("cand_bias", lambda cin, c, k: (c,), "bias"))
    if attention is not None:
        params += (*_sepconv("att", "x"), *_sepconv("att", "h"),
                   Parameter("att_bias", lambda cin, c, k: (c,), "bias"))
    if attention == "spatial":
        params += (Parameter("att_weight_z", lambda cin, c, k: (1, c, k, k), "conv"),)
    elif attention == "channel":
        params += _sepconv("att", "z")
    return params


def _register_builtins() -> None:
    from .reference import cells as reference

    native_pooled = {"cpu": "nchw", "cuda": "channels_last", "triton": "channels_last"}
    register_cell(CellSpec(
        name="convlstm",
        description="original ConvLSTM, full K×K gates (eqs. 1-6)",
        parameters=(Parameter("weight_x", lambda cin, c, k: (4 * c, cin, k, k), "conv"),
                    Parameter("weight_h", lambda cin, c, k: (4 * c, c, k, k), "conv"),
                    Parameter("bias", lambda cin, c, k: (4 * c,), "bias")),
        step=reference.convlstm_step, mult_adds=_conv_mult_adds,
        hidden_of=("weight_x", 4), kernel_of="weight_h",
        gates=Gates(("i", "f", "g", "o"), "bias", ("weight_x", "weight_h"),
                    reference_forget_bias=True),
        op="convlstm_layer",
        kernels={"cpu": "channels_last", "cuda": "channels_last", "triton": "channels_last"},
        saved={"channels_last": _convlstm_saved}, paper_table1=(4.719e6, 3700e6)))
    pooled = [
        ("a", "pooled-FC gates + depthwise-separable candidate (eqs. 8-15)", ("i", "f", "o"),
         None, reference.pooled_step, "pooled_layer", (0.529e6, 415e6)),
        ("b", "(a) on a spatially soft-attended input (eqs. 17-19)", ("i", "f", "o"), "spatial",
         reference.spatial_attention_step, "spatial_attention_layer", (0.667e6, 522e6)),
        ("c", "(a) with the input gate as channel-wise max-normalised attention (eqs. 21-23)",
         ("f", "o"), "channel", reference.input_attention_step, "input_attention_layer",
         (0.601e6, 472e6)),
        ("d", "(a) with the output gate as channel-wise max-normalised attention", ("i", "f"),
         "channel", reference.output_attention_step, "output_attention_layer", (0.601e6, 472e6)),
    ]
    for name, description, order, attention, step, op, table1 in pooled:
        register_cell(CellSpec(
            name=name, description=description,
            parameters=_pooled_parameters(len(order), attention), step=step,
            mult_adds=_pooled_mult_adds(len(order), attention),
            hidden_of=("gate_weight_x", len(order)), kernel_of="cand_dw_x",
            gates=Gates(order, "gate_bias", ("gate_weight_x", "gate_weight_h")),
            records=("gates",) + (() if attention is None else ("attention",)),
            op=op, kernels=native_pooled, saved=_pooled_saved(len(order), attention),
            paper_table1=table1))


BUILTIN: tuple = ()
_register_builtins()
BUILTIN = cell_names()


def import_cell_modules(argv: Sequence[str] | None) -> list[str]:
    """Import the modules named by ``--import MODULE`` (repeatable, or comma-separated) in a
    command line, so that the cells they register are known before the command checks its
    ``--variant`` arguments. Returns the modules imported."""
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    modules = []
    for index, word in enumerate(argv):
        if word == "--import" and index + 1 < len(argv):
            modules += argv[index + 1].split(",")
        elif word.startswith("--import="):
            modules += word.split("=", 1)[1].split(",")
    for module in filter(None, modules):
        importlib.import_module(module)
    return modules


IMPORT_HELP = ("import MODULE first (repeatable): a module that registers cells with "
               "convlstm_fast.register_cell")
