// The CPU execution harness: runs the device kernels (kernels/*.cu, unchanged) on the
// host, so their logic is tested on machines without a GPU.
//
// A launch runs its blocks one after another. A block's threads are fibers
// on the calling OS thread, scheduled round-robin: each runs until it reaches a
// barrier, then yields. `__syncthreads()` releases when every live thread of the block
// has arrived; a warp shuffle writes the lane's value into its warp's exchange, waits
// for the warp's live lanes, reads its partner's, and waits again before the exchange
// can be reused. `__shared__` variables are per OS thread (`static thread_local`), so
// the fibers of a block share them; atomics are the compiler's atomics. A launch whose
// threads can make no progress (a barrier some thread never reaches) is reported as a
// deadlock instead of hanging.
#pragma once

#define PI_HARNESS 1

#include <math.h>
#include <cstdint>
#include <cstring>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#include <vector>
#include <memory>

#ifndef PI_WARP
#define PI_WARP 32
#endif

// Everything here has internal linkage: the harness is compiled once per warp width and
// the builds are linked into one library.
namespace {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace pi_harness {

struct Group {
  int live = 0;     // members not finished
  int arrived = 0;  // members waiting at the current barrier
  unsigned gen = 0; // barriers passed
};

// A fiber's saved context. On x86-64 a context switch saves the callee-saved registers
// on the stack being left (no signal-mask system call, unlike swapcontext); the FP
// control words are the host thread's for every fiber (kernels never change them), so
// they are not switched. Elsewhere it is a ucontext.
#if defined(__x86_64__)
struct Ctx {
  void* sp = nullptr;
};

__attribute__((naked, noinline)) static void ctx_switch(void** /*save*/, void* /*load*/) {
  asm volatile("pushq %rbp\n\t"
               "pushq %rbx\n\t"
               "pushq %r12\n\t"
               "pushq %r13\n\t"
               "pushq %r14\n\t"
               "pushq %r15\n\t"
               "movq %rsp, (%rdi)\n\t"
               "movq %rsi, %rsp\n\t"
               "popq %r15\n\t"
               "popq %r14\n\t"
               "popq %r13\n\t"
               "popq %r12\n\t"
               "popq %rbx\n\t"
               "popq %rbp\n\t"
               "ret\n\t");
}

inline void swap(Ctx& from, Ctx& to) { ctx_switch(&from.sp, to.sp); }

// A context that starts `entry` on the stack [base, base + bytes).
inline void make(Ctx& c, char* base, size_t bytes, void (*entry)()) {
  uintptr_t top = ((uintptr_t)(base + bytes)) & ~(uintptr_t)15;
  // After the 6 words below are popped and `ret` takes the entry address, rsp must be
  // 8 mod 16, as on entry to a called function.
  uint64_t* sp = (uint64_t*)(top - 64);
  for (int i = 0; i < 6; i++) sp[i] = 0; // r15 r14 r13 r12 rbx rbp
  sp[6] = (uint64_t)(uintptr_t)entry;
  c.sp = sp;
}
#else
struct Ctx {
  ucontext_t uc;
};
inline void swap(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
inline void make(Ctx& c, char* base, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Ctx ctx;
  dim3 thread_idx;
  int warp = 0, lane = 0;
  bool done = false;
};

struct Launch {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  Group block_group;
  std::vector<Group> warps;
  std::vector<double> exchange; // [warp][lane]
  Ctx scheduler;
  int current = -1;
  bool progress = false;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline thread_local Launch* cur = nullptr;

// The fibers' stacks, kept per host thread from launch to launch: allocated once,
// uninitialized (pages are touched only as deep as a kernel's frames go).
inline char* fiber_stack(size_t i, size_t bytes) {
  static thread_local std::vector<std::unique_ptr<char[]>> pool;
  while (pool.size() <= i) pool.emplace_back(new char[bytes]);
  return pool[i].get();
}

inline Fiber& me() { return cur->fibers[cur->current]; }

inline void yield() { swap(me().ctx, cur->scheduler); }

inline void release(Group& g) {
  g.arrived = 0;
  g.gen++;
  cur->progress = true;
}

inline void barrier(Group& g) {
  if (++g.arrived == g.live) {
    release(g);
    return;
  }
  unsigned gen = g.gen;
  while (g.gen == gen) yield();
}

inline Group& my_warp() { return cur->warps[me().warp]; }

template <typename T> inline T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= sizeof(double), "exchange slots are 8 bytes");
  Fiber& f = me();
  int w = f.warp, lane = f.lane;
  double slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  cur->exchange[w * PI_WARP + lane] = slot;
  barrier(cur->warps[w]);
  int src = lane ^ mask;
  // A lane past the block's end reads its own value (such lanes do not exist in the
  // kernels' launches: block sizes are multiples of the warp).
  size_t n_threads = cur->fibers.size();
  size_t src_idx = (size_t)w * PI_WARP + src;
  double got = src_idx < n_threads ? cur->exchange[src_idx] : slot;
  barrier(cur->warps[w]);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline void fiber_main() {
  Launch* l = cur;
  l->body(l->body_arg);
  Fiber& f = l->fibers[l->current];
  f.done = true;
  l->progress = true;
  // A finished thread leaves its block and warp: barriers wait for the others only.
  Group* groups[2] = {&l->block_group, &l->warps[f.warp]};
  for (Group* g : groups) {
    g->live--;
    if (g->arrived > 0 && g->arrived == g->live) release(*g);
  }
  swap(f.ctx, l->scheduler);
  __builtin_trap(); // a finished fiber is never resumed
}

// Runs body(arg) as every thread of every block of the launch. Returns 0, or -1 on a
// deadlock.
inline int run(dim3 grid, dim3 block, void (*body)(void*), void* arg) {
  const size_t stack_bytes = 256 * 1024;
  Launch l;
  l.grid = grid;
  l.block = block;
  l.body = body;
  l.body_arg = arg;
  size_t n = (size_t)block.x * block.y * block.z;
  size_t n_warps = (n + PI_WARP - 1) / PI_WARP;
  l.fibers.resize(n);
  l.warps.resize(n_warps);
  l.exchange.assign(n_warps * PI_WARP, 0.0);
  Launch* saved = cur;
  cur = &l;
  int rc = 0;
  for (unsigned bz = 0; bz < grid.z && rc == 0; bz++)
    for (unsigned by = 0; by < grid.y && rc == 0; by++)
      for (unsigned bx = 0; bx < grid.x && rc == 0; bx++) {
        l.block_idx = dim3{bx, by, bz};
        l.block_group = Group{(int)n, 0, 0};
        for (size_t w = 0; w < n_warps; w++) {
          size_t members = (w + 1) * PI_WARP <= n ? PI_WARP : n - w * PI_WARP;
          l.warps[w] = Group{(int)members, 0, 0};
        }
        for (size_t i = 0; i < n; i++) {
          Fiber& f = l.fibers[i];
          f.done = false;
          f.thread_idx = dim3{(unsigned)(i % block.x), (unsigned)((i / block.x) % block.y),
                              (unsigned)(i / ((size_t)block.x * block.y))};
          f.warp = (int)(i / PI_WARP);
          f.lane = (int)(i % PI_WARP);
          // Stack tops staggered by a few cache lines: tops 256 KiB apart would all
          // fall in the same cache sets.
          make(f.ctx, fiber_stack(i, stack_bytes), stack_bytes - (i % 61) * 320, fiber_main);
        }
        size_t remaining = n;
        while (remaining > 0) {
          l.progress = false;
          for (size_t i = 0; i < n; i++) {
            if (l.fibers[i].done) continue;
            l.current = (int)i;
            swap(l.scheduler, l.fibers[i].ctx);
            if (l.fibers[i].done) remaining--;
          }
          if (!l.progress && remaining > 0) {
            rc = -1; // every live thread waits at a barrier that cannot release
            break;
          }
        }
      }
  cur = saved;
  return rc;
}

} // namespace pi_harness
} // namespace

#define threadIdx (pi_harness::me().thread_idx)
#define blockIdx (pi_harness::cur->block_idx)
#define blockDim (pi_harness::cur->block)
#define gridDim (pi_harness::cur->grid)
#define __shared__ static thread_local
#define PI_SHFL_XOR(v, m) pi_harness::shfl_xor((v), (m))

static inline void __syncthreads() { pi_harness::barrier(pi_harness::cur->block_group); }

static inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline float atomicAdd(float* p, float v) {
  float old, want;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    want = old + v;
  } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED));
  return old;
}
