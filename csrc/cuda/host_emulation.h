// Host emulation of the CUDA subset used by csrc/cuda/*.cu, so that their arithmetic, indexing,
// launch planning, reductions and barriers can be tested by a plain C++ compiler on machines
// without a GPU (tests/test_cpp_ext.py, backend "emulated"). Never part of the extension build.
//
// Compile each .cu as C++ with MPO_CUDA_HOST_EMULATION defined and this header force-included
// (`g++ -x c++ -DMPO_CUDA_HOST_EMULATION -include host_emulation.h`), after rewriting every static
// shared array `__shared__ T name[dims];` to `MPO_EMU_SHARED(T, name, [dims]);` (the harness in
// tests/test_cpp_ext.py does it; a `__shared__` left over is a compile error). The harness that
// links them defines the few CUDA runtime calls the launchers make (cudaGetLastError,
// cudaGetDevice, cudaDeviceGetAttribute, cudaMemsetAsync) for an emulated device.
//
// Everything runs on the calling thread, but adversarially, so that a missing barrier or a read
// of shared memory nobody wrote shows up as a wrong result instead of passing by luck:
// - up to kResidentBlocks blocks are resident at once and their threads interleave; blocks start
//   in a random order;
// - each thread is a ucontext fiber that runs until it reaches a barrier (__syncthreads, or the
//   warp-level exchange of __shfl_xor_sync) or returns. The scheduler runs passes over the live
//   fibers of all resident blocks in a fresh random order; in every other pass each fiber runs
//   only with probability 1/2, so warps drift apart between barriers;
// - when a __syncthreads releases a block of several warps, one of its warps is frozen with
//   probability 1/2: it does not run until the other warps can make no progress without it, so
//   they run as far ahead as the barriers let them (shared memory reused too early shows);
// - every block's shared memory, static and dynamic, starts filled with 0xFF bytes (NaN as
//   float, half and bfloat16) and is private to the block.
// The random choices come from one generator seeded by $MPO_EMU_SEED (default 0x5EED), so a run
// is reproducible. A thread that returns leaves its barriers, as on a GPU; a full pass in which
// no fiber makes progress is a deadlock and aborts.
#pragma once

#ifndef MPO_CUDA_HOST_EMULATION
#error "define MPO_CUDA_HOST_EMULATION before including host_emulation.h"
#endif

#define __shared__ MPO_EMU_static_shared_array_not_rewritten_to_MPO_EMU_SHARED
#define __launch_bounds__(...)

#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <unordered_map>
#include <vector>

namespace mpo_emu {

struct Block;

// One emulated CUDA thread: a cooperative fiber (its stack belongs to the launch).
struct Fiber {
  ucontext_t context;
  dim3 thread_idx;
  unsigned linear_tid = 0;
  bool done = false;
  Block* block = nullptr;
};

// A barrier among `expected` fibers; a finished fiber leaves it for good, as on a GPU.
struct Barrier {
  unsigned expected, arrived = 0;
  unsigned long generation = 0;
};

constexpr unsigned char kUninitialized = 0xFF;  // every byte of fresh shared memory (a NaN)

struct Block {
  dim3 idx;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<float> lanes;
  std::unique_ptr<unsigned char[]> dynamic_smem;
  std::unordered_map<const void*, std::unique_ptr<unsigned char[]>> static_smem;
  std::vector<Fiber> fibers;
  std::function<void()> body;
  unsigned live = 0;
  int frozen_warp = -1;  // a warp held back until the others stall (-1: none)
};

inline Block* current_block = nullptr;  // the block of the running fiber
inline Fiber* running = nullptr;        // the running fiber
inline ucontext_t scheduler;            // where fibers return to
inline unsigned long progress = 0;      // arrivals, releases and exits: a full pass without any is a deadlock
constexpr size_t kStackBytes = 64 * 1024;
constexpr unsigned kResidentBlocks = 3;

inline std::mt19937_64& rng() {
  static std::mt19937_64 generator([] {
    const char* seed = std::getenv("MPO_EMU_SEED");
    return seed != nullptr ? std::strtoull(seed, nullptr, 0) : 0x5EEDull;
  }());
  return generator;
}

inline void yield() { swapcontext(&running->context, &scheduler); }

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
    Block& b = *running->block;
    if (&bar == &b.all && b.warps.size() > 1 && rng()() % 2 == 0)
      b.frozen_warp = static_cast<int>(rng()() % b.warps.size());
  }
  // Yield even when this arrival released the barrier: the order after a barrier is the scheduler's.
  do yield();
  while (bar.generation == generation);
}

inline void fiber_entry() {
  Fiber& f = *running;
  Block& b = *f.block;
  b.body();
  f.done = true;
  leave(b.warps[f.linear_tid / 32]);
  leave(b.all);
  swapcontext(&f.context, &scheduler);  // never resumed
}

