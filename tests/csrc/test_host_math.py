"""The per-row math of the CUDA kernels (csrc/softmax_row_math.h), run on the CPU through a g++-built shim
against a float64 torch reference.

The shim runs the kernels' own per-thread loops (scalar head, 16-byte vectors, scalar tail) for every thread
of an emulated block, on the tensors' real memory (so misaligned rows of strided views take the same path
they take on the GPU), then merges the thread states in the kernels' order. What it cannot run is the
device-only part: shuffles, the CUDA fp16/bf16 conversions, the packed 16-bit max of a vector group (the
host computes the same number with fmaxf), launch configuration (tests/ops cover those on a GPU). The device's
ex2.approx.ftz is stood in for by exp2f with the same flush to zero, and the tests below put a 4-ulp error of
either sign on every exponential to show the tolerances cover the approximation.

Tolerances. Outputs are float32 computed in float32 from exact inputs (bf16 and fp32 logits upcast exactly),
so errors are a few float32 roundings of quantities of the size of the scaled logits: x * (1/T), the running
sums, lse and E_p[x] are each rounded with relative error 2^-24. We allow 8 * 2^-24 * (1 + max|x|) in
absolute terms per row (x = scaled logits): ~2e-6 for unit-size logits, ~1.6e-3 for rows of size 3300,
whose float32 lse itself has a resolution of 2.4e-4. Observed errors are 2-4 such roundings (a tolerance of
1 rounding fails). Gradient tolerances scale this by the incoming gradients' size and 1/T; bf16 gradients
are additionally rounded once to bf16 (relative 2^-8).
"""
import math

import pytest
import torch

from erpo.ops import torch_logprobs_entropy
from erpo.ops.row_layout import contiguous_layout_like, row_layout
from tests.csrc import host_shim as hs

EPS32 = 2.0 ** -24
IGNORE = -100


def reference_forward(rows, targets, inv_t, ignore_index=IGNORE):
    """float64 (logp, entropy, lse) of [N, V] rows; -inf entries are masked; ignored rows are 0."""
    x = rows.double() * inv_t
    lse = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse.unsqueeze(-1))
    mean_x = torch.where(p > 0, p * x, torch.zeros_like(x)).sum(-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, 0, targets)
    logp = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros_like(lse)
    return (torch.where(ignored, zero, logp), torch.where(ignored, zero, lse - mean_x), torch.where(ignored, zero, lse))


def reference_grad(rows, targets, inv_t, g_logp, g_ent, ignore_index=IGNORE):
    """float64 d(sum g_logp * logp + g_ent * H)/d rows by autograd (independent of the kernels' formula)."""
    raw = rows.double().requires_grad_()
    x = raw * inv_t
    log_p = torch.log_softmax(x, dim=-1)
    p = log_p.exp()
    entropy = -(p * torch.where(torch.isfinite(x), log_p, torch.zeros_like(log_p))).sum(-1)
    keep = targets != ignore_index
    logp = log_p.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    loss = torch.zeros((), dtype=torch.float64)
    if g_logp is not None:
        loss = loss + (g_logp.double() * logp * keep).sum()
    if g_ent is not None:
        loss = loss + (g_ent.double() * entropy * keep).sum()
    if not loss.requires_grad:
        return torch.zeros_like(raw)
    (grad,) = torch.autograd.grad(loss, raw)
    return grad


def pick(options):
    """One of `options`, drawn from torch's generator (seeded per test by tests/conftest.py: replayable)."""
    return options[int(torch.randint(0, len(options), ()))]


def row_tolerance(rows, inv_t):
    """Absolute tolerance per row: 64 float32 roundings of the size of the row's scaled logits."""
    x = rows.double() * inv_t
    size = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(-1)
    return 8 * EPS32 * (1 + size)


