// canary: one planted defect per mode, so that each sanitizer lane proves it reports what it
// is there to find (the lane's flags, options and suppressions together), and one correct
// program that must stay silent.
//   canary leak | overflow | ub        (ASan lane: each must fail with its report)
//   canary race                        (TSan lane: must fail with a data race)
//   canary mutex                       (TSan lane: absl::Mutex-guarded counter, must pass: the
//                                       instrumented abseil is the one loaded)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace {

int Leak() {
  volatile char* p = new char[4096];  // dropped: LeakSanitizer reports it at exit
  p[0] = 1;
  p = nullptr;
  return 0;
}

int Overflow(int argc) {
  char* p = new char[16];
  std::memset(p, 0, 16);
  const int value = p[15 + argc];  // argc >= 2: one byte past the end, or more
  delete[] p;
  return value;
}

int Ub(int argc) {
  volatile int big = 0x7fffffff;
  return big + argc;  // signed overflow
}

int Race() {
  static int shared = 0;
  std::thread a([] { for (int i = 0; i < 1000; ++i) ++shared; });
  std::thread b([] { for (int i = 0; i < 1000; ++i) ++shared; });
  a.join();
  b.join();
  return shared == 0;
}

int Mutex() {
  static absl::Mutex mu;
  static int shared ABSL_GUARDED_BY(mu) = 0;
  auto work = [] {
    for (int i = 0; i < 1000; ++i) {
      absl::MutexLock lock(&mu);
      ++shared;
    }
  };
  std::thread a(work), b(work);
  a.join();
  b.join();
  absl::MutexLock lock(&mu);
  return shared == 2000 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (!std::strcmp(mode, "leak")) return Leak();
  if (!std::strcmp(mode, "overflow")) return Overflow(argc);
  if (!std::strcmp(mode, "ub")) return Ub(argc);
  if (!std::strcmp(mode, "race")) return Race();
  if (!std::strcmp(mode, "mutex")) return Mutex();
  std::fprintf(stderr, "usage: canary leak|overflow|ub|race|mutex\n");
  return 2;
}
