// Vectorised element-wise driver for the CPU kernels.
//
// map_streams<scalar_t, N, kLoad, kStore>(ptrs, n, f) walks n elements of N parallel arrays
// ("streams", e.g. param, grad, exp_avg, ...), loads the streams whose bit is set in kLoad into the
// compute type (the others read as zero), calls f on an std::array<V, N> and stores back the
// streams whose bit is set in kStore. The masks are compile-time so that the loop carries no
// per-stream branches. f is a generic lambda called with V = at::vec::Vectorized<acc_t> in the main
// loop and V = acc_t in the tail, so one *_math.h template serves both (and the CUDA kernel).
// acc_t is float for fp32/fp16/bf16 and double for fp64.
//
// This file is compiled once per CPU capability (see setup.py): at::vec picks AVX2/AVX512 code from
// the CPU_CAPABILITY_* macro of the translation unit.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdint>
#include <type_traits>

#include "common/host_device.h"

namespace torchfast {

template <typename T>
inline at::vec::Vectorized<T> tf_sqrt(const at::vec::Vectorized<T>& x) {
  return x.sqrt();
}
template <typename T>
inline at::vec::Vectorized<T> tf_abs(const at::vec::Vectorized<T>& x) {
  return x.abs();
}
template <typename T>
inline at::vec::Vectorized<T> tf_where_positive(const at::vec::Vectorized<T>& key, const at::vec::Vectorized<T>& value) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(V(T(0)), value, key > V(T(0)));
}
template <typename T>
inline at::vec::Vectorized<T> tf_max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // NaN-propagating
}

template <typename scalar_t, size_t N, uint32_t kLoad, uint32_t kStore, typename F>
inline void map_streams(const std::array<scalar_t*, N>& ptrs, int64_t n, const F& f) {
  using acc_t = acc_type_t<scalar_t>;
  using aVec = at::vec::Vectorized<acc_t>;
  constexpr bool kNative = std::is_same_v<scalar_t, acc_t>;
  // Reduced-precision types load one Vectorized<scalar_t> = two Vectorized<float>.
  using sVec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kStep = kNative ? aVec::size() : sVec::size();
  constexpr auto loads = [](size_t k) { return ((kLoad >> k) & 1u) != 0; };
  constexpr auto stores = [](size_t k) { return ((kStore >> k) & 1u) != 0; };

  int64_t d = 0;
  for (; d + kStep <= n; d += kStep) {
    if constexpr (kNative) {
      std::array<aVec, N> x;
      for (size_t k = 0; k < N; ++k) x[k] = loads(k) ? aVec::loadu(ptrs[k] + d) : aVec(acc_t(0));
      f(x);
      for (size_t k = 0; k < N; ++k)
        if (stores(k)) x[k].store(ptrs[k] + d);
    } else {
      std::array<aVec, N> lo, hi;
      for (size_t k = 0; k < N; ++k) {
        if (loads(k)) {
          auto both = at::vec::convert_to_float<scalar_t>(sVec::loadu(ptrs[k] + d));
          lo[k] = std::get<0>(both);
          hi[k] = std::get<1>(both);
        } else {
          lo[k] = hi[k] = aVec(0.f);
        }
      }
      f(lo);
      f(hi);
      for (size_t k = 0; k < N; ++k)
        if (stores(k)) at::vec::convert_from_float<scalar_t>(lo[k], hi[k]).store(ptrs[k] + d);
    }
  }
  for (; d < n; ++d) {
    std::array<acc_t, N> x;
    for (size_t k = 0; k < N; ++k) x[k] = loads(k) ? static_cast<acc_t>(ptrs[k][d]) : acc_t(0);
    f(x);
    for (size_t k = 0; k < N; ++k)
      if (stores(k)) ptrs[k][d] = static_cast<scalar_t>(x[k]);
  }
}

}  // namespace torchfast
