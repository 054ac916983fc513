// Embedder: the bridge between request handlers and the model. It owns the DynamicBatcher whose
// BatchFn gathers the crops of many requests into one contiguous batch, runs the EmbeddingModel
// and hands each request its rows.
//
// Contract
// - Input: Submit() takes crops already prepared (decoded, cropped, aligned) by the caller, on
//   the caller's thread or pool. The batcher's batch thread gathers the next batch's crops into
//   one contiguous buffer while the model runs the current batch (the batcher's StageFn); the
//   model threads (options.batching.max_batches_in_flight of them) only run the model and copy
//   each request's rows back to the rows' places, so crops of one request may come back in
//   any order and from concurrent batches. With more than one, the model's Run() must be
//   reentrant.
// - Ownership: Submit() takes the crops; the model is borrowed and must outlive the Embedder.
// - Blocking: Submit() never blocks (see DynamicBatcher::Schedule). Shutdown() blocks until
//   every accepted request got its `done` and the batcher's threads have exited.
// - Results: on an OK Submit(), `done` is called exactly once, on the batch thread, with the
//   request's EmbeddingBatch (size n: n × embedding_dim() raw floats and the n norms the model
//   computed, in crop order), or with the request's error:
//   DEADLINE_EXCEEDED / CANCELLED when it expired or was cancelled while queued (its crops never
//   reached the model), or the model's error for a batch it was in. A failure never touches the
//   crops of requests in other batches. `done` must be short and must not block on the model.
//   An expired request gives back its queue room at its deadline on the batcher's clock, a
//   cancelled one within options.batching.cancel_poll_interval, even while the model is busy
//   (see DynamicBatcher, "Expired and cancelled").
// - Errors of Submit() itself: INVALID_ARGUMENT (no crops, or a size that is not a multiple of
//   the model's crop, geometry().bytes()), RESOURCE_EXHAUSTED (queue full — transient — or more
//   crops than the whole queue holds), UNAVAILABLE (shutting down). Then `done` is never called,
//   and it and the crops are destroyed before Submit() returns: a refused request holds no memory.
// - Test hook: while the file options.hold_file (or options.hold_model_file) names exists, the
//   BatchFn waits before running the model (polling every 2 ms); held() is true meanwhile. The
//   batch it holds has already left the queue, so queue space counts only what arrives after it.
// - Thread safety: all methods may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_EMBEDDER_H_
#define ARCFACE_SERVER_SERVICE_EMBEDDER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/batching/clock.h"
#include "server/batching/dynamic_batcher.h"
#include "server/service/embedding_model.h"

namespace arcface::service {

struct EmbedderOptions {
  // The batcher's options, ranges and defaults (see DynamicBatcher::Options).
  batching::DynamicBatcher::Options batching;
  // Test hook (see the contract): paths whose existence holds each batch before the model (the
  // server's, and this model's own). Default empty: off.
  std::string hold_file;
  std::string hold_model_file;
};

class Embedder {
 public:
  using Done = absl::AnyInvocable<void(absl::StatusOr<EmbeddingBatch>)>;

  // `clock` null: real time. Errors name the offending batching option.
  static absl::StatusOr<std::unique_ptr<Embedder>> Create(const EmbedderOptions& options,
                                                          EmbeddingModel* model,
                                                          batching::Clock* clock = nullptr);
  ~Embedder();
  Embedder(const Embedder&) = delete;
  Embedder& operator=(const Embedder&) = delete;

  // `crops` holds n >= 1 crops of geometry().bytes() each. `deadline` is on the batcher's clock;
  // `is_cancelled` may be empty.
  absl::Status Submit(std::vector<uint8_t> crops, absl::Time deadline,
                      std::function<bool()> is_cancelled, Done done);

  void Shutdown();

  // The model's (EmbeddingModel::geometry(), embedding_dim()).
  const model::CropGeometry& geometry() const { return geometry_; }
  int embedding_dim() const { return dim_; }
  batching::DynamicBatcher& batcher() { return *batcher_; }
  bool held() const { return held_.load(); }

 private:
  struct EmbedTask;
  Embedder(const EmbedderOptions& options, EmbeddingModel* model);
  absl::Status RunBatch(batching::Batch& batch);
  void StageCrops(batching::Batch& batch, int first_item) const;
  void WaitWhileHeld();

  const EmbedderOptions options_;
  EmbeddingModel* const model_;
  const model::CropGeometry geometry_;
  const size_t crop_bytes_;
  const int dim_;
  std::atomic<bool> held_{false};
  std::unique_ptr<batching::DynamicBatcher> batcher_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_EMBEDDER_H_
