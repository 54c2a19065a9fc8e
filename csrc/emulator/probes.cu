// Small kernels, written for the emulator's own tests, each with one classic CUDA mistake (and,
// with fixed = true, without it): they show that the emulator catches what it claims to. Built
// into the emulator library only (the name does not match the *_cuda.cu of the GPU build).
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <mma.h>
#include <torch/library.h>

#include <string>

#include "common/launch.cuh"

namespace torchfast {
namespace {

constexpr int kBlock = 64;

// Each thread stores its index, then reads its neighbour's: needs a barrier in between.
__global__ void neighbour_kernel(float* out, bool with_barrier) {
  TF_SHARED(float, s, [kBlock]);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % kBlock];
}

// One warp stores a WMMA tile to shared memory, then every lane sums the whole tile: the lanes'
// stores must be complete (a __syncwarp) before any lane reads.
__global__ void wmma_store_kernel(float* out, bool with_syncwarp) {
  TF_DYNAMIC_SHARED(float, tile, 32);  // 16 x 16, 256-bit aligned as WMMA requires
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
  if (with_syncwarp) __syncwarp();
  float sum = 0;
  for (int e = 0; e < 256; ++e) sum += tile[e];
  out[threadIdx.x] = sum;
}

// A WMMA load from a pointer that is not 32-byte aligned (fixed: an aligned one).
__global__ void wmma_misaligned_kernel(float* out, bool aligned) {
  TF_DYNAMIC_SHARED(c10::Half, tile, 32);  // 16 * 16 + 16 halves
  namespace wmma = nvcuda::wmma;
  for (int e = threadIdx.x; e < 16 * 16 + 16; e += 32) tile[e] = c10::Half(1.0f);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, c10::Half, wmma::row_major> a;
  wmma::load_matrix_sync(a, tile + (aligned ? 0 : 1), 16);
  out[threadIdx.x] = 1.0f;
}

// Uses all of its dynamic shared memory.
__global__ void dynamic_smem_kernel(float* out, int n) {
  TF_DYNAMIC_SHARED(float, buf, 16);
  for (int e = threadIdx.x; e < n; e += blockDim.x) buf[e] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0;
    for (int e = 0; e < n; ++e) t += buf[e];
    out[0] = t;
  }
}

// Threads past the first warp return before a barrier that the others wait at.
__global__ void early_return_kernel(float* out, bool fixed) {
  TF_SHARED(float, s, [kBlock]);
  if (!fixed && threadIdx.x >= 32) return;
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x < 32) out[threadIdx.x] = s[threadIdx.x ^ 1];
}

