// Argument checks of badam_kernels::fused_adamw_ shared by the CPU and CUDA implementations.
//
// badam_kernels/ops.py checks the same things with the same messages before dispatch; they are
// repeated here because torch.ops.badam_kernels.fused_adamw_ can be called directly.
// TORCH_CHECK_TYPE / TORCH_CHECK_VALUE raise TypeError / ValueError in Python, as ops.py does.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace badam {

// Maps the master_weights string to a backend's own enum (each backend has a MasterMode with
// kNone, kFp32 and kRemainder).
template <typename Mode>
Mode parse_master_mode(c10::string_view mode) {
  if (mode == "none") return Mode::kNone;
  if (mode == "fp32") return Mode::kFp32;
  if (mode == "remainder") return Mode::kRemainder;
  TORCH_CHECK_VALUE(false, "master_weights must be 'none', 'fp32' or 'remainder', got '", mode, "'");
}

inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

inline void check_float_dtype(const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name, "[", i, "] has dtype ", t.scalar_type(),
                   ", expected bf16, fp16 or fp32");
}

inline void check_dtype(const char* name, size_t i, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
                   expected);
}

// Same element count as params[i], on the call's device, contiguous.
inline void check_tensor(const char* name, size_t i, const at::Tensor& t, int64_t numel, const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == numel, name, "[", i, "] has ", t.numel(), " elements but params[", i, "] has ",
                    numel);
  TORCH_CHECK_VALUE(t.device() == device, name, "[", i, "] is on ", t.device(), " but params[0] is on ", device);
  // Not "pass tensor.contiguous()": params, state and masters are updated in place, and a copy
  // would take the update while the caller's tensor stayed unchanged.
  TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", i, "] is not contiguous; the op needs contiguous tensors and ",
                    "updates params, state and masters in place: make those tensors themselves contiguous ",
                    "(a .contiguous() copy would take the update)");
}

// grad_mul / found_inf: absent, or a 0-dim fp32 tensor on the params' device.
inline void check_flag_tensor(const char* name, const std::optional<at::Tensor>& t, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1 && t->scalar_type() == at::kFloat, name,
                    " must be a 0-dim fp32 tensor, got shape ", t->sizes(), " dtype ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == device, name, " is on ", t->device(), " but the params are on ", device);
}

inline void check_hyperparameters(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  int64_t step, int64_t seed) {
  // Written so that NaN fails every check.
  TORCH_CHECK_VALUE(lr >= 0.0 && std::isfinite(lr), "lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0 && std::isfinite(weight_decay), "weight_decay must be finite and >= 0, got ",
                    weight_decay);
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (the first step is 1), got ", step);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be in [0, 2**63), got ", seed);
}

// Every check of one fused_adamw_ call whose tensors must all be on `device`.
inline void check_fused_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList masters, double lr, double beta1,
                                   double beta2, double eps, double weight_decay, int64_t step,
                                   c10::string_view master_weights, bool stochastic_rounding, int64_t seed,
                                   const std::optional<at::Tensor>& grad_mul,
                                   const std::optional<at::Tensor>& found_inf, const at::Device& device) {
  enum class Mode { kNone, kFp32, kRemainder };
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "grads has ", grads.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(exp_avgs.size() == n, "exp_avgs has ", exp_avgs.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == n, "exp_avg_sqs has ", exp_avg_sqs.size(), " tensors but params has ", n);
  const Mode mode = parse_master_mode<Mode>(master_weights);
  if (mode == Mode::kNone) {
    TORCH_CHECK_VALUE(masters.empty(), "masters were given but master_weights='none'");
  } else {
    TORCH_CHECK_VALUE(masters.size() == n, "masters has ", masters.size(), " tensors but params has ", n);
  }
  TORCH_CHECK_VALUE(!stochastic_rounding || mode == Mode::kNone,
                    "stochastic_rounding applies only to master_weights='none'");
  check_hyperparameters(lr, beta1, beta2, eps, weight_decay, step, seed);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    check_float_dtype("params", i, p);
    check_float_dtype("grads", i, grads[i]);
    check_dtype("exp_avgs", i, exp_avgs[i], at::kFloat);
    check_dtype("exp_avg_sqs", i, exp_avg_sqs[i], at::kFloat);
    check_tensor("params", i, p, numel, device);
    check_tensor("grads", i, grads[i], numel, device);
    check_tensor("exp_avgs", i, exp_avgs[i], numel, device);
    check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], numel, device);
    TORCH_CHECK_TYPE(mode != Mode::kRemainder || p.scalar_type() == at::kBFloat16,
                     "master_weights='remainder' needs bf16 params, params[", i, "] is ", p.scalar_type());
    TORCH_CHECK_TYPE(mode != Mode::kFp32 || p.scalar_type() != at::kFloat, "params[", i,
                     "] is fp32 and is its own master; use master_weights='none' for fp32 params");
    TORCH_CHECK_TYPE(!stochastic_rounding || p.scalar_type() == at::kBFloat16,
                     "stochastic_rounding needs bf16 params, params[", i, "] is ", p.scalar_type());
    if (mode != Mode::kNone) {
      check_dtype("masters", i, masters[i], mode == Mode::kFp32 ? at::kFloat : at::kShort);
      check_tensor("masters", i, masters[i], numel, device);
    }
  }
  check_flag_tensor("grad_mul", grad_mul, device);
  check_flag_tensor("found_inf", found_inf, device);
}

}  // namespace badam
