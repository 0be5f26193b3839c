// The CPU kernels, written once over a vector type `Simd` (simd_avx512.h, simd_avx2.h or
// simd_scalar.h) and compiled once per instruction set.
//
// kernels_<isa>.cpp includes this file inside its own namespace badam::cpu::<isa>, under
// `#pragma GCC target(...)`, after defining `Simd` and `ScalarSimd`. Everything here therefore
// gets a distinct symbol per instruction set: code compiled for AVX-512 can never be picked by
// the linker for a caller on a CPU without it (the ODR trap of inline functions compiled with
// different targets). It includes nothing itself.

template <class V>
struct BroadcastScalars {
  typename V::F beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt, grad_mul;

  BroadcastScalars(const ::badam::AdamScalars& s, float grad_multiplier)
      : beta1(V::set1(s.beta1)),
        one_minus_beta1(V::set1(s.one_minus_beta1)),
        beta2(V::set1(s.beta2)),
        one_minus_beta2(V::set1(s.one_minus_beta2)),
        eps(V::set1(s.eps)),
        decay(V::set1(s.decay)),
        step_size(V::set1(s.step_size)),
        bc2_sqrt(V::set1(s.bc2_sqrt)),
        grad_mul(V::set1(grad_multiplier)) {}
};

template <class V, ElemType T>
typename V::F load_elems(const void* base, int64_t i) {
  if constexpr (T == ElemType::kFloat32) {
    return V::load_f32(static_cast<const float*>(base) + i);
  } else if constexpr (T == ElemType::kBFloat16) {
    return V::load_bf16(static_cast<const uint16_t*>(base) + i);
  } else {
    return V::load_f16(static_cast<const uint16_t*>(base) + i);
  }
}

template <class V, ElemType P, WeightMode M>
typename V::F load_weight(const AdamwTensor& t, int64_t i) {
  if constexpr (M == WeightMode::kMasterFp32) {
    return V::load_f32(static_cast<const float*>(t.master) + i);
  } else if constexpr (M == WeightMode::kRemainder) {
    return V::load_remainder(static_cast<const uint16_t*>(t.param) + i, static_cast<const int16_t*>(t.master) + i);
  } else {
    return load_elems<V, P>(t.param, i);
  }
}

template <class V, ElemType P, WeightMode M>
void store_weight(const AdamwTensor& t, int64_t i, typename V::F w) {
  uint16_t* param16 = static_cast<uint16_t*>(t.param) + i;
  if constexpr (M == WeightMode::kRemainder) {
    V::store_remainder(param16, static_cast<int16_t*>(t.master) + i, w);
  } else if constexpr (M == WeightMode::kBf16Stochastic) {
    V::store_bf16_stochastic(param16, w, t.sr_key, static_cast<uint32_t>(i));
  } else if constexpr (M == WeightMode::kMasterFp32) {
    // The 16-bit copy is written and never read here, so a normal store would first read its
    // cache line (2 of the 28 bytes per element); streaming stores skip that read.
    V::store_f32(static_cast<float*>(t.master) + i, w);
    if constexpr (P == ElemType::kBFloat16) {
      V::stream_bf16_rne(param16, w);
    } else {
      V::stream_f16_rne(param16, w);
    }
  } else {
    if constexpr (P == ElemType::kFloat32) {
      V::store_f32(static_cast<float*>(t.param) + i, w);
    } else if constexpr (P == ElemType::kBFloat16) {
      V::store_bf16_rne(param16, w);
    } else {
      V::store_f16_rne(param16, w);
    }
  }
}

// With four to six streams in flight the hardware prefetchers fall behind; asking for the lines
// this far ahead measured 10-15% faster per core.
constexpr int64_t kPrefetchElems = 1024;

template <ElemType T>
const void* elem_address(const void* base, int64_t i) {
  if constexpr (T == ElemType::kFloat32) {
    return static_cast<const float*>(base) + i;
  } else {
    return static_cast<const uint16_t*>(base) + i;
  }
}

