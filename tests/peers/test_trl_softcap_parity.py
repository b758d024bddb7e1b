"""Soft-capped and scaled heads and the fp32 head against TRL 1.16's own fused head (issue 26 item 1).

TRL's `ChunkedLogProbFunction` (trl/kernels/chunked_logprob.py; its torch path on CPU) on identical inputs is the
second reference next to float64: erpo's `linear_logprobs_and_entropy(softcap=, logit_scale=)` (torch and Triton)
gives TRL's values and gradients, fp32, 1e-5 / 1e-4 relative (norms). TRL's `cast_lm_head_to_fp32` (the hidden
states upcast, the head in fp32) is erpo's `head_fp32=True` over the same bf16 inputs. And the TRL drop-in on a
soft-capped, scaled model (its config names the cap and the scale, its forward applies them) gives TRL's own
GRPOTrainer loss and gradients on one batch.
"""
import copy

import pytest
import torch

import erpo
from tests.peers.conftest import require_peer
from tests.peers.inputs import assert_close, loss_floor

IGNORE = -100


@pytest.fixture(scope="module")
def trl_chunked():
    """trl.kernels.chunked_logprob (ChunkedLogProbFunction; its torch path off CUDA)."""
    require_peer("trl")
    import trl.kernels.chunked_logprob as module

    return module
TRANSFORMS = [(30.0, 1.0), (3.0, 0.5), (None, 0.0625)]


