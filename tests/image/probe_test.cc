#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <string_view>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>

#include "server/image/image.h"
#include "tests/image/test_util.h"

namespace arcface::image {
namespace {

using ::arcface::image::testing::DataPath;
using ::arcface::image::testing::Encode;
using ::arcface::image::testing::IsInvalidArgumentWith;
using ::arcface::image::testing::IsOk;
using ::arcface::image::testing::MakeBigEndianTiff;
using ::arcface::image::testing::MakeCoreBmp;
using ::arcface::image::testing::MakePngHeaderOnly;
using ::arcface::image::testing::MakeTiledTiff;
using ::arcface::image::testing::MakeTiledTiffHeaderOnly;
using ::arcface::image::testing::MakeTopDownBmp;
using ::arcface::image::testing::PutBe16;
using ::arcface::image::testing::PutLe32;
using ::arcface::image::testing::RandomImage;
using ::arcface::image::testing::ReadFile;
using ::arcface::image::testing::WithDecoyFrameHeader;
using ::arcface::image::testing::WrapInVp8x;

void ExpectProbe(const std::string& bytes, const std::string& format, int width, int height) {
  absl::StatusOr<ImageInfo> info = ProbeImage(bytes);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->format, format);
  EXPECT_EQ(info->width, width);
  EXPECT_EQ(info->height, height);
}

class PhotoProbeTest : public ::testing::TestWithParam<const char*> {};

TEST_P(PhotoProbeTest, HeaderSizeIsTheStoredSize) {
  const std::string path = DataPath(GetParam());
  const cv::Mat stored = cv::imread(path, cv::IMREAD_UNCHANGED | cv::IMREAD_IGNORE_ORIENTATION);
  ASSERT_FALSE(stored.empty()) << path;
  const std::string format =
      std::string(GetParam()).find(".png") != std::string::npos ? "png" : "jpeg";
  ExpectProbe(ReadFile(path), format, stored.cols, stored.rows);
}

INSTANTIATE_TEST_SUITE_P(TestPhotos, PhotoProbeTest,
                         ::testing::Values("multi_face.jpg", "single_face.jpg", "0-f1-su-ph.jpg",
                                           "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg",
                                           "45-m7-di-ph.jpg", "BWPictureHuman.jpg",
                                           "Image_with_alpha.png", "free-mountain-vector-01.jpg"));

TEST(ProbeImageTest, KnownTestPhotoSizes) {
  ExpectProbe(ReadFile(DataPath("multi_face.jpg")), "jpeg", 1000, 667);
  ExpectProbe(ReadFile(DataPath("BWPictureHuman.jpg")), "jpeg", 2560, 1912);
  ExpectProbe(ReadFile(DataPath("Image_with_alpha.png")), "png", 1524, 1036);
}

TEST(ProbeImageTest, EveryFormatOpenCvWrites) {
  // A non-square odd size catches swapped or off-by-one width/height fields.
  const cv::Mat bgr = RandomImage(37, 53, 1);
  ExpectProbe(Encode(bgr, ".png"), "png", 53, 37);
  ExpectProbe(Encode(bgr, ".bmp"), "bmp", 53, 37);
  ExpectProbe(Encode(bgr, ".tiff"), "tiff", 53, 37);
  ExpectProbe(Encode(bgr, ".jpg"), "jpeg", 53, 37);
  ExpectProbe(Encode(bgr, ".jpg", {cv::IMWRITE_JPEG_PROGRESSIVE, 1}), "jpeg", 53, 37);
  const std::string lossless = Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101});
  ASSERT_EQ(lossless.substr(12, 4), "VP8L");
  ExpectProbe(lossless, "webp", 53, 37);
  const std::string lossy = Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 80});
  ASSERT_EQ(lossy.substr(12, 4), "VP8 ");
  ExpectProbe(lossy, "webp", 53, 37);
  ExpectProbe(WrapInVp8x(lossless, 53, 37), "webp", 53, 37);
}

TEST(ProbeImageTest, TiffTileSize) {
  // Strips (what OpenCV writes) have no tile size; tiles are read from any position in the IFD.
  absl::StatusOr<ImageInfo> strips = ProbeImage(Encode(RandomImage(37, 53, 3), ".tiff"));
  ASSERT_THAT(strips, IsOk());
  EXPECT_EQ(strips->tile_width, 0);
  EXPECT_EQ(strips->tile_height, 0);
  absl::StatusOr<ImageInfo> tiled = ProbeImage(MakeTiledTiffHeaderOnly(112, 112, 15984, 48));
  ASSERT_THAT(tiled, IsOk());
  EXPECT_EQ(tiled->width, 112);
  EXPECT_EQ(tiled->height, 112);
  EXPECT_EQ(tiled->tile_width, 15984);
  EXPECT_EQ(tiled->tile_height, 48);
}

TEST(ProbeImageTest, HeaderVariantsOpenCvDoesNotWrite) {
  const cv::Mat bgr = RandomImage(37, 53, 2);
  ExpectProbe(MakeBigEndianTiff(bgr), "tiff", 53, 37);
  ExpectProbe(MakeTopDownBmp(bgr), "bmp", 53, 37);  // negative height
  ExpectProbe(MakeCoreBmp(bgr), "bmp", 53, 37);
  ExpectProbe(MakePngHeaderOnly(100000, 70000), "png", 100000, 70000);
}

TEST(ProbeImageTest, JpegSegmentsBeforeTheFrameHeaderAreSkippedByLength) {
  const std::string jpeg = Encode(RandomImage(37, 53, 3), ".jpg");
  ExpectProbe(WithDecoyFrameHeader(jpeg), "jpeg", 53, 37);
  // Fill bytes before a marker are allowed.
  ExpectProbe(jpeg.substr(0, 2) + "\xFF\xFF\xFF" + jpeg.substr(2), "jpeg", 53, 37);
}

