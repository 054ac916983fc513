#include "server/service/detect_call.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/gallery/ids.h"
#include "server/service/admission.h"
#include "server/service/cosine.h"
#include "server/service/embed_call.h"
#include "server/service/embedding_model.h"
#include "server/service/face_preprocess.h"

namespace arcface::service {

using arcface::v1::DetectRequest;
using arcface::v1::DetectResponse;

namespace {

using DetectState = CallState<DetectRequest, DetectResponse>;

// What one Detect carries from step to step, beside its CallState.
struct DetectWork {
  FrameDetector* detector = nullptr;
  ModelRef model;                      // aligns and embeds the faces
  GallerySearch* gallery = nullptr;    // set when the request names a gallery
  DetectFilter filter;
  bool embed = false;  // also with a gallery
  int top_k = 1;
  float threshold = 0;  // with a gallery: the request's, else the model's default
  // Declared before the frame, so that it is given back after the frame is freed.
  FrameDetector::FrameReservation reservation;
  cv::Mat frame;  // decoded; kept until the faces are aligned
  std::vector<DetectedBox> faces;
};

// The cheap checks, on the gRPC thread, and the request's filter and options into *work.
absl::Status CheckDetect(const CallEnv& env, const DetectRequest& r, DetectWork* work) {
  const DetectionEnv* detection = env.detection;
  if (detection == nullptr || detection->detector == nullptr) return NoDetectorError();
  if (absl::Status id = CheckRequestId(r.request_id()); !id.ok()) return id;
  if (r.image().data_case() == arcface::v1::Image::DATA_NOT_SET) {
    return absl::InvalidArgumentError("image: no image (set image.encoded or image.raw)");
  }
  const DetectorDescription& detector = detection->detector->description();
  const float min_score = r.min_score();
  if (!(min_score >= 0 && min_score <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("min_score is ", min_score,
                                                   ", it must be in [0, 1] (0: the default, ",
                                                   detector.default_min_score, ")"));
  }
  const float min_face_size = r.min_face_size();
  if (!(std::isfinite(min_face_size) && min_face_size >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "min_face_size is ", min_face_size, ", it must be a finite size in pixels, 0 or more"));
  }
  if (r.max_faces() > static_cast<uint32_t>(detector.max_faces_per_frame)) {
    return absl::InvalidArgumentError(absl::StrCat("max_faces is ", r.max_faces(),
                                                   ", the limit is ", detector.max_faces_per_frame,
                                                   " (--detector-max-faces)"));
  }
  work->detector = detection->detector;
  work->filter.min_score = min_score == 0 ? detector.default_min_score : min_score;
  work->filter.min_face_size = min_face_size;
  work->filter.max_faces =
      r.max_faces() == 0 ? static_cast<uint32_t>(detector.max_faces_per_frame) : r.max_faces();
  work->embed = r.embed() || !r.gallery().empty();
  const ServedModels& models = env.admission->models();
  absl::StatusOr<ModelRef> model = models.Find(r.model());
  if (!model.ok()) return model.status();
  work->model = *std::move(model);
  if (r.gallery().empty()) return absl::OkStatus();

