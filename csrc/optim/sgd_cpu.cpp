// CPU kernel of torchfast::fused_sgd_: one parallel region over all (tensor, chunk) pairs,
// Vectorized fp32 math (fp64 for fp64 params).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "common/vec_map.h"  // first: see common/host_device.h
//
#include "common/multi_tensor_cpu.h"
#include "optim/optim_checks.h"
#include "optim/optim_cpu_common.h"
#include "optim/sgd_math.h"

namespace torchfast {
namespace {

constexpr const char* kOp = "torchfast.fused_sgd_";

struct SgdTensorWork {
  at::ScalarType dtype;
  void *param, *grad, *momentum_buffer;
};

// streams: 0 param, 1 grad, 2 momentum_buffer
template <typename scalar_t, bool kMomentum, bool kScaled, bool kClipped>
void sgd_chunk(const SgdTensorWork& w, int64_t begin, int64_t end, const SgdElementConsts<acc_type_t<scalar_t>>& c,
               double scale, double clip) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr uint32_t kLoad = 0b011u | (kMomentum ? 0b100u : 0u);
  constexpr uint32_t kStore = 0b001u | (kMomentum ? 0b100u : 0u) | (kScaled ? 0b010u : 0u);
  auto at_offset = [begin](void* p) { return p ? static_cast<scalar_t*>(p) + begin : nullptr; };
  const std::array<scalar_t*, 3> ptrs = {at_offset(w.param), at_offset(w.grad), at_offset(w.momentum_buffer)};
  const acc_t s = static_cast<acc_t>(scale), k = static_cast<acc_t>(clip);
  const SgdElementConsts<acc_t> consts = c;
  map_streams<scalar_t, 3, kLoad, kStore>(ptrs, end - begin, [consts, s, k](auto& x) {
    using V = std::decay_t<decltype(x[0])>;
    if constexpr (kScaled) x[1] = x[1] / V(s);
    auto grad = x[1];
    if constexpr (kClipped) grad = grad * V(k);
    sgd_update(x[0], grad, x[2], consts);
  });
}

void fused_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& clip_coef) {
  const bool use_momentum = momentum != 0;
  check_sgd_args(kOp, params, grads, momentum_buffers, use_momentum);
  const size_t n = params.size();
  if (n == 0) return;

  double scale;
  bool has_scale;
  if (resolve_amp(kOp, grad_scale, found_inf, scale, has_scale)) return;
  const double lr_value = resolve_lr(kOp, lr, lr_tensor);
  const double clip = resolve_clip(kOp, clip_coef);
  const SgdHyper h{momentum, dampening, weight_decay, nesterov, maximize};

  LayoutStager stager;
  std::vector<SgdTensorWork> work(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    numels[i] = params[i].numel();
    if (numels[i] == 0) continue;
    const at::Tensor& p = stager.reference(params[i]);
    work[i] = {p.scalar_type(), p.data_ptr(), stager.data_like(grads[i], p, has_scale),
               use_momentum ? stager.data_like(momentum_buffers[i], p, true) : nullptr};
  }

  parallel_over_chunks(split_into_chunks(numels), [&](const CpuChunk& c) {
    const SgdTensorWork& w = work[c.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.dtype, "fused_sgd_cpu", [&] {
      const auto consts = sgd_element_consts<acc_type_t<scalar_t>>(h, lr_value, is_first_step);
      with_flag(consts.has_momentum, [&](auto mom) {
        with_flag(has_scale, [&](auto scaled) {
          with_flag(clip != 1.0, [&](auto clipped) {
            sgd_chunk<scalar_t, decltype(mom)::value, decltype(scaled)::value, decltype(clipped)::value>(
                w, c.begin, c.end, consts, scale, clip);
          });
        });
      });
    });
  });
  stager.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) { m.impl("fused_sgd_", &fused_sgd_cpu); }

}  // namespace torchfast