def assert_close_rows(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs()
    worst = int((err / tol).argmax())
    assert bool((err <= tol).all()), (
        f"{what}: row {worst} off by {float(err[worst]):.3g} > {float(tol[worst]):.3g} "
        f"(got {float(actual[worst])!r}, float64 reference {float(expected[worst])!r})"
    )


def make_logits(layout_kind, batch, length, vocab, dtype, scale=1.0, offset=0.0):
    """[batch, length, vocab] logits with the row layout a trainer produces; returns the (maybe strided) view."""
    def fill(*shape):
        return (torch.randn(*shape) * scale + offset).to(dtype)

    if layout_kind == "contiguous":
        return fill(batch, length, vocab)
    if layout_kind == "shifted":  # hidden_logits[:, :-1, :]
        return fill(batch, length + 1, vocab)[:, :-1, :]
    if layout_kind == "padded":  # rows 3 elements apart, the first one element into the storage: misaligned
        base = fill(batch * length * (vocab + 3) + 1)
        return base[1:].view(batch, length, vocab + 3)[..., :vocab]
    raise ValueError(layout_kind)


def random_targets(batch, length, vocab, ignored_fraction=0.25):
    targets = torch.randint(0, vocab, (batch, length))
    targets[torch.rand(batch, length) < ignored_fraction] = IGNORE
    return targets


LAYOUTS = ("contiguous", "shifted", "padded")
VOCABS = (1, 7, 37, 1000, 4099)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("layout_kind", LAYOUTS)
def test_forward_matches_float64(shim, dtype, vocab, layout_kind):
    logits = make_logits(layout_kind, 2, 5, vocab, dtype, scale=pick((1.0, 4.0)))
    targets = random_targets(2, 5, vocab)
    inv_t = 1.0 / pick((0.7, 1.3))  # never 1: a missing temperature factor must show
    threads = pick((32, 64, 512))
    layout = row_layout(logits)
    assert layout.tensor.data_ptr() == logits.data_ptr()  # the kernel reads the view itself, no copy
    logp, entropy, lse = hs.rows_fwd(shim, layout, targets, inv_t, IGNORE, threads)
    rows = logits.reshape(-1, vocab)
    ref = reference_forward(rows, targets.reshape(-1), inv_t)
    tol = row_tolerance(rows, inv_t)
    for name, got, want in zip(("logp", "entropy", "lse"), (logp, entropy, lse), ref):
        assert_close_rows(got, want, tol, f"{name} ({dtype}, V={vocab}, {layout_kind}, {threads} threads)")
    ignored = targets.reshape(-1) == IGNORE
    assert bool((logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (lse[ignored] == 0).all())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_forward_large_magnitude_rows(shim, dtype):
    """bf16-sized logits in the thousands (lm heads without final norm): the shift by the max keeps precision."""
    vocab = 151_936  # Qwen's vocabulary: many vectors per thread, the running max moves across vectors
    logits = make_logits("shifted", 1, 3, vocab, dtype, scale=300.0, offset=3000.0)
    targets = torch.randint(0, vocab, (1, 3))
    logp, entropy, lse = hs.rows_fwd(shim, row_layout(logits), targets, 1.0, IGNORE, 512)
    rows = logits.reshape(-1, vocab)
    ref = reference_forward(rows, targets.reshape(-1), 1.0)
    tol = row_tolerance(rows, 1.0)
    for name, got, want in zip(("logp", "entropy", "lse"), (logp, entropy, lse), ref):
        assert_close_rows(got, want, tol, f"{name} large magnitude {dtype}")


def test_forward_masked_vocabulary(shim):
    """-inf entries have p = 0; a target on a masked entry has logp = -inf; rows of one live entry have H = 0."""
    vocab = 301
    logits = torch.randn(6, vocab) * 3
    logits[torch.rand(6, vocab) < 0.3] = -math.inf
    targets = torch.empty(6, dtype=torch.int64)
    for r in range(6):
        live = torch.isfinite(logits[r]).nonzero().squeeze(-1)
        targets[r] = live[torch.randint(0, live.numel(), ())]
    logits[4] = -math.inf
    logits[4, targets[4]] = 2.5  # one live entry: p = 1, logp = 0, H = 0
    masked_target = int(torch.isinf(logits[5]).nonzero()[0, 0])
    targets[5] = masked_target
    logp, entropy, lse = hs.rows_fwd(shim, row_layout(logits), targets, 1.0, IGNORE, 64)
    ref = reference_forward(logits, targets, 1.0)
    tol = row_tolerance(logits, 1.0)
    assert_close_rows(logp[:5], ref[0][:5], tol[:5], "logp with masked vocabulary")
    assert_close_rows(entropy, ref[1], tol, "entropy with masked vocabulary")
    assert_close_rows(lse, ref[2], tol, "lse with masked vocabulary")
    assert float(logp[4]) == 0.0 and float(entropy[4]) == 0.0
    assert float(logp[5]) == -math.inf


def test_forward_nan_policy_matches_torch_backend(shim):
    """NaN or +inf poisons its own row only; an all -inf row ends non-finite; ignored rows are never read."""
    vocab = 203
    logits = torch.randn(7, vocab)
    logits[1, 50] = math.nan
    logits[2, 7] = math.inf
    logits[3] = -math.inf
    logits[5, 11] = math.nan  # ignored row: must not be read
    targets = torch.randint(0, vocab, (7,))
    targets[5] = IGNORE
    layout = row_layout(logits)
    got = hs.rows_fwd(shim, layout, targets, 1.0, IGNORE, 32)
    want = torch_logprobs_entropy.forward(layout, targets, 1.0, IGNORE)
    for name, g, w in zip(("logp", "entropy"), got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{name}: NaN rows {torch.isnan(g)} vs {torch.isnan(w)}"
    logp, entropy, lse = got
    assert bool(torch.isnan(logp[[1, 2, 3]]).all() and torch.isnan(entropy[[1, 2, 3]]).all())
    assert bool(torch.isnan(lse[[1, 2]]).all()), "a poisoned row's lse is NaN, so its gradient is NaN too"
    assert float(lse[3]) == -math.inf
    assert float(logp[5]) == 0.0 and float(entropy[5]) == 0.0 and float(lse[5]) == 0.0
    clean = [0, 4, 6]
    ref = reference_forward(logits[clean], targets[clean], 1.0)
    assert_close_rows(logp[clean], ref[0], row_tolerance(logits[clean], 1.0), "clean rows beside poisoned ones")


def test_forward_out_of_range_target_is_nan_not_a_stray_read(shim):
    logits = torch.randn(3, 50)
    targets = torch.tensor([3, 50, -1])
    logp, entropy, _ = hs.rows_fwd(shim, row_layout(logits), targets, 1.0, IGNORE, 32)
    assert math.isfinite(float(logp[0])) and bool(torch.isnan(logp[1:]).all())
    assert bool(torch.isfinite(entropy).all())


@pytest.mark.parametrize("group", (1, 4, 8))
def test_online_merge_is_order_independent(shim, group):
    """A row cut into chunks, each folded into its own state, the states merged in several orders (left to
    right, reversed, shuffled, pairwise tree): every order matches float64, and the orders agree closely."""
    vocab = 2053
    row = torch.randn(vocab) * 20 + 100
    row[torch.rand(vocab) < 0.1] = -math.inf
    target = int(torch.isfinite(row).nonzero()[0, 0])
    ref = torch.stack(reference_forward(row[None], torch.tensor([target]), 1.0)).squeeze(-1)
    tol = float(row_tolerance(row[None], 1.0))
    results = []
    for chunk in (1, 13, 256, vocab):
        n_chunks = -(-vocab // chunk)
        shuffled = torch.randperm(n_chunks).tolist()
        for order in (list(range(n_chunks)), list(range(n_chunks))[::-1], shuffled):
            for tree in (False, True):
                out = hs.chunked_row(shim, row, 1.0, target, chunk, order, group, tree)
                err = (out.double() - ref).abs().max()
                assert float(err) <= tol, f"chunk={chunk} tree={tree} order={order[:5]}...: {out} vs {ref}"
                results.append(out)
    spread = (torch.stack(results).double() - results[0].double()).abs().max()
    assert float(spread) <= tol


def test_merge_with_empty_and_all_masked_chunks(shim):
    """Chunks holding only -inf (state m = -inf) merged before, between and after live ones."""
    row = torch.full((64,), -math.inf)
    row[20:24] = torch.randn(4)
    ref = torch.stack(reference_forward(row[None], torch.tensor([21]), 1.0)).squeeze(-1)
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0], [3, 0, 7, 2, 5, 1, 6, 4]):
        out = hs.chunked_row(shim, row, 1.0, 21, 8, order, 4, False)
        assert float((out.double() - ref).abs().max()) <= 1e-6


GRAD_MASKS = ("logp", "entropy", "both", "neither")


def _incoming(mask, n):
    g_logp = torch.randn(n) if mask in ("logp", "both") else None
    g_ent = torch.randn(n) if mask in ("entropy", "both") else None
    return g_logp, g_ent


@pytest.mark.parametrize("mask", GRAD_MASKS)
@pytest.mark.parametrize("vocab", (1, 37, 1000, 4099))
@pytest.mark.parametrize("layout_kind", LAYOUTS)
def test_backward_matches_float64_fp32(shim, mask, vocab, layout_kind):
    logits = make_logits(layout_kind, 2, 3, vocab, torch.float32, scale=3.0)
    logits.reshape(-1, vocab)[:, :: max(1, vocab // 5)][1:] = -math.inf if vocab > 1 else 0.0  # some masked entries
    targets = random_targets(2, 3, vocab)
    rows = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1)
    finite_target = rows.gather(-1, torch.where(flat_targets == IGNORE, 0, flat_targets)[:, None]).isfinite()
    flat_targets[~finite_target.squeeze(-1)] = IGNORE  # a view: updates targets
    inv_t = 1.0 / pick((0.6, 1.5))  # never 1: a missing temperature factor must show
    threads = pick((32, 128))
    layout = row_layout(logits)
    _, entropy, lse = hs.rows_fwd(shim, layout, targets, inv_t, IGNORE, threads)
    g_logp, g_ent = _incoming(mask, layout.n_rows)
    grad = torch.full((2, 3, vocab), math.nan)  # every element must be written
    grad_layout = contiguous_layout_like(layout, grad)
    hs.rows_bwd(shim, layout, targets, lse, entropy, g_logp, g_ent, inv_t, IGNORE, grad_layout, threads)
    want = reference_grad(rows, targets.reshape(-1), inv_t, g_logp, g_ent).view(2, 3, vocab)
    scale = 1 + torch.cat([g.abs() for g in (g_logp, g_ent) if g is not None] or [torch.zeros(1)]).max()
    tol = (row_tolerance(rows, inv_t) * scale * inv_t).view(2, 3, 1)
    err = (grad.double() - want).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max()):.3g}, tolerance {float(tol.min()):.3g}"
    assert bool((grad[torch.isinf(logits)] == 0).all()), "masked entries must get exactly zero gradient"
    ignored = (targets == IGNORE)
    assert bool((grad[ignored] == 0).all())


@pytest.mark.parametrize("mask", ("logp", "both"))
@pytest.mark.parametrize("layout_kind", LAYOUTS)
def test_backward_bf16(shim, mask, layout_kind):
    vocab = 1003
    logits = make_logits(layout_kind, 2, 3, vocab, torch.bfloat16, scale=4.0, offset=50.0)
    targets = random_targets(2, 3, vocab)
    layout = row_layout(logits)
    _, entropy, lse = hs.rows_fwd(shim, layout, targets, 1.0, IGNORE, 64)
    g_logp, g_ent = _incoming(mask, layout.n_rows)
    grad = torch.empty(2, 3, vocab, dtype=torch.bfloat16)
    grad_layout = contiguous_layout_like(layout, grad)
    hs.rows_bwd(shim, layout, targets, lse, entropy, g_logp, g_ent, 1.0, IGNORE, grad_layout, 64)
    rows = logits.reshape(-1, vocab)
    want = reference_grad(rows, targets.reshape(-1), 1.0, g_logp, g_ent).view(2, 3, vocab)
    scale = 1 + torch.cat([g.abs() for g in (g_logp, g_ent) if g is not None]).max()
    # One rounding to bf16 (relative 2^-8 of the element) on top of the float32 error of the row.
    tol = 2.0 ** -8 * want.abs() + (row_tolerance(rows, 1.0) * scale).view(2, 3, 1)
    err = (grad.double() - want).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max()):.3g}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout_kind", LAYOUTS)
