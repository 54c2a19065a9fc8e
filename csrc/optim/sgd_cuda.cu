// CUDA kernel of torchfast::fused_sgd_: one launch per dtype present in the list (chunked
// multi-tensor apply). lr, grad_scale and found_inf are read on the device: no host sync.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "common/launch.cuh"
#include "common/multi_tensor_cuda.cuh"
#include "optim/optim_checks.h"
#include "optim/sgd_math.h"

namespace torchfast {
namespace {

constexpr const char* kOp = "torchfast.fused_sgd_";

template <typename scalar_t>
__global__ void __launch_bounds__(kCudaBlockThreads)
    sgd_kernel(const CudaTensorMeta* tensors, const CudaChunkMeta* chunks, SgdHyper h, double lr_value,
               const float* lr_ptr, bool first_step, const float* grad_scale_ptr, const float* found_inf_ptr,
               const float* clip_ptr) {
  using acc_t = acc_type_t<scalar_t>;
  if (found_inf_ptr && *found_inf_ptr != 0.f) return;
  const CudaChunkMeta c = chunks[blockIdx.x];
  const CudaTensorMeta& t = tensors[c.tensor];
  const double lr = lr_ptr ? static_cast<double>(*lr_ptr) : lr_value;
  const SgdElementConsts<acc_t> consts = sgd_element_consts<acc_t>(h, lr, first_step);
  const bool has_scale = grad_scale_ptr != nullptr;
  const acc_t scale = has_scale ? static_cast<acc_t>(*grad_scale_ptr) : acc_t(1);
  const acc_t clip = clip_ptr ? static_cast<acc_t>(*clip_ptr) : acc_t(1);
  // streams: 0 param, 1 grad, 2 momentum_buffer
  const uint32_t store = 0b001u | (h.momentum != 0 ? 0b100u : 0u) | (has_scale ? 0b010u : 0u);
  for_each_chunk_element<scalar_t, 3>(t, c.begin, store, [&](acc_t* x) {
    if (has_scale) x[1] = x[1] / scale;  // unscaled grads are written back; clipping only feeds the update
    sgd_update(x[0], x[1] * clip, x[2], consts);
  });
}

void fused_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                    double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                    bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& clip_coef) {
  const bool use_momentum = momentum != 0;
  check_sgd_args(kOp, params, grads, momentum_buffers, use_momentum);
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DeviceScalars scalars = device_scalars(kOp, device, lr_tensor, grad_scale, found_inf, clip_coef);
  const SgdHyper h{momentum, dampening, weight_decay, nesterov, maximize};

  LayoutStager stager;
  std::map<at::ScalarType, std::vector<CudaTensorMeta>> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    if (params[i].numel() == 0) continue;
    const at::Tensor& p = stager.reference(params[i]);
    CudaTensorMeta m{};
    m.ptr[0] = p.data_ptr();
    m.ptr[1] = stager.data_like(grads[i], p, /*write_back=*/scalars.grad_scale != nullptr);
    m.ptr[2] = use_momentum ? stager.data_like(momentum_buffers[i], p, true) : nullptr;
    m.numel = p.numel();
    set_alignment(m, p.element_size());
    by_dtype[p.scalar_type()].push_back(m);
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_per_dtype(by_dtype, device, [&](at::ScalarType dtype, const CudaLaunchMeta& launch, int64_t) {
    if (launch.num_chunks == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_sgd_cuda", [&] {
      tf_launch(sgd_kernel<scalar_t>, launch.num_chunks, kCudaBlockThreads, 0, stream, launch.tensors, launch.chunks, h,
                lr, scalars.lr, is_first_step, scalars.grad_scale, scalars.found_inf, scalars.clip_coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  stager.finish();
}

}  // namespace

TF_CUDA_LIBRARY_IMPL(m) { m.impl("fused_sgd_", &fused_sgd_cuda); }

}  // namespace torchfast
