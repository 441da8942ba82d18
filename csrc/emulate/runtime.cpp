// Scheduler of the host emulation (cuda_emu.h): blocks one after another, each block's threads as
// fibers on the calling thread, switched only at __syncthreads() and warp shuffles, where the
// waiting thread hands over to the next one of the scheduling scan itself. Launches are
// serialized by a mutex (the kernels' __shared__ arrays are function statics here).
//
// Environment:
//   BN_CUDA_EMULATE_ORDER  "forward" (default: blocks in order, and in each scheduling pass over a
//                          block's waiting threads the lowest thread first) or "reverse". A thread
//                          runs until it waits, so with a barrier missing, a thread reads shared
//                          memory before another writes it in one of the two orders: forward catches
//                          a lower thread reading a higher one's slot, reverse the other way round.
//                          scripts/emulate.sh runs the suite in both.
//   BN_CUDA_EMULATE_SMS    multiprocessor count the planners see (default 132, an H100 / H200).
#include "cuda_emu.h"

#include <sys/mman.h>

// The fibers' context switch: 20 lines of assembly on x86-64 (no system call per switch), ucontext
// elsewhere or with -DBN_EMU_UCONTEXT (how tests/test_emulation.py checks that path too).
#if defined(__x86_64__) && !defined(BN_EMU_UCONTEXT)
#define BN_EMU_ASM_SWITCH 1
#else
#define BN_EMU_ASM_SWITCH 0
#endif

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if !BN_EMU_ASM_SWITCH
#include <ucontext.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace bn_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

#if BN_EMU_ASM_SWITCH
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save and
// resumes the context whose stack pointer is `load`. MXCSR and the x87 control word are not
// switched: every fiber runs on the launching thread with its control words, which the kernels
// never change (saving and reloading them took most of a switch's time).
extern "C" void bn_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl bn_emu_switch
  .hidden bn_emu_switch
  .type bn_emu_switch, @function
bn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bn_emu_switch, .-bn_emu_switch
)");
#endif

struct Fiber {
  char* stack = nullptr;  // kGuardBytes of PROT_NONE, then the stack
#if BN_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  uint3 tid{};
  int warp = 0;
  int lane = 0;
  bool done = false;
  enum { kRunning, kBlockBarrier, kWarpExchange } wait = kRunning;
  uint64_t gen = 0;       // the barrier generation it waits to see pass
  unsigned exchanges = 0;  // shuffles done: picks the slot bank (two banks, one barrier each)
};

struct Warp {
  int lanes = 0;
  int arrived = 0;
  int exited = 0;
  uint64_t gen = 0;
  uint64_t slot[2][32];
};

struct State {
  std::mutex mu;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int threads = 0;
  int live = 0;
  int arrived = 0;       // at the block barrier
  uint64_t gen = 0;      // block barrier generation
  uint64_t launches = 0;  // kernels launched (accepted launches), for the tests' kernel counts
  const char* site = nullptr;
  Fiber* cur = nullptr;
  // The block's scheduling scan (run_block): passes over its threads in order, each resuming the
  // ones that can go on; a thread that waits or exits hands over to the next one itself.
  unsigned scan = 0;      // position of the next thread to look at in this pass
  bool progress = false;  // some thread was resumed in this pass
  int done = 0;           // threads that exited
#if BN_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  bool failed = false;
  std::string message;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
};

State& st() {
  static State s;
  return s;
}

bool reverse_order();

// The next thread of the scan that can run: not exited, and not waiting for a barrier or a warp
// exchange that has not completed yet. A pass that resumed nobody while threads remain is a
// deadlock; null then, and when every thread exited.
Fiber* next_runnable() {
  State& s = st();
  const unsigned n = static_cast<unsigned>(s.threads);
  const bool rev = reverse_order();
  for (;;) {
    while (s.scan < n) {
      Fiber& f = s.fibers[rev ? n - 1 - s.scan : s.scan];
      ++s.scan;
      if (f.done) continue;
      if (f.wait == Fiber::kBlockBarrier) {
        if (s.gen == f.gen) continue;
      } else if (f.wait == Fiber::kWarpExchange) {
        if (s.warps[f.warp].gen == f.gen) continue;
      }
      s.progress = true;
      return &f;
    }
    if (s.done == s.threads || !s.progress) return nullptr;
    s.scan = 0;
    s.progress = false;
  }
}

