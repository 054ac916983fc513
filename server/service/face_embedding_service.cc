#include "server/service/face_embedding_service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <memory>
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

// Whether the call is still worth working on; checked before work that costs.
absl::Status CheckAlive(const std::function<bool()>& is_cancelled, absl::Time deadline) {
  if (is_cancelled && is_cancelled()) return absl::CancelledError("the call was cancelled");
  if (absl::Now() >= deadline) {
    return absl::DeadlineExceededError("the deadline passed before the faces were embedded");
  }
  return absl::OkStatus();
}

double RawNorm(const float* row) {
  double ss = 0;
  for (int j = 0; j < kEmbeddingDim; ++j) ss += double(row[j]) * row[j];
  return std::sqrt(ss);
}

void FillEmbeddings(const std::vector<float>& values, bool normalize, EmbedResponse* response) {
  const int n = static_cast<int>(values.size() / kEmbeddingDim);
  response->mutable_embeddings()->Reserve(n);
  for (int i = 0; i < n; ++i) {
    const float* row = values.data() + size_t(i) * kEmbeddingDim;
    const double norm = RawNorm(row);
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

std::vector<float> CosineMatrix(const std::vector<float>& a_unit, const std::vector<float>& b_unit,
                                int rows, int cols, int dim) {
  // out[i][j] = sum_k a[i][k] * b[j][k], with b transposed so that the inner loop runs over j
  // element-wise (vectorizable without reassociating the sum).
  std::vector<float> bt(size_t(dim) * cols);
  for (int j = 0; j < cols; ++j) {
    for (int k = 0; k < dim; ++k) bt[size_t(k) * cols + j] = b_unit[size_t(j) * dim + k];
  }
  std::vector<float> out(size_t(rows) * cols);
  std::vector<double> acc(cols);  // double sums: cos(a, a) is 1 to float rounding
  for (int i = 0; i < rows; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const float* a = a_unit.data() + size_t(i) * dim;
    for (int k = 0; k < dim; ++k) {
      const double ak = a[k];
      const float* b = bt.data() + size_t(k) * cols;
      for (int j = 0; j < cols; ++j) acc[j] += ak * b[j];
    }
    float* row = out.data() + size_t(i) * cols;
    for (int j = 0; j < cols; ++j) row[j] = static_cast<float>(acc[j]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// EmbedStream

// Answers a stream that arrives while the server is not serving, then deletes itself.
class FaceEmbeddingService::RejectedStream final
    : public grpc::ServerBidiReactor<EmbedRequest, EmbedResponse> {
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
class FaceEmbeddingService::StreamReactor final
    : public grpc::ServerBidiReactor<EmbedRequest, EmbedResponse> {
 public:
  StreamReactor(FaceEmbeddingService* service, grpc::CallbackServerContext* context)
      : service_(service), call_(ContextOf(context)) {}

  void Start() { Act(Decide(/*unpin=*/false)); }

  void OnReadDone(bool ok) override {
    Slot* to_process = nullptr;
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      read_in_flight_ = false;
      if (ok) {
        auto slot = std::make_unique<Slot>();
        slot->request.Swap(read_buffer_.get());
        slot->start = absl::Now();
        to_process = slot.get();
        slots_.push_back(std::move(slot));
        // Pinned until the message is started, so the reactor cannot finish under it.
        ++pending_actions_;
      } else {
        reads_done_ = true;
        actions = DecideLocked();
      }
    }
    if (to_process == nullptr) return Act(actions);
    service_->StartEmbed(&to_process->request, &to_process->response, call_,
                         [this, to_process](absl::Status status) {
                           OnMessageDone(to_process, std::move(status));
                         });
    Act(Decide(/*unpin=*/true));
  }

  void OnWriteDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      slots_.pop_front();
      if (!ok) broken_ = true;
      actions = DecideLocked();
    }
    Act(actions);
  }

  void OnCancel() override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      broken_ = true;
      actions = DecideLocked();
    }
    Act(actions);
  }

  void OnDone() override {
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
    EmbedRequest request;
    EmbedResponse response;
    absl::Time start;
    bool ready = false;
  };
  struct Actions {
    EmbedRequest* read = nullptr;
    const EmbedResponse* write = nullptr;
    bool finish = false;
    grpc::Status status;
  };

  void OnMessageDone(Slot* slot, absl::Status status) {
    service_->metrics_->RecordRequest("EmbedStream", status, Seconds(slot->start));
    if (!status.ok()) {
      std::string request_id = slot->request.request_id();
      slot->response.Clear();
      slot->response.set_request_id(request_id);
      slot->response.set_model_id(service_->model_.model_id);
      ToProtoStatus(status, slot->response.mutable_error());
    }
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      slot->ready = true;
      actions = DecideLocked();
    }
    // This runs on a pool or batch thread, not in a gRPC reaction: once mu_ is released, a
    // reaction may finish the stream and delete this reactor unless an action pins it (or is
    // the finish), so with none there is nothing to do and `this` must not be touched.
    if (actions.read != nullptr || actions.write != nullptr || actions.finish) Act(actions);
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
      slots_.pop_front();
    }
    if (!broken_ && !write_in_flight_ && !slots_.empty() && slots_.front()->ready) {
      write_in_flight_ = true;
      a.write = &slots_.front()->response;
    }
    if (!broken_ && !draining_ && !reads_done_ && !read_in_flight_ &&
        static_cast<int>(slots_.size()) < service_->options_.stream_max_in_flight) {
      read_in_flight_ = true;
      read_buffer_ = std::make_unique<EmbedRequest>();
      a.read = read_buffer_.get();
    }
    if (a.read != nullptr || a.write != nullptr) {
      ++pending_actions_;
      return a;
    }
    // A read may still be outstanding when a drain or a cancellation ends the stream; gRPC
    // completes it when the call ends, before OnDone.
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
  const CallContext call_;

  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);  // read, not yet written
  std::unique_ptr<EmbedRequest> read_buffer_ ABSL_GUARDED_BY(mu_);
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
    grpc::CallbackServerContext* context) {
  CallContext call;
  const auto deadline = context->deadline();
  // gRPC reports "no deadline" as a far-future time point; absl::FromChrono would overflow.
  if (deadline < std::chrono::system_clock::now() + std::chrono::hours(24 * 365 * 10)) {
    call.deadline = absl::FromChrono(deadline);
  }
  call.is_cancelled = [context] { return context->IsCancelled(); };
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
  work(ContextOf(context), [this, reactor, rpc, start](absl::Status status) {
    FinishUnary(reactor, rpc, start, status);
    Release();
  });
  return reactor;
}

