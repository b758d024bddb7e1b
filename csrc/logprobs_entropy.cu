// CUDA kernels of the fused op: per-row log-prob of the target and entropy of softmax(logits / T) (forward)
// and dlogits (backward), for float32, float16 and bfloat16 logits. The per-row arithmetic is in
// softmax_row_math.h (shared with the host tests); this file is about moving memory.
//
// Memory-traffic plan. Both kernels are memory bound: a row of V logits is ~V x (2 or 4) bytes and costs a
// handful of flops per element, so the goal is to stream every byte exactly once at full bandwidth.
//  * Forward reads each row once and writes 3 floats per row; backward reads each row once and writes the
//    gradient once (2 x N x V elements in all), in the logits' dtype, possibly into the logits themselves.
//    Nothing of size N x V is ever written in float32; lse and entropy are the only per-row state kept.
//  * One row per block, 1-D grid over rows (a block loops over rows when N > 2^31 - 1). The block's threads
//    read consecutive 16-byte vectors (8 bf16/fp16 or 4 fp32 values): each warp instruction moves 512
//    contiguous bytes, the widest coalesced load there is. Each thread keeps kUnroll vectors in flight per
//    loop step (loads are issued before any is used) to cover DRAM latency. Block size grows with V
//    (default_block_threads: ~8 vectors per thread, 32..512 threads), so small vocabularies do not leave
//    most of a block idle and large ones spread a row over many loads in flight.
//  * Rows of a strided view may start anywhere (logits[:, :-1] with odd V), so each row is split at run time
//    into a scalar head up to the first 16-byte boundary, 16-byte vectors, and a scalar tail (V not a
//    multiple of the vector width). The backward needs the logits row and the gradient row at the same
//    offset from a 16-byte boundary (one thread reads and writes the same elements); otherwise the whole row
//    takes the scalar path, which is still coalesced.
//  * Accumulation is float32 in registers. Forward: each thread folds its elements into an online-softmax
//    state (m, d, w) with one exponential per element (base 2, the temperature folded into the FMA feeding
//    ex2.approx); the running max is taken once per step of kUnroll vectors (on packed pairs for 16-bit
//    types) and the sums are rescaled only when it moves. States merge with warp shuffles, then once through
//    shared memory (one state per warp) to the first warp. That final step is the only shared-memory
//    traffic: the row itself never goes through shared memory because each element is used exactly once.
//    Backward needs no reduction at all: p_j and E_p[x] come from the saved lse and entropy, and the target's
//    one-hot term is added after the loop by the thread that owns that element.
//  * Steady-state cost, read from the SASS by `python -m bench.static` (bench/results/static/static.md):
//    under 10 instructions per element for every dtype, sm_80 and sm_90 (CI holds bf16 and fp16 to it).
//  * All offsets are int64 (N x V overflows int32 at 8 x 4k x 150k). Temperature, ignore_index and the row
//    strides are run-time arguments: one compiled kernel per dtype (and per backward gradient mask).
//  * Rows whose target is ignore_index are never read: the forward writes zeros, the backward writes a zero
//    gradient row.
// No torch header here: plain C launchers (logprobs_entropy.h) are bound to torch in binding.cpp, so this
// file is compile-checked with plain nvcc on machines without a CUDA build of torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "logprobs_entropy.h"
#include "softmax_row_math.h"

