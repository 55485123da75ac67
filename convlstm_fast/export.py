"""Export for deployment: ``torch.export`` with the fused ops as themselves, and ONNX with
standard ops only, the batch B and the steps T dynamic.

The flow:

    model ─ export_program ─▶ ExportedProgram: convlstm_fast::<op>_inference (or <op>, <op>_triton)
          ─ decompose ──────▶ ExportedProgram: plain ATen, each fused layer a torch scan
          ─ torch.onnx ─────▶ ONNX: each layer one ``Scan`` whose body is one step

A fused op runs one layer over a whole sequence (ops/registration.py). Its translation — one
per cell, built from the cell's registry entry by :func:`layer_translation` and kept in
:data:`TRANSLATIONS` under the op's name — is the scan (``torch._higher_order_ops.scan``) of
the cell's reference step over T:

    (h_t, c_t) = step(x_t, h_{t−1}, c_{t−1}),   output[t] = h_t,   (h_n, c_n) = (h_T, c_T)

which is :func:`convlstm_fast.reference.cells.layer` with its Python loop made a graph loop. The
step is the oracle itself (``spec.step``), so the ONNX graph computes exactly the reference's
math — hard_sigmoid as Where(x < −2.5, 0, Where(x > 2.5, 1, 0.2·x + 0.5)) with NaN kept, c/d's
attention exp(Z − max_HW Z), b's softmax over H·W — and nothing is written twice. A Python
loop in the translation would unroll for the traced T and fix it; the scan becomes one ONNX
``Scan`` whose trip count is the input's T at run time. That needs a torch whose
``run_decompositions`` traces the scan and whose ONNX exporter translates it
(:data:`MIN_SCAN_TORCH`; :func:`scan_unavailable_reason` says when this one cannot).

A cell with no entry in :data:`TRANSLATIONS` (a user-registered cell: it has no fused op, and
its reference loop over T would unroll) is refused with an error naming it. A user cell with a
fused op of its own is translated once its op is added:
``TRANSLATIONS[spec.op] = layer_translation(spec)``.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from typing import Callable, Sequence

import torch
from torch import nn

from .backends import resolve_backend
from .modules import ConvLSTM, ConvLSTMCell
from .registry import BUILTIN, GATE_ACTIVATIONS, CellSpec, cell_names, get_cell

# What a deployment needs beside torch: the ``[export]`` extra of pyproject.toml.
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'convlstm-fast[export]'"

# The op variants a translation replaces: the autograd op, the native inference twin, Triton's.
OP_SUFFIXES = ("", "_inference", "_triton")

# The oldest torch tested to decompose into torch.ops.higher_order.scan and to translate that
# to an ONNX Scan (2.11, 2.14.1 and 2.15 do; 2.6 does neither: its run_decompositions rejects
# the scan's subgraph and its ONNX exporter has no translation for it).
MIN_SCAN_TORCH = (2, 11)


def layer_translation(spec: CellSpec) -> Callable:
    """The translation of ``spec``'s fused op: ``(x [T, B, Cin, H, W], h0 [B, C, H, W], c0,
    params (op order), gate_activation: int, reverse: bool, lengths: Tensor | None) ->
    (output [T, B, C, H, W], h_n, c_n)``, the scan over T of the reference step ``spec.step``
    (walking t = T − 1 … 0 with ``reverse``, an ONNX Scan whose directions are reversed); with
    ``lengths`` the scan also walks each step's [B] mask of the samples it counts for."""

    def translation(x, h0, c0, params, gate_activation, reverse=False, lengths=None):
        from torch._higher_order_ops.scan import scan

        named = dict(zip(spec.parameter_names, params))
        activation = GATE_ACTIVATIONS[gate_activation]

        def step(carry, x_t):
            h, c = spec.step(x_t, *carry, named, activation)
            # The scan wants the carry laid out as it came in (d's h_t = o∘tanh(C_t) inherits
            # the strides of the attention map) and outputs that alias no carry.
            h, c = h.contiguous(), c.contiguous()
            return (h, c), h.clone()

        def masked_step(carry, inputs):
            x_t, counts = inputs
            h_prev, c_prev = carry
            h, c = spec.step(x_t, h_prev, c_prev, named, activation)
            counts = counts.view(-1, 1, 1, 1)
            output = torch.where(counts, h, 0.0)
            return (torch.where(counts, h, h_prev).contiguous(),
                    torch.where(counts, c, c_prev).contiguous()), output

        if lengths is None:
            (h_n, c_n), output = scan(step, (h0, c0), x, reverse=reverse)
        else:
            times = torch.arange(x.shape[0], device=lengths.device)
            counts = times.unsqueeze(1) < lengths.unsqueeze(0)
            (h_n, c_n), output = scan(masked_step, (h0, c0), (x, counts), reverse=reverse)
        return output, h_n, c_n

    translation.__name__ = f"{spec.op}_translation"
    return translation


