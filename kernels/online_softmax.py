"""The online softmax row state of erpo's Triton kernels, imported by the fused op (logprobs_entropy.py) and the
fused LM head (linear_logprobs_entropy.py): new row math goes here once (and their rows' addressing, row_offset).

The convention is csrc/softmax_row_math.h's: a part of a row of scaled logits x = logits / T is (m, d, w), m the
largest x seen (M_START, finite, while none), d = sum 2^t and w = sum 2^t t with t = (x - m) log2(e), formed as
suits the caller (the op: one FMA, logits log2(e) / T - m log2(e); the head: (z - m) log2(e), exactly 0 at the
max). Relative to m, bf16 logits in the thousands lose no precision, and the states of disjoint parts merge
exactly in any order. Callers keep m per row or per block, and d, w per lane or per row.
Soft-capping and a logit scale (transform, transform_grad) are applied to each logit as loaded, once here for
both kernels; a head without them compiles to the same code as before (HAS_SOFTCAP is a constexpr).
NaN policy, with no per-element test: a NaN or +inf logit makes t, hence d, lse and H NaN, in its row only; -inf
entries add 0 (t is clamped at T_FLOOR where it multiplies 2^t = 0); a row of only -inf has d = 0 (lse = -inf).
"""
import os

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# ex2.approx.ftz: one MUFU instruction. Triton's exp2 (non-ftz) adds a range test and two multiplies per
# element to keep denormal results, which are < 2^-126 of the row max's term and change no sum here.
FAST_EXP2: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
T_FLOOR: tl.constexpr = tl.constexpr(-256.0)  # 2^t is exactly 0 below this: clamping t there changes nothing
# The running max before any value: half of FLT_MAX, so that m log2(e) is still finite (csrc: kMStart).
M_START: tl.constexpr = tl.constexpr(-1.7014117331926443e38)


@triton.jit
def exp2(t):
    if FAST_EXP2:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [t], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(t)


@triton.jit
def terms(t):
    """The summands of d and w for t - m, elementwise: (2^t, 2^t t); -inf gives (0, 0), never 0 * -inf."""
    e = exp2(t)
    return e, e * tl.maximum(t, T_FLOOR)


@triton.jit
def shift(d, w, delta):
    """(d, w) re-expressed relative to a max larger by -delta log2(e), delta <= 0 in base 2: 2^delta d and
    2^delta (w + d delta). An empty state (d = w = 0) stays 0; delta is clamped like t."""
    delta = tl.maximum(delta, T_FLOOR)
    scale = tl.exp2(delta)
    return scale * d, scale * (w + d * delta)


@triton.jit
def rebase(m, d, w, m_new):
    """(d, w) of the state at m re-expressed relative to m_new >= m."""
    return shift(d, w, (m - m_new) * LOG2E)


@triton.jit
def merge(m_a, d_a, w_a, m_b, d_b, w_b):
    """The state of the union of two disjoint parts of a row. Commutative and associative up to rounding."""
    m = tl.maximum(m_a, m_b)
    d_a, w_a = rebase(m_a, d_a, w_a, m)
    d_b, w_b = rebase(m_b, d_b, w_b, m)
    return m, d_a + d_b, w_a + w_b


@triton.jit
def finish(m, d, w):
    """(lse, entropy) of a whole row's state: lse = m + ln(2) log2(d), H = ln(2) (log2(d) - w / d)."""
    log2_d = tl.log2(d)
    return m + log2_d * LN2, (log2_d - w / d) * LN2


@triton.jit
def grad_terms(t, a, b):
    """p (a t + b) with p = 2^t, t = (x - lse) log2(e): the derivative of g_logp logp + g_ent H with respect to
    x = logits / T off the target, for a = -g_ent ln(2) and b = -(g_logp + g_ent H) (as x - E_p[x] = t ln(2) + H);
    the callers fold 1 / T into a and b or apply it after. A masked entry (t = -inf) gets exactly 0."""
    return exp2(t) * (a * tl.maximum(t, T_FLOOR) + b)


