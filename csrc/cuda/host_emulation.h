// Host emulation of the CUDA subset used by csrc/cuda/*.cu, so that their arithmetic, indexing,
// launch planning and reductions can be tested by a plain C++ compiler on machines without a
// GPU (tests/test_cpp_ext.py, backend "emulated"). Never part of the extension build.
//
// Compile each .cu as C++ with MPO_CUDA_HOST_EMULATION defined and this header force-included
// (`g++ -x c++ -DMPO_CUDA_HOST_EMULATION -include host_emulation.h`); the harness that links them
// defines the few CUDA runtime calls the launchers make (cudaGetLastError, cudaGetDevice,
// cudaDeviceGetAttribute, cudaMemsetAsync) for an emulated device. Blocks run one after
// another; the threads of a block run concurrently as std::threads (one pool per launch), so
// __syncthreads is a barrier and __shfl_xor_sync a two-phase exchange through a per-warp buffer.
// __shared__ variables become function statics (one block at a time shares them). A thread
// that returns leaves its barriers, as on a GPU.
#pragma once

#ifndef MPO_CUDA_HOST_EMULATION
#error "define MPO_CUDA_HOST_EMULATION before including host_emulation.h"
#endif

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

namespace mpo_emu {

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;
  std::vector<float> dynamic_smem;
};

inline Block* current_block = nullptr;  // the block running now (blocks run one at a time)
inline thread_local unsigned linear_tid = 0;

}  // namespace mpo_emu

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { mpo_emu::current_block->all->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  mpo_emu::Block& b = *mpo_emu::current_block;
  const unsigned warp = mpo_emu::linear_tid / 32, lane = mpo_emu::linear_tid % 32;
  b.lanes[warp * 32 + lane] = v;
  b.warps[warp]->arrive_and_wait();
  const float out = b.lanes[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  b.warps[warp]->arrive_and_wait();
  return out;
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

namespace mpo_emu {

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(current_block->dynamic_smem.data());
}

// Runs kernel<<<grid, block, smem>>>(args...) on the host: one std::thread per CUDA thread of
// a block, reused for every block of the grid (blocks run one after another).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    const unsigned threads = block.x * block.y * block.z;
    const unsigned warps = (threads + 31) / 32;
    const unsigned blocks = grid.x * grid.y * grid.z;
    Block b;
    std::barrier<> step(threads);  // separates blocks; nobody leaves it
    auto setup = [&] {
      b.all = std::make_unique<std::barrier<>>(threads);
      b.warps.clear();
      for (unsigned w = 0; w < warps; ++w)
        b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
      b.lanes.assign(32 * warps, 0.0f);
      b.dynamic_smem.assign((smem + sizeof(float) - 1) / sizeof(float), 0.0f);
    };
    current_block = &b;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        linear_tid = t;
        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        blockDim = block;
        gridDim = grid;
        for (unsigned index = 0; index < blocks; ++index) {
          if (t == 0) setup();
          step.arrive_and_wait();  // the block is set up
          blockIdx = dim3(index % grid.x, (index / grid.x) % grid.y, index / (grid.x * grid.y));
          kernel(args...);
          b.warps[t / 32]->arrive_and_drop();
          b.all->arrive_and_drop();
          step.arrive_and_wait();  // every thread is done with the block
        }
      });
    for (auto& th : pool) th.join();
    current_block = nullptr;
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  return {kernel, grid, block, smem};
}

}  // namespace mpo_emu

#define MPO_LAUNCH(grid, block, smem, stream, ...) ::mpo_emu::launch(__VA_ARGS__, grid, block, smem)

