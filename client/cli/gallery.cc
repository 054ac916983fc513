// `arcface-client gallery enroll|identify|forget|list` (commands.h has the contract).
#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "client/cli/commands.h"
#include "client/cli/progress.h"

namespace arcface::cli {
namespace {

using client::Client;
using client::Probe;

std::string CodeName(const absl::Status& s) { return absl::StatusCodeToString(s.code()); }

std::string GalleryName(const GalleryOptions& g) {
  return g.gallery.empty() ? "default" : g.gallery;
}

nlohmann::json ErrorsJson(const std::vector<FailedInput>& failed) {
  nlohmann::json out = nlohmann::json::array();
  for (const FailedInput& f : failed) {
    out.push_back({{"file", f.file}, {"code", f.code}, {"message", f.message}});
  }
  return out;
}

// The face or probe an INVALID_ARGUMENT names by its index in the list sent ("Enroll: faces 7
// (a.jpg): undecodable image"), if it names one below `count`.
std::optional<size_t> NamedIndex(const absl::Status& status, const std::string& rpc,
                                 const std::string& word, size_t count) {
  if (status.code() != absl::StatusCode::kInvalidArgument) return std::nullopt;
  absl::string_view message = status.message();
  if (!absl::ConsumePrefix(&message, absl::StrCat(rpc, ": ", word, " "))) return std::nullopt;
  size_t end = 0;
  while (end < message.size() && absl::ascii_isdigit(message[end])) ++end;
  size_t index = 0;
  if (!absl::SimpleAtoi(message.substr(0, end), &index) || index >= count) return std::nullopt;
  return index;
}

// The files in requests of at most `per_request` (0: all in one), loaded as FaceOptions say,
// with a progress bar. `call` sends one request's probes; an INVALID_ARGUMENT naming one of
// them drops that file (reported, in `failed`) and sends the rest again. Another error ends the
// run: it is returned, and what was done so far stays done.
absl::Status ForEachRequest(
    const std::vector<std::string>& files, const FaceOptions& face_options, size_t per_request,
    const std::string& rpc, const std::string& word, std::vector<FailedInput>* failed,
    const std::function<absl::Status(const std::vector<std::string>& names,
                                     const std::vector<Probe>& probes)>& call) {
  ProgressBar progress(static_cast<int64_t>(files.size()), ProgressWanted());
  auto fail = [&](const std::string& file, const absl::Status& s) {
    progress.Print(absl::StrCat("error: ", file, ": ", CodeName(s), ": ", s.message()));
    failed->push_back({file, CodeName(s), std::string(s.message())});
  };
  if (per_request == 0) per_request = std::max<size_t>(files.size(), 1);
  for (size_t begin = 0; begin < files.size(); begin += per_request) {
    const size_t end = std::min(files.size(), begin + per_request);
    std::vector<std::string> names;
    std::vector<Probe> probes;
    for (size_t i = begin; i < end; ++i) {
      absl::StatusOr<client::FaceInput> face = LoadFace(files[i], face_options);
      if (!face.ok()) {
        fail(files[i], face.status());
        continue;
      }
      names.push_back(files[i]);
      probes.emplace_back(*std::move(face));
    }
    while (!probes.empty()) {
      absl::Status s = call(names, probes);
      if (s.ok()) break;
      std::optional<size_t> bad = NamedIndex(s, rpc, word, probes.size());
      if (!bad) {
        progress.Finish();
        return s;
      }
      // Reported per file: "FILE: INVALID_ARGUMENT: undecodable image", without the index
      // within this request.
      absl::string_view reason = s.message();
      if (absl::ConsumePrefix(&reason,
                              absl::StrCat(rpc, ": ", word, " ", *bad, " (", names[*bad], ")"))) {
        absl::ConsumePrefix(&reason, ": ");
      }
      fail(names[*bad], absl::Status(s.code(), reason));
      names.erase(names.begin() + *bad);
      probes.erase(probes.begin() + *bad);
    }
    progress.Update(static_cast<int64_t>(end));
  }
  progress.Finish();
  return absl::OkStatus();
}

// The files of `inputs` (directories: recursively); the missing ones reported in `failed`.
std::vector<std::string> InputFiles(const std::vector<std::string>& inputs,
                                    std::vector<FailedInput>* failed) {
  std::vector<std::string> missing;
  std::vector<std::string> files = CollectInputFiles(inputs, &missing);
  for (const std::string& m : missing) {
    std::fprintf(stderr, "error: %s: NOT_FOUND: no such file or directory\n", m.c_str());
    failed->push_back({m, "NOT_FOUND", "no such file or directory"});
  }
  return files;
}

}  // namespace

int RunGalleryEnroll(const CommonOptions& common, const GalleryOptions& gallery,
                     const GalleryEnrollOptions& options) {
  std::vector<FailedInput> failed;
  const std::vector<std::string> files = InputFiles(options.inputs, &failed);
  const size_t missing = failed.size();
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) return Fail("gallery enroll", info.status());
  NoteDemo(*info);

