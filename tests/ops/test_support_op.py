"""logprobs_and_entropy over the sampler's truncated support: values and gradients against a dense float64
reference (renormalised softmax over S, autograd), replay equal to recompute on the same sets, the full support
bit for bit the full op, and every bad input one clear error."""
import math

import pytest
import torch
import torch.nn.functional as F

import erpo
from erpo.ops.support import Support, support_ids_from_csr, threshold
from erpo.ops.support_logprobs_entropy import support_logprobs_and_entropy
from tests.conftest import DEVICE

V = 301  # not a multiple of any block


def dense(logits, targets, keep, temperature, g_logp, g_ent, ignore_index=-100):
    """logp and H of the renormalised softmax over `keep`, float64, and the gradient of sum(g_logp logp + g_ent H)."""
    x = logits.detach().double().requires_grad_()
    z = (x / temperature).masked_fill(~keep, -math.inf)
    log_q = torch.log_softmax(z, -1)
    valid = targets != ignore_index
    logp = log_q.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(log_q.exp() * log_q.masked_fill(~keep, 0.0)).sum(-1) * valid
    (logp * g_logp + entropy * g_ent).sum().backward()
    return logp.detach(), entropy.detach(), x.grad


def threshold_keep(logits, targets, support, temperature):
    z = (logits.detach().float() / temperature).reshape(-1, logits.shape[-1])
    keep = z >= threshold(z, support).unsqueeze(-1)
    keep = keep.view(logits.shape)
    return keep | F.one_hot(targets.clamp_min(0), logits.shape[-1]).bool()


def inputs(shape, dtype, seed, scale=3.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=gen) * scale + offset).to(dtype)
    targets = torch.randint(0, V, shape, generator=gen)
    return logits, targets, torch.randn(shape, generator=gen, dtype=torch.float64), \
        torch.randn(shape, generator=gen, dtype=torch.float64)


SUPPORTS = [Support(top_k=1), Support(top_k=9), Support(top_p=0.7), Support(min_p=0.05),
            Support(top_k=40, top_p=0.9, min_p=0.01)]


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """The logits op's backends over S; Triton (the interpreter here) with a narrow block, so each row takes
    several blocks and a tail (the rebasing of both states)."""
    if request.param == "triton":
        from erpo.kernels import logprobs_entropy as triton_op

        monkeypatch.setattr(triton_op, "MAX_BLOCK_V", 64)
    return request.param


def on(backend):
    """Where a backend's inputs live: Triton on the GPU where there is one (the interpreter on CPU tensors here)."""
    return DEVICE if backend == "triton" else "cpu"


@pytest.mark.parametrize("support", SUPPORTS, ids=str)
@pytest.mark.parametrize("shape,dtype,temperature", [((3, 7), torch.float32, 0.7), ((1,), torch.float32, 1.0),
                                                      ((5,), torch.bfloat16, 1.3)])
def test_recompute_matches_the_dense_reference(support, shape, dtype, temperature, backend):
    offset = 30.0 if dtype == torch.bfloat16 else 0.0  # bf16 logits of large magnitude
    logits, targets, g_logp, g_ent = inputs(shape, dtype, seed=len(shape) * 10 + (support.top_k or 3), offset=offset)
    if targets.numel() > 2:
        targets.view(-1)[1] = -100  # an ignored row
        logits.view(-1, V)[0, ::7] = -math.inf  # a masked vocabulary
        targets.view(-1)[0] = 3
    dev = on(backend)
    x = logits.to(dev).requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(x, targets.to(dev), temperature=temperature, support=support,
                                              backend=backend)
    (logp * g_logp.float().to(dev) + entropy * g_ent.float().to(dev)).sum().backward()
    logp, entropy, grad = logp.detach().cpu(), entropy.detach().cpu(), x.grad.cpu()
    keep = threshold_keep(logits, targets, support, temperature)
    ref_logp, ref_ent, ref_grad = dense(logits, targets, keep, temperature, g_logp, g_ent)
    scale = lambda t: t.abs().max().clamp_min(1e-30)  # noqa: E731
    assert float((logp.double() - ref_logp).abs().max() / scale(ref_logp)) < 1e-5
    assert float((entropy.double() - ref_ent).abs().max() / scale(ref_ent)) < 1e-5
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # the gradient is stored in the logits' dtype
    assert float((grad.double() - ref_grad).abs().max() / scale(ref_grad)) < tol
    assert bool((grad[~keep] == 0).all())  # nothing reaches the logits outside S


