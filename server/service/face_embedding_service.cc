#include "server/service/face_embedding_service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <deque>
#include <limits>
#include <memory>
#include <optional>
#include <utility>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/service/face_preprocess.h"
#include "server/service/status_mapping.h"

namespace arcface::service {

using arcface::v1::CompareRequest;
using arcface::v1::CompareResponse;
using arcface::v1::EmbedRequest;
using arcface::v1::EmbedResponse;
using arcface::v1::Probe;

namespace {

// Below this many multiply-adds a Compare matrix is computed on whichever thread has the
// embeddings (even the batch thread: ~1 ms); above it, on the preprocessing pool.
constexpr int64_t kInlineCompareMacs = int64_t{1} << 22;

double Seconds(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

// Whether the call is still worth working on; checked before each slice of costly work (a face,
// a block of Compare rows). A call found dead is counted as an aborted preprocessing.
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

absl::Status CheckRequestId(const EmbedRequest& request) {
  if (request.request_id().size() <= kMaxRequestIdBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("request_id is ", request.request_id().size(),
                                                 " bytes, over the limit of ",
                                                 kMaxRequestIdBytes, " bytes"));
}

double RawNorm(const float* row) {
  double ss = 0;
  for (int j = 0; j < kEmbeddingDim; ++j) ss += double(row[j]) * row[j];
  return std::sqrt(ss);
}

// The norms are the model's own (EmbeddingModel's contract), reported and divided by as they are.
void FillEmbeddings(const EmbeddingBatch& rows, bool normalize, EmbedResponse* response) {
  const int n = rows.size;
  response->mutable_embeddings()->Reserve(n);
  for (int i = 0; i < n; ++i) {
    const float* row = rows.values.data() + size_t(i) * kEmbeddingDim;
    const double norm = rows.norms[i];
    arcface::v1::Embedding* e = response->add_embeddings();
    e->set_norm(static_cast<float>(norm));
    auto* out = e->mutable_values();
    out->Resize(kEmbeddingDim, 0.0f);
    float* dst = out->mutable_data();
    if (normalize && norm > 0) {
      for (int j = 0; j < kEmbeddingDim; ++j) dst[j] = static_cast<float>(row[j] / norm);
    } else {
      std::copy(row, row + kEmbeddingDim, dst);
    }
  }
}

// Writes row / |row| into unit[0..dim); false when the norm is zero.
bool ToUnit(const float* row, float* unit) {
  const double norm = RawNorm(row);
  if (!(norm > 0) || !std::isfinite(norm)) return false;
  for (int j = 0; j < kEmbeddingDim; ++j) unit[j] = static_cast<float>(row[j] / norm);
  return true;
}

}  // namespace

CosineBlocks::CosineBlocks(const std::vector<float>& a_unit, const std::vector<float>& b_unit,
                           int rows, int cols, int dim)
    : a_unit_(a_unit), rows_(rows), cols_(cols), dim_(dim), bt_(size_t(dim) * cols),
      out_(size_t(rows) * cols), acc_(cols) {
  // b transposed, so that the inner loop runs over j element-wise (vectorizable without
  // reassociating the sum).
  for (int j = 0; j < cols; ++j) {
    for (int k = 0; k < dim; ++k) bt_[size_t(k) * cols + j] = b_unit[size_t(j) * dim + k];
  }
}

bool CosineBlocks::ComputeSome(int64_t macs) {
  const int64_t per_row = std::max<int64_t>(1, int64_t{cols_} * dim_);
  const int end =
      next_row_ + static_cast<int>(std::min<int64_t>(rows_ - next_row_,
                                                     std::max<int64_t>(1, macs / per_row)));
  for (; next_row_ < end; ++next_row_) {
    const int i = next_row_;
    std::fill(acc_.begin(), acc_.end(), 0.0);  // double sums: cos(a, a) is 1 to float rounding
    const float* a = a_unit_.data() + size_t(i) * dim_;
    for (int k = 0; k < dim_; ++k) {
      const double ak = a[k];
      const float* b = bt_.data() + size_t(k) * cols_;
      for (int j = 0; j < cols_; ++j) acc_[j] += ak * b[j];
    }
    float* row = out_.data() + size_t(i) * cols_;
    for (int j = 0; j < cols_; ++j) row[j] = static_cast<float>(acc_[j]);
  }
  return next_row_ < rows_;
}

std::vector<float> CosineMatrix(const std::vector<float>& a_unit, const std::vector<float>& b_unit,
                                int rows, int cols, int dim) {
  CosineBlocks blocks(a_unit, b_unit, rows, cols, dim);
  while (blocks.ComputeSome(std::numeric_limits<int64_t>::max())) {
  }
  return std::move(blocks).Take();
}

uint64_t CompareReplyBytes(int rows, int cols, bool with_matches, size_t model_id_bytes) {
  const uint64_t cells = uint64_t(rows) * uint64_t(cols);
  // Per field at most: a tag (1 byte) and a length or value varint (10).
  constexpr uint64_t kFieldOverhead = 11;
  return cells * (sizeof(float) + (with_matches ? 1 : 0)) + 5 * kFieldOverhead + model_id_bytes;
}

// ---------------------------------------------------------------------------------------------
// EmbedStream

// Answers a stream that arrives while the server is not serving, then deletes itself.
class FaceEmbeddingService::RejectedStream final
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
class FaceEmbeddingService::StreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamReactor(FaceEmbeddingService* service, grpc::CallbackServerContext* context)
      : service_(service),
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
        service_->metrics_->RecordRequest(
            "EmbedStream",
            broken_ ? absl::CancelledError("the stream was cancelled")
                    : absl::UnavailableError("the server is draining"),
            Seconds(slot->start));
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
      service_->StartEmbed(to_start->request.get(), to_start->response.get(), call_,
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
    service_->Unregister(this);
    delete this;
  }

