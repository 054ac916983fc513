// FaceDetector: finds faces in frames with trained CNNs in libtorch: a box network (face-api's
// SSD-MobileNetV1 or Tiny-Face-Detector) and a landmark network (face-api's 68-point net) whose
// points give the five ArcFace landmarks (eye centres 36-41 and 42-47, nose tip 30, mouth
// corners 48 and 54).
//
// Contract
// - Create() loads and validates the TF.js files from `model_dir` (tfjs_weights.h), builds the
//   networks on `device` and runs one warm-up batch. Errors: NOT_FOUND naming a missing file,
//   INVALID_ARGUMENT naming a malformed one (and the tensor), INTERNAL from torch.
// - Prepare() is pure and thread-safe (the service calls it on its preprocessing pool): it pads
//   the frame to a square (bottom and right, black) and resizes it to the box network's input;
//   the mapping back is a scale per axis.
// - Detect() runs both networks on a batch of prepared frames and returns, per frame, the faces
//   that pass its filter, by score descending, in that frame's pixels. Blocking; not reentrant
//   (one caller at a time). torch's exceptions are caught and returned as INTERNAL.
#ifndef ARCFACE_SERVER_DETECT_FACE_DETECTOR_H_
#define ARCFACE_SERVER_DETECT_FACE_DETECTOR_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/detect/detection.h"

namespace arcface::detect {

struct DetectorConfig {
  std::string model_dir;                 // holds the face-api files
  std::string detector = "ssd_mobilenetv1";  // or "tiny_face_detector"
  std::string device = "cpu";            // "cpu", "cuda", "cuda:N"
  int max_faces_per_frame = 256;
  int input_size = 0;                    // 0: the network's own (SSD 512, Tiny 416)
};

class FaceDetector {
 public:
  static absl::StatusOr<std::unique_ptr<FaceDetector>> Create(const DetectorConfig& config);
  virtual ~FaceDetector() = default;

  virtual absl::StatusOr<PreparedFrame> Prepare(const cv::Mat& rgb,
                                                const DetectFilter& filter) const = 0;
  virtual absl::StatusOr<std::vector<std::vector<DetectedBox>>> Detect(
      absl::Span<const PreparedFrame* const> frames) = 0;
  virtual const DetectorDescription& description() const = 0;
};

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_FACE_DETECTOR_H_
