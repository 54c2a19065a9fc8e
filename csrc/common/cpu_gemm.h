// Row-major GEMM for CPU kernels: C = alpha * op(A) op(B) + beta * C.
//
// torch's CPU wheels link a BLAS (MKL on x86) into libtorch_cpu and export its Fortran entry points
// sgemm_/dgemm_; ATen's own cpublas::gemm wrappers are not exported. We bind the BLAS symbols
// weakly: where a build of torch lacks them, the portable loop below runs instead (correct, slower).
// Called from inside at::parallel_for, the BLAS runs single-threaded (as in ATen's own kernels).
#pragma once
#include <cstdint>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's bf16 x bf16 -> fp32 GEMM (AMX / AVX512-BF16 where the CPU has them); enums as their ints.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
}

namespace torchfast {

template <typename T>
void portable_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
                   int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c = C + i * ldc;
    for (int64_t j = 0; j < n; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
    for (int64_t p = 0; p < k; ++p) {
      const T a = alpha * (ta ? A[p * lda + i] : A[i * lda + p]);
      if (tb) {
        for (int64_t j = 0; j < n; ++j) c[j] += a * B[j * ldb + p];
      } else {
        const T* b = B + p * ldb;
        for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
      }
    }
  }
}

// op(A) is m x k (A stored k x m when ta), op(B) is k x n (B stored n x k when tb); all row-major.
// A column-major BLAS computes C^T = op(B)^T op(A)^T, which is row-major C.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(ldb < 1 ? 1 : ldb), ildb = static_cast<int>(lda < 1 ? 1 : lda);
  const int ildc = static_cast<int>(ldc < 1 ? 1 : ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr && k > 0) {
      sgemm_(&tra, &trb, &im, &in, &ik, &alpha, B, &ilda, A, &ildb, &beta, C, &ildc);
      return;
    }
  } else {
    if (dgemm_ != nullptr && k > 0) {
      dgemm_(&tra, &trb, &im, &in, &ik, &alpha, B, &ilda, A, &ildb, &beta, C, &ildc);
      return;
    }
  }
  portable_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Whether the BLAS multiplies bf16 (callers check before using gemm_rm_bf16).
inline bool bf16_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

// gemm_rm with bf16 operands and an fp32 C (fp32 accumulation). B16 is a 2-byte bfloat16 type
// (c10::BFloat16) whose bits MKL reads as they are. Only call when bf16_gemm_available().
template <typename B16>
void gemm_rm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const B16* A, int64_t lda,
                  const B16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  static_assert(sizeof(B16) == 2, "bfloat16 operands");
  if (m == 0 || n == 0 || k == 0) {
    if (m > 0 && n > 0 && beta != 1.f)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kColMajor, tb ? kTrans : kNoTrans, ta ? kTrans : kNoTrans, int(n), int(m), int(k), alpha,
                         reinterpret_cast<const uint16_t*>(B), int(ldb < 1 ? 1 : ldb),
                         reinterpret_cast<const uint16_t*>(A), int(lda < 1 ? 1 : lda), beta, C,
                         int(ldc < 1 ? 1 : ldc));
}

}  // namespace torchfast