// The current thread waits, exited or failed: switch straight to the next runnable thread (one
// context switch, not two through the scheduler), or back to the scheduler when there is none
// or the launch failed.
void hand_over() {
  State& s = st();
  Fiber& f = *s.cur;
  Fiber* g = s.failed ? nullptr : next_runnable();
  if (g == &f) {  // (cannot happen: it waits for others; kept for safety)
    f.wait = Fiber::kRunning;
    return;
  }
  if (g) {
    g->wait = Fiber::kRunning;
    s.cur = g;
    threadIdx = g->tid;
  }
#if BN_EMU_ASM_SWITCH
  bn_emu_switch(&f.sp, g ? g->sp : s.sched_sp);
#else
  swapcontext(&f.uc, g ? &g->uc : &s.sched_uc);
#endif
}

std::string thread_name(const Fiber& f) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "block (%u, %u, %u) thread (%u, %u, %u)", blockIdx.x, blockIdx.y, blockIdx.z,
                f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

// Records the failure and leaves the thread suspended for good; the launch is abandoned.
[[noreturn]] void fail(const std::string& what) {
  State& s = st();
  s.failed = true;
  s.message = what;
  hand_over();
  std::fprintf(stderr, "bn_cuda emulation: a failed thread was resumed\n");
  std::abort();
}

void thread_exited() {
  State& s = st();
  Fiber& f = *s.cur;
  f.done = true;
  --s.live;
  Warp& w = s.warps[f.warp];
  ++w.exited;
  if (s.arrived > 0)
    fail(thread_name(f) + " exited while " + std::to_string(s.arrived) + " thread(s) wait at __syncthreads() (" +
         s.site + ")");
  if (w.arrived > 0)
    fail(thread_name(f) + " exited while " + std::to_string(w.arrived) + " lane(s) of its warp wait in a shuffle");
}

[[noreturn]] void fiber_main() {
  State& s = st();
  s.body(s.ctx);
  thread_exited();
  ++s.done;
  hand_over();  // an exited thread is never resumed
  std::abort();
}

void start_fiber(Fiber& f, unsigned index) {
  const size_t color = (size_t(index) * 1088) % 16384;  // 64-byte steps over 16 KiB
  if (!f.stack) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "bn_cuda emulation: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, kGuardBytes, PROT_NONE);
    f.stack = static_cast<char*>(m);
  }
#if BN_EMU_ASM_SWITCH
  // The stacks are kStackBytes + kGuardBytes apart, so their tops would all fall in one cache set
  // and every switch would miss; each starts `color` bytes lower instead.
  char* top = f.stack + kGuardBytes + kStackBytes - color;
  // What bn_emu_switch pops: r15..rbp, then the return address (fiber_main), placed so that
  // fiber_main starts with the stack alignment of a called function.
  auto* ret = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(top) - 32) & ~uintptr_t(15));
  ret[0] = reinterpret_cast<uint64_t>(&fiber_main);
  ret[1] = 0;
  uint64_t* sp = ret - 6;
  for (int k = 0; k < 6; ++k) sp[k] = 0;
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack + kGuardBytes;
  f.uc.uc_stack.ss_size = kStackBytes - color;
  f.uc.uc_link = &st().sched_uc;
  makecontext(&f.uc, fiber_main, 0);
#endif
}

void resume(Fiber& f) {
  State& s = st();
  s.cur = &f;
  threadIdx = f.tid;
#if BN_EMU_ASM_SWITCH
  bn_emu_switch(&s.sched_sp, f.sp);
#else
  swapcontext(&s.sched_uc, &f.uc);
#endif
}

bool reverse_order() {
  static const bool rev = [] {
    const char* e = std::getenv("BN_CUDA_EMULATE_ORDER");
    return e && std::string(e) == "reverse";
  }();
  return rev;
}

std::string describe_deadlock() {
  State& s = st();
  std::string m = "deadlock in block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
                  std::to_string(blockIdx.z) + "): ";
  if (s.arrived > 0)
    m += std::to_string(s.arrived) + " of " + std::to_string(s.live) + " live threads wait at __syncthreads() (" +
         s.site + ")";
  for (size_t w = 0; w < s.warps.size(); ++w)
    if (s.warps[w].arrived > 0)
      m += "; " + std::to_string(s.warps[w].arrived) + " of 32 lanes of warp " + std::to_string(w) +
           " wait in a shuffle";
  return m;
}

// Runs one block to completion; false when it failed (s.message says why).
bool run_block(unsigned nthreads) {
  State& s = st();
  s.threads = s.live = static_cast<int>(nthreads);
  s.arrived = 0;
  s.site = nullptr;
  s.warps.assign((nthreads + 31) / 32, Warp{});
  for (size_t w = 0; w < s.warps.size(); ++w)
    s.warps[w].lanes = static_cast<int>(std::min<unsigned>(32, nthreads - 32 * static_cast<unsigned>(w)));
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.tid = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.warp = static_cast<int>(t / 32);
    f.lane = static_cast<int>(t % 32);
    f.done = false;
    f.wait = Fiber::kRunning;
    f.exchanges = 0;
    start_fiber(f, t);
  }
  s.scan = 0;
  s.progress = false;
  s.done = 0;
  Fiber* first = next_runnable();
  resume(*first);  // the threads hand over to each other until none can run
  if (s.failed) return false;
  if (s.done < s.threads) {
    s.failed = true;
    s.message = describe_deadlock();
    return false;
  }
  return true;
}

}  // namespace

