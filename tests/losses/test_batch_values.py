"""Value checks of a batch that a shape check cannot see (issue 17): log-probs above 0 are not log-probs."""
import pytest
import torch

import erpo
from erpo.losses.batch import LOGP_SLACK


@pytest.mark.parametrize("key,method", [("old_logp", "dapo"), ("ref_logp", "grpo")])
def test_positive_logprobs_are_refused(make_batch, key, method):
    logits, batch = make_batch()
    batch[key] = batch[key].clone()
    position = batch["mask"].nonzero()[0]
    batch[key][tuple(position)] = 0.5  # a probability passed where a log-prob belongs
    with pytest.raises(ValueError, match=rf"batch\['{key}'\] has a value > 0 on a valid token"):
        erpo.policy_loss(logits, batch, erpo.LossConfig(method=method))


def test_rounding_slack_and_masked_positions_pass(make_batch):
    logits, batch = make_batch()
    batch["old_logp"] = batch["old_logp"].clone()
    valid = batch["mask"].nonzero()
    batch["old_logp"][tuple(valid[0])] = LOGP_SLACK / 2  # an engine's rounding above 0
    invalid = (~batch["mask"]).nonzero()
    if len(invalid):
        batch["old_logp"][tuple(invalid[0])] = 3.0  # padding is never read
    result = erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo"))
    assert torch.isfinite(result.loss)


def test_bool_temperature_is_not_a_number():
    logits, targets = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="temperature must be a Python number, got bool"):
        erpo.logprobs_and_entropy(logits, targets, temperature=True)
    with pytest.raises(TypeError, match="temperature"):
        erpo.LossConfig(temperature=True)
