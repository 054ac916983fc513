// FaceDetector on real photos (tests/data) with face-api's real files (ARCFACE_DETECTOR_MODELS):
// the faces of multi_face.jpg, coordinates that follow the frame's scale, frames without faces,
// tiny and grayscale frames, batches equal to single frames, and Create on missing and
// malformed files.
#include "server/detect/face_detector.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgproc.hpp>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "server/detect/blazeface.h"
#include "server/detect/box_decoding.h"
#include "server/detect/landmark68.h"
#include "server/detect/ssd_mobilenet.h"
#include "server/detect/tiny_face_detector.h"
#include "server/image/image.h"

namespace arcface::detect {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const fs::path kModels = ARCFACE_DETECTOR_MODELS;
const fs::path kData = ARCFACE_TEST_DATA;
const fs::path kCandidates = ARCFACE_CANDIDATE_MODELS;  // human-models' BlazeFace files

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

cv::Mat Photo(const std::string& name) {
  const std::string bytes = ReadAll(kData / name);
  absl::StatusOr<cv::Mat> rgb = image::DecodeImage(bytes, image::Limits());
  EXPECT_TRUE(rgb.ok()) << name << ": " << rgb.status();
  return rgb.ok() ? *rgb : cv::Mat();
}

cv::Mat Scaled(const cv::Mat& rgb, double scale) {
  cv::Mat out;
  cv::resize(rgb, out, cv::Size(), scale, scale, scale < 1 ? cv::INTER_AREA : cv::INTER_LINEAR);
  return out;
}

std::unique_ptr<FaceDetector> MakeDetector(const std::string& detector) {
  DetectorConfig config;
  config.model_dir = kModels.string();
  config.detector = detector;
  absl::StatusOr<std::unique_ptr<FaceDetector>> made = FaceDetector::Create(config);
  EXPECT_TRUE(made.ok()) << made.status()
                         << " (face-api's files: run deploy/fetch-models.sh, or configure with "
                            "-DARCFACE_DETECTOR_MODELS=<folder>)";
  return made.ok() ? std::move(*made) : nullptr;
}

float Iou(const image::Box& a, const image::Box& b) {
  return detect::Iou({a.x_min, a.y_min, a.x_max, a.y_max, 1},
                     {b.x_min, b.y_min, b.x_max, b.y_max, 1});
}

class FaceDetectorTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    for (const char* name : {"ssd_mobilenetv1", "tiny_face_detector"}) {
      detectors_[name] = MakeDetector(name);
    }
  }
  static void TearDownTestSuite() { detectors_.clear(); }

  void SetUp() override {
    detector_ = detectors_[GetParam()].get();
    ASSERT_NE(detector_, nullptr);
  }

  std::vector<DetectedBox> DetectOne(const cv::Mat& rgb, DetectFilter filter = DetectFilter()) {
    absl::StatusOr<PreparedFrame> frame = detector_->Prepare(rgb, filter);
    EXPECT_TRUE(frame.ok()) << frame.status();
    if (!frame.ok()) return {};
    const PreparedFrame* batch[] = {&*frame};
    absl::StatusOr<std::vector<std::vector<DetectedBox>>> faces = detector_->Detect(batch);
    EXPECT_TRUE(faces.ok()) << faces.status();
    if (!faces.ok()) return {};
    EXPECT_EQ(faces->size(), 1u);
    return faces->at(0);
  }

  static std::map<std::string, std::unique_ptr<FaceDetector>> detectors_;
  FaceDetector* detector_ = nullptr;
};

std::map<std::string, std::unique_ptr<FaceDetector>> FaceDetectorTest::detectors_;

bool Inside(const image::Point& p, const image::Box& b) {
  return p.x >= b.x_min && p.x <= b.x_max && p.y >= b.y_min && p.y <= b.y_max;
}

TEST_P(FaceDetectorTest, FindsTheFiveFacesOfMultiFaceWithTheirLandmarks) {
  const cv::Mat rgb = Photo("multi_face.jpg");
  const std::vector<DetectedBox> faces = DetectOne(rgb);
  ASSERT_EQ(faces.size(), 5u);
  for (size_t i = 0; i < faces.size(); ++i) {
    const DetectedBox& f = faces[i];
    SCOPED_TRACE(testing::Message() << "face " << i << " score " << f.score);
    if (i > 0) {
      EXPECT_LE(f.score, faces[i - 1].score);
    }
    EXPECT_GE(f.score, DetectFilter().min_score);
    EXPECT_GE(f.box.x_min, 0);
    EXPECT_GE(f.box.y_min, 0);
    EXPECT_LE(f.box.x_max, rgb.cols);
    EXPECT_LE(f.box.y_max, rgb.rows);
    for (const image::Point& p : f.landmarks) EXPECT_TRUE(Inside(p, f.box)) << p.x << "," << p.y;
    const auto& [left_eye, right_eye, nose, mouth_left, mouth_right] = f.landmarks;
    EXPECT_LT(left_eye.x, right_eye.x);
    EXPECT_LT(mouth_left.x, mouth_right.x);
    EXPECT_GT(nose.y, (left_eye.y + right_eye.y) / 2);
    EXPECT_GT((mouth_left.y + mouth_right.y) / 2, nose.y);
  }
  // Five different faces: each box holds one face's eyes only.
  for (size_t i = 0; i < faces.size(); ++i) {
    for (size_t j = 0; j < faces.size(); ++j) {
      if (i != j) {
        EXPECT_FALSE(Inside(faces[j].landmarks[0], faces[i].box)) << i << " " << j;
      }
    }
  }
}

