#include "server/service/detector_metrics.h"

#include <algorithm>
#include <vector>

#include "absl/time/time.h"

namespace arcface::service {
namespace {

std::vector<double> FrameBounds(int max_batch_size) {
  std::vector<double> bounds;
  for (int b = 1; b < max_batch_size; b *= 2) bounds.push_back(b);
  bounds.push_back(std::max(1, max_batch_size));
  return bounds;
}

// A detector batch takes milliseconds (a small frame on CUDA) to seconds (a large batch on the
// CPU); a frame's wait in the queue, from microseconds up.
const std::vector<double>& SecondsBounds() {
  static const std::vector<double> bounds = {1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01,
                                             0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  return bounds;
}

const std::vector<double>& FacesBounds() {
  static const std::vector<double> bounds = {0, 1, 2, 3, 5, 10, 20, 50, 100, 256};
  return bounds;
}

}  // namespace

DetectorMetrics::DetectorMetrics(MetricsRegistry* registry, int max_batch_size)
    : batches_(registry->AddCounter("arcface_detector_batches_total",
                                    "Detector batches run, by outcome.", {"status"})),
      batch_size_(registry
                      ->AddHistogram("arcface_detector_batch_size",
                                     "Frames per batch run by the face detector.",
                                     FrameBounds(max_batch_size))
                      .WithLabels({})),
      run_seconds_(registry
                       ->AddHistogram("arcface_detector_seconds",
                                      "Per detector batch: time in the detector (box and "
                                      "landmark networks).",
                                      SecondsBounds())
                       .WithLabels({})),
      queue_wait_(registry
                      ->AddHistogram("arcface_detector_queue_wait_seconds",
                                     "Per frame: time from scheduling to its detector batch's "
                                     "formation.",
                                     SecondsBounds())
                      .WithLabels({})),
      frames_(registry
                  ->AddCounter("arcface_detector_frames_total",
                               "Frames the detector answered (Detect, DetectStream).")
                  .WithLabels({})),
      faces_per_frame_(registry
                           ->AddHistogram("arcface_detector_faces_per_frame",
                                          "Faces found per frame (after its filter).",
                                          FacesBounds())
                           .WithLabels({})),
      rejected_(registry->AddCounter("arcface_detector_rejected_total",
                                     "Frames the detector's queue refused, by reason.",
                                     {"reason"})),
      dropped_(registry->AddCounter(
          "arcface_detector_dropped_total",
          "Frames dropped before the detector (expired or cancelled while queued).",
          {"reason"})) {}

void DetectorMetrics::RecordFrame(int faces) {
  frames_.Inc();
  faces_per_frame_.Observe(faces);
}

void DetectorMetrics::OnBatch(const batching::BatchInfo& info) {
  batches_.WithLabels({info.status.ok() ? "ok" : "error"}).Inc();
  batch_size_.Observe(info.size);
  run_seconds_.Observe(absl::ToDoubleSeconds(info.run_time));
  for (absl::Duration wait : info.queue_waits) queue_wait_.Observe(absl::ToDoubleSeconds(wait));
}

void DetectorMetrics::OnRejected(batching::RejectReason reason, int num_items) {
  switch (reason) {
    case batching::RejectReason::kQueueFull:
      rejected_.WithLabels({"queue_full"}).Inc(num_items);
      break;
    case batching::RejectReason::kTooLarge:
      rejected_.WithLabels({"too_large"}).Inc(num_items);
      break;
    case batching::RejectReason::kShuttingDown:
      rejected_.WithLabels({"shutting_down"}).Inc(num_items);
      break;
    case batching::RejectReason::kInvalid:
      break;  // a bug of ours, not load: it surfaces as the request's error
  }
}

void DetectorMetrics::OnDropped(batching::DropReason reason, int num_items_dropped) {
  dropped_.WithLabels({reason == batching::DropReason::kExpired ? "expired" : "cancelled"})
      .Inc(num_items_dropped);
}

}  // namespace arcface::service
