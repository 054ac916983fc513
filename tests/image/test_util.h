#ifndef ARCFACE_TESTS_IMAGE_TEST_UTIL_H_
#define ARCFACE_TESTS_IMAGE_TEST_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <opencv2/core.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "server/image/image.h"

namespace arcface::image::testing {

// Path of a test photo (in ARCFACE_TEST_DATA, by default tests/data).
std::string DataPath(const std::string& name);
// The file's bytes; records a test failure when it cannot be read.
std::string ReadFile(const std::string& path);
// The photo as OpenCV reads it from disk, in RGB, orientation as stored (the reference that
// DecodeImage must reproduce).
cv::Mat ReadRgbReference(const std::string& path);
// cv::imencode into a byte string; `bgr` is in OpenCV's channel order.
std::string Encode(const cv::Mat& bgr, const std::string& ext, const std::vector<int>& params = {});
// Largest absolute difference between two images of equal size and type, -1 if they differ in
// size, type or channel count.
double MaxAbsDiff(const cv::Mat& a, const cv::Mat& b);
// A 112×112 CV_8UC3 copy of the crop.
cv::Mat CropToMat(const Crop& crop);
// Uniform random CV_8UC3 pixels, deterministic in `seed`.
cv::Mat RandomImage(int rows, int cols, uint64_t seed);
// Big-endian / little-endian integer appenders for hand-made file headers.
void PutBe16(std::string& s, uint32_t v);
void PutBe32(std::string& s, uint32_t v);
void PutLe16(std::string& s, uint32_t v);
void PutLe32(std::string& s, uint32_t v);

// CRC-32 as PNG chunks use it (ISO 3309).
uint32_t Crc32(const std::string& bytes);
// Rewrites the CRC of every complete chunk of a PNG so that libpng looks past it.
void FixPngCrcs(std::string& png);

// Hand-made files for header variants cv::imencode does not write.
// A PNG signature and IHDR chunk (valid CRC, 8-bit RGB) declaring width × height, no pixels.
std::string MakePngHeaderOnly(uint32_t width, uint32_t height);
// Uncompressed big-endian ("MM") RGB TIFF; ImageWidth is a SHORT, ImageLength a LONG.
std::string MakeBigEndianTiff(const cv::Mat& bgr);
// 24-bit BMP with a BITMAPINFOHEADER and a negative height (rows stored top-down).
std::string MakeTopDownBmp(const cv::Mat& bgr);
// 24-bit BMP with the 12-byte BITMAPCOREHEADER (16-bit width and height), rows bottom-up.
std::string MakeCoreBmp(const cv::Mat& bgr);
// The simple-format WebP wrapped in the extended format: a VP8X chunk declaring the canvas
// size, followed by the original chunk.
std::string WrapInVp8x(const std::string& webp, int width, int height);
// The JPEG with an APP1 EXIF segment carrying the given orientation inserted after SOI.
std::string WithExifOrientation(const std::string& jpeg, int orientation);
// The JPEG with an APP15 segment inserted after SOI whose payload looks like a frame header
// declaring 4000x3000; a header parser must skip it by its length.
std::string WithDecoyFrameHeader(const std::string& jpeg);

// Uncompressed little-endian RGB TIFF in tile_width × tile_height tiles (multiples of 16, as
// TIFF requires; edge tiles zero-padded).
std::string MakeTiledTiff(const cv::Mat& bgr, uint32_t tile_width, uint32_t tile_height);
// The same directory for a width × height image, but the tiles' data is missing.
std::string MakeTiledTiffHeaderOnly(uint32_t width, uint32_t height, uint32_t tile_width,
                                    uint32_t tile_height);
// The JPEG with the size in its frame header replaced (the scan data still codes the old one).
std::string WithDeclaredJpegSize(const std::string& jpeg, uint32_t width, uint32_t height);
// An 8-bit RLE BMP of width × height whose data is only the end-of-bitmap escape (OpenCV
// decodes the rest as palette entry 0).
std::string MakeRle8BmpEndingEarly(uint32_t width, uint32_t height);

inline const absl::Status& StatusOf(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER_P(IsInvalidArgumentWith, substring,
          std::string("is INVALID_ARGUMENT with a message containing \"") + substring + "\"") {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "the status is " << status;
  return status.code() == absl::StatusCode::kInvalidArgument &&
         absl::StrContains(status.message(), substring);
}

MATCHER(IsOk, "is OK") {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "the status is " << status;
  return status.ok();
}

}  // namespace arcface::image::testing

#endif  // ARCFACE_TESTS_IMAGE_TEST_UTIL_H_