TEST_P(FaceDetectorTest, CoordinatesFollowTheFramesScale) {
  const cv::Mat rgb = Photo("multi_face.jpg");
  const std::vector<DetectedBox> base = DetectOne(rgb);
  ASSERT_EQ(base.size(), 5u);
  for (double scale : {0.5, 2.0}) {
    SCOPED_TRACE(testing::Message() << "scale " << scale);
    const std::vector<DetectedBox> faces = DetectOne(Scaled(rgb, scale));
    ASSERT_EQ(faces.size(), 5u);
    for (const DetectedBox& b : base) {
      const image::Box expected{b.box.x_min * float(scale), b.box.y_min * float(scale),
                                b.box.x_max * float(scale), b.box.y_max * float(scale)};
      const auto match = std::max_element(faces.begin(), faces.end(), [&](auto& x, auto& y) {
        return Iou(x.box, expected) < Iou(y.box, expected);
      });
      // Box edges and landmarks within a fraction of the face's size: 3% for SSD (measured:
      // 1.4%); 8% for Tiny, whose 416-pixel input sees the half-size faces at ~35 pixels
      // (measured: 7.1%).
      const float tolerance =
          (GetParam() == "ssd_mobilenetv1" ? 0.03f : 0.08f) * (expected.x_max - expected.x_min);
      EXPECT_NEAR(match->box.x_min, expected.x_min, tolerance);
      EXPECT_NEAR(match->box.y_min, expected.y_min, tolerance);
      EXPECT_NEAR(match->box.x_max, expected.x_max, tolerance);
      EXPECT_NEAR(match->box.y_max, expected.y_max, tolerance);
      for (size_t k = 0; k < 5; ++k) {
        // Pixel centres: x' + 0.5 = (x + 0.5) * scale.
        EXPECT_NEAR(match->landmarks[k].x, (b.landmarks[k].x + 0.5) * scale - 0.5, tolerance);
        EXPECT_NEAR(match->landmarks[k].y, (b.landmarks[k].y + 0.5) * scale - 0.5, tolerance);
      }
    }
  }
}

TEST_P(FaceDetectorTest, AFrameWithoutFacesGivesAnEmptyList) {
  EXPECT_THAT(DetectOne(Photo("free-mountain-vector-01.jpg")), testing::IsEmpty());
  EXPECT_THAT(DetectOne(cv::Mat(480, 640, CV_8UC3, cv::Scalar(90, 120, 200))), testing::IsEmpty());
}

TEST_P(FaceDetectorTest, TinyFramesAreDetectedWithoutFaces) {
  for (cv::Size size : {cv::Size(1, 1), cv::Size(3, 2), cv::Size(1, 700), cv::Size(900, 1)}) {
    SCOPED_TRACE(testing::Message() << size);
    EXPECT_THAT(DetectOne(cv::Mat(size, CV_8UC3, cv::Scalar::all(128))), testing::IsEmpty());
  }
}

TEST_P(FaceDetectorTest, EmptyAndUnsupportedFramesAreRefused) {
  absl::StatusOr<PreparedFrame> empty = detector_->Prepare(cv::Mat(), DetectFilter());
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), HasSubstr("empty frame"));
  absl::StatusOr<PreparedFrame> rgba =
      detector_->Prepare(cv::Mat(10, 10, CV_8UC4, cv::Scalar::all(0)), DetectFilter());
  EXPECT_EQ(rgba.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(rgba.status().message(), HasSubstr("8-bit RGB or grayscale"));
  for (DetectFilter filter :
       {DetectFilter{-0.1f, 0, 0}, DetectFilter{1.5f, 0, 0}, DetectFilter{std::nanf(""), 0, 0},
        DetectFilter{0.5f, -1, 0}, DetectFilter{0.5f, INFINITY, 0}}) {
    absl::StatusOr<PreparedFrame> bad =
        detector_->Prepare(cv::Mat(10, 10, CV_8UC3, cv::Scalar::all(0)), filter);
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument)
        << filter.min_score << " " << filter.min_face_size;
  }
  // A frame not made by Prepare.
  PreparedFrame forged;
  forged.rgb = cv::Mat(10, 10, CV_8UC3, cv::Scalar::all(0));
  const PreparedFrame* batch[] = {&forged};
  EXPECT_EQ(detector_->Detect(batch).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(detector_->Detect({}).ok());
}

TEST_P(FaceDetectorTest, GrayscaleFramesAreDetectedAsReplicatedRgb) {
  cv::Mat gray;
  cv::cvtColor(Photo("multi_face.jpg"), gray, cv::COLOR_RGB2GRAY);
  cv::Mat replicated;
  cv::cvtColor(gray, replicated, cv::COLOR_GRAY2RGB);
  const std::vector<DetectedBox> from_gray = DetectOne(gray);
  const std::vector<DetectedBox> from_rgb = DetectOne(replicated);
  EXPECT_GE(from_gray.size(), 4u);
  ASSERT_EQ(from_gray.size(), from_rgb.size());
  for (size_t i = 0; i < from_gray.size(); ++i) {
    EXPECT_EQ(from_gray[i].score, from_rgb[i].score);
    EXPECT_EQ(from_gray[i].box.x_min, from_rgb[i].box.x_min);
    EXPECT_EQ(from_gray[i].landmarks[0].x, from_rgb[i].landmarks[0].x);
  }
}

