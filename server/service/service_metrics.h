// ServiceMetrics: the service's fixed set of metric families (requests, faces, rejections,
// batches and their stages, preprocessing, in-flight calls, stream bytes, the model), kept in a
// MetricsRegistry (prometheus_registry.h) and rendered for /metrics; also the batcher's
// observer.
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
#include <string>

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
class ServiceMetrics final : public batching::BatcherObserver {
 public:
  // `max_batch_size` shapes the batch-size buckets (powers of two up to it, and it exactly).
  explicit ServiceMetrics(int max_batch_size);

  void SetModelInfo(const std::string& arch, const std::string& model_id,
                    const std::string& device, const std::string& precision);
  // Read at each scrape (the batcher's queue_depth()); unset: 0.
  void SetQueueDepthSource(std::function<double()> read);
  void SetHeldSource(std::function<double()> read);
  // The model's device memory (arcface_device_memory_{allocated,reserved}_bytes); unset: 0.
  void SetDeviceMemorySource(std::function<engine::DeviceMemory()> read);

  void RecordRequest(const std::string& rpc, const absl::Status& status, double seconds);
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
  // Reasons: "queue_full", "too_large", "shutting_down", "too_many_faces", "draining",
  // "preprocess_queue_full", "compare_too_large".
  void RecordRejected(const std::string& reason, int64_t faces = 1);
  Gauge& inflight() { return inflight_; }
  // Bytes EmbedStream streams hold (FaceEmbeddingService: messages read and not answered,
  // answers not written).
  Gauge& stream_held_bytes() { return stream_held_bytes_; }

  // BatcherObserver
  void OnBatch(const batching::BatchInfo& info) override;
  void OnRejected(batching::RejectReason reason, int num_items) override;
  void OnDropped(batching::DropReason reason, int num_items_dropped) override;

  std::string Render() const { return registry_.Render(); }
  MetricsRegistry& registry() { return registry_; }

 private:
  engine::DeviceMemory ReadDeviceMemory();

  MetricsRegistry registry_;
  Family<Counter>& requests_;
  Family<Histogram>& request_seconds_;
  Counter& faces_total_;
  Family<Counter>& rejected_;
  Family<Counter>& dropped_;
  Family<Counter>& batches_;
  Histogram& batch_size_;
  Histogram& queue_wait_;
  Histogram& inference_;
  Histogram& preprocess_;
  Counter& preprocess_faces_;
  Family<Counter>& preprocess_aborted_;
  Histogram& stage_;
  Histogram& postprocess_;
  Histogram& model_idle_;
  Counter& staged_ahead_;
  Gauge& inflight_;
  Gauge& stream_held_bytes_;
  Family<Gauge>& model_info_;
  absl::Mutex source_mu_;
  std::function<double()> queue_depth_source_ ABSL_GUARDED_BY(source_mu_);
  std::function<double()> held_source_ ABSL_GUARDED_BY(source_mu_);
  std::function<engine::DeviceMemory()> device_memory_source_ ABSL_GUARDED_BY(source_mu_);
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_SERVICE_METRICS_H_
