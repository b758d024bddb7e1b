"""A step whose completions are all masked (every one truncated under masking, or a rank of padding) is a zero
step through the trainer's own update: loss 0, no gradient, counted in n_empty_batches, never a raise or a 0/0."""
import pytest
import torch

from erpo.train.config import from_dict
from erpo.train.trainer import Trainer

SMALL = dict(prompts_per_step=4, group_size=4, mini_batches=1, micro_batch_groups=2, sft_warmup_steps=3,
             max_new_tokens=4, progress=False, plots=False, eval_every=0, save_every=0, threads=1)


@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("loss", ["dapo", "grpo"])
def test_an_all_masked_step_is_a_zero_step(tmp_path, fused_head, loss):
    trainer = Trainer(from_dict({**SMALL, "out_dir": str(tmp_path), "loss": loss, "fused_head": fused_head}))
    prepared = trainer.prepare(trainer.loss_cfg)
    batch = dict(prepared.batch, mask=torch.zeros_like(prepared.batch["mask"]))
    sums = {}
    trainer.optimizer.zero_grad(set_to_none=True)
    loss_value = trainer.accumulate(batch, prepared.tensors, prepared.steps[0], trainer.loss_cfg, sums, 1.0)
    grads = [p.grad for p in trainer.policy.parameters() if p.grad is not None]
    assert loss_value == 0.0
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)  # backward ran, and moved nothing
    assert sums["n_empty_batches"] == 2.0  # both micro-batches of the step
    assert all(torch.isfinite(torch.tensor(v)) for k, v in sums.items() if not k.endswith(("_min", "_max")))