TEST_P(FaceDetectorTest, EachFrameGetsItsOwnFilter) {
  const cv::Mat rgb = Photo("multi_face.jpg");
  const std::vector<DetectedBox> all = DetectOne(rgb);
  ASSERT_EQ(all.size(), 5u);
  // max_faces keeps the best ones.
  const std::vector<DetectedBox> two = DetectOne(rgb, DetectFilter{0.5f, 0, 2});
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[0].score, all[0].score);
  EXPECT_EQ(two[1].score, all[1].score);
  // min_score between the scores keeps those above it.
  const float cut = (all[1].score + all[2].score) / 2;
  EXPECT_EQ(DetectOne(rgb, DetectFilter{cut, 0, 0}).size(), 2u);
  // min_face_size between the faces' sizes keeps the larger ones.
  std::vector<float> sizes;
  for (const DetectedBox& f : all) {
    sizes.push_back(std::min(f.box.x_max - f.box.x_min, f.box.y_max - f.box.y_min));
  }
  std::sort(sizes.begin(), sizes.end());
  const float size_cut = (sizes[1] + sizes[2]) / 2;
  const std::vector<DetectedBox> large = DetectOne(rgb, DetectFilter{0.5f, size_cut, 0});
  EXPECT_EQ(large.size(), 3u);
  for (const DetectedBox& f : large) {
    EXPECT_GE(std::min(f.box.x_max - f.box.x_min, f.box.y_max - f.box.y_min), size_cut);
  }
}

void ExpectSameFaces(const std::vector<DetectedBox>& a, const std::vector<DetectedBox>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const float size = a[i].box.x_max - a[i].box.x_min;
    EXPECT_NEAR(a[i].score, b[i].score, 1e-4);
    EXPECT_NEAR(a[i].box.x_min, b[i].box.x_min, 1e-4 * size);
    EXPECT_NEAR(a[i].box.y_min, b[i].box.y_min, 1e-4 * size);
    EXPECT_NEAR(a[i].box.x_max, b[i].box.x_max, 1e-4 * size);
    EXPECT_NEAR(a[i].box.y_max, b[i].box.y_max, 1e-4 * size);
    for (size_t k = 0; k < 5; ++k) {
      EXPECT_NEAR(a[i].landmarks[k].x, b[i].landmarks[k].x, 1e-4 * size);
      EXPECT_NEAR(a[i].landmarks[k].y, b[i].landmarks[k].y, 1e-4 * size);
    }
  }
}

TEST_P(FaceDetectorTest, ABatchOfMixedFramesEqualsEachFrameAlone) {
  const cv::Mat multi = Photo("multi_face.jpg");
  const std::vector<std::pair<cv::Mat, DetectFilter>> inputs = {
      {multi, DetectFilter()},
      {Photo("free-mountain-vector-01.jpg"), DetectFilter()},
      {Photo("single_face.jpg"), DetectFilter()},
      {Scaled(multi, 0.5), DetectFilter{0.5f, 0, 3}},
      {Photo("0-f15-hao-ph.jpg"), DetectFilter{0.3f, 0, 0}},
  };
  std::vector<PreparedFrame> prepared;
  std::vector<std::vector<DetectedBox>> alone;
  for (const auto& [rgb, filter] : inputs) {
    absl::StatusOr<PreparedFrame> frame = detector_->Prepare(rgb, filter);
    ASSERT_TRUE(frame.ok()) << frame.status();
    prepared.push_back(std::move(*frame));
    alone.push_back(DetectOne(rgb, filter));
  }
  std::vector<const PreparedFrame*> batch;
  for (const PreparedFrame& f : prepared) batch.push_back(&f);
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> together = detector_->Detect(batch);
  ASSERT_TRUE(together.ok()) << together.status();
  ASSERT_EQ(together->size(), inputs.size());
  size_t faces = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "frame " << i);
    ExpectSameFaces((*together)[i], alone[i]);
    faces += alone[i].size();
  }
  EXPECT_EQ(alone[0].size(), 5u);
  EXPECT_THAT(alone[1], testing::IsEmpty());
  EXPECT_EQ(alone[2].size(), 1u);
  EXPECT_EQ(alone[3].size(), 3u);
  EXPECT_GE(faces, 10u);
}

TEST_P(FaceDetectorTest, DescribesItself) {
  const DetectorDescription& d = detector_->description();
  EXPECT_EQ(d.detector, GetParam());
  EXPECT_EQ(d.landmarks, "face_landmark_68");
  EXPECT_EQ(d.device, "cpu");
  EXPECT_EQ(d.weights_sha256.size(), 64u);
  EXPECT_EQ(d.detector_id, GetParam() + "+landmark68@" + d.weights_sha256.substr(0, 12));
  EXPECT_EQ(d.input_size, GetParam() == "ssd_mobilenetv1" ? 512 : 416);
  EXPECT_EQ(d.max_faces_per_frame, DetectorConfig().max_faces_per_frame);
  EXPECT_EQ(d.default_min_score, DetectFilter().min_score);
}

