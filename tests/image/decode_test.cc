#include <chrono>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

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
using ::arcface::image::testing::MakeRle8BmpEndingEarly;
using ::arcface::image::testing::MakeTiledTiff;
using ::arcface::image::testing::MakeTiledTiffHeaderOnly;
using ::arcface::image::testing::MakeTopDownBmp;
using ::arcface::image::testing::MaxAbsDiff;
using ::arcface::image::testing::RandomImage;
using ::arcface::image::testing::ReadFile;
using ::arcface::image::testing::ReadRgbReference;
using ::arcface::image::testing::WithDeclaredJpegSize;
using ::arcface::image::testing::WithExifOrientation;
using ::arcface::image::testing::WrapInVp8x;

cv::Mat BgrToRgb(const cv::Mat& bgr) {
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return rgb;
}

class PhotoDecodeTest : public ::testing::TestWithParam<const char*> {};

TEST_P(PhotoDecodeTest, DecodesToTheSameRgbAsImread) {
  const std::string path = DataPath(GetParam());
  absl::StatusOr<cv::Mat> rgb = DecodeImage(ReadFile(path), Limits());
  ASSERT_THAT(rgb, IsOk());
  EXPECT_EQ(rgb->type(), CV_8UC3);
  EXPECT_EQ(MaxAbsDiff(*rgb, ReadRgbReference(path)), 0);
}

INSTANTIATE_TEST_SUITE_P(TestPhotos, PhotoDecodeTest,
                         ::testing::Values("multi_face.jpg", "single_face.jpg", "0-f1-su-ph.jpg",
                                           "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg",
                                           "45-m7-di-ph.jpg", "BWPictureHuman.jpg",
                                           "Image_with_alpha.png", "free-mountain-vector-01.jpg"));

TEST(DecodeImageTest, ChannelOrderIsRgb) {
  // A pure-red PNG written by OpenCV from BGR (0, 0, 255).
  const cv::Mat red(4, 6, CV_8UC3, cv::Scalar(0, 0, 255));
  absl::StatusOr<cv::Mat> rgb = DecodeImage(Encode(red, ".png"), Limits());
  ASSERT_THAT(rgb, IsOk());
  EXPECT_EQ(rgb->at<cv::Vec3b>(2, 3), cv::Vec3b(255, 0, 0));
}

TEST(DecodeImageTest, RgbaPhotoKeepsTheColourChannels) {
  const std::string path = DataPath("Image_with_alpha.png");
  const cv::Mat bgra = cv::imread(path, cv::IMREAD_UNCHANGED);
  ASSERT_EQ(bgra.type(), CV_8UC4);
  absl::StatusOr<cv::Mat> rgb = DecodeImage(ReadFile(path), Limits());
  ASSERT_THAT(rgb, IsOk());
  ASSERT_EQ(rgb->type(), CV_8UC3);
  cv::Mat expected;
  cv::cvtColor(bgra, expected, cv::COLOR_BGRA2RGB);
  EXPECT_EQ(MaxAbsDiff(*rgb, expected), 0);
}

TEST(DecodeImageTest, AlphaIsDroppedNotBlended) {
  // The RGBA test photo is fully opaque, so translucency needs a made-up image: colour
  // must come through unchanged whatever the alpha, with no premultiplication or background.
  cv::Mat bgra(6, 8, CV_8UC4);
  for (int y = 0; y < bgra.rows; ++y) {
    for (int x = 0; x < bgra.cols; ++x) {
      bgra.at<cv::Vec4b>(y, x) = cv::Vec4b(20 * x, 30 * y, 200, 40 * y + x);  // alpha 0..205
    }
  }
  absl::StatusOr<cv::Mat> rgb = DecodeImage(Encode(bgra, ".png"), Limits());
  ASSERT_THAT(rgb, IsOk());
  ASSERT_EQ(rgb->type(), CV_8UC3);
  EXPECT_EQ(rgb->at<cv::Vec3b>(0, 0), cv::Vec3b(200, 0, 0));      // alpha 0
  EXPECT_EQ(rgb->at<cv::Vec3b>(5, 7), cv::Vec3b(200, 150, 140));  // alpha 207
  cv::Mat expected;
  cv::cvtColor(bgra, expected, cv::COLOR_BGRA2RGB);
  EXPECT_EQ(MaxAbsDiff(*rgb, expected), 0);
}

