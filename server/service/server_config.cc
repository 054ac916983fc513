#include "server/service/server_config.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/batching/dynamic_batcher.h"
#include "server/service/fault_injection.h"
#include "server/service/http_server.h"

#ifndef ARCFACE_VERSION
#define ARCFACE_VERSION "0.0.0"
#endif

namespace arcface::service {
namespace {

// A bad value: the message names the flag; the caller turns it into exit status 2.
struct Bad {
  std::string message;
};

void Check(std::vector<Bad>* bad, bool ok, const std::string& flag, const std::string& what) {
  if (!ok) bad->push_back({absl::StrCat(flag, ": ", what)});
}

bool ValidDevice(const std::string& d) {
  if (d == "auto" || d == "cpu" || d == "cuda") return true;
  if (!absl::StartsWith(d, "cuda:")) return false;
  int index = -1;
  return absl::SimpleAtoi(d.substr(5), &index) && index >= 0 && index < 1024;
}

}  // namespace

bool ParseDrainTimeout(const std::string& text, absl::Duration* out) {
  double seconds = 0;
  if (absl::SimpleAtod(text, &seconds)) {
    if (!std::isfinite(seconds)) return false;
    *out = absl::Seconds(seconds);
    return true;
  }
  return absl::ParseDuration(text, out) && *out != absl::InfiniteDuration();
}

ParsedFlags ParseServerFlags(int argc, const char* const* argv, std::ostream& out,
                             std::ostream& err) {
  ParsedFlags result;
  ServerConfig& c = result.config;
  std::string drain_timeout = "30s";

  CLI::App app("arcface-server: ArcFace face embeddings over gRPC (arcface.v1.FaceEmbedding), "
               "with /metrics, /healthz and /readyz over HTTP.",
               "arcface-server");
  app.set_version_flag("--version", std::string(ARCFACE_VERSION));
  app.option_defaults()->always_capture_default();

  app.add_option("--weights", c.weights,
                 "Weights file: py-feat's arcface_r50.safetensors or InsightFace's ONNX export")
      ->envname("ARCFACE_WEIGHTS");
  app.add_flag("--demo-weights", c.demo_weights,
               "Serve seeded random (untrained) weights: a real pipeline, meaningless embeddings")
      ->envname("ARCFACE_DEMO_WEIGHTS");
  app.add_option("--listen", c.listen, "gRPC address host:port (port 0: any free port)")
      ->envname("ARCFACE_LISTEN");
  app.add_option("--http-listen", c.http_listen, "HTTP address for /metrics /healthz /readyz")
      ->envname("ARCFACE_HTTP_LISTEN");
  app.add_option("--device", c.device, "auto, cpu, cuda or cuda:N")->envname("ARCFACE_DEVICE");
  app.add_option("--precision", c.precision, "fp32, bf16, or fp16 (CUDA only); reduced precision is opt-in")
      ->envname("ARCFACE_PRECISION");
  app.add_option("--threads", c.threads, "Intra-op threads of the model; 0: libtorch's default")
      ->envname("ARCFACE_THREADS");
  app.add_option("--max-batch-size", c.max_batch_size, "Crops per model batch at most")
      ->envname("ARCFACE_MAX_BATCH_SIZE");
  app.add_option("--max-queue-delay-us", c.max_queue_delay_us,
                 "Longest a crop waits for its batch to fill, in microseconds")
      ->envname("ARCFACE_MAX_QUEUE_DELAY_US");
  app.add_option("--max-queue-size", c.max_queue_size,
                 "Crops queued for the model at most; beyond: RESOURCE_EXHAUSTED")
      ->envname("ARCFACE_MAX_QUEUE_SIZE");
  app.add_option("--max-batches-in-flight", c.max_batches_in_flight,
                 "Batches in the model at once, each on its own CUDA stream; 0: automatic (1 on "
                 "the CPU, where more does not pay: forward passes share the same cores; 2 on "
                 "CUDA)")
      ->envname("ARCFACE_MAX_BATCHES_IN_FLIGHT");
  app.add_option("--cancel-poll-interval-us", c.cancel_poll_interval_us,
                 "How often queued calls are checked for cancellation, freeing their queue room, "
                 "in microseconds; 0: only when their batch forms")
      ->envname("ARCFACE_CANCEL_POLL_INTERVAL_US");
  app.add_option("--max-faces-per-request", c.max_faces_per_request,
                 "Faces in one Embed request (face probes in one Compare) at most")
      ->envname("ARCFACE_MAX_FACES_PER_REQUEST");
  app.add_option("--max-message-bytes", c.max_message_bytes,
                 "Largest gRPC request message accepted, in bytes")
      ->envname("ARCFACE_MAX_MESSAGE_BYTES");
  app.add_option("--max-image-pixels", c.max_image_pixels,
                 "Largest image (width x height) decoded or accepted raw")
      ->envname("ARCFACE_MAX_IMAGE_PIXELS");
  app.add_option("--max-compare-rows", c.max_compare_rows,
                 "Compare: queries at most (and the reply must fit --max-message-bytes)")
      ->envname("ARCFACE_MAX_COMPARE_ROWS");
  app.add_option("--max-compare-cols", c.max_compare_cols,
                 "Compare: references at most (and the reply must fit --max-message-bytes)")
      ->envname("ARCFACE_MAX_COMPARE_COLS");
  app.add_option("--preprocess-threads", c.preprocess_threads,
                 "Threads decoding and aligning faces; 0: one per hardware thread (at least 2)")
      ->envname("ARCFACE_PREPROCESS_THREADS");
  app.add_option("--preprocess-queue", c.preprocess_queue,
                 "Faces admitted to preprocessing at most, over all calls queued or being "
                 "decoded (a Compare matrix counts as its size in 112x112 crops; a call larger "
                 "than this runs alone); beyond: RESOURCE_EXHAUSTED. 0: the larger of 1024 and "
                 "--max-queue-size")
      ->envname("ARCFACE_PREPROCESS_QUEUE");
  app.add_option("--warmup-batch-size", c.warmup_batch_size,
                 "Batch size of the warm-up pass before SERVING; 0 skips it")
      ->envname("ARCFACE_WARMUP_BATCH_SIZE");
  app.add_option("--drain-timeout", drain_timeout,
                 "On SIGTERM/SIGINT, how long accepted calls may take to finish (e.g. 30s, 500ms, "
                 "or seconds)")
      ->envname("ARCFACE_DRAIN_TIMEOUT");
  app.add_option("--log-level", c.log_level, "trace, debug, info, warn, error, critical, off")
      ->envname("ARCFACE_LOG_LEVEL");
  app.add_option("--log-format", c.log_format, "text or json (one object per line)")
      ->envname("ARCFACE_LOG_FORMAT");
  app.add_flag("--reflection", c.reflection, "Serve gRPC server reflection")
      ->envname("ARCFACE_REFLECTION");
  app.add_option("--tls-cert", c.tls_cert, "Server certificate chain (PEM); enables TLS")
      ->envname("ARCFACE_TLS_CERT");
  app.add_option("--tls-key", c.tls_key, "Server private key (PEM)")->envname("ARCFACE_TLS_KEY");
  app.add_option("--tls-client-ca", c.tls_client_ca,
                 "CA bundle (PEM) for client certificates; enables mutual TLS (required and "
                 "verified)")
      ->envname("ARCFACE_TLS_CLIENT_CA");
  app.add_option("--port-file", c.port_file,
                 "Once SERVING, write \"<grpc port> <http port>\\n\" to this file")
      ->envname("ARCFACE_PORT_FILE");
  // Test hook, not for production: hidden from --help (empty group).
  app.add_option("--test-hold-model-file", c.test_hold_model_file,
                 "TEST HOOK: while this file exists, batches wait before the model")
      ->envname("ARCFACE_TEST_HOLD_MODEL_FILE")
      ->group("");
  app.add_option("--test-fault-injection", c.test_fault_injection,
                 "TEST HOOK: make chosen batches or faces fail, throw or stall (fault_injection.h)")
      ->envname("ARCFACE_TEST_FAULT_INJECTION")
      ->group("");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    out << app.help();
    result.exit_code = 0;
    return result;
  } catch (const CLI::CallForAllHelp&) {
    out << app.help("", CLI::AppFormatMode::All);
    result.exit_code = 0;
    return result;
  } catch (const CLI::CallForVersion&) {
    out << ARCFACE_VERSION << "\n";
    result.exit_code = 0;
    return result;
  } catch (const CLI::ParseError& e) {
    err << "arcface-server: " << e.what() << "\nRun with --help for the flags.\n";
    result.exit_code = 2;
    return result;
  }

