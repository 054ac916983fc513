// The dlib chip template (model::kDlibChip) checked against dlib's own chip geometry, and how
// close our five-point dlib chip (image::AlignFace with model::kDlibChip) comes to dlib's own
// 68-point chip (extract_image_chip(get_face_chip_details(shape, 150, 0.25))), on dlib's
// examples/faces photos with their 68 labelled landmarks (ARCFACE_DLIB_DATA): the pixels of the
// two chips, where dlib's chip puts our five points, and the trained descriptor of both chips
// (face-api's face_recognition_model, ARCFACE_DETECTOR_MODELS). Both chips start from the same
// decoded pixels (OpenCV's).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include <dlib/data_io.h>
#include <dlib/image_processing/full_object_detection.h>
#include <dlib/image_transforms.h>
#include <dlib/matrix.h>
#include <dlib/pixel.h>
#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "server/engine/engine.h"
#include "server/image/image.h"
#include "server/model/checkpoint.h"
#include "server/model/shapes.h"

namespace arcface {
namespace {

const std::string kDlibData = ARCFACE_DLIB_DATA;
const std::string kDlibHeader = ARCFACE_DLIB_INTERPOLATION_H;
const std::string kModels = ARCFACE_DETECTOR_MODELS;
constexpr int kSize = model::kDlibChip.size;

struct Face {
  std::string what;
  cv::Mat rgb;                          // the photo (shared between the photo's faces)
  dlib::full_object_detection shape;    // 68 parts
  std::array<image::Point, 5> five;     // our five points, from the 68
};

std::vector<Face> LoadFaces() {
  std::vector<Face> faces;
  for (const char* file : {"training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"}) {
    const std::string folder = kDlibData + "/faces/";
    dlib::image_dataset_metadata::dataset data;
    dlib::image_dataset_metadata::load_image_dataset_metadata(data, folder + file);
    for (const auto& image : data.images) {
      cv::Mat bgr = cv::imread(folder + image.filename, cv::IMREAD_COLOR);
      EXPECT_FALSE(bgr.empty()) << folder + image.filename;
      if (bgr.empty()) continue;
      cv::Mat rgb;
      cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
      for (const auto& box : image.boxes) {
        if (box.ignore || box.parts.size() != 68) continue;
        std::vector<dlib::point> parts(68);
        for (const auto& [name, p] : box.parts) parts[std::stoi(name)] = p;
        Face face{image.filename + " box at " + std::to_string(box.rect.left()) + "," +
                      std::to_string(box.rect.top()),
                  rgb, dlib::full_object_detection(box.rect, parts), {}};
        auto mean = [&](int from, int to) {
          double x = 0, y = 0;
          for (int i = from; i <= to; ++i) x += parts[i].x(), y += parts[i].y();
          return image::Point{float(x / (to - from + 1)), float(y / (to - from + 1))};
        };
        face.five = {mean(36, 41), mean(42, 47), mean(30, 30), mean(48, 48), mean(54, 54)};
        faces.push_back(std::move(face));
      }
    }
  }
  return faces;
}

std::vector<uint8_t> DlibChip(const Face& face, const dlib::chip_details& details) {
  dlib::matrix<dlib::rgb_pixel> img(face.rgb.rows, face.rgb.cols);
  for (int r = 0; r < face.rgb.rows; ++r) {
    for (int c = 0; c < face.rgb.cols; ++c) {
      const cv::Vec3b& p = face.rgb.at<cv::Vec3b>(r, c);
      img(r, c) = dlib::rgb_pixel(p[0], p[1], p[2]);
    }
  }
  dlib::matrix<dlib::rgb_pixel> chip;
  dlib::extract_image_chip(img, details, chip);
  std::vector<uint8_t> out;
  for (long r = 0; r < chip.nr(); ++r) {
    for (long c = 0; c < chip.nc(); ++c) {
      out.insert(out.end(), {chip(r, c).red, chip(r, c).green, chip(r, c).blue});
    }
  }
  return out;
}

// dlib's mean face shape, points 17..67 in [0, 1], read from the header that dlib compiles
// (mean_face_shape_x/y inside get_face_chip_details), so that the check below trusts no copy.
std::vector<dlib::dpoint> DlibMeanFace() {
  std::ifstream in(kDlibHeader);
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  auto values = [&](const std::string& name) {
    std::smatch m;
    EXPECT_TRUE(std::regex_search(text, m, std::regex(name + R"(\[\]\s*=\s*\{([^}]*)\})")))
        << name << " not found in " << kDlibHeader;
    std::vector<double> out;
    const std::string list = m[1];
    const std::regex number(R"([-0-9.eE]+)");
    for (auto it = std::sregex_iterator(list.begin(), list.end(), number);
         it != std::sregex_iterator(); ++it) {
      out.push_back(std::stod(it->str()));
    }
    return out;
  };
  const std::vector<double> x = values("mean_face_shape_x"), y = values("mean_face_shape_y");
  EXPECT_EQ(x.size(), 51u);
  EXPECT_EQ(y.size(), 51u);
  std::vector<dlib::dpoint> shape;
  for (size_t i = 0; i < std::min(x.size(), y.size()); ++i) shape.emplace_back(x[i], y[i]);
  return shape;
}

// Where the template's derivation (shapes.h) says dlib's chip puts a mean-face point q, at s
// image pixels per chip pixel.
dlib::dpoint DerivedChipPoint(const dlib::dpoint& q, double s) {
  const double f = 149 * s / (150 * s - 1);
  return dlib::dpoint(74.5 + f * (q.x() - 75), 74.5 + f * (q.y() - 75));
}

// The template's derivation, checked against dlib itself: a face that is exactly dlib's mean
// face under a similarity (scale s, a rotation, a shift) makes dlib's fit exact, so dlib's chip
// must put each of our five points where the derivation says, and at s = 1 on kDlibChip.
TEST(DlibChip, TemplateIsWhereDlibsChipPutsTheMeanFace) {
  const std::vector<dlib::dpoint> mean = DlibMeanFace();
  ASSERT_EQ(mean.size(), 51u);
  auto q_of = [&](int i) {  // i in 17..67 (dlib's vector expressions must not outlive a line)
    return dlib::dpoint((0.25 + mean[i - 17].x()) / 1.5 * kSize,
                        (0.25 + mean[i - 17].y()) / 1.5 * kSize);
  };
  auto five_of = [](const std::vector<dlib::dpoint>& p) {  // our five points from 68
    auto avg = [&](int from, int to) {
      double x = 0, y = 0;
      for (int i = from; i <= to; ++i) x += p[i].x(), y += p[i].y();
      return dlib::dpoint(x / (to - from + 1), y / (to - from + 1));
    };
    return std::array<dlib::dpoint, 5>{avg(36, 41), avg(42, 47), p[30], p[48], p[54]};
  };
  std::vector<dlib::dpoint> q(68, dlib::dpoint(0, 0));
  for (int i = 17; i < 68; ++i) q[i] = q_of(i);
  const std::array<dlib::dpoint, 5> q5 = five_of(q);
  const std::array<image::Point, 5> tmpl = image::Template(model::kDlibChip);
  for (int i = 0; i < 5; ++i) {  // the constants are the derivation at s = 1
    const dlib::dpoint want = DerivedChipPoint(q5[i], 1.0);
    EXPECT_NEAR(tmpl[i].x, want.x(), 1e-4) << "point " << i;
    EXPECT_NEAR(tmpl[i].y, want.y(), 1e-4) << "point " << i;
  }

  for (double s : {1.0, 0.36, 2.5, 300.0}) {
    const double angle = 0.3;
    auto to_image = [&](const dlib::dpoint& p) {
      return dlib::dpoint(400.25 + s * (std::cos(angle) * p.x() - std::sin(angle) * p.y()),
                          230.5 + s * (std::sin(angle) * p.x() + std::cos(angle) * p.y()));
    };
    std::vector<dlib::dpoint> image_points(68, dlib::dpoint(0, 0));
    for (int i = 17; i < 68; ++i) image_points[i] = to_image(q[i]);
    dlib::chip_details details;
    double tolerance;
    if (s > 100) {
      // dlib's own get_face_chip_details, whose landmarks are whole pixels: at this scale
      // rounding them moves the chip by under 0.5 / s px.
      std::vector<dlib::point> parts(68, dlib::point(0, 0));  // 0..16 are not used by dlib
      for (int i = 17; i < 68; ++i) {
        parts[i] = dlib::point(std::lround(image_points[i].x()), std::lround(image_points[i].y()));
        image_points[i] = dlib::dpoint(parts[i]);
      }
      const dlib::full_object_detection det(dlib::rectangle(0, 0, 1, 1), parts);
      details = dlib::get_face_chip_details(det, kSize, 0.25);
      tolerance = 0.01;
    } else {
      // The chip get_face_chip_details builds, from exact points (it takes whole pixels only):
      // the same chip_details constructor with its from-points, all of 17..67 (on an exact mean
      // face which of them dlib leaves out does not matter).
      std::vector<dlib::dpoint> from, to;
      for (int i = 17; i < 68; ++i) {
        from.push_back(q[i]);
        to.push_back(image_points[i]);
      }
      details = dlib::chip_details(from, to, dlib::chip_dims(kSize, kSize));
      tolerance = 1e-6;
    }
    const dlib::point_transform_affine to_chip = dlib::get_mapping_to_chip(details);
    const std::array<dlib::dpoint, 5> in_chip = five_of(image_points);
    for (int i = 0; i < 5; ++i) {
      const dlib::dpoint got = to_chip(in_chip[i]), want = DerivedChipPoint(q5[i], s);
      EXPECT_NEAR(got.x(), want.x(), tolerance) << "s " << s << " point " << i;
      EXPECT_NEAR(got.y(), want.y(), tolerance) << "s " << s << " point " << i;
      if (s == 1.0) {
        EXPECT_NEAR(got.x(), tmpl[i].x, 1e-4) << "point " << i;
        EXPECT_NEAR(got.y(), tmpl[i].y, 1e-4) << "point " << i;
      }
    }
  }
}

// Measured on the 43 labelled faces of dlib's examples/faces (Debian's libdlib19.1 19.24):
// dlib fits its chip to 33 of the 68 points (nose, eyes, upper lip; no jaw, brows, lower lip),
// we to five, so a face whose five points sit unlike the mean face's (a turned head moves the
// nose tip and one mouth corner) is placed differently: our five points land in dlib's chip
// 5.4 px from the template on average (at most 11.8 px; per point the mean offset is at most
// 4.1 px, so the template has no bias beyond that spread). Mean absolute pixel difference
// between the chips 10.7 (at most 23.7); the two chips' descriptors at cosine 0.9943 on average (at least 0.9765)
// and Euclidean distance 0.146 on average (at most 0.301), against dlib's same-person threshold
// of 0.6. The bounds below leave a margin over those.
TEST(DlibChip, FivePointChipIsCloseToDlibs68PointChip) {
  const std::vector<Face> faces = LoadFaces();
  ASSERT_EQ(faces.size(), 43u) << "dlib's examples/faces in " << kDlibData;

  absl::StatusOr<model::Checkpoint> checkpoint = model::LoadCheckpoint(kModels);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  absl::StatusOr<std::unique_ptr<engine::Engine>> engine =
      engine::Engine::Create(*checkpoint, engine::EngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();

  const std::array<image::Point, 5> tmpl = image::Template(model::kDlibChip);
  double sum_point = 0, max_point = 0, sum_pixel = 0, max_pixel = 0;
  double sum_cos = 0, min_cos = 1, sum_dist = 0, max_dist = 0;
  std::array<std::array<double, 2>, 5> bias{};  // mean signed offset of each point
  for (const Face& face : faces) {
    const dlib::chip_details details = dlib::get_face_chip_details(face.shape, kSize, 0.25);
    const std::vector<uint8_t> theirs = DlibChip(face, details);
    absl::StatusOr<image::Crop> ours = image::AlignFace(face.rgb, face.five, model::kDlibChip);
    ASSERT_TRUE(ours.ok()) << face.what << ": " << ours.status();
    ASSERT_EQ(theirs.size(), ours->size());

    // Where dlib's chip puts our five points.
    const dlib::point_transform_affine to_chip = dlib::get_mapping_to_chip(details);
    double point_error = 0;
    for (int i = 0; i < 5; ++i) {
      const dlib::dpoint p = to_chip(dlib::dpoint(face.five[i].x, face.five[i].y));
      point_error += std::hypot(p.x() - tmpl[i].x, p.y() - tmpl[i].y) / 5;
      bias[i][0] += (p.x() - tmpl[i].x) / double(faces.size());
      bias[i][1] += (p.y() - tmpl[i].y) / double(faces.size());
    }
    double pixel = 0;
    for (size_t i = 0; i < theirs.size(); ++i) pixel += std::abs(int(theirs[i]) - int((*ours)[i]));
    pixel /= double(theirs.size());

    std::vector<uint8_t> both(ours->begin(), ours->end());
    both.insert(both.end(), theirs.begin(), theirs.end());
    absl::StatusOr<engine::EmbeddingBatch> d = (*engine)->Run(both);
    ASSERT_TRUE(d.ok()) << d.status();
    const int dim = (*engine)->embedding_dim();
    double dot = 0, dist2 = 0;
    for (int k = 0; k < dim; ++k) {
      const double a = d->values[k], b = d->values[dim + k];
      dot += a * b;
      dist2 += (a - b) * (a - b);
    }
    const double cosine = dot / (d->norms[0] * d->norms[1]), dist = std::sqrt(dist2);

    sum_point += point_error;
    max_point = std::max(max_point, point_error);
    sum_pixel += pixel;
    max_pixel = std::max(max_pixel, pixel);
    sum_cos += cosine;
    min_cos = std::min(min_cos, cosine);
    sum_dist += dist;
    max_dist = std::max(max_dist, dist);
    EXPECT_LT(point_error, 16.0) << face.what;
    EXPECT_LT(pixel, 30.0) << face.what;
    EXPECT_GT(cosine, 0.96) << face.what;
    EXPECT_LT(dist, 0.4) << face.what;
  }
  const double n = double(faces.size());
  std::printf("dlib chip vs ours on %zu faces: five points %.3f px from the template (max %.3f); "
              "mean |pixel diff| %.3f (max %.3f); descriptor cosine %.5f (min %.5f), distance "
              "%.4f (max %.4f)\n",
              faces.size(), sum_point / n, max_point, sum_pixel / n, max_pixel, sum_cos / n,
              min_cos, sum_dist / n, max_dist);
  std::printf("mean offset of each point in dlib's chip (x, y px):");
  for (const auto& b : bias) std::printf(" (%+.2f, %+.2f)", b[0], b[1]);
  std::printf("\n");
  EXPECT_LT(sum_point / n, 7.0);
  EXPECT_LT(sum_pixel / n, 13.0);
  EXPECT_GT(sum_cos / n, 0.99);
  EXPECT_LT(sum_dist / n, 0.19);
  // No systematic error in the template: each point's mean offset is small beside the spread.
  for (const auto& b : bias) EXPECT_LT(std::hypot(b[0], b[1]), 6.0);
}

}  // namespace
}  // namespace arcface
