// The emulator's scheduler, barriers, shared memory and launch checks (see runtime.h).
#include "emulator/runtime.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <sstream>
#include <vector>

#include "emulator/fiber.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace tf_emu {
namespace {

constexpr unsigned kWarpSize = 32;
constexpr size_t kStaticSharedLimit = 48 * 1024;  // static __shared__ per block, as CUDA's
constexpr size_t kDefaultDynamicLimit = 48 * 1024;

// ---- settings shared by every OS thread -------------------------------------------------------
std::mutex g_settings_mutex;
Order g_order = Order::kAscending;
uint64_t g_seed = 0;

cudaDeviceProp make_props(const char* name, int major, int minor, int sms, size_t optin) {
  cudaDeviceProp p{};
  std::snprintf(p.name, sizeof(p.name), "%s", name);
  p.major = major;
  p.minor = minor;
  p.multiProcessorCount = sms;
  p.sharedMemPerBlock = 48 * 1024;
  p.sharedMemPerBlockOptin = optin;
  p.maxThreadsPerBlock = 1024;
  p.warpSize = 32;
  return p;
}

// The emulated devices: what the kernels' host code reads to pick paths (arch, shared memory).
const std::map<std::string, cudaDeviceProp>& device_table() {
  static const std::map<std::string, cudaDeviceProp> table = {
      {"sm75", make_props("emulated sm_75 (T4-class)", 7, 5, 40, 64 * 1024)},
      {"sm80", make_props("emulated sm_80 (A100-class)", 8, 0, 108, 163 * 1024)},
      {"sm86", make_props("emulated sm_86 (A10-class)", 8, 6, 72, 99 * 1024)},
      {"sm90", make_props("emulated sm_90 (H100/H200-class)", 9, 0, 132, 227 * 1024)},
  };
  return table;
}
cudaDeviceProp g_device = device_table().at("sm90");

struct SiteStats {
  int64_t launches = 0, blocks = 0, threads = 0;
};
std::map<std::string, SiteStats> g_stats;
std::map<const void*, int> g_max_dynamic_shared;  // cudaFuncSetAttribute values per kernel

// ---- the sticky launch error (per OS thread, as CUDA's is per host thread) -------------------
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::string g_last_message;
thread_local std::string g_returned_message;

void set_launch_error(cudaError_t error, const std::string& message) {
  g_last_error = error;
  g_last_message = message;
}

std::string short_path(const char* file) {
  std::string f(file);
  const auto pos = f.rfind("csrc/");
  return pos == std::string::npos ? f : f.substr(pos);
}

// The kernel expression of a launch: its text up to the first top-level comma.
std::string kernel_expression(const char* text) {
  int depth = 0;
  std::string out;
  for (const char* c = text; *c; ++c) {
    if (*c == '<' || *c == '(' || *c == '[') ++depth;
    if (*c == '>' || *c == ')' || *c == ']') --depth;
    if (*c == ',' && depth == 0) break;
    out += *c;
  }
  return out;
}

std::string format_dim(const uint3& d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}
std::string format_dim(const dim3& d) { return format_dim(uint3{d.x, d.y, d.z}); }

// ---- one block in flight ----------------------------------------------------------------------
struct Site {
  const char* file = nullptr;
  int line = 0;
  const char* func = nullptr;
  bool operator==(const Site& o) const { return line == o.line && std::string(file) == o.file; }
  std::string str() const { return short_path(file) + ":" + std::to_string(line) + " (in " + func + ")"; }
};

enum class Wait { kReady, kBlockBarrier, kWarpCollective, kDone };

struct Thread {
  FiberContext ctx;
  uint3 idx{};
  unsigned linear = 0;
  Wait wait = Wait::kReady;
  Site site;
  // a warp collective in progress
  bool shuffle = false;
  int src_lane = 0;
  bool xor_mode = false;
  uint64_t value = 0, result = 0;
};

// A shared-memory buffer of exactly `bytes`, aligned to exactly `align` (its address is an odd
// multiple of it: no accidental over-alignment hides a misaligned access), filled with 0xFF bytes
// (NaN in every float type, -1 in every integer) so that a read before a write shows. It ends where
// its allocation ends (AddressSanitizer sees an overflow); the padding before it is poisoned.
struct SharedBuffer {
  void* base = nullptr;
  void* ptr = nullptr;
  size_t bytes = 0, align = 1;
  SharedBuffer() = default;
  SharedBuffer(size_t b, size_t a) : bytes(b), align(std::max<size_t>(a, 1)) {
    base = ::operator new(bytes + align, std::align_val_t(2 * align));
    ptr = static_cast<char*>(base) + align;
    std::memset(ptr, 0xFF, bytes);
#if defined(__SANITIZE_ADDRESS__)
    ASAN_POISON_MEMORY_REGION(base, align);
#endif
  }
  SharedBuffer(SharedBuffer&& o) noexcept : base(o.base), ptr(o.ptr), bytes(o.bytes), align(o.align) {
    o.base = o.ptr = nullptr;
  }
  SharedBuffer& operator=(SharedBuffer&& o) noexcept {
    std::swap(base, o.base);
    std::swap(ptr, o.ptr);
    std::swap(bytes, o.bytes);
    std::swap(align, o.align);
    return *this;
  }
  ~SharedBuffer() {
    if (!base) return;
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(base, align);
#endif
    ::operator delete(base, std::align_val_t(2 * align));
  }
};

struct Launch {
  LaunchSite site;
  std::string kernel;
  dim3 grid, block;
  size_t shared_bytes;
  void (*body)(void*);
  void* ctx;
  FiberBackend backend;
};

struct BlockRun {
  const Launch* launch = nullptr;
  std::vector<Thread> threads;
  Thread* current = nullptr;
  FiberContext scheduler;
  std::map<const void*, SharedBuffer> statics;
  size_t static_bytes = 0;
  SharedBuffer dynamic;  // created by the first extern __shared__ declaration run in the block
  bool has_dynamic = false;
  std::string fault;  // set when a thread faulted
};

thread_local BlockRun* g_block = nullptr;

// Fiber stacks, kept between launches (one per thread of the largest block seen).
thread_local std::vector<std::unique_ptr<FiberStack>> g_stacks;

size_t stack_bytes() {
  const char* env = std::getenv("TORCHFAST_EMULATOR_STACK_KB");
  const size_t kb = env ? std::strtoul(env, nullptr, 10) : 0;
#if defined(__SANITIZE_ADDRESS__)
  return (kb ? kb : 512) * 1024;  // instrumented frames are larger
#else
  return (kb ? kb : 256) * 1024;
#endif
}

std::string where(const BlockRun& b) {
  std::ostringstream s;
  s << "kernel `" << b.launch->kernel << "` (launched at " << short_path(b.launch->site.file) << ":"
    << b.launch->site.line << "), block " << format_dim(blockIdx) << " of grid " << format_dim(b.launch->grid)
    << ", block size " << format_dim(b.launch->block);
  return s.str();
}

[[noreturn]] void kernel_error(const BlockRun& b, const std::string& what) {
  TORCH_CHECK(false, "torchfast CUDA emulator: ", what, " in ", where(b));
}

void thread_entry(void* p) {
  auto* t = static_cast<Thread*>(p);
  BlockRun& b = *g_block;
  fiber_started(b.scheduler);
  try {
    b.launch->body(b.launch->ctx);
  } catch (const std::exception& e) {
    b.fault = std::string("exception in device code: ") + e.what();
  } catch (...) {
    b.fault = "unknown exception in device code";
  }
  t->wait = Wait::kDone;
  fiber_switch(t->ctx, b.scheduler, b.launch->backend, /*exiting=*/true);
  std::abort();  // a finished fiber is never resumed
}

// Switches from the running thread back to the scheduler until the scheduler resumes it.
void yield_to_scheduler(Thread& t) {
  BlockRun& b = *g_block;
  fiber_switch(t.ctx, b.scheduler, b.launch->backend, /*exiting=*/false, &b.scheduler);
}

std::string thread_name(const Thread& t) { return "thread " + format_dim(t.idx); }

// Releases warp [w0, w0 + 32)'s collective when all its lanes wait at it; false when it cannot.
bool release_warp(BlockRun& b, unsigned w0) {
  const unsigned w1 = std::min(static_cast<unsigned>(b.threads.size()), w0 + kWarpSize);
  unsigned waiting = 0, done = 0;
  const Thread* first = nullptr;
  for (unsigned i = w0; i < w1; ++i) {
    const Thread& t = b.threads[i];
    if (t.wait == Wait::kWarpCollective) {
      ++waiting;
      if (!first) first = &t;
    }
    if (t.wait == Wait::kDone) ++done;
  }
  if (waiting == 0) return false;
  const std::string kind = first->shuffle ? "warp shuffle" : "__syncwarp";
  if (waiting + done == w1 - w0 && done > 0) {
    kernel_error(b, "warp " + std::to_string(w0 / kWarpSize) + ": " + std::to_string(done) +
                        " lanes exited while the others wait at the " + kind + " at " + first->site.str() +
                        " (a full-mask collective needs every lane)");
  }
  if (waiting != w1 - w0) return false;  // some lanes still run or wait at a block barrier
  for (unsigned i = w0; i < w1; ++i) {
    const Thread& t = b.threads[i];
    // __syncwarp may be reached from different call sites (sm_70+); a shuffle exchanges values, so
    // every lane must be in the same one.
    const bool same = t.shuffle == first->shuffle && (!t.shuffle || t.site == first->site);
    if (!same)
      kernel_error(b, "divergent warp collectives in warp " + std::to_string(w0 / kWarpSize) + ": lane " +
                          std::to_string(first->linear % kWarpSize) + " at " + first->site.str() + ", lane " +
                          std::to_string(t.linear % kWarpSize) + " at " + t.site.str());
  }
  for (unsigned i = w0; i < w1; ++i) {
    Thread& t = b.threads[i];
    if (t.shuffle) {
      const unsigned lane = t.linear % kWarpSize;
      // width 32: an index takes its low 5 bits; a butterfly past lane 31 returns the caller's value
      const unsigned src = t.xor_mode ? (lane ^ static_cast<unsigned>(t.src_lane))
                                      : (static_cast<unsigned>(t.src_lane) & (kWarpSize - 1));
      if (src >= kWarpSize) {
        t.result = t.value;
      } else if (w0 + src < w1) {
        t.result = b.threads[w0 + src].value;
      } else {
        t.result = ~uint64_t{0};  // a lane of a partial warp that does not exist: undefined (poison)
      }
    }
    t.wait = Wait::kReady;
  }
  return true;
}

bool release_any_warp(BlockRun& b) {
  bool any = false;
  for (unsigned w0 = 0; w0 < b.threads.size(); w0 += kWarpSize) any = release_warp(b, w0) || any;
  return any;
}

// Releases the block barrier when every thread waits at it, reporting divergence and deadlock;
// false when every thread has finished.
bool release_block_barrier(BlockRun& b) {
  const Thread* first = nullptr;
  const Thread* exited = nullptr;
  const Thread* at_warp = nullptr;
  unsigned waiting = 0;
  for (const Thread& t : b.threads) {
    if (t.wait == Wait::kBlockBarrier) {
      ++waiting;
      if (!first) first = &t;
    } else if (t.wait == Wait::kDone) {
      if (!exited) exited = &t;
    } else if (t.wait == Wait::kWarpCollective) {
      if (!at_warp) at_warp = &t;
    }
  }
  if (waiting == 0) {
    if (at_warp)
      kernel_error(b, "deadlock: " + thread_name(*at_warp) + " waits at the warp collective at " +
                          at_warp->site.str() + " for lanes that never arrive");
    return false;  // every thread has finished
  }
  if (at_warp)
    kernel_error(b, "deadlock: " + thread_name(*at_warp) + " waits at the warp collective at " + at_warp->site.str() +
                        " while " + thread_name(*first) + " waits at __syncthreads at " + first->site.str());
  if (exited)
    kernel_error(b, thread_name(*exited) + " exited while " + std::to_string(waiting) +
                        " threads wait at __syncthreads at " + first->site.str());
  for (const Thread& t : b.threads)
    if (!(t.site == first->site))
      kernel_error(b, "divergent __syncthreads: " + thread_name(*first) + " at " + first->site.str() + ", " +
                          thread_name(t) + " at " + t.site.str());
  for (Thread& t : b.threads) t.wait = Wait::kReady;
  return true;
}

void run_thread(BlockRun& b, Thread& t) {
  b.current = &t;
  threadIdx = t.idx;
  fiber_switch(b.scheduler, t.ctx, b.launch->backend, /*exiting=*/false);
  b.current = nullptr;
  if (!b.fault.empty()) kernel_error(b, b.fault + " (" + thread_name(t) + ")");
}

// Runs the ready threads of [begin, end) once each, in the schedule's order.
void run_ready(BlockRun& b, unsigned begin, unsigned end, Order order, std::mt19937_64& rng,
               std::vector<unsigned>& scratch) {
  scratch.clear();
  for (unsigned i = begin; i < end; ++i)
    if (b.threads[i].wait == Wait::kReady) scratch.push_back(i);
  if (order == Order::kDescending) std::reverse(scratch.begin(), scratch.end());
  if (order == Order::kRandom) std::shuffle(scratch.begin(), scratch.end(), rng);
  for (unsigned i : scratch) run_thread(b, b.threads[i]);
}

void run_block(BlockRun& b, Order order, std::mt19937_64& rng) {
  const unsigned n = static_cast<unsigned>(b.threads.size());
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.wait = Wait::kReady;
    t.shuffle = false;
    fiber_prepare(t.ctx, b.launch->backend, *g_stacks[i], &thread_entry, &t);
  }
  std::vector<unsigned> scratch;
  const bool warp_serial = order == Order::kWarpsAscending || order == Order::kWarpsDescending;
  std::vector<unsigned> warps;
  for (unsigned w0 = 0; w0 < n; w0 += kWarpSize) warps.push_back(w0);
  if (order == Order::kWarpsDescending) std::reverse(warps.begin(), warps.end());
  while (true) {
    if (warp_serial) {
      // each warp in turn runs on through its warp collectives up to __syncthreads (or its end)
      for (unsigned w0 : warps) {
        do {
          run_ready(b, w0, std::min(n, w0 + kWarpSize), Order::kAscending, rng, scratch);
        } while (release_warp(b, w0));
      }
    } else {
      run_ready(b, 0, n, order, rng, scratch);
      if (release_any_warp(b)) continue;
    }
    if (!release_block_barrier(b)) return;
  }
}

