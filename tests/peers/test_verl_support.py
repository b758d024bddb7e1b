"""verl and the sampler's truncated support (issue 23 item 5, verl part): verl's losses get log-probs its actor
already computed, so the support is applied where verl computes them: `install_support_logprobs` swaps verl's
`logprobs_from_logits` in its FSDP engine for erpo's op over S. Checked here: the replacement against a dense
float64 reference (values and gradients) and against verl's own function when S is the whole vocabulary, the
install mechanics, the refusal of a support in the loss config. Not run here: verl's FSDP engine itself (its
module imports peft, which this machine lacks) or a verl training run."""
import sys
import types

import pytest
import torch

from tests.peers.inputs import assert_close


@pytest.fixture(scope="module")
def verl_erpo(verl_core):
    import erpo.integrations.verl as integration

    return integration


def _dense_reference(logits, labels, top_k=None, top_p=None):
    """Sort-based truncation (vLLM's rule: top-k then top-p over the renormalised kept set), the label kept in S,
    log-softmax over S, in float64."""
    x = logits.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k is not None:
        keep &= x >= x.topk(top_k, -1).values[..., -1:]
    if top_p is not None:
        masked = x.masked_fill(~keep, -float("inf"))
        probs, order = masked.softmax(-1).sort(-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        keep_sorted = before < top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    keep.scatter_(-1, labels[..., None], True)
    masked = x.masked_fill(~keep, -float("inf"))
    return masked.log_softmax(-1).gather(-1, labels[..., None])[..., 0]


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.7), (5, 0.8)])
def test_support_logprobs_match_a_dense_reference(verl_erpo, top_k, top_p):
    import erpo

    gen = torch.Generator().manual_seed(0)
    logits = (2.0 * torch.randn(37, 29, generator=gen)).requires_grad_()
    labels = torch.randint(0, 29, (37,), generator=gen)
    fn = verl_erpo.support_logprobs_from_logits(erpo.Support(top_k=top_k, top_p=top_p))
    weights = torch.randn(37, generator=gen)
    logp = fn(logits, labels, inplace_backward=False)
    (logp * weights).sum().backward()
    leaf = logits.detach().double().requires_grad_()
    expected = _dense_reference(leaf, labels, top_k, top_p)
    (expected * weights.double()).sum().backward()
    assert_close(logp, expected.float(), "logp over S", floor=1e-6)
    assert_close(logits.grad, leaf.grad.float(), "d logp / d logits over S", floor=1e-6)
    full = torch.log_softmax(logits.detach(), -1).gather(-1, labels[:, None])[:, 0]
    assert (logp.detach() - full).min() > 1e-4, "the support kept the whole mass: truncation did nothing"


def test_full_support_is_verls_own_logprobs(verl_erpo):
    import erpo
    from verl.utils.torch_functional import logprobs_from_logits

    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(2, 9, 31, generator=gen), torch.randint(0, 31, (2, 9), generator=gen)
    ours = verl_erpo.support_logprobs_from_logits(erpo.Support(top_k=31))(logits, labels)
    assert_close(ours, logprobs_from_logits(logits, labels), "logp, S = the vocabulary", floor=1e-6)


def test_install_swaps_the_engine_function(verl_erpo, monkeypatch):
    import erpo

    def verls(logits, labels, inplace_backward=True):
        raise AssertionError("verl's own function ran")

    holder = types.ModuleType("erpo_test_verl_engine")
    holder.logprobs_from_logits = verls
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    verl_erpo.install_support_logprobs(top_k=-1, top_p=1.0, modules=(holder.__name__,))  # verl's "off": nothing
    assert holder.logprobs_from_logits is verls
    verl_erpo.install_support_logprobs(top_k=4, top_p=0.9, modules=(holder.__name__,))
    assert holder.logprobs_from_logits.__erpo_support__ == erpo.Support(top_k=4, top_p=0.9)
    empty = types.ModuleType("erpo_test_verl_other")
    monkeypatch.setitem(sys.modules, empty.__name__, empty)
    with pytest.raises(RuntimeError, match="has no logprobs_from_logits"):
        verl_erpo.install_support_logprobs(top_k=4, modules=(empty.__name__,))
    with pytest.raises(ValueError, match="not both"):
        verl_erpo.install_support_logprobs(erpo.Support(top_k=4), top_p=0.9, modules=(holder.__name__,))


def test_support_in_the_loss_config_is_refused(verl_erpo):
    from verl.workers.config import ActorConfig

    from erpo.integrations.verl import PolicyLossConfig

    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                         policy_loss=PolicyLossConfig(erpo={"support": {"top_k": 5}}))
    with pytest.raises(ValueError, match="install_support_logprobs"):
        verl_erpo.loss_config_from_verl(config, "grpo")
