// DetectionModel: what the service needs of a face detector, so that the service can be tested
// with a fake and never includes torch. The production implementation wraps detect::FaceDetector
// (server/app/detector_model.h).
//
// Contract
// - Prepare() runs on the preprocessing pool, one frame at a time: it turns the decoded frame
//   (CV_8UC3 RGB, any size) into the detector's input (resized, padded) and remembers how to map
//   the network's coordinates back to the frame's pixels. It is pure and thread-safe. Errors:
//   INVALID_ARGUMENT for a frame it cannot use (say, empty), naming the reason.
// - Run() runs on the detector batcher's model thread with n >= 1 prepared frames of possibly
//   different requests, and returns n lists: frame i's faces, by score descending, already
//   filtered by that frame's DetectFilter, each with its box and five landmarks in frame i's
//   own pixels. It blocks for the forward passes (boxes, then the landmark refinement). With
//   max_batches_in_flight == 1 it is called from one thread at a time.
// - Errors from Run(): a non-OK status fails every frame in that batch (the detector failed,
//   not the caller): INTERNAL or UNAVAILABLE.
#ifndef ARCFACE_SERVER_SERVICE_DETECTION_MODEL_H_
#define ARCFACE_SERVER_SERVICE_DETECTION_MODEL_H_

#include <vector>

#include <opencv2/core.hpp>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/detect/detection.h"

namespace arcface::service {

using detect::DetectedBox;
using detect::DetectFilter;
using detect::DetectorDescription;
using detect::PreparedFrame;

class DetectionModel {
 public:
  virtual ~DetectionModel() = default;
  virtual absl::StatusOr<PreparedFrame> Prepare(const cv::Mat& rgb,
                                                const DetectFilter& filter) const = 0;
  virtual absl::StatusOr<std::vector<std::vector<DetectedBox>>> Run(
      absl::Span<const PreparedFrame* const> frames) = 0;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_DETECTION_MODEL_H_
