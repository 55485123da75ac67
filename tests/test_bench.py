"""The benchmark suite: Table 1 numbers, the timing harness, the saved-for-backward accounting,
and one tiny end-to-end run of ``python -m convlstm_fast.bench --quick`` writing JSON and PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from convlstm_fast import get_cell
from convlstm_fast.bench import cases, harness
from convlstm_fast.bench.__main__ import main

# Table 1 weights written out from the paper's equations (7), (16), (20), (24), with
# Cin = Cout = 256, K = 3: an independent check of the counts the suite prints.
K2, CIN, C = 9, 256, 256
PARAM_A = (K2 + 4 * C) * (CIN + C)
EXPECTED_WEIGHTS = {
    "convlstm": K2 * (CIN + C) * C * 4,
    "a": PARAM_A,
    "b": PARAM_A + K2 * (CIN + 2 * C) + (CIN + C) * C,
    "c": PARAM_A + K2 * (CIN + 2 * C) + C * C,
    "d": PARAM_A + K2 * (CIN + 2 * C) + C * C,
}


def test_table1_cli_prints_exact_weight_counts(capsys):
    assert main(["--table1"]) == 0
    out = capsys.readouterr().out
    for variant, weights in EXPECTED_WEIGHTS.items():
        assert f"| {variant} | {weights:,} |" in out
    for text in ("4,718,592", "528,896", "666,880", "601,344"):
        assert text in out


def test_table1_rows_follow_the_formulas():
    rows = {r["variant"]: r for r in cases.table1()}
    for variant, weights in EXPECTED_WEIGHTS.items():
        row = rows[variant]
        assert row["weights"] == weights
        assert row["paper_mult_adds"] == weights * 28 * 28
        assert row["true_mult_adds"] == get_cell(variant).mult_adds(CIN, C, 3, 28, 28)
    # SPEC: the paper overstates the cost 3.9x for a, 2.4x for b, 1.8x for c/d.
    assert rows["a"]["overstatement"] == pytest.approx(3.9, abs=0.05)
    assert rows["b"]["overstatement"] == pytest.approx(2.4, abs=0.05)
    assert rows["c"]["overstatement"] == pytest.approx(1.8, abs=0.05)


def test_summarize_percentiles_match_numpy():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    timing = harness.summarize(samples)
    assert timing.median_ms == pytest.approx(np.median(samples))
    assert timing.p20_ms == pytest.approx(np.percentile(samples, 20))
    assert timing.p80_ms == pytest.approx(np.percentile(samples, 80))
    assert timing.repeats == 6


def test_time_function_cpu_counts_calls():
    calls = []
    timing = harness.time_function(lambda: calls.append(1), "cpu", warmup=2, repeats=5)
    assert len(calls) == 7
    assert timing.repeats == 5
    assert 0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_saved_accounting_on_a_known_graph():
    # sin saves its input x (excluded), y * y saves y (one storage, counted once), exp saves
    # its result, which is the returned output (excluded): exactly one x-sized tensor remains.
    steps, state = 4, 6
    x = torch.randn(steps * state, requires_grad=True)

    def forward():
        y = torch.sin(x)
        return (y * y).exp()

    assert harness.saved_state_tensors(forward, [x], state, steps) == pytest.approx(1.0)


@pytest.mark.parametrize("variant", ["convlstm", "a"])
def test_saved_per_step_reference_is_sane(variant):
    shape = cases.CellShape(1, 3, 4, 4, 5, 5, label="tiny")
    saved = cases.saved_per_step("reference", variant, shape, "cpu", torch.float32)
    # The reference keeps at least C_{t-1} and some gate tensor per step, and at most a few
    # dozen state-sized tensors.
    assert math.isfinite(saved) and 1.0 <= saved <= 40.0


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backends"):
        cases.backend_names(["nope"])


def test_quick_run_writes_json_and_png(tmp_path, capsys):
    code = main(["--quick", "--device", "cpu", "--variants", "a", "--backends", "reference,cuda",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Cell latency" in out and "| a | reference |" in out
    json_files = list(tmp_path.glob("cpu-*-quick.json"))
    assert len(json_files) == 1
    result = json.loads(json_files[0].read_text())
    for key in ("device_name", "torch", "triton", "git_commit", "date"):
        assert key in result["environment"]
    modes = {(r["backend"], r["mode"]) for r in result["latency"]}
    assert modes == {("reference", "forward"), ("reference", "forward+backward")}
    for record in result["latency"]:
        assert 0 < record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["speedup_vs_reference"] == pytest.approx(1.0)
    assert any(s["backend"] == "cuda" and s["reason"] for s in result["skipped"])
    assert result["saved"][0]["saved_per_step"] > 0
    assert result["network"]["throughput"]["rows"][0]["inference_clips_per_s"] > 0
    assert result["network"]["costs"]["per_variant"]["a"]["total_mult_adds"] > 0
    assert result["sweep"]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 2 and any("latency" in p for p in pngs) and any("sweep" in p for p in pngs)
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_interleaved_round_robin_order():
    order = []
    timings = harness.time_interleaved({"first": lambda: order.append("first"),
                                        "second": lambda: order.append("second")},
                                       "cpu", warmup=1, repeats=3)
    assert order == ["first", "second"] * 4
    assert {name: t.repeats for name, t in timings.items()} == {"first": 3, "second": 3}


def test_run_without_network_and_sweep_prints_tables(capsys):
    assert main(["--quick", "--device", "cpu", "--variants", "convlstm", "--backends",
                 "reference", "--no-network", "--no-sweep", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| convlstm | reference |" in out
    assert "Full network" not in out and "sweep" not in out


def test_recompute_rows_keep_two_state_tensors_per_step(tmp_path):
    """--recompute steps adds a "<backend>+recompute" forward+backward row per backend whose
    saved-per-step count is h and c of every step only (2), below the plain backend's."""
    assert main(["--quick", "--device", "cpu", "--variants", "c", "--backends", "reference",
                 "--recompute", "steps", "--no-network", "--no-sweep", "--no-progress",
                 "--no-plots", "--out", str(tmp_path), "--stem", "run"]) == 0
    result = json.loads((tmp_path / "run.json").read_text())
    assert {(r["backend"], r["mode"]) for r in result["latency"]} == {
        ("reference", "forward"), ("reference", "forward+backward"),
        ("reference+recompute", "forward+backward")}
    saved = {s["backend"]: s["saved_per_step"] for s in result["saved"]}
    assert saved["reference+recompute"] == pytest.approx(2.0, abs=0.01)
    assert saved["reference"] > saved["reference+recompute"]


