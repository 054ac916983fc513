#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/image/image.h"

namespace arcface::image {
namespace {

absl::Status CheckRgb(const cv::Mat& rgb) {
  if (rgb.empty() || rgb.dims != 2 || rgb.type() != CV_8UC3) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected a non-empty 8-bit 3-channel image, got ", rgb.cols, "x", rgb.rows,
                     " of OpenCV type ", rgb.type()));
  }
  return absl::OkStatus();
}

// A size × size CV_8UC3 header over the crop's own buffer, so OpenCV writes the result in place.
cv::Mat CropView(Crop& crop, int size) { return cv::Mat(size, size, CV_8UC3, crop.data()); }

absl::StatusOr<Crop> ResizeToCrop(const cv::Mat& region, const model::CropGeometry& geometry) {
  Crop crop(geometry.bytes());
  cv::Mat out = CropView(crop, geometry.size);
  try {
    if (region.cols == geometry.size && region.rows == geometry.size) {
      region.copyTo(out);
    } else {
      cv::resize(region, out, out.size(), 0, 0, cv::INTER_LINEAR);
    }
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("OpenCV resize failed: ", e.err));
  }
  // copyTo/resize reuse a destination of the right size and type; a reallocation would leave
  // the crop unwritten.
  if (out.data != crop.data()) return absl::InternalError("OpenCV reallocated the crop");
  return crop;
}

// floor(v + 0.5) of a box edge, bounded so that widths and heights fit in an int.
absl::StatusOr<int64_t> RoundEdge(float v, const char* name) {
  if (!std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat("box ", name, " is not finite"));
  }
  constexpr double kMaxEdge = 1 << 29;
  const double rounded = std::floor(static_cast<double>(v) + 0.5);
  if (std::fabs(rounded) > kMaxEdge) {
    return absl::InvalidArgumentError(
        absl::StrCat("box ", name, " = ", v, " is out of range (|v| <= ", kMaxEdge, ")"));
  }
  return static_cast<int64_t>(rounded);
}

}  // namespace

absl::StatusOr<Crop> ResizeWhole(const cv::Mat& rgb, const model::CropGeometry& geometry) {
  if (absl::Status s = CheckRgb(rgb); !s.ok()) return s;
  return ResizeToCrop(rgb, geometry);
}

absl::StatusOr<Crop> CropBox(const cv::Mat& rgb, const Box& box, const Limits& limits,
                             const model::CropGeometry& geometry) {
  if (absl::Status s = CheckRgb(rgb); !s.ok()) return s;
  absl::StatusOr<int64_t> x0 = RoundEdge(box.x_min, "x_min");
  if (!x0.ok()) return x0.status();
  absl::StatusOr<int64_t> y0 = RoundEdge(box.y_min, "y_min");
  if (!y0.ok()) return y0.status();
  absl::StatusOr<int64_t> x1 = RoundEdge(box.x_max, "x_max");
  if (!x1.ok()) return x1.status();
  absl::StatusOr<int64_t> y1 = RoundEdge(box.y_max, "y_max");
  if (!y1.ok()) return y1.status();
  if (*x1 <= *x0 || *y1 <= *y0) {
    return absl::InvalidArgumentError(
        absl::StrCat("box is empty after rounding to whole pixels: columns [", *x0, ", ", *x1,
                     "), rows [", *y0, ", ", *y1, ")"));
  }
  const int64_t width = *x1 - *x0;
  const int64_t height = *y1 - *y0;
  // Bounds the black canvas a box reaching outside the image needs.
  if (width * height > limits.max_pixels) {
    return absl::InvalidArgumentError(absl::StrCat("box is ", width, "x", height, " = ",
                                                   width * height, " pixels, over the limit of ",
                                                   limits.max_pixels));
  }
  const cv::Rect region(static_cast<int>(*x0), static_cast<int>(*y0), static_cast<int>(width),
                        static_cast<int>(height));
  const cv::Rect image(0, 0, rgb.cols, rgb.rows);
  if ((region & image) == region) return ResizeToCrop(rgb(region), geometry);

  cv::Mat canvas;
  try {
    canvas = cv::Mat::zeros(region.size(), CV_8UC3);
    const cv::Rect inside = region & image;
    if (!inside.empty()) rgb(inside).copyTo(canvas(inside - region.tl()));
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("OpenCV box canvas failed: ", e.err));
  }
  return ResizeToCrop(canvas, geometry);
}

