// Host emulation of the CUDA subset used by csrc/cuda/*.cu, so that their arithmetic, indexing,
// launch planning and reductions can be tested by a plain C++ compiler on machines without a
// GPU (tests/test_cpp_ext.py, backend "emulated"). Never part of the extension build.
//
// Compile each .cu as C++ with MPO_CUDA_HOST_EMULATION defined and this header force-included
// (`g++ -x c++ -DMPO_CUDA_HOST_EMULATION -include host_emulation.h`); the harness that links them
// defines the few CUDA runtime calls the launchers make (cudaGetLastError, cudaGetDevice,
// cudaDeviceGetAttribute, cudaMemsetAsync) for an emulated device. Everything runs on the
// calling thread: blocks one after another, the threads of a block as ucontext fibers that
// switch at barriers, so __syncthreads is a barrier over the block's fibers and __shfl_xor_sync
// a two-phase exchange through a per-warp buffer. __shared__ variables become function statics
// (one block at a time shares them). A thread that returns leaves its barriers, as on a GPU.
#pragma once

#ifndef MPO_CUDA_HOST_EMULATION
#error "define MPO_CUDA_HOST_EMULATION before including host_emulation.h"
#endif

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

namespace mpo_emu {

// One emulated CUDA thread: a cooperative fiber (its stack belongs to the launch).
struct Fiber {
  ucontext_t context;
  dim3 thread_idx;
  unsigned linear_tid = 0;
  bool done = false;
};

// A barrier among `expected` fibers; a finished fiber leaves it for good, as on a GPU.
struct Barrier {
  unsigned expected, arrived = 0;
  unsigned long generation = 0;
};

struct Block {
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<float> lanes;
  std::vector<float> dynamic_smem;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* running = nullptr;
  std::function<void()> body;
};

inline Block* current_block = nullptr;  // the block running now (blocks run one at a time)
inline unsigned long progress = 0;      // arrivals, releases and exits: a pass without any is a deadlock
constexpr size_t kStackBytes = 64 * 1024;

inline void yield() {
  Block& b = *current_block;
  swapcontext(&b.running->context, &b.scheduler);
}

inline void leave(Barrier& bar) {
  ++progress;
  --bar.expected;
  if (bar.arrived > 0 && bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
  }
}

inline void arrive_and_wait(Barrier& bar) {
  ++progress;
  const unsigned long generation = bar.generation;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
    return;
  }
  while (bar.generation == generation) yield();
}

inline void fiber_entry() {
  Block& b = *current_block;
  b.body();
  b.running->done = true;
  leave(b.warps[b.running->linear_tid / 32]);
  leave(b.all);
  swapcontext(&b.running->context, &b.scheduler);  // never resumed
}

}  // namespace mpo_emu

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { mpo_emu::arrive_and_wait(mpo_emu::current_block->all); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  mpo_emu::Block& b = *mpo_emu::current_block;
  const unsigned tid = b.running->linear_tid, warp = tid / 32, lane = tid % 32;
  b.lanes[warp * 32 + lane] = v;
  mpo_emu::arrive_and_wait(b.warps[warp]);
  const float out = b.lanes[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  mpo_emu::arrive_and_wait(b.warps[warp]);
  return out;
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

namespace mpo_emu {

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(current_block->dynamic_smem.data());
}

// Runs kernel<<<grid, block, smem>>>(args...) on the calling thread: blocks one after another,
// the threads of a block as fibers switched at barriers and shuffles (round robin).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    const unsigned threads = block.x * block.y * block.z;
    const unsigned warps = (threads + 31) / 32;
    blockDim = block;
    gridDim = grid;
    std::vector<std::unique_ptr<char[]>> stacks(threads);
    for (auto& stack : stacks) stack.reset(new char[kStackBytes]);  // uninitialized: no memset
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Block b;
          b.all.expected = threads;
          for (unsigned w = 0; w < warps; ++w) b.warps.push_back(Barrier{std::min(32u, threads - 32 * w)});
          b.lanes.assign(32 * warps, 0.0f);
          b.dynamic_smem.assign((smem + sizeof(float) - 1) / sizeof(float), 0.0f);
          b.body = [&] { kernel(args...); };
          b.fibers.resize(threads);
          blockIdx = dim3(bx, by, bz);
          current_block = &b;
          for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = b.fibers[t];
            f.linear_tid = t;
            f.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            getcontext(&f.context);
            f.context.uc_stack.ss_sp = stacks[t].get();
            f.context.uc_stack.ss_size = kStackBytes;
            f.context.uc_link = nullptr;
            makecontext(&f.context, fiber_entry, 0);
          }
          for (unsigned live = threads; live > 0;) {
            const unsigned long before = progress;
            live = 0;
            for (Fiber& f : b.fibers) {
              if (f.done) continue;
              b.running = &f;
              threadIdx = f.thread_idx;
              swapcontext(&b.scheduler, &f.context);
              live += !f.done;
            }
            if (live > 0 && progress == before) {
              std::fprintf(stderr, "host_emulation: deadlock in block (%u,%u,%u): %u threads wait forever\n", bx,
                           by, bz, live);
              std::abort();
            }
          }
          current_block = nullptr;
        }
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  return {kernel, grid, block, smem};
}

}  // namespace mpo_emu

#define MPO_LAUNCH(grid, block, smem, stream, ...) ::mpo_emu::launch(__VA_ARGS__, grid, block, smem)

