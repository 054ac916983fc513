// Header parsers for the formats DecodeImage accepts. They exist so the pixel cap can be
// enforced before a decoder allocates anything, which means they must read the same size the
// decoder will use, and must survive any bytes a client can send.

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <cstdlib>
#include <limits>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/image/image.h"

namespace arcface::image {
namespace {

// Every access goes through Has() first; the readers themselves do not check.
class Bytes {
 public:
  explicit Bytes(std::string_view data) : data_(data) {}

  size_t size() const { return data_.size(); }
  bool Has(size_t offset, size_t count) const {
    return offset <= data_.size() && count <= data_.size() - offset;
  }
  bool Matches(size_t offset, std::string_view expected) const {
    return Has(offset, expected.size()) && data_.substr(offset, expected.size()) == expected;
  }
  uint32_t U8(size_t offset) const { return static_cast<uint8_t>(data_[offset]); }
  uint32_t Be16(size_t offset) const { return U8(offset) << 8 | U8(offset + 1); }
  uint32_t Le16(size_t offset) const { return U8(offset) | U8(offset + 1) << 8; }
  uint32_t Le24(size_t offset) const { return Le16(offset) | U8(offset + 2) << 16; }
  uint32_t Be32(size_t offset) const { return Be16(offset) << 16 | Be16(offset + 2); }
  uint32_t Le32(size_t offset) const { return Le16(offset) | Le16(offset + 2) << 16; }

