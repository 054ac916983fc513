// DetectorMetrics: the face detector's metric families, in the service's registry: its batches
// (sizes in frames, run times, outcomes), each frame's wait in its queue, the frames detected
// and the faces found per frame, refusals and drops. It is the detector batcher's observer, as
// ServiceMetrics is the Embedder's; Detect's requests and errors are counted by the service's
// per-method families (arcface_requests_total{rpc="Detect"}).
//
// Contract
// - Ownership: the registry is borrowed and must outlive the metrics.
// - Thread safety: every method may be called from any thread (the batcher's observer hooks run
//   on its batch thread and on Schedule()'s caller).
#ifndef ARCFACE_SERVER_SERVICE_DETECTOR_METRICS_H_
#define ARCFACE_SERVER_SERVICE_DETECTOR_METRICS_H_

#include "server/batching/dynamic_batcher.h"
#include "server/service/prometheus_registry.h"

namespace arcface::service {

class DetectorMetrics final : public batching::BatcherObserver {
 public:
  // `max_batch_size` (frames) shapes the batch-size buckets, as ServiceMetrics' do.
  DetectorMetrics(MetricsRegistry* registry, int max_batch_size);

  // One frame came back from the detector with `faces` faces (after its filter).
  void RecordFrame(int faces);

  // BatcherObserver
  void OnBatch(const batching::BatchInfo& info) override;
  void OnRejected(batching::RejectReason reason, int num_items) override;
  void OnDropped(batching::DropReason reason, int num_items_dropped) override;

 private:
  Family<Counter>& batches_;
  Histogram& batch_size_;
  Histogram& run_seconds_;
  Histogram& queue_wait_;
  Counter& frames_;
  Histogram& faces_per_frame_;
  Family<Counter>& rejected_;
  Family<Counter>& dropped_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_DETECTOR_METRICS_H_
