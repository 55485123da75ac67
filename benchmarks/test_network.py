"""GestureNet inference and training-step time on the preset's network clip, per first-layer
cell, with the ConvLSTM backend "auto" (whatever is fastest and usable here)."""

from __future__ import annotations

import pytest
import torch

from convlstm_fast import VARIANTS
from convlstm_fast.models import GestureNet


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gesture_net(benchmark, bench_config, variant, training):
    cfg = bench_config.network
    torch.manual_seed(0)
    net = GestureNet(cfg.num_classes, variant, backend=cfg.backend, width_mult=cfg.width_mult)
    net = net.to(bench_config.device, bench_config.dtype).train(training)
    clip = torch.randn(cfg.batch, 3, cfg.frames, cfg.size, cfg.size).to(bench_config.device,
                                                                        bench_config.dtype)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch,), device=bench_config.device)
    params = list(net.parameters())

    def step():
        if training:
            loss = torch.nn.functional.cross_entropy(net(clip).float(), labels)
            grads = torch.autograd.grad(loss, params)
        else:
            with torch.no_grad():
                grads = net(clip)
        if bench_config.device.type == "cuda":
            torch.cuda.synchronize(bench_config.device)
        return grads

    benchmark.extra_info.update(width_mult=cfg.width_mult, clip=[cfg.batch, 3, cfg.frames,
                                                                 cfg.size, cfg.size])
    benchmark(step)
