// CUDA implementations of the badam_kernels ops: argument checks, grouping by dtype, the current
// stream, then the pure-CUDA launchers of launchers.h. Built only against a CUDA build of torch
// (setup.py), because CPU builds of torch lack the generated c10/cuda headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "adam_math.h"
#include "op_checks.h"
#include "cuda/launchers.h"
#include "cuda/sparse_adam_launcher.h"
#include "sparse_adam_checks.h"

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

const float* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void fused_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters, double lr, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, c10::string_view master_weights,
                      bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_mul,
                      const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  const at::Device device = n == 0 ? at::Device(at::kCUDA, c10::cuda::current_device()) : params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "the CUDA fused_adamw_ got params[0] on ", device);
  badam::check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, masters, lr, beta1, beta2, eps, weight_decay,
                                step, master_weights, stochastic_rounding, seed, grad_mul, found_inf, device);
  const MasterMode mode = badam::parse_master_mode<MasterMode>(master_weights);
  if (n == 0) return;

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const badam::AdamScalars scalars = badam::make_adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const uint32_t seed32 = badam::fold_seed(seed);

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

void sparse_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList indices, double lr,
                      double beta1, double beta2, double eps, int64_t step, c10::string_view master_weights,
                      const std::optional<at::Tensor>& grad_mul) {
  using badam::cuda::IndexType;
  const size_t n = params.size();
  const at::Device device = n == 0 ? at::Device(at::kCUDA, c10::cuda::current_device()) : params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "the CUDA sparse_adam_ got params[0] on ", device);
  badam::check_sparse_adam_args(params, grads, exp_avgs, exp_avg_sqs, masters, indices, lr, beta1, beta2, eps,
                                step, master_weights, grad_mul, device);
  const MasterMode mode = badam::parse_master_mode<MasterMode>(master_weights);
  if (n == 0) return;

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const bool indexed = !indices.empty();
  // One launcher call per (param dtype, grad dtype, index dtype): the kernels are templated on them.
  std::map<std::tuple<at::ScalarType, at::ScalarType, IndexType>, std::vector<badam::cuda::SparseAdamTensor>> groups;
  for (size_t i = 0; i < n; ++i) {
    badam::cuda::SparseAdamTensor t;
    t.param = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.master = mode == MasterMode::kNone ? nullptr : masters[i].data_ptr();
    t.index = indexed ? indices[i].data_ptr() : nullptr;
    t.numel = grads[i].numel();
    t.param_numel = params[i].numel();
    const IndexType index_type = !indexed ? IndexType::kNone
                                 : indices[i].scalar_type() == at::kLong ? IndexType::kInt64
                                                                          : IndexType::kInt32;
    groups[{params[i].scalar_type(), grads[i].scalar_type(), index_type}].push_back(t);
  }
  for (const auto& [key, tensors] : groups) {
    badam::cuda::SparseAdamConfig config;
    config.param_dtype = to_kernel_dtype(std::get<0>(key));
    config.grad_dtype = to_kernel_dtype(std::get<1>(key));
    config.master_mode = mode;
    config.index_type = std::get<2>(key);
    config.scalars = badam::make_sparse_adam_scalars(lr, beta1, beta2, eps, step);
    config.grad_mul = optional_data(grad_mul);
    C10_CUDA_CHECK(badam::cuda::launch_sparse_adam(tensors.data(), static_cast<int64_t>(tensors.size()), config,
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
    TORCH_CHECK_TYPE(badam::is_float_dtype(t.scalar_type()), "tensors[", i, "] has dtype ", t.scalar_type(),
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
  m.impl("sparse_adam_", &sparse_adam_cuda);
}
