"""The torch backend's compiled chunk bodies (erpo/ops/torch_chunk_bodies.py) against the float64 reference.

Production inputs take the compiled path only above COMPILE_MIN_ELEMENTS; here the threshold is 0 so small
inputs take it, and a counter of compiled chunk calls proves it ran (a path that silently stayed eager would
otherwise pass). The eager bodies are what tests/ops/test_logprobs_entropy.py covers at small sizes.
"""
import pytest
import torch

import erpo
from erpo.ops import torch_chunk_bodies, torch_logprobs_entropy
from tests.conftest import DEVICE
from tests.ops.test_logprobs_entropy import GRAD_RTOL, VALUE_RTOL, reference, rel_err

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the compiled chunk bodies are used on CPU tensors only")


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """One private inductor cache for this module: concurrent compiles elsewhere cannot interfere."""
    return str(tmp_path_factory.mktemp("inductor"))


@pytest.fixture
def compiled_path(monkeypatch, inductor_cache):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    monkeypatch.setattr(torch_chunk_bodies, "ENABLED", True)
    monkeypatch.setattr(torch_chunk_bodies, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch_chunk_bodies, "fallback_reason", None)
    monkeypatch.setattr(torch_logprobs_entropy, "CHUNK_ELEMENTS", 2048)  # several chunks, one ragged
    torch._dynamo.reset()
    torch_chunk_bodies._compiled.clear()
    yield
    torch_chunk_bodies._compiled.clear()


def _hard_logits(batch, positions, vocab, dtype):
    logits = torch.randn(batch, positions, vocab) * 6
    logits[0, 1, : vocab // 2] = float("-inf")  # a masked vocabulary
    logits[1, 0, 3] = 45.0  # large magnitude
    return logits.to(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_bodies_match_reference(compiled_path, dtype):
    batch, positions, vocab = 3, 7, 301
    base = _hard_logits(batch, positions, vocab, dtype)
    targets = torch.randint(0, vocab, (batch, positions - 1))
    targets[2, 3] = -100
    targets[0, 1] = vocab - 1  # the masked row's target among its live entries (a masked target's logp is -inf)
    g_logp, g_ent = torch.randn(batch, positions - 1), torch.randn(batch, positions - 1)
    ref_leaf = torch.where(base == float("-inf"), -1e4, base.double()).requires_grad_()
    ref_logp, ref_entropy = reference(ref_leaf[:, :-1], targets, temperature=0.7)
    torch.autograd.backward([ref_logp, ref_entropy], [g_logp.double(), g_ent.double()])
    tolerance = GRAD_RTOL[dtype]

    for mode in ("view", "shift", "shift-inplace"):
        before = torch_chunk_bodies.compiled_calls
        leaf = base.clone().requires_grad_()
        logits = leaf * 1
        kwargs = dict(shift=True, inplace_grad=mode == "shift-inplace") if mode != "view" else {}
        scored = logits if mode != "view" else logits[:, :-1]  # the strided view: rows not evenly spaced
        logp, entropy = erpo.logprobs_and_entropy(scored, targets, temperature=0.7, backend="torch", **kwargs)
        assert rel_err(logp, ref_logp.detach(), 1.0) < VALUE_RTOL, mode
        assert rel_err(entropy, ref_entropy.detach(), 1.0) < VALUE_RTOL, mode
        torch.autograd.backward([logp, entropy], [g_logp, g_ent])
        assert torch.all(leaf.grad[base == float("-inf")] == 0), mode
        assert torch.equal(leaf.grad[2, 3], torch.zeros_like(leaf.grad[2, 3])), mode
        assert rel_err(leaf.grad, ref_leaf.grad) < tolerance, mode
        assert torch_chunk_bodies.compiled_calls > before + 2, f"{mode}: the compiled bodies did not run"
    assert torch_chunk_bodies.fallback_reason is None


@pytest.mark.slow
def test_compiled_bodies_keep_bad_rows_in_their_row(compiled_path):
    logits = torch.randn(4, 500) * 3
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    targets = torch.randint(0, 500, (4,))
    leaf = logits.clone().requires_grad_()
    before = torch_chunk_bodies.compiled_calls
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, backend="torch")
    assert not torch.isfinite(logp[1:]).any() and not torch.isfinite(entropy[1:]).any()
    ref_logp, ref_entropy = reference(logits[:1], targets[:1])
    assert rel_err(logp[:1], ref_logp, 1.0) < VALUE_RTOL and rel_err(entropy[:1], ref_entropy, 1.0) < VALUE_RTOL
    (logp[0] + entropy[0]).backward()
    assert torch.isfinite(leaf.grad[0]).all()
    assert torch_chunk_bodies.compiled_calls > before


def test_small_inputs_stay_eager(monkeypatch):
    monkeypatch.setattr(torch_chunk_bodies, "ENABLED", True)
    before = torch_chunk_bodies.compiled_calls
    leaf = torch.randn(4, 300, requires_grad=True)
    logp, entropy = erpo.logprobs_and_entropy(leaf, torch.randint(0, 300, (4,)), backend="torch")
    (logp.sum() + entropy.sum()).backward()
    assert torch_chunk_bodies.compiled_calls == before  # 1200 elements: far below COMPILE_MIN_ELEMENTS


def test_compile_failure_falls_back_to_eager_with_a_warning(compiled_path, monkeypatch):
    def broken_compile(body, **_):
        def run(*args):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")

        return run

    monkeypatch.setattr(torch_chunk_bodies.torch, "compile", broken_compile)
    logits = torch.randn(5, 400) * 4
    targets = torch.randint(0, 400, (5,))
    leaf = logits.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        logp, entropy = erpo.logprobs_and_entropy(leaf, targets, backend="torch")
    assert "no C++ compiler found" in torch_chunk_bodies.fallback_reason
    (logp.sum() - entropy.sum()).backward()
    ref_leaf = logits.double().requires_grad_()
    ref_logp, ref_entropy = reference(ref_leaf, targets)
    (ref_logp.sum() - ref_entropy.sum()).backward()
    assert rel_err(logp, ref_logp.detach(), 1.0) < VALUE_RTOL
    assert rel_err(leaf.grad, ref_leaf.grad) < GRAD_RTOL[torch.float32]
