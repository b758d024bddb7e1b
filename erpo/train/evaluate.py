"""Eval on held-out prompts: pass@1 (one sample per prompt, greedy by default) and mean response length."""
import torch

from erpo.train import rewards as rewards_lib
from erpo.train.data import encode_prompt


@torch.no_grad()
def evaluate(engine, tokenizer, rows: list[dict], reward_fn, *, chat_template: bool, max_new_tokens: int,
             temperature: float, reward_timeout: float, score_truncated: bool, batch_size: int = 256) -> dict:
    scores, lengths, problems = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, r["prompt"], chat_template) for r in chunk]
        out = engine.generate(prompts, 1, max_new_tokens, temperature)
        texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        got, bad = rewards_lib.score(reward_fn, texts, chunk, reward_timeout)
        scores += [s if done or score_truncated else 0.0 for s, done in zip(got, out.finished)]
        lengths += [len(r) for r in out.response_ids]
        problems += bad
    return {"eval_pass@1": sum(scores) / len(scores), "eval_response_len": sum(lengths) / len(lengths),
            "eval_prompts": len(rows), "eval_reward_errors": len(problems)}
