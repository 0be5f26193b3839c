// CUDA implementations of the badam_kernels ops: argument checks, grouping by dtype, the current
// stream, then the pure-CUDA launchers of launchers.h. Built only against a CUDA build of torch
// (setup.py), because CPU builds of torch lack the generated c10/cuda headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "adam_math.h"
#include "cuda/launchers.h"

namespace {

using badam::cuda::DType;
using badam::cuda::MasterMode;

DType to_kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "dtype ", dtype, " reached the kernels unchecked");
  }
}

MasterMode parse_master_mode(c10::string_view mode) {
  if (mode == "none") return MasterMode::kNone;
  if (mode == "fp32") return MasterMode::kFp32;
  if (mode == "remainder") return MasterMode::kRemainder;
  TORCH_CHECK_VALUE(false, "master_weights must be 'none', 'fp32' or 'remainder', got '", mode, "'");
}

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The checks of badam_kernels/ops.py, repeated here because the op can be called directly
// through torch.ops.badam_kernels. TORCH_CHECK_TYPE / TORCH_CHECK_VALUE raise TypeError /
// ValueError in Python, as ops.py does.
void check_tensor(const char* name, size_t i, const at::Tensor& t, int64_t numel, const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == numel, name, "[", i, "] has ", t.numel(), " elements but params[", i, "] has ",
                    numel);
  TORCH_CHECK_VALUE(t.device() == device, name, "[", i, "] is on ", t.device(), " but params[0] is on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", i, "] is not contiguous; pass tensor.contiguous()");
}

void check_dtype(const char* name, size_t i, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
                   expected);
}

void check_flag_tensor(const char* name, const std::optional<at::Tensor>& t, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1 && t->scalar_type() == at::kFloat, name,
                    " must be a 0-dim fp32 tensor, got shape ", t->sizes(), " dtype ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == device, name, " is on ", t->device(), " but the params are on ", device);
}

void check_hyperparameters(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                           int64_t seed) {
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

// The per-call constants of adam_math.h: computed in double, then rounded to fp32.
badam::AdamScalars make_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                int64_t step) {
  const double steps = static_cast<double>(step);
  badam::AdamScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, steps)));
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, steps)));
  return s;
}

uint32_t fold_seed(int64_t seed) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  return static_cast<uint32_t>(bits ^ (bits >> 32));
}