def test_replay_of_the_recomputed_sets_gives_the_same_values_and_gradients(backend):
    logits, targets, g_logp, g_ent = inputs((4, 6), torch.float32, seed=5)
    support = Support(top_k=12, top_p=0.8)
    keep = threshold_keep(logits, targets, support, 1.0)
    rows = keep.view(-1, V)
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), rows.sum(-1).cumsum(0)])
    ids = support_ids_from_csr(indptr, rows.nonzero()[:, 1]).view(4, 6, -1)
    logits, targets, ids, g_logp, g_ent = (t.to(on(backend)) for t in (logits, targets, ids, g_logp, g_ent))
    results = []
    for kwargs in ({"support": support}, {"support_ids": ids}):
        x = logits.clone().requires_grad_()
        logp, entropy = erpo.logprobs_and_entropy(x, targets, backend=backend, **kwargs)
        (logp * g_logp.float() + entropy * g_ent.float()).sum().backward()
        results.append((logp, entropy, x.grad))
    for ours, theirs in zip(*results):  # torch: equal; Triton: two kernels, float32 rounding
        assert float((ours - theirs).detach().abs().max() / theirs.detach().abs().max()) < 1e-6
    singletons = targets.unsqueeze(-1)  # every set {target}: logp 0, entropy 0, no gradient
    x = logits.clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(x, targets, support_ids=singletons, backend=backend)
    (logp + entropy).sum().backward()
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, torch.zeros_like(entropy))
    assert not bool(x.grad.any())


@pytest.mark.parametrize("support", [Support(), Support(top_p=1.0), Support(top_k=V), Support(min_p=0.0)], ids=str)
def test_a_support_that_keeps_everything_is_the_full_op_bit_for_bit(support):
    logits, targets, g_logp, g_ent = inputs((3, 4), torch.float32, seed=9)
    results = []
    for kwargs in ({}, {"support": support}):
        x = logits.clone().requires_grad_()
        logp, entropy = erpo.logprobs_and_entropy(x, targets, **kwargs)
        (logp * g_logp.float() + entropy * g_ent.float()).sum().backward()
        results.append((logp, entropy, x.grad))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_both_at_once_the_full_results_are_the_full_op(backend):
    logits, targets, g_logp, g_ent = inputs((2, 5), torch.float32, seed=11)
    dev = on(backend)
    x = logits.to(dev).requires_grad_()
    result = support_logprobs_and_entropy(x, targets.to(dev), 1.0, -100, Support(top_p=0.6), None, True, backend)
    (result.logp * g_logp.float().to(dev) + result.full_entropy * g_ent.float().to(dev)).sum().backward()
    full_logp, full_entropy = erpo.logprobs_and_entropy(logits, targets)
    assert torch.allclose(result.full_logp.cpu(), full_logp, atol=1e-6)
    assert torch.allclose(result.full_entropy.cpu(), full_entropy, atol=1e-6)
    keep = threshold_keep(logits, targets, Support(top_p=0.6), 1.0)
    _, _, grad_s = dense(logits, targets, keep, 1.0, g_logp, torch.zeros_like(g_ent))
    _, _, grad_f = dense(logits, targets, torch.ones_like(keep), 1.0, torch.zeros_like(g_logp), g_ent)
    assert torch.allclose(x.grad.cpu().double(), grad_s + grad_f, atol=1e-6)  # one backward pass, both terms


