// CPU kernels of torchfast::relu_max_pool2d and torchfast::relu_max_pool2d_backward.
//
// channels_last (NHWC): parallel over output pixels (forward) or input pixels (backward), the
// channels of a pixel contiguous: the forward keeps each window's running maximum and its position
// in Vectorized registers (fp32/fp64), the backward gathers, for each input pixel, the gradients of
// the windows that picked it. NCHW: parallel over rows of the planes; fp32/fp64 forwards vectorised
// over output columns (see forward_planar_vectorized), the backward a scatter per plane in cache.
// The channels_last backward writes every input gradient once (no zero fill followed by a scatter,
// as torch's max-pool backward does).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/vec_map.h"  // first: see common/host_device.h
//
#include "pool/max_pool_checks.h"
#include "pool/max_pool_math.h"

namespace torchfast {
namespace {

// Elements of work per parallel chunk (ATen's own grain for element-wise loops).
constexpr int64_t kGrainElements = 32768;

struct Window {
  int64_t h0, w0, hs, he, ws, we;  // window origin (padded coordinates) and its in-bounds rows/cols
};

inline Window window_of(const PoolGeometry& g, int64_t oh, int64_t ow) {
  Window w;
  w.h0 = oh * g.sh - g.ph;
  w.w0 = ow * g.sw - g.pw;
  w.hs = std::max<int64_t>(w.h0, 0);
  w.he = std::min<int64_t>(w.h0 + g.kh, g.H);
  w.ws = std::max<int64_t>(w.w0, 0);
  w.we = std::min<int64_t>(w.w0 + g.kw, g.W);
  return w;
}

inline uint8_t offset_in(const PoolGeometry& g, const Window& w, int64_t ih, int64_t iw) {
  return static_cast<uint8_t>((ih - w.h0) * g.kw + (iw - w.w0));
}

// One window over channels [c0, c1) of an NHWC pixel, one channel at a time (the vector loop's
// tail, and the reduced-precision types).
template <typename scalar_t>
void pool_channels_scalar(const scalar_t* x, scalar_t* out, uint8_t* argmax, const PoolGeometry& g, const Window& w,
                          int64_t n, int64_t c0, int64_t c1, bool relu) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t c = c0; c < c1; ++c) {
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    uint8_t where = offset_in(g, w, w.hs, w.ws);
    for (int64_t ih = w.hs; ih < w.he; ++ih)
      for (int64_t iw = w.ws; iw < w.we; ++iw) {
        const acc_t v = static_cast<acc_t>(x[((n * g.H + ih) * g.W + iw) * g.C + c]);
        if (pool_takes(v, best)) {
          best = v;
          where = offset_in(g, w, ih, iw);
        }
      }
    out[c] = static_cast<scalar_t>(pool_relu(best, relu));
    argmax[c] = where;
  }
}

template <typename scalar_t>
void forward_channels_last(const scalar_t* x, scalar_t* out, uint8_t* argmax, const PoolGeometry& g, bool relu) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  const int64_t pixels = g.N * g.OH * g.OW;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(g.C * g.kh * g.kw, 1));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (g.OH * g.OW), r = pix % (g.OH * g.OW);
      const Window w = window_of(g, r / g.OW, r % g.OW);
      scalar_t* o = out + pix * g.C;
      uint8_t* a = argmax + pix * g.C;
      int64_t c = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        for (; c + L <= g.C; c += L) {
          Vec best(-std::numeric_limits<acc_t>::infinity());
          Vec where(static_cast<acc_t>(offset_in(g, w, w.hs, w.ws)));
          for (int64_t ih = w.hs; ih < w.he; ++ih)
            for (int64_t iw = w.ws; iw < w.we; ++iw) {
              const Vec v = Vec::loadu(x + ((n * g.H + ih) * g.W + iw) * g.C + c);
              const Vec take = (v > best) | v.isnan();
              best = Vec::blendv(best, v, take);
              where = Vec::blendv(where, Vec(static_cast<acc_t>(offset_in(g, w, ih, iw))), take);
            }
          if (relu) best = Vec::blendv(best, Vec(acc_t(0)), best < Vec(acc_t(0)));
          best.store(o + c);
          // positions as integers in one vector conversion, then narrowed to bytes (a float -> byte
          // conversion per element costs more than the window's loads)
          const auto ints = at::vec::convert_to_int_of_same_size(where);
          typename std::decay_t<decltype(ints)>::value_type pos[L];
          ints.store(pos);
          for (int64_t j = 0; j < L; ++j) a[c + j] = static_cast<uint8_t>(pos[j]);
        }
      }
      pool_channels_scalar(x, o, a, g, w, n, c, g.C, relu);
    }
  });
}

