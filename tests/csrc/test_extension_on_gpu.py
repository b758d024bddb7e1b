"""erpo._C on a GPU: what tests/ops does not vary (every block size, fp16, the binding's argument checks) and
the per-token policy-loss kernel, which no Python path calls yet. Skipped where the extension is not built or
no GPU is visible (bench/gpu_check.sh builds it and runs these); tests/csrc's host tests cover the math on CPU.

Tolerances as in tests/csrc/test_host_math.py, plus the device exponential (__expf, ~2 ulp on the arguments
that matter): values and fp32 gradients to 2e-5 of the row's largest magnitude (floored at 1), half-precision
gradients to one rounding of their dtype (2^-8 bf16, 2^-11 fp16) on top.
"""
import importlib.util

import pytest
import torch

from erpo.losses.token_loss import TokenParams, token_terms_torch
from erpo.ops import cuda_logprobs_entropy, torch_logprobs_entropy
from erpo.ops.row_layout import contiguous_layout_like, row_layout

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("erpo._C") is None or not torch.cuda.is_available(),
    reason="needs the CUDA extension erpo._C and a GPU (bench/gpu_check.sh)",
)
IGNORE = -100
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-5 + 2.0**-11, torch.bfloat16: 2e-5 + 2.0**-8}


def _rel(actual, expected):
    expected = expected.double()
    finite = torch.isfinite(expected)
    scale = max(float(expected[finite].abs().max()) if finite.any() else 0.0, 1.0)
    return float((actual.double() - expected)[finite].abs().max()) / scale if finite.any() else 0.0


@pytest.mark.parametrize("block_threads", (32, 64, 128, 256, 512))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("vocab", (1, 37, 4099, 50_021))
def test_every_block_size_matches_torch_backend(monkeypatch, block_threads, dtype, vocab):
    monkeypatch.setattr(cuda_logprobs_entropy, "BLOCK_THREADS", block_threads)
    hidden = (torch.randn(3, 6, vocab, device="cuda") * 4).to(dtype)
    logits = hidden[:, :-1]  # strided rows, misaligned for odd V
    targets = torch.randint(0, vocab, (3, 5), device="cuda")
    targets[0, 1] = IGNORE
    flat = targets.reshape(-1)
    layout = row_layout(logits)
    ref_layout = row_layout(logits.double())
    got = cuda_logprobs_entropy.forward(layout, flat, 1 / 0.8, IGNORE)
    want = torch_logprobs_entropy.forward(ref_layout, flat, 1 / 0.8, IGNORE)
    for name, a, b in zip(("logp", "entropy", "lse"), got, want):
        assert _rel(a, b) < 2e-5, name
    g_logp, g_ent = torch.randn(15, device="cuda"), torch.randn(15, device="cuda")
    grad = torch.empty(3, 5, vocab, device="cuda", dtype=dtype)
    cuda_logprobs_entropy.backward(layout, flat, got[2], got[1], g_logp, g_ent, 1 / 0.8, IGNORE,
                                   contiguous_layout_like(layout, grad))
    ref_grad = torch.empty(3, 5, vocab, device="cuda", dtype=torch.float64)
    torch_logprobs_entropy.backward(ref_layout, flat, want[2], want[1], g_logp.double(), g_ent.double(), 1 / 0.8,
                                    IGNORE, contiguous_layout_like(ref_layout, ref_grad))
    assert _rel(grad, ref_grad) < GRAD_RTOL[dtype]
    assert bool((grad[0, 1] == 0).all())


def test_binding_rejects_bad_arguments():
    from erpo import _C

    logits = torch.randn(4, 10, device="cuda")
    targets = torch.randint(0, 10, (4,), device="cuda")
    out = [torch.empty(4, device="cuda") for _ in range(3)]
    with pytest.raises(TypeError, match="int32 or int64"):
        _C.logprobs_entropy_fwd(logits, 0, 10, 4, targets.float(), *out, 4, 10, 1.0, IGNORE)
    with pytest.raises(RuntimeError, match="storage"):
        _C.logprobs_entropy_fwd(logits, 0, 11, 4, targets, *out, 4, 10, 1.0, IGNORE)  # rows run past the end
    with pytest.raises(RuntimeError, match="launch failed"):
        _C.logprobs_entropy_fwd(logits, 0, 10, 4, targets, *out, 4, 10, 1.0, IGNORE, 33)  # not a warp multiple
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        _C.logprobs_entropy_fwd(logits.double(), 0, 10, 4, targets, *out, 4, 10, 1.0, IGNORE)


@pytest.mark.parametrize("dual_clip", (False, True))
@pytest.mark.parametrize("kl_estimator", ("k1", "k2", "k3"))
def test_policy_loss_token_kernel_matches_twin(dual_clip, kl_estimator):
    from erpo import _C

    n = 10_001
    logp = -torch.rand(n, device="cuda") * 6
    old = logp + torch.randn(n, device="cuda") * 0.5
    adv = torch.randn(n, device="cuda")
    entropy = torch.rand(n, device="cuda") * 3
    ref = logp + torch.randn(n, device="cuda") * 0.3
    klcov = (torch.rand(n, device="cuda") < 0.2).float()
    params = TokenParams(0.2, 0.28, dual_clip, 3.0, 0.04, kl_estimator, 0.01)
    out = [torch.empty(n, device="cuda") for _ in range(3)]
    out += [torch.empty(n, device="cuda", dtype=torch.bool) for _ in range(2)]
    _C.policy_loss_token(logp, entropy, old, adv, ref, klcov, None, None, None, None, None, None, *out,
                         params.eps_low, params.eps_high, params.dual_clip_c, params.kl_coef, params.entropy_coef,
                         params.delta, params.cispo_max, params.sapo_tau_pos, params.sapo_tau_neg,
                         params.objective_code, params.dual_clip, params.cispo_clip == "upper", params.kl_code,
                         params.kl_bias_correction)
    want = token_terms_torch(*(t.double() for t in (logp, entropy, old, adv, ref, klcov)), params)
    ratio = torch.exp(logp.double() - old.double())
    away = ((ratio - 0.8).abs() > 1e-4) & ((ratio - 1.28).abs() > 1e-4) & ((logp - old).abs() > 1e-4)
    if dual_clip:
        away &= adv >= 0  # near the dual-clip bound the gradient may legitimately switch
    assert _rel(out[0], want[0]) < 1e-5
    assert _rel(out[1][away], want[1][away]) < 1e-5
    assert torch.equal(out[2], want[2].float())
    assert torch.equal(out[3][away], want[3][away]) and torch.equal(out[4][away], want[4][away])
