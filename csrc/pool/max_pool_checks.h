// Argument validation of the relu_max_pool2d ops (CPU and CUDA), with the output geometry.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "pool/max_pool_math.h"

namespace torchfast {

inline bool is_channels_last_4d(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline void check_pool_window(const char* op, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must have 2 values each, got ", kernel_size, ", ", stride, ", ",
              padding);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] > 0 && stride[d] > 0, op, ": kernel_size and stride must be positive, got ",
                kernel_size, " and ", stride);
    TORCH_CHECK(padding[d] >= 0 && 2 * padding[d] <= kernel_size[d], op,
                ": padding must be at least 0 and at most half the kernel size, got padding ", padding,
                " for kernel_size ", kernel_size);
  }
  TORCH_CHECK(kernel_size[0] * kernel_size[1] <= 256, op, ": windows of at most 256 elements (the argmax is one "
              "byte per output), got kernel_size ", kernel_size);
}

inline PoolGeometry pool_geometry(const char* op, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, bool channels_last) {
  TORCH_CHECK(input_size.size() == 4, op, ": input must be (N, C, H, W), got shape ", input_size);
  check_pool_window(op, kernel_size, stride, padding);
  PoolGeometry g;
  g.N = input_size[0];
  g.C = input_size[1];
  g.H = input_size[2];
  g.W = input_size[3];
  g.kh = static_cast<int>(kernel_size[0]);
  g.kw = static_cast<int>(kernel_size[1]);
  g.sh = static_cast<int>(stride[0]);
  g.sw = static_cast<int>(stride[1]);
  g.ph = static_cast<int>(padding[0]);
  g.pw = static_cast<int>(padding[1]);
  g.channels_last = channels_last;
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op, ": the padded input (", g.H, " x ", g.W,
              ", padding ", padding, ") is smaller than the kernel ", kernel_size);
  g.OH = pool_output_size(g.H, g.kh, g.sh, g.ph);
  g.OW = pool_output_size(g.W, g.kw, g.sw, g.pw);
  return g;
}

inline void check_pool_input(const char* op, const at::Tensor& input) {
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": input has dtype ", dt, "; supported: float32, float16, bfloat16, float64");
  TORCH_CHECK(input.dim() == 4, op, ": input must be (N, C, H, W), got shape ", input.sizes());
}

inline void check_pool_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& out,
                                const at::Tensor& argmax, const PoolGeometry& g) {
  const std::vector<int64_t> expect = {g.N, g.C, g.OH, g.OW};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expect) && out.sizes() == at::IntArrayRef(expect) &&
                  argmax.sizes() == at::IntArrayRef(expect),
              op, ": grad_out ", grad_out.sizes(), ", out ", out.sizes(), " and argmax ", argmax.sizes(),
              " must have the pooled shape ", at::IntArrayRef(expect));
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), op, ": grad_out and out must have one dtype, got ",
              grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(argmax.scalar_type() == at::kByte, op, ": argmax must be uint8 (relu_max_pool2d's), got ",
              argmax.scalar_type());
  TORCH_CHECK(grad_out.device() == out.device() && argmax.device() == out.device(), op,
              ": grad_out, out and argmax must be on one device, got ", grad_out.device(), ", ", out.device(), ", ",
              argmax.device());
}

inline at::MemoryFormat pool_memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace torchfast