INSTANTIATE_TEST_SUITE_P(Networks, FaceDetectorTest,
                         testing::Values("ssd_mobilenetv1", "tiny_face_detector"));

// ---- Decoding, NMS and the five points (torch-free) ------------------------------------------

TEST(BoxDecodingTest, SsdDecodesAgainstThePriorsInYxOrder) {
  // Prior 0: y 0.1..0.3, x 0.2..0.6. Zero encodings give the prior back; ty = 10 moves the
  // centre down by one prior height, th = 5 * ln 2 doubles the height.
  const std::vector<float> priors = {0.1f, 0.2f, 0.3f, 0.6f, 0.1f, 0.2f,
                                     0.3f, 0.6f, 0.1f, 0.2f, 0.3f, 0.6f};
  const std::vector<float> encodings = {0, 0, 0, 0, 10, 0, 5 * std::log(2.0f), 0, 0, 0, 0, 0};
  const std::vector<float> logits = {0, 2, 0, 0, 0, 0, 0, -3, 0};  // face logit is [1]
  const std::vector<ScoredBox> boxes = DecodeSsd(encodings, logits, priors, 0.5f);
  ASSERT_EQ(boxes.size(), 2u);  // sigmoid(-3) < 0.5
  EXPECT_NEAR(boxes[0].x_min, 0.2f, 1e-6);
  EXPECT_NEAR(boxes[0].y_min, 0.1f, 1e-6);
  EXPECT_NEAR(boxes[0].x_max, 0.6f, 1e-6);
  EXPECT_NEAR(boxes[0].y_max, 0.3f, 1e-6);
  EXPECT_NEAR(boxes[0].score, 1 / (1 + std::exp(-2.0f)), 1e-6);
  EXPECT_NEAR(boxes[1].y_min, 0.2f, 1e-6);  // centre 0.4, height 0.4
  EXPECT_NEAR(boxes[1].y_max, 0.6f, 1e-6);
  EXPECT_NEAR(boxes[1].x_min, 0.2f, 1e-6);
  EXPECT_NEAR(boxes[1].score, 0.5f, 1e-6);
}

TEST(BoxDecodingTest, TinyDecodesCellsAndAnchors) {
  // A 2×2 grid, all scores low but cell (row 1, col 0), anchor 2 (2.882459 × 3.518061 cells).
  std::vector<float> grid(2 * 2 * 25, -10);
  float* t = &grid[(1 * 2 + 0) * 25 + 2 * 5];
  t[0] = t[1] = t[2] = t[3] = 0;
  t[4] = 1;
  const std::vector<ScoredBox> boxes = DecodeTiny(grid, 2, 0.5f);
  ASSERT_EQ(boxes.size(), 1u);
  EXPECT_NEAR((boxes[0].x_min + boxes[0].x_max) / 2, 0.5f / 2, 1e-6);  // (0 + 0.5) / 2
  EXPECT_NEAR((boxes[0].y_min + boxes[0].y_max) / 2, 1.5f / 2, 1e-6);
  EXPECT_NEAR(boxes[0].x_max - boxes[0].x_min, 2.882459f / 2, 1e-6);
  EXPECT_NEAR(boxes[0].y_max - boxes[0].y_min, 3.518061f / 2, 1e-6);
  EXPECT_NEAR(boxes[0].score, 1 / (1 + std::exp(-1.0f)), 1e-6);
}

TEST(BoxDecodingTest, NmsKeepsTheBestOfEachOverlappingGroup) {
  const std::vector<ScoredBox> boxes = {
      {20, 20, 30, 30, 0.7f},  // apart
      {1, 0, 11, 10, 0.8f},    // IoU 9/11 with the best: suppressed
      {0, 0, 10, 10, 0.9f},
      {5, 0, 15, 10, 0.6f},    // IoU 1/3 with the best: kept at 0.5, not at 0.3
      {22, 20, 32, 30, 0.7f},  // a tie with the first, overlapping it: the earlier wins
  };
  auto scores = [](const std::vector<ScoredBox>& kept) {
    std::vector<float> s;
    for (const ScoredBox& b : kept) s.push_back(b.score);
    return s;
  };
  const std::vector<ScoredBox> half = NonMaxSuppression(boxes, 0.5f, 100);
  EXPECT_THAT(scores(half), testing::ElementsAre(0.9f, 0.7f, 0.6f));
  EXPECT_EQ(half[1].x_min, 20);
  EXPECT_THAT(scores(NonMaxSuppression(boxes, 0.3f, 100)), testing::ElementsAre(0.9f, 0.7f));
  EXPECT_THAT(scores(NonMaxSuppression(boxes, 0.5f, 2)), testing::ElementsAre(0.9f, 0.7f));
  EXPECT_THAT(NonMaxSuppression({}, 0.5f, 10), testing::IsEmpty());
  // Empty boxes overlap nothing.
  EXPECT_EQ(detect::Iou(ScoredBox{0, 0, 0, 10, 1}, ScoredBox{0, 0, 0, 10, 1}), 0);
}

