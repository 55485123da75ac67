"""setup.py's build helpers: the CUDA toolkit found behind an ``nvcc`` wrapper script, and the
cuBLAS/cuSPARSE headers of the pip-installed CUDA libraries added when the toolkit lacks them —
so that ``FORCE_CUDA=1 pip install --no-build-isolation -e .`` needs no variables set by hand."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import stat

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("convlstm_fast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded: importing it builds nothing
    return module


def _fake_toolkit(root: pathlib.Path, headers=()) -> pathlib.Path:
    """A toolkit folder whose bin/nvcc answers --dryrun like the real driver, and a wrapper
    script elsewhere on PATH that execs it (as /usr/local/bin/nvcc does here)."""
    toolkit = root / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    for header in headers:
        (toolkit / "include" / header).write_text("")
    real = toolkit / "bin" / "nvcc"
    real.write_text(f"#!/bin/sh\necho '#$ _HERE_={toolkit}/bin' >&2\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    wrapper_dir = root / "wrapper"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    for script in (real, wrapper):
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return toolkit


def test_cuda_home_is_found_behind_an_nvcc_wrapper(setup_module, tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrapper'}{os.pathsep}{os.environ['PATH']}")
    assert setup_module.cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", "/opt/somewhere")
    assert setup_module.cuda_home() == "/opt/somewhere"


def test_missing_library_headers_come_from_the_pip_cuda_packages(setup_module, tmp_path,
                                                                 monkeypatch):
    site = tmp_path / "site-packages"
    include = site / "nvidia" / "cu13" / "include"
    include.mkdir(parents=True)
    for header in setup_module.CUDA_LIBRARY_HEADERS:
        (include / header).write_text("")
    monkeypatch.setattr(setup_module.sysconfig, "get_paths",
                        lambda: {"purelib": str(site), "platlib": str(site)})
    bare = _fake_toolkit(tmp_path / "bare")
    assert setup_module.cuda_library_includes(str(bare)) == [str(include)]
    complete = _fake_toolkit(tmp_path / "complete", setup_module.CUDA_LIBRARY_HEADERS)
    assert setup_module.cuda_library_includes(str(complete)) == []
