"""The reference cells (the oracle) against shared/SPEC.md: gradients, closed forms, properties.

Everything runs through ``convlstm_layer(..., backend="reference")`` or ``reference.cells`` on
tiny shapes (B=2, Cin=3, C=4, 5×6, K=3, T=2), in float64 unless a test is about another dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convlstm_fast import convlstm_layer, reference
from convlstm_fast import VARIANTS
from convlstm_fast.registry import GATE_ACTIVATIONS

STEPS, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, KERNEL = 2, 2, 3, 4, 5, 6, 3


def _run(variant, x, h0, c0, params, gate_activation="sigmoid"):
    output, (h_n, c_n) = convlstm_layer(x, params, variant, (h0, c0),
                                        gate_activation=gate_activation, backend="reference")
    return output, h_n, c_n


def _sigmoid_by_hand(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _hard_sigmoid_by_hand(z):
    # SPEC "Options": clamp(0.2·x + 0.5, 0, 1).
    return torch.minimum(torch.maximum(0.2 * z + 0.5, torch.zeros_like(z)), torch.ones_like(z))


ACTIVATIONS_BY_HAND = {"sigmoid": _sigmoid_by_hand, "hard_sigmoid": _hard_sigmoid_by_hand}


def _gate_values(variant, x, h0, c0, params, gate_activation):
    """Every σ-activated gate of every step (pre-activations must avoid hard_sigmoid's kinks)."""
    act = reference.gate_activation_fn(gate_activation)
    values, h, c = [], h0, c0
    for t in range(x.shape[0]):
        if variant == "convlstm":
            z = (F.conv2d(x[t], params["weight_x"], padding=KERNEL // 2)
                 + F.conv2d(h, params["weight_h"], padding=KERNEL // 2)
                 + params["bias"][:, None, None])
            i, f, _, o = z.chunk(4, dim=1)
            values += [act(i), act(f), act(o)]
        record = {}
        h, c = reference.step(variant, x[t], h, c, params, gate_activation, record)
        if "gates" in record:
            values.append(record["gates"])
    return torch.cat([v.flatten() for v in values])


@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_every_input_and_parameter(variant, gate_activation, make_params, make_inputs):
    params = make_params(variant, CIN, HIDDEN, KERNEL, seed=1, scale=0.5, bias_scale=0.5,
                         requires_grad=True)
    x, h0, c0 = make_inputs(STEPS, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, seed=2, requires_grad=True)
    if gate_activation == "hard_sigmoid":
        # Gates strictly inside (0, 1) by 0.02: every pre-activation is ≥ 0.1 away from the kinks
        # at ±2.5, far beyond gradcheck's eps = 1e-6, and the gradient 0.2 is exercised.
        with torch.no_grad():
            gates = _gate_values(variant, x, h0, c0, params, gate_activation)
        assert 0.02 < gates.min().item() and gates.max().item() < 0.98
    names = list(params)

    def layer(x, h0, c0, *values):
        return _run(variant, x, h0, c0, dict(zip(names, values)), gate_activation)

    # fast_mode compares vᵀJu for random u, v per input (the full Jacobian takes minutes here).
    assert torch.autograd.gradcheck(layer, (x, h0, c0, *params.values()), eps=1e-6, atol=1e-8,
                                    rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("gate_activation", GATE_ACTIVATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_weights_closed_form(variant, gate_activation, make_params, make_inputs):
    # All weights zero, biases random: the gates are act(bias) (attention maps exactly 1 for c/d),
    # G = tanh(b_c), C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t), independent of X and H (SPEC).
    params = make_params(variant, CIN, HIDDEN, KERNEL, seed=3, bias_scale=3.0)
    params = {n: p if n.endswith("bias") else torch.zeros_like(p) for n, p in params.items()}
    x, h0, c0 = make_inputs(STEPS, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, seed=4)
    act = ACTIVATIONS_BY_HAND[gate_activation]

    def per_channel(values):
        return values[None, :, None, None]

    one = torch.ones(HIDDEN, dtype=torch.float64)
    if variant == "convlstm":
        b_i, b_f, b_g, b_o = params["bias"].chunk(4)
        i, f, o, candidate = act(b_i), act(b_f), act(b_o), torch.tanh(b_g)
    else:
        gate_bias = params["gate_bias"].chunk(2 if variant in ("c", "d") else 3)
        candidate = torch.tanh(params["cand_bias"])
        if variant in ("a", "b"):
            i, f, o = (act(b) for b in gate_bias)
        elif variant == "c":
            i, (f, o) = one, (act(b) for b in gate_bias)
        else:
            (i, f), o = (act(b) for b in gate_bias), one
    expected_output, c = [], c0
    for _ in range(STEPS):
        c = per_channel(f) * c + per_channel(i * candidate)
        expected_output.append(per_channel(o) * torch.tanh(c))
    output, h_n, c_n = _run(variant, x, h0, c0, params, gate_activation)
    tolerance = {"rtol": 0, "atol": 1e-14}
    torch.testing.assert_close(output, torch.stack(expected_output), **tolerance)
    torch.testing.assert_close(h_n, expected_output[-1], **tolerance)
    torch.testing.assert_close(c_n, c, **tolerance)


def test_b_with_zero_score_weights_is_a_on_uniformly_attended_input(make_params, make_inputs):
    # W_z = 0 -> Z = 0 -> A = 1/(H·W) everywhere, and (b) is (a) run on X̃ = X/(H·W) (eqs. 17-19).
    params = make_params("b", CIN, HIDDEN, KERNEL, seed=5)
    params["att_weight_z"] = torch.zeros_like(params["att_weight_z"])
    x, h0, c0 = make_inputs(1, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, seed=6)
    record = {}
    h, c = reference.step("b", x[0], h0, c0, params, "sigmoid", record)
    uniform = torch.full((BATCH, 1, HEIGHT, WIDTH), 1.0 / (HEIGHT * WIDTH), dtype=torch.float64)
    torch.testing.assert_close(record["attention"], uniform, rtol=0, atol=1e-16)
    a_params = {n: params[n] for n in make_params("a", CIN, HIDDEN, KERNEL)}
    h_a, c_a = reference.step("a", x[0] / (HEIGHT * WIDTH), h0, c0, a_params, "sigmoid")
    torch.testing.assert_close(h, h_a, rtol=0, atol=1e-14)
    torch.testing.assert_close(c, c_a, rtol=0, atol=1e-14)


def test_spatial_attention_sums_to_one_per_sample(make_params, make_inputs):
    params = make_params("b", CIN, HIDDEN, KERNEL, seed=7, scale=3.0)
    x, h0, c0 = make_inputs(1, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, seed=8)
    record = {}
    reference.step("b", x[0], h0, c0, params, "sigmoid", record)
    attention = record["attention"]
    assert attention.shape == (BATCH, 1, HEIGHT, WIDTH)
    assert (attention > 0).all()
    torch.testing.assert_close(attention.sum(dim=(1, 2, 3)),
                               torch.ones(BATCH, dtype=torch.float64), rtol=0, atol=1e-14)
    assert attention.std() > 0  # not the trivial uniform map


def _attention_logits(x, h, params):
    """Z = SepConv_z(tanh(SepConv_xa(X) + SepConv_ha(H) + b_a)) of SPEC (c), written with conv2d."""

    def sepconv(y, depthwise, pointwise):
        y = F.conv2d(y, depthwise, padding=KERNEL // 2, groups=y.shape[1])
        return F.conv2d(y, pointwise[:, :, None, None])

    features = torch.tanh(sepconv(x, params["att_dw_x"], params["att_pw_x"])
                          + sepconv(h, params["att_dw_h"], params["att_pw_h"])
                          + params["att_bias"][:, None, None])
    return sepconv(features, params["att_dw_z"], params["att_pw_z"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["c", "d"])
def test_channel_attention_is_max_normalised_and_finite_for_huge_logits(variant, dtype,
                                                                        make_params, make_inputs):
    params = make_params(variant, CIN, HIDDEN, KERNEL, dtype, seed=9)
    params["att_pw_z"] = params["att_pw_z"] * 2e4  # |Z| up to ~1e4: exp(Z) alone would overflow
    x, h0, c0 = make_inputs(1, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, dtype, seed=10)
    logits = _attention_logits(x[0].double(), h0.double(), {n: p.double() for n, p in params.items()})
    assert 1e3 < logits.abs().max().item() < 1e5
    record = {}
    h, c = reference.step(variant, x[0], h0, c0, params, "sigmoid", record)
    attention = record["attention"]
    assert attention.shape == (BATCH, HIDDEN, HEIGHT, WIDTH)
    assert torch.isfinite(attention).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    assert (attention >= 0).all() and (attention <= 1).all()
    assert (attention.amax(dim=(-2, -1)) == 1).all()  # exactly 1 in every (sample, channel)


@pytest.mark.parametrize("variant", ["c", "d"])
def test_channel_attention_matches_spec_formula(variant, make_params, make_inputs):
    # i (c) or o (d) = exp(Z − max_{h,w} Z) per sample and channel (eq. 23).
    params = make_params(variant, CIN, HIDDEN, KERNEL, seed=11, scale=2.0)
    x, h0, c0 = make_inputs(1, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, seed=12)
    record = {}
    reference.step(variant, x[0], h0, c0, params, "sigmoid", record)
    logits = _attention_logits(x[0], h0, params)
    expected = torch.exp(logits) / torch.exp(logits).amax(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(record["attention"], expected, rtol=1e-12, atol=0)


def test_hard_sigmoid_is_the_reference_codes_not_torchs():
    z = torch.tensor([-3.0, -2.5, -1.0, 0.0, 1.0, 2.0, 2.5, 3.0], dtype=torch.float64,
                     requires_grad=True)
    expected = torch.tensor([0.0, 0.0, 0.3, 0.5, 0.7, 0.9, 1.0, 1.0], dtype=torch.float64)
    value = reference.gate_activation_fn("hard_sigmoid")(z)
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-15)
    assert not torch.allclose(value, F.hardsigmoid(z))  # torch's is clamp(x/6 + 0.5, 0, 1)
    # Derivative 0.2 on the closed interval -2.5 <= x <= 2.5, decided on x, else 0.
    (grad,) = torch.autograd.grad(value.sum(), z)
    expected_grad = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_hard_sigmoid_kinks_and_nan(dtype):
    """At exactly x = ±2.5 (representable in every dtype) the derivative is 0.2 and the values
    are 0 and 1; NaN maps to NaN (SPEC's clamp propagates it), infinities to 0 and 1."""
    z = torch.tensor([-2.5, 2.5, float("nan"), -float("inf"), float("inf")], dtype=dtype,
                     requires_grad=True)
    value = reference.hard_sigmoid(z)
    assert value.dtype == dtype
    torch.testing.assert_close(value[:2], torch.tensor([0.0, 1.0], dtype=dtype), rtol=0, atol=0)
    assert torch.isnan(value[2])
    torch.testing.assert_close(value[3:], torch.tensor([0.0, 1.0], dtype=dtype), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(value[:2].sum(), z)
    torch.testing.assert_close(grad[:2], torch.full((2,), 0.2, dtype=dtype), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_params_as_list_equal_params_as_dict(variant, make_params, make_inputs):
    params = make_params(variant, CIN, HIDDEN, KERNEL, seed=13)
    x, h0, c0 = make_inputs(STEPS, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, seed=14)
    by_name = _run(variant, x, h0, c0, params)
    by_order = _run(variant, x, h0, c0, list(params.values()))
    torch.testing.assert_close(by_order, by_name, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_input_equals_contiguous(variant, make_params, make_inputs):
    params = make_params(variant, CIN, HIDDEN, KERNEL, seed=15)
    x, h0, c0 = make_inputs(STEPS, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, seed=16)
    expected = _run(variant, x, h0, c0, params)
    # Batch-first storage seen time-first, h stored with H and W swapped, c a sliced view.
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    h_strided = h0.transpose(2, 3).contiguous().transpose(2, 3)
    c_strided = torch.cat([c0, c0], dim=-1)[..., :WIDTH]  # a slice of wider rows
    assert not (x_strided.is_contiguous() or h_strided.is_contiguous() or c_strided.is_contiguous())
    actual = _run(variant, x_strided, h_strided, c_strided, params)
    torch.testing.assert_close(actual, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_bfloat16_runs_the_reference_in_bfloat16(variant, make_params, make_inputs):
    params = make_params(variant, CIN, HIDDEN, KERNEL, torch.float32, seed=17)
    x, h0, c0 = make_inputs(STEPS, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, torch.float32, seed=18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, h_n, c_n = _run(variant, x, h0, c0, params)
    assert output.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: compare with the float32 run loosely (|h| < 1, |c| < ~3).
    expected = _run(variant, x, h0, c0, params)
    for actual, reference_value in zip((output, h_n, c_n), expected):
        torch.testing.assert_close(actual.float(), reference_value, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("variant", ["convlstm", "c"])
def test_distance_rule_accepts_bfloat16_autocast_and_rejects_an_error(variant, make_params,
                                                                      make_inputs,
                                                                      assert_close_to_float64):
    # STYLE.md 4: x64 = reference in float64 on the bf16 values, x_ref = reference in bf16.
    params = make_params(variant, CIN, HIDDEN, KERNEL, torch.bfloat16, seed=19)
    x, h0, c0 = make_inputs(STEPS, BATCH, CIN, HIDDEN, HEIGHT, WIDTH, torch.bfloat16, seed=20)
    reference_low = _run(variant, x, h0, c0, params)
    reference64 = _run(variant, x.double(), h0.double(), c0.double(),
                       {n: p.double() for n, p in params.items()})
    float32_params = {n: p.float() for n, p in params.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = _run(variant, x.float(), h0.float(), c0.float(), float32_params)
    assert_close_to_float64(actual, reference_low, reference64)
    wrong = tuple(t.clone() for t in actual)
    wrong[0][0, 0, 0, 0, 0] += 0.25  # far beyond bf16 rounding of values in (−1, 1)
    with pytest.raises(AssertionError, match="max"):
        assert_close_to_float64(wrong, reference_low, reference64)
