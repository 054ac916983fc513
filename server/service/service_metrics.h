// ServiceMetrics: the service's fixed set of metric families (requests, faces, rejections,
// batches and their stages, preprocessing, in-flight calls, stream bytes, the models), kept in a
// MetricsRegistry (prometheus_registry.h) and rendered for /metrics; also the batchers'
// observers, one per model (ForModel()).
//
// The model label: the families of a model's batcher and engine (arcface_batches_total,
// arcface_batch_size, arcface_queue_wait_seconds, arcface_inference_seconds,
// arcface_batch_stage_seconds, arcface_postprocess_seconds, arcface_model_idle_seconds,
// arcface_staged_ahead_crops_total, arcface_dropped_total, arcface_queue_depth,
// arcface_batches_held, arcface_device_memory_*_bytes, arcface_model_info) carry a `model` label
// (the served model's name, first) when the server serves several models. With one model they
// have none, so that a one-model server's exposition, and the dashboards and alerts written for
// it, stay as they were. The same rule labels arcface_requests_total (the model whose version
// published the model_id that the call's response names, SetModelInfo(); "" for calls that no
// served model answered: refused before one was resolved, an unknown model name, a call that
// needs none, embeddings of another model) and arcface_rejected_total (the model whose batcher
// refused; "" for the server's own limits: draining, too_many_faces, compare_too_large,
// preprocess_queue_full). Label values are served names only, never a caller's string; a call
// answered by a version that a reload has since replaced still counts under its model.
//
// Contract
// - Ownership: owns its registry; the sources set with Set*Source() are called at each scrape
//   and must stay valid until they are replaced or the metrics are destroyed.
// - Blocking: recording takes only the registry's short locks (see prometheus_registry.h);
//   Render() calls the sources, which must be cheap.
// - Errors: none; label values come from the service, never from a caller.
// - Thread safety: every method may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_SERVICE_METRICS_H_
#define ARCFACE_SERVER_SERVICE_SERVICE_METRICS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "server/batching/dynamic_batcher.h"
#include "server/engine/engine.h"
#include "server/service/prometheus_registry.h"

namespace arcface::service {

// The service's metrics. Label values for `code` are gRPC code names ("OK",
// "INVALID_ARGUMENT"); for `rpc` the method name ("Embed", "EmbedStream", "Compare",
// "GetModelInfo"; EmbedStream counts each message of a stream).
class ServiceMetrics;

// One model's series: its batcher's observer and the sources read at each scrape.
class ModelMetrics final : public batching::BatcherObserver {
 public:
  // arcface_model_info: 1 for the version serving, 0 for those it replaced (a reload).
  void SetModelInfo(const std::string& arch, const std::string& model_id, const std::string& device,
                    const std::string& precision) ABSL_LOCKS_EXCLUDED(source_mu_);
  // Read at each scrape (the batcher's queue_depth()); unset: 0.
  void SetQueueDepthSource(std::function<double()> read) ABSL_LOCKS_EXCLUDED(source_mu_);
  void SetHeldSource(std::function<double()> read) ABSL_LOCKS_EXCLUDED(source_mu_);
  // The model's device memory (arcface_device_memory_{allocated,reserved}_bytes); unset: 0.
  void SetDeviceMemorySource(std::function<engine::DeviceMemory()> read)
      ABSL_LOCKS_EXCLUDED(source_mu_);

  // BatcherObserver
  void OnBatch(const batching::BatchInfo& info) override;
  void OnRejected(batching::RejectReason reason, int num_items) override;
  void OnDropped(batching::DropReason reason, int num_items_dropped) override;

 private:
  friend class ServiceMetrics;
  ModelMetrics(ServiceMetrics* parent, std::vector<std::string> label);
  // The sources into the scrape's gauges.
  void Refresh() ABSL_LOCKS_EXCLUDED(source_mu_);
  // The label values: {} with one model, {name} with several.
  std::vector<std::string> With(std::vector<std::string> more) const;

  ServiceMetrics* const parent_;
  const std::vector<std::string> label_;
  Histogram& batch_size_;
  Histogram& queue_wait_;
  Histogram& inference_;
  Histogram& stage_;
  Histogram& postprocess_;
  Histogram& model_idle_;
  Counter& staged_ahead_;
  absl::Mutex source_mu_;
  std::function<double()> queue_depth_source_ ABSL_GUARDED_BY(source_mu_);
  std::function<double()> held_source_ ABSL_GUARDED_BY(source_mu_);
  std::function<engine::DeviceMemory()> device_memory_source_ ABSL_GUARDED_BY(source_mu_);
  Gauge* info_ ABSL_GUARDED_BY(source_mu_) = nullptr;  // the serving version's
};

class ServiceMetrics final : public batching::BatcherObserver {
 public:
  // `max_batch_size` shapes the batch-size buckets (powers of two up to it, and it exactly).
  // `models`: the served models' names, the default first (see the model label above).
  explicit ServiceMetrics(int max_batch_size, std::vector<std::string> models = {""});

