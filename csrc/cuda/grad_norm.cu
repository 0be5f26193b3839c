// Multi-tensor L2 norm: one fp32 partial sum of squares per chunk, then a single block adds the
// partials in a fixed order. No floating-point atomics, so the result is bit-reproducible.
#include "cuda/launchers.h"
#include "cuda/multi_tensor.cuh"

namespace badam {
namespace cuda {
namespace {

constexpr int kMaxTensors = 96;

// Kernel argument: the tensors of one launch (see multi_tensor.cuh for the chunk layout).
struct NormTable {
  const void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_begin[kMaxTensors + 1];
  DType dtype[kMaxTensors];
  bool vector_ok[kMaxTensors];
  int32_t count;
};
static_assert(sizeof(NormTable) + sizeof(float*) <= kMaxKernelArgBytes, "kernel arguments exceed the 4 KiB limit");

template <typename T>
__device__ float chunk_sum_squares(const void* data, int64_t chunk_start, int64_t chunk_end, bool vector_ok) {
  using S = typename T::Storage;
  const S* src = static_cast<const S*>(data);
  float sum = 0.0f;
  for (int64_t base = chunk_start + static_cast<int64_t>(threadIdx.x) * kPack; base < chunk_end;
       base += static_cast<int64_t>(kBlockThreads) * kPack) {
    S x[kPack];
    load_pack(src, base, chunk_end, vector_ok, x);
#pragma unroll
    for (int i = 0; i < kPack; ++i) {
      const float f = T::to_float(x[i]);
      sum += f * f;  // out-of-range lanes were loaded as zero
    }
  }
  return sum;
}

// partials[blockIdx.x] = sum of squares of the block's chunk.
__global__ void __launch_bounds__(kBlockThreads) chunk_sum_squares_kernel(NormTable table, float* partials) {
  const int t = owning_tensor(table.chunk_begin, table.count, static_cast<int32_t>(blockIdx.x));
  int64_t chunk_start, chunk_end;
  chunk_bounds(static_cast<int64_t>(blockIdx.x) - table.chunk_begin[t], table.numel[t], chunk_start, chunk_end);
  float sum = 0.0f;
  switch (table.dtype[t]) {  // uniform over the block: one chunk belongs to one tensor
    case DType::kFloat32:
      sum = chunk_sum_squares<Fp32>(table.data[t], chunk_start, chunk_end, table.vector_ok[t]);
      break;
    case DType::kFloat16:
      sum = chunk_sum_squares<Fp16>(table.data[t], chunk_start, chunk_end, table.vector_ok[t]);
      break;
    case DType::kBFloat16:
      sum = chunk_sum_squares<Bf16>(table.data[t], chunk_start, chunk_end, table.vector_ok[t]);
      break;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// norm_out[0] = sqrt(sum of partials[0..count)); one block. The partials are added in double:
// there can be many of them and this kernel costs next to nothing either way.
__global__ void __launch_bounds__(kBlockThreads)
    finish_norm_kernel(const float* partials, int64_t count, float* norm_out) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kBlockThreads) sum += static_cast<double>(partials[i]);
  sum = block_sum(sum);
  if (threadIdx.x == 0) norm_out[0] = static_cast<float>(sqrt(sum));
}

size_t element_size(DType dtype) { return dtype == DType::kFloat32 ? sizeof(float) : sizeof(uint16_t); }

}  // namespace

int64_t grad_norm_workspace_size(const NormTensor* tensors, int64_t count) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < count; ++i) chunks += chunks_of(tensors[i].numel);
  return chunks;
}

cudaError_t launch_grad_norm(const NormTensor* tensors, int64_t count, float* workspace, float* norm_out,
                             cudaStream_t stream) {
  for (int64_t i = 0; i < count; ++i) {
    const DType dtype = tensors[i].dtype;
    if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
      return cudaErrorInvalidValue;
    }
  }
  int64_t partials_written = 0;
  auto fill = [](NormTable& table, int slot, const NormTensor& t) {
    table.data[slot] = t.data;
    table.numel[slot] = t.numel;
    table.dtype[slot] = t.dtype;
    table.vector_ok[slot] = is_aligned(t.data, element_size(t.dtype) * kPack);
  };
  auto launch = [&](const NormTable& table) -> cudaError_t {
    const int32_t blocks = table.chunk_begin[table.count];
    chunk_sum_squares_kernel<<<blocks, kBlockThreads, 0, stream>>>(table, workspace + partials_written);
    partials_written += blocks;
    return cudaGetLastError();
  };
  const cudaError_t err = launch_in_tables<NormTable, kMaxTensors>(tensors, count, fill, launch);
  if (err != cudaSuccess) return err;
  // Also runs with no partials (all tensors empty): the norm is then 0.
  finish_norm_kernel<<<1, kBlockThreads, 0, stream>>>(workspace, partials_written, norm_out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace badam