def test_nan_stays_in_its_row(backend):
    logits, targets, _, _ = inputs((3,), torch.float32, seed=2)
    logits[1, 5] = math.nan
    logp, entropy = erpo.logprobs_and_entropy(logits.to(on(backend)), targets.to(on(backend)), support=Support(top_k=4),
                                              backend=backend)
    assert bool(torch.isnan(logp[1])) and bool(torch.isfinite(logp[[0, 2]]).all())


@pytest.mark.parametrize("kwargs,message", [
    ({"support_ids": torch.full((3, 2), 7.0)}, "support_ids must be an integer tensor"),
    ({"support_ids": torch.zeros(3, dtype=torch.long)}, "support_ids shape"),
    ({"support_ids": torch.tensor([[0, V], [1, -1], [2, -1]])}, "outside \\[0, 301\\)"),
    ({"support_ids": torch.tensor([[-1, -1], [1, -1], [2, -1]])}, "row 0 has no kept id"),
    ({"support_ids": torch.tensor([[5, -1], [1, -1], [2, -1]])}, "target 0 of row 0 is not in its kept set"),
    ({"support": Support(top_k=3), "support_ids": torch.tensor([[0], [1], [2]])}, "not both"),
    ({"support": Support(top_k=3), "backend": "cuda"}, "backend='cuda' has no kernel over a truncated"),
    ({"support_ids": torch.tensor([[0], [1], [2]]), "backend": "cuda"}, "backend='cuda' has no kernel over a"),
    ({"support": Support(top_k=3), "inplace_grad": True}, "inplace_grad=True is not supported with a support"),
    ({"support": {"top_k": 3}}, "support must be an erpo.Support"),
])
def test_bad_supports_are_one_clear_error(kwargs, message):
    logits = torch.randn(3, V)
    with pytest.raises((ValueError, TypeError), match=message):
        erpo.logprobs_and_entropy(logits, torch.tensor([0, 1, 2]), **kwargs)


@pytest.mark.parametrize("mode", ["recompute", "replay"])
def test_torch_compile_fullgraph(backend, mode):
    logits, targets, _, _ = inputs((2, 3), torch.float32, seed=4)
    logits, targets = logits.to(on(backend)), targets.to(on(backend))
    kwargs = {"support": Support(top_p=0.9)} if mode == "recompute" else \
        {"support_ids": torch.stack([targets, (targets + 1) % V, torch.full_like(targets, -1)], -1)}

    def loss(x):
        logp, entropy = erpo.logprobs_and_entropy(x, targets, check_targets=False, backend=backend, **kwargs)
        return (logp + 0.1 * entropy).sum()

    x = logits.clone().requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    y = logits.clone().requires_grad_()
    loss(y).backward()
    assert torch.allclose(x.grad, y.grad)


def _both_backends(logits, targets, support, temperature, grads):
    """Every SupportResult field and the gradient of sum(grads . (logp_S, H_S, logp, H)), torch then triton."""
    logits, targets, grads = logits.to(DEVICE), targets.to(DEVICE), [g.to(DEVICE) for g in grads]
    results = []
    for backend in ("torch", "triton"):  # both on the same device: the same thresholds
        x = logits.clone().requires_grad_()
        result = support_logprobs_and_entropy(x, targets, 1.0 / temperature, -100, support, None, True, backend)
        sum(g * v for g, v in zip(grads, result[:4])).sum().backward()
        results.append([t.detach() for t in result] + [x.grad])
    return results