TEST(DecodeImageTest, GrayscaleJpegIsReplicated) {
  const std::string path = DataPath("BWPictureHuman.jpg");
  const cv::Mat gray = cv::imread(path, cv::IMREAD_UNCHANGED);
  ASSERT_EQ(gray.type(), CV_8UC1);
  absl::StatusOr<cv::Mat> rgb = DecodeImage(ReadFile(path), Limits());
  ASSERT_THAT(rgb, IsOk());
  ASSERT_EQ(rgb->type(), CV_8UC3);
  std::vector<cv::Mat> channels;
  cv::split(*rgb, channels);
  for (const cv::Mat& channel : channels) EXPECT_EQ(MaxAbsDiff(channel, gray), 0);
}

TEST(DecodeImageTest, LosslessFormatsRoundTripExactly) {
  const cv::Mat bgr = cv::imread(DataPath("multi_face.jpg"), cv::IMREAD_COLOR);
  ASSERT_FALSE(bgr.empty());
  const cv::Mat expected = BgrToRgb(bgr);
  const std::vector<std::pair<std::string, std::string>> files = {
      {"png", Encode(bgr, ".png")},
      {"bmp", Encode(bgr, ".bmp")},
      {"webp", Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101})},
      {"tiff", Encode(bgr, ".tiff")},
      {"tiff", MakeBigEndianTiff(bgr)},
      {"bmp", MakeTopDownBmp(bgr)},
      {"bmp", MakeCoreBmp(bgr)},
      {"webp",
       WrapInVp8x(Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101}), bgr.cols, bgr.rows)},
  };
  for (const auto& [format, bytes] : files) {
    SCOPED_TRACE(format + " of " + std::to_string(bytes.size()) + " bytes");
    absl::StatusOr<ImageInfo> info = ProbeImage(bytes);
    ASSERT_THAT(info, IsOk());
    EXPECT_EQ(info->format, format);
    EXPECT_EQ(info->width, 1000);
    EXPECT_EQ(info->height, 667);
    absl::StatusOr<cv::Mat> rgb = DecodeImage(bytes, Limits());
    ASSERT_THAT(rgb, IsOk());
    EXPECT_EQ(MaxAbsDiff(*rgb, expected), 0);
  }
}

TEST(DecodeImageTest, LossyWebpDecodesCloseToTheSource) {
  const cv::Mat bgr = cv::imread(DataPath("0-f1-su-ph.jpg"), cv::IMREAD_COLOR);
  absl::StatusOr<cv::Mat> rgb =
      DecodeImage(Encode(bgr, ".webp", {cv::IMWRITE_WEBP_QUALITY, 95}), Limits());
  ASSERT_THAT(rgb, IsOk());
  ASSERT_EQ(rgb->size(), bgr.size());
  cv::Mat diff;
  cv::absdiff(*rgb, BgrToRgb(bgr), diff);
  EXPECT_LT(cv::mean(diff)[0], 4.0);  // a swapped channel order would be far larger
}

TEST(DecodeImageTest, SixteenBitPngIsReducedToEightBits) {
  cv::Mat wide(5, 7, CV_16UC3);
  for (int y = 0; y < wide.rows; ++y) {
    for (int x = 0; x < wide.cols; ++x) {
      // k·257 has k in both bytes, so stripping and scaling both give k.
      wide.at<cv::Vec3w>(y, x) = cv::Vec3w(257 * (x * 30), 257 * (y * 50), 257 * 200);
    }
  }
  absl::StatusOr<cv::Mat> rgb = DecodeImage(Encode(wide, ".png"), Limits());
  ASSERT_THAT(rgb, IsOk());
  ASSERT_EQ(rgb->type(), CV_8UC3);
  EXPECT_EQ(rgb->at<cv::Vec3b>(3, 4), cv::Vec3b(200, 150, 120));
}

