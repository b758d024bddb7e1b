"""Each method, through the trainer's own update (Trainer.accumulate: the micro-batch forward/backward of an
optimizer step), changes the gradient relative to plain DAPO the way its paper says, on a controlled
off-policy batch (old log-probs != current). A method that silently does nothing fails here.

Per-token gradients are read off the logits (--no-fused-head path): with no entropy bonus the loss depends on
a token's logits only through its log-prob, so dL/dlogits_t = g_t (onehot - p_t) and g_t = dL/dlogp_t.
"""
import dataclasses

import pytest
import torch

from erpo.train.config import from_dict
from erpo.train.trainer import Trainer, loss_config

SMALL = dict(prompts_per_step=4, group_size=4, mini_batches=1, sft_warmup_steps=3, max_new_tokens=4,
             progress=False, plots=False, eval_every=0, save_every=0, threads=1, fused_head=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    trainer = Trainer(from_dict({**SMALL, "out_dir": str(tmp_path_factory.mktemp("effects")), "loss": "dapo"}))
    prepared = trainer.prepare(trainer.loss_cfg)
    tensors = dict(prepared.tensors)
    gen = torch.Generator().manual_seed(11)
    mask = prepared.batch["mask"].bool()
    with torch.no_grad():
        current = tensors["old_logp"]  # the policy has not moved since sampling: old == current here
        tensors["old_logp"] = torch.where(mask, current + 0.4 * torch.randn(current.shape, generator=gen), current)
        tensors["ref_logp"] = torch.where(mask, current - 0.2 * torch.rand(current.shape, generator=gen), current)
    tensors["advantages"] = torch.randn(tensors["advantages"].shape, generator=gen)
    return trainer, prepared.batch, tensors, current


def token_grads(trainer, batch, tensors, method, controller_cfg=None, **loss_args):
    """(g [n, R] = dL/dlogp per token, entropy [n, R], logp [n, R]) of one optimizer step's backward."""
    cfg = dataclasses.replace(trainer.cfg, loss=method, loss_args=loss_args)
    loss_cfg = controller_cfg if controller_cfg is not None else loss_config(cfg)
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    hook = trainer.policy.get_output_embeddings().register_forward_hook(keep)
    trainer.optimizer.zero_grad(set_to_none=True)
    n = batch["targets"].shape[0]
    try:
        trainer.accumulate(batch, tensors, [slice(0, n)], loss_cfg, {}, 1.0)
    finally:
        hook.remove()
    logits = captured[0][:, :-1]
    grad = captured[0].grad[:, :-1].double()
    probs = torch.softmax(logits.detach().double(), -1)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    target_p = probs.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    g = grad.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1) / (1 - target_p)
    return torch.where(batch["mask"].bool(), g, torch.zeros_like(g)), entropy, target_p.log()


def test_high_entropy_mask_drops_the_gradient_of_low_entropy_tokens(setup):
    trainer, batch, tensors, _ = setup
    valid = batch["mask"].bool()
    dapo, entropy, _ = token_grads(trainer, batch, tensors, "dapo")
    masked, _, _ = token_grads(trainer, batch, tensors, "high_entropy_mask", rho=0.2)
    threshold = torch.quantile(entropy[valid], 0.8)
    low = valid & (entropy < threshold - 1e-6)
    high = valid & (entropy > threshold + 1e-6)
    assert (dapo[low] != 0).sum() > 0  # DAPO does train these tokens
    assert torch.all(masked[low] == 0)
    torch.testing.assert_close(masked[high], dapo[high], rtol=1e-4, atol=1e-9)


