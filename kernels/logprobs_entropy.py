"""Triton kernels of the fused op: per-row log-prob of the target and entropy of softmax(logits / T).

Memory-bound plan (a 1-D grid over rows, optionally split over V; every byte of the row moved once):
  forward   reads the row once and writes 3 floats (logp, entropy, lse). Online softmax in fp32 registers, in
            the state of online_softmax.py (t = x * log2(e) / T - m log2(e) feeds exp2 directly, one FMA): a
            running block-wide max m (in base 2 in the loop) and, per lane, the sums d and w. The sums are
            rebased only when a block raises m (a few times per row), so the steady-state loop costs one exp2
            and a handful of instructions per element; everything stays relative to the max, so bf16 logits of
            magnitude ~40 lose no precision. The target's logit is read once after the loop, not compared per element.
  backward  reads the row once and writes the gradient once (in the logits' dtype, possibly in place):
            dx = p (a t + b) + 1[j=y] g_logp / T (online_softmax.grad_terms, 1/T folded into a and b). The
            one-hot term is added after the loop to the target alone (its logit read before the loop, which
            may overwrite it in place).
  NaN and +inf propagate through the arithmetic, with no per-element test (online_softmax.py): such a row's
  logp, entropy, lse and gradient are NaN; -inf logits (a masked vocabulary) take no part.
  Small N (below about two waves of programs): each row is split into chunks of V, one program each; the
  forward's partial states (m, d, w) merge associatively in a second tiny kernel (online_softmax.rebase
  onto the largest m), the backward needs no merge. Block size, warps and stages are autotuned per
  (V, chunk, dtype) on a GPU; the interpreter, which cannot autotune, runs one fixed configuration.
Row offsets are int64 (N * V overflows int32 at 8 x 4k x 150k); temperature and ignore_index are runtime
arguments (no recompile per value), as are a logit scale and a soft cap
(online_softmax.transform; a soft cap compiles its own variant, HAS_SOFTCAP); rows are addressed with two strides, so `logits[:, :-1]` needs no copy.
"""
import os

import torch
import triton
import triton.language as tl

from erpo.kernels.online_softmax import (LN2, LOG2E, M_START, T_FLOOR, above_threshold, accumulate_support, finish,
                                          grad_terms, grad_terms_support, in_support, rebase, row_offset, shift, terms,
                                          transform, transform_grad)
from erpo.ops.row_stats import logit_transform

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# ERPO_TRITON_AUTOTUNE=0 runs the fixed configuration on a GPU too (no tuning runs: test suites with many shapes).
AUTOTUNE = not INTERPRET and os.environ.get("ERPO_TRITON_AUTOTUNE", "1") != "0"

# The fixed configuration (interpreter, ERPO_TRITON_AUTOTUNE=0): the widest block up to MAX_BLOCK_V, with
# DEFAULT_WARPS. Tests lower MAX_BLOCK_V to exercise the multi-block path (and the rebasing) on small V.
MAX_BLOCK_V = 4096
DEFAULT_WARPS = 8
# Autotune candidates on a GPU (BLOCK_V, num_warps, num_stages); the first is the fixed configuration at the
# production V and what the static report reads (its --configs option reads them all). The stage-3 twin of
# the default compiles to the same loop SASS with Triton 3.7 (the loop is not software-pipelined).
CONFIGS = ((4096, 8, 1), (8192, 8, 1), (8192, 16, 1), (4096, 4, 1), (2048, 4, 1), (4096, 8, 3),
           (16384, 16, 1))
# Rows below this many programs' worth are split over V (two waves of 132 SMs x 2 resident programs);
# None: computed from the device's SM count. Tests set it to force the split path under the interpreter.
SPLIT_BELOW_ROWS = None
# The forward over a truncated support keeps two row states (5 per-lane sums at 4096 would spill at 8 warps):
# half the block, 8 elements per thread (one 16-byte bf16 load), 64-77 registers on sm_80/sm_90.
SUPPORT_FWD_BLOCK_V = 2048
# Rows per chunk of the threshold select run before the support forward (torch, on the logits' device): about 4M
# logits, ~200 MB of temporaries; a few hundred chunks at N = 8192, V = 151936 (each a few dozen small launches).
THRESHOLD_CHUNK_ELEMENTS = 1 << 22
REPLAY_BLOCK_K = 1024  # kept ids per step of the replay kernels' loop (K up to 512 in one step)
MIN_CHUNK = 2048  # a chunk smaller than this costs more in merge traffic and launch than it gains


@triton.jit
def _accumulate(x, m2, d, w, scale):
    """Fold one block of logits (fp32, -inf in masked lanes) into the running state of online_softmax.py, kept
    here with m in base 2 (m2 = m log2(e): t = x * scale - m2 is one FMA) and d, w per lane; the sums are
    rebased only when the block raises m."""
    m2_new = tl.maximum(m2, tl.max(x, axis=0) * scale)
    if m2_new > m2:
        d, w = shift(d, w, m2 - m2_new)
        m2 = m2_new
    e, et = terms(x * scale - m2)
    return m2, d + e, w + et


