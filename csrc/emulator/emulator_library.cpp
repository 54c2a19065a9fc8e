// The emulator library's control ops, beside the torchfast schemas it registers a second time under
// the torchfast_emu namespace (csrc/torchfast.cpp compiled with TORCHFAST_NAMESPACE=torchfast_emu):
// torchfast.testing.cuda_emulator calls these.
#include <torch/library.h>

#include <string>

#include "emulator/runtime.h"

namespace {

void set_schedule(const std::string& order, int64_t seed) {
  tf_emu::Order o;
  if (order == "ascending") {
    o = tf_emu::Order::kAscending;
  } else if (order == "descending") {
    o = tf_emu::Order::kDescending;
  } else if (order == "random") {
    o = tf_emu::Order::kRandom;
  } else if (order == "warps-ascending") {
    o = tf_emu::Order::kWarpsAscending;
  } else if (order == "warps-descending") {
    o = tf_emu::Order::kWarpsDescending;
  } else {
    TORCH_CHECK(false, "torchfast CUDA emulator: schedule must be 'ascending', 'descending', 'random', "
                "'warps-ascending' or 'warps-descending', got '", order, "'");
  }
  tf_emu::set_schedule(o, static_cast<uint64_t>(seed));
}

void set_device(const std::string& arch) { tf_emu::set_device(arch); }
std::string launch_stats() { return tf_emu::launch_stats_json(); }
void reset_launch_stats() { tf_emu::reset_launch_stats(); }

bool sanitized() {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchfast_emu, m) {
  m.def("_emulator_set_schedule(str order, int seed) -> ()", &set_schedule);
  m.def("_emulator_set_device(str arch) -> ()", &set_device);
  m.def("_emulator_launch_stats() -> str", &launch_stats);
  m.def("_emulator_reset_launch_stats() -> ()", &reset_launch_stats);
  m.def("_emulator_sanitized() -> bool", &sanitized);
}