def test_kl_cov_penalises_only_the_selected_tokens_toward_the_old_policy(setup):
    trainer, batch, tensors, current = setup
    valid = batch["mask"].bool()
    plain, _, _ = token_grads(trainer, batch, tensors, "kl_cov", kl_cov_beta=0.0, kl_cov_ratio=0.1)
    penalised, _, _ = token_grads(trainer, batch, tensors, "kl_cov", kl_cov_beta=1.0, kl_cov_ratio=0.1)
    diff = penalised - plain
    selected = valid & (diff.abs() > 1e-9)
    budget = max(1, int(0.1 * int(valid.sum())))
    assert int(selected.sum()) == budget
    # d(beta |logp - old|)/dlogp = beta sign(logp - old): descending it pulls logp back toward old.
    direction = torch.sign(current - tensors["old_logp"])[selected]
    assert torch.all(diff[selected] * direction > 0)


def test_clip_cov_zeroes_the_gradient_of_the_picked_tokens(setup):
    trainer, batch, tensors, _ = setup
    valid = batch["mask"].bool()
    dapo, _, _ = token_grads(trainer, batch, tensors, "dapo")
    picked_run, _, _ = token_grads(trainer, batch, tensors, "clip_cov", clip_cov_ratio=0.1, clip_cov_lb=-100.0,
                                   clip_cov_ub=100.0)
    zeroed = valid & (picked_run == 0) & (dapo != 0)
    assert int(zeroed.sum()) == max(1, int(0.1 * int(valid.sum())))
    rest = valid & ~zeroed
    torch.testing.assert_close(picked_run[rest], dapo[rest], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("target,moved", [(50.0, 0.56), (0.0, 0.2)])
def test_adapo_eps_high_follows_entropy_and_changes_the_clip(setup, tmp_path, target, moved):
    """Entropy below target doubles eps_high (0.28 -> 0.56), above it halves it (clipped at eps_low 0.2); the
    next update then trains exactly the tokens whose ratio lies between the old and the new upper bound."""
    adapo_run = Trainer(from_dict({**SMALL, "out_dir": str(tmp_path), "loss": "adapo",
                                   "loss_args": {"target_entropy": target}}))
    adapo_run.train_step()
    moved_cfg = adapo_run.controller.apply(adapo_run.loss_cfg)
    assert moved_cfg.eps_high == pytest.approx(moved)
    trainer, batch, tensors, current = setup  # the controlled batch, on the policy that it was built for
    dapo, _, _ = token_grads(trainer, batch, tensors, "dapo")
    adapo, _, _ = token_grads(trainer, batch, tensors, "adapo", controller_cfg=moved_cfg)
    ratio = torch.exp(current - tensors["old_logp"])
    adv = tensors["advantages"][:, None].expand_as(ratio)
    low_edge, high_edge = sorted((1.28, 1 + moved))
    between = batch["mask"].bool() & (adv > 0) & (ratio > low_edge + 1e-4) & (ratio < high_edge - 1e-4)
    assert between.sum() > 0
    differs = (adapo - dapo).abs() > 1e-9
    assert torch.equal(differs & batch["mask"].bool(), between)
    if moved > 0.28:  # DAPO clipped these tokens (no gradient), ADAPO's wider bound trains them
        assert torch.all(dapo[between] == 0) and torch.all(adapo[between] != 0)
    else:
        assert torch.all(adapo[between] == 0) and torch.all(dapo[between] != 0)


def test_erpo_moves_gradient_mass_to_high_entropy_tokens(setup):
    trainer, batch, tensors, _ = setup
    valid = batch["mask"].bool()
    dapo, entropy, _ = token_grads(trainer, batch, tensors, "dapo")
    erpo_g, _, _ = token_grads(trainer, batch, tensors, "erpo", eta=0.0)
    both = valid & (dapo != 0) & (erpo_g != 0)
    gain = (erpo_g[both] / dapo[both]).abs()  # ERPO's per-token weight alpha (same clip, same advantage)
    h = entropy[both]
    order = torch.argsort(h)
    quarter = max(1, len(order) // 4)
    assert gain[order[-quarter:]].mean() > 1.5 * gain[order[:quarter]].mean()
    high_share = lambda g: (g.abs()[both][h > h.median()]).sum() / g.abs()[both].sum()  # noqa: E731
    assert high_share(erpo_g) > high_share(dapo) + 0.05
