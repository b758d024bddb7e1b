"""policy_loss end to end: against the naive reference (values, gradients w.r.t. logits), layouts, backends,
dtypes, degenerate batches, metrics, and the errors for bad batches."""
import pytest
import torch

import erpo
from erpo.losses.config import METHODS
from erpo.losses.naive import naive_logprobs_and_entropy, naive_policy_loss
from tests.conftest import DEVICE, KERNEL_BACKENDS

KNOBS = {"erpo": dict(gate="amplify"), "dapo": dict(entropy_coef=0.02), "clip_cov": dict(clip_cov_lb=-1.0, clip_cov_ub=1.0, clip_cov_ratio=0.1),
         # GSPO's 3e-4 clips every response of a random batch (dead gradient): the same code with DAPO's range
         "gspo": dict(eps_low=0.2, eps_high=0.28), "luspo": dict(eps_low=0.2, eps_high=0.28)}


def grad_of(loss_fn, logits, batch, config):
    leaf = logits.detach().clone().requires_grad_()
    result = loss_fn(leaf, batch, config)
    (grad,) = torch.autograd.grad(result.loss, leaf)
    return result, grad


@pytest.mark.parametrize("method", METHODS)
def test_value_and_logit_gradient_match_naive_float64(method, make_batch):
    # Empty row 1; two groups with distinct rewards, one with equal rewards, and a group of size 1.
    logits, batch = make_batch(B=9, L=6, V=13, dtype=torch.float64, empty_rows=(1,))
    batch["group_ids"] = torch.tensor([4, 4, 4, 0, 0, 0, 9, 9, 2])
    batch["rewards"] = torch.cat([torch.randperm(3).float(), torch.rand(3) + 0.1, torch.full((2,), 2.0), torch.rand(1)])
    knobs = dict(KNOBS.get(method, {}), **(dict(rho=0.5) if method == "high_entropy_mask" else {}))
    config = erpo.LossConfig(method=method, backend="torch", **knobs)
    got, g_got = grad_of(erpo.policy_loss, logits, batch, config)
    want, g_want = grad_of(naive_policy_loss, logits, batch, config)
    # float64 both ways: differences are rounding (~1e-16); the fused op sums in a different order.
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-13)
    assert g_got.abs().sum() > 0 and g_got[1].abs().sum() == 0  # empty row: no gradient
    for name in ("entropy", "clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl", "masked_frac", "n_valid_tokens"):
        torch.testing.assert_close(got.metrics[name].double(), want.metrics[name].double(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_kernel_backend_equals_torch_backend(method, backend, make_batch):
    logits, batch = make_batch(B=4, L=5, V=37, group_size=2, dtype=torch.float32, empty_rows=(2,), device=DEVICE)
    knobs = KNOBS.get(method, {})
    torch_result, torch_grad = grad_of(erpo.policy_loss, logits, batch, erpo.LossConfig(method=method, backend="torch", **knobs))
    triton_result, triton_grad = grad_of(erpo.policy_loss, logits, batch, erpo.LossConfig(method=method, backend=backend, **knobs))
    # float32 both; Triton's exp/log and its online softmax differ from torch's in the last bits.
    torch.testing.assert_close(triton_result.loss, torch_result.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(triton_grad, torch_grad, rtol=1e-4, atol=1e-6)
    for name, value in torch_result.metrics.items():
        torch.testing.assert_close(triton_result.metrics[name].double(), value.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["grpo", "erpo", "high_entropy_mask"])
def test_bf16_large_logits_match_naive_on_the_same_values(method, make_batch):
    logits, batch = make_batch(B=4, L=6, V=40, group_size=2, dtype=torch.float64, logit_scale=30.0)
    logits_bf16 = logits.to(torch.bfloat16)
    config = erpo.LossConfig(method=method, backend="torch")
    got, g_got = grad_of(erpo.policy_loss, logits_bf16, batch, config)
    want, g_want = grad_of(naive_policy_loss, logits_bf16.double(), batch, config)
    # The op reads the same bf16 values and computes in float32 (rel. error ~1e-6 on logp and H);
    # the gradient is rounded to bf16 (8 bits of mantissa: 2^-8 relative).
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-4, atol=1e-5)
    assert g_got.dtype == torch.bfloat16
    torch.testing.assert_close(g_got.double(), g_want, rtol=2 ** -7, atol=1e-4 * g_want.abs().max().item())


def test_strided_view_of_model_logits_needs_no_copy_and_matches(make_batch):
    logits, batch = make_batch(B=3, L=5, V=11, group_size=3)
    model_logits = torch.randn(3, 6, 11)
    model_logits[:, :-1] = logits
    config = erpo.LossConfig(method="erpo")
    view = model_logits[:, :-1]
    assert not view.is_contiguous()
    a, ga = grad_of(erpo.policy_loss, view, batch, config)
    b, gb = grad_of(erpo.policy_loss, logits.contiguous(), batch, config)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("method, knobs", [("dapo", {}), ("grpo", {}), ("erpo", {}), ("dr_grpo", dict(max_len=6)),
                                           ("kl_cov", dict(kl_cov_ratio=0.1))])
def test_packed_layout_equals_padded(method, knobs, make_batch):
    logits, batch = make_batch(B=5, L=6, V=9, group_size=2, dtype=torch.float64, empty_rows=(3,))
    config = erpo.LossConfig(method=method, backend="torch", **knobs)
    padded, g_padded = grad_of(erpo.policy_loss, logits, batch, config)
    # Pack the valid tokens of each response back to back, plus some padding tokens at the end.
    mask = batch["mask"]
    index = mask.reshape(-1).nonzero()[:, 0]
    index = torch.cat([index, torch.tensor([1, 2])])  # 2 masked-out pad tokens (mask 0)
    seq_ids = torch.cat([torch.arange(5).repeat_interleave(6)[index[:-2]], torch.tensor([4, 4])])
    packed_batch = {
        "targets": batch["targets"].reshape(-1)[index], "mask": torch.cat([torch.ones(len(index) - 2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)]),
        "old_logp": batch["old_logp"].reshape(-1)[index], "ref_logp": batch["ref_logp"].reshape(-1)[index],
        "seq_ids": seq_ids, "rewards": batch["rewards"], "group_ids": batch["group_ids"],
    }
    packed_logits = logits.reshape(-1, 9)[index]
    packed, g_packed = grad_of(erpo.policy_loss, packed_logits, packed_batch, config)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_packed[:-2], g_padded.reshape(-1, 9)[index[:-2]], rtol=1e-10, atol=1e-14)


def test_temperature_reaches_the_fused_op(make_batch):
    logits, batch = make_batch(B=4, L=3, V=8, group_size=2, dtype=torch.float64)
    config = erpo.LossConfig(method="dapo", temperature=0.6, entropy_coef=0.1)
    got, g_got = grad_of(erpo.policy_loss, logits, batch, config)
    want, g_want = grad_of(naive_policy_loss, logits, batch, config)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-13)
    assert got.loss.item() != pytest.approx(erpo.policy_loss(logits, batch, config.replace(temperature=1.0)).loss.item())


