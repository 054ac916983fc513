// The plain types a face detector and its callers share (header-only target
// arcface_detect_types: OpenCV and server/image's Box and Point, no torch), so that the service
// can describe detections without linking the detector, as it takes EmbeddingBatch from
// server/engine/engine.h.
#ifndef ARCFACE_SERVER_DETECT_DETECTION_H_
#define ARCFACE_SERVER_DETECT_DETECTION_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

#include "server/image/image.h"

namespace arcface::detect {

// Which faces of a frame a caller wants (DetectRequest's fields, defaults resolved).
struct DetectFilter {
  float min_score = 0.5f;     // in [0, 1]
  float min_face_size = 0;    // shorter box side in frame pixels; 0 keeps all
  uint32_t max_faces = 0;     // 0: up to the detector's own maximum
};

// One frame made ready for the detector's batch (on the pool).
struct PreparedFrame {
  std::vector<uint8_t> input;  // the network's input, as the detector laid it out
  cv::Mat rgb;                 // the frame as decoded (shared, never written), for refinement
  float scale_x = 1, scale_y = 1;  // frame pixels per network-input pixel
  DetectFilter filter;
};

struct DetectedBox {
  image::Box box;
  float score = 0;
  // Left eye, right eye, nose tip, left and right mouth corners (Face.landmarks' order).
  std::array<image::Point, 5> landmarks;
};

// What GetModelInfo, /metrics and the logs report about the detector.
struct DetectorDescription {
  std::string detector_id;     // "ssd_mobilenetv1+landmark68@<12 hex>"
  std::string detector;        // box network
  std::string landmarks;       // landmark network
  std::string weights_sha256;  // full hex over all the files read
  std::string device;          // "cpu", "cuda:0"
  int input_size = 0;          // square network input, pixels
  float default_min_score = 0.5f;
  int max_faces_per_frame = 0;
};

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_DETECTION_H_
