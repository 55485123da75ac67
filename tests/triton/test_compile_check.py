"""The compile check's resource accounting: ptxas log parsing, occupancy and the targets' gate
(the compiles themselves run in CI as ``python -m convlstm_fast.triton_kernels.compile_check``)."""

import os
import subprocess
import sys

import pytest

from convlstm_fast.triton_kernels import compile_check

# The shape of a `ptxas -v` report (triton 3.6's ptxas, sm_90a).
LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_pooled_layer_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _pooled_layer_fwd_kernel
    4608 bytes stack frame, 4608 bytes spill stores, 4600 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4608 bytes cumulative stack size
"""


def test_ptxas_log_parsed():
    assert compile_check.ptx_resources(LOG) == {
        "registers": 255, "spill_stores": 4608, "spill_loads": 4600}
    with pytest.raises(RuntimeError, match="unexpected ptxas"):
        compile_check.ptx_resources("ptxas info    : 0 bytes gmem\n")


@pytest.mark.parametrize("registers, warps, shared, blocks", [
    (255, 4, 0, 2),       # 256 registers x 128 threads = half of the SM's 65536
    (128, 4, 0, 4),       # 25 %: the forward step kernels' target
    (129, 4, 0, 3),       # allocated per warp in units of 256 registers: 136 per thread
    (32, 4, 0, 16),       # 64 warps per SM
    (32, 1, 0, 32),       # 32 blocks per SM
    (64, 4, 100_000, 2),  # shared memory: 228 KB per SM, 1 KB reserved per block
])
def test_occupancy(registers, warps, shared, blocks):
    assert compile_check.occupancy(90, registers, warps, shared) == (blocks, blocks * warps / 64)


def _resources(**changes):
    base = dict(kernel="pooled_layer_bwd_kernel", dtype="bf16", ksize=3, arch=90,
                registers=128, spill_stores=0, spill_loads=0, num_warps=4, shared=0,
                blocks=4, occupancy=0.25)
    return {**base, **changes}


@pytest.mark.parametrize("changes, missed", [
    ({}, False),
    ({"spill_stores": 4, "spill_loads": 4}, True),                    # bf16 at K = 3
    ({"dtype": "fp16", "ksize": 5, "spill_loads": 8}, True),
    ({"dtype": "fp32", "ksize": 3, "spill_stores": 8}, True),
    ({"dtype": "fp32", "ksize": 5, "spill_stores": 8}, False),        # fp32 only at K = 3
    ({"dtype": "bf16", "ksize": 7, "spill_stores": 8}, False),        # K <= 5 only
    ({"arch": 80, "spill_stores": 8}, False),                         # sm_90 only
    ({"occupancy": 0.125}, False),                                    # not a forward step kernel
    ({"kernel": "_pooled_layer_fwd_kernel", "occupancy": 0.125}, True),
    ({"kernel": "_pooled_layer_fwd_kernel", "occupancy": 0.25}, False),
])
def test_gate(changes, missed):
    assert (compile_check.gate(_resources(**changes)) is not None) == missed


def test_forward_step_kernels_exist():
    """A renamed kernel must not drop out of the occupancy target silently."""
    names = {case[1].__name__ for case in compile_check.cases(quick=True)}
    assert set(compile_check.FORWARD_STEP_KERNELS) <= names


@pytest.mark.parametrize("arch", [80, 90])
def test_resources_come_from_tritons_own_ptxas_run(arch, tmp_path):
    """One small kernel, checked twice with the same TRITON_CACHE_DIR: each run compiles into a
    cache of its own (the caller's stays empty), so triton runs ptxas, with its own flags, every
    time and its log gives the resources (a rerun of ptxas on cached PTX lacks triton 3.9's
    --regAllocOptLevel=2 and under-reported two kernels' spills). A real compile, so in a
    process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    command = [sys.executable, "-P", "-m", "convlstm_fast.triton_kernels.compile_check",
               "--arch", str(arch), "--quick", "--jobs", "1",
               "--only", r"attention_logits_bwd_kernel\[fp16"]
    reports = []
    for attempt in ("first", "second"):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{attempt}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        assert "1/1 kernels compiled" in done.stdout, f"{attempt}: {done.stdout[-2000:]}"
        reports.append([line for line in done.stdout.splitlines() if " registers" in line])
    assert reports[0] and reports[0] == reports[1]
    assert not any(tmp_path.iterdir()), "the check wrote into the caller's triton cache"
