#include "server/gallery/hnsw_index.h"

#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/impl/DistanceComputer.h>
#include <faiss/impl/HNSW.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/gallery/gallery_store.h"

namespace arcface::gallery {
namespace {

// FAISS keeps its graph's node numbers in 32 bits (HNSW::storage_idx_t).
constexpr size_t kMaxFaces = 1u << 30;
// Beams beyond this search most of any graph they would be worth using on: use exact search.
constexpr int kMaxEf = 4096;

absl::Status FaissError(const char* what, const std::exception& e) {
  return absl::InternalError(absl::StrCat("FAISS HNSW ", what, " failed: ", e.what()));
}

absl::Status CheckEf(const char* name, int ef) {
  if (ef < 1 || ef > kMaxEf) {
    return absl::InvalidArgumentError(
        absl::StrCat("HNSW ", name, " must be in [1, ", kMaxEf, "], got ", ef));
  }
  return absl::OkStatus();
}

absl::Status CheckOptions(const HnswOptions& options) {
  // FAISS checks none of these: a zero or negative value builds a graph that finds nothing.
  if (options.m < 2 || options.m > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("HNSW M (graph degree) must be in [2, 256], got ", options.m));
  }
  if (absl::Status s = CheckEf("efConstruction", options.ef_construction); !s.ok()) return s;
  return CheckEf("efSearch", options.ef_search);
}

// The graph's inner products, `dim` floats each, in 16 independent lanes so that the compiler
// vectorizes the loop without reordering a sum (a dim that is not a multiple of 16 ends in a
// scalar tail); one variant per instruction set, chosen once.
// (Debian's libfaiss is built for the x86-64 baseline: its own dot product runs scalar, and the
// graph spends nearly all its time there — build and search were about 4x slower on it.)
template <int kLanes>
inline float DotLanes(const float* a, const float* b, int dim) {
  float acc[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= dim; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  float sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < dim; ++j) sum += a[j] * b[j];
  return sum;
}

float DotBaseline(const float* a, const float* b, int dim) { return DotLanes<16>(a, b, dim); }
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float DotAvx2(const float* a, const float* b, int dim) {
  return DotLanes<16>(a, b, dim);
}
__attribute__((target("avx512f"))) float DotAvx512(const float* a, const float* b, int dim) {
  return DotLanes<16>(a, b, dim);
}
#endif

using DotFn = float (*)(const float*, const float*, int);
DotFn ChooseDot() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) return DotAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return DotAvx2;
#endif
  return DotBaseline;
}

class FastInnerProduct final : public faiss::FlatCodesDistanceComputer {
 public:
  FastInnerProduct(const float* rows, int dim, DotFn dot)
      : FlatCodesDistanceComputer(reinterpret_cast<const uint8_t*>(rows), dim * sizeof(float)),
        rows_(rows),
        dim_(dim),
        dot_(dot) {}
  void set_query(const float* x) override { query_ = x; }
  float distance_to_code(const uint8_t* code) override {
    return dot_(query_, reinterpret_cast<const float*>(code), dim_);
  }
  float symmetric_dis(idx_t i, idx_t j) override {
    return dot_(rows_ + i * dim_, rows_ + j * dim_, dim_);
  }

 private:
  const float* const rows_;
  const int dim_;
  const DotFn dot_;
  const float* query_ = nullptr;
};

// FAISS's flat inner-product storage, with the distance computer above for the graph.
class FastIpStorage final : public faiss::IndexFlatIP {
 public:
  explicit FastIpStorage(int dim) : faiss::IndexFlatIP(dim), dot_(ChooseDot()) {}
  faiss::FlatCodesDistanceComputer* get_FlatCodesDistanceComputer() const override {
    return new FastInnerProduct(get_xb(), static_cast<int>(d), dot_);
  }

 private:
  const DotFn dot_;
};

class FaissHnswIndex final : public HnswIndex {
 public:
  FaissHnswIndex(const HnswOptions& options, int dim)
      : options_(options), index_(new FastIpStorage(dim), options.m) {
    index_.own_fields = true;  // index_ deletes the storage
    index_.hnsw.efConstruction = options.ef_construction;
    index_.hnsw.efSearch = options.ef_search;
  }

  absl::Status Add(const float* units, const int64_t* slots, size_t n) override {
    if (n == 0) return absl::OkStatus();
    if (units == nullptr || slots == nullptr) {
      return absl::InvalidArgumentError("HNSW Add: null vectors or slots");
    }
    if (n > kMaxFaces - slots_.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "HNSW Add: ", slots_.size(), " + ", n, " faces exceed the graph's limit of ", kMaxFaces));
    }
    // FAISS numbers the vectors it is given 0, 1, ...: slots_[id] is the face's slot.
    slots_.insert(slots_.end(), slots, slots + n);
    try {
      index_.add(static_cast<faiss::Index::idx_t>(n), units);
    } catch (const std::exception& e) {
      // Keep the map as long as what FAISS holds, so that every id it answers has its slot.
      slots_.resize(static_cast<size_t>(index_.ntotal));
      return FaissError("add", e);
    }
    return absl::OkStatus();
  }

  absl::Status SetEfSearch(int ef_search) override {
    if (absl::Status s = CheckEf("efSearch", ef_search); !s.ok()) return s;
    options_.ef_search = ef_search;
    index_.hnsw.efSearch = ef_search;
    return absl::OkStatus();
  }

  absl::Status Search(const float* probes, int nq, int k, float* sims,
                      int64_t* slots) const override {
    if (nq < 0 || k < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("HNSW Search: needs nq >= 0 and k >= 1, got nq=", nq, " k=", k));
    }
    if (nq == 0) return absl::OkStatus();
    // A beam narrower than k cannot hold k results (FAISS widens it too). FAISS 1.7 takes the
    // beam from index_.hnsw, later ones from these parameters (faiss PR #3233): both say the same.
    faiss::SearchParametersHNSW params;
    params.efSearch = std::max(options_.ef_search, k);
    static_assert(sizeof(faiss::Index::idx_t) == sizeof(int64_t));
    auto* ids = reinterpret_cast<faiss::Index::idx_t*>(slots);
    try {
      index_.search(nq, probes, k, sims, ids, &params);
    } catch (const std::exception& e) {
      return FaissError("search", e);
    }
    const size_t n = static_cast<size_t>(nq) * static_cast<size_t>(k);
    for (size_t i = 0; i < n; ++i) {
      if (ids[i] >= 0) slots[i] = slots_[static_cast<size_t>(ids[i])];
    }
    return absl::OkStatus();
  }

  size_t size() const override { return slots_.size(); }

  std::string Describe() const override {
    return absl::StrCat("hnsw(M=", options_.m, ",efSearch=", options_.ef_search, ")");
  }

 private:
  HnswOptions options_;
  faiss::IndexHNSW index_;
  std::vector<int64_t> slots_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<HnswIndex>> HnswIndex::Build(const HnswOptions& options,
                                                            const float* units,
                                                            const int64_t* slots, size_t n,
                                                            int dim) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  std::unique_ptr<FaissHnswIndex> index;
  try {
    index = std::make_unique<FaissHnswIndex>(options, dim);
  } catch (const std::exception& e) {
    return FaissError("construction", e);
  }
  if (absl::Status s = index->Add(units, slots, n); !s.ok()) return s;
  return index;
}

}  // namespace arcface::gallery
