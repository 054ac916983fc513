// FaultInjector: a TEST HOOK that makes chosen model batches and face preprocessings fail, throw
// or stall, so that the integration tests (tests/integration/test_faults.py) can check that a
// fault stays within the calls it hits and that the server goes on serving. It is off unless
// arcface-server is started with --test-fault-injection SPEC (ARCFACE_TEST_FAULT_INJECTION), a
// flag hidden from --help; the server then logs a TEST HOOK warning. Never for production.
//
// SPEC: comma-separated rules, each naming one event by its 1-based ordinal in the process:
//   fail-batch=N        the Nth batch the model runs ends INTERNAL instead of running
//   throw-batch=N       the Nth batch throws std::runtime_error where the engine is called
//                       (what a library failure escaping the engine looks like to its caller)
//   stall-batch=N:DUR   the Nth batch sleeps DUR (3s, 500ms, ...) before running normally
//   fail-face=N         the preprocessing of the Nth face (Embed or Compare) ends INTERNAL
// e.g. "fail-batch=2,stall-batch=5:3s,fail-face=7". Batches are counted from the first one after
// SERVING (the engine's warm-up pass is not one of them); faces in the order their
// preprocessing starts.
//
// Contract
// - Parse() validates the whole spec; an error names the bad rule (arcface-server exits 2).
// - BeforeBatch() is called by the model adapter (server/app/engine_model.h) right before the
//   engine, inside the try/catch that turns an exception escaping the engine into INTERNAL: it
//   counts the batch, then returns OK, returns INTERNAL, throws, or sleeps and returns OK.
// - BeforeFace() (static) is called by face preprocessing for every face; with no injector
//   installed it costs one atomic load and returns OK.
// - Install() makes an injector the process's (nullptr: none); the caller keeps it alive until
//   it installs another or nullptr, and no preprocessing runs any more.
// - Thread safety: every method may be called from any thread; the rules are immutable after
//   Parse(), the counters are atomics.
#ifndef ARCFACE_SERVER_SERVICE_FAULT_INJECTION_H_
#define ARCFACE_SERVER_SERVICE_FAULT_INJECTION_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace arcface::service {

class FaultInjector {
 public:
  static absl::StatusOr<std::unique_ptr<FaultInjector>> Parse(absl::string_view spec);

  absl::Status BeforeBatch();

  static absl::Status BeforeFace();
  static void Install(FaultInjector* injector);

  const std::string& spec() const { return spec_; }

 private:
  FaultInjector() = default;

  std::string spec_;
  std::set<int64_t> fail_batches_;
  std::set<int64_t> throw_batches_;
  std::map<int64_t, absl::Duration> stall_batches_;
  std::set<int64_t> fail_faces_;
  std::atomic<int64_t> batches_{0};
  std::atomic<int64_t> faces_{0};
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_FAULT_INJECTION_H_
