// The metrics: the generic Prometheus registry (prometheus_registry.h), then the service's
// families (service_metrics.h). The exposition is parsed back, not only searched.
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/batching/dynamic_batcher.h"
#include "server/engine/engine.h"
#include "server/service/prometheus_registry.h"
#include "server/service/service_metrics.h"
#include "tests/test_util/exposition.h"

namespace arcface::service {
namespace {

using ::arcface::test_util::ParseExposition;
using ::arcface::test_util::Sample;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// MetricsRegistry

TEST(Metrics, CountersGaugesAndLabelsRenderAndParseBack) {
  MetricsRegistry registry;
  auto& requests = registry.AddCounter("t_requests_total", "Requests.", {"rpc", "code"});
  requests.WithLabels({"Embed", "OK"}).Inc();
  requests.WithLabels({"Embed", "OK"}).Inc(2);
  requests.WithLabels({"Compare", "INVALID_ARGUMENT"}).Inc();
  auto& odd = registry.AddGauge("t_odd", "Odd label values.", {"v"});
  odd.WithLabels({"a\"b\\c\nd"}).Set(1.5);
  registry.AddCallbackGauge("t_callback", "Read at render.", [] { return 7.0; });

  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("# HELP t_requests_total Requests.\n# TYPE t_requests_total counter\n"));
  EXPECT_THAT(text, HasSubstr("t_requests_total{rpc=\"Embed\",code=\"OK\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("t_odd{v=\"a\\\"b\\\\c\\nd\"} 1.5\n"));
  EXPECT_THAT(text, HasSubstr("t_callback 7\n"));

  std::map<std::string, std::string> types;
  std::vector<Sample> samples = ParseExposition(text, &types);
  EXPECT_EQ(types["t_requests_total"], "counter");
  EXPECT_EQ(types["t_odd"], "gauge");
  EXPECT_EQ(types["t_callback"], "gauge");
  ASSERT_EQ(samples.size(), 4u);
  EXPECT_EQ(samples[0].name, "t_requests_total");
  EXPECT_EQ(samples[0].labels["rpc"], "Compare");  // children in label-value order
  EXPECT_EQ(samples[0].labels["code"], "INVALID_ARGUMENT");
  EXPECT_EQ(samples[0].value, 1);
}

TEST(Metrics, HistogramBucketsAreCumulativeWithSumAndCount) {
  MetricsRegistry registry;
  auto& h = registry.AddHistogram("t_seconds", "Latency.", {0.005, 0.1, 1}, {"rpc"});
  for (double v : {0.001, 0.005, 0.05, 0.5, 2.0}) h.WithLabels({"Embed"}).Observe(v);

  std::map<std::string, std::string> types;
  std::vector<Sample> samples = ParseExposition(registry.Render(), &types);
  EXPECT_EQ(types["t_seconds"], "histogram");
  std::vector<std::pair<std::string, double>> buckets;
  double sum = -1, count = -1;
  for (const Sample& s : samples) {
    EXPECT_EQ(s.labels.at("rpc"), "Embed");
    if (s.name == "t_seconds_bucket") buckets.push_back({s.labels.at("le"), s.value});
    if (s.name == "t_seconds_sum") sum = s.value;
    if (s.name == "t_seconds_count") count = s.value;
  }
  // 0.005 falls in le="0.005" (upper bounds are inclusive).
  EXPECT_THAT(buckets, ElementsAre(std::pair<std::string, double>{"0.005", 2},
                                   std::pair<std::string, double>{"0.1", 3},
                                   std::pair<std::string, double>{"1", 4},
                                   std::pair<std::string, double>{"+Inf", 5}));
  EXPECT_NEAR(sum, 2.556, 1e-12);
  EXPECT_EQ(count, 5);
}

TEST(Metrics, ValueFormatting) {
  EXPECT_EQ(FormatMetricValue(3), "3");
  EXPECT_EQ(FormatMetricValue(0.005), "0.005");
  EXPECT_EQ(FormatMetricValue(0.1), "0.1");
  EXPECT_EQ(FormatMetricValue(INFINITY), "+Inf");
  EXPECT_EQ(FormatMetricValue(-INFINITY), "-Inf");
  EXPECT_EQ(FormatMetricValue(NAN), "NaN");
  EXPECT_EQ(EscapeLabelValue("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

// ---------------------------------------------------------------------------------------------
// ServiceMetrics

TEST(Metrics, ServiceMetricsHaveTheRequiredFamilies) {
  ServiceMetrics m(/*max_batch_size=*/24);
  m.SetModelInfo("r50", "arcface-r50@0123456789ab", "cpu", "fp32");
  m.SetQueueDepthSource([] { return 3.0; });
  m.SetDeviceMemorySource([] {
    engine::DeviceMemory memory;
    memory.allocated_bytes = 123456789;
    memory.reserved_bytes = 234567890;
    return memory;
  });
  m.RecordRequest("Embed", absl::OkStatus(), 0.01);
  m.RecordRequest("Embed", absl::InvalidArgumentError("x"), 0.001);
  m.RecordRequest("Compare", absl::OkStatus(), 0.01, "arcface-r50@0123456789ab");
  m.AddFaces(4);
  m.OnRejected(batching::RejectReason::kQueueFull, 1);
  m.OnDropped(batching::DropReason::kExpired, 2);
  absl::Duration waits[] = {absl::Milliseconds(1), absl::Milliseconds(2)};
  batching::BatchInfo info;
  info.size = 24;
  info.num_tasks = 2;
  info.queue_waits = waits;
  info.run_time = absl::Milliseconds(30);
  info.model_idle = absl::Microseconds(40);
  info.items_staged_ahead = 20;
  info.stage_time = absl::Microseconds(300);
  info.finish_time = absl::Microseconds(700);
  m.OnBatch(info);
  info.model_idle.reset();  // the first batch has none
  info.items_staged_ahead = 0;
  m.OnBatch(info);
  m.RecordPreprocess(0.002);

  std::map<std::string, std::string> types;
  std::vector<Sample> samples = ParseExposition(m.Render(), &types);
  EXPECT_EQ(types["arcface_requests_total"], "counter");
  EXPECT_EQ(types["arcface_faces_total"], "counter");
  EXPECT_EQ(types["arcface_batch_size"], "histogram");
  EXPECT_EQ(types["arcface_queue_wait_seconds"], "histogram");
  EXPECT_EQ(types["arcface_inference_seconds"], "histogram");
  EXPECT_EQ(types["arcface_request_seconds"], "histogram");
  EXPECT_EQ(types["arcface_queue_depth"], "gauge");
  EXPECT_EQ(types["arcface_rejected_total"], "counter");
  EXPECT_EQ(types["arcface_model_info"], "gauge");
  EXPECT_EQ(types["arcface_preprocess_seconds"], "histogram");
  EXPECT_EQ(types["arcface_batch_stage_seconds"], "histogram");
  EXPECT_EQ(types["arcface_postprocess_seconds"], "histogram");
  EXPECT_EQ(types["arcface_model_idle_seconds"], "histogram");
  EXPECT_EQ(types["arcface_staged_ahead_crops_total"], "counter");
  EXPECT_EQ(types["arcface_stream_held_bytes"], "gauge");
  std::map<std::string, double> flat;
  for (const Sample& s : samples) {
    std::string key = s.name;
    for (const auto& [k, v] : s.labels) absl::StrAppend(&key, ",", k, "=", v);
    flat[key] = s.value;
  }
  EXPECT_EQ(flat["arcface_requests_total,code=OK,rpc=Embed"], 1);
  EXPECT_EQ(flat["arcface_requests_total,code=INVALID_ARGUMENT,rpc=Embed"], 1);
  EXPECT_EQ(flat["arcface_requests_total,code=OK,rpc=Compare"], 1);  // one model: no label
  EXPECT_EQ(flat["arcface_faces_total"], 4);
  EXPECT_EQ(flat["arcface_queue_depth"], 3);
  EXPECT_EQ(types["arcface_device_memory_allocated_bytes"], "gauge");
  EXPECT_EQ(flat["arcface_device_memory_allocated_bytes"], 123456789);
  EXPECT_EQ(flat["arcface_device_memory_reserved_bytes"], 234567890);
  EXPECT_EQ(flat["arcface_rejected_total,reason=queue_full"], 1);
  EXPECT_EQ(flat["arcface_dropped_total,reason=expired"], 1);
  EXPECT_EQ(flat["arcface_model_info,arch=r50,device=cpu,model_id=arcface-r50@0123456789ab,"
                 "precision=fp32"],
            1);
  // Batch-size buckets: powers of two up to the limit, and the limit itself.
  EXPECT_EQ(flat["arcface_batch_size_bucket,le=16"], 0);
  EXPECT_EQ(flat["arcface_batch_size_bucket,le=24"], 2);
  EXPECT_EQ(flat.count("arcface_batch_size_bucket,le=32"), 0u);
  EXPECT_EQ(flat["arcface_batch_size_sum"], 48);
  EXPECT_EQ(flat["arcface_queue_wait_seconds_count"], 4);
  EXPECT_NEAR(flat["arcface_inference_seconds_sum"], 0.06, 1e-12);
  // The per-stage times: idle only where the batcher knows it, staged crops counted.
  EXPECT_EQ(flat["arcface_model_idle_seconds_count"], 1);
  EXPECT_NEAR(flat["arcface_model_idle_seconds_sum"], 40e-6, 1e-12);
  EXPECT_EQ(flat["arcface_model_idle_seconds_bucket,le=5e-05"], 1);
  EXPECT_EQ(flat["arcface_model_idle_seconds_bucket,le=2.5e-05"], 0);
  EXPECT_EQ(flat["arcface_staged_ahead_crops_total"], 20);
  EXPECT_EQ(flat["arcface_batch_stage_seconds_count"], 2);
  EXPECT_NEAR(flat["arcface_postprocess_seconds_sum"], 1.4e-3, 1e-12);
  EXPECT_EQ(flat["arcface_preprocess_seconds_count"], 1);
  EXPECT_NEAR(flat["arcface_preprocess_seconds_sum"], 0.002, 1e-12);
}

// With several models: each call under the model whose version published its response's
// model_id (a replaced version's too), "" for none; a batcher's refusals under its model, the
// server's own under "".
TEST(Metrics, RequestsAndRejectionsCarryTheModelWithSeveralModels) {
  ServiceMetrics m(/*max_batch_size=*/8, {"arcface", "dlib"});
  m.ForModel("arcface")->SetModelInfo("r50", "arcface-r50@aaaaaaaaaaaa", "cpu", "fp32");
  m.ForModel("dlib")->SetModelInfo("dlib-resnet", "dlib-resnet@bbbbbbbbbbbb", "cpu", "fp32");
  m.ForModel("dlib")->SetModelInfo("dlib-resnet", "dlib-resnet@cccccccccccc", "cpu", "fp32");
  m.RecordRequest("Embed", absl::OkStatus(), 0.01, "arcface-r50@aaaaaaaaaaaa");
  m.RecordRequest("Embed", absl::OkStatus(), 0.01, "dlib-resnet@bbbbbbbbbbbb");
  m.RecordRequest("Embed", absl::OkStatus(), 0.01, "dlib-resnet@cccccccccccc");
  m.RecordRequest("Identify", absl::OkStatus(), 0.01, "facenet@000000000000");
  m.RecordRequest("Embed", absl::NotFoundError("model 'x'"), 0.01);
  m.ForModel("dlib")->OnRejected(batching::RejectReason::kQueueFull, 3);
  m.RecordRejected("draining");

  std::map<std::string, std::string> types;
  std::map<std::vector<std::string>, double> requests, rejected;
  for (const Sample& s : ParseExposition(m.Render(), &types)) {
    if (s.name == "arcface_requests_total") {
      requests[{s.labels.at("model"), s.labels.at("rpc"), s.labels.at("code")}] = s.value;
    } else if (s.name == "arcface_rejected_total") {
      rejected[{s.labels.at("model"), s.labels.at("reason")}] = s.value;
    }
  }
  const std::map<std::vector<std::string>, double> want_requests = {
      {{"arcface", "Embed", "OK"}, 1},
      {{"dlib", "Embed", "OK"}, 2},
      {{"", "Identify", "OK"}, 1},
      {{"", "Embed", "NOT_FOUND"}, 1}};
  EXPECT_EQ(requests, want_requests);
  const std::map<std::vector<std::string>, double> want_rejected = {{{"dlib", "queue_full"}, 1},
                                                                    {{"", "draining"}, 1}};
  EXPECT_EQ(rejected, want_rejected);
}

}  // namespace
}  // namespace arcface::service