Thread& current_thread(const char* what) {
  TORCH_CHECK(g_block != nullptr && g_block->current != nullptr, "torchfast CUDA emulator: ", what,
              " called outside a kernel");
  return *g_block->current;
}

unsigned warp_lanes(const BlockRun& b, const Thread& t) {
  const unsigned n = static_cast<unsigned>(b.threads.size());
  const unsigned w0 = t.linear / kWarpSize * kWarpSize;
  return std::min(n, w0 + kWarpSize) - w0;
}

void check_full_mask(const char* what, unsigned mask, const Site& site) {
  const BlockRun& b = *g_block;
  const unsigned lanes = warp_lanes(b, *b.current);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full && mask != 0xffffffffu) {
    std::ostringstream s;
    s << what << " at " << site.str() << " with mask 0x" << std::hex << mask << ": only full-warp masks (0x" << full
      << ") are modelled";
    fault(s.str());
  }
}

}  // namespace

// ---- control ----------------------------------------------------------------------------------
void set_schedule(Order order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  g_order = order;
  g_seed = seed;
}

void set_device(const std::string& arch) {
  const auto& table = device_table();
  const auto it = table.find(arch);
  if (it == table.end()) {
    std::string known;
    for (const auto& kv : table) known += (known.empty() ? "" : ", ") + kv.first;
    TORCH_CHECK(false, "torchfast CUDA emulator: unknown device '", arch, "'; choose from ", known);
  }
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  g_device = it->second;
  g_max_dynamic_shared.clear();  // function attributes belong to a device's context
}

