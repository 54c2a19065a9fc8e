// Fibers for the emulator's threads: user-space context switches on one OS thread.
//
// Two back ends: a hand-written x86-64 switch (saves the callee-saved registers, MXCSR and the x87
// control word; ~30-50 ns) and ucontext (portable; swapcontext makes a syscall each time, ~0.7 us).
// The x86-64 one is the default where it exists; TORCHFAST_EMULATOR_FIBERS=ucontext selects the
// other (read at each launch). Switches are announced to AddressSanitizer when it is on, and fiber
// stacks are unpoisoned before reuse.
#pragma once
#include <ucontext.h>

#include <cstddef>

namespace tf_emu {

enum class FiberBackend { kAssembly, kUcontext };

// The back end for the next launch: TORCHFAST_EMULATOR_FIBERS=ucontext|asm (asm where available).
FiberBackend fiber_backend_from_env();

struct FiberContext {
  void* sp = nullptr;  // kAssembly: the saved stack pointer
  ucontext_t uc{};     // kUcontext
  // AddressSanitizer bookkeeping: this context's stack and its fake stack while switched out.
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
  void* fake_stack = nullptr;
};

// A fiber stack: mmap'ed with a PROT_NONE guard page below it (an overflow faults at once).
class FiberStack {
 public:
  explicit FiberStack(size_t bytes);
  ~FiberStack();
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  void* bottom() const { return bottom_; }
  size_t size() const { return size_; }

 private:
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  void* bottom_ = nullptr;
  size_t size_ = 0;
};

// Makes `ctx` start entry(arg) on `stack` when first switched to. entry must never return: it ends
// with fiber_switch(..., exiting = true).
void fiber_prepare(FiberContext& ctx, FiberBackend backend, FiberStack& stack, void (*entry)(void*), void* arg);

// Saves the running context in `from` and continues `to`. `exiting`: `from` will never run again
// (its sanitizer fake stack is released). Returns when something switches back to `from`; the
// context that did is then recorded in *resumed_from's stack bounds if given.
void fiber_switch(FiberContext& from, FiberContext& to, FiberBackend backend, bool exiting,
                  FiberContext* resumed_from = nullptr);

// The first call of a fiber's entry: completes the switch that started it and records the stack
// of the context that switched to it (for switching back under AddressSanitizer).
void fiber_started(FiberContext& started_from);

}  // namespace tf_emu
