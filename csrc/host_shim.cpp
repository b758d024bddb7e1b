// Host (CPU) C API over softmax_row_math.h and token_loss_math.h, for the ctypes tests in tests/csrc.
// Built with plain g++:
//   g++ -std=c++17 -O2 -shared -fPIC -Icsrc csrc/host_shim.cpp -o libshim.so
// The row functions run the kernels' own per-thread loops (thread_row_state, thread_row_grad,
// thread_row_zero) for every emulated thread of a block, one after another, on the caller's memory, then
// merge the thread states in the kernels' order (a butterfly within each warp of 32, then once more over the
// warps' states). Only the CUDA-specific parts differ: shuffles become array reads, ex2.approx becomes exp2f
// (subnormals flushed as on the device; erpo_host_set_exp2_error perturbs it to test the tolerances), the
// packed 16-bit max of a vector group becomes vectors_max (the same number), and fp16 is not offered (its
// conversion is CUDA's own intrinsic).
#include <stdint.h>
#include <string.h>

#include <vector>

#include "softmax_row_math.h"
#include "token_loss_math.h"

namespace {

using erpo::SoftmaxState;

struct FloatConvert {
  float to_float(float v) const { return v; }
  float from_float(float v) const { return v; }
  template <int U>
  float max_of(const erpo::Vec<float> (&buf)[U]) const { return erpo::vectors_max(buf, *this); }
};

// bfloat16 as raw bits: the upper half of a float32, rounded to nearest even (as __float2bfloat16_rn).
struct Bf16Convert {
  float to_float(uint16_t v) const {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
  }
  uint16_t from_float(float f) const {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (f != f) return 0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
  }
  template <int U>
  float max_of(const erpo::Vec<uint16_t> (&buf)[U]) const { return erpo::vectors_max(buf, *this); }
};

constexpr int kFloat32 = 0;   // erpo_dtype codes of logprobs_entropy.h
constexpr int kBfloat16 = 2;
constexpr int kWarp = 32;

void butterfly(SoftmaxState* lanes) {
  for (int lane_mask = kWarp / 2; lane_mask > 0; lane_mask /= 2) {
    SoftmaxState before[kWarp];
    for (int i = 0; i < kWarp; ++i) before[i] = lanes[i];
    for (int i = 0; i < kWarp; ++i) lanes[i] = erpo::state_merge(before[i], before[i ^ lane_mask]);
  }
}

SoftmaxState block_merge(std::vector<SoftmaxState> states) {
  const int warps = static_cast<int>(states.size()) / kWarp;
  SoftmaxState firsts[kWarp];
  for (int k = 0; k < kWarp; ++k) firsts[k] = erpo::state_empty();
  for (int k = 0; k < warps; ++k) {
    butterfly(&states[k * kWarp]);
    firsts[k] = states[k * kWarp];
  }
  butterfly(firsts);
  return firsts[0];
}

bool valid_threads(int threads) { return threads >= kWarp && threads <= erpo::kMaxThreads && threads % kWarp == 0; }

template <typename T, typename Convert>
void rows_fwd(const T* logits, int64_t stride_outer, int64_t stride_inner, int64_t inner, const int64_t* targets,
              float* logp, float* entropy, float* lse, int64_t n_rows, int64_t vocab, float inv_t,
              int64_t ignore_index, int threads, Convert cv) {
  for (int64_t row = 0; row < n_rows; ++row) {
    const int64_t target = targets[row];
    if (target == ignore_index) {
      logp[row] = entropy[row] = lse[row] = 0.0f;
      continue;
    }
    const T* x_row = logits + erpo::row_offset(row, inner, stride_outer, stride_inner);
    const erpo::RowSplit split = erpo::split_row(reinterpret_cast<uint64_t>(x_row), vocab, sizeof(T));
    std::vector<SoftmaxState> states(threads);
    for (int t = 0; t < threads; ++t) states[t] = erpo::thread_row_state(x_row, split, vocab, t, threads, inv_t, cv);
    const float target_x = (target >= 0 && target < vocab) ? cv.to_float(x_row[target]) * inv_t : NAN;
    const erpo::RowResult r = erpo::state_finish(block_merge(states), target_x);
    logp[row] = r.logp;
    entropy[row] = r.entropy;
    lse[row] = r.lse;
  }
}

template <typename T, bool HAS_LOGP, bool HAS_ENT, typename Convert>
void rows_bwd(const T* logits, int64_t stride_outer, int64_t stride_inner, int64_t inner, T* grad,
              int64_t grad_stride_outer, int64_t grad_stride_inner, const int64_t* targets, const float* lse,
              const float* entropy, const float* grad_logp, const float* grad_entropy, int64_t n_rows, int64_t vocab,
              float inv_t, int64_t ignore_index, int threads, Convert cv) {
  for (int64_t row = 0; row < n_rows; ++row) {
    const int64_t target = targets[row];
    const T* x_row = logits + erpo::row_offset(row, inner, stride_outer, stride_inner);
    T* g_row = grad + erpo::row_offset(row, inner, grad_stride_outer, grad_stride_inner);
    const erpo::RowSplit split = erpo::split_row_pair(reinterpret_cast<uint64_t>(x_row),
                                                      reinterpret_cast<uint64_t>(g_row), vocab, sizeof(T));
    for (int t = 0; t < threads; ++t) {
      if (target == ignore_index) {
        erpo::thread_row_zero(g_row, split, vocab, t, threads, cv);
      } else {
        erpo::thread_row_grad<T, HAS_LOGP, HAS_ENT>(x_row, g_row, split, vocab, t, threads, target, lse[row],
                                                    entropy[row], HAS_LOGP ? grad_logp[row] : 0.0f,
                                                    HAS_ENT ? grad_entropy[row] : 0.0f, inv_t, cv);
      }
    }
  }
}

template <typename T, typename Convert>
void rows_bwd_dispatch(const void* logits, int64_t so, int64_t si, int64_t inner, void* grad, int64_t gso, int64_t gsi,
                       const int64_t* targets, const float* lse, const float* entropy, const float* grad_logp,
                       const float* grad_entropy, int64_t n_rows, int64_t vocab, float inv_t, int64_t ignore_index,
                       int threads) {
  const T* x = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  const Convert cv;
  if (grad_logp && grad_entropy)
    rows_bwd<T, true, true>(x, so, si, inner, g, gso, gsi, targets, lse, entropy, grad_logp, grad_entropy, n_rows,
                            vocab, inv_t, ignore_index, threads, cv);
  else if (grad_logp)
    rows_bwd<T, true, false>(x, so, si, inner, g, gso, gsi, targets, lse, entropy, grad_logp, grad_entropy, n_rows,
                             vocab, inv_t, ignore_index, threads, cv);
  else if (grad_entropy)
    rows_bwd<T, false, true>(x, so, si, inner, g, gso, gsi, targets, lse, entropy, grad_logp, grad_entropy, n_rows,
                             vocab, inv_t, ignore_index, threads, cv);
  else
    rows_bwd<T, false, false>(x, so, si, inner, g, gso, gsi, targets, lse, entropy, grad_logp, grad_entropy, n_rows,
                              vocab, inv_t, ignore_index, threads, cv);
}

}  // namespace

