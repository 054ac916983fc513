#include "server/service/admission.h"

#include <algorithm>
#include <vector>

#include "absl/time/clock.h"

namespace arcface::service {

void Admission::SetReady(std::vector<ServedModel> models) {
  models_.Set(std::move(models));
  absl::MutexLock lock(&mu_);
  ready_ = true;
}

void Admission::BeginDrain() {
  std::vector<Stream*> pinned;
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    for (Stream* s : streams_) {
      if (s->Pin()) pinned.push_back(s);
    }
  }
  for (Stream* s : pinned) s->DrainAndUnpin();
}

bool Admission::WaitForIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  while (inflight_ > 0) {
    if (idle_.WaitWithDeadline(&mu_, deadline)) return inflight_ == 0;
  }
  return true;
}

void Admission::WaitForQuiet(absl::Duration quiet, absl::Time deadline) {
  while (true) {
    absl::Time wake;
    {
      absl::MutexLock lock(&mu_);
      wake = std::min(last_arrival_ + quiet, deadline);
    }
    if (absl::Now() >= wake) return;
    absl::SleepFor(std::min(wake - absl::Now(), absl::Milliseconds(10)));
  }
}

int Admission::inflight() const {
  absl::MutexLock lock(&mu_);
  return inflight_;
}

absl::Status Admission::Admit() {
  absl::MutexLock lock(&mu_);
  last_arrival_ = absl::Now();
  if (draining_) {
    metrics_->RecordRejected("draining");
    return absl::UnavailableError("the server is draining (shutting down); retry elsewhere");
  }
  if (!ready_) return absl::UnavailableError("the model is still loading; retry shortly");
  ++inflight_;
  metrics_->inflight().Add(1);
  return absl::OkStatus();
}

void Admission::Release() {
  absl::MutexLock lock(&mu_);
  // A client that just got its answer sends its next call soon: that counts as activity too.
  last_arrival_ = absl::Now();
  --inflight_;
  metrics_->inflight().Add(-1);
  if (inflight_ == 0) idle_.SignalAll();
}

bool Admission::Register(Stream* stream) {
  absl::MutexLock lock(&mu_);
  streams_.insert(stream);
  // A drain that began between Admit() and here did not see this stream: drain it now.
  const bool drain_now = draining_;
  if (drain_now) stream->Pin();
  return drain_now;
}

void Admission::Unregister(Stream* stream) {
  {
    absl::MutexLock lock(&mu_);
    streams_.erase(stream);
  }
  Release();
}

}  // namespace arcface::service
