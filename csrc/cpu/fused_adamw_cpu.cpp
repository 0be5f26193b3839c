// badam_kernels::fused_adamw_ for CPU tensors: argument checks (op_checks.h), per-tensor kernel descriptors,
// then the run-time chosen SIMD kernels over all tensors' elements in parallel chunks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "adam_math.h"
#include "op_checks.h"
#include "cpu/concatenated_chunks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/elem_type.h"

namespace badam {
namespace cpu {
namespace {

enum class MasterMode { kNone, kFp32, kRemainder };

// The flag's value (`absent` when not given); checked by check_fused_adamw_args.
float read_flag_tensor(const std::optional<at::Tensor>& t, float absent) {
  return t.has_value() ? t->item<float>() : absent;
}

WeightMode weight_mode(MasterMode mode, bool stochastic_rounding) {
  switch (mode) {
    case MasterMode::kFp32:
      return WeightMode::kMasterFp32;
    case MasterMode::kRemainder:
      return WeightMode::kRemainder;
    case MasterMode::kNone:
      break;
  }
  return stochastic_rounding ? WeightMode::kBf16Stochastic : WeightMode::kPlain;
}

void fused_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList masters, double lr, double beta1, double beta2, double eps, double weight_decay,
                     int64_t step, c10::string_view master_weights, bool stochastic_rounding, int64_t seed,
                     const std::optional<at::Tensor>& grad_mul, const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  const at::Device device = n == 0 ? at::Device(at::kCPU) : params[0].device();
  TORCH_CHECK_VALUE(device.is_cpu(), "the CPU fused_adamw_ got params[0] on ", device);
  check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, masters, lr, beta1, beta2, eps, weight_decay, step,
                         master_weights, stochastic_rounding, seed, grad_mul, found_inf, device);
  const MasterMode mode = parse_master_mode<MasterMode>(master_weights);
  const float grad_multiplier = read_flag_tensor(grad_mul, 1.0f);
  // NaN counts as found, as `found_inf != 0` does in the reference.
  if (!(read_flag_tensor(found_inf, 0.0f) == 0.0f)) return;

  const AdamScalars scalars = make_adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const uint32_t seed32 = fold_seed(seed);
  const WeightMode weights = weight_mode(mode, stochastic_rounding);
  std::vector<AdamwTensor> tensors;
  std::vector<int64_t> numels;
  tensors.reserve(n);
  numels.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (params[i].numel() == 0) continue;  // its data pointers may be null
    AdamwTensor t;
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.master = mode == MasterMode::kNone ? nullptr : masters[i].data_ptr();
    t.param_type = elem_type(params[i].scalar_type());
    t.grad_type = elem_type(grads[i].scalar_type());
    t.mode = weights;
    // Keyed by the index in the caller's list, so skipping empty tensors changes nothing.
    t.sr_key = sr_key(seed32, static_cast<uint32_t>(step), static_cast<uint32_t>(i));
    tensors.push_back(t);
    numels.push_back(params[i].numel());
  }

  const KernelSet& kernels = active_kernels();
  ConcatenatedChunks(numels).parallel_for_each_piece([&](int64_t, size_t k, int64_t begin, int64_t end) {
    kernels.adamw_range(tensors[k], scalars, grad_multiplier, begin, end);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace badam

TORCH_LIBRARY_IMPL(badam_kernels, CPU, m) { m.impl("fused_adamw_", &badam::cpu::fused_adamw_cpu); }
