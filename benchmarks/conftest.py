"""pytest-benchmark options for the cases of ``convlstm_fast.bench`` (same shapes, same runners).

``pytest benchmarks/ --benchmark-disable`` runs every case once (a smoke test for CI);
``--bench-preset default|paper`` picks the shapes of the CLI's default or paper runs
(quick by default), ``--bench-device`` the device (cuda when available), ``--bench-dtype`` the
dtype, ``--bench-compile`` adds torch.compile of the reference. Benchmarks assert nothing
about time.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("convlstm_fast benchmarks")
    group.addoption("--bench-preset", default="quick", choices=("quick", "default", "paper"),
                    help="shapes of `python -m convlstm_fast.bench` [--quick|--paper]")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--bench-dtype", default=None, choices=("float32", "float16", "bfloat16"))
    group.addoption("--bench-compile", action="store_true",
                    help="also run the slow torch.compile cases (marked slow)")


@pytest.fixture(scope="session")
def bench_config(request):
    from convlstm_fast.bench import default_config

    preset = request.config.getoption("--bench-preset")
    dtype = request.config.getoption("--bench-dtype")
    return default_config(request.config.getoption("--bench-device"),
                          None if dtype is None else getattr(torch, dtype),
                          quick=preset == "quick", paper=preset == "paper")


def pytest_runtest_setup(item):
    if item.get_closest_marker("slow") is not None and not item.config.getoption("--bench-compile"):
        pytest.skip("torch.compile cases compile for ~10 s each: pass --bench-compile")
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
