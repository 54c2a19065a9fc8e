// bf16 x bf16 -> fp32 products through ATen's batch-reduce GEMM (oneDNN micro-kernels: AMX tiles on
// CPUs that have them), with the B operand packed once and reused by every product that reads it.
//
// Why not the BLAS: MKL's bf16 GEMM repacks both operands on every call, which for the small block
// products of attention costs as much as the multiply. ATen exports `cpublas::pack` / `brgemm`
// (what its own CPU flash attention uses); they take B in the VNNI layout (pairs of K rows
// interleaved), which must be built in chunks of at most 64 columns whose widths are multiples of
// 16, with an even K (measured on oneDNN 3.x: other widths fail to create the packing object, and
// an odd K is not supported). PackedB below hides those rules: it zero-pads K to even and N to a
// multiple of 16, and `brgemm_packed` walks the chunks.
#pragma once
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace torchfast {

// The brgemm API (with these signatures) is in ATen's headers since they define this macro; older
// torch builds compile the fallbacks below, and the callers keep to the BLAS.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define TORCHFAST_HAVE_BF16_BRGEMM 1
#else
#define TORCHFAST_HAVE_BF16_BRGEMM 0
#endif

// Whether bf16 products can go through packed brgemm here: a CPU with AMX, and oneDNN enabled (asked
// on every call: `torch.backends.mkldnn.flags(enabled=False)` turns brgemm off at run time).
inline bool bf16_brgemm_available() {
#if TORCHFAST_HAVE_BF16_BRGEMM
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

constexpr int64_t kPackChunk = 64;  // widest column chunk the packing accepts

// Geometry of one packed K x N operand: K padded to even, N to a multiple of 16; chunk c (starting
// at column c, a multiple of 64) holds K_pad x width(c) elements at offset c * K_pad.
struct PackedShape {
  int64_t K_pad = 0, N_pad = 0;
  PackedShape() = default;
  PackedShape(int64_t K, int64_t N) : K_pad(round_up(std::max<int64_t>(K, 1), 2)), N_pad(round_up(std::max<int64_t>(N, 1), 16)) {}
  int64_t numel() const { return K_pad * N_pad; }
  int64_t width(int64_t c) const { return std::min(kPackChunk, N_pad - c); }
};

// Packs the K x N matrix B into `dst` (shape.numel() elements). B is read as src[k * ld + n], or,
// with `transposed`, as src[n * ld + k] (so a row-major N x K array packs as its transpose).
// `scratch` is resized as needed; padding is zero.
inline void pack_b(const c10::BFloat16* src, int64_t ld, int64_t K, int64_t N, bool transposed,
                   const PackedShape& shape, c10::BFloat16* dst, std::vector<c10::BFloat16>& scratch) {
  scratch.assign(shape.numel(), c10::BFloat16(0.f));
  c10::BFloat16* s = scratch.data();
  if (transposed) {  // 16 source rows at a time: contiguous writes, reads from 16 rows kept in L1
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      const int64_t n1 = std::min(N, n0 + 16);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = n0; n < n1; ++n) s[k * shape.N_pad + n] = src[n * ld + k];
    }
  } else {
    for (int64_t k = 0; k < K; ++k) std::copy(src + k * ld, src + k * ld + N, s + k * shape.N_pad);
  }
#if TORCHFAST_HAVE_BF16_BRGEMM
  for (int64_t c = 0; c < shape.N_pad; c += kPackChunk) {
    const int64_t w = shape.width(c);
    at::native::cpublas::pack(shape.K_pad, w, shape.N_pad, w, at::kBFloat16, at::kBFloat16, s + c, dst + c * shape.K_pad);
  }
#else
  (void)dst;
#endif
}

// C[:, 0 : c_end - c_begin] (+)= A (M x K, row-major, ld lda) times rows [0, K) and columns
// [c_begin, c_end) of the packed B. K is even and at most K_pad (the first K rows of a packed operand
// are a packed operand themselves, measured); A must hold K readable columns. c_begin is a multiple
// of 64 and c_end is rounded up to whole chunks, so C needs room for them.
inline void brgemm_packed(int64_t M, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* packed,
                          const PackedShape& shape, int64_t c_begin, int64_t c_end, float* C, int64_t ldc, bool add) {
  TORCH_INTERNAL_ASSERT(c_begin % kPackChunk == 0 && K % 2 == 0 && K <= shape.K_pad);
#if TORCHFAST_HAVE_BF16_BRGEMM
  if (K == 0) return;
  for (int64_t c = c_begin; c < std::min(c_end, shape.N_pad); c += kPackChunk) {
    const int64_t w = shape.width(c);
    at::native::cpublas::brgemm(M, w, K, lda, w, ldc, add, A, packed + c * shape.K_pad, C + (c - c_begin),
                                /*is_vnni=*/true);
  }
#else
  (void)M, (void)A, (void)lda, (void)packed, (void)c_end, (void)C, (void)ldc, (void)add;
#endif
}

// Releases the AMX tile state brgemm configured. Needed before any other AMX user runs on the thread
// (MKL's bf16 GEMM configures and releases the tiles itself; brgemm, which remembers its own
// configuration, would then run tile instructions on released tiles: an illegal instruction).
inline void brgemm_release_tiles() {
#if TORCHFAST_HAVE_BF16_BRGEMM
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
}

// Releases the AMX tile state a thread's brgemm calls configured, when it leaves its work (also by an
// exception).
struct BrgemmScope {
  bool active;
  explicit BrgemmScope(bool active_) : active(active_) {}
  BrgemmScope(const BrgemmScope&) = delete;
  BrgemmScope& operator=(const BrgemmScope&) = delete;
  ~BrgemmScope() {
    if (active) brgemm_release_tiles();
  }
};

}  // namespace torchfast
