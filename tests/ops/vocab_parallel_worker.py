"""One rank of the vocabulary-parallel tests (tests/ops/test_vocab_parallel.py spawns it on gloo).

Every rank draws the same full inputs (same seed), computes the single-process result on the whole vocabulary
itself, and the sharded result on its own slice; it records per case the worst relative error of the values
and of every gradient (its slice of the logits/weight/bias gradient, the whole hidden gradient), or the error
message for the error cases. The parent asserts on the records of every rank.
"""
import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

import erpo
from erpo.losses.config import METHODS
from tests.losses.conftest import random_batch

V = 37
SHARDS = {1: [37], 2: [15, 22], 3: [5, 20, 12]}  # uneven on purpose
KNOBS = {
    "erpo": dict(gate="amplify"), "dapo": dict(entropy_coef=0.02), "high_entropy_mask": dict(rho=0.5),
    "clip_cov": dict(clip_cov_lb=-1.0, clip_cov_ub=1.0, clip_cov_ratio=0.1), "kl_cov": dict(kl_cov_ratio=0.1),
    # the GSPO paper's 3e-4 clips every response of a random batch (a dead gradient): the same code, a wider range
    "gspo": dict(eps_low=0.5, eps_high=2.0), "luspo": dict(eps_low=0.5, eps_high=2.0),
    "gmpo": dict(eps_low=0.9, eps_high=2.0),
}


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


class Rank:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        sizes = SHARDS[world]
        self.start = sum(sizes[:rank])
        self.stop = self.start + sizes[rank]
        self.group = dist.group.WORLD

    def shard(self, full):
        return full[..., self.start:self.stop] if full.dim() != 2 or full.shape[0] != V else full[self.start:self.stop]


def case_logits(r: Rank, dtype, backend, temperature, inplace_grad=False):
    torch.manual_seed(1)
    logits = (torch.randn(3, 5, V, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(0, V, (3, 5))
    targets[0, 1] = targets[2, 4] = -100  # ignored rows
    targets[1, 0], targets[1, 1] = 0, V - 1  # the first and last ids (first and last shard)
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)

    def run(x, group):
        x = x.detach().clone().requires_grad_()
        y = x * 1.0 if inplace_grad else x  # in-place gradients need a non-leaf
        logp, entropy = erpo.logprobs_and_entropy(y, targets, temperature=temperature, backend=backend,
                                                  process_group=group, inplace_grad=inplace_grad)
        ((logp.double() * a).sum() + (entropy.double() * b).sum()).backward()
        return logp, entropy, x.grad

    want = run(logits, None)
    got = run(r.shard(logits), r.group)
    with torch.no_grad():  # the inference path (no autograd node) gives the same values
        nograd = erpo.logprobs_and_entropy(r.shard(logits), targets, temperature=temperature, backend=backend,
                                           process_group=r.group)
    return {"logp": rel_err(got[0], want[0]), "entropy": rel_err(got[1], want[1]),
            "grad_logits": rel_err(got[2], r.shard(want[2])), "nograd_logp": rel_err(nograd[0], want[0]),
            "nograd_entropy": rel_err(nograd[1], want[1]),
            "grad_nonzero": float(got[2].abs().sum() > 0)}


def case_linear(r: Rank, backend, temperature):
    torch.manual_seed(2)
    hidden = torch.randn(11, 8)
    weight = torch.randn(V, 8) * 0.6
    bias = torch.randn(V)
    targets = torch.randint(0, V, (11,))
    targets[3] = -100
    a, b = torch.randn(11), torch.randn(11)

    def run(h, w, bb, group):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, bb)]
        logp, entropy = erpo.linear_logprobs_and_entropy(leaves[0], leaves[1], targets, leaves[2],
                                                         temperature=temperature, backend=backend,
                                                         process_group=group)
        ((logp * a).sum() + (entropy * b).sum()).backward()
        return logp, entropy, [t.grad for t in leaves]

    want = run(hidden, weight, bias, None)
    got = run(hidden, weight[r.start:r.stop], bias[r.start:r.stop], r.group)
    return {"logp": rel_err(got[0], want[0]), "entropy": rel_err(got[1], want[1]),
            "grad_hidden": rel_err(got[2][0], want[2][0]),
            "grad_weight": rel_err(got[2][1], want[2][1][r.start:r.stop]),
            "grad_bias": rel_err(got[2][2], want[2][2][r.start:r.stop])}


