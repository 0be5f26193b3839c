// The SparseAdam kernels (badam's ratio mode) over a vector type `Simd`, compiled once per
// instruction set like kernels_impl.h: kernels_<isa>.cpp includes this file right after it, in
// the same per-ISA namespace, so the loads and stores of kernels_impl.h and the Simd rounding
// helpers are shared. It includes nothing itself.
//
// A tensor's selected entries have compact gradient, Adam state and master arrays. The param is
// either the contiguous run of selected entries (adjacent masks) or the whole parameter, reached
// through an index (scattered masks): indexed params are gathered into a small buffer of one
// vector's width, updated with the same vector math, and scattered back.

template <class V>
struct SparseAdamConstants {
  typename V::F one_minus_beta1, one_minus_beta2, eps, step_size, grad_mul;

  SparseAdamConstants(const ::badam::SparseAdamScalars& s, float grad_multiplier)
      : one_minus_beta1(V::set1(s.one_minus_beta1)),
        one_minus_beta2(V::set1(s.one_minus_beta2)),
        eps(V::set1(s.eps)),
        step_size(V::set1(s.step_size)),
        grad_mul(V::set1(grad_multiplier)) {}
};

// How a param element is stored.
template <ElemType P>
struct ParamStorage {
  using type = uint16_t;
};
template <>
struct ParamStorage<ElemType::kFloat32> {
  using type = float;
};

// Index element type by size in bytes.
template <int kBytes>
struct IndexType;
template <>
struct IndexType<4> {
  using type = int32_t;
};
template <>
struct IndexType<8> {
  using type = int64_t;
};

// The weight of V::kWidth selected entries: `param` points at their V::kWidth consecutive param
// elements (in place, or the gather buffer), `master` at their compact master elements.
template <class V, ElemType P, WeightMode M>
typename V::F load_selected_weight(const void* param, const void* master) {
  if constexpr (M == WeightMode::kMasterFp32) {
    return V::load_f32(static_cast<const float*>(master));
  } else if constexpr (M == WeightMode::kRemainder) {
    return V::load_remainder(static_cast<const uint16_t*>(param), static_cast<const int16_t*>(master));
  } else {
    return load_elems<V, P>(param, 0);
  }
}

template <class V, ElemType P, WeightMode M>
void store_selected_weight(void* param, void* master, typename V::F w) {
  if constexpr (M == WeightMode::kRemainder) {
    V::store_remainder(static_cast<uint16_t*>(param), static_cast<int16_t*>(master), w);
    return;
  }
  if constexpr (M == WeightMode::kMasterFp32) V::store_f32(static_cast<float*>(master), w);
  if constexpr (P == ElemType::kFloat32) {
    V::store_f32(static_cast<float*>(param), w);
  } else if constexpr (P == ElemType::kBFloat16) {
    V::store_bf16_rne(static_cast<uint16_t*>(param), w);
  } else {
    V::store_f16_rne(static_cast<uint16_t*>(param), w);
  }
}

// Selected entries [begin, end) of one tensor; end - begin must be a multiple of V::kWidth.
// kIndexBytes is 0 for a contiguous run, else the size of an index element. The update is
// badam::sparse_adam_update operation for operation (same order, no fused multiply-add).
template <class V, ElemType P, ElemType G, WeightMode M, int kIndexBytes>
void sparse_adam_span(const SparseAdamTensor& t, const SparseAdamConstants<V>& s, int64_t begin, int64_t end) {
  using F = typename V::F;
  using Storage = typename ParamStorage<P>::type;
  constexpr int64_t kMasterBytes = M == WeightMode::kMasterFp32 ? 4 : 2;
  Storage* param = static_cast<Storage*>(t.param);
  for (int64_t i = begin; i < end; i += V::kWidth) {
    Storage gathered[V::kWidth];
    Storage* weight_param = param + i;
    if constexpr (kIndexBytes != 0) {
      const auto* index = static_cast<const typename IndexType<kIndexBytes>::type*>(t.index) + i;
      for (int lane = 0; lane < V::kWidth; ++lane) gathered[lane] = param[index[lane]];
      weight_param = gathered;
    }
    void* master = nullptr;
    if constexpr (M != WeightMode::kPlain) master = static_cast<char*>(t.master) + i * kMasterBytes;

    const F g = V::mul(load_elems<V, G>(t.grad, i), s.grad_mul);
    F w = load_selected_weight<V, P, M>(weight_param, master);
    F m = V::load_f32(t.exp_avg + i);
    F v = V::load_f32(t.exp_avg_sq + i);
    m = V::add(m, V::mul(V::sub(g, m), s.one_minus_beta1));
    v = V::add(v, V::mul(V::sub(V::mul(g, g), v), s.one_minus_beta2));
    w = V::sub(w, V::mul(s.step_size, V::div(m, V::add(V::sqrt(v), s.eps))));
    V::store_f32(t.exp_avg + i, m);
    V::store_f32(t.exp_avg_sq + i, v);
    store_selected_weight<V, P, M>(weight_param, master, w);

    if constexpr (kIndexBytes != 0) {
      const auto* index = static_cast<const typename IndexType<kIndexBytes>::type*>(t.index) + i;
      for (int lane = 0; lane < V::kWidth; ++lane) param[index[lane]] = gathered[lane];
    }
  }
}

