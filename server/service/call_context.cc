#include "server/service/call_context.h"

#include <chrono>
#include <utility>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"

#include "server/service/admission.h"
#include "server/service/status_mapping.h"

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

absl::Status CheckRequestId(const std::string& request_id) {
  if (request_id.size() <= kMaxRequestIdBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("request_id is ", request_id.size(),
                                                 " bytes, over the limit of ", kMaxRequestIdBytes,
                                                 " bytes"));
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

namespace {

void FinishUnary(const CallEnv& env, grpc::ServerUnaryReactor* reactor, const char* rpc,
                 absl::Time start, const absl::Status& status, const std::string& model_id = "") {
  env.metrics->RecordRequest(rpc, status, SecondsSince(start), model_id);
  if (!status.ok()) spdlog::debug("{} failed: {}", rpc, status.ToString());
  reactor->Finish(ToGrpcStatus(status));
}

}  // namespace

grpc::ServerUnaryReactor* ServeUnary(const CallEnv& env, grpc::CallbackServerContext* context,
                                     const char* rpc,
                                     absl::AnyInvocable<void(CallContext, DoneFn)> work,
                                     ModelIdOf model_id) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  absl::Status admitted = env.admission->Admit();
  if (!admitted.ok()) {
    FinishUnary(env, reactor, rpc, start, admitted);
    return reactor;
  }
  // A unary call ends only after its work's done: the work may poll the call's context.
  work(ContextOf(context, [context] { return context->IsCancelled(); }),
       [env, reactor, rpc, start, model_id = std::move(model_id)](absl::Status status) {
         FinishUnary(env, reactor, rpc, start, status, model_id ? model_id() : "");
         env.admission->Release();
       });
  return reactor;
}

}  // namespace arcface::service
