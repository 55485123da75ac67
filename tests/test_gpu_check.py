"""The GPU check (benchmarks/gpu_check.py) without a GPU: its budget and stage timeouts, killing a
stage past its time while keeping what it wrote, the output packing limits of the device tool,
and the test selection that must never run the GPU tests interpreted. The whole rehearsal
(``gpu_check.py --rehearse``) is a CI step of tests/run.sh."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check", REPO / "benchmarks" / "gpu_check.py")


def test_default_run_fits_eight_minutes(gpu_check):
    defaults = [s for s in gpu_check.STAGES if s.default]
    assert [s.name for s in defaults] == ["build", "correctness", "bench", "sanitizer"]
    assert gpu_check.DEFAULT_BUDGET_S <= 480
    assert sum(s.min_s for s in defaults) <= gpu_check.DEFAULT_BUDGET_S
    for stage, (cap, reserve) in zip(defaults, gpu_check.stage_timeouts(
            defaults, gpu_check.DEFAULT_BUDGET_S)):
        # Each stage can get its minimum even after every earlier one ran to its cap, or the
        # earlier ones leave it its reserve: no stage's timeout exceeds what the budget allows.
        assert cap >= stage.min_s and cap + reserve <= gpu_check.DEFAULT_BUDGET_S


def test_a_stage_past_its_time_is_killed_with_its_children(gpu_check, tmp_path):
    marker = tmp_path / "child-alive"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').close()\n")
    parent = tmp_path / "parent.py"
    parent.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, "
                      f"{str(child)!r}])\nprint('partial result', flush=True)\ntime.sleep(60)\n")
    command = gpu_check.Command([sys.executable, str(parent)], cwd=str(tmp_path))
    with open(tmp_path / "stage.log", "w") as log:
        started = time.monotonic()
        status, timed_out = gpu_check.run_command(command, log, 2.0)
    assert timed_out and status == 124
    assert time.monotonic() - started < 20
    time.sleep(4)
    assert not marker.exists(), "the stage's child outlived the kill"
    text = (tmp_path / "stage.log").read_text()
    assert "partial result" in text and "killed after" in text


def test_summary_rows_survive_a_timeout(gpu_check, tmp_path, monkeypatch):
    slow = gpu_check.Stage("slow", 2, 1, lambda ctx, t: [gpu_check.Command(
        [sys.executable, "-c", "import time; print('begun', flush=True); time.sleep(30)"])])
    fast = gpu_check.Stage("fast", 30, 1, lambda ctx, t: [gpu_check.Command(
        [sys.executable, "-c", "print('done')"])])
    monkeypatch.setattr(gpu_check, "STAGES", [slow, fast])
    status = gpu_check.main(["--rehearse", "--out", str(tmp_path), "--budget", "20"])
    assert status == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| slow | TIMEOUT |" in summary and "| fast | ok |" in summary
    assert "begun" in (tmp_path / "slow.log").read_text()


def test_packing_keeps_the_device_tools_limits(gpu_check, tmp_path):
    for index in range(10):
        (tmp_path / f"stage{index}.log").write_text(f"log {index}\n")
    big = tmp_path / "huge.md"
    big.write_bytes(b"head\n" + b"x" * (gpu_check.MAX_FILE_BYTES + 1000) + b"\ntail\n")
    assert gpu_check.pack_outputs(str(tmp_path)) == []
    names = sorted(os.listdir(tmp_path))
    assert len(names) <= gpu_check.MAX_FILES and "logs.txt" in names
    assert all(os.path.getsize(tmp_path / n) <= gpu_check.MAX_FILE_BYTES for n in names)
    content = big.read_bytes()
    assert content.startswith(b"head") and content.endswith(b"tail\n")
    assert "log 7" in (tmp_path / "logs.txt").read_text()


def test_packing_reports_what_would_not_come_back(gpu_check, tmp_path):
    (tmp_path / "bad name.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    problems = gpu_check.pack_outputs(str(tmp_path))
    assert any("bad name.txt" in p for p in problems)
    assert any("folder" in p for p in problems)


def _collect(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "pytest"),
                           "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_check_selection_collects_only_gpu_tests_uninterpreted(gpu_check):
    result = _collect("tests/test_backends.py", "-m", gpu_check.CORRECTNESS_MARKERS)
    assert result.returncode == 0, result.stdout + result.stderr
    items = [line for line in result.stdout.splitlines() if line.startswith("tests/")]
    # {triton, cuda} x 5 variants x {fp32, bf16, bf16 with x the time-first view of a
    # batch-first tensor, the same walked in reverse}
    assert len(items) == 2 * 5 * 4, items
    assert all("-cpu-" not in item for item in items)


def test_gpu_tests_beside_the_interpreter_suite_are_refused():
    """`pytest tests -m gpu` would also collect tests/triton, whose conftest sets
    TRITON_INTERPRET=1: the GPU Triton tests would then test the interpreter. Refused."""
    result = _collect("tests", "-m", "gpu")
    assert result.returncode != 0
    assert "would run Triton's interpreter" in result.stdout + result.stderr


def test_initcheck_reports_are_split_by_the_kernel_that_read(tmp_path):
    """An unfiltered initcheck log (the format of the H200's compute-sanitizer 2026.x): a
    report whose device frames name convlstm_fast is ours and fails the stage; a library's
    (cuBLAS reading its workspace) is counted apart."""
    cases = _load("sanitizer_cases", REPO / "benchmarks" / "sanitizer_cases.py")
    ours = """========= Uninitialized __global__ memory read of size 2 bytes
=========     at c10::BFloat16::operator float() const+0x550 in BFloat16.h:143
=========     by thread (32,0,0) in block (46,0,0)
=========     Address 0x7f3a2c9347e0
=========         Device Frame: convlstm_fast::cuda::<unnamed>::ConvLSTMCellForward<c10::BFloat16>::operator ()(long) const+0x180 in convlstm_layer_kernel.cu:46
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: convlstm_fast::cuda::(anonymous namespace)::convlstm_layer() [0x1254fc] in _C.abi3.so
========= 
"""
    theirs = """========= Uninitialized __global__ memory read of size 4 bytes
=========     at sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n+0x1c0
=========     by thread (0,0,0) in block (0,0,0)
=========     Address 0x7f3a2c000000
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: convlstm_fast::cuda::(anonymous namespace)::pooled_layer() [0x1] in _C.abi3.so
========= 
"""
    log = tmp_path / "initcheck.log"
    log.write_text("========= COMPUTE-SANITIZER\nok   cuda a bfloat16 quick sigmoid\n" + theirs
                   + "========= ERROR SUMMARY: 1 error\n")
    mine, libraries = cases.initcheck_reports(log.read_text())
    assert (len(mine), len(libraries)) == (0, 1)
    assert cases.main(["--initcheck-log", str(log)]) == 0
    log.write_text(ours + theirs + ours + "========= ERROR SUMMARY: 3 errors\n")
    mine, libraries = cases.initcheck_reports(log.read_text())
    assert (len(mine), len(libraries)) == (2, 1)
    assert cases.main(["--initcheck-log", str(log)]) == 1
    log.write_text(theirs)  # killed before its summary: no verdict to trust
    assert cases.main(["--initcheck-log", str(log)]) == 1
