"""The autotuned launch path, run here: Triton's autotuner cannot time kernels without a GPU, so the tests
give it a CPU timer (`do_bench`) and two small candidate configurations, under the interpreter.

What must hold on a GPU too: tuning runs the kernel several times before the real launch, and an in-place
backward overwrites the logits it reads, so without `restore_value` the tuned gradient would be computed
from a gradient; here it must equal the untuned one. The cache must key on V (and the chunk) and dtype.
"""
import time

import pytest
import torch

import erpo
import erpo.kernels.logprobs_entropy as triton_kernels
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the real autotuner runs in every test")
SMALL_CONFIGS = ((64, 4, 1), (128, 4, 1))


def cpu_do_bench(kernel_call, quantiles):
    """Like triton.testing.do_bench: several calls (as its warm-up and repetitions do), then quantiles."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        kernel_call()
        times.append(time.perf_counter() - start)
    return [sorted(times)[1]] * len(quantiles)


@pytest.fixture
def tuned(monkeypatch):
    launchers = triton_kernels.build_launchers(True, SMALL_CONFIGS, do_bench=cpu_do_bench)
    monkeypatch.setattr(triton_kernels, "AUTOTUNE", True)
    for name, launcher in zip(("_fwd", "_partial", "_bwd"), launchers):
        monkeypatch.setattr(triton_kernels, name, launcher)
    return dict(zip(("fwd", "partial", "bwd"), launchers))


def run(logits, targets, inplace):
    source = logits.clone().requires_grad_()
    work = source * 1  # a non-leaf whose producer saved nothing: the in-place gradient is allowed
    logp, entropy = erpo.logprobs_and_entropy(work, targets, backend="triton", inplace_grad=inplace)
    torch.autograd.backward([logp, entropy], [torch.ones_like(logp), torch.full_like(entropy, 0.5)])
    return logp.detach(), entropy.detach(), source.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tuned_launch_equals_fixed_config_including_in_place(tuned, dtype):
    logits = (torch.randn(3, 300, device=DEVICE) * 5).to(dtype)
    targets = torch.tensor([0, 150, 299], device=DEVICE)
    logp, entropy, grad = run(logits, targets, inplace=True)
    assert len(tuned["fwd"].cache) == 1 and len(tuned["bwd"].cache) == 1  # it really tuned, once per key
    assert len(tuned["bwd"].configs_timings) == len(SMALL_CONFIGS)
    untuned = triton_kernels.build_launchers(False)
    for name, launcher in zip(("_fwd", "_partial", "_bwd"), untuned):
        setattr(triton_kernels, name, launcher)  # restored by the fixture's monkeypatch
    triton_kernels.AUTOTUNE = False
    ref_logp, ref_entropy, ref_grad = run(logits, targets, inplace=False)
    assert torch.allclose(logp, ref_logp, rtol=1e-6, atol=1e-6)
    assert torch.allclose(entropy, ref_entropy, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad.float(), ref_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_tuning_is_keyed_on_vocab_and_dtype(tuned):
    for vocab, dtype in ((300, torch.float32), (300, torch.float32), (301, torch.float32), (300, torch.bfloat16)):
        logits = torch.randn(2, vocab, device=DEVICE).to(dtype)
        erpo.logprobs_and_entropy(logits, torch.zeros(2, dtype=torch.long, device=DEVICE), backend="triton")
    assert len(tuned["fwd"].cache) == 3
