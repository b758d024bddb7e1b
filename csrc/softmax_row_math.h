// Per-row arithmetic of the fused op (log-prob of the target, entropy and lse of softmax(x / T), and
// its gradient), shared by the CUDA kernels and the host tests.
//
// Every function is `__host__ __device__` under nvcc and plain `inline` under a host compiler, so g++ builds
// the very same code into the ctypes shim (host_shim.cpp) that tests it against a float64 reference.
// No CUDA or torch header is needed here.
//
// Values are the raw logits r (the tensor's values as float32) and the scaled logits x = r / T. The
// exponentials are taken in base 2 with the temperature folded into one FMA feeding exp2 (ex2.approx on the
// device): t = r * (log2(e) / T) - m * log2(e), e = 2^t = e^(x - m). A row's softmax is summarised by a
// state (m, d, w): m the largest x seen (kMStart while none), d = sum 2^t, w = sum 2^t t. Keeping d and w
// relative to m means large logits (bf16 rows in the thousands) lose no precision, and two states of
// disjoint parts of a row merge exactly, in any order: that is what lets each thread, then each warp, then
// the block, summarise its part of the row independently. m only moves when a group of values raises it, so
// the per-element work is one FMA, one exp2 and the two sums; the rescale (one more exp2) runs rarely.
//
// NaN policy (same as the Triton and torch backends), with no per-element test: a NaN or +inf logit makes
// its t NaN (x - m, or +inf - +inf once it raised m), hence d, and so lse, logp, entropy and the row's
// gradient NaN; NaN survives every merge (NaN * 0 is NaN). -inf entries are a masked vocabulary: t = -inf,
// 2^t = 0, and t is clamped at kTFloor wherever it multiplies that 0. A row of only -inf has d = 0 and ends
// non-finite through log(0) (lse = -inf).
// Twins: kernels/online_softmax.py (Triton, this convention), erpo/ops/row_stats.py (torch, base e; held to this
// header by tests/csrc/test_row_stats_vs_header.py).
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define ERPO_HD __host__ __device__ __forceinline__
#define ERPO_UNROLL _Pragma("unroll")
#else
#define ERPO_HD inline
#define ERPO_UNROLL
#endif

namespace erpo {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// 2^t is exactly 0 (flushed) below this: clamping t there changes nothing, and keeps 0 * t = 0 for t = -inf.
constexpr float kTFloor = -256.0f;
// The running max before any value: finite, so t = r * scale - m * log2(e) is -inf (2^t = 0) for a -inf
// logit instead of -inf - (-inf) = NaN; half of FLT_MAX, so that m * log2(e) is still finite. Logits whose
// scaled value lies below it (|x| > 1.7e38) count as masked.
constexpr float kMStart = -0.5f * FLT_MAX;

#if !defined(__CUDACC__)
// Host builds only (the ctypes shim): a relative error put on every exponential, so the tests can check
// that their tolerances cover the device's approximate ex2 (tests/csrc/test_host_math.py). 0 unless a test
// sets it through erpo_host_set_exp2_error.
inline float host_exp2_error = 0.0f;
#endif

// 2^t, one per element: the hardware approximation on the device (ex2.approx.ftz: one MUFU instruction, as
// Triton's fused op uses), exp2f with the same flush of subnormal results to zero on the host. Subnormal
// terms are < 2^-126 of the row max's term and change no sum.
ERPO_HD float exp2_elem(float t) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
#else
  float r = exp2f(t);
  if (r < FLT_MIN) r = 0.0f;  // .ftz; NaN compares false and stays NaN
#if !defined(__CUDACC__)
  r *= 1.0f + host_exp2_error;
#endif
  return r;
#endif
}

// The row's constants: 1 / T, and the factor of the FMA feeding exp2.
struct RowScale {
  float inv_t;
  float scale;  // log2(e) / T
};

ERPO_HD RowScale row_scale(float inv_t) { return RowScale{inv_t, inv_t * kLog2e}; }

