#include "tests/bench/machine_info.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "absl/strings/str_format.h"

namespace arcface::bench {

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, model = "?", family = "?", number = "?";
  while (std::getline(in, line)) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    key.erase(key.find_last_not_of(" \t") + 1);
    const std::string value = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
    if (key == "model name" && model == "?") model = value;
    if (key == "cpu family" && family == "?") family = value;
    if (key == "model" && number == "?") number = value;
  }
  return absl::StrFormat("%s (family %s, model %s), %ld CPUs online", model, family, number,
                         sysconf(_SC_NPROCESSORS_ONLN));
}

double LoadAverage() {
  double load[1] = {0};
  return getloadavg(load, 1) == 1 ? load[0] : -1;
}

}  // namespace arcface::bench
