#include "client/cli/stats.h"

#include <algorithm>
#include <cmath>

namespace arcface::cli {

double Percentile(const std::vector<double>& sorted, double p) {
  const size_t n = sorted.size();
  const double clamped = std::clamp(p, 0.0, 100.0);
  // rank = ceil(p/100 * n), 1-based; p = 0 is the first sample.
  size_t rank = static_cast<size_t>(std::ceil(clamped / 100.0 * double(n) - 1e-9));
  rank = std::clamp<size_t>(rank, 1, n);
  return sorted[rank - 1];
}

}  // namespace arcface::cli