  GallerySearch* search = detection->gallery;
  if (search == nullptr || search->galleries() == nullptr) return NoGalleryError();
  if (absl::Status s = gallery::CheckId("gallery", r.gallery()); !s.ok()) return s;
  absl::StatusOr<int> top_k = search->TopK(r.top_k());
  if (!top_k.ok()) return top_k.status();
  if (r.has_threshold() && !std::isfinite(r.threshold())) {
    return absl::InvalidArgumentError("threshold is not finite");
  }
  // Known now, so that an unknown gallery costs no detection; the search says it again should
  // the gallery go in between.
  absl::StatusOr<gallery::GalleryStats> stats = search->galleries()->Stats(r.gallery());
  if (!stats.ok()) return stats.status();
  // Without a model name, the gallery's own model embeds (when this server serves it; else the
  // search names the mismatch).
  if (r.model().empty()) {
    if (ModelRef own = models.ByModelId(stats->model_id); own != nullptr) {
      work->model = std::move(own);
    }
  }
  work->gallery = search;
  work->top_k = *top_k;
  work->threshold = r.has_threshold() ? r.threshold() : work->model->description.default_threshold;
  return absl::OkStatus();
}

void FillFaces(const std::vector<DetectedBox>& faces, DetectResponse* response) {
  response->mutable_faces()->Reserve(static_cast<int>(faces.size()));
  for (const DetectedBox& f : faces) {
    arcface::v1::DetectedFace* out = response->add_faces();
    out->mutable_box()->set_x_min(f.box.x_min);
    out->mutable_box()->set_y_min(f.box.y_min);
    out->mutable_box()->set_x_max(f.box.x_max);
    out->mutable_box()->set_y_max(f.box.y_max);
    out->set_score(f.score);
    for (const image::Point& p : f.landmarks) {
      arcface::v1::Point* point = out->add_landmarks();
      point->set_x(p.x);
      point->set_y(p.y);
    }
  }
}

// On the gallery queue: each face's embedding identified; then the call is complete.
void Identify(const CallEnv& env, std::shared_ptr<DetectState> state,
              std::shared_ptr<DetectWork> work, const EmbeddingBatch& rows) {
  const int n = rows.size;
  const int dim = work->model->dim();
  GalleryQuery query;
  query.units.resize(size_t(n) * dim);
  for (int i = 0; i < n; ++i) {
    if (!ToUnit(rows.values.data() + size_t(i) * dim, dim, query.units.data() + size_t(i) * dim)) {
      return state->Complete(absl::InvalidArgumentError(
          absl::StrCat("face ", i, ": the face's embedding has zero norm")));
    }
  }
  query.gallery = state->request->gallery();
  query.model_id = work->model->model_id();
  query.n = n;
  query.top_k = work->top_k;
  query.threshold = work->threshold;
  query.deadline = state->deadline;
  query.is_cancelled = state->is_cancelled;
  work->gallery->Search(std::move(query), [state](absl::StatusOr<GalleryMatches> found) {
    if (!found.ok()) return state->Complete(found.status());
    for (size_t i = 0; i < found->results.size(); ++i) {
      FillIdentification(
          std::move(found->results[i]),
          state->response->mutable_faces(static_cast<int>(i))->mutable_identification());
    }
    state->Complete(absl::OkStatus());
  });
}

// On the pool: each face aligned by its landmarks from the decoded frame (a time slice per
// step, as PreprocessJob), then all the crops through the Embedder, then the embeddings into
// the response (and, with a gallery, identified).
WorkQueue::Job AlignJob(const CallEnv& env, std::shared_ptr<DetectState> state,
                        std::shared_ptr<DetectWork> work) {
  return [env, state = std::move(state), work = std::move(work), next = 0,
          crops = std::vector<uint8_t>()]() mutable -> bool {
    const int n = static_cast<int>(work->faces.size());
    const absl::Time step_start = absl::Now();
    do {
      absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, env.metrics);
      if (!alive.ok()) {
        state->Complete(alive);
        return false;
      }
      const model::CropGeometry& geometry = work->model->geometry();
      if (crops.empty()) crops.reserve(size_t(n) * geometry.bytes());
      const auto& landmarks = work->faces[next].landmarks;
      absl::StatusOr<image::Crop> crop = image::AlignFace(work->frame, landmarks, geometry);
      if (!crop.ok()) {
        state->Complete(WithContext(crop.status(), absl::StrCat("face ", next)));
        return false;
      }
      crops.insert(crops.end(), crop->begin(), crop->end());
      env.metrics->AddPreprocessedFace();
      ++next;
    } while (next < n && absl::Now() - step_start < kPreprocessSlice);
    if (next < n) return true;
    work->frame = cv::Mat();  // every face is cropped
    absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, env.metrics);
    if (!alive.ok()) {
      state->Complete(alive);
      return false;
    }
    const bool normalize = state->request->normalize();
    absl::Status scheduled = work->model->embedder->Submit(
        std::move(crops), state->deadline, state->is_cancelled,
        [env, state, work, normalize, n](absl::StatusOr<EmbeddingBatch> rows) {
          if (!rows.ok()) return state->Complete(rows.status());
          const int dim = work->model->dim();
          for (int i = 0; i < n; ++i) {
            FillEmbedding(rows->values.data() + size_t(i) * dim, dim, rows->norms[i], normalize,
                          state->response->mutable_faces(i)->mutable_embedding());
          }
          env.metrics->AddFaces(n);
          if (work->gallery == nullptr) return state->Complete(absl::OkStatus());
          Identify(env, state, work, *rows);
        });
    if (!scheduled.ok()) state->Complete(scheduled);
    return false;
  };
}

