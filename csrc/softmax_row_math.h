// Per-row arithmetic of the fused op (log-prob of the target, entropy and lse of softmax(x / T), and
// its gradient), shared by the CUDA kernels and the host tests.
//
// Every function is `__host__ __device__` under nvcc and plain `inline` under a host compiler, so g++ builds
// the very same code into the ctypes shim (host_shim.cpp) that tests it against a float64 reference.
// No CUDA or torch header is needed here.
//
// Values are the scaled logits x = raw * (1 / T) in float32. A row's softmax is summarised by a state
// (m, d, w): m the largest finite x seen, d = sum e^(x - m), w = sum e^(x - m) (x - m). Keeping d and w
// relative to m means large logits (bf16 rows in the thousands) lose no precision, and two states of
// disjoint parts of a row merge exactly, in any order: that is what lets each thread, then each warp, then
// the block, summarise its part of the row independently.
//
// NaN policy (same as the Triton and torch backends): NaN or +inf in a row marks the row bad and its outputs
// NaN; -inf entries are a masked vocabulary (p = 0, zero gradient); a row of only -inf has d = 0 and ends
// non-finite through log(0).
#pragma once

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

ERPO_HD float neg_inf() { return -INFINITY; }

// One exponential per element: the hardware approximation on the device (ex2.approx, as Triton's tl.exp
// uses), the C library's expf on the host. Its relative error is ~2 ulp for the arguments that matter
// (x - m in [-20, 0]); smaller terms are below float32 resolution of the sum anyway.
ERPO_HD float exp_elem(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}

// Plain comparisons (one instruction each; NaN compares false), the same on host and device. Never build
// with fast-math, which assumes no NaN/inf and would fold them away.
ERPO_HD bool is_poison(float x) { return !(x < INFINITY); }  // NaN or +inf: the row's outputs are NaN
ERPO_HD bool is_live(float x) { return fabsf(x) < INFINITY; }  // finite: takes part in the softmax

struct SoftmaxState {
  float m;  // largest finite x seen; -inf while none
  float d;  // sum of e^(x - m) over the finite x seen
  float w;  // sum of e^(x - m) (x - m) over the finite x seen
  int bad;  // 1 once a NaN or +inf was seen
};

ERPO_HD SoftmaxState state_empty() { return SoftmaxState{neg_inf(), 0.0f, 0.0f, 0}; }

// The same sums expressed relative to m_new >= s.m:
//   sum e^(x - m_new) = e^(m - m_new) d,   sum e^(x - m_new)(x - m_new) = e^(m - m_new) (w + d (m - m_new)).
ERPO_HD SoftmaxState state_rebase(SoftmaxState s, float m_new) {
  if (s.m == -INFINITY) return SoftmaxState{m_new, 0.0f, 0.0f, s.bad};  // empty: nothing to rescale
  const float delta = s.m - m_new;
  const float scale = exp_elem(delta);
  return SoftmaxState{m_new, s.d * scale, scale * (s.w + s.d * delta), s.bad};
}

// Summary of the union of two disjoint parts of a row. Commutative and associative up to rounding.
ERPO_HD SoftmaxState state_merge(SoftmaxState a, SoftmaxState b) {
  const int bad = a.bad | b.bad;
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return SoftmaxState{m, 0.0f, 0.0f, bad};
  const SoftmaxState ra = state_rebase(a, m);
  const SoftmaxState rb = state_rebase(b, m);
  return SoftmaxState{m, ra.d + rb.d, ra.w + rb.w, bad};
}

// Add N values (one vector load, or N = 1 for a scalar) to a state: the running max moves at most once per
// call, so the rescale costs one extra exponential per vector at most, and in practice almost never once
// the row's large values have been seen.
template <int N>
ERPO_HD void state_add(SoftmaxState& s, const float (&x)[N]) {
  float local_max = neg_inf();
  int bad = 0;
  ERPO_UNROLL
  for (int i = 0; i < N; ++i) {
    bad |= is_poison(x[i]) ? 1 : 0;
    if (is_live(x[i])) local_max = fmaxf(local_max, x[i]);
  }
  s.bad |= bad;
  if (local_max > s.m) s = state_rebase(s, local_max);
  if (s.m == -INFINITY) return;  // nothing finite yet
  ERPO_UNROLL
  for (int i = 0; i < N; ++i) {
    if (is_live(x[i])) {
      const float shifted = x[i] - s.m;
      const float e = exp_elem(shifted);
      s.d += e;
      s.w += e * shifted;
    }
  }
}

struct RowResult {
  float logp;
  float entropy;
  float lse;
};

// lse = m + log d, H = log d - w / d, logp = x_target - lse. A bad row is NaN in all three: the backward
// then recomputes p = NaN, so the NaN reaches the gradient of that row too instead of vanishing.
ERPO_HD RowResult state_finish(SoftmaxState s, float target_x) {
  if (s.bad) return RowResult{NAN, NAN, NAN};
  const float log_d = logf(s.d);
  const float lse = s.m + log_d;  // all -inf row: -inf + log 0 = -inf, entropy and logp NaN below
  return RowResult{target_x - lse, log_d - s.w / s.d, lse};
}

