"""from_concat_conv: weights of the usual single-kernel PyTorch ConvLSTM (SPEC "API notes")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convlstm_fast import ConvLSTMCell, from_concat_conv

B, CIN, C, H, W, K = 2, 3, 4, 5, 6, 3


def _concat_conv_step(x, h, c, weight, bias, gate_order):
    """The common PyTorch ConvLSTM: one conv over cat([x, h]), the 4C outputs split in
    ``gate_order``; i, f, o sigmoid, g tanh; c' = f·c + i·g, h' = o·tanh(c')."""
    z = F.conv2d(torch.cat([x, h], dim=1), weight, bias, padding=K // 2)
    gates = dict(zip(gate_order, z.chunk(4, dim=1)))
    i, f, o = (torch.sigmoid(gates[name]) for name in "ifo")
    c_next = f * c + i * torch.tanh(gates["g"])
    return o * torch.tanh(c_next), c_next


def _random(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gate_order", ["ifog", "ifgo", "gofi"])
def test_converted_weights_reproduce_the_concat_conv_cell(gate_order, with_bias):
    weight = _random(4 * C, CIN + C, K, K, seed=1) * 0.3
    bias = _random(4 * C, seed=2) if with_bias else None
    x, h, c = _random(B, CIN, H, W, seed=3), _random(B, C, H, W, seed=4), _random(B, C, H, W, seed=5)
    state = (h, c)
    cell = ConvLSTMCell(CIN, C, K, "convlstm", backend="reference").double()
    cell.load_state_dict(from_concat_conv(weight, bias, CIN, gate_order))
    expected_state = (h, c)
    for _ in range(2):  # two steps, so the recurrent half of the kernel matters
        expected_state = _concat_conv_step(x, *expected_state, weight, bias, gate_order)
        state = cell(x, state)
    torch.testing.assert_close(state, expected_state, rtol=1e-13, atol=1e-13)


def test_default_gate_order_is_ifog():
    weight = _random(4 * C, CIN + C, K, K, seed=6)
    bias = _random(4 * C, seed=7)
    default = from_concat_conv(weight, bias, CIN)
    explicit = from_concat_conv(weight, bias, CIN, "ifog")
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    # i, f, g, o layout: the g block is the concat kernel's third block when it is "ifog"'s fourth.
    torch.testing.assert_close(default["weight_x"][2 * C:3 * C], weight[3 * C:, :CIN], rtol=0,
                               atol=0)
    torch.testing.assert_close(default["weight_h"][3 * C:], weight[2 * C:3 * C, CIN:], rtol=0,
                               atol=0)


def test_outputs_do_not_alias_the_input_kernel():
    weight = _random(4 * C, CIN + C, K, K, seed=8)
    converted = from_concat_conv(weight, None, CIN, "ifgo")
    weight.add_(1.0)
    assert not torch.equal(converted["weight_x"], weight[:, :CIN])
    assert converted["weight_x"].is_contiguous() and converted["weight_h"].is_contiguous()
    assert not converted["bias"].any()


@pytest.mark.parametrize("name, args", [
    ("weight", (torch.zeros(4 * C, CIN + C, K), None, CIN)),  # 3-D
    ("weight", ([[0.0]], None, CIN)),  # not a tensor
    ("weight", (torch.zeros(4 * C + 1, CIN + C, K, K), None, CIN)),  # first dim not 4·C
    ("weight", (torch.zeros(4 * C, CIN + C, K, K), None, CIN + 1)),  # second dim ≠ Cin + C
    ("bias", (torch.zeros(4 * C, CIN + C, K, K), torch.zeros(C), CIN)),
    ("gate_order", (torch.zeros(4 * C, CIN + C, K, K), None, CIN, "ifgg")),
    ("gate_order", (torch.zeros(4 * C, CIN + C, K, K), None, CIN, "ifg")),
])
def test_bad_arguments_raise(name, args):
    with pytest.raises(ValueError, match=name):
        from_concat_conv(*args)