namespace erpo {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridX = 2147483647;

// Explicit conversions: torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones. max_of: the largest raw value of a group
// of vectors; the 16-bit types reduce packed pairs (max.bf16x2 / max.f16x2, NaN skipped like fmaxf: the same
// number as vectors_max, which the host tests run), then take the larger half.
template <typename T>
struct CudaConvert;
template <>
struct CudaConvert<float> {
  ERPO_HD float to_float(float v) const { return v; }
  ERPO_HD float from_float(float v) const { return v; }
  template <int U>
  ERPO_HD float max_of(const Vec<float> (&buf)[U]) const { return vectors_max(buf, *this); }
};

// Pairwise tree over N packed pairs (registers, not an indexed array: that would go to local memory).
template <int N, typename Pair>
__device__ __forceinline__ Pair max_tree(const Pair* m) {
  if constexpr (N == 1) {
    return m[0];
  } else {
    return __hmax2(max_tree<N / 2>(m), max_tree<N / 2>(m + N / 2));
  }
}

template <typename Pair, typename T, int U>
__device__ __forceinline__ float packed_max(const Vec<T> (&buf)[U]) {
  constexpr int kPairs = U * kVecBytes / static_cast<int>(sizeof(Pair));
  Pair pairs[kPairs];
  memcpy(pairs, buf, sizeof pairs);
  const Pair m = max_tree<kPairs>(pairs);
  return fmaxf(__low2float(m), __high2float(m));
}

template <>
struct CudaConvert<__half> {
  ERPO_HD float to_float(__half v) const { return __half2float(v); }
  ERPO_HD __half from_float(float v) const { return __float2half_rn(v); }
  template <int U>
  __device__ __forceinline__ float max_of(const Vec<__half> (&buf)[U]) const {
    return packed_max<__half2>(buf);
  }
};
template <>
struct CudaConvert<__nv_bfloat16> {
  ERPO_HD float to_float(__nv_bfloat16 v) const { return __bfloat162float(v); }
  ERPO_HD __nv_bfloat16 from_float(float v) const { return __float2bfloat16_rn(v); }
  template <int U>
  __device__ __forceinline__ float max_of(const Vec<__nv_bfloat16> (&buf)[U]) const {
    return packed_max<__nv_bfloat162>(buf);
  }
};

__device__ __forceinline__ int64_t load_target(const void* targets, int targets_int64, int64_t row) {
  return targets_int64 ? static_cast<const int64_t*>(targets)[row]
                       : static_cast<int64_t>(static_cast<const int32_t*>(targets)[row]);
}

__device__ __forceinline__ SoftmaxState shfl_xor_state(SoftmaxState s, int lane_mask) {
  return SoftmaxState{__shfl_xor_sync(kFullMask, s.m, lane_mask), __shfl_xor_sync(kFullMask, s.d, lane_mask),
                      __shfl_xor_sync(kFullMask, s.w, lane_mask)};
}

// Butterfly: after it every lane holds the warp's state. The host tests merge in this same order.
__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState s) {
#pragma unroll
  for (int lane_mask = kWarp / 2; lane_mask > 0; lane_mask /= 2) s = state_merge(s, shfl_xor_state(s, lane_mask));
  return s;
}

// The row's state, valid in thread 0. blockDim.x is a multiple of 32. Callers sync before reusing warp_states.
__device__ __forceinline__ SoftmaxState block_merge(SoftmaxState s, SoftmaxState* warp_states) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  s = warp_merge(s);
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>(blockDim.x / kWarp) ? warp_states[lane] : state_empty();
    s = warp_merge(s);
  }
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
logprobs_entropy_fwd_kernel(const T* __restrict__ logits, int64_t stride_outer, int64_t stride_inner, int64_t inner,
                            const void* __restrict__ targets, int targets_int64, float* __restrict__ logp,
                            float* __restrict__ entropy, float* __restrict__ lse, int64_t n_rows, int64_t vocab,
                            float inv_t, int64_t ignore_index) {
  __shared__ SoftmaxState warp_states[kMaxThreads / kWarp];
  const CudaConvert<T> cv;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t target = load_target(targets, targets_int64, row);
    if (target == ignore_index) {  // uniform over the block: the row is not read
      if (threadIdx.x == 0) {
        logp[row] = 0.0f;
        entropy[row] = 0.0f;
        lse[row] = 0.0f;
      }
      continue;
    }
    const T* x_row = logits + row_offset(row, inner, stride_outer, stride_inner);
    const RowSplit split = split_row(reinterpret_cast<uint64_t>(x_row), vocab, sizeof(T));
    SoftmaxState s = thread_row_state(x_row, split, vocab, threadIdx.x, blockDim.x, inv_t, cv);
    s = block_merge(s, warp_states);
    if (threadIdx.x == 0) {
      // An out-of-range id (possible only with check_targets=False) gives NaN, never an out-of-row read.
      const float target_x = (target >= 0 && target < vocab) ? cv.to_float(x_row[target]) * inv_t : NAN;
      const RowResult r = state_finish(s, target_x);
      logp[row] = r.logp;
      entropy[row] = r.entropy;
      lse[row] = r.lse;
    }
    __syncthreads();  // warp_states is reused by this block's next row
  }
}