@pytest.mark.parametrize("support", [Support(top_k=40), Support(top_p=0.8, min_p=0.02)], ids=str)
def test_triton_equals_the_torch_backend_at_the_production_block(support, monkeypatch):
    """Odd V over several production-size blocks (2048 forward, 4096 backward, the backward split over V), -inf
    entries, an ignored row: the same S (tau, |S| and the added flags exactly), values and gradients to float32
    rounding; and the gradient holds both terms, full and over S."""
    from erpo.kernels import logprobs_entropy as triton_op

    assert triton_op.SUPPORT_FWD_BLOCK_V == 2048 and triton_op.MAX_BLOCK_V == triton_op.CONFIGS[0][0] == 4096
    monkeypatch.setattr(triton_op, "SPLIT_BELOW_ROWS", 64)  # the backward's rows split over V
    monkeypatch.setattr(triton_op, "THRESHOLD_CHUNK_ELEMENTS", 5000)  # tau over several row chunks
    assert triton_op.n_chunks(3, 4099, torch.device("cpu")) == 2
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(3, 4099, generator=gen) * 4
    logits[0, ::5] = -math.inf
    targets = torch.tensor([7, -100, 4098])
    grads = [torch.randn(3, generator=gen) for _ in range(4)]
    ours, theirs = _both_backends(logits, targets, support, 0.9, grads)
    for name, a, b in zip(("logp", "entropy", "full_logp", "full_entropy", "threshold", "size", "target_added",
                           "grad"), ours, theirs):
        if name in ("threshold", "size", "target_added"):
            assert torch.equal(a, b), name
        else:
            scale = b.abs().max().clamp_min(1e-30)
            assert float((a - b).abs().max() / scale) < 1e-5, name
    assert float(theirs[5][0]) < 4099 and bool(theirs[1].ne(ours[3]).any())  # S is truncated: two states
    assert not bool(theirs[7][1].any())  # the ignored row


