"""GestureNet (shared/SPEC.md "The full network of Fig. 1"): shapes, stage costs, hooks.

Tiny configuration (width_mult = 0.125, S = 32, T = 4): Res3D gives 32 channels at 8×8 over
T' = 2 steps. The ConvLSTM stages' MACs are checked against the registry's ``mult_adds`` (a
closed formula independent of the counter) and the paper convention against the weight count.
"""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import VARIANTS, ConvLSTM, count_parameters, get_cell
from convlstm_fast.models import STAGES, GestureNet

TINY = dict(width_mult=0.125)
BATCH, FRAMES, SIZE = 2, 4, 32
# Res3D halves T once (3a) and S twice (block 1, 3a); width 0.125 gives 256 -> 32 channels.
STEPS, HIDDEN, MAP = 2, 32, 8


def tiny_clip(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, FRAMES, SIZE, SIZE, generator=generator)


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_and_feature_shapes(variant):
    torch.manual_seed(0)
    net = GestureNet(10, variant, backend="reference", **TINY).eval()
    x = tiny_clip()
    with torch.no_grad():
        stages = net.forward_stages(x)
        logits = net(x)
        features = net.features(x)
    assert tuple(stages) == STAGES
    assert logits.shape == (BATCH, 10)
    assert torch.isfinite(logits).all()
    assert features.shape == (BATCH, STEPS, HIDDEN, MAP, MAP)
    assert stages["mobilenet"].shape == (BATCH, STEPS, 128, 1, 1)
    torch.testing.assert_close(features, stages["convlstm2"], rtol=0, atol=0)
    torch.testing.assert_close(logits, stages["head"], rtol=0, atol=0)


def test_second_variant_defaults_and_override():
    assert GestureNet(5, "convlstm", **TINY).convlstm2.cells[0].variant == "convlstm"
    for variant in ("a", "b", "c", "d"):
        net = GestureNet(5, variant, **TINY)
        assert net.convlstm1.cells[0].variant == variant
        assert net.convlstm2.cells[0].variant == "a"
    assert GestureNet(5, "c", second_variant="d", **TINY).convlstm2.cells[0].variant == "d"
    assert isinstance(GestureNet(5, "a", **TINY).convlstm2, ConvLSTM)


def test_features_match_forward_hook_on_convlstm2():
    torch.manual_seed(0)
    net = GestureNet(4, "b", backend="reference", **TINY).eval()
    seen = []
    net.convlstm2.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    x = tiny_clip(1)
    with torch.no_grad():
        net(x)
        features = net.features(x)
    torch.testing.assert_close(features, seen[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_summary_adds_up_and_convlstm_macs_follow_the_formula(variant):
    net = GestureNet(10, variant, **TINY)
    summary = net.summary((BATCH, 3, FRAMES, SIZE, SIZE))
    stages = {s.name: s for s in summary.stages}
    assert tuple(stages) == STAGES
    assert sum(s.mult_adds for s in summary.stages) == summary.total_mult_adds
    assert sum(s.parameters for s in summary.stages) == summary.total_parameters
    assert summary.total_parameters == count_parameters(net)
    for stage, cell_variant in (("convlstm1", variant), ("convlstm2", net.second_variant)):
        per_step = get_cell(cell_variant).mult_adds(HIDDEN, HIDDEN, 3, MAP, MAP)
        assert stages[stage].mult_adds == per_step * STEPS * BATCH
        weights = get_cell(cell_variant).weight_count(HIDDEN, HIDDEN, 3)
        assert stages[stage].paper_mult_adds == weights * MAP * MAP * STEPS * BATCH
        assert stages[stage].output_shape == (BATCH, STEPS, HIDDEN, MAP, MAP)
    assert stages["head"].output_shape == (BATCH, 10)
    assert "convlstm1" in summary.table()


def test_full_size_network_cost():
    # SPEC: the full network is about 77 GMAC per 16-frame 112x112 clip (cell a).
    summary = GestureNet(27, "a").summary((3, 16, 112, 112))
    assert 75e9 < summary.total_mult_adds < 80e9
    stages = {s.name: s for s in summary.stages}
    assert stages["convlstm1"].output_shape == (1, 8, 256, 28, 28)
    assert stages["mobilenet"].output_shape == (1, 8, 1024, 4, 4)
    assert stages["convlstm1"].mult_adds == get_cell("a").mult_adds(256, 256, 3, 28, 28) * 8


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = GestureNet(3, "d", backend="reference", init="reference", **TINY)
    loss = torch.nn.functional.cross_entropy(net(tiny_clip(2)), torch.tensor([0, 2]))
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_width_mult_scales_channels():
    net = GestureNet(3, "a", width_mult=0.5)
    assert net.hidden_channels == 128
    assert net.mobilenet.out_channels == 512
    assert net.head.in_features == 512


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="variant"):
        GestureNet(3, "e")
    with pytest.raises(ValueError, match="width_mult"):
        GestureNet(3, "a", width_mult=0)
    with pytest.raises(ValueError, match="num_classes"):
        GestureNet(0, "a")
    net = GestureNet(3, "a", **TINY)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, T, S, S\]"):
        net(torch.zeros(1, 4, 4, 32, 32))
