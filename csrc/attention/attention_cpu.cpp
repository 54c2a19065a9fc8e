// CPU kernels of torchfast::flash_attention and torchfast::flash_attention_backward.
//
// Flash attention on the CPU: queries are cut into blocks of rows and keys into blocks of columns;
// each (query block, key block) product goes through the BLAS GEMM (csrc/common/cpu_gemm.h), and
// softmax is computed online (running row max and sum), so the extra memory is one score block per
// thread, never (L, S). The backward recomputes each probability block from the saved logsumexp.
// All math is in the compute type (fp32, or fp64 for fp64 inputs). bf16 inputs stay bf16 as GEMM
// operands where the BLAS multiplies bf16 (fp32 accumulation; probabilities and score gradients are
// rounded to bf16 for their products, as flash attention does on GPUs); fp16 (and bf16 without such
// a BLAS) is widened once up front (O(L) memory). Results are narrowed at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/attention_math.h"
#include "common/cpu_brgemm.h"
#include "common/cpu_gemm.h"
#include "common/cpu_small_gemm.h"

namespace torchfast {
namespace {

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

// max_j(x[j] * xs), NaN if any score is NaN (at::vec::maximum propagates NaN: a NaN query or key
// must reach the output, as in torch, not read as a masked row). Four independent accumulators keep
// the vector units busy.
template <typename T>
T row_max(const T* x, int64_t n, T xs) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> vs(xs);
  Vec<T> m0(neg_inf<T>()), m1(neg_inf<T>()), m2(neg_inf<T>()), m3(neg_inf<T>());
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    m0 = at::vec::maximum(Vec<T>::loadu(x + j) * vs, m0);
    m1 = at::vec::maximum(Vec<T>::loadu(x + j + V) * vs, m1);
    m2 = at::vec::maximum(Vec<T>::loadu(x + j + 2 * V) * vs, m2);
    m3 = at::vec::maximum(Vec<T>::loadu(x + j + 3 * V) * vs, m3);
  }
  for (; j + V <= n; j += V) m0 = at::vec::maximum(Vec<T>::loadu(x + j) * vs, m0);
  m0 = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  T r = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, m0);
  for (; j < n; ++j) r = std::isnan(x[j] * xs) || x[j] * xs > r ? x[j] * xs : r;
  return r;
}

// x = exp(x * xs - shift) in place; exp(-inf) is 0 (masked entries).
template <typename T>
void exp_shifted(T* x, int64_t n, T xs, T shift) {
  at::vec::map([xs, shift](Vec<T> v) { return (v * Vec<T>(xs) - Vec<T>(shift)).exp_u20(); }, x, x, n);
}

// dst = exp(x * xs - shift), stored as D (T, or bf16 straight into the block the product reads);
// returns the sum (of the unrounded values), and the max of x * xs (NaN if any is) through *xmax. kFast takes ATen's
// cheaper exp (relative error ~1e-4, measured), for probabilities that are rounded to bf16 (~4e-3)
// before their product anyway.
template <bool kFast = false, typename T, typename D>
T exp_shifted_sum_max(const T* x, T xs, D* dst, int64_t n, T shift, T* xmax) {
  const Vec<T> vshift(shift), vs(xs);
  Vec<T> vsum(T(0)), vmax(neg_inf<T>());
  auto exp_of = [&](int64_t j) {
    const Vec<T> xv = Vec<T>::loadu(x + j) * vs;
    vmax = at::vec::maximum(xv, vmax);
    const Vec<T> e = kFast ? (xv - vshift).fexp_u20() : (xv - vshift).exp_u20();
    vsum = vsum + e;
    return e;
  };
  constexpr int64_t V = Vec<T>::size();
  int64_t j = 0;
  if constexpr (std::is_same_v<D, T>) {
    for (; j + V <= n; j += V) exp_of(j).store(dst + j);
  } else {  // two fp32 vectors make one bf16 vector
    for (; j + 2 * V <= n; j += 2 * V) {
      const Vec<T> e0 = exp_of(j), e1 = exp_of(j + V);
      at::vec::convert_from_float<D>(e0, e1).store(dst + j);
    }
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, vsum);
  T m = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) {
    const T xj = x[j] * xs;
    m = std::isnan(xj) || xj > m ? xj : m;
    const T e = std::exp(xj - shift);
    dst[j] = static_cast<D>(e);
    sum += e;
  }
  *xmax = m;
  return sum;
}

template <typename T>
void scale_row(T* x, int64_t n, T a) {
  at::vec::map([a](Vec<T> v) { return v * Vec<T>(a); }, x, x, n);
}

template <typename T>
void add_row(T* x, const T* y, int64_t n) {
  at::vec::map2([](Vec<T> a, Vec<T> b) { return a + b; }, x, x, y, n);
}

