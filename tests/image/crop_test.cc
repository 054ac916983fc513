#include <chrono>
#include <cmath>
#include <limits>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <opencv2/imgproc.hpp>

#include "server/image/image.h"
#include "tests/image/test_util.h"

namespace arcface::image {
namespace {

using ::arcface::image::testing::CropToMat;
using ::arcface::image::testing::DataPath;
using ::arcface::image::testing::IsInvalidArgumentWith;
using ::arcface::image::testing::IsOk;
using ::arcface::image::testing::MaxAbsDiff;
using ::arcface::image::testing::RandomImage;
using ::arcface::image::testing::ReadRgbReference;

cv::Mat ResizeReference(const cv::Mat& region) {
  cv::Mat out;
  cv::resize(region, out, cv::Size(kCropSize, kCropSize), 0, 0, cv::INTER_LINEAR);
  return out;
}

// Random pixels in [1, 255], so black (0) can only come from outside the image.
cv::Mat NonBlackImage(int rows, int cols, uint64_t seed) {
  cv::Mat image = RandomImage(rows, cols, seed);
  image.setTo(cv::Scalar::all(1), image == 0);
  return image;
}

TEST(ResizeWholeTest, ExactSizeIsCopiedUnchanged) {
  const cv::Mat rgb = RandomImage(kCropSize, kCropSize, 1);
  absl::StatusOr<Crop> crop = ResizeWhole(rgb);
  ASSERT_THAT(crop, IsOk());
  ASSERT_EQ(crop->size(), kCropBytes);
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), rgb), 0);
}

TEST(ResizeWholeTest, PhotoMatchesBilinearResize) {
  const cv::Mat rgb = ReadRgbReference(DataPath("multi_face.jpg"));
  absl::StatusOr<Crop> crop = ResizeWhole(rgb);
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), ResizeReference(rgb)), 0);
}

TEST(ResizeWholeTest, BilinearWithHalfPixelCentresAndNoAntialiasing) {
  // Upscaling 2×2 → 112×112 with half-pixel centres: output pixel u samples source
  // x = (u + 0.5)·2/112 − 0.5, clamped at the edges. A 0/224 step between the two columns gives
  // 0 up to the centre of source pixel 0 (u ≤ 27), then a ramp, then 224 from u = 84 on.
  cv::Mat rgb(2, 2, CV_8UC3);
  rgb.col(0).setTo(cv::Scalar::all(0));
  rgb.col(1).setTo(cv::Scalar::all(224));
  absl::StatusOr<Crop> crop = ResizeWhole(rgb);
  ASSERT_THAT(crop, IsOk());
  const cv::Mat out = CropToMat(*crop);
  EXPECT_EQ(out.at<cv::Vec3b>(50, 27)[0], 0);
  EXPECT_EQ(out.at<cv::Vec3b>(50, 84)[0], 224);
  // u = 55: x = 55.5/56 − 0.5 = 0.491…, 224·0.491 = 110.0; OpenCV's fixed point may be off by 1.
  EXPECT_NEAR(out.at<cv::Vec3b>(50, 55)[0], 224 * (55.5 / 56 - 0.5), 1.0);
  // Downscaling 224 → 112 without antialiasing averages pixel pairs: 0/200 stripes give 100.
  cv::Mat stripes(224, 224, CV_8UC3, cv::Scalar::all(0));
  for (int x = 1; x < 224; x += 2) stripes.col(x).setTo(cv::Scalar::all(200));
  crop = ResizeWhole(stripes);
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(CropToMat(*crop).at<cv::Vec3b>(60, 60), cv::Vec3b(100, 100, 100));
}

TEST(ResizeWholeTest, AcceptsNonContiguousViews) {
  const cv::Mat rgb = RandomImage(300, 400, 2);
  const cv::Mat view = rgb(cv::Rect(10, 20, 200, 150));
  ASSERT_FALSE(view.isContinuous());
  absl::StatusOr<Crop> crop = ResizeWhole(view);
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), ResizeReference(view.clone())), 0);
}

