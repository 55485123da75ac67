"""``python -m convlstm_fast.info``: versions, and which backends are built and usable here.

For each backend and variant it prints whether that backend can run it on this machine's
default device, and the reason when it cannot (not built, wrong device, no kernel yet).
``--require cuda,triton`` exits with status 1 unless every listed backend can run every variant
here (the GPU check uses it to fail its build stage early).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
from ._extension import extension_built
from .backends import BACKENDS, get_backend
from .registry import cell_names


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def backend_report(device: torch.device) -> list[tuple[str, str, str]]:
    """Rows ``(backend, variant, "usable" or the reason)`` for float32 inputs on ``device``."""
    rows = []
    probe = torch.empty(1, 1, 1, 1, 1, device=device)
    for name in BACKENDS:
        backend = get_backend(name)
        for variant in cell_names():
            reason = backend.unsupported_reason(variant, probe)
            rows.append((name, variant, "usable" if reason is None else reason))
    return rows


def report() -> str:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lines = [
        f"convlstm_fast {__version__}",
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"triton        {_triton_version()}",
        f"CUDA device   {torch.cuda.get_device_name() if cuda else 'none'}",
        f"compiled _C   {'present' if extension_built() else 'missing'}",
        "",
        f"backends for float32 tensors on {device.type}:",
    ]
    for name, variant, status in backend_report(device):
        lines.append(f"  {name:<10} {variant:<9} {status}")
    return "\n".join(lines)


def triton_specializations() -> dict[str, int]:
    """How many compiled specialisations each of our Triton kernels holds in this process (0
    under the interpreter, which compiles nothing; {} when the kernels were never imported).
    Each is a separate compile on first use — the GPU check bounds their number."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    counts = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("convlstm_fast.triton_kernels") or module is None:
            continue
        for attribute in vars(module).values():
            if isinstance(attribute, JITFunction) and attribute.__name__ not in counts:
                caches = getattr(attribute, "device_caches", {}) or {}
                counts[attribute.__name__] = sum(
                    len(entry[0]) for entry in caches.values()
                    if isinstance(entry, tuple) and isinstance(entry[0], dict))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require", default="",
                        help="comma list of backends that must run every variant here")
    args = parser.parse_args(argv)
    print(report())
    required = [name for name in args.require.split(",") if name]
    unknown = [name for name in required if name not in BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {BACKENDS}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    missing = [(name, variant, status) for name, variant, status in backend_report(device)
               if name in required and status != "usable"]
    for name, variant, status in missing:
        print(f"required backend {name!r} cannot run variant {variant!r}: {status}",
              file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