@triton.jit
def _chunk_state(row_ptr, start, stop, x_scale, cap_in, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """(m, d, w) of logits[start:stop] of one row: full blocks unmasked, then one masked tail block. The softmax's
    x is x_scale * transform(logit) (online_softmax.transform; 1 / T for the plain head)."""
    scale = x_scale * LOG2E
    cols = tl.arange(0, BLOCK_V)
    m2 = tl.full([], M_START, tl.float32)
    d = tl.zeros([BLOCK_V], dtype=tl.float32)
    w = tl.zeros([BLOCK_V], dtype=tl.float32)
    full_stop = start + (stop - start) // BLOCK_V * BLOCK_V
    for block in range(start, full_stop, BLOCK_V):
        x = transform(tl.load(row_ptr + block + cols).to(tl.float32), cap_in, HAS_SOFTCAP)
        m2, d, w = _accumulate(x, m2, d, w, scale)
    if full_stop < stop:
        offs = full_stop + cols
        x = tl.load(row_ptr + offs, mask=offs < stop, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:  # a capped -inf is finite: the lanes past the row are masked again
            x = tl.where(offs < stop, transform(x, cap_in, HAS_SOFTCAP), -float("inf"))
        m2, d, w = _accumulate(x, m2, d, w, scale)
    return m2 * LN2, tl.sum(d, axis=0), tl.sum(w, axis=0)


@triton.jit
def _finish(m, d, w, row_ptr, target, vocab, x_scale, cap_in, logp_ptr, entropy_ptr, lse_ptr, row,
            HAS_SOFTCAP: tl.constexpr):
    lse, entropy = finish(m, d, w)
    # An out-of-range id (possible only with check_targets=False) gives NaN, never a read outside the row.
    in_range = (target >= 0) & (target < vocab)
    target_x = transform(tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32), cap_in,
                         HAS_SOFTCAP)
    tl.store(logp_ptr + row, target_x * x_scale - lse)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit
def logprobs_entropy_fwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    vocab, x_scale, cap_in, ignore_index,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr = False,
):
    """One program per row: the whole row's state, then logp, entropy, lse."""
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:  # ignored rows are never read: logp = entropy = lse = 0
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        m, d, w = _chunk_state(row_ptr, 0, vocab, x_scale, cap_in, HAS_SOFTCAP, BLOCK_V)
        _finish(m, d, w, row_ptr, target, vocab, x_scale, cap_in, logp_ptr, entropy_ptr, lse_ptr, row, HAS_SOFTCAP)


@triton.jit
def logprobs_entropy_partial_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    targets_ptr, state_ptr,
    vocab, chunk, n_chunks, x_scale, cap_in, ignore_index,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr = False,
):
    """Split path, grid (rows, chunks): the (m, d, w) of one chunk into state[row, chunk, :]."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    target = tl.load(targets_ptr + row).to(tl.int64)
    m = tl.full([], M_START, tl.float32)
    d = tl.full([], 0.0, tl.float32)
    w = tl.full([], 0.0, tl.float32)
    if target != ignore_index:
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        start = split * chunk
        m, d, w = _chunk_state(row_ptr, start, tl.minimum(start + chunk, vocab), x_scale, cap_in, HAS_SOFTCAP,
                               BLOCK_V)
    out = state_ptr + (row.to(tl.int64) * n_chunks + split) * 3
    tl.store(out, m)
    tl.store(out + 1, d)
    tl.store(out + 2, w)


@triton.jit
def logprobs_entropy_merge_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    targets_ptr, state_ptr, logp_ptr, entropy_ptr, lse_ptr,
    vocab, n_chunks, x_scale, cap_in, ignore_index,
    BLOCK_CHUNKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr = False,
):
    """Split path, one program per row: merge the chunks' states (associative, base 2), then finish."""
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        chunks = tl.arange(0, BLOCK_CHUNKS)
        live = chunks < n_chunks
        states = state_ptr + (row.to(tl.int64) * n_chunks + chunks) * 3
        m_c = tl.load(states, mask=live, other=M_START)
        m = tl.max(m_c, axis=0)
        d_c = tl.load(states + 1, mask=live, other=0.0)
        d_c, w_c = rebase(m_c, d_c, tl.load(states + 2, mask=live, other=0.0), m)
        d = tl.sum(d_c, axis=0)  # NaN states stay NaN through d_c
        w = tl.sum(w_c, axis=0)
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        _finish(m, d, w, row_ptr, target, vocab, x_scale, cap_in, logp_ptr, entropy_ptr, lse_ptr, row, HAS_SOFTCAP)


