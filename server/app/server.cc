#include "server/app/server.h"

#include <dlfcn.h>
#include <grpc/support/log.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "server/app/process_signals.h"
#include "server/gallery/torch_index.h"
#include "server/model/demo_weights.h"

#ifndef ARCFACE_VERSION
#define ARCFACE_VERSION "0.0.0"
#endif

namespace arcface::app {
namespace {

constexpr char kServiceName[] = "arcface.v1.FaceEmbedding";

// The exit status for a failed phase (the header's rule).
int ExitStatus(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kUnimplemented:
      return 2;
    default:
      return 1;
  }
}

// The same code, the message behind `prefix`.
absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

struct Credentials {
  std::shared_ptr<grpc::ServerCredentials> creds;
  std::string mode;  // "plaintext", "tls", "mutual-tls"
};

absl::StatusOr<Credentials> MakeCredentials(const service::ServerConfig& c) {
  if (c.tls_cert.empty()) return Credentials{grpc::InsecureServerCredentials(), "plaintext"};
  // An unreadable file that the flags named is the flag's fault: status 2, whatever the reason.
  auto read = [](const std::string& path, std::string* out) {
    absl::StatusOr<std::string> bytes = common::ReadFile(path);
    if (!bytes.ok()) return absl::InvalidArgumentError(bytes.status().message());
    *out = *std::move(bytes);
    return absl::OkStatus();
  };
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::Status s = read(c.tls_key, &pair.private_key);
  if (s.ok()) s = read(c.tls_cert, &pair.cert_chain);
  if (!s.ok()) return s;
  grpc::SslServerCredentialsOptions options(
      c.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!c.tls_client_ca.empty()) {
    s = read(c.tls_client_ca, &options.pem_root_certs);
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

void SetHealth(grpc::Server* server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus("", serving);
  health->SetServingStatus(kServiceName, serving);
}

}  // namespace

Server::Server(service::ServerConfig config)
    : config_(std::move(config)), specs_(service::ServedModelSpecs(config_)) {}

Server::~Server() { StopServing(absl::Now(), absl::Now()); }

int Server::Run(const absl::Notification& stop) {
  gpr_set_log_function(LogFromGrpc);
  absl::Status status = Listen();
  if (status.ok()) status = LoadModels();
  if (status.ok()) status = WarmUp();
  if (status.ok()) status = LoadDetector();
  if (status.ok()) status = OpenGallery();
  if (!status.ok()) {
    spdlog::error("{}", std::string(status.message()));
    StopServing(absl::Now(), absl::Now());
    return ExitStatus(status);
  }
  Serve(stop);
  return Drain();
}

absl::Status Server::Listen() {
  const service::ServerConfig& cfg = config_;
  std::vector<std::string> model_names;
  for (const service::ModelSpec& spec : specs_) model_names.push_back(spec.name);
  metrics_ = std::make_unique<service::ServiceMetrics>(cfg.max_batch_size, model_names);
  pool_threads_ = cfg.preprocess_threads > 0
                      ? cfg.preprocess_threads
                      : std::max(2, static_cast<int>(std::thread::hardware_concurrency()));
  pool_faces_ =
      cfg.preprocess_queue > 0 ? cfg.preprocess_queue : std::max(1024, cfg.max_queue_size);
  absl::StatusOr<std::unique_ptr<service::WorkQueue>> pool =
      service::WorkQueue::Create(pool_threads_, pool_faces_);
  // The flags were validated: a failure here is not theirs.
  if (!pool.ok()) return absl::InternalError(pool.status().message());
  pool_ = *std::move(pool);
  metrics_->registry().AddCallbackGauge(
      "arcface_preprocess_calls", "Calls admitted to the preprocessing pool and not through it.",
      [queue = pool_.get()] { return double(queue->pending()); });
  metrics_->registry().AddCallbackGauge(
      "arcface_preprocess_admitted_faces",
      "Faces (and Compare matrices, in crops) of the calls on the preprocessing pool; new calls "
      "are refused beyond --preprocess-queue.",
      [queue = pool_.get()] { return double(queue->pending_cost()); });

  service::ServiceOptions options;
  options.max_faces_per_request = cfg.max_faces_per_request;
  options.max_compare_rows = cfg.max_compare_rows;
  options.max_compare_cols = cfg.max_compare_cols;
  options.image_limits.max_pixels = cfg.max_image_pixels;
  options.image_limits.max_encoded_bytes = static_cast<size_t>(cfg.max_message_bytes);
  options.max_message_bytes = static_cast<uint64_t>(cfg.max_message_bytes);
  options.server_version = ARCFACE_VERSION;
  service_ = std::make_unique<service::FaceEmbeddingService>(options, metrics_.get(), pool_.get());

  gallery_metrics_ = std::make_unique<service::GalleryMetrics>(&metrics_->registry());
  absl::StatusOr<std::unique_ptr<service::WorkQueue>> gallery_queue = service::WorkQueue::Create(
      cfg.gallery_threads, std::max(cfg.gallery_max_probes, cfg.gallery_max_faces_per_enroll) * 4);
  if (!gallery_queue.ok()) return absl::InternalError(gallery_queue.status().message());
  gallery_queue_ = *std::move(gallery_queue);
  service::GalleryServiceOptions gallery_options;
  gallery_options.max_faces_per_enroll = cfg.gallery_max_faces_per_enroll;
  gallery_options.max_probes_per_identify = cfg.gallery_max_probes;
  gallery_options.max_top_k = cfg.gallery_max_top_k;
  gallery_options.hnsw_min_faces = static_cast<uint64_t>(cfg.gallery_hnsw_min_faces);
  gallery_service_ = std::make_unique<service::FaceGalleryService>(
      service_->env(), gallery_options, gallery_queue_.get(), gallery_metrics_.get());
  admin_service_ = std::make_unique<service::ModelAdminService>(service_->env());

  absl::StatusOr<Credentials> creds = MakeCredentials(cfg);
  if (!creds.ok()) return Prefixed("--tls-*: ", creds.status());
  tls_mode_ = creds->mode;

  grpc::EnableDefaultHealthCheckService(true);
  // Loading the reflection library registers its plugin with every ServerBuilder made after.
  if (cfg.reflection && dlopen(ARCFACE_REFLECTION_LIBRARY, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("--reflection: cannot load ", ARCFACE_REFLECTION_LIBRARY, ": ", dlerror()));
  }
  grpc::ServerBuilder builder;
  builder.AddListeningPort(cfg.listen, creds->creds, &grpc_port_);
  builder.RegisterService(service_.get());
  builder.RegisterService(gallery_service_.get());
  builder.RegisterService(admin_service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(cfg.max_message_bytes));
  // gRPC enables SO_REUSEPORT by default, which would let a second server "bind" a busy port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  grpc_ = builder.BuildAndStart();
  if (grpc_ == nullptr || grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for gRPC on ", cfg.listen,
                                               " (address in use, or not a local address?)"));
  }
  SetHealth(grpc_.get(), false);

