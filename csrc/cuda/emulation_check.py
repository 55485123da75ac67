"""Check the CUDA layer ops without a GPU: build them in emulation and compare with the reference.

With -DCONVLSTM_CUDA_EMULATE (layer_common.cuh) the same host drivers and the same
__host__ __device__ kernel bodies run on CPU tensors (a tile reduction's threads run one after
another, summing in the device's order) and register for the CPU dispatch key. This script
compiles the four *_kernel.cu files that way with nvcc (one arch; ~3 min on 2 cores) together
with the schemas (csrc/convlstm_fast.cpp) into a library of its own, loads it in a process that
never imports convlstm_fast._C, and compares every output and gradient with the reference:
float64 within 1e-9 (relative), float32/float16/bfloat16 with STYLE.md's rule; and each
`<op>_inference` twin against its op, bit for bit. Besides random cells, the numeric contract of
ops/registration.py (tests/test_numerics.py holds every backend to it): every gate
pre-activation at hard_sigmoid's kinks ±2.5 (float64, float32, bfloat16), activations of 1e-5
(float32), and NaN kept in its sample with the reference's isnan mask.
What it cannot check: launch configurations, shared memory and anything cuBLAS/cuDNN-specific.

    CUDA_HOME=/usr/local/cuda-13.0 python csrc/cuda/emulation_check.py [--build-dir DIR] [--no-build]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import sysconfig

import torch

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parent
SOURCES = ["pooled_layer_kernel", "convlstm_layer_kernel", "channel_attention_layer_kernel",
           "spatial_attention_layer_kernel"]


def build(build_dir: pathlib.Path) -> pathlib.Path:
    from torch.utils import cpp_extension

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0")
    site = pathlib.Path(torch.__file__).parent.parent
    flags = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    flags += [f"-I{site / 'nvidia' / 'cu13' / 'include'}", f"-I{CSRC}",
              f"-I{sysconfig.get_paths()['include']}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-DCONVLSTM_CUDA_EMULATE", "-std=c++20"]
    build_dir.mkdir(parents=True, exist_ok=True)
    objects = []
    for name in SOURCES:
        obj = build_dir / f"{name}.o"
        subprocess.run([f"{cuda_home}/bin/nvcc", *flags, "-gencode", "arch=compute_90,code=sm_90",
                        "-O1", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                        "-c", "-o", str(obj), str(HERE / f"{name}.cu")], check=True)
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


def check(variant: str, gate_activation: str, dtype: torch.dtype, shape, seed: int = 0,
          case: str = "random") -> bool:
    """Every output and gradient of the op against the reference. ``case``: "random" weights
    and inputs; "small", those with x, h0, c0 and the biases scaled by 1e-5 (every tanh argument
    and activation ~1e-5); "kinks", all weights 0 and the gate biases alternately +2.5 and −2.5
    (with an odd hidden size every gate meets both kinks and every channel keeps C_t ≠ 0), so
    every gate pre-activation sits on a kink of hard_sigmoid."""
    from convlstm_fast import variants
    from convlstm_fast.reference import cells

    steps, batch, cin, hidden, height, width, k = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=generator, dtype=torch.float64) * scale).to(dtype).double()

    params = {n: randn(*s, scale=0.5) for n, s in variants.parameter_shapes(variant, cin, hidden, k).items()}
    x = randn(steps, batch, cin, height, width)
    h0, c0 = randn(batch, hidden, height, width, scale=0.5), randn(batch, hidden, height, width, scale=0.5)
    if case == "small":
        x, h0, c0 = (t * 1e-5 for t in (x, h0, c0))
        params = {n: p * 1e-5 if variants.is_bias(n) else p for n, p in params.items()}
    elif case == "kinks":
        for name, p in params.items():
            if name in ("bias", "gate_bias"):
                p.copy_(2.5 * (-1.0) ** torch.arange(p.numel(), dtype=torch.float64))
            elif not variants.is_bias(name):
                p.zero_()
    weights = [randn(steps, batch, hidden, height, width), randn(batch, hidden, height, width),
               randn(batch, hidden, height, width)]
    label = f"{variant} {gate_activation} {dtype} {shape} {case}"

    def reference(cast):
        leaves = [cast(t).requires_grad_() for t in (x, h0, c0, *params.values())]
        out, h_n, c_n = cells.layer(variant, *leaves[:3], dict(zip(params, leaves[3:])), gate_activation)
        loss = sum((t * cast(w)).sum() for t, w in zip((out, h_n, c_n), weights))
        return [out.detach(), h_n.detach(), c_n.detach(), *torch.autograd.grad(loss, leaves)]

    want64 = reference(lambda t: t.detach().clone())
    cast = lambda t: t.to(dtype)  # noqa: E731
    name = variants.OP_NAMES[variant]
    code = variants.GATE_ACTIVATIONS.index(gate_activation)
    plist = [cast(p) for p in params.values()]
    args = [cast(t) for t in (x, h0, c0)]
    out, h_n, c_n, saved = getattr(torch.ops.convlstm_fast, name)(*args, plist, code)
    # The _inference twin runs the same kernels keeping nothing: the same values, bit for bit.
    inference = getattr(torch.ops.convlstm_fast, name + "_inference")(*args, plist, code)
    for output_name, a, b in zip(("output", "h_n", "c_n"), inference, (out, h_n, c_n)):
        if not torch.equal(a, b):
            print(f"  FAIL {label} {name}_inference {output_name}")
            return False
    grads = getattr(torch.ops.convlstm_fast, name + "_backward")(
        *[cast(w) for w in weights], *args, plist, out, saved, code)
    got = [out, h_n, c_n, grads[0], grads[1], grads[2], *grads[3]]
    names = ["output", "h_n", "c_n", "grad_x", "grad_h0", "grad_c0"] + [f"grad_{n}" for n in params]
    want_low = None if dtype == torch.float64 else reference(lambda t: cast(t.detach()))
    ok = True
    for index, (output_name, g, w64) in enumerate(zip(names, got, want64)):
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
    logits while the pooled gates stay finite: x = +inf at one pixel of two channels whose
    attention depthwise taps are positive and pointwise weights of opposite signs (F = inf − inf)
    and whose gate weights are positive (σ(+inf) = 1), at step 0 of one step, so that only the
    max over the pixels (torch.amax keeps NaN) spreads the NaN over every plane of A."""
    from convlstm_fast import variants
    from convlstm_fast.reference import cells

    steps, batch, cin, hidden, height, width, k = (3, 2, 3, 4, 6, 7, 3) if poison == "pixel" else (1, 2, 3, 4, 8, 8, 3)
    generator = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=generator, dtype=torch.float64).float() * 0.5
              for n, s in variants.parameter_shapes(variant, cin, hidden, k).items()}
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
    name = variants.OP_NAMES[variant]
    code = variants.GATE_ACTIVATIONS.index(gate_activation)
    op = getattr(torch.ops.convlstm_fast, name + "_inference")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default="/tmp/convlstm_fast_cuda_emulation")
    parser.add_argument("--no-build", action="store_true", help="reuse the library built before")
    args = parser.parse_args()
    library = pathlib.Path(args.build_dir) / "libconvlstm_cuda_emulation.so"
    if not args.no_build:
        library = build(pathlib.Path(args.build_dir))
    torch.ops.load_library(str(library))
    shapes = [(3, 2, 3, 5, 4, 6, 3), (1, 1, 3, 4, 5, 7, 1), (2, 1, 6, 3, 7, 5, 5),
              (2, 1, 33, 40, 5, 5, 3)]
    ok = True
    for variant in ("convlstm", "a", "b", "c", "d"):
        for gate_activation in ("sigmoid", "hard_sigmoid"):
            for shape in shapes:
                ok &= check(variant, gate_activation, torch.float64, shape)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ok &= check(variant, "hard_sigmoid", dtype, shapes[0])
        # The numeric contract: kinks, tiny activations, NaN.
        kink_shape = (2, 2, 3, 3, 3, 4, 3)  # hidden 3: odd, see check
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            ok &= check(variant, "hard_sigmoid", dtype, kink_shape, case="kinks")
        for gate_activation in ("sigmoid", "hard_sigmoid"):
            ok &= check(variant, gate_activation, torch.float32, shapes[0], case="small")
            ok &= check_nan(variant, gate_activation, "pixel")
            if variant in ("c", "d"):
                ok &= check_nan(variant, gate_activation, "logits")
        print(f"{variant}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
