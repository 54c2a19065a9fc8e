// Emulator shim of ATen/cuda/CUDAContext.h: the current stream (a placeholder: the emulator runs
// launches in order, at once) and the emulated device's properties (tf_emu::set_device).
#pragma once
#include <c10/cuda/CUDAException.h>

#include "emulator/runtime.h"

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return const_cast<cudaDeviceProp*>(tf_emu::device_properties()); }
}  // namespace at::cuda
