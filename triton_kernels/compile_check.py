"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU, with its
static resources (registers, spills, shared memory, occupancy) and a gate on them.

    python -m convlstm_fast.triton_kernels.compile_check [--arch 80 90] [--quick] [--jobs N]
                                                         [--report PATH.md]

Compiles each ``@triton.jit`` kernel that the launchers can choose on a GPU at every block
configuration (``_common.GPU_BLOCK_CS``) × K ∈ {1, 3, 5} × {fp32, bf16}, with the launch options
(num_warps, num_stages) the launchers use; see :func:`cases` for the flag combinations. This
catches what the interpreter cannot: unsupported ops, tl.dot shape/layout constraints, and
shared memory over the architecture's limit (checked here). Exits non-zero if any compile
fails. Every kernel is also held against the resource targets (:func:`gate`): no register
spill in 16-bit kernels at K <= 5 or in fp32 kernels at K = 3, and >= 25 % occupancy for the
forward step kernels (``FORWARD_STEP_KERNELS``), both on sm_90 (the H200). Misses are listed in
the output and the table (``--report`` writes it as Markdown); ``--gate`` makes them fail the
run, as CI runs it (triton 3.6 every K, triton 3.9 K = 3; benchmarks/results/triton-resources-*).

Registers and spills come from ``ptxas -v``: the log of triton's own ptxas run (its
``TRITON_DUMP_PTXAS_LOG`` knob), with triton's own flags. Every run compiles into a fresh triton
cache, so that ptxas always runs: a rerun of ptxas on cached PTX would not reproduce them
(triton 3.9 adds ``--regAllocOptLevel=2``, and with it two kernels spill 8 and 28 B that the
bare rerun reported free); occupancy is the resident warps per SM over 64,
limited by registers (65536 per SM, allocated per warp in units of 256), shared memory and
32 blocks per SM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import OP_MODULES, _common, convlstm_layer, pooled_layer, spatial_attention_layer

# The modules that define kernels, each listing its kernels' cases (compile_cases): _common the
# kernels of more than one op, an op file its own (input_ and output_attention_layer launch only
# _common's, and define none).
MODULES = (_common, *(module for module in OP_MODULES.values() if hasattr(module, "compile_cases")))
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Opt-in shared memory per block (A100: 163 KB, H100: 227 KB) and per SM (164 KB, 228 KB); the
# driver reserves 1 KB per resident block.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
SHARED_MEMORY_PER_SM = {80: 167936, 90: 233472}
REGISTERS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 64, 32
GATED_ARCH = 90
MIN_OCCUPANCY = 0.25
# The kernels launched once per time step in the forward pass (the recurrence's critical path),
# by name (as the resource rows hold them).
FORWARD_STEP_KERNELS = frozenset(kernel.__name__ for kernel in (
    pooled_layer._pooled_layer_fwd_kernel, convlstm_layer._convlstm_layer_fwd_kernel,
    _common.attention_features_kernel, _common.attention_logits_kernel,
    _common.attention_cell_kernel, spatial_attention_layer._spatial_logits_kernel,
    spatial_attention_layer._spatial_input_kernel, spatial_attention_layer._spatial_cell_kernel))


def _signature(kernel, pointer_types, constexprs, dtype: str) -> dict:
    """``pointer_types``: the names of the fp32 pointers, or a {name: type} dict; other pointers
    are ``dtype``."""
    if not isinstance(pointer_types, dict):
        pointer_types = dict.fromkeys(pointer_types, "fp32")
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, dtype)
        else:
            signature[name] = "i32"
    return signature


