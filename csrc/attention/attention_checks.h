// Argument validation and input preparation of the flash-attention ops (CPU and CUDA).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "attention/attention_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace torchfast {

struct AttnShape {
  int64_t B, H, L, S, D, Dv;
};

inline AttnShape check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& mask, double scale, double dropout_p,
                                      const std::optional<at::Tensor>& rng_seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": query, key and value must be 4-D (batch, heads, length, head_dim), got shapes ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": query has dtype ", dt, "; supported: float32, float16, bfloat16, float64");
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": query, key and value must share a dtype, got ",
              dt, ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op,
              ": query, key and value must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1),
              op, ": batch and head dims must match, got query ", q.sizes(), ", key ", k.sizes(), ", value ",
              v.sizes());
  TORCH_CHECK(k.size(2) == v.size(2), op, ": key and value lengths differ: key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), op, ": query and key head dims differ: query ", q.sizes(), ", key ",
              k.sizes());
  const AttnShape sh{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), op,
                ": attn_mask must be an additive floating-point mask here, got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), op, ": attn_mask is on ", m.device(), " but query is on ", q.device());
    const int64_t want[4] = {sh.B, sh.H, sh.L, sh.S};
    bool ok = m.dim() <= 4;
    for (int64_t d = 0; ok && d < m.dim(); ++d) {
      const int64_t got = m.size(m.dim() - 1 - d), w = want[3 - d];
      ok = got == w || got == 1;
    }
    TORCH_CHECK(ok, op, ": attn_mask of shape ", m.sizes(), " does not broadcast to (batch, heads, L, S) = (",
                sh.B, ", ", sh.H, ", ", sh.L, ", ", sh.S, ")");
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng_seed.has_value() && rng_seed->defined() && rng_seed->numel() == 1 &&
                    rng_seed->scalar_type() == at::kLong && rng_seed->device().is_cpu(),
                op, ": dropout_p > 0 needs rng_seed, a one-element int64 CPU tensor");
  }
  return sh;
}

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1),
          t.size(2) > 1 ? t.stride(2) : std::max<int64_t>(t.size(3), 1)};
}

template <typename T>
MaskView<T> mask_view(const at::Tensor& mask) {
  if (!mask.defined()) return {};
  return {mask.const_data_ptr<T>(), mask.stride(0), mask.stride(1), mask.stride(2)};
}

inline AttnShape check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                               const std::optional<at::Tensor>& mask, double scale,
                                               double dropout_p, const std::optional<at::Tensor>& rng_seed) {
  const char* op = "torchfast.flash_attention_backward";
  const AttnShape sh = check_attention_args(op, q, k, v, mask, scale, dropout_p, rng_seed);
  const std::vector<int64_t> out_shape{sh.B, sh.H, sh.L, sh.Dv};
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape, op, ": grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have shape ", at::IntArrayRef(out_shape));
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({sh.B, sh.H, sh.L}), op, ": logsumexp must have shape (", sh.B, ", ",
              sh.H, ", ", sh.L, "), got ", lse.sizes());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), op,
              ": grad_out, out and logsumexp must be on the query's device ", q.device());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have the query's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(),
              " and ", out.scalar_type());
  return sh;
}

// The seed the dropout hash uses (0 when there is no dropout).
inline uint64_t attention_seed(double dropout_p, const std::optional<at::Tensor>& rng_seed) {
  return dropout_p > 0.0 ? static_cast<uint64_t>(rng_seed->item<int64_t>()) : 0;
}

// Math runs in fp32, or fp64 for fp64 inputs.
inline at::ScalarType attention_compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` in `dtype` with a unit-stride last dim (other strides are kept: the kernels read them).
inline at::Tensor attention_operand(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  // BLAS needs unit-stride rows that do not overlap (an expanded length dim has stride 0).
  if ((r.size(-1) > 1 && r.stride(-1) != 1) || (r.size(-2) > 1 && r.stride(-2) < r.size(-1))) r = r.contiguous();
  return r;
}

// The mask in `dtype`, expanded to (B, H, L, S) with a unit-stride last dim (copied only at its own
// size, and only when broadcast along S or strided in its last dim).
inline at::Tensor attention_mask_operand(const std::optional<at::Tensor>& mask, const AttnShape& sh,
                                         at::ScalarType dtype) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  at::Tensor m = mask->scalar_type() == dtype ? *mask : mask->to(dtype);
  if (sh.S > 1) {
    // A mask broadcast along S, or with a strided last dim (a transposed one), is made unit-stride at
    // its own rank first, so that the copy has the mask's size, not (B, H, L, S)'s.
    if (m.dim() == 0) m = m.reshape({1});
    if (m.size(-1) == 1 || m.stride(-1) != 1) {
      std::vector<int64_t> sizes = m.sizes().vec();
      sizes.back() = sh.S;
      m = m.expand(sizes).contiguous();
    }
  }
  return m.expand({sh.B, sh.H, sh.L, sh.S});
}

}  // namespace torchfast