grpc::ServerUnaryReactor* FaceEmbeddingService::Embed(grpc::CallbackServerContext* context,
                                                      const EmbedRequest* request,
                                                      EmbedResponse* response) {
  return ServeUnary(context, "Embed", [this, request, response](CallContext call, DoneFn done) {
    StartEmbed(request, response, std::move(call), std::move(done));
  });
}

grpc::ServerBidiReactor<EmbedRequest, EmbedResponse>* FaceEmbeddingService::EmbedStream(
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

  absl::Status queued = preprocess_->Submit([this, state]() {
    absl::Status alive = CheckAlive(state->is_cancelled, state->deadline);
    if (!alive.ok()) return state->Complete(alive);
    const int n = state->request->faces_size();
    const absl::Time preprocess_start = absl::Now();
    std::vector<uint8_t> crops;
    crops.reserve(size_t(n) * kCropBytes);
    for (int i = 0; i < n; ++i) {
      absl::Status s = AppendFaceCrop(state->request->faces(i), options_.image_limits, &crops);
      if (!s.ok()) return state->Complete(WithContext(s, absl::StrCat("face ", i)));
    }
    metrics_->RecordPreprocess(Seconds(preprocess_start));
    alive = CheckAlive(state->is_cancelled, state->deadline);
    if (!alive.ok()) return state->Complete(alive);
    const bool normalize = state->request->normalize();
    absl::Status scheduled = embedder()->Submit(
        std::move(crops), state->deadline, state->is_cancelled,
        [this, state, normalize, n](absl::StatusOr<std::vector<float>> values) {
          if (!values.ok()) return state->Complete(values.status());
          FillEmbeddings(*values, normalize, state->response);
          metrics_->AddFaces(n);
          state->Complete(absl::OkStatus());
        });
    if (!scheduled.ok()) state->Complete(scheduled);
  });
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

void FillCompare(const CompareWork& work, const CompareRequest& request,
                 CompareResponse* response) {
  std::vector<float> sims =
      CosineMatrix(work.queries, work.references, work.rows, work.cols, kEmbeddingDim);
  response->mutable_similarities()->Assign(sims.begin(), sims.end());
  if (request.has_threshold()) {
    const float threshold = request.threshold();
    auto* matches = response->mutable_matches();
    matches->Reserve(static_cast<int>(sims.size()));
    for (float s : sims) matches->Add(s >= threshold);
  }
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
  const int64_t macs = int64_t{work->rows} * work->cols * kEmbeddingDim;
  if (num_faces == 0 && macs <= kInlineCompareMacs) {
    FillCompare(*work, *request, response);
    return done(absl::OkStatus());
  }

  using State = CallState<CompareRequest, CompareResponse>;
  auto state = std::make_shared<State>(
      State{request, response, std::move(call.is_cancelled), call.deadline, std::move(done)});
  // The matrix itself: on this pool when large, so the batch thread only feeds the model.
  auto finish = [this, state, work, macs](bool may_defer) {
    if (may_defer && macs > kInlineCompareMacs) {
      absl::Status deferred = preprocess_->Submit([state, work] {
        FillCompare(*work, *state->request, state->response);
        state->Complete(absl::OkStatus());
      });
      if (deferred.ok()) return;
      // The pool is full or stopping: compute here rather than fail an accepted call.
    }
    FillCompare(*work, *state->request, state->response);
    state->Complete(absl::OkStatus());
  };

  absl::Status queued = preprocess_->Submit([this, state, work, finish, num_faces]() {
    absl::Status alive = CheckAlive(state->is_cancelled, state->deadline);
    if (!alive.ok()) return state->Complete(alive);
    if (num_faces == 0) return finish(/*may_defer=*/false);
    const absl::Time preprocess_start = absl::Now();
    std::vector<uint8_t> crops;
    crops.reserve(size_t(num_faces) * kCropBytes);
    for (const auto& [is_query, index] : work->faces) {
      const Probe& p =
          is_query ? state->request->queries(index) : state->request->references(index);
      absl::Status s = AppendFaceCrop(p.face(), options_.image_limits, &crops);
      if (!s.ok()) {
        return state->Complete(WithContext(s, absl::StrCat(ProbeLabel(is_query), " ", index)));
      }
    }
    metrics_->RecordPreprocess(Seconds(preprocess_start));
    alive = CheckAlive(state->is_cancelled, state->deadline);
    if (!alive.ok()) return state->Complete(alive);
    absl::Status scheduled = embedder()->Submit(
        std::move(crops), state->deadline, state->is_cancelled,
        [this, state, work, finish, num_faces](absl::StatusOr<std::vector<float>> values) {
          if (!values.ok()) return state->Complete(values.status());
          for (int k = 0; k < num_faces; ++k) {
            const auto& [is_query, index] = work->faces[k];
            float* unit = (is_query ? work->queries : work->references).data() +
                          size_t(index) * kEmbeddingDim;
            if (!ToUnit(values->data() + size_t(k) * kEmbeddingDim, unit)) {
              return state->Complete(absl::InvalidArgumentError(
                  absl::StrCat(ProbeLabel(is_query), " ", index,
                               ": the face's embedding has zero norm (cosine is undefined)")));
            }
          }
          metrics_->AddFaces(num_faces);
          finish(/*may_defer=*/true);
        });
    if (!scheduled.ok()) state->Complete(scheduled);
  });
  if (!queued.ok()) {
    if (queued.code() == absl::StatusCode::kResourceExhausted) {
      metrics_->RecordRejected("preprocess_queue_full", num_faces);
    }
    state->Complete(queued);
  }
}

}  // namespace arcface::service
