"""Build of convlstm_fast: the Python package plus the compiled extension ``convlstm_fast._C``.

``_C`` holds the native CPU kernels always, and the CUDA kernels when FORCE_CUDA=1 or
TORCH_CUDA_ARCH_LIST is set or a GPU is visible. CUDA sources compile without a GPU, with no
variables set by hand: the toolkit is found behind an ``nvcc`` wrapper script (:func:`cuda_home`),
the cuBLAS/cuSPARSE headers of a pip-installed CUDA runtime are added when the toolkit lacks them
(:func:`cuda_library_includes`), and without a GPU the architectures default to sm_80 and sm_90.
The top-level ``triton_kernels/`` folder is installed as ``convlstm_fast.triton_kernels`` so it
can never clash with Triton's own package.
"""

import glob
import os
import shutil
import subprocess
import sysconfig

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"  # A100 and H100/H200, when no GPU tells us which
# The headers ATen's CUDA headers include that a bare CUDA toolkit folder may lack.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h")


def cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME or $CUDA_PATH, else asked of the ``nvcc`` on PATH.

    torch guesses the parent of nvcc's folder, which is wrong when nvcc is a wrapper script
    outside the toolkit (``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc``);
    ``nvcc --dryrun`` prints the folder the real driver runs from as ``_HERE_``."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", "-"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        dryrun = None
    for line in (dryrun.stderr + dryrun.stdout).splitlines() if dryrun else []:
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(os.path.normpath(line.split("=", 1)[1].strip()))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_library_includes(toolkit: str | None) -> list[str]:
    """Include folders for :data:`CUDA_LIBRARY_HEADERS` missing from the toolkit: those of the
    pip-installed CUDA libraries torch depends on (``nvidia/cu13/include`` for CUDA 13 builds,
    ``nvidia/<library>/include`` for CUDA 12 builds)."""
    toolkit_include = os.path.join(toolkit, "include") if toolkit else ""
    missing = [h for h in CUDA_LIBRARY_HEADERS
               if not os.path.exists(os.path.join(toolkit_include, h))]
    folders = []
    for site in dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])):
        for header in missing:
            for found in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", header))):
                folder = os.path.dirname(found)
                if folder not in folders:
                    folders.append(folder)
                break
    return folders


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True
    return torch.cuda.is_available()


def _configure_cuda_home() -> str | None:
    """Point torch's cpp_extension (which guessed ``CUDA_HOME`` when it was imported) and nvcc's
    children at the toolkit :func:`cuda_home` finds."""
    home = cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
    return home


def _extension():
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    # The stable ABI (one build for every CPython >= 3.10, tag cp310 below). Recent torch adds
    # this define itself for py_limited_api extensions; adding a second value clashes.
    if not hasattr(cpp_extension, "min_supported_cpython"):
        cxx_flags.append("-DPy_LIMITED_API=0x030A0000")
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if _want_cuda() and torch.version.cuda is not None and cuda_sources:
        toolkit = _configure_cuda_home()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            print(f"convlstm_fast: no GPU visible, compiling the CUDA kernels for "
                  f"TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        # No --use_fast_math: it turns tanhf/expf into approximations whose relative error
        # near 0 breaks the numeric contract (ops/registration.py); the kernels are bound by
        # memory, not by these functions.
        return CUDAExtension(
            "convlstm_fast._C",
            sources + [os.path.relpath(p, ROOT) for p in cuda_sources],
            include_dirs=include_dirs + cuda_library_includes(toolkit),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
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


# Guarded so that the helpers above can be imported (benchmarks/gpu_check.py, tests) without
# building; setuptools' build backend runs this file as __main__.
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["convlstm_fast", "convlstm_fast.*"])
        + ["convlstm_fast.triton_kernels"],
        package_dir={"convlstm_fast.triton_kernels": "triton_kernels"},
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
