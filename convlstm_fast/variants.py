"""The five cells of the paper: names, parameter layout and cost formulas (shared/SPEC.md).

Everything that depends on *which* cell is asked for but not on *how* it is computed lives here,
so that the reference path, every kernel backend, the modules and the benchmarks agree on one
parameter layout (SPEC "Parameters: one layout for every backend") and one op name per cell.
"""

from __future__ import annotations

VARIANTS = ("convlstm", "a", "b", "c", "d")

# One registered op per cell; the unit of an op is one layer over a whole sequence (KERNELS.md).
# Native ops are ``convlstm_fast::<name>``, Triton ops ``convlstm_fast::<name>_triton``, and each has
# a ``<name>_backward`` companion.
OP_NAMES = {
    "convlstm": "convlstm_layer",
    "a": "pooled_layer",
    "b": "spatial_attention_layer",
    "c": "input_attention_layer",
    "d": "output_attention_layer",
}

GATE_ACTIVATIONS = ("sigmoid", "hard_sigmoid")

DESCRIPTIONS = {
    "convlstm": "original ConvLSTM, full K×K gates (eqs. 1-6)",
    "a": "pooled-FC gates + depthwise-separable candidate (eqs. 8-15)",
    "b": "(a) on a spatially soft-attended input (eqs. 17-19)",
    "c": "(a) with the input gate as channel-wise max-normalised attention (eqs. 21-23)",
    "d": "(a) with the output gate as channel-wise max-normalised attention",
}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def check_gate_activation(gate_activation: str) -> str:
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(
            f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}"
        )
    return gate_activation


def check_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd integer ('same' padding K // 2), got {kernel_size}"
        )
    return kernel_size


def num_pooled_gates(variant: str) -> int:
    """How many gates come from the pooled FC: 3 (i, f, o) for a/b, 2 for c/d, 0 for convlstm."""
    return {"convlstm": 0, "a": 3, "b": 3, "c": 2, "d": 2}[check_variant(variant)]


def parameter_shapes(
    variant: str, in_channels: int, hidden_channels: int, kernel_size: int
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a cell's parameters, in the canonical order every op takes them.

    SPEC "Parameters": pointwise weights are ``[out, in]`` matrices, depthwise weights
    ``[channels, 1, K, K]``; the parameters whose names end in ``bias`` are the biases.
    """
    check_variant(variant)
    k, cin, c = kernel_size, in_channels, hidden_channels
    if variant == "convlstm":
        return {
            "weight_x": (4 * c, cin, k, k),
            "weight_h": (4 * c, c, k, k),
            "bias": (4 * c,),
        }
    n = num_pooled_gates(variant)
    shapes = {
        "gate_weight_x": (n * c, cin),
        "gate_weight_h": (n * c, c),
        "gate_bias": (n * c,),
        "cand_dw_x": (cin, 1, k, k),
        "cand_pw_x": (c, cin),
        "cand_dw_h": (c, 1, k, k),
        "cand_pw_h": (c, c),
        "cand_bias": (c,),
    }
    if variant in ("b", "c", "d"):
        shapes.update(
            {
                "att_dw_x": (cin, 1, k, k),
                "att_pw_x": (c, cin),
                "att_dw_h": (c, 1, k, k),
                "att_pw_h": (c, c),
                "att_bias": (c,),
            }
        )
    if variant == "b":
        shapes["att_weight_z"] = (1, c, k, k)
    elif variant in ("c", "d"):
        shapes["att_dw_z"] = (c, 1, k, k)
        shapes["att_pw_z"] = (c, c)
    return shapes


def parameter_names(variant: str) -> tuple[str, ...]:
    return tuple(parameter_shapes(variant, 1, 1, 1))


def is_bias(name: str) -> bool:
    return name.endswith("bias")


def weight_count(variant: str, in_channels: int, hidden_channels: int, kernel_size: int) -> int:
    """Weights without biases: the paper's Params column (eqs. 7, 16, 20, 24)."""
    total = 0
    for name, shape in parameter_shapes(variant, in_channels, hidden_channels, kernel_size).items():
        if not is_bias(name):
            size = 1
            for s in shape:
                size *= s
            total += size
    return total


def step_mult_adds(
    variant: str, in_channels: int, hidden_channels: int, kernel_size: int, height: int, width: int
) -> int:
    """True multiply-accumulates of one recurrent step for one sample (SPEC Table 1, last column).

    Counts the convolutions and the pooled FC products, as torch's FlopCounterMode does for the
    reference path (pooling, activations and element-wise products are not counted).
    """
    k2, cin, c, hw = kernel_size * kernel_size, in_channels, hidden_channels, height * width
    if check_variant(variant) == "convlstm":
        return k2 * (cin + c) * 4 * c * hw

    def sepconv(channels_in: int, channels_out: int) -> int:
        return (k2 * channels_in + channels_in * channels_out) * hw

    macs = num_pooled_gates(variant) * c * (cin + c) + sepconv(cin, c) + sepconv(c, c)
    if variant in ("b", "c", "d"):
        macs += sepconv(cin, c) + sepconv(c, c)
    if variant == "b":
        macs += k2 * c * hw
    elif variant in ("c", "d"):
        macs += sepconv(c, c)
    return macs
