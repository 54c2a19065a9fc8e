// Batch norm + residual add + ReLU element math, shared by the CPU kernel (scalar and Vectorized)
// and a CUDA kernel. Per channel c: scale = weight * invstd, shift = bias - mean * scale.
#pragma once
#include "common/host_device.h"

namespace torchfast {

// out = relu?(x * scale + shift + residual)
template <typename T>
C10_HOST_DEVICE inline T bn_add_relu_forward(T x, T residual, T scale, T shift, bool relu) {
  T y = x * scale + shift + residual;
  return relu ? tf_max(y, T(0)) : y;
}

// The gradient that reaches the normalisation: grad_out where the ReLU passed (out > 0).
template <typename T>
C10_HOST_DEVICE inline T relu_backward(T grad_out, T out, bool relu) {
  return relu ? tf_where_positive(out, grad_out) : grad_out;
}

// grad_input = (dy - mean(dy) - xhat * mean(dy * xhat)) * weight * invstd in training,
// dy * weight * invstd in eval. k = weight * invstd; mean_dy, mean_dy_xhat are per-channel.
template <typename T>
C10_HOST_DEVICE inline T bn_input_grad(T dy, T x, T mean, T invstd, T k, T mean_dy, T mean_dy_xhat, bool training) {
  if (!training) return dy * k;
  const T xhat = (x - mean) * invstd;
  return (dy - mean_dy - xhat * mean_dy_xhat) * k;
}

}  // namespace torchfast