def _loss_errors(got, want, slices) -> dict:
    (result, grads), (ref, ref_grads) = got, want
    out = {"loss": rel_err(result.loss, ref.loss)}
    for name, g, w, cut in zip(("grad_hidden", "grad_weight", "grad_bias", "grad_logits"), grads, ref_grads, slices):
        out[name] = rel_err(g, cut(w))
        out[name + "_nonzero"] = float(g.abs().sum() > 0)
    out["metrics"] = max(abs(result.metrics[k].double().item() - v.double().item()) / max(abs(v.double().item()), 1e-3)
                         for k, v in ref.metrics.items())
    out["same_metric_names"] = float(set(result.metrics) == set(ref.metrics))
    return out


def case_policy_loss(r: Rank, method):
    torch.manual_seed(4)
    logits, batch = random_batch(B=6, L=7, V=V, rewards=False, empty_rows=(1,), dtype=torch.float64)
    config = erpo.LossConfig(method=method, backend="torch", temperature=0.8, **KNOBS.get(method, {}))

    def run(x, group):
        x = x.detach().clone().requires_grad_()
        result = erpo.policy_loss(x, batch, config, process_group=group)
        result.loss.backward()
        return result, [x.grad]

    want = run(logits, None)
    got = run(r.shard(logits), r.group)
    (result, grads), (ref, ref_grads) = got, want
    out = {"loss": rel_err(result.loss, ref.loss), "grad_logits": rel_err(grads[0], r.shard(ref_grads[0])),
           "grad_nonzero": float(grads[0].abs().sum() > 0)}
    out["metrics"] = max(abs(result.metrics[k].double().item() - v.double().item()) / max(abs(v.double().item()), 1e-3)
                         for k, v in ref.metrics.items())
    return out


def case_linear_policy_loss(r: Rank, method, head_backend="torch"):
    torch.manual_seed(3)
    _, batch = random_batch(B=6, L=7, V=V, rewards=False, empty_rows=(1,))
    hidden = torch.randn(6, 7, 9)
    weight = torch.randn(V, 9) * 0.6
    bias = torch.randn(V)
    config = erpo.LossConfig(method=method, backend="torch", temperature=0.8, **KNOBS.get(method, {}))

    def run(h, w, bb, group):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, bb)]
        result = erpo.linear_policy_loss(leaves[0], leaves[1], batch, config, bias=leaves[2], process_group=group,
                                         head_backend=head_backend)
        result.loss.backward()
        return result, [t.grad for t in leaves]

    want = run(hidden, weight, bias, None)
    got = run(hidden, weight[r.start:r.stop], bias[r.start:r.stop], r.group)
    vocab_cut = lambda w: w[r.start:r.stop]  # noqa: E731
    return _loss_errors(got, want, (lambda w: w, vocab_cut, vocab_cut))