# One translation per built-in cell, keyed by its fused op's name (registry ``CellSpec.op``).
TRANSLATIONS: dict[str, Callable] = {
    get_cell(name).op: layer_translation(get_cell(name)) for name in BUILTIN}


def decompositions() -> dict:
    """``{OpOverload: translation}`` for every registered variant of every translated op."""
    table = {}
    for spec in map(get_cell, cell_names()):
        if spec.op not in TRANSLATIONS:
            continue
        for suffix in OP_SUFFIXES:
            if hasattr(torch.ops.convlstm_fast, spec.op + suffix):
                overload = getattr(torch.ops.convlstm_fast, spec.op + suffix).default
                table[overload] = _translate_op(spec, suffix)
    return table


def _translate_op(spec: CellSpec, suffix: str) -> Callable:
    """The translation of ``convlstm_fast::<op><suffix>``. The autograd op and Triton's also
    return ``saved``: empty tensors of the shapes the kernel declares (the registry's ``saved``,
    in the layout of the kernel that would have run), which an inference graph never reads."""
    translation = TRANSLATIONS[spec.op]
    if suffix == "_inference":
        return translation

    def with_saved(x, h0, c0, params, gate_activation, reverse=False, lengths=None):
        kernel = "triton" if suffix == "_triton" else x.device.type
        saved_spec = spec.saved_spec(kernel if kernel in spec.kernels else "cuda")
        saved = [x.new_empty(shape, dtype=dtype) for shape, dtype in saved_spec(x, h0, params)]
        return (*translation(x, h0, c0, params, gate_activation, reverse, lengths), saved)

    return with_saved


def _cells(model: nn.Module) -> list[tuple[str, ConvLSTMCell]]:
    return [(name or "model", module) for name, module in model.named_modules()
            if isinstance(module, ConvLSTMCell)]


def check_exportable(model: nn.Module, dynamic_steps: bool, onnx: bool) -> None:
    """Raise a ValueError naming the first ConvLSTM layer of ``model`` that cannot be exported:
    for ONNX, a cell without a translation; with ``dynamic_steps``, a layer that runs on the
    reference backend (its Python loop over T unrolls for the traced T). A bidirectional layer's
    reverse direction is one fused op with ``reverse=True``, so T and B stay dynamic there too."""
    for name, cell in _cells(model):
        spec = get_cell(cell.variant)
        if onnx and spec.op not in TRANSLATIONS:
            what = "no fused op" if spec.op is None else f"the fused op {spec.op!r}"
            raise ValueError(
                f"{name}: cell {cell.variant!r} has no ONNX translation: it has {what}, and "
                f"convlstm_fast.export.TRANSLATIONS translates the fused ops "
                f"{sorted(TRANSLATIONS)}")
        if not dynamic_steps:
            continue
        reference = next(cell.parameters())
        backend = resolve_backend(cell.backend, cell.variant, str(reference.device),
                                  reference.dtype)
        if backend == "reference":
            raise ValueError(
                f"{name}: cell {cell.variant!r} runs on the reference backend here, whose Python "
                "loop over the steps unrolls for the traced T, so T cannot be dynamic: build the "
                "model with a fused backend (backend='auto' with the compiled extension, or "
                "'cpu'), or pass dynamic_steps=False")