  const absl::Time start = absl::Now();
  std::vector<std::pair<std::string, std::string>> enrolled;  // file, face id
  uint64_t version = 0;
  client::EnrollOptions enroll_options;
  enroll_options.labels = options.labels;
  absl::Status status = ForEachRequest(
      files, options.face, info->gallery().max_faces_per_enroll(), "Enroll", "faces", &failed,
      [&](const std::vector<std::string>& names, const std::vector<Probe>& probes) {
        absl::StatusOr<arcface::v1::EnrollResponse> r =
            (*client)->Enroll(gallery.gallery, options.subject, probes, enroll_options);
        if (!r.ok()) return r.status();
        for (size_t i = 0; i < names.size(); ++i) enrolled.emplace_back(names[i], r->face_ids(i));
        version = r->gallery_version();
        return absl::OkStatus();
      });

  if (gallery.json) {
    nlohmann::json faces = nlohmann::json::array();
    for (const auto& [file, id] : enrolled) faces.push_back({{"file", file}, {"face_id", id}});
    PrintJson({{"gallery", GalleryName(gallery)},
               {"subject_id", options.subject},
               {"gallery_version", version},
               {"faces", faces},
               {"errors", ErrorsJson(failed)}});
  } else if (!enrolled.empty()) {
    std::vector<std::vector<std::string>> rows = {{"FILE", "FACE_ID"}};
    for (const auto& [file, id] : enrolled) rows.push_back({file, id});
    std::cout << FormatTable(rows);
  }
  std::fprintf(stderr,
               "enrolled %zu of %zu files as '%s' in gallery '%s' (version %llu) in %.1f s\n",
               enrolled.size(), files.size() + missing, options.subject.c_str(),
               GalleryName(gallery).c_str(), static_cast<unsigned long long>(version),
               absl::ToDoubleSeconds(absl::Now() - start));
  if (!status.ok()) return Fail("gallery enroll", status);
  if (files.empty() && failed.empty()) {
    std::fprintf(stderr, "arcface-client: gallery enroll: no image files found\n");
    return kExitSomeFailed;
  }
  return failed.empty() ? kExitOk : kExitSomeFailed;
}

int RunGalleryIdentify(const CommonOptions& common, const GalleryOptions& gallery,
                       const GalleryIdentifyOptions& options) {
  std::vector<FailedInput> failed;
  const std::vector<std::string> files = InputFiles(options.inputs, &failed);
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) return Fail("gallery identify", info.status());
  NoteDemo(*info);

  std::vector<std::pair<std::string, arcface::v1::Identification>> results;
  arcface::v1::IdentifyResponse last;
  absl::Status status = ForEachRequest(
      files, options.face,
      std::min(info->gallery().max_probes_per_identify(), info->max_faces_per_request()),
      "Identify", "probes", &failed,
      [&](const std::vector<std::string>& names, const std::vector<Probe>& probes) {
        absl::StatusOr<arcface::v1::IdentifyResponse> r =
            (*client)->Identify(gallery.gallery, probes, options.top_k, options.threshold);
        if (!r.ok()) return r.status();
        for (size_t i = 0; i < names.size(); ++i) results.emplace_back(names[i], r->results(i));
        last = *std::move(r);
        return absl::OkStatus();
      });

  if (gallery.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& [file, identification] : results) {
      nlohmann::json candidates = nlohmann::json::array();
      for (const auto& c : identification.candidates()) {
        candidates.push_back({{"subject_id", c.subject_id()},
                              {"face_id", c.face_id()},
                              {"similarity", c.similarity()}});
      }
      out.push_back({{"file", file}, {"candidates", candidates}});
    }
    PrintJson({{"gallery", GalleryName(gallery)},
               {"model_id", last.model_id()},
               {"threshold", last.has_threshold() ? nlohmann::json(last.threshold()) : nullptr},
               {"random_weights", info->demo_weights()},
               {"gallery_version", last.gallery_version()},
               {"results", out},
               {"errors", ErrorsJson(failed)}});
  } else if (!results.empty()) {
    std::vector<std::vector<std::string>> rows = {
        {"FILE", "RANK", "SUBJECT", "SIMILARITY", "FACE_ID"}};
    for (const auto& [file, identification] : results) {
      if (identification.candidates().empty()) rows.push_back({file, "-", "(no match)", "", ""});
      int rank = 0;
      for (const auto& c : identification.candidates()) {
        rows.push_back({file, absl::StrCat(++rank), c.subject_id(),
                        absl::StrFormat("%.4f", c.similarity()), c.face_id()});
      }
    }
    std::cout << FormatTable(rows);
    if (info->demo_weights()) std::cout << "(" << kRandomWeightsVerdict << ")\n";
  }
  if (!results.empty()) {
    // The server's cut: --threshold, else the gallery's model's own.
    std::fprintf(
        stderr, "identified %zu files in gallery '%s' (%s)\n", results.size(),
        GalleryName(gallery).c_str(),
        ThresholdNote(last.has_threshold(), last.threshold(), options.threshold.has_value())
            .c_str());
  }
  if (!status.ok()) return Fail("gallery identify", status);
  return failed.empty() ? kExitOk : kExitSomeFailed;
}

