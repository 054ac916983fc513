#include "server/service/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace arcface::service {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "metrics: %s\n", message.c_str());
  std::abort();
}

void AtomicAdd(std::atomic<double>& target, double delta) {
  double current = target.load(std::memory_order_relaxed);
  while (!target.compare_exchange_weak(current, current + delta, std::memory_order_relaxed)) {
  }
}

std::string LabelString(const std::vector<std::string>& names,
                        const std::vector<std::string>& values,
                        const std::string& extra_name = "", const std::string& extra_value = "") {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    absl::StrAppend(&out, out.empty() ? "" : ",", names[i], "=\"", EscapeLabelValue(values[i]),
                    "\"");
  }
  if (!extra_name.empty()) {
    absl::StrAppend(&out, out.empty() ? "" : ",", extra_name, "=\"", extra_value, "\"");
  }
  return out.empty() ? out : absl::StrCat("{", out, "}");
}

std::string EscapeHelp(const std::string& help) {
  std::string out;
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

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

void Counter::Inc(double delta) {
  if (delta < 0) Die("a counter cannot decrease");
  AtomicAdd(value_, delta);
}

void Gauge::Add(double delta) { AtomicAdd(value_, delta); }

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {
  for (size_t i = 1; i < bounds_.size(); ++i) {
    if (!(bounds_[i - 1] < bounds_[i])) Die("histogram bounds must increase strictly");
  }
}

void Histogram::Observe(double value) {
  // Prometheus buckets are "less than or equal": the first bound >= value.
  size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin();
  absl::MutexLock lock(&mu_);
  ++counts_[i];
  sum_ += value;
  ++count_;
}

Histogram::Snapshot Histogram::Take() const {
  Snapshot s;
  s.bounds = bounds_;
  absl::MutexLock lock(&mu_);
  uint64_t running = 0;
  for (uint64_t c : counts_) {
    running += c;
    s.cumulative.push_back(running);
  }
  s.sum = sum_;
  s.count = count_;
  return s;
}

template <typename T>
T& Family<T>::WithLabels(const std::vector<std::string>& values) {
  if (values.size() != label_names_.size()) {
    Die(absl::StrCat("expected ", label_names_.size(), " label values, got ", values.size()));
  }
  absl::MutexLock lock(&mu_);
  auto& child = children_[values];
  if (!child) child = factory_();
  return *child;
}

template <typename T>
void Family<T>::ForEach(
    const std::function<void(const std::vector<std::string>&, const T&)>& fn) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [values, child] : children_) fn(values, *child);
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

MetricsRegistry::Entry& MetricsRegistry::NewEntry(const std::string& name,
                                                  const std::string& help, MetricType type) {
  absl::MutexLock lock(&mu_);
  for (const auto& e : entries_) {
    if (e->name == name) Die(absl::StrCat("metric registered twice: ", name));
  }
  auto entry = std::make_unique<Entry>();
  entry->name = name;
  entry->help = help;
  entry->type = type;
  entries_.push_back(std::move(entry));
  return *entries_.back();
}

Family<Counter>& MetricsRegistry::AddCounter(const std::string& name, const std::string& help,
                                             std::vector<std::string> label_names) {
  Entry& e = NewEntry(name, help, MetricType::kCounter);
  e.counters = std::make_unique<Family<Counter>>(std::move(label_names),
                                                 [] { return std::make_unique<Counter>(); });
  return *e.counters;
}

Family<Gauge>& MetricsRegistry::AddGauge(const std::string& name, const std::string& help,
                                         std::vector<std::string> label_names) {
  Entry& e = NewEntry(name, help, MetricType::kGauge);
  e.gauges = std::make_unique<Family<Gauge>>(std::move(label_names),
                                             [] { return std::make_unique<Gauge>(); });
  return *e.gauges;
}

Family<Histogram>& MetricsRegistry::AddHistogram(const std::string& name,
                                                 const std::string& help,
                                                 std::vector<double> bounds,
                                                 std::vector<std::string> label_names) {
  Entry& e = NewEntry(name, help, MetricType::kHistogram);
  e.histograms = std::make_unique<Family<Histogram>>(
      std::move(label_names), [bounds] { return std::make_unique<Histogram>(bounds); });
  return *e.histograms;
}

void MetricsRegistry::AddCallbackGauge(const std::string& name, const std::string& help,
                                       std::function<double()> read) {
  Entry& e = NewEntry(name, help, MetricType::kGauge);
  e.read = std::move(read);
}

std::string MetricsRegistry::Render() const {
  std::vector<const Entry*> entries;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& e : entries_) entries.push_back(e.get());
  }
  std::string out;
  for (const Entry* e : entries) {
    absl::StrAppend(&out, "# HELP ", e->name, " ", EscapeHelp(e->help), "\n");
    absl::StrAppend(&out, "# TYPE ", e->name, " ", TypeName(e->type), "\n");
    if (e->read) {
      absl::StrAppend(&out, e->name, " ", FormatMetricValue(e->read()), "\n");
    } else if (e->counters) {
      e->counters->ForEach([&](const std::vector<std::string>& values, const Counter& c) {
        absl::StrAppend(&out, e->name, LabelString(e->counters->label_names(), values), " ",
                        FormatMetricValue(c.Value()), "\n");
      });
    } else if (e->gauges) {
      e->gauges->ForEach([&](const std::vector<std::string>& values, const Gauge& g) {
        absl::StrAppend(&out, e->name, LabelString(e->gauges->label_names(), values), " ",
                        FormatMetricValue(g.Value()), "\n");
      });
    } else if (e->histograms) {
      const auto& names = e->histograms->label_names();
      e->histograms->ForEach([&](const std::vector<std::string>& values, const Histogram& h) {
        Histogram::Snapshot s = h.Take();
        for (size_t i = 0; i <= s.bounds.size(); ++i) {
          std::string le = i < s.bounds.size() ? FormatMetricValue(s.bounds[i]) : "+Inf";
          absl::StrAppend(&out, e->name, "_bucket", LabelString(names, values, "le", le), " ",
                          s.cumulative[i], "\n");
        }
        absl::StrAppend(&out, e->name, "_sum", LabelString(names, values), " ",
                        FormatMetricValue(s.sum), "\n");
        absl::StrAppend(&out, e->name, "_count", LabelString(names, values), " ", s.count,
                        "\n");
      });
    }
  }
  return out;
}

std::string FormatMetricValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  // The shortest form that reads back as the same double (0.005, not 0.0050000000000000001).
  char buf[64];
  for (int precision = 6; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, value);
    if (std::strtod(buf, nullptr) == value) break;
  }
  return buf;
}

std::string EscapeLabelValue(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

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
