#include "client/cli/eval_data.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <opencv2/core.hpp>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/cli/output.h"

namespace arcface::cli {
namespace fs = std::filesystem;
namespace {

absl::Status NotAFolder(const std::string& root) {
  std::error_code ec;
  if (!fs::exists(root, ec)) return absl::NotFoundError(absl::StrCat(root, ": no such folder"));
  if (!fs::is_directory(root, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(root, ": not a folder (LFW's layout: ROOT/<person>/<image files>)"));
  }
  return absl::OkStatus();
}

// The image files of ROOT/<name>, sorted (empty when it is no folder).
std::vector<std::string> ImagesOf(const std::string& root, const std::string& name) {
  const std::string dir = (fs::path(root) / name).string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return {};
  std::vector<std::string> missing;
  return CollectInputFiles({dir}, &missing);
}

// Enough to measure anything: two identities, a same-person and a different-person pair.
absl::Status CheckUsable(const EvalSet& set, const std::string& what) {
  if (set.subjects.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what,
        " has no identity subfolders with image files (LFW's layout: ROOT/<person>/<image "
        "files>)"));
  }
  if (set.subjects.size() == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has one identity (", set.subjects[0], "): eval needs at least two"));
  }
  const auto same = std::count_if(set.pairs.begin(), set.pairs.end(),
                                  [](const EvalSet::Pair& p) { return p.same; });
  if (same == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has no same-person pair: no identity with two images"));
  }
  if (same == static_cast<long>(set.pairs.size())) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has no different-person pair"));
  }
  return absl::OkStatus();
}

void RoundRobinFolds(EvalSet* set, int folds) {
  set->folds = folds;
  int same = 0, different = 0;
  for (EvalSet::Pair& p : set->pairs) p.fold = (p.same ? same++ : different++) % folds;
}

}  // namespace

absl::StatusOr<PairsText> ParsePairsText(const std::string& text, const std::string& name) {
  PairsText out;
  std::istringstream in(text);
  std::string line;
  int number = 0;
  int64_t expected = -1;
  auto error = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(name, " line ", number, ": ", why));
  };
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::vector<std::string> words =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (words.empty()) continue;
    if (expected < 0) {  // the header
      int a = 0, b = 0;
      if (words.size() == 1 && absl::SimpleAtoi(words[0], &a) && a > 0) {
        expected = 2 * int64_t{a};
      } else if (words.size() == 2 && absl::SimpleAtoi(words[0], &a) &&
                 absl::SimpleAtoi(words[1], &b) && a > 0 && b > 0) {
        out.folds = a;
        out.pairs_per_fold = b;
        expected = 2 * int64_t{a} * b;
      } else {
        return error(
            absl::StrCat("expected the header \"FOLDS PAIRS_PER_FOLD\" (LFW: \"10 300\") "
                         "or a pair count, got \"",
                         line, "\""));
      }
      continue;
    }
    PairLine pair;
    pair.line = number;
    auto index = [&](const std::string& word, int* value) {
      return absl::SimpleAtoi(word, value) && *value >= 1;
    };
    if (words.size() == 3 && index(words[1], &pair.index_a) && index(words[2], &pair.index_b)) {
      pair.name_a = pair.name_b = words[0];
    } else if (words.size() == 4 && index(words[1], &pair.index_a) &&
               index(words[3], &pair.index_b)) {
      pair.name_a = words[0];
      pair.name_b = words[2];
    } else {
      return error(
          absl::StrCat("expected \"NAME I J\" or \"NAME1 I NAME2 J\" (image numbers "
                       "from 1), got \"",
                       line, "\""));
    }
    out.pairs.push_back(std::move(pair));
  }
  if (expected < 0) return absl::InvalidArgumentError(absl::StrCat(name, ": empty"));
  if (static_cast<int64_t>(out.pairs.size()) != expected) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": its header promises ", expected,
                                                   " pairs, it has ", out.pairs.size()));
  }
  return out;
}