def cases(quick: bool = False):
    """(label, kernel, signature, constexprs, launch options) of every compile to check.

    Each kernel's first listed case (its most complete flag combination) is compiled for every
    K × dtype (the layout- and size-dependent part); its other flag combinations (HAS_REC, CELL,
    OUTPUT_GATE, ...) once, at K = 3 in bf16. fp16 and TF32 dots once per kernel at K = 3."""
    sizes = (3,) if quick else _common.KERNEL_SIZES_CHECKED
    base = ("bf16", 3, 0, "ieee")
    combos = [base] + [(d, k, 0, "ieee") for d in ("fp32", "bf16") for k in sizes
                       if (d, k) != base[:2]]
    combos += [("fp16", 3, 0, "ieee"), ("fp32", 3, 0, "tf32")]
    seen = set()
    for module in MODULES:
        for block_c in _common.GPU_BLOCK_CS:
            for combo in combos:
                dtype, ksize, act, dot = combo
                kernels_done = set()
                for kernel, pointer_types, constexprs, options in module.compile_cases(
                        TORCH_DTYPES[dtype], ksize, block_c, act, dot):
                    if combo != base and kernel.__name__ in kernels_done:
                        continue
                    kernels_done.add(kernel.__name__)
                    key = (kernel.__name__, dtype, tuple(sorted(constexprs.items())),
                           tuple(sorted((k, repr(v)) for k, v in options.items())))
                    if key in seen:  # e.g. the TF32 combo of a kernel without tl.dot
                        continue
                    seen.add(key)
                    shown = {k: v for k, v in options.items() if k != "per_arch"}
                    shown.update({f"sm{a}:{k}": v for a, o in options.get("per_arch", {}).items()
                                  for k, v in o.items()})
                    flags = ",".join(f"{k}={v}" for k, v in {**constexprs, **shown}.items())
                    label = f"{kernel.__name__}[{dtype},{flags}]"
                    signature = _signature(kernel, pointer_types, constexprs, dtype)
                    yield label, kernel, signature, constexprs, options


