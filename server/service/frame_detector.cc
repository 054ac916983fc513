#include "server/service/frame_detector.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace arcface::service {

struct FrameDetector::FrameTask : batching::Task {
  PreparedFrame frame;
  std::vector<DetectedBox> faces;  // filled by RunBatch
  Done user_done;
};

absl::StatusOr<std::unique_ptr<FrameDetector>> FrameDetector::Create(
    batching::DynamicBatcher::Options batching, DetectionModel* model,
    DetectorDescription description, DetectorMetrics* metrics, batching::Clock* clock,
    int64_t max_held_frame_bytes) {
  if (model == nullptr) return absl::InvalidArgumentError("detector: no model");
  if (max_held_frame_bytes < 1) {
    return absl::InvalidArgumentError("detector: the frame budget must be at least one byte");
  }
  std::unique_ptr<FrameDetector> detector(
      new FrameDetector(model, std::move(description), metrics, max_held_frame_bytes));
  FrameDetector* raw = detector.get();
  batching.observer = metrics;
  auto batcher = batching::DynamicBatcher::Create(
      batching, [raw](batching::Batch& batch) { return raw->RunBatch(batch); }, clock);
  if (!batcher.ok()) return batcher.status();
  detector->batcher_ = std::move(*batcher);
  return detector;
}

FrameDetector::FrameDetector(DetectionModel* model, DetectorDescription description,
                             DetectorMetrics* metrics, int64_t max_held_frame_bytes)
    : model_(model),
      description_(std::move(description)),
      metrics_(metrics),
      max_held_frame_bytes_(max_held_frame_bytes) {}

absl::StatusOr<FrameDetector::FrameReservation> FrameDetector::ReserveFrame(int64_t bytes) {
  int64_t held = held_frame_bytes_.load();
  do {
    if (held > 0 && held + bytes > max_held_frame_bytes_) {
      constexpr double kMiB = 1 << 20;
      return absl::ResourceExhaustedError(absl::StrFormat(
          "the frames being detected hold %.1f MiB of decoded pixels; this frame's %.1f MiB "
          "would pass the bound of %.1f MiB (--detector-max-held-mib); retry shortly",
          held / kMiB, bytes / kMiB, max_held_frame_bytes_ / kMiB));
    }
  } while (!held_frame_bytes_.compare_exchange_weak(held, held + bytes));
  return FrameReservation(this, bytes);
}

FrameDetector::~FrameDetector() { Shutdown(); }

void FrameDetector::Shutdown() {
  if (batcher_) batcher_->Shutdown();
}

absl::Status FrameDetector::Submit(PreparedFrame frame, absl::Time deadline,
                                   std::function<bool()> is_cancelled, Done done) {
  auto task = std::make_shared<FrameTask>();
  task->num_items = 1;
  task->deadline = deadline;
  task->is_cancelled = std::move(is_cancelled);
  task->frame = std::move(frame);
  task->user_done = std::move(done);
  // A plain pointer (see Embedder::Submit): the batcher keeps the task alive until `done` ran,
  // and a refused task is released with `done` before Schedule() returns.
  FrameTask* raw = task.get();
  DetectorMetrics* metrics = metrics_;
  task->done = [raw, metrics](absl::Status status) {
    // The network's input is not needed any more; the decoded frame is the caller's to keep.
    raw->frame = PreparedFrame();
    Done user_done = std::move(raw->user_done);
    if (!status.ok()) return user_done(std::move(status));
    if (metrics != nullptr) metrics->RecordFrame(static_cast<int>(raw->faces.size()));
    user_done(std::move(raw->faces));
  };
  return batcher_->Schedule(std::move(task));
}

absl::Status FrameDetector::RunBatch(batching::Batch& batch) {
  // Each slice is one frame (a task has one item).
  std::vector<const PreparedFrame*> frames;
  frames.reserve(batch.slices.size());
  for (const batching::BatchSlice& s : batch.slices) {
    frames.push_back(&static_cast<const FrameTask*>(s.task)->frame);
  }
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> out = model_->Run(frames);
  if (!out.ok()) return out.status();
  if (out->size() != frames.size()) {
    return absl::InternalError(absl::StrCat("the detector returned ", out->size(),
                                            " lists of faces for ", frames.size(), " frames"));
  }
  for (size_t i = 0; i < frames.size(); ++i) {
    static_cast<FrameTask*>(batch.slices[i].task)->faces = std::move((*out)[i]);
  }
  return absl::OkStatus();
}

}  // namespace arcface::service
