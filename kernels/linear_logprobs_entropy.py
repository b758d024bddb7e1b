"""Triton kernels of the fused LM head: hidden states x weight -> log-prob of the target, entropy and lse per row.

z = (hidden @ weight.T + bias) * inv_temperature is only ever held as a [BLOCK_N, BLOCK_V] fp32 tile in
registers (tl.dot over BLOCK_H slices of H); no logits tile is written to global memory.

Memory plan (N rows, V vocabulary, H hidden size, S vocabulary splits):
  forward   grid (N / BLOCK_N, S). Each program sweeps its 1/S of the vocabulary in BLOCK_V tiles and keeps
            an online softmax state per row in registers (online_softmax.py: m = max z and base-2 sums d, w)
            and the target's z. It writes that state once: 4 x S x N floats of scratch
            (NaN and +inf need no flag: they make d NaN). A second tiny kernel merges the S states of
            each row (the merge is associative: states of disjoint vocabulary parts combine exactly) and writes
            logp, entropy, lse [N] f32. S > 1 only when N / BLOCK_N programs cannot fill the GPU.
  backward  two kernels, each recomputing the logits tiles (tl.dot over H again), forming dlogits in registers
            and accumulating one gradient into float32 buffers it alone owns:
              grad_hidden kernel, grid N / BLOCK_N: sweeps V; per V tile, grad_hidden[rows, :] += dlogits @ W
                (read-add-write of its own [BLOCK_N, BLOCK_H] slices, L2-resident).
              grad_weight kernel, grid V / BLOCK_V: sweeps N; per N tile, grad_weight[cols, :] += dlogits.T @ h,
                grad_bias[cols] in registers, stored once.
            Full-size memory: the three gradients (grad_hidden [N, H], grad_weight [V, H], grad_bias [V], f32)
            and nothing else; never [N, V].
  Why not fp32 atomics (as Apple's cut-cross-entropy does, one kernel, 3 GEMM-equivalents): atomic float sums
  depend on scheduling, so grad_weight would differ bit-wise between identical runs, and erpo's trainer promises
  bit-identical resumes. The deterministic split costs one extra recompute GEMM (4 GEMM-equivalents in the
  backward instead of 3; predicted, not measured: no GPU here).

Numerics: every tl.dot accumulates in fp32. fp32 inputs use input_precision="ieee" (never tf32), so the
results match the torch backend to fp32 rounding. bf16/fp16 heads: the logits are fp32 accumulations of the
16-bit inputs; the gradient dots take dlogits rounded to the input dtype (tensor cores; the torch backend
does the same), accumulating in fp32.
Rows: hidden rows are addressed with two strides (RowLayout), so `hidden[:, :-1]` is read in place; offsets are
int64. Rows whose target == ignore_index are not loaded (a tile of only such rows is skipped entirely) and get
logp = entropy = lse = 0 and zero gradient. NaN policy: a row whose logits hold NaN or +inf gives NaN in that
row's outputs only (and NaN gradients from it); -inf logits take no part in the softmax; an out-of-range
target gives NaN logp. Temperature and ignore_index are runtime arguments (no recompile per value), as are a
logit scale and a soft cap (online_softmax.transform applied to each logits tile; a soft cap compiles its own
variant, HAS_SOFTCAP). fp32 head (FP32_HEAD, `head_fp32=True`): 16-bit hidden/weight tiles are upcast as loaded
and the dots run in fp32 ("ieee") with dlogits kept in fp32, at the fp32 tiles; no fp32 copy of the weight.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from erpo.kernels.online_softmax import (LN2, LOG2E, M_START, finish, grad_terms, merge, rebase, row_offset,
                                          terms, transform, transform_grad)
from erpo.ops.row_stats import logit_transform

# Tile sizes per input dtype: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages). The GPU ones are the largest
# of those tried that ptxas compiles without spills for sm_80 and sm_90 (bench/compile_for_gpu.py
# reports registers, spills and shared memory; `python -m bench.static` fails on any spill); fp32 dots run on
# FMA units ("ieee"), hence smaller tiles (BLOCK_V 64 made ptxas 12.8 spill 24 B in the fp32 grad_weight
# kernel for sm_80). Not tuned on a GPU. The interpreter runs each tile as numpy: small tiles keep tests fast.
# Tests override TILES.
GPU_TILES = {
    torch.bfloat16: (128, 64, 64, 8, 3),
    torch.float16: (128, 64, 64, 8, 3),
    torch.float32: (32, 32, 32, 4, 2),
}
INTERPRETER_TILES = (16, 32, 16, 4, 1)
TILES: Optional[tuple] = None  # fixed (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) for every dtype
SPLIT_V: Optional[int] = None  # fixed number of vocabulary splits in the forward instead of the heuristic
PROGRAMS_PER_SM = 4  # the forward splits V until it has about this many programs per SM
MERGE_BLOCK = 256
STATE_FIELDS = 4  # m, d, w (online_softmax.py) and the target's z (NaN where this split does not hold it)


# Triton 3.7's interpreter multiplies bf16 tiles as their raw uint16 bits in tl.dot. Under the interpreter the
# operands are widened to fp32 first: bf16 products are exact in fp32, so the sums are the same up to order.
_WIDEN_DOT_OPERANDS = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if _WIDEN_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _operand(x, FP32_HEAD: tl.constexpr):
    """A loaded hidden/weight tile as the dots take it: upcast to fp32 in the fp32 head (tile by tile: no fp32
    copy of the weight ever exists), as stored otherwise."""
    if FP32_HEAD:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _logits_tile(hidden_ptr, row_off, load_rows, weight_ptr, bias_ptr, cols, col_ok, hidden_size,
                 x_scale, cap_in, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 FP32_HEAD: tl.constexpr):
    """x[BLOCK_N, BLOCK_V] in fp32, the softmax's input x_scale * transform(h @ W.T + b) (online_softmax.transform;
    (h @ W.T + b) / T for the plain head); columns past V are -inf, rows not loaded compute from zeros."""
    ks = tl.arange(0, BLOCK_H)
    w_cols = cols.to(tl.int64) * hidden_size
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_H):
        k = k0 + ks
        k_ok = k < hidden_size
        h = tl.load(hidden_ptr + row_off[:, None] + k[None, :], mask=load_rows[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(weight_ptr + w_cols[None, :] + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(_operand(h, FP32_HEAD), _operand(w_t, FP32_HEAD), acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], transform(acc, cap_in, HAS_SOFTCAP) * x_scale, -float("inf"))


@triton.jit
def _dlogits_tile(z, cols, col_ok, active, target, lse, entropy, g_logp, g_ent, x_scale, grad_scale,
                  HAS_GRAD_LOGP: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The gradient w.r.t. the head's logits y of the tile whose softmax input is z: dz grad_scale f'
    (online_softmax.transform_grad at u = z / x_scale; 1 / T for the plain head), zero outside the vocabulary
    and on ignored rows; dz is online_softmax.grad_terms at t = (z - lse) log2(e), plus the one-hot term."""
    a = -g_ent * LN2
    b = -(g_logp + g_ent * entropy)
    dz = grad_terms((z - lse[:, None]) * LOG2E, a[:, None], b[:, None])
    if HAS_GRAD_LOGP:
        dz += tl.where(cols[None, :] == target[:, None], g_logp[:, None], 0.0)
    dz = dz * grad_scale
    if HAS_SOFTCAP:
        dz *= transform_grad(z * (1.0 / x_scale), HAS_SOFTCAP)
    return tl.where(active[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def _dlogits_operand(dz, weight_ptr, FP32_HEAD: tl.constexpr):
    """dlogits as the gradient dots take them: rounded to the weight's dtype (tensor cores), fp32 in the fp32 head."""
    if FP32_HEAD:
        return dz
    else:
        return dz.to(weight_ptr.dtype.element_ty)


@triton.jit
def _row_gradients(rows, active, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, BLOCK_N: tl.constexpr,
                   HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    """(lse, entropy, g_logp, g_entropy) of a row tile; an absent incoming gradient is 0."""
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
    g_logp = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_ent = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + rows, mask=active, other=0.0)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + rows, mask=active, other=0.0)
    return lse, entropy, g_logp, g_ent


@triton.jit
def linear_stats_fwd_kernel(
    hidden_ptr, stride_outer, stride_inner, inner,
    weight_ptr, bias_ptr, targets_ptr, state_ptr,
    n_rows, n_states, hidden_size, vocab, v_per_split, x_scale, cap_in, ignore_index,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr = False, FP32_HEAD: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    active = row_ok & (target != ignore_index)
    row_off = row_offset(rows, inner, stride_outer, stride_inner)
    m = tl.full([BLOCK_N], M_START, tl.float32)
    d = tl.zeros([BLOCK_N], dtype=tl.float32)
    w = tl.zeros([BLOCK_N], dtype=tl.float32)
    target_z = tl.full([BLOCK_N], float("nan"), tl.float32)
    if tl.max(active.to(tl.int32), axis=0) > 0:  # a tile of ignored rows costs nothing
        v_begin = split * v_per_split
        v_end = tl.minimum(v_begin + v_per_split, vocab)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            z = _logits_tile(hidden_ptr, row_off, active, weight_ptr, bias_ptr, cols, col_ok, hidden_size,
                             x_scale, cap_in, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, HAS_SOFTCAP,
                             FP32_HEAD)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            d, w = rebase(m, d, w, m_new)
            m = m_new
            e, et = terms((z - m[:, None]) * LOG2E)  # exactly 0 at the max: d = 1 for a one-id vocabulary
            d += tl.sum(e, axis=1)
            w += tl.sum(et, axis=1)
            # The target's lane in this tile (-1: not here), compared in int32 over the tile, not int64.
            in_tile = (target >= v0) & (target < tl.minimum(v0 + BLOCK_V, v_end))
            target_lane = tl.where(in_tile, target - v0, -1).to(tl.int32)
            hit = tl.arange(0, BLOCK_V)[None, :] == target_lane[:, None]
            target_z = tl.where(in_tile, tl.sum(tl.where(hit, z, 0.0), axis=1), target_z)
    out = state_ptr + split.to(tl.int64) * n_rows + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_states, d, mask=row_ok)
    tl.store(out + 2 * n_states, w, mask=row_ok)
    tl.store(out + 3 * n_states, target_z, mask=row_ok)


@triton.jit
def linear_stats_merge_kernel(
    state_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr, n_rows, n_splits, n_states, ignore_index,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    m = tl.full([BLOCK], M_START, tl.float32)
    d = tl.zeros([BLOCK], dtype=tl.float32)
    w = tl.zeros([BLOCK], dtype=tl.float32)
    target_z = tl.full([BLOCK], float("nan"), tl.float32)
    for split in range(0, n_splits):
        src = state_ptr + split * n_rows + rows
        m_b = tl.load(src, mask=row_ok, other=M_START)
        d_b = tl.load(src + n_states, mask=row_ok, other=0.0)
        m, d, w = merge(m, d, w, m_b, d_b, tl.load(src + 2 * n_states, mask=row_ok, other=0.0))
        z_b = tl.load(src + 3 * n_states, mask=row_ok, other=float("nan"))
        target_z = tl.where(z_b == z_b, z_b, target_z)  # the split that holds the target (none: NaN logp)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    active = row_ok & (target != ignore_index)
    lse, entropy = finish(m, tl.where(active, d, 1.0), w)  # rows never computed: no log(0) or 0 / 0
    tl.store(logp_ptr + rows, tl.where(active, target_z - lse, 0.0), mask=row_ok)
    tl.store(entropy_ptr + rows, tl.where(active, entropy, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=row_ok)


@triton.jit
def linear_grad_hidden_kernel(
    hidden_ptr, stride_outer, stride_inner, inner,
    weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_hidden_ptr,
    n_rows, hidden_size, vocab, x_scale, cap_in, grad_scale, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr = False, FP32_HEAD: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    active = row_ok & (target != ignore_index)
    if tl.max(active.to(tl.int32), axis=0) > 0:  # grad_hidden starts zeroed: ignored tiles stay 0
        row_off = row_offset(rows, inner, stride_outer, stride_inner)
        lse, entropy, g_logp, g_ent = _row_gradients(rows, active, lse_ptr, entropy_ptr, grad_logp_ptr,
                                                     grad_entropy_ptr, BLOCK_N, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY)
        ks = tl.arange(0, BLOCK_H)
        out_rows = grad_hidden_ptr + rows.to(tl.int64)[:, None] * hidden_size
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < vocab
            z = _logits_tile(hidden_ptr, row_off, active, weight_ptr, bias_ptr, cols, col_ok, hidden_size,
                             x_scale, cap_in, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, HAS_SOFTCAP,
                             FP32_HEAD)
            dz = _dlogits_tile(z, cols, col_ok, active, target, lse, entropy, g_logp, g_ent, x_scale, grad_scale,
                               HAS_GRAD_LOGP, HAS_SOFTCAP)
            dz = _dlogits_operand(dz, weight_ptr, FP32_HEAD)
            w_rows = weight_ptr + cols.to(tl.int64)[:, None] * hidden_size
            for k0 in range(0, hidden_size, BLOCK_H):
                k = k0 + ks
                k_ok = k < hidden_size
                w = _operand(tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0),
                             FP32_HEAD)
                out_mask = row_ok[:, None] & k_ok[None, :]
                acc = tl.load(out_rows + k[None, :], mask=out_mask, other=0.0)
                acc = _dot(dz, w, acc, DOT_PRECISION)
                tl.store(out_rows + k[None, :], acc, mask=out_mask)


@triton.jit
def linear_grad_weight_kernel(
    hidden_ptr, stride_outer, stride_inner, inner,
    weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_weight_ptr, grad_bias_ptr,
    n_rows, hidden_size, vocab, x_scale, cap_in, grad_scale, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr = False, FP32_HEAD: tl.constexpr = False,
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    ks = tl.arange(0, BLOCK_H)
    out_cols = grad_weight_ptr + cols.to(tl.int64)[:, None] * hidden_size
    bias_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        active = row_ok & (target != ignore_index)
        if tl.max(active.to(tl.int32), axis=0) > 0:
            row_off = row_offset(rows, inner, stride_outer, stride_inner)
            lse, entropy, g_logp, g_ent = _row_gradients(rows, active, lse_ptr, entropy_ptr, grad_logp_ptr,
                                                          grad_entropy_ptr, BLOCK_N, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY)
            z = _logits_tile(hidden_ptr, row_off, active, weight_ptr, bias_ptr, cols, col_ok, hidden_size,
                             x_scale, cap_in, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, HAS_SOFTCAP,
                             FP32_HEAD)
            dz = _dlogits_tile(z, cols, col_ok, active, target, lse, entropy, g_logp, g_ent, x_scale, grad_scale,
                               HAS_GRAD_LOGP, HAS_SOFTCAP)
            bias_acc += tl.sum(dz, axis=0)
            dz_t = tl.trans(_dlogits_operand(dz, weight_ptr, FP32_HEAD))
            for k0 in range(0, hidden_size, BLOCK_H):
                k = k0 + ks
                k_ok = k < hidden_size
                # Ignored rows load as zeros: whatever they hold (even NaN) never reaches grad_weight.
                h = _operand(tl.load(hidden_ptr + row_off[:, None] + k[None, :],
                                     mask=active[:, None] & k_ok[None, :], other=0.0), FP32_HEAD)
                out_mask = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(out_cols + k[None, :], mask=out_mask, other=0.0)
                acc = _dot(dz_t, h, acc, DOT_PRECISION)
                tl.store(out_cols + k[None, :], acc, mask=out_mask)
    if HAS_BIAS:
        tl.store(grad_bias_ptr + cols, bias_acc, mask=col_ok)


def tiles(dtype: torch.dtype) -> tuple:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) used for this input dtype here."""
    if TILES is not None:
        return TILES
    return INTERPRETER_TILES if os.environ.get("TRITON_INTERPRET") == "1" else GPU_TILES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 heads must not round their inputs to tf32: the results are to match the torch backend to fp32
    # rounding. 16-bit inputs multiply exactly in fp32 accumulators either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_plan(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(S, V per split): how many programs share one row tile's vocabulary in the forward, 1 when the row
    tiles alone fill the GPU. V per split is a whole number of tiles; no split is left without vocabulary."""
    block_n, block_v = tiles(dtype)[:2]
    v_tiles = triton.cdiv(vocab, block_v)
    if SPLIT_V is not None:
        splits = SPLIT_V
    elif device.type == "cuda":
        wanted = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(wanted, triton.cdiv(n_rows, block_n))
    else:
        splits = 1
    v_per_split = triton.cdiv(v_tiles, max(1, min(splits, v_tiles))) * block_v
    splits = triton.cdiv(vocab, v_per_split)
    # The merge addresses its STATE_FIELDS x S x N scratch floats with int32 offsets.
    assert STATE_FIELDS * splits * n_rows < 2**31, "too many rows for one launch of the fused head"
    return splits, v_per_split


def _check_operands(hidden, weight, bias, targets, head_fp32: bool = False) -> None:
    """The layout this module relies on (the op validates user input; this catches a caller's slip)."""
    if weight.dim() != 2 or not weight.is_contiguous() or weight.shape[1] != hidden.vocab:
        raise ValueError(f"weight must be a contiguous [V, {hidden.vocab}] tensor, got {tuple(weight.shape)}")
    if (hidden.tensor.dtype != weight.dtype and not head_fp32) or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError("hidden, weight and bias must share one dtype (hidden may differ with head_fp32=True)")
    if bias is not None and (not bias.is_contiguous() or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}] tensor, got {tuple(bias.shape)}")
    if targets.dtype != torch.int64 or not targets.is_contiguous() or targets.numel() != hidden.n_rows:
        raise ValueError(f"targets must be {hidden.n_rows} contiguous int64 ids")


def _bias_arg(bias, weight):
    return bias if bias is not None else weight  # never read: HAS_BIAS=False


def compute_dtype(weight: torch.Tensor, head_fp32: bool) -> torch.dtype:
    """The dtype the dots multiply in, which picks the tiles and the dot precision: fp32 in the fp32 head."""
    return torch.float32 if head_fp32 else weight.dtype


def _head_meta(tr, head_fp32: bool) -> dict:
    """HAS_SOFTCAP / FP32_HEAD only where set: the plain head's launches stay those of before."""
    return {**({"HAS_SOFTCAP": True} if tr.has_softcap else {}), **({"FP32_HEAD": True} if head_fp32 else {})}


def forward(hidden, weight, bias, targets, inv_temperature: float, ignore_index: int, logit_scale: float = 1.0,
            softcap=None, head_fp32: bool = False):
    """Flat float32 (logp, entropy, lse), each [N], for the rows of `hidden` (a RowLayout of [..., H])."""
    _check_operands(hidden, weight, bias, targets, head_fp32)
    tr = logit_transform(inv_temperature, logit_scale, softcap)
    dtype = compute_dtype(weight, head_fp32)
    n_rows, hidden_size, vocab = hidden.n_rows, hidden.vocab, weight.shape[0]
    device = weight.device
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n_rows == 0:
        return logp, entropy, lse
    block_n, block_v, block_h, warps, stages = tiles(dtype)
    splits, v_per_split = forward_plan(n_rows, vocab, dtype, device)
    state = torch.empty((STATE_FIELDS, splits, n_rows), dtype=torch.float32, device=device)
    linear_stats_fwd_kernel[(triton.cdiv(n_rows, block_n), splits)](
        hidden.tensor, hidden.stride_outer, hidden.stride_inner, hidden.inner,
        weight, _bias_arg(bias, weight), targets, state,
        n_rows, splits * n_rows, hidden_size, vocab, v_per_split, tr.x_scale, tr.cap_in, ignore_index,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        DOT_PRECISION=dot_precision(dtype), num_warps=warps, num_stages=stages, **_head_meta(tr, head_fp32),
    )
    linear_stats_merge_kernel[(triton.cdiv(n_rows, MERGE_BLOCK),)](
        state, targets, logp, entropy, lse, n_rows, splits, splits * n_rows, ignore_index, BLOCK=MERGE_BLOCK,
    )
    return logp, entropy, lse


def backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature: float,
             ignore_index: int, logit_scale: float = 1.0, softcap=None, head_fp32: bool = False):
    """(grad_hidden [N, H] f32 contiguous, grad_weight [V, H] f32, grad_bias [V] f32 or None)."""
    _check_operands(hidden, weight, bias, targets, head_fp32)
    tr = logit_transform(inv_temperature, logit_scale, softcap)
    dtype = compute_dtype(weight, head_fp32)
    n_rows, hidden_size, vocab = hidden.n_rows, hidden.vocab, weight.shape[0]
    device = weight.device
    grad_hidden = torch.zeros((n_rows, hidden_size), dtype=torch.float32, device=device)
    grad_weight = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device)
    grad_bias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=device)
    if n_rows == 0 or (grad_logp is None and grad_entropy is None):
        return grad_hidden, grad_weight, grad_bias
    block_n, block_v, block_h, warps, stages = tiles(dtype)
    common = (
        hidden.tensor, hidden.stride_outer, hidden.stride_inner, hidden.inner,
        weight, _bias_arg(bias, weight), targets, lse, entropy,
        grad_logp if grad_logp is not None else lse, grad_entropy if grad_entropy is not None else lse,
    )
    sizes = (n_rows, hidden_size, vocab, tr.x_scale, tr.cap_in, tr.grad_scale, ignore_index)
    meta = dict(
        HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, DOT_PRECISION=dot_precision(dtype),
        num_warps=warps, num_stages=stages, **_head_meta(tr, head_fp32),
    )
    linear_grad_hidden_kernel[(triton.cdiv(n_rows, block_n),)](*common, grad_hidden, *sizes, **meta)
    linear_grad_weight_kernel[(triton.cdiv(vocab, block_v),)](
        *common, grad_weight, _bias_arg(grad_bias, grad_weight), *sizes, **meta,
    )
    return grad_hidden, grad_weight, grad_bias
