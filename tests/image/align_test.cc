#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <opencv2/imgproc.hpp>
#include <random>
#include <thread>
#include <vector>

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

std::vector<Point> TemplatePoints() { return {ArcFaceTemplate().begin(), ArcFaceTemplate().end()}; }

std::vector<Point> Apply(const cv::Matx23d& m, const std::vector<Point>& points) {
  std::vector<Point> out;
  for (const Point& p : points) {
    out.push_back({static_cast<float>(m(0, 0) * p.x + m(0, 1) * p.y + m(0, 2)),
                   static_cast<float>(m(1, 0) * p.x + m(1, 1) * p.y + m(1, 2))});
  }
  return out;
}

cv::Matx23d ScaledRotation(double scale, double degrees, double tx, double ty) {
  const double r = degrees * M_PI / 180;
  return {scale * std::cos(r), -scale * std::sin(r), tx,
          scale * std::sin(r), scale * std::cos(r),  ty};
}

// Umeyama's algorithm as published (SVD of the cross-covariance, with the reflection
// correction), independent of the closed form under test; mirrors skimage's _umeyama.
cv::Matx23d UmeyamaBySvd(const std::vector<Point>& src, const std::vector<Point>& dst) {
  const int n = static_cast<int>(src.size());
  cv::Vec2d src_mean(0, 0), dst_mean(0, 0);
  for (int i = 0; i < n; ++i) {
    src_mean += cv::Vec2d(src[i].x, src[i].y);
    dst_mean += cv::Vec2d(dst[i].x, dst[i].y);
  }
  src_mean /= n;
  dst_mean /= n;
  cv::Matx22d cov = cv::Matx22d::zeros();
  double src_var = 0;
  for (int i = 0; i < n; ++i) {
    const cv::Vec2d p = cv::Vec2d(src[i].x, src[i].y) - src_mean;
    const cv::Vec2d q = cv::Vec2d(dst[i].x, dst[i].y) - dst_mean;
    cov += cv::Matx22d(q[0] * p[0], q[0] * p[1], q[1] * p[0], q[1] * p[1]) * (1.0 / n);
    src_var += p.dot(p) / n;
  }
  cv::Mat w, u, vt;
  cv::SVD::compute(cv::Mat(cov), w, u, vt);
  cv::Matx22d d = cv::Matx22d::eye();
  if (cv::determinant(cv::Mat(cov)) < 0) d(1, 1) = -1;
  const cv::Matx22d uu(u), vv(vt);
  const cv::Matx22d r = uu * d * vv;
  const double scale = (w.at<double>(0) * d(0, 0) + w.at<double>(1) * d(1, 1)) / src_var;
  const cv::Vec2d t = dst_mean - scale * (r * src_mean);
  return {scale * r(0, 0), scale * r(0, 1), t[0], scale * r(1, 0), scale * r(1, 1), t[1]};
}

void ExpectMatrixNear(const cv::Matx23d& actual, const cv::Matx23d& expected, double tolerance) {
  for (int i = 0; i < 6; ++i) {
    EXPECT_NEAR(actual.val[i], expected.val[i], tolerance) << "element " << i;
  }
}

TEST(EstimateSimilarityTest, RecoversAKnownSimilarity) {
  const cv::Matx23d truth = ScaledRotation(2.0, 30.0, 15.25, -7.5);
  const std::vector<Point> src = TemplatePoints();
  // dst is rounded to float (about 1e-5 at these magnitudes), so `truth` is recovered to that
  // precision; the least-squares answer for the rounded points is pinned to 1e-9 by the
  // independent SVD formulation.
  const std::vector<Point> dst = Apply(truth, src);
  absl::StatusOr<cv::Matx23d> m = EstimateSimilarity(src, dst);
  ASSERT_THAT(m, IsOk());
  ExpectMatrixNear(*m, UmeyamaBySvd(src, dst), 1e-9);
  ExpectMatrixNear(*m, truth, 1e-4);
}

