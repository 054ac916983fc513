// The exact indexes (vector_index.h) against a brute-force scan in double over a mirror of the
// rows, through random adds, swap-removes and searches: the flat index (FAISS), the device matrix
// on torch's CPU device and, where torch sees one, on CUDA.
#include <torch/cuda.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "server/gallery/gallery_store.h"
#include "server/gallery/torch_index.h"
#include "server/gallery/vector_index.h"
#include "tests/gallery/random_units.h"

namespace arcface::gallery {
namespace {

using testing::Dot;
using testing::RandomUnits;

// Float32 dot products of unit vectors in 512 dimensions, summed in another order than the
// reference's: a few ulps of 1.0 at most.
constexpr double kTolerance = 2e-5;

struct Kind {
  std::string name;
  std::function<std::unique_ptr<VectorIndex>()> make;
  bool available = true;
};

void PrintTo(const Kind& kind, std::ostream* os) { *os << kind.name; }

Kind Flat() { return {"flat", [] { return MakeFlatIndex(); }}; }
Kind TorchCpu() { return {"torch_cpu", [] { return MakeTorchIndex(c10::Device("cpu")); }}; }
Kind TorchCuda() {
  return {"torch_cuda", [] { return MakeTorchIndex(c10::Device("cuda:0")); },
          torch::cuda::is_available()};
}

class VectorIndexTest : public ::testing::TestWithParam<Kind> {
 protected:
  void SetUp() override {
    if (!GetParam().available) GTEST_SKIP() << GetParam().name << ": no device here";
    index_ = GetParam().make();
  }

  void Add(const std::vector<float>& units) {
    ASSERT_TRUE(index_->Add(units.data(), units.size() / kDim).ok());
    for (size_t i = 0; i < units.size(); i += kDim) {
      mirror_.emplace_back(units.begin() + i, units.begin() + i + kDim);
    }
  }

  void SwapRemove(size_t row) {
    index_->SwapRemove(row);
    mirror_[row] = mirror_.back();
    mirror_.pop_back();
  }

  // Every answer is a correct top-k: distinct rows, each similarity the row's true one, and the
  // j-th similarity the j-th of the brute-force scan (so ties may swap rows, nothing else).
  void ExpectExact(const std::vector<float>& probes, int k) {
    const int nq = static_cast<int>(probes.size() / kDim);
    std::vector<float> sims(static_cast<size_t>(nq) * k);
    std::vector<int64_t> rows(sims.size(), -7);
    ASSERT_TRUE(index_->Search(probes.data(), nq, k, sims.data(), rows.data()).ok());
    for (int q = 0; q < nq; ++q) {
      const float* probe = probes.data() + static_cast<size_t>(q) * kDim;
      std::vector<double> all;
      for (const auto& row : mirror_) all.push_back(Dot(probe, row.data()));
      std::sort(all.begin(), all.end(), std::greater<>());
      std::vector<int64_t> seen;
      for (int j = 0; j < k; ++j) {
        const size_t at = static_cast<size_t>(q) * k + j;
        const int64_t row = rows[at];
        ASSERT_GE(row, 0) << "probe " << q << " result " << j;
        ASSERT_LT(row, static_cast<int64_t>(mirror_.size())) << "probe " << q << " result " << j;
        EXPECT_NEAR(sims[at], Dot(probe, mirror_[row].data()), kTolerance)
            << "probe " << q << " result " << j << " row " << row;
        EXPECT_NEAR(sims[at], all[j], kTolerance) << "probe " << q << " result " << j;
        EXPECT_EQ(std::count(seen.begin(), seen.end(), row), 0) << "row " << row << " twice";
        seen.push_back(row);
      }
    }
  }

  void ExpectRowsMatchMirror() {
    ASSERT_EQ(index_->size(), mirror_.size());
    std::vector<float> out(kDim);
    for (size_t r = 0; r < mirror_.size(); ++r) {
      index_->Row(r, out.data());
      ASSERT_EQ(out, mirror_[r]) << "row " << r;
    }
  }