  // The series of model `name`; the default model's for an unknown name.
  ModelMetrics* ForModel(const std::string& name);

  // The default model's (ForModel()'s), for one-model servers and tests.
  void SetModelInfo(const std::string& arch, const std::string& model_id, const std::string& device,
                    const std::string& precision) {
    models_.front()->SetModelInfo(arch, model_id, device, precision);
  }
  void SetQueueDepthSource(std::function<double()> read) {
    models_.front()->SetQueueDepthSource(std::move(read));
  }
  void SetHeldSource(std::function<double()> read) {
    models_.front()->SetHeldSource(std::move(read));
  }
  void SetDeviceMemorySource(std::function<engine::DeviceMemory()> read) {
    models_.front()->SetDeviceMemorySource(std::move(read));
  }

  // `model_id`: the call's response's, or "" (see the model label above).
  void RecordRequest(const std::string& rpc, const absl::Status& status, double seconds,
                     const std::string& model_id = "") ABSL_LOCKS_EXCLUDED(names_mu_);
  void AddFaces(int64_t n) { faces_total_.Inc(static_cast<double>(n)); }
  // One request's faces decoded, cropped and aligned (on the preprocessing pool): the time of
  // its steps, not of the turns it waited between them.
  void RecordPreprocess(double seconds) { preprocess_.Observe(seconds); }
  // One face decoded, cropped and aligned (whatever becomes of its call).
  void AddPreprocessedFace() { preprocess_faces_.Inc(); }
  // A call's preprocessing (or Compare matrix) stopped early: "deadline" or "cancelled".
  void RecordPreprocessAborted(const std::string& reason) {
    preprocess_aborted_.WithLabels({reason}).Inc();
  }
  // Reasons: "too_many_faces", "draining", "preprocess_queue_full", "compare_too_large" (the
  // server's limits, model ""); a model's batcher counts "queue_full", "too_large" and
  // "shutting_down" as ModelMetrics::OnRejected.
  void RecordRejected(const std::string& reason, int64_t faces = 1);
  // A model's reload (model_reloader.h): result "reloaded", "unchanged" or "failed".
  void RecordReload(const std::string& model, const std::string& result) {
    reloads_.WithLabels({model, result}).Inc();
  }
  Gauge& inflight() { return inflight_; }
  // Bytes EmbedStream streams hold (FaceEmbeddingService: messages read and not answered,
  // answers not written).
  Gauge& stream_held_bytes() { return stream_held_bytes_; }

  // BatcherObserver: the default model's.
  void OnBatch(const batching::BatchInfo& info) override { models_.front()->OnBatch(info); }
  void OnRejected(batching::RejectReason reason, int num_items) override {
    models_.front()->OnRejected(reason, num_items);
  }
  void OnDropped(batching::DropReason reason, int num_items_dropped) override {
    models_.front()->OnDropped(reason, num_items_dropped);
  }

  std::string Render() const { return registry_.Render(); }
  MetricsRegistry& registry() { return registry_; }

 private:
  friend class ModelMetrics;

  // `model`'s label values before `more`: none with one model.
  std::vector<std::string> ModelFirst(const std::string& model,
                                      std::vector<std::string> more) const;

  MetricsRegistry registry_;
  // Every model_id a served model's versions published (SetModelInfo), to its name; only with
  // several models.
  absl::Mutex names_mu_;
  std::map<std::string, std::string> name_of_model_id_ ABSL_GUARDED_BY(names_mu_);
  // {"model"} with several models, else {}: the model families' first label names.
  const std::vector<std::string> model_label_;
  Family<Counter>& requests_;
  Family<Histogram>& request_seconds_;
  Counter& faces_total_;
  Family<Counter>& rejected_;
  Family<Counter>& dropped_;
  Family<Counter>& batches_;
  Family<Histogram>& batch_size_;
  Family<Histogram>& queue_wait_;
  Family<Histogram>& inference_;
  Histogram& preprocess_;
  Counter& preprocess_faces_;
  Family<Counter>& preprocess_aborted_;
  Family<Histogram>& stage_;
  Family<Histogram>& postprocess_;
  Family<Histogram>& model_idle_;
  Family<Counter>& staged_ahead_;
  Gauge& inflight_;
  Gauge& stream_held_bytes_;
  Family<Gauge>& model_info_;
  Family<Gauge>& queue_depth_;
  Family<Gauge>& batches_held_;
  Family<Gauge>& device_allocated_;
  Family<Gauge>& device_reserved_;
  Family<Counter>& reloads_;
  // One per served model, the default first; fixed after construction.
  std::vector<std::unique_ptr<ModelMetrics>> models_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_SERVICE_METRICS_H_
