"""The registry of cells: the paper's five entries agree with FlopCounterMode and Table 1, bad
specs are refused, and a cell a user registers — the README's example, executed from the README
itself so that it cannot rot — runs through ConvLSTM, counting, GestureNet, the benchmark (in
process and through ``--import``) and a training run, with the fused backends saying they have no
kernel for it."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import convlstm_fast
from convlstm_fast import (VARIANTS, CellSpec, ConvLSTM, ConvLSTMCell, Parameter, cell_names,
                           count_mult_adds, count_parameters, get_cell, register_cell,
                           unregister_cell)
from convlstm_fast.backends import get_backend, select_backend

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
USER_CELL = "a_peephole"


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Your own cell"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def user_cell():
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    yield get_cell(USER_CELL)
    unregister_cell(USER_CELL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mult_adds_formula_is_what_flop_counter_measures(variant):
    spec = get_cell(variant)
    cell = ConvLSTMCell(6, 10, 3, variant, backend="reference")
    assert count_mult_adds(cell, torch.randn(2, 6, 7, 5)) == 2 * spec.mult_adds(6, 10, 3, 7, 5)


def test_the_paper_five_come_first_and_cannot_be_replaced():
    assert cell_names()[:5] == VARIANTS == ("convlstm", "a", "b", "c", "d")
    with pytest.raises(ValueError, match="already registered"):
        register_cell(get_cell("a"), replace=True)
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_cell("c")


def test_bad_specs_are_refused():
    a = get_cell("a")
    with pytest.raises(ValueError, match="role"):
        Parameter("w", lambda cin, c, k: (c,), "weights")
    with pytest.raises(ValueError, match="hidden_of"):
        CellSpec("x", "", a.parameters, a.step, a.mult_adds, hidden_of=("nope", 1))
    with pytest.raises(ValueError, match="layout"):
        CellSpec("x", "", a.parameters, a.step, a.mult_adds, hidden_of=a.hidden_of,
                 op="pooled_layer", kernels={"cpu": "planar"}, saved=a.saved)
    with pytest.raises(ValueError, match="variant must be one of"):
        get_cell("e")
    with pytest.raises(TypeError, match="CellSpec"):
        register_cell({"name": "x"})


def test_user_cell_runs_through_the_modules(user_cell):
    assert USER_CELL in cell_names()
    torch.manual_seed(0)
    lstm = ConvLSTM(8, 16, variant=USER_CELL)
    x = torch.randn(2, 3, 8, 6, 5, requires_grad=True)
    output, (h_n, c_n) = lstm(x)
    assert output.shape == (2, 3, 16, 6, 5) and h_n.shape == c_n.shape == (1, 2, 16, 6, 5)
    output.sum().backward()
    assert x.grad is not None and lstm.cells[0].gate_weight_c.grad is not None
    # The registered step is what ran (the auto backend fell back to the reference).
    cell = lstm.cells[0]
    h = c = torch.zeros(2, 16, 6, 5)
    for t in range(3):
        h, c = user_cell.step(x[:, t], h, c, dict(cell.named_parameters()), "sigmoid")
    torch.testing.assert_close(h_n[0], h)


def test_fused_backends_say_they_have_no_kernel(user_cell):
    x = torch.empty(1, 1, 8, 2, 2)
    for backend in ("cpu", "triton", "cuda"):
        if get_backend(backend).unavailable_reason() is not None:
            continue  # not built here: that reason comes first
        assert get_backend(backend).unsupported_reason(USER_CELL, x) == \
            f"variant {USER_CELL!r} has no {backend} kernel"
    assert select_backend("auto", USER_CELL, x).name == "reference"
    if get_backend("cpu").unavailable_reason() is None:
        with pytest.raises(ValueError, match="has no cpu kernel"):
            ConvLSTM(8, 4, variant=USER_CELL, backend="cpu")(torch.randn(1, 2, 8, 3, 3))


def test_user_cell_is_counted(user_cell):
    cell = ConvLSTMCell(8, 16, 3, USER_CELL)
    a = ConvLSTMCell(8, 16, 3, "a")
    assert count_parameters(cell) == count_parameters(a) + 3 * 16
    assert count_parameters(cell, include_bias=False) == count_parameters(a, include_bias=False) + 48
    assert count_mult_adds(cell, torch.randn(1, 8, 5, 5)) == count_mult_adds(a, torch.randn(1, 8, 5, 5))


def test_user_cell_in_the_gesture_net(user_cell):
    from convlstm_fast.models import GestureNet

    net = GestureNet(5, variant=USER_CELL, width_mult=1 / 16, backend="auto")
    assert net.convlstm1.cells[0].variant == USER_CELL and net.second_variant == "a"
    logits = net(torch.randn(1, 3, 4, 32, 32))
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    stages = {s.name: s for s in net.summary((1, 3, 4, 32, 32)).stages}
    assert stages["convlstm1"].mult_adds > 0


def test_user_cell_in_the_benchmark(user_cell, tmp_path):
    from convlstm_fast.bench.__main__ import main

    assert main(["--quick", "--variants", f"a,{USER_CELL}", "--backends", "reference,cpu",
                 "--no-network", "--no-sweep", "--no-progress", "--no-plots", "--out",
                 str(tmp_path), "--stem", "run"]) == 0
    result = json.loads((tmp_path / "run.json").read_text())
    rows = {(r["variant"], r["backend"], r["mode"]) for r in result["latency"]}
    assert (USER_CELL, "reference", "forward") in rows
    assert (USER_CELL, "reference", "forward+backward") in rows
    skipped = [s for s in result["skipped"] if s["variant"] == USER_CELL and s["backend"] == "cpu"]
    assert len(skipped) == 1 and "cpu" in skipped[0]["reason"]
    assert any(row["variant"] == USER_CELL for row in result["table1"])


def test_bench_imports_the_users_module(tmp_path):
    (tmp_path / "mycells.py").write_text(_readme_example())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-P", "-m", "convlstm_fast.bench", "--import",
                             "mycells", "--table1"], capture_output=True, text=True, env=env,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"| {USER_CELL} |" in result.stdout


def test_one_training_run_of_the_user_cell(user_cell, tmp_path):
    from convlstm_fast.training.train import main

    metrics = main(["--dataset", "synthetic", "--variant", USER_CELL, "--width-mult",
                    str(1 / 32), "--frames", "4", "--size", "16", "--num-classes", "3",
                    "--train-clips", "4", "--val-clips", "4", "--epochs", "1", "--batch-size",
                    "4", "--workers", "0", "--out", str(tmp_path), "--no-progress", "--device",
                    "cpu", "--threads", "1"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["epochs"] and all(torch.isfinite(torch.tensor(e["train_loss"]))
                                   for e in saved["epochs"])
    assert metrics is not None


def test_public_api_exports_the_registry():
    for name in ("CellSpec", "Parameter", "Gates", "register_cell", "get_cell", "cell_names"):
        assert name in convlstm_fast.__all__