// Two halves of the block wait at different barriers.
__global__ void divergent_barrier_kernel(float* out, bool fixed) {
  if (fixed || threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Half of a warp waits at __syncwarp while the rest waits at __syncthreads.
__global__ void deadlock_kernel(float* out, bool fixed) {
  if (!fixed && threadIdx.x < 16) __syncwarp();
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A warp sum by butterfly shuffles, with a full mask or (the mistake here) half of one.
__global__ void shuffle_sum_kernel(float* out, bool full_mask) {
  const unsigned mask = full_mask ? 0xffffffffu : 0x0000ffffu;
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(mask, v, o);
  out[threadIdx.x] = v;
}

// 64 blocks of 64 threads add 1 into one cell.
__global__ void atomic_kernel(float* out) { atomicAdd(out, 1.0f); }

// Lanes store, then read another lane's element: needs a __syncwarp in between.
__global__ void lane_exchange_kernel(float* out, bool with_syncwarp) {
  TF_SHARED(float, s, [32]);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (with_syncwarp) __syncwarp();
  out[threadIdx.x] = s[31 - threadIdx.x];
}

// Two warps exchange through shared memory in a loop with a warp collective inside; without the
// loop-top __syncthreads a warp that runs ahead overwrites what the other has yet to read. Only a
// schedule that lets one warp run ahead (warps-*) shows it.
__global__ void warp_phase_kernel(float* out, bool fixed) {
  TF_SHARED(float, s, [kBlock]);
  float acc = 0;
  for (int it = 0; it < 2; ++it) {
    if (fixed) __syncthreads();  // the other warp has read the previous round
    s[threadIdx.x] = static_cast<float>(threadIdx.x + 100 * it);
    __syncthreads();
    const float v = s[(threadIdx.x + 32) % kBlock];
    acc += __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = acc;
}

// Shuffle lane arithmetic: an index takes its low 5 bits; a butterfly past lane 31 returns the
// caller's own value.
__global__ void shuffle_lanes_kernel(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  const unsigned lane = threadIdx.x % 32;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, v, lane + 3) + 1000.0f * __shfl_xor_sync(0xffffffffu, v, 32);
}

// Lanes at two different shuffles (fixed: one).
__global__ void divergent_shuffle_kernel(float* out, bool fixed) {
  float v = static_cast<float>(threadIdx.x);
  if (fixed || threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Half of each warp returns before a shuffle that the other half waits at.
__global__ void exit_before_shuffle_kernel(float* out, bool fixed) {
  if (!fixed && threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Every thread takes a ticket: atomicAdd returns the old value, so each ticket is unique.
__global__ void ticket_kernel(float* out, int* counter) {
  const int ticket = atomicAdd(counter, 1);
  out[ticket] += 1.0f;
}

// 40 KiB of static shared memory beside the launch's dynamic shared memory.
__global__ void static_and_dynamic_kernel(float* out) {
  TF_SHARED(float, big, [10 * 1024]);
  TF_DYNAMIC_SHARED(float, dyn, 16);
  big[threadIdx.x] = 1.0f;
  dyn[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x] + dyn[threadIdx.x];
}

// A static __shared__ array of N floats: 13 Ki floats (52 KiB) pass CUDA's 48 KiB.
template <int N>
__global__ void static_smem_kernel(float* out) {
  TF_SHARED(float, buf, [N]);
  buf[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// Thread 63 writes one element past a static __shared__ array through a pointer (fixed: in
// bounds). Shows as AddressSanitizer's heap-buffer-overflow in the sanitized build (buffers have
// exactly their size).
__global__ void overflow_kernel(float* out, bool fixed) {
  TF_SHARED(float, s, [kBlock]);
  float* p = &s[0];
  p[threadIdx.x + (fixed ? 0 : 1)] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

at::Tensor probe(const std::string& name, bool fixed) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::full({kBlock}, -7.0f, opts);
  float* o = out.mutable_data_ptr<float>();
  if (name == "missing_syncthreads") {
    tf_launch(neighbour_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "missing_syncwarp_after_wmma_store") {
    tf_launch(wmma_store_kernel, 1, 32, 16 * 16 * sizeof(float), nullptr, o, fixed);
  } else if (name == "wmma_misaligned") {
    tf_launch(wmma_misaligned_kernel, 1, 32, (16 * 16 + 16) * sizeof(c10::Half), nullptr, o, fixed);
  } else if (name == "dynamic_smem_over_limit") {
    const int n = 64 * 1024 / sizeof(float);  // 64 KiB: more than the default 48 KiB
    // fixed: raise the kernel's limit to what it uses; else (re)set CUDA's default of 48 KiB
    const int limit = fixed ? static_cast<int>(n * sizeof(float)) : 48 * 1024;
    C10_CUDA_CHECK(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    tf_launch(dynamic_smem_kernel, 1, 256, n * sizeof(float), nullptr, o, n);
  } else if (name == "early_return_before_barrier") {
    tf_launch(early_return_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "divergent_barrier") {
    tf_launch(divergent_barrier_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "deadlock") {
    tf_launch(deadlock_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "half_warp_shuffle") {
    tf_launch(shuffle_sum_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "atomic_add") {
    out.zero_();
    tf_launch(atomic_kernel, kBlock, kBlock, 0, nullptr, o);
  } else if (name == "static_smem_over_limit") {
    if (fixed) {
      tf_launch(static_smem_kernel<1024>, 1, kBlock, 0, nullptr, o);
    } else {
      tf_launch(static_smem_kernel<13 * 1024>, 1, kBlock, 0, nullptr, o);
    }
  } else if (name == "missing_syncwarp") {
    tf_launch(lane_exchange_kernel, 1, 32, 0, nullptr, o, fixed);
  } else if (name == "warp_runs_ahead") {
    tf_launch(warp_phase_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "shuffle_lanes") {
    tf_launch(shuffle_lanes_kernel, 1, kBlock, 0, nullptr, o);
  } else if (name == "divergent_shuffles") {
    tf_launch(divergent_shuffle_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "exit_before_shuffle") {
    tf_launch(exit_before_shuffle_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "atomic_add_returns_old") {
    out.zero_();
    at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
    tf_launch(ticket_kernel, 1, kBlock, 0, nullptr, o, counter.mutable_data_ptr<int>());
  } else if (name == "dynamic_smem_over_optin") {
    // fixed: within every emulated device's opt-in limit; else past sm75's 64 KiB
    C10_CUDA_CHECK(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        fixed ? 60 * 1024 : 80 * 1024));
  } else if (name == "static_plus_dynamic_over_optin") {
    // 40 KiB static + 40 KiB (fixed: 16 KiB) dynamic: past sm75's 64 KiB opt-in limit
    const int dyn = (fixed ? 16 : 40) * 1024;
    C10_CUDA_CHECK(cudaFuncSetAttribute(static_and_dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn));
    tf_launch(static_and_dynamic_kernel, 1, kBlock, dyn, nullptr, o);
  } else if (name == "grid_limit") {
    tf_launch(atomic_kernel, dim3(1, fixed ? 1 : 65536), 1, 0, nullptr, o);
  } else if (name == "block_z_limit") {
    tf_launch(neighbour_kernel, 1, dim3(1, 1, fixed ? 64 : 65), 0, nullptr, o, true);
  } else if (name == "shared_memory_overflow") {
    tf_launch(overflow_kernel, 1, kBlock, 0, nullptr, o, fixed);
  } else if (name == "oversized_block") {
    tf_launch(neighbour_kernel, 1, fixed ? kBlock : 2048, 0, nullptr, o, true);
  } else {
    TORCH_CHECK(false, "torchfast_emu::_emulator_probe: unknown probe '", name, "'");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchfast_emu, m) {
  m.def("_emulator_probe(str name, bool fixed) -> Tensor", &probe);
}

}  // namespace torchfast