TEST(DecodeImageTest, ExifOrientationIsIgnored) {
  const cv::Mat bgr = RandomImage(40, 64, 7);
  const std::string plain = Encode(bgr, ".jpg", {cv::IMWRITE_JPEG_QUALITY, 95});
  const std::string rotated = WithExifOrientation(plain, 6);  // "rotate 90° clockwise"
  // OpenCV's default does honour the tag, so the test would notice the flag going missing.
  const cv::Mat honoured = cv::imdecode(
      cv::Mat(1, static_cast<int>(rotated.size()), CV_8UC1, const_cast<char*>(rotated.data())),
      cv::IMREAD_COLOR);
  ASSERT_EQ(honoured.size(), cv::Size(40, 64));

  absl::StatusOr<cv::Mat> a = DecodeImage(plain, Limits());
  absl::StatusOr<cv::Mat> b = DecodeImage(rotated, Limits());
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->size(), cv::Size(64, 40));
  EXPECT_EQ(MaxAbsDiff(*a, *b), 0);
}

TEST(DecodeImageTest, RefusesEmptyAndUnknownInput) {
  EXPECT_THAT(DecodeImage("", Limits()), IsInvalidArgumentWith("empty image"));
  std::mt19937 rng(11);
  std::string noise(10000, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  noise[0] = 'x';
  EXPECT_THAT(DecodeImage(noise, Limits()),
              IsInvalidArgumentWith("unsupported or undecodable image"));
  // Formats OpenCV could decode but whose size is not checked first are refused.
  EXPECT_THAT(DecodeImage(Encode(RandomImage(8, 8, 1), ".ppm"), Limits()),
              IsInvalidArgumentWith("unsupported or undecodable image"));
}

TEST(DecodeImageTest, RefusesTruncatedFiles) {
  const std::string jpeg = ReadFile(DataPath("single_face.jpg"));
  const std::string png = Encode(cv::imread(DataPath("0-f1-su-ph.jpg")), ".png");
  EXPECT_THAT(DecodeImage(jpeg.substr(0, 100), Limits()), IsInvalidArgumentWith("image"));
  EXPECT_THAT(DecodeImage(png.substr(0, 100), Limits()), IsInvalidArgumentWith("undecodable"));
  // A PNG cut after its first data chunk began.
  EXPECT_THAT(DecodeImage(png.substr(0, png.size() / 2), Limits()),
              IsInvalidArgumentWith("undecodable"));
}

TEST(DecodeImageTest, RefusesHugeDeclaredSizeFromTheHeaderAlone) {
  const std::string png = MakePngHeaderOnly(100000, 100000);
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<cv::Mat> rgb = DecodeImage(png, Limits());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_THAT(rgb, IsInvalidArgumentWith(
                       "image is 100000x100000 = 10000000000 pixels, over the limit of 40000000"));
  EXPECT_LT(seconds, 1.0);
}

TEST(DecodeImageTest, PixelCapIsInclusive) {
  const std::string jpeg = ReadFile(DataPath("0-f1-su-ph.jpg"));  // 512×512
  Limits limits;
  limits.max_pixels = 512 * 512;
  EXPECT_THAT(DecodeImage(jpeg, limits), IsOk());
  limits.max_pixels = 512 * 512 - 1;
  EXPECT_THAT(DecodeImage(jpeg, limits),
              IsInvalidArgumentWith("512x512 = 262144 pixels, over the limit of 262143"));
}

TEST(DecodeImageTest, RefusesEmptyDeclaredSize) {
  EXPECT_THAT(DecodeImage(MakePngHeaderOnly(0, 10), Limits()),
              IsInvalidArgumentWith("empty size 0x10"));
}

TEST(DecodeImageTest, RefusesOversizedEncodedInput) {
  const std::string jpeg = ReadFile(DataPath("single_face.jpg"));
  Limits limits;
  limits.max_encoded_bytes = jpeg.size();
  EXPECT_THAT(DecodeImage(jpeg, limits), IsOk());
  limits.max_encoded_bytes = jpeg.size() - 1;
  EXPECT_THAT(DecodeImage(jpeg, limits),
              IsInvalidArgumentWith(std::to_string(jpeg.size()) + " bytes, over the limit of " +
                                    std::to_string(jpeg.size() - 1)));
}

TEST(DecodeImageTest, ConcurrentCallsAgree) {
  const std::string jpeg = ReadFile(DataPath("multi_face.jpg"));
  absl::StatusOr<cv::Mat> expected = DecodeImage(jpeg, Limits());
  ASSERT_THAT(expected, IsOk());
  std::vector<std::thread> threads;
  std::vector<double> diffs(4, -2);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 5; ++i) {
        absl::StatusOr<cv::Mat> rgb = DecodeImage(jpeg, Limits());
        diffs[t] = rgb.ok() ? std::max(diffs[t], MaxAbsDiff(*rgb, *expected)) : 99;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (double diff : diffs) EXPECT_EQ(diff, 0);
}

// --- Density: declared pixels per encoded byte ---

double SecondsToDecode(const std::string& bytes, const Limits& limits,
                       absl::StatusOr<cv::Mat>* result) {
  const auto start = std::chrono::steady_clock::now();
  *result = DecodeImage(bytes, limits);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

TEST(DecodeDensityTest, TinyFilesDeclaringHugeImagesAreRefusedBeforeDecoding) {
  // Each declares about 40 MP, under the pixel cap, in a few hundred bytes. Without the
  // density check the JPEG decodes (padded with grey) in ~1.5 s, the tiled TIFF takes ~0.5 s
  // to fail and the RLE BMP ~0.3 s to decode; the lossless WebP is a valid flat image that
  // takes ~0.5 s at this size.
  const std::string small_jpeg = Encode(RandomImage(8, 8, 3), ".jpg");
  const cv::Mat flat(2000, 2000, CV_8UC3, cv::Scalar(90, 120, 200));
  const struct {
    std::string bytes;
    std::string message;
  } cases[] = {
      {WithDeclaredJpegSize(small_jpeg, 6300, 6300),
       "image declares 6300x6300 (39690000 pixels to decode) in " +
           std::to_string(small_jpeg.size()) + " bytes"},
      {MakePngHeaderOnly(6300, 6300), "over the limit of 1024 for png"},
      {Encode(flat, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101}), "over the limit of 1024 for webp"},
      {MakeTiledTiffHeaderOnly(6300, 6300, 6304, 6304),
       "(39740416 pixels to decode) in 148 bytes: 268517 pixels per byte, over the limit of 1024 "
       "for tiff"},
      {MakeRle8BmpEndingEarly(6300, 6300), "over the limit of 128 for bmp"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.message);
    absl::StatusOr<cv::Mat> rgb;
    const double seconds = SecondsToDecode(c.bytes, Limits(), &rgb);
    EXPECT_THAT(rgb, IsInvalidArgumentWith(c.message));
    EXPECT_THAT(rgb, IsInvalidArgumentWith("pixels per byte"));
    EXPECT_LT(seconds, 0.05);
  }
  absl::StatusOr<cv::Mat> rgb;
  SecondsToDecode(WithDeclaredJpegSize(small_jpeg, 6300, 6300), Limits(), &rgb);
  EXPECT_THAT(rgb, IsInvalidArgumentWith(
                       "over the limit of 512 for jpeg (an image this size takes at least 77520 "
                       "bytes; truncated or padded-out data?)"));
}

TEST(DecodeDensityTest, TiffTilesFarLargerThanTheImageAreRefused) {
  // libtiff decodes, and OpenCV allocates, each tile whole: this 148-byte file took 4 s.
  absl::StatusOr<cv::Mat> rgb;
  const double seconds =
      SecondsToDecode(MakeTiledTiffHeaderOnly(112, 112, 15984, 15984), Limits(), &rgb);
  EXPECT_THAT(rgb, IsInvalidArgumentWith(
                       "TIFF tiles of 15984x15984 make the decoder work on a 15984x15984 area "
                       "for a 112x112 image, over the limit of 40000000 pixels"));
  EXPECT_LT(seconds, 0.05);
}

TEST(DecodeDensityTest, TiledTiffsDecode) {
  const cv::Mat bgr = RandomImage(37, 53, 9);
  // Edge tiles padded, and one 256x256 tile over the whole image (as GDAL writes small images).
  for (const auto& [tile_width, tile_height] : {std::pair{32u, 32u}, std::pair{256u, 256u}}) {
    SCOPED_TRACE(std::to_string(tile_width) + "x" + std::to_string(tile_height));
    const std::string tiff = MakeTiledTiff(bgr, tile_width, tile_height);
    absl::StatusOr<ImageInfo> info = ProbeImage(tiff);
    ASSERT_THAT(info, IsOk());
    EXPECT_EQ(info->tile_width, tile_width);
    EXPECT_EQ(info->tile_height, tile_height);
    absl::StatusOr<cv::Mat> rgb = DecodeImage(tiff, Limits());
    ASSERT_THAT(rgb, IsOk());
    EXPECT_EQ(MaxAbsDiff(*rgb, BgrToRgb(bgr)), 0);
  }
}

TEST(DecodeDensityTest, DensePhotosAndFlatImagesDecode) {
  // The densest encodings of real photos measured (docs/RELIABILITY.md): the 5 MP photo
  // blurred and saved at quality 1 (progressive, optimised JPEG: 161 pixels per byte; WebP:
  // 291), and flat one-colour images in every format at sizes tests and clients send.
  const cv::Mat photo = cv::imread(DataPath("BWPictureHuman.jpg"), cv::IMREAD_COLOR);
  ASSERT_FALSE(photo.empty());
  cv::Mat blurred;
  cv::GaussianBlur(photo, blurred, cv::Size(), 15);
  std::vector<std::pair<std::string, std::string>> files = {
      {"blurred JPEG q1", Encode(blurred, ".jpg",
                                 {cv::IMWRITE_JPEG_QUALITY, 1, cv::IMWRITE_JPEG_PROGRESSIVE, 1,
                                  cv::IMWRITE_JPEG_OPTIMIZE, 1})},
      {"blurred WebP q1", Encode(blurred, ".webp", {cv::IMWRITE_WEBP_QUALITY, 1})},
  };
  for (const cv::Size size : {cv::Size(112, 112), cv::Size(1000, 1000), cv::Size(1920, 1080)}) {
    const cv::Mat flat(size, CV_8UC3, cv::Scalar(128, 128, 128));
    const std::string name = "flat " + std::to_string(size.width) + "x" +
                             std::to_string(size.height) + " ";
    files.emplace_back(name + "JPEG", Encode(flat, ".jpg"));
    files.emplace_back(name + "progressive JPEG",
                       Encode(flat, ".jpg",
                              {cv::IMWRITE_JPEG_PROGRESSIVE, 1, cv::IMWRITE_JPEG_OPTIMIZE, 1}));
    files.emplace_back(name + "PNG", Encode(flat, ".png", {cv::IMWRITE_PNG_COMPRESSION, 9}));
    files.emplace_back(name + "lossy WebP", Encode(flat, ".webp", {cv::IMWRITE_WEBP_QUALITY, 1}));
    files.emplace_back(name + "deflate TIFF", Encode(flat, ".tiff", {cv::IMWRITE_TIFF_COMPRESSION, 8}));
    files.emplace_back(name + "BMP", Encode(flat, ".bmp"));
    // Lossless WebP codes a flat image in ~100 bytes whatever its size: accepted up to
    // dense_pixels_allowed only.
    if (size.area() <= Limits().dense_pixels_allowed) {
      files.emplace_back(name + "lossless WebP",
                         Encode(flat, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101}));
    }
  }
  for (const auto& [name, bytes] : files) {
    SCOPED_TRACE(name + ", " + std::to_string(bytes.size()) + " bytes");
    EXPECT_THAT(DecodeImage(bytes, Limits()), IsOk());
  }
}

