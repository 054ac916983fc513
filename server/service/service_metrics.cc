#include "server/service/service_metrics.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/time/time.h"

namespace arcface::service {
namespace {

// Powers of two up to max_batch_size, and max_batch_size itself, so that "every batch was
// within the limit" reads off one bucket.
std::vector<double> BatchSizeBounds(int max_batch_size) {
  std::vector<double> bounds;
  for (int b = 1; b < max_batch_size; b *= 2) bounds.push_back(b);
  bounds.push_back(std::max(1, max_batch_size));
  return bounds;
}

// Per-stage times of a batch, which range from microseconds (a hand-over) to seconds (a CPU
// forward pass).
const std::vector<double>& StageBounds() {
  static const std::vector<double> bounds = {1e-5,  2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 0.001,
                                             0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                             0.5,    1,     2.5,  5,     10};
  return bounds;
}

std::vector<std::string> Labels(const std::vector<std::string>& first,
                                std::vector<std::string> rest) {
  std::vector<std::string> names = first;
  names.insert(names.end(), rest.begin(), rest.end());
  return names;
}

const std::vector<double>& LatencyBounds() {
  static const std::vector<double> bounds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                             0.1,    0.25,  0.5,    1,     2.5,  5,     10,
                                             30,     60};
  return bounds;
}

}  // namespace

ServiceMetrics::ServiceMetrics(int max_batch_size, std::vector<std::string> models)
    : model_label_(models.size() > 1 ? std::vector<std::string>{"model"}
                                     : std::vector<std::string>{}),
      requests_(registry_.AddCounter("arcface_requests_total",
                                     "Finished RPCs (EmbedStream: messages) by method and code.",
                                     Labels(model_label_, {"rpc", "code"}))),
      request_seconds_(
          registry_.AddHistogram("arcface_request_seconds",
                                 "Time from an RPC's (or stream message's) arrival to its answer.",
                                 LatencyBounds(), {"rpc"})),
      faces_total_(registry_
                       .AddCounter("arcface_faces_total",
                                   "Faces embedded successfully (Embed, EmbedStream, Compare).")
                       .WithLabels({})),
      rejected_(registry_.AddCounter("arcface_rejected_total",
                                     "Requests refused for load or size reasons, by reason.",
                                     Labels(model_label_, {"reason"}))),
      dropped_(registry_.AddCounter(
          "arcface_dropped_total",
          "Requests dropped by the batcher before the model (expired or cancelled while queued).",
          Labels(model_label_, {"reason"}))),
      batches_(registry_.AddCounter("arcface_batches_total", "Batches run, by outcome.",
                                    Labels(model_label_, {"status"}))),
      batch_size_(registry_.AddHistogram("arcface_batch_size", "Crops per batch run by the model.",
                                         BatchSizeBounds(max_batch_size), model_label_)),
      queue_wait_(registry_.AddHistogram("arcface_queue_wait_seconds",
                                         "Per crop: time from scheduling to its batch's formation.",
                                         LatencyBounds(), model_label_)),
      inference_(registry_.AddHistogram("arcface_inference_seconds",
                                        "Per batch: time in the model (the batch function).",
                                        LatencyBounds(), model_label_)),
      preprocess_(
          registry_
              .AddHistogram("arcface_preprocess_seconds",
                            "Per request: time spent decoding, cropping and aligning its faces "
                            "(its turns on the pool, not the waits between them).",
                            StageBounds())
              .WithLabels({})),
      preprocess_faces_(registry_
                            .AddCounter("arcface_preprocess_faces_total",
                                        "Faces decoded, cropped and aligned on the "
                                        "preprocessing pool.")
                            .WithLabels({})),
      preprocess_aborted_(registry_.AddCounter(
          "arcface_preprocess_aborted_total",
          "Calls whose preprocessing or Compare matrix stopped early because their deadline "
          "passed or they were cancelled, by reason (deadline, cancelled).",
          {"reason"})),
      stage_(registry_.AddHistogram("arcface_batch_stage_seconds",
                                    "Per batch: gathering its crops into the model's input buffer "
                                    "(mostly while the model runs the batch before).",
                                    StageBounds(), model_label_)),
      postprocess_(registry_.AddHistogram("arcface_postprocess_seconds",
                                          "Per batch: handing its embeddings back to the requests "
                                          "and finishing the calls it completed.",
                                          StageBounds(), model_label_)),
      model_idle_(registry_.AddHistogram(
          "arcface_model_idle_seconds",
          "Per batch: time the model sat idle between the previous batch and this one (the "
          "hand-over alone when saturated).",
          StageBounds(), model_label_)),
      staged_ahead_(registry_.AddCounter("arcface_staged_ahead_crops_total",
                                         "Crops whose input was gathered while the model still "
                                         "ran the batch before theirs.",
                                         model_label_)),
      inflight_(registry_.AddGauge("arcface_inflight_requests", "RPCs accepted and not finished.")
                    .WithLabels({})),
      stream_held_bytes_(registry_
                             .AddGauge("arcface_stream_held_bytes",
                                       "Bytes EmbedStream streams hold: messages read and not "
                                       "yet answered, answers not yet written.")
                             .WithLabels({})),
      model_info_(
          registry_.AddGauge("arcface_model_info",
                             "The served model: 1 for the weights serving, 0 for weights a "
                             "reload replaced.",
                             Labels(model_label_, {"arch", "model_id", "device", "precision"}))),
      queue_depth_(registry_.AddGauge("arcface_queue_depth", "Crops queued and not yet in a batch.",
                                      model_label_)),
      batches_held_(registry_.AddGauge(
          "arcface_batches_held",
          "1 while a batch is held before the model by the --test-hold-model-file hook.",
          model_label_)),
      device_allocated_(registry_.AddGauge(
          "arcface_device_memory_allocated_bytes",
          "Bytes of the model's CUDA device held by live tensors (libtorch's caching allocator); "
          "0 on the CPU.",
          model_label_)),
      device_reserved_(registry_.AddGauge(
          "arcface_device_memory_reserved_bytes",
          "Bytes of the model's CUDA device reserved from the driver by libtorch's caching "
          "allocator; 0 on the CPU.",
          model_label_)),
      reloads_(registry_.AddCounter(
          "arcface_model_reloads_total",
          "Reloads of a served model (SIGHUP, ReloadModels), by model and result: reloaded, "
          "unchanged (same weights), failed (the previous weights keep serving).",
          {"model", "result"})) {
  for (const std::string& name : models) {
    models_.push_back(std::unique_ptr<ModelMetrics>(new ModelMetrics(
        this, model_label_.empty() ? std::vector<std::string>{} : std::vector<std::string>{name})));
  }
  registry_.AddRenderHook([this] {
    for (const auto& m : models_) m->Refresh();
  });
}

