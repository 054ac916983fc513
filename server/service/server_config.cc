#include "server/service/server_config.h"

#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/address.h"
#include "server/batching/dynamic_batcher.h"
#include "server/service/fault_injection.h"

#ifndef ARCFACE_VERSION
#define ARCFACE_VERSION "0.0.0"
#endif

namespace arcface::service {
namespace {

// Cross-flag rules (which CLI11's per-option validators cannot see): the message names the
// flag; the caller turns it into exit status 2.
struct Bad {
  std::string message;
};

void Check(std::vector<Bad>* bad, bool ok, const std::string& flag, const std::string& what) {
  if (!ok) bad->push_back({absl::StrCat(flag, ": ", what)});
}

// Validators for what CLI::Range and CLI::IsMember cannot express. Each returns "" for a good
// value, else what is wrong with it; CLI11 puts the flag's name in front ("--device: ...") and
// the parse ends with exit status 2.
CLI::Validator DeviceName() {
  return CLI::Validator(
      [](std::string& d) -> std::string {
        if (d == "auto" || d == "cpu" || d == "cuda") return "";
        int index = -1;
        if (absl::StartsWith(d, "cuda:") && absl::SimpleAtoi(d.substr(5), &index) && index >= 0 &&
            index < 1024) {
          return "";
        }
        return absl::StrCat("'", d, "' is not auto, cpu, cuda or cuda:N");
      },
      "auto|cpu|cuda|cuda:N");
}

CLI::Validator ListenAddress() {
  return CLI::Validator(
      [](std::string& address) -> std::string {
        absl::StatusOr<common::HostPort> parsed =
            common::ParseHostPort(address, common::PortZero::kAllowed);
        return parsed.ok() ? "" : std::string(parsed.status().message());
      },
      "HOST:PORT");
}

CLI::Validator DrainTimeout() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        absl::Duration d;
        if (ParseDrainTimeout(text, &d) && d >= absl::ZeroDuration() && d <= absl::Hours(24)) {
          return "";
        }
        return absl::StrCat("'", text, "' is not a duration in 0..24h (e.g. 30s, 500ms, 30)");
      },
      "DURATION");
}

// NAME=PATH: the name as requests give it, the weights file (or, for a family stored as a
// folder of files, the folder).
CLI::Validator ModelFlag() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        ModelSpec spec;
        return ParseModelFlag(text, &spec);
      },
      "NAME=PATH");
}

CLI::Validator DetectorSpec() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        std::string network, dir;
        if (!ParseDetectorFlag(text, &network, &dir)) return "";
        if (dir.empty()) {
          return absl::StrCat("'", text,
                              "' names no folder (none, DIR, tiny_face_detector:DIR "
                              "or ssd_mobilenetv1:DIR)");
        }
        struct stat st;
        if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
          return absl::StrCat(dir,
                              ": no such folder (the face-api model files; "
                              "deploy/fetch-models.sh fetches them)");
        }
        return "";
      },
      "none|DIR|tiny_face_detector:DIR|ssd_mobilenetv1:DIR");
}

}  // namespace

std::vector<ModelSpec> ServedModelSpecs(const ServerConfig& config) {
  std::vector<ModelSpec> specs = config.models;
  if (!config.weights.empty()) specs.push_back({kWeightsModelName, config.weights, false});
  if (config.demo_weights) specs.push_back({kDemoModelName, "", true});
  return specs;
}

std::string ParseModelFlag(const std::string& text, ModelSpec* spec) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos) {
    return absl::StrCat("'", text,
                        "' is not NAME=PATH (e.g. arcface=models/arcface_r50.safetensors)");
  }
  spec->name = text.substr(0, eq);
  spec->path = text.substr(eq + 1);
  spec->demo = false;
  const bool name_ok = !spec->name.empty() && spec->name.size() <= 64 &&
                       std::all_of(spec->name.begin(), spec->name.end(), [](char ch) {
                         return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' ||
                                ch == '.' || ch == '-';
                       });
  if (!name_ok) {
    return absl::StrCat("model name '", spec->name,
                        "' must be 1 to 64 characters of a-z, 0-9, '_', '.' and '-'");
  }
  struct stat st;
  if (spec->path.empty() || ::stat(spec->path.c_str(), &st) != 0) {
    return absl::StrCat(spec->path, ": no such file (model '", spec->name, "')");
  }
  return "";
}

