"""With check_inputs=False, one loss + backward reads nothing back to the host: every objective, importance
level, control and correction, through the logits (policy_loss), the fused head (linear_policy_loss) and
token_policy_loss. The probe (sync_probe.py) works at the dispatcher, so syncs made in C++ are seen; the first
tests show it catches what a Python-level patch missed."""
import pytest
import torch

import erpo
from erpo.losses.controls import high_entropy_mask as controls_lib
from erpo.losses.config import CONTROLS, METHODS, OBJECTIVES
from tests.losses.sync_probe import HostSync, HostSyncProbe


def test_probe_sees_syncs_made_in_cpp():
    x = torch.randn(8)
    for make_sync in (lambda: x.sum().item(), lambda: x[x > 0], lambda: torch.nonzero(x),
                      lambda: x[torch.tensor(3)],  # a 0-d index: the indexing code reads it (the old 80/20 bug)
                      lambda: bool(x.sum() > 0)):
        with pytest.raises(HostSync):
            with HostSyncProbe():
                make_sync()


def test_probe_sees_the_old_quantile_and_not_the_new():
    entropy, valid = torch.rand(20), torch.rand(20) > 0.3
    ordered = torch.sort(torch.where(valid, entropy, torch.full_like(entropy, float("inf")))).values
    low = (0.8 * (valid.sum() - 1)).floor().long()
    with pytest.raises(HostSync):
        with HostSyncProbe():
            ordered[low]  # what entropy_quantile used to do
    with HostSyncProbe():
        got = controls_lib.entropy_quantile(entropy, valid, 0.8)
    torch.testing.assert_close(got, torch.quantile(entropy[valid], 0.8))


def test_probe_descends_into_erpo_custom_ops(make_batch, monkeypatch):
    """A sync inside the fused op's own body is caught, not hidden behind the custom op."""
    from erpo.ops import torch_logprobs_entropy as torch_backend

    logits, batch = make_batch(B=2, L=3, V=7)
    real = torch_backend.forward

    def syncing_forward(*args, **kwargs):
        args[1].sum().item()  # the targets
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "forward", syncing_forward)
    probe = HostSyncProbe()
    with pytest.raises(HostSync):
        with probe:
            erpo.logprobs_and_entropy(logits.float(), batch["targets"], check_targets=False)
    assert probe.seen_erpo_ops == ["logprobs_entropy_fwd"]


def _composed_configs():
    configs = [dict(method=m) for m in METHODS]
    configs += [dict(method="dapo", objective=o) for o in OBJECTIVES if o not in ("clip",)]
    shaping = [c for c in CONTROLS if c != "adapo"]
    configs += [dict(method="dapo", objective=o, controls=tuple(c for c in shaping if not (o == "gmpo" or
                     (o != "clip" and c == "archer")) and c not in ("repo_r", "kl_cov")))
                for o in ("clip", "cispo", "sapo", "vespo", "gpg")]
    configs += [dict(method="dapo", controls=("repo_r", "kl_cov", "archer")), dict(method="gspo", controls=("erpo",))]
    return configs


CORRECTIONS = dict(rollout_is="sequence_mask", rollout_is_min=0.5, rollout_is_max=2.0, off_policy_mask=0.05,
                   kl_coef=0.01, entropy_coef=0.01)


@pytest.mark.parametrize("knobs", _composed_configs(), ids=lambda k: "-".join(str(v) for v in k.values()))
def test_no_host_sync_on_the_hot_path(knobs, make_batch):
    logits, batch = make_batch(B=6, L=6, V=11, group_size=3, empty_rows=(2,))
    batch["rollout_logp"] = (batch["old_logp"] + 0.1 * torch.randn_like(batch["old_logp"])).clamp(max=0)
    batch["num_items_in_batch"] = torch.tensor(40.0)
    batch["num_seqs_in_batch"] = torch.tensor(6.0)
    extra = {} if knobs.get("objective", erpo.LossConfig(method=knobs["method"]).objective) in ("clip", "plain") \
        else {k: v for k, v in CORRECTIONS.items()}
    extra = {**CORRECTIONS, **extra}
    if knobs.get("objective") == "vespo" or knobs["method"] == "vespo":
        extra["rollout_is"] = "token_truncate"
    config = erpo.LossConfig(check_inputs=False, **knobs, **extra)
    logits = logits.float().requires_grad_()
    with HostSyncProbe():
        result = erpo.policy_loss(logits, batch, config)
        result.loss.backward()
    assert torch.isfinite(result.loss) and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["dapo", "kl_cov", "high_entropy_mask", "gspo"])
def test_no_host_sync_through_the_fused_head_and_token_entry(method, make_batch, monkeypatch):
    from erpo.ops import torch_linear_logprobs_entropy as torch_head

    monkeypatch.setattr(torch_head, "COMPACT_IGNORED", False)  # the CUDA path: CPU compacts ignored rows (nonzero)
    _, batch = make_batch(B=4, L=5, V=13, group_size=2, rewards=False)  # random advantages: never all 0
    hidden = torch.randn(4, 5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    with torch.no_grad():  # old log-probs near this head's own, so not every ratio is clipped (no gradient at all)
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, batch["targets"][..., None])[..., 0]
        batch["old_logp"] = (logp + 0.1 * torch.randn_like(logp)).clamp(max=0.0)
    wide = dict(eps_low=0.2, eps_high=0.28) if method == "gspo" else {}  # GSPO's 3e-4 can clip every response
    config = erpo.LossConfig(method=method, check_inputs=False, **wide)
    with HostSyncProbe() as probe:
        erpo.linear_policy_loss(hidden, weight, batch, config).loss.backward()
    assert probe.seen_erpo_ops and hidden.grad.abs().sum() > 0
    logp = (batch["old_logp"] + 0.1 * torch.randn(4, 5)).clamp(max=0).requires_grad_()  # ratios near 1
    entropy = torch.rand(4, 5).requires_grad_()
    with HostSyncProbe():
        erpo.token_policy_loss(logp, entropy, batch, config).loss.backward()
    assert logp.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["dapo", "erpo", "clip_cov"])
def test_input_checks_cost_exactly_one_host_sync(method, make_batch):
    logits, batch = make_batch(B=4, L=5, V=9, group_size=2)
    logits = logits.float().requires_grad_()
    syncs = []

    class Counting(HostSyncProbe):
        def on_sync(self, what):
            syncs.append(what)

    with Counting():
        erpo.policy_loss(logits, batch, erpo.LossConfig(method=method)).loss.backward()
    assert syncs == ["Tensor.tolist"]
