// kernels_impl.h compiled for AVX2 with F16C, in namespace badam::cpu::avx2 (see
// kernels_avx512.cpp for why the target is scoped with push_options).
#include "cpu/cpu_kernels.h"

#if BADAM_CPU_X86_SIMD
#include <c10/util/Half.h>
#include <immintrin.h>
#include <stdint.h>

#include <cmath>

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
// A fused multiply-add rounds once where the contract (and torch) round twice.
#pragma GCC optimize("fp-contract=off")
namespace badam {
namespace cpu {
namespace avx2 {
#include "cpu/simd_scalar.h"
#include "cpu/simd_avx2.h"
#include "cpu/kernels_impl.h"
#include "cpu/sparse_adam_impl.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace badam
#pragma GCC pop_options

const badam::cpu::KernelSet badam::cpu::kAvx2Kernels = {"avx2", &avx2::adamw_range, &avx2::sum_squares_range,
                                                        &avx2::sparse_adam_range};
#endif
