// A CUDA emulator for the tests: runs the project's unmodified CUDA kernels on the CPU.
//
// Design notes
// ------------
// Build. csrc/emu/emulator.py copies csrc/include and csrc/cuda, rewriting three constructs g++
// cannot parse (`k<<<cfg>>>(args)`, `__shared__` declarations, `__launch_bounds__`) with every
// line kept in place and `#line` directives, so reports name the original file and line, and
// compiles the copies with g++ against csrc/emu/cuda_runtime.h (the stand-in for the CUDA
// headers) together with this file and csrc/emu/shims.cpp (extern "C" entry points for ctypes),
// cached under build/emu/. Nothing here is in the wheel: setup.py compiles csrc/cpu and csrc/cuda.
//
// Execution. A launch checks its configuration against the device limits (below), then runs its
// blocks one at a time on the calling host thread, in order or (emu_set_shuffle) in a seeded
// random order. The CUDA threads of a block are fibers: a thread runs on its own stack (64 KiB
// of inaccessible addresses below it) until it reaches __syncthreads or a *_sync warp intrinsic,
// or returns, then switches back to the block's scheduler (emu_switch saves and restores the
// callee-saved registers, MXCSR and the x87 control word). A thread gets its stack when it first
// runs and gives it back when it returns, so threads that never synchronise share one hot stack.
// The scheduler runs every ready thread (in thread order, or shuffled again each round), and when
// none is left resolves what the others wait on:
//   * a warp intrinsic is released when every lane its mask names has reached the same intrinsic
//     (same operation, mask, width and call site) or has exited (the CUDA programming guide: "all
//     non-exited threads named in mask must execute the same intrinsic with the same mask");
//     its results follow PTX's rules for shfl.sync (source lane from the mode, the width's
//     segment mask and the clamp; a source out of range gives the lane its own value) and
//     vote.sync. A named lane waiting at another intrinsic or at __syncthreads is reported (a
//     deadlock on a GPU), so are a caller outside its own mask and a width that is not a power of
//     two in [1, 32]. A lane whose source lane takes no part (exited, missing from a partial
//     warp, outside the mask: undefined on a GPU) reads all-ones bits, a NaN for floats, so a
//     result that depends on it shows up as wrong.
//   * __syncthreads is released when every thread of the block waits at the same one; a thread
//     that exited while others wait (barrier divergence) or threads at different barriers are
//     reported.
// Threads run one at a time to their next synchronisation point, so a warp never executes in
// lockstep: code that relies on implicit warp synchrony, or reads shared memory another thread
// writes without a barrier in between, sees a stale value. Static shared memory is placed afresh
// in every block and filled with 0xff bytes (NaN), so such a missing barrier yields NaN or wrong
// values rather than a plausible leftover from the previous block.
//
// Reports. Every problem names the kernel instantiation, its launch site, the block and thread,
// and the file:line of the construct. Configuration errors and synchronisation errors fail the
// launch (cudaGetLastError returns the CUDA code; the report is kept for emu_take_report()), as a
// real launch fails or hangs. Faults end the process, as they poison a real CUDA context: while a
// launch runs, SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGABRT print the kernel, block and thread and the
// faulting code's file:line (addr2line on the pc and the frame-pointer chain), then the previous
// handler runs. Memory checks come from the compiler: every build checks the alignment of typed
// accesses (-fsanitize=alignment, so a misaligned 16-byte vector load is reported with its type
// and file:line), the "asan" build adds AddressSanitizer and UBSan; their reports are followed by
// the same kernel/block/thread line (a sanitizer death callback). emu_device_alloc gives memory
// with a 64 GiB inaccessible region below it, so an index that wrapped at 32 bits faults.
//
// Device limits checked (sm_90): block <= 1024 threads (x, y <= 1024, z <= 64), grid.x < 2^31,
// grid.y and grid.z <= 65535, no zero dimension, static + dynamic shared memory <= 48 KiB (the
// default without cudaFuncSetAttribute), blockDim <= the kernel's __launch_bounds__.
//
// Not emulated: timing and occupancy, concurrency between blocks and with the host (streams are
// ignored, launches are synchronous), the memory model beyond the orders above (no torn or
// reordered accesses, no caches), the GPU's math library (the kernels get glibc's; FMAs are
// written out, contraction is off in both builds: see README "Tests"), dynamic parallelism,
// cooperative groups, textures.
//
// x86-64 Linux only (the context switch is written in assembly).

