// CUDA kernel of torchfast::fused_adam_ (Adam and AdamW): one launch per dtype present in the
// list (chunked multi-tensor apply), then one launch that advances the step counters. Nothing waits
// for the host: lr, grad_scale and found_inf are read on the device.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "common/launch.cuh"
#include "common/multi_tensor_cuda.cuh"
#include "optim/adam_math.h"
#include "optim/optim_checks.h"

namespace torchfast {
namespace {

constexpr const char* kOp = "torchfast.fused_adam_";

template <typename scalar_t>
__global__ void __launch_bounds__(kCudaBlockThreads)
    adam_kernel(const CudaTensorMeta* tensors, const CudaChunkMeta* chunks, AdamHyper h, const float* lr_ptr,
                const float* grad_scale_ptr, const float* found_inf_ptr, const float* clip_ptr) {
  using acc_t = acc_type_t<scalar_t>;
  if (found_inf_ptr && *found_inf_ptr != 0.f) return;  // inf/nan grads: the step is skipped
  const CudaChunkMeta c = chunks[blockIdx.x];
  const CudaTensorMeta& t = tensors[c.tensor];
  const double lr = lr_ptr ? static_cast<double>(*lr_ptr) : h.lr;
  const AdamElementConsts<acc_t> consts =
      adam_element_consts<acc_t>(h, lr, read_scalar(t.step, t.step_is_double) + 1.0);
  const bool has_scale = grad_scale_ptr != nullptr;
  const acc_t scale = has_scale ? static_cast<acc_t>(*grad_scale_ptr) : acc_t(1);
  const acc_t clip = clip_ptr ? static_cast<acc_t>(*clip_ptr) : acc_t(1);
  // streams: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq
  const uint32_t store = 0b01101u | (h.amsgrad ? 0b10000u : 0u) | (has_scale ? 0b00010u : 0u);
  for_each_chunk_element<scalar_t, 5>(t, c.begin, store, [&](acc_t* x) {
    if (has_scale) x[1] = x[1] / scale;  // unscaled grads are written back; clipping only feeds the update
    adam_update(x[0], x[1] * clip, x[2], x[3], x[4], consts);
  });
}

__global__ void increment_steps_kernel(const CudaTensorMeta* tensors, int64_t n, const float* found_inf_ptr) {
  if (found_inf_ptr && *found_inf_ptr != 0.f) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (tensors[i].step_is_double) {
    *static_cast<double*>(tensors[i].step) += 1.0;
  } else {
    *static_cast<float*>(tensors[i].step) += 1.0f;
  }
}

void fused_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
                     double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                     const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef) {
  check_adam_args(kOp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DeviceScalars scalars = device_scalars(kOp, device, lr_tensor, grad_scale, found_inf, clip_coef);
  const AdamHyper h{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay};

  LayoutStager stager;
  std::map<at::ScalarType, std::vector<CudaTensorMeta>> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = stager.reference(params[i]);
    CudaTensorMeta m{};
    m.ptr[0] = p.data_ptr();
    m.ptr[1] = stager.data_like(grads[i], p, /*write_back=*/scalars.grad_scale != nullptr);
    m.ptr[2] = stager.data_like(exp_avgs[i], p, true);
    m.ptr[3] = stager.data_like(exp_avg_sqs[i], p, true);
    m.ptr[4] = amsgrad ? stager.data_like(max_exp_avg_sqs[i], p, true) : nullptr;
    m.step = state_steps[i].data_ptr();
    m.step_is_double = state_steps[i].scalar_type() == at::kDouble;
    m.numel = p.numel();
    set_alignment(m, p.element_size());
    by_dtype[p.scalar_type()].push_back(m);
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_per_dtype(by_dtype, device, [&](at::ScalarType dtype, const CudaLaunchMeta& launch, int64_t count) {
    if (launch.num_chunks > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_adam_cuda", [&] {
        tf_launch(adam_kernel<scalar_t>, launch.num_chunks, kCudaBlockThreads, 0, stream, launch.tensors, launch.chunks,
                  h, scalars.lr, scalars.grad_scale, scalars.found_inf, scalars.clip_coef);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    // After the update kernel (same stream): it read the old counts.
    tf_launch(increment_steps_kernel, (count + 255) / 256, 256, 0, stream, launch.tensors, count, scalars.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  stager.finish();
}

}  // namespace

TF_CUDA_LIBRARY_IMPL(m) { m.impl("fused_adam_", &fused_adam_cuda); }

}  // namespace torchfast
