#include "server/service/call_context.h"

#include <chrono>
#include <utility>

namespace arcface::service {

CallContext ContextOf(grpc::CallbackServerContext* context, std::function<bool()> is_cancelled) {
  CallContext call;
  call.is_cancelled = std::move(is_cancelled);
  const auto deadline = context->deadline();
  // gRPC reports "no deadline" as a far-future time point; absl::FromChrono would overflow.
  if (deadline < std::chrono::system_clock::now() + std::chrono::hours(24 * 365 * 10)) {
    call.deadline = absl::FromChrono(deadline);
  }
  return call;
}

absl::Status CheckAlive(const std::function<bool()>& is_cancelled, absl::Time deadline,
                        ServiceMetrics* metrics) {
  // The deadline first: gRPC also reports a call whose deadline passed as cancelled.
  if (absl::Now() >= deadline) {
    metrics->RecordPreprocessAborted("deadline");
    return absl::DeadlineExceededError("the deadline passed before the call's work was done");
  }
  if (is_cancelled && is_cancelled()) {
    metrics->RecordPreprocessAborted("cancelled");
    return absl::CancelledError("the call was cancelled");
  }
  return absl::OkStatus();
}

}  // namespace arcface::service
