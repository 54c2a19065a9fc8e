// Emulator shim of c10/cuda/CUDAGuard.h: the emulated kernels take CPU tensors.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "torchfast_emu ops run the CUDA kernels on CPU tensors, got a tensor on ", device);
  }
};
}  // namespace c10::cuda
