#include "client/cli/plot.h"

#include <algorithm>
#include <cmath>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace arcface::cli {
namespace {

const cv::Scalar kBackground(255, 255, 255);
const cv::Scalar kInk(30, 30, 30);

// The image scaled to fit a size x size square (aspect kept), centred on light grey.
cv::Mat Thumbnail(const cv::Mat& image, int size) {
  cv::Mat out(size, size, CV_8UC3, cv::Scalar(225, 225, 225));
  if (image.empty()) {
    cv::line(out, {0, 0}, {size - 1, size - 1}, cv::Scalar(160, 160, 160), 1);
    cv::line(out, {size - 1, 0}, {0, size - 1}, cv::Scalar(160, 160, 160), 1);
    return out;
  }
  const double scale = std::min(double(size) / image.cols, double(size) / image.rows);
  const int w = std::max(1, int(std::lround(image.cols * scale)));
  const int h = std::max(1, int(std::lround(image.rows * scale)));
  cv::Mat resized;
  cv::resize(image, resized, {w, h}, 0, 0, cv::INTER_AREA);
  resized.copyTo(out(cv::Rect((size - w) / 2, (size - h) / 2, w, h)));
  return out;
}

void Label(cv::Mat& canvas, const std::string& text, cv::Point corner, double scale,
           const cv::Scalar& fill, const cv::Scalar& ink) {
  int baseline = 0;
  const cv::Size size = cv::getTextSize(text, cv::FONT_HERSHEY_SIMPLEX, scale, 1, &baseline);
  cv::rectangle(canvas, cv::Rect(corner.x, corner.y, size.width + 6, size.height + baseline + 4),
                fill, cv::FILLED);
  cv::putText(canvas, text, {corner.x + 3, corner.y + size.height + 2}, cv::FONT_HERSHEY_SIMPLEX,
              scale, ink, 1, cv::LINE_AA);
}

void CenteredText(cv::Mat& canvas, const std::string& text, cv::Rect cell, double scale,
                  const cv::Scalar& ink) {
  int baseline = 0;
  const cv::Size size = cv::getTextSize(text, cv::FONT_HERSHEY_SIMPLEX, scale, 1, &baseline);
  cv::putText(canvas, text,
              {cell.x + (cell.width - size.width) / 2, cell.y + (cell.height + size.height) / 2},
              cv::FONT_HERSHEY_SIMPLEX, scale, ink, 1, cv::LINE_AA);
}

}  // namespace

int MatrixCellSize(int n) { return std::clamp(1536 / std::max(1, n), 32, 96); }

cv::Scalar CosineColor(float value) {
  // Endpoints of a blue-white-red diverging scale (BGR).
  const cv::Vec3d blue(192, 76, 59), white(242, 242, 242), red(38, 4, 180);
  const double v = std::clamp(double(value), -1.0, 1.0);
  const cv::Vec3d c = v < 0 ? white + (blue - white) * (-v) : white + (red - white) * v;
  return cv::Scalar(c[0], c[1], c[2]);
}