  // For the drain: keeps the reactor alive until DrainAndUnpin(); false if it is finishing.
  bool Pin() {
    absl::MutexLock lock(&mu_);
    if (finished_) return false;
    ++pending_actions_;
    return true;
  }

  void DrainAndUnpin() {
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
    std::unique_ptr<EmbedRequest> request = std::make_unique<EmbedRequest>();
    std::unique_ptr<EmbedResponse> response = std::make_unique<EmbedResponse>();
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
    if (!grpc::SerializationTraits<EmbedRequest>::Deserialize(&read_buffer_, slot->request.get())
             .ok()) {
      slot->request = std::make_unique<EmbedRequest>();  // nothing of it is echoed
      return absl::InvalidArgumentError(absl::StrCat(
          "message ", slot->index, " is not a valid EmbedRequest: its ", slot->held_bytes,
          " bytes do not parse (not protobuf, truncated, a field of the wrong type, or a "
          "string that is not UTF-8)"));
    }
    absl::Status id = CheckRequestId(*slot->request);
    if (!id.ok()) slot->request->clear_request_id();
    return id;
  }

  // A message's done: its answer is serialized and its request freed, then it may be written.
  void OnMessageDone(Slot* slot, absl::Status status) {
    service_->metrics_->RecordRequest("EmbedStream", status, Seconds(slot->start));
    EmbedResponse& response = *slot->response;
    if (!status.ok()) {
      response.Clear();
      response.set_request_id(slot->request->request_id());
      response.set_model_id(service_->model_.model_id);
      ToProtoStatus(status, response.mutable_error());
    }
    bool own_buffer;
    // Fails only past 2 GiB, which the face and request_id limits rule out; like a failed
    // write, it would break the stream.
    const bool serialized =
        grpc::SerializationTraits<EmbedResponse>::Serialize(response, &slot->answer, &own_buffer)
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
    service_->stream_bytes_held_.fetch_add(delta);
    service_->metrics_->stream_held_bytes().Add(static_cast<double>(delta));
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
    const ServiceOptions& options = service_->options_;
    const bool within_budget =
        held_ == 0 || (held_ < options.stream_max_held_bytes &&
                       service_->stream_bytes_held_.load() < options.streams_max_held_bytes);
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

  FaceEmbeddingService* const service_;
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

// ---------------------------------------------------------------------------------------------
// The service

FaceEmbeddingService::FaceEmbeddingService(const ServiceOptions& options,
                                           ServiceMetrics* metrics, WorkQueue* preprocess)
    : options_(options), metrics_(metrics), preprocess_(preprocess) {}

FaceEmbeddingService::~FaceEmbeddingService() = default;

void FaceEmbeddingService::SetReady(Embedder* embedder, const ModelDescription& model) {
  absl::MutexLock lock(&mu_);
  model_ = model;
  embedder_ = embedder;
  ready_ = true;
}

void FaceEmbeddingService::BeginDrain() {
  std::vector<StreamReactor*> pinned;
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    for (StreamReactor* s : streams_) {
      if (s->Pin()) pinned.push_back(s);
    }
  }
  for (StreamReactor* s : pinned) s->DrainAndUnpin();
}

bool FaceEmbeddingService::WaitForIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  while (inflight_ > 0) {
    if (idle_.WaitWithDeadline(&mu_, deadline)) return inflight_ == 0;
  }
  return true;
}

void FaceEmbeddingService::WaitForQuiet(absl::Duration quiet, absl::Time deadline) {
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

int FaceEmbeddingService::inflight() const {
  absl::MutexLock lock(&mu_);
  return inflight_;
}

absl::Status FaceEmbeddingService::Admit() {
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

void FaceEmbeddingService::Release() {
  absl::MutexLock lock(&mu_);
  // A client that just got its answer sends its next call soon: that counts as activity too.
  last_arrival_ = absl::Now();
  --inflight_;
  metrics_->inflight().Add(-1);
  if (inflight_ == 0) idle_.SignalAll();
}

Embedder* FaceEmbeddingService::embedder() {
  absl::MutexLock lock(&mu_);
  return embedder_;
}

void FaceEmbeddingService::Unregister(StreamReactor* stream) {
  {
    absl::MutexLock lock(&mu_);
    streams_.erase(stream);
  }
  Release();
}

FaceEmbeddingService::CallContext FaceEmbeddingService::ContextOf(
    grpc::CallbackServerContext* context, std::function<bool()> is_cancelled) {
  CallContext call;
  call.is_cancelled = std::move(is_cancelled);
  const auto deadline = context->deadline();
  // gRPC reports "no deadline" as a far-future time point; absl::FromChrono would overflow.
  if (deadline < std::chrono::system_clock::now() + std::chrono::hours(24 * 365 * 10)) {
    call.deadline = absl::FromChrono(deadline);
  }
  return call;
}

void FaceEmbeddingService::FinishUnary(grpc::ServerUnaryReactor* reactor, const char* rpc,
                                       absl::Time start, const absl::Status& status) {
  metrics_->RecordRequest(rpc, status, Seconds(start));
  if (!status.ok()) spdlog::debug("{} failed: {}", rpc, status.ToString());
  reactor->Finish(ToGrpcStatus(status));
}

grpc::ServerUnaryReactor* FaceEmbeddingService::ServeUnary(
    grpc::CallbackServerContext* context, const char* rpc,
    absl::AnyInvocable<void(CallContext, DoneFn)> work) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  absl::Status admitted = Admit();
  if (!admitted.ok()) {
    FinishUnary(reactor, rpc, start, admitted);
    return reactor;
  }
  // A unary call ends only after its work's done: the work may poll the call's context.
  work(ContextOf(context, [context] { return context->IsCancelled(); }),
       [this, reactor, rpc, start](absl::Status status) {
         FinishUnary(reactor, rpc, start, status);
         Release();
       });
  return reactor;
}

grpc::ServerUnaryReactor* FaceEmbeddingService::Embed(grpc::CallbackServerContext* context,
                                                      const EmbedRequest* request,
                                                      EmbedResponse* response) {
  return ServeUnary(context, "Embed", [this, request, response](CallContext call, DoneFn done) {
    if (absl::Status id = CheckRequestId(*request); !id.ok()) return done(std::move(id));
    StartEmbed(request, response, std::move(call), std::move(done));
  });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* FaceEmbeddingService::EmbedStream(
    grpc::CallbackServerContext* context) {
  absl::Status admitted = Admit();
  if (!admitted.ok()) return new RejectedStream(admitted);
  auto* stream = new StreamReactor(this, context);
  bool drain_now;
  {
    absl::MutexLock lock(&mu_);
    streams_.insert(stream);
    // A drain that began between Admit() and here did not see this stream: drain it now.
    drain_now = draining_;
    if (drain_now) stream->Pin();
  }
  stream->Start();
  if (drain_now) stream->DrainAndUnpin();
  return stream;
}

grpc::ServerUnaryReactor* FaceEmbeddingService::Compare(grpc::CallbackServerContext* context,
                                                        const CompareRequest* request,
                                                        CompareResponse* response) {
  return ServeUnary(context, "Compare", [this, request, response](CallContext call, DoneFn done) {
    StartCompare(request, response, std::move(call), std::move(done));
  });
}

grpc::ServerUnaryReactor* FaceEmbeddingService::GetModelInfo(
    grpc::CallbackServerContext* context, const arcface::v1::GetModelInfoRequest* request,
    arcface::v1::ModelInfo* response) {
  return ServeUnary(context, "GetModelInfo", [this, response](CallContext, DoneFn done) {
    response->set_arch(model_.arch);
    response->set_embedding_dim(kEmbeddingDim);
    response->set_input_size(kCropSize);
    response->set_weights_sha256(model_.weights_sha256);
    response->set_model_id(model_.model_id);
    response->set_device(model_.device);
    response->set_precision(model_.precision);
    response->set_demo_weights(model_.demo_weights);
    response->set_server_version(options_.server_version);
    const auto& batching = embedder()->batcher().options();
    response->mutable_batching()->set_max_batch_size(batching.max_batch_size);
    response->mutable_batching()->set_max_queue_delay_us(
        static_cast<uint64_t>(absl::ToInt64Microseconds(batching.max_queue_delay)));
    response->mutable_batching()->set_max_queue_size(batching.max_queue_size);
    response->mutable_batching()->set_max_batches_in_flight(batching.max_batches_in_flight);
    response->set_max_faces_per_request(options_.max_faces_per_request);
    response->set_max_message_bytes(options_.max_message_bytes);
    if (model_.device_memory) {
      const engine::DeviceMemory memory = model_.device_memory();
      response->set_device_memory_allocated_bytes(static_cast<uint64_t>(memory.allocated_bytes));
      response->set_device_memory_reserved_bytes(static_cast<uint64_t>(memory.reserved_bytes));
    }
    done(absl::OkStatus());
  });
}

// ---------------------------------------------------------------------------------------------
// Embed

namespace {

// One step of preprocessing decodes faces for about this long (at least one face), then yields
// the pool thread to the next call's step.
constexpr absl::Duration kPreprocessSlice = absl::Milliseconds(5);
// One step of a Compare matrix: about this many multiply-adds (~10 ms).
constexpr int64_t kMatrixStepMacs = int64_t{1} << 24;

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

// A pool job that decodes, crops and aligns a call's `n` faces, a time slice per step, checking
// before each face that the call is still alive, then hands the crops to `then` (on the pool).
// `face_at(i)` is the i-th face; `label_at(i)` names it in errors ("face 3", "query 0").
template <typename State, typename FaceAt, typename LabelAt, typename Then>
WorkQueue::Job PreprocessJob(std::shared_ptr<State> state, int n, const image::Limits& limits,
                             ServiceMetrics* metrics, FaceAt face_at, LabelAt label_at,
                             Then then) {
  return [state = std::move(state), n, &limits, metrics, face_at = std::move(face_at),
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
      if (crops.empty()) crops.reserve(size_t(n) * kCropBytes);
      absl::Status s = AppendFaceCrop(face_at(next), limits, &crops);
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

}  // namespace

void FaceEmbeddingService::StartEmbed(const EmbedRequest* request, EmbedResponse* response,
                                      CallContext call, DoneFn done) {
  response->set_request_id(request->request_id());
  response->set_model_id(model_.model_id);
  const int n = request->faces_size();
  if (n > options_.max_faces_per_request) {
    metrics_->RecordRejected("too_many_faces", n);
    done(absl::ResourceExhaustedError(
        absl::StrCat("too many faces: ", n, " in one request, the limit is ",
                     options_.max_faces_per_request, " (--max-faces-per-request)")));
    return;
  }
  if (n == 0) {
    done(absl::OkStatus());
    return;
  }
  using State = CallState<EmbedRequest, EmbedResponse>;
  auto state = std::make_shared<State>(
      State{request, response, std::move(call.is_cancelled), call.deadline, std::move(done)});

  absl::Status queued = preprocess_->Submit(PreprocessJob(
      state, n, options_.image_limits, metrics_,
      [request](int i) -> const arcface::v1::Face& { return request->faces(i); },
      [](int i) { return absl::StrCat("face ", i); },
      [this, state, n](std::vector<uint8_t> crops) {
        const bool normalize = state->request->normalize();
        absl::Status scheduled = embedder()->Submit(
            std::move(crops), state->deadline, state->is_cancelled,
            [this, state, normalize, n](absl::StatusOr<EmbeddingBatch> rows) {
              if (!rows.ok()) return state->Complete(rows.status());
              FillEmbeddings(*rows, normalize, state->response);
              metrics_->AddFaces(n);
              state->Complete(absl::OkStatus());
            });
        if (!scheduled.ok()) state->Complete(scheduled);
      }),
      /*cost=*/n);
  if (!queued.ok()) {
    if (queued.code() == absl::StatusCode::kResourceExhausted) {
      metrics_->RecordRejected("preprocess_queue_full", n);
    }
    state->Complete(queued);
  }
}

// ---------------------------------------------------------------------------------------------
// Compare

namespace {

struct CompareWork {
  int rows = 0;
  int cols = 0;
  std::vector<float> queries;     // rows × 512 unit vectors
  std::vector<float> references;  // cols × 512 unit vectors
  // Face probes in embedding order: (is_query, index).
  std::vector<std::pair<bool, int>> faces;
};

using CompareState = CallState<CompareRequest, CompareResponse>;

const char* ProbeLabel(bool is_query) { return is_query ? "query" : "reference"; }

// Validates embedding probes and lists face probes; writes embedding probes' unit vectors.
absl::Status CollectProbes(const google::protobuf::RepeatedPtrField<Probe>& probes,
                           bool is_query, std::vector<float>* units,
                           std::vector<std::pair<bool, int>>* faces) {
  for (int i = 0; i < probes.size(); ++i) {
    const Probe& p = probes[i];
    const std::string label = absl::StrCat(ProbeLabel(is_query), " ", i);
    switch (p.probe_case()) {
      case Probe::kFace:
        faces->push_back({is_query, i});
        break;
      case Probe::kEmbedding: {
        const auto& values = p.embedding().values();
        if (values.size() != kEmbeddingDim) {
          return absl::InvalidArgumentError(absl::StrCat(label, ": embedding has ", values.size(),
                                                         " values, expected ", kEmbeddingDim));
        }
        for (int j = 0; j < kEmbeddingDim; ++j) {
          if (!std::isfinite(values[j])) {
            return absl::InvalidArgumentError(
                absl::StrCat(label, ": embedding value ", j, " is not finite"));
          }
        }
        if (!ToUnit(values.data(), units->data() + size_t(i) * kEmbeddingDim)) {
          return absl::InvalidArgumentError(
              absl::StrCat(label, ": embedding has zero norm (cosine is undefined)"));
        }
        break;
      }
      case Probe::PROBE_NOT_SET:
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": probe has neither a face nor an embedding"));
    }
  }
  return absl::OkStatus();
}

void FillCompare(const std::vector<float>& sims, const CompareRequest& request,
                 CompareResponse* response) {
  response->mutable_similarities()->Assign(sims.begin(), sims.end());
  if (request.has_threshold()) {
    const float threshold = request.threshold();
    auto* matches = response->mutable_matches();
    matches->Reserve(static_cast<int>(sims.size()));
    for (float s : sims) matches->Add(s >= threshold);
  }
}

// What a matrix job costs the pool: the memory of its answer, in crop-sized units.
int64_t MatrixCost(const CompareWork& work, const CompareRequest& request) {
  const uint64_t bytes = CompareReplyBytes(work.rows, work.cols, request.has_threshold(), 0);
  return static_cast<int64_t>((bytes + kCropBytes - 1) / kCropBytes);
}

// A pool job computing the matrix a block of rows per step; it stops when the call is dead.
WorkQueue::Job MatrixJob(std::shared_ptr<CompareState> state, std::shared_ptr<CompareWork> work,
                         ServiceMetrics* metrics) {
  return [state = std::move(state), work = std::move(work), metrics,
          blocks = std::optional<CosineBlocks>()]() mutable -> bool {
    absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, metrics);
    if (!alive.ok()) {
      state->Complete(alive);
      return false;
    }
    if (!blocks) blocks.emplace(work->queries, work->references, work->rows, work->cols,
                                kEmbeddingDim);
    if (blocks->ComputeSome(kMatrixStepMacs)) return true;
    FillCompare(std::move(*blocks).Take(), *state->request, state->response);
    state->Complete(absl::OkStatus());
    return false;
  };
}

}  // namespace

void FaceEmbeddingService::StartCompare(const CompareRequest* request, CompareResponse* response,
                                        CallContext call, DoneFn done) {
  response->set_model_id(model_.model_id);
  auto work = std::make_shared<CompareWork>();
  work->rows = request->queries_size();
  work->cols = request->references_size();
  response->set_rows(work->rows);
  response->set_cols(work->cols);
  if (work->rows > options_.max_compare_rows || work->cols > options_.max_compare_cols) {
    metrics_->RecordRejected("compare_too_large");
    return done(absl::ResourceExhaustedError(absl::StrCat(
        "compare matrix of ", work->rows, " queries x ", work->cols,
        " references is over the limit of ", options_.max_compare_rows, " x ",
        options_.max_compare_cols, " (--max-compare-rows, --max-compare-cols)")));
  }
  const uint64_t reply_bytes = CompareReplyBytes(work->rows, work->cols, request->has_threshold(),
                                                 model_.model_id.size());
  if (reply_bytes > options_.max_message_bytes) {
    metrics_->RecordRejected("compare_too_large");
    return done(absl::ResourceExhaustedError(absl::StrCat(
        "compare reply of ", work->rows, " queries x ", work->cols, " references",
        request->has_threshold() ? " (similarities and matches)" : "", " would take up to ",
        reply_bytes, " bytes, over the message cap of ", options_.max_message_bytes,
        " bytes (--max-message-bytes); split the references over several calls")));
  }
  if (request->has_threshold() && !std::isfinite(request->threshold())) {
    return done(absl::InvalidArgumentError("threshold is not finite"));
  }
  work->queries.resize(size_t(work->rows) * kEmbeddingDim);
  work->references.resize(size_t(work->cols) * kEmbeddingDim);
  absl::Status s = CollectProbes(request->queries(), true, &work->queries, &work->faces);
  if (s.ok()) s = CollectProbes(request->references(), false, &work->references, &work->faces);
  if (!s.ok()) return done(s);
  const int num_faces = static_cast<int>(work->faces.size());
  if (num_faces > options_.max_faces_per_request) {
    metrics_->RecordRejected("too_many_faces", num_faces);
    return done(absl::ResourceExhaustedError(
        absl::StrCat("too many face probes: ", num_faces, " in one request, the limit is ",
                     options_.max_faces_per_request, " (--max-faces-per-request)")));
  }
  const bool small = int64_t{work->rows} * work->cols * kEmbeddingDim <= kInlineCompareMacs;
  if (num_faces == 0 && small) {
    FillCompare(CosineMatrix(work->queries, work->references, work->rows, work->cols,
                             kEmbeddingDim),
                *request, response);
    return done(absl::OkStatus());
  }

  auto state = std::make_shared<CompareState>(
      CompareState{request, response, std::move(call.is_cancelled), call.deadline,
                   std::move(done)});
  absl::Status queued;
  if (num_faces == 0) {
    queued = preprocess_->Submit(MatrixJob(state, work, metrics_), MatrixCost(*work, *request));
  } else {
    queued = preprocess_->Submit(PreprocessJob(
        state, num_faces, options_.image_limits, metrics_,
        [request, work](int k) -> const arcface::v1::Face& {
          const auto& [is_query, index] = work->faces[k];
          return (is_query ? request->queries(index) : request->references(index)).face();
        },
        [work](int k) {
          const auto& [is_query, index] = work->faces[k];
          return absl::StrCat(ProbeLabel(is_query), " ", index);
        },
        [this, state, work, num_faces, small](std::vector<uint8_t> crops) {
          absl::Status scheduled = embedder()->Submit(
              std::move(crops), state->deadline, state->is_cancelled,
              [this, state, work, num_faces, small](absl::StatusOr<EmbeddingBatch> rows) {
                if (!rows.ok()) return state->Complete(rows.status());
                for (int k = 0; k < num_faces; ++k) {
                  const auto& [is_query, index] = work->faces[k];
                  float* unit = (is_query ? work->queries : work->references).data() +
                                size_t(index) * kEmbeddingDim;
                  if (!ToUnit(rows->values.data() + size_t(k) * kEmbeddingDim, unit)) {
                    return state->Complete(absl::InvalidArgumentError(absl::StrCat(
                        ProbeLabel(is_query), " ", index,
                        ": the face's embedding has zero norm (cosine is undefined)")));
                  }
                }
                metrics_->AddFaces(num_faces);
                if (small) {  // ~1 ms: here, on the batch thread
                  FillCompare(CosineMatrix(work->queries, work->references, work->rows,
                                           work->cols, kEmbeddingDim),
                              *state->request, state->response);
                  return state->Complete(absl::OkStatus());
                }
                // The matrix itself on the pool, so the batch thread only feeds the model; as a
                // later stage of a call already admitted, it is never refused for room (these
                // calls are bounded by the batcher's queue, which they came through).
                absl::Status continued = preprocess_->Continue(
                    MatrixJob(state, work, metrics_), MatrixCost(*work, *state->request));
                if (!continued.ok()) state->Complete(continued);
              });
          if (!scheduled.ok()) state->Complete(scheduled);
        }),
        /*cost=*/num_faces);
  }
  if (!queued.ok()) {
    if (queued.code() == absl::StatusCode::kResourceExhausted) {
      metrics_->RecordRejected("preprocess_queue_full", num_faces);
    }
    state->Complete(queued);
  }
}

}  // namespace arcface::service
