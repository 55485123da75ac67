"""csrc/cuda/resource_report.py without compiling: its reading of ``ptxas -v`` (the CUDA 13 format),
the occupancy model, and the verdict (a spill fails). The report itself, on every CUDA kernel for
sm_90, is a step of tests/run.sh."""

from __future__ import annotations

import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN13convlstm_fast4cuda12_GLOBAL__N_118elementwise_kernelINS1_19ConvLSTMCellForwardIfEEEEvT_l' for 'sm_90'
ptxas info    : Function properties for _ZN13convlstm_fast4cuda12_GLOBAL__N_118elementwise_kernelINS1_19ConvLSTMCellForwardIfEEEEvT_l
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 440 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6spillyPf' for 'sm_90'
ptxas info    : Function properties for _Z6spillyPf
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
"""


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(HERE))
    try:
        import resource_report
    finally:
        sys.path.remove(str(HERE))
    return resource_report


def test_ptxas_log_is_read_per_entry_function(report):
    first, second = report.parse_ptxas(PTXAS_LOG)
    assert (first["registers"], first["stack"], first["spill_stores"], first["shared"]) == (32, 0, 0, 0)
    assert (second["registers"], second["stack"], second["spill_stores"], second["spill_loads"],
            second["shared"]) == (255, 24, 16, 8, 4096)
    assert report.kernel_label(first["mangled"]) == "elementwise_kernel<ConvLSTMCellForward<float> >"


def test_occupancy_of_256_thread_blocks(report):
    assert report.occupancy(90, 32, 0) == (8, 1.0)  # 8 blocks x 8 warps: the SM's 64 warps
    assert report.occupancy(90, 56, 1024) == (4, 0.5)  # 1792 registers a warp: 4 blocks fit
    assert report.occupancy(90, 255, 0) == (1, 0.125)


def test_a_spill_fails_the_report(report, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(report, "compile_source",
                        lambda source, arch: (source.name, report.parse_ptxas(PTXAS_LOG), ""))
    path = tmp_path / "report.md"
    assert report.main(["--jobs", "1", "--report", str(path)]) == 1
    text = path.read_text()
    assert "| `spilly` | 255 | 24 | 16 / 8 | 4096 |" in text
    assert "SPILL" in capsys.readouterr().err
    clean = PTXAS_LOG.split("ptxas info    : Compiling entry function '_Z6spilly")[0]
    monkeypatch.setattr(report, "compile_source",
                        lambda source, arch: (source.name, report.parse_ptxas(clean), ""))
    assert report.main(["--jobs", "1"]) == 0
