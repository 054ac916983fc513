// HnswIndex (FAISS HNSW) on random unit vectors: recall@10 against a brute-force scan at the
// default options, faces added after the build found like the others, slots (not FAISS's ids)
// in the answers, bad options refused by name.
#include "server/gallery/hnsw_index.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "server/gallery/gallery_store.h"
#include "tests/gallery/random_units.h"

namespace arcface::gallery {
namespace {

using testing::Dot;
using testing::RandomUnits;

constexpr int kTopK = 10;
// Faces per index: the sanitizer lanes build a quarter of the graph (FAISS is not instrumented,
// but the brute-force truth is, and TSan runs FAISS on one thread); recall holds at either size.
constexpr size_t kScale = ARCFACE_SANITIZED ? 1 : 4;

// Slots are Galleries' numbers, not positions: spread them so that returning FAISS's ids
// instead would be caught.
int64_t SlotOf(size_t i) { return 1000 + 3 * static_cast<int64_t>(i); }

std::vector<int64_t> Slots(size_t from, size_t n) {
  std::vector<int64_t> slots(n);
  for (size_t i = 0; i < n; ++i) slots[i] = SlotOf(from + i);
  return slots;
}

// Of each probe's true top-10 (brute force), the share the index returned; also checks that
// every returned similarity is the returned face's true one.
double RecallAt10(const HnswIndex& index, const std::vector<float>& units,
                  const std::vector<float>& probes) {
  const size_t n = units.size() / kDim;
  const int nq = static_cast<int>(probes.size() / kDim);
  std::vector<float> sims(static_cast<size_t>(nq) * kTopK);
  std::vector<int64_t> slots(sims.size());
  const absl::Status status = index.Search(probes.data(), nq, kTopK, sims.data(), slots.data());
  EXPECT_TRUE(status.ok()) << status;
  size_t found = 0;
  for (int q = 0; q < nq; ++q) {
    const float* probe = probes.data() + static_cast<size_t>(q) * kDim;
    std::vector<std::pair<double, size_t>> all(n);
    for (size_t i = 0; i < n; ++i) all[i] = {Dot(probe, units.data() + i * kDim), i};
    std::partial_sort(all.begin(), all.begin() + kTopK, all.end(), std::greater<>());
    std::set<int64_t> truth;
    for (int j = 0; j < kTopK; ++j) truth.insert(SlotOf(all[j].second));
    for (int j = 0; j < kTopK; ++j) {
      const size_t at = static_cast<size_t>(q) * kTopK + j;
      const int64_t slot = slots[at];
      if (slot < 0) continue;
      EXPECT_EQ((slot - 1000) % 3, 0) << "not a slot: " << slot;
      const size_t i = static_cast<size_t>((slot - 1000) / 3);
      EXPECT_LT(i, n) << "not a slot: " << slot;
      if (i >= n) continue;
      EXPECT_NEAR(sims[at], Dot(probe, units.data() + i * kDim), 2e-5) << "slot " << slot;
      if (j > 0) {
        EXPECT_LE(sims[at], sims[at - 1]) << "probe " << q << " not best first";
      }
      found += truth.count(slot);
    }
  }
  return static_cast<double>(found) / (static_cast<double>(nq) * kTopK);
}

TEST(HnswIndexTest, RecallAt10AtDefaultOptions) {
  const size_t n = 1000 * kScale;
  const std::vector<float> units = RandomUnits(n, 1);
  auto index = HnswIndex::Build(HnswOptions{}, units.data(), Slots(0, n).data(), n);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ((*index)->size(), n);
  EXPECT_EQ((*index)->Describe(), "hnsw(M=48,efSearch=256)");
  const double recall = RecallAt10(**index, units, RandomUnits(200, 2));
  EXPECT_GE(recall, 0.99);
  // The search-time beam matters: a narrow one finds less on the same graph.
  ASSERT_TRUE((*index)->SetEfSearch(10).ok());
  EXPECT_EQ((*index)->Describe(), "hnsw(M=48,efSearch=10)");
  EXPECT_LT(RecallAt10(**index, units, RandomUnits(200, 2)), recall - 0.05);
}

TEST(HnswIndexTest, AddAfterBuildIsSearchedLikeTheRest) {
  const size_t n = 750 * kScale, first = 500 * kScale;
  const std::vector<float> units = RandomUnits(n, 3);
  auto index = HnswIndex::Build(HnswOptions{}, units.data(), Slots(0, first).data(), first);
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_TRUE((*index)
                  ->Add(units.data() + first * kDim, Slots(first, n - first).data(), n - first)
                  .ok());
  EXPECT_EQ((*index)->size(), n);
  EXPECT_GE(RecallAt10(**index, units, RandomUnits(200, 4)), 0.99);
  // Each added face, as a probe, finds itself first.
  const int nq = 50;
  const size_t last = n - 100;
  std::vector<float> probes(units.begin() + last * kDim, units.begin() + (last + nq) * kDim);
  std::vector<float> sims(nq);
  std::vector<int64_t> slots(nq);
  ASSERT_TRUE((*index)->Search(probes.data(), nq, 1, sims.data(), slots.data()).ok());
  for (int q = 0; q < nq; ++q) {
    EXPECT_EQ(slots[q], SlotOf(last + q));
    EXPECT_NEAR(sims[q], 1.0, 2e-5);
  }
}

TEST(HnswIndexTest, EmptyAndSmallGraphsAnswerMissingResultsAsMinusOne) {
  auto index = HnswIndex::Build(HnswOptions{}, nullptr, nullptr, 0);
  ASSERT_TRUE(index.ok()) << index.status();
  const std::vector<float> units = RandomUnits(3, 5);
  std::vector<float> sims(5);
  std::vector<int64_t> slots(5, 42);
  ASSERT_TRUE((*index)->Search(units.data(), 1, 5, sims.data(), slots.data()).ok());
  EXPECT_EQ(slots, std::vector<int64_t>(5, -1));
  ASSERT_TRUE((*index)->Add(units.data(), Slots(0, 3).data(), 3).ok());
  ASSERT_TRUE((*index)->Search(units.data(), 1, 5, sims.data(), slots.data()).ok());
  EXPECT_EQ(slots[0], SlotOf(0));
  EXPECT_EQ(std::set<int64_t>(slots.begin(), slots.begin() + 3),
            (std::set<int64_t>{SlotOf(0), SlotOf(1), SlotOf(2)}));
  EXPECT_EQ(slots[3], -1);
  EXPECT_EQ(slots[4], -1);
}

TEST(HnswIndexTest, BadOptionsAndArgumentsAreInvalidArgumentNamingThem) {
  const std::vector<float> units = RandomUnits(2, 6);
  const std::vector<int64_t> slots = Slots(0, 2);
  struct Case {
    HnswOptions options;
    std::string names;
  };
  std::vector<Case> cases = {{{0, 80, 128}, "HNSW M "},           {{1, 80, 128}, "HNSW M "},
                             {{-4, 80, 128}, "HNSW M "},          {{257, 80, 128}, "HNSW M "},
                             {{32, 0, 128}, "efConstruction"}, {{32, -1, 128}, "efConstruction"},
                             {{32, 80, 0}, "efSearch"},     {{32, 80, -5}, "efSearch"},
                             {{32, 80, 5000}, "efSearch"}};
  for (const Case& c : cases) {
    auto index = HnswIndex::Build(c.options, units.data(), slots.data(), 2);
    ASSERT_FALSE(index.ok()) << c.names;
    EXPECT_EQ(index.status().code(), absl::StatusCode::kInvalidArgument) << index.status();
    EXPECT_NE(index.status().message().find(c.names), std::string::npos) << index.status();
  }
  auto index = HnswIndex::Build(HnswOptions{}, units.data(), slots.data(), 2);
  ASSERT_TRUE(index.ok()) << index.status();
  float sims[2];
  int64_t out[2];
  EXPECT_EQ((*index)->Search(units.data(), 1, 0, sims, out).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*index)->Search(units.data(), -1, 1, sims, out).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*index)->SetEfSearch(0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*index)->SetEfSearch(4097).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*index)->Add(nullptr, slots.data(), 2).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*index)->size(), 2u);
}

}  // namespace
}  // namespace arcface::gallery
