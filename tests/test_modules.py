"""ConvLSTMCell and ConvLSTM: state handling, layouts, state_dict and initialisation (SPEC)."""

from __future__ import annotations

import math

import pytest
import torch

from convlstm_fast import ConvLSTM, ConvLSTMCell, convlstm_layer
from convlstm_fast import VARIANTS

BATCH, CIN, HEIGHT, WIDTH, KERNEL = 2, 3, 5, 6, 3


def _sequence(batch, steps, channels, seed, batch_first=True):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, steps, channels, HEIGHT, WIDTH) if batch_first else \
        (steps, batch, channels, HEIGHT, WIDTH)
    return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1


def _model(variant, hidden_channels, num_layers, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ConvLSTM(CIN, hidden_channels, KERNEL, num_layers, variant, backend="reference",
                    **kwargs).double()


def _assert_states_close(actual, expected, **tolerance):
    for a, e in zip(actual, expected):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, **tolerance)
        else:
            assert isinstance(a, tuple) and len(a) == len(e)
            for a_layer, e_layer in zip(a, e):
                torch.testing.assert_close(a_layer, e_layer, **tolerance)


@pytest.mark.parametrize("hidden_channels", [4, [4, 5]], ids=["equal_C", "unequal_C"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_stateful_chunks_equal_one_call(variant, hidden_channels):
    model = _model(variant, hidden_channels, num_layers=2)
    x = _sequence(BATCH, 5, CIN, seed=1)
    output, state = model(x)
    first, state_2 = model(x[:, :2])
    second, state_5 = model(x[:, 2:], state_2)
    tolerance = {"rtol": 1e-13, "atol": 1e-13}
    torch.testing.assert_close(torch.cat([first, second], dim=1), output, **tolerance)
    _assert_states_close(state_5, state, **tolerance)
    h_n, c_n = state
    if isinstance(hidden_channels, int):
        # SPEC "API notes": equal C -> stacked [num_layers, B, C, H, W] as in nn.LSTM.
        assert h_n.shape == c_n.shape == (2, BATCH, hidden_channels, HEIGHT, WIDTH)
        torch.testing.assert_close(h_n[-1], output[:, -1], rtol=0, atol=0)
    else:
        # Different C -> tuples of per-layer [B, C_l, H, W].
        assert isinstance(h_n, tuple) and isinstance(c_n, tuple)
        assert [tuple(h.shape) for h in h_n] == [(BATCH, c, HEIGHT, WIDTH) for c in hidden_channels]
        assert [tuple(c.shape) for c in c_n] == [(BATCH, c, HEIGHT, WIDTH) for c in hidden_channels]
        torch.testing.assert_close(h_n[-1], output[:, -1], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_first_false_is_the_transpose(variant):
    batch_first = _model(variant, 4, num_layers=2, seed=2)
    time_first = _model(variant, 4, num_layers=2, seed=3, batch_first=False)
    time_first.load_state_dict(batch_first.state_dict())
    x = _sequence(BATCH, 3, CIN, seed=4)
    output, (h_n, c_n) = batch_first(x)
    output_t, (h_n_t, c_n_t) = time_first(x.transpose(0, 1))
    assert output.shape == (BATCH, 3, 4, HEIGHT, WIDTH)
    torch.testing.assert_close(output_t.transpose(0, 1), output, rtol=0, atol=0)
    torch.testing.assert_close((h_n_t, c_n_t), (h_n, c_n), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cell_step_by_step_equals_sequence(variant):
    torch.manual_seed(5)
    cell = ConvLSTMCell(CIN, 4, KERNEL, variant, backend="reference").double()
    model = _model(variant, 4, num_layers=1, seed=6)
    model.cells[0].load_state_dict(cell.state_dict())
    x = _sequence(BATCH, 3, CIN, seed=7)
    h0 = _sequence(BATCH, 1, 4, seed=8)[:, 0]
    c0 = _sequence(BATCH, 1, 4, seed=9)[:, 0]
    output, (h_n, c_n) = model(x, (h0[None], c0[None]))
    state, hs = (h0, c0), []
    for t in range(3):
        state = cell(x[:, t], state)
        hs.append(state[0])
    torch.testing.assert_close(torch.stack(hs, dim=1), output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close((state[0], state[1]), (h_n[0], c_n[0]), rtol=1e-14, atol=1e-14)
    # And forward_sequence / convlstm_layer on the cell's parameters agree with both.
    sequence, _ = cell.forward_sequence(x.transpose(0, 1), (h0, c0))
    direct, _ = convlstm_layer(x.transpose(0, 1), dict(cell.named_parameters()), variant,
                               (h0, c0), backend="reference")
    torch.testing.assert_close(sequence.transpose(0, 1), output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(direct, sequence, rtol=0, atol=0)


def _expected_parameters(variant, cin, c, k):
    """SPEC "Parameters" table, written out independently of the registry."""
    if variant == "convlstm":
        return {"weight_x": (4 * c, cin, k, k), "weight_h": (4 * c, c, k, k), "bias": (4 * c,)}
    n = 3 if variant in ("a", "b") else 2
    table = {
        "gate_weight_x": (n * c, cin), "gate_weight_h": (n * c, c), "gate_bias": (n * c,),
        "cand_dw_x": (cin, 1, k, k), "cand_pw_x": (c, cin), "cand_dw_h": (c, 1, k, k),
        "cand_pw_h": (c, c), "cand_bias": (c,),
    }
    if variant != "a":
        table.update({"att_dw_x": (cin, 1, k, k), "att_pw_x": (c, cin), "att_dw_h": (c, 1, k, k),
                      "att_pw_h": (c, c), "att_bias": (c,)})
    if variant == "b":
        table["att_weight_z"] = (1, c, k, k)
    elif variant in ("c", "d"):
        table.update({"att_dw_z": (c, 1, k, k), "att_pw_z": (c, c)})
    return table


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_names_and_shapes_follow_spec(variant):
    cell = ConvLSTMCell(3, 4, 5, variant)
    expected = _expected_parameters(variant, 3, 4, 5)
    assert {n: tuple(p.shape) for n, p in cell.state_dict().items()} == expected
    without_bias = ConvLSTMCell(3, 4, 5, variant, bias=False)
    assert {n: tuple(p.shape) for n, p in without_bias.state_dict().items()} == {
        n: s for n, s in expected.items() if not n.endswith("bias")
    }
    model = ConvLSTM(3, [4, 6], 5, num_layers=2, variant=variant)
    names = set(model.state_dict())
    assert names == {f"cells.0.{n}" for n in expected} | {
        f"cells.1.{n}" for n in _expected_parameters(variant, 4, 6, 5)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_bias_false_equals_zero_biases(variant):
    torch.manual_seed(10)
    with_bias = ConvLSTMCell(CIN, 4, KERNEL, variant, backend="reference").double()
    without_bias = ConvLSTMCell(CIN, 4, KERNEL, variant, bias=False, backend="reference").double()
    without_bias.load_state_dict({n: p for n, p in with_bias.state_dict().items()
                                  if not n.endswith("bias")})
    with torch.no_grad():
        for name, param in with_bias.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    x = _sequence(BATCH, 1, CIN, seed=11)[:, 0]
    torch.testing.assert_close(without_bias(x), with_bias(x), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_gives_the_same_output(variant):
    source = _model(variant, [4, 5], num_layers=2, seed=12)
    fresh = _model(variant, [4, 5], num_layers=2, seed=13)
    x = _sequence(BATCH, 2, CIN, seed=14)
    before, _ = fresh(x)
    fresh.load_state_dict(source.state_dict())
    expected, _ = source(x)
    after, _ = fresh(x)
    assert not torch.equal(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


FORGET_GATE = {"convlstm": ("bias", 1), "a": ("gate_bias", 1), "b": ("gate_bias", 1),
               "c": ("gate_bias", 0), "d": ("gate_bias", 1)}  # (parameter, block); SPEC gate orders


def _fan_in_he_normal(name, shape):
    # SPEC "Options": fan_in = K·K·in channels (Keras counts a depthwise kernel's input channels).
    if len(shape) == 2:
        return shape[1]
    k2 = shape[2] * shape[3]
    return k2 * (shape[0] if "_dw_" in name else shape[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_init(variant):
    torch.manual_seed(15)
    c = 48
    cell = ConvLSTMCell(48, c, KERNEL, variant, init="reference")
    forget_name, forget_block = FORGET_GATE[variant]
    for name, param in cell.named_parameters():
        if name.startswith("gate_weight"):
            assert (param == 1.0 / c).all(), name  # pooled FC weights constant 1/C
        elif name.endswith("bias"):
            expected = torch.zeros_like(param)
            if variant == "convlstm" and name == forget_name:
                expected[forget_block * c:(forget_block + 1) * c] = 1.0
            torch.testing.assert_close(param, expected, rtol=0, atol=0, msg=name)
        else:
            sigma = math.sqrt(2.0 / _fan_in_he_normal(name, tuple(param.shape)))
            assert param.abs().max().item() <= 2 * sigma, name  # truncated at 2σ
            # A normal truncated at ±2σ has std ≈ 0.88σ; the smallest tensor here has 432 values.
            assert abs(param.std().item() - 0.88 * sigma) <= 0.2 * 0.88 * sigma, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_init_forget_bias_one(variant):
    cell = ConvLSTMCell(CIN, 4, KERNEL, variant)
    forget_name, forget_block = FORGET_GATE[variant]
    for name, param in cell.named_parameters():
        if name.endswith("bias"):
            expected = torch.zeros_like(param)
            if name == forget_name:
                expected[forget_block * 4:(forget_block + 1) * 4] = 1.0
            torch.testing.assert_close(param, expected, rtol=0, atol=0, msg=name)
        else:
            bound = 1.0 / math.sqrt(math.prod(param.shape[1:]))
            assert 0 < param.abs().max().item() <= bound, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_size_batch_and_zero_steps(variant):
    cell = ConvLSTMCell(CIN, 4, KERNEL, variant, backend="reference")
    h, c = cell(torch.zeros(0, CIN, HEIGHT, WIDTH))
    assert h.shape == c.shape == (0, 4, HEIGHT, WIDTH)
    model = ConvLSTM(CIN, 4, KERNEL, num_layers=2, variant=variant, backend="reference")
    output, (h_n, c_n) = model(torch.zeros(0, 3, CIN, HEIGHT, WIDTH))
    assert output.shape == (0, 3, 4, HEIGHT, WIDTH)
    assert h_n.shape == c_n.shape == (2, 0, 4, HEIGHT, WIDTH)
    # T = 0: empty output, and the final state is the initial state.
    h0 = torch.randn(2, BATCH, 4, HEIGHT, WIDTH)
    c0 = torch.randn(2, BATCH, 4, HEIGHT, WIDTH)
    output, (h_n, c_n) = model(torch.zeros(BATCH, 0, CIN, HEIGHT, WIDTH), (h0, c0))
    assert output.shape == (BATCH, 0, 4, HEIGHT, WIDTH)
    torch.testing.assert_close((h_n, c_n), (h0, c0), rtol=0, atol=0)
    sequence, (h, c) = cell.forward_sequence(torch.zeros(0, BATCH, CIN, HEIGHT, WIDTH))
    assert sequence.shape == (0, BATCH, 4, HEIGHT, WIDTH)
    assert h.shape == c.shape == (BATCH, 4, HEIGHT, WIDTH) and not h.any() and not c.any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_non_contiguous_input(variant):
    model = _model(variant, 4, num_layers=2, seed=16)
    x = _sequence(BATCH, 3, CIN, seed=17)
    strided = x.transpose(3, 4).contiguous().transpose(3, 4)  # same values, H/W strides swapped
    assert not strided.is_contiguous()
    torch.testing.assert_close(model(strided)[0], model(x)[0], rtol=1e-14, atol=1e-14)


def test_module_gradients_reach_every_parameter():
    model = _model("b", [4, 5], num_layers=2, seed=18)
    output, (h_n, c_n) = model(_sequence(BATCH, 2, CIN, seed=19))
    (output.sum() + sum(c.sum() for c in c_n)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_dropout_between_layers_as_nn_lstm():
    """dropout acts on each layer's output but the last, in training only: with p = 1 the second
    layer sees zeros (so its output equals a fresh layer's on zero input), in eval nothing."""
    torch.manual_seed(0)
    lstm = ConvLSTM(3, 4, num_layers=2, dropout=1.0, backend="reference")
    x = torch.randn(2, 3, 3, 5, 5)
    second = lstm.cells[1]
    zero_input = torch.zeros(3, 2, 4, 5, 5)
    want, (want_h, want_c) = second.forward_sequence(zero_input)
    out, (h_n, c_n) = lstm(x)
    torch.testing.assert_close(out, want.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(h_n[1], want_h, rtol=0, atol=0)
    lstm.eval()
    plain = ConvLSTM(3, 4, num_layers=2, backend="reference")
    plain.load_state_dict(lstm.state_dict())
    torch.testing.assert_close(lstm(x)[0], plain(x)[0], rtol=0, atol=0)
    half = ConvLSTM(3, 4, num_layers=2, dropout=0.5, backend="reference").train()
    assert not torch.equal(half(x)[0], half(x)[0])  # a fresh mask per call
    with pytest.warns(UserWarning, match="num_layers=1"):
        ConvLSTM(3, 4, num_layers=1, dropout=0.2)
    with pytest.raises(ValueError, match="dropout"):
        ConvLSTM(3, 4, num_layers=2, dropout=1.5)


@pytest.mark.parametrize("recompute", ["steps", 2, "layers"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_recompute_gives_the_same_gradients_and_keeps_less(recompute, backend):
    """recompute trades memory for time only: outputs and every gradient equal the plain run (in
    float64, to rounding: chunks sum the weight gradients in another order), and autograd keeps
    fewer bytes."""
    from convlstm_fast.backends import get_backend
    from convlstm_fast.bench.harness import saved_state_tensors

    reason = get_backend(backend).unsupported_reason("c", torch.empty(1, 1, 1, 1, 1))
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    plain = ConvLSTM(3, 4, num_layers=2, variant="c", backend=backend).double()
    memory = ConvLSTM(3, 4, num_layers=2, variant="c", backend=backend,
                      recompute=recompute).double()
    memory.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for model in (plain, memory):
        out, (h_n, c_n) = model(x)
        weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        loss = (out * weight).sum() + h_n.sum() + c_n.sum()
        results.append([out, h_n, c_n, *torch.autograd.grad(loss, [x, *model.parameters()])])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    state_numel = 2 * 4 * 6 * 5
    kept = [saved_state_tensors(lambda m=m: m(x)[0].transpose(0, 1), [x, *m.parameters()],
                                state_numel, 5) for m in (plain, memory)]
    assert kept[1] < kept[0], kept
