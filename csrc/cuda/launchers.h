// Host interface of the pure-CUDA kernels (fused_adamw.cu, grad_norm.cu).
//
// Plain C++ over raw device pointers: the torch glue (ops_cuda.cpp) and a standalone CMake build
// both include it, and no torch header is needed to compile the kernels behind it.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "adam_math.h"

namespace badam {
namespace cuda {

enum class DType : uint8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class MasterMode : uint8_t {
  kNone = 0,       // the param is the weight (fp32 params, or rounding back to bf16/fp16)
  kFp32 = 1,       // fp32 master holds the weight; param = round-to-nearest-even(master)
  kRemainder = 2,  // bf16 param + int16 remainder are the exact fp32 weight
};

// One tensor of a fused AdamW call: device pointers, all of `numel` elements, contiguous.
struct AdamWTensor {
  void* param;         // bf16 / fp16 / fp32, updated in place
  const void* grad;    // bf16 / fp16 / fp32
  float* exp_avg;      // updated in place
  float* exp_avg_sq;   // updated in place
  void* master;        // fp32 (kFp32), int16 (kRemainder), unused for kNone
  int64_t numel;
  uint32_t sr_key;     // badam::sr_key of the tensor's index in the user's call (stochastic rounding)
};

// What every tensor of one launcher call shares.
struct AdamWConfig {
  DType param_dtype;
  DType grad_dtype;
  MasterMode master_mode;
  bool stochastic_rounding;  // bf16 params with kNone only
  AdamScalars scalars;
  const float* grad_mul;   // device scalar multiplying every gradient, or nullptr
  const float* found_inf;  // device scalar; non-zero means write nothing; or nullptr
};

// Updates tensors[0..count) on `stream` with as few launches as the kernel-argument table allows.
// Returns the first CUDA error, or cudaErrorInvalidValue for a dtype/mode combination the kernels
// do not implement (the caller validates user input before calling).
cudaError_t launch_fused_adamw(const AdamWTensor* tensors, int64_t count, const AdamWConfig& config,
                               cudaStream_t stream);

// One input of grad_norm: a contiguous device tensor.
struct NormTensor {
  const void* data;
  int64_t numel;
  DType dtype;
};

// Number of fp32 partial sums launch_grad_norm needs in its workspace.
int64_t grad_norm_workspace_size(const NormTensor* tensors, int64_t count);

// norm_out[0] = sqrt(sum of squares of every element), computed on `stream` without a host sync
// and deterministically (fixed reduction order, no floating-point atomics).
cudaError_t launch_grad_norm(const NormTensor* tensors, int64_t count, float* workspace,
                             float* norm_out, cudaStream_t stream);

}  // namespace cuda
}  // namespace badam
