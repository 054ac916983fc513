// `arcface-client eval`'s figures against hand-computed cases (eval_metrics.h) and its reading
// of LFW's pairs.txt and of identity folders (eval_data.h), its --pad border; its ROC picture
// (plot.h).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "client/cli/eval_data.h"
#include "client/cli/eval_metrics.h"
#include "client/cli/plot.h"

namespace arcface::cli {
namespace {

std::vector<ScoredPair> Pairs(const std::vector<double>& same, const std::vector<double>& diff) {
  std::vector<ScoredPair> out;
  for (double s : same) out.push_back({s, true});
  for (double s : diff) out.push_back({s, false});
  return out;
}

TEST(RocAuc, CountsTheRankingOfEverySameAgainstEveryDifferentPair) {
  // Of the 6 (same, different) couples, 4 rank the same-person pair higher: 0.9 > 0.8, 0.9 >
  // 0.3, 0.7 > 0.3, 0.4 > 0.3.
  EXPECT_DOUBLE_EQ(*RocAuc(Pairs({0.9, 0.7, 0.4}, {0.8, 0.3})), 4.0 / 6.0);
  EXPECT_DOUBLE_EQ(*RocAuc(Pairs({0.9, 0.8}, {0.1, 0.2})), 1.0);
  EXPECT_DOUBLE_EQ(*RocAuc(Pairs({0.1, 0.2}, {0.9, 0.8})), 0.0);
}

TEST(RocAuc, TiesCountOneHalf) {
  // Per same-person pair at 0.5: one tie (1/2) and one win (1): (1.5 + 1.5) / 4.
  EXPECT_DOUBLE_EQ(*RocAuc(Pairs({0.5, 0.5}, {0.5, 0.2})), 0.75);
  EXPECT_DOUBLE_EQ(*RocAuc(Pairs({0.3, 0.3, 0.3}, {0.3, 0.3})), 0.5);
}

TEST(RocAuc, NeedsBothKinds) {
  EXPECT_EQ(RocAuc(Pairs({0.5}, {})).status().message(), "no different-person pairs");
  EXPECT_EQ(RocAuc(Pairs({}, {0.5})).status().message(), "no same-person pairs");
  EXPECT_TRUE(RocCurve(Pairs({0.5}, {})).empty());
}

TEST(RocCurve, OnePointPerDistinctScoreFromZeroToOne) {
  const std::vector<RocPoint> curve = RocCurve(Pairs({0.9, 0.5}, {0.5, 0.1}));
  ASSERT_EQ(curve.size(), 4u);
  EXPECT_EQ(curve[0].far, 0);
  EXPECT_EQ(curve[0].tar, 0);
  EXPECT_GT(curve[0].threshold, 0.9);
  const double want[3][3] = {{0, 0.5, 0.9}, {0.5, 1, 0.5}, {1, 1, 0.1}};  // far, tar, threshold
  for (int i = 0; i < 3; ++i) {
    EXPECT_DOUBLE_EQ(curve[i + 1].far, want[i][0]) << i;
    EXPECT_DOUBLE_EQ(curve[i + 1].tar, want[i][1]) << i;
    EXPECT_DOUBLE_EQ(curve[i + 1].threshold, want[i][2]) << i;
  }
}

TEST(BestThreshold, TheLowestOfTheMostAccurate) {
  // Ascending: 0.2 d, 0.3 s, 0.5 d, 0.6 s, 0.9 s. Accepting all: 3 right; above 0.2: 4; above
  // 0.3: 3; above 0.5: 4 again (not better); above 0.6: 3; above 0.9: 2.
  int64_t correct = 0;
  EXPECT_DOUBLE_EQ(BestThreshold(Pairs({0.9, 0.6, 0.3}, {0.5, 0.2}), &correct), 0.25);
  EXPECT_EQ(correct, 4);
  // All same: accept everything, below the lowest score.
  const double t = BestThreshold(Pairs({0.4, 0.7}, {}), &correct);
  EXPECT_LT(t, 0.4);
  EXPECT_GT(t, 0.39);
  EXPECT_EQ(correct, 2);
}

TEST(KFold, ASeparableSetScoresOneInEveryFold) {
  std::vector<double> same, diff;
  for (int i = 0; i < 20; ++i) {
    same.push_back(0.60 + 0.01 * i);  // 0.60 .. 0.79
    diff.push_back(0.10 + 0.01 * i);  // 0.10 .. 0.29
  }
  std::vector<ScoredPair> pairs = Pairs(same, diff);
  AssignFolds(&pairs, 10);
  absl::StatusOr<VerificationResult> r = KFoldVerification(pairs, 10);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->folds.size(), 10u);
  for (const FoldResult& f : r->folds) {
    EXPECT_EQ(f.accuracy, 1.0);
    EXPECT_EQ(f.pairs, 4);  // two of each kind (stratified)
  }
  EXPECT_EQ(r->accuracy_mean, 1.0);
  EXPECT_EQ(r->accuracy_std, 0.0);
  // The gap's midpoint on the training folds: fold 1 holds out 0.60 (so 0.29..0.61 -> 0.45),
  // fold 10 holds out 0.29 (0.28..0.60 -> 0.44), the others 0.29..0.60 -> 0.445.
  EXPECT_NEAR(r->folds[0].threshold, 0.45, 1e-12);
  EXPECT_NEAR(r->folds[9].threshold, 0.44, 1e-12);
  EXPECT_NEAR(r->folds[4].threshold, 0.445, 1e-12);
  EXPECT_NEAR(r->threshold_mean, 0.445, 1e-12);
}

TEST(KFold, AThresholdFromTheOtherFoldsIsTestedOnThisOne) {
  // Two folds. Fold 1: same 0.9, different 0.1. Fold 2: same 0.3, different 0.7 (inverted).
  // On fold 2 alone, accepting all is 1 right, above 0.3 none, above 0.7 one again: the
  // lowest best threshold is just below 0.3. On fold 1 alone the best is the midpoint 0.5.
  std::vector<ScoredPair> pairs = {
      {0.9, true, 0}, {0.1, false, 0}, {0.3, true, 1}, {0.7, false, 1}};
  absl::StatusOr<VerificationResult> r = KFoldVerification(pairs, 2);
  ASSERT_TRUE(r.ok()) << r.status();
  // Fold 1 tested with a threshold just below 0.3: 0.9 accepted (right), 0.1 rejected (right).
  EXPECT_EQ(r->folds[0].accuracy, 1.0);
  EXPECT_LT(r->folds[0].threshold, 0.3);
  // Fold 2 tested with fold 1's best (0.5): 0.3 rejected (wrong), 0.7 accepted (wrong).
  EXPECT_DOUBLE_EQ(r->folds[1].threshold, 0.5);
  EXPECT_EQ(r->folds[1].accuracy, 0.0);
  EXPECT_DOUBLE_EQ(r->accuracy_mean, 0.5);
  EXPECT_DOUBLE_EQ(r->accuracy_std, 0.5);
}

TEST(KFold, AnEmptyFoldIsNamed) {
  std::vector<ScoredPair> pairs = Pairs({0.9, 0.8}, {0.1});
  AssignFolds(&pairs, 3);  // same -> folds 0, 1; different -> fold 0: fold 3 is empty
  EXPECT_EQ(KFoldVerification(pairs, 3).status().message(),
            "fold 3 of 3 has no pairs (3 pairs in all)");
}

TEST(TarAtFar, TheHighestTarWithinTheFar) {
  // 1000 different-person pairs at 0, 0.0005, ..., 0.4995; same-person pairs: 4 at 0.8, 3
  // between the two highest different ones, 3 at 0.1.
  std::vector<double> diff, same = {0.8, 0.8, 0.8, 0.8, 0.49925, 0.49925, 0.49925, 0.1, 0.1, 0.1};
  for (int i = 0; i < 1000; ++i) diff.push_back(0.0005 * i);
  const std::vector<ScoredPair> pairs = Pairs(same, diff);
  // FAR 1e-3 allows one false accept: down to 0.4995 and the three just below it, not 0.499.
  TarAtFarResult r = TarAtFar(pairs, 1e-3);
  ASSERT_TRUE(r.reported) << r.why_not;
  EXPECT_DOUBLE_EQ(r.tar, 0.7);
  EXPECT_DOUBLE_EQ(r.far, 0.001);
  EXPECT_DOUBLE_EQ(r.threshold, 0.49925);
  // FAR 1e-2: ten false accepts, down to the 990th different pair.
  r = TarAtFar(pairs, 1e-2);
  ASSERT_TRUE(r.reported);
  EXPECT_DOUBLE_EQ(r.tar, 0.7);
  EXPECT_DOUBLE_EQ(r.far, 0.01);
  EXPECT_DOUBLE_EQ(r.threshold, 0.0005 * 990);
  // 999 different-person pairs cannot measure FAR 1e-3.
  std::vector<ScoredPair> fewer = Pairs(same, std::vector<double>(diff.begin(), diff.end() - 1));
  r = TarAtFar(fewer, 1e-3);
  EXPECT_FALSE(r.reported);
  EXPECT_EQ(r.needed, 1000);
  EXPECT_EQ(r.why_not, "999 different-person pairs; FAR 0.001 needs at least 1000");
  EXPECT_TRUE(TarAtFar(fewer, 1e-2).reported);
}

TEST(TarAtFar, TiedDifferentPairsAreAcceptedTogether) {
  // Two different-person pairs tie at the top (0.9): FAR 1e-3 allows one, so neither is
  // accepted; only the same-person pair above them is.
  std::vector<double> diff = {0.9, 0.9};
  for (int i = 0; i < 998; ++i) diff.push_back(0.1);
  const TarAtFarResult r = TarAtFar(Pairs({0.95, 0.9}, diff), 1e-3);
  ASSERT_TRUE(r.reported);
  EXPECT_DOUBLE_EQ(r.tar, 0.5);
  EXPECT_EQ(r.far, 0.0);
  EXPECT_DOUBLE_EQ(r.threshold, 0.95);
}

TEST(Top1, LeaveOneOutNearestNeighbour) {
  // A: (1, 0), (0.96, 0.28); B: (0, 1), (0.8, 0.6); C alone: (-1, 0).
  // A1 -> A2 (0.96); A2 -> A1 (0.96); B1 -> B2 (0.6 vs A2 0.28); B2 -> A2 (0.936): wrong.
  const std::vector<std::vector<float>> rows = {
      {1, 0}, {0.96f, 0.28f}, {0, 1}, {0.8f, 0.6f}, {-1, 0}};
  const Top1Result r = LeaveOneOutTop1(rows, {0, 0, 1, 1, 2});
  EXPECT_EQ(r.probes, 4);
  EXPECT_EQ(r.correct, 3);
  EXPECT_EQ(r.skipped, 1);
  EXPECT_DOUBLE_EQ(r.rate(), 0.75);
}

TEST(PairsText, LfwHeaderWithFolds) {
  absl::StatusOr<PairsText> p =
      ParsePairsText("2\t1\nAl 1 2\nAl 1 Bo 1\r\n\nBo 1 2\nAl 2 Bo 3\n", "pairs.txt");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->folds, 2);
  EXPECT_EQ(p->pairs_per_fold, 1);
  ASSERT_EQ(p->pairs.size(), 4u);
  EXPECT_EQ(p->pairs[0].name_a, "Al");
  EXPECT_EQ(p->pairs[0].name_b, "Al");
  EXPECT_EQ(p->pairs[0].index_b, 2);
  EXPECT_EQ(p->pairs[1].name_b, "Bo");
  EXPECT_EQ(p->pairs[3].index_b, 3);
  EXPECT_EQ(p->pairs[3].line, 6);  // blank lines count
}

