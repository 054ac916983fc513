#include "tests/image/test_util.h"

#include <fstream>
#include <random>
#include <sstream>

#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

namespace arcface::image::testing {

std::string DataPath(const std::string& name) {
  return std::string(ARCFACE_TEST_DATA) + "/" + name;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot read " << path
                  << " (configure with -DARCFACE_TEST_DATA=<folder with the test photos>)";
    return {};
  }
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

cv::Mat ReadRgbReference(const std::string& path) {
  cv::Mat bgr = cv::imread(path, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  if (bgr.empty()) {
    ADD_FAILURE() << "cv::imread cannot read " << path;
    return bgr;
  }
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return rgb;
}

std::string Encode(const cv::Mat& bgr, const std::string& ext, const std::vector<int>& params) {
  std::vector<uint8_t> buffer;
  if (!cv::imencode(ext, bgr, buffer, params)) {
    ADD_FAILURE() << "cv::imencode(" << ext << ") failed";
    return {};
  }
  return std::string(buffer.begin(), buffer.end());
}

double MaxAbsDiff(const cv::Mat& a, const cv::Mat& b) {
  if (a.size() != b.size() || a.type() != b.type()) return -1;
  if (a.empty()) return 0;
  return cv::norm(a, b, cv::NORM_INF);
}

cv::Mat CropToMat(const Crop& crop) {
  if (crop.size() != kCropBytes) {
    ADD_FAILURE() << "crop has " << crop.size() << " bytes, expected " << kCropBytes;
    return {};
  }
  return cv::Mat(kCropSize, kCropSize, CV_8UC3, const_cast<uint8_t*>(crop.data())).clone();
}

cv::Mat RandomImage(int rows, int cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  cv::Mat image(rows, cols, CV_8UC3);
  for (int y = 0; y < rows; ++y) {
    uint8_t* row = image.ptr<uint8_t>(y);
    for (int x = 0; x < cols * 3; ++x) row[x] = static_cast<uint8_t>(rng());
  }
  return image;
}

void PutBe16(std::string& s, uint32_t v) {
  s.push_back(static_cast<char>(v >> 8));
  s.push_back(static_cast<char>(v));
}
void PutBe32(std::string& s, uint32_t v) {
  PutBe16(s, v >> 16);
  PutBe16(s, v);
}
void PutLe16(std::string& s, uint32_t v) {
  s.push_back(static_cast<char>(v));
  s.push_back(static_cast<char>(v >> 8));
}
void PutLe32(std::string& s, uint32_t v) {
  PutLe16(s, v);
  PutLe16(s, v >> 16);
}

uint32_t Crc32(const std::string& bytes) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char c : bytes) {
    crc ^= c;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void FixPngCrcs(std::string& png) {
  size_t pos = 8;
  while (pos + 12 <= png.size()) {
    const auto byte = [&](size_t i) { return static_cast<uint32_t>(static_cast<uint8_t>(png[i])); };
    const uint64_t length =
        byte(pos) << 24 | byte(pos + 1) << 16 | byte(pos + 2) << 8 | byte(pos + 3);
    if (length > png.size() - pos - 12) return;
    const uint32_t crc = Crc32(png.substr(pos + 4, 4 + length));
    for (int k = 0; k < 4; ++k) png[pos + 8 + length + k] = static_cast<char>(crc >> (24 - 8 * k));
    pos += 12 + length;
  }
}

namespace {

// Rows of 24-bit BGR padded to 4 bytes, in the given row order.
std::string BmpRows(const cv::Mat& bgr, bool bottom_up) {
  std::string rows;
  const int padding = (4 - (bgr.cols * 3) % 4) % 4;
  for (int i = 0; i < bgr.rows; ++i) {
    const int y = bottom_up ? bgr.rows - 1 - i : i;
    rows.append(reinterpret_cast<const char*>(bgr.ptr<uint8_t>(y)), bgr.cols * 3);
    rows.append(padding, '\0');
  }
  return rows;
}

}  // namespace

std::string MakePngHeaderOnly(uint32_t width, uint32_t height) {
  std::string png("\x89PNG\r\n\x1a\n", 8);
  std::string chunk = "IHDR";
  PutBe32(chunk, width);
  PutBe32(chunk, height);
  chunk += std::string("\x08\x02\x00\x00\x00", 5);  // 8-bit, truecolour, no interlace
  PutBe32(png, 13);
  png += chunk;
  PutBe32(png, Crc32(chunk));
  return png;
}

std::string MakeBigEndianTiff(const cv::Mat& bgr) {
  const uint32_t width = bgr.cols, height = bgr.rows;
  const uint32_t pixel_bytes = width * height * 3;
  constexpr uint32_t kEntries = 9;
  const uint32_t ifd = 8;
  const uint32_t bits_offset = ifd + 2 + kEntries * 12 + 4;
  const uint32_t pixels_offset = bits_offset + 6;
  std::string t = "MM";
  PutBe16(t, 42);
  PutBe32(t, ifd);
  PutBe16(t, kEntries);
  auto entry = [&](uint32_t tag, uint32_t type, uint32_t count, uint32_t value) {
    PutBe16(t, tag);
    PutBe16(t, type);
    PutBe32(t, count);
    if (type == 3 && count == 1) {
      PutBe16(t, value);  // SHORT values are left-justified
      PutBe16(t, 0);
    } else {
      PutBe32(t, value);
    }
  };
  entry(256, 3, 1, width);          // ImageWidth, SHORT
  entry(257, 4, 1, height);         // ImageLength, LONG
  entry(258, 3, 3, bits_offset);    // BitsPerSample 8,8,8
  entry(259, 3, 1, 1);              // no compression
  entry(262, 3, 1, 2);              // RGB
  entry(273, 4, 1, pixels_offset);  // StripOffsets
  entry(277, 3, 1, 3);              // SamplesPerPixel
  entry(278, 4, 1, height);         // RowsPerStrip
  entry(279, 4, 1, pixel_bytes);    // StripByteCounts
  PutBe32(t, 0);                    // no next IFD
  for (int i = 0; i < 3; ++i) PutBe16(t, 8);
  for (int y = 0; y < bgr.rows; ++y) {
    for (int x = 0; x < bgr.cols; ++x) {
      const cv::Vec3b p = bgr.at<cv::Vec3b>(y, x);
      t.push_back(static_cast<char>(p[2]));
      t.push_back(static_cast<char>(p[1]));
      t.push_back(static_cast<char>(p[0]));
    }
  }
  return t;
}

std::string MakeTopDownBmp(const cv::Mat& bgr) {
  const std::string rows = BmpRows(bgr, /*bottom_up=*/false);
  std::string b = "BM";
  PutLe32(b, 14 + 40 + rows.size());
  PutLe32(b, 0);
  PutLe32(b, 14 + 40);
  PutLe32(b, 40);
  PutLe32(b, bgr.cols);
  PutLe32(b, static_cast<uint32_t>(-bgr.rows));
  PutLe16(b, 1);   // planes
  PutLe16(b, 24);  // bits per pixel
  PutLe32(b, 0);   // BI_RGB
  PutLe32(b, rows.size());
  PutLe32(b, 2835);
  PutLe32(b, 2835);
  PutLe32(b, 0);
  PutLe32(b, 0);
  return b + rows;
}

std::string MakeCoreBmp(const cv::Mat& bgr) {
  const std::string rows = BmpRows(bgr, /*bottom_up=*/true);
  std::string b = "BM";
  PutLe32(b, 14 + 12 + rows.size());
  PutLe32(b, 0);
  PutLe32(b, 14 + 12);
  PutLe32(b, 12);
  PutLe16(b, bgr.cols);
  PutLe16(b, bgr.rows);
  PutLe16(b, 1);
  PutLe16(b, 24);
  return b + rows;
}

std::string WrapInVp8x(const std::string& webp, int width, int height) {
  std::string body = "WEBP";
  body += "VP8X";
  PutLe32(body, 10);
  PutLe32(body, 0);  // no ICC, alpha, EXIF, XMP or animation
  const uint32_t w = width - 1, h = height - 1;
  body.push_back(static_cast<char>(w));
  body.push_back(static_cast<char>(w >> 8));
  body.push_back(static_cast<char>(w >> 16));
  body.push_back(static_cast<char>(h));
  body.push_back(static_cast<char>(h >> 8));
  body.push_back(static_cast<char>(h >> 16));
  body += webp.substr(12);
  std::string riff = "RIFF";
  PutLe32(riff, body.size());
  return riff + body;
}

std::string WithExifOrientation(const std::string& jpeg, int orientation) {
  std::string tiff = "II";
  PutLe16(tiff, 42);
  PutLe32(tiff, 8);
  PutLe16(tiff, 1);
  PutLe16(tiff, 0x0112);
  PutLe16(tiff, 3);
  PutLe32(tiff, 1);
  PutLe16(tiff, orientation);
  PutLe16(tiff, 0);
  PutLe32(tiff, 0);
  const std::string payload = std::string("Exif\0\0", 6) + tiff;
  std::string app1 = "\xFF\xE1";
  PutBe16(app1, payload.size() + 2);
  return jpeg.substr(0, 2) + app1 + payload + jpeg.substr(2);
}

std::string WithDecoyFrameHeader(const std::string& jpeg) {
  std::string payload = "decoy";
  payload += "\xFF\xC0";
  PutBe16(payload, 17);
  payload.push_back(8);
  PutBe16(payload, 3000);  // height
  PutBe16(payload, 4000);  // width
  payload += std::string(12, '\x01');
  std::string app15 = "\xFF\xEF";
  PutBe16(app15, payload.size() + 2);
  return jpeg.substr(0, 2) + app15 + payload + jpeg.substr(2);
}

namespace {

// Little-endian 8-bit RGB TIFF in tiles; `tiles` holds each tile's uncompressed bytes, or is
// empty for a file whose tile offsets point past its end.
std::string TiledTiff(uint32_t width, uint32_t height, uint32_t tile_width, uint32_t tile_height,
                      const std::vector<std::string>& tiles) {
  const uint32_t count = ((width + tile_width - 1) / tile_width) *
                         ((height + tile_height - 1) / tile_height);
  constexpr uint32_t kEntries = 10;
  const uint32_t bits_offset = 8 + 2 + kEntries * 12 + 4;
  const uint32_t offsets_offset = bits_offset + 6;
  const uint32_t counts_offset = offsets_offset + 4 * count;
  const uint32_t data_offset = counts_offset + 4 * count;
  const uint32_t tile_bytes = tile_width * tile_height * 3;
  std::string t = "II";
  PutLe16(t, 42);
  PutLe32(t, 8);
  PutLe16(t, kEntries);
  auto entry = [&](uint32_t tag, uint32_t type, uint32_t n, uint32_t value) {
    PutLe16(t, tag);
    PutLe16(t, type);
    PutLe32(t, n);
    PutLe32(t, value);  // a single SHORT sits in the low half, as little-endian puts it
  };
  entry(256, 4, 1, width);
  entry(257, 4, 1, height);
  entry(258, 3, 3, bits_offset);  // BitsPerSample 8,8,8
  entry(259, 3, 1, 1);            // no compression
  entry(262, 3, 1, 2);            // RGB
  entry(277, 3, 1, 3);            // SamplesPerPixel
  entry(322, 4, 1, tile_width);
  entry(323, 4, 1, tile_height);
  entry(324, 4, count, count == 1 ? data_offset : offsets_offset);  // TileOffsets
  entry(325, 4, count, count == 1 ? tile_bytes : counts_offset);    // TileByteCounts
  PutLe32(t, 0);
  for (int i = 0; i < 3; ++i) PutLe16(t, 8);
  for (uint32_t i = 0; i < count; ++i) PutLe32(t, data_offset + i * tile_bytes);
  for (uint32_t i = 0; i < count; ++i) PutLe32(t, tile_bytes);
  for (const std::string& tile : tiles) t += tile;
  return t;
}

}  // namespace

std::string MakeTiledTiff(const cv::Mat& bgr, uint32_t tile_width, uint32_t tile_height) {
  std::vector<std::string> tiles;
  for (uint32_t ty = 0; ty < static_cast<uint32_t>(bgr.rows); ty += tile_height) {
    for (uint32_t tx = 0; tx < static_cast<uint32_t>(bgr.cols); tx += tile_width) {
      std::string tile(size_t{tile_width} * tile_height * 3, '\0');
      for (uint32_t y = 0; y < tile_height && ty + y < static_cast<uint32_t>(bgr.rows); ++y) {
        for (uint32_t x = 0; x < tile_width && tx + x < static_cast<uint32_t>(bgr.cols); ++x) {
          const cv::Vec3b p = bgr.at<cv::Vec3b>(ty + y, tx + x);
          char* out = &tile[(size_t{y} * tile_width + x) * 3];
          out[0] = static_cast<char>(p[2]);
          out[1] = static_cast<char>(p[1]);
          out[2] = static_cast<char>(p[0]);
        }
      }
      tiles.push_back(std::move(tile));
    }
  }
  return TiledTiff(bgr.cols, bgr.rows, tile_width, tile_height, tiles);
}

std::string MakeTiledTiffHeaderOnly(uint32_t width, uint32_t height, uint32_t tile_width,
                                    uint32_t tile_height) {
  return TiledTiff(width, height, tile_width, tile_height, {});
}

std::string WithDeclaredJpegSize(const std::string& jpeg, uint32_t width, uint32_t height) {
  std::string out = jpeg;
  size_t pos = 2;
  while (pos + 9 <= out.size()) {
    const uint8_t marker = static_cast<uint8_t>(out[pos + 1]);
    if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      out[pos + 5] = static_cast<char>(height >> 8);
      out[pos + 6] = static_cast<char>(height);
      out[pos + 7] = static_cast<char>(width >> 8);
      out[pos + 8] = static_cast<char>(width);
      return out;
    }
    pos += 2 + (static_cast<uint8_t>(out[pos + 2]) << 8 | static_cast<uint8_t>(out[pos + 3]));
  }
  ADD_FAILURE() << "no frame header in the JPEG";
  return out;
}

std::string MakeRle8BmpEndingEarly(uint32_t width, uint32_t height) {
  std::string palette;
  for (int i = 0; i < 256; ++i) PutLe32(palette, i * 0x010101u);
  const std::string data("\0\1", 2);  // RLE8 escape: end of bitmap
  const uint32_t offset = 14 + 40 + palette.size();
  std::string b = "BM";
  PutLe32(b, offset + data.size());
  PutLe32(b, 0);
  PutLe32(b, offset);
  PutLe32(b, 40);
  PutLe32(b, width);
  PutLe32(b, height);
  PutLe16(b, 1);  // planes
  PutLe16(b, 8);  // bits per pixel
  PutLe32(b, 1);  // BI_RLE8
  PutLe32(b, data.size());
  PutLe32(b, 2835);
  PutLe32(b, 2835);
  PutLe32(b, 0);
  PutLe32(b, 0);
  return b + palette + data;
}

}  // namespace arcface::image::testing
