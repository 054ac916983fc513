// What the service's calls (Embed, EmbedStream, Compare) share: the parts of the service they
// borrow, a call's deadline and cancellation, the state one call's work passes between its
// steps, and the pool job that turns a call's faces into crops.
//
// Contract
// - Ownership: CallEnv only borrows; everything it points to outlives every call (the service
//   owns the Admission and the streams' byte count, the server the rest). A CallState owns the
//   call's `done` until Complete(); the request and response it points to are the call's.
// - Blocking: nothing here blocks. PreprocessJob's steps run on the WorkQueue, each about
//   kPreprocessSlice of decoding.
// - Errors: CheckAlive() says DEADLINE_EXCEEDED or CANCELLED (and counts the abort); a face's
//   error is its INVALID_ARGUMENT prefixed with its label ("face 3: ...").
// - Thread safety: a CallState is shared by the handler, the pool job and the batcher's done,
//   which run one after the other, never at once; Complete() is called exactly once.
#ifndef ARCFACE_SERVER_SERVICE_CALL_CONTEXT_H_
#define ARCFACE_SERVER_SERVICE_CALL_CONTEXT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/image/image.h"
#include "server/service/face_preprocess.h"
#include "server/service/service_metrics.h"
#include "server/service/service_options.h"
#include "server/service/work_queue.h"

namespace arcface::service {

class Admission;
struct DetectionEnv;

// The parts of the service that every call borrows.
struct CallEnv {
  const ServiceOptions* options = nullptr;
  ServiceMetrics* metrics = nullptr;
  WorkQueue* preprocess = nullptr;
  // The embedder and the model, once ready.
  Admission* admission = nullptr;
  // What all EmbedStream streams hold together, against streams_max_held_bytes.
  std::atomic<int64_t>* stream_bytes_held = nullptr;
  // Detect's detector and galleries (detect_call.h), set before the service is ready.
  const DetectionEnv* detection = nullptr;
};

struct CallContext {
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> is_cancelled;
};

// A call's work reports its end through this, exactly once.
using DoneFn = absl::AnyInvocable<void(absl::Status)>;

// The call's deadline, and how its work learns of a cancellation: `is_cancelled` is polled
// only until the work's done (the work may keep it longer, in the batcher).
CallContext ContextOf(grpc::CallbackServerContext* context, std::function<bool()> is_cancelled);

// A call's response's model_id, read once its work is done: the model its metrics count under
// (ServiceMetrics::RecordRequest).
using ModelIdOf = std::function<std::string()>;
template <typename Response>
ModelIdOf ModelIdOfResponse(const Response* response) {
  return [response] { return response->model_id(); };
}

// The life of every unary call (of every service): admit it through env.admission (or finish it
// with the refusal), run `work`, which calls its DoneFn exactly once, then finish, meter (by
// `rpc`, and by the model that `model_id` names, if any) and release the call from there.
grpc::ServerUnaryReactor* ServeUnary(const CallEnv& env, grpc::CallbackServerContext* context,
                                     const char* rpc,
                                     absl::AnyInvocable<void(CallContext, DoneFn)> work,
                                     ModelIdOf model_id = nullptr);

// INVALID_ARGUMENT naming the limit for a request_id over kMaxRequestIdBytes (Embed, Detect and
// their streams echo it in every answer).
absl::Status CheckRequestId(const std::string& request_id);

// Whether the call is still worth working on; checked before each slice of costly work (a face,
// a block of Compare rows). A call found dead is counted as an aborted preprocessing.
absl::Status CheckAlive(const std::function<bool()>& is_cancelled, absl::Time deadline,
                        ServiceMetrics* metrics);

inline double SecondsSince(absl::Time start) {
  return absl::ToDoubleSeconds(absl::Now() - start);
}

// One step of preprocessing decodes faces for about this long (at least one face), then yields
// the pool thread to the next call's step.
inline constexpr absl::Duration kPreprocessSlice = absl::Milliseconds(5);

// One call's work, shared by the handler, the preprocessing job and the batcher's done, so that
// whichever step fails can complete the call (exactly once: `done` is moved out when called).
template <typename Request, typename Response>
struct CallState {
  const Request* request;
  Response* response;
  std::function<bool()> is_cancelled;
  absl::Time deadline;
  absl::AnyInvocable<void(absl::Status)> done;

  void Complete(absl::Status status) {
    auto fn = std::move(done);
    done = nullptr;
    fn(std::move(status));
  }
};

// Ends a call the pool refused to admit with the pool's status; a full pool (RESOURCE_EXHAUSTED)
// is also counted as a rejection of the call's `faces`. Nothing to do when `queued` is OK.
template <typename State>
void CompleteIfRefused(absl::Status queued, int faces, ServiceMetrics* metrics, State& state) {
  if (queued.ok()) return;
  if (queued.code() == absl::StatusCode::kResourceExhausted) {
    metrics->RecordRejected("preprocess_queue_full", faces);
  }
  state.Complete(std::move(queued));
}

// A pool job that decodes, crops and aligns a call's `n` faces into crops of `geometry` (the
// model's, which outlives the job), a time slice per step, checking before each face that the
// call is still alive, then hands the crops to `then` (on the pool).
// `face_at(i)` is the i-th face; `label_at(i)` names it in errors ("face 3", "query 0").
template <typename State, typename FaceAt, typename LabelAt, typename Then>
WorkQueue::Job PreprocessJob(std::shared_ptr<State> state, int n, const image::Limits& limits,
                             const model::CropGeometry& geometry, ServiceMetrics* metrics,
                             FaceAt face_at, LabelAt label_at, Then then) {
  return [state = std::move(state), n, &limits, &geometry, metrics, face_at = std::move(face_at),
          label_at = std::move(label_at), then = std::move(then), next = 0,
          crops = std::vector<uint8_t>(), busy = absl::ZeroDuration()]() mutable -> bool {
    const absl::Time step_start = absl::Now();
    do {
      absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, metrics);
      if (!alive.ok()) {
        state->Complete(alive);
        return false;
      }
      // Reserved at the first face, not at admission: queued calls hold only their request.
      if (crops.empty()) crops.reserve(size_t(n) * geometry.bytes());
      absl::Status s = AppendFaceCrop(face_at(next), limits, &crops, geometry);
      if (!s.ok()) {
        state->Complete(WithContext(s, label_at(next)));
        return false;
      }
      metrics->AddPreprocessedFace();
      ++next;
    } while (next < n && absl::Now() - step_start < kPreprocessSlice);
    busy += absl::Now() - step_start;
    if (next < n) return true;
    metrics->RecordPreprocess(absl::ToDoubleSeconds(busy));
    absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, metrics);
    if (!alive.ok()) {
      state->Complete(alive);
      return false;
    }
    then(std::move(crops));
    return false;
  };
}

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_CALL_CONTEXT_H_