#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA emulator runs on x86-64 Linux only (its context switch is x86-64 assembly)"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#define ASAN_POISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#endif

// The death callback is in every sanitizer runtime (this library always links UBSan's).
extern "C" void __sanitizer_set_death_callback(void (*)(void)) __attribute__((weak));

#define EMU_API extern "C" __attribute__((visibility("default")))

// ---- context switch ------------------------------------------------------------------------
// emu_switch(from, to): pushes the callee-saved registers and the floating-point control words,
// stores the stack pointer in *from, switches to the stack `to` and pops the same from it.
extern "C" void emu_switch(void** from, void* to) __attribute__((visibility("hidden")));
asm(R"(
  .text
  .globl emu_switch
  .hidden emu_switch
  .type emu_switch, @function
emu_switch:
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
  .size emu_switch, .-emu_switch
)");

namespace emu {

Builtins builtins;

namespace {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kMaxShared = 48 * 1024;
constexpr size_t kSharedRedzone = 32;   // poisoned gap between __shared__ variables (ASan)
constexpr size_t kPage = 4096;
constexpr size_t kStackGuard = 64 * 1024;  // inaccessible bytes below each thread's stack
constexpr size_t kDeviceGuard = size_t(1) << 36;  // inaccessible bytes below emu_device_alloc

enum class State : uint8_t { kReady, kWarp, kBlock, kExited };

struct Fiber {
  void* sp = nullptr;       // saved stack pointer while switched out
  char* stack = nullptr;    // lowest byte of the stack (kStackGuard inaccessible bytes below)
  uint3 idx{};
  unsigned linear = 0;
  State state = State::kReady;
  // The synchronisation the thread waits at (kWarp, kBlock).
  int op = 0;
  unsigned mask = 0;
  uint64_t value = 0;
  int b = 0;
  int width = 0;
  const char* file = "";
  int line = 0;
  uint64_t result = 0;
  void* fake_stack = nullptr;  // ASan's per-fiber fake stack
};

struct Emulator {
  std::mutex lock;          // one launch at a time in the process
  // options
  uint64_t shuffle_seed = 0;  // 0: threads and blocks in order
  size_t stack_bytes = size_t(EMU_ASAN ? 256 : 64) * 1024;
  // the launch being run
  bool running = false;
  std::string kernel;
  const Config* cfg = nullptr;
  Body body = nullptr;
  void* params = nullptr;
  unsigned n = 0;           // threads per block
  std::vector<Fiber> fibers;
  std::vector<unsigned> order;
  std::vector<char*> stacks;       // every thread stack (kept for the process's lifetime)
  std::vector<char*> free_stacks;  // those no thread of the running block holds
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  const void* sched_stack = nullptr;  // ASan: the scheduler's stack
  size_t sched_stack_size = 0;
  unsigned exited = 0;
  bool failed = false;
  std::mt19937_64 rng;
  // shared memory
  char* arena = nullptr;
  size_t shared_used = 0;
  uint64_t block_serial = 0;
  // results
  cudaError_t last_error = cudaSuccess;
  std::string report;
  uint64_t stats[3] = {0, 0, 0};  // launches, blocks, threads run
};
Emulator E;

std::string hex(unsigned x) {
  char buf[16];
  snprintf(buf, sizeof buf, "%08x", x);
  return buf;
}

const char* warp_name(int op) {
  static const char* const names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                      "__shfl_xor_sync", "__ballot_sync", "__any_sync",
                                      "__all_sync", "__syncwarp"};
  return names[op];
}
const char* block_name(int op) {
  static const char* const names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                      "__syncthreads_or"};
  return names[op];
}