TEST(ResizeWholeTest, RefusesWrongImageTypes) {
  EXPECT_THAT(ResizeWhole(cv::Mat()), IsInvalidArgumentWith("non-empty 8-bit 3-channel"));
  EXPECT_THAT(ResizeWhole(cv::Mat(10, 10, CV_8UC1, cv::Scalar(0))),
              IsInvalidArgumentWith("3-channel"));
  EXPECT_THAT(ResizeWhole(cv::Mat(10, 10, CV_32FC3, cv::Scalar::all(0))),
              IsInvalidArgumentWith("8-bit"));
}

TEST(CropBoxTest, BoxInsideMatchesManualCropAndResize) {
  const cv::Mat rgb = ReadRgbReference(DataPath("multi_face.jpg"));
  // Rounded: columns [100, 300), rows [51, 260).
  absl::StatusOr<Crop> crop = CropBox(rgb, Box{100.2f, 50.7f, 300.4f, 260.1f});
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), ResizeReference(rgb(cv::Rect(100, 51, 200, 209)))), 0);
}

TEST(CropBoxTest, EdgesRoundHalfUp) {
  const cv::Mat rgb = NonBlackImage(200, 200, 3);
  // 9.5 → 10 and 121.5 → 122: exactly 112 wide, so the region is copied and comparable.
  absl::StatusOr<Crop> crop = CropBox(rgb, Box{9.5f, 19.5f, 121.5f, 131.5f});
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), rgb(cv::Rect(10, 20, 112, 112))), 0);
  // 9.49 → 9 and 121.49 → 121.
  crop = CropBox(rgb, Box{9.49f, 19.49f, 121.49f, 131.49f});
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), rgb(cv::Rect(9, 19, 112, 112))), 0);
  // 9.5 → 10 and 20.49 → 20: a 10-pixel region.
  crop = CropBox(rgb, Box{9.5f, 9.5f, 20.49f, 20.49f});
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), ResizeReference(rgb(cv::Rect(10, 10, 10, 10)))), 0);
  // -0.5 → 0 (inside), -0.51 → -1 (one black column and row).
  crop = CropBox(rgb, Box{-0.5f, -0.5f, 111.5f, 111.5f});
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), rgb(cv::Rect(0, 0, 112, 112))), 0);
  crop = CropBox(rgb, Box{-0.51f, -0.51f, 110.5f, 110.5f});
  ASSERT_THAT(crop, IsOk());
  const cv::Mat out = CropToMat(*crop);
  EXPECT_EQ(out.at<cv::Vec3b>(0, 50), cv::Vec3b(0, 0, 0));
  EXPECT_EQ(out.at<cv::Vec3b>(50, 0), cv::Vec3b(0, 0, 0));
  EXPECT_EQ(MaxAbsDiff(out(cv::Rect(1, 1, 111, 111)), rgb(cv::Rect(0, 0, 111, 111))), 0);
}

TEST(CropBoxTest, OutsideTheImageIsBlack) {
  const cv::Mat rgb = NonBlackImage(100, 150, 4);
  // Columns [-20, 92), rows [-10, 102): 112×112, so pixels map one to one.
  absl::StatusOr<Crop> crop = CropBox(rgb, Box{-20, -10, 92, 102});
  ASSERT_THAT(crop, IsOk());
  const cv::Mat out = CropToMat(*crop);
  EXPECT_EQ(out.at<cv::Vec3b>(5, 50), cv::Vec3b(0, 0, 0));    // above the image
  EXPECT_EQ(out.at<cv::Vec3b>(50, 19), cv::Vec3b(0, 0, 0));   // left of it
  EXPECT_EQ(out.at<cv::Vec3b>(111, 50), cv::Vec3b(0, 0, 0));  // row 101, below it
  EXPECT_EQ(out.at<cv::Vec3b>(10, 20), rgb.at<cv::Vec3b>(0, 0));
  EXPECT_EQ(out.at<cv::Vec3b>(109, 111), rgb.at<cv::Vec3b>(99, 91));
  EXPECT_EQ(MaxAbsDiff(out(cv::Rect(20, 10, 92, 100)), rgb(cv::Rect(0, 0, 92, 100))), 0);
  EXPECT_EQ(cv::countNonZero(out.reshape(1) == 0), (112 * 112 - 92 * 100) * 3);
}

