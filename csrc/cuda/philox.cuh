// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator behind the dropout masks. Host and device: the same source is
// compiled by g++ in tests/test_cuda_compile.py and checked on the Random123 known-answer
// vectors, so the device mask has a bit-exact host reference.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MPO_HOST_DEVICE inline
#endif

namespace mpo_core {
namespace cuda {

struct Philox4 {
  uint32_t x, y, z, w;
};

MPO_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

MPO_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = mulhi32(kM1, c.z), lo1 = kM1 * c.z;
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// The four random words of dropout block `block` (= flat element index / 4).
MPO_HOST_DEVICE Philox4 dropout_block(uint64_t block, uint64_t seed, uint64_t offset) {
  return philox4x32_10(Philox4{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                               static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A random word as a float in [0, 1) with 24 random bits (exact in float32).
MPO_HOST_DEVICE float unit_float(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

}  // namespace cuda
}  // namespace mpo_core