absl::StatusOr<Crop> AlignFace(const cv::Mat& rgb, absl::Span<const Point> landmarks,
                               const model::CropGeometry& geometry) {
  if (landmarks.size() != 5) {
    return absl::InvalidArgumentError(absl::StrCat("expected 5 landmarks, got ", landmarks.size()));
  }
  for (size_t i = 0; i < landmarks.size(); ++i) {
    if (!std::isfinite(landmarks[i].x) || !std::isfinite(landmarks[i].y)) {
      return absl::InvalidArgumentError(absl::StrCat("landmark ", i, " is not finite (",
                                                     landmarks[i].x, ", ", landmarks[i].y, ")"));
    }
  }
  if (absl::Status s = CheckRgb(rgb); !s.ok()) return s;
  absl::StatusOr<cv::Matx23d> m = EstimateSimilarity(landmarks, Template(geometry));
  if (!m.ok()) return m.status();

  cv::Mat source = rgb;
  cv::Matx23d warp = *m;
  // OpenCV's remap addresses source pixels with 16-bit coordinates and refuses larger images.
  // Then only the part the warp can read is passed: the source footprint of the output square
  // (one pixel of margin for the bilinear neighbours, one more for rounding). Images below the
  // limit take the direct path, bit-identical to InsightFace's cv2.warpAffine.
  if (rgb.cols >= SHRT_MAX || rgb.rows >= SHRT_MAX) {
    const double a = warp(0, 0), b = warp(0, 1), c = warp(1, 0), d = warp(1, 1);
    const double det = a * d - b * c;  // s² > 0: EstimateSimilarity refuses scale 0
    double min_x = HUGE_VAL, min_y = HUGE_VAL, max_x = -HUGE_VAL, max_y = -HUGE_VAL;
    for (double qx : {-1.0, static_cast<double>(geometry.size)}) {
      for (double qy : {-1.0, static_cast<double>(geometry.size)}) {
        const double ux = qx - warp(0, 2), uy = qy - warp(1, 2);
        const double px = (d * ux - b * uy) / det, py = (-c * ux + a * uy) / det;
        min_x = std::min(min_x, px);
        max_x = std::max(max_x, px);
        min_y = std::min(min_y, py);
        max_y = std::max(max_y, py);
      }
    }
    const double x0 = std::clamp(std::floor(min_x) - 2, 0.0, static_cast<double>(rgb.cols));
    const double y0 = std::clamp(std::floor(min_y) - 2, 0.0, static_cast<double>(rgb.rows));
    const double x1 = std::clamp(std::ceil(max_x) + 3, 0.0, static_cast<double>(rgb.cols));
    const double y1 = std::clamp(std::ceil(max_y) + 3, 0.0, static_cast<double>(rgb.rows));
    if (x1 <= x0 || y1 <= y0) return Crop(geometry.bytes(), 0);  // the face is outside the image
    if (x1 - x0 >= SHRT_MAX || y1 - y0 >= SHRT_MAX) {
      return absl::InvalidArgumentError(absl::StrCat("landmarks span too large a region to align (",
                                                     x1 - x0, "x", y1 - y0, " pixels; at most ",
                                                     SHRT_MAX - 1, " per side)"));
    }
    source = rgb(cv::Rect(static_cast<int>(x0), static_cast<int>(y0), static_cast<int>(x1 - x0),
                          static_cast<int>(y1 - y0)));
    warp(0, 2) += a * x0 + b * y0;
    warp(1, 2) += c * x0 + d * y0;
  }

  Crop crop(geometry.bytes());
  cv::Mat out = CropView(crop, geometry.size);
  try {
    cv::warpAffine(source, out, cv::Mat(warp), out.size(), cv::INTER_LINEAR, cv::BORDER_CONSTANT,
                   cv::Scalar::all(0));
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("OpenCV warpAffine failed: ", e.err));
  }
  if (out.data != crop.data()) return absl::InternalError("OpenCV reallocated the crop");
  return crop;
}

}  // namespace arcface::image
