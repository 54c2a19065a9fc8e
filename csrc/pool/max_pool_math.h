// Math of torchfast::relu_max_pool2d shared by the CPU and the CUDA kernels: the window geometry,
// torch's max-pooling rule (NaN-propagating, first maximum kept) and the ReLU's gradient mask.
//
// The argmax is the position of the window's maximum inside its window (row-major, kh * kw + kw),
// one byte per output element: an eighth of torch's int64 plane index, and enough for windows of
// up to 256 elements (checked on entry).
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

namespace torchfast {

struct PoolGeometry {
  int64_t N, C, H, W, OH, OW;
  int kh, kw, sh, sw, ph, pw;
  bool channels_last;  // NHWC memory (else NCHW), for input, output and argmax alike
};

// Output size of one spatial dim (dilation 1, floor mode), as torch computes it.
C10_HOST_DEVICE inline int64_t pool_output_size(int64_t in, int k, int s, int p) {
  return (in + 2 * p - k) / s + 1;
}

// Whether `v` replaces the window's running maximum `best`: a larger value or a NaN (a NaN wins and
// stays, as in torch's kernels on both devices).
template <typename T>
C10_HOST_DEVICE inline bool pool_takes(T v, T best) {
  return v > best || v != v;
}

// The pooled value after the optional ReLU (max pooling commutes with ReLU; NaN stays NaN).
template <typename T>
C10_HOST_DEVICE inline T pool_relu(T v, bool relu) {
  return relu && v < T(0) ? T(0) : v;
}

// The gradient that reaches the window's maximum: with the ReLU, none where the pooled output is
// <= 0 (torch's threshold_backward on the ReLU's result: a NaN output passes it).
template <typename T>
C10_HOST_DEVICE inline T pool_grad_through_relu(T grad, T out, bool relu) {
  return relu && out <= T(0) ? T(0) : grad;
}

// The windows that contain input row (or column) `i`: first..last output index, inclusive (empty
// when first > last).
C10_HOST_DEVICE inline void pool_windows_of(int64_t i, int k, int s, int p, int64_t out_size, int64_t& first,
                                            int64_t& last) {
  const int64_t hi = i + p;  // position in the padded input
  first = hi < k ? 0 : (hi - k) / s + 1;
  last = hi / s;
  if (last > out_size - 1) last = out_size - 1;
}

}  // namespace torchfast
