// The pictures of `arcface-client compare --matrix --plot`, `detect --plot` and `eval --roc`
// (OpenCV).
//
// Contract
// - Pure drawing into a new cv::Mat (CV_8UC3 BGR); WritePng writes it.
// - Similarity matrix layout, for n items with cell = MatrixCellSize(n) pixels:
//     width  = cell (row thumbnails) + n * cell (matrix) + kColorBarWidth
//     height = kTitleHeight + cell (column thumbnails) + n * cell + kBottomMargin
//   Cells are coloured on a fixed blue-white-red scale over [-1, 1] with the value printed;
//   a cell at or above the threshold (the verdict "same") is framed in kSameFrame, its frame
//   kSameFrameWidth pixels wide from 2 pixels inside the cell's edge (a trained model's cosines
//   can all be red: dlib's lie in 0.7-1 and its threshold is 0.9144); the colour bar on the
//   right marks the threshold.
// - Detections: the image itself (the same size) with, for face i, its box in the palette's
//   colour i (kDetectionPalette, cycling), its five landmarks as filled dots in the fixed colours
//   kLandmarkColors (left eye, right eye, nose tip, left and right mouth corners), and its label
//   on a box of its colour above it; all boxes first, then all dots, then all labels.
// - ROC: kRocWidth x kRocHeight, white; the title (and a red subtitle) above a plot area whose
//   x axis is log10 FAR from `far_min` (FAR 0 is drawn at its left edge) to 1 and whose y axis
//   is TAR from 0 to 1 (kRocLeft, kRocTop, kRocRight, kRocBottom pixels from the canvas's
//   edges), with a grid at each decade and every 0.2; chance (TAR = FAR) as a grey line, the
//   curve in kRocCurveColor, the marked point as a kRocMarkColor ring with its label.
#ifndef ARCFACE_CLIENT_CLI_PLOT_H_
#define ARCFACE_CLIENT_CLI_PLOT_H_

#include <array>
#include <opencv2/core.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace arcface::cli {

constexpr int kTitleHeight = 52;  // a title line and a subtitle line
constexpr int kColorBarWidth = 110;
constexpr int kBottomMargin = 10;
inline const cv::Scalar kSameFrame(0, 160, 0);  // BGR, the threshold's green
constexpr int kSameFrameWidth = 2;

// 96 pixels, smaller for many items so the picture stays within ~1600 pixels (at least 32).
int MatrixCellSize(int n);

// `thumbnails`: one BGR image per item (an empty Mat draws a grey placeholder);
// `similarities`: n x n, row-major.
cv::Mat DrawSimilarityMatrix(const std::vector<cv::Mat>& thumbnails,
                             const std::vector<float>& similarities, float threshold,
                             const std::string& title, const std::string& subtitle);

// BGR colour of a cosine on the blue (-1) - white (0) - red (+1) scale.
cv::Scalar CosineColor(float value);

// BGR.
inline const cv::Scalar kDetectionPalette[] = {{0, 200, 0},   {0, 140, 255}, {255, 80, 0},
                                               {200, 0, 200}, {0, 220, 220}, {255, 200, 0}};
inline const cv::Scalar kLandmarkColors[5] = {
    {255, 0, 0}, {0, 0, 255}, {0, 255, 0}, {255, 0, 255}, {0, 255, 255}};

struct DrawnFace {
  cv::Rect2f box;  // pixels of the image
  std::array<cv::Point2f, 5> landmarks;
  std::string label;  // e.g. "1 0.99" or "2 alice 0.87" (Hershey fonts: ASCII)
};

cv::Mat DrawDetections(const cv::Mat& image, const std::vector<DrawnFace>& faces);
// The radius of the landmark dots DrawDetections draws on an image of that size.
int LandmarkRadius(const cv::Size& image);

constexpr int kRocWidth = 720;
constexpr int kRocHeight = 560;
constexpr int kRocLeft = 70, kRocTop = kTitleHeight + 16, kRocRight = 24, kRocBottom = 56;
inline const cv::Scalar kRocCurveColor(180, 90, 20);  // BGR
inline const cv::Scalar kRocMarkColor(0, 0, 220);

struct RocMark {
  double far = 0, tar = 0;
  std::string label;  // ASCII
};

// `curve`: (FAR, TAR) points by FAR ascending. `far_min` in (0, 1).
cv::Mat DrawRoc(const std::vector<std::pair<double, double>>& curve,
                const std::optional<RocMark>& mark, double far_min, const std::string& title,
                const std::string& subtitle);

// cv::imwrite with OpenCV's exceptions turned into a status naming the path.
absl::Status WritePng(const std::string& path, const cv::Mat& image);

}  // namespace arcface::cli

#endif  // ARCFACE_CLIENT_CLI_PLOT_H_
