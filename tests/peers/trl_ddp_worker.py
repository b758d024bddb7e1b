"""One process of tests/peers/test_trl_ddp.py: one optimizer step of a GRPOTrainer's loss on one fixed global
batch, as one process (the whole batch) or as one of 2 gloo ranks under torchrun (this rank's half, the model
wrapped in DDP by the trainer's own accelerator, `GRPOConfig(use_cpu=True)`).

    python tests/peers/trl_ddp_worker.py OUT                          # one process
    torchrun --nproc-per-node 2 tests/peers/trl_ddp_worker.py OUT     # two gloo ranks

For erpo's drop-in (`erpo.integrations.trl.GRPOTrainer`) and TRL's own GRPOTrainer (the harness check), for
the loss types "dapo" (normalised by the token count of the whole generation batch, `num_items_in_batch`) and
"grpo" (per-sequence means), fused head: the batch's rows are split so that the ranks hold different numbers of
valid tokens, and the trainer's `_compute_loss` + `accelerator.backward` run as `Trainer.training_step` runs
them. The step is plain SGD (lr 1): its update is the gradient the optimizer receives, where AdamW's first step
(lr * sign) would hide a wrong scale. Rank 0 writes {trainer/loss_type: {"loss": global loss, "update": ...}}.
"""
import os
import sys
import tempfile

import torch

ROWS, PROMPT, COMPLETION = 8, 5, 6


def global_batch(model):
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (ROWS, PROMPT), generator=gen)
    completion_ids = torch.randint(3, vocab, (ROWS, COMPLETION), generator=gen)
    mask = torch.ones(ROWS, COMPLETION, dtype=torch.long)
    for row, keep in enumerate([6, 4, 0, 2, 6, 6, 5, 6]):  # rank 0: 12 valid tokens, rank 1: 23
        mask[row, keep:] = 0
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, PROMPT - 1:-1].float(), -1)
        logp = logp.gather(-1, completion_ids[..., None])[..., 0]
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
            "completion_mask": mask, "advantages": torch.randn(ROWS, generator=gen),
            "old_per_token_logps": -(logp + 0.3 * torch.randn(logp.shape, generator=gen)).abs() - 1e-4,
            "num_items_in_batch": mask.sum()}  # TRL gathers it over the processes: the global count


def one_step(cls, loss_type, out_dir):
    from trl import GRPOConfig

    from tests.peers.test_trl_trainer import _reward, _task

    tokenizer, model, data = _task()
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                      max_steps=1, learning_rate=1.0, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                      bf16=False, loss_type=loss_type)
    trainer = cls(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer)
    accelerator = trainer.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    assert world == int(os.environ.get("WORLD_SIZE", "1")), (world, os.environ.get("WORLD_SIZE"))
    batch = global_batch(trainer.model)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    inputs = {k: v if k == "num_items_in_batch" else v[rows] for k, v in batch.items()}
    wrapped = accelerator.prepare_model(trainer.model)  # DDP over the gloo group when world > 1
    assert (world > 1) == isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this step does not run
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    loss = trainer._compute_loss(wrapped, inputs)
    accelerator.backward(loss)
    optimizer.step()
    update = {n: (p.detach() - before[n]) for n, p in trainer.model.named_parameters()}
    # The global loss is the mean of the ranks' (DDP averages their gradients the same way): for dapo each rank's
    # loss is its token sum over (global count / world), for grpo the mean over its equal-sized slice
    total = accelerator.gather(loss.detach()[None]).mean()
    return {"loss": float(total), "update": update}


def main(out: str) -> None:
    import erpo.integrations.trl as ours
    import trl

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("erpo", ours.GRPOTrainer), ("trl", trl.GRPOTrainer)):
            for loss_type in ("dapo", "grpo"):
                results[f"{name}/{loss_type}"] = one_step(cls, loss_type, tmp)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Results are written and the group is destroyed: skip the interpreter's teardown, where a gloo thread was
    # seen aborting a rank (as tests/train/fsdp_worker.py does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