@triton.jit
def logprobs_entropy_bwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    grad_ptr, grad_stride_outer, grad_stride_inner,
    targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    vocab, chunk, x_scale, cap_in, grad_scale, ignore_index,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr = False,
):
    """Grid (rows, chunks of V); chunk = vocab when rows are not split. dlogit = dx grad_scale transform_grad(u)
    (online_softmax.py; 1 / T for the plain head), grad_scale folded into a and b."""
    row = tl.program_id(0)
    start = tl.program_id(1) * chunk
    stop = tl.minimum(start + chunk, vocab)
    full_stop = start + (stop - start) // BLOCK_V * BLOCK_V
    target = tl.load(targets_ptr + row).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
    grad_row_ptr = grad_ptr + row_offset(row, inner, grad_stride_outer, grad_stride_inner)
    out_ty = grad_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:  # zero gradient, without reading the row
        for block in range(start, stop, BLOCK_V):
            offs = block + cols
            tl.store(grad_row_ptr + offs, tl.zeros([BLOCK_V], dtype=out_ty), mask=offs < stop)
    else:
        scale = x_scale * LOG2E
        lse2 = tl.load(lse_ptr + row) * LOG2E
        g_logp = 0.0
        g_ent = 0.0
        if HAS_GRAD_LOGP:
            g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
        if HAS_GRAD_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
        a = -g_ent * LN2 * grad_scale
        b = -(g_logp + g_ent * tl.load(entropy_ptr + row)) * grad_scale
        # Read before the loop: an in-place gradient overwrites it. Only the chunk holding the target
        # patches it; out-of-range ids (check_targets=False) patch nothing.
        mine = (target >= start) & (target < stop)
        if HAS_GRAD_LOGP:
            target_x = transform(tl.load(row_ptr + target, mask=mine, other=0.0).to(tl.float32), cap_in, HAS_SOFTCAP)
            # Every warp loads it for itself: none may store over it (in place) before the slowest has read it.
            tl.debug_barrier()
        for block in range(start, full_stop, BLOCK_V):
            x = transform(tl.load(row_ptr + block + cols).to(tl.float32), cap_in, HAS_SOFTCAP)
            tl.store(grad_row_ptr + block + cols, _grad_of_logit(x, scale, lse2, a, b, HAS_SOFTCAP).to(out_ty))
        if full_stop < stop:
            offs = full_stop + cols
            x = transform(tl.load(row_ptr + offs, mask=offs < stop, other=-float("inf")).to(tl.float32), cap_in,
                          HAS_SOFTCAP)
            tl.store(grad_row_ptr + offs, _grad_of_logit(x, scale, lse2, a, b, HAS_SOFTCAP).to(out_ty),
                     mask=offs < stop)
        if HAS_GRAD_LOGP:
            if mine:
                tl.debug_barrier()  # the loop's store of this element (another thread's) lands first
                patched = grad_terms(target_x * scale - lse2, a, b) + g_logp * grad_scale
                if HAS_SOFTCAP:
                    patched *= transform_grad(target_x, HAS_SOFTCAP)
                tl.store(grad_row_ptr + target, patched.to(out_ty))


@triton.jit
def _grad_of_logit(u, scale, lse2, a, b, HAS_SOFTCAP: tl.constexpr):
    """The off-target gradient w.r.t. the logit whose transform is u (x = u x_scale; scale = x_scale log2(e))."""
    grad = grad_terms(u * scale - lse2, a, b)
    if HAS_SOFTCAP:
        grad *= transform_grad(u, HAS_SOFTCAP)
    return grad


# ---------------------------------------------------------------- over a truncated support (docs/support.md)
# Separate kernels, so the plain ones above compile to the same code as before. Recompute mode: S = {z >= tau} plus
# the target, tau [N] float32 found beforehand by erpo/ops/support.py threshold (torch, over row chunks); the
# forward reads each row once for both states (the whole row's and S's), the backward writes once the sum of both
# gradients. No soft cap or logit scale (refused with a support): x = logits / T, z = x as support.py computes it.

@triton.jit
def _support_step(x, keep, m2, d, w, d_s, w_s, size, scale):
    """One block of the support forward: both states (online_softmax.accumulate_support) and the per-lane count."""
    m2, d, w, d_s, w_s = accumulate_support(x * scale, keep, m2, d, w, d_s, w_s)
    return m2, d, w, d_s, w_s, size + keep.to(tl.float32)  # exact: a lane counts at most V / BLOCK_V < 2^24


