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

const std::vector<double>& LatencyBounds() {
  static const std::vector<double> bounds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                             0.1,    0.25,  0.5,    1,     2.5,  5,     10,
                                             30,     60};
  return bounds;
}

}  // namespace

ServiceMetrics::ServiceMetrics(int max_batch_size)
    : requests_(registry_.AddCounter("arcface_requests_total",
                                     "Finished RPCs (EmbedStream: messages) by method and code.",
                                     {"rpc", "code"})),
      request_seconds_(registry_.AddHistogram(
          "arcface_request_seconds", "Time from an RPC's (or stream message's) arrival to its answer.",
          LatencyBounds(), {"rpc"})),
      faces_total_(registry_
                       .AddCounter("arcface_faces_total",
                                   "Faces embedded successfully (Embed, EmbedStream, Compare).")
                       .WithLabels({})),
      rejected_(registry_.AddCounter("arcface_rejected_total",
                                     "Requests refused for load or size reasons, by reason.",
                                     {"reason"})),
      dropped_(registry_.AddCounter(
          "arcface_dropped_total",
          "Requests dropped by the batcher before the model (expired or cancelled while queued).",
          {"reason"})),
      batches_(registry_.AddCounter("arcface_batches_total", "Batches run, by outcome.",
                                    {"status"})),
      batch_size_(registry_
                      .AddHistogram("arcface_batch_size", "Crops per batch run by the model.",
                                    BatchSizeBounds(max_batch_size))
                      .WithLabels({})),
      queue_wait_(registry_
                      .AddHistogram("arcface_queue_wait_seconds",
                                    "Per crop: time from scheduling to its batch's formation.",
                                    LatencyBounds())
                      .WithLabels({})),
      inference_(registry_
                     .AddHistogram("arcface_inference_seconds",
                                   "Per batch: time in the model (the batch function).",
                                   LatencyBounds())
                     .WithLabels({})),
      preprocess_(registry_
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
      stage_(registry_
                 .AddHistogram("arcface_batch_stage_seconds",
                               "Per batch: gathering its crops into the model's input buffer "
                               "(mostly while the model runs the batch before).",
                               StageBounds())
                 .WithLabels({})),
      postprocess_(registry_
                       .AddHistogram("arcface_postprocess_seconds",
                                     "Per batch: handing its embeddings back to the requests "
                                     "and finishing the calls it completed.",
                                     StageBounds())
                       .WithLabels({})),
      model_idle_(registry_
                      .AddHistogram("arcface_model_idle_seconds",
                                    "Per batch: time the model sat idle between the previous "
                                    "batch and this one (the hand-over alone when saturated).",
                                    StageBounds())
                      .WithLabels({})),
      staged_ahead_(registry_
                        .AddCounter("arcface_staged_ahead_crops_total",
                                    "Crops whose input was gathered while the model still ran "
                                    "the batch before theirs.")
                        .WithLabels({})),
      inflight_(registry_.AddGauge("arcface_inflight_requests", "RPCs accepted and not finished.")
                    .WithLabels({})),
      stream_held_bytes_(registry_
                             .AddGauge("arcface_stream_held_bytes",
                                       "Bytes EmbedStream streams hold: messages read and not "
                                       "yet answered, answers not yet written.")
                             .WithLabels({})),
      model_info_(registry_.AddGauge("arcface_model_info", "The served model; always 1.",
                                     {"arch", "model_id", "device", "precision"})) {
  registry_.AddCallbackGauge("arcface_queue_depth", "Crops queued and not yet in a batch.",
                             [this] {
                               absl::MutexLock lock(&source_mu_);
                               return queue_depth_source_ ? queue_depth_source_() : 0.0;
                             });
  registry_.AddCallbackGauge(
      "arcface_batches_held",
      "1 while a batch is held before the model by the --test-hold-model-file hook.", [this] {
        absl::MutexLock lock(&source_mu_);
        return held_source_ ? held_source_() : 0.0;
      });
  registry_.AddCallbackGauge(
      "arcface_device_memory_allocated_bytes",
      "Bytes of the model's CUDA device held by live tensors (libtorch's caching allocator); "
      "0 on the CPU.",
      [this] { return static_cast<double>(ReadDeviceMemory().allocated_bytes); });
  registry_.AddCallbackGauge(
      "arcface_device_memory_reserved_bytes",
      "Bytes of the model's CUDA device reserved from the driver by libtorch's caching "
      "allocator; 0 on the CPU.",
      [this] { return static_cast<double>(ReadDeviceMemory().reserved_bytes); });
}

engine::DeviceMemory ServiceMetrics::ReadDeviceMemory() {
  absl::MutexLock lock(&source_mu_);
  return device_memory_source_ ? device_memory_source_() : engine::DeviceMemory();
}

void ServiceMetrics::SetDeviceMemorySource(std::function<engine::DeviceMemory()> read) {
  absl::MutexLock lock(&source_mu_);
  device_memory_source_ = std::move(read);
}

void ServiceMetrics::SetModelInfo(const std::string& arch, const std::string& model_id,
                                  const std::string& device, const std::string& precision) {
  model_info_.WithLabels({arch, model_id, device, precision}).Set(1);
}

void ServiceMetrics::SetQueueDepthSource(std::function<double()> read) {
  absl::MutexLock lock(&source_mu_);
  queue_depth_source_ = std::move(read);
}

void ServiceMetrics::SetHeldSource(std::function<double()> read) {
  absl::MutexLock lock(&source_mu_);
  held_source_ = std::move(read);
}

void ServiceMetrics::RecordRequest(const std::string& rpc, const absl::Status& status,
                                   double seconds) {
  requests_.WithLabels({rpc, absl::StatusCodeToString(status.code())}).Inc();
  request_seconds_.WithLabels({rpc}).Observe(seconds);
}

void ServiceMetrics::RecordRejected(const std::string& reason, int64_t faces) {
  rejected_.WithLabels({reason}).Inc();
}

void ServiceMetrics::OnBatch(const batching::BatchInfo& info) {
  batches_.WithLabels({info.status.ok() ? "ok" : "error"}).Inc();
  batch_size_.Observe(info.size);
  for (absl::Duration wait : info.queue_waits) queue_wait_.Observe(absl::ToDoubleSeconds(wait));
  inference_.Observe(absl::ToDoubleSeconds(info.run_time));
  stage_.Observe(absl::ToDoubleSeconds(info.stage_time));
  postprocess_.Observe(absl::ToDoubleSeconds(info.finish_time));
  if (info.model_idle.has_value()) model_idle_.Observe(absl::ToDoubleSeconds(*info.model_idle));
  staged_ahead_.Inc(info.items_staged_ahead);
}

void ServiceMetrics::OnRejected(batching::RejectReason reason, int num_items) {
  switch (reason) {
    case batching::RejectReason::kQueueFull:
      RecordRejected("queue_full", num_items);
      break;
    case batching::RejectReason::kTooLarge:
      RecordRejected("too_large", num_items);
      break;
    case batching::RejectReason::kShuttingDown:
      RecordRejected("shutting_down", num_items);
      break;
    case batching::RejectReason::kInvalid:
      break;  // a bug of ours, not load: it surfaces as the request's error
  }
}

void ServiceMetrics::OnDropped(batching::DropReason reason, int num_items_dropped) {
  dropped_.WithLabels({reason == batching::DropReason::kExpired ? "expired" : "cancelled"}).Inc();
}

}  // namespace arcface::service
