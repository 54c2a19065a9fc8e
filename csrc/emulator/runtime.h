// A CUDA execution model on the host, so that csrc/**/*_cuda.cu compile a second time as C++ (g++)
// and run their kernels on CPU tensors. Used by the tests only (built with TORCHFAST_EMULATOR=1).
//
// - Blocks run one at a time; the threads of a block are fibers on the calling OS thread
//   (csrc/emulator/fiber.h). threadIdx/blockIdx/blockDim/gridDim are thread-local variables that
//   the scheduler sets on every switch.
// - A fiber runs until it reaches a barrier (__syncthreads, or a warp collective: __syncwarp,
//   __shfl_sync, __shfl_xor_sync) or exits. The scheduler then releases a barrier only when every
//   thread it concerns waits at the same call site, and reports divergence (two call sites in one
//   round, a thread that exits while others wait, a deadlock) naming the kernel, block and sites.
// - The order in which ready threads run between barriers is selectable (set_schedule): a missing
//   barrier then shows as a wrong result under one of the orders.
// - Shared memory (static and dynamic) is a per-block heap buffer of exactly the requested size,
//   filled with 0xFF bytes (NaN in every float type), so a read before a write shows.
// - Launches check the block and grid limits and the dynamic shared memory against the kernel's
//   cudaFuncSetAttribute value (default 48 KiB) and the emulated device's opt-in limit.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

// ---- runtime types ----------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxDynamicSharedSizeBytes = 0;
  int ptxVersion = 0;
  int binaryVersion = 0;
};

struct cudaDeviceProp {
  char name[64];
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlock;       // 48 KiB without opt-in
  size_t sharedMemPerBlockOptin;  // with cudaFuncSetAttribute
  int maxThreadsPerBlock;
  int warpSize;
};

// The current position of the running fiber (set by the scheduler on every switch).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace tf_emu {

// ---- control (set from Python through torchfast.testing.cuda_emulator) ----------------------
// kAscending/kDescending/kRandom: the ready threads of a block run in that order, all of them
// between one barrier release and the next (the warps of a block advance together).
// kWarpsAscending/kWarpsDescending: one warp at a time runs on, through its warp collectives, until
// it reaches __syncthreads or exits; then the next (so a warp runs ahead of the others, which shows
// a missing __syncthreads between warps). Blocks run in the same order (random: shuffled).
enum class Order { kAscending, kDescending, kRandom, kWarpsAscending, kWarpsDescending };
void set_schedule(Order order, uint64_t seed);
// "sm75", "sm80", "sm86" or "sm90": the properties at::cuda::getCurrentDeviceProperties() returns.
void set_device(const std::string& arch);
const cudaDeviceProp* device_properties();
// Launches and emulated threads per launch site since the last reset, as JSON.
std::string launch_stats_json();
void reset_launch_stats();

// ---- faults ---------------------------------------------------------------------------------
// Stops the running kernel: the launch then throws a c10::Error with this message (plus the kernel,
// block and thread). Never returns.
[[noreturn]] void fault(const std::string& message);
// The thread-linear index within the block and the lane within its warp.
unsigned linear_thread();
inline unsigned lane_id() { return linear_thread() % 32u; }
std::string hex(uint64_t value);  // "0x..." for messages

// ---- barriers and warp collectives -----------------------------------------------------------
void syncthreads(const char* file, int line, const char* func);
void syncwarp(const char* file, int line, const char* func, unsigned mask);
// All lanes deposit `value`; each gets the value of lane `src` (a full-mask collective).
uint64_t shuffle(const char* file, int line, const char* func, unsigned mask, uint64_t value, int src_lane,
                 bool xor_mode);

template <typename T>
T shfl(const char* file, int line, const char* func, unsigned mask, T v, int lane, bool xor_mode) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle(file, line, func, mask, bits, lane, xor_mode);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ---- shared memory --------------------------------------------------------------------------
// The block's buffer for one static __shared__ declaration (identified by `tag`), created on first
// use in the block.
void* static_shared(const void* tag, size_t bytes, size_t align, const char* name, const char* file, int line);
// The block's dynamic shared memory (the launch's shared_bytes).
void* dynamic_shared(size_t align);

// ---- launch ---------------------------------------------------------------------------------
struct LaunchSite {
  const char* file;
  int line;
  const char* text;  // the launch's arguments as written: the kernel expression comes first
};

// Runs `body(ctx)` once per thread of every block of the grid (blocks in order, threads as
// fibers). Validates the configuration first; a bad configuration sets the error that the next
// cudaGetLastError()/C10_CUDA_KERNEL_LAUNCH_CHECK() reports (as a real launch does); a fault
// inside the kernel throws.
void run_grid(const LaunchSite& site, const void* kernel_key, dim3 grid, dim3 block, size_t shared_bytes,
              void (*body)(void*), void* ctx);

template <typename... Params, typename... Args>
void launch(const LaunchSite& site, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            cudaStream_t /*stream*/, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "tf_launch: wrong number of kernel arguments");
  // Kernel parameters are copied once at launch, as CUDA copies them to the device.
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } ctx{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  run_grid(site, reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
           [](void* p) {
             auto* c = static_cast<Ctx*>(p);
             std::apply(c->kernel, c->params);  // each thread gets its own copy of the parameters
           },
           &ctx);
}

// ---- runtime API subset ---------------------------------------------------------------------
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t get_last_error();      // returns and clears the sticky launch error
const char* last_error_message();  // the message of the error get_last_error() returned last

}  // namespace tf_emu

template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return tf_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... Params>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(Params...)) {
  return tf_emu::func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
inline cudaError_t cudaGetLastError() { return tf_emu::get_last_error(); }
const char* cudaGetErrorString(cudaError_t error);

// ---- device functions -----------------------------------------------------------------------
#define TF_EMU_SITE __FILE__, __LINE__, __func__
#define __syncthreads() ::tf_emu::syncthreads(TF_EMU_SITE)
#define __syncwarp(...) ::tf_emu::syncwarp(TF_EMU_SITE, ::tf_emu::warp_mask(__VA_ARGS__))
#define __shfl_sync(mask, var, ...) ::tf_emu::shfl(TF_EMU_SITE, mask, var, ::tf_emu::shfl_src(__VA_ARGS__), false)
#define __shfl_xor_sync(mask, var, ...) ::tf_emu::shfl(TF_EMU_SITE, mask, var, ::tf_emu::shfl_src(__VA_ARGS__), true)

namespace tf_emu {
constexpr unsigned warp_mask(unsigned mask = 0xffffffffu) { return mask; }
// The lane argument of a shuffle; the optional width must be 32 (the emulator models whole warps).
inline int shfl_src(int lane, int width = 32) {
  if (width != 32) fault("shuffle with width " + std::to_string(width) + ": only width 32 is modelled");
  return lane;
}
}  // namespace tf_emu

// Atomics: the threads of a block are fibers on one OS thread, but the operation is still done as
// an atomic read-modify-write.
template <typename T>
inline T atomicAdd(T* address, T value) {
  static_assert(std::is_arithmetic_v<T>, "atomicAdd of an unsupported type");
  return std::atomic_ref<T>(*address).fetch_add(value);
}

[[noreturn]] inline void __trap() { tf_emu::fault("__trap() called"); }
inline float __expf(float x) { return ::expf(x); }
inline float __logf(float x) { return ::logf(x); }