  std::unique_ptr<VectorIndex> index_;
  std::vector<std::vector<float>> mirror_;
};

TEST_P(VectorIndexTest, EqualsBruteForceThroughAddsAndSwapRemoves) {
  std::mt19937 rng(11);
  uint64_t seed = 100;
  Add(RandomUnits(1, seed++));
  ExpectExact(RandomUnits(3, seed++), 1);
  // Growth past the first allocation and past later doublings, with removes between.
  for (size_t batch : {700, 1, 900, 64, 1500}) {
    Add(RandomUnits(batch, seed++));
    for (int i = 0; i < 40; ++i) {
      SwapRemove(std::uniform_int_distribution<size_t>(0, mirror_.size() - 1)(rng));
    }
    SwapRemove(mirror_.size() - 1);  // the last row: nothing moves
    SwapRemove(0);
    ExpectRowsMatchMirror();
    for (int nq : {1, 7, 32}) {
      const int k = std::uniform_int_distribution<int>(1, 10)(rng);
      ExpectExact(RandomUnits(nq, seed++), k);
    }
  }
  EXPECT_GE(index_->bytes(), index_->size() * kDim * sizeof(float));
  EXPECT_LE(index_->bytes(), 4 * index_->size() * kDim * sizeof(float));
}

TEST_P(VectorIndexTest, FindsEnrolledVectorsAndNotRemovedOnes) {
  const std::vector<float> units = RandomUnits(3000, 7);
  Add(units);
  // A probe that is an enrolled vector finds it first, at similarity 1.
  std::vector<float> probes(units.begin() + 1234 * kDim, units.begin() + 1236 * kDim);
  std::vector<float> sims(2 * 5);
  std::vector<int64_t> rows(2 * 5);
  ASSERT_TRUE(index_->Search(probes.data(), 2, 5, sims.data(), rows.data()).ok());
  EXPECT_EQ(rows[0], 1234);
  EXPECT_EQ(rows[5], 1235);
  EXPECT_NEAR(sims[0], 1.0, kTolerance);
  // Removed, it is no longer found; the last row now lives in its place.
  SwapRemove(1234);
  ASSERT_TRUE(index_->Search(probes.data(), 2, 5, sims.data(), rows.data()).ok());
  EXPECT_LT(sims[0], 0.5);
  EXPECT_EQ(rows[5], 1235);
  const std::vector<float> last(units.end() - kDim, units.end());
  ASSERT_TRUE(index_->Search(last.data(), 1, 1, sims.data(), rows.data()).ok());
  EXPECT_EQ(rows[0], 1234);
  ExpectExact(RandomUnits(32, 8), 10);
}

TEST_P(VectorIndexTest, SearchesEveryRowWhenKIsSize) {
  Add(RandomUnits(5, 3));
  ExpectExact(RandomUnits(4, 4), 5);
}

TEST_P(VectorIndexTest, AdoptAppendsRows) {
  Add(RandomUnits(10, 21));
  std::vector<float> more = RandomUnits(2000, 22);
  const std::vector<float> copy = more;
  ASSERT_TRUE(index_->Adopt(std::move(more)).ok());
  for (size_t i = 0; i < copy.size(); i += kDim) {
    mirror_.emplace_back(copy.begin() + i, copy.begin() + i + kDim);
  }
  ExpectRowsMatchMirror();
  ExpectExact(RandomUnits(32, 23), 10);
}

INSTANTIATE_TEST_SUITE_P(Kinds, VectorIndexTest, ::testing::Values(Flat(), TorchCpu(), TorchCuda()),
                         [](const auto& info) { return info.param.name; });

// The device matrix's own checks of its inputs and its description.
TEST(TorchIndexTest, RefusesBadInputs) {
  auto index = MakeTorchIndex(c10::Device("cpu"));
  EXPECT_EQ(index->Describe(), "torch:cpu");
  std::vector<float> part(kDim + 3);
  const absl::Status adopt = index->Adopt(part);
  EXPECT_EQ(adopt.code(), absl::StatusCode::kInvalidArgument) << adopt;
  EXPECT_NE(adopt.message().find("515 floats"), std::string::npos) << adopt;
  EXPECT_EQ(index->size(), 0u);
  const std::vector<float> units = RandomUnits(3, 1);
  ASSERT_TRUE(index->Add(units.data(), 3).ok());
  float sims[4];
  int64_t rows[4];
  const absl::Status too_many = index->Search(units.data(), 1, 4, sims, rows);
  EXPECT_EQ(too_many.code(), absl::StatusCode::kInvalidArgument) << too_many;
  EXPECT_EQ(index->Search(units.data(), 1, 0, sims, rows).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TorchIndexTest, SwapRemovePastTheEndMakesLaterCallsFail) {
  auto index = MakeTorchIndex(c10::Device("cpu"));
  const std::vector<float> units = RandomUnits(3, 1);
  ASSERT_TRUE(index->Add(units.data(), 3).ok());
  index->SwapRemove(3);
  float sims[1];
  int64_t rows[1];
  const absl::Status search = index->Search(units.data(), 1, 1, sims, rows);
  EXPECT_EQ(search.code(), absl::StatusCode::kInternal) << search;
  EXPECT_NE(search.message().find("row 3 of 3"), std::string::npos) << search;
  EXPECT_EQ(index->Add(units.data(), 1).code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace arcface::gallery
