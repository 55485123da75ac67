"""The C++ description of the native cells (csrc/cells.h) against the registry's.

csrc/cells.h declares, per native op, what the kernels of both backends index by name: the
parameters (names, op order, shapes as functions of Cin, C, K), the gate slots, and what the CPU
and the CUDA kernel save for backward (shapes per layout); csrc/convlstm_fast.cpp declares the
op schemas from its list of cells. Python cannot read the header, so the compiled extension
evaluates it for us (``convlstm_fast::cell_layout``) and this file holds it equal to
convlstm_fast/registry.py for every registered cell whose spec names a cpu or cuda kernel. A
parameter reordered, renamed or reshaped on one side only fails here.
"""

from __future__ import annotations

import pytest
import torch

import convlstm_fast
from convlstm_fast import _extension, cell_names, get_cell
from convlstm_fast.ops import registration

pytestmark = pytest.mark.skipif(
    not _extension.extension_built(), reason="the compiled extension convlstm_fast._C is not built"
)

NATIVE_BACKENDS = ("cpu", "cuda")
NATIVE_CELLS = [name for name in cell_names()
                if any(backend in get_cell(name).kernels for backend in NATIVE_BACKENDS)]
# (Cin, C, K): Cin ≠ C, K ∈ {1, 3, 5}, one channel.
SIZES = [(3, 5, 3), (1, 1, 1), (16, 7, 5)]
# (T, B, H, W), H ≠ W.
SEQUENCE = (2, 3, 4, 6)


@pytest.fixture(scope="module")
def ops():
    convlstm_fast.load_extension()
    return torch.ops.convlstm_fast


def _layout(ops, spec, in_channels, hidden_channels, kernel_size):
    """(parameter names, parameter shapes, gates, {backend: saved shapes}) of cells.h."""
    names, shapes, gates, saved_cpu, saved_cuda = ops.cell_layout(
        spec.op, in_channels, hidden_channels, kernel_size, *SEQUENCE)
    return names, shapes, gates, {"cpu": saved_cpu, "cuda": saved_cuda}


def test_the_native_ops_are_the_registry_cells(ops):
    """csrc/convlstm_fast.cpp declares one op triple per cell of csrc/cells.h: exactly the ops of
    the registry's cells with a native kernel."""
    declared = {name[len("convlstm_fast::"):-len("_inference")]
                for name in torch._C._dispatch_get_all_op_names()
                if name.startswith("convlstm_fast::") and name.endswith("_inference")}
    assert declared == {get_cell(name).op for name in NATIVE_CELLS}


@pytest.mark.parametrize("variant", NATIVE_CELLS)
def test_schemas_match_the_python_contract(ops, variant):
    name = get_cell(variant).op
    for suffix, schema in (("", registration.LAYER_SCHEMA),
                           ("_backward", registration.BACKWARD_SCHEMA),
                           (registration.INFERENCE_SUFFIX, registration.INFERENCE_SCHEMA)):
        declared = getattr(ops, name + suffix).default._schema
        assert str(declared) == f"convlstm_fast::{name}{suffix}{schema}"


@pytest.mark.parametrize("variant", NATIVE_CELLS)
def test_parameters_follow_the_registry(ops, variant):
    spec = get_cell(variant)
    for sizes in SIZES:
        names, shapes, _, _ = _layout(ops, spec, *sizes)
        assert tuple(names) == spec.parameter_names, "parameter names or op order differ"
        want = {name: list(shape) for name, shape in spec.parameter_shapes(*sizes).items()}
        assert dict(zip(names, shapes)) == want, f"parameter shapes differ at (Cin, C, K) = {sizes}"


@pytest.mark.parametrize("variant", NATIVE_CELLS)
def test_gates_follow_the_registry(ops, variant):
    spec = get_cell(variant)
    _, _, gates, _ = _layout(ops, spec, *SIZES[0])
    assert tuple(gates) == spec.gates.order


def _saved_spec_shapes(spec, backend, in_channels, hidden_channels, kernel_size):
    """The shapes the registry's ``saved`` gives the kernel of ``backend``."""
    steps, batch, height, width = SEQUENCE
    x = torch.empty(steps, batch, in_channels, height, width, device="meta")
    h0 = torch.empty(batch, hidden_channels, height, width, device="meta")
    params = [torch.empty(shape, device="meta")
              for shape in spec.parameter_shapes(in_channels, hidden_channels,
                                                 kernel_size).values()]
    return [list(shape) for shape, _ in spec.saved_spec(backend)(x, h0, params)]


@pytest.mark.parametrize("variant", NATIVE_CELLS)
def test_saved_follows_the_registry(ops, variant):
    spec = get_cell(variant)
    for sizes in SIZES:
        _, _, _, saved = _layout(ops, spec, *sizes)
        for backend in NATIVE_BACKENDS:
            if backend in spec.kernels:
                assert saved[backend] == _saved_spec_shapes(spec, backend, *sizes), (
                    f"what the {backend} kernel saves differs at (Cin, C, K) = {sizes}")


@pytest.mark.parametrize("variant", [v for v in NATIVE_CELLS if "cpu" in get_cell(v).kernels])
def test_cpu_kernel_saves_what_the_registry_says(ops, variant):
    """The kernel itself, not only the header: the forward's ``saved`` against the registry."""
    spec = get_cell(variant)
    steps, batch, height, width = SEQUENCE
    cin, hidden, k = SIZES[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, cin, height, width, generator=generator)
    h0, c0 = (torch.randn(batch, hidden, height, width, generator=generator) for _ in range(2))
    params = [torch.randn(shape, generator=generator) * 0.3
              for shape in spec.parameter_shapes(cin, hidden, k).values()]
    _, _, _, saved = getattr(ops, spec.op)(x, h0, c0, params, 0)
    want = spec.saved_spec("cpu")(x, h0, params)
    assert [(tuple(s.shape), s.dtype) for s in saved] == [(tuple(s), d) for s, d in want]


def test_an_unknown_op_says_so(ops):
    with pytest.raises(RuntimeError, match="no native cell has the op not_a_layer"):
        ops.cell_layout("not_a_layer", 1, 1, 1, *SEQUENCE)