TEST(ProbeImageTest, MalformedJpegHeaders) {
  const std::string soi = "\xFF\xD8";
  EXPECT_THAT(ProbeImage(soi + "\xFF\xD9"), IsInvalidArgumentWith("end of image"));
  EXPECT_THAT(ProbeImage(soi + std::string("\xFF\xDA\x00\x08", 4)),
              IsInvalidArgumentWith("scan before"));
  EXPECT_THAT(ProbeImage(soi + std::string("\xFF\xE0\x00", 3)),
              IsInvalidArgumentWith("truncated segment length"));
  EXPECT_THAT(ProbeImage(soi + std::string("\xFF\xE0\x00\x01", 4)),
              IsInvalidArgumentWith("length below 2"));
  // A segment that claims to run past the end of the data.
  EXPECT_THAT(ProbeImage(soi + "\xFF\xE0\x7F\xFFJFIF"), IsInvalidArgumentWith("no frame header"));
  EXPECT_THAT(ProbeImage(soi + std::string("\xFF\xC0\x00\x11\x08\x00", 6)),
              IsInvalidArgumentWith("truncated frame header"));
}

TEST(ProbeImageTest, MalformedOtherHeaders) {
  EXPECT_THAT(ProbeImage(std::string("\x89PNG\r\n\x1a\n\0\0\0\x0dIHDX\0\0\0\1\0\0\0\1", 24)),
              IsInvalidArgumentWith("not IHDR"));
  EXPECT_THAT(ProbeImage(MakePngHeaderOnly(0x80000000u, 1)), IsInvalidArgumentWith("out of range"));

  std::string bmp = "BM" + std::string(12, '\0');
  PutLe32(bmp, 20);  // no such DIB header
  bmp += std::string(40, '\0');
  EXPECT_THAT(ProbeImage(bmp), IsInvalidArgumentWith("DIB header size 20"));

  std::string webp = "RIFF";
  PutLe32(webp, 30);
  webp += "WEBPVP8Z" + std::string(30, '\0');
  EXPECT_THAT(ProbeImage(webp), IsInvalidArgumentWith("first chunk"));

  std::string tiff("II*\0", 4);
  PutLe32(tiff, 1u << 30);  // first IFD far past the end
  EXPECT_THAT(ProbeImage(tiff), IsInvalidArgumentWith("past the end"));
  std::string many_entries("II*\0", 4);
  PutLe32(many_entries, 8);
  many_entries += "\xFF\xFF";  // 65535 entries, none present
  EXPECT_THAT(ProbeImage(many_entries), IsInvalidArgumentWith("truncated IFD"));
  tiff = std::string("MM\0*", 4);
  PutBe16(tiff, 0);
  PutBe16(tiff, 8);
  PutBe16(tiff, 1);
  PutBe16(tiff, 256);
  PutBe16(tiff, 2);  // ASCII
  tiff += std::string(8, '\0');
  EXPECT_THAT(ProbeImage(tiff), IsInvalidArgumentWith("type 2"));
}

TEST(ProbeImageTest, UnrecognizedInputs) {
  EXPECT_THAT(ProbeImage(""), IsInvalidArgumentWith("unrecognized format"));
  EXPECT_THAT(ProbeImage("hello world, not an image"), IsInvalidArgumentWith("unrecognized"));
  EXPECT_THAT(ProbeImage("P6\n2 2\n255\n" + std::string(12, '\x7f')),  // PPM: not accepted
              IsInvalidArgumentWith("unrecognized"));
  std::mt19937 rng(4);
  std::string noise(4096, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  noise[0] = 'x';  // keep it from starting with a signature by chance
  EXPECT_THAT(ProbeImage(noise), IsInvalidArgumentWith("unsupported or undecodable image"));
}

// Every prefix of a valid file either parses to the full file's size or is refused; none reads
// past its end (the ASan lane of tests/run.sh, build-asan, checks that part).
TEST(ProbeImageTest, EveryPrefixIsHandled) {
  const cv::Mat bgr = RandomImage(37, 53, 5);
  const std::string files[] = {
      Encode(bgr, ".png"),
      Encode(bgr, ".bmp"),
      Encode(bgr, ".tiff"),
      WithDecoyFrameHeader(Encode(bgr, ".jpg")),
      Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101}),
      Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 80}),
      WrapInVp8x(Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101}), 53, 37),
      MakeBigEndianTiff(bgr),
      MakeTiledTiff(bgr, 32, 32),
      MakeTopDownBmp(bgr),
      MakeCoreBmp(bgr),
  };
  for (const std::string& file : files) {
    bool parsed_before = false;
    for (size_t n = 0; n <= file.size(); ++n) {
      // An exactly sized heap copy, so that reading one byte past the prefix is an ASan error
      // (a std::string would keep its terminator, or the prefix inside itself, past the end).
      const std::unique_ptr<char[]> prefix(new char[n]);
      std::copy_n(file.data(), n, prefix.get());
      absl::StatusOr<ImageInfo> info = ProbeImage(std::string_view(prefix.get(), n));
      if (info.ok()) {
        EXPECT_EQ(info->width, 53) << "prefix " << n;
        EXPECT_EQ(info->height, 37) << "prefix " << n;
        parsed_before = true;
      } else {
        // Once the header is complete, longer prefixes must parse too.
        EXPECT_FALSE(parsed_before) << "prefix " << n << ": " << info.status();
        EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
      }
    }
    EXPECT_TRUE(parsed_before) << file.substr(0, 4);
  }
}

}  // namespace
}  // namespace arcface::image
