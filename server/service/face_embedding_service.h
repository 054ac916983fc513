// FaceEmbeddingService: the arcface.v1.FaceEmbedding gRPC service on the callback API.
//
// Contract
// - Handlers return at once. Faces are decoded, cropped and aligned on the preprocessing
//   WorkQueue, their crops go through the Embedder's batcher, and the call is finished from the
//   batch thread when its last crop came back (or at once on an early error). Every call is
//   finished exactly once; a stream's reactor deletes itself in OnDone.
// - Errors (absl::Status inside, mapped to grpc::Status only when a call finishes):
//   INVALID_ARGUMENT naming the face or probe and the reason ("face 3: undecodable image ...",
//   "query 2: embedding has 128 values, expected 512"); RESOURCE_EXHAUSTED for too many faces,
//   a Compare matrix over the caps or whose reply would exceed max_message_bytes (both before
//   any work), a full batcher or preprocessing pool (transient); DEADLINE_EXCEEDED / CANCELLED
//   when the call's deadline passed or it was cancelled before its crops ran (they then never
//   reach the model); UNAVAILABLE before SetReady() and after BeginDrain(). One request's
//   failure never fails another's crops.
// - Costly work stops with the call: preprocessing checks the deadline and cancellation before
//   each face, a large Compare matrix before each block of rows (~10 ms); the pool's steps take
//   turns between calls (see WorkQueue), so a call with many slow images delays a small call by
//   about one face per pool thread, not by its whole request. The pool admits calls by their
//   faces (a Compare matrix by its size in crops), so what the calls on it hold is bounded.
// - request_id: at most kMaxRequestIdBytes; a longer one is INVALID_ARGUMENT naming the limit.
// - EmbedStream: one response per request message, in order, request_id echoed; a message's
//   error travels in EmbedResponse.error and the stream goes on, also for a message that does
//   not parse as an EmbedRequest ("message 3 is not a valid EmbedRequest: ..."; the method is
//   served raw for that). At most ServiceOptions::stream_max_in_flight messages of one stream
//   are processed at a time, and a stream stops reading while the bytes it holds (messages read
//   and not answered, answers not written) reach stream_max_held_bytes, or those of all streams
//   reach streams_max_held_bytes, unless it holds nothing; it reads again as its answers are
//   written (backpressure through gRPC flow control). A message's request is freed once it is
//   answered. When a drain begins, a stream finishes after answering the messages it had read,
//   with UNAVAILABLE if the client had not half-closed; a message read after a cancellation or
//   after the stream finished is dropped (never started), counted CANCELLED or UNAVAILABLE.
// - Lifetime: the service must outlive the grpc::Server it is registered with (destroy the
//   server, or Shutdown() it, first). The Embedder, metrics and work queue are borrowed and must
//   outlive every call (shut the server down before them).
// - Thread safety: every public method may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_FACE_EMBEDDING_SERVICE_H_
#define ARCFACE_SERVER_SERVICE_FACE_EMBEDDING_SERVICE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "server/image/image.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"
#include "server/service/metrics.h"
#include "server/service/work_queue.h"

namespace arcface::service {

// The longest request_id accepted (Embed, EmbedStream); it is echoed in every answer.
inline constexpr size_t kMaxRequestIdBytes = 1024;

struct ServiceOptions {
  int max_faces_per_request = 256;  // Embed faces; Compare face probes (queries + references)
  int max_compare_rows = 4096;      // Compare: queries
  int max_compare_cols = 4096;      // Compare: references
  int stream_max_in_flight = 16;    // EmbedStream messages processed at once per stream
  // Bytes held by one stream, and by all streams together, beyond which streams stop reading
  // (a stream holding nothing still reads one message).
  int64_t stream_max_held_bytes = int64_t{16} << 20;
  int64_t streams_max_held_bytes = int64_t{256} << 20;
  image::Limits image_limits;
  // Requests: enforced by the gRPC server (reported by GetModelInfo). Replies: a Compare whose
  // reply would exceed it is refused (RESOURCE_EXHAUSTED) up front.
  uint64_t max_message_bytes = uint64_t{64} << 20;
  std::string server_version;
};

// The generated CallbackService, with EmbedStream served raw (grpc::ByteBuffer messages): gRPC's
// typed reactor cannot tell a message that does not parse from the client's half-close.
using FaceEmbeddingCallbackBase = arcface::v1::FaceEmbedding::WithCallbackMethod_Embed<
    arcface::v1::FaceEmbedding::WithRawCallbackMethod_EmbedStream<
        arcface::v1::FaceEmbedding::WithCallbackMethod_Compare<
            arcface::v1::FaceEmbedding::WithCallbackMethod_GetModelInfo<
                arcface::v1::FaceEmbedding::Service>>>>;

class FaceEmbeddingService final : public FaceEmbeddingCallbackBase {
 public:
  // `metrics` and `preprocess` are borrowed.
  FaceEmbeddingService(const ServiceOptions& options, ServiceMetrics* metrics,
                       WorkQueue* preprocess);
  ~FaceEmbeddingService() override;