TEST(PairsText, ACountHeaderAndErrorsNamingTheLine) {
  absl::StatusOr<PairsText> p = ParsePairsText("1\nAl 1 2\nAl 1 Bo 1\n", "dev.txt");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->folds, 0);
  EXPECT_EQ(ParsePairsText("2\nAl 1 2\nAl 1 Bo 1\n", "p").status().message(),
            "p: its header promises 4 pairs, it has 2");
  EXPECT_EQ(ParsePairsText("1\nAl 0 2\nAl 1 Bo 1\n", "p").status().message(),
            "p line 2: expected \"NAME I J\" or \"NAME1 I NAME2 J\" (image numbers from 1), got "
            "\"Al 0 2\"");
  EXPECT_EQ(ParsePairsText("ten\n", "p").status().message(),
            "p line 1: expected the header \"FOLDS PAIRS_PER_FOLD\" (LFW: \"10 300\") or a pair "
            "count, got \"ten\"");
  EXPECT_EQ(ParsePairsText("\n", "p").status().message(), "p: empty");
}

class EvalFolder : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::path(::testing::TempDir()) /
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  void Touch(const std::string& relative) {
    std::filesystem::create_directories((root_ / relative).parent_path());
    std::ofstream(root_ / relative) << "x";
  }
  std::string Write(const std::string& name, const std::string& text) {
    std::ofstream(root_ / name) << text;
    return (root_ / name).string();
  }
  std::filesystem::path root_;
};