ModelMetrics* ServiceMetrics::ForModel(const std::string& name) {
  for (const auto& m : models_) {
    if (m->label_.empty() || m->label_.front() == name) return m.get();
  }
  return models_.front().get();
}

ModelMetrics::ModelMetrics(ServiceMetrics* parent, std::vector<std::string> label)
    : parent_(parent),
      label_(std::move(label)),
      batch_size_(parent->batch_size_.WithLabels(label_)),
      queue_wait_(parent->queue_wait_.WithLabels(label_)),
      inference_(parent->inference_.WithLabels(label_)),
      stage_(parent->stage_.WithLabels(label_)),
      postprocess_(parent->postprocess_.WithLabels(label_)),
      model_idle_(parent->model_idle_.WithLabels(label_)),
      staged_ahead_(parent->staged_ahead_.WithLabels(label_)) {
  Refresh();
}

std::vector<std::string> ModelMetrics::With(std::vector<std::string> more) const {
  std::vector<std::string> values = label_;
  values.insert(values.end(), more.begin(), more.end());
  return values;
}

void ModelMetrics::Refresh() {
  absl::MutexLock lock(&source_mu_);
  parent_->queue_depth_.WithLabels(label_).Set(queue_depth_source_ ? queue_depth_source_() : 0.0);
  parent_->batches_held_.WithLabels(label_).Set(held_source_ ? held_source_() : 0.0);
  const engine::DeviceMemory memory =
      device_memory_source_ ? device_memory_source_() : engine::DeviceMemory();
  parent_->device_allocated_.WithLabels(label_).Set(static_cast<double>(memory.allocated_bytes));
  parent_->device_reserved_.WithLabels(label_).Set(static_cast<double>(memory.reserved_bytes));
}

