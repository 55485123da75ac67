"""A module's forward and backward replayed as CUDA graphs, captured once per call signature.

A layer of these cells is T steps of a few kernels each, launched from a host loop (Python for
the Triton backend, C++ for the CUDA one, ATen calls for the reference): at small B·H·W the
launches, not the kernels, set the time (the GPU check's "GPU busy" column). :class:`CUDAGraphed`
wraps any module — a :class:`~convlstm_fast.ConvLSTM`, a cell driven over a sequence, a whole
network — so that the first call with a new signature warms it up and captures its forward (and,
while autograd records, its backward) with :func:`torch.cuda.make_graphed_callables`; each later
call with that signature copies its inputs into the captured ones and replays the graphs, one
launch for the whole sequence loop instead of T × the launches of a step::

    layer = CUDAGraphed(ConvLSTM(64, 64, variant="a", backend="cuda").cuda())
    out, (h_n, c_n) = layer(x)          # first call for x's signature: capture, later: replay

The signature is the module's training mode, whether autograd records, the nesting of the
arguments and each tensor's shape, strides, dtype, device and requires_grad: a new batch size or
sequence length is captured once more (each capture keeps its own memory; :meth:`clear` frees
them). torch's rules for graphed callables apply (its "CUDA Graphs" notes):

- every argument is a CUDA tensor or a (nested) tuple/list of them, passed in the same order and
  nesting every call — options such as ``lengths`` are not arguments here (a ragged batch's
  number of steps is data, which a graph cannot follow: call the module directly);
- what a call returns lives in the graph's own buffers, which the next replay of that signature
  overwrites: ``clone()`` an output you keep past the next call; the gradients a backward leaves
  are the captured backward's buffers in the same way (``optimizer.zero_grad()`` between steps,
  as usual);
- the parameters are the captured ones: update them in place (optimizers and
  ``load_state_dict`` do), do not replace or add any; no hooks on the module; autocast only with
  ``cache_enabled=False``; no double backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree


class _Flat(nn.Module):
    """``module`` called with the flattened leaves of its arguments (``spec``), returning the
    leaves of its result (their structure in ``out_spec``, recorded by the warm-up calls): the
    flat form make_graphed_callables takes in every torch version this package supports. The
    module is its child, so its parameters are this wrapper's."""

    def __init__(self, module: nn.Module, spec):
        super().__init__()
        self.module = module
        self.spec = spec
        self.out_spec = None

    def forward(self, *leaves):
        result = self.module(*pytree.tree_unflatten(list(leaves), self.spec))
        out, self.out_spec = pytree.tree_flatten(result)
        return tuple(out)


class CUDAGraphed(nn.Module):
    """``module``'s calls as CUDA graphs, one capture per call signature (see the module
    docstring). ``warmup_iters``: eager calls on a side stream before each capture (Triton's JIT
    compiles, cuBLAS/cuDNN's lazy set-up and autotuning happen there, not in the graph)."""

    def __init__(self, module: nn.Module, warmup_iters: int = 3):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) \
                or warmup_iters < 1:
            raise ValueError(f"warmup_iters must be an int >= 1, got {warmup_iters!r}")
        self.module = module
        self.warmup_iters = warmup_iters
        self._captures: dict = {}

    @property
    def captured(self) -> int:
        """How many signatures are captured."""
        return len(self._captures)

    def clear(self) -> None:
        """Drop every capture (and the memory its graphs hold)."""
        self._captures.clear()

    def _signature(self, args):
        leaves, spec = pytree.tree_flatten(args)
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    "CUDAGraphed: every argument must be a CUDA tensor or a tuple/list of them; "
                    f"tensor argument {index} (flattened) is a {type(leaf).__name__}: pass "
                    "options to the module's constructor, or call the module itself")
            if leaf.device.type != "cuda":
                raise ValueError(f"CUDAGraphed: arguments must be CUDA tensors, tensor argument "
                                 f"{index} (flattened) is on {leaf.device}")
        # The structure by its text: TreeSpec is not hashable in every torch version supported.
        key = (self.module.training, torch.is_grad_enabled(), str(spec),
               tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)
                     for t in leaves))
        return key, leaves, spec

    def forward(self, *args):
        key, leaves, spec = self._signature(args)
        capture = self._captures.get(key)
        if capture is None:
            flat = _Flat(self.module, spec)
            flat.training = self.module.training  # the wrapper's own flag; the module's as it is
            sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in leaves)
            graphed = torch.cuda.make_graphed_callables(flat, sample,
                                                        num_warmup_iters=self.warmup_iters)
            capture = self._captures[key] = graphed
        return pytree.tree_unflatten(list(capture(*leaves)), capture.out_spec)

    def extra_repr(self) -> str:
        return f"warmup_iters={self.warmup_iters}, captured={self.captured}"
