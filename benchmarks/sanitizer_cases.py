"""Small cases of every CUDA op, for compute-sanitizer (memcheck, racecheck) in ONE process.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_cases.py [--backends cuda,triton]

For each variant, gate activation and supported dtype, runs the backend's forward op and,
through autograd, its ``_backward`` op on an awkward small shape (odd H ≠ W, Cin ≠ C, B = 2) and
on a one-step case, and checks the output against the reference loosely (a sanity check that
the kernels ran: the tests own correctness). Prints one line per case; exits 1 if any case
raised or came out non-finite or far from the reference, 0 otherwise. Backends or variants
that are not available are listed with their reason.

    python benchmarks/sanitizer_cases.py --initcheck-log FILE

reads the log of an initcheck run that instrumented every kernel (no ``--kernel-name`` filter)
and sorts its reports by the kernel that made the read: ours (a ``convlstm_fast`` frame) or a
library's (cuBLAS and cuDNN read workspace they never initialise, by design). It prints the
counts and the first of our reports, and exits 1 if any report is ours. The H200's first
initcheck, filtered to our kernels, reported our convlstm elementwise kernel reading cuDNN's
convolution outputs; a filtered run cannot say whether such a read is real or a write the
sanitizer never saw (the writing kernel was not instrumented), an unfiltered one can.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from convlstm_fast import VARIANTS, convlstm_layer
from convlstm_fast.registry import GATE_ACTIVATIONS
from convlstm_fast.backends import get_backend
from convlstm_fast.bench.cases import CellShape, make_inputs

SHAPES = (CellShape(2, 3, 5, 12, 7, 5, label="odd"), CellShape(1, 1, 4, 4, 3, 3, label="one-step"))
# --quick (the GPU check's default): one case per backend and variant, bf16 with sigmoid on the
# shape of tests/test_backends.py's "small" case, so that the Triton kernels come from the
# on-disk cache its correctness stage filled instead of being compiled again under the sanitizer.
QUICK_SHAPE = CellShape(2, 3, 48, 80, 8, 10, label="quick")


def run_case(backend: str, variant: str, shape: CellShape, dtype: torch.dtype,
             gate_activation: str, device: str = "cuda") -> str | None:
    """Forward and backward of one case; returns an error text or None."""
    x, params = make_inputs(variant, shape, device, dtype)
    x.requires_grad_()
    params = [p.requires_grad_() for p in params]
    output, (h_n, c_n) = convlstm_layer(x, params, variant, gate_activation=gate_activation,
                                        backend=backend)
    (output.float().square().sum() + h_n.float().sum() + c_n.float().sum()).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    with torch.no_grad():
        expected, _ = convlstm_layer(x.double(), [p.double() for p in params], variant,
                                     gate_activation=gate_activation, backend="reference")
    tensors = [output, h_n, c_n, x.grad] + [p.grad for p in params]
    if any(t is None or not torch.isfinite(t).all() for t in tensors):
        return "non-finite output or missing gradient"
    error = (output.double() - expected).abs().max().item()
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    if error > tolerance:
        return f"output differs from the reference by {error:.3g} (> {tolerance})"
    return None


def initcheck_reports(text: str) -> tuple[list[str], list[str]]:
    """The reports of an initcheck log, split into (ours, the libraries'): a report is ours when
    one of its device frames (or its "at" line) names convlstm_fast."""
    blocks = re.split(r"^========= (?=Uninitialized)", text, flags=re.M)[1:]
    ours, theirs = [], []
    for block in blocks:
        device = [line for line in block.splitlines()
                  if "Device Frame" in line or line.lstrip("= ").startswith("at ")]
        (ours if any("convlstm_fast" in line for line in device) else theirs).append(block)
    return ours, theirs


def summarize_initcheck(path: str) -> int:
    text = open(path, errors="replace").read()
    ours, theirs = initcheck_reports(text)
    summary = re.findall(r"ERROR SUMMARY: .*", text)
    print(f"initcheck: {len(ours)} reports in convlstm_fast kernels, {len(theirs)} in library "
          f"kernels{' (' + summary[-1] + ')' if summary else ''}")
    for block in ours[:3]:
        print("\n".join(line for line in block.splitlines() if "Host Frame" not in line))
    return 1 if ours or not summary else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="cuda", help="comma list (default: cuda)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to dry-run this script)")
    parser.add_argument("--quick", action="store_true",
                        help="one case per backend and variant (bf16, or float32 on the CPU)")
    parser.add_argument("--initcheck-log", metavar="FILE",
                        help="summarise an unfiltered initcheck log instead of running cases")
    args = parser.parse_args(argv)
    if args.initcheck_log:
        return summarize_initcheck(args.initcheck_log)
    if args.quick:
        dtypes = (torch.bfloat16,) if args.device == "cuda" else (torch.float32,)
        shapes, activations = (QUICK_SHAPE,), ("sigmoid",)
    else:
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        shapes, activations = SHAPES, GATE_ACTIVATIONS
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize")
        return 1
    failures = ran = 0
    for backend in args.backends.split(","):
        for variant in args.variants.split(","):
            for dtype in dtypes:
                probe = torch.empty(1, 1, 1, 1, 1, device=args.device, dtype=dtype)
                reason = get_backend(backend).unsupported_reason(variant, probe)
                if reason is not None:
                    print(f"SKIP {backend} {variant} {dtype}: {reason}", flush=True)
                    continue
                for shape in shapes:
                    for gate_activation in activations:
                        name = f"{backend} {variant} {str(dtype)[6:]} {shape.label} {gate_activation}"
                        try:
                            problem = run_case(backend, variant, shape, dtype, gate_activation,
                                               args.device)
                        except Exception as error:  # report every case, then fail at the end
                            problem = f"{type(error).__name__}: {error}"
                        ran += 1
                        failures += problem is not None
                        print(f"{'FAIL' if problem else 'ok  '} {name}"
                              + (f": {problem}" if problem else ""), flush=True)
    print(f"{ran} cases, {failures} failed")
    return 1 if failures or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
