// The fake embedding model of the service's tests (no torch): the embedding of a crop is a
// deterministic function of its bytes, so every expected value can be computed by the test; it
// can hold its batches (Hold/Release) and fail the next one. Its crop geometry and embedding size
// are ArcFace's by default, or any other family's (a 150×150 / 128-d fake beside it).
#ifndef ARCFACE_TESTS_SERVICE_FAKE_MODEL_H_
#define ARCFACE_TESTS_SERVICE_FAKE_MODEL_H_

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/service/embedding_model.h"

namespace arcface::service {

// ArcFace's shapes, which most tests use.
using model::kCropBytes;
using model::kCropSize;
using model::kEmbeddingDim;

// A crop's fake embedding: row j is a function of the crop's bytes (a hash) and j, with values
// of both signs so that cosines spread over [-1, 1].
inline std::vector<float> FakeEmbedding(const uint8_t* crop, size_t crop_bytes = kCropBytes,
                                        int dim = kEmbeddingDim) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < crop_bytes; ++i) h = (h ^ crop[i]) * 1099511628211ull;
  std::vector<float> v(dim);
  uint64_t x = h;
  for (int j = 0; j < dim; ++j) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    v[j] = static_cast<float>(int((x * 2685821657736338717ull) >> 40) % 2001 - 1000) / 100.0f;
  }
  return v;
}

inline double Norm(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return std::sqrt(s);
}

// What the fakes share: each batch is recorded; while held, a batch waits (after it was
// recorded) until Release(); FailNext() makes the next batch fail with that status.
class BatchGate {
 public:
  // Called by a fake at the start of each batch of `size` items.
  absl::Status Enter(int size) {
    absl::MutexLock lock(&mu_);
    batch_sizes_.push_back(size);
    auto released = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !held_; };
    mu_.AwaitWithTimeout(absl::Condition(&released), absl::Seconds(60));
    return std::exchange(fail_next_, absl::OkStatus());
  }
  void FailNext(absl::Status s) {
    absl::MutexLock lock(&mu_);
    fail_next_ = std::move(s);
  }
  void Hold() {
    absl::MutexLock lock(&mu_);
    held_ = true;
  }
  void Release() {
    absl::MutexLock lock(&mu_);
    held_ = false;
  }
  bool WaitForBatches(size_t n) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, n]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return batch_sizes_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), absl::Seconds(60));
  }
  std::vector<int> batch_sizes() {
    absl::MutexLock lock(&mu_);
    return batch_sizes_;
  }

 private:
  absl::Mutex mu_;
  std::vector<int> batch_sizes_ ABSL_GUARDED_BY(mu_);
  absl::Status fail_next_ ABSL_GUARDED_BY(mu_);
  bool held_ ABSL_GUARDED_BY(mu_) = false;
};

// The geometry of a dlib-like fake: 150×150 crops, the five points anywhere inside.
inline constexpr model::CropGeometry kFakeDlibCrop = {
    150, {{{51.0f, 61.0f}, {99.0f, 61.0f}, {75.0f, 88.0f}, {56.0f, 112.0f}, {94.0f, 112.0f}}}};

class FakeModel final : public EmbeddingModel, public BatchGate {
 public:
  FakeModel() = default;
  FakeModel(const model::CropGeometry& geometry, int dim) : geometry_(geometry), dim_(dim) {}

  const model::CropGeometry& geometry() const override { return geometry_; }
  int embedding_dim() const override { return dim_; }
  absl::StatusOr<EmbeddingBatch> Run(absl::Span<const uint8_t> crops) override {
    const size_t crop_bytes = geometry_.bytes();
    const int n = static_cast<int>(crops.size() / crop_bytes);
    if (absl::Status s = Enter(n); !s.ok()) return s;
    EmbeddingBatch out;
    out.size = n;
    out.values.reserve(size_t(n) * dim_);
    for (int i = 0; i < n; ++i) {
      std::vector<float> e = FakeEmbedding(crops.data() + size_t(i) * crop_bytes, crop_bytes, dim_);
      out.values.insert(out.values.end(), e.begin(), e.end());
      out.norms.push_back(static_cast<float>(Norm(e)));
    }
    return out;
  }

 private:
  const model::CropGeometry geometry_ = model::kArcFaceCrop;
  const int dim_ = kEmbeddingDim;
};

}  // namespace arcface::service

#endif  // ARCFACE_TESTS_SERVICE_FAKE_MODEL_H_