// The calling block's copy of the static shared array whose declaration owns `key`.
template <typename A>
A& static_shared(const void* key) {
  std::unique_ptr<unsigned char[]>& slot = current_block->static_smem[key];
  if (!slot) {
    slot.reset(new unsigned char[sizeof(A)]);
    std::memset(slot.get(), kUninitialized, sizeof(A));
  }
  return *reinterpret_cast<A*>(slot.get());
}

}  // namespace mpo_emu

// `__shared__ T name[dims];` in a kernel, rewritten by the harness: a per-block array.
#define MPO_EMU_SHARED(T, name, dims)        \
  static const char name##_mpo_emu_key = 0; \
  T(&name) dims = ::mpo_emu::static_shared<T dims>(&name##_mpo_emu_key)

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { mpo_emu::arrive_and_wait(mpo_emu::current_block->all); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  mpo_emu::Block& b = *mpo_emu::current_block;
  const unsigned tid = mpo_emu::running->linear_tid, warp = tid / 32, lane = tid % 32;
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
  return reinterpret_cast<T*>(current_block->dynamic_smem.get());
}

// Runs kernel<<<grid, block, smem>>>(args...) on the calling thread (see the top of this file).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    const unsigned threads = block.x * block.y * block.z;
    const unsigned warps = (threads + 31) / 32;
    const unsigned total = grid.x * grid.y * grid.z;
    blockDim = block;
    gridDim = grid;
    std::mt19937_64& random = rng();
    std::vector<unsigned> order(total);
    for (unsigned i = 0; i < total; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), random);

    const unsigned slots = std::min(total, kResidentBlocks);
    std::vector<std::unique_ptr<char[]>> stacks(static_cast<size_t>(slots) * threads);
    for (auto& stack : stacks) stack.reset(new char[kStackBytes]);  // uninitialized: no memset
    std::vector<std::unique_ptr<Block>> resident(slots);
    unsigned started = 0, finished = 0;

    auto start = [&](unsigned slot) {
      const unsigned i = order[started++];
      auto b = std::make_unique<Block>();
      b->idx = dim3(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
      b->all.expected = b->live = threads;
      for (unsigned w = 0; w < warps; ++w) b->warps.push_back(Barrier{std::min(32u, threads - 32 * w)});
      b->lanes.assign(32 * warps, 0.0f);
      b->dynamic_smem.reset(new unsigned char[smem + 16]);
      std::memset(b->dynamic_smem.get(), kUninitialized, smem + 16);
      b->body = [&] { kernel(args...); };
      b->fibers.resize(threads);
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = b->fibers[t];
        f.linear_tid = t;
        f.block = b.get();
        f.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = stacks[static_cast<size_t>(slot) * threads + t].get();
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = nullptr;
        makecontext(&f.context, fiber_entry, 0);
      }
      resident[slot] = std::move(b);
    };
    for (unsigned s = 0; s < slots; ++s) start(s);

    std::vector<Fiber*> pass;
    std::bernoulli_distribution coin(0.5);
    for (bool full = true; finished < total; full = !full) {
      pass.clear();
      for (auto& b : resident)
        if (b)
          for (Fiber& f : b->fibers)
            if (!f.done) pass.push_back(&f);
      std::shuffle(pass.begin(), pass.end(), random);
      const unsigned long before = progress;
      bool frozen = false;
      for (auto& b : resident) frozen |= b && b->frozen_warp >= 0;
      for (Fiber* f : pass) {
        if (!full && coin(random)) continue;
        Block& b = *f->block;
        if (static_cast<int>(f->linear_tid / 32) == b.frozen_warp) continue;
        current_block = &b;
        running = f;
        threadIdx = f->thread_idx;
        blockIdx = b.idx;
        swapcontext(&scheduler, &f->context);
        b.live -= f->done;
      }
      if (frozen && progress == before) {  // the others wait for a frozen warp: let it run
        for (auto& b : resident)
          if (b) b->frozen_warp = -1;
        full = false;  // the next pass is a full one
        continue;
      }
      if (full && progress == before) {
        std::fprintf(stderr, "host_emulation: deadlock: %zu threads of resident blocks wait forever\n", pass.size());
        std::abort();
      }
      for (unsigned s = 0; s < slots; ++s)
        if (resident[s] && resident[s]->live == 0) {
          resident[s].reset();
          ++finished;
          if (started < total) start(s);
        }
    }
    current_block = nullptr;
    running = nullptr;
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  return {kernel, grid, block, smem};
}

}  // namespace mpo_emu

#define MPO_LAUNCH(grid, block, smem, stream, ...) ::mpo_emu::launch(__VA_ARGS__, grid, block, smem)
