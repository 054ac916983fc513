// FakeClock: a Clock whose time moves only when a test calls Advance() or SetTime().
//
// Contract
// - Time starts at the given instant and never goes backwards.
// - Advance()/SetTime() wake every thread blocked in WaitUntil() whose deadline has now been
//   reached, before they return. The woken thread still has to be scheduled by the OS, so a
//   test that wants to observe the effect waits on the batcher's own state (for example
//   DynamicBatcher::WaitUntilIdle()), never on real time.
// - All methods are thread-safe. Lock order: a waiter's mutex before the clock's mutex; the
//   clock never holds its own mutex while taking a waiter's, so the two cannot deadlock.
#ifndef ARCFACE_TESTS_TEST_UTIL_FAKE_CLOCK_H_
#define ARCFACE_TESTS_TEST_UTIL_FAKE_CLOCK_H_

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/batching/clock.h"

namespace arcface::batching {

class FakeClock final : public Clock {
 public:
  // An arbitrary fixed instant, far from the epoch so that "time minus delay" never underflows.
  static absl::Time DefaultStart() { return absl::FromUnixSeconds(1'700'000'000); }

  explicit FakeClock(absl::Time start = DefaultStart());
  FakeClock(const FakeClock&) = delete;
  FakeClock& operator=(const FakeClock&) = delete;

  absl::Time Now() override ABSL_LOCKS_EXCLUDED(mu_);
  void WaitUntil(absl::Mutex& mu, absl::CondVar& cv, absl::Time deadline) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) ABSL_LOCKS_EXCLUDED(mu_);

  // `delta` must be >= 0.
  void Advance(absl::Duration delta) ABSL_LOCKS_EXCLUDED(mu_);
  // `time` earlier than Now() is ignored (time never goes backwards).
  void SetTime(absl::Time time) ABSL_LOCKS_EXCLUDED(mu_);

  // Threads currently blocked in WaitUntil() and not yet woken.
  int num_waiters() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Waiter {
    absl::Mutex* mu;
    absl::CondVar* cv;
    absl::Time deadline;
    // How many Advance() calls are about to touch this waiter's mutex; the waiter may not
    // return (and let its mutex die with its owner) until it drops to zero.
    int pins = 0;
  };

  void WakeDue() ABSL_LOCKS_EXCLUDED(mu_);

  absl::Mutex mu_;
  absl::CondVar unpinned_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
  std::vector<Waiter*> waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace arcface::batching

#endif  // ARCFACE_TESTS_TEST_UTIL_FAKE_CLOCK_H_