def test_naive_logprobs_and_entropy_matches_fused_op():
    logits = torch.randn(3, 4, 50, dtype=torch.float64) * 5
    targets = torch.randint(0, 50, (3, 4))
    for t in (1.0, 0.7):
        want = naive_logprobs_and_entropy(logits, targets, t)
        got = erpo.logprobs_and_entropy(logits, targets, temperature=t)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_equal_rewards_everywhere_give_zero_pg_loss_and_are_reported(make_batch):
    logits, batch = make_batch(B=4, L=4, V=6, group_size=2)
    batch["rewards"] = torch.ones(4)
    result = erpo.policy_loss(logits.requires_grad_(), batch, erpo.LossConfig(method="dapo"))
    assert result.loss.item() == 0.0
    assert result.metrics["degenerate_groups"].item() == 2 and result.metrics["degenerate_frac"].item() == 1.0
    result.loss.backward()
    assert logits.grad.abs().sum() == 0


def test_metrics_are_detached_zero_dim_tensors(make_batch):
    logits, batch = make_batch()
    logits.requires_grad_()
    result = erpo.policy_loss(logits, batch, erpo.LossConfig(method="erpo"))
    for name in ("entropy", "cdp_rate", "clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl", "masked_frac",
                 "n_valid_tokens"):
        value = result.metrics[name]
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert result.loss.dim() == 0 and result.loss.requires_grad
    result = erpo.policy_loss(logits, batch, erpo.LossConfig(method="grpo"))
    assert "kl_ref" in result.metrics and result.metrics["kl_ref"].item() >= 0
    assert result.metrics["n_valid_tokens"].item() == batch["mask"].sum().item()