// NCHW, any dtype, one window at a time (the reduced-precision types; and strides the vectorised
// path below does not take).
template <typename scalar_t>
void forward_planar_scalar(const scalar_t* x, scalar_t* out, uint8_t* argmax, const PoolGeometry& g, bool relu) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t rows = g.N * g.C * g.OH;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(g.OW * g.kh * g.kw, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / g.OH, oh = row % g.OH;
      const scalar_t* xp = x + plane * g.H * g.W;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const Window w = window_of(g, oh, ow);
        acc_t best = -std::numeric_limits<acc_t>::infinity();
        uint8_t where = offset_in(g, w, w.hs, w.ws);
        for (int64_t ih = w.hs; ih < w.he; ++ih)
          for (int64_t iw = w.ws; iw < w.we; ++iw) {
            const acc_t v = static_cast<acc_t>(xp[ih * g.W + iw]);
            if (pool_takes(v, best)) {
              best = v;
              where = offset_in(g, w, ih, iw);
            }
          }
        out[row * g.OW + ow] = static_cast<scalar_t>(pool_relu(best, relu));
        argmax[row * g.OW + ow] = where;
      }
    }
  });
}

// NCHW fp32/fp64: L output columns of one output row per vector. The scalar scan's compare is
// data-dependent, so it mispredicts on about every other element (torch's NCHW kernel does the same:
// measured 5.2 ms for ResNet's stem pool at batch 16, 32x32, 64 channels). Here each input row a
// window reaches is copied once into a per-thread buffer split by column phase (column p of the
// padded row at phase p % sw, index p / sw) with -inf in the padding, so window column kx of L
// adjacent output columns is one contiguous load, edge columns included (-inf is never taken, as
// torch never visits the padding). The window is scanned in torch's row-major order with the same
// rule, so the same element is picked (ties, NaN). Consecutive output rows of a plane share the
// buffered rows they overlap in (slot ih % kh).
template <typename scalar_t>
void forward_planar_vectorized(const scalar_t* x, scalar_t* out, uint8_t* argmax, const PoolGeometry& g, bool relu) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  const int64_t chunks = (g.OW + L - 1) / L;
  const int64_t span = chunks * L + (g.kw - 1) / g.sw + 1;  // one phase of one buffered row
  // the window's first in-bounds column, per output column: torch's starting argmax
  std::vector<scalar_t> first_col(chunks * L, scalar_t(0));
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const int64_t w0 = ow * g.sw - g.pw;
    first_col[ow] = static_cast<scalar_t>(std::max<int64_t>(w0, 0) - w0);
  }
  const int64_t rows = g.N * g.C * g.OH;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(g.OW * g.kh * g.kw, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buf(static_cast<size_t>(g.kh * g.sw * span), -std::numeric_limits<scalar_t>::infinity());
    std::vector<int64_t> held(g.kh, -1);  // which input row (plane * H + ih) each slot holds
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / g.OH, oh = row % g.OH;
      const int64_t h0 = oh * g.sh - g.ph, hs = std::max<int64_t>(h0, 0), he = std::min<int64_t>(h0 + g.kh, g.H);
      for (int64_t ih = hs; ih < he; ++ih) {
        const int64_t slot = ih % g.kh, id = plane * g.H + ih;
        if (held[slot] == id) continue;
        const scalar_t* src = x + id * g.W;
        scalar_t* dst = buf.data() + slot * g.sw * span;
        int64_t phase = g.pw % g.sw, idx = g.pw / g.sw;
        for (int64_t iw = 0; iw < g.W; ++iw) {
          dst[phase * span + idx] = src[iw];
          if (++phase == g.sw) {
            phase = 0;
            ++idx;
          }
        }
        held[slot] = id;
      }
      for (int64_t c0 = 0; c0 < g.OW; c0 += L) {
        Vec best(-std::numeric_limits<scalar_t>::infinity());
        Vec where = Vec(static_cast<scalar_t>((hs - h0) * g.kw)) + Vec::loadu(first_col.data() + c0);
        for (int64_t ih = hs; ih < he; ++ih) {
          const scalar_t* rowbuf = buf.data() + (ih % g.kh) * g.sw * span + c0;
          for (int kx = 0; kx < g.kw; ++kx) {
            const Vec v = Vec::loadu(rowbuf + (kx % g.sw) * span + kx / g.sw);
            const Vec take = (v > best) | v.isnan();
            best = Vec::blendv(best, v, take);
            where = Vec::blendv(where, Vec(static_cast<scalar_t>((ih - h0) * g.kw + kx)), take);
          }
        }
        if (relu) best = Vec::blendv(best, Vec(scalar_t(0)), best < Vec(scalar_t(0)));
        const int64_t n = std::min<int64_t>(L, g.OW - c0);
        best.store(out + row * g.OW + c0, static_cast<int>(n));
        const auto ints = at::vec::convert_to_int_of_same_size(where);
        typename std::decay_t<decltype(ints)>::value_type pos[L];
        ints.store(pos);
        uint8_t* a = argmax + row * g.OW + c0;
        for (int64_t j = 0; j < n; ++j) a[j] = static_cast<uint8_t>(pos[j]);
      }
    }
  });
}