struct SoftmaxState {
  float m;  // largest x = r / T seen; kMStart while none (NaN is never the max: fmaxf skips it)
  float d;  // sum of 2^t over the values seen, t = (x - m) log2(e); NaN once a NaN or +inf was seen
  float w;  // sum of 2^t t
};

ERPO_HD SoftmaxState state_empty() { return SoftmaxState{kMStart, 0.0f, 0.0f}; }

// The same sums expressed relative to m_new >= s.m, with delta = (m - m_new) log2(e):
//   sum 2^(t + delta) = 2^delta d,   sum 2^(t + delta) (t + delta) = 2^delta (w + d delta).
// An empty state (m = kMStart, d = w = 0) stays 0; delta = -inf (m_new = +inf) is clamped like t.
ERPO_HD SoftmaxState state_rebase(SoftmaxState s, float m_new) {
  const float delta = fmaxf((s.m - m_new) * kLog2e, kTFloor);
  const float rescale = exp2_elem(delta);
  return SoftmaxState{m_new, rescale * s.d, rescale * (s.w + s.d * delta)};
}

// Summary of the union of two disjoint parts of a row. Commutative and associative up to rounding.
ERPO_HD SoftmaxState state_merge(SoftmaxState a, SoftmaxState b) {
  const float m = fmaxf(a.m, b.m);
  const SoftmaxState ra = state_rebase(a, m);
  const SoftmaxState rb = state_rebase(b, m);
  return SoftmaxState{m, ra.d + rb.d, ra.w + rb.w};
}

// Add N raw values whose largest is raw_max (NaN skipped; the caller may compute it on packed 16-bit data:
// the conversions are exact and monotone, so it is the same number). The running max moves at most once
// per call, so the rescale costs one extra exponential per group at most, and in practice almost never once
// the row's large values have been seen; the steady state is one FMA, one exp2, one add and one FMA (after
// the clamp) per value.
template <int N>
ERPO_HD void state_add(SoftmaxState& s, const float (&raw)[N], float raw_max, RowScale k) {
  const float m_new = raw_max * k.inv_t;
  if (m_new > s.m) s = state_rebase(s, m_new);
  const float m2 = s.m * kLog2e;
  ERPO_UNROLL
  for (int i = 0; i < N; ++i) {
    const float t = raw[i] * k.scale - m2;
    const float e = exp2_elem(t);
    s.d += e;
    s.w += e * fmaxf(t, kTFloor);  // -inf logit: e = 0 and t = -inf; the clamp keeps 0 * t = 0
  }
}

template <int N>
ERPO_HD void state_add(SoftmaxState& s, const float (&raw)[N], RowScale k) {
  float raw_max = -INFINITY;
  ERPO_UNROLL
  for (int i = 0; i < N; ++i) raw_max = fmaxf(raw_max, raw[i]);
  state_add(s, raw, raw_max, k);
}

struct RowResult {
  float logp;
  float entropy;
  float lse;
};

// lse = m + ln(d), H = ln(d) - ln(2) w / d, logp = x_target - lse. A row with a NaN or +inf has d = NaN,
// so all three are NaN, and the backward then recomputes p = NaN: the NaN reaches that row's gradient too.
ERPO_HD RowResult state_finish(SoftmaxState s, float target_x) {
  const float log2_d = log2f(s.d);
  const float lse = s.m + log2_d * kLn2;  // all -inf row: d = 0, lse = -inf, entropy and logp NaN below
  return RowResult{target_x - lse, (log2_d - s.w / s.d) * kLn2, lse};
}

// Gradient of (g_logp * logp + g_ent * H) with respect to one raw logit r_j:
//   dr_j = (g_logp (1[j = y] - p_j) - g_ent p_j (x_j - E_p[x])) / T,  p_j = e^(x_j - lse),  E_p[x] = lse - H.
// In base 2, t_j = r_j log2(e) / T - lse log2(e), p_j = 2^t_j and x_j - E_p[x] = t_j ln(2) + H, so
//   dr_j = p_j (a t_j + b) + 1[j = y] g_logp / T,  a = -g_ent ln(2) / T,  b = -(g_logp + g_ent H) / T:
// one FMA, one exp2, one FMA and one multiply per element; the one-hot term is added to the target alone,
// after the loop (grad_target). A masked entry (r = -inf) has p = 0 and gets exactly 0 (t clamped: never
// 0 * -inf). An absent incoming gradient is a template flag: its terms are not computed at all.
struct GradRow {
  float scale;  // log2(e) / T
  float lse2;   // lse log2(e)
  float a;
  float b;
};