@triton.jit
def support_fwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    targets_ptr, tau_ptr, logp_s_ptr, entropy_s_ptr, lse_s_ptr, logp_ptr, entropy_ptr, lse_ptr, size_ptr, added_ptr,
    vocab, x_scale, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program per row: the row's state and its state over S in the same loop (online_softmax.
    accumulate_support; full blocks unmasked, then one masked tail), then logp, H, lse of each, |S| and whether
    the target was below tau. The target joins S after the loop where it is below tau (one term, relative to the
    final max), so the loop compares no column with it. An ignored row is not read and gets 0 everywhere, tau
    included (tau_ptr is overwritten there)."""
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(logp_s_ptr + row, 0.0)
        tl.store(entropy_s_ptr + row, 0.0)
        tl.store(lse_s_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(size_ptr + row, 0.0)
        tl.store(added_ptr + row, 0.0)
        tl.store(tau_ptr + row, 0.0)
    else:
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        tau = tl.load(tau_ptr + row)
        scale = x_scale * LOG2E
        cols = tl.arange(0, BLOCK_V)
        m2 = tl.full([], M_START, tl.float32)
        d = tl.zeros([BLOCK_V], dtype=tl.float32)
        w = tl.zeros([BLOCK_V], dtype=tl.float32)
        d_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        w_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        size = tl.zeros([BLOCK_V], dtype=tl.float32)
        full_stop = vocab // BLOCK_V * BLOCK_V
        for block in range(0, full_stop, BLOCK_V):
            x = tl.load(row_ptr + block + cols).to(tl.float32)
            m2, d, w, d_s, w_s, size = _support_step(x, above_threshold(x * x_scale, tau), m2, d, w, d_s, w_s,
                                                     size, scale)
        if full_stop < vocab:
            offs = full_stop + cols
            x = tl.load(row_ptr + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32)
            keep = above_threshold(x * x_scale, tau) & (offs < vocab)
            m2, d, w, d_s, w_s, size = _support_step(x, keep, m2, d, w, d_s, w_s, size, scale)
        d_s = tl.sum(d_s, axis=0)
        w_s = tl.sum(w_s, axis=0)
        count = tl.sum(size, axis=0)
        in_range = (target >= 0) & (target < vocab)
        target_x = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)
        target_z = target_x * x_scale
        added = target_z < tau  # NaN (out of range): not added
        if added:  # the target joins S: its term relative to the shared max
            t = target_x * scale - m2
            e = tl.exp2(t)
            d_s += e
            w_s += e * tl.maximum(t, T_FLOOR)
            count += 1.0
        m = m2 * LN2
        lse, entropy = finish(m, tl.sum(d, axis=0), tl.sum(w, axis=0))
        lse_s, entropy_s = finish(m, d_s, w_s)
        tl.store(logp_s_ptr + row, target_z - lse_s)
        tl.store(entropy_s_ptr + row, entropy_s)
        tl.store(lse_s_ptr + row, lse_s)
        tl.store(logp_ptr + row, target_z - lse)
        tl.store(entropy_ptr + row, entropy)
        tl.store(lse_ptr + row, lse)
        tl.store(size_ptr + row, count)
        tl.store(added_ptr + row, added.to(tl.float32))


@triton.jit
def support_bwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    grad_ptr, grad_stride_outer, grad_stride_inner,
    targets_ptr, tau_ptr, lse_s_ptr, entropy_s_ptr, lse_ptr, entropy_ptr,
    grad_logp_s_ptr, grad_entropy_s_ptr, grad_logp_ptr, grad_entropy_ptr,
    vocab, chunk, x_scale, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Grid (rows, chunks of V): dlogits = the whole row's term + the term over S (zero outside S), one exp2 per
    element (online_softmax.grad_terms_support); the one-hot term of both logps lands on the target column in the
    loop (no patch after it). Absent gradients come as zeros."""
    row = tl.program_id(0)
    start = tl.program_id(1) * chunk
    stop = tl.minimum(start + chunk, vocab)
    target = tl.load(targets_ptr + row).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
    grad_row_ptr = grad_ptr + row_offset(row, inner, grad_stride_outer, grad_stride_inner)
    out_ty = grad_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        for block in range(start, stop, BLOCK_V):
            offs = block + cols
            tl.store(grad_row_ptr + offs, tl.zeros([BLOCK_V], dtype=out_ty), mask=offs < stop)
    else:
        scale = x_scale * LOG2E
        tau = tl.load(tau_ptr + row)
        lse2 = tl.load(lse_ptr + row) * LOG2E
        delta = lse2 - tl.load(lse_s_ptr + row) * LOG2E
        ratio = tl.exp2(delta)
        g_logp = tl.load(grad_logp_ptr + row)
        g_ent = tl.load(grad_entropy_ptr + row)
        g_logp_s = tl.load(grad_logp_s_ptr + row)
        g_ent_s = tl.load(grad_entropy_s_ptr + row)
        a = -g_ent * LN2 * x_scale
        b = -(g_logp + g_ent * tl.load(entropy_ptr + row)) * x_scale
        a_s = -g_ent_s * LN2 * x_scale
        b_s = -(g_logp_s + g_ent_s * tl.load(entropy_s_ptr + row)) * x_scale
        one_hot = (g_logp + g_logp_s) * x_scale
        for block in range(start, stop, BLOCK_V):
            offs = block + cols
            inside = offs < stop
            x = tl.load(row_ptr + offs, mask=inside, other=-float("inf")).to(tl.float32)
            keep = in_support(x * x_scale, tau, offs, target)
            grad = grad_terms_support(x * scale - lse2, keep, delta, ratio, a, b, a_s, b_s)
            grad += tl.where(offs == target, one_hot, 0.0)
            tl.store(grad_row_ptr + offs, grad.to(out_ty), mask=inside)