const cudaDeviceProp* device_properties() { return &g_device; }

std::string launch_stats_json() {
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  std::ostringstream s;
  s << "{";
  bool first = true;
  for (const auto& [site, st] : g_stats) {
    s << (first ? "" : ", ") << "\"";
    for (char c : site) s << (c == '"' || c == '\\' ? std::string("\\") + c : std::string(1, c));
    s << "\": {\"launches\": " << st.launches << ", \"blocks\": " << st.blocks << ", \"threads\": " << st.threads
      << "}";
    first = false;
  }
  s << "}";
  return s.str();
}

void reset_launch_stats() {
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  g_stats.clear();
}

// ---- faults and positions ---------------------------------------------------------------------
void fault(const std::string& message) {
  if (g_block == nullptr || g_block->current == nullptr) TORCH_CHECK(false, "torchfast CUDA emulator: ", message);
  BlockRun& b = *g_block;
  Thread& t = *b.current;
  b.fault = message;
  t.wait = Wait::kDone;
  fiber_switch(t.ctx, b.scheduler, b.launch->backend, /*exiting=*/true);
  std::abort();  // a faulted fiber is never resumed
}

std::string hex(uint64_t value) {
  std::ostringstream s;
  s << "0x" << std::hex << value;
  return s.str();
}

