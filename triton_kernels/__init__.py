"""Fused Triton kernels of the recurrent step, installed as ``convlstm_fast.triton_kernels``.

Importing this package declares the ``convlstm_fast::<name>_triton`` ops and registers their
kernels, autograd and fake tensors.
"""