cv::Mat DrawSimilarityMatrix(const std::vector<cv::Mat>& thumbnails,
                             const std::vector<float>& similarities, float threshold,
                             const std::string& title, const std::string& subtitle) {
  const int n = static_cast<int>(thumbnails.size());
  const int cell = MatrixCellSize(n);
  const int width = cell + n * cell + kColorBarWidth;
  const int height = kTitleHeight + cell + n * cell + kBottomMargin;
  cv::Mat canvas(height, width, CV_8UC3, kBackground);
  cv::putText(canvas, title, {8, 20}, cv::FONT_HERSHEY_SIMPLEX, 0.5, kInk, 1, cv::LINE_AA);
  if (!subtitle.empty()) {
    cv::putText(canvas, subtitle, {8, 40}, cv::FONT_HERSHEY_SIMPLEX, 0.42, cv::Scalar(0, 0, 190),
                1, cv::LINE_AA);
  }

  const int top = kTitleHeight + cell;  // the matrix's first row
  const double label_scale = cell >= 64 ? 0.45 : 0.3;
  for (int i = 0; i < n; ++i) {
    const cv::Mat thumb = Thumbnail(thumbnails[i], cell - 4);
    thumb.copyTo(canvas(cv::Rect(cell + i * cell + 2, kTitleHeight + 2, cell - 4, cell - 4)));
    thumb.copyTo(canvas(cv::Rect(2, top + i * cell + 2, cell - 4, cell - 4)));
    const std::string number = std::to_string(i + 1);
    Label(canvas, number, {cell + i * cell + 2, kTitleHeight + 2}, label_scale, kInk, kBackground);
    Label(canvas, number, {2, top + i * cell + 2}, label_scale, kInk, kBackground);
  }
  const double value_scale = cell >= 80 ? 0.5 : cell >= 48 ? 0.38 : 0.28;
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < n; ++c) {
      const float v = similarities[size_t(r) * n + c];
      const cv::Rect box(cell + c * cell, top + r * cell, cell, cell);
      const cv::Scalar color = CosineColor(v);
      cv::rectangle(canvas, box, color, cv::FILLED);
      cv::rectangle(canvas, box, kBackground, 1);
      if (v >= threshold) {  // the verdict "same": on a trained model's narrow range of cosines
        cv::rectangle(canvas, cv::Rect(box.x + 2, box.y + 2, box.width - 4, box.height - 4),
                      kSameFrame, kSameFrameWidth);
      }
      const double luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2];
      CenteredText(canvas, absl::StrFormat("%.2f", v), box, value_scale,
                   luminance < 140 ? kBackground : kInk);
    }
  }

  // Colour bar: +1 at the top, -1 at the bottom, ticks every 0.5, the threshold marked.
  const int bar_x = cell + n * cell + 16;
  const int bar_w = 20;
  const int bar_top = top;
  const int bar_h = std::max(n * cell, 100);
  const int bar_bottom = std::min(bar_top + bar_h, height - kBottomMargin) - 1;
  auto y_of = [&](double v) { return int(std::lround(bar_top + (1.0 - v) / 2.0 * (bar_bottom - bar_top))); };
  for (int y = bar_top; y <= bar_bottom; ++y) {
    const double v = 1.0 - 2.0 * (y - bar_top) / std::max(1, bar_bottom - bar_top);
    cv::line(canvas, {bar_x, y}, {bar_x + bar_w - 1, y}, CosineColor(float(v)));
  }
  cv::rectangle(canvas, cv::Rect(bar_x, bar_top, bar_w, bar_bottom - bar_top + 1), kInk, 1);
  for (double v : {1.0, 0.5, 0.0, -0.5, -1.0}) {
    const int y = y_of(v);
    cv::line(canvas, {bar_x + bar_w, y}, {bar_x + bar_w + 4, y}, kInk);
    cv::putText(canvas, absl::StrFormat("%+.1f", v), {bar_x + bar_w + 7, y + 4},
                cv::FONT_HERSHEY_SIMPLEX, 0.38, kInk, 1, cv::LINE_AA);
  }
  const int ty = y_of(threshold);
  cv::line(canvas, {bar_x - 4, ty}, {bar_x + bar_w + 3, ty}, kSameFrame, 2);
  cv::putText(canvas, absl::StrFormat("thr %.2f", threshold), {bar_x + bar_w + 7, ty + 14},
              cv::FONT_HERSHEY_SIMPLEX, 0.35, cv::Scalar(0, 120, 0), 1, cv::LINE_AA);
  cv::putText(canvas, "cosine", {bar_x - 6, bar_top - 8}, cv::FONT_HERSHEY_SIMPLEX, 0.4, kInk, 1,
              cv::LINE_AA);
  return canvas;
}

int LandmarkRadius(const cv::Size& image) {
  return std::max(2, std::min(image.width, image.height) / 150);
}

cv::Mat DrawDetections(const cv::Mat& image, const std::vector<DrawnFace>& faces) {
  constexpr size_t kColors = sizeof(kDetectionPalette) / sizeof(kDetectionPalette[0]);
  cv::Mat out = image.clone();
  const int thickness = std::max(2, std::min(image.cols, image.rows) / 300);
  const double scale = std::max(0.5, std::min(image.cols, image.rows) / 800.0);
  auto pixel = [](const cv::Point2f& p) {
    return cv::Point(int(std::lround(p.x)), int(std::lround(p.y)));
  };
  for (size_t i = 0; i < faces.size(); ++i) {
    const cv::Rect2f& b = faces[i].box;
    cv::rectangle(out, pixel(b.tl()), pixel(b.br()), kDetectionPalette[i % kColors], thickness);
  }
  const int radius = LandmarkRadius(image.size());
  for (const DrawnFace& face : faces) {
    for (int k = 0; k < 5; ++k) {
      cv::circle(out, pixel(face.landmarks[k]), radius, kLandmarkColors[k], cv::FILLED);
    }
  }
  for (size_t i = 0; i < faces.size(); ++i) {
    int baseline = 0;
    const cv::Size size =
        cv::getTextSize(faces[i].label, cv::FONT_HERSHEY_SIMPLEX, scale, 2, &baseline);
    const cv::Point corner = pixel(faces[i].box.tl());
    Label(out, faces[i].label, {corner.x, std::max(0, corner.y - size.height - baseline - 4)},
          scale, kDetectionPalette[i % kColors], cv::Scalar(255, 255, 255));
  }
  return out;
}

