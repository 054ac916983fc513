// FaceDetector: finds faces in frames with trained CNNs in libtorch: a box network (face-api's
// SSD-MobileNetV1 or Tiny-Face-Detector) and a landmark network (face-api's 68-point net) whose
// points give the five ArcFace landmarks (eye centres 36-41 and 42-47, nose tip 30, mouth
// corners 48 and 54).
//
// Contract
// - Create() loads and validates the TF.js files from `model_dir` (tfjs_weights.h), builds the
//   networks on `device` and runs one warm-up batch. Errors: NOT_FOUND naming a missing file,
//   INVALID_ARGUMENT naming a malformed one (and the tensor) or a bad config value,
//   FAILED_PRECONDITION for a CUDA device that is not there, INTERNAL from torch.
// - Prepare() is pure and thread-safe (the service calls it on its preprocessing pool): it takes
//   an 8-bit RGB (CV_8UC3) or grayscale (CV_8UC1) frame, pads it to a square (bottom and right,
//   black) and resizes it to the box network's input (OpenCV, area averaging when shrinking);
//   the mapping back is a scale per axis. Errors (INVALID_ARGUMENT): an empty frame, another
//   pixel type, a filter out of range (min_score outside [0, 1], min_face_size negative or not
//   finite).
// - Detect() runs the box network on the batch, decodes and suppresses (face-api's IoU
//   threshold: 0.5 SSD, 0.4 Tiny) per frame, keeps the boxes its frame's filter asks for (score
//   >= min_score, shorter side >= min_face_size, at most max_faces, 0 meaning the detector's
//   max_faces_per_frame), then runs the landmark network on every kept face of every frame as
//   one batch (each crop cut from the original frame, padded to a centred square, 112×112).
//   Returns, per frame, its faces by score descending. Boxes are in frame pixels, clipped to
//   the frame, in edge coordinates (0 is the left edge of the first column); landmarks are in
//   pixel-centre coordinates (image.h's, as AlignFace takes them). Results do not depend on
//   the other frames of the batch (beyond float rounding, < 1e-4). Blocking; one caller at a
//   time (it mutates nothing, but a batch takes the device whole). Errors: INVALID_ARGUMENT for
//   a frame not made by this detector's Prepare(); torch's exceptions become INTERNAL.
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
  std::string model_dir;                     // holds the face-api files
  std::string detector = "ssd_mobilenetv1";  // or "tiny_face_detector"
  std::string device = "cpu";                // "cpu", "cuda", "cuda:N", "auto" (cuda if any)
  int max_faces_per_frame = 100;             // face-api's maxResults; in [1, 5118]
  int input_size = 0;  // 0: the network's own; SSD takes only 512, Tiny multiples of 32 (416)
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
