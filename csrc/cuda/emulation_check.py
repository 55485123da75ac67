"""Check the CUDA layer ops without a GPU: build them in emulation and compare with the reference.

With -DCONVLSTM_CUDA_EMULATE (layer_common.cuh) the same host drivers and the same
__host__ __device__ kernel bodies run on CPU tensors (a tile reduction's threads run one after
another, summing in the device's order) and register for the CPU dispatch key. This script
compiles every csrc/cuda/*_kernel.cu that way with nvcc (one arch; the toolkit and the cuBLAS
headers found as setup.py finds them) together with the schemas (csrc/convlstm_fast.cpp) into a
library of its own, loads it in a process that never imports convlstm_fast._C, and runs:

- the conformance suite's cases (tests/test_backends.py: those it runs for the "cuda" backend,
  ``selected("cuda")``, in the dtypes the backend offers; their shapes, problems and STYLE.md's
  distance rule, ``check_results``): every output and gradient of the op and its backward
  against the reference, which is what test_backend_matches_reference holds the real "cuda"
  backend to on a GPU (a non-contiguous case hands the op its x as a view, a reverse case walks
  t = T − 1 … 0 in the op, its twin and its backward); per case also the ``saved`` tensors
  against the registry's (``spec.saved_spec("cuda")``) and the ``<op>_inference`` twin against
  the op, bit for bit;
- what only this check holds the CUDA sources to: float64 on edge shapes (K = 1, 5, C over
  several channel tiles; both walks) within 1e-9, and the numeric contract of ops/registration.py
  (tests/test_numerics.py holds every backend to it): every gate pre-activation at
  hard_sigmoid's kinks ±2.5 (float64, float32, bfloat16), activations of 1e-5 (float32), NaN
  kept in its sample with the reference's isnan mask, and (a–d) bfloat16's cell state exact
  fp32 between the steps (``check_exact_cell_state``);
- per-sample ``lengths`` (ops/registration.py; a full, a one-step, an empty and a T − 2 sample)
  for every variant, both activations and both walks: every output and gradient against the
  reference's ``cells.layer(..., lengths=)``, float64 within 1e-9, float32 and bfloat16 with
  STYLE.md's rule, and the twin against the op;
- the launches one more step adds, per op and direction — our own kernels (the emulation build
  counts the launch helpers' calls) and the ATen calls of the driver (each at least one kernel
  on a GPU) — against the ``LAUNCHES_PER_STEP`` line of its csrc/cuda/<op>_kernel.cu, in either
  walk (reverse launches what the forward walk does), and every launch of the forward in its
  traffic model (``check_modelled_launches``).
What it cannot check: launch configurations, shared memory and anything cuBLAS/cuDNN-specific.

    python csrc/cuda/emulation_check.py [--build-dir DIR] [--no-build]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import pathlib
import re
import subprocess
import sys
import sysconfig

import torch

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parent
REPO = CSRC.parent


def _load(name: str, path: pathlib.Path):
    """The module at ``path`` (setup.py's helpers, the test suite's case table), by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def toolkit_flags() -> tuple[str, list[str]]:
    """(the CUDA toolkit folder, the include and ABI flags every nvcc run of csrc/ needs), found
    as setup.py finds them (also for resource_report.py)."""
    from torch.utils import cpp_extension

    setup = _load("convlstm_fast_setup", REPO / "setup.py")
    cuda_home = setup.cuda_home()
    cpp_extension.CUDA_HOME = cuda_home  # torch guessed it at import; include_paths reads it
    flags = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    flags += [f"-I{p}" for p in setup.cuda_library_includes(cuda_home)]
    flags += [f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-std=c++20"]
    return cuda_home, flags


def build(build_dir: pathlib.Path) -> pathlib.Path:
    cuda_home, flags = toolkit_flags()
    flags = [*flags, "-DCONVLSTM_CUDA_EMULATE"]
    build_dir.mkdir(parents=True, exist_ok=True)
    objects = []
    for source in sorted(HERE.glob("*_kernel.cu")):
        obj = build_dir / f"{source.stem}.o"
        subprocess.run([f"{cuda_home}/bin/nvcc", *flags, "-gencode", "arch=compute_90,code=sm_90",
                        "-O1", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                        "-c", "-o", str(obj), str(source)], check=True)
        objects.append(str(obj))
    schemas = build_dir / "schemas.o"
    subprocess.run(["g++", *flags, "-O1", "-fPIC", "-c", "-o", str(schemas),
                    str(CSRC / "convlstm_fast.cpp")], check=True)
    library = build_dir / "libconvlstm_cuda_emulation.so"
    torch_lib = pathlib.Path(torch.__file__).parent / "lib"
    subprocess.run([f"{cuda_home}/bin/nvcc", "-shared", "-o", str(library), *objects, str(schemas),
                    f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_cuda",
                    "-lc10_cuda", "-Xlinker", f"-rpath,{torch_lib}"], check=True)
    return library


def run_ops(variant: str, x, h0, c0, params: dict, gate_activation: str, weights,
            reverse: bool = False, lengths: torch.Tensor | None = None) -> tuple:
    """The emulated op, its ``_inference`` twin and its backward with ``weights`` as the output
    gradients (what autograd hands the backward for the loss Σ w·(out, h_n, c_n)), all walking
    ``reverse`` and masked by ``lengths`` as asked: ``({name: tensor} in the conformance suite's
    names, saved, inference)``."""
    from convlstm_fast import get_cell
    from convlstm_fast.registry import GATE_ACTIVATIONS

    name = get_cell(variant).op
    code = GATE_ACTIVATIONS.index(gate_activation)
    plist = list(params.values())
    ops = torch.ops.convlstm_fast
    out, h_n, c_n, saved = getattr(ops, name)(x, h0, c0, plist, code, reverse, lengths)
    inference = getattr(ops, name + "_inference")(x, h0, c0, plist, code, reverse, lengths)
    grads = [w.to(x.dtype) for w in weights]
    grad_x, grad_h0, grad_c0, grad_params = getattr(ops, name + "_backward")(
        *grads, x, h0, c0, plist, out, saved, code, reverse, lengths)
    results = {"output": out, "h_n": h_n, "c_n": c_n, "grad_x": grad_x, "grad_h0": grad_h0,
               "grad_c0": grad_c0}
    results.update({"grad_" + p: g for p, g in zip(params, grad_params)})
    return results, saved, inference


def check_twin_and_saved(label: str, variant: str, results: dict, saved, inference, x, h0,
                         params: dict) -> bool:
    """The ``_inference`` twin equals the op bit for bit; ``saved`` is what the registry says the
    CUDA kernel saves."""
    from convlstm_fast import get_cell

    ok = True
    for output_name, a in zip(("output", "h_n", "c_n"), inference):
        if not torch.equal(a, results[output_name]):
            print(f"  FAIL {label} _inference {output_name} differs from the op's")
            ok = False
    want = get_cell(variant).saved_spec("cuda")(x, h0, list(params.values()))
    got = [(tuple(s.shape), s.dtype) for s in saved]
    if got != [(tuple(shape), dtype) for shape, dtype in want]:
        print(f"  FAIL {label} saved {got}, the registry says {want}")
        ok = False
    return ok


def conformance_cases(cases, variant: str) -> list:
    """The cases test_backend_matches_reference runs for backend "cuda" and ``variant``: those
    the suite selects for "cuda" in a dtype the backend offers (float64 skips there with its
    reason; the float64 checks below hold the kernels to 1e-9 instead)."""
    from convlstm_fast.backends.native import BACKENDS

    return [case for name, case in cases.selected("cuda")
            if name == variant and case.dtype in BACKENDS["cuda"].dtypes]


def check_conformance(cases, conftest, variant: str, case) -> bool:
    """One case of tests/test_backends.py for the emulated CUDA kernel, as
    test_backend_matches_reference runs it."""
    label = f"{variant} {case.name}"
    shape = cases._shape(variant, case)
    lengths = cases.ragged_lengths(*shape[:2]) if case.ragged else None
    walk = dict(reverse=case.reverse, lengths=lengths)
    x, h0, c0, params, weights = conftest.separated_problem(
        variant, shape, case.dtype, case.gate_activation, **walk)
    exact = cases._results("reference", variant, x, h0, c0, params, case.gate_activation, weights,
                           **walk)
    low = lambda t: t.to(case.dtype)  # noqa: E731
    args = (low(x), low(h0), low(c0), {k: low(v) for k, v in params.items()})
    reference = cases._results("reference", variant, *args, case.gate_activation, weights, **walk)
    x_in = cases.layout_view(args[0], case.layout)
    got, saved, inference = run_ops(variant, x_in, *args[1:], case.gate_activation, weights,
                                    case.reverse,
                                    None if lengths is None else torch.tensor(lengths))
    ok = check_twin_and_saved(label, variant, got, saved, inference, args[0], args[1], args[3])
    try:
        for note in cases.check_results(conftest.check_close_to_float64, got, reference, exact,
                                        case.dtype):
            print(f"  xfail {label} (test_backends.CANCELLED): {note}")
    except AssertionError as error:
        print(f"  FAIL {label} {str(error).splitlines()[0]}")
        ok = False
    return ok


def check(variant: str, gate_activation: str, dtype: torch.dtype, shape, seed: int = 0,
          case: str = "random", reverse: bool = False, lengths: list[int] | None = None) -> bool:
    """Every output and gradient of the op against the reference, both walking ``reverse`` and
    masked by ``lengths`` (one per sample, int64 on x's device) as asked: float64 within 1e-9
    (relative), other dtypes with STYLE.md's rule. ``case``: "random"
    weights and inputs;
    "small", those with x, h0, c0 and the biases scaled by 1e-5 (every tanh argument and
    activation ~1e-5); "kinks", all weights 0 and the gate biases alternately +2.5 and −2.5 (with
    an odd hidden size every gate meets both kinks and every channel keeps C_t ≠ 0), so every gate
    pre-activation sits on a kink of hard_sigmoid."""
    from convlstm_fast import get_cell
    from convlstm_fast.reference import cells

    spec = get_cell(variant)
    biases = {p.name for p in spec.parameters if p.is_bias}
    steps, batch, cin, hidden, height, width, k = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=generator, dtype=torch.float64) * scale).to(dtype).double()

    params = {n: randn(*s, scale=0.5) for n, s in spec.parameter_shapes(cin, hidden, k).items()}
    x = randn(steps, batch, cin, height, width)
    h0, c0 = randn(batch, hidden, height, width, scale=0.5), randn(batch, hidden, height, width, scale=0.5)
    if case == "small":
        x, h0, c0 = (t * 1e-5 for t in (x, h0, c0))
        params = {n: p * 1e-5 if n in biases else p for n, p in params.items()}
    elif case == "kinks":
        for name, p in params.items():
            if name == spec.gates.bias:
                p.copy_(2.5 * (-1.0) ** torch.arange(p.numel(), dtype=torch.float64))
            elif name not in biases:
                p.zero_()
    weights = [randn(steps, batch, hidden, height, width), randn(batch, hidden, height, width),
               randn(batch, hidden, height, width)]
    label = f"{variant} {gate_activation} {dtype} {shape} {case}{' reverse' if reverse else ''}"
    if lengths is not None:
        label += f" lengths={lengths}"
        lengths = torch.tensor(lengths, dtype=torch.int64)

    def reference(cast):
        leaves = [cast(t).requires_grad_() for t in (x, h0, c0, *params.values())]
        out, h_n, c_n = cells.layer(variant, *leaves[:3], dict(zip(params, leaves[3:])),
                                    gate_activation, reverse=reverse, lengths=lengths)
        loss = sum((t * cast(w)).sum() for t, w in zip((out, h_n, c_n), weights))
        return [out.detach(), h_n.detach(), c_n.detach(), *torch.autograd.grad(loss, leaves)]

    want64 = reference(lambda t: t.detach().clone())
    cast = lambda t: t.to(dtype)  # noqa: E731
    args = [cast(t) for t in (x, h0, c0)]
    low_params = {n: cast(p) for n, p in params.items()}
    results, saved, inference = run_ops(variant, *args, low_params, gate_activation, weights,
                                        reverse, lengths)
    ok = check_twin_and_saved(label, variant, results, saved, inference, args[0], args[1],
                              low_params)
    want_low = None if dtype == torch.float64 else reference(lambda t: cast(t.detach()))
    for index, ((output_name, g), w64) in enumerate(zip(results.items(), want64)):
        error = (g.double() - w64).abs().max().item()
        if want_low is None:
            bound = 1e-9 * max(w64.abs().max().item(), 1.0)
        else:
            eps = 1e-6 if dtype == torch.float32 else 1e-3
            bound = 2 * (want_low[index].double() - w64).abs().max().item() + eps * w64.abs().max().item()
        if not error <= bound:
            print(f"  FAIL {label} {output_name}: {error:.3g} > {bound:.3g}")
            ok = False
    return ok


