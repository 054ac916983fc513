#include "server/engine/openmp_env.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace arcface::engine {
namespace {

constexpr char kPolicy[] = "active";
constexpr char kSpinCount[] = "100000";

std::string Current() {
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  return absl::StrCat("OMP_WAIT_POLICY=", policy ? policy : "(unset)",
                      " GOMP_SPINCOUNT=", spin ? spin : "(unset)");
}

}  // namespace

std::string ApplyOpenMpDefaults(char** argv) {
  const char* skip = std::getenv("ARCFACE_OPENMP_DEFAULTS");
  if (skip && std::strcmp(skip, "0") == 0) {
    return absl::StrCat("OpenMP: ", Current(), " (ARCFACE_OPENMP_DEFAULTS=0)");
  }
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) {
    return absl::StrCat("OpenMP: ", Current());
  }
  setenv("OMP_WAIT_POLICY", kPolicy, 1);
  setenv("GOMP_SPINCOUNT", kSpinCount, 1);
  execv("/proc/self/exe", argv);
  const int error = errno;  // only reached when the exec failed
  unsetenv("OMP_WAIT_POLICY");
  unsetenv("GOMP_SPINCOUNT");
  return absl::StrCat("OpenMP: libgomp's defaults; could not re-execute with OMP_WAIT_POLICY=",
                      kPolicy, " GOMP_SPINCOUNT=", kSpinCount, ": ", std::strerror(error));
}

}  // namespace arcface::engine
