// CPU kernel of torchfast::fused_adam_ (Adam and AdamW): one parallel region over all
// (tensor, chunk) pairs, Vectorized fp32 math (fp64 for fp64 params).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "common/vec_map.h"  // first: see common/host_device.h
//
#include "common/multi_tensor_cpu.h"
#include "optim/adam_math.h"
#include "optim/optim_checks.h"
#include "optim/optim_cpu_common.h"

namespace torchfast {
namespace {

constexpr const char* kOp = "torchfast.fused_adam_";

struct AdamTensorWork {
  at::ScalarType dtype;
  void *param, *grad, *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
  double step;  // after this step's increment
};

// streams: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq
template <typename scalar_t, bool kAmsgrad, bool kScaled, bool kClipped>
void adam_chunk(const AdamTensorWork& w, int64_t begin, int64_t end, const AdamHyper& h, double lr, double scale,
                double clip) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr uint32_t kLoad = 0b01111u | (kAmsgrad ? 0b10000u : 0u);
  constexpr uint32_t kStore = 0b01101u | (kAmsgrad ? 0b10000u : 0u) | (kScaled ? 0b00010u : 0u);
  auto at_offset = [begin](void* p) { return p ? static_cast<scalar_t*>(p) + begin : nullptr; };
  const std::array<scalar_t*, 5> ptrs = {at_offset(w.param), at_offset(w.grad), at_offset(w.exp_avg),
                                         at_offset(w.exp_avg_sq), at_offset(w.max_exp_avg_sq)};
  const AdamElementConsts<acc_t> c = adam_element_consts<acc_t>(h, lr, w.step);
  const acc_t s = static_cast<acc_t>(scale), k = static_cast<acc_t>(clip);
  map_streams<scalar_t, 5, kLoad, kStore>(ptrs, end - begin, [c, s, k](auto& x) {
    using V = std::decay_t<decltype(x[0])>;
    if constexpr (kScaled) x[1] = x[1] / V(s);  // unscaled grads are written back, as torch's fused Adam does
    auto grad = x[1];
    if constexpr (kClipped) grad = grad * V(k);  // clipping only feeds the update
    adam_update(x[0], grad, x[2], x[3], x[4], c);
  });
}

void fused_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
                    double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef) {
  check_adam_args(kOp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  const size_t n = params.size();
  if (n == 0) return;

  double scale;
  bool has_scale;
  if (resolve_amp(kOp, grad_scale, found_inf, scale, has_scale)) return;  // inf/nan grads: skip the step
  const double lr_value = resolve_lr(kOp, lr, lr_tensor);
  const double clip = resolve_clip(kOp, clip_coef);
  const AdamHyper h{lr_value, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay};

  LayoutStager stager;
  std::vector<AdamTensorWork> work(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {  // validated in full before anything is written
    const double step = increment_step(state_steps[i]);
    numels[i] = params[i].numel();
    if (numels[i] == 0) continue;
    const at::Tensor& p = stager.reference(params[i]);
    AdamTensorWork& w = work[i];
    w.dtype = p.scalar_type();
    w.param = p.data_ptr();
    w.grad = stager.data_like(grads[i], p, /*write_back=*/has_scale);
    w.exp_avg = stager.data_like(exp_avgs[i], p, true);
    w.exp_avg_sq = stager.data_like(exp_avg_sqs[i], p, true);
    w.max_exp_avg_sq = amsgrad ? stager.data_like(max_exp_avg_sqs[i], p, true) : nullptr;
    w.step = step;
  }

  parallel_over_chunks(split_into_chunks(numels), [&](const CpuChunk& c) {
    const AdamTensorWork& w = work[c.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.dtype, "fused_adam_cpu", [&] {
      with_flag(amsgrad, [&](auto ams) {
        with_flag(has_scale, [&](auto scaled) {
          with_flag(clip != 1.0, [&](auto clipped) {
            adam_chunk<scalar_t, decltype(ams)::value, decltype(scaled)::value, decltype(clipped)::value>(
                w, c.begin, c.end, h, lr_value, scale, clip);
          });
        });
      });
    });
  });
  stager.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) { m.impl("fused_adam_", &fused_adam_cpu); }

}  // namespace torchfast