def test_triton_bf16_of_large_magnitude_equals_torch(monkeypatch):
    """bf16 logits near 30: the same S on both backends, values to float32 rounding (both read bf16 once)."""
    from erpo.kernels import logprobs_entropy as triton_op

    monkeypatch.setattr(triton_op, "MAX_BLOCK_V", 128)
    logits, targets, g_logp, g_ent = inputs((6,), torch.bfloat16, seed=3, offset=30.0)
    grads = [g_logp.float(), g_ent.float(), -g_ent.float(), g_logp.float()]
    ours, theirs = _both_backends(logits, targets, Support(top_k=16, top_p=0.9), 1.1, grads)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i in (4, 5, 6):
            assert torch.equal(a, b)
        else:
            assert float((a.double() - b.double()).abs().max() / b.double().abs().max()) < (1e-2 if i == 7 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_replay_equals_the_torch_backend(dtype, monkeypatch):
    """Replay on Triton (the plain kernels for the whole row, the gather kernels for the K kept logits): ids
    repeated, padding anywhere, K over several blocks, a target outside its set (check_targets=False: added to
    S), an ignored row, -inf entries; both results, |S| and the gradient as the torch backend's."""
    from erpo.kernels import logprobs_entropy as triton_op

    monkeypatch.setattr(triton_op, "REPLAY_BLOCK_K", 4)
    monkeypatch.setattr(triton_op, "MAX_BLOCK_V", 128)
    gen = torch.Generator().manual_seed(23)
    logits = (torch.randn(5, V, generator=gen) * 3 + (30.0 if dtype == torch.bfloat16 else 0.0)).to(dtype)
    logits[2, ::9] = -math.inf
    targets = torch.randint(0, V, (5,), generator=gen)
    targets[2] = 4  # not a multiple of 9: finite
    ids = torch.randint(0, V, (5, 11), generator=gen)
    ids[:, 0] = targets
    ids[1, 3] = ids[1, 7] = ids[1, 0]  # repeats count once
    ids[2, 5:] = -1
    ids[3, 1::2] = -1
    ids[4] = torch.where(ids[4] == targets[4], -1, ids[4])
    ids[4, :2] = torch.tensor([7, 7]) if int(targets[4]) != 7 else torch.tensor([8, 8])  # target not in its set
    targets[0] = -100
    grads = [torch.randn(5, generator=gen).to(DEVICE) for _ in range(4)]
    logits, targets, ids = logits.to(DEVICE), targets.to(DEVICE), ids.to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        result = support_logprobs_and_entropy(x, targets, 1 / 0.8, -100, None, ids, False, backend)
        sum(g * v for g, v in zip(grads, result[:4])).sum().backward()
        results.append([t.detach() for t in result] + [x.grad])
    ours, theirs = results
    assert torch.equal(theirs[5], ours[5]) and theirs[5].tolist()[1:4] == [9.0, 5.0, 6.0]  # |S|
    assert torch.equal(theirs[4].isnan(), ours[4].isnan()) and torch.equal(theirs[6], ours[6])
    for i in (0, 1, 2, 3, 7):
        a, b = theirs[i].double(), ours[i].double()
        tol = 1e-2 if i == 7 and dtype == torch.bfloat16 else 1e-5  # bf16: the S term added to a bf16 gradient
        assert float((a - b).abs().max() / b.abs().max()) < tol, i
    assert bool(theirs[0].ne(theirs[2]).any())  # S is truncated


def test_triton_replay_reads_only_the_kept_logits(monkeypatch):
    """logprobs_and_entropy(support_ids=) on Triton: S only, so the forward is the gather kernel alone (the plain
    forward over V is never called) and the backward stores at the kept ids into zeros; equal to the torch backend,
    shift=True included."""
    from erpo.kernels import logprobs_entropy as triton_op

    gen = torch.Generator().manual_seed(31)
    logits = torch.randn(2, 4, V, generator=gen) * 2
    targets = torch.randint(0, V, (2, 3), generator=gen)
    targets[1, 2] = -100
    ids = torch.randint(0, V, (2, 3, 6), generator=gen)
    ids[..., 0] = targets.clamp_min(0)
    ids[0, 1, 4:] = -1
    g_logp, g_ent = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    logits, targets, ids, g_logp, g_ent = (t.to(DEVICE) for t in (logits, targets, ids, g_logp, g_ent))
    results = []
    for backend in ("torch", "triton"):
        if backend == "triton":
            for name in ("forward", "forward_support", "backward_support"):
                monkeypatch.setattr(triton_op, name, None)  # only the replay kernels may run
        x = logits.clone().requires_grad_()
        logp, entropy = erpo.logprobs_and_entropy(x, targets, temperature=0.9, shift=True, support_ids=ids,
                                                  backend=backend)
        (logp * g_logp + entropy * g_ent).sum().backward()
        results.append((logp.detach(), entropy.detach(), x.grad))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    grad = results[1][2]
    outside = torch.ones_like(grad, dtype=torch.bool)
    outside[:, :3].scatter_(-1, ids.clamp_min(0), False)
    assert not bool(grad[outside].any()) and bool(grad.any())


@pytest.mark.parametrize("mode", ["recompute", "replay"])
@pytest.mark.parametrize("layout", ["shift-fp16", "strided-fp32"])
def test_triton_row_layouts_equal_torch(mode, layout, monkeypatch):
    """shift=True (the unsliced [B, L+1, V] logits) in fp16, and strided rows (logits[:, ::2]): the Triton kernels
    address the rows in place, as the torch backend reads them; tau found over chunks of 3 rows."""
    from erpo.kernels import logprobs_entropy as triton_op

    gen = torch.Generator().manual_seed(41)
    monkeypatch.setattr(triton_op, "THRESHOLD_CHUNK_ELEMENTS", 3 * V)  # chunks across the outer rows
    if layout == "shift-fp16":
        logits, kwargs = (torch.randn(2, 6, V, generator=gen) * 3).half(), {"shift": True}
    else:
        logits, kwargs = torch.randn(2, 10, V, generator=gen)[:, ::2], {}
    targets = torch.randint(0, V, (2, 5), generator=gen)
    targets[0, 2] = -100
    if mode == "recompute":
        kwargs["support"] = Support(top_k=7, top_p=0.9)
    else:
        ids = torch.randint(0, V, (2, 5, 4), generator=gen)
        ids[..., 0] = targets.clamp_min(0)
        kwargs["support_ids"] = ids.to(DEVICE)
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        logp, entropy = erpo.logprobs_and_entropy(x, targets, backend=backend, **kwargs)
        (0.3 * logp + 0.7 * entropy).sum().backward()
        results.append((logp.detach(), entropy.detach(), x.grad))
    for ours, theirs in zip(*results):
        assert float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()) < 1e-5


