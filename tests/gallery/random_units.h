// Seeded random unit vectors of the gallery's dimension, for the index tests and
// tests/bench/gallery_bench: directions uniform on the sphere (normalized Gaussians), the
// hardest case for an approximate index (no clusters to follow).
#ifndef ARCFACE_TESTS_GALLERY_RANDOM_UNITS_H_
#define ARCFACE_TESTS_GALLERY_RANDOM_UNITS_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "server/gallery/gallery_store.h"

namespace arcface::gallery::testing {

// n × dim floats, row-major, each row of unit length.
inline std::vector<float> RandomUnits(size_t n, uint64_t seed, int dim = kDim) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> units(n * dim);
  for (size_t i = 0; i < n; ++i) {
    float* row = units.data() + i * dim;
    double norm2 = 0;
    for (int j = 0; j < dim; ++j) {
      row[j] = normal(rng);
      norm2 += static_cast<double>(row[j]) * row[j];
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(norm2));
    for (int j = 0; j < dim; ++j) row[j] *= inv;
  }
  return units;
}

// The inner product in double: the reference the indexes are checked against.
inline double Dot(const float* a, const float* b, int dim = kDim) {
  double sum = 0;
  for (int j = 0; j < dim; ++j) sum += static_cast<double>(a[j]) * b[j];
  return sum;
}

}  // namespace arcface::gallery::testing

#endif  // ARCFACE_TESTS_GALLERY_RANDOM_UNITS_H_
