"""erpo.linear_policy_loss (the policy losses from hidden states + LM head) against erpo.policy_loss on the
materialized logits, for every method and both schedules.

The reference materializes `hidden @ weight.T + bias` in float64 from the same fp32 inputs, so the
differences are the fused head's fp32 accumulation: loss and metrics within 1e-5 relative, gradients within
1e-4 relative to their largest entry.
"""
import dataclasses
import importlib
import importlib.util

import pytest
import torch

import erpo
from erpo.losses.config import METHODS
from erpo.ops import torch_linear_logprobs_entropy as torch_head
from tests.losses.conftest import random_batch

lpl = importlib.import_module("erpo.losses.linear_policy_loss")  # the module (the package attribute is the function)

KNOBS = {
    "erpo": dict(gate="amplify"), "dapo": dict(entropy_coef=0.02), "high_entropy_mask": dict(rho=0.5),
    "clip_cov": dict(clip_cov_lb=-1.0, clip_cov_ub=1.0, clip_cov_ratio=0.1), "kl_cov": dict(kl_cov_ratio=0.1),
    # GSPO's paper eps (3e-4) puts most sequence ratios within fp32 rounding of a clip edge, where fp32 (fused head)
    # and fp64 (the logits reference) may decide a whole response's clip differently; a wider range tests the same code.
    "gspo": dict(eps_low=0.2, eps_high=0.28), "luspo": dict(eps_low=0.2, eps_high=0.28),
}
# Row-local configs the one-pass schedule must reproduce exactly (methods x the per-token knobs they take).
ONE_PASS_CONFIGS = [
    dict(method="grpo"), dict(method="grpo", kl_estimator="k1", temperature=0.7),
    dict(method="grpo", kl_estimator="k2", dual_clip=True), dict(method="dapo"),
    dict(method="dapo", entropy_coef=0.05, agg="seq-mean-token-sum"), dict(method="dr_grpo"),
    dict(method="adapo", eps_high=0.4), dict(method="bnpo"), dict(method="cispo", cispo_max=1.1),
    dict(method="cispo", cispo_clip="two_sided"), dict(method="sapo"), dict(method="gpg"),
    dict(method="dapo", delta=1.5), dict(method="grpo", kl_bias_correction=True),
]
NOT_ROW_LOCAL = ("erpo", "high_entropy_mask", "clip_cov", "kl_cov", "repo", "repo_r", "gspo", "gmpo", "vespo", "luspo")
B, L, H, V = 6, 7, 9, 23


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(torch_head, "ROWS", 5)  # chunks cross sequence boundaries and end mid-batch


def rel_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def loss_err(actual, expected):
    """A loss is a sum of O(1) per-token terms that may cancel to a small value: its error is relative to that
    scale (0.05), not to the cancelled sum."""
    return (actual.double() - expected.double()).abs().item() / max(expected.abs().item(), 0.05)


def make_inputs(dtype=torch.float32, empty_rows=(1,), **batch_kwargs):
    _, batch = random_batch(B=B, L=L, V=V, empty_rows=empty_rows, **batch_kwargs)
    hidden = torch.randn(B, L, H).to(dtype)
    weight = (torch.randn(V, H) * 0.6).to(dtype)
    bias = torch.randn(V).to(dtype)
    return hidden, weight, bias, batch


def on_logits(hidden, weight, bias, batch, config, double=True):
    leaves = [t.detach().clone().to(torch.float64 if double else t.dtype).requires_grad_() for t in (hidden, weight, bias)]
    result = erpo.policy_loss(leaves[0] @ leaves[1].T + leaves[2], batch, config)
    result.loss.backward()
    return result, [t.grad for t in leaves]


def on_hidden(hidden, weight, bias, batch, config, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    result = erpo.linear_policy_loss(leaves[0], leaves[1], batch, config, bias=leaves[2], **kwargs)
    result.loss.backward()
    return result, [t.grad for t in leaves]


def assert_same(got, want, loss_rtol=1e-5, grad_rtol=1e-4):
    (result, grads), (ref, ref_grads) = got, want
    assert loss_err(result.loss, ref.loss) < loss_rtol
    for got_grad, want_grad in zip(grads, ref_grads):
        assert got_grad.abs().sum() > 0
        assert rel_err(got_grad, want_grad) < grad_rtol
    assert set(result.metrics) == set(ref.metrics)
    for name, value in ref.metrics.items():
        scale = max(value.double().abs().item(), 1e-3)
        assert abs(result.metrics[name].double().item() - value.double().item()) / scale < loss_rtol * 10, name


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_policy_loss_on_the_logits(method):
    # Random advantages, never a batch whose groups all have equal rewards (all-zero gradient).
    hidden, weight, bias, batch = make_inputs(rewards=False)
    config = erpo.LossConfig(method=method, backend="torch", **KNOBS.get(method, {}))
    if config.is_level == "sequence":  # old log-probs near this head's own, so some sequence ratios fall inside the clip
        logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, batch["targets"].clamp_min(0)[..., None])[..., 0]
        batch["old_logp"] = (logp + 0.1 * torch.randn_like(logp)).clamp(max=0.0)
    want = on_logits(hidden, weight, bias, batch, config)
    assert_same(on_hidden(hidden, weight, bias, batch, config, schedule="two_pass"), want)
    assert_same(on_hidden(hidden, weight, bias, batch, config), want)  # auto


