// kernels_impl.h compiled for AVX-512 (F, BW, VL, DQ), in namespace badam::cpu::avx512. The
// target applies only to the functions defined between push_options and pop_options, so the
// library headers included above keep the generic target.
#include "cpu/cpu_kernels.h"

#if BADAM_CPU_X86_SIMD
#include <c10/util/Half.h>
#include <immintrin.h>
#include <stdint.h>

#include <cmath>

#pragma GCC push_options
// GCC 12 warns falsely about the undefined first operand inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// A fused multiply-add rounds once where the contract (and torch) round twice.
#pragma GCC optimize("fp-contract=off")
namespace badam {
namespace cpu {
namespace avx512 {
#include "cpu/simd_scalar.h"
#include "cpu/simd_avx512.h"
#include "cpu/kernels_impl.h"
#include "cpu/sparse_adam_impl.h"
}  // namespace avx512
}  // namespace cpu
}  // namespace badam
#pragma GCC pop_options

const badam::cpu::KernelSet badam::cpu::kAvx512Kernels = {"avx512", &avx512::adamw_range,
                                                          &avx512::sum_squares_range, &avx512::sparse_adam_range};
#endif
