// Register-tiled GEMM for the small products of CPU kernels: C = alpha * A B (+ C), all row-major,
// A m x k, B k x n, for fp32/fp64 where one of the dimensions is a head dim of a few dozen.
//
// Why not the BLAS: at attention's typical small shapes (64 x 64 x 16: 65K multiply-adds) a BLAS call
// spends as long in its fixed cost and operand packing as in the arithmetic, and on CPUs the BLAS does
// not recognise (MKL on AMD takes its generic AVX2 path) it also leaves half the vector width unused.
// Here each tile of R rows x NV vectors of C lives in registers for the whole k loop; per step of k it
// loads NV vectors of one B row and broadcasts R scalars of A. Compiled per CPU capability with the
// rest of the kernel, in at::vec's vector width for that capability.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace torchfast {
namespace small_gemm_detail {

// The machine's vector as a GCC/Clang vector type: unlike at::vec::Vectorized, whose arrays the
// compiler keeps in memory (every accumulator stored and reloaded on each step of k, measured), an
// array of these stays in registers, and a * b + c contracts to a fused multiply-add.
template <typename T>
struct Lanes {
  static constexpr int64_t W = at::vec::Vectorized<T>::size();
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};

template <typename VT, typename T>
inline VT load(const T* p, int64_t n) {  // n <= W elements; the rest zero
  VT v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}

template <typename VT, typename T>
inline void store(T* p, const VT& v, int64_t n) {
  std::memcpy(p, &v, n * sizeof(T));
}

// One R x (NV vectors) tile of C. kTail: the last vector holds only `tail` valid columns (partial
// loads and stores, so no column past n is read or written).
template <typename T, int R, int NV, bool kTail>
inline void tile(int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, int64_t tail,
                 bool accumulate, T* C, int64_t ldc) {
  using VT = typename Lanes<T>::type;
  constexpr int64_t W = Lanes<T>::W;
  auto width = [tail](int v) { return (kTail && v == NV - 1) ? tail : W; };
  VT acc[R][NV] = {};
  for (int64_t p = 0; p < k; ++p) {
    const T* b = B + p * ldb;
    VT bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load<VT>(b + v * W, width(v));
    for (int r = 0; r < R; ++r) {
      const T a = A[r * lda + p];
      for (int v = 0; v < NV; ++v) acc[r][v] = a * bv[v] + acc[r][v];
    }
  }
  for (int r = 0; r < R; ++r) {
    T* c = C + r * ldc;
    for (int v = 0; v < NV; ++v) {
      VT out = alpha * acc[r][v];
      if (accumulate) out = out + load<VT>(c + v * W, width(v));
      store(c + v * W, out, width(v));
    }
  }
}

// All rows of one column block: tiles of R rows, then single rows.
template <typename T, int R, int NV, bool kTail>
inline void column_block(int64_t m, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                         int64_t tail, bool accumulate, T* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + R <= m; i += R) tile<T, R, NV, kTail>(k, alpha, A + i * lda, lda, B, ldb, tail, accumulate, C + i * ldc, ldc);
  for (; i < m; ++i) tile<T, 1, NV, kTail>(k, alpha, A + i * lda, lda, B, ldb, tail, accumulate, C + i * ldc, ldc);
}

// Rows per tile: at least 8 independent accumulators (two FMA units of four cycles' latency), and
// R * NV at most 16 (with the B vectors and the broadcast beside them, more would spill on AVX2).
template <typename T, int NV, bool kTail>
inline void column_block_for(int64_t m, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                             int64_t tail, bool accumulate, T* C, int64_t ldc) {
  constexpr int R = NV == 1 ? 8 : NV == 2 ? 6 : 4;
  column_block<T, R, NV, kTail>(m, k, alpha, A, lda, B, ldb, tail, accumulate, C, ldc);
}

}  // namespace small_gemm_detail

// C (m x n, row stride ldc) = alpha * A (m x k, lda) * B (k x n, ldb), plus C's old values when
// `accumulate`. Columns are taken four vectors at a time.
template <typename T>
void small_gemm(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                bool accumulate, T* C, int64_t ldc) {
  using namespace small_gemm_detail;
  constexpr int64_t W = small_gemm_detail::Lanes<T>::W;
  for (int64_t c0 = 0; c0 < n; c0 += 4 * W) {
    const int64_t cols = std::min<int64_t>(4 * W, n - c0);
    const int nv = static_cast<int>((cols + W - 1) / W);
    const int64_t tail = cols - (nv - 1) * W;
    const T* b = B + c0;
    T* c = C + c0;
#define TORCHFAST_SMALL_GEMM_CASE(NV)                                                        \
  case NV:                                                                                   \
    if (tail == W) {                                                                         \
      column_block_for<T, NV, false>(m, k, alpha, A, lda, b, ldb, tail, accumulate, c, ldc); \
    } else {                                                                                 \
      column_block_for<T, NV, true>(m, k, alpha, A, lda, b, ldb, tail, accumulate, c, ldc);  \
    }                                                                                        \
    break;
    switch (nv) {
      TORCHFAST_SMALL_GEMM_CASE(1)
      TORCHFAST_SMALL_GEMM_CASE(2)
      TORCHFAST_SMALL_GEMM_CASE(3)
      TORCHFAST_SMALL_GEMM_CASE(4)
    }
#undef TORCHFAST_SMALL_GEMM_CASE
  }
}

}  // namespace torchfast
