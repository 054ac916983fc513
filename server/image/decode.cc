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

// The area a TIFF decoder works on: whole tiles, which may reach past the image. libtiff
// decodes, and OpenCV allocates, every tile in full, so a 150-byte file declaring one
// 15984x15984 tile over a 112x112 image costs 4 s.
absl::StatusOr<int64_t> CheckTileArea(const ImageInfo& info, const Limits& limits) {
  const int64_t pixels = int64_t{info.width} * info.height;
  if (info.tile_width <= 0 || info.tile_height <= 0) return pixels;
  auto padded = [](int64_t size, int64_t tile) { return (size + tile - 1) / tile * tile; };
  const int64_t width = padded(info.width, info.tile_width);
  const int64_t height = padded(info.height, info.tile_height);
  // Each side is under 2^34, so the division keeps the comparison from overflowing.
  if (width > limits.max_pixels / height) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TIFF tiles of ", info.tile_width, "x", info.tile_height, " make the decoder work on a ",
        width, "x", height, " area for a ", info.width, "x", info.height,
        " image, over the limit of ", limits.max_pixels, " pixels"));
  }
  return width * height;
}

int64_t MaxPixelsPerByteOf(const std::string& format, const MaxPixelsPerByte& max) {
  if (format == "jpeg") return max.jpeg;
  if (format == "png") return max.png;
  if (format == "webp") return max.webp;
  if (format == "tiff") return max.tiff;
  if (format == "bmp") return max.bmp;
  return 0;
}

absl::Status CheckDensity(const ImageInfo& info, int64_t pixels, size_t bytes,
                          const Limits& limits) {
  const int64_t max = MaxPixelsPerByteOf(info.format, limits.max_pixels_per_byte);
  if (max <= 0 || pixels <= limits.dense_pixels_allowed) return absl::OkStatus();
  // pixels > max × bytes exactly when the ratio rounded up exceeds max; no product overflows.
  const int64_t size = static_cast<int64_t>(bytes);
  const int64_t per_byte = (pixels + size - 1) / size;
  if (per_byte <= max) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "image declares ", info.width, "x", info.height, " (", pixels, " pixels to decode) in ",
      bytes, " bytes: ", per_byte, " pixels per byte, over the limit of ", max, " for ",
      info.format, " (an image this size takes at least ", (pixels + max - 1) / max,
      " bytes; truncated or padded-out data?)"));
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
  absl::StatusOr<int64_t> work = CheckTileArea(*info, limits);
  if (!work.ok()) return work.status();
  if (absl::Status s = CheckDensity(*info, *work, encoded.size(), limits); !s.ok()) return s;

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
