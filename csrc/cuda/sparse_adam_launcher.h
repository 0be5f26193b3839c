// Host interface of the pure-CUDA SparseAdam kernels (sparse_adam.cu), badam's ratio mode: the
// update of selected entries whose gradient, Adam state and master are compact arrays.
//
// Plain C++ over raw device pointers, like launchers.h (whose DType and MasterMode it uses).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "adam_math.h"
#include "cuda/launchers.h"

namespace badam {
namespace cuda {

enum class IndexType : uint8_t {
  kNone = 0,   // the param is the contiguous run of selected entries
  kInt32 = 1,  // the param is the whole parameter; entry k is at param[index[k]]
  kInt64 = 2,
};

// One tensor of a SparseAdam call: device pointers; the compact arrays have `numel` elements.
struct SparseAdamTensor {
  void* param;         // bf16 / fp16 / fp32, updated in place
  const void* grad;    // bf16 / fp16 / fp32, compact
  float* exp_avg;      // compact, updated in place
  float* exp_avg_sq;   // compact, updated in place
  void* master;        // compact fp32 (kFp32) or int16 (kRemainder); unused for kNone
  const void* index;   // int32 / int64 positions in param; unused for IndexType::kNone
  int64_t numel;       // selected entries
  int64_t param_numel;  // elements of param: an index outside [0, param_numel) traps the kernel
};

// What every tensor of one launcher call shares.
struct SparseAdamConfig {
  DType param_dtype;
  DType grad_dtype;
  MasterMode master_mode;
  IndexType index_type;
  SparseAdamScalars scalars;
  const float* grad_mul;  // device scalar multiplying every gradient, or nullptr
};

// Updates tensors[0..count) on `stream` with as few launches as the kernel-argument table allows.
// Returns the first CUDA error, or cudaErrorInvalidValue for a dtype/mode combination the kernels
// do not implement (the caller validates user input before calling).
cudaError_t launch_sparse_adam(const SparseAdamTensor* tensors, int64_t count, const SparseAdamConfig& config,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace badam
