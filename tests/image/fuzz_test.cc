// Mutated files must be refused with INVALID_ARGUMENT or decoded to an image of the probed size,
// never crash, hang or exceed the caps. Deterministic seeds keep failures reproducible; the ASan
// lane of tests/run.sh (build-asan) turns silent out-of-bounds reads in our code into failures
// (OpenCV's decoders are not instrumented there).

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>

#include "server/image/image.h"
#include "tests/image/test_util.h"

namespace arcface::image {
namespace {

using ::arcface::image::testing::DataPath;
using ::arcface::image::testing::Encode;
using ::arcface::image::testing::FixPngCrcs;
using ::arcface::image::testing::MakeBigEndianTiff;

std::string Mutate(const std::string& original, std::mt19937& rng) {
  std::string s = original;
  auto pick = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng() % n); };
  const int operations = 1 + static_cast<int>(rng() % 4);
  for (int i = 0; i < operations && !s.empty(); ++i) {
    switch (rng() % 7) {
      case 0:  // flip one bit anywhere
        s[pick(s.size())] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 1: {  // an extreme byte in the headers, where sizes and lengths live
        static constexpr char kValues[] = {'\x00', '\x01', '\x7f', '\x80', '\xfe', '\xff'};
        s[pick(std::min<size_t>(s.size(), 64))] = kValues[rng() % 6];
        break;
      }
      case 2:  // truncate
        s.resize(pick(s.size()));
        break;
      case 3: {  // delete a slice
        const size_t at = pick(s.size());
        s.erase(at, pick(s.size() - at) % 64 + 1);
        break;
      }
      case 4: {  // duplicate a slice
        const size_t at = pick(s.size());
        const size_t n = std::min<size_t>(s.size() - at, 1 + pick(64));
        s.insert(at, s.substr(at, n));
        break;
      }
      case 5: {  // overwrite 4 bytes in the headers with a boundary value, either endianness
        static constexpr uint32_t kValues[] = {0,       1,          0x7fff,      0xffff,
                                               0x10000, 0x7fffffff, 0x80000000u, 0xffffffffu};
        const uint32_t v = kValues[rng() % 8];
        const size_t at = pick(std::min<size_t>(s.size(), 64));
        for (size_t k = 0; k < 4 && at + k < s.size(); ++k) {
          const int shift = (rng() % 2) ? 8 * static_cast<int>(k) : 8 * static_cast<int>(3 - k);
          s[at + k] = static_cast<char>(v >> shift);
        }
        break;
      }
      default:  // random byte anywhere
        s[pick(s.size())] = static_cast<char>(rng());
        break;
    }
  }
  return s;
}

struct FuzzResult {
  int decoded = 0;
  int refused = 0;
};

// `fix_up`, when given, repairs checksums in half of the mutants so they reach the decoder
// proper instead of failing the integrity check.
FuzzResult FuzzDecode(const std::string& original, int iterations, uint32_t seed,
                      void (*fix_up)(std::string&) = nullptr) {
  std::mt19937 rng(seed);
  Limits limits;
  limits.max_pixels = 1 << 22;  // keeps mutated sizes cheap to decode
  FuzzResult result;
  for (int i = 0; i < iterations; ++i) {
    std::string mutated = Mutate(original, rng);
    if (fix_up != nullptr && i % 2 == 0) fix_up(mutated);
    absl::StatusOr<cv::Mat> rgb = DecodeImage(mutated, limits);
    if (rgb.ok()) {
      ++result.decoded;
      EXPECT_EQ(rgb->type(), CV_8UC3) << "iteration " << i;
      absl::StatusOr<ImageInfo> info = ProbeImage(mutated);
      EXPECT_TRUE(info.ok()) << "iteration " << i;
      if (info.ok()) {
        EXPECT_EQ(rgb->cols, info->width) << "iteration " << i;
        EXPECT_EQ(rgb->rows, info->height) << "iteration " << i;
      }
      EXPECT_LE(int64_t{rgb->cols} * rgb->rows, limits.max_pixels);
    } else {
      ++result.refused;
      EXPECT_EQ(rgb.status().code(), absl::StatusCode::kInvalidArgument)
          << "iteration " << i << ": " << rgb.status();
    }
  }
  return result;
}

class FuzzTest : public ::testing::Test {
 protected:
  // Corrupt files make OpenCV, libpng and libjpeg print a line each to stderr; thousands of
  // them would bury the test output, and the failures that matter are the assertions (stdout).
  void SetUp() override {
    saved_level_ = cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
    std::fflush(stderr);
    saved_stderr_ = dup(STDERR_FILENO);
    const int null = open("/dev/null", O_WRONLY);
    if (saved_stderr_ >= 0 && null >= 0) dup2(null, STDERR_FILENO);
    if (null >= 0) close(null);
    const cv::Mat photo = cv::imread(DataPath("0-f1-su-ph.jpg"), cv::IMREAD_COLOR);
    ASSERT_FALSE(photo.empty());
    small_ = photo(cv::Rect(200, 150, 48, 40)).clone();
  }
  void TearDown() override {
    std::fflush(stderr);
    if (saved_stderr_ >= 0) {
      dup2(saved_stderr_, STDERR_FILENO);
      close(saved_stderr_);
    }
    cv::utils::logging::setLogLevel(saved_level_);
  }

  int saved_stderr_ = -1;
  cv::Mat small_;
  cv::utils::logging::LogLevel saved_level_ = cv::utils::logging::LOG_LEVEL_INFO;
};

TEST_F(FuzzTest, MutatedPng) {
  const FuzzResult r = FuzzDecode(Encode(small_, ".png"), 2000, 101, &FixPngCrcs);
  // Mutants that survive libpng's CRC and zlib checks are rare, but they must exist for the
  // pixel path to be exercised at all.
  EXPECT_GT(r.decoded, 0);
  EXPECT_EQ(r.decoded + r.refused, 2000);
  std::printf("PNG: %d decoded\n", r.decoded);
}

TEST_F(FuzzTest, MutatedJpeg) {
  const FuzzResult r = FuzzDecode(Encode(small_, ".jpg"), 2000, 102);
  // Most bit flips in entropy-coded data still decode; a harness that refused everything
  // would not be exercising the decoder.
  EXPECT_GT(r.decoded, 100);
  EXPECT_EQ(r.decoded + r.refused, 2000);
  std::printf("JPEG: %d decoded\n", r.decoded);
}

TEST_F(FuzzTest, MutatedOtherFormats) {
  const std::vector<std::pair<const char*, std::string>> files = {
      {"BMP", Encode(small_, ".bmp")},
      {"TIFF", Encode(small_, ".tiff")},
      {"big-endian TIFF", MakeBigEndianTiff(small_)},
      {"lossless WebP", Encode(small_, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101})},
      {"lossy WebP", Encode(small_, ".webp", {cv::IMWRITE_WEBP_QUALITY, 80})},
  };
  uint32_t seed = 200;
  for (const auto& [name, file] : files) {
    SCOPED_TRACE(name);
    const FuzzResult r = FuzzDecode(file, 500, seed++);
    EXPECT_GT(r.decoded, 0);
    EXPECT_EQ(r.decoded + r.refused, 500);
    std::printf("%s: %d decoded\n", name, r.decoded);
  }
}

}  // namespace
}  // namespace arcface::image
