// The few places where a CUDA source differs between nvcc and the host-side emulator
// (csrc/emulator/): kernel launches, shared-memory declarations, the op registration and arch
// guards. Under nvcc every macro is the plain CUDA construct; with TORCHFAST_EMULATOR the same
// source compiles as C++ and runs its kernels on CPU tensors (see csrc/emulator/runtime.h).
#pragma once

#if defined(TORCHFAST_EMULATOR)
#include "emulator/runtime.h"

// tf_launch(kernel, grid, block, shared_bytes, stream, args...): the emulator's launch also gets
// the call site and the launch's source text, for its error messages.
#define tf_launch(...) ::tf_emu::launch(::tf_emu::LaunchSite{__FILE__, __LINE__, #__VA_ARGS__}, __VA_ARGS__)
// TF_SHARED(double, buf, [K][kThreads]);  ==  __shared__ double buf[K][kThreads];
// A per-block heap buffer of exactly that size, filled with 0xFF bytes (NaN in every float type).
#define TF_SHARED(type, name, ...)                                                   \
  static char tf_shared_tag_##name;                                                  \
  using tf_shared_type_##name = type __VA_ARGS__;                                    \
  tf_shared_type_##name& name = *static_cast<tf_shared_type_##name*>(                \
      ::tf_emu::static_shared(&tf_shared_tag_##name, sizeof(tf_shared_type_##name), \
                              alignof(tf_shared_type_##name), #name, __FILE__, __LINE__))
// TF_DYNAMIC_SHARED(unsigned char, smem, 16);  ==  extern __shared__ __align__(16) unsigned char smem[];
#define TF_DYNAMIC_SHARED(type, name, align) type* name = static_cast<type*>(::tf_emu::dynamic_shared(align))
// The CUDA kernels of a file register as CPU kernels of the torchfast_emu namespace.
#define TF_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(torchfast_emu, CPU, m)
// Kernel bodies for sm_XY+ exist in the emulator build; the host decides at run time, from the
// emulated device (tf_emu::set_device), whether to launch them (cudaFuncGetAttributes).
#define TF_DEVICE_ARCH_AT_LEAST(arch) 1
// The emulated "device" is the CPU: host buffers need no pinning (pinned memory needs a GPU).
#define TF_PINNED_HOST_BUFFERS false
// A device-side assumption that nvcc cannot check (e.g. a launch-bounds contract): a fault here.
#define TF_EMULATOR_CHECK(cond, message) \
  do {                                   \
    if (!(cond)) ::tf_emu::fault(message); \
  } while (0)

#else  // nvcc

#include <cuda_runtime.h>

#include <utility>

namespace torchfast {
// The plain launch: kernel<<<grid, block, shared_bytes, stream>>>(args...).
template <typename... Params, typename... Args>
inline void tf_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                      Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
}
}  // namespace torchfast

#define TF_SHARED(type, name, ...) __shared__ type name __VA_ARGS__
#define TF_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#define TF_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(torchfast, CUDA, m)
#if defined(__CUDA_ARCH__)
#define TF_DEVICE_ARCH __CUDA_ARCH__  // expanded where used: the arch of each device pass
#else
#define TF_DEVICE_ARCH 0  // the host pass
#endif
#define TF_DEVICE_ARCH_AT_LEAST(arch) (TF_DEVICE_ARCH >= (arch))
#define TF_PINNED_HOST_BUFFERS true
#define TF_EMULATOR_CHECK(cond, message) ((void)0)

#endif