bool IsLoopback(const std::string& listen) {
  if (absl::StartsWith(listen, "unix:") || absl::StartsWith(listen, "unix-abstract:")) return true;
  const size_t colon = listen.rfind(':');
  absl::string_view host = absl::string_view(listen).substr(0, colon);
  if (absl::ConsumePrefix(&host, "[") && !absl::ConsumeSuffix(&host, "]")) return false;
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

bool ParseDetectorFlag(const std::string& text, std::string* network, std::string* dir) {
  if (text == "none") return false;
  network->clear();
  *dir = text;
  for (const char* known : {"tiny_face_detector", "ssd_mobilenetv1"}) {
    const std::string prefix = absl::StrCat(known, ":");
    if (absl::StartsWith(text, prefix)) {
      *network = known;
      *dir = text.substr(prefix.size());
    }
  }
  return true;
}

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

  CLI::App app(
      "arcface-server: ArcFace face embeddings over gRPC (arcface.v1.FaceEmbedding), "
      "with /metrics, /healthz and /readyz over HTTP.",
      "arcface-server");
  app.set_version_flag("--version", std::string(ARCFACE_VERSION));
  app.option_defaults()->always_capture_default();

  app.add_option("--weights", c.weights,
                 "Weights file: py-feat's arcface_r50.safetensors or InsightFace's ONNX export")
      ->envname("ARCFACE_WEIGHTS")
      ->check(CLI::ExistingFile);
  app.add_flag("--demo-weights", c.demo_weights,
               "Serve seeded random (untrained) weights: a real pipeline, meaningless embeddings")
      ->envname("ARCFACE_DEMO_WEIGHTS");
  app.add_option("--model", c.model_flags,
                 "NAME=PATH: serve the weights file PATH as model NAME (repeatable; the first is "
                 "the default; NAME is a-z, 0-9, '_', '.', '-'). --weights PATH serves model "
                 "'arcface', --demo-weights model 'arcface-demo', after the --model ones")
      ->envname("ARCFACE_MODELS")
      ->delimiter(',')
      ->check(ModelFlag());
  app.add_option("--listen", c.listen,
                 "gRPC address host:port, an IPv6 host in brackets (port 0: any free port)")
      ->envname("ARCFACE_LISTEN")
      ->check(ListenAddress());
  app.add_option("--http-listen", c.http_listen, "HTTP address for /metrics /healthz /readyz")
      ->envname("ARCFACE_HTTP_LISTEN")
      ->check(ListenAddress());
  app.add_option("--device", c.device, "auto, cpu, cuda or cuda:N")
      ->envname("ARCFACE_DEVICE")
      ->check(DeviceName());
  app.add_option("--precision", c.precision,
                 "fp32; bf16; fp16 (CUDA only); int8 (CPU only, calibrated at start-up on "
                 "compiled-in face crops); reduced precision is opt-in")
      ->envname("ARCFACE_PRECISION")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16", "int8"}));
  app.add_option("--threads", c.threads,
                 "Intra-op threads of the model; 0: OpenMP's default (every core)")
      ->envname("ARCFACE_THREADS")
      ->check(CLI::Range(0, 1024));
  app.add_flag("--cpu-winograd,!--no-cpu-winograd", c.cpu_winograd,
               "CPU fp32: Winograd 3x3 convolutions (default; faster, about 1.2 GB more memory)")
      ->envname("ARCFACE_CPU_WINOGRAD");
  app.add_option("--max-batch-size", c.max_batch_size, "Crops per model batch at most")
      ->envname("ARCFACE_MAX_BATCH_SIZE")
      ->check(CLI::Range(1, 4096));
  app.add_option("--max-queue-delay-us", c.max_queue_delay_us,
                 "Longest a crop waits for its batch to fill, in microseconds")
      ->envname("ARCFACE_MAX_QUEUE_DELAY_US")
      ->check(CLI::Range(int64_t{0}, int64_t{10'000'000}));
  app.add_option("--max-queue-size", c.max_queue_size,
                 "Crops queued for the model at most (at least --max-batch-size); beyond: "
                 "RESOURCE_EXHAUSTED")
      ->envname("ARCFACE_MAX_QUEUE_SIZE")
      ->check(CLI::Range(1, 10'000'000));
  app.add_option("--max-batches-in-flight", c.max_batches_in_flight,
                 "Batches in the model at once, each on its own CUDA stream; 0: automatic (1 on "
                 "the CPU, where more does not pay: forward passes share the same cores; 2 on "
                 "CUDA)")
      ->envname("ARCFACE_MAX_BATCHES_IN_FLIGHT")
      ->check(CLI::Range(0, batching::DynamicBatcher::kMaxBatchesInFlight));
  app.add_option("--cancel-poll-interval-us", c.cancel_poll_interval_us,
                 "How often queued calls are checked for cancellation, freeing their queue room, "
                 "in microseconds; 0: only when their batch forms")
      ->envname("ARCFACE_CANCEL_POLL_INTERVAL_US")
      ->check(CLI::Range(int64_t{0}, int64_t{10'000'000}));
  app.add_option("--max-faces-per-request", c.max_faces_per_request,
                 "Faces in one Embed request (face probes in one Compare) at most")
      ->envname("ARCFACE_MAX_FACES_PER_REQUEST")
      ->check(CLI::Range(1, 1'000'000));
  app.add_option("--max-message-bytes", c.max_message_bytes,
                 "Largest gRPC request message accepted, in bytes")
      ->envname("ARCFACE_MAX_MESSAGE_BYTES")
      ->check(CLI::Range(int64_t{1024}, int64_t{std::numeric_limits<int>::max()}));
  app.add_option("--max-image-pixels", c.max_image_pixels,
                 "Largest image (width x height) decoded or accepted raw")
      ->envname("ARCFACE_MAX_IMAGE_PIXELS")
      ->check(CLI::Range(int64_t{1}, int64_t{1'000'000'000}));
  app.add_option("--max-compare-rows", c.max_compare_rows,
                 "Compare: queries at most (and the reply must fit --max-message-bytes)")
      ->envname("ARCFACE_MAX_COMPARE_ROWS")
      ->check(CLI::Range(1, 65536));
  app.add_option("--max-compare-cols", c.max_compare_cols,
                 "Compare: references at most (and the reply must fit --max-message-bytes)")
      ->envname("ARCFACE_MAX_COMPARE_COLS")
      ->check(CLI::Range(1, 65536));
  app.add_option("--preprocess-threads", c.preprocess_threads,
                 "Threads decoding and aligning faces; 0: one per hardware thread (at least 2)")
      ->envname("ARCFACE_PREPROCESS_THREADS")
      ->check(CLI::Range(0, 1024));
  app.add_option("--preprocess-queue", c.preprocess_queue,
                 "Faces admitted to preprocessing at most, over all calls queued or being "
                 "decoded (a Compare matrix counts as its size in 112x112 crops; a call larger "
                 "than this runs alone); beyond: RESOURCE_EXHAUSTED. 0: the larger of 1024 and "
                 "--max-queue-size")
      ->envname("ARCFACE_PREPROCESS_QUEUE")
      ->check(CLI::Range(0, 1'000'000));
  app.add_option("--warmup-batch-size", c.warmup_batch_size,
                 "Batch size of the warm-up pass before SERVING; 0 skips it")
      ->envname("ARCFACE_WARMUP_BATCH_SIZE")
      ->check(CLI::Range(0, 4096));
  app.add_option("--gallery-store", c.gallery_store,
                 "The face gallery's store: sqlite:PATH (embedded, one server per file), "
                 "postgres://USER@HOST:PORT/DB (shared by replicas; password in the URI or "
                 "PGPASSWORD), or none (FaceGallery answers UNIMPLEMENTED)")
      ->envname("ARCFACE_GALLERY_STORE");
  app.add_option("--gallery-max-faces-per-enroll", c.gallery_max_faces_per_enroll,
                 "Faces in one Enroll at most")
      ->envname("ARCFACE_GALLERY_MAX_FACES_PER_ENROLL")
      ->check(CLI::Range(1, 100'000));
  app.add_option("--gallery-max-probes", c.gallery_max_probes, "Probes in one Identify at most")
      ->envname("ARCFACE_GALLERY_MAX_PROBES")
      ->check(CLI::Range(1, 100'000));
  app.add_option("--gallery-max-top-k", c.gallery_max_top_k,
                 "Identify: candidates (distinct subjects) per probe at most")
      ->envname("ARCFACE_GALLERY_MAX_TOP_K")
      ->check(CLI::Range(1, 10'000));
  app.add_option("--gallery-threads", c.gallery_threads,
                 "Threads running gallery store writes and searches")
      ->envname("ARCFACE_GALLERY_THREADS")
      ->check(CLI::Range(1, 256));
  app.add_option("--gallery-hnsw-min-faces", c.gallery_hnsw_min_faces,
                 "Galleries with at least this many faces are searched approximately (FAISS "
                 "HNSW, built in the background; exact until then); 0: always exact")
      ->envname("ARCFACE_GALLERY_HNSW_MIN_FACES")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  app.add_option("--gallery-hnsw-m", c.gallery_hnsw_m, "HNSW graph degree")
      ->envname("ARCFACE_GALLERY_HNSW_M")
      ->check(CLI::Range(4, 256));
  app.add_option("--gallery-hnsw-ef-search", c.gallery_hnsw_ef_search,
                 "HNSW search beam (higher: better recall, slower)")
      ->envname("ARCFACE_GALLERY_HNSW_EF_SEARCH")
      ->check(CLI::Range(1, 65536));
  app.add_option("--detector", c.detector,
                 "The face detector behind Detect: none (Detect answers UNIMPLEMENTED), or a "
                 "folder with face-api's model files (deploy/fetch-models.sh), optionally "
                 "tiny_face_detector:DIR or ssd_mobilenetv1:DIR to choose the box network")
      ->envname("ARCFACE_DETECTOR")
      ->check(DetectorSpec());
  app.add_option("--detector-max-batch-size", c.detector_max_batch_size,
                 "Frames per detector batch at most")
      ->envname("ARCFACE_DETECTOR_MAX_BATCH_SIZE")
      ->check(CLI::Range(1, 1024));
  app.add_option("--detector-max-queue-delay-us", c.detector_max_queue_delay_us,
                 "Longest a frame waits for its detector batch to fill, in microseconds")
      ->envname("ARCFACE_DETECTOR_MAX_QUEUE_DELAY_US")
      ->check(CLI::Range(int64_t{0}, int64_t{10'000'000}));
  app.add_option("--detector-max-queue-size", c.detector_max_queue_size,
                 "Frames queued for the detector at most (at least --detector-max-batch-size); "
                 "beyond: RESOURCE_EXHAUSTED")
      ->envname("ARCFACE_DETECTOR_MAX_QUEUE_SIZE")
      ->check(CLI::Range(1, 1'000'000));
  // Up to the box networks' own count of candidate boxes (SSD-MobileNetV1's 5118 anchors).
  app.add_option("--detector-max-faces", c.detector_max_faces,
                 "Faces one frame may return at most (DetectRequest.max_faces up to it)")
      ->envname("ARCFACE_DETECTOR_MAX_FACES")
      ->check(CLI::Range(1, 5118));
  app.add_option("--detector-max-held-mib", c.detector_max_held_mib,
                 "Decoded frames held by Detect calls at once, over all calls, in MiB; beyond: "
                 "RESOURCE_EXHAUSTED")
      ->envname("ARCFACE_DETECTOR_MAX_HELD_MIB")
      ->check(CLI::Range(int64_t{16}, int64_t{1} << 20));
  app.add_option("--detector-min-score", c.detector_min_score,
                 "The detector's score threshold when a request gives none, in [0, 1]")
      ->envname("ARCFACE_DETECTOR_MIN_SCORE")
      ->check(CLI::Range(0.0f, 1.0f));
  app.add_option("--drain-timeout", drain_timeout,
                 "On SIGTERM/SIGINT, how long accepted calls may take to finish (e.g. 30s, 500ms, "
                 "or seconds)")
      ->envname("ARCFACE_DRAIN_TIMEOUT")
      ->check(DrainTimeout());
  app.add_option("--log-level", c.log_level, "trace, debug, info, warn, error, critical, off")
      ->envname("ARCFACE_LOG_LEVEL")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_option("--log-format", c.log_format, "text or json (one object per line)")
      ->envname("ARCFACE_LOG_FORMAT")
      ->check(CLI::IsMember({"text", "json"}));
  app.add_flag("--reflection", c.reflection, "Serve gRPC server reflection")
      ->envname("ARCFACE_REFLECTION");
  app.add_flag("--admin-rpc", c.admin_rpc,
               "Serve ModelAdmin.ReloadModels (reload models without a restart, as SIGHUP does); "
               "only with a loopback --listen address or mutual TLS (--tls-client-ca)")
      ->envname("ARCFACE_ADMIN_RPC");
  app.add_option("--tls-cert", c.tls_cert, "Server certificate chain (PEM); enables TLS")
      ->envname("ARCFACE_TLS_CERT")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-key", c.tls_key, "Server private key (PEM)")
      ->envname("ARCFACE_TLS_KEY")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-client-ca", c.tls_client_ca,
                 "CA bundle (PEM) for client certificates; enables mutual TLS (required and "
                 "verified)")
      ->envname("ARCFACE_TLS_CLIENT_CA")
      ->check(CLI::ExistingFile);
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

  // Every value passed its option's validator; what is left are the rules between flags.
  std::vector<Bad> bad;
  for (const std::string& flag : c.model_flags) {
    ModelSpec spec;
    ParseModelFlag(flag, &spec);  // passed ModelFlag()
    c.models.push_back(std::move(spec));
  }
  const std::vector<ModelSpec> served = ServedModelSpecs(c);
  if (!c.weights.empty() && c.demo_weights) {
    bad.push_back({"--weights and --demo-weights: give exactly one, not both"});
  } else if (served.empty()) {
    bad.push_back(
        {"--weights: no model; give --weights PATH (or ARCFACE_WEIGHTS), --model NAME=PATH, or "
         "--demo-weights to try the pipeline on untrained weights"});
  }
  for (size_t i = 0; i < served.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      Check(&bad, served[i].name != served[j].name, "--model",
            absl::StrCat("model name '", served[i].name, "' is given twice"));
    }
  }
  Check(&bad, c.max_queue_size >= c.max_batch_size, "--max-queue-size",
        absl::StrCat("must be at least --max-batch-size (", c.max_batch_size, "), got ",
                     c.max_queue_size));
  // CLI::Range lets NaN through (every comparison with it is false).
  Check(&bad, c.detector_min_score >= 0 && c.detector_min_score <= 1, "--detector-min-score",
        "must be in [0, 1]");
  Check(&bad, c.detector_max_queue_size >= c.detector_max_batch_size, "--detector-max-queue-size",
        absl::StrCat("must be at least --detector-max-batch-size (", c.detector_max_batch_size,
                     "), got ", c.detector_max_queue_size));
  Check(&bad, c.tls_cert.empty() == c.tls_key.empty(), "--tls-cert/--tls-key",
        "give both the certificate and the key, or neither");
  Check(&bad, c.tls_client_ca.empty() || !c.tls_cert.empty(), "--tls-client-ca",
        "mutual TLS needs --tls-cert and --tls-key too");
  Check(&bad, !c.admin_rpc || IsLoopback(c.listen) || !c.tls_client_ca.empty(), "--admin-rpc",
        absl::StrCat("--listen ", c.listen,
                     " can be reached from other machines; the admin RPC is served there only "
                     "with mutual TLS (--tls-client-ca); or listen on 127.0.0.1, [::1] or a unix: "
                     "socket, or reload with SIGHUP"));
  Check(&bad,
        c.gallery_store == "none" ||
            (absl::StartsWith(c.gallery_store, "sqlite:") && c.gallery_store.size() > 7) ||
            absl::StartsWith(c.gallery_store, "postgres://") ||
            absl::StartsWith(c.gallery_store, "postgresql://"),
        "--gallery-store", "must be sqlite:PATH, postgres://... (or postgresql://...) or none");
  // A hidden option's validation error would not name it (CLI11 gives hidden options no name),
  // so the test hook's spec is checked here.
  if (!c.test_fault_injection.empty()) {
    auto faults = FaultInjector::Parse(c.test_fault_injection);
    Check(&bad, faults.ok(), "--test-fault-injection", std::string(faults.status().message()));
  }
  // The text passed DrainTimeout(), which parsed it the same way (or it is the default).
  ParseDrainTimeout(drain_timeout, &c.drain_timeout);

  if (!bad.empty()) {
    for (const Bad& b : bad) err << "arcface-server: " << b.message << "\n";
    err << "Run with --help for the flags.\n";
    result.exit_code = 2;
  }
  return result;
}

}  // namespace arcface::service
