"""One process of tests/train/test_fsdp.py: a few optimizer steps of the built-in tiny model on one fixed
global batch, FSDP2-sharded over the torchrun ranks (each rank takes its slice of the batch) or, alone, on the
whole batch. Rank 0 writes the per-step global loss, the gradient norms and the final full weights."""
import json
import os
import sys

import torch

import erpo
from erpo.train import distributed, tiny_task

B, L, STEPS = 8, 12, 3


def main(out: str) -> None:
    d = distributed.setup("cpu")
    torch.set_num_threads(1)
    tokenizer = tiny_task.build_tokenizer()
    torch.manual_seed(0)
    model = tiny_task.build_model(tokenizer)
    vocab = model.config.vocab_size
    model = distributed.wrap(model, d, fsdp=d.enabled)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)  # the same global batch in every process
    ids = torch.randint(0, vocab, (B, L), generator=generator)
    mask = torch.rand(B, L - 1, generator=generator) > 0.3
    mask[:, 0] = True
    advantages = torch.randn(B, generator=generator)
    rows = slice(d.rank * B // d.world, (d.rank + 1) * B // d.world)
    # seq-mean-token-mean: the global loss is the mean of equal-sized rank slices' losses, so the ranks' averaged
    # gradients are the global batch's gradient.
    config = erpo.LossConfig(method="grpo", backend="torch", kl_coef=0.0, agg="seq-mean-token-mean")
    targets = ids[rows][:, 1:]
    with torch.no_grad():  # the rollout policy's log-probs: fixed over the steps (PPO epochs on one batch)
        old, _ = erpo.logprobs_and_entropy(model(input_ids=ids[rows]).logits[:, :-1], targets)
    batch = {"targets": targets, "mask": mask[rows], "old_logp": old, "advantages": advantages[rows]}
    losses, norms = [], []
    for _ in range(STEPS):
        logits = model(input_ids=ids[rows]).logits[:, :-1]
        result = erpo.policy_loss(logits, batch, config)
        result.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(distributed.mean({"loss": float(result.loss.detach())}, d)["loss"])
    if d.enabled:
        state = distributed.full_model_state(model, d, True)
    else:  # one entry per tensor (the tied head once), as full_model_state gives
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        state = {k: v for k, v in model.state_dict().items() if k in names}
    if d.is_main:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump({"losses": losses, "norms": norms, "world": d.world,
                       "sharded": type(model).__name__.startswith("FSDP")}, f)
    distributed.cleanup(d)


if __name__ == "__main__":
    main(sys.argv[1])
    # Results are written and the group is destroyed: skip the interpreter's teardown, where a gloo thread was
    # seen aborting the rank ("terminate called without an active exception"), as ddp_grad_driver does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
