"""Test-wide setup: Triton kernels run under the interpreter on machines without a CUDA GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so this happens at conftest import,
before the tests import erpo.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs each test, reproducible from the seed printed on failure."""
    seed = int(os.environ.get("ERPO_TEST_SEED", "0")) + (hash(request.node.nodeid) % 100_000)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