@pytest.mark.parametrize("knobs", ONE_PASS_CONFIGS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_one_pass_equals_two_pass_for_every_row_local_config(knobs):
    hidden, weight, bias, batch = make_inputs(rewards=False)  # random advantages: never a batch of all-equal rewards
    config = erpo.LossConfig(backend="torch", **knobs)
    assert lpl.one_pass_exact(config)
    two = on_hidden(hidden, weight, bias, batch, config, schedule="two_pass")
    one = on_hidden(hidden, weight, bias, batch, config, schedule="one_pass")
    assert_same(one, two, loss_rtol=1e-6, grad_rtol=1e-5)
    assert_same(one, on_logits(hidden, weight, bias, batch, config))


def test_auto_takes_the_one_pass_only_for_row_local_methods_with_gradients(monkeypatch):
    calls = []
    real = lpl._one_pass
    monkeypatch.setattr(lpl, "_one_pass", lambda *args: calls.append(args[4].method) or real(*args))
    hidden, weight, bias, batch = make_inputs()
    for method in ("dapo", "kl_cov"):
        on_hidden(hidden, weight, bias, batch, erpo.LossConfig(method=method, **KNOBS.get(method, {})))
    with torch.no_grad():
        erpo.linear_policy_loss(hidden, weight, batch, erpo.LossConfig(method="grpo"), bias=bias)
    assert calls == ["dapo"]


@pytest.mark.parametrize("method", NOT_ROW_LOCAL)
def test_the_predicate_rejects_batch_wide_methods(method):
    config = erpo.LossConfig(method=method, **KNOBS.get(method, {}))
    assert not lpl.one_pass_exact(config)
    hidden, weight, bias, batch = make_inputs()
    with pytest.raises(ValueError, match="one_pass"):
        erpo.linear_policy_loss(hidden, weight, batch, config, bias=bias, schedule="one_pass")


def test_the_predicate_rejects_fields_and_batch_keys_it_does_not_know():
    @dataclasses.dataclass
    class LaterConfig(erpo.LossConfig):  # a LossConfig that gained a knob after the one-pass was written
        objective: str = "clip"

    assert lpl.one_pass_exact(LaterConfig(method="dapo"))
    assert not lpl.one_pass_exact(LaterConfig(method="dapo", objective="cispo"))
    marked = erpo.LossConfig(method="dapo")
    object.__setattr__(marked, "row_local", False)  # the config's own verdict wins
    assert not lpl.one_pass_exact(marked)
    assert not lpl.one_pass_exact(erpo.LossConfig(method="dapo"), {"rollout_logp": torch.zeros(2)})


def test_packed_layout_and_strided_hidden():
    hidden, weight, bias, batch = make_inputs(rewards=False)
    config = erpo.LossConfig(method="grpo")
    states = torch.randn(B, L + 1, H)
    states[:, :-1] = hidden
    view = states[:, :-1]
    assert not view.is_contiguous()
    for schedule in ("one_pass", "two_pass"):
        got = on_hidden(view, weight, bias, batch, config, schedule=schedule)
        assert_same(got, on_logits(hidden, weight, bias, batch, config))
    packed = {k: (v.reshape(-1) if v.dim() == 2 else v) for k, v in batch.items()}
    packed["seq_ids"] = torch.arange(B).repeat_interleave(L)
    flat_hidden = hidden.reshape(B * L, H)
    config = erpo.LossConfig(method="kl_cov", kl_cov_ratio=0.1)
    assert_same(on_hidden(flat_hidden, weight, bias, packed, config), on_logits(flat_hidden, weight, bias, packed, config))


def test_bf16_head_matches_policy_loss_on_its_bf16_logits():
    hidden, weight, bias, batch = make_inputs(dtype=torch.bfloat16)
    hidden = hidden * 4  # logits of magnitude ~20
    for method in ("dapo", "kl_cov"):
        config = erpo.LossConfig(method=method, **KNOBS.get(method, {}))
        got_result, got_grads = on_hidden(hidden, weight, bias, batch, config)
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        logits = (leaves[0] @ leaves[1].T).float() + leaves[2].float()  # the fused head's own rounding
        want = erpo.policy_loss(logits, batch, config)
        want.loss.backward()
        assert rel_err(got_result.loss, want.loss) < 1e-5
        for got, leaf in zip(got_grads, leaves):
            assert got.dtype == torch.bfloat16 and rel_err(got, leaf.grad) < 2 ** -5


def test_policy_loss_module_linear_entry_matches_forward():
    hidden, weight, bias, batch = make_inputs()
    module = erpo.PolicyLoss(erpo.LossConfig(method="clip_cov", **KNOBS["clip_cov"]))
    twin = erpo.PolicyLoss(erpo.LossConfig(method="clip_cov", **KNOBS["clip_cov"]))
    for _ in range(2):  # the module's generator advances the same way on both entries
        got = module.linear(hidden, weight, batch, bias=bias)
        want = twin(hidden.double() @ weight.double().T + bias.double(), batch)
        assert rel_err(got.loss, want.loss) < 1e-5
        assert got.metrics["masked_frac"] == want.metrics["masked_frac"].float()


def test_one_pass_refuses_a_second_backward():
    hidden, weight, bias, batch = make_inputs()
    hidden.requires_grad_()
    result = erpo.linear_policy_loss(hidden, weight, batch, erpo.LossConfig(method="dapo"), schedule="one_pass")
    result.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        result.loss.backward()


@pytest.mark.parametrize("case,message", [
    ("hidden_1d", "hidden must be"), ("h_mismatch", "the head's H"), ("cuda_backend", "no fused-head kernel"),
    ("schedule", "schedule must be"), ("targets", "batch\\['targets'\\]"), ("bias", "bias must be"),
    ("transposed", "the head's H = .*is it transposed"),
])
def test_errors(case, message):
    hidden, weight, bias, batch = make_inputs()
    config, kwargs = erpo.LossConfig(method="grpo"), {}
    if case == "hidden_1d":
        hidden = hidden[0, 0]
    elif case == "h_mismatch":
        weight = weight[:, :-1]
    elif case == "transposed":  # [H, V] with ids >= H: named as the shape, not as out-of-range targets
        weight = weight.T.contiguous()
        assert int(batch["targets"].max()) >= weight.shape[0]
    elif case == "cuda_backend":
        config = erpo.LossConfig(method="grpo", backend="cuda")
    elif case == "schedule":
        kwargs["schedule"] = "three_pass"
    elif case == "targets":
        batch["targets"] = batch["targets"][:, :-1]
    elif case == "bias":
        bias = bias[:-2]
    with pytest.raises((ValueError, TypeError), match=message):
        erpo.linear_policy_loss(hidden, weight, batch, config, bias=bias, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("erpo.kernels.linear_logprobs_entropy") is None,
                    reason="kernels/linear_logprobs_entropy.py (helper headkernel's module) is not merged yet")
@pytest.mark.parametrize("method", ["dapo", "kl_cov"])
def test_triton_head_backend_equals_the_torch_one(method):
    hidden, weight, bias, batch = make_inputs()
    config = erpo.LossConfig(method=method, **KNOBS.get(method, {}))
    want = on_hidden(hidden, weight, bias, batch, config, head_backend="torch", schedule="two_pass")
    assert_same(on_hidden(hidden, weight, bias, batch, config, head_backend="triton"), want)


SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.mark.parametrize("schedule", ["one_pass", "two_pass"])
def test_no_host_sync_on_the_cuda_path(schedule, monkeypatch):
    # On CPU the torch backend compacts ignored rows (nonzero: free without a device); on CUDA it zeroes them
    # instead. Forcing that path here, every Tensor method that would sync on a GPU must stay unused.
    monkeypatch.setattr(torch_head, "COMPACT_IGNORED", False)
    hidden, weight, bias, batch = make_inputs()
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    config = erpo.LossConfig(method="dapo", check_inputs=False, kl_coef=0.01, entropy_coef=0.01)

    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called on the hot path")
        return raise_

    with monkeypatch.context() as patch:
        for name in SYNCING:
            patch.setattr(torch.Tensor, name, forbidden(name))
        result = erpo.linear_policy_loss(leaves[0], leaves[1], batch, config, bias=leaves[2], schedule=schedule)
        result.loss.backward()
    assert torch.isfinite(result.loss) and all(t.grad.abs().sum() > 0 for t in leaves)
    assert_same((result, [t.grad for t in leaves]), on_logits(hidden, weight, bias, batch, config))


def test_the_documented_one_pass_presets_are_the_row_local_ones():
    from pathlib import Path

    from erpo.losses.config import METHODS

    row_local = [m for m in METHODS if erpo.LossConfig(method=m).row_local]
    assert row_local == ["grpo", "dapo", "dr_grpo", "adapo", "bnpo", "cispo", "sapo", "gpg"]
    names = "GRPO, DAPO, Dr. GRPO, ADAPO, BNPO, CISPO, SAPO, GPG"
    for doc in ("README.md", "docs/fused_head.md"):
        assert names in (Path(__file__).resolve().parents[2] / doc).read_text(), doc