template <ElemType P, ElemType G, WeightMode M>
void prefetch_ahead(const AdamwTensor& t, int64_t i) {
  __builtin_prefetch(t.exp_avg + i);
  __builtin_prefetch(t.exp_avg_sq + i);
  __builtin_prefetch(elem_address<G>(t.grad, i));
  if constexpr (M == WeightMode::kMasterFp32) {
    __builtin_prefetch(static_cast<const float*>(t.master) + i);  // the param is only written
  } else {
    __builtin_prefetch(elem_address<P>(t.param, i));
    if constexpr (M == WeightMode::kRemainder) __builtin_prefetch(static_cast<const int16_t*>(t.master) + i);
  }
}

// Elements [begin, end) of one tensor; end - begin must be a multiple of V::kWidth. The update is
// badam::adamw_update operation for operation (same order, no fused multiply-add).
template <class V, ElemType P, ElemType G, WeightMode M>
void adamw_span(const AdamwTensor& t, const BroadcastScalars<V>& s, int64_t begin, int64_t end) {
  using F = typename V::F;
  for (int64_t i = begin; i < end; i += V::kWidth) {
    if (V::kWidth > 1 && i + kPrefetchElems < end) prefetch_ahead<P, G, M>(t, i + kPrefetchElems);
    const F g = V::mul(load_elems<V, G>(t.grad, i), s.grad_mul);
    F w = load_weight<V, P, M>(t, i);
    F m = V::load_f32(t.exp_avg + i);
    F v = V::load_f32(t.exp_avg_sq + i);
    w = V::mul(w, s.decay);
    m = V::add(V::mul(s.beta1, m), V::mul(s.one_minus_beta1, g));
    v = V::add(V::mul(s.beta2, v), V::mul(V::mul(s.one_minus_beta2, g), g));
    const F denom = V::add(V::div(V::sqrt(v), s.bc2_sqrt), s.eps);
    w = V::sub(w, V::div(V::mul(s.step_size, m), denom));
    V::store_f32(t.exp_avg + i, m);
    V::store_f32(t.exp_avg_sq + i, v);
    store_weight<V, P, M>(t, i, w);
  }
}

template <ElemType P, ElemType G, WeightMode M>
void adamw_range_typed(const AdamwTensor& t, const ::badam::AdamScalars& s, float grad_mul, int64_t begin,
                       int64_t end) {
  int64_t vector_begin = begin;
  if constexpr (M == WeightMode::kMasterFp32) {
    // Streaming stores need aligned addresses: peel single elements up to the first one.
    const auto address = reinterpret_cast<uintptr_t>(static_cast<uint16_t*>(t.param) + begin);
    const int64_t misaligned = static_cast<int64_t>(address % Simd::kStreamAlign) / 2;
    const int64_t peel = misaligned == 0 ? 0 : Simd::kStreamAlign / 2 - misaligned;
    vector_begin = begin + peel < end ? begin + peel : end;
  }
  const int64_t vector_end = vector_begin + (end - vector_begin) / Simd::kWidth * Simd::kWidth;
  const BroadcastScalars<ScalarSimd> scalar_constants(s, grad_mul);
  adamw_span<ScalarSimd, P, G, M>(t, scalar_constants, begin, vector_begin);
  adamw_span<Simd, P, G, M>(t, BroadcastScalars<Simd>(s, grad_mul), vector_begin, vector_end);
  adamw_span<ScalarSimd, P, G, M>(t, scalar_constants, vector_end, end);
  if constexpr (M == WeightMode::kMasterFp32) Simd::stream_fence();
}

template <ElemType P, WeightMode M>
void adamw_range_for_grad(const AdamwTensor& t, const ::badam::AdamScalars& s, float grad_mul, int64_t begin,
                          int64_t end) {
  switch (t.grad_type) {
    case ElemType::kFloat32:
      return adamw_range_typed<P, ElemType::kFloat32, M>(t, s, grad_mul, begin, end);
    case ElemType::kBFloat16:
      return adamw_range_typed<P, ElemType::kBFloat16, M>(t, s, grad_mul, begin, end);
    case ElemType::kFloat16:
      return adamw_range_typed<P, ElemType::kFloat16, M>(t, s, grad_mul, begin, end);
  }
}