const float* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void fused_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters, double lr, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, c10::string_view master_weights,
                      bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_mul,
                      const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "grads has ", grads.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(exp_avgs.size() == n, "exp_avgs has ", exp_avgs.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == n, "exp_avg_sqs has ", exp_avg_sqs.size(), " tensors but params has ", n);
  const MasterMode mode = parse_master_mode(master_weights);
  if (mode == MasterMode::kNone) {
    TORCH_CHECK_VALUE(masters.empty(), "masters were given but master_weights='none'");
  } else {
    TORCH_CHECK_VALUE(masters.size() == n, "masters has ", masters.size(), " tensors but params has ", n);
  }
  TORCH_CHECK_VALUE(!stochastic_rounding || mode == MasterMode::kNone,
                    "stochastic_rounding applies only to master_weights='none'");
  check_hyperparameters(lr, beta1, beta2, eps, weight_decay, step, seed);
  if (n == 0) return;

  const at::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "the CUDA fused_adamw_ got params[0] on ", device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    TORCH_CHECK_TYPE(is_float_dtype(p.scalar_type()), "params[", i, "] has dtype ", p.scalar_type(),
                     ", expected bf16, fp16 or fp32");
    TORCH_CHECK_TYPE(is_float_dtype(grads[i].scalar_type()), "grads[", i, "] has dtype ", grads[i].scalar_type(),
                     ", expected bf16, fp16 or fp32");
    check_dtype("exp_avgs", i, exp_avgs[i], at::kFloat);
    check_dtype("exp_avg_sqs", i, exp_avg_sqs[i], at::kFloat);
    check_tensor("params", i, p, numel, device);
    check_tensor("grads", i, grads[i], numel, device);
    check_tensor("exp_avgs", i, exp_avgs[i], numel, device);
    check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], numel, device);
    TORCH_CHECK_TYPE(mode != MasterMode::kRemainder || p.scalar_type() == at::kBFloat16,
                     "master_weights='remainder' needs bf16 params, params[", i, "] is ", p.scalar_type());
    TORCH_CHECK_TYPE(mode != MasterMode::kFp32 || p.scalar_type() != at::kFloat, "params[", i,
                     "] is fp32 and is its own master; use master_weights='none' for fp32 params");
    TORCH_CHECK_TYPE(!stochastic_rounding || p.scalar_type() == at::kBFloat16,
                     "stochastic_rounding needs bf16 params, params[", i, "] is ", p.scalar_type());
    if (mode != MasterMode::kNone) {
      check_dtype("masters", i, masters[i], mode == MasterMode::kFp32 ? at::kFloat : at::kShort);
      check_tensor("masters", i, masters[i], numel, device);
    }
  }
  check_flag_tensor("grad_mul", grad_mul, device);
  check_flag_tensor("found_inf", found_inf, device);

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const badam::AdamScalars scalars = make_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const uint32_t seed32 = fold_seed(seed);

  // One launcher call per (param dtype, grad dtype): the kernels are templated on both.
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<badam::cuda::AdamWTensor>> groups;
  for (size_t i = 0; i < n; ++i) {
    badam::cuda::AdamWTensor t;
    t.param = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.master = mode == MasterMode::kNone ? nullptr : masters[i].data_ptr();
    t.numel = params[i].numel();
    // The stochastic-rounding stream is keyed by the index in the user's list, not in the group.
    t.sr_key = badam::sr_key(seed32, static_cast<uint32_t>(step), static_cast<uint32_t>(i));
    groups[{params[i].scalar_type(), grads[i].scalar_type()}].push_back(t);
  }
  for (const auto& [dtypes, tensors] : groups) {
    badam::cuda::AdamWConfig config;
    config.param_dtype = to_kernel_dtype(dtypes.first);
    config.grad_dtype = to_kernel_dtype(dtypes.second);
    config.master_mode = mode;
    config.stochastic_rounding = stochastic_rounding;
    config.scalars = scalars;
    config.grad_mul = optional_data(grad_mul);
    config.found_inf = optional_data(found_inf);
    C10_CUDA_CHECK(badam::cuda::launch_fused_adamw(tensors.data(), static_cast<int64_t>(tensors.size()), config,
                                                   stream));
  }
}

at::Tensor grad_norm_cuda(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_norm needs at least one tensor");
  const at::Device device = tensors[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "the CUDA grad_norm got tensors[0] on ", device);
  std::vector<badam::cuda::NormTensor> inputs;
  inputs.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), "tensors[", i, "] has dtype ", t.scalar_type(),
                     ", expected bf16, fp16 or fp32");
    TORCH_CHECK_VALUE(t.device() == device, "tensors[", i, "] is on ", t.device(), " but tensors[0] is on ", device);
    TORCH_CHECK_VALUE(t.is_contiguous(), "tensors[", i, "] is not contiguous; pass tensor.contiguous()");
    inputs.push_back({t.data_ptr(), t.numel(), to_kernel_dtype(t.scalar_type())});
  }

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t count = static_cast<int64_t>(inputs.size());
  const auto fp32 = tensors[0].options().dtype(at::kFloat);
  // Freed when this function returns: the caching allocator only reuses it for work queued later
  // on the same stream, so the kernels below are done with it by then.
  at::Tensor workspace = at::empty({badam::cuda::grad_norm_workspace_size(inputs.data(), count)}, fp32);
  at::Tensor norm = at::empty({}, fp32);
  C10_CUDA_CHECK(badam::cuda::launch_grad_norm(inputs.data(), count, workspace.data_ptr<float>(),
                                               norm.data_ptr<float>(), stream));
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(badam_kernels, CUDA, m) {
  m.impl("fused_adamw_", &fused_adamw_cuda);
  m.impl("grad_norm", &grad_norm_cuda);
}