TEST(EstimateSimilarityTest, ExactOnPointsRepresentableInFloat) {
  // Scale 2, rotation 90°, shift (3, -4) keeps integer points integral, so there is no
  // float rounding in dst and the answer is exact up to double arithmetic.
  const std::vector<Point> src = {{1, 2}, {5, 3}, {-2, 7}, {4, -6}, {0, 0}};
  std::vector<Point> dst;
  for (const Point& p : src) dst.push_back({-2 * p.y + 3, 2 * p.x - 4});
  absl::StatusOr<cv::Matx23d> m = EstimateSimilarity(src, dst);
  ASSERT_THAT(m, IsOk());
  ExpectMatrixNear(*m, cv::Matx23d(0, -2, 3, 2, 0, -4), 1e-12);
  // And a 30° rotation with scale 2 on the same points.
  const cv::Matx23d truth = ScaledRotation(2.0, 30.0, 5, 6);
  absl::StatusOr<cv::Matx23d> inverse = EstimateSimilarity(Apply(truth, src), src);
  ASSERT_THAT(inverse, IsOk());
  const cv::Matx33d forward(truth(0, 0), truth(0, 1), truth(0, 2), truth(1, 0), truth(1, 1),
                            truth(1, 2), 0, 0, 1);
  const cv::Matx33d inv = forward.inv();
  ExpectMatrixNear(*inverse,
                   cv::Matx23d(inv(0, 0), inv(0, 1), inv(0, 2), inv(1, 0), inv(1, 1), inv(1, 2)),
                   1e-6);
}

TEST(EstimateSimilarityTest, MatchesSvdUmeyamaOnNoisyAndMirroredPoints) {
  std::mt19937 rng(12);
  std::uniform_real_distribution<float> coord(0, 500);
  std::normal_distribution<float> noise(0, 3);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<Point> src(5);
    for (Point& p : src) p = {coord(rng), coord(rng)};
    std::vector<Point> dst = Apply(ScaledRotation(0.2 + trial * 0.01, trial * 7.0, 40, 60), src);
    for (Point& p : dst) {
      p.x += noise(rng);
      p.y += noise(rng);
      if (trial % 3 == 0) p.x = -p.x;  // a reflection: the best proper rotation is required
    }
    absl::StatusOr<cv::Matx23d> m = EstimateSimilarity(src, dst);
    ASSERT_THAT(m, IsOk());
    ExpectMatrixNear(*m, UmeyamaBySvd(src, dst), 1e-9);
    EXPECT_GT((*m)(0, 0) * (*m)(1, 1) - (*m)(0, 1) * (*m)(1, 0), 0) << "not a proper rotation";
  }
}

TEST(EstimateSimilarityTest, RefusesDegenerateInput) {
  const std::vector<Point> same(5, Point{10, 20});
  EXPECT_THAT(EstimateSimilarity(same, TemplatePoints()),
              IsInvalidArgumentWith("degenerate landmarks"));
  EXPECT_THAT(EstimateSimilarity(TemplatePoints(), same),
              IsInvalidArgumentWith("degenerate landmarks"));
  // Identical up to float rounding far from the origin.
  const std::vector<Point> far = {
      {1e6f, 1e6f}, {1e6f, 1e6f}, {1e6f, 1e6f}, {1e6f, 1e6f}, {1e6f + 0.0625f, 1e6f}};
  EXPECT_THAT(EstimateSimilarity(far, TemplatePoints()),
              IsInvalidArgumentWith("degenerate landmarks"));
  // No rotation relates them at all: a = b = 0.
  const std::vector<Point> src = {{1, 0}, {-1, 0}, {0, 1}, {0, -1}};
  const std::vector<Point> dst = {{1, 0}, {-1, 0}, {0, -1}, {0, 1}};
  EXPECT_THAT(EstimateSimilarity(src, dst), IsInvalidArgumentWith("degenerate landmarks"));
  EXPECT_THAT(EstimateSimilarity(src, TemplatePoints()), IsInvalidArgumentWith("4 and 5"));
  EXPECT_THAT(EstimateSimilarity(std::vector<Point>{{1, 1}}, std::vector<Point>{{1, 1}}),
              IsInvalidArgumentWith("at least 2"));
}

TEST(AlignFaceTest, TemplateLandmarksGiveTheIdentity) {
  const cv::Mat rgb = RandomImage(kCropSize, kCropSize, 21);
  absl::StatusOr<cv::Matx23d> m = EstimateSimilarity(TemplatePoints(), TemplatePoints());
  ASSERT_THAT(m, IsOk());
  ExpectMatrixNear(*m, cv::Matx23d(1, 0, 0, 0, 1, 0), 1e-12);
  absl::StatusOr<Crop> crop = AlignFace(rgb, TemplatePoints());
  ASSERT_THAT(crop, IsOk());
  ASSERT_EQ(crop->size(), kCropBytes);
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), rgb), 0);
}

