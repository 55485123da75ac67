"""Build of convlstm_fast: the Python package plus the compiled extension ``convlstm_fast._C``.

``_C`` holds the native CPU kernels always, and the CUDA kernels when FORCE_CUDA=1 or
TORCH_CUDA_ARCH_LIST is set or a GPU is visible (CUDA sources compile without a GPU; see
shared/ENVIRONMENT.md for CUDA_HOME and CPATH). The top-level ``triton_kernels/`` folder is
installed as ``convlstm_fast.triton_kernels`` so it can never clash with Triton's own package.
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True
    return torch.cuda.is_available()


def _extension():
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-DPy_LIMITED_API=0x03090000"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if _want_cuda() and torch.version.cuda is not None and cuda_sources:
        return CUDAExtension(
            "convlstm_fast._C",
            sources + [os.path.relpath(p, ROOT) for p in cuda_sources],
            include_dirs=include_dirs,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return CppExtension(
        "convlstm_fast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["convlstm_fast", "convlstm_fast.*"])
    + ["convlstm_fast.triton_kernels"],
    package_dir={"convlstm_fast.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
