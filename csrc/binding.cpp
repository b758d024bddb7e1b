// The torch binding of the CUDA launchers (logprobs_entropy.h, policy_loss_token.h), built as the extension
// `erpo._C` only where a CUDA build of torch and nvcc exist (see setup.py). Python calls it from
// erpo/ops/cuda_logprobs_entropy.py with a RowLayout's tensor and strides; this file checks what the kernels
// cannot (devices, dtypes, that the rows lie inside the tensor's storage) and launches on torch's current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include "logprobs_entropy.h"
#include "policy_loss_token.h"
#include "token_loss_math.h"  // erpo::Objective

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

void check_token_array(const at::Tensor& t, const at::Tensor& like, const char* name, bool flags = false) {
  check_cuda(t, like, name);
  const at::ScalarType type = t.scalar_type();
  const bool dtype_ok = flags ? (type == at::kChar || type == at::kBool) : type == at::kFloat;
  TORCH_CHECK_TYPE(dtype_ok, "erpo._C: ", name, flags ? " must be int8 or bool" : " must be float32", ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == like.numel(), "erpo._C: ", name, " must be a contiguous tensor of ",
              like.numel(), " elements, got shape ", t.sizes());
}

const float* optional_token_array(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t) return nullptr;
  check_token_array(*t, like, name);
  return t->data_ptr<float>();
}

void policy_loss_token(const at::Tensor& logp, const at::Tensor& entropy, const at::Tensor& old, const at::Tensor& adv,
                       const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& klcov_w,
                       const c10::optional<at::Tensor>& log_ratio, const c10::optional<at::Tensor>& seq_coef,
                       const c10::optional<at::Tensor>& eps_low_t, const c10::optional<at::Tensor>& eps_high_t,
                       const c10::optional<at::Tensor>& kl_weight, const c10::optional<at::Tensor>& pg_weight,
                       at::Tensor& loss, at::Tensor& dlogp, at::Tensor& dentropy, at::Tensor& clip_low,
                       at::Tensor& clip_high, double eps_low, double eps_high, double dual_clip_c, double kl_coef,
                       double entropy_coef, c10::optional<double> delta, double cispo_max, double sapo_tau_pos,
                       double sapo_tau_neg, int64_t objective, bool dual_clip, bool cispo_upper, int64_t kl_estimator,
                       bool kl_bias) {
  TORCH_CHECK(logp.is_cuda(), "erpo._C: logp must be a CUDA tensor, got ", logp.device());
  TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 3, "erpo._C: kl_estimator must be 1 (k1), 2 (k2) or 3 (k3), got ",
              kl_estimator);
  TORCH_CHECK(objective >= erpo::kClip && objective <= erpo::kGmpo,
              "erpo._C: objective must be an erpo.losses.objectives.Objective, got ", objective);
  TORCH_CHECK(seq_coef || (objective != erpo::kVespo && objective != erpo::kGmpo), "erpo._C: objective ", objective,
              " (vespo/gmpo) needs seq_coef");
  check_token_array(logp, logp, "logp");
  check_token_array(entropy, logp, "entropy");
  check_token_array(old, logp, "old_logp");
  check_token_array(adv, logp, "advantages");
  check_token_array(loss, logp, "loss");
  check_token_array(dlogp, logp, "dlogp");
  check_token_array(dentropy, logp, "dentropy");
  check_token_array(clip_low, logp, "clip_low", true);
  check_token_array(clip_high, logp, "clip_high", true);
  const c10::cuda::CUDAGuard guard(logp.device());
  check_launch(erpo_policy_loss_token(
                   logp.data_ptr<float>(), entropy.data_ptr<float>(), old.data_ptr<float>(), adv.data_ptr<float>(),
                   optional_token_array(ref, logp, "ref_logp"), optional_token_array(klcov_w, logp, "klcov_w"),
                   optional_token_array(log_ratio, logp, "log_ratio"), optional_token_array(seq_coef, logp, "seq_coef"),
                   optional_token_array(eps_low_t, logp, "eps_low"), optional_token_array(eps_high_t, logp, "eps_high"),
                   optional_token_array(kl_weight, logp, "kl_weight"),
                   optional_token_array(pg_weight, logp, "pg_weight"),
                   loss.data_ptr<float>(), dlogp.data_ptr<float>(), dentropy.data_ptr<float>(),
                   static_cast<int8_t*>(clip_low.data_ptr()), static_cast<int8_t*>(clip_high.data_ptr()), logp.numel(),
                   static_cast<float>(eps_low), static_cast<float>(eps_high), static_cast<float>(1.0 - eps_low),
                   static_cast<float>(1.0 + eps_high), static_cast<float>(dual_clip_c), static_cast<float>(kl_coef),
                   static_cast<float>(entropy_coef), static_cast<float>(delta ? *delta : 0.0),
                   static_cast<float>(cispo_max), static_cast<float>(sapo_tau_pos), static_cast<float>(sapo_tau_neg),
                   static_cast<int>(objective), dual_clip, delta.has_value(), cispo_upper,
                   static_cast<int>(kl_estimator), kl_bias, c10::cuda::getCurrentCUDAStream().stream()),
               "policy_loss_token launch");
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
  m.def("policy_loss_token", &policy_loss_token,
        "per-token loss, dloss/dlogp, dloss/dH and clip flags into preallocated outputs (csrc/token_loss_math.h)",
        py::arg("logp"), py::arg("entropy"), py::arg("old_logp"), py::arg("advantages"), py::arg("ref_logp"),
        py::arg("klcov_w"), py::arg("log_ratio"), py::arg("seq_coef"), py::arg("eps_low_t"), py::arg("eps_high_t"),
        py::arg("kl_weight"), py::arg("pg_weight"), py::arg("loss"), py::arg("dlogp"), py::arg("dentropy"),
        py::arg("clip_low"), py::arg("clip_high"), py::arg("eps_low"), py::arg("eps_high"), py::arg("dual_clip_c"),
        py::arg("kl_coef"), py::arg("entropy_coef"), py::arg("delta"), py::arg("cispo_max"), py::arg("sapo_tau_pos"),
        py::arg("sapo_tau_neg"), py::arg("objective"), py::arg("dual_clip"), py::arg("cispo_upper"),
        py::arg("kl_estimator"), py::arg("kl_bias"));
}