unsigned linear_thread() { return current_thread("threadIdx").linear; }

// ---- barriers ---------------------------------------------------------------------------------
void syncthreads(const char* file, int line, const char* func) {
  Thread& t = current_thread("__syncthreads");
  t.site = Site{file, line, func};
  t.wait = Wait::kBlockBarrier;
  yield_to_scheduler(t);
}

void syncwarp(const char* file, int line, const char* func, unsigned mask) {
  Thread& t = current_thread("__syncwarp");
  t.site = Site{file, line, func};
  check_full_mask("__syncwarp", mask, t.site);
  t.shuffle = false;
  t.wait = Wait::kWarpCollective;
  yield_to_scheduler(t);
}

uint64_t shuffle(const char* file, int line, const char* func, unsigned mask, uint64_t value, int src_lane,
                 bool xor_mode) {
  Thread& t = current_thread("__shfl_sync");
  t.site = Site{file, line, func};
  check_full_mask(xor_mode ? "__shfl_xor_sync" : "__shfl_sync", mask, t.site);
  t.shuffle = true;
  t.value = value;
  t.src_lane = src_lane;
  t.xor_mode = xor_mode;
  t.wait = Wait::kWarpCollective;
  yield_to_scheduler(t);
  t.shuffle = false;
  return t.result;
}

