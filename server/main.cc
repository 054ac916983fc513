// arcface-server: serves arcface.v1.FaceEmbedding over gRPC, plus /metrics, /healthz and
// /readyz over HTTP. `arcface-server --help` lists the flags (each with an ARCFACE_* variable).
//
// Life cycle
// 1. Flags (a bad one: a message naming it, exit 2). SIGTERM/SIGINT are blocked before any
//    thread starts, so only the dedicated signal thread (sigwait) ever receives them.
// 2. gRPC and HTTP listen at once (a bind failure: exit 1), health NOT_SERVING, /readyz 503,
//    FaceEmbedding calls UNAVAILABLE while the model loads.
// 3. The weights load (a bad file: exit 2), the engine warms up, the batcher starts; then
//    health SERVING, /readyz 200, the port file is written.
// 4. On the first SIGTERM/SIGINT: health NOT_SERVING, /readyz 503, new calls UNAVAILABLE, open
//    streams finish after their read messages; every accepted call finishes; the gRPC server
//    shuts down (calls still running at the drain deadline are cancelled), the batcher flushes;
//    exit 0. A second signal exits at once with status 1; so does a drain still unfinished at
//    the drain timeout + 10 s (a batch stuck in the model keeps the batcher from flushing).
#include <dlfcn.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

#include <grpc/support/log.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/engine/engine.h"
#include "server/model/checkpoint.h"
#include "server/model/demo_weights.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"
#include "server/service/face_embedding_service.h"
#include "server/service/fault_injection.h"
#include "server/service/http_server.h"
#include "server/service/logging.h"
#include "server/service/service_metrics.h"
#include "server/service/server_config.h"
#include "server/service/work_queue.h"

#ifndef ARCFACE_VERSION
#define ARCFACE_VERSION "0.0.0"
#endif

namespace arcface {
namespace {

constexpr char kServiceName[] = "arcface.v1.FaceEmbedding";

// Adapts the engine to the service's model interface. It is also the boundary where an
// exception escaping the engine becomes a status: the engine turns libtorch's c10::Error into
// INTERNAL itself, but anything else (std::bad_alloc filling the output, say) would otherwise
// unwind into the batcher's model thread and end the process. The fault-injection test hook
// (`faults`, null unless --test-fault-injection) acts where the engine is called, inside that
// boundary.
class EngineModel final : public service::EmbeddingModel {
 public:
  EngineModel(engine::Engine* engine, service::FaultInjector* faults)
      : engine_(engine), faults_(faults) {}
  absl::StatusOr<std::vector<float>> Run(absl::Span<const uint8_t> crops) override {
    try {
      if (faults_ != nullptr) {
        if (absl::Status injected = faults_->BeforeBatch(); !injected.ok()) return injected;
      }
      absl::StatusOr<engine::EmbeddingBatch> batch = engine_->Run(crops);
      if (!batch.ok()) return batch.status();
      return std::move(batch->values);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("the engine threw: ", e.what()));
    }
  }

 private:
  engine::Engine* const engine_;
  service::FaultInjector* const faults_;
};

absl::Status ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return absl::OkStatus();
}

struct Credentials {
  std::shared_ptr<grpc::ServerCredentials> creds;
  std::string mode;  // "plaintext", "tls", "mutual-tls"
};

absl::StatusOr<Credentials> MakeCredentials(const service::ServerConfig& c) {
  if (c.tls_cert.empty()) return Credentials{grpc::InsecureServerCredentials(), "plaintext"};
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::Status s = ReadFile(c.tls_key, &pair.private_key);
  if (s.ok()) s = ReadFile(c.tls_cert, &pair.cert_chain);
  if (!s.ok()) return s;
  grpc::SslServerCredentialsOptions options(
      c.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!c.tls_client_ca.empty()) {
    s = ReadFile(c.tls_client_ca, &options.pem_root_certs);
    if (!s.ok()) return s;
  }
  options.pem_key_cert_pairs.push_back(std::move(pair));
  return Credentials{grpc::SslServerCredentials(options),
                     c.tls_client_ca.empty() ? "tls" : "mutual-tls"};
}

