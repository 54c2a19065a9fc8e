// nvcuda::wmma for the emulator: 16x16x16 fragments with fp32 accumulation.
//
// Every lane holds whole tiles (its fragments are the full 16 x 16 matrix, widened to float; the
// kernels never index a fragment's elements), so loads and multiplies need no exchange between
// lanes. Stores are where a warp's lanes meet: store_matrix_sync writes only the elements the
// calling lane owns (element e of the tile belongs to lane e % 32), so a lane that reads the
// stored tile before the others have stored (no __syncwarp) reads their old values or the shared
// memory's poison. Pointers and leading dimensions are checked as CUDA requires (256-bit aligned
// pointers; ldm a multiple of 16 bytes).
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include "emulator/runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator models 16x16x16 WMMA fragments only");
  static constexpr int rows = 16, cols = 16;
  static constexpr int num_elements = rows * cols;
  float v[num_elements];  // row-major: v[r * 16 + c]
};

namespace detail {

template <typename T>
inline void check_operand(const char* op, const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    tf_emu::fault(std::string("wmma::") + op + ": pointer " + tf_emu::hex(reinterpret_cast<uintptr_t>(ptr)) +
                  " is not 256-bit (32-byte) aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    tf_emu::fault(std::string("wmma::") + op + ": ldm " + std::to_string(ldm) + " is not a multiple of " +
                  std::to_string(16 / sizeof(T)) + " for " + std::to_string(sizeof(T)) + "-byte elements");
}

template <typename T>
inline void load(float* v, const T* ptr, unsigned ldm, bool row_major) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      v[r * 16 + c] = static_cast<float>(row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  detail::check_operand("load_matrix_sync", ptr, ldm);
  detail::load(f.v, ptr, ldm, std::is_same_v<Layout, row_major>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* ptr, unsigned ldm,
                             layout_t layout) {
  detail::check_operand("load_matrix_sync", ptr, ldm);
  detail::load(f.v, ptr, ldm, layout == mem_row_major);
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_operand("store_matrix_sync", ptr, ldm);
  const unsigned lane = tf_emu::lane_id();
  for (unsigned e = lane; e < 256; e += 32) {
    const unsigned r = e / 16, c = e % 16;
    ptr[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.v[e];
  }
}

template <typename Use, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, V value) {
  const float x = static_cast<float>(static_cast<T>(value));
  for (float& e : f.v) e = x;
}

// d = a b + c (d may be c), accumulated in fp32.
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) out[r * 16 + col] = c.v[r * 16 + col];
    for (int k = 0; k < 16; ++k) {
      const float x = a.v[r * 16 + k];
      for (int col = 0; col < 16; ++col) out[r * 16 + col] += x * b.v[k * 16 + col];
    }
  }
  for (int e = 0; e < 256; ++e) d.v[e] = out[e];
}

}  // namespace nvcuda::wmma
