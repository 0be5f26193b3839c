// Fused multi-tensor AdamW: one pass over grad, exp_avg, exp_avg_sq and the weight (param,
// fp32 master or bf16 param + int16 remainder), with the per-element math of adam_math.h.
#include <type_traits>

#include "adam_math.h"
#include "cuda/launchers.h"
#include "cuda/multi_tensor.cuh"

namespace badam {
namespace cuda {
namespace {

constexpr int kMaxTensors = 48;

// Kernel argument: the tensors of one launch (see multi_tensor.cuh for the chunk layout).
struct AdamWTable {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  void* master[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_begin[kMaxTensors + 1];
  uint32_t sr_key[kMaxTensors];
  bool vector_ok[kMaxTensors];  // every pointer of the tensor allows Pack-wide accesses
  int32_t count;
};
static_assert(sizeof(AdamWTable) + sizeof(AdamScalars) + 2 * sizeof(float*) <= kMaxKernelArgBytes,
              "kernel arguments exceed the 4 KiB limit");

// Master storage type per mode (unused for kNone, where the param is the weight).
template <MasterMode kMode>
struct MasterStorage {
  using type = float;
};
template <>
struct MasterStorage<MasterMode::kRemainder> {
  using type = int16_t;
};

template <typename ParamT, typename GradT, MasterMode kMode, bool kStochastic>
__global__ void __launch_bounds__(kBlockThreads)
    fused_adamw_kernel(AdamWTable table, AdamScalars scalars, const float* grad_mul, const float* found_inf) {
  using P = typename ParamT::Storage;
  using G = typename GradT::Storage;
  using M = typename MasterStorage<kMode>::type;
  static_assert((kMode != MasterMode::kRemainder && !kStochastic) || std::is_same<ParamT, Bf16>::value,
                "the remainder encoding and stochastic rounding are defined for bf16 params only");
  // GradScaler found an inf/NaN: the step is skipped, decided here so the host never waits.
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float mul = grad_mul != nullptr ? *grad_mul : 1.0f;

  const int t = owning_tensor(table.chunk_begin, table.count, static_cast<int32_t>(blockIdx.x));
  int64_t chunk_start, chunk_end;
  chunk_bounds(static_cast<int64_t>(blockIdx.x) - table.chunk_begin[t], table.numel[t], chunk_start, chunk_end);
  P* param = static_cast<P*>(table.param[t]);
  const G* grad = static_cast<const G*>(table.grad[t]);
  float* exp_avg = table.exp_avg[t];
  float* exp_avg_sq = table.exp_avg_sq[t];
  M* master = static_cast<M*>(table.master[t]);
  const uint32_t sr_key = table.sr_key[t];
  const bool vector_ok = table.vector_ok[t];

  for (int64_t base = chunk_start + static_cast<int64_t>(threadIdx.x) * kPack; base < chunk_end;
       base += static_cast<int64_t>(kBlockThreads) * kPack) {
    G g[kPack];
    float m[kPack], v[kPack];
    P p[kPack];
    M master_in[kPack];
    load_pack(grad, base, chunk_end, vector_ok, g);
    load_pack(exp_avg, base, chunk_end, vector_ok, m);
    load_pack(exp_avg_sq, base, chunk_end, vector_ok, v);
    // In "fp32" mode the param is only written: the master holds the weight.
    if constexpr (kMode != MasterMode::kFp32) load_pack(param, base, chunk_end, vector_ok, p);
    if constexpr (kMode != MasterMode::kNone) load_pack(master, base, chunk_end, vector_ok, master_in);

    M master_out[kPack];
#pragma unroll
    for (int i = 0; i < kPack; ++i) {
      float w;
      if constexpr (kMode == MasterMode::kFp32) {
        w = master_in[i];
      } else if constexpr (kMode == MasterMode::kRemainder) {
        w = remainder_decode(p[i], master_in[i]);
      } else {
        w = ParamT::to_float(p[i]);
      }
      adamw_update(GradT::to_float(g[i]) * mul, w, m[i], v[i], scalars);
      if constexpr (kMode == MasterMode::kRemainder) {
        uint16_t param_bits;
        int16_t remainder;
        remainder_encode(w, param_bits, remainder);
        p[i] = param_bits;
        master_out[i] = remainder;
      } else if constexpr (kStochastic) {
        const uint32_t index = static_cast<uint32_t>(base + i);  // the contract hashes the low 32 bits
        p[i] = float_to_bf16_bits_stochastic(w, sr_bits(sr_key, index));
      } else {
        p[i] = ParamT::from_float(w);
        if constexpr (kMode == MasterMode::kFp32) master_out[i] = w;
      }
    }
    store_pack(param, base, chunk_end, vector_ok, p);
    store_pack(exp_avg, base, chunk_end, vector_ok, m);
    store_pack(exp_avg_sq, base, chunk_end, vector_ok, v);
    if constexpr (kMode != MasterMode::kNone) store_pack(master, base, chunk_end, vector_ok, master_out);
  }
}

template <typename ParamT, typename GradT, MasterMode kMode>
bool all_vector_aligned(const AdamWTensor& t) {
  const size_t param_bytes = sizeof(typename ParamT::Storage) * kPack;
  const size_t grad_bytes = sizeof(typename GradT::Storage) * kPack;
  const size_t master_bytes = sizeof(typename MasterStorage<kMode>::type) * kPack;
  return is_aligned(t.param, param_bytes) && is_aligned(t.grad, grad_bytes) &&
         is_aligned(t.exp_avg, sizeof(float) * kPack) && is_aligned(t.exp_avg_sq, sizeof(float) * kPack) &&
         (kMode == MasterMode::kNone || is_aligned(t.master, master_bytes));
}

// Launches one kernel per table of up to kMaxTensors non-empty tensors.
template <typename ParamT, typename GradT, MasterMode kMode, bool kStochastic>
cudaError_t launch_tables(const AdamWTensor* tensors, int64_t count, const AdamWConfig& config,
                          cudaStream_t stream) {
  auto fill = [](AdamWTable& table, int slot, const AdamWTensor& t) {
    table.param[slot] = t.param;
    table.grad[slot] = t.grad;
    table.exp_avg[slot] = t.exp_avg;
    table.exp_avg_sq[slot] = t.exp_avg_sq;
    table.master[slot] = t.master;
    table.numel[slot] = t.numel;
    table.sr_key[slot] = t.sr_key;
    table.vector_ok[slot] = all_vector_aligned<ParamT, GradT, kMode>(t);
  };
  auto launch = [&](const AdamWTable& table) -> cudaError_t {
    const int32_t blocks = table.chunk_begin[table.count];
    fused_adamw_kernel<ParamT, GradT, kMode, kStochastic><<<blocks, kBlockThreads, 0, stream>>>(
        table, config.scalars, config.grad_mul, config.found_inf);
    return cudaGetLastError();
  };
  return launch_in_tables<AdamWTable, kMaxTensors>(tensors, count, fill, launch);
}

template <typename ParamT, MasterMode kMode, bool kStochastic>
cudaError_t dispatch_grad_dtype(const AdamWTensor* tensors, int64_t count, const AdamWConfig& config,
                                cudaStream_t stream) {
  switch (config.grad_dtype) {
    case DType::kFloat32:
      return launch_tables<ParamT, Fp32, kMode, kStochastic>(tensors, count, config, stream);
    case DType::kFloat16:
      return launch_tables<ParamT, Fp16, kMode, kStochastic>(tensors, count, config, stream);
    case DType::kBFloat16:
      return launch_tables<ParamT, Bf16, kMode, kStochastic>(tensors, count, config, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_fused_adamw(const AdamWTensor* tensors, int64_t count, const AdamWConfig& config,
                               cudaStream_t stream) {
  const MasterMode mode = config.master_mode;
  const bool stochastic = config.stochastic_rounding;
  // Only the combinations DESIGN.md allows: fp32 params are their own master, "remainder" and
  // stochastic rounding exist for bf16 only.
  switch (config.param_dtype) {
    case DType::kFloat32:
      if (mode == MasterMode::kNone && !stochastic)
        return dispatch_grad_dtype<Fp32, MasterMode::kNone, false>(tensors, count, config, stream);
      break;
    case DType::kFloat16:
      if (mode == MasterMode::kNone && !stochastic)
        return dispatch_grad_dtype<Fp16, MasterMode::kNone, false>(tensors, count, config, stream);
      if (mode == MasterMode::kFp32 && !stochastic)
        return dispatch_grad_dtype<Fp16, MasterMode::kFp32, false>(tensors, count, config, stream);
      break;
    case DType::kBFloat16:
      if (mode == MasterMode::kNone && stochastic)
        return dispatch_grad_dtype<Bf16, MasterMode::kNone, true>(tensors, count, config, stream);
      if (mode == MasterMode::kNone)
        return dispatch_grad_dtype<Bf16, MasterMode::kNone, false>(tensors, count, config, stream);
      if (mode == MasterMode::kFp32 && !stochastic)
        return dispatch_grad_dtype<Bf16, MasterMode::kFp32, false>(tensors, count, config, stream);
      if (mode == MasterMode::kRemainder && !stochastic)
        return dispatch_grad_dtype<Bf16, MasterMode::kRemainder, false>(tensors, count, config, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace badam
