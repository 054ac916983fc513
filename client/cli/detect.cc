// `arcface-client detect IMAGE`: faces found by OpenCV's Haar cascade (Debian's opencv-data),
// each box embedded by the server (Face.box on the encoded image), their pairwise cosines.
#include <algorithm>
#include <filesystem>
#include <iostream>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/objdetect.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "client/cli/plot.h"

namespace arcface::cli {

namespace {

absl::StatusOr<std::vector<cv::Rect>> DetectFaces(const cv::Mat& image, const DetectOptions& o) {
  try {
    cv::CascadeClassifier cascade;
    if (!cascade.load(o.cascade)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--cascade: cannot load ", o.cascade, " (Debian: apt-get install opencv-data)"));
    }
    cv::Mat gray;
    cv::cvtColor(image, gray, cv::COLOR_BGR2GRAY);
    cv::equalizeHist(gray, gray);
    std::vector<cv::Rect> faces;
    cascade.detectMultiScale(gray, faces, 1.1, 5, 0, cv::Size(o.min_size, o.min_size));
    // Left to right, then top to bottom: a stable numbering for the printout and the picture.
    std::sort(faces.begin(), faces.end(), [](const cv::Rect& a, const cv::Rect& b) {
      return a.x != b.x ? a.x < b.x : a.y < b.y;
    });
    return faces;
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("OpenCV face detection failed: ", e.what()));
  }
}

}  // namespace

int RunDetect(const CommonOptions& common, const DetectOptions& options) {
  if (!std::filesystem::exists(options.cascade)) {
    std::fprintf(stderr, "arcface-client: --cascade: %s does not exist (Debian: apt-get install "
                 "opencv-data)\n", options.cascade.c_str());
    return kExitUsage;
  }
  absl::StatusOr<client::FaceInput> encoded = client::FaceInput::FromFile(options.image);
  if (!encoded.ok()) return Fail(options.image, encoded.status());
  cv::Mat image;
  try {
    image = cv::imread(options.image, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  } catch (const cv::Exception& e) {
    image.release();
  }
  if (image.empty()) {
    return Fail(options.image, absl::InvalidArgumentError("OpenCV cannot decode this image"));
  }
  absl::StatusOr<std::vector<cv::Rect>> boxes = DetectFaces(image, options);
  if (!boxes.ok()) return Fail("detect", boxes.status(), true);

  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  std::vector<client::FaceInput> faces;
  for (size_t i = 0; i < boxes->size(); ++i) {
    const cv::Rect& b = (*boxes)[i];
    client::FaceInput face = *encoded;  // the same encoded image, one box each
    face.WithBox({float(b.x), float(b.y), float(b.x + b.width), float(b.y + b.height)});
    faces.push_back(std::move(face));
  }
  std::vector<client::Embedding> embeddings;
  if (!faces.empty()) {
    absl::StatusOr<std::vector<client::Embedding>> e = (*client)->Embed(faces);
    if (!e.ok()) return Fail("detect", e.status());
    embeddings = std::move(*e);
  }

  std::cout << absl::StrFormat("%s: %dx%d, %d faces\n", options.image, image.cols, image.rows,
                               boxes->size());
  for (size_t i = 0; i < boxes->size(); ++i) {
    const cv::Rect& b = (*boxes)[i];
    std::cout << absl::StrFormat("face %d: box %d,%d,%d,%d (%dx%d)  norm %.3f\n", i + 1, b.x, b.y,
                                 b.x + b.width, b.y + b.height, b.width, b.height,
                                 embeddings[i].norm);
  }
  if (boxes->size() >= 2) {
    std::vector<client::Probe> probes;
    for (client::Embedding& e : embeddings) probes.emplace_back(e.values);
    absl::StatusOr<client::CompareResult> r = (*client)->Compare(probes, probes);
    if (!r.ok()) return Fail("detect", r.status());
    std::cout << "cosine  ";
    for (int j = 0; j < r->cols; ++j) std::cout << absl::StrFormat("%7d", j + 1);
    std::cout << "\n";
    for (int i = 0; i < r->rows; ++i) {
      std::cout << absl::StrFormat("%6d  ", i + 1);
      for (int j = 0; j < r->cols; ++j) std::cout << absl::StrFormat("%7.3f", r->at(i, j));
      std::cout << "\n";
    }
  }
  if (!options.plot.empty()) {
    cv::Mat picture = DrawDetections(image, *boxes);
    absl::Status s = WritePng(options.plot, picture);
    if (!s.ok()) return Fail("--plot", s);
    std::fprintf(stderr, "wrote %s\n", options.plot.c_str());
  }
  return kExitOk;
}

}  // namespace arcface::cli
