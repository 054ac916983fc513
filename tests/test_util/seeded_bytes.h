// SeededBytes: reproducible pseudo-random bytes (xorshift32) for test images and crops, the same
// for a seed on every machine. Header-only; no state.
#ifndef ARCFACE_TESTS_TEST_UTIL_SEEDED_BYTES_H_
#define ARCFACE_TESTS_TEST_UTIL_SEEDED_BYTES_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace arcface::test_util {

// `n` bytes from xorshift32 started at `seed` (which must not be 0).
inline std::vector<uint8_t> SeededBytes(size_t n, uint32_t seed) {
  std::vector<uint8_t> bytes(n);
  uint32_t x = seed;
  for (auto& b : bytes) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<uint8_t>(x);
  }
  return bytes;
}

}  // namespace arcface::test_util

#endif  // ARCFACE_TESTS_TEST_UTIL_SEEDED_BYTES_H_
