"""convlstm_fast: fused ConvLSTM cells of "Attention in Convolutional LSTM for Gesture
Recognition" (Zhang et al., NeurIPS 2018) for PyTorch.

Public API: :class:`ConvLSTMCell`, :class:`ConvLSTM`, :func:`convlstm_layer`,
:func:`count_parameters`, :func:`count_mult_adds`, :func:`from_concat_conv`.
"""

from ._extension import load_extension
from .convert import from_concat_conv
from .counting import count_mult_adds, count_parameters, paper_mult_adds
from .functional import convlstm_layer
from .modules import ConvLSTM, ConvLSTMCell
from .variants import VARIANTS

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "ConvLSTM",
    "ConvLSTMCell",
    "convlstm_layer",
    "count_mult_adds",
    "count_parameters",
    "from_concat_conv",
    "load_extension",
    "paper_mult_adds",
]
