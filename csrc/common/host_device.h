// Portable scalar helpers for math shared by the CPU and CUDA kernels.
// The *_math.h headers are templates over a value type T: float or double on the device and in the
// CPU tails, at::vec::Vectorized<float/double> in the CPU main loops (csrc/common/vec_map.h adds the
// overloads for those, so a CPU kernel file includes it before any *_math.h). Only + - * / and the
// helpers below may be used inside them.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>
#include <type_traits>

namespace torchfast {

// Compute type: fp32 for fp32/fp16/bf16 tensors, fp64 for fp64 ones.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

C10_HOST_DEVICE inline float tf_sqrt(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline float tf_abs(float x) { return ::fabsf(x); }
C10_HOST_DEVICE inline double tf_abs(double x) { return ::fabs(x); }
C10_HOST_DEVICE inline double tf_sqrt(double x) { return ::sqrt(x); }
C10_HOST_DEVICE inline float tf_max(float a, float b) {
  // NaN-propagating, like torch.maximum.
  return (a != a || a > b) ? a : b;
}
C10_HOST_DEVICE inline double tf_max(double a, double b) { return (a != a || a > b) ? a : b; }
// `value` where `key` > 0, else 0 (ReLU's gradient mask).
C10_HOST_DEVICE inline float tf_where_positive(float key, float value) { return key > 0.f ? value : 0.f; }
C10_HOST_DEVICE inline double tf_where_positive(double key, double value) { return key > 0.0 ? value : 0.0; }

}  // namespace torchfast