// `logits` and `grad` may be the same memory (in-place gradient), hence no __restrict__ on either.
template <typename T, bool HAS_LOGP, bool HAS_ENT>
__global__ void __launch_bounds__(kMaxThreads)
logprobs_entropy_bwd_kernel(const T* logits, int64_t stride_outer, int64_t stride_inner, int64_t inner, T* grad,
                            int64_t grad_stride_outer, int64_t grad_stride_inner, const void* __restrict__ targets,
                            int targets_int64, const float* __restrict__ lse, const float* __restrict__ entropy,
                            const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                            int64_t n_rows, int64_t vocab, float inv_t, int64_t ignore_index) {
  const CudaConvert<T> cv;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t target = load_target(targets, targets_int64, row);
    const T* x_row = logits + row_offset(row, inner, stride_outer, stride_inner);
    T* g_row = grad + row_offset(row, inner, grad_stride_outer, grad_stride_inner);
    const RowSplit split =
        split_row_pair(reinterpret_cast<uint64_t>(x_row), reinterpret_cast<uint64_t>(g_row), vocab, sizeof(T));
    if (target == ignore_index) {  // zero gradient without reading the row
      thread_row_zero(g_row, split, vocab, threadIdx.x, blockDim.x, cv);
      continue;
    }
    const float g_logp = HAS_LOGP ? grad_logp[row] : 0.0f;
    const float g_ent = HAS_ENT ? grad_entropy[row] : 0.0f;
    thread_row_grad<T, HAS_LOGP, HAS_ENT>(x_row, g_row, split, vocab, threadIdx.x, blockDim.x, target, lse[row],
                                          entropy[row], g_logp, g_ent, inv_t, cv);
  }
}

bool valid_shape(const void* logits, int64_t inner, const void* targets, int64_t n_rows, int64_t vocab,
                 int block_threads) {
  if (n_rows < 0 || vocab < 1 || inner < 1) return false;
  if (n_rows > 0 && (logits == nullptr || targets == nullptr)) return false;
  return block_threads == 0 || (block_threads % kWarp == 0 && block_threads >= kWarp && block_threads <= kMaxThreads);
}

template <typename T>
int pick_threads(int block_threads, int64_t vocab) {
  return block_threads ? block_threads : default_block_threads(vocab, sizeof(T));
}

unsigned grid_size(int64_t n_rows) { return static_cast<unsigned>(n_rows < kMaxGridX ? n_rows : kMaxGridX); }

template <typename T>
cudaError_t launch_fwd(const void* logits, int64_t stride_outer, int64_t stride_inner, int64_t inner,
                       const void* targets, int targets_int64, float* logp, float* entropy, float* lse,
                       int64_t n_rows, int64_t vocab, float inv_t, int64_t ignore_index, int block_threads,
                       cudaStream_t stream) {
  logprobs_entropy_fwd_kernel<T><<<grid_size(n_rows), pick_threads<T>(block_threads, vocab), 0, stream>>>(
      static_cast<const T*>(logits), stride_outer, stride_inner, inner, targets, targets_int64, logp, entropy, lse,
      n_rows, vocab, inv_t, ignore_index);
  return cudaGetLastError();
}

template <typename T, bool HAS_LOGP, bool HAS_ENT>
cudaError_t launch_bwd_masked(const void* logits, int64_t stride_outer, int64_t stride_inner, int64_t inner,
                              void* grad, int64_t grad_stride_outer, int64_t grad_stride_inner, const void* targets,
                              int targets_int64, const float* lse, const float* entropy, const float* grad_logp,
                              const float* grad_entropy, int64_t n_rows, int64_t vocab, float inv_t,
                              int64_t ignore_index, int block_threads, cudaStream_t stream) {
  logprobs_entropy_bwd_kernel<T, HAS_LOGP, HAS_ENT>
      <<<grid_size(n_rows), pick_threads<T>(block_threads, vocab), 0, stream>>>(
          static_cast<const T*>(logits), stride_outer, stride_inner, inner, static_cast<T*>(grad), grad_stride_outer,
          grad_stride_inner, targets, targets_int64, lse, entropy, grad_logp, grad_entropy, n_rows, vocab, inv_t,
          ignore_index);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* logits, int64_t stride_outer, int64_t stride_inner, int64_t inner, void* grad,
                       int64_t grad_stride_outer, int64_t grad_stride_inner, const void* targets, int targets_int64,
                       const float* lse, const float* entropy, const float* grad_logp, const float* grad_entropy,
                       int64_t n_rows, int64_t vocab, float inv_t, int64_t ignore_index, int block_threads,
                       cudaStream_t stream) {
  const bool has_logp = grad_logp != nullptr;
  const bool has_ent = grad_entropy != nullptr;
#define ERPO_LAUNCH_BWD(HAS_LOGP, HAS_ENT)                                                                      \
  return launch_bwd_masked<T, HAS_LOGP, HAS_ENT>(logits, stride_outer, stride_inner, inner, grad,              \
                                                 grad_stride_outer, grad_stride_inner, targets, targets_int64, \
                                                 lse, entropy, grad_logp, grad_entropy, n_rows, vocab, inv_t,  \
                                                 ignore_index, block_threads, stream)
  if (has_logp && has_ent) ERPO_LAUNCH_BWD(true, true);
  if (has_logp) ERPO_LAUNCH_BWD(true, false);
  if (has_ent) ERPO_LAUNCH_BWD(false, true);
  ERPO_LAUNCH_BWD(false, false);
#undef ERPO_LAUNCH_BWD
}

}  // namespace
}  // namespace erpo

