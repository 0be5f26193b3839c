// badam_kernels::grad_norm for CPU tensors: the L2 norm over all elements of all tensors.
// Squares are summed in fp32 SIMD lanes within a chunk and in double across chunks, in a fixed
// order, so the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/concatenated_chunks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/elem_type.h"
#include "op_checks.h"

namespace badam {
namespace cpu {
namespace {

at::Tensor grad_norm_cpu(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_norm needs at least one tensor");
  std::vector<const void*> data;
  std::vector<ElemType> types;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    check_float_dtype("tensors", i, t);
    const ElemType type = elem_type(t.scalar_type());
    TORCH_CHECK_VALUE(t.device().is_cpu(), "tensors[", i, "] is on ", t.device(),
                      " but the CPU kernel needs CPU tensors");
    TORCH_CHECK_VALUE(t.is_contiguous(), "tensors[", i, "] is not contiguous; pass tensor.contiguous()");
    if (t.numel() == 0) continue;
    data.push_back(t.const_data_ptr());
    types.push_back(type);
    numels.push_back(t.numel());
  }

  const KernelSet& kernels = active_kernels();
  const ConcatenatedChunks chunks(numels);
  std::vector<double> chunk_sums(static_cast<size_t>(chunks.num_chunks()), 0.0);
  chunks.parallel_for_each_piece([&](int64_t chunk, size_t k, int64_t begin, int64_t end) {
    chunk_sums[static_cast<size_t>(chunk)] += kernels.sum_squares_range(data[k], types[k], begin, end);
  });
  double total = 0.0;
  for (double s : chunk_sums) total += s;

  at::Tensor norm = at::empty({}, tensors[0].options().dtype(at::kFloat));
  norm.fill_(static_cast<float>(std::sqrt(total)));
  return norm;
}

}  // namespace
}  // namespace cpu
}  // namespace badam

TORCH_LIBRARY_IMPL(badam_kernels, CPU, m) { m.impl("grad_norm", &badam::cpu::grad_norm_cpu); }
