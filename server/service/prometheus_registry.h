// MetricsRegistry: counters, gauges and histograms with labels, rendered in the Prometheus
// text exposition format (version 0.0.4) by hand, because prometheus-cpp is not packaged here.
// Generic: nothing here knows the service's metrics (service_metrics.h).
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
#ifndef ARCFACE_SERVER_SERVICE_PROMETHEUS_REGISTRY_H_
#define ARCFACE_SERVER_SERVICE_PROMETHEUS_REGISTRY_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

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

  // Called at the start of every Render(), before any family is read: for families whose
  // values are read from elsewhere at scrape time (one child per label value).
  void AddRenderHook(std::function<void()> hook);

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
  std::vector<std::function<void()>> render_hooks_ ABSL_GUARDED_BY(mu_);
};

// Prometheus number formatting: integers without a fraction, +Inf/-Inf/NaN spelled as such.
std::string FormatMetricValue(double value);
// Escapes a label value (\\, \", \n).
std::string EscapeLabelValue(const std::string& value);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_PROMETHEUS_REGISTRY_H_