// Only the (param dtype, mode) pairs the op glue accepts are instantiated.
void adamw_range(const AdamwTensor& t, const ::badam::AdamScalars& s, float grad_mul, int64_t begin, int64_t end) {
  switch (t.mode) {
    case WeightMode::kPlain:
      if (t.param_type == ElemType::kFloat32) {
        return adamw_range_for_grad<ElemType::kFloat32, WeightMode::kPlain>(t, s, grad_mul, begin, end);
      }
      if (t.param_type == ElemType::kBFloat16) {
        return adamw_range_for_grad<ElemType::kBFloat16, WeightMode::kPlain>(t, s, grad_mul, begin, end);
      }
      return adamw_range_for_grad<ElemType::kFloat16, WeightMode::kPlain>(t, s, grad_mul, begin, end);
    case WeightMode::kBf16Stochastic:
      return adamw_range_for_grad<ElemType::kBFloat16, WeightMode::kBf16Stochastic>(t, s, grad_mul, begin, end);
    case WeightMode::kMasterFp32:
      if (t.param_type == ElemType::kBFloat16) {
        return adamw_range_for_grad<ElemType::kBFloat16, WeightMode::kMasterFp32>(t, s, grad_mul, begin, end);
      }
      return adamw_range_for_grad<ElemType::kFloat16, WeightMode::kMasterFp32>(t, s, grad_mul, begin, end);
    case WeightMode::kRemainder:
      return adamw_range_for_grad<ElemType::kBFloat16, WeightMode::kRemainder>(t, s, grad_mul, begin, end);
  }
}

// Squares are summed in fp32 lanes over blocks of kNormBlock elements (four accumulators hide
// the add latency), and the blocks in double: each lane adds at most a few hundred squares, so
// fp32 rounding stays near one ulp of the result.
constexpr int64_t kNormBlock = 1024;

template <ElemType T>
double sum_squares_typed(const void* data, int64_t begin, int64_t end) {
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = kUnroll * Simd::kWidth;
  double sum = 0.0;
  for (int64_t block = begin; block < end; block += kNormBlock) {
    const int64_t block_end = block + kNormBlock < end ? block + kNormBlock : end;
    typename Simd::F acc[kUnroll];
    for (auto& a : acc) a = Simd::set1(0.0f);
    int64_t i = block;
    for (; i + kStep <= block_end; i += kStep) {
      for (int u = 0; u < kUnroll; ++u) {
        const typename Simd::F x = load_elems<Simd, T>(data, i + u * Simd::kWidth);
        acc[u] = Simd::add(acc[u], Simd::mul(x, x));
      }
    }
    for (; i + Simd::kWidth <= block_end; i += Simd::kWidth) {
      const typename Simd::F x = load_elems<Simd, T>(data, i);
      acc[0] = Simd::add(acc[0], Simd::mul(x, x));
    }
    sum += Simd::sum_lanes(Simd::add(Simd::add(acc[0], acc[1]), Simd::add(acc[2], acc[3])));
    for (; i < block_end; ++i) {
      const float x = load_elems<ScalarSimd, T>(data, i);
      sum += static_cast<double>(x) * x;
    }
  }
  return sum;
}

double sum_squares_range(const void* data, ElemType type, int64_t begin, int64_t end) {
  switch (type) {
    case ElemType::kFloat32:
      return sum_squares_typed<ElemType::kFloat32>(data, begin, end);
    case ElemType::kBFloat16:
      return sum_squares_typed<ElemType::kBFloat16>(data, begin, end);
    case ElemType::kFloat16:
      return sum_squares_typed<ElemType::kFloat16>(data, begin, end);
  }
  return 0.0;
}
