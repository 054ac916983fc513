// What `arcface-client eval` measures on: the images of a folder of identity subfolders (LFW's
// layout, ROOT/<person>/<image files>) and the pairs to verify, either every pair of them or
// those of an LFW-style pairs.txt.
//
// Contract
// - pairs.txt (LFW's format): a header line, "FOLDS PAIRS_PER_FOLD" (LFW's pairs.txt: "10 300",
//   then each fold is PAIRS_PER_FOLD same-person and PAIRS_PER_FOLD different-person lines, in
//   that order of folds) or one count N (pairsDevTrain.txt: N same-person then N different-
//   person lines, spread over the folds as without a pairs file); then one pair per line,
//   "NAME I J" (the same person) or "NAME1 I NAME2 J" (different people), I and J from 1.
//   Image I of NAME is ROOT/NAME/NAME_%04d.jpg (LFW's naming) when that file exists, else the
//   I-th image file of ROOT/NAME in name order (any other folder of identity subfolders).
// - Without pairs.txt: every image file of every subfolder (recursively, sorted; the files
//   CollectInputFiles takes), every pair of them; the same-person pairs go round-robin into the
//   folds, and so do the different-person pairs.
// - Errors are INVALID_ARGUMENT (NOT_FOUND for a missing file or folder) naming the path, and
//   for pairs.txt the line. Reads the file system only; thread-compatible.
#ifndef ARCFACE_CLIENT_CLI_EVAL_DATA_H_
#define ARCFACE_CLIENT_CLI_EVAL_DATA_H_

#include <string>
#include <vector>

#include <opencv2/core/mat.hpp>

#include "absl/status/statusor.h"

namespace arcface::cli {

// One line of pairs.txt (index_b of a same-person pair is the second image of name_a).
struct PairLine {
  std::string name_a;
  int index_a = 0;
  std::string name_b;  // == name_a for a same-person pair
  int index_b = 0;
  int line = 0;  // 1-based, in the file
};

struct PairsText {
  std::vector<PairLine> pairs;
  int folds = 0;  // from a "FOLDS PAIRS_PER_FOLD" header; 0 after a plain count
  int pairs_per_fold = 0;
};

// Parses the text of a pairs.txt; `name` (its path) prefixes the errors.
absl::StatusOr<PairsText> ParsePairsText(const std::string& text, const std::string& name);

struct EvalSet {
  std::vector<std::string> subjects;  // subfolder names: sorted, or as pairs.txt names them
  struct Image {
    std::string path;
    int subject = 0;  // index into subjects
  };
  std::vector<Image> images;  // by subject then file, or as pairs.txt names them
  struct Pair {
    int a = 0, b = 0;  // indices into images
    bool same = false;
    int fold = 0;
  };
  std::vector<Pair> pairs;
  int folds = 0;
};

// Every image of `root`'s subfolders, every pair of them, in `folds` folds. INVALID_ARGUMENT
// when there are fewer than two identities or no same-person pair.
absl::StatusOr<EvalSet> AllPairs(const std::string& root, int folds);

// The images and pairs `pairs_path` names; its folds when its header gives them, else `folds`.
absl::StatusOr<EvalSet> PairsFromFile(const std::string& root, const std::string& pairs_path,
                                      int folds);

// eval --pad FRACTION (with --faces detect): `image` inside a black border FRACTION of its width
// on the left and on the right and FRACTION of its height above and below. A face that fills a
// tight crop (dlib's 150x150 johns chips) is mostly missed by the detector, which was trained on
// faces with surroundings; with a border it is found, and aligned by its own landmarks. 0 gives
// the image unchanged. INVALID_ARGUMENT for an empty image or a fraction outside [0, kMaxPad].
inline constexpr double kMaxPad = 4.0;
absl::StatusOr<cv::Mat> PadImage(const cv::Mat& image, double fraction);

}  // namespace arcface::cli

#endif  // ARCFACE_CLIENT_CLI_EVAL_DATA_H_