def check_nan(variant: str, gate_activation: str, poison: str, seed: int = 0) -> bool:
    """float32, B = 2: a NaN in sample 1 keeps to it, with the float64 reference's isnan mask
    of output, h_n and c_n, and sample 0 equals a clean run bit for bit. ``poison``: "pixel",
    one NaN pixel of one input channel at step 1; "logits" (c, d), a NaN born in the attention
    logits Z while the pooled gates stay finite: x = +inf at one pixel of two channels whose
    attention depthwise taps are positive and pointwise weights of opposite signs (F = inf − inf)
    and whose gate weights are positive (σ(+inf) = 1), at step 0 of one step, so that only the
    max over the pixels (torch.amax keeps NaN) spreads the NaN over every plane of A."""
    from convlstm_fast import get_cell
    from convlstm_fast.reference import cells
    from convlstm_fast.registry import GATE_ACTIVATIONS

    spec = get_cell(variant)
    steps, batch, cin, hidden, height, width, k = (3, 2, 3, 4, 6, 7, 3) if poison == "pixel" else (1, 2, 3, 4, 8, 8, 3)
    generator = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=generator, dtype=torch.float64).float() * 0.5
              for n, s in spec.parameter_shapes(cin, hidden, k).items()}
    x = torch.randn(steps, batch, cin, height, width, generator=generator).float()
    h0, c0 = (torch.randn(batch, hidden, height, width, generator=generator).float() * 0.5 for _ in range(2))
    poisoned = x.clone()
    if poison == "pixel":
        poisoned[1, 1, 0, 2, 3] = float("nan")
    else:
        params["att_dw_x"][:2] = params["att_dw_x"][:2].abs()
        params["att_pw_x"][:, 0] = params["att_pw_x"][:, 0].abs()
        params["att_pw_x"][:, 1] = -params["att_pw_x"][:, 1].abs()
        params["gate_weight_x"] = params["gate_weight_x"].abs()
        poisoned[0, 1, :2, 5, 5] = float("inf")
    code = GATE_ACTIVATIONS.index(gate_activation)
    op = getattr(torch.ops.convlstm_fast, spec.op + "_inference")
    clean = op(x, h0, c0, list(params.values()), code)
    got = op(poisoned, h0, c0, list(params.values()), code)
    want = cells.layer(variant, poisoned.double(), h0.double(), c0.double(),
                       {n: p.double() for n, p in params.items()}, gate_activation)
    ok = True
    for output_name, g, c, w in zip(("output", "h_n", "c_n"), got, clean, want):
        sample = 1 if g.dim() == 5 else 0
        if not torch.equal(torch.isnan(g), torch.isnan(w)):
            print(f"  FAIL {variant} {gate_activation} NaN {poison} {output_name}: NaN at "
                  f"{int(torch.isnan(g).sum())} elements, the reference at {int(torch.isnan(w).sum())}")
            ok = False
        if not torch.equal(g.select(sample, 0), c.select(sample, 0)):
            print(f"  FAIL {variant} {gate_activation} NaN {poison} {output_name}: the clean sample changed")
            ok = False
    return ok


