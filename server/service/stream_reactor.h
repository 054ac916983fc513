// The reactor of a bidirectional stream of one request type and one response type, one
// response per request message, in order, request_id echoed (EmbedStream, embed_stream.h;
// DetectStream, detect_stream.h): reading, backpressure, ordering of the answers, cancellation
// and the drain. Each message's work is the method's unary call.
//
// Contract
// - A Method is a struct with: `Request`, `Response` (protobuf messages with a `request_id`;
//   Response also with `error`), `kRpc` (the metrics' method name), `Start(env, request,
//   response, CallContext, DoneFn)` (the work of one message, DoneFn called exactly once) and
//   `Describe(env, response)` (what an error answer carries besides request_id and error: the
//   served model's or detector's id).
// - Ownership: OpenStream() returns a reactor that gRPC drives and that deletes itself in
//   OnDone (releasing its admitted call then). `env` is copied; what it points to outlives
//   every stream.
// - Blocking: nothing blocks. Reactions take the stream's short mutex and start gRPC operations
//   with it released (gRPC may run a reaction inline).
// - Errors: a message's error travels in its response's `error` and the stream goes on, also
//   for a message that does not parse ("message 3 is not a valid EmbedRequest: ...") or whose
//   request_id is too long; the stream itself ends UNAVAILABLE when refused at admission or
//   drained before the client half-closed, CANCELLED when cancelled or a write failed.
// - Memory: a stream reads while the bytes it holds (messages read and not answered, answers
//   not written) stay under stream_max_held_bytes and those of all streams under
//   streams_max_held_bytes, or while it holds nothing; at most stream_max_in_flight messages
//   are in work at once.
// - Thread safety: reactions, message completions (pool or batch threads) and the drain may run
//   concurrently.
#ifndef ARCFACE_SERVER_SERVICE_STREAM_REACTOR_H_
#define ARCFACE_SERVER_SERVICE_STREAM_REACTOR_H_

#include <atomic>
#include <deque>
#include <memory>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
// The protobuf SerializationTraits for the raw messages.
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "server/service/admission.h"
#include "server/service/call_context.h"
#include "server/service/status_mapping.h"

namespace arcface::service {
namespace stream_internal {

// Answers a stream that arrives while the server is not serving, then deletes itself.
class RejectedStream final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit RejectedStream(const absl::Status& status) { Finish(ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

// Reactions (OnReadDone, OnWriteDone, OnCancel, a message's completion, the drain) each change
// the state and decide the next gRPC operations under mu_, then start those operations with mu_
// released: gRPC may run a reaction inline from StartRead/StartWrite/Finish, which would
// deadlock on mu_. `pending_actions_` counts operations decided but not yet started, so that
// Finish (after which OnDone may delete the reactor) is only decided when no other thread is
// about to touch the reactor.
//
// Lifetime of a message's work: it is started only while the stream is neither broken nor
// finished, and Finish waits until every started message has called its done, so the request,
// the response and the reactor outlive the work's use of them. Whatever the work keeps past its
// done (its copy of is_cancelled, in the batcher) reads a flag it shares with the reactor, never
// the call's context, which is gone after OnDone.
//
// Messages are read raw and parsed here: gRPC's typed reactor reports a message that does not
// parse like the client's half-close (OnReadDone(false)), which would end the stream with OK and
// drop the rest; here it is answered with an error and the stream goes on.
//
// Memory: held_ counts the bytes of the messages read and not yet answered (their wire size)
// and of the answers not yet written. The next message is read only while the stream holds less
// than stream_max_held_bytes and all streams together less than streams_max_held_bytes, or
// when the stream holds nothing (so that every stream progresses, one message at a time). A
// stream waiting on the budget always has a message in work or an answer being written, whose
// completion decides again; one whose client never reads its answers stays blocked, holding only
// those answers: a message's request is freed as soon as it is answered.
template <typename Method>
class StreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
                            public Admission::Stream {
  using Request = typename Method::Request;
  using Response = typename Method::Response;

 public:
  StreamReactor(const CallEnv& env, grpc::CallbackServerContext* context)
      : env_(env),
        cancelled_(std::make_shared<std::atomic<bool>>(false)),
        call_(ContextOf(context, [cancelled = cancelled_] { return cancelled->load(); })) {}

  void Start() { Act(Decide(/*unpin=*/false)); }

  void OnReadDone(bool ok) override {
    std::unique_ptr<Slot> slot;
    absl::Status invalid;
    if (ok) {
      slot = std::make_unique<Slot>();
      invalid = Parse(slot.get());
    }
    Slot* to_start = nullptr;
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      read_in_flight_ = false;
      if (!ok) {
        reads_done_ = true;
      } else if (broken_ || finished_) {
        // It arrived as a cancellation or a drain ended the stream: it cannot be answered.
        env_.metrics->RecordRequest(
            Method::kRpc,
            broken_ ? absl::CancelledError("the stream was cancelled")
                    : absl::UnavailableError("the server is draining"),
            SecondsSince(slot->start));
        // OnDone may follow this reaction at once: nothing more may be started.
        if (finished_) return;
      } else {
        Account(slot->held_bytes);
        to_start = slot.get();
        slots_.push_back(std::move(slot));
        // Pinned until the message is started, so the reactor cannot finish under it.
        ++pending_actions_;
      }
      if (to_start == nullptr) actions = DecideLocked();
    }
    if (to_start == nullptr) return Act(actions);
    if (!invalid.ok()) {
      OnMessageDone(to_start, std::move(invalid));
    } else {
      Method::Start(env_, to_start->request.get(), to_start->response.get(), call_,
                    [this, to_start](absl::Status status) {
                      OnMessageDone(to_start, std::move(status));
                    });
    }
    Act(Decide(/*unpin=*/true));
  }

  void OnWriteDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      Account(-slots_.front()->held_bytes);
      slots_.pop_front();
      if (!ok) broken_ = true;
      actions = DecideLocked();
    }
    Act(actions);
  }