 private:
  std::string_view data_;
};

absl::Status Malformed(absl::string_view format, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported or undecodable image: malformed ", format, " header (", why, ")"));
}

absl::StatusOr<ImageInfo> Info(absl::string_view format, int64_t width, int64_t height) {
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  if (width < 0 || height < 0 || width > kMaxInt || height > kMaxInt) {
    return Malformed(format, absl::StrCat("size ", width, "x", height, " out of range"));
  }
  return ImageInfo{std::string(format), static_cast<int>(width), static_cast<int>(height)};
}

constexpr std::string_view kPngSignature("\x89PNG\r\n\x1a\n", 8);

absl::StatusOr<ImageInfo> ProbePng(const Bytes& b) {
  // The signature is followed by the IHDR chunk: length, type, width, height (big-endian).
  if (!b.Has(8, 16)) return Malformed("PNG", "truncated before the IHDR size");
  if (!b.Matches(12, "IHDR")) return Malformed("PNG", "first chunk is not IHDR");
  return Info("png", b.Be32(16), b.Be32(20));
}

bool IsJpegFrameHeader(uint32_t marker) {
  // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC), which share the range.
  return marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
}

absl::StatusOr<ImageInfo> ProbeJpeg(const Bytes& b) {
  // Walks the marker segments after SOI up to the frame header, the way libjpeg's
  // next_marker() does: bytes between segments that are not a marker are skipped, fill bytes
  // (repeated FF) and stuffed FF00 pairs are ignored. Every step advances, so this ends.
  size_t pos = 2;
  for (;;) {
    while (pos < b.size() && b.U8(pos) != 0xFF) ++pos;
    while (pos < b.size() && b.U8(pos) == 0xFF) ++pos;
    if (pos >= b.size()) return Malformed("JPEG", "no frame header before the end of the data");
    const uint32_t marker = b.U8(pos++);
    if (marker == 0x00 || marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) continue;
    if (marker == 0xD8) return Malformed("JPEG", "repeated start-of-image marker");
    if (marker == 0xD9) return Malformed("JPEG", "end of image before the frame header");
    if (marker == 0xDA) return Malformed("JPEG", "scan before the frame header");
    if (!b.Has(pos, 2)) return Malformed("JPEG", "truncated segment length");
    const uint32_t length = b.Be16(pos);  // counts its own two bytes
    if (length < 2) return Malformed("JPEG", "segment length below 2");
    if (IsJpegFrameHeader(marker)) {
      // length(2) precision(1) height(2) width(2)
      if (length < 7 || !b.Has(pos, 7)) return Malformed("JPEG", "truncated frame header");
      return Info("jpeg", b.Be16(pos + 5), b.Be16(pos + 3));
    }
    pos += length;
  }
}

absl::StatusOr<ImageInfo> ProbeBmp(const Bytes& b) {
  // BITMAPFILEHEADER is 14 bytes; the DIB header that follows starts with its own size, which
  // tells the old 16-bit core layout from the 32-bit one (OpenCV's decoder draws the same line).
  if (!b.Has(14, 4)) return Malformed("BMP", "truncated before the DIB header");
  const uint32_t dib_size = b.Le32(14);
  if (dib_size == 12) {
    if (!b.Has(18, 4)) return Malformed("BMP", "truncated core header");
    return Info("bmp", b.Le16(18), b.Le16(20));
  }
  if (dib_size < 36 || dib_size > 0x7fffffff) {
    return Malformed("BMP", absl::StrCat("unknown DIB header size ", dib_size));
  }
  if (!b.Has(18, 8)) return Malformed("BMP", "truncated info header");
  const int64_t width = static_cast<int32_t>(b.Le32(18));
  // A negative height marks a top-down bitmap; the size is its magnitude.
  const int64_t height = std::llabs(static_cast<int32_t>(b.Le32(22)));
  if (width < 0) return Malformed("BMP", absl::StrCat("negative width ", width));
  return Info("bmp", width, height);
}

absl::StatusOr<ImageInfo> ProbeWebp(const Bytes& b) {
  // RIFF header (12 bytes), then the first chunk: fourcc, size, payload at 20.
  if (!b.Has(12, 8)) return Malformed("WebP", "truncated before the first chunk");
  constexpr size_t kPayload = 20;
  if (b.Matches(12, "VP8 ")) {
    // Lossy bitstream: 3-byte frame tag, start code 9D 01 2A, 14-bit width and height (the top
    // two bits are upscaling hints that do not change the decoded size).
    if (!b.Has(kPayload, 10)) return Malformed("WebP", "truncated VP8 frame header");
    if (b.U8(kPayload + 3) != 0x9D || b.U8(kPayload + 4) != 0x01 || b.U8(kPayload + 5) != 0x2A) {
      return Malformed("WebP", "bad VP8 start code");
    }
    return Info("webp", b.Le16(kPayload + 6) & 0x3FFF, b.Le16(kPayload + 8) & 0x3FFF);
  }
  if (b.Matches(12, "VP8L")) {
    // Lossless bitstream: signature 0x2F, then width-1 and height-1 in 14 bits each.
    if (!b.Has(kPayload, 5)) return Malformed("WebP", "truncated VP8L header");
    if (b.U8(kPayload) != 0x2F) return Malformed("WebP", "bad VP8L signature");
    const uint32_t bits = b.Le32(kPayload + 1);
    return Info("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1);
  }
  if (b.Matches(12, "VP8X")) {
    // Extended format: flags (4 bytes), then canvas width-1 and height-1 in 24 bits each.
    if (!b.Has(kPayload, 10)) return Malformed("WebP", "truncated VP8X header");
    return Info("webp", int64_t{b.Le24(kPayload + 4)} + 1, int64_t{b.Le24(kPayload + 7)} + 1);
  }
  return Malformed("WebP", "first chunk is not VP8, VP8L or VP8X");
}

absl::StatusOr<ImageInfo> ProbeTiff(const Bytes& b) {
  // Size (and tile size) of the first image file directory, which is the page OpenCV decodes.
  const bool big_endian = b.U8(0) == 'M';
  auto u16 = [&](size_t offset) { return big_endian ? b.Be16(offset) : b.Le16(offset); };
  auto u32 = [&](size_t offset) { return big_endian ? b.Be32(offset) : b.Le32(offset); };
  if (!b.Has(4, 4)) return Malformed("TIFF", "truncated before the first IFD offset");
  const size_t ifd = u32(4);
  if (!b.Has(ifd, 2)) return Malformed("TIFF", "first IFD offset past the end of the data");
  const size_t entries = u16(ifd);
  // ImageWidth, ImageLength, TileWidth, TileLength; -1 while absent.
  constexpr uint32_t kTags[] = {256, 257, 322, 323};
  int64_t values[] = {-1, -1, -1, -1};
  for (size_t i = 0; i < entries; ++i) {
    const size_t entry = ifd + 2 + 12 * i;
    if (!b.Has(entry, 12)) return Malformed("TIFF", "truncated IFD");
    const uint32_t tag = u16(entry);
    const auto known = std::find(std::begin(kTags), std::end(kTags), tag);
    if (known == std::end(kTags)) continue;
    const uint32_t type = u16(entry + 2);
    int64_t value;
    if (type == 3) {  // SHORT: left-justified in the 4-byte value field
      value = u16(entry + 8);
    } else if (type == 4) {  // LONG
      value = u32(entry + 8);
    } else {
      return Malformed("TIFF", absl::StrCat("tag ", tag, " has type ", type));
    }
    values[known - std::begin(kTags)] = value;
  }
  const auto [width, height, tile_width, tile_height] = values;
  if (width < 0 || height < 0) return Malformed("TIFF", "no ImageWidth/ImageLength in first IFD");
  absl::StatusOr<ImageInfo> info = Info("tiff", width, height);
  // Without both tile tags libtiff reads strips (or refuses the file); a zero tile it refuses.
  if (info.ok() && tile_width > 0 && tile_height > 0) {
    info->tile_width = tile_width;
    info->tile_height = tile_height;
  }
  return info;
}

}  // namespace

absl::StatusOr<ImageInfo> ProbeImage(std::string_view encoded) {
  const Bytes b(encoded);
  if (b.Matches(0, kPngSignature)) return ProbePng(b);
  if (b.Matches(0, "\xFF\xD8\xFF")) return ProbeJpeg(b);
  if (b.Matches(0, "BM")) return ProbeBmp(b);
  if (b.Matches(0, "RIFF") && b.Matches(8, "WEBP")) return ProbeWebp(b);
  if (b.Matches(0, std::string_view("II*\0", 4)) || b.Matches(0, std::string_view("MM\0*", 4))) {
    return ProbeTiff(b);
  }
  return absl::InvalidArgumentError(
      "unsupported or undecodable image: unrecognized format (accepted: JPEG, PNG, BMP, WebP, "
      "TIFF)");
}

}  // namespace arcface::image
