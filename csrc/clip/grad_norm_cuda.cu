// CUDA kernels of torchfast::total_norm and torchfast::clip_grads_with_norm_.
// total_norm: one launch per dtype writes a partial per (tensor, chunk) block, one single-block
// launch combines them; clip: the coefficient is computed from the device-side norm by every block
// (no host sync), and blocks return at once when it is 1.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "clip/clip_checks.h"
#include "clip/grad_norm_math.h"
#include "common/cuda_reduce.cuh"
#include "common/launch.cuh"
#include "common/multi_tensor_cuda.cuh"
#include "common/tensor_lists.h"

namespace torchfast {
namespace {

constexpr int kFinishThreads = 1024;

template <NormKind kKind, int kThreads>
__device__ double norm_block_reduce(double v) {
  return block_reduce<kThreads>(v, [](double a, double b) { return norm_combine<kKind>(a, b); });
}

template <NormKind kKind, typename scalar_t>
__global__ void __launch_bounds__(kCudaBlockThreads)
    norm_partials_kernel(const CudaTensorMeta* tensors, const CudaChunkMeta* chunks, double* partials) {
  using acc_t = acc_type_t<scalar_t>;
  const CudaChunkMeta c = chunks[blockIdx.x];
  const CudaTensorMeta& t = tensors[c.tensor];
  const scalar_t* data = static_cast<const scalar_t*>(t.ptr[0]);
  const int64_t end = c.begin + kCudaChunkElems < t.numel ? c.begin + kCudaChunkElems : t.numel;
  acc_t acc = acc_t(0);
  for (int64_t i = c.begin + threadIdx.x; i < end; i += blockDim.x)
    acc = norm_accumulate<kKind>(acc, static_cast<acc_t>(data[i]));
  const double total = norm_block_reduce<kKind, kCudaBlockThreads>(static_cast<double>(acc));
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <NormKind kKind>
__global__ void __launch_bounds__(kFinishThreads) norm_finish_kernel(const double* partials, int64_t n, double* out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc = norm_combine<kKind>(acc, partials[i]);
  const double total = norm_block_reduce<kKind, kFinishThreads>(acc);
  if (threadIdx.x == 0) *out = norm_finish<kKind>(total);  // in double: fp64 norms keep their precision
}

template <NormKind kKind>
at::Tensor total_norm_impl(at::TensorList tensors, at::ScalarType dtype) {
  const at::Device device = tensors[0].device();
  std::vector<at::Tensor> dense;  // non-dense tensors are read through a contiguous copy
  std::map<at::ScalarType, std::vector<CudaTensorMeta>> by_dtype;
  int64_t total_chunks = 0;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    CudaTensorMeta m{};
    m.ptr[0] = const_cast<void*>(dense.back().const_data_ptr());
    m.numel = t.numel();
    by_dtype[t.scalar_type()].push_back(m);
    total_chunks += (m.numel + kCudaChunkElems - 1) / kCudaChunkElems;
  }
  const auto opts = at::TensorOptions().device(device);
  at::Tensor partials = at::empty({std::max<int64_t>(total_chunks, 1)}, opts.dtype(at::kDouble));
  at::Tensor out = at::empty({}, opts.dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int64_t offset = 0;
  launch_per_dtype(by_dtype, device, [&](at::ScalarType dtype, const CudaLaunchMeta& launch, int64_t) {
    if (launch.num_chunks == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "total_norm_cuda", [&] {
      tf_launch(norm_partials_kernel<kKind, scalar_t>, launch.num_chunks, kCudaBlockThreads, 0, stream, launch.tensors,
                launch.chunks, partials.data_ptr<double>() + offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    offset += launch.num_chunks;
  });
  tf_launch(norm_finish_kernel<kKind>, 1, kFinishThreads, 0, stream, partials.data_ptr<double>(), total_chunks,
            out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.to(dtype);
}

at::Tensor total_norm_cuda(at::TensorList tensors, double norm_type, std::optional<at::ScalarType> dtype) {
  const NormKind kind = check_total_norm_args("torchfast.total_norm", tensors, norm_type);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::ScalarType out = dtype.value_or(norm_result_dtype(tensors));
  switch (kind) {
    case NormKind::kTwo: return total_norm_impl<NormKind::kTwo>(tensors, out);
    case NormKind::kOne: return total_norm_impl<NormKind::kOne>(tensors, out);
    case NormKind::kInf: break;
  }
  return total_norm_impl<NormKind::kInf>(tensors, out);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kCudaBlockThreads)
    clip_kernel(const CudaTensorMeta* tensors, const CudaChunkMeta* chunks, const void* total_norm, bool norm_is_double,
                double max_norm) {
  using acc_t = acc_type_t<scalar_t>;
  // in the norm's precision, as on the CPU: fp64 for an fp64 norm, else fp32
  const double coef = norm_is_double
                          ? clip_coefficient<double>(*static_cast<const double*>(total_norm), max_norm)
                          : clip_coefficient<float>(*static_cast<const float*>(total_norm), static_cast<float>(max_norm));
  if (coef == 1.0) return;  // x * 1 == x: nothing to write
  const CudaChunkMeta c = chunks[blockIdx.x];
  const acc_t k = static_cast<acc_t>(coef);
  for_each_chunk_element<scalar_t, 1>(tensors[c.tensor], c.begin, 0b1u, [&](acc_t* x) { x[0] = x[0] * k; });
}

void clip_grads_with_norm_cuda(at::TensorList grads, const at::Tensor& total_norm, double max_norm) {
  check_clip_args("torchfast.clip_grads_with_norm_", grads, total_norm);
  if (grads.empty()) return;
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const bool norm_is_double = total_norm.scalar_type() == at::kDouble;
  const at::Tensor norm = norm_is_double ? total_norm.contiguous() : total_norm.to(at::kFloat).contiguous();
  LayoutStager stager;
  std::map<at::ScalarType, std::vector<CudaTensorMeta>> by_dtype;
  for (const at::Tensor& g : grads) {
    if (g.numel() == 0) continue;
    CudaTensorMeta m{};
    m.ptr[0] = stager.reference(g).data_ptr();  // non-dense: staged and written back
    m.numel = g.numel();
    set_alignment(m, g.element_size());
    by_dtype[g.scalar_type()].push_back(m);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_per_dtype(by_dtype, device, [&](at::ScalarType dtype, const CudaLaunchMeta& launch, int64_t) {
    if (launch.num_chunks == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clip_grads_cuda", [&] {
      tf_launch(clip_kernel<scalar_t>, launch.num_chunks, kCudaBlockThreads, 0, stream, launch.tensors, launch.chunks,
                norm.const_data_ptr(), norm_is_double, max_norm);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  stager.finish();
}

}  // namespace

TF_CUDA_LIBRARY_IMPL(m) {
  m.impl("total_norm", &total_norm_cuda);
  m.impl("clip_grads_with_norm_", &clip_grads_with_norm_cuda);
}

}  // namespace torchfast
