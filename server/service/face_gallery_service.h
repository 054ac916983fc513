// FaceGalleryService: the arcface.v1.FaceGallery gRPC service (Enroll, Identify, Forget,
// ListSubjects, GetGalleryInfo) on the callback API, over gallery::Galleries.
//
// Contract
// - Calls are admitted, drained and metered with FaceEmbeddingService's (the CallEnv it shares):
//   UNAVAILABLE before the model is ready and after a drain began. Without galleries (the
//   server's --gallery-store none) every method answers UNIMPLEMENTED saying how to enable it.
// - Face probes are decoded on the preprocessing pool and embedded through the same batcher as
//   Embed; embedding probes are taken as given (512 finite values, normalized here). Store
//   writes and searches then run on the gallery's own WorkQueue, so a slow or unreachable store
//   or a large search never holds the threads that decode other callers' faces.
// - Errors: INVALID_ARGUMENT naming the field or probe ("faces 2: embedding has 3 values,
//   expected 512", "subject_id: 300 bytes, the limit is 256"); RESOURCE_EXHAUSTED for more faces
//   or probes than the limits (flags, reported in GalleryInfo.limits and ModelInfo.gallery), a
//   full queue, or an Identify reply that could exceed max_message_bytes; NOT_FOUND for an
//   unknown gallery (Identify, Forget, ListSubjects, GetGalleryInfo), subject or face;
//   FAILED_PRECONDITION when the gallery is bound to another model (both ids named) or a
//   request mixes embeddings of another model with faces; ALREADY_EXISTS for a request_id
//   reused for another subject; UNAVAILABLE when the store is down (writes only: Identify
//   answers from memory); DEADLINE_EXCEEDED / CANCELLED while the faces are prepared or queued.
// - Enroll answers only after its faces are durable in the store and visible to Identify.
// - Identify without a threshold cuts at the probes' model's default_threshold (its family's,
//   ArcFace or dlib, for embeddings of a model not served here; none for another family); the
//   response's `threshold` says the one used.
// - Lifetime: the env's parts, the galleries and the queue are borrowed and must outlive every
//   call (the server shuts gRPC down first). Thread safety: any method from any thread.
#ifndef ARCFACE_SERVER_SERVICE_FACE_GALLERY_SERVICE_H_
#define ARCFACE_SERVER_SERVICE_FACE_GALLERY_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "arcface/v1/face_gallery.grpc.pb.h"
#include "server/gallery/galleries.h"
#include "server/service/call_context.h"
#include "server/service/gallery_metrics.h"
#include "server/service/gallery_search.h"
#include "server/service/work_queue.h"

namespace arcface::service {

struct GalleryServiceOptions {
  // Faces in one Enroll; more is RESOURCE_EXHAUSTED. Default 64 (--gallery-max-faces-per-enroll).
  int max_faces_per_enroll = 64;
  // Probes in one Identify; more is RESOURCE_EXHAUSTED. Default 256 (--gallery-max-probes).
  int max_probes_per_identify = 256;
  // The largest top_k; more is INVALID_ARGUMENT. Default 100 (--gallery-max-top-k).
  int max_top_k = 100;
  // Reported (GalleryLimits); the galleries apply it.
  uint64_t hnsw_min_faces = 0;
};

// The limits as GalleryInfo.limits and ModelInfo.gallery report them.
void FillGalleryLimits(const GalleryServiceOptions& options, const gallery::Galleries* galleries,
                       arcface::v1::GalleryLimits* out);

class FaceGalleryService final : public arcface::v1::FaceGallery::CallbackService {
 public:
  // `queue` runs store writes and searches. Until SetGalleries() (and for good without it),
  // every method answers UNIMPLEMENTED once the service is ready.
  FaceGalleryService(const CallEnv& env, const GalleryServiceOptions& options, WorkQueue* queue,
                     GalleryMetrics* metrics);
  // The galleries, once loaded (before the service is ready); borrowed.
  void SetGalleries(gallery::Galleries* galleries);
  // Identify's search, which Detect with a gallery shares (FaceEmbeddingService::SetDetection);
  // it lives as long as this service.
  GallerySearch* search() { return &search_; }

  grpc::ServerUnaryReactor* Enroll(grpc::CallbackServerContext* context,
                                   const arcface::v1::EnrollRequest* request,
                                   arcface::v1::EnrollResponse* response) override;
  grpc::ServerUnaryReactor* Identify(grpc::CallbackServerContext* context,
                                     const arcface::v1::IdentifyRequest* request,
                                     arcface::v1::IdentifyResponse* response) override;
  grpc::ServerUnaryReactor* Forget(grpc::CallbackServerContext* context,
                                   const arcface::v1::ForgetRequest* request,
                                   arcface::v1::ForgetResponse* response) override;
  grpc::ServerUnaryReactor* ListSubjects(grpc::CallbackServerContext* context,
                                         const arcface::v1::ListSubjectsRequest* request,
                                         arcface::v1::ListSubjectsResponse* response) override;
  grpc::ServerUnaryReactor* GetGalleryInfo(grpc::CallbackServerContext* context,
                                           const arcface::v1::GetGalleryInfoRequest* request,
                                           arcface::v1::GalleryInfo* response) override;

 private:
  // Serves `work` like ServeUnary, or UNIMPLEMENTED without galleries.
  grpc::ServerUnaryReactor* Serve(grpc::CallbackServerContext* context, const char* rpc,
                                  absl::AnyInvocable<void(CallContext, DoneFn)> work,
                                  ModelIdOf model_id = nullptr);

  gallery::Galleries* galleries() const { return galleries_.load(); }

  const CallEnv env_;
  const GalleryServiceOptions options_;
  std::atomic<gallery::Galleries*> galleries_{nullptr};
  WorkQueue* const queue_;
  GalleryMetrics* const metrics_;
  GallerySearch search_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_FACE_GALLERY_SERVICE_H_
