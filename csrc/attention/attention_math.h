// Math shared by the CPU and CUDA attention kernels, and mirrored in Python by
// torchfast/reference/attention.py (which must stay bit-identical for the dropout mask).
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

namespace torchfast {

// One (B, H, N, D) operand read in place: element (b, h, n, d) at b*sb + h*sh + n*ld + d.
template <typename T>
struct Rows {
  const T* data = nullptr;
  int64_t sb = 0, sh = 0, ld = 0;
  C10_HOST_DEVICE const T* at(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * ld; }
};

// The additive mask, (B, H, L, S) strides with a unit-stride last dim; data is null without one.
template <typename T>
struct MaskView {
  const T* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;
  C10_HOST_DEVICE const T* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * sl; }
};

// murmur3's 32-bit finaliser: a cheap bijective mix with good avalanche.
C10_HOST_DEVICE inline uint32_t attn_mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Dropout is a pure function of (seed, batch*head index, query row, key column), so the forward
// and the backward (and the CPU and CUDA kernels) draw the same mask without storing it.
// The row key folds in everything but the column; the per-element hash is then one mix.
C10_HOST_DEVICE inline uint32_t dropout_row_key(uint64_t seed, int64_t bh, int64_t row) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  uint32_t k = attn_mix32(lo ^ attn_mix32(static_cast<uint32_t>(bh) + hi * 0x9e3779b9u));
  return attn_mix32(k ^ (static_cast<uint32_t>(row) * 0x85ebca77u));
}

C10_HOST_DEVICE inline uint32_t dropout_bits(uint32_t row_key, int64_t col) {
  return attn_mix32(row_key ^ (static_cast<uint32_t>(col) * 0x9e3779b1u));
}

// An element is kept when its bits are >= threshold = round(p * 2^32) (so P(keep) = 1 - p).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t + 0.5);
}

}  // namespace torchfast
