// `arcface-client eval ROOT`: how well the served model tells people apart on a folder of
// identity subfolders (eval_data.h: the images and pairs; eval_metrics.h: the figures).
// Each image gets one unit-length embedding from the server: the whole image as the crop
// (EmbedStream, as `embed` sends a file), or with --faces detect the largest face the server's
// detector finds (DetectStream with embed; --pad puts a black border around each image first);
// an image that fails, or shows no face, is reported and counted, and the pairs it is in are
// left out and counted. With --gallery the top-1 is measured again through the server's
// FaceGallery, in a scratch gallery that is emptied again.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>

#include <opencv2/imgcodecs.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "client/cli/eval_data.h"
#include "client/cli/eval_metrics.h"
#include "client/cli/plot.h"
#include "client/cli/progress.h"

namespace arcface::cli {
namespace {

using client::Client;

// Folds when pairs.txt does not give them (LFW's protocol: 10).
constexpr int kFolds = 10;
// The FARs whose TAR is reported; the first is marked on the ROC.
constexpr double kFars[] = {1e-3, 1e-2};

std::string CodeName(const absl::Status& s) { return absl::StatusCodeToString(s.code()); }

// One unit-length embedding per image of the set, or why there is none.
using Rows = std::vector<absl::StatusOr<std::vector<float>>>;

Rows EmbedWhole(Client& client, const EvalSet& set, absl::Status* stream) {
  std::vector<std::string> files;
  for (const EvalSet::Image& im : set.images) files.push_back(im.path);
  ProgressBar progress(static_cast<int64_t>(files.size()), ProgressWanted());
  std::vector<FileOutcome> outcomes;
  *stream = EmbedFiles(client, files, FaceOptions{}, /*normalize=*/true, progress, &outcomes);
  Rows rows;
  for (FileOutcome& o : outcomes) {
    if (o.embedding.ok()) {
      rows.emplace_back(std::move(o.embedding->values));
    } else {
      rows.emplace_back(o.embedding.status());
    }
  }
  return rows;
}

// The file as the detector gets it: its bytes, or with --pad its pixels inside the border.
absl::StatusOr<client::FaceInput> Frame(const std::string& path, double pad) {
  if (pad == 0) return client::FaceInput::FromFile(path);
  cv::Mat image;
  try {
    image = cv::imread(path, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {  // e.g. beyond OpenCV's pixel limit
    return absl::InvalidArgumentError(absl::StrCat(path, ": OpenCV cannot decode it: ", e.what()));
  }
  if (image.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not an image OpenCV can decode"));
  }
  absl::StatusOr<cv::Mat> padded = PadImage(image, pad);
  if (!padded.ok()) return padded.status();
  return client::FaceInput::FromMat(*padded, path);
}

Rows EmbedDetected(Client& client, const EvalSet& set, double pad, absl::Status* stream) {
  const size_t n = set.images.size();
  // Slot i is written by one thread only: the writer (an unreadable file) or the caller (the
  // answer); the stream has joined its writer when it returns.
  Rows rows(n, absl::UnknownError("not embedded"));
  ProgressBar progress(static_cast<int64_t>(n), ProgressWanted());
  std::atomic<int64_t> done{0};
  auto finished = [&](size_t i) {
    if (!rows[i].ok()) {
      progress.Print(absl::StrCat("error: ", set.images[i].path, ": ", CodeName(rows[i].status()),
                                  ": ", rows[i].status().message()));
    }
    progress.Update(++done);
  };
  size_t next_index = 0;  // only the writer thread touches it
  auto next = [&]() -> std::optional<client::FrameItem> {
    while (next_index < n) {
      const size_t i = next_index++;
      absl::StatusOr<client::FaceInput> frame = Frame(set.images[i].path, pad);
      if (frame.ok()) return client::FrameItem{*std::move(frame), static_cast<int64_t>(i)};
      rows[i] = frame.status();
      finished(i);
    }
    return std::nullopt;
  };
  auto on_result = [&](int64_t tag, absl::StatusOr<client::Detection> found) {
    if (!found.ok()) {
      rows[tag] = found.status();
    } else if (found->faces.empty()) {
      rows[tag] = absl::NotFoundError("the server's detector found no face");
    } else {
      auto area = [](const client::DetectedFace& f) {
        return (f.box.x_max - f.box.x_min) * (f.box.y_max - f.box.y_min);
      };
      const auto largest =
          std::max_element(found->faces.begin(), found->faces.end(),
                           [&](const auto& a, const auto& b) { return area(a) < area(b); });
      if (largest->embedding) {
        rows[tag] = std::move(largest->embedding->values);
      } else {
        rows[tag] = absl::InternalError("Detect with embed answered a face without an embedding");
      }
    }
    finished(tag);
  };
  client::DetectOptions detect;
  detect.embed = true;
  detect.normalize = true;
  *stream = client.DetectStream(next, detect, on_result);
  progress.Finish();
  return rows;
}

// Refuses a gallery that holds faces: eval forgets everything it enrolled, so it must not mix
// with faces it did not enrol. A gallery that does not exist yet is fine.
absl::Status CheckScratchGallery(Client& client, const std::string& gallery) {
  absl::StatusOr<arcface::v1::GalleryInfo> info = client.GetGalleryInfo(gallery);
  if (info.status().code() == absl::StatusCode::kNotFound) return absl::OkStatus();
  if (!info.ok()) return info.status();
  if (info->num_faces() == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "gallery '%s' already holds %d faces of %d subjects; eval enrols into a scratch gallery "
      "and forgets all it enrolled at the end: name an unused gallery",
      gallery, info->num_faces(), info->num_subjects()));
}

// Top-1 through FaceGallery: every embedded image enrolled under its subject; then for each
// image whose subject has another: Forget that face, Identify it, Enroll it back. At the end
// every subject enrolled is forgotten again (also after an error). The embeddings are enrolled
// as `model_id`'s, so that a new gallery binds to the model eval measures, not the default.
absl::StatusOr<Top1Result> GalleryTop1(Client& client, const std::string& gallery,
                                       const std::string& model_id, const EvalSet& set,
                                       const Rows& rows) {
  std::map<int, std::vector<size_t>> images_of;  // subject -> its embedded images
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].ok()) images_of[set.images[i].subject].push_back(i);
  }
  std::vector<std::string> face_id(rows.size());
  std::vector<std::string> enrolled;  // subjects to forget at the end
  auto enroll = [&](int subject, const std::vector<size_t>& images) -> absl::Status {
    std::vector<client::Probe> probes;
    for (size_t i : images) probes.emplace_back(*rows[i]);
    client::EnrollOptions options;
    options.model_id = model_id;
    absl::StatusOr<arcface::v1::EnrollResponse> r =
        client.Enroll(gallery, set.subjects[subject], probes, options);
    if (!r.ok()) return r.status();
    for (size_t k = 0; k < images.size(); ++k) face_id[images[k]] = r->face_ids(k);
    return absl::OkStatus();
  };
  auto measure = [&]() -> absl::StatusOr<Top1Result> {
    Top1Result out;
    for (const auto& [subject, images] : images_of) {
      enrolled.push_back(set.subjects[subject]);
      if (absl::Status s = enroll(subject, images); !s.ok()) return s;
    }
    int64_t embedded = 0;
    for (const auto& [subject, images] : images_of) embedded += images.size();
    ProgressBar progress(embedded, ProgressWanted());
    int64_t done = 0;
    for (const auto& [subject, images] : images_of) {
      for (size_t i : images) {
        progress.Update(++done);
        if (images.size() < 2) {
          ++out.skipped;
          continue;
        }
        const std::string& name = set.subjects[subject];
        absl::StatusOr<arcface::v1::ForgetResponse> forgot =
            client.Forget(gallery, name, {face_id[i]});
        if (!forgot.ok()) return forgot.status();
        // Closed-set rank 1: the best candidate whatever its similarity (-1: no cut; the
        // server's default would cut at the model's verification threshold).
        absl::StatusOr<arcface::v1::IdentifyResponse> found =
            client.Identify(gallery, {client::Probe(*rows[i])}, /*top_k=*/1, /*threshold=*/-1.0f);
        if (!found.ok()) return found.status();
        const auto& candidates = found->results(0).candidates();
        ++out.probes;
        out.correct += !candidates.empty() && candidates[0].subject_id() == name;
        if (absl::Status s = enroll(subject, {i}); !s.ok()) return s;
      }
    }
    progress.Finish();
    return out;
  };
  absl::StatusOr<Top1Result> result = measure();
  for (const std::string& subject : enrolled) {
    absl::StatusOr<arcface::v1::ForgetResponse> r = client.Forget(gallery, subject);
    if (!r.ok() && r.status().code() != absl::StatusCode::kNotFound) {
      std::fprintf(stderr, "arcface-client: eval: could not forget '%s' in gallery '%s': %s\n",
                   subject.c_str(), gallery.c_str(), std::string(r.status().message()).c_str());
      if (result.ok()) result = r.status();
    }
  }
  return result;
}

