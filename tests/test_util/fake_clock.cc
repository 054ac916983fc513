#include "tests/test_util/fake_clock.h"

#include <algorithm>

namespace arcface::batching {

FakeClock::FakeClock(absl::Time start) : now_(start) {}

absl::Time FakeClock::Now() {
  absl::MutexLock lock(&mu_);
  return now_;
}

int FakeClock::num_waiters() {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(waiters_.size());
}

void FakeClock::WaitUntil(absl::Mutex& mu, absl::CondVar& cv, absl::Time deadline) {
  Waiter self{&mu, &cv, deadline};
  {
    // Checking the time and registering happen under mu_, and the caller keeps `mu` until
    // cv.Wait() has queued it, while WakeDue() takes `mu` before signalling: an Advance()
    // racing with this call either is seen here or finds us queued on `cv`. No lost wakeup.
    absl::MutexLock lock(&mu_);
    if (now_ >= deadline) return;
    waiters_.push_back(&self);
  }
  cv.Wait(&mu);
  bool pinned;
  {
    absl::MutexLock lock(&mu_);
    auto it = std::find(waiters_.begin(), waiters_.end(), &self);
    if (it != waiters_.end()) waiters_.erase(it);
    pinned = self.pins > 0;
  }
  if (pinned) {
    // An Advance() has picked us and will lock `mu` to signal; release it so that call can
    // finish, and wait until it has, so `mu` and `cv` are not touched after we return.
    mu.Unlock();
    {
      absl::MutexLock lock(&mu_);
      while (self.pins > 0) unpinned_.Wait(&mu_);
    }
    mu.Lock();
  }
}

void FakeClock::Advance(absl::Duration delta) {
  {
    absl::MutexLock lock(&mu_);
    if (delta > absl::ZeroDuration()) now_ += delta;
  }
  WakeDue();
}

void FakeClock::SetTime(absl::Time time) {
  {
    absl::MutexLock lock(&mu_);
    if (time > now_) now_ = time;
  }
  WakeDue();
}

void FakeClock::WakeDue() {
  std::vector<Waiter*> due;
  {
    absl::MutexLock lock(&mu_);
    auto keep = std::stable_partition(waiters_.begin(), waiters_.end(),
                                      [this](Waiter* w) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                        return now_ < w->deadline;
                                      });
    due.assign(keep, waiters_.end());
    waiters_.erase(keep, waiters_.end());
    for (Waiter* w : due) ++w->pins;
  }
  // Signalling under the waiter's own mutex is what makes the wakeup impossible to lose; mu_ is
  // not held here so the lock order stays "waiter's mutex, then mu_".
  for (Waiter* w : due) {
    absl::MutexLock lock(w->mu);
    w->cv->SignalAll();
  }
  if (!due.empty()) {
    absl::MutexLock lock(&mu_);
    for (Waiter* w : due) --w->pins;
    unpinned_.SignalAll();
  }
}

}  // namespace arcface::batching