TEST(AlignFaceTest, TranslatedLandmarksCutTheTranslatedSquare) {
  const cv::Mat rgb = ReadRgbReference(DataPath("multi_face.jpg"));
  std::vector<Point> landmarks = TemplatePoints();
  for (Point& p : landmarks) {
    p.x += 300;
    p.y += 200;
  }
  absl::StatusOr<Crop> crop = AlignFace(rgb, landmarks);
  ASSERT_THAT(crop, IsOk());
  EXPECT_LE(MaxAbsDiff(CropToMat(*crop), rgb(cv::Rect(300, 200, 112, 112))), 1);
}

TEST(AlignFaceTest, MatchesWarpAffineOfTheEstimatedTransform) {
  // InsightFace's norm_crop: warpAffine(img, M, (112, 112), borderValue=0) with M from the
  // similarity estimate; here on a face-sized rotated and scaled set of landmarks.
  const cv::Mat rgb = ReadRgbReference(DataPath("single_face.jpg"));
  const cv::Matx23d to_image = ScaledRotation(1.7, -12.0, 180, 140);
  const std::vector<Point> landmarks = Apply(to_image, TemplatePoints());
  absl::StatusOr<cv::Matx23d> m = EstimateSimilarity(landmarks, TemplatePoints());
  ASSERT_THAT(m, IsOk());
  cv::Mat expected;
  cv::warpAffine(rgb, expected, cv::Mat(*m), cv::Size(112, 112), cv::INTER_LINEAR,
                 cv::BORDER_CONSTANT, cv::Scalar::all(0));
  absl::StatusOr<Crop> crop = AlignFace(rgb, landmarks);
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(MaxAbsDiff(CropToMat(*crop), expected), 0);
  // The warp is the inverse of to_image, so output (0, 0) samples image pixel to_image·(0, 0).
  const cv::Vec3b corner = CropToMat(*crop).at<cv::Vec3b>(0, 0);
  const cv::Vec3b source = rgb.at<cv::Vec3b>(140, 180);
  for (int c = 0; c < 3; ++c) EXPECT_NEAR(corner[c], source[c], 1);
}

TEST(AlignFaceTest, AnotherGeometryMapsTheLandmarksOntoItsOwnTemplateInItsOwnSquare) {
  // A 150×150 geometry whose template is ArcFace's scaled by 1.5 and moved by (-9, -4): the crop
  // is that similarity's warp of the image, at 150×150, and the same geometry's box and whole-image
  // crops are 150×150 too.
  model::CropGeometry wide{150, {}};
  for (int i = 0; i < 5; ++i) {
    wide.landmarks[i] = {model::kArcFaceCrop.landmarks[i][0] * 1.5f - 9,
                         model::kArcFaceCrop.landmarks[i][1] * 1.5f - 4};
  }
  const cv::Mat rgb = ReadRgbReference(DataPath("single_face.jpg"));
  const cv::Matx23d to_image = ScaledRotation(1.3, 8.0, 170, 120);
  const std::vector<Point> landmarks = Apply(to_image, TemplatePoints());
  const std::array<Point, 5> target = Template(wide);
  absl::StatusOr<cv::Matx23d> m = EstimateSimilarity(landmarks, target);
  ASSERT_THAT(m, IsOk());
  cv::Mat expected;
  cv::warpAffine(rgb, expected, cv::Mat(*m), cv::Size(150, 150), cv::INTER_LINEAR,
                 cv::BORDER_CONSTANT, cv::Scalar::all(0));
  absl::StatusOr<Crop> crop = AlignFace(rgb, landmarks, wide);
  ASSERT_THAT(crop, IsOk());
  ASSERT_EQ(crop->size(), wide.bytes());
  EXPECT_EQ(MaxAbsDiff(cv::Mat(150, 150, CV_8UC3, crop->data()), expected), 0);
  for (const absl::StatusOr<Crop>& other :
       {ResizeWhole(rgb, wide), CropBox(rgb, {10, 10, 60, 80}, Limits(), wide)}) {
    ASSERT_THAT(other, IsOk());
    EXPECT_EQ(other->size(), size_t{150 * 150 * 3});
  }
}

