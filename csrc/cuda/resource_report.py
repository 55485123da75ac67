"""Static resources of the CUDA kernels, without a GPU: registers, spills, stack, shared memory and
occupancy of every kernel in csrc/cuda/*_kernel.cu, compiled for sm_90 (the H200) as setup.py
builds them (the same nvcc flags, -O3), from ``ptxas -v``.

    python csrc/cuda/resource_report.py [--arch 90] [--jobs N] [--report PATH.md]

Every kernel of ours is a ``__global__`` template of layer_common.cuh instantiated per functor
(``elementwise_kernel<F>``, ``tile_reduce_kernel<F>``, ``phased_kernel<F>``), launched with 256
threads (kThreads; kTileC × kRows), which is what the occupancy is computed for: resident warps
per SM / 64, limited by registers, shared memory and blocks per SM
(triton_kernels/compile_check.py's model). Exits 1
if a kernel spills registers (the numeric kernels are small: a spill means something went wrong),
or a compile fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import emulation_check  # beside this file: the toolkit and include flags

HERE = pathlib.Path(__file__).resolve().parent
THREADS_PER_BLOCK = 256  # layer_common.cuh: kThreads, and kTileC × kRows
REGISTERS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 64, 32
SHARED_MEMORY_PER_SM = {80: 167936, 90: 233472}


def nvcc_command(source: pathlib.Path, arch: int, output: pathlib.Path) -> list[str]:
    """nvcc as torch's CUDAExtension runs it for setup.py (its common flags, the toolkit and
    cuBLAS headers setup.py finds, -O3), for one architecture, with ``-Xptxas -v``."""
    from torch.utils import cpp_extension

    cuda_home, flags = emulation_check.toolkit_flags()
    flags += ["-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", *cpp_extension.COMMON_NVCC_FLAGS]
    return [f"{cuda_home}/bin/nvcc", *flags, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
            "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-c", "-o", str(output), str(source)]


ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> list[dict]:
    """One record per entry function of a ``ptxas -v`` log: mangled name, arch, registers,
    stack, spill stores/loads, static shared memory."""
    records, current = [], None
    for line in log.splitlines():
        if (match := ENTRY.search(line)):
            current = {"mangled": match.group(1), "arch": int(match.group(2)), "registers": 0,
                       "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 0}
            records.append(current)
        elif current is not None and (match := PROPERTIES.search(line)):
            current.update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
        elif current is not None and (match := USED.search(line)):
            current["registers"] = int(match.group(1))
            current["shared"] = int(match.group(2) or 0)
    return records


def kernel_label(mangled: str) -> str:
    """``elementwise_kernel<ConvLSTMCellForward<c10::BFloat16>>`` from the mangled name."""
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    demangled = re.sub(r"\(anonymous namespace\)::|convlstm_fast::(cuda::)?|<unnamed>::", "",
                       demangled)
    return re.sub(r"^void ", "", demangled.split("(", 1)[0] if "(" in demangled else demangled)


def occupancy(arch: int, registers: int, shared: int, threads: int = THREADS_PER_BLOCK):
    """(resident blocks per SM, resident warps / 64) of a ``threads``-thread block."""
    warps = threads // 32
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(BLOCKS_PER_SM, WARPS_PER_SM // warps, REGISTERS_PER_SM // max(1, per_warp * warps))
    if shared:
        blocks = min(blocks, SHARED_MEMORY_PER_SM[arch] // (shared + 1024))
    return blocks, blocks * warps / WARPS_PER_SM


def compile_source(source: pathlib.Path, arch: int) -> tuple[str, list[dict] | None, str]:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(nvcc_command(source, arch, pathlib.Path(tmp) / "kernel.o"),
                              capture_output=True, text=True)
    if done.returncode != 0:
        return source.name, None, done.stderr[-4000:]
    return source.name, parse_ptxas(done.stderr), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--report", type=pathlib.Path, help="write the table here (Markdown)")
    args = parser.parse_args(argv)
    sources = sorted(HERE.glob("*_kernel.cu"))
    rows, failures = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, records, error in pool.map(lambda s: compile_source(s, args.arch), sources):
            if records is None:
                failures.append(f"{name}: nvcc failed\n{error}")
                continue
            for record in records:
                blocks, occ = occupancy(args.arch, record["registers"], record["shared"])
                rows.append({**record, "source": name, "kernel": kernel_label(record["mangled"]),
                             "blocks": blocks, "occupancy": occ})
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    # A kernel of layer_common.cuh instantiated alike in several sources is one row.
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["registers"], r["stack"], r["spill_stores"], r["spill_loads"],
               r["shared"])
        merged.setdefault(key, {**r, "sources": []})["sources"].append(r["source"])
    lowest = min(merged.values(), key=lambda r: r["occupancy"], default=None)
    lines = [f"# CUDA kernels' static resources: sm_{args.arch}, nvcc -O3 (ptxas -v)", "",
             f"Written by `python csrc/cuda/resource_report.py --arch {args.arch}`. "
             f"{len(merged)} kernels ({len(rows)} instantiations in {len(sources)} sources), "
             f"{len(spilled)} spill; occupancy for {THREADS_PER_BLOCK}-thread blocks = resident "
             "warps per SM / 64"
             + (f", lowest {lowest['occupancy']:.1%} (`{lowest['kernel']}`)." if lowest else "."),
             "", "| kernel | regs | stack (B) | spill stores / loads (B) | shared (B) | blocks/SM "
             "| occupancy | sources |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in sorted(merged.values(), key=lambda r: r["kernel"]):
        sources = ", ".join(name.removesuffix("_kernel.cu") for name in sorted(r["sources"]))
        lines.append(f"| `{r['kernel']}` | {r['registers']} | {r['stack']} | "
                     f"{r['spill_stores']} / {r['spill_loads']} | {r['shared']} | {r['blocks']} | "
                     f"{r['occupancy']:.1%} | {sources} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)
    for failure in failures:
        print(failure, file=sys.stderr)
    if not rows and not failures:
        failures.append("no kernel found in the ptxas logs")
    for r in spilled:
        print(f"SPILL {r['source']} {r['kernel']}: {r['spill_stores']} B stores, "
              f"{r['spill_loads']} B loads at {r['registers']} registers", file=sys.stderr)
    return 1 if failures or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
