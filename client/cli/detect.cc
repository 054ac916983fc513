// `arcface-client detect IMAGE`: the faces the server's detector (Detect) finds in one image:
// boxes, scores and the five landmarks; with --embed their embeddings and pairwise cosines,
// with --gallery who they are (said to come from random weights when the server runs its demo
// weights); --json for programs, --plot for people.
#include <cstdio>
#include <iostream>

#include <opencv2/imgcodecs.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/cli/commands.h"
#include "client/cli/plot.h"

namespace arcface::cli {
namespace {

std::string Point(const cv::Point2f& p) { return absl::StrFormat("%.1f,%.1f", p.x, p.y); }

nlohmann::json FaceJson(const client::DetectedFace& f) {
  nlohmann::json landmarks = nlohmann::json::array();
  for (const cv::Point2f& p : f.landmarks) landmarks.push_back({p.x, p.y});
  nlohmann::json out = {{"box", {f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max}},
                        {"score", f.score},
                        {"landmarks", landmarks}};
  if (f.embedding) out["embedding"] = {{"norm", f.embedding->norm}, {"values", f.embedding->values}};
  nlohmann::json candidates = nlohmann::json::array();
  for (const client::Candidate& c : f.candidates) {
    candidates.push_back(
        {{"subject_id", c.subject_id}, {"face_id", c.face_id}, {"similarity", c.similarity}});
  }
  out["candidates"] = candidates;
  return out;
}

// "1 0.99"; with a gallery "1 alice 0.87" (its best candidate's similarity), "1 ? 0.99" when
// no subject qualified (the detector's score then).
// A verdict from random weights says so: "1 alice 0.87 (random weights)".
std::string PlotLabel(size_t index, const client::DetectedFace& f, bool identified,
                      bool random_weights) {
  if (!identified) return absl::StrFormat("%d %.2f", index + 1, f.score);
  const std::string note = random_weights ? " (random weights)" : "";
  if (f.candidates.empty()) return absl::StrFormat("%d ? %.2f%s", index + 1, f.score, note);
  return absl::StrFormat("%d %s %.2f%s", index + 1, f.candidates.front().subject_id,
                         f.candidates.front().similarity, note);
}

}  // namespace

int RunDetect(const CommonOptions& common, const DetectOptions& options) {
  absl::StatusOr<client::FaceInput> frame = client::FaceInput::FromFile(options.image);
  if (!frame.ok()) return Fail(options.image, frame.status());
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<client::Detection> found = (*client)->Detect(*frame, options.request);
  if (!found.ok()) return Fail("detect", found.status());
  const bool identified = !options.request.gallery.empty();
  // Embeddings and identities come from the model: whether its weights are random.
  bool random_weights = false;
  if (options.request.embed || identified) {
    absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
    if (!info.ok()) return Fail("detect", info.status());
    NoteDemo(*info);
    random_weights = info->demo_weights();
  }

  // With embeddings, their pairwise cosines (the server's Compare of the embeddings as given).
  std::optional<client::CompareResult> cosines;
  if (found->faces.size() >= 2 && found->faces.front().embedding) {
    std::vector<client::Probe> probes;
    for (const client::DetectedFace& f : found->faces) probes.emplace_back(f.embedding->values);
    absl::StatusOr<client::CompareResult> r = (*client)->Compare(probes, probes);
    if (!r.ok()) return Fail("detect", r.status());
    cosines = *std::move(r);
  }

  if (options.json) {
    nlohmann::json faces = nlohmann::json::array();
    for (const client::DetectedFace& f : found->faces) faces.push_back(FaceJson(f));
    nlohmann::json doc = {{"image", options.image},
                          {"width", found->image_width},
                          {"height", found->image_height},
                          {"detector_id", found->detector_id},
                          {"model_id", found->model_id},
                          {"faces", faces}};
    if (identified) {
      doc["gallery"] = options.request.gallery;
      doc["threshold"] = found->threshold ? nlohmann::json(*found->threshold) : nullptr;
    }
    if (options.request.embed || identified) doc["random_weights"] = random_weights;
    PrintJson(doc);
  } else {
    std::cout << absl::StrFormat("%s: %dx%d, %d faces (%s)\n", options.image, found->image_width,
                                 found->image_height, found->faces.size(), found->detector_id);
    if (identified) {
      std::cout << absl::StrFormat(
          "identities in gallery '%s' (%s)\n", options.request.gallery,
          ThresholdNote(found->threshold.has_value(), found->threshold.value_or(0),
                        options.request.threshold.has_value()));
    }
    for (size_t i = 0; i < found->faces.size(); ++i) {
      const client::DetectedFace& f = found->faces[i];
      std::vector<std::string> points;
      for (const cv::Point2f& p : f.landmarks) points.push_back(Point(p));
      std::cout << absl::StrFormat(
          "face %d: box %.1f,%.1f,%.1f,%.1f (%.0fx%.0f)  score %.4f  landmarks %s\n", i + 1,
          f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max, f.box.x_max - f.box.x_min,
          f.box.y_max - f.box.y_min, f.score, absl::StrJoin(points, " "));
      if (f.embedding) {
        std::cout << "  embedding " << EmbeddingSummary(f.embedding->norm, f.embedding->values)
                  << "\n";
      }
      const std::string note =
          random_weights ? absl::StrCat("  (", kRandomWeightsVerdict, ")") : "";
      if (identified && f.candidates.empty()) std::cout << "  identity (no match)" << note << "\n";
      for (const client::Candidate& c : f.candidates) {
        std::cout << absl::StrFormat("  identity %s  similarity %.4f  face %s%s\n", c.subject_id,
                                     c.similarity, c.face_id, note);
      }
    }
    if (cosines) {
      std::cout << "cosine  ";
      for (int j = 0; j < cosines->cols; ++j) std::cout << absl::StrFormat("%7d", j + 1);
      std::cout << "\n";
      for (int i = 0; i < cosines->rows; ++i) {
        std::cout << absl::StrFormat("%6d  ", i + 1);
        for (int j = 0; j < cosines->cols; ++j) {
          std::cout << absl::StrFormat("%7.3f", cosines->at(i, j));
        }
        std::cout << "\n";
      }
    }
  }

  if (!options.plot.empty()) {
    // As the server sees it: the file's pixels, its EXIF orientation ignored.
    cv::Mat image;
    try {
      image = cv::imread(options.image, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
    } catch (const cv::Exception&) {
      image.release();
    }
    if (image.empty()) {
      return Fail("--plot", absl::InvalidArgumentError(absl::StrCat(
                                "OpenCV cannot decode ", options.image, " to draw on it")));
    }
    std::vector<DrawnFace> drawn;
    for (size_t i = 0; i < found->faces.size(); ++i) {
      const client::DetectedFace& f = found->faces[i];
      drawn.push_back(
          {cv::Rect2f(cv::Point2f(f.box.x_min, f.box.y_min), cv::Point2f(f.box.x_max, f.box.y_max)),
           f.landmarks, PlotLabel(i, f, identified, random_weights)});
    }
    absl::Status s = WritePng(options.plot, DrawDetections(image, drawn));
    if (!s.ok()) return Fail("--plot", s);
    std::fprintf(stderr, "wrote %s\n", options.plot.c_str());
  }
  return kExitOk;
}

}  // namespace arcface::cli
