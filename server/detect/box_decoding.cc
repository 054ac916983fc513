#include "server/detect/box_decoding.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <cmath>

namespace arcface::detect {

namespace {

float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// face-api's Tiny Face Detector anchors (width, height) in grid cells.
constexpr std::array<std::array<float, 2>, 5> kTinyAnchors = {{{1.603231f, 2.094468f},
                                                               {6.041143f, 7.080126f},
                                                               {2.882459f, 3.518061f},
                                                               {4.266906f, 5.178857f},
                                                               {9.041765f, 10.66308f}}};

}  // namespace

std::vector<ScoredBox> DecodeSsd(absl::Span<const float> encodings, absl::Span<const float> logits,
                                 absl::Span<const float> priors, float min_score) {
  const size_t n = priors.size() / 4;
  assert(encodings.size() == 4 * n && logits.size() == 3 * n);
  std::vector<ScoredBox> boxes;
  for (size_t i = 0; i < n; ++i) {
    const float score = Sigmoid(logits[3 * i + 1]);
    if (!(score >= min_score)) continue;
    const float* prior = &priors[4 * i];
    const float* t = &encodings[4 * i];
    const float prior_h = prior[2] - prior[0], prior_w = prior[3] - prior[1];
    const float cy = prior[0] + prior_h / 2 + t[0] / 10 * prior_h;
    const float cx = prior[1] + prior_w / 2 + t[1] / 10 * prior_w;
    const float half_h = std::exp(t[2] / 5) * prior_h / 2;
    const float half_w = std::exp(t[3] / 5) * prior_w / 2;
    boxes.push_back({cx - half_w, cy - half_h, cx + half_w, cy + half_h, score});
  }
  return boxes;
}

std::vector<ScoredBox> DecodeTiny(absl::Span<const float> grid, int cells, float min_score) {
  constexpr size_t kPerAnchor = 5;
  const size_t per_cell = kTinyAnchors.size() * kPerAnchor;
  assert(grid.size() == per_cell * cells * cells);
  std::vector<ScoredBox> boxes;
  for (int row = 0; row < cells; ++row) {
    for (int col = 0; col < cells; ++col) {
      for (size_t a = 0; a < kTinyAnchors.size(); ++a) {
        const size_t cell = static_cast<size_t>(row) * cells + col;
        const float* t = &grid[cell * per_cell + a * kPerAnchor];
        const float score = Sigmoid(t[4]);
        if (!(score >= min_score)) continue;
        const float cx = (col + Sigmoid(t[0])) / cells;
        const float cy = (row + Sigmoid(t[1])) / cells;
        const float w = std::exp(t[2]) * kTinyAnchors[a][0] / cells;
        const float h = std::exp(t[3]) * kTinyAnchors[a][1] / cells;
        boxes.push_back({cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score});
      }
    }
  }
  return boxes;
}

float Iou(const ScoredBox& a, const ScoredBox& b) {
  const float area_a = (a.x_max - a.x_min) * (a.y_max - a.y_min);
  const float area_b = (b.x_max - b.x_min) * (b.y_max - b.y_min);
  if (!(area_a > 0) || !(area_b > 0)) return 0;
  const float w = std::max(0.0f, std::min(a.x_max, b.x_max) - std::max(a.x_min, b.x_min));
  const float h = std::max(0.0f, std::min(a.y_max, b.y_max) - std::max(a.y_min, b.y_min));
  const float intersection = w * h;
  return intersection / (area_a + area_b - intersection);
}

std::vector<ScoredBox> NonMaxSuppression(std::vector<ScoredBox> boxes, float iou_threshold,
                                         size_t max_results) {
  std::stable_sort(boxes.begin(), boxes.end(),
                   [](const ScoredBox& a, const ScoredBox& b) { return a.score > b.score; });
  std::vector<ScoredBox> kept;
  for (const ScoredBox& box : boxes) {
    if (kept.size() >= max_results) break;
    const bool suppressed = std::any_of(kept.begin(), kept.end(), [&](const ScoredBox& k) {
      return Iou(box, k) > iou_threshold;
    });
    if (!suppressed) kept.push_back(box);
  }
  return kept;
}

}  // namespace arcface::detect
