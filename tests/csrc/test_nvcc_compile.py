"""Every csrc/*.cu compiles with nvcc for sm_80 (A100) and sm_90 (H100), with the flags torch's
CUDAExtension adds (no implicit half/bfloat16 conversions), every warning an error.

CI has no GPU, so this is what keeps the device code honest between GPU runs. Without nvcc the tests skip with
the reason; CI sets ERPO_REQUIRE_NVCC=1, which makes a missing nvcc a failure (see tests/nvcc.py).
"""
import subprocess
from pathlib import Path

import pytest

from tests.nvcc import find_nvcc

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
# As torch.utils.cpp_extension passes them to nvcc: the kernels must not rely on implicit conversions.
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
)


def _nvcc() -> str:
    return find_nvcc()


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu file in {CSRC}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_compiles(source, arch, tmp_path):
    cmd = [
        _nvcc(), "-c", "-O3", "-std=c++17", f"-arch={arch}", "--Werror", "all-warnings",
        *TORCH_NVCC_FLAGS, f"-I{CSRC}", str(source), "-o", str(tmp_path / f"{source.stem}.{arch}.o"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / f"{source.stem}.{arch}.o").stat().st_size > 0
