"""The nvcc gate of the CUDA compile checks (tests/nvcc.py, issue 17): without nvcc they skip and say why, so the
README's test command passes without the CUDA toolkit; with ERPO_REQUIRE_NVCC=1 (set by .ci/run) they fail."""
import shutil

import pytest

from tests.nvcc import find_nvcc


def test_missing_nvcc_skips_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvcc on PATH
    monkeypatch.delenv("ERPO_REQUIRE_NVCC", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nvcc not found on PATH.*ERPO_REQUIRE_NVCC=1 makes this a failure"):
        find_nvcc()


def test_missing_nvcc_fails_when_required(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("ERPO_REQUIRE_NVCC", "1")
    with pytest.raises(pytest.fail.Exception, match="ERPO_REQUIRE_NVCC=1"):
        find_nvcc()


def test_nvcc_on_path_is_found():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH on this machine")
    assert find_nvcc() == shutil.which("nvcc")