# Replay mode: S = the recorded ids (sorted per row on the host, -1 padding first, so a repeated id is the one
# equal to its left neighbour and counts once) plus the target. These kernels read only the K kept logits of a
# row; the whole row's state, where wanted, comes from the plain kernels (the one pass over V).

@triton.jit
def _replay_block(row_ptr, ids_row_ptr, k, block, target, vocab, BLOCK_K: tl.constexpr):
    """One block of a row's sorted kept ids: (x at the first copy of each id, -inf elsewhere; the first-copy
    mask; whether the target is among them). An id past the row (unchecked input) is never read."""
    offs = block + tl.arange(0, BLOCK_K)
    ids = tl.load(ids_row_ptr + offs, mask=offs < k, other=-1).to(tl.int64)
    prev = tl.load(ids_row_ptr + offs - 1, mask=(offs > 0) & (offs < k), other=-1).to(tl.int64)
    first = (ids >= 0) & (ids < vocab) & (ids != prev)
    x = tl.load(row_ptr + ids, mask=first, other=-float("inf")).to(tl.float32)
    return x, first, tl.sum((first & (ids == target)).to(tl.int32), axis=0) > 0


@triton.jit
def _fold_natural(z, m, d, w):
    """Fold a block of scaled logits z (-inf in masked lanes) into (m, d, w) of online_softmax.py with m kept in
    natural units (block-wide) and t = z log2(e) - m log2(e): the replay kernels' form, in which the backward's
    t = (z - lse) log2(e) is exactly 0 at the only token of a one-token set."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    if m_new > m:
        d, w = rebase(m, d, w, m_new)
        m = m_new
    e, et = terms(z * LOG2E - m * LOG2E)
    return m, d + e, w + et


@triton.jit
def replay_fwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    targets_ptr, ids_ptr, logp_s_ptr, entropy_s_ptr, lse_s_ptr, size_ptr,
    vocab, k, x_scale, ignore_index,
    BLOCK_K: tl.constexpr,
):
    """One program per row: the state over S from the K kept logits (a gather), then logp, H, lse over S and |S|.
    A target outside the ids (check_targets=False) is added to S, as the torch backend does; out of [0, V) it
    gives NaN logp. An ignored row gets 0."""
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(logp_s_ptr + row, 0.0)
        tl.store(entropy_s_ptr + row, 0.0)
        tl.store(lse_s_ptr + row, 0.0)
        tl.store(size_ptr + row, 0.0)
    else:
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        ids_row_ptr = ids_ptr + row.to(tl.int64) * k
        m = tl.full([], M_START, tl.float32)
        d = tl.zeros([BLOCK_K], dtype=tl.float32)
        w = tl.zeros([BLOCK_K], dtype=tl.float32)
        size = tl.zeros([], dtype=tl.int32)
        has_target = tl.zeros([], dtype=tl.int32)
        for block in range(0, k, BLOCK_K):
            x, first, found = _replay_block(row_ptr, ids_row_ptr, k, block, target, vocab, BLOCK_K)
            m, d, w = _fold_natural(x * x_scale, m, d, w)
            size += tl.sum(first.to(tl.int32), axis=0)
            has_target |= found.to(tl.int32)
        in_range = (target >= 0) & (target < vocab)
        target_z = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32) * x_scale
        if (has_target == 0) & in_range:  # the target joins S
            lane = tl.arange(0, BLOCK_K)
            m, d, w = _fold_natural(tl.where(lane == 0, target_z, -float("inf")), m, d, w)
            size += 1
        d = tl.sum(d, axis=0)
        lse, entropy = finish(m, d, tl.sum(w, axis=0))
        # Relative to the max, in base 2: a set of one token has logp = H = 0 exactly, and lse = its z
        tl.store(logp_s_ptr + row, (target_z * LOG2E - m * LOG2E - tl.log2(d)) * LN2)
        tl.store(entropy_s_ptr + row, entropy)
        tl.store(lse_s_ptr + row, lse)
        tl.store(size_ptr + row, size.to(tl.float32))


@triton.jit
def replay_bwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    grad_ptr, grad_stride_outer, grad_stride_inner,
    targets_ptr, ids_ptr, lse_s_ptr, entropy_s_ptr, grad_logp_s_ptr, grad_entropy_s_ptr,
    vocab, k, x_scale, ignore_index,
    ACCUMULATE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: the gradient over S at the K kept logits (and the target's one-hot term), stored at
    those ids (ACCUMULATE: added to what the plain backward wrote there, the whole row's term; else into zeros).
    Each kept id is written once (repeated ids skipped), so no two lanes touch one element."""
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target != ignore_index:
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        grad_row_ptr = grad_ptr + row_offset(row, inner, grad_stride_outer, grad_stride_inner)
        ids_row_ptr = ids_ptr + row.to(tl.int64) * k
        out_ty = grad_ptr.dtype.element_ty
        lse2 = tl.load(lse_s_ptr + row) * LOG2E
        g_logp = tl.load(grad_logp_s_ptr + row)
        g_ent = tl.load(grad_entropy_s_ptr + row)
        a = -g_ent * LN2 * x_scale
        b = -(g_logp + g_ent * tl.load(entropy_s_ptr + row)) * x_scale
        one_hot = g_logp * x_scale
        has_target = tl.zeros([], dtype=tl.int32)
        for block in range(0, k, BLOCK_K):
            offs = block + tl.arange(0, BLOCK_K)
            ids = tl.load(ids_row_ptr + offs, mask=offs < k, other=-1).to(tl.int64)
            x, first, found = _replay_block(row_ptr, ids_row_ptr, k, block, target, vocab, BLOCK_K)
            grad = grad_terms((x * x_scale) * LOG2E - lse2, a, b) + tl.where(ids == target, one_hot, 0.0)
            if ACCUMULATE:
                grad += tl.load(grad_row_ptr + ids, mask=first, other=0.0).to(tl.float32)
            tl.store(grad_row_ptr + ids, grad.to(out_ty), mask=first)
            has_target |= found.to(tl.int32)
        if (has_target == 0) & (target >= 0) & (target < vocab):  # the target added to S
            target_x = tl.load(row_ptr + target).to(tl.float32)
            grad = grad_terms((target_x * x_scale) * LOG2E - lse2, a, b) + one_hot
            if ACCUMULATE:
                grad += tl.load(grad_row_ptr + target).to(tl.float32)
            tl.store(grad_row_ptr + target, grad.to(out_ty))


