// Multi-tensor SparseAdam on selected entries (badam's ratio mode), with the per-element math of
// adam_math.h's sparse_adam_update and the weight handling of fused_adamw.cu: one pass over the
// compact gradient, exp_avg, exp_avg_sq and master, and over the selected param entries, which
// are a contiguous run or are reached through an int32/int64 index.
#include <type_traits>

#include "adam_math.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/sparse_adam_launcher.h"

namespace badam {
namespace cuda {
namespace {

constexpr int kMaxTensors = 48;

// Kernel argument: the tensors of one launch (see multi_tensor.cuh for the chunk layout).
struct SparseAdamTable {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  void* master[kMaxTensors];
  const void* index[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t param_numel[kMaxTensors];
  int32_t chunk_begin[kMaxTensors + 1];
  bool vector_ok[kMaxTensors];  // every compact pointer (and a contiguous param) allows Pack-wide accesses
  int32_t count;
};
static_assert(sizeof(SparseAdamTable) + sizeof(SparseAdamScalars) + sizeof(float*) <= kMaxKernelArgBytes,
              "kernel arguments exceed the 4 KiB limit");

template <MasterMode kMode>
struct MasterStorage {
  using type = float;
};
template <>
struct MasterStorage<MasterMode::kRemainder> {
  using type = int16_t;
};

// One selected entry: the weight from the param value and/or master (per mode), the update, and
// the new param value and master written back in place.
template <typename ParamT, MasterMode kMode>
__device__ __forceinline__ void update_entry(float g, typename ParamT::Storage& param,
                                             typename MasterStorage<kMode>::type& master, float& m, float& v,
                                             const SparseAdamScalars& scalars) {
  float w;
  if constexpr (kMode == MasterMode::kFp32) {
    w = master;
  } else if constexpr (kMode == MasterMode::kRemainder) {
    w = remainder_decode(param, master);
  } else {
    w = ParamT::to_float(param);
  }
  sparse_adam_update(g, w, m, v, scalars);
  if constexpr (kMode == MasterMode::kRemainder) {
    uint16_t param_bits;
    int16_t remainder;
    remainder_encode(w, param_bits, remainder);
    param = param_bits;
    master = remainder;
  } else {
    param = ParamT::from_float(w);
    if constexpr (kMode == MasterMode::kFp32) master = w;
  }
}

// Index is void for a contiguous run, else the index element type.
template <typename ParamT, typename GradT, MasterMode kMode, typename Index>
__global__ void __launch_bounds__(kBlockThreads)
    sparse_adam_kernel(SparseAdamTable table, SparseAdamScalars scalars, const float* grad_mul) {
  using P = typename ParamT::Storage;
  using G = typename GradT::Storage;
  using M = typename MasterStorage<kMode>::type;
  constexpr bool kIndexed = !std::is_void<Index>::value;
  using I = typename std::conditional<kIndexed, Index, int32_t>::type;
  static_assert(kMode != MasterMode::kRemainder || std::is_same<ParamT, Bf16>::value,
                "the remainder encoding is defined for bf16 params only");
  const float mul = grad_mul != nullptr ? *grad_mul : 1.0f;

  const int t = owning_tensor(table.chunk_begin, table.count, static_cast<int32_t>(blockIdx.x));
  int64_t chunk_start, chunk_end;
  chunk_bounds(static_cast<int64_t>(blockIdx.x) - table.chunk_begin[t], table.numel[t], chunk_start, chunk_end);
  P* param = static_cast<P*>(table.param[t]);
  const G* grad = static_cast<const G*>(table.grad[t]);
  float* exp_avg = table.exp_avg[t];
  float* exp_avg_sq = table.exp_avg_sq[t];
  M* masters = static_cast<M*>(table.master[t]);
  const I* index = static_cast<const I*>(table.index[t]);
  const int64_t param_numel = table.param_numel[t];
  const bool vector_ok = table.vector_ok[t];

  for (int64_t base = chunk_start + static_cast<int64_t>(threadIdx.x) * kPack; base < chunk_end;
       base += static_cast<int64_t>(kBlockThreads) * kPack) {
    G g[kPack];
    float m[kPack], v[kPack];
    M master[kPack];
    load_pack(grad, base, chunk_end, vector_ok, g);
    load_pack(exp_avg, base, chunk_end, vector_ok, m);
    load_pack(exp_avg_sq, base, chunk_end, vector_ok, v);
    if constexpr (kMode != MasterMode::kNone) load_pack(masters, base, chunk_end, vector_ok, master);
    if constexpr (kIndexed) {
      // Gathered, updated and scattered one entry at a time: fewer live registers than a pack.
#pragma unroll
      for (int i = 0; i < kPack; ++i) {
        if (base + i >= chunk_end) continue;
        const int64_t position = static_cast<int64_t>(index[base + i]);
        // A bad index stops the kernel rather than touch memory outside the parameter, as torch's
        // indexing kernels do; the error surfaces at the next synchronisation. (No printf: its
        // argument buffer would put every variant in local memory.)
        if (position < 0 || position >= param_numel) __trap();
        // In "fp32" mode the param is only written: the master holds the weight.
        P value = kMode == MasterMode::kFp32 ? P(0) : param[position];
        update_entry<ParamT, kMode>(GradT::to_float(g[i]) * mul, value, master[i], m[i], v[i], scalars);
        param[position] = value;
      }
    } else {
      P p[kPack];
      if constexpr (kMode != MasterMode::kFp32) load_pack(param, base, chunk_end, vector_ok, p);
#pragma unroll
      for (int i = 0; i < kPack; ++i) {
        update_entry<ParamT, kMode>(GradT::to_float(g[i]) * mul, p[i], master[i], m[i], v[i], scalars);
      }
      store_pack(param, base, chunk_end, vector_ok, p);
    }
    store_pack(exp_avg, base, chunk_end, vector_ok, m);
    store_pack(exp_avg_sq, base, chunk_end, vector_ok, v);
    if constexpr (kMode != MasterMode::kNone) store_pack(masters, base, chunk_end, vector_ok, master);
  }
}

// Pack-wide accesses for every compact array, and for the param when it is a contiguous run.
template <typename ParamT, typename GradT, MasterMode kMode, typename Index>
bool all_vector_aligned(const SparseAdamTensor& t) {
  bool ok = is_aligned(t.grad, sizeof(typename GradT::Storage) * kPack) &&
            is_aligned(t.exp_avg, sizeof(float) * kPack) && is_aligned(t.exp_avg_sq, sizeof(float) * kPack) &&
            (kMode == MasterMode::kNone || is_aligned(t.master, sizeof(typename MasterStorage<kMode>::type) * kPack));
  if constexpr (std::is_void<Index>::value) {
    ok = ok && is_aligned(t.param, sizeof(typename ParamT::Storage) * kPack);
  } else {
    ok = ok && is_aligned(t.index, sizeof(Index) * kPack);
  }
  return ok;
}

// Launches one kernel per table of up to kMaxTensors non-empty tensors.
template <typename ParamT, typename GradT, MasterMode kMode, typename Index>
cudaError_t launch_tables(const SparseAdamTensor* tensors, int64_t count, const SparseAdamConfig& config,
                          cudaStream_t stream) {
  auto fill = [](SparseAdamTable& table, int slot, const SparseAdamTensor& t) {
    table.param[slot] = t.param;
    table.grad[slot] = t.grad;
    table.exp_avg[slot] = t.exp_avg;
    table.exp_avg_sq[slot] = t.exp_avg_sq;
    table.master[slot] = t.master;
    table.index[slot] = t.index;
    table.numel[slot] = t.numel;
    table.param_numel[slot] = t.param_numel;
    table.vector_ok[slot] = all_vector_aligned<ParamT, GradT, kMode, Index>(t);
  };
  auto launch = [&](const SparseAdamTable& table) -> cudaError_t {
    const int32_t blocks = table.chunk_begin[table.count];
    sparse_adam_kernel<ParamT, GradT, kMode, Index>
        <<<blocks, kBlockThreads, 0, stream>>>(table, config.scalars, config.grad_mul);
    return cudaGetLastError();
  };
  return launch_in_tables<SparseAdamTable, kMaxTensors>(tensors, count, fill, launch);
}

template <typename ParamT, typename GradT, MasterMode kMode>
cudaError_t dispatch_index_type(const SparseAdamTensor* tensors, int64_t count, const SparseAdamConfig& config,
                                cudaStream_t stream) {
  switch (config.index_type) {
    case IndexType::kNone:
      return launch_tables<ParamT, GradT, kMode, void>(tensors, count, config, stream);
    case IndexType::kInt32:
      return launch_tables<ParamT, GradT, kMode, int32_t>(tensors, count, config, stream);
    case IndexType::kInt64:
      return launch_tables<ParamT, GradT, kMode, int64_t>(tensors, count, config, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename ParamT, MasterMode kMode>
cudaError_t dispatch_grad_dtype(const SparseAdamTensor* tensors, int64_t count, const SparseAdamConfig& config,
                                cudaStream_t stream) {
  switch (config.grad_dtype) {
    case DType::kFloat32:
      return dispatch_index_type<ParamT, Fp32, kMode>(tensors, count, config, stream);
    case DType::kFloat16:
      return dispatch_index_type<ParamT, Fp16, kMode>(tensors, count, config, stream);
    case DType::kBFloat16:
      return dispatch_index_type<ParamT, Bf16, kMode>(tensors, count, config, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_sparse_adam(const SparseAdamTensor* tensors, int64_t count, const SparseAdamConfig& config,
                               cudaStream_t stream) {
  const MasterMode mode = config.master_mode;
  // Only the combinations DESIGN.md allows: fp32 params are their own master, "remainder" exists
  // for bf16 only.
  switch (config.param_dtype) {
    case DType::kFloat32:
      if (mode == MasterMode::kNone) return dispatch_grad_dtype<Fp32, MasterMode::kNone>(tensors, count, config, stream);
      break;
    case DType::kFloat16:
      if (mode == MasterMode::kNone) return dispatch_grad_dtype<Fp16, MasterMode::kNone>(tensors, count, config, stream);
      if (mode == MasterMode::kFp32) return dispatch_grad_dtype<Fp16, MasterMode::kFp32>(tensors, count, config, stream);
      break;
    case DType::kBFloat16:
      if (mode == MasterMode::kNone) return dispatch_grad_dtype<Bf16, MasterMode::kNone>(tensors, count, config, stream);
      if (mode == MasterMode::kFp32) return dispatch_grad_dtype<Bf16, MasterMode::kFp32>(tensors, count, config, stream);
      if (mode == MasterMode::kRemainder) {
        return dispatch_grad_dtype<Bf16, MasterMode::kRemainder>(tensors, count, config, stream);
      }
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace badam
