"""One optimizer step's gradient under torchrun (2 gloo ranks) vs one process on the union of the ranks'
batches, for tests/train/test_offpolicy.py. Run as:

    torchrun --standalone --nproc-per-node 2 -m tests.train.ddp_grad_driver OUT_DIR AGG

Each rank samples its own groups and accumulates over micro-batches of one group through Trainer.accumulate
(global normaliser, DDP averaging). Rank 0 then rebuilds the union batch and takes the gradient of the plain
whole-batch loss (erpo.policy_loss on it, one process) and writes the relative errors to OUT_DIR/result.json,
with the error of local-only normalisation (each rank its own mean, DDP averaging) as the control.
"""
import json
import math
import os
import sys

import torch

from erpo.losses import policy_loss
from erpo.train import distributed, normalizer, rollout as rollout_lib
from erpo.train.config import from_dict
from erpo.train.trainer import Trainer, fixed_logprobs, response_logits


def tensors_for(trainer, out):
    """Batch + deterministic off-policy tensors: each token's value depends only on its own content, so the
    same response gets the same values in any packing."""
    batch = rollout_lib.pack(out, trainer.tokenizer.pad_token_id, trainer.device)
    n, width = batch["targets"].shape
    old = fixed_logprobs(trainer.policy, batch, n, trainer.cfg.temperature, False, False)
    position = torch.arange(width).expand(n, width)
    old = torch.where(batch["mask"].bool(), old + 0.3 * torch.sin(1.7 * batch["targets"] + 0.9 * position), old)
    adv = torch.tensor([math.sin(1.3 * sum(r) + len(r)) for r in out.response_ids])
    group_ids = torch.arange(n) // trainer.cfg.group_size
    return batch, {"old_logp": old, "advantages": adv, "group_ids": group_ids}


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def main():
    out_dir, agg = sys.argv[1], sys.argv[2]
    cfg = from_dict(dict(prompts_per_step=2, mini_batches=1, group_size=4, sft_warmup_steps=3, max_new_tokens=4,
                         progress=False, plots=False, eval_every=0, save_every=0, threads=1, fused_head=False,
                         loss="dapo", loss_args={"agg": agg}, out_dir=out_dir))
    trainer = Trainer(cfg)
    g = cfg.group_size
    out = trainer.sample_batch()[0]
    batch, tensors = tensors_for(trainer, out)
    micro = [slice(i, i + g) for i in range(0, len(out.response_ids), g)]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate(batch, tensors, micro, trainer.loss_cfg, {}, 1.0)
    global_grad = grads(trainer.policy)

    real_scale, real_keys = normalizer.Normalizer.loss_scale, normalizer.Normalizer.batch_keys
    # Control, the trainer before the global normaliser: each rank its own token-mean (each micro-batch's own mean
    # weighted by its share of the rank's tokens), DDP averaging ranks. One accumulate call per micro-batch: the
    # gradients add up across calls, and each call's all-reduce averages a linear part of the same sum.
    normalizer.Normalizer.batch_keys = lambda self: {}
    trainer.optimizer.zero_grad(set_to_none=True)
    for rows in micro:
        share = float(batch["mask"][rows].sum() / batch["mask"].sum())
        normalizer.Normalizer.loss_scale = property(lambda self, share=share: share)
        trainer.accumulate(batch, tensors, [rows], trainer.loss_cfg, {}, 1.0)
    local_grad = grads(trainer.policy)
    normalizer.Normalizer.loss_scale, normalizer.Normalizer.batch_keys = real_scale, real_keys

    everything = distributed.gather(out, trainer.dist)
    tokens = distributed.gather(int(batch["mask"].sum()), trainer.dist)
    if trainer.dist.is_main:
        union = rollout_lib.Rollouts([p for o in everything for p in o.prompt_ids],
                                     [r for o in everything for r in o.response_ids],
                                     [f for o in everything for f in o.finished])
        whole, whole_tensors = tensors_for(trainer, union)
        whole_tensors["group_ids"] = torch.arange(len(union.response_ids)) // g
        trainer.optimizer.zero_grad(set_to_none=True)
        logits = response_logits(trainer.policy, whole, slice(None), False)
        policy_loss(logits, {"targets": whole["targets"], "mask": whole["mask"], **whole_tensors},
                    trainer.loss_cfg, shift=True).loss.backward()  # response_logits: unsliced [n, R + 1, V]
        want = grads(trainer.policy)
        rel = lambda got: float((got - want).norm() / want.norm())  # noqa: E731
        with open(os.path.join(out_dir, "result.json"), "w") as handle:
            json.dump({"global_err": rel(global_grad), "local_err": rel(local_grad), "tokens": tokens,
                       "grad_norm": float(want.norm())}, handle)
    distributed.barrier(trainer.dist)
    # Exit without destroy_process_group: seen to hang a rank at teardown under load after the result was
    # written; the rank's work is done and nothing is left to flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
