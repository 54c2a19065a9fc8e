// Emulator shim of cuda_runtime.h: the runtime subset the kernels use (csrc/emulator/runtime.h).
#pragma once
#include "emulator/runtime.h"
