"""The pure-PyTorch reference cells: the oracle every backend is tested against."""

from .cells import (
    channel_attention,
    gate_activation_fn,
    global_average_pool,
    hard_sigmoid,
    layer,
    sepconv,
    spatial_attention,
    step,
)

__all__ = [
    "channel_attention",
    "gate_activation_fn",
    "global_average_pool",
    "hard_sigmoid",
    "layer",
    "sepconv",
    "spatial_attention",
    "step",
]