extern "C" {

// The forward kernel, emulated block by block. dtype: 0 float32, 2 bfloat16 (raw bits). Returns 0, or -1 for
// arguments the kernel launcher would also refuse.
int erpo_host_rows_fwd(const void* logits, int dtype, int64_t stride_outer, int64_t stride_inner, int64_t inner,
                       const int64_t* targets, float* logp, float* entropy, float* lse, int64_t n_rows, int64_t vocab,
                       float inv_t, int64_t ignore_index, int threads) {
  if (!valid_threads(threads) || vocab < 1 || inner < 1) return -1;
  if (dtype == kFloat32)
    rows_fwd(static_cast<const float*>(logits), stride_outer, stride_inner, inner, targets, logp, entropy, lse, n_rows,
             vocab, inv_t, ignore_index, threads, FloatConvert());
  else if (dtype == kBfloat16)
    rows_fwd(static_cast<const uint16_t*>(logits), stride_outer, stride_inner, inner, targets, logp, entropy, lse,
             n_rows, vocab, inv_t, ignore_index, threads, Bf16Convert());
  else
    return -1;
  return 0;
}

// The backward kernel, emulated. grad may equal logits (in place); grad_logp / grad_entropy may be NULL.
int erpo_host_rows_bwd(const void* logits, int dtype, int64_t stride_outer, int64_t stride_inner, int64_t inner,
                       void* grad, int64_t grad_stride_outer, int64_t grad_stride_inner, const int64_t* targets,
                       const float* lse, const float* entropy, const float* grad_logp, const float* grad_entropy,
                       int64_t n_rows, int64_t vocab, float inv_t, int64_t ignore_index, int threads) {
  if (!valid_threads(threads) || vocab < 1 || inner < 1) return -1;
  if (dtype == kFloat32)
    rows_bwd_dispatch<float, FloatConvert>(logits, stride_outer, stride_inner, inner, grad, grad_stride_outer,
                                           grad_stride_inner, targets, lse, entropy, grad_logp, grad_entropy, n_rows,
                                           vocab, inv_t, ignore_index, threads);
  else if (dtype == kBfloat16)
    rows_bwd_dispatch<uint16_t, Bf16Convert>(logits, stride_outer, stride_inner, inner, grad, grad_stride_outer,
                                             grad_stride_inner, targets, lse, entropy, grad_logp, grad_entropy,
                                             n_rows, vocab, inv_t, ignore_index, threads);
  else
    return -1;
  return 0;
}

// One float32 row cut into chunks of `chunk` elements; chunk k is folded into its own state `group` values
// at a time (1, 4 or 8: the scalar and vector paths of state_add), then the states are merged in the order
// `order` (a permutation of the chunk indices): left to right if tree == 0, else as a pairwise tree.
// out = {logp, entropy, lse}. Returns 0, or -1 for a bad group.
int erpo_host_chunked_row(const float* raw, int64_t vocab, float inv_t, int64_t target, int64_t chunk,
                          const int64_t* order, int64_t n_chunks, int group, int tree, float* out) {
  if (group != 1 && group != 4 && group != 8) return -1;
  const erpo::RowScale k = erpo::row_scale(inv_t);
  std::vector<SoftmaxState> states;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t begin = order[c] * chunk;
    const int64_t end = begin + chunk < vocab ? begin + chunk : vocab;
    SoftmaxState s = erpo::state_empty();
    int64_t j = begin;
    for (; j + group <= end; j += group) {
      if (group == 1) {
        const float x[1] = {raw[j]};
        erpo::state_add(s, x, k);
      } else if (group == 4) {
        float x[4];
        for (int i = 0; i < 4; ++i) x[i] = raw[j + i];
        erpo::state_add(s, x, k);
      } else {
        float x[8];
        for (int i = 0; i < 8; ++i) x[i] = raw[j + i];
        erpo::state_add(s, x, k);
      }
    }
    for (; j < end; ++j) {
      const float x[1] = {raw[j]};
      erpo::state_add(s, x, k);
    }
    states.push_back(s);
  }
  SoftmaxState total = erpo::state_empty();
  if (tree) {
    while (states.size() > 1) {
      std::vector<SoftmaxState> next;
      for (size_t i = 0; i + 1 < states.size(); i += 2) next.push_back(erpo::state_merge(states[i], states[i + 1]));
      if (states.size() % 2) next.push_back(states.back());
      states.swap(next);
    }
    if (!states.empty()) total = states[0];
  } else {
    for (const SoftmaxState& s : states) total = erpo::state_merge(total, s);
  }
  const erpo::RowResult r = erpo::state_finish(total, raw[target] * inv_t);
  out[0] = r.logp;
  out[1] = r.entropy;
  out[2] = r.lse;
  return 0;
}