def _input_dims(model: nn.Module) -> tuple[int, int | None]:
    """``(batch dim, steps dim)`` of the model's first input: GestureNet ``[B, C, T, S, S]``,
    ConvLSTM ``[B, T, ...]`` (``[T, B, ...]`` unless batch_first), ConvLSTMCell ``[B, Cin, H,
    W]`` (no T), anything else ``[B, T, ...]``."""
    from .models import GestureNet

    if isinstance(model, GestureNet):
        return 0, 2
    if isinstance(model, ConvLSTM):
        return (0, 1) if model.batch_first else (1, 0)
    if isinstance(model, ConvLSTMCell):
        return 0, None
    return 0, 1


def dynamic_shapes_for(model: nn.Module, example_inputs: Sequence, dynamic_batch: bool = True,
                       dynamic_steps: bool = True, steps_dim: int | None = None,
                       names: bool = False) -> tuple:
    """torch.export's ``dynamic_shapes`` that make the batch and steps dims of the first input
    dynamic, and the batch dim of any later input that is a ``[B]`` integer tensor (the lengths
    of a ragged batch; the other inputs static), as ``Dim.DYNAMIC`` (torch.export infers the
    range: e.g. GestureNet's T' = ceil(T / 2) must stay ≥ 2); ``names=True`` gives the axis
    names "batch" and "steps" instead, which torch.onnx uses for the ONNX input. torch.export
    specialises sizes 0 and 1, so a dynamic dim needs an example size ≥ 2."""
    batch_dim, default_steps = _input_dims(model)
    steps_dim = default_steps if steps_dim is None else steps_dim
    first = example_inputs[0]
    dims = {}
    for wanted, dim, label in ((dynamic_batch, batch_dim, "batch"),
                               (dynamic_steps, steps_dim, "steps")):
        if not wanted or dim is None:
            continue
        if first.shape[dim] < 2:
            raise ValueError(
                f"a dynamic {label} needs an example input with size ≥ 2 in dim {dim} (torch."
                f"export specialises sizes 0 and 1), got shape {tuple(first.shape)}")
        dims[dim] = label if names else torch.export.Dim.DYNAMIC
    rest = []
    for tensor in example_inputs[1:]:
        per_sample = (dynamic_batch and isinstance(tensor, torch.Tensor) and tensor.dim() == 1
                      and not tensor.is_floating_point()
                      and tensor.shape[0] == first.shape[batch_dim])
        rest.append({0: "batch" if names else torch.export.Dim.DYNAMIC} if per_sample else None)
    return (dims or None, *rest)


