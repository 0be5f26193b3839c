// torch dtype -> the CPU kernels' ElemType, for the ATen glue (cpu_kernels.h stays ATen-free).
#pragma once

#include <ATen/ATen.h>

#include "cpu/cpu_kernels.h"

namespace badam {
namespace cpu {

// Only for dtypes already checked with is_float_dtype (op_checks.h).
inline ElemType elem_type(at::ScalarType dtype) {
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

}  // namespace cpu
}  // namespace badam