TEST(FivePointsTest, EyeCentresNoseTipAndMouthCorners) {
  std::array<image::Point, 68> points;
  for (int i = 0; i < 68; ++i) points[i] = {float(i), float(100 + i)};
  const std::array<image::Point, 5> five = FivePointsFrom68(points);
  EXPECT_FLOAT_EQ(five[0].x, 38.5f);  // mean of 36..41
  EXPECT_FLOAT_EQ(five[0].y, 138.5f);
  EXPECT_FLOAT_EQ(five[1].x, 44.5f);  // mean of 42..47
  EXPECT_FLOAT_EQ(five[2].x, 30);
  EXPECT_FLOAT_EQ(five[3].x, 48);
  EXPECT_FLOAT_EQ(five[4].x, 54);
  EXPECT_FLOAT_EQ(five[4].y, 154);
}

// ---- The networks against the numpy reference (tests/reference/detect_ref.py) ---------------

// make_detect_refs.py's output (a ctest fixture): per case, the reference's input and raw
// outputs, and the detections face-api's post-processing keeps.
const fs::path kRefs = ARCFACE_DETECT_REFS;

std::vector<float> ReadFloats(const std::string& name, const std::vector<int64_t>& shape) {
  const std::string bytes = ReadAll(kRefs / (name + ".f32"));
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  EXPECT_EQ(bytes.size(), static_cast<size_t>(n) * sizeof(float)) << name;
  std::vector<float> values(bytes.size() / sizeof(float));
  std::memcpy(values.data(), bytes.data(), values.size() * sizeof(float));
  return values;
}

// Largest difference relative to the reference's largest magnitude, and the cosine.
struct Agreement {
  double max_relative, cosine;
};

Agreement Compare(const torch::Tensor& ours, const std::vector<float>& ref) {
  const torch::Tensor a = ours.to(torch::kCPU).to(torch::kFloat64).flatten();
  const torch::Tensor b = torch::tensor(at::ArrayRef<float>(ref)).to(torch::kFloat64);
  EXPECT_EQ(a.numel(), b.numel());
  return {((a - b).abs().max() / b.abs().max()).item<double>(),
          (a.dot(b) / (a.norm() * b.norm())).item<double>()};
}

class ReferenceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    index_ = nlohmann::json::parse(ReadAll(kRefs / "index.json"), nullptr, false);
    auto load = [](const char* net) {
      const fs::path manifest = kModels / (std::string(net) + "_model-weights_manifest.json");
      absl::StatusOr<model::TfjsWeights> w = model::TfjsWeights::Load(manifest.string());
      EXPECT_TRUE(w.ok()) << w.status();
      return w.ok() ? std::move(*w) : model::TfjsWeights();
    };
    auto made = [](auto net) {
      EXPECT_TRUE(net.ok()) << net.status();
      return net.ok() ? std::move(*net) : nullptr;
    };
    ssd_ = made(SsdMobilenetV1::Create(load("ssd_mobilenetv1"), torch::kCPU));
    tiny_ = made(TinyFaceDetector::Create(load("tiny_face_detector"), torch::kCPU));
    landmarks_ = made(Landmark68Net::Create(load("face_landmark_68"), torch::kCPU));
  }
  void SetUp() override {
    ASSERT_NE(ssd_, nullptr);
    ASSERT_NE(tiny_, nullptr);
    ASSERT_NE(landmarks_, nullptr);
  }
  static void TearDownTestSuite() {
    ssd_.reset();
    tiny_.reset();
    landmarks_.reset();
  }

  // The cases of `net`; fails when there are none (the fixture did not run).
  static std::vector<nlohmann::json> Cases(const std::string& net) {
    std::vector<nlohmann::json> cases;
    if (index_.is_object()) {
      for (const auto& c : index_["cases"]) {
        if (c["net"] == net) cases.push_back(c);
      }
    }
    EXPECT_FALSE(cases.empty()) << "no " << net << " cases in " << kRefs / "index.json"
                                << ": ctest runs make_detect_refs.py first (detect_refs)";
    return cases;
  }

  static torch::Tensor Input(const nlohmann::json& c) {
    const std::vector<int64_t> shape = c["input"];
    const std::vector<float> values = ReadFloats(c["case"].get<std::string>() + ".input", shape);
    return torch::tensor(at::ArrayRef<float>(values)).reshape(shape).unsqueeze(0);
  }

  static void ExpectAgrees(const nlohmann::json& c, const std::string& output,
                           const torch::Tensor& ours, double max_relative = 1e-4) {
    const std::vector<float> ref =
        ReadFloats(c["case"].get<std::string>() + "." + output, c["outputs"][output]);
    const Agreement agreement = Compare(ours, ref);
    EXPECT_LE(agreement.max_relative, max_relative) << c["case"] << " " << output;
    EXPECT_GE(agreement.cosine, 0.99999) << c["case"] << " " << output;
    std::cout << c["case"].get<std::string>() << " " << output << ": max relative difference "
              << agreement.max_relative << ", cosine " << agreement.cosine << "\n";
  }

  static void ExpectSameDetections(const nlohmann::json& c, const std::vector<ScoredBox>& ours) {
    const std::vector<float> scores = c["det_scores"];
    const std::vector<std::vector<float>> boxes = c["det_boxes"];
    ASSERT_EQ(ours.size(), scores.size()) << c["case"];
    for (size_t i = 0; i < ours.size(); ++i) {
      EXPECT_NEAR(ours[i].score, scores[i], 1e-4) << c["case"] << " detection " << i;
      EXPECT_NEAR(ours[i].x_min, boxes[i][0], 1e-4) << c["case"] << " detection " << i;
      EXPECT_NEAR(ours[i].y_min, boxes[i][1], 1e-4) << c["case"] << " detection " << i;
      EXPECT_NEAR(ours[i].x_max, boxes[i][2], 1e-4) << c["case"] << " detection " << i;
      EXPECT_NEAR(ours[i].y_max, boxes[i][3], 1e-4) << c["case"] << " detection " << i;
    }
  }

  static nlohmann::json index_;
  static std::unique_ptr<SsdMobilenetV1> ssd_;
  static std::unique_ptr<TinyFaceDetector> tiny_;
  static std::unique_ptr<Landmark68Net> landmarks_;
};