TEST_F(EvalFolder, EveryPairOfEveryImage) {
  Touch("Al/a.jpg");
  Touch("Al/b.png");
  Touch("Al/notes.txt");  // not an image
  Touch("Bo/x.jpg");
  Touch("Cy/readme.md");  // no images: not an identity
  absl::StatusOr<EvalSet> set = AllPairs(root_.string(), 10);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->subjects, (std::vector<std::string>{"Al", "Bo"}));
  ASSERT_EQ(set->images.size(), 3u);
  EXPECT_EQ(set->images[2].path, (root_ / "Bo/x.jpg").string());
  ASSERT_EQ(set->pairs.size(), 3u);
  EXPECT_TRUE(set->pairs[0].same);  // a-b
  EXPECT_FALSE(set->pairs[1].same);
  EXPECT_EQ(set->pairs[2].fold, 1);  // the second different-person pair
}

TEST_F(EvalFolder, TooFewIdentitiesOrPairsAreNamed) {
  EXPECT_EQ(AllPairs((root_ / "nope").string(), 10).status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(AllPairs(root_.string(), 10).status().message().find("no identity subfolders"),
            std::string::npos);
  Touch("Al/a.jpg");
  Touch("Al/b.jpg");
  EXPECT_EQ(AllPairs(root_.string(), 10).status().message(),
            root_.string() + " has one identity (Al): eval needs at least two");
  std::filesystem::remove(root_ / "Al/b.jpg");
  Touch("Bo/x.jpg");
  EXPECT_EQ(AllPairs(root_.string(), 10).status().message(),
            root_.string() + " has no same-person pair: no identity with two images");
}

TEST_F(EvalFolder, PairsFileByLfwNameOrByIndexAndAMissingImageNamed) {
  Touch("Al/Al_0001.jpg");
  Touch("Al/Al_0002.jpg");
  Touch("Bo/zz.jpg");  // no LFW name: image 1 is the first file by name
  Touch("Bo/aa.jpg");
  const std::string pairs = Write("pairs.txt", "1 1\nAl 1 2\nAl 2 Bo 1\n");
  absl::StatusOr<EvalSet> set = PairsFromFile(root_.string(), pairs, 10);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->images.size(), 3u);
  EXPECT_EQ(set->images[2].path, (root_ / "Bo/aa.jpg").string());
  EXPECT_EQ(set->folds, 1);
  ASSERT_EQ(set->pairs.size(), 2u);
  EXPECT_TRUE(set->pairs[0].same);
  EXPECT_EQ(set->pairs[1].a, 1);  // Al 2 is the image already seen

  const std::string missing = Write("missing.txt", "1\nAl 1 2\nAl 1 Bo 3\n");
  absl::Status s = PairsFromFile(root_.string(), missing, 10).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), missing + " line 3: image 3 of Bo: no file " +
                             (root_ / "Bo/Bo_0003.jpg").string() + ", and " +
                             (root_ / "Bo").string() + " has 2 image files");
}

