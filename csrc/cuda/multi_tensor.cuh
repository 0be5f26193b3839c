// Building blocks shared by the multi-tensor kernels: chunking, element types, packed loads.
//
// Layout of a launch (the idea of apex's multi_tensor_apply): the host packs the pointers of up to
// N tensors into a kernel-argument table; tensor t owns the consecutive CUDA blocks
// [chunk_begin[t], chunk_begin[t + 1]), one block per chunk of kChunkSize elements. Storing chunk
// offsets per tensor (not per block) lets one launch cover tensors of any size.
#pragma once

#include <cuda_fp16.h>
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