// Everything a block of rows needs to know about masking and dropout.
template <typename T>
struct Masking {
  MaskView<T> mask;
  bool causal = false;
  bool dropout = false;
  uint32_t threshold = 0;
  T keep_scale = T(1);  // 1 / (1 - p), or 0 when p == 1
  uint64_t seed = 0;

  // Scales scores row[0, n) of query i against keys j0.. by `pre` (when the product left them
  // unscaled), then adds the mask and the causal -inf.
  void apply(T* row, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, T pre = T(1)) const {
    if (mask.data != nullptr) {
      if (pre == T(1)) {
        add_row(row, mask.row(b, h, i) + j0, n);
      } else {
        at::vec::map2([pre](Vec<T> a, Vec<T> m) { return a * Vec<T>(pre) + m; }, row, row, mask.row(b, h, i) + j0, n);
      }
    } else if (pre != T(1)) {
      scale_row(row, n, pre);
    }
    if (causal && j0 + n - 1 > i) std::fill(row + std::max<int64_t>(i - j0 + 1, 0), row + n, neg_inf<T>());
  }
  // Per-element dropout factor (0 or keep_scale) of query i against keys j0..j0+n.
  void factors(T* z, int64_t bh, int64_t i, int64_t j0, int64_t n) const {
    const uint32_t key = dropout_row_key(seed, bh, i);
    for (int64_t j = 0; j < n; ++j) z[j] = dropout_bits(key, j0 + j) >= threshold ? keep_scale : T(0);
  }
};

template <typename T>
Masking<T> make_masking(const at::Tensor& mask, bool causal, double p, uint64_t seed) {
  Masking<T> mk;
  mk.mask = mask_view<T>(mask);
  mk.causal = causal;
  mk.dropout = p > 0.0;
  mk.threshold = dropout_threshold(p);
  mk.keep_scale = p < 1.0 ? static_cast<T>(1.0 / (1.0 - p)) : T(0);
  mk.seed = seed;
  return mk;
}

// Block sizes: big enough for the GEMMs to run near peak, small enough that a score block and the
// operand blocks stay in L2.
// (Measured at B=4, H=8, D=64 on AVX-512: forward 256 x 512, backward 128 x 256 were the fastest.)
constexpr double kMaxSlack = 8.0;

inline int64_t query_block(int64_t L) { return L >= 768 ? 256 : 64; }
inline int64_t key_block(int64_t S) { return std::max<int64_t>(std::min<int64_t>(S, 512), 1); }
inline int64_t backward_query_block(int64_t L) { return L >= 768 ? 128 : 64; }
inline int64_t backward_key_block(int64_t S) { return std::max<int64_t>(std::min<int64_t>(S, 256), 1); }

// fp32/fp64 products with a head dim of at most kSmallHeadDim inside (Q K^T) or outside (P V) and at
// most kSmallKeys keys go through small_gemm instead of the BLAS (csrc/common/cpu_small_gemm.h: at
// 64 x 64 x 16 the BLAS call's fixed cost and packing are as large as the arithmetic). Longer key
// blocks stay on the BLAS: with MKL's AVX-512 kernels (Intel CPUs) it was faster from 256 keys on
// (B=4, H=8, L=S=512, D=64: 1.08-1.12x torch's SDPA against 1.30-1.37x through small_gemm; at 64 keys,
// D=16, small_gemm 1.03x against 1.12-1.14x), where MKL's AVX2 path on AMD CPUs was not.
constexpr int64_t kSmallHeadDim = 64;
constexpr int64_t kSmallKeys = 128;

template <typename O, typename T>
bool use_small_products(const AttnShape& sh) {
  return std::is_same_v<O, T> && sh.D <= kSmallHeadDim && sh.Dv <= kSmallHeadDim && sh.S <= kSmallKeys;
}

