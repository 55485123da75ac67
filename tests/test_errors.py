"""Bad arguments raise ValueError/TypeError whose message names the argument (STYLE.md 3)."""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import ConvLSTM, ConvLSTMCell, convlstm_layer
from convlstm_fast import VARIANTS

B, CIN, C, H, W = 2, 3, 4, 5, 6


def _cell(variant="a", **kwargs):
    return ConvLSTMCell(CIN, C, 3, variant, backend="reference", **kwargs)


@pytest.mark.parametrize("kernel_size", [0, -1, 2, 4])
def test_kernel_size_must_be_positive_and_odd(kernel_size):
    with pytest.raises(ValueError, match="kernel_size"):
        ConvLSTMCell(CIN, C, kernel_size)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvLSTM(CIN, C, [3, kernel_size], num_layers=2)


def test_kernel_size_must_be_an_int():
    with pytest.raises(TypeError, match="kernel_size"):
        ConvLSTMCell(CIN, C, 3.0)


@pytest.mark.parametrize("name, kwargs", [
    ("variant", {"variant": "e"}),
    ("backend", {"backend": "gpu"}),
    ("gate_activation", {"gate_activation": "hardsigmoid"}),
    ("init", {"init": "xavier"}),
])
def test_unknown_choice_names_the_argument(name, kwargs):
    with pytest.raises(ValueError, match=name):
        ConvLSTMCell(CIN, C, 3, **kwargs)
    with pytest.raises(ValueError, match=name):
        ConvLSTM(CIN, C, 3, **kwargs)


@pytest.mark.parametrize("name, kwargs", [
    ("variant", {"variant": "e"}),
    ("backend", {"backend": "gpu"}),
    ("gate_activation", {"gate_activation": "relu"}),
])
def test_functional_unknown_choice(name, kwargs, make_params):
    x = torch.zeros(1, B, CIN, H, W, dtype=torch.float64)
    params = make_params("a", CIN, C, 3)
    with pytest.raises(ValueError, match=name):
        convlstm_layer(x, params, **{"variant": "a", **kwargs})


@pytest.mark.parametrize("name, args", [
    ("in_channels", (0, C)),
    ("hidden_channels", (CIN, -4)),
])
def test_channels_must_be_positive(name, args):
    with pytest.raises(ValueError, match=name):
        ConvLSTMCell(*args)
    with pytest.raises(TypeError, match=name):
        ConvLSTMCell(*[str(a) if a <= 0 else a for a in args])