# ---------------------------------------------------------------- launchers

def _prune(configs, named_args, **kwargs):
    """Blocks wider than the chunk only add masked lanes; keep at least the smallest candidate."""
    width = triton.next_power_of_2(max(int(named_args.get("chunk", named_args["vocab"])), 1))
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= max(width, 2048)]
    return kept or configs[:1]


def build_launchers(autotune: bool, configs=CONFIGS, do_bench=None):
    """(forward, split-forward partial, backward) launchers: the kernels themselves, or autotuners over
    `configs`. `do_bench` replaces Triton's GPU timer (tests tune under the interpreter with a CPU one)."""
    if not autotune:
        return logprobs_entropy_fwd_kernel, logprobs_entropy_partial_kernel, logprobs_entropy_bwd_kernel
    candidates = [triton.Config({"BLOCK_V": block}, num_warps=warps, num_stages=stages)
                  for block, warps, stages in configs]
    tune = dict(prune_configs_by={"early_config_prune": _prune}, do_bench=do_bench)
    return (
        triton.autotune(candidates, key=["vocab"], **tune)(logprobs_entropy_fwd_kernel),
        triton.autotune(candidates, key=["vocab", "chunk"], **tune)(logprobs_entropy_partial_kernel),
        # restore_value: tuning runs the kernel several times, and an in-place gradient overwrites the logits.
        triton.autotune(candidates, key=["vocab", "chunk"], restore_value=["grad_ptr"], **tune)(
            logprobs_entropy_bwd_kernel),
    )


_fwd, _partial, _bwd = build_launchers(AUTOTUNE)


def _fixed_config(width: int) -> dict:
    """The one configuration without autotuning (the interpreter cannot tune): the widest block up to
    MAX_BLOCK_V; {} when the autotuner picks."""
    if AUTOTUNE:
        return {}
    return {"BLOCK_V": min(MAX_BLOCK_V, triton.next_power_of_2(max(width, 1))), "num_warps": DEFAULT_WARPS}


def _split_threshold(device) -> int:
    if SPLIT_BELOW_ROWS is not None:
        return SPLIT_BELOW_ROWS
    if device.type == "cuda":
        return 2 * 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 0


def n_chunks(n_rows: int, vocab: int, device) -> int:
    """How many chunks of V each row is split into: 1 unless the rows alone leave the GPU idle.
    A power of two (few distinct autotune keys), and no chunk under MIN_CHUNK."""
    threshold = _split_threshold(device)
    if n_rows == 0 or n_rows >= threshold:
        return 1
    wanted = triton.next_power_of_2(triton.cdiv(threshold, n_rows))
    while wanted > 1 and triton.cdiv(vocab, wanted) < MIN_CHUNK:
        wanted //= 2
    return wanted


def _chunk_size(vocab: int, chunks: int) -> int:
    return vocab if chunks == 1 else triton.cdiv(triton.cdiv(vocab, chunks), 256) * 256  # 16-byte aligned starts