def ptx_resources(log: str) -> dict:
    """Registers per thread and spill bytes of the one kernel a ``ptxas -v`` log reports."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / 64) for a kernel of ``num_warps`` warps using
    ``registers`` per thread and ``shared`` bytes of shared memory per block."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(BLOCKS_PER_SM, WARPS_PER_SM // num_warps,
                 REGISTERS_PER_SM // (per_warp * num_warps))
    if shared:
        blocks = min(blocks, SHARED_MEMORY_PER_SM[arch] // (shared + 1024))
    return blocks, blocks * num_warps / WARPS_PER_SM


def compile_one(arch: int, index: int, quick: bool) -> tuple[str, dict | None, str | None]:
    """Compile case number ``index`` of :func:`cases` for ``sm_<arch>``:
    ``(label, resources or None, error or None)``."""
    label, kernel, signature, constexprs, options = list(cases(quick))[index]
    options = dict(options)  # a launcher that picks by architecture lists its picks per_arch
    options.update(options.pop("per_arch", {}).get(arch, {}))
    started = time.time()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True  # triton prints its ptxas -v log (stdout)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
        log = printed.getvalue()
        shared = compiled.metadata.shared
        if shared > SHARED_MEMORY_LIMIT[arch]:
            raise RuntimeError(f"needs {shared} B of shared memory, sm_{arch} has "
                               f"{SHARED_MEMORY_LIMIT[arch]} B per block")
        resources = ptx_resources(log)
        num_warps = compiled.metadata.num_warps
        blocks, occ = occupancy(arch, resources["registers"], num_warps, shared)
        resources.update(kernel=kernel.__name__, dtype=signature_dtype(label),
                         ksize=constexprs.get("KSIZE"), arch=arch, shared=shared,
                         num_warps=num_warps, blocks=blocks, occupancy=occ,
                         seconds=time.time() - started)
    except Exception as error:  # report every failure, then exit non-zero
        return label, None, f"{type(error).__name__}: {error}"
    return label, resources, None


def signature_dtype(label: str) -> str:
    """The dtype of a :func:`cases` label (``kernel[bf16,...]``)."""
    return label.split("[", 1)[1].split(",", 1)[0].rstrip("]")


def gate(resources: dict) -> str | None:
    """Why a compiled kernel breaks the resource gate on ``GATED_ARCH``, or None."""
    if resources["arch"] != GATED_ARCH:
        return None
    spilled = resources["spill_stores"] + resources["spill_loads"]
    ksize = resources["ksize"]
    low_precision = resources["dtype"] in ("bf16", "fp16")
    if spilled and (low_precision and (ksize is None or ksize <= 5)
                    or resources["dtype"] == "fp32" and ksize in (None, 3)):
        return (f"spills {resources['spill_stores']} B / {resources['spill_loads']} B "
                f"(stores / loads) at {resources['registers']} registers")
    if resources["kernel"] in FORWARD_STEP_KERNELS and resources["occupancy"] < MIN_OCCUPANCY:
        return (f"forward step kernel at {resources['occupancy']:.1%} occupancy "
                f"({resources['registers']} registers x {resources['num_warps']} warps, "
                f"{resources['shared']} B shared), needs >= {MIN_OCCUPANCY:.0%}")
    return None


def report(rows: list[tuple[str, dict]], archs, seconds: float) -> str:
    """The Markdown resource table of every compiled kernel."""
    lines = [f"# Triton kernels' static resources: triton {triton.__version__}, "
             f"sm_{'/sm_'.join(map(str, archs))}",
             "",
             "Written by `python -m convlstm_fast.triton_kernels.compile_check --report` "
             f"({len(rows)} compiles in {seconds:.0f} s). Registers and spill bytes from "
             "`ptxas -v`; occupancy = resident warps per SM / 64. Gate (sm_90): no spill in "
             "bf16/fp16 at K <= 5 or in fp32 at K = 3; forward step kernels >= 25 % occupancy.",
             ""]
    spilled = [r for _, r in rows if r["spill_stores"] + r["spill_loads"]]
    for arch in archs:
        mine = [r for _, r in rows if r["arch"] == arch]
        if mine:
            worst = max(mine, key=lambda r: r["spill_stores"])
            forward = [r for r in mine if r["kernel"] in FORWARD_STEP_KERNELS]
            lines.append(f"- sm_{arch}: {len(mine)} kernels, "
                         f"{sum(r in spilled for r in mine)} spill (worst "
                         f"{worst['spill_stores']} B, {worst['kernel']}), max "
                         f"{max(r['registers'] for r in mine)} registers"
                         + (f"; forward step kernels' occupancy >= "
                            f"{min(r['occupancy'] for r in forward):.1%}" if forward else ""))
    lines += ["", "| kernel | arch | regs | spill stores / loads (B) | shared (B) | warps | "
              "blocks/SM | occupancy | compile (s) | gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| `{label}` | sm_{r['arch']} | {r['registers']} | {r['spill_stores']} / "
                     f"{r['spill_loads']} | {r['shared']} | {r['num_warps']} | {r['blocks']} | "
                     f"{r['occupancy']:.1%} | {r['seconds']:.1f} | {gate(r) or 'ok'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--quick", action="store_true", help="K = 3 only")
    parser.add_argument("--only", help="compile only the cases whose label matches this regex")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiles run in this many processes (default: one per core)")
    parser.add_argument("--report", type=Path, help="write the resource table here (Markdown)")
    parser.add_argument("--gate", action="store_true",
                        help="exit non-zero when a kernel misses the resource targets")
    args = parser.parse_args(argv)
    labels = [case[0] for case in cases(args.quick)]
    work = [(arch, index, args.quick) for arch in args.arch for index, label in enumerate(labels)
            if not args.only or re.search(args.only, label)]
    failures, misses, rows, start = [], [], [], time.time()
    cache = tempfile.TemporaryDirectory(prefix="compile-check-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache.name  # read by the forked workers' triton
    with cache, concurrent.futures.ProcessPoolExecutor(
            max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for (arch, _, _), (label, resources, error) in zip(
                work, pool.map(compile_one, *zip(*work))):
            if error is not None:
                failures.append(f"sm_{arch} {label}: {error}")
                print("FAIL", failures[-1].splitlines()[0], flush=True)
                continue
            rows.append((label, resources))
            miss = gate(resources)
            if miss is not None:
                misses.append(f"sm_{arch} {label}: {miss}")
                print("MISS", misses[-1], flush=True)
            else:
                print(f"ok   sm_{arch} {label} ({resources['registers']} registers, "
                      f"{resources['spill_stores']} B spilled, shared {resources['shared']} B, "
                      f"occupancy {resources['occupancy']:.1%})", flush=True)
    count, seconds = len(work), time.time() - start
    print(f"{count - len(failures)}/{count} kernels compiled for sm_{args.arch} with triton "
          f"{triton.__version__} in {seconds:.0f} s; {len(misses)} miss the resource targets"
          + (" (--gate: failing)" if args.gate and misses else ""))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report(rows, args.arch, seconds))
        print(f"resource table: {args.report}")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures or (args.gate and misses) else 0


if __name__ == "__main__":
    sys.exit(main())