def test_per_layer_lists_must_have_num_layers_entries():
    with pytest.raises(ValueError, match="hidden_channels"):
        ConvLSTM(CIN, [4, 5, 6], num_layers=2)
    with pytest.raises(ValueError, match="num_layers"):
        ConvLSTM(CIN, C, num_layers=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_wrong_rank(variant):
    with pytest.raises(ValueError, match=r"x must be a 4-D"):
        _cell(variant)(torch.zeros(1, B, CIN, H, W))
    with pytest.raises(ValueError, match=r"x must be a 5-D"):
        ConvLSTM(CIN, C, variant=variant)(torch.zeros(B, CIN, H, W))
    with pytest.raises(ValueError, match=r"x must be a 5-D"):
        convlstm_layer(torch.zeros(B, CIN, H, W), _cell(variant).parameter_list(), variant)


def test_input_channels_must_equal_in_channels():
    with pytest.raises(ValueError, match="in_channels"):
        _cell()(torch.zeros(B, CIN + 1, H, W))
    with pytest.raises(ValueError, match="in_channels"):
        ConvLSTM(CIN, C)(torch.zeros(B, 2, CIN + 1, H, W))
    with pytest.raises(ValueError, match="in_channels"):
        ConvLSTM(CIN, C, batch_first=False)(torch.zeros(2, B, CIN + 1, H, W))


def test_input_must_be_a_floating_tensor():
    with pytest.raises(TypeError, match="x"):
        _cell()(torch.zeros(B, CIN, H, W, dtype=torch.int64))
    with pytest.raises(TypeError, match="x"):
        _cell()(torch.zeros(B, CIN, H, W).tolist())


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_shape_dtype_and_device_mismatch(variant):
    cell = _cell(variant)
    x = torch.zeros(B, CIN, H, W)
    good = torch.zeros(B, C, H, W)
    bad_states = {
        "shape": (torch.zeros(B, C + 1, H, W), good),
        "batch": (good, torch.zeros(B + 1, C, H, W)),
        "dtype": (good.double(), good),
        "device": (good, torch.zeros(B, C, H, W, device="meta")),
    }
    for why, state in bad_states.items():
        with pytest.raises(ValueError, match=r"state\[") as info:
            cell(x, state)
        assert why in ("shape", "batch") or why in str(info.value), str(info.value)


def test_state_must_be_a_pair_of_tensors():
    cell = _cell()
    x = torch.zeros(3, CIN, H, W)
    h = torch.zeros(3, C, H, W)
    for state in (h, (h,), (h, h, h), (h, "c")):
        with pytest.raises(TypeError, match="state"):
            cell(x, state)


def test_stacked_state_must_have_num_layers():
    model = ConvLSTM(CIN, C, num_layers=2, backend="reference")
    x = torch.zeros(B, 2, CIN, H, W)
    h = torch.zeros(3, B, C, H, W)
    with pytest.raises(ValueError, match="h_0"):
        model(x, (h, h))
    with pytest.raises(TypeError, match="state"):
        model(x, h)
    unequal = ConvLSTM(CIN, [4, 5], num_layers=2, backend="reference")
    with pytest.raises(ValueError, match="h_0"):
        unequal(x, (torch.zeros(2, B, 4, H, W), torch.zeros(2, B, 4, H, W)))


def test_parameters_must_match_the_input(make_params):
    x = torch.zeros(1, B, CIN, H, W, dtype=torch.float64)
    params = make_params("a", CIN, C, 3)
    with pytest.raises(ValueError, match="params"):
        convlstm_layer(x, {n: p for n, p in params.items() if n != "cand_bias"}, "a")
    with pytest.raises(ValueError, match="params"):
        convlstm_layer(x, list(params.values())[:-1], "a")
    with pytest.raises(ValueError, match="cand_pw_h"):
        convlstm_layer(x, {**params, "cand_pw_h": torch.zeros(C, C + 1, dtype=torch.float64)}, "a")
    with pytest.raises(ValueError, match="parameter"):
        convlstm_layer(x.float(), params, "a", backend="reference")
    with pytest.raises(ValueError, match="parameter"):
        _cell()(torch.zeros(B, CIN, H, W, device="meta"))  # module not moved with .to()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_explicit_backend_that_cannot_run_says_why(backend, make_params):
    x = torch.zeros(1, B, CIN, H, W)
    params = make_params("a", CIN, C, 3, torch.float32)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run") as info:
        convlstm_layer(x, params, "a", backend=backend)
    assert len(str(info.value).split(": ", 1)[1]) > 10  # a reason follows
    with pytest.raises(ValueError, match=f"backend='{backend}'"):
        ConvLSTMCell(CIN, C, backend=backend)(x[0])


def test_explicit_cpu_backend_refuses_other_devices(make_params):
    x = torch.zeros(1, B, CIN, H, W, device="meta")
    params = make_params("a", CIN, C, 3, torch.float32, device="meta")
    with pytest.raises(ValueError, match="backend='cpu' cannot run"):
        convlstm_layer(x, params, "a", backend="cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_functional_zero_size_batch_and_steps(variant, make_params):
    params = make_params(variant, CIN, C, 3)
    output, (h_n, c_n) = convlstm_layer(torch.zeros(2, 0, CIN, H, W, dtype=torch.float64),
                                        params, variant)
    assert output.shape == (2, 0, C, H, W) and h_n.shape == c_n.shape == (0, C, H, W)
    h0 = torch.ones(B, C, H, W, dtype=torch.float64)
    output, (h_n, c_n) = convlstm_layer(torch.zeros(0, B, CIN, H, W, dtype=torch.float64),
                                        params, variant, (h0, 2 * h0))
    assert output.shape == (0, B, C, H, W)
    torch.testing.assert_close((h_n, c_n), (h0, 2 * h0), rtol=0, atol=0)
    assert h_n.data_ptr() != h0.data_ptr()  # a copy, never an alias of the input state