// "... [with auto K = flm::multi_tensor_apply_kernel<flm::ScaleOp, float>; ...]" -> the kernel.
std::string kernel_name(const char* pretty) {
  const char* k = std::strstr(pretty, "K = ");
  if (!k) return pretty;
  std::string s(k + 4);
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<' || c == '(' || c == '[') ++depth;
    if (c == '>' || c == ')' || (c == ']' && depth > 0)) --depth;
    if (depth < 0 || (depth == 0 && c == ';')) return s.substr(0, i);
  }
  return s;
}

// "emu: kernel K (launched at file:line), block (x, y, z), thread (x, y, z)" (no thread: t null).
std::string where(const Fiber* t) {
  char buf[160];
  const Builtins& b = builtins;
  int k = snprintf(buf, sizeof buf, " (launched at %s:%d)", E.cfg->file, E.cfg->line);
  if (t)
    snprintf(buf + k, sizeof buf - k, ", block (%u, %u, %u), thread (%u, %u, %u)", b.block_idx.x,
             b.block_idx.y, b.block_idx.z, t->idx.x, t->idx.y, t->idx.z);
  return "emu: kernel " + E.kernel + buf;
}

// Records a problem of the running launch at thread `t` (nullptr: the launch as a whole) and
// fails the launch with `code`.
__attribute__((format(printf, 3, 4))) void fail(cudaError_t code, const Fiber* t, const char* f,
                                                ...) {
  char what[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(what, sizeof what, f, ap);
  va_end(ap);
  E.report += where(t) + ": " + what + "\n";
  if (!E.failed) E.last_error = code;
  E.failed = true;
}

// ---- fibers ----------------------------------------------------------------------------------

void yield(bool exiting) {
  Fiber& f = *E.cur;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, E.sched_stack,
                                 E.sched_stack_size);
#else
  (void)exiting;
#endif
  emu_switch(&f.sp, E.sched_sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &E.sched_stack, &E.sched_stack_size);
#endif
}

// Leaves the thread for good: it returned, or hit an error (its stack is reused by the next block).
[[noreturn]] void finish() {
  yield(true);
  __builtin_unreachable();
}

[[noreturn]] void fiber_main() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &E.sched_stack, &E.sched_stack_size);
#endif
  E.body(E.params);
  E.cur->state = State::kExited;
  ++E.exited;
  finish();
}

