#include "client/cli/eval_metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace arcface::cli {
namespace {

// Pairs grouped by equal score, ascending: each group's score and its counts of same-person
// and different-person pairs.
struct ScoreGroup {
  double score;
  int64_t same = 0;
  int64_t different = 0;
};

std::vector<ScoreGroup> Groups(const std::vector<ScoredPair>& pairs) {
  std::vector<std::pair<double, bool>> sorted;
  sorted.reserve(pairs.size());
  for (const ScoredPair& p : pairs) sorted.emplace_back(p.score, p.same);
  std::sort(sorted.begin(), sorted.end());
  std::vector<ScoreGroup> groups;
  for (const auto& [score, same] : sorted) {
    if (groups.empty() || groups.back().score != score) groups.push_back({score});
    (same ? groups.back().same : groups.back().different) += 1;
  }
  return groups;
}

void Count(const std::vector<ScoredPair>& pairs, int64_t* same, int64_t* different) {
  *same = std::count_if(pairs.begin(), pairs.end(), [](const ScoredPair& p) { return p.same; });
  *different = static_cast<int64_t>(pairs.size()) - *same;
}

absl::Status NeedBothKinds(int64_t same, int64_t different) {
  if (same == 0) return absl::InvalidArgumentError("no same-person pairs");
  if (different == 0) return absl::InvalidArgumentError("no different-person pairs");
  return absl::OkStatus();
}

}  // namespace

void AssignFolds(std::vector<ScoredPair>* pairs, int folds) {
  int64_t same = 0, different = 0;
  for (ScoredPair& p : *pairs) p.fold = static_cast<int>((p.same ? same++ : different++) % folds);
}

absl::StatusOr<double> RocAuc(const std::vector<ScoredPair>& pairs) {
  int64_t same = 0, different = 0;
  Count(pairs, &same, &different);
  if (absl::Status s = NeedBothKinds(same, different); !s.ok()) return s;
  // Twice the Mann-Whitney U, in integers: each same-person pair beats the different-person
  // pairs below it (2 each) and ties with those of its own score (1 each).
  int64_t twice_u = 0;
  int64_t different_below = 0;
  for (const ScoreGroup& g : Groups(pairs)) {
    twice_u += g.same * (2 * different_below + g.different);
    different_below += g.different;
  }
  return static_cast<double>(twice_u) / (2.0 * double(same) * double(different));
}

std::vector<RocPoint> RocCurve(const std::vector<ScoredPair>& pairs) {
  int64_t same = 0, different = 0;
  Count(pairs, &same, &different);
  if (!NeedBothKinds(same, different).ok()) return {};
  std::vector<ScoreGroup> groups = Groups(pairs);
  std::vector<RocPoint> curve;
  curve.push_back({0, 0, std::nextafter(groups.back().score, HUGE_VAL)});
  int64_t tp = 0, fp = 0;
  for (auto g = groups.rbegin(); g != groups.rend(); ++g) {
    tp += g->same;
    fp += g->different;
    curve.push_back({double(fp) / double(different), double(tp) / double(same), g->score});
  }
  return curve;
}

TarAtFarResult TarAtFar(const std::vector<ScoredPair>& pairs, double far_target) {
  TarAtFarResult out;
  out.far_target = far_target;
  out.needed = std::llround(1.0 / far_target);
  int64_t same = 0, different = 0;
  Count(pairs, &same, &different);
  if (different < out.needed) {
    out.why_not = absl::StrFormat("%d different-person pairs; FAR %g needs at least %d", different,
                                  far_target, out.needed);
    return out;
  }
  if (same == 0) {
    out.why_not = "no same-person pairs";
    return out;
  }
  // The curve's FAR only grows as the threshold falls: the last point within the target.
  for (const RocPoint& p : RocCurve(pairs)) {
    if (p.far > far_target) break;
    out.tar = p.tar;
    out.far = p.far;
    out.threshold = p.threshold;
  }
  out.reported = true;
  return out;
}

double BestThreshold(const std::vector<ScoredPair>& pairs, int64_t* correct) {
  std::vector<ScoreGroup> groups = Groups(pairs);
  int64_t same = 0, different = 0;
  Count(pairs, &same, &different);
  if (groups.empty()) {
    if (correct) *correct = 0;
    return 0;
  }
  // Below every score all pairs are accepted: the same-person ones are right.
  double best = std::nextafter(groups.front().score, -HUGE_VAL);
  int64_t best_correct = same;
  int64_t right = same;
  for (size_t i = 0; i < groups.size(); ++i) {
    // The threshold moves above group i: its same-person pairs turn wrong, the others right.
    right += groups[i].different - groups[i].same;
    if (right > best_correct) {
      best_correct = right;
      best = i + 1 < groups.size() ? (groups[i].score + groups[i + 1].score) / 2
                                   : std::nextafter(groups[i].score, HUGE_VAL);
    }
  }
  if (correct) *correct = best_correct;
  return best;
}

absl::StatusOr<VerificationResult> KFoldVerification(const std::vector<ScoredPair>& pairs,
                                                     int folds) {
  if (folds < 2) return absl::InvalidArgumentError("at least 2 folds are needed");
  int64_t same = 0, different = 0;
  Count(pairs, &same, &different);
  if (absl::Status s = NeedBothKinds(same, different); !s.ok()) return s;
  VerificationResult out;
  for (int k = 0; k < folds; ++k) {
    std::vector<ScoredPair> train, test;
    for (const ScoredPair& p : pairs) {
      if (p.fold < 0 || p.fold >= folds) {
        return absl::InvalidArgumentError(absl::StrCat("a pair in fold ", p.fold, " of ", folds));
      }
      (p.fold == k ? test : train).push_back(p);
    }
    if (test.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "fold ", k + 1, " of ", folds, " has no pairs (", pairs.size(), " pairs in all)"));
    }
    FoldResult fold;
    fold.threshold = BestThreshold(train);
    int64_t right = 0;
    for (const ScoredPair& p : test) right += (p.score >= fold.threshold) == p.same;
    fold.pairs = static_cast<int64_t>(test.size());
    fold.accuracy = double(right) / double(test.size());
    out.folds.push_back(fold);
  }
  for (const FoldResult& f : out.folds) {
    out.accuracy_mean += f.accuracy;
    out.threshold_mean += f.threshold;
  }
  out.accuracy_mean /= folds;
  out.threshold_mean /= folds;
  double squares = 0;
  for (const FoldResult& f : out.folds) {
    squares += (f.accuracy - out.accuracy_mean) * (f.accuracy - out.accuracy_mean);
  }
  out.accuracy_std = std::sqrt(squares / folds);
  return out;
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) sum += double(a[i]) * double(b[i]);
  return sum;
}

Top1Result LeaveOneOutTop1(const std::vector<std::vector<float>>& unit_rows,
                           const std::vector<int>& subjects) {
  Top1Result out;
  const size_t n = unit_rows.size();
  std::map<int, int64_t> images_of;
  for (int s : subjects) ++images_of[s];
  for (size_t i = 0; i < n; ++i) {
    if (images_of[subjects[i]] < 2) {
      ++out.skipped;
      continue;
    }
    size_t nearest = n;
    double best = -std::numeric_limits<double>::infinity();
    for (size_t j = 0; j < n; ++j) {
      if (j == i) continue;
      const double d = Dot(unit_rows[i], unit_rows[j]);
      if (d > best) {
        best = d;
        nearest = j;
      }
    }
    ++out.probes;
    out.correct += subjects[nearest] == subjects[i];
  }
  return out;
}

}  // namespace arcface::cli