def test_inplace_backward_equals_separate_buffer(shim, dtype, layout_kind):
    """The in-place gradient (grad written over the logits) is bit-identical to the one in a separate buffer,
    and ignored rows become zeros in place."""
    vocab = 517
    logits = make_logits(layout_kind, 2, 4, vocab, dtype, scale=2.0)
    targets = random_targets(2, 4, vocab, ignored_fraction=0.3)
    layout = row_layout(logits)
    _, entropy, lse = hs.rows_fwd(shim, layout, targets, 0.8, IGNORE, 64)
    g_logp, g_ent = _incoming("both", layout.n_rows)
    separate = torch.empty(2, 4, vocab, dtype=dtype)
    separate_layout = contiguous_layout_like(layout, separate)
    hs.rows_bwd(shim, layout, targets, lse, entropy, g_logp, g_ent, 0.8, IGNORE, separate_layout, 64)
    hs.rows_bwd(shim, layout, targets, lse, entropy, g_logp, g_ent, 0.8, IGNORE, layout, 64)
    assert torch.equal(logits, separate)


def test_backward_nan_row_stays_nan(shim):
    logits = torch.randn(3, 40)
    logits[1, 3] = math.nan
    targets = torch.tensor([1, 2, 3])
    layout = row_layout(logits)
    _, entropy, lse = hs.rows_fwd(shim, layout, targets, 1.0, IGNORE, 32)
    grad = torch.empty_like(logits)
    hs.rows_bwd(shim, layout, targets, lse, entropy, torch.randn(3), torch.randn(3), 1.0, IGNORE,
                contiguous_layout_like(layout, grad), 32)
    assert bool(torch.isnan(grad[1]).all()) and bool(torch.isfinite(grad[[0, 2]]).all())