// out = {head, n_vec, tail_start}; write_address == 0 means a forward (one row), else the backward's pair.
void erpo_host_split_row(uint64_t read_address, uint64_t write_address, int64_t vocab, int elem_size, int64_t* out) {
  const erpo::RowSplit s = write_address ? erpo::split_row_pair(read_address, write_address, vocab, elem_size)
                                         : erpo::split_row(read_address, vocab, elem_size);
  out[0] = s.head;
  out[1] = s.n_vec;
  out[2] = s.tail_start;
}

// Every exponential of the row math is multiplied by (1 + relative_error) from now on (0 restores exp2f):
// the tests run with the device's approximate ex2 error, and more, on both sides.
void erpo_host_set_exp2_error(float relative_error) { erpo::host_exp2_error = relative_error; }

int erpo_host_default_block_threads(int64_t vocab, int elem_size) {
  return erpo::default_block_threads(vocab, elem_size);
}

// The per-token policy-loss kernel's loop body over n tokens; ref, klcov_w and the extras may be NULL.
void erpo_host_token_terms(const float* logp, const float* entropy, const float* old, const float* adv,
                           const float* ref, const float* klcov_w, const float* log_ratio, const float* seq_coef,
                           const float* eps_low_t, const float* eps_high_t, const float* kl_weight,
                           const float* pg_weight, float* loss, float* dlogp, float* dentropy, int8_t* clip_low,
                           int8_t* clip_high, int64_t n, float eps_low, float eps_high, float clip_lo, float clip_hi,
                           float dual_clip_c, float kl_coef, float entropy_coef, float delta, float cispo_max,
                           float sapo_tau_pos, float sapo_tau_neg, int objective, int dual_clip, int has_delta,
                           int cispo_upper, int kl_estimator, int kl_bias) {
  const erpo::TokenArrays arrays{logp, entropy, old, adv, ref, klcov_w, log_ratio, seq_coef, eps_low_t, eps_high_t,
                                 kl_weight, pg_weight};
  const erpo::TokenParams params{eps_low,   eps_high,  clip_lo,     clip_hi,      dual_clip_c,  kl_coef,
                                 entropy_coef, delta,  cispo_max,   sapo_tau_pos, sapo_tau_neg, objective,
                                 dual_clip, has_delta, cispo_upper, kl_estimator, kl_bias};
  for (int64_t i = 0; i < n; ++i) {
    const erpo::TokenTerms t = erpo::token_terms_at(arrays, i, params);
    loss[i] = t.loss;
    dlogp[i] = t.dlogp;
    dentropy[i] = t.dentropy;
    clip_low[i] = t.clip_low ? 1 : 0;
    clip_high[i] = t.clip_high ? 1 : 0;
  }
}

}  // extern "C"