template <typename scalar_t>
void forward_planar(const scalar_t* x, scalar_t* out, uint8_t* argmax, const PoolGeometry& g, bool relu) {
  if constexpr (std::is_same_v<scalar_t, acc_type_t<scalar_t>>) {
    forward_planar_vectorized(x, out, argmax, g, relu);
  } else {
    forward_planar_scalar(x, out, argmax, g, relu);
  }
}

template <typename scalar_t>
void backward_channels_last(const scalar_t* grad_out, const scalar_t* out, const uint8_t* argmax, scalar_t* grad_in,
                            const PoolGeometry& g, bool relu) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t pixels = g.N * g.H * g.W;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(g.C, 1));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(g.C);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (g.H * g.W), r = pix % (g.H * g.W), ih = r / g.W, iw = r % g.W;
      int64_t fh, lh, fw, lw;
      pool_windows_of(ih, g.kh, g.sh, g.ph, g.OH, fh, lh);
      pool_windows_of(iw, g.kw, g.sw, g.pw, g.OW, fw, lw);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t oh = fh; oh <= lh; ++oh)
        for (int64_t ow = fw; ow <= lw; ++ow) {
          const uint8_t off = static_cast<uint8_t>((ih - (oh * g.sh - g.ph)) * g.kw + (iw - (ow * g.sw - g.pw)));
          const int64_t q = ((n * g.OH + oh) * g.OW + ow) * g.C;
          const scalar_t* go = grad_out + q;
          const scalar_t* o = out + q;
          const uint8_t* a = argmax + q;
          for (int64_t c = 0; c < g.C; ++c) {
            const acc_t gv = pool_grad_through_relu(static_cast<acc_t>(go[c]), static_cast<acc_t>(o[c]), relu);
            sum[c] += a[c] == off ? gv : acc_t(0);
          }
        }
      scalar_t* gi = grad_in + pix * g.C;
      for (int64_t c = 0; c < g.C; ++c) gi[c] = static_cast<scalar_t>(sum[c]);
    }
  });
}

