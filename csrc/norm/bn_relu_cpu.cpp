// CPU kernels of torchfast::bn_add_relu and torchfast::bn_add_relu_backward.
//
// Two layouts, both read as flat memory: planar (N, C, S) for contiguous inputs, parallel over
// channels with Vectorized reductions along S; packed (M, C) rows for channels_last (and 2-D)
// inputs, parallel over rows with per-thread per-channel accumulators. Anything else is made
// contiguous first. Statistics accumulate in fp32 vectors and combine in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#include "common/vec_map.h"  // first: see common/host_device.h
//
#include "common/multi_tensor_cpu.h"
#include "norm/bn_relu_checks.h"
#include "norm/bn_relu_layout.h"
#include "norm/bn_relu_math.h"

namespace torchfast {
namespace {

// Sums K per-element contributions over one channel's runs of NS streams (planar layout: one run
// of S elements per sample): f(x, acc) adds to acc (an array of K accumulators of x's type,
// Vectorized or scalar). The vector accumulators carry across runs and are added into doubles
// every kFlush elements: short runs (small images) do not pay a horizontal sum each.
template <typename scalar_t, size_t NS, uint32_t kLoad, size_t K>
class ChannelReducer {
 public:
  template <typename F>
  void add(const std::array<const scalar_t*, NS>& ptrs, int64_t n, const F& f) {
    std::array<scalar_t*, NS> mut;
    for (size_t k = 0; k < NS; ++k) mut[k] = const_cast<scalar_t*>(ptrs[k]);
    map_streams<scalar_t, NS, kLoad, 0u>(mut, n, [&](auto& x) {
      using V = std::decay_t<decltype(x[0])>;
      if constexpr (std::is_same_v<V, acc_t>) {
        f(x, sacc_);
      } else {
        f(x, vacc_);
      }
    });
    pending_ += n;
    if (pending_ >= kFlush) flush();
  }

  std::array<double, K> totals() {
    flush();
    return total_;
  }

 private:
  using acc_t = acc_type_t<scalar_t>;
  using aVec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kFlush = 16384;  // elements per fp32 partial: ~1K per vector lane

  void flush() {
    for (size_t k = 0; k < K; ++k) {
      alignas(64) acc_t lanes[aVec::size()];
      vacc_[k].store(lanes);
      double t = sacc_[k];
      for (int64_t l = 0; l < aVec::size(); ++l) t += lanes[l];
      total_[k] += t;
      vacc_[k] = aVec(acc_t(0));
      sacc_[k] = acc_t(0);
    }
    pending_ = 0;
  }

  std::array<aVec, K> vacc_ = filled<aVec>();
  std::array<acc_t, K> sacc_ = filled<acc_t>();
  std::array<double, K> total_ = filled<double>();
  int64_t pending_ = 0;

  template <typename T>
  static std::array<T, K> filled() {
    std::array<T, K> a;
    a.fill(T(0));
    return a;
  }
};

// Per-channel sums over the packed (M, C) layout: g(row_pointers..., acc) adds row contributions to
// K per-channel accumulator rows. Rows are summed in fp32 blocks of 256, then in double.
template <typename scalar_t, size_t K, typename G>
std::vector<double> packed_channel_sums(int64_t M, int64_t C, const G& g) {
  using acc_t = acc_type_t<scalar_t>;
  const int nthreads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nthreads) * K * C, 0.0);
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * K * C;
    std::vector<acc_t> block(K * C);
    for (int64_t b = begin; b < end; b += 256) {
      std::fill(block.begin(), block.end(), acc_t(0));
      const int64_t e = std::min(end, b + 256);
      for (int64_t row = b; row < e; ++row) g(row, block.data());
      for (int64_t i = 0; i < K * C; ++i) mine[i] += block[i];
    }
  });
  std::vector<double> total(K * C, 0.0);
  for (int t = 0; t < nthreads; ++t)
    for (int64_t i = 0; i < K * C; ++i) total[i] += partial[static_cast<size_t>(t) * K * C + i];
  return total;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

// Packed (M, C) rows: in fp32/fp64 the per-channel arrays share the element type, so a row's
// channels go through map_streams (vectorised along C) with those arrays as extra streams; in
// fp16/bf16 the callers keep a scalar loop over the channels.
template <typename scalar_t>
constexpr bool kVectorRows = std::is_same_v<scalar_t, acc_type_t<scalar_t>>;