cudaError_t get_last_error() {
  State& s = st();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

const char* last_message() { return st().last_message.c_str(); }

int sm_count() {
  static const int n = [] {
    const char* e = std::getenv("BN_CUDA_EMULATE_SMS");
    const int v = e ? std::atoi(e) : 0;
    return v > 0 ? v : 132;
  }();
  return n;
}

uint64_t launch_count() {
  State& s = st();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.launches;
}

void launch_impl(const Config& cfg, void (*body)(void*), void* ctx) {
  State& s = st();
  std::lock_guard<std::mutex> lock(s.mu);
  auto refuse = [&](cudaError_t e, const std::string& why) {
    s.last_error = e;
    s.last_message = why;
  };
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t nthreads = uint64_t(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    return refuse(cudaErrorInvalidConfiguration, "launch with grid (" + std::to_string(g.x) + ", " +
                                                     std::to_string(g.y) + ", " + std::to_string(g.z) +
                                                     "): out of CUDA's limits");
  if (nthreads == 0 || nthreads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
    return refuse(cudaErrorInvalidConfiguration, "launch with block (" + std::to_string(b.x) + ", " +
                                                     std::to_string(b.y) + ", " + std::to_string(b.z) +
                                                     "): out of CUDA's limits");
  if (cfg.smem > 48 * 1024)
    return refuse(cudaErrorInvalidConfiguration, "launch with " + std::to_string(cfg.smem) +
                                                     " bytes of dynamic shared memory");
  if (s.fibers.size() < nthreads) s.fibers.resize(nthreads);
  ++s.launches;
  s.body = body;
  s.ctx = ctx;
  s.failed = false;
  gridDim = g;
  blockDim = b;
  const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t id = reverse_order() ? blocks - 1 - k : k;
    blockIdx = uint3{static_cast<unsigned>(id % g.x), static_cast<unsigned>((id / g.x) % g.y),
                     static_cast<unsigned>(id / (uint64_t(g.x) * g.y))};
    if (!run_block(static_cast<unsigned>(nthreads))) {
      return refuse(cudaErrorLaunchFailure, s.message);
    }
  }
}

void syncthreads(const char* site) {
  State& s = st();
  Fiber& f = *s.cur;
  if (s.live < s.threads)
    fail(thread_name(f) + " reached __syncthreads() (" + site + ") after " + std::to_string(s.threads - s.live) +
         " thread(s) of its block exited");
  if (s.arrived == 0) {
    s.site = site;
  } else if (std::strcmp(site, s.site) != 0) {
    fail(thread_name(f) + " reached __syncthreads() at " + site + " while " + std::to_string(s.arrived) +
         " thread(s) wait at " + s.site);
  }
  f.gen = s.gen;
  if (++s.arrived == s.live) {  // the last one releases the others and goes on
    s.arrived = 0;
    ++s.gen;
    return;
  }
  f.wait = Fiber::kBlockBarrier;
  hand_over();
}

uint64_t shfl_down_bits(uint64_t bits, unsigned delta, unsigned mask, int width) {
  State& s = st();
  Fiber& f = *s.cur;
  Warp& w = s.warps[f.warp];
  if (mask != 0xffffffffu || width != 32)
    fail(thread_name(f) + ": the emulation shuffles whole warps only (mask 0xffffffff, width 32)");
  if (w.lanes != 32) fail(thread_name(f) + ": full-mask shuffle in a warp of " + std::to_string(w.lanes) + " threads");
  if (w.exited > 0)
    fail(thread_name(f) + ": full-mask shuffle after " + std::to_string(w.exited) + " lane(s) of its warp exited");
  const unsigned bank = f.exchanges++ & 1u;
  w.slot[bank][f.lane] = bits;
  f.gen = w.gen;
  if (++w.arrived == w.lanes) {
    w.arrived = 0;
    ++w.gen;
  } else {
    f.wait = Fiber::kWarpExchange;
    hand_over();
  }
  // A lane can post into this bank again only after the next exchange completed, which needs
  // every lane of the warp, this one included, to have read here first.
  const unsigned src = static_cast<unsigned>(f.lane) + delta;
  return src < 32 ? w.slot[bank][src] : bits;
}

}  // namespace bn_emu