TEST(DecodeDensityTest, LimitAndAllowanceAreInclusive) {
  const cv::Mat flat(1080, 1920, CV_8UC3, cv::Scalar(10, 20, 30));
  const std::string png = Encode(flat, ".png");
  const int64_t pixels = 1920 * 1080;
  const int64_t per_byte = (pixels + png.size() - 1) / png.size();
  Limits limits;
  limits.max_pixels_per_byte.png = per_byte;
  EXPECT_THAT(DecodeImage(png, limits), IsOk());
  limits.max_pixels_per_byte.png = per_byte - 1;
  EXPECT_THAT(DecodeImage(png, limits),
              IsInvalidArgumentWith(std::to_string(per_byte) + " pixels per byte, over the limit of " +
                                    std::to_string(per_byte - 1) + " for png"));
  limits.dense_pixels_allowed = pixels;
  EXPECT_THAT(DecodeImage(png, limits), IsOk());
  limits.dense_pixels_allowed = pixels - 1;
  limits.max_pixels_per_byte.png = 0;  // off
  EXPECT_THAT(DecodeImage(png, limits), IsOk());
}

// --- Raw pixels ---

TEST(RawToRgbTest, ConvertsEachLayoutExactly) {
  // 3 wide, 2 high: every byte distinct, so any misplacement shows.
  std::string rgb_bytes, bgr_bytes, gray_bytes;
  for (int i = 0; i < 6; ++i) {
    const char r = static_cast<char>(10 * i + 1), g = static_cast<char>(10 * i + 2),
               b = static_cast<char>(10 * i + 3);
    rgb_bytes += {r, g, b};
    bgr_bytes += {b, g, r};
    gray_bytes += static_cast<char>(100 + i);
  }
  for (auto [format, bytes] :
       {std::pair{PixelFormat::kRgb8, rgb_bytes}, std::pair{PixelFormat::kBgr8, bgr_bytes}}) {
    absl::StatusOr<cv::Mat> rgb = RawToRgb(bytes, 3, 2, format, Limits());
    ASSERT_THAT(rgb, IsOk());
    ASSERT_EQ(rgb->type(), CV_8UC3);
    ASSERT_EQ(rgb->size(), cv::Size(3, 2));
    for (int i = 0; i < 6; ++i) {
      EXPECT_EQ(rgb->at<cv::Vec3b>(i / 3, i % 3), cv::Vec3b(10 * i + 1, 10 * i + 2, 10 * i + 3));
    }
  }
  absl::StatusOr<cv::Mat> gray = RawToRgb(gray_bytes, 3, 2, PixelFormat::kGray8, Limits());
  ASSERT_THAT(gray, IsOk());
  ASSERT_EQ(gray->type(), CV_8UC3);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(gray->at<cv::Vec3b>(i / 3, i % 3), cv::Vec3b(100 + i, 100 + i, 100 + i));
  }
}