int RunGalleryForget(const CommonOptions& common, const GalleryOptions& gallery,
                     const std::string& subject, const std::vector<std::string>& face_ids) {
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ForgetResponse> r =
      (*client)->Forget(gallery.gallery, subject, face_ids);
  if (!r.ok()) return Fail("gallery forget", r.status());
  if (gallery.json) {
    PrintJson({{"gallery", GalleryName(gallery)},
               {"subject_id", subject},
               {"faces_removed", r->faces_removed()},
               {"gallery_version", r->gallery_version()}});
  } else {
    std::cout << absl::StrFormat("removed %u faces of '%s' from gallery '%s' (version %u)\n",
                                 r->faces_removed(), subject, GalleryName(gallery),
                                 r->gallery_version());
  }
  return kExitOk;
}

int RunGalleryList(const CommonOptions& common, const GalleryOptions& gallery) {
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  std::vector<arcface::v1::Subject> subjects;
  std::string token;
  do {
    constexpr uint32_t kPageSize = 1000;  // the server's largest page
    absl::StatusOr<arcface::v1::ListSubjectsResponse> page =
        (*client)->ListSubjects(gallery.gallery, kPageSize, token);
    if (!page.ok()) return Fail("gallery list", page.status());
    for (auto& s : *page->mutable_subjects()) subjects.push_back(std::move(s));
    if (!page->next_page_token().empty() && page->next_page_token() == token) {
      return Fail("gallery list", absl::InternalError(absl::StrCat("page token '", token,
                                                                   "' answered with itself")));
    }
    token = page->next_page_token();
  } while (!token.empty());

  uint64_t faces = 0;
  for (const auto& s : subjects) faces += s.num_faces();
  // The proto's map has no order: labels are shown sorted by key.
  auto sorted_labels = [](const arcface::v1::Subject& s) {
    return std::map<std::string, std::string>(s.labels().begin(), s.labels().end());
  };
  if (gallery.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& s : subjects) {
      out.push_back({{"subject_id", s.subject_id()},
                     {"num_faces", s.num_faces()},
                     {"labels", sorted_labels(s)}});
    }
    PrintJson({{"gallery", GalleryName(gallery)}, {"subjects", out}});
  } else {
    std::vector<std::vector<std::string>> rows = {{"SUBJECT", "FACES", "LABELS"}};
    for (const auto& s : subjects) {
      rows.push_back({s.subject_id(), absl::StrCat(s.num_faces()),
                      absl::StrJoin(sorted_labels(s), ", ", absl::PairFormatter("="))});
    }
    std::cout << FormatTable(rows);
  }
  std::fprintf(stderr, "%zu subjects, %llu faces in gallery '%s'\n", subjects.size(),
               static_cast<unsigned long long>(faces), GalleryName(gallery).c_str());
  return kExitOk;
}

}  // namespace arcface::cli