// A stack for a thread about to run for the first time: the one most recently released (still
// in cache: threads that never synchronise run one after the other on the same stack).
char* take_stack() {
  if (E.free_stacks.empty()) {
    char* m = static_cast<char*>(mmap(nullptr, kStackGuard + E.stack_bytes, PROT_NONE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (m == MAP_FAILED || mprotect(m + kStackGuard, E.stack_bytes, PROT_READ | PROT_WRITE)) {
      perror("emu: mmap of a thread stack");
      abort();
    }
    E.stacks.push_back(m + kStackGuard);
    return m + kStackGuard;
  }
  char* s = E.free_stacks.back();
  E.free_stacks.pop_back();
  return s;
}

// The first frame of a thread, popped by emu_switch: the control words, six zeroed registers,
// then `ret` enters fiber_main with the stack aligned as after a call (its return address null).
void start_fiber(Fiber& f) {
  f.stack = take_stack();
  ASAN_UNPOISON_MEMORY_REGION(f.stack, E.stack_bytes);
  void** sp = reinterpret_cast<void**>(f.stack + E.stack_bytes);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  uint32_t csr[2] = {0, 0};
  __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  *--sp = nullptr;
  std::memcpy(sp, csr, 8);
  f.sp = sp;
  f.fake_stack = nullptr;
}

void resume(Fiber& f) {
  if (!f.stack) start_fiber(f);
  E.cur = &f;
  builtins.thread_idx = f.idx;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, E.stack_bytes);
#endif
  emu_switch(&E.sched_sp, f.sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  E.cur = nullptr;
  ++E.stats[2];
  if (f.state == State::kExited) {
    E.free_stacks.push_back(f.stack);
    f.stack = nullptr;
  }
}

Fiber& current(const char* what) {
  if (!E.cur) {
    fprintf(stderr, "emu: %s called outside a kernel\n", what);
    abort();
  }
  return *E.cur;
}

// ---- synchronisation -----------------------------------------------------------------------

bool same_site(const Fiber& a, const Fiber& b) {
  return a.op == b.op && a.mask == b.mask && a.width == b.width && a.line == b.line &&
         std::strcmp(a.file, b.file) == 0;
}

// The source lane of `lane` in a shfl.sync of mode `op` (PTX ISA, shfl.sync): CUDA passes
// c = ((32 - width) << 8) | clamp, clamp = 0 for .up and 31 otherwise.
unsigned shfl_source(WarpOp op, unsigned lane, int b, int width) {
  const int seg = (kWarp - width) & 31;                 // c[12:8]
  const int clamp = op == WarpOp::kShflUp ? 0 : 31;     // c[4:0]
  const int bval = b & 31;
  const int l = int(lane);
  const int max_lane = (l & seg) | (clamp & ~seg);
  const int min_lane = l & seg;
  int j = l;
  bool in_range = false;
  switch (op) {
    case WarpOp::kShflUp: j = l - bval; in_range = j >= max_lane; break;
    case WarpOp::kShflDown: j = l + bval; in_range = j <= max_lane; break;
    case WarpOp::kShflXor: j = l ^ bval; in_range = j <= max_lane; break;
    default: j = min_lane | (bval & ~seg); in_range = j <= max_lane; break;
  }
  return in_range ? unsigned(j) : lane;
}

// A lane in the group of the warp intrinsic `f` waits at: named by its mask and waiting at the
// same intrinsic (lanes that exited, or do not exist in a partial warp, take no part).
bool member(const Fiber& f, const Fiber& g) { return g.state == State::kWarp && same_site(f, g); }

// Reports a lane that the mask of `f` names and that waits elsewhere (a deadlock on a GPU).
bool check_group(unsigned w0, unsigned lanes, const Fiber& f) {
  for (unsigned j = 0; j < lanes; ++j) {
    const Fiber& g = E.fibers[w0 + j];
    if (!(f.mask >> j & 1u) || g.state == State::kExited || member(f, g)) continue;
    const bool at_barrier = g.state == State::kBlock;
    fail(cudaErrorLaunchFailure, &f,
         "%s (%s:%d) with mask 0x%08x: lane %u (thread (%u, %u, %u)) waits at %s (%s:%d)%s",
         warp_name(f.op), f.file, f.line, f.mask, j, g.idx.x, g.idx.y, g.idx.z,
         at_barrier ? block_name(g.op) : warp_name(g.op), g.file, g.line,
         at_barrier ? " instead" : (" with mask 0x" + hex(g.mask)).c_str());
    return false;
  }
  return true;
}

// Completes the intrinsic `f` waits at for its group. A lane that reads the value of a lane
// outside the group (exited, missing, or not named in the mask: undefined on a GPU) gets all-ones
// bits, a NaN for floats.
void release_group(unsigned w0, unsigned lanes, const Fiber& f) {
  const WarpOp op = WarpOp(f.op);
  uint32_t group = 0, votes = 0;
  for (unsigned j = 0; j < lanes; ++j) {
    if ((f.mask >> j & 1u) && member(f, E.fibers[w0 + j])) {
      group |= 1u << j;
      if (E.fibers[w0 + j].value) votes |= 1u << j;
    }
  }
  uint64_t result[kWarp];
  for (unsigned j = 0; j < lanes; ++j) {
    if (!(group >> j & 1u)) continue;
    const Fiber& g = E.fibers[w0 + j];
    switch (op) {
      case WarpOp::kBallot: result[j] = votes; break;
      case WarpOp::kAny: result[j] = votes != 0; break;
      case WarpOp::kAll: result[j] = votes == group; break;
      case WarpOp::kSync: result[j] = 0; break;
      default: {
        const unsigned src = shfl_source(op, j, g.b, g.width);
        result[j] = (group >> src & 1u) ? E.fibers[w0 + src].value : ~uint64_t(0);
      }
    }
  }
  for (unsigned j = 0; j < lanes; ++j) {
    if (!(group >> j & 1u)) continue;
    E.fibers[w0 + j].result = result[j];
    E.fibers[w0 + j].state = State::kReady;
  }
}

// Called when no thread is ready: releases what can be released; false when the launch failed.
bool release() {
  bool progress = false;
  for (unsigned w0 = 0; w0 < E.n; w0 += kWarp) {
    const unsigned lanes = std::min(kWarp, E.n - w0);
    for (unsigned l = 0; l < lanes; ++l)
      if (E.fibers[w0 + l].state == State::kWarp && !check_group(w0, lanes, E.fibers[w0 + l]))
        return false;
    for (unsigned l = 0; l < lanes; ++l) {
      if (E.fibers[w0 + l].state != State::kWarp) continue;
      release_group(w0, lanes, E.fibers[w0 + l]);
      progress = true;
    }
  }
  if (progress) return true;
  // Every thread left waits at a __syncthreads (or has exited).
  const Fiber* first = nullptr;
  const Fiber* gone = nullptr;
  int count = 0;
  for (unsigned t = 0; t < E.n; ++t) {
    const Fiber& f = E.fibers[t];
    if (f.state == State::kExited) {
      gone = gone ? gone : &f;
      continue;
    }
    if (!first) first = &f;
    if (!same_site(*first, f)) {
      fail(cudaErrorLaunchFailure, &f,
           "waits at %s (%s:%d) while thread (%u, %u, %u) waits at %s (%s:%d): threads of a block "
           "must reach the same barrier",
           block_name(f.op), f.file, f.line, first->idx.x, first->idx.y, first->idx.z,
           block_name(first->op), first->file, first->line);
      return false;
    }
    count += f.value != 0;
  }
  if (gone) {
    fail(cudaErrorLaunchFailure, gone,
         "barrier divergence: this thread exited while %u threads wait at %s (%s:%d)",
         E.n - E.exited, block_name(first->op), first->file, first->line);
    return false;
  }
  const unsigned waiting = E.n - E.exited;
  for (unsigned t = 0; t < E.n; ++t) {
    Fiber& f = E.fibers[t];
    if (f.state != State::kBlock) continue;
    switch (BlockOp(f.op)) {
      case BlockOp::kCount: f.result = count; break;
      case BlockOp::kAnd: f.result = unsigned(count) == waiting; break;
      case BlockOp::kOr: f.result = count != 0; break;
      default: f.result = 0;
    }
    f.state = State::kReady;
  }
  return true;
}

// ---- fault reports ---------------------------------------------------------------------------

char g_addr2line[256];
constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
struct sigaction g_old_actions[5];
stack_t g_old_altstack;
char g_altstack[64 * 1024];

void put(const char* s) { (void)!write(2, s, strlen(s)); }

// file:line (with the inlining chain) of a code address, from addr2line on its object file.
void symbolize(const void* pc) {
  Dl_info info;
  char text[96];
  if (!dladdr(pc, &info) || !info.dli_fname) {
    snprintf(text, sizeof text, "    %p (no object file)\n", pc);
    return put(text);
  }
  snprintf(text, sizeof text, "0x%lx",
           static_cast<unsigned long>(static_cast<const char*>(pc) -
                                      static_cast<const char*>(info.dli_fbase)));
  if (!g_addr2line[0]) {
    put("    ");
    put(info.dli_fname);
    put("+");
    put(text);
    return put(" (install addr2line for file:line)\n");
  }
  const pid_t child = fork();
  if (child == 0) {
    dup2(2, 1);
    const char* argv[] = {"addr2line", "-C", "-f", "-i", "-p", "-e", info.dli_fname, text, nullptr};
    put("    ");
    execv(g_addr2line, const_cast<char**>(argv));
    _exit(127);
  }
  if (child > 0) waitpid(child, nullptr, 0);
}

void print_context(const char* what) {
  put("\n");
  if (E.running && E.cur) {
    put(where(E.cur).c_str());
  } else if (E.running) {
    put(where(nullptr).c_str());
    put(", in the emulator's scheduler");
  } else {
    put("emu: outside any kernel launch");
  }
  put(": ");
  put(what);
  put("\n");
}

void restore_handlers() {
  for (size_t i = 0; i < std::size(kSignals); ++i)
    sigaction(kSignals[i], &g_old_actions[i], nullptr);
  sigaltstack(&g_old_altstack, nullptr);
}

void on_fault(int sig, siginfo_t* info, void* ucontext) {
  char what[256];
  snprintf(what, sizeof what, "%s (fault address %p)", strsignal(sig), info->si_addr);
  print_context(what);
  const greg_t* regs = static_cast<ucontext_t*>(ucontext)->uc_mcontext.gregs;
  if (E.cur && reinterpret_cast<const char*>(regs[REG_RSP]) < E.cur->stack)
    put("emu: the thread's stack pointer is below its stack: a stack overflow (EMU_STACK_KB sets "
        "the stack size)\n");
  // The faulting pc, then the return addresses of the frame-pointer chain on the thread's stack.
  put("emu: at\n");
  symbolize(reinterpret_cast<const void*>(regs[REG_RIP]));
  if (E.cur) {
    const char* lo = E.cur->stack;
    const char* hi = lo + E.stack_bytes;
    auto fp = reinterpret_cast<void* const*>(regs[REG_RBP]);
    for (int depth = 0; depth < 8; ++depth) {
      const char* p = reinterpret_cast<const char*>(fp);
      if (p < lo || p + 16 > hi || !fp[1]) break;
      symbolize(static_cast<const char*>(fp[1]) - 1);
      fp = static_cast<void* const*>(fp[0]);
    }
  }
  // Returning re-executes the faulting instruction under the previous handler (which reports or
  // ends the process); abort() raises again by itself.
  restore_handlers();
}

void install_handlers() {
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = sizeof g_altstack;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa{};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (size_t i = 0; i < std::size(kSignals); ++i) sigaction(kSignals[i], &sa, &g_old_actions[i]);
}

void on_sanitizer_death() { print_context("the sanitizer report above"); }

__attribute__((constructor)) void init() {
  if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(&on_sanitizer_death);
  const char* path = getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (size_t start = 0; start <= dirs.size();) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    const std::string candidate = dirs.substr(start, end - start) + "/addr2line";
    if (candidate.size() < sizeof g_addr2line && access(candidate.c_str(), X_OK) == 0) {
      memcpy(g_addr2line, candidate.c_str(), candidate.size() + 1);
      break;
    }
    start = end + 1;
  }
  if (const char* kb = getenv("EMU_STACK_KB")) E.stack_bytes = size_t(atoi(kb)) * 1024;
}

// ---- blocks and launches ---------------------------------------------------------------------

void run_block(uint64_t linear_block) {
  const Config& c = *E.cfg;
  Builtins& b = builtins;
  b.block_idx = uint3{unsigned(linear_block % c.grid.x),
                      unsigned(linear_block / c.grid.x % c.grid.y),
                      unsigned(linear_block / (uint64_t(c.grid.x) * c.grid.y))};
  ++E.block_serial;
  ++E.stats[1];
  // Shared memory: dynamic at offset 0, static placed on first use (shared_place).
  ASAN_POISON_MEMORY_REGION(E.arena, kMaxShared);
  ASAN_UNPOISON_MEMORY_REGION(E.arena, c.smem);
  std::memset(E.arena, 0xff, c.smem);
  E.shared_used = c.smem;
  const dim3 bd = c.block;
  for (unsigned t = 0; t < E.n; ++t) {
    Fiber& f = E.fibers[t];
    f.idx = uint3{t % bd.x, t / bd.x % bd.y, t / (bd.x * bd.y)};
    f.linear = t;
    f.state = State::kReady;
    f.stack = nullptr;   // assigned when it first runs
  }
  E.free_stacks = E.stacks;  // threads of a failed block may still hold some
  E.exited = 0;
  for (unsigned t = 0; t < E.n; ++t) E.order[t] = t;
  for (;;) {
    if (E.shuffle_seed) std::shuffle(E.order.begin(), E.order.end(), E.rng);
    for (unsigned t : E.order) {
      if (E.fibers[t].state != State::kReady) continue;
      resume(E.fibers[t]);
      if (E.failed) return;
    }
    if (E.exited == E.n || !release()) return;
  }
}

cudaError_t check_config(const Config& c) {
  const dim3 g = c.grid, bl = c.block;
  const uint64_t threads = uint64_t(bl.x) * bl.y * bl.z;
  if (!g.x || !g.y || !g.z || !bl.x || !bl.y || !bl.z) {
    fail(cudaErrorInvalidConfiguration, nullptr,
         "invalid configuration: grid (%u, %u, %u), block (%u, %u, %u) has a zero dimension", g.x,
         g.y, g.z, bl.x, bl.y, bl.z);
  } else if (threads > kMaxBlockThreads || bl.x > 1024 || bl.y > 1024 || bl.z > 64) {
    fail(cudaErrorInvalidConfiguration, nullptr,
         "invalid configuration: block (%u, %u, %u) = %lu threads; at most 1024 threads, with "
         "x, y <= 1024 and z <= 64",
         bl.x, bl.y, bl.z, static_cast<unsigned long>(threads));
  } else if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    fail(cudaErrorInvalidConfiguration, nullptr,
         "invalid configuration: grid (%u, %u, %u); grid.x < 2^31, grid.y and grid.z <= 65535", g.x,
         g.y, g.z);
  } else if (c.smem > kMaxShared) {
    fail(cudaErrorInvalidValue, nullptr,
         "%zu bytes of dynamic shared memory; a block gets at most 48 KiB without "
         "cudaFuncSetAttribute (not emulated)",
         c.smem);
  }
  return E.failed ? E.last_error : cudaSuccess;
}

}  // namespace

