// FrameDetector: the bridge between Detect calls and the face detector, as the Embedder is for
// the embedding model. It owns a DynamicBatcher of its own whose items are frames: the frames
// of many calls, each prepared on the preprocessing pool (DetectionModel::Prepare), are run
// through the DetectionModel together and each call gets its frame's faces back.
//
// Contract
// - Input: Submit() takes one frame already prepared by Prepare() (on the caller's thread or
//   pool). There is no staging step: a prepared frame is the model's input as it is, and the
//   batch function hands the model the batch's frames in batch order.
// - Ownership: Submit() takes the frame; the model is borrowed and must outlive the detector;
//   `metrics` (may be null) too.
// - Blocking: Submit() never blocks (DynamicBatcher::Schedule). Shutdown() blocks until every
//   accepted frame got its `done` and the batcher's threads have exited.
// - Results: on an OK Submit(), `done` is called exactly once, on the batch thread, with the
//   frame's faces (by score descending, filtered by the frame's DetectFilter, in its pixels), or
//   with its error: DEADLINE_EXCEEDED / CANCELLED when it expired or was cancelled while queued
//   (it never reached the model), or the model's error for the batch it was in (INTERNAL when
//   the model answered a different number of frames). `done` must be short.
// - Errors of Submit() itself: as DynamicBatcher::Schedule (RESOURCE_EXHAUSTED for a full
//   queue, UNAVAILABLE when shutting down); then `done` is destroyed unrun before it returns.
// - Memory: decoded frames are the large part of a Detect (up to --max-image-pixels × 3 bytes
//   each, held from decoding until the faces are aligned), so ReserveFrame() bounds their sum
//   over all calls by `max_held_frame_bytes`: a frame that would pass it is refused
//   (RESOURCE_EXHAUSTED, transient) unless nothing else is held, so that a frame larger than
//   the whole bound still runs alone instead of never.
// - Thread safety: all methods may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_FRAME_DETECTOR_H_
#define ARCFACE_SERVER_SERVICE_FRAME_DETECTOR_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/batching/clock.h"
#include "server/batching/dynamic_batcher.h"
#include "server/service/detection_model.h"
#include "server/service/detector_metrics.h"

namespace arcface::service {

class FrameDetector {
 public:
  using Done = absl::AnyInvocable<void(absl::StatusOr<std::vector<DetectedBox>>)>;

  // `batching` counts frames (its observer is replaced by `metrics`). `description` is what
  // GetModelInfo and the responses report. `clock` null: real time. Errors name the offending
  // batching option.
  static absl::StatusOr<std::unique_ptr<FrameDetector>> Create(
      batching::DynamicBatcher::Options batching, DetectionModel* model,
      DetectorDescription description, DetectorMetrics* metrics, batching::Clock* clock = nullptr,
      int64_t max_held_frame_bytes = int64_t{1} << 30);
  ~FrameDetector();
  FrameDetector(const FrameDetector&) = delete;
  FrameDetector& operator=(const FrameDetector&) = delete;

  // The model's Prepare() (thread-safe; for the preprocessing pool).
  absl::StatusOr<PreparedFrame> Prepare(const cv::Mat& rgb, const DetectFilter& filter) const {
    return model_->Prepare(rgb, filter);
  }
  // `deadline` is on the batcher's clock; `is_cancelled` may be empty.
  absl::Status Submit(PreparedFrame frame, absl::Time deadline, std::function<bool()> is_cancelled,
                      Done done);
  void Shutdown();

  // Holds `bytes` of the frame budget until destroyed (movable; empty when default-made).
  class FrameReservation {
   public:
    FrameReservation() = default;
    FrameReservation(FrameReservation&& other) noexcept
        : owner_(std::exchange(other.owner_, nullptr)), bytes_(other.bytes_) {}
    FrameReservation& operator=(FrameReservation&& other) noexcept {
      std::swap(owner_, other.owner_);
      std::swap(bytes_, other.bytes_);
      return *this;
    }
    ~FrameReservation() {
      if (owner_ != nullptr) owner_->held_frame_bytes_.fetch_sub(bytes_);
    }

   private:
    friend class FrameDetector;
    FrameReservation(FrameDetector* owner, int64_t bytes) : owner_(owner), bytes_(bytes) {}
    FrameDetector* owner_ = nullptr;
    int64_t bytes_ = 0;
  };
  // Reserves the decoded size of a frame (width × height × 3) before it is decoded.
  absl::StatusOr<FrameReservation> ReserveFrame(int64_t bytes);
  int64_t held_frame_bytes() const { return held_frame_bytes_.load(); }

  const DetectorDescription& description() const { return description_; }
  batching::DynamicBatcher& batcher() { return *batcher_; }

 private:
  struct FrameTask;
  FrameDetector(DetectionModel* model, DetectorDescription description, DetectorMetrics* metrics,
                int64_t max_held_frame_bytes);
  absl::Status RunBatch(batching::Batch& batch);

  DetectionModel* const model_;
  const DetectorDescription description_;
  DetectorMetrics* const metrics_;
  const int64_t max_held_frame_bytes_;
  std::atomic<int64_t> held_frame_bytes_{0};
  std::unique_ptr<batching::DynamicBatcher> batcher_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_FRAME_DETECTOR_H_