  service::ServiceMetrics* metrics = metrics_.get();
  http_ = std::make_unique<service::HttpServer>([metrics] { return metrics->Render(); });
  if (absl::Status s = http_->Start(cfg.http_listen); !s.ok()) {
    return absl::UnavailableError(absl::StrCat("--http-listen: ", s.message()));
  }
  spdlog::info("arcface-server {} listening: gRPC {} ({}, reflection {}), HTTP {}", ARCFACE_VERSION,
               WithPort(cfg.listen, grpc_port_), tls_mode_, cfg.reflection ? "on" : "off",
               WithPort(cfg.http_listen, http_->port()));
  return absl::OkStatus();
}

absl::Status Server::LoadModels() {
  load_start_ = absl::Now();
  if (specs_.empty()) {
    return absl::InvalidArgumentError("--weights: no model (--model, --weights, --demo-weights)");
  }
  for (const service::ModelSpec& spec : specs_) {
    if (spec.demo) {
      checkpoints_.push_back(model::MakeDemoCheckpoint());
      continue;
    }
    absl::StatusOr<model::Checkpoint> loaded = model::LoadCheckpoint(spec.path);
    // Whatever is wrong with the file (missing, unreadable, malformed), its flag is at fault.
    if (!loaded.ok()) {
      const std::string flag =
          spec.name == service::kWeightsModelName && spec.path == config_.weights
              ? std::string("--weights")
              : absl::StrCat("--model ", spec.name);
      return absl::InvalidArgumentError(absl::StrCat(flag, ": ", loaded.status().message()));
    }
    checkpoints_.push_back(*std::move(loaded));
  }
  return absl::OkStatus();
}