nlohmann::json ReferenceTest::index_;
std::unique_ptr<SsdMobilenetV1> ReferenceTest::ssd_;
std::unique_ptr<TinyFaceDetector> ReferenceTest::tiny_;
std::unique_ptr<Landmark68Net> ReferenceTest::landmarks_;

TEST_F(ReferenceTest, SsdMobilenetV1EqualsTheReference) {
  c10::InferenceMode inference;
  for (const nlohmann::json& c : Cases("ssd")) {
    const SsdMobilenetV1::Output out = ssd_->Forward(Input(c));
    ExpectAgrees(c, "box_encodings", out.box_encodings);
    ExpectAgrees(c, "class_logits", out.class_logits);
    const torch::Tensor encodings = out.box_encodings.contiguous();
    const torch::Tensor logits = out.class_logits.contiguous();
    ExpectSameDetections(
        c, NonMaxSuppression(
               DecodeSsd({encodings.data_ptr<float>(), size_t(encodings.numel())},
                         {logits.data_ptr<float>(), size_t(logits.numel())}, ssd_->priors(), 0.5f),
               kSsdIouThreshold, 100));
  }
}

TEST_F(ReferenceTest, TinyFaceDetectorEqualsTheReference) {
  c10::InferenceMode inference;
  for (const nlohmann::json& c : Cases("tiny")) {
    const torch::Tensor grid = tiny_->Forward(Input(c)).contiguous();
    ExpectAgrees(c, "grid", grid);
    ExpectSameDetections(
        c, NonMaxSuppression(
               DecodeTiny({grid.data_ptr<float>(), size_t(grid.numel())}, int(grid.size(1)), 0.5f),
               kTinyIouThreshold, 1000));
  }
}

// Both BlazeFaces: raw outputs within 1e-5 of the reference's largest magnitude (the reference
// interprets the graph's nodes, the C++ hand-writes the architecture), the same detections.
TEST_F(ReferenceTest, BlazeFaceBothRangesEqualTheReference) {
  c10::InferenceMode inference;
  using Case = std::tuple<std::string, std::string, BlazeFace::Range>;
  for (const auto& [net, file, range] :
       std::vector<Case>{{"blazeface", "blazeface-back.json", BlazeFace::Range::kFull},
                         {"blazeface_front", "blazeface-front.json", BlazeFace::Range::kShort}}) {
    absl::StatusOr<model::TfjsWeights> weights =
        model::TfjsWeights::Load((kCandidates / file).string());
    ASSERT_TRUE(weights.ok()) << weights.status()
                              << " (run deploy/fetch-models.sh --candidates, or configure with "
                                 "-DARCFACE_CANDIDATE_MODELS=<folder>)";
    absl::StatusOr<std::unique_ptr<BlazeFace>> blaze =
        BlazeFace::Create(*weights, range, torch::kCPU);
    ASSERT_TRUE(blaze.ok()) << blaze.status();
    const std::vector<nlohmann::json> cases = Cases(net);
    EXPECT_EQ(cases.size(), 3u) << net;
    for (const nlohmann::json& c : cases) {
      const std::vector<int64_t> shape = c["input"];
      ASSERT_EQ(shape[0], (*blaze)->input_size());
      const std::vector<float> input = ReadFloats(c["case"].get<std::string>() + ".input", shape);
      const BlazeFace::Output out =
          (*blaze)->Forward(torch::tensor(at::ArrayRef<float>(input)).reshape(shape).unsqueeze(0));
      ExpectAgrees(c, "logits", out.logits, 1e-5);
      ExpectAgrees(c, "regressors", out.regressors, 1e-5);
      const torch::Tensor logits = out.logits.contiguous();
      const torch::Tensor regressors = out.regressors.contiguous();
      ExpectSameDetections(
          c, NonMaxSuppression(
                 DecodeBlazeFace({logits.data_ptr<float>(), size_t(logits.numel())},
                                 {regressors.data_ptr<float>(), size_t(regressors.numel())},
                                 (*blaze)->anchors(), (*blaze)->input_size(), 0.5f),
                 kBlazeFaceIouThreshold, 100));
    }
  }
}

// The graph's tensors are anonymous: another model's file must still be refused by name.
TEST(BlazeFaceTest, RefusesTheOtherRangesFile) {
  absl::StatusOr<model::TfjsWeights> front =
      model::TfjsWeights::Load((kCandidates / "blazeface-front.json").string());
  ASSERT_TRUE(front.ok()) << front.status();
  absl::Status wrong = BlazeFace::Create(*front, BlazeFace::Range::kFull, torch::kCPU).status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong.message(), HasSubstr("unknown_7"));
}

