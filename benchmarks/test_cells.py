"""Cell latency per variant, backend and mode: the cases of ``python -m convlstm_fast.bench``
as pytest-benchmark tests. Backends that cannot run a case are skipped with their reason;
``compile`` (torch.compile of the reference) is marked slow."""

from __future__ import annotations

import pytest

from convlstm_fast import VARIANTS
from convlstm_fast.backends import BACKENDS
from convlstm_fast.bench import cases

BACKEND_PARAMS = list(BACKENDS) + [pytest.param(cases.COMPILE, marks=pytest.mark.slow)]


def _synchronized(fn, device):
    import torch

    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cell_layer(benchmark, bench_config, variant, backend, mode):
    shape = bench_config.shapes[0]
    x, params = cases.make_inputs(variant, shape, bench_config.device, bench_config.dtype)
    reason = cases.unsupported_reason(backend, variant, x)
    if reason is not None:
        pytest.skip(reason)
    runner = cases.layer_runner(backend, variant, shape)
    make = cases.forward_fn if mode == "forward" else cases.forward_backward_fn
    fn = make(runner, x, params)
    if backend == cases.COMPILE:
        fn()  # compile outside the timing
    benchmark.extra_info.update(shape=shape.to_dict(), dtype=str(bench_config.dtype))
    benchmark(_synchronized(fn, bench_config.device))
