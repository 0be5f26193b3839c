// The interface between the CPU op glue (argument checks, threads, registration) and the
// per-instruction-set kernels. Plain C++ only: no ATen and no intrinsics, so every translation
// unit can include it whatever its target.
#pragma once

#include <math.h>  // adam_math.h uses sqrtf without including it
#include <stdint.h>

#include "adam_math.h"

// The AVX2 and AVX-512 kernels are compiled with GCC's `#pragma GCC target` (clang ignores that
// pragma); other compilers and CPUs get the portable scalar kernels only.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define BADAM_CPU_X86_SIMD 1
#else
#define BADAM_CPU_X86_SIMD 0
#endif

namespace badam {
namespace cpu {

// How a tensor's elements are stored.
enum class ElemType : uint8_t { kFloat32, kBFloat16, kFloat16 };

// Where the fp32 weight of an element lives and how it is written back (DESIGN.md, master modes).
enum class WeightMode : uint8_t {
  kPlain,           // the param is the weight; fp32 exact, bf16/fp16 round to nearest even
  kBf16Stochastic,  // bf16 param, stochastic rounding keyed by sr_key and the element index
  kMasterFp32,      // fp32 master is the weight; the bf16/fp16 param is its nearest-even copy
  kRemainder,       // bf16 param bits << 16 + int16 remainder is the weight
};

// One tensor of a fused_adamw_ call, already validated.
struct AdamwTensor {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* master;  // fp32 master or int16 remainder; null for kPlain and kBf16Stochastic
  ElemType param_type;
  ElemType grad_type;
  WeightMode mode;
  uint32_t sr_key;  // badam::sr_key(fold(seed), step, index of the tensor in the call)
};

// One tensor of a sparse_adam_ call (SparseAdam on selected entries), already validated. The
// selected entries' gradient, Adam state and master are compact arrays; the param is either the
// contiguous run of selected entries (index null) or the whole parameter, reached through index.
struct SparseAdamTensor {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* master;       // compact fp32 master or int16 remainder; null for kPlain
  const void* index;  // null, or int32/int64 positions in param, one per selected entry
  ElemType param_type;
  ElemType grad_type;
  WeightMode mode;  // kPlain, kMasterFp32 or kRemainder
  bool index_is_int64;
};

// The kernels of one instruction set. Ranges are element indices [begin, end) of one tensor.
struct KernelSet {
  const char* name;
  void (*adamw_range)(const AdamwTensor& tensor, const AdamScalars& scalars, float grad_mul, int64_t begin,
                      int64_t end);
  // Sum of squares, accumulated in fp32 lanes and returned in double.
  double (*sum_squares_range)(const void* data, ElemType type, int64_t begin, int64_t end);
  // Ranges of selected entries (positions in the compact arrays).
  void (*sparse_adam_range)(const SparseAdamTensor& tensor, const SparseAdamScalars& scalars, float grad_mul,
                            int64_t begin, int64_t end);
};

extern const KernelSet kScalarKernels;
#if BADAM_CPU_X86_SIMD
extern const KernelSet kAvx2Kernels;
extern const KernelSet kAvx512Kernels;
#endif

// The fastest kernel set this CPU supports, or the one forced by the environment variable
// BADAM_KERNELS_CPU_ISA=avx512|avx2|scalar (read on every call, for tests and benchmarks).
const KernelSet& active_kernels();

}  // namespace cpu
}  // namespace badam
