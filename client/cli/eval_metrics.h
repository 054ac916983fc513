// The figures of `arcface-client eval`: face verification and identification measured on
// scored pairs and embeddings (no I/O, no server).
//
// Contract
// - A pair is accepted as the same person when its score (cosine) >= the threshold; every
//   figure uses that one rule, so ties fall on the accepting side together.
// - RocAuc counts a tie between a same-person and a different-person pair as one half (the
//   Mann-Whitney U statistic): the exact area under the step ROC, with ties as its diagonal.
// - KFoldVerification: for each fold, the threshold that maximises accuracy on the other folds
//   (the lowest such threshold, among the midpoints between consecutive distinct scores and
//   just outside the extremes), tested on that fold; the standard deviation is the population
//   one (numpy's np.std, as LFW's published figures use).
// - TarAtFar: the highest TAR at a threshold whose FAR <= the target; only reported with at
//   least round(1 / target) different-person pairs (fewer cannot measure that FAR).
// - INVALID_ARGUMENT naming what is missing (no same-person pairs, an empty fold, ...).
// - Pure functions; thread-safe.
#ifndef ARCFACE_CLIENT_CLI_EVAL_METRICS_H_
#define ARCFACE_CLIENT_CLI_EVAL_METRICS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace arcface::cli {

struct ScoredPair {
  double score = 0;   // cosine similarity
  bool same = false;  // the same person
  int fold = 0;       // in [0, folds)
};

// Same-person pairs go round-robin into folds 0, 1, ..., and so do different-person pairs:
// every fold gets its share of both (stratified), in the pairs' order.
void AssignFolds(std::vector<ScoredPair>* pairs, int folds);

absl::StatusOr<double> RocAuc(const std::vector<ScoredPair>& pairs);

struct RocPoint {
  double far = 0;        // accepted different-person pairs / all different-person pairs
  double tar = 0;        // accepted same-person pairs / all same-person pairs
  double threshold = 0;  // accepting score >= threshold gives this point
};
// One point per distinct score, by FAR ascending: from (0, 0) (a threshold above every score)
// to (1, 1) (the lowest score). Empty without both kinds of pairs.
std::vector<RocPoint> RocCurve(const std::vector<ScoredPair>& pairs);

struct TarAtFarResult {
  double far_target = 0;
  bool reported = false;
  std::string why_not;  // when not reported
  int64_t needed = 0;   // different-person pairs it needs: round(1 / far_target)
  double tar = 0;
  double far = 0;  // the FAR actually reached (<= far_target)
  double threshold = 0;
};
TarAtFarResult TarAtFar(const std::vector<ScoredPair>& pairs, double far_target);

// The threshold with the best accuracy on `pairs` (see the contract); `correct` gets how many
// pairs it classifies right.
double BestThreshold(const std::vector<ScoredPair>& pairs, int64_t* correct = nullptr);

struct FoldResult {
  double threshold = 0;  // chosen on the other folds
  double accuracy = 0;   // on this fold
  int64_t pairs = 0;
};
struct VerificationResult {
  std::vector<FoldResult> folds;
  double accuracy_mean = 0;
  double accuracy_std = 0;
  double threshold_mean = 0;
};
absl::StatusOr<VerificationResult> KFoldVerification(const std::vector<ScoredPair>& pairs,
                                                     int folds);

struct Top1Result {
  int64_t probes = 0;   // images whose subject has another image
  int64_t correct = 0;  // whose nearest other image is of their subject
  int64_t skipped = 0;  // images alone in their subject
  double rate() const { return probes ? double(correct) / double(probes) : 0.0; }
};
// Leave-one-out identification: each image against all the others; the nearest (highest dot
// product; unit rows make it the cosine; the first on a tie) names the subject.
Top1Result LeaveOneOutTop1(const std::vector<std::vector<float>>& unit_rows,
                           const std::vector<int>& subjects);

// The dot product, accumulated in double.
double Dot(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace arcface::cli

#endif  // ARCFACE_CLIENT_CLI_EVAL_METRICS_H_
