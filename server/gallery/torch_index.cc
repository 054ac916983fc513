#include "server/gallery/torch_index.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/gallery/gallery_store.h"

namespace arcface::gallery {
namespace {

// The first allocation's rows: small galleries need not double their way up from one row.
constexpr int64_t kMinCapacity = 1024;

absl::Status TorchError(const char* what, const c10::Error& e) {
  return absl::InternalError(
      absl::StrCat("device index ", what, " failed: ", e.what_without_backtrace()));
}

absl::Status OutOfMemory(const char* what, const c10::OutOfMemoryError& e) {
  return absl::ResourceExhaustedError(
      absl::StrCat("device index ", what, ": out of memory: ", e.what_without_backtrace()));
}

class TorchIndex final : public VectorIndex {
 public:
  TorchIndex(c10::Device device, int dim) : device_(device), dim_(dim) {}

  std::string Describe() const override { return absl::StrCat("torch:", device_.str()); }

  size_t size() const override { return static_cast<size_t>(rows_); }

  absl::Status Add(const float* units, size_t n) override {
    if (absl::Status s = Broken(); !s.ok()) return s;
    if (n == 0) return absl::OkStatus();
    if (units == nullptr) return absl::InvalidArgumentError("device index Add: null vectors");
    const int64_t count = static_cast<int64_t>(n);
    try {
      c10::InferenceMode inference;
      // from_blob only reads `units` here (the tensor is the source of a copy).
      const torch::Tensor host =
          torch::from_blob(const_cast<float*>(units), {count, dim_}, torch::dtype(torch::kFloat32));
      const int64_t needed = rows_ + count;
      if (needed > capacity()) {
        const int64_t grown = std::max({needed, 2 * capacity(), kMinCapacity});
        torch::Tensor bigger =
            torch::empty({grown, dim_}, torch::dtype(torch::kFloat32).device(device_));
        if (rows_ > 0) bigger.narrow(0, 0, rows_).copy_(matrix_.narrow(0, 0, rows_));
        bigger.narrow(0, rows_, count).copy_(host);
        matrix_ = std::move(bigger);
      } else {
        // Rows past rows_ hold nothing: a failed copy there changes nothing that is seen.
        matrix_.narrow(0, rows_, count).copy_(host);
      }
      rows_ = needed;
    } catch (const c10::OutOfMemoryError& e) {
      return OutOfMemory("add", e);
    } catch (const c10::Error& e) {
      return TorchError("add", e);
    }
    return absl::OkStatus();
  }

  absl::Status Adopt(std::vector<float> units) override {
    if (units.size() % dim_ != 0) {
      return absl::InvalidArgumentError(absl::StrCat("device index Adopt: ", units.size(),
                                                     " floats are not a whole number of rows of ",
                                                     dim_));
    }
    // The rows go to the device; the host copy is freed when `units` goes out of scope.
    return Add(units.data(), units.size() / dim_);
  }

  void SwapRemove(size_t row) override {
    const int64_t r = static_cast<int64_t>(row);
    if (r >= rows_) {
      MarkBroken(absl::InternalError(
          absl::StrCat("device index SwapRemove: row ", row, " of ", rows_, " rows")));
      return;
    }
    const int64_t last = rows_ - 1;
    if (r != last) {
      try {
        c10::InferenceMode inference;
        matrix_[r].copy_(matrix_[last]);
      } catch (const c10::Error& e) {
        MarkBroken(TorchError("swap-remove", e));
        return;
      }
    }
    rows_ = last;
  }

  absl::Status Search(const float* probes, int nq, int k, float* sims,
                      int64_t* rows) const override {
    if (nq < 0 || k < 1 || k > rows_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device index Search: needs nq >= 0 and 1 <= k <= ", rows_, ", got nq=", nq, " k=", k));
    }
    if (absl::Status s = Broken(); !s.ok()) return s;
    if (nq == 0) return absl::OkStatus();
    try {
      c10::InferenceMode inference;
      const torch::Tensor queries =
          torch::from_blob(const_cast<float*>(probes), {nq, dim_}, torch::dtype(torch::kFloat32))
              .to(device_);
      const torch::Tensor scores = torch::matmul(queries, matrix_.narrow(0, 0, rows_).t());
      auto [values, indices] = scores.topk(k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
      // Back to the caller's buffers; from a device this waits for the answer.
      torch::from_blob(sims, {nq, k}, torch::dtype(torch::kFloat32)).copy_(values);
      torch::from_blob(rows, {nq, k}, torch::dtype(torch::kInt64)).copy_(indices);
    } catch (const c10::OutOfMemoryError& e) {
      return OutOfMemory("search", e);
    } catch (const c10::Error& e) {
      return TorchError("search", e);
    }
    return absl::OkStatus();
  }

  void Row(size_t row, float* out) const override {
    try {
      c10::InferenceMode inference;
      torch::from_blob(out, {dim_}, torch::dtype(torch::kFloat32))
          .copy_(matrix_[static_cast<int64_t>(row)]);
    } catch (const c10::Error& e) {
      std::fill(out, out + dim_, std::numeric_limits<float>::quiet_NaN());
      MarkBroken(TorchError("row read", e));
    }
  }

  size_t bytes() const override { return static_cast<size_t>(capacity()) * dim_ * sizeof(float); }

 private:
  int64_t capacity() const { return matrix_.defined() ? matrix_.size(0) : 0; }

  absl::Status Broken() const {
    absl::MutexLock lock(&mu_);
    return broken_;
  }

  void MarkBroken(absl::Status failure) const {
    absl::MutexLock lock(&mu_);
    if (broken_.ok()) {
      broken_ = absl::InternalError(
          absl::StrCat("device index unusable since an earlier failure: ", failure.message()));
    }
  }

  const c10::Device device_;
  const int64_t dim_;
  // Rows [0, rows_) of [capacity × dim_]. Changed only by Add() and SwapRemove(), which the
  // caller runs alone (VectorIndex's contract), so Search() reads them without a lock.
  torch::Tensor matrix_;
  int64_t rows_ = 0;
  mutable absl::Mutex mu_;
  // The first failure that SwapRemove() or Row() could not report.
  mutable absl::Status broken_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

std::unique_ptr<VectorIndex> MakeTorchIndex(c10::Device device, int dim) {
  return std::make_unique<TorchIndex>(device, dim);
}

}  // namespace arcface::gallery