def test_sequence_option_rows(tmp_path):
    """--sequence-options adds "<backend>+reverse", "<backend>+ragged" and "<backend>+stepwise"
    rows in both modes, each the layer run with that option; the ragged lengths lie in [T/2, T]
    and are fixed; the stepwise run (one call per step, the state handed on) is the layer."""
    assert main(["--quick", "--device", "cpu", "--variants", "a", "--backends", "reference",
                 "--sequence-options", "--no-network", "--no-sweep", "--no-progress",
                 "--no-plots", "--out", str(tmp_path), "--stem", "run"]) == 0
    result = json.loads((tmp_path / "run.json").read_text())
    rows = {(r["backend"], r["mode"]) for r in result["latency"]}
    assert rows == {(backend, mode) for mode in ("forward", "forward+backward")
                    for backend in ("reference", "reference+reverse", "reference+ragged",
                                    "reference+stepwise")}
    assert {s["backend"] for s in result["saved"]} == {"reference", "reference+reverse",
                                                       "reference+ragged", "reference+stepwise"}
    shape = cases.CellShape(2, 4, 3, 5, 6, 6)
    x, params = cases.make_inputs("a", shape, "cpu", torch.float64)
    torch.testing.assert_close(cases.layer_runner("reference+stepwise", "a", shape)(x, params),
                               cases.layer_runner("reference", "a", shape)(x, params))
    shape = cases.CellShape(4, 7, 3, 5, 6, 6)
    lengths = cases.ragged_lengths(shape)
    assert torch.equal(lengths, cases.ragged_lengths(shape))
    assert lengths.min() >= 4 and lengths.max() <= 7
    assert cases.split_option("cpu+ragged") == ("cpu", "+ragged")
    assert cases.split_option("cpu") == ("cpu", "")


def test_checkpoints_keep_every_finished_case(tmp_path, monkeypatch):
    """The JSON is rewritten after every case with complete: false, so a run killed midway
    leaves its finished cases readable."""
    from convlstm_fast.bench import suite

    seen = []
    real = suite.run_suite

    def spy(config, progress=True, on_task=None):
        def record(partial):
            on_task(partial)
            seen.append(json.loads((tmp_path / "run.json").read_text()))
        return real(config, progress, record)

    monkeypatch.setattr("convlstm_fast.bench.__main__.run_suite", spy)
    assert main(["--quick", "--device", "cpu", "--variants", "a,b", "--backends", "reference",
                 "--no-network", "--no-sweep", "--no-progress", "--no-plots", "--out",
                 str(tmp_path), "--stem", "run"]) == 0
    assert len(seen) == 4 and all(not s["complete"] for s in seen)
    assert [len(s["latency"]) for s in seen] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run.json").read_text())["complete"] is True


def test_profile_summary_counts_and_ranks_the_activities():
    """The GPU-time table's figures (harness.device_profile on CUDA) from a profiler's events:
    here the CPU ops of a known call, with the same aggregation."""
    from torch.profiler import ProfilerActivity, profile

    from convlstm_fast.bench.harness import profile_summary
    from convlstm_fast.bench.report import _profile_markdown

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            torch.mm(a, a)
        torch.relu(a)
    summary = profile_summary(prof.events(), torch.autograd.DeviceType.CPU, wall_ms=1.0)
    counts = {entry["name"]: entry["count"] for entry in summary["top"]}
    assert counts.get("aten::mm") == 3
    assert summary["kernels"] >= 4 and summary["kernel_ms"] > 0
    assert [e["ms"] for e in summary["top"]] == sorted((e["ms"] for e in summary["top"]),
                                                       reverse=True)
    record = {"variant": "a", "backend": "triton", "mode": "forward", "profile": summary}
    table = _profile_markdown("paper", [record])
    assert "| a | triton | forward | 1 |" in table and "busy" in table