absl::Status Server::WarmUp() {
  const service::ServerConfig& cfg = config_;
  absl::StatusOr<engine::Precision> precision = engine::ParsePrecision(cfg.precision);
  if (!precision.ok()) return Prefixed("--precision: ", precision.status());
  engine::EngineOptions engine_options;
  engine_options.device = cfg.device;
  engine_options.precision = *precision;
  engine_options.threads = cfg.threads;
  engine_options.winograd = cfg.cpu_winograd;
  engine_options.warmup_batch_size = cfg.warmup_batch_size;
  engine_options.max_batch_size = cfg.max_batch_size;  // CUDA graphs up to the batcher's limit
  // A lane (stream and staging buffers) for each batch in flight; ignored on the CPU.
  if (cfg.max_batches_in_flight > 0) engine_options.cuda_lanes = cfg.max_batches_in_flight;
  if (!cfg.test_fault_injection.empty()) {
    // Validated with the flags; parsed again here for the injector itself.
    faults_ = *service::FaultInjector::Parse(cfg.test_fault_injection);
  }
  builder_ = std::make_unique<ModelBuilder>(cfg, engine_options, faults_.get(), metrics_.get());
  for (size_t i = 0; i < specs_.size(); ++i) {
    absl::StatusOr<service::ServedModel> built =
        builder_->Build(specs_[i], std::move(checkpoints_[i]));
    if (!built.ok()) return built.status();
    built_.push_back(*std::move(built));
  }
  checkpoints_.clear();
  return absl::OkStatus();
}

