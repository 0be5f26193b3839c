// 8-lane AVX2 (+F16C) versions of the adam_math.h operations, bit for bit; see simd_avx512.h.
//
// Included inside namespace badam::cpu::avx2 by kernels_avx2.cpp, under #pragma GCC target;
// it includes nothing itself (<immintrin.h> comes first).

struct Simd {
  static constexpr int kWidth = 8;
  using F = __m256;
  using I = __m256i;

  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }

  static F load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static void store_f32(float* p, F x) { _mm256_storeu_ps(p, x); }

  static __m128i load_128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
  static I load_u16(const void* p) { return _mm256_cvtepu16_epi32(load_128(p)); }
  static I load_i16(const void* p) { return _mm256_cvtepi16_epi32(load_128(p)); }
  static I splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  // Keeps the low 16 bits of every lane. packus saturates, so the lanes are masked first to make
  // it a plain truncation, as the scalar uint16 casts are.
  static __m128i low16(I x) {
    const I low = _mm256_and_si256(x, splat(0xffffu));
    return _mm_packus_epi32(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1));
  }
  static void store_low16(void* p, I x) { _mm_storeu_si128(static_cast<__m128i*>(p), low16(x)); }

  static F load_bf16(const uint16_t* p) { return _mm256_castsi256_ps(_mm256_slli_epi32(load_u16(p), 16)); }
  static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(load_128(p)); }
  static void store_f16_rne(uint16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  // NaN lanes become the quiet NaN (high half | 0x0040), as in adam_math.h.
  static I keep_nan_quiet(F x, I rounded) {
    const I nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const I quiet = _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 16), splat(0x0040u));
    return _mm256_blendv_epi8(rounded, quiet, nan);
  }

  static __m128i bf16_rne(F x) {
    const I u = _mm256_castps_si256(x);
    const I odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), splat(1u));
    const I rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, splat(0x7fffu))), 16);
    return low16(keep_nan_quiet(x, rounded));
  }
  static void store_bf16_rne(uint16_t* p, F x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_rne(x)); }

  // Non-temporal stores of a 16-bit copy that is written but not read (see kernels_impl.h);
  // p must be 16-byte aligned.
  static constexpr int kStreamAlign = 16;
  static void stream_bf16_rne(uint16_t* p, F x) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), bf16_rne(x)); }
  static void stream_f16_rne(uint16_t* p, F x) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void stream_fence() { _mm_sfence(); }

  static I mix32(I x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, splat(0x7feb352du));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, splat(0x846ca68bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }

  // Lane k rounds element `index + k` (indices wrap modulo 2**32, as sr_bits takes them).
  static void store_bf16_stochastic(uint16_t* p, F x, uint32_t key, uint32_t index) {
    const I indices = _mm256_add_epi32(splat(index), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const I random16 = _mm256_and_si256(mix32(_mm256_xor_si256(indices, splat(key))), splat(0xffffu));
    const I rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x), random16), 16);
    store_low16(p, keep_nan_quiet(x, rounded));
  }

  static F load_remainder(const uint16_t* param, const int16_t* remainder) {
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(load_u16(param), 16), load_i16(remainder)));
  }
  static void store_remainder(uint16_t* param, int16_t* remainder, F x) {
    const I u = _mm256_castps_si256(x);
    const I low = _mm256_and_si256(u, splat(0xffffu));
    const I rounded = _mm256_add_epi32(_mm256_srli_epi32(u, 16), _mm256_srli_epi32(low, 15));
    store_low16(param, keep_nan_quiet(x, rounded));  // a NaN must not carry into the sign bit
    store_low16(remainder, low);
  }

  static double sum_lanes(F x) {
    alignas(32) float lanes[kWidth];
    _mm256_store_ps(lanes, x);
    double sum = 0.0;
    for (float lane : lanes) sum += lane;
    return sum;
  }
};