def case_errors(r: Rank):
    torch.manual_seed(5)
    logits = torch.randn(4, r.stop - r.start)
    messages = {}
    for name, call in {
        "vocab_size": lambda: erpo.logprobs_and_entropy(logits, torch.zeros(4, dtype=torch.long),
                                                        process_group=r.group, vocab_size=V + 1),
        "linear_vocab_size": lambda: erpo.linear_logprobs_and_entropy(
            torch.randn(4, 3), torch.randn(r.stop - r.start, 3), torch.zeros(4, dtype=torch.long),
            process_group=r.group, vocab_size=V - 1),
        "target_range": lambda: erpo.logprobs_and_entropy(logits, torch.tensor([0, 1, V, 2]), process_group=r.group),
        "not_a_group": lambda: erpo.logprobs_and_entropy(logits, torch.zeros(4, dtype=torch.long), process_group=3),
        "one_pass": lambda: erpo.linear_policy_loss(
            torch.randn(2, 3, 4), torch.randn(r.stop - r.start, 4), random_batch(B=2, L=3, V=V, rewards=False)[1],
            erpo.LossConfig(method="grpo", backend="torch"), schedule="one_pass", process_group=r.group),
        "batch_target_range": lambda: erpo.policy_loss(
            torch.randn(2, 3, r.stop - r.start), {**random_batch(B=2, L=3, V=V, rewards=False)[1],
                                                   "targets": torch.full((2, 3), V)},
            erpo.LossConfig(method="grpo", backend="torch"), process_group=r.group),
    }.items():
        try:
            call()
            messages[name] = "no error"
        except (ValueError, TypeError, RuntimeError) as err:
            messages[name] = f"{type(err).__name__}: {err}"
    # check_targets=False and an id outside the whole vocabulary: NaN logp, never a silent value.
    logp, _ = erpo.logprobs_and_entropy(logits, torch.tensor([0, 1, V, 2]), process_group=r.group,
                                        check_targets=False)
    messages["unchecked_out_of_range_logp_is_nan"] = str(bool(torch.isnan(logp[2])) and
                                                         bool(torch.isfinite(logp[[0, 1, 3]]).all()))
    return messages


def case_collectives(r: Rank):
    """How many collectives each pass issues (counted at torch.distributed), after the cached shard-size exchange."""
    counts = {}
    originals = {name: getattr(dist, name) for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce",
                                                         "all_gather", "broadcast", "reduce_scatter_tensor")
                 if hasattr(dist, name)}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    logits = torch.randn(6, r.stop - r.start, requires_grad=True)
    hidden = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(r.stop - r.start, 5, requires_grad=True)
    targets = torch.randint(0, V, (6,))
    erpo.logprobs_and_entropy(logits.detach(), targets, process_group=r.group)  # shard sizes exchanged and cached
    out = {}
    for name in originals:
        setattr(dist, name, counting(name))
    try:
        for key, run in (("logits", lambda: erpo.logprobs_and_entropy(logits, targets, process_group=r.group,
                                                                       check_targets=False)),
                         ("linear", lambda: erpo.linear_logprobs_and_entropy(hidden, weight, targets,
                                                                             process_group=r.group,
                                                                             check_targets=False))):
            counts.clear()
            logp, entropy = run()
            out[f"{key}_forward"] = sum(counts.values())
            counts.clear()
            (logp.sum() + entropy.sum()).backward()
            out[f"{key}_backward"] = sum(counts.values())
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return out


def cases(world: int):
    yield "logits_f64_torch", lambda r: case_logits(r, torch.float64, "torch", 0.7)
    yield "logits_f32_torch", lambda r: case_logits(r, torch.float32, "torch", 1.0)
    yield "logits_f32_triton", lambda r: case_logits(r, torch.float32, "triton", 0.7)
    yield "logits_f32_torch_inplace", lambda r: case_logits(r, torch.float32, "torch", 0.7, inplace_grad=True)
    yield "linear_torch", lambda r: case_linear(r, "torch", 0.7)
    yield "linear_triton", lambda r: case_linear(r, "triton", 1.3)
    for method in METHODS:
        yield f"policy_loss_{method}", lambda r, m=method: case_policy_loss(r, m)
        yield f"linear_policy_loss_{method}", lambda r, m=method: case_linear_policy_loss(r, m)
    yield "linear_policy_loss_dapo_triton", lambda r: case_linear_policy_loss(r, "dapo", "triton")
    yield "errors", case_errors
    yield "collectives", case_collectives


def main(rank: int, world: int, store: str, out_dir: str) -> None:
    # A bounded timeout: a case that desynchronises the ranks fails instead of hanging the suite.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    r = Rank(rank, world)
    records = {}
    for name, run in cases(world):
        try:
            records[name] = run(r)
        except Exception:  # recorded, so the parent names the failing case
            records[name] = {"exception": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    # Every rank done with its collectives before any tears the group down: a rank leaving while another still
    # talks to it has been seen to abort at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
