// Fibers for the emulator (see fiber.h).
#include "emulator/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define TF_EMU_ASAN 1
#else
#define TF_EMU_ASAN 0
#endif

#if defined(__x86_64__)
// tf_emu_switch_stack(void** save_sp, void* load_sp): pushes the callee-saved registers and the
// floating-point control state, stores the stack pointer in *save_sp, loads load_sp and pops the
// other context's state. A new context's stack is laid out by fiber_prepare so that the final
// `ret` enters tf_emu_fiber_trampoline with r12 = arg and r13 = entry.
asm(R"(
  .text
  .p2align 4
  .globl tf_emu_switch_stack
  .hidden tf_emu_switch_stack
  .type tf_emu_switch_stack,@function
tf_emu_switch_stack:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size tf_emu_switch_stack,.-tf_emu_switch_stack

  .p2align 4
  .globl tf_emu_fiber_trampoline
  .hidden tf_emu_fiber_trampoline
  .type tf_emu_fiber_trampoline,@function
tf_emu_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size tf_emu_fiber_trampoline,.-tf_emu_fiber_trampoline
)");
extern "C" void tf_emu_switch_stack(void** save_sp, void* load_sp);
extern "C" void tf_emu_fiber_trampoline();
#endif

namespace tf_emu {

FiberBackend fiber_backend_from_env() {
  const char* env = std::getenv("TORCHFAST_EMULATOR_FIBERS");
#if defined(__x86_64__)
  if (env == nullptr || std::strcmp(env, "asm") == 0 || *env == '\0') return FiberBackend::kAssembly;
  if (std::strcmp(env, "ucontext") == 0) return FiberBackend::kUcontext;
  throw std::invalid_argument(std::string("TORCHFAST_EMULATOR_FIBERS must be 'asm' or 'ucontext', got '") + env +
                              "'");
#else
  if (env != nullptr && std::strcmp(env, "asm") == 0)
    throw std::invalid_argument("TORCHFAST_EMULATOR_FIBERS=asm: the assembly fibers exist on x86-64 only");
  return FiberBackend::kUcontext;
#endif
}

FiberStack::FiberStack(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_ = (bytes + page - 1) / page * page;
  mapping_size_ = size_ + page;
  mapping_ = mmap(nullptr, mapping_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapping_ == MAP_FAILED) throw std::bad_alloc();
  mprotect(mapping_, page, PROT_NONE);  // the guard page: stacks grow down into it
  bottom_ = static_cast<char*>(mapping_) + page;
}

FiberStack::~FiberStack() {
#if TF_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(bottom_, size_);
#endif
  munmap(mapping_, mapping_size_);
}

namespace {

void ucontext_entry(unsigned hi_entry, unsigned lo_entry, unsigned hi_arg, unsigned lo_arg) {
  const auto join = [](unsigned hi, unsigned lo) { return (static_cast<uintptr_t>(hi) << 32) | lo; };
  auto entry = reinterpret_cast<void (*)(void*)>(join(hi_entry, lo_entry));
  entry(reinterpret_cast<void*>(join(hi_arg, lo_arg)));
  std::abort();  // entries never return
}

}  // namespace

void fiber_prepare(FiberContext& ctx, FiberBackend backend, FiberStack& stack, void (*entry)(void*), void* arg) {
#if TF_EMU_ASAN
  // The stack's previous fiber may have been abandoned mid-frame (a fault): its shadow is stale.
  ASAN_UNPOISON_MEMORY_REGION(stack.bottom(), stack.size());
#endif
  ctx.stack_bottom = stack.bottom();
  ctx.stack_size = stack.size();
  ctx.fake_stack = nullptr;
  if (backend == FiberBackend::kUcontext) {
    getcontext(&ctx.uc);
    ctx.uc.uc_stack.ss_sp = stack.bottom();
    ctx.uc.uc_stack.ss_size = stack.size();
    ctx.uc.uc_link = nullptr;
    const auto e = reinterpret_cast<uintptr_t>(entry), a = reinterpret_cast<uintptr_t>(arg);
    makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, static_cast<unsigned>(e >> 32),
                static_cast<unsigned>(e), static_cast<unsigned>(a >> 32), static_cast<unsigned>(a));
    return;
  }
#if defined(__x86_64__)
  // From the top: after the switch's final `ret`, rsp is 16-byte aligned, as a call site's is.
  auto top = (reinterpret_cast<uintptr_t>(stack.bottom()) + stack.size() - 64) & ~uintptr_t{15};
  uint64_t* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = reinterpret_cast<uint64_t>(&tf_emu_fiber_trampoline);  // ret target
  *--slot = 0;                                                      // rbp
  *--slot = 0;                                                      // rbx
  *--slot = reinterpret_cast<uint64_t>(arg);                        // r12
  *--slot = reinterpret_cast<uint64_t>(entry);                      // r13
  *--slot = 0;                                                      // r14
  *--slot = 0;                                                      // r15
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  uint64_t csr = mxcsr | (static_cast<uint64_t>(fpcw) << 32);
  *--slot = csr;  // mxcsr at 0(%rsp), the x87 control word at 4(%rsp)
  ctx.sp = slot;
#else
  (void)entry;
  (void)arg;
  std::abort();
#endif
}

void fiber_switch(FiberContext& from, FiberContext& to, FiberBackend backend, bool exiting,
                  FiberContext* resumed_from) {
#if TF_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &from.fake_stack, to.stack_bottom, to.stack_size);
#else
  (void)exiting;
#endif
  if (backend == FiberBackend::kUcontext) {
    swapcontext(&from.uc, &to.uc);
  } else {
#if defined(__x86_64__)
    tf_emu_switch_stack(&from.sp, to.sp);
#endif
  }
#if TF_EMU_ASAN
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(from.fake_stack, &bottom, &size);
  if (resumed_from != nullptr) {
    resumed_from->stack_bottom = bottom;
    resumed_from->stack_size = size;
  }
#else
  (void)resumed_from;
#endif
}

void fiber_started(FiberContext& started_from) {
#if TF_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &started_from.stack_bottom, &started_from.stack_size);
#else
  (void)started_from;
#endif
}

}  // namespace tf_emu