TEST(AlignFaceTest, OutsideTheImageIsBlack) {
  const cv::Mat rgb = RandomImage(200, 200, 22);
  std::vector<Point> landmarks = TemplatePoints();
  for (Point& p : landmarks) p.x -= 50;  // the crop's left 50 columns fall left of the image
  absl::StatusOr<Crop> crop = AlignFace(rgb, landmarks);
  ASSERT_THAT(crop, IsOk());
  const cv::Mat out = CropToMat(*crop);
  EXPECT_EQ(cv::countNonZero(out(cv::Rect(0, 0, 49, 112)).reshape(1)), 0);
  EXPECT_LE(MaxAbsDiff(out(cv::Rect(50, 0, 62, 112)), rgb(cv::Rect(0, 0, 62, 112))), 1);
  for (Point& p : landmarks) p.x += 1e5;
  crop = AlignFace(rgb, landmarks);
  ASSERT_THAT(crop, IsOk());
  EXPECT_EQ(cv::countNonZero(CropToMat(*crop).reshape(1)), 0);
}

TEST(AlignFaceTest, ImagesWiderThanOpenCvRemapAllows) {
  // cv::remap refuses sources of 32767 pixels or more per side; the face is cut out first.
  cv::Mat rgb(120, 33000, CV_8UC3);
  cv::randu(rgb, cv::Scalar::all(0), cv::Scalar::all(256));
  std::vector<Point> landmarks = TemplatePoints();
  for (Point& p : landmarks) {
    p.x += 32850;
    p.y += 3;
  }
  absl::StatusOr<Crop> crop = AlignFace(rgb, landmarks);
  ASSERT_THAT(crop, IsOk());
  EXPECT_LE(MaxAbsDiff(CropToMat(*crop), rgb(cv::Rect(32850, 3, 112, 112))), 1);
  // Landmarks spread over the whole width shrink 33000 pixels into 112: too large to cut.
  std::vector<Point> wide = TemplatePoints();
  for (Point& p : wide) p.x *= 300;
  EXPECT_THAT(AlignFace(rgb, wide), IsInvalidArgumentWith("too large a region"));
}

TEST(AlignFaceTest, RefusesBadLandmarks) {
  const cv::Mat rgb = RandomImage(200, 200, 23);
  std::vector<Point> four = TemplatePoints();
  four.pop_back();
  EXPECT_THAT(AlignFace(rgb, four), IsInvalidArgumentWith("expected 5 landmarks, got 4"));
  std::vector<Point> six = TemplatePoints();
  six.push_back({1, 1});
  EXPECT_THAT(AlignFace(rgb, six), IsInvalidArgumentWith("expected 5 landmarks, got 6"));
  EXPECT_THAT(AlignFace(rgb, {}), IsInvalidArgumentWith("expected 5 landmarks, got 0"));
  std::vector<Point> nan = TemplatePoints();
  nan[3].y = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(AlignFace(rgb, nan), IsInvalidArgumentWith("landmark 3 is not finite"));
  std::vector<Point> inf = TemplatePoints();
  inf[0].x = std::numeric_limits<float>::infinity();
  EXPECT_THAT(AlignFace(rgb, inf), IsInvalidArgumentWith("landmark 0 is not finite"));
  EXPECT_THAT(AlignFace(rgb, std::vector<Point>(5, Point{50, 60})),
              IsInvalidArgumentWith("degenerate landmarks"));
  EXPECT_THAT(AlignFace(cv::Mat(), TemplatePoints()), IsInvalidArgumentWith("3-channel"));
}

TEST(AlignFaceTest, ConcurrentCallsAgree) {
  const cv::Mat rgb = ReadRgbReference(DataPath("multi_face.jpg"));
  const std::vector<Point> landmarks = Apply(ScaledRotation(0.8, 20, 400, 200), TemplatePoints());
  absl::StatusOr<Crop> expected = AlignFace(rgb, landmarks);
  ASSERT_THAT(expected, IsOk());
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        absl::StatusOr<Crop> crop = AlignFace(rgb, landmarks);
        if (!crop.ok() || *crop != *expected) ++mismatches[t];
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

}  // namespace
}  // namespace arcface::image