// Replaces the port of "host:port" for the log line.
std::string WithPort(const std::string& address, int port) {
  size_t colon = address.rfind(':');
  return absl::StrCat(address.substr(0, colon), ":", port);
}

absl::Status WritePortFile(const std::string& path, int grpc_port, int http_port) {
  // Written whole, then renamed, so that a reader never sees a partial file.
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << grpc_port << " " << http_port << "\n";
    if (!out.good()) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

// gRPC's own log lines (handshake failures, ...) go through spdlog, so that --log-format json
// keeps every line JSON. gRPC's errors here are mostly about a peer (a client without a
// certificate), not about the server: warnings.
void LogFromGrpc(gpr_log_func_args* args) {
  switch (args->severity) {
    case GPR_LOG_SEVERITY_DEBUG:
      spdlog::debug("grpc: {}", args->message);
      break;
    case GPR_LOG_SEVERITY_INFO:
      spdlog::info("grpc: {}", args->message);
      break;
    case GPR_LOG_SEVERITY_ERROR:
      spdlog::warn("grpc: {}", args->message);
      break;
  }
}

int Run(const service::ServerConfig& cfg, const sigset_t& signals) {
  gpr_set_log_function(LogFromGrpc);
  // The signal thread only notifies; everything else happens on this thread.
  static absl::Notification* const stop = new absl::Notification();
  std::thread([signals] {
    int count = 0;
    while (true) {
      int sig = 0;
      if (sigwait(&signals, &sig) != 0) continue;
      if (count++ == 0) {
        spdlog::info("received {}: draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        stop->Notify();
      } else {
        spdlog::error("received a second signal during the drain: exiting now");
        spdlog::default_logger()->flush();
        std::_Exit(1);
      }
    }
  }).detach();

  service::ServiceMetrics metrics(cfg.max_batch_size);
  const int pool_threads =
      cfg.preprocess_threads > 0
          ? cfg.preprocess_threads
          : std::max(2, static_cast<int>(std::thread::hardware_concurrency()));
  const int pool_faces = cfg.preprocess_queue > 0 ? cfg.preprocess_queue
                                                  : std::max(1024, cfg.max_queue_size);
  auto pool = service::WorkQueue::Create(pool_threads, pool_faces);
  if (!pool.ok()) {
    spdlog::error("{}", std::string(pool.status().message()));
    return 1;
  }
  metrics.registry().AddCallbackGauge(
      "arcface_preprocess_calls", "Calls admitted to the preprocessing pool and not through it.",
      [queue = pool->get()] { return double(queue->pending()); });
  metrics.registry().AddCallbackGauge(
      "arcface_preprocess_admitted_faces",
      "Faces (and Compare matrices, in crops) of the calls on the preprocessing pool; new calls "
      "are refused beyond --preprocess-queue.",
      [queue = pool->get()] { return double(queue->pending_cost()); });

  service::ServiceOptions options;
  options.max_faces_per_request = cfg.max_faces_per_request;
  options.max_compare_rows = cfg.max_compare_rows;
  options.max_compare_cols = cfg.max_compare_cols;
  options.image_limits.max_pixels = cfg.max_image_pixels;
  options.image_limits.max_encoded_bytes = static_cast<size_t>(cfg.max_message_bytes);
  options.max_message_bytes = static_cast<uint64_t>(cfg.max_message_bytes);
  options.server_version = ARCFACE_VERSION;
  service::FaceEmbeddingService face_service(options, &metrics, pool->get());

  absl::StatusOr<Credentials> creds = MakeCredentials(cfg);
  if (!creds.ok()) {
    spdlog::error("--tls-*: {}", std::string(creds.status().message()));
    return 2;
  }

  grpc::EnableDefaultHealthCheckService(true);
  // Loading the reflection library registers its plugin with every ServerBuilder made after.
  if (cfg.reflection && dlopen(ARCFACE_REFLECTION_LIBRARY, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    spdlog::error("--reflection: cannot load {}: {}", ARCFACE_REFLECTION_LIBRARY, dlerror());
    return 2;
  }
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  builder.AddListeningPort(cfg.listen, creds->creds, &grpc_port);
  builder.RegisterService(&face_service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(cfg.max_message_bytes));
  // gRPC enables SO_REUSEPORT by default, which would let a second server "bind" a busy port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || grpc_port == 0) {
    spdlog::error("cannot listen for gRPC on {} (address in use, or not a local address?)",
                  cfg.listen);
    return 1;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus("", false);
  health->SetServingStatus(kServiceName, false);

  service::HttpServer http([&metrics] { return metrics.Render(); });
  if (absl::Status s = http.Start(cfg.http_listen); !s.ok()) {
    spdlog::error("--http-listen: {}", std::string(s.message()));
    server->Shutdown(std::chrono::system_clock::now());
    return 1;
  }
  spdlog::info("arcface-server {} listening: gRPC {} ({}, reflection {}), HTTP {}",
               ARCFACE_VERSION, WithPort(cfg.listen, grpc_port), creds->mode,
               cfg.reflection ? "on" : "off", WithPort(cfg.http_listen, http.port()));

  // The model. Until it is warm, health says NOT_SERVING and calls are UNAVAILABLE.
  const absl::Time load_start = absl::Now();
  model::Checkpoint checkpoint;
  if (cfg.demo_weights) {
    checkpoint = model::MakeDemoCheckpoint();
  } else {
    absl::StatusOr<model::Checkpoint> loaded = model::LoadCheckpoint(cfg.weights);
    if (!loaded.ok()) {
      spdlog::error("--weights: {}", std::string(loaded.status().message()));
      server->Shutdown(std::chrono::system_clock::now());
      return 2;
    }
    checkpoint = std::move(*loaded);
  }
  absl::StatusOr<engine::Precision> precision = engine::ParsePrecision(cfg.precision);
  if (!precision.ok()) {
    spdlog::error("--precision: {}", std::string(precision.status().message()));
    server->Shutdown(std::chrono::system_clock::now());
    return 2;
  }
  engine::EngineOptions engine_options;
  engine_options.device = cfg.device;
  engine_options.precision = *precision;
  engine_options.threads = cfg.threads;
  engine_options.warmup_batch_size = cfg.warmup_batch_size;
  engine_options.max_batch_size = cfg.max_batch_size;  // CUDA graphs up to the batcher's limit
  // A lane (stream and staging buffers) for each batch in flight; ignored on the CPU.
  if (cfg.max_batches_in_flight > 0) engine_options.cuda_lanes = cfg.max_batches_in_flight;
  // Built (and warmed up) on a thread that exits afterwards. Every thread that runs libtorch
  // keeps an OpenMP team of its own; with the loading thread's idle team beside the model
  // thread's, libgomp manages more threads than there are cores and cuts its spin-wait at
  // barriers from 300000 to 1000 spins, so the model's threads sleep on a futex and are woken
  // at most barriers of the forward pass (docs/PERFORMANCE.md).
  absl::StatusOr<std::unique_ptr<engine::Engine>> engine;
  std::thread([&] { engine = engine::Engine::Create(checkpoint, engine_options); }).join();
  if (!engine.ok()) {
    spdlog::error("engine (--device {}, --precision {}, --threads {}): {}", cfg.device,
                  cfg.precision, cfg.threads, std::string(engine.status().message()));
    server->Shutdown(std::chrono::system_clock::now());
    // A device or precision this machine cannot serve is a bad flag value; anything else
    // (out of memory, a runtime failure) is not.
    const absl::StatusCode code = engine.status().code();
    return code == absl::StatusCode::kInvalidArgument ||
                   code == absl::StatusCode::kFailedPrecondition ||
                   code == absl::StatusCode::kUnimplemented
               ? 2
               : 1;
  }
  std::unique_ptr<service::FaultInjector> faults;
  if (!cfg.test_fault_injection.empty()) {
    // Validated with the flags; parsed again here for the injector itself.
    faults = *service::FaultInjector::Parse(cfg.test_fault_injection);
  }
  EngineModel engine_model(engine->get(), faults.get());

  service::ModelDescription model;
  model.arch = checkpoint.arch;
  model.model_id = checkpoint.ModelId();
  model.weights_sha256 = checkpoint.sha256;
  model.weights_path = cfg.demo_weights ? "" : cfg.weights;
  model.device = (*engine)->device();
  model.precision = engine::PrecisionName((*engine)->precision());
  model.demo_weights = cfg.demo_weights;
  model.device_memory = [e = engine->get()] { return e->device_memory(); };
  checkpoint = model::Checkpoint();  // the engine holds its own copy of the weights

  service::EmbedderOptions embedder_options;
  embedder_options.batching.max_batch_size = cfg.max_batch_size;
  embedder_options.batching.max_queue_delay = absl::Microseconds(cfg.max_queue_delay_us);
  embedder_options.batching.max_queue_size = cfg.max_queue_size;
  // Automatic: on the CPU one forward pass already uses every core (a second would only
  // contend); on CUDA one batch per lane, so copies, compute and the next batch overlap.
  embedder_options.batching.max_batches_in_flight =
      cfg.max_batches_in_flight > 0 ? cfg.max_batches_in_flight : (*engine)->concurrent_runs();
  embedder_options.batching.cancel_poll_interval =
      absl::Microseconds(cfg.cancel_poll_interval_us);
  embedder_options.batching.observer = &metrics;
  embedder_options.hold_file = cfg.test_hold_model_file;
  auto embedder = service::Embedder::Create(embedder_options, &engine_model);
  if (!embedder.ok()) {
    spdlog::error("batching: {}", std::string(embedder.status().message()));
    server->Shutdown(std::chrono::system_clock::now());
    return 2;
  }
  service::Embedder* emb = embedder->get();
  metrics.SetModelInfo(model.arch, model.model_id, model.device, model.precision);
  metrics.SetQueueDepthSource([emb] { return double(emb->batcher().queue_depth()); });
  metrics.SetHeldSource([emb] { return emb->held() ? 1.0 : 0.0; });
  metrics.SetDeviceMemorySource(model.device_memory);

  spdlog::info("model: arch {} model_id {} weights {} sha256 {}", model.arch, model.model_id,
               cfg.demo_weights ? std::string("(demo)") : cfg.weights, model.weights_sha256);
  if (cfg.demo_weights) {
    spdlog::warn("DEMO WEIGHTS: seeded random, untrained; the pipeline is real but the "
                 "embeddings are NOT meaningful");
  }
  spdlog::info("engine: device {} precision {} threads {} warm-up batch {}; loaded in {:.2f} s",
               model.device, model.precision,
               cfg.threads == 0 ? std::string("default") : std::to_string(cfg.threads),
               cfg.warmup_batch_size, absl::ToDoubleSeconds(absl::Now() - load_start));
  spdlog::info(
      "batching: max batch {} max queue delay {} us max queue {} crops, {} batch(es) in flight; "
      "limits: {} faces per request, {} message bytes, {} image pixels, compare {}x{}; "
      "preprocessing threads {}, faces {}; drain timeout {}",
      cfg.max_batch_size, cfg.max_queue_delay_us, cfg.max_queue_size,
      emb->batcher().options().max_batches_in_flight, cfg.max_faces_per_request,
      cfg.max_message_bytes, cfg.max_image_pixels, cfg.max_compare_rows, cfg.max_compare_cols,
      pool_threads, pool_faces, absl::FormatDuration(cfg.drain_timeout));
  if (!cfg.test_hold_model_file.empty()) {
    spdlog::warn("TEST HOOK: batches wait before the model while {} exists",
                 cfg.test_hold_model_file);
  }
  if (faults) {
    spdlog::warn("TEST HOOK: fault injection {}", faults->spec());
    service::FaultInjector::Install(faults.get());
  }

  face_service.SetReady(emb, model);
  health->SetServingStatus("", true);
  health->SetServingStatus(kServiceName, true);
  http.SetReady(true);
  if (!cfg.port_file.empty()) {
    if (absl::Status s = WritePortFile(cfg.port_file, grpc_port, http.port()); !s.ok()) {
      spdlog::error("--port-file: {}", std::string(s.message()));
    }
  }
  spdlog::info("SERVING");

  stop->WaitForNotification();

  // The drain.
  const absl::Time drain_start = absl::Now();
  const absl::Time deadline = drain_start + cfg.drain_timeout;
  spdlog::info("drain started: {} calls in flight, timeout {}", face_service.inflight(),
               absl::FormatDuration(cfg.drain_timeout));
  // Should something never finish, do not hang past the drain timeout for long.
  std::thread([timeout = cfg.drain_timeout] {
    absl::SleepFor(timeout + absl::Seconds(10));
    spdlog::error("drain did not complete within its timeout + 10 s: exiting");
    spdlog::default_logger()->flush();
    std::_Exit(1);
  }).detach();
  http.SetDraining(true);
  health->SetServingStatus("", false);
  health->SetServingStatus(kServiceName, false);
  face_service.BeginDrain();
  const bool idle = face_service.WaitForIdle(deadline);
  if (!idle) {
    spdlog::warn("drain timeout: {} calls still running are cancelled", face_service.inflight());
  }
  face_service.WaitForQuiet(absl::Milliseconds(300),
                            std::min(deadline, absl::Now() + absl::Seconds(3)));
  spdlog::debug("drain: calls finished after {:.3f} s", absl::ToDoubleSeconds(absl::Now() - drain_start));
  // Our calls are done (or past the deadline); what remains are connections the server waits on
  // to close after GOAWAY, and calls of other services (health Watch). A short grace, then gRPC
  // cancels them.
  server->Shutdown(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(1))));
  spdlog::debug("drain: gRPC server shut down after {:.3f} s", absl::ToDoubleSeconds(absl::Now() - drain_start));
  (*embedder)->Shutdown();
  (*pool)->Shutdown();
  service::FaultInjector::Install(nullptr);  // no preprocessing runs any more
  spdlog::debug("drain: batcher and pool stopped after {:.3f} s", absl::ToDoubleSeconds(absl::Now() - drain_start));
  http.Stop();
  const auto counters = emb->batcher().counters();
  spdlog::info("drain finished in {:.3f} s: {} requests embedded ({} crops in {} batches)",
               absl::ToDoubleSeconds(absl::Now() - drain_start), counters.tasks_succeeded,
               counters.items_batched, counters.batches);
  return 0;
}

}  // namespace
}  // namespace arcface

int main(int argc, char** argv) {
  // Before any thread exists, so that every thread inherits the mask and only sigwait() sees
  // the signals (no async-signal-safety concerns in handlers).
  // A process started in the background by a shell inherits SIGINT ignored, and an ignored
  // signal is discarded even while blocked: restore the default so that sigwait() sees it.
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A client that disconnects mid-write must not kill the process.
  signal(SIGPIPE, SIG_IGN);

  arcface::service::ParsedFlags parsed = arcface::service::ParseServerFlags(argc, argv, std::cout,
                                                                           std::cerr);
  if (parsed.exit_code >= 0) return parsed.exit_code;
  if (absl::Status s = arcface::service::ConfigureLogging(parsed.config.log_level,
                                                          parsed.config.log_format);
      !s.ok()) {
    std::cerr << "arcface-server: " << s.message() << "\n";
    return 2;
  }
  const int code = arcface::Run(parsed.config, signals);
  spdlog::default_logger()->flush();
  return code;
}