# The table each kernel file declares: "// LAUNCHES_PER_STEP forward=(K, A) backward=(K, A)",
# our own kernels K and ATen calls A that one more step adds.
_TABLE = re.compile(r"LAUNCHES_PER_STEP forward=\((\d+), (\d+)\) backward=\((\d+), (\d+)\)")


def check_exact_cell_state(variant: str, reverse: bool, seed: int = 0) -> bool:
    """bfloat16, a–d: the fp32 cell state between the steps is exact (pooled_cell.cuh
    StepCellState keeps it as the saved bf16 C_t plus the low halves of its bits). The recurrence
    C_t = f∘C_{t−1} + i∘G is redone in float64 from the op's own saved G, gate pre-activations
    (and c/d's map A), each as the kernel used it (rounded), and the saved C_t must be it rounded
    to bf16 but where C_t lies within float32's error of a rounding boundary (< 0.1 % of the
    elements; one kept in bf16 alone, i.e. without its low half, misses ~a quarter of them). The
    STYLE.md rule of the conformance checks cannot tell: a bf16 state is as close to float64 as
    the bf16 reference is."""
    from convlstm_fast import get_cell
    from convlstm_fast.reference.cells import gate_activation_fn

    spec = get_cell(variant)
    steps, batch, cin, hidden, height, width, k = 4, 2, 6, 24, 5, 6, 3
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *size: torch.randn(size, generator=generator).to(torch.bfloat16)  # noqa: E731
    params = {n: randn(*s) * 0.5 for n, s in spec.parameter_shapes(cin, hidden, k).items()}
    x, h0, c0 = randn(steps, batch, cin, height, width), randn(batch, hidden, height, width), \
        randn(batch, hidden, height, width) * 4
    weights = [torch.zeros(steps, batch, hidden, height, width), torch.zeros_like(h0),
               torch.zeros_like(c0)]
    _, saved, _ = run_ops(variant, x, h0, c0, params, "sigmoid", weights, reverse)
    cell, cand, gate_pre = (saved[i].double() for i in range(3))
    gates = gate_pre.view(steps, batch, -1, hidden)
    att = saved[3].double() if "att_pw_z" in spec.parameter_names else None
    act = gate_activation_fn("sigmoid")
    c = c0.double().permute(0, 2, 3, 1).reshape(batch, height * width, hidden)
    misses, total = 0, 0
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        g = act(gates[t].float()).double()[:, :, None, :]  # [B, n, 1, C] as the kernel's fp32
        g_cand = cand[t].reshape(batch, height * width, hidden)
        if att is None:
            i, f = g[:, 0], g[:, 1]
        else:
            a = att[t].reshape(batch, height * width, hidden)
            i, f = (a, g[:, 0]) if variant == "c" else (g[:, 0], g[:, 1])
        c = f * c + i * g_cand
        want = c.float().to(torch.bfloat16).double()
        got = cell[t].reshape(batch, height * width, hidden)
        misses += int((got != want).sum())
        total += got.numel()
    ok = misses <= 0.001 * total
    if not ok:
        print(f"  FAIL {variant} bf16{' reverse' if reverse else ''}: the saved C_t is not the "
              f"exact fp32 state rounded in {misses} of {total} elements")
    return ok


