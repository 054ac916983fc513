// DetectorModel: the face detector (server/detect) behind the service's DetectionModel
// interface (server/service/detection_model.h).
//
// Contract
// - Prepare() and Run() hand over to FaceDetector::Prepare() and Detect() and return their
//   results as they are.
// - It is the boundary where an exception escaping the detector becomes a status: the detector
//   turns torch's exceptions into INTERNAL itself, but anything else (std::bad_alloc, say) would
//   otherwise unwind into the preprocessing pool or the detector batcher's model thread and end
//   the process; here it is INTERNAL "the detector threw: ...".
// - Ownership: the detector is borrowed and must outlive this object.
// - Blocking and threads: as FaceDetector's: Prepare() is pure and thread-safe, Run() blocks
//   and is called by one model thread at a time.
#ifndef ARCFACE_SERVER_APP_DETECTOR_MODEL_H_
#define ARCFACE_SERVER_APP_DETECTOR_MODEL_H_

#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/detect/face_detector.h"
#include "server/service/detection_model.h"

namespace arcface::app {

class DetectorModel final : public service::DetectionModel {
 public:
  explicit DetectorModel(detect::FaceDetector* detector) : detector_(detector) {}

  absl::StatusOr<detect::PreparedFrame> Prepare(const cv::Mat& rgb,
                                                const detect::DetectFilter& filter) const override;
  absl::StatusOr<std::vector<std::vector<detect::DetectedBox>>> Run(
      absl::Span<const detect::PreparedFrame* const> frames) override;

 private:
  detect::FaceDetector* const detector_;
};

}  // namespace arcface::app

#endif  // ARCFACE_SERVER_APP_DETECTOR_MODEL_H_
