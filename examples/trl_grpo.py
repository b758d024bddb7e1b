"""TRL's GRPOTrainer with erpo's loss: the only change to a TRL script is the import (and, optionally,
`loss_config=` for what TRL lacks). Trains the built-in task's tiny Llama for 5 GRPO steps by default (`--steps`)
on the CPU: 16 s wall in all, 1.1 s of it training, the rest imports and the supervised warm-up (2026-12-07, shared
2-core AMD EPYC VM, load average 2, torch 2.13.0+cpu, trl 1.16.0, transformers 5.25.0, float32;
`tests/peers/test_trl_example.py` runs it):

    python examples/trl_grpo.py
    python examples/trl_grpo.py --steps 5 --loss-config "method=dapo controls=high_entropy_mask,kl_cov"

Needs TRL (trl==1.16.0, the version erpo's tests pin) and the trainer's dependencies, from the repository root:
`pip install -e ".[train,peers]"` (on a CPU-only machine: `pip install -r requirements-cpu.txt -e ".[train,peers]"`).
Without them it says so in one line and exits with status 1.
"""
import argparse
import sys
import tempfile

INSTALL = 'pip install -e ".[train,peers]"'

try:
    from trl import GRPOConfig
    from datasets import Dataset

    from erpo import LossConfig
    from erpo.integrations.trl import GRPOTrainer  # was: from trl import GRPOTrainer
    from erpo.train import tiny_task
except ModuleNotFoundError as missing:
    sys.exit(f"examples/trl_grpo.py needs the module {missing.name!r}, which is not installed: run `{INSTALL}` "
             "from the repository root (the `peers` extra brings TRL, the `train` extra the rest)")


def reward(completions, answer, **kwargs):
    """1 for a completion that starts with the right sum, else 0."""
    return [float(c.strip().startswith(a)) for c, a in zip(completions, answer)]


def parse_loss_config(text: str):
    """'method=dapo controls=a,b rho=0.3' -> LossConfig; numbers are parsed, everything else is a string."""
    if not text:
        return None
    fields = {}
    for item in text.split():
        key, value = item.split("=", 1)
        try:
            fields[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            fields[key] = value
    return LossConfig(**fields)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-type", default="dapo", help="TRL's GRPOConfig.loss_type")
    parser.add_argument("--loss-config", default="", help="an erpo LossConfig as 'key=value ...' (wins over TRL)")
    args = parser.parse_args()

    tokenizer = tiny_task.build_tokenizer()
    model = tiny_task.build_model(tokenizer)
    tiny_task.warm_up(model, tokenizer)
    data = Dataset.from_list(tiny_task.problems())
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="erpo-trl-"), loss_type=args.loss_type,
                        per_device_train_batch_size=8, num_generations=8, max_completion_length=4,
                        max_steps=args.steps, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
                        save_strategy="no", bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, loss_config=parse_loss_config(args.loss_config))
    print(f"erpo loss: {trainer.loss_config}")
    trainer.train()
    for record in trainer.state.log_history:
        if "reward" in record:
            print(f"step {record['step']}: reward {record['reward']:.3f} entropy {record.get('erpo/entropy', 0):.3f} "
                  f"loss {record.get('loss', float('nan')):.4f}")


if __name__ == "__main__":
    main()
