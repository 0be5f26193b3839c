// badam_kernels::fused_adamw_ for CPU tensors: argument checks, per-tensor kernel descriptors,
// then the run-time chosen SIMD kernels over all tensors' elements in parallel chunks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "adam_math.h"
#include "cpu/concatenated_chunks.h"
#include "cpu/cpu_kernels.h"

namespace badam {
namespace cpu {
namespace {

enum class MasterMode { kNone, kFp32, kRemainder };

MasterMode parse_master_mode(c10::string_view mode) {
  if (mode == "none") return MasterMode::kNone;
  if (mode == "fp32") return MasterMode::kFp32;
  if (mode == "remainder") return MasterMode::kRemainder;
  TORCH_CHECK_VALUE(false, "master_weights must be 'none', 'fp32' or 'remainder', got '", mode, "'");
}

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

ElemType elem_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ElemType::kFloat32;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kHalf:
      return ElemType::kFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "dtype ", dtype, " reached the CPU kernels unchecked");
  }
}

// The checks of badam_kernels/ops.py again, because torch.ops.badam_kernels.fused_adamw_ can be
// called directly. TORCH_CHECK_TYPE / TORCH_CHECK_VALUE raise TypeError / ValueError in Python.
void check_tensor(const char* name, size_t i, const at::Tensor& t, int64_t numel) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, "[", i, "] is on ", t.device(), " but the CPU kernel needs CPU tensors");
  TORCH_CHECK_VALUE(t.numel() == numel, name, "[", i, "] has ", t.numel(), " elements but params[", i, "] has ",
                    numel);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", i, "] is not contiguous; pass tensor.contiguous()");
}

void check_dtype(const char* name, size_t i, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
                   expected);
}

void check_float_dtype(const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name, "[", i, "] has dtype ", t.scalar_type(),
                   ", expected bf16, fp16 or fp32");
}

// Returns the flag's value (`absent` when not given).
float read_flag_tensor(const char* name, const std::optional<at::Tensor>& t, float absent) {
  if (!t.has_value()) return absent;
  TORCH_CHECK_VALUE(t->numel() == 1 && t->scalar_type() == at::kFloat, name,
                    " must be a 0-dim fp32 tensor, got shape ", t->sizes(), " dtype ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device().is_cpu(), name, " is on ", t->device(), " but the params are on the CPU");
  return t->item<float>();
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
AdamScalars make_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const double steps = static_cast<double>(step);
  AdamScalars s;
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
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    check_float_dtype("params", i, p);
    check_float_dtype("grads", i, grads[i]);
    check_dtype("exp_avgs", i, exp_avgs[i], at::kFloat);
    check_dtype("exp_avg_sqs", i, exp_avg_sqs[i], at::kFloat);
    check_tensor("params", i, p, numel);
    check_tensor("grads", i, grads[i], numel);
    check_tensor("exp_avgs", i, exp_avgs[i], numel);
    check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], numel);
    TORCH_CHECK_TYPE(mode != MasterMode::kRemainder || p.scalar_type() == at::kBFloat16,
                     "master_weights='remainder' needs bf16 params, params[", i, "] is ", p.scalar_type());
    TORCH_CHECK_TYPE(mode != MasterMode::kFp32 || p.scalar_type() != at::kFloat, "params[", i,
                     "] is fp32 and is its own master; use master_weights='none' for fp32 params");
    TORCH_CHECK_TYPE(!stochastic_rounding || p.scalar_type() == at::kBFloat16,
                     "stochastic_rounding needs bf16 params, params[", i, "] is ", p.scalar_type());
    if (mode != MasterMode::kNone) {
      check_dtype("masters", i, masters[i], mode == MasterMode::kFp32 ? at::kFloat : at::kShort);
      check_tensor("masters", i, masters[i], numel);
    }
  }
  const float grad_multiplier = read_flag_tensor("grad_mul", grad_mul, 1.0f);
  // NaN counts as found, as `found_inf != 0` does in the reference.
  if (!(read_flag_tensor("found_inf", found_inf, 0.0f) == 0.0f)) return;

  const AdamScalars scalars = make_scalars(lr, beta1, beta2, eps, weight_decay, step);
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
