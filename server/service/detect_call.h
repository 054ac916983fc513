// The work of one Detect: a unary call, or one frame of a DetectStream. The frame is decoded and
// prepared for the detector on the preprocessing pool, goes through the detector's own batcher
// (FrameDetector) with the frames of other calls, and its faces are written into the response by
// score. With `embed` (or a gallery), each face is then aligned by its five landmarks from the
// decoded frame on the pool and embedded through the Embedder, like an Embed's faces; with a
// gallery, the embeddings are then identified on the gallery queue (GallerySearch, shared with
// FaceGallery.Identify).
//
// Contract
// - Ownership: `request` and `response` are borrowed until `done` is called, and not touched
//   after it. `env` is copied; what it points to (env.detection included) outlives the call.
// - Blocking: StartDetect() never blocks; `done` is called exactly once, possibly before it
//   returns (a cheap check failed), else from the pool, the detector's or the embedder's batch
//   thread or the gallery queue.
// - Errors: UNIMPLEMENTED without a detector (--detector none) or, for a request naming a
//   gallery, without galleries (--gallery-store none), each saying how to enable it;
//   INVALID_ARGUMENT naming the field and the reason (no image, an undecodable, empty or too
//   large frame, raw pixels of the wrong size, min_score outside [0, 1], min_face_size negative
//   or not finite, max_faces over --detector-max-faces, top_k over --gallery-max-top-k, a
//   threshold that is not finite, a long request_id), "image: ..." for the frame's own errors;
//   NOT_FOUND for an unknown gallery or model (request.model), FAILED_PRECONDITION for a
//   gallery bound to another model; RESOURCE_EXHAUSTED for a full pool or a full detector or
//   embedder queue (transient); DEADLINE_EXCEEDED / CANCELLED, checked before each step; the
//   detector's INTERNAL. A frame with no faces is an empty list, not an error.
// - Model: request.model (empty: a gallery's own model, else the default) gives the crop
//   geometry the faces are aligned to and the Embedder that embeds them; the response's model_id
//   is its, and so is the threshold a gallery's candidates are cut at when the request sets none
//   (ModelDescription::default_threshold; the response's `threshold` says the one used).
// - Thread safety: calls are independent; each may start from any thread.
#ifndef ARCFACE_SERVER_SERVICE_DETECT_CALL_H_
#define ARCFACE_SERVER_SERVICE_DETECT_CALL_H_

#include "arcface/v1/face_embedding.pb.h"
#include "server/service/call_context.h"
#include "server/service/frame_detector.h"
#include "server/service/gallery_search.h"

namespace arcface::service {

// What Detect borrows besides the CallEnv; set before the service is ready
// (FaceEmbeddingService::SetDetection) and never changed afterwards.
struct DetectionEnv {
  FrameDetector* detector = nullptr;  // null: --detector none
  GallerySearch* gallery = nullptr;   // null: no FaceGallery service; galleries may be unset
};

// Fills *response and calls `done` (see the contract).
void StartDetect(const CallEnv& env, const arcface::v1::DetectRequest* request,
                 arcface::v1::DetectResponse* response, CallContext call, DoneFn done);

// What Detect answers with --detector none.
absl::Status NoDetectorError();

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_DETECT_CALL_H_
