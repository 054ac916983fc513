#include <cstdint>
#include <string>
#include <string_view>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/image/image.h"

namespace arcface::image {
namespace {

absl::Status CheckPixelCount(const char* what, int64_t width, int64_t height,
                             const Limits& limits) {
  if (width <= 0 || height <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has an empty size ", width, "x", height));
  }
  const int64_t pixels = width * height;  // both fit in int, so no overflow
  if (pixels > limits.max_pixels) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is ", width, "x", height, " = ", pixels,
                                                   " pixels, over the limit of ",
                                                   limits.max_pixels));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<cv::Mat> DecodeImage(std::string_view encoded, const Limits& limits) {
  if (encoded.empty()) return absl::InvalidArgumentError("empty image");
  if (encoded.size() > limits.max_encoded_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("encoded image is ", encoded.size(),
                                                   " bytes, over the limit of ",
                                                   limits.max_encoded_bytes));
  }
  // The probe accepts only formats whose header it can read, so every image that reaches a
  // decoder has had its size checked; OpenCV's other decoders (PPM, EXR, JPEG 2000, ...) are
  // never reached.
  absl::StatusOr<ImageInfo> info = ProbeImage(encoded);
  if (!info.ok()) return info.status();
  if (absl::Status s = CheckPixelCount("image", info->width, info->height, limits); !s.ok()) {
    return s;
  }

  cv::Mat bgr;
  try {
    // imdecode never writes to its input; the const_cast only satisfies cv::Mat's constructor.
    const cv::Mat buffer(1, static_cast<int>(encoded.size()), CV_8UC1,
                         const_cast<char*>(encoded.data()));
    // IGNORE_ORIENTATION: py-feat reads pixels as stored, and the probed size must stay the
    // decoded size.
    bgr = cv::imdecode(buffer, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  } catch (const cv::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("undecodable image: ", info->format, " decoder failed: ", e.err));
  }
  if (bgr.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("undecodable image: corrupt or unsupported ", info->format, " data"));
  }
  if (bgr.type() != CV_8UC3) {
    return absl::InvalidArgumentError(absl::StrCat("undecodable image: ", info->format,
                                                   " decoded to unexpected type ", bgr.type()));
  }
  // A mismatch would mean the cap was checked against a size the decoder did not use.
  if (bgr.cols != info->width || bgr.rows != info->height) {
    return absl::InvalidArgumentError(
        absl::StrCat("undecodable image: ", info->format, " decoded to ", bgr.cols, "x", bgr.rows,
                     " but its header says ", info->width, "x", info->height));
  }
  try {
    cv::cvtColor(bgr, bgr, cv::COLOR_BGR2RGB);
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("OpenCV color conversion failed: ", e.err));
  }
  return bgr;
}

absl::StatusOr<cv::Mat> RawToRgb(std::string_view data, int width, int height, PixelFormat format,
                                 const Limits& limits) {
  int channels;
  int conversion;  // -1: already RGB
  switch (format) {
    case PixelFormat::kRgb8:
      channels = 3;
      conversion = -1;
      break;
    case PixelFormat::kBgr8:
      channels = 3;
      conversion = cv::COLOR_BGR2RGB;
      break;
    case PixelFormat::kGray8:
      channels = 1;
      conversion = cv::COLOR_GRAY2RGB;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown raw pixel format ", static_cast<int>(format)));
  }
  if (absl::Status s = CheckPixelCount("raw image", width, height, limits); !s.ok()) return s;
  const int64_t expected = int64_t{width} * height * channels;
  if (static_cast<uint64_t>(expected) != data.size()) {
    return absl::InvalidArgumentError(absl::StrCat("raw image data is ", data.size(),
                                                   " bytes, expected ", width, "x", height, "x",
                                                   channels, " = ", expected));
  }
  try {
    // Wrapped read-only: clone() and cvtColor() write only to a new matrix, so the result
    // never aliases the caller's buffer.
    const cv::Mat wrapped(height, width, CV_8UC(channels), const_cast<char*>(data.data()));
    cv::Mat rgb;
    if (conversion < 0) {
      rgb = wrapped.clone();
    } else {
      cv::cvtColor(wrapped, rgb, conversion);
    }
    return rgb;
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("OpenCV raw conversion failed: ", e.err));
  }
}

}  // namespace arcface::image
