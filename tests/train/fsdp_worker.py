"""One process of tests/train/test_fsdp.py: a few optimizer steps of the built-in tiny model on one fixed
global batch, FSDP2-sharded over the torchrun ranks (each rank takes its slice of the batch) or, alone, on the
whole batch. Rank 0 writes, per mode, the per-step global loss, the gradient norms and the final full weights.

    python tests/train/fsdp_worker.py OUT MODE [MODE ...]

MODE: `logits` (the model's logits into erpo.policy_loss, the --no-fused-head path), `fused` (the trainer's
fused head: final hidden states + `trainer.output_head` into erpo.linear_policy_loss; under FSDP2 the root
module's head is the unsharded parameter FSDP keeps from the forward to the backward) or `fused-reshard`
(the same with the root resharded after its forward, so the head the loss reads is a DTensor shard and
`distributed.full_head` must gather it). The tiny model ties its head to the input embeddings.
"""
import json
import os
import sys

import torch

import erpo
from erpo.train import distributed, tiny_task, trainer

B, L, STEPS = 8, 12, 3


def run(d, mode: str) -> dict:
    tokenizer = tiny_task.build_tokenizer()
    torch.manual_seed(0)
    model = tiny_task.build_model(tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    vocab = model.config.vocab_size
    model = distributed.wrap(model, d, fsdp=d.enabled)
    if d.enabled and mode == "fused-reshard":
        model.set_reshard_after_forward(True, recurse=False)  # FSDPModule API: the root frees its head too
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
    head_types = set()

    def loss_of(batch):
        if mode == "logits":
            logits = model(input_ids=ids[rows]).logits[:, :-1]
            return erpo.policy_loss(logits, batch, config) if batch else erpo.logprobs_and_entropy(logits, targets)
        out = model(input_ids=ids[rows], output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, :-1]
        head_types.add(type(model.get_output_embeddings().weight).__name__)
        weight, bias = trainer.output_head(model, hidden.dtype)
        if batch:
            return erpo.linear_policy_loss(hidden, weight, batch, config, bias=bias)
        return erpo.linear_logprobs_and_entropy(hidden, weight, targets, bias)

    with torch.no_grad():  # the rollout policy's log-probs: fixed over the steps (PPO epochs on one batch)
        old, _ = loss_of(None)
    batch = {"targets": targets, "mask": mask[rows], "old_logp": old, "advantages": advantages[rows]}
    losses, norms = [], []
    for _ in range(STEPS):
        result = loss_of(batch)
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
    return {"losses": losses, "norms": norms, "world": d.world, "head_types": sorted(head_types),
            "sharded": type(model).__name__.startswith("FSDP"),
            "state": {k: v.detach().cpu().clone() for k, v in state.items()}}


def main(out: str, modes: list) -> None:
    d = distributed.setup("cpu")
    torch.set_num_threads(1)
    results = {mode: run(d, mode) for mode in modes}
    if d.is_main:
        torch.save({mode: r.pop("state") for mode, r in results.items()}, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump(results, f)
    distributed.cleanup(d)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    # Results are written and the group is destroyed: skip the interpreter's teardown, where a gloo thread was
    # seen aborting the rank ("terminate called without an active exception"), as ddp_grad_driver does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
