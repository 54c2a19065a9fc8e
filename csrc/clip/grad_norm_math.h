// Norm accumulation and the clip coefficient, shared by the CPU kernel (scalar and Vectorized) and
// the CUDA kernel. kind: 2 (sum of squares), 1 (sum of |x|), 0 (max |x|, standing for inf).
#pragma once
#include "common/host_device.h"

namespace torchfast {

enum class NormKind : int { kInf = 0, kOne = 1, kTwo = 2 };

template <NormKind kKind, typename T>
C10_HOST_DEVICE inline T norm_accumulate(T acc, T x) {
  if constexpr (kKind == NormKind::kTwo) {
    return acc + x * x;
  } else if constexpr (kKind == NormKind::kOne) {
    return acc + tf_abs(x);
  } else {
    return tf_max(acc, tf_abs(x));  // NaN-propagating
  }
}

template <NormKind kKind, typename T>
C10_HOST_DEVICE inline T norm_combine(T a, T b) {
  if constexpr (kKind == NormKind::kInf) {
    return tf_max(a, b);
  } else {
    return a + b;
  }
}

template <NormKind kKind, typename T>
C10_HOST_DEVICE inline T norm_finish(T acc) {
  if constexpr (kKind == NormKind::kTwo) {
    return tf_sqrt(acc);
  } else {
    return acc;
  }
}

// torch.nn.utils.clip_grad_norm_: min(max_norm / (total_norm + 1e-6), 1), in the norm's precision
// (float, or double for fp64 norms). NaN norms give NaN; an infinite norm gives 0.
template <typename T>
C10_HOST_DEVICE inline T clip_coefficient(T total_norm, T max_norm) {
  const T coef = max_norm / (total_norm + T(1e-6));
  return coef < T(1) ? coef : (coef != coef ? coef : T(1));
}

}  // namespace torchfast