def test_entropy_gradient_only_with_an_entropy_term(make_batch, monkeypatch):
    from erpo.ops import logprobs_entropy as op

    seen = []
    real = op.LogprobsEntropyFunction.backward

    def spy(ctx, grad_logp, grad_entropy):
        seen.append(grad_entropy is not None)
        return real(ctx, grad_logp, grad_entropy)

    monkeypatch.setattr(op.LogprobsEntropyFunction, "backward", staticmethod(spy))
    logits, batch = make_batch()
    for method, knobs, expect in (("repo", {}, False), ("erpo", {}, False), ("dapo", dict(entropy_coef=0.01), True)):
        leaf = logits.clone().requires_grad_()
        erpo.policy_loss(leaf, batch, erpo.LossConfig(method=method, **knobs)).loss.backward()
        assert seen[-1] is expect, method


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["dapo", "grpo", "kl_cov"])
def test_nonfinite_logits_give_a_nonfinite_loss(make_batch, backend, method):
    logits, batch = make_batch(device=DEVICE)
    logits[0, 0, 3] = float("nan")
    result = erpo.policy_loss(logits, batch, erpo.LossConfig(method=method, backend=backend))
    assert not torch.isfinite(result.loss) and result.metrics["nonfinite_tokens"].item() >= 1


def test_module_and_functional_agree_and_controller_state_roundtrips(make_batch):
    logits, batch = make_batch()
    module = erpo.PolicyLoss(erpo.LossConfig(method="repo_r", target_entropy=100.0))
    first = module(logits, batch)
    torch.testing.assert_close(first.loss, erpo.policy_loss(logits, batch, module.config).loss)
    module.step_controller(first)  # entropy below the target: zeta doubles
    assert module.current_config().zeta == pytest.approx(2e-3)
    state = module.state_dict()
    fresh = erpo.PolicyLoss(method="repo_r", target_entropy=100.0)
    fresh.load_state_dict(state)
    assert fresh.current_config().zeta == pytest.approx(2e-3)
    torch.testing.assert_close(fresh(logits, batch).loss, module(logits, batch).loss)


def test_module_clip_cov_generator_state_roundtrips(make_batch):
    logits, batch = make_batch(B=6, L=8, rewards=False, adv_scale=3.0)
    config = erpo.LossConfig(method="clip_cov", clip_cov_lb=-1.0, clip_cov_ub=1.0, clip_cov_ratio=0.1)
    module = erpo.PolicyLoss(config)
    module(logits, batch)
    state = module.state_dict()
    following = module(logits, batch).loss
    restored = erpo.PolicyLoss(config)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(logits, batch).loss, following)


# ---------------------------------------------------------------- bad batches


def bad(make_batch, **changes):
    logits, batch = make_batch(B=4, L=5, V=7, group_size=2)
    for key, value in changes.items():
        if value is None:
            batch.pop(key, None)
        else:
            batch[key] = value(batch) if callable(value) else value
    return logits, batch