// O is the operand type of the products (the inputs as stored): T itself, or bf16 with fp32 math T,
// where the BLAS multiplies bf16 natively (AMX on recent x86).
template <typename O, typename T>
void gemm_op(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const O* A, int64_t lda, const O* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<O, T>) {
    gemm_rm<T>(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm_rm_bf16(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

// A block in the compute type as an operand: itself, or rounded to bf16 in `buf` (as flash attention
// does on GPUs: probabilities and score gradients enter the second products in the input precision).
template <typename O, typename T>
const O* as_operand(const T* x, int64_t n, std::vector<O>& buf) {
  if constexpr (std::is_same_v<O, T>) {
    return x;
  } else {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    at::vec::convert(x, buf.data(), n);
    return buf.data();
  }
}

// The packed bf16 products (csrc/common/cpu_brgemm.h) for operand type O: only ever called with bf16
// operands (use_packed_products is false for the others), written once here so that the kernels can
// branch on a run-time `packed` without compile-time guards at each call.
template <typename O>
void pack_operand(const O* src, int64_t ld, int64_t K, int64_t N, bool transposed, const PackedShape& shape,
                  std::vector<c10::BFloat16>& dst, std::vector<c10::BFloat16>& scratch, int64_t offset = 0) {
  if constexpr (std::is_same_v<O, c10::BFloat16>) {
    if (static_cast<int64_t>(dst.size()) < offset + shape.numel()) dst.resize(offset + shape.numel());
    pack_b(src, ld, K, N, transposed, shape, dst.data() + offset, scratch);
  } else {
    TORCH_INTERNAL_ASSERT(false, "packed products take bf16 operands");
  }
}

template <typename O, typename T>
void packed_product(int64_t M, int64_t K, const O* A, int64_t lda, const c10::BFloat16* packed,
                    const PackedShape& shape, int64_t c_begin, int64_t c_end, T* C, int64_t ldc, bool add) {
  if constexpr (std::is_same_v<O, c10::BFloat16> && std::is_same_v<T, float>) {
    brgemm_packed(M, K, A, lda, packed, shape, c_begin, c_end, C, ldc, add);
  } else {
    TORCH_INTERNAL_ASSERT(false, "packed products take bf16 operands");
  }
}

// Whether the products run on packed bf16 operands: bf16 inputs on a CPU where brgemm runs them, with
// even inner dimensions read from the input rows (the head dim D; for the backward's dP = dO V^T also
// Dv). Other inputs stay on the BLAS.
template <typename O>
bool use_packed_products(const AttnShape& sh, bool dv_inner) {
  return std::is_same_v<O, c10::BFloat16> && sh.D > 0 && sh.Dv > 0 && sh.D % 2 == 0 &&
         (!dv_inner || sh.Dv % 2 == 0) && bf16_brgemm_available();
}

// Where the softmax scale goes. The BLAS products take it as alpha; packed products leave the scores
// unscaled, so the row pass applies it: with the mask / causal pass when there is one (`pre`), else
// inside the exp pass (`xs`).
template <typename T>
struct ScoreScale {
  T pre = T(1), xs = T(1);
  ScoreScale(bool packed, const Masking<T>& mk, T scale) {
    if (!packed) return;
    (mk.mask.data != nullptr || mk.causal ? pre : xs) = scale;
  }
};

// One batch*head's keys and values packed for brgemm (bf16 operands on CPUs where ATen's brgemm
// runs them, see csrc/common/cpu_brgemm.h): K^T (D x S: its column chunks are key chunks of 64) and
// V cut into the forward's key blocks, each a kB x Dv operand. Each thread packs the batch*heads
// its query blocks belong to, when it reaches them (tasks are ordered by batch*head, so a thread
// packs each of its batch*heads once; one split between two threads is packed by both).
struct PackedKV {
  int64_t kB = 0, nkb = 0, bh = -1;
  PackedShape kt;      // K = D, N = S
  int64_t v_slot = 0;  // elements per key block of V
  std::vector<c10::BFloat16> k_data, v_data, scratch;

  PackedKV(const AttnShape& sh, int64_t kB_)
      : kB(kB_), nkb((sh.S + kB_ - 1) / kB_), kt(sh.D, sh.S), v_slot(PackedShape(kB_, sh.Dv).numel()) {}
  PackedShape v_block(const AttnShape& sh, int64_t kb) const { return PackedShape(std::min(kB, sh.S - kb * kB), sh.Dv); }
  const c10::BFloat16* v_of(int64_t kb) const { return v_data.data() + kb * v_slot; }

  template <typename O>
  void pack(const Rows<O>& k, const Rows<O>& v, const AttnShape& sh, int64_t bh_) {
    if (bh_ == bh) return;
    bh = bh_;
    const int64_t b = bh / sh.H, h = bh % sh.H;
    pack_operand(k.at(b, h, 0), k.ld, sh.D, sh.S, /*transposed=*/true, kt, k_data, scratch);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t j0 = kb * kB;
      pack_operand(v.at(b, h, j0), v.ld, std::min(kB, sh.S - j0), sh.Dv, /*transposed=*/false, v_block(sh, kb),
                   v_data, scratch, kb * v_slot);
    }
  }
};

// acc[r, :Dv] += p[r * ldp] * value[:Dv] for r < m (one key's contribution, in the compute type T).
template <typename O, typename T>
void add_last_key(const O* p, int64_t ldp, const O* value, int64_t m, int64_t Dv, T* acc, int64_t ald) {
  std::vector<T> v(Dv);
  at::vec::convert(value, v.data(), Dv);
  for (int64_t r = 0; r < m; ++r) {
    const T pr = static_cast<T>(p[r * ldp]);
    at::vec::map2([pr](Vec<T> a, Vec<T> x) { return a + x * Vec<T>(pr); }, acc + r * ald, acc + r * ald, v.data(), Dv);
  }
}

// out is written as O when the operands are bf16 (the input dtype), else in the compute type T.
template <typename O, typename T>
void forward_kernel(const Rows<O>& q, const Rows<O>& k, const Rows<O>& v, const Masking<T>& mk, T scale,
                    const AttnShape& sh, std::conditional_t<std::is_same_v<O, T>, T, O>* out, T* lse) {
  const bool packed = use_packed_products<O>(sh, /*dv_inner=*/false);
  // (AMX products want taller blocks than the fp32 BLAS: 128 rows measured faster at L = 512)
  const int64_t qB = packed ? std::max<int64_t>(query_block(sh.L), 128) : query_block(sh.L), kB = key_block(sh.S);
  const int64_t nq = (sh.L + qB - 1) / qB;
  // Packed products write whole 64-column chunks (scores) and 16-column groups (the output), and
  // leave the scores unscaled: the rows apply the scale (with the mask, or inside the exp pass).
  const bool small = !packed && use_small_products<O, T>(sh);
  // Small products write whole vectors: score rows padded to the vector width (the columns past a
  // block's keys are never read).
  const int64_t sld = packed ? round_up(kB, kPackChunk) : small ? round_up(kB, Vec<T>::size()) : kB;
  const int64_t ald = packed ? round_up(sh.Dv, 16) : sh.Dv;
  const ScoreScale<T> ss(packed, mk, scale);
  const T xs = ss.xs;
  at::parallel_for(0, sh.B * sh.H * nq, 1, [&](int64_t begin, int64_t end) {
    constexpr bool kNarrow = !std::is_same_v<O, T>;  // bf16 operands
    std::vector<T> scores(qB * sld), row_buf(kNarrow ? sld : 0);
    std::vector<T> acc(qB * ald), mx(qB), sum(qB), z(mk.dropout ? kB : 0);
    std::vector<O> probs(qB * sld);  // the product's operand: the probabilities in O
    std::vector<T> kt(small ? sh.D * sld : 0);  // small products: the key block transposed (D x sld)
    PackedKV pk(sh, kB);
    const BrgemmScope brgemm_scope(packed);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nq, i0 = (task % nq) * qB, m = std::min(qB, sh.L - i0);
      const int64_t b = bh / sh.H, h = bh % sh.H;
      if (packed) pk.pack(k, v, sh, bh);
      std::fill(acc.begin(), acc.begin() + m * ald, T(0));
      std::fill(mx.begin(), mx.end(), neg_inf<T>());
      std::fill(sum.begin(), sum.end(), T(0));
      // The row's probabilities against the block's keys into prow (the compute type, or bf16 when
      // they go straight into the product's operand), with the online max/sum update.
      auto row_probabilities = [&](int64_t r, int64_t i, const T* row, auto* prow, int64_t n, int64_t j0) {
        using P = std::remove_pointer_t<decltype(prow)>;
        // Lazy rescaling: once a row has a max, exponentiate against it in the same pass that finds
        // this block's max, and only redo the row (rare) when the block's max exceeds it by more
        // than kMaxSlack -- the probabilities then stay below e^kMaxSlack, far from overflow.
        // A NaN score makes the row NaN (sum[r] = NaN, written out at the end); its probabilities
        // are then left at 0 so they cannot touch the other rows' products.
        auto poisoned = [&]() {
          sum[r] = std::numeric_limits<T>::quiet_NaN();
          std::fill(prow, prow + n, P(0.f));
        };
        if (std::isnan(sum[r])) return poisoned();
        T block_max = neg_inf<T>(), block_sum = T(0);
        if (mx[r] != neg_inf<T>()) block_sum = exp_shifted_sum_max<kNarrow>(row, xs, prow, n, mx[r], &block_max);
        if (std::isnan(block_max)) return poisoned();
        if (mx[r] == neg_inf<T>() || block_max > mx[r] + kMaxSlack) {
          const T candidate = mx[r] == neg_inf<T>() ? row_max(row, n, xs) : block_max;
          if (std::isnan(candidate)) return poisoned();
          const T new_max = std::max(mx[r], candidate);
          if (new_max == neg_inf<T>()) {  // every key so far is masked
            std::fill(prow, prow + n, P(0.f));
            return;
          }
          const T correction = std::exp(mx[r] - new_max);
          block_sum = exp_shifted_sum_max<kNarrow>(row, xs, prow, n, new_max, &block_max);
          if (correction != T(1)) scale_row(acc.data() + r * ald, sh.Dv, correction);
          sum[r] *= correction;
          mx[r] = new_max;
        }
        sum[r] += block_sum;
        if constexpr (std::is_same_v<P, T>) {
          if (mk.dropout) {  // the normaliser keeps every probability; the output only the kept ones
            mk.factors(z.data(), bh, i, j0, n);
            at::vec::map2([](Vec<T> a, Vec<T> f) { return a * f; }, prow, prow, z.data(), n);
          }
        }
      };
      const int64_t kv_end = mk.causal ? std::min(sh.S, i0 + m) : sh.S;
      for (int64_t j0 = 0; j0 < kv_end; j0 += kB) {
        const int64_t n = std::min(kB, kv_end - j0);
        const int64_t vblock_rows = std::min(kB, sh.S - j0);  // n is smaller only at a causal diagonal
        const PackedShape vblock = packed ? pk.v_block(sh, j0 / kB) : PackedShape();
        if (packed) {  // (j0 is a multiple of 64: key_block is S itself or 512)
          packed_product(m, sh.D, q.at(b, h, i0), q.ld, pk.k_data.data(), pk.kt, j0, j0 + n, scores.data(), sld, false);
        } else if (small) {
          if constexpr (std::is_same_v<O, T>) {
            at::vec::transpose_mxn<T>(k.at(b, h, j0), k.ld, kt.data(), sld, static_cast<int>(n), static_cast<int>(sh.D));
            const int64_t n_pad = round_up(n, Vec<T>::size());
            small_gemm<T>(m, n_pad, sh.D, scale, q.at(b, h, i0), q.ld, kt.data(), sld, false, scores.data(), sld);
          }
        } else {
          gemm_op<O, T>(false, true, m, n, sh.D, scale, q.at(b, h, i0), q.ld, k.at(b, h, j0), k.ld, T(0),
                        scores.data(), sld);
        }
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          T* row = scores.data() + r * sld;
          mk.apply(row, b, h, i, j0, n, ss.pre);
          // The probabilities go straight into the block the product reads; bf16 ones with dropout
          // through a one-row fp32 buffer still in L1, where the factors apply.
          O* dst = probs.data() + r * sld;
          if (kNarrow && mk.dropout) {
            row_probabilities(r, i, row, row_buf.data(), n, j0);
            at::vec::convert(row_buf.data(), dst, n);
          } else {
            row_probabilities(r, i, row, dst, n, j0);
          }
          // a whole key block (n == its rows) is read to its even K_pad: the padding weighs nothing
          if (packed && n == vblock_rows) std::fill(dst + n, dst + vblock.K_pad, O(0.f));
        }
        if (packed) {
          // A causal diagonal block stops at key n: the products read only its first keys (never the
          // values past the causal limit), an odd last one as a rank-1 update.
          const int64_t K = n == vblock_rows ? vblock.K_pad : n - n % 2;
          packed_product(m, K, probs.data(), sld, pk.v_of(j0 / kB), vblock, 0, vblock.N_pad, acc.data(), ald, true);
          if (K < n) add_last_key(probs.data() + (n - 1), sld, v.at(b, h, j0 + n - 1), m, sh.Dv, acc.data(), ald);
        } else if (small) {
          if constexpr (std::is_same_v<O, T>)
            small_gemm<T>(m, sh.Dv, n, T(1), probs.data(), sld, v.at(b, h, j0), v.ld, true, acc.data(), ald);
        } else {
          gemm_op<O, T>(false, false, m, sh.Dv, n, T(1), probs.data(), sld, v.at(b, h, j0), v.ld, T(1), acc.data(),
                        ald);
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = i0 + r;
        auto* o = out + (bh * sh.L + i) * sh.Dv;
        T* a = acc.data() + r * ald;
        if (std::isnan(sum[r])) {  // a NaN score: the row is NaN, as in torch
          std::fill(o, o + sh.Dv, std::remove_pointer_t<decltype(o)>(std::numeric_limits<float>::quiet_NaN()));
          lse[bh * sh.L + i] = std::numeric_limits<T>::quiet_NaN();
        } else if (sum[r] > T(0)) {
          const T inv = T(1) / sum[r];
          if constexpr (kNarrow) {  // normalise in place, then round once into the output
            scale_row(a, sh.Dv, inv);
            at::vec::convert(a, o, sh.Dv);
          } else {
            at::vec::map([inv](Vec<T> x) { return x * Vec<T>(inv); }, o, a, sh.Dv);
          }
          lse[bh * sh.L + i] = mx[r] + std::log(sum[r]);
        } else {  // a fully masked row attends to nothing
          std::fill(o, o + sh.Dv, std::remove_pointer_t<decltype(o)>(0.f));
          lse[bh * sh.L + i] = neg_inf<T>();
        }
      }
    }
  });
}

// delta_i = sum_d dO[i, d] * O[i, d], the softmax backward's row term.
template <typename O, typename T>
void row_dots(const Rows<O>& dout, const Rows<O>& out, const AttnShape& sh, T* delta) {
  at::parallel_for(0, sh.B * sh.H * sh.L, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> xs(std::is_same_v<O, T> ? 0 : sh.Dv), ys(xs.size());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / sh.L, i = t % sh.L, b = bh / sh.H, h = bh % sh.H;
      const T* x;
      const T* y;
      if constexpr (std::is_same_v<O, T>) {
        x = dout.at(b, h, i);
        y = out.at(b, h, i);
      } else {
        at::vec::convert(dout.at(b, h, i), xs.data(), sh.Dv);
        at::vec::convert(out.at(b, h, i), ys.data(), sh.Dv);
        x = xs.data();
        y = ys.data();
      }
      Vec<T> acc(T(0));
      int64_t d = 0;
      for (; d + Vec<T>::size() <= sh.Dv; d += Vec<T>::size()) acc = at::vec::fmadd(Vec<T>::loadu(x + d), Vec<T>::loadu(y + d), acc);
      T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& c) { return a + c; }, acc);
      for (; d < sh.Dv; ++d) s += x[d] * y[d];
      delta[t] = s;
    }
  });
}