void ModelMetrics::SetDeviceMemorySource(std::function<engine::DeviceMemory()> read) {
  absl::MutexLock lock(&source_mu_);
  device_memory_source_ = std::move(read);
}

void ModelMetrics::SetModelInfo(const std::string& arch, const std::string& model_id,
                                const std::string& device, const std::string& precision) {
  Gauge& info = parent_->model_info_.WithLabels(With({arch, model_id, device, precision}));
  {
    absl::MutexLock lock(&source_mu_);
    if (info_ != nullptr && info_ != &info) info_->Set(0);
    info_ = &info;
    info_->Set(1);
  }
  if (label_.empty()) return;
  absl::MutexLock lock(&parent_->names_mu_);
  parent_->name_of_model_id_[model_id] = label_.front();
}

void ModelMetrics::SetQueueDepthSource(std::function<double()> read) {
  absl::MutexLock lock(&source_mu_);
  queue_depth_source_ = std::move(read);
}

void ModelMetrics::SetHeldSource(std::function<double()> read) {
  absl::MutexLock lock(&source_mu_);
  held_source_ = std::move(read);
}

std::vector<std::string> ServiceMetrics::ModelFirst(const std::string& model,
                                                    std::vector<std::string> more) const {
  if (model_label_.empty()) return more;
  more.insert(more.begin(), model);
  return more;
}

void ServiceMetrics::RecordRequest(const std::string& rpc, const absl::Status& status,
                                   double seconds, const std::string& model_id) {
  std::string model;
  if (!model_label_.empty() && !model_id.empty()) {
    absl::MutexLock lock(&names_mu_);
    auto it = name_of_model_id_.find(model_id);
    if (it != name_of_model_id_.end()) model = it->second;
  }
  requests_.WithLabels(ModelFirst(model, {rpc, absl::StatusCodeToString(status.code())})).Inc();
  request_seconds_.WithLabels({rpc}).Observe(seconds);
}

void ServiceMetrics::RecordRejected(const std::string& reason, int64_t faces) {
  rejected_.WithLabels(ModelFirst("", {reason})).Inc();
}

void ModelMetrics::OnBatch(const batching::BatchInfo& info) {
  parent_->batches_.WithLabels(With({info.status.ok() ? "ok" : "error"})).Inc();
  batch_size_.Observe(info.size);
  for (absl::Duration wait : info.queue_waits) queue_wait_.Observe(absl::ToDoubleSeconds(wait));
  inference_.Observe(absl::ToDoubleSeconds(info.run_time));
  stage_.Observe(absl::ToDoubleSeconds(info.stage_time));
  postprocess_.Observe(absl::ToDoubleSeconds(info.finish_time));
  if (info.model_idle.has_value()) model_idle_.Observe(absl::ToDoubleSeconds(*info.model_idle));
  staged_ahead_.Inc(info.items_staged_ahead);
}

void ModelMetrics::OnRejected(batching::RejectReason reason, int num_items) {
  const char* name = nullptr;
  switch (reason) {
    case batching::RejectReason::kQueueFull:
      name = "queue_full";
      break;
    case batching::RejectReason::kTooLarge:
      name = "too_large";
      break;
    case batching::RejectReason::kShuttingDown:
      name = "shutting_down";
      break;
    case batching::RejectReason::kInvalid:
      return;  // a bug of ours, not load: it surfaces as the request's error
  }
  parent_->rejected_.WithLabels(With({name})).Inc();
}

void ModelMetrics::OnDropped(batching::DropReason reason, int num_items_dropped) {
  parent_->dropped_
      .WithLabels(With({reason == batching::DropReason::kExpired ? "expired" : "cancelled"}))
      .Inc();
}

}  // namespace arcface::service
