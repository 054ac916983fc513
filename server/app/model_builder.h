// ModelBuilder: builds what serves one version of a model (--model NAME=PATH): its engine on
// the device, warmed up; the adapter to the service's EmbeddingModel; its own Embedder (batcher,
// model threads, queue). The server's warm-up phase builds every model with it, and a reload
// (service::ModelReloader) builds a changed model's new version beside the old one.
//
// Contract
// - Build() takes a checkpoint already read and validated (model::LoadCheckpoint, or the demo
//   weights); the engine is built and warmed up on a thread that exits afterwards (Server's
//   WarmUp says why). The ServedModel it returns owns its parts (ServedModel::resources; the
//   Embedder is destroyed first, then the adapter, then the engine).
// - Reread(): the reload's LoadFn: reads the file of the version `current` serves again;
//   nullopt when it holds the same weights (SHA-256) or the model runs on the demo weights.
// - Publish(): points the model's metrics (model_info, queue depth, held, device memory) at a
//   version; called for the version that starts serving.
// - Errors: the file's (missing, unreadable, malformed: INVALID_ARGUMENT naming it), the
//   engine's (a device or precision it cannot serve; out of memory), the batching options'.
// - Ownership: config, metrics and the fault injector are borrowed and outlive the builder and
//   every version it built. Thread safety: const methods, any thread.
#ifndef ARCFACE_SERVER_APP_MODEL_BUILDER_H_
#define ARCFACE_SERVER_APP_MODEL_BUILDER_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/engine/engine.h"
#include "server/model/checkpoint.h"
#include "server/service/fault_injection.h"
#include "server/service/served_models.h"
#include "server/service/server_config.h"
#include "server/service/service_metrics.h"

namespace arcface::app {

class ModelBuilder {
 public:
  // `engine_options`: the flags' (device, precision, threads, warm-up); the dlib family runs in
  // fp32 whatever the precision.
  ModelBuilder(const service::ServerConfig& config, engine::EngineOptions engine_options,
               service::FaultInjector* faults, service::ServiceMetrics* metrics)
      : config_(config), engine_options_(engine_options), faults_(faults), metrics_(metrics) {}

  absl::StatusOr<service::ServedModel> Build(const service::ModelSpec& spec,
                                             model::Checkpoint checkpoint) const;
  absl::StatusOr<std::optional<service::ServedModel>> Reread(
      const service::ModelSpec& spec, const service::ServedModel& current) const;
  void Publish(const service::ServedModel& model) const;

 private:
  const service::ServerConfig& config_;
  const engine::EngineOptions engine_options_;
  service::FaultInjector* const faults_;
  service::ServiceMetrics* const metrics_;
};

}  // namespace arcface::app

#endif  // ARCFACE_SERVER_APP_MODEL_BUILDER_H_