// Gradient of (g_logp * logp + g_ent * H) with respect to one raw logit:
//   dx_j = (g_logp (1[j = y] - p_j) - g_ent p_j (x_j - E_p[x])) / T,  p_j = e^(x_j - lse),  E_p[x] = lse - H.
// x is the scaled logit; `mean_x` is E_p[x]. A masked entry (x = -inf) has p = 0 and gets exactly 0,
// never 0 * -inf. An absent incoming gradient is a template flag: its term is not computed at all.
template <bool HAS_LOGP, bool HAS_ENT>
ERPO_HD float grad_elem(float x, bool is_target, float lse, float mean_x, float g_logp, float g_ent, float inv_t) {
  const float p = exp_elem(x - lse);
  float g = 0.0f;
  if (HAS_LOGP) g = g_logp * ((is_target ? 1.0f : 0.0f) - p);
  if (HAS_ENT) g -= g_ent * p * (x > -INFINITY ? x - mean_x : 0.0f);
  return g * inv_t;
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

// The per-thread loops of the kernels. Thread `tid` of `threads` handles elements tid, tid + threads, ... of
// the scalar head and tail and vectors tid, tid + threads, ... of the body: consecutive threads touch
// consecutive addresses (coalesced). `Convert` turns a T into float (to_float) and back (from_float); the
// kernels pass the CUDA conversions, the host tests plain float and bf16 bit conversions, so the tests run
// these very loops on real (possibly misaligned) tensor memory.

// Fold this thread's share of a row (already split by split_row) into an online-softmax state.
template <typename T, typename Convert>
ERPO_HD SoftmaxState thread_row_state(const T* x_row, RowSplit split, int64_t vocab, int64_t tid, int64_t threads,
                                      float inv_t, Convert cv) {
  constexpr int kVec = Vec<T>::kSize;
  SoftmaxState s = state_empty();
  for (int64_t j = tid; j < split.head; j += threads) {
    const float x[1] = {cv.to_float(x_row[j]) * inv_t};
    state_add(s, x);
  }
  const Vec<T>* body = reinterpret_cast<const Vec<T>*>(x_row + split.head);
  for (int64_t first = tid; first < split.n_vec; first += kUnroll * threads) {
    Vec<T> buf[kUnroll];
    ERPO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      if (first + u * threads < split.n_vec) buf[u] = body[first + u * threads];
    }
    ERPO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      if (first + u * threads < split.n_vec) {
        float x[kVec];
        ERPO_UNROLL
        for (int k = 0; k < kVec; ++k) x[k] = cv.to_float(buf[u].v[k]) * inv_t;
        state_add(s, x);
      }
    }
  }
  for (int64_t j = split.tail_start + tid; j < vocab; j += threads) {
    const float x[1] = {cv.to_float(x_row[j]) * inv_t};
    state_add(s, x);
  }
  return s;
}

// Write this thread's share of a row's gradient. x_row and g_row may be the same memory (in-place gradient):
// every element is read, then written, by the same thread only.
template <typename T, bool HAS_LOGP, bool HAS_ENT, typename Convert>
ERPO_HD void thread_row_grad(const T* x_row, T* g_row, RowSplit split, int64_t vocab, int64_t tid, int64_t threads,
                             int64_t target, float lse, float mean_x, float g_logp, float g_ent, float inv_t,
                             Convert cv) {
  constexpr int kVec = Vec<T>::kSize;
  for (int64_t j = tid; j < split.head; j += threads) {
    const float x = cv.to_float(x_row[j]) * inv_t;
    g_row[j] = cv.from_float(grad_elem<HAS_LOGP, HAS_ENT>(x, j == target, lse, mean_x, g_logp, g_ent, inv_t));
  }
  const Vec<T>* x_body = reinterpret_cast<const Vec<T>*>(x_row + split.head);
  Vec<T>* g_body = reinterpret_cast<Vec<T>*>(g_row + split.head);
  for (int64_t first = tid; first < split.n_vec; first += kUnroll * threads) {
    Vec<T> buf[kUnroll];
    ERPO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      if (first + u * threads < split.n_vec) buf[u] = x_body[first + u * threads];
    }
    ERPO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + u * threads;
      if (v < split.n_vec) {
        const int64_t target_in_vec = target - (split.head + v * kVec);  // in [0, kVec) when the target is here
        Vec<T> out;
        ERPO_UNROLL
        for (int k = 0; k < kVec; ++k) {
          const float x = cv.to_float(buf[u].v[k]) * inv_t;
          const float g = grad_elem<HAS_LOGP, HAS_ENT>(x, k == target_in_vec, lse, mean_x, g_logp, g_ent, inv_t);
          out.v[k] = cv.from_float(g);
        }
        g_body[v] = out;
      }
    }
  }
  for (int64_t j = split.tail_start + tid; j < vocab; j += threads) {
    const float x = cv.to_float(x_row[j]) * inv_t;
    g_row[j] = cv.from_float(grad_elem<HAS_LOGP, HAS_ENT>(x, j == target, lse, mean_x, g_logp, g_ent, inv_t));
  }
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
