// arcface::image — turns what a client sends (encoded or raw pixels, plus an optional box or
// five landmarks) into the square uint8 RGB crop a model consumes: by default ArcFace's 112×112,
// or any model family's model::CropGeometry (its size and five-point template).
//
// Contract
// - Ownership: inputs are borrowed for the duration of the call only. Every returned cv::Mat
//   and Crop owns its pixels; none aliases the caller's buffers, so a request's bytes may be
//   freed as soon as a call returns.
// - Blocking: calls are CPU-bound and synchronous (no I/O, no locks of this library's own).
//   Decoding costs grow with the pixels, not the bytes; the caps in Limits bound them (pixels,
//   pixels per encoded byte), and both are enforced from the image header before any pixel is
//   decoded or any canvas allocated.
// - Errors: every rejection caused by the input is INVALID_ARGUMENT whose message names the
//   reason (callers prefix the face index). INTERNAL only if OpenCV fails on input this library
//   already validated. No exception escapes: OpenCV's are caught here and become a status.
// - Thread safety: all functions are pure (no state between calls) and may run concurrently
//   from any number of threads.
// - Pixel conventions: images are cv::Mat CV_8UC3 in RGB order; a Crop is geometry.bytes() of
//   RGB, row-major HWC. Coordinates are in pixels with integer pixel centres (pixel (0,0) spans
//   [-0.5, 0.5)). Resizing is bilinear with half-pixel centres and no antialiasing (py-feat's
//   F.interpolate(align_corners=False)); it is done by OpenCV's 8-bit fixed-point path, so
//   results may differ by 1 from rounding a float bilinear interpolation.
#ifndef ARCFACE_SERVER_IMAGE_IMAGE_H_
#define ARCFACE_SERVER_IMAGE_IMAGE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <opencv2/core.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/model/shapes.h"