// On the pool: the frame decoded (one step), then prepared for the detector (the next) and
// handed to the detector's batcher.
// The size the frame will have decoded, from its header alone; 0 when the header is unreadable
// (decoding then fails with the reason). A frame over the pixel cap is refused by decoding with
// its reason, so it reserves no more than the cap.
int64_t DecodedBytes(const arcface::v1::Image& image) {
  if (image.has_raw()) {
    return int64_t{image.raw().width()} * int64_t{image.raw().height()} * 3;
  }
  absl::StatusOr<image::ImageInfo> info = image::ProbeImage(image.encoded());
  return info.ok() ? int64_t{info->width} * int64_t{info->height} * 3 : 0;
}

WorkQueue::Job FrameJob(const CallEnv& env, std::shared_ptr<DetectState> state,
                        std::shared_ptr<DetectWork> work) {
  return [env, state = std::move(state), work = std::move(work)]() mutable -> bool {
    absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, env.metrics);
    if (!alive.ok()) {
      state->Complete(alive);
      return false;
    }
    if (work->frame.empty()) {
      absl::StatusOr<FrameDetector::FrameReservation> reserved =
          work->detector->ReserveFrame(std::min(DecodedBytes(state->request->image()),
                                                env.options->image_limits.max_pixels * 3));
      if (!reserved.ok()) {
        state->Complete(reserved.status());
        return false;
      }
      work->reservation = *std::move(reserved);
      absl::StatusOr<cv::Mat> rgb =
          DecodeFaceImage(state->request->image(), env.options->image_limits);
      if (!rgb.ok()) {
        state->Complete(WithContext(rgb.status(), "image"));
        return false;
      }
      work->frame = *std::move(rgb);
      state->response->set_image_width(static_cast<uint32_t>(work->frame.cols));
      state->response->set_image_height(static_cast<uint32_t>(work->frame.rows));
      return true;  // prepared at the next turn, so that other calls' steps go in between
    }
    absl::StatusOr<PreparedFrame> prepared = work->detector->Prepare(work->frame, work->filter);
    if (!prepared.ok()) {
      state->Complete(WithContext(prepared.status(), "image"));
      return false;
    }
    if (!work->embed) work->frame = cv::Mat();  // the prepared frame holds what it needs
    absl::Status scheduled = work->detector->Submit(
        *std::move(prepared), state->deadline, state->is_cancelled,
        [env, state, work](absl::StatusOr<std::vector<DetectedBox>> faces) {
          if (!faces.ok()) return state->Complete(faces.status());
          work->faces = *std::move(faces);
          FillFaces(work->faces, state->response);
          if (!work->embed || work->faces.empty()) return state->Complete(absl::OkStatus());
          // A later stage of a call the pool admitted: never refused for room; its faces are
          // bounded by --detector-max-faces.
          absl::Status continued = env.preprocess->Continue(
              AlignJob(env, state, work), static_cast<int64_t>(work->faces.size()));
          if (!continued.ok()) state->Complete(continued);
        });
    if (!scheduled.ok()) state->Complete(scheduled);
    return false;
  };
}

}  // namespace

absl::Status NoDetectorError() {
  return absl::UnimplementedError(
      "this server runs without a face detector (--detector none); start it with --detector "
      "DIR, a folder with face-api's model files (deploy/fetch-models.sh fetches them), to "
      "enable Detect and DetectStream");
}

void StartDetect(const CallEnv& env, const DetectRequest* request, DetectResponse* response,
                 CallContext call, DoneFn done) {
  response->set_request_id(request->request_id());
  auto work = std::make_shared<DetectWork>();
  if (absl::Status s = CheckDetect(env, *request, work.get()); !s.ok()) return done(s);
  response->set_detector_id(work->detector->description().detector_id);
  if (work->embed) response->set_model_id(work->model->model_id());
  if (work->gallery != nullptr) response->set_threshold(work->threshold);
  auto state = std::make_shared<DetectState>(
      DetectState{request, response, std::move(call.is_cancelled), call.deadline, std::move(done)});
  absl::Status queued = env.preprocess->Submit(FrameJob(env, state, work), /*cost=*/1);
  CompleteIfRefused(std::move(queued), 1, env.metrics, *state);
}

}  // namespace arcface::service