template <ElemType P, ElemType G, WeightMode M, int kIndexBytes>
void sparse_adam_range_typed(const SparseAdamTensor& t, const ::badam::SparseAdamScalars& s, float grad_mul,
                             int64_t begin, int64_t end) {
  const int64_t vector_end = begin + (end - begin) / Simd::kWidth * Simd::kWidth;
  sparse_adam_span<Simd, P, G, M, kIndexBytes>(t, SparseAdamConstants<Simd>(s, grad_mul), begin, vector_end);
  sparse_adam_span<ScalarSimd, P, G, M, kIndexBytes>(t, SparseAdamConstants<ScalarSimd>(s, grad_mul), vector_end,
                                                     end);
}

template <ElemType P, ElemType G, WeightMode M>
void sparse_adam_range_for_index(const SparseAdamTensor& t, const ::badam::SparseAdamScalars& s, float grad_mul,
                                 int64_t begin, int64_t end) {
  if (t.index == nullptr) return sparse_adam_range_typed<P, G, M, 0>(t, s, grad_mul, begin, end);
  if (t.index_is_int64) return sparse_adam_range_typed<P, G, M, 8>(t, s, grad_mul, begin, end);
  return sparse_adam_range_typed<P, G, M, 4>(t, s, grad_mul, begin, end);
}

template <ElemType P, WeightMode M>
void sparse_adam_range_for_grad(const SparseAdamTensor& t, const ::badam::SparseAdamScalars& s, float grad_mul,
                                int64_t begin, int64_t end) {
  switch (t.grad_type) {
    case ElemType::kFloat32:
      return sparse_adam_range_for_index<P, ElemType::kFloat32, M>(t, s, grad_mul, begin, end);
    case ElemType::kBFloat16:
      return sparse_adam_range_for_index<P, ElemType::kBFloat16, M>(t, s, grad_mul, begin, end);
    case ElemType::kFloat16:
      return sparse_adam_range_for_index<P, ElemType::kFloat16, M>(t, s, grad_mul, begin, end);
  }
}

// Only the (param dtype, mode) pairs the op glue accepts are instantiated.
void sparse_adam_range(const SparseAdamTensor& t, const ::badam::SparseAdamScalars& s, float grad_mul,
                       int64_t begin, int64_t end) {
  switch (t.mode) {
    case WeightMode::kMasterFp32:
      if (t.param_type == ElemType::kBFloat16) {
        return sparse_adam_range_for_grad<ElemType::kBFloat16, WeightMode::kMasterFp32>(t, s, grad_mul, begin, end);
      }
      return sparse_adam_range_for_grad<ElemType::kFloat16, WeightMode::kMasterFp32>(t, s, grad_mul, begin, end);
    case WeightMode::kRemainder:
      return sparse_adam_range_for_grad<ElemType::kBFloat16, WeightMode::kRemainder>(t, s, grad_mul, begin, end);
    case WeightMode::kPlain:
    case WeightMode::kBf16Stochastic:  // not offered by sparse_adam_; the glue never sets it
      break;
  }
  if (t.param_type == ElemType::kFloat32) {
    return sparse_adam_range_for_grad<ElemType::kFloat32, WeightMode::kPlain>(t, s, grad_mul, begin, end);
  }
  if (t.param_type == ElemType::kBFloat16) {
    return sparse_adam_range_for_grad<ElemType::kBFloat16, WeightMode::kPlain>(t, s, grad_mul, begin, end);
  }
  return sparse_adam_range_for_grad<ElemType::kFloat16, WeightMode::kPlain>(t, s, grad_mul, begin, end);
}