namespace arcface::image {

using model::kCropBytes;
using model::kCropSize;

// size × size × 3 bytes of the geometry it was made for, RGB, row-major HWC.
using Crop = std::vector<uint8_t>;

// Layout of tightly packed raw pixels (no row padding).
enum class PixelFormat { kRgb8, kBgr8, kGray8 };

// The densest encoding accepted per format, in declared pixels per byte of the encoded file;
// 0 turns the check off for that format. Decoding costs time in proportion to the pixels, not
// the bytes, and a few hundred bytes can declare tens of megapixels: a JPEG cut after its
// header, which libjpeg pads with grey (630 bytes declaring 6300x6300 cost 1.5 s), a flat
// lossless WebP, an RLE BMP that ends early. The values sit at least 3x above the densest real
// photos measured, re-encoded down to JPEG/WebP quality 1 and blurred (JPEG 161, PNG 8, WebP
// 291, TIFF 5.4, BMP 0.33 pixels per byte; docs/RELIABILITY.md), and at or above each format's
// own bound where it has one: baseline and progressive JPEG spend at least a bit per 8x8 luma
// block (512 pixels per byte), 8-bit PNG and deflate TIFF at most 1032:1, RLE BMP 255 pixels
// per 2-byte run. Flat one-colour images pass as well (at most 169 pixels per byte as JPEG,
// 284 as PNG, 560 as lossy WebP, up to 12 MP), except lossless WebP, which codes one in ~100
// bytes at any size and so passes only up to Limits::dense_pixels_allowed.
struct MaxPixelsPerByte {
  int64_t jpeg = 512;
  int64_t png = 1024;
  int64_t webp = 1024;
  int64_t tiff = 1024;
  int64_t bmp = 128;
};

struct Limits {
  // Caps width × height of decoded and raw images, and the area of a crop box (which may
  // reach outside the image and so needs a canvas of its own). For a tiled TIFF it caps the
  // area of the whole tiles the decoder works on, which may reach past the image.
  int64_t max_pixels = 40'000'000;
  size_t max_encoded_bytes = size_t{64} << 20;
  // Encoded images denser than this are refused from the header, unless their area is at most
  // dense_pixels_allowed (a megapixel decodes in 10-40 ms, so small flat images, such as a
  // one-colour 112x112 crop, always pass).
  MaxPixelsPerByte max_pixels_per_byte;
  int64_t dense_pixels_allowed = int64_t{1} << 20;
};

struct Box {
  float x_min, y_min, x_max, y_max;  // pixels
};

struct Point {
  float x, y;
};

// The header of an encoded image. `format` is one of "jpeg", "png", "bmp", "webp", "tiff".
// The size is the one stored in the file (JPEG EXIF orientation is not applied).
struct ImageInfo {
  std::string format;
  int width = 0;
  int height = 0;
  // A tiled TIFF's tile size (its decoder works on whole tiles); 0 for every other image.
  int64_t tile_width = 0;
  int64_t tile_height = 0;
};

// Reads the format and declared size from the header alone, without decoding pixels.
// Bounds-checked: garbage or truncated input yields an error, never a read past the end.
absl::StatusOr<ImageInfo> ProbeImage(std::string_view encoded);

// Decodes JPEG, PNG, BMP, WebP or TIFF into an 8-bit RGB image (CV_8UC3). Grayscale is
// replicated to three channels, alpha is dropped, 16-bit samples are reduced to 8 bits, and
// JPEG EXIF orientation is ignored (as py-feat / torchvision's read_image do). Images whose
// declared width × height exceeds limits.max_pixels, or that declare more pixels per byte than
// limits.max_pixels_per_byte allows their format, are refused from the header, before any
// pixel is decoded; so are inputs over limits.max_encoded_bytes and any other format.
absl::StatusOr<cv::Mat> DecodeImage(std::string_view encoded, const Limits& limits);

// Copies (converting as needed) tightly packed pixels into an RGB image. Checks width and
// height > 0, width × height ≤ limits.max_pixels and data.size() == width × height × channels.
absl::StatusOr<cv::Mat> RawToRgb(std::string_view data, int width, int height, PixelFormat format,
                                 const Limits& limits);

// The whole image as the crop: copied exactly when already of the crop's size, else resized.
absl::StatusOr<Crop> ResizeWhole(const cv::Mat& rgb,
                                 const model::CropGeometry& geometry = model::kArcFaceCrop);

// The box region as the crop. Edges are rounded to whole pixels with floor(v + 0.5): the region
// is columns [round(x_min), round(x_max)) and rows [round(y_min), round(y_max)). Parts outside
// the image are black. The region is copied exactly when of the crop's size, else resized.
// Errors: a non-finite coordinate, an empty region after rounding, an area over
// limits.max_pixels.
absl::StatusOr<Crop> CropBox(const cv::Mat& rgb, const Box& box, const Limits& limits = Limits(),
                             const model::CropGeometry& geometry = model::kArcFaceCrop);

// InsightFace's norm_crop: the five landmarks (left eye, right eye, nose tip, left mouth corner,
// right mouth corner) are mapped onto the geometry's template (ArcFaceTemplate() by default) by
// EstimateSimilarity, and the image is warped bilinearly into the geometry's square with a black
// border. Errors: not exactly 5 landmarks, a non-finite landmark, degenerate (coincident)
// landmarks.
absl::StatusOr<Crop> AlignFace(const cv::Mat& rgb, absl::Span<const Point> landmarks,
                               const model::CropGeometry& geometry = model::kArcFaceCrop);

// Least-squares similarity transform with scale (Umeyama 1991, as skimage's
// SimilarityTransform.estimate) taking src[i] to dst[i]: a 2×3 matrix [sR | t], R a proper
// rotation. Computed in double. Errors: different or too few point counts, non-finite
// points, coincident source or destination points ("degenerate landmarks").
absl::StatusOr<cv::Matx23d> EstimateSimilarity(absl::Span<const Point> src,
                                               absl::Span<const Point> dst);

// The five landmark positions of a geometry, in its crop's pixels.
std::array<Point, 5> Template(const model::CropGeometry& geometry);

// The five ArcFace landmark positions in the 112×112 crop (model::kArcFaceCrop).
const std::array<Point, 5>& ArcFaceTemplate();

}  // namespace arcface::image

#endif  // ARCFACE_SERVER_IMAGE_IMAGE_H_
