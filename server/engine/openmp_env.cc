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
  const char* core = std::getenv("OPENBLAS_CORETYPE");
  return absl::StrCat("OMP_WAIT_POLICY=", policy ? policy : "(unset)",
                      " GOMP_SPINCOUNT=", spin ? spin : "(unset)",
                      " OPENBLAS_CORETYPE=", core ? core : "(unset)");
}

// The OpenBLAS kernels this CPU can run, by its instruction sets; null: leave OpenBLAS to choose.
const char* OpenBlasCore() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512cd")) {
    return "SkylakeX";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return nullptr;
}

}  // namespace

std::string ApplyOpenMpDefaults(char** argv) {
  const char* skip = std::getenv("ARCFACE_OPENMP_DEFAULTS");
  if (skip && std::strcmp(skip, "0") == 0) {
    return absl::StrCat("OpenMP: ", Current(), " (ARCFACE_OPENMP_DEFAULTS=0)");
  }
  const bool set_waiting = !std::getenv("OMP_WAIT_POLICY") && !std::getenv("GOMP_SPINCOUNT");
  const char* core = std::getenv("OPENBLAS_CORETYPE") ? nullptr : OpenBlasCore();
  if (!set_waiting && core == nullptr) return absl::StrCat("OpenMP: ", Current());
  if (set_waiting) {
    setenv("OMP_WAIT_POLICY", kPolicy, 1);
    setenv("GOMP_SPINCOUNT", kSpinCount, 1);
  }
  if (core) setenv("OPENBLAS_CORETYPE", core, 1);
  execv("/proc/self/exe", argv);
  const int error = errno;  // only reached when the exec failed
  if (set_waiting) {
    unsetenv("OMP_WAIT_POLICY");
    unsetenv("GOMP_SPINCOUNT");
  }
  if (core) unsetenv("OPENBLAS_CORETYPE");
  return absl::StrCat("OpenMP: ", Current(), "; could not re-execute with this process's "
                      "defaults: ", std::strerror(error));
}

}  // namespace arcface::engine
