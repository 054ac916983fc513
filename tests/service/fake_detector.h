// The fake detector of the service's tests (no torch): it reads each frame's faces from the
// frame's own pixels (pixel (0,0) says how many and where), so every caller's expected faces are
// computed by the test; and the frames it reads them from.
#ifndef ARCFACE_TESTS_SERVICE_FAKE_DETECTOR_H_
#define ARCFACE_TESTS_SERVICE_FAKE_DETECTOR_H_

#include <algorithm>
#include <cstdint>
#include <opencv2/core.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "arcface/v1/face_embedding.pb.h"
#include "server/service/detection_model.h"
#include "tests/service/fake_model.h"

namespace arcface::service {

inline constexpr int kFrameWidth = 256;
inline constexpr int kFrameHeight = 64;

// The faces the fake detector finds in a frame, before any filter: pixel (0,0)'s red value is
// their number (mod 9), its green value moves them. Face i is a square of side 16 + i at
// x = 4 + 24 i + shift, scored 0.95 - 0.1 i (so by score, descending), with five landmarks
// inside it.
inline std::vector<DetectedBox> FacesIn(const cv::Mat& rgb) {
  const cv::Vec3b first = rgb.at<cv::Vec3b>(0, 0);
  const int n = first[0] % 9;
  const float shift = static_cast<float>(first[1] % 7);
  std::vector<DetectedBox> faces;
  for (int i = 0; i < n; ++i) {
    const float x = 4 + 24.0f * i + shift, y = 8 + shift, side = 16.0f + i;
    DetectedBox f;
    f.box = {x, y, x + side, y + side};
    f.score = 0.95f - 0.1f * i;
    f.landmarks = {image::Point{x + 0.3f * side, y + 0.35f * side},
                   image::Point{x + 0.7f * side, y + 0.35f * side},
                   image::Point{x + 0.5f * side, y + 0.55f * side},
                   image::Point{x + 0.35f * side, y + 0.75f * side},
                   image::Point{x + 0.65f * side, y + 0.75f * side}};
    faces.push_back(f);
  }
  return faces;
}

inline std::vector<DetectedBox> Filtered(std::vector<DetectedBox> faces,
                                         const DetectFilter& filter) {
  std::vector<DetectedBox> kept;
  for (const DetectedBox& f : faces) {
    const float side = std::min(f.box.x_max - f.box.x_min, f.box.y_max - f.box.y_min);
    if (f.score < filter.min_score || side < filter.min_face_size) continue;
    if (filter.max_faces > 0 && kept.size() >= filter.max_faces) break;
    kept.push_back(f);
  }
  return kept;
}

class FakeDetector final : public DetectionModel, public BatchGate {
 public:
  absl::StatusOr<PreparedFrame> Prepare(const cv::Mat& rgb,
                                        const DetectFilter& filter) const override {
    PreparedFrame frame;
    frame.rgb = rgb;
    frame.filter = filter;
    return frame;
  }
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> Run(
      absl::Span<const PreparedFrame* const> frames) override {
    if (absl::Status s = Enter(static_cast<int>(frames.size())); !s.ok()) return s;
    std::vector<std::vector<DetectedBox>> out;
    for (const PreparedFrame* frame : frames) {
      out.push_back(Filtered(FacesIn(frame->rgb), frame->filter));
    }
    return out;
  }
};

// A frame of raw RGB pixels whose content (and so whose faces) depends on `faces` and `seed`.
inline cv::Mat MakeFrame(int faces, int seed) {
  cv::Mat rgb(kFrameHeight, kFrameWidth, CV_8UC3);
  for (int y = 0; y < rgb.rows; ++y) {
    for (int x = 0; x < rgb.cols; ++x) {
      rgb.at<cv::Vec3b>(y, x) =
          cv::Vec3b(uint8_t((x * 7 + y * 3 + seed * 31) & 255), uint8_t((x * y + seed * 17) & 255),
                    uint8_t((x + y * 5 + seed) & 255));
    }
  }
  rgb.at<cv::Vec3b>(0, 0) = cv::Vec3b(uint8_t(faces), uint8_t(seed), 0);
  return rgb;
}

inline arcface::v1::Image RawImage(const cv::Mat& rgb) {
  arcface::v1::Image image;
  arcface::v1::RawImage* raw = image.mutable_raw();
  raw->set_width(rgb.cols);
  raw->set_height(rgb.rows);
  raw->set_format(arcface::v1::RGB8);
  raw->set_data(std::string(reinterpret_cast<const char*>(rgb.data), rgb.total() * 3));
  return image;
}

}  // namespace arcface::service

#endif  // ARCFACE_TESTS_SERVICE_FAKE_DETECTOR_H_
