"""Backends: who computes a layer, whether they can for given inputs, and why not.

A backend says whether it is usable at all (``unavailable_reason``), whether it supports given
inputs (``unsupported_reason``), and runs one layer over a sequence (``run_layer``). ``"auto"``
picks the first backend of the preference list for the input's device that supports the inputs.
Nothing here queries a device at import time.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch

from ..ops.registration import INFERENCE_SUFFIX, gate_activation_code
from ..registry import get_cell

BACKENDS = ("reference", "triton", "cuda", "cpu")

# An op ``<name><suffix>`` may have a twin ``<name><suffix>_inference`` (the native ops do;
# csrc/convlstm_fast.cpp): the forward without the tensors saved for backward, which a backend
# runs instead whenever no input needs a gradient (inference neither writes nor keeps them).
BACKEND_CHOICES = BACKENDS + ("auto",)

# Where each backend object lives; modules are imported on first use.
_BACKEND_MODULES = {
    "reference": "convlstm_fast.backends.reference",
    "triton": "convlstm_fast.backends.triton",
    "cuda": "convlstm_fast.backends.native",
    "cpu": "convlstm_fast.backends.native",
}

# What "auto" tries, in order, per device type. On a GPU the order between "cuda" and "triton"
# comes from the latest committed GPU benchmark (benchmarks/results/); "auto" never picks Triton
# for CPU tensors.
AUTO_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


class Backend:
    """Interface every backend implements."""

    name: str = ""
    # Whether run_layer takes ``lengths`` (masked inside the layer's loop); otherwise
    # functional.convlstm_layer drives the steps some samples do not reach one call at a time.
    lengths_in_op: bool = False

    def unavailable_reason(self) -> str | None:
        """``None`` when the backend is built and importable here, else why not."""
        return None

    def unsupported_reason(self, variant: str, x: torch.Tensor) -> str | None:
        """``None`` when this backend can run ``variant`` on inputs like ``x``, else why not."""
        return self.unavailable_reason()

    def run_layer(self, variant: str, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                  params: Sequence[torch.Tensor], gate_activation: str, reverse: bool = False,
                  lengths: torch.Tensor | None = None):
        """``x [T, B, Cin, H, W]`` (any strides), ``h0``, ``c0`` ``[B, C, H, W]``, ``params`` in
        the order of the cell's registry entry -> ``(output [T, B, C, H, W], h_n, c_n)``;
        ``reverse`` walks t = T − 1 … 0, ``lengths`` (int64 ``[B]`` on x's device, only when
        ``lengths_in_op``) masks each sample's steps t ≥ lengths[b] (ops/registration.py)."""
        raise NotImplementedError


class OpBackend(Backend):
    """A backend whose layers are the registered ops ``convlstm_fast::<name><suffix>``."""

    def __init__(self, name: str, suffix: str, dispatch_key: str, device_type: str,
                 dtypes: tuple[torch.dtype, ...], lengths_in_op: bool = False):
        self.name = name
        self.lengths_in_op = lengths_in_op
        self.suffix = suffix
        self.dispatch_key = dispatch_key
        self.device_type = device_type
        self.dtypes = dtypes

    def op_name(self, variant: str) -> str:
        return get_cell(variant).op + self.suffix

    def load(self) -> None:
        """Import or build whatever registers the ops; raise ImportError with a reason."""

    def unavailable_reason(self) -> str | None:
        try:
            self.load()
        except ImportError as error:
            return str(error)
        return None

    def unsupported_reason(self, variant: str, x: torch.Tensor) -> str | None:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if self.name not in get_cell(variant).kernels:
            return f"variant {variant!r} has no {self.name} kernel"
        if x.device.type != self.device_type:
            return f"backend {self.name!r} runs on {self.device_type} tensors, got {x.device.type}"
        if x.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"backend {self.name!r} supports dtypes {names}, got {x.dtype}"
        qualname = "convlstm_fast::" + self.op_name(variant)
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, self.dispatch_key):
            return f"backend {self.name!r} has no {self.dispatch_key} kernel for variant {variant!r}"
        return None

    def run_layer(self, variant, x, h0, c0, params, gate_activation, reverse=False,
                  lengths=None):
        args = (x, h0, c0, list(params), gate_activation_code(gate_activation), reverse)
        if lengths is not None:
            args += (lengths,)
        name = self.op_name(variant)
        wants_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, h0, c0, *params))
        if not wants_grad and _has_kernel(name + INFERENCE_SUFFIX, self.dispatch_key):
            return getattr(torch.ops.convlstm_fast, name + INFERENCE_SUFFIX)(*args)
        output, h_n, c_n, _ = getattr(torch.ops.convlstm_fast, name)(*args)
        return output, h_n, c_n


@torch._dynamo.assume_constant_result
def _has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether ``convlstm_fast::<name>`` exists and has a kernel for ``dispatch_key`` (a constant
    under torch.compile, like resolve_backend)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("convlstm_fast::" + name,
                                                              dispatch_key)
    except RuntimeError:
        return False


def check_backend(name: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")
    return name


_LOADED: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend object called ``name`` (not ``"auto"``)."""
    if name in _LOADED:
        return _LOADED[name]
    check_backend(name)
    if name == "auto":
        raise ValueError("get_backend needs a concrete backend; use select_backend for 'auto'")
    module = importlib.import_module(_BACKEND_MODULES[name])
    _LOADED[name] = module.BACKENDS[name]
    return _LOADED[name]


@torch._dynamo.assume_constant_result
def resolve_backend(name: str, variant: str, device: str, dtype: torch.dtype) -> str:
    """The name of the backend that runs ``variant`` on tensors of ``device`` and ``dtype``:
    ``name`` itself, checked, or for ``"auto"`` the first supporting backend of
    ``AUTO_PREFERENCE``. An explicit backend that cannot run them raises a ``ValueError`` saying
    why. Under torch.compile the answer is computed once while tracing and baked into the graph."""
    check_backend(name)
    probe = torch.empty(0, device=device, dtype=dtype)
    if name != "auto":
        reason = get_backend(name).unsupported_reason(variant, probe)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run variant {variant!r} here: {reason}")
        return name
    for candidate in AUTO_PREFERENCE.get(probe.device.type, ("reference",)):
        if get_backend(candidate).unsupported_reason(variant, probe) is None:
            return candidate
    return "reference"


def select_backend(name: str, variant: str, x: torch.Tensor) -> Backend:
    """The backend object that runs ``variant`` on inputs like ``x`` (see resolve_backend)."""
    return get_backend(resolve_backend(name, variant, str(x.device), x.dtype))
