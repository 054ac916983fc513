// What detect_bench takes from dlib, in one translation unit (dlib's headers compile slowly):
// the labelled faces of dlib's imglab XML files, and dlib's HOG face detector with its 68-point
// shape predictor as a baseline.
//
// Contract
// - ReadImglabXml reads one imglab XML file (dlib's examples/faces/*_with_face_landmarks.xml or
//   tests/data/multi_face_labels.xml): per <image>, its file (resolved against the XML's folder)
//   and, per <box>, the box and the five ArcFace points, either derived from 68 parts named
//   "00".."67" (eye centres = means of 36-41 and 42-47, nose tip 30, mouth corners 48 and 54) or
//   given as parts named left_eye, right_eye, nose_tip, mouth_left, mouth_right (decimals
//   allowed). INVALID_ARGUMENT naming the file and line for malformed XML, a box with neither
//   set of parts, or a non-numeric attribute; NOT_FOUND for a missing file. Boxes marked
//   ignore='1' are left out.
// - DlibHogDetector::Create loads the shape predictor (NOT_FOUND / INVALID_ARGUMENT naming the
//   file). Detect upsamples the frame `upsample` times (dlib's examples do so once: the HOG
//   window is 80x80, so faces below that are found only after upsampling), runs the detector
//   with `adjust_threshold` (dlib's default operating point is 0; lower values return more,
//   weaker detections, each with its SVM score), fits the shape predictor on each box in the
//   upsampled image and maps boxes and points back to the frame's pixels. Blocking,
//   single-threaded (dlib's detector has no threads of its own); one caller at a time.
#ifndef ARCFACE_TESTS_BENCH_DLIB_BASELINE_H_
#define ARCFACE_TESTS_BENCH_DLIB_BASELINE_H_

#include <array>
#include <memory>
#include <opencv2/core.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/detect/detection.h"

namespace arcface::bench {

struct LabelledFace {
  image::Box box;
  std::array<image::Point, 5> landmarks;  // Face.landmarks' order
};

struct LabelledImage {
  std::string path;
  int width = 0, height = 0;
  std::vector<LabelledFace> faces;
};

absl::StatusOr<std::vector<LabelledImage>> ReadImglabXml(const std::string& xml_path);

class DlibHogDetector {
 public:
  static absl::StatusOr<std::unique_ptr<DlibHogDetector>> Create(
      const std::string& shape_predictor_path, int upsample);
  virtual ~DlibHogDetector() = default;
  // `rgb`: 8-bit, 3 channels, RGB. Faces by score, descending.
  virtual std::vector<detect::DetectedBox> Detect(const cv::Mat& rgb, double adjust_threshold) = 0;
};

}  // namespace arcface::bench

#endif  // ARCFACE_TESTS_BENCH_DLIB_BASELINE_H_
