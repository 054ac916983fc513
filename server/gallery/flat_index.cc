// The exact index on the CPU: the gallery's unit vectors in one row-major matrix, searched by
// FAISS's knn_inner_product (blocked BLAS sgemm plus heaps, for any number of probes: see
// MakeFlatIndex), the same kernels as faiss::IndexFlatIP over the same memory.
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <faiss/utils/distances.h>

#include "absl/strings/str_cat.h"
#include "server/gallery/vector_index.h"

namespace arcface::gallery {
namespace {

class FlatIndex final : public VectorIndex {
 public:
  std::string Describe() const override { return "flat"; }
  size_t size() const override { return matrix_.size() / kDim; }

  absl::Status Add(const float* units, size_t n) override {
    matrix_.insert(matrix_.end(), units, units + n * kDim);
    return absl::OkStatus();
  }

  absl::Status Adopt(std::vector<float> units) override {
    if (matrix_.empty()) {
      matrix_ = std::move(units);
      return absl::OkStatus();
    }
    return Add(units.data(), units.size() / kDim);
  }

  void SwapRemove(size_t row) override {
    const size_t last = size() - 1;
    if (row != last) {
      std::memcpy(&matrix_[row * kDim], &matrix_[last * kDim], kDim * sizeof(float));
    }
    matrix_.resize(last * kDim);
  }

  absl::Status Search(const float* probes, int nq, int k, float* sims,
                      int64_t* rows) const override {
    try {
      faiss::knn_inner_product(probes, matrix_.data(), kDim, nq, size(), k, sims, rows);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("FAISS search failed: ", e.what()));
    }
    return absl::OkStatus();
  }

  void Row(size_t row, float* out) const override {
    std::memcpy(out, &matrix_[row * kDim], kDim * sizeof(float));
  }

  size_t bytes() const override { return matrix_.capacity() * sizeof(float); }

 private:
  std::vector<float> matrix_;
};

}  // namespace

std::unique_ptr<VectorIndex> MakeFlatIndex() {
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
  return std::make_unique<FlatIndex>();
}

}  // namespace arcface::gallery