cv::Mat DrawRoc(const std::vector<std::pair<double, double>>& curve,
                const std::optional<RocMark>& mark, double far_min, const std::string& title,
                const std::string& subtitle) {
  cv::Mat canvas(kRocHeight, kRocWidth, CV_8UC3, kBackground);
  cv::putText(canvas, title, {8, 20}, cv::FONT_HERSHEY_SIMPLEX, 0.5, kInk, 1, cv::LINE_AA);
  if (!subtitle.empty()) {
    cv::putText(canvas, subtitle, {8, 40}, cv::FONT_HERSHEY_SIMPLEX, 0.42, cv::Scalar(0, 0, 190), 1,
                cv::LINE_AA);
  }
  const int x0 = kRocLeft, x1 = kRocWidth - kRocRight, y0 = kRocTop, y1 = kRocHeight - kRocBottom;
  const double decades = -std::log10(far_min);
  auto px = [&](double far, double tar) {
    const double x = far <= far_min ? 0.0 : (std::log10(far) + decades) / decades;
    return cv::Point(int(std::lround(x0 + x * (x1 - x0))),
                     int(std::lround(y1 - std::clamp(tar, 0.0, 1.0) * (y1 - y0))));
  };
  const cv::Scalar grid(225, 225, 225);
  for (int d = 0; d <= int(std::floor(decades)); ++d) {
    const double far = std::pow(10.0, -d);
    const int x = px(far, 0).x;
    cv::line(canvas, {x, y0}, {x, y1}, grid);
    CenteredText(canvas, d == 0 ? std::string("1") : absl::StrFormat("1e-%d", d),
                 cv::Rect(x - 30, y1 + 4, 60, 18), 0.4, kInk);
  }
  for (int t = 0; t <= 5; ++t) {
    const int y = px(1, t / 5.0).y;
    cv::line(canvas, {x0, y}, {x1, y}, grid);
    cv::putText(canvas, absl::StrFormat("%.1f", t / 5.0), {x0 - 34, y + 5},
                cv::FONT_HERSHEY_SIMPLEX, 0.4, kInk, 1, cv::LINE_AA);
  }
  cv::rectangle(canvas, cv::Point(x0, y0), cv::Point(x1, y1), kInk, 1);
  CenteredText(canvas, "FAR (false accept rate, log scale)", cv::Rect(x0, y1 + 22, x1 - x0, 24),
               0.45, kInk);
  cv::putText(canvas, "TAR", {8, (y0 + y1) / 2}, cv::FONT_HERSHEY_SIMPLEX, 0.45, kInk, 1,
              cv::LINE_AA);
  std::vector<cv::Point> chance;
  for (int i = 0; i <= 100; ++i) {
    const double far = std::pow(10.0, -decades * (1.0 - i / 100.0));
    chance.push_back(px(far, far));
  }
  cv::polylines(canvas, chance, false, cv::Scalar(160, 160, 160), 1, cv::LINE_AA);
  std::vector<cv::Point> line;
  for (const auto& [far, tar] : curve) line.push_back(px(far, tar));
  cv::polylines(canvas, line, false, kRocCurveColor, 2, cv::LINE_AA);
  if (mark) {
    const cv::Point p = px(mark->far, mark->tar);
    cv::circle(canvas, p, 6, kRocMarkColor, 2, cv::LINE_AA);
    cv::putText(canvas, mark->label, {std::min(p.x + 10, x1 - 200), std::max(p.y - 10, y0 + 14)},
                cv::FONT_HERSHEY_SIMPLEX, 0.42, kRocMarkColor, 1, cv::LINE_AA);
  }
  return canvas;
}

absl::Status WritePng(const std::string& path, const cv::Mat& image) {
  try {
    if (cv::imwrite(path, image, {cv::IMWRITE_PNG_COMPRESSION, 9})) return absl::OkStatus();
    return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  } catch (const cv::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("cannot write ", path, ": ", e.what()));
  }
}

}  // namespace arcface::cli
