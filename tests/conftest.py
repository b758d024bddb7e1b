"""Test-wide setup.

- Triton kernels run under the interpreter on machines without a CUDA GPU. TRITON_INTERPRET must be set
  before any @triton.jit decorator runs, so it is set here, before the tests import erpo.
- Random inputs are fresh each run but reproducible: the run's seed is printed in the header, and
  `ERPO_TEST_SEED=<seed> pytest ...` replays it. Each test seeds torch with run seed + crc32(test id).
"""
import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_extension_available() -> bool:
    if DEVICE != "cuda":
        return False
    try:
        from erpo import _C  # noqa: F401
    except ImportError:
        return False
    return True


# The kernel backends a test can run here: Triton always (interpreter on CPU), CUDA where erpo._C is built.
KERNEL_BACKENDS = ["triton"] + (["cuda"] if _cuda_extension_available() else [])
RUN_SEED = int(os.environ.get("ERPO_TEST_SEED") or random.SystemRandom().randrange(1 << 30))


def pytest_report_header(config):
    return f"erpo: ERPO_TEST_SEED={RUN_SEED} (replay with this env var); device={DEVICE}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(RUN_SEED + zlib.crc32(request.node.nodeid.encode()))
    yield
