// EngineModel: the engine (server/engine) behind the service's EmbeddingModel interface.
//
// Contract
// - Run() hands the crops to Engine::Run() and returns its EmbeddingBatch as it is: the raw
//   embeddings and the norms the engine computed beside them (on the device for CUDA), which
//   the service reports and normalizes with.
// - It is the boundary where an exception escaping the engine becomes a status: the engine
//   turns libtorch's c10::Error into INTERNAL itself, but anything else (std::bad_alloc filling
//   the output, say) would otherwise unwind into the batcher's model thread and end the
//   process; here it is INTERNAL "the engine threw: ...".
// - The fault-injection test hook (`faults`, null unless --test-fault-injection) acts where
//   the engine is called, inside that boundary: an injected failure or throw is reported the
//   same way as the engine's own.
// - Ownership: the engine and the injector are borrowed and must outlive this object.
// - Blocking and threads: as Engine::Run() (reentrant; serialized inside on the CPU).
#ifndef ARCFACE_SERVER_APP_ENGINE_MODEL_H_
#define ARCFACE_SERVER_APP_ENGINE_MODEL_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/engine/engine.h"
#include "server/service/embedding_model.h"
#include "server/service/fault_injection.h"

namespace arcface::app {

class EngineModel final : public service::EmbeddingModel {
 public:
  EngineModel(engine::Engine* engine, service::FaultInjector* faults)
      : engine_(engine), faults_(faults) {}

  // The engine's family's crop and rows (ArcFace 112×112 → 512, dlib 150×150 → 128).
  const model::CropGeometry& geometry() const override { return engine_->geometry(); }
  int embedding_dim() const override { return engine_->embedding_dim(); }
  absl::StatusOr<engine::EmbeddingBatch> Run(absl::Span<const uint8_t> crops) override;

 private:
  engine::Engine* const engine_;
  service::FaultInjector* const faults_;
};

}  // namespace arcface::app

#endif  // ARCFACE_SERVER_APP_ENGINE_MODEL_H_
