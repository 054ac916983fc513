// What a benchmark prints about the machine it ran on: its figures hold only for that CPU and
// that load. Reads /proc and getloadavg; no state, thread-safe.
#ifndef ARCFACE_TESTS_BENCH_MACHINE_INFO_H_
#define ARCFACE_TESTS_BENCH_MACHINE_INFO_H_

#include <string>

namespace arcface::bench {

// "<model name> (family F, model M), N CPUs online", from /proc/cpuinfo.
std::string CpuModel();
// The 1-minute load average, or -1 when the system does not say.
double LoadAverage();

}  // namespace arcface::bench

#endif  // ARCFACE_TESTS_BENCH_MACHINE_INFO_H_