absl::StatusOr<EvalSet> AllPairs(const std::string& root, int folds) {
  if (absl::Status s = NotAFolder(root); !s.ok()) return s;
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_directory(ec)) names.push_back(it->path().filename().string());
  }
  if (ec) return absl::PermissionDeniedError(absl::StrCat(root, ": ", ec.message()));
  std::sort(names.begin(), names.end());
  EvalSet set;
  for (const std::string& name : names) {
    std::vector<std::string> files = ImagesOf(root, name);
    if (files.empty()) continue;  // not an identity
    const int subject = static_cast<int>(set.subjects.size());
    set.subjects.push_back(name);
    for (std::string& f : files) set.images.push_back({std::move(f), subject});
  }
  const int n = static_cast<int>(set.images.size());
  for (int a = 0; a < n; ++a) {
    for (int b = a + 1; b < n; ++b) {
      set.pairs.push_back({a, b, set.images[a].subject == set.images[b].subject, 0});
    }
  }
  RoundRobinFolds(&set, folds);
  if (absl::Status s = CheckUsable(set, root); !s.ok()) return s;
  return set;
}

absl::StatusOr<EvalSet> PairsFromFile(const std::string& root, const std::string& pairs_path,
                                      int folds) {
  if (absl::Status s = NotAFolder(root); !s.ok()) return s;
  std::ifstream file(pairs_path);
  if (!file) return absl::NotFoundError(absl::StrCat(pairs_path, ": cannot read it"));
  std::stringstream text;
  text << file.rdbuf();
  absl::StatusOr<PairsText> parsed = ParsePairsText(text.str(), pairs_path);
  if (!parsed.ok()) return parsed.status();

  EvalSet set;
  std::map<std::string, int> subject_of;                    // name -> index into set.subjects
  std::map<std::string, std::vector<std::string>> listing;  // name -> its image files
  std::map<std::string, int> image_of;                      // path -> index into set.images
  // The image's index in set.images, added on first sight.
  auto image = [&](const std::string& name, int index, int line) -> absl::StatusOr<int> {
    const fs::path lfw = fs::path(root) / name / absl::StrFormat("%s_%04d.jpg", name, index);
    std::error_code ec;
    std::string path;
    if (fs::is_regular_file(lfw, ec)) {
      path = lfw.string();
    } else {
      auto [it, fresh] = listing.try_emplace(name);
      if (fresh) it->second = ImagesOf(root, name);
      if (index > static_cast<int>(it->second.size())) {
        return absl::NotFoundError(absl::StrFormat(
            "%s line %d: image %d of %s: no file %s, and %s has %d image files", pairs_path, line,
            index, name, lfw.string(), (fs::path(root) / name).string(), it->second.size()));
      }
      path = it->second[index - 1];
    }
    auto [s, new_subject] = subject_of.try_emplace(name, static_cast<int>(set.subjects.size()));
    if (new_subject) set.subjects.push_back(name);
    auto [i, new_image] = image_of.try_emplace(path, static_cast<int>(set.images.size()));
    if (new_image) set.images.push_back({path, s->second});
    return i->second;
  };
  for (const PairLine& line : parsed->pairs) {
    absl::StatusOr<int> a = image(line.name_a, line.index_a, line.line);
    if (!a.ok()) return a.status();
    absl::StatusOr<int> b = image(line.name_b, line.index_b, line.line);
    if (!b.ok()) return b.status();
    set.pairs.push_back({*a, *b, line.name_a == line.name_b, 0});
  }
  if (parsed->folds > 0) {
    set.folds = parsed->folds;
    for (size_t k = 0; k < set.pairs.size(); ++k) {
      set.pairs[k].fold = static_cast<int>(k / (2 * size_t(parsed->pairs_per_fold)));
    }
  } else {
    RoundRobinFolds(&set, folds);
  }
  if (absl::Status s = CheckUsable(set, pairs_path); !s.ok()) return s;
  return set;
}

absl::StatusOr<cv::Mat> PadImage(const cv::Mat& image, double fraction) {
  if (image.empty()) return absl::InvalidArgumentError("--pad: empty image");
  if (!(fraction >= 0 && fraction <= kMaxPad)) {  // also NaN
    return absl::InvalidArgumentError(absl::StrFormat(
        "--pad %g: not a fraction of the image's size in [0, %g]", fraction, kMaxPad));
  }
  const int x = static_cast<int>(std::lround(fraction * image.cols));
  const int y = static_cast<int>(std::lround(fraction * image.rows));
  cv::Mat padded;
  cv::copyMakeBorder(image, padded, y, y, x, x, cv::BORDER_CONSTANT, cv::Scalar::all(0));
  return padded;
}

}  // namespace arcface::cli