  // The model is loaded and warm: calls are served from now on. `embedder` is borrowed.
  void SetReady(Embedder* embedder, const ModelDescription& model) ABSL_LOCKS_EXCLUDED(mu_);
  // New calls get UNAVAILABLE; open streams finish once their read messages are answered.
  void BeginDrain() ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until no accepted call is unfinished or until `deadline`; true when idle.
  bool WaitForIdle(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until no call has arrived (refused ones count) or finished for `quiet`, or until
  // `deadline`.
  // Between the drain and the gRPC server's shutdown: calls still arriving when the server shuts
  // down are killed by gRPC before any handler sees them (clients get CANCELLED instead of this
  // service's UNAVAILABLE), so the server waits until clients have heard UNAVAILABLE and stopped.
  void WaitForQuiet(absl::Duration quiet, absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  int inflight() const ABSL_LOCKS_EXCLUDED(mu_);

  grpc::ServerUnaryReactor* Embed(grpc::CallbackServerContext* context,
                                  const arcface::v1::EmbedRequest* request,
                                  arcface::v1::EmbedResponse* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* EmbedStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Compare(grpc::CallbackServerContext* context,
                                    const arcface::v1::CompareRequest* request,
                                    arcface::v1::CompareResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const arcface::v1::GetModelInfoRequest* request,
                                         arcface::v1::ModelInfo* response) override;

 private:
  class StreamReactor;
  class RejectedStream;
  struct CallContext {
    absl::Time deadline = absl::InfiniteFuture();
    std::function<bool()> is_cancelled;
  };
  using DoneFn = absl::AnyInvocable<void(absl::Status)>;

  // Counts an accepted call, or says why it is refused.
  absl::Status Admit() ABSL_LOCKS_EXCLUDED(mu_);
  void Release() ABSL_LOCKS_EXCLUDED(mu_);
  // A stream's OnDone: forget it and release its call.
  void Unregister(StreamReactor* stream) ABSL_LOCKS_EXCLUDED(mu_);
  Embedder* embedder() ABSL_LOCKS_EXCLUDED(mu_);

  // The work of one Embed (or stream message): fills *response; calls `done` exactly once,
  // possibly before returning. `request` and `response` must live until then, and are not
  // touched after it (a stream frees them in its done).
  void StartEmbed(const arcface::v1::EmbedRequest* request, arcface::v1::EmbedResponse* response,
                  CallContext call, DoneFn done);
  void StartCompare(const arcface::v1::CompareRequest* request,
                    arcface::v1::CompareResponse* response, CallContext call, DoneFn done);
  void FinishUnary(grpc::ServerUnaryReactor* reactor, const char* rpc, absl::Time start,
                   const absl::Status& status);
  // The life of every unary call: admit it (or finish it with the refusal), run `work`, which
  // calls its DoneFn exactly once, then finish, meter and release the call from there.
  grpc::ServerUnaryReactor* ServeUnary(grpc::CallbackServerContext* context, const char* rpc,
                                       absl::AnyInvocable<void(CallContext, DoneFn)> work);

  // The call's deadline, and how its work learns of a cancellation: `is_cancelled` is polled
  // only until the work's done (the work may keep it longer, in the batcher).
  static CallContext ContextOf(grpc::CallbackServerContext* context,
                               std::function<bool()> is_cancelled);

  const ServiceOptions options_;
  ServiceMetrics* const metrics_;
  WorkQueue* const preprocess_;

  mutable absl::Mutex mu_;
  absl::CondVar idle_;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int inflight_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_arrival_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  Embedder* embedder_ ABSL_GUARDED_BY(mu_) = nullptr;
  absl::flat_hash_set<StreamReactor*> streams_ ABSL_GUARDED_BY(mu_);
  // What all streams hold (StreamReactor's held_ summed), against streams_max_held_bytes.
  std::atomic<int64_t> stream_bytes_held_{0};
  // Written once by SetReady() before ready_ becomes true; read-only afterwards.
  ModelDescription model_;
};

// The cosine similarity matrix of unit-length rows (rows × dim and cols × dim, row-major):
// similarities[i * cols + j] = dot(a_i, b_j), computed a block of rows at a time so that a large
// matrix takes turns on the pool with other calls' work and stops when its call is abandoned.
// Exposed for tests.
class CosineBlocks {
 public:
  // `a_unit` is borrowed until the last ComputeSome(); `b_unit` is copied (transposed).
  CosineBlocks(const std::vector<float>& a_unit, const std::vector<float>& b_unit, int rows,
               int cols, int dim);
  // Computes the next rows, about `macs` multiply-adds (at least one row); true while rows remain.
  bool ComputeSome(int64_t macs);
  int rows_done() const { return next_row_; }
  // The matrix; every row must be done.
  std::vector<float> Take() && { return std::move(out_); }

 private:
  const std::vector<float>& a_unit_;
  const int rows_, cols_, dim_;
  std::vector<float> bt_;  // b transposed: dim × cols
  std::vector<float> out_;
  std::vector<double> acc_;
  int next_row_ = 0;
};

// The whole matrix at once.
std::vector<float> CosineMatrix(const std::vector<float>& a_unit, const std::vector<float>& b_unit,
                                int rows, int cols, int dim);

// An upper bound on the serialized size of a CompareResponse of rows × cols (with `matches` when
// a threshold is given): a Compare whose reply would exceed ServiceOptions::max_message_bytes is
// refused before any work.
uint64_t CompareReplyBytes(int rows, int cols, bool with_matches, size_t model_id_bytes);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_FACE_EMBEDDING_SERVICE_H_