@pytest.mark.parametrize("changes, method, error, match", [
    (dict(targets=None), "dapo", ValueError, "missing 'targets'"),
    (dict(mask=lambda b: b["mask"][:, :-1]), "dapo", ValueError, "mask"),
    (dict(old_logp=lambda b: b["old_logp"].T), "dapo", ValueError, "old_logp"),
    (dict(targets=lambda b: b["targets"].float()), "dapo", TypeError, "targets"),
    (dict(old_logp=lambda b: b["old_logp"].long()), "dapo", TypeError, "old_logp"),
    (dict(rewards=lambda b: b["rewards"][:3]), "dapo", ValueError, "rewards"),
    (dict(rewards=None), "dapo", ValueError, "advantages"),
    (dict(group_ids=None), "dapo", ValueError, "group_ids"),
    (dict(advantages=lambda b: torch.zeros(4)), "dapo", ValueError, "both"),
    (dict(rewards=None, group_ids=None, advantages=lambda b: torch.zeros(4)), "erpo", ValueError, "group_ids"),
    (dict(ref_logp=None), "grpo", ValueError, "kl_coef"),
    (dict(ref_logp=None), "erpo", ValueError, "eta"),
    (dict(rewards=lambda b: torch.tensor([1.0, float("nan"), 0.0, 1.0])), "dapo", ValueError, "rewards"),
    (dict(rewards=None, advantages=lambda b: torch.tensor([1.0, float("inf"), 0.0, 1.0])), "dapo", ValueError, "advantages"),
    (dict(mask=lambda b: torch.full((4, 5), 2)), "dapo", ValueError, "0 and 1"),
    (dict(targets=lambda b: torch.full((4, 5), -100)), "dapo", ValueError, "mismatch"),
    (dict(targets=lambda b: torch.full((4, 5), 7)), "dapo", ValueError, "outside"),
    (dict(old_logp=lambda b: torch.full((4, 5), float("nan"))), "dapo", ValueError, "old_logp"),
    (dict(ref_logp=lambda b: torch.full((4, 5), float("nan"))), "grpo", ValueError, "ref_logp"),
    (dict(seq_ids=lambda b: torch.zeros(4, 5, dtype=torch.long)), "dapo", ValueError, "seq_ids"),
    (dict(extra=lambda b: torch.zeros(1)), "dapo", ValueError, "unknown keys"),
])
def test_bad_batches_raise_clear_errors(make_batch, changes, method, error, match):
    logits, batch = bad(make_batch, **changes)
    with pytest.raises(error, match=match):
        erpo.policy_loss(logits, batch, erpo.LossConfig(method=method))


def test_bad_logits_and_config_types(make_batch):
    logits, batch = make_batch()
    with pytest.raises(ValueError, match="logits"):
        erpo.policy_loss(logits[0, 0], batch, erpo.LossConfig())
    with pytest.raises(TypeError, match="LossConfig"):
        erpo.policy_loss(logits, batch, {"method": "dapo"})
    with pytest.raises(TypeError, match="batch"):
        erpo.policy_loss(logits, [batch], erpo.LossConfig())


def test_packed_batch_errors(make_batch):
    logits, batch = make_batch(B=2, L=3, V=5, group_size=2)
    flat = {k: (v.reshape(-1) if v.dim() == 2 else v) for k, v in batch.items()}
    with pytest.raises(ValueError, match="seq_ids"):
        erpo.policy_loss(logits.reshape(-1, 5), flat, erpo.LossConfig(method="dapo"))
    flat["seq_ids"] = torch.tensor([1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="nondecreasing"):
        erpo.policy_loss(logits.reshape(-1, 5), flat, erpo.LossConfig(method="dapo"))
    flat["seq_ids"] = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="outside"):
        erpo.policy_loss(logits.reshape(-1, 5), flat, erpo.LossConfig(method="dapo"))
    flat["seq_ids"] = torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="max_len"):
        erpo.policy_loss(logits.reshape(-1, 5), flat, erpo.LossConfig(method="dr_grpo"))


def test_inplace_grad_knob_gives_the_same_gradient(make_batch):
    logits, batch = make_batch()
    weight = torch.tensor(1.5, requires_grad=True)
    grads = []
    for inplace in (False, True):
        weight.grad = None
        scaled = logits * weight  # a non-leaf, as model logits are
        erpo.policy_loss(scaled, batch, erpo.LossConfig(method="dapo", inplace_grad=inplace)).loss.backward()
        grads.append(weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