// ---- shared memory ----------------------------------------------------------------------------
void* static_shared(const void* tag, size_t bytes, size_t align, const char* name, const char* file, int line) {
  current_thread("__shared__");
  BlockRun& b = *g_block;
  auto it = b.statics.find(tag);
  if (it != b.statics.end()) return it->second.ptr;
  b.static_bytes += bytes;
  const std::string what = "static __shared__ `" + std::string(name) + "` at " + short_path(file) + ":" +
                           std::to_string(line) + " brings the block's static shared memory to " +
                           std::to_string(b.static_bytes) + " bytes";
  if (b.static_bytes > kStaticSharedLimit) fault(what + " (limit " + std::to_string(kStaticSharedLimit) + ")");
  const size_t optin = device_properties()->sharedMemPerBlockOptin;
  if (b.static_bytes + b.launch->shared_bytes > optin)
    fault(what + ", with the launch's " + std::to_string(b.launch->shared_bytes) +
          " dynamic bytes more than the device's opt-in limit of " + std::to_string(optin));
  return b.statics.emplace(tag, SharedBuffer(bytes, align)).first->second.ptr;
}

void* dynamic_shared(size_t align) {
  current_thread("extern __shared__");
  BlockRun& b = *g_block;
  if (!b.has_dynamic) {
    b.dynamic = SharedBuffer(b.launch->shared_bytes, align);
    b.has_dynamic = true;
  } else if (align > b.dynamic.align) {
    fault("extern __shared__ declared with alignment " + std::to_string(align) + " after one with " +
          std::to_string(b.dynamic.align));
  }
  return b.dynamic.ptr;
}

