// Multi-tensor apply on the CPU: one parallel region per call over (tensor, chunk) pairs of the
// whole list. Launching one region per tensor costs a thread wake-up per tensor, which dominates
// for models with many small tensors; here every thread gets a contiguous run of chunks instead.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace torchfast {

struct CpuChunk {
  int64_t tensor;  // index into the op's tensor lists
  int64_t begin, end;
};

// 16K elements: large enough to amortise the per-chunk set-up, small enough to balance the threads.
constexpr int64_t kCpuChunkElems = 16384;

inline std::vector<CpuChunk> split_into_chunks(const std::vector<int64_t>& numels,
                                               int64_t chunk = kCpuChunkElems) {
  std::vector<CpuChunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t)
    for (int64_t b = 0; b < numels[t]; b += chunk)
      chunks.push_back({static_cast<int64_t>(t), b, std::min(numels[t], b + chunk)});
  return chunks;
}

// Calls f(std::true_type{}) or f(std::false_type{}): turns a runtime flag into a template argument
// (decltype(flag)::value), so that kernels carry no per-element branch on it.
template <typename F>
inline void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
inline void parallel_over_chunks(const std::vector<CpuChunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(chunks[i]);
  });
}

}  // namespace torchfast