def declared_launches(op: str) -> dict[str, tuple[int, int]]:
    match = _TABLE.search((HERE / f"{op}_kernel.cu").read_text())
    if match is None:
        raise ValueError(f"csrc/cuda/{op}_kernel.cu declares no LAUNCHES_PER_STEP line")
    k_f, a_f, k_b, a_b = map(int, match.groups())
    return {"forward": (k_f, a_f), "backward": (k_b, a_b)}


def measured_launches(library: pathlib.Path, variant: str,
                      reverse: bool = False) -> dict[str, tuple[float, float]]:
    """What one more step adds to the emulated op (forward with saving, and its backward), walking
    ``reverse`` as asked: our own kernel launches and ATen calls, the op at T = 1 and T = 3, the
    difference halved."""
    from convlstm_fast import get_cell
    from convlstm_fast.ops.aten_calls import AtenCalls

    counter = ctypes.CDLL(str(library)).convlstm_fast_emulated_launches
    counter.restype = ctypes.c_int64
    spec = get_cell(variant)
    ops = torch.ops.convlstm_fast
    totals = {"forward": [], "backward": []}
    for steps in (1, 3):
        generator = torch.Generator().manual_seed(steps)
        params = [torch.randn(p.shape(3, 4, 3), generator=generator) * 0.3
                  for p in spec.parameters]
        x = torch.randn(steps, 2, 3, 5, 6, generator=generator)
        h0, c0 = (torch.randn(2, 4, 5, 6, generator=generator) for _ in range(2))
        for mode in ("forward", "backward"):
            out, h_n, c_n, saved = getattr(ops, spec.op)(x, h0, c0, params, 0, reverse)
            grads = [torch.randn_like(t) for t in (out, h_n, c_n)]
            before = counter()
            with AtenCalls(into_own_ops=True) as aten:
                if mode == "forward":
                    getattr(ops, spec.op)(x, h0, c0, params, 0, reverse)
                else:
                    getattr(ops, spec.op + "_backward")(*grads, x, h0, c0, params, out, saved, 0,
                                                        reverse)
            totals[mode].append((counter() - before, sum(aten.calls.values())))
    return {mode: tuple((b - a) / 2 for a, b in zip(*pair)) for mode, pair in totals.items()}