// NCHW: one plane at a time (in cache): its input gradient zeroed, then each output hands its
// gradient to the element its argmax names, in torch's order (output rows, then columns), so an
// element several windows picked sums them as torch's backward does. One visit per output (a
// gather per input row, as in the channels_last backward, would visit each output for every row
// of its window). Reduced-precision types sum in a float row of the plane and round once.
template <typename scalar_t>
void backward_planar(const scalar_t* grad_out, const scalar_t* out, const uint8_t* argmax, scalar_t* grad_in,
                     const PoolGeometry& g, bool relu) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // sum straight into grad_in
  int row_in_window[256], col_in_window[256];
  for (int a = 0; a < 256; ++a) {
    row_in_window[a] = a / g.kw;
    col_in_window[a] = a % g.kw;
  }
  const int64_t plane_in = g.H * g.W, plane_out = g.OH * g.OW;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(plane_in + plane_out, 1));
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kDirect ? 0 : plane_in);
    for (int64_t plane = begin; plane < end; ++plane) {
      acc_t* sum = kDirect ? reinterpret_cast<acc_t*>(grad_in + plane * plane_in) : scratch.data();
      std::fill(sum, sum + plane_in, acc_t(0));
      const int64_t q0 = plane * plane_out;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t h0 = oh * g.sh - g.ph;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t q = q0 + oh * g.OW + ow;
          const int64_t ih = h0 + row_in_window[argmax[q]], iw = ow * g.sw - g.pw + col_in_window[argmax[q]];
          if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;  // (not an argmax the forward gives)
          sum[ih * g.W + iw] +=
              pool_grad_through_relu(static_cast<acc_t>(grad_out[q]), static_cast<acc_t>(out[q]), relu);
        }
      }
      if constexpr (!kDirect) {
        scalar_t* gi = grad_in + plane * plane_in;
        for (int64_t i = 0; i < plane_in; ++i) gi[i] = static_cast<scalar_t>(sum[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  constexpr const char* op = "torchfast.relu_max_pool2d";
  check_pool_input(op, input);
  const bool cl = is_channels_last_4d(input);
  const PoolGeometry g = pool_geometry(op, input.sizes(), kernel_size, stride, padding, cl);
  const at::MemoryFormat fmt = pool_memory_format(cl);
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, x.options(), fmt);
  at::Tensor argmax = at::empty({g.N, g.C, g.OH, g.OW}, x.options().dtype(at::kByte), fmt);
  if (out.numel() == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_max_pool2d_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    uint8_t* ap = argmax.mutable_data_ptr<uint8_t>();
    if (cl) {
      forward_channels_last(xp, op_, ap, g, relu);
    } else {
      forward_planar(xp, op_, ap, g, relu);
    }
  });
  return {out, argmax};
}

at::Tensor relu_max_pool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& argmax,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, bool relu, bool channels_last) {
  constexpr const char* op = "torchfast.relu_max_pool2d_backward";
  check_pool_input(op, out);
  const PoolGeometry g = pool_geometry(op, input_size, kernel_size, stride, padding, channels_last);
  check_pool_backward(op, grad_out, out, argmax, g);
  const at::MemoryFormat fmt = pool_memory_format(channels_last);
  const at::Tensor go = grad_out.contiguous(fmt), o = out.contiguous(fmt), a = argmax.contiguous(fmt);
  at::Tensor grad_in = at::empty(input_size, o.options(), fmt);
  if (grad_in.numel() == 0) return grad_in;
  if (o.numel() == 0) return grad_in.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "relu_max_pool2d_backward_cpu", [&] {
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const scalar_t* op_ = o.const_data_ptr<scalar_t>();
    const uint8_t* ap = a.const_data_ptr<uint8_t>();
    scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      backward_channels_last(gp, op_, ap, gi, g, relu);
    } else {
      backward_planar(gp, op_, ap, gi, g, relu);
    }
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("relu_max_pool2d", &relu_max_pool2d_cpu);
  m.impl("relu_max_pool2d_backward", &relu_max_pool2d_backward_cpu);
}

}  // namespace torchfast