template <bool HAS_LOGP, bool HAS_ENT>
ERPO_HD GradRow grad_row(float lse, float entropy, float g_logp, float g_ent, float inv_t) {
  const float a = HAS_ENT ? -g_ent * kLn2 * inv_t : 0.0f;
  const float b = -((HAS_LOGP ? g_logp : 0.0f) + (HAS_ENT ? g_ent * entropy : 0.0f)) * inv_t;
  return GradRow{inv_t * kLog2e, lse * kLog2e, a, b};
}

template <bool HAS_ENT>
ERPO_HD float grad_elem(float raw, GradRow g) {
  const float t = raw * g.scale - g.lse2;
  const float p = exp2_elem(t);
  return HAS_ENT ? p * (g.a * fmaxf(t, kTFloor) + g.b) : p * g.b;
}

// The target's gradient: grad_elem plus the one-hot term g_logp / T.
template <bool HAS_ENT>
ERPO_HD float grad_target(float raw, GradRow g, float g_logp, float inv_t) {
  return grad_elem<HAS_ENT>(raw, g) + g_logp * inv_t;
}

// How a row of `vocab` elements of `elem_size` bytes at `address` is read: a scalar head up to the first
// 16-byte boundary, then whole 16-byte vectors, then a scalar tail. Rows of a strided view (e.g. the rows of
// logits[:, :-1] with an odd V) start anywhere, so the split is computed per row at run time. An address that
// is not even element-aligned (never made by torch) is read entirely with scalar loads.
struct RowSplit {
  int64_t head;        // elements [0, head) scalar
  int64_t n_vec;       // then n_vec vectors of 16 / elem_size elements
  int64_t tail_start;  // elements [tail_start, vocab) scalar
};

constexpr int kVecBytes = 16;

ERPO_HD RowSplit split_row(uint64_t address, int64_t vocab, int elem_size) {
  if (address % elem_size != 0) return RowSplit{vocab, 0, vocab};
  const int64_t misalign = static_cast<int64_t>(address % kVecBytes);
  int64_t head = misalign ? (kVecBytes - misalign) / elem_size : 0;
  if (head > vocab) head = vocab;
  const int64_t per_vec = kVecBytes / elem_size;
  const int64_t n_vec = (vocab - head) / per_vec;
  return RowSplit{head, n_vec, head + n_vec * per_vec};
}

// The backward reads the logits and writes the gradient element by element from the same thread, so both
// rows must share one split: same offset from a 16-byte boundary, else everything goes scalar.
ERPO_HD RowSplit split_row_pair(uint64_t read_address, uint64_t write_address, int64_t vocab, int elem_size) {
  if (read_address % kVecBytes != write_address % kVecBytes) return RowSplit{vocab, 0, vocab};
  return split_row(read_address, vocab, elem_size);
}

// Threads per row (one block per row): about 8 vectors per thread, at least one warp, at most kMaxThreads
// (small vocabularies get small blocks so many rows run per SM; large ones get wide blocks so each row's
// loads are spread over many threads in flight).
constexpr int kMaxThreads = 512;

ERPO_HD int default_block_threads(int64_t vocab, int elem_size) {
  const int64_t vectors = (vocab * elem_size + kVecBytes - 1) / kVecBytes;
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * 8 < vectors) threads *= 2;
  return threads;
}

// 16 bytes of T, aligned so that one copy is one 128-bit load or store (ld/st.global.v4 on the device).
template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kSize = kVecBytes / static_cast<int>(sizeof(T));
  T v[kSize];
};

constexpr int kUnroll = 4;  // vectors in flight per thread per loop step: all loads issue before any is used