// map_streams takes mutable pointers; the read-only streams are only loaded.
template <typename T>
T* as_mut(const T* p) {
  return const_cast<T*>(p);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor* residual, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                  const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu,
                  const BnShape& sh, at::Tensor& out, at::Tensor& mean_t, at::Tensor& invstd_t, at::Tensor& var_t) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = sh.C, M = sh.M;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* mean = mean_t.mutable_data_ptr<acc_t>();
  acc_t* invstd = invstd_t.mutable_data_ptr<acc_t>();
  acc_t* var = var_t.mutable_data_ptr<acc_t>();
  const acc_t* w = ptr_or_null<acc_t>(weight);
  const acc_t* b = ptr_or_null<acc_t>(bias);

  // 1. statistics
  if (!training) {
    const acc_t* rm = running_mean->const_data_ptr<acc_t>();
    const acc_t* rv = running_var->const_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = rm[c];
      var[c] = rv[c];
      invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
    }
  } else if (sh.planar) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        ChannelReducer<scalar_t, 1, 0b1u, 1> sums;
        for (int64_t n = 0; n < sh.N; ++n)
          sums.add({xp + (n * C + c) * sh.S}, sh.S, [](auto& v, auto& acc) { acc[0] = acc[0] + v[0]; });
        const double mu = M > 0 ? sums.totals()[0] / M : 0.0;
        ChannelReducer<scalar_t, 1, 0b1u, 1> squares;
        for (int64_t n = 0; n < sh.N; ++n)
          squares.add({xp + (n * C + c) * sh.S}, sh.S, [mu](auto& v, auto& acc) {
            using V = std::decay_t<decltype(v[0])>;
            const V d = v[0] - V(static_cast<acc_t>(mu));
            acc[0] = acc[0] + d * d;
          });
        const double ss = squares.totals()[0];
        mean[c] = static_cast<acc_t>(mu);
        var[c] = static_cast<acc_t>(M > 0 ? ss / M : 0.0);
        invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(ss / M + eps));
      }
    });
  } else {
    const auto sums = packed_channel_sums<scalar_t, 1>(M, C, [&](int64_t row, acc_t* acc) {
      const scalar_t* r = xp + row * C;
      if constexpr (kVectorRows<scalar_t>) {
        map_streams<scalar_t, 2, 0b11u, 0b10u>({as_mut(r), acc}, C, [](auto& v) { v[1] = v[1] + v[0]; });
      } else {
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(r[c]);
      }
    });
    std::vector<acc_t> mu(C);
    for (int64_t c = 0; c < C; ++c) mu[c] = static_cast<acc_t>(sums[c] / M);
    const auto sq = packed_channel_sums<scalar_t, 1>(M, C, [&](int64_t row, acc_t* acc) {
      const scalar_t* r = xp + row * C;
      if constexpr (kVectorRows<scalar_t>) {
        map_streams<scalar_t, 3, 0b111u, 0b100u>({as_mut(r), mu.data(), acc}, C, [](auto& v) {
          const auto d = v[0] - v[1];
          v[2] = v[2] + d * d;
        });
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(r[c]) - mu[c];
          acc[c] += d * d;
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = mu[c];
      var[c] = static_cast<acc_t>(sq[c] / M);
      invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(sq[c] / M + eps));
    }
  }

  // 2. out = relu?(x * scale + shift + residual)
  std::vector<acc_t> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = (w ? w[c] : acc_t(1)) * invstd[c];
    shift[c] = (b ? b[c] : acc_t(0)) - mean[c] * scale[c];
  }
  with_flag(rp != nullptr, [&](auto has_res) {
    constexpr bool kRes = decltype(has_res)::value;
    if (sh.planar) {
      at::parallel_for(0, sh.N * C, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % C, off = p * sh.S;
          const acc_t k = scale[c], t = shift[c];
          const std::array<scalar_t*, 3> ptrs = {const_cast<scalar_t*>(xp) + off,
                                                 kRes ? const_cast<scalar_t*>(rp) + off : nullptr, op + off};
          map_streams<scalar_t, 3, kRes ? 0b011u : 0b001u, 0b100u>(ptrs, sh.S, [k, t, relu](auto& v) {
            using V = std::decay_t<decltype(v[0])>;
            v[2] = bn_add_relu_forward(v[0], v[1], V(k), V(t), relu);
          });
        }
      });
    } else {
      at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const scalar_t* xr = xp + row * C;
          const scalar_t* rr = kRes ? rp + row * C : nullptr;
          scalar_t* orow = op + row * C;
          if constexpr (kVectorRows<scalar_t>) {
            // streams: 0 x, 1 residual, 2 out, 3 scale, 4 shift
            map_streams<scalar_t, 5, kRes ? 0b11011u : 0b11001u, 0b00100u>(
                {as_mut(xr), as_mut(rr), orow, scale.data(), shift.data()}, C, [relu](auto& v) {
                  v[2] = bn_add_relu_forward(v[0], v[1], v[3], v[4], relu);
                });
            continue;
          }
          for (int64_t c = 0; c < C; ++c) {
            const acc_t res = kRes ? static_cast<acc_t>(rr[c]) : acc_t(0);
            orow[c] = static_cast<scalar_t>(bn_add_relu_forward(static_cast<acc_t>(xr[c]), res, scale[c], shift[c],
                                                                relu));
          }
        }
      });
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& out,
                   const std::optional<at::Tensor>& weight, const at::Tensor& mean_t, const at::Tensor& invstd_t,
                   bool training, bool relu, const BnShape& sh, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb,
                   scalar_t* gres) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = sh.C, M = sh.M;
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* outp = out.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const acc_t* invstd = invstd_t.const_data_ptr<acc_t>();
  const acc_t* w = ptr_or_null<acc_t>(weight);
  acc_t* sum_dy = gb.mutable_data_ptr<acc_t>();        // grad_bias = sum(dy)
  acc_t* sum_dy_xhat = gw.mutable_data_ptr<acc_t>();   // grad_weight = sum(dy * xhat)

  // 1. per-channel sums of dy (= grad_out masked by the ReLU) and dy * (x - mean)
  if (sh.planar) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t mu = mean[c];
        ChannelReducer<scalar_t, 3, 0b111u, 2> sums;
        for (int64_t n = 0; n < sh.N; ++n) {
          const int64_t off = (n * C + c) * sh.S;
          sums.add({gp + off, outp + off, xp + off}, sh.S, [mu, relu](auto& v, auto& acc) {
            using V = std::decay_t<decltype(v[0])>;
            const V dy = relu_backward(v[0], v[1], relu);
            acc[0] = acc[0] + dy;
            acc[1] = acc[1] + dy * (v[2] - V(mu));
          });
        }
        const auto t = sums.totals();
        sum_dy[c] = static_cast<acc_t>(t[0]);
        sum_dy_xhat[c] = static_cast<acc_t>(t[1] * invstd[c]);
      }
    });
  } else {
    const auto sums = packed_channel_sums<scalar_t, 2>(M, C, [&](int64_t row, acc_t* acc) {
      const scalar_t *gr = gp + row * C, *orow = outp + row * C, *xr = xp + row * C;
      if constexpr (kVectorRows<scalar_t>) {
        // streams: 0 grad_out, 1 out, 2 x, 3 mean, 4 sum dy, 5 sum dy * (x - mean)
        map_streams<scalar_t, 6, 0b111111u, 0b110000u>(
            {as_mut(gr), as_mut(orow), as_mut(xr), as_mut(mean), acc, acc + C}, C, [relu](auto& v) {
              const auto dy = relu_backward(v[0], v[1], relu);
              v[4] = v[4] + dy;
              v[5] = v[5] + dy * (v[2] - v[3]);
            });
        return;
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t dy = relu_backward(static_cast<acc_t>(gr[c]), static_cast<acc_t>(orow[c]), relu);
        acc[c] += dy;
        acc[C + c] += dy * (static_cast<acc_t>(xr[c]) - mean[c]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] = static_cast<acc_t>(sums[c]);
      sum_dy_xhat[c] = static_cast<acc_t>(sums[C + c] * invstd[c]);
    }
  }

  // 2. grad_input (and grad_residual = dy)
  std::vector<acc_t> k(C), mdy(C), mdyx(C);
  for (int64_t c = 0; c < C; ++c) {
    k[c] = (w ? w[c] : acc_t(1)) * invstd[c];
    mdy[c] = M > 0 ? static_cast<acc_t>(static_cast<double>(sum_dy[c]) / M) : acc_t(0);
    mdyx[c] = M > 0 ? static_cast<acc_t>(static_cast<double>(sum_dy_xhat[c]) / M) : acc_t(0);
  }
  with_flag(gres != nullptr, [&](auto has_res) {
    constexpr bool kRes = decltype(has_res)::value;
    if (sh.planar) {
      at::parallel_for(0, sh.N * C, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % C, off = p * sh.S;
          const acc_t kc = k[c], mu = mean[c], is = invstd[c], a = mdy[c], bb = mdyx[c];
          // streams: 0 grad_out, 1 out, 2 x, 3 grad_input, 4 grad_residual
          const std::array<scalar_t*, 5> ptrs = {const_cast<scalar_t*>(gp) + off, const_cast<scalar_t*>(outp) + off,
                                                 const_cast<scalar_t*>(xp) + off, gxp + off,
                                                 kRes ? gres + off : nullptr};
          map_streams<scalar_t, 5, 0b00111u, kRes ? 0b11000u : 0b01000u>(
              ptrs, sh.S, [kc, mu, is, a, bb, relu, training](auto& v) {
                using V = std::decay_t<decltype(v[0])>;
                const V dy = relu_backward(v[0], v[1], relu);
                v[3] = bn_input_grad(dy, v[2], V(mu), V(is), V(kc), V(a), V(bb), training);
                v[4] = dy;
              });
        }
      });
    } else {
      at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t off = row * C;
          if constexpr (kVectorRows<scalar_t>) {
            // streams: 0 grad_out, 1 out, 2 x, 3 grad_input, 4 grad_residual, 5 mean, 6 invstd, 7 k,
            // 8 mean dy, 9 mean dy * xhat
            map_streams<scalar_t, 10, 0b1111100111u, kRes ? 0b11000u : 0b01000u>(
                {as_mut(gp + off), as_mut(outp + off), as_mut(xp + off), gxp + off, kRes ? gres + off : nullptr,
                 as_mut(mean), as_mut(invstd), k.data(), mdy.data(), mdyx.data()},
                C, [relu, training](auto& v) {
                  const auto dy = relu_backward(v[0], v[1], relu);
                  v[3] = bn_input_grad(dy, v[2], v[5], v[6], v[7], v[8], v[9], training);
                  v[4] = dy;
                });
            continue;
          }
          for (int64_t c = 0; c < C; ++c) {
            const acc_t dy = relu_backward(static_cast<acc_t>(gp[off + c]), static_cast<acc_t>(outp[off + c]), relu);
            gxp[off + c] = static_cast<scalar_t>(
                bn_input_grad(dy, static_cast<acc_t>(xp[off + c]), mean[c], invstd[c], k[c], mdy[c], mdyx[c], training));
            if (kRes) gres[off + c] = static_cast<scalar_t>(dy);
          }
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu) {
  check_bn_args("torchfast.bn_add_relu", input, weight, bias, residual, running_mean, running_var, training);
  BnForward f = prepare_bn_forward(input, weight, bias, residual, running_mean, running_var);
  if (training && f.sh.M == 0) {
    set_empty_batch_stats(f, eps);
    return {f.out, f.mean, f.invstd, f.var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "bn_add_relu_cpu", [&] {
    forward_impl<scalar_t>(f.x, f.residual.defined() ? &f.residual : nullptr, f.weight, f.bias, f.running_mean,
                           f.running_var, training, eps, relu, f.sh, f.out, f.mean, f.invstd, f.var);
  });
  return {f.out, f.mean, f.invstd, f.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, bool relu, bool has_residual) {
  check_bn_backward_args("torchfast.bn_add_relu_backward", grad_out, input, out, save_mean, save_invstd);
  BnBackward b = prepare_bn_backward(grad_out, input, out, weight, save_mean, save_invstd, has_residual);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "bn_add_relu_backward_cpu", [&] {
    backward_impl<scalar_t>(b.grad_out, b.x, b.out, b.weight, b.mean, b.invstd, training, relu, b.sh, b.grad_input,
                            b.grad_weight, b.grad_bias,
                            has_residual ? b.grad_residual.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {b.grad_input, b.grad_weight, b.grad_bias, b.grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("bn_add_relu", &bn_add_relu_cpu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cpu);
}

}  // namespace torchfast