TEST(PadImage, ABlackBorderAFractionOfEachSideAroundTheUntouchedImage) {
  cv::Mat image(20, 40, CV_8UC3, cv::Scalar(10, 20, 30));
  image.at<cv::Vec3b>(0, 0) = {1, 2, 3};
  absl::StatusOr<cv::Mat> padded = PadImage(image, 0.5);
  ASSERT_TRUE(padded.ok()) << padded.status();
  // 0.5 of the width (20 px) left and right, 0.5 of the height (10 px) above and below.
  ASSERT_EQ(padded->size(), cv::Size(80, 40));
  ASSERT_EQ(padded->type(), CV_8UC3);
  EXPECT_EQ(cv::norm((*padded)(cv::Rect(20, 10, 40, 20)), image, cv::NORM_INF), 0);
  EXPECT_EQ(padded->at<cv::Vec3b>(10, 20), cv::Vec3b(1, 2, 3));
  cv::Mat border = padded->clone();
  border(cv::Rect(20, 10, 40, 20)).setTo(cv::Scalar::all(0));
  EXPECT_EQ(cv::countNonZero(border.reshape(1)), 0);  // black all round

  EXPECT_EQ(PadImage(image, 0)->size(), image.size());
  EXPECT_EQ(PadImage(image, 1.0 / 3)->size(), cv::Size(40 + 2 * 13, 20 + 2 * 7));  // rounded
}

