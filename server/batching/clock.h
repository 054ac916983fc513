// Clock: the batcher's only source of time, injected so that tests move time by hand.
//
// Contract
// - Now() is thread-safe and never blocks for long; the batcher calls it while holding its own
//   mutex, so an implementation must not call back into the batcher.
// - WaitUntil(mu, cv, deadline) is how the batch thread sleeps. The caller holds `mu`; the call
//   releases it while blocked and holds it again on return. It returns once `cv` is signalled or
//   once Now() >= deadline, and may return early for no reason (like any condition-variable
//   wait), so callers re-check their state in a loop. absl::InfiniteFuture() waits for a signal
//   only.
// - Production code uses RealClock (absl::Now(), real timed waits). Tests use FakeClock
//   (tests/test_util/fake_clock.h), whose time moves only when the test advances it.
#ifndef ARCFACE_SERVER_BATCHING_CLOCK_H_
#define ARCFACE_SERVER_BATCHING_CLOCK_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace arcface::batching {

class Clock {
 public:
  virtual ~Clock() = default;

  virtual absl::Time Now() = 0;

  virtual void WaitUntil(absl::Mutex& mu, absl::CondVar& cv, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) = 0;
};

// Wall time from absl::Now(); waits are absl::CondVar::WaitWithDeadline.
class RealClock final : public Clock {
 public:
  // A process-wide instance; it has no state, so sharing it is free.
  static RealClock* Get();

  absl::Time Now() override;
  void WaitUntil(absl::Mutex& mu, absl::CondVar& cv, absl::Time deadline) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
};

}  // namespace arcface::batching

#endif  // ARCFACE_SERVER_BATCHING_CLOCK_H_
