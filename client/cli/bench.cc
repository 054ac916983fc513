// `arcface-client bench`: the project's load generator. For each concurrency level, that many
// callers send Embed requests of N faces back to back for the duration; one line per level.
//
// Every request is counted exactly once, whatever its outcome, and is never retried (the
// client runs with one attempt), so the totals equal the server's arcface_requests_total{rpc=
// "Embed"} delta. Requests still running at the end of the duration are waited for and counted.
#include <atomic>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>

#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/cli/commands.h"
#include "client/cli/progress.h"
#include "client/cli/stats.h"

namespace arcface::cli {
namespace {

struct WorkerTally {
  int64_t requests = 0;
  int64_t ok = 0;
  std::vector<double> latencies_ms;  // of successful requests
  std::map<std::string, int64_t> errors;
};

struct SettingResult {
  int concurrency = 0;
  double elapsed_s = 0;
  WorkerTally total;
};

// A deterministic 112x112 BGR test pattern (the server's crop size: no resize needed).
cv::Mat SyntheticFace() {
  cv::Mat m(112, 112, CV_8UC3);
  for (int y = 0; y < 112; ++y) {
    for (int x = 0; x < 112; ++x) {
      m.at<cv::Vec3b>(y, x) = cv::Vec3b(uchar(x * 2), uchar(y * 2), uchar((x * y) % 251));
    }
  }
  return m;
}

SettingResult RunSetting(client::Client& client, const std::vector<client::FaceInput>& faces,
                         int concurrency, absl::Duration duration, ProgressBar& progress) {
  std::vector<WorkerTally> tallies(concurrency);
  std::atomic<int64_t> done{0};
  std::atomic<int> running{concurrency};
  const absl::Time start = absl::Now();
  const absl::Time stop = start + duration;
  std::vector<std::thread> workers;
  for (int w = 0; w < concurrency; ++w) {
    workers.emplace_back([&, w] {
      WorkerTally& t = tallies[w];
      while (absl::Now() < stop) {
        const absl::Time t0 = absl::Now();
        absl::StatusOr<std::vector<client::Embedding>> r = client.Embed(faces);
        const absl::Time t1 = absl::Now();
        ++t.requests;
        if (r.ok()) {
          ++t.ok;
          t.latencies_ms.push_back(absl::ToDoubleMilliseconds(t1 - t0));
        } else {
          ++t.errors[absl::StatusCodeToString(r.status().code())];
        }
        ++done;
      }
      --running;
    });
  }
  while (running.load() > 0) {
    absl::SleepFor(absl::Milliseconds(100));
    const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
    progress.Status(absl::StrFormat(
        "concurrency %d: %.1f/%.0f s, %d requests, %.1f req/s", concurrency, elapsed,
        absl::ToDoubleSeconds(duration), done.load(), elapsed > 0 ? done.load() / elapsed : 0.0));
  }
  for (std::thread& t : workers) t.join();
  SettingResult result;
  result.concurrency = concurrency;
  result.elapsed_s = absl::ToDoubleSeconds(absl::Now() - start);
  for (WorkerTally& t : tallies) {
    result.total.requests += t.requests;
    result.total.ok += t.ok;
    result.total.latencies_ms.insert(result.total.latencies_ms.end(), t.latencies_ms.begin(),
                                     t.latencies_ms.end());
    for (const auto& [code, n] : t.errors) result.total.errors[code] += n;
  }
  std::sort(result.total.latencies_ms.begin(), result.total.latencies_ms.end());
  return result;
}

}  // namespace

int RunBench(const CommonOptions& common, const BenchOptions& o) {
  if (o.concurrency.empty() || o.faces_per_request < 1 || !(o.duration_s > 0)) {
    std::fprintf(stderr, "arcface-client: bench: need --concurrency >= 1, --faces-per-request "
                 ">= 1 and --duration > 0\n");
    return kExitUsage;
  }
  for (int c : o.concurrency) {
    if (c < 1 || c > 4096) {
      std::fprintf(stderr, "arcface-client: bench: --concurrency %d is not in 1..4096\n", c);
      return kExitUsage;
    }
  }
  // One attempt: a retried request would be counted once here and twice by the server.
  auto client = MakeClient(common, /*attempts=*/1);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ModelInfo> info = (*client)->GetModelInfo();
  if (!info.ok()) return Fail("bench", info.status());
  if (uint32_t(o.faces_per_request) > info->max_faces_per_request()) {
    std::fprintf(stderr, "arcface-client: bench: --faces-per-request %d is above the server's "
                 "limit of %u faces per request\n", o.faces_per_request,
                 info->max_faces_per_request());
    return kExitUsage;
  }

  absl::StatusOr<client::FaceInput> face =
      o.image.empty() ? client::FaceInput::FromMat(SyntheticFace(), "synthetic 112x112")
                      : client::FaceInput::FromFile(o.image);
  if (!face.ok()) return Fail("--image", face.status(), true);
  const std::vector<client::FaceInput> faces(o.faces_per_request, *face);
  const uint64_t bytes = uint64_t(face->proto().ByteSizeLong()) * o.faces_per_request;
  if (bytes + 4096 > info->max_message_bytes()) {
    std::fprintf(stderr, "arcface-client: bench: %d faces of %zu bytes exceed the server's "
                 "message limit of %lu bytes\n", o.faces_per_request, face->proto().ByteSizeLong(),
                 static_cast<unsigned long>(info->max_message_bytes()));
    return kExitUsage;
  }

  std::fprintf(stderr, "bench: %s, %s, %d face(s) per request (%s), %.0f s per setting\n",
               (*client)->target().c_str(), info->model_id().c_str(), o.faces_per_request,
               o.image.empty() ? "synthetic 112x112 crop, raw" : o.image.c_str(), o.duration_s);
  nlohmann::json report = {{"server", (*client)->target()},
                           {"model_id", info->model_id()},
                           {"device", info->device()},
                           {"faces_per_request", o.faces_per_request},
                           {"duration_s", o.duration_s},
                           {"image", o.image.empty() ? "synthetic" : o.image},
                           {"results", nlohmann::json::array()}};
  bool any_error = false;
  for (int c : o.concurrency) {
    ProgressBar progress(0, ProgressWanted());
    SettingResult r = RunSetting(**client, faces, c, absl::Seconds(o.duration_s), progress);
    progress.Finish();
    const WorkerTally& t = r.total;
    const double faces_per_s = double(t.ok) * o.faces_per_request / r.elapsed_s;
    std::string latency = "n/a";
    nlohmann::json lat = nullptr;
    if (!t.latencies_ms.empty()) {
      const double p50 = Percentile(t.latencies_ms, 50), p90 = Percentile(t.latencies_ms, 90),
                   p99 = Percentile(t.latencies_ms, 99), max = t.latencies_ms.back();
      latency = absl::StrFormat("p50 %.1f p90 %.1f p99 %.1f max %.1f ms", p50, p90, p99, max);
      lat = {{"p50", p50}, {"p90", p90}, {"p99", p99}, {"max", max}};
    }
    std::string errors;
    for (const auto& [code, n] : t.errors) absl::StrAppend(&errors, errors.empty() ? "" : " ", code, "=", n);
    any_error = any_error || !t.errors.empty();
    std::cout << absl::StrFormat(
                     "concurrency %3d: %7.1f faces/s  %7.1f req/s  latency %s  requests %d "
                     "(ok %d)  errors %s",
                     c, faces_per_s, double(t.requests) / r.elapsed_s, latency, t.requests, t.ok,
                     errors.empty() ? "none" : errors)
              << std::endl;
    report["results"].push_back({{"concurrency", c},
                                 {"requests", t.requests},
                                 {"ok", t.ok},
                                 {"faces", t.ok * o.faces_per_request},
                                 {"elapsed_s", r.elapsed_s},
                                 {"faces_per_s", faces_per_s},
                                 {"requests_per_s", double(t.requests) / r.elapsed_s},
                                 {"latency_ms", lat},
                                 {"errors", t.errors}});
  }
  if (!o.json.empty()) {
    std::ofstream out(o.json, std::ios::trunc);
    out << report.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "arcface-client: --json: cannot write %s\n", o.json.c_str());
      return kExitSomeFailed;
    }
  }
  return any_error ? kExitSomeFailed : kExitOk;
}

}  // namespace arcface::cli