TEST(PadImage, AFractionOutOfRangeOrAnEmptyImageIsNamed) {
  const cv::Mat image(4, 4, CV_8UC3, cv::Scalar::all(0));
  EXPECT_EQ(PadImage(image, -0.1).status().message(),
            "--pad -0.1: not a fraction of the image's size in [0, 4]");
  EXPECT_EQ(PadImage(image, kMaxPad + 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PadImage(image, std::nan("")).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PadImage(cv::Mat(), 1).status().message(), "--pad: empty image");
}

TEST(RocPlot, LogFarAxisCurveAndMark) {
  const cv::Mat roc = DrawRoc({{0, 0}, {0, 0.25}, {0.01, 0.5}, {1, 1}}, RocMark{0.01, 0.5, "m"},
                              1e-4, "title", "subtitle");
  ASSERT_EQ(roc.size(), cv::Size(kRocWidth, kRocHeight));
  const int x0 = kRocLeft, x1 = kRocWidth - kRocRight, y0 = kRocTop, y1 = kRocHeight - kRocBottom;
  auto near = [&](cv::Point p, const cv::Scalar& color) {
    const cv::Vec3b px = roc.at<cv::Vec3b>(p);
    for (int c = 0; c < 3; ++c) {
      if (std::abs(px[c] - color[c]) > 40) return false;
    }
    return true;
  };
  // FAR 1e-2 is half way along four decades; TAR 0.5 half way up. FAR 0 is the left edge.
  const cv::Point middle((x0 + x1) / 2, (y0 + y1) / 2);
  EXPECT_TRUE(near(middle, kRocCurveColor));
  EXPECT_TRUE(near({x0 + 1, y1 - (y1 - y0) / 8}, kRocCurveColor));
  EXPECT_TRUE(near({middle.x + 6, middle.y}, kRocMarkColor));  // the ring, radius 6
  EXPECT_TRUE(near({x1 - 3, y0 + 3}, kRocCurveColor));         // (1, 1)
}

}  // namespace
}  // namespace arcface::cli