// Through FaceDetector (boxes from BlazeFace, the five points from landmark68): multi_face's
// five faces, each box overlapping SSD's for the same face, each landmark inside its box.
TEST(BlazeFaceTest, FindsTheFiveFacesOfMultiFace) {
  DetectorConfig config;
  config.model_dir = kModels.string();
  config.candidate_model_dir = kCandidates.string();
  config.detector = "blazeface";
  absl::StatusOr<std::unique_ptr<FaceDetector>> blaze = FaceDetector::Create(config);
  ASSERT_TRUE(blaze.ok()) << blaze.status();
  EXPECT_EQ((*blaze)->description().input_size, 256);
  std::unique_ptr<FaceDetector> ssd = MakeDetector("ssd_mobilenetv1");
  ASSERT_NE(ssd, nullptr);
  const cv::Mat rgb = Photo("multi_face.jpg");
  auto detect = [&](FaceDetector& d) {
    absl::StatusOr<PreparedFrame> frame = d.Prepare(rgb, DetectFilter());
    EXPECT_TRUE(frame.ok()) << frame.status();
    const PreparedFrame* batch[] = {&*frame};
    absl::StatusOr<std::vector<std::vector<DetectedBox>>> faces = d.Detect(batch);
    EXPECT_TRUE(faces.ok()) << faces.status();
    return faces.ok() ? (*faces)[0] : std::vector<DetectedBox>();
  };
  const std::vector<DetectedBox> ours = detect(**blaze), theirs = detect(*ssd);
  ASSERT_EQ(ours.size(), 5u);
  ASSERT_EQ(theirs.size(), 5u);
  for (const DetectedBox& f : ours) {
    float best = 0;
    for (const DetectedBox& g : theirs) best = std::max(best, Iou(f.box, g.box));
    EXPECT_GE(best, 0.5) << "score " << f.score;
    for (const image::Point& p : f.landmarks) {
      EXPECT_GE(p.x, f.box.x_min);
      EXPECT_LE(p.x, f.box.x_max);
      EXPECT_GE(p.y, f.box.y_min);
      EXPECT_LE(p.y, f.box.y_max);
    }
  }
}

TEST_F(ReferenceTest, Landmark68EqualsTheReference) {
  c10::InferenceMode inference;
  const std::vector<nlohmann::json> cases = Cases("landmark68");
  EXPECT_EQ(cases.size(), 6u);  // multi_face's five faces and single_face's one
  // One batch of all the crops, as Detect runs them.
  std::vector<torch::Tensor> inputs;
  for (const nlohmann::json& c : cases) inputs.push_back(Input(c));
  const torch::Tensor out = landmarks_->Forward(torch::cat(inputs));
  for (size_t i = 0; i < cases.size(); ++i) ExpectAgrees(cases[i], "output", out[i]);
}

// ---- Create on bad configurations and files -----------------------------------------------

class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/face_detector_test_XXXXXX";
    path_ = mkdtemp(name);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// A copy of face-api's files for the two networks a detector reads.
void CopyModels(const fs::path& to, const std::string& detector) {
  for (const std::string& net : {detector, std::string("face_landmark_68")}) {
    for (const char* suffix : {"_model-weights_manifest.json", "_model.bin"}) {
      fs::copy_file(kModels / (net + suffix), to / (net + suffix));
    }
  }
}

absl::Status CreateFrom(const fs::path& dir, const std::string& detector = "ssd_mobilenetv1") {
  DetectorConfig config;
  config.model_dir = dir.string();
  config.detector = detector;
  return FaceDetector::Create(config).status();
}

TEST(FaceDetectorCreateTest, MissingFilesAreNamed) {
  TempDir dir;
  absl::Status empty = CreateFrom(dir.path());
  EXPECT_EQ(empty.code(), absl::StatusCode::kNotFound) << empty;
  EXPECT_THAT(empty.message(), HasSubstr("ssd_mobilenetv1_model-weights_manifest.json"));

  CopyModels(dir.path(), "ssd_mobilenetv1");
  fs::remove(dir.path() / "face_landmark_68_model.bin");
  absl::Status no_shard = CreateFrom(dir.path());
  EXPECT_EQ(no_shard.code(), absl::StatusCode::kNotFound) << no_shard;
  EXPECT_THAT(no_shard.message(), HasSubstr("face_landmark_68_model.bin"));
}