extern "C" cudaError_t erpo_logprobs_entropy_fwd(const void* logits, int dtype, int64_t stride_outer,
                                                 int64_t stride_inner, int64_t inner, const void* targets,
                                                 int targets_int64, float* logp, float* entropy, float* lse,
                                                 int64_t n_rows, int64_t vocab, float inv_temperature,
                                                 int64_t ignore_index, int block_threads, cudaStream_t stream) {
  using namespace erpo;
  if (!valid_shape(logits, inner, targets, n_rows, vocab, block_threads)) return cudaErrorInvalidValue;
  if (n_rows > 0 && (logp == nullptr || entropy == nullptr || lse == nullptr)) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  switch (dtype) {
    case ERPO_FLOAT32:
      return launch_fwd<float>(logits, stride_outer, stride_inner, inner, targets, targets_int64, logp, entropy, lse,
                               n_rows, vocab, inv_temperature, ignore_index, block_threads, stream);
    case ERPO_FLOAT16:
      return launch_fwd<__half>(logits, stride_outer, stride_inner, inner, targets, targets_int64, logp, entropy,
                                lse, n_rows, vocab, inv_temperature, ignore_index, block_threads, stream);
    case ERPO_BFLOAT16:
      return launch_fwd<__nv_bfloat16>(logits, stride_outer, stride_inner, inner, targets, targets_int64, logp,
                                       entropy, lse, n_rows, vocab, inv_temperature, ignore_index, block_threads,
                                       stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t erpo_logprobs_entropy_bwd(const void* logits, int dtype, int64_t stride_outer,
                                                 int64_t stride_inner, int64_t inner, void* grad,
                                                 int64_t grad_stride_outer, int64_t grad_stride_inner,
                                                 const void* targets, int targets_int64, const float* lse,
                                                 const float* entropy, const float* grad_logp,
                                                 const float* grad_entropy, int64_t n_rows, int64_t vocab,
                                                 float inv_temperature, int64_t ignore_index, int block_threads,
                                                 cudaStream_t stream) {
  using namespace erpo;
  if (!valid_shape(logits, inner, targets, n_rows, vocab, block_threads)) return cudaErrorInvalidValue;
  if (n_rows > 0 && (grad == nullptr || lse == nullptr || entropy == nullptr)) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  switch (dtype) {
    case ERPO_FLOAT32:
      return launch_bwd<float>(logits, stride_outer, stride_inner, inner, grad, grad_stride_outer, grad_stride_inner,
                               targets, targets_int64, lse, entropy, grad_logp, grad_entropy, n_rows, vocab,
                               inv_temperature, ignore_index, block_threads, stream);
    case ERPO_FLOAT16:
      return launch_bwd<__half>(logits, stride_outer, stride_inner, inner, grad, grad_stride_outer,
                                grad_stride_inner, targets, targets_int64, lse, entropy, grad_logp, grad_entropy,
                                n_rows, vocab, inv_temperature, ignore_index, block_threads, stream);
    case ERPO_BFLOAT16:
      return launch_bwd<__nv_bfloat16>(logits, stride_outer, stride_inner, inner, grad, grad_stride_outer,
                                       grad_stride_inner, targets, targets_int64, lse, entropy, grad_logp,
                                       grad_entropy, n_rows, vocab, inv_temperature, ignore_index, block_threads,
                                       stream);
    default:
      return cudaErrorInvalidValue;
  }
}
