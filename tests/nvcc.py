"""Finding the CUDA toolkit for the tests that compile device code without a GPU.

Without nvcc these tests skip, with the reason, so the README's test command passes on a machine without the
CUDA toolkit. CI sets ERPO_REQUIRE_NVCC=1 (in .ci/run): there a missing nvcc fails, so CI never skips them.
"""
import os
import shutil

import pytest


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("ERPO_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc not found on PATH but ERPO_REQUIRE_NVCC=1: the CUDA sources must be compile-checked here")
        pytest.skip("nvcc not found on PATH (the CUDA toolkit is not installed): CUDA compile checks skipped; "
                    "ERPO_REQUIRE_NVCC=1 makes this a failure, as in CI")
    return nvcc
