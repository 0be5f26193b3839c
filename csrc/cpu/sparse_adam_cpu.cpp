// badam_kernels::sparse_adam_ for CPU tensors: argument checks (sparse_adam_checks.h), the index
// range, per-tensor descriptors, then the run-time chosen SIMD kernels over all tensors' selected
// entries in parallel chunks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "adam_math.h"
#include "cpu/concatenated_chunks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/elem_type.h"
#include "sparse_adam_checks.h"

namespace badam {
namespace cpu {
namespace {

enum class MasterMode { kNone, kFp32, kRemainder };

WeightMode weight_mode(MasterMode mode) {
  switch (mode) {
    case MasterMode::kFp32:
      return WeightMode::kMasterFp32;
    case MasterMode::kRemainder:
      return WeightMode::kRemainder;
    case MasterMode::kNone:
      break;
  }
  return WeightMode::kPlain;
}

// Checked before anything is written, so a bad index leaves every tensor as it was. One
// vectorised pass over the indices: a few percent of the update's memory traffic.
void check_index_range(const at::Tensor& index, int64_t param_numel, size_t i) {
  if (index.numel() == 0) return;
  const auto [low, high] = at::aminmax(index);
  const int64_t lowest = low.item<int64_t>();
  const int64_t highest = high.item<int64_t>();
  TORCH_CHECK_INDEX(lowest >= 0 && highest < param_numel, "indices[", i, "] holds values in [", lowest, ", ",
                    highest, "] but params[", i, "] has ", param_numel, " elements");
}

void sparse_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList masters, at::TensorList indices, double lr, double beta1, double beta2, double eps,
                     int64_t step, c10::string_view master_weights, const std::optional<at::Tensor>& grad_mul) {
  const size_t n = params.size();
  const at::Device device = n == 0 ? at::Device(at::kCPU) : params[0].device();
  TORCH_CHECK_VALUE(device.is_cpu(), "the CPU sparse_adam_ got params[0] on ", device);
  check_sparse_adam_args(params, grads, exp_avgs, exp_avg_sqs, masters, indices, lr, beta1, beta2, eps, step,
                         master_weights, grad_mul, device);
  const bool indexed = !indices.empty();
  for (size_t i = 0; indexed && i < n; ++i) check_index_range(indices[i], params[i].numel(), i);
  const MasterMode mode = parse_master_mode<MasterMode>(master_weights);
  const float grad_multiplier = grad_mul.has_value() ? grad_mul->item<float>() : 1.0f;

  const SparseAdamScalars scalars = make_sparse_adam_scalars(lr, beta1, beta2, eps, step);
  std::vector<SparseAdamTensor> tensors;
  std::vector<int64_t> numels;
  tensors.reserve(n);
  numels.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = grads[i].numel();
    if (numel == 0) continue;  // its data pointers may be null
    SparseAdamTensor t;
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.master = mode == MasterMode::kNone ? nullptr : masters[i].data_ptr();
    t.index = indexed ? indices[i].const_data_ptr() : nullptr;
    t.param_type = elem_type(params[i].scalar_type());
    t.grad_type = elem_type(grads[i].scalar_type());
    t.mode = weight_mode(mode);
    t.index_is_int64 = indexed && indices[i].scalar_type() == at::kLong;
    tensors.push_back(t);
    numels.push_back(numel);
  }

  const KernelSet& kernels = active_kernels();
  ConcatenatedChunks(numels).parallel_for_each_piece([&](int64_t, size_t k, int64_t begin, int64_t end) {
    kernels.sparse_adam_range(tensors[k], scalars, grad_multiplier, begin, end);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace badam

TORCH_LIBRARY_IMPL(badam_kernels, CPU, m) { m.impl("sparse_adam_", &badam::cpu::sparse_adam_cpu); }