def _softcap_meta(tr) -> dict:
    """HAS_SOFTCAP only where set: the plain head's launches (and autotune caches) stay those of before."""
    return {"HAS_SOFTCAP": True} if tr.has_softcap else {}


def forward(layout, targets: torch.Tensor, inv_temperature: float, ignore_index: int, logit_scale: float = 1.0,
            softcap=None):
    """Flat float32 (logp, entropy, lse), each [N], for the rows described by `layout` (a RowLayout)."""
    tr = logit_transform(inv_temperature, logit_scale, softcap)
    logits = layout.tensor
    logp = torch.empty(layout.n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if not layout.n_rows:
        return logp, entropy, lse
    rows = (logits, layout.stride_outer, layout.stride_inner, layout.inner)
    chunks = n_chunks(layout.n_rows, layout.vocab, logits.device)
    if chunks == 1:
        fixed = _fixed_config(layout.vocab)
        _fwd[(layout.n_rows,)](*rows, targets, logp, entropy, lse, layout.vocab, tr.x_scale, tr.cap_in, ignore_index,
                               **fixed, **_softcap_meta(tr))
        return logp, entropy, lse
    chunk = _chunk_size(layout.vocab, chunks)
    chunks = triton.cdiv(layout.vocab, chunk)
    state = torch.empty((layout.n_rows, chunks, 3), dtype=torch.float32, device=logits.device)
    fixed = _fixed_config(chunk)
    _partial[(layout.n_rows, chunks)](*rows, targets, state, layout.vocab, chunk, chunks, tr.x_scale, tr.cap_in,
                                      ignore_index, **fixed, **_softcap_meta(tr))
    logprobs_entropy_merge_kernel[(layout.n_rows,)](
        *rows, targets, state, logp, entropy, lse, layout.vocab, chunks, tr.x_scale, tr.cap_in, ignore_index,
        BLOCK_CHUNKS=triton.next_power_of_2(chunks), num_warps=1, **_softcap_meta(tr),
    )
    return logp, entropy, lse


def backward(layout, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, grad_layout,
             logit_scale: float = 1.0, softcap=None):
    """Write dlogits into grad_layout.tensor (which may be layout.tensor itself: the in-place gradient)."""
    tr = logit_transform(inv_temperature, logit_scale, softcap)
    if not layout.n_rows:
        return
    chunk = _chunk_size(layout.vocab, n_chunks(layout.n_rows, layout.vocab, layout.tensor.device))
    fixed = _fixed_config(chunk)
    _bwd[(layout.n_rows, triton.cdiv(layout.vocab, chunk))](
        layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner,
        grad_layout.tensor, grad_layout.stride_outer, grad_layout.stride_inner,
        targets, lse, entropy,
        grad_logp if grad_logp is not None else lse, grad_entropy if grad_entropy is not None else lse,
        layout.vocab, chunk, tr.x_scale, tr.cap_in, tr.grad_scale, ignore_index,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None, **fixed, **_softcap_meta(tr),
    )


def thresholds(layout, inv_temperature: float, support) -> torch.Tensor:
    """tau [N] float32 of the recompute mode: erpo/ops/support.py threshold over row chunks of x = logits / T (the
    float32 product the torch backend forms, so both backends keep the same S); no [N, V] temporary, no sync.
    Chunks of THRESHOLD_CHUNK_ELEMENTS (the select's temporaries are about 50 bytes per logit)."""
    from erpo.ops.support import threshold
    from erpo.ops.torch_logprobs_entropy import row_chunks

    tau = torch.empty(layout.n_rows, dtype=torch.float32, device=layout.tensor.device)
    if not layout.n_rows:
        return tau
    for rows, chunk in row_chunks(layout, layout.tensor, THRESHOLD_CHUNK_ELEMENTS):
        x = chunk.reshape(-1, chunk.shape[-1]).to(torch.float32, copy=True).mul_(inv_temperature)
        tau[rows] = threshold(x, support)
    return tau


def sorted_ids(ids: torch.Tensor) -> torch.Tensor:
    """[N, K] kept ids sorted per row (padding -1 first, repeats adjacent), int64, contiguous: the replay kernels'
    form (O(N K log K), no [N, V] tensor)."""
    return ids.long().sort(dim=-1).values.contiguous()


def _block_k(k: int) -> int:
    return min(REPLAY_BLOCK_K, triton.next_power_of_2(max(k, 1)))


def replay_forward(layout, targets, inv_temperature: float, ignore_index: int, ids):
    """Flat float32 [N] (logp, H, lse) over the replayed S and |S|, from the K kept logits of each row only."""
    outs = [torch.empty(layout.n_rows, dtype=torch.float32, device=layout.tensor.device) for _ in range(4)]
    if layout.n_rows:
        ids = sorted_ids(ids)
        replay_fwd_kernel[(layout.n_rows,)](
            layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner, targets, ids, *outs,
            layout.vocab, ids.shape[-1], 1.0 * inv_temperature, ignore_index, BLOCK_K=_block_k(ids.shape[-1]),
            num_warps=4)
    return tuple(outs)


def replay_backward(layout, targets, ids, lse_s, entropy_s, grad_logp_s, grad_entropy_s, inv_temperature: float,
                    ignore_index: int, grad_layout, accumulate: bool) -> None:
    """The gradient over the replayed S, written at the kept ids of grad_layout.tensor (added to what is there
    with `accumulate`; the caller zeroes the rest otherwise). None gradients are zeros."""
    if not layout.n_rows:
        return
    zeros = torch.zeros_like(lse_s, dtype=torch.float32)
    ids = sorted_ids(ids)
    replay_bwd_kernel[(layout.n_rows,)](
        layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner,
        grad_layout.tensor, grad_layout.stride_outer, grad_layout.stride_inner,
        targets, ids, lse_s.float().contiguous(), entropy_s.float().contiguous(),
        *(zeros if g is None else g.float().contiguous() for g in (grad_logp_s, grad_entropy_s)),
        layout.vocab, ids.shape[-1], 1.0 * inv_temperature, ignore_index, ACCUMULATE=accumulate,
        BLOCK_K=_block_k(ids.shape[-1]), num_warps=4)


def forward_support(layout, targets, inv_temperature: float, ignore_index: int, support, ids):
    """Flat float32 [N] (logp, H, lse) over S, the same over the whole row, tau, |S| and the target-added flag:
    erpo/ops/torch_logprobs_entropy.py forward_support's outputs, from one read of each row. Replay (ids): the
    plain forward for the whole row, and the K kept logits gathered for S (tau NaN, nothing added)."""
    if ids is not None:
        logp, h, lse = forward(layout, targets, inv_temperature, ignore_index)
        logp_s, h_s, lse_s, size = replay_forward(layout, targets, inv_temperature, ignore_index, ids)
        ignored = targets == ignore_index
        tau = torch.full_like(lse, float("nan")).masked_fill_(ignored, 0.0)
        return logp_s, h_s, lse_s, logp, h, lse, tau, size, torch.zeros_like(lse)
    tau = thresholds(layout, inv_temperature, support)
    outs = [torch.empty(layout.n_rows, dtype=torch.float32, device=layout.tensor.device) for _ in range(8)]
    if layout.n_rows:
        logp_s, h_s, lse_s, logp, h, lse, size, added = outs
        support_fwd_kernel[(layout.n_rows,)](
            layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner, targets, tau,
            logp_s, h_s, lse_s, logp, h, lse, size, added, layout.vocab, 1.0 * inv_temperature, ignore_index,
            **_support_config(layout.vocab, SUPPORT_FWD_BLOCK_V))
    return (*outs[:6], tau, *outs[6:])


def backward_support(layout, targets, saved, grads, inv_temperature: float, ignore_index: int, ids,
                     grad_layout) -> None:
    """dlogits for the gradients (g_logp_S, g_H_S, g_logp, g_H) of forward_support's outputs (None: zero), written
    into grad_layout.tensor; `saved` = (lse_S, H_S, lse, H, tau). Replay (ids): the plain backward for the whole
    row's term (or zeros), then the term over S added at the K kept ids."""
    if not layout.n_rows:
        return
    if ids is not None:
        lse_s, h_s, lse, h, _ = saved
        if grads[2] is None and grads[3] is None:
            grad_layout.tensor.zero_()
        else:
            backward(layout, targets, lse, h, grads[2], grads[3], inv_temperature, ignore_index, grad_layout)
        replay_backward(layout, targets, ids, lse_s, h_s, grads[0], grads[1], inv_temperature, ignore_index,
                        grad_layout, accumulate=True)
        return
    lse_s, h_s, lse, h, tau = (t.float().contiguous() for t in saved)
    zeros = None
    flat = []
    for g in grads:
        if g is None:
            zeros = torch.zeros_like(lse) if zeros is None else zeros
        flat.append(zeros if g is None else g.float().contiguous())
    chunk = _chunk_size(layout.vocab, n_chunks(layout.n_rows, layout.vocab, layout.tensor.device))
    support_bwd_kernel[(layout.n_rows, triton.cdiv(layout.vocab, chunk))](
        layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner,
        grad_layout.tensor, grad_layout.stride_outer, grad_layout.stride_inner,
        targets, tau, lse_s, h_s, lse, h, *flat, layout.vocab, chunk, 1.0 * inv_temperature, ignore_index,
        **_support_config(chunk, CONFIGS[0][0]))


def _support_config(width: int, block: int) -> dict:
    """The support kernels are not autotuned: `block` (SUPPORT_FWD_BLOCK_V, or the first candidate's for the
    backward) with the first candidate's warps, narrower for a narrow row (or a lowered MAX_BLOCK_V)."""
    return {"BLOCK_V": min(block, MAX_BLOCK_V, triton.next_power_of_2(max(width, 1))), "num_warps": CONFIGS[0][1]}