  void OnCancel() override {
    cancelled_->store(true);
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      broken_ = true;
      actions = DecideLocked();
    }
    Act(actions);
  }

  void OnDone() override {
    // gRPC runs OnDone after every other reaction has returned, ordered by a reference count
    // inside libgrpc++; taking mu_ once makes that order explicit in our own synchronization
    // (the other reactions touch the members under mu_ or before taking it), so the delete
    // below is visibly after them, for a reader and for ThreadSanitizer alike.
    { absl::MutexLock lock(&mu_); }
    env_.admission->Unregister(this);
    delete this;
  }

  // For the drain: keeps the reactor alive until DrainAndUnpin(); false if it is finishing.
  bool Pin() override {
    absl::MutexLock lock(&mu_);
    if (finished_) return false;
    ++pending_actions_;
    return true;
  }

  void DrainAndUnpin() override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      draining_ = true;
      --pending_actions_;
      actions = DecideLocked();
    }
    Act(actions);
  }

 private:
  struct Slot {
    int64_t index = 0;  // in the stream, from 0
    std::unique_ptr<Request> request = std::make_unique<Request>();
    std::unique_ptr<Response> response = std::make_unique<Response>();
    grpc::ByteBuffer answer;  // the response's wire form, once ready
    int64_t held_bytes = 0;   // the request's wire size until ready, then the answer's
    absl::Time start;
    bool ready = false;
  };
  struct Actions {
    grpc::ByteBuffer* read = nullptr;
    const grpc::ByteBuffer* write = nullptr;
    bool finish = false;
    grpc::Status status;
  };

  // Parses the message just read into `slot`; an error says why it cannot be served. Runs
  // without mu_ (a large message does not stall the other reactions): read_buffer_ and
  // messages_read_ belong to the read reaction until it decides the next read.
  absl::Status Parse(Slot* slot) {
    slot->index = messages_read_++;
    slot->start = absl::Now();
    slot->held_bytes = static_cast<int64_t>(read_buffer_.Length());
    // Clears read_buffer_, whatever the outcome.
    if (!grpc::SerializationTraits<Request>::Deserialize(&read_buffer_, slot->request.get())
             .ok()) {
      slot->request = std::make_unique<Request>();  // nothing of it is echoed
      return absl::InvalidArgumentError(absl::StrCat(
          "message ", slot->index, " is not a valid ", Request::descriptor()->name(), ": its ",
          slot->held_bytes,
          " bytes do not parse (not protobuf, truncated, a field of the wrong type, or a "
          "string that is not UTF-8)"));
    }
    absl::Status id = CheckRequestId(slot->request->request_id());
    if (!id.ok()) slot->request->clear_request_id();
    return id;
  }

  // A message's done: its answer is serialized and its request freed, then it may be written.
  void OnMessageDone(Slot* slot, absl::Status status) {
    env_.metrics->RecordRequest(Method::kRpc, status, SecondsSince(slot->start),
                                slot->response->model_id());
    Response& response = *slot->response;
    if (!status.ok()) {
      response.Clear();
      response.set_request_id(slot->request->request_id());
      Method::Describe(env_, &response);
      ToProtoStatus(status, response.mutable_error());
    }
    bool own_buffer;
    // Fails only past 2 GiB, which the face and request_id limits rule out; like a failed
    // write, it would break the stream.
    const bool serialized =
        grpc::SerializationTraits<Response>::Serialize(response, &slot->answer, &own_buffer)
            .ok();
    const int64_t answer_bytes = static_cast<int64_t>(slot->answer.Length());
    // The work does not touch them after its done.
    slot->request.reset();
    slot->response.reset();
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      Account(answer_bytes - slot->held_bytes);
      slot->held_bytes = answer_bytes;
      slot->ready = true;
      if (!serialized) broken_ = true;
      actions = DecideLocked();
    }
    // This runs on a pool or batch thread, not in a gRPC reaction: once mu_ is released, a
    // reaction may finish the stream and delete this reactor unless an action pins it (or is
    // the finish), so with none there is nothing to do and `this` must not be touched.
    if (actions.read != nullptr || actions.write != nullptr || actions.finish) Act(actions);
  }

  void Account(int64_t delta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    held_ += delta;
    env_.stream_bytes_held->fetch_add(delta);
    env_.metrics->stream_held_bytes().Add(static_cast<double>(delta));
  }

  Actions Decide(bool unpin) {
    absl::MutexLock lock(&mu_);
    if (unpin) --pending_actions_;
    return DecideLocked();
  }

  Actions DecideLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Actions a;
    if (finished_) return a;
    // Answers of a broken stream (cancelled, or a write failed) cannot be delivered.
    while (broken_ && !write_in_flight_ && !slots_.empty() && slots_.front()->ready) {
      Account(-slots_.front()->held_bytes);
      slots_.pop_front();
    }
    if (!broken_ && !write_in_flight_ && !slots_.empty() && slots_.front()->ready) {
      write_in_flight_ = true;
      a.write = &slots_.front()->answer;
    }
    const ServiceOptions& options = *env_.options;
    const bool within_budget =
        held_ == 0 || (held_ < options.stream_max_held_bytes &&
                       env_.stream_bytes_held->load() < options.streams_max_held_bytes);
    if (!broken_ && !draining_ && !reads_done_ && !read_in_flight_ && within_budget &&
        static_cast<int>(slots_.size()) < options.stream_max_in_flight) {
      read_in_flight_ = true;
      a.read = &read_buffer_;
    }
    if (a.read != nullptr || a.write != nullptr) {
      ++pending_actions_;
      return a;
    }
    // A read may still be outstanding when a drain or a cancellation ends the stream; gRPC
    // completes it when the call ends, before OnDone, possibly with a message (dropped).
    if (pending_actions_ == 0 && !write_in_flight_ && slots_.empty() &&
        (reads_done_ || broken_ || draining_)) {
      finished_ = true;
      a.finish = true;
      if (broken_) {
        a.status = grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled");
      } else if (!reads_done_) {
        a.status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                "the server is draining; reconnect to another replica");
      } else {
        a.status = grpc::Status::OK;
      }
    }
    return a;
  }

  void Act(Actions a) {
    while (true) {
      if (a.finish) {
        Finish(a.status);  // may delete this (OnDone): nothing after it
        return;
      }
      if (a.read == nullptr && a.write == nullptr) return;
      if (a.write != nullptr) StartWrite(a.write);
      if (a.read != nullptr) StartRead(a.read);
      a = Decide(/*unpin=*/true);
    }
  }

  const CallEnv env_;
  // Set by OnCancel; shared with the work of the messages, which may outlive the reactor.
  const std::shared_ptr<std::atomic<bool>> cancelled_;
  const CallContext call_;

  // Owned by the read in flight, then by its OnReadDone (see Parse).
  grpc::ByteBuffer read_buffer_;
  int64_t messages_read_ = 0;

  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);  // read, not yet written
  int64_t held_ ABSL_GUARDED_BY(mu_) = 0;
  bool read_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int pending_actions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace stream_internal

// Admits the stream (or answers it with the refusal) and starts reading.
template <typename Method>
grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OpenStream(
    const CallEnv& env, grpc::CallbackServerContext* context) {
  absl::Status admitted = env.admission->Admit();
  if (!admitted.ok()) return new stream_internal::RejectedStream(admitted);
  auto* stream = new stream_internal::StreamReactor<Method>(env, context);
  const bool drain_now = env.admission->Register(stream);
  stream->Start();
  if (drain_now) stream->DrainAndUnpin();
  return stream;
}

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_STREAM_REACTOR_H_
