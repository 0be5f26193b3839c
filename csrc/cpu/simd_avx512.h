// 16-lane AVX-512 versions of the adam_math.h operations, bit for bit: IEEE add/mul/div/sqrt
// (no FMA, whose single rounding would change results), and the integer formulations of the
// bf16 rounding, remainder encoding and stochastic-rounding hash.
//
// Included inside namespace badam::cpu::avx512 by kernels_avx512.cpp, under
// #pragma GCC target; it includes nothing itself (<immintrin.h> comes first).

struct Simd {
  static constexpr int kWidth = 16;
  using F = __m512;
  using I = __m512i;

  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }

  static F load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static void store_f32(float* p, F x) { _mm512_storeu_ps(p, x); }

  static I load_u16(const void* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))); }
  static I load_i16(const void* p) { return _mm512_cvtepi16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))); }
  // Keeps the low 16 bits of every lane, as the scalar uint16 casts do.
  static void store_low16(void* p, I x) { _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(x)); }
  static I splat(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }

  static F load_bf16(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(load_u16(p), 16)); }
  static F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store_f16_rne(uint16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  // NaN lanes become the quiet NaN (high half | 0x0040), as in adam_math.h.
  static I keep_nan_quiet(F x, I rounded) {
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const I high = _mm512_srli_epi32(_mm512_castps_si512(x), 16);
    return _mm512_mask_or_epi32(rounded, nan, high, splat(0x0040u));
  }

  static __m256i bf16_rne(F x) {
    const I u = _mm512_castps_si512(x);
    const I odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), splat(1u));
    const I rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, splat(0x7fffu))), 16);
    return _mm512_cvtepi32_epi16(keep_nan_quiet(x, rounded));
  }
  static void store_bf16_rne(uint16_t* p, F x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_rne(x)); }

  // Non-temporal stores of a 16-bit copy that is written but not read (see kernels_impl.h);
  // p must be 32-byte aligned.
  static constexpr int kStreamAlign = 32;
  static void stream_bf16_rne(uint16_t* p, F x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_rne(x)); }
  static void stream_f16_rne(uint16_t* p, F x) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void stream_fence() { _mm_sfence(); }

  static I mix32(I x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, splat(0x7feb352du));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, splat(0x846ca68bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  }

  // Lane k rounds element `index + k` (indices wrap modulo 2**32, as sr_bits takes them).
  static void store_bf16_stochastic(uint16_t* p, F x, uint32_t key, uint32_t index) {
    const I lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const I indices = _mm512_add_epi32(splat(index), lane);
    const I random16 = _mm512_and_si512(mix32(_mm512_xor_si512(indices, splat(key))), splat(0xffffu));
    const I rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(x), random16), 16);
    store_low16(p, keep_nan_quiet(x, rounded));
  }

  static F load_remainder(const uint16_t* param, const int16_t* remainder) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(load_u16(param), 16), load_i16(remainder)));
  }
  static void store_remainder(uint16_t* param, int16_t* remainder, F x) {
    const I u = _mm512_castps_si512(x);
    const I low = _mm512_and_si512(u, splat(0xffffu));
    const I rounded = _mm512_add_epi32(_mm512_srli_epi32(u, 16), _mm512_srli_epi32(low, 15));
    store_low16(param, keep_nan_quiet(x, rounded));  // a NaN must not carry into the sign bit
    store_low16(remainder, low);
  }

  static double sum_lanes(F x) {
    alignas(64) float lanes[kWidth];
    _mm512_store_ps(lanes, x);
    double sum = 0.0;
    for (float lane : lanes) sum += lane;
    return sum;
  }
};
