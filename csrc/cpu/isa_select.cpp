// Run-time choice of the CPU kernel set: the build never assumes the ISA of the machine it runs
// on (no -march=native); the CPU is asked instead.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <string_view>

#include "cpu/cpu_kernels.h"

namespace badam {
namespace cpu {
namespace {

#if BADAM_CPU_X86_SIMD
// __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

}  // namespace

const KernelSet& active_kernels() {
  const char* forced = std::getenv("BADAM_KERNELS_CPU_ISA");
  const std::string_view isa = forced == nullptr ? "" : forced;
  if (isa == "scalar") return kScalarKernels;
#if BADAM_CPU_X86_SIMD
  if (isa.empty() || isa == "auto") {
    if (cpu_has_avx512()) return kAvx512Kernels;
    if (cpu_has_avx2()) return kAvx2Kernels;
    return kScalarKernels;
  }
  if (isa == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "BADAM_KERNELS_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ");
    return kAvx512Kernels;
  }
  if (isa == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "BADAM_KERNELS_CPU_ISA=avx2 but this CPU lacks AVX2 or F16C");
    return kAvx2Kernels;
  }
  TORCH_CHECK_VALUE(false, "BADAM_KERNELS_CPU_ISA must be avx512, avx2, scalar or auto, got '", isa, "'");
#else
  TORCH_CHECK_VALUE(isa.empty() || isa == "auto", "BADAM_KERNELS_CPU_ISA=", isa,
                    " but this build has only the scalar CPU kernels (set it to scalar or auto)");
  return kScalarKernels;
#endif
}

// The name of the kernel set the CPU ops run now, with the same checks: lets tests (and users)
// confirm that BADAM_KERNELS_CPU_ISA took effect rather than trusting it.
std::string cpu_kernel_isa() { return active_kernels().name; }

}  // namespace cpu
}  // namespace badam

TORCH_LIBRARY_FRAGMENT(badam_kernels, m) { m.def("cpu_kernel_isa() -> str", &badam::cpu::cpu_kernel_isa); }