TEST(FaceDetectorCreateTest, MalformedFilesAreNamed) {
  {
    TempDir dir;
    CopyModels(dir.path(), "tiny_face_detector");
    fs::resize_file(dir.path() / "tiny_face_detector_model.bin",
                    fs::file_size(dir.path() / "tiny_face_detector_model.bin") - 7);
    absl::Status truncated = CreateFrom(dir.path(), "tiny_face_detector");
    EXPECT_EQ(truncated.code(), absl::StatusCode::kInvalidArgument) << truncated;
    EXPECT_THAT(truncated.message(), HasSubstr("tiny_face_detector_model"));
  }
  {
    // A tensor of another shape (the same number of values): named with its file.
    TempDir dir;
    CopyModels(dir.path(), "ssd_mobilenetv1");
    const fs::path manifest = dir.path() / "face_landmark_68_model-weights_manifest.json";
    std::string text = ReadAll(manifest);
    const size_t at = text.find("\"fc/weights\",\"shape\":[256,136]");
    ASSERT_NE(at, std::string::npos) << "face-api's manifest changed";
    text.replace(text.find("[256,136]", at), 9, "[136,256]");
    std::ofstream(manifest, std::ios::binary) << text;
    absl::Status reshaped = CreateFrom(dir.path());
    EXPECT_EQ(reshaped.code(), absl::StatusCode::kInvalidArgument) << reshaped;
    EXPECT_THAT(reshaped.message(), HasSubstr("face_landmark_68_model-weights_manifest.json"));
    EXPECT_THAT(reshaped.message(), HasSubstr("fc/weights"));
  }
  {
    // A network's file in place of the other's: the missing tensor is named.
    TempDir dir;
    CopyModels(dir.path(), "tiny_face_detector");
    for (const char* suffix : {"_model-weights_manifest.json", "_model.bin"}) {
      fs::copy_file(dir.path() / (std::string("tiny_face_detector") + suffix),
                    dir.path() / (std::string("ssd_mobilenetv1") + suffix));
    }
    absl::Status wrong = CreateFrom(dir.path());
    EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument) << wrong;
    EXPECT_THAT(wrong.message(), HasSubstr("MobilenetV1/Conv2d_0_pointwise/weights"));
  }
}

TEST(FaceDetectorCreateTest, BadConfigurationsAreRefused) {
  DetectorConfig config;
  config.model_dir = kModels.string();
  auto refused = [&](const char* what) {
    absl::Status s = FaceDetector::Create(config).status();
    EXPECT_FALSE(s.ok());
    EXPECT_THAT(s.message(), HasSubstr(what));
  };
  config.detector = "retinaface";
  refused("unknown detector 'retinaface'");
  config.detector = "blazeface";
  config.input_size = 128;
  refused("only 256");
  config.detector = "ssd_mobilenetv1";
  config.input_size = 416;
  refused("only 512");
  config.detector = "tiny_face_detector";
  config.input_size = 400;
  refused("multiple of 32");
  config.input_size = 0;
  config.max_faces_per_frame = 0;
  refused("max_faces_per_frame");
  config.max_faces_per_frame = 10;
  config.device = "tpu";
  refused("unknown device 'tpu'");
  config.device = "cuda:x";
  refused("bad CUDA device index");
  if (torch::cuda::device_count() == 0) {
    config.device = "cuda";
    refused("device 'cuda': ");  // no device visible, or a build without CUDA
    config.device = "auto";
    config.max_faces_per_frame = 5;
    absl::StatusOr<std::unique_ptr<FaceDetector>> automatic = FaceDetector::Create(config);
    ASSERT_TRUE(automatic.ok()) << automatic.status();
    EXPECT_EQ((*automatic)->description().device, "cpu");
    EXPECT_EQ((*automatic)->description().max_faces_per_frame, 5);
  }
}

// The same frames on the GPU as on the CPU (skipped without one). cuDNN may convolve in TF32:
// boxes and landmarks within 1% of the face's size, scores within 0.01.
TEST(FaceDetectorCudaTest, FindsTheSameFacesAsTheCpu) {
  if (torch::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  DetectorConfig config;
  config.model_dir = kModels.string();
  config.device = "cuda";
  absl::StatusOr<std::unique_ptr<FaceDetector>> gpu = FaceDetector::Create(config);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ((*gpu)->description().device, "cuda:0");
  std::unique_ptr<FaceDetector> cpu = MakeDetector("ssd_mobilenetv1");
  ASSERT_NE(cpu, nullptr);
  const cv::Mat multi = Photo("multi_face.jpg");
  std::vector<PreparedFrame> frames;
  for (const cv::Mat& rgb : {multi, Photo("single_face.jpg"), Scaled(multi, 0.5)}) {
    frames.push_back(*cpu->Prepare(rgb, DetectFilter()));
  }
  const std::vector<const PreparedFrame*> batch = {&frames[0], &frames[1], &frames[2]};
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> on_gpu = (*gpu)->Detect(batch);
  absl::StatusOr<std::vector<std::vector<DetectedBox>>> on_cpu = cpu->Detect(batch);
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
  for (size_t f = 0; f < batch.size(); ++f) {
    const std::vector<DetectedBox>& a = (*on_gpu)[f];
    const std::vector<DetectedBox>& b = (*on_cpu)[f];
    ASSERT_EQ(a.size(), b.size()) << "frame " << f;
    for (size_t i = 0; i < a.size(); ++i) {
      const float tolerance = 0.01f * (b[i].box.x_max - b[i].box.x_min);
      EXPECT_NEAR(a[i].score, b[i].score, 0.01);
      EXPECT_NEAR(a[i].box.x_min, b[i].box.x_min, tolerance);
      EXPECT_NEAR(a[i].box.y_max, b[i].box.y_max, tolerance);
      for (size_t k = 0; k < 5; ++k) {
        EXPECT_NEAR(a[i].landmarks[k].x, b[i].landmarks[k].x, tolerance);
        EXPECT_NEAR(a[i].landmarks[k].y, b[i].landmarks[k].y, tolerance);
      }
    }
  }
}

}  // namespace
}  // namespace arcface::detect
