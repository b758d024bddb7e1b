"""Triton kernels of the fused op: per-row log-prob of the target and entropy of softmax(logits / T).

Memory-bound plan (one program per row, 1-D grid so any number of rows launches):
  forward   reads the row once (V elements) and writes 3 floats (logp, entropy, lse).
            Online softmax in fp32 registers: a running max m per row and, per lane, d = sum e^(x-m) and
            w = sum e^(x-m)(x-m), rescaled when m moves. Everything stays relative to the max, so large
            bf16 logits lose no precision, and one exp per element is paid.
  backward  reads the row once and writes the gradient once (in the logits' dtype, possibly in place):
            dx_j = (g_logp (1[j=y] - p_j) - g_ent p_j (x_j - E_p[x])) / T, with p and E_p[x] = lse - H
            recomputed from the two saved floats; p_j = 0 gives exactly 0 (never 0 * -inf).
Row offsets are int64 (N * V overflows int32 at 8 x 4k x 150k); temperature and ignore_index are runtime
arguments (no recompile per value); rows are addressed with two strides, so `logits[:, :-1]` needs no copy.
"""
import torch
import triton
import triton.language as tl

# Largest block over V one program holds in registers per loop step; tests lower it to exercise the
# multi-block path (and the rescaling of the running max) on small vocabularies.
MAX_BLOCK_V = 4096


@triton.jit
def _row_offset(row, inner, stride_outer, stride_inner):
    row = row.to(tl.int64)
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def logprobs_entropy_fwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    vocab, inv_temperature, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row).to(tl.int64)
    logp = tl.full([], 0.0, tl.float32)
    entropy = tl.full([], 0.0, tl.float32)
    lse = tl.full([], 0.0, tl.float32)
    if target != ignore_index:  # ignored rows are never read: logp = entropy = 0
        row_ptr = logits_ptr + _row_offset(row, inner, stride_outer, stride_inner)
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([], -float("inf"), tl.float32)  # running row max
        d = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane sum e^(x - m)
        w = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane sum e^(x - m) (x - m)
        bad = tl.zeros([BLOCK_V], dtype=tl.int32)  # NaN or +inf seen: the row's outputs become NaN
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32) * inv_temperature
            bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # Until a finite value is seen m_new is -inf: shift by 0 then (d and w are still 0).
            shift = tl.where(m_new > -float("inf"), m_new, 0.0)
            scale = tl.exp(m - shift)
            live = x > -float("inf")
            xm = tl.where(live, x - shift, 0.0)
            e = tl.where(live, tl.exp(xm), 0.0)
            w = scale * (w + d * tl.where(m > -float("inf"), m - shift, 0.0)) + e * xm
            d = d * scale + e
            m = m_new
        shift = tl.where(m > -float("inf"), m, 0.0)
        denom = tl.sum(d, axis=0)
        log_denom = tl.log(denom)
        lse = shift + log_denom
        row_bad = tl.max(bad, axis=0) > 0
        entropy = tl.where(row_bad, float("nan"), log_denom - tl.sum(w, axis=0) / denom)
        # An out-of-range id (possible only with check_targets=False) gives NaN, never a read outside the row.
        in_range = (target >= 0) & (target < vocab)
        target_x = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32) * inv_temperature
        logp = tl.where(row_bad, float("nan"), target_x - lse)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit
def logprobs_entropy_bwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner,
    grad_ptr, grad_stride_outer, grad_stride_inner,
    targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    vocab, inv_temperature, ignore_index,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, inner, stride_outer, stride_inner)
    grad_row_ptr = grad_ptr + _row_offset(row, inner, grad_stride_outer, grad_stride_inner)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:  # zero gradient, without reading the row
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            tl.store(grad_row_ptr + offs, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=offs < vocab)
    else:
        lse = tl.load(lse_ptr + row)
        mean_x = lse - tl.load(entropy_ptr + row)  # E_p[x] = lse - H
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs, mask=in_row, other=-float("inf")).to(tl.float32) * inv_temperature
            p = tl.exp(x - lse)
            grad = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_GRAD_LOGP:
                g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
                grad = g_logp * (tl.where(offs == target, 1.0, 0.0) - p)
            if HAS_GRAD_ENTROPY:
                g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
                grad -= g_ent * p * tl.where(x > -float("inf"), x - mean_x, 0.0)
            tl.store(grad_row_ptr + offs, (grad * inv_temperature).to(grad_ptr.dtype.element_ty), mask=in_row)


def _block_and_warps(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 1)))
    return block, (8 if block >= 2048 else 4)


def forward(layout, targets: torch.Tensor, inv_temperature: float, ignore_index: int):
    """Flat float32 (logp, entropy, lse), each [N], for the rows described by `layout` (a RowLayout)."""
    logits = layout.tensor
    logp = torch.empty(layout.n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if layout.n_rows:
        block, warps = _block_and_warps(layout.vocab)
        logprobs_entropy_fwd_kernel[(layout.n_rows,)](
            logits, layout.stride_outer, layout.stride_inner, layout.inner,
            targets, logp, entropy, lse,
            layout.vocab, inv_temperature, ignore_index,
            BLOCK_V=block, num_warps=warps,
        )
    return logp, entropy, lse


def backward(layout, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, grad_layout):
    """Write dlogits into grad_layout.tensor (which may be layout.tensor itself: the in-place gradient)."""
    if not layout.n_rows:
        return
    block, warps = _block_and_warps(layout.vocab)
    logprobs_entropy_bwd_kernel[(layout.n_rows,)](
        layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner,
        grad_layout.tensor, grad_layout.stride_outer, grad_layout.stride_inner,
        targets, lse, entropy,
        grad_logp if grad_logp is not None else lse, grad_entropy if grad_entropy is not None else lse,
        layout.vocab, inv_temperature, ignore_index,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_V=block, num_warps=warps,
    )
