// The torch binding of the CUDA launchers (logprobs_entropy.h), built as the extension `erpo._C` only where a
// CUDA build of torch and nvcc exist (see setup.py). Python calls it from erpo/ops/cuda_logprobs_entropy.py
// with a RowLayout's tensor and strides; this file checks what the kernels cannot (devices, dtypes, that the
// rows lie inside the tensor's storage) and launches on torch's current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include "logprobs_entropy.h"

namespace {

int dtype_code(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return ERPO_FLOAT32;
    case at::kHalf:
      return ERPO_FLOAT16;
    case at::kBFloat16:
      return ERPO_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "erpo._C: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == logits.device(), "erpo._C: ", name, " must be on ", logits.device(),
              ", got ", t.device());
}

void check_per_row_floats(const at::Tensor& t, const at::Tensor& logits, int64_t n_rows, const char* name) {
  check_cuda(t, logits, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "erpo._C: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == n_rows, "erpo._C: ", name, " must be a contiguous tensor of ",
              n_rows, " elements, got shape ", t.sizes(), " strides ", t.strides());
}

// The kernels trust the strides: make sure every row they will touch lies inside the tensor's storage.
void check_rows_fit(const at::Tensor& t, int64_t n_rows, int64_t vocab, int64_t inner, int64_t stride_outer,
                    int64_t stride_inner, const char* name) {
  TORCH_CHECK(n_rows >= 0 && vocab >= 1 && inner >= 1, "erpo._C: bad row layout of ", name, " (n_rows=", n_rows,
              ", vocab=", vocab, ", inner=", inner, ")");
  TORCH_CHECK(stride_outer >= 0 && stride_inner >= 0, "erpo._C: negative row strides of ", name);
  TORCH_CHECK(n_rows % inner == 0, "erpo._C: n_rows=", n_rows, " of ", name, " is not a multiple of inner=", inner);
  if (n_rows == 0) return;
  const int64_t last = (n_rows / inner - 1) * stride_outer + (inner - 1) * stride_inner + vocab;
  const int64_t available = static_cast<int64_t>(t.storage().nbytes() / t.element_size()) - t.storage_offset();
  TORCH_CHECK(last <= available, "erpo._C: rows of ", name, " reach element ", last, " but only ", available,
              " are in its storage");
}

void check_targets(const at::Tensor& targets, const at::Tensor& logits, int64_t n_rows) {
  check_cuda(targets, logits, "targets");
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                   "erpo._C: targets must be int32 or int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.is_contiguous() && targets.numel() == n_rows, "erpo._C: targets must be a contiguous tensor of ",
              n_rows, " ids, got shape ", targets.sizes(), " strides ", targets.strides());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "erpo._C: ", what, " failed: ", cudaGetErrorString(err));
}

void forward(const at::Tensor& logits, int64_t stride_outer, int64_t stride_inner, int64_t inner,
             const at::Tensor& targets, at::Tensor& logp, at::Tensor& entropy, at::Tensor& lse, int64_t n_rows,
             int64_t vocab, double inv_temperature, int64_t ignore_index, int64_t block_threads) {
  TORCH_CHECK(logits.is_cuda(), "erpo._C: logits must be a CUDA tensor, got ", logits.device());
  const int dtype = dtype_code(logits);
  check_rows_fit(logits, n_rows, vocab, inner, stride_outer, stride_inner, "logits");
  check_targets(targets, logits, n_rows);
  check_per_row_floats(logp, logits, n_rows, "logp");
  check_per_row_floats(entropy, logits, n_rows, "entropy");
  check_per_row_floats(lse, logits, n_rows, "lse");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(erpo_logprobs_entropy_fwd(logits.data_ptr(), dtype, stride_outer, stride_inner, inner,
                                         targets.data_ptr(), targets.scalar_type() == at::kLong,
                                         logp.data_ptr<float>(), entropy.data_ptr<float>(), lse.data_ptr<float>(),
                                         n_rows, vocab, static_cast<float>(inv_temperature), ignore_index,
                                         static_cast<int>(block_threads), c10::cuda::getCurrentCUDAStream().stream()),
               "logprobs_entropy forward launch");
}

void backward(const at::Tensor& logits, int64_t stride_outer, int64_t stride_inner, int64_t inner, at::Tensor& grad,
              int64_t grad_stride_outer, int64_t grad_stride_inner, const at::Tensor& targets, const at::Tensor& lse,
              const at::Tensor& entropy, const c10::optional<at::Tensor>& grad_logp,
              const c10::optional<at::Tensor>& grad_entropy, int64_t n_rows, int64_t vocab, double inv_temperature,
              int64_t ignore_index, int64_t block_threads) {
  TORCH_CHECK(logits.is_cuda(), "erpo._C: logits must be a CUDA tensor, got ", logits.device());
  const int dtype = dtype_code(logits);
  check_rows_fit(logits, n_rows, vocab, inner, stride_outer, stride_inner, "logits");
  check_cuda(grad, logits, "grad");
  TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(), "erpo._C: grad must have the logits' dtype ",
                   logits.scalar_type(), ", got ", grad.scalar_type());
  check_rows_fit(grad, n_rows, vocab, inner, grad_stride_outer, grad_stride_inner, "grad");
  check_targets(targets, logits, n_rows);
  check_per_row_floats(lse, logits, n_rows, "lse");
  check_per_row_floats(entropy, logits, n_rows, "entropy");
  if (grad_logp) check_per_row_floats(*grad_logp, logits, n_rows, "grad_logp");
  if (grad_entropy) check_per_row_floats(*grad_entropy, logits, n_rows, "grad_entropy");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(erpo_logprobs_entropy_bwd(logits.data_ptr(), dtype, stride_outer, stride_inner, inner, grad.data_ptr(),
                                         grad_stride_outer, grad_stride_inner, targets.data_ptr(),
                                         targets.scalar_type() == at::kLong, lse.data_ptr<float>(),
                                         entropy.data_ptr<float>(), grad_logp ? grad_logp->data_ptr<float>() : nullptr,
                                         grad_entropy ? grad_entropy->data_ptr<float>() : nullptr, n_rows, vocab,
                                         static_cast<float>(inv_temperature), ignore_index,
                                         static_cast<int>(block_threads), c10::cuda::getCurrentCUDAStream().stream()),
               "logprobs_entropy backward launch");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "erpo's CUDA kernels of the fused log-prob + entropy op (see csrc/logprobs_entropy.cu)";
  m.def("logprobs_entropy_fwd", &forward, "per-row logp, entropy, lse into preallocated float32 outputs",
        py::arg("logits"), py::arg("stride_outer"), py::arg("stride_inner"), py::arg("inner"), py::arg("targets"),
        py::arg("logp"), py::arg("entropy"), py::arg("lse"), py::arg("n_rows"), py::arg("vocab"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("block_threads") = 0);
  m.def("logprobs_entropy_bwd", &backward, "dlogits into grad (which may be logits itself)", py::arg("logits"),
        py::arg("stride_outer"), py::arg("stride_inner"), py::arg("inner"), py::arg("grad"),
        py::arg("grad_stride_outer"), py::arg("grad_stride_inner"), py::arg("targets"), py::arg("lse"),
        py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("n_rows"), py::arg("vocab"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("block_threads") = 0);
}
