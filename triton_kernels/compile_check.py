"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU.

    python -m convlstm_fast.triton_kernels.compile_check [--arch 80 90] [--quick] [--jobs N]

Compiles each ``@triton.jit`` kernel that the launchers can choose on a GPU at every block
configuration (``_common.GPU_BLOCK_CS``) × K ∈ {1, 3, 5} × {fp32, bf16}, with the launch options
(num_warps, num_stages) the launchers use; see :func:`cases` for the flag combinations. This
catches what the interpreter cannot: unsupported ops, tl.dot shape/layout constraints, and
shared memory over the architecture's limit (checked here). Exits non-zero if any compile
fails. About 130 compiles per architecture, 1-10 s each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import (_common, channel_attention_layer, convlstm_layer, pooled_layer,
               spatial_attention_layer)

MODULES = (pooled_layer, convlstm_layer, channel_attention_layer, spatial_attention_layer)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Opt-in shared memory per block (A100: 163 KB, H100: 227 KB).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


def _signature(kernel, fp32_pointers, constexprs, dtype: str) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_pointers else "*" + dtype
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
                for kernel, fp32_pointers, constexprs, options in module.compile_cases(
                        TORCH_DTYPES[dtype], ksize, block_c, act, dot):
                    if combo != base and kernel.__name__ in kernels_done:
                        continue
                    kernels_done.add(kernel.__name__)
                    key = (kernel.__name__, dtype, tuple(sorted(constexprs.items())),
                           tuple(sorted(options.items())))
                    if key in seen:  # e.g. the TF32 combo of a kernel without tl.dot
                        continue
                    seen.add(key)
                    flags = ",".join(f"{k}={v}" for k, v in {**constexprs, **options}.items())
                    label = f"{kernel.__name__}[{dtype},{flags}]"
                    signature = _signature(kernel, fp32_pointers, constexprs, dtype)
                    yield label, kernel, signature, constexprs, options


def compile_one(arch: int, index: int, quick: bool) -> tuple[str, int, str | None]:
    """Compile case number ``index`` of :func:`cases` for ``sm_<arch>``:
    ``(label, shared memory in bytes, error or None)``."""
    label, kernel, signature, constexprs, options = list(cases(quick))[index]
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        shared = compiled.metadata.shared
        if shared > SHARED_MEMORY_LIMIT[arch]:
            raise RuntimeError(f"needs {shared} B of shared memory, sm_{arch} has "
                               f"{SHARED_MEMORY_LIMIT[arch]} B per block")
    except Exception as error:  # report every failure, then exit non-zero
        return label, 0, f"{type(error).__name__}: {error}"
    return label, shared, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--quick", action="store_true", help="K = 3 only")
    parser.add_argument("--only", help="compile only the cases whose label matches this regex")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiles run in this many processes (default: one per core)")
    args = parser.parse_args(argv)
    labels = [case[0] for case in cases(args.quick)]
    work = [(arch, index, args.quick) for arch in args.arch for index, label in enumerate(labels)
            if not args.only or re.search(args.only, label)]
    failures, start = [], time.time()
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for (arch, _, _), (label, shared, error) in zip(work, pool.map(compile_one, *zip(*work))):
            if error is not None:
                failures.append(f"sm_{arch} {label}: {error}")
                print("FAIL", failures[-1].splitlines()[0], flush=True)
            else:
                print(f"ok   sm_{arch} {label} (shared {shared} B)", flush=True)
    count = len(work)
    print(f"{count - len(failures)}/{count} kernels compiled for sm_{args.arch} with triton "
          f"{triton.__version__} in {time.time() - start:.0f} s")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