TEST(CropBoxTest, PartlyOutsideMatchesResizedBlackCanvas) {
  const cv::Mat rgb = ReadRgbReference(DataPath("single_face.jpg"));
  // Columns [480, 700) reach past the right edge (572), rows [-30, 170) past the top.
  absl::StatusOr<Crop> crop = CropBox(rgb, Box{480, -30, 700, 170});
  ASSERT_THAT(crop, IsOk());
  cv::Mat canvas(200, 220, CV_8UC3, cv::Scalar::all(0));
  rgb(cv::Rect(480, 0, 92, 170)).copyTo(canvas(cv::Rect(0, 30, 92, 170)));
  const cv::Mat expected = ResizeReference(canvas);
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), expected), 0);
  EXPECT_EQ(CropToMat(*crop).at<cv::Vec3b>(50, 100), cv::Vec3b(0, 0, 0));
}

TEST(CropBoxTest, BoxEntirelyOutsideIsAllBlack) {
  const cv::Mat rgb = NonBlackImage(50, 50, 5);
  absl::StatusOr<Crop> crop = CropBox(rgb, Box{1000, 1000, 1200, 1100});
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(cv::countNonZero(CropToMat(*crop).reshape(1)), 0);
}

TEST(CropBoxTest, RefusesEmptyBoxes) {
  const cv::Mat rgb = RandomImage(50, 50, 6);
  EXPECT_THAT(CropBox(rgb, Box{10, 10, 10, 20}), IsInvalidArgumentWith("box is empty"));
  EXPECT_THAT(CropBox(rgb, Box{30, 10, 20, 20}), IsInvalidArgumentWith("box is empty"));
  EXPECT_THAT(CropBox(rgb, Box{10, 20, 20, 10}), IsInvalidArgumentWith("box is empty"));
  // Distinct edges that round to the same pixel.
  EXPECT_THAT(CropBox(rgb, Box{10.2f, 10, 10.4f, 20}), IsInvalidArgumentWith("columns [10, 10)"));
}

TEST(CropBoxTest, RefusesNonFiniteCoordinates) {
  const cv::Mat rgb = RandomImage(50, 50, 7);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_THAT(CropBox(rgb, Box{nan, 0, 10, 10}), IsInvalidArgumentWith("x_min is not finite"));
  EXPECT_THAT(CropBox(rgb, Box{0, nan, 10, 10}), IsInvalidArgumentWith("y_min is not finite"));
  EXPECT_THAT(CropBox(rgb, Box{0, 0, inf, 10}), IsInvalidArgumentWith("x_max is not finite"));
  EXPECT_THAT(CropBox(rgb, Box{0, 0, 10, -inf}), IsInvalidArgumentWith("y_max is not finite"));
}

TEST(CropBoxTest, RefusesHugeBoxesWithoutAllocating) {
  const cv::Mat rgb = RandomImage(50, 50, 8);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(CropBox(rgb, Box{0, 0, 1e6f, 1e6f}),
              IsInvalidArgumentWith("box is 1000000x1000000 = 1000000000000 pixels, over the "
                                    "limit of 40000000"));
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1.0);
  EXPECT_THAT(CropBox(rgb, Box{-1e30f, 0, 10, 10}), IsInvalidArgumentWith("out of range"));
  Limits limits;
  limits.max_pixels = 99;
  EXPECT_THAT(CropBox(rgb, Box{0, 0, 10, 10}, limits),
              IsInvalidArgumentWith("box is 10x10 = 100 pixels, over the limit of 99"));
}

}  // namespace
}  // namespace arcface::image
