#include "server/app/model_builder.h"

#include <spdlog/spdlog.h>

#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/app/engine_model.h"

namespace arcface::app {
namespace {

// A version's parts, destroyed in the reverse of this order: the Embedder (which calls the
// adapter) first, the engine last.
struct ModelParts {
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<EngineModel> adapter;
  std::unique_ptr<service::Embedder> embedder;
};

}  // namespace

absl::StatusOr<service::ServedModel> ModelBuilder::Build(const service::ModelSpec& spec,
                                                         model::Checkpoint checkpoint) const {
  const service::ServerConfig& cfg = config_;
  const bool dlib = checkpoint.family == model::Family::kDlibResNet;
  engine::EngineOptions options = engine_options_;
  if (dlib && options.precision != engine::Precision::kFp32) {
    spdlog::warn("model {}: {} runs in fp32 (--precision {} applies to ArcFace models)", spec.name,
                 checkpoint.arch, cfg.precision);
    options.precision = engine::Precision::kFp32;
  }
  auto parts = std::make_shared<ModelParts>();
  // Built (and warmed up) on a thread that exits afterwards. Every thread that runs libtorch
  // keeps an OpenMP team of its own; with the loading thread's idle team beside the model
  // thread's, libgomp manages more threads than there are cores and cuts its spin-wait at
  // barriers from 300000 to 1000 spins, so the model's threads sleep on a futex and are woken
  // at most barriers of the forward pass (docs/PERFORMANCE.md).
  absl::StatusOr<std::unique_ptr<engine::Engine>> engine;
  std::thread([&] { engine = engine::Engine::Create(checkpoint, options); }).join();
  if (!engine.ok()) {
    // A device or precision this machine cannot serve (INVALID_ARGUMENT, FAILED_PRECONDITION,
    // UNIMPLEMENTED) is a bad flag value; anything else (out of memory, a runtime failure) is
    // not: the engine's code decides the exit status.
    return absl::Status(
        engine.status().code(),
        absl::StrCat("engine of model ", spec.name, " (--device ", cfg.device, ", --precision ",
                     cfg.precision, ", --threads ", cfg.threads, "): ", engine.status().message()));
  }
  parts->engine = *std::move(engine);
  engine::Engine* e = parts->engine.get();
  parts->adapter = std::make_unique<EngineModel>(e, faults_);

  service::ServedModel served;
  service::ModelDescription& model = served.description;
  model.name = spec.name;
  if (dlib) {
    model.family = "dlib";
    model.metric = "euclidean";
    model.default_threshold = service::kDlibCosineThreshold;
  }
  model.arch = checkpoint.arch;
  model.model_id = checkpoint.ModelId();
  model.weights_sha256 = checkpoint.sha256;
  model.weights_path = spec.path;
  model.device = e->device();
  model.precision = engine::PrecisionName(e->precision());
  model.backend = e->backend();
  model.demo_weights = spec.demo;
  model.device_memory = [e] { return e->device_memory(); };

  service::EmbedderOptions embedder_options;
  embedder_options.batching.max_batch_size = cfg.max_batch_size;
  embedder_options.batching.max_queue_delay = absl::Microseconds(cfg.max_queue_delay_us);
  embedder_options.batching.max_queue_size = cfg.max_queue_size;
  // Automatic: on the CPU one forward pass already uses every core (a second would only
  // contend); on CUDA one batch per lane, so copies, compute and the next batch overlap.
  embedder_options.batching.max_batches_in_flight =
      cfg.max_batches_in_flight > 0 ? cfg.max_batches_in_flight : e->concurrent_runs();
  embedder_options.batching.cancel_poll_interval = absl::Microseconds(cfg.cancel_poll_interval_us);
  embedder_options.batching.observer = metrics_->ForModel(spec.name);
  if (!cfg.test_hold_model_file.empty()) {
    embedder_options.hold_file = cfg.test_hold_model_file;
    embedder_options.hold_model_file = absl::StrCat(cfg.test_hold_model_file, ".", spec.name);
  }
  absl::StatusOr<std::unique_ptr<service::Embedder>> embedder =
      service::Embedder::Create(embedder_options, parts->adapter.get());
  if (!embedder.ok()) {
    return absl::Status(embedder.status().code(),
                        absl::StrCat("batching: ", embedder.status().message()));
  }
  parts->embedder = *std::move(embedder);
  served.embedder = parts->embedder.get();
  served.resources = std::move(parts);
  return served;
}

absl::StatusOr<std::optional<service::ServedModel>> ModelBuilder::Reread(
    const service::ModelSpec& spec, const service::ServedModel& current) const {
  if (spec.demo) return std::nullopt;  // built in: nothing to read again
  absl::StatusOr<model::Checkpoint> loaded = model::LoadCheckpoint(spec.path);
  if (!loaded.ok()) return loaded.status();
  if (loaded->sha256 == current.description.weights_sha256) return std::nullopt;
  absl::StatusOr<service::ServedModel> built = Build(spec, *std::move(loaded));
  if (!built.ok()) return built.status();
  return std::optional<service::ServedModel>(*std::move(built));
}

void ModelBuilder::Publish(const service::ServedModel& model) const {
  const service::ModelDescription& d = model.description;
  service::ModelMetrics* metrics = metrics_->ForModel(d.name);
  metrics->SetModelInfo(d.arch, d.model_id, d.device, d.precision);
  service::Embedder* embedder = model.embedder;
  metrics->SetQueueDepthSource([embedder] { return double(embedder->batcher().queue_depth()); });
  metrics->SetHeldSource([embedder] { return embedder->held() ? 1.0 : 0.0; });
  metrics->SetDeviceMemorySource(d.device_memory);
}

}  // namespace arcface::app
