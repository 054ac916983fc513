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
// - Detect and DetectStream (detect_call.h, detect_stream.h): a frame is decoded and prepared
//   on the preprocessing pool, its faces found by the detector's own batcher (FrameDetector,
//   frames of many calls in one batch) and, with embed or a gallery, aligned and embedded
//   through the same Embedder as Embed, then identified on the gallery's queue. DetectStream
//   is EmbedStream's reactor over DetectRequest/DetectResponse. Without a detector
//   (SetDetection(nullptr, ...): --detector none) both answer UNIMPLEMENTED saying how to
//   enable it.
// - Lifetime: the service must outlive the grpc::Server it is registered with (destroy the
//   server, or Shutdown() it, first). The Embedder, metrics and work queue are borrowed and must
//   outlive every call (shut the server down before them).
// - Models: every call may name a served model (ServedModels: `model` on the request, empty the
//   default); each model has its own Embedder (batcher, queue, model threads), so one model's
//   queue or failure never holds another's calls. ListModels answers each model's ModelInfo,
//   the default first. An unknown name is NOT_FOUND naming the served ones.
// - Thread safety: every public method may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_FACE_EMBEDDING_SERVICE_H_
#define ARCFACE_SERVER_SERVICE_FACE_EMBEDDING_SERVICE_H_

#include <atomic>
#include <cstdint>

#include <grpcpp/grpcpp.h>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "arcface/v1/face_embedding.grpc.pb.h"
#include "server/service/admission.h"
#include "server/service/call_context.h"
#include "server/service/detect_call.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"
#include "server/service/service_metrics.h"
#include "server/service/service_options.h"
#include "server/service/work_queue.h"

namespace arcface::service {

// The generated CallbackService, with EmbedStream and DetectStream served raw
// (grpc::ByteBuffer messages): gRPC's typed reactor cannot tell a message that does not parse
// from the client's half-close.
using FaceEmbeddingCallbackBase = arcface::v1::FaceEmbedding::WithCallbackMethod_Embed<
    arcface::v1::FaceEmbedding::WithRawCallbackMethod_EmbedStream<
        arcface::v1::FaceEmbedding::WithCallbackMethod_Compare<
            arcface::v1::FaceEmbedding::WithCallbackMethod_GetModelInfo<
                arcface::v1::FaceEmbedding::WithCallbackMethod_Detect<
                    arcface::v1::FaceEmbedding::WithRawCallbackMethod_DetectStream<
                        arcface::v1::FaceEmbedding::WithCallbackMethod_ListModels<
                            arcface::v1::FaceEmbedding::Service>>>>>>>;

// The calls live in their own files: admission and drain (admission.h), Embed (embed_call.h),
// EmbedStream (embed_stream.h), Compare (compare_call.h), Detect (detect_call.h) and
// DetectStream (detect_stream.h); this class wires them to gRPC.
class FaceEmbeddingService final : public FaceEmbeddingCallbackBase {
 public:
  // `metrics` and `preprocess` are borrowed.
  FaceEmbeddingService(const ServiceOptions& options, ServiceMetrics* metrics,
                       WorkQueue* preprocess);
  ~FaceEmbeddingService() override;

  // The models are loaded and warm: calls are served from now on. Their Embedders are borrowed.
  void SetReady(std::vector<ServedModel> models);
  // One model (tests).
  void SetReady(Embedder* embedder, const ModelDescription& model) {
    SetReady({{model, embedder, nullptr}});
  }
  // The served models, whose versions a reload swaps (ServedModels::Replace()).
  ServedModels& models() { return admission_.models(); }
  // What GetModelInfo reports of the gallery (ModelInfo.gallery); set before SetReady().
  void SetGalleryLimits(const arcface::v1::GalleryLimits& limits) { gallery_limits_ = limits; }
  // Detect's detector (null: --detector none, Detect answers UNIMPLEMENTED) and the gallery
  // search it shares with FaceGallery (null: none); borrowed, set before SetReady().
  void SetDetection(FrameDetector* detector, GallerySearch* gallery) {
    detection_ = DetectionEnv{detector, gallery};
  }
  // New calls get UNAVAILABLE; open streams finish once their read messages are answered.
  void BeginDrain();
  // Blocks until no accepted call is unfinished or until `deadline`; true when idle.
  bool WaitForIdle(absl::Time deadline);
  // Blocks until no call has arrived (refused ones count) or finished for `quiet`, or until
  // `deadline`.
  // Between the drain and the gRPC server's shutdown: calls still arriving when the server shuts
  // down are killed by gRPC before any handler sees them (clients get CANCELLED instead of this
  // service's UNAVAILABLE), so the server waits until clients have heard UNAVAILABLE and stopped.
  void WaitForQuiet(absl::Duration quiet, absl::Time deadline);
  int inflight() const;
  // What the calls share; the gallery's service (face_gallery_service.h) serves through it too.
  const CallEnv& env() const { return env_; }

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
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const arcface::v1::ListModelsRequest* request,
                                       arcface::v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* Detect(grpc::CallbackServerContext* context,
                                   const arcface::v1::DetectRequest* request,
                                   arcface::v1::DetectResponse* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* DetectStream(
      grpc::CallbackServerContext* context) override;

 private:
  void FillModelInfo(const ServedModel& model, arcface::v1::ModelInfo* info);
  void FillDetectorInfo(arcface::v1::DetectorInfo* info);

  const ServiceOptions options_;
  arcface::v1::GalleryLimits gallery_limits_;
  DetectionEnv detection_;
  Admission admission_;
  // What all streams hold (each stream's held bytes summed), against streams_max_held_bytes.
  std::atomic<int64_t> stream_bytes_held_{0};
  // Points into the members above.
  const CallEnv env_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_FACE_EMBEDDING_SERVICE_H_