@pytest.mark.parametrize("elem_size", (2, 4))
def test_split_row_covers_the_row_once_with_aligned_vectors(shim, elem_size):
    per_vec = 16 // elem_size
    for vocab in (1, 2, 7, 8, 9, 31, 1000, 4099):
        for misalign in range(0, 16, elem_size):
            address = 4096 + misalign
            head, n_vec, tail_start = hs.split_row(shim, address, vocab, elem_size)
            assert 0 <= head <= min(vocab, per_vec - 1)
            assert tail_start == head + n_vec * per_vec and 0 <= vocab - tail_start < per_vec + (head == vocab) * vocab
            if n_vec:
                assert (address + head * elem_size) % 16 == 0
            assert head + n_vec * per_vec + (vocab - tail_start) == vocab
    assert hs.split_row(shim, 4097, 10, 2) == (10, 0, 10), "not element-aligned: all scalar"
    assert hs.split_row(shim, 4100, 100, 4, write_address=8200) == (100, 0, 100), "different phases: all scalar"
    assert hs.split_row(shim, 4100, 100, 4, write_address=8196) == hs.split_row(shim, 4100, 100, 4)


def test_default_block_threads(shim):
    previous = 0
    for vocab in (1, 100, 1000, 32_000, 151_936, 1 << 22):
        for elem_size in (2, 4):
            threads = shim.erpo_host_default_block_threads(vocab, elem_size)
            assert threads % 32 == 0 and 32 <= threads <= 512
        threads = shim.erpo_host_default_block_threads(vocab, 2)
        assert threads >= previous
        previous = threads
    assert shim.erpo_host_default_block_threads(151_936, 2) == 512
    assert shim.erpo_host_default_block_threads(100, 4) == 32