// Largest raw value of U vectors, NaN skipped (fmaxf). The CUDA kernels' 16-bit converters compute the same
// number on packed pairs (max.bf16x2 / max.f16x2: half an instruction per element); every other converter
// calls this.
template <typename T, int U, typename Convert>
ERPO_HD float vectors_max(const Vec<T> (&buf)[U], Convert cv) {
  float m = -INFINITY;
  ERPO_UNROLL
  for (int u = 0; u < U; ++u) {
    ERPO_UNROLL
    for (int k = 0; k < Vec<T>::kSize; ++k) m = fmaxf(m, cv.to_float(buf[u].v[k]));
  }
  return m;
}

// Fold U vectors into a state: one max over the group (cv.max_of), at most one rescale, then the elements.
template <typename T, int U, typename Convert>
ERPO_HD void state_add_vectors(SoftmaxState& s, const Vec<T> (&buf)[U], RowScale k, Convert cv) {
  float raw[U * Vec<T>::kSize];
  ERPO_UNROLL
  for (int u = 0; u < U; ++u) {
    ERPO_UNROLL
    for (int j = 0; j < Vec<T>::kSize; ++j) raw[u * Vec<T>::kSize + j] = cv.to_float(buf[u].v[j]);
  }
  state_add(s, raw, cv.max_of(buf), k);
}

// The per-thread loops of the kernels. Thread `tid` of `threads` handles elements tid, tid + threads, ... of
// the scalar head and tail and vectors tid, tid + threads, ... of the body: consecutive threads touch
// consecutive addresses (coalesced). The body runs in steps of kUnroll vectors with no bounds test inside
// (the last, partial step goes one vector at a time). `Convert` turns a T into float (to_float) and back
// (from_float) and gives the largest raw value of a group of vectors (max_of); the kernels pass the CUDA
// conversions, the host tests plain float and bf16 bit conversions, so the tests run these very loops on
// real (possibly misaligned) tensor memory.

// Fold this thread's share of a row (already split by split_row) into an online-softmax state. tid and
// threads are 32-bit here: with 64-bit ones the ptxas of nvcc 13.0 spilled a 64-bit loop bound of the fp32
// kernel on sm_80, which the static report fails on.
template <typename T, typename Convert>
ERPO_HD SoftmaxState thread_row_state(const T* x_row, RowSplit split, int64_t vocab, int tid, int threads,
                                      float inv_t, Convert cv) {
  const RowScale k = row_scale(inv_t);
  SoftmaxState s = state_empty();
  const Vec<T>* body = reinterpret_cast<const Vec<T>*>(x_row + split.head);
  int64_t v = tid;
  for (const int64_t full = split.n_vec - (kUnroll - 1) * threads; v < full; v += kUnroll * threads) {
    Vec<T> buf[kUnroll];
    ERPO_UNROLL
    for (int u = 0; u < kUnroll; ++u) buf[u] = body[v + u * threads];
    state_add_vectors(s, buf, k, cv);
  }
  for (; v < split.n_vec; v += threads) {
    const Vec<T> buf[1] = {body[v]};
    state_add_vectors(s, buf, k, cv);
  }
  for (int64_t j = tid; j < split.head; j += threads) {  // the scalar head and tail last: the order is free
    const float x[1] = {cv.to_float(x_row[j])};
    state_add(s, x, k);
  }
  for (int64_t j = split.tail_start + tid; j < vocab; j += threads) {
    const float x[1] = {cv.to_float(x_row[j])};
    state_add(s, x, k);
  }
  return s;
}

// The thread of `threads` that handles element j of a row split as `split` (the loops here): the one that
// reads and writes it.
ERPO_HD int64_t element_owner(int64_t j, RowSplit split, int64_t threads, int per_vec) {
  if (j < split.head) return j % threads;
  if (j < split.tail_start) return ((j - split.head) / per_vec) % threads;
  return (j - split.tail_start) % threads;
}

