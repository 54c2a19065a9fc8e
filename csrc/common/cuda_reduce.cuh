// Block-wide reduction for the CUDA kernels: every thread passes one value, every thread gets the
// block's combination. kThreads must equal blockDim.x and be a power of two.
#pragma once
#include "common/launch.cuh"

namespace torchfast {

template <int kThreads, typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  TF_EMULATOR_CHECK(blockDim.x == kThreads && blockDim.y == 1 && blockDim.z == 1,
                    "block_reduce<" + std::to_string(kThreads) + "> in a block of " + std::to_string(blockDim.x) +
                        " x " + std::to_string(blockDim.y) + " x " + std::to_string(blockDim.z) + " threads");
  TF_SHARED(T, buf, [kThreads]);
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) buf[threadIdx.x] = op(buf[threadIdx.x], buf[threadIdx.x + stride]);
    __syncthreads();
  }
  const T out = buf[0];
  __syncthreads();  // buf is reused by the next call
  return out;
}

}  // namespace torchfast