@triton.jit
def above_threshold(z, tau):
    """The threshold half of S (docs/support.md), elementwise: z >= tau, z = x the softmax's scaled logits as
    erpo/ops/support.py compares them (a float32 product, never an FMA's), tau the row's threshold; a NaN z (or
    tau) stays in, so it reaches the row's outputs (support.kept: ~(z < tau))."""
    return (z < tau) == 0


@triton.jit
def in_support(z, tau, cols, target):
    """S itself, elementwise: above the threshold, or the row's target column (always in S)."""
    return above_threshold(z, tau) | (cols == target)


@triton.jit
def accumulate_support(x2, keep, m2, d, w, d_s, w_s):
    """Fold one block of base-2 scaled logits x2 (x log2(e); -inf in masked lanes) into two states that share the
    running max m2 (base 2, block-wide; d, w per lane): the whole row's (d, w) and (d_s, w_s) over the lanes in
    S (`keep`). Sharing the max is exact for any S; it loses nothing because a recomputed S holds the row max
    (tau <= max). The sums are rebased only when the block raises m2; one exp2 per element feeds both."""
    m2_new = tl.maximum(m2, tl.max(x2, axis=0))
    if m2_new > m2:
        d, w = shift(d, w, m2 - m2_new)
        d_s, w_s = shift(d_s, w_s, m2 - m2_new)
        m2 = m2_new
    e, et = terms(x2 - m2)
    # keep as 0/1 factors: one FFMA per sum (a NaN e comes only from a NaN or +inf logit, which S keeps)
    k = keep.to(tl.float32)
    return m2, d + e, w + et, d_s + e * k, w_s + et * k


@triton.jit
def grad_terms_support(t, keep, delta, ratio, a, b, a_s, b_s):
    """grad_terms of the whole row plus those over S, from one exp2: p (a t + b) + [j in S] q (a_s t_s + b_s),
    t = (x - lse) log2(e), t_s = t + delta with delta = (lse - lse_S) log2(e) >= 0, q = ratio p (ratio = 2^delta).
    For a recomputed S (it holds the row max) ratio <= V, so q underflows only where it is below V 2^-126."""
    e = exp2(t)
    over_s = tl.where(keep, ratio * (a_s * tl.maximum(t + delta, T_FLOOR) + b_s), 0.0)
    return e * (a * tl.maximum(t, T_FLOOR) + b + over_s)


@triton.jit
def tanh(y):
    """tanh from one exp2 (libdevice's is not in the interpreter): sign(y) (1 - 2^-2|y|log2e) / (1 + 2^-2|y|log2e),
    absolute error ~1e-7; +-inf gives +-1, NaN stays NaN."""
    e = exp2(tl.abs(y) * (-2.0 * LOG2E))
    u = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -u, u)


@triton.jit
def transform(y, cap_in, HAS_SOFTCAP: tl.constexpr):
    """The model's logit y as the softmax sees it, up to the per-call factor x_scale the callers fold into their own
    scale: x = x_scale * transform(y) (erpo/ops/row_stats.py logit_transform gives x_scale, cap_in and grad_scale):
    tanh(y cap_in) under a soft cap (x = c tanh(s y / c) / T), y itself otherwise (x = s y / T, no instruction)."""
    if HAS_SOFTCAP:
        return tanh(y * cap_in)
    else:
        return y


@triton.jit
def transform_grad(u, HAS_SOFTCAP: tl.constexpr):
    """f' at u = transform(y): dx/dy = grad_scale * f', f' = 1 - u^2 under a soft cap (the callers skip the
    multiply without one)."""
    if HAS_SOFTCAP:
        return 1.0 - u * u
    else:
        return 1.0


@triton.jit
def row_offset(row, inner, stride_outer, stride_inner):
    """Offset of row r (scalar or tensor) of a [outer, inner, V] layout with strides (stride_outer, stride_inner,
    1), in int64: N * V overflows int32 at 8 x 4k x 150k."""
    row = row.to(tl.int64)
    return (row // inner) * stride_outer + (row % inner) * stride_inner
