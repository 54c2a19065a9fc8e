// Emulator shim of c10/cuda/CUDAException.h: launch and API errors become c10::Error, as on a GPU.
#pragma once
#include <c10/util/Exception.h>

#include "emulator/runtime.h"

#define C10_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                \
    const cudaError_t tf_emu_err = (expr);                                                            \
    if (tf_emu_err != cudaSuccess) {                                                                  \
      (void)::tf_emu::get_last_error();                                                               \
      TORCH_CHECK(false, "CUDA error: ", cudaGetErrorString(tf_emu_err), " (", #expr, "): ",          \
                  ::tf_emu::last_error_message());                                                    \
    }                                                                                                 \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                              \
  do {                                                                                              \
    const cudaError_t tf_emu_err = ::tf_emu::get_last_error();                                      \
    TORCH_CHECK(tf_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(tf_emu_err), ": ",    \
                ::tf_emu::last_error_message());                                                    \
  } while (0)
