"""The built-in task: 1-2 digit addition with a 132k-parameter Llama and a character tokenizer, all built in
code (nothing downloaded), so `erpo train` with no arguments runs and visibly learns on a CPU.

Task ("add1"): prompt `a+b=` with a, b in 0..9, answer `str(a+b)` then EOS: 2 tokens when the sum is below 10
(55 % of prompts), 3 otherwise. A randomly initialised policy never finds the two-digit answers by RL alone
(it locks into one-digit answers), so the model first gets a short supervised warm-up (40 steps x 64
examples, about a second) that leaves it right on ~10 % of samples: the reward starts above zero and RL has
something to raise. How the task was chosen and how it fails without the warm-up: docs/trainer.md, "The built-in
task".
"""
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "_", "^", "$"
CHARS = "0123456789+=>,;"
MODEL_NAME = "tiny"  # the `model` config value that selects this model
DATA_NAME = "tiny:add1"  # the `data` config value that selects this task


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; BOS is prepended to every encoded text, left padding for generation."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD, padding_side="left"
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def problems() -> list[dict]:
    """All 100 problems of the task, as data rows (the same fields a JSONL file would have)."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def warm_up(model, tokenizer, steps: int = 40, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> None:
    """Supervised warm-up on the task (prompt + answer + EOS, loss on the answer tokens only).

    Uses its own generators, so the global RNG streams that training uses are left untouched.
    """
    rows = problems()
    picker = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    # Re-initialise from a task-seeded generator so the warm-up start does not depend on global RNG state.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * model.config.initializer_range)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = [rows[picker.randrange(len(rows))] for _ in range(batch_size)]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in batch]
        answers = [tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in batch]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(a)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        # Cleared after every step, the last included: a gradient left on the parameters would be added into
        # the first RL update.
        optimizer.zero_grad(set_to_none=True)
    model.eval()
