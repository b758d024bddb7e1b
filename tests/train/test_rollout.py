import importlib.util

import pytest
import torch

from erpo.train import rollout, tiny_task
from erpo.train.trainer import fixed_logprobs


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_task.build_tokenizer()
    model = tiny_task.build_model(tok)
    tiny_task.warm_up(model, tok, steps=10, seed=0)
    return model, tok


def test_hf_rollout_interface(tiny):
    model, tok = tiny
    engine = rollout.HFRollout(model, tok)
    prompts = [tok("3+4=")["input_ids"], tok("12")["input_ids"]]  # different lengths: left padding
    out = engine.generate(prompts, n=3, max_new_tokens=4, temperature=1.0)
    assert len(out.response_ids) == 6 and out.prompt_ids[:3] == [prompts[0]] * 3 and out.prompt_ids[3] == prompts[1]
    for tokens, done in zip(out.response_ids, out.finished):
        assert 1 <= len(tokens) <= 4
        assert done == (tokens[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in tokens[:-1]  # cut at the first EOS
    greedy = [engine.generate(prompts, n=2, max_new_tokens=4, temperature=0.0).response_ids for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0][0] == greedy[0][1]


def test_pack_layout_and_positions():
    out = rollout.Rollouts(prompt_ids=[[1, 5, 6], [1, 7]], response_ids=[[8, 2], [9, 9, 9]], finished=[True, False])
    batch = rollout.pack(out, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 5, 6, 8, 2, 0], [0, 1, 7, 9, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 1, 2, 3, 4]]
    assert batch["targets"].tolist() == [[8, 2, 0], [9, 9, 9]]
    assert batch["mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_training_forward_scores_what_generate_sampled(tiny):
    """The log-probs the loss sees (packed batch, explicit positions, last R+1 logits) equal the ones
    `generate` sampled from, at the same temperature: packing and positions are consistent."""
    model, tok = tiny
    prompts = [tok(p)["input_ids"] for p in ("3+4=", "12+9=", "7")]
    temperature = 0.7
    torch.manual_seed(0)
    engine = rollout.HFRollout(model, tok)
    out = engine.generate(prompts, n=4, max_new_tokens=5, temperature=temperature)
    batch = rollout.pack(out, tok.pad_token_id, "cpu")
    logp = fixed_logprobs(model, batch, chunk=5, temperature=temperature, autocast=False)
    # Reference: full forward of each sample alone (no padding at all), log-softmax of logits / T.
    for i, (prompt, response) in enumerate(zip(out.prompt_ids, out.response_ids)):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        # float32 forward of a different batch layout vs float64 log-softmax: agree to ~1e-5 relative
        torch.testing.assert_close(logp[i, : len(response)].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_missing_is_a_clear_error(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="needs vLLM, which is not installed"):
        rollout.VLLMRollout("/nonexistent", tok, seed=0)