def export_program(model: nn.Module, example_inputs: Sequence, *, dynamic_batch: bool = True,
                   dynamic_steps: bool = True, steps_dim: int | None = None,
                   dynamic_shapes=None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` for inference (under ``torch.no_grad()``): the fused layers
    stay the ops ``convlstm_fast::<op>_inference`` (native backends) or ``<op>_triton``, which
    load and run wherever convlstm_fast is imported; the reference backend gives plain ATen.

    Args:
        model: any module; its ConvLSTM layers are checked by :func:`check_exportable`.
        example_inputs: the positional inputs of one call, e.g. ``(x,)``.
        dynamic_batch, dynamic_steps: make the first input's batch / steps dim dynamic
            (:func:`dynamic_shapes_for`; the example needs size ≥ 2 there).
        steps_dim: the first input's T dim, when the default (GestureNet 2, ConvLSTM 1 or 0,
            otherwise 1) does not fit.
        dynamic_shapes: torch.export's own argument, replacing the three above.
    """
    example_inputs = tuple(example_inputs)
    check_exportable(model, dynamic_steps and dynamic_shapes is None, onnx=False)
    if dynamic_shapes is None:
        dynamic_shapes = dynamic_shapes_for(model, example_inputs, dynamic_batch, dynamic_steps,
                                            steps_dim)
    with torch.no_grad():
        return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)


def scan_unavailable_reason() -> str | None:
    """``None`` when this torch can :func:`decompose` the fused ops into scans and export those
    to ONNX, else why not."""
    if torch.__version__ >= MIN_SCAN_TORCH:
        return None
    version = ".".join(map(str, MIN_SCAN_TORCH))
    return (f"the loop over T as a torch.ops.higher_order.scan (decompose) and as an ONNX Scan "
            f"(export_onnx) needs torch >= {version}; this is torch {torch.__version__}")


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every translated fused op replaced by its translation (a scan of the
    reference step): plain ATen and ``torch.ops.higher_order.scan``, other ops untouched.
    Raises a RuntimeError on a torch older than :data:`MIN_SCAN_TORCH`."""
    reason = scan_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    with torch.no_grad():
        return program.run_decompositions(decompositions())


def onnx_unavailable_reason() -> str | None:
    """``None`` when this environment can export ONNX, else what is missing: a torch that can
    (:func:`scan_unavailable_reason`), or the packages of the ``[export]`` extra."""
    reason = scan_unavailable_reason()
    if reason is not None:
        return f"ONNX export: {reason}"
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}"
    return None


def onnx_op_types(model) -> Counter:
    """How many nodes of each ``(domain, op_type)`` an ONNX ``ModelProto`` holds: in its graph,
    in the subgraphs of its control-flow nodes (Scan, Loop, If) and in its local functions."""
    import onnx

    found = Counter()

    def walk(nodes):
        for node in nodes:
            found[(node.domain, node.op_type)] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g.node)
                for graph in attribute.graphs:
                    walk(graph.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return found


STANDARD_DOMAINS = ("", "ai.onnx")


def export_onnx(model: nn.Module, example_inputs: Sequence,
                path: str | os.PathLike | None = None, *, dynamic_batch: bool = True,
                dynamic_steps: bool = True, steps_dim: int | None = None, dynamic_shapes=None,
                opset_version: int | None = None):
    """Export ``model`` to ONNX with standard ops only: each fused ConvLSTM layer becomes an
    ONNX ``Scan`` over T whose body is the reference step (:func:`layer_translation`).

    Args:
        model: put it in ``eval()`` first (dropout, batch norm); its ConvLSTM layers must run
            on a fused backend for a dynamic T (:func:`check_exportable`).
        example_inputs: the positional inputs of one call, e.g. ``(x,)``; with the defaults the
            first one's batch and steps dims must be ≥ 2.
        path: where to write the ``.onnx`` file (weights inside); ``None`` writes nothing.
        dynamic_batch, dynamic_steps, steps_dim, dynamic_shapes: as :func:`export_program`.
        opset_version: torch.onnx's default when ``None``.

    Returns:
        The ``torch.onnx.ONNXProgram``; its ``model_proto`` holds only standard-domain ops,
        and it names its inputs after ``model.forward``'s parameters (``x``).
    """
    check_exportable(model, dynamic_steps and dynamic_shapes is None, onnx=True)
    reason = onnx_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    program = decompose(export_program(
        model, example_inputs, dynamic_batch=dynamic_batch, dynamic_steps=dynamic_steps,
        steps_dim=steps_dim, dynamic_shapes=dynamic_shapes))
    # The program fixes the dynamic dims; these names only label the ONNX input's axes.
    axis_names = None if dynamic_shapes is not None else dynamic_shapes_for(
        model, example_inputs, dynamic_batch, dynamic_steps, steps_dim, names=True)
    with torch.no_grad():
        onnx_program = torch.onnx.export(program, tuple(example_inputs), dynamo=True,
                                         dynamic_shapes=axis_names, opset_version=opset_version,
                                         verbose=False)
    # torch.onnx leaves copies of the constants of an inlined Scan body that no node reads;
    # onnxruntime would warn about each one.
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(onnx_program.model)
    custom = sorted({f"{domain}::{op}" for domain, op in onnx_op_types(onnx_program.model_proto)
                     if domain not in STANDARD_DOMAINS})
    if custom:
        raise RuntimeError(f"the ONNX graph holds non-standard ops {custom}")
    if path is not None:
        onnx_program.save(os.fspath(path))
    return onnx_program