# ---------------------------------------------------------------- what the host shim stands in for on the device

# The device takes every exponential with ex2.approx.ftz (one MUFU instruction); the shim uses exp2f with the
# same flush of subnormal results. The CUDA Programming Guide lists exp2f at 2 ulp; these tests put a relative
# error of 4 ulp (2^-21), of either sign, on every exponential of the row math and require the float64
# tolerances to hold still.
EXP2_ERROR = 2.0 ** -21


@pytest.fixture
def exp2_error(shim):
    def set_error(value):
        shim.erpo_host_set_exp2_error(value)

    yield set_error
    shim.erpo_host_set_exp2_error(0.0)


def _forward_and_backward(shim, logits, targets, inv_t, g_logp, g_ent, threads=64):
    layout = row_layout(logits)
    logp, entropy, lse = hs.rows_fwd(shim, layout, targets, inv_t, IGNORE, threads)
    grad = torch.empty(logits.shape, dtype=logits.dtype)
    hs.rows_bwd(shim, layout, targets, lse, entropy, g_logp, g_ent, inv_t, IGNORE,
                contiguous_layout_like(layout, grad), threads)
    return logp, entropy, lse, grad


@pytest.mark.parametrize("sign", (1.0, -1.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_tolerances_cover_the_device_exp2_error(shim, exp2_error, sign, dtype):
    """bf16 rows at |logits| ~ 40 (and fp32), with -inf entries, every exponential off by 4 ulp."""
    vocab = 1003
    logits = make_logits("padded", 2, 3, vocab, dtype, scale=4.0, offset=40.0 * sign)
    logits.reshape(-1, vocab)[:, ::7] = -math.inf
    targets = torch.randint(0, vocab, (2, 3))
    targets[logits.reshape(-1, vocab).gather(-1, targets.reshape(-1, 1)).isinf().view(2, 3)] = IGNORE
    g_logp, g_ent = torch.randn(6), torch.randn(6)
    exp2_error(sign * EXP2_ERROR)
    logp, entropy, lse, grad = _forward_and_backward(shim, logits, targets, 0.8, g_logp, g_ent)
    rows = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1)
    ref = reference_forward(rows, flat_targets, 0.8)
    tol = row_tolerance(rows, 0.8)
    for name, got, want in zip(("logp", "entropy", "lse"), (logp, entropy, lse), ref):
        assert_close_rows(got, want, tol, f"{name} with exp2 off by {sign * EXP2_ERROR:.2g}")
    want = reference_grad(rows, flat_targets, 0.8, g_logp, g_ent).view(grad.shape)
    scale = 1 + torch.cat([g_logp.abs(), g_ent.abs()]).max()
    rounding = 2.0 ** -8 * want.abs() if dtype == torch.bfloat16 else 0.0
    tol = rounding + (row_tolerance(rows, 0.8) * scale * 0.8).view(2, 3, 1)
    err = (grad.double() - want).abs()
    assert bool((err <= tol).all()), f"gradient off by {float(err.max()):.3g} with exp2 error {sign * EXP2_ERROR:.2g}"


def test_exp2_error_knob_reaches_the_results(shim, exp2_error):
    """The perturbation above must act: a gross error (2^-8) on every exponential moves lse visibly."""
    logits = torch.randn(4, 300)
    targets = torch.randint(0, 300, (4,))
    clean = hs.rows_fwd(shim, row_layout(logits), targets, 1.0, IGNORE, 32)[2]
    exp2_error(2.0 ** -8)
    perturbed = hs.rows_fwd(shim, row_layout(logits), targets, 1.0, IGNORE, 32)[2]
    assert float((perturbed - clean).abs().min()) > 1e-3


def test_probability_underflow(shim):
    """Entries 90 to 200 below the row max: p underflows into (and below) float32's subnormal range, which
    ex2.approx.ftz flushes to 0. Outputs still match float64 and those entries get a zero or negligible
    gradient, never NaN."""
    vocab = 517
    logits = torch.randn(4, vocab)
    logits[:, 3] = 100.0
    logits[:, 100:300] = 100.0 - torch.linspace(80.0, 200.0, 200)
    targets = torch.tensor([3, 150, 299, 7])
    g_logp, g_ent = torch.randn(4), torch.randn(4)
    logp, entropy, lse, grad = _forward_and_backward(shim, logits, targets, 1.0, g_logp, g_ent, threads=32)
    ref = reference_forward(logits, targets, 1.0)
    tol = row_tolerance(logits, 1.0)
    for name, got, want in zip(("logp", "entropy", "lse"), (logp, entropy, lse), ref):
        assert_close_rows(got, want, tol, f"{name} with underflowing probabilities")
    want = reference_grad(logits, targets, 1.0, g_logp, g_ent)
    assert bool(torch.isfinite(grad).all())
    scale = 1 + torch.cat([g_logp.abs(), g_ent.abs()]).max()
    err = (grad.double() - want).abs()
    assert bool((err <= (tol * scale).view(4, 1)).all()), f"max error {float(err.max()):.3g}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("inplace", (False, True))
def test_backward_target_in_head_vectors_and_tail(shim, dtype, inplace):
    """The one-hot term is added after the loops by the thread that owns the target: targets in the scalar
    head, the first and last vector, the partial last step of the vector loop and the scalar tail of
    misaligned rows all get it (once), in place too."""
    vocab = 1001
    threads = 32
    logits = make_logits("padded", 1, 6, vocab, dtype, scale=2.0)
    layout = row_layout(logits)
    per_vec = 16 // logits.element_size()
    picks = []
    for r in range(6):
        address = logits.data_ptr() + (layout.stride_outer * 0 + r * layout.stride_inner) * logits.element_size()
        head, n_vec, tail_start = hs.split_row(shim, address, vocab, logits.element_size())
        assert head > 0 and tail_start < vocab, "the padded layout must give these rows a head and a tail"
        picks.append((0, head, head + per_vec - 1, head + (n_vec - 1) * per_vec, tail_start, vocab - 1)[r])
    targets = torch.tensor(picks).view(1, 6)
    g_logp, g_ent = torch.randn(6), torch.randn(6)
    rows = logits.reshape(-1, vocab).clone()
    _, entropy, lse = hs.rows_fwd(shim, layout, targets, 1.3, IGNORE, threads)
    if inplace:
        hs.rows_bwd(shim, layout, targets, lse, entropy, g_logp, g_ent, 1.3, IGNORE, layout, threads)
        grad = logits
    else:
        grad = torch.empty(1, 6, vocab, dtype=dtype)
        hs.rows_bwd(shim, layout, targets, lse, entropy, g_logp, g_ent, 1.3, IGNORE,
                    contiguous_layout_like(layout, grad), threads)
    want = reference_grad(rows, targets.reshape(-1), 1.3, g_logp, g_ent).view(1, 6, vocab)
    scale = 1 + torch.cat([g_logp.abs(), g_ent.abs()]).max()
    rounding = 2.0 ** -8 * want.abs() if dtype == torch.bfloat16 else 0.0
    tol = rounding + (row_tolerance(rows, 1.3) * scale * 1.3).view(1, 6, 1)
    err = (grad.double() - want).abs()
    worst = divmod(int(err.argmax()), vocab)
    assert bool((err <= tol).all()), f"row {worst[0]} element {worst[1]} (targets {picks}) off by {float(err.max()):.3g}"