// Parallel over (batch*head, slice of key blocks). Each task owns its key blocks' dK and dV; dQ
// gets contributions from every key block, so when one batch*head is split across tasks each slice
// accumulates its own dQ copy and the copies are summed at the end (O(threads * L * D) memory).
template <typename O, typename T>
void backward_kernel(const Rows<O>& dout, const Rows<O>& q, const Rows<O>& k, const Rows<O>& v, const T* lse,
                     const T* delta, const Masking<T>& mk, T scale, const AttnShape& sh, T* gq, T* gk, T* gv) {
  const int64_t qB = backward_query_block(sh.L), kB = backward_key_block(sh.S);
  const int64_t BH = sh.B * sh.H, nk = (sh.S + kB - 1) / kB;
  const int64_t threads = at::get_num_threads();
  const int64_t slices = BH >= threads ? 1 : std::max<int64_t>(std::min<int64_t>(nk, (threads + BH - 1) / BH), 1);
  std::vector<T> dq_slices(slices > 1 ? static_cast<size_t>(slices * BH * sh.L * sh.D) : 0, T(0));
  // bf16 on brgemm: the two products with the head dim inside (S = Q K^T, dP = dO V^T) read K^T and
  // V^T packed once per key block (MKL's bf16 GEMM would repack them for every query block); their
  // outputs fill whole 16-column groups and leave S unscaled (the row pass applies the scale).
  const bool packed = use_packed_products<O>(sh, /*dv_inner=*/true);
  const int64_t pld = packed ? round_up(kB, 16) : kB;  // row stride of the score blocks
  const ScoreScale<T> ss(packed, mk, scale);
  const T xs = ss.xs;
  at::parallel_for(0, BH * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(qB * pld), dp(qB * pld), z(mk.dropout ? qB * pld : 0), pd(mk.dropout ? qB * pld : 0);
    std::vector<T> dk(kB * sh.D), dv(kB * sh.Dv);
    std::vector<O> p_op, ds_op;  // bf16 operands only
    std::vector<c10::BFloat16> kt_pack, vt_pack, scratch;
    const BrgemmScope brgemm_scope(packed);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / slices, slice = task % slices, b = bh / sh.H, h = bh % sh.H;
      T* dq = slices == 1 ? gq + bh * sh.L * sh.D : dq_slices.data() + (slice * BH + bh) * sh.L * sh.D;
      for (int64_t kb = nk * slice / slices; kb < nk * (slice + 1) / slices; ++kb) {
        const int64_t j0 = kb * kB, n = std::min(kB, sh.S - j0);
        const int64_t ld = packed ? round_up(n, 16) : n;  // of this block's scores
        const PackedShape kts(sh.D, n), vts(sh.Dv, n);
        if (packed) {
          pack_operand(k.at(b, h, j0), k.ld, sh.D, n, /*transposed=*/true, kts, kt_pack, scratch);
          pack_operand(v.at(b, h, j0), v.ld, sh.Dv, n, /*transposed=*/true, vts, vt_pack, scratch);
        }
        std::fill(dk.begin(), dk.begin() + n * sh.D, T(0));
        std::fill(dv.begin(), dv.begin() + n * sh.Dv, T(0));
        const int64_t i_first = mk.causal ? (j0 / qB) * qB : 0;  // earlier queries see none of these keys
        for (int64_t i0 = i_first; i0 < sh.L; i0 += qB) {
          const int64_t m = std::min(qB, sh.L - i0);
          const O* dO = dout.at(b, h, i0);
          if (packed) {
            packed_product(m, sh.D, q.at(b, h, i0), q.ld, kt_pack.data(), kts, 0, n, p.data(), ld, false);
            packed_product(m, sh.Dv, dO, dout.ld, vt_pack.data(), vts, 0, n, dp.data(), ld, false);
            brgemm_release_tiles();  // the BLAS products below use AMX too
          } else {
            gemm_op<O, T>(false, true, m, n, sh.D, scale, q.at(b, h, i0), q.ld, k.at(b, h, j0), k.ld, T(0), p.data(),
                          ld);
            gemm_op<O, T>(false, true, m, n, sh.Dv, T(1), dO, dout.ld, v.at(b, h, j0), v.ld, T(0), dp.data(), ld);
          }
          // One pass per row while it is hot: P = exp(S - lse), dS = P * (dP * z - delta) into dp,
          // and with dropout the kept probabilities P * z (what multiplied V) into pd.
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r;
            T* prow = p.data() + r * ld;
            T* dsrow = dp.data() + r * ld;
            T* pdrow = mk.dropout ? pd.data() + r * ld : nullptr;
            const T l = lse[bh * sh.L + i];
            if (l == neg_inf<T>()) {
              std::fill(prow, prow + n, T(0));
              std::fill(dsrow, dsrow + n, T(0));
              if (mk.dropout) std::fill(pdrow, pdrow + n, T(0));
              continue;
            }
            mk.apply(prow, b, h, i, j0, n, ss.pre);
            const Vec<T> vl(l), dl(delta[bh * sh.L + i]), vs(xs);
            if (!mk.dropout) {
              int64_t j = 0;
              for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
                const Vec<T> e = (Vec<T>::loadu(prow + j) * vs - vl).exp_u20();
                e.store(prow + j);
                (e * (Vec<T>::loadu(dsrow + j) - dl)).store(dsrow + j);
              }
              for (; j < n; ++j) {
                prow[j] = std::exp(prow[j] * xs - l);
                dsrow[j] = prow[j] * (dsrow[j] - delta[bh * sh.L + i]);
              }
            } else {
              T* zrow = z.data() + r * ld;
              mk.factors(zrow, bh, i, j0, n);
              exp_shifted(prow, n, xs, l);
              at::vec::map2([](Vec<T> a, Vec<T> f) { return a * f; }, pdrow, prow, zrow, n);
              at::vec::map3([dl](Vec<T> pp, Vec<T> g, Vec<T> f) { return pp * (g * f - dl); }, dsrow, prow, dsrow,
                            zrow, n);
            }
          }
          // (with packed products the blocks are ld wide; the columns past n hold zeros or finite
          // scores of zero keys and are not read: the products below take n columns)
          gemm_op<O, T>(true, false, n, sh.Dv, m, T(1), as_operand<O>(mk.dropout ? pd.data() : p.data(), m * ld, p_op),
                        ld, dO, dout.ld, T(1), dv.data(), sh.Dv);
          const O* ds = as_operand<O>(dp.data(), m * ld, ds_op);
          gemm_op<O, T>(false, false, m, sh.D, n, scale, ds, ld, k.at(b, h, j0), k.ld, T(1), dq + i0 * sh.D, sh.D);
          gemm_op<O, T>(true, false, n, sh.D, m, scale, ds, ld, q.at(b, h, i0), q.ld, T(1), dk.data(), sh.D);
        }
        std::copy(dk.begin(), dk.begin() + n * sh.D, gk + (bh * sh.S + j0) * sh.D);
        std::copy(dv.begin(), dv.begin() + n * sh.Dv, gv + (bh * sh.S + j0) * sh.Dv);
      }
    }
  });
  if (slices > 1) {
    const int64_t total = BH * sh.L * sh.D;
    at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t s = 0; s < slices; ++s) {
        const T* src = dq_slices.data() + s * total;
        for (int64_t e = begin; e < end; ++e) gq[e] += src[e];
      }
    });
  }
}

