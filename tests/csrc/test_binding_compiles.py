"""csrc/binding.cpp (the torch side of erpo._C) passes the C++ front end against this machine's torch headers.

The extension itself links only against a CUDA build of torch, which CI does not have; a syntax-only compile
with g++ still catches a wrong torch API, signature or include before anyone reaches a GPU. The CPU torch
wheel ships the c10/cuda headers but not the build-generated c10/cuda/impl/cuda_cmake_macros.h, which only
sets export macros: an empty stand-in is provided for it. CUDA's own headers come from the nvcc install.
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.nvcc import find_nvcc
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _cuda_include_dir() -> Path:
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = find_nvcc()
    candidates.append(Path(nvcc).resolve().parent.parent / "include")
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if top:
        candidates.append(Path(top.group(1).strip()) / "include")
    for folder in candidates:
        if (folder / "cuda_runtime_api.h").exists():
            return folder
    pytest.fail(f"cuda_runtime_api.h not found in {[str(c) for c in candidates]}: set CUDA_HOME")


def test_binding_passes_the_compiler_front_end(tmp_path):
    compiler = shutil.which("g++")
    assert compiler, "g++ not found"
    includes = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n")
        includes.insert(0, tmp_path)
    includes += [Path(sysconfig.get_paths()["include"]), _cuda_include_dir()]
    # Torch 2.13's extensions build as C++20; -isystem keeps torch's own warnings out, ours are errors.
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{CSRC}", *(arg for p in includes for arg in ("-isystem", str(p))), str(CSRC / "binding.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-6000:]}"
