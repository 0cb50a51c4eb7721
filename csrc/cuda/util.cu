// Column sums of per-block partials (the deterministic second stage of every dgamma/dbeta/
// dbias reduction) and the cached SM count used to size persistent grids.
#include <atomic>

#include "common.cuh"

namespace mpo_core {
namespace cuda {
namespace {

constexpr int kColumns = 32;  // columns per block (one per lane: coalesced rows)
constexpr int kLanesPerColumn = 16;  // threads splitting the parts of a column

__global__ void __launch_bounds__(kColumns * kLanesPerColumn)
    column_sums_kernel(const float* __restrict__ in, int64_t parts, int n, float* __restrict__ out) {
  __shared__ float partial[kLanesPerColumn][kColumns + 1];
  const int col = blockIdx.x * kColumns + threadIdx.x;
  float s = 0.0f;
  if (col < n)
    for (int64_t p = threadIdx.y; p < parts; p += kLanesPerColumn) s += in[p * n + col];
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < kLanesPerColumn; ++y) total += partial[y][threadIdx.x];
    out[col] = total;
  }
}

}  // namespace

cudaError_t column_sums(const float* in, int64_t parts, int n, float* out, cudaStream_t stream) {
  if (n < 1 || parts < 0) return cudaErrorInvalidValue;
  const dim3 block(kColumns, kLanesPerColumn);
  const dim3 grid(static_cast<unsigned>(detail::ceil_div(n, kColumns)));
  MPO_LAUNCH(grid, block, 0, stream, column_sums_kernel)(in, parts, n, out);
  return cudaGetLastError();
}

int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 1;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1)
    count = 1;
  if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

}  // namespace cuda
}  // namespace mpo_core
