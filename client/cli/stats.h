// Latency statistics for `arcface-client bench`.
//
// Contract: pure functions; thread-safe. Percentiles use the nearest-rank definition (the
// smallest sample with at least p% of the samples at or below it), so every reported value is
// a latency that was actually measured.
#ifndef ARCFACE_CLIENT_CLI_STATS_H_
#define ARCFACE_CLIENT_CLI_STATS_H_

#include <vector>

namespace arcface::cli {

// p in [0, 100]; `sorted` ascending and non-empty (p = 0 gives the minimum, 100 the maximum).
double Percentile(const std::vector<double>& sorted, double p);

}  // namespace arcface::cli

#endif  // ARCFACE_CLIENT_CLI_STATS_H_