  std::vector<Bad> bad;
  if (!c.weights.empty() && c.demo_weights) {
    bad.push_back({"--weights and --demo-weights: give exactly one, not both"});
  } else if (c.weights.empty() && !c.demo_weights) {
    bad.push_back({"--weights: no model; give --weights PATH (or ARCFACE_WEIGHTS), or "
                   "--demo-weights to try the pipeline on untrained weights"});
  } else if (!c.weights.empty()) {
    std::string why = CLI::ExistingFile(c.weights);
    Check(&bad, why.empty(), "--weights", why);
  }
  std::string host;
  int port = 0;
  absl::Status listen = ParseHostPort(c.listen, &host, &port);
  Check(&bad, listen.ok(), "--listen", std::string(listen.message()));
  absl::Status http = ParseHostPort(c.http_listen, &host, &port);
  Check(&bad, http.ok(), "--http-listen", std::string(http.message()));
  Check(&bad, ValidDevice(c.device), "--device",
        absl::StrCat("'", c.device, "' is not auto, cpu, cuda or cuda:N"));
  Check(&bad, c.precision == "fp32" || c.precision == "fp16" || c.precision == "bf16",
        "--precision", absl::StrCat("'", c.precision, "' is not fp32, fp16 or bf16"));
  Check(&bad, c.threads >= 0 && c.threads <= 1024, "--threads",
        absl::StrCat("must be in 0..1024, got ", c.threads));
  Check(&bad, c.max_batch_size >= 1 && c.max_batch_size <= 4096, "--max-batch-size",
        absl::StrCat("must be in 1..4096, got ", c.max_batch_size));
  Check(&bad, c.max_queue_delay_us >= 0 && c.max_queue_delay_us <= 10'000'000,
        "--max-queue-delay-us",
        absl::StrCat("must be in 0..10000000, got ", c.max_queue_delay_us));
  Check(&bad,
        c.max_batches_in_flight >= 0 &&
            c.max_batches_in_flight <= batching::DynamicBatcher::kMaxBatchesInFlight,
        "--max-batches-in-flight",
        absl::StrCat("must be in 0..", batching::DynamicBatcher::kMaxBatchesInFlight, ", got ",
                     c.max_batches_in_flight));
  Check(&bad, c.cancel_poll_interval_us >= 0 && c.cancel_poll_interval_us <= 10'000'000,
        "--cancel-poll-interval-us",
        absl::StrCat("must be in 0..10000000, got ", c.cancel_poll_interval_us));
  Check(&bad, c.max_queue_size >= c.max_batch_size && c.max_queue_size <= 10'000'000,
        "--max-queue-size",
        absl::StrCat("must be at least --max-batch-size (", c.max_batch_size,
                     ") and at most 10000000, got ", c.max_queue_size));
  Check(&bad, c.max_faces_per_request >= 1 && c.max_faces_per_request <= 1'000'000,
        "--max-faces-per-request",
        absl::StrCat("must be in 1..1000000, got ", c.max_faces_per_request));
  Check(&bad, c.max_message_bytes >= 1024 && c.max_message_bytes <= std::numeric_limits<int>::max(),
        "--max-message-bytes",
        absl::StrCat("must be in 1024..", std::numeric_limits<int>::max(), ", got ",
                     c.max_message_bytes));
  Check(&bad, c.max_image_pixels >= 1 && c.max_image_pixels <= 1'000'000'000,
        "--max-image-pixels",
        absl::StrCat("must be in 1..1000000000, got ", c.max_image_pixels));
  Check(&bad, c.max_compare_rows >= 1 && c.max_compare_rows <= 65536, "--max-compare-rows",
        absl::StrCat("must be in 1..65536, got ", c.max_compare_rows));
  Check(&bad, c.max_compare_cols >= 1 && c.max_compare_cols <= 65536, "--max-compare-cols",
        absl::StrCat("must be in 1..65536, got ", c.max_compare_cols));
  Check(&bad, c.preprocess_threads >= 0 && c.preprocess_threads <= 1024, "--preprocess-threads",
        absl::StrCat("must be in 0..1024, got ", c.preprocess_threads));
  Check(&bad, c.preprocess_queue >= 0 && c.preprocess_queue <= 1'000'000, "--preprocess-queue",
        absl::StrCat("must be in 0..1000000, got ", c.preprocess_queue));
  Check(&bad, c.warmup_batch_size >= 0 && c.warmup_batch_size <= 4096, "--warmup-batch-size",
        absl::StrCat("must be in 0..4096, got ", c.warmup_batch_size));
  bool drain_ok = ParseDrainTimeout(drain_timeout, &c.drain_timeout) &&
                  c.drain_timeout >= absl::ZeroDuration() && c.drain_timeout <= absl::Hours(24);
  Check(&bad, drain_ok, "--drain-timeout",
        absl::StrCat("'", drain_timeout, "' is not a duration in 0..24h (e.g. 30s, 500ms, 30)"));
  const std::vector<std::string> levels = {"trace", "debug", "info",    "warn",
                                           "error", "critical", "off"};
  Check(&bad, std::find(levels.begin(), levels.end(), c.log_level) != levels.end(),
        "--log-level",
        absl::StrCat("'", c.log_level, "' is not trace, debug, info, warn, error, critical or off"));
  Check(&bad, c.log_format == "text" || c.log_format == "json", "--log-format",
        absl::StrCat("'", c.log_format, "' is not text or json"));
  Check(&bad, c.tls_cert.empty() == c.tls_key.empty(), "--tls-cert/--tls-key",
        "give both the certificate and the key, or neither");
  Check(&bad, c.tls_client_ca.empty() || !c.tls_cert.empty(), "--tls-client-ca",
        "mutual TLS needs --tls-cert and --tls-key too");
  if (!c.test_fault_injection.empty()) {
    auto faults = FaultInjector::Parse(c.test_fault_injection);
    Check(&bad, faults.ok(), "--test-fault-injection", std::string(faults.status().message()));
  }
  for (const auto& [flag, path] : {std::pair<std::string, std::string>{"--tls-cert", c.tls_cert},
                                   {"--tls-key", c.tls_key},
                                   {"--tls-client-ca", c.tls_client_ca}}) {
    if (path.empty()) continue;
    std::string why = CLI::ExistingFile(path);
    Check(&bad, why.empty(), flag, why);
  }

  if (!bad.empty()) {
    for (const Bad& b : bad) err << "arcface-server: " << b.message << "\n";
    err << "Run with --help for the flags.\n";
    result.exit_code = 2;
  }
  return result;
}

}  // namespace arcface::service
