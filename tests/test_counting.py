"""Parameter and Mult-Add counts against the paper's Table 1 (SPEC "Table 1").

The 256-channel cells are built on the "meta" device: FlopCounterMode counts shapes, so nothing
is computed and the Table 1 cases take milliseconds.
"""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import (ConvLSTM, ConvLSTMCell, count_mult_adds, count_parameters,
                           paper_mult_adds)
from convlstm_fast import VARIANTS

# SPEC Table 1 (Cin = Cout = 256, K = 3, 28×28): exact weights, the paper's Mult-Adds (M) and the
# true multiply-accumulates of one step for one sample (M, one decimal).
TABLE_1 = {
    "convlstm": (4_718_592, 3700, 3699.4),
    "a": (528_896, 415, 106.8),
    "b": (666_880, 522, 214.9),
    "c": (601_344, 472, 266.2),
    "d": (601_344, 472, 266.2),
}


def _meta_cell(variant, channels=256, **kwargs):
    with torch.device("meta"):
        return ConvLSTMCell(channels, channels, 3, variant, backend="reference", **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_1_weights(variant):
    weights, _, _ = TABLE_1[variant]
    assert count_parameters(_meta_cell(variant), include_bias=False) == weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_1_paper_mult_adds(variant):
    _, paper_millions, _ = TABLE_1[variant]
    assert abs(paper_mult_adds(_meta_cell(variant), 28, 28) - paper_millions * 1e6) <= 1e6


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_1_true_mult_adds_of_one_step(variant):
    _, _, true_millions = TABLE_1[variant]
    cell = _meta_cell(variant)
    macs = count_mult_adds(cell, torch.empty(1, 256, 28, 28, device="meta"))
    assert abs(macs / 1e6 - true_millions) <= 0.05  # equal to 0.1M (the table's rounding)


@pytest.mark.parametrize("variant", VARIANTS)
def test_biases_are_counted_only_with_include_bias(variant):
    # SPEC "Parameters": biases are 4C (convlstm); gate n·C + candidate C (+ attention C for b-d).
    c = 8
    cell = ConvLSTMCell(5, c, 3, variant)
    biases = {"convlstm": 4 * c, "a": 4 * c, "b": 5 * c, "c": 4 * c, "d": 4 * c}[variant]
    assert count_parameters(cell) - count_parameters(cell, include_bias=False) == biases
    without = ConvLSTMCell(5, c, 3, variant, bias=False)
    assert count_parameters(without) == count_parameters(cell, include_bias=False)


def test_cell_weights_match_the_papers_equations():
    # eqs. 7, 16, 20, 24 with Cin ≠ Cout and K = 5.
    cin, c, k = 6, 10, 5
    k2 = k * k
    param_a = (k2 + 4 * c) * (cin + c)
    expected = {
        "convlstm": k2 * (cin + c) * c * 4,
        "a": param_a,
        "b": param_a + k2 * (cin + 2 * c) + (cin + c) * c,
        "c": param_a + k2 * (cin + 2 * c) + c * c,
        "d": param_a + k2 * (cin + 2 * c) + c * c,
    }
    for variant, weights in expected.items():
        assert count_parameters(ConvLSTMCell(cin, c, k, variant), include_bias=False) == weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_mult_adds_scale_linearly_with_steps_and_batch(variant):
    with torch.device("meta"):
        model = ConvLSTM(4, [6, 5], 3, num_layers=2, variant=variant, backend="reference")
    one = count_mult_adds(model, torch.empty(1, 1, 4, 7, 9, device="meta"))
    many = count_mult_adds(model, torch.empty(3, 5, 4, 7, 9, device="meta"))
    assert one > 0
    assert many == 3 * 5 * one
    # The stack costs its two cells' steps.
    first = count_mult_adds(model.cells[0], torch.empty(1, 4, 7, 9, device="meta"))
    second = count_mult_adds(model.cells[1], torch.empty(1, 6, 7, 9, device="meta"))
    assert one == first + second


def test_mult_adds_on_cpu_tensors_equal_meta():
    torch.manual_seed(0)
    cell = ConvLSTMCell(4, 6, 3, "c", backend="reference")
    with torch.device("meta"):
        meta_cell = ConvLSTMCell(4, 6, 3, "c", backend="reference")
    x = torch.randn(2, 4, 7, 9)
    assert count_mult_adds(cell, x) == count_mult_adds(meta_cell, x.to("meta"))
