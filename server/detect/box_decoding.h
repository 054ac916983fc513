// Turning the box networks' raw outputs into scored boxes, and greedy non-maximum suppression,
// as face-api does. No torch: plain float arrays in, boxes relative to the square network input
// out (0 = left/top edge, 1 = right/bottom edge).
//
// Contract: pure functions, thread-safe. Array sizes are the callers' to get right (checked
// with assertions in debug builds only: the detector passes its own networks' outputs).
#ifndef ARCFACE_SERVER_DETECT_BOX_DECODING_H_
#define ARCFACE_SERVER_DETECT_BOX_DECODING_H_

#include <cstddef>
#include <vector>

#include "absl/types/span.h"

namespace arcface::detect {

struct ScoredBox {
  float x_min, y_min, x_max, y_max;  // relative to the network's square input
  float score;
};

// face-api's IoU thresholds: SSD-MobileNetV1 0.5, Tiny Face Detector 0.4.
inline constexpr float kSsdIouThreshold = 0.5f;
inline constexpr float kTinyIouThreshold = 0.4f;

// SSD: `encodings` n×4 (ty, tx, th, tw), `logits` n×3 (the face score is sigmoid(logits[1])),
// `priors` n×4 (y_min, x_min, y_max, x_max). Boxes whose score is >= min_score, decoded with
// the TF Object Detection API's scales (10 for centres, 5 for sizes), in anchor order.
std::vector<ScoredBox> DecodeSsd(absl::Span<const float> encodings, absl::Span<const float> logits,
                                 absl::Span<const float> priors, float min_score);

// Tiny Face Detector: `grid` cells × cells × 25 (NHWC), per anchor (tx, ty, tw, th, objectness):
// centre ((col, row) + sigmoid(t)) / cells, size exp(t) × anchor / cells, score
// sigmoid(objectness). Boxes whose score is >= min_score, in grid order.
std::vector<ScoredBox> DecodeTiny(absl::Span<const float> grid, int cells, float min_score);

// Intersection over union; 0 when either box is empty.
float Iou(const ScoredBox& a, const ScoredBox& b);

// Greedy NMS: boxes by score, descending (ties keep their order), each kept unless its IoU
// with a kept one exceeds `iou_threshold`; at most `max_results`. Returns the kept boxes by
// score, descending.
std::vector<ScoredBox> NonMaxSuppression(std::vector<ScoredBox> boxes, float iou_threshold,
                                         size_t max_results);

}  // namespace arcface::detect

#endif  // ARCFACE_SERVER_DETECT_BOX_DECODING_H_