def test_auto_picks_triton_on_cuda_tensors():
    from types import SimpleNamespace

    from erpo.ops.support_logprobs_entropy import support_backend

    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert support_backend("auto", cuda, replay=False) == "triton"
    assert support_backend("auto", cuda, replay=True) == "triton"
    assert support_backend("auto", SimpleNamespace(is_cuda=True, dtype=torch.float64), replay=False) == "torch"
    assert support_backend("auto", torch.zeros(1), replay=False) == "torch"
    with pytest.raises(ValueError, match="backend='cuda' has no kernel"):
        support_backend("cuda", cuda, replay=False)


def test_the_triton_backend_runs_the_kernels(monkeypatch):
    """backend='triton' reaches the support kernels (not the torch backend under another name)."""
    from erpo.kernels import logprobs_entropy as triton_op
    from erpo.ops import torch_logprobs_entropy as torch_op

    calls = []
    for module, name in ((triton_op, "forward_support"), (triton_op, "backward_support")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    monkeypatch.setattr(torch_op, "forward_support", None)
    monkeypatch.setattr(torch_op, "backward_support", None)
    logits, targets, _, _ = inputs((2,), torch.float32, seed=8)
    x = logits.to(DEVICE).requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(x, targets.to(DEVICE), support=Support(top_k=5), backend="triton")
    (logp + entropy).sum().backward()
    assert calls == ["forward_support", "backward_support"]


@pytest.mark.parametrize("mode", ["recompute", "replay"])
def test_the_fused_head_over_s_is_the_logits_op_over_s(mode, monkeypatch):
    from erpo.ops import torch_linear_logprobs_entropy as head

    monkeypatch.setattr(head, "ROWS", 4)  # several chunks
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(3, 5, 16, generator=gen)
    weight, bias = torch.randn(V, 16, generator=gen) * 0.5, torch.randn(V, generator=gen)
    targets = torch.randint(0, V, (3, 5), generator=gen)
    targets[1, 2] = -100
    g_logp, g_ent = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    support = Support(top_k=20, top_p=0.85)
    kwargs = {"support": support}
    if mode == "replay":
        keep = threshold_keep(hidden @ weight.T + bias, targets, support, 0.8)
        rows = keep.view(-1, V)
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), rows.sum(-1).cumsum(0)])
        kwargs = {"support_ids": support_ids_from_csr(indptr, rows.nonzero()[:, 1]).view(3, 5, -1)}
    results = []
    for fused in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if fused:
            logp, entropy = erpo.linear_logprobs_and_entropy(h, w, targets, b, temperature=0.8, **kwargs)
        else:
            logp, entropy = erpo.logprobs_and_entropy(h @ w.T + b, targets, temperature=0.8, **kwargs)
        (logp * g_logp + entropy * g_ent).sum().backward()
        results.append((logp.detach(), entropy.detach(), h.grad, w.grad, b.grad))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_head_replay_fast_path_equals_the_general_path_over_s():
    from erpo.ops.support_logprobs_entropy import support_linear_logprobs_and_entropy

    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(7, 12, generator=gen), torch.randn(V, 12, generator=gen)
    targets = torch.randint(0, V, (7,), generator=gen)
    ids = torch.randint(0, V, (7, 5), generator=gen)
    ids[:, 0] = targets
    ids[2, 3:] = -1
    results = []
    for fast in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fast:
            logp, entropy = erpo.linear_logprobs_and_entropy(h, w, targets, support_ids=ids)
        else:
            result = support_linear_logprobs_and_entropy(h, w, None, targets, 1.0, -100, None, ids, True)
            logp, entropy = result.logp, result.entropy
        (logp + 0.5 * entropy).sum().backward()
        results.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[ids[ids >= 0]] = False
    assert not bool(results[0][3][untouched].any())  # only the kept rows of the head get a gradient
