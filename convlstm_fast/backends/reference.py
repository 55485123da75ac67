"""The reference backend: the pure-PyTorch cells of ``convlstm_fast.reference`` in a time loop.

Runs on any device and dtype that PyTorch supports; autograd is PyTorch's own.
"""

from __future__ import annotations

from ..registry import get_cell
from ..reference import cells
from . import Backend


class ReferenceBackend(Backend):
    name = "reference"
    lengths_in_op = True

    def run_layer(self, variant, x, h0, c0, params, gate_activation, reverse=False,
                  lengths=None):
        named = dict(zip(get_cell(variant).parameter_names, params))
        return cells.layer(variant, x, h0, c0, named, gate_activation, reverse=reverse,
                           lengths=lengths)


BACKENDS = {"reference": ReferenceBackend()}
