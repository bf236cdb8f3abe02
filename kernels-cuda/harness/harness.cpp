// The kernels compiled for the CPU execution harness, behind one C entry point with
// cuLaunchKernel's calling convention: a kernel name, the grid and block, and an array
// of pointers to the arguments.
#include "harness.h"

// The entry point's name, one per warp width this file is compiled for.
#ifndef PI_ENTRY
#define PI_ENTRY pi_harness_launch_w32
#endif

#include "../kernels/kernels.cu"

#include <cstring>
#include <utility>

namespace {

template <typename... A> struct Call {
  void (*kernel)(A...);
  void** args;
};

template <typename... A, size_t... I>
void invoke(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<A*>(args[I])...);
}

template <typename... A> void body(void* p) {
  auto* c = static_cast<Call<A...>*>(p);
  invoke(c->kernel, c->args, std::index_sequence_for<A...>{});
}

template <typename... A> int launch(void (*kernel)(A...), dim3 g, dim3 b, void** args) {
  Call<A...> c{kernel, args};
  return pi_harness::run(g, b, &body<A...>, &c);
}

} // namespace

// 0: done; -1: deadlock (a barrier some thread never reached); -2: unknown kernel;
// -3: a zero or oversized dimension.
extern "C" int PI_ENTRY(const char* name, const unsigned* grid,
                                 const unsigned* block, void** args) {
  dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
  unsigned long threads = (unsigned long)b.x * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0 || threads > 1024) return -3;
#define PI_DISPATCH(k)                                                                     \
  if (std::strcmp(name, #k) == 0) return launch(k, g, b, args);
  PI_KERNEL_LIST(PI_DISPATCH)
#undef PI_DISPATCH
  return -2;
}

// The warp width this build of the harness runs the kernels with.