void run_grid(const char* pretty, const Config& cfg, Body body, void* params) {
  static thread_local bool in_launch = false;
  if (in_launch) {  // a launch from a kernel (dynamic parallelism)
    fail(cudaErrorNotSupported, E.cur, "a kernel launch inside a kernel is not emulated");
    return;
  }
  std::lock_guard<std::mutex> guard(E.lock);
  in_launch = true;
  E.running = true;
  E.failed = false;
  E.kernel = kernel_name(pretty);
  E.cfg = &cfg;
  E.body = body;
  E.params = params;
  ++E.stats[0];
  if (check_config(cfg) == cudaSuccess) {
    E.n = cfg.block.x * cfg.block.y * cfg.block.z;
    if (E.fibers.size() < E.n) E.fibers.resize(E.n);
    E.order.resize(E.n);
    if (!E.arena) {
      char* m = static_cast<char*>(mmap(nullptr, kMaxShared + 2 * kPage, PROT_NONE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
      mprotect(m + kPage, kMaxShared, PROT_READ | PROT_WRITE);
      E.arena = m + kPage;
    }
    builtins.block_dim = cfg.block;
    builtins.grid_dim = cfg.grid;
    const uint64_t blocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
    // Shuffled block order: i -> (a * i + s) mod blocks with a coprime to blocks, a permutation.
    uint64_t a = 1, s = 0;
    if (E.shuffle_seed && blocks > 1) {
      do a = 1 + E.rng() % (blocks - 1); while (std::gcd(a, blocks) != 1);
      s = E.rng() % blocks;
    }
    install_handlers();
    for (uint64_t i = 0; i < blocks && !E.failed; ++i)
      run_block(static_cast<uint64_t>((static_cast<unsigned __int128>(a) * i + s) % blocks));
    restore_handlers();
  }
  E.running = false;
  in_launch = false;
}

void launch_bounds(long max_threads, long, long) {
  Fiber& f = current("__launch_bounds__");
  if (long(E.n) > max_threads) {
    fail(cudaErrorLaunchOutOfResources, &f,
         "launched with %u threads per block, over the kernel's __launch_bounds__(%ld)", E.n,
         max_threads);
    finish();
  }
}

uint64_t warp_sync(WarpOp op, unsigned mask, uint64_t value, int b, int width, const char* file,
                   int line) {
  Fiber& f = current("a warp intrinsic");
  const char* name = warp_name(int(op));
  const unsigned lane = f.linear % kWarp;
  if (!(mask >> lane & 1u)) {
    fail(cudaErrorLaunchFailure, &f, "%s (%s:%d): mask 0x%08x does not name the calling lane %u",
         name, file, line, mask, lane);
    finish();
  }
  if (width < 1 || width > int(kWarp) || (width & (width - 1))) {
    fail(cudaErrorLaunchFailure, &f, "%s (%s:%d): width %d is not a power of two in [1, 32]",
         name, file, line, width);
    finish();
  }
  f.state = State::kWarp;
  f.op = int(op);
  f.mask = mask;
  f.value = value;
  f.b = b;
  f.width = width;
  f.file = file;
  f.line = line;
  yield(false);
  return f.result;
}

int block_sync(BlockOp op, int predicate, const char* file, int line) {
  Fiber& f = current("__syncthreads");
  f.state = State::kBlock;
  f.op = int(op);
  f.mask = 0;
  f.width = 0;
  f.value = predicate != 0;
  f.file = file;
  f.line = line;
  yield(false);
  return int(f.result);
}

void* shared_place(SharedSlot& slot, size_t bytes, size_t align, const char* file, int line) {
  Fiber& f = current("__shared__");
  if (slot.block == E.block_serial) return slot.ptr;
  size_t off = E.shared_used ? E.shared_used + kSharedRedzone : 0;
  off = (off + align - 1) / align * align;
  if (off + bytes > kMaxShared) {
    fail(cudaErrorLaunchOutOfResources, &f,
         "__shared__ at %s:%d: %zu more bytes, %zu in all with %zu dynamic, over the 48 KiB a "
         "block may use",
         file, line, bytes, off + bytes, E.cfg->smem);
    finish();
  }
  char* p = E.arena + off;
  ASAN_UNPOISON_MEMORY_REGION(p, bytes);
  std::memset(p, 0xff, bytes);
  E.shared_used = off + bytes;
  slot.block = E.block_serial;
  slot.ptr = p;
  return p;
}

void* dynamic_shared() {
  current("extern __shared__");
  return E.arena;
}

}  // namespace emu

using emu::E;

cudaError_t cudaGetLastError() {
  const cudaError_t e = E.last_error;
  E.last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return E.last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

// ---- the interface for the tests (ctypes) ----------------------------------------------------

// The problems recorded since the last call ("" when none), one line each.
EMU_API const char* emu_take_report() {
  static std::string taken;
  taken.swap(E.report);
  E.report.clear();
  return taken.c_str();
}

// 0: threads and blocks run in order; otherwise the seed of a random order, drawn again for every
// round of every block.
EMU_API void emu_set_shuffle(uint64_t seed) {
  E.shuffle_seed = seed;
  E.rng.seed(seed);
}

// launches, blocks and thread resumptions since the library was loaded.
EMU_API void emu_stats(uint64_t out[3]) { std::memcpy(out, E.stats, sizeof E.stats); }

// `bytes` of zeroed "device memory" (256-byte aligned, as cudaMalloc's) with 64 GiB of inaccessible
// addresses below it and at least a page above: an index that wrapped at 32 bits, or ran past the
// end of the allocation, faults. Under ASan the slack after `bytes` is poisoned too.
EMU_API void* emu_device_alloc(size_t bytes) {
  using emu::kDeviceGuard;
  using emu::kPage;
  const size_t data = (bytes + kPage - 1) / kPage * kPage;
  char* m = static_cast<char*>(mmap(nullptr, kDeviceGuard + data + kPage, PROT_NONE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (m == MAP_FAILED) return nullptr;
  char* p = m + kDeviceGuard;
  if (data && mprotect(p, data, PROT_READ | PROT_WRITE) != 0) return nullptr;
  ASAN_POISON_MEMORY_REGION(p + bytes, data - bytes);
  return p;
}

EMU_API void emu_device_free(void* p, size_t bytes) {
  using emu::kDeviceGuard;
  using emu::kPage;
  const size_t data = (bytes + kPage - 1) / kPage * kPage;
  ASAN_UNPOISON_MEMORY_REGION(p, data);
  munmap(static_cast<char*>(p) - kDeviceGuard, kDeviceGuard + data + kPage);
}
