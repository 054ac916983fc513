// Metrics: counters, gauges and histograms with labels, rendered in the Prometheus text
// exposition format (version 0.0.4) by hand, because prometheus-cpp is not packaged here.
//
// Contract
// - Ownership: a MetricsRegistry owns its families; a family owns its children. References
//   returned by Family::WithLabels() stay valid as long as the registry lives, so hot paths
//   look a child up once and keep the reference.
// - Thread safety: every method of every class here may be called from any thread. Counters and
//   gauges are lock-free atomics; a histogram takes its own short mutex per observation; a
//   family takes its mutex only to find or create a child; Render() snapshots each metric under
//   the same locks (a scrape never sees a histogram whose buckets disagree with its _count).
// - Blocking: nothing blocks beyond those short critical sections, except that Render() calls
//   the callbacks of callback gauges (which must be cheap and must not call back into the
//   registry).
// - Errors: misuse (a wrong number of label values, a name registered twice) is a programming
//   error and aborts with a message; nothing here depends on a caller's input.
// - Format: families appear in registration order, children in label-value order; label values
//   are escaped (\\, \", \n); histogram buckets are cumulative, end with le="+Inf", and are
//   followed by _sum and _count.
//
// ServiceMetrics is the service's fixed set of metrics, and the batcher's observer.
#ifndef ARCFACE_SERVER_SERVICE_METRICS_H_
#define ARCFACE_SERVER_SERVICE_METRICS_H_

#include <atomic>
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

namespace arcface::service {

class Counter {
 public:
  void Inc(double delta = 1.0);  // delta >= 0
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Add(double delta);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // `bounds` are the upper bounds of the finite buckets, strictly increasing.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // bounds.size() + 1 entries; the last is +Inf (== count)
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot Take() const;

 private:
  const std::vector<double> bounds_;
  mutable absl::Mutex mu_;
  std::vector<uint64_t> counts_ ABSL_GUARDED_BY(mu_);  // per bucket, not cumulative
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t count_ ABSL_GUARDED_BY(mu_) = 0;
};

enum class MetricType { kCounter, kGauge, kHistogram };

// All children of one metric name, one per distinct tuple of label values.
template <typename T>
class Family {
 public:
  using Factory = std::function<std::unique_ptr<T>()>;
  Family(std::vector<std::string> label_names, Factory factory)
      : label_names_(std::move(label_names)), factory_(std::move(factory)) {}

  // The number of values must equal the number of label names.
  T& WithLabels(const std::vector<std::string>& values);

  const std::vector<std::string>& label_names() const { return label_names_; }
  // Visits the children in label-value order, under the family's mutex.
  void ForEach(const std::function<void(const std::vector<std::string>&, const T&)>& fn) const;

 private:
  const std::vector<std::string> label_names_;
  const Factory factory_;
  mutable absl::Mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_ ABSL_GUARDED_BY(mu_);
};

class MetricsRegistry {
 public:
  MetricsRegistry() = default;
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  Family<Counter>& AddCounter(const std::string& name, const std::string& help,
                              std::vector<std::string> label_names = {});
  Family<Gauge>& AddGauge(const std::string& name, const std::string& help,
                          std::vector<std::string> label_names = {});
  Family<Histogram>& AddHistogram(const std::string& name, const std::string& help,
                                  std::vector<double> bounds,
                                  std::vector<std::string> label_names = {});
  // A label-less gauge whose value is read at render time.
  void AddCallbackGauge(const std::string& name, const std::string& help,
                        std::function<double()> read);

  // The whole exposition, ending with a newline.
  std::string Render() const;

 private:
  struct Entry {
    std::string name;
    std::string help;
    MetricType type;
    std::unique_ptr<Family<Counter>> counters;
    std::unique_ptr<Family<Gauge>> gauges;
    std::unique_ptr<Family<Histogram>> histograms;
    std::function<double()> read;
  };
  Entry& NewEntry(const std::string& name, const std::string& help, MetricType type);

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
};

// Prometheus number formatting: integers without a fraction, +Inf/-Inf/NaN spelled as such.
std::string FormatMetricValue(double value);
// Escapes a label value (\\, \", \n).
std::string EscapeLabelValue(const std::string& value);

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

#endif  // ARCFACE_SERVER_SERVICE_METRICS_H_