// The operand type O (see gemm_op) the kernels take this input dtype in.
at::ScalarType operand_dtype(at::ScalarType dtype) {
  if (dtype == at::kDouble) return at::kDouble;
  return dtype == at::kBFloat16 && bf16_gemm_available() ? at::kBFloat16 : at::kFloat;
}

template <typename O, typename T>
void run_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& mask,
                 bool is_causal, double scale, double dropout_p, uint64_t seed, const AttnShape& sh, at::Tensor& out,
                 at::Tensor& lse) {
  const auto od = c10::CppTypeToScalarType<O>::value;
  const at::Tensor q = attention_operand(query, od), k = attention_operand(key, od), v = attention_operand(value, od);
  using R = std::conditional_t<std::is_same_v<O, T>, T, O>;
  forward_kernel<O, T>(rows_of<O>(q), rows_of<O>(k), rows_of<O>(v), make_masking<T>(mask, is_causal, dropout_p, seed),
                       static_cast<T>(scale), sh, out.mutable_data_ptr<R>(), lse.mutable_data_ptr<T>());
}

template <typename O, typename T>
void run_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& out, const at::Tensor& lse, const at::Tensor& mask, bool is_causal, double scale,
                  double dropout_p, uint64_t seed, const AttnShape& sh, at::Tensor& gq, at::Tensor& gk,
                  at::Tensor& gv) {
  const auto od = c10::CppTypeToScalarType<O>::value;
  const at::Tensor q = attention_operand(query, od), k = attention_operand(key, od), v = attention_operand(value, od);
  const at::Tensor dout = attention_operand(grad_out, od), o = attention_operand(out, od);
  at::Tensor delta = at::empty({sh.B, sh.H, sh.L}, lse.options());
  row_dots<O, T>(rows_of<O>(dout), rows_of<O>(o), sh, delta.mutable_data_ptr<T>());
  backward_kernel<O, T>(rows_of<O>(dout), rows_of<O>(q), rows_of<O>(k), rows_of<O>(v), lse.const_data_ptr<T>(),
                        delta.const_data_ptr<T>(), make_masking<T>(mask, is_causal, dropout_p, seed),
                        static_cast<T>(scale), sh, gq.mutable_data_ptr<T>(), gk.mutable_data_ptr<T>(),
                        gv.mutable_data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor> flash_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                                       const at::Tensor& value,
                                                       const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                       double scale, double dropout_p,
                                                       const std::optional<at::Tensor>& rng_seed) {
  const AttnShape sh =
      check_attention_args("torchfast.flash_attention", query, key, value, attn_mask, scale, dropout_p, rng_seed);
  const auto ct = attention_compute_type(query);
  const at::Tensor mask = attention_mask_operand(attn_mask, sh, ct);
  const auto opts = query.options().dtype(ct);
  const at::ScalarType od = operand_dtype(query.scalar_type());
  // bf16 operands write the bf16 output directly; other narrow inputs are computed in ct and cast
  at::Tensor out = at::empty({sh.B, sh.H, sh.L, sh.Dv}, od == at::kBFloat16 ? query.options() : opts);
  at::Tensor lse = at::empty({sh.B, sh.H, sh.L}, opts);
  const uint64_t seed = attention_seed(dropout_p, rng_seed);
  if (out.numel() > 0 || lse.numel() > 0) {
    switch (od) {
      case at::kDouble:
        run_forward<double, double>(query, key, value, mask, is_causal, scale, dropout_p, seed, sh, out, lse);
        break;
      case at::kBFloat16:
        run_forward<at::BFloat16, float>(query, key, value, mask, is_causal, scale, dropout_p, seed, sh, out, lse);
        break;
      default:
        run_forward<float, float>(query, key, value, mask, is_causal, scale, dropout_p, seed, sh, out, lse);
    }
  }
  return {out.scalar_type() == query.scalar_type() ? out : out.to(query.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask, bool is_causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_seed) {
  const AttnShape sh = check_attention_backward_args(grad_out, query, key, value, out, logsumexp, attn_mask, scale,
                                                    dropout_p, rng_seed);
  const auto ct = attention_compute_type(query);
  const at::Tensor lse = logsumexp.to(ct).contiguous();
  const at::Tensor mask = attention_mask_operand(attn_mask, sh, ct);
  const auto opts = query.options().dtype(ct);
  at::Tensor gq = at::zeros({sh.B, sh.H, sh.L, sh.D}, opts);
  at::Tensor gk = at::empty({sh.B, sh.H, sh.S, sh.D}, opts);
  at::Tensor gv = at::empty({sh.B, sh.H, sh.S, sh.Dv}, opts);
  const uint64_t seed = attention_seed(dropout_p, rng_seed);
  if (sh.B * sh.H > 0 && sh.S > 0) {
    if (sh.L == 0) {
      gk.zero_();
      gv.zero_();
    } else {
      switch (operand_dtype(query.scalar_type())) {
        case at::kDouble:
          run_backward<double, double>(grad_out, query, key, value, out, lse, mask, is_causal, scale, dropout_p, seed,
                                       sh, gq, gk, gv);
          break;
        case at::kBFloat16:
          run_backward<at::BFloat16, float>(grad_out, query, key, value, out, lse, mask, is_causal, scale, dropout_p,
                                            seed, sh, gq, gk, gv);
          break;
        default:
          run_backward<float, float>(grad_out, query, key, value, out, lse, mask, is_causal, scale, dropout_p, seed,
                                     sh, gq, gk, gv);
      }
    }
  }
  const auto dt = query.scalar_type();
  if (dt != ct) return {gq.to(dt), gk.to(dt), gv.to(dt)};
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("flash_attention", &flash_attention_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace torchfast