def check_launches(library: pathlib.Path, variant: str, reverse: bool) -> bool:
    """The declared launches per step; the reverse walk must launch exactly what the forward
    one does."""
    from convlstm_fast import get_cell

    op = get_cell(variant).op
    measured = measured_launches(library, variant, reverse)
    declared = {mode: tuple(map(float, n)) for mode, n in declared_launches(op).items()}
    if measured != declared:
        walk = " (reverse)" if reverse else ""
        print(f"  FAIL {variant} launches per step{walk} (own kernels, ATen calls): measured "
              f"{measured}, csrc/cuda/{op}_kernel.cu declares {declared}")
        return False
    return True


def check_modelled_launches(library: pathlib.Path, variant: str) -> bool:
    """The forward's traffic model (convlstm_fast/ops/cuda_traffic.py, bench --roofline) has a
    record for every launch the emulated forward issues at T = 2, the batched ones before the
    loop included: as many of our kernels, and (a–d) its ATen calls by the name each record
    starts with. convlstm's ATen calls are convolutions, which CPU tensors take through other
    ATen calls than cuDNN's (the model names the GPU's)."""
    from collections import Counter

    from convlstm_fast import get_cell
    from convlstm_fast.bench import cases as bench_cases
    from convlstm_fast.bench import roofline
    from convlstm_fast.ops import cuda_traffic
    from convlstm_fast.ops.aten_calls import AtenCalls

    counter = ctypes.CDLL(str(library)).convlstm_fast_emulated_launches
    counter.restype = ctypes.c_int64
    spec = get_cell(variant)
    steps, batch, cin, hidden, height, width, k = 2, 2, 3, 4, 5, 6, 3
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(p.shape(cin, hidden, k), generator=generator) * 0.3
              for p in spec.parameters]
    x = torch.randn(steps, batch, cin, height, width, generator=generator)
    h0, c0 = (torch.randn(batch, hidden, height, width, generator=generator) for _ in range(2))
    before = counter()
    with AtenCalls(into_own_ops=True) as aten:
        getattr(torch.ops.convlstm_fast, spec.op)(x, h0, c0, params, 0, False)
    kernels = counter() - before
    shape = bench_cases.CellShape(batch, steps, cin, hidden, height, width, k)
    records = [r for r in getattr(cuda_traffic, spec.op)(shape, 4) if r.phase == roofline.FORWARD]
    modelled = Counter()
    for record in records:
        if record.kind != roofline.KERNEL:
            modelled[record.name.split(" ")[0]] += record.count
    modelled_kernels = sum(r.count for r in records if r.kind == roofline.KERNEL)
    ok = kernels == modelled_kernels and (variant == "convlstm" or aten.calls == modelled)
    if not ok:
        print(f"  FAIL {variant} forward launches against its traffic model: {kernels} kernels "
              f"and ATen calls {dict(aten.calls)}, modelled {modelled_kernels} and "
              f"{dict(modelled)}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default="/tmp/convlstm_fast_cuda_emulation")
    parser.add_argument("--no-build", action="store_true", help="reuse the library built before")
    args = parser.parse_args()
    library = pathlib.Path(args.build_dir) / "libconvlstm_cuda_emulation.so"
    if not args.no_build:
        library = build(pathlib.Path(args.build_dir))
    torch.ops.load_library(str(library))
    from convlstm_fast import cell_names, get_cell

    cases = _load("test_backends_cases", REPO / "tests" / "test_backends.py")
    conftest = _load("tests_conftest", REPO / "tests" / "conftest.py")
    float64_shapes = [(3, 2, 3, 5, 4, 6, 3), (1, 1, 3, 4, 5, 7, 1), (2, 1, 6, 3, 7, 5, 5),
                      (2, 1, 33, 40, 5, 5, 3)]
    kink_shape = (2, 2, 3, 3, 3, 4, 3)  # hidden 3: odd, see check
    # lengths (ops/registration.py): a full, a one-step, an empty and a T − 2 sample; hidden 40
    # spans two channel tiles.
    lengths_shapes = [((4, 4, 3, 5, 4, 6, 3), [4, 1, 0, 2]), ((3, 4, 2, 40, 3, 3, 1), [3, 1, 0, 1])]
    counts = {"conformance": 0, "float64": 0, "contract": 0, "lengths": 0, "launch-count": 0}
    ok = True
    for variant in (v for v in cell_names() if "cuda" in get_cell(v).kernels):
        variant_ok = True
        for reverse in (False, True):
            variant_ok &= check_launches(library, variant, reverse)
            counts["launch-count"] += 1
        variant_ok &= check_modelled_launches(library, variant)
        counts["launch-count"] += 1
        for case in conformance_cases(cases, variant):
            variant_ok &= check_conformance(cases, conftest, variant, case)
            counts["conformance"] += 1
        for gate_activation in ("sigmoid", "hard_sigmoid"):
            for shape in float64_shapes:
                variant_ok &= check(variant, gate_activation, torch.float64, shape)
                counts["float64"] += 1
        # The reverse walk on the same edge shapes (T = 1 among them).
        for shape in float64_shapes:
            variant_ok &= check(variant, "sigmoid", torch.float64, shape, reverse=True)
            counts["float64"] += 1
        # Per-sample lengths, both walks, float64 (1e-9), float32 and bfloat16 (STYLE.md's rule;
        # bfloat16: the split cell state, pooled_cell.cuh LayerCellState, carried).
        for gate_activation in ("sigmoid", "hard_sigmoid"):
            for reverse in (False, True):
                for dtype in (torch.float64, torch.float32, torch.bfloat16):
                    for shape, lengths in lengths_shapes:
                        if dtype != torch.float64 and shape is not lengths_shapes[0][0]:
                            continue
                        variant_ok &= check(variant, gate_activation, dtype, shape,
                                            reverse=reverse, lengths=lengths)
                        counts["lengths"] += 1
        # bfloat16's split cell state is exact (a-d).
        if variant != "convlstm":
            for reverse in (False, True):
                variant_ok &= check_exact_cell_state(variant, reverse)
                counts["contract"] += 1
        # The numeric contract: kinks, tiny activations, NaN.
        contract = [check(variant, "hard_sigmoid", dtype, kink_shape, case="kinks")
                    for dtype in (torch.float64, torch.float32, torch.bfloat16)]
        for gate_activation in ("sigmoid", "hard_sigmoid"):
            contract.append(check(variant, gate_activation, torch.float32, float64_shapes[0],
                                  case="small"))
            contract.append(check_nan(variant, gate_activation, "pixel"))
            if "att_pw_z" in get_cell(variant).parameter_names:  # A = exp(Z − max Z): c, d
                contract.append(check_nan(variant, gate_activation, "logits"))
        counts["contract"] += len(contract)
        variant_ok &= all(contract)
        print(f"{variant}: {'ok' if variant_ok else 'FAILED'}")
        ok &= variant_ok
    assert "convlstm_fast._C" not in sys.modules, "the emulation must not load the real extension"
    print(", ".join(f"{n} {k} checks" for k, n in counts.items()), "-", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
