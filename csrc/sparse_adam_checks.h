// Argument checks of badam_kernels::sparse_adam_ shared by the CPU and CUDA implementations,
// built from op_checks.h's helpers. badam_kernels/ops.py checks the same things with the same
// messages before dispatch; they are repeated here because torch.ops.badam_kernels.sparse_adam_
// can be called directly.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "op_checks.h"

namespace badam {

// The selected entries' compact tensor `name`[i] has `numel` elements (those of `of`[i]), lives on
// `device` and is contiguous.
inline void check_compact(const char* name, size_t i, const at::Tensor& t, int64_t numel, const char* of,
                          const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == numel, name, "[", i, "] has ", t.numel(), " elements but ", of, "[", i, "] has ",
                    numel);
  TORCH_CHECK_VALUE(t.device() == device, name, "[", i, "] is on ", t.device(), " but params[0] is on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", i, "] is not contiguous; pass tensor.contiguous()");
}

// Every check of one sparse_adam_ call whose tensors must all be on `device`, except the range of
// the index values (the CPU glue checks it; the CUDA kernel traps on an index out of range).
inline void check_sparse_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList indices,
                                   double lr, double beta1, double beta2, double eps, int64_t step,
                                   c10::string_view master_weights, const std::optional<at::Tensor>& grad_mul,
                                   const at::Device& device) {
  enum class Mode { kNone, kFp32, kRemainder };
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "grads has ", grads.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(exp_avgs.size() == n, "exp_avgs has ", exp_avgs.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == n, "exp_avg_sqs has ", exp_avg_sqs.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(indices.empty() || indices.size() == n, "indices has ", indices.size(),
                    " tensors but params has ", n, " (pass none for contiguous selections)");
  const Mode mode = parse_master_mode<Mode>(master_weights);
  if (mode == Mode::kNone) {
    TORCH_CHECK_VALUE(masters.empty(), "masters were given but master_weights='none'");
  } else {
    TORCH_CHECK_VALUE(masters.size() == n, "masters has ", masters.size(), " tensors but params has ", n);
  }
  check_hyperparameters(lr, beta1, beta2, eps, 0.0, step, 0);
  const bool indexed = !indices.empty();
  const char* of = indexed ? "indices" : "params";
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_float_dtype("params", i, p);
    check_float_dtype("grads", i, grads[i]);
    check_dtype("exp_avgs", i, exp_avgs[i], at::kFloat);
    check_dtype("exp_avg_sqs", i, exp_avg_sqs[i], at::kFloat);
    check_compact("params", i, p, p.numel(), "params", device);
    int64_t numel = p.numel();
    if (indexed) {
      TORCH_CHECK_TYPE(indices[i].scalar_type() == at::kInt || indices[i].scalar_type() == at::kLong, "indices[",
                       i, "] has dtype ", indices[i].scalar_type(), ", expected int32 or int64");
      numel = indices[i].numel();
      check_compact("indices", i, indices[i], numel, "indices", device);
    }
    check_compact("grads", i, grads[i], numel, of, device);
    check_compact("exp_avgs", i, exp_avgs[i], numel, of, device);
    check_compact("exp_avg_sqs", i, exp_avg_sqs[i], numel, of, device);
    TORCH_CHECK_TYPE(mode != Mode::kRemainder || p.scalar_type() == at::kBFloat16,
                     "master_weights='remainder' needs bf16 params, params[", i, "] is ", p.scalar_type());
    TORCH_CHECK_TYPE(mode != Mode::kFp32 || p.scalar_type() != at::kFloat, "params[", i,
                     "] is fp32 and is its own master; use master_weights='none' for fp32 params");
    if (mode != Mode::kNone) {
      check_dtype("masters", i, masters[i], mode == Mode::kFp32 ? at::kFloat : at::kShort);
      check_compact("masters", i, masters[i], numel, of, device);
    }
  }
  check_flag_tensor("grad_mul", grad_mul, device);
}

}  // namespace badam
