// kernels_impl.h compiled for the build's baseline target, one element at a time: the fallback
// for CPUs without AVX2 and for compilers without `#pragma GCC target`.
#include <c10/util/Half.h>
#include <stdint.h>

#include <cmath>

#include "cpu/cpu_kernels.h"

// A fused multiply-add rounds once where the contract (and torch) round twice; builds with an
// -march that has FMA would otherwise contract the update.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
namespace badam {
namespace cpu {
namespace scalar {
#include "cpu/simd_scalar.h"
using Simd = ScalarSimd;
#include "cpu/kernels_impl.h"
#include "cpu/sparse_adam_impl.h"
}  // namespace scalar
}  // namespace cpu
}  // namespace badam
#pragma GCC pop_options

namespace badam {
namespace cpu {
const KernelSet kScalarKernels = {"scalar", &scalar::adamw_range, &scalar::sum_squares_range,
                                  &scalar::sparse_adam_range};
}  // namespace cpu
}  // namespace badam