// "lfw" for "data/lfw" and "data/lfw/".
std::string FolderName(const std::string& root) {
  const std::filesystem::path path(root);
  return (path.has_filename() ? path : path.parent_path()).filename().string();
}

nlohmann::json Top1Json(const Top1Result& t) {
  return {{"rate", t.rate()}, {"correct", t.correct}, {"probes", t.probes}, {"skipped", t.skipped}};
}

std::string Top1Text(const Top1Result& t) {
  return absl::StrFormat("%.4f (%d of %d; %d skipped: alone in their identity)", t.rate(),
                         t.correct, t.probes, t.skipped);
}

}  // namespace

int RunEval(const CommonOptions& common, const EvalOptions& options) {
  absl::StatusOr<EvalSet> set = options.pairs.empty()
                                    ? AllPairs(options.root, kFolds)
                                    : PairsFromFile(options.root, options.pairs, kFolds);
  if (!set.ok()) {
    std::fprintf(stderr, "arcface-client: eval: %s\n", std::string(set.status().message()).c_str());
    return kExitUsage;
  }
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) return Fail("eval", info.status());
  NoteDemo(*info);
  if (!options.gallery.empty()) {
    if (absl::Status s = CheckScratchGallery(**client, options.gallery); !s.ok()) {
      return Fail(absl::StrCat("eval --gallery ", options.gallery), s);
    }
  }

  absl::Status stream;
  const Rows rows =
      options.detect ? EmbedDetected(**client, *set, options.pad, &stream)
                     : EmbedWhole(**client, *set, &stream);
  if (!stream.ok()) return Fail("eval", stream);
  std::vector<FailedInput> failed;
  std::vector<std::vector<float>> unit;
  std::vector<int> subjects;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].ok()) {
      unit.push_back(*rows[i]);
      subjects.push_back(set->images[i].subject);
    } else {
      failed.push_back({set->images[i].path, CodeName(rows[i].status()),
                        std::string(rows[i].status().message())});
    }
  }

  std::vector<ScoredPair> pairs;
  int64_t skipped_pairs = 0;
  for (const EvalSet::Pair& p : set->pairs) {
    if (!rows[p.a].ok() || !rows[p.b].ok()) {
      ++skipped_pairs;
      continue;
    }
    pairs.push_back({Dot(*rows[p.a], *rows[p.b]), p.same, p.fold});
  }
  absl::StatusOr<VerificationResult> verification = KFoldVerification(pairs, set->folds);
  absl::StatusOr<double> auc = RocAuc(pairs);
  if (!verification.ok() || !auc.ok()) {
    const absl::Status& why = verification.ok() ? auc.status() : verification.status();
    std::fprintf(stderr,
                 "arcface-client: eval: %s among the %zu pairs whose images were both embedded "
                 "(%zu of %zu images failed)\n",
                 std::string(why.message()).c_str(), pairs.size(), failed.size(), rows.size());
    return kExitSomeFailed;
  }
  std::vector<TarAtFarResult> tars;
  for (double far : kFars) tars.push_back(TarAtFar(pairs, far));
  const Top1Result top1 = LeaveOneOutTop1(unit, subjects);
  std::optional<Top1Result> gallery_top1;
  if (!options.gallery.empty()) {
    absl::StatusOr<Top1Result> t =
        GalleryTop1(**client, options.gallery, info->model_id(), *set, rows);
    if (!t.ok()) return Fail(absl::StrCat("eval --gallery ", options.gallery), t.status());
    gallery_top1 = *t;
  }
  const int64_t same =
      std::count_if(pairs.begin(), pairs.end(), [](const ScoredPair& p) { return p.same; });
  const int64_t different = static_cast<int64_t>(pairs.size()) - same;
  const bool random = info->demo_weights();
  // What always answering the more common kind scores: the accuracy of knowing nothing.
  const double chance = double(std::max(same, different)) / double(pairs.size());

  if (!options.roc.empty()) {
    std::vector<std::pair<double, double>> curve;
    for (const RocPoint& p : RocCurve(pairs)) curve.emplace_back(p.far, p.tar);
    std::optional<RocMark> mark;
    std::string subtitle = random ? absl::StrCat(kRandomWeightsVerdict, " (demo weights)") : "";
    if (tars[0].reported) {
      mark = RocMark{tars[0].far, tars[0].tar,
                     absl::StrFormat("TAR %.4f at FAR %g", tars[0].tar, tars[0].far_target)};
    } else {
      absl::StrAppend(&subtitle, subtitle.empty() ? "" : "; ", "no FAR ",
                      absl::StrFormat("%g", tars[0].far_target), " point: ", tars[0].why_not);
    }
    const double far_min =
        std::max(1e-9, std::min(kFars[0], std::pow(10.0, std::floor(std::log10(1.0 / different)))));
    cv::Mat picture =
        DrawRoc(curve, mark, far_min,
                absl::StrFormat("ROC AUC %.4f: %s, %d pairs of %s", *auc, info->model_id(),
                                pairs.size(), FolderName(options.root)),
                subtitle);
    absl::Status s = WritePng(options.roc, picture);
    if (!s.ok()) return Fail("--roc", s);
    std::fprintf(stderr, "wrote %s\n", options.roc.c_str());
  }

  if (options.json) {
    nlohmann::json per_fold = nlohmann::json::array();
    for (const FoldResult& f : verification->folds) {
      per_fold.push_back(
          {{"accuracy", f.accuracy}, {"threshold", f.threshold}, {"pairs", f.pairs}});
    }
    nlohmann::json tar_json = nlohmann::json::array();
    for (const TarAtFarResult& t : tars) {
      nlohmann::json entry = {{"far", t.far_target}, {"reported", t.reported}};
      if (t.reported) {
        entry.update({{"tar", t.tar}, {"far_reached", t.far}, {"threshold", t.threshold}});
      } else {
        entry["reason"] = t.why_not;
      }
      tar_json.push_back(entry);
    }
    nlohmann::json errors = nlohmann::json::array();
    for (const FailedInput& f : failed) {
      errors.push_back({{"file", f.file}, {"code", f.code}, {"message", f.message}});
    }
    nlohmann::json doc = {{"root", options.root},
                          {"pairs_file", options.pairs.empty() ? nlohmann::json(nullptr)
                                                               : nlohmann::json(options.pairs)},
                          {"faces", options.detect ? "detect" : "whole"},
                          {"pad", options.pad},
                          {"model_id", info->model_id()},
                          {"random_weights", random},
                          {"identities", set->subjects.size()},
                          {"images", rows.size()},
                          {"images_failed", failed.size()},
                          {"errors", errors},
                          {"pairs",
                           {{"total", set->pairs.size()},
                            {"same", same},
                            {"different", different},
                            {"skipped", skipped_pairs}}},
                          {"accuracy",
                           {{"folds", set->folds},
                            {"mean", verification->accuracy_mean},
                            {"std", verification->accuracy_std},
                            {"threshold_mean", verification->threshold_mean},
                            {"chance", chance},
                            {"per_fold", per_fold}}},
                          {"roc_auc", *auc},
                          {"tar_at_far", tar_json},
                          {"top1", Top1Json(top1)}};
    if (gallery_top1) {
      doc["gallery_top1"] = Top1Json(*gallery_top1);
      doc["gallery_top1"]["gallery"] = options.gallery;
    }
    PrintJson(doc);
  } else {
    std::vector<std::vector<std::string>> table = {
        {"MEASURE", "VALUE"},
        {"model", absl::StrCat(info->model_id(), random ? " (random demo weights)" : "")},
        {"faces", !options.detect ? "whole (each image as the crop)"
                  : options.pad > 0
                      ? absl::StrFormat("detect (the largest face; padded by %g)", options.pad)
                      : "detect (the largest face)"},
        {"pairs from", options.pairs.empty() ? "every pair of images" : options.pairs},
        {"identities", absl::StrCat(set->subjects.size())},
        {"images", absl::StrFormat("%d (%d failed)", rows.size(), failed.size())},
        {"pairs", absl::StrFormat("%d (%d same, %d different; %d skipped: an image failed)",
                                  pairs.size(), same, different, skipped_pairs)},
        {"accuracy",
         absl::StrFormat("%.4f +- %.4f (%d-fold; mean threshold %.4f; always '%s': %.4f)",
                         verification->accuracy_mean, verification->accuracy_std, set->folds,
                         verification->threshold_mean, same > different ? "same" : "different",
                         chance)},
        {"ROC AUC", absl::StrFormat("%.4f", *auc)}};
    for (const TarAtFarResult& t : tars) {
      table.push_back({absl::StrFormat("TAR at FAR %g", t.far_target),
                       t.reported ? absl::StrFormat("%.4f (threshold %.4f, FAR %.5f)", t.tar,
                                                    t.threshold, t.far)
                                  : absl::StrCat("not reported: ", t.why_not)});
    }
    table.push_back({"top-1 (leave-one-out)", Top1Text(top1)});
    if (gallery_top1) {
      table.push_back(
          {absl::StrCat("top-1 (gallery ", options.gallery, ")"), Top1Text(*gallery_top1)});
    }
    std::cout << FormatTable(table);
    if (random) {
      std::cout << "(" << kRandomWeightsVerdict
                << ": these figures say nothing of a trained model)\n";
    }
  }
  return failed.empty() ? kExitOk : kExitSomeFailed;
}

}  // namespace arcface::cli
