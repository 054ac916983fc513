// The exact index on the CPU: the gallery's unit vectors in one row-major matrix, searched by
// FAISS's knn_inner_product (blocked BLAS sgemm plus heaps, for any number of probes: see
// MakeFlatIndex), the same kernels as faiss::IndexFlatIP over the same memory.
#include <faiss/utils/distances.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/gallery/vector_index.h"

// libgomp's, declared here so that no compiler OpenMP flag is needed (clang's would bring LLVM's
// libomp beside the libgomp that FAISS, OpenBLAS and oneDNN use).
extern "C" int omp_get_max_threads();
extern "C" void omp_set_num_threads(int threads);

namespace arcface::gallery {
namespace {

// A search splits the rows into shards of at least this many, one thread each (up to OpenMP's
// thread count, OMP_NUM_THREADS): below it, one thread does the whole scan sooner than two
// start and merge.
constexpr size_t kMinShardRows = 32768;

class FlatIndex final : public VectorIndex {
 public:
  explicit FlatIndex(int dim) : dim_(dim) {}
  std::string Describe() const override { return "flat"; }
  size_t size() const override { return matrix_.size() / dim_; }

  absl::Status Add(const float* units, size_t n) override {
    matrix_.insert(matrix_.end(), units, units + n * dim_);
    return absl::OkStatus();
  }

  absl::Status Adopt(std::vector<float> units) override {
    if (matrix_.empty()) {
      matrix_ = std::move(units);
      return absl::OkStatus();
    }
    return Add(units.data(), units.size() / dim_);
  }

  void SwapRemove(size_t row) override {
    const size_t last = size() - 1;
    if (row != last) {
      std::memcpy(&matrix_[row * dim_], &matrix_[last * dim_], dim_ * sizeof(float));
    }
    matrix_.resize(last * dim_);
  }

  absl::Status Search(const float* probes, int nq, int k, float* sims,
                      int64_t* rows) const override {
    const size_t n = size();
    const int shards = static_cast<int>(
        std::clamp<size_t>(n / kMinShardRows, 1, std::max(1, omp_get_max_threads())));
    if (shards == 1) return SearchRows(probes, nq, k, 0, n, sims, rows);
    // Each shard's own top k on a thread of its own, then merged.
    std::vector<float> shard_sims(size_t(shards) * nq * k);
    std::vector<int64_t> shard_rows(size_t(shards) * nq * k, -1);
    std::vector<absl::Status> status(shards);
    std::vector<std::thread> threads;
    for (int s = 1; s < shards; ++s) {
      threads.emplace_back(
          [&, s] { status[s] = SearchShard(probes, nq, k, s, shards, &shard_sims, &shard_rows); });
    }
    status[0] = SearchShard(probes, nq, k, 0, shards, &shard_sims, &shard_rows);
    for (std::thread& t : threads) t.join();
    for (const absl::Status& s : status) {
      if (!s.ok()) return s;
    }
    std::vector<std::pair<float, int64_t>> merged;
    for (int q = 0; q < nq; ++q) {
      merged.clear();
      for (int s = 0; s < shards; ++s) {
        const size_t at = (size_t(s) * nq + q) * k;
        for (int j = 0; j < k && shard_rows[at + j] >= 0; ++j) {
          merged.emplace_back(shard_sims[at + j], shard_rows[at + j]);
        }
      }
      const size_t keep = std::min<size_t>(k, merged.size());
      std::partial_sort(merged.begin(), merged.begin() + keep, merged.end(),
                        [](const auto& a, const auto& b) { return a.first > b.first; });
      for (int j = 0; j < k; ++j) {
        const bool have = size_t(j) < keep;
        sims[size_t(q) * k + j] = have ? merged[j].first : 0.0f;
        rows[size_t(q) * k + j] = have ? merged[j].second : -1;
      }
    }
    return absl::OkStatus();
  }

  void Row(size_t row, float* out) const override {
    std::memcpy(out, &matrix_[row * dim_], dim_ * sizeof(float));
  }

  size_t bytes() const override { return matrix_.capacity() * sizeof(float); }

 private:
  // Shard s of `shards` (rows split evenly) into its slots of the shard buffers.
  absl::Status SearchShard(const float* probes, int nq, int k, int s, int shards,
                           std::vector<float>* sims, std::vector<int64_t>* rows) const {
    const size_t n = size();
    const size_t begin = n * s / shards, end = n * (s + 1) / shards;
    const int shard_k = static_cast<int>(std::min<size_t>(k, end - begin));
    // FAISS writes nq × shard_k; spread into rows of k (the rest stays -1).
    std::vector<float> local_sims(size_t(nq) * shard_k);
    std::vector<int64_t> local_rows(size_t(nq) * shard_k);
    absl::Status searched =
        SearchRows(probes, nq, shard_k, begin, end, local_sims.data(), local_rows.data());
    if (!searched.ok()) return searched;
    for (int q = 0; q < nq; ++q) {
      const size_t at = (size_t(s) * nq + q) * k;
      for (int j = 0; j < shard_k; ++j) {
        (*sims)[at + j] = local_sims[size_t(q) * shard_k + j];
        const int64_t r = local_rows[size_t(q) * shard_k + j];
        (*rows)[at + j] = r < 0 ? -1 : r + static_cast<int64_t>(begin);
      }
    }
    return absl::OkStatus();
  }

  // Rows [begin, end) on the calling thread alone: FAISS's and OpenBLAS's OpenMP teams are held
  // to one thread for the call (a thread's own setting), since a search opens a parallel region
  // per block of 1024 rows, and with a team each one costs more than it saves (a 100k-face search
  // took 120-640 ms of CPU with two threads, 69-78 ms with one; docs/BENCHMARKS.md).
  absl::Status SearchRows(const float* probes, int nq, int k, size_t begin, size_t end, float* sims,
                          int64_t* rows) const {
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    absl::Status status;
    try {
      faiss::knn_inner_product(probes, matrix_.data() + begin * dim_, dim_, nq, end - begin, k,
                               sims, rows);
    } catch (const std::exception& e) {
      status = absl::InternalError(absl::StrCat("FAISS search failed: ", e.what()));
    }
    omp_set_num_threads(threads);
    return status;
  }

  const size_t dim_;
  std::vector<float> matrix_;
};

}  // namespace

std::unique_ptr<VectorIndex> MakeFlatIndex(int dim) {
  // BLAS from the first probe on, not from 20: Debian's libfaiss is built for the x86-64
  // baseline, so its own dot products run scalar, while OpenBLAS's sgemm is vectorized; one
  // probe against 100k faces took 47 ms of CPU the FAISS way and 19 ms through BLAS
  // (docs/BENCHMARKS.md, "Gallery search"). A process-wide FAISS setting, set once before the
  // first index exists (so before any search reads it).
  static const bool tuned = [] {
    faiss::distance_compute_blas_threshold = 1;
    return true;
  }();
  (void)tuned;
  return std::make_unique<FlatIndex>(dim);
}

}  // namespace arcface::gallery
