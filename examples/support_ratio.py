"""The on-policy importance ratio under truncated sampling, scored over the full vocabulary vs over the support.

    python examples/support_ratio.py [--out examples/results/support-ratio.md]

For each built-in task (its recipe's model and warm-up) and each sampler setting (top-p 0.8, top-k 4): sample
16 prompts x 16 completions with transformers' `generate`, take the sampler's own log-probs of the sampled tokens
(log-softmax of the scores it sampled from, i.e. after temperature and the truncation), and divide the trainer's
log-probs of the same tokens by them: once over the full vocabulary (what every trainer does), once over the
support (`erpo.Support`). On-policy, a faithful trainer gets ratio 1. Prints and writes mean, min, max and the
fraction of tokens outside [0.9, 1.1].
"""
import argparse
import platform
import subprocess
import time

import torch

import erpo
from erpo.train import config as config_lib, data, model as model_lib, rollout
from erpo.train.trainer import response_logits

SETTINGS = (("top-p 0.8", dict(top_p=0.8)), ("top-k 4", dict(top_k=4)))


@torch.no_grad()
def sampled_with_scores(policy, tokenizer, prompts, n, max_new_tokens, temperature, knobs):
    """Rollouts and the sampler's log-probs of each sampled token ([N, R], 0 after EOS)."""
    engine = rollout.HFRollout(policy, tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):], mask[i, width - len(prompt):] = torch.tensor(prompt), 1
    out = policy.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                          do_sample=True, temperature=temperature, top_k=knobs.get("top_k", 0),
                          top_p=knobs.get("top_p", 1.0), max_new_tokens=max_new_tokens, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=sorted(engine.eos_ids))
    tokens = out.sequences[:, width:]
    sampler = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # processed scores: over S
    sampler_logp = sampler.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    responses, finished = zip(*(rollout._cut_at_eos(row, engine.eos_ids) for row in tokens.tolist()))
    rollouts = rollout.Rollouts([list(p) for p in prompts for _ in range(n)], list(responses), list(finished))
    return rollouts, sampler_logp


def ratio_stats(log_ratio, mask):
    ratio = log_ratio[mask].double().exp()
    outside = ((ratio < 0.9) | (ratio > 1.1)).double().mean()
    return {"mean": float(ratio.mean()), "min": float(ratio.min()), "max": float(ratio.max()),
            "outside": float(outside), "tokens": int(mask.sum())}


def measure(task: str, name: str, knobs: dict) -> dict:
    cfg = config_lib.from_dict(config_lib.load_file(task) if task != "builtin" else {})
    torch.manual_seed(cfg.seed)
    policy, tokenizer = model_lib.load_policy(cfg.model, cfg.tokenizer, cfg.seed, cfg.sft_warmup_steps)
    rows = data.load(cfg.data, cfg.prompt_field, cfg.answer_field)[:16]
    prompts = [data.encode_prompt(tokenizer, r["prompt"], cfg.chat_template) for r in rows]
    rollouts, sampler_logp = sampled_with_scores(policy, tokenizer, prompts, 16, cfg.max_new_tokens,
                                                 cfg.temperature, knobs)
    batch = rollout.pack(rollouts, tokenizer.pad_token_id, "cpu")
    width = batch["targets"].shape[1]
    sampler_logp = sampler_logp[:, :width]
    with torch.no_grad():
        logits = response_logits(policy, batch, slice(None), False)
        support = erpo.Support(top_k=knobs.get("top_k"), top_p=knobs.get("top_p"))
        full, _ = erpo.logprobs_and_entropy(logits, batch["targets"], temperature=cfg.temperature, shift=True)
        over_s, _ = erpo.logprobs_and_entropy(logits, batch["targets"], temperature=cfg.temperature, shift=True,
                                              support=support)
    mask = batch["mask"].bool()
    return {"task": task, "setting": name, "full": ratio_stats(full - sampler_logp, mask),
            "support": ratio_stats(over_s - sampler_logp, mask)}


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" with uncommitted changes" if dirty else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results/support-ratio.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(task, name, knobs) for task in ("builtin", "entropy_trap") for name, knobs in SETTINGS]
    lines = [
        "# On-policy importance ratio under truncated sampling: full vocabulary vs the sampler's support",
        "",
        f"`python examples/support_ratio.py`, {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, torch "
        f"{torch.__version__}, erpo {commit()}. First rollout batch of each task (16 prompts x 16 completions, "
        "the recipe's model and warm-up, seed 0), sampled by transformers' generate; ratio = exp(trainer logp - "
        "sampler logp) over the valid response tokens; a faithful trainer gets 1.",
        "",
        "| task | sampler | tokens | full: mean | full: min-max | full: outside [0.9, 1.1] | support: mean "
        "| support: min-max | support: outside [0.9, 1.1] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        f, s = r["full"], r["support"]
        lines.append(f"| {r['task']} | {r['setting']} | {f['tokens']} | {f['mean']:.3f} | {f['min']:.3f}-{f['max']:.3f} "
                     f"| {100 * f['outside']:.1f} % | {s['mean']:.4f} | {s['min']:.4f}-{s['max']:.4f} "
                     f"| {100 * s['outside']:.1f} % |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
