"""Loading the compiled extension ``convlstm_fast._C`` (the native CPU and CUDA ops).

The package imports and the reference backend works without it; the native backends ask for it
through :func:`load_extension`, which says how to rebuild when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_cache: dict[str, object] = {}

REBUILD_HINT = (
    "build it from a source checkout with `pip install --no-build-isolation -e .` "
    "(set TORCH_CUDA_ARCH_LIST or FORCE_CUDA=1 to compile the CUDA kernels too)"
)


def load_extension() -> ModuleType:
    """Import ``convlstm_fast._C``, which registers the native ops with the dispatcher.

    Raises ImportError saying why, and how to rebuild, when it is missing or broken.
    """
    if "module" in _cache:
        return _cache["module"]
    if "error" in _cache:
        raise ImportError(_cache["error"])
    try:
        module = importlib.import_module("convlstm_fast._C")
    except ImportError as error:
        _cache["error"] = f"the compiled extension convlstm_fast._C is not available ({error}); {REBUILD_HINT}"
        raise ImportError(_cache["error"]) from error
    _cache["module"] = module
    return module


def extension_built() -> bool:
    """Whether the installed package ships a compiled ``_C`` (whether or not it loads)."""
    return importlib.util.find_spec("convlstm_fast._C") is not None
