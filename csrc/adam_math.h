// Per-element AdamW math shared by the CPU and CUDA kernels.
//
// This header is the bit-level contract of badam_kernels: reference.py implements the same
// functions with torch integer/float ops, and triton_ops mirrors them in Triton. It includes
// no torch headers so that pure-CUDA translation units can use it.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BADAM_HD __host__ __device__ __forceinline__
#else
#define BADAM_HD inline __attribute__((always_inline))
#endif

namespace badam {

// Scalars computed once per call on the host (in double, then rounded to float), so every
// backend applies exactly the same constants:
//   decay        = 1 - lr * weight_decay
//   step_size    = lr / (1 - beta1**step)
//   bc2_sqrt     = sqrt(1 - beta2**step)
struct AdamScalars {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float decay;
  float step_size;
  float bc2_sqrt;
};

// The per-call constants, computed in double on the host and then rounded to fp32 (host only).
inline AdamScalars make_adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                     int64_t step) {
  const double steps = static_cast<double>(step);
  AdamScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.step_size = static_cast<float>(lr / (1.0 - pow(beta1, steps)));
  s.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, steps)));
  return s;
}

// One AdamW update of a single element, all in fp32. `w`, `m`, `v` are updated in place.
// The operation order is part of the contract (see DESIGN.md): torch.optim.AdamW semantics.
BADAM_HD void adamw_update(float g, float& w, float& m, float& v, const AdamScalars& s) {
  w = w * s.decay;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  w = w - (s.step_size * m) / denom;
}

BADAM_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

BADAM_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 <-> fp32 on raw 16-bit patterns, so host code needs no bf16 type.
BADAM_HD float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even. NaN stays a quiet NaN with its sign and the high bits of its payload
// (the rounding add could otherwise carry a NaN with only low mantissa bits into infinity, or the
// all-ones payload of 0x7fffffff into the sign bit). Infinities stay infinite. (fp16 results use
// the IEEE conversion of the hardware or c10::Half: NaN stays NaN, its payload is unspecified.)
BADAM_HD uint16_t float_to_bf16_bits_rne(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// "remainder" master mode: the fp32 master is the bf16 parameter's bits in the high half and a
// signed int16 remainder in the low half. The parameter is the nearest bf16 (a low half of
// 0x8000 or more rounds the high half up, so ties go away from zero) and the remainder is the
// signed difference, so decode(encode(w)) == w bit for bit for every non-NaN w.
//
// A NaN master gives a NaN parameter: rounding up would carry a NaN whose payload fills the high
// half into the sign bit (the GPU's canonical NaN 0x7fffffff would become -0.0, a silent zero
// weight), so the parameter is the quiet NaN of float_to_bf16_bits_rne and the remainder keeps
// the low bits. Any bf16 NaN plus any remainder decodes to a NaN (the high half keeps an all-ones
// exponent and a non-zero mantissa), though not necessarily with the master's payload.
BADAM_HD float remainder_decode(uint16_t param_bits, int16_t remainder) {
  return bits_float((static_cast<uint32_t>(param_bits) << 16) +
                    static_cast<uint32_t>(static_cast<int32_t>(remainder)));
}

BADAM_HD void remainder_encode(float w, uint16_t& param_bits, int16_t& remainder) {
  const uint32_t u = float_bits(w);
  const uint32_t lo = u & 0xffffu;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  param_bits = static_cast<uint16_t>(nan ? (u >> 16) | 0x0040u : (u >> 16) + (lo >> 15));
  remainder = static_cast<int16_t>(static_cast<uint16_t>(lo));
}

// Stochastic rounding randomness: a counter-based hash, deterministic for a given
// (seed, step, tensor index in the call, element index). lowbias32 by C. Wellons.
BADAM_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The 63-bit user seed folded to 32 bits (low ^ high), as sr_key takes it (host only).
inline uint32_t fold_seed(int64_t seed) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  return static_cast<uint32_t>(bits ^ (bits >> 32));
}

// Per-tensor key. seed is folded to 32 bits (fold_seed) before this call.
BADAM_HD uint32_t sr_key(uint32_t seed32, uint32_t step32, uint32_t tensor_index) {
  return mix32(seed32 ^ mix32(step32 ^ mix32(tensor_index ^ 0x9e3779b9u)));
}

// 16 random bits for element `index` (only its low 32 bits are used) of a tensor.
BADAM_HD uint32_t sr_bits(uint32_t key, uint32_t index) { return mix32(index ^ key) & 0xffffu; }

// Stochastic rounding to bf16: add 16 uniform bits below the bf16 mantissa and truncate, so the
// result is one of the two neighbours with probability proportional to closeness (unbiased).
BADAM_HD uint16_t float_to_bf16_bits_stochastic(float f, uint32_t random16) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  // Infinity stays infinity: its low half is zero and adding < 0x10000 never carries.
  return static_cast<uint16_t>((u + random16) >> 16);
}

// ---- SparseAdam: badam's ratio mode ----
//
// badam.BlockOptimizerRatio updates a selected subset of each parameter's entries with the math
// of torch.optim.SparseAdam: no weight decay, and eps added outside the bias correction, which
// is folded into the step size instead. The operation order below is SparseAdam's, so fp32
// parameters get its bits exactly.
//   step_size = lr * sqrt(1 - beta2**step) / (1 - beta1**step)
struct SparseAdamScalars {
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float step_size;
};

// The per-call constants, computed in double on the host as badam does in Python, then rounded
// to fp32 as torch rounds a Python scalar multiplying an fp32 tensor (host only).
inline SparseAdamScalars make_sparse_adam_scalars(double lr, double beta1, double beta2, double eps, int64_t step) {
  const double steps = static_cast<double>(step);
  SparseAdamScalars s;
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.step_size = static_cast<float>(lr * sqrt(1.0 - pow(beta2, steps)) / (1.0 - pow(beta1, steps)));
  return s;
}

// One SparseAdam update of a single selected element, all in fp32; `w`, `m`, `v` in place.
BADAM_HD void sparse_adam_update(float g, float& w, float& m, float& v, const SparseAdamScalars& s) {
  m = m + (g - m) * s.one_minus_beta1;
  v = v + (g * g - v) * s.one_minus_beta2;
  w = w - s.step_size * (m / (sqrtf(v) + s.eps));
}

}  // namespace badam