// ---- launch -----------------------------------------------------------------------------------
void run_grid(const LaunchSite& site, const void* kernel_key, dim3 grid, dim3 block, size_t shared_bytes,
              void (*body)(void*), void* ctx) {
  TORCH_CHECK(g_block == nullptr, "torchfast CUDA emulator: a kernel launched from device code (at ",
              short_path(site.file), ":", site.line, ")");
  Launch l{site, kernel_expression(site.text), grid, block, shared_bytes, body, ctx, fiber_backend_from_env()};
  const std::string at = "`" + l.kernel + "` at " + short_path(site.file) + ":" + std::to_string(site.line);
  const cudaDeviceProp props = *device_properties();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > static_cast<uint64_t>(props.maxThreadsPerBlock)) {
    set_launch_error(cudaErrorInvalidConfiguration, "launch of " + at + ": block " + format_dim(block) +
                                                        " (at most 1024 threads, 1024 x 1024 x 64)");
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    set_launch_error(cudaErrorInvalidConfiguration,
                     "launch of " + at + ": grid " + format_dim(grid) + " (x up to 2^31 - 1, y and z up to 65535)");
    return;
  }
  size_t limit = kDefaultDynamicLimit;
  {
    std::lock_guard<std::mutex> lock(g_settings_mutex);
    const auto it = g_max_dynamic_shared.find(kernel_key);
    if (it != g_max_dynamic_shared.end()) limit = static_cast<size_t>(it->second);
  }
  if (shared_bytes > limit || shared_bytes > props.sharedMemPerBlockOptin) {
    set_launch_error(cudaErrorInvalidValue,
                     "launch of " + at + ": " + std::to_string(shared_bytes) + " bytes of dynamic shared memory, " +
                         (shared_bytes > props.sharedMemPerBlockOptin
                              ? "more than the device's opt-in limit of " + std::to_string(props.sharedMemPerBlockOptin)
                              : "more than the kernel's limit of " + std::to_string(limit) +
                                    " (raise it with cudaFuncSetAttribute(kernel, "
                                    "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))"));
    return;
  }
  Order order;
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(g_settings_mutex);
    order = g_order;
    seed = g_seed;
    SiteStats& st = g_stats[short_path(site.file) + ":" + std::to_string(site.line) + " " + l.kernel];
    st.launches += 1;
    st.blocks += int64_t{grid.x} * grid.y * grid.z;
    st.threads += int64_t{grid.x} * grid.y * grid.z * static_cast<int64_t>(threads);
  }

  BlockRun b;
  b.launch = &l;
  b.threads.resize(threads);
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        b.threads[i].idx = uint3{x, y, z};
        b.threads[i].linear = i;
      }
  const size_t stack = stack_bytes();
  while (g_stacks.size() < threads || (!g_stacks.empty() && g_stacks[0]->size() < stack)) {
    if (!g_stacks.empty() && g_stacks[0]->size() < stack) g_stacks.clear();
    g_stacks.push_back(std::make_unique<FiberStack>(stack));
  }

  const dim3 saved_block_dim = blockDim, saved_grid_dim = gridDim;
  const uint3 saved_block_idx = blockIdx, saved_thread_idx = threadIdx;
  struct Restore {  // also when a fault throws
    const dim3 bd, gd;
    const uint3 bi, ti;
    ~Restore() {
      g_block = nullptr;
      blockDim = bd;
      gridDim = gd;
      blockIdx = bi;
      threadIdx = ti;
    }
  } restore{saved_block_dim, saved_grid_dim, saved_block_idx, saved_thread_idx};
  blockDim = block;
  gridDim = grid;
  g_block = &b;
  // Blocks run one at a time, in the schedule's order (ascending, reversed, or shuffled).
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::mt19937_64 block_rng(seed * 0x9E3779B97F4A7C15ull + 0x5851F42D4C957F2Dull);
  std::vector<uint64_t> block_order;
  if (order == Order::kRandom) {
    block_order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) block_order[i] = i;
    std::shuffle(block_order.begin(), block_order.end(), block_rng);
  }
  const bool reversed = order == Order::kDescending || order == Order::kWarpsDescending;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t linear = order == Order::kRandom ? block_order[k] : (reversed ? blocks - 1 - k : k);
    blockIdx = uint3{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                     static_cast<unsigned>(linear / (uint64_t{grid.x} * grid.y))};
    b.statics.clear();
    b.static_bytes = 0;
    b.dynamic = SharedBuffer();
    b.has_dynamic = false;
    // Each block its own stream of random orders, reproducible from the seed.
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + linear);
    run_block(b, order, rng);
  }
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    set_launch_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute " + std::to_string(attr) +
                                                " is not modelled by the emulator");
    return cudaErrorInvalidValue;
  }
  if (value < 0 || static_cast<size_t>(value) > device_properties()->sharedMemPerBlockOptin) {
    set_launch_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                                " bytes of dynamic shared memory exceed the device's opt-in limit of " +
                                                std::to_string(device_properties()->sharedMemPerBlockOptin));
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  g_max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  // Every kernel "was built" for the emulated device: its arch is the binary and PTX version.
  const cudaDeviceProp* p = device_properties();
  attr->ptxVersion = attr->binaryVersion = p->major * 10 + p->minor;
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  const auto it = g_max_dynamic_shared.find(kernel);
  attr->maxDynamicSharedSizeBytes = it == g_max_dynamic_shared.end() ? static_cast<int>(kDefaultDynamicLimit) : it->second;
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_returned_message = g_last_message;
  g_last_error = cudaSuccess;
  g_last_message.clear();
  return e;
}

const char* last_error_message() { return g_returned_message.c_str(); }

}  // namespace tf_emu

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
