// One-lane "vector" operations on plain floats: the portable kernels, and the tails of the SIMD
// kernels. Every conversion is the adam_math.h function itself, so this is the contract verbatim.
//
// Included inside a per-instruction-set namespace by kernels_*.cpp (see kernels_impl.h), after
// <cmath>, <c10/util/Half.h> and adam_math.h; it includes nothing itself.

struct ScalarSimd {
  static constexpr int kWidth = 1;
  using F = float;

  static F set1(float x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) { return std::sqrt(a); }

  static F load_f32(const float* p) { return *p; }
  static void store_f32(float* p, F x) { *p = x; }
  static F load_bf16(const uint16_t* p) { return ::badam::bf16_bits_to_float(*p); }
  static void store_bf16_rne(uint16_t* p, F x) { *p = ::badam::float_to_bf16_bits_rne(x); }
  static F load_f16(const uint16_t* p) { return static_cast<float>(::c10::Half(*p, ::c10::Half::from_bits())); }
  static void store_f16_rne(uint16_t* p, F x) { *p = ::c10::Half(x).x; }

  // No streaming stores one element at a time: plain stores, and nothing to fence.
  static constexpr int kStreamAlign = 2;
  static void stream_bf16_rne(uint16_t* p, F x) { store_bf16_rne(p, x); }
  static void stream_f16_rne(uint16_t* p, F x) { store_f16_rne(p, x); }
  static void stream_fence() {}

  static void store_bf16_stochastic(uint16_t* p, F x, uint32_t key, uint32_t index) {
    *p = ::badam::float_to_bf16_bits_stochastic(x, ::badam::sr_bits(key, index));
  }
  static F load_remainder(const uint16_t* param, const int16_t* remainder) {
    return ::badam::remainder_decode(*param, *remainder);
  }
  static void store_remainder(uint16_t* param, int16_t* remainder, F x) {
    ::badam::remainder_encode(x, *param, *remainder);
  }

  static double sum_lanes(F x) { return x; }
};