absl::Status Server::LoadDetector() {
  const service::ServerConfig& cfg = config_;
  detect::DetectorConfig config;
  if (!service::ParseDetectorFlag(cfg.detector, &config.detector, &config.model_dir)) {
    spdlog::info("detector: none (--detector none); Detect answers UNIMPLEMENTED");
    service_->SetDetection(nullptr, gallery_service_->search());
    return absl::OkStatus();
  }
  if (config.detector.empty()) config.detector = detect::DetectorConfig().detector;
  config.device = built_.front().description.device;  // beside the default embedding model
  config.max_faces_per_frame = cfg.detector_max_faces;
  const absl::Time start = absl::Now();
  // Built and warmed up on a thread that exits afterwards, as the engine is (WarmUp says why).
  absl::StatusOr<std::unique_ptr<detect::FaceDetector>> detector;
  std::thread([&] { detector = detect::FaceDetector::Create(config); }).join();
  if (!detector.ok()) {
    // A missing or malformed file is the flag's fault (exit 2); torch failing is not.
    const absl::StatusCode code = detector.status().code();
    const bool files =
        code == absl::StatusCode::kNotFound || code == absl::StatusCode::kInvalidArgument;
    return absl::Status(
        files ? absl::StatusCode::kInvalidArgument : code,
        absl::StrCat("--detector ", cfg.detector, ": ", detector.status().message()));
  }
  detector_ = *std::move(detector);
  detector_model_ = std::make_unique<DetectorModel>(detector_.get());
  detector_metrics_ = std::make_unique<service::DetectorMetrics>(&metrics_->registry(),
                                                                 cfg.detector_max_batch_size);
  detect::DetectorDescription description = detector_->description();
  description.default_min_score = cfg.detector_min_score;
  description.max_faces_per_frame = cfg.detector_max_faces;
  batching::DynamicBatcher::Options batching;
  batching.max_batch_size = cfg.detector_max_batch_size;
  batching.max_queue_delay = absl::Microseconds(cfg.detector_max_queue_delay_us);
  batching.max_queue_size = cfg.detector_max_queue_size;
  batching.cancel_poll_interval = absl::Microseconds(cfg.cancel_poll_interval_us);
  absl::StatusOr<std::unique_ptr<service::FrameDetector>> frame_detector =
      service::FrameDetector::Create(batching, detector_model_.get(), std::move(description),
                                     detector_metrics_.get(), /*clock=*/nullptr,
                                     cfg.detector_max_held_mib << 20);
  if (!frame_detector.ok()) return Prefixed("detector batching: ", frame_detector.status());
  frame_detector_ = *std::move(frame_detector);
  service_->SetDetection(frame_detector_.get(), gallery_service_->search());
  const detect::DetectorDescription& d = frame_detector_->description();
  spdlog::info(
      "detector: {} ({} + {}) on {}, input {} px, sha256 {}; max batch {} frames, "
      "max queue delay {} us, max queue {} frames, max faces {}, min score {}; loaded "
      "in {:.2f} s",
      d.detector_id, d.detector, d.landmarks, d.device, d.input_size, d.weights_sha256,
      cfg.detector_max_batch_size, cfg.detector_max_queue_delay_us, cfg.detector_max_queue_size,
      d.max_faces_per_frame, d.default_min_score, absl::ToDoubleSeconds(absl::Now() - start));
  return absl::OkStatus();
}

