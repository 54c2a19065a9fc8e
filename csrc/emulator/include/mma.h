// Emulator shim of mma.h: nvcuda::wmma (csrc/emulator/wmma.h).
#pragma once
#include "emulator/wmma.h"
