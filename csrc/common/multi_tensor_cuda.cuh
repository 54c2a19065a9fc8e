// Multi-tensor apply on CUDA: one launch covers a whole list of tensors.
//
// The host describes every tensor (up to kMaxStreams data pointers, its numel, whether all of them
// are aligned for vector loads) and every (tensor, chunk) pair in one byte buffer, copies it to the
// device asynchronously from pinned memory, and launches one block per chunk. Unlike launches whose
// metadata travels in kernel arguments (4 KB at most), any number of tensors fits in one launch.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include "common/host_device.h"
#include "common/launch.cuh"

#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

namespace torchfast {

constexpr int kMaxStreams = 5;
constexpr int kVecElems = 4;                // elements per vector load/store
// Elements per block: 16K (32 per thread) keeps enough blocks in flight to fill a large GPU even
// for a single ResNet-sized parameter set (11.7M params -> ~700 blocks).
constexpr int64_t kCudaChunkElems = 16384;
constexpr int kCudaBlockThreads = 512;

struct CudaTensorMeta {
  void* ptr[kMaxStreams];
  void* step;  // the op's step counter for this tensor, if it has one (float32 or float64)
  int64_t numel;
  bool aligned;  // every data pointer is aligned to kVecElems elements
  bool step_is_double;
};

struct CudaChunkMeta {
  int64_t tensor;
  int64_t begin;
};

// Device copy of the metadata of one launch.
struct CudaLaunchMeta {
  at::Tensor storage;  // keeps the device buffer alive until the launch is queued
  const CudaTensorMeta* tensors = nullptr;
  const CudaChunkMeta* chunks = nullptr;
  int64_t num_chunks = 0;
};

inline bool is_aligned(const void* p, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(p) % (elem_size * kVecElems) == 0;
}

inline CudaLaunchMeta upload_launch_meta(const std::vector<CudaTensorMeta>& tensors, const at::Device& device) {
  std::vector<CudaChunkMeta> chunks;
  for (size_t t = 0; t < tensors.size(); ++t)
    for (int64_t b = 0; b < tensors[t].numel; b += kCudaChunkElems) chunks.push_back({static_cast<int64_t>(t), b});
  CudaLaunchMeta meta;
  meta.num_chunks = static_cast<int64_t>(chunks.size());
  if (tensors.empty()) return meta;
  const size_t tensor_bytes = tensors.size() * sizeof(CudaTensorMeta);
  const size_t chunk_bytes = chunks.size() * sizeof(CudaChunkMeta);
  at::Tensor host = at::empty({static_cast<int64_t>(tensor_bytes + chunk_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(TF_PINNED_HOST_BUFFERS));
  std::memcpy(host.data_ptr(), tensors.data(), tensor_bytes);
  std::memcpy(static_cast<uint8_t*>(host.data_ptr()) + tensor_bytes, chunks.data(), chunk_bytes);
  // Pinned memory + non_blocking: the copy is queued on the current stream, and the caching host
  // allocator keeps `host` from being reused until the copy has run.
  meta.storage = host.to(device, /*non_blocking=*/true);
  const uint8_t* base = static_cast<const uint8_t*>(meta.storage.data_ptr());
  meta.tensors = reinterpret_cast<const CudaTensorMeta*>(base);
  meta.chunks = reinterpret_cast<const CudaChunkMeta*>(base + tensor_bytes);
  return meta;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) VecPack {
  T v[N];
};

// Runs f over this block's chunk: f gets acc_t x[N] (the N streams of one element, in the compute
// type) and may modify it; streams whose bit is set in store_mask are written back. Null stream
// pointers read as zero. Vector loads are used only when the tensor's pointers are aligned.
template <typename scalar_t, int N, typename F>
__device__ inline void for_each_chunk_element(const CudaTensorMeta& t, int64_t begin, uint32_t store_mask, F&& f) {
  using acc_t = acc_type_t<scalar_t>;
  using Pack = VecPack<scalar_t, kVecElems>;
  const int64_t end = begin + kCudaChunkElems < t.numel ? begin + kCudaChunkElems : t.numel;
  scalar_t* ptr[N];
#pragma unroll
  for (int k = 0; k < N; ++k) ptr[k] = static_cast<scalar_t*>(t.ptr[k]);

  int64_t scalar_begin = begin;
  if (t.aligned) {
    const int64_t vec_end = begin + ((end - begin) / kVecElems) * kVecElems;
    for (int64_t v = begin + static_cast<int64_t>(threadIdx.x) * kVecElems; v < vec_end;
         v += static_cast<int64_t>(blockDim.x) * kVecElems) {
      Pack pk[N];
#pragma unroll
      for (int k = 0; k < N; ++k)
        if (ptr[k]) pk[k] = *reinterpret_cast<const Pack*>(ptr[k] + v);
#pragma unroll
      for (int e = 0; e < kVecElems; ++e) {
        acc_t x[N];
#pragma unroll
        for (int k = 0; k < N; ++k) x[k] = ptr[k] ? static_cast<acc_t>(pk[k].v[e]) : acc_t(0);
        f(x);
#pragma unroll
        for (int k = 0; k < N; ++k) pk[k].v[e] = static_cast<scalar_t>(x[k]);
      }
#pragma unroll
      for (int k = 0; k < N; ++k)
        if ((store_mask >> k) & 1u) *reinterpret_cast<Pack*>(ptr[k] + v) = pk[k];
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    acc_t x[N];
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = ptr[k] ? static_cast<acc_t>(ptr[k][i]) : acc_t(0);
    f(x);
#pragma unroll
    for (int k = 0; k < N; ++k)
      if ((store_mask >> k) & 1u) ptr[k][i] = static_cast<scalar_t>(x[k]);
  }
}

// Reads a scalar device value stored as float32 or float64.
__device__ inline double read_scalar(const void* p, bool is_double) {
  return is_double ? *static_cast<const double*>(p) : static_cast<double>(*static_cast<const float*>(p));
}

// The optional device scalars of an optimizer op (lr, grad_scale, found_inf) as float32 pointers,
// converted on the device so that nothing waits for the host.
struct DeviceScalars {
  std::vector<at::Tensor> keep_alive;
  const float* lr = nullptr;
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  const float* clip_coef = nullptr;
};

inline const float* device_scalar_f32(const std::optional<at::Tensor>& t, std::vector<at::Tensor>& keep_alive,
                                      const at::Device& device, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must hold one value, got shape ", t->sizes());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but the params are on ", device);
  keep_alive.push_back(t->to(at::kFloat).contiguous());
  return keep_alive.back().data_ptr<float>();
}

inline DeviceScalars device_scalars(const char* op, const at::Device& device, const std::optional<at::Tensor>& lr,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf,
                                    const std::optional<at::Tensor>& clip_coef) {
  DeviceScalars s;
  s.lr = device_scalar_f32(lr, s.keep_alive, device, op, "lr_tensor");
  s.grad_scale = device_scalar_f32(grad_scale, s.keep_alive, device, op, "grad_scale");
  s.found_inf = device_scalar_f32(found_inf, s.keep_alive, device, op, "found_inf");
  s.clip_coef = device_scalar_f32(clip_coef, s.keep_alive, device, op, "clip_coef");
  return s;
}

inline void set_alignment(CudaTensorMeta& m, size_t elem_size) {
  m.aligned = true;
  for (void* ptr : m.ptr)
    if (ptr && !is_aligned(ptr, elem_size)) m.aligned = false;
}

// Uploads each dtype's metadata and calls launch(dtype, meta) once per dtype present.
template <typename Launch>
inline void launch_per_dtype(const std::map<at::ScalarType, std::vector<CudaTensorMeta>>& by_dtype,
                             const at::Device& device, const Launch& launch) {
  for (const auto& [dtype, metas] : by_dtype) {
    const CudaLaunchMeta meta = upload_launch_meta(metas, device);
    TORCH_CHECK(meta.num_chunks < (int64_t{1} << 31), "torchfast: too many chunks for one launch: ", meta.num_chunks);
    launch(dtype, meta, static_cast<int64_t>(metas.size()));
  }
}

}  // namespace torchfast
