#include "server/service/embedder.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace arcface::service {

struct Embedder::EmbedTask : batching::Task {
  std::vector<uint8_t> crops;  // num_items × the model's crop bytes
  EmbeddingBatch rows;         // num_items rows, filled by RunBatch
  Done user_done;
};

absl::StatusOr<std::unique_ptr<Embedder>> Embedder::Create(const EmbedderOptions& options,
                                                           EmbeddingModel* model,
                                                           batching::Clock* clock) {
  if (model == nullptr) return absl::InvalidArgumentError("embedder: no model");
  std::unique_ptr<Embedder> embedder(new Embedder(options, model));
  Embedder* raw = embedder.get();
  auto batcher = batching::DynamicBatcher::Create(
      options.batching, [raw](batching::Batch& batch) { return raw->RunBatch(batch); }, clock,
      [raw](batching::Batch& batch, int first_item) { raw->StageCrops(batch, first_item); });
  if (!batcher.ok()) return batcher.status();
  embedder->batcher_ = std::move(*batcher);
  return embedder;
}

Embedder::Embedder(const EmbedderOptions& options, EmbeddingModel* model)
    : options_(options),
      model_(model),
      geometry_(model->geometry()),
      crop_bytes_(geometry_.bytes()),
      dim_(model->embedding_dim()) {}

Embedder::~Embedder() { Shutdown(); }

void Embedder::Shutdown() {
  if (batcher_) batcher_->Shutdown();
}

absl::Status Embedder::Submit(std::vector<uint8_t> crops, absl::Time deadline,
                              std::function<bool()> is_cancelled, Done done) {
  if (crops.empty() || crops.size() % crop_bytes_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("crops buffer of ", crops.size(), " bytes is not a whole number of crops"));
  }
  auto task = std::make_shared<EmbedTask>();
  task->num_items = static_cast<int>(crops.size() / crop_bytes_);
  task->deadline = deadline;
  task->is_cancelled = std::move(is_cancelled);
  task->crops = std::move(crops);
  // Sized here, not in RunBatch: with several batches in flight, batches holding different
  // crops of this request write their rows at the same time.
  task->rows.size = task->num_items;
  task->rows.values.resize(size_t(task->num_items) * dim_);
  task->rows.norms.resize(size_t(task->num_items));
  task->user_done = std::move(done);
  // A plain pointer, not a shared_ptr: the batcher keeps the task alive until `done` has
  // returned, and a task that holds itself would live on if the batcher did not run or destroy
  // `done`. On a rejection the batcher destroys `done` unrun and `task` is the last reference,
  // so the crops and the caller's `done` are released before Submit() returns.
  EmbedTask* raw = task.get();
  task->done = [raw](absl::Status status) {
    // The crops are no longer needed once the task ended; free them before the caller's work.
    std::vector<uint8_t>().swap(raw->crops);
    Done user_done = std::move(raw->user_done);
    if (status.ok()) {
      user_done(std::move(raw->rows));
    } else {
      user_done(std::move(status));
    }
  };
  return batcher_->Schedule(std::move(task));
}

void Embedder::WaitWhileHeld() {
  if (options_.hold_file.empty() && options_.hold_model_file.empty()) return;
  auto exists = [](const std::string& path) {
    struct stat st;
    return !path.empty() && ::stat(path.c_str(), &st) == 0;
  };
  while (exists(options_.hold_file) || exists(options_.hold_model_file)) {
    held_.store(true);
    absl::SleepFor(absl::Milliseconds(2));
  }
  held_.store(false);
}

void Embedder::StageCrops(batching::Batch& batch, int first_item) const {
  // One contiguous uint8 buffer for the model, gathered while the model runs the batch before.
  batch.staging.resize(size_t(batch.size) * crop_bytes_);
  int position = 0;
  for (const batching::BatchSlice& s : batch.slices) {
    const int skip = std::clamp(first_item - position, 0, s.num_items);
    if (skip < s.num_items) {
      const auto* task = static_cast<const EmbedTask*>(s.task);
      std::memcpy(batch.staging.data() + size_t(position + skip) * crop_bytes_,
                  task->crops.data() + size_t(s.first_item + skip) * crop_bytes_,
                  size_t(s.num_items - skip) * crop_bytes_);
    }
    position += s.num_items;
  }
}

absl::Status Embedder::RunBatch(batching::Batch& batch) {
  WaitWhileHeld();
  const absl::Span<const uint8_t> input =
      absl::MakeConstSpan(batch.staging.data(), size_t(batch.size) * crop_bytes_);
  absl::StatusOr<EmbeddingBatch> out = model_->Run(input);
  if (!out.ok()) return out.status();
  if (out->values.size() != size_t(batch.size) * dim_ || out->norms.size() != size_t(batch.size)) {
    return absl::InternalError(absl::StrCat(
        "the model returned ", out->values.size(), " values and ", out->norms.size(), " norms for ",
        batch.size, " crops, expected ", size_t(batch.size) * dim_, " and ", batch.size));
  }
  const float* values = out->values.data();
  const float* norms = out->norms.data();
  for (batching::BatchSlice& s : batch.slices) {
    EmbeddingBatch& rows = static_cast<EmbedTask*>(s.task)->rows;
    const size_t n = size_t(s.num_items);
    std::memcpy(rows.values.data() + size_t(s.first_item) * dim_, values, n * dim_ * sizeof(float));
    std::memcpy(rows.norms.data() + s.first_item, norms, n * sizeof(float));
    values += n * dim_;
    norms += n;
  }
  return absl::OkStatus();
}

}  // namespace arcface::service
