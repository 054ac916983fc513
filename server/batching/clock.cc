#include "server/batching/clock.h"

namespace arcface::batching {

RealClock* RealClock::Get() {
  // Never destroyed: batchers that outlive static destruction may still read the time.
  static RealClock* const clock = new RealClock();
  return clock;
}

absl::Time RealClock::Now() { return absl::Now(); }

void RealClock::WaitUntil(absl::Mutex& mu, absl::CondVar& cv, absl::Time deadline) {
  cv.WaitWithDeadline(&mu, deadline);
}

}  // namespace arcface::batching