// Write this thread's share of a row's gradient. x_row and g_row may be the same memory (in-place gradient):
// every element is read, then written, by the same thread only. The loops write p (a t + b) everywhere; the
// thread that owns the target reads its logit first (the loop may overwrite it in place) and rewrites it
// with the one-hot term after the loop, so no element is compared with the target inside the loops.
// An out-of-range target (possible only with check_targets=False) patches nothing.
template <typename T, bool HAS_LOGP, bool HAS_ENT, typename Convert>
ERPO_HD void thread_row_grad(const T* x_row, T* g_row, RowSplit split, int64_t vocab, int64_t tid, int64_t threads,
                             int64_t target, float lse, float entropy, float g_logp, float g_ent, float inv_t,
                             Convert cv) {
  constexpr int kVec = Vec<T>::kSize;
  const GradRow g = grad_row<HAS_LOGP, HAS_ENT>(lse, entropy, g_logp, g_ent, inv_t);
  const bool patch = HAS_LOGP && target >= 0 && target < vocab && element_owner(target, split, threads, kVec) == tid;
  const float target_raw = patch ? cv.to_float(x_row[target]) : 0.0f;
  for (int64_t j = tid; j < split.head; j += threads) {
    g_row[j] = cv.from_float(grad_elem<HAS_ENT>(cv.to_float(x_row[j]), g));
  }
  const Vec<T>* x_body = reinterpret_cast<const Vec<T>*>(x_row + split.head);
  Vec<T>* g_body = reinterpret_cast<Vec<T>*>(g_row + split.head);
  int64_t v = tid;
  for (const int64_t full = split.n_vec - (kUnroll - 1) * threads; v < full; v += kUnroll * threads) {
    Vec<T> buf[kUnroll];
    ERPO_UNROLL
    for (int u = 0; u < kUnroll; ++u) buf[u] = x_body[v + u * threads];
    ERPO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      Vec<T> out;
      ERPO_UNROLL
      for (int k = 0; k < kVec; ++k) out.v[k] = cv.from_float(grad_elem<HAS_ENT>(cv.to_float(buf[u].v[k]), g));
      g_body[v + u * threads] = out;
    }
  }
  for (; v < split.n_vec; v += threads) {
    const Vec<T> in = x_body[v];
    Vec<T> out;
    ERPO_UNROLL
    for (int k = 0; k < kVec; ++k) out.v[k] = cv.from_float(grad_elem<HAS_ENT>(cv.to_float(in.v[k]), g));
    g_body[v] = out;
  }
  for (int64_t j = split.tail_start + tid; j < vocab; j += threads) {
    g_row[j] = cv.from_float(grad_elem<HAS_ENT>(cv.to_float(x_row[j]), g));
  }
  if (patch) g_row[target] = cv.from_float(grad_target<HAS_ENT>(target_raw, g, g_logp, inv_t));
}

// This thread's share of a zero gradient row (an ignore_index row, never read).
template <typename T, typename Convert>
ERPO_HD void thread_row_zero(T* g_row, RowSplit split, int64_t vocab, int64_t tid, int64_t threads, Convert cv) {
  constexpr int kVec = Vec<T>::kSize;
  const T zero = cv.from_float(0.0f);
  Vec<T> zeros;
  ERPO_UNROLL
  for (int k = 0; k < kVec; ++k) zeros.v[k] = zero;
  Vec<T>* g_body = reinterpret_cast<Vec<T>*>(g_row + split.head);
  for (int64_t j = tid; j < split.head; j += threads) g_row[j] = zero;
  for (int64_t v = tid; v < split.n_vec; v += threads) g_body[v] = zeros;
  for (int64_t j = split.tail_start + tid; j < vocab; j += threads) g_row[j] = zero;
}

// Row r of a [outer, inner, V] layout with strides (stride_outer, stride_inner, 1), in int64: N * V
// overflows int32 at 8 x 4k x 150k elements.
ERPO_HD int64_t row_offset(int64_t row, int64_t inner, int64_t stride_outer, int64_t stride_inner) {
  return (row / inner) * stride_outer + (row % inner) * stride_inner;
}

}  // namespace erpo
