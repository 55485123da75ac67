"""``python -m convlstm_fast.info``: versions, and which backends are built and usable here.

For each backend and variant it prints whether that backend can run it on this machine's
default device, and the reason when it cannot (not built, wrong device, no kernel yet).
"""

from __future__ import annotations

import platform

import torch

from . import __version__, variants
from ._extension import extension_built
from .backends import BACKENDS, get_backend


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
        for variant in variants.VARIANTS:
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


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
