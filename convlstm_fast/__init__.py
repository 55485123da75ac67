"""convlstm_fast: fused ConvLSTM cells of "Attention in Convolutional LSTM for Gesture
Recognition" (Zhang et al., NeurIPS 2018) for PyTorch.

Public API: :class:`ConvLSTMCell`, :class:`ConvLSTM`, :func:`convlstm_layer`,
:func:`count_parameters`, :func:`count_mult_adds`, :func:`from_concat_conv`, and the registry of
cells: :class:`CellSpec`, :class:`Parameter`, :class:`Gates`, :func:`register_cell`,
:func:`get_cell`, :func:`cell_names` (``VARIANTS`` holds the paper's five). Deployment:
:mod:`convlstm_fast.export` (torch.export, ONNX); replay as CUDA graphs:
:mod:`convlstm_fast.graphs` (both imported on demand).
"""

from ._extension import load_extension
from .convert import from_concat_conv
from .counting import count_mult_adds, count_parameters, paper_mult_adds
from .functional import convlstm_layer
from .modules import ConvLSTM, ConvLSTMCell
from .registry import (BUILTIN as VARIANTS, CellSpec, Gates, Parameter, cell_names, get_cell,
                       register_cell, unregister_cell)

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CellSpec",
    "ConvLSTM",
    "ConvLSTMCell",
    "Gates",
    "Parameter",
    "cell_names",
    "convlstm_layer",
    "count_mult_adds",
    "count_parameters",
    "from_concat_conv",
    "get_cell",
    "load_extension",
    "paper_mult_adds",
    "register_cell",
    "unregister_cell",
]