absl::Status Server::OpenGallery() {
  const service::ServerConfig& cfg = config_;
  service::GalleryServiceOptions limits;
  limits.max_faces_per_enroll = cfg.gallery_max_faces_per_enroll;
  limits.max_probes_per_identify = cfg.gallery_max_probes;
  limits.max_top_k = cfg.gallery_max_top_k;
  limits.hnsw_min_faces = static_cast<uint64_t>(cfg.gallery_hnsw_min_faces);
  arcface::v1::GalleryLimits reported;
  if (cfg.gallery_store == "none") {
    service::FillGalleryLimits(limits, nullptr, &reported);
    service_->SetGalleryLimits(reported);
    spdlog::info("gallery: none (--gallery-store none); FaceGallery answers UNIMPLEMENTED");
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<gallery::GalleryStore>> store =
      gallery::OpenGalleryStore(cfg.gallery_store);
  // A URI of no known kind or a newer schema is the flag's fault (exit 2); an unreachable
  // store is the machine's (exit 1): the store's code says which.
  if (!store.ok()) return Prefixed("--gallery-store: ", store.status());
  gallery::GalleriesOptions options;
  // With the model on CUDA, the galleries' matrices live beside it: a search is a matmul and a
  // top-k there. On the CPU, FAISS.
  if (absl::StartsWith(built_.front().description.device, "cuda")) {
    const c10::Device device(built_.front().description.device);
    options.index_factory = [device](int dim) { return gallery::MakeTorchIndex(device, dim); };
  }
  options.hnsw_min_faces = static_cast<uint64_t>(cfg.gallery_hnsw_min_faces);
  options.hnsw.m = cfg.gallery_hnsw_m;
  options.hnsw.ef_search = cfg.gallery_hnsw_ef_search;
  absl::StatusOr<std::unique_ptr<gallery::Galleries>> galleries =
      gallery::Galleries::Open(*std::move(store), std::move(options));
  if (!galleries.ok()) return Prefixed("--gallery-store: loading: ", galleries.status());
  galleries_ = *std::move(galleries);
  uint64_t faces = 0;
  const std::vector<gallery::GalleryStats> all = galleries_->AllStats();
  for (const gallery::GalleryStats& g : all) faces += g.num_faces;
  spdlog::info("gallery: store {}; {} galleries, {} faces loaded in {:.3f} s",
               galleries_->store_description(), all.size(), faces, galleries_->load_seconds());
  gallery_metrics_->SetGalleries(galleries_.get());
  gallery_service_->SetGalleries(galleries_.get());
  service::FillGalleryLimits(limits, galleries_.get(), &reported);
  service_->SetGalleryLimits(reported);
  return absl::OkStatus();
}

void Server::Serve(const absl::Notification& stop) {
  const service::ServerConfig& cfg = config_;
  for (size_t i = 0; i < built_.size(); ++i) {
    const service::ModelDescription& m = built_[i].description;
    spdlog::info("model {}{}: arch {} model_id {} weights {} sha256 {}", m.name,
                 i == 0 ? " (default)" : "", m.arch, m.model_id,
                 m.demo_weights ? std::string("(demo)") : m.weights_path, m.weights_sha256);
    if (m.demo_weights) {
      spdlog::warn(
          "DEMO WEIGHTS (model {}): seeded random, untrained; the pipeline is real but the "
          "embeddings are NOT meaningful",
          m.name);
    }
    builder_->Publish(built_[i]);
  }
  const service::ModelDescription& first = built_.front().description;
  spdlog::info(
      "engine: device {} precision {} backend {} threads {} warm-up batch {}; {} model(s) "
      "loaded in {:.2f} s",
      first.device, first.precision, first.backend,
      cfg.threads == 0 ? std::string("default") : std::to_string(cfg.threads),
      cfg.warmup_batch_size, built_.size(), absl::ToDoubleSeconds(absl::Now() - load_start_));
  spdlog::info(
      "batching: max batch {} max queue delay {} us max queue {} crops, {} batch(es) in flight; "
      "limits: {} faces per request, {} message bytes, {} image pixels, compare {}x{}; "
      "preprocessing threads {}, faces {}; drain timeout {}",
      cfg.max_batch_size, cfg.max_queue_delay_us, cfg.max_queue_size,
      built_.front().embedder->batcher().options().max_batches_in_flight, cfg.max_faces_per_request,
      cfg.max_message_bytes, cfg.max_image_pixels, cfg.max_compare_rows, cfg.max_compare_cols,
      pool_threads_, pool_faces_, absl::FormatDuration(cfg.drain_timeout));
  if (!cfg.test_hold_model_file.empty()) {
    spdlog::warn("TEST HOOK: batches wait before the model while {} (or {}.MODEL) exists",
                 cfg.test_hold_model_file, cfg.test_hold_model_file);
  }
  if (faults_) {
    spdlog::warn("TEST HOOK: fault injection {}", faults_->spec());
    service::FaultInjector::Install(faults_.get());
    faults_installed_ = true;
  }

  service_->SetReady(std::move(built_));
  built_.clear();
  reloader_ = std::make_unique<service::ModelReloader>(
      &service_->models(),
      [this](const service::ServedModel& current) {
        const service::ModelSpec* spec = nullptr;
        for (const service::ModelSpec& s : specs_) {
          if (s.name == current.name()) spec = &s;
        }
        return builder_->Reread(*spec, current);
      },
      [this](const service::ServedModel& now, const service::ServedModel&) {
        builder_->Publish(now);
      },
      metrics_.get());
  if (cfg.admin_rpc) admin_service_->SetReloader(reloader_.get());
  SetReloadHandler([reloader = reloader_.get()] {
    reloader->Request({}, "SIGHUP", [](absl::StatusOr<std::vector<service::ModelReload>> done) {
      if (!done.ok()) spdlog::warn("reload (SIGHUP): {}", std::string(done.status().message()));
    });
  });
  SetHealth(grpc_.get(), true);
  http_->SetReady(true);
  if (!cfg.port_file.empty()) {
    if (absl::Status s = WritePortFile(cfg.port_file, grpc_port_, http_->port()); !s.ok()) {
      spdlog::error("--port-file: {}", std::string(s.message()));
    }
  }
  spdlog::info("SERVING (model reload: SIGHUP{})",
               cfg.admin_rpc ? ", ModelAdmin.ReloadModels (--admin-rpc)" : "");
  stop.WaitForNotification();
}

int Server::Drain() {
  const absl::Duration timeout = config_.drain_timeout;
  const absl::Time drain_start = absl::Now();
  const absl::Time deadline = drain_start + timeout;
  spdlog::info("drain started: {} calls in flight, timeout {}", service_->inflight(),
               absl::FormatDuration(timeout));
  // Should something never finish, do not hang past the drain timeout for long.
  absl::Notification drained;
  std::thread watchdog([&drained, timeout] {
    if (drained.WaitForNotificationWithTimeout(timeout + absl::Seconds(10))) return;
    spdlog::error("drain did not complete within its timeout + 10 s: exiting");
    spdlog::default_logger()->flush();
    std::_Exit(1);
  });
  http_->SetDraining(true);
  SetHealth(grpc_.get(), false);
  service_->BeginDrain();
  if (!service_->WaitForIdle(deadline)) {
    spdlog::warn("drain timeout: {} calls still running are cancelled", service_->inflight());
  }
  service_->WaitForQuiet(absl::Milliseconds(300),
                         std::min(deadline, absl::Now() + absl::Seconds(3)));
  spdlog::debug("drain: calls finished after {:.3f} s",
                absl::ToDoubleSeconds(absl::Now() - drain_start));
  // Our calls are done (or past the deadline); what remains are connections the server waits on
  // to close after GOAWAY, and calls of other services (health Watch). A short grace, then gRPC
  // cancels them.
  StopServing(std::min(deadline, absl::Now() + absl::Seconds(1)), drain_start);
  batching::BatcherCounters counters;
  for (const service::ModelRef& model : service_->models().all()) {
    const auto c = model->embedder->batcher().counters();
    counters.tasks_succeeded += c.tasks_succeeded;
    counters.items_batched += c.items_batched;
    counters.batches += c.batches;
  }
  spdlog::info(
      "drain finished in {:.3f} s: {} requests embedded by the serving models ({} crops in {} "
      "batches)",
      absl::ToDoubleSeconds(absl::Now() - drain_start), counters.tasks_succeeded,
      counters.items_batched, counters.batches);
  drained.Notify();
  watchdog.join();
  return 0;
}

void Server::StopServing(absl::Time grpc_deadline, absl::Time since) {
  if (stopped_) return;
  stopped_ = true;
  auto elapsed = [since] { return absl::ToDoubleSeconds(absl::Now() - since); };
  SetReloadHandler(nullptr);
  if (grpc_) {
    grpc_->Shutdown(absl::ToChronoTime(grpc_deadline));
    spdlog::debug("stopping: gRPC server shut down after {:.3f} s", elapsed());
  }
  // The detector first: its frames' faces may still go on to the embedder.
  if (frame_detector_) frame_detector_->Shutdown();
  // No call reaches the reloader now: a reload in progress finishes, a replaced version retires.
  if (reloader_) reloader_->Stop();
  if (service_) {
    for (const service::ModelRef& model : service_->models().all()) model->embedder->Shutdown();
  }
  for (const service::ServedModel& model : built_) model.embedder->Shutdown();  // a failed start
  if (pool_) pool_->Shutdown();
  if (gallery_queue_) gallery_queue_->Shutdown();
  if (faults_installed_) service::FaultInjector::Install(nullptr);  // no preprocessing runs now
  spdlog::debug("stopping: batcher and pool stopped after {:.3f} s", elapsed());
  if (http_) http_->Stop();
}

}  // namespace arcface::app