def _trl_head(trl_mod, hidden, weight, bias, targets, temperature, softcap, logit_scale):
    """TRL's fused head, as its add_fused_lm_head calls it on the valid rows (it never sees ignore_index)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    keep = targets != IGNORE
    logp, entropy, *_ = trl_mod.ChunkedLogProbFunction.apply(
        leaves[0][keep], leaves[1], leaves[2], targets[keep], temperature, 32768, softcap, logit_scale,
        ("entropy",))
    return logp, entropy, keep, leaves


def _case(n, h, v, softcap, logit_scale, dtype=torch.float32):
    # |s y| up to ~3c (the cap bites); without a cap |s y| ~ 5, where TRL's entropy (lse - E[x], no shift by the
    # max) keeps 1e-5 of a moderate entropy (near-zero entropies of peaked rows are below its own rounding)
    reach = 3.0 * (softcap or 3.0) / logit_scale
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) * reach / 2 / h ** 0.5).to(dtype)
    bias = torch.randn(v).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[2] = IGNORE
    return hidden, weight, bias, targets, torch.randn(n), torch.randn(n)


def _float64(hidden, weight, bias, targets, temperature, softcap, logit_scale, keep, g_logp, g_ent):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    z = (leaves[0][keep] @ leaves[1].T + leaves[2]) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logprobs = torch.log_softmax(z / temperature, -1)
    logp = logprobs.gather(-1, targets[keep][:, None])[:, 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    ((logp * g_logp.double()).sum() + (entropy * g_ent.double()).sum()).backward()
    return logp.detach(), entropy.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("softcap,logit_scale", TRANSFORMS)
def test_head_equals_trl_chunked_logprob(trl_chunked, backend, softcap, logit_scale):
    temperature = 0.8
    hidden, weight, bias, targets, g_logp, g_ent = _case(11, 24, 301, softcap, logit_scale)
    trl_logp, trl_ent, keep, trl_leaves = _trl_head(trl_chunked, hidden, weight, bias, targets, temperature, softcap,
                                                    logit_scale)
    ((trl_logp * g_logp[keep]).sum() + (trl_ent * g_ent[keep]).sum()).backward()
    want_logp, want_ent, want_grads = _float64(hidden, weight, bias, targets, temperature, softcap, logit_scale, keep,
                                               g_logp[keep], g_ent[keep])
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = erpo.linear_logprobs_and_entropy(leaves[0], leaves[1], targets, leaves[2], temperature=temperature,
                                                     backend=backend, softcap=softcap, logit_scale=logit_scale)
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    assert torch.all(logp[~keep] == 0) and torch.all(leaves[0].grad[~keep] == 0)
    for ours, theirs, ref, what in ((logp[keep], trl_logp, want_logp, "logp"), (entropy[keep], trl_ent, want_ent, "H")):
        assert_close(ours, theirs, f"{what} vs TRL")
        assert_close(ours, ref, f"{what} vs float64")
    for ours, theirs, ref, what in zip([t.grad for t in leaves], [t.grad for t in trl_leaves], want_grads,
                                       ("d hidden", "d weight", "d bias")):
        ours = ours[keep] if what == "d hidden" else ours  # TRL's leaf is the whole hidden: its rows [keep]
        theirs = theirs[keep] if what == "d hidden" else theirs
        ref = ref[keep] if what == "d hidden" else ref
        assert_close(ours, theirs, f"{what} vs TRL", rtol=1e-4)
        assert_close(ours, ref, f"{what} vs float64", rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_head_equals_trls_cast_lm_head_to_fp32(trl_chunked, backend):
    """bf16 hidden states and head: TRL's cast_lm_head_to_fp32 (hidden.float(), the head cast to fp32, fp32 tiles)
    and erpo's head_fp32 (the bf16 tensors as they are, upcast tile by tile) compute the same fp32 head."""
    hidden, weight, bias, targets, g_logp, g_ent = _case(9, 32, 257, 30.0, 1.0, dtype=torch.bfloat16)
    trl_logp, trl_ent, keep, trl_leaves = _trl_head(trl_chunked, hidden.float(), weight.float(), bias.float(),
                                                    targets, 1.0, 30.0, 1.0)
    ((trl_logp * g_logp[keep]).sum() + (trl_ent * g_ent[keep]).sum()).backward()
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = erpo.linear_logprobs_and_entropy(leaves[0], leaves[1], targets, leaves[2], backend=backend,
                                                     softcap=30.0, head_fp32=True)
    assert_close(logp[keep], trl_logp, "logp vs TRL's fp32 head")
    assert_close(entropy[keep], trl_ent, "H vs TRL's fp32 head")
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    # bf16 gradients (each input's dtype) against TRL's fp32 ones: bf16 rounding
    assert_close(leaves[1].grad, trl_leaves[1].grad, "d weight vs TRL's fp32 head", rtol=2 ** -8)
    # Without head_fp32 the bf16 head is another computation (16-bit dlogits in the gradient products)
    plain = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp16, entropy16 = erpo.linear_logprobs_and_entropy(plain[0], plain[1], targets, plain[2], backend="torch",
                                                         softcap=30.0)
    assert (logp16[keep] - trl_logp).norm() > 10 * 1e-5 * trl_logp.norm()


def _capped_task():
    from tests.peers.test_trl_trainer import _task

    tokenizer, model, data = _task()
    model.config.final_logit_softcapping, model.config.logit_scale = 4.0, 0.8
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: 4.0 * torch.tanh(0.8 * out / 4.0))
    return tokenizer, model, data


@pytest.mark.parametrize("cast", [False, True], ids=["plain", "cast_lm_head_to_fp32"])
def test_drop_in_on_a_capped_model_equals_trl(trl_grpo, tmp_path, cast):
    from erpo.integrations.trl import GRPOTrainer
    from tests.peers.test_trl_trainer import _args, _batch, _reward

    tokenizer, model, data = _capped_task()
    args = _args(tmp_path, loss_type="dapo", cast_lm_head_to_fp32=cast, temperature=0.7)
    ours = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=data,
                       processing_class=tokenizer)
    assert ours._erpo_fused_head and ours._erpo_head == {"softcap": 4.0, "logit_scale": 0.8}
    assert ours._erpo_head_fp32 == cast
    theirs = trl_grpo.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    inputs = _batch(model, tokenizer)
    results = []
    for trainer in (ours, theirs):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}))
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, "capped dapo loss", floor=loss_floor(inputs["advantages"]))
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        assert_close(grads[name], expected_grads[name], f"capped dapo d loss / d {name}")