TEST(RawToRgbTest, ResultDoesNotAliasTheInput) {
  std::string bytes(4 * 3 * 3, '\x40');
  absl::StatusOr<cv::Mat> rgb = RawToRgb(bytes, 4, 3, PixelFormat::kRgb8, Limits());
  ASSERT_THAT(rgb, IsOk());
  std::fill(bytes.begin(), bytes.end(), '\x00');
  EXPECT_EQ(rgb->at<cv::Vec3b>(1, 1), cv::Vec3b(0x40, 0x40, 0x40));
}

TEST(RawToRgbTest, RefusesBadSizes) {
  EXPECT_THAT(RawToRgb(std::string(17, '\0'), 3, 2, PixelFormat::kRgb8, Limits()),
              IsInvalidArgumentWith("raw image data is 17 bytes, expected 3x2x3 = 18"));
  EXPECT_THAT(RawToRgb(std::string(18, '\0'), 3, 2, PixelFormat::kGray8, Limits()),
              IsInvalidArgumentWith("expected 3x2x1 = 6"));
  EXPECT_THAT(RawToRgb("", 0, 0, PixelFormat::kRgb8, Limits()),
              IsInvalidArgumentWith("empty size"));
  EXPECT_THAT(RawToRgb("", 0, 5, PixelFormat::kRgb8, Limits()), IsInvalidArgumentWith("0x5"));
  EXPECT_THAT(RawToRgb("", -3, 5, PixelFormat::kRgb8, Limits()),
              IsInvalidArgumentWith("empty size"));
  Limits limits;
  limits.max_pixels = 5;
  EXPECT_THAT(RawToRgb(std::string(6, '\0'), 3, 2, PixelFormat::kGray8, limits),
              IsInvalidArgumentWith("3x2 = 6 pixels, over the limit of 5"));
  EXPECT_THAT(RawToRgb(std::string(6, '\0'), 3, 2, static_cast<PixelFormat>(7), Limits()),
              IsInvalidArgumentWith("unknown raw pixel format 7"));
}

TEST(RawToRgbTest, HugeDimensionsAreRefusedBeforeMultiplying) {
  // 65536 × 65536 × 3 overflows 32 bits; the cap must see the true size.
  EXPECT_THAT(RawToRgb("", 65536, 65536, PixelFormat::kRgb8, Limits()),
              IsInvalidArgumentWith("65536x65536 = 4294967296 pixels"));
}

}  // namespace
}  // namespace arcface::image
