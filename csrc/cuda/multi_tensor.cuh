// Building blocks shared by the multi-tensor kernels: chunking, element types, packed loads.
//
// Layout of a launch (the idea of apex's multi_tensor_apply): the host packs the pointers of up to
// N tensors into a kernel-argument table; tensor t owns the consecutive CUDA blocks
// [chunk_begin[t], chunk_begin[t + 1]), one block per chunk of kChunkSize elements. Storing chunk
// offsets per tensor (not per block) lets one launch cover tensors of any size.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <limits.h>
#include <stdint.h>

#include "adam_math.h"

namespace badam {
namespace cuda {

// Elements per chunk (= per CUDA block): large enough to amortise the table lookup, small enough
// that a single large tensor still spreads over every SM.
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockThreads = 512;
// Elements per thread per loop iteration: four fp32 values are one 16-byte load.
constexpr int kPack = 4;
// The CUDA limit on kernel arguments that every toolkit and architecture accepts.
constexpr size_t kMaxKernelArgBytes = 4096;

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Element types: the storage type in memory and the conversions to and from fp32. 16-bit floats
// are handled as raw bits so that bf16 rounding is exactly adam_math.h's.
struct Fp32 {
  using Storage = float;
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

struct Fp16 {
  using Storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

struct Bf16 {
  using Storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t x) { return bf16_bits_to_float(x); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return float_to_bf16_bits_rne(x); }
};

// The tensor that owns block `block`: the last t with chunk_begin[t] <= block. The host never
// puts an empty tensor in a table, so the offsets increase strictly.
template <int N>
__device__ __forceinline__ int owning_tensor(const int32_t (&chunk_begin)[N], int count, int32_t block) {
  int low = 0, high = count - 1;
  while (low < high) {
    const int mid = (low + high + 1) / 2;
    if (chunk_begin[mid] <= block) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return low;
}

// Elements [start, end) of a tensor's `chunk`-th chunk.
__device__ __forceinline__ void chunk_bounds(int64_t chunk, int64_t numel, int64_t& start, int64_t& end) {
  start = chunk * kChunkSize;
  end = numel - start < kChunkSize ? numel : start + kChunkSize;
}

// Packs the non-empty tensors of tensors[0..count) into kernel-argument tables of up to
// kMaxTensors and calls launch(table) for each full table and the final one. fill(table, slot,
// tensor) stores a tensor's pointers in `slot`; the chunk offsets and the count are kept here.
// Table needs `int32_t chunk_begin[kMaxTensors + 1]` and `int32_t count`; Tensor needs `numel`.
template <typename Table, int kMaxTensors, typename Tensor, typename Fill, typename Launch>
cudaError_t launch_in_tables(const Tensor* tensors, int64_t count, const Fill& fill, const Launch& launch) {
  Table table{};  // count 0, chunk_begin[0] 0
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& t = tensors[i];
    if (t.numel == 0) continue;
    const int64_t chunks = chunks_of(t.numel);
    if (chunks > INT_MAX) return cudaErrorInvalidValue;
    // The grid size (and chunk_begin) must stay within int32.
    if (table.count == kMaxTensors || chunks > INT_MAX - table.chunk_begin[table.count]) {
      const cudaError_t err = launch(table);
      table.count = 0;
      if (err != cudaSuccess) return err;
    }
    const int slot = table.count;
    fill(table, slot, t);
    table.chunk_begin[slot + 1] = table.chunk_begin[slot] + static_cast<int32_t>(chunks);
    table.count = slot + 1;
  }
  return table.count > 0 ? launch(table) : cudaSuccess;
}

template <typename T>
struct alignas(sizeof(T) * kPack) Pack {
  T v[kPack];
};

// Loads elements [base, base + kPack) of `src`: one vector load when the whole pack is in range
// and the tensor's pointer is aligned, otherwise element by element up to `end`.
template <typename T>
__device__ __forceinline__ void load_pack(const T* src, int64_t base, int64_t end, bool vector_ok,
                                          T (&out)[kPack]) {
  if (vector_ok && base + kPack <= end) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(src + base);
#pragma unroll
    for (int i = 0; i < kPack; ++i) out[i] = pack.v[i];
  } else {
#pragma unroll
    for (int i = 0; i < kPack; ++i) out[i] = base + i < end ? src[base + i] : T(0);
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* dst, int64_t base, int64_t end, bool vector_ok,
                                           const T (&in)[kPack]) {
  if (vector_ok && base + kPack <= end) {
    Pack<T> pack;
#pragma unroll
    for (int i = 0; i < kPack; ++i) pack.v[i] = in[i];
    *reinterpret_cast<Pack<T>*>(dst + base) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < kPack; ++i) {
      if (base + i < end) dst[base + i] = in[i];
    }
  }
}

// Sum of `value` over the block, in a fixed order (warp shuffles, then one warp over the warp
// sums), so the result is bit-reproducible. Every thread must call it; thread 0 gets the sum.
template <typename T>
__device__ __forceinline__ T block_sum(T value) {
  __shared__ T warp_sums[kBlockThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kBlockThreads / 32 ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

}  // namespace cuda
}  // namespace badam
